//! One claimed attempt at one job, from validation to the final state:
//! validate → resolve target → freeze upper bound → plan (dry run) → ceiling → archive →
//! batches → verify. Every write to the job row is fenced by the lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::archive::{ArchiveKind, ArchiveTable};
use crate::batch::{Batcher, Committed, TxSettings, WindowSql};
use crate::bloat::{BloatGuard, Standing};
use crate::change::{Change, Delete, Revert, Update};
use crate::claim::{self, Control, Lease, Release};
use crate::config::Config;
use crate::error::JobError;
use crate::fragment::{self, Fragments};
use crate::job::{Action, JobRow, JobSpec, Mode, Throttle};
use crate::keyset::{Key, Keyset};
use crate::metrics::Metrics;
use crate::plan::{self, Counter, Plan};
use crate::sql::Names;
use crate::target::{Resolve, Target};
use crate::throttle::{self, Controller, Health, Impact, Load, Reason};

/// What every runner shares with the daemon.
pub struct Context {
    pub pool: sqlx::PgPool,
    pub names: Names,
    pub config: watch::Receiver<Arc<Config>>,
    pub metrics: Metrics,
    pub owner: String,
}

impl Context {
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }
}

/// How an attempt ended short of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Planned,
    Paused,
    Cancelled,
    /// This replica is stopping: hand the job back without burning the attempt.
    Shutdown,
    LeaseLost,
    /// A slice stopped because a sibling slice stopped (never written: see `merge`).
    Stopped,
}

/// Runs one claimed job to the end of this attempt and records how it ended.
pub async fn run(ctx: Arc<Context>, row: JobRow, shutdown: CancellationToken) {
    let span = tracing::info_span!("job", job = %row.name, attempt = row.attempt, table = row.table_name.as_deref().unwrap_or(""));
    async move {
        let cfg = ctx.config();
        let lease = Lease {
            job_id: row.id,
            job: row.name.clone(),
            attempt: row.attempt,
            owner: ctx.owner.clone(),
        };
        let stop_heartbeat = CancellationToken::new();
        let control = claim::spawn_heartbeat(
            ctx.pool.clone(),
            ctx.names.clone(),
            lease.clone(),
            cfg.worker.lease_ttl,
            cfg.worker.heartbeat_interval,
            stop_heartbeat.clone(),
        );
        let interrupt = interrupt_on_control(&shutdown, control.clone());
        tracing::info!("job claimed");
        let mut attempt = Attempt {
            ctx: &ctx,
            row,
            lease,
            control,
            shutdown,
            interrupt,
            held: Default::default(),
            longest_wait: Default::default(),
        };
        let result = attempt
            .execute_with_retries(cfg.worker.max_batch_retries)
            .await;
        attempt.interrupt.cancel();
        stop_heartbeat.cancel();
        attempt.finish(result).await;
    }
    .instrument(span)
    .await
}

/// A token cancelled on shutdown or as soon as the heartbeat sees a pause, cancel or lost lease,
/// so long waits (sleeps, counting) end promptly.
fn interrupt_on_control(
    shutdown: &CancellationToken,
    mut control: watch::Receiver<Control>,
) -> CancellationToken {
    let interrupt = shutdown.child_token();
    let token = interrupt.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                changed = control.changed() => {
                    if changed.is_err() || *control.borrow() != Control::Run {
                        token.cancel();
                        return;
                    }
                }
            }
        }
    });
    interrupt
}

/// The job's resolved pieces, valid for this attempt.
struct Prepared {
    spec: JobSpec,
    target: Target,
    fragments: Fragments,
    /// Walks the target's keys, or the archive's for a revert.
    keyset: Keyset,
    /// `None` when the range is empty (nothing to do).
    upper: Option<Key>,
    /// The archive a revert restores from.
    source_archive: Option<ArchiveTable>,
}

struct Attempt<'a> {
    ctx: &'a Context,
    row: JobRow,
    lease: Lease,
    control: watch::Receiver<Control>,
    shutdown: CancellationToken,
    interrupt: CancellationToken,
    /// Seconds held back per reason in this attempt, for the closing log line.
    held: std::sync::Mutex<std::collections::BTreeMap<&'static str, f64>>,
    /// The longest any session had waited on a batch's row locks when that batch committed.
    longest_wait: std::sync::Mutex<Duration>,
}

/// Optional job-row columns written together, fenced.
#[derive(Default)]
struct RowUpdate {
    upper_bound: Option<Value>,
    estimated_total: Option<i64>,
    plan: Option<Value>,
    archive_table: Option<String>,
    remaining: Option<i64>,
    slices: Option<Value>,
}

