//! Before-image archive tables, one per job, in backfilld's schema: `<job>_<yyyymmdd>_j<id>`.
//! An update archives the key plus the before- and after-values of the columns it sets; a delete
//! archives whole rows. Rows are written by the change statement itself (see `change`), so a
//! batch and its archive commit or roll back together. Expired archives (and the staging tables of
//! updates from a data file) are dropped by the daemon.

mod layout;

pub use layout::Watched;

use sqlx::{Executor, PgConnection};

use crate::db::Db;
use crate::job::State;
use crate::sql::{Names, quote_ident, quote_literal};
use crate::target::{Target, column_list};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveKind {
    /// Columns the update set, in set-clause order.
    Update {
        touched: Vec<String>,
    },
    Delete,
    /// The inserted rows' keys and each whole row as JSON text (`_bf_row`; archives written before
    /// hold `ROW(…)::text`): what a revert deletes.
    Insert,
}

#[derive(Debug, Clone)]
pub struct ArchiveTable {
    /// Bare table name inside backfilld's schema.
    pub name: String,
    /// `"backfill"."name"`.
    pub quoted: String,
    pub keys: Vec<String>,
    pub kind: ArchiveKind,
    /// The archive's own columns, as `open` found them (empty for one this run creates): the
    /// target may have gained, lost or renamed columns since.
    pub columns: Vec<ArchiveColumn>,
    /// For re-inserting deleted rows: one condition on `_bf_a` per foreign key of the target to
    /// another table, true while the row it references exists, and for a partitioned target one
    /// true while some partition takes the row (`parent_checks`).
    pub parents: Vec<String>,
}

/// A column of an existing archive: its name and `format_type()`, and for one that holds a
/// column of the target, which (`origin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveColumn {
    pub name: String,
    pub sql_type: String,
    /// The target column it was made for, as the table's oid and the column's number (recorded
    /// in the column's comment, `ORIGIN_PREFIX`): a number stays with its column through a
    /// rename, so the archive can follow one (`follow`). `None` in archives made before.
    pub origin: Option<(u32, i16)>,
}

/// The comment recording an archive column's origin: `backfilld: column 3 of table 16402`.
const ORIGIN_PREFIX: &str = "backfilld: column ";

fn origin_comment(table: u32, attnum: i16) -> String {
    format!("{ORIGIN_PREFIX}{attnum} of table {table}")
}

fn parse_origin(comment: &str) -> Option<(u32, i16)> {
    let (attnum, table) = comment
        .strip_prefix(ORIGIN_PREFIX)?
        .split_once(" of table ")?;
    Some((table.parse().ok()?, attnum.parse().ok()?))
}

/// Prefix of the columns holding an update's after-values.
const AFTER_PREFIX: &str = "_bf_after_";
/// The column of an insert archive holding each inserted row as text.
pub const ROW_COLUMN: &str = "_bf_row";
/// An archive is append-only while its job runs, and nothing reads it until a revert, which
/// indexes, analyzes and vacuums it first (`prepare_revert`). Autovacuum's insert-triggered runs
/// and autoanalyze on it would only add IO while the backfill runs (a 5M-row job's archive was
/// vacuumed and analyzed twice mid-run). Anti-wraparound vacuums still run: PostgreSQL ignores
/// this setting for them.
const NO_AUTOVACUUM: &str = "WITH (autovacuum_enabled = false, toast.autovacuum_enabled = false)";

impl ArchiveTable {
    pub fn new(names: &Names, name: String, target: &Target, kind: ArchiveKind) -> Self {
        Self {
            quoted: format!("{}.{}", quote_ident(&names.schema), quote_ident(&name)),
            name,
            keys: target.keys.iter().map(|k| k.name.clone()).collect(),
            kind,
            columns: Vec::new(),
            parents: Vec::new(),
        }
    }

