//! The gates for the step after a backfill, run as the real binary: `backfilld check` (rows a NOT
//! NULL, unique or foreign-key constraint would reject) and `backfilld wait` (the job succeeded
//! and was verified with no row left). Exit codes: 0 passed, 1 error, 3 not passed, 4 timed out.
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler

mod common;

use std::process::Output;

use common::{Db, NewJob};
use serde_json::Value;
use sqlx::PgPool;

/// The binary with windows of 100 keys (batch size 10, counting windows ten times wider) and no
/// pause between them, so a few hundred rows take several windows.
fn backfilld(db: &Db, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backfilld"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("BACKFILLD_BATCH__SIZE", "10")
        .env("BACKFILLD_BATCH__MIN_SIZE", "10")
        .env("BACKFILLD_BATCH__MAX_SIZE", "10")
        .env("BACKFILLD_BATCH__SLEEP_MS", "0")
        .env("BACKFILLD_LOG__LEVEL", "warn");
    cmd
}

async fn run(db: &Db, args: &[&str]) -> Output {
    backfilld(db, args).output().await.expect("run backfilld")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs with `--output json`, expects `code`, returns the printed JSON.
async fn json(db: &Db, args: &[&str], code: i32) -> Value {
    let out = run(db, &[args, &["--output", "json"]].concat()).await;
    assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}

/// The first key column of each sample.
fn sample_keys(finding: &Value) -> Vec<&str> {
    finding["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .map(|s| s["key"][0].as_str().expect("key text"))
        .collect()
}

#[sqlx::test]
async fn not_null_counts_null_rows_across_windows_and_passes_once_filled(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, a text);
         INSERT INTO t SELECT g, 'x' FROM generate_series(1, 250) g;
         UPDATE t SET a = NULL WHERE id IN (5, 95, 150, 151, 190, 200, 240, 250);",
    )
    .await;
    let report = json(&db, &["check", "public.t", "--not-null", "a"], 3).await;
    assert_eq!(report["passed"], false);
    assert_eq!(report["rows_checked"], 250);
    let found = &report["findings"][0];
    assert_eq!(
        (&found["check"], &found["violations"]),
        (&"not_null".into(), &8.into())
    );
    // The first five offenders in key order, from the first two windows of 100 keys.
    assert_eq!(sample_keys(found), ["5", "95", "150", "151", "190"]);

    db.exec("UPDATE t SET a = 'y' WHERE a IS NULL").await;
    let out = run(&db, &["check", "t", "--not-null", "a", "--not-null", "id"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("not-null a: 0 rows are NULL"), "{text}");
    assert!(text.contains("ok: no violations"), "{text}");
}

#[sqlx::test]
async fn unique_counts_duplicate_groups_across_windows_and_rows_with_null(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE u (id int PRIMARY KEY, tenant int, email text);
         INSERT INTO u SELECT g, 100 + g, 'f' FROM generate_series(11, 300) g;
         INSERT INTO u VALUES (1, 1, 'a'), (2, 1, 'b'), (3, 2, 'a'), (150, 1, 'a'), (160, 1, 'b'),
                              (240, 1, 'a'), (7, NULL, 'a'), (8, NULL, 'a'), (9, 3, NULL),
                              (10, 3, NULL)
             ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, email = excluded.email;",
    )
    .await;
    let args = ["check", "u", "--unique", "tenant,email", "--unique", "id"];
    let report = json(&db, &args, 3).await;
    let found = &report["findings"][0];
    assert_eq!(found["subject"], "tenant, email");
    // (1, a) three times and (1, b) twice, their rows windows apart; NULLs never duplicate.
    assert_eq!(found["violations"], 2);
    assert_eq!(found["duplicate_rows"], 5);
    assert_eq!(found["rows_with_null"], 4);
    assert_eq!(
        found["samples"],
        serde_json::json!([{"value": ["1", "a"], "rows": 3}, {"value": ["1", "b"], "rows": 2}])
    );
    assert_eq!(report["findings"][1]["violations"], 0);

    db.exec("DELETE FROM u WHERE id IN (150, 160, 240)").await;
    let report = json(&db, &args, 0).await;
    let found = &report["findings"][0];
    assert_eq!(
        (&found["violations"], &found["rows_with_null"]),
        (&0.into(), &4.into())
    );
}

