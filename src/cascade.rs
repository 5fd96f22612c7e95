//! Foreign-key-aware deletes. A delete's archive holds the deleted rows of the target only; foreign
//! keys that cascade into child tables (`ON DELETE CASCADE`, `SET NULL`, `SET DEFAULT`) change
//! rows no revert can restore. The plan lists them with the child rows the delete would touch,
//! and refuses the job unless its row says `allow_cascade = true`. Foreign keys that forbid the
//! delete (`NO ACTION`, `RESTRICT`) would fail the first batch that reaches a referenced row,
//! possibly deep into the run with earlier batches committed: the plan counts the referencing
//! rows the delete leaves behind and refuses the job while there are any, and warns when a
//! tree's selected rows reference each other (that fails only if batches reach a parent first).
//! Keys below the target, on tables a cascade deletes rows of, are found and judged the same
//! way (`Below`).

use crate::db::Db;
use serde::{Deserialize, Serialize};

use crate::error::JobError;
use crate::keyset::{Key, Keyset, bind_keys};
use crate::sql::quote_ident;
use crate::target::Target;

/// One foreign key referencing the target: a delete cascades through it or is forbidden by it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cascade {
    pub constraint: String,
    /// `schema.table` of the referencing table, quoted as SQL needs it (`format('%I.%I')`).
    pub child: String,
    /// `CASCADE`, `SET NULL`, `SET DEFAULT`, `NO ACTION` or `RESTRICT`.
    pub on_delete: String,
    /// The same for an update of the referenced columns (see `update_reaches`).
    #[serde(skip)]
    on_update: String,
    /// Child rows that reference a row the delete selects (for a key the target holds on
    /// itself, those it does not select: see `count_sql`); `None` when counting failed.
    pub child_rows: Option<i64>,
    #[serde(skip)]
    self_referencing: bool,
    /// `ON DELETE SET NULL` (or `SET DEFAULT` without a default) into a column that refuses
    /// NULL: the delete fails on every child row.
    #[serde(skip)]
    nulls_refused: bool,
    /// For a key the target holds on itself that forbids the delete: rows the delete selects
    /// that reference another row it selects (see `count_sql`).
    #[serde(skip)]
    interlinked: Option<i64>,
    #[serde(skip)]
    child_columns: Vec<String>,
    #[serde(skip)]
    parent_columns: Vec<String>,
    /// The referencing table's oid (to follow a cascade below it).
    #[serde(skip)]
    child_oid: u32,
    /// For a key below the target: the tables whose rows the delete removes through `ON DELETE
    /// CASCADE` on the way to this key's table, nearest the target first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub via: Vec<String>,
    /// A key on a table `MAX_DEPTH` cascades below the target: listed, not counted, and the
    /// keys below it not followed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub beyond_depth: bool,
}

impl std::fmt::Display for Cascade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows = self.rows_counted();
        let via = match self.via.as_slice() {
            [] => String::new(),
            tables => format!(", through {}", tables.join(", ")),
        };
        let refused = match (self.nulls_refused, self.on_delete.as_str()) {
            (false, _) => "",
            (true, "SET NULL") => " into a NOT NULL column",
            (true, _) => " into a NOT NULL column without a default",
        };
        write!(
            f,
            "{} on {} (ON DELETE {}{refused}, {rows}{via})",
            self.constraint, self.child, self.on_delete
        )
    }
}

impl Cascade {
    /// `12 child rows`, `1 child row`, or `uncounted`.
    pub fn rows_counted(&self) -> String {
        match self.child_rows {
            Some(1) => "1 child row".to_owned(),
            Some(n) => format!("{n} child rows"),
            None => "uncounted".to_owned(),
        }
    }

    /// What the plan could not count about this key, and what that leaves to chance; `None`
    /// when it was counted.
    fn uncounted(&self) -> Option<String> {
        if self.child_rows.is_some() {
            return None;
        }
        let why = if self.beyond_depth {
            format!(
                "it lies more than {MAX_DEPTH} tables below the target, where the plan stops \
                 following cascades"
            )
        } else {
            "counting them failed (see the log)".to_owned()
        };
        let risk = if self.changes_children() {
            "the rows it changes, and any foreign keys below them, are not in the plan"
        } else {
            "a batch deleting a row they reference fails the job, with the batches before it \
             committed"
        };
        Some(format!("{self}: its rows were not counted ({why}); {risk}"))
    }

