//! Wires the stages together and owns startup and the shutdown order:
//! connections drain first (their last billing records reach the writer), then the shipper gets
//! a bounded chance to flush, then the writer commits what it still holds and stops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::lago::{ApiKey, LagoClient, LagoClientConfig};
use crate::proxy::Proxy;
use crate::proxy::tap::Billing;
use crate::shipper::{self, Destination, ShipperSettings, SpoolAccess};
use crate::shutdown::{self, Shutdown};
use crate::spool::SpoolHandle;
use crate::spool::store::Store;
use crate::spool::writer::{self, Command, WriterSettings};
use crate::systemd;
use crate::telemetry::{self, LogLevel, Readiness};

/// Readiness check for the API key.
const READY_API_KEY: &str = "lago_api_key";

/// Flags of `run` that are not configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Print derived events on stdout instead of sending them (shadow mode).
    pub dry_run: bool,
    /// The config file, re-read on SIGHUP (`None`: the default path, if present).
    pub config_path: Option<PathBuf>,
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
    #[error("TLS: {0}")]
    Tls(#[from] crate::proxy::tls::TlsError),
}

/// Runs the daemon until SIGTERM or SIGINT, then shuts down in order.
pub async fn run(
    config: Config,
    options: RunOptions,
    metrics: PrometheusHandle,
    log_level: LogLevel,
) -> Result<(), AppError> {
    for warning in crate::config::environment_warnings() {
        tracing::warn!(%warning, "check the service limits");
    }
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

    // A dry run bills into a throw-away spool: shadow events must never reach Lago later.
    let dry_run_dir = options.dry_run.then(tempdir_for_dry_run);
    let spool_path = match &dry_run_dir {
        Some(dir) => dir.join("spool.db"),
        None => config.spool.path.clone(),
    };
    let heartbeat = Arc::new(AtomicI64::new(writer::unix_now()));
    let pipeline = start_pipeline(&config, &spool_path, &options, &readiness, &heartbeat).await;
    let billing = pipeline.as_ref().map(|p| Billing {
        spool: p.spool.clone(),
        hold_timeout: config.spool.hold_timeout,
    });

    let proxy = Proxy::new(config.proxy.clone(), billing).map_err(AppError::Tls)?;
    let accepting = tokio::spawn(Arc::clone(&proxy).serve(
        proxy_listener,
        shutdown.clone(),
        connections.clone(),
    ));
    tracing::info!(
        proxy_listen = %config.proxy.listen,
        upstream_url = %config.proxy.upstream_url,
        admin_listen = %config.admin.listen,
        spool = %spool_path.display(),
        dry_run = options.dry_run,
        billing = pipeline.is_some(),
        "relay listening"
    );

    let probe = tokio::spawn(probe_upstream(
        config.proxy.upstream_url.clone(),
        readiness.clone(),
        shutdown.stop_accepting.clone(),
    ));
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(AppError::Signals)?;
    let stop_signal = shutdown::signal();
    tokio::pin!(stop_signal);
    let mut report = tokio::time::interval(systemd::report_every());
    systemd::ready();
    let signal = loop {
        tokio::select! {
            signal = &mut stop_signal => break signal.map_err(AppError::Signals)?,
            _ = hangup.recv() => {
                systemd::reloading(false);
                proxy.reload();
                reload(&options, &log_level, pipeline.as_ref()).await;
                systemd::reloading(true);
            }
            _ = report.tick() => {
                let writer_alive = pipeline.is_none()
                    || writer::unix_now() - heartbeat.load(Ordering::Relaxed) <= WRITER_STALL_SECS;
                let alive = writer_alive && !accepting.is_finished();
                if alive && systemd::watchdog_enabled() {
                    systemd::watchdog();
                } else if !alive {
                    tracing::error!(writer_alive, accepting = !accepting.is_finished(), "a core task is stuck: watchdog pings stopped");
                }
                systemd::status(&status_line(&connections, &readiness));
            }
        }
    };
    systemd::stopping();
    probe.abort();
    tracing::info!(signal, grace = ?config.proxy.shutdown_grace, "shutting down: no new chargers; connected ones are closed after the grace period");
    let left = shutdown::drain(&shutdown, &connections, config.proxy.shutdown_grace).await;
    let _ = accepting.await;
    // The proxy holds a handle to the spool writer: the writer ends once every handle is gone.
    drop(proxy);
    if left > 0 {
        tracing::warn!(
            connections = left,
            "connections still open at exit were dropped"
        );
    }
    if let Some(pipeline) = pipeline {
        pipeline
            .stop(&spool_path, config.lago.shutdown_flush_timeout)
            .await;
    }
    let _ = admin.await;
    if let Some(dir) = dry_run_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    tracing::info!("stopped");
    Ok(())
}

