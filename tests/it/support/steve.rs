//! A SteVe REST stand-in on 127.0.0.1: `GET /steve/api/v1/transactions?...` with SteVe's query
//! parameters (`transactionPk`, `chargeBoxId`, `type`, `periodType=FROM_TO` with `from`/`to`
//! on the start time, the whole list unpaged), HTTP Basic (SteVe ≥ 3.8) or the legacy
//! `STEVE-API-KEY` header, a 401 with SteVe's JSON error body otherwise, and an optional delay
//! per request. Shapes from steve-community/steve: `web/api/TransactionsRestController.java`,
//! `repository/dto/Transaction.java`, `web/api/ApiControllerAdvice.java` (error body),
//! `config/ApiAuthenticationManager.java` (401).
//!
//! Its transactions are those the websocket side (a central-system peer standing in for SteVe's
//! OCPP endpoint) assigned, read from that peer's event log at every request, plus those the
//! test registers itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How the stand-in authenticates the bridge.
#[derive(Debug, Clone)]
pub enum SteveAuth {
    /// SteVe ≥ 3.8: a web user with API access and its API password.
    Basic { user: String, password: String },
    /// SteVe < 3.8: the `STEVE-API-KEY` header.
    LegacyKey(String),
}

/// A transaction as SteVe stores it.
#[derive(Debug, Clone)]
pub struct SteveTransaction {
    pub id: i64,
    pub charge_box_id: String,
    pub connector_id: i64,
    pub id_tag: String,
    pub start_value_wh: i64,
    /// ISO-8601, as SteVe writes it (`2026-01-01T10:00:00.000Z`).
    pub start_timestamp: String,
    pub stop_value_wh: Option<i64>,
    pub stop_timestamp: Option<String>,
}

/// One request the stand-in saw.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Path and query, as sent.
    pub target: String,
    /// Whether its credentials were accepted.
    pub authorized: bool,
    /// The status answered.
    pub status: u16,
    /// When it arrived (before any delay): what a rate limit is measured on.
    pub arrived: std::time::Instant,
}

struct State {
    auth: SteveAuth,
    delay: Duration,
    registered: Vec<SteveTransaction>,
    central_log: Option<PathBuf>,
    seen: Vec<SeenRequest>,
    in_flight: usize,
    max_in_flight: usize,
}

/// The running stand-in; dropping it stops it.
pub struct SteveRest {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
    acceptor: JoinHandle<()>,
}

impl Drop for SteveRest {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SteveRest {
    /// Starts serving on an ephemeral loopback port; `central_log` is the event log of the
    /// central-system peer playing SteVe's websocket side, if any.
    pub async fn start(auth: SteveAuth, central_log: Option<PathBuf>) -> SteveRest {
        Self::start_on("127.0.0.1:0".parse().unwrap(), auth, central_log)
            .await
            .expect("bind SteVe REST stand-in")
    }

    /// Like [`Self::start`], on a given loopback address (the benchmark's process).
    pub async fn start_on(
        addr: std::net::SocketAddr,
        auth: SteveAuth,
        central_log: Option<PathBuf>,
    ) -> std::io::Result<SteveRest> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            auth,
            delay: Duration::ZERO,
            registered: Vec::new(),
            central_log,
            seen: Vec::new(),
            in_flight: 0,
            max_in_flight: 0,
        }));
        let shared = state.clone();
        let acceptor = tokio::spawn(async move {
            // Bounded: no test sends more requests than this.
            for _ in 0..100_000 {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, shared.clone()));
            }
        });
        Ok(SteveRest {
            addr,
            state,
            acceptor,
        })
    }

    /// SteVe's root, to configure as `steve.api_url`.
    pub fn url(&self) -> String {
        format!("http://{}/steve", self.addr)
    }

    /// Every answer waits this long first (a slow SteVe).
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.state).delay = delay;
    }

    /// Adds a transaction SteVe knows (e.g. started before the bridge was in the path).
    pub fn register(&self, transaction: SteveTransaction) {
        lock(&self.state).registered.push(transaction);
    }

    /// The most requests it was answering at once.
    pub fn max_in_flight(&self) -> usize {
        lock(&self.state).max_in_flight
    }

    /// The most requests that arrived in any `window` (a sliding window over arrival times).
    pub fn max_requests_within(&self, window: Duration) -> usize {
        max_within(
            &lock(&self.state)
                .seen
                .iter()
                .map(|r| r.arrived)
                .collect::<Vec<_>>(),
            window,
        )
    }

    /// The requests seen so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.state).seen.clone()
    }
}

