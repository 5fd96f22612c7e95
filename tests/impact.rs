//! Production impact: the mechanisms that keep a backfill gentle with live traffic. Each test
//! checks behaviour (batch sizes, pauses, heap size, warnings), never timing.
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler

mod common;

use std::time::Duration;

use common::{Db, NewJob, free_port, http_get, metric};
use sqlx::PgPool;

async fn metrics(port: u16) -> String {
    http_get(port, "/metrics").await.expect("metrics").1
}

/// Waits for `name` to succeed, scrapes the daemon's metrics, then stops it: the job's row and
/// the scrape.
async fn succeeded_then_stopped(
    db: &Db,
    name: &str,
    daemon: &mut common::Daemon,
    port: u16,
) -> (backfilld::job::JobRow, String) {
    let done = db.wait_state(name, "succeeded").await;
    let body = metrics(port).await;
    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(30)).await;
    (done, body)
}

/// A table whose backfilled rows cost 1 ms each (a trigger sleeps on the change the job makes,
/// not on anyone else's), so every batch holds its row locks long enough to be waited on.
async fn slow_table(db: &Db, name: &str, rows: i64) {
    db.exec(&format!(
        "CREATE TABLE {name} (id bigint PRIMARY KEY, v int, hits int NOT NULL DEFAULT 0);
         INSERT INTO {name} (id) SELECT g FROM generate_series(1, {rows}) g;
         CREATE FUNCTION {name}_slow() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$;
         CREATE TRIGGER slow BEFORE UPDATE ON {name} FOR EACH ROW
             WHEN (OLD.v IS DISTINCT FROM NEW.v) EXECUTE FUNCTION {name}_slow();"
    ))
    .await;
}

/// What a job over the slow table `w` saw while an application session kept waiting on the row
/// its current batch writes: the metrics at the end, and the job row.
struct Waited {
    body: String,
    done: backfilld::job::JobRow,
}

