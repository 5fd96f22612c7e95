//! Safety: dry-run plans, the affected-rows ceiling, archive + revert round trips, and hostile or
//! malformed job rows.
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler

mod common;

use common::{Db, NewJob};
use sqlx::PgPool;
use std::time::Duration;

async fn orders(db: &Db, rows: i64) {
    db.exec(&format!(
        "CREATE TABLE orders (id bigint PRIMARY KEY, status text, amount numeric(12,2), note text);
         INSERT INTO orders SELECT g, CASE WHEN g % 4 = 0 THEN 'paid' END, g * 1.25, 'n' || g
         FROM generate_series(1, {rows}) g;"
    ))
    .await;
}

#[sqlx::test]
async fn dry_run_plans_without_changing_rows_then_execute_changes_exactly_that_many(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 4000).await;
    let before = db.checksum("orders", "id", "false").await;
    // No mode column: dry run is the default.
    NewJob::new("dry", "orders")
        .raw("mode", "DEFAULT")
        .predicate("status IS NULL")
        .set("status = 'pending', amount = amount * 2")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let planned = db.job("dry").await;
    assert_eq!(planned.state, "planned", "{:?}", planned.last_error);
    assert_eq!(
        db.checksum("orders", "id", "false").await,
        before,
        "a dry run changed data"
    );
    let plan = planned.plan.clone().expect("plan");
    assert_eq!(plan["rows_matching"], 3000, "exact count");
    assert_eq!(plan["rows_in_range"], 4000);
    let samples = plan["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), 10);
    assert_eq!(samples[0]["key"], serde_json::json!(["1"]));
    assert_eq!(samples[0]["before"]["status"], serde_json::Value::Null);
    assert_eq!(samples[0]["after"]["status"], "pending");
    assert_eq!(samples[0]["after"]["amount"], 2.5);
    assert!(
        plan["explain"].to_string().contains("Plan"),
        "{}",
        plan["explain"]
    );
    assert!(plan["estimated_seconds"].as_f64().unwrap() > 0.0);

    let approve = backfilld::ops::approve(&db.lib, &db.names, "dry")
        .await
        .unwrap();
    assert_eq!(approve.mode.as_deref(), Some("execute"));
    db.daemon().until_idle().spawn().wait_ok().await;
    let done = db.job("dry").await;
    assert_eq!(done.state, "succeeded", "{:?}", done.last_error);
    assert_eq!(done.rows_changed, 3000);
    assert_eq!(done.remaining, Some(0));
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE status = 'pending'")
            .await,
        3000
    );
}

#[sqlx::test]
async fn the_estimate_scales_a_rolled_back_trial_of_the_first_windows(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 2000).await;
    // Every row written costs at least 2 ms, and leaves a row in `calls` that only a commit keeps.
    db.exec(
        "CREATE TABLE calls (id bigint);
         CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.002); INSERT INTO calls VALUES (NEW.id); RETURN NEW; END $$;
         CREATE TRIGGER slow BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION slow();",
    )
    .await;
    let before = db.checksum("orders", "id", "false").await;
    NewJob::new("trial", "orders")
        .raw("mode", "DEFAULT")
        .predicate("status IS NULL")
        .set("status = 'pending'")
        .raw("batch_size", "20")
        .raw("target_batch_ms", "200")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    // The same change where the first window cannot finish within the batch ceiling (40 ms);
    // planned after the first, whose trial would hold the same rows.
    NewJob::new("trial_slow", "orders")
        .raw("mode", "DEFAULT")
        .predicate("status IS NULL")
        .set("status = 'pending'")
        .raw("batch_size", "100")
        .raw("target_batch_ms", "20")
        .raw("max_batch_ms", "40")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;

    let planned = db.job("trial").await;
    assert_eq!(planned.state, "planned", "{:?}", planned.last_error);
    let plan = planned.plan.expect("plan");
    // Keys 1..20 first, of which 15 have no status (every 4th is paid): over 30 ms, so more
    // windows follow, each sized from the last one's speed (at most 8 times as many keys) until
    // one takes half the 200 ms target: the walk's first keys, three of four changed.
    let trial = &plan["trial"];
    let windows: Vec<i64> = trial["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .map(|w| w["keys"].as_i64().unwrap())
        .collect();
    assert!((2..=4).contains(&windows.len()), "{trial}");
    assert_eq!(windows[0], 20, "{trial}");
    assert!(
        windows.windows(2).all(|w| w[1] >= w[0] && w[1] <= 8 * w[0]),
        "{trial}"
    );
    let keys: i64 = windows.iter().sum();
    assert_eq!(trial["keys"].as_i64(), Some(keys), "{trial}");
    let changed = trial["changed"].as_i64().unwrap();
    assert_eq!(changed, keys - keys / 4, "{trial}");
    assert_eq!(trial["timed_out"], false);
    // 1,500 rows to change at over 2 ms each: over 3 s. Batches of max_size keys at the target
    // (the estimate without a trial) would say 0.2 s.
    let secs = plan["estimated_seconds"].as_f64().unwrap();
    let basis = plan["estimate_basis"].as_str().unwrap();
    assert!((3.0..120.0).contains(&secs), "{secs} s: {basis}");
    assert!(
        basis.contains(&format!(
            "trial write of the walk's first {keys} keys in {} windows",
            windows.len()
        )),
        "{basis}"
    );

    let slow = db.job("trial_slow").await;
    assert_eq!(slow.state, "planned", "{:?}", slow.last_error);
    let plan = slow.plan.expect("plan");
    assert_eq!(plan["trial"]["timed_out"], true, "{}", plan["trial"]);
    let basis = plan["estimate_basis"].as_str().unwrap();
    assert!(basis.starts_with("at least"), "{basis}");

    // Nothing changed and nothing was left behind: rows, the trigger's writes, archive tables.
    assert_eq!(db.checksum("orders", "id", "false").await, before);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM calls").await, 0);
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'backfill' AND tablename LIKE 'trial%'"
        )
        .await,
        0
    );
}

#[sqlx::test]
async fn a_plan_over_the_ceiling_fails_before_any_change(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 2000).await;
    NewJob::new("too_many", "orders")
        .predicate("status IS NULL")
        .set("status = 'x'")
        .raw("max_affected", "1000")
        .insert(&db)
        .await;
    // A dry run fails on it too, with its plan kept, rather than awaiting an approval that
    // could only fail.
    NewJob::new("too_many_dry", "orders")
        .predicate("status IS NULL")
        .set("status = 'x'")
        .raw("max_affected", "1000")
        .text("mode", "dry_run")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    for name in ["too_many", "too_many_dry"] {
        let job = db.job(name).await;
        assert_eq!(job.state, "failed", "{name}");
        let err = job.last_error.unwrap();
        assert!(
            err.contains("1500")
                && err.contains("1000")
                && err.contains(name)
                && err.contains("(nothing changed)"),
            "{err}"
        );
    }
    let dry = db.job("too_many_dry").await;
    assert_eq!(dry.plan.expect("its plan")["rows_matching"], 1500);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE status = 'x'")
            .await,
        0
    );
}

#[sqlx::test]
async fn live_growth_past_the_ceiling_stops_the_job(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 3000).await;
    // 2250 rows match at plan time; the ceiling leaves a margin of 100.
    NewJob::new("grows", "orders")
        .predicate("status IS NULL")
        .set("status = 'pending'")
        .raw("max_affected", "2350")
        .raw("batch_size", "50")
        .raw("sleep_ms", "30")
        .insert(&db)
        .await;
    let mut daemon = db.daemon().max_batch(50).until_idle().spawn();
    db.wait_for("grows", "batches", |r| r.batches >= 2).await;
    // Live traffic makes 750 more rows match, ahead of the cursor.
    db.exec("UPDATE orders SET status = NULL WHERE status = 'paid' AND id > 1500")
        .await;
    db.exec("UPDATE orders SET status = NULL WHERE status = 'paid'")
        .await;
    daemon.wait_ok().await;
    let job = db.job("grows").await;
    assert_eq!(job.state, "failed", "{job:?}");
    assert!(
        job.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("ceiling"),
        "{:?}",
        job.last_error
    );
    assert!(
        job.rows_changed <= 2350,
        "committed past the ceiling: {}",
        job.rows_changed
    );
    let pending = db
        .scalar_i64("SELECT count(*) FROM orders WHERE status = 'pending'")
        .await;
    assert_eq!(
        pending, job.rows_changed,
        "the batch that would pass the ceiling rolled back"
    );
    // The message tells what stayed from what would have been.
    let committed = format!(
        "({} changed and committed; the batch that would pass it rolled back)",
        job.rows_changed
    );
    let error = job.last_error.unwrap_or_default();
    assert!(error.contains(&committed), "{error}");
}

/// Archives are append-only until a revert prepares them, so autovacuum stays off them (and off
/// their TOAST table) while the job runs.
async fn assert_no_autovacuum(db: &Db, archive: &str) {
    let options = db
        .scalar_text(&format!(
            "SELECT concat_ws(' / ', array_to_string(c.reloptions, ','), array_to_string(t.reloptions, ','))
             FROM pg_class c LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
             WHERE c.oid = 'backfill.\"{archive}\"'::regclass"
        ))
        .await;
    assert_eq!(
        options, "autovacuum_enabled=false / autovacuum_enabled=false",
        "{archive}"
    );
}

/// "Changed since" is decided per type: the exact types (integers, timestamps, uuid, bytea,
/// booleans) by `=`, the others by their text, since `=` calls 1.5 and 1.50, 0 and -0, or
/// '1 day' and '24 hours' the same value. Each row below is changed after the backfill in one
/// column, to a value `=` may or may not call equal; every one must be skipped, and a row
/// written again with its own values restored.
#[sqlx::test]
async fn a_revert_skips_values_equal_but_not_identical_to_the_after_image(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE m (id int PRIMARY KEY, n bigint, p numeric, f float8, d interval,
                         t timestamptz, u uuid, b bytea, ok boolean, done boolean);
         INSERT INTO m (id) SELECT generate_series(1, 20);",
    )
    .await;
    NewJob::new("mixed", "m")
        .predicate("done IS NULL")
        .set(
            "n = id * 10, p = 1.5, f = 0, d = interval '1 day', \
             t = timestamptz '2024-01-01 00:00:00+00', \
             u = '00000000-0000-0000-0000-000000000001', b = '\\x01', ok = true, done = true",
        )
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("mixed").await.rows_changed, 20);
    db.exec(
        "UPDATE m SET n = n + 1 WHERE id = 1;
         UPDATE m SET p = 1.50 WHERE id = 2;
         UPDATE m SET f = '-0' WHERE id = 3;
         UPDATE m SET d = interval '24 hours' WHERE id = 4;
         UPDATE m SET t = t + interval '1 microsecond' WHERE id = 5;
         UPDATE m SET u = '00000000-0000-0000-0000-000000000002' WHERE id = 6;
         UPDATE m SET b = '\\x0100' WHERE id = 7;
         UPDATE m SET ok = false WHERE id = 8;
         UPDATE m SET n = n, p = p, f = f, d = d, t = t, u = u, b = b, ok = ok WHERE id = 9;",
    )
    .await;

    let reverted = db.revert("mixed").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (12, 8));
    assert_eq!(
        db.scalar_text("SELECT string_agg(id::text, ',' ORDER BY id) FROM m WHERE done")
            .await,
        "1,2,3,4,5,6,7,8",
        "every row changed since keeps its values"
    );
}

