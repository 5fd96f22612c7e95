//! Operator actions behind the CLI: enqueue, status, pause/resume/cancel, execute, revert, verify,
//! wait. Each is the same SQL an operator could type; the CLI adds argument parsing and printing.

use std::time::Duration;

use crate::db::Db;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result, is_transient_sqlstate};
use crate::job::{Action, JobRow, JobSpec, Requested, State};
use crate::keyset::{Key, Keyset};
use crate::pin::Pinned;
use crate::plan::Counter;
use crate::sql::Names;
use crate::staging::{self, Staged};
use crate::target::Resolve;

/// A job to enqueue; `None` fields take the table's defaults.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    pub name: String,
    pub table_name: String,
    pub predicate: String,
    pub action: Option<String>,
    pub set_clause: Option<String>,
    pub key_columns: Option<Vec<String>>,
    pub execute: bool,
    pub batch_size: Option<i32>,
    pub target_batch_ms: Option<i32>,
    pub sleep_ms: Option<i32>,
    pub max_rows_per_second: Option<i32>,
    pub parallelism: Option<i32>,
    pub max_batch_ms: Option<i32>,
    pub preset: Option<String>,
    pub max_affected: Option<i64>,
    pub archive: Option<bool>,
    pub priority: Option<i32>,
    pub run_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Updates from a data file: the staging table the job applies (set by `enqueue_from_csv`).
    pub staged_table: Option<String>,
    /// Insert jobs: the table walked.
    pub source_table: Option<String>,
    pub allow_cascade: Option<bool>,
}

const INSERT: &str = "
INSERT INTO {jobs} (name, table_name, predicate, action, set_clause, key_columns, mode, batch_size,
                    target_batch_ms, sleep_ms, max_rows_per_second, max_affected, archive, priority, run_at,
                    parallelism, max_batch_ms, preset, staged_table, source_table, allow_cascade)
VALUES ($1, $2, $3, coalesce($4, 'update'), $5, $6, $7, $8, $9, $10, $11, $12, coalesce($13, true),
        coalesce($14, 0), coalesce($15, now()), $16, $17, $18, $19, $20, coalesce($21, false))
RETURNING {job_row}";

/// Inserts the job row, refusing (and inserting nothing) when its columns would fail it at its
/// first claim: an unknown action, an insert without `source_table`, values out of range.
pub async fn enqueue(pool: &Db, names: &Names, cfg: &Config, job: &NewJob) -> Result<JobRow> {
    let mut tx = pool.begin().await?;
    let row = insert_job(&mut tx, names, cfg, job).await?;
    tx.commit().await?;
    Ok(row)
}

/// Stages `file` (CSV with a header) and enqueues the update job that applies it to
/// `job.table_name` by `job.key_columns` (default: the table's key), in one transaction: a bad
/// file fails with PostgreSQL's line number and creates nothing. Returns the job and the staging.
pub async fn enqueue_from_csv(
    pool: &Db,
    names: &Names,
    cfg: &Config,
    job: &NewJob,
    file: &std::path::Path,
) -> Result<(JobRow, Staged)> {
    let mut tx = pool.begin().await?;
    let target = Resolve {
        job: &job.name,
        table_name: &job.table_name,
        key_columns: job.key_columns.as_deref(),
        own_schema: &names.schema,
        allowed_tables: &cfg.safety.allowed_tables,
    }
    .run(&mut tx)
    .await?;
    let staged = staging::stage_csv(&mut tx, names, &job.name, &target, file)
        .await
        .map_err(|source| Error::Staging {
            job: job.name.clone(),
            table: target.display(),
            source,
        })?;
    let staged_job = NewJob {
        action: Some("update".into()),
        predicate: staged.predicate.clone(),
        set_clause: Some(staged.set_clause.clone()),
        staged_table: Some(staging::staging_name(&job.name)),
        ..job.clone()
    };
    let row = insert_job(&mut tx, names, cfg, &staged_job).await?;
    tx.commit().await?;
    Ok((row, staged))
}

