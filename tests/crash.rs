//! Crashes, graceful stops and lost leases: the effect stays exactly once per row.
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler

mod common;

use std::time::{Duration, Instant};

use common::{Db, NewJob};
use sqlx::PgPool;

const ROWS: i64 = 120_000;

async fn counter_table(db: &Db, rows: i64) {
    db.exec(&format!(
        "CREATE TABLE counters (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO counters SELECT g FROM generate_series(1, {rows}) g;"
    ))
    .await;
}

async fn assert_exactly_once(db: &Db, job: &str, rows: i64) {
    let row = db.job(job).await;
    assert_eq!(
        row.state,
        "succeeded",
        "{:?}\n{}",
        row.last_error,
        db.daemon_logs()
    );
    assert_eq!(
        row.rows_changed, rows,
        "rows_changed must equal the row count"
    );
    let hist: Vec<(i32, i64)> =
        sqlx::query_as("SELECT n, count(*) FROM counters GROUP BY n ORDER BY n")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        hist,
        vec![(1, rows)],
        "every row must have n = 1 (n, count): {hist:?}"
    );
}

#[sqlx::test]
async fn sigkill_at_several_points_changes_every_row_exactly_once(pool: PgPool) {
    let db = Db::new(pool).await;
    counter_table(&db, ROWS).await;
    // Predicate `true` and a non-idempotent set clause: any re-applied batch shows as n = 2.
    NewJob::new("once", "counters")
        .predicate("true")
        .set("n = n + 1")
        .raw("batch_size", "700")
        .insert(&db)
        .await;
    let launch = || {
        db.daemon()
            .max_batch(700)
            .env("BACKFILLD_WORKER__LEASE_TTL", "2s")
            .spawn()
    };
    let mut kills = 0;
    for at_batches in [5_i64, 40, 90, 140] {
        let mut daemon = launch();
        // Kill wherever the daemon happens to be: mid-transaction, mid-sleep or mid-commit.
        db.wait_for("once", "progress", |r| {
            r.batches >= at_batches || r.state == "succeeded"
        })
        .await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..40))).await;
        daemon.kill9();
        kills += 1;
        if db.job("once").await.state == "succeeded" {
            break;
        }
    }
    assert!(
        kills >= 3,
        "the job finished before three kills; make it longer"
    );
    let mut last = db.daemon().max_batch(700).until_idle().spawn();
    last.wait_ok().await;
    assert_exactly_once(&db, "once", ROWS).await;
    assert!(
        db.job("once").await.attempt >= 2,
        "the kills should have cost attempts"
    );
}

#[sqlx::test]
async fn sigterm_exits_quickly_and_another_replica_resumes_from_the_checkpoint(pool: PgPool) {
    let db = Db::new(pool).await;
    counter_table(&db, 20_000).await;
    NewJob::new("term", "counters")
        .predicate("true")
        .set("n = n + 1")
        .raw("batch_size", "200")
        .raw("sleep_ms", "100")
        .insert(&db)
        .await;
    let mut first = db.daemon().max_batch(200).spawn();
    db.wait_for("term", "a few batches", |r| r.batches >= 3)
        .await;
    let asked = Instant::now();
    first.signal("TERM");
    let status = first.wait(Duration::from_secs(30)).await;
    let took = asked.elapsed();
    assert!(
        status.success(),
        "SIGTERM must exit 0, got {status}\n{}",
        first.log()
    );
    let stopped = db.job("term").await;
    assert_eq!(stopped.state, "pending", "the lease is handed back");
    assert_eq!(
        stopped.attempt, 0,
        "a graceful stop does not burn an attempt"
    );
    assert!(stopped.lease_owner.is_none());
    let resumed_from = stopped.cursor.clone().expect("checkpoint kept");
    assert!(first.log().contains("stop requested"), "{}", first.log());
    // Hang guard, not a timing goal: batch time (ms here) plus one second, with slack for CI.
    assert!(took < Duration::from_secs(10), "exit took {took:?}");

    let mut second = db
        .daemon()
        .max_batch(200)
        .env("BACKFILLD_BATCH__SLEEP_MS", "0")
        .until_idle()
        .spawn();
    second.wait_ok().await;
    let done = db.job("term").await;
    assert_eq!(done.attempt, 1);
    assert_exactly_once(&db, "term", 20_000).await;
    assert!(
        done.batches > stopped.batches,
        "resumed after {resumed_from}"
    );
    assert_eq!(
        done.rows_scanned, 20_000,
        "no key scanned twice across the hand-over"
    );
}

