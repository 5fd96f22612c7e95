//! Command-line interface: argument parsing and printing around `ops`, `schema` and `app`.
//! `anyhow` is used here only, as glue.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::check::{self, Check, Report};
use crate::config::{Config, LogFormat, Source};
use crate::job::{JobRow, Requested};
use crate::ops::{self, Gate, NewJob};
use crate::plan::Plan;
use crate::sql::Names;
use crate::{app, schema, telemetry};

/// `println!` for command output. A reader that closed the pipe (`backfilld status | head`) ends
/// the command as a `SIGPIPE` would (status 141) instead of a panic; another write error ends it
/// with a message and status 1.
macro_rules! out {
    ($($arg:tt)*) => {
        out_raw(&format!("{}\n", format_args!($($arg)*)))
    };
}

fn out_raw(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("backfilld: cannot write the output: {e}");
        std::process::exit(1);
    }
}

const EXAMPLES: &str = "\
Examples:
  backfilld migrate
  backfilld run
  backfilld run --until-idle
  backfilld enqueue --name orders_status_v1 --table public.orders \\
      --predicate 'status IS NULL' --set \"status = 'pending'\"
  backfilld status
  backfilld status orders_status_v1 --output json
  backfilld execute orders_status_v1
  backfilld pause orders_status_v1
  backfilld revert orders_status_v1
  backfilld wait orders_status_v1 --timeout 30m
  backfilld check public.orders --not-null status

Configuration: --config PATH (default config/backfilld.toml if present), environment
BACKFILLD_<SECTION>__<KEY> (e.g. BACKFILLD_METRICS__LISTEN=127.0.0.1:9187), and DATABASE_URL.";

#[derive(Debug, Parser)]
#[command(name = "backfilld", version, about = "Runs data backfills against PostgreSQL safely, in the background", after_help = EXAMPLES)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, value_name = "PATH", env = "BACKFILLD_CONFIG")]
    pub config: Option<PathBuf>,
    /// PostgreSQL URL; overrides DATABASE_URL and database.url.
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// The actions `enqueue` creates; `revert` jobs are enqueued by the `revert` command.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EnqueueAction {
    Update,
    Delete,
    Insert,
}

