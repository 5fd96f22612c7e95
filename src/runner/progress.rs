//! Progress of an attempt: rows and batches into metrics, share done and time left.

use super::*;

impl Attempt<'_> {
    pub(super) fn record(
        &self,
        done: &Committed,
        size: i64,
        progress: &std::sync::Mutex<Progress>,
    ) {
        // A poisoned lock only means another slice panicked mid-update of plain numbers.
        let mut progress = progress.lock().unwrap_or_else(|e| e.into_inner());
        let m = &self.ctx.metrics;
        let job = [self.row.name.as_str()];
        m.rows_changed
            .with_label_values(&job)
            .inc_by(done.changed as u64);
        m.rows_scanned
            .with_label_values(&job)
            .inc_by(done.scanned as u64);
        m.batch_duration
            .with_label_values(&job)
            .observe(done.elapsed.as_secs_f64());
        m.batch_size.with_label_values(&job).set(size);
        m.last_batch
            .with_label_values(&job)
            .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        progress.advance(done.scanned);
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

/// Progress and ETA from keys scanned against the planned total.
pub(super) struct Progress {
    scanned: i64,
    total: Option<i64>,
    started: Instant,
    scanned_this_attempt: i64,
}

impl Progress {
    pub(super) fn new(row: &JobRow) -> Self {
        Self {
            scanned: row.rows_scanned,
            total: row.estimated_total,
            started: Instant::now(),
            scanned_this_attempt: 0,
        }
    }

    fn advance(&mut self, scanned: i64) {
        self.scanned += scanned;
        self.scanned_this_attempt += scanned;
    }

    fn ratio(&self) -> Option<f64> {
        let total = self.total.filter(|t| *t > 0)?;
        Some((self.scanned as f64 / total as f64).min(1.0))
    }

    fn eta(&self) -> Option<f64> {
        let total = self.total?;
        let rate =
            self.scanned_this_attempt as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        (rate > 0.0).then(|| (total - self.scanned).max(0) as f64 / rate)
    }
}