#[sqlx::test]
async fn a_stalled_replica_cannot_commit_after_its_lease_was_taken(pool: PgPool) {
    let db = Db::new(pool).await;
    counter_table(&db, 10_000).await;
    NewJob::new("fenced", "counters")
        .predicate("true")
        .set("n = n + 1")
        .raw("batch_size", "100")
        .raw("sleep_ms", "50")
        .insert(&db)
        .await;
    let fast_lease = |b: common::DaemonBuilder| {
        b.max_batch(100)
            .env("BACKFILLD_WORKER__LEASE_TTL", "1s")
            .env("BACKFILLD_WORKER__HEARTBEAT_INTERVAL", "200ms")
            .env("BACKFILLD_BATCH__LOCK_TIMEOUT", "300ms")
    };
    let port_b = common::free_port();
    let mut a = fast_lease(db.daemon()).spawn();
    db.wait_for("fenced", "a few batches", |r| r.batches >= 5)
        .await;
    a.signal("STOP"); // A freezes wherever it is: maybe inside an open batch transaction.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut b = fast_lease(db.daemon())
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port_b}"))
        .spawn();
    db.wait_for("fenced", "B to take over", |r| r.attempt == 2)
        .await;
    a.signal("CONT"); // A wakes up believing it still owns the job.
    db.wait_state("fenced", "succeeded").await;
    let (_, metrics) = common::http_get(port_b, "/metrics")
        .await
        .expect("B's metrics");
    assert!(
        metrics.contains("backfilld_leases_rescued_total 1"),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.signal("TERM");
    b.signal("TERM");
    a.wait(Duration::from_secs(30)).await;
    b.wait(Duration::from_secs(30)).await;
    assert!(
        a.log().contains("lease lost"),
        "A must notice it lost the lease:\n{}",
        a.log()
    );
    assert_exactly_once(&db, "fenced", 10_000).await;
}

/// A replica frozen between two statements of a batch (the stall above can land there) keeps no
/// lock past its lease: the server ends its idle transaction, so the job row its checkpoint may
/// have locked is claimable again and the window's rows are free.
#[sqlx::test]
async fn a_batch_transaction_left_idle_past_the_lease_ttl_is_ended_by_the_server(pool: PgPool) {
    use sqlx::Executor;
    let db = Db::new(pool).await;
    counter_table(&db, 10).await;
    let settings = backfilld::batch::TxSettings::capped(
        Duration::from_secs(2),
        Duration::from_secs(30),
        Duration::from_secs(10),
        "off".into(),
        Duration::from_millis(300),
    );
    let mut frozen = db.pool.acquire().await.unwrap();
    frozen
        .execute(settings.begin_statement(false).as_str())
        .await
        .unwrap();
    frozen
        .execute("UPDATE counters SET n = n + 1 WHERE id = 1")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Panics if the row is still locked after 100 ms.
    db.exec("BEGIN; SET LOCAL lock_timeout = '100ms'; UPDATE counters SET n = n + 10 WHERE id = 1; COMMIT;")
        .await;
    assert!(
        frozen.execute("SELECT 1").await.is_err(),
        "the idle session was ended"
    );
    assert_eq!(
        db.scalar_i64("SELECT n::bigint FROM counters WHERE id = 1")
            .await,
        10,
        "the frozen batch's change was rolled back"
    );
}

#[sqlx::test]
async fn parallel_slices_change_every_row_exactly_once_across_a_kill(pool: PgPool) {
    let db = Db::new(pool).await;
    counter_table(&db, 60_000).await;
    NewJob::new("sliced", "counters")
        .predicate("true")
        .set("n = n + 1")
        .raw("batch_size", "300")
        .raw("parallelism", "3")
        .insert(&db)
        .await;
    let mut first = db
        .daemon()
        .max_batch(300)
        .env("BACKFILLD_WORKER__LEASE_TTL", "2s")
        .spawn();
    db.wait_for("sliced", "batches in every slice", |r| r.batches >= 40)
        .await;
    first.kill9();
    let mid = db.job("sliced").await;
    let slices = mid.slices.clone().expect("slices stored");
    assert_eq!(slices.as_array().map(Vec::len), Some(3), "{slices}");
    assert!(mid.cursor.is_none(), "sliced jobs checkpoint per slice");
    db.daemon()
        .max_batch(300)
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    assert_exactly_once(&db, "sliced", 60_000).await;
    let done = db.job("sliced").await;
    assert_eq!(
        done.rows_scanned, 60_000,
        "no key scanned twice across slices and the restart"
    );
    for s in done.slices.unwrap().as_array().unwrap() {
        assert_eq!(
            s["cursor"], s["upper"],
            "every slice walked to its end: {s}"
        );
    }
}

/// A batch the daemon saw commit can still be lost, with its checkpoint, to a server crash or a
/// failover before the asynchronous commit reached disk. Here the job row and the rows are
/// rewound by hand as such a loss leaves them (the last 50 keys unchanged and not checkpointed),
/// while the daemon sleeps between batches. The next checkpoint finds the cursor elsewhere, the
/// batch rolls back, and the daemon resumes from the stored cursor, so the lost keys are changed
/// after all. It used to go on from the cursor in memory and skip them for good.
#[sqlx::test]
async fn a_lost_commit_is_redone_not_skipped(pool: PgPool) {
    let db = Db::new(pool).await;
    counter_table(&db, 600).await;
    NewJob::new("lost", "counters")
        .predicate("true")
        .set("n = n + 1")
        .raw("batch_size", "100")
        .raw("sleep_ms", "1000")
        .raw("parallelism", "1")
        .insert(&db)
        .await;
    let mut daemon = db.daemon().max_batch(100).until_idle().spawn();
    db.wait_for("lost", "two batches", |r| r.rows_changed >= 200)
        .await;
    db.exec(
        "DO $$ DECLARE c bigint; BEGIN
           SELECT (cursor->>0)::bigint INTO c FROM backfill.jobs WHERE name = 'lost' FOR UPDATE;
           UPDATE counters SET n = n - 1 WHERE id > c - 50 AND id <= c;
           UPDATE backfill.jobs SET cursor = jsonb_build_array((c - 50)::text),
                  rows_changed = rows_changed - 50, rows_scanned = rows_scanned - 50
           WHERE name = 'lost';
         END $$",
    )
    .await;
    daemon.wait_ok().await;
    assert_exactly_once(&db, "lost", 600).await;
    assert!(
        daemon.log().contains("batch's commit was lost"),
        "{}",
        daemon.log()
    );
}

