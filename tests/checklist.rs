//! The data-change checklist in the plan: the idempotency verdict, and deletes that would cascade.
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler

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

/// A predicate whose subquery makes every batch read another table in full is named in the plan;
/// the same subquery written to probe an index per row is not.
#[sqlx::test]
async fn the_plan_names_a_table_every_batch_would_read_in_full(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE customers (id bigint PRIMARY KEY, email text NOT NULL);
         INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 100000) g;
         CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint, email text, flag bool);
         INSERT INTO orders SELECT g, g * 3, 'c' || g * 3 FROM generate_series(1, 20000) g;
         ANALYZE customers; ANALYZE orders;",
    )
    .await;
    for (name, predicate) in [
        (
            "hashed",
            "EXISTS (SELECT 1 FROM customers c WHERE c.email = orders.email)",
        ),
        (
            "probed",
            "EXISTS (SELECT 1 FROM customers c WHERE c.id = orders.customer_id OFFSET 0)",
        ),
        (
            "self",
            "EXISTS (SELECT 1 FROM orders o WHERE o.email = orders.email AND o.id < orders.id)",
        ),
    ] {
        NewJob::new(name, "orders")
            .predicate(predicate)
            .set("flag = true")
            .raw("batch_size", "1000")
            .raw("mode", "'dry_run'")
            .insert(&db)
            .await;
    }
    db.daemon().until_idle().spawn().wait_ok().await;
    let warnings =
        |plan: serde_json::Value| plan["warnings"].as_array().cloned().unwrap_or_default();
    let hashed = db.job("hashed").await.plan.expect("a plan");
    let found = warnings(hashed.clone());
    assert_eq!(found.len(), 1, "{hashed}");
    let text = found[0].as_str().unwrap_or_default();
    assert!(
        text.contains("public.customers") && text.contains("OFFSET 0"),
        "{text}"
    );
    let probed = db.job("probed").await.plan.expect("a plan");
    assert!(warnings(probed.clone()).is_empty(), "{probed}");
    // A delete-the-duplicates shape: the subquery reads the target itself, unindexed.
    let own = db.job("self").await.plan.expect("a plan");
    let found = warnings(own.clone());
    assert_eq!(found.len(), 1, "{own}");
    assert!(
        found[0]
            .as_str()
            .unwrap_or_default()
            .contains("public.orders")
    );
}

/// An insert job: `set` maps `into`'s columns to expressions over each row of `from`, every row
/// of which it walks (predicate `true`).
fn insert_job(name: &str, into: &str, from: &str, set: &str) -> NewJob {
    NewJob::new(name, into)
        .raw("action", "'insert'")
        .text("source_table", from)
        .predicate("true")
        .set(set)
}

/// An insert's plan times a trial write, rolled back, like an update's, unless the target's
/// defaults would draw sequence values (which a rollback does not give back): then it
/// estimates from the initial batch size. Inserts had had no trial at all, and a formula that
/// said "0s" for a copy that took 18 s.
#[sqlx::test]
async fn an_insert_plan_times_a_trial_unless_it_would_draw_sequence_values(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE people (id bigint PRIMARY KEY, plan text NOT NULL);
         INSERT INTO people SELECT g, 'free' FROM generate_series(1, 20000) g;
         CREATE TABLE copies (id bigint PRIMARY KEY, plan text NOT NULL);
         CREATE TABLE events (id bigserial PRIMARY KEY, person bigint NOT NULL);
         CREATE SEQUENCE ticket_seq;
         CREATE DOMAIN ticket AS bigint DEFAULT nextval('ticket_seq');
         CREATE TABLE tickets (person bigint PRIMARY KEY, n ticket);",
    )
    .await;
    insert_job("issue", "tickets", "people", "person = id")
        .raw("mode", "'dry_run'")
        .insert(&db)
        .await;
    insert_job("copy", "copies", "people", "id = id, plan = plan")
        .raw("mode", "'dry_run'")
        .insert(&db)
        .await;
    insert_job("log", "events", "people", "person = id")
        .raw("mode", "'dry_run'")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let basis = |name: &'static str| {
        let db = &db;
        async move {
            let job = db.job(name).await;
            assert_eq!(job.state, "planned", "{:?}", job.last_error);
            job.plan.expect("a plan")["estimate_basis"].to_string()
        }
    };
    let copy = basis("copy").await;
    assert!(copy.contains("a trial write"), "{copy}");
    let log = basis("log").await;
    assert!(log.contains("roughly: no trial write"), "{log}");
    // The domain's default draws from a sequence too (a trial had drawn 2,010 values).
    let issue = basis("issue").await;
    assert!(issue.contains("roughly: no trial write"), "{issue}");
    assert!(
        db.scalar_i64("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM ticket_seq")
            .await
            <= 20
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM copies").await,
        0,
        "the trial rolled back"
    );
    // The "run it twice" check inserts its 10 sampled rows (rolled back): at most those values
    // are drawn, not a trial's thousands.
    assert!(
        db.scalar_i64("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM events_id_seq")
            .await
            <= 20
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

/// The predicate names its table, as a batch's `DELETE FROM parent WHERE …` allows: the plan
/// counts the children all the same (it had said "uncounted", and refused a delete no child
/// row blocked or passed one that failed mid-run).
#[sqlx::test]
async fn a_delete_that_would_cascade_fails_in_its_plan(pool: PgPool) {
    let db = Db::new(pool).await;
    family(&db).await;
    NewJob::new("purge", "parent")
        .predicate("parent.kind = 'old' AND public.parent.id > 0")
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

/// `ON DELETE SET NULL` into a column that refuses NULL fails like `NO ACTION` (23502 on the first
/// child row), whatever `allow_cascade` says: the plan refuses it before any batch, here through
/// the whole key, a PostgreSQL 15 column list and a NOT NULL domain, where it used to pass as a
/// cascade. So does `SET DEFAULT` into a NOT NULL column without a default.
#[sqlx::test]
async fn a_delete_setting_null_into_a_not_null_column_fails_in_its_plan(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE team (id int PRIMARY KEY, gone bool NOT NULL);
         CREATE TABLE member (id int PRIMARY KEY,
                              team_id int NOT NULL REFERENCES team ON DELETE SET NULL);
         CREATE TABLE badge (tenant int NOT NULL, team_id int, PRIMARY KEY (tenant, team_id),
                             FOREIGN KEY (team_id) REFERENCES team ON DELETE SET NULL (team_id));
         CREATE TABLE memo (id int PRIMARY KEY, team_id int REFERENCES team ON DELETE SET NULL);
         CREATE DOMAIN team_ref AS int NOT NULL;
         CREATE TABLE seat (id int PRIMARY KEY, team_id team_ref REFERENCES team ON DELETE SET NULL);
         CREATE TABLE desk (id int PRIMARY KEY,
                            team_id int NOT NULL REFERENCES team ON DELETE SET DEFAULT);
         CREATE TABLE room (id int PRIMARY KEY,
                            team_id int NOT NULL DEFAULT 20 REFERENCES team ON DELETE SET DEFAULT);
         CREATE DOMAIN team_ref_deep AS team_ref;
         CREATE TABLE chair (id int PRIMARY KEY,
                             team_id team_ref_deep REFERENCES team ON DELETE SET NULL);
         CREATE DOMAIN team_ref_20 AS int NOT NULL DEFAULT 20;
         CREATE TABLE lamp (id int PRIMARY KEY,
                            team_id team_ref_20 DEFAULT NULL REFERENCES team ON DELETE SET DEFAULT);
         CREATE TABLE shelf (id int PRIMARY KEY,
                             team_id team_ref_20 REFERENCES team ON DELETE SET DEFAULT);
         INSERT INTO team SELECT g, g <= 5 FROM generate_series(1, 20) g;
         INSERT INTO member VALUES (1, 3), (2, 15);
         INSERT INTO badge VALUES (1, 4);
         INSERT INTO memo VALUES (1, 2);
         INSERT INTO seat VALUES (1, 1);
         INSERT INTO desk VALUES (1, 5);
         INSERT INTO room VALUES (1, 5);
         INSERT INTO chair VALUES (1, 2);
         INSERT INTO lamp VALUES (1, 2);
         INSERT INTO shelf VALUES (1, 2);",
    )
    .await;
    NewJob::new("disband", "team")
        .predicate("gone")
        .raw("action", "'delete'")
        .raw("allow_cascade", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("disband").await;
    let err = job.last_error.unwrap_or_default();
    assert_eq!((job.state.as_str(), job.batches), ("failed", 0), "{err}");
    for want in [
        "member_team_id_fkey on public.member (ON DELETE SET NULL into a NOT NULL column, 1 \
         child row)",
        "badge_team_id_fkey on public.badge (ON DELETE SET NULL into a NOT NULL column, 1 child \
         row)",
        "seat_team_id_fkey on public.seat (ON DELETE SET NULL into a NOT NULL column, 1 child \
         row)",
        "desk_team_id_fkey on public.desk (ON DELETE SET DEFAULT into a NOT NULL column without \
         a default, 1 child row)",
        "chair_team_id_fkey on public.chair (ON DELETE SET NULL into a NOT NULL column, 1 child \
         row)",
        "lamp_team_id_fkey on public.lamp (ON DELETE SET DEFAULT into a NOT NULL column without \
         a default, 1 child row)",
    ] {
        assert!(err.contains(want), "expected {want:?} in: {err}");
    }
    assert!(
        !err.contains("memo_"),
        "a nullable column takes the NULL: {err}"
    );
    assert!(!err.contains("room_"), "a default fills the column: {err}");
    assert!(
        !err.contains("shelf_"),
        "the domain's default fills it: {err}"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM team").await, 20);

    // A table's key on itself that sets NULL where it may not is judged like a tree's NO ACTION
    // key: children the delete leaves behind refuse it; selected children only warn (they go
    // with their parent when the batch holds both).
    db.exec(
        "CREATE TABLE node (id int PRIMARY KEY,
                            up int NOT NULL REFERENCES node ON DELETE SET NULL);
         INSERT INTO node VALUES (1, 1), (2, 1), (3, 2), (4, 2), (5, 1);",
    )
    .await;
    let prune = |name: &'static str, predicate: &'static str| {
        NewJob::new(name, "node")
            .predicate(predicate)
            .raw("action", "'delete'")
            .raw("allow_cascade", "true")
    };
    // One at a time: the subtree's delete would leave the other nothing to refuse.
    prune("leaves_a_child", "id = 2 OR id = 3")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    prune("whole_subtree", "id BETWEEN 2 AND 4")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let refused = db.job("leaves_a_child").await;
    let err = refused.last_error.unwrap_or_default();
    assert_eq!(refused.state, "failed", "{err}");
    assert!(
        err.contains(
            "node_up_fkey on public.node (ON DELETE SET NULL into a NOT NULL column, 1 \
                      child row)"
        ),
        "{err}"
    );
    let subtree = db.job("whole_subtree").await;
    assert_eq!(subtree.state, "succeeded", "{:?}", subtree.last_error);
    let warnings = subtree.plan.expect("a plan")["warnings"].to_string();
    assert!(
        warnings.contains("reference other rows it selects"),
        "{warnings}"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM node").await, 2);
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

/// Keys below the target: the delete's cascade into `builds` deletes builds, whose own keys act
/// in turn. The plan had listed only `builds`: the artifacts deleted with them went unmentioned,
/// and a note forbidding the delete of its build failed the job after earlier batches had
/// committed. Both are planned now, counted through the chain.
#[sqlx::test]
async fn a_delete_plans_the_keys_below_the_tables_it_cascades_into(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE projects (id bigint PRIMARY KEY, pending bool NOT NULL);
         CREATE TABLE builds (id bigint PRIMARY KEY,
                              project_id bigint NOT NULL REFERENCES projects ON DELETE CASCADE);
         CREATE TABLE artifacts (id bigint PRIMARY KEY,
                                 build_id bigint NOT NULL REFERENCES builds ON DELETE CASCADE);
         CREATE TABLE notes (id bigint PRIMARY KEY, build_id bigint REFERENCES builds);
         INSERT INTO projects SELECT g, g % 10 = 0 FROM generate_series(1, 100) g;
         INSERT INTO builds SELECT g, 1 + g % 100 FROM generate_series(1, 1000) g;
         INSERT INTO artifacts SELECT g, g FROM generate_series(1, 1000, 3) g;
         INSERT INTO notes VALUES (1, 999), (2, 5);",
    )
    .await;
    let purge = |name: &'static str| {
        NewJob::new(name, "projects")
            .predicate("projects.pending")
            .raw("action", "'delete'")
            .raw("allow_cascade", "true")
            .raw("batch_size", "3")
    };
    purge("purge").insert(&db).await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("purge").await;
    assert_eq!((job.state.as_str(), job.batches), ("failed", 0));
    let err = job.last_error.unwrap_or_default();
    assert!(
        err.contains(
            "notes_build_id_fkey on public.notes (ON DELETE NO ACTION, 1 child row, through \
             public.builds)"
        ),
        "build 999 belongs to project 100: {err}"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM projects").await, 100);

    db.exec("DELETE FROM notes WHERE id = 1").await;
    purge("purge_again").insert(&db).await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("purge_again").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    let cascades = job.plan.expect("a plan")["cascades"].clone();
    let listed: Vec<(String, i64, String)> = cascades
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["child"].as_str().unwrap().to_owned(),
                c["child_rows"].as_i64().unwrap_or(-1),
                c["via"].to_string(),
            )
        })
        .collect();
    // Builds of projects 10, 20, …, 100: 100; artifacts of those builds (ids 1 mod 3): 33 or 34.
    let artifacts = db
        .scalar_i64("SELECT count(*) FROM artifacts WHERE build_id % 10 = 9")
        .await;
    assert_eq!(artifacts, 0, "deleted with their builds");
    assert_eq!(listed.len(), 2, "{cascades}");
    assert_eq!(listed[0].0, "public.builds");
    assert_eq!(listed[0].1, 100);
    assert_eq!(listed[1].0, "public.artifacts");
    assert_eq!(listed[1].2, "[\"public.builds\"]");
    assert!(listed[1].1 > 0, "{cascades}");
}

