//! The job row, its states, and the validated settings a run uses.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::config::{BatchConfig, SafetyConfig};
use crate::error::JobError;

/// The columns of `JobRow` read as they are (`JobRow::columns` adds the others).
const PLAIN_COLUMNS: [&str; 38] = [
    "id",
    "name",
    "table_name",
    "predicate",
    "action",
    "set_clause",
    "mode",
    "batch_size",
    "target_batch_ms",
    "sleep_ms",
    "max_rows_per_second",
    "max_affected",
    "archive",
    "priority",
    "requested_state",
    "state",
    "attempt",
    "lease_owner",
    "upper_bound",
    "cursor",
    "rows_scanned",
    "rows_changed",
    "rows_skipped",
    "batches",
    "batch_size_current",
    "estimated_total",
    "plan",
    "remaining",
    "archive_table",
    "reverts",
    "parallelism",
    "slices",
    "max_batch_ms",
    "preset",
    "allow_cascade",
    "source_table",
    "staged_table",
    "last_error",
];

/// Every column of `backfill.jobs`, as read by the daemon and the CLI.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct JobRow {
    pub id: i64,
    pub name: String,
    pub table_name: Option<String>,
    pub predicate: Option<String>,
    pub action: Option<String>,
    pub set_clause: Option<String>,
    pub key_columns: Option<Vec<String>>,
    pub mode: Option<String>,
    pub batch_size: Option<i32>,
    pub target_batch_ms: Option<i32>,
    pub sleep_ms: Option<i32>,
    pub max_rows_per_second: Option<i32>,
    pub max_affected: Option<i64>,
    pub archive: Option<bool>,
    pub priority: i32,
    pub run_at: DateTime<Utc>,
    pub requested_state: Option<String>,
    pub state: State,
    pub attempt: i32,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub heartbeat_at: Option<DateTime<Utc>>,
    pub upper_bound: Option<Value>,
    pub cursor: Option<Value>,
    pub rows_scanned: i64,
    pub rows_changed: i64,
    pub rows_skipped: i64,
    pub batches: i64,
    pub batch_size_current: Option<i32>,
    pub estimated_total: Option<i64>,
    pub plan: Option<Value>,
    pub remaining: Option<i64>,
    pub archive_table: Option<String>,
    pub reverts: Option<String>,
    pub parallelism: Option<i32>,
    pub slices: Option<Value>,
    pub max_batch_ms: Option<i32>,
    pub preset: Option<String>,
    pub allow_cascade: bool,
    pub source_table: Option<String>,
    pub staged_table: Option<String>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

impl JobRow {
    /// The select list that reads a `JobRow` (`alias`: the jobs table's alias, if any). It is `*`
    /// but for the columns a user writes whose values would not decode: a malformed row must fail
    /// its own job, never the read of every job (one row had stopped every poll, or panicked the
    /// daemon). `key_columns` is flattened to one dimension with a NULL element read as an empty
    /// name, which `JobSpec` refuses; timestamps are clamped to years 1–9999, as `infinity`
    /// (a parked `run_at`) and years past chrono's range panicked in the decoder.
    pub fn columns(alias: Option<&str>) -> String {
        let p = alias.map(|a| format!("{a}.")).unwrap_or_default();
        let clamp = |c: &str| {
            format!(
                "CASE WHEN {p}{c} IS NOT NULL THEN least(greatest({p}{c}, '0001-01-01 00:00:00+00'), \
                 '9999-12-31 23:59:59+00') END AS {c}"
            )
        };
        let mut list = vec![format!(
            "CASE WHEN {p}key_columns IS NOT NULL
                  THEN ARRAY(SELECT coalesce(k, '') FROM unnest({p}key_columns) AS k) END AS key_columns"
        )];
        for c in [
            "run_at",
            "lease_expires_at",
            "heartbeat_at",
            "created_at",
            "started_at",
            "finished_at",
            "updated_at",
        ] {
            list.push(clamp(c));
        }
        for c in PLAIN_COLUMNS {
            list.push(format!("{p}{c}"));
        }
        list.join(", ")
    }

    /// Share of the key range done, from rows scanned against the (estimated or exact) total.
    pub fn progress(&self) -> Option<f64> {
        if self.state == State::Succeeded {
            return Some(1.0);
        }
        let total = self.estimated_total.filter(|t| *t > 0)?;
        Some((self.rows_scanned as f64 / total as f64).clamp(0.0, 1.0))
    }
}

