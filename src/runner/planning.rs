//! Planning: counting the range and the rows the predicate selects, samples, EXPLAIN, the
//! estimate, and the checklist's checks (idempotency, cascading deletes, unmatched staged keys,
//! other tables each batch would read in full).

use super::prepare::archive_as_target;
use super::*;
use crate::archive::ArchiveKind;
use crate::cascade::{self, Cascade};
use crate::fullscan;
use crate::idempotency::{self, Verdict};
use crate::plan::Walk;

/// The step an error of the idempotency check's trial change is reported under.
const SAMPLE_CHANGE_STEP: &str = "applying the change to a sample of the rows it selects (in the plan, rolled back: nothing changed)";
/// The step an error of the estimate's trial write is reported under.
const TRIAL_STEP: &str =
    "the trial write of the first window (in the plan, rolled back: nothing changed)";

impl Attempt<'_> {
    pub(super) fn counter<'b>(
        &'b self,
        p: &'b Prepared,
        upper: &'b Key,
        predicate: &'b str,
        throttle: &'b Throttle,
    ) -> Counter<'b> {
        Counter {
            pool: &self.ctx.pool,
            job: &self.row.name,
            table: &p.named,
            target: &p.target,
            keyset: &p.keyset,
            predicate,
            upper,
            throttle,
            cancel: &self.interrupt,
        }
    }

    /// Counts, samples and explains; stores the plan. `None` if interrupted while counting.
    pub(super) async fn plan(
        &mut self,
        p: &Prepared,
        upper: &Key,
        cfg: &Config,
    ) -> Result<Option<Plan>, JobError> {
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
        let (explain, cascades, warnings) = self.explain_and_keys(p, upper).await?;
        let mut plan = Plan {
            rows_matching: matching,
            rows_in_range: in_range,
            upper_bound: upper.to_json(),
            samples,
            explain,
            count_seconds: started.elapsed().as_secs_f64(),
            boundaries: counted.boundaries,
            matching_windows: counted.matching_windows,
            idempotency: self.idempotency(p, upper, cfg).await?,
            cascades,
            unmatched_staged_keys: self.unmatched_staged_keys(p).await?,
            warnings,
            pinned: p.pinned.clone(),
            ..Default::default()
        };
        self.estimate(p, &mut plan, upper, cfg).await?;
        self.store_plan(&plan).await?;
        Ok(Some(plan))
    }

    /// The keys the batches will walk, the trial write, and the estimate from them.
    async fn estimate(
        &self,
        p: &Prepared,
        plan: &mut Plan,
        upper: &Key,
        cfg: &Config,
    ) -> Result<(), JobError> {
        // Keys to walk, and where the walk starts (`None`: nothing to walk).
        let (walk, from) = match plan.walk(p.keyset.width()) {
            Walk::Whole => (plan.rows_in_range, Some(None)),
            Walk::Part { keys, from, .. } => (keys.1 - keys.0, Some(from)),
            Walk::Nothing => (0, None),
        };
        plan.keys_to_walk = Some(walk);
        plan.trial = match from {
            Some(from) => self.trial(p, plan, from.as_ref(), upper, cfg).await?,
            None => None,
        };
        let slices = p.spec.parallelism.min(plan.boundaries.len().max(1));
        (plan.estimated_seconds, plan.estimate_basis) = plan::estimate(
            &p.spec.throttle,
            walk,
            plan.rows_matching,
            plan.trial.as_ref(),
            slices,
        );
        Ok(())
    }

    /// The EXPLAIN, a delete's cascading foreign keys, and the plan's warnings, logged: other
    /// tables each batch would read in full, a tree whose selected rows reference each other.
    async fn explain_and_keys(
        &self,
        p: &Prepared,
        upper: &Key,
    ) -> Result<(serde_json::Value, Vec<Cascade>, Vec<String>), JobError> {
        let (explain, mut warnings) = self.explain(p, upper).await;
        let (cascades, tree_warnings) = self.cascades(p, upper).await?;
        warnings.extend(tree_warnings);
        warnings.extend(self.hidden(p).await);
        for w in &warnings {
            tracing::warn!(warning = %w, "plan");
        }
        Ok((explain, cascades, warnings))
    }

    /// Triggers on the table the job writes and row-level security over it (`hidden`). Only
    /// warnings: a failed read is logged, not a reason to fail the plan.
    async fn hidden(&self, p: &Prepared) -> Vec<String> {
        let (table, event) = match (p.spec.action, &p.into) {
            (Action::Insert, Some(into)) => (into, "INSERT"),
            (Action::Update, _) => (&p.target, "UPDATE"),
            (Action::Delete, _) => (&p.target, "DELETE"),
            _ => return Vec::new(),
        };
        crate::hidden::warnings(&self.ctx.pool, table, event)
            .await
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, "reading the table's triggers and row security failed");
                Vec::new()
            })
    }

    /// The EXPLAIN of the first batch-sized window's write, and the other tables it would read
    /// in full (`fullscan`; a revert's joins are ours and bounded).
    async fn explain(&self, p: &Prepared, upper: &Key) -> (serde_json::Value, Vec<String>) {
        let pool = &self.ctx.pool;
        let size = p.spec.throttle.initial_size;
        let window = plan::first_window(pool, &p.keyset, upper, size)
            .await
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, "reading the first window failed");
                None
            });
        let first_hi = window.as_ref().map_or(upper, |(_, hi)| hi);
        let explain = plan::explain(pool, &self.change_for(p, None), first_hi).await;
        let warnings = match window {
            Some((keys, _)) if p.source_archive.is_none() => {
                fullscan::warnings(pool, &explain, &p.target, keys).await
            }
            _ => Vec::new(),
        };
        (explain, warnings)
    }

    /// Times the write of the first windows after `from` (where the walk starts), growing from
    /// the initial batch size towards a batch's duration (`Tried::windows`), at the job's batch
    /// settings, in a transaction it rolls back: this server's speed for this change, which the
    /// estimate scales. When the job archives, the archive table is created inside that
    /// transaction (and is gone with it), so the trial writes the before-images too. Not run for
    /// a set clause that may call `nextval`, or an insert whose target's defaults would (a
    /// rolled-back row still takes its sequence value), or for a delete that cascades into
    /// child tables. A trial cancelled at the
    /// batch ceiling is kept as a lower bound; one whose first window waited too long for a row
    /// lock says nothing about speed and is dropped. Any other error in the first window fails
    /// the plan, as the first batch would fail; in a later one it ends the trial.
    async fn trial(
        &self,
        p: &Prepared,
        plan: &Plan,
        from: Option<&Key>,
        upper: &Key,
        cfg: &Config,
    ) -> Result<Option<plan::Trial>, JobError> {
        if !plan.cascades.is_empty() || takes_sequence_values(&p.fragments) {
            return Ok(None);
        }
        if let Some(into) = &p.into {
            let written = p.written.as_ref().unwrap_or(&p.fragments);
            if takes_sequence_values(written)
                || defaults_draw_sequences(&self.ctx.pool, into, written).await
            {
                return Ok(None);
            }
        }
        let mut archive = self.planned_archive(p);
        let change = self.change_for(p, archive.as_ref());
        let slice = Slice {
            slot: None,
            cursor: None,
            upper: upper.clone(),
        };
        let batcher = self.batcher(p, &change, &slice, &p.spec.throttle, cfg);
        let mut tx = batcher.begin(false).await?;
        if let Some(a) = &mut archive {
            let keyed = p.written();
            let created = a.create(&mut tx, keyed, &p.spec.name).await;
            created.map_err(self.err(TRIAL_STEP))?;
        }
        let mut tried = Tried::default();
        let ended = tried
            .windows(&batcher, &mut tx, from, &p.spec.throttle)
            .await;
        tx.rollback().await.map_err(self.err(TRIAL_STEP))?;
        let Err(e) = ended else {
            return Ok((tried.0.keys > 0).then_some(tried.0));
        };
        // A window cancelled at the ceiling is already counted, as a lower bound.
        let first = tried.0.windows.is_empty();
        match e.sqlstate() {
            Some("57014") => Ok(Some(tried.0)),
            // Past the first window, the batch that reaches the row fails the same way, naming
            // its window, after the batches before it commit, as without a trial.
            _ if !first => {
                tracing::info!(error = %e, "plan: a later trial window failed; estimating from the windows before it");
                Ok(Some(tried.0))
            }
            Some("55P03") => {
                tracing::info!(error = %e, "plan: the trial write waited for a row lock; estimating without it");
                Ok(None)
            }
            _ => Err(e.in_step(TRIAL_STEP)),
        }
    }

    /// The checklist's "run it twice" rule, for updates and inserts (a delete or revert cannot
    /// select its own result again). Warns when the sampled rows would change again; fails the
    /// plan when the change itself fails on the sampled rows (a NOT NULL, CHECK or unique
    /// violation, a bad cast): the first batch reaching them would fail the same way.
    async fn idempotency(
        &self,
        p: &Prepared,
        upper: &Key,
        cfg: &Config,
    ) -> Result<Option<Verdict>, JobError> {
        let limit = cfg.safety.plan_sample_rows.max(1);
        let pool = &self.ctx.pool;
        let (target, keyset, fragments) = (&p.target, &p.keyset, &p.fragments);
        let verdict = match (p.spec.action, &p.into) {
            (Action::Update, _) => {
                idempotency::check(pool, target, keyset, fragments, upper, limit).await
            }
            (Action::Insert, Some(into)) => {
                idempotency::check_insert(pool, target, into, keyset, fragments, upper, limit).await
            }
            _ => return Ok(None),
        }
        .map_err(self.err(SAMPLE_CHANGE_STEP))?;
        if verdict.warns() {
            tracing::warn!(verdict = %verdict.summary, "idempotency check");
        }
        Ok(Some(verdict))
    }

    /// For jobs that delete (a delete, or the revert of an insert): the foreign keys that would
    /// cascade into child tables. Refuses the job unless it allows cascades (no archive restores
    /// child rows), and always while rows of a table whose foreign key forbids the delete still
    /// reference rows it selects.
    async fn cascades(
        &self,
        p: &Prepared,
        upper: &Key,
    ) -> Result<(Vec<Cascade>, Vec<String>), JobError> {
        let predicate = match (&p.spec.action, &p.source_archive) {
            (Action::Delete, _) => p.fragments.predicate.clone(),
            // The rows the revert may delete: those whose keys the insert archived (rows
            // changed since stay, so this counts at most what it deletes).
            (Action::Revert, Some(a)) if matches!(a.kind, ArchiveKind::Insert) => a.keys_archived(),
            _ => return Ok((Vec::new(), Vec::new())),
        };
        let pool = &self.ctx.pool;
        let found =
            cascade::find(pool, &p.spec.name, &p.target, &p.keyset, &predicate, upper).await?;
        let reverting = p.spec.action == Action::Revert;
        cascade::judge(
            &p.spec.name,
            &p.target,
            found,
            p.spec.allow_cascade,
            reverting,
        )
    }

    /// For updates from a data file: staged keys with no target row.
    async fn unmatched_staged_keys(&self, p: &Prepared) -> Result<Option<i64>, JobError> {
        let Some(staged) = &self.row.staged_table else {
            return Ok(None);
        };
        let table = crate::sql::qualified(&self.ctx.names.schema, staged);
        crate::staging::count_unmatched(&self.ctx.pool, &table, &p.target)
            .await
            .map(Some)
            .map_err(self.err("counting staged keys without a target row"))
    }

    /// Stores the plan and the total it found (the progress denominator), and logs it.
    pub(super) async fn store_plan(&mut self, plan: &Plan) -> Result<(), JobError> {
        let stored = plan.to_stored().map_err(|e| {
            JobError::invalid(&self.row.name, format!("the plan cannot be stored ({e})"))
        })?;
        self.store(RowUpdate {
            plan: Some(stored),
            estimated_total: Some(plan.keys_to_walk.unwrap_or(plan.rows_in_range)),
            ..Default::default()
        })
        .await?;
        tracing::info!(
            rows_matching = plan.rows_matching,
            rows_in_range = plan.rows_in_range,
            keys_to_walk = plan.keys_to_walk,
            seconds = plan.count_seconds,
            estimated_seconds = plan.estimated_seconds.round(),
            estimate_basis = %plan.estimate_basis,
            "planned"
        );
        Ok(())
    }

    pub(super) fn check_ceiling(&self, p: &Prepared, plan: &Plan) -> Result<(), JobError> {
        let Some(max) = p.spec.max_affected else {
            return Ok(());
        };
        let would = plan.rows_matching;
        if would > max {
            return Err(JobError::Ceiling {
                job: p.spec.name.clone(),
                table: p.named.clone(),
                would_change: would,
                max_affected: max,
                committed: 0,
            });
        }
        Ok(())
    }
}

