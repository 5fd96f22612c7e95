//! Keyset pagination across key types, composite keys, empty and non-matching ranges, the frozen
//! upper bound, and key discovery failures.
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler

mod common;

use common::{Db, NewJob};
use sqlx::PgPool;

/// (table, key columns DDL, primary key, value expressions for the key columns from `g`).
const KEY_TYPES: &[(&str, &str, &str, &str)] = &[
    ("k_int2", "id int2", "id", "g::int2"),
    ("k_int4", "id int4", "id", "g"),
    ("k_int8", "id int8", "id", "g::int8 * 1000000000000"),
    ("k_uuid", "id uuid", "id", "gen_random_uuid()"),
    // Text orders as text: 'k10' < 'k9'; mixed case and non-ASCII exercise the collation.
    (
        "k_text",
        "id text",
        "id",
        "CASE WHEN g % 3 = 0 THEN 'K' ELSE 'k' END || g || CASE WHEN g % 5 = 0 THEN 'é' ELSE '' END",
    ),
    ("k_varchar", "id varchar(30)", "id", "'v' || (10000 - g)"),
    (
        "k_ts",
        "id timestamp",
        "id",
        "'2020-01-01'::timestamp + g * interval '1 second' + (g % 7) * interval '1 microsecond'",
    ),
    (
        "k_tstz",
        "id timestamptz",
        "id",
        "'2020-01-01 00:00:00+02'::timestamptz + g * interval '1 minute' + (g % 3) * interval '1 microsecond'",
    ),
    ("k_date", "id date", "id", "'2000-01-01'::date + g"),
    ("k_int_text", "a int4, b text", "a, b", "g % 10, 'x' || g"),
    (
        "k_int_uuid",
        "a int8, b uuid",
        "a, b",
        "g % 4, gen_random_uuid()",
    ),
    (
        "k_tstz_int",
        "a timestamptz, b int4",
        "a, b",
        "'2021-06-01'::timestamptz + (g % 13) * interval '1 hour', g",
    ),
];

const ROWS: i64 = 1500;

#[sqlx::test]
async fn every_key_type_is_changed_exactly_once(pool: PgPool) {
    let db = Db::new(pool).await;
    for (table, cols, pk, values) in KEY_TYPES {
        db.exec(&format!(
            "CREATE TABLE {table} ({cols}, n int NOT NULL DEFAULT 0, PRIMARY KEY ({pk}));
             INSERT INTO {table} SELECT {values} FROM generate_series(1, {ROWS}) g;"
        ))
        .await;
        // Predicate `true` with a non-idempotent change: a key visited twice shows as n = 2.
        NewJob::new(table, &format!("public.{table}"))
            .predicate("true")
            .set("n = n + 1")
            .raw("batch_size", "97")
            .insert(&db)
            .await;
    }
    db.daemon()
        .max_batch(97)
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    for (table, ..) in KEY_TYPES {
        let job = db.job(table).await;
        assert_eq!(job.state, "succeeded", "{table}: {:?}", job.last_error);
        assert_eq!(job.rows_changed, ROWS, "{table}");
        assert_eq!(job.rows_scanned, ROWS, "{table}");
        assert!(job.batches >= ROWS / 97, "{table}: {} batches", job.batches);
        let wrong = db
            .scalar_i64(&format!("SELECT count(*) FROM {table} WHERE n <> 1"))
            .await;
        assert_eq!(wrong, 0, "{table}: rows not changed exactly once");
    }
}

#[sqlx::test]
async fn empty_table_and_no_match_succeed_with_nothing_changed(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE empty_t (id bigint PRIMARY KEY, s text);
         CREATE TABLE full_t (id bigint PRIMARY KEY, s text);
         INSERT INTO full_t SELECT g, 'done' FROM generate_series(1, 500) g;",
    )
    .await;
    NewJob::new("empty", "empty_t")
        .predicate("s IS NULL")
        .set("s = 'x'")
        .insert(&db)
        .await;
    NewJob::new("nomatch", "full_t")
        .predicate("s IS NULL")
        .set("s = 'x'")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    for name in ["empty", "nomatch"] {
        let job = db.job(name).await;
        assert_eq!(job.state, "succeeded", "{name}: {:?}", job.last_error);
        assert_eq!(job.rows_changed, 0, "{name}");
        assert_eq!(job.remaining, Some(0), "{name}");
    }
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM full_t WHERE s = 'x'")
            .await,
        0
    );
}