/// Runs a job over a slow 3,000-row table while a session (connecting as `application_name`)
/// keeps touching the first row the backfill has not changed yet: always a row of the batch
/// being written, so it waits for that batch's commit.
async fn backfill_while_waited_on(db: &Db, application_name: &str) -> Waited {
    slow_table(db, "w", 3000).await;
    NewJob::new("w", "w")
        .predicate("v IS NULL")
        .set("v = 1")
        .raw("batch_size", "200")
        .raw("target_batch_ms", "400")
        .raw("max_batch_ms", "10000")
        .insert(db)
        .await;
    let port = free_port();
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .spawn();
    let options = (*db.pool.connect_options())
        .clone()
        .application_name(application_name);
    let app_pool = PgPool::connect_with(options)
        .await
        .expect("application pool");
    let app = tokio::spawn(async move {
        let touch =
            "UPDATE w SET hits = hits + 1 WHERE id = (SELECT min(id) FROM w WHERE v IS NULL)";
        let mut touched = 0u64;
        for _ in 0..20_000 {
            match sqlx::query(touch).execute(&app_pool).await {
                Ok(done) if done.rows_affected() == 0 => break,
                Ok(done) => touched += done.rows_affected(),
                Err(e) => panic!("application update failed: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        touched
    });
    let (done, body) = succeeded_then_stopped(db, "w", &mut daemon, port).await;
    assert!(app.await.unwrap() > 0, "the application ran alongside");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM w WHERE v IS DISTINCT FROM 1")
            .await,
        0
    );
    Waited { body, done }
}

const BLOCKED: &str = "backfilld_sessions_blocked_total{job=\"w\"}";
const HELD: &str = "backfilld_throttle_seconds_total{job=\"w\",reason=\"blocking\"}";

#[sqlx::test]
async fn a_session_waiting_on_a_batch_makes_the_next_batches_smaller_and_later(pool: PgPool) {
    let db = Db::new(pool).await;
    let Waited { body, done } = backfill_while_waited_on(&db, "the application").await;
    let blocked = metric(&body, BLOCKED).unwrap_or(0.0);
    assert!(
        blocked >= 1.0,
        "batches saw the waiting session: {blocked}\n{body}"
    );
    assert!(
        metric(&body, HELD).is_some_and(|s| s > 0.0),
        "batches after a blocking one paused longer\n{body}"
    );
    let size = done.batch_size_current.unwrap_or(i32::MAX);
    assert!(
        size < 200,
        "batches shrank below the initial 200 keys though each took under the 400 ms target: {size}"
    );
}

/// A session of backfilld's own (same role and `application_name`, as a sibling slice waiting to
/// checkpoint into the job row) is not traffic the job slows down: its waits are not counted.
#[sqlx::test]
async fn waits_of_backfilld_own_sessions_are_not_counted_as_blocked_traffic(pool: PgPool) {
    let db = Db::new(pool).await;
    // Batches halve only for counted blockers, so the counters say it all; the final batch size
    // also follows how long each 200-key batch took against its 400 ms target (machine speed).
    let Waited { body, .. } = backfill_while_waited_on(&db, "backfilld").await;
    assert_eq!(
        metric(&body, BLOCKED),
        Some(0.0),
        "no session counted as blocked\n{body}"
    );
    assert_eq!(metric(&body, HELD), Some(0.0), "no blocking pause\n{body}");
}

/// A table of `rows` narrow rows, settled (vacuumed, all-visible), with autovacuum off so only
/// the job can reclaim the space its updates free. The change keeps the row width (`v` is 0 until
/// backfilled): growth from wider rows is the data's, not bloat, and no VACUUM can avoid it.
async fn settled_table(db: &Db, name: &str, rows: i64) {
    db.exec(&format!(
        "CREATE TABLE {name} (id bigint PRIMARY KEY, payload text NOT NULL, v bigint NOT NULL DEFAULT 0)
             WITH (autovacuum_enabled = false);
         INSERT INTO {name} (id, payload) SELECT g, repeat('x', 40) FROM generate_series(1, {rows}) g;"
    ))
    .await;
    db.exec(&format!("VACUUM ANALYZE {name}")).await;
}

async fn heap_bytes(db: &Db, table: &str) -> i64 {
    db.scalar_i64(&format!("SELECT pg_table_size('{table}')"))
        .await
}

#[sqlx::test]
async fn the_bloat_guard_keeps_a_full_table_backfill_within_its_heap_budget(pool: PgPool) {
    let db = Db::new(pool).await;
    const ROWS: i64 = 1_000_000;
    settled_table(&db, "guarded", ROWS).await;
    settled_table(&db, "unguarded", ROWS).await;
    let before = heap_bytes(&db, "guarded").await;
    // One job at a time: a concurrent job's open batch would hold back what VACUUM may remove.
    let mut log = String::new();
    for (name, preset) in [("guarded", "gentle"), ("unguarded", "fast")] {
        NewJob::new(name, name)
            .predicate("v = 0")
            .set("v = id * 2")
            .text("preset", preset)
            .raw("batch_size", "5000")
            .raw("target_batch_ms", "200")
            .raw("parallelism", "1")
            .insert(&db)
            .await;
        let mut daemon = db.daemon().until_idle().spawn();
        daemon.wait_ok().await;
        log.push_str(&daemon.log());
        assert_eq!(db.job(name).await.state, "succeeded", "{name}");
        let left = db
            .scalar_i64(&format!(
                "SELECT count(*) FROM {name} WHERE v IS DISTINCT FROM id * 2"
            ))
            .await;
        assert_eq!(left, 0, "{name}");
    }
    let guarded = heap_bytes(&db, "guarded").await as f64 / before as f64;
    let unguarded = heap_bytes(&db, "unguarded").await as f64 / before as f64;
    eprintln!("heap growth: {guarded:.3}x with the guard, {unguarded:.3}x without");
    assert!(
        log.contains("bloat guard: vacuumed the target"),
        "the guard ran\n{log}"
    );
    assert!(
        guarded <= 1.15,
        "heap grew {guarded:.2}x with the bloat guard (budget 1.15x)"
    );
    assert!(
        unguarded >= 1.5,
        "without the guard the same change grows the heap (here {unguarded:.2}x): the check above can fail"
    );
}

/// A login role (unique in the cluster, `password`) that may use backfilld's schema, as a
/// daemon's role needs, and nothing else yet.
async fn backfill_role(db: &Db, prefix: &str, password: &str) -> String {
    let role = db.cluster_unique(prefix).await;
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{password}';
         GRANT USAGE, CREATE ON SCHEMA backfill TO {role};
         GRANT ALL ON ALL TABLES IN SCHEMA backfill TO {role};
         GRANT ALL ON ALL SEQUENCES IN SCHEMA backfill TO {role};"
    ))
    .await;
    role
}