/// The most of `arrivals` that lie within any half-open `window` `[t, t + window)`.
pub fn max_within(arrivals: &[std::time::Instant], window: Duration) -> usize {
    let mut sorted = arrivals.to_vec();
    sorted.sort();
    let mut best = 0;
    let mut first = 0;
    for last in 0..sorted.len() {
        while sorted[last].duration_since(sorted[first]) >= window {
            first += 1;
        }
        best = best.max(last + 1 - first);
    }
    best
}

/// SteVe's transactions: the registered ones and those in the central peer's log.
fn transactions(state: &State) -> Vec<SteveTransaction> {
    let mut all = state.registered.clone();
    let Some(path) = &state.central_log else {
        return all;
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut by_key: HashMap<(String, i64), usize> = HashMap::new();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if event["event"] != "call_received" {
            continue;
        }
        let charge_box_id = event["charge_box_id"].as_str().unwrap_or("").to_string();
        let payload = &event["payload"];
        let Some(id) = payload["transaction_id"].as_i64() else {
            continue;
        };
        match event["action"].as_str() {
            Some("StartTransaction") => {
                by_key.insert((charge_box_id.clone(), id), all.len());
                all.push(SteveTransaction {
                    id,
                    charge_box_id,
                    connector_id: payload["connector_id"].as_i64().unwrap_or(1),
                    id_tag: payload["id_tag"].as_str().unwrap_or("").to_string(),
                    start_value_wh: payload["meter_start"].as_i64().unwrap_or(0),
                    start_timestamp: payload["timestamp"].as_str().unwrap_or("").to_string(),
                    stop_value_wh: None,
                    stop_timestamp: None,
                });
            }
            Some("StopTransaction") => {
                if let Some(&i) = by_key.get(&(charge_box_id, id)) {
                    all[i].stop_value_wh = payload["meter_stop"].as_i64();
                    all[i].stop_timestamp = payload["timestamp"].as_str().map(str::to_string);
                }
            }
            _ => {}
        }
    }
    all
}

/// A transaction in the JSON shape of SteVe's `Transaction` DTO.
fn dto(t: &SteveTransaction) -> Value {
    json!({
        "id": t.id,
        "connectorId": t.connector_id,
        "chargeBoxPk": 1,
        "ocppTagPk": 1,
        "chargeBoxId": t.charge_box_id,
        "ocppIdTag": t.id_tag,
        "userId": null,
        "startValue": t.start_value_wh.to_string(),
        "startTimestamp": t.start_timestamp,
        "stopValue": t.stop_value_wh.map(|v| v.to_string()),
        "stopReason": t.stop_value_wh.map(|_| "Local"),
        "stopTimestamp": t.stop_timestamp,
        "stopEventActor": t.stop_value_wh.map(|_| "station"),
    })
}

