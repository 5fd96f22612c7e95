//! Claiming jobs under a lease, renewing it, giving it back, and rescuing expired ones.
//!
//! **Invariant:** every write to a claimed job row is fenced by `id`, `attempt` and `lease_owner`;
//! a write that matches no row means the lease was lost and the writer must stop. The fence is
//! written once (`FENCE`); every statement on a claimed row (here and the batch checkpoint in
//! `batch`) is rendered through `fenced`.
//! **Invariant:** lease times come from the database clock (`now()`), never the daemon's.

use std::time::Duration;

use sqlx::PgExecutor;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use serde_json::Value;

use crate::job::{JobRow, State};
use crate::sql::Names;

/// The `WHERE` condition of every statement on a claimed job row: `$1` id, `$2` attempt, `$3`
/// lease owner. A claimed row is `running`; one that no longer matches was taken from us.
const FENCE: &str = "id = $1 AND attempt = $2 AND lease_owner = $3 AND state = 'running'";

/// Renders a template's `{jobs}`/`{schema}`, its `{fence}` and the `{finished}` states.
pub fn fenced(names: &Names, template: &str) -> String {
    names
        .render(template)
        .replace("{fence}", FENCE)
        .replace("{finished}", &State::finished_sql())
}

/// The fencing token of one claimed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: i64,
    pub job: String,
    pub attempt: i32,
    pub owner: String,
    /// `worker.lease_ttl` when the attempt started: the heartbeat renews the lease by it and
    /// batches are capped below it, for the whole attempt (a reload applies from the next one).
    pub ttl: Duration,
}

/// What an operator asked for, as last seen by the heartbeat or a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Control {
    #[default]
    Run,
    Pause,
    Cancel,
    LeaseLost,
}

impl Control {
    pub fn from_requested(requested: Option<&str>) -> Self {
        match requested {
            None | Some("running") => Control::Run,
            Some("paused") => Control::Pause,
            Some("cancelled") => Control::Cancel,
            // A misspelt request ('canceled', 'pause') asked the job to stop: it pauses, the
            // safe stop, until someone writes what they meant.
            Some(other) => {
                tracing::warn!(
                    requested_state = other,
                    "requested_state is not paused, running or cancelled: the job pauses until \
                     it is corrected"
                );
                Control::Pause
            }
        }
    }
}

const CLAIM: &str = "
WITH next AS (
    SELECT id FROM {jobs}
    WHERE run_at <= now() AND {claimable}
    ORDER BY priority DESC, run_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE {jobs} j
SET state = 'running',
    attempt = j.attempt + 1,
    lease_owner = $2,
    lease_expires_at = now() + make_interval(secs => $3),
    heartbeat_at = now(),
    started_at = coalesce(j.started_at, now())
FROM next
WHERE j.id = next.id
RETURNING {job_row_j}";

/// Claims up to `limit` runnable jobs in one short transaction (the statement itself).
pub async fn claim<'e>(
    db: impl PgExecutor<'e>,
    names: &Names,
    owner: &str,
    ttl: Duration,
    limit: i64,
) -> sqlx::Result<Vec<JobRow>> {
    let sql = CLAIM
        .replace("{claimable}", CLAIMABLE)
        .replace("{job_row_j}", &JobRow::columns(Some("j")));
    crate::sql::query_as(&names.render(&sql))
        .bind(limit)
        .bind(owner)
        .bind(ttl.as_secs_f64())
        .fetch_all(db)
        .await
}

const RENEW: &str = "
UPDATE {jobs}
SET lease_expires_at = now() + make_interval(secs => $4), heartbeat_at = now()
WHERE {fence}
RETURNING requested_state";

/// Extends the lease; `Control::LeaseLost` when the fence no longer matches.
pub async fn renew<'e>(
    db: impl PgExecutor<'e>,
    names: &Names,
    lease: &Lease,
    ttl: Duration,
) -> sqlx::Result<Control> {
    let row: Option<(Option<String>,)> = crate::sql::query_as(&fenced(names, RENEW))
        .bind(lease.job_id)
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(ttl.as_secs_f64())
        .fetch_optional(db)
        .await?;
    Ok(match row {
        Some((requested,)) => Control::from_requested(requested.as_deref()),
        None => Control::LeaseLost,
    })
}

/// Renews the lease every `interval` until `stop`, publishing what the operator asked for.
/// A failed renewal is retried at the next tick; the lease TTL covers a few missed beats.
pub fn spawn_heartbeat(
    pool: crate::db::Db,
    names: Names,
    lease: Lease,
    interval: Duration,
    stop: CancellationToken,
) -> watch::Receiver<Control> {
    let (tx, rx) = watch::channel(Control::Run);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match renew(&pool, &names, &lease, lease.ttl).await {
                Ok(control) => {
                    tx.send_if_modified(|c| std::mem::replace(c, control) != control);
                    if control == Control::LeaseLost {
                        return;
                    }
                }
                Err(e) => tracing::warn!(job = %lease.job, error = %e, "heartbeat failed"),
            }
        }
    });
    rx
}

