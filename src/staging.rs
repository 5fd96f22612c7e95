//! Updates from supplied data ("the business sent a spreadsheet"): a CSV file is loaded with COPY
//! into a staging table in our schema, and an ordinary update job applies it to the target by key,
//! batch by batch, with the predicate repeated, archive and revert as usual. Loading, checking and
//! enqueueing are one transaction: a bad file (wrong columns, an unparsable value, a duplicate or
//! missing key) fails with PostgreSQL's line number, and nothing is created.
//!
//! The job's fragments are generated, never taken from the file: the predicate selects target rows
//! whose staged values differ (so a second run changes nothing and `verify` ends at 0), the set
//! clause reads each column from the staged row of the same key.

use std::path::Path;

use sqlx::{Executor, PgConnection};

use crate::sql::{Names, quote_ident};
use crate::target::Target;

/// Why a file could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} has no header line")]
    NoHeader { path: String },
    #[error("{path}: column {column:?} is not a column of {table}{}", ambiguity(.alike))]
    UnknownColumn {
        path: String,
        column: String,
        table: String,
        /// Columns it matches when case is ignored (more than one: ambiguous).
        alike: Vec<String>,
    },
    #[error("{path}: column {column:?} appears twice in the header")]
    DuplicateColumn { path: String, column: String },
    #[error("{path}: key column {column:?} is missing from the header")]
    MissingKey { path: String, column: String },
    #[error("{path}: the header names only key columns; nothing to update")]
    NothingToUpdate { path: String },
    #[error("{path}: generated column {column:?} cannot be updated")]
    Generated { path: String, column: String },
    #[error("{path}: {message} ({context})")]
    Load {
        path: String,
        message: String,
        context: String,
    },
    #[error(
        "{path}, line {line}: a line holding only \\. ends COPY's data there, and the rows after \
         it would be left out; quote it (\"\\.\") if it is a value"
    )]
    EndMarker { path: String, line: usize },
    #[error(
        "{path}: the row with key ({key}) would break {rule}: the update would fail at that \
         row, after committing the batches before it"
    )]
    Breaks {
        path: String,
        key: String,
        rule: String,
    },
    #[error(
        "staging table {table} already exists: a job of this name (or one that maps to the same \
         table name) staged a file before, or it was made by hand; use another job name, or drop \
         the table if nothing needs it"
    )]
    Exists { table: String },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A staged file: where it is, and the fragments of the job that applies it.
#[derive(Debug, Clone)]
pub struct Staged {
    /// `"schema"."table"` of the staging table.
    pub table: String,
    pub rows: u64,
    /// Staged keys with no target row: they will change nothing.
    pub unmatched: i64,
    pub predicate: String,
    pub set_clause: String,
}

