//! One claimed attempt at one job, from validation to the final state:
//! validate → resolve target → freeze upper bound → plan (dry run) → ceiling → archive →
//! batches → verify. Every write to the job row is fenced by the lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::archive::{ArchiveKind, ArchiveTable};
use crate::batch::{Batcher, Committed, TxSettings, WindowSql};
use crate::bloat::{BloatGuard, Pass, Standing};
use crate::change::{Change, Delete, Insert, Revert, Update};
use crate::claim::{self, Control, Lease, Release, RowUpdate};
use crate::config::Config;
use crate::error::JobError;
use crate::fragment::Fragments;
use crate::job::{Action, JobRow, JobSpec, Mode, State, Throttle};
use crate::keyset::{Key, Keyset};
use crate::metrics::Metrics;
use crate::pin::Pinned;
use crate::plan::{self, Counter, Plan};
use crate::sql::Names;
use crate::target::Target;
use crate::throttle::{self, Controller, Health, Impact, Load, Reason};

mod attempt;
mod batches;
mod planning;
mod prepare;
mod progress;
mod slices;
mod waiting;

use progress::Progress;
use slices::Slice;
use waiting::{BACKOFF_BASE, Pacing, backoff, retry_base};

/// What every runner shares with the daemon.
pub struct Context {
    pub pool: crate::db::Db,
    pub names: Names,
    pub config: watch::Receiver<Arc<Config>>,
    pub metrics: Metrics,
    pub owner: String,
    /// Per job and slice, the batches this process counted into the metrics (`batches::Tally`),
    /// kept across attempts; dropped when the job finishes here.
    pub tallies: std::sync::Mutex<Tallies>,
}

/// See `Context::tallies`.
pub type Tallies = std::collections::HashMap<(i64, Option<usize>), batches::Tally>;

impl Context {
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    fn tallies(&self) -> std::sync::MutexGuard<'_, Tallies> {
        // A poisoned lock only means a panic mid-update of plain numbers.
        self.tallies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the tallies of a job that finished: no attempt will redo its batches.
    fn forget_tallies(&self, job_id: i64) {
        self.tallies().retain(|(id, _), _| *id != job_id);
    }
}

/// How an attempt ended short of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Planned,
    Paused,
    Cancelled,
    /// This replica is stopping: hand the job back without burning the attempt.
    Shutdown,
    LeaseLost,
    /// A slice stopped because a sibling slice stopped (never written: see `merge`).
    Stopped,
}

/// Runs one claimed job to the end of this attempt and records how it ended.
pub async fn run(ctx: Arc<Context>, row: JobRow, shutdown: CancellationToken) {
    let span = tracing::info_span!("job", job = %row.name, attempt = row.attempt, table = row.table_name.as_deref().unwrap_or(""));
    async move {
        let cfg = ctx.config();
        let lease = Lease {
            job_id: row.id,
            job: row.name.clone(),
            attempt: row.attempt,
            owner: ctx.owner.clone(),
            ttl: cfg.worker.lease_ttl,
        };
        let stop_heartbeat = CancellationToken::new();
        // Stops the heartbeat however this future ends: a panic unwinding through it must let
        // the lease expire (for another replica to rescue), not keep renewing it forever.
        let _heartbeat = stop_heartbeat.clone().drop_guard();
        let control = claim::spawn_heartbeat(
            ctx.pool.clone(),
            ctx.names.clone(),
            lease.clone(),
            cfg.worker.heartbeat_interval,
            stop_heartbeat.clone(),
        );
        let interrupt = interrupt_on_control(&shutdown, control.clone());
        tracing::info!("job claimed");
        let gauge = &ctx.metrics.stats_visible;
        crate::throttle::report_visibility(&ctx.pool, &cfg.throttle, gauge).await;
        ctx.metrics.job_started(&row.name);
        let mut attempt = Attempt {
            ctx: &ctx,
            row,
            lease,
            control,
            shutdown,
            interrupt,
            held: Default::default(),
            longest_wait: Default::default(),
            batches_gave_up: Default::default(),
            rate: Default::default(),
            slice_count: Default::default(),
        };
        let result = attempt
            .execute_with_retries(cfg.worker.max_batch_retries)
            .await;
        attempt.interrupt.cancel();
        stop_heartbeat.cancel();
        let state = attempt.finish(result).await;
        if state
            .as_deref()
            .is_some_and(|s| State::FINISHED.iter().any(|f| f.as_str() == s))
        {
            ctx.tallies().retain(|(job, _), _| *job != attempt.row.id);
        }
        ctx.metrics
            .attempt_ended(&attempt.row.name, state.as_deref() == Some("succeeded"));
    }
    .instrument(span)
    .await
}

