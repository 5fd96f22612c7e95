//! `action = 'update'`: `UPDATE … SET <set_clause> WHERE <window> AND (<predicate>)`.

use super::Statements;
use crate::archive::{ArchiveTable, Watched};
use crate::fragment::{Fragments, render_assignments};
use crate::keyset::Keyset;
use crate::sql::quote_ident;
use crate::target::Target;

#[derive(Debug, Clone)]
pub struct Update {
    pub(super) statements: Statements,
    /// With an archive: the locking statement, run when the optimistic one reports a race.
    pub(super) locked: Option<Statements>,
    /// With an archive: the columns its images were written for.
    pub(super) watched: Option<Watched>,
}

impl Update {
    pub fn new(
        target: &Target,
        keyset: &Keyset,
        fragments: &Fragments,
        archive: Option<&ArchiveTable>,
    ) -> Self {
        match archive {
            None => Self {
                statements: Statements::render(keyset, None, |range| {
                    plain(target, fragments, range)
                }),
                locked: None,
                watched: None,
            },
            Some(archive) => {
                let sql = Archived {
                    target,
                    fragments,
                    archive,
                };
                let watched = archive.watched(target);
                if sql.before_is_null() {
                    return Self {
                        statements: Statements::render(keyset, None, |range| sql.pinned(range)),
                        locked: None,
                        watched,
                    };
                }
                Self {
                    statements: Statements::render(keyset, None, |range| sql.optimistic(range)),
                    locked: Some(Statements::render(keyset, None, |range| sql.locked(range))),
                    watched,
                }
            }
        }
    }
}

fn plain(target: &Target, fragments: &Fragments, range: &str) -> String {
    format!(
        "UPDATE {table} SET {set} WHERE {range} AND ({pred})",
        table = target.quoted,
        set = render_assignments(&fragments.assignments),
        pred = fragments.predicate,
    )
}

/// Archiving updates. Both statements capture the before-image and write the archive row in the
/// same statement as the change, and repeat the window range on the UPDATE so the planner scans
/// only the window's keys.
///
/// - `optimistic` reads the before-image of each row the predicate selects from the statement's
///   snapshot without locking, together with the identity of that row version: `tableoid` and
///   `ctid` name its slot (a `ctid` alone repeats across the partitions of a partitioned table),
///   and `xmin` names the version in it. The UPDATE then writes a row only if the version it is
///   about to overwrite has that same identity, rechecked on that very version. When live traffic
///   updates a captured row meanwhile, PostgreSQL re-evaluates the conditions on the newest version
///   (EvalPlanQual); that version has another `xmin`, so the row is skipped, never written with a
///   stale image. `xmin` is an ordinary filter, re-evaluated on every PostgreSQL version; the TID
///   condition alone is rechecked only by minor releases from late 2025 on. The statement returns
///   `(captured, changed)`; a difference means a row was skipped, and the batch is rolled back
///   and redone with `locked`.
/// - `pinned` needs no capture at all: when the predicate pins every touched column to NULL (a
///   top-level `column IS NULL` conjunct, on a type where that means the value is NULL), the
///   before-image is NULL by construction. PostgreSQL evaluates the WHERE on exactly the version
///   it overwrites (after a concurrent update, on the newest one), so no version it writes had
///   anything else there. The UPDATE's `RETURNING` gives keys and after-values; the archive row
///   is written in the same statement. This is the common backfill (`WHERE new_col IS NULL`).
/// - `locked` takes `FOR NO KEY UPDATE` first, which re-reads the newest version of a concurrently
///   changed row and re-checks the predicate, so the image is exactly what the UPDATE overwrites.
///   It costs a lock record per row, hence optimistic first.
struct Archived<'a> {
    target: &'a Target,
    fragments: &'a Fragments,
    archive: &'a ArchiveTable,
}

