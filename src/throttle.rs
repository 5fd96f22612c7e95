//! Throttling between batches: the adaptive batch size, the pause after each batch (minimum
//! sleep and rows-per-second cap), and health signals that hold batches back entirely.

use std::time::{Duration, Instant};

use crate::db::Db;

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
    /// The previous batch: its size and how long it took.
    last: Option<(i64, Duration)>,
    /// Never shrink below this: a smaller batch once proved no faster (the time was per
    /// statement, e.g. a subquery hashing a whole table, not per key), so shrinking further would
    /// only multiply the statements. Held for `FLOOR_BATCHES` batches, then tested again.
    floor: i64,
    floor_left: u32,
    /// The minimum as configured; `min` is below it once statement timeouts pushed it down.
    configured_min: i64,
}

/// How many batches a floor holds before the controller may test smaller sizes again (a stall
/// that slowed two batches in a row must not pin the size for the rest of the run).
const FLOOR_BATCHES: u32 = 32;

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
            last: None,
            floor: t.min_size,
            floor_left: 0,
            configured_min: t.min_size,
        }
    }

    /// Takes a reloaded configuration's sizes and target (SIGHUP) from the next batch on. The
    /// current size is kept within the new bounds; a minimum that statement timeouts lowered
    /// stays lowered, since the server's verdict still holds.
    pub fn retune(&mut self, t: &Throttle) {
        let lowered = self.min < self.configured_min;
        self.configured_min = t.min_size;
        self.min = if lowered {
            self.min.min(t.min_size)
        } else {
            t.min_size
        };
        self.max = t.max_size.max(self.min);
        self.target = Duration::from_millis(t.target_batch_ms as u64);
        self.floor = self.min;
        self.floor_left = 0;
        self.last = None;
        self.set(self.size);
    }

    pub fn size(&self) -> i64 {
        self.size
    }

    /// Adapts after a batch that scanned a full window in `elapsed`.
    pub fn observe(&mut self, elapsed: Duration) {
        let elapsed = elapsed.max(Duration::from_millis(1));
        if self.floor_left > 0 {
            self.floor_left -= 1;
            if self.floor_left == 0 {
                self.floor = self.min;
            }
        }
        if let Some((size, took)) = self.last
            && self.size < size
            && elapsed.as_secs_f64() >= 0.8 * took.as_secs_f64()
        {
            // Smaller, yet not faster: go back to the larger size and stay at or above it.
            self.floor = size.min(self.max);
            self.floor_left = FLOOR_BATCHES;
            self.last = Some((self.size, elapsed));
            self.set(size);
            return;
        }
        self.last = Some((self.size, elapsed));
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

    /// A statement timeout, a transient failure or sessions waiting on the batch: halve, below
    /// any floor (which is forgotten: the server says smaller, whatever the statement costs).
    pub fn back_off(&mut self) {
        self.floor = self.min;
        self.floor_left = 0;
        self.last = None;
        self.set(self.size / 2);
    }

    /// A batch cancelled by `statement_timeout`: halve as `back_off` does, and below the
    /// configured minimum once there, for the rest of this walk. A window of `min_size` keys that
    /// cannot finish in time (rows of hundreds of kB, a slow trigger) would otherwise time out
    /// on every retry until the job failed; the server's verdict outranks the preference.
    pub fn timed_out(&mut self) {
        if self.size <= self.min {
            self.min = (self.size / 2).max(1);
        }
        self.back_off();
    }

    fn set(&mut self, size: i64) {
        self.size = size.clamp(self.floor.max(self.min), self.max);
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
    /// A replication slot holds back more WAL than `max_slot_wal_bytes`.
    ReplicationSlot,
    Backoff,
    /// The last batch made other sessions wait on its row locks.
    Blocking,
    /// Batches run slower per key than the job's best: the server is busier.
    ServerLoad,
    /// The bloat guard's VACUUM of the target.
    Vacuum,
}

impl Reason {
    pub const ALL: [Reason; 13] = [
        Reason::Sleep,
        Reason::RateLimit,
        Reason::ReplicaLag,
        Reason::ReplicationSlot,
        Reason::LongTransaction,
        Reason::LockWaits,
        Reason::Autovacuum,
        Reason::DeadTuples,
        Reason::WalRate,
        Reason::Backoff,
        Reason::Blocking,
        Reason::ServerLoad,
        Reason::Vacuum,
    ];

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
            Reason::ReplicationSlot => "replication_slot",
            Reason::Backoff => "backoff",
            Reason::Blocking => "blocking",
            Reason::ServerLoad => "server_load",
            Reason::Vacuum => "vacuum",
        }
    }
}

