//! Throttling between batches: the adaptive batch size, the pause after each batch (minimum
//! sleep and rows-per-second cap), and health signals that hold batches back entirely.

use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::config::ThrottleConfig;
use crate::job::Throttle;

/// Moves the batch size toward `target_batch_ms`: grows gently (at most ×1.5 a batch), shrinks
/// fast (in proportion, at least halving on a timeout or transient error), within min/max.
#[derive(Debug, Clone)]
pub struct Controller {
    size: i64,
    min: i64,
    max: i64,
    target: Duration,
}

const MAX_GROWTH: f64 = 1.5;

impl Controller {
    pub fn new(t: &Throttle, resume_at: Option<i64>) -> Self {
        let size = resume_at
            .unwrap_or(t.initial_size)
            .clamp(t.min_size, t.max_size);
        Self {
            size,
            min: t.min_size,
            max: t.max_size,
            target: Duration::from_millis(t.target_batch_ms as u64),
        }
    }

    pub fn size(&self) -> i64 {
        self.size
    }

    /// Adapts after a batch that scanned a full window in `elapsed`.
    pub fn observe(&mut self, elapsed: Duration) {
        let elapsed = elapsed.max(Duration::from_millis(1));
        let ratio = self.target.as_secs_f64() / elapsed.as_secs_f64();
        let factor = if ratio >= 1.0 {
            // Within 10% of the target is close enough: hold steady.
            if ratio < 1.1 {
                1.0
            } else {
                ratio.min(MAX_GROWTH)
            }
        } else {
            ratio.max(0.1)
        };
        self.set((self.size as f64 * factor).round() as i64);
    }

    /// A statement timeout or other transient failure: halve.
    pub fn back_off(&mut self) {
        self.set(self.size / 2);
    }

    fn set(&mut self, size: i64) {
        self.size = size.clamp(self.min, self.max);
    }
}

/// Why batches are being held back; the `reason` label of `backfilld_throttle_seconds_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Sleep,
    RateLimit,
    ReplicaLag,
    LongTransaction,
    LockWaits,
    Autovacuum,
    DeadTuples,
    WalRate,
    Backoff,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Sleep => "sleep",
            Reason::RateLimit => "rate_limit",
            Reason::ReplicaLag => "replica_lag",
            Reason::LongTransaction => "long_transaction",
            Reason::LockWaits => "lock_waits",
            Reason::Autovacuum => "autovacuum",
            Reason::DeadTuples => "dead_tuples",
            Reason::WalRate => "wal_rate",
            Reason::Backoff => "backoff",
        }
    }
}

/// The pause after a batch: the job's minimum sleep, or longer when the rows-per-second cap
/// demands it (the batch's rows over the cap, minus the time the batch already took).
pub fn pause_after(t: &Throttle, rows: i64, elapsed: Duration) -> (Duration, Reason) {
    let sleep = Duration::from_millis(t.sleep_ms as u64);
    if t.max_rows_per_second > 0 && rows > 0 {
        let budget = Duration::from_secs_f64(rows as f64 / t.max_rows_per_second as f64);
        let rate_wait = budget.saturating_sub(elapsed);
        if rate_wait > sleep {
            return (rate_wait, Reason::RateLimit);
        }
    }
    (sleep, Reason::Sleep)
}

/// Samples the database's health signals at most once per `check_interval`.
#[derive(Debug)]
pub struct Health {
    last_check: Option<Instant>,
    last_wal: Option<(Instant, f64)>,
    verdict: Option<Reason>,
}

type Sample = (f64, f64, i64, i64, i64, f64);

