//! The batch loop of one slice: next window, retry on transient errors, settle between batches,
//! and the checkpointed cursor it resumes from.

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;

use super::*;

/// What a slice's walk starts from: the throttle its controller was made with, the shared
/// progress, the bloat guard and the slice's stop token.
type WalkContext<'a> = (
    &'a Throttle,
    &'a std::sync::Mutex<Progress>,
    &'a BloatGuard,
    &'a CancellationToken,
);

/// What one slice's batch loop carries from one batch to the next.
struct Walk {
    cursor: Option<Key>,
    controller: Controller,
    load: Load,
    retries: u32,
    tally: Tally,
}

impl Attempt<'_> {
    /// The batch loop. `Ok(None)` when the slice's key range is exhausted.
    pub(super) async fn batch_loop(
        &self,
        p: &Prepared,
        change: &Change,
        slice: &Slice,
        progress: &std::sync::Mutex<Progress>,
        guard: &BloatGuard,
        stop: &CancellationToken,
    ) -> Result<Option<Outcome>, JobError> {
        let throttle = self.throttle(p);
        // What this process counted of the slice in earlier attempts: batches a crash lost
        // after they were counted are credited when this attempt starts before them.
        let key = (self.row.id, slice.slot);
        let mut tally = self.ctx.tallies().remove(&key).unwrap_or_default();
        tally.resume_at(slice.cursor.as_ref().map(Key::to_json).as_ref());
        let mut walk = Walk {
            cursor: slice.cursor.clone(),
            controller: Controller::new(&throttle, self.row.batch_size_current.map(i64::from)),
            load: Load::default(),
            retries: 0,
            tally,
        };
        let ended = self
            .walk(
                p,
                change,
                slice,
                (&throttle, progress, guard, stop),
                &mut walk,
            )
            .await;
        self.ctx.tallies().insert(key, walk.tally);
        ended
    }

    /// The batches of one slice's walk, from `walk`'s cursor.
    async fn walk(
        &self,
        p: &Prepared,
        change: &Change,
        slice: &Slice,
        (throttle, progress, guard, stop): WalkContext<'_>,
        walk: &mut Walk,
    ) -> Result<Option<Outcome>, JobError> {
        let mut cfg = self.ctx.config();
        let mut batcher = self.batcher(p, change, slice, throttle, &cfg);
        let mut health = Health::new(guard.relies_on_autovacuum());
        loop {
            if let Some(outcome) = self.ready(p, &mut health, stop).await {
                return Ok(Some(outcome));
            }
            let now = self.ctx.config();
            if !Arc::ptr_eq(&now, &cfg) {
                // SIGHUP: the batches' sizes, target, ceiling and timeouts apply from this one.
                cfg = now;
                let throttle = self.throttle(p);
                walk.controller.retune(&throttle);
                batcher = self.batcher(p, change, slice, &throttle, &cfg);
            }
            let size = walk.controller.size();
            let next = match batcher.run(walk.cursor.as_ref(), size).await {
                Ok(None) => return Ok(None),
                Ok(Some(done)) => {
                    let ctx = (p, guard, stop);
                    self.committed(ctx, &done, size, walk, progress).await
                }
                Err(e)
                    if e.is_retried_in_place() && walk.retries < cfg.worker.max_batch_retries =>
                {
                    let next = self.retry(p, &e, slice, walk, stop).await?;
                    self.settle_doubt(&batcher, walk, progress);
                    self.record_stall(walk.controller.size(), progress);
                    next
                }
                Err(e) => {
                    if e.is_retryable() {
                        self.batches_gave_up.store(true, Ordering::Relaxed);
                    }
                    return Err(timeout_hint(e, &batcher, walk.retries, size));
                }
            };
            if let ControlFlow::Break(end) = next {
                return Ok(end);
            }
        }
    }

    /// Whether the next batch may run: not interrupted, not stopped by a sibling, and the health
    /// signals allow it (waiting while they do not).
    async fn ready(
        &self,
        p: &Prepared,
        health: &mut Health,
        stop: &CancellationToken,
    ) -> Option<Outcome> {
        if let Some(outcome) = self.interrupted() {
            return Some(outcome);
        }
        if stop.is_cancelled() {
            return Some(Outcome::Stopped);
        }
        self.wait_until_healthy(health, p.written().oid, stop).await
    }

    /// After a committed batch: progress, the controller, the operator's request, then the pause.
    /// `Break(None)` when the window came back short: the slice is done.
    async fn committed(
        &self,
        (p, guard, stop): (&Prepared, &BloatGuard, &CancellationToken),
        done: &Committed,
        size: i64,
        walk: &mut Walk,
        progress: &std::sync::Mutex<Progress>,
    ) -> ControlFlow<Option<Outcome>> {
        walk.retries = 0;
        let counts = walk.tally.absorb(done);
        self.record(done, counts, size, progress);
        let full = done.scanned >= size;
        if full {
            walk.controller.observe(done.elapsed);
        }
        walk.cursor = Some(done.last.clone());
        match done.control {
            Control::Pause => return ControlFlow::Break(Some(Outcome::Paused)),
            Control::Cancel => return ControlFlow::Break(Some(Outcome::Cancelled)),
            _ => {}
        }
        // A window short of its size has reached the slice's end: nothing to pause for.
        if !full {
            return ControlFlow::Break(None);
        }
        let pacing = Pacing {
            controller: &mut walk.controller,
            load: &mut walk.load,
        };
        match self.settle(p, done, pacing, guard, stop).await {
            Some(outcome) => ControlFlow::Break(Some(outcome)),
            None => ControlFlow::Continue(()),
        }
    }

    /// After a transient batch error: smaller batches, a back-off, and the cursor as committed
    /// (the failed commit may or may not have landed).
    async fn retry(
        &self,
        p: &Prepared,
        e: &JobError,
        slice: &Slice,
        walk: &mut Walk,
        stop: &CancellationToken,
    ) -> Result<ControlFlow<Option<Outcome>>, JobError> {
        walk.retries += 1;
        match e.sqlstate() {
            Some("57014") => walk.controller.timed_out(),
            _ => walk.controller.back_off(),
        }
        tracing::warn!(error = %e, retry = walk.retries, batch_size = walk.controller.size(), "transient batch error; retrying");
        let base = retry_base(e, &self.throttle(p));
        if let Some(outcome) = self.back_off(e, walk.retries, base, stop).await {
            return Ok(ControlFlow::Break(Some(outcome)));
        }
        walk.cursor = self.reload_cursor(p.keyset.width(), slice.slot).await?;
        Ok(ControlFlow::Continue(()))
    }

    /// After a retry reloaded the stored cursor: a batch whose COMMIT went unacknowledged is
    /// counted when the cursor shows it landed (it had never reached the metrics), and batches
    /// a crash lost after they were counted are credited, so their redo does not count them
    /// twice. The loss shows as a `CheckpointMoved`, or, after a connection error, only as the
    /// reloaded cursor being behind the last batch counted.
    fn settle_doubt(
        &self,
        batcher: &Batcher<'_>,
        walk: &mut Walk,
        progress: &std::sync::Mutex<Progress>,
    ) {
        let stored = walk.cursor.as_ref().map(Key::to_json);
        if let Some(done) = batcher.take_in_doubt()
            && stored == Some(done.last.to_json())
        {
            let counts = walk.tally.absorb(&done);
            self.record(&done, counts, walk.controller.size(), progress);
        }
        walk.tally.resume_at(stored.as_ref());
    }

    /// The batch runner of one slice, with the configuration and throttle given.
    pub(super) fn batcher<'b>(
        &'b self,
        p: &'b Prepared,
        change: &'b Change,
        slice: &'b Slice,
        throttle: &Throttle,
        cfg: &Config,
    ) -> Batcher<'b> {
        let max_batch = Duration::from_millis(throttle.max_batch_ms as u64);
        Batcher {
            pool: &self.ctx.pool,
            names: &self.ctx.names,
            lease: &self.lease,
            table: &p.named,
            keyset: &p.keyset,
            change,
            pinned: &p.pinned,
            upper: &slice.upper,
            settings: TxSettings::capped(
                cfg.batch.lock_timeout,
                cfg.batch.statement_timeout,
                max_batch,
                cfg.batch.synchronous_commit.clone(),
                self.lease.ttl,
            ),
            lease_ttl: self.lease.ttl,
            max_affected: p.spec.max_affected,
            window: WindowSql::new(&p.keyset),
            slot: slice.slot,
            in_doubt: Default::default(),
        }
    }

    /// Between two batches: reacts to the batch's impact on other sessions and on the server,
    /// pauses, and runs the bloat guard when it is due.
    async fn settle(
        &self,
        p: &Prepared,
        done: &Committed,
        pacing: Pacing<'_>,
        guard: &BloatGuard,
        stop: &CancellationToken,
    ) -> Option<Outcome> {
        let cfg = self.ctx.config();
        let throttle = self.throttle(p);
        let impact = self.note_impact(done.impact, &cfg, pacing.controller);
        let load = pacing.load.observe(done.writing, done.scanned);
        // The fast preset does not yield to a busier server.
        let max_load = if throttle.preset.is_gentle() {
            cfg.throttle.max_load_factor
        } else {
            0.0
        };
        let now = std::time::Instant::now();
        let rate = throttle.max_rows_per_second;
        let rate_wait = self.rate.wait(rate, done.changed, now - done.elapsed, now);
        for (pause, reason) in
            throttle::pauses(&throttle, rate_wait, done.elapsed, impact, load, max_load)
        {
            if let Some(outcome) = self.pause(pause, reason, stop).await {
                return Some(outcome);
            }
        }
        if guard.record(done.changed) {
            self.vacuum_held(p, guard, Pass::Between, stop).await;
        }
        self.interrupted()
    }

    pub(super) fn stored_cursor(&self, width: usize) -> Result<Option<Key>, JobError> {
        self.parse_cursor(self.row.cursor.as_ref(), width)
    }

    fn parse_cursor(&self, cursor: Option<&Value>, width: usize) -> Result<Option<Key>, JobError> {
        match cursor {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Key::from_json(v, width).map(Some).ok_or_else(|| {
                JobError::invalid(
                    &self.row.name,
                    format!("stored cursor {v} does not fit the key columns"),
                )
            }),
        }
    }

    async fn reload_cursor(
        &self,
        width: usize,
        slot: Option<usize>,
    ) -> Result<Option<Key>, JobError> {
        let cursor = claim::stored_cursor(&self.ctx.pool, &self.ctx.names, &self.lease, slot)
            .await
            .map_err(self.err("re-reading the checkpoint"))?
            .ok_or_else(|| self.lease_lost())?;
        self.parse_cursor(cursor.as_ref(), width)
    }
}

