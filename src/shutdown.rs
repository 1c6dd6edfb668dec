//! Shutdown in stages: stop accepting, let connected chargers finish for a grace period, then
//! close them with 1001 and wait (bounded) for their tasks.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The stages of shutdown each part of the daemon listens to.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Fired first: stop accepting chargers.
    pub stop_accepting: CancellationToken,
    /// Fired after the grace period: close every relayed connection with 1001.
    pub close_connections: CancellationToken,
}

/// Waits for SIGTERM or SIGINT.
pub async fn signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Runs the shutdown stages; returns how many connection tasks were still running at the end.
pub async fn drain(shutdown: &Shutdown, tasks: &TaskTracker, grace: Duration) -> usize {
    shutdown.stop_accepting.cancel();
    tasks.close();
    // Chargers keep being relayed during the grace period; an idle fleet ends it early.
    let _ = tokio::time::timeout(grace, tasks.wait()).await;
    shutdown.close_connections.cancel();
    // Closing is bounded per connection (the close handshake times out), so this is too.
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    tasks.len()
}
