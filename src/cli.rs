//! Command-line interface: argument parsing and printing around `ops`, `schema` and `app`.
//! `anyhow` is used here only, as glue.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{Config, Source};
use crate::job::{JobRow, Requested, State};
use crate::ops::{self, NewJob};
use crate::plan::Plan;
use crate::sql::Names;
use crate::{app, schema, telemetry};

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
        /// Exit 0 once no runnable job is left.
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
        /// Refresh every 2 seconds until the shown jobs have ended.
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
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Count rows up to the job's upper bound that still match its predicate (stored in `remaining`).
    Verify {
        name: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    #[arg(long)]
    pub name: String,
    /// Target table, e.g. public.orders.
    #[arg(long)]
    pub table: String,
    /// SQL boolean expression selecting rows that still need the change.
    #[arg(long)]
    pub predicate: String,
    /// For update: SQL assignments, e.g. "status = 'pending'".
    #[arg(long = "set")]
    pub set_clause: Option<String>,
    /// update or delete.
    #[arg(long)]
    pub action: Option<String>,
    /// Keyset columns (comma-separated); default: the primary key.
    #[arg(long, value_delimiter = ',')]
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

/// Runs the parsed command; prints errors; returns the process exit status.
pub async fn main(cli: Cli) -> ExitCode {
    let source = Source::new(cli.config.clone(), cli.database_url.clone());
    let cfg = match source.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("backfilld: {e}");
            return ExitCode::from(2);
        }
    };
    let telemetry = match telemetry::init(&cfg.log, &cfg.telemetry) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("backfilld: cannot set up logging: {e}");
            return ExitCode::from(2);
        }
    };
    let result = dispatch(cli.command, source, cfg, &telemetry).await;
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("backfilld: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(
    command: Command,
    source: Source,
    cfg: Config,
    telemetry: &telemetry::Telemetry,
) -> anyhow::Result<()> {
    if let Command::Run { until_idle } = command {
        return Ok(app::run_daemon(source, cfg, until_idle, telemetry).await?);
    }
    let names = Names::new(&cfg.database.schema);
    let pool = app::connect(&cfg).await?;
    match command {
        Command::Migrate => print_migrated(&names, &schema::migrate(&pool, &names).await?),
        Command::Enqueue(args) => {
            let output = args.output;
            let row = ops::enqueue(&pool, &names, &new_job(*args)).await?;
            print_jobs(&[row], output, true);
        }
        Command::Status {
            name,
            watch,
            output,
        } => status(&pool, &names, name.as_deref(), watch, output).await?,
        Command::Pause { name } => report(
            ops::request(&pool, &names, &name, Requested::Paused).await?,
            "pause requested",
        ),
        Command::Resume { name } => report(
            ops::request(&pool, &names, &name, Requested::Running).await?,
            "resume requested",
        ),
        Command::Cancel { name } => report(
            ops::request(&pool, &names, &name, Requested::Cancelled).await?,
            "cancel requested",
        ),
        Command::Execute { name } => report(
            ops::approve(&pool, &names, &name).await?,
            "approved for execution",
        ),
        Command::Revert { name, output } => {
            let row = ops::revert(&pool, &names, &name).await?;
            print_jobs(&[row], output, true);
        }
        Command::Verify { name, output } => {
            let remaining = ops::verify(&pool, &names, &cfg, &name).await?;
            print_verified(&name, remaining, output);
        }
        Command::Run { .. } => unreachable!("handled above"),
    }
    pool.close().await;
    Ok(())
}

fn print_migrated(names: &Names, applied: &[i32]) {
    match applied {
        [] => println!(
            "schema {} is up to date (version {})",
            names.schema,
            schema::latest_version()
        ),
        v => println!("schema {}: applied migrations {v:?}", names.schema),
    }
}

fn print_verified(name: &str, remaining: i64, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"job": name, "remaining": remaining})
        ),
        Output::Text => {
            println!("{name}: {remaining} rows up to the upper bound still match the predicate")
        }
    }
}

fn new_job(a: EnqueueArgs) -> NewJob {
    NewJob {
        name: a.name,
        table_name: a.table,
        predicate: a.predicate,
        action: a.action,
        set_clause: a.set_clause,
        key_columns: a.key_columns,
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
    }
}

