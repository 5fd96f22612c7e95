//! Preparing an attempt: resolve the target, validate fragments on the server, freeze the upper
//! bound, plan (dry run), check the ceiling, and build the change (with its archive).

use super::*;

impl Attempt<'_> {
    /// Resolves the target and validates fragments (`validate`); freezes the upper bound on
    /// first run.
    pub(super) async fn prepare(
        &mut self,
        spec: JobSpec,
        cfg: &Config,
    ) -> Result<Prepared, JobError> {
        let mut conn = self.connection().await?;
        let scope = crate::validate::Scope {
            own_schema: &self.ctx.names.schema,
            allowed_tables: &cfg.safety.allowed_tables,
        };
        let (validated, source_archive) = if spec.action == Action::Revert {
            let table = ("table_name", spec.table_name.as_str());
            let (name, pinned) = self.archive_name(&mut conn, &spec).await?;
            let archived_keys = match &spec.key_columns {
                Some(_) => None,
                None => ArchiveTable::insert_keys(&mut conn, &self.ctx.names, &name)
                    .await
                    .map_err(self.err("opening the archive"))?,
            };
            let keys = spec.key_columns.as_deref().or(archived_keys.as_deref());
            let target = scope.resolve(&mut conn, &spec.name, table, keys).await?;
            self.same_table_as_the_job(&spec, &pinned, &target)?;
            let archive = self
                .source_archive(&mut conn, &spec, &name, &target)
                .await?;
            // The archive's index build and the VACUUMs take minutes on a large table: not
            // inside this connection's transaction (behind a transaction pooler it is one, and
            // `idle_in_transaction_session_timeout` would end it), so it is handed back first.
            self.hand_back(conn).await?;
            self.ready_for_revert(&archive, &target).await?;
            conn = self.connection().await?;
            let fragments = Fragments {
                predicate: "true".into(),
                assignments: Vec::new(),
            };
            let validated = crate::validate::Validated {
                target,
                fragments,
                into: None,
            };
            (validated, Some(archive))
        } else {
            let parts = crate::validate::Parts::All;
            (
                crate::validate::job(&mut conn, &spec, scope, parts).await?,
                None,
            )
        };
        let keyset = match &source_archive {
            Some(a) => Keyset::new(&archive_as_target(a, &validated.target)),
            None => Keyset::new(&validated.target),
        };
        let (upper, freeze) = self.upper_bound(&mut conn, &keyset).await?;
        let into = validated.into.as_ref().map(|(t, _)| t);
        let walked = source_archive.is_none().then(|| keyset.names());
        let pinned = Pinned::of_job(&mut conn, &validated.target, into, walked)
            .await
            .map_err(self.err("reading the table's key and policies"))?;
        self.hand_back(conn).await?;
        // Stored on another connection once this one is back: holding one while waiting for a
        // second, jobs starting together each held one and waited for the pool's last (until
        // `connect_timeout`, past a short lease), and other replicas took the jobs over.
        if let Some(freeze) = freeze {
            self.store(freeze).await?;
        }
        let (into, written) = validated.into.unzip();
        Ok(Prepared {
            pinned,
            named: validated.target.named_with(into.as_ref()),
            spec,
            target: validated.target,
            fragments: validated.fragments,
            keyset,
            upper,
            source_archive,
            into,
            written,
        })
    }

    /// A revert restores into the table the reverted job changed, not another one that took
    /// its name since (renamed in, or created again): the job's plan pinned its oid (`pinned`,
    /// read with the archive's name).
    fn same_table_as_the_job(
        &self,
        spec: &JobSpec,
        pinned: &Pinned,
        target: &Target,
    ) -> Result<(), JobError> {
        let original = spec.reverts.as_deref().unwrap_or_default();
        let planned = pinned
            .tables
            .iter()
            .find(|(name, _)| *name == target.quoted);
        match planned {
            Some((_, oid)) if *oid != target.oid => Err(JobError::invalid(
                &spec.name,
                format!(
                    "the archive holds rows of {table} as job {original} changed them (table \
                     oid {oid}); {table} is oid {now} now: it was replaced (renamed, or dropped \
                     and created again) since, and its images would go into another table's \
                     rows. If it is the same table restored from a dump, clear the pin with \
                     UPDATE {jobs} SET plan = plan - 'pinned' WHERE name = '{original}', and \
                     revert again",
                    table = target.display(),
                    now = target.oid,
                    jobs = self.ctx.names.jobs,
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The name of the archive of the job a revert undoes, checked to be that job's own, and
    /// what that job pinned when it planned.
    async fn archive_name(
        &self,
        conn: &mut sqlx::PgConnection,
        spec: &JobSpec,
    ) -> Result<(String, Pinned), JobError> {
        let original = spec.reverts.as_deref().unwrap_or_default();
        let found: Option<(i64, Option<String>, Option<Value>)> = crate::sql::query_as(
            &self
                .ctx
                .names
                .render("SELECT id, archive_table, plan FROM {jobs} WHERE name = $1"),
        )
        .bind(original)
        .fetch_optional(&mut *conn)
        .await
        .map_err(self.err("finding the reverted job"))?;
        let Some((original_id, Some(name), plan)) = found else {
            return Err(JobError::invalid(
                &spec.name,
                format!("job {original} has no archive to revert (archive was off, or it expired)"),
            ));
        };
        if !ArchiveTable::owned_by(&name, original_id) {
            return Err(JobError::invalid(
                &spec.name,
                format!("archive_table {name:?} of job {original} is not that job's archive"),
            ));
        }
        Ok((name, Pinned::stored(plan.as_ref())))
    }

    /// The archive `name` of the job a revert undoes (`ready_for_revert` indexes and vacuums it).
    async fn source_archive(
        &self,
        conn: &mut sqlx::PgConnection,
        spec: &JobSpec,
        name: &str,
        target: &Target,
    ) -> Result<ArchiveTable, JobError> {
        let original = spec.reverts.as_deref().unwrap_or_default();
        let archive = ArchiveTable::open(conn, &self.ctx.names, name, target)
            .await
            .map_err(self.err("opening the archive"))?
            .ok_or_else(|| {
                JobError::invalid(
                    &spec.name,
                    format!("archive table {name} of job {original} is gone"),
                )
            })?;
        let mut archive = archive;
        archive
            .parent_checks(conn, target)
            .await
            .map_err(self.err("reading the target's foreign keys"))?;
        if archive.kind != ArchiveKind::Insert {
            // A column retyped since the job: an update's after-images compare with the values
            // as the table now holds them (`numeric(10,2)` 1.50 is 1.5000 in `numeric(12,4)`),
            // a delete's images go back in the table's types (text to int has no implicit cast).
            let changes = archive
                .follow(conn, target, false)
                .await
                .map_err(self.err("bringing the archive in line with the table"))?;
            if !changes.is_empty() {
                tracing::warn!(archive = %archive.quoted, ?changes, "revert: the archive takes the types the table's columns have now");
            }
        }
        if let Some(table) = archive.made_for_another(target) {
            tracing::warn!(
                archive = %archive.quoted,
                made_for = table,
                now = target.oid,
                "revert: the archive was made for another table under this name (oid {table}; \
                 {} is oid {} now: replaced, or restored from a dump, since the job); its \
                 columns are matched by name",
                target.display(),
                target.oid
            );
        }
        let lost = archive.lost_columns(target);
        if !lost.is_empty() {
            tracing::warn!(
                archive = %archive.quoted,
                columns = ?lost,
                "revert: the target no longer has these archived columns (dropped or renamed \
                 since the delete); the re-inserted rows get the target's columns only"
            );
        }
        Ok(archive)
    }

    /// Indexes the archive for keyset walking (and vacuums it), beside the target's VACUUM.
    async fn ready_for_revert(
        &self,
        archive: &ArchiveTable,
        target: &Target,
    ) -> Result<(), JobError> {
        let timeout = self.ctx.config().bloat.vacuum_timeout;
        let (prepared, ()) = tokio::join!(
            archive.prepare_revert(&self.ctx.pool, timeout, &self.interrupt),
            self.vacuum_before_revert(target),
        );
        prepared.map_err(self.err("indexing and vacuuming the archive"))
    }

    /// VACUUMs the target, heap-only, while the archive is being indexed (two tables, no lock
    /// between them): the reverted job left a dead version of every row it changed (the fast
    /// lane runs no bloat guard), and until they are pruned the restored versions cannot go into
    /// their space, so each one moves to another page and adds an index entry. Heap-only because
    /// that is what the restoring batches need; the index entries of the dead versions wait for
    /// the next index-cleaning VACUUM. Skipped where the bloat guard could not run
    /// (`bloat.guard = false`, no VACUUM privilege, no session); a failure is logged, not fatal.
    /// It overlaps the archive's preparation, so it is not counted as time held.
    async fn vacuum_before_revert(&self, target: &Target) {
        let pool = &self.ctx.pool;
        let cfg = self.ctx.config();
        let guard = match BloatGuard::new(pool, &cfg.bloat, true, target, 0).await {
            Ok(g) if matches!(g.standing(), Standing::Active { .. }) => g,
            Ok(g) => {
                tracing::info!(standing = ?g.standing(), "revert: not vacuuming the target first");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "revert: cannot check VACUUM privilege; not vacuuming the target first");
                return;
            }
        };
        let pass = Pass::HeapOnly;
        if let Some(took) = self.vacuum(target, &guard, pass, &self.interrupt).await {
            let ms = took.as_millis() as u64;
            tracing::info!(ms, "revert: vacuumed the target before restoring");
        }
    }

    /// The largest key at first start, frozen in the job row so the job always terminates: the
    /// bound, and on first start the update that freezes it (for the caller to store).
    async fn upper_bound(
        &mut self,
        conn: &mut sqlx::PgConnection,
        keyset: &Keyset,
    ) -> Result<(Option<Key>, Option<RowUpdate>), JobError> {
        if let Some(stored) = &self.row.upper_bound {
            if stored.as_array().is_some_and(Vec::is_empty) {
                return Ok((None, None));
            }
            return Key::from_json(stored, keyset.width())
                .map(|k| (Some(k), None))
                .ok_or_else(|| {
                    JobError::invalid(
                        &self.row.name,
                        format!("stored upper_bound {stored} does not fit the key columns"),
                    )
                });
        }
        let row: Option<sqlx::postgres::PgRow> = crate::sql::query(&keyset.upper_bound_sql())
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
        // The key is frozen with the bound: the stored cursor, bound and slices hold bare key
        // values, so a later attempt (a resume, a restart, an approved dry run) or the revert
        // must walk the same columns even if the table gains a primary key or its indexes are
        // rebuilt in another order meanwhile. Before, a key chosen anew read the stored values
        // as another column's and the job skipped or repeated rows, then reported success.
        let key_columns = self.row.key_columns.is_none().then(|| keyset.names());
        let freeze = RowUpdate {
            upper_bound: Some(json),
            key_columns,
            ..Default::default()
        };
        Ok((upper, Some(freeze)))
    }

    pub(super) fn change_for(&self, p: &Prepared, archive: Option<&ArchiveTable>) -> Change {
        if let Some(into) = &p.into {
            let written = p.written.as_ref().unwrap_or(&p.fragments);
            let insert = Insert::new(&p.target, into, &p.keyset, written, archive);
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
        let Some(mut archive) = self.planned_archive(p) else {
            return Ok(self.change_for(p, None));
        };
        let mut conn = self.connection().await?;
        archive
            .create(&mut conn, p.written(), &p.spec.name)
            .await
            .map_err(self.err("creating the archive table"))?;
        // A retried attempt finds the archive made for the table as it was.
        let changes = archive.follow(&mut conn, p.written(), true).await;
        let changes = changes.map_err(|e| {
            self.err("bringing the archive in line with the table's columns")(e)
                .at(format!("archive {}", archive.quoted))
        })?;
        if !changes.is_empty() {
            tracing::warn!(archive = %archive.quoted, ?changes, "the table's columns changed since the archive was made; the archive follows them");
        }
        self.hand_back(conn).await?;
        if self.row.archive_table.is_none() {
            self.store(RowUpdate {
                archive_table: Some(archive.name.clone()),
                ..Default::default()
            })
            .await?;
        }
        Ok(self.change_for(p, Some(&archive)))
    }

    /// The archive table the job writes (named, not created), or `None` when it archives
    /// nothing (archive off, or a revert).
    pub(super) fn planned_archive(&self, p: &Prepared) -> Option<ArchiveTable> {
        if !p.spec.archive || p.spec.action == Action::Revert {
            return None;
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
        Some(ArchiveTable::new(&self.ctx.names, name, p.written(), kind))
    }
}

/// The archive table seen as a keyset source: its own name, the target's key columns.
pub(super) fn archive_as_target(archive: &ArchiveTable, target: &Target) -> Target {
    Target {
        quoted: archive.quoted.clone(),
        table: archive.name.clone(),
        ..target.clone()
    }
}
