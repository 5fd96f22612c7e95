//! Operator control (pause, resume, cancel) and error handling (transient retried, permanent
//! fails only that job).
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler

mod common;

use std::time::Duration;

use common::{Db, NewJob};
use sqlx::PgPool;

async fn slow_job(db: &Db, name: &str, rows: i64) {
    db.exec(&format!(
        "CREATE TABLE {name} (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO {name} SELECT g FROM generate_series(1, {rows}) g;"
    ))
    .await;
    NewJob::new(name, name)
        .predicate("true")
        .set("n = n + 1")
        .raw("batch_size", "100")
        .raw("sleep_ms", "100")
        .insert(db)
        .await;
}

/// A job that finishes without this replica's runner (paused here, then cancelled while idle)
/// still has its metric series dropped after `finished_job_ttl`: the daemon asks the database.
#[sqlx::test]
async fn series_of_a_job_finished_elsewhere_expire(pool: PgPool) {
    let db = Db::new(pool).await;
    slow_job(&db, "pj", 5000).await;
    let port = common::free_port();
    let mut daemon = db
        .daemon()
        .max_batch(100)
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .env("BACKFILLD_METRICS__FINISHED_JOB_TTL", "1s")
        .env("BACKFILLD_WORKER__POLL_INTERVAL", "200ms")
        .spawn();
    db.wait_for("pj", "batches", |r| r.batches >= 2).await;
    db.set_requested("pj", "paused").await;
    db.wait_state("pj", "paused").await;
    let series = "rows_changed_total{job=\"pj\"}";
    let body = common::http_get(port, "/metrics").await.expect("metrics").1;
    assert!(body.contains(series), "{body}");
    // The paused walk's ETA and batch size go with the attempt (a dashboard's `max` had shown
    // them for the TTL, beside the replica that resumed or finished it).
    common::wait_until(
        "the paused walk's ETA and batch size dropped",
        || daemon.log(),
        async || {
            let body = common::http_get(port, "/metrics").await.expect("metrics").1;
            !body.contains("job_eta_seconds{job=\"pj\"}")
                && !body.contains("batch_size{job=\"pj\"}")
                && body.contains(series)
        },
    )
    .await;
    db.set_requested("pj", "cancelled").await;
    db.wait_state("pj", "cancelled").await;
    common::wait_until(
        "the series dropped",
        || daemon.log(),
        async || {
            let body = common::http_get(port, "/metrics").await.expect("metrics").1;
            !body.contains(series)
        },
    )
    .await;
    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(30)).await;
}

/// While a stopping replica drains (here its batch waits on a row lock), /readyz answers 503
/// instead of the listener refusing connections.
#[sqlx::test]
async fn readyz_says_stopping_during_the_drain(pool: PgPool) {
    let db = Db::new(pool).await;
    slow_job(&db, "dn", 1000).await;
    let holder = db.hold("SELECT * FROM dn WHERE id = 50 FOR UPDATE").await;
    let port = common::free_port();
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .env("BACKFILLD_BATCH__LOCK_TIMEOUT", "20s")
        .spawn();
    let waiting = "SELECT count(*) FROM pg_stat_activity
                   WHERE application_name = 'backfilld' AND wait_event_type = 'Lock'";
    common::wait_until(
        "a batch waiting on the row lock",
        || daemon.log(),
        async || db.scalar_i64(waiting).await > 0,
    )
    .await;
    daemon.signal("TERM");
    common::wait_until(
        "/readyz saying stopping",
        || daemon.log(),
        async || {
            matches!(common::http_get(port, "/readyz").await,
                     Some((503, body)) if body == "not ready: stopping\n")
        },
    )
    .await;
    holder.commit().await;
    let status = daemon.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", daemon.log());
}

/// `--until-idle` waits for a retry the daemon scheduled (an attempt that ran out of batch
/// retries on a locked row): the job will run, so the queue is not drained yet.
#[sqlx::test]
async fn until_idle_waits_for_a_scheduled_retry(pool: PgPool) {
    let db = Db::new(pool).await;
    slow_job(&db, "rt", 500).await;
    let holder = db.hold("SELECT * FROM rt WHERE id = 50 FOR UPDATE").await;
    let mut daemon = db
        .daemon()
        .until_idle()
        .env("BACKFILLD_BATCH__LOCK_TIMEOUT", "200ms")
        .env("BACKFILLD_WORKER__MAX_BATCH_RETRIES", "1")
        .env("BACKFILLD_WORKER__POLL_INTERVAL", "200ms")
        .spawn();
    db.wait_for("rt", "a scheduled retry", |r| {
        r.state == "pending" && r.attempt == 1
    })
    .await;
    holder.commit().await;
    daemon.wait_ok().await;
    let job = db.job("rt").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!(job.attempt, 2);
}

