//! One typed configuration tree: file (`--config`), then `BACKFILLD_<SECTION>__<KEY>` environment
//! variables, then `DATABASE_URL`. Validated once at start (and on every SIGHUP reload).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// More slices than this are refused: each one holds a connection and a backend busy. (Here, not
/// in `job`, so configuration does not depend on the job module.)
pub const MAX_PARALLELISM: i64 = 16;

/// Errors found while loading or validating configuration; each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

pub type Result<T> = std::result::Result<T, ConfigError>;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub worker: WorkerConfig,
    pub batch: BatchConfig,
    pub throttle: ThrottleConfig,
    pub bloat: BloatConfig,
    pub safety: SafetyConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Connection URL; `DATABASE_URL` in the environment wins.
    pub url: String,
    /// Schema holding `jobs`, the migration ledger and the archive tables.
    pub schema: String,
    pub max_connections: u32,
    pub application_name: String,
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// What `url` points at: the server or a session pooler, or a transaction pooler.
    pub pool_mode: PoolMode,
    /// With `pool_mode = "transaction"`: a URL past the pooler for LISTEN and VACUUM (optional).
    pub direct_url: String,
    /// `TimeZone` that job fragments and data files are read in; empty: the database's and the
    /// role's setting, as psql would get it (see `db::DateSettings`).
    pub timezone: String,
    /// Date field order (`DMY`, `MDY` or `YMD`, or a whole `DateStyle` such as `ISO, DMY`) for
    /// dates typed without a year first; empty: the database's and the role's, as for `timezone`.
    pub datestyle: String,
}

/// What kind of connection `database.url` gives (see `db`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum PoolMode {
    /// PostgreSQL itself, or a pooler that keeps a server per client (PgBouncer `session`).
    #[default]
    Session,
    /// A pooler that may switch servers between transactions (PgBouncer `transaction`).
    Transaction,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Jobs run at once by this replica.
    pub concurrency: usize,
    #[serde(deserialize_with = "duration")]
    pub poll_interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub lease_ttl: Duration,
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// Claims (crashes and exhausted retries included) before a job fails for good.
    pub max_attempts: i32,
    /// Transient errors in a row on one batch before the attempt gives up and the job is re-queued.
    pub max_batch_retries: u32,
    /// `lease_owner` written by this replica; empty means `<hostname>-<pid>-<random>`.
    pub replica_id: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Initial rows per batch when the job row does not say.
    pub size: i64,
    pub min_size: i64,
    pub max_size: i64,
    pub target_batch_ms: i64,
    /// Ceiling on one batch's statements (their `statement_timeout`; `lock_timeout` at most half
    /// of it): the longest an application transaction can wait behind a batch's row locks. A
    /// batch that reaches it is cancelled, rolled back and retried smaller. Raised to twice the
    /// target when lower, so a longer target always gets a ceiling above it.
    pub max_batch_ms: i64,
    pub sleep_ms: i64,
    /// 0 means no cap.
    pub max_rows_per_second: i64,
    #[serde(deserialize_with = "duration")]
    pub lock_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub statement_timeout: Duration,
    /// `off` lets PostgreSQL acknowledge batch commits before the WAL flush. Safe for exactly-once
    /// because data and checkpoint are lost together, never one without the other.
    pub synchronous_commit: String,
    /// Slices a job walks at once when its row does not say (each holds a connection).
    pub parallelism: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// How often the health signals are sampled.
    #[serde(deserialize_with = "duration")]
    pub check_interval: Duration,
    /// Pause while any streaming replica's replay lag exceeds this; 0s disables.
    #[serde(deserialize_with = "duration")]
    pub max_replica_lag: Duration,
    /// Pause while another transaction has been open longer than this; 0s disables.
    #[serde(deserialize_with = "duration")]
    pub max_transaction_age: Duration,
    /// Pause while more than this many sessions wait on locks; 0 disables.
    pub max_lock_waiters: i64,
    /// Pause while the target table has more dead tuples than this; 0 disables.
    pub max_dead_tuples: i64,
    /// Pause while the target's dead tuples exceed this share of its live tuples (and autovacuum
    /// may run on it, so waiting ends); 0 disables.
    pub max_dead_tuple_ratio: f64,
    /// After a batch that made other sessions wait on its row locks: halve the next batch and
    /// pause longer.
    pub back_off_when_blocking: bool,
    /// When batches run this many times slower per key than the job's best (the server is
    /// busier), pause proportionally longer, up to this factor; 0 disables.
    pub max_load_factor: f64,
    /// Pause while autovacuum is working on the target table.
    pub pause_during_autovacuum: bool,
    /// Pause while WAL is generated faster than this many bytes per second; 0 disables.
    pub max_wal_bytes_per_second: i64,
    /// Pause while any replication slot holds back more WAL than this many bytes (a logical
    /// decoding consumer or a standby behind, or a slot nobody reads); 0 disables.
    pub max_slot_wal_bytes: i64,
}