/// What a batch did to everyone else: sessions that were waiting on its row locks just before it
/// committed (`pg_blocking_pids`), and how long the longest of them had waited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impact {
    pub blocked: i64,
    pub longest_wait: Duration,
}

/// How much slower than its best the job's batches run per key: a server-wide load signal that
/// needs no privileges. A fast average of the per-key cost (the present) is compared with the
/// lowest value a slow average (a sustained period) has reached since a short warm-up: the
/// quietest the server has been during this job. Comparing against the slow average's minimum
/// rather than the fastest single batches keeps ordinary batch-to-batch noise from reading as
/// load.
#[derive(Debug, Clone, Default)]
pub struct Load {
    fast: Option<f64>,
    slow: Option<f64>,
    best: Option<f64>,
    batches: u32,
}

/// Weights of the newest batch in the fast and the slow average; batches before the slow
/// average may set the baseline.
const LOAD_FAST: f64 = 0.3;
const LOAD_SLOW: f64 = 0.05;
const LOAD_WARMUP: u32 = 20;

impl Load {
    /// Records a batch of `keys` keys whose change statement took `writing`; returns the current
    /// slowdown factor (1.0 = as fast as the quietest sustained period so far). The statement's
    /// time, not the whole batch's: a batch's fixed round trips (window, checkpoint, commit:
    /// about 3 ms) spread over fewer keys would make a batch the controller shrank (after a
    /// blocking one, or a retry) look like a slower server and stack a load pause on the
    /// shrinking.
    pub fn observe(&mut self, writing: Duration, keys: i64) -> f64 {
        if keys <= 0 {
            return self.factor();
        }
        let cost = writing.as_secs_f64() / keys as f64;
        let ewma =
            |avg: Option<f64>, weight: f64| Some(avg.map_or(cost, |a| a + weight * (cost - a)));
        self.fast = ewma(self.fast, LOAD_FAST);
        self.slow = ewma(self.slow, LOAD_SLOW);
        self.batches += 1;
        if self.batches >= LOAD_WARMUP {
            let slow = self.slow.unwrap_or(cost);
            self.best = Some(self.best.map_or(slow, |b| b.min(slow)));
        }
        self.factor()
    }

    pub fn factor(&self) -> f64 {
        match (self.fast, self.best) {
            (Some(f), Some(b)) if b > 0.0 => f / b,
            _ => 1.0,
        }
    }
}

/// Slowdowns below this are noise (cache misses, a commit flush), not load.
const LOAD_NOTICE: f64 = 2.0;

/// The pauses after a batch, in order, each with the reason it is counted under:
/// - the job's minimum sleep, or longer when the rows-per-second cap demands it (the batch's
///   rows over the cap, minus the time the batch already took);
/// - when the batch blocked other sessions, twice its own duration more, so the queue behind it
///   drains before the next batch takes locks again;
/// - when the server is busier (`load` ≥ 2, capped at `max_load`), the base pause stretched by
///   the slowdown, so the backfill's share of the server shrinks as everyone else needs more.
pub fn pauses(
    t: &Throttle,
    rate_wait: Duration,
    elapsed: Duration,
    impact: Impact,
    load: f64,
    max_load: f64,
) -> Vec<(Duration, Reason)> {
    let base = pause_after(t, rate_wait);
    let mut out = vec![base];
    if impact.blocked > 0 {
        out.push((elapsed * 2, Reason::Blocking));
    }
    if max_load >= 1.0 && load >= LOAD_NOTICE {
        let stretch = (load.min(max_load) - 1.0).max(0.0);
        let floor = Duration::from_millis(t.sleep_ms as u64).max(elapsed);
        out.push((floor.mul_f64(stretch), Reason::ServerLoad));
    }
    out
}