/// The billing half of the daemon: spool writer and shipper.
struct Pipeline {
    spool: SpoolHandle,
    /// Fires when the writer thread has committed what it held and ended.
    writer: tokio::sync::oneshot::Receiver<()>,
    shipper: Option<tokio::task::JoinHandle<()>>,
    draining: CancellationToken,
    stop_shipping: CancellationToken,
}

impl Pipeline {
    /// Gives the shipper up to `flush` to empty the outbox, then stops it and the writer.
    async fn stop(self, spool_path: &Path, flush: Duration) {
        self.draining.cancel();
        // One read connection for the whole shutdown, not one per look.
        let reader = open_store(spool_path).await.ok();
        let pending_events = || {
            reader
                .as_ref()
                .and_then(|store| store.backlog().ok())
                .map_or(0, |(pending, _)| pending)
        };
        if self.shipper.is_some() {
            let deadline = tokio::time::Instant::now() + flush;
            while tokio::time::Instant::now() < deadline && pending_events() > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.stop_shipping.cancel();
        if let Some(shipper) = self.shipper {
            let _ = shipper.await;
        }
        // The last handle: dropping it lets the writer commit what it holds and end.
        drop(self.spool);
        let _ = self.writer.await;
        let pending = pending_events();
        if pending > 0 {
            tracing::info!(
                pending,
                "undelivered events stay in the spool and are sent after restart"
            );
        }
    }
}

/// A writer loop that has not turned for this long is stuck (it turns every second).
const WRITER_STALL_SECS: i64 = 10;

fn status_line(connections: &TaskTracker, readiness: &Readiness) -> String {
    let problems = readiness.problems();
    let mut line = format!("{} charger connection(s)", connections.len());
    if problems.is_empty() {
        line.push_str(", ready");
    } else {
        let names: Vec<_> = problems.keys().copied().collect();
        line.push_str(&format!(", NOT READY: {}", names.join(", ")));
    }
    line
}

/// SIGHUP: re-reads the config file for the subscription map and the log level. Chargers stay
/// connected; a broken file changes nothing.
async fn reload(options: &RunOptions, log_level: &LogLevel, pipeline: Option<&Pipeline>) {
    let config = match Config::load(options.config_path.as_deref()) {
        Ok(config) => config,
        Err(errors) => {
            tracing::error!(problems = ?errors.problems, "SIGHUP: the config is invalid; nothing was reloaded");
            return;
        }
    };
    if let Err(error) = log_level.set(&config.log.level) {
        tracing::error!(%error, "SIGHUP: log level not changed");
    }
    let Some(pipeline) = pipeline else { return };
    match config.billing_rules() {
        Ok(rules) => {
            let mapped = rules.subscriptions.as_ref().map_or(0, |m| m.len());
            let _ = pipeline.spool.send(Command::Rules(Arc::new(rules))).await;
            tracing::info!(subscription_map_entries = mapped, log_level = %config.log.level, "SIGHUP: subscription map and log level reloaded");
        }
        Err(problems) => {
            tracing::error!(problems = ?problems, "SIGHUP: subscription map invalid; the previous one stays");
        }
    }
}

/// Keeps the `upstream` readiness check current: SteVe accepting TCP connections.
async fn probe_upstream(upstream_url: String, readiness: Readiness, stop: CancellationToken) {
    const CHECK: &str = "upstream";
    let Some(address) = upstream_address(&upstream_url) else {
        return;
    };
    loop {
        let connect = tokio::net::TcpStream::connect(address.as_str());
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(Ok(_)) => readiness.clear_problem(CHECK),
            Ok(Err(e)) => readiness.set_problem(
                CHECK,
                format!("SteVe at {address} refuses connections: {e}"),
            ),
            Err(_) => readiness.set_problem(CHECK, format!("SteVe at {address} does not answer")),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

fn upstream_address(upstream_url: &str) -> Option<String> {
    let uri: tokio_tungstenite::tungstenite::http::Uri = upstream_url.parse().ok()?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    Some(format!("{}:{port}", uri.host()?))
}

/// How long opening the spool may take before the bridge relays without it: a hung disk must
/// not keep chargers from SteVe.
const SPOOL_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the spool off the async threads, bounded in time.
pub async fn open_store(spool_path: &Path) -> Result<Store, String> {
    let path = spool_path.to_path_buf();
    let opening = tokio::task::spawn_blocking(move || Store::open(&path));
    match tokio::time::timeout(SPOOL_OPEN_TIMEOUT, opening).await {
        Ok(Ok(result)) => result.map_err(|e| e.to_string()),
        Ok(Err(join)) => Err(format!("opening the spool failed: {join}")),
        Err(_) => Err(format!(
            "opening the spool took longer than {SPOOL_OPEN_TIMEOUT:?}: is its disk hung?"
        )),
    }
}

/// Opens the spool and starts the writer and the shipper. Without a usable spool the bridge
/// runs relay-only and not ready: charging must go on.
async fn start_pipeline(
    config: &Config,
    spool_path: &Path,
    options: &RunOptions,
    readiness: &Readiness,
    heartbeat: &Arc<AtomicI64>,
) -> Option<Pipeline> {
    let store = match open_store(spool_path).await {
        Ok(store) => store,
        Err(error) => {
            tracing::error!(spool = %spool_path.display(), %error, "spool unusable: relaying WITHOUT billing; fix the spool and restart");
            readiness.set_problem(writer::READY_CHECK, format!("spool unusable: {error}"));
            return None;
        }
    };
    let rules = match config.billing_rules() {
        Ok(rules) => Arc::new(rules),
        Err(problems) => {
            // Validated at load; only a file changed since then can fail here.
            tracing::error!(problems = ?problems, "billing rules unusable: relaying WITHOUT billing");
            readiness.set_problem(writer::READY_CHECK, problems.join("; "));
            return None;
        }
    };
    let events_committed = Arc::new(Notify::new());
    let settings = WriterSettings {
        max_backlog: config.spool.max_memory_records,
        retention: config.spool.retention,
        disk_cap_bytes: config.spool.disk_cap_bytes,
        path: spool_path.to_path_buf(),
        steve: steve_client(config),
    };
    let (commands, writer_future) = match writer::start(
        store,
        rules,
        settings,
        readiness.clone(),
        events_committed.clone(),
        heartbeat.clone(),
    ) {
        Ok(started) => started,
        Err(error) => {
            tracing::error!(%error, "spool unreadable: relaying WITHOUT billing");
            readiness.set_problem(writer::READY_CHECK, format!("spool unreadable: {error}"));
            return None;
        }
    };
    let spool = SpoolHandle::new(commands);
    let writer = writer::spawn_writer(writer_future);

    let destination = if options.dry_run {
        Some(Destination::Stdout)
    } else {
        lago_client(config, readiness).map(Destination::Lago)
    };
    let draining = CancellationToken::new();
    let stop_shipping = CancellationToken::new();
    let shipper = destination.map(|destination| {
        let access = SpoolAccess {
            path: spool_path.to_path_buf(),
            writer: spool.clone(),
            events_committed,
        };
        let settings = ShipperSettings {
            metric_code: config.lago.metric_code.clone(),
            batch_max_events: config.lago.batch_max_events,
            batch_linger: config.lago.batch_linger,
            max_requests_per_second: config.lago.max_requests_per_second,
            retry_max_delay: config.lago.retry_max_delay,
            max_pending_age: config.lago.max_pending_age,
        };
        tokio::spawn(shipper::run(
            destination,
            access,
            settings,
            readiness.clone(),
            draining.clone(),
            stop_shipping.clone(),
        ))
    });
    Some(Pipeline {
        spool,
        writer,
        shipper,
        draining,
        stop_shipping,
    })
}

fn lago_client(config: &Config, readiness: &Readiness) -> Option<LagoClient> {
    let key = match read_api_key(config.lago.api_key_file.as_deref()) {
        Ok(key) => key,
        Err(problem) => {
            tracing::error!(%problem, "no Lago API key: events are kept in the spool and not sent");
            readiness.set_problem(READY_API_KEY, problem);
            return None;
        }
    };
    let client = LagoClient::new(LagoClientConfig {
        api_url: config.lago.api_url.clone(),
        api_key: key,
        connect_timeout: config.lago.request_timeout.min(Duration::from_secs(10)),
        request_timeout: config.lago.request_timeout,
    });
    match client {
        Ok(client) => Some(client),
        Err(error) => {
            tracing::error!(%error, "cannot build the Lago client: events are kept in the spool and not sent");
            let check = match error {
                crate::lago::LagoError::InvalidUrl { .. } => shipper::READY_LAGO,
                _ => READY_API_KEY,
            };
            readiness.set_problem(check, error.to_string());
            None
        }
    }
}

/// SteVe's REST client, when `[steve] api_url` is set and its key can be read.
fn steve_client(config: &Config) -> Option<crate::steve::SteveClient> {
    let api_url = config.steve.api_url.as_deref()?;
    let key = read_secret(
        "SteVe API key",
        config.steve.api_key_file.as_deref(),
        None,
        "STEVE_API_KEY",
        "set steve.api_key_file or STEVE_API_KEY",
    );
    let client = key.and_then(|key| {
        crate::steve::SteveClient::new(api_url, key, config.steve.request_timeout)
            .map_err(|e| e.to_string())
    });
    match client {
        Ok(client) => Some(client),
        Err(problem) => {
            tracing::error!(%problem, "[steve] is configured but unusable: sessions the bridge did not see start become missing_start dead letters");
            None
        }
    }
}

/// The Lago API key: `lago.api_key_file`, else the systemd credential `lago-api-key`, else the
/// environment variable `LAGO_API_KEY`. Errors never contain the key.
pub fn read_api_key(api_key_file: Option<&Path>) -> Result<ApiKey, String> {
    read_secret(
        "Lago API key",
        api_key_file,
        Some("lago-api-key"),
        "LAGO_API_KEY",
        "set lago.api_key_file, a systemd credential `lago-api-key` or LAGO_API_KEY",
    )
}

/// A secret from `file`, else the systemd credential `credential` (under
/// `$CREDENTIALS_DIRECTORY`), else the environment variable `var`; trimmed, never empty.
/// Errors name where it was looked for, never what it holds.
fn read_secret(
    what: &str,
    file: Option<&Path>,
    credential: Option<&str>,
    var: &str,
    how_to_set: &str,
) -> Result<ApiKey, String> {
    let credential = credential.and_then(|name| {
        std::env::var_os("CREDENTIALS_DIRECTORY").map(|dir| PathBuf::from(dir).join(name))
    });
    let file = file
        .map(Path::to_path_buf)
        .or(credential.filter(|p| p.exists()));
    let secret = match file {
        Some(path) => std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read the {what} file {}: {e}", path.display()))?,
        None => std::env::var(var).map_err(|_| format!("no {what}: {how_to_set}"))?,
    };
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    Ok(ApiKey::new(secret))
}

fn tempdir_for_dry_run() -> PathBuf {
    const PREFIX: &str = "ocpp-lago-bridge-dry-run-";
    // A killed dry run cannot clean up after itself: remove the spools of dead ones.
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix(PREFIX));
            if pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { what, addr, source })
}