    /// For a delete's archive: reads the target's foreign keys to other tables whose columns the
    /// archive holds, as conditions (`parents`) that a re-inserted row's parent still exists. A
    /// row whose parent was deleted since cannot come back (the insert would fail the whole
    /// batch with 23503); it is skipped and counted, as a row changed since is. (`MATCH SIMPLE`:
    /// a NULL in the key means no parent is needed. Keys on the table itself are left out: a
    /// parent restored by the same statement is not visible to the check.)
    pub async fn parent_checks(
        &mut self,
        conn: &mut PgConnection,
        target: &Target,
    ) -> sqlx::Result<()> {
        if !matches!(self.kind, ArchiveKind::Delete) {
            return Ok(());
        }
        let keys: Vec<(String, Vec<String>, Vec<String>)> = crate::sql::query_as(PARENT_KEYS)
            .bind(sqlx::postgres::types::Oid(target.oid))
            .fetch_all(&mut *conn)
            .await?;
        self.parents = keys
            .into_iter()
            .filter(|(_, child, _)| child.iter().all(|c| self.holds(c)))
            .map(|(parent, child, referenced)| {
                let nulls: Vec<String> = child
                    .iter()
                    .map(|c| format!("_bf_a.{} IS NULL", quote_ident(c)))
                    .collect();
                let on: Vec<String> = child
                    .iter()
                    .zip(&referenced)
                    .map(|(c, r)| format!("_bf_p.{} = _bf_a.{}", quote_ident(r), quote_ident(c)))
                    .collect();
                format!(
                    "({} OR EXISTS (SELECT 1 FROM {parent} AS _bf_p WHERE {}))",
                    nulls.join(" OR "),
                    on.join(" AND ")
                )
            })
            .collect();
        if target.partitioned {
            // A row whose partition was detached or dropped since has nowhere to go (the insert
            // failed the whole revert with 23514): it is skipped and counted. The leaves'
            // partition constraints (each with its ancestors') name the columns bare, which
            // resolve to the archive's row.
            let routable: Option<String> = crate::sql::query_scalar(
                "SELECT string_agg('(' || pg_get_partition_constraintdef(relid) || ')', ' OR ')
                 FROM pg_partition_tree($1) WHERE isleaf AND relid <> $1",
            )
            .bind(sqlx::postgres::types::Oid(target.oid))
            .fetch_one(conn)
            .await?;
            self.parents
                .push(format!("({})", routable.as_deref().unwrap_or("false")));
        }
        Ok(())
    }

    /// Whether `table` is a name `name_for` gives job `job_id`'s archive (its `_j<id>` tail):
    /// `archive_table` is the daemon's to write, and a copied or typed one must never make a job
    /// write into, revert from, or expire another job's table (or any other).
    pub fn owned_by(table: &str, job_id: i64) -> bool {
        let tail = format!("_j{job_id}");
        table.len() > tail.len() && table.ends_with(&tail)
    }

    /// `orders_status_v1_20261121_j42`: readable, unique (job id), at most 63 bytes.
    pub fn name_for(job: &str, job_id: i64, date: chrono::NaiveDate) -> String {
        let suffix = format!("_{}_j{job_id}", date.format("%Y%m%d"));
        crate::sql::table_name_for(job, &suffix)
    }

    /// The revert's index on an archive: `<archive>_key`, shortened in the middle when too long,
    /// so the archive's unique `_<date>_j<id>` tail stays (two long job names that share their
    /// start must not share an index name: the second revert would find "its" index on the other
    /// archive, skip the build, and read its own unindexed archive).
    pub fn index_name(archive: &str) -> String {
        const MAX: usize = 63 - "_key".len();
        const TAIL: usize = 30; // `_20261121_j` and a 19-digit job id
        if archive.len() <= MAX {
            return format!("{archive}_key");
        }
        let chars: Vec<char> = archive.chars().collect();
        let tail: String = chars[chars.len().saturating_sub(TAIL)..].iter().collect();
        let head = crate::sql::clip_bytes(archive, MAX - tail.len());
        format!("{head}{tail}_key")
    }

    /// `("a", "b") IN (SELECT _bf_a."a", _bf_a."b" FROM archive AS _bf_a)`: a predicate on the
    /// target's bare key columns selecting the rows whose keys the archive holds.
    pub fn keys_archived(&self) -> String {
        let keys = column_list(self.keys.iter().map(String::as_str));
        let archived: Vec<String> = self
            .keys
            .iter()
            .map(|k| format!("_bf_a.{}", quote_ident(k)))
            .collect();
        format!(
            "({keys}) IN (SELECT {} FROM {} AS _bf_a)",
            archived.join(", "),
            self.quoted
        )
    }