/// The pause after a batch: the job's minimum sleep, or longer when the rows-per-second cap
/// demands it (`rate_wait`, from [`RatePace`]).
pub fn pause_after(t: &Throttle, rate_wait: Duration) -> (Duration, Reason) {
    let sleep = Duration::from_millis(t.sleep_ms as u64);
    if rate_wait > sleep {
        return (rate_wait, Reason::RateLimit);
    }
    (sleep, Reason::Sleep)
}

/// A job's rows-per-second cap, shared by its parallel slices: every batch's rows take their
/// time on one timeline, so the slices together stay under the cap (each had kept it alone, so
/// four slices ran at four times the cap).
#[derive(Debug, Default)]
pub struct RatePace {
    /// When the rows changed so far may all have been changed at the cap.
    until: std::sync::Mutex<Option<Instant>>,
}

impl RatePace {
    /// How long a slice waits after its batch, begun at `started`, changed `rows`, at `rate`
    /// rows per second (0: no cap): until the job's rows so far fit the cap. For a single
    /// slice that is the batch's rows over the cap, minus the time the batch already took.
    pub fn wait(&self, rate: i64, rows: i64, started: Instant, now: Instant) -> Duration {
        if rate <= 0 || rows <= 0 {
            return Duration::ZERO;
        }
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        let from = until.map_or(started, |u| u.max(started));
        let next = from + Duration::from_secs_f64(rows as f64 / rate as f64);
        *until = Some(next);
        next.saturating_duration_since(now)
    }
}

/// Samples the database's health signals at most once per `check_interval`.
#[derive(Debug)]
pub struct Health {
    last_check: Option<Instant>,
    last_wal: Option<(Instant, f64)>,
    verdict: Option<Reason>,
    /// The verdict's figure, for the log ("a slot holds 11.2 GiB of WAL").
    reading: String,
    /// Hold on `max_dead_tuple_ratio`: only while autovacuum alone reclaims the job's dead
    /// tuples (no bloat guard), so the hold waits for it. With the guard on, our dead tuples are
    /// reclaimed as we go and everyone else's are autovacuum's business.
    dead_ratio: bool,
}

/// One reading of the database's health signals.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
struct Sample {
    replica_lag: f64,
    /// Age in seconds of the oldest other transaction holding back vacuum (it has an xid or a
    /// snapshot), so the rows we rewrite cannot be reclaimed while it lasts.
    xact_age: f64,
    lock_waiters: i64,
    /// Vacuums running on the target (a partition of it), other than one of ours.
    vacuums: i64,
    /// Summed over the target's partitions when it is partitioned (its own row counts none).
    dead_tuples: i64,
    live_tuples: i64,
    /// The dead tuples at which autovacuum will vacuum the target (its threshold plus scale
    /// factor times `reltuples`, table options over server settings; summed over partitions),
    /// `None` when autovacuum is off for it: a hold on dead tuples ends without us only past it.
    autovacuum_trigger: Option<f64>,
    wal: f64,
    /// The most WAL any replication slot holds back, in bytes (0 without slots).
    slot_wal: f64,
    /// Bytes of WAL per second since the previous sample (`None` on the first).
    #[sqlx(skip)]
    wal_rate: Option<f64>,
}

const SAMPLE: &str = "
WITH leaves AS (
    -- The target itself, and its partitions when it is partitioned (its own row counts none).
    SELECT $1::regclass AS relid
    UNION SELECT relid FROM pg_partition_tree($1::regclass) WHERE isleaf)