/// The bloat guard: VACUUM the target while a job runs, so the space its rewritten rows free is
/// reused and the heap does not grow by the size of the change.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BloatConfig {
    /// Off: rely on autovacuum alone.
    pub guard: bool,
    /// VACUUM the target after changing this share of its rows.
    pub vacuum_every_fraction: f64,
    /// ... but never after fewer rows changed than this.
    pub vacuum_min_rows: i64,
    /// `statement_timeout` of the guard's VACUUM.
    #[serde(deserialize_with = "duration")]
    pub vacuum_timeout: Duration,
    /// `vacuum_cost_delay` of the guard's VACUUM (0 = full speed, as a manual VACUUM).
    #[serde(deserialize_with = "duration")]
    pub vacuum_cost_delay: Duration,
    /// Every Nth guard VACUUM also cleans the indexes, so the pages earlier runs pruned become
    /// all-visible and later runs skip them; 0 = only the final VACUUM does.
    pub index_cleanup_every: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SafetyConfig {
    /// Default ceiling on affected rows when the job row has none; 0 means no default ceiling.
    pub max_affected: i64,
    /// Archive tables older than this many days are dropped; 0 keeps them forever.
    pub archive_retention_days: i64,
    /// When non-empty, only these tables (`schema.table`) may be targets.
    pub allowed_tables: Vec<String>,
    /// Rows sampled into a dry-run plan.
    pub plan_sample_rows: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` for /metrics, /healthz, /readyz; empty disables the listener.
    pub listen: String,
    /// A finished job's series are dropped this long after it finished, so the series stay
    /// bounded by running and recently finished jobs.
    #[serde(deserialize_with = "duration")]
    pub finished_job_ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum LogFormat {
    Text,
    Json,
}

/// An enum value from its name, or an error listing the names (serde's own said "enum PoolMode
/// does not have variant constructor statement").
fn one_of<T: Copy>(value: &str, names: &[(&str, T)]) -> std::result::Result<T, String> {
    let found = names
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(value.trim()));
    found.map(|(_, v)| *v).ok_or_else(|| {
        let listed: Vec<String> = names.iter().map(|(n, _)| format!("{n:?}")).collect();
        format!("{value:?} is not one of {}", listed.join(", "))
    })
}

impl TryFrom<String> for PoolMode {
    type Error = String;
    fn try_from(value: String) -> std::result::Result<Self, String> {
        one_of(
            &value,
            &[
                ("session", PoolMode::Session),
                ("transaction", PoolMode::Transaction),
            ],
        )
    }
}

impl TryFrom<String> for LogFormat {
    type Error = String;
    fn try_from(value: String) -> std::result::Result<Self, String> {
        one_of(
            &value,
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `backfilld=debug,sqlx=warn`.
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`; empty disables tracing export.
    pub otlp_endpoint: String,
    pub service_name: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            schema: "backfill".into(),
            max_connections: 8,
            application_name: "backfilld".into(),
            connect_timeout: Duration::from_secs(10),
            pool_mode: PoolMode::Session,
            direct_url: String::new(),
            timezone: String::new(),
            datestyle: String::new(),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 2,
            poll_interval: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            max_attempts: 5,
            max_batch_retries: 8,
            replica_id: String::new(),
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            size: 1000,
            min_size: 100,
            max_size: 50_000,
            target_batch_ms: 20,
            max_batch_ms: 40,
            sleep_ms: 25,
            max_rows_per_second: 0,
            lock_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(30),
            synchronous_commit: "off".into(),
            parallelism: 1,
        }
    }
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_secs(5),
            max_replica_lag: Duration::from_secs(10),
            max_transaction_age: Duration::from_secs(300),
            max_lock_waiters: 0,
            max_dead_tuples: 0,
            max_dead_tuple_ratio: 0.3,
            back_off_when_blocking: true,
            max_load_factor: 4.0,
            pause_during_autovacuum: true,
            max_wal_bytes_per_second: 0,
            max_slot_wal_bytes: 10 * 1024 * 1024 * 1024,
        }
    }
}

