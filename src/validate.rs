//! A job's tables and fragments checked against the server, as a replica checks them before its
//! first batch. The runner's preparation and `enqueue` share it, so a job that would fail there
//! (a typo in a table, column or fragment) is refused when it is enqueued and inserts nothing.
//! Reverts are not covered: their table and archive are the reverted job's, checked at claim.

use sqlx::PgConnection;

use crate::error::JobError;
use crate::fragment::{self, Fragments, ServerCheck};
use crate::job::{Action, JobSpec};
use crate::target::{Resolve, Target};

/// What the checks established about an update, delete or insert job.
#[derive(Debug, Clone)]
pub struct Validated {
    /// The table whose keys the job walks: `table_name`, or `source_table` for an insert.
    pub target: Target,
    /// The fragments the plan, verification and the idempotency check count with (for an
    /// insert: the predicate narrowed to the source rows still to insert).
    pub fragments: Fragments,
    /// An insert's target (`table_name`) and its own fragments, which its batches write with.
    pub into: Option<(Target, Fragments)>,
}

/// Where tables may be: never in `own_schema`, and only in `allowed_tables` when it is not empty.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub own_schema: &'a str,
    pub allowed_tables: &'a [String],
}

impl Scope<'_> {
    /// Resolves `table_name` for `job`; errors name the job column it came from.
    pub async fn resolve(
        &self,
        conn: &mut PgConnection,
        job: &str,
        (column, table_name): (&str, &str),
        key_columns: Option<&[String]>,
    ) -> Result<Target, JobError> {
        Resolve {
            job,
            table_name,
            key_columns,
            own_schema: self.own_schema,
            allowed_tables: self.allowed_tables,
        }
        .run(conn)
        .await
        .map_err(|e| e.in_column(column))
        .and_then(|target| reserved_names(job, target))
    }
}

/// The prefix of backfilld's own aliases and archive columns (`_bf_row`, `_bf_after_1`, `_bf_a`).
pub const RESERVED_PREFIX: &str = "_bf_";

/// A table with a column named like backfilld's own would be misread: a delete's archive of a
/// table with a `_bf_row` column reads as an insert's, and its revert restores nothing.
pub(crate) fn reserved_names(job: &str, target: Target) -> Result<Target, JobError> {
    match target
        .columns
        .iter()
        .find(|c| c.name.starts_with(RESERVED_PREFIX))
    {
        Some(c) => Err(JobError::invalid(
            job,
            format!(
                "on {}: column {:?} starts with {RESERVED_PREFIX:?}, which backfilld reserves \
                 for its own aliases and archive columns; rename the column to use backfilld on \
                 this table",
                target.display(),
                c.name
            ),
        )),
        None => Ok(target),
    }
}

/// Which of an update's or delete's fragments to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    /// The predicate and the set clause: what the batches run.
    All,
    /// The predicate only: what counting the rows still to change needs (`verify`), which
    /// keeps working after a later migration drops a column the set clause read. An insert's
    /// set clause is always checked: its pending rows are derived from it.
    Predicate,
}

/// Resolves the job's tables and has the server plan its fragments (never run them). Not for
/// running reverts: their table and archive are checked at claim.
pub async fn job(
    conn: &mut PgConnection,
    spec: &JobSpec,
    scope: Scope<'_>,
    parts: Parts,
) -> Result<Validated, JobError> {
    if spec.action == Action::Insert {
        return insert(conn, spec, scope).await;
    }
    let keys = spec.key_columns.as_deref();
    let target = scope
        .resolve(conn, &spec.name, ("table_name", &spec.table_name), keys)
        .await?;
    let invalid = |e: fragment::FragmentError| {
        JobError::invalid(&spec.name, format!("on {}: {e}", target.display()))
    };
    let set = match parts {
        Parts::All => spec.set_clause.as_deref(),
        Parts::Predicate => None,
    };
    let fragments = fragment::validate(&spec.predicate, set, &target).map_err(invalid)?;
    match fragment::validate_on_server(conn, &target, &fragments).await {
        Ok(()) => {}
        Err(ServerCheck::Rejected(e)) => return Err(invalid(e)),
        Err(ServerCheck::Transient(e)) => return Err(server(spec, &target, e)),
    }
    if spec.action == Action::Update && !spec.allow_cascade {
        update_cascades(conn, spec, &target, &fragments).await?;
    }
    Ok(Validated {
        target,
        fragments,
        into: None,
    })
}

