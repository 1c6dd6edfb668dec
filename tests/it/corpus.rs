//! Issue 8 item 5: every case of `tests/corpus/` through the real bridge binary, with the
//! recorder as upstream. Per case: the bridge is alive and a sentinel connection opened before
//! the case still relays both ways; the frame was relayed byte-identical or refused with the
//! close code / HTTP status of `cases.toml`; and the counter the case names went up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::support::bridge::Bridge;
use crate::support::recorder::{ConnectionLog, Recorder, Script};
use crate::support::ws::{self, ClientWs};
use crate::support::{PATH_PREFIX, poll_until, repo_root, within};
use ocpp_lago_bridge::tap::{ConnectionTap, Observation};

const STEP: Duration = Duration::from_secs(10);
/// The small bridge's limits: small enough to keep the test's memory low and fast.
const SMALL_PROXY: &str = "max_frame_size = 262144\nhandshake_timeout = \"500ms\"\n";

/// One entry of `tests/corpus/cases.toml`.
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub name: String,
    pub file: String,
    pub kind: String,
    #[serde(default)]
    pub from: Option<String>,
    pub expect: String,
    pub counter: String,
    #[serde(default)]
    pub tap: Option<String>,
    #[serde(default)]
    pub send_times: Option<usize>,
    #[serde(default)]
    pub opcode: Option<u8>,
    #[serde(default)]
    pub rsv: Option<u8>,
    #[serde(default)]
    pub masked: Option<bool>,
    #[serde(default)]
    pub claimed_len: Option<u64>,
    #[serde(default)]
    pub dribble_ms: Option<u64>,
    #[serde(default)]
    pub half_close: Option<bool>,
    #[serde(default)]
    pub bridge: Option<String>,
    #[serde(default)]
    pub fill: Vec<(String, String, usize)>,
}

#[derive(Deserialize)]
struct Manifest {
    case: Vec<Case>,
}

/// The corpus directory.
pub fn corpus_dir() -> PathBuf {
    repo_root().join("tests/corpus")
}

/// Every case with its bytes, `fill` markers expanded.
pub fn load_cases() -> Vec<(Case, Vec<u8>)> {
    let text = std::fs::read_to_string(corpus_dir().join("cases.toml")).expect("read cases.toml");
    let manifest: Manifest = toml::from_str(&text).expect("cases.toml parses");
    manifest
        .case
        .into_iter()
        .map(|case| {
            let path = corpus_dir().join(&case.file);
            let mut bytes =
                std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for (marker, unit, times) in &case.fill {
                bytes = replace_once(&bytes, marker.as_bytes(), &unit.repeat(*times));
            }
            (case, bytes)
        })
        .collect()
}

fn replace_once(bytes: &[u8], marker: &[u8], with: &str) -> Vec<u8> {
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap_or_else(|| {
            panic!(
                "fill marker {:?} not in file",
                String::from_utf8_lossy(marker)
            )
        });
    let mut out = Vec::with_capacity(bytes.len() + with.len());
    out.extend_from_slice(&bytes[..at]);
    out.extend_from_slice(with.as_bytes());
    out.extend_from_slice(&bytes[at + marker.len()..]);
    out
}

fn observation_label(observation: &Observation) -> &'static str {
    match observation {
        Observation::Pass => "pass",
        Observation::Record { .. } => "record",
        Observation::BillingReply { .. } => "billing_reply",
        Observation::Unbilled { .. } => "unbilled",
        Observation::Malformed { .. } => "malformed",
    }
}

fn charge_box_id(case: &Case) -> String {
    format!("CORPUS-{}", case.name)
}

