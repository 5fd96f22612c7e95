//! Signals: SIGTERM and SIGINT cancel the shutdown token (stop claiming, finish the current batch,
//! hand back leases); SIGHUP asks for a configuration reload.

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Spawns the signal task. Returns the receiver of reload requests.
pub fn install(shutdown: CancellationToken) -> std::io::Result<mpsc::Receiver<()>> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (reload_tx, reload_rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            match signal {
                SIGHUP => {
                    // A reload already queued covers this one too.
                    let _ = reload_tx.try_send(());
                }
                _ if shutdown.is_cancelled() => {
                    tracing::warn!(signal, "second stop signal; exiting now");
                    std::process::exit(130);
                }
                _ => {
                    tracing::info!(
                        signal,
                        "stop requested: finishing current batches, releasing leases"
                    );
                    shutdown.cancel();
                }
            }
        }
    });
    Ok(reload_rx)
}