/// Loads `file` into a new staging table named after the job and returns the job's fragments.
/// Runs on `conn` inside the caller's transaction, so a failure leaves nothing behind.
pub async fn stage_csv(
    conn: &mut PgConnection,
    names: &Names,
    job: &str,
    target: &Target,
    file: &Path,
) -> Result<Staged, StagingError> {
    let path = file.display().to_string();
    let mut data = std::fs::read(file).map_err(|source| StagingError::Read {
        path: path.clone(),
        source,
    })?;
    // Spreadsheet programs start a "CSV UTF-8" export with a byte-order mark.
    if data.starts_with(UTF8_BOM) {
        data.drain(..UTF8_BOM.len());
    }
    cr_line_ends_to_lf(&mut data);
    let header =
        parse_header(&data).ok_or_else(|| StagingError::NoHeader { path: path.clone() })?;
    if let Some(line) = end_marker_line(&data) {
        return Err(StagingError::EndMarker { path, line });
    }
    let header = match_case(header, target);
    let values = check_columns(&path, &header, target)?;
    let table = format!(
        "{}.{}",
        quote_ident(&names.schema),
        quote_ident(&staging_name(job))
    );
    let columns = crate::target::column_list(header.iter().map(String::as_str));
    let keys = crate::target::column_list(target.keys.iter().map(|k| k.name.as_str()));
    conn.execute(
        format!(
            "CREATE TABLE {table} AS SELECT {columns} FROM {} WITH NO DATA;
             ALTER TABLE {table} ADD PRIMARY KEY ({keys})",
            target.quoted
        )
        .as_str(),
    )
    .await
    .map_err(|e| match e.as_database_error().and_then(|d| d.code()) {
        Some(code) if code == "42P07" => StagingError::Exists {
            table: table.clone(),
        },
        _ => StagingError::Database(e),
    })?;
    let rows = copy_in(conn, &path, &table, &columns, data).await?;
    let unmatched = count_unmatched(&mut *conn, &table, target).await?;
    check_rules(conn, &path, &table, target, &values).await?;
    Ok(Staged {
        predicate: predicate(&table, target, &values),
        set_clause: set_clause(&table, target, &values),
        table,
        rows,
        unmatched,
    })
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// `: it matches both "price" and "Price" when case is ignored; …` for a header name that would
/// have been taken for one of several columns.
fn ambiguity(alike: &[String]) -> String {
    if alike.len() < 2 {
        return String::new();
    }
    let names: Vec<String> = alike.iter().map(|n| format!("{n:?}")).collect();
    format!(
        " (when case is ignored it matches {}: write the header as the column is spelled)",
        names.join(" and ")
    )
}

/// A header name that is not a column of the target, but matches exactly one column when case is
/// ignored (`ID`, `Price` from a spreadsheet), is taken as that column.
fn match_case(header: Vec<String>, target: &Target) -> Vec<String> {
    header
        .into_iter()
        .map(|name| {
            if target.column(&name).is_some() {
                return name;
            }
            let mut same = target
                .columns
                .iter()
                .filter(|c| c.name.eq_ignore_ascii_case(&name));
            match (same.next(), same.next()) {
                (Some(c), None) => c.name.clone(),
                _ => name,
            }
        })
        .collect()
}

/// `<job>_staged`, cut to PostgreSQL's 63-byte names.
pub fn staging_name(job: &str) -> String {
    crate::sql::table_name_for(job, "_staged")
}

async fn copy_in(
    conn: &mut PgConnection,
    path: &str,
    table: &str,
    columns: &str,
    data: Vec<u8>,
) -> Result<u64, StagingError> {
    let sql = format!("COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv, HEADER true)");
    let load = async {
        let mut copy = conn.copy_in_raw(&sql).await?;
        copy.send(data).await?;
        copy.finish().await
    };
    load.await.map_err(|e| match &e {
        sqlx::Error::Database(db) => {
            let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
            StagingError::Load {
                path: path.to_owned(),
                message: db.message().to_owned(),
                context: pg.and_then(|p| p.r#where()).unwrap_or("COPY").to_owned(),
            }
        }
        _ => StagingError::Database(e),
    })
}

/// Staged keys with no target row.
pub async fn count_unmatched<'e>(
    conn: impl sqlx::PgExecutor<'e>,
    table: &str,
    target: &Target,
) -> sqlx::Result<i64> {
    let sql = format!(
        "SELECT count(*) FROM {table} AS _bf_staged WHERE NOT EXISTS (SELECT 1 FROM {} AS _bf_t WHERE {})",
        target.quoted,
        key_join("_bf_t", target)
    );
    crate::sql::query_scalar(&sql).fetch_one(conn).await
}

/// Refuses a file whose new values break a rule of the target that the staging table's types
/// do not carry (they hold types and domains only): a NOT NULL column, a CHECK constraint or a
/// foreign key on a column the file sets. The update would otherwise stop at the first such
/// row, deep into the run, with the batches before it committed. Each staged row is checked as
/// the target row it would become (staged values over the current ones). Unique constraints
/// are not checked here: whether a value collides depends on the order the rows change in.
async fn check_rules(
    conn: &mut PgConnection,
    path: &str,
    staging: &str,
    target: &Target,
    values: &[String],
) -> Result<(), StagingError> {
    let rules = rules_on(conn, target, values).await?;
    if rules.is_empty() {
        return Ok(());
    }
    let merged: Vec<String> = target
        .columns
        .iter()
        .map(|c| {
            let from = if values.contains(&c.name) {
                "_bf_staged"
            } else {
                "_bf_t"
            };
            format!("{from}.{0} AS {0}", quote_ident(&c.name))
        })
        .collect();
    let key: Vec<String> = target
        .keys
        .iter()
        .map(|k| format!("_bf_m.{}::text", quote_ident(&k.name)))
        .collect();
    let which: Vec<String> = rules
        .iter()
        .enumerate()
        .map(|(i, (_, broken))| format!("WHEN {broken} THEN {i}"))
        .collect();
    let any: Vec<&str> = rules.iter().map(|(_, broken)| broken.as_str()).collect();
    let sql = format!(
        "SELECT concat_ws(', ', {key}), CASE {which} END::int
         FROM (SELECT {merged} FROM {staging} AS _bf_staged JOIN {target} AS _bf_t ON {join}) AS _bf_m
         WHERE {any}
         LIMIT 1",
        key = key.join(", "),
        which = which.join(" "),
        merged = merged.join(", "),
        target = target.quoted,
        join = key_join("_bf_t", target),
        any = any.join(" OR "),
    );
    let found: Option<(String, i32)> = crate::sql::query_as(&sql).fetch_optional(conn).await?;
    match found {
        None => Ok(()),
        Some((key, i)) => Err(StagingError::Breaks {
            path: path.to_owned(),
            key,
            rule: rules[i as usize].0.clone(),
        }),
    }
}

/// The target's rules on the columns `values`, each as its description and a condition on
/// `_bf_m` (the row as it would become) that is true where the row breaks it.
async fn rules_on(
    conn: &mut PgConnection,
    target: &Target,
    values: &[String],
) -> sqlx::Result<Vec<(String, String)>> {
    let oid = sqlx::postgres::types::Oid(target.oid);
    let table = target.display();
    let not_null: Vec<String> = crate::sql::query_scalar(
        "SELECT attname::text FROM pg_attribute
         WHERE attrelid = $1 AND attnotnull AND attnum > 0 AND NOT attisdropped
           AND attname = ANY($2) ORDER BY attnum",
    )
    .bind(oid)
    .bind(values)
    .fetch_all(&mut *conn)
    .await?;
    let mut rules: Vec<(String, String)> = not_null
        .iter()
        .map(|c| {
            (
                format!("NOT NULL on column {} of {table}", quote_ident(c)),
                format!("_bf_m.{} IS NULL", quote_ident(c)),
            )
        })
        .collect();
    let checks: Vec<(String, String)> = crate::sql::query_as(
        "SELECT c.conname::text, pg_get_expr(c.conbin, c.conrelid) FROM pg_constraint c
         WHERE c.conrelid = $1 AND c.contype = 'c'
           AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.conrelid
                       AND a.attnum = ANY(c.conkey) AND a.attname = ANY($2))
         ORDER BY c.conname",
    )
    .bind(oid)
    .bind(values)
    .fetch_all(&mut *conn)
    .await?;
    // The expression names the table's columns bare: `_bf_m` is the only relation in scope.
    rules.extend(checks.into_iter().map(|(name, expr)| {
        (
            format!(
                "check constraint {} of {table} (CHECK ({expr}))",
                quote_ident(&name)
            ),
            format!("({expr}) IS FALSE"),
        )
    }));
    let keys: Vec<ForeignKey> = crate::sql::query_as(concat!(
        "SELECT c.conname::text, c.confrelid::regclass::text, ",
        crate::cascade::key_columns!(),
        ", c.confmatchtype = 'f'
         FROM pg_constraint c
         WHERE c.conrelid = $1 AND c.contype = 'f'
           AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.conrelid
                       AND a.attnum = ANY(c.conkey) AND a.attname = ANY($2))
           AND NOT EXISTS (SELECT FROM pg_constraint pc
                           WHERE pc.oid = c.conparentid AND pc.conrelid = c.conrelid)
         ORDER BY c.conname"
    ))
    .bind(oid)
    .bind(values)
    .fetch_all(&mut *conn)
    .await?;
    rules.extend(
        keys.into_iter()
            .map(|(name, parent, child, referenced, full)| {
                (
                    format!(
                        "foreign key {} of {table} (to {parent})",
                        quote_ident(&name)
                    ),
                    foreign_key_broken(&parent, &child, &referenced, full),
                )
            }),
    );
    Ok(rules)
}