fn report(row: JobRow, what: &str) {
    println!("{}: {what} (state {})", row.name, row.state);
}

async fn status(
    pool: &sqlx::PgPool,
    names: &Names,
    name: Option<&str>,
    watch: bool,
    output: Output,
) -> anyhow::Result<()> {
    loop {
        let rows = ops::list(pool, names, name).await?;
        if watch && matches!(output, Output::Text) {
            print!("\x1b[2J\x1b[H");
        }
        print_jobs(&rows, output, name.is_some());
        let ended = rows
            .iter()
            .all(|r| r.state.is_finished() || r.state == State::Planned);
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
            let values: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    let mut v = serde_json::to_value(r).unwrap_or_default();
                    v["progress"] = r.progress().into();
                    v
                })
                .collect();
            let text = if detail && values.len() == 1 {
                serde_json::to_string_pretty(&values[0])
            } else {
                serde_json::to_string_pretty(&values)
            };
            println!("{}", text.unwrap_or_default());
        }
        Output::Text if detail && rows.len() == 1 => print_detail(&rows[0]),
        Output::Text => print_table(rows),
    }
}

fn progress_text(r: &JobRow) -> String {
    r.progress()
        .map_or("-".into(), |p| format!("{:.1}%", p * 100.0))
}

fn print_table(rows: &[JobRow]) {
    println!(
        "{:<32} {:<10} {:<8} {:<28} {:>12} {:>8} {:>8} {:>10}  LAST ERROR",
        "NAME", "STATE", "MODE", "TABLE", "CHANGED", "BATCHES", "PROGRESS", "REMAINING"
    );
    for r in rows {
        println!(
            "{:<32} {:<10} {:<8} {:<28} {:>12} {:>8} {:>8} {:>10}  {}",
            r.name,
            r.state,
            r.mode.as_deref().unwrap_or("-"),
            r.table_name.as_deref().unwrap_or("-"),
            r.rows_changed,
            r.batches,
            progress_text(r),
            r.remaining.map_or("-".into(), |n| n.to_string()),
            r.last_error.as_deref().unwrap_or("")
        );
    }
}

fn print_detail(r: &JobRow) {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("job            {} (id {})", r.name, r.id);
    println!(
        "state          {}   requested: {}   attempt: {}",
        r.state,
        opt(&r.requested_state),
        r.attempt
    );
    println!("mode / action  {} / {}", opt(&r.mode), opt(&r.action));
    println!("table          {}", opt(&r.table_name));
    println!("predicate      {}", opt(&r.predicate));
    println!("set            {}", opt(&r.set_clause));
    println!(
        "progress       {}   scanned {}   changed {}   skipped {}   batches {}",
        progress_text(r),
        r.rows_scanned,
        r.rows_changed,
        r.rows_skipped,
        r.batches
    );
    println!(
        "batch size     {}",
        r.batch_size_current.map_or("-".into(), |n| n.to_string())
    );
    println!(
        "remaining      {}",
        r.remaining.map_or("-".into(), |n| n.to_string())
    );
    println!("archive        {}", opt(&r.archive_table));
    println!(
        "lease          {} until {}",
        opt(&r.lease_owner),
        r.lease_expires_at.map_or("-".into(), |t| t.to_rfc3339())
    );
    println!(
        "created        {}   started {}   finished {}",
        r.created_at.to_rfc3339(),
        r.started_at.map_or("-".into(), |t| t.to_rfc3339()),
        r.finished_at.map_or("-".into(), |t| t.to_rfc3339())
    );
    if let Some(e) = &r.last_error {
        println!("last error     {e}");
    }
    match r.plan.as_ref().map(Plan::from_stored) {
        Some(Ok(plan)) => {
            println!(
                "plan           {} rows would change of {} in range; estimated {:.0}s ({})",
                plan.rows_matching, plan.rows_in_range, plan.estimated_seconds, plan.estimate_basis
            );
            for s in &plan.samples {
                println!("  sample       {s}");
            }
        }
        Some(Err(e)) => println!("plan           unreadable ({e})"),
        None => {}
    }
}
