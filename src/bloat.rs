//! The bloat guard: a backfill rewrites every row it changes, and each old version stays in the
//! heap as a dead tuple until VACUUM reclaims it. Left to autovacuum (which wakes at 20 % dead
//! tuples, once a minute), a full-table backfill doubles the heap like a single UPDATE. The guard
//! VACUUMs the target after every `vacuum_every_fraction` of its rows changed, so the space freed
//! by earlier batches is recorded in the free space map and reused by later ones: the heap grows
//! by about one interval's worth of new versions instead of by the whole change.
//!
//! The VACUUM is gentle by construction: `SKIP_LOCKED` (never queue behind autovacuum or DDL),
//! `TRUNCATE false` (truncation takes an ACCESS EXCLUSIVE lock that would stall live traffic),
//! its own `statement_timeout`. While the job runs it is mostly heap-only (`INDEX_CLEANUP OFF`):
//! it prunes the pages changed since the last run, which frees the dead versions' space for
//! reuse; only their 4-byte line pointers stay until the index entries pointing at them are
//! removed. A page keeping such line pointers cannot be marked all-visible, so every later
//! heap-only run reads it again: the runs grow longer as the job goes (measured: 49 runs of a
//! 5M-row job took 17.7 s, most of it rereading pages pruned before). Every
//! `index_cleanup_every`-th run therefore cleans the indexes too (`INDEX_CLEANUP ON`, one pass over
//! each index), which frees those line pointers, and the pages become skippable again. One full
//! VACUUM follows when the job's walk ends.
//!
//! A role that may not VACUUM the target (PostgreSQL 15: owner, database owner or superuser;
//! 17+: also the MAINTAIN privilege) still runs its jobs: the guard says so once in the log and in
//! `backfilld_bloat_guard_vacuum_allowed{job} 0`, and the dead-tuple health signal holds batches
//! until autovacuum catches up. So does a replica behind a transaction pooler without
//! `database.direct_url` (`Standing::NoSession`): VACUUM needs a session of its own.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgConnection;

use crate::db::Db;
use tokio_util::sync::CancellationToken;

use crate::config::BloatConfig;
use crate::error::JobError;
use crate::target::Target;

/// Whether the connected role may VACUUM the table (without it PostgreSQL only warns and skips),
/// and that role's name. A partitioned table's VACUUM covers its partitions, each checked on its
/// own: the role must be allowed on every one (PostgreSQL skips the others with a warning).
const MAY_VACUUM: &str = "
SELECT bool_and(
           pg_has_role(c.relowner, 'USAGE')
        OR pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE')
        OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
        OR CASE WHEN current_setting('server_version_num')::int >= 170000
                THEN has_table_privilege(c.oid, 'MAINTAIN') ELSE false END),
       current_user::text
FROM pg_class c
WHERE c.oid = to_regclass($1) OR c.oid IN (SELECT relid FROM pg_partition_tree(to_regclass($1)))
HAVING count(*) > 0";

/// Whether the role of `conn` may VACUUM the table `quoted` (`"schema"."name"`), and that role's
/// name; `None` when no such table exists.
pub async fn may_vacuum(
    conn: &mut sqlx::PgConnection,
    quoted: &str,
) -> sqlx::Result<Option<(bool, String)>> {
    crate::sql::query_as(MAY_VACUUM)
        .bind(quoted)
        .fetch_optional(conn)
        .await
}

/// One job's guard, shared by its slices.
#[derive(Debug)]
pub struct BloatGuard {
    standing: Standing,
    /// The role the VACUUMs run as (checked on their connection), for the log.
    role: Option<String>,
    state: Mutex<GuardState>,
    timeout: Duration,
    cost_delay: Duration,
    index_cleanup_every: u32,
}

#[derive(Debug, Default)]
struct GuardState {
    /// Heap-only runs since the indexes were last cleaned.
    heap_only_runs: u32,
    since_vacuum: i64,
    /// Any row changed since the guard started: the final full VACUUM has work to do.
    changed_any: bool,
    /// A slice is vacuuming now; others keep going.
    running: bool,
}