impl EnqueueAction {
    fn as_str(self) -> &'static str {
        match self {
            EnqueueAction::Update => "update",
            EnqueueAction::Delete => "delete",
            EnqueueAction::Insert => "insert",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the backfill schema (idempotent; safe to run from several replicas).
    Migrate,
    /// Run the daemon: claim jobs and run them in throttled batches.
    #[command(
        after_help = "Example:\n  DATABASE_URL=postgres://backfilld@db/app backfilld run --until-idle"
    )]
    Run {
        /// Exit 0 once no job is runnable, running anywhere, or waiting out a scheduled retry.
        #[arg(long)]
        until_idle: bool,
    },
    /// Enqueue a job (the same as INSERT INTO backfill.jobs). Dry run unless --execute.
    Enqueue(Box<EnqueueArgs>),
    /// Show jobs: state, rows changed, batches, progress, last error; one job in detail.
    #[command(
        after_help = "Examples:\n  backfilld status\n  backfilld status orders_status_v1 --watch\n  backfilld status --output json"
    )]
    Status {
        name: Option<String>,
        /// Refresh every 2 seconds until the shown jobs have ended. With --output json, each
        /// refresh prints one JSON array of the shown jobs on its own line (JSON Lines).
        #[arg(long)]
        watch: bool,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Ask the running job to pause after its current batch.
    Pause { name: String },
    /// Resume a paused job.
    Resume { name: String },
    /// Cancel a job (a running job stops after its current batch).
    Cancel { name: String },
    /// Approve a planned dry run: set mode = 'execute'.
    Execute { name: String },
    /// Enqueue a job restoring the before-images archived by NAME.
    Revert {
        name: String,
        /// Run although deleting the rows an insert job added cascades through foreign keys
        /// into child tables (their rows cannot be restored; the plan lists them).
        #[arg(long)]
        allow_cascade: bool,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Count rows up to the job's upper bound that still match its predicate (stored in `remaining`).
    Verify {
        name: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Wait for a job to finish; exit 0 only if it succeeded with no row left (`remaining = 0`).
    #[command(after_help = WAIT_HELP)]
    Wait(WaitArgs),
    /// Count the rows a constraint would reject before the migration that adds it.
    #[command(after_help = CHECK_HELP)]
    Check(CheckArgs),
}

/// Exit status of a gate (`wait`, `check`) that did not pass: the job ended without succeeding
/// verified, or rows violate the constraint. (1 is an error: the gate could not tell.)
const GATE_FAILED: u8 = 3;
/// `wait` gave up while the job was still pending, running or paused.
const GATE_TIMED_OUT: u8 = 4;

const WAIT_HELP: &str = "\
For the migration after a backfill (the one that adds NOT NULL or drops the old column).
Reads the job row every second until the job has finished, then exits:
  0  it succeeded and was verified with remaining = 0
  1  error (no such job, database unreachable)
  2  bad usage or configuration (an unknown option, a --timeout without a unit)
  3  it failed, was cancelled, succeeded with rows remaining or unverified, is a dry run
     awaiting approval, or a revert undid or is undoing its change
  4  still pending, running or paused when --timeout passed

Example:
  backfilld wait orders_status_v1 --timeout 30m && psql -c 'ALTER TABLE orders ALTER status SET NOT NULL'";

const CHECK_HELP: &str = "\
Counts in throttled keyset windows over the table's key (duplicates: one grouped statement under
batch.statement_timeout), prints each check's count and up to 5 offending keys or values, and exits:
  0  no violation
  1  error (unknown table or column, refused table, a parent column no foreign key can
     reference, statement failed)
  2  bad usage or configuration (no check given, an unknown option)
  3  violations found
Rows with a NULL in --unique columns are reported but are not violations: a unique index lets them in.

Examples:
  backfilld check public.orders --not-null status
  backfilld check public.users --unique tenant_id,email --output json
  backfilld check public.orders --orphans customer_id --references 'public.customers(id)'";

#[derive(Debug, Args)]
pub struct WaitArgs {
    pub name: String,
    /// Give up after this long, e.g. 30s, 10m, 2h.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("checks").required(true).multiple(true).args(["not_null", "unique", "orphans"])))]
pub struct CheckArgs {
    /// Table to check, e.g. public.orders.
    pub table: String,
    /// Count rows where COL IS NULL (what SET NOT NULL would reject). Repeatable. Column names
    /// are taken as written, or quoted as in SQL ("Unit Price").
    #[arg(long = "not-null", value_name = "COL")]
    pub not_null: Vec<String>,
    /// Count duplicate groups among rows with no NULL in the columns (what a unique index would
    /// reject), and rows with a NULL in any of them (which it lets in). Repeatable.
    #[arg(long, value_name = "COL[,COL]")]
    pub unique: Vec<String>,
    /// Count rows whose non-NULL COL has no row in --references (what a foreign key would reject).
    /// Repeatable; each pairs with the --references in the same position.
    #[arg(long, value_name = "COL", requires = "references")]
    pub orphans: Vec<String>,
    /// The parent of --orphans, e.g. public.customers(id).
    #[arg(long, value_name = "PARENT(COL)", requires = "orphans")]
    pub references: Vec<String>,
    /// Keyset columns to walk (comma-separated, bare or quoted as in SQL): unique and NOT NULL
    /// together; default: the primary key.
    #[arg(long, visible_alias = "key", value_name = "COL[,COL]")]
    pub key_columns: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

impl CheckArgs {
    /// The checks in a fixed order: not-null, unique, orphans.
    fn checks(&self) -> anyhow::Result<Vec<Check>> {
        if self.orphans.len() != self.references.len() {
            anyhow::bail!(
                "each --orphans needs its --references: got {} --orphans and {} --references",
                self.orphans.len(),
                self.references.len()
            );
        }
        let mut checks: Vec<Check> = self.not_null.iter().map(|c| Check::not_null(c)).collect();
        for columns in &self.unique {
            checks.push(Check::unique(columns)?);
        }
        for (column, references) in self.orphans.iter().zip(&self.references) {
            checks.push(Check::orphans(column, references)?);
        }
        Ok(checks)
    }
}

#[derive(Debug, Args)]
// `--priority -5` is a value, not an unknown option (and `--sleep-ms -5` gets its range error).
#[command(allow_negative_numbers = true)]
pub struct EnqueueArgs {
    /// The job's name (unique forever). With --from-csv it may be left out: the name is then
    /// made from the table, the file's name and a digest of its content
    /// (`csv_orders_prices_3f2a9c1e`), so enqueueing the same file twice is refused.
    #[arg(long, required_unless_present = "from_csv")]
    pub name: Option<String>,
    /// Target table, e.g. public.orders.
    #[arg(long)]
    pub table: String,
    /// SQL boolean expression selecting rows that still need the change (not with --from-csv,
    /// which generates it).
    #[arg(long, required_unless_present = "from_csv")]
    pub predicate: Option<String>,
    /// Update the table from a CSV file with a header: the file is staged with COPY (any error
    /// names its line, and nothing is created) and the job sets each column from the staged row
    /// of the same key (--key-columns, default the table's key).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["predicate", "set_clause", "action", "source_table"])]
    pub from_csv: Option<PathBuf>,
    /// For update: SQL assignments, e.g. "status = 'pending'".
    #[arg(long = "set")]
    pub set_clause: Option<String>,
    /// What the job does to the rows the predicate selects (revert jobs come from `revert`).
    #[arg(long, value_enum)]
    pub action: Option<EnqueueAction>,
    /// For insert: the table walked in keyset batches; --set maps the target's columns to
    /// expressions over its row, e.g. "user_id = id, kind = 'default'".
    #[arg(long, value_name = "TABLE")]
    pub source_table: Option<String>,
    /// For delete: run although foreign keys cascade into child tables (the archive cannot
    /// restore their rows; the plan still lists them). For update: run although it sets a column
    /// other tables reference ON UPDATE CASCADE, SET NULL or SET DEFAULT.
    #[arg(long)]
    pub allow_cascade: bool,
    /// Keyset columns (comma-separated, bare or quoted as in SQL); default: the primary key.
    #[arg(long, visible_alias = "key")]
    pub key_columns: Option<Vec<String>>,
    /// Change data after planning (default: dry run only).
    #[arg(long)]
    pub execute: bool,
    #[arg(long)]
    pub batch_size: Option<i32>,
    #[arg(long)]
    pub target_batch_ms: Option<i32>,
    #[arg(long)]
    pub sleep_ms: Option<i32>,
    #[arg(long)]
    pub max_rows_per_second: Option<i32>,
    /// Key-range slices walked at once (each on its own connection).
    #[arg(long)]
    pub parallelism: Option<i32>,
    /// Ceiling on one batch (ms): the longest a session can wait behind its row locks.
    #[arg(long)]
    pub max_batch_ms: Option<i32>,
    /// Defaults for unset throttle settings: gentle (default) or fast (urgent fixes).
    #[arg(long)]
    pub preset: Option<String>,
    /// Refuse or stop when more rows would change.
    #[arg(long)]
    pub max_affected: Option<i64>,
    /// Do not keep before-images (the job cannot be reverted).
    #[arg(long)]
    pub no_archive: bool,
    #[arg(long)]
    pub priority: Option<i32>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

impl Command {
    /// The output the command was asked for: a command asked for JSON that fails prints a JSON
    /// error object too, so a script parsing its stdout gets one (it got nothing).
    fn output(&self) -> Output {
        match self {
            Command::Enqueue(args) => args.output,
            Command::Status { output, .. }
            | Command::Revert { output, .. }
            | Command::Verify { output, .. } => *output,
            Command::Wait(args) => args.output,
            Command::Check(args) => args.output,
            _ => Output::Text,
        }
    }
}

/// Runs the parsed command; prints errors; returns the process exit status.
pub async fn main(cli: Cli) -> ExitCode {
    let source = Source::new(cli.config.clone(), cli.database_url.clone());
    let cfg = match source.load_reporting() {
        Ok(c) => c,
        Err((e, format)) => {
            fatal(format, &e.to_string());
            return ExitCode::from(2);
        }
    };
    let format = cfg.log.format;
    let telemetry = match telemetry::init(&cfg.log, &cfg.telemetry) {
        Ok(t) => t,
        Err(e) => {
            fatal(format, &format!("cannot set up logging: {e}"));
            return ExitCode::from(2);
        }
    };
    for name in crate::config::ignored_variables() {
        tracing::warn!(
            variable = %name,
            "ignored: not a configuration key (they are BACKFILLD_<SECTION>__<KEY>, with two \
             underscores after the section, e.g. BACKFILLD_METRICS__LISTEN)"
        );
    }
    for warning in cfg.warnings() {
        tracing::warn!("{warning}");
    }
    let output = cli.command.output();
    let result = dispatch(cli.command, source, cfg, &telemetry).await;
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            // Every error of ours quotes its cause in its own message: `{e}` says it once
            // (the alternate form would repeat each cause after it).
            fatal(format, &e.to_string());
            let configuration = e
                .downcast_ref::<crate::error::Error>()
                .is_some_and(crate::error::Error::is_configuration);
            let code = if configuration { 2 } else { 1 };
            if matches!(output, Output::Json) {
                out!(
                    "{}",
                    serde_json::json!({ "error": e.to_string(), "exit_code": code })
                );
            }
            ExitCode::from(code)
        }
    }
}

/// Bad usage (an unknown subcommand or option): clap's own message and status 2, as one JSON
/// object when the environment or the default file sets `log.format = "json"` (the arguments,
/// `--config` among them, did not parse). Help and version go out as clap prints them.
pub fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let shown = matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    let format = Source::new(None, None).log_format();
    if shown || format == LogFormat::Text {
        e.exit();
    }
    let text = e.render().to_string();
    let message = text.trim().trim_start_matches("error: ");
    fatal(format, message);
    ExitCode::from(2)
}

/// The error a command exits with, on stderr in the configured log format: with `log.format =
/// "json"` one JSON object shaped like the log's own lines, since a pipeline reading the log would
/// drop a plain line, the very one that says why the daemon exited.
fn fatal(format: LogFormat, message: &str) {
    match format {
        LogFormat::Text => eprintln!("backfilld: {message}"),
        LogFormat::Json => eprintln!(
            "{}",
            serde_json::json!({
                "timestamp": chrono::Utc::now()
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "level": "ERROR",
                "fields": { "message": format!("backfilld: {message}") },
                "target": "backfilld",
            })
        ),
    }
}

async fn dispatch(
    command: Command,
    source: Source,
    cfg: Config,
    telemetry: &telemetry::Telemetry,
) -> anyhow::Result<ExitCode> {
    if let Command::Run { until_idle } = command {
        app::run_daemon(source, cfg, until_idle, telemetry).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let names = Names::new(&cfg.database.schema);
    let pool = app::connect(&cfg).await?;
    if !matches!(command, Command::Migrate | Command::Check(_)) {
        // The job commands read backfill.jobs: say what to do rather than "relation does not
        // exist". A schema older or newer than this binary is the daemon's to refuse. (`check`
        // reads only the target table.)
        if let Err(crate::schema::SchemaError::Outdated { found: 0, .. }) =
            crate::schema::check(&pool, &names).await
        {
            anyhow::bail!(
                "schema {} holds no backfilld tables yet: run `backfilld migrate` first",
                names.schema
            );
        }
    }
    let code = match command {
        Command::Wait(args) => wait(&pool, &names, &args).await?,
        Command::Check(args) => run_check(&pool, &names, &cfg, &args).await?,
        other => {
            operate(other, &pool, &names, &cfg).await?;
            ExitCode::SUCCESS
        }
    };
    pool.close().await;
    Ok(code)
}

/// The commands that succeed or fail with an error (exit 0 or 1).
async fn operate(
    command: Command,
    pool: &crate::db::Db,
    names: &Names,
    cfg: &Config,
) -> anyhow::Result<()> {
    match command {
        Command::Migrate => print_migrated(names, &schema::migrate(pool, names).await?),
        Command::Enqueue(args) => enqueue(pool, names, cfg, *args).await?,
        Command::Status {
            name,
            watch,
            output,
        } => status(pool, names, name.as_deref(), watch, output).await?,
        Command::Pause { name } => report(
            ops::request(pool, names, &name, Requested::Paused).await?,
            "pause requested",
        ),
        Command::Resume { name } => report(
            ops::request(pool, names, &name, Requested::Running).await?,
            "resume requested",
        ),
        Command::Cancel { name } => report(
            ops::request(pool, names, &name, Requested::Cancelled).await?,
            "cancel requested",
        ),
        Command::Execute { name } => {
            let already = ops::get(pool, names, &name).await?.mode.as_deref() == Some("execute");
            let what = match already {
                true => "already approved (mode execute); nothing changed",
                false => "approved for execution",
            };
            report(ops::approve(pool, names, &name).await?, what)
        }
        Command::Revert {
            name,
            allow_cascade,
            output,
        } => {
            let row = ops::revert(pool, names, &name, allow_cascade).await?;
            print_jobs(&[row], output, true);
        }
        Command::Verify { name, output } => {
            let remaining = ops::verify(pool, names, cfg, &name).await?;
            print_verified(&name, remaining, output);
        }
        Command::Run { .. } | Command::Wait(_) | Command::Check(_) => {
            unreachable!("dispatch handles these")
        }
    }
    Ok(())
}

fn print_migrated(names: &Names, applied: &[i32]) {
    match applied {
        [] => out!(
            "schema {} is up to date (version {})",
            names.schema,
            schema::latest_version()
        ),
        v => out!("schema {}: applied migrations {v:?}", names.schema),
    }
}

fn print_verified(name: &str, remaining: i64, output: Output) {
    match output {
        Output::Json => out!(
            "{}",
            serde_json::json!({"job": name, "remaining": remaining})
        ),
        Output::Text => {
            out!("{name}: {remaining} rows up to the upper bound still match the predicate")
        }
    }
}

/// `backfilld wait`: the "ensure finished" gate.
async fn wait(pool: &crate::db::Db, names: &Names, args: &WaitArgs) -> anyhow::Result<ExitCode> {
    let (row, gate, revert) =
        ops::wait(pool, names, &args.name, args.timeout, ops::WAIT_POLL).await?;
    let mut message = match &revert {
        Some(revert) => ops::describe_reverted(&row, revert),
        None => gate.describe(&row),
    };
    if gate == Gate::TimedOut {
        message += &format!("; waited {}", humantime::format_duration(args.timeout));
    }
    match args.output {
        Output::Json => out!(
            "{}",
            serde_json::json!({
                "job": row.name,
                "state": row.state,
                "gate": gate,
                "passed": gate.passed(),
                "remaining": row.remaining,
                "progress": row.progress(),
                "last_error": row.last_error,
                "reverted_by": revert.as_ref().map(|r| &r.name),
                "message": message,
            })
        ),
        Output::Text if gate.passed() => out!("{}", printable(&message)),
        Output::Text => eprintln!("backfilld: {}", printable(&message)),
    }
    Ok(match gate {
        Gate::Passed => ExitCode::SUCCESS,
        Gate::TimedOut => ExitCode::from(GATE_TIMED_OUT),
        _ => ExitCode::from(GATE_FAILED),
    })
}

/// `backfilld check`: exit 0 without violations, `GATE_FAILED` with any.
async fn run_check(
    pool: &crate::db::Db,
    names: &Names,
    cfg: &Config,
    args: &CheckArgs,
) -> anyhow::Result<ExitCode> {
    let checks = args.checks()?;
    let keys = args.key_columns.as_deref().map(crate::sql::split_idents);
    let report = check::run(pool, names, cfg, &args.table, keys.as_deref(), &checks).await?;
    print_report(&report, args.output);
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(GATE_FAILED)
    })
}