#[sqlx::test]
async fn archive_and_revert_restore_an_update_except_rows_changed_since(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 5000).await;
    let before = db.checksum("orders", "id", "id IN (7, 11, 13)").await;
    NewJob::new("upd", "orders")
        .predicate("status IS NULL")
        .set("status = 'pending', note = upper(note) || '!'")
        .raw("archive", "true")
        .raw("batch_size", "333")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("upd").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    let archive = job.archive_table.clone().expect("archive table");
    assert!(
        archive.starts_with("upd_") && archive.ends_with(&format!("_j{}", job.id)),
        "{archive}"
    );
    assert_eq!(
        db.scalar_i64(&format!("SELECT count(*) FROM backfill.\"{archive}\""))
            .await,
        3750
    );
    assert_no_autovacuum(&db, &archive).await;
    assert_ne!(
        db.checksum("orders", "id", "id IN (7, 11, 13)").await,
        before
    );
    // The application changes three backfilled rows again before the revert.
    db.exec("UPDATE orders SET status = 'shipped' WHERE id IN (7, 11); UPDATE orders SET note = 'edited' WHERE id = 13").await;

    let reverted = db.revert("upd").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(reverted.rows_changed, 3747);
    assert_eq!(
        reverted.rows_skipped, 3,
        "rows changed since the backfill are skipped and counted"
    );
    assert_eq!(
        db.checksum("orders", "id", "id IN (7, 11, 13)").await,
        before,
        "byte-for-byte restore"
    );
    assert_eq!(
        db.scalar_text("SELECT status FROM orders WHERE id = 7")
            .await,
        "shipped"
    );
    assert_eq!(
        db.scalar_text("SELECT note FROM orders WHERE id = 13")
            .await,
        "edited"
    );
}

/// A second `revert` while one is queued (or after one succeeded) is refused, naming it; after a
/// cancelled revert a new one runs and restores what is left.
#[sqlx::test]
async fn a_job_is_reverted_once_unless_its_revert_was_cancelled(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 1000).await;
    NewJob::new("once", "orders")
        .predicate("status IS NULL")
        .set("status = 'pending'")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let refused = |e: backfilld::error::Error| e.to_string();
    let first = backfilld::ops::revert(&db.lib, &db.names, "once", false)
        .await
        .unwrap();
    assert_eq!(first.name, "once__revert");
    let again = backfilld::ops::revert(&db.lib, &db.names, "once", false)
        .await
        .map_err(refused)
        .unwrap_err();
    assert_eq!(again, "job once: once__revert is reverting it (pending)");
    db.exec("UPDATE backfill.jobs SET state = 'cancelled' WHERE name = 'once__revert'")
        .await;
    let second = backfilld::ops::revert(&db.lib, &db.names, "once", false)
        .await
        .unwrap();
    assert_eq!(second.name, "once__revert2");
    db.daemon().until_idle().spawn().wait_ok().await;
    let done = db.job("once__revert2").await;
    assert_eq!(done.state, "succeeded", "{:?}", done.last_error);
    assert_eq!(done.rows_changed, 750);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE status = 'pending'")
            .await,
        0
    );
    let third = backfilld::ops::revert(&db.lib, &db.names, "once", false)
        .await
        .map_err(refused)
        .unwrap_err();
    assert_eq!(third, "job once: once__revert2 already reverted it");
    let of_a_revert = backfilld::ops::revert(&db.lib, &db.names, "once__revert2", false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        of_a_revert.contains("it is a revert (of once) and keeps no archive"),
        "{of_a_revert}"
    );
}

/// `revert` checked the job's archive before taking its row lock: a revert asked for while the
/// retention sweep dropped the expired archive (holding that lock) was queued, and could only
/// fail. Here a transaction standing in for the sweep clears `archive_table` under the lock.
/// The revert of an archiving job that changed nothing (its table was empty) says so: it said
/// "archive was off, it never ran, or the archive expired", none of which was true.
#[sqlx::test]
async fn a_revert_of_a_job_that_changed_nothing_says_so(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 0).await;
    NewJob::new("nothing", "orders")
        .predicate("status IS NULL")
        .set("status = 'pending'")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("nothing").await.state, "succeeded");
    let refused = backfilld::ops::revert(&db.lib, &db.names, "nothing", false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("it changed no rows (succeeded, 0 rows changed)"),
        "{refused}"
    );
}

#[sqlx::test]
async fn a_revert_asked_for_while_the_archive_expires_is_refused(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 100).await;
    NewJob::new("expiring", "orders")
        .predicate("status IS NULL")
        .set("status = 'pending'")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let sweep = db
        .hold("UPDATE backfill.jobs SET archive_table = NULL WHERE name = 'expiring'")
        .await;
    let (lib, names) = (db.lib.clone(), db.names.clone());
    let asked =
        tokio::spawn(async move { backfilld::ops::revert(&lib, &names, "expiring", false).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    sweep.commit().await;
    let refused = asked.await.unwrap().unwrap_err().to_string();
    assert!(refused.contains("it has no archive"), "{refused}");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM backfill.jobs WHERE reverts = 'expiring'")
            .await,
        0
    );
}

/// A fast-lane job leaves a dead version of every row it changed (no bloat guard); the revert
/// VACUUMs them away before restoring, so the restored versions take their space instead of
/// growing the heap again.
#[sqlx::test]
async fn a_revert_restores_into_the_space_the_reverted_job_left(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE wide (id bigint PRIMARY KEY, payload text NOT NULL, v bigint)
             WITH (autovacuum_enabled = false);
         INSERT INTO wide (id, payload) SELECT g, repeat('x', 60) FROM generate_series(1, 20000) g;",
    )
    .await;
    db.exec("VACUUM ANALYZE wide").await;
    NewJob::new("fill", "wide")
        .predicate("v IS NULL")
        .set("v = id")
        .text("preset", "fast")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let size = "SELECT pg_table_size('wide')";
    let after_job = db.scalar_i64(size).await;
    let reverted = db.revert("fill").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(reverted.rows_changed, 20000);
    let after_revert = db.scalar_i64(size).await;
    assert!(
        after_revert <= after_job * 21 / 20,
        "the restored versions reused the reverted job's dead space: heap {after_job} -> {after_revert} bytes"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM wide WHERE v IS NOT NULL")
            .await,
        0
    );
}

#[sqlx::test]
async fn archive_and_revert_restore_a_delete(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 3000).await;
    db.exec("ALTER TABLE orders ADD COLUMN total numeric GENERATED ALWAYS AS (amount * 2) STORED")
        .await;
    let before = db.checksum("orders", "id", "id = 8").await;
    NewJob::new("purge", "orders")
        .raw("action", "'delete'")
        .predicate("status = 'paid'")
        .raw("archive", "true")
        .raw("max_affected", "750")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("purge").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!(job.rows_changed, 750);
    assert_eq!(job.remaining, Some(0));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM orders").await, 2250);
    assert_no_autovacuum(&db, job.archive_table.as_deref().expect("archive table")).await;
    // A row with a deleted key comes back before the revert: it must be left as it is.
    db.exec("INSERT INTO orders (id, status, amount, note) VALUES (8, 'new', 1, 'reborn')")
        .await;
    let reverted = db.revert("purge").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(reverted.rows_changed, 749);
    assert_eq!(reverted.rows_skipped, 1);
    assert_eq!(
        db.checksum("orders", "id", "id = 8").await,
        before,
        "byte-for-byte restore"
    );
    assert_eq!(
        db.scalar_text("SELECT note FROM orders WHERE id = 8").await,
        "reborn"
    );
}

/// The schema moves on after a delete: the next deploy adds a column and drops one. The revert
/// still puts the rows back: the new column takes its default, the dropped one is named in the
/// log (its values cannot go back), every other column is restored.
#[sqlx::test]
async fn a_delete_is_reverted_after_the_table_gained_and_lost_columns(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 1000).await;
    NewJob::new("purge_then_migrate", "orders")
        .raw("action", "'delete'")
        .predicate("status = 'paid'")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("purge_then_migrate").await.rows_changed, 250);
    db.exec(
        "ALTER TABLE orders ADD COLUMN region text NOT NULL DEFAULT 'eu';
         ALTER TABLE orders DROP COLUMN note;",
    )
    .await;
    let revert = backfilld::ops::revert(&db.lib, &db.names, "purge_then_migrate", false)
        .await
        .unwrap();
    let mut daemon = db.daemon().until_idle().spawn();
    daemon.wait_ok().await;
    let reverted = db.job(&revert.name).await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(reverted.rows_changed, 250);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM orders").await, 1000);
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM orders WHERE id % 4 = 0
             AND status = 'paid' AND amount = id * 1.25 AND region = 'eu'"
        )
        .await,
        250
    );
    let log = daemon.log();
    assert!(
        log.contains("no longer has these archived columns") && log.contains("note"),
        "{log}"
    );
}

/// Deletes the 500 members `predicate` selects from `target` (archived), then team 3's
/// remaining members and team 3 itself, then reverts the delete; returns the revert's row.
async fn delete_members_then_team_3_then_revert(
    db: &Db,
    target: &str,
    predicate: &str,
) -> backfilld::job::JobRow {
    NewJob::new("drop_members", target)
        .raw("action", "'delete'")
        .predicate(predicate)
        .raw("archive", "true")
        .insert(db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("drop_members").await.rows_changed, 500);
    db.exec("DELETE FROM member WHERE team_id = 3; DELETE FROM team WHERE id = 3;")
        .await;
    let reverted = db.revert("drop_members").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    reverted
}

/// A deleted row whose parent (through a foreign key) was deleted since cannot come back: the
/// revert skips and counts it, and restores the rest (the insert failed the batch with 23503
/// before, and every later revert at the same row).
#[sqlx::test]
async fn the_revert_of_a_delete_skips_rows_whose_parent_is_gone(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE team (id bigint PRIMARY KEY);
         CREATE TABLE member (id bigint PRIMARY KEY, team_id bigint REFERENCES team, note text);
         INSERT INTO team SELECT generate_series(1, 10);
         INSERT INTO member SELECT g, g % 10 + 1, 'm' || g FROM generate_series(1, 1000) g;
         UPDATE member SET team_id = NULL WHERE id % 100 = 0;",
    )
    .await;
    let reverted = delete_members_then_team_3_then_revert(&db, "member", "id % 2 = 0").await;
    // The deleted (even) members of team 3 are the ids ending in 2: 100 of them, skipped. The
    // ten with no team (ids ending in 00) come back with the other 390.
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (400, 100));
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM member WHERE id % 2 = 0 AND team_id IS NULL")
            .await,
        10
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM member WHERE id % 2 = 0")
            .await,
        400
    );
}

