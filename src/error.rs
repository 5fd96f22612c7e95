//! The library's error types. Job errors split into *retryable* (transient: retry the batch with
//! backoff and a smaller size) and *fatal* (the job fails with the cause in `last_error`).

use crate::{config::ConfigError, schema::SchemaError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot connect to {server}: {source}{hint}", hint = connect_hint(source))]
    Connect { server: String, source: sqlx::Error },
    #[error("{0}")]
    Job(#[from] JobError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("no job named {0:?}")]
    NoSuchJob(String),
    #[error("job {job}: {reason}")]
    Refused { job: String, reason: String },
    #[error("job {job} on {table}: {source}")]
    Staging {
        job: String,
        table: String,
        source: crate::staging::StagingError,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Bad configuration, found only on connecting (a `database.timezone` the server does not
    /// know): waiting cannot fix it, so the daemon stops with exit status 2, as for a bad key.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            Error::Config(_)
                | Error::Connect {
                    source: sqlx::Error::Configuration(_),
                    ..
                }
        )
    }
}

/// What to do about a connection error whose cause is known: PgBouncer refuses the start-up
/// options sqlx sends (`extra_float_digits`) unless told to ignore them, and the server's message
/// does not name the setting that avoids them.
pub fn connect_hint(source: &sqlx::Error) -> &'static str {
    match source {
        sqlx::Error::Database(e) if e.message().contains("unsupported startup parameter") => {
            " (a connection pooler such as PgBouncer refuses start-up options: set \
             database.pool_mode = \"transaction\", BACKFILLD_DATABASE__POOL_MODE=transaction)"
        }
        _ => "",
    }
}

/// Why one attempt at a job stopped short of success.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job row itself is unusable (bad fragment, unknown table, no key, ...). Never retried.
    #[error("job {job}: {reason}")]
    Invalid { job: String, reason: String },
    /// PostgreSQL refused a statement; `retryable` follows the SQLSTATE class.
    #[error("job {job} on {table}: {step} failed: SQLSTATE {code}: {message}")]
    Sql {
        job: String,
        table: String,
        step: &'static str,
        code: String,
        message: String,
        retryable: bool,
    },
    /// The connection or pool failed; always worth retrying.
    #[error("job {job} on {table}: {step} failed: {source}")]
    Connection {
        job: String,
        table: String,
        step: &'static str,
        source: sqlx::Error,
    },
    /// The fenced checkpoint matched no row: another replica owns the job now.
    #[error("job {job}: lease lost (attempt {attempt}); another replica owns the job now")]
    LeaseLost { job: String, attempt: i32 },
    /// The checkpoint is not where this replica's last batch committed it: that commit was lost
    /// (a server crash or a failover before an asynchronous commit reached disk). Retried from
    /// the stored checkpoint, so the lost batch runs again.
    #[error(
        "job {job} on {table}: the checkpoint is at {stored}, not at {expected} where this \
         replica's last batch left it: that batch's commit was lost (a server crash or failover \
         before it reached disk); resuming from the checkpoint"
    )]
    CheckpointMoved {
        job: String,
        table: String,
        stored: String,
        expected: String,
    },
    /// An archiving batch found the table's columns changed since its statements were written
    /// (a column added, or retyped): rolled back, so no image is cut short or rounded. Retried
    /// as a new attempt, whose archive follows the table first.
    #[error(
        "job {job} on {table}: the table's columns changed while the job ran ({changes}); the \
         batch rolled back so its archive stays exact, and the next attempt brings the archive \
         in line with the table"
    )]
    TableChanged {
        job: String,
        table: String,
        changes: String,
    },
    /// A table the job's statements name is not the one the job planned on: it was renamed
    /// away or dropped, and another table took its name (a swap). The frozen bound, the
    /// checkpoint and the archive belong to the old table, so the job fails; the batch that
    /// found it rolled back.
    #[error(
        "job {job} on {table}: {name} is not the table this job planned and started on (oid \
         {planned} then, {now} now): it was renamed or dropped and another table took its name. \
         The job stops before changing anything more (a batch that found it rolled back), since its frozen bound, checkpoint and \
         archive belong to the old table; to change the table that has the name now, insert the \
         job again under a new name"
    )]
    TableReplaced {
        job: String,
        table: String,
        name: String,
        planned: u32,
        /// `none` when no table has the name now.
        now: String,
    },
    /// The job's table changed since it planned in a way the job cannot follow (`pin::Drift`:
    /// its key retyped or re-collated, row-level security hiding rows, an inheritance child);
    /// the batch that found it rolled back.
    #[error(
        "job {job} on {table}: {what}. The job stops before changing anything more (a batch that found it rolled back); to change \
         the table as it is now, insert the job again under a new name"
    )]
    TableAltered {
        job: String,
        table: String,
        what: String,
    },
    /// The job would change more rows than its ceiling allows.
    #[error(
        "job {job} on {table}: ceiling exceeded: {would_change} rows would change, max_affected is \
         {max_affected} ({})",
        ceiling_committed(*.committed)
    )]
    Ceiling {
        job: String,
        table: String,
        would_change: i64,
        max_affected: i64,
        /// Rows changed and committed before the batch that would pass the ceiling (rolled back).
        committed: i64,
    },
}

