//! The command line: configuration handling, migrate, enqueue/status/execute/verify, and the HTTP
//! endpoints of a running daemon.
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler

mod common;

use std::process::Command;

use common::{Db, NewJob, free_port, http_get};
use sqlx::PgPool;

fn backfilld(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", url)
        .env(
            "BACKFILLD_CONFIG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/backfilld.toml"),
        )
        .output()
        .expect("run backfilld")
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_example_config_is_valid_and_bad_config_exits_2() {
    let url = "postgres://nobody@127.0.0.1:1/none";
    let cfg = backfilld::config::Source::new(
        Some(concat!(env!("CARGO_MANIFEST_DIR"), "/config/backfilld.toml").into()),
        Some(url.into()),
    );
    let loaded = cfg.load().expect("config/backfilld.toml must load");
    assert_eq!(loaded.database.schema, "backfill");
    let bad = Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .args(["status"])
        .env("DATABASE_URL", url)
        .env("BACKFILLD_BATCH__MIN_SIZE", "0")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("batch.min_size"), "{}", stderr(&bad));
    let help = Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(stdout(&help).contains("Examples:"));
}

/// With `log.format = "json"` the error a command exits with is one JSON object like every other
/// stderr line, also when the configuration itself is what fails (it was a plain text line, which
/// a JSON log pipeline drops). A configuration file without an extension is read as TOML (it was
/// "not found").
#[test]
fn exit_errors_follow_the_log_format_and_any_file_name_is_toml() {
    let dir = std::env::temp_dir().join(format!("backfilld-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config");
    std::fs::write(&file, "[log]\nformat = \"json\"\n").unwrap();
    let run = |extra: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_backfilld"));
        cmd.args(["--config", file.to_str().unwrap(), "status"])
            .env_clear()
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("BACKFILLD_DATABASE__CONNECT_TIMEOUT", "1s");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let lines = |o: &std::process::Output| -> Vec<serde_json::Value> {
        stderr(o)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    let bad = run(&[("BACKFILLD_WORKER__CONCURRENCY", "abc")]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    let logged = lines(&bad);
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0]["level"], "ERROR");
    let message = logged[0]["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("concurrency"), "{message}");

    let unreachable = run(&[]);
    assert_eq!(
        unreachable.status.code(),
        Some(1),
        "{}",
        stderr(&unreachable)
    );
    let logged = lines(&unreachable);
    let last = logged.last().expect("an error line");
    assert_eq!(last["level"], "ERROR");
    assert!(
        last["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("backfilld: ")
    );

    std::fs::write(&file, "").unwrap();
    let text = run(&[("BACKFILLD_BATCH__MIN_SIZE", "0")]);
    assert_eq!(text.status.code(), Some(2));
    assert!(
        stderr(&text).starts_with("backfilld: invalid configuration: batch.min_size"),
        "an empty file is a valid one, and text the default format: {}",
        stderr(&text)
    );

    // A file that does not parse, and one that is not there: the environment still says json.
    std::fs::write(&file, "[log\nformat = 1").unwrap();
    let broken = run(&[("BACKFILLD_LOG__FORMAT", "json")]);
    assert_eq!(broken.status.code(), Some(2));
    let logged = lines(&broken);
    let message = logged[0]["fields"]["message"].as_str().unwrap_or_default();
    assert!(
        logged.len() == 1 && message.contains(&format!("{}: TOML parse error", file.display())),
        "{logged:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
    let missing = run(&[("BACKFILLD_LOG__FORMAT", "json")]);
    assert_eq!(missing.status.code(), Some(2));
    let logged = lines(&missing);
    let message = logged[0]["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("No such file"), "{message}");

    // Not a regular file: read all the same (it was "not found").
    let null = Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .args(["--config", "/dev/null", "status"])
        .env_clear()
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("BACKFILLD_BATCH__MIN_SIZE", "0")
        .output()
        .unwrap();
    assert!(
        stderr(&null).starts_with("backfilld: invalid configuration: batch.min_size"),
        "{}",
        stderr(&null)
    );
}

/// A value of the wrong type, or an unknown key, says where it came from: the configuration file
/// (it named only the key), or the environment. A file read from a pipe is read once, so its
/// own `log.format` reports its error (it was read again, found empty, and the error was text).
/// A usage error follows `log.format` from the environment. A lease shorter than the connect
/// timeout is warned about.
#[test]
fn configuration_errors_say_where_the_value_came_from() {
    let dir = std::env::temp_dir().join(format!("backfilld-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("backfilld.toml");
    let run = |args: &[&str], env: &[(&str, &str)], stdin: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_backfilld"));
        cmd.args(args)
            .env_clear()
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("BACKFILLD_DATABASE__CONNECT_TIMEOUT", "1s")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(text) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    };
    let config = file.to_str().unwrap();
    std::fs::write(&file, "[worker]\nconcurrency = \"many\"\n").unwrap();
    let typed = run(&["--config", config, "status"], &[], None);
    assert_eq!(typed.status.code(), Some(2));
    assert!(
        stderr(&typed).contains(&format!(
            "configuration file {config}: invalid type: string \"many\""
        )),
        "{}",
        stderr(&typed)
    );
    std::fs::write(&file, "[worker]\nconcurency = 3\n").unwrap();
    let unknown = run(&["--config", config, "status"], &[], None);
    assert!(
        stderr(&unknown).contains(&format!(
            "configuration file {config}: unknown field `concurency`"
        )),
        "{}",
        stderr(&unknown)
    );
    std::fs::write(&file, "").unwrap();
    let from_env = run(
        &["--config", config, "status"],
        &[("BACKFILLD_WORKER__CONCURENCY", "3")],
        None,
    );
    let message = stderr(&from_env);
    assert!(
        message.contains("unknown field `concurency`")
            && message.contains("set by a BACKFILLD_ environment variable")
            && !message.contains(config),
        "{message}"
    );
    // Values that do not parse say what would.
    for (var, value, said) in [
        (
            "BACKFILLD_DATABASE__POOL_MODE",
            "statement",
            "\"statement\" is not one of \"session\", \"transaction\"",
        ),
        (
            "BACKFILLD_WORKER__LEASE_TTL",
            "forever",
            "\"forever\" is not a duration such as \"30s\"",
        ),
        (
            "BACKFILLD_WORKER__LEASE_TTL",
            "8s",
            "worker.heartbeat_interval: must be non-zero and at most half of worker.lease_ttl \
             (it is 5s, and worker.lease_ttl 8s)",
        ),
    ] {
        let out = run(&["--config", config, "status"], &[(var, value)], None);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            stderr(&out).contains(said),
            "{var}={value}: {}",
            stderr(&out)
        );
    }
    std::fs::remove_dir_all(&dir).ok();

    let piped = run(
        &["--config", "/dev/stdin", "status"],
        &[],
        Some("[log]\nformat = \"json\"\n[worker]\nconcurrency = \"x\"\n"),
    );
    let line: serde_json::Value = serde_json::from_str(stderr(&piped).trim())
        .unwrap_or_else(|e| panic!("{e}: {}", stderr(&piped)));
    let message = line["fields"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("configuration file /dev/stdin: invalid type"),
        "{message}"
    );

    let usage = run(&["bogus"], &[("BACKFILLD_LOG__FORMAT", "json")], None);
    assert_eq!(usage.status.code(), Some(2));
    let line: serde_json::Value = serde_json::from_str(stderr(&usage).trim())
        .unwrap_or_else(|e| panic!("{e}: {}", stderr(&usage)));
    assert!(
        line["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("backfilld: unrecognized subcommand 'bogus'"),
        "{line}"
    );
    let plain = run(&["bogus"], &[], None);
    assert!(
        stderr(&plain).starts_with("error: unrecognized subcommand 'bogus'"),
        "{}",
        stderr(&plain)
    );

    let short_lease = run(
        &["status"],
        &[
            ("BACKFILLD_WORKER__LEASE_TTL", "1s"),
            ("BACKFILLD_WORKER__HEARTBEAT_INTERVAL", "500ms"),
        ],
        None,
    );
    assert!(
        stderr(&short_lease)
            .contains("database.connect_timeout (1s) is not shorter than worker.lease_ttl (1s)"),
        "{}",
        stderr(&short_lease)
    );
}

/// A job's text comes from whoever inserted it: `status NAME` and `wait` show it with control
/// characters escaped, as the list view does (an escape sequence in a predicate reached the
/// operator's terminal; a newline broke the layout). A job scheduled for later says when.
#[sqlx::test]
async fn the_detail_view_escapes_control_characters_and_shows_run_at(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE t8 (id int PRIMARY KEY, w text);
         INSERT INTO backfill.jobs (name, table_name, predicate, set_clause, run_at)
         VALUES (E'esc\\nname', 't8', E'w IS DISTINCT FROM \\'\\033[2J\\'\\nAND w IS NULL',
                 'w = 1', now() + interval '1 day');",
    )
    .await;
    let out = backfilld(&db.url, &["status", "esc\nname"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!text.contains('\u{1b}'), "{text:?}");
    assert!(text.contains("job            esc\\nname (id"), "{text}");
    assert!(
        text.contains("predicate      w IS DISTINCT FROM '\\u{1b}[2J'\\nAND w IS NULL"),
        "{text}"
    );
    assert!(text.contains("run at         "), "{text}");
    let wait = backfilld(&db.url, &["wait", "esc\nname", "--timeout", "1s"]);
    assert_eq!(wait.status.code(), Some(4));
    assert!(
        stderr(&wait).contains("esc\\nname: still pending"),
        "{}",
        stderr(&wait)
    );
}

/// `revert` of a planned dry run says it changed nothing (it said "cancel it or let it finish");
/// `execute` of a job already approved says so (it said "approved for execution" again).
#[sqlx::test]
async fn revert_and_execute_say_what_a_dry_run_is(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE t5 (id int PRIMARY KEY, w text);
         INSERT INTO t5 SELECT g, NULL FROM generate_series(1, 10) g;",
    )
    .await;
    NewJob::new("dry5", "t5")
        .predicate("w IS NULL")
        .set("w = 'x'")
        .text("mode", "dry_run")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let revert = backfilld(&db.url, &["revert", "dry5"]);
    assert_eq!(revert.status.code(), Some(1));
    assert!(
        stderr(&revert).contains("it is a dry run awaiting approval (planned): it changed no rows"),
        "{}",
        stderr(&revert)
    );
    // Asked for JSON, a failing command prints a JSON error on stdout too (it printed nothing).
    let json = backfilld(&db.url, &["revert", "dry5", "--output", "json"]);
    assert_eq!(json.status.code(), Some(1));
    let error: serde_json::Value = serde_json::from_str(stdout(&json).trim())
        .unwrap_or_else(|e| panic!("{e}: {}", stdout(&json)));
    assert_eq!(error["exit_code"], 1);
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|m| m.contains("dry run awaiting approval")),
        "{error}"
    );
    let first = backfilld(&db.url, &["execute", "dry5"]);
    assert!(
        stdout(&first).contains("dry5: approved for execution"),
        "{}",
        stdout(&first)
    );
    let again = backfilld(&db.url, &["execute", "dry5"]);
    assert!(again.status.success());
    assert!(
        stdout(&again).contains("dry5: already approved (mode execute); nothing changed"),
        "{}",
        stdout(&again)
    );
}

/// A job command on a database nobody migrated says to run `backfilld migrate`.
#[sqlx::test]
async fn commands_on_an_unmigrated_schema_say_to_migrate(pool: PgPool) {
    let db = Db::new(pool).await;
    let fresh = Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .args(["status"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("BACKFILLD_DATABASE__SCHEMA", "nowhere")
        .output()
        .unwrap();
    assert_eq!(fresh.status.code(), Some(1));
    assert!(
        stderr(&fresh).contains(
            "schema nowhere holds no backfilld tables yet: run `backfilld migrate` first"
        ),
        "{}",
        stderr(&fresh)
    );
}

/// A `BACKFILLD_` variable with one underscore after its section is not a key: it is named in a
/// warning instead of being ignored silently.
#[test]
fn a_variable_that_is_not_a_key_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .args(["status"])
        .env_clear()
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("BACKFILLD_METRICS_LISTEN", "0.0.0.0:9187")
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("variable=BACKFILLD_METRICS_LISTEN"),
        "{}",
        stderr(&out)
    );
}

#[sqlx::test]
async fn migrate_is_idempotent_and_safe_to_run_concurrently(pool: PgPool) {
    let db = Db::new(pool).await;
    let again = backfilld(&db.url, &["migrate"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stdout(&again).contains("up to date"), "{}", stdout(&again));
    // Two replicas migrating a fresh schema at once: each migration applies once.
    let other = backfilld::sql::Names::new("other");
    let (a, b) = tokio::join!(
        backfilld::schema::migrate(&db.lib, &other),
        backfilld::schema::migrate(&db.lib, &other),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let latest = backfilld::schema::latest_version();
    assert!(
        a.is_empty() || b.is_empty(),
        "one replica applies, the other finds nothing to do: {a:?} {b:?}"
    );
    assert_eq!(a.len() + b.len(), latest as usize);
    let recorded = db
        .scalar_i64("SELECT count(*) FROM other.schema_migrations")
        .await;
    assert_eq!(recorded, i64::from(latest));
    // The ledger refuses deletes: a name runs once, forever.
    NewJob::new("keep", "x")
        .predicate("true")
        .set("a = 1")
        .insert(&db)
        .await;
    let err = sqlx::query("DELETE FROM backfill.jobs")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("execution ledger"), "{err}");
}

#[sqlx::test]
async fn enqueue_status_execute_verify_from_the_command_line(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, s text); INSERT INTO items SELECT g, NULL FROM generate_series(1, 300) g;").await;
    let out = backfilld(
        &db.url,
        &[
            "enqueue",
            "--name",
            "fill",
            "--table",
            "public.items",
            "--predicate",
            "s IS NULL",
            "--set",
            "s = 'x'",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let dup = backfilld(
        &db.url,
        &[
            "enqueue",
            "--name",
            "fill",
            "--table",
            "items",
            "--predicate",
            "true",
            "--set",
            "s = 'y'",
        ],
    );
    assert_eq!(dup.status.code(), Some(1));
    assert!(stderr(&dup).contains("already exists"), "{}", stderr(&dup));
    db.daemon().until_idle().spawn().wait_ok().await;
    let status = backfilld(&db.url, &["status", "fill", "--output", "json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&status)).expect("status json");
    assert_eq!(json["state"], "planned");
    assert_eq!(json["plan"]["rows_matching"], 300);
    let detail = stdout(&backfilld(&db.url, &["status", "fill"]));
    assert!(detail.contains("run twice    idempotent"), "{detail}");
    assert!(backfilld(&db.url, &["execute", "fill"]).status.success());
    db.daemon().until_idle().spawn().wait_ok().await;
    let table = stdout(&backfilld(&db.url, &["status"]));
    assert!(
        table.contains("fill") && table.contains("succeeded") && table.contains("100.0%"),
        "{table}"
    );
    db.exec("UPDATE items SET s = NULL WHERE id <= 7").await;
    let verify = backfilld(&db.url, &["verify", "fill", "--output", "json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&verify)).expect("verify json");
    assert_eq!(json["remaining"], 7);
    assert_eq!(db.job("fill").await.remaining, Some(7));
    let missing = backfilld(&db.url, &["pause", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("no job named"));
    let ended = backfilld(&db.url, &["cancel", "fill"]);
    assert!(
        stderr(&ended).contains("already ended"),
        "{}",
        stderr(&ended)
    );
}

/// The README's frozen clock in a predicate, on a table with statistics: the planner calls
/// `job_started_at` to estimate the comparison, and its "no job has this name" had refused the
/// enqueue (the job does not exist while enqueue checks it). It is accepted, and the job then
/// reads its own start.
#[sqlx::test]
async fn enqueue_accepts_the_frozen_clock_on_an_analyzed_table(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE sessions (id int PRIMARY KEY, updated_at timestamptz NOT NULL);
         INSERT INTO sessions SELECT g, now() - g * interval '1 day' FROM generate_series(1, 800) g;
         ANALYZE sessions;",
    )
    .await;
    let out = backfilld(
        &db.url,
        &[
            "enqueue",
            "--name",
            "purge_sessions",
            "--table",
            "public.sessions",
            "--action",
            "delete",
            "--predicate",
            "updated_at < backfill.job_started_at('purge_sessions') - interval '1 year'",
            "--execute",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("purge_sessions").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    // Over a year before the job's start, which came after the rows' `now()`: days 365..800
    // (the errors the function keeps outside a check:
    // `checklist::job_started_at_is_one_instant_for_the_whole_job`).
    assert_eq!(job.rows_changed, 800 - 364);
}

/// Insert and cascading-delete jobs from the command line; a job whose columns, tables or
/// fragments would fail its first claim is refused at enqueue and leaves no row.
/// Dates and times in a job, and in a file `enqueue --from-csv` reads, mean what they mean in
/// psql in that database: its TimeZone and date field order (here New York and DMY, set with
/// ALTER DATABASE). sqlx's start-up parameters (UTC, MDY) had overridden both, so the purge
/// read '02/01/2024' as the 1st of February in UTC and deleted every row.
#[sqlx::test]
async fn dates_in_jobs_and_files_read_as_the_database_reads_them(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE ev (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, day date);
         INSERT INTO ev SELECT g, '2024-01-01 00:00+00'::timestamptz + g * interval '1 hour', NULL
         FROM generate_series(1, 96) g;
         CREATE TABLE old_ev (LIKE ev INCLUDING ALL);
         INSERT INTO old_ev SELECT * FROM ev;
         CREATE TABLE due (id bigint PRIMARY KEY, at timestamptz, on_day date);
         INSERT INTO due VALUES (1, NULL, NULL);
         DO $$ BEGIN
           EXECUTE format('ALTER DATABASE %I SET timezone = %L', current_database(), 'America/New_York');
           EXECUTE format('ALTER DATABASE %I SET datestyle = %L', current_database(), 'SQL, DMY');
         END $$;",
    )
    .await;
    NewJob::new("days", "ev")
        .predicate("day IS NULL")
        .set("day = created_at::date")
        .insert(&db)
        .await;
    NewJob::new("purge", "old_ev")
        .predicate("created_at < '02/01/2024'")
        .raw("action", "'delete'")
        .insert(&db)
        .await;
    db.exec("UPDATE backfill.jobs SET mode = 'execute'").await;
    let file = std::env::temp_dir().join(format!("due-{}.csv", std::process::id()));
    std::fs::write(&file, "id,at,on_day\n1,2024-07-01 09:00,03/04/2024\n").unwrap();
    let csv = backfilld(
        &db.url,
        &[
            "enqueue",
            "--name",
            "due_fix",
            "--table",
            "public.due",
            "--from-csv",
            file.to_str().unwrap(),
            "--execute",
        ],
    );
    let _ = std::fs::remove_file(&file);
    assert!(csv.status.success(), "{}", stderr(&csv));
    let mut daemon = db.daemon().until_idle().spawn();
    daemon.wait_ok().await;
    // New York is UTC-5 in January: hours 1-4 fall on the 31st of December there.
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM ev WHERE day = '2023-12-31'")
            .await,
        4
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM ev WHERE day = '2024-01-01'")
            .await,
        24
    );
    // The 2nd of January, midnight in New York, is 05:00 UTC: hours 1-28 are before it.
    assert_eq!(db.job("purge").await.rows_changed, 28);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM old_ev").await, 68);
    assert_eq!(
        db.scalar_text(
            "SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' ' || on_day::text
             FROM due"
        )
        .await,
        "2024-07-01 13:00 2024-04-03"
    );
    assert!(
        daemon
            .log()
            .contains("timezone=\"America/New_York\" datestyle=\"ISO, DMY\""),
        "{}",
        daemon.log()
    );
}

/// The design's form, `enqueue --from-csv FILE --key COL --table T`, without `--name`: the job is
/// named from the table, the file and its content, so the same file enqueued twice is refused.
#[sqlx::test]
async fn a_csv_job_without_a_name_is_named_from_its_file(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE prices (id bigint PRIMARY KEY, price numeric);
         INSERT INTO prices VALUES (1, 1), (2, 2);",
    )
    .await;
    let dir = std::env::temp_dir().join(format!("csvname-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("Q4 prices.csv");
    std::fs::write(&file, "id,price\n1,10\n2,20\n").unwrap();
    let path = file.to_str().unwrap();
    let args = [
        "enqueue",
        "--from-csv",
        path,
        "--key",
        "id",
        "--table",
        "prices",
        "--output",
        "json",
    ];
    let first = backfilld(&db.url, &args);
    assert!(first.status.success(), "{}", stderr(&first));
    let row: serde_json::Value = serde_json::from_str(&stdout(&first)).unwrap();
    let name = row["name"].as_str().unwrap_or_default().to_owned();
    assert!(name.starts_with("csv_prices_q4_prices_"), "{row}");
    assert_eq!(name.len(), "csv_prices_q4_prices_".len() + 8, "{name}");
    let again = backfilld(&db.url, &args);
    assert!(!again.status.success(), "the same file twice");
    assert!(stderr(&again).contains(&name), "{}", stderr(&again));
    // However the table is spelled (each spelling was a new job with its own digest).
    for spelled in ["public.prices", "PUBLIC.PRICES", "\"prices\""] {
        let mut respelled = args;
        respelled[6] = spelled;
        let out = backfilld(&db.url, &respelled);
        assert!(!out.status.success(), "{spelled}");
        assert!(stderr(&out).contains(&name), "{spelled}: {}", stderr(&out));
    }
    std::fs::write(&file, "id,price\n1,11\n2,21\n").unwrap();
    let changed = backfilld(&db.url, &args);
    assert!(changed.status.success(), "{}", stderr(&changed));
    // The same file for a table of the same name in another schema is another job.
    db.exec("CREATE SCHEMA other; CREATE TABLE other.prices (LIKE prices INCLUDING ALL); INSERT INTO other.prices VALUES (1, 1), (2, 2);")
        .await;
    let mut elsewhere = args;
    elsewhere[6] = "other.prices";
    let other = backfilld(&db.url, &elsewhere);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(other.status.success(), "{}", stderr(&other));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM backfill.jobs").await, 3);
}

#[sqlx::test]
async fn enqueue_insert_and_cascading_delete_jobs_and_refuse_bad_ones(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE users (id int PRIMARY KEY);
         INSERT INTO users SELECT generate_series(1, 50);
         CREATE TABLE policies (user_id int PRIMARY KEY REFERENCES users ON DELETE CASCADE, kind text);",
    )
    .await;
    let insert = [
        "enqueue",
        "--name",
        "policies",
        "--table",
        "public.policies",
        "--action",
        "insert",
        "--source-table",
        "public.users",
        "--predicate",
        "NOT EXISTS (SELECT 1 FROM policies p WHERE p.user_id = users.id)",
        "--set",
        "user_id = id, kind = 'default'",
        "--execute",
    ];
    let out = backfilld(&db.url, &insert);
    assert!(out.status.success(), "{}", stderr(&out));
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("policies").await.state, "succeeded");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM policies").await, 50);

    let purge = |name: &'static str, extra: &'static [&'static str]| {
        let mut args = vec![
            "enqueue",
            "--name",
            name,
            "--table",
            "public.users",
            "--action",
            "delete",
            "--predicate",
            "id > 40",
            "--execute",
        ];
        args.extend_from_slice(extra);
        backfilld(&db.url, &args)
    };
    assert!(purge("purge", &[]).status.success());
    assert!(purge("purge_anyway", &["--allow-cascade"]).status.success());
    db.daemon().until_idle().spawn().wait_ok().await;
    let refused = db.job("purge").await;
    assert_eq!(refused.state, "failed");
    assert!(
        refused
            .last_error
            .unwrap_or_default()
            .contains("allow_cascade"),
        "the plan names the way out"
    );
    assert_eq!(db.job("purge_anyway").await.state, "succeeded");
    let detail = stdout(&backfilld(&db.url, &["status", "purge_anyway"]));
    assert!(
        detail.contains("cascade      public.policies ON DELETE CASCADE: 10 child rows"),
        "{detail}"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM policies").await, 40);

    let no_source = backfilld(
        &db.url,
        &[
            "enqueue",
            "--name",
            "orphan",
            "--table",
            "public.policies",
            "--action",
            "insert",
            "--predicate",
            "true",
            "--set",
            "user_id = 1",
        ],
    );
    assert_eq!(no_source.status.code(), Some(1));
    let err = stderr(&no_source);
    assert!(
        err.contains("orphan") && err.contains("source_table"),
        "{err}"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM backfill.jobs WHERE name = 'orphan'")
            .await,
        0,
        "a refused job leaves no row"
    );
    // Typos a replica would fail the job on (a table, a column, a fragment) are refused at
    // enqueue, named, with nothing inserted.
    for (name, table, predicate, set, want) in [
        (
            "typo_table",
            "public.userz",
            "id > 1",
            "id = id",
            "table public.userz does not exist",
        ),
        (
            "typo_column",
            "public.policies",
            "kynd IS NULL",
            "kind = 'x'",
            "kynd",
        ),
        (
            "typo_set",
            "public.policies",
            "kind IS NULL",
            "knd = 'x'",
            "knd",
        ),
    ] {
        let out = backfilld(
            &db.url,
            &[
                "enqueue",
                "--name",
                name,
                "--table",
                table,
                "--predicate",
                predicate,
                "--set",
                set,
            ],
        );
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("job {name}")) && err.contains(want),
            "{name}: {err}"
        );
    }
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM backfill.jobs WHERE name LIKE 'typo%'")
            .await,
        0,
        "refused jobs leave no row"
    );
    let revert = backfilld(
        &db.url,
        &[
            "enqueue",
            "--name",
            "r",
            "--table",
            "users",
            "--action",
            "revert",
            "--predicate",
            "true",
        ],
    );
    assert_eq!(
        revert.status.code(),
        Some(2),
        "revert jobs come from `revert`"
    );
}

#[sqlx::test]
async fn metrics_health_and_readiness_are_served(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec("CREATE TABLE m (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); INSERT INTO m SELECT g FROM generate_series(1, 3000) g;").await;
    NewJob::new("metered", "m")
        .predicate("true")
        .set("n = n + 1")
        .raw("sleep_ms", "50")
        .insert(&db)
        .await;
    NewJob::new("broken", "m")
        .predicate("true")
        .set("n = n / 0")
        .insert(&db)
        .await;
    let port = free_port();
    let mut daemon = db
        .daemon()
        .max_batch(100)
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .spawn();
    db.wait_state("metered", "succeeded").await;
    db.wait_state("broken", "failed").await;
    let (code, _) = http_get(port, "/healthz").await.expect("healthz");
    assert_eq!(code, 200);
    let (code, _) = http_get(port, "/readyz").await.expect("readyz");
    assert_eq!(code, 200);
    // The job-state gauges are refreshed by the daemon's poll, not as a job ends: wait for a poll
    // that has seen both jobs end.
    let state_gauges = [
        "backfilld_jobs{state=\"succeeded\"} 1",
        "backfilld_jobs{state=\"failed\"} 1",
    ];
    common::wait_until(
        "the job-state gauges to count both ended jobs",
        || daemon.log(),
        async || {
            http_get(port, "/metrics")
                .await
                .is_some_and(|(_, body)| state_gauges.iter().all(|g| body.contains(g)))
        },
    )
    .await;
    let (code, body) = http_get(port, "/metrics").await.expect("metrics");
    assert_eq!(code, 200);
    // Batch counts and sizes follow the controller (a loaded host shrinks batches): the metrics
    // must agree with the job's row.
    let metered = db.job("metered").await;
    let batches = format!(
        "backfilld_batch_duration_seconds_count{{job=\"metered\"}} {}",
        metered.batches
    );
    let size = format!(
        "backfilld_batch_size{{job=\"metered\"}} {}",
        metered.batch_size_current.unwrap_or_default()
    );
    for line in [
        "backfilld_rows_changed_total{job=\"metered\"} 3000",
        "backfilld_rows_scanned_total{job=\"metered\"} 3000",
        &batches,
        &size,
        "backfilld_job_progress_ratio{job=\"metered\"} 1",
        "backfilld_jobs{state=\"succeeded\"} 1",
        "backfilld_jobs{state=\"failed\"} 1",
        "backfilld_batch_errors_total{job=\"broken\",kind=\"permanent\"} 1",
        "backfilld_throttle_seconds_total{job=\"metered\",reason=\"sleep\"}",
        "backfilld_last_batch_timestamp_seconds{job=\"metered\"}",
        "backfilld_job_eta_seconds{job=\"metered\"} 0",
        "backfilld_leases_lost_total 0",
        "backfilld_health_signals_visible 1", // the harness connects as a superuser
        "backfilld_build_info{version=",
    ] {
        assert!(body.contains(line), "missing {line:?} in:\n{body}");
    }
    daemon.signal("TERM");
    assert!(
        daemon
            .wait(std::time::Duration::from_secs(30))
            .await
            .success()
    );
}

/// Accepts HTTP/1.1 POSTs on 127.0.0.1, answers 200, and keeps `path + body` of each.
async fn otlp_sink() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Default::default();
    let store = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Ok(n) = conn.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    let request: Vec<u8> = buf.drain(..end + 4 + len).collect();
                    store.lock().unwrap().push(request);
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                }
            });
        }
    });
    (port, seen)
}