/// The states the daemon writes into `state` (a CHECK constraint holds the column to these, so
/// the row decodes into the enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, Serialize)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Running,
    Planned,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Pending,
        State::Running,
        State::Planned,
        State::Paused,
        State::Succeeded,
        State::Failed,
        State::Cancelled,
    ];

    /// The states a job never leaves: the one definition of "finished".
    pub const FINISHED: [State; 3] = [State::Succeeded, State::Failed, State::Cancelled];

    pub fn is_finished(self) -> bool {
        Self::FINISHED.contains(&self)
    }

    /// `('succeeded', 'failed', 'cancelled')`, for SQL.
    pub fn finished_sql() -> String {
        let quoted: Vec<String> = Self::FINISHED
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        format!("({})", quoted.join(", "))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Running => "running",
            State::Planned => "planned",
            State::Paused => "paused",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl PartialEq<&str> for State {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// What an operator asks a job to do (`requested_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    Paused,
    Running,
    Cancelled,
}

impl Requested {
    pub fn as_str(self) -> &'static str {
        match self {
            Requested::Paused => "paused",
            Requested::Running => "running",
            Requested::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Update,
    Delete,
    /// Restores the before-images archived by another job (`reverts` names it).
    Revert,
    /// Inserts into `table_name` a row per `source_table` row the predicate selects; `set_clause`
    /// maps target columns to expressions over the source row. Conflicts are skipped.
    Insert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    DryRun,
    Execute,
}

/// Which defaults a job's unset throttle columns take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preset {
    /// The configured `[batch]` defaults: short batches under a lock ceiling, the bloat guard,
    /// back-off when the server is busier. What live traffic should not feel.
    #[default]
    Gentle,
    /// For urgent fixes: long batches (`target_batch_ms` 500, ceiling = `statement_timeout`),
    /// no sleep, two slices, no bloat guard and no load back-off. Health signals still apply.
    Fast,
}

impl Preset {
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.map(str::trim).unwrap_or("gentle") {
            "" | "gentle" => Ok(Preset::Gentle),
            "fast" => Ok(Preset::Fast),
            other => Err(format!("preset must be 'gentle' or 'fast', got {other:?}")),
        }
    }

    /// The `[batch]` defaults this preset stands for.
    pub fn defaults(self, batch: &BatchConfig) -> Cow<'_, BatchConfig> {
        match self {
            Preset::Gentle => Cow::Borrowed(batch),
            Preset::Fast => Cow::Owned(BatchConfig {
                target_batch_ms: 500,
                max_batch_ms: batch.statement_timeout.as_millis() as i64,
                sleep_ms: 0,
                parallelism: 2,
                ..batch.clone()
            }),
        }
    }

    /// Whether the bloat guard and the load back-off run (they trade speed for impact).
    pub fn is_gentle(self) -> bool {
        self == Preset::Gentle
    }
}

/// Batch sizing and throttle settings after job overrides and validation.
#[derive(Debug, Clone)]
pub struct Throttle {
    pub initial_size: i64,
    pub min_size: i64,
    pub max_size: i64,
    pub target_batch_ms: i64,
    /// The ceiling: statement and lock timeout of the batch's statements.
    pub max_batch_ms: i64,
    pub sleep_ms: i64,
    pub max_rows_per_second: i64,
    pub preset: Preset,
}

/// What a job asks for, checked field by field; fragments are validated later, against the table.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub id: i64,
    pub name: String,
    pub table_name: String,
    pub predicate: String,
    pub action: Action,
    pub set_clause: Option<String>,
    pub key_columns: Option<Vec<String>>,
    pub mode: Mode,
    pub throttle: Throttle,
    pub max_affected: Option<i64>,
    pub archive: bool,
    pub reverts: Option<String>,
    /// Slices walked at once.
    pub parallelism: usize,
    /// A delete may run although foreign keys cascade into child tables.
    pub allow_cascade: bool,
    /// For `insert`: the table walked; `table_name` is the one inserted into.
    pub source_table: Option<String>,
}

pub use crate::config::MAX_PARALLELISM;

/// Larger batches than this are refused outright: one statement must stay reviewable and short.
pub const MAX_BATCH_SIZE: i64 = 1_000_000;

