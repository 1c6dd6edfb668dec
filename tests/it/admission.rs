//! Acceptance tests of issue 17 items 6 and 7: admission that stalled clients cannot starve
//! (admin listener, pending handshakes, file descriptors) and a handshake relayed exactly.
//! Real daemon, real loopback sockets; every flood bounded in count and time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::admin::scrape;
use crate::support::bridge::{Bridge, BridgeOptions};
use crate::support::recorder::{Handshake, Recorder, Script, Subprotocol};
use crate::support::ws;
use crate::support::{PATH_PREFIX, net, poll_until, within};

const STEP: Duration = Duration::from_secs(10);

/// A complete upgrade request head for `target`, with `extra` header lines (raw bytes, each
/// ending in CRLF).
fn upgrade_head(target: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut head = b"GET ".to_vec();
    head.extend_from_slice(target);
    head.extend_from_slice(
        b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    );
    head.extend_from_slice(extra);
    head.extend_from_slice(b"\r\n");
    head
}

/// What came back for a raw upgrade request.
struct Answer {
    status: u16,
    head: String,
    /// The body of a refusal; for a 101, the bytes read after the head.
    rest: Vec<u8>,
    stream: TcpStream,
}

/// Sends `head` on a new connection to `addr` and reads the answer head (and, unless it is a
/// 101, the body up to the close).
async fn raw_handshake(addr: SocketAddr, head: &[u8]) -> Answer {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(head).await.expect("send the request head");
        let mut buf = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("read the answer");
            assert!(
                n > 0,
                "closed without an answer; got {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut rest = buf[end..].to_vec();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        if status != 101 {
            let _ = stream.read_to_end(&mut rest).await;
        }
        Answer {
            status,
            head,
            rest,
            stream,
        }
    };
    within(STEP, "raw handshake", exchange).await
}

/// A connection that sent part of an upgrade request and then nothing more.
async fn stalled(addr: SocketAddr, charge_box_id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect a stalled client");
    let partial = format!("GET {PATH_PREFIX}/{charge_box_id} HTTP/1.1\r\nHost: x\r\n");
    stream
        .write_all(partial.as_bytes())
        .await
        .expect("send half a request");
    stream
}

/// What a stalled connection sees within `wait`: `Some(bytes)` once the bridge closed it
/// (what it said first), `None` if it is still open.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let mut said = Vec::new();
    let read = tokio::time::timeout(wait, async {
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => said.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| said)
}

fn echo() -> Script {
    Script {
        echo_callresult: true,
        ..Script::default()
    }
}