/// A table a cascade empties may hold a key on itself: rows the cascade keeps that reference a
/// row it removes make that key fail (here SET NULL into NOT NULL, 23502 at the first batch
/// after the plan passed). Counted through the chain like any key below; rows whose parent
/// goes with them do not count.
#[sqlx::test]
async fn a_delete_plans_a_key_on_itself_below_a_cascade(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE pe (id int PRIMARY KEY);
         CREATE TABLE ce (id int PRIMARY KEY, pid int REFERENCES pe ON DELETE CASCADE,
                          parent int NOT NULL REFERENCES ce ON DELETE SET NULL);
         INSERT INTO pe SELECT generate_series(1, 10);
         INSERT INTO ce VALUES (1, 5, 1), (2, 9, 1), (3, 5, 1), (4, 7, 4);",
    )
    .await;
    let purge = |name: &'static str, predicate: &'static str| {
        NewJob::new(name, "pe")
            .predicate(predicate)
            .raw("action", "'delete'")
            .raw("allow_cascade", "true")
    };
    purge("keeps_a_child", "id = 5").insert(&db).await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let refused = db.job("keeps_a_child").await;
    let err = refused.last_error.unwrap_or_default();
    assert_eq!(
        (refused.state.as_str(), refused.batches),
        ("failed", 0),
        "{err}"
    );
    assert!(
        err.contains(
            "ce_parent_fkey on public.ce (ON DELETE SET NULL into a NOT NULL column, 1 child \
             row, through public.ce)"
        ),
        "row 2 stays and references row 1: {err}"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM ce").await, 4);

    purge("whole_family", "id IN (5, 9)").insert(&db).await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let family = db.job("whole_family").await;
    assert_eq!(family.state, "succeeded", "{:?}", family.last_error);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM ce").await, 1);
    // Rows 2 and 3 go with row 1 only when one batch removes them all: the plan says so.
    let warnings = family.plan.expect("a plan")["warnings"].to_string();
    assert!(
        warnings.contains("2 rows of public.ce that the delete removes through public.ce"),
        "{warnings}"
    );
}

/// Cascades are followed sixteen tables down; a key deeper than that is listed uncounted, and the
/// plan warns that a batch reaching a row it protects would fail. (The plan used to stop six
/// tables down without a word: a RESTRICT key seven levels below failed the job mid-run.)
#[sqlx::test]
async fn a_delete_plans_deep_cascades_and_warns_past_the_depth_it_follows(pool: PgPool) {
    let db = Db::new(pool).await;
    let chain = |prefix: &str, levels: usize| {
        let mut sql = format!(
            "CREATE TABLE {prefix}0 (id int PRIMARY KEY);
             INSERT INTO {prefix}0 SELECT generate_series(1, 10);"
        );
        for i in 1..=levels {
            sql += &format!(
                "CREATE TABLE {prefix}{i} (id int PRIMARY KEY,
                                           up int REFERENCES {prefix}{} ON DELETE CASCADE);
                 INSERT INTO {prefix}{i} SELECT g, g FROM generate_series(1, 10) g;",
                i - 1
            );
        }
        sql + &format!(
            "CREATE TABLE {prefix}_kept (id int PRIMARY KEY,
                                         up int REFERENCES {prefix}{levels} ON DELETE RESTRICT);
             INSERT INTO {prefix}_kept VALUES (1, 2);"
        )
    };
    db.exec(&chain("s", 7)).await;
    db.exec(&chain("d", 16)).await;
    let purge = |name: &'static str, table: &'static str| {
        NewJob::new(name, table)
            .predicate("id <= 3")
            .raw("action", "'delete'")
            .raw("allow_cascade", "true")
    };
    purge("seven", "s0").insert(&db).await;
    purge("sixteen", "d0").insert(&db).await;
    db.daemon().until_idle().spawn().wait_ok().await;

    let seven = db.job("seven").await;
    let err = seven.last_error.unwrap_or_default();
    assert_eq!(
        (seven.state.as_str(), seven.batches),
        ("failed", 0),
        "{err}"
    );
    assert!(
        err.contains(
            "s_kept_up_fkey on public.s_kept (ON DELETE RESTRICT, 1 child row, through \
                      public.s1, public.s2, public.s3, public.s4, public.s5, public.s6, public.s7)"
        ),
        "{err}"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM s0").await, 10);

    let sixteen = db.job("sixteen").await;
    let err = sixteen.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("violates foreign key constraint"),
        "the key past the depth is not counted, so the run meets it: {err}"
    );
    let warnings = sixteen.plan.expect("a plan")["warnings"].to_string();
    assert!(
        warnings.contains("d_kept_up_fkey on public.d_kept (ON DELETE RESTRICT, uncounted")
            && warnings.contains("more than 16 tables below the target")
            && warnings.contains("a batch deleting a row they reference fails the job"),
        "{warnings}"
    );
}

