//! Wake-ups of an idle replica: at its default 2 s poll it costs at most one transaction per
//! second; with a poll of an hour, so that only a notification can wake it, it still picks new
//! jobs up, also after its LISTEN backend is terminated and after the server restarts (the
//! restart needs the suite's pg_virtualenv cluster; against another server the test says so and
//! stops after the terminated backend). Pickup times are printed, not asserted: bench/pickup
//! measures them.
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Db, NewJob, free_port, http_get, metric, wait_until};
use sqlx::{PgConnection, PgPool};

/// Inserts `n` jobs one after another and waits for each to succeed; returns the milliseconds
/// from each insert to its claim (server clock: `created_at` is the inserting transaction's
/// start, `started_at` the claim's), for the log.
async fn pickups(db: &Db, round: &str, n: usize) -> Vec<f64> {
    let mut ms = Vec::new();
    for i in 0..n {
        let name = format!("{round}{i}");
        NewJob::new(&name, "t")
            .predicate("v IS NULL")
            .set("v = 0")
            .insert(db)
            .await;
        db.wait_state(&name, "succeeded").await;
        let pickup: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM started_at - created_at)::float8 * 1000
             FROM backfill.jobs WHERE name = $1",
        )
        .bind(&name)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        ms.push(pickup);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    ms
}

async fn scrape(port: u16) -> String {
    http_get(port, "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default()
}

/// Waits until the replica LISTENs again after `reconnects` re-established connections.
async fn wait_listening(db: &Db, port: u16, reconnects: f64) {
    wait_until(
        "LISTEN to be re-established",
        || db.daemon_logs(),
        async || {
            let body = scrape(port).await;
            metric(&body, "backfilld_listen_connected") == Some(1.0)
                && metric(&body, "backfilld_listen_reconnects_total") >= Some(reconnects)
        },
    )
    .await;
}

/// Transactions committed or rolled back in this database, and how many autovacuum and
/// autoanalyze runs its tables (catalogs included) have had: autovacuum's transactions count in
/// the same statistics, so a window in which it ran says nothing about the replica.
async fn counters(conn: &mut PgConnection) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT xact_commit + xact_rollback FROM pg_stat_database
                 WHERE datname = current_database()),
                (SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0)::int8
                 FROM pg_stat_all_tables)",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

/// Leaves autovacuum nothing due in this database: ANALYZE rewrites pg_statistic, so its
/// statistics are flushed (a backend flushes at most once a second) before VACUUM runs.
async fn settle_autovacuum(conn: &mut PgConnection) {
    for sql in ["ANALYZE", "SELECT pg_stat_force_next_flush()", "VACUUM"] {
        sqlx::raw_sql(sql).execute(&mut *conn).await.unwrap();
    }
}

/// The replica's transactions per second over a 20 s window (statistics are flushed at most once
/// a second, hence the long window), measured from one held connection: a new connection's
/// start-up is a transaction too. Autovacuum is left nothing due first; a window it still ran in
/// is measured again, at most three times.
async fn idle_rate(db: &Db) -> f64 {
    let mut conn = db.pool.acquire().await.unwrap().detach();
    settle_autovacuum(&mut conn).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (t0, (x0, a0)) = (Instant::now(), counters(&mut conn).await);
        sqlx::raw_sql("SELECT pg_stat_force_next_flush()")
            .execute(&mut conn)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        let (secs, (x1, a1)) = (t0.elapsed().as_secs_f64(), counters(&mut conn).await);
        if a1 != a0 {
            println!(
                "idle: autovacuum ran {} time(s) in the window; measuring again",
                a1 - a0
            );
            continue;
        }
        let own = x1 - x0 - 2; // less the measuring connection's two
        println!(
            "idle: {own} transactions in {secs:.1} s = {:.2}/s",
            own as f64 / secs
        );
        return own as f64 / secs;
    }
    panic!("autovacuum ran in every idle window; cannot measure the replica alone");
}

#[sqlx::test]
async fn idle_replica_is_quiet_and_woken_by_notifications_through_backend_loss_and_restart(
    pool: PgPool,
) {
    let db = Db::new(pool).await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, v int); INSERT INTO t VALUES (1, 1);")
        .await;

    // Idle cost at the default poll.
    let port = free_port();
    let mut polling = db
        .daemon()
        .env("BACKFILLD_WORKER__POLL_INTERVAL", "2s")
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .spawn();
    wait_listening(&db, port, 0.0).await;
    let per_second = idle_rate(&db).await;
    assert!(
        per_second <= 1.0,
        "idle replica: {per_second:.2} transactions/s"
    );
    polling.signal("TERM");
    polling.wait_ok().await;

    // From here the poll never comes within the test: every pickup is a wake-up.
    let port = free_port();
    let _daemon = db
        .daemon()
        .env("BACKFILLD_WORKER__POLL_INTERVAL", "1h")
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{port}"))
        .spawn();
    wait_listening(&db, port, 0.0).await;
    println!("pickup ms, listening: {:?}", pickups(&db, "fresh", 5).await);

    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(terminated, 1, "one LISTEN backend");
    wait_listening(&db, port, 1.0).await;
    let after_loss = pickups(&db, "loss", 5).await;
    println!("pickup ms after the LISTEN backend was terminated: {after_loss:?}");

    let Some((version, cluster)) = suite_cluster() else {
        println!("not the suite's pg_virtualenv cluster: server restart not tested");
        return;
    };
    // Stop, then start: `pg_ctlcluster restart` skips the stop when its probe of the socket
    // fails on a loaded machine, and then refuses to start ("Cluster is already running").
    for action in ["stop", "start"] {
        let done = Command::new("pg_ctlcluster")
            .args([&version, &cluster, action, "-m", "fast"])
            .status()
            .expect("pg_ctlcluster");
        assert!(done.success(), "pg_ctlcluster {version} {cluster} {action}");
    }
    wait_listening(&db, port, 2.0).await;
    let after_restart = pickups(&db, "restart", 5).await;
    println!("pickup ms after the server restarted: {after_restart:?}");
}

/// Version and name of the cluster pg_virtualenv started for the suite, if that is where the
/// tests run (it exports PG_CLUSTER_CONF_ROOT for its temporary cluster).
fn suite_cluster() -> Option<(String, String)> {
    std::env::var_os("PG_CLUSTER_CONF_ROOT")?;
    let out = Command::new("pg_lsclusters").arg("-h").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.lines().next()?.split_whitespace();
    Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
}