impl Default for BloatConfig {
    fn default() -> Self {
        Self {
            guard: true,
            vacuum_every_fraction: 0.03,
            vacuum_min_rows: 10_000,
            index_cleanup_every: 5,
            vacuum_timeout: Duration::from_secs(600),
            vacuum_cost_delay: Duration::ZERO,
        }
    }
}

impl Default for SafetyConfig {
    fn default() -> Self {
        Self {
            max_affected: 0,
            archive_retention_days: 30,
            allowed_tables: Vec::new(),
            plan_sample_rows: 10,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".into(),
            finished_job_ttl: Duration::from_secs(3600),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "backfilld".into(),
        }
    }
}

/// Where configuration comes from; kept so SIGHUP can reload from the same places.
#[derive(Debug, Clone, Default)]
pub struct Source {
    pub path: Option<PathBuf>,
    pub database_url: Option<String>,
}

impl Source {
    /// The configured file, or `config/backfilld.toml` when present.
    pub fn new(path: Option<PathBuf>, database_url: Option<String>) -> Self {
        let default = Path::new("config/backfilld.toml");
        let path = path.or_else(|| default.exists().then(|| default.to_path_buf()));
        Self { path, database_url }
    }

    /// Reads file, environment and `DATABASE_URL`, then validates.
    pub fn load(&self) -> Result<Config> {
        self.load_reporting().map_err(|(e, _)| e)
    }

    /// `load`, and when it fails the `log.format` to report the failure in (`log_format`), both
    /// from one read of the file: a process substitution or a pipe cannot be read twice.
    pub fn load_reporting(&self) -> std::result::Result<Config, (ConfigError, LogFormat)> {
        let text = match self.file_text() {
            Ok(text) => text,
            Err(e) => return Err((e.into(), log_format(None))),
        };
        let text = text.as_deref();
        self.load_from(text)
            .map_err(|e| (e, log_format(self.sources(text, true).ok())))
    }

    fn load_from(&self, text: Option<&str>) -> Result<Config> {
        let mut cfg: Config = self
            .sources(text, true)?
            .try_deserialize()
            .map_err(|e| self.locate(e, text))?;
        if let Ok(url) = std::env::var("DATABASE_URL") {
            cfg.database.url = url;
        }
        if let Some(url) = &self.database_url {
            cfg.database.url = url.clone();
        }
        cfg.normalise();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Says where a value that does not fit came from when the error does not (the file is
    /// parsed from a string, so its values carry no origin; an unknown key has none either):
    /// the file, if it fails alone, else the environment.
    fn locate(&self, e: config::ConfigError, text: Option<&str>) -> config::ConfigError {
        use config::ConfigError::{At, Message, Type};
        if matches!(
            &e,
            Type {
                origin: Some(_),
                ..
            } | At {
                origin: Some(_),
                ..
            }
        ) {
            return e;
        }
        let file_alone = self
            .sources(text, false)
            .and_then(|c| c.try_deserialize::<Config>());
        match (&self.path, file_alone) {
            (Some(path), Err(_)) => Message(format!("configuration file {}: {e}", path.display())),
            _ => Message(format!("{e}, set by a BACKFILLD_ environment variable")),
        }
    }

    /// `log.format` alone, for reporting a configuration that does not load (another key may be
    /// what is wrong, or the file): from file and environment, else from the environment alone,
    /// else text.
    pub fn log_format(&self) -> LogFormat {
        let text = self.file_text().ok().flatten();
        log_format(self.sources(text.as_deref(), true).ok())
    }

    /// The configuration file's text, read here and parsed as TOML whatever its name:
    /// `config::File` guesses the format from the extension and takes only regular files, so
    /// `/dev/null`, a process substitution or a mounted `config` were "not found".
    fn file_text(&self) -> std::result::Result<Option<String>, config::ConfigError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        std::fs::read_to_string(path).map(Some).map_err(|e| {
            config::ConfigError::Message(format!("configuration file {}: {e}", path.display()))
        })
    }

    /// The file's `text` and (with `env`) the environment, merged.
    fn sources(
        &self,
        text: Option<&str>,
        env: bool,
    ) -> std::result::Result<config::Config, config::ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(text) = text {
            builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
        }
        if env {
            builder = builder.add_source(environment());
        }
        builder.build().map_err(|e| match e {
            // Parsed from a string, the file's syntax errors would not say which file.
            config::ConfigError::FileParse { uri: None, cause } => {
                let shown = self.path.as_deref().unwrap_or(Path::new("?")).display();
                config::ConfigError::Message(format!("configuration file {shown}: {cause}"))
            }
            e => e,
        })
    }
}