SELECT
    (SELECT coalesce(max(extract(epoch FROM replay_lag)), 0)::float8 FROM pg_stat_replication)
        AS replica_lag,
    (SELECT coalesce(max(extract(epoch FROM now() - xact_start)), 0)::float8
       FROM pg_stat_activity
      WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND backend_type = 'client backend'
        AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)
        -- A lazy VACUUM (the bloat guard's, or anyone's) shows a transaction and an xmin but
        -- holds back no one's horizon: PostgreSQL leaves it out of the oldest xmin.
        AND pid NOT IN (SELECT pid FROM pg_stat_progress_vacuum)) AS xact_age,
    (SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock') AS lock_waiters,
    (SELECT count(*) FROM pg_stat_progress_vacuum v
      WHERE v.relid IN (SELECT relid FROM leaves)
        AND v.pid NOT IN (SELECT pid FROM pg_stat_activity
                           WHERE split_part(application_name, '/', 1)
                                 = split_part(current_setting('application_name'), '/', 1)))
        AS vacuums,
    t.dead_tuples,
    t.live_tuples,
    -- NULL when autovacuum is off, server-wide or on any partition.
    (SELECT CASE WHEN current_setting('autovacuum')::bool AND bool_and(coalesce(o.enabled, true))
                 THEN sum(coalesce(o.threshold, current_setting('autovacuum_vacuum_threshold')::float8)
                          + coalesce(o.scale, current_setting('autovacuum_vacuum_scale_factor')::float8)
                            * greatest(c.reltuples, 0)) END
       FROM leaves l JOIN pg_class c ON c.oid = l.relid
       CROSS JOIN LATERAL (
         SELECT max(option_value) FILTER (WHERE option_name = 'autovacuum_enabled')::bool AS enabled,
                max(option_value) FILTER (WHERE option_name = 'autovacuum_vacuum_threshold')::float8
                  AS threshold,
                max(option_value) FILTER (WHERE option_name = 'autovacuum_vacuum_scale_factor')::float8
                  AS scale
         FROM pg_options_to_table(c.reloptions)) o
      WHERE c.relkind <> 'p') AS autovacuum_trigger,
    (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8 AS wal,
    (SELECT coalesce(max(pg_current_wal_lsn() - restart_lsn), 0)::float8 FROM pg_replication_slots)
        AS slot_wal
FROM (SELECT coalesce(sum(n_dead_tup), 0)::int8 AS dead_tuples,
             coalesce(sum(n_live_tup), 0)::int8 AS live_tuples
      FROM pg_stat_all_tables WHERE relid IN (SELECT relid FROM leaves)) AS t";

/// Whether this role may read other sessions' statistics, and its name. PostgreSQL shows the
/// replicas' lag, other roles' transaction starts and snapshots, their wait events and
/// autovacuum's progress only to superusers and members of `pg_read_all_stats` (which
/// `pg_monitor` includes); to anyone else those columns are NULL, so the replica-lag,
/// long-transaction, lock-wait and autovacuum signals would stay quiet whatever the server does.
pub async fn stats_visibility(pool: &Db) -> sqlx::Result<(String, bool)> {
    crate::sql::query_as("SELECT current_user::text, pg_has_role('pg_read_all_stats', 'USAGE')")
        .fetch_one(pool)
        .await
}

/// Says in the log and in `gauge` (`backfilld_health_signals_visible`, -1 until a check
/// succeeds) whether the health signals can see other sessions. Run at start and at each job's
/// claim: the first successful check warns when they cannot; later ones log only a change (a
/// role granted `pg_read_all_stats`, or losing it, without a restart). A failed check is logged
/// and changes nothing.
pub async fn report_visibility(pool: &Db, cfg: &ThrottleConfig, gauge: &prometheus::IntGauge) {
    let (role, visible) = match stats_visibility(pool).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "cannot check whether the health signals see other sessions");
            return;
        }
    };
    let before = swap_visible(gauge, visible);
    let blind = signals_needing_stats(cfg);
    if blind.is_empty() || before == Some(visible) {
        return;
    }
    if !visible {
        tracing::warn!(
            role = %role,
            signals = %blind.join(", "),
            "health signals: this role may not read other sessions' statistics, so replica lag, \
             other roles' long transactions and lock waits and autovacuum's progress read as \
             quiet and never hold a job; GRANT pg_read_all_stats (or pg_monitor) TO the role"
        );
    } else if before.is_some() {
        tracing::info!(role = %role, "health signals: this role may now read other sessions' statistics");
    }
}

