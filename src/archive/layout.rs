//! The archive following its table's columns. A column added to the target while a job archives
//! it, or a column whose type changed (`numeric(10,2)` widened to `numeric(12,4)`, `int` to
//! `text`), would otherwise be left out of every later image, or rounded or cast into the
//! archive's old type, and a revert would put back something other than what was there.
//!
//! Two halves: each archived batch checks, in its own transaction, that the table's columns are
//! those its statements were written for ([`Watched`]; a DDL statement needs an exclusive lock,
//! so what the batch's checkpoint sees is what its change statement wrote under), and rolls back
//! when not; the next attempt first brings the archive in line ([`ArchiveTable::follow`]).

use sqlx::{Executor, PgConnection};

use super::{ArchiveKind, ArchiveTable, columns_of};
use crate::sql::quote_ident;
use crate::target::Target;

/// The target's columns (name and `format_type`) that an archiving job's statements were
/// written for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    pub oid: u32,
    columns: Vec<(String, String)>,
    /// Every column counts (a delete archives whole rows); for an update a column added
    /// elsewhere in the table is not the archive's concern.
    whole: bool,
}

impl Watched {
    /// How the table's columns `now` (names and types, in order) differ from those watched, one
    /// description per column; empty when nothing the archive depends on changed.
    pub fn changes(&self, names: &[String], types: &[String]) -> Vec<String> {
        let now: Vec<(&String, &String)> = names.iter().zip(types).collect();
        let mut changes = Vec::new();
        for (name, was) in &self.columns {
            match now.iter().find(|(n, _)| *n == name) {
                None => changes.push(format!("{name} dropped or renamed")),
                Some((_, is)) if *is != was => changes.push(format!("{name} {was} -> {is}")),
                Some(_) => {}
            }
        }
        if self.whole {
            let added = now
                .iter()
                .filter(|(n, _)| !self.columns.iter().any(|(c, _)| c == *n));
            changes.extend(added.map(|(n, t)| format!("{n} {t} added")));
        }
        changes
    }
}

impl ArchiveTable {
    /// What this archive's statements depend on in `target`: every column for a delete's, the
    /// keys and the columns set for an update's; `None` for an insert's (it holds rows as text).
    pub fn watched(&self, target: &Target) -> Option<Watched> {
        if self.kind == ArchiveKind::Insert {
            return None;
        }
        // The after-values are the archive's own columns; the table has none named so (`_bf_`
        // names are refused).
        let columns = self.wanted(target).into_iter();
        let columns = columns.filter(|(c, _)| !c.starts_with(super::AFTER_PREFIX));
        Some(Watched {
            oid: target.oid,
            columns: columns.collect(),
            whole: self.kind == ArchiveKind::Delete,
        })
    }