/// A batch that runs out of its retries ends the attempt, and the job is retried (or, at its last
/// attempt, failed) as a whole. The attempt used to retry it in place as well, up to
/// `max_batch_retries` times more: with the defaults, 81 tries (and minutes of backoff) per
/// attempt instead of 9.
#[sqlx::test]
async fn a_batch_out_of_retries_ends_the_attempt(pool: PgPool) {
    let db = Db::new(pool).await;
    slow_job(&db, "gu", 500).await;
    let holder = db.hold("SELECT * FROM gu WHERE id = 50 FOR UPDATE").await;
    let mut daemon = db
        .daemon()
        .until_idle()
        .env("BACKFILLD_BATCH__LOCK_TIMEOUT", "200ms")
        .env("BACKFILLD_WORKER__MAX_BATCH_RETRIES", "2")
        .env("BACKFILLD_WORKER__MAX_ATTEMPTS", "1")
        .spawn();
    daemon.wait(Duration::from_secs(60)).await;
    holder.commit().await;
    let log = daemon.log();
    let job = db.job("gu").await;
    assert_eq!(job.state, "failed", "{log}");
    let error = job.last_error.unwrap_or_default();
    assert!(error.contains("55P03") && error.contains("gu"), "{error}");
    assert!(log.contains("transient batch error; retrying error=job gu on public.gu: applying the change failed: SQLSTATE 55P03") && log.contains("retry=2"), "{log}");
    assert!(!log.contains("retry=3"), "{log}");
    assert!(
        !log.contains("transient error; retrying"),
        "retried in place: {log}"
    );
    assert_eq!(log.matches("attempt gave up").count(), 1, "{log}");
}

/// SIGTERM while a dry run counts a window of an expensive predicate (an unindexed correlated
/// subquery: seconds per window): the statement is cancelled server-side and the daemon exits at
/// once. It used to wait for the statement, up to `statement_timeout`.
#[sqlx::test]
async fn sigterm_cancels_a_plans_counting_statement(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE slow (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO slow SELECT g FROM generate_series(1, 5000) g;
         CREATE TABLE big (v bigint);
         INSERT INTO big SELECT g FROM generate_series(1, 200000) g;",
    )
    .await;
    NewJob::new("slow_plan", "slow")
        .predicate("(SELECT count(*) FROM big b WHERE b.v = id) >= 0")
        .set("n = 1")
        .insert(&db)
        .await;
    db.exec("UPDATE backfill.jobs SET mode = 'dry_run'").await;
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_BATCH__STATEMENT_TIMEOUT", "60s")
        .spawn();
    let counting = "SELECT count(*) FROM pg_stat_activity
                    WHERE state = 'active' AND query LIKE '%FROM big b%'
                      AND pid <> pg_backend_pid()";
    common::wait_until(
        "a counting statement running",
        || daemon.log(),
        async || db.scalar_i64(counting).await > 0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = std::time::Instant::now();
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(20)).await;
    assert!(status.success(), "{}", daemon.log());
    assert!(
        stopped.elapsed() < Duration::from_secs(3),
        "took {:?} to stop: {}",
        stopped.elapsed(),
        daemon.log()
    );
    assert_eq!(db.scalar_i64(counting).await, 0, "the count was cancelled");
    let job = db.job("slow_plan").await;
    assert_eq!((job.state.as_str(), job.attempt), ("pending", 0));
}

/// A daemon started before its schema exists (a migration Job still running, a sidecar up
/// before its database) waits, alive but not ready, and starts once it can: it used to exit 1 at
/// once, and a sidecar crash-looped.
#[sqlx::test]
async fn a_daemon_waits_for_its_schema_alive_but_not_ready(pool: PgPool) {
    let db = Db::new(pool).await;
    let port = common::free_port();
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .env("BACKFILLD_DATABASE__SCHEMA", "later")
        .spawn();
    common::wait_until(
        "/healthz 200 and /readyz 503 while the schema is missing",
        || daemon.log(),
        async || {
            let ready = common::http_get(port, "/readyz").await;
            matches!(common::http_get(port, "/healthz").await, Some((200, _)))
                && ready.as_ref().is_some_and(|(code, body)| {
                    // It says why (it said "database not reachable", which it was).
                    *code == 503
                        && body.starts_with("not ready: database not usable yet")
                        && body.contains("later")
                })
        },
    )
    .await;
    let migrate = std::process::Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .env("BACKFILLD_DATABASE__SCHEMA", "later")
        .output()
        .unwrap();
    assert!(migrate.status.success(), "{migrate:?}");
    common::wait_until(
        "/readyz 200 once migrated",
        || daemon.log(),
        async || matches!(common::http_get(port, "/readyz").await, Some((200, _))),
    )
    .await;
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(20)).await;
    assert!(status.success(), "{}", daemon.log());
}