/// The same on a partition: its copy of the partitioned table's foreign key is found, and rows
/// whose parent is gone are skipped (the revert failed its first batch with 23503 before).
#[sqlx::test]
async fn the_revert_of_a_delete_on_a_partition_skips_rows_whose_parent_is_gone(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE team (id bigint PRIMARY KEY);
         CREATE TABLE member (id bigint, part int, team_id bigint REFERENCES team,
                              PRIMARY KEY (id, part)) PARTITION BY LIST (part);
         CREATE TABLE member_0 PARTITION OF member FOR VALUES IN (0);
         CREATE TABLE member_1 PARTITION OF member FOR VALUES IN (1);
         INSERT INTO team SELECT generate_series(1, 10);
         INSERT INTO member SELECT g, g % 2, g % 10 + 1 FROM generate_series(1, 1000) g;",
    )
    .await;
    let reverted = delete_members_then_team_3_then_revert(&db, "member_0", "true").await;
    // Team 3's even members are the ids ending in 2: 100 of them, skipped.
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (400, 100));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM member_0").await, 400);
}

/// A deleted row whose partition was detached since has nowhere to go: the revert skips and
/// counts it and restores the rest, in a two-level tree and under a default partition (the
/// insert failed the whole revert with 23514 before).
#[sqlx::test]
async fn the_revert_of_a_delete_skips_rows_whose_partition_is_gone(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE ev (id bigint, day int, kind int, PRIMARY KEY (id, day, kind))
             PARTITION BY RANGE (day);
         CREATE TABLE ev_1 PARTITION OF ev FOR VALUES FROM (1) TO (11);
         CREATE TABLE ev_2 PARTITION OF ev FOR VALUES FROM (11) TO (21) PARTITION BY LIST (kind);
         CREATE TABLE ev_2a PARTITION OF ev_2 FOR VALUES IN (0);
         CREATE TABLE ev_2b PARTITION OF ev_2 FOR VALUES IN (1);
         CREATE TABLE ev_3 PARTITION OF ev FOR VALUES FROM (21) TO (31);
         INSERT INTO ev SELECT g, g % 30 + 1, g % 2 FROM generate_series(1, 3000) g;",
    )
    .await;
    NewJob::new("purge_ev", "ev")
        .predicate("id % 3 = 0")
        .raw("action", "'delete'")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let purged = db.job("purge_ev").await;
    assert_eq!(purged.rows_changed, 1000, "{:?}", purged.last_error);
    let gone = |db: &Db, table: &'static str| {
        let sql = format!("SELECT count(*) FROM {table} WHERE id % 3 = 0");
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    // The deleted rows of ev_2b (days 11-20, kind 1) and of ev_3 (days 21-30) lose their
    // partition; ev_3's rows are still routable once a default partition takes them.
    db.exec(
        "ALTER TABLE ev_2 DETACH PARTITION ev_2b; DROP TABLE ev_2b;
         ALTER TABLE ev DETACH PARTITION ev_3; DROP TABLE ev_3;",
    )
    .await;
    let deleted_in_2b = db
        .scalar_i64(
            "SELECT count(*) FROM generate_series(1, 3000) g
             WHERE g % 3 = 0 AND g % 30 + 1 BETWEEN 11 AND 20 AND g % 2 = 1",
        )
        .await;
    let deleted_in_3 = db
        .scalar_i64(
            "SELECT count(*) FROM generate_series(1, 3000) g
             WHERE g % 3 = 0 AND g % 30 + 1 BETWEEN 21 AND 30",
        )
        .await;
    db.exec("CREATE TABLE ev_other PARTITION OF ev DEFAULT")
        .await;
    let reverted = db.revert("purge_ev").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(
        (reverted.rows_changed, reverted.rows_skipped),
        (1000 - deleted_in_2b, deleted_in_2b)
    );
    assert_eq!(gone(&db, "ev_other").await, deleted_in_3);
    assert_eq!(gone(&db, "ev").await, 1000 - deleted_in_2b);
}

/// A table with inheritance children is refused as a target (a statement on it changed the
/// children's rows too, and the revert of a delete put them back into the parent without their
/// own columns); a child table is a target like any other.
#[sqlx::test]
async fn a_table_with_inheritance_children_is_refused_and_its_children_are_not(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE events (id bigint PRIMARY KEY, kind text);
         CREATE TABLE events_2019 (extra text, PRIMARY KEY (id)) INHERITS (events);
         INSERT INTO events VALUES (1, 'old'), (2, 'new');
         INSERT INTO events_2019 VALUES (3, 'old', 'x'), (4, 'new', 'y');",
    )
    .await;
    for (name, table) in [("on_parent", "events"), ("on_child", "events_2019")] {
        NewJob::new(name, table)
            .raw("action", "'delete'")
            .predicate("kind = 'old'")
            .raw("archive", "true")
            .insert(&db)
            .await;
    }
    db.daemon().until_idle().spawn().wait_ok().await;
    let parent = db.job("on_parent").await;
    assert_eq!(parent.state, "failed");
    let err = parent.last_error.unwrap_or_default();
    assert!(
        err.contains("job on_parent")
            && err.contains("public.events has inheritance children (public.events_2019)"),
        "{err}"
    );
    let child = db.job("on_child").await;
    assert_eq!(child.state, "succeeded", "{:?}", child.last_error);
    assert_eq!(child.rows_changed, 1);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM events").await, 3);
    let reverted = db.revert("on_child").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(
        db.scalar_text("SELECT extra FROM events_2019 WHERE id = 3")
            .await,
        "x"
    );
}

/// SIGTERM while a revert builds its archive's index (minutes on a large archive; here it waits
/// on a lock): the build is cancelled server-side and the job handed back at once, not after it.
#[sqlx::test]
async fn sigterm_cancels_a_reverts_index_build(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 1000).await;
    NewJob::new("fill_notes", "orders")
        .predicate("status IS NULL")
        .set("status = 'none'")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let archive = db
        .job("fill_notes")
        .await
        .archive_table
        .expect("an archive");
    let _blocker = db
        .hold(&format!(
            "LOCK TABLE backfill.\"{archive}\" IN ROW EXCLUSIVE MODE"
        ))
        .await;
    let revert = backfilld::ops::revert(&db.lib, &db.names, "fill_notes", false)
        .await
        .unwrap();
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_BATCH__LOCK_TIMEOUT", "60s")
        .spawn();
    let waiting = "SELECT count(*) FROM pg_stat_activity
                   WHERE query LIKE 'CREATE UNIQUE INDEX%' AND wait_event_type = 'Lock'";
    common::wait_until(
        "the index build waiting",
        || daemon.log(),
        async || db.scalar_i64(waiting).await > 0,
    )
    .await;
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "{}", daemon.log());
    let job = db.job(&revert.name).await;
    assert_eq!(job.state, "pending", "handed back for another replica");
    assert_eq!(job.attempt, 0, "a graceful stop burns no attempt");
    assert_eq!(db.scalar_i64(waiting).await, 0, "no build left waiting");
}

/// A dry run changes nothing, even when its set clause calls a function that writes: the plan's
/// samples evaluate it (for the after-values) in a transaction that is rolled back.
#[sqlx::test]
async fn a_dry_run_commits_nothing_a_set_clause_function_writes(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 200).await;
    db.exec(
        "CREATE TABLE audit (id bigint);
         CREATE FUNCTION stamp(i bigint) RETURNS text LANGUAGE plpgsql AS
         $$ BEGIN INSERT INTO audit VALUES (i); RETURN 'stamped'; END $$;",
    )
    .await;
    NewJob::new("stamp_notes", "orders")
        .predicate("status IS NULL")
        .set("note = stamp(id), amount = DEFAULT")
        .raw("mode", "'dry_run'")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let planned = db.job("stamp_notes").await;
    assert_eq!(planned.state, "planned", "{:?}", planned.last_error);
    let sample = &planned.plan.clone().expect("a plan")["samples"][0];
    assert!(sample.to_string().contains("stamped"), "{sample}");
    assert_eq!(sample["after"]["amount"], "DEFAULT", "{sample}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM audit").await, 0);
}

/// Starts an archived job (`set`: an update's set clause, `None`: a delete) in batches of 100
/// with a pause between them, and returns its daemon once two batches committed: the moment a
/// migration's DDL comes mid-run.
async fn archived_job_two_batches_in(
    db: &Db,
    name: &str,
    table: &str,
    predicate: &str,
    set: Option<&str>,
) -> common::Daemon {
    let job = NewJob::new(name, table)
        .predicate(predicate)
        .raw("archive", "true")
        .raw("batch_size", "100")
        .raw("sleep_ms", "50");
    let job = match set {
        Some(set) => job.set(set),
        None => job.raw("action", "'delete'"),
    };
    job.insert(db).await;
    let daemon = db.daemon().until_idle().spawn();
    common::wait_until("a few batches", String::new, async || {
        db.job(name).await.batches >= 2
    })
    .await;
    daemon
}

/// A migration adds a column while an archived delete runs, and the application fills it. The
/// batch that first deletes under the new column rolls back (its statement archives the old
/// columns only: the value would have been lost, and the revert put back the default), and the
/// next attempt adds the column to the archive. The revert then puts back every value.
#[sqlx::test]
async fn an_archived_delete_follows_a_column_added_mid_run(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 2000).await;
    let mut daemon =
        archived_job_two_batches_in(&db, "purge_live", "orders", "status = 'paid'", None).await;
    // One transaction: the rows left then are those the revert must give their region back.
    // NOT NULL: the rows archived before the column came must come back with its default (the
    // archive had held NULL for them, and the revert failed with 23502).
    db.exec(
        "ALTER TABLE orders ADD COLUMN region text NOT NULL DEFAULT 'eu';
         UPDATE orders SET region = 'r' || id;
         CREATE TABLE regions AS SELECT id, region FROM orders;",
    )
    .await;
    daemon.wait_ok().await;
    let job = db.job("purge_live").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!(job.rows_changed, 500);
    assert!(job.batches > 2, "the column came mid-run");
    let log = daemon.log();
    assert!(log.contains("columns changed while the job ran"), "{log}");
    let archive = job.archive_table.expect("an archive");
    assert_eq!(
        db.scalar_i64(&format!("SELECT count(*) FROM backfill.\"{archive}\""))
            .await,
        500
    );
    let reverted = db.revert("purge_live").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (500, 0));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM orders").await, 2000);
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM regions r JOIN orders o USING (id)
             WHERE o.region IS DISTINCT FROM r.region"
        )
        .await,
        0,
        "every region deleted after the column came is back"
    );
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM orders o WHERE region = 'eu'
             AND NOT EXISTS (SELECT FROM regions r WHERE r.id = o.id)"
        )
        .await,
        db.scalar_i64("SELECT 2000 - count(*) FROM regions").await,
        "the rows deleted before it take its default"
    );
}

/// A delete's column is retyped after the job, text to integer: the revert converts the images
/// to the table's type (PostgreSQL has no implicit cast from text to integer: it failed 42804).
#[sqlx::test]
async fn a_delete_is_reverted_after_its_column_was_retyped(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE codes (id int PRIMARY KEY, w text NOT NULL);
         INSERT INTO codes SELECT g, (g * 10)::text FROM generate_series(1, 100) g;",
    )
    .await;
    NewJob::new("purge_codes", "codes")
        .raw("action", "'delete'")
        .predicate("id <= 30")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    db.exec("ALTER TABLE codes ALTER COLUMN w TYPE int USING w::int")
        .await;
    let reverted = db.revert("purge_codes").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(reverted.rows_changed, 30);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM codes WHERE w = id * 10")
            .await,
        100
    );
}