#[sqlx::test]
async fn traces_are_exported_over_otlp_with_job_and_batch_spans(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec("CREATE TABLE tr (id int PRIMARY KEY, s text); INSERT INTO tr SELECT g, NULL FROM generate_series(1, 500) g;").await;
    NewJob::new("traced", "tr")
        .predicate("s IS NULL")
        .set("s = 'x'")
        .insert(&db)
        .await;
    let (port, seen) = otlp_sink().await;
    db.daemon()
        .max_batch(100)
        .env(
            "BACKFILLD_TELEMETRY__OTLP_ENDPOINT",
            &format!("http://127.0.0.1:{port}/v1/traces"),
        )
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    let requests = seen.lock().unwrap().clone();
    let all: Vec<u8> = requests.concat();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("POST /v1/traces"), "{text}");
    for name in ["job", "batch", "traced", "backfilld"] {
        assert!(text.contains(name), "no {name:?} in the exported spans");
    }
}

/// A job's counters exist at 0 as soon as its attempt starts (so the first error is an
/// increase `rate()` sees), and a finished job's series are dropped after `finished_job_ttl`.
#[sqlx::test]
async fn job_series_start_at_zero_and_expire_after_the_job_finishes(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec("CREATE TABLE e (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); INSERT INTO e SELECT g FROM generate_series(1, 300) g;").await;
    NewJob::new("slow", "e")
        .predicate("true")
        .set("n = n + 1")
        .raw("sleep_ms", "200")
        .insert(&db)
        .await;
    let port = free_port();
    let mut daemon = db
        .daemon()
        .max_batch(50)
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .env("BACKFILLD_METRICS__FINISHED_JOB_TTL", "2s")
        .spawn();
    let zero = "backfilld_batch_errors_total{job=\"slow\",kind=\"permanent\"} 0";
    common::wait_until(
        "the running job's error counter at 0",
        || daemon.log(),
        async || {
            http_get(port, "/metrics")
                .await
                .is_some_and(|(_, body)| body.contains(zero))
        },
    )
    .await;
    db.wait_state("slow", "succeeded").await;
    common::wait_until(
        "the finished job's series to be dropped",
        || daemon.log(),
        async || {
            http_get(port, "/metrics")
                .await
                .is_some_and(|(_, body)| !body.contains("job=\"slow\""))
        },
    )
    .await;
    let (_, body) = http_get(port, "/metrics").await.expect("metrics");
    assert!(
        body.contains("backfilld_jobs{state=\"succeeded\"} 1"),
        "{body}"
    );
    daemon.signal("TERM");
    assert!(
        daemon
            .wait(std::time::Duration::from_secs(30))
            .await
            .success()
    );
}