/// Inserts the job row and checks it as a replica would at its first claim: its columns, and
/// then its tables and fragments on the server (`validate`). A job that would fail there is
/// refused here, and the caller's transaction inserts nothing.
async fn insert_job(
    conn: &mut sqlx::PgConnection,
    names: &Names,
    cfg: &Config,
    job: &NewJob,
) -> Result<JobRow> {
    if let Some(reason) = crate::job::name_problem(&job.name) {
        // Before the INSERT: the row's id would be rolled back with it.
        return Err(Error::Refused {
            job: format!("{:?} on {}", job.name, job.table_name),
            reason,
        });
    }
    let mode = if job.execute { "execute" } else { "dry_run" };
    let row: JobRow = crate::sql::query_as(&names.render(INSERT))
        .bind(&job.name)
        .bind(&job.table_name)
        .bind(&job.predicate)
        .bind(&job.action)
        .bind(&job.set_clause)
        .bind(&job.key_columns)
        .bind(mode)
        .bind(job.batch_size)
        .bind(job.target_batch_ms)
        .bind(job.sleep_ms)
        .bind(job.max_rows_per_second)
        .bind(job.max_affected)
        .bind(job.archive)
        .bind(job.priority)
        .bind(job.run_at)
        .bind(job.parallelism)
        .bind(job.max_batch_ms)
        .bind(&job.preset)
        .bind(&job.staged_table)
        .bind(&job.source_table)
        .bind(job.allow_cascade)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => Error::Refused {
                job: job.name.clone(),
                reason: "a job with this name already exists; names run once, use a new name"
                    .into(),
            },
            _ => Error::Database(e),
        })?;
    let spec = JobSpec::from_row(&row, &cfg.batch, &cfg.safety)?;
    if spec.action != Action::Revert {
        let scope = crate::validate::Scope {
            own_schema: &names.schema,
            allowed_tables: &cfg.safety.allowed_tables,
        };
        let missing = crate::validate::missing_privileges(conn, &spec, scope).await?;
        if missing.is_empty() {
            crate::validate::job(conn, &spec, scope, crate::validate::Parts::All).await?;
        } else {
            let role: String = crate::sql::query_scalar("SELECT current_user::text")
                .fetch_one(&mut *conn)
                .await?;
            tracing::warn!(
                job = %job.name,
                role,
                missing = %missing.join(", "),
                "enqueued without checking the predicate and set clause: this role may not run \
                 the job's statements (a replica's role runs them); the replica checks them when \
                 it claims the job, and fails it with the cause if they are wrong"
            );
        }
    }
    Ok(row)
}

/// All jobs (newest first), or the one named.
pub async fn list(pool: &Db, names: &Names, name: Option<&str>) -> Result<Vec<JobRow>> {
    let rows: Vec<JobRow> = crate::sql::query_as(&names.render(
        "SELECT {job_row} FROM {jobs} WHERE $1::text IS NULL OR name = $1 ORDER BY id DESC",
    ))
    .bind(name)
    .fetch_all(pool)
    .await?;
    if let Some(n) = name.filter(|_| rows.is_empty()) {
        return Err(Error::NoSuchJob(n.to_owned()));
    }
    Ok(rows)
}

pub async fn get(pool: &Db, names: &Names, name: &str) -> Result<JobRow> {
    list(pool, names, Some(name))
        .await?
        .pop()
        .ok_or_else(|| Error::NoSuchJob(name.into()))
}

/// Sets `requested_state` on a job that has not ended.
pub async fn request(pool: &Db, names: &Names, name: &str, requested: Requested) -> Result<JobRow> {
    // A requested cancel is final: a later pause or resume must not turn it back into a job
    // that goes on changing rows. The condition is in the UPDATE, so a cancel racing this
    // request still wins.
    let sql = names.render(&format!(
        "UPDATE {{jobs}} SET requested_state = $2
         WHERE name = $1 AND state NOT IN {finished}
           AND (requested_state IS DISTINCT FROM 'cancelled' OR $2 = 'cancelled')
         RETURNING {{job_row}}",
        finished = crate::job::State::finished_sql()
    ));
    let updated: Option<JobRow> = crate::sql::query_as(&sql)
        .bind(name)
        .bind(requested.as_str())
        .fetch_optional(pool)
        .await?;
    if let Some(row) = updated {
        return Ok(row);
    }
    let job = get(pool, names, name).await?;
    let reason = if job.state.is_finished() {
        format!("it already ended ({})", job.state)
    } else {
        format!(
            "a cancel was requested (it is {}); a cancelled job is not paused or resumed",
            job.state
        )
    };
    Err(Error::Refused {
        job: name.into(),
        reason,
    })
}

