//! A Lago stand-in speaking HTTP/1.1 on 127.0.0.1 that follows docs/lago-contract.md: batch
//! ingestion with validation, Postgres (unique, whole-batch rollback) or ClickHouse (dedupe)
//! storage, the three lookups, and a fault schedule the test changes at runtime.
//!
//! Also the benchmarks' Lago (`examples/lago_standin.rs` includes this file): lookups of a
//! stored key are hash-indexed so a million stored events cost no more per batch than ten, and
//! `GET /stand-in/stats` (same key, no fault consumed, not counted) reports what was stored.

#![allow(dead_code)] // Each test uses a different part of the stand-in.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Requests whose head or body does not arrive within this are dropped.
const READ_DEADLINE: Duration = Duration::from_secs(10);
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Which event store the stand-in imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// Unique (external_subscription_id, transaction_id); a duplicate fails the batch.
    Postgres,
    /// Duplicates accepted; same (code, subscription, transaction_id, timestamp) overwrites.
    ClickHouse,
}

/// A billable metric the stand-in knows.
#[derive(Debug, Clone)]
pub struct MetricDef {
    pub code: String,
    pub aggregation_type: String,
    pub field_name: Option<String>,
    /// Events of this metric fail with a plain-string error, as a broken expression does.
    pub expression_fails: bool,
}

impl MetricDef {
    /// A `sum_agg` metric over `value`, the shape the bridge needs.
    pub fn sum_of_value(code: &str) -> Self {
        Self {
            code: code.into(),
            aggregation_type: "sum_agg".into(),
            field_name: Some("value".into()),
            expression_fails: false,
        }
    }
}

/// How the stand-in starts.
#[derive(Debug, Clone)]
pub struct StandInConfig {
    pub api_key: String,
    pub mode: StoreMode,
    pub batch_limit: usize,
    pub metrics: Vec<MetricDef>,
    /// External ids of the subscriptions `GET /subscriptions/{id}` finds.
    pub subscriptions: Vec<String>,
}

impl Default for StandInConfig {
    fn default() -> Self {
        Self {
            api_key: "test-key".into(),
            mode: StoreMode::Postgres,
            batch_limit: 100,
            metrics: vec![MetricDef::sum_of_value("kwh")],
            subscriptions: vec!["sub-1".into()],
        }
    }
}

/// One injected misbehaviour, consumed by the next request that arrives (any path).
#[derive(Debug, Clone)]
pub enum Fault {
    /// 500 with an HTML body; nothing stored.
    InternalError,
    /// 429 with `X-RateLimit-*` headers and, if set, `Retry-After: <secs>`; nothing stored.
    RateLimited {
        retry_after_secs: Option<u64>,
        reset_secs: u64,
    },
    /// Waits this long, then answers normally (so a timed-out batch may still be stored).
    Slow(Duration),
    /// 401 whatever the key; nothing stored.
    Unauthorized,
    /// Processes normally (events stored) but answers 200 with a body that is not JSON.
    GarbageOk,
    /// 400 with an HTML body, as a proxy or WAF in front of Lago sends it; nothing stored.
    ProxyBadRequest,
    /// 200 with a maintenance page, as a load balancer sends it; nothing stored.
    MaintenancePage,
}

impl Fault {
    /// A short name for logs and assertions: the status it answers with, or what it does.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::InternalError => "500",
            Fault::RateLimited { .. } => "429",
            Fault::Slow(_) => "slow",
            Fault::Unauthorized => "401",
            Fault::GarbageOk => "garbage_ok",
            Fault::ProxyBadRequest => "proxy_400",
            Fault::MaintenancePage => "maintenance_page",
        }
    }
}

/// Which route a scripted fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    Batch,
    GetEvent,
    ListEvents,
    GetBillableMetric,
    GetSubscription,
}

/// How many requests of each kind arrived (faulted ones included).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub batch: u64,
    pub get_event: u64,
    pub list_events: u64,
    pub get_billable_metric: u64,
    pub get_subscription: u64,
    pub other: u64,
}

/// One request as it arrived: when, where, and the injected fault that answered it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: std::time::Instant,
    pub path: String,
    /// `None`: answered normally; else the fault's name (`"500"`, `"429"`, `"401"`, …).
    pub fault: Option<&'static str>,
}