/// The operator's commands follow the job's state: a requested cancel is final (a later resume
/// or pause used to undo it and the job went on changing rows), `verify` refuses a job that has
/// no upper bound yet (it stored 0), `wait` takes any timeout (a huge one panicked) and passes a
/// succeeded revert (it asked for a verify that reverts refuse), and a revert keeps the ceiling
/// its job was allowed and finds its name even when the job's name holds LIKE's characters.
#[sqlx::test]
async fn operator_commands_follow_the_jobs_state(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v int);
         INSERT INTO t SELECT g, NULL FROM generate_series(1, 300) g;",
    )
    .await;
    NewJob::new("later", "t")
        .predicate("v IS NULL")
        .set("v = 1")
        .raw("run_at", "now() + interval '1 day'")
        .insert(&db)
        .await;
    let verify = backfilld(&db.url, &["verify", "later"]);
    assert_eq!(verify.status.code(), Some(1), "{}", stdout(&verify));
    assert!(
        stderr(&verify).contains("not started yet"),
        "{}",
        stderr(&verify)
    );
    assert_eq!(db.job("later").await.remaining, None);
    assert!(backfilld(&db.url, &["cancel", "later"]).status.success());
    for undo in ["resume", "pause"] {
        let out = backfilld(&db.url, &[undo, "later"]);
        assert_eq!(out.status.code(), Some(1), "{undo}");
        assert!(
            stderr(&out).contains("a cancel was requested"),
            "{}",
            stderr(&out)
        );
    }
    let requested = db
        .scalar_text("SELECT requested_state FROM backfill.jobs WHERE name = 'later'")
        .await;
    assert_eq!(requested, "cancelled");

    NewJob::new(r"a_b\c%", "t")
        .predicate("v IS NULL")
        .set("v = 2")
        .raw("archive", "true")
        .raw("max_affected", "500")
        .insert(&db)
        .await;
    // Under a global ceiling below what the job was allowed.
    let capped = || {
        db.daemon()
            .env("BACKFILLD_SAFETY__MAX_AFFECTED", "100")
            .until_idle()
    };
    capped().spawn().wait_ok().await;
    assert_eq!(db.job(r"a_b\c%").await.rows_changed, 300);
    assert!(backfilld(&db.url, &["revert", r"a_b\c%"]).status.success());
    assert!(
        backfilld(&db.url, &["cancel", r"a_b\c%__revert"])
            .status
            .success()
    );
    capped().spawn().wait_ok().await;
    let again = backfilld(&db.url, &["revert", r"a_b\c%"]);
    assert!(again.status.success(), "{}", stderr(&again));
    capped().spawn().wait_ok().await;
    let revert = db.job(r"a_b\c%__revert2").await;
    assert_eq!(revert.state, "succeeded", "{:?}", revert.last_error);
    assert_eq!(revert.rows_changed, 300, "under the job's own ceiling");
    let wait = backfilld(
        &db.url,
        &[
            "wait",
            r"a_b\c%__revert2",
            "--timeout",
            "18446744073709551615s",
        ],
    );
    assert_eq!(wait.status.code(), Some(0), "{}", stdout(&wait));
    assert!(
        stdout(&wait).contains("300 rows restored"),
        "{}",
        stdout(&wait)
    );
}