/// Approves a dry run: `mode = 'execute'`. A planned job becomes claimable again.
pub async fn approve(pool: &Db, names: &Names, name: &str) -> Result<JobRow> {
    let job = get(pool, names, name).await?;
    let refuse = |reason: String| Error::Refused {
        job: name.into(),
        reason,
    };
    if job.state.is_finished() {
        return Err(refuse(format!("it already ended ({})", job.state)));
    }
    if job.requested_state.as_deref() == Some("cancelled") {
        return Err(refuse(format!(
            "its cancel was requested ({}): a requested cancel is final",
            job.state
        )));
    }
    // The same conditions in the statement: a cancel requested since the read is not undone.
    let approved: Option<JobRow> = crate::sql::query_as(&names.render(&format!(
        "UPDATE {{jobs}} SET mode = 'execute'
         WHERE name = $1 AND requested_state IS DISTINCT FROM 'cancelled'
           AND state NOT IN {finished}
         RETURNING {{job_row}}",
        finished = State::finished_sql()
    )))
    .bind(name)
    .fetch_optional(pool)
    .await?;
    approved.ok_or_else(|| refuse("it was cancelled or ended meanwhile".into()))
}

/// Enqueues a job that restores `name`'s before-images. Returns the revert job. Refused while
/// another revert of the job is queued, running, paused or has succeeded (a second one would only
/// skip every row); after a failed or cancelled revert a new one restores what that one left. The
/// job's row is locked meanwhile, so two concurrent `revert` commands cannot both enqueue.
/// Enqueues the revert of job `name`, in execute mode. `allow_cascade`: the revert of an insert
/// may delete rows whose child rows foreign keys then cascade into.
pub async fn revert(pool: &Db, names: &Names, name: &str, allow_cascade: bool) -> Result<JobRow> {
    let job = get(pool, names, name).await?;
    let refuse = |reason: String| Error::Refused {
        job: name.into(),
        reason,
    };
    if !job.state.is_finished() {
        let reason = match (job.state, job.requested_state.as_deref()) {
            (State::Planned, _) if job.mode.as_deref() != Some("execute") => {
                "it is a dry run awaiting approval (planned): it changed no rows, so there is \
                 nothing to revert; cancel it if it should not run"
                    .to_owned()
            }
            (state, Some("cancelled")) => {
                format!("it is {state} and its cancel was requested: revert it once it ended")
            }
            (state, _) => format!("it is {state}; cancel it or let it finish before reverting"),
        };
        return Err(refuse(reason));
    }
    if let Some(original) = &job.reverts {
        return Err(refuse(format!(
            "it is a revert (of {original}) and keeps no archive: to redo {original}'s change, \
             enqueue it again under a new name"
        )));
    }
    let mut tx = pool.begin().await?;
    // Checked under the lock: the retention sweep drops an expired archive holding the job's
    // row, and a revert queued behind it would find no archive.
    let archive: Option<String> = crate::sql::query_scalar(
        &names.render("SELECT archive_table FROM {jobs} WHERE name = $1 FOR UPDATE"),
    )
    .bind(name)
    .fetch_one(&mut *tx)
    .await?;
    if archive.is_none() {
        // Say which: an archiving job that changed nothing never made its archive.
        let reason = if job.archive == Some(false) {
            "it kept no archive (archive was off)".to_owned()
        } else if job.rows_changed == 0 && job.state.is_finished() {
            format!(
                "it changed no rows ({}, {} rows changed), so there is nothing to revert",
                job.state, job.rows_changed
            )
        } else {
            "it has no archive (it never ran, or the archive expired)".to_owned()
        };
        return Err(refuse(reason));
    }
    let earlier: Vec<(String, State)> = crate::sql::query_as(
        &names.render("SELECT name, state FROM {jobs} WHERE reverts = $1 ORDER BY id"),
    )
    .bind(name)
    .fetch_all(&mut *tx)
    .await?;
    if let Some((other, state)) = earlier
        .iter()
        .find(|(_, s)| !matches!(s, State::Failed | State::Cancelled))
    {
        return Err(refuse(match state {
            State::Succeeded => format!("{other} already reverted it"),
            _ => format!("{other} is reverting it ({state})"),
        }));
    }
    let row = crate::sql::query_as(&names.render(
        "INSERT INTO {jobs} (name, table_name, predicate, action, key_columns, mode, archive, reverts,
                             batch_size, target_batch_ms, sleep_ms, max_rows_per_second, priority,
                             parallelism, max_batch_ms, preset, allow_cascade, max_affected)
         SELECT $2, table_name, 'true', 'revert',
                -- an insert's key_columns name its source's keys; the revert reads the
                -- target's, as the insert wrote by them, from the archive
                CASE WHEN action = 'insert' THEN NULL ELSE key_columns END, 'execute', false, name,
                batch_size, target_batch_ms, sleep_ms, max_rows_per_second, priority, parallelism,
                max_batch_ms, preset, $3,
                -- the ceiling the job was allowed: its revert restores at most what it changed
                max_affected
         FROM {jobs} WHERE name = $1
         RETURNING {job_row}",
    ))
    .bind(name)
    .bind(revert_name(&mut tx, names, name).await?)
    .bind(allow_cascade)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// `<job>__revert`, or `<job>__revert2`, `3`, … when earlier reverts took the name.