/// An event as the stand-in stored it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    pub lago_id: String,
    pub transaction_id: String,
    pub external_subscription_id: String,
    pub code: String,
    pub timestamp_secs: f64,
    pub properties: Map<String, Value>,
}

impl StoredRow {
    /// The property `value` as sent (a decimal string for our events).
    pub fn value(&self) -> Option<&str> {
        self.properties.get("value").and_then(Value::as_str)
    }

    fn to_event_object(&self, subscriptions: &[String]) -> Value {
        let known = subscriptions.contains(&self.external_subscription_id);
        json!({
            "lago_id": self.lago_id,
            "transaction_id": self.transaction_id,
            "lago_customer_id": known.then(|| format!("cust-{}", self.external_subscription_id)),
            "code": self.code,
            "timestamp": iso_millis(self.timestamp_secs),
            "precise_total_amount_cents": null,
            "properties": self.properties,
            "lago_subscription_id": known.then(|| format!("lsub-{}", self.external_subscription_id)),
            "external_subscription_id": self.external_subscription_id,
            "created_at": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        })
    }
}

/// ClickHouse's deduplication key: (code, external_subscription_id, transaction_id, timestamp bits).
type DedupeKey = (String, String, String, u64);

struct State {
    config: StandInConfig,
    /// In arrival order; `None` where ClickHouse replaced a row (it moves to the end).
    stored: Vec<Option<StoredRow>>,
    /// Live rows in `stored`.
    live: usize,
    /// Every (external_subscription_id, transaction_id) ever stored. A row only ever disappears
    /// when a row with the same key replaces it, so this is exactly the keys of the live rows.
    keys: HashSet<(String, String)>,
    /// Positions in `stored` of the live rows of each ClickHouse dedupe key.
    by_dedupe_key: HashMap<DedupeKey, Vec<usize>>,
    faults: VecDeque<Fault>,
    /// Faults for one route only, consumed before the general queue.
    route_faults: HashMap<RouteKind, VecDeque<Fault>>,
    /// Faults answering every request of a route until cleared.
    sticky_faults: HashMap<RouteKind, Fault>,
    /// Faults answering every lookup of one subscription until cleared.
    subscription_faults: HashMap<String, Fault>,
    /// Every batch holding one of these transaction ids gets a 500 (Lago keeps failing on it).
    poison_ids: HashSet<String>,
    /// Every request path as it arrived (percent-encoding untouched), in order.
    paths: Vec<String>,
    /// Every request with when it arrived and the fault it got, in order.
    arrivals: Vec<Arrival>,
    counts: RequestCounts,
    accepted: AcceptedBatches,
    next_id: u64,
}

/// What the stand-in stored per accepted (200) batch, for the benchmarks.
#[derive(Debug, Clone, Default)]
struct AcceptedBatches {
    batches: u64,
    events: u64,
    /// Events per accepted batch → how many batches had that size.
    sizes: BTreeMap<usize, u64>,
    /// Unix seconds of the first and the last accepted batch.
    first_at: Option<f64>,
    last_at: Option<f64>,
}

impl State {
    fn new(config: StandInConfig) -> Self {
        Self {
            config,
            stored: Vec::new(),
            live: 0,
            keys: HashSet::new(),
            by_dedupe_key: HashMap::new(),
            faults: VecDeque::new(),
            route_faults: HashMap::new(),
            sticky_faults: HashMap::new(),
            subscription_faults: HashMap::new(),
            poison_ids: HashSet::new(),
            paths: Vec::new(),
            arrivals: Vec::new(),
            counts: RequestCounts::default(),
            accepted: AcceptedBatches::default(),
            next_id: 1,
        }
    }

    /// Appends a row; in ClickHouse mode first drops the live rows it replaces.
    fn store(&mut self, row: StoredRow, replace_same_dedupe_key: bool) {
        let dedupe_key = (
            row.code.clone(),
            row.external_subscription_id.clone(),
            row.transaction_id.clone(),
            row.timestamp_secs.to_bits(),
        );
        let positions = self.by_dedupe_key.entry(dedupe_key).or_default();
        if replace_same_dedupe_key {
            for position in positions.drain(..) {
                if self.stored[position].take().is_some() {
                    self.live -= 1;
                }
            }
        }
        positions.push(self.stored.len());
        self.keys.insert((
            row.external_subscription_id.clone(),
            row.transaction_id.clone(),
        ));
        self.stored.push(Some(row));
        self.live += 1;
    }

