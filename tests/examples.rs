//! The post-deploy migrations in examples/: the plain-SQL ones run end to end against a real daemon
//! (schema, enqueue as a dry run, approve, backfill, constraint), their down cancels a job that has
//! not finished, and every other tool's file carries the same two statements (loaded by python3,
//! node and ruby when they are installed; skipped with a message when not).
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler

mod common;

use std::process::Command;

use common::Db;
use sqlx::PgPool;

const JOB: &str = "orders_status_v2_backfill";
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
const ADD_COLUMN: &str = include_str!("../examples/sql/01_add_orders_status_v2.sql");
const UP: &str = include_str!("../examples/sql/02_enqueue_orders_status_v2_backfill.sql");
const DOWN: &str = include_str!("../examples/sql/02_enqueue_orders_status_v2_backfill.down.sql");
const NOT_NULL: &str = include_str!("../examples/sql/03_orders_status_v2_not_null.sql");
const ORDERS: i64 = 1000;

/// `public.orders` as it was before the deploy, with rows, then the schema migration (01).
async fn orders(db: &Db) {
    db.exec(&format!(
        "CREATE TABLE public.orders (id bigint PRIMARY KEY, status text);
         INSERT INTO public.orders
         SELECT g, (ARRAY['Pending', 'PAID', 'Shipped', 'delivered', 'CanCelled'])[1 + g % 5]
         FROM generate_series(1, {ORDERS}) g;"
    ))
    .await;
    db.exec(ADD_COLUMN).await;
}

async fn unfilled(db: &Db) -> i64 {
    db.scalar_i64("SELECT count(*) FROM public.orders WHERE status_v2 IS NULL")
        .await
}

/// Runs SQL that must fail; returns the error.
async fn refused(db: &Db, sql: &str) -> String {
    match sqlx::raw_sql(sql).execute(&db.pool).await {
        Ok(_) => panic!("expected an error from: {sql}"),
        Err(e) => e.to_string(),
    }
}

#[sqlx::test]
async fn the_plain_sql_migrations_enqueue_a_dry_run_that_backfills_once_approved(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db).await;
    db.exec(UP).await;

    let job = db.job(JOB).await;
    assert_eq!(job.state, "pending");
    assert_eq!(job.mode.as_deref(), Some("dry_run"));
    assert_eq!(job.action.as_deref(), Some("update"));
    assert_eq!(job.table_name.as_deref(), Some("public.orders"));
    assert_eq!(job.predicate.as_deref(), Some("status_v2 IS NULL"));
    assert_eq!(job.set_clause.as_deref(), Some("status_v2 = lower(status)"));
    let again = refused(&db, UP).await;
    assert!(again.contains("jobs_name_key"), "a name runs once: {again}");
    let early = refused(&db, NOT_NULL).await;
    assert!(
        early.contains("has not succeeded yet"),
        "the constraint migration refuses to run before the backfill: {early}"
    );

    // The dry run plans and changes nothing.
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job(JOB).await;
    assert_eq!(job.state, "planned", "{:?}", job.last_error);
    let plan = job.plan.expect("a plan");
    assert_eq!(plan["rows_matching"], ORDERS, "{plan}");
    assert_eq!(plan["idempotency"]["idempotent"], true, "{plan}");
    assert_eq!(unfilled(&db).await, ORDERS);

    // A human approves (`backfilld execute`); the daemon runs it.
    backfilld::ops::approve(&db.lib, &db.names, JOB)
        .await
        .expect("approve");
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job(JOB).await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!(job.rows_changed, ORDERS);
    assert_eq!(
        job.remaining,
        Some(0),
        "what `backfilld wait` and the guard in 03 check"
    );
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM public.orders WHERE status_v2 IS DISTINCT FROM lower(status)"
        )
        .await,
        0
    );

    // Down leaves a finished job as it is.
    db.exec(DOWN).await;
    let job = db.job(JOB).await;
    assert_eq!(job.state, "succeeded");
    assert_eq!(job.requested_state, None);

    // The constraint migration now runs, and leaves only the NOT NULL behind.
    db.exec(NOT_NULL).await;
    assert_eq!(
        db.scalar_text(
            "SELECT attnotnull::text FROM pg_attribute
             WHERE attrelid = 'public.orders'::regclass AND attname = 'status_v2'"
        )
        .await,
        "true"
    );
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'orders_status_v2_not_null'"
        )
        .await,
        0
    );
}

/// Up, then (after the daemon planned it, if `planned`) down: the job ends cancelled, the row stays.
async fn down_cancels(db: &Db, planned: bool) {
    orders(db).await;
    db.exec(UP).await;
    if planned {
        db.daemon().until_idle().spawn().wait_ok().await;
        assert_eq!(db.job(JOB).await.state, "planned");
    }
    db.exec(DOWN).await;
    let job = db.job(JOB).await;
    assert_eq!(job.requested_state.as_deref(), Some("cancelled"));

    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job(JOB).await;
    assert_eq!(job.state, "cancelled", "{:?}", job.last_error);
    assert_eq!(job.rows_changed, 0);
    assert_eq!(unfilled(db).await, ORDERS, "a cancelled job changed rows");

    // Down again is a no-op, and a down that deleted the row would fail: the ledger refuses it.
    db.exec(DOWN).await;
    assert_eq!(db.job(JOB).await.state, "cancelled");
    let delete = refused(
        db,
        &format!("DELETE FROM backfill.jobs WHERE name = '{JOB}'"),
    )
    .await;
    assert!(delete.contains("ledger"), "{delete}");
}

