//! Wiring for `backfilld run`: pool, metrics, HTTP, signals, config reload, the daemon loop.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Source};
use crate::daemon::{Daemon, Readiness};
use crate::db::Db;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::runner::Context;
use crate::sql::Names;
use crate::telemetry::Telemetry;
use crate::{http, schema, shutdown};

/// Opens the pool (see `Db::connect`).
pub async fn connect(cfg: &Config) -> Result<Db> {
    Db::connect(cfg).await.map_err(|source| Error::Connect {
        server: server_of(&cfg.database.url),
        source,
    })
}

/// `host:port/database` of a connection URL: no user, no password, no options.
fn server_of(url: &str) -> String {
    match url.parse::<sqlx::postgres::PgConnectOptions>() {
        Ok(o) => format!(
            "PostgreSQL at {}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or_default()
        ),
        Err(_) => "PostgreSQL (unparsable database.url)".into(),
    }
}

/// `<hostname>-<pid>-<random>` unless configured.
pub fn replica_id(cfg: &Config) -> String {
    if !cfg.worker.replica_id.is_empty() {
        return cfg.worker.replica_id.clone();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "backfilld".into());
    format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
}

/// Runs the daemon until a stop signal (or idleness with `until_idle`).
pub async fn run_daemon(
    source: Source,
    cfg: Config,
    until_idle: bool,
    telemetry: &Telemetry,
) -> Result<()> {
    let names = Names::new(&cfg.database.schema);
    let shutdown = CancellationToken::new();
    let reloads = shutdown::install(shutdown.clone()).map_err(|e| Error::Refused {
        job: "-".into(),
        reason: format!("cannot install signal handlers: {e}"),
    })?;
    let metrics = Metrics::new();
    let readiness = Arc::new(Readiness::default());
    readiness.alive();
    // The listener outlives the drain: /readyz answers 503 ("stopping") while jobs hand back,
    // and /metrics stays scrapable, instead of refusing connections.
    let server_stop = CancellationToken::new();
    let (config_tx, config_rx) = watch::channel(Arc::new(cfg.clone()));
    let server = match cfg.metrics.listen.as_str() {
        "" => None,
        listen => Some(
            http::serve(
                listen,
                metrics.clone(),
                readiness.clone(),
                config_rx.clone(),
                server_stop.clone(),
            )
            .await?,
        ),
    };
    let waiting = Waiting {
        until_idle,
        readiness: &readiness,
        shutdown: &shutdown,
    };
    let Some(pool) = waiting.connect(&cfg, &names).await? else {
        server_stop.cancel();
        if let Some(server) = server {
            let _ = server.await;
        }
        return Ok(());
    };
    crate::throttle::report_visibility(&pool, &cfg.throttle, &metrics.stats_visible).await;
    let ctx = Arc::new(Context {
        pool: pool.clone(),
        names,
        config: config_rx,
        metrics,
        owner: replica_id(&cfg),
        tallies: Default::default(),
    });
    let reloader = tokio::spawn(reload_on_hup(
        reloads,
        source,
        config_tx,
        telemetry.filter_handle(),
    ));
    Daemon {
        ctx,
        until_idle,
        shutdown: shutdown.clone(),
        readiness,
    }
    .run()
    .await?;
    shutdown.cancel();
    server_stop.cancel();
    reloader.abort();
    if let Some(server) = server {
        let _ = server.await;
    }
    pool.close().await;
    Ok(())
}

/// How the daemon waits for its database at start.
struct Waiting<'a> {
    until_idle: bool,
    readiness: &'a Readiness,
    shutdown: &'a CancellationToken,
}

impl Waiting<'_> {
    /// Opens the pool and checks the schema. A daemon (not `--until-idle`, which a script runs
    /// and wants an answer from) retries a database that is down or refuses it, and a schema
    /// not migrated yet or too new, with backoff up to 30 s: a sidecar started before its
    /// database, a migration Job still running, or a rollback waiting for the newer image must
    /// not crash-loop (and take the application's pod down with it). Meanwhile `/healthz` is
    /// 200 and `/readyz` 503. `None` when stopped while waiting.
    async fn connect(&self, cfg: &Config, names: &Names) -> Result<Option<Db>> {
        let mut delay = std::time::Duration::from_secs(1);
        loop {
            let opened = async {
                let pool = connect(cfg).await?;
                match schema::check(&pool, names).await {
                    Ok(()) => Ok(pool),
                    Err(e) => {
                        pool.close().await;
                        Err(Error::from(e))
                    }
                }
            };
            match opened.await {
                Ok(pool) => return Ok(Some(pool)),
                Err(e) if self.until_idle || e.is_configuration() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_s = delay.as_secs(), "database not usable yet; retrying (/readyz answers 503 meanwhile)");
                    self.readiness.alive();
                    self.readiness
                        .not_reached(format!("database not usable yet: {e}"));
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(std::time::Duration::from_secs(30));
                }
            }
        }
    }
}