/// A delete aimed at one partition (purging an old partition at a time) finds the foreign keys
/// that reference the partitioned table: PostgreSQL gives each partition its own copy of such a
/// key, which the plan used to skip, so the delete cascaded into child rows archived nowhere.
#[sqlx::test]
async fn a_delete_on_one_partition_sees_the_keys_that_reference_its_table(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE orders (id bigint, created date, status text,
                              PRIMARY KEY (id, created)) PARTITION BY RANGE (created);
         CREATE TABLE orders_2019 PARTITION OF orders
             FOR VALUES FROM ('2019-01-01') TO ('2020-01-01');
         CREATE TABLE orders_2020 PARTITION OF orders
             FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
         CREATE TABLE order_items (id bigserial PRIMARY KEY, order_id bigint NOT NULL,
                                   order_created date NOT NULL,
                                   FOREIGN KEY (order_id, order_created) REFERENCES orders
                                   ON DELETE CASCADE);
         CREATE TABLE refunds (id bigserial PRIMARY KEY, order_id bigint NOT NULL,
                               order_created date NOT NULL,
                               FOREIGN KEY (order_id, order_created) REFERENCES orders);
         INSERT INTO orders SELECT g, '2019-01-01'::date + (g % 700),
                                   CASE WHEN g % 5 = 0 THEN 'cancelled' ELSE 'done' END
         FROM generate_series(1, 1000) g;
         INSERT INTO order_items (order_id, order_created) SELECT id, created FROM orders;
         INSERT INTO refunds (order_id, order_created)
         SELECT id, created FROM orders WHERE id IN (16, 516);
         CREATE TABLE disputes (id bigserial PRIMARY KEY, order_id bigint NOT NULL,
                                order_created date NOT NULL,
                                FOREIGN KEY (order_id, order_created) REFERENCES orders_2020
                                ON DELETE CASCADE);
         INSERT INTO disputes (order_id, order_created) SELECT id, created FROM orders
         WHERE id = 517;",
    )
    .await;
    // A key on a leaf partition's own unique index, seen from the partitioned table.
    NewJob::new("leaf_keyed", "orders")
        .predicate("id = 517")
        .raw("action", "'delete'")
        .insert(&db)
        .await;
    for (name, predicate) in [
        ("cascading", "status = 'cancelled'"),
        ("refunded", "id = 16"),
    ] {
        NewJob::new(name, "orders_2019")
            .predicate(predicate)
            .raw("action", "'delete'")
            .insert(&db)
            .await;
    }
    db.daemon().until_idle().spawn().wait_ok().await;
    let cascading = db.job("cascading").await;
    assert_eq!(cascading.state, "failed");
    let err = cascading.last_error.unwrap_or_default();
    assert!(
        err.contains("public.orders_2019")
            && err.contains("on public.order_items (ON DELETE CASCADE"),
        "{err}"
    );
    let refunded = db.job("refunded").await;
    assert_eq!(refunded.state, "failed");
    let err = refunded.last_error.unwrap_or_default();
    assert!(
        err.contains("on public.refunds (ON DELETE NO ACTION, 1 child row)"),
        "{err}"
    );
    let leaf_keyed = db.job("leaf_keyed").await;
    assert_eq!(leaf_keyed.state, "failed");
    let err = leaf_keyed.last_error.unwrap_or_default();
    assert!(
        err.contains("on public.disputes (ON DELETE CASCADE, 1 child row)")
            && err.contains("on public.order_items (ON DELETE CASCADE, 1 child row)"),
        "{err}"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM orders").await, 1000);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM order_items").await,
        1000
    );
}

/// A change that fails on the rows it selects (a NULL into a NOT NULL column, a CHECK) fails in
/// the plan, where the idempotency check tries it on a sample and rolls back: a dry run says so
/// before anyone approves it, and nothing changes.
#[sqlx::test]
async fn a_change_that_fails_on_its_rows_fails_in_the_plan(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL, note text);
         INSERT INTO accounts SELECT g, 'n' || g, NULL FROM generate_series(1, 300) g;
         CREATE TABLE notes (id bigint PRIMARY KEY, account_id bigint UNIQUE NOT NULL,
                             body text CHECK (body <> ''));",
    )
    .await;
    NewJob::new("blank_names", "accounts")
        .predicate("note IS NULL")
        .set("name = NULL, note = 'x'")
        .raw("mode", "'dry_run'")
        .insert(&db)
        .await;
    NewJob::new("empty_notes", "notes")
        .raw("action", "'insert'")
        .raw("source_table", "'accounts'")
        .predicate("true")
        .set("id = id, account_id = id, body = ''")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    for (name, table, code) in [
        ("blank_names", "accounts", "SQLSTATE 23502"),
        ("empty_notes", "notes", "SQLSTATE 23514"),
    ] {
        let job = db.job(name).await;
        assert_eq!(job.state, "failed", "{name}");
        assert_eq!(job.batches, 0, "{name}: failed in the plan");
        let err = job.last_error.unwrap_or_default();
        for want in [&format!("job {name} on {table}"), "in the plan", code] {
            assert!(err.contains(want), "expected {want:?} in: {err}");
        }
    }
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM accounts WHERE note IS NULL")
            .await,
        300
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM notes").await, 0);
}

/// A row deep in the table that the change fails on (the plan's sample passed) fails the job
/// at its batch, and the error names that batch's key window, so the row can be found; the
/// batches before it stay committed.
#[sqlx::test]
async fn a_batch_that_fails_on_a_row_names_its_key_window(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE ratios (id bigint PRIMARY KEY, d int NOT NULL, r int);
         INSERT INTO ratios SELECT g, CASE WHEN g = 2300 THEN 0 ELSE 1 END, NULL
         FROM generate_series(1, 4000) g;
         ANALYZE ratios;",
    )
    .await;
    NewJob::new("ratio", "ratios")
        .predicate("r IS NULL")
        .set("r = 100 / d")
        .raw("batch_size", "50")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("ratio").await;
    assert_eq!(job.state, "failed");
    let err = job.last_error.unwrap_or_default();
    assert!(err.contains("SQLSTATE 22012"), "{err}");
    let bound = |after: &str| -> i64 {
        let rest = &err[err
            .find(after)
            .unwrap_or_else(|| panic!("{after:?} in: {err}"))
            + after.len()..];
        rest[..rest.find(')').expect("a closing parenthesis")]
            .parse()
            .expect("a numeric key")
    };
    let (lo, hi) = (bound("at keys after ("), bound(" up to ("));
    assert!(
        lo < 2300 && 2300 <= hi,
        "window ({lo}, {hi}] holds key 2300: {err}"
    );
    assert_eq!(
        job.rows_changed, lo,
        "every batch before the window committed"
    );
}