/// A dry run approved while paused is not claimable, so `--until-idle` does not wait for it (its
/// count and the claim agree); a dry run burns no attempt, so the real run is attempt 1.
#[sqlx::test]
async fn an_approved_dry_run_held_paused_lets_until_idle_exit(pool: PgPool) {
    let db = Db::new(pool).await;
    slow_job(&db, "dr", 300).await;
    db.exec("UPDATE backfill.jobs SET mode = 'dry_run' WHERE name = 'dr'")
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let planned = db.job("dr").await;
    assert_eq!(planned.state, "planned", "{:?}", planned.last_error);
    assert_eq!(planned.attempt, 0, "a dry run burns no attempt");
    db.set_requested("dr", "paused").await;
    backfilld::ops::approve(&db.lib, &db.names, "dr")
        .await
        .unwrap();
    let mut idle = db.daemon().until_idle().spawn();
    let status = idle.wait(Duration::from_secs(20)).await;
    assert!(status.success(), "{}", idle.log());
    assert_eq!(db.job("dr").await.state, "planned", "held by the pause");
    db.set_requested("dr", "running").await;
    db.daemon()
        .max_batch(100)
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    let done = db.job("dr").await;
    assert_eq!(done.state, "succeeded", "{:?}", done.last_error);
    assert_eq!(done.attempt, 1);
}

#[sqlx::test]
async fn pause_holds_batches_and_resume_completes(pool: PgPool) {
    let db = Db::new(pool).await;
    slow_job(&db, "p", 5000).await;
    let mut daemon = db.daemon().max_batch(100).spawn();
    db.wait_for("p", "batches", |r| r.batches >= 3).await;
    db.set_requested("p", "paused").await;
    let paused = db.wait_state("p", "paused").await;
    assert_eq!(paused.attempt, 0, "pausing does not burn an attempt");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let still = db.job("p").await;
    assert_eq!(still.state, "paused");
    assert_eq!(
        still.batches, paused.batches,
        "no batch may run while paused"
    );
    db.set_requested("p", "running").await;
    db.wait_state("p", "succeeded").await;
    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(30)).await;
    let done = db.job("p").await;
    assert_eq!(done.rows_changed, 5000);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM p WHERE n <> 1").await,
        0
    );
}

#[sqlx::test]
async fn cancel_stops_within_one_batch(pool: PgPool) {
    let db = Db::new(pool).await;
    slow_job(&db, "c", 5000).await;
    let mut daemon = db.daemon().max_batch(100).until_idle().spawn();
    db.wait_for("c", "batches", |r| r.batches >= 3).await;
    db.set_requested("c", "cancelled").await;
    let at_request = db.job("c").await.batches;
    daemon.wait_ok().await;
    let cancelled = db.job("c").await;
    assert_eq!(cancelled.state, "cancelled");
    assert!(cancelled.finished_at.is_some());
    assert!(
        cancelled.batches <= at_request + 1,
        "{} batches after asking at {at_request}",
        cancelled.batches
    );
    assert!(cancelled.rows_changed < 5000);
}

/// A misspelt request ('canceled', 'pause') meant "stop": the running job pauses within a batch,
/// and a pending one waits paused, until someone writes what they meant. Before, both ran to the
/// end as if nothing was asked.
#[sqlx::test]
async fn a_misspelt_request_pauses_the_job(pool: PgPool) {
    let db = Db::new(pool).await;
    slow_job(&db, "m", 5000).await;
    NewJob::new("waiting", "m")
        .predicate("n > 100")
        .set("n = 0")
        .raw("priority", "-1")
        .insert(&db)
        .await;
    db.set_requested("waiting", "pause").await;
    let mut daemon = db.daemon().max_batch(100).until_idle().spawn();
    db.wait_for("m", "batches", |r| r.batches >= 3).await;
    db.set_requested("m", "canceled").await;
    let at_request = db.job("m").await.batches;
    daemon.wait_ok().await;
    let paused = db.job("m").await;
    assert_eq!(paused.state, "paused");
    assert!(paused.batches <= at_request + 1, "{paused:?}");
    assert_eq!(db.job("waiting").await.state, "paused");
    db.set_requested("m", "cancelled").await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("m").await.state, "cancelled");
}