#[test]
fn corpus_manifest_is_complete_and_tap_outcomes_match() {
    let cases = load_cases();
    assert!(cases.len() >= 50, "issue 8 asks for at least 50 cases");
    let mut names = std::collections::BTreeSet::new();
    for (case, bytes) in &cases {
        assert!(
            names.insert(case.name.clone()),
            "duplicate case name {}",
            case.name
        );
        let Some(expected) = &case.tap else { continue };
        let text = std::str::from_utf8(bytes)
            .unwrap_or_else(|_| panic!("{}: tap cases are UTF-8", case.name));
        let mut tap = ConnectionTap::new("CORPUS".into(), Some("ocpp1.6"));
        for _ in 0..case.send_times.unwrap_or(1) {
            let observation = match case.from.as_deref() {
                Some("upstream") => tap.from_central(text, 0),
                _ => tap.from_charger(text, 0),
            };
            assert_eq!(
                observation_label(&observation),
                expected,
                "{}: {observation:?}",
                case.name
            );
        }
    }
}

/// `/metrics` as `series → value`, labels in sorted order so manifest keys compare equal.
async fn metrics(admin: SocketAddr) -> BTreeMap<String, f64> {
    let body = within(STEP, "GET /metrics", async {
        let mut stream = TcpStream::connect(admin).await.expect("connect admin");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write GET /metrics");
        let mut body = Vec::new();
        stream.read_to_end(&mut body).await.expect("read /metrics");
        String::from_utf8_lossy(&body).into_owned()
    })
    .await;
    body.lines()
        .filter(|l| l.starts_with("ocpp_lago_bridge_"))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((normalize_series(series), value.parse().ok()?))
        })
        .collect()
}

fn normalize_series(series: &str) -> String {
    let Some((name, labels)) = series.split_once('{') else {
        return series.to_string();
    };
    let mut labels: Vec<&str> = labels
        .trim_end_matches('}')
        .split(',')
        .filter(|l| !l.is_empty())
        .collect();
    labels.sort_unstable();
    format!("{name}{{{}}}", labels.join(","))
}

fn direction(case: &Case) -> &'static str {
    match case.from.as_deref() {
        Some("upstream") => "upstream_to_charger",
        _ => "charger_to_upstream",
    }
}

/// The sum of the series `selector` selects: same name, and at least its labels (a counter
/// may carry more labels than a case names, e.g. `action` beside `direction`).
fn selected(metrics: &BTreeMap<String, f64>, selector: &str) -> f64 {
    let (name, labels) = selector.split_once('{').unwrap_or((selector, "}"));
    let wanted: Vec<&str> = labels
        .trim_end_matches('}')
        .split(',')
        .filter(|l| !l.is_empty())
        .collect();
    metrics
        .iter()
        .filter(|(series, _)| {
            let (series_name, series_labels) = series.split_once('{').unwrap_or((series, "}"));
            let have: Vec<&str> = series_labels.trim_end_matches('}').split(',').collect();
            series_name == name && wanted.iter().all(|w| have.contains(w))
        })
        .map(|(_, value)| value)
        .sum()
}

/// What a case must have moved on `/metrics`.
fn expected_counters(case: &Case) -> Vec<String> {
    let mut counters = vec![normalize_series(&case.counter)];
    if let Some(outcome) = &case.tap {
        let dir = direction(case);
        counters.push(normalize_series(&format!(
            "ocpp_lago_bridge_tap_frames_total{{direction=\"{dir}\",outcome=\"{outcome}\"}}"
        )));
    }
    counters
}

/// A bridge under test with its sentinel: a charger connected before any case, which must keep
/// relaying both ways after each case.
struct Subject {
    bridge: Bridge,
    sentinel: ClientWs,
    sentinel_calls: usize,
}

impl Subject {
    async fn start(recorder: &Recorder, proxy_toml: &str) -> Subject {
        let bridge = Bridge::start_with_proxy(&recorder.url_base(), proxy_toml, "").await;
        let url = bridge.charger_url("CORPUS-SENTINEL");
        let (sentinel, _) = within(
            STEP,
            "sentinel connect",
            ws::connect(&url, &["ocpp1.6"], None),
        )
        .await
        .expect("the sentinel connects");
        let mut subject = Subject {
            bridge,
            sentinel,
            sentinel_calls: 0,
        };
        subject.check_alive("startup").await;
        subject
    }