    /// The archive columns `target` asks for now, with the types they must have: a delete's
    /// archive every column of the table; an update's its keys, the columns it sets and their
    /// after-values, each with its column's type.
    fn wanted(&self, target: &Target) -> Vec<(String, String)> {
        match &self.kind {
            ArchiveKind::Insert => Vec::new(),
            ArchiveKind::Delete => target
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.sql_type.clone()))
                .collect(),
            ArchiveKind::Update { touched } => {
                let held = self.keys.iter().chain(touched);
                let held = held.filter_map(|c| Some((c.clone(), declared(target, c)?)));
                let after = touched.iter().enumerate();
                let after =
                    after.filter_map(|(i, c)| Some((Self::after_column(i), declared(target, c)?)));
                held.chain(after).collect()
            }
        }
    }

    /// Brings an existing archive in line with `target`: a column whose type changed takes the
    /// new type (the images already archived are converted as an assignment would convert
    /// them), and with `adding`, a column the table gained is added (a delete's archive; not
    /// for a revert, which would then restore NULL where the column's default belongs).
    /// Returns what changed, for the log.
    pub async fn follow(
        &mut self,
        conn: &mut PgConnection,
        target: &Target,
        adding: bool,
    ) -> sqlx::Result<Vec<String>> {
        let mut changes = self.follow_renames(conn, target).await?;
        let mut actions = Vec::new();
        let mut added = Vec::new();
        for (name, wanted) in self.wanted(target) {
            let column = quote_ident(&name);
            match self.type_of(&name) {
                None if adding && self.kind == ArchiveKind::Delete => {
                    added.push(name.clone());
                    changes.push(format!("{name} {wanted} added"));
                }
                Some(was) if was != wanted => {
                    actions.push(format!(
                        "ALTER COLUMN {column} TYPE {wanted} USING {column}::{wanted}"
                    ));
                    changes.push(format!("{name} {was} -> {wanted}"));
                }
                _ => {}
            }
        }
        if !actions.is_empty() {
            // The types are format_type() output of the server's own catalog, not job input.
            let alter = format!("ALTER TABLE {} {}", self.quoted, actions.join(", "));
            conn.execute(alter.as_str()).await?;
        }
        if !added.is_empty() {
            self.add(conn, target, &added).await?;
        }
        if !actions.is_empty() || !added.is_empty() {
            self.columns = columns_of(conn, &self.quoted).await?;
        }
        if !added.is_empty() {
            self.record_origins(conn, target, &added).await?;
        }
        Ok(changes)
    }

    /// Adds the columns `names` the table gained to a delete's archive. The images archived
    /// before hold what the table gave its existing rows when the column came: its default (an
    /// identity or `serial` column: a value from its sequence), else NULL, as a revert inserting
    /// them explicitly must (NULL had failed a NOT NULL column's revert with 23502). A generated
    /// column's expression is not a default: it stays NULL, and the revert leaves it out.
    async fn add(
        &self,
        conn: &mut PgConnection,
        target: &Target,
        names: &[String],
    ) -> sqlx::Result<()> {
        let rows: Vec<(String, String, Option<String>)> = crate::sql::query_as(ADDED)
            .bind(sqlx::postgres::types::Oid(target.oid))
            .bind(names)
            .fetch_all(&mut *conn)
            .await?;
        for (name, sql_type, default) in rows {
            let column = quote_ident(&name);
            let Some(default) = default else {
                let add = format!("ALTER TABLE {} ADD COLUMN {column} {sql_type}", self.quoted);
                conn.execute(add.as_str()).await?;
                continue;
            };
            // The default fills the archived rows, then goes: an image written later names
            // every column the table has, and one the table drops since must stay NULL.
            let add = format!(
                "ALTER TABLE {t} ADD COLUMN {column} {sql_type} DEFAULT {default}; \
                 ALTER TABLE {t} ALTER COLUMN {column} DROP DEFAULT",
                t = self.quoted
            );
            conn.execute(add.as_str()).await?;
        }
        Ok(())
    }
}

/// The columns `$2` of table `$1`: name, declared type, and the value its existing rows took
/// when it was added (its default expression, or for an identity column its sequence's next
/// value; none for a generated column or one without a default).
const ADDED: &str = "
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
       CASE WHEN a.attgenerated <> '' THEN NULL
            WHEN a.attidentity <> '' THEN format('nextval(%L::regclass)',
                 pg_get_serial_sequence(a.attrelid::regclass::text, a.attname))
            ELSE pg_get_expr(d.adbin, d.adrelid) END
FROM pg_attribute a
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = $1 AND a.attname = ANY ($2::text[]) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum";

/// The declared type of `target`'s column `name`.
fn declared(target: &Target, name: &str) -> Option<String> {
    let column = target.columns.iter().find(|c| c.name == name)?;
    Some(column.sql_type.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn watched(whole: bool) -> Watched {
        Watched {
            oid: 1,
            columns: vec![
                ("id".into(), "integer".into()),
                ("amount".into(), "numeric(10,2)".into()),
            ],
            whole,
        }
    }

    #[test]
    fn a_delete_watches_every_column_and_an_update_its_own() {
        let names = strings(&["id", "amount", "note"]);
        let types = strings(&["integer", "numeric(10,2)", "text"]);
        assert_eq!(watched(true).changes(&names, &types), ["note text added"]);
        assert!(watched(false).changes(&names, &types).is_empty());
        let types = strings(&["integer", "numeric(12,4)", "text"]);
        assert_eq!(
            watched(false).changes(&names, &types),
            ["amount numeric(10,2) -> numeric(12,4)"]
        );
        let names = strings(&["id"]);
        assert_eq!(
            watched(false).changes(&names, &strings(&["integer"])),
            ["amount dropped or renamed"]
        );
    }
}