/// Sets the visibility gauge to `visible`; returns what it said before (`None`: -1, never
/// checked).
fn swap_visible(gauge: &prometheus::IntGauge, visible: bool) -> Option<bool> {
    let before = match gauge.get() {
        -1 => None,
        v => Some(v == 1),
    };
    gauge.set(i64::from(visible));
    before
}

/// The signals that read other sessions' statistics and are turned on.
pub fn signals_needing_stats(cfg: &ThrottleConfig) -> Vec<&'static str> {
    [
        ("throttle.max_replica_lag", !cfg.max_replica_lag.is_zero()),
        (
            "throttle.max_transaction_age",
            !cfg.max_transaction_age.is_zero(),
        ),
        ("throttle.max_lock_waiters", cfg.max_lock_waiters > 0),
        (
            "throttle.pause_during_autovacuum",
            cfg.pause_during_autovacuum,
        ),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect()
}

/// Dead tuples below this never hold a job, whatever the ratio: small tables vacuum quickly.
const DEAD_TUPLES_FLOOR: i64 = 10_000;

impl Health {
    pub fn new(dead_ratio: bool) -> Self {
        Self {
            last_check: None,
            last_wal: None,
            verdict: None,
            reading: String::new(),
            dead_ratio,
        }
    }

    /// The first signal over its limit, if any. Sampling errors are logged and ignored: a
    /// monitoring view we may not read must not stop a backfill.
    pub async fn check(
        &mut self,
        pool: &Db,
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
        let mut sample: Sample = match crate::sql::query_as(SAMPLE)
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
        sample.wal_rate = self.wal_rate(sample.wal);
        self.verdict = self.judge(cfg, &sample);
        self.reading = self
            .verdict
            .map(|r| reading(r, &sample))
            .unwrap_or_default();
        self.verdict
    }

    /// What the signal holding batches read at the last sample, or "" when none does.
    pub fn reading(&self) -> &str {
        &self.reading
    }