#[sqlx::test]
async fn orphans_counts_children_without_a_parent_including_self_references(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE p (id int PRIMARY KEY);
         INSERT INTO p SELECT generate_series(1, 50);
         CREATE TABLE c (id int PRIMARY KEY, p_id int, boss int);
         INSERT INTO c SELECT g, g % 50 + 1, nullif(g - 1, 0) FROM generate_series(1, 200) g;
         UPDATE c SET p_id = 99 WHERE id = 30;
         UPDATE c SET p_id = 98 WHERE id = 120;
         UPDATE c SET p_id = NULL WHERE id IN (40, 41);
         UPDATE c SET boss = 500 WHERE id = 77;",
    )
    .await;
    let args = [
        "check",
        "public.c",
        "--orphans",
        "p_id",
        "--references",
        "public.p(id)",
        "--orphans",
        "boss",
        "--references",
        "c(id)",
    ];
    let report = json(&db, &args, 3).await;
    let (parent, boss) = (&report["findings"][0], &report["findings"][1]);
    assert_eq!(parent["subject"], "p_id -> public.p(id)");
    // NULL references are not orphans (a foreign key lets them in).
    assert_eq!(parent["violations"], 2);
    assert_eq!(
        parent["samples"],
        serde_json::json!([{"key": ["30"], "value": "99"}, {"key": ["120"], "value": "98"}])
    );
    // The child column stays the child's inside the probe of the same table.
    assert_eq!(boss["violations"], 1);
    assert_eq!(sample_keys(boss), ["77"]);

    db.exec("INSERT INTO p VALUES (98), (99); UPDATE c SET boss = 76 WHERE id = 77")
        .await;
    let report = json(&db, &args, 0).await;
    assert_eq!(report["passed"], true);

    // Text columns of different collations compare under the parent's, whose key is unique
    // under it (compared as they are, PostgreSQL cannot pick one: 42P22).
    db.exec(
        r#"CREATE TABLE codes (code text COLLATE "C" PRIMARY KEY);
           INSERT INTO codes VALUES ('a'), ('b');
           CREATE TABLE uses (id int PRIMARY KEY, code text COLLATE "POSIX", other text);
           INSERT INTO uses VALUES (1, 'a', 'b'), (2, 'b', 'x'), (3, 'z', 'a');"#,
    )
    .await;
    let args = [
        "check",
        "uses",
        "--orphans",
        "code",
        "--references",
        "codes(code)",
        "--orphans",
        "other",
        "--references",
        "codes(code)",
    ];
    let report = json(&db, &args, 3).await;
    assert_eq!(sample_keys(&report["findings"][0]), ["3"]);
    assert_eq!(sample_keys(&report["findings"][1]), ["2"]);
}