/// A migration drops a column while an archived delete runs: the batch's statement, which
/// archives that column by name, fails with 42703. That is the table changing, not a broken job:
/// the next attempt archives the columns the table has now, and the job finishes.
#[sqlx::test]
async fn an_archived_delete_goes_on_when_a_column_is_dropped_mid_run(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 2000).await;
    let mut daemon =
        archived_job_two_batches_in(&db, "purge_drop", "orders", "status = 'paid'", None).await;
    db.exec("ALTER TABLE orders DROP COLUMN note").await;
    daemon.wait_ok().await;
    let job = db.job("purge_drop").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!(job.rows_changed, 500);
    let reverted = db.revert("purge_drop").await;
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (500, 0));
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE status = 'paid' AND amount = id * 1.25")
            .await,
        500
    );
}

/// Swaps `orders` for a copy under the same name (the rename dance of a manual table rewrite),
/// in one transaction, and returns how many rows the copy took over already changed.
async fn swap_orders_for_a_copy(db: &Db) -> i64 {
    db.exec(
        "BEGIN;
         CREATE TABLE orders_copy (LIKE orders INCLUDING ALL);
         INSERT INTO orders_copy SELECT * FROM orders;
         ALTER TABLE orders RENAME TO orders_old;
         ALTER TABLE orders_copy RENAME TO orders;
         CREATE TABLE swapped AS SELECT count(*) AS changed FROM orders WHERE status = 'pending';
         COMMIT;",
    )
    .await;
    db.scalar_i64("SELECT changed FROM swapped").await
}

/// A table swapped under the job's table name mid-run (renamed away, a copy renamed in) is not
/// followed: the statements name the table, and PostgreSQL analyses a prepared statement again
/// after DDL, so the batches went on into the copy from the old table's cursor, under the old
/// table's bound and into the old table's archive. The checkpoint now compares the oid the name
/// resolves to with the one pinned when the job planned; the batch rolls back and the job fails,
/// naming the table.
#[sqlx::test]
async fn a_table_swapped_under_the_name_mid_run_is_not_followed(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 2000).await;
    let mut daemon = archived_job_two_batches_in(
        &db,
        "stamp_swap",
        "orders",
        "status IS NULL",
        Some("status = 'pending'"),
    )
    .await;
    let changed_at_swap = swap_orders_for_a_copy(&db).await;
    daemon.wait_ok().await;
    let job = db.job("stamp_swap").await;
    assert_eq!(job.state, "failed", "{job:?}");
    let error = job.last_error.unwrap_or_default();
    assert!(
        error.contains("\"public\".\"orders\" is not the table this job planned"),
        "{error}"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE status = 'pending'")
            .await,
        changed_at_swap,
        "the copy under the name is left as it was swapped in"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders_old WHERE status = 'pending'")
            .await,
        job.rows_changed,
        "the old table holds what the job's counters say it changed"
    );
    // `verify` counts on the table the job planned on too (it counted the copy's rows and
    // stored them as the job's `remaining`).
    let cfg = backfilld::config::Config::default();
    let verified = backfilld::ops::verify(&db.lib, &db.names, &cfg, "stamp_swap").await;
    let error = verified.expect_err("refused").to_string();
    assert!(
        error.contains("is not the table this job planned"),
        "{error}"
    );
    assert_eq!(db.job("stamp_swap").await.remaining, None);
}

/// A dry run planned on one table and approved after the table was swapped under its name
/// fails before any batch: its plan (counts, samples, bound) was of the old table.
#[sqlx::test]
async fn an_approved_plan_of_a_table_swapped_since_changes_nothing(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 300).await;
    NewJob::new("stamp_later", "orders")
        .raw("mode", "'dry_run'")
        .predicate("status IS NULL")
        .set("status = 'pending'")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("stamp_later").await.state, "planned");
    assert_eq!(swap_orders_for_a_copy(&db).await, 0);
    backfilld::ops::approve(&db.lib, &db.names, "stamp_later")
        .await
        .expect("approve");
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("stamp_later").await;
    assert_eq!(job.state, "failed", "{job:?}");
    assert!(
        job.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("renamed or dropped and another table took its name"),
        "{:?}",
        job.last_error
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE status = 'pending'")
            .await,
        0
    );
}

/// A migration renames a column while an archived delete runs. The archive records which
/// column of the table each of its columns holds (by number, which a rename keeps), so the next
/// attempt renames the archive's column instead of taking the rename for a dropped column and
/// an added one: the revert puts back every value, those archived before the rename too (they
/// came back NULL).
#[sqlx::test]
async fn an_archived_delete_follows_a_column_renamed_mid_run(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 2000).await;
    let mut daemon =
        archived_job_two_batches_in(&db, "purge_rename", "orders", "status = 'paid'", None).await;
    db.exec("ALTER TABLE orders RENAME COLUMN note TO memo")
        .await;
    daemon.wait_ok().await;
    let job = db.job("purge_rename").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!(job.rows_changed, 500);
    let log = daemon.log();
    assert!(log.contains("note renamed memo"), "{log}");
    let reverted = db.revert("purge_rename").await;
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (500, 0));
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE memo = 'n' || id")
            .await,
        2000,
        "every note is back, those deleted before the rename too"
    );
}

/// Columns renamed between a job and its revert: an update's set column, and two columns of a
/// deleted table that traded names. The revert follows each column, not its old name (the
/// update's revert failed on the column it could not find; the delete's put each value into
/// the other column).
#[sqlx::test]
async fn a_revert_follows_columns_renamed_after_the_job(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 400).await;
    NewJob::new("double_paid", "orders")
        .predicate("status = 'paid'")
        .set("amount = amount * 2")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.exec(
        "CREATE TABLE pairs (id int PRIMARY KEY, a text, b text);
         INSERT INTO pairs SELECT g, 'a' || g, 'b' || g FROM generate_series(1, 300) g;",
    )
    .await;
    NewJob::new("purge_pairs", "pairs")
        .raw("action", "'delete'")
        .predicate("id % 3 = 0")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("double_paid").await.rows_changed, 100);
    assert_eq!(db.job("purge_pairs").await.rows_changed, 100);
    db.exec(
        "ALTER TABLE orders RENAME COLUMN amount TO total;
         ALTER TABLE pairs RENAME COLUMN a TO swap;
         ALTER TABLE pairs RENAME COLUMN b TO a;
         ALTER TABLE pairs RENAME COLUMN swap TO b;",
    )
    .await;
    let reverted = db.revert("double_paid").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (100, 0));
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE total = id * 1.25")
            .await,
        400
    );
    let reverted = db.revert("purge_pairs").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (100, 0));
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pairs WHERE b = 'a' || id AND a = 'b' || id")
            .await,
        300,
        "each value is back in the column that was renamed, not in the one that took its name"
    );
}

/// A column dropped after an archived delete, and another renamed into its name: the revert puts
/// the renamed column's values back under its new name, not the dropped column's (they went
/// into the newcomer, matched by name).
#[sqlx::test]
async fn a_revert_does_not_restore_a_dropped_column_into_one_that_took_its_name(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE reused (id int PRIMARY KEY, a text, b text);
         INSERT INTO reused SELECT g, 'a' || g, 'b' || g FROM generate_series(1, 300) g;",
    )
    .await;
    NewJob::new("purge_reused", "reused")
        .raw("action", "'delete'")
        .predicate("id % 3 = 0")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    db.exec("ALTER TABLE reused DROP COLUMN a; ALTER TABLE reused RENAME COLUMN b TO a;")
        .await;
    let reverted = db.revert("purge_reused").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(reverted.rows_changed, 100);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM reused WHERE a = 'b' || id")
            .await,
        300
    );
}

/// The revert of a job whose table was swapped for another since (renamed in under the name)
/// refuses: its images belong to the table the job changed (it reverted the newcomer's rows,
/// and left the job's table as it was). With the pin cleared, as for a table restored from a
/// dump, it restores into the table under the name, matching columns by name, and says so.
#[sqlx::test]
async fn a_revert_refuses_a_table_replaced_since_the_job(pool: PgPool) {
    let db = Db::new(pool).await;
    orders(&db, 400).await;
    NewJob::new("stamp_then_swap", "orders")
        .predicate("status IS NULL")
        .set("status = 'pending'")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(swap_orders_for_a_copy(&db).await, 300);
    let refused = db.revert("stamp_then_swap").await;
    assert_eq!(refused.state, "failed");
    let error = refused.last_error.unwrap_or_default();
    assert!(
        error.contains("public.orders is oid") && error.contains("it was replaced"),
        "{error}"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE status = 'pending'")
            .await,
        300,
        "the table under the name is left alone"
    );

    db.exec("UPDATE backfill.jobs SET plan = plan - 'pinned' WHERE name = 'stamp_then_swap'")
        .await;
    let revert = backfilld::ops::revert(&db.lib, &db.names, "stamp_then_swap", false)
        .await
        .expect("revert");
    let mut daemon = db.daemon().until_idle().spawn();
    daemon.wait_ok().await;
    let reverted = db.job(&revert.name).await;
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (300, 0));
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE status IS NULL")
            .await,
        300
    );
    let log = daemon.log();
    assert!(
        log.contains("the archive was made for another table under this name"),
        "{log}"
    );
}

/// Pauses `name` once it ran two batches, and waits until it is paused.
async fn paused_two_batches_in(db: &Db, name: &str) {
    db.wait_for(name, "two batches", |r| r.batches >= 2).await;
    db.set_requested(name, "paused").await;
    db.wait_state(name, "paused").await;
}

