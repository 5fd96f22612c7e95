//! Wake-ups for the daemon: `LISTEN` on the job channel (the `jobs_notify` triggers), so a new
//! job, an operator request or a job handed back is picked up in milliseconds instead of at the
//! next poll. Any loss of the connection (server restart, terminated backend, network) is
//! reported at once, because notifications sent meanwhile are lost and the caller must look at
//! the table, and the connection is re-established with backoff (100 ms doubling to 2 s), for
//! as long as the daemon runs. `backfilld_listen_connected` says whether it is up.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::time::Instant;

use crate::db::Db;
use crate::metrics::Metrics;

pub const CHANNEL: &str = "backfilld_jobs";
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// Why `Wakeups::next` returned: in every case, look at the job table now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Notified,
    /// The connection was lost; notifications may have been missed.
    Lost,
    /// The connection is back after a loss.
    Reconnected,
}

pub struct Wakeups {
    db: Db,
    metrics: Metrics,
    listener: Option<PgListener>,
    /// When to try connecting again, and the delay after that one fails.
    retry: Option<(Instant, Duration)>,
    /// A loss was logged and not yet followed by a reconnect (one warning per outage).
    down: bool,
}

impl Wakeups {
    /// Connects (or schedules the first retry). Through a transaction pooler without
    /// `database.direct_url` there is nothing to listen on: the daemon only polls.
    pub async fn start(db: Db, metrics: Metrics) -> Self {
        let mut w = Self {
            db,
            metrics,
            listener: None,
            retry: None,
            down: false,
        };
        if !w.connect(FIRST_RETRY).await && w.retry.is_none() {
            tracing::info!(
                "no LISTEN through a transaction pooler (set database.direct_url to get it): \
                 new jobs are picked up at the next poll"
            );
        }
        w
    }

    /// The next reason to look at the job table; never resolves while there is no listener and
    /// no retry due. Cancel-safe at every await.
    pub async fn next(&mut self) -> Wake {
        loop {
            if let Some(listener) = &mut self.listener {
                let received = listener.try_recv().await;
                match received {
                    Ok(Some(_)) => return Wake::Notified,
                    Ok(None) => self.lost("connection closed".into()),
                    Err(e) => self.lost(e.to_string()),
                }
                return Wake::Lost;
            }
            let Some((at, delay)) = self.retry else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until(at).await;
            if self.connect(delay).await {
                self.metrics.listen_reconnects.inc();
                tracing::info!("LISTEN connection re-established");
                return Wake::Reconnected;
            }
        }
    }

    fn lost(&mut self, error: String) {
        self.listener = None;
        self.metrics.listen_connected.set(0);
        tracing::warn!(error = %error, "LISTEN connection lost; reconnecting (polling meanwhile)");
        self.down = true;
        self.retry = Some((Instant::now(), FIRST_RETRY));
    }

    /// One attempt; on failure the next one is due after `delay`, and the one after that after
    /// twice as long.
    async fn connect(&mut self, delay: Duration) -> bool {
        let attempt = async {
            let Some(mut listener) = self.db.listener().await? else {
                return Ok(None);
            };
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(Some(listener))
        };
        match attempt.await {
            Ok(Some(listener)) => {
                self.listener = Some(listener);
                self.retry = None;
                self.down = false;
                self.metrics.listen_connected.set(1);
                true
            }
            Ok(None) => {
                self.retry = None;
                false
            }
            Err(e) => {
                if !self.down {
                    tracing::warn!(error = %e, "cannot LISTEN; retrying with backoff (polling meanwhile)");
                    self.down = true;
                }
                self.retry = Some((Instant::now() + delay, (delay * 2).min(MAX_RETRY)));
                false
            }
        }
    }
}
