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

use crate::billing::writer::{self, Command, WriterSettings};
use crate::config::{BaseUrl, Config};
use crate::lago::LagoClient;
use crate::proxy::Proxy;
use crate::proxy::tap::Billing;
use crate::secrets::{LagoClientError, LagoTimeouts, steve_auth};
use crate::shipper::{self, Destination, ShipperSettings, SpoolAccess};
use crate::shutdown::{self, Shutdown};
use crate::spool::{SpoolHandle, open_read_only, open_store};
use crate::supervise::{Supervisor, TaskFailure};
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
    Tls(#[from] crate::tls::TlsError),
    #[error("task {} {}: exiting so that the service manager restarts the bridge", .0.task, .0.reason)]
    TaskFailed(TaskFailure),
}

/// After a task failed, how long the admin listener goes on answering (503, naming it) before
/// the process exits: long enough for a probe to see why, short enough for a prompt restart.
const FAILURE_LINGER: Duration = Duration::from_secs(1);
/// After a task failed, how long closing the chargers (1001) and committing what the writer
/// holds may take before the process exits anyway.
const FAILURE_EXIT_LIMIT: Duration = Duration::from_secs(3);

/// Runs the daemon until SIGTERM or SIGINT, then shuts down in order.
pub async fn run(
    config: Config,
    options: RunOptions,
    metrics: PrometheusHandle,
    log_level: LogLevel,
) -> Result<(), AppError> {
    // Only when the limit is below what `max_connections` needs: a warning on every start,
    // whatever the fleet, teaches operators to ignore warnings.
    if let Some(warning) = crate::check::fd_limit_warning(config.proxy.max_connections) {
        tracing::warn!(%warning, "check the service limits");
    }
    // The cap as a series, so that "spool near its disk cap" is one alert expression.
    metrics::gauge!("ocpp_lago_bridge_spool_disk_cap_bytes")
        .set(config.spool.disk_cap_bytes as f64);
    let proxy_listener = bind("proxy.listen", config.proxy.listen).await?;
    let admin_listener = bind("admin.listen", config.admin.listen).await?;
    let readiness = Readiness::default();
    let supervisor = Supervisor::new(readiness.clone());
    let shutdown = Shutdown::default();
    let connections = TaskTracker::new();

    // The admin listener outlives the chargers' connections: after a task failed it goes on
    // saying so until the process exits.
    let stop_admin = CancellationToken::new();
    let admin = tokio::spawn(supervisor.watch(
        "admin_listener",
        telemetry::serve_admin(
            admin_listener,
            metrics,
            readiness.clone(),
            config.admin.clone(),
            stop_admin.clone(),
        ),
    ));

    // A dry run bills into its own spool beside the live one: shadow events must never reach
    // Lago, and a restarted shadow bridge must still know its open sessions (a throw-away
    // spool turned their Stops into missing_start) and what it already printed.
    let spool_path = if options.dry_run {
        config.spool.dry_run_path()
    } else {
        config.spool.path.clone()
    };
    let heartbeat = Arc::new(AtomicI64::new(crate::clock::unix_now()));
    let pipeline = start_pipeline(
        &config,
        &spool_path,
        &options,
        &readiness,
        &heartbeat,
        &supervisor,
    )
    .await;
    let billing = pipeline.as_ref().map(|p| Billing {
        spool: p.spool.clone(),
        hold_timeout: config.spool.hold_timeout,
    });

    let proxy = Proxy::new(config.proxy.clone(), billing).map_err(AppError::Tls)?;
    let accepting = tokio::spawn(supervisor.watch(
        "proxy_accept",
        Arc::clone(&proxy).serve(proxy_listener, shutdown.clone(), connections.clone()),
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
            failure = supervisor.failed() => {
                probe.abort();
                let wind_down = (&shutdown, &connections, proxy, pipeline);
                return Err(exit_on_failure(failure, &supervisor, wind_down, &spool_path, &stop_admin).await);
            }
            _ = hangup.recv() => {
                systemd::reloading(false);
                proxy.reload();
                reload(&options, &log_level, pipeline.as_ref()).await;
                systemd::reloading(true);
            }
            _ = report.tick() => {
                let writer_alive = pipeline.is_none()
                    || crate::clock::unix_now() - heartbeat.load(Ordering::Relaxed) <= WRITER_STALL_SECS;
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
    supervisor.stopping();
    probe.abort();
    tracing::info!(signal, grace = %humantime::format_duration(config.proxy.shutdown_grace), "shutting down: no new chargers; connected ones are closed after the grace period");
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
    stop_admin.cancel();
    let _ = admin.await;
    // A task that panicked during the shutdown still makes it a failure.
    if let Some(failure) = supervisor.failure() {
        return Err(AppError::TaskFailed(failure));
    }
    tracing::info!("stopped");
    Ok(())
}

/// A supervised task failed: stop accepting, close the chargers with 1001 (they reconnect to
/// the restarted bridge), let the writer commit what it holds, all bounded, while `/healthz`
/// names the task for at least [`FAILURE_LINGER`]; then the error that makes the exit non-zero.
async fn exit_on_failure(
    failure: TaskFailure,
    supervisor: &Supervisor,
    (shutdown, connections, proxy, pipeline): (
        &Shutdown,
        &TaskTracker,
        Arc<Proxy>,
        Option<Pipeline>,
    ),
    spool_path: &Path,
    stop_admin: &CancellationToken,
) -> AppError {
    supervisor.stopping();
    systemd::status(&format!(
        "FAILED: task {} {}; exiting for a restart",
        failure.task, failure.reason
    ));
    let linger = tokio::time::sleep(FAILURE_LINGER);
    let wind_down = async {
        shutdown.stop_accepting.cancel();
        shutdown.close_connections.cancel();
        connections.close();
        connections.wait().await;
        drop(proxy);
        if let Some(pipeline) = pipeline {
            pipeline.stop(spool_path, Duration::ZERO).await;
        }
    };
    let (_, wound_down) = tokio::join!(linger, tokio::time::timeout(FAILURE_EXIT_LIMIT, wind_down));
    if wound_down.is_err() {
        tracing::error!(
            limit = %humantime::format_duration(FAILURE_EXIT_LIMIT),
            "exiting without a full wind-down after a task failed; chargers resend what was not acknowledged"
        );
    }
    stop_admin.cancel();
    AppError::TaskFailed(failure)
}

/// The billing half of the daemon: spool writer and shipper.
struct Pipeline {
    spool: SpoolHandle,
    /// Rules reloaded on SIGHUP go to the writer here.
    control: tokio::sync::mpsc::Sender<Command>,
    /// Fires when the writer thread has committed what it held and ended.
    writer: tokio::sync::oneshot::Receiver<()>,
    shipper: Option<tokio::task::JoinHandle<()>>,
    /// Asks SteVe for the start of parked Stops (`[steve]` configured); ends after the writer.
    recovery: Option<tokio::task::JoinHandle<()>>,
    draining: CancellationToken,
    stop_shipping: CancellationToken,
}

impl Pipeline {
    /// Gives the shipper up to `flush` to empty the outbox, then stops it and the writer.
    async fn stop(self, spool_path: &Path, flush: Duration) {
        self.draining.cancel();
        // One read connection for the whole shutdown, not one per look.
        let reader = open_read_only(spool_path).await.ok();
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
        // The writer has ended: an answer could no longer be applied, and the parked Stops are
        // on disk to be asked again after the restart. Lookups may be sleeping in their backoff.
        if let Some(recovery) = self.recovery {
            recovery.abort();
            let _ = recovery.await;
        }
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
            tracing::error!(problems = %errors.problems.join("; "), "SIGHUP: the config is invalid; nothing was reloaded");
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
            let _ = pipeline.control.send(Command::Rules(Arc::new(rules))).await;
            tracing::info!(subscription_map_entries = mapped, log_level = %config.log.level, "SIGHUP: subscription map and log level reloaded");
        }
        Err(problems) => {
            tracing::error!(problems = %problems.join("; "), "SIGHUP: subscription map invalid; the previous one stays");
        }
    }
}

/// Keeps the `upstream` readiness check current: SteVe accepting TCP connections.
async fn probe_upstream(upstream_url: BaseUrl, readiness: Readiness, stop: CancellationToken) {
    const CHECK: &str = "upstream";
    let Some(address) = upstream_url.host_port() else {
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

/// The overflow directory of `spool.overflow_dir` (see [`crate::spool::overflow`]); a dry run
/// keeps its own below it, as it keeps its own spool.
fn overflow_dir(config: &Config, options: &RunOptions) -> Arc<crate::spool::overflow::Overflow> {
    let runtime_directory = std::env::var("RUNTIME_DIRECTORY").ok();
    let (mut dir, beside_spool) = config.spool.overflow_dir(runtime_directory.as_deref());
    if options.dry_run {
        dir = dir.join("dry-run");
    }
    if beside_spool {
        tracing::warn!(overflow_dir = %dir.display(), "spool.overflow_dir is unset and systemd set no RUNTIME_DIRECTORY: records the spool cannot commit go beside it, on the disk that may be the full one; set spool.overflow_dir to another filesystem");
    } else {
        tracing::info!(overflow_dir = %dir.display(), "records the spool cannot commit go to spool.overflow_dir");
    }
    Arc::new(crate::spool::overflow::Overflow::new(dir))
}

/// Opens the spool and starts the writer and the shipper. Without a usable spool the bridge
/// runs relay-only and not ready: charging must go on.
async fn start_pipeline(
    config: &Config,
    spool_path: &Path,
    options: &RunOptions,
    readiness: &Readiness,
    heartbeat: &Arc<AtomicI64>,
    supervisor: &Supervisor,
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
            tracing::error!(problems = %problems.join("; "), "billing rules unusable: relaying WITHOUT billing");
            readiness.set_problem(writer::READY_CHECK, problems.join("; "));
            return None;
        }
    };
    let events_committed = Arc::new(Notify::new());
    let steve = steve_client(config);
    let overflow = overflow_dir(config, options);
    let (recovery_handle, recovery_requests) = crate::start_lookup::channel();
    let settings = WriterSettings {
        max_backlog: config.spool.max_memory_records,
        retention: config.spool.retention,
        disk_cap_bytes: config.spool.disk_cap_bytes,
        path: spool_path.to_path_buf(),
        recovery: steve.is_some().then(|| recovery_handle.clone()),
        overflow: Some(overflow.clone()),
    };
    drop(recovery_handle);
    let (inputs, writer_future) = match writer::start(
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
    // The recovery task answers through a weak sender, so it never keeps the writer alive.
    // One rate limit for every SteVe REST request of the daemon: start recovery's and the
    // periodic reconcile's (issue 14 item 3: two limiters let SteVe see twice the rate).
    let steve_limiter = crate::steve::rate_limiter(config.steve.max_requests_per_second);
    let recovery = steve.map(|client| {
        tokio::spawn(supervisor.watch(
            "steve_recovery",
            crate::recovery::run(
                client,
                crate::recovery::RecoverySettings {
                    max_concurrent_requests: config.steve.max_concurrent_requests,
                    recovery_timeout: config.steve.recovery_timeout,
                },
                steve_limiter.clone(),
                recovery_requests,
                inputs.control.downgrade(),
            ),
        ))
    });
    let spool = SpoolHandle::new(inputs.intake, Some(overflow));
    let control = inputs.control;
    let outbox = inputs.outbox;
    let writer = writer::spawn_writer(supervisor.watch("spool_writer", writer_future));

    let destination = if options.dry_run {
        Some(Destination::Stdout)
    } else {
        lago_client(config, readiness).map(Destination::Lago)
    };
    let draining = CancellationToken::new();
    let stop_shipping = CancellationToken::new();
    // One rate limit for every Lago request of the daemon: the shipper's and the audit's.
    let lago_limiter = crate::lago::rate_limiter(config.lago.max_requests_per_second);
    if let (Some(interval), false) = (config.reconcile.interval, options.dry_run) {
        tracing::info!(
            interval = %humantime::format_duration(interval),
            lookback = %humantime::format_duration(config.reconcile.lookback),
            backfill = config.reconcile.backfill,
            "reconcile: the bill is audited against SteVe and Lago periodically"
        );
        tokio::spawn(supervisor.watch(
            "reconcile",
            crate::reconcile::run::periodic(
                config.clone(),
                interval,
                lago_limiter.clone(),
                steve_limiter.clone(),
                stop_shipping.clone(),
            ),
        ));
    }
    let shipper = destination.map(|destination| {
        let access = SpoolAccess {
            path: spool_path.to_path_buf(),
            outbox,
            events_committed,
        };
        let settings = ShipperSettings {
            metric_code: config.lago.metric_code.clone(),
            batch_max_events: config.lago.batch_max_events,
            batch_linger: config.lago.batch_linger,
            max_requests_per_second: config.lago.max_requests_per_second,
            retry_max_delay: config.lago.retry_max_delay,
            max_pending_age: config.lago.max_pending_age,
            shared_limiter: Some(lago_limiter.clone()),
            supervisor: supervisor.clone(),
        };
        tokio::spawn(supervisor.watch(
            "shipper",
            shipper::run(
                destination,
                access,
                settings,
                readiness.clone(),
                draining.clone(),
                stop_shipping.clone(),
            ),
        ))
    });
    Some(Pipeline {
        spool,
        control,
        writer,
        shipper,
        recovery,
        draining,
        stop_shipping,
    })
}

fn lago_client(config: &Config, readiness: &Readiness) -> Option<LagoClient> {
    match crate::secrets::lago_client(&config.lago, LagoTimeouts::Daemon) {
        Ok(client) => Some(client),
        Err(LagoClientError::ApiKey(problem)) => {
            tracing::error!(%problem, "no Lago API key: events are kept in the spool and not sent");
            readiness.set_problem(READY_API_KEY, problem);
            None
        }
        Err(LagoClientError::Client(error)) => {
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

/// SteVe's REST client, when `[steve] api_url` is set and its credentials can be read.
fn steve_client(config: &Config) -> Option<crate::steve::SteveClient> {
    let api_url = config.steve.api_url.as_ref()?;
    let client = steve_auth(&config.steve).and_then(|auth| {
        tracing::info!(
            api_url = api_url.as_str(),
            auth = auth.kind(),
            "SteVe REST API configured: Stops without a known start are looked up there"
        );
        crate::steve::SteveClient::new(api_url.url(), auth, config.steve.request_timeout)
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

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { what, addr, source })
}
