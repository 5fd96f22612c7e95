//! One batch: a single short transaction that picks the next window of keys, applies the change
//! to it, and commits the checkpoint with it.
//!
//! **Invariant:** the checkpoint (cursor and counters) commits in the batch's own transaction, so a
//! crash anywhere re-runs at most the uncommitted batch: each row's change happens exactly once.
//! **Invariant:** the checkpoint is fenced by attempt and lease owner; when it matches no row the
//! whole batch rolls back.
//! **Invariant:** every batch transaction sets `lock_timeout` and `statement_timeout` locally, both
//! at most the job's `max_batch_ms`: no statement of a batch, and so no row lock it takes, lasts
//! longer than that ceiling (plus the checkpoint and commit that follow the write).

use std::time::{Duration, Instant};

use sqlx::{PgConnection, Postgres, Row, Transaction};

use crate::db::Db;

use crate::archive::Watched;
use crate::change::Change;
use crate::claim::{self, Control, Lease};
use crate::error::JobError;
use crate::keyset::{Key, Keyset, bind_keys};
use crate::pin::{Found, Pinned};
use crate::sql::Names;
use crate::throttle::Impact;

/// Per-transaction settings, applied with `SET LOCAL` in the batch's `BEGIN` (`begin_statement`).
#[derive(Debug, Clone)]
pub struct TxSettings {
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    pub synchronous_commit: String,
    /// `idle_in_transaction_session_timeout`: the lease's TTL (see `Db::connect`).
    pub idle_timeout: Duration,
}

impl TxSettings {
    /// The configured timeouts capped by the job's ceiling on a batch. A lock wait may take half
    /// of it: a batch that waited that long is better retried, and a lock wait then reports as
    /// one (55P03) rather than as the statement timeout racing it. A transaction left idle for
    /// `lease_ttl` (a replica frozen between two statements of a batch) is ended by the server.
    pub fn capped(
        lock_timeout: Duration,
        statement_timeout: Duration,
        max_batch: Duration,
        synchronous_commit: String,
        lease_ttl: Duration,
    ) -> Self {
        Self {
            lock_timeout: lock_timeout.min(max_batch / 2),
            statement_timeout: statement_timeout.min(max_batch),
            synchronous_commit,
            idle_timeout: lease_ttl,
        }
    }

    /// The statement that opens a batch transaction with its settings, sent as one simple query
    /// (one round trip: under CPU contention every round trip is a scheduling delay, and those
    /// after the write are spent holding row locks). `force_custom_plan` makes every batch plan
    /// with its actual bounds, so the range scan's row estimate is right. JIT is off: a batch
    /// statement runs once per plan, and compiling it (tens of milliseconds for a large
    /// archiving batch, whose nested loop the planner costs high) would only add to the time row
    /// locks are held. With `nested_loop`, hash and merge joins are off for the transaction (see
    /// `Change::wants_nested_loop`).
    /// The values are our own validated configuration, never job input.
    pub fn begin_statement(&self, nested_loop: bool) -> String {
        let joins = if nested_loop { "off" } else { "on" };
        format!(
            "BEGIN; \
             SET LOCAL standard_conforming_strings = on; \
             SET LOCAL lock_timeout = '{}ms'; \
             SET LOCAL statement_timeout = '{}ms'; \
             SET LOCAL synchronous_commit = '{}'; \
             SET LOCAL idle_in_transaction_session_timeout = '{}ms'; \
             SET LOCAL plan_cache_mode = 'force_custom_plan'; \
             SET LOCAL jit = off; \
             SET LOCAL enable_hashjoin = '{joins}'; \
             SET LOCAL enable_mergejoin = '{joins}'",
            self.lock_timeout.as_millis(),
            self.statement_timeout.as_millis(),
            self.synchronous_commit,
            self.idle_timeout.as_millis(),
        )
    }
}

