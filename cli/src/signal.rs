//! Stopping on Ctrl-C or SIGTERM.

use tokio_util::sync::CancellationToken;

/// Resolves on Ctrl-C or, on Unix, SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A token cancelled on Ctrl-C or SIGTERM.
pub fn stop_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: closing streams and finishing writes");
        trigger.cancel();
    });
    shutdown
}

/// How a role stops: first `draining` (its `/readyz` answers 503 while it
/// still serves), then `stop` (streams end with UNAVAILABLE, telling
/// clients to reconnect elsewhere, and in-flight writes finish).
#[derive(Debug, Clone)]
pub struct Drain {
    /// Cancelled on the first Ctrl-C or SIGTERM.
    pub draining: CancellationToken,
    /// Cancelled `delay` later, or on a second signal.
    pub stop: CancellationToken,
}

/// A [`Drain`] driven by Ctrl-C and SIGTERM, with `delay` between its two
/// steps.
pub fn drain_on_signal(delay: std::time::Duration) -> Drain {
    let drain = Drain {
        draining: CancellationToken::new(),
        stop: CancellationToken::new(),
    };
    let steps = drain.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(delay = ?delay, "draining: unready now, stopping after the delay (a second signal stops at once)");
        steps.draining.cancel();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = wait_for_signal() => {}
        }
        tracing::info!("stopping: closing streams and finishing writes");
        steps.stop.cancel();
    });
    drain
}