/// Starts a 600-row counting job `name` (batches of 100, a second apart) on a daemon serving
/// metrics, and returns once two batches committed: the daemon and its metrics port.
async fn counting_job_past_two_batches(db: &Db, name: &str) -> (common::Daemon, u16) {
    counter_table(db, 600).await;
    NewJob::new(name, "counters")
        .predicate("true")
        .set("n = n + 1")
        .raw("batch_size", "100")
        .raw("target_batch_ms", "100")
        .raw("max_batch_ms", "200")
        .raw("sleep_ms", "1000")
        .raw("parallelism", "1")
        .insert(db)
        .await;
    let port = common::free_port();
    let daemon = db
        .daemon()
        .max_batch(100)
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .spawn();
    db.wait_for(name, "two batches", |r| r.rows_changed >= 200)
        .await;
    (daemon, port)
}

/// Rewinds job `name` by its last batch, rows and checkpoint, as a crash before that batch's
/// asynchronous commit reached disk leaves them.
async fn lose_the_last_batch(db: &Db, name: &str) {
    db.exec(&format!(
        "DO $$ DECLARE c bigint; BEGIN
           SELECT (cursor->>0)::bigint INTO c FROM backfill.jobs WHERE name = '{name}' FOR UPDATE;
           UPDATE counters SET n = n - 1 WHERE id > c - 100 AND id <= c;
           UPDATE backfill.jobs SET cursor = jsonb_build_array((c - 100)::text),
                  rows_changed = rows_changed - 100, rows_scanned = rows_scanned - 100
           WHERE name = '{name}';
         END $$"
    ))
    .await;
}

/// The job finishes with every row changed once, counted once in the metrics (with `also`).
async fn assert_counted_once(
    db: &Db,
    (daemon, port): (&mut common::Daemon, u16),
    name: &str,
    also: &[&str],
) {
    db.wait_state(name, "succeeded").await;
    assert_exactly_once(db, name, 600).await;
    let (_, metrics) = common::http_get(port, "/metrics").await.expect("metrics");
    let also = also.iter().map(|s| s.to_string());
    for counted in [
        format!("backfilld_rows_changed_total{{job=\"{name}\"}} 600"),
        format!("backfilld_rows_scanned_total{{job=\"{name}\"}} 600"),
    ]
    .into_iter()
    .chain(also)
    {
        assert!(metrics.contains(&counted), "{counted} in\n{metrics}");
    }
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(30)).await.success());
}

/// A batch lost to a crash after the daemon saw it commit (asynchronous commit) is redone, and
/// counted once in `backfilld_rows_changed_total`: it had been counted at its first commit and
/// again at its redo (107,597 for 100,000 rows after three crashes in the report).
#[sqlx::test]
async fn a_lost_batch_is_counted_once_in_the_metrics(pool: PgPool) {
    let db = Db::new(pool).await;
    let (mut daemon, port) = counting_job_past_two_batches(&db, "lostm").await;
    lose_the_last_batch(&db, "lostm").await;
    let lost = "backfilld_batch_errors_total{job=\"lostm\",kind=\"lost_commit\"} 1";
    assert_counted_once(&db, (&mut daemon, port), "lostm", &[lost]).await;
}

/// The same loss, seen only as a reloaded cursor: the batch after it fails on a row lock before
/// its checkpoint, so no `CheckpointMoved` says so, and the retry resumes from the stored cursor,
/// behind the batches counted. Those are credited all the same.
#[sqlx::test]
async fn a_lost_batch_found_on_a_retry_is_counted_once(pool: PgPool) {
    let db = Db::new(pool).await;
    let (mut daemon, port) = counting_job_past_two_batches(&db, "lostr").await;
    // A row of the next window, locked: that batch fails before its checkpoint.
    let held = db
        .hold(
            "SELECT 1 FROM counters WHERE id = (SELECT (cursor->>0)::bigint + 50
             FROM backfill.jobs WHERE name = 'lostr') FOR UPDATE",
        )
        .await;
    lose_the_last_batch(&db, "lostr").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    held.commit().await;
    assert_counted_once(&db, (&mut daemon, port), "lostr", &[]).await;
    assert!(daemon.log().contains("55P03"), "{}", daemon.log());
}