/// A key retyped while the job is paused: `int` to `bigint` sorts and prints alike, and the
/// job goes on, every row once; so does a text key given, by name, the collation the database
/// sorts it by already. `int` to `text` does not sort alike (the cursor '1000' would sort before
/// '999'), and the resumed job stops before any batch, naming the key. Before, it succeeded
/// with rows skipped, and with `n = n + 1` rows changed twice.
#[sqlx::test]
async fn a_key_retyped_while_paused_is_followed_only_where_it_sorts_alike(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE wide (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO wide (id) SELECT generate_series(1, 3000);
         CREATE TABLE texty (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO texty (id) SELECT generate_series(1, 3000);
         CREATE TABLE named (id text PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO named (id) SELECT 'k' || g FROM generate_series(1, 3000) g;",
    )
    .await;
    // The database's own locale, under a collation's name.
    let locale = db
        .scalar_text("SELECT datcollate FROM pg_database WHERE datname = current_database()")
        .await;
    db.exec(&format!(
        "CREATE COLLATION same_as_default (provider = libc, locale = '{locale}')"
    ))
    .await;
    let retypes = [
        ("wide", "bigint"),
        ("texty", "text"),
        ("named", "text COLLATE same_as_default"),
    ];
    for (table, retype) in retypes {
        NewJob::new(&format!("bump_{table}"), table)
            .predicate("true")
            .set("n = n + 1")
            .raw("batch_size", "100")
            .raw("sleep_ms", "50")
            .insert(&db)
            .await;
        let mut daemon = db.daemon().max_batch(100).spawn();
        paused_two_batches_in(&db, &format!("bump_{table}")).await;
        db.exec(&format!(
            "ALTER TABLE {table} ALTER COLUMN id TYPE {retype}"
        ))
        .await;
        db.set_requested(&format!("bump_{table}"), "running").await;
        db.wait_for(&format!("bump_{table}"), "the end", |r| {
            r.state.is_finished()
        })
        .await;
        daemon.signal("TERM");
        daemon.wait(std::time::Duration::from_secs(15)).await;
    }
    for table in ["wide", "named"] {
        let job = db.job(&format!("bump_{table}")).await;
        assert_eq!(job.state, "succeeded", "{table}: {:?}", job.last_error);
        assert_eq!(
            db.scalar_i64(&format!("SELECT count(*) FROM {table} WHERE n = 1"))
                .await,
            3000,
            "{table}: every row once"
        );
    }
    let texty = db.job("bump_texty").await;
    assert_eq!(texty.state, "failed");
    let error = texty.last_error.unwrap_or_default();
    assert!(
        error.contains(
            "the key changed since the job planned (then id: column 1, an integer; now id: \
             column 1, text sorted by"
        ),
        "{error}"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM texty WHERE n > 1")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM texty WHERE n = 1")
            .await,
        texty.rows_changed
    );
}

/// Mid-run, between two batches: the key's collation changes (the walk's order with it), and a
/// table attaches itself as an inheritance child (the statements, without ONLY, would reach its
/// rows). Each stops the job at the next batch, naming what changed (the first failed with
/// "cached plan must not change result type", the second went on into the child's rows).
#[sqlx::test]
async fn a_key_recollated_or_a_child_attached_mid_run_stops_the_job(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE coded (code text PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO coded (code) SELECT 'c' || g FROM generate_series(1, 3000) g;
         CREATE TABLE parent (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO parent (id) SELECT generate_series(1, 3000);
         CREATE TABLE child (id int NOT NULL, n int NOT NULL DEFAULT 0);
         INSERT INTO child (id) SELECT generate_series(1, 3000);",
    )
    .await;
    let cases = [
        (
            "coded",
            "ALTER TABLE coded ALTER COLUMN code TYPE text COLLATE \"und-x-icu\"",
            "the key changed",
        ),
        (
            "parent",
            "ALTER TABLE child INHERIT parent",
            "a table inherits from it",
        ),
    ];
    for (table, ddl, said) in cases {
        let name = format!("bump_{table}");
        NewJob::new(&name, table)
            .predicate("true")
            .set("n = n + 1")
            .raw("batch_size", "100")
            .raw("sleep_ms", "100")
            .insert(&db)
            .await;
        let mut daemon = db.daemon().max_batch(100).until_idle().spawn();
        db.wait_for(&name, "two batches", |r| r.batches >= 2).await;
        db.exec(ddl).await;
        daemon.wait_ok().await;
        let job = db.job(&name).await;
        assert_eq!(job.state, "failed", "{table}: {job:?}");
        let error = job.last_error.unwrap_or_default();
        assert!(error.contains(said), "{table}: {error}");
        assert_eq!(
            db.scalar_i64(&format!("SELECT count(*) FROM ONLY {table} WHERE n = 1"))
                .await,
            job.rows_changed,
            "{table}"
        );
    }
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM child WHERE n <> 0")
            .await,
        0
    );
}

/// Row-level security turned on mid-run over the daemon's role: the rows its policy hides
/// would be skipped, and the verification could not count them (the job "succeeded", remaining
/// 0, half the rows untouched). The next batch stops the job, naming the cause.
#[sqlx::test]
async fn row_security_enabled_mid_run_stops_the_job(pool: PgPool) {
    let db = Db::new(pool).await;
    let role = db.cluster_unique("bfrlsmid").await;
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'rls';
         GRANT USAGE ON SCHEMA backfill TO {role};
         GRANT ALL ON ALL TABLES IN SCHEMA backfill TO {role};
         GRANT ALL ON ALL SEQUENCES IN SCHEMA backfill TO {role};"
    ))
    .await;
    // A policy that hides half the rows (a later batch's checkpoint sees it), and one that hides
    // every row left (no batch follows: the walk ended as if done, "succeeded").
    for (table, policy) in [("halves", "id % 2 = 1"), ("hides", "false")] {
        db.exec(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
             INSERT INTO {table} (id) SELECT generate_series(1, 3000);
             GRANT SELECT, UPDATE ON {table} TO {role};"
        ))
        .await;
        let name = format!("bump_{table}");
        NewJob::new(&name, table)
            .predicate("true")
            .set("n = n + 1")
            .raw("archive", "false")
            .raw("batch_size", "100")
            .raw("sleep_ms", "100")
            .insert(&db)
            .await;
        let mut daemon = db
            .daemon()
            .database_url(&db.url_as(&role, "rls"))
            .max_batch(100)
            .until_idle()
            .spawn();
        db.wait_for(&name, "two batches", |r| r.batches >= 2).await;
        db.exec(&format!(
            "ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
             CREATE POLICY p ON {table} USING ({policy});"
        ))
        .await;
        daemon.wait_ok().await;
        let job = db.job(&name).await;
        assert_eq!(job.state, "failed", "{table}: {job:?}");
        let error = job.last_error.unwrap_or_default();
        assert!(
            error.contains("row-level security hides rows of the table from the daemon's role"),
            "{table}: {error}"
        );
        assert_eq!(
            db.scalar_i64(&format!("SELECT count(*) FROM {table} WHERE n = 1"))
                .await,
            job.rows_changed,
            "{table}"
        );
        db.exec(&format!("DROP TABLE {table}")).await;
    }
    db.exec(&format!(
        "REVOKE ALL ON ALL TABLES IN SCHEMA backfill FROM {role};
         REVOKE ALL ON ALL SEQUENCES IN SCHEMA backfill FROM {role};
         REVOKE ALL ON SCHEMA backfill FROM {role}; DROP ROLE {role};"
    ))
    .await;
}

/// A migration widens a column an archived update sets while the update runs, and the
/// application writes values of the new precision. The archive's columns had the old type: the
/// images would have been rounded, and the revert would have skipped the rows as changed since
/// (or put back the rounded value). The batch rolls back, the archive takes the new type, and
/// the revert restores every value exactly.
#[sqlx::test]
async fn an_archived_update_follows_a_column_retyped_mid_run(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE prices (id int PRIMARY KEY, price numeric(10,2) NOT NULL, v int NOT NULL DEFAULT 0);
         INSERT INTO prices SELECT g, g * 1.25, 0 FROM generate_series(1, 2000) g;",
    )
    .await;
    let set = Some("price = price * 3, v = 1");
    let mut daemon = archived_job_two_batches_in(&db, "triple", "prices", "v = 0", set).await;
    db.exec(
        "ALTER TABLE prices ALTER COLUMN price TYPE numeric(12,4);
         UPDATE prices SET price = price + 0.0001 WHERE v = 0;
         CREATE TABLE before AS SELECT id, price FROM prices WHERE v = 0;",
    )
    .await;
    daemon.wait_ok().await;
    let job = db.job("triple").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!(job.rows_changed, 2000);
    let reverted = db.revert("triple").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (2000, 0));
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM before b JOIN prices p USING (id) WHERE p.price <> b.price"
        )
        .await,
        0,
        "every price updated after the change of type is back to its four decimals"
    );
}

/// A retype mid-run whose conversion the archived images cannot take (`'a7'` to integer): the
/// job fails naming that step and the archive, not "creating the archive table".
#[sqlx::test]
async fn an_archive_that_cannot_follow_a_retype_says_so(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE tags (id int PRIMARY KEY, w text NOT NULL, done bool NOT NULL DEFAULT false);
         INSERT INTO tags SELECT g, 'a' || g FROM generate_series(1, 2000) g;",
    )
    .await;
    let set = Some("w = id * 10, done = true");
    let mut daemon = archived_job_two_batches_in(&db, "renumber", "tags", "NOT done", set).await;
    db.exec(
        "ALTER TABLE tags ALTER COLUMN w TYPE int
         USING CASE WHEN w LIKE 'a%' THEN -1 ELSE w::int END",
    )
    .await;
    daemon.wait_ok().await;
    let job = db.job("renumber").await;
    assert_eq!(job.state, "failed");
    let error = job.last_error.unwrap_or_default();
    assert!(
        error.contains("bringing the archive in line with the table's columns")
            && error.contains("22P02")
            && error.contains("archive \"backfill\"."),
        "{error}"
    );
    assert!(
        daemon
            .log()
            .contains("the table changed; the next attempt follows it")
    );
}

/// A column an update set is retyped after the update finished: the revert compares its
/// after-images with the values as the table now holds them (it had skipped every row as
/// changed since: `3.75` is not `3.7500` as text).
#[sqlx::test]
async fn an_update_is_reverted_after_its_column_was_retyped(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE prices (id int PRIMARY KEY, price numeric(10,2) NOT NULL, v int NOT NULL DEFAULT 0);
         INSERT INTO prices SELECT g, g * 1.25, 0 FROM generate_series(1, 500) g;",
    )
    .await;
    NewJob::new("triple", "prices")
        .predicate("v = 0")
        .set("price = price * 3, v = 1")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    db.exec("ALTER TABLE prices ALTER COLUMN price TYPE numeric(12,4), ALTER COLUMN v TYPE bigint")
        .await;
    let reverted = db.revert("triple").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (500, 0));
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM prices WHERE price = id * 1.25 AND v = 0")
            .await,
        500
    );
}

/// A table with a deferrable unique constraint refuses a bare `ON CONFLICT DO NOTHING` (55000):
/// the revert of a delete names its keys' (not deferrable) index as the arbiter instead, and an
/// insert job into such a table does the same.
#[sqlx::test]
async fn deferrable_unique_constraints_do_not_block_a_revert_or_an_insert(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE df (id bigint PRIMARY KEY, code int UNIQUE DEFERRABLE INITIALLY DEFERRED);
         INSERT INTO df SELECT g, g FROM generate_series(1, 200) g;
         CREATE TABLE dfsrc (id bigint PRIMARY KEY);
         INSERT INTO dfsrc SELECT generate_series(150, 300);",
    )
    .await;
    NewJob::new("df_purge", "df")
        .raw("action", "'delete'")
        .predicate("id % 2 = 0")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("df_purge").await.rows_changed, 100);
    let reverted = db.revert("df_purge").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(reverted.rows_changed, 100);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM df").await, 200);
    let verified = backfilld::ops::verify(
        &db.lib,
        &db.names,
        &backfilld::config::Config::default(),
        &reverted.name,
    )
    .await;
    assert!(
        verified.is_err_and(|e| e.to_string().contains("no predicate to verify")),
        "verify refuses a revert"
    );

    NewJob::new("df_copy", "df")
        .raw("action", "'insert'")
        .text("source_table", "public.dfsrc")
        .predicate("true")
        .set("id = id, code = id + 1000")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let copied = db.job("df_copy").await;
    assert_eq!(copied.state, "succeeded", "{:?}", copied.last_error);
    assert_eq!(copied.rows_changed, 100, "ids 201..300; 150..200 exist");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM df").await, 300);
}