/// The bloat guard stood down for `job`: one warning that the role may not VACUUM (returned),
/// no VACUUM run, and the allowed gauge at 0.
fn assert_guard_stood_down<'l>(log: &'l str, body: &str, job: &str) -> &'l str {
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("may not VACUUM"))
        .collect();
    assert_eq!(warnings.len(), 1, "one clear warning\n{log}");
    assert!(
        !log.contains("vacuumed the target") && !log.contains("VACUUM failed"),
        "no VACUUM was attempted\n{log}"
    );
    let gauge = format!("backfilld_bloat_guard_vacuum_allowed{{job=\"{job}\"}}");
    assert_eq!(metric(body, &gauge), Some(0.0), "{body}");
    warnings[0]
}

#[sqlx::test]
async fn a_role_that_may_not_vacuum_completes_its_job_with_one_warning(pool: PgPool) {
    let db = Db::new(pool).await;
    let role = backfill_role(&db, "bf_novac", "novac").await;
    db.exec(&format!(
        "CREATE TABLE nv (id bigint PRIMARY KEY, v int);
         INSERT INTO nv (id) SELECT g FROM generate_series(1, 8000) g;
         GRANT SELECT, UPDATE ON nv TO {role};"
    ))
    .await;
    NewJob::new("nv", "nv")
        .predicate("v IS NULL")
        .set("v = 7")
        .raw("archive", "true")
        .raw("batch_size", "500")
        .insert(&db)
        .await;
    let port = free_port();
    let mut daemon = db
        .daemon()
        .database_url(&db.url_as(&role, "novac"))
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .env("BACKFILLD_BATCH__MAX_BATCH_MS", "40") // the default ceiling, not the harness's
        .env("BACKFILLD_BLOAT__VACUUM_MIN_ROWS", "1000")
        .spawn();
    let done = db.wait_state("nv", "succeeded").await;
    let body = metrics(port).await;
    let log = daemon.log();
    assert_eq!(done.rows_changed, 8000);
    assert_guard_stood_down(&log, &body, "nv");
    // Nor may it read other sessions' statistics: the signals that need them are named once.
    let blind = log
        .matches("may not read other sessions' statistics")
        .count();
    assert_eq!(
        blind, 1,
        "one warning about the blind health signals\n{log}"
    );
    assert!(log.contains("throttle.max_replica_lag"), "{log}");
    assert_eq!(
        metric(&body, "backfilld_health_signals_visible"),
        Some(0.0),
        "{body}"
    );
    // Granted while the daemon runs: the next job's claim sees it, without a restart.
    db.exec(&format!("GRANT pg_read_all_stats TO {role}")).await;
    NewJob::new("nv2", "nv")
        .predicate("v = 7")
        .set("v = 8")
        .insert(&db)
        .await;
    let (_, body) = succeeded_then_stopped(&db, "nv2", &mut daemon, port).await;
    assert_eq!(
        metric(&body, "backfilld_health_signals_visible"),
        Some(1.0),
        "{body}"
    );
    let log = daemon.log();
    assert_eq!(
        log.matches("may now read other sessions' statistics")
            .count(),
        1,
        "{log}"
    );
    db.exec(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await;
}

/// Through a transaction pooler the VACUUMs run on `database.direct_url`, which may log in as
/// another role than the pool's: the guard asks that connection, not the pool. (Asked on the
/// pool's superuser, it would stand active while every VACUUM only warned and reclaimed nothing.)
#[sqlx::test]
async fn the_guard_checks_the_role_its_vacuums_run_as(pool: PgPool) {
    let db = Db::new(pool).await;
    let role = db.cluster_unique("bf_direct").await;
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'direct';
         CREATE TABLE dv (id bigint PRIMARY KEY, v int);
         INSERT INTO dv (id) SELECT g FROM generate_series(1, 4000) g;"
    ))
    .await;
    NewJob::new("dv", "dv")
        .predicate("v IS NULL")
        .set("v = 7")
        .raw("archive", "true")
        .raw("batch_size", "500")
        .insert(&db)
        .await;
    let port = free_port();
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_DATABASE__POOL_MODE", "transaction")
        .env(
            "BACKFILLD_DATABASE__DIRECT_URL",
            &db.url_as(&role, "direct"),
        )
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .env("BACKFILLD_BLOAT__VACUUM_MIN_ROWS", "1000")
        .spawn();
    let (done, body) = succeeded_then_stopped(&db, "dv", &mut daemon, port).await;
    let log = daemon.log();
    assert_eq!(done.rows_changed, 4000);
    let warning = assert_guard_stood_down(&log, &body, "dv");
    assert!(
        warning.contains(&role),
        "the warning names the role: {warning}"
    );
    // The revert VACUUMs its archive on that connection too; the role may not even look into
    // the archive's schema. Only a speed-up: the revert warns and restores every row.
    let revert = backfilld::ops::revert(&db.lib, &db.names, "dv", false)
        .await
        .unwrap();
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_DATABASE__POOL_MODE", "transaction")
        .env(
            "BACKFILLD_DATABASE__DIRECT_URL",
            &db.url_as(&role, "direct"),
        )
        .spawn();
    let reverted = db.wait_state(&revert.name, "succeeded").await;
    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(30)).await;
    assert_eq!(reverted.rows_changed, 4000);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM dv WHERE v IS NULL")
            .await,
        4000
    );
    let log = daemon.log();
    assert!(log.contains("VACUUM privilege on the archive"), "{log}");
    db.exec(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await;
}