/// How the guard stands for a job, decided once per attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The job does not want it (the fast preset): no VACUUM, no waiting for autovacuum.
    Off,
    /// VACUUM after every `every` rows changed.
    Active { every: i64 },
    /// Turned off in the configuration: the gentle job waits for autovacuum instead.
    Disabled,
    /// The role may not VACUUM the target: the job waits for autovacuum instead.
    NotPermitted,
    /// Through a transaction pooler without `database.direct_url`: no connection may VACUUM.
    NoSession,
    /// The privilege check failed: the job waits for autovacuum instead.
    Unchecked,
}

impl BloatGuard {
    /// A guard that never VACUUMs, standing as given.
    pub fn without(standing: Standing) -> Self {
        Self::with(standing, &BloatConfig::default())
    }

    fn with(standing: Standing, cfg: &BloatConfig) -> Self {
        Self {
            standing,
            role: None,
            state: Mutex::new(GuardState::default()),
            timeout: cfg.vacuum_timeout,
            cost_delay: cfg.vacuum_cost_delay,
            index_cleanup_every: cfg.index_cleanup_every,
        }
    }

    pub fn standing(&self) -> Standing {
        self.standing
    }

    /// The role the VACUUMs run as, when it was checked.
    pub fn role(&self) -> &str {
        self.role.as_deref().unwrap_or("?")
    }

    /// Whether batches should wait for autovacuum when dead tuples pile up: a gentle job whose
    /// guard is not running.
    pub fn relies_on_autovacuum(&self) -> bool {
        !matches!(self.standing, Standing::Off | Standing::Active { .. })
    }

    /// Sets the guard up for a job over `rows` keys, checking once whether the role may VACUUM.
    pub async fn new(
        pool: &Db,
        cfg: &BloatConfig,
        wanted: bool,
        target: &Target,
        rows: i64,
    ) -> Result<Self, sqlx::Error> {
        let mut role = None;
        let standing = if !wanted {
            Standing::Off
        } else if !cfg.guard {
            Standing::Disabled
        } else if let Some(mut session) = pool.session().await? {
            // Asked on the connection the VACUUMs run on: with `database.direct_url` that may
            // be another role than the pool's, and a VACUUM the role may not run only warns.
            let permitted = may_vacuum(&mut session, &target.quoted).await?;
            role = permitted.as_ref().map(|(_, r)| r.clone());
            match permitted {
                Some((true, _)) => Standing::Active {
                    every: interval(cfg, rows),
                },
                _ => Standing::NotPermitted,
            }
        } else {
            Standing::NoSession
        };
        Ok(Self {
            role,
            ..Self::with(standing, cfg)
        })
    }

    /// Counts changed rows; `true` when this caller should VACUUM now (it then owns the run
    /// until `vacuum` returns).
    pub fn record(&self, changed: i64) -> bool {
        let Standing::Active { every } = self.standing else {
            return false;
        };
        // A poisoned lock only means a slice panicked while adding numbers.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.since_vacuum += changed;
        s.changed_any |= changed > 0;
        if s.running || s.since_vacuum < every {
            return false;
        }
        s.running = true;
        s.since_vacuum = 0;
        true
    }

    /// How the next run between batches treats the indexes: every `index_cleanup_every`-th run
    /// cleans them (see the module doc), the others leave them alone.
    fn next_cleanup(&self) -> IndexCleanup {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let every = self.index_cleanup_every;
        if every > 0 && s.heap_only_runs + 1 >= every {
            s.heap_only_runs = 0;
            IndexCleanup::On
        } else {
            s.heap_only_runs += 1;
            IndexCleanup::Off
        }
    }

    /// An earlier attempt of the job changed rows: the final VACUUM is due even if this attempt
    /// changes none (one stopped during that VACUUM leaves only it to do).
    pub fn note_earlier_changes(&self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .changed_any = true;
    }