/// The primary key itself deferrable: an insert names another unique key on NOT NULL columns
/// that its set clause assigns (it named none, and every batch failed with 55000), and is
/// refused in its plan when there is none.
#[sqlx::test]
async fn an_insert_under_a_deferrable_primary_key_names_a_key_it_assigns(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE dpk (uid int, email text NOT NULL UNIQUE,
                           CONSTRAINT dpk_pk PRIMARY KEY (uid) DEFERRABLE);
         INSERT INTO dpk VALUES (3, 'u3');
         CREATE TABLE dpksrc (id int PRIMARY KEY, email text NOT NULL);
         INSERT INTO dpksrc SELECT g, 'u' || g FROM generate_series(1, 10) g;",
    )
    .await;
    NewJob::new("dpk_copy", "dpk")
        .raw("action", "'insert'")
        .raw("archive", "true")
        .text("source_table", "public.dpksrc")
        .predicate("true")
        .set("uid = id, email = email")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let copied = db.job("dpk_copy").await;
    assert_eq!(copied.state, "succeeded", "{:?}", copied.last_error);
    assert_eq!(copied.rows_changed, 9, "u3 exists");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM dpk").await, 10);
    let reverted = db.revert("dpk_copy").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM dpk").await, 1);

    // The only other unique key is a serial the insert leaves to its default: it never
    // conflicts, so rows inserted already would not be skipped. Refused in the plan (it ran,
    // then counted every row as still to insert, and a second run failed on the primary key).
    db.exec(
        "CREATE TABLE dsn (id int PRIMARY KEY DEFERRABLE, sn bigserial UNIQUE, v text);
         INSERT INTO dsn (id, v) VALUES (3, 'u3');",
    )
    .await;
    NewJob::new("dsn_copy", "dsn")
        .raw("action", "'insert'")
        .text("source_table", "public.dpksrc")
        .predicate("true")
        .set("id = id, v = email")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let refused = db.job("dsn_copy").await;
    let err = refused.last_error.unwrap_or_default();
    assert_eq!(
        (refused.state.as_str(), refused.batches),
        ("failed", 0),
        "{err}"
    );
    for want in [
        "job dsn_copy",
        "public.dsn",
        "the target's key (id) is DEFERRABLE",
        "assigned in full by set_clause",
    ] {
        assert!(err.contains(want), "expected {want:?} in: {err}");
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM dsn").await, 1);
}

/// The revert of a delete where the deferrable primary key is the only unique key (no arbiter
/// at all: it failed with 55000), and where another key is the arbiter (a row whose primary key
/// came back failed the revert with 23505): a row whose key exists again is skipped and
/// counted, the others come back.
#[sqlx::test]
async fn a_revert_skips_rows_whose_deferrable_key_exists_again(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE donly (id int PRIMARY KEY DEFERRABLE, g int);
         INSERT INTO donly SELECT g, g FROM generate_series(1, 300) g;
         CREATE TABLE dmail (id int PRIMARY KEY DEFERRABLE, email text NOT NULL UNIQUE);
         INSERT INTO dmail SELECT g, 'm' || g FROM generate_series(1, 300) g;",
    )
    .await;
    let purges = [("donly_purge", "donly"), ("dmail_purge", "dmail")];
    for (name, table) in purges {
        NewJob::new(name, table)
            .raw("action", "'delete'")
            .predicate("id <= 100")
            .raw("archive", "true")
            .insert(&db)
            .await;
        db.daemon().until_idle().spawn().wait_ok().await;
        assert_eq!(db.job(name).await.rows_changed, 100);
    }
    db.exec("INSERT INTO donly VALUES (10, -1); INSERT INTO dmail VALUES (10, 'other');")
        .await;
    for (name, table) in purges {
        let reverted = db.revert(name).await;
        assert_eq!(
            reverted.state, "succeeded",
            "{table}: {:?}",
            reverted.last_error
        );
        assert_eq!(
            (reverted.rows_changed, reverted.rows_skipped),
            (99, 1),
            "{table}"
        );
        let rows = db
            .scalar_i64(&format!("SELECT count(*) FROM {table}"))
            .await;
        assert_eq!(rows, 300, "{table}");
    }
}

/// A job row the daemon must reject: it fails with `error_words` in its `last_error` and
/// changes nothing.
struct Hostile {
    /// The job's `name`.
    name: &'static str,
    /// Its `table_name`.
    table: &'static str,
    /// Its `predicate`; `None` stores SQL `NULL`.
    predicate: Option<&'static str>,
    /// Its `set_clause`; `None` leaves it out of the row (so `NULL`).
    set_clause: Option<&'static str>,
    /// Further columns, each as (column, raw SQL value).
    extra_columns: &'static [(&'static str, &'static str)],
    /// Words the job's `last_error` must contain.
    error_words: &'static [&'static str],
}