/// A partitioned target's VACUUM covers its partitions, and PostgreSQL checks each: a role that
/// owns the parent but not every partition would have its VACUUMs skip those with a warning. The
/// guard checks every partition and stands down, saying so once.
#[sqlx::test]
async fn the_guard_checks_every_partition_of_a_partitioned_target(pool: PgPool) {
    let db = Db::new(pool).await;
    let role = backfill_role(&db, "bf_parts", "parts").await;
    db.exec(&format!(
        "GRANT pg_read_all_stats TO {role};
         CREATE TABLE pt (id bigint PRIMARY KEY, v int) PARTITION BY RANGE (id);
         CREATE TABLE pt1 PARTITION OF pt FOR VALUES FROM (1) TO (2001);
         CREATE TABLE pt2 PARTITION OF pt FOR VALUES FROM (2001) TO (4001);
         INSERT INTO pt (id) SELECT g FROM generate_series(1, 4000) g;
         ALTER TABLE pt OWNER TO {role};
         ALTER TABLE pt1 OWNER TO {role};
         GRANT SELECT, UPDATE ON pt2 TO {role};"
    ))
    .await;
    NewJob::new("pt", "pt")
        .predicate("v IS NULL")
        .set("v = 7")
        .raw("batch_size", "500")
        .insert(&db)
        .await;
    let port = free_port();
    let mut daemon = db
        .daemon()
        .database_url(&db.url_as(&role, "parts"))
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .env("BACKFILLD_BLOAT__VACUUM_MIN_ROWS", "1000")
        .spawn();
    let (done, body) = succeeded_then_stopped(&db, "pt", &mut daemon, port).await;
    let log = daemon.log();
    assert_eq!(done.rows_changed, 4000);
    assert_guard_stood_down(&log, &body, "pt");
    db.exec(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await;
}

/// `VACUUM (SKIP_LOCKED)` skips a table another session holds a conflicting lock on (here as an
/// index build, ANALYZE or autovacuum would) with a warning, not an error: the guard must not
/// count such a run as done.
#[sqlx::test]
async fn a_vacuum_postgresql_skipped_is_not_counted_as_done(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE sk (id bigint PRIMARY KEY, v int);
         INSERT INTO sk (id) SELECT g FROM generate_series(1, 4000) g;",
    )
    .await;
    let mut holder = db.pool.acquire().await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE sk IN SHARE UPDATE EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    NewJob::new("sk", "sk")
        .predicate("v IS NULL")
        .set("v = 7")
        .raw("batch_size", "500")
        .insert(&db)
        .await;
    let port = free_port();
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .env("BACKFILLD_BLOAT__VACUUM_MIN_ROWS", "1000")
        .spawn();
    let (done, body) = succeeded_then_stopped(&db, "sk", &mut daemon, port).await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut *holder)
        .await
        .unwrap();
    let log = daemon.log();
    assert_eq!(done.rows_changed, 4000);
    assert!(log.contains("PostgreSQL skipped the VACUUM"), "{log}");
    assert!(!log.contains("vacuumed the target"), "{log}");
    assert_eq!(
        metric(&body, "backfilld_vacuums_total{job=\"sk\"}").unwrap_or(0.0),
        0.0,
        "{body}"
    );
}

