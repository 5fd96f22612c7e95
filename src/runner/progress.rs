//! Progress of an attempt: rows and batches into metrics, share done and time left.

use super::*;

impl Attempt<'_> {
    /// A committed batch into the metrics and the progress, with `(changed, scanned)` its rows
    /// as counted (less rows a lost commit had counted before: see `batches::Tally`).
    pub(super) fn record(
        &self,
        done: &Committed,
        (changed, scanned): (i64, i64),
        size: i64,
        progress: &std::sync::Mutex<Progress>,
    ) {
        // A poisoned lock only means another slice panicked mid-update of plain numbers.
        let mut progress = progress.lock().unwrap_or_else(|e| e.into_inner());
        let m = &self.ctx.metrics;
        let job = [self.row.name.as_str()];
        m.rows_changed
            .with_label_values(&job)
            .inc_by(changed as u64);
        m.rows_scanned
            .with_label_values(&job)
            .inc_by(scanned as u64);
        m.batch_duration
            .with_label_values(&job)
            .observe(done.elapsed.as_secs_f64());
        m.batch_size.with_label_values(&job).set(size);
        m.last_batch
            .with_label_values(&job)
            .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        progress.advance(scanned);
        if let Some(ratio) = progress.ratio() {
            m.progress.with_label_values(&job).set(ratio);
        }
        if let Some(eta) = progress.eta() {
            m.eta.with_label_values(&job).set(eta);
        }
        tracing::debug!(
            scanned = done.scanned,
            changed = done.changed,
            skipped = done.skipped,
            ms = done.elapsed.as_millis() as u64,
            size,
            "batch committed"
        );
    }
}

impl Attempt<'_> {
    /// After a failed batch: the batch size gauge shows the size the retry will use, and the ETA
    /// grows with the time the job makes no progress (both had held their values from the last
    /// committed batch through a stall).
    pub(super) fn record_stall(&self, size: i64, progress: &std::sync::Mutex<Progress>) {
        let progress = progress.lock().unwrap_or_else(|e| e.into_inner());
        let m = &self.ctx.metrics;
        let job = [self.row.name.as_str()];
        m.batch_size.with_label_values(&job).set(size);
        if let Some(eta) = progress.eta() {
            m.eta.with_label_values(&job).set(eta);
        }
    }
}

/// Progress and ETA from keys scanned against the planned total.
pub(super) struct Progress {
    scanned: i64,
    total: Option<i64>,
    /// When this attempt's first batch committed, and the keys scanned then: the pace is taken
    /// from there, over whole cycles of batch and pause (from the attempt's start, the first
    /// batch alone had read as the pace, ten times too fast under a long pause).
    first: Option<(Instant, i64)>,
    scanned_this_attempt: i64,
}

impl Progress {
    pub(super) fn new(row: &JobRow) -> Self {
        Self {
            scanned: row.rows_scanned,
            total: row.estimated_total,
            first: None,
            scanned_this_attempt: 0,
        }
    }

    fn advance(&mut self, scanned: i64) {
        self.scanned += scanned;
        self.scanned_this_attempt += scanned;
        if self.first.is_none() {
            self.first = Some((Instant::now(), self.scanned_this_attempt));
        }
    }

    fn ratio(&self) -> Option<f64> {
        let total = self.total.filter(|t| *t > 0)?;
        Some((self.scanned as f64 / total as f64).min(1.0))
    }

    /// Seconds left at the pace since the first batch; none before a second batch commits.
    fn eta(&self) -> Option<f64> {
        let total = self.total?;
        let (since, at_first) = self.first?;
        let keys = self.scanned_this_attempt - at_first;
        let rate = keys as f64 / since.elapsed().as_secs_f64().max(0.001);
        (rate > 0.0).then(|| (total - self.scanned).max(0) as f64 / rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(total: i64) -> Progress {
        Progress {
            scanned: 0,
            total: Some(total),
            first: None,
            scanned_this_attempt: 0,
        }
    }

    #[test]
    fn the_eta_waits_for_a_second_batch_and_counts_the_pause() {
        let mut p = progress(10_000);
        p.advance(1000);
        assert_eq!(
            p.eta(),
            None,
            "one batch says nothing of the pause after it"
        );
        // A second batch after a pause of 50 ms: 1,000 keys in 50 ms or more.
        std::thread::sleep(Duration::from_millis(50));
        p.advance(1000);
        let eta = p.eta().expect("an estimate");
        assert!(
            eta >= 0.4 - 1e-9,
            "8,000 keys left at most 20,000 a second: {eta}"
        );
        // A stall: no progress, and the estimate grows with the time.
        std::thread::sleep(Duration::from_millis(50));
        assert!(p.eta().expect("still an estimate") > eta);
        assert_eq!(p.ratio(), Some(0.2));
    }
}