    /// The key's `ON UPDATE` action.
    pub fn on_update(&self) -> &str {
        &self.on_update
    }

    /// Whether a delete of a referenced row changes child rows (rather than failing).
    pub fn changes_children(&self) -> bool {
        changes_children(&self.on_delete)
    }

    /// A key the target holds on itself that forbids the delete: rows the delete selects may
    /// reference each other (see `Linking`).
    /// So does one that sets NULL where the table refuses it (`nulls_refused`): a selected
    /// child is deleted with its parent when they share a batch.
    fn is_tree(&self) -> bool {
        self.self_referencing && (!self.changes_children() || self.nulls_refused)
    }

    /// A key that forbids the delete while the count found referencing rows it leaves behind,
    /// or sets NULL where its table refuses NULL (PostgreSQL raises 23502 on the first such row).
    fn blocks(&self) -> bool {
        (!self.changes_children() || self.nulls_refused) && self.child_rows.is_some_and(|n| n > 0)
    }
}

/// Whether a referential action changes the child rows (rather than forbidding the change).
fn changes_children(action: &str) -> bool {
    matches!(action, "CASCADE" | "SET NULL" | "SET DEFAULT")
}

/// The referencing and the referenced columns of the foreign key `c` (a `pg_constraint` row), in
/// key order (`conkey`/`confkey` position): two SQL select-list items.
macro_rules! key_columns {
    () => {
        "ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(attnum, pos)
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum ORDER BY k.pos),
       ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(attnum, pos)
             JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.attnum ORDER BY k.pos)"
    };
}
pub(crate) use key_columns;

/// Foreign keys referencing `target` or one of its partitions (a key may reference a leaf
/// partition's own unique index: the plan had not seen it), one row each. A key involving
/// partitioned tables has a `pg_constraint` row per partition on each side: those of the
/// referencing side's partitions (whose parent constraint references the same table), and those
/// of the referenced side's partitions whose parent constraint references the target's tree, are
/// left out, so a referenced partitioned table lists its key once; a single partition as the
/// target keeps the copies of keys referencing its parent (`conparentid <> 0`).
const FOREIGN_KEYS: &str = concat!(
    "
WITH tree AS (SELECT $1::oid AS relid UNION SELECT relid FROM pg_partition_tree($1::oid::regclass))
SELECT c.conname::text,
       format('%I.%I', n.nspname, t.relname),
       CASE c.confdeltype WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL' WHEN 'd' THEN 'SET DEFAULT'
                          WHEN 'r' THEN 'RESTRICT' ELSE 'NO ACTION' END,
       CASE c.confupdtype WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL' WHEN 'd' THEN 'SET DEFAULT'
                          WHEN 'r' THEN 'RESTRICT' ELSE 'NO ACTION' END,
       -- A key on the table itself, or (the target a partition) on a table it is part of.
       c.conrelid = c.confrelid
         OR c.conrelid IN (SELECT relid FROM pg_partition_ancestors(c.confrelid)),
       -- ON DELETE SET NULL, or SET DEFAULT where the default is NULL, into a column that
       -- refuses NULL (NOT NULL, or a NOT NULL domain at any depth): all the key's columns, or
       -- those listed. The default is the column's (an explicit NULL overrides a domain's),
       -- else the nearest domain's.
       c.confdeltype IN ('n', 'd') AND EXISTS (
           SELECT FROM pg_attribute a
           LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
           CROSS JOIN LATERAL (
               WITH RECURSIVE dom (depth, not_null, dflt, base) AS (
                   SELECT 0, d.typnotnull, d.typdefault, d.typbasetype
                   FROM pg_type d WHERE d.oid = a.atttypid AND d.typtype = 'd'
                   UNION ALL
                   SELECT dom.depth + 1, d.typnotnull, d.typdefault, d.typbasetype
                   FROM pg_type d JOIN dom ON d.oid = dom.base WHERE d.typtype = 'd')
               SELECT coalesce(bool_or(not_null), false) AS not_null,
                      (array_agg(dflt ORDER BY depth) FILTER (WHERE dflt IS NOT NULL))[1] AS dflt
               FROM dom) ty
           WHERE a.attrelid = c.conrelid
             AND a.attnum = ANY (CASE WHEN cardinality(c.confdelsetcols) > 0
                                      THEN c.confdelsetcols ELSE c.conkey END)
             AND (a.attnotnull OR ty.not_null)
             AND (c.confdeltype = 'n'
                  OR coalesce(pg_get_expr(ad.adbin, ad.adrelid), ty.dflt, 'NULL') ~ '^NULL($|::)')),
       ",
    key_columns!(),
    ",
       c.conrelid