const STORE: &str = "
UPDATE {jobs}
SET upper_bound = coalesce($4, upper_bound),
    estimated_total = coalesce($5, estimated_total),
    plan = coalesce($6, plan),
    archive_table = coalesce($7, archive_table),
    remaining = coalesce($8, remaining),
    slices = coalesce($9, slices),
    heartbeat_at = now()
WHERE id = $1 AND attempt = $2 AND lease_owner = $3 AND state = 'running'";

impl Attempt<'_> {
    fn table(&self) -> &str {
        self.row.table_name.as_deref().unwrap_or("?")
    }

    fn err(&self, step: &'static str) -> impl Fn(sqlx::Error) -> JobError + '_ {
        move |e| JobError::sql(&self.row.name, self.table(), step, e)
    }

    /// Retries transient errors outside batches (validation, planning, bookkeeping) in place,
    /// re-reading the job row each time; batches retry on their own.
    async fn execute_with_retries(&mut self, max: u32) -> Result<Outcome, JobError> {
        let mut retries = 0;
        loop {
            match self.execute().await {
                Err(e) if e.is_retryable() && retries < max => {
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
        let row: Option<JobRow> = sqlx::query_as(&self.ctx.names.render(
            "SELECT * FROM {jobs} WHERE id = $1 AND attempt = $2 AND lease_owner = $3 AND state = 'running'",
        ))
        .bind(self.lease.job_id)
        .bind(self.lease.attempt)
        .bind(&self.lease.owner)
        .fetch_optional(&self.ctx.pool)
        .await
        .map_err(self.err("re-reading the job row"))?;
        self.row = row.ok_or_else(|| JobError::LeaseLost {
            job: self.lease.job.clone(),
            attempt: self.lease.attempt,
        })?;
        Ok(())
    }

    async fn execute(&mut self) -> Result<Outcome, JobError> {
        let cfg = self.ctx.config();
        let spec = JobSpec::from_row(&self.row, &cfg.batch, &cfg.safety)?;
        let p = self.prepare(spec, &cfg).await?;
        let Some(upper) = p.upper.clone() else {
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
            Some(stored) => stored.clone(),
            None => match self.plan(&p, &upper, &cfg).await? {
                Some(plan) => plan,
                None => return Ok(self.interruption()),
            },
        };
        if p.spec.mode == Mode::DryRun {
            tracing::info!(
                rows_matching = plan["rows_matching"].as_i64(),
                "dry run planned; approve with `backfilld execute`"
            );
            return Ok(Outcome::Planned);
        }
        self.check_ceiling(&p, &plan)?;
        let change = self.build_change(&p).await?;
        if let Some(outcome) = self.run_slices(&p, &change, &upper, &plan).await? {
            return Ok(outcome);
        }
        self.verify(&p, &upper).await
    }

    /// Writes the given columns, fenced, and mirrors them into the in-memory row.
    async fn store(&mut self, u: RowUpdate) -> Result<(), JobError> {
        let done = sqlx::query(&self.ctx.names.render(STORE))
            .bind(self.lease.job_id)
            .bind(self.lease.attempt)
            .bind(&self.lease.owner)
            .bind(&u.upper_bound)
            .bind(u.estimated_total)
            .bind(&u.plan)
            .bind(&u.archive_table)
            .bind(u.remaining)
            .bind(&u.slices)
            .execute(&self.ctx.pool)
            .await
            .map_err(self.err("updating the job row"))?;
        if done.rows_affected() == 0 {
            return Err(JobError::LeaseLost {
                job: self.lease.job.clone(),
                attempt: self.lease.attempt,
            });
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

    /// Resolves the target and validates fragments; freezes the upper bound on first run.
    async fn prepare(&mut self, spec: JobSpec, cfg: &Config) -> Result<Prepared, JobError> {
        let mut conn = self
            .ctx
            .pool
            .acquire()
            .await
            .map_err(self.err("connecting"))?;
        let target = Resolve {
            job: &spec.name,
            table_name: &spec.table_name,
            key_columns: spec.key_columns.as_deref(),
            own_schema: &self.ctx.names.schema,
            allowed_tables: &cfg.safety.allowed_tables,
        }
        .run(&mut conn)
        .await?;
        let invalid = |e: fragment::FragmentError| {
            JobError::invalid(&spec.name, format!("on {}: {e}", target.display()))
        };
        let (fragments, source_archive) = if spec.action == Action::Revert {
            let archive = self.source_archive(&mut conn, &spec, &target).await?;
            (
                Fragments {
                    predicate: "true".into(),
                    assignments: Vec::new(),
                },
                Some(archive),
            )
        } else {
            let f = fragment::validate(&spec.predicate, spec.set_clause.as_deref(), &target)
                .map_err(invalid)?;
            fragment::validate_on_server(&mut conn, &target, &f)
                .await
                .map_err(self.err("validating fragments"))?
                .map_err(invalid)?;
            (f, None)
        };
        let keyset = match &source_archive {
            Some(a) => Keyset::new(&archive_as_target(a, &target)),
            None => Keyset::new(&target),
        };
        let upper = self.upper_bound(&mut conn, &keyset).await?;
        Ok(Prepared {
            spec,
            target,
            fragments,
            keyset,
            upper,
            source_archive,
        })
    }

    /// The archive of the job a revert undoes, indexed and vacuumed for keyset walking.
    async fn source_archive(
        &self,
        conn: &mut sqlx::PgConnection,
        spec: &JobSpec,
        target: &Target,
    ) -> Result<ArchiveTable, JobError> {
        let original = spec.reverts.as_deref().unwrap_or_default();
        let name: Option<Option<String>> = sqlx::query_scalar(
            &self
                .ctx
                .names
                .render("SELECT archive_table FROM {jobs} WHERE name = $1"),
        )
        .bind(original)
        .fetch_optional(&mut *conn)
        .await
        .map_err(self.err("finding the reverted job"))?;
        let Some(Some(name)) = name else {
            return Err(JobError::invalid(
                &spec.name,
                format!("job {original} has no archive to revert (archive was off, or it expired)"),
            ));
        };
        let archive = ArchiveTable::open(conn, &self.ctx.names, &name, target)
            .await
            .map_err(self.err("opening the archive"))?
            .ok_or_else(|| {
                JobError::invalid(
                    &spec.name,
                    format!("archive table {name} of job {original} is gone"),
                )
            })?;
        archive
            .prepare_revert(conn, self.ctx.config().bloat.vacuum_timeout)
            .await
            .map_err(self.err("indexing and vacuuming the archive"))?;
        Ok(archive)
    }

    /// The largest key at first start, frozen in the job row so the job always terminates.
    async fn upper_bound(
        &mut self,
        conn: &mut sqlx::PgConnection,
        keyset: &Keyset,
    ) -> Result<Option<Key>, JobError> {
        if let Some(stored) = &self.row.upper_bound {
            if stored.as_array().is_some_and(Vec::is_empty) {
                return Ok(None);
            }
            return Key::from_json(stored, keyset.width())
                .map(Some)
                .ok_or_else(|| {
                    JobError::invalid(
                        &self.row.name,
                        format!("stored upper_bound {stored} does not fit the key columns"),
                    )
                });
        }
        let row: Option<sqlx::postgres::PgRow> = sqlx::query(&keyset.upper_bound_sql())
            .fetch_optional(&mut *conn)
            .await
            .map_err(self.err("freezing the upper bound"))?;
        let upper = match row {
            None => None,
            Some(r) => Some(
                Key::from_row(&r, 0, keyset.width())
                    .map_err(self.err("freezing the upper bound"))?,
            ),
        };
        let json = upper
            .as_ref()
            .map_or(Value::Array(Vec::new()), Key::to_json);
        self.store(RowUpdate {
            upper_bound: Some(json),
            ..Default::default()
        })
        .await?;
        Ok(upper)
    }

    fn counter<'b>(
        &'b self,
        p: &'b Prepared,
        upper: &'b Key,
        predicate: &'b str,
        throttle: &'b Throttle,
    ) -> Counter<'b> {
        Counter {
            pool: &self.ctx.pool,
            job: &self.row.name,
            target: &p.target,
            keyset: &p.keyset,
            predicate,
            upper,
            throttle,
            cancel: &self.interrupt,
        }
    }

    /// Counts, samples and explains; stores the plan. `None` if interrupted while counting.
    async fn plan(
        &mut self,
        p: &Prepared,
        upper: &Key,
        cfg: &Config,
    ) -> Result<Option<Value>, JobError> {
        let started = Instant::now();
        let mut counted_target = p.target.clone();
        if let Some(a) = &p.source_archive {
            counted_target = archive_as_target(a, &p.target);
        }
        let counter = Counter {
            target: &counted_target,
            ..self.counter(p, upper, &p.fragments.predicate, &p.spec.throttle)
        };
        let Some(counted) = counter.count().await? else {
            return Ok(None);
        };
        let (in_range, matching) = (counted.keys, counted.matching);
        let samples = if p.source_archive.is_some() {
            Vec::new()
        } else {
            counter
                .samples(
                    &p.fragments.assignments,
                    p.spec.action,
                    cfg.safety.plan_sample_rows,
                )
                .await?
        };
        let plain = self.change_for(p, None);
        let explain = plan::explain(&self.ctx.pool, &plain, upper).await;
        let (estimated_seconds, estimate_basis) =
            plan::estimate(&p.spec.throttle, in_range, matching);
        let plan = Plan {
            rows_matching: matching,
            rows_in_range: in_range,
            upper_bound: upper.to_json(),
            samples,
            explain,
            estimated_seconds,
            estimate_basis,
            count_seconds: started.elapsed().as_secs_f64(),
            boundaries: counted.boundaries,
        };
        let value = serde_json::to_value(&plan).unwrap_or(Value::Null);
        self.store(RowUpdate {
            plan: Some(value.clone()),
            estimated_total: Some(in_range),
            ..Default::default()
        })
        .await?;
        tracing::info!(
            rows_matching = matching,
            rows_in_range = in_range,
            seconds = plan.count_seconds,
            "planned"
        );
        Ok(Some(value))
    }

    fn check_ceiling(&self, p: &Prepared, plan: &Value) -> Result<(), JobError> {
        let (Some(max), Some(would)) = (p.spec.max_affected, plan["rows_matching"].as_i64()) else {
            return Ok(());
        };
        if would > max {
            return Err(JobError::Ceiling {
                job: p.spec.name.clone(),
                table: p.target.display(),
                would_change: would,
                max_affected: max,
            });
        }
        Ok(())
    }

    fn change_for(&self, p: &Prepared, archive: Option<&ArchiveTable>) -> Change {
        match (&p.spec.action, &p.source_archive) {
            (Action::Revert, Some(src)) => Change::Revert(Revert::new(&p.target, &p.keyset, src)),
            (Action::Delete, _) => Change::Delete(Delete::new(
                &p.target,
                &p.keyset,
                &p.fragments.predicate,
                archive,
            )),
            _ => Change::Update(Update::new(&p.target, &p.keyset, &p.fragments, archive)),
        }
    }

    /// The change statement, creating the archive table first when the job archives.
    async fn build_change(&mut self, p: &Prepared) -> Result<Change, JobError> {
        if !p.spec.archive || p.spec.action == Action::Revert {
            return Ok(self.change_for(p, None));
        }
        let name = self.row.archive_table.clone().unwrap_or_else(|| {
            ArchiveTable::name_for(&p.spec.name, p.spec.id, chrono::Utc::now().date_naive())
        });
        let kind = match p.spec.action {
            Action::Delete => ArchiveKind::Delete,
            _ => ArchiveKind::Update {
                touched: p
                    .fragments
                    .assignments
                    .iter()
                    .map(|a| a.column.clone())
                    .collect(),
            },
        };
        let archive = ArchiveTable::new(&self.ctx.names, name.clone(), &p.target, kind);
        let mut conn = self
            .ctx
            .pool
            .acquire()
            .await
            .map_err(self.err("connecting"))?;
        archive
            .create(&mut conn, &p.target, &p.spec.name)
            .await
            .map_err(self.err("creating the archive table"))?;
        if self.row.archive_table.is_none() {
            self.store(RowUpdate {
                archive_table: Some(name),
                ..Default::default()
            })
            .await?;
        }
        Ok(self.change_for(p, Some(&archive)))
    }

    /// Runs every slice of the key range at once and merges how they ended. `Ok(None)` when the
    /// whole range is exhausted.
    async fn run_slices(
        &mut self,
        p: &Prepared,
        change: &Change,
        upper: &Key,
        plan: &Value,
    ) -> Result<Option<Outcome>, JobError> {
        let slices = self.slices(p, plan, upper).await?;
        if slices.len() > 1 {
            tracing::info!(
                slices = slices.len(),
                "walking the key range in parallel slices"
            );
        }
        let guard = self.bloat_guard(p).await;
        let this: &Self = self;
        let progress = std::sync::Mutex::new(Progress::new(&this.row));
        let stop = this.interrupt.child_token();
        // A slice that ends for any reason but exhaustion stops its siblings.
        let runs = slices.iter().map(|slice| async {
            let result = this
                .batch_loop(p, change, slice, &progress, &guard, &stop)
                .await;
            if !matches!(result, Ok(None)) {
                stop.cancel();
            }
            result
        });
        let ended = merge(futures_util::future::join_all(runs).await)?;
        if ended.is_none() && guard.wants_final() {
            self.vacuum(p, &guard, true, &self.interrupt).await;
        }
        Ok(ended)
    }

    /// The job's bloat guard for this attempt; says once when the role may not VACUUM.
    async fn bloat_guard(&self, p: &Prepared) -> BloatGuard {
        let cfg = self.ctx.config();
        let rows = self.row.estimated_total.unwrap_or(0);
        let wanted = p.spec.throttle.preset.is_gentle();
        let allowed = self
            .ctx
            .metrics
            .bloat_guard_allowed
            .with_label_values(&[&self.row.name]);
        let guard = BloatGuard::new(&self.ctx.pool, &cfg.bloat, wanted, &p.target, rows)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "bloat guard: cannot check VACUUM privilege; guard off");
                BloatGuard::without(Standing::Unchecked)
            });
        match guard.standing() {
            Standing::Active { .. } => allowed.set(1),
            Standing::NotPermitted => {
                allowed.set(0);
                tracing::warn!(
                    table = %p.target.display(),
                    "bloat guard: this role may not VACUUM the target (it needs to own the table, \
                     or MAINTAIN on PostgreSQL 17+); relying on autovacuum, batches hold while \
                     dead tuples exceed throttle.max_dead_tuple_ratio"
                );
            }
            Standing::Off | Standing::Disabled | Standing::Unchecked => {}
        }
        guard
    }

    /// The slices of this run: stored ones when resuming, else cut from the plan's window
    /// boundaries (only before the first batch), else the single `cursor`.
    async fn slices(
        &mut self,
        p: &Prepared,
        plan: &Value,
        upper: &Key,
    ) -> Result<Vec<Slice>, JobError> {
        let width = p.keyset.width();
        if let Some(stored) = &self.row.slices {
            return Slice::parse_all(stored, width).ok_or_else(|| {
                JobError::invalid(
                    &self.row.name,
                    format!("stored slices {stored} do not fit the key columns"),
                )
            });
        }
        let cuts = if p.spec.parallelism > 1 && self.row.cursor.is_none() {
            cut_points(plan, p.spec.parallelism, width)
        } else {
            Vec::new()
        };
        if cuts.is_empty() {
            let cursor = self.stored_cursor(width)?;
            return Ok(vec![Slice {
                slot: None,
                cursor,
                upper: upper.clone(),
            }]);
        }
        let starts = std::iter::once(None).chain(cuts.iter().cloned().map(Some));
        let ends = cuts.iter().cloned().chain([upper.clone()]);
        let slices: Vec<Slice> = starts
            .zip(ends)
            .enumerate()
            .map(|(i, (cursor, upper))| Slice {
                slot: Some(i),
                cursor,
                upper,
            })
            .collect();
        let json = Value::Array(slices.iter().map(Slice::to_json).collect());
        self.store(RowUpdate {
            slices: Some(json),
            ..Default::default()
        })
        .await?;
        Ok(slices)
    }

    /// The batch loop. `Ok(None)` when the slice's key range is exhausted.
    async fn batch_loop(
        &self,
        p: &Prepared,
        change: &Change,
        slice: &Slice,
        progress: &std::sync::Mutex<Progress>,
        guard: &BloatGuard,
        stop: &CancellationToken,
    ) -> Result<Option<Outcome>, JobError> {
        let cfg = self.ctx.config();
        let table = p.target.display();
        let batcher = self.batcher(p, change, slice, &table, &cfg);
        let mut cursor = slice.cursor.clone();
        let mut controller =
            Controller::new(&p.spec.throttle, self.row.batch_size_current.map(i64::from));
        let mut health = Health::new(guard.relies_on_autovacuum());
        let mut load = Load::default();
        let mut retries = 0u32;
        loop {
            if let Some(outcome) = self.interrupted() {
                return Ok(Some(outcome));
            }
            if stop.is_cancelled() {
                return Ok(Some(Outcome::Stopped));
            }
            if let Some(outcome) = self
                .wait_until_healthy(&mut health, p.target.oid, stop)
                .await
            {
                return Ok(Some(outcome));
            }
            let size = controller.size();
            match batcher.run(cursor.as_ref(), size).await {
                Ok(None) => return Ok(None),
                Ok(Some(done)) => {
                    retries = 0;
                    self.record(&done, size, progress);
                    let full = done.scanned >= size;
                    if full {
                        controller.observe(done.elapsed);
                    }
                    cursor = Some(done.last.clone());
                    match done.control {
                        Control::Pause => return Ok(Some(Outcome::Paused)),
                        Control::Cancel => return Ok(Some(Outcome::Cancelled)),
                        _ => {}
                    }
                    // A window short of its size has reached the slice's end: nothing to pause for.
                    if !full {
                        return Ok(None);
                    }
                    let pacing = Pacing {
                        controller: &mut controller,
                        load: &mut load,
                    };
                    if let Some(outcome) = self.settle(p, &done, pacing, guard, stop).await {
                        return Ok(Some(outcome));
                    }
                }
                Err(e) if e.is_retryable() && retries < cfg.worker.max_batch_retries => {
                    retries += 1;
                    controller.back_off();
                    tracing::warn!(error = %e, retry = retries, batch_size = controller.size(), "transient batch error; retrying");
                    let base = retry_base(&e, &p.spec.throttle);
                    if let Some(outcome) = self.back_off(&e, retries, base, stop).await {
                        return Ok(Some(outcome));
                    }
                    // The failed commit may or may not have landed: the stored checkpoint decides.
                    cursor = self.reload_cursor(p.keyset.width(), slice.slot).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The batch runner of one slice, with this run's settings.
    fn batcher<'b>(
        &'b self,
        p: &'b Prepared,
        change: &'b Change,
        slice: &'b Slice,
        table: &'b str,
        cfg: &Config,
    ) -> Batcher<'b> {
        let max_batch = Duration::from_millis(p.spec.throttle.max_batch_ms as u64);
        Batcher {
            pool: &self.ctx.pool,
            names: &self.ctx.names,
            lease: &self.lease,
            table,
            keyset: &p.keyset,
            change,
            upper: &slice.upper,
            settings: TxSettings::capped(
                cfg.batch.lock_timeout,
                cfg.batch.statement_timeout,
                max_batch,
                cfg.batch.synchronous_commit.clone(),
            ),
            lease_ttl: cfg.worker.lease_ttl,
            max_affected: p.spec.max_affected,
            window: WindowSql::new(&p.keyset),
            slot: slice.slot,
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
        let load = pacing.load.observe(done.elapsed, done.scanned);
        // The fast preset does not yield to a busier server.
        let max_load = if throttle.preset.is_gentle() {
            cfg.throttle.max_load_factor
        } else {
            0.0
        };
        for (pause, reason) in throttle::pauses(
            &throttle,
            done.changed,
            done.elapsed,
            impact,
            load,
            max_load,
        ) {
            if let Some(outcome) = self.pause(pause, reason, stop).await {
                return Some(outcome);
            }
        }
        if guard.record(done.changed) {
            self.vacuum(p, guard, false, stop).await;
        }
        self.interrupted()
    }

    /// Counts a batch's waiting sessions; with `back_off_when_blocking` the next batch shrinks
    /// and the impact is returned for the pause to lengthen, else a quiet impact.
    fn note_impact(&self, impact: Impact, cfg: &Config, controller: &mut Controller) -> Impact {
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

    /// The bloat guard's VACUUM; batches of this slice hold meanwhile. A failed VACUUM is logged
    /// and skipped: reclaiming space is worth a retry at the next interval, not a failed job.
    async fn vacuum(&self, p: &Prepared, guard: &BloatGuard, full: bool, wake: &CancellationToken) {
        let job = [self.row.name.as_str()];
        tracing::debug!(full, "bloat guard: vacuuming the target");
        match guard
            .vacuum(&self.ctx.pool, &self.row.name, &p.target, full, wake)
            .await
        {
            Ok(took) => {
                self.ctx.metrics.vacuums.with_label_values(&job).inc();
                self.hold_time(Reason::Vacuum, took);
                tracing::debug!(
                    ms = took.as_millis() as u64,
                    full,
                    "bloat guard: vacuumed the target"
                );
            }
            Err(e) if wake.is_cancelled() => {
                tracing::info!(error = %e, "bloat guard: VACUUM cancelled: the attempt is stopping")
            }
            Err(e) => {
                tracing::warn!(error = %e, "bloat guard: VACUUM failed; trying again at the next interval")
            }
        }
    }

    /// Counts a transient error and waits out its exponential backoff (unless woken).
    async fn back_off(
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

    /// The job's throttle under the current configuration (SIGHUP may have changed defaults).
    fn throttle(&self, p: &Prepared) -> Throttle {
        let cfg = self.ctx.config();
        Throttle::from_row(&self.row, &cfg.batch).unwrap_or_else(|_| p.spec.throttle.clone())
    }

    fn stored_cursor(&self, width: usize) -> Result<Option<Key>, JobError> {
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
        let row: Option<(Option<Value>,)> = sqlx::query_as(&self.ctx.names.render(
            "SELECT CASE WHEN $4::int IS NULL THEN cursor ELSE slices -> $4::int -> 'cursor' END
             FROM {jobs} WHERE id = $1 AND attempt = $2 AND lease_owner = $3 AND state = 'running'",
        ))
        .bind(self.lease.job_id)
        .bind(self.lease.attempt)
        .bind(&self.lease.owner)
        .bind(slot.map(|s| s as i32))
        .fetch_optional(&self.ctx.pool)
        .await
        .map_err(self.err("re-reading the checkpoint"))?;
        let Some((cursor,)) = row else {
            return Err(JobError::LeaseLost {
                job: self.lease.job.clone(),
                attempt: self.lease.attempt,
            });
        };
        self.parse_cursor(cursor.as_ref(), width)
    }

    fn record(&self, done: &Committed, size: i64, progress: &std::sync::Mutex<Progress>) {
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

    /// Holds batches while a health signal is over its limit, counting the time per reason.
    async fn wait_until_healthy(
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
    async fn pause(
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
        self.interrupted()
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
    fn held_summary(&self) -> String {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let parts: Vec<String> = held.iter().map(|(k, v)| format!("{k}={v:.1}")).collect();
        parts.join(" ")
    }

    fn interrupted(&self) -> Option<Outcome> {
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

    fn interruption(&self) -> Outcome {
        self.interrupted().unwrap_or(Outcome::Shutdown)
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

    /// Writes how the attempt ended and updates metrics.
    async fn finish(&self, result: Result<Outcome, JobError>) {
        let cfg = self.ctx.config();
        let release = match result {
            Ok(Outcome::LeaseLost) | Err(JobError::LeaseLost { .. }) => {
                self.ctx.metrics.leases_lost.inc();
                tracing::warn!(
                    "lease lost; another replica owns the job now; stopping without writing"
                );
                return;
            }
            Ok(Outcome::Succeeded) => Release::Succeeded,
            Ok(Outcome::Planned) => Release::Planned,
            Ok(Outcome::Paused) => Release::Paused,
            Ok(Outcome::Cancelled) => Release::Cancelled,
            Ok(Outcome::Shutdown) | Ok(Outcome::Stopped) => Release::Requeue,
            Err(e) => {
                self.ctx
                    .metrics
                    .batch_errors
                    .with_label_values(&[&self.row.name, e.kind()])
                    .inc();
                if e.is_retryable() {
                    tracing::warn!(error = %e, "attempt gave up after repeated transient errors");
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
        };
        for tries in 1..=3 {
            match claim::release(
                &self.ctx.pool,
                &self.ctx.names,
                &self.lease,
                &release,
                cfg.worker.max_attempts,
            )
            .await
            {
                Ok(Some(state)) => {
                    let waited = *self.longest_wait.lock().unwrap_or_else(|e| e.into_inner());
                    tracing::info!(
                        state = %state,
                        held_seconds = %self.held_summary(),
                        longest_wait_behind_a_batch_ms = waited.as_millis() as u64,
                        "attempt finished"
                    );
                    return;
                }
                Ok(None) => {
                    self.ctx.metrics.leases_lost.inc();
                    tracing::warn!("lease lost before the final state could be written");
                    return;
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
    }
}

/// The archive table seen as a keyset source: its own name, the target's key columns.
fn archive_as_target(archive: &ArchiveTable, target: &Target) -> Target {
    Target {
        quoted: archive.quoted.clone(),
        table: archive.name.clone(),
        ..target.clone()
    }
}

/// Exponential backoff with jitter, capped at 30 s.
fn backoff(retry: u32, base: Duration) -> Duration {
    let base = (base.as_millis() as u64).saturating_mul(1 << retry.min(9));
    let capped = base.min(30_000);
    Duration::from_millis(capped / 2 + fastrand::u64(0..=capped / 2))
}

/// The first step of the backoff after a transient error.
const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// A batch cut off at its ceiling was too big for the moment: the halved size is the remedy, so
/// its backoff starts at the ceiling (when shorter), not at 100 ms.
fn retry_base(e: &JobError, throttle: &Throttle) -> Duration {
    match e.kind() {
        "statement_timeout" => {
            Duration::from_millis(throttle.max_batch_ms as u64).min(BACKOFF_BASE)
        }
        _ => BACKOFF_BASE,
    }
}

/// Progress and ETA from keys scanned against the planned total.
struct Progress {
    scanned: i64,
    total: Option<i64>,
    started: Instant,
    scanned_this_attempt: i64,
}

impl Progress {
    fn new(row: &JobRow) -> Self {
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

/// The per-slice controls `settle` adjusts after each batch.
struct Pacing<'a> {
    controller: &'a mut Controller,
    load: &'a mut Load,
}

/// One slice of the key range: keys in `(cursor, upper]`, checkpointed into `slices[slot]`, or
/// into the job's `cursor` when the job runs as a single slice (`slot = None`).
#[derive(Debug, Clone, PartialEq)]
struct Slice {
    slot: Option<usize>,
    cursor: Option<Key>,
    upper: Key,
}

impl Slice {
    fn to_json(&self) -> Value {
        serde_json::json!({
            "cursor": self.cursor.as_ref().map(Key::to_json),
            "upper": self.upper.to_json(),
        })
    }

    fn parse_all(stored: &Value, width: usize) -> Option<Vec<Slice>> {
        stored
            .as_array()?
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let cursor = match &s["cursor"] {
                    Value::Null => None,
                    v => Some(Key::from_json(v, width)?),
                };
                let upper = Key::from_json(&s["upper"], width)?;
                Some(Slice {
                    slot: Some(i),
                    cursor,
                    upper,
                })
            })
            .collect()
    }
}

/// Keys that cut the range into `parts` slices of about equal key counts, taken from the plan's
/// window boundaries (ascending, deduplicated, never the upper bound itself).
fn cut_points(plan: &Value, parts: usize, width: usize) -> Vec<Key> {
    let total = plan["rows_in_range"].as_i64().unwrap_or(0);
    let bounds: Vec<(i64, Key)> = plan["boundaries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| Some((b[0].as_i64()?, Key::from_json(&b[1], width)?)))
        .collect();
    let mut cuts: Vec<Key> = Vec::new();
    for i in 1..parts as i64 {
        let target = total * i / parts as i64;
        if let Some((n, key)) = bounds.iter().find(|(n, _)| *n >= target)
            && *n < total
            && cuts.last() != Some(key)
        {
            cuts.push(key.clone());
        }
    }
    cuts
}

/// How a set of slices ended, as one outcome: an error wins (a permanent one over a transient
/// one), then lease loss, cancel, pause, shutdown; a slice stopped by a sibling defers to it.
fn merge(results: Vec<Result<Option<Outcome>, JobError>>) -> Result<Option<Outcome>, JobError> {
    fn rank(o: Outcome) -> u8 {
        match o {
            Outcome::LeaseLost => 5,
            Outcome::Cancelled => 4,
            Outcome::Paused => 3,
            Outcome::Shutdown => 2,
            Outcome::Stopped => 1,
            Outcome::Succeeded | Outcome::Planned => 0,
        }
    }
    let mut error: Option<JobError> = None;
    let mut outcome: Option<Outcome> = None;
    for result in results {
        match result {
            Err(e) => {
                if error
                    .as_ref()
                    .is_none_or(|held| held.is_retryable() && !e.is_retryable())
                {
                    error = Some(e);
                }
            }
            Ok(Some(o)) if outcome.is_none_or(|held| rank(o) > rank(held)) => outcome = Some(o),
            Ok(_) => {}
        }
    }
    if let Some(e) = error {
        return Err(e);
    }
    // Only siblings' stops and no cause: hand the job back rather than call it done.
    Ok(outcome.map(|o| {
        if o == Outcome::Stopped {
            Outcome::Shutdown
        } else {
            o
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: i64) -> Value {
        serde_json::json!([n.to_string()])
    }

    #[test]
    fn cut_points_split_by_key_counts() {
        let plan = serde_json::json!({
            "rows_in_range": 1000,
            "boundaries": [[100, key(100)], [300, key(300)], [600, key(600)], [1000, key(1000)]],
        });
        let cuts = cut_points(&plan, 2, 1);
        assert_eq!(cuts, vec![Key(vec!["600".into()])]);
        let cuts = cut_points(&plan, 4, 1);
        assert_eq!(cuts, vec![Key(vec!["300".into()]), Key(vec!["600".into()])]);
        assert!(
            cut_points(
                &serde_json::json!({"rows_in_range": 5, "boundaries": [[5, key(5)]]}),
                3,
                1
            )
            .is_empty()
        );
    }

    #[test]
    fn merge_prefers_errors_then_the_strongest_outcome() {
        let lost = || JobError::LeaseLost {
            job: "j".into(),
            attempt: 1,
        };
        assert!(matches!(
            merge(vec![Ok(None), Ok(Some(Outcome::Stopped)), Err(lost())]),
            Err(JobError::LeaseLost { .. })
        ));
        assert_eq!(
            merge(vec![Ok(Some(Outcome::Stopped)), Ok(Some(Outcome::Paused))]).unwrap(),
            Some(Outcome::Paused)
        );
        assert_eq!(
            merge(vec![Ok(Some(Outcome::Stopped)), Ok(None)]).unwrap(),
            Some(Outcome::Shutdown)
        );
        assert_eq!(merge(vec![Ok(None), Ok(None)]).unwrap(), None);
    }
}