#[sqlx::test]
async fn down_cancels_a_job_no_replica_has_claimed_yet(pool: PgPool) {
    down_cancels(&Db::new(pool).await, false).await;
}

#[sqlx::test]
async fn down_cancels_a_dry_run_awaiting_approval(pool: PgPool) {
    down_cancels(&Db::new(pool).await, true).await;
}

/// Whitespace collapsed, a trailing `;` dropped.
fn normalize(sql: &str) -> String {
    sql.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches(';')
        .to_owned()
}

/// The statement of a plain-SQL file: its lines without `--` comments, normalized.
fn statement(file: &str) -> String {
    let code: Vec<&str> = file
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect();
    normalize(&code.join("\n"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{EXAMPLES}/{path}"))
        .unwrap_or_else(|e| panic!("examples/{path}: {e}"))
}

const FLYWAY_UP: &str = "flyway/sql/V2__backfill_orders_status.sql";
const FLYWAY_UNDO: &str = "flyway/sql/U2__backfill_orders_status.sql";
const MIGRATE_UP: &str =
    "golang-migrate/migrations/000002_enqueue_orders_status_v2_backfill.up.sql";
const MIGRATE_DOWN: &str =
    "golang-migrate/migrations/000002_enqueue_orders_status_v2_backfill.down.sql";
const LIQUIBASE: &str = "liquibase/db/changelog/002-enqueue-orders-status-v2-backfill.xml";
const ALEMBIC: &str = "alembic/versions/2b7c1d9e4f3a_enqueue_orders_status_v2_backfill.py";
const DJANGO: &str = "django/orders/migrations/0002_enqueue_orders_status_v2_backfill.py";
const RAILS: &str = "rails/db/migrate/20260102000000_enqueue_orders_status_v2_backfill.rb";
const KNEX: &str = "knex/migrations/20260102000000_enqueue_orders_status_v2_backfill.js";

#[test]
fn every_tool_carries_the_same_two_statements() {
    let (up, down) = (statement(UP), statement(DOWN));
    // The SQL-only formats hold exactly the plain-SQL statements.
    assert_eq!(statement(&read(FLYWAY_UP)), up, "{FLYWAY_UP}");
    assert_eq!(statement(&read(FLYWAY_UNDO)), down, "{FLYWAY_UNDO}");
    assert_eq!(statement(&read(MIGRATE_UP)), up, "{MIGRATE_UP}");
    assert_eq!(statement(&read(MIGRATE_DOWN)), down, "{MIGRATE_DOWN}");

    let plain = ["sql/02_enqueue_orders_status_v2_backfill.sql"];
    let enqueuing = [
        FLYWAY_UP, MIGRATE_UP, LIQUIBASE, ALEMBIC, DJANGO, RAILS, KNEX,
    ];
    for path in plain.iter().chain(&enqueuing) {
        let text = read(path);
        let flat = normalize(&text);
        assert!(flat.contains(&up), "{path} does not enqueue: {up}");
        for says in [
            format!("backfilld execute {JOB}"),
            format!("backfilld wait {JOB}"),
            "schema-only".to_owned(),
        ] {
            assert!(
                flat.contains(&says),
                "{path}: its comment should say {says:?}"
            );
        }
    }
    for path in [LIQUIBASE, ALEMBIC, DJANGO, RAILS, KNEX] {
        assert!(
            normalize(&read(path)).contains(&down),
            "{path} does not cancel in its down: {down}"
        );
    }
    let every = [
        "sql/01_add_orders_status_v2.sql",
        "sql/02_enqueue_orders_status_v2_backfill.sql",
        "sql/02_enqueue_orders_status_v2_backfill.down.sql",
        "sql/03_orders_status_v2_not_null.sql",
        FLYWAY_UP,
        FLYWAY_UNDO,
        MIGRATE_UP,
        MIGRATE_DOWN,
        LIQUIBASE,
        ALEMBIC,
        DJANGO,
        RAILS,
        KNEX,
    ];
    for path in every {
        let flat = normalize(&read(path)).to_lowercase();
        assert!(
            !flat.contains("delete from backfill.jobs"),
            "{path}: the ledger refuses DELETE"
        );
    }

    // Rails: the class is named after the file, up enqueues and down cancels.
    let rails = read(RAILS);
    assert!(
        rails.contains("class EnqueueOrdersStatusV2Backfill < ActiveRecord::Migration[7.1]"),
        "{RAILS}: the class must match the file name"
    );
    let (before_down, after_down) = rails.split_once("def down").expect("def down");
    let body_up = before_down.split_once("def up").expect("def up").1;
    assert!(normalize(body_up).contains(&up), "{RAILS}: up");
    assert!(normalize(after_down).contains(&down), "{RAILS}: down");
}

/// `program args`, or `None` (with a message) when `program --version` does not run.
fn tool(program: &str, args: &[&str]) -> Option<String> {
    let available = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        eprintln!("skipped: {program} is not available, so {args:?} was not checked");
        return None;
    }
    let out = Command::new(program)
        .args(args)
        .current_dir(EXAMPLES)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Loads the Alembic revision and the Django migration with stub `alembic` and `django` modules
/// (collecting the SQL they pass to `op.execute` and `RunSQL`), and parses the Liquibase changelog.
const PYTHON_CHECK: &str = r#"
import importlib.util, json, sys, types
import xml.etree.ElementTree as ET

def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

executed = []
sys.modules["alembic"] = types.ModuleType("alembic")
sys.modules["alembic"].op = types.SimpleNamespace(execute=executed.append)
revision = load(sys.argv[1], "revision")
revision.upgrade()
revision.downgrade()

class RunSQL:
    def __init__(self, sql, reverse_sql=None, **kwargs):
        self.sql, self.reverse_sql = sql, reverse_sql

sys.modules["django"] = types.ModuleType("django")
sys.modules["django.db"] = types.ModuleType("django.db")
sys.modules["django.db"].migrations = types.SimpleNamespace(Migration=object, RunSQL=RunSQL)
migration = load(sys.argv[2], "migration").Migration

ns = "{http://www.liquibase.org/xml/ns/dbchangelog}"
changelog = ET.parse(sys.argv[3]).getroot()
print(json.dumps({
    "alembic": executed,
    "alembic_ids": [revision.revision, revision.down_revision],
    "django": [[op.sql, op.reverse_sql] for op in migration.operations],
    "django_dependencies": migration.dependencies,
    "liquibase_root": changelog.tag,
    "liquibase": [[cs.get("id"), cs.get("author"), cs.findtext(ns + "sql"),
                   cs.findtext(ns + "rollback/" + ns + "sql")]
                  for cs in changelog.findall(ns + "changeSet")],
}))
"#;

#[test]
fn alembic_django_and_liquibase_files_load_and_pass_the_statements() {
    let Some(out) = tool(
        "python3",
        &["-B", "-c", PYTHON_CHECK, ALEMBIC, DJANGO, LIQUIBASE],
    ) else {
        return;
    };
    let got: serde_json::Value = serde_json::from_str(&out).expect("JSON from python3");
    let (up, down) = (statement(UP), statement(DOWN));
    let sql = |v: &serde_json::Value| normalize(v.as_str().unwrap_or_default());

    let alembic = got["alembic"].as_array().expect("alembic calls");
    assert_eq!(alembic.len(), 2, "upgrade() and downgrade(): {got}");
    assert_eq!(sql(&alembic[0]), up, "upgrade()");
    assert_eq!(sql(&alembic[1]), down, "downgrade()");
    assert!(
        ALEMBIC.contains(got["alembic_ids"][0].as_str().unwrap_or("?")),
        "the revision id names the file: {got}"
    );

    let django = got["django"].as_array().expect("django operations");
    assert_eq!(django.len(), 1, "{got}");
    assert_eq!(sql(&django[0][0]), up, "RunSQL");
    assert_eq!(sql(&django[0][1]), down, "RunSQL reverse_sql");
    assert_eq!(got["django_dependencies"][0][0], "orders", "{got}");

    assert_eq!(
        got["liquibase_root"],
        "{http://www.liquibase.org/xml/ns/dbchangelog}databaseChangeLog"
    );
    let sets = got["liquibase"].as_array().expect("changeSets");
    assert_eq!(sets.len(), 1, "{got}");
    let set = &sets[0];
    assert!(
        set[0].is_string() && set[1].is_string(),
        "a changeSet needs id and author: {set}"
    );
    assert_eq!(sql(&set[2]), up, "<sql>");
    assert_eq!(sql(&set[3]), down, "<rollback><sql>");
}

#[test]
fn the_knex_migration_loads_and_passes_the_statements() {
    let script = "const m = require(require('path').resolve(process.argv[1]));
        const raw = [];
        const knex = { raw: (sql) => { raw.push(sql); return Promise.resolve(); } };
        (async () => { await m.up(knex); await m.down(knex); console.log(JSON.stringify(raw)); })()
            .catch((e) => { console.error(e); process.exit(1); });";
    let Some(out) = tool("node", &["-e", script, KNEX]) else {
        return;
    };
    let raw: Vec<String> = serde_json::from_str(&out).expect("JSON from node");
    let raw: Vec<String> = raw.iter().map(|s| normalize(s)).collect();
    assert_eq!(
        raw,
        [statement(UP), statement(DOWN)],
        "exports.up, exports.down"
    );
}

#[test]
fn the_rails_migration_is_valid_ruby() {
    if let Some(out) = tool("ruby", &["-c", RAILS]) {
        assert!(out.contains("Syntax OK"), "{out}");
    }
}