/// A batch that still timed out after its retries: say which limit it ran into and what to
/// change, since "canceling statement due to statement timeout" names neither.
fn timeout_hint(e: JobError, batcher: &Batcher<'_>, retries: u32, size: i64) -> JobError {
    if e.sqlstate() != Some("57014") {
        return e;
    }
    let limit = batcher.settings.statement_timeout.as_millis();
    e.hint(format!(
        "each batch must finish within {limit} ms (the smaller of the job's max_batch_ms and \
         batch.statement_timeout), and {retries} retries at halved sizes, the last of {size} \
         keys, did not: raise the job's max_batch_ms, or look for what makes its rows slow to \
         change (triggers, large rows, foreign key checks)"
    ))
}

/// Rows of a slice's batches this process counted into the metrics, the most recent kept to
/// settle lost commits against (`resume_at`), and rows credited for batches a crash lost after
/// they were counted (their redo is not counted again). Kept across attempts (`Context`).
#[derive(Debug, Default)]
pub struct Tally {
    /// Each counted batch: its last key and its rows changed and scanned.
    counted: std::collections::VecDeque<(serde_json::Value, i64, i64)>,
    credit: (i64, i64),
}

/// How many counted batches a slice remembers: a lost asynchronous commit loses the last few.
const TALLIED: usize = 1024;