FROM pg_constraint c
JOIN pg_class t ON t.oid = c.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE c.contype = 'f' AND c.confrelid IN (SELECT relid FROM tree)
  AND NOT EXISTS (SELECT FROM pg_constraint pc
                  WHERE pc.oid = c.conparentid
                    AND (pc.confrelid = c.confrelid OR pc.confrelid IN (SELECT relid FROM tree)))
ORDER BY 1"
);

type Row = (
    String,
    String,
    String,
    String,
    bool,
    bool,
    Vec<String>,
    Vec<String>,
    sqlx::postgres::types::Oid,
);

/// The foreign keys referencing `target`, uncounted.
async fn referencing<'e>(
    db: impl sqlx::PgExecutor<'e>,
    job: &str,
    target: &Target,
) -> Result<Vec<Cascade>, JobError> {
    referencing_oid(db, job, target, target.oid).await
}

/// The foreign keys referencing the table `oid` (the target, or a table below it), uncounted.
async fn referencing_oid<'e>(
    db: impl sqlx::PgExecutor<'e>,
    job: &str,
    target: &Target,
    oid: u32,
) -> Result<Vec<Cascade>, JobError> {
    let rows: Vec<Row> = crate::sql::query_as(FOREIGN_KEYS)
        .bind(sqlx::postgres::types::Oid(oid))
        .fetch_all(db)
        .await
        .map_err(|e| {
            JobError::sql(
                job,
                &target.display(),
                "listing referencing foreign keys",
                e,
            )
        })?;
    Ok(rows.into_iter().map(cascade).collect())
}

/// An update that sets a column another table references `ON UPDATE CASCADE`, `SET NULL` or
/// `SET DEFAULT` changes that table's rows too, which the archive cannot restore: the first such
/// key and the assigned column it references.
pub async fn update_reaches<'e>(
    db: impl sqlx::PgExecutor<'e>,
    job: &str,
    target: &Target,
    assigned: &[&str],
) -> Result<Option<(Cascade, String)>, JobError> {
    let keys = referencing(db, job, target).await?;
    for c in keys.into_iter().filter(|c| changes_children(&c.on_update)) {
        if let Some(a) = assigned
            .iter()
            .find(|a| c.parent_columns.iter().any(|p| p == *a))
        {
            return Ok(Some((c, a.to_string())));
        }
    }
    Ok(None)
}

/// The foreign keys a delete of the rows `predicate` selects (keys up to `upper`) would cascade
/// through or be forbidden by, each with its child-row count.
pub async fn find(
    pool: &Db,
    job: &str,
    target: &Target,
    keyset: &Keyset,
    predicate: &str,
    upper: &Key,
) -> Result<Vec<Cascade>, JobError> {
    let mut cascades = referencing(pool, job, target).await?;
    for c in &mut cascades {
        let children = count_sql(c, target, keyset, predicate, Linking::Children);
        c.child_rows = count(pool, c, &children, upper).await;
        if c.is_tree() {
            let interlinked = count_sql(c, target, keyset, predicate, Linking::Interlinked);
            c.interlinked = count(pool, c, &interlinked, upper).await;
        }
    }
    let below = Below {
        pool,
        job,
        target,
        keyset,
        predicate,
        upper,
    };
    let nested = below.find(&cascades).await?;
    cascades.extend(nested);
    Ok(cascades)
}