/// What a ceiling left behind: nothing (the plan), or the committed batches before the one that
/// would pass it.
fn ceiling_committed(committed: i64) -> String {
    match committed {
        0 => "nothing changed".into(),
        n => format!("{n} changed and committed; the batch that would pass it rolled back"),
    }
}

impl JobError {
    /// Wraps a database error with the job, table and step it happened in.
    pub fn sql(job: &str, table: &str, step: &'static str, err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                Self::Sql {
                    job: job.into(),
                    table: table.into(),
                    step,
                    retryable: is_transient_sqlstate(&code) || is_stale_plan(&code, db.message()),
                    message: db.message().to_owned(),
                    code,
                }
            }
            _ => Self::Connection {
                job: job.into(),
                table: table.into(),
                step,
                source: err,
            },
        }
    }

    /// Adds where a statement failed (e.g. a batch's key window) to a refusal by PostgreSQL, so
    /// the row that broke a constraint can be found; other errors pass unchanged.
    pub fn at(mut self, place: impl std::fmt::Display) -> Self {
        if let Self::Sql { message, .. } = &mut self {
            *message = format!("{message} (at {place})");
        }
        self
    }

    /// Appends advice to a refusal by PostgreSQL (what to change so the job can pass); other
    /// errors pass unchanged.
    pub fn hint(mut self, advice: impl std::fmt::Display) -> Self {
        if let Self::Sql { message, .. } = &mut self {
            *message = format!("{message}; {advice}");
        }
        self
    }

    /// Renames the step a statement failed in (a plan's trial runs a batch's statements).
    pub fn in_step(mut self, new: &'static str) -> Self {
        if let Self::Sql { step, .. } | Self::Connection { step, .. } = &mut self {
            *step = new;
        }
        self
    }

    pub fn invalid(job: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            job: job.into(),
            reason: reason.into(),
        }
    }

    /// Says which job column an invalid value came from (`source_table: …`); other errors pass.
    pub fn in_column(self, column: &str) -> Self {
        match self {
            Self::Invalid { job, reason } => Self::Invalid {
                job,
                reason: format!("{column}: {reason}"),
            },
            other => other,
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Sql { retryable, .. } => *retryable,
            Self::Connection { source, .. } => !matches!(source, sqlx::Error::Configuration(_)),
            Self::CheckpointMoved { .. } | Self::TableChanged { .. } => true,
            _ => false,
        }
    }

    /// A transient error the batch loop retries in place; the others that are retryable end
    /// the attempt, to be retried by the next one (whose preparation must run again).
    pub fn is_retried_in_place(&self) -> bool {
        self.is_retryable() && !matches!(self, Self::TableChanged { .. })
    }

    /// Every value `kind` returns: the `kind` label of `backfilld_batch_errors_total`.
    pub const KINDS: [&'static str; 13] = [
        "invalid",
        "connection",
        "lease_lost",
        "lost_commit",
        "table_changed",
        "table_replaced",
        "table_altered",
        "ceiling",
        "lock_timeout",
        "deadlock",
        "serialization",
        "statement_timeout",
        "permanent",
    ];

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid",
            Self::Sql { code, .. } => sqlstate_kind(code),
            Self::Connection { .. } => "connection",
            Self::LeaseLost { .. } => "lease_lost",
            Self::CheckpointMoved { .. } => "lost_commit",
            Self::TableChanged { .. } => "table_changed",
            Self::TableReplaced { .. } => "table_replaced",
            Self::TableAltered { .. } => "table_altered",
            Self::Ceiling { .. } => "ceiling",
        }
    }

    /// SQLSTATE when the error came from the server.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Self::Sql { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Transient conditions: lock not available, deadlock, serialization failure, statement timeout
