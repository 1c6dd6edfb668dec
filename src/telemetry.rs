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
            // level, so `jq 'select(.charge_box_id=="CP1")'` works on any line. One key per
            // object: an event field that an enclosing span also declares is written once, from
            // the span (json-subscriber's own flattening would write both).
            layer.with_top_level_flattened_span_list();
            layer.add_multiple_dynamic_fields(|event, context, writer| {
                let in_spans: Vec<&'static str> = context
                    .event_scope(event)
                    .map(|scope| {
                        scope
                            .flat_map(|span| span.fields().iter().map(|f| f.name()))
                            .collect()
                    })
                    .unwrap_or_default();
                let mut fields = JsonFields::default();
                event.record(&mut fields);
                for (name, value) in fields.0 {
                    if in_spans.contains(&name) {
                        continue;
                    }
                    // A field named like a key the layer writes itself keeps its value under
                    // another name instead of making a second `level` or `target`.
                    let key = if RESERVED_KEYS.contains(&name) {
                        format!("field_{name}")
                    } else {
                        name.to_string()
                    };
                    let _ = writer.write_field(&key, value);
                }
            });
            registry.with(layer).try_init()
        }
        LogFormat::Text => {
            use std::io::IsTerminal;
            use tracing_subscriber::field::MakeExt;
            // Colours only for a terminal: in a file or journald they are noise. Every value
            // has its control characters escaped, so a chargeBoxId holding `%0A` (a newline
            // once decoded) cannot forge a log line of its own.
            let fields = tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
                let text = escape_control(&format!("{value:?}"));
                if field.name() == "message" {
                    write!(writer, "{text}")
                } else {
                    write!(writer, "{}={text}", field.name())
                }
            })
            .delimited(" ");
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(std::io::stderr().is_terminal())
                        .fmt_fields(fields),
                )
                .try_init()
        }
    };
    result.map_err(|e| e.to_string())?;
    Ok(LogLevel(handle))
}

/// Keys the JSON layer writes itself.
const RESERVED_KEYS: [&str; 3] = ["timestamp", "level", "target"];

/// An event's fields as JSON values, in the order they were recorded.
#[derive(Default)]
struct JsonFields(Vec<(&'static str, serde_json::Value)>);

impl tracing::field::Visit for JsonFields {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.push((field.name(), serde_json::json!(value)));
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.push((field.name(), value.into()));
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.push((field.name(), value.into()));
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.push((field.name(), value.into()));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name(), value.into()));
    }
    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.0.push((field.name(), value.to_string().into()));
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name(), format!("{value:?}").into()));
    }
}

