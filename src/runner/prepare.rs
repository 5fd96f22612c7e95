//! Preparing an attempt: resolve the target, validate fragments on the server, freeze the upper
//! bound, plan (dry run), check the ceiling, and build the change (with its archive).

use super::*;
use crate::fragment::ServerCheck;

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
        self.hand_back(conn).await?;
        Ok(Prepared {
            spec,
            target,
            fragments,
            keyset,
            upper,
            source_archive,
            into: None,
            written: None,
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
        let checked = crate::change::checked_insert_fragments(
            &mut conn,
            &spec.predicate,
            set,
            &source,
            &into,
        );
        let (written, counted) = match checked.await {
            Ok(both) => both,
            Err(ServerCheck::Rejected(e)) => return Err(invalid(e)),
            Err(ServerCheck::Transient(e)) => return Err(self.err("validating fragments")(e)),
        };
        let keyset = Keyset::new(&source);
        let upper = self.upper_bound(&mut conn, &keyset).await?;
        self.hand_back(conn).await?;
        Ok(Prepared {
            spec,
            target: source,
            fragments: counted,
            keyset,
            upper,
            source_archive: None,
            into: Some(into),
            written: Some(written),
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
        let name: Option<Option<String>> = crate::sql::query_scalar(
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
            .prepare_revert(&self.ctx.pool, self.ctx.config().bloat.vacuum_timeout)
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
        self.store(RowUpdate {
            upper_bound: Some(json),
            ..Default::default()
        })
        .await?;
        Ok(upper)
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
        self.hand_back(conn).await?;
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
pub(super) fn archive_as_target(archive: &ArchiveTable, target: &Target) -> Target {
    Target {
        quoted: archive.quoted.clone(),
        table: archive.name.clone(),
        ..target.clone()
    }
}
