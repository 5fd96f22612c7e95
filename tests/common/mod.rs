//! Test harness: a per-test database (from `#[sqlx::test]`) with backfilld's schema, and real
//! daemon processes (the built binary) that can be stopped, killed, paused and restarted.
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use backfilld::job::JobRow;
use backfilld::sql::Names;
use sqlx::PgPool;

pub const WAIT: Duration = Duration::from_secs(120);

pub struct Db {
    pub pool: PgPool,
    /// The same pool as the library takes it (direct: no pooler in front).
    pub lib: backfilld::db::Db,
    pub url: String,
    pub names: Names,
    /// Logs of every daemon this test started, printed when a wait gives up.
    logs: std::sync::Arc<std::sync::Mutex<Vec<PathBuf>>>,
}

impl Db {
    /// Migrates the test database and derives its URL from DATABASE_URL.
    pub async fn new(pool: PgPool) -> Self {
        let names = Names::new("backfill");
        let lib = backfilld::db::Db::direct(pool.clone());
        backfilld::schema::migrate(&lib, &names)
            .await
            .expect("migrate");
        let url = url_of(&pool);
        Self {
            pool,
            lib,
            url,
            names,
            logs: Default::default(),
        }
    }

    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn scalar_text(&self, sql: &str) -> String {
        sqlx::query_scalar::<_, String>(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// An md5 over every row of `table` in key order, optionally excluding rows.
    pub async fn checksum(&self, table: &str, key: &str, exclude: &str) -> String {
        self.scalar_text(&format!(
            "SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY {key})), 'empty') FROM {table} t WHERE NOT ({exclude})"
        ))
        .await
    }

    pub async fn job(&self, name: &str) -> JobRow {
        backfilld::ops::get(&self.lib, &self.names, name)
            .await
            .expect("job")
    }

    /// Enqueues the revert of job `name` (no cascades allowed), runs a daemon until idle, and
    /// returns the revert's row.
    pub async fn revert(&self, name: &str) -> JobRow {
        let revert = backfilld::ops::revert(&self.lib, &self.names, name, false)
            .await
            .expect("revert");
        self.daemon().until_idle().spawn().wait_ok().await;
        self.job(&revert.name).await
    }

    pub async fn set_requested(&self, name: &str, state: &str) {
        sqlx::query("UPDATE backfill.jobs SET requested_state = $2 WHERE name = $1")
            .bind(name)
            .bind(state)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// Polls the job row until `done` holds.
    pub async fn wait_for(&self, name: &str, what: &str, done: impl Fn(&JobRow) -> bool) -> JobRow {
        let deadline = Instant::now() + WAIT;
        loop {
            let row = self.job(name).await;
            if done(&row) {
                return row;
            }
            assert!(
                Instant::now() < deadline,
                "job {name}: gave up waiting for {what}; row: {row:#?}\n{}",
                self.daemon_logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_state(&self, name: &str, state: &str) -> JobRow {
        self.wait_for(name, state, |r| r.state == state).await
    }

    /// Opens a transaction in another session, runs `sql` in it and keeps it (and its locks)
    /// open until `Held::commit`.
    pub async fn hold(&self, sql: &str) -> Held {
        let mut conn = self.pool.acquire().await.unwrap();
        sqlx::raw_sql(&format!("BEGIN; {sql}"))
            .execute(&mut *conn)
            .await
            .unwrap();
        Held(conn)
    }

    /// A name for a cluster-wide object (a role, a replication slot) unique to this test's
    /// database: `prefix` and the database name's last 20 letters and digits, lower case.
    pub async fn cluster_unique(&self, prefix: &str) -> String {
        let database = self.scalar_text("SELECT current_database()").await;
        let suffix: String = database
            .chars()
            .rev()
            .filter(char::is_ascii_alphanumeric)
            .take(20)
            .collect();
        format!("{prefix}_{}", suffix.to_ascii_lowercase())
    }

    /// The test database's URL with other credentials (`user:password`).
    pub fn url_as(&self, user: &str, password: &str) -> String {
        let (scheme, rest) = self.url.split_once("://").expect("URL scheme");
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        format!("{scheme}://{user}:{password}@{host}")
    }

    pub fn daemon_logs(&self) -> String {
        let paths = self.logs.lock().unwrap().clone();
        paths
            .iter()
            .map(|p| {
                format!(
                    "--- {}\n{}",
                    p.display(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    pub fn daemon(&self) -> DaemonBuilder {
        DaemonBuilder {
            logs: self.logs.clone(),
            ..DaemonBuilder::new(&self.url)
        }
    }
}

/// An open transaction of another session (see `Db::hold`).
/// The URL of a `#[sqlx::test]` database: DATABASE_URL with the test database's name.
pub fn url_of(pool: &PgPool) -> String {
    let db = pool
        .connect_options()
        .get_database()
        .expect("test database name")
        .to_owned();
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let (prefix, query) = match base.split_once('?') {
        Some((p, q)) => (p.to_owned(), format!("?{q}")),
        None => (base.clone(), String::new()),
    };
    let server = prefix.rsplit_once('/').map_or(prefix.as_str(), |(s, _)| s);
    format!("{server}/{db}{query}")
}

pub struct Held(sqlx::pool::PoolConnection<sqlx::Postgres>);

impl Held {
    pub async fn commit(mut self) {
        sqlx::raw_sql("COMMIT").execute(&mut *self.0).await.unwrap();
    }
}

/// Polls `check` until it holds; after `WAIT`, panics naming `what` with `context()` (a log).
pub async fn wait_until(
    what: &str,
    context: impl Fn() -> String,
    mut check: impl AsyncFnMut() -> bool,
) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A job row to insert; defaults: update, execute, no archive, small batches, no sleep.
#[derive(Clone)]
pub struct NewJob {
    cols: Vec<(&'static str, String)>,
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl NewJob {
    pub fn new(name: &str, table: &str) -> Self {
        Self {
            cols: vec![
                ("name", lit(name)),
                ("table_name", lit(table)),
                ("mode", lit("execute")),
                ("archive", "false".into()),
                ("batch_size", "100".into()),
                ("sleep_ms", "0".into()),
            ],
        }
    }

    /// Sets a column to a raw SQL value (`NULL`, `42`, `'text'`, `ARRAY['a']`).
    pub fn raw(mut self, col: &'static str, sql_value: impl Into<String>) -> Self {
        self.cols.retain(|(c, _)| *c != col);
        self.cols.push((col, sql_value.into()));
        self
    }

    pub fn text(self, col: &'static str, value: &str) -> Self {
        self.raw(col, lit(value))
    }

    pub fn predicate(self, p: &str) -> Self {
        self.text("predicate", p)
    }

    pub fn set(self, s: &str) -> Self {
        self.text("set_clause", s)
    }

    pub fn sql(&self) -> String {
        let cols: Vec<&str> = self.cols.iter().map(|(c, _)| *c).collect();
        let vals: Vec<&str> = self.cols.iter().map(|(_, v)| v.as_str()).collect();
        format!(
            "INSERT INTO backfill.jobs ({}) VALUES ({})",
            cols.join(", "),
            vals.join(", ")
        )
    }

    pub async fn insert(&self, db: &Db) {
        db.exec(&self.sql()).await;
    }
}

pub struct DaemonBuilder {
    logs: std::sync::Arc<std::sync::Mutex<Vec<PathBuf>>>,
    url: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl DaemonBuilder {
    fn new(url: &str) -> Self {
        let defaults = [
            ("BACKFILLD_METRICS__LISTEN", ""),
            ("BACKFILLD_WORKER__POLL_INTERVAL", "200ms"),
            ("BACKFILLD_WORKER__LEASE_TTL", "3s"),
            ("BACKFILLD_WORKER__HEARTBEAT_INTERVAL", "500ms"),
            ("BACKFILLD_WORKER__CONCURRENCY", "4"),
            ("BACKFILLD_WORKER__MAX_ATTEMPTS", "20"),
            ("BACKFILLD_DATABASE__MAX_CONNECTIONS", "8"),
            ("BACKFILLD_BATCH__MIN_SIZE", "10"),
            // Tests of other behaviour count batches exactly; a 40 ms ceiling on a loaded test
            // machine would split some of them. tests/impact.rs sets ceilings where it tests them.
            ("BACKFILLD_BATCH__MAX_BATCH_MS", "5000"),
            ("BACKFILLD_LOG__LEVEL", "backfilld=debug,info"),
        ];
        Self {
            logs: Default::default(),
            url: url.to_owned(),
            env: defaults
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: vec!["run".into()],
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }

    /// Caps the adaptive batch size (and starts there).
    pub fn max_batch(self, n: usize) -> Self {
        let n = n.to_string();
        self.env("BACKFILLD_BATCH__SIZE", &n)
            .env("BACKFILLD_BATCH__MAX_SIZE", &n)
            .env("BACKFILLD_BATCH__MIN_SIZE", "1")
    }

    /// Connects as someone else (e.g. a least-privilege role) instead of the test's superuser.
    pub fn database_url(mut self, url: &str) -> Self {
        self.url = url.to_owned();
        self
    }

    /// Passes `--config PATH`.
    pub fn config_file(mut self, path: &std::path::Path) -> Self {
        self.args.push("--config".into());
        self.args.push(path.display().to_string());
        self
    }

    pub fn until_idle(mut self) -> Self {
        self.args.push("--until-idle".into());
        self
    }

    pub fn spawn(self) -> Daemon {
        let dir = std::env::temp_dir().join(format!(
            "backfilld-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("stderr.log");
        self.logs.lock().unwrap().push(log.clone());
        let child = Command::new(env!("CARGO_BIN_EXE_backfilld"))
            .args(&self.args)
            .current_dir(&dir) // no config/backfilld.toml here: env only
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.url)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn backfilld");
        Daemon { child, log }
    }
}

pub struct Daemon {
    pub child: Child,
    log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig} failed");
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for exit; panics (with the log) after `limit`, which is a hang guard, not a timing goal.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("daemon did not exit within {limit:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a clean exit, panicking with the log otherwise.
    pub async fn wait_ok(&mut self) {
        let status = self.wait(WAIT).await;
        assert!(
            status.success(),
            "daemon exited with {status}; log:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test keeps the log (its panic message names it or prints it).
        if !std::thread::panicking()
            && let Some(dir) = self.log.parent()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The value of one series (`name{labels}`) in a Prometheus text exposition, if present.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A free TCP port on 127.0.0.1 for a daemon's metrics listener.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET over plain HTTP/1.0 on 127.0.0.1; returns (status, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    stream.read_to_string(&mut buf).await.ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}