/// How a claimed attempt ends, as written to the job row.
#[derive(Debug, Clone)]
pub enum Release {
    /// Back to pending without burning the attempt (graceful shutdown).
    Requeue,
    /// Back to pending after `delay`, the attempt counted; failed once attempts are exhausted.
    Retry {
        delay: Duration,
        error: String,
    },
    Paused,
    Planned,
    Succeeded,
    Cancelled,
    Failed {
        error: String,
    },
}

const RELEASE: &str = "
UPDATE {jobs}
SET state = CASE
        WHEN $4 = 'retry' AND attempt >= $7 THEN 'failed'
        WHEN $4 = 'retry' THEN 'pending'
        ELSE $4 END,
    -- A graceful end burns no attempt: handed back, paused, or a dry run that planned.
    attempt = CASE WHEN $4 IN ('pending', 'paused', 'planned') THEN attempt - 1 ELSE attempt END,
    run_at = CASE WHEN $4 = 'retry' THEN now() + make_interval(secs => $6) ELSE run_at END,
    last_error = coalesce($5, CASE WHEN $4 IN ('succeeded', 'planned') THEN NULL ELSE last_error END),
    finished_at = CASE
        WHEN $4 IN {finished} OR ($4 = 'retry' AND attempt >= $7) THEN now()
        ELSE finished_at END,
    lease_owner = NULL,
    lease_expires_at = NULL
WHERE {fence}
RETURNING state";

/// Writes the end of an attempt, fenced. Returns the resulting state, or `None` if the lease was
/// already lost (then another replica owns the job and nothing is written).
pub async fn release<'e>(
    db: impl PgExecutor<'e>,
    names: &Names,
    lease: &Lease,
    how: &Release,
    max_attempts: i32,
) -> sqlx::Result<Option<String>> {
    let (state, error, delay) = match how {
        Release::Requeue => ("pending", None, 0.0),
        Release::Retry { delay, error } => ("retry", Some(error.as_str()), delay.as_secs_f64()),
        Release::Paused => ("paused", None, 0.0),
        Release::Planned => ("planned", None, 0.0),
        Release::Succeeded => ("succeeded", None, 0.0),
        Release::Cancelled => ("cancelled", None, 0.0),
        Release::Failed { error } => ("failed", Some(error.as_str()), 0.0),
    };
    crate::sql::query_scalar(&fenced(names, RELEASE))
        .bind(lease.job_id)
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(state)
        .bind(error)
        .bind(delay)
        .bind(max_attempts)
        .fetch_optional(db)
        .await
}

const RESCUE: &str = "
WITH expired AS (
    SELECT id FROM {jobs}
    -- A 'running' row without a lease (inserted so by hand) is no replica's either.
    WHERE state = 'running' AND (lease_expires_at IS NULL OR lease_expires_at < now())
    FOR UPDATE SKIP LOCKED
)
UPDATE {jobs} j
SET state = CASE WHEN j.attempt >= $1 THEN 'failed' ELSE 'pending' END,
    last_error = CASE WHEN j.attempt >= $1
        THEN format('lease of %s expired at %s and attempts are exhausted (%s of %s)',
                    j.lease_owner, j.lease_expires_at, j.attempt, $1)
        ELSE j.last_error END,
    finished_at = CASE WHEN j.attempt >= $1 THEN now() ELSE NULL END,
    lease_owner = NULL,
    lease_expires_at = NULL
FROM expired
WHERE j.id = expired.id
RETURNING j.name, j.state";

/// Returns jobs whose lease expired (their replica died or stalled) to pending, or fails them
/// when attempts are exhausted.
pub async fn rescue_expired<'e>(
    db: impl PgExecutor<'e>,
    names: &Names,
    max_attempts: i32,
) -> sqlx::Result<Vec<(String, String)>> {
    crate::sql::query_as(&names.render(RESCUE))
        .bind(max_attempts)
        .fetch_all(db)
        .await
}

const APPLY_REQUESTS: &str = "
UPDATE {jobs}
SET state = CASE requested_state WHEN 'cancelled' THEN 'cancelled' ELSE 'paused' END,
    finished_at = CASE requested_state WHEN 'cancelled' THEN now() ELSE finished_at END
WHERE (requested_state = 'cancelled' AND state IN ('pending', 'planned', 'paused'))
   -- 'paused', or a misspelt request: a pending job waits paused until it is corrected
   OR (requested_state <> 'running' AND state = 'pending')