    /// Whether the walk changed rows under an active guard: the final full VACUUM is due.
    pub fn wants_final(&self) -> bool {
        matches!(self.standing, Standing::Active { .. })
            && self
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .changed_any
    }

    /// VACUUMs the target for `pass` (see [`Pass`]); returns how long it took, `None` when
    /// PostgreSQL skipped it (another session held a lock that conflicts: autovacuum, ANALYZE,
    /// an index build); the rows it was due for are then due again after half an interval.
    /// Between batches the caller holds its batches meanwhile. When `wake` fires (shutdown,
    /// pause, cancel) the running VACUUM is cancelled server-side, so a stop never waits for it.
    pub async fn vacuum(
        &self,
        pool: &Db,
        job: &str,
        target: &Target,
        pass: Pass,
        wake: &CancellationToken,
    ) -> Result<Option<Duration>, JobError> {
        let started = Instant::now();
        let index_cleanup = match pass {
            Pass::Between => self.next_cleanup(),
            Pass::Final => IndexCleanup::Auto,
            Pass::HeapOnly => IndexCleanup::Off,
        };
        let run = Run {
            pool,
            target,
            index_cleanup,
            wake,
        };
        let result = self.run_vacuum(&run).await;
        let ran = matches!(result, Ok(true));
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.running = false;
            if let (false, Standing::Active { every }) = (ran, self.standing) {
                s.since_vacuum = s.since_vacuum.max(every / 2);
            }
        }
        let step = "vacuuming the target (bloat guard)";
        let ran = result.map_err(|e| JobError::sql(job, &target.display(), step, e))?;
        Ok(ran.then(|| started.elapsed()))
    }

    async fn run_vacuum(&self, run: &Run<'_>) -> Result<bool, sqlx::Error> {
        // Session settings (VACUUM cannot run inside a transaction block, so no SET LOCAL),
        // reset before the connection goes back to the pool; if anything fails on the way the
        // connection is closed instead, so they can never leak.
        let Some(mut pooled) = run.pool.session().await? else {
            return Ok(false); // never: the guard stands `NoSession` without sessions
        };
        let settings = (self.timeout, self.cost_delay);
        let result = run.on(&mut pooled, settings).await;
        if result.is_err() || reset_session(&mut pooled).await.is_err() {
            pooled.close_on_drop();
        }
        result
    }
}

/// Which VACUUM the guard runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Between batches: heap-only, the indexes every `index_cleanup_every`-th run.
    Between,
    /// After the last batch: indexes too, unless PostgreSQL finds nothing worth it.
    Final,
    /// Heap-only, once: frees the dead versions' space for the next writes (before a revert).
    HeapOnly,
}

/// `INDEX_CLEANUP` of a guard VACUUM: `Off` between batches, `On` every few runs there, `Auto`
/// (PostgreSQL decides; it skips a pass that would free almost nothing) in the final one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndexCleanup {
    Off,
    On,
    Auto,
}

impl IndexCleanup {
    fn as_sql(self) -> &'static str {
        match self {
            IndexCleanup::Off => "OFF",
            IndexCleanup::On => "ON",
            IndexCleanup::Auto => "AUTO",
        }
    }
}

/// One VACUUM of the guard.
struct Run<'a> {
    pool: &'a Db,
    target: &'a Target,
    index_cleanup: IndexCleanup,
    wake: &'a CancellationToken,
}

