//! Logs (JSON lines on stderr, fields at the top level), the metrics registry, and the admin
//! HTTP listener serving `/metrics`, `/healthz` and `/readyz`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{AdminConfig, LogFormat};

/// Changes the log filter of the running daemon (SIGHUP).
#[derive(Clone)]
pub struct LogLevel(reload::Handle<EnvFilter, Registry>);

impl LogLevel {
    /// Applies a `RUST_LOG`-style filter.
    pub fn set(&self, level: &str) -> Result<(), String> {
        let filter = parse_filter(level)?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

fn parse_filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::builder()
        .parse(level)
        .map_err(|e| format!("invalid log filter {level:?}: {e}"))
}

/// Installs the global tracing subscriber writing to stderr (stdout is for command output).
pub fn init_logging(format: LogFormat, level: &str) -> Result<LogLevel, String> {
    let (filter, handle) = reload::Layer::new(parse_filter(level)?);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => {
            let mut layer = json_subscriber::JsonLayer::stderr();
            layer.with_timer("timestamp", tracing_subscriber::fmt::time::SystemTime);
            layer.with_level("level");
            layer.with_target("target");
            // Event fields and the fields of every enclosing span (charge_box_id) at the top
            // level, so `jq 'select(.charge_box_id=="CP1")'` works on any line.
            layer.with_flattened_event();
            layer.with_top_level_flattened_span_list();
            registry.with(layer).try_init()
        }
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok(LogLevel(handle))
}

/// Installs the global metrics recorder; the handle renders `/metrics`.
pub fn init_metrics() -> Result<PrometheusHandle, String> {
    // Real Prometheus histograms (not client-side summaries) so latencies aggregate across
    // scrapes and instances; the buckets span a loopback commit (sub-ms) to a slow Lago (30 s).
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0,
        ])
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    metrics::gauge!("ocpp_lago_bridge_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// Named reasons the daemon is not ready; empty means ready. Also the tasks that failed
/// (`supervise`): they make `/healthz` fail as well.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    problems: Arc<Mutex<BTreeMap<&'static str, String>>>,
    failed: Arc<Mutex<BTreeMap<&'static str, String>>>,
}

impl Readiness {
    /// Records that `check` fails for `reason`.
    pub fn set_problem(&self, check: &'static str, reason: impl Into<String>) {
        self.lock().insert(check, reason.into());
    }

    /// Records that `check` passes again.
    pub fn clear_problem(&self, check: &'static str) {
        self.lock().remove(check);
    }

    /// The failing checks and why, as sent in the `/readyz` body.
    pub fn problems(&self) -> BTreeMap<&'static str, String> {
        self.lock().clone()
    }

    /// Records that the long-lived task `task` failed: `/healthz` and `/readyz` name it until
    /// the process exits (nothing clears it).
    pub fn set_failed(&self, task: &'static str, reason: impl Into<String>) {
        let reason = reason.into();
        crate::lock(&self.failed).insert(task, reason.clone());
        self.set_problem(
            task,
            format!("task failed ({reason}): the process exits for a restart"),
        );
    }

    /// The failed tasks and what happened, as sent in the `/healthz` body.
    pub fn failures(&self) -> BTreeMap<&'static str, String> {
        crate::lock(&self.failed).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        crate::lock(&self.problems)
    }
}

/// Serves the admin endpoints until `shutdown` fires. A client gets `config.header_timeout` to
/// send each request head (idle keep-alive connections are closed after it too), and at most
/// `config.max_connections` are open at once: half-sent requests can neither pile up nor take
/// the file descriptors chargers need.
pub async fn serve_admin(
    listener: TcpListener,
    metrics: PrometheusHandle,
    readiness: Readiness,
    config: AdminConfig,
    shutdown: CancellationToken,
) {
    let open = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let mut refusals = Throttle::per_second();
    let mut accept_errors = Throttle::per_second();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if let Some(suppressed) = accept_errors.ready() {
                        tracing::warn!(%error, suppressed, "admin listener accept failed");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            // Best effort and never waiting: a client that does not read its 503 loses it.
            let _ = stream.try_write(ADMIN_BUSY);
            metrics::counter!("ocpp_lago_bridge_admin_connections_refused_total").increment(1);
            if let Some(suppressed) = refusals.ready() {
                tracing::warn!(
                    max_connections = config.max_connections,
                    suppressed,
                    "admin connection refused: admin.max_connections are open"
                );
            }
            continue;
        };
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        let header_timeout = config.header_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request| {
                let response = admin_response(&request, &metrics, &readiness);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The answer to an admin connection over `admin.max_connections`.
const ADMIN_BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 32\r\nConnection: close\r\n\r\ntoo many admin connections open\n";

/// Lets a repeated log line through at most once per period, counting the ones held back.
#[derive(Debug)]
pub struct Throttle {
    period: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl Throttle {
    /// At most one line a second.
    pub fn per_second() -> Self {
        Throttle {
            period: std::time::Duration::from_secs(1),
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub fn ready(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.period => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

fn admin_response(
    request: &Request<Incoming>,
    metrics: &PrometheusHandle,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/healthz" => {
            let failed = readiness.failures();
            if failed.is_empty() {
                (
                    StatusCode::OK,
                    "application/json",
                    r#"{"status":"ok"}"#.into(),
                )
            } else {
                let body = serde_json::json!({ "status": "failed", "failed": failed });
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    body.to_string(),
                )
            }
        }
        "/readyz" => {
            let problems = readiness.problems();
            let ready = problems.is_empty();
            let body = serde_json::json!({ "ready": ready, "not_ready": problems }).to_string();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "application/json", body)
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