impl Tally {
    /// Counts a committed batch; returns its rows changed and scanned less any credit.
    fn absorb(&mut self, done: &Committed) -> (i64, i64) {
        if self.counted.len() == TALLIED {
            self.counted.pop_front();
        }
        self.counted
            .push_back((done.last.to_json(), done.changed, done.scanned));
        let changed = done.changed.min(self.credit.0);
        let scanned = done.scanned.min(self.credit.1);
        self.credit = (self.credit.0 - changed, self.credit.1 - scanned);
        (done.changed - changed, done.scanned - scanned)
    }

    /// The stored checkpoint is at `stored`: when that is a batch boundary counted before the
    /// last one, the batches counted after it were lost, and their rows are credited. A cursor
    /// this slice did not count up to (the walk's start, another replica's progress) credits
    /// nothing.
    fn resume_at(&mut self, stored: Option<&serde_json::Value>) {
        let Some(at) = self
            .counted
            .iter()
            .rposition(|(hi, _, _)| Some(hi) == stored)
        else {
            return;
        };
        for (_, changed, scanned) in self.counted.drain(at + 1..) {
            self.credit = (self.credit.0 + changed, self.credit.1 + scanned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(last: i64, rows: i64) -> Committed {
        Committed {
            scanned: rows,
            changed: rows,
            skipped: 0,
            last: Key(vec![last.to_string()]),
            elapsed: Duration::from_millis(5),
            writing: Duration::from_millis(4),
            control: Control::Run,
            impact: Default::default(),
        }
    }

    fn json(last: i64) -> serde_json::Value {
        Key(vec![last.to_string()]).to_json()
    }

    #[test]
    fn batches_lost_after_they_were_counted_are_not_counted_again() {
        let mut t = Tally::default();
        for last in [100, 200, 300] {
            assert_eq!(t.absorb(&batch(last, 100)), (100, 100));
        }
        // The checkpoint is back at 100: the batches up to 200 and 300 were lost.
        t.resume_at(Some(&json(100)));
        assert_eq!(t.absorb(&batch(250, 150)), (0, 0), "redone, counted before");
        assert_eq!(t.absorb(&batch(300, 50)), (0, 0));
        assert_eq!(
            t.absorb(&batch(400, 100)),
            (100, 100),
            "new rows count again"
        );
        // At the last batch counted: nothing lost.
        t.resume_at(Some(&json(400)));
        assert_eq!(t.absorb(&batch(500, 100)), (100, 100));
        // A cursor that is no batch boundary this slice counted credits nothing.
        let mut u = Tally::default();
        u.absorb(&batch(100, 100));
        u.resume_at(Some(&json(50)));
        u.resume_at(None);
        assert_eq!(u.absorb(&batch(150, 100)), (100, 100));
    }
}