/// A foreign key that forbids the delete (`RESTRICT`, `NO ACTION`) would fail the batch that
/// reaches a referenced row, after earlier batches committed: the plan refuses while referencing
/// rows would stay (`allow_cascade` does not help), naming the key and the count, and warns
/// when a tree's selected rows reference each other. Once those rows are gone the delete runs.
#[sqlx::test]
async fn a_delete_a_foreign_key_forbids_fails_in_its_plan_not_mid_run(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE parent (id bigint PRIMARY KEY, kind text NOT NULL);
         CREATE TABLE kept (id bigint PRIMARY KEY,
                            parent_id bigint REFERENCES parent (id) ON DELETE RESTRICT);
         CREATE TABLE node (id bigint PRIMARY KEY, up bigint REFERENCES node (id), gone bool);
         INSERT INTO parent SELECT g, CASE WHEN g > 900 THEN 'old' ELSE 'new' END
         FROM generate_series(1, 1000) g;
         INSERT INTO kept VALUES (1, 950), (2, 990), (3, 10);
         INSERT INTO node SELECT g, CASE WHEN g > 1 THEN g END, g <= 5 FROM generate_series(1, 5) g;
         INSERT INTO node SELECT g, g - 5, g <= 8 FROM generate_series(6, 10) g;",
    )
    .await;
    NewJob::new("purge", "parent")
        .predicate("kind = 'old'")
        .raw("action", "'delete'")
        .raw("allow_cascade", "true")
        .raw("batch_size", "10")
        .insert(&db)
        .await;
    // The predicates name their table (a tree is counted in it twice).
    NewJob::new("prune", "node")
        .predicate("node.gone")
        .raw("action", "'delete'")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let purge = db.job("purge").await;
    assert_eq!(purge.state, "failed");
    let err = purge.last_error.unwrap_or_default();
    for want in [
        "job purge",
        "public.parent",
        "kept_parent_id_fkey on public.kept (ON DELETE RESTRICT, 2 child rows)",
        "Delete or re-point those rows first",
    ] {
        assert!(err.contains(want), "expected {want:?} in: {err}");
    }
    assert_eq!(purge.batches, 0, "refused in the plan, before any batch");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM parent").await, 1000);
    // Nodes 2..5 reference themselves; 6, 7, 8 are selected and reference selected rows 1..3;
    // 9 and 10 are not selected and reference 4 and 5: those two would stay, a sure failure.
    let prune = db.job("prune").await;
    assert_eq!(prune.state, "failed");
    let err = prune.last_error.unwrap_or_default();
    assert!(
        err.contains("node_up_fkey on public.node (ON DELETE NO ACTION, 2 child rows)"),
        "{err}"
    );
    // Without them the tree goes whole; that 6..8 reference rows it deletes too is a warning
    // (it fails only when a referenced row's batch comes first), and in one batch it passes.
    db.exec("DELETE FROM node WHERE id IN (9, 10)").await;
    NewJob::new("prune_again", "node")
        .predicate("public.node.gone")
        .raw("action", "'delete'")
        .raw("batch_size", "100")
        .insert(&db)
        .await;
    db.exec("DELETE FROM kept WHERE parent_id > 900").await;
    NewJob::new("purge_again", "parent")
        .predicate("kind = 'old'")
        .raw("action", "'delete'")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let again = db.job("purge_again").await;
    assert_eq!(again.state, "succeeded", "{:?}", again.last_error);
    assert_eq!(again.rows_changed, 100);
    let tree = db.job("prune_again").await;
    assert_eq!(tree.state, "succeeded", "{:?}", tree.last_error);
    assert_eq!(tree.rows_changed, 8);
    let warnings = tree.plan.expect("a plan")["warnings"].to_string();
    assert!(
        warnings.contains(
            "3 rows the delete selects reference other rows it selects through node_up_fkey"
        ),
        "{warnings}"
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

    // A misspelt name, or a job not started yet, is an error that fails the job; it had read
    // NULL, selected nothing and "succeeded", verified, with every row still to change.
    db.exec("UPDATE stamps SET at = NULL WHERE id <= 10").await;
    NewJob::new("not_yet", "stamps")
        .predicate("false")
        .set("at = now()")
        .raw("run_at", "'infinity'")
        .insert(&db)
        .await;
    for (name, other) in [("typo", "stamq"), ("early", "not_yet")] {
        NewJob::new(name, "stamps")
            .predicate(&format!(
                "at IS NULL AND now() >= backfill.job_started_at('{other}')"
            ))
            .set("at = now()")
            .insert(&db)
            .await;
    }
    db.daemon().until_idle().spawn().wait_ok().await;
    for (name, words) in [
        ("typo", "job_started_at('stamq'): no job has this name"),
        (
            "early",
            "job_started_at('not_yet'): that job has not started yet",
        ),
    ] {
        let job = db.job(name).await;
        assert_eq!(job.state, "failed", "{name}");
        let error = job.last_error.unwrap_or_default();
        assert!(error.contains(words) && error.contains("22023"), "{error}");
    }
}

/// An insert job: one policy row for every user who has none, walked over the users' keys.
/// Idempotent (a second job inserts nothing), archived, and its revert deletes exactly the rows
/// it inserted: not the ones the application had, nor one the application changed since.
#[sqlx::test]
async fn an_insert_job_is_idempotent_and_its_revert_deletes_exactly_its_rows(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE users (id bigint PRIMARY KEY, plan text NOT NULL);
         CREATE TABLE policies (user_id bigint PRIMARY KEY, kind text NOT NULL,
                                created_by text NOT NULL DEFAULT 'app');
         INSERT INTO users SELECT g, CASE WHEN g % 10 = 0 THEN 'pro' ELSE 'free' END
         FROM generate_series(1, 100000) g;
         INSERT INTO policies (user_id, kind) SELECT g, 'custom' FROM generate_series(1, 1000) g;",
    )
    .await;
    let job = |name: &str| {
        NewJob::new(name, "policies")
            .raw("action", "'insert'")
            .text("source_table", "public.users")
            .predicate("NOT EXISTS (SELECT 1 FROM policies p WHERE p.user_id = users.id)")
            .set("user_id = id, kind = 'default:' || plan, created_by = 'backfill'")
            .raw("archive", "true")
            .raw("batch_size", "5000")
            .raw("key_columns", "ARRAY['id']")
    };
    job("policies_for_all").insert(&db).await;
    db.daemon()
        .max_batch(20000)
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    let first = db.job("policies_for_all").await;
    assert_eq!(first.state, "succeeded", "{:?}", first.last_error);
    assert_eq!(first.rows_changed, 99_000);
    assert_eq!(first.remaining, Some(0), "every user has a policy");
    let sample = &first.plan.clone().expect("a plan")["samples"][0];
    assert_eq!(sample["insert"]["kind"], "default:free", "{sample}");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM policies WHERE kind = 'default:pro'")
            .await,
        9_900
    );

    let remaining = backfilld::ops::verify(
        &db.lib,
        &db.names,
        &backfilld::config::Config::default(),
        "policies_for_all",
    )
    .await
    .unwrap();
    assert_eq!(remaining, 0, "verify counts the source rows still selected");

    job("policies_again").insert(&db).await;
    db.daemon()
        .max_batch(20000)
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    let again = db.job("policies_again").await;
    assert_eq!(again.state, "succeeded", "{:?}", again.last_error);
    assert_eq!(again.rows_changed, 0, "a second run inserts nothing");

    // The application edits one inserted policy; the revert must leave it (and its own 1,000).
    db.exec("UPDATE policies SET kind = 'custom' WHERE user_id = 5000")
        .await;
    let revert = backfilld::ops::revert(&db.lib, &db.names, "policies_for_all", false)
        .await
        .unwrap();
    db.daemon()
        .max_batch(20000)
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    let reverted = db.job(&revert.name).await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(reverted.rows_changed, 98_999);
    assert_eq!(reverted.rows_skipped, 1, "the row changed since is skipped");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM policies").await, 1_001);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM policies WHERE created_by = 'backfill'")
            .await,
        1,
        "only the edited row the backfill inserted remains"
    );
}

/// Reverting an insert deletes rows, so it gets a delete's foreign-key check: child rows the
/// application has since attached through `ON DELETE CASCADE` would go with them, unarchived. The
/// revert is refused, naming the key, until it is asked for with `allow_cascade`.
#[sqlx::test]
async fn the_revert_of_an_insert_refuses_to_cascade_into_child_rows_unless_allowed(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE acct_src (id bigint PRIMARY KEY);
         CREATE TABLE acct (id bigint PRIMARY KEY);
         CREATE TABLE orders (id bigint PRIMARY KEY,
                              acct_id bigint NOT NULL REFERENCES acct ON DELETE CASCADE);
         INSERT INTO acct_src SELECT generate_series(1, 100);",
    )
    .await;
    insert_job("acct_copy", "acct", "public.acct_src", "id = id")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("acct_copy").await.rows_changed, 100);
    // The application attaches orders to ten of the copied accounts.
    db.exec("INSERT INTO orders SELECT g, g FROM generate_series(1, 10) g")
        .await;

    let refused = db.revert("acct_copy").await;
    assert_eq!(refused.state, "failed");
    let error = refused.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("orders")
            && error.contains("10 child rows")
            && error.contains("allow-cascade"),
        "{error}"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM acct").await, 100);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM orders").await, 10);

    let allowed = backfilld::ops::revert(&db.lib, &db.names, "acct_copy", true)
        .await
        .unwrap();
    db.daemon().until_idle().spawn().wait_ok().await;
    let allowed = db.job(&allowed.name).await;
    assert_eq!(allowed.state, "succeeded", "{:?}", allowed.last_error);
    assert_eq!(allowed.rows_changed, 100);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM acct").await, 0);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders").await,
        0,
        "cascaded, as allowed"
    );
}