/// A foreign key of the target: name, referenced table, referencing and referenced columns,
/// MATCH FULL.
type ForeignKey = (String, String, Vec<String>, Vec<String>, bool);

/// True where `_bf_m`'s columns `child` reference no row of `parent`: all of them set (MATCH
/// SIMPLE) and no parent row holds them; with MATCH FULL, also some set and some NULL.
fn foreign_key_broken(parent: &str, child: &[String], referenced: &[String], full: bool) -> String {
    let set: Vec<String> = child
        .iter()
        .map(|c| format!("_bf_m.{} IS NOT NULL", quote_ident(c)))
        .collect();
    let eq: Vec<String> = child
        .iter()
        .zip(referenced)
        .map(|(c, p)| format!("_bf_p.{} = _bf_m.{}", quote_ident(p), quote_ident(c)))
        .collect();
    let missing = format!(
        "({}) AND NOT EXISTS (SELECT 1 FROM {parent} AS _bf_p WHERE {})",
        set.join(" AND "),
        eq.join(" AND ")
    );
    if !full {
        return missing;
    }
    let cols: Vec<String> = child
        .iter()
        .map(|c| format!("_bf_m.{}", quote_ident(c)))
        .collect();
    format!(
        "({missing} OR num_nulls({cols}) BETWEEN 1 AND {partial})",
        cols = cols.join(", "),
        partial = child.len() - 1
    )
}