#[sqlx::test]
async fn sigterm_cancels_a_running_bloat_guard_vacuum(pool: PgPool) {
    let db = Db::new(pool).await;
    settled_table(&db, "sv", 100_000).await;
    // Every page the VACUUM touches costs it a 100 ms nap: it would run for minutes.
    let database = db.scalar_text("SELECT current_database()").await;
    db.exec(&format!(
        "ALTER DATABASE \"{database}\" SET vacuum_cost_limit = 1"
    ))
    .await;
    NewJob::new("sv", "sv")
        .predicate("v = 0")
        .set("v = id * 2")
        .raw("batch_size", "2000")
        .raw("target_batch_ms", "500")
        .insert(&db)
        .await;
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_BLOAT__VACUUM_COST_DELAY", "100ms")
        .env("BACKFILLD_BLOAT__VACUUM_MIN_ROWS", "1000")
        .spawn();
    common::wait_until(
        "the bloat guard's VACUUM",
        || daemon.log(),
        async || daemon.log().contains("bloat guard: vacuuming the target"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("VACUUM cancelled"), "{log}");
    let running = "SELECT count(*) FROM pg_stat_activity
                   WHERE datname = current_database() AND query LIKE 'VACUUM%' AND state = 'active'";
    common::wait_until("no VACUUM left running", String::new, async || {
        db.scalar_i64(running).await == 0
    })
    .await;
    let job = db.job("sv").await;
    assert_eq!(job.state, "pending", "handed back for another replica");
    assert_eq!(job.attempt, 0, "a graceful stop burns no attempt");
}

/// A stop during the final VACUUM leaves it to the next attempt, which has no batch left to run:
/// it runs the VACUUM before it succeeds (it had succeeded at once, the dead tuples left).
#[sqlx::test]
async fn a_final_vacuum_cut_short_by_a_stop_runs_in_the_next_attempt(pool: PgPool) {
    let db = Db::new(pool).await;
    settled_table(&db, "fv", 100_000).await;
    let database = db.scalar_text("SELECT current_database()").await;
    db.exec(&format!(
        "ALTER DATABASE \"{database}\" SET vacuum_cost_limit = 1"
    ))
    .await;
    // Half the rows change: below one guard interval, so the only VACUUM is the final one.
    NewJob::new("fv", "fv")
        .predicate("v = 0 AND id <= 50000")
        .set("v = id * 2")
        .raw("batch_size", "5000")
        .raw("target_batch_ms", "500")
        .insert(&db)
        .await;
    let guard_env = |d: common::DaemonBuilder| {
        d.env("BACKFILLD_BLOAT__VACUUM_COST_DELAY", "100ms")
            .env("BACKFILLD_BLOAT__VACUUM_EVERY_FRACTION", "1")
    };
    let mut daemon = guard_env(db.daemon()).spawn();
    common::wait_until(
        "the final VACUUM",
        || daemon.log(),
        async || daemon.log().contains("pass=Final"),
    )
    .await;
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(15)).await.success());
    let stopped = db.job("fv").await;
    assert_eq!(
        (stopped.state.to_string(), stopped.rows_changed),
        ("pending".into(), 50_000)
    );
    db.exec(&format!(
        "ALTER DATABASE \"{database}\" RESET vacuum_cost_limit"
    ))
    .await;
    let mut again = guard_env(db.daemon()).until_idle().spawn();
    again.wait_ok().await;
    assert!(again.log().contains("pass=Final"), "{}", again.log());
    assert_eq!(db.job("fv").await.state, "succeeded");
}