/// `log.format` from `merged` (file and environment) if it reads, else from the environment
/// alone, else text.
fn log_format(merged: Option<config::Config>) -> LogFormat {
    let format = |c: config::Config| c.get::<LogFormat>("log.format");
    merged
        .ok_or(config::ConfigError::Frozen)
        .and_then(format)
        .or_else(|_| {
            let env = config::Config::builder().add_source(environment());
            env.build().and_then(format)
        })
        .unwrap_or(LogFormat::Text)
}

/// The `BACKFILLD_<SECTION>__<KEY>` variables as a configuration source.
fn environment() -> config::Environment {
    config::Environment::with_prefix("BACKFILLD")
        .prefix_separator("_")
        .separator("__")
        .list_separator(",")
        .with_list_parse_key("safety.allowed_tables")
        .try_parsing(true)
        .source(Some(section_variables()))
}

/// `BACKFILLD_` variables that are neither configuration keys (`BACKFILLD_<SECTION>__<KEY>`)
/// nor known to the tools (`BACKFILLD_CONFIG`, `BACKFILLD_LINT_*`): most likely a key written
/// with one underscore (`BACKFILLD_METRICS_LISTEN`), which would otherwise be ignored silently.
pub fn ignored_variables() -> Vec<String> {
    let mut names: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("BACKFILLD_") && !k.contains("__"))
        .filter(|k| k != "BACKFILLD_CONFIG" && !k.starts_with("BACKFILLD_LINT_"))
        .collect();
    names.sort();
    names
}

/// Only `BACKFILLD_<SECTION>__<KEY>` variables are configuration keys; others with the prefix
/// (such as `BACKFILLD_CONFIG`, the file path) are not.
fn section_variables() -> config::Map<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("BACKFILLD_") && k.contains("__"))
        .collect()
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

impl Config {
    /// Settings that load but work against each other: warned about at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let (connect, lease) = (self.database.connect_timeout, self.worker.lease_ttl);
        if connect >= lease {
            warnings.push(format!(
                "database.connect_timeout ({}s) is not shorter than worker.lease_ttl ({}s): a \
                 heartbeat that waits that long for a connection (the pool busy, the server slow \
                 to accept) lets its lease expire, and another replica takes the job over; the \
                 batch in flight then rolls back at its checkpoint",
                connect.as_secs_f64(),
                lease.as_secs_f64()
            ));
        }
        warnings
    }

    /// Rejects values the daemon could not run with, naming the key.
    pub fn validate(&self) -> Result<()> {
        self.database.validate()?;
        positive("worker.concurrency", self.worker.concurrency as i64)?;
        positive("worker.max_attempts", self.worker.max_attempts as i64)?;
        if self.database.max_connections as usize <= self.worker.concurrency {
            return Err(invalid(
                "database.max_connections",
                "must exceed worker.concurrency (each job also needs a heartbeat connection)",
            ));
        }
        let (heartbeat, lease) = (self.worker.heartbeat_interval, self.worker.lease_ttl);
        if lease.is_zero() {
            return Err(invalid("worker.lease_ttl", "must be positive"));
        }
        if heartbeat.is_zero() || heartbeat * 2 > lease {
            return Err(invalid(
                "worker.heartbeat_interval",
                format!(
                    "must be non-zero and at most half of worker.lease_ttl (it is {}s, and \
                     worker.lease_ttl {}s): lower it, or raise worker.lease_ttl",
                    heartbeat.as_secs_f64(),
                    lease.as_secs_f64()
                ),
            ));
        }
        self.batch.validate()?;
        self.throttle.validate()?;
        self.bloat.validate()?;
        if !["on", "off", "local", "remote_write", "remote_apply"]
            .contains(&self.batch.synchronous_commit.as_str())
        {
            return Err(invalid(
                "batch.synchronous_commit",
                "must be on, off, local, remote_write or remote_apply",
            ));
        }
        non_negative("safety.max_affected", self.safety.max_affected)?;
        non_negative(
            "safety.archive_retention_days",
            self.safety.archive_retention_days,
        )?;
        positive("safety.plan_sample_rows", self.safety.plan_sample_rows)?;
        if !self.metrics.listen.is_empty() && !is_host_port(&self.metrics.listen) {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "{:?} is not host:port (e.g. 127.0.0.1:9187, localhost:9187, [::]:9187)",
                    self.metrics.listen
                ),
            ));
        }
        for (key, value) in [
            ("worker.poll_interval", self.worker.poll_interval),
            ("database.connect_timeout", self.database.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be non-zero"));
            }
        }
        let unreadable = |t: &&String| crate::sql::split_qualified(t).is_none();
        if let Some(bad) = self.safety.allowed_tables.iter().find(unreadable) {
            return Err(invalid(
                "safety.allowed_tables",
                format!(
                    "{bad:?} is not a schema-qualified table name as SQL writes one (e.g. \
                     public.orders, public.\"Odd Table\"; one name per list entry)"
                ),
            ));
        }
        check_log_level(&self.log.level)?;
        let otlp = &self.telemetry.otlp_endpoint;
        let is_url = otlp.starts_with("http://") || otlp.starts_with("https://");
        if !otlp.is_empty() && !is_url {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                format!("{otlp:?} is not an http:// or https:// URL"),
            ));
        }
        Ok(())
    }

    /// Trims `safety.allowed_tables` entries and drops empty ones: an environment variable
    /// rendered empty (`BACKFILLD_SAFETY__ALLOWED_TABLES=`) means no list, not a list of "".
    fn normalise(&mut self) {
        let tables = std::mem::take(&mut self.safety.allowed_tables);
        self.safety.allowed_tables = tables
            .into_iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
    }
}