/// How deep below the target the plan follows `ON DELETE CASCADE` keys.
const MAX_DEPTH: usize = 16;

/// The foreign keys below the target: a delete of a target row deletes the rows that
/// reference it `ON DELETE CASCADE`, and the keys referencing *those* rows act in turn (cascade
/// further, set NULL, or forbid the delete, failing the batch). Each is counted like a key on the
/// target, through the chain of cascading keys that leads to it.
struct Below<'a> {
    pool: &'a Db,
    job: &'a str,
    target: &'a Target,
    keyset: &'a Keyset,
    predicate: &'a str,
    upper: &'a Key,
}

impl Below<'_> {
    /// Walks down from the target's cascading keys (`direct`), each table once, to
    /// `MAX_DEPTH` levels; returns the keys found below, counted. Keys on a table at that depth
    /// are listed uncounted (`beyond_depth`), and the plan warns about them.
    async fn find(&self, direct: &[Cascade]) -> Result<Vec<Cascade>, JobError> {
        let mut seen = vec![self.target.oid];
        let mut chains: Vec<Vec<Cascade>> = direct
            .iter()
            .filter(|c| c.on_delete == "CASCADE" && !c.self_referencing)
            .map(|c| vec![c.clone()])
            .collect();
        let mut found = Vec::new();
        while let Some(chain) = chains.pop() {
            let oid = chain.last().map_or(0, |c| c.child_oid);
            if seen.contains(&oid) {
                continue;
            }
            seen.push(oid);
            for mut key in referencing_oid(self.pool, self.job, self.target, oid).await? {
                key.via = chain.iter().map(|c| c.child.clone()).collect();
                if key.self_referencing {
                    key.child_rows =
                        count(self.pool, &key, &self.kept_sql(&chain, &key), self.upper).await;
                    if key.is_tree() {
                        let sql = self.interlinked_sql(&chain, &key);
                        key.interlinked = count(self.pool, &key, &sql, self.upper).await;
                    }
                    found.push(key);
                    continue;
                }
                if chain.len() >= MAX_DEPTH {
                    key.beyond_depth = true;
                    found.push(key);
                    continue;
                }
                key.child_rows =
                    count(self.pool, &key, &self.count_sql(&chain, &key), self.upper).await;
                if key.on_delete == "CASCADE" {
                    let mut longer = chain.clone();
                    longer.push(key.clone());
                    chains.push(longer);
                }
                found.push(key);
            }
        }
        Ok(found)
    }

    /// Rows of `key`'s table referencing a row of the chain's last table that the delete
    /// removes through the chain: those the chain extended by `key` removes (or fails on).
    fn count_sql(&self, chain: &[Cascade], key: &Cascade) -> String {
        let mut through = chain.to_vec();
        through.push(key.clone());
        format!(
            "SELECT count(*) FROM {} AS _bf_c WHERE {}",
            key.child,
            self.removed(&through, "_bf_c")
        )
    }

    /// Rows of the chain's last table that the delete keeps but that reference, through `key`
    /// (that table's key on itself), a row the chain removes there: a key that forbids the
    /// delete (or sets NULL where it may not) fails on them.
    fn kept_sql(&self, chain: &[Cascade], key: &Cascade) -> String {
        format!(
            "SELECT count(*) FROM {t} AS _bf_c WHERE NOT {kept}
               AND EXISTS (SELECT 1 FROM {t} AS _bf_p WHERE {join} AND {gone})",
            t = key.child,
            kept = self.removed(chain, "_bf_c"),
            join = joined(key, "_bf_p", "_bf_c"),
            gone = self.removed(chain, "_bf_p"),
        )
    }

    /// Rows the chain removes from its last table that reference, through `key` (that table's
    /// key on itself), another row it removes there: they pass only when one batch's cascade
    /// removes both.
    fn interlinked_sql(&self, chain: &[Cascade], key: &Cascade) -> String {
        format!(
            "SELECT count(*) FROM {t} AS _bf_c WHERE {gone_c}
               AND EXISTS (SELECT 1 FROM {t} AS _bf_p WHERE {join} AND {gone_p}
                             AND (_bf_p.tableoid, _bf_p.ctid) <> (_bf_c.tableoid, _bf_c.ctid))",
            t = key.child,
            gone_c = self.removed(chain, "_bf_c"),
            join = joined(key, "_bf_p", "_bf_c"),
            gone_p = self.removed(chain, "_bf_p"),
        )
    }

    /// The condition that the row `alias` of the chain's last table is removed by the delete:
    /// it references, through the chain's last key, a row removed one level up, down to the
    /// target's rows the delete selects (the target unaliased, so the predicate resolves as
    /// in the batches).
    fn removed(&self, chain: &[Cascade], alias: &str) -> String {
        let key = &chain[chain.len() - 1];
        if chain.len() == 1 {
            let table = &self.target.quoted;
            let (range, _) = self.keyset.range(Some(table), false);
            return format!(
                "EXISTS (SELECT 1 FROM {table} WHERE {} AND {range} AND ({}))",
                joined(key, table, alias),
                self.predicate
            );
        }
        let up = chain.len() - 2;
        let parent = format!("_bf_n{up}");
        format!(
            "EXISTS (SELECT 1 FROM {} AS {parent} WHERE {} AND {})",
            chain[up].child,
            joined(key, &parent, alias),
            self.removed(&chain[..chain.len() - 1], &parent)
        )
    }
}