#[sqlx::test]
async fn rows_beyond_the_frozen_upper_bound_are_untouched(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE grow (id bigint PRIMARY KEY, s text);
         INSERT INTO grow SELECT g, NULL FROM generate_series(1, 2000) g;",
    )
    .await;
    NewJob::new("grow", "grow")
        .predicate("s IS NULL")
        .set("s = 'filled'")
        .raw("batch_size", "50")
        .raw("sleep_ms", "20")
        .insert(&db)
        .await;
    let mut daemon = db.daemon().max_batch(50).until_idle().spawn();
    db.wait_for("grow", "first batches", |r| r.batches >= 2)
        .await;
    // Live inserts past the bound while the job runs: it must neither touch them nor chase them.
    for i in 0..20 {
        db.exec(&format!(
            "INSERT INTO grow SELECT g, NULL FROM generate_series({0} + 1, {0} + 100) g",
            2000 + i * 100
        ))
        .await;
    }
    daemon.wait_ok().await;
    let job = db.job("grow").await;
    assert_eq!(job.state, "succeeded");
    assert_eq!(job.upper_bound, Some(serde_json::json!(["2000"])));
    assert_eq!(job.rows_changed, 2000);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM grow WHERE id > 2000 AND s IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM grow WHERE id <= 2000 AND s IS NULL")
            .await,
        0
    );
}

#[sqlx::test]
async fn explicit_and_discovered_keys(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE no_key (a int, s text);
         INSERT INTO no_key SELECT g, NULL FROM generate_series(1, 10) g;
         CREATE TABLE uniq (id serial PRIMARY KEY, code text NOT NULL UNIQUE, maybe text UNIQUE, dup int, s text);
         INSERT INTO uniq (code, maybe, dup, s) SELECT 'c' || g, 'm' || g, g % 2, NULL FROM generate_series(1, 300) g;
         CREATE TABLE uniq_only (code text NOT NULL UNIQUE, s text);
         INSERT INTO uniq_only SELECT 'c' || g, NULL FROM generate_series(1, 300) g;
         CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE TABLE byte_unique (code text COLLATE ci NOT NULL, s text);
         CREATE UNIQUE INDEX ON byte_unique (code COLLATE \"C\");
         INSERT INTO byte_unique SELECT c, NULL FROM unnest(ARRAY['a', 'A', 'b', 'B']) c;",
    )
    .await;
    // (job, table, key_columns, rows changed or words of the error)
    type Case = (
        &'static str,
        &'static str,
        Option<&'static str>,
        Result<i64, &'static str>,
    );
    let cases: &[Case] = &[
        (
            "nokey",
            "no_key",
            None,
            Err("has no primary key or unique index"),
        ),
        ("by_code", "uniq", Some("ARRAY['code']"), Ok(300)),
        (
            "nullable_key",
            "uniq",
            Some("ARRAY['maybe']"),
            Err("allow NULL"),
        ),
        (
            "not_unique",
            "uniq",
            Some("ARRAY['dup']"),
            Err("are not unique"),
        ),
        (
            "missing_col",
            "uniq",
            Some("ARRAY['nope']"),
            Err("does not exist"),
        ),
        ("unique_index_only", "uniq_only", None, Ok(300)),
        // Unique byte for byte, but the walk compares under the column's case-insensitive
        // collation, where 'a' = 'A': not a key (it scanned 3 rows of 4 and broke the revert).
        ("ci_column", "byte_unique", None, Err("own collations")),
    ];
    for (name, table, keys, _) in cases {
        let mut spec = NewJob::new(name, table)
            .predicate("s IS NULL")
            .set(&format!("s = '{name}'"));
        if let Some(k) = keys {
            spec = spec.raw("key_columns", *k);
        }
        spec.insert(&db).await;
    }
    db.daemon().until_idle().spawn().wait_ok().await;
    for (name, _, _, expected) in cases {
        let job = db.job(name).await;
        match expected {
            Ok(n) => {
                assert_eq!(job.state, "succeeded", "{name}: {:?}", job.last_error);
                assert_eq!(job.rows_changed, *n, "{name}");
            }
            Err(msg) => {
                assert_eq!(job.state, "failed", "{name}");
                let err = job.last_error.unwrap_or_default();
                assert!(err.contains(msg) && err.contains(name), "{name}: {err}");
            }
        }
    }
}

#[sqlx::test]
async fn partitioned_tables_are_walked_and_verified_by_key(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE parts (id bigint NOT NULL, region int NOT NULL, s text, PRIMARY KEY (id, region))
             PARTITION BY LIST (region);
         CREATE TABLE parts_1 PARTITION OF parts FOR VALUES IN (1);
         CREATE TABLE parts_2 PARTITION OF parts FOR VALUES IN (2);
         INSERT INTO parts SELECT g, 1 + g % 2, NULL FROM generate_series(1, 3000) g;",
    )
    .await;
    NewJob::new("parts", "parts")
        .predicate("s IS NULL")
        .set("s = 'x'")
        .raw("batch_size", "250")
        .insert(&db)
        .await;
    db.daemon()
        .max_batch(250)
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    let job = db.job("parts").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!(job.rows_changed, 3000);
    assert_eq!(job.remaining, Some(0));
    db.exec("UPDATE parts SET s = NULL WHERE id <= 5").await;
    let remaining = backfilld::ops::verify(
        &db.lib,
        &db.names,
        &backfilld::config::Config::default(),
        "parts",
    )
    .await
    .unwrap();
    assert_eq!(remaining, 5);
}

