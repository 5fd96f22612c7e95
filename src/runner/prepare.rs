//! Preparing an attempt: resolve the target, validate fragments on the server, freeze the upper
//! bound, plan (dry run), check the ceiling, and build the change (with its archive).

use super::*;
use crate::cascade::{self, Cascade};
use crate::fragment::ServerCheck;
use crate::idempotency::{self, Verdict};

impl Attempt<'_> {
    /// Resolves the target and validates fragments; freezes the upper bound on first run.
    pub(super) async fn prepare(
        &mut self,
        spec: JobSpec,
        cfg: &Config,
    ) -> Result<Prepared, JobError> {
        if spec.action == Action::Insert {
            return self.prepare_insert(spec, cfg).await;
        }
        let mut conn = self.connection().await?;
        let target = Resolve {
            job: &spec.name,
            table_name: &spec.table_name,
            key_columns: spec.key_columns.as_deref(),
            own_schema: &self.ctx.names.schema,
            allowed_tables: &cfg.safety.allowed_tables,
        }
        .run(&mut conn)
        .await
        .map_err(|e| e.in_column("table_name"))?;
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
            match fragment::validate_on_server(&mut conn, &target, &f).await {
                Ok(()) => {}
                Err(ServerCheck::Rejected(e)) => return Err(invalid(e)),
                Err(ServerCheck::Transient(e)) => return Err(self.err("validating fragments")(e)),
            }
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
            into: None,
        })
    }

    /// An insert walks `source_table` and inserts into `table_name`, which needs a unique key:
    /// it makes the insert idempotent (`ON CONFLICT DO NOTHING`) and names what a revert deletes.
    async fn prepare_insert(&mut self, spec: JobSpec, cfg: &Config) -> Result<Prepared, JobError> {
        let mut conn = self.connection().await?;
        let resolve = |table_name, key_columns| Resolve {
            job: &spec.name,
            table_name,
            key_columns,
            own_schema: &self.ctx.names.schema,
            allowed_tables: &cfg.safety.allowed_tables,
        };
        let source_name = spec.source_table.as_deref().unwrap_or_default();
        let source = resolve(source_name, spec.key_columns.as_deref())
            .run(&mut conn)
            .await
            .map_err(|e| e.in_column("source_table"))?;
        let into = resolve(&spec.table_name, None)
            .run(&mut conn)
            .await
            .map_err(|e| e.in_column("table_name"))?;
        let invalid = |e: fragment::FragmentError| {
            let (from, to) = (source.display(), into.display());
            JobError::invalid(&spec.name, format!("inserting from {from} into {to}: {e}"))
        };
        let set = spec.set_clause.as_deref().unwrap_or_default();
        let f = fragment::validate_insert(&spec.predicate, set, &into).map_err(invalid)?;
        match fragment::validate_insert_on_server(&mut conn, &source, &into, &f).await {
            Ok(()) => {}
            Err(ServerCheck::Rejected(e)) => return Err(invalid(e)),
            Err(ServerCheck::Transient(e)) => return Err(self.err("validating fragments")(e)),
        }
        let keyset = Keyset::new(&source);
        let upper = self.upper_bound(&mut conn, &keyset).await?;
        Ok(Prepared {
            spec,
            target: source,
            fragments: f,
            keyset,
            upper,
            source_archive: None,
            into: Some(into),
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
            idempotency: self.idempotency(p, upper, cfg).await,
            cascades: self.cascades(p, upper).await?,
            unmatched_staged_keys: self.unmatched_staged_keys(p).await?,
        };
        self.store_plan(&plan).await?;
        Ok(Some(plan))
    }

    /// The checklist's "run it twice" rule, for updates (a delete or revert cannot select its
    /// own result again). Warns when the sampled rows would change again.
    async fn idempotency(&self, p: &Prepared, upper: &Key, cfg: &Config) -> Option<Verdict> {
        if p.spec.action != Action::Update {
            return None;
        }
        let limit = cfg.safety.plan_sample_rows.max(1);
        let pool = &self.ctx.pool;
        let verdict =
            idempotency::check(pool, &p.target, &p.keyset, &p.fragments, upper, limit).await;
        if verdict.idempotent != Some(true) {
            tracing::warn!(verdict = %verdict.summary, "idempotency check");
        }
        Some(verdict)
    }

    /// For deletes: the foreign keys that would cascade into child tables. Refuses the job unless
    /// it allows cascades (the archive cannot restore child rows).
    async fn cascades(&self, p: &Prepared, upper: &Key) -> Result<Vec<Cascade>, JobError> {
        if p.spec.action != Action::Delete {
            return Ok(Vec::new());
        }
        let (pool, pred) = (&self.ctx.pool, &p.fragments.predicate);
        let found = cascade::find(pool, &p.spec.name, &p.target, &p.keyset, pred, upper).await?;
        if !found.is_empty() && !p.spec.allow_cascade {
            return Err(cascade::refusal(&p.spec.name, &p.target, &found));
        }
        Ok(found)
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
    async fn store_plan(&mut self, plan: &Plan) -> Result<(), JobError> {
        let stored = plan.to_stored().map_err(|e| {
            JobError::invalid(&self.row.name, format!("the plan cannot be stored ({e})"))
        })?;
        self.store(RowUpdate {
            plan: Some(stored),
            estimated_total: Some(plan.rows_in_range),
            ..Default::default()
        })
        .await?;
        tracing::info!(
            rows_matching = plan.rows_matching,
            rows_in_range = plan.rows_in_range,
            seconds = plan.count_seconds,
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
                table: p.target.display(),
                would_change: would,
                max_affected: max,
            });
        }
        Ok(())
    }

    fn change_for(&self, p: &Prepared, archive: Option<&ArchiveTable>) -> Change {
        if let Some(into) = &p.into {
            let insert = Insert::new(&p.target, into, &p.keyset, &p.fragments, archive);
            return Change::Insert(insert);
        }
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
    pub(super) async fn build_change(&mut self, p: &Prepared) -> Result<Change, JobError> {
        if !p.spec.archive || p.spec.action == Action::Revert {
            return Ok(self.change_for(p, None));
        }
        let name = self.row.archive_table.clone().unwrap_or_else(|| {
            ArchiveTable::name_for(&p.spec.name, p.spec.id, chrono::Utc::now().date_naive())
        });
        let kind = match p.spec.action {
            Action::Delete => ArchiveKind::Delete,
            Action::Insert => ArchiveKind::Insert,
            _ => ArchiveKind::Update {
                touched: p
                    .fragments
                    .assignments
                    .iter()
                    .map(|a| a.column.clone())
                    .collect(),
            },
        };
        // An insert archives keys of the table it inserts into.
        let keyed = p.into.as_ref().unwrap_or(&p.target);
        let archive = ArchiveTable::new(&self.ctx.names, name.clone(), keyed, kind);
        let mut conn = self.connection().await?;
        archive
            .create(&mut conn, keyed, &p.spec.name)
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
}

/// The archive table seen as a keyset source: its own name, the target's key columns.
fn archive_as_target(archive: &ArchiveTable, target: &Target) -> Target {
    Target {
        quoted: archive.quoted.clone(),
        table: archive.name.clone(),
        ..target.clone()
    }
}