impl JobSpec {
    /// Checks the user-written columns; the error names the job and the field.
    pub fn from_row(
        row: &JobRow,
        batch: &BatchConfig,
        safety: &SafetyConfig,
    ) -> Result<Self, JobError> {
        check_name(row)?;
        // Named as a failed statement is: the job and, when it has one, its table as written.
        let job = match row.table_name.as_deref().map(str::trim) {
            Some(t) if !t.is_empty() => format!("{} on {t}", row.name),
            _ => row.name.clone(),
        };
        let bad = |reason: String| JobError::invalid(&job, reason);
        check_own_tables(row).map_err(bad)?;
        let table_name = required(&row.table_name, "table_name").map_err(bad)?;
        let predicate = required(&row.predicate, "predicate").map_err(bad)?;
        let action = parse_action(row.action.as_deref()).map_err(bad)?;
        let set_clause = row.set_clause.clone().filter(|s| !s.trim().is_empty());
        check_set_clause(action, set_clause.as_deref()).map_err(bad)?;
        let mode = parse_mode(row.mode.as_deref()).map_err(bad)?;
        let throttle = Throttle::from_row(row, batch).map_err(bad)?;
        let batch = throttle.preset.defaults(batch);
        let max_affected = match row.max_affected {
            Some(n) if n < 0 => return Err(bad(format!("max_affected must be >= 0, got {n}"))),
            Some(n) => Some(n),
            None => (safety.max_affected > 0).then_some(safety.max_affected),
        };
        let key_columns = key_columns(row.key_columns.as_ref()).map_err(bad)?;
        let parallelism = in_range(
            "parallelism",
            row.parallelism,
            batch.parallelism,
            1,
            MAX_PARALLELISM,
        )
        .map_err(bad)? as usize;
        if action == Action::Revert && row.reverts.is_none() {
            return Err(bad(
                "action 'revert' needs the reverted job's name in reverts".into(),
            ));
        }
        Ok(Self {
            id: row.id,
            name: row.name.clone(),
            table_name,
            predicate,
            action,
            set_clause,
            key_columns,
            mode,
            throttle,
            max_affected,
            archive: row.archive.unwrap_or(true),
            reverts: row.reverts.clone(),
            allow_cascade: row.allow_cascade,
            source_table: source_table(action, row.source_table.as_deref()).map_err(bad)?,
            parallelism,
        })
    }
}

/// A job's name is how commands, logs and metric labels refer to it: it must be visible text.
/// A bad name is quoted with the row's id, which is what still identifies the job.
fn check_name(row: &JobRow) -> Result<(), JobError> {
    match name_problem(&row.name) {
        Some(problem) => Err(JobError::invalid(
            &format!("{:?} (id {})", row.name, row.id),
            problem,
        )),
        None => Ok(()),
    }
}

/// What is wrong with a job name, if anything: empty, or holding a control character.
pub fn name_problem(name: &str) -> Option<String> {
    if name.trim().is_empty() {
        return Some("name is empty: commands, logs and metrics refer to a job by its name".into());
    }
    name.chars().find(|c| c.is_control()).map(|c| {
        format!(
            "name contains the control character U+{:04X}: commands, logs and metrics refer to \
             a job by its name, so it must be printable",
            c as u32
        )
    })
}

/// `archive_table` and `staged_table` are the daemon's: a job row inserted with another job's
/// (a copied row) would append into that archive and break its revert, and the retention sweep
/// drops what they name.
fn check_own_tables(row: &JobRow) -> Result<(), String> {
    if let Some(t) = row.archive_table.as_deref()
        && !crate::archive::ArchiveTable::owned_by(t, row.id)
    {
        return Err(format!(
            "archive_table {t:?} is not this job's archive (backfilld names it \
             <name>_<date>_j{}); leave archive_table NULL when inserting a job",
            row.id
        ));
    }
    match row.staged_table.as_deref() {
        Some(t) if t != crate::staging::staging_name(&row.name) => Err(format!(
            "staged_table {t:?} is not this job's staging table ({:?}); leave staged_table \
             NULL: `backfilld enqueue --from-csv` sets it",
            crate::staging::staging_name(&row.name)
        )),
        _ => Ok(()),
    }
}

/// Updates need a set clause; deletes must not have one.
fn check_set_clause(action: Action, set_clause: Option<&str>) -> Result<(), String> {
    match (action, set_clause) {
        (Action::Update, None) => Err("set_clause is required for action 'update'".into()),
        (Action::Insert, None) => Err(
            "set_clause is required for action 'insert' (target_column = expression over the source row, …)".into(),
        ),
        (Action::Delete, Some(_)) => Err("set_clause must be empty for action 'delete'".into()),
        _ => Ok(()),
    }
}

/// An insert walks `source_table`; no other action has one.
fn source_table(action: Action, source: Option<&str>) -> Result<Option<String>, String> {
    let source = source.map(str::trim).filter(|s| !s.is_empty());
    match (action, source) {
        (Action::Insert, None) => {
            Err("action 'insert' needs source_table, the table to walk".into())
        }
        (Action::Insert, Some(s)) => Ok(Some(s.to_owned())),
        (_, Some(_)) => Err("source_table is only for action 'insert'".into()),
        (_, None) => Ok(None),
    }
}