/// The schema moves on between an insert job and its revert: a column is added, another
/// dropped. Rows the application has not touched still go (compared on the columns both versions
/// have), an edited one stays.
#[sqlx::test]
async fn the_revert_of_an_insert_survives_added_and_dropped_columns(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE src (id bigint PRIMARY KEY);
         CREATE TABLE copy (id bigint PRIMARY KEY, price numeric, note text, old text);
         INSERT INTO src SELECT generate_series(1, 30);",
    )
    .await;
    insert_job(
        "copy_in",
        "copy",
        "public.src",
        "id = id, price = 1.50, note = 'n' || id, old = 'x'",
    )
    .raw("archive", "true")
    .insert(&db)
    .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("copy_in").await.rows_changed, 30);
    db.exec(
        "ALTER TABLE copy ADD COLUMN region text DEFAULT 'eu';
         ALTER TABLE copy DROP COLUMN old;
         UPDATE copy SET price = 1.5 WHERE id = 7;",
    )
    .await;
    let reverted = db.revert("copy_in").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(reverted.rows_changed, 29);
    assert_eq!(reverted.rows_skipped, 1, "1.50 became 1.5: changed since");
    assert_eq!(db.scalar_i64("SELECT id FROM copy").await, 7);
}

/// An insert walks its source's keys, so it can archive one target key twice: a row it
/// inserted, deleted by the application, inserted again from a later source row (here a trigger
/// standing in for the application deletes the first row as the second arrives). The revert
/// built a unique index on the archive and failed with 23505 before restoring anything; it now
/// deletes the row holding the second image and counts the first as skipped.
#[sqlx::test]
async fn the_revert_of_an_insert_handles_a_key_archived_twice(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE ev (id bigint PRIMARY KEY, uid int NOT NULL, v text NOT NULL);
         INSERT INTO ev SELECT g, CASE WHEN g = 30 THEN 5 ELSE g END, 'v' || g
         FROM generate_series(1, 40) g;
         CREATE TABLE latest (uid int PRIMARY KEY, v text NOT NULL);
         CREATE FUNCTION replace_latest() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN DELETE FROM latest WHERE uid = NEW.uid; RETURN NEW; END $$;
         CREATE TRIGGER replace_latest BEFORE INSERT ON latest
         FOR EACH ROW EXECUTE FUNCTION replace_latest();",
    )
    .await;
    insert_job("latest_in", "latest", "public.ev", "uid = uid, v = v")
        .raw("archive", "true")
        .raw("batch_size", "10")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("latest_in").await;
    assert_eq!((job.state.as_str(), job.rows_changed), ("succeeded", 40));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM latest").await, 39);
    db.exec("DROP TRIGGER replace_latest ON latest").await;
    let reverted = db.revert("latest_in").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!(
        (reverted.rows_changed, reverted.rows_skipped),
        (39, 1),
        "the first image of uid 5 was deleted by the application"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM latest").await, 0);
}

/// The revert of an insert deletes by the key the insert wrote with, which its archive holds,
/// even after the target gained another key: an expand/contract copy adds its primary key once
/// the copy is done. The revert had taken the target's new key and failed with 42703 (the
/// archive has no such column).
#[sqlx::test]
async fn the_revert_of_an_insert_keeps_the_key_it_was_written_by(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE s9 (id int PRIMARY KEY, v text);
         INSERT INTO s9 SELECT g, 'v' || g FROM generate_series(1, 300) g;
         CREATE TABLE t23 (id int NOT NULL UNIQUE, code text NOT NULL, v text);",
    )
    .await;
    insert_job(
        "t23_in",
        "t23",
        "public.s9",
        "id = id, code = 'c' || id, v = v",
    )
    .raw("archive", "true")
    .raw("batch_size", "100")
    .insert(&db)
    .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job("t23_in").await.rows_changed, 300);
    db.exec(
        "ALTER TABLE t23 ADD PRIMARY KEY (code);
         UPDATE t23 SET v = 'edited' WHERE id = 7;",
    )
    .await;
    let reverted = db.revert("t23_in").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (299, 1));
    assert_eq!(db.scalar_i64("SELECT id::bigint FROM t23").await, 7);
}

/// The revert of an insert whose rows other rows now reference through a key that forbids the
/// delete cannot run; its message told the user to "leave the referenced rows out of the
/// predicate", which a revert does not have.
#[sqlx::test]
async fn the_revert_of_an_insert_blocked_by_referencing_rows_says_what_to_do(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE src (id bigint PRIMARY KEY);
         INSERT INTO src SELECT generate_series(1, 30);
         CREATE TABLE copy (id bigint PRIMARY KEY);
         CREATE TABLE note (id int PRIMARY KEY, copy_id bigint REFERENCES copy (id));",
    )
    .await;
    insert_job("copy_in", "copy", "public.src", "id = id")
        .raw("archive", "true")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    db.exec("INSERT INTO note VALUES (1, 7)").await;
    let reverted = db.revert("copy_in").await;
    assert_eq!(reverted.state, "failed");
    let error = reverted.last_error.unwrap_or_default();
    assert!(
        error.contains("the revert's delete of the inserted rows on public.copy would fail")
            && error.contains("then revert again")
            && !error.contains("predicate"),
        "{error}"
    );
}

/// An insert archive holds each row as JSON, whose text for many types depends on the session
/// that wrote it: a timestamptz (and a range, an array or a domain holding one) on `TimeZone`, an
/// interval on `IntervalStyle`, a bytea on `bytea_output`. Reverted under other settings (an
/// archive from before the date settings, another `database.timezone`, a database whose
/// settings changed since), the same values still count as unchanged: every row went but the
/// two changed since. Before, every row was skipped as changed.
#[sqlx::test]
async fn the_revert_of_an_insert_reads_values_written_under_other_session_settings(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE DOMAIN moment AS timestamptz;
         CREATE TABLE src (id bigint PRIMARY KEY);
         CREATE TABLE seen (id bigint PRIMARY KEY, at timestamptz NOT NULL, note text,
                            during tstzrange, ats timestamptz[], m moment, span interval, bin bytea);
         INSERT INTO src SELECT generate_series(1, 30);",
    )
    .await;
    insert_job(
        "seen_in",
        "seen",
        "public.src",
        "id = id, at = '2024-01-01 00:00+00'::timestamptz + id * interval '1 hour', note = 'n', \
         during = tstzrange('2024-01-01 00:00+00', '2024-01-01 00:00+00'::timestamptz + id * interval '1 hour'), \
         ats = ARRAY['2024-01-01 00:00+00'::timestamptz], m = '2024-06-01 12:00+00', \
         span = id * interval '90 minutes', bin = '\\x0102'",
    )
    .raw("archive", "true")
    .insert(&db)
    .await;
    db.daemon()
        .env("BACKFILLD_DATABASE__TIMEZONE", "UTC")
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    assert_eq!(db.job("seen_in").await.rows_changed, 30);
    db.exec(
        "UPDATE seen SET at = at + interval '1 second' WHERE id = 7;
         UPDATE seen SET during = tstzrange(lower(during), upper(during), '[]') WHERE id = 8;
         DO $$ BEGIN
           EXECUTE format('ALTER DATABASE %I SET intervalstyle = %L', current_database(), 'iso_8601');
           EXECUTE format('ALTER DATABASE %I SET bytea_output = %L', current_database(), 'escape');
         END $$;",
    )
    .await;
    let revert = backfilld::ops::revert(&db.lib, &db.names, "seen_in", false)
        .await
        .unwrap();
    db.daemon()
        .env("BACKFILLD_DATABASE__TIMEZONE", "America/New_York")
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    let reverted = db.job(&revert.name).await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (28, 2));
    assert_eq!(
        db.scalar_text("SELECT string_agg(id::text, ',' ORDER BY id) FROM seen")
            .await,
        "7,8"
    );
}

/// An archive written by an earlier release holds each inserted row as `ROW(…)::text`: its revert
/// still compares whole rows that way.
#[sqlx::test]
async fn an_insert_archived_as_row_text_by_an_earlier_release_still_reverts(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE src (id bigint PRIMARY KEY);
         CREATE TABLE copy (id bigint PRIMARY KEY, note text);
         INSERT INTO src SELECT generate_series(1, 20);",
    )
    .await;
    insert_job(
        "copy_old",
        "copy",
        "public.src",
        "id = id, note = 'n' || id",
    )
    .raw("archive", "true")
    .insert(&db)
    .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let archive = db.job("copy_old").await.archive_table.expect("an archive");
    db.exec(&format!(
        "UPDATE backfill.\"{archive}\" a SET _bf_row = (SELECT ROW(c.*)::text FROM copy c WHERE c.id = a.id);
         UPDATE copy SET note = 'edited' WHERE id = 3;"
    ))
    .await;
    let reverted = db.revert("copy_old").await;
    assert_eq!(reverted.state, "succeeded", "{:?}", reverted.last_error);
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (19, 1));
}

