//! `action = 'update'`: `UPDATE … SET <set_clause> WHERE <window> AND (<predicate>)`.

use super::Statements;
use crate::archive::ArchiveTable;
use crate::fragment::{Fragments, render_assignments};
use crate::keyset::Keyset;
use crate::sql::quote_ident;
use crate::target::Target;

#[derive(Debug, Clone)]
pub struct Update {
    pub(super) statements: Statements,
}

impl Update {
    pub fn new(
        target: &Target,
        keyset: &Keyset,
        fragments: &Fragments,
        archive: Option<&ArchiveTable>,
    ) -> Self {
        let statements = match archive {
            None => Statements::render(keyset, None, |range| plain(target, fragments, range)),
            Some(archive) => Statements::render(keyset, None, |range| {
                archived(target, fragments, archive, range)
            }),
        };
        Self { statements }
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

/// The UPDATE repeats the window range so the planner scans only the window's keys (without it, a
/// merge join walks the key index from the start of the table on every batch).
/// Locks the rows the predicate selects (`FOR NO KEY UPDATE` re-reads the newest version of a
/// concurrently changed row and re-checks the predicate), so the before-image captured is exactly
/// what the UPDATE overwrites; the archive INSERT is part of the same statement.
fn archived(target: &Target, fragments: &Fragments, archive: &ArchiveTable, range: &str) -> String {
    let touched: Vec<&str> = fragments
        .assignments
        .iter()
        .map(|a| a.column.as_str())
        .collect();
    let old_cols: Vec<String> = target
        .keys
        .iter()
        .map(|k| k.name.as_str())
        .chain(touched.iter().copied())
        .enumerate()
        .map(|(i, c)| format!("{} AS _bf_{i}", quote_ident(c)))
        .collect();
    let n_old = old_cols.len();
    let join: Vec<String> = target
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            format!(
                "{}.{} = _bf_old._bf_{i}",
                target.quoted,
                quote_ident(&k.name)
            )
        })
        .collect();
    let returning: Vec<String> = (0..n_old)
        .map(|i| format!("_bf_old._bf_{i}"))
        .chain(
            touched
                .iter()
                .map(|c| format!("{}.{}", target.quoted, quote_ident(c))),
        )
        .collect();
    format!(
        "WITH _bf_old AS (
             SELECT {old_cols} FROM {table} WHERE {range} AND ({pred}) FOR NO KEY UPDATE
         ), _bf_changed AS (
             UPDATE {table} SET {set} FROM _bf_old
             WHERE {range} AND {join} AND ({pred})
             RETURNING {returning}
         )
         INSERT INTO {archive} ({archive_cols}) SELECT * FROM _bf_changed",
        old_cols = old_cols.join(", "),
        table = target.quoted,
        pred = fragments.predicate,
        set = render_assignments(&fragments.assignments),
        join = join.join(" AND "),
        returning = returning.join(", "),
        archive = archive.quoted,
        archive_cols = archive.insert_columns(),
    )
}