/// Everything a batch needs that stays the same for the whole run.
pub struct Batcher<'a> {
    pub pool: &'a Db,
    pub names: &'a Names,
    pub lease: &'a Lease,
    pub table: &'a str,
    /// Walks the table whose keys the job visits (the target, or the archive for a revert).
    pub keyset: &'a Keyset,
    pub change: &'a Change,
    /// What the job planned under, which each checkpoint compares (`pin`), and where to look.
    pub pinned: &'a Pinned,
    pub upper: &'a Key,
    pub settings: TxSettings,
    pub lease_ttl: Duration,
    pub max_affected: Option<i64>,
    pub window: WindowSql,
    /// The slice this batcher walks (`slices[slot]`), or `None` for the job's single `cursor`.
    pub slot: Option<usize>,
    /// The batch whose `COMMIT` was sent but not acknowledged (the connection failed): it may
    /// have committed. The batch loop settles it against the stored cursor (`take_in_doubt`).
    pub in_doubt: std::sync::Mutex<Option<Committed>>,
}

/// The window query for the first batch and for every later one, rendered once per run.
pub struct WindowSql {
    first: String,
    next: String,
}

impl WindowSql {
    pub fn new(keyset: &Keyset) -> Self {
        Self {
            first: keyset.window_sql(false),
            next: keyset.window_sql(true),
        }
    }
}

enum Attempted {
    Committed(Committed),
    /// The optimistic statement saw live traffic change a row of the window; rolled back.
    Raced,
}

/// A committed batch.
#[derive(Debug, Clone)]
pub struct Committed {
    pub scanned: i64,
    pub changed: i64,
    pub skipped: i64,
    pub last: Key,
    /// From `BEGIN` to `COMMIT`.
    pub elapsed: Duration,
    /// The change statement alone: what the rows cost, without the batch's fixed round trips.
    pub writing: Duration,
    pub control: Control,
    /// Sessions waiting on this batch's row locks just before it committed.
    pub impact: Impact,
}

const CHECKPOINT: &str = concat!(
    "
UPDATE {jobs}
SET cursor = CASE WHEN $10::int IS NULL THEN $4 ELSE cursor END,
    slices = CASE WHEN $10::int IS NULL THEN slices
                  ELSE jsonb_set(slices, ARRAY[$10::text, 'cursor'], $4) END,
    rows_scanned = rows_scanned + $5,
    rows_changed = rows_changed + $6,
    rows_skipped = rows_skipped + $7,
    batches = batches + 1,
    batch_size_current = $8,
    heartbeat_at = now(),
    lease_expires_at = now() + make_interval(secs => $9)
WHERE {fence}
  -- Compare-and-set: the checkpoint is where this replica's previous batch left it ($12 false
  -- only for the plan's trial). A batch this replica saw commit can still be lost, with its
  -- checkpoint, to a crash or failover before the asynchronous commit reached disk; going on
  -- from the cursor in memory would skip its rows for good.
  AND (NOT $12 OR (CASE WHEN $10::int IS NULL THEN cursor
                        ELSE NULLIF(slices -> $10::int -> 'cursor', 'null') END)
                  IS NOT DISTINCT FROM $11::jsonb)
RETURNING requested_state, rows_changed, (
    -- Sessions this transaction blocks right now, and how long the longest has waited. Functions,
    -- not the pg_locks and pg_stat_activity views: a batch plans this statement every time, and
    -- planning the views' joins cost more than running them (0.57 against 0.23 ms under pgbench
    -- load). None of it needs privileges; pg_blocking_pids and pg_stat_get_activity run only
    -- for waiting locks. Our own sessions (a sibling slice waiting to checkpoint into this job
    -- row, another replica: `backfilld/<pod>` names match up to their '/') are not traffic we
    -- slow down.
    SELECT ARRAY[count(*)::float8,
                 coalesce(extract(epoch FROM clock_timestamp() - min(l.waitstart)), 0)::float8]
    FROM pg_lock_status() l
    WHERE NOT l.granted AND pg_backend_pid() = ANY(pg_blocking_pids(l.pid))
      AND NOT EXISTS (SELECT FROM pg_stat_get_activity(l.pid) a
                      WHERE pg_get_userbyid(a.usesysid) = current_user
                        AND split_part(a.application_name, '/', 1)
                            = split_part(current_setting('application_name'), '/', 1))),
  -- For an archiving job ($13 its table): the table's columns as this batch wrote it (a DDL
  -- statement waits for the batch's lock, so none can slip in between), against those the
  -- archive statement was written for. NULL otherwise.
  (SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute
   WHERE attrelid = $13::int8::oid AND attnum > 0 AND NOT attisdropped),
  (SELECT array_agg(format_type(atttypid, atttypmod) ORDER BY attnum) FROM pg_attribute
   WHERE attrelid = $13::int8::oid AND attnum > 0 AND NOT attisdropped),
  -- The job's tables ($14, by name), the walked table's keys ($15, of table $16) and the
  -- written table ($17) as this batch wrote them, against what the job pinned (`pin`): a table
  -- swapped under a name, a key retyped, policies or an inheritance child since. DDL waits for
  -- the batch's lock, so what this reads is what the change wrote under.
  ",
    crate::pin::found_sql!("$14", "$15", "$16", "$17")
);

