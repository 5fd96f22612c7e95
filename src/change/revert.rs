//! `action = 'revert'`: restores the before-images another job archived. The window walks the
//! archive table's keys. A row whose current values differ from the backfill's after-image was
//! changed again since, and is skipped (counted, never overwritten). A deleted row is re-inserted
//! unless a row with its key exists again.

use super::Statements;
use crate::archive::{ArchiveKind, ArchiveTable};
use crate::keyset::Keyset;
use crate::sql::quote_ident;
use crate::target::Target;

#[derive(Debug, Clone)]
pub struct Revert {
    pub(super) statements: Statements,
}

impl Revert {
    /// `keyset` walks the archive table.
    pub fn new(target: &Target, keyset: &Keyset, archive: &ArchiveTable) -> Self {
        let statements = match &archive.kind {
            // The window bounds the target's keys too, so both sides are index range scans in
            // key order rather than one index probe per archived row (130 ms against 1.1 s per
            // 50k-row window measured, where the planner hashed the whole target).
            ArchiveKind::Update { touched } => {
                Statements::render_each(keyset, &[Some("_bf_a"), Some(&target.quoted)], |ranges| {
                    restore_update(target, archive, touched, &ranges.join(" AND "))
                })
            }
            ArchiveKind::Delete => Statements::render(keyset, Some("_bf_a"), |range| {
                reinsert(target, archive, range)
            }),
            ArchiveKind::Insert => {
                Statements::render_each(keyset, &[Some("_bf_a"), Some(&target.quoted)], |ranges| {
                    delete_inserted(target, archive, &ranges.join(" AND "))
                })
            }
        };
        Self { statements }
    }
}

fn restore_update(
    target: &Target,
    archive: &ArchiveTable,
    touched: &[String],
    range: &str,
) -> String {
    let set: Vec<String> = touched
        .iter()
        .map(|c| format!("{0} = _bf_a.{0}", quote_ident(c)))
        .collect();
    let join: Vec<String> = target
        .keys
        .iter()
        .map(|k| format!("{0}.{1} = _bf_a.{1}", target.quoted, quote_ident(&k.name)))
        .collect();
    // A row still holding the after-image in every touched column was not changed since.
    let unchanged: Vec<String> = touched
        .iter()
        .enumerate()
        .map(|(i, c)| unchanged_since(target, archive, c, &ArchiveTable::after_column(i)))
        .collect();
    format!(
        "UPDATE {table} SET {set} FROM {archive} AS _bf_a
         WHERE {join} AND {range} AND {unchanged}",
        table = target.quoted,
        set = set.join(", "),
        archive = archive.quoted,
        join = join.join(" AND "),
        unchanged = unchanged.join(" AND "),
    )
}

/// Whether `target`'s column `column` still holds the after-image archived in `after`. Text
/// forms compare every type, including those without an equality operator (json, point), and
/// tell apart values `=` calls equal (1.0 and 1.00); column by column, as row text would, but
/// without building and quoting two records per row. `COLLATE "C"` compares bytes even where
/// the column's own collation is case-insensitive. Where both columns have one of the types whose
/// `=` holds only for the same stored value ([`EXACT_EQUALITY`]), the values are compared as
/// they are: the same answer without two conversions to text a row (4-8 % of a restoring
/// batch's time on a bigint column, measured).
fn unchanged_since(target: &Target, archive: &ArchiveTable, column: &str, after: &str) -> String {
    let now = format!("{}.{}", target.quoted, quote_ident(column));
    let then = format!("_bf_a.{}", quote_ident(after));
    let declared = target.column(column).map(|c| c.sql_type.as_str());
    match (declared, archive.type_of(after)) {
        (Some(t), Some(a)) if t == a && exact_equality(t) => {
            format!("{now} IS NOT DISTINCT FROM {then}")
        }
        _ => format!("{now}::text COLLATE \"C\" IS NOT DISTINCT FROM {then}::text COLLATE \"C\""),
    }
}

/// Types (as `format_type()` writes them) whose `=` is true only for the same stored value, so
/// it tells a changed value from an unchanged one as exactly as the text form. Not numeric
/// (1.0 = 1.00), floats (0 = -0), `interval` ('1 day' = '24 hours'), `bpchar` (trailing
/// spaces), `jsonb` (its numbers), text under a nondeterministic collation, arrays or domains.
const EXACT_EQUALITY: &[&str] = &[
    "smallint", "integer", "bigint", "boolean", "date", "uuid", "bytea", "oid",
];

fn exact_equality(sql_type: &str) -> bool {
    EXACT_EQUALITY.contains(&sql_type)
        || (sql_type.starts_with("timestamp") && sql_type.ends_with("time zone"))
}

