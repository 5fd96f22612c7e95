//! Live traffic and several replicas.
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler

mod common;

use std::time::Duration;

use common::{Db, NewJob};
use sqlx::PgPool;

#[sqlx::test]
async fn concurrent_writes_are_never_clobbered(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE orders (id bigint PRIMARY KEY, status text);
         INSERT INTO orders SELECT g, NULL FROM generate_series(1, 30000) g;
         CREATE TABLE paid_by_app (id bigint PRIMARY KEY);",
    )
    .await;
    NewJob::new("status", "orders")
        .predicate("status IS NULL")
        .set("status = 'pending'")
        .raw("batch_size", "300")
        .insert(&db)
        .await;
    let mut daemon = db.daemon().max_batch(300).until_idle().spawn();
    // The application marks random orders paid while the backfill runs; bounded loop.
    let writer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            for _ in 0..600 {
                let id = fastrand::i64(1..=30000);
                sqlx::raw_sql(&format!(
                    "BEGIN; UPDATE orders SET status = 'paid' WHERE id = {id};
                     INSERT INTO paid_by_app VALUES ({id}) ON CONFLICT DO NOTHING; COMMIT;"
                ))
                .execute(&pool)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    writer.await.unwrap();
    daemon.wait_ok().await;
    let job = db.job("status").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    let clobbered = db
        .scalar_i64(
            "SELECT count(*) FROM orders JOIN paid_by_app USING (id) WHERE status <> 'paid'",
        )
        .await;
    assert_eq!(clobbered, 0, "a 'paid' row was overwritten by the backfill");
    assert!(db.scalar_i64("SELECT count(*) FROM paid_by_app").await > 100);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE status IS NULL")
            .await,
        0
    );
    let pending = db
        .scalar_i64("SELECT count(*) FROM orders WHERE status = 'pending'")
        .await;
    let paid = db
        .scalar_i64("SELECT count(*) FROM orders WHERE status = 'paid'")
        .await;
    // Rows still 'pending' were set by the job; 'paid' ones may have been set first and then
    // (legitimately) overwritten by the application.
    assert!(
        job.rows_changed >= pending && job.rows_changed <= pending + paid,
        "rows_changed {} outside [{pending}, {}]",
        job.rows_changed,
        pending + paid
    );
}

#[sqlx::test]
async fn three_replicas_run_ten_jobs_each_exactly_once(pool: PgPool) {
    let db = Db::new(pool).await;
    for j in 0..10 {
        db.exec(&format!(
            "CREATE TABLE t{j} (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, by_replica text);
             INSERT INTO t{j} SELECT g FROM generate_series(1, 3000) g;"
        ))
        .await;
        NewJob::new(&format!("job{j}"), &format!("t{j}"))
            .predicate("true")
            .set("n = n + 1, by_replica = current_setting('application_name')")
            .raw("batch_size", "150")
            .raw("sleep_ms", "5")
            .insert(&db)
            .await;
    }
    let mut replicas: Vec<_> = (0..3)
        .map(|r| {
            db.daemon()
                .max_batch(150)
                .env(
                    "BACKFILLD_DATABASE__APPLICATION_NAME",
                    &format!("replica{r}"),
                )
                .env("BACKFILLD_WORKER__CONCURRENCY", "2")
                .until_idle()
                .spawn()
        })
        .collect();
    for r in &mut replicas {
        r.wait_ok().await;
    }
    let mut used = std::collections::HashSet::new();
    for j in 0..10 {
        let job = db.job(&format!("job{j}")).await;
        assert_eq!(job.state, "succeeded", "job{j}: {:?}", job.last_error);
        assert_eq!(job.attempt, 1, "job{j} was claimed more than once");
        assert_eq!(job.rows_changed, 3000, "job{j}");
        let bad = db
            .scalar_i64(&format!("SELECT count(*) FROM t{j} WHERE n <> 1"))
            .await;
        assert_eq!(bad, 0, "job{j}: rows not changed exactly once");
        let by: Vec<String> = sqlx::query_scalar(&format!("SELECT DISTINCT by_replica FROM t{j}"))
            .fetch_all(&db.pool)
            .await
            .unwrap();
        assert_eq!(by.len(), 1, "job{j} was run by several replicas: {by:?}");
        used.insert(by[0].clone());
    }
    assert!(
        used.len() >= 2,
        "work should spread over replicas: {used:?}"
    );
}

/// A job's preparation held a pooled connection while it stored the frozen upper bound on a
/// second one. Jobs starting together (or one job beside the LISTEN connection, as here) each
/// held one and waited for the pool's last until `connect_timeout`: with leases shorter than
/// that, other replicas took the jobs over, attempt after attempt, until they failed having
/// changed nothing. The smallest pool the configuration accepts (one more connection than
/// `worker.concurrency`) now runs a job in one attempt.
#[sqlx::test]
async fn a_job_runs_on_the_smallest_pool_the_configuration_accepts(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 2000) g;",
    )
    .await;
    NewJob::new("small_pool", "items")
        .predicate("n = 0")
        .set("n = n + 1")
        .raw("archive", "true")
        .insert(&db)
        .await;
    let small = || {
        db.daemon()
            .env("BACKFILLD_DATABASE__MAX_CONNECTIONS", "2")
            .env("BACKFILLD_WORKER__CONCURRENCY", "1")
            .env("BACKFILLD_DATABASE__CONNECT_TIMEOUT", "2s")
            .until_idle()
            .spawn()
    };
    let mut daemon = small();
    daemon.wait_ok().await;
    let job = db.job("small_pool").await;
    assert_eq!(
        (job.state.as_str(), job.attempt, job.rows_changed),
        ("succeeded", 1, 2000),
        "{:?}\n{}",
        job.last_error,
        daemon.log()
    );
    assert!(!daemon.log().contains("pool timed out"), "{}", daemon.log());
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n <> 1")
            .await,
        0
    );

    let revert = backfilld::ops::revert(&db.lib, &db.names, "small_pool", false)
        .await
        .expect("revert");
    let mut daemon = small();
    daemon.wait_ok().await;
    let reverted = db.job(&revert.name).await;
    assert_eq!(
        (
            reverted.state.as_str(),
            reverted.attempt,
            reverted.rows_changed
        ),
        ("succeeded", 1, 2000),
        "{:?}\n{}",
        reverted.last_error,
        daemon.log()
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n <> 0")
            .await,
        0
    );
}
