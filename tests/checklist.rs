//! The data-change checklist in the plan: the idempotency verdict, and deletes that would cascade.

mod common;

use common::{Db, NewJob};
use sqlx::PgPool;

#[sqlx::test]
async fn the_plan_says_whether_a_second_run_would_change_rows_again(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE items (id bigint PRIMARY KEY, status text, n int NOT NULL DEFAULT 0);
         INSERT INTO items (id) SELECT g FROM generate_series(1, 500) g;",
    )
    .await;
    let before = db.checksum("items", "id", "false").await;
    NewJob::new("once", "items")
        .predicate("status IS NULL")
        .set("status = 'done'")
        .raw("mode", "'dry_run'")
        .insert(&db)
        .await;
    NewJob::new("again", "items")
        .predicate("n < 100")
        .set("n = n + 1")
        .raw("mode", "'dry_run'")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let verdict = |name: &'static str| {
        let db = &db;
        async move {
            let job = db.job(name).await;
            assert_eq!(job.state, "planned", "{name}: {:?}", job.last_error);
            job.plan.expect("a plan")["idempotency"].clone()
        }
    };
    let once = verdict("once").await;
    assert_eq!(once["idempotent"], true, "{once}");
    assert_eq!(once["still_selected"], 0);
    let again = verdict("again").await;
    assert_eq!(again["idempotent"], false, "{again}");
    let summary = again["summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains("still selects") && summary.contains("not idempotent"),
        "{summary}"
    );
    assert_eq!(
        db.checksum("items", "id", "false").await,
        before,
        "the check's changes were rolled back"
    );
}

async fn family(db: &Db) {
    db.exec(
        "CREATE TABLE parent (id bigint PRIMARY KEY, kind text NOT NULL);
         CREATE TABLE child (id bigint PRIMARY KEY,
                             parent_id bigint REFERENCES parent (id) ON DELETE CASCADE);
         CREATE TABLE note (id bigint PRIMARY KEY,
                            parent_id bigint REFERENCES parent (id) ON DELETE SET NULL);
         CREATE TABLE audit (id bigint PRIMARY KEY, parent_id bigint REFERENCES parent (id));
         INSERT INTO parent SELECT g, CASE WHEN g <= 10 THEN 'old' ELSE 'new' END
         FROM generate_series(1, 100) g;
         INSERT INTO child SELECT g, 1 + g % 100 FROM generate_series(1, 300) g;
         INSERT INTO note SELECT g, 1 + g % 20 FROM generate_series(1, 40) g;",
    )
    .await;
}

#[sqlx::test]
async fn a_delete_that_would_cascade_fails_in_its_plan(pool: PgPool) {
    let db = Db::new(pool).await;
    family(&db).await;
    NewJob::new("purge", "parent")
        .predicate("kind = 'old'")
        .raw("action", "'delete'")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("purge").await;
    assert_eq!(job.state, "failed");
    let err = job.last_error.unwrap_or_default();
    for want in [
        "job purge",
        "public.parent",
        "child_parent_id_fkey on public.child (ON DELETE CASCADE, 30 child rows)",
        "note_parent_id_fkey on public.note (ON DELETE SET NULL, 20 child rows)",
        "allow_cascade",
    ] {
        assert!(err.contains(want), "expected {want:?} in: {err}");
    }
    assert!(
        !err.contains("audit"),
        "a plain foreign key changes no child row: {err}"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM parent").await, 100);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM child").await, 300);
}

#[sqlx::test]
async fn allow_cascade_runs_the_delete_and_the_plan_still_lists_the_children(pool: PgPool) {
    let db = Db::new(pool).await;
    family(&db).await;
    NewJob::new("purge", "parent")
        .predicate("kind = 'old'")
        .raw("action", "'delete'")
        .raw("allow_cascade", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("purge").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!(job.rows_changed, 10);
    let cascades = job.plan.expect("a plan")["cascades"].clone();
    assert_eq!(cascades.as_array().map(Vec::len), Some(2), "{cascades}");
    assert_eq!(cascades[0]["child_rows"], 30, "{cascades}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM child").await, 270);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM note WHERE parent_id IS NULL")
            .await,
        20
    );
}

/// `now()` moves with every batch transaction; `backfill.job_started_at(name)` is one instant for
/// the whole job, across batches and attempts.
#[sqlx::test]
async fn job_started_at_is_one_instant_for_the_whole_job(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE stamps (id bigint PRIMARY KEY, at timestamptz, batch_now timestamptz);
         INSERT INTO stamps (id) SELECT g FROM generate_series(1, 600) g;",
    )
    .await;
    NewJob::new("stamp", "stamps")
        .predicate("at IS NULL")
        .set("at = backfill.job_started_at('stamp'), batch_now = now()")
        .raw("batch_size", "50")
        .raw("sleep_ms", "5")
        .insert(&db)
        .await;
    db.daemon()
        .max_batch(50)
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    let job = db.job("stamp").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!(
        db.scalar_i64("SELECT count(DISTINCT at) FROM stamps").await,
        1,
        "one frozen instant"
    );
    assert!(
        db.scalar_i64("SELECT count(DISTINCT batch_now) FROM stamps")
            .await
            > 1,
        "now() moved between batches"
    );
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM stamps s JOIN backfill.jobs j ON j.name = 'stamp'
             WHERE s.at = j.started_at"
        )
        .await,
        600,
        "the instant is the job's started_at"
    );
}
