//! The attempt as a state machine: execute (prepare → plan → ceiling → archive → slices → verify),
//! retry transient errors in place, and record how it ended.

use std::sync::atomic::Ordering;

use super::*;
use crate::db::Conn;

impl Attempt<'_> {
    fn table(&self) -> &str {
        self.row.table_name.as_deref().unwrap_or("?")
    }

    pub(super) fn err(&self, step: &'static str) -> impl Fn(sqlx::Error) -> JobError + '_ {
        move |e| JobError::sql(&self.row.name, self.table(), step, e)
    }

    /// Retries transient errors outside batches (validation, planning, bookkeeping) in place,
    /// re-reading the job row each time. Batches retry on their own: one that ran out of its
    /// retries ends the attempt (`batches_gave_up`), and the job is retried as a new attempt.
    pub(super) async fn execute_with_retries(&mut self, max: u32) -> Result<Outcome, JobError> {
        let mut retries = 0;
        loop {
            match self.execute().await {
                Err(e)
                    if e.is_retryable()
                        && retries < max
                        && !self
                            .batches_gave_up
                            .load(std::sync::atomic::Ordering::Relaxed) =>
                {
                    retries += 1;
                    tracing::warn!(error = %e, retry = retries, "transient error; retrying");
                    let wake = &self.interrupt;
                    if let Some(outcome) = self.back_off(&e, retries, BACKOFF_BASE, wake).await {
                        return Ok(outcome);
                    }
                    self.refresh_row().await?;
                }
                other => return other,
            }
        }
    }

    /// Re-reads the job row, fenced by the lease.
    async fn refresh_row(&mut self) -> Result<(), JobError> {
        let row = claim::reread(&self.ctx.pool, &self.ctx.names, &self.lease)
            .await
            .map_err(self.err("re-reading the job row"))?;
        self.row = row.ok_or_else(|| self.lease_lost())?;
        Ok(())
    }

    /// A pooled connection for the steps outside batches; hand it back with `finish`.
    pub(super) async fn connection(&self) -> Result<Conn, JobError> {
        self.ctx
            .pool
            .acquire()
            .await
            .map_err(self.err("connecting"))
    }

    /// Commits what a `connection` wrote (behind a transaction pooler it is a transaction).
    pub(super) async fn hand_back(&self, conn: Conn) -> Result<(), JobError> {
        conn.finish().await.map_err(self.err("committing"))
    }

    pub(super) fn lease_lost(&self) -> JobError {
        JobError::LeaseLost {
            job: self.lease.job.clone(),
            attempt: self.lease.attempt,
        }
    }

    async fn execute(&mut self) -> Result<Outcome, JobError> {
        let cfg = self.ctx.config();
        let spec = JobSpec::from_row(&self.row, &cfg.batch, &cfg.safety)?;
        let p = self.prepare(spec, &cfg).await?;
        let Some(upper) = p.upper.clone() else {
            // The empty range is frozen with the bound: an approved dry run changes nothing,
            // as its plan said, even if rows arrive before the approval.
            if p.spec.mode == Mode::DryRun {
                if self.row.plan.is_none() {
                    tracing::info!(
                        "key range is empty: planned 0 rows; approve with `backfilld execute`"
                    );
                    self.store_plan(&Plan::of_empty_range()).await?;
                }
                return Ok(Outcome::Planned);
            }
            tracing::info!("key range is empty; nothing to do");
            self.store(RowUpdate {
                remaining: Some(0),
                estimated_total: Some(0),
                ..Default::default()
            })
            .await?;
            return Ok(Outcome::Succeeded);
        };
        let plan = match &self.row.plan {
            Some(stored) => Plan::from_stored(stored).map_err(|e| {
                JobError::invalid(
                    &self.row.name,
                    format!("the stored plan is unreadable ({e}); set plan = NULL to plan again"),
                )
            })?,
            None => match self.plan(&p, &upper, &cfg).await? {
                Some(plan) => plan,
                None => return Ok(self.interruption()),
            },
        };
        // A plan stored by an earlier attempt (a resume, an approved dry run) is of the table
        // that had the name then.
        p.drifted_since(&plan)?;
        // Before the dry run ends too: a plan over the ceiling fails rather than waiting for an
        // approval that could only fail.
        self.check_ceiling(&p, &plan)?;
        if p.spec.mode == Mode::DryRun {
            tracing::info!(
                rows_matching = plan.rows_matching,
                "dry run planned; approve with `backfilld execute`"
            );
            return Ok(Outcome::Planned);
        }
        let change = self.build_change(&p).await?;
        if let Some(outcome) = self.run_slices(&p, &change, &upper, &plan).await? {
            return Ok(outcome);
        }
        // A walk whose last windows came up empty wrote no checkpoint to compare: policies
        // hiding the remaining rows from here on ended it as if they were done.
        self.still_as_planned(&p).await?;
        self.verify(&p, &upper).await
    }

    /// Writes the given columns, fenced, and mirrors them into the in-memory row.
    pub(super) async fn store(&mut self, u: RowUpdate) -> Result<(), JobError> {
        let stored = claim::store(&self.ctx.pool, &self.ctx.names, &self.lease, &u)
            .await
            .map_err(self.err("updating the job row"))?;
        if !stored {
            return Err(self.lease_lost());
        }
        let row = &mut self.row;
        row.upper_bound = u.upper_bound.or(row.upper_bound.take());
        row.estimated_total = u.estimated_total.or(row.estimated_total);
        row.plan = u.plan.or(row.plan.take());
        row.archive_table = u.archive_table.or(row.archive_table.take());
        row.remaining = u.remaining.or(row.remaining);
        row.slices = u.slices.or(row.slices.take());
        Ok(())
    }

    /// `TableReplaced` or `TableAltered` when what the job planned on changed (`pin`).
    async fn still_as_planned(&self, p: &Prepared) -> Result<(), JobError> {
        let mut conn = self.connection().await?;
        let found = p.pinned.found(&mut *conn).await;
        let drift = match found {
            Ok(found) => p.pinned.check(&mut conn, &found).await,
            Err(e) => Err(e),
        };
        let drift = drift.map_err(self.err("reading what the job planned on"))?;
        self.hand_back(conn).await?;
        match drift {
            Some(drift) => Err(drift.error(&p.spec.name, &p.named)),
            None => Ok(()),
        }
    }

    /// Counts rows up to the bound that still match the predicate into `remaining`.
    async fn verify(&mut self, p: &Prepared, upper: &Key) -> Result<Outcome, JobError> {
        if p.spec.action == Action::Revert {
            return Ok(Outcome::Succeeded);
        }
        // The throttle as configured now: a SIGHUP during the batches applies here too.
        let throttle = self.throttle(p);
        let counter = self.counter(p, upper, &p.fragments.predicate, &throttle);
        let Some(remaining) = counter.count_matching().await? else {
            return Ok(self.interruption());
        };
        self.store(RowUpdate {
            remaining: Some(remaining),
            ..Default::default()
        })
        .await?;
        tracing::info!(remaining, "verified");
        Ok(Outcome::Succeeded)
    }

    /// The job's throttle under the current configuration (SIGHUP may have changed defaults).
    /// With a rate cap and parallel slices, each slice's window holds at most its share of one
    /// second's rows: the slices' first batches (and those after a stall) run at once, and had
    /// changed a whole second's rows each, three times the cap in that second with three.
    pub(super) fn throttle(&self, p: &Prepared) -> Throttle {
        let cfg = self.ctx.config();
        let t =
            Throttle::from_row(&self.row, &cfg.batch).unwrap_or_else(|_| p.spec.throttle.clone());
        t.shared_by(self.slice_count.load(Ordering::Relaxed))
    }

    /// Writes how the attempt ended and updates metrics; returns the state written, `None` when
    /// nothing was (lease lost, or the write failed).
    pub(super) async fn finish(&self, result: Result<Outcome, JobError>) -> Option<String> {
        if let Err(e @ JobError::LeaseLost { .. }) = &result {
            self.count_error(e);
        }
        let Some(release) = self.release_for(result) else {
            self.ctx.metrics.leases_lost.inc();
            tracing::warn!(
                "lease lost; another replica owns the job now; stopping without writing"
            );
            return None;
        };
        let max_attempts = self.ctx.config().worker.max_attempts;
        for tries in 1..=3 {
            let names = &self.ctx.names;
            match claim::release(&self.ctx.pool, names, &self.lease, &release, max_attempts).await {
                Ok(Some(state)) => {
                    let finished = State::FINISHED.iter().any(|f| *f == state.as_str());
                    if finished {
                        self.ctx.forget_tallies(self.row.id);
                    }
                    if state == "planned" || finished {
                        self.ctx.metrics.job_finished(&self.row.name);
                    }
                    let waited = *self.longest_wait.lock().unwrap_or_else(|e| e.into_inner());
                    tracing::info!(
                        state = %state,
                        held_seconds = %self.held_summary(),
                        longest_wait_behind_a_batch_ms = waited.as_millis() as u64,
                        "attempt finished"
                    );
                    return Some(state);
                }
                Ok(None) => {
                    self.ctx.metrics.leases_lost.inc();
                    tracing::warn!("lease lost before the final state could be written");
                    return None;
                }
                Err(e) if tries < 3 => {
                    tracing::warn!(error = %e, "writing the final state failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "writing the final state failed; the lease will expire and the job be rescued")
                }
            }
        }
        None
    }

    /// How the attempt's ending is written; `None` when the lease is lost (nothing is written).
    fn release_for(&self, result: Result<Outcome, JobError>) -> Option<Release> {
        Some(match result {
            Ok(Outcome::LeaseLost) | Err(JobError::LeaseLost { .. }) => return None,
            Ok(Outcome::Succeeded) => Release::Succeeded,
            Ok(Outcome::Planned) => Release::Planned,
            Ok(Outcome::Paused) => Release::Paused,
            Ok(Outcome::Cancelled) => Release::Cancelled,
            Ok(Outcome::Shutdown) | Ok(Outcome::Stopped) => Release::Requeue,
            Err(e) => self.release_after_error(&e),
        })
    }

    /// `backfilld_batch_errors_total{job, kind}` for the error that ended the attempt.
    fn count_error(&self, e: &JobError) {
        let job_and_kind = [self.row.name.as_str(), e.kind()];
        self.ctx
            .metrics
            .batch_errors
            .with_label_values(&job_and_kind)
            .inc();
    }

    /// A transient error that outlived its retries is retried later as a new attempt; any other
    /// fails the job.
    fn release_after_error(&self, e: &JobError) -> Release {
        self.count_error(e);
        if e.is_retryable() {
            match e {
                JobError::TableChanged { .. } => {
                    tracing::warn!(error = %e, "the table changed; the next attempt follows it")
                }
                _ => tracing::warn!(error = %e, "attempt gave up after repeated transient errors"),
            }
            Release::Retry {
                delay: backoff(self.lease.attempt as u32 + 3, BACKOFF_BASE),
                error: e.to_string(),
            }
        } else {
            tracing::error!(error = %e, sqlstate = e.sqlstate(), "job failed");
            Release::Failed {
                error: e.to_string(),
            }
        }
    }
}