const HOSTILE: &[Hostile] = &[
    // An UPDATE may set an identity GENERATED ALWAYS column only to DEFAULT: the job ran, and
    // its revert failed with 428C9, unable to write the old values back.
    Hostile {
        name: "identity_always",
        table: "ident",
        predicate: Some("a % 2 = 0"),
        set_clause: Some("idn = DEFAULT"),
        extra_columns: &[],
        error_words: &["\"idn\", an identity GENERATED ALWAYS", "revert could not"],
    },
    // The daemon's own columns, copied from another row or typed: the job would append into
    // another archive, and the retention sweep drops what they name.
    Hostile {
        name: "copied_archive",
        table: "victim",
        predicate: Some("id = 1"),
        set_clause: Some("n = 9"),
        extra_columns: &[("archive_table", "'victim'")],
        error_words: &["archive_table \"victim\" is not this job's archive"],
    },
    Hostile {
        name: "staged_elsewhere",
        table: "victim",
        predicate: Some("id = 1"),
        set_clause: Some("n = 9"),
        extra_columns: &[("staged_table", "'jobs'")],
        error_words: &["staged_table \"jobs\" is not this job's staging table"],
    },
    // An update of a referenced column reaches the children's rows (here: every link set to
    // NULL), which the archive cannot restore.
    Hostile {
        name: "update_cascades",
        table: "sku",
        predicate: Some("code <> upper(code)"),
        set_clause: Some("code = upper(code)"),
        extra_columns: &[],
        error_words: &[
            "on public.sku: set_clause assigns \"code\", which public.line references ON UPDATE SET NULL",
            "allow_cascade",
        ],
    },
    // A key generated from a column the job sets moves ahead of the cursor: rows changed 12
    // or 13 times each.
    Hostile {
        name: "generated_key_source",
        table: "genkey",
        predicate: Some("true"),
        set_clause: Some("x = x + 2000, v = v + 1"),
        extra_columns: &[],
        error_words: &[
            "public.genkey",
            "\"x\", from which key column \"id\" is generated",
        ],
    },
    // A column named like backfilld's own archive columns: a delete's archive of it read as an
    // insert's, and its revert "succeeded" restoring nothing.
    Hostile {
        name: "reserved_column_name",
        table: "reserved",
        predicate: Some("id > 0"),
        set_clause: None,
        extra_columns: &[("action", "'delete'"), ("archive", "true")],
        error_words: &["public.reserved", "\"_bf_row\"", "reserves"],
    },
    // `€` is an identifier character for PostgreSQL: `a€$q$` is one name, not `a`, `€` and a
    // dollar quote hiding `) OR (` from the shape check.
    Hostile {
        name: "non_ascii_fake_dollar_quote",
        table: "victim",
        predicate: Some("id = -1 AND EXISTS (SELECT 1 a€$q$) ) OR ( EXISTS (SELECT 1 b€$q$)"),
        set_clause: Some("n = 9"),
        extra_columns: &[],
        error_words: &["never opened"],
    },
    // With `standard_conforming_strings = off` on the database (set by the test), the server
    // would read `'\'"'` as one string; the daemon's sessions turn it on, as its lexer reads.
    Hostile {
        name: "backslash_escaped_quote",
        table: "victim",
        predicate: Some("s = '\\'\"' ) OR true OR ( '\"\\'' = s"),
        set_clause: Some("n = 9"),
        extra_columns: &[],
        error_words: &["victim"],
    },
    Hostile {
        name: "row_locking_subquery",
        table: "victim",
        predicate: Some("id IN (SELECT id FROM canary FOR UPDATE)"),
        set_clause: Some("n = 9"),
        extra_columns: &[],
        error_words: &["FOR UPDATE"],
    },
    Hostile {
        name: "quoted_forbidden_call",
        table: "victim",
        predicate: Some(
            "\"pg_catalog\".\"set_config\"('application_name', 'pwned', false) = 'pwned'",
        ),
        set_clause: Some("n = 9"),
        extra_columns: &[],
        error_words: &["set_config"],
    },
    Hostile {
        name: "insert_from_our_jobs",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("id = id, n = 0"),
        extra_columns: &[("action", "'insert'"), ("source_table", "'backfill.jobs'")],
        error_words: &["backfill"],
    },
    Hostile {
        name: "insert_from_catalog",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("id = oid::int, n = 0"),
        extra_columns: &[
            ("action", "'insert'"),
            ("source_table", "'pg_catalog.pg_class'"),
        ],
        error_words: &["pg_catalog"],
    },
    Hostile {
        name: "insert_source_stacked",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("id = 1, n = 0"),
        extra_columns: &[
            ("action", "'insert'"),
            ("source_table", "'victim; DROP TABLE canary'"),
        ],
        error_words: &["source_table", "not a valid table name"],
    },
    Hostile {
        name: "insert_set_stacked",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("n = 0; DROP TABLE canary"),
        extra_columns: &[("action", "'insert'"), ("source_table", "'victim'")],
        error_words: &["';'"],
    },
    Hostile {
        name: "source_table_on_update",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[("source_table", "'victim'")],
        error_words: &["source_table is only for action 'insert'"],
    },
    Hostile {
        name: "stacked_predicate",
        table: "victim",
        predicate: Some("true; DROP TABLE canary"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["';'"],
    },
    Hostile {
        name: "stacked_set",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = 'x'; DROP TABLE canary"),
        extra_columns: &[],
        error_words: &["';'"],
    },
    Hostile {
        name: "paren_escape",
        table: "victim",
        predicate: Some("s IS NULL) OR (true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["never opened"],
    },
    Hostile {
        name: "paren_escape_set",
        table: "victim",
        predicate: Some("s IS NULL"),
        set_clause: Some("s = 'x') WHERE (true"),
        extra_columns: &[],
        error_words: &["never opened"],
    },
    Hostile {
        name: "line_comment",
        table: "victim",
        predicate: Some("s IS NULL --"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["comment"],
    },
    Hostile {
        name: "block_comment",
        table: "victim",
        predicate: Some("s IS NULL /* ) OR (true */"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["comment"],
    },
    Hostile {
        name: "comment_in_set",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = 'x' -- , n = 0"),
        extra_columns: &[],
        error_words: &["comment"],
    },
    Hostile {
        name: "unterminated_string",
        table: "victim",
        predicate: Some("s = 'x"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["unterminated"],
    },
    Hostile {
        name: "dollar_quote_open",
        table: "victim",
        predicate: Some("s = $q$x"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["unterminated"],
    },
    Hostile {
        name: "syntax_error",
        table: "victim",
        predicate: Some("s IS NOT NOT NULL"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["42601"],
    },
    Hostile {
        name: "not_boolean",
        table: "victim",
        predicate: Some("n + 1"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["42804"],
    },
    Hostile {
        name: "aggregate_predicate",
        table: "victim",
        predicate: Some("count(*) > 0"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["42803"],
    },
    Hostile {
        name: "two_expressions",
        table: "victim",
        predicate: Some("true, false"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["single expression"],
    },
    Hostile {
        name: "unknown_table",
        table: "no_such_table",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["does not exist"],
    },
    Hostile {
        name: "bad_table_name",
        table: "vic\"tim; DROP",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["table"],
    },
    Hostile {
        name: "unknown_column",
        table: "victim",
        predicate: Some("nope IS NULL"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["42703"],
    },
    Hostile {
        name: "unknown_set_column",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("nope = 1"),
        extra_columns: &[],
        error_words: &["42703"],
    },
    Hostile {
        name: "set_not_assignment",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s"),
        extra_columns: &[],
        error_words: &["column = expression"],
    },
    Hostile {
        name: "set_key_column",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("id = id + 1"),
        extra_columns: &[],
        error_words: &["key column"],
    },
    Hostile {
        name: "set_twice",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = 'a', s = 'b'"),
        extra_columns: &[],
        error_words: &["twice"],
    },
    Hostile {
        name: "no_key",
        table: "keyless",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["no primary key"],
    },
    Hostile {
        name: "non_unique_key",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[("key_columns", "ARRAY['n']")],
        error_words: &["not unique"],
    },
    Hostile {
        name: "zero_batch",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[("batch_size", "0")],
        error_words: &["batch_size"],
    },
    Hostile {
        name: "negative_batch",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[("batch_size", "-5")],
        error_words: &["batch_size"],
    },
    Hostile {
        name: "huge_batch",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[("batch_size", "2000000000")],
        error_words: &["batch_size"],
    },
    Hostile {
        name: "negative_sleep",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[("sleep_ms", "-1")],
        error_words: &["sleep_ms"],
    },
    Hostile {
        name: "negative_ceiling",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[("max_affected", "-1")],
        error_words: &["max_affected"],
    },
    Hostile {
        name: "null_predicate",
        table: "victim",
        predicate: None,
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["predicate is required"],
    },
    Hostile {
        name: "null_table",
        table: "",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[("table_name", "NULL")],
        error_words: &["table_name is required"],
    },
    Hostile {
        name: "null_set",
        table: "victim",
        predicate: Some("true"),
        set_clause: None,
        extra_columns: &[],
        error_words: &["job null_set on victim: set_clause is required"],
    },
    Hostile {
        name: "bad_action",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[("action", "'truncate'")],
        error_words: &["action"],
    },
    Hostile {
        name: "bad_mode",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[("mode", "'yolo'")],
        error_words: &["mode"],
    },
    Hostile {
        name: "delete_with_set",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[("action", "'delete'")],
        error_words: &["set_clause must be empty"],
    },
    Hostile {
        name: "own_schema",
        table: "backfill.jobs",
        predicate: Some("true"),
        set_clause: Some("last_error = 'pwned'"),
        extra_columns: &[],
        error_words: &["never changes"],
    },
    Hostile {
        name: "catalog",
        table: "pg_catalog.pg_class",
        predicate: Some("true"),
        set_clause: Some("relname = 'x'"),
        extra_columns: &[],
        error_words: &["never changes"],
    },
    Hostile {
        name: "outside_allowlist",
        table: "bystander",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["allowed_tables"],
    },
    Hostile {
        name: "terminate_backends",
        table: "victim",
        predicate: Some("pg_terminate_backend(pg_backend_pid())"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["pg_terminate_backend"],
    },
    Hostile {
        name: "sleep",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = pg_sleep(10)::text"),
        extra_columns: &[],
        error_words: &["pg_sleep"],
    },
    Hostile {
        name: "set_config",
        table: "victim",
        predicate: Some("set_config('role', 'postgres', false) IS NOT NULL"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["set_config"],
    },
    Hostile {
        name: "read_file",
        table: "victim",
        predicate: Some("true"),
        set_clause: Some("s = pg_read_file('/etc/passwd')"),
        extra_columns: &[],
        error_words: &["pg_read_file"],
    },
    Hostile {
        name: "writable_cte",
        table: "victim",
        predicate: Some("EXISTS (WITH d AS (DELETE FROM canary RETURNING 1) SELECT 1 FROM d)"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["0A000"],
    },
    Hostile {
        name: "view_target",
        table: "victim_view",
        predicate: Some("true"),
        set_clause: Some("s = 'x'"),
        extra_columns: &[],
        error_words: &["not a table"],
    },
];

#[sqlx::test]
async fn hostile_job_rows_fail_cleanly_and_touch_nothing(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE victim (id int PRIMARY KEY, n int NOT NULL, s text);
         INSERT INTO victim SELECT g, g % 3, NULL FROM generate_series(1, 200) g;
         CREATE TABLE canary (id int PRIMARY KEY); INSERT INTO canary VALUES (1), (2);
         CREATE TABLE keyless (a int, s text); INSERT INTO keyless VALUES (1, NULL);
         CREATE TABLE bystander (id int PRIMARY KEY, s text); INSERT INTO bystander VALUES (1, NULL);
         CREATE TABLE good (id int PRIMARY KEY, s text); INSERT INTO good SELECT g, NULL FROM generate_series(1, 50) g;
         CREATE VIEW victim_view AS SELECT * FROM victim;
         CREATE TABLE reserved (id int PRIMARY KEY, _bf_row text); INSERT INTO reserved VALUES (1, 'x');
         CREATE TABLE genkey (x int NOT NULL, id int GENERATED ALWAYS AS (x * 10) STORED PRIMARY KEY, v int);
         INSERT INTO genkey (x, v) SELECT g, 0 FROM generate_series(1, 300) g;
         CREATE TABLE sku (id int PRIMARY KEY, code text UNIQUE NOT NULL);
         INSERT INTO sku SELECT g, 'ab-' || g FROM generate_series(1, 100) g;
         CREATE TABLE line (id int PRIMARY KEY, sku_code text REFERENCES sku (code) ON UPDATE SET NULL);
         INSERT INTO line SELECT g, 'ab-' || g FROM generate_series(1, 100) g;
         CREATE TABLE ident (id int PRIMARY KEY, idn bigint GENERATED ALWAYS AS IDENTITY, a int);
         INSERT INTO ident (id, a) SELECT g, g FROM generate_series(1, 100) g;",
    )
    .await;
    assert!(HOSTILE.len() >= 30);
    let sums = |db: &Db| {
        let db_pool = db.pool.clone();
        async move {
            let mut out = Vec::new();
            for t in [
                "victim",
                "canary",
                "keyless",
                "bystander",
                "reserved",
                "genkey",
                "sku",
                "line",
                "ident",
            ] {
                let sql = format!(
                    "SELECT md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) FROM {t} x"
                );
                out.push(
                    sqlx::query_scalar::<_, String>(&sql)
                        .fetch_one(&db_pool)
                        .await
                        .unwrap(),
                );
            }
            out
        }
    };
    let before = sums(&db).await;
    for hostile in HOSTILE {
        let mut spec = NewJob::new(hostile.name, hostile.table);
        spec = match hostile.predicate {
            Some(p) => spec.predicate(p),
            None => spec.raw("predicate", "NULL"),
        };
        if let Some(s) = hostile.set_clause {
            spec = spec.set(s);
        }
        for (col, value) in hostile.extra_columns {
            spec = spec.raw(col, *value);
        }
        spec.insert(&db).await;
    }
    // Names commands, logs and metric labels could not show: empty, blank, or with a control
    // character. Each job would otherwise change `victim`.
    let bad_names = ["", "  ", "two\nlines", "bell\u{7}"];
    for name in bad_names {
        NewJob::new(name, "victim")
            .predicate("s IS NULL")
            .set("s = 'named badly'")
            .insert(&db)
            .await;
    }
    NewJob::new("good_job", "good")
        .predicate("s IS NULL")
        .set("s = 'done'")
        .raw("priority", "-10")
        .insert(&db)
        .await;
    // Legacy string syntax for every later connection to this database, the daemon's included
    // (the rows above went in with the standard one).
    db.exec(
        "DO $$ BEGIN
             EXECUTE format('ALTER DATABASE %I SET standard_conforming_strings = off',
                            current_database());
         END $$",
    )
    .await;
    db.daemon()
        .env("BACKFILLD_SAFETY__ALLOWED_TABLES", "public.victim,public.reserved,public.genkey,public.ident,public.sku,public.keyless,public.good,public.victim_view,backfill.jobs,pg_catalog.pg_class")
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    for hostile in HOSTILE {
        let name = hostile.name;
        let job = db.job(name).await;
        assert_eq!(job.state, "failed", "{name} should fail: {job:?}");
        assert_eq!(job.rows_changed, 0, "{name}");
        let err = job.last_error.clone().unwrap_or_default();
        assert!(
            err.contains(&format!("job {name}")),
            "{name}: error must name the job: {err}"
        );
        for w in hostile.error_words {
            assert!(err.contains(w), "{name}: expected {w:?} in: {err}");
        }
    }
    for name in bad_names {
        let job = db.job(name).await;
        assert_eq!(job.state, "failed", "{name:?} should fail: {job:?}");
        let err = job.last_error.clone().unwrap_or_default();
        assert!(
            err.contains(&format!("job {name:?} (id {})", job.id)) && err.contains("name "),
            "{name:?}: error must quote the name with its id: {err}"
        );
    }
    assert_eq!(sums(&db).await, before, "a hostile job changed a table");
    // Past the retention, the sweep drops only tables backfilld named for their job (it had run
    // DROP TABLE backfill.jobs, saved only by its next statement failing).
    db.exec("UPDATE backfill.jobs SET finished_at = now() - interval '31 days'")
        .await;
    backfilld::archive::drop_expired(&db.lib, &db.names, 30)
        .await
        .expect("the sweep");
    assert_eq!(db.job("staged_elsewhere").await.state, "failed");
    assert_eq!(db.job("good_job").await.state, "succeeded");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM good WHERE s = 'done'")
            .await,
        50
    );
    let jobs_intact = db
        .scalar_i64("SELECT count(*) FROM backfill.jobs WHERE last_error = 'pwned'")
        .await;
    assert_eq!(jobs_intact, 0);
}

/// Values a user can write that no Rust type holds: a NULL or a second dimension in
/// `key_columns`, infinite or far timestamps. Each such row fails or waits on its own; before,
/// one stopped every poll (decoding) or panicked the daemon and `status` (chrono's range).
#[sqlx::test]
async fn undecodable_job_values_fail_their_own_job_and_stop_no_other(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE n (id int PRIMARY KEY, v int);
         INSERT INTO n SELECT g, NULL FROM generate_series(1, 100) g;",
    )
    .await;
    let job = |name: &str, range: &str| {
        NewJob::new(name, "n")
            .predicate(&format!("v IS NULL AND {range}"))
            .set("v = id")
    };
    job("null_key", "id <= 10")
        .raw("key_columns", "'{NULL}'")
        .insert(&db)
        .await;
    job("two_dimensions", "id BETWEEN 11 AND 20")
        .raw("key_columns", "'{{id}}'")
        .insert(&db)
        .await;
    job("long_ago", "id BETWEEN 21 AND 30")
        .raw("run_at", "'-infinity'")
        .insert(&db)
        .await;
    job("parked", "id BETWEEN 31 AND 40")
        .raw("run_at", "'infinity'")
        .insert(&db)
        .await;
    job("far", "id BETWEEN 41 AND 50")
        .raw("run_at", "'270000-01-01'")
        .insert(&db)
        .await;
    job("created_never", "id BETWEEN 51 AND 60")
        .raw("created_at", "'-infinity'")
        .insert(&db)
        .await;
    job("good", "id > 60")
        .raw("priority", "-5")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let failed = db.job("null_key").await;
    assert_eq!(failed.state, "failed");
    let error = failed.last_error.unwrap_or_default();
    assert!(
        error.contains("job null_key") && error.contains("empty or NULL name"),
        "{error}"
    );
    for name in ["two_dimensions", "long_ago", "created_never", "good"] {
        let done = db.job(name).await;
        assert_eq!(done.state, "succeeded", "{name}: {:?}", done.last_error);
    }
    for name in ["parked", "far"] {
        let waiting = db.job(name).await;
        assert_eq!(waiting.state, "pending", "{name}");
        // Clamped, not invented: a NULL timestamp stays NULL.
        assert_eq!((waiting.started_at, waiting.lease_expires_at), (None, None));
    }
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM n WHERE v IS NULL")
            .await,
        30
    );
    // The operator's commands read them too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .args(["status"])
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("run backfilld");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cancel = backfilld::ops::request(
        &db.lib,
        &db.names,
        "parked",
        backfilld::job::Requested::Cancelled,
    )
    .await
    .expect("cancel a parked job");
    assert_eq!(cancel.requested_state.as_deref(), Some("cancelled"));
}

#[sqlx::test]
async fn archive_stays_exact_under_concurrent_writes(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE acct (id bigint PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
         INSERT INTO acct SELECT g FROM generate_series(1, 20000) g;
         CREATE TABLE app_writes (id bigint PRIMARY KEY, k int NOT NULL);",
    )
    .await;
    NewJob::new("bump", "acct")
        .predicate("true")
        .set("n = n + 1")
        .raw("archive", "true")
        .raw("batch_size", "200")
        .insert(&db)
        .await;
    let mut daemon = db.daemon().max_batch(200).until_idle().spawn();
    // The application adds 100 to random rows while the job runs (bounded loop).
    let pool = db.pool.clone();
    let writer = tokio::spawn(async move {
        for _ in 0..800 {
            let id = fastrand::i64(1..=20000);
            sqlx::raw_sql(&format!(
                "BEGIN; UPDATE acct SET n = n + 100 WHERE id = {id};
                 INSERT INTO app_writes VALUES ({id}, 1) ON CONFLICT (id) DO UPDATE SET k = app_writes.k + 1; COMMIT;"
            ))
            .execute(&pool)
            .await
            .unwrap();
        }
    });
    writer.await.unwrap();
    daemon.wait_ok().await;
    let job = db.job("bump").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!(job.rows_changed, 20000);
    let not_once = db
        .scalar_i64("SELECT count(*) FROM acct LEFT JOIN app_writes USING (id) WHERE n <> 100 * coalesce(k, 0) + 1")
        .await;
    assert_eq!(
        not_once, 0,
        "every row gets the backfill's +1 exactly once, on top of the app's writes"
    );

    let reverted = db.revert("bump").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    // Restored rows are back to exactly the app's value; rows the app changed after the backfill
    // keep their value (skipped). A stale before-image would show up as lost app increments.
    let wrong = db
        .scalar_i64(
            "SELECT count(*) FROM acct LEFT JOIN app_writes USING (id)
             WHERE n NOT IN (100 * coalesce(k, 0), 100 * coalesce(k, 0) + 1)",
        )
        .await;
    assert_eq!(wrong, 0, "a revert restored a stale before-image");
    let kept = db
        .scalar_i64("SELECT count(*) FROM acct WHERE n % 100 = 1")
        .await;
    assert_eq!(reverted.rows_skipped, kept, "skipped rows are counted");
    assert_eq!(reverted.rows_changed + reverted.rows_skipped, 20000);
}

#[sqlx::test]
async fn a_race_inside_the_window_redoes_the_batch_with_row_locks(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE acct (id bigint PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
         INSERT INTO acct SELECT g FROM generate_series(1, 1000) g;",
    )
    .await;
    // Planned first: the plan's trial write would otherwise be the statement that meets the lock.
    NewJob::new("raced", "acct")
        .raw("mode", "DEFAULT")
        .predicate("true")
        .set("n = n + 1")
        .raw("archive", "true")
        .raw("batch_size", "500")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    // The application holds row 50 mid-update while the first batch runs.
    let app = db.hold("UPDATE acct SET n = n + 100 WHERE id = 50").await;
    backfilld::ops::approve(&db.lib, &db.names, "raced")
        .await
        .unwrap();
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_BATCH__LOCK_TIMEOUT", "20s")
        .until_idle()
        .spawn();
    // Wait until the batch's UPDATE is blocked on the app's row lock, then let the app commit.
    let blocked = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%_bf_old%'";
    common::wait_until(
        "the batch to block on row 50",
        || daemon.log(),
        async || db.scalar_i64(blocked).await > 0,
    )
    .await;
    app.commit().await;
    daemon.wait_ok().await;
    assert!(
        daemon.log().contains("redoing the batch with row locks"),
        "{}",
        daemon.log()
    );
    assert_eq!(db.job("raced").await.rows_changed, 1000);
    assert_eq!(db.scalar_i64("SELECT n FROM acct WHERE id = 50").await, 101);
    let archived = db.job("raced").await.archive_table.unwrap();
    let before = db
        .scalar_i64(&format!(
            "SELECT n FROM backfill.\"{archived}\" WHERE id = 50"
        ))
        .await;
    assert_eq!(
        before, 100,
        "the before-image is the version the backfill overwrote"
    );
    let revert = backfilld::ops::revert(&db.lib, &db.names, "raced", false)
        .await
        .unwrap();
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job(&revert.name).await.rows_changed, 1000);
    assert_eq!(db.scalar_i64("SELECT n FROM acct WHERE id = 50").await, 100);
    assert_eq!(db.scalar_i64("SELECT sum(n)::bigint FROM acct").await, 100);
}

/// A `ctid` names a slot only within one table: the partitions of a partitioned table, filled by
/// the same statement, hold different rows at the same `ctid` (and with the same `xmin`). Each
/// before-image must still be its own row's, so the revert restores every row exactly.
#[sqlx::test]
async fn archived_images_stay_with_their_own_partition(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE parted (id bigint PRIMARY KEY, n bigint NOT NULL) PARTITION BY RANGE (id);
         CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (1) TO (1001);
         CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM (1001) TO (2001);
         INSERT INTO parted SELECT g, g * 10 FROM generate_series(1, 2000) g;",
    )
    .await;
    let same_slots = db
        .scalar_i64(
            "SELECT count(*) FROM parted_1 a JOIN parted_2 b ON a.ctid = b.ctid AND a.xmin = b.xmin",
        )
        .await;
    assert_eq!(same_slots, 1000, "the partitions share ctids and xmin");
    NewJob::new("parted", "parted")
        .predicate("true")
        .set("n = n + 1")
        .raw("archive", "true")
        .raw("batch_size", "2000")
        .insert(&db)
        .await;
    db.daemon()
        .max_batch(2000)
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    let job = db.job("parted").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!(job.rows_changed, 2000);
    let archive = job.archive_table.unwrap();
    let wrong = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM backfill.\"{archive}\" WHERE n <> id * 10 OR _bf_after_0 <> id * 10 + 1"
        ))
        .await;
    assert_eq!(wrong, 0, "an image was taken from another partition's row");
    let distinct = db
        .scalar_i64(&format!(
            "SELECT count(DISTINCT id) FROM backfill.\"{archive}\""
        ))
        .await;
    assert_eq!(distinct, 2000, "every changed row has its own image");

    let revert = backfilld::ops::revert(&db.lib, &db.names, "parted", false)
        .await
        .unwrap();
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job(&revert.name).await.rows_changed, 2000);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM parted WHERE n <> id * 10")
            .await,
        0
    );
}

/// `WHERE v IS NULL` pins the before-image: the archive writes NULL without reading the row
/// first. Live traffic that sets `v` itself (the predicate then fails on the version the backfill
/// would overwrite) or changes another column meanwhile must not make any image wrong.
#[sqlx::test]
async fn an_is_null_backfill_stays_exact_under_concurrent_writes(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE fill (id bigint PRIMARY KEY, v bigint, other int NOT NULL DEFAULT 0);
         INSERT INTO fill (id) SELECT g FROM generate_series(1, 20000) g;",
    )
    .await;
    NewJob::new("fill", "fill")
        .predicate("v IS NULL")
        .set("v = id * 2")
        .raw("archive", "true")
        .raw("batch_size", "200")
        .insert(&db)
        .await;
    let mut daemon = db.daemon().max_batch(200).until_idle().spawn();
    let pool = db.pool.clone();
    let writer = tokio::spawn(async move {
        for i in 0..600 {
            let id = fastrand::i64(1..=20000);
            let sql = if i % 2 == 0 {
                format!("UPDATE fill SET v = -1 WHERE id = {id}")
            } else {
                format!("UPDATE fill SET other = other + 1 WHERE id = {id}")
            };
            sqlx::query(&sql).execute(&pool).await.unwrap();
        }
    });
    writer.await.unwrap();
    daemon.wait_ok().await;
    let job = db.job("fill").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    let archive = job.archive_table.unwrap();
    assert!(
        !daemon.log().contains("redoing the batch"),
        "the pinned path never needs a locked redo"
    );
    let archived = db
        .scalar_i64(&format!("SELECT count(*) FROM backfill.\"{archive}\""))
        .await;
    assert_eq!(archived, job.rows_changed);
    let wrong = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM backfill.\"{archive}\" WHERE v IS NOT NULL OR _bf_after_0 <> id * 2"
        ))
        .await;
    assert_eq!(wrong, 0);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM fill WHERE v IS NULL")
            .await,
        0
    );
    let app_set = db
        .scalar_i64("SELECT count(*) FROM fill WHERE v = -1")
        .await;

    let reverted = db.revert("fill").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM fill WHERE v = id * 2")
            .await,
        0,
        "every backfilled value is reverted"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM fill WHERE v = -1")
            .await,
        app_set,
        "the application's own values survive the revert"
    );
}

