//! Prometheus metrics, names fixed by the public contract (prefix `backfilld_`).

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::JobError;
use crate::throttle::Reason;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub jobs: IntGaugeVec,
    pub jobs_last_finished: GaugeVec,
    pub rows_changed: IntCounterVec,
    pub rows_scanned: IntCounterVec,
    pub batch_duration: HistogramVec,
    pub batch_size: IntGaugeVec,
    pub progress: GaugeVec,
    pub eta: GaugeVec,
    pub throttle_seconds: CounterVec,
    pub batch_errors: IntCounterVec,
    pub leases_lost: IntCounter,
    pub leases_rescued: IntCounter,
    pub last_batch: GaugeVec,
    pub job_running: IntGaugeVec,
    pub sessions_blocked: IntCounterVec,
    pub vacuums: IntCounterVec,
    pub bloat_guard_allowed: IntGaugeVec,
    pub listen_connected: IntGauge,
    pub listen_reconnects: IntCounter,
    pub stats_visible: IntGauge,
    /// Jobs whose attempt ended finished (or planned), and when: their series expire.
    finished: Arc<Mutex<HashMap<String, Instant>>>,
    /// Jobs with series here that are not marked finished: a job may finish on another replica
    /// (handed back, then run there) or by a request while idle (`unsettled`).
    started: Arc<Mutex<std::collections::HashSet<String>>>,
}

/// Prometheus rejects only malformed names or label sets; ours are constants, checked by the
/// unit test below, so a failure here is a programming error.
const LAST_BATCH: &str = "Unix time of the last committed batch";
/// Read from the ledger, so an alert sees a failure whenever it happened: one before the
/// replica's first scrape shows in `backfilld_jobs` only as a series that starts at 1.
const LAST_FINISHED: &str =
    "Unix time the most recently finished job in each state finished (jobs in backfill.jobs)";
const RUNNING: &str =
    "1 while this replica runs an attempt at the job (planning, batches, verifying), 0 after";
const BLOCKED: &str = "Sessions found waiting on a batch's row locks just before it committed";
const VACUUMS: &str = "VACUUMs of the target run by the bloat guard";
const LISTENING: &str = "1 while this replica LISTENs for new jobs, 0 while it only polls (connection lost, or a \
     transaction pooler without database.direct_url)";
const STATS_VISIBLE: &str = "1 when this replica's role may read other sessions' statistics (pg_read_all_stats), \
     0 when the health signals that need them see only its own sessions, -1 until checked";
const ALLOWED: &str =
    "1 when the bloat guard may VACUUM the job's target, 0 when it relies on autovacuum";

fn batch_duration() -> HistogramVec {
    let buckets = vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    let opts = HistogramOpts::new(
        "backfilld_batch_duration_seconds",
        "Duration of one batch transaction",
    )
    .buckets(buckets);
    must(HistogramVec::new(opts, &["job"]))
}

fn counter(name: &str, help: &str) -> IntCounter {
    must(IntCounter::with_opts(opts(name, help)))
}

/// A metric vector labelled by `job`.
fn per_job<T>(new: impl Fn(Opts, &[&str]) -> prometheus::Result<T>, name: &str, help: &str) -> T {
    must(new(opts(name, help), &["job"]))
}

fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            jobs: must(IntGaugeVec::new(
                opts("jobs", "Jobs in backfill.jobs by state"),
                &["state"],
            )),
            jobs_last_finished: must(GaugeVec::new(
                opts("jobs_last_finished_timestamp_seconds", LAST_FINISHED),
                &["state"],
            )),
            rows_changed: per_job(IntCounterVec::new, "rows_changed_total", "Rows changed"),
            rows_scanned: per_job(IntCounterVec::new, "rows_scanned_total", "Keys scanned"),
            batch_duration: batch_duration(),
            batch_size: per_job(IntGaugeVec::new, "batch_size", "Current batch size"),
            progress: per_job(
                GaugeVec::new,
                "job_progress_ratio",
                "Share of the key range done",
            ),
            eta: per_job(
                GaugeVec::new,
                "job_eta_seconds",
                "Estimated seconds to finish",
            ),
            throttle_seconds: must(CounterVec::new(
                opts(
                    "throttle_seconds_total",
                    "Seconds spent held back between batches",
                ),
                &["job", "reason"],
            )),
            batch_errors: must(IntCounterVec::new(
                opts("batch_errors_total", "Failed batches by kind"),
                &["job", "kind"],
            )),
            leases_lost: counter("leases_lost_total", "Leases lost"),
            leases_rescued: counter(
                "leases_rescued_total",
                "Expired leases rescued by this replica",
            ),
            last_batch: per_job(GaugeVec::new, "last_batch_timestamp_seconds", LAST_BATCH),
            job_running: per_job(IntGaugeVec::new, "job_running", RUNNING),
            sessions_blocked: per_job(IntCounterVec::new, "sessions_blocked_total", BLOCKED),
            vacuums: per_job(IntCounterVec::new, "vacuums_total", VACUUMS),
            bloat_guard_allowed: per_job(IntGaugeVec::new, "bloat_guard_vacuum_allowed", ALLOWED),
            listen_connected: must(IntGauge::with_opts(opts("listen_connected", LISTENING))),
            stats_visible: must(IntGauge::with_opts(opts(
                "health_signals_visible",
                STATS_VISIBLE,
            ))),
            listen_reconnects: counter(
                "listen_reconnects_total",
                "LISTEN connections re-established after a loss",
            ),
            registry: Registry::new(),
            finished: Default::default(),
            started: Default::default(),
        };
        m.stats_visible.set(-1);
        m.register_all();
        m.register_build_info();
        m
    }

    /// An attempt at `job` starts: its counters exist from now on, at 0 until counted, so the
    /// first error or throttle second is a visible increase to `rate()` and `increase()`.
    pub fn job_started(&self, job: &str) {
        self.finished_jobs().remove(job);
        self.started_jobs().insert(job.to_owned());
        for counter in [
            &self.rows_changed,
            &self.rows_scanned,
            &self.sessions_blocked,
            &self.vacuums,
        ] {
            counter.with_label_values(&[job]).inc_by(0);
        }
        for kind in JobError::KINDS {
            self.batch_errors.with_label_values(&[job, kind]).inc_by(0);
        }
        self.job_running.with_label_values(&[job]).set(1);
        for reason in Reason::ALL {
            self.throttle_seconds
                .with_label_values(&[job, reason.as_str()])
                .inc_by(0.0);
        }
    }

    /// This replica's attempt at `job` ended, however it ended. Unless it succeeded here (ETA 0),
    /// its ETA and batch size describe a walk this replica no longer runs (lease lost, handed
    /// back, paused, failed): they go, or a dashboard's `max` kept showing them for an hour.
    pub fn attempt_ended(&self, job: &str, succeeded: bool) {
        self.job_running.with_label_values(&[job]).set(0);
        if succeeded {
            // Done means done: a sparse job's plan may have counted more keys to walk than its
            // walk took, which had left the gauges short of it (0.75, ETA 0.07 s) for the TTL.
            self.progress.with_label_values(&[job]).set(1.0);
            self.eta.with_label_values(&[job]).set(0.0);
        } else {
            let _ = self.eta.remove_label_values(&[job]);
            let _ = self.batch_size.remove_label_values(&[job]);
        }
    }

    /// `job` ended succeeded, failed, cancelled or planned: its series expire after the TTL.
    pub fn job_finished(&self, job: &str) {
        self.started_jobs().remove(job);
        self.finished_jobs().insert(job.to_owned(), Instant::now());
    }

    /// Jobs with series here not yet marked finished; the daemon asks the database which of
    /// them finished elsewhere (`job_finished` then starts their time to live).
    pub fn unsettled(&self) -> Vec<String> {
        self.started_jobs().iter().cloned().collect()
    }

    fn started_jobs(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        // A poisoned lock only means a panic mid-update of a plain set.
        self.started.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops every series of the jobs that finished more than `ttl` ago; returns how many jobs.
    pub fn expire_finished(&self, ttl: Duration) -> usize {
        let expired: Vec<String> = {
            let mut finished = self.finished_jobs();
            let expired: Vec<String> = finished
                .iter()
                .filter(|(_, at)| at.elapsed() >= ttl)
                .map(|(job, _)| job.clone())
                .collect();
            for job in &expired {
                finished.remove(job);
            }
            expired
        };
        for job in &expired {
            self.remove_series(job);
        }
        expired.len()
    }

    fn remove_series(&self, job: &str) {
        // A series that was never created is not an error worth reporting: ignore the result.
        let one = [job];
        let _ = self.rows_changed.remove_label_values(&one);
        let _ = self.rows_scanned.remove_label_values(&one);
        let _ = self.batch_duration.remove_label_values(&one);
        let _ = self.batch_size.remove_label_values(&one);
        let _ = self.progress.remove_label_values(&one);
        let _ = self.eta.remove_label_values(&one);
        let _ = self.last_batch.remove_label_values(&one);
        let _ = self.job_running.remove_label_values(&one);
        let _ = self.sessions_blocked.remove_label_values(&one);
        let _ = self.vacuums.remove_label_values(&one);
        let _ = self.bloat_guard_allowed.remove_label_values(&one);
        for kind in JobError::KINDS {
            let _ = self.batch_errors.remove_label_values(&[job, kind]);
        }
        for reason in Reason::ALL {
            let _ = self
                .throttle_seconds
                .remove_label_values(&[job, reason.as_str()]);
        }
    }

    fn finished_jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // A poisoned lock only means a panic mid-update of a plain map.
        self.finished.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register_build_info(&self) {
        let build = must(IntGaugeVec::new(
            opts("build_info", "Build information"),
            &["version"],
        ));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        must(self.registry.register(Box::new(build)));
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.jobs.clone()),
            Box::new(self.jobs_last_finished.clone()),
            Box::new(self.rows_changed.clone()),
            Box::new(self.rows_scanned.clone()),
            Box::new(self.batch_duration.clone()),
            Box::new(self.batch_size.clone()),
            Box::new(self.progress.clone()),
            Box::new(self.eta.clone()),
            Box::new(self.throttle_seconds.clone()),
            Box::new(self.batch_errors.clone()),
            Box::new(self.leases_lost.clone()),
            Box::new(self.leases_rescued.clone()),
            Box::new(self.last_batch.clone()),
            Box::new(self.job_running.clone()),
            Box::new(self.sessions_blocked.clone()),
            Box::new(self.vacuums.clone()),
            Box::new(self.bloat_guard_allowed.clone()),
            Box::new(self.listen_connected.clone()),
            Box::new(self.listen_reconnects.clone()),
            Box::new(self.stats_visible.clone()),
        ];
        for c in collectors {
            must(self.registry.register(c));
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    pub fn throttled(&self, job: &str, reason: &str, seconds: f64) {
        if seconds > 0.0 {
            self.throttle_seconds
                .with_label_values(&[job, reason])
                .inc_by(seconds);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(format!("backfilld_{name}"), help)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_names_are_exposed() {
        let m = Metrics::new();
        assert!(
            !m.render().contains("backfilld_jobs{"),
            "no job-state gauges before the first poll: a scrape must not see a fresh 0"
        );
        m.jobs.with_label_values(&["running"]).set(0);
        m.rows_changed.with_label_values(&["j"]).inc_by(3);
        m.batch_duration.with_label_values(&["j"]).observe(0.2);
        m.throttled("j", "sleep", 0.5);
        m.batch_errors.with_label_values(&["j", "deadlock"]).inc();
        m.progress.with_label_values(&["j"]).set(0.5);
        m.eta.with_label_values(&["j"]).set(10.0);
        m.batch_size.with_label_values(&["j"]).set(10);
        m.rows_scanned.with_label_values(&["j"]).inc();
        m.last_batch.with_label_values(&["j"]).set(1.0);
        m.job_started("j");
        let text = m.render();
        for name in [
            "backfilld_jobs{state=\"running\"} 0",
            "backfilld_rows_changed_total{job=\"j\"} 3",
            "backfilld_rows_scanned_total{job=\"j\"} 1",
            "backfilld_batch_duration_seconds_bucket{job=\"j\",le=\"0.25\"} 1",
            "backfilld_batch_size{job=\"j\"} 10",
            "backfilld_job_progress_ratio{job=\"j\"} 0.5",
            "backfilld_job_eta_seconds{job=\"j\"} 10",
            "backfilld_throttle_seconds_total{job=\"j\",reason=\"sleep\"} 0.5",
            "backfilld_batch_errors_total{job=\"j\",kind=\"deadlock\"} 1",
            "backfilld_leases_lost_total 0",
            "backfilld_leases_rescued_total 0",
            "backfilld_last_batch_timestamp_seconds{job=\"j\"} 1",
            "backfilld_job_running{job=\"j\"} 1",
            "backfilld_build_info{version=",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        m.attempt_ended("j", false);
        let text = m.render();
        assert!(
            !text.contains("backfilld_job_eta_seconds{job=\"j\"}"),
            "{text}"
        );
        assert!(!text.contains("backfilld_batch_size{job=\"j\"}"), "{text}");
        assert!(text.contains("backfilld_job_progress_ratio{job=\"j\"} 0.5"));
        // A success reads as done, whatever the plan's count of keys to walk had said.
        m.attempt_ended("j", true);
        let text = m.render();
        assert!(
            text.contains("backfilld_job_eta_seconds{job=\"j\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("backfilld_job_progress_ratio{job=\"j\"} 1"),
            "{text}"
        );
    }
}