async fn revert_name(conn: &mut sqlx::PgConnection, names: &Names, name: &str) -> Result<String> {
    let taken: Vec<String> = crate::sql::query_scalar(
        // Not LIKE: `_`, `%` and `\` in a job's name would be pattern characters.
        &names.render("SELECT name FROM {jobs} WHERE starts_with(name, $1 || '__revert')"),
    )
    .bind(name)
    .fetch_all(conn)
    .await?;
    Ok((1..)
        .map(|n| match n {
            1 => format!("{name}__revert"),
            n => format!("{name}__revert{n}"),
        })
        .find(|candidate| !taken.contains(candidate))
        .unwrap_or_default())
}

/// Counts rows up to the job's upper bound that still match its predicate (keyset windows, at
/// the job's throttle) and stores the number in `remaining`.
pub async fn verify(pool: &Db, names: &Names, cfg: &Config, name: &str) -> Result<i64> {
    let row = get(pool, names, name).await?;
    let spec = JobSpec::from_row(&row, &cfg.batch, &cfg.safety)?;
    if spec.action == Action::Revert {
        // Its predicate is `true`: every row would count as remaining. The revert's own run
        // reports what it restored and what it skipped.
        return Err(Error::Refused {
            job: name.into(),
            reason: "a revert has no predicate to verify; its rows_changed and rows_skipped say \
                     what it restored and what changed since"
                .into(),
        });
    }
    if row.upper_bound.is_none() {
        // The count runs up to the key range's end frozen at the job's first start: before
        // that there is nothing to count up to (and a 0 stored would read as done).
        return Err(Error::Refused {
            job: name.into(),
            reason: format!(
                "it has not started yet ({}): its upper bound is frozen when a replica first \
                 claims it, and verify counts up to it",
                row.state
            ),
        });
    }
    let mut conn = pool.acquire().await?;
    // The table the job walks (an insert's source) and only the predicate: that is what counts
    // (for an insert, narrowed to the source rows whose target row does not exist yet).
    let scope = crate::validate::Scope {
        own_schema: &names.schema,
        allowed_tables: &cfg.safety.allowed_tables,
    };
    let crate::validate::Validated {
        target,
        fragments,
        into,
    } = crate::validate::job(&mut conn, &spec, scope, crate::validate::Parts::Predicate).await?;
    let named = target.named_with(into.as_ref().map(|(t, _)| t));
    let keyset = Keyset::new(&target);
    // Counted on the table the job planned on, as the job's batches check (`pin`): one swapped
    // in under the name since was counted, and its rows stored as the job's `remaining`.
    let planned = Pinned::stored(row.plan.as_ref());
    let into = into.map(|(t, _)| t);
    let now = Pinned::of_job(&mut conn, &target, into.as_ref(), Some(keyset.names())).await?;
    if let Some(drift) = now.drift_since(&planned) {
        return Err(drift.error(name, &named).into());
    }
    conn.finish().await?;
    let upper = match row
        .upper_bound
        .as_ref()
        .and_then(|v| Key::from_json(v, keyset.width()))
    {
        Some(k) => k,
        None => return store_remaining(pool, names, name, 0).await,
    };
    let cancel = CancellationToken::new();
    let counter = Counter {
        pool,
        job: &spec.name,
        table: &named,
        target: &target,
        keyset: &keyset,
        predicate: &fragments.predicate,
        upper: &upper,
        throttle: &spec.throttle,
        cancel: &cancel,
    };
    let remaining = counter.count_matching().await?.unwrap_or_default();
    store_remaining(pool, names, name, remaining).await
}