/// A row inserted as 'running' with no lease belongs to no replica: it is rescued like an
/// expired lease and runs (it had held `--until-idle` forever).
#[sqlx::test]
async fn a_running_row_without_a_lease_is_rescued(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec("CREATE TABLE s (id int PRIMARY KEY, v int); INSERT INTO s VALUES (1, NULL);")
        .await;
    NewJob::new("stray", "s")
        .predicate("v IS NULL")
        .set("v = 1")
        .raw("state", "'running'")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("stray").await.state, "succeeded");
}

/// `max_rows_per_second` bounds every batch, not only the average: a job asking for batches of
/// 1,000 under a cap of 100 changes at most 100 rows a batch (it had changed all 300 at once).
#[sqlx::test]
async fn a_rate_cap_bounds_every_batch(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE r (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO r SELECT g FROM generate_series(1, 300) g;",
    )
    .await;
    NewJob::new("capped", "r")
        .predicate("n = 0")
        .set("n = 1")
        .raw("batch_size", "1000")
        .raw("max_rows_per_second", "100")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let done = db.job("capped").await;
    assert_eq!(done.state, "succeeded", "{:?}", done.last_error);
    assert_eq!(done.rows_changed, 300);
    assert!(done.batches >= 3, "{done:?}");
    assert!(
        done.batch_size_current.unwrap_or_default() <= 100,
        "{done:?}"
    );
}

/// The cap is the job's, not each slice's: slices had each kept 1,000 rows a second, so two
/// changed 4,000 rows in under two seconds. Together they now take over three (a lower bound
/// only: a slow machine takes longer either way).
#[sqlx::test]
async fn parallel_slices_share_the_rate_cap(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE rp (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO rp SELECT g FROM generate_series(1, 4000) g;",
    )
    .await;
    NewJob::new("capped4", "rp")
        .predicate("n = 0")
        .set("n = 1")
        .raw("batch_size", "250")
        .raw("parallelism", "4")
        .raw("max_rows_per_second", "1000")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let done = db.job("capped4").await;
    assert_eq!(done.state, "succeeded", "{:?}", done.last_error);
    assert_eq!(done.rows_changed, 4000);
    let slices = done
        .slices
        .as_ref()
        .and_then(|s| s.as_array())
        .map(Vec::len);
    assert!(slices >= Some(2), "{:?}", done.slices);
    let took = done.finished_at.unwrap() - done.started_at.unwrap();
    assert!(
        took >= chrono::Duration::milliseconds(3000),
        "4,000 rows at 1,000 a second took {took}"
    );
}

#[sqlx::test]
async fn pause_and_cancel_apply_to_jobs_not_yet_running(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec("CREATE TABLE q (id int PRIMARY KEY, s text); INSERT INTO q VALUES (1, NULL);")
        .await;
    NewJob::new("later", "q")
        .predicate("s IS NULL")
        .set("s = 'x'")
        .insert(&db)
        .await;
    NewJob::new("never", "q")
        .predicate("s IS NULL")
        .set("s = 'y'")
        .insert(&db)
        .await;
    db.set_requested("later", "paused").await;
    db.set_requested("never", "cancelled").await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("later").await.state, "paused");
    assert_eq!(db.job("never").await.state, "cancelled");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM q WHERE s IS NOT NULL")
            .await,
        0
    );
    db.set_requested("later", "running").await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("later").await.state, "succeeded");
    assert_eq!(db.scalar_text("SELECT s FROM q").await, "x");
}