fn print_report(report: &Report, output: Output) {
    if let Output::Json = output {
        let mut value = serde_json::to_value(report).unwrap_or_default();
        value["passed"] = report.passed().into();
        out!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return;
    }
    out!("{}: {} rows checked", report.table, report.rows_checked);
    for f in &report.findings {
        let found = match f.check {
            "unique" => format!(
                "unique ({}): {} duplicate groups ({} rows); {} rows with a NULL, which a unique \
                 index lets in",
                f.subject,
                f.violations,
                f.duplicate_rows.unwrap_or_default(),
                f.rows_with_null.unwrap_or_default()
            ),
            "orphans" => format!(
                "orphans {}: {} rows without a parent row",
                f.subject, f.violations
            ),
            _ => format!("not-null {}: {} rows are NULL", f.subject, f.violations),
        };
        out!("  {found}");
        for sample in &f.samples {
            out!("    {sample}");
        }
    }
    if report.passed() {
        out!("ok: no violations");
    } else {
        eprintln!("backfilld: {}: violations found", report.table);
    }
}

/// `enqueue`, from flags or from a CSV file.
async fn enqueue(
    pool: &crate::db::Db,
    names: &Names,
    cfg: &Config,
    args: EnqueueArgs,
) -> anyhow::Result<()> {
    let (output, file) = (args.output, args.from_csv.clone());
    let derived = match (&args.name, &file) {
        (None, Some(file)) => Some(csv_job_name(
            &canonical_table(pool, &args.table).await,
            file,
        )?),
        _ => None,
    };
    let mut job = new_job(args);
    if let Some(name) = derived {
        job.name = name;
    }
    let row = match file {
        Some(file) => {
            let (row, staged) = ops::enqueue_from_csv(pool, names, cfg, &job, &file).await?;
            eprintln!(
                "staged {} rows of {} into {}; {} keys match no row of {}",
                staged.rows,
                file.display(),
                staged.table,
                staged.unmatched,
                job.table_name
            );
            row
        }
        None => ops::enqueue(pool, names, cfg, &job).await?,
    };
    print_jobs(&[row], output, true);
    Ok(())
}