/// Stores the count; a role that may not (a requester granted only `requested_state` and
/// `mode`) gets the count in the refusal, not a bare "permission denied for table jobs".
async fn store_remaining(pool: &Db, names: &Names, name: &str, remaining: i64) -> Result<i64> {
    let stored =
        crate::sql::query(&names.render("UPDATE {jobs} SET remaining = $2 WHERE name = $1"))
            .bind(name)
            .bind(remaining)
            .execute(pool)
            .await;
    match stored {
        Ok(_) => Ok(remaining),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
            Err(Error::Refused {
                job: name.into(),
                reason: format!(
                    "{remaining} rows up to the upper bound still match the predicate, but this \
                     role cannot store the count ({}): `wait` reads remaining, so grant it \
                     UPDATE (remaining) on {}",
                    e.message(),
                    names.jobs
                ),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// The "ensure finished" gate that the migration after a backfill runs before it adds NOT NULL
/// or drops the old column: only a job that succeeded and was verified with no row left passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    /// Succeeded with `remaining = 0`.
    Passed,
    Failed,
    Cancelled,
    /// Succeeded, but `remaining` rows up to its upper bound still match the predicate.
    Remaining,
    /// Succeeded without a verification count (`remaining` is NULL, e.g. a revert).
    Unverified,
    /// A dry run that planned and waits for `backfilld execute`: it will not run on its own.
    AwaitingApproval,
    /// Still pending, running, paused (or approved but not yet claimed) when the wait ended.
    TimedOut,
    /// Its change was undone, or is being undone, by a revert job (see [`revert_of`]).
    Reverted,
}

impl Gate {
    /// The verdict on a job row; `None` while the job may still get there on its own.
    pub fn of(row: &JobRow) -> Option<Gate> {
        match row.state {
            // A revert has no predicate to verify: it restored what it could and counted in
            // `rows_skipped` what changed since.
            State::Succeeded if row.reverts.is_some() => Some(Gate::Passed),
            State::Succeeded => Some(match row.remaining {
                Some(0) => Gate::Passed,
                Some(_) => Gate::Remaining,
                None => Gate::Unverified,
            }),
            State::Failed => Some(Gate::Failed),
            State::Cancelled => Some(Gate::Cancelled),
            // An approved dry run stays `planned` until a replica claims it.
            State::Planned
                if row.mode.as_deref() != Some("execute")
                    && row.requested_state.as_deref() != Some("cancelled") =>
            {
                Some(Gate::AwaitingApproval)
            }
            _ => None,
        }
    }

    pub fn passed(self) -> bool {
        self == Gate::Passed
    }

    /// Why the job passed or not, naming it: what an operator reads in a migration's log.
    pub fn describe(self, row: &JobRow) -> String {
        let name = &row.name;
        match self {
            Gate::Passed if row.reverts.is_some() => format!(
                "{name}: succeeded: {} rows restored, {} changed since and left as they are",
                row.rows_changed, row.rows_skipped
            ),
            Gate::Passed => format!("{name}: succeeded and verified: no rows left to change"),
            Gate::Failed => format!(
                "{name}: failed: {}",
                row.last_error.as_deref().unwrap_or("(no error recorded)")
            ),
            Gate::Cancelled => format!(
                "{name}: was cancelled after changing {} rows; it did not finish",
                row.rows_changed
            ),
            Gate::Remaining => format!(
                "{name}: succeeded, but {} rows up to its upper bound still match its predicate",
                row.remaining.unwrap_or_default()
            ),
            Gate::Unverified => format!(
                "{name}: succeeded but is unverified (remaining is unknown); run `backfilld verify {}`",
                shell_arg(name)
            ),
            Gate::AwaitingApproval => format!(
                "{name}: is a dry run awaiting approval (planned); approve it with `backfilld execute {}`",
                shell_arg(name)
            ),
            Gate::Reverted => format!("{name}: its change was reverted"),
            Gate::TimedOut => format!(
                "{name}: still {} when the wait timed out ({}, {} rows changed, {} batches)",
                match (row.state, row.requested_state.as_deref()) {
                    (_, Some("cancelled")) => "waiting for a replica to apply its cancel",
                    (State::Planned, Some("paused")) => "planned (approved, but paused: resume it)",
                    (State::Planned, _) => "planned (approved, not yet claimed by a replica)",
                    (other, _) => other.as_str(),
                },
                row.progress()
                    .map_or("progress unknown".into(), |p| format!(
                        "{:.1}% done",
                        p * 100.0
                    )),
                row.rows_changed,
                row.batches
            ),
        }
    }
}

/// The revert that undid, undoes or will undo job `name`'s change: the latest job reverting it
/// that restored rows or may still (not failed or cancelled before restoring anything). Every
/// revert counts, not only the latest: one cancelled after restoring rows, then another cancelled
/// before restoring any, still left the change partly undone (the gate had passed).
pub async fn revert_of(pool: &Db, names: &Names, name: &str) -> Result<Option<JobRow>> {
    Ok(crate::sql::query_as(&names.render(
        "SELECT {job_row} FROM {jobs}
         WHERE reverts = $1 AND (rows_changed > 0 OR state NOT IN ('failed', 'cancelled'))
         ORDER BY id DESC LIMIT 1",
    ))
    .bind(name)
    .fetch_optional(pool)
    .await?)
}

/// Why a job whose change a revert undid does not pass the gate, naming the revert.
pub fn describe_reverted(row: &JobRow, revert: &JobRow) -> String {
    let (name, by, restored) = (&row.name, &revert.name, revert.rows_changed);
    match revert.state {
        State::Succeeded => format!(
            "{name}: was reverted by {by} ({restored} rows restored): its change is not in place"
        ),
        State::Failed | State::Cancelled => format!(
            "{name}: was partly reverted by {by} ({} after restoring {restored} rows): its \
             change is not wholly in place",
            revert.state
        ),
        other => format!(
            "{name}: is being reverted by {by} ({other}, {restored} rows restored so far): its \
             change is being undone"
        ),
    }
}

/// A job name as a shell argument, for commands a message suggests: bare when it is plainly safe,
/// else in single quotes (each `'` as `'\''`); after `--` when it starts with a dash.
pub fn shell_arg(name: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-.,:/=@%+".contains(c);
    let word = if !name.is_empty() && name.chars().all(plain) {
        name.to_owned()
    } else {
        format!("'{}'", name.replace('\'', "'\\''"))
    };
    if name.starts_with('-') {
        format!("-- {word}")
    } else {
        word
    }
}

/// How often `wait` reads the job row.
pub const WAIT_POLL: Duration = Duration::from_secs(1);

/// Polls the job row every `poll` until the job reaches a verdict or `timeout` passes. A failed
/// poll on a transient error (connection lost, server restarting) is retried at the next poll; the
/// first read is not, so a missing job is an error at once. No transaction or lock is held between
/// polls, so ending the process at any moment is safe. A job that succeeded but whose change a
/// revert undid (or is undoing) gets [`Gate::Reverted`], with that revert's row.
#[tracing::instrument(skip(pool, names))]
pub async fn wait(
    pool: &Db,
    names: &Names,
    name: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<(JobRow, Gate, Option<JobRow>)> {
    // A timeout past what the clock can count is no deadline at all.
    let deadline = Instant::now().checked_add(timeout);
    let mut row = get(pool, names, name).await?;
    loop {
        if let Some(gate) = Gate::of(&row) {
            let undone = match gate {
                Gate::Passed | Gate::Remaining | Gate::Unverified if row.reverts.is_none() => {
                    revert_of(pool, names, name).await?
                }
                _ => None,
            };
            return Ok(match undone {
                Some(revert) => (row, Gate::Reverted, Some(revert)),
                None => (row, gate, None),
            });
        }
        let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
        if left.is_zero() {
            return Ok((row, Gate::TimedOut, None));
        }
        tokio::time::sleep(poll.min(left)).await;
        match get(pool, names, name).await {
            Ok(newer) => row = newer,
            Err(Error::Database(e)) if is_transient(&e) => {
                tracing::warn!(job = name, error = %e, "reading the job row failed; polling again");
            }
            Err(e) => return Err(e),
        }
    }
}

/// Errors a later poll may not meet again: the connection, or a server that is restarting.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| is_transient_sqlstate(&c)),
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::shell_arg;

    #[test]
    fn suggested_commands_quote_names_for_the_shell() {
        assert_eq!(shell_arg("orders_status_v1"), "orders_status_v1");
        assert_eq!(shell_arg("it's mine"), r"'it'\''s mine'");
        assert_eq!(shell_arg("a;rm -rf"), "'a;rm -rf'");
        assert_eq!(shell_arg("-dash"), "-- -dash");
        assert_eq!(shell_arg("$HOME"), "'$HOME'");
    }
}
