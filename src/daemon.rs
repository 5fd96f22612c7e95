//! The daemon loop of one replica: housekeeping (rescue expired leases, apply operator requests,
//! refresh gauges) and claiming up to `worker.concurrency` jobs in one transaction per tick, each
//! claimed job run in its own task, and a drain on shutdown. A tick runs at every wake-up
//! (`listen`) and every `worker.poll_interval`, so an idle replica costs one short transaction
//! per poll. Expired archives are dropped every ten minutes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::archive;
use crate::claim;
use crate::error::Result;
use crate::job::State;
use crate::listen::Wakeups;
use crate::runner::{self, Context};

/// A state, its jobs in the ledger, and when the last of them finished (Unix seconds).
type StateCount = (String, i64, Option<f64>);

/// What `/healthz` and `/readyz` report.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Unix seconds of the last loop iteration that reached the database.
    pub last_ok: AtomicI64,
    /// Unix seconds of the last loop iteration at all.
    pub last_tick: AtomicI64,
    pub stopping: AtomicBool,
    /// Why the loop last failed to reach the database (or a usable schema), until it next does:
    /// what `/readyz` says.
    pub why_not: std::sync::Mutex<Option<String>>,
}

impl Readiness {
    /// The loop reached the database: ready (unless stopping).
    pub fn reached(&self) {
        self.mark(&self.last_ok);
        *self.why_not.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The loop did not reach the database, or found it unusable, for `why`.
    pub fn not_reached(&self, why: String) {
        *self.why_not.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// What `/readyz` answers when not ready.
    pub fn why_not(&self) -> String {
        if self.stopping.load(Ordering::Relaxed) {
            return "stopping".into();
        }
        let why = self
            .why_not
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        why.unwrap_or_else(|| "the daemon has not reached the database lately".into())
    }

    fn mark(&self, field: &AtomicI64) {
        field.store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
    }

    /// The process is alive though the loop has not started (waiting for the database).
    pub fn alive(&self) {
        self.mark(&self.last_tick);
    }

    /// Ready while the loop reached the database within `window` and is not stopping.
    pub fn is_ready(&self, window: Duration) -> bool {
        !self.stopping.load(Ordering::Relaxed) && age(&self.last_ok) <= window.as_secs() as i64
    }

    /// Alive while the loop ticked within `window` (a stuck loop is restarted by the orchestrator).
    pub fn is_alive(&self, window: Duration) -> bool {
        age(&self.last_tick) <= window.as_secs() as i64
    }
}

fn age(field: &AtomicI64) -> i64 {
    chrono::Utc::now().timestamp() - field.load(Ordering::Relaxed)
}

pub struct Daemon {
    pub ctx: Arc<Context>,
    pub until_idle: bool,
    pub shutdown: CancellationToken,
    pub readiness: Arc<Readiness>,
}

const ARCHIVE_SWEEP_EVERY: Duration = Duration::from_secs(600);

impl Daemon {
    /// Runs until shutdown (or, with `until_idle`, until nothing is runnable).
    pub async fn run(self) -> Result<()> {
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut wakeups = Wakeups::start(self.ctx.pool.clone(), self.ctx.metrics.clone()).await;
        let mut last_sweep: Option<Instant> = None;
        let dates = self.ctx.pool.dates();
        tracing::info!(
            owner = %self.ctx.owner,
            until_idle = self.until_idle,
            timezone = dates.map(|d| d.timezone.as_str()),
            datestyle = dates.map(|d| d.datestyle.as_str()),
            dates_from = dates.map(|d| d.from),
            "daemon started"
        );
        loop {
            self.readiness.mark(&self.readiness.last_tick);
            let claimed = match self.tick(&mut tasks, &mut last_sweep).await {
                Ok(n) => {
                    self.readiness.reached();
                    n
                }
                Err(e) => {
                    tracing::warn!(error = %e, "poll failed; retrying at the next interval");
                    self.readiness
                        .not_reached(format!("polling for jobs failed: {e}"));
                    0
                }
            };
            if self.until_idle && claimed == 0 && tasks.is_empty() && self.idle().await {
                tracing::info!("no runnable job left; exiting (--until-idle)");
                break;
            }
            if !self.wait(&mut tasks, &mut wakeups, claimed).await {
                break;
            }
        }
        self.drain(tasks).await;
        Ok(())
    }

    /// Marks finished the jobs with series here that finished elsewhere (on another replica
    /// after a hand-back, or cancelled while idle), so their series expire like the others.
    async fn settle_metrics(&self) {
        let unsettled = self.ctx.metrics.unsettled();
        if unsettled.is_empty() {
            return;
        }
        let sql = self
            .ctx
            .names
            .render("SELECT name FROM {jobs} WHERE name = ANY($1) AND (state IN {finished} OR state = 'planned')")
            .replace("{finished}", &crate::job::State::finished_sql());
        match crate::sql::query_scalar::<String>(&sql)
            .bind(&unsettled)
            .fetch_all(&self.ctx.pool)
            .await
        {
            Ok(done) => done.iter().for_each(|j| self.ctx.metrics.job_finished(j)),
            Err(e) => tracing::debug!(error = %e, "could not read which jobs finished elsewhere"),
        }
    }

    /// Housekeeping and claiming; returns how many jobs were claimed.
    async fn tick(
        &self,
        tasks: &mut JoinSet<()>,
        last_sweep: &mut Option<Instant>,
    ) -> sqlx::Result<usize> {
        let cfg = self.ctx.config();
        if last_sweep.is_none_or(|t| t.elapsed() > ARCHIVE_SWEEP_EVERY) {
            *last_sweep = Some(Instant::now());
            let (pool, names) = (&self.ctx.pool, &self.ctx.names);
            if let Err(e) =
                archive::drop_expired(pool, names, cfg.safety.archive_retention_days).await
            {
                tracing::warn!(error = %e, "dropping expired archives failed");
            }
        }
        self.settle_metrics().await;
        let expired = self
            .ctx
            .metrics
            .expire_finished(cfg.metrics.finished_job_ttl);
        if expired > 0 {
            tracing::debug!(jobs = expired, "dropped the metric series of finished jobs");
        }
        let free = if self.shutdown.is_cancelled() {
            0
        } else {
            cfg.worker.concurrency.saturating_sub(tasks.len())
        };
        let jobs = self.housekeep_and_claim(free as i64).await?;
        let claimed = jobs.len();
        for row in jobs {
            tasks.spawn(runner::run(self.ctx.clone(), row, self.shutdown.clone()));
        }
        Ok(claimed)
    }

    /// One transaction: rescue expired leases, apply operator requests, count jobs by state for
    /// the gauges, claim up to `free` jobs.
    async fn housekeep_and_claim(&self, free: i64) -> sqlx::Result<Vec<crate::job::JobRow>> {
        let cfg = self.ctx.config();
        let names = &self.ctx.names;
        let mut tx = self.ctx.pool.begin().await?;
        let rescued = claim::rescue_expired(&mut *tx, names, cfg.worker.max_attempts).await?;
        let applied = claim::apply_requests(&mut *tx, names).await?;
        let counts = self.count_states(&mut tx).await?;
        let ttl = cfg.worker.lease_ttl;
        let jobs = match free {
            0 => Vec::new(),
            _ => claim::claim(&mut *tx, names, &self.ctx.owner, ttl, free).await?,
        };
        tx.commit().await?;
        for (job, state) in rescued {
            self.ctx.metrics.leases_rescued.inc();
            tracing::warn!(job = %job, state = %state, "rescued a job whose lease expired");
        }
        for (job, state) in applied {
            tracing::info!(job = %job, state = %state, "applied operator request");
        }
        self.set_gauges(&counts);
        Ok(jobs)
    }

    /// Jobs per state, and when the last of them finished (Unix seconds).
    async fn count_states(&self, conn: &mut sqlx::PgConnection) -> sqlx::Result<Vec<StateCount>> {
        let sql = self.ctx.names.render(
            "SELECT state, count(*), extract(epoch FROM max(finished_at))::float8
             FROM {jobs} GROUP BY state",
        );
        crate::sql::query_as(&sql).fetch_all(conn).await
    }

    fn set_gauges(&self, counts: &[StateCount]) {
        let metrics = &self.ctx.metrics;
        for state in State::ALL {
            let label = [state.as_str()];
            let found = counts.iter().find(|(s, ..)| s == state.as_str());
            metrics
                .jobs
                .with_label_values(&label)
                .set(found.map_or(0, |(_, n, _)| *n));
            match found.and_then(|(.., finished)| *finished) {
                Some(at) => metrics.jobs_last_finished.with_label_values(&label).set(at),
                None => {
                    let _ = metrics.jobs_last_finished.remove_label_values(&label);
                }
            }
        }
    }

    async fn idle(&self) -> bool {
        match claim::runnable_count(&self.ctx.pool, &self.ctx.names).await {
            Ok(n) => n == 0,
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell whether jobs are runnable");
                false
            }
        }
    }

    /// Waits for the next reason to poll; `false` on shutdown.
    async fn wait(&self, tasks: &mut JoinSet<()>, wakeups: &mut Wakeups, claimed: usize) -> bool {
        // Just claimed a full set: look again at once, there may be more.
        if claimed > 0 && tasks.len() < self.ctx.config().worker.concurrency {
            return !self.shutdown.is_cancelled();
        }
        let poll = self.ctx.config().worker.poll_interval;
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "a job task panicked; its lease will expire and be rescued");
                }
                true
            }
            wake = wakeups.next() => {
                tracing::trace!(?wake, "woken");
                true
            }
            _ = tokio::time::sleep(poll) => true,
        }
    }

    /// Lets running jobs finish their current batch and hand back their leases.
    async fn drain(&self, mut tasks: JoinSet<()>) {
        self.readiness.stopping.store(true, Ordering::Relaxed);
        if tasks.is_empty() {
            return;
        }
        let cfg = self.ctx.config();
        let limit = cfg.batch.statement_timeout + cfg.batch.lock_timeout + Duration::from_secs(1);
        tracing::info!(
            jobs = tasks.len(),
            limit_ms = limit.as_millis() as u64,
            "draining running jobs"
        );
        let drained =
            tokio::time::timeout(limit, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                jobs = tasks.len(),
                "jobs did not stop in time; aborting them (their leases will expire)"
            );
            tasks.abort_all();
        }
    }
}
