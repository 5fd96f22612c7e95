//! A plan's warning about batches that read another table in full. A predicate (or set clause)
//! with a subquery over another table is turned into a join by PostgreSQL, and for a window of a
//! few thousand rows the planner may prefer to hash the whole other table, in every batch: the
//! batch then costs that table's size, not its window's, and the controller shrinks batches that
//! cannot get cheaper (a CSV update of 1M rows took 114 s that way, 27 s with per-row probes).
//! The plan explains the write of one batch-sized window (`plan::explain`); this names such tables.

use serde_json::Value;

use crate::db::Db;
use crate::target::Target;

/// A table the batch's plan scans sequentially.
#[derive(Debug, Clone, PartialEq)]
struct Scan {
    schema: String,
    table: String,
    /// The name the statement reads it under: a subquery over the target itself (a self-join,
    /// as in a delete of duplicates) has another alias than the window's own scan.
    alias: String,
}

/// Warnings for tables other than the target (or its partitions) that `explain` (the plan's
/// `EXPLAIN (FORMAT JSON, VERBOSE)` of a window of `keys` keys) reads in full, when they hold
/// more than ten times the window and at least 10,000 rows. Empty when nothing to warn about,
/// or when the table sizes cannot be read.
pub async fn warnings(pool: &Db, explain: &Value, target: &Target, keys: i64) -> Vec<String> {
    let mut scans = Vec::new();
    collect(explain, &mut scans);
    let mut out = Vec::new();
    for s in dedup(scans) {
        match foreign_rows(pool, &s, target).await {
            Ok(Some(rows)) if rows >= 10_000 && rows > 10 * keys => {
                out.push(message(&s, rows, keys))
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "reading a scanned table's size failed"),
        }
    }
    out
}

fn message(s: &Scan, rows: i64, keys: i64) -> String {
    format!(
        "each batch of ~{keys} keys reads all of {}.{} (~{rows} rows, a sequential scan in the \
         plan of its write): a subquery over it should probe an index per row: index the \
         columns it matches on, and write it with OFFSET 0 (`EXISTS (SELECT 1 FROM … WHERE … \
         OFFSET 0)`) so PostgreSQL probes instead of hashing the whole table",
        s.schema, s.table
    )
}

/// Sequential scans anywhere in an `EXPLAIN (FORMAT JSON, VERBOSE)` tree.
fn collect(node: &Value, out: &mut Vec<Scan>) {
    match node {
        Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
        Value::Object(map) => {
            if map.get("Node Type").and_then(Value::as_str) == Some("Seq Scan")
                && let (Some(schema), Some(table)) = (
                    map.get("Schema").and_then(Value::as_str),
                    map.get("Relation Name").and_then(Value::as_str),
                )
            {
                out.push(Scan {
                    schema: schema.to_owned(),
                    table: table.to_owned(),
                    alias: map
                        .get("Alias")
                        .and_then(Value::as_str)
                        .unwrap_or(table)
                        .to_owned(),
                });
            }
            map.values().for_each(|v| collect(v, out));
        }
        _ => {}
    }
}

fn dedup(mut scans: Vec<Scan>) -> Vec<Scan> {
    let mut seen = Vec::new();
    scans.retain(|s| {
        let new = !seen.contains(s);
        if new {
            seen.push(s.clone());
        }
        new
    });
    scans
}

/// The table's estimated rows, or `None` for the window's own scan: the target under its own
/// name, or one of its partitions. The target read under another alias is a subquery's.
async fn foreign_rows(pool: &Db, s: &Scan, target: &Target) -> sqlx::Result<Option<i64>> {
    let row: Option<(i64, bool, bool)> = crate::sql::query_as(
        "SELECT c.reltuples::bigint, c.oid = $3::oid,
                EXISTS (SELECT 1 FROM pg_partition_ancestors(c.oid) a
                        WHERE a.relid::oid = $3::oid AND a.relid::oid <> c.oid)
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2",
    )
    .bind(&s.schema)
    .bind(&s.table)
    .bind(target.oid as i64)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some((_, _, true)) => None,
        Some((_, true, _)) if s.alias == target.table => None,
        Some((rows, _, _)) => Some(rows),
        None => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_scans_are_found_at_any_depth_once() {
        let plan = serde_json::json!([{"Plan": {"Node Type": "Update", "Plans": [
            {"Node Type": "Hash Join", "Plans": [
                {"Node Type": "Index Scan", "Schema": "public", "Relation Name": "t"},
                {"Node Type": "Hash", "Plans": [
                    {"Node Type": "Seq Scan", "Schema": "public", "Relation Name": "other"}]}]},
            {"Node Type": "Seq Scan", "Schema": "public", "Relation Name": "other"}]}}]);
        let mut scans = Vec::new();
        collect(&plan, &mut scans);
        assert_eq!(
            dedup(scans),
            vec![Scan {
                schema: "public".into(),
                table: "other".into(),
                alias: "other".into(),
            }]
        );
    }
}
