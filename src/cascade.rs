//! Cascade-aware deletes. A delete's archive holds the deleted rows of the target only; foreign
//! keys that cascade into child tables (`ON DELETE CASCADE`, `SET NULL`, `SET DEFAULT`) change
//! rows no revert can restore. The plan lists them with the child rows the delete would touch,
//! and refuses the job unless its row says `allow_cascade = true`.

use crate::db::Db;
use serde::{Deserialize, Serialize};

use crate::error::JobError;
use crate::keyset::{Key, Keyset, bind_keys};
use crate::sql::quote_ident;
use crate::target::Target;

/// One foreign key that a delete on the target would cascade through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cascade {
    pub constraint: String,
    /// `schema.table` of the referencing table, quoted as SQL needs it (`format('%I.%I')`).
    pub child: String,
    /// `CASCADE`, `SET NULL` or `SET DEFAULT`.
    pub on_delete: String,
    /// Child rows that reference a row the delete selects; `None` when counting failed.
    pub child_rows: Option<i64>,
    #[serde(skip)]
    child_columns: Vec<String>,
    #[serde(skip)]
    parent_columns: Vec<String>,
}

impl std::fmt::Display for Cascade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows = self
            .child_rows
            .map_or("uncounted".to_owned(), |n| format!("{n} child rows"));
        write!(
            f,
            "{} on {} (ON DELETE {}, {rows})",
            self.constraint, self.child, self.on_delete
        )
    }
}

/// Top-level foreign keys referencing `target` whose delete action changes child rows. Columns
/// come in key order (`conkey`/`confkey` position).
const CASCADES: &str = "
SELECT c.conname::text,
       format('%I.%I', n.nspname, t.relname),
       CASE c.confdeltype WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL' ELSE 'SET DEFAULT' END,
       ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(attnum, pos)
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum ORDER BY k.pos),
       ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(attnum, pos)
             JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.attnum ORDER BY k.pos)
FROM pg_constraint c
JOIN pg_class t ON t.oid = c.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE c.contype = 'f' AND c.confrelid = $1 AND c.conparentid = 0 AND c.confdeltype IN ('c', 'n', 'd')
ORDER BY 1";

type Row = (String, String, String, Vec<String>, Vec<String>);

/// The cascades a delete of the rows `predicate` selects (keys up to `upper`) would go through,
/// each with its child-row count.
pub async fn find(
    pool: &Db,
    job: &str,
    target: &Target,
    keyset: &Keyset,
    predicate: &str,
    upper: &Key,
) -> Result<Vec<Cascade>, JobError> {
    let rows: Vec<Row> = crate::sql::query_as(CASCADES)
        .bind(sqlx::postgres::types::Oid(target.oid))
        .fetch_all(pool)
        .await
        .map_err(|e| JobError::sql(job, &target.display(), "listing cascading foreign keys", e))?;
    let mut cascades: Vec<Cascade> = rows.into_iter().map(cascade).collect();
    for c in &mut cascades {
        let sql = count_sql(c, target, keyset, predicate);
        let counted: sqlx::Result<i64> = bind_keys(crate::sql::query(&sql), &[upper])
            .try_map(|row: sqlx::postgres::PgRow| sqlx::Row::try_get(&row, 0))
            .fetch_one(pool)
            .await;
        c.child_rows = counted.inspect_err(|e| {
            tracing::warn!(constraint = %c.constraint, error = %e, "could not count cascading child rows");
        }).ok();
    }
    Ok(cascades)
}

fn cascade((constraint, child, on_delete, child_columns, parent_columns): Row) -> Cascade {
    Cascade {
        constraint,
        child,
        on_delete,
        child_rows: None,
        child_columns,
        parent_columns,
    }
}

/// Child rows referencing a row the delete selects. The predicate is the target's: inside the
/// subquery its bare column names resolve to `_bf_t` first.
fn count_sql(c: &Cascade, target: &Target, keyset: &Keyset, predicate: &str) -> String {
    let on: Vec<String> = c
        .child_columns
        .iter()
        .zip(&c.parent_columns)
        .map(|(child, parent)| {
            format!(
                "_bf_t.{} = _bf_c.{}",
                quote_ident(parent),
                quote_ident(child)
            )
        })
        .collect();
    let (range, _) = keyset.range(Some("_bf_t"), false);
    format!(
        "SELECT count(*) FROM {child} AS _bf_c
         WHERE EXISTS (SELECT 1 FROM {table} AS _bf_t WHERE {on} AND {range} AND ({predicate}))",
        child = c.child,
        table = target.quoted,
        on = on.join(" AND "),
    )
}

/// The plan's refusal of a delete that would cascade.
pub fn refusal(job: &str, target: &Target, cascades: &[Cascade]) -> JobError {
    let list: Vec<String> = cascades.iter().map(Cascade::to_string).collect();
    JobError::invalid(
        job,
        format!(
            "a delete on {} would change rows of other tables through foreign keys: {}; the archive \
             cannot restore them. Set allow_cascade = true on the job to run it anyway",
            target.display(),
            list.join("; ")
        ),
    )
}