/// A copy into a new table with predicate `true` relies on `ON CONFLICT DO NOTHING`: rows whose
/// target row exists (copied by someone else, or by the job) are not pending, so the plan counts
/// only the rest, the verdict says a second run inserts nothing, and `wait` passes. A target whose
/// only key is a serial the set clause leaves alone would get every row again: not idempotent.
#[sqlx::test]
async fn an_insert_relying_on_on_conflict_counts_only_rows_still_to_insert(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE events_old (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, kind text, payload jsonb);
         INSERT INTO events_old (kind, payload)
             SELECT 'k' || g % 7, jsonb_build_object('n', g) FROM generate_series(1, 3000) g;
         CREATE TABLE events_new (id bigint PRIMARY KEY, kind text NOT NULL, payload jsonb);
         INSERT INTO events_new SELECT id, kind, payload FROM events_old WHERE id <= 100;
         CREATE TABLE audit (id bigserial PRIMARY KEY, event_id bigint);",
    )
    .await;
    let copy = |name: &str, mode: &str| {
        insert_job(
            name,
            "events_new",
            "public.events_old",
            "id = id, kind = kind, payload = payload",
        )
        .text("mode", mode)
    };
    copy("copy_plan", "dry_run").insert(&db).await;
    insert_job("audit_plan", "audit", "public.events_old", "event_id = id")
        .text("mode", "dry_run")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let plan = db.job("copy_plan").await.plan.expect("a plan");
    assert_eq!(plan["rows_matching"], 2900, "{plan}");
    assert_eq!(plan["idempotency"]["idempotent"], true, "{plan}");
    let audit = db.job("audit_plan").await.plan.expect("a plan");
    assert_eq!(audit["rows_matching"], 3000, "{audit}");
    assert_eq!(audit["idempotency"]["idempotent"], false, "{audit}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM events_new").await, 100);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM audit").await,
        0,
        "rolled back"
    );

    copy("copy", "execute").insert(&db).await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let job = db.job("copy").await;
    assert_eq!(job.state, "succeeded", "{:?}", job.last_error);
    assert_eq!((job.rows_changed, job.remaining), (2900, Some(0)));
    let (_, gate, _) = backfilld::ops::wait(
        &db.lib,
        &db.names,
        "copy",
        std::time::Duration::from_secs(5),
        std::time::Duration::from_millis(50),
    )
    .await
    .unwrap();
    assert_eq!(gate, backfilld::ops::Gate::Passed);
    db.exec("DELETE FROM events_new WHERE id IN (7, 8)").await;
    let cfg = backfilld::config::Config::default();
    let remaining = backfilld::ops::verify(&db.lib, &db.names, &cfg, "copy")
        .await
        .unwrap();
    assert_eq!(remaining, 2, "verify counts the rows whose copy is missing");
}

#[sqlx::test]
async fn an_insert_job_needs_a_source_and_a_unique_key_on_its_target(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE src (id bigint PRIMARY KEY);
         CREATE TABLE bag (v bigint);
         INSERT INTO src SELECT generate_series(1, 10);",
    )
    .await;
    NewJob::new("no_source", "bag")
        .raw("action", "'insert'")
        .predicate("true")
        .set("v = id")
        .insert(&db)
        .await;
    insert_job("no_key", "bag", "public.src", "v = id")
        .insert(&db)
        .await;
    insert_job("bad_column", "src", "public.src", "nope = id")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    for (name, words) in [
        ("no_source", &["job no_source", "source_table"][..]),
        ("no_key", &["job no_key", "public.bag", "primary key"][..]),
        ("bad_column", &["job bad_column", "42703", "nope"][..]),
    ] {
        let job = db.job(name).await;
        assert_eq!(job.state, "failed", "{name}");
        let err = job.last_error.unwrap_or_default();
        for w in words {
            assert!(err.contains(w), "{name}: expected {w:?} in: {err}");
        }
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM bag").await, 0);
}

/// A CSV file in the temporary directory, removed when dropped.
struct Csv(std::path::PathBuf);

impl std::ops::Deref for Csv {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Csv {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn csv(name: &str, body: &str) -> Csv {
    let path = std::env::temp_dir().join(format!("backfilld-{}-{name}.csv", std::process::id()));
    std::fs::write(&path, body).unwrap();
    Csv(path)
}

fn csv_job(name: &str, table: &str) -> backfilld::ops::NewJob {
    backfilld::ops::NewJob {
        name: name.into(),
        table_name: table.into(),
        ..Default::default()
    }
}

/// The spreadsheet case: a CSV (as exported by a spreadsheet) is staged with COPY and applied by
/// key as an ordinary archived update job: dry run (with the keys that match no row), execute,
/// verify 0, revert.
#[sqlx::test]
async fn a_csv_file_updates_rows_by_key_and_reverts(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE prices (id bigint PRIMARY KEY, price numeric NOT NULL, note text);
         INSERT INTO prices SELECT g, g, 'n' || g FROM generate_series(1, 100) g;",
    )
    .await;
    // As a spreadsheet exports it: a byte-order mark, capitalised headers, CRLF line ends.
    let mut body = String::from("\u{feff}ID,Price,note\r\n");
    for id in 1..=50 {
        body.push_str(&format!("{id},{},\"fixed, {id}\"\r\n", id * 2));
    }
    body.push_str("1000,1,nobody\r\n");
    let file = csv("prices", &body);
    let cfg = backfilld::config::Config::default();
    let (row, staged) = backfilld::ops::enqueue_from_csv(
        &db.lib,
        &db.names,
        &cfg,
        &csv_job("reprice", "public.prices"),
        &file,
    )
    .await
    .unwrap();
    assert_eq!((staged.rows, staged.unmatched), (51, 1));
    assert_eq!(row.state, "pending");
    // Another job whose name maps to the same staging table is refused, named, with no row.
    let clash = backfilld::ops::enqueue_from_csv(
        &db.lib,
        &db.names,
        &cfg,
        &csv_job("Reprice", "public.prices"),
        &file,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        clash.contains("job Reprice") && clash.contains("reprice_staged\" already exists"),
        "{clash}"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM backfill.jobs").await, 1);
    db.daemon().until_idle().spawn().wait_ok().await;
    let planned = db.job("reprice").await;
    assert_eq!(planned.state, "planned", "{:?}", planned.last_error);
    let plan = planned.plan.clone().unwrap();
    assert_eq!(plan["rows_matching"], 50);
    assert_eq!(plan["unmatched_staged_keys"], 1);
    backfilld::ops::approve(&db.lib, &db.names, "reprice")
        .await
        .unwrap();
    db.daemon().until_idle().spawn().wait_ok().await;
    let done = db.job("reprice").await;
    assert_eq!(done.state, "succeeded", "{:?}", done.last_error);
    assert_eq!(done.rows_changed, 50);
    assert_eq!(done.remaining, Some(0), "a second run would change nothing");
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM prices WHERE price = id * 2 AND note = 'fixed, ' || id"
        )
        .await,
        50
    );
    let revert = backfilld::ops::revert(&db.lib, &db.names, "reprice", false)
        .await
        .unwrap();
    db.daemon().until_idle().spawn().wait_ok().await;
    assert_eq!(db.job(&revert.name).await.rows_changed, 50);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM prices WHERE price = id AND note = 'n' || id")
            .await,
        100
    );
    // Past the retention, the archive and the staging table go together; not before.
    let tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'backfill' \
                  AND tablename IN ('reprice_staged', (SELECT archive_table FROM backfill.jobs \
                                                       WHERE name = 'reprice'))";
    assert_eq!(db.scalar_i64(tables).await, 2);
    let expire = || backfilld::archive::drop_expired(&db.lib, &db.names, 30);
    assert_eq!(expire().await.unwrap(), 0, "finished today");
    db.exec(
        "UPDATE backfill.jobs SET finished_at = now() - interval '31 days' WHERE name = 'reprice'",
    )
    .await;
    assert_eq!(expire().await.unwrap(), 1);
    assert_eq!(db.scalar_i64(tables).await, 0);
    let job = db.job("reprice").await;
    assert_eq!((job.archive_table, job.staged_table), (None, None));
}

