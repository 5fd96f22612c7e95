//! Through PgBouncer in transaction mode, as Debian ships it (1.18: no prepared-statement
//! tracking): started here in front of the test cluster with fewer server connections than
//! backfilld opens, so client connections really share servers. migrate, a job with archive, a
//! revert, status and two replicas all go through it with `database.pool_mode = "transaction"`;
//! one replica also has a `direct_url` (LISTEN, VACUUM), the other only polls.
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler

mod common;

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Db, NewJob, url_of};
use sqlx::PgPool;

/// A PgBouncer process on a free port, killed on drop.
struct Bouncer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Bouncer {
    /// Transaction pooling in front of the server of `server_url`, logging in as its user.
    fn start(server_url: &str) -> Self {
        let (user, password, port_of_server) = credentials(server_url);
        let port = common::free_port();
        let dir = std::env::temp_dir().join(format!("backfilld-pgbouncer-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = format!(
            "[databases]\n\
             * = host=127.0.0.1 port={} user={} password={}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = any\npool_mode = transaction\n\
             default_pool_size = 6\nmax_client_conn = 200\n\
             logfile = {}/pgbouncer.log\n",
            port_of_server,
            user,
            password,
            dir.display()
        );
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(&ini, conf).unwrap();
        let child = as_unprivileged(bouncer_binary(), &[ini.to_str().unwrap()], &dir);
        let bouncer = Self { child, port, dir };
        bouncer.wait_listening();
        bouncer
    }

    fn url(&self, database: &str) -> String {
        format!(
            "postgres://backfilld@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not listen on {}: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// User, password and port of `postgres://user:password@host:port/db?...`.
fn credentials(url: &str) -> (String, String, u16) {
    let rest = url.split_once("://").expect("a URL").1;
    let (auth, rest) = rest
        .split_once('@')
        .expect("user and password in DATABASE_URL");
    let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
    let host_port = rest.split(['/', '?']).next().unwrap_or_default();
    let port = host_port
        .rsplit_once(':')
        .map_or(5432, |(_, p)| p.parse().expect("port"));
    (user.to_owned(), password.to_owned(), port)
}

fn bouncer_binary() -> &'static str {
    for path in ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"] {
        if std::path::Path::new(path).exists() {
            return path;
        }
    }
    panic!("pgbouncer is not installed (scripts/test installs Debian's package)")
}

/// PgBouncer refuses to run as root: as root, run it as the `postgres` user, in this process
/// (so killing the child kills PgBouncer).
fn as_unprivileged(program: &str, args: &[&str], dir: &std::path::Path) -> Child {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut cmd = if root {
        let _ = Command::new("chown")
            .args(["-R", "postgres", dir.to_str().unwrap()])
            .status();
        // setpriv execs (runuser would fork and leave pgbouncer running when killed).
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
            program,
        ]);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgbouncer")
}

/// Runs the CLI through the pooler; returns stdout, panics with stderr on failure.
fn cli(url: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", url)
        .env("BACKFILLD_DATABASE__POOL_MODE", "transaction")
        .output()
        .expect("run backfilld");
    assert!(
        out.status.success(),
        "backfilld {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[sqlx::test]
async fn migrate_jobs_archive_revert_and_two_replicas_work_through_transaction_pooling(
    pool: PgPool,
) {
    let direct = url_of(&pool);
    let database = pool.connect_options().get_database().unwrap().to_owned();
    let bouncer = Bouncer::start(&direct);
    let pooled = bouncer.url(&database);
    cli(&pooled, &["migrate"]);
    let db = Db::new(pool).await; // finds the schema migrated: a no-op
    db.exec(
        "CREATE TABLE items (id bigint PRIMARY KEY, v int, w int);
         INSERT INTO items SELECT g, g % 100, NULL FROM generate_series(1, 20000) g;",
    )
    .await;
    for (j, lo) in [(1, 0), (2, 5000), (3, 10000), (4, 15000)] {
        NewJob::new(&format!("job{j}"), "items")
            .predicate(&format!("w IS NULL AND id > {lo} AND id <= {}", lo + 5000))
            .set(&format!("w = v * 10 + {j}"))
            .raw("archive", "true")
            .raw("batch_size", "250")
            .insert(&db)
            .await;
    }
    let replica = |name: &str| {
        db.daemon()
            .database_url(&pooled)
            .env("BACKFILLD_DATABASE__POOL_MODE", "transaction")
            .env("BACKFILLD_WORKER__CONCURRENCY", "2")
            .env("BACKFILLD_DATABASE__MAX_CONNECTIONS", "6")
            .env("BACKFILLD_WORKER__REPLICA_ID", name)
    };
    let mut listening = replica("a")
        .env("BACKFILLD_DATABASE__DIRECT_URL", &direct)
        .spawn();
    let mut polling = replica("b").spawn();
    for j in 1..=4 {
        let job = db.wait_state(&format!("job{j}"), "succeeded").await;
        assert_eq!(job.rows_changed, 5000, "job{j}: {:?}", job.last_error);
        assert_eq!(job.attempt, 1, "job{j} was claimed more than once");
    }
    let wrong = db
        .scalar_i64(
            "SELECT count(*) FROM items WHERE w IS DISTINCT FROM v * 10 + 1 + (id - 1) / 5000",
        )
        .await;
    assert_eq!(wrong, 0, "every row changed once, by its own job");

    let status = cli(&pooled, &["status", "job2"]);
    assert!(status.contains("succeeded"), "{status}");
    cli(&pooled, &["revert", "job2"]);
    let reverted = wait_revert(&db, "job2").await;
    assert_eq!(reverted.rows_changed, 5000, "{:?}", reverted.last_error);
    let restored = db
        .scalar_i64("SELECT count(*) FROM items WHERE id BETWEEN 5001 AND 10000 AND w IS NOT NULL")
        .await;
    assert_eq!(
        restored, 0,
        "the revert restored job2's rows through the pooler"
    );

    polling.signal("TERM");
    listening.signal("TERM");
    polling.wait_ok().await;
    listening.wait_ok().await;
    let (a, b) = (listening.log(), polling.log());
    for log in [&a, &b] {
        assert!(!log.contains("prepared statement"), "{log}");
        assert!(!log.contains("ERROR"), "{log}");
    }
    assert!(
        b.contains("no LISTEN through a transaction pooler"),
        "the polling replica says why it polls: {b}"
    );
    let claims = |log: &str| log.matches("job claimed").count();
    assert!(
        claims(&a) >= 1 && claims(&b) >= 1,
        "both replicas ran jobs: a {} b {}",
        claims(&a),
        claims(&b)
    );
    drop(bouncer);
}

/// Waits for the revert job of `job` to succeed.
async fn wait_revert(db: &Db, job: &str) -> backfilld::job::JobRow {
    let name: String = sqlx::query_scalar("SELECT name FROM backfill.jobs WHERE reverts = $1")
        .bind(job)
        .fetch_one(&db.pool)
        .await
        .expect("a revert job");
    db.wait_state(&name, "succeeded").await
}

/// Through a transaction pooler the driver cannot send `extra_float_digits` at start-up, so the
/// database's setting applied: at 0, 0.30000000000000004 prints as 0.3, and the revert (which
/// compares floats by their text) overwrote the application's 0.3 as if it were unchanged.
/// Every transaction now sets it.
#[sqlx::test]
async fn floats_compare_exactly_through_a_transaction_pooler(pool: PgPool) {
    let direct = url_of(&pool);
    let database = pool.connect_options().get_database().unwrap().to_owned();
    let bouncer = Bouncer::start(&direct);
    let pooled = bouncer.url(&database);
    let db = Db::new(pool).await;
    db.exec(&format!(
        "CREATE TABLE fl (id int PRIMARY KEY, f float8 NOT NULL DEFAULT 0);
         INSERT INTO fl (id) SELECT generate_series(1, 10);
         ALTER DATABASE \"{database}\" SET extra_float_digits = 0;"
    ))
    .await;
    NewJob::new("sum", "fl")
        .predicate("true")
        .set("f = 0.1::float8 + 0.2::float8")
        .raw("archive", "true")
        .insert(&db)
        .await;
    let daemon = || {
        db.daemon()
            .database_url(&pooled)
            .env("BACKFILLD_DATABASE__POOL_MODE", "transaction")
            .until_idle()
    };
    daemon().spawn().wait_ok().await;
    assert_eq!(db.job("sum").await.rows_changed, 10);
    db.exec("UPDATE fl SET f = 0.3 WHERE id <= 5").await;
    cli(&pooled, &["revert", "sum"]);
    daemon().spawn().wait_ok().await;
    let reverted = wait_revert(&db, "sum").await;
    assert_eq!((reverted.rows_changed, reverted.rows_skipped), (5, 5));
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM fl WHERE f = 0.3").await,
        5
    );
    drop(bouncer);
}

/// `database.direct_url` naming another database (a copy-paste of another service's URL) made
/// the bloat guard VACUUM the table of the same name there, 13 times in the report, while the
/// target's dead tuples stayed, with a log blaming a lock. The daemon now checks that the direct
/// connection reaches the pool's database on the same server, and otherwise does not use it,
/// saying so.
#[sqlx::test]
async fn a_direct_url_to_another_database_is_not_used(pool: PgPool) {
    let direct = url_of(&pool);
    let database = pool.connect_options().get_database().unwrap().to_owned();
    // Test databases' names are 63 bytes long: another one needs a shorter name.
    let other = format!("other_{}", &database[database.len() - 20..]);
    let db = Db::new(pool).await;
    db.exec(&format!("CREATE DATABASE \"{other}\"")).await;
    let other_url = direct.replacen(&format!("/{database}"), &format!("/{other}"), 1);
    assert_ne!(other_url, direct);
    let elsewhere = PgPool::connect(&other_url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE items (id bigint PRIMARY KEY, v int);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 1000) g;",
    )
    .execute(&elsewhere)
    .await
    .unwrap();
    db.exec(
        "CREATE TABLE items (id bigint PRIMARY KEY, v int);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 1000) g;",
    )
    .await;
    NewJob::new("some", "items")
        .predicate("id % 10 = 0 AND v = 0")
        .set("v = 1")
        .raw("batch_size", "20")
        .insert(&db)
        .await;
    let mut daemon = db
        .daemon()
        .env("BACKFILLD_DATABASE__POOL_MODE", "transaction")
        .env("BACKFILLD_DATABASE__DIRECT_URL", &other_url)
        .until_idle()
        .spawn();
    daemon.wait_ok().await;
    let job = db.job("some").await;
    assert_eq!(
        (job.state.as_str(), job.rows_changed),
        ("succeeded", 100),
        "{:?}",
        job.last_error
    );
    let vacuumed: i64 =
        sqlx::query_scalar("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'items'")
            .fetch_one(&elsewhere)
            .await
            .unwrap();
    assert_eq!(vacuumed, 0, "the other database's table was VACUUMed");
    let log = daemon.log();
    assert!(
        log.contains("database.direct_url reaches another database"),
        "{log}"
    );
    elsewhere.close().await;
    db.exec(&format!("DROP DATABASE \"{other}\" WITH (FORCE)"))
        .await;
}

/// Through PgBouncer without `pool_mode = "transaction"`, the driver's start-up options are
/// refused ("unsupported startup parameter: extra_float_digits"), and the message did not say
/// which setting avoids them.
#[sqlx::test]
async fn a_pooler_refusing_start_up_options_names_the_setting(pool: PgPool) {
    let direct = url_of(&pool);
    let database = pool.connect_options().get_database().unwrap().to_owned();
    let bouncer = Bouncer::start(&direct);
    let out = Command::new(env!("CARGO_BIN_EXE_backfilld"))
        .arg("migrate")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", bouncer.url(&database))
        .output()
        .expect("run backfilld");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("unsupported startup parameter"), "{stderr}");
    assert!(
        stderr.contains("database.pool_mode = \"transaction\""),
        "{stderr}"
    );
    drop(bouncer);
}