/// The table as the server resolves `given` (`public.prices` for `PRICES`, `"prices"` or
/// `public.prices`), so one table gets one derived job name however it is spelled; `given`
/// itself when it resolves to none (enqueueing then says why).
async fn canonical_table(pool: &crate::db::Db, given: &str) -> String {
    let resolved: Option<String> = crate::sql::query_scalar(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
    )
    .bind(given)
    .fetch_optional(pool)
    .await
    .ok()
    .flatten();
    resolved.unwrap_or_else(|| given.to_owned())
}

/// `csv_<table>_<file stem>_<digest>`: letters, digits and underscores of the table's and the
/// file's names (lower case, each cut to 24), and eight hex digits of an FNV-1a digest of the
/// file's bytes, so the same file on the same table always gets the same name (and runs once).
fn csv_job_name(table: &str, file: &std::path::Path) -> anyhow::Result<String> {
    let bytes =
        std::fs::read(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    // The table as given goes into the digest too: the same file for `a.prices` and `b.prices`
    // gets two names (the name keeps only the bare table name).
    let named = table.as_bytes().iter().chain(b"\0").chain(&bytes);
    let digest = named.fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let word = |s: &str| -> String {
        let w: String = crate::sql::ascii_word(s).chars().take(24).collect();
        w.trim_matches('_').to_owned()
    };
    let table = table.rsplit('.').next().unwrap_or(table);
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("file");
    Ok(format!(
        "csv_{}_{}_{:08x}",
        word(table),
        word(stem),
        digest as u32 ^ (digest >> 32) as u32
    ))
}

fn new_job(a: EnqueueArgs) -> NewJob {
    NewJob {
        name: a.name.unwrap_or_default(),
        table_name: a.table,
        predicate: a.predicate.unwrap_or_default(),
        action: a.action.map(|a| a.as_str().to_owned()),
        set_clause: a.set_clause,
        key_columns: a
            .key_columns
            .map(|k| k.iter().flat_map(|c| crate::sql::split_idents(c)).collect()),
        execute: a.execute,
        batch_size: a.batch_size,
        target_batch_ms: a.target_batch_ms,
        sleep_ms: a.sleep_ms,
        max_rows_per_second: a.max_rows_per_second,
        parallelism: a.parallelism,
        max_batch_ms: a.max_batch_ms,
        preset: a.preset,
        max_affected: a.max_affected,
        archive: a.no_archive.then_some(false),
        priority: a.priority,
        run_at: None,
        staged_table: None,
        source_table: a.source_table,
        allow_cascade: a.allow_cascade.then_some(true),
    }
}

fn report(row: JobRow, what: &str) {
    out!("{}: {what} (state {})", printable(&row.name), row.state);
}

async fn status(
    pool: &crate::db::Db,
    names: &Names,
    name: Option<&str>,
    watch: bool,
    output: Output,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let mut seen = false;
    loop {
        let rows = match ops::list(pool, names, name).await {
            Ok(rows) => rows,
            // Once watching, a database hiccup is waited out, as `wait` does.
            Err(e) if watch && seen => {
                eprintln!("backfilld: {e:#}; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        seen = true;
        if watch && matches!(output, Output::Text) && std::io::stdout().is_terminal() {
            out_raw("\x1b[2J\x1b[H");
        }
        if watch && matches!(output, Output::Json) {
            // One document per line (NDJSON), so a reader can parse each update.
            out!("{}", serde_json::Value::Array(json_rows(&rows)));
        } else {
            print_jobs(&rows, output, name.is_some());
        }
        // The same verdict as `wait`: an approved dry run stays `planned` until it is claimed.
        let ended = rows.iter().all(|r| Gate::of(r).is_some());
        if !watch || ended {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn print_jobs(rows: &[JobRow], output: Output, detail: bool) {
    match output {
        Output::Json => {
            let values = json_rows(rows);
            let text = if detail && values.len() == 1 {
                serde_json::to_string_pretty(&values[0])
            } else {
                serde_json::to_string_pretty(&values)
            };
            out!("{}", text.unwrap_or_default());
        }
        Output::Text if detail && rows.len() == 1 => print_detail(&rows[0]),
        Output::Text => print_table(rows),
    }
}

/// The rows as JSON objects, with their progress.
fn json_rows(rows: &[JobRow]) -> Vec<serde_json::Value> {
    rows.iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["progress"] = r.progress().into();
            v
        })
        .collect()
}

fn progress_text(r: &JobRow) -> String {
    r.progress()
        .map_or("-".into(), |p| format!("{:.1}%", p * 100.0))
}

fn print_table(rows: &[JobRow]) {
    // One line per job: control characters shown escaped, columns as wide as their widest value.
    let name = |r: &JobRow| printable(&r.name);
    let table = |r: &JobRow| printable(r.table_name.as_deref().unwrap_or("-"));
    let width = |f: &dyn Fn(&JobRow) -> String, title: &str| {
        rows.iter()
            .map(|r| f(r).chars().count())
            .chain([title.len()])
            .max()
            .unwrap_or_default()
    };
    let (nw, tw) = (width(&name, "NAME"), width(&table, "TABLE"));
    out!(
        "{:<nw$} {:<10} {:<8} {:<tw$} {:>12} {:>8} {:>8} {:>10}  LAST ERROR",
        "NAME",
        "STATE",
        "MODE",
        "TABLE",
        "CHANGED",
        "BATCHES",
        "PROGRESS",
        "REMAINING"
    );
    for r in rows {
        out!(
            "{:<nw$} {:<10} {:<8} {:<tw$} {:>12} {:>8} {:>8} {:>10}  {}",
            name(r),
            r.state,
            r.mode.as_deref().unwrap_or("-"),
            table(r),
            r.rows_changed,
            r.batches,
            progress_text(r),
            r.remaining.map_or("-".into(), |n| n.to_string()),
            printable(r.last_error.as_deref().unwrap_or(""))
        );
    }
}

/// `text` on one line: control characters (a newline in a job name inserted by SQL, the lines
/// of an error) escaped as Rust writes them.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

/// One job in full. Its text fields come from whoever inserted the job (and the server's
/// errors): each is shown on one line with control characters escaped, so an escape sequence in
/// a predicate does not reach the operator's terminal, nor a newline break the layout.
fn print_detail(r: &JobRow) {
    let opt = |v: &Option<String>| printable(v.as_deref().unwrap_or("-"));
    out!("job            {} (id {})", printable(&r.name), r.id);
    out!(
        "state          {}   requested: {}   attempt: {}",
        r.state,
        opt(&r.requested_state),
        r.attempt
    );
    out!("mode / action  {} / {}", opt(&r.mode), opt(&r.action));
    out!("table          {}", opt(&r.table_name));
    out!("predicate      {}", opt(&r.predicate));
    out!("set            {}", opt(&r.set_clause));
    out!(
        "progress       {}   scanned {}   changed {}   skipped {}   batches {}",
        progress_text(r),
        r.rows_scanned,
        r.rows_changed,
        r.rows_skipped,
        r.batches
    );
    out!(
        "batch size     {}",
        r.batch_size_current.map_or("-".into(), |n| n.to_string())
    );
    out!(
        "remaining      {}",
        r.remaining.map_or("-".into(), |n| n.to_string())
    );
    out!("archive        {}", opt(&r.archive_table));
    out!(
        "lease          {} until {}",
        opt(&r.lease_owner),
        r.lease_expires_at.map_or("-".into(), |t| t.to_rfc3339())
    );
    out!(
        "created        {}   started {}   finished {}",
        r.created_at.to_rfc3339(),
        r.started_at.map_or("-".into(), |t| t.to_rfc3339()),
        r.finished_at.map_or("-".into(), |t| t.to_rfc3339())
    );
    if r.state == crate::job::State::Pending && r.run_at > chrono::Utc::now() {
        out!(
            "run at         {} (not claimed before)",
            r.run_at.to_rfc3339()
        );
    }
    if let Some(e) = &r.last_error {
        out!("last error     {}", printable(e));
    }
    match r.plan.as_ref().map(Plan::from_stored) {
        Some(Ok(plan)) => print_plan(&plan),
        Some(Err(e)) => out!("plan           unreadable ({e})"),
        None => {}
    }
}

/// An estimate's duration at the precision it has: `42s`, `12m 05s`, `3h 20m`.
fn rough_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

/// The plan's counts, the checklist's verdicts (run twice, cascades, unmatched staged keys) and
/// the sample rows.
fn print_plan(plan: &Plan) {
    out!(
        "plan           {} rows would change of {} in range; estimated {} ({})",
        plan.rows_matching,
        plan.rows_in_range,
        rough_duration(plan.estimated_seconds),
        plan.estimate_basis
    );
    if let Some(v) = &plan.idempotency {
        out!("  run twice    {}", v.summary);
    }
    for c in &plan.cascades {
        let rows = c.rows_counted();
        let via = match c.via.as_slice() {
            [] => String::new(),
            tables => format!(", through {}", tables.join(", ")),
        };
        out!(
            "  cascade      {} ON DELETE {}: {rows} ({}{})",
            printable(&c.child),
            c.on_delete,
            printable(&c.constraint),
            printable(&via)
        );
    }
    if let Some(n) = plan.unmatched_staged_keys {
        out!("  staged keys  {n} match no row of the table");
    }
    for w in &plan.warnings {
        out!("  warning      {}", printable(w));
    }
    for s in &plan.samples {
        out!("  sample       {s}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn estimates_read_at_their_precision() {
        assert_eq!(super::rough_duration(4.4), "4s");
        assert_eq!(super::rough_duration(725.0), "12m 05s");
        assert_eq!(super::rough_duration(12_000.0), "3h 20m");
    }

    #[test]
    fn negative_numbers_are_values() {
        use clap::Parser;
        let args = ["backfilld", "enqueue", "--name", "n", "--table", "t"];
        let rest = [
            "--predicate",
            "true",
            "--priority",
            "-5",
            "--sleep-ms",
            "-1",
        ];
        let cli = super::Cli::try_parse_from(args.iter().chain(&rest)).expect("parses");
        let super::Command::Enqueue(e) = cli.command else {
            panic!("not enqueue")
        };
        assert_eq!((e.priority, e.sleep_ms), (Some(-5), Some(-1)));
    }
}