/// `host:port` a listener can bind: a port number after the last colon, and a host (a name, an
/// address, or a bracketed IPv6 address) before it.
fn is_host_port(listen: &str) -> bool {
    if listen.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    match listen.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok()
                && !host.is_empty()
                && !host.contains(':')
                && !host.contains(char::is_whitespace)
        }
        None => false,
    }
}

/// `log.level` is a tracing filter: comma-separated directives, each a level (`info`) or
/// `target=level`. A bare word that is not a level is refused: the filter would read it as a
/// target (`warning` enables only a module named "warning" and silences everything else).
fn check_log_level(level: &str) -> Result<()> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |s: &str| LEVELS.contains(&s.trim().to_ascii_lowercase().as_str());
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let ok = match directive.rsplit_once('=') {
            Some((target, lvl)) => !target.trim().is_empty() && is_level(lvl),
            None => is_level(directive),
        };
        if !ok {
            return Err(invalid(
                "log.level",
                format!(
                    "{directive:?} is not a level (trace, debug, info, warn, error, off) nor \
                     target=level"
                ),
            ));
        }
    }
    if level.trim().is_empty() {
        return Err(invalid("log.level", "must not be empty (e.g. info)"));
    }
    Ok(())
}

impl DatabaseConfig {
    fn validate(&self) -> Result<()> {
        if self.url.is_empty() {
            return Err(invalid(
                "database.url",
                "no database configured: set DATABASE_URL, --database-url or database.url",
            ));
        }
        if !self.direct_url.is_empty() && self.pool_mode == PoolMode::Session {
            return Err(invalid(
                "database.direct_url",
                "only used with database.pool_mode = \"transaction\" (database.url is direct already)",
            ));
        }
        for (key, url) in [
            ("database.url", &self.url),
            ("database.direct_url", &self.direct_url),
        ] {
            if let (false, Err(e)) = (
                url.is_empty(),
                url.parse::<sqlx::postgres::PgConnectOptions>(),
            ) {
                return Err(invalid(
                    key,
                    format!("not a PostgreSQL connection URL ({e})"),
                ));
            }
        }
        if !self.datestyle.is_empty() && crate::db::date_order(&self.datestyle).is_none() {
            return Err(invalid(
                "database.datestyle",
                "no date field order in it (DMY, MDY or YMD, as in \"ISO, DMY\")",
            ));
        }
        if !is_plain_identifier(&self.schema) {
            return Err(invalid(
                "database.schema",
                "must be a lower-case identifier ([a-z_][a-z0-9_]*)",
            ));
        }
        positive("database.max_connections", self.max_connections as i64)
    }
}