    fn judge(&self, cfg: &ThrottleConfig, s: &Sample) -> Option<Reason> {
        let over = |limit: Duration, value: f64| !limit.is_zero() && value > limit.as_secs_f64();
        if over(cfg.max_replica_lag, s.replica_lag) {
            Some(Reason::ReplicaLag)
        } else if cfg.max_slot_wal_bytes > 0 && s.slot_wal > cfg.max_slot_wal_bytes as f64 {
            Some(Reason::ReplicationSlot)
        } else if over(cfg.max_transaction_age, s.xact_age) {
            Some(Reason::LongTransaction)
        } else if cfg.max_lock_waiters > 0 && s.lock_waiters > cfg.max_lock_waiters {
            Some(Reason::LockWaits)
        } else if cfg.pause_during_autovacuum && s.vacuums > 0 {
            Some(Reason::Autovacuum)
        } else if too_many_dead(cfg, s, self.dead_ratio) {
            Some(Reason::DeadTuples)
        } else if cfg.max_wal_bytes_per_second > 0
            && s.wal_rate
                .is_some_and(|r| r > cfg.max_wal_bytes_per_second as f64)
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

/// The figure behind a health verdict, as the log states it.
fn reading(reason: Reason, s: &Sample) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    match reason {
        Reason::ReplicaLag => format!("a replica replays {:.1} s behind", s.replica_lag),
        Reason::ReplicationSlot => format!(
            "a replication slot holds back {:.1} GiB of WAL",
            s.slot_wal / (MIB * 1024.0)
        ),
        Reason::LongTransaction => {
            format!(
                "a transaction holding back vacuum is {:.0} s old",
                s.xact_age
            )
        }
        Reason::LockWaits => format!("{} sessions wait on locks", s.lock_waiters),
        Reason::Autovacuum => "autovacuum is working on the target".into(),
        Reason::DeadTuples => format!(
            "the target has {} dead tuples to {} live",
            s.dead_tuples, s.live_tuples
        ),
        Reason::WalRate => format!(
            "the server writes {:.1} MiB of WAL per second",
            s.wal_rate.unwrap_or(0.0) / MIB
        ),
        _ => String::new(),
    }
}

/// Over the absolute limit, or over the ratio, while autovacuum will bring it down: past its
/// trigger. A hold below the trigger would never end (the held job adds no dead tuples, so
/// autovacuum never comes: a table with `autovacuum_vacuum_scale_factor = 0.9` held its job
/// for good); the job goes on until the trigger is passed, and then waits for autovacuum.
fn too_many_dead(cfg: &ThrottleConfig, s: &Sample, use_ratio: bool) -> bool {
    let due = s
        .autovacuum_trigger
        .is_some_and(|t| s.dead_tuples as f64 > t);
    let absolute = cfg.max_dead_tuples > 0 && s.dead_tuples > cfg.max_dead_tuples;
    let ratio = use_ratio
        && cfg.max_dead_tuple_ratio > 0.0
        && s.dead_tuples > DEAD_TUPLES_FLOOR
        && s.dead_tuples as f64 > cfg.max_dead_tuple_ratio * s.live_tuples.max(1) as f64;
    due && (absolute || ratio)
}

fn any_enabled(cfg: &ThrottleConfig) -> bool {
    !cfg.max_replica_lag.is_zero()
        || !cfg.max_transaction_age.is_zero()
        || cfg.max_lock_waiters > 0
        || cfg.pause_during_autovacuum
        || cfg.max_dead_tuples > 0
        || cfg.max_dead_tuple_ratio > 0.0
        || cfg.max_wal_bytes_per_second > 0
        || cfg.max_slot_wal_bytes > 0
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
            max_batch_ms: 1000,
            sleep_ms: 50,
            max_rows_per_second: 0,
            preset: crate::job::Preset::Gentle,
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
    fn a_retune_takes_the_new_bounds_and_target() {
        let mut c = Controller::new(&throttle(), None);
        c.observe(Duration::from_millis(10));
        assert_eq!(c.size(), 1500);
        let smaller = Throttle {
            max_size: 400,
            target_batch_ms: 50,
            ..throttle()
        };
        c.retune(&smaller);
        assert_eq!(
            c.size(),
            400,
            "the current size falls within the new maximum"
        );
        c.observe(Duration::from_millis(100));
        assert_eq!(c.size(), 200, "the new target steers the next batches");
        let larger_min = Throttle {
            min_size: 300,
            ..smaller.clone()
        };
        c.retune(&larger_min);
        assert_eq!(c.size(), 300, "and the new minimum");
    }

    #[test]
    fn a_retune_keeps_a_minimum_that_timeouts_lowered() {
        let mut c = Controller::new(&throttle(), Some(100));
        c.timed_out();
        assert_eq!(c.size(), 50);
        c.retune(&Throttle {
            min_size: 200,
            ..throttle()
        });
        assert_eq!(c.size(), 50, "the server's verdict outlives a reload");
        c.retune(&Throttle {
            min_size: 20,
            ..throttle()
        });
        c.timed_out();
        assert_eq!(c.size(), 25, "a lower configured minimum applies too");
    }

    #[test]
    fn statement_timeouts_go_below_the_minimum() {
        let mut c = Controller::new(&throttle(), Some(200));
        c.timed_out();
        assert_eq!(c.size(), 100, "halved to the minimum");
        c.timed_out();
        assert_eq!(c.size(), 50, "still timing out at the minimum: below it");
        for _ in 0..5 {
            c.timed_out();
        }
        assert_eq!(c.size(), 1, "down to one key");
        c.timed_out();
        assert_eq!(c.size(), 1);
        c.observe(Duration::from_millis(100));
        assert_eq!(c.size(), 2, "then grows as usual toward the target");
        let mut blocked = Controller::new(&throttle(), Some(100));
        blocked.back_off();
        assert_eq!(blocked.size(), 100, "other back-offs keep the minimum");
    }

    #[test]
    fn controller_stops_shrinking_when_smaller_batches_are_no_faster() {
        // Every statement costs 40 ms whatever its size (say, a subquery hashing a whole table):
        // shrinking toward a 20 ms target can only multiply the statements.
        let mut t = throttle();
        t.target_batch_ms = 20;
        let mut c = Controller::new(&t, None);
        let fixed = |size: i64| Duration::from_micros(40_000 + size as u64);
        for _ in 0..20 {
            c.observe(fixed(c.size()));
        }
        assert!(
            c.size() >= 500,
            "stopped near where shrinking stopped helping: {}",
            c.size()
        );
        // Per-key cost still shrinks proportionally.
        let mut c = Controller::new(&t, None);
        for _ in 0..20 {
            c.observe(Duration::from_micros(100 * c.size() as u64));
        }
        assert_eq!(c.size(), 200);
    }

    #[test]
    fn rate_cap_extends_the_pause() {
        let t = throttle();
        let pace = RatePace::default();
        let t0 = Instant::now();
        let none = pace.wait(0, 1000, t0, t0 + Duration::from_millis(10));
        assert_eq!(
            pause_after(&t, none),
            (Duration::from_millis(50), Reason::Sleep)
        );
        let wait = pace.wait(1000, 1000, t0, t0 + Duration::from_millis(200));
        assert_eq!(wait, Duration::from_millis(800));
        assert_eq!(pause_after(&t, wait), (wait, Reason::RateLimit));
    }

    #[test]
    fn a_slice_s_window_holds_its_share_of_the_rate_cap() {
        let capped = Throttle {
            max_rows_per_second: 1000,
            ..throttle()
        };
        let one = capped.clone().shared_by(1);
        assert_eq!((one.initial_size, one.max_size), (1000, 10_000));
        let three = capped.shared_by(3);
        assert_eq!(
            (three.initial_size, three.min_size, three.max_size),
            (334, 100, 334)
        );
        let uncapped = throttle().shared_by(3);
        assert_eq!(uncapped.max_size, 10_000);
    }

    #[test]
    fn parallel_slices_share_the_rate_cap() {
        let pace = RatePace::default();
        let t0 = Instant::now();
        let done = t0 + Duration::from_millis(100);
        // Four slices each change 500 rows in the same 100 ms under a cap of 1,000 a second:
        // together two seconds' worth, so the last to finish waits until then.
        let waits: Vec<Duration> = (0..4).map(|_| pace.wait(1000, 500, t0, done)).collect();
        assert_eq!(waits[0], Duration::from_millis(400));
        assert_eq!(waits[3], Duration::from_millis(1900));
    }

    #[test]
    fn health_verdicts_follow_limits() {
        let mut cfg = ThrottleConfig::default();
        let h = Health::new(true);
        let quiet = Sample {
            autovacuum_trigger: Some(200_050.0),
            live_tuples: 1_000_000,
            ..Sample::default()
        };
        let with = |f: fn(&mut Sample)| {
            let mut s = quiet.clone();
            f(&mut s);
            s
        };
        assert_eq!(h.judge(&cfg, &quiet), None);
        assert_eq!(
            h.judge(&cfg, &with(|s| s.replica_lag = 30.0)),
            Some(Reason::ReplicaLag)
        );
        assert_eq!(
            h.judge(
                &cfg,
                &with(|s| s.slot_wal = 11.0 * 1024.0 * 1024.0 * 1024.0)
            ),
            Some(Reason::ReplicationSlot),
            "a slot holding back over 10 GiB of WAL holds batches by default"
        );
        assert_eq!(h.judge(&cfg, &with(|s| s.slot_wal = 1e9)), None);
        assert_eq!(
            reading(
                Reason::ReplicationSlot,
                &with(|s| s.slot_wal = 11.0 * 1024.0 * 1024.0 * 1024.0)
            ),
            "a replication slot holds back 11.0 GiB of WAL"
        );
        assert_eq!(
            h.judge(&cfg, &with(|s| s.xact_age = 999.0)),
            Some(Reason::LongTransaction),
            "a transaction holding back vacuum for over 5 minutes holds batches by default"
        );
        assert_eq!(
            h.judge(&cfg, &with(|s| s.vacuums = 1)),
            Some(Reason::Autovacuum)
        );
        assert_eq!(
            h.judge(&cfg, &with(|s| s.dead_tuples = 400_000)),
            Some(Reason::DeadTuples),
            "dead tuples over 30% of live ones hold batches while autovacuum can clear them"
        );
        let no_autovacuum = with(|s| {
            s.dead_tuples = 400_000;
            s.autovacuum_trigger = None;
        });
        assert_eq!(
            h.judge(&cfg, &no_autovacuum),
            None,
            "nothing would clear it"
        );
        let not_due = with(|s| {
            s.dead_tuples = 400_000;
            s.autovacuum_trigger = Some(900_050.0);
        });
        assert_eq!(
            h.judge(&cfg, &not_due),
            None,
            "autovacuum would not come before the job adds more"
        );
        cfg.max_lock_waiters = 3;
        assert_eq!(
            h.judge(&cfg, &with(|s| s.lock_waiters = 4)),
            Some(Reason::LockWaits)
        );
    }

    #[test]
    fn blocking_and_load_lengthen_the_pause() {
        let t = throttle();
        let ms = Duration::from_millis;
        let calm = pauses(&t, Duration::ZERO, ms(20), Impact::default(), 1.0, 4.0);
        assert_eq!(calm, vec![(ms(50), Reason::Sleep)]);
        let blocked = Impact {
            blocked: 2,
            longest_wait: ms(15),
        };
        let p = pauses(&t, Duration::ZERO, ms(20), blocked, 1.0, 4.0);
        assert_eq!(p[1], (ms(40), Reason::Blocking));
        let busy = pauses(&t, Duration::ZERO, ms(20), Impact::default(), 3.0, 4.0);
        assert_eq!(
            busy[1],
            (ms(100), Reason::ServerLoad),
            "sleep stretched 2x more"
        );
        let capped = pauses(&t, Duration::ZERO, ms(20), Impact::default(), 10.0, 4.0);
        assert_eq!(capped[1], (ms(150), Reason::ServerLoad));
        assert_eq!(
            pauses(&t, Duration::ZERO, ms(20), Impact::default(), 3.0, 0.0).len(),
            1
        );
    }

    #[test]
    fn load_factor_compares_to_the_quietest_sustained_period() {
        let mut l = Load::default();
        let ms = Duration::from_millis;
        for _ in 0..LOAD_WARMUP + 40 {
            assert_eq!(l.observe(ms(20), 1000), 1.0, "steady: no load");
        }
        for i in 0..200 {
            // Noisy but not slower on average: 10 ms and 30 ms batches alternate.
            l.observe(ms(if i % 2 == 0 { 10 } else { 30 }), 1000);
        }
        assert!(l.factor() < 2.0, "noise is not load: {}", l.factor());
        for _ in 0..30 {
            l.observe(ms(60), 1000);
        }
        assert!(l.factor() > 2.5, "three times slower: {}", l.factor());
        for _ in 0..30 {
            l.observe(ms(20), 1000);
        }
        assert!(l.factor() < 1.1, "{}", l.factor());
    }

    /// Measured on the bench (`bench/README.md`, "Per-batch cost"): a batch costs about 3 ms of
    /// round trips plus 5.6 µs per key, of which its change statement is some 0.4 ms of
    /// start-up plus the keys. After a blocking batch the controller halves the size, twice
    /// here; the server is no slower, so the load signal must stay quiet (counted over the whole
    /// batch, 250-key batches would cost 2.9 times as much per key as 3,000-key ones).
    #[test]
    fn batches_the_controller_shrank_are_not_read_as_load() {
        let write = |keys: u64| Duration::from_micros(400 + 56 * keys / 10);
        let mut l = Load::default();
        for _ in 0..LOAD_WARMUP + 40 {
            l.observe(write(3000), 3000);
        }
        for _ in 0..30 {
            l.observe(write(250), 250);
        }
        assert!(l.factor() < LOAD_NOTICE, "{}", l.factor());
    }
}