/// An insert walks `source_table` and inserts into `table_name`, which needs a unique key: it
/// makes the insert idempotent (`ON CONFLICT DO NOTHING`) and names what a revert deletes.
async fn insert(
    conn: &mut PgConnection,
    spec: &JobSpec,
    scope: Scope<'_>,
) -> Result<Validated, JobError> {
    let source_name = spec.source_table.as_deref().unwrap_or_default();
    let keys = spec.key_columns.as_deref();
    let source = scope
        .resolve(conn, &spec.name, ("source_table", source_name), keys)
        .await?;
    let mut into = scope
        .resolve(conn, &spec.name, ("table_name", &spec.table_name), None)
        .await?;
    let set = spec.set_clause.as_deref().unwrap_or_default();
    let checked =
        crate::change::checked_insert_fragments(conn, &spec.predicate, set, &source, &mut into)
            .await;
    match checked {
        Ok((written, counted)) => Ok(Validated {
            target: source,
            fragments: counted,
            into: Some((into, written)),
        }),
        Err(ServerCheck::Rejected(e)) => {
            let (from, to) = (source.display(), into.display());
            Err(JobError::invalid(
                &spec.name,
                format!("inserting from {from} into {to}: {e}"),
            ))
        }
        Err(ServerCheck::Transient(e)) => Err(server(spec, &source, e)),
    }
}

/// An update of a column another table references `ON UPDATE CASCADE`, `SET NULL` or `SET
/// DEFAULT` changes that table's rows too, where the archive cannot restore them (a revert put
/// the parent's values back and left 1,000 children's links NULL). Refused unless the job says
/// `allow_cascade`, as a cascading delete is.
async fn update_cascades(
    conn: &mut PgConnection,
    spec: &JobSpec,
    target: &Target,
    fragments: &Fragments,
) -> Result<(), JobError> {
    let assigned: Vec<&str> = fragments
        .assignments
        .iter()
        .map(|a| a.column.as_str())
        .collect();
    let Some((key, column)) =
        crate::cascade::update_reaches(conn, &spec.name, target, &assigned).await?
    else {
        return Ok(());
    };
    Err(JobError::invalid(
        &spec.name,
        format!(
            "on {}: set_clause assigns {column:?}, which {} references ON UPDATE {}: the change \
             would reach {}'s rows, which the archive cannot restore. Set allow_cascade = true on \
             the job to run it anyway",
            target.display(),
            key.child,
            key.on_update(),
            key.child
        ),
    ))
}

/// The privileges the connected role lacks on the job's tables to run its statements, e.g.
/// `UPDATE on public.orders` (empty when it has them all). The server-side checks of the
/// fragments run the job's statements, so a role without them (a requester that may only insert
/// job rows) would see every fragment "rejected" for a permission a replica's role has. Resolves
/// the tables first, with their usual errors.
pub async fn missing_privileges(
    conn: &mut PgConnection,
    spec: &JobSpec,
    scope: Scope<'_>,
) -> Result<Vec<String>, JobError> {
    let table = ("table_name", spec.table_name.as_str());
    let mut needs = Vec::new();
    match spec.action {
        Action::Insert => {
            let source = (
                "source_table",
                spec.source_table.as_deref().unwrap_or_default(),
            );
            let keys = spec.key_columns.as_deref();
            let from = scope.resolve(conn, &spec.name, source, keys).await?;
            needs.push((from, "SELECT"));
            let into = scope.resolve(conn, &spec.name, table, None).await?;
            needs.extend([(into.clone(), "SELECT"), (into, "INSERT")]);
        }
        Action::Update | Action::Delete => {
            let keys = spec.key_columns.as_deref();
            let target = scope.resolve(conn, &spec.name, table, keys).await?;
            let write = if spec.action == Action::Update {
                "UPDATE"
            } else {
                "DELETE"
            };
            needs.extend([(target.clone(), "SELECT"), (target, write)]);
        }
        Action::Revert => {}
    }
    let mut missing = Vec::new();
    for (target, privilege) in needs {
        // Column privileges count (`GRANT UPDATE (status)`): the server checks the columns.
        let check = match privilege {
            "DELETE" => "SELECT has_table_privilege($1::oid, $2)",
            _ => "SELECT has_any_column_privilege($1::oid, $2)",
        };
        let granted: bool = crate::sql::query_scalar(check)
            .bind(target.oid as i64)
            .bind(privilege)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| server(spec, &target, e))?;
        if !granted {
            missing.push(format!("{privilege} on {}", target.display()));
        }
    }
    Ok(missing)
}

fn server(spec: &JobSpec, target: &Target, e: sqlx::Error) -> JobError {
    JobError::sql(&spec.name, &target.display(), "validating fragments", e)
}