impl BatchConfig {
    fn validate(&self) -> Result<()> {
        positive("batch.min_size", self.min_size)?;
        positive("batch.size", self.size)?;
        positive("batch.target_batch_ms", self.target_batch_ms)?;
        positive("batch.max_batch_ms", self.max_batch_ms)?;
        non_negative("batch.sleep_ms", self.sleep_ms)?;
        non_negative("batch.max_rows_per_second", self.max_rows_per_second)?;
        if !(1..=MAX_PARALLELISM).contains(&self.parallelism) {
            return Err(invalid(
                "batch.parallelism",
                format!("must be between 1 and {}", MAX_PARALLELISM),
            ));
        }
        if self.min_size > self.max_size {
            return Err(invalid("batch.max_size", "must be >= batch.min_size"));
        }
        if self.size < self.min_size || self.size > self.max_size {
            return Err(invalid(
                "batch.size",
                "must lie between batch.min_size and batch.max_size",
            ));
        }
        if self.lock_timeout.is_zero() || self.statement_timeout.is_zero() {
            return Err(invalid(
                "batch.statement_timeout",
                "lock_timeout and statement_timeout must be non-zero: a batch must never wait forever",
            ));
        }
        Ok(())
    }
}

impl ThrottleConfig {
    fn validate(&self) -> Result<()> {
        non_negative("throttle.max_lock_waiters", self.max_lock_waiters)?;
        non_negative("throttle.max_dead_tuples", self.max_dead_tuples)?;
        non_negative(
            "throttle.max_wal_bytes_per_second",
            self.max_wal_bytes_per_second,
        )?;
        non_negative("throttle.max_slot_wal_bytes", self.max_slot_wal_bytes)?;
        fraction(
            "throttle.max_dead_tuple_ratio",
            self.max_dead_tuple_ratio,
            100.0,
        )?;
        if self.max_load_factor != 0.0
            && (self.max_load_factor.is_nan() || self.max_load_factor < 1.0)
        {
            return Err(invalid(
                "throttle.max_load_factor",
                format!("must be 0 (off) or >= 1, got {}", self.max_load_factor),
            ));
        }
        Ok(())
    }
}

impl BloatConfig {
    fn validate(&self) -> Result<()> {
        fraction(
            "bloat.vacuum_every_fraction",
            self.vacuum_every_fraction,
            1.0,
        )?;
        if self.guard && self.vacuum_every_fraction == 0.0 {
            return Err(invalid(
                "bloat.vacuum_every_fraction",
                "must be > 0 while bloat.guard is on",
            ));
        }
        positive("bloat.vacuum_min_rows", self.vacuum_min_rows)?;
        if self.vacuum_timeout.is_zero() {
            return Err(invalid(
                "bloat.vacuum_timeout",
                "must be non-zero: the guard's VACUUM must never run forever",
            ));
        }
        if self.vacuum_cost_delay > Duration::from_millis(100) {
            return Err(invalid(
                "bloat.vacuum_cost_delay",
                "must be at most 100ms (PostgreSQL's limit)",
            ));
        }
        Ok(())
    }
}

fn fraction(key: &'static str, value: f64, max: f64) -> Result<()> {
    if !(0.0..=max).contains(&value) {
        return Err(invalid(
            key,
            format!("must be between 0 and {max}, got {value}"),
        ));
    }
    Ok(())
}

fn positive(key: &'static str, value: i64) -> Result<()> {
    if value <= 0 {
        return Err(invalid(key, format!("must be > 0, got {value}")));
    }
    Ok(())
}

fn non_negative(key: &'static str, value: i64) -> Result<()> {
    if value < 0 {
        return Err(invalid(key, format!("must be >= 0, got {value}")));
    }
    Ok(())
}

fn is_plain_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && s.len() <= 63
}