/// Explicit key columns (`None`: the table's primary key or first unique NOT NULL index).
fn key_columns(cols: Option<&Vec<String>>) -> Result<Option<Vec<String>>, String> {
    match cols {
        Some(cols) if cols.is_empty() => Ok(None),
        Some(cols) if cols.iter().any(|c| c.trim().is_empty()) => {
            Err("key_columns contains an empty or NULL name".into())
        }
        other => Ok(other.cloned()),
    }
}

fn required(value: &Option<String>, field: &str) -> Result<String, String> {
    match value.as_deref().map(str::trim) {
        Some(v) if !v.is_empty() => Ok(v.to_owned()),
        _ => Err(format!("{field} is required")),
    }
}

fn parse_action(value: Option<&str>) -> Result<Action, String> {
    match value.unwrap_or("update") {
        "update" => Ok(Action::Update),
        "delete" => Ok(Action::Delete),
        "revert" => Ok(Action::Revert),
        "insert" => Ok(Action::Insert),
        other => Err(format!(
            "action must be 'update', 'delete' or 'insert', got {other:?}"
        )),
    }
}

fn parse_mode(value: Option<&str>) -> Result<Mode, String> {
    match value.unwrap_or("dry_run") {
        "dry_run" => Ok(Mode::DryRun),
        "execute" => Ok(Mode::Execute),
        other => Err(format!(
            "mode must be 'dry_run' or 'execute', got {other:?}"
        )),
    }
}

impl Throttle {
    /// The throttle of one of `slices` parallel slices: with a rate cap, each window holds at
    /// most its share of one second's rows (`RatePace` shares the pace itself).
    pub fn shared_by(mut self, slices: usize) -> Throttle {
        let slices = slices.max(1) as i64;
        if self.max_rows_per_second > 0 && slices > 1 {
            let share = (self.max_rows_per_second + slices - 1) / slices;
            self.initial_size = self.initial_size.min(share);
            self.min_size = self.min_size.min(share);
            self.max_size = self.max_size.min(share);
        }
        self
    }

    /// The job's overrides over the configured defaults, range-checked.
    pub fn from_row(row: &JobRow, batch: &BatchConfig) -> Result<Throttle, String> {
        let preset = Preset::parse(row.preset.as_deref())?;
        let batch = preset.defaults(batch);
        let initial_size = in_range("batch_size", row.batch_size, batch.size, 1, MAX_BATCH_SIZE)?;
        let target_batch_ms = in_range(
            "target_batch_ms",
            row.target_batch_ms,
            batch.target_batch_ms,
            1,
            3_600_000,
        )?;
        // The ceiling follows the target up, so a job (or configuration) asking for long batches
        // gets them.
        let ceiling_default = batch.max_batch_ms.max(target_batch_ms * 2);
        let max_batch_ms = in_range(
            "max_batch_ms",
            row.max_batch_ms,
            ceiling_default,
            1,
            3_600_000,
        )?;
        if max_batch_ms < target_batch_ms {
            return Err(format!(
                "max_batch_ms ({max_batch_ms}) must be >= target_batch_ms ({target_batch_ms})"
            ));
        }
        let sleep_ms = in_range("sleep_ms", row.sleep_ms, batch.sleep_ms, 0, 3_600_000)?;
        let max_rows_per_second = in_range(
            "max_rows_per_second",
            row.max_rows_per_second,
            batch.max_rows_per_second,
            0,
            i64::from(i32::MAX),
        )?;
        // An explicit job batch size widens the adaptive range so the job's wish is honoured.
        // A rate cap bounds every window: no batch changes more rows than one second allows (it
        // had held only on average, with a first batch of 1,000 rows under a cap of 100).
        let cap = |size: i64| match max_rows_per_second {
            0 => size,
            rate => size.min(rate),
        };
        Ok(Throttle {
            initial_size: cap(initial_size),
            min_size: cap(batch.min_size.min(initial_size)),
            max_size: cap(batch.max_size.max(initial_size)),
            target_batch_ms,
            max_batch_ms,
            sleep_ms,
            max_rows_per_second,
            preset,
        })
    }
}

fn in_range(
    field: &str,
    value: Option<i32>,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, String> {
    let Some(v) = value.map(i64::from) else {
        return Ok(default);
    };
    if v < min || v > max {
        return Err(format!("{field} must be between {min} and {max}, got {v}"));
    }
    Ok(v)
}