    fn rows(&self) -> impl Iterator<Item = &StoredRow> {
        self.stored.iter().flatten()
    }

    fn stats(&self) -> Value {
        let accepted = &self.accepted;
        json!({
            "stored_events": self.live,
            "distinct_keys": self.keys.len(),
            "requests": {
                "batch": self.counts.batch,
                "get_event": self.counts.get_event,
                "list_events": self.counts.list_events,
                "get_billable_metric": self.counts.get_billable_metric,
                "get_subscription": self.counts.get_subscription,
                "other": self.counts.other,
            },
            "accepted_batches": accepted.batches,
            "accepted_events": accepted.events,
            "accepted_batch_sizes": accepted
                .sizes
                .iter()
                .map(|(size, count)| (size.to_string(), json!(count)))
                .collect::<Map<String, Value>>(),
            "first_accepted_at": accepted.first_at,
            "last_accepted_at": accepted.last_at,
        })
    }
}

/// The running stand-in; dropping it stops accepting connections.
pub struct LagoStandIn {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// While set, every connection is reset unanswered. The port stays bound through an outage:
    /// closing the listener let a parallel test's ephemeral server take the port, and the bridge
    /// then got that server's 404s instead of an outage.
    down: Arc<AtomicBool>,
    acceptor: JoinHandle<()>,
}