/// The line number of a line holding only `\.` outside a quoted field, with data after it: COPY
/// (PostgreSQL 15 and earlier) takes it as the end of the data and silently ignores the rest.
fn end_marker_line(data: &[u8]) -> Option<usize> {
    let (mut line, mut quoted, mut at_start) = (1, false, true);
    for (i, &b) in data.iter().enumerate() {
        if at_start && !quoted {
            let rest = &data[i..];
            let after = rest
                .strip_prefix(b"\\.\n")
                .or_else(|| rest.strip_prefix(b"\\.\r\n"));
            // A marker with nothing after it loses nothing.
            if after.is_some_and(|a| !a.iter().all(u8::is_ascii_whitespace)) {
                return Some(line);
            }
        }
        at_start = false;
        match b {
            b'"' => quoted = !quoted,
            b'\n' => {
                line += 1;
                at_start = true;
            }
            _ => {}
        }
    }
    None
}

/// A file whose lines end in a bare CR (classic Mac OS, some exporters) has no LF at all: its CRs
/// outside quoted fields become LFs, so the header is its first line. A CR inside a quoted field
/// is data and stays.
fn cr_line_ends_to_lf(data: &mut [u8]) {
    if data.contains(&b'\n') || !data.contains(&b'\r') {
        return;
    }
    let mut quoted = false;
    for b in data.iter_mut() {
        match *b {
            b'"' => quoted = !quoted,
            b'\r' if !quoted => *b = b'\n',
            _ => {}
        }
    }
}

/// The header's column names (CSV quoting: `"a ""b"""`); `None` for an empty file.
fn parse_header(data: &[u8]) -> Option<Vec<String>> {
    let text = String::from_utf8_lossy(data);
    let line = text.lines().next()?.trim_end_matches('\r');
    if line.trim().is_empty() {
        return None;
    }
    let (mut names, mut cur, mut quoted, mut chars) =
        (Vec::new(), String::new(), false, line.chars().peekable());
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => names.push(std::mem::take(&mut cur).trim().to_owned()),
            (c, _) => cur.push(c),
        }
    }
    names.push(cur.trim().to_owned());
    Some(names)
}

/// Every header column exists in the target, none twice, every key column present, at least one
/// column to update and none generated. Returns the columns to update.
fn check_columns(
    path: &str,
    header: &[String],
    target: &Target,
) -> Result<Vec<String>, StagingError> {
    let mut seen = std::collections::HashSet::new();
    for column in header {
        let Some(c) = target.column(column) else {
            let alike = target.columns.iter().map(|c| &c.name);
            let alike = alike.filter(|n| n.eq_ignore_ascii_case(column)).cloned();
            return Err(StagingError::UnknownColumn {
                path: path.to_owned(),
                column: column.clone(),
                table: target.display(),
                alike: alike.collect(),
            });
        };
        if !seen.insert(column) {
            return Err(StagingError::DuplicateColumn {
                path: path.to_owned(),
                column: column.clone(),
            });
        }
        let is_key = target.keys.iter().any(|k| &k.name == column);
        if c.generated && !is_key {
            return Err(StagingError::Generated {
                path: path.to_owned(),
                column: column.clone(),
            });
        }
    }
    if let Some(k) = target.keys.iter().find(|k| !header.contains(&k.name)) {
        return Err(StagingError::MissingKey {
            path: path.to_owned(),
            column: k.name.clone(),
        });
    }
    let values: Vec<String> = header
        .iter()
        .filter(|c| !target.keys.iter().any(|k| &k.name == *c))
        .cloned()
        .collect();
    if values.is_empty() {
        return Err(StagingError::NothingToUpdate {
            path: path.to_owned(),
        });
    }
    Ok(values)
}