/// For a composite column `p IS NULL` also holds for `ROW(NULL, NULL)`, which is not NULL: its
/// before-image must be read, not assumed, or the revert would turn `(,)` into NULL.
#[sqlx::test]
async fn a_composite_column_is_null_is_captured_not_assumed(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TYPE pair AS (a int, b int);
         CREATE TABLE pairs (id bigint PRIMARY KEY, p pair);
         INSERT INTO pairs SELECT g, CASE WHEN g % 2 = 0 THEN ROW(NULL, NULL)::pair END
         FROM generate_series(1, 1000) g;",
    )
    .await;
    NewJob::new("pairs", "pairs")
        .predicate("p IS NULL")
        .set("p = ROW(id, id)::pair")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("pairs").await.rows_changed, 1000);
    let revert = backfilld::ops::revert(&db.lib, &db.names, "pairs", false)
        .await
        .unwrap();
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job(&revert.name).await.rows_changed, 1000);
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM pairs WHERE id % 2 = 0 AND p::text IS NOT DISTINCT FROM '(,)'"
        )
        .await,
        500,
        "ROW(NULL, NULL) came back as itself"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pairs WHERE id % 2 = 1 AND p IS NOT DISTINCT FROM NULL::pair AND p::text IS NULL")
            .await,
        500
    );
}