/// A file row changes a row when any value's text differs: numeric 1.00 against a stored 1.0
/// (`=` calls them equal) and json, which has no `=` at all. A row equal in every text is left.
#[sqlx::test]
async fn a_csv_file_compares_values_by_their_text(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        r#"CREATE TABLE docs (id bigint PRIMARY KEY, price numeric NOT NULL, doc json);
           INSERT INTO docs VALUES (1, 1.0, '{"a":1}'), (2, 2, '{"a":2}'), (3, 3, '{"a": 3}');"#,
    )
    .await;
    let file = csv(
        "docs",
        "id,price,doc\n1,1.00,\"{\"\"a\"\":1}\"\n2,2,\"{\"\"a\"\":2}\"\n3,3,\"{\"\"a\"\":3}\"\n",
    );
    let cfg = backfilld::config::Config::default();
    let job = backfilld::ops::NewJob {
        execute: true,
        ..csv_job("docs_fix", "public.docs")
    };
    backfilld::ops::enqueue_from_csv(&db.lib, &db.names, &cfg, &job, &file)
        .await
        .unwrap();
    db.daemon().until_idle().spawn().wait_ok().await;
    let done = db.job("docs_fix").await;
    assert_eq!(done.state, "succeeded", "{:?}", done.last_error);
    assert_eq!(
        done.rows_changed, 2,
        "rows 1 and 3 differ in text, row 2 does not"
    );
    assert_eq!(done.remaining, Some(0));
    assert_eq!(
        db.scalar_text("SELECT price::text || ' ' || (SELECT doc::text FROM docs WHERE id = 3) FROM docs WHERE id = 1")
            .await,
        r#"1.00 {"a":3}"#
    );
}

/// Lines ending in a bare CR (no LF anywhere in the file) are lines; a CR inside a quoted field
/// is data. The header had been read as the whole file, one unknown column.
#[sqlx::test]
async fn a_csv_file_with_cr_line_ends_reads_its_header_and_keeps_quoted_crs(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE notes (id int PRIMARY KEY, note text);
         INSERT INTO notes SELECT g, 'old' FROM generate_series(1, 3) g;",
    )
    .await;
    let file = csv("notes_cr", "id,note\r1,\"two\rlines\"\r2,plain\r");
    let cfg = backfilld::config::Config::default();
    let job = backfilld::ops::NewJob {
        execute: true,
        ..csv_job("notes_fix", "public.notes")
    };
    let (_, staged) = backfilld::ops::enqueue_from_csv(&db.lib, &db.names, &cfg, &job, &file)
        .await
        .unwrap();
    assert_eq!(staged.rows, 2);
    db.daemon().until_idle().spawn().wait_ok().await;
    let done = db.job("notes_fix").await;
    assert_eq!(done.state, "succeeded", "{:?}", done.last_error);
    assert_eq!(done.rows_changed, 2);
    assert_eq!(
        db.scalar_text("SELECT string_agg(note, '|' ORDER BY id) FROM notes")
            .await,
        "two\rlines|plain|old"
    );
}

#[sqlx::test]
async fn a_bad_csv_file_fails_with_its_line_and_creates_nothing(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE currencies (code text PRIMARY KEY);
         INSERT INTO currencies VALUES ('EUR'), ('USD');
         CREATE TABLE prices (id bigint PRIMARY KEY, price numeric NOT NULL,
                              qty int CHECK (qty >= 0), cur text REFERENCES currencies,
                              low numeric, high numeric, CHECK (low <= high), \"Low\" numeric);
         INSERT INTO prices SELECT g, 1, 0, 'EUR', 0, 10 FROM generate_series(1, 3) g;",
    )
    .await;
    let cfg = backfilld::config::Config::default();
    // A value the staging table's types accept but the target's rules refuse would stop the
    // update at that row with the batches before it committed: refused at enqueue instead.
    let rules = [
        (
            "nullvalue",
            "id,price\n1,2\n2,\n",
            vec!["key (2)", "NOT NULL on column \"price\""],
        ),
        (
            "negative",
            "id,qty\n1,5\n3,-1\n",
            vec!["key (3)", "qty >= 0"],
        ),
        ("crossed", "id,low\n1,100\n", vec!["key (1)", "low <= high"]),
        (
            "currency",
            "id,cur\n1,USD\n2,XXX\n",
            vec!["key (2)", "foreign key", "currencies"],
        ),
        (
            "endmarker",
            "id,price\n1,2\n\\.\n2,3\n",
            vec!["line 3", "\\."],
        ),
    ];
    let cases = [
        (
            "unknown",
            "id,cost\n1,2\n",
            vec!["\"cost\"", "public.prices"],
        ),
        ("nokey", "price\n2\n", vec!["key column \"id\""]),
        (
            "ambiguous",
            "id,LOW\n1,2\n",
            vec!["\"LOW\"", "it matches \"low\" and \"Low\""],
        ),
        (
            "unparsable",
            "id,price\n1,2\n2,two\n",
            vec!["line 3", "numeric"],
        ),
        (
            "duplicate",
            "id,price\n1,2\n1,3\n",
            vec!["line 3", "duplicate key"],
        ),
        ("nullkey", "id,price\n,2\n", vec!["line 2", "id"]),
    ];
    for (name, body, words) in cases.into_iter().chain(rules) {
        let file = csv(name, body);
        let err = backfilld::ops::enqueue_from_csv(
            &db.lib,
            &db.names,
            &cfg,
            &csv_job(name, "public.prices"),
            &file,
        )
        .await
        .expect_err(name)
        .to_string();
        assert!(err.contains(&format!("job {name}")), "{name}: {err}");
        for w in words {
            assert!(err.contains(w), "{name}: expected {w:?} in: {err}");
        }
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM backfill.jobs").await, 0);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pg_tables WHERE schemaname = 'backfill' AND tablename LIKE '%_staged'")
            .await,
        0,
        "nothing staged"
    );
    // The same rules, kept: a NULL where NULL is allowed, a value within the check.
    let fine = csv("fine", "id,cur,qty,low\n1,,7,5\n2,USD,,\n");
    backfilld::ops::enqueue_from_csv(
        &db.lib,
        &db.names,
        &cfg,
        &csv_job("fine", "public.prices"),
        &fine,
    )
    .await
    .expect("a file within the rules stages");
}

/// PostgreSQL passes at most 100 arguments to a function: a sample row of more than 50 columns
/// (an update setting them, a delete's whole row) used to fail the plan with 54023.
#[sqlx::test]
async fn a_table_of_sixty_columns_is_sampled_for_an_update_and_a_delete(pool: PgPool) {
    let db = Db::new(pool).await;
    let columns: Vec<String> = (1..=60).map(|i| format!("c{i} int")).collect();
    db.exec(&format!(
        "CREATE TABLE wide (id int PRIMARY KEY, {});
         INSERT INTO wide (id) SELECT generate_series(1, 20);",
        columns.join(", ")
    ))
    .await;
    let set: Vec<String> = (1..=55).map(|i| format!("c{i} = id + {i}")).collect();
    NewJob::new("wide_set", "wide")
        .predicate("c1 IS NULL")
        .set(&set.join(", "))
        .text("mode", "dry_run")
        .insert(&db)
        .await;
    NewJob::new("wide_purge", "wide")
        .predicate("id > 15")
        .raw("action", "'delete'")
        .text("mode", "dry_run")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;

    let update = db.job("wide_set").await;
    assert_eq!(update.state, "planned", "{:?}", update.last_error);
    let sample = &update.plan.clone().expect("a plan")["samples"][0];
    let after = sample["after"].as_object().expect("after values");
    assert_eq!((after.len(), &after["c55"]), (55, &serde_json::json!(56)));
    assert_eq!(sample["before"].as_object().map(|b| b.len()), Some(55));
    let delete = db.job("wide_purge").await;
    assert_eq!(delete.state, "planned", "{:?}", delete.last_error);
    let row = &delete.plan.clone().expect("a plan")["samples"][0]["row"];
    assert_eq!(row.as_object().map(|r| r.len()), Some(61), "{row}");
}

/// An insert's messages name the table it writes, with the one it walks: its plan's ceiling and
/// a failing sample (a cast the source's values break) named only the source before.
#[sqlx::test]
async fn an_insert_names_the_table_it_writes_in_its_errors(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE src (id bigint PRIMARY KEY, code text);
         CREATE TABLE dst (id bigint PRIMARY KEY, code int);
         INSERT INTO src SELECT g, g::text FROM generate_series(1, 20) g;",
    )
    .await;
    insert_job("capped", "dst", "public.src", "id = id, code = code::int")
        .raw("max_affected", "5")
        .insert(&db)
        .await;
    insert_job(
        "cast",
        "dst",
        "public.src",
        "id = id, code = (code || 'x')::int",
    )
    .text("mode", "dry_run")
    .insert(&db)
    .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    for name in ["capped", "cast"] {
        let job = db.job(name).await;
        let error = job.last_error.clone().unwrap_or_default();
        assert_eq!(job.state, "failed", "{name}: {error}");
        assert!(
            error.contains(&format!("job {name} on public.dst (from public.src)")),
            "{name}: {error}"
        );
    }
}

/// An insert's bloat guard vacuums, and its health signals watch, the table it writes: it
/// vacuumed the source it only reads (and held on the source's dead tuples).
#[sqlx::test]
async fn an_insert_guards_the_table_it_writes(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE src (id bigint PRIMARY KEY, n int);
         CREATE TABLE dst (id bigint PRIMARY KEY, n int);
         INSERT INTO src SELECT g, g FROM generate_series(1, 3000) g;",
    )
    .await;
    insert_job("copy", "dst", "public.src", "id = id, n = n")
        .insert(&db)
        .await;
    db.daemon()
        .env("BACKFILLD_BLOAT__VACUUM_EVERY_FRACTION", "0.2")
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    assert_eq!(db.job("copy").await.rows_changed, 3000);
    let vacuums = |table: &str| {
        format!("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = '{table}'")
    };
    assert!(db.scalar_i64(&vacuums("dst")).await >= 1);
    assert_eq!(db.scalar_i64(&vacuums("src")).await, 0);
}