/// Accepts `"30s"`, `"1m 30s"`, `"250ms"` and bare integers (seconds).
fn duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => humantime::parse_duration(t.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "{t:?} is not a duration such as \"30s\", \"5m\" or \"1h 30m\" ({e})"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        let mut c = Config::default();
        c.database.url = "postgres://localhost/x".into();
        c
    }

    #[test]
    fn defaults_with_a_url_are_valid() {
        valid().validate().unwrap();
        let mut c = valid();
        c.metrics.listen = "localhost:9187".into();
        c.log.level = "info,backfilld=debug, sqlx=WARN".into();
        c.telemetry.otlp_endpoint = "http://127.0.0.1:4317".into();
        c.database.datestyle = "dmy".into();
        c.safety.allowed_tables = vec![" public.orders ".into(), String::new()];
        c.normalise();
        c.validate().unwrap();
        assert_eq!(c.safety.allowed_tables, ["public.orders"]);
    }

    #[test]
    fn invalid_values_name_their_key() {
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("database.url", Box::new(|c| c.database.url.clear())),
            (
                "database.direct_url",
                Box::new(|c| c.database.direct_url = "postgres://db:5432/app".into()),
            ),
            (
                "database.direct_url",
                Box::new(|c| {
                    c.database.pool_mode = PoolMode::Transaction;
                    c.database.direct_url = "postgres://db:notaport/app".into();
                }),
            ),
            (
                "database.url",
                Box::new(|c| c.database.url = "postgres://db:5432x/app".into()),
            ),
            (
                "database.schema",
                Box::new(|c| c.database.schema = "Bad;".into()),
            ),
            ("batch.min_size", Box::new(|c| c.batch.min_size = 0)),
            ("batch.max_size", Box::new(|c| c.batch.max_size = 10)),
            ("batch.size", Box::new(|c| c.batch.size = 1_000_000)),
            ("worker.concurrency", Box::new(|c| c.worker.concurrency = 0)),
            (
                "database.max_connections",
                Box::new(|c| c.database.max_connections = 2),
            ),
            (
                "worker.heartbeat_interval",
                Box::new(|c| c.worker.heartbeat_interval = Duration::from_secs(60)),
            ),
            (
                "worker.lease_ttl",
                Box::new(|c| c.worker.lease_ttl = Duration::ZERO),
            ),
            (
                "metrics.listen",
                Box::new(|c| c.metrics.listen = "nowhere".into()),
            ),
            (
                "metrics.listen",
                Box::new(|c| c.metrics.listen = ":9187".into()),
            ),
            (
                "worker.poll_interval",
                Box::new(|c| c.worker.poll_interval = Duration::ZERO),
            ),
            (
                "database.connect_timeout",
                Box::new(|c| c.database.connect_timeout = Duration::ZERO),
            ),
            (
                "safety.allowed_tables",
                Box::new(|c| c.safety.allowed_tables = vec!["orders".into()]),
            ),
            ("log.level", Box::new(|c| c.log.level = "warning".into())),
            (
                "log.level",
                Box::new(|c| c.log.level = "backfilld=inf".into()),
            ),
            ("log.level", Box::new(|c| c.log.level = " ".into())),
            (
                "telemetry.otlp_endpoint",
                Box::new(|c| c.telemetry.otlp_endpoint = "not-a-url".into()),
            ),
            (
                "database.datestyle",
                Box::new(|c| c.database.datestyle = "ISO".into()),
            ),
            (
                "batch.synchronous_commit",
                Box::new(|c| c.batch.synchronous_commit = "maybe".into()),
            ),
            ("batch.max_batch_ms", Box::new(|c| c.batch.max_batch_ms = 0)),
            (
                "throttle.max_slot_wal_bytes",
                Box::new(|c| c.throttle.max_slot_wal_bytes = -1),
            ),
            (
                "throttle.max_dead_tuple_ratio",
                Box::new(|c| c.throttle.max_dead_tuple_ratio = -1.0),
            ),
            (
                "throttle.max_load_factor",
                Box::new(|c| c.throttle.max_load_factor = 0.5),
            ),
            (
                "bloat.vacuum_every_fraction",
                Box::new(|c| c.bloat.vacuum_every_fraction = 0.0),
            ),
            (
                "bloat.vacuum_timeout",
                Box::new(|c| c.bloat.vacuum_timeout = Duration::ZERO),
            ),
        ];
        for (key, mutate) in cases {
            let mut c = valid();
            mutate(&mut c);
            let err = c.validate().expect_err(key).to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn durations_parse_from_text_and_seconds() {
        let c: WorkerConfig = toml_like(r#"{"lease_ttl": "1m 30s", "heartbeat_interval": 3}"#);
        assert_eq!(c.lease_ttl, Duration::from_secs(90));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(3));
    }

    fn toml_like<T: serde::de::DeserializeOwned>(json: &str) -> T {
        serde_json::from_str(json).unwrap()
    }
}