#[sqlx::test]
async fn check_refuses_unknown_columns_and_tables_jobs_may_not_target(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        r#"CREATE TABLE t (id int PRIMARY KEY, a text); CREATE TABLE nokey (a int);
           CREATE TABLE "Odd T" (id int PRIMARY KEY);"#,
    )
    .await;
    let cases: [(&[&str], &str); 8] = [
        (
            // Names are shown as PostgreSQL shows them, quoted where they need it.
            &["check", r#"public."Odd T""#, "--not-null", "a"],
            r#"table public."Odd T" has no column "a""#,
        ),
        (
            &["check", "t", "--orphans", "a", "--references", "t(a)"],
            "public.t has no unique key on exactly (a)",
        ),
        (
            &["check", "t", "--not-null", "a; DROP TABLE t"],
            "table public.t has no column \"a; DROP TABLE t\"",
        ),
        (
            &["check", "t", "--unique", "a,Id"],
            "table public.t has no column \"Id\"",
        ),
        (
            &["check", "t", "--orphans", "a", "--references", "t(nope)"],
            "table public.t has no column \"nope\"",
        ),
        (
            &[
                "check",
                "t",
                "--orphans",
                "a",
                "--references",
                "missing(id)",
            ],
            "no table \"missing\"",
        ),
        (
            &["check", "backfill.jobs", "--not-null", "name"],
            "backfilld never changes",
        ),
        (&["check", "nokey", "--not-null", "a"], "has no primary key"),
    ];
    for (args, message) in cases {
        let out = run(&db, args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM t").await, 0);
    let none = run(&db, &["check", "t"]).await;
    assert_eq!(none.status.code(), Some(2), "a check flag is required");
}

#[sqlx::test]
async fn wait_passes_only_a_verified_success(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE items (id int PRIMARY KEY, s text);
         INSERT INTO items SELECT g, NULL FROM generate_series(1, 300) g;",
    )
    .await;
    NewJob::new("fill", "public.items")
        .predicate("s IS NULL")
        .set("s = 'x'")
        .insert(&db)
        .await;
    // Waiting from before the job runs: the gate polls until it has finished.
    let waiter = backfilld(&db, &["wait", "fill", "--timeout", "2m"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn wait");
    db.daemon().until_idle().spawn().wait_ok().await;
    let out = waiter.wait_with_output().await.expect("wait output");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("fill: succeeded and verified"),
        "{}",
        stdout(&out)
    );

    // Rows matching again, counted by a verify: the job no longer passes.
    db.exec("UPDATE items SET s = NULL WHERE id <= 3").await;
    assert!(run(&db, &["verify", "fill"]).await.status.success());
    let verdict = json(&db, &["wait", "fill"], 3).await;
    assert_eq!(
        (&verdict["gate"], &verdict["remaining"]),
        (&"remaining".into(), &3.into())
    );
    assert!(
        verdict["message"]
            .as_str()
            .is_some_and(|m| m.contains("3 rows up to its upper bound still match")),
        "{verdict}"
    );
}

#[sqlx::test]
async fn wait_fails_a_failed_job_with_its_error_and_a_dry_run_awaiting_approval(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, s text); INSERT INTO items VALUES (1, NULL);")
        .await;
    NewJob::new("broken", "public.items")
        .predicate("s IS NULL")
        .set("nope = 1")
        .insert(&db)
        .await;
    NewJob::new("dry", "public.items")
        .predicate("s IS NULL")
        .set("s = 'x'")
        .text("mode", "dry_run")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let error = db.job("broken").await.last_error.expect("last_error");
    let out = run(&db, &["wait", "broken"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("broken: failed: {error}")),
        "{}",
        stderr(&out)
    );
    let out = run(&db, &["wait", "dry"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("dry: is a dry run awaiting approval"),
        "{}",
        stderr(&out)
    );
}

#[sqlx::test]
async fn wait_times_out_on_a_running_job(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE items (id int PRIMARY KEY, s text);
         INSERT INTO items SELECT g, NULL FROM generate_series(1, 100) g;",
    )
    .await;
    // Long pauses (between its plan's counting windows, then its batches): it stays running.
    NewJob::new("slow", "public.items")
        .predicate("s IS NULL")
        .set("s = 'x'")
        .raw("batch_size", "10")
        .raw("sleep_ms", "600000")
        .insert(&db)
        .await;
    let _daemon = db.daemon().max_batch(10).spawn();
    db.wait_state("slow", "running").await;
    let out = run(&db, &["wait", "slow", "--timeout", "1s"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains("slow: still running"), "{text}");
    assert!(text.contains("waited 1s"), "{text}");
    let missing = run(&db, &["wait", "nope", "--timeout", "1s"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("no job named"));
    let bad = run(&db, &["wait", "slow", "--timeout", "soon"]).await;
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}

/// 50 rows of `items` filled by the archived job `fill`, run to its end.
async fn filled_items(db: &Db) {
    db.exec(
        "CREATE TABLE items (id int PRIMARY KEY, s text);
         INSERT INTO items SELECT g, NULL FROM generate_series(1, 50) g;",
    )
    .await;
    NewJob::new("fill", "public.items")
        .predicate("s IS NULL")
        .set("s = 'x'")
        .raw("archive", "true")
        .insert(db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
}

/// A gate passed a job whose change a revert had undone: `wait fill && DROP COLUMN old` would
/// have run against restored rows. Now a revert that is queued, running, or has restored rows
/// fails the gate, naming it; one that failed before restoring anything does not.
#[sqlx::test]
async fn wait_fails_a_job_whose_change_a_revert_undoes(pool: PgPool) {
    let db = Db::new(pool).await;
    filled_items(&db).await;
    assert_eq!(run(&db, &["wait", "fill"]).await.status.code(), Some(0));

    assert!(run(&db, &["revert", "fill"]).await.status.success());
    let queued = json(&db, &["wait", "fill"], 3).await;
    assert_eq!(
        (&queued["gate"], &queued["reverted_by"]),
        (&"reverted".into(), &"fill__revert".into())
    );
    assert!(
        queued["message"]
            .as_str()
            .is_some_and(|m| m.contains("fill: is being reverted by fill__revert (pending")),
        "{queued}"
    );

    db.daemon().until_idle().spawn().wait_ok().await;
    let out = run(&db, &["wait", "fill"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("fill: was reverted by fill__revert (50 rows restored)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        run(&db, &["wait", "fill__revert"]).await.status.code(),
        Some(0),
        "the revert itself passes"
    );
}

/// A revert cancelled after restoring rows, then another cancelled before restoring any: the
/// change is still partly undone. Only the latest revert was read, and dropped for restoring
/// nothing, so the gate passed.
#[sqlx::test]
async fn wait_counts_a_partial_revert_behind_an_empty_one(pool: PgPool) {
    let db = Db::new(pool).await;
    filled_items(&db).await;
    // The first revert as a cancel mid-run leaves it: 20 rows restored, then cancelled (set
    // here rather than raced); the second is cancelled before it runs.
    assert!(run(&db, &["revert", "fill"]).await.status.success());
    db.exec(
        "UPDATE items SET s = NULL WHERE id <= 20;
         UPDATE backfill.jobs SET state = 'cancelled', rows_changed = 20, finished_at = now()
         WHERE name = 'fill__revert'",
    )
    .await;
    assert!(run(&db, &["revert", "fill"]).await.status.success());
    assert!(
        run(&db, &["cancel", "fill__revert2"])
            .await
            .status
            .success()
    );
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("fill__revert2").await.state, "cancelled");
    let out = run(&db, &["wait", "fill"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(
            "fill: was partly reverted by fill__revert (cancelled after restoring 20 rows)"
        ),
        "{}",
        stderr(&out)
    );
}

/// A dry run on an empty table ended `succeeded` without an approval, so `wait` passed a job
/// nobody approved and `execute` was refused. It now plans 0 rows and waits for the approval;
/// the empty range is frozen, so rows that arrive before the approval are not changed unseen.
#[sqlx::test]
async fn a_dry_run_on_an_empty_table_plans_and_waits_for_approval(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, s text)")
        .await;
    NewJob::new("empty_dry", "public.items")
        .predicate("s IS NULL")
        .set("s = 'x'")
        .text("mode", "dry_run")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("empty_dry").await;
    assert_eq!(job.state, "planned", "{:?}", job.last_error);
    assert_eq!(job.plan.expect("a plan")["rows_matching"], 0);
    let out = run(&db, &["wait", "empty_dry"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("awaiting approval"),
        "{}",
        stderr(&out)
    );
    assert!(run(&db, &["status", "empty_dry"]).await.status.success());

    db.exec("INSERT INTO items VALUES (1, NULL), (2, NULL)")
        .await;
    let out = run(&db, &["execute", "empty_dry"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("empty_dry").await;
    assert_eq!(
        (job.state.as_str(), job.rows_changed),
        ("succeeded", 0),
        "the approved plan covered no row: {:?}",
        job.last_error
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE s IS NULL")
            .await,
        2
    );
}

/// `execute` approved a planned job whose cancel had been requested, and `wait` then told the
/// user to approve it: a requested cancel is final, so both now say so.
#[sqlx::test]
async fn a_requested_cancel_is_not_approved_away(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, s text); INSERT INTO items VALUES (1, NULL);")
        .await;
    NewJob::new("dry1", "public.items")
        .predicate("s IS NULL")
        .set("s = 'x'")
        .text("mode", "dry_run")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert!(run(&db, &["cancel", "dry1"]).await.status.success());
    let out = run(&db, &["wait", "dry1", "--timeout", "1s"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("waiting for a replica to apply its cancel"),
        "{}",
        stderr(&out)
    );
    let out = run(&db, &["execute", "dry1"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("its cancel was requested"),
        "{}",
        stderr(&out)
    );
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("dry1").await;
    assert_eq!(
        (job.state.as_str(), job.mode.as_deref()),
        ("cancelled", Some("dry_run"))
    );
}

/// `check` edge cases a review found: a quoted parent column holding `(` was split at the wrong
/// parenthesis; a table with a `_bf_` column failed with a raw 42702 (its aliases collided) where
/// jobs refuse it by name; a table keyed by a unique NOT NULL column other than a primary key
/// could not be walked (the message advised `key_columns`, which `check` did not take); an
/// integer child against a text parent failed with "collations are not supported by type
/// integer".
#[sqlx::test]
async fn check_parses_quoted_parents_takes_key_columns_and_names_its_refusals(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        r#"CREATE TABLE pp (id int PRIMARY KEY, "a(b)" int UNIQUE);
           INSERT INTO pp VALUES (1, 10), (2, 20);
           CREATE TABLE child (id int PRIMARY KEY, pid int);
           INSERT INTO child VALUES (1, 10), (2, 30), (3, NULL);
           CREATE TABLE bfk (id int PRIMARY KEY, "_bf_rows" int);
           CREATE TABLE nokey (a int NOT NULL, b int, c int UNIQUE);
           CREATE UNIQUE INDEX nokey_a ON nokey (a);
           INSERT INTO nokey VALUES (1, NULL, 1), (2, 5, 2);
           CREATE TABLE tparent (code text PRIMARY KEY);"#,
    )
    .await;
    let report = json(
        &db,
        &[
            "check",
            "public.child",
            "--orphans",
            "pid",
            "--references",
            r#"public.pp("a(b)")"#,
        ],
        3,
    )
    .await;
    assert_eq!(report["findings"][0]["violations"], 1, "{report}");

    let out = run(&db, &["check", "public.bfk", "--unique", "_bf_rows"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(r#"column "_bf_rows" starts with "_bf_""#),
        "{}",
        stderr(&out)
    );

    let report = json(
        &db,
        &[
            "check",
            "public.nokey",
            "--not-null",
            "b",
            "--key-columns",
            "a",
        ],
        3,
    )
    .await;
    assert_eq!(report["findings"][0]["violations"], 1, "{report}");

    let out = run(
        &db,
        &[
            "check",
            "public.child",
            "--orphans",
            "pid",
            "--references",
            "public.tparent(code)",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(
            "--orphans pid (integer) cannot be compared with public.tparent(code) (text)"
        ),
        "{}",
        stderr(&out)
    );
}

/// `safety.allowed_tables` compared its entries with `schema.table` as text: `public.Orders`
/// did not allow `public.orders` (SQL folds it), a quoted `public."Odd Table"` allowed nothing,
/// and `["public.orders"]` (the TOML list pasted into the variable) was accepted and matched
/// nothing. Entries now read as SQL names; one that is not is a configuration error (exit 2).
#[sqlx::test]
async fn allowed_tables_read_as_sql_names(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(r#"CREATE TABLE orders (id int PRIMARY KEY, a int); CREATE TABLE "Odd Table" (id int PRIMARY KEY, a int); CREATE TABLE other (id int PRIMARY KEY, a int);"#)
        .await;
    let check = |allowed: &str, table: &str| {
        let mut cmd = backfilld(&db, &["check", table, "--not-null", "a"]);
        cmd.env("BACKFILLD_SAFETY__ALLOWED_TABLES", allowed);
        cmd
    };
    let allowed = r#"public.Orders, public."Odd Table""#;
    for table in ["public.orders", r#"public."Odd Table""#] {
        let out = check(allowed, table).output().await.unwrap();
        assert_eq!(out.status.code(), Some(0), "{table}: {}", stderr(&out));
    }
    let out = check(allowed, "public.other").output().await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out)
            .contains(r#"is not in safety.allowed_tables (public.Orders, public."Odd Table")"#),
        "{}",
        stderr(&out)
    );
    let out = check(r#"["public.orders"]"#, "public.orders")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("is not a schema-qualified table name"),
        "{}",
        stderr(&out)
    );
}

/// `status` printed a job name holding a newline (a row inserted by SQL; the job fails at its
/// claim but stays in the ledger) across two lines, and a name longer than 32 characters shifted
/// every column of its row.
#[sqlx::test]
async fn status_prints_one_aligned_line_per_job(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, s text)")
        .await;
    for name in [
        "two\nlines",
        "a_name_much_longer_than_thirty_two_characters",
        "short",
    ] {
        NewJob::new(name, "public.items")
            .predicate("s IS NULL")
            .set("s = 'x'")
            .insert(&db)
            .await;
    }
    db.daemon().until_idle().spawn().wait_ok().await;
    let out = run(&db, &["status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "a header and one line per job: {text}");
    assert!(
        lines.iter().any(|l| l.starts_with(r"two\nlines ")),
        "{text}"
    );
    let state_at = |l: &str| l.find("failed").or(l.find("succeeded")).expect("a state");
    let columns: Vec<usize> = lines[1..].iter().map(|l| state_at(l)).collect();
    assert!(columns.windows(2).all(|w| w[0] == w[1]), "{text}");
}