/// (query_canceled), operator intervention (admin/crash shutdown, cannot connect now), connection
/// exceptions and too many connections.
/// Errors a later try can get past: lock and statement timeouts, deadlocks, serialization
/// failures, lost or ended connections (an admin's or the server's shutdown, a session ended for
/// sitting idle in a transaction while this replica was frozen), insufficient resources (disk
/// full, out of memory, too many connections), and writes reaching a server that turned
/// read-only (a failover in progress). Also a connection refused at log-in (class 28, or the
/// database not there, 3D000): a password rotation, an expiring token or a failover's `pg_hba`
/// reload refuses new sessions for a moment; a lasting refusal still fails the job once its
/// attempts are used up.
/// A statement kept prepared on a connection whose result type DDL changed (a key column given
/// another collation, which its text output carries): the connection must forget its
/// statements, and the batch is retried (`batch::Batcher`).
pub fn is_stale_plan(code: &str, message: &str) -> bool {
    code == "0A000" && message.starts_with("cached plan must not change result type")
}

impl JobError {
    /// See [`is_stale_plan`].
    pub fn is_stale_plan(&self) -> bool {
        matches!(self, Self::Sql { code, message, .. } if is_stale_plan(code, message))
    }
}

pub fn is_transient_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "55P03" | "40P01" | "40001" | "57014" | "25P03" | "25006" | "3D000"
    ) || code.starts_with("57P")
        || code.starts_with("53")
        || code.starts_with("08")
        || code.starts_with("28")
}

fn sqlstate_kind(code: &str) -> &'static str {
    match code {
        "55P03" => "lock_timeout",
        "40P01" => "deadlock",
        "40001" => "serialization",
        "57014" => "statement_timeout",
        c if c.starts_with("57P") || c.starts_with("08") || c.starts_with("53") => "connection",
        "25P03" | "25006" | "3D000" => "connection",
        c if c.starts_with("28") => "connection",
        _ => "permanent",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        let cases = [
            ("55P03", true, "lock_timeout"),
            ("40P01", true, "deadlock"),
            ("40001", true, "serialization"),
            ("57014", true, "statement_timeout"),
            ("57P01", true, "connection"),
            ("08006", true, "connection"),
            ("42703", false, "permanent"),
            ("42601", false, "permanent"),
            ("23505", false, "permanent"),
            ("22012", false, "permanent"),
            ("25P03", true, "connection"),
            ("28P01", true, "connection"),
            ("28000", true, "connection"),
            ("3D000", true, "connection"),
            ("25006", true, "connection"),
            ("53100", true, "connection"),
            ("57P05", true, "connection"),
        ];
        for (code, transient, kind) in cases {
            assert_eq!(is_transient_sqlstate(code), transient, "{code}");
            assert_eq!(sqlstate_kind(code), kind, "{code}");
            assert!(
                JobError::KINDS.contains(&kind),
                "{kind} is a listed metric kind"
            );
        }
    }
}