/// Deletes the rows an insert job added, unless they changed since (or the key holds a row
/// someone else inserted after ours was deleted): only a row still holding the archived values
/// goes. The archive holds each row as JSON (`to_jsonb`), compared on the columns the archived
/// row and the current one both have, in their JSON text (numeric scale, string bytes): a
/// column added or dropped since does not make every row look changed. The text of many types
/// depends on the session that wrote it (`TimeZone` for timestamptz, and for ranges, arrays,
/// composites and domains holding one; `IntervalStyle`; `bytea_output`), which may differ from
/// the revert's: so the archived JSON is first read back into the table's row type
/// (`jsonb_populate_record`) and written out again in the revert's session, as the current row
/// is. Archives written before hold the row's text (`ROW(…)::text`, starting with `(`),
/// compared whole as before.
fn delete_inserted(target: &Target, archive: &ArchiveTable, range: &str) -> String {
    let join: Vec<String> = target
        .keys
        .iter()
        .map(|k| format!("{0}.{1} = _bf_a.{1}", target.quoted, quote_ident(&k.name)))
        .collect();
    let row = format!("_bf_a.{}", quote_ident(crate::archive::ROW_COLUMN));
    let written = format!("{row}::jsonb");
    let now = format!("to_jsonb({}.*)", target.quoted);
    let then = format!(
        "to_jsonb(jsonb_populate_record(NULL::{}, {written}))",
        target.quoted
    );
    // Both sides keep the columns the archived row has (and the current table has).
    let common = |of: &str| {
        format!(
            "(SELECT jsonb_object_agg(key, value) FROM jsonb_each({of}) \
              WHERE {written} ? key)::text COLLATE \"C\""
        )
    };
    format!(
        "DELETE FROM {table} USING {archive} AS _bf_a
         WHERE {join} AND {range}
           AND CASE WHEN left({row}, 1) = '{{'
                    THEN {current} IS NOT DISTINCT FROM {archived}
                    ELSE ROW({table}.*)::text COLLATE \"C\" = {row} COLLATE \"C\" END",
        table = target.quoted,
        archive = archive.quoted,
        join = join.join(" AND "),
        current = common(&now),
        archived = common(&then),
    )
}

/// The target's columns a re-insert writes: not generated ones, and only those the archive has
/// (a column added since takes its default; one dropped or renamed since is not restored:
/// `ArchiveTable::lost_columns` lists those for the log).
fn reinserted<'a>(target: &'a Target, archive: &ArchiveTable) -> Vec<&'a str> {
    target
        .columns
        .iter()
        .filter(|c| !c.generated)
        .filter(|c| archive.holds(&c.name))
        .map(|c| c.name.as_str())
        .collect()
}

fn reinsert(target: &Target, archive: &ArchiveTable, range: &str) -> String {
    let cols = reinserted(target, archive);
    let list = crate::target::column_list(cols.iter().copied());
    let select: Vec<String> = cols
        .iter()
        .map(|c| format!("_bf_a.{}", quote_ident(c)))
        .collect();
    let overriding = if target.columns.iter().any(|c| c.identity_always) {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    // A deferrable key cannot be an arbiter: a row whose key exists again is skipped here.
    let key_free = if target.keys_deferrable() {
        let same: Vec<String> = target
            .keys
            .iter()
            .map(|k| format!("_bf_t.{0} = _bf_a.{0}", quote_ident(&k.name)))
            .collect();
        format!(
            " AND NOT EXISTS (SELECT 1 FROM {} AS _bf_t WHERE {})",
            target.quoted,
            same.join(" AND ")
        )
    } else {
        String::new()
    };
    format!(
        "INSERT INTO {table} ({list}){overriding}
         SELECT {select} FROM {archive} AS _bf_a WHERE {range}{parents}{key_free}
         {on_conflict}",
        parents = archive
            .parents
            .iter()
            .map(|c| format!(" AND {c}"))
            .collect::<String>(),
        table = target.quoted,
        on_conflict = target.on_conflict(),
        select = select.join(", "),
        archive = archive.quoted,
    )
}

#[cfg(test)]
mod tests {
    use super::exact_equality;

    #[test]
    fn only_types_whose_equality_is_identity_compare_as_they_are() {
        for t in [
            "bigint",
            "integer",
            "uuid",
            "timestamp(3) with time zone",
            "date",
        ] {
            assert!(exact_equality(t), "{t}");
        }
        for t in [
            "numeric",
            "double precision",
            "interval",
            "character(3)",
            "jsonb",
            "text",
            "bigint[]",
            "public.positive_int",
        ] {
            assert!(!exact_equality(t), "{t}");
        }
    }
}