/// `text` with every control character (newline, carriage return, escape, ...) written as its
/// Rust escape (`\n`, `\r`, `\u{1b}`), so that one event stays one line.
pub fn escape_control(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Counters registered at zero when the daemon starts, with the labels of a series that really
/// occurs: a dashboard panel or an alert over a series that does not exist yet shows "no data"
/// instead of 0, and `increase()` misses the first event of a series born after the scrape.
const ZERO_COUNTERS: &[(&str, &[(&str, &str)])] = &[
    ("ocpp_lago_bridge_accept_errors_total", &[]),
    (
        "ocpp_lago_bridge_handshakes_total",
        &[("outcome", "accepted")],
    ),
    (
        "ocpp_lago_bridge_connections_closed_total",
        &[("reason", "charger_closed")],
    ),
    (
        "ocpp_lago_bridge_frames_relayed_total",
        &[("direction", "charger_to_upstream"), ("action", "pass")],
    ),
    (
        "ocpp_lago_bridge_frames_relayed_total",
        &[("direction", "upstream_to_charger"), ("action", "pass")],
    ),
    (
        "ocpp_lago_bridge_tap_frames_total",
        &[("direction", "charger_to_upstream"), ("outcome", "record")],
    ),
    (
        "ocpp_lago_bridge_bad_frames_total",
        &[
            ("direction", "charger_to_upstream"),
            ("reason", "not_an_array"),
        ],
    ),
    (
        "ocpp_lago_bridge_unbilled_total",
        &[("reason", "no_transaction_id")],
    ),
    ("ocpp_lago_bridge_tap_records_total", &[("kind", "start")]),
    (
        "ocpp_lago_bridge_tap_records_total",
        &[("kind", "meter_values")],
    ),
    ("ocpp_lago_bridge_tap_records_total", &[("kind", "stop")]),
    ("ocpp_lago_bridge_tap_records_lost_total", &[]),
    (
        "ocpp_lago_bridge_replies_released_uncommitted_total",
        &[("reason", "timeout")],
    ),
    (
        "ocpp_lago_bridge_replies_released_uncommitted_total",
        &[("reason", "writer_stopped")],
    ),
    ("ocpp_lago_bridge_events_derived_total", &[]),
    (
        "ocpp_lago_bridge_ledger_ignored_total",
        &[("reason", "duplicate_stop")],
    ),
    (
        "ocpp_lago_bridge_anomalies_total",
        &[("reason", "missing_start")],
    ),
    (
        "ocpp_lago_bridge_anomalies_total",
        &[("reason", "unmapped_id_tag")],
    ),
    (
        "ocpp_lago_bridge_dead_letters_total",
        &[("reason", "lago_rejected")],
    ),
    (
        "ocpp_lago_bridge_dead_letters_total",
        &[("reason", "unknown_subscription")],
    ),
    ("ocpp_lago_bridge_events_delivered_total", &[]),
    (
        "ocpp_lago_bridge_lago_requests_total",
        &[("endpoint", "events_batch"), ("status_class", "2xx")],
    ),
    (
        "ocpp_lago_bridge_lago_requests_total",
        &[("endpoint", "events_batch"), ("status_class", "4xx")],
    ),
    (
        "ocpp_lago_bridge_lago_requests_total",
        &[("endpoint", "events_batch"), ("status_class", "5xx")],
    ),
    (
        "ocpp_lago_bridge_lago_requests_total",
        &[("endpoint", "events_batch"), ("status_class", "error")],
    ),
    (
        "ocpp_lago_bridge_lago_requests_total",
        &[("endpoint", "events_batch"), ("status_class", "timeout")],
    ),
    ("ocpp_lago_bridge_lago_retries_total", &[]),
    (
        "ocpp_lago_bridge_lago_alarms_total",
        &[("kind", "accepted_unparseable")],
    ),
    ("ocpp_lago_bridge_spool_commit_errors_total", &[]),
    ("ocpp_lago_bridge_spool_size_alarms_total", &[]),
    (
        "ocpp_lago_bridge_start_recoveries_total",
        &[("result", "recovered")],
    ),
    (
        "ocpp_lago_bridge_anomalies_total",
        &[("reason", "transaction_id_collision")],
    ),
    (
        "ocpp_lago_bridge_anomalies_total",
        &[("reason", "unreadable_frame")],
    ),
    (
        "ocpp_lago_bridge_anomalies_total",
        &[("reason", "implausible_register")],
    ),
    (
        "ocpp_lago_bridge_anomalies_total",
        &[("reason", "meter_start_mismatch")],
    ),
    (
        "ocpp_lago_bridge_charger_clock_fallbacks_total",
        &[("reason", "too_old")],
    ),
    (
        "ocpp_lago_bridge_task_failures_total",
        &[("task", "spool_writer")],
    ),
    ("ocpp_lago_bridge_stops_parked_total", &[]),
    (
        "ocpp_lago_bridge_start_recovery_errors_total",
        &[("reason", "http")],
    ),
    ("ocpp_lago_bridge_admin_connections_refused_total", &[]),
    (
        "ocpp_lago_bridge_reconcile_runs_total",
        &[("result", "complete")],
    ),
    (
        "ocpp_lago_bridge_reconcile_runs_total",
        &[("result", "failed")],
    ),
];

/// Gauges with a label, registered at zero for every label value.
const ZERO_LABELLED_GAUGES: &[(&str, &str, &[&str])] = &[(
    "ocpp_lago_bridge_reconcile_sessions",
    "status",
    &[
        "ok",
        "pending",
        "dead_letter",
        "missing",
        "mismatch",
        "unknown_in_steve",
    ],
)];

/// Gauges registered at zero; their owners set the real value as soon as they know it.
const ZERO_GAUGES: &[&str] = &[
    "ocpp_lago_bridge_ready",
    "ocpp_lago_bridge_spool_disk_cap_bytes",
    "ocpp_lago_bridge_charger_connections",
    "ocpp_lago_bridge_spool_pending_events",
    "ocpp_lago_bridge_spool_oldest_pending_age_seconds",
    "ocpp_lago_bridge_spool_bytes",
    "ocpp_lago_bridge_reconcile_last_complete_timestamp_seconds",
];

/// Histograms registered empty (count 0, every bucket 0).
const ZERO_HISTOGRAMS: &[&str] = &[
    "ocpp_lago_bridge_reply_hold_seconds",
    "ocpp_lago_bridge_spool_commit_seconds",
    "ocpp_lago_bridge_lago_request_seconds",
];

/// Every metric name `/metrics` exports from the start (the dashboard and the alert rules use
/// only these).
pub fn metric_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = ZERO_COUNTERS
        .iter()
        .map(|(name, _)| *name)
        .chain(ZERO_GAUGES.iter().copied())
        .chain(ZERO_LABELLED_GAUGES.iter().map(|(name, _, _)| *name))
        .chain(ZERO_HISTOGRAMS.iter().copied())
        .chain(["ocpp_lago_bridge_build_info"])
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

fn register_zeros() {
    for (name, labels) in ZERO_COUNTERS {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, *v))
            .collect();
        metrics::counter!(*name, labels).absolute(0);
    }
    for name in ZERO_GAUGES {
        metrics::gauge!(*name).set(0.0);
    }
    for (name, label, values) in ZERO_LABELLED_GAUGES {
        for value in *values {
            metrics::gauge!(*name, *label => *value).set(0.0);
        }
    }
    for name in ZERO_HISTOGRAMS {
        // Registering the handle is enough for the exporter to render it.
        let _ = metrics::histogram!(*name);
    }
}