/// A set clause that may draw from a sequence: `nextval(…)`, or `DEFAULT`, whose column default
/// may. A word match on the source text (a string literal can trigger it; that only skips the
/// trial).
fn takes_sequence_values(fragments: &Fragments) -> bool {
    fragments.assignments.iter().any(|a| {
        let expr = a.expr.to_ascii_lowercase();
        expr.contains("nextval")
            || expr
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .any(|w| w == "default")
    })
}

/// Whether an insert into `into` draws sequence values for the columns its set clause leaves
/// to their defaults (an identity column, or a default calling `nextval`, the column's or its
/// domain's), which a rolled-back
/// trial would take for good. When it cannot tell, it says so.
async fn defaults_draw_sequences(pool: &crate::db::Db, into: &Target, written: &Fragments) -> bool {
    let assigned: Vec<&str> = written
        .assignments
        .iter()
        .map(|a| a.column.as_str())
        .collect();
    let drawn: sqlx::Result<bool> = crate::sql::query_scalar(
        "SELECT EXISTS (
           SELECT FROM pg_attribute a
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
           WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
             AND a.attname::text <> ALL ($2::text[])
             AND (a.attidentity <> '' OR pg_get_expr(d.adbin, d.adrelid) ~* 'nextval'
                  -- A domain's default, where the column has none of its own.
                  OR (d.adbin IS NULL AND EXISTS (
                        SELECT FROM pg_type ty WHERE ty.oid = a.atttypid AND ty.typtype = 'd'
                          AND ty.typdefault ~* 'nextval'))))",
    )
    .bind(sqlx::postgres::types::Oid(into.oid))
    .bind(&assigned)
    .fetch_one(pool)
    .await;
    drawn.unwrap_or(true)
}