/// A token cancelled on shutdown or as soon as the heartbeat sees a pause, cancel or lost lease,
/// so long waits (sleeps, counting) end promptly.
fn interrupt_on_control(
    shutdown: &CancellationToken,
    mut control: watch::Receiver<Control>,
) -> CancellationToken {
    let interrupt = shutdown.child_token();
    let token = interrupt.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                changed = control.changed() => {
                    if changed.is_err() || *control.borrow() != Control::Run {
                        token.cancel();
                        return;
                    }
                }
            }
        }
    });
    interrupt
}

/// The job's resolved pieces, valid for this attempt.
struct Prepared {
    spec: JobSpec,
    /// The table whose keys the job walks: `table_name`, or `source_table` for an insert.
    target: Target,
    fragments: Fragments,
    /// Walks the target's keys, or the archive's for a revert.
    keyset: Keyset,
    /// `None` when the range is empty (nothing to do).
    upper: Option<Key>,
    /// The archive a revert restores from.
    source_archive: Option<ArchiveTable>,
    /// The table an insert job inserts into (`table_name`).
    into: Option<Target>,
    /// An insert's own fragments, which its batches write with (`ON CONFLICT DO NOTHING` skips
    /// rows whose target row exists); `fragments` holds the predicate narrowed to the rows still
    /// to insert, which the plan, verification and the idempotency check count with.
    written: Option<Fragments>,
    /// How messages name the job's table (`Target::named_with`).
    named: String,
    /// The target and an insert's table, with the oids they have now.
    pinned: Pinned,
}

impl Prepared {
    /// The table the job changes: the target, or for an insert the table it inserts into. Its
    /// keys are what the archive records, and it is what the bloat guard vacuums and the
    /// health signals watch (an insert's source only gets read).
    fn written(&self) -> &Target {
        self.into.as_ref().unwrap_or(&self.target)
    }

    /// The error for what changed since the stored plan pinned it (`pin::Drift`), if anything.
    fn drifted_since(&self, plan: &Plan) -> Result<(), JobError> {
        match self.pinned.drift_since(&plan.pinned) {
            Some(drift) => Err(drift.error(&self.spec.name, &self.named)),
            None => Ok(()),
        }
    }
}

struct Attempt<'a> {
    ctx: &'a Context,
    row: JobRow,
    lease: Lease,
    control: watch::Receiver<Control>,
    shutdown: CancellationToken,
    interrupt: CancellationToken,
    /// Seconds held back per reason in this attempt, for the closing log line.
    held: std::sync::Mutex<std::collections::BTreeMap<&'static str, f64>>,
    /// The longest any session had waited on a batch's row locks when that batch committed.
    longest_wait: std::sync::Mutex<Duration>,
    /// A slice's batch loop ran out of its retries on a transient error. The attempt then ends
    /// (a later attempt retries the job) instead of retrying in place: batches have had their
    /// retries, and retrying them again here would multiply the two limits.
    batches_gave_up: std::sync::atomic::AtomicBool,
    /// The job's rows-per-second cap, shared by its slices.
    rate: crate::throttle::RatePace,
    /// How many slices walk at once (set by `run_slices`).
    slice_count: std::sync::atomic::AtomicUsize,
}