/// A table's column names and declared types, in order.
const COLUMNS: &str = "
SELECT array_agg(attname::text ORDER BY attnum), array_agg(format_type(atttypid, atttypmod) ORDER BY attnum)
FROM pg_attribute WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped";

/// A table's column names and declared types (NULL for no table).
type Columns = (Option<Vec<String>>, Option<Vec<String>>);

/// What the checkpoint returns: the operator's request, the job's rows changed, the sessions
/// blocked (count and longest wait), and for an archiving job its table's column names and types.
type CheckpointRow = (
    Option<String>,
    i64,
    Vec<f64>,
    Option<Vec<String>>,
    Option<Vec<String>>,
    Vec<i64>,
    Vec<String>,
    bool,
    bool,
);

impl Batcher<'_> {
    /// Whether the batch's statements stay prepared on the connection (`Db::keeps_statements`).
    fn keep(&self) -> bool {
        self.pool.keeps_statements()
    }

    fn sql_err(&self, step: &'static str) -> impl Fn(sqlx::Error) -> JobError + '_ {
        move |e| JobError::sql(&self.lease.job, self.table, step, e)
    }

    /// Runs one batch of at most `size` keys after `cursor`. `Ok(None)` when the key range is
    /// exhausted (nothing was written).
    #[tracing::instrument(name = "batch", skip_all, fields(size = size))]
    pub async fn run(
        &self,
        cursor: Option<&Key>,
        size: i64,
    ) -> Result<Option<Committed>, JobError> {
        match self.attempt(cursor, size, false).await? {
            Some(Attempted::Raced) => {
                tracing::debug!(
                    "concurrent change inside the window; redoing the batch with row locks"
                );
                match self.attempt(cursor, size, true).await? {
                    Some(Attempted::Committed(c)) => Ok(Some(c)),
                    _ => Ok(None),
                }
            }
            Some(Attempted::Committed(c)) => Ok(Some(c)),
            None => Ok(None),
        }
    }

    async fn attempt(
        &self,
        cursor: Option<&Key>,
        size: i64,
        locked: bool,
    ) -> Result<Option<Attempted>, JobError> {
        let started = Instant::now();
        let mut tx = self.begin(locked).await?;
        let window = match self.window(&mut tx, cursor, size).await {
            Ok(window) => window,
            Err(e) => return Err(self.failed(tx, e).await),
        };
        let Some((scanned, hi)) = window else {
            tx.rollback().await.map_err(self.sql_err("rollback"))?;
            return Ok(None);
        };
        let writing = Instant::now();
        let applied = match self.apply_change(&mut tx, cursor, &hi, locked).await {
            Ok(applied) => applied,
            Err(e) => return Err(self.failed(tx, e).await),
        };
        let Some(changed) = applied else {
            tx.rollback().await.map_err(self.sql_err("rollback"))?;
            return Ok(Some(Attempted::Raced));
        };
        let writing = writing.elapsed();
        let skipped = if self.change.counts_skipped() {
            scanned - changed
        } else {
            0
        };
        let counts = (scanned, changed, skipped);
        let (control, impact) = self
            .checkpoint(&mut tx, (Some(cursor), &hi), counts, size)
            .await?;
        let mut done = Committed {
            scanned,
            changed,
            skipped,
            last: hi,
            elapsed: started.elapsed(),
            writing,
            control,
            impact,
        };
        *self.doubt() = Some(done.clone());
        tx.commit().await.map_err(self.sql_err("commit"))?;
        *self.doubt() = None;
        done.elapsed = started.elapsed();
        Ok(Some(Attempted::Committed(done)))
    }

    fn doubt(&self) -> std::sync::MutexGuard<'_, Option<Committed>> {
        // A poisoned lock only means a panic mid-assignment of a plain value.
        self.in_doubt.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The batch whose commit went unacknowledged, if the last one did; cleared.
    pub fn take_in_doubt(&self) -> Option<Committed> {
        self.doubt().take()
    }

    /// A batch statement failed in `tx`: a statement kept prepared that DDL made stale is
    /// forgotten on this connection (every retry would fail the same way on it), and the error
    /// is explained (`dropped_column`, `explained`).
    async fn failed(&self, mut tx: Transaction<'static, Postgres>, e: JobError) -> JobError {
        if e.is_stale_plan() {
            use sqlx::Connection;
            if let Err(clear) = tx.clear_cached_statements().await {
                tracing::debug!(error = %clear, "forgetting the connection's statements failed");
            }
        }
        drop(tx);
        self.explained(self.dropped_column(e).await).await
    }

    /// A statement that failed the way DDL on the table makes it fail (a column gone, a cached
    /// plan whose result type changed, an operator or a cast that no longer fits the key): when
    /// a pinned thing did change (`pin`), that is the error, naming it; otherwise `e`.
    async fn explained(&self, e: JobError) -> JobError {
        let ddl = [
            "42703", "0A000", "42883", "42804", "22P02", "22007", "22008",
        ];
        if !e.sqlstate().is_some_and(|code| ddl.contains(&code)) {
            return e;
        }
        let Ok(mut conn) = self.pool.acquire().await else {
            return e;
        };
        let found = self.pinned.found(&mut *conn).await;
        let drift = match found {
            Ok(found) => self.pinned.check(&mut conn, &found).await,
            Err(err) => Err(err),
        };
        match drift {
            Ok(Some(drift)) => drift.error(&self.lease.job, self.table),
            _ => e,
        }
    }

    /// An archiving statement that names a column dropped since it was written fails with 42703:
    /// when the table's columns did change, that is `TableChanged` (the next attempt writes the
    /// statement for the table as it is), not a broken job.
    async fn dropped_column(&self, e: JobError) -> JobError {
        let Some(w) = self
            .change
            .watched()
            .filter(|_| e.sqlstate() == Some("42703"))
        else {
            return e;
        };
        let now: sqlx::Result<Columns> = crate::sql::query_as(COLUMNS)
            .bind(i64::from(w.oid))
            .fetch_one(self.pool)
            .await;
        match now {
            Ok((names, types)) => self.table_changed(w, names, types).unwrap_or(e),
            Err(_) => e,
        }
    }

    /// `TableChanged` when the table's columns (`names`, `types`) differ from those watched.
    fn table_changed(
        &self,
        w: &Watched,
        names: Option<Vec<String>>,
        types: Option<Vec<String>>,
    ) -> Option<JobError> {
        let changes = w.changes(&names.unwrap_or_default(), &types.unwrap_or_default());
        (!changes.is_empty()).then(|| JobError::TableChanged {
            job: self.lease.job.clone(),
            table: self.table.to_owned(),
            changes: changes.join(", "),
        })
    }

    /// Opens a batch transaction with the batch settings (`locked`: for the locking statement).
    pub async fn begin(&self, locked: bool) -> Result<Transaction<'static, Postgres>, JobError> {
        let begin = self
            .settings
            .begin_statement(self.change.wants_nested_loop() && !locked);
        self.pool
            .begin_with(begin)
            .await
            .map_err(self.sql_err("begin"))
    }

    /// The plan's trial of one batch in `tx` (from `begin`), which the caller rolls back: reads
    /// the window of at most `size` keys after `cursor`, applies the change to it and writes the
    /// checkpoint, as a batch does (all of it undone with the rollback; the ceiling is the plan's
    /// to check). Returns the window's keys, the rows changed (0 when the optimistic statement
    /// saw a race) and the window's last key; `None` when no key follows `cursor`.
    pub async fn trial(
        &self,
        tx: &mut PgConnection,
        cursor: Option<&Key>,
        size: i64,
    ) -> Result<Option<(i64, i64, Key)>, JobError> {
        let Some((scanned, hi)) = self.window(tx, cursor, size).await? else {
            return Ok(None);
        };
        let changed = self
            .apply_change(tx, cursor, &hi, false)
            .await?
            .unwrap_or(0);
        match self
            .checkpoint(tx, (None, &hi), (scanned, changed, 0), size)
            .await
        {
            Ok(_) | Err(JobError::Ceiling { .. }) => Ok(Some((scanned, changed, hi))),
            Err(e) => Err(e),
        }
    }

    /// The number of keys in the next window and its last key.
    async fn window(
        &self,
        conn: &mut PgConnection,
        cursor: Option<&Key>,
        size: i64,
    ) -> Result<Option<(i64, Key)>, JobError> {
        let sql = if cursor.is_some() {
            &self.window.next
        } else {
            &self.window.first
        };
        self.keyset
            .read_window_kept(conn, (sql, self.keep()), (cursor, self.upper), size)
            .await
            .map_err(self.sql_err("reading the next window"))
    }

    /// Applies the change to the window; `None` when an optimistic statement saw a race (the
    /// caller rolls back and redoes the batch with the locking statement).
    async fn apply_change(
        &self,
        conn: &mut PgConnection,
        cursor: Option<&Key>,
        hi: &Key,
        locked: bool,
    ) -> Result<Option<i64>, JobError> {
        let bounds: Vec<&Key> = cursor.into_iter().chain([hi]).collect();
        let has_cursor = cursor.is_some();
        let failed = |e| {
            let window = match cursor {
                Some(c) => format!("keys after {c} up to {hi}"),
                None => format!("keys up to {hi}"),
            };
            self.sql_err("applying the change")(e).at(window)
        };
        let (sql, optimistic) = match self.change.locked_statement(has_cursor) {
            Some(fallback) if locked => (fallback, false),
            Some(_) => (self.change.statement(has_cursor), true),
            None => (self.change.statement(has_cursor), false),
        };
        let query = bind_keys(crate::sql::query(sql).persistent(self.keep()), &bounds);
        if !optimistic {
            let done = query.execute(conn).await.map_err(failed)?;
            return Ok(Some(done.rows_affected() as i64));
        }
        let (captured, changed): (i64, i64) = query
            .try_map(|row: sqlx::postgres::PgRow| Ok((row.try_get(0)?, row.try_get(1)?)))
            .fetch_one(conn)
            .await
            .map_err(failed)?;
        Ok((captured == changed).then_some(changed))
    }

    /// Moves the checkpoint from `from` to `hi` and adds the counts (scanned, changed, skipped),
    /// fenced by the lease; enforces the ceiling. `from` is `Some(cursor)` for a batch, the
    /// cursor it expects to find stored (`CheckpointMoved` otherwise), and `None` for the plan's
    /// trial, which is rolled back whatever it finds.
    async fn checkpoint(
        &self,
        conn: &mut PgConnection,
        (from, hi): (Option<Option<&Key>>, &Key),
        (scanned, changed, skipped): (i64, i64, i64),
        size: i64,
    ) -> Result<(Control, Impact), JobError> {
        let watched = self.change.watched();
        let row: Option<CheckpointRow> =
            crate::sql::query_as(&claim::fenced(self.names, CHECKPOINT))
                .persistent(self.keep())
                .bind(self.lease.job_id)
                .bind(self.lease.attempt)
                .bind(&self.lease.owner)
                .bind(hi.to_json())
                .bind(scanned)
                .bind(changed)
                .bind(skipped)
                .bind(i32::try_from(size).unwrap_or(i32::MAX))
                .bind(self.lease_ttl.as_secs_f64())
                .bind(self.slot.map(|s| s as i32))
                .bind(from.flatten().map(Key::to_json))
                .bind(from.is_some())
                .bind(watched.map(|w| i64::from(w.oid)))
                .bind(self.pinned.names())
                .bind(&self.pinned.sites.key_names)
                .bind(self.pinned.sites.keyed.map(i64::from))
                .bind(i64::from(self.pinned.sites.written))
                .fetch_optional(&mut *conn)
                .await
                .map_err(self.sql_err("writing the checkpoint"))?;
        let Some((
            requested,
            total_changed,
            waiters,
            names,
            types,
            oids,
            fingerprint,
            rls,
            inherited,
        )) = row
        else {
            return Err(self.checkpoint_refused(conn, from.flatten()).await);
        };
        let found = Found {
            oids,
            fingerprint,
            row_security: rls,
            inherited,
        };
        let drift = self.pinned.check(&mut *conn, &found).await;
        if let Some(drift) = drift.map_err(self.sql_err("reading the table's key"))? {
            return Err(drift.error(&self.lease.job, self.table));
        }
        if let Some(changed) = watched.and_then(|w| self.table_changed(w, names, types)) {
            return Err(changed);
        }
        if let Some(max) = self.max_affected.filter(|m| total_changed > *m) {
            return Err(JobError::Ceiling {
                job: self.lease.job.clone(),
                table: self.table.to_owned(),
                would_change: total_changed,
                max_affected: max,
                committed: total_changed - changed,
            });
        }
        let impact = match waiters[..] {
            [blocked, longest] => Impact {
                blocked: blocked as i64,
                longest_wait: Duration::from_secs_f64(longest.max(0.0)),
            },
            _ => Impact::default(),
        };
        Ok((Control::from_requested(requested.as_deref()), impact))
    }

    /// Why the checkpoint matched no row: the lease is lost, or (the fence still matching) the
    /// stored cursor is not `expected`.
    async fn checkpoint_refused(
        &self,
        conn: &mut PgConnection,
        expected: Option<&Key>,
    ) -> JobError {
        let stored = claim::stored_cursor(&mut *conn, self.names, self.lease, self.slot).await;
        match stored {
            Ok(Some(stored)) => JobError::CheckpointMoved {
                job: self.lease.job.clone(),
                table: self.table.to_owned(),
                stored: stored.map_or("the start".into(), |v| v.to_string()),
                expected: expected.map_or("the start".into(), |k| k.to_json().to_string()),
            },
            Ok(None) => JobError::LeaseLost {
                job: self.lease.job.clone(),
                attempt: self.lease.attempt,
            },
            Err(e) => self.sql_err("re-reading the checkpoint")(e),
        }
    }
}