    /// Whether the archive has column `name` (every column when its layout was not read back).
    pub fn holds(&self, name: &str) -> bool {
        self.columns.is_empty() || self.columns.iter().any(|c| c.name == name)
    }

    /// The declared type of the archive's column `name`, where its layout was read back.
    pub fn type_of(&self, name: &str) -> Option<&str> {
        self.columns
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.sql_type.as_str())
    }

    /// For a delete's archive: the archived columns `target` no longer has (dropped or renamed
    /// since), whose values a revert cannot put back.
    pub fn lost_columns(&self, target: &Target) -> Vec<String> {
        if !matches!(self.kind, ArchiveKind::Delete) {
            return Vec::new();
        }
        self.columns
            .iter()
            .filter(|a| !target.columns.iter().any(|c| c.name == a.name))
            .map(|a| a.name.clone())
            .collect()
    }

    pub fn after_column(i: usize) -> String {
        format!("{AFTER_PREFIX}{i}")
    }

    /// Column list the change statement inserts, in the order its RETURNING produces.
    pub fn insert_columns(&self) -> String {
        match &self.kind {
            ArchiveKind::Update { touched } => {
                let after: Vec<String> = (0..touched.len()).map(Self::after_column).collect();
                column_list(
                    self.keys
                        .iter()
                        .chain(touched)
                        .chain(&after)
                        .map(String::as_str),
                )
            }
            ArchiveKind::Delete => "*".into(),
            ArchiveKind::Insert => {
                column_list(self.keys.iter().map(String::as_str).chain([ROW_COLUMN]))
            }
        }
    }

    /// Creates the archive table if missing (a retried attempt finds it already there), with
    /// autovacuum off: see [`NO_AUTOVACUUM`]; then reads its columns back (`columns`). An
    /// existing one may have been made for the table as it was: see `follow`.
    pub async fn create(
        &mut self,
        conn: &mut PgConnection,
        target: &Target,
        job: &str,
    ) -> sqlx::Result<()> {
        let create = match &self.kind {
            ArchiveKind::Update { touched } => {
                let after: Vec<String> = touched
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        format!(
                            "{} AS {}",
                            quote_ident(c),
                            quote_ident(&Self::after_column(i))
                        )
                    })
                    .collect();
                format!(
                    "CREATE TABLE IF NOT EXISTS {} {NO_AUTOVACUUM} AS SELECT {}, {}, {} FROM {} WITH NO DATA",
                    self.quoted,
                    column_list(self.keys.iter().map(String::as_str)),
                    column_list(touched.iter().map(String::as_str)),
                    after.join(", "),
                    target.quoted
                )
            }
            ArchiveKind::Delete => format!(
                "CREATE TABLE IF NOT EXISTS {} (LIKE {}) {NO_AUTOVACUUM}",
                self.quoted, target.quoted
            ),
            ArchiveKind::Insert => format!(
                "CREATE TABLE IF NOT EXISTS {} {NO_AUTOVACUUM} AS SELECT {}, NULL::text AS {} FROM {} WITH NO DATA",
                self.quoted,
                column_list(self.keys.iter().map(String::as_str)),
                quote_ident(ROW_COLUMN),
                target.quoted
            ),
        };
        let comment = format!(
            "COMMENT ON TABLE {} IS {}",
            self.quoted,
            quote_literal(&format!(
                "backfilld before-images of job {job} on {} ({})",
                target.display(),
                match self.kind {
                    ArchiveKind::Delete => "deleted rows",
                    ArchiveKind::Insert => "inserted keys",
                    ArchiveKind::Update { .. } => "updated columns",
                }
            ))
        );
        // Simple-protocol execution: two statements, no parameters (DDL takes none).
        conn.execute(format!("{create}; {comment}").as_str())
            .await?;
        self.columns = columns_of(conn, &self.quoted).await?;
        if self.columns.iter().all(|c| c.origin.is_none()) {
            // Made now (or by a version that did not record origins, whose columns are then
            // taken by name, as that version took them).
            let names: Vec<String> = self.columns.iter().map(|c| c.name.clone()).collect();
            self.record_origins(conn, target, &names).await?;
        }
        Ok(())
    }

    /// Records in each archive column `names` that holds a target column of the same name which
    /// one it is (`ArchiveColumn::origin`), then reads the columns back.
    async fn record_origins(
        &mut self,
        conn: &mut PgConnection,
        target: &Target,
        names: &[String],
    ) -> sqlx::Result<()> {
        let numbered = numbered_columns(conn, target.oid).await?;
        let comments: Vec<String> = numbered
            .iter()
            .filter(|(_, name)| names.contains(name))
            .map(|(attnum, name)| {
                format!(
                    "COMMENT ON COLUMN {}.{} IS {}",
                    self.quoted,
                    quote_ident(name),
                    quote_literal(&origin_comment(target.oid, *attnum))
                )
            })
            .collect();
        if comments.is_empty() {
            return Ok(());
        }
        conn.execute(comments.join("; ").as_str()).await?;
        self.columns = columns_of(conn, &self.quoted).await?;
        Ok(())
    }

    /// The table the archive's columns were made for (their recorded origin), when that is not
    /// `target` by oid: the table under the name was replaced (or restored from a dump) since,
    /// and the archive's columns are matched by name.
    pub fn made_for_another(&self, target: &Target) -> Option<u32> {
        let table = self.columns.iter().find_map(|c| c.origin)?.0;
        (table != target.oid).then_some(table)
    }

    /// Renames the archive's columns whose target column was renamed since (same table, same
    /// column number, another name), and the update's touched columns with them; names that
    /// traded places are renamed through temporary ones. Returns what changed, for the log.
    /// Without this, the images of a column renamed mid-run or before a revert were left behind
    /// as a dropped column's, and the revert put back NULL (or, for two names swapped, each
    /// column's values into the other).
    async fn follow_renames(
        &mut self,
        conn: &mut PgConnection,
        target: &Target,
    ) -> sqlx::Result<Vec<String>> {
        let numbered = numbered_columns(conn, target.oid).await?;
        let renamed_to = |c: &ArchiveColumn| {
            let (_, attnum) = c.origin.filter(|(t, _)| *t == target.oid)?;
            match numbered.iter().find(|(n, _)| *n == attnum) {
                Some((_, now)) => (*now != c.name).then(|| now.clone()),
                // Its column was dropped, and another took the name since: the images are the
                // dropped column's, which must not go back into the newcomer.
                None => numbered
                    .iter()
                    .any(|(_, name)| *name == c.name)
                    .then(|| format!("{} (dropped column {attnum})", c.name)),
            }
        };
        let mut renames: Vec<(String, String)> = self
            .columns
            .iter()
            .filter_map(|c| Some((c.name.clone(), renamed_to(c)?)))
            .collect();
        // A new name another column keeps (not renamed itself) cannot be taken; dropping one
        // rename may keep the column another wanted to take the name of.
        loop {
            let moving: Vec<String> = renames.iter().map(|(was, _)| was.clone()).collect();
            let kept = |name: &String| {
                self.columns.iter().any(|c| c.name == *name) && !moving.contains(name)
            };
            let before = renames.len();
            renames.retain(|(_, now)| !kept(now));
            if renames.len() == before {
                break;
            }
        }
        if renames.is_empty() {
            return Ok(Vec::new());
        }
        let rename = |from: &str, to: &str| {
            format!(
                "ALTER TABLE {} RENAME COLUMN {} TO {}",
                self.quoted,
                quote_ident(from),
                quote_ident(to)
            )
        };
        let parked = |i: usize| format!("_bf_renaming_{i}");
        let statements: Vec<String> = (renames.iter().enumerate())
            .map(|(i, (was, _))| rename(was, &parked(i)))
            .chain((renames.iter().enumerate()).map(|(i, (_, now))| rename(&parked(i), now)))
            .collect();
        // One query string: one implicit transaction, all or none.
        conn.execute(statements.join("; ").as_str()).await?;
        if let ArchiveKind::Update { touched } = &mut self.kind {
            for t in touched.iter_mut() {
                if let Some((_, now)) = renames.iter().find(|(was, _)| was == t) {
                    *t = now.clone();
                }
            }
        }
        self.columns = columns_of(conn, &self.quoted).await?;
        Ok(renames
            .into_iter()
            .map(|(was, now)| format!("{was} renamed {now}"))
            .collect())
    }

    /// For an insert's archive (it has [`ROW_COLUMN`]): the key columns it holds, the target's
    /// key when the insert ran, which its revert walks and deletes by even if the target has
    /// had another key since. `None` for another archive, or none at all.
    pub async fn insert_keys(
        conn: &mut PgConnection,
        names: &Names,
        name: &str,
    ) -> sqlx::Result<Option<Vec<String>>> {
        let quoted = format!("{}.{}", quote_ident(&names.schema), quote_ident(name));
        let found = columns_of(conn, &quoted).await?;
        if !found.iter().any(|c| c.name == ROW_COLUMN) {
            return Ok(None);
        }
        let keys = found.into_iter().map(|c| c.name);
        Ok(Some(keys.filter(|c| c != ROW_COLUMN).collect()))
    }

    /// Reads an existing archive's layout back (for revert): update archives are recognised by
    /// their after-value columns, and the touched columns are those between keys and after-values.
    pub async fn open(
        conn: &mut PgConnection,
        names: &Names,
        name: &str,
        target: &Target,
    ) -> sqlx::Result<Option<Self>> {
        let quoted = format!("{}.{}", quote_ident(&names.schema), quote_ident(name));
        let found = columns_of(conn, &quoted).await?;
        if found.is_empty() {
            return Ok(None);
        }
        let keys: Vec<String> = target.keys.iter().map(|k| k.name.clone()).collect();
        let kind = if found.iter().any(|c| c.name == ROW_COLUMN) {
            ArchiveKind::Insert
        } else if found.iter().any(|c| c.name.starts_with(AFTER_PREFIX)) {
            let touched = found
                .iter()
                .map(|c| &c.name)
                .filter(|c| !keys.contains(c) && !c.starts_with(AFTER_PREFIX))
                .cloned()
                .collect();
            ArchiveKind::Update { touched }
        } else {
            ArchiveKind::Delete
        };
        Ok(Some(Self {
            columns: found,
            ..Self::new(names, name.to_owned(), target, kind)
        }))
    }

    /// Readies the archive for a revert: an index on the keys (built now, not during the
    /// backfill, where it would slow every archived batch) so the revert can walk it by keyset,
    /// and fresh statistics, so the planner does not guess its row counts. Both under `timeout`
    /// instead of the batch `statement_timeout`. Then `vacuum_for_revert`.
    /// When `wake` fires (shutdown, pause, cancel) the index build is cancelled server-side (on a
    /// large archive it takes minutes), so a stop does not wait for it.
    pub async fn prepare_revert(
        &self,
        db: &Db,
        timeout: std::time::Duration,
        wake: &CancellationToken,
    ) -> sqlx::Result<()> {
        let timeout = format!("{}ms", timeout.as_millis());
        // An update or a delete archives a key once (the walk passes each key once). An
        // insert walks its source's keys: a key it inserted, the application deleted and a
        // later source row inserted again is archived twice, and its revert compares the
        // current row with each image.
        let unique = match self.kind {
            ArchiveKind::Insert => "",
            ArchiveKind::Update { .. } | ArchiveKind::Delete => "UNIQUE ",
        };
        let index = format!(
            "CREATE {unique}INDEX IF NOT EXISTS {} ON {} ({})",
            quote_ident(&Self::index_name(&self.name)),
            self.quoted,
            column_list(self.keys.iter().map(String::as_str))
        );
        let mut tx = db.begin().await?;
        let pid: i32 = crate::sql::query_scalar(
            "SELECT pg_backend_pid() FROM (SELECT set_config('statement_timeout', $1, true)) s",
        )
        .bind(&timeout)
        .fetch_one(&mut *tx)
        .await?;
        // Cancelled from the pool, whose role runs the build.
        let cancel = || db.cancel_backend(pid, false);
        crate::db::cancellable(tx.execute(index.as_str()), wake, cancel).await?;
        tx.execute(format!("ANALYZE {}", self.quoted).as_str())
            .await?;
        tx.commit().await?;
        self.vacuum_for_revert(db, &timeout).await;
        Ok(())
    }

    /// `VACUUM`s the archive where a session connection exists (see `db`) and its role may: the
    /// archive was only ever inserted into, so without a visibility map every key the plan counts
    /// and every window the revert reads fetches its heap tuple (measured 10.8 s of a 36 s revert
    /// of 5M rows). Only a speed-up: a role that may not (behind a pooler, `direct_url` may log in
    /// as another role than the one that created the archive) or a failure is logged, and the
    /// revert goes on.
    async fn vacuum_for_revert(&self, db: &Db, timeout: &str) {
        let mut conn = match db.session().await {
            Ok(Some(conn)) => conn,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(archive = %self.quoted, error = %e, "revert: no session connection to VACUUM the archive");
                return;
            }
        };
        match crate::bloat::may_vacuum(&mut conn, &self.quoted).await {
            Ok(Some((true, _))) => {}
            Ok(Some((false, role))) => {
                tracing::warn!(
                    archive = %self.quoted,
                    role,
                    "revert: this role may not VACUUM the archive (it needs to own it); the \
                     revert reads the archive's heap for every key, which is slower"
                );
                return;
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(archive = %self.quoted, error = %e, "revert: cannot check VACUUM privilege on the archive; not vacuuming it");
                return;
            }
        }
        // VACUUM runs outside a transaction: a session setting, reset afterwards (or the
        // connection is closed, so it cannot leak).
        let vacuum = format!("VACUUM {}", self.quoted);
        let mut done = crate::sql::query("SELECT set_config('statement_timeout', $1, false)")
            .bind(timeout)
            .execute(&mut *conn)
            .await
            .map(drop);
        if done.is_ok() {
            done = conn.execute(vacuum.as_str()).await.map(drop);
        }
        if conn.execute("RESET statement_timeout").await.is_err() || done.is_err() {
            conn.close_on_drop();
        }
        if let Err(e) = done {
            tracing::warn!(archive = %self.quoted, error = %e, "revert: VACUUM of the archive failed; the revert goes on, reading its heap");
        }
    }
}