RETURNING name, state";

/// Applies pause and cancel requests to jobs that no replica is running.
pub async fn apply_requests<'e>(
    db: impl PgExecutor<'e>,
    names: &Names,
) -> sqlx::Result<Vec<(String, String)>> {
    crate::sql::query_as(&names.render(APPLY_REQUESTS))
        .fetch_all(db)
        .await
}

/// Which job rows a claim takes (when their `run_at` has come): one definition, for the claim
/// and for `--until-idle`'s count, which must agree (a count that includes a row no claim takes
/// never reaches zero).
const CLAIMABLE: &str = "
    (   (state = 'pending' AND coalesce(requested_state, 'running') = 'running')
     OR (state = 'paused'  AND requested_state = 'running')
     OR (state = 'planned' AND mode = 'execute'
                           AND coalesce(requested_state, 'running') = 'running'))";

const RUNNABLE: &str = "
SELECT count(*) FROM {jobs}
WHERE (run_at <= now() AND {claimable})
   OR state = 'running'
   -- A retry the daemon scheduled (a failed attempt, run_at in the backoff): it will run.
   OR (state = 'pending' AND attempt > 0 AND {claimable})";

/// Jobs that are runnable now, running anywhere, or waiting out a retry's backoff. A running job
/// counts because its lease may expire (its replica died) and make it runnable again, a retry
/// because it will run: `--until-idle` drains the queue. (A job a person scheduled for later,
/// never attempted, does not hold it.)
pub async fn runnable_count<'e>(db: impl PgExecutor<'e>, names: &Names) -> sqlx::Result<i64> {
    crate::sql::query_scalar(&names.render(&RUNNABLE.replace("{claimable}", CLAIMABLE)))
        .fetch_one(db)
        .await
}

/// Optional job-row columns written together by `store`; `None` leaves a column as it is.
#[derive(Debug, Default)]
pub struct RowUpdate {
    pub upper_bound: Option<Value>,
    pub estimated_total: Option<i64>,
    pub plan: Option<Value>,
    pub archive_table: Option<String>,
    pub remaining: Option<i64>,
    pub slices: Option<Value>,
    /// The key the job walks, frozen with the upper bound (see `Attempt::upper_bound`).
    pub key_columns: Option<Vec<String>>,
}

const STORE: &str = "
UPDATE {jobs}
SET upper_bound = coalesce($4, upper_bound),
    estimated_total = coalesce($5, estimated_total),
    plan = coalesce($6, plan),
    archive_table = coalesce($7, archive_table),
    remaining = coalesce($8, remaining),
    slices = coalesce($9, slices),
    key_columns = coalesce($10, key_columns),
    heartbeat_at = now()
WHERE {fence}";

/// Writes the given columns, fenced; `false` when the lease was lost.
pub async fn store<'e>(
    db: impl PgExecutor<'e>,
    names: &Names,
    lease: &Lease,
    u: &RowUpdate,
) -> sqlx::Result<bool> {
    let done = crate::sql::query(&fenced(names, STORE))
        .bind(lease.job_id)
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(&u.upper_bound)
        .bind(u.estimated_total)
        .bind(&u.plan)
        .bind(&u.archive_table)
        .bind(u.remaining)
        .bind(&u.slices)
        .bind(&u.key_columns)
        .execute(db)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The claimed job row as it is now; `None` when the lease was lost.
pub async fn reread<'e>(
    db: impl PgExecutor<'e>,
    names: &Names,
    lease: &Lease,
) -> sqlx::Result<Option<JobRow>> {
    crate::sql::query_as(&fenced(names, "SELECT {job_row} FROM {jobs} WHERE {fence}"))
        .bind(lease.job_id)
        .bind(lease.attempt)
        .bind(&lease.owner)
        .fetch_optional(db)
        .await
}

/// The committed cursor of the job (`slot` `None`) or of one slice; `None` when the lease was
/// lost, `Some(None)` when nothing is committed yet.
pub async fn stored_cursor<'e>(
    db: impl PgExecutor<'e>,
    names: &Names,
    lease: &Lease,
    slot: Option<usize>,
) -> sqlx::Result<Option<Option<Value>>> {
    let sql = "SELECT CASE WHEN $4::int IS NULL THEN cursor ELSE slices -> $4::int -> 'cursor' END
               FROM {jobs} WHERE {fence}";
    let row: Option<(Option<Value>,)> = crate::sql::query_as(&fenced(names, sql))
        .bind(lease.job_id)
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(slot.map(|s| s as i32))
        .fetch_optional(db)
        .await?;
    Ok(row.map(|(cursor,)| cursor))
}