/// Windows of a trial write, at most.
const TRIAL_WINDOWS: usize = 4;

/// A trial in progress.
#[derive(Default)]
struct Tried(plan::Trial);

impl Tried {
    /// Writes the walk's first windows in `tx`: the job's initial batch size, then windows sized
    /// from the last one's speed to take three quarters of `target_batch_ms` (at most eight
    /// times as many keys), until one after the first takes half the target, the windows
    /// together take the target, a window reaches `max_size` or ends the walk. The first window
    /// pays the statements' start-up; the last is about a batch. Row locks are held until the
    /// caller rolls back: about two targets' worth at most (the default `max_batch_ms`), each
    /// statement under the batch's timeouts. A window cancelled at the ceiling is counted as a
    /// lower bound; the caller decides what an error means.
    async fn windows(
        &mut self,
        batcher: &crate::batch::Batcher<'_>,
        tx: &mut sqlx::PgConnection,
        from: Option<&Key>,
        throttle: &Throttle,
    ) -> Result<(), JobError> {
        let target = throttle.target_batch_ms as f64 / 1000.0;
        let (mut cursor, mut size) = (from.cloned(), throttle.initial_size);
        for n in 1..=TRIAL_WINDOWS {
            let started = Instant::now();
            let tried = batcher.trial(tx, cursor.as_ref(), size).await;
            let seconds = started.elapsed().as_secs_f64();
            let (keys, changed, last) = match tried {
                Ok(Some(found)) => found,
                Ok(None) => return Ok(()),
                Err(e) => {
                    if e.sqlstate() == Some("57014") {
                        self.add(size, 0, seconds);
                        self.0.timed_out = true;
                    }
                    return Err(e);
                }
            };
            self.add(keys, changed, seconds);
            let enough = n > 1 && seconds >= target / 2.0;
            if enough || keys < size || size >= throttle.max_size || self.0.seconds >= target {
                return Ok(());
            }
            let aim = keys as f64 * 0.75 * target / seconds.max(1e-6);
            size = (aim as i64).clamp(keys, keys * 8).min(throttle.max_size);
            cursor = Some(last);
        }
        Ok(())
    }

    fn add(&mut self, keys: i64, changed: i64, seconds: f64) {
        let t = &mut self.0;
        (t.keys, t.changed, t.seconds) = (t.keys + keys, t.changed + changed, t.seconds + seconds);
        t.windows.push(plan::TrialWindow { keys, seconds });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fragment::Assignment;

    fn set(expr: &str) -> Fragments {
        Fragments {
            predicate: "true".into(),
            assignments: vec![Assignment {
                column: "c".into(),
                expr: expr.into(),
            }],
        }
    }

    #[test]
    fn a_set_clause_that_may_take_sequence_values_skips_the_trial() {
        assert!(takes_sequence_values(&set("nextval('s')")));
        assert!(takes_sequence_values(&set("DEFAULT")));
        assert!(takes_sequence_values(&set(
            "coalesce(c, NEXTVAL('public.s'))"
        )));
        assert!(!takes_sequence_values(&set("abalance * 100")));
        assert!(!takes_sequence_values(&set("default_rate * 2")));
    }
}