/// A sparse job walks about its range of matches (the plan's windows with a match), not the
/// whole table, alone or in parallel slices; a job whose predicate matches nothing walks nothing.
/// Rows that start to match after the plan outside that range stay, and verification counts
/// them in `remaining`.
#[sqlx::test]
async fn sparse_jobs_walk_only_where_the_plan_found_matches(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE sparse (id bigint PRIMARY KEY, fixed bool NOT NULL DEFAULT true);
         INSERT INTO sparse SELECT g FROM generate_series(1, 20000) g;
         UPDATE sparse SET fixed = false WHERE id BETWEEN 15001 AND 15100;",
    )
    .await;
    for (name, parallelism) in [("sparse1", 1), ("sparse3", 3)] {
        db.exec("UPDATE sparse SET fixed = false WHERE id BETWEEN 15001 AND 15100")
            .await;
        NewJob::new(name, "sparse")
            .predicate("NOT fixed")
            .set("fixed = true")
            .raw("parallelism", parallelism.to_string())
            .raw("mode", "'dry_run'")
            .insert(&db)
            .await;
        db.daemon().until_idle().spawn().wait_ok().await;
        let planned = db.job(name).await;
        assert_eq!(planned.state, "planned", "{:?}", planned.last_error);
        // A row starts to match after the plan, far from the planned matches.
        db.exec("UPDATE sparse SET fixed = false WHERE id = 42")
            .await;
        backfilld::ops::approve(&db.lib, &db.names, name)
            .await
            .unwrap();
        db.daemon().until_idle().spawn().wait_ok().await;
        let job = db.job(name).await;
        assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
        assert_eq!(job.rows_changed, 100, "{name}");
        assert!(
            job.rows_scanned <= 200,
            "{name} scanned {} keys of 20000 for 100 clustered matches",
            job.rows_scanned
        );
        assert_eq!(
            job.remaining,
            Some(1),
            "{name}: verification counts the row outside the planned range"
        );
        db.exec("UPDATE sparse SET fixed = true WHERE id = 42")
            .await;
    }
    NewJob::new("none", "sparse")
        .predicate("NOT fixed")
        .set("fixed = true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let none = db.job("none").await;
    assert_eq!(none.state, "succeeded", "{:?}", none.last_error);
    assert_eq!((none.rows_scanned, none.remaining), (0, Some(0)));
}

/// The key is frozen with the upper bound. A dry run walks the table's only unique key (`code`);
/// the migration then adds a primary key on `id`, which runs the other way; the approved run
/// must still walk `code`, since its stored bound and cursor are `code` values. Before, the new
/// primary key was chosen, the bound read as an `id`, and the job "succeeded" changing nothing.
/// Its revert walks the same key.
#[sqlx::test]
async fn a_job_keeps_its_key_when_the_table_gains_another(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE k1 (id int NOT NULL, code int NOT NULL, v int NOT NULL DEFAULT 0);
         INSERT INTO k1 SELECT 20001 - g, g, 0 FROM generate_series(1, 3000) g;
         CREATE UNIQUE INDEX k1_code ON k1 (code);",
    )
    .await;
    NewJob::new("k1_fix", "k1")
        .predicate("v = 0")
        .set("v = 1")
        .raw("archive", "true")
        .text("mode", "dry_run")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let planned = db.job("k1_fix").await;
    assert_eq!(planned.state, "planned", "{:?}", planned.last_error);
    assert_eq!(
        planned.key_columns.as_deref(),
        Some(&["code".to_owned()][..])
    );
    db.exec("ALTER TABLE k1 ADD PRIMARY KEY (id)").await;
    backfilld::ops::approve(&db.lib, &db.names, "k1_fix")
        .await
        .unwrap();
    db.daemon().until_idle().spawn().wait_ok().await;
    let done = db.job("k1_fix").await;
    assert_eq!(done.state, "succeeded", "{:?}", done.last_error);
    assert_eq!(done.rows_changed, 3000);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM k1 WHERE v = 1").await,
        3000
    );
    let reverted = db.revert("k1_fix").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM k1 WHERE v = 0").await,
        3000
    );
}