/// An insert's plan counted as already inserted two kinds of source rows that the batches then
/// failed on: one conflicting on a unique key that `ON CONFLICT` does not arbitrate (the target
/// has a deferrable constraint, so the statement names its key), and one whose value is too long
/// for a `varchar(n)` key (the count's explicit cast cut it to an existing key). Both now count
/// as still to insert, so the plan does not call the job idempotent. The rows come last in a
/// 100,000-row source, past the plan's trial write (which fails the plan on such a row within
/// its windows, as the first batch would fail).
#[sqlx::test]
async fn an_insert_plan_counts_rows_its_batches_would_fail_on(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE s16 (id int PRIMARY KEY, email text, code int);
         INSERT INTO s16 SELECT g, 'e' || g, g FROM generate_series(1, 100000) g;
         CREATE TABLE t16 (id int PRIMARY KEY, email text UNIQUE,
                           code int UNIQUE DEFERRABLE INITIALLY IMMEDIATE);
         INSERT INTO t16 VALUES (1000000, 'e99999', -1), (7, 'e7', 7);
         CREATE TABLE s10 (id int PRIMARY KEY, code text);
         INSERT INTO s10 SELECT g, 'c' || lpad(g::text, 6, '0') FROM generate_series(1, 99999) g;
         INSERT INTO s10 VALUES (100000, 'c0000050Z');
         CREATE TABLE t10 (code varchar(8) PRIMARY KEY);
         INSERT INTO t10 VALUES ('c0000050');",
    )
    .await;
    insert_job(
        "ins_email",
        "t16",
        "public.s16",
        "id = id, email = email, code = code",
    )
    .text("mode", "dry_run")
    .insert(&db)
    .await;
    insert_job("ins_code", "t10", "public.s10", "code = code")
        .text("mode", "dry_run")
        .insert(&db)
        .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let matching = |job: backfilld::job::JobRow| {
        assert_eq!(job.state, "planned", "{:?}", job.last_error);
        job.plan.expect("a plan")["rows_matching"].as_i64().unwrap()
    };
    assert_eq!(
        matching(db.job("ins_email").await),
        99_999,
        "id 7 exists; 'e99999' conflicts on email, which ON CONFLICT (id) does not skip"
    );
    assert_eq!(
        matching(db.job("ins_code").await),
        100_000,
        "'c0000050' exists; 'c0000050Z' is not 'c0000050'"
    );
}

/// An insert into a table with a partial unique index (soft delete: `UNIQUE (user_id, group_id)
/// WHERE deleted_at IS NULL`): `ON CONFLICT DO NOTHING` skips the rows a live row covers, and
/// the plan, the run-twice check and the verification now count them as inserted already.
/// They had counted every source row: a plan of 3,000 for 2,000 inserted, "not idempotent",
/// and a `wait` that never passed (3,000 still matching after success).
#[sqlx::test]
async fn an_insert_counts_rows_a_partial_unique_index_skips(pool: PgPool) {
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE users (id bigint PRIMARY KEY, default_group_id bigint NOT NULL);
         INSERT INTO users SELECT g, g % 7 FROM generate_series(1, 3000) g;
         CREATE TABLE members (id bigserial PRIMARY KEY, user_id bigint NOT NULL,
                               group_id bigint NOT NULL, deleted_at timestamptz);
         CREATE UNIQUE INDEX members_live ON members (user_id, group_id) WHERE deleted_at IS NULL;
         INSERT INTO members (user_id, group_id) SELECT g, g % 7 FROM generate_series(1, 1000) g;
         INSERT INTO members (user_id, group_id, deleted_at)
         SELECT g, g % 7, now() FROM generate_series(1001, 1500) g;",
    )
    .await;
    insert_job(
        "join_default",
        "members",
        "users",
        "user_id = id, group_id = default_group_id",
    )
    .raw("mode", "'dry_run'")
    .insert(&db)
    .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let planned = db.job("join_default").await;
    assert_eq!(planned.state, "planned", "{:?}", planned.last_error);
    let plan = planned.plan.expect("a plan");
    assert_eq!(plan["rows_matching"], 2000, "{plan}");
    let twice = plan["idempotency"]["summary"].to_string();
    assert!(
        twice.contains("idempotent") && !twice.contains("not idempotent"),
        "{twice}"
    );
    backfilld::ops::approve(&db.lib, &db.names, "join_default")
        .await
        .expect("approve");
    db.daemon().until_idle().spawn().wait_ok().await;
    let done = db.job("join_default").await;
    assert_eq!(done.state, "succeeded", "{:?}", done.last_error);
    assert_eq!((done.rows_changed, done.remaining), (2000, Some(0)));
}

/// A trigger on the job's table, or row-level security over its role, changes what the job does
/// in ways its archive and counts do not see: the plan says so. (A BEFORE trigger that changed
/// rows left the revert reporting every row restored while a third held the trigger's values;
/// a policy hiding a tenant left the job "succeeded, remaining 0" with that tenant untouched.)
#[sqlx::test]
async fn the_plan_warns_of_triggers_and_row_security(pool: PgPool) {
    let db = Db::new(pool).await;
    let role = db.cluster_unique("bfrls").await;
    db.exec(&format!(
        "CREATE TABLE acct (id int PRIMARY KEY, tenant int NOT NULL, v int NOT NULL);
         INSERT INTO acct SELECT g, g % 3, g FROM generate_series(1, 30) g;
         CREATE FUNCTION scale() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.v := NEW.v * 10; RETURN NEW; END $$;
         CREATE TRIGGER acct_scale BEFORE UPDATE ON acct FOR EACH ROW EXECUTE FUNCTION scale();
         CREATE TABLE plain (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO plain SELECT g, g FROM generate_series(1, 30) g;
         ALTER TABLE plain ENABLE ROW LEVEL SECURITY;
         CREATE ROLE {role} LOGIN PASSWORD 'rls';
         GRANT USAGE ON SCHEMA backfill TO {role};
         GRANT ALL ON ALL TABLES IN SCHEMA backfill TO {role};
         GRANT ALL ON ALL SEQUENCES IN SCHEMA backfill TO {role};
         GRANT SELECT, UPDATE ON plain TO {role};
         CREATE POLICY not_two ON plain USING (id % 3 <> 2);"
    ))
    .await;
    for (name, table) in [("scaled", "acct"), ("hidden", "plain")] {
        NewJob::new(name, table)
            .predicate("v > 0")
            .set("v = -v")
            .text("mode", "dry_run")
            .insert(&db)
            .await;
    }
    db.daemon().until_idle().spawn().wait_ok().await;
    let scaled = db.job("scaled").await.plan.expect("a plan")["warnings"].to_string();
    assert!(
        scaled.contains(
            "public.acct has triggers that fire on this job's UPDATEs: acct_scale (BEFORE ROW)"
        ),
        "{scaled}"
    );
    // A rule rewriting the job's statement (DO INSTEAD NOTHING: the job "succeeded" with every
    // row remaining, unwarned).
    db.exec(
        "CREATE RULE acct_nothing AS ON UPDATE TO acct DO INSTEAD NOTHING;
         UPDATE backfill.jobs SET plan = NULL, state = 'pending' WHERE name = 'scaled';",
    )
    .await;
    db.daemon().until_idle().spawn().wait_ok().await;
    let ruled = db.job("scaled").await.plan.expect("a plan")["warnings"].to_string();
    assert!(
        ruled.contains("public.acct has rules on this job's UPDATEs: acct_nothing (INSTEAD)"),
        "{ruled}"
    );
    db.exec("UPDATE backfill.jobs SET plan = NULL, state = 'pending' WHERE name = 'hidden'")
        .await;
    db.daemon()
        .database_url(&db.url_as(&role, "rls"))
        .until_idle()
        .spawn()
        .wait_ok()
        .await;
    let hidden = db.job("hidden").await;
    let warnings = hidden.plan.expect("a plan")["warnings"].to_string();
    assert!(
        warnings.contains(&format!(
            "row-level security on public.plain applies to role {role}"
        )),
        "{warnings} {:?}",
        hidden.last_error
    );
    db.exec(&format!(
        "DROP TABLE plain; REVOKE ALL ON ALL TABLES IN SCHEMA backfill FROM {role};
         REVOKE ALL ON ALL SEQUENCES IN SCHEMA backfill FROM {role};
         REVOKE ALL ON SCHEMA backfill FROM {role}; DROP ROLE {role};"
    ))
    .await;
}