/// SteVe's `ApiErrorResponse`.
fn error_body(status: u16, error: &str, message: &str, path: &str) -> String {
    json!({
        "timestamp": "2026-01-01T00:00:00.000Z",
        "status": status,
        "error": error,
        "message": message,
        "path": path,
    })
    .to_string()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn authorized(auth: &SteveAuth, headers: &[(String, String)]) -> bool {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    match auth {
        SteveAuth::Basic { user, password } => {
            header("authorization")
                == Some(&format!(
                    "Basic {}",
                    base64(format!("{user}:{password}").as_bytes())
                ))
        }
        SteveAuth::LegacyKey(key) => header("steve-api-key") == Some(key.as_str()),
    }
}

fn decode(component: &str) -> String {
    let bytes = component.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn serve(mut stream: TcpStream, state: Arc<Mutex<State>>) {
    let mut arrived = None;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65_536 {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => {
                arrived.get_or_insert_with(std::time::Instant::now);
                head.extend_from_slice(&buf[..n]);
            }
        }
    }
    let arrived = arrived.unwrap_or_else(std::time::Instant::now);
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let target = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let headers: Vec<(String, String)> = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let params: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let (delay, ok_auth) = {
        let mut state = lock(&state);
        state.in_flight += 1;
        state.max_in_flight = state.max_in_flight.max(state.in_flight);
        (state.delay, authorized(&state.auth, &headers))
    };
    tokio::time::sleep(delay).await;
    lock(&state).in_flight -= 1;
    // For benchmarks run as a process (`examples/steve_standin`): the requests counted so far.
    if path == "/stand-in/stats" {
        let seen = lock(&state).seen.len();
        let body = json!({ "requests": seen }).to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
        return;
    }
    let (status, body) = if !ok_auth {
        (
            401,
            error_body(
                401,
                "Unauthorized",
                "The user does not exist, exists but is disabled or has API access disabled.",
                path,
            ),
        )
    } else if path != "/steve/api/v1/transactions" {
        (404, error_body(404, "Not Found", "No endpoint", path))
    } else {
        answer(&lock(&state), path, &params)
    };
    lock(&state).seen.push(SeenRequest {
        target: target.clone(),
        authorized: ok_auth,
        status,
        arrived,
    });
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// SteVe's filters: repeatable `transactionPk` and `chargeBoxId`, `type` (the API's default ALL).
fn answer(state: &State, path: &str, params: &[(String, String)]) -> (u16, String) {
    let list = |name: &str| -> Vec<&str> {
        params
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let mut pks = Vec::new();
    for pk in list("transactionPk") {
        match pk.parse::<i64>() {
            Ok(pk) => pks.push(pk),
            Err(_) => return (400, error_body(400, "Bad Request", "transactionPk", path)),
        }
    }
    let boxes = list("chargeBoxId");
    let kind = list("type").first().copied().unwrap_or("ALL").to_string();
    if !["ALL", "ACTIVE", "STOPPED"].contains(&kind.as_str()) {
        return (400, error_body(400, "Bad Request", "type", path));
    }
    // `periodType=FROM_TO` with `from`/`to` (ISO-8601, `to` after `from`, else 400), filtering
    // on the START timestamp, as SteVe's `QueryPeriodFromToFilter` / `TransactionQueryForm`.
    let period = match list("periodType").first().copied().unwrap_or("ALL") {
        "ALL" => None,
        "FROM_TO" => {
            let bound = |name: &str| {
                list(name)
                    .first()
                    .and_then(|t| ocpp_lago_bridge::ocpp::units::parse_timestamp(t).ok())
            };
            match (bound("from"), bound("to")) {
                (Some(from), Some(to)) if to > from => Some((from, to)),
                _ => {
                    return (
                        400,
                        error_body(400, "Bad Request", "from/to of FROM_TO", path),
                    );
                }
            }
        }
        _ => return (400, error_body(400, "Bad Request", "periodType", path)),
    };
    let found: Vec<Value> = transactions(state)
        .iter()
        .filter(|t| pks.is_empty() || pks.contains(&t.id))
        .filter(|t| boxes.is_empty() || boxes.contains(&t.charge_box_id.as_str()))
        .filter(|t| {
            period.is_none_or(|(from, to)| {
                ocpp_lago_bridge::ocpp::units::parse_timestamp(&t.start_timestamp)
                    .is_ok_and(|start| start >= from && start <= to)
            })
        })
        .filter(|t| match kind.as_str() {
            "ACTIVE" => t.stop_value_wh.is_none(),
            "STOPPED" => t.stop_value_wh.is_some(),
            _ => true,
        })
        .map(dto)
        .collect();
    (200, Value::Array(found).to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc_4648() {
        assert_eq!(
            super::base64(b"Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(super::base64(b"ab"), "YWI=");
        assert_eq!(super::base64(b"abc"), "YWJj");
    }
}