/// `parent.p1 = child.c1 AND …` for the foreign key `key`.
fn joined(key: &Cascade, parent: &str, child: &str) -> String {
    let on: Vec<String> = key
        .child_columns
        .iter()
        .zip(&key.parent_columns)
        .map(|(c, p)| format!("{parent}.{} = {child}.{}", quote_ident(p), quote_ident(c)))
        .collect();
    on.join(" AND ")
}

async fn count(pool: &Db, c: &Cascade, sql: &str, upper: &Key) -> Option<i64> {
    let counted: sqlx::Result<i64> = bind_keys(crate::sql::query(sql), &[upper])
        .try_map(|row: sqlx::postgres::PgRow| sqlx::Row::try_get(&row, 0))
        .fetch_one(pool)
        .await;
    counted
        .inspect_err(|e| {
            tracing::warn!(constraint = %c.constraint, error = %e, "could not count referencing rows");
        })
        .ok()
}

fn cascade(
    (
        constraint,
        child,
        on_delete,
        on_update,
        self_referencing,
        nulls_refused,
        child_columns,
        parent_columns,
        oid,
    ): Row,
) -> Cascade {
    Cascade {
        constraint,
        child,
        child_oid: oid.0,
        on_delete,
        on_update,
        child_rows: None,
        beyond_depth: false,
        self_referencing,
        nulls_refused,
        interlinked: None,
        child_columns,
        parent_columns,
        via: Vec::new(),
    }
}

/// Which referencing rows a count selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linking {
    /// Rows referencing a row the delete selects; for a key the target holds on itself (a tree),
    /// only those the delete does not select: they stay, so the delete is sure to fail on them.
    Children,
    /// A tree's rows the delete selects that reference another row it selects: the delete
    /// fails if the batch deleting the referenced row runs before the one deleting the row
    /// referencing it (a later batch, or another slice), and passes when both share a batch.
    Interlinked,
}