/// Foreign keys of a table to other tables (not to itself nor, for a partition, to a table it is
/// part of): the referenced table (quoted), the referencing and the referenced columns in key
/// order. One row per key: a key to a partitioned table also has a
/// row per referenced partition (its parent constraint is on the same table), left out; a
/// partition's own copy of its parent's key is kept.
const PARENT_KEYS: &str = concat!(
    "
SELECT format('%I.%I', n.nspname, p.relname),
       ",
    crate::cascade::key_columns!(),
    "
FROM pg_constraint c
JOIN pg_class p ON p.oid = c.confrelid
JOIN pg_namespace n ON n.oid = p.relnamespace
WHERE c.contype = 'f' AND c.conrelid = $1 AND c.confrelid <> c.conrelid
  AND c.confrelid NOT IN (SELECT relid FROM pg_partition_ancestors(c.conrelid))
  AND NOT EXISTS (SELECT FROM pg_constraint pc
                  WHERE pc.oid = c.conparentid AND pc.conrelid = c.conrelid)
ORDER BY c.conname"
);

/// The columns of table `quoted` (`"schema"."name"`), in order; none when it does not exist.
async fn columns_of(conn: &mut PgConnection, quoted: &str) -> sqlx::Result<Vec<ArchiveColumn>> {
    let rows: Vec<(String, String, Option<String>)> = crate::sql::query_as(
        "SELECT attname::text, format_type(atttypid, atttypmod), col_description(attrelid, attnum)
         FROM pg_attribute
         WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .bind(quoted)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, sql_type, comment)| ArchiveColumn {
            name,
            sql_type,
            origin: comment.as_deref().and_then(parse_origin),
        })
        .collect())
}

