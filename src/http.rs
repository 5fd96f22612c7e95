//! `/metrics`, `/healthz` and `/readyz` on `metrics.listen`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::Readiness;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    readiness: Arc<Readiness>,
    /// The current configuration (a reload may change `worker.poll_interval`).
    config: watch::Receiver<Arc<Config>>,
}

impl AppState {
    fn poll_interval(&self) -> Duration {
        self.config.borrow().worker.poll_interval
    }
}

/// Binds now (so a bad address fails start-up) and serves until `shutdown`.
pub async fn serve(
    listen: &str,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    config: watch::Receiver<Arc<Config>>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Listen {
            addr: listen.to_owned(),
            source,
        })?;
    tracing::info!(addr = %listen, "serving /metrics, /healthz, /readyz");
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            metrics,
            readiness,
            config,
        });
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics server failed");
        }
    }))
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

/// Alive while the daemon loop keeps ticking.
async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let window = (s.poll_interval() * 10).max(Duration::from_secs(60));
    if s.readiness.is_alive(window) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "daemon loop stalled\n")
    }
}

/// Ready while the loop reaches the database.
async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let window = (s.poll_interval() * 3).max(Duration::from_secs(10));
    if s.readiness.is_ready(window) {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", s.readiness.why_not()),
        )
    }
}