/// `status` into a reader that closed the pipe ends as a `SIGPIPE` would (141), not with a
/// panic (101); `status --watch` keeps watching an approved dry run until a replica runs it, as
/// `wait` does, where it had stopped at the `planned` state.
#[sqlx::test]
async fn status_survives_a_closed_pipe_and_watches_an_approved_job_to_its_end(pool: PgPool) {
    use std::process::Stdio;
    let db = Db::new(pool).await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, s text); INSERT INTO items SELECT g, NULL FROM generate_series(1, 50) g;").await;
    NewJob::new("fill", "public.items")
        .predicate("s IS NULL")
        .set("s = 'x'")
        .raw("mode", "'dry_run'")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("fill").await.state.to_string(), "planned");
    let mut closed = Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .args(["status"])
        .env("DATABASE_URL", &db.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run backfilld");
    drop(closed.stdout.take());
    let out = closed.wait_with_output().expect("status ends");
    assert_eq!(out.status.code(), Some(141), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));

    assert!(backfilld(&db.url, &["execute", "fill"]).status.success());
    let mut watch = Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .args(["status", "fill", "--watch", "--output", "json"])
        .env("DATABASE_URL", &db.url)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run backfilld");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(
        watch.try_wait().expect("poll watch").is_none(),
        "watch ended while the approved job was still planned"
    );
    db.daemon().until_idle().spawn().wait_ok().await;
    let ended = tokio::task::spawn_blocking(move || watch.wait_with_output());
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), ended)
        .await
        .expect("watch ends once the job succeeded")
        .expect("join")
        .expect("watch output");
    assert!(out.status.success());
    let last = stdout(&out).lines().last().unwrap_or_default().to_owned();
    assert!(last.contains("\"succeeded\""), "{last}");
}