impl Run<'_> {
    /// Runs the VACUUM on `conn`; `false` when PostgreSQL skipped it.
    async fn on(
        &self,
        conn: &mut PgConnection,
        (timeout, cost_delay): (Duration, Duration),
    ) -> Result<bool, sqlx::Error> {
        let pid: i32 = crate::sql::query_scalar(
            "SELECT pg_backend_pid() FROM (SELECT set_config('statement_timeout', $1, false),
                                                  set_config('vacuum_cost_delay', $2, false)) s",
        )
        .bind(format!("{}ms", timeout.as_millis()))
        .bind(format!("{}ms", cost_delay.as_millis()))
        .fetch_one(&mut *conn)
        .await?;
        let vacuum = format!(
            "VACUUM (SKIP_LOCKED, TRUNCATE false, INDEX_CLEANUP {}) {}",
            self.index_cleanup.as_sql(),
            self.target.quoted
        );
        let before = self.vacuum_count(conn).await?;
        let running = crate::sql::query(&vacuum).execute(&mut *conn);
        let cancel = || self.pool.cancel_backend(pid, true);
        crate::db::cancellable(running, self.wake, cancel).await?;
        Ok(before.is_none() || self.vacuum_count(conn).await? != before)
    }

    /// How many VACUUMs of the target the statistics have counted; `None` for a partitioned
    /// parent (its partitions are counted, not it). `SKIP_LOCKED` (and a role that may not)
    /// make PostgreSQL skip the VACUUM with a warning instead of an error: the count tells.
    async fn vacuum_count(&self, conn: &mut PgConnection) -> Result<Option<i64>, sqlx::Error> {
        if self.target.partitioned {
            return Ok(None);
        }
        // Without `track_counts` nothing is counted: unknown, taken as run.
        crate::sql::query_scalar(
            "SELECT CASE WHEN current_setting('track_counts')::bool
                         THEN pg_stat_get_vacuum_count($1) END",
        )
        .bind(sqlx::postgres::types::Oid(self.target.oid))
        .fetch_one(conn)
        .await
    }
}

/// Back to the connection's start-up values (the pool's session defaults).
async fn reset_session(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    for reset in ["RESET statement_timeout", "RESET vacuum_cost_delay"] {
        crate::sql::query(reset).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Rows changed between two VACUUMs: a share of the table, never fewer than the minimum.
fn interval(cfg: &BloatConfig, rows: i64) -> i64 {
    ((rows as f64 * cfg.vacuum_every_fraction) as i64).max(cfg.vacuum_min_rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nth_run_between_batches_cleans_the_indexes() {
        let cfg = BloatConfig {
            index_cleanup_every: 3,
            ..BloatConfig::default()
        };
        let guard = BloatGuard::with(Standing::Active { every: 10 }, &cfg);
        let runs: Vec<IndexCleanup> = (0..7).map(|_| guard.next_cleanup()).collect();
        use IndexCleanup::{Off, On};
        assert_eq!(runs, [Off, Off, On, Off, Off, On, Off]);
        let never = BloatGuard::with(
            Standing::Active { every: 10 },
            &BloatConfig {
                index_cleanup_every: 0,
                ..BloatConfig::default()
            },
        );
        assert!((0..7).all(|_| never.next_cleanup() == Off));
    }

    fn guard(every: i64) -> BloatGuard {
        BloatGuard::without(Standing::Active { every })
    }

    #[test]
    fn interval_is_a_share_of_the_table_with_a_floor() {
        let cfg = BloatConfig {
            vacuum_every_fraction: 0.02,
            ..BloatConfig::default()
        };
        assert_eq!(interval(&cfg, 5_000_000), 100_000);
        assert_eq!(interval(&cfg, 100_000), cfg.vacuum_min_rows);
    }

    #[test]
    fn one_caller_vacuums_per_interval() {
        let g = guard(1000);
        assert!(!g.record(600));
        assert!(g.record(600), "crossed the interval");
        assert!(!g.record(5000), "a vacuum is running: others keep going");
        g.state.lock().unwrap().running = false;
        assert!(g.record(0), "rows counted meanwhile are due at once");
        assert!(g.wants_final());
        let off = BloatGuard::without(Standing::NotPermitted);
        assert!(!off.record(1_000_000));
        assert!(!off.wants_final());
        assert!(off.relies_on_autovacuum() && !g.relies_on_autovacuum());
        let resumed = guard(1000);
        assert!(!resumed.wants_final());
        resumed.note_earlier_changes();
        assert!(resumed.wants_final(), "an earlier attempt's rows are due");
        off.note_earlier_changes();
        assert!(!off.wants_final());
    }
}