/// Bucket bounds (seconds) of the spool commit and reply hold histograms.
const COMMIT_BUCKETS: [f64; 25] = [
    0.00005, 0.0001, 0.00015, 0.0002, 0.00025, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.0015,
    0.002, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the global metrics recorder; the handle renders `/metrics`.
pub fn init_metrics() -> Result<PrometheusHandle, String> {
    // Real Prometheus histograms (not client-side summaries) so latencies aggregate across
    // scrapes and instances; the buckets span a loopback commit (sub-ms) to a slow Lago (30 s).
    let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0,
        ])
        .map_err(|e| e.to_string())?;
    // A commit and a held billing reply take 0.1-0.5 ms on a local SSD: finer buckets there, so
    // that their quantiles (and the 300 µs / 2 ms reply targets of BENCHMARKS.md) are read
    // within ~50 µs instead of interpolated across 100-250-500 µs.
    for name in [
        "ocpp_lago_bridge_spool_commit_seconds",
        "ocpp_lago_bridge_reply_hold_seconds",
    ] {
        builder = builder
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(name.to_owned()),
                &COMMIT_BUCKETS,
            )
            .map_err(|e| e.to_string())?;
    }
    let handle = builder.install_recorder().map_err(|e| e.to_string())?;
    metrics::gauge!("ocpp_lago_bridge_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    register_zeros();
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
        "/metrics" => {
            // Readiness as a series, for the "not ready for 5 minutes" alert: current at every
            // scrape, which is the only time anyone reads it.
            let ready = readiness.problems().is_empty();
            metrics::gauge!("ocpp_lago_bridge_ready").set(if ready { 1.0 } else { 0.0 });
            (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics.render(),
            )
        }
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