/// A configured time zone the server does not know is bad configuration, found on connecting:
/// the daemon stops with status 2 naming it, where it had retried forever, unready, and `status`
/// exited 1.
#[sqlx::test]
async fn an_unknown_configured_time_zone_exits_2(pool: PgPool) {
    let db = Db::new(pool).await;
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_DATABASE__TIMEZONE", "Mars/Olympus")
        .spawn();
    let status = daemon.wait(std::time::Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(2), "{}", daemon.log());
    assert!(daemon.log().contains("Mars/Olympus"), "{}", daemon.log());
    let out = Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .args(["status"])
        .env("DATABASE_URL", &db.url)
        .env("BACKFILLD_DATABASE__TIMEZONE", "Mars/Olympus")
        .output()
        .expect("run backfilld");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// A requester with the README's grants (it may insert job rows, and nothing on the target)
/// could not `enqueue` at all: the fragment checks ran the job's statements as the requester,
/// and every predicate was "rejected by PostgreSQL" for a permission only the replica's role
/// needs. Now the job is enqueued with a warning naming what the role lacks, and the replica
/// checks the fragments at its claim. A typo in the table is still refused at once.
#[sqlx::test]
async fn a_requester_without_rights_on_the_table_can_enqueue(pool: PgPool) {
    let db = Db::new(pool).await;
    let (group, bob) = (
        db.cluster_unique("req").await,
        db.cluster_unique("bob").await,
    );
    db.exec(&format!(
        "CREATE TABLE orders (id bigint PRIMARY KEY, total numeric);
         INSERT INTO orders SELECT g, g % 7 - 1 FROM generate_series(1, 100) g;
         CREATE ROLE {group} NOLOGIN;
         GRANT USAGE ON SCHEMA backfill TO {group};
         GRANT SELECT, INSERT, UPDATE (requested_state, mode) ON backfill.jobs TO {group};
         CREATE ROLE {bob} LOGIN PASSWORD 'bob' IN ROLE {group};"
    ))
    .await;
    let as_bob = db.url_as(&bob, "bob");
    let enqueue = |name: &str, table: &str| {
        backfilld(
            &as_bob,
            &[
                "enqueue",
                "--name",
                name,
                "--table",
                table,
                "--predicate",
                "total < 0",
                "--set",
                "total = 0",
                "--execute",
            ],
        )
    };
    let out = enqueue("fix_1", "public.orders");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("enqueued without checking the predicate and set clause")
            && stderr(&out).contains("SELECT on public.orders"),
        "{}",
        stderr(&out)
    );
    let out = enqueue("typo", "public.ordrs");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("ordrs"), "{}", stderr(&out));

    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("fix_1").await;
    assert_eq!(
        (job.state.as_str(), job.rows_changed),
        ("succeeded", 14),
        "{:?}",
        job.last_error
    );
    // With the right to read the table, `verify` counts; storing the count needs more.
    db.exec(&format!("GRANT SELECT ON orders TO {group}")).await;
    let out = backfilld(&as_bob, &["verify", "fix_1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("job fix_1: 0 rows up to the upper bound still match the predicate, but this role cannot store the count"),
        "{}",
        stderr(&out)
    );
    let out = backfilld(
        &as_bob,
        &[
            "enqueue",
            "--name",
            "",
            "--table",
            "public.orders",
            "--predicate",
            "true",
            "--set",
            "total = 0",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(r#"job "" on public.orders: name is empty"#),
        "the name is refused before any row is inserted (no id): {}",
        stderr(&out)
    );
    db.exec(&format!(
        "REVOKE ALL ON orders FROM {group};
         REVOKE ALL ON backfill.jobs FROM {group}; REVOKE ALL ON SCHEMA backfill FROM {group};
         DROP ROLE {bob}; DROP ROLE {group};"
    ))
    .await;
}

/// The README's least-privilege set-up (a schema created for the daemon's role, no CREATE on
/// the database) failed at `migrate`: `CREATE SCHEMA IF NOT EXISTS` needs CREATE on the database
/// even when the schema exists.
#[sqlx::test]
async fn migrate_runs_as_a_role_that_owns_only_its_schema(pool: PgPool) {
    let db = Db::new(pool).await;
    let role = db.cluster_unique("bfmig").await;
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'mig'; CREATE SCHEMA bfx AUTHORIZATION {role};"
    ))
    .await;
    let out = Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .arg("migrate")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db.url_as(&role, "mig"))
        .env("BACKFILLD_DATABASE__SCHEMA", "bfx")
        .output()
        .expect("run backfilld");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'bfx' AND tablename = 'jobs'"
        )
        .await,
        1
    );
    db.exec(&format!("DROP SCHEMA bfx CASCADE; DROP ROLE {role};"))
        .await;
}