#[sqlx::test]
async fn a_locked_table_is_retried_until_the_lock_goes(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE locked (id bigint PRIMARY KEY, s text);
         INSERT INTO locked SELECT g, NULL FROM generate_series(1, 2000) g;",
    )
    .await;
    // Another session holds an exclusive lock well beyond lock_timeout.
    let blocker = db.hold("LOCK TABLE locked IN ACCESS EXCLUSIVE MODE").await;
    NewJob::new("retry", "locked")
        .predicate("s IS NULL")
        .set("s = 'ok'")
        .raw("mode", "'execute'")
        .insert(&db)
        .await;
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_BATCH__LOCK_TIMEOUT", "100ms")
        .env("BACKFILLD_BATCH__STATEMENT_TIMEOUT", "1s")
        .until_idle()
        .spawn();
    // Validation needs the lock too: wait until the daemon has hit it and is retrying.
    common::wait_until(
        "a lock timeout",
        || daemon.log(),
        async || daemon.log().contains("55P03"),
    )
    .await;
    assert_ne!(db.job("retry").await.state, "succeeded");
    blocker.commit().await;
    daemon.wait_ok().await;
    let job = db.job("retry").await;
    assert_eq!(
        job.state,
        "succeeded",
        "{:?}\n{}",
        job.last_error,
        daemon.log()
    );
    assert_eq!(job.rows_changed, 2000);
    assert!(
        daemon.log().contains("55P03") || daemon.log().contains("57014"),
        "the lock should have been hit and retried:\n{}",
        daemon.log()
    );
}

#[sqlx::test]
async fn permanent_errors_fail_only_their_job_with_sqlstate(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE e (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, s text);
         INSERT INTO e SELECT g, 0, NULL FROM generate_series(1, 1000) g;",
    )
    .await;
    NewJob::new("missing_column", "e")
        .predicate("true")
        .set("nope = 1")
        .insert(&db)
        .await;
    // Valid SQL that fails on some rows at run time: division by zero at id = 500. Its predicate
    // is on its own column, so the concurrent "fine" job cannot take row 500 out of its reach.
    NewJob::new("div_zero", "e")
        .predicate("n = 0")
        .set("n = 1 / (id - 500)")
        .insert(&db)
        .await;
    NewJob::new("fine", "e")
        .predicate("s IS NULL")
        .set("s = 'ok'")
        .raw("priority", "-1")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let missing = db.job("missing_column").await;
    assert_eq!(missing.state, "failed");
    let err = missing.last_error.unwrap();
    assert!(
        err.contains("42703") && err.contains("missing_column") && err.contains("public.e"),
        "{err}"
    );
    let div = db.job("div_zero").await;
    assert_eq!(div.state, "failed");
    let err = div.last_error.unwrap();
    assert!(
        err.contains("SQLSTATE 22012") && err.contains("div_zero"),
        "{err}"
    );
    assert_eq!(div.attempt, 1, "a permanent error is not retried");
    let fine = db.job("fine").await;
    assert_eq!(fine.state, "succeeded");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM e WHERE s = 'ok'").await,
        1000
    );
}

#[sqlx::test]
async fn a_lock_taken_mid_run_is_retried_with_smaller_batches(pool: PgPool) {
    let db = Db::new(pool).await;
    slow_job(&db, "midlock", 4000).await;
    let mut daemon = db
        .daemon()
        .max_batch(100)
        .env("BACKFILLD_BATCH__LOCK_TIMEOUT", "100ms")
        .until_idle()
        .spawn();
    db.wait_for("midlock", "batches", |r| r.batches >= 3).await;
    let blocker = db.hold("LOCK TABLE midlock IN ACCESS EXCLUSIVE MODE").await;
    common::wait_until(
        "a transient batch error",
        || daemon.log(),
        async || daemon.log().contains("transient batch error"),
    )
    .await;
    let during = db.job("midlock").await;
    blocker.commit().await;
    daemon.wait_ok().await;
    assert_eq!(
        during.state, "running",
        "a transient error must not end the attempt"
    );
    let job = db.job("midlock").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!(job.attempt, 1);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM midlock WHERE n <> 1")
            .await,
        0
    );
    let log = daemon.log();
    assert!(
        log.contains("transient batch error") && log.contains("55P03"),
        "{log}"
    );
}