impl Archived<'_> {
    /// Every touched column is NULL in every row version the UPDATE can overwrite.
    fn before_is_null(&self) -> bool {
        let pinned = crate::fragment::null_pinned(&self.fragments.predicate);
        self.touched().iter().all(|c| {
            pinned.iter().any(|p| p == c) && self.target.column(c).is_some_and(|col| col.scalar)
        })
    }

    fn pinned(&self, range: &str) -> String {
        let table = &self.target.quoted;
        let touched = self.touched();
        let returning: Vec<String> = self
            .target
            .keys
            .iter()
            .map(|k| k.name.as_str())
            .chain(touched.iter().copied())
            .enumerate()
            .map(|(i, c)| format!("{table}.{} AS _bf_{i}", quote_ident(c)))
            .collect();
        let keys = self.target.keys.len();
        let select: Vec<String> = (0..keys)
            .map(|i| format!("_bf_{i}"))
            .chain(touched.iter().map(|_| "NULL".to_owned()))
            .chain((keys..keys + touched.len()).map(|i| format!("_bf_{i}")))
            .collect();
        format!(
            "WITH _bf_changed AS (
                UPDATE {table} SET {set} WHERE {range} AND ({pred}) RETURNING {returning})
             INSERT INTO {archive} ({cols}) SELECT {select} FROM _bf_changed",
            set = render_assignments(&self.fragments.assignments),
            pred = self.fragments.predicate,
            returning = returning.join(", "),
            archive = self.archive.quoted,
            cols = self.archive.insert_columns(),
            select = select.join(", "),
        )
    }

    fn touched(&self) -> Vec<&str> {
        self.fragments
            .assignments
            .iter()
            .map(|a| a.column.as_str())
            .collect()
    }

    /// `SELECT key AS _bf_0, …, touched AS _bf_k, …[, version identity]` of the rows the predicate
    /// selects.
    fn old_rows(&self, range: &str, lock: &str, with_version: bool) -> String {
        let cols: Vec<String> = self
            .target
            .keys
            .iter()
            .map(|k| k.name.as_str())
            .chain(self.touched())
            .enumerate()
            .map(|(i, c)| format!("{} AS _bf_{i}", quote_ident(c)))
            .chain(
                with_version
                    .then(|| "tableoid AS _bf_rel, ctid AS _bf_tid, xmin AS _bf_xmin".to_owned()),
            )
            .collect();
        format!(
            "SELECT {} FROM {} WHERE {range} AND ({}){lock}",
            cols.join(", "),
            self.target.quoted,
            self.fragments.predicate
        )
    }

    /// The UPDATE joined to `_bf_old` (by row version, or by key), returning before-images then
    /// after-values.
    fn update(&self, range: &str, by_version: bool) -> String {
        let table = &self.target.quoted;
        let keys = self.target.keys.len();
        let join: Vec<String> = if by_version {
            [
                "tableoid = _bf_old._bf_rel",
                "ctid = _bf_old._bf_tid",
                "xmin = _bf_old._bf_xmin",
            ]
            .iter()
            .map(|c| format!("{table}.{c}"))
            .collect()
        } else {
            self.target
                .keys
                .iter()
                .enumerate()
                .map(|(i, k)| format!("{table}.{} = _bf_old._bf_{i}", quote_ident(&k.name)))
                .collect()
        };
        let touched = self.touched();
        let returning: Vec<String> = (0..keys + touched.len())
            .map(|i| format!("_bf_old._bf_{i}"))
            .chain(
                touched
                    .iter()
                    .map(|c| format!("{table}.{}", quote_ident(c))),
            )
            .collect();
        format!(
            "UPDATE {table} SET {set} FROM _bf_old
             WHERE {range} AND {join} AND ({pred})
             RETURNING {returning}",
            set = render_assignments(&self.fragments.assignments),
            join = join.join(" AND "),
            pred = self.fragments.predicate,
            returning = returning.join(", "),
        )
    }

    fn optimistic(&self, range: &str) -> String {
        format!(
            "WITH _bf_old AS MATERIALIZED ({old}),
                  _bf_changed AS ({update}),
                  _bf_archived AS (INSERT INTO {archive} ({cols}) SELECT * FROM _bf_changed RETURNING 1)
             SELECT (SELECT count(*) FROM _bf_old), (SELECT count(*) FROM _bf_archived)",
            old = self.old_rows(range, "", true),
            update = self.update(range, true),
            archive = self.archive.quoted,
            cols = self.archive.insert_columns(),
        )
    }

    fn locked(&self, range: &str) -> String {
        format!(
            "WITH _bf_old AS ({old}), _bf_changed AS ({update})
             INSERT INTO {archive} ({cols}) SELECT * FROM _bf_changed",
            old = self.old_rows(range, " FOR NO KEY UPDATE", false),
            update = self.update(range, false),
            archive = self.archive.quoted,
            cols = self.archive.insert_columns(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::ArchiveKind;
    use crate::sql::Names;
    use crate::target::{Column, KeyColumn};

    fn column(name: &str, scalar: bool) -> Column {
        Column {
            name: name.into(),
            sql_type: "bigint".into(),
            generated: false,
            generated_from: Vec::new(),
            identity_always: false,
            scalar,
        }
    }

    fn archived(predicate: &str, set: &str, scalar: bool) -> Update {
        let target = Target {
            oid: 1,
            schema: "public".into(),
            table: "t".into(),
            quoted: "\"public\".\"t\"".into(),
            keys: vec![KeyColumn {
                name: "id".into(),
                sql_type: "bigint".into(),
            }],
            columns: vec![column("id", true), column("v", scalar), column("w", true)],
            partitioned: false,
            conflicts: Default::default(),
        };
        let fragments = crate::fragment::validate(predicate, Some(set), &target).unwrap();
        let touched = fragments
            .assignments
            .iter()
            .map(|a| a.column.clone())
            .collect();
        let archive = ArchiveTable::new(
            &Names::new("backfill"),
            "a".into(),
            &target,
            ArchiveKind::Update { touched },
        );
        Update::new(&target, &Keyset::new(&target), &fragments, Some(&archive))
    }

    #[test]
    fn a_predicate_that_pins_every_touched_column_to_null_skips_the_capture() {
        let pinned = archived("v IS NULL AND w > 0", "v = w * 2", true);
        assert!(pinned.locked.is_none());
        assert!(!pinned.statements.get(true).contains("_bf_old"));
        for (predicate, set, scalar) in [
            ("v IS NULL", "v = 1, w = 2", true),
            ("v IS NULL OR w > 0", "v = 1", true),
            ("v IS NULL", "v = 1", false),
        ] {
            let captured = archived(predicate, set, scalar);
            assert!(captured.locked.is_some(), "{predicate} / {set}");
            assert!(
                captured
                    .statements
                    .get(true)
                    .contains("xmin = _bf_old._bf_xmin")
            );
        }
    }
}