/// Counts referencing rows of `c` as `linking` says. The predicate is the target's: inside a
/// subquery its bare column names resolve to the nearest table, the target (for the referenced
/// row, and for the referencing row itself in a tree). The target is not aliased there, so a
/// predicate naming it (`posts.id`, as a batch's `DELETE FROM posts` allows) resolves too; the
/// child, aliased `_bf_c`, cannot capture the name even when it is the same table.
fn count_sql(
    c: &Cascade,
    target: &Target,
    keyset: &Keyset,
    predicate: &str,
    linking: Linking,
) -> String {
    let table = &target.quoted;
    let (range, _) = keyset.range(Some(table), false);
    let selected = || {
        let same: Vec<String> = target
            .keys
            .iter()
            .map(|k| format!("{table}.{0} = _bf_c.{0}", quote_ident(&k.name)))
            .collect();
        format!(
            "EXISTS (SELECT 1 FROM {table} WHERE {} AND {range} AND ({predicate}))",
            same.join(" AND ")
        )
    };
    // `inner` narrows the referenced row (inside its subquery), `outer` the referencing one.
    let (inner, outer) = match (c.is_tree(), linking) {
        (false, _) => (String::new(), String::new()),
        (true, Linking::Children) => (String::new(), format!(" AND NOT {}", selected())),
        (true, Linking::Interlinked) => (
            format!(
                " AND {} IS DISTINCT FROM {}",
                keyset.row(Some("_bf_c")),
                keyset.row(Some(table))
            ),
            format!(" AND {}", selected()),
        ),
    };
    format!(
        "SELECT count(*) FROM {child} AS _bf_c
         WHERE EXISTS (SELECT 1 FROM {table}
                       WHERE {on} AND {range} AND ({predicate}){inner}){outer}",
        child = c.child,
        on = joined(c, table, "_bf_c"),
    )
}

/// The plan's verdict on a delete's foreign keys: refused while a key that forbids the delete
/// has referencing rows it would leave behind (no job setting helps: the batch reaching one
/// fails), or while keys cascade and the job does not allow it. Returns the cascading keys, for
/// the plan to list, and a warning per tree whose selected rows reference each other.
/// `reverting`: the job is the revert of an insert, whose rows are not chosen by a predicate.
pub fn judge(
    job: &str,
    target: &Target,
    found: Vec<Cascade>,
    allow_cascade: bool,
    reverting: bool,
) -> Result<(Vec<Cascade>, Vec<String>), JobError> {
    let blocking: Vec<String> = found
        .iter()
        .filter(|c| c.blocks())
        .map(Cascade::to_string)
        .collect();
    if !blocking.is_empty() {
        let (what, remedy) = match reverting {
            true => (
                "the revert's delete of the inserted rows",
                "Delete or re-point those rows first, then revert again",
            ),
            false => (
                "a delete",
                "Delete or re-point those rows first, or leave the referenced rows out of the \
                 predicate",
            ),
        };
        return Err(JobError::invalid(
            job,
            format!(
                "{what} on {} would fail at the first batch reaching a row other rows still \
                 reference: {}. {remedy}",
                target.display(),
                blocking.join("; ")
            ),
        ));
    }
    let warnings = found
        .iter()
        .filter_map(|c| c.interlinked.filter(|n| *n > 0).map(|n| (c, n)))
        .map(|(c, n)| match c.via.as_slice() {
            [] => format!(
                "{n} rows the delete selects reference other rows it selects through {} (ON \
                 DELETE {}): a batch deleting a referenced row before the rows referencing it \
                 fails; keyset batches walk the key in ascending order, so delete the \
                 referencing rows first (another job) or make the key ON DELETE CASCADE",
                c.constraint, c.on_delete
            ),
            via => format!(
                "{n} rows of {} that the delete removes through {} reference other such rows \
                 through {} (ON DELETE {}): a batch whose cascade removes a referenced row \
                 before the rows referencing it fails (they pass when one batch removes both)",
                c.child,
                via.join(", "),
                c.constraint,
                c.on_delete
            ),
        })
        .chain(found.iter().filter_map(Cascade::uncounted))
        .collect();
    let cascading: Vec<Cascade> = found
        .into_iter()
        .filter(Cascade::changes_children)
        .collect();
    if !cascading.is_empty() && !allow_cascade {
        return Err(refusal(job, target, &cascading));
    }
    Ok((cascading, warnings))
}

/// The plan's refusal of a delete that would cascade.
fn refusal(job: &str, target: &Target, cascades: &[Cascade]) -> JobError {
    let list: Vec<String> = cascades.iter().map(Cascade::to_string).collect();
    JobError::invalid(
        job,
        format!(
            "a delete on {} would change rows of other tables through foreign keys: {}; the archive \
             cannot restore them. Set allow_cascade = true on the job to run it anyway \
             (`backfilld enqueue --allow-cascade`; for a revert, `backfilld revert --allow-cascade`)",
            target.display(),
            list.join("; ")
        ),
    )
}