async fn assert_relays<S>(charger: &mut WebSocketStream<S>, id: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let call = format!(r#"[2,"{id}","Heartbeat",{{}}]"#);
    charger
        .send(Message::text(call))
        .await
        .expect("send a CALL");
    let reply = within(STEP, "the echoed CALLRESULT", charger.next())
        .await
        .expect("a reply")
        .expect("a frame");
    assert_eq!(reply, Message::text(format!(r#"[3,"{id}",{{}}]"#)));
}

fn counter(metrics: &crate::support::admin::Metrics, outcome: &str) -> f64 {
    metrics.sum("ocpp_lago_bridge_handshakes_total", &[("outcome", outcome)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upgrade_requests_take_no_charger_slot() {
    // The probe's figures: max_connections = 100 and 100 stalled upgrade requests from one
    // address locked a real charger out for handshake_timeout (10 s).
    let recorder = Recorder::start(echo()).await;
    let bridge = Bridge::start_with_proxy(
        &recorder.url_base(),
        "max_connections = 100\nhandshake_timeout = \"10s\"",
        "",
    )
    .await;
    let mut flood = Vec::new();
    for n in 0..100 {
        flood.push(stalled(bridge.proxy_addr, &format!("STALL-{n}")).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (mut charger, _) = within(
        Duration::from_secs(2),
        "a real charger behind 100 stalled handshakes",
        ws::connect(&bridge.charger_url("REAL-1"), &["ocpp1.6"], None),
    )
    .await
    .expect("the real charger is admitted");
    let admitted_in = started.elapsed();
    assert_relays(&mut charger, "a1").await;
    eprintln!("admitted behind 100 stalled handshakes in {admitted_in:?}");
    // The stalled ones are still waiting for their own timeout, nothing closed them.
    for stream in flood.iter_mut().take(5) {
        assert_eq!(closed_within(stream, Duration::from_millis(50)).await, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_pending_handshakes_the_oldest_is_closed_never_the_new_one() {
    let recorder = Recorder::start(echo()).await;
    let bridge = Bridge::start_with_proxy(
        &recorder.url_base(),
        "max_pending_handshakes = 8\nhandshake_timeout = \"30s\"",
        "",
    )
    .await;
    let mut flood = Vec::new();
    for n in 0..20 {
        flood.push(stalled(bridge.proxy_addr, &format!("STALL-{n}")).await);
        // Registration order is accept order; give each its turn.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (mut charger, _) = within(
        Duration::from_secs(2),
        "a real charger behind 20 stalled handshakes",
        ws::connect(&bridge.charger_url("REAL-2"), &["ocpp1.6"], None),
    )
    .await
    .expect("the newest connection is never the one closed");
    eprintln!(
        "admitted at max_pending_handshakes in {:?}",
        started.elapsed()
    );
    assert_relays(&mut charger, "b1").await;

    // 20 stalled + the charger = 21 registrations into 8 places: the 13 oldest were closed
    // with a 503, the 7 newest still wait (their timeout is 30 s).
    let mut closed = Vec::new();
    for (n, stream) in flood.iter_mut().enumerate() {
        if let Some(said) = closed_within(stream, Duration::from_millis(300)).await {
            let said = String::from_utf8_lossy(&said).into_owned();
            assert!(said.starts_with("HTTP/1.1 503"), "stalled {n} got {said:?}");
            closed.push(n);
        }
    }
    assert_eq!(
        closed,
        (0..13).collect::<Vec<_>>(),
        "the oldest were closed"
    );
    let metrics = scrape(bridge.admin_addr).await;
    assert_eq!(counter(&metrics, "max_pending_handshakes"), 13.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_closes_half_sent_requests_and_caps_its_connections() {
    // The probe's flood: 600 half-sent requests, against the defaults (header_timeout = 5s,
    // max_connections = 64).
    net::raise_fd_limit(8192);
    let recorder = Recorder::start(echo()).await;
    let bridge = Bridge::start(&recorder.url_base()).await;
    let admin = bridge.admin_addr;
    let started = Instant::now();
    // One that sends nothing at all, then 599 that send half a request.
    let mut flood = vec![TcpStream::connect(admin).await.expect("connect to admin")];
    for _ in 1..600 {
        let mut stream = TcpStream::connect(admin).await.expect("connect to admin");
        // A refused one may be closed before this arrives; that is its answer.
        let _ = stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await;
        flood.push(stream);
    }
    let flooded_in = started.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The cap: past 64 open, each is answered 503 at once instead of holding a descriptor.
    let mut held = Vec::new();
    for (n, mut stream) in flood.into_iter().enumerate() {
        match closed_within(&mut stream, Duration::from_millis(20)).await {
            None => held.push((n, stream)),
            Some(said) => {
                let said = String::from_utf8_lossy(&said).into_owned();
                assert!(
                    said.starts_with("HTTP/1.1 503"),
                    "admin connection {n}: {said:?}"
                );
            }
        }
    }
    let held_ids: Vec<usize> = held.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        held_ids,
        (0..64).collect::<Vec<_>>(),
        "the first 64 are served"
    );

    // The header timeout: every half-sent (and the silent) connection is closed after 5 s.
    for (n, stream) in &mut held {
        let left = Duration::from_secs(7).saturating_sub(started.elapsed());
        assert!(
            closed_within(stream, left).await.is_some(),
            "admin connection {n} still open {:?} after its half request",
            started.elapsed()
        );
    }
    let all_closed_in = started.elapsed();
    eprintln!(
        "600 half-sent admin requests (sent in {flooded_in:?}): 536 refused at once, 64 closed within {all_closed_in:?}"
    );
    assert!(
        all_closed_in >= Duration::from_millis(4500),
        "{all_closed_in:?}"
    );

    let (status, _) = crate::support::admin::get(admin, "/healthz").await;
    assert_eq!(status, 200);
    let metrics = scrape(admin).await;
    assert_eq!(
        metrics.sum("ocpp_lago_bridge_admin_connections_refused_total", &[]),
        536.0
    );
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd of the bridge")
        .count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_chargers_get_503_fds_exhausted_logged_once_a_second() {
    const FD_LIMIT: u64 = 96;
    let recorder = Recorder::start(echo()).await;
    let bridge = Bridge::start_opts(
        &recorder.url_base(),
        BridgeOptions {
            proxy_toml: "max_connections = 1000\nhandshake_timeout = \"30s\"".into(),
            fd_limit: Some(FD_LIMIT),
            ..Default::default()
        },
    )
    .await;
    // (96 - 64) / 2 = 16 chargers fit: the start says so.
    let warned = poll_until(Duration::from_secs(5), || {
        bridge
            .stderr()
            .contains("`proxy.max_connections` = 1000 needs about 2064 open files, but the open-file limit is 96")
            .then_some(())
    })
    .await;
    assert!(
        warned.is_some(),
        "no fd-limit warning:\n{}",
        bridge.stderr()
    );

    let (mut connected, _) = within(
        STEP,
        "a charger before the flood",
        ws::connect(&bridge.charger_url("BEFORE"), &["ocpp1.6"], None),
    )
    .await
    .expect("admitted");
    assert_relays(&mut connected, "c0").await;

    // Take every descriptor the bridge has left, and a few more wait in its backlog.
    let free = FD_LIMIT.saturating_sub(open_fds(bridge.pid()));
    let mut flood = Vec::new();
    for n in 0..free + 5 {
        flood.push(stalled(bridge.proxy_addr, &format!("FD-{n}")).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let exhausted_at = Instant::now();
    let log_lines_before = fds_exhausted_lines(&bridge.stderr());

    let mut refused_in = Vec::new();
    for n in 0..5 {
        let started = Instant::now();
        let result = within(
            Duration::from_secs(3),
            "a charger while the bridge has no descriptors",
            ws::connect(
                &bridge.charger_url(&format!("DURING-{n}")),
                &["ocpp1.6"],
                None,
            ),
        )
        .await;
        refused_in.push(started.elapsed());
        match result {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 503);
                let body =
                    String::from_utf8_lossy(response.body().as_deref().unwrap_or(&[])).into_owned();
                assert!(body.contains("file descriptors"), "{body:?}");
            }
            other => panic!("expected 503 fds_exhausted, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A connected charger goes on.
    assert_relays(&mut connected, "c1").await;
    let window = exhausted_at.elapsed();
    let lines = fds_exhausted_lines(&bridge.stderr()) - log_lines_before;
    eprintln!(
        "out of descriptors: 5 chargers refused in {refused_in:?}, {lines} log lines in {window:?}"
    );
    assert!(
        lines as f64 <= window.as_secs_f64().ceil() + 1.0,
        "{lines} fds_exhausted lines in {window:?}"
    );

    drop(flood);
    let (mut after, _) = within(STEP, "a charger once descriptors are free again", async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Ok(connected) =
                ws::connect(&bridge.charger_url("AFTER"), &["ocpp1.6"], None).await
            {
                return connected;
            }
        }
    })
    .await;
    assert_relays(&mut after, "c2").await;
    let metrics = scrape(bridge.admin_addr).await;
    assert!(counter(&metrics, "fds_exhausted") >= 5.0);
    assert_eq!(counter(&metrics, "upstream_unreachable"), 0.0);
}

fn fds_exhausted_lines(stderr: &str) -> usize {
    stderr
        .lines()
        .filter(|line| line.contains(r#""reason":"fds_exhausted""#))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subprotocol_offer_and_raw_authorization_reach_upstream_byte_for_byte() {
    // The recorder selects the offer from the second header: a bridge forwarding only the
    // first header would see SteVe pick something never offered.
    let recorder = Recorder::start(Script {
        subprotocol: Subprotocol::Fixed("ocpp1.6".into()),
        echo_callresult: true,
        ..Script::default()
    })
    .await;
    let bridge = Bridge::start(&recorder.url_base()).await;
    let authorization: &[u8] = b"Basic Q1AtUkFXOnP\xe4ss\xff";
    let mut extra = b"Sec-WebSocket-Protocol: ocpp2.0.1\r\nSec-WebSocket-Protocol: ocpp1.6\r\n\
                      Authorization: "
        .to_vec();
    extra.extend_from_slice(authorization);
    extra.extend_from_slice(b"\r\n");
    let target = format!("{PATH_PREFIX}/CP-RAW");
    let answer = raw_handshake(bridge.proxy_addr, &upgrade_head(target.as_bytes(), &extra)).await;
    assert_eq!(answer.status, 101, "{}", answer.head);
    assert!(
        answer.head.contains("Sec-WebSocket-Protocol: ocpp1.6\r\n"),
        "{}",
        answer.head
    );
    let seen = &recorder.handshakes()[0];
    let values = |name: &str| -> Vec<Vec<u8>> {
        seen.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(
        values("sec-websocket-protocol"),
        vec![b"ocpp2.0.1".to_vec(), b"ocpp1.6".to_vec()]
    );
    assert_eq!(values("authorization"), vec![authorization.to_vec()]);
    let mut charger =
        WebSocketStream::from_partially_read(answer.stream, answer.rest, Role::Client, None).await;
    assert_relays(&mut charger, "d1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_selecting_no_subprotocol_completes_the_handshake_without_one_as_direct() {
    let recorder = Recorder::start(Script {
        subprotocol: Subprotocol::None,
        echo_callresult: true,
        ..Script::default()
    })
    .await;
    let bridge = Bridge::start(&recorder.url_base()).await;
    let head = upgrade_head(
        format!("{PATH_PREFIX}/CP-NOPROTO").as_bytes(),
        b"Sec-WebSocket-Protocol: ocpp1.6\r\n",
    );
    // What a charger gets from the central system directly...
    let direct = raw_handshake(recorder.addr, &head).await;
    assert_eq!(direct.status, 101);
    assert!(
        !direct
            .head
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol")
    );
    // ...it gets through the bridge.
    let answer = raw_handshake(bridge.proxy_addr, &head).await;
    assert_eq!(answer.status, 101, "{}", answer.head);
    assert!(
        !answer
            .head
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol"),
        "{}",
        answer.head
    );
    let mut charger =
        WebSocketStream::from_partially_read(answer.stream, answer.rest, Role::Client, None).await;
    assert_relays(&mut charger, "e1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_targets_with_a_fragment_raw_space_control_or_non_ascii_bytes_get_400() {
    let recorder = Recorder::start(echo()).await;
    let bridge = Bridge::start(&recorder.url_base()).await;
    for id in [
        b"CPX#a".to_vec(),
        b"CP X".to_vec(),
        b"CP\x01X".to_vec(),
        b"CP\x7fX".to_vec(),
        b"CP\xffX".to_vec(),
        "CP\u{e9}X".as_bytes().to_vec(),
    ] {
        let mut target = format!("{PATH_PREFIX}/").into_bytes();
        target.extend_from_slice(&id);
        let answer = raw_handshake(bridge.proxy_addr, &upgrade_head(&target, b"")).await;
        assert_eq!(
            answer.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(&id),
            answer.head
        );
    }
    // (The bridge's readiness probe may open a bare TCP connection; no upgrade came.)
    assert_eq!(
        recorder.handshakes().len(),
        0,
        "no refused target was dialled"
    );
    // Percent-encoded, the same ids are forwarded unchanged.
    let target = format!("{PATH_PREFIX}/CPX%23a%20%C3%A9");
    let answer = raw_handshake(bridge.proxy_addr, &upgrade_head(target.as_bytes(), b"")).await;
    assert_eq!(answer.status, 101, "{}", answer.head);
    assert_eq!(recorder.handshakes()[0].path, target);
    let metrics = scrape(bridge.admin_addr).await;
    assert_eq!(counter(&metrics, "invalid_request_target"), 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies_name_no_internal_address() {
    let hung = Recorder::start(Script {
        handshake: Handshake::Hang,
        ..Script::default()
    })
    .await;
    let dead = net::dead_addr();
    let cases = [
        (
            format!("ws://{dead}{PATH_PREFIX}"),
            dead.to_string(),
            "",
            502,
        ),
        (
            hung.url_base(),
            hung.addr.to_string(),
            "upstream_handshake_timeout = \"300ms\"",
            504,
        ),
    ];
    for (upstream_url, address, proxy_toml, status) in cases {
        let bridge = Bridge::start_with_proxy(&upstream_url, proxy_toml, "").await;
        // Ids an HTTP library might refuse to put in a URL (and quote the URL in its error).
        for id in [
            "CP1", "CP\"1", "CP{1}", "CP|1", "CP^1", "CP`1", "CP\\1", "CP<1>",
        ] {
            let target = format!("{PATH_PREFIX}/{id}");
            let answer =
                raw_handshake(bridge.proxy_addr, &upgrade_head(target.as_bytes(), b"")).await;
            let body = String::from_utf8_lossy(&answer.rest).into_owned();
            assert_eq!(answer.status, status, "{id}: {body}");
            let port = address.rsplit(':').next().expect("a port");
            for secret in [address.as_str(), "127.0.0.1", port, "ws://", "os error"] {
                assert!(
                    !body.contains(secret) && !answer.head.contains(secret),
                    "{id}: the answer names {secret:?}: {}{body}",
                    answer.head
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_warns_only_when_max_connections_exceeds_the_fd_limit() {
    // The largest max_connections config accepts needs 20 million descriptors.
    let too_many =
        crate::support::bridge::check_config("[proxy]\nmax_connections = 10000000\n").await;
    let stderr = String::from_utf8_lossy(&too_many.stderr).into_owned();
    assert!(too_many.status.success(), "{stderr}");
    assert!(
        stderr.contains("`proxy.max_connections` = 10000000 needs about")
            && stderr.contains("but the open-file limit is"),
        "{stderr}"
    );
    // 0 derives max_connections from the limit: it always fits, nothing to warn about.
    let derived = crate::support::bridge::check_config("[proxy]\nmax_connections = 0\n").await;
    let stderr = String::from_utf8_lossy(&derived.stderr).into_owned();
    assert!(derived.status.success(), "{stderr}");
    assert!(!stderr.contains("open-file limit"), "{stderr}");
}