/// The settings that differ between `old` and `new` but are fixed when the daemon starts: the
/// whole `[database]` section (pools, `pool_mode`, `direct_url`, start-up options),
/// `metrics.listen`, the log format, the replica's lease owner name and the trace export.
fn fixed_at_start(old: &Config, new: &Config) -> Vec<&'static str> {
    [
        ("database", old.database != new.database),
        ("metrics.listen", old.metrics.listen != new.metrics.listen),
        ("log.format", old.log.format != new.log.format),
        (
            "worker.replica_id",
            old.worker.replica_id != new.worker.replica_id,
        ),
        (
            "telemetry",
            old.telemetry.otlp_endpoint != new.telemetry.otlp_endpoint
                || old.telemetry.service_name != new.telemetry.service_name,
        ),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

/// Settings that a reload applies to batches (and to jobs claimed from now on) but that every
/// connection also took as its session default when it opened: statements outside batches
/// (plans, verification, heartbeats) keep the old values until a restart.
fn half_applied(old: &Config, new: &Config) -> Vec<&'static str> {
    [
        (
            "batch.lock_timeout",
            old.batch.lock_timeout != new.batch.lock_timeout,
        ),
        (
            "batch.statement_timeout",
            old.batch.statement_timeout != new.batch.statement_timeout,
        ),
        (
            "worker.lease_ttl",
            old.worker.lease_ttl != new.worker.lease_ttl,
        ),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

/// Settings a running attempt reads once, when it starts: the lease it renews, and the ceiling
/// and allowlist checked in its preparation. Batch sizes, targets, timeouts and pauses and the
/// health signals follow the live configuration from the next batch.
fn next_attempt(old: &Config, new: &Config) -> Vec<&'static str> {
    [
        (
            "worker.lease_ttl",
            old.worker.lease_ttl != new.worker.lease_ttl,
        ),
        ("safety", old.safety != new.safety),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

/// On SIGHUP: reload and validate; apply what can change at run time, keep the rest.
async fn reload_on_hup(
    mut reloads: tokio::sync::mpsc::Receiver<()>,
    source: Source,
    config: watch::Sender<Arc<Config>>,
    set_level: impl Fn(&str),
) {
    while reloads.recv().await.is_some() {
        let new = match source.load() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: configuration rejected; keeping the current one");
                continue;
            }
        };
        let old = config.borrow().clone();
        let fixed = fixed_at_start(&old, &new);
        if !fixed.is_empty() {
            tracing::warn!(
                settings = ?fixed,
                "SIGHUP: these settings changed but take effect only at a restart (connections, \
                 the metrics listener, the log and trace output and the lease owner keep them); \
                 other changes apply now"
            );
        }
        let later = next_attempt(&old, &new);
        if !later.is_empty() {
            tracing::warn!(
                settings = ?later,
                "SIGHUP: these settings apply to each job from its next attempt (claimed, \
                 resumed or retried from now on); running attempts keep those they started with"
            );
        }
        let half = half_applied(&old, &new);
        if !half.is_empty() {
            tracing::warn!(
                settings = ?half,
                "SIGHUP: statements outside batches (plans, verification, heartbeats) keep the \
                 old values of these settings as session defaults until a restart"
            );
        }
        set_level(&new.log.level);
        config.send_replace(Arc::new(new));
        tracing::info!("SIGHUP: configuration reloaded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_the_settings_that_wait_for_a_restart() {
        let old = Config::default();
        let mut new = old.clone();
        new.batch.sleep_ms = old.batch.sleep_ms + 1;
        assert!(
            fixed_at_start(&old, &new).is_empty(),
            "batch settings apply now"
        );
        new.database.direct_url = "postgres://elsewhere/db".into();
        new.metrics.listen = "127.0.0.1:1".into();
        assert_eq!(fixed_at_start(&old, &new), ["database", "metrics.listen"]);
        new.log.format = crate::config::LogFormat::Json;
        new.worker.replica_id = "r1".into();
        new.telemetry.otlp_endpoint = "http://127.0.0.1:4317".into();
        assert_eq!(
            fixed_at_start(&old, &new),
            [
                "database",
                "metrics.listen",
                "log.format",
                "worker.replica_id",
                "telemetry"
            ]
        );
        assert!(half_applied(&old, &new).is_empty());
        new.worker.lease_ttl *= 2;
        assert_eq!(half_applied(&old, &new), ["worker.lease_ttl"]);
    }

    #[test]
    fn a_reload_names_the_settings_running_attempts_keep() {
        let old = Config::default();
        let mut new = old.clone();
        new.batch.sleep_ms = old.batch.sleep_ms + 1;
        new.batch.max_size = old.batch.max_size / 2;
        new.batch.target_batch_ms = old.batch.target_batch_ms * 2;
        new.batch.lock_timeout *= 2;
        new.throttle.max_replica_lag *= 2;
        assert!(
            next_attempt(&old, &new).is_empty(),
            "batches and pauses follow the live configuration"
        );
        new.safety.max_affected = 30_000;
        new.worker.lease_ttl *= 2;
        assert_eq!(next_attempt(&old, &new), ["worker.lease_ttl", "safety"]);
    }
}