/// A job over a fresh 2,000-row table `name`, run by a daemon with `env` and health checks every
/// 200 ms, once its log shows batches held for `reason` (with `figure` in the line): no batch
/// has run. The caller then ends the cause and calls `released`.
async fn held_for(
    db: &Db,
    name: &str,
    env: (&str, &str),
    reason: &str,
    figure: &str,
) -> (common::Daemon, u16) {
    db.exec(&format!(
        "CREATE TABLE {name} (id bigint PRIMARY KEY, v int);
         INSERT INTO {name} (id) SELECT g FROM generate_series(1, 2000) g;"
    ))
    .await;
    NewJob::new(name, name)
        .predicate("v IS NULL")
        .set("v = 1")
        .insert(db)
        .await;
    let port = free_port();
    let daemon = db
        .daemon()
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .env(env.0, env.1)
        .env("BACKFILLD_THROTTLE__CHECK_INTERVAL", "200ms")
        .spawn();
    let held = format!("reason=\"{reason}\"");
    common::wait_until(
        &format!("batches held for {reason}"),
        || daemon.log(),
        async || daemon.log().contains(&held),
    )
    .await;
    assert!(
        daemon.log().contains(figure),
        "the hold names its figure\n{}",
        daemon.log()
    );
    assert_eq!(db.job(name).await.batches, 0, "no batch while held");
    (daemon, port)
}

/// After the cause of `held_for` ended: the job finishes, and the time held counts under
/// `reason`.
async fn released(db: &Db, name: &str, (mut daemon, port): (common::Daemon, u16), reason: &str) {
    let (_, body) = succeeded_then_stopped(db, name, &mut daemon, port).await;
    let series = format!("backfilld_throttle_seconds_total{{job=\"{name}\",reason=\"{reason}\"}}");
    assert!(metric(&body, &series).is_some_and(|s| s > 0.0), "{body}");
}

#[sqlx::test]
async fn a_transaction_holding_back_vacuum_holds_batches_until_it_ends(pool: PgPool) {
    let db = Db::new(pool).await;
    // An open transaction with an xid: nothing rewritten after it started can be reclaimed.
    let open = db.hold("SELECT txid_current()").await;
    let old = "SELECT count(*) FROM pg_stat_activity
               WHERE backend_xid IS NOT NULL AND now() - xact_start > interval '1 second'";
    common::wait_until(
        "the transaction to be older than the limit",
        String::new,
        async || db.scalar_i64(old).await > 0,
    )
    .await;
    let age = ("BACKFILLD_THROTTLE__MAX_TRANSACTION_AGE", "1s");
    let reason = "long_transaction";
    let daemon = held_for(
        &db,
        "lt",
        age,
        reason,
        "a transaction holding back vacuum is",
    )
    .await;
    open.commit().await;
    released(&db, "lt", daemon, reason).await;
}

/// A lazy VACUUM shows a transaction start and an xmin in `pg_stat_activity`, but PostgreSQL
/// leaves it out of the oldest xmin: one running longer than `max_transaction_age` (the guard's
/// own on a large table, or a DBA's) must not hold batches as a long transaction.
#[sqlx::test]
async fn a_long_lazy_vacuum_is_not_a_long_transaction(pool: PgPool) {
    let db = Db::new(pool).await;
    settled_table(&db, "slowvac", 20_000).await;
    db.exec("UPDATE slowvac SET v = 1").await;
    // Every page costs the VACUUM a 100 ms nap: it runs for minutes, until cancelled below.
    let mut vacuum_conn = db.pool.acquire().await.unwrap();
    sqlx::raw_sql("SET vacuum_cost_limit = 1; SET vacuum_cost_delay = 100")
        .execute(&mut *vacuum_conn)
        .await
        .unwrap();
    let vacuum = sqlx::raw_sql("VACUUM slowvac").execute(&mut *vacuum_conn);
    let job = async {
        let old =
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_progress_vacuum v USING (pid)
                   WHERE now() - a.xact_start > interval '1 second' AND a.backend_xmin IS NOT NULL";
        common::wait_until("a VACUUM older than the limit", String::new, async || {
            db.scalar_i64(old).await > 0
        })
        .await;
        db.exec(
            "CREATE TABLE lv (id bigint PRIMARY KEY, v int);
             INSERT INTO lv (id) SELECT g FROM generate_series(1, 2000) g;",
        )
        .await;
        NewJob::new("lv", "lv")
            .predicate("v IS NULL")
            .set("v = 1")
            .insert(&db)
            .await;
        let mut daemon = db
            .daemon()
            .env("BACKFILLD_THROTTLE__MAX_TRANSACTION_AGE", "1s")
            .env("BACKFILLD_THROTTLE__CHECK_INTERVAL", "200ms")
            .spawn();
        db.wait_state("lv", "succeeded").await;
        daemon.signal("TERM");
        daemon.wait(Duration::from_secs(30)).await;
        db.exec(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_progress_vacuum
             WHERE datname = current_database()",
        )
        .await;
        daemon.log()
    };
    let (vacuumed, log) = tokio::join!(vacuum, job);
    assert!(vacuumed.is_err(), "the VACUUM ran until cancelled");
    assert!(!log.contains("long_transaction"), "{log}");
}