impl Drop for LagoStandIn {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl LagoStandIn {
    /// Binds an ephemeral port on 127.0.0.1 and starts serving.
    pub async fn start(config: StandInConfig) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("literal address"), config)
            .await
            .expect("bind stand-in")
    }

    /// Binds `addr` and starts serving.
    pub async fn start_on(addr: SocketAddr, config: StandInConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::new(config)));
        let down = Arc::new(AtomicBool::new(false));
        let acceptor = tokio::spawn(accept_loop(listener, state.clone(), down.clone()));
        Ok(Self {
            addr,
            state,
            down,
            acceptor,
        })
    }

    /// The server root to configure as `lago.api_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The API key the stand-in accepts.
    pub fn api_key(&self) -> String {
        lock(&self.state).config.api_key.clone()
    }

    /// Queues a fault for the next request (FIFO with earlier ones).
    pub fn push_fault(&self, fault: Fault) {
        lock(&self.state).faults.push_back(fault);
    }

    /// Queues the same fault for the next `times` requests.
    pub fn push_faults(&self, fault: Fault, times: usize) {
        let mut state = lock(&self.state);
        state.faults.extend(std::iter::repeat_n(fault, times));
    }

    /// Queues a fault for the next `times` requests of one route (before the general queue).
    pub fn push_route_faults(&self, route: RouteKind, fault: Fault, times: usize) {
        let mut state = lock(&self.state);
        let queue = state.route_faults.entry(route).or_default();
        queue.extend(std::iter::repeat_n(fault, times));
    }

    /// Answers every request of `route` with `fault` until set to `None`.
    pub fn set_sticky_fault(&self, route: RouteKind, fault: Option<Fault>) {
        let mut state = lock(&self.state);
        match fault {
            Some(fault) => state.sticky_faults.insert(route, fault),
            None => state.sticky_faults.remove(&route),
        };
    }

    /// Answers every `GET /subscriptions/{external_id}` of one subscription with `fault`
    /// until set to `None`.
    pub fn set_subscription_fault(&self, external_id: &str, fault: Option<Fault>) {
        let mut state = lock(&self.state);
        match fault {
            Some(fault) => state
                .subscription_faults
                .insert(external_id.to_owned(), fault),
            None => state.subscription_faults.remove(external_id),
        };
    }

    /// Every batch holding `transaction_id` fails with 500 (nothing stored) until cleared.
    pub fn set_poison(&self, transaction_id: &str, poisoned: bool) {
        let mut state = lock(&self.state);
        if poisoned {
            state.poison_ids.insert(transaction_id.to_owned());
        } else {
            state.poison_ids.remove(transaction_id);
        }
    }

    /// Every request path so far, as sent (percent-encoding untouched).
    pub fn request_paths(&self) -> Vec<String> {
        lock(&self.state).paths.clone()
    }

    /// Every request so far with its arrival time and the fault that answered it.
    pub fn arrivals(&self) -> Vec<Arrival> {
        lock(&self.state).arrivals.clone()
    }

    /// Queued faults (general and per route) not yet consumed by a request.
    pub fn pending_faults(&self) -> usize {
        let state = lock(&self.state);
        state.faults.len()
            + state
                .route_faults
                .values()
                .map(VecDeque::len)
                .sum::<usize>()
    }

    /// Drops pending faults (general, per route and sticky) and poisoned ids.
    pub fn clear_faults(&self) {
        let mut state = lock(&self.state);
        state.faults.clear();
        state.route_faults.clear();
        state.sticky_faults.clear();
        state.subscription_faults.clear();
        state.poison_ids.clear();
    }

    /// Lago unreachable: every new connection is reset before a byte of answer (the port stays
    /// bound, see `down`).
    pub fn go_down(&self) {
        self.down.store(true, Ordering::SeqCst);
    }

    /// Answers again.
    pub fn come_up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// Switches the store mode (stored events are kept).
    pub fn set_mode(&self, mode: StoreMode) {
        lock(&self.state).config.mode = mode;
    }

    /// Changes the batch limit.
    pub fn set_batch_limit(&self, limit: usize) {
        lock(&self.state).config.batch_limit = limit;
    }

    /// Replaces the known billable metrics.
    pub fn set_metrics(&self, metrics: Vec<MetricDef>) {
        lock(&self.state).config.metrics = metrics;
    }

    /// Replaces the known subscriptions.
    pub fn set_subscriptions(&self, external_ids: Vec<String>) {
        lock(&self.state).config.subscriptions = external_ids;
    }

    /// Stores an event directly, as if another sender had (e.g. a colliding session).
    pub fn seed(&self, event: Value) {
        let mut state = lock(&self.state);
        let row = to_row(&mut state, &event, 0.0);
        state.store(row, false);
    }

    /// Changes the `value` property of the stored events with this transaction_id, as an
    /// operator editing (or re-ingesting) an event in Lago would; returns how many it changed.
    pub fn alter_value(&self, transaction_id: &str, value: &str) -> usize {
        let mut state = lock(&self.state);
        let mut changed = 0;
        for row in state.stored.iter_mut().flatten() {
            if row.transaction_id == transaction_id {
                row.properties
                    .insert("value".into(), Value::String(value.into()));
                changed += 1;
            }
        }
        changed
    }

    /// Everything stored, in arrival order.
    pub fn stored_events(&self) -> Vec<StoredRow> {
        lock(&self.state).rows().cloned().collect()
    }

    /// What `GET /stand-in/stats` answers.
    pub fn stats(&self) -> Value {
        lock(&self.state).stats()
    }

    /// Requests seen so far, per endpoint.
    pub fn request_counts(&self) -> RequestCounts {
        lock(&self.state).counts.clone()
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>, down: Arc<AtomicBool>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // E.g. out of file descriptors: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if down.load(Ordering::SeqCst) {
            // Linger 0: the drop sends RST, as a dead host's kernel would refuse the connection.
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        }
        tokio::spawn(serve_connection(stream, state.clone()));
    }
}

struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Response {
    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.to_string().into_bytes(),
        }
    }
}

async fn serve_connection(mut stream: TcpStream, state: Arc<Mutex<State>>) {
    // One request per connection (`Connection: close`), so a closed listener refuses everything.
    let Ok(Some(request)) = tokio::time::timeout(READ_DEADLINE, read_request(&mut stream)).await
    else {
        return;
    };
    let response = handle(&state, request).await;
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        response.body.len()
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&response.body).await;
    let _ = stream.shutdown().await;
}