/// The columns of table `oid` by number: what a recorded origin names now.
async fn numbered_columns(conn: &mut PgConnection, oid: u32) -> sqlx::Result<Vec<(i16, String)>> {
    crate::sql::query_as(
        "SELECT attnum, attname::text FROM pg_attribute
         WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
    )
    .bind(sqlx::postgres::types::Oid(oid))
    .fetch_all(conn)
    .await
}

const EXPIRED: &str = "
SELECT j.id, j.name, j.archive_table, j.staged_table FROM {jobs} j
WHERE (j.archive_table IS NOT NULL OR j.staged_table IS NOT NULL)
  AND j.state IN {finished}
  AND j.finished_at < now() - make_interval(days => $1)
  AND NOT EXISTS (SELECT 1 FROM {jobs} r
                  WHERE r.reverts = j.name AND r.state NOT IN {finished})
FOR UPDATE SKIP LOCKED";

/// Drops the tables backfilld keeps for jobs finished more than `days` ago, logging each: the
/// before-image archive and, for an update from a data file, its staging table (a revert needs
/// only the archive, but a job's own verification reads the staging table, so both go at once).
/// Returns how many jobs' tables were dropped.
pub async fn drop_expired(pool: &crate::db::Db, names: &Names, days: i64) -> sqlx::Result<usize> {
    if days <= 0 {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    let expired: Vec<(i64, String, Option<String>, Option<String>)> = crate::sql::query_as(
        &names
            .render(EXPIRED)
            .replace("{finished}", &State::finished_sql()),
    )
    .bind(i32::try_from(days).unwrap_or(i32::MAX))
    .fetch_all(&mut *tx)
    .await?;
    for (id, job, archive, staged) in &expired {
        for (kind, table) in [("archive", archive), ("staging table", staged)] {
            let Some(table) = table else { continue };
            let owned = match kind {
                "archive" => ArchiveTable::owned_by(table, *id),
                _ => *table == crate::staging::staging_name(job),
            };
            if !owned {
                tracing::warn!(job = %job, table = %table, "not dropping the {kind}: backfilld did not name it for this job");
                continue;
            }
            let drop = format!(
                "DROP TABLE IF EXISTS {}.{}",
                quote_ident(&names.schema),
                quote_ident(table)
            );
            sqlx::raw_sql(&drop).execute(&mut *tx).await?;
            tracing::info!(job = %job, table = %table, retention_days = days, "dropped expired {kind}");
        }
        crate::sql::query(
            &names.render(
                "UPDATE {jobs} SET archive_table = NULL, staged_table = NULL WHERE id = $1",
            ),
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(expired.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_are_readable_and_bounded() {
        let d = chrono::NaiveDate::from_ymd_opt(2026, 11, 21).unwrap();
        assert_eq!(
            ArchiveTable::name_for("Orders-Status v1", 42, d),
            "orders_status_v1_20261121_j42"
        );
        let long = ArchiveTable::name_for(&"x".repeat(200), 7, d);
        assert_eq!(long.len(), 63);
        assert!(long.ends_with("_20261121_j7"));
    }

    #[test]
    fn index_names_keep_the_archive_names_unique_tail() {
        let d = chrono::NaiveDate::from_ymd_opt(2026, 11, 21).unwrap();
        let job = "backfill_orders_status_from_the_legacy_system_part_";
        let one = ArchiveTable::name_for(&format!("{job}1"), 8, d);
        let two = ArchiveTable::name_for(&format!("{job}2"), 9, d);
        let (i1, i2) = (
            ArchiveTable::index_name(&one),
            ArchiveTable::index_name(&two),
        );
        assert_ne!(i1, i2);
        assert!(i1.len() <= 63 && i2.len() <= 63, "{i1} {i2}");
        assert!(i1.ends_with("_20261121_j8_key"), "{i1}");
        assert_eq!(
            ArchiveTable::index_name("short_20261121_j1"),
            "short_20261121_j1_key"
        );
        let huge = ArchiveTable::index_name(&format!("{}_20261121_j{}", "x".repeat(40), i64::MAX));
        assert!(
            huge.len() <= 63 && huge.ends_with(&format!("_j{}_key", i64::MAX)),
            "{huge}"
        );
    }
}
