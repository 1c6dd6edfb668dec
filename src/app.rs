//! Wires the stages together and owns startup and the shutdown order.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::proxy::Proxy;
use crate::shutdown::{self, Shutdown};
use crate::telemetry::{self, Readiness};

/// Flags of `run` that are not configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Print derived events on stdout instead of sending them (shadow mode).
    pub dry_run: bool,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs the daemon until SIGTERM or SIGINT, then shuts down in order.
pub async fn run(
    config: Config,
    _options: RunOptions,
    metrics: PrometheusHandle,
) -> Result<(), AppError> {
    let proxy_listener = bind("proxy.listen", config.proxy.listen).await?;
    let admin_listener = bind("admin.listen", config.admin.listen).await?;
    let readiness = Readiness::default();
    let shutdown = Shutdown::default();
    let connections = TaskTracker::new();

    let admin = tokio::spawn(telemetry::serve_admin(
        admin_listener,
        metrics,
        readiness.clone(),
        shutdown.close_connections.clone(),
    ));
    let proxy = Proxy::new(config.proxy.clone());
    let accepting =
        tokio::spawn(proxy.serve(proxy_listener, shutdown.clone(), connections.clone()));
    tracing::info!(
        proxy_listen = %config.proxy.listen,
        upstream_url = %config.proxy.upstream_url,
        admin_listen = %config.admin.listen,
        "relay listening"
    );

    let signal = shutdown::signal().await.map_err(AppError::Signals)?;
    tracing::info!(signal, grace = ?config.proxy.shutdown_grace, "shutting down: no new chargers; connected ones are closed after the grace period");
    let left = shutdown::drain(&shutdown, &connections, config.proxy.shutdown_grace).await;
    let _ = accepting.await;
    let _ = admin.await;
    if left > 0 {
        tracing::warn!(
            connections = left,
            "connections still open at exit were dropped"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { what, addr, source })
}