    /// The bridge runs and the sentinel's Heartbeat goes up and its answer comes back.
    async fn check_alive(&mut self, after: &str) {
        if let Some(status) = self.bridge.exited() {
            panic!(
                "bridge exited ({status}) after case {after}; stderr:\n{}",
                self.bridge.stderr()
            );
        }
        self.sentinel_calls += 1;
        let id = format!("sentinel-{}", self.sentinel_calls);
        let call = format!("[2,\"{id}\",\"Heartbeat\",{{}}]");
        within(
            STEP,
            "sentinel send",
            self.sentinel.send(Message::text(call)),
        )
        .await
        .unwrap_or_else(|e| panic!("after case {after}: sentinel send failed: {e}"));
        let reply = next_data(&mut self.sentinel)
            .await
            .unwrap_or_else(|| panic!("after case {after}: the sentinel connection ended"));
        assert_eq!(
            reply,
            Message::text(format!("[3,\"{id}\",{{}}]")),
            "after case {after}: the sentinel's answer"
        );
    }
}

/// The next text/binary/close message, skipping pings; `None` when the stream ends.
async fn next_data(ws: &mut ClientWs) -> Option<Message> {
    loop {
        match within(STEP, "next frame", ws.next()).await {
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(message)) => return Some(message),
            Some(Err(_)) | None => return None,
        }
    }
}

/// Reads until a close frame arrives; its code, or `None` if the stream ended without one.
async fn close_code(ws: &mut ClientWs) -> Option<u16> {
    loop {
        match next_data(ws).await? {
            Message::Close(frame) => return frame.map(|f| u16::from(f.code)),
            _ => continue,
        }
    }
}

fn data_message(case: &Case, bytes: &[u8]) -> Message {
    match case.kind.as_str() {
        "text" => Message::text(String::from_utf8(bytes.to_vec()).expect("text cases are UTF-8")),
        "binary" => Message::binary(bytes.to_vec()),
        "raw_frame" => {
            // Only upstream sends raw frames through tungstenite; chargers use a raw socket.
            let opcode = OpCode::Data(match case.opcode.unwrap_or(1) {
                2 => Data::Binary,
                _ => Data::Text,
            });
            Message::Frame(Frame::message(bytes.to_vec(), opcode, true))
        }
        other => panic!("{}: kind {other} is not a frame", case.name),
    }
}

fn recorder_log(recorder: &Recorder, id: &str) -> Option<ConnectionLog> {
    let suffix = format!("/{id}");
    recorder
        .connections()
        .into_iter()
        .find(|c| c.path.ends_with(&suffix))
}

