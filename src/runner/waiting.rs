//! Waiting and backing off: pauses between batches, health signals, the bloat guard's VACUUM,
//! back-off after errors and impact, and the time held back per reason.

use super::*;

impl Attempt<'_> {
    /// The job's bloat guard for this attempt; says once when the role may not VACUUM.
    pub(super) async fn bloat_guard(&self, p: &Prepared) -> BloatGuard {
        let cfg = self.ctx.config();
        let rows = self.row.estimated_total.unwrap_or(0);
        let wanted = p.spec.throttle.preset.is_gentle();
        let allowed = self
            .ctx
            .metrics
            .bloat_guard_allowed
            .with_label_values(&[&self.row.name]);
        let guard = BloatGuard::new(&self.ctx.pool, &cfg.bloat, wanted, p.written(), rows)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "bloat guard: cannot check VACUUM privilege; guard off");
                BloatGuard::without(Standing::Unchecked)
            });
        if self.row.rows_changed > 0 {
            guard.note_earlier_changes();
        }
        match guard.standing() {
            Standing::Active { .. } => allowed.set(1),
            Standing::NotPermitted => {
                allowed.set(0);
                tracing::warn!(
                    table = %p.written().display(),
                    role = guard.role(),
                    "bloat guard: this role may not VACUUM the target (it needs to own the table, \
                     or MAINTAIN on PostgreSQL 17+); relying on autovacuum, batches hold while \
                     dead tuples exceed throttle.max_dead_tuple_ratio"
                );
            }
            Standing::NoSession => {
                allowed.set(0);
                tracing::warn!(
                    table = %p.written().display(),
                    "bloat guard: VACUUM cannot run through a transaction pooler and \
                     database.direct_url is not set; relying on autovacuum, batches hold while \
                     dead tuples exceed throttle.max_dead_tuple_ratio"
                );
            }
            Standing::Off | Standing::Disabled | Standing::Unchecked => {}
        }
        guard
    }

    /// Counts a batch's waiting sessions; with `back_off_when_blocking` the next batch shrinks
    /// and the impact is returned for the pause to lengthen, else a quiet impact.
    pub(super) fn note_impact(
        &self,
        impact: Impact,
        cfg: &Config,
        controller: &mut Controller,
    ) -> Impact {
        if impact.blocked == 0 {
            return impact;
        }
        let mut longest = self.longest_wait.lock().unwrap_or_else(|e| e.into_inner());
        *longest = (*longest).max(impact.longest_wait);
        self.ctx
            .metrics
            .sessions_blocked
            .with_label_values(&[&self.row.name])
            .inc_by(impact.blocked as u64);
        tracing::debug!(
            blocked = impact.blocked,
            longest_wait_ms = impact.longest_wait.as_millis() as u64,
            "batch made other sessions wait on its row locks"
        );
        if !cfg.throttle.back_off_when_blocking {
            return Impact::default();
        }
        // Fewer rows locked by the next batch: fewer sessions behind it, and shorter waits.
        controller.back_off();
        impact
    }

    /// The bloat guard's VACUUM of `target`, counted in the vacuums metric; `None` when it
    /// failed. A failure is logged and skipped: reclaiming space is worth a retry at the next
    /// interval (or a revert restoring without it), not a failed job.
    pub(super) async fn vacuum(
        &self,
        target: &Target,
        guard: &BloatGuard,
        pass: Pass,
        wake: &CancellationToken,
    ) -> Option<Duration> {
        let job = [self.row.name.as_str()];
        tracing::debug!(?pass, "bloat guard: vacuuming the target");
        match guard
            .vacuum(&self.ctx.pool, &self.row.name, target, pass, wake)
            .await
        {
            Ok(Some(took)) => {
                self.ctx.metrics.vacuums.with_label_values(&job).inc();
                tracing::debug!(
                    ms = took.as_millis() as u64,
                    ?pass,
                    "bloat guard: vacuumed the target"
                );
                Some(took)
            }
            Ok(None) => {
                tracing::warn!(
                    ?pass,
                    table = %target.display(),
                    "bloat guard: PostgreSQL skipped the VACUUM (another session holds a \
                     conflicting lock on the table: autovacuum, ANALYZE, an index build); \
                     trying again after half an interval"
                );
                None
            }
            Err(e) if wake.is_cancelled() => {
                tracing::info!(error = %e, "bloat guard: VACUUM cancelled: the attempt is stopping");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, ?pass, "bloat guard: VACUUM failed; going on without it");
                None
            }
        }
    }

    /// The guard's VACUUM that the job waits for (between batches, or the final one), counted as
    /// time held for it.
    pub(super) async fn vacuum_held(
        &self,
        p: &Prepared,
        guard: &BloatGuard,
        pass: Pass,
        wake: &CancellationToken,
    ) {
        if let Some(took) = self.vacuum(p.written(), guard, pass, wake).await {
            self.hold_time(Reason::Vacuum, took);
        }
    }

    /// Counts a transient error and waits out its exponential backoff (unless woken).
    pub(super) async fn back_off(
        &self,
        e: &JobError,
        retry: u32,
        base: Duration,
        wake: &CancellationToken,
    ) -> Option<Outcome> {
        self.ctx
            .metrics
            .batch_errors
            .with_label_values(&[&self.row.name, e.kind()])
            .inc();
        self.pause(backoff(retry, base), Reason::Backoff, wake)
            .await
    }

    /// Holds batches while a health signal is over its limit, counting the time per reason.
    pub(super) async fn wait_until_healthy(
        &self,
        health: &mut Health,
        table_oid: u32,
        stop: &CancellationToken,
    ) -> Option<Outcome> {
        loop {
            let cfg = self.ctx.config();
            let reason = health
                .check(&self.ctx.pool, &cfg.throttle, table_oid)
                .await?;
            tracing::info!(
                reason = reason.as_str(),
                reading = health.reading(),
                "holding batches: database health signal over its limit"
            );
            if let Some(outcome) = self.pause(cfg.throttle.check_interval, reason, stop).await {
                return Some(outcome);
            }
        }
    }

    /// Sleeps unless interrupted; the time counts toward the throttle metric.
    /// Sleeps unless `wake` (the attempt's interrupt, or a slice's stop) fires first, or the
    /// configuration is reloaded.
    pub(super) async fn pause(
        &self,
        duration: Duration,
        reason: Reason,
        wake: &CancellationToken,
    ) -> Option<Outcome> {
        if duration.is_zero() {
            return None;
        }
        let started = Instant::now();
        // A reloaded configuration (SIGHUP) ends the pause too: the next batch re-reads the
        // throttle, so a shortened sleep applies at once rather than after the old one.
        let mut config = self.ctx.config.clone();
        // A clone inherits the shared receiver's "seen" version, which is never advanced; mark the
        // current configuration seen so only a reload during this pause wakes it.
        config.borrow_and_update();
        tokio::select! {
            _ = wake.cancelled() => {}
            _ = config.changed() => {}
            _ = tokio::time::sleep(duration) => {}
        }
        self.hold_time(reason, started.elapsed());
        // `wake` may be a slice's own stop (a sibling ended) rather than the attempt's
        // interrupt: a caller that loops on holds must see it, or it spins without pausing.
        self.interrupted()
            .or_else(|| wake.is_cancelled().then_some(Outcome::Stopped))
    }

    /// Counts time held back (paused, vacuuming) under its reason: the metric and this
    /// attempt's tally.
    fn hold_time(&self, reason: Reason, took: Duration) {
        let secs = took.as_secs_f64();
        self.ctx
            .metrics
            .throttled(&self.row.name, reason.as_str(), secs);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        *held.entry(reason.as_str()).or_default() += secs;
    }

    /// `sleep=12.3 vacuum=4.5`: where this attempt's time between batches went.
    pub(super) fn held_summary(&self) -> String {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let parts: Vec<String> = held.iter().map(|(k, v)| format!("{k}={v:.1}")).collect();
        parts.join(" ")
    }

    pub(super) fn interrupted(&self) -> Option<Outcome> {
        if self.shutdown.is_cancelled() {
            return Some(Outcome::Shutdown);
        }
        match *self.control.borrow() {
            Control::Run => None,
            Control::Pause => Some(Outcome::Paused),
            Control::Cancel => Some(Outcome::Cancelled),
            Control::LeaseLost => Some(Outcome::LeaseLost),
        }
    }

    pub(super) fn interruption(&self) -> Outcome {
        self.interrupted().unwrap_or(Outcome::Shutdown)
    }
}

/// Exponential backoff with jitter, capped at 30 s.
pub(super) fn backoff(retry: u32, base: Duration) -> Duration {
    let base = (base.as_millis() as u64).saturating_mul(1 << retry.min(9));
    let capped = base.min(30_000);
    Duration::from_millis(capped / 2 + fastrand::u64(0..=capped / 2))
}

/// The first step of the backoff after a transient error.
pub(super) const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// A batch cut off at its ceiling was too big for the moment: the halved size is the remedy, so
/// its backoff starts at the ceiling (when shorter), not at 100 ms.
pub(super) fn retry_base(e: &JobError, throttle: &Throttle) -> Duration {
    match e.kind() {
        "statement_timeout" => {
            Duration::from_millis(throttle.max_batch_ms as u64).min(BACKOFF_BASE)
        }
        _ => BACKOFF_BASE,
    }
}

/// The per-slice controls `settle` adjusts after each batch.
pub(super) struct Pacing<'a> {
    pub(super) controller: &'a mut Controller,
    pub(super) load: &'a mut Load,
}