const SAMPLE: &str = "
SELECT
    (SELECT coalesce(max(extract(epoch FROM replay_lag)), 0)::float8 FROM pg_stat_replication),
    (SELECT coalesce(max(extract(epoch FROM now() - xact_start)), 0)::float8
       FROM pg_stat_activity
      WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND backend_type = 'client backend'),
    (SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'),
    (SELECT count(*) FROM pg_stat_progress_vacuum WHERE relid = $1),
    (SELECT coalesce(max(n_dead_tup), 0) FROM pg_stat_all_tables WHERE relid = $1),
    (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8";

impl Health {
    pub fn new() -> Self {
        Self {
            last_check: None,
            last_wal: None,
            verdict: None,
        }
    }

    /// The first signal over its limit, if any. Sampling errors are logged and ignored: a
    /// monitoring view we may not read must not stop a backfill.
    pub async fn check(
        &mut self,
        pool: &PgPool,
        cfg: &ThrottleConfig,
        table_oid: u32,
    ) -> Option<Reason> {
        if !any_enabled(cfg) {
            return None;
        }
        if self
            .last_check
            .is_some_and(|t| t.elapsed() < cfg.check_interval)
        {
            return self.verdict;
        }
        self.last_check = Some(Instant::now());
        let sample: Sample = match sqlx::query_as(SAMPLE)
            .bind(sqlx::postgres::types::Oid(table_oid))
            .fetch_one(pool)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "health sample failed; not throttling on it");
                return None;
            }
        };
        self.verdict = self.judge(cfg, sample);
        self.verdict
    }

    fn judge(&mut self, cfg: &ThrottleConfig, s: Sample) -> Option<Reason> {
        let (lag, xact_age, lock_waiters, vacuums, dead, wal) = s;
        let wal_rate = self.wal_rate(wal);
        let over = |limit: Duration, value: f64| !limit.is_zero() && value > limit.as_secs_f64();
        if over(cfg.max_replica_lag, lag) {
            Some(Reason::ReplicaLag)
        } else if over(cfg.max_transaction_age, xact_age) {
            Some(Reason::LongTransaction)
        } else if cfg.max_lock_waiters > 0 && lock_waiters > cfg.max_lock_waiters {
            Some(Reason::LockWaits)
        } else if cfg.pause_during_autovacuum && vacuums > 0 {
            Some(Reason::Autovacuum)
        } else if cfg.max_dead_tuples > 0 && dead > cfg.max_dead_tuples {
            Some(Reason::DeadTuples)
        } else if cfg.max_wal_bytes_per_second > 0
            && wal_rate.is_some_and(|r| r > cfg.max_wal_bytes_per_second as f64)
        {
            Some(Reason::WalRate)
        } else {
            None
        }
    }

    fn wal_rate(&mut self, wal: f64) -> Option<f64> {
        let now = Instant::now();
        let rate = self.last_wal.and_then(|(t, prev)| {
            let secs = now.duration_since(t).as_secs_f64();
            (secs > 0.0).then(|| (wal - prev) / secs)
        });
        self.last_wal = Some((now, wal));
        rate
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

fn any_enabled(cfg: &ThrottleConfig) -> bool {
    !cfg.max_replica_lag.is_zero()
        || !cfg.max_transaction_age.is_zero()
        || cfg.max_lock_waiters > 0
        || cfg.pause_during_autovacuum
        || cfg.max_dead_tuples > 0
        || cfg.max_wal_bytes_per_second > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> Throttle {
        Throttle {
            initial_size: 1000,
            min_size: 100,
            max_size: 10_000,
            target_batch_ms: 500,
            sleep_ms: 50,
            max_rows_per_second: 0,
        }
    }

    #[test]
    fn controller_grows_gently_and_shrinks_fast() {
        let mut c = Controller::new(&throttle(), None);
        c.observe(Duration::from_millis(10));
        assert_eq!(c.size(), 1500, "growth is capped at x1.5");
        c.observe(Duration::from_millis(480));
        assert_eq!(c.size(), 1500, "near target: steady");
        c.observe(Duration::from_millis(3000));
        assert_eq!(c.size(), 250, "slow batch: proportional shrink");
        c.back_off();
        assert_eq!(c.size(), 125);
        c.back_off();
        assert_eq!(c.size(), 100, "never below min");
        for _ in 0..50 {
            c.observe(Duration::from_millis(1));
        }
        assert_eq!(c.size(), 10_000, "never above max");
    }

    #[test]
    fn rate_cap_extends_the_pause() {
        let mut t = throttle();
        assert_eq!(
            pause_after(&t, 1000, Duration::from_millis(10)),
            (Duration::from_millis(50), Reason::Sleep)
        );
        t.max_rows_per_second = 1000;
        let (d, r) = pause_after(&t, 1000, Duration::from_millis(200));
        assert_eq!(r, Reason::RateLimit);
        assert_eq!(d, Duration::from_millis(800));
    }

    #[test]
    fn health_verdicts_follow_limits() {
        let mut cfg = ThrottleConfig::default();
        let mut h = Health::new();
        assert_eq!(
            h.judge(&cfg, (30.0, 0.0, 0, 0, 0, 0.0)),
            Some(Reason::ReplicaLag)
        );
        assert_eq!(h.judge(&cfg, (1.0, 999.0, 0, 0, 0, 0.0)), None);
        cfg.max_transaction_age = Duration::from_secs(60);
        assert_eq!(
            h.judge(&cfg, (1.0, 999.0, 0, 0, 0, 0.0)),
            Some(Reason::LongTransaction)
        );
        cfg.max_lock_waiters = 3;
        assert_eq!(
            h.judge(&cfg, (0.0, 0.0, 4, 0, 0, 0.0)),
            Some(Reason::LockWaits)
        );
        cfg.pause_during_autovacuum = true;
        assert_eq!(
            h.judge(&cfg, (0.0, 0.0, 0, 1, 0, 0.0)),
            Some(Reason::Autovacuum)
        );
    }
}