async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(head_len) = parsed.parse(&buffer).ok()? {
            let method = parsed.method?.to_owned();
            let path = parsed.path?.to_owned();
            let header = |name: &str| {
                parsed
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(str::to_owned)
            };
            let authorization = header("authorization");
            let content_length: usize = header("content-length")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if content_length > MAX_BODY_BYTES {
                return None;
            }
            let mut body = buffer[head_len..].to_vec();
            while body.len() < content_length {
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(content_length);
            return Some(Request {
                method,
                path,
                authorization,
                body,
            });
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

enum Route {
    Batch,
    Event(String),
    /// `GET /api/v1/events?...`: the raw query string.
    ListEvents(String),
    BillableMetric(String),
    Subscription(String),
    /// The benchmarks' counters; not part of Lago's API.
    Stats,
    Other,
}

impl Route {
    fn kind(&self) -> Option<RouteKind> {
        Some(match self {
            Self::Batch => RouteKind::Batch,
            Self::Event(_) => RouteKind::GetEvent,
            Self::ListEvents(_) => RouteKind::ListEvents,
            Self::BillableMetric(_) => RouteKind::GetBillableMetric,
            Self::Subscription(_) => RouteKind::GetSubscription,
            Self::Stats | Self::Other => return None,
        })
    }
}

/// The id Rails hands the controller for a route whose `:id` has no format constraint: a
/// `.suffix` of the raw (still percent-encoded) segment is split off as the response format
/// (`fleet.acme.com` → id `fleet.acme`, format `com`), then the id is decoded. lago-api's
/// `config/routes.rb` constrains `billable_metrics/:code` (`code: /.*/`) but not
/// `subscriptions/:external_id`, nor `events/:id` before it gained `id: /[^\/]+/`.
fn rails_id(raw_segment: &str) -> String {
    let id = match raw_segment.rsplit_once('.') {
        Some((id, format)) if !id.is_empty() && !format.is_empty() => id,
        _ => raw_segment,
    };
    percent_decode(id)
}

fn route(method: &str, path_and_query: &str) -> Route {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    if (method, path) == ("GET", "/stand-in/stats") {
        return Route::Stats;
    }
    let Some(rest) = path.strip_prefix("/api/v1/") else {
        return Route::Other;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    match (method, segments.as_slice()) {
        ("POST", ["events", "batch"]) => Route::Batch,
        ("GET", ["events"]) => Route::ListEvents(query.to_owned()),
        ("GET", ["events", id]) => Route::Event(rails_id(id)),
        ("GET", ["billable_metrics", code]) => Route::BillableMetric(percent_decode(code)),
        ("GET", ["subscriptions", id]) => Route::Subscription(rails_id(id)),
        _ => Route::Other,
    }
}

/// Whether the request carries the stand-in's key (`Authorization: Bearer <key>`).
fn authorized(state: &State, request: &Request) -> bool {
    request
        .authorization
        .as_deref()
        .and_then(|value| value.strip_prefix("Bearer "))
        == Some(state.config.api_key.as_str())
}

async fn handle(state: &Mutex<State>, request: Request) -> Response {
    let route = route(&request.method, &request.path);
    if let Route::Stats = route {
        let state = lock(state);
        if !authorized(&state, &request) {
            return unauthorized();
        }
        return Response::json(200, state.stats());
    }
    let (fault, authorized) = {
        let mut state = lock(state);
        let counts = &mut state.counts;
        match route {
            Route::Batch => counts.batch += 1,
            Route::Event(_) => counts.get_event += 1,
            Route::ListEvents(_) => counts.list_events += 1,
            Route::BillableMetric(_) => counts.get_billable_metric += 1,
            Route::Subscription(_) => counts.get_subscription += 1,
            Route::Stats | Route::Other => counts.other += 1,
        }
        let authorized = authorized(&state, &request);
        state.paths.push(request.path.clone());
        let kind = route.kind();
        let sticky = kind.and_then(|k| state.sticky_faults.get(&k).cloned());
        let for_route = kind.and_then(|k| state.route_faults.get_mut(&k)?.pop_front());
        let poisoned = matches!(route, Route::Batch)
            && !state.poison_ids.is_empty()
            && serde_json::from_slice::<Value>(&request.body)
                .ok()
                .and_then(|body| body.get("events").cloned())
                .and_then(|events| events.as_array().cloned())
                .is_some_and(|events| {
                    events
                        .iter()
                        .any(|e| state.poison_ids.contains(&str_field(e, "transaction_id")))
                });
        let for_subscription = match &route {
            Route::Subscription(id) => state.subscription_faults.get(id).cloned(),
            _ => None,
        };
        let fault = for_subscription
            .or(sticky)
            .or(for_route)
            .or_else(|| poisoned.then_some(Fault::InternalError))
            .or_else(|| state.faults.pop_front());
        let arrival = Arrival {
            at: std::time::Instant::now(),
            path: request.path.clone(),
            fault: fault.as_ref().map(Fault::name),
        };
        state.arrivals.push(arrival);
        (fault, authorized)
    };
    let mut garbage = false;
    match fault {
        Some(Fault::InternalError) => {
            return Response {
                status: 500,
                headers: Vec::new(),
                body: b"<html><body>We're sorry, but something went wrong.</body></html>".to_vec(),
            };
        }
        Some(Fault::RateLimited {
            retry_after_secs,
            reset_secs,
        }) => {
            let mut headers = vec![
                ("X-RateLimit-Limit", "500".to_owned()),
                ("X-RateLimit-Remaining", "0".to_owned()),
                ("X-RateLimit-Reset", reset_secs.to_string()),
            ];
            if let Some(secs) = retry_after_secs {
                headers.push(("Retry-After", secs.to_string()));
            }
            return Response {
                status: 429,
                headers,
                body: json!({"status": 429, "error": "Too Many Requests"})
                    .to_string()
                    .into_bytes(),
            };
        }
        Some(Fault::Unauthorized) => return unauthorized(),
        Some(Fault::Slow(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::GarbageOk) => garbage = true,
        Some(Fault::ProxyBadRequest) => {
            return Response {
                status: 400,
                headers: vec![("X-Proxy", "edge".to_owned())],
                body: b"<html><body><h1>400 Bad Request</h1>nginx</body></html>".to_vec(),
            };
        }
        Some(Fault::MaintenancePage) => {
            return Response {
                status: 200,
                headers: Vec::new(),
                body: b"<html><body>Down for maintenance, back soon.</body></html>".to_vec(),
            };
        }
        None => {}
    }
    if !authorized {
        return unauthorized();
    }
    let response = {
        let mut state = lock(state);
        match route {
            Route::Batch => ingest(&mut state, &request.body),
            Route::Event(transaction_id) => find_event(&state, &transaction_id),
            Route::ListEvents(query) => list_events(&state, &query),
            Route::BillableMetric(code) => find_metric(&state, &code),
            Route::Subscription(external_id) => find_subscription(&state, &external_id),
            Route::Stats | Route::Other => not_found("route_not_found"),
        }
    };
    if garbage && response.status == 200 {
        return Response {
            status: 200,
            headers: Vec::new(),
            body: b"{\"events\": [ this is not json".to_vec(),
        };
    }
    response
}

fn unauthorized() -> Response {
    Response::json(401, json!({"status": 401, "error": "Unauthorized"}))
}

fn not_found(code: &str) -> Response {
    Response::json(
        404,
        json!({"status": 404, "error": "Not Found", "code": code}),
    )
}

fn unprocessable(details: Value) -> Response {
    Response::json(
        422,
        json!({"status": 422, "error": "Unprocessable Entity", "code": "validation_errors", "error_details": details}),
    )
}

fn ingest(state: &mut State, body: &[u8]) -> Response {
    let Ok(Value::Object(mut input)) = serde_json::from_slice::<Value>(body) else {
        return Response::json(400, json!({"status": 400, "error": "BadRequest: events"}));
    };
    let Some(Value::Array(events)) = input.remove("events") else {
        return Response::json(400, json!({"status": 400, "error": "BadRequest: events"}));
    };
    if events.len() > state.config.batch_limit {
        return unprocessable(json!({"events": ["too_many_events"]}));
    }
    let received_at = unix_now();
    let mut errors = Map::new();
    let mut batch_keys: Vec<(String, String)> = Vec::new();
    for (index, event) in events.iter().enumerate() {
        if let Some(error) = validate(state, event, &batch_keys) {
            errors.insert(index.to_string(), error);
        }
        batch_keys.push((
            str_field(event, "external_subscription_id"),
            str_field(event, "transaction_id"),
        ));
    }
    if !errors.is_empty() {
        // Whole-batch rollback (lago-api PR #4772): nothing of this batch is stored.
        return unprocessable(Value::Object(errors));
    }
    let mut echoes = Vec::new();
    for event in &events {
        let row = to_row(state, event, received_at);
        let mut echo = row.to_event_object(&state.config.subscriptions);
        // The batch echo never names the customer: processing is asynchronous.
        echo["lago_customer_id"] = Value::Null;
        echoes.push(echo);
        // ClickHouse's ReplacingMergeTree: the same key overwrites instead of adding a row.
        let replace = state.config.mode == StoreMode::ClickHouse;
        state.store(row, replace);
    }
    let accepted = &mut state.accepted;
    accepted.batches += 1;
    accepted.events += events.len() as u64;
    *accepted.sizes.entry(events.len()).or_default() += 1;
    accepted.first_at.get_or_insert(received_at);
    accepted.last_at = Some(received_at);
    Response::json(200, json!({ "events": echoes }))
}

/// Lago's per-event validation; `None` when the event is acceptable.
fn validate(state: &State, event: &Value, earlier_in_batch: &[(String, String)]) -> Option<Value> {
    let mut fields = Map::new();
    for field in ["transaction_id", "external_subscription_id", "code"] {
        if str_field(event, field).is_empty() {
            fields.insert(field.into(), json!(["value_is_mandatory"]));
        }
    }
    match event.get("timestamp") {
        None | Some(Value::Null) | Some(Value::Number(_)) => {}
        Some(Value::String(text)) if text.parse::<f64>().is_ok() => {}
        Some(_) => {
            fields.insert("timestamp".into(), json!(["invalid_format"]));
        }
    }
    let code = str_field(event, "code");
    let metric = state.config.metrics.iter().find(|m| m.code == code);
    if let Some(metric) = metric {
        if metric.expression_fails {
            return Some(Value::String(format!(
                "undefined method `*' for nil while evaluating the expression of {code}"
            )));
        }
        if metric.aggregation_type == "sum_agg" {
            let field = metric.field_name.as_deref().unwrap_or("value");
            let value = event.get("properties").and_then(|p| p.get(field));
            let valid = match value {
                None | Some(Value::Null) => true,
                Some(Value::String(text)) => is_decimal(text),
                Some(Value::Number(n)) => is_decimal(&n.to_string()),
                Some(_) => false,
            };
            if !valid {
                fields.insert("properties".into(), json!(["value_is_not_valid_number"]));
            }
        }
    }
    if state.config.mode == StoreMode::Postgres {
        let key = (
            str_field(event, "external_subscription_id"),
            str_field(event, "transaction_id"),
        );
        let exists = state.keys.contains(&key) || earlier_in_batch.contains(&key);
        if exists && !key.1.is_empty() {
            fields.insert("transaction_id".into(), json!(["value_already_exist"]));
        }
    }
    (!fields.is_empty()).then_some(Value::Object(fields))
}

/// `^-?\d+(\.\d+)?$`, the Postgres path's check of a sum_agg field.
fn is_decimal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = match digits.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (digits, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    all_digits(int) && frac.is_none_or(all_digits)
}

fn to_row(state: &mut State, event: &Value, received_at: f64) -> StoredRow {
    let timestamp_secs = match event.get("timestamp") {
        Some(Value::Number(n)) => n.as_f64().unwrap_or(received_at),
        Some(Value::String(text)) => text.parse().unwrap_or(received_at),
        _ => received_at,
    };
    let lago_id = format!("00000000-0000-4000-8000-{:012}", state.next_id);
    state.next_id += 1;
    StoredRow {
        lago_id,
        transaction_id: str_field(event, "transaction_id"),
        external_subscription_id: str_field(event, "external_subscription_id"),
        code: str_field(event, "code"),
        timestamp_secs,
        properties: match event.get("properties") {
            Some(Value::Object(map)) => map.clone(),
            _ => Map::new(),
        },
    }
}

fn find_event(state: &State, transaction_id: &str) -> Response {
    match state
        .rows()
        .find(|row| row.transaction_id == transaction_id)
    {
        Some(row) => Response::json(
            200,
            json!({"event": row.to_event_object(&state.config.subscriptions)}),
        ),
        None => not_found("event_not_found"),
    }
}

/// `GET /api/v1/events?...` as lago-api's `EventsQuery` answers it: filters on subscription
/// and code, `timestamp_from`/`timestamp_to` through `DateTime.strptime` (`%FT%T%z`: whole
/// seconds and a zone, anything else is 422 `invalid_date`), newest first, paginated.
fn list_events(state: &State, query: &str) -> Response {
    let mut params: HashMap<String, String> = HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        params.insert(
            percent_decode(&key.replace('+', " ")),
            percent_decode(&value.replace('+', " ")),
        );
    }
    let mut bounds = [None, None];
    for (slot, field) in bounds.iter_mut().zip(["timestamp_from", "timestamp_to"]) {
        if let Some(text) = params.get(field) {
            match strptime_seconds(text) {
                Some(secs) => *slot = Some(secs),
                None => return unprocessable(json!({ field: ["invalid_date"] })),
            }
        }
    }
    let page: usize = params
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    let per_page: usize = params
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(20)
        .clamp(1, 100);
    let mut rows: Vec<&StoredRow> = state
        .rows()
        .filter(|row| {
            params
                .get("external_subscription_id")
                .is_none_or(|s| *s == row.external_subscription_id)
                && params.get("code").is_none_or(|c| *c == row.code)
                && bounds[0].is_none_or(|from| row.timestamp_secs >= from as f64)
                && bounds[1].is_none_or(|to| row.timestamp_secs <= to as f64)
        })
        .collect();
    rows.sort_by(|a, b| b.timestamp_secs.total_cmp(&a.timestamp_secs));
    let total = rows.len();
    let total_pages = total.div_ceil(per_page).max(1);
    let events: Vec<Value> = rows
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|row| row.to_event_object(&state.config.subscriptions))
        .collect();
    Response::json(
        200,
        json!({
            "events": events,
            "meta": {
                "current_page": page,
                "next_page": (page < total_pages).then_some(page + 1),
                "prev_page": (page > 1).then(|| page - 1),
                "total_pages": total_pages,
                "total_count": total,
            }
        }),
    )
}

/// `DateTime.strptime(text)` with Ruby's default `%FT%T%z`: `YYYY-MM-DDTHH:MM:SS` and a zone
/// (`Z`, `+HH:MM`, `+HHMM`), as unix seconds; `None` for anything else (fractions, unix time).
fn strptime_seconds(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    if bytes.len() < 20 || bytes[10] != b'T' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())
            .flatten()
    };
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if separators.iter().any(|(i, c)| bytes[*i] != *c) {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let offset = match &text[19..] {
        "Z" => 0,
        zone => {
            let sign = match zone.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let digits = zone[1..].replace(':', "");
            if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let (h, m): (i64, i64) = (digits[..2].parse().ok()?, digits[2..].parse().ok()?);
            sign * (h * 3600 + m * 60)
        }
    };
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

fn find_metric(state: &State, code: &str) -> Response {
    let Some(metric) = state.config.metrics.iter().find(|m| m.code == code) else {
        return not_found("billable_metric_not_found");
    };
    Response::json(
        200,
        json!({"billable_metric": {
            "lago_id": format!("bm-{code}"),
            "name": code,
            "code": code,
            "description": null,
            "recurring": false,
            "rounding_function": null,
            "rounding_precision": null,
            "created_at": "2025-01-01T00:00:00Z",
            "expression": if metric.expression_fails { json!("value * missing") } else { Value::Null },
            "field_name": metric.field_name,
            "aggregation_type": metric.aggregation_type,
            "weighted_interval": null,
            "filters": [],
            "active_subscriptions_count": 1,
        }}),
    )
}

fn find_subscription(state: &State, external_id: &str) -> Response {
    if !state.config.subscriptions.iter().any(|s| s == external_id) {
        return not_found("subscription_not_found");
    }
    Response::json(
        200,
        json!({"subscription": {
            "lago_id": format!("lsub-{external_id}"),
            "external_id": external_id,
            "lago_customer_id": format!("cust-{external_id}"),
            "external_customer_id": format!("customer-of-{external_id}"),
            "billing_time": "calendar",
            "name": null,
            "plan_code": "ev_charging",
            "status": "active",
            "created_at": "2025-01-01T00:00:00Z",
            "started_at": "2025-01-01T00:00:00Z",
            "canceled_at": null,
            "terminated_at": null,
            "ending_at": null,
            "plan": {"code": "ev_charging"},
        }}),
    )
}

fn str_field(event: &Value, field: &str) -> String {
    event
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn iso_millis(unix_secs: f64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(unix_secs.max(0.0));
    humantime::format_rfc3339_millis(at).to_string()
}

fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        if let Some(byte) = escaped {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