/// `_bf_staged.k = <alias>.k AND …`.
fn key_join(alias: &str, target: &Target) -> String {
    target
        .keys
        .iter()
        .map(|k| format!("_bf_staged.{0} = {alias}.{0}", quote_ident(&k.name)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Target rows whose staged values differ. The target is named by its bare table name, which
/// every statement of the job can use for the row it is on.
fn predicate(staging: &str, target: &Target, values: &[String]) -> String {
    let row = quote_ident(&target.table);
    // Text forms, column by column (as the revert compares): `=` calls values equal that the
    // file changes (citext 'Alice' and 'alice', numeric 1.0 and 1.00), and json has no `=`.
    // `COLLATE "C"` compares bytes even where the column's collation is case-insensitive.
    let differs: Vec<String> = values
        .iter()
        .map(|c| {
            format!(
                "_bf_staged.{c}::text COLLATE \"C\" IS DISTINCT FROM {row}.{c}::text COLLATE \"C\"",
                c = quote_ident(c)
            )
        })
        .collect();
    // `OFFSET 0` keeps the EXISTS a per-row probe of the staging table's key: as a semi-join the
    // planner hashed the whole staging table for every batch (a 1M-row file: 1,073 batches of
    // ~80 ms, 114 s), so a batch cost the file's size instead of its window's.
    format!(
        "EXISTS (SELECT 1 FROM {staging} AS _bf_staged WHERE {} AND ({}) OFFSET 0)",
        key_join(&row, target),
        differs.join(" OR "),
    )
}

fn set_clause(staging: &str, target: &Target, values: &[String]) -> String {
    let row = quote_ident(&target.table);
    values
        .iter()
        .map(|c| {
            format!(
                "{col} = (SELECT _bf_staged.{col} FROM {staging} AS _bf_staged WHERE {})",
                key_join(&row, target),
                col = quote_ident(c)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_marker_line_is_found_outside_quotes_only() {
        assert_eq!(end_marker_line(b"id,a\n1,x\n\\.\n2,y\n"), Some(3));
        assert_eq!(end_marker_line(b"id,a\r\n1,x\r\n\\.\r\n2,y\r\n"), Some(3));
        assert_eq!(end_marker_line(b"id,a\n1,x\n\\.\n\n"), None);
        assert_eq!(end_marker_line(b"id,a\n1,\"x\n\\.\n\"\n"), None);
        assert_eq!(end_marker_line(b"id,a\n1,\\.\n\\.x,2\n"), None);
    }

    #[test]
    fn headers_follow_csv_quoting() {
        assert_eq!(
            parse_header(b"id,\"a \"\"b\"\"\", c\r\n1,2,3\n"),
            Some(vec!["id".into(), "a \"b\"".into(), "c".into()])
        );
        assert_eq!(parse_header(b""), None);
        let target = Target {
            oid: 1,
            schema: "public".into(),
            table: "t".into(),
            quoted: "\"public\".\"t\"".into(),
            keys: Vec::new(),
            columns: ["id", "Name", "name"]
                .iter()
                .map(|n| crate::target::Column {
                    name: n.to_string(),
                    sql_type: "text".into(),
                    generated: false,
                    generated_from: Vec::new(),
                    identity_always: false,
                    scalar: true,
                })
                .collect(),
            partitioned: false,
            conflicts: Default::default(),
        };
        let header = ["ID", "NAME", "name", "x"].map(String::from).to_vec();
        assert_eq!(
            match_case(header, &target),
            ["id", "NAME", "name", "x"],
            "a unique case-insensitive match only"
        );
        assert_eq!(staging_name("Fix Prices!"), "fix_prices__staged");
    }
}