async fn run_frame_case(subject: &mut Subject, recorder: &Recorder, case: &Case, bytes: &[u8]) {
    let id = charge_box_id(case);
    if case.kind == "raw_frame" && case.from.as_deref() != Some("upstream") {
        return run_raw_frame_case(subject, case, bytes).await;
    }
    let (mut charger, _) = within(
        STEP,
        "case connect",
        ws::connect(&subject.bridge.charger_url(&id), &["ocpp1.6"], None),
    )
    .await
    .unwrap_or_else(|e| panic!("{}: connect: {e}", case.name));
    let times = case.send_times.unwrap_or(1);
    let expect = case.expect.as_str();
    if case.from.as_deref() == Some("upstream") {
        // The recorder sent the case's frames right after the upgrade.
        if expect == "relayed" {
            let sent = data_message(case, bytes);
            for i in 0..times {
                let got = next_data(&mut charger)
                    .await
                    .unwrap_or_else(|| panic!("{}: no frame {i}", case.name));
                assert!(
                    got == sent,
                    "{}: frame {i} reached the charger changed ({} bytes)",
                    case.name,
                    got.len()
                );
            }
            // The connection still works after the case: a CALL goes up and its answer comes back.
            charger
                .send(Message::text("[2,\"after\",\"Heartbeat\",{}]"))
                .await
                .expect("send after");
            let answer = next_data(&mut charger).await;
            assert_eq!(
                answer,
                Some(Message::text("[3,\"after\",{}]")),
                "{}: answer after the case",
                case.name
            );
        } else if let Some(code) = expect.strip_prefix("upstream_close ") {
            let code: u16 = code.parse().expect("close code");
            assert_eq!(
                close_code(&mut charger).await,
                Some(1011),
                "{}: the charger is told upstream failed",
                case.name
            );
            let log = poll_until(STEP, || {
                recorder_log(recorder, &id).filter(|c| c.close_received.is_some())
            })
            .await;
            let got = log.and_then(|c| c.close_received).map(|(code, _)| code);
            assert_eq!(
                got,
                Some(code),
                "{}: close code upstream received",
                case.name
            );
        } else {
            panic!("{}: unknown expectation {expect}", case.name);
        }
        return;
    }

    let message = data_message(case, bytes);
    if expect == "relayed" {
        for _ in 0..times {
            within(STEP, "case send", charger.send(message.clone()))
                .await
                .unwrap_or_else(|e| panic!("{}: send: {e}", case.name));
        }
        let after = Message::text("[2,\"after\",\"Heartbeat\",{}]");
        within(STEP, "send after", charger.send(after.clone()))
            .await
            .expect("send after the case");
        let log = poll_until(STEP, || {
            recorder_log(recorder, &id).filter(|c| c.frames.len() > times)
        })
        .await;
        let log =
            log.unwrap_or_else(|| panic!("{}: upstream did not receive the frames", case.name));
        for (i, got) in log.frames[..times].iter().enumerate() {
            assert!(
                *got == message,
                "{}: frame {i} reached upstream changed ({} bytes)",
                case.name,
                got.len()
            );
        }
        assert_eq!(
            log.frames[times], after,
            "{}: the connection relays after the case",
            case.name
        );
    } else if let Some(code) = expect.strip_prefix("close ") {
        let code: u16 = code.parse().expect("close code");
        // Send and read at once: a bridge that refuses a 10 MiB frame stops reading it.
        let (mut tx, mut rx) = charger.split();
        let sending = tokio::spawn(async move {
            let _ = tx.send(message).await;
            tx
        });
        let got = within(STEP, "close frame", async {
            loop {
                match rx.next().await {
                    Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await;
        sending.abort();
        assert_eq!(
            got,
            Some(code),
            "{}: close code the charger received",
            case.name
        );
        let log = recorder_log(recorder, &id);
        assert!(
            log.is_none_or(|c| c.frames.is_empty()),
            "{}: a refused frame must not reach upstream",
            case.name
        );
    } else {
        panic!("{}: unknown expectation {expect}", case.name);
    }
}

/// A websocket frame written by hand (tungstenite refuses to send invalid UTF-8 as text).
fn raw_frame(case: &Case, payload: &[u8]) -> Vec<u8> {
    let opcode = case.opcode.unwrap_or(1) & 0x0f;
    let rsv = case.rsv.unwrap_or(0) & 0x07;
    let masked = case.masked.unwrap_or(true);
    let len = case.claimed_len.unwrap_or(payload.len() as u64);
    let mut out = vec![0x80 | (rsv << 4) | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    let key = [0x37, 0xfa, 0x21, 0x3d];
    if masked {
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Upgrade by hand on a raw socket; returns the socket after the `101`.
async fn raw_upgrade(proxy: SocketAddr, id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).await.expect("connect the proxy");
    let request = format!(
        "GET {PATH_PREFIX}/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: ocpp1.6\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write the upgrade");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte so no frame byte after the head is consumed; bounded by the head size.
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        if stream.read(&mut byte).await.expect("read the 101") == 0 {
            break;
        }
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "raw upgrade refused: {}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Reads server frames (unmasked) until a close frame; its code, `None` on EOF first.
async fn raw_close_code(stream: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Parse whatever complete frames are buffered.
        while buf.len() >= 2 {
            let opcode = buf[0] & 0x0f;
            let (len, at) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < at + len {
                break;
            }
            if opcode == 8 {
                return (len >= 2).then(|| u16::from_be_bytes([buf[at], buf[at + 1]]));
            }
            buf.drain(..at + len);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn run_raw_frame_case(subject: &mut Subject, case: &Case, bytes: &[u8]) {
    let id = charge_box_id(case);
    let mut stream = within(
        STEP,
        "raw upgrade",
        raw_upgrade(subject.bridge.proxy_addr, &id),
    )
    .await;
    let frame = raw_frame(case, bytes);
    // A claimed length larger than the bytes sent: the header alone must be refused.
    let _ = stream.write_all(&frame).await;
    let code: u16 = case
        .expect
        .strip_prefix("close ")
        .and_then(|c| c.parse().ok())
        .expect("close N");
    let got = within(STEP, "raw close", raw_close_code(&mut stream)).await;
    assert_eq!(
        got,
        Some(code),
        "{}: close code on the raw socket",
        case.name
    );
}

async fn run_handshake_case(subject: &Subject, case: &Case, bytes: &[u8]) {
    let mut stream = TcpStream::connect(subject.bridge.proxy_addr)
        .await
        .expect("connect the proxy");
    let started = Instant::now();
    let (mut rx, mut tx) = stream.split();
    let writing = async {
        match case.dribble_ms {
            // Slowloris: each byte well within the timeout, the whole head far beyond it.
            Some(ms) => {
                for byte in bytes {
                    if tx.write_all(std::slice::from_ref(byte)).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
            None => {
                let _ = tx.write_all(bytes).await;
            }
        }
        if case.half_close == Some(true) {
            let _ = tx.shutdown().await;
        }
        // Then keep the socket open; the read side decides when the case is over.
        std::future::pending::<()>().await;
    };
    let reading = async {
        let mut response = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return response,
                Ok(n) => response.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let response = within(STEP, "handshake answer", async {
        tokio::select! {
            response = reading => response,
            _ = writing => unreachable!("the writer never ends"),
        }
    })
    .await;
    let response = String::from_utf8_lossy(&response);
    if let Some(status) = case.expect.strip_prefix("http ") {
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status} ")),
            "{}: expected HTTP {status}, got {response:?}",
            case.name
        );
    } else if case.expect == "no_response" {
        assert!(
            response.is_empty(),
            "{}: expected no answer, got {response:?}",
            case.name
        );
        if case.counter.contains("handshake_timeout") {
            assert!(
                started.elapsed() >= Duration::from_millis(450),
                "{}: closed before the timeout",
                case.name
            );
        }
    } else {
        panic!("{}: unknown expectation {}", case.name, case.expect);
    }
}

async fn run_case(subject: &mut Subject, recorder: &Recorder, case: &Case, bytes: &[u8]) {
    let counters = expected_counters(case);
    let before = metrics(subject.bridge.admin_addr).await;
    match case.kind.as_str() {
        "handshake" => run_handshake_case(subject, case, bytes).await,
        _ => run_frame_case(subject, recorder, case, bytes).await,
    }
    // Counters are bumped when the connection task gets there: poll briefly.
    let admin = subject.bridge.admin_addr;
    let deadline = Instant::now() + STEP;
    let mut after = metrics(admin).await;
    loop {
        let missing: Vec<&String> = counters
            .iter()
            .filter(|c| selected(&after, c) <= selected(&before, c))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: counters did not increase: {missing:?}",
            case.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = metrics(admin).await;
    }
    subject.check_alive(&case.name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_corpus_case_is_relayed_or_refused_without_harming_other_connections() {
    let started = Instant::now();
    let cases = load_cases();
    let mut to_chargers = BTreeMap::new();
    for (case, bytes) in &cases {
        if case.from.as_deref() == Some("upstream") {
            let frames = vec![data_message(case, bytes); case.send_times.unwrap_or(1)];
            to_chargers.insert(charge_box_id(case), frames);
        }
    }
    let recorder = Recorder::start(Script {
        echo_callresult: true,
        send_on_open_to: to_chargers,
        ..Script::default()
    })
    .await;
    let mut small = Subject::start(&recorder, SMALL_PROXY).await;
    let mut default = Subject::start(&recorder, "").await;
    for (case, bytes) in &cases {
        let subject = match case.bridge.as_deref() {
            Some("default") => &mut default,
            _ => &mut small,
        };
        let case_started = Instant::now();
        run_case(subject, &recorder, case, bytes).await;
        eprintln!(
            "corpus case {} ok in {:?}",
            case.name,
            case_started.elapsed()
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the corpus took {:?}",
        started.elapsed()
    );
}