/// A replication slot holding back WAL (a logical decoding consumer or a standby behind, or a slot
/// nobody reads) holds batches while over `max_slot_wal_bytes`: a backfill would add to the WAL it
/// keeps on the primary's disk.
#[sqlx::test]
async fn a_replication_slot_holding_back_wal_holds_batches_until_it_is_dropped(pool: PgPool) {
    let db = Db::new(pool).await;
    let slot = db.cluster_unique("bf_slot").await;
    db.exec(&format!(
        "SELECT pg_create_physical_replication_slot('{slot}', true)"
    ))
    .await;
    let limit = ("BACKFILLD_THROTTLE__MAX_SLOT_WAL_BYTES", "1024");
    let reason = "replication_slot";
    let daemon = held_for(&db, "rs", limit, reason, "a replication slot holds back").await;
    db.exec(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await;
    released(&db, "rs", daemon, reason).await;
}

/// Without the bloat guard a gentle job holds on dead tuples over `max_dead_tuple_ratio` while
/// autovacuum will clear them: past autovacuum's trigger for the table. Below it the hold would
/// never end (the held job adds no dead tuples, so autovacuum never comes): with the trigger
/// past the table's size the job used to hold for good. Both tables have 75 % dead tuples.
#[sqlx::test]
async fn dead_tuples_hold_a_job_only_while_autovacuum_will_clear_them(pool: PgPool) {
    let db = Db::new(pool).await;
    let mut locks = Vec::new();
    for (table, scale) in [("never_due", 2.0), ("due", 0.2)] {
        db.exec(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)
               WITH (autovacuum_vacuum_scale_factor = {scale});
             INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 40000) g;"
        ))
        .await;
        db.exec(&format!("VACUUM ANALYZE {table}")).await;
        // The server's own autovacuum would clear the due table's dead tuples whenever its
        // launcher comes by (once it did before the first batch, and no hold was seen): a lock
        // that conflicts only with VACUUM and ANALYZE makes it skip the table (SKIP_LOCKED);
        // the job's UPDATEs are not blocked.
        if table == "due" {
            locks.push(
                db.hold("LOCK TABLE due IN SHARE UPDATE EXCLUSIVE MODE")
                    .await,
            );
        }
        db.exec(&format!(
            "UPDATE {table} SET v = 1 WHERE id > 10000; SELECT pg_stat_force_next_flush();"
        ))
        .await;
        let dead = format!("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = '{table}'");
        common::wait_until("the dead tuples counted", String::new, async || {
            db.scalar_i64(&dead).await >= 30000
        })
        .await;
        NewJob::new(table, table)
            .predicate("id <= 10000")
            .set("v = v + 1")
            .raw("sleep_ms", "NULL")
            .insert(&db)
            .await;
    }
    // A gentle job whose guard cannot run (here: turned off) relies on autovacuum.
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_BLOAT__GUARD", "false")
        .env("BACKFILLD_WORKER__CONCURRENCY", "2")
        .until_idle()
        .spawn();
    db.wait_for("never_due", "state", |r| r.state == "succeeded")
        .await;
    common::wait_until(
        "the hold on the due table",
        || daemon.log(),
        async || daemon.log().contains("reason=\"dead_tuples\""),
    )
    .await;
    assert_eq!(db.job("due").await.rows_changed, 0, "held");
    // What autovacuum would do: then the held job runs.
    for lock in locks {
        lock.commit().await;
    }
    db.exec("VACUUM due").await;
    daemon.wait_ok().await;
    for name in ["never_due", "due"] {
        let job = db.job(name).await;
        assert_eq!(
            (job.state.as_str(), job.rows_changed),
            ("succeeded", 10000),
            "{name}"
        );
    }
}