#[sqlx::test]
async fn sighup_reloads_the_config_file_and_rejects_a_bad_one(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec("CREATE TABLE h (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); INSERT INTO h SELECT g FROM generate_series(1, 950) g;").await;
    // The job takes its sleep from the configuration: ten minutes between batches at first.
    NewJob::new("hup", "h")
        .predicate("true")
        .set("n = n + 1")
        .raw("sleep_ms", "NULL")
        .raw("batch_size", "NULL")
        .insert(&db)
        .await;
    let dir = std::env::temp_dir().join(format!("backfilld-hup-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("backfilld.toml");
    let write = |batch: &str| {
        let sizes = "size = 100\nmin_size = 10\nmax_size = 100";
        let sizes = if batch.contains("size =") { "" } else { sizes };
        std::fs::write(&file, format!("[batch]\n{sizes}\n{batch}\n")).unwrap()
    };
    write("sleep_ms = 600000");
    let mut daemon = db.daemon().config_file(&file).until_idle().spawn();
    db.wait_for("hup", "the first batch", |r| r.batches >= 1)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        db.job("hup").await.batches,
        1,
        "held by the ten-minute sleep"
    );

    // An invalid file is rejected and the daemon keeps its configuration.
    write("sleep_ms = -5");
    daemon.signal("HUP");
    common::wait_until(
        "the rejected reload",
        || daemon.log(),
        async || daemon.log().contains("configuration rejected"),
    )
    .await;
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "a bad reload must not stop the daemon"
    );
    assert_eq!(db.job("hup").await.batches, 1);

    // A valid reload that keeps the long sleep: batches stay held after it.
    write("sleep_ms = 600000\ntarget_batch_ms = 400");
    daemon.signal("HUP");
    common::wait_until(
        "the reload",
        || daemon.log(),
        async || daemon.log().contains("configuration reloaded"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        db.job("hup").await.batches <= 2,
        "the reloaded ten-minute sleep must still hold batches"
    );

    // A valid one applies at once, even in the middle of the old sleep, and so do smaller
    // batches: the 750 or 850 keys left (one or two batches of 100 ran) take 30 or 34 batches
    // of 25, where they had taken 8 or 9 of 100.
    write("size = 25\nmin_size = 10\nmax_size = 25\nsleep_ms = 0");
    daemon.signal("HUP");
    daemon.wait_ok().await;
    let job = db.job("hup").await;
    assert_eq!(job.state, "succeeded");
    assert!(job.batches >= 32, "{} batches", job.batches);
    let log = daemon.log();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(
        !log.contains("next attempt"),
        "batch settings apply now: {log}"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM h WHERE n <> 1").await,
        0
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A window of `batch.min_size` keys that cannot finish within the batch ceiling (rows of
/// hundreds of kB in the report; a slow trigger here) timed out on every retry, the size pinned
/// at the minimum, until the job failed. Statement timeouts now halve below the minimum.
#[sqlx::test]
async fn batches_that_time_out_at_the_minimum_size_go_below_it(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE heavy (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO heavy SELECT g, 0 FROM generate_series(1, 40) g;
         CREATE FUNCTION heavy_slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.01); RETURN NEW; END $$;
         CREATE TRIGGER heavy_slow BEFORE UPDATE ON heavy
         FOR EACH ROW EXECUTE FUNCTION heavy_slow();",
    )
    .await;
    NewJob::new("heavy", "heavy")
        .predicate("v = 0")
        .set("v = 1")
        .raw("max_batch_ms", "200")
        .insert(&db)
        .await;
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_BATCH__MIN_SIZE", "40")
        .until_idle()
        .spawn();
    daemon.wait_ok().await;
    let job = db.job("heavy").await;
    assert_eq!(
        (job.state.as_str(), job.rows_changed),
        ("succeeded", 40),
        "{:?}\n{}",
        job.last_error,
        daemon.log()
    );
    assert!(
        daemon.log().contains("statement timeout"),
        "it did time out at first"
    );
}

/// A job whose batches time out even at one key fails, and its error says which limit and what
/// to change: PostgreSQL's "canceling statement due to statement timeout" names neither.
#[sqlx::test]
async fn a_job_failing_on_statement_timeouts_names_the_limit(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE glacial (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO glacial SELECT g, 0 FROM generate_series(1, 4) g;
         CREATE FUNCTION glacial_slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$;
         CREATE TRIGGER glacial_slow BEFORE UPDATE ON glacial
         FOR EACH ROW EXECUTE FUNCTION glacial_slow();",
    )
    .await;
    NewJob::new("glacial", "glacial")
        .predicate("v = 0")
        .set("v = 1")
        .raw("max_batch_ms", "100")
        .insert(&db)
        .await;
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_WORKER__MAX_ATTEMPTS", "1")
        .env("BACKFILLD_WORKER__MAX_BATCH_RETRIES", "2")
        .until_idle()
        .spawn();
    daemon.wait_ok().await;
    let job = db.job("glacial").await;
    assert_eq!((job.state.as_str(), job.rows_changed), ("failed", 0));
    let error = job.last_error.unwrap_or_default();
    assert!(
        error.contains("57014")
            && error.contains("within 100 ms")
            && error.contains("raise the job's max_batch_ms"),
        "{error}"
    );
}
