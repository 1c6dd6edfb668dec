//! Acceptance tests of issue 3: the bridge as a transparent OCPP-J relay between chargers and
//! SteVe, exercised through its built binary over loopback sockets.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::bridge::{Bridge, check_config};
use crate::support::peers::{
    CentralOptions, CentralSystem, Implementation, actions, assert_full_flow, run_charger,
};
use crate::support::recorder::{Handshake, Recorder, Script, Subprotocol};
use crate::support::ws::{self, ClientWs};
use crate::support::{PATH_PREFIX, net, within};

const PEER_LIMIT: Duration = Duration::from_secs(60);
const STEP: Duration = Duration::from_secs(10);

async fn full_flow_through_bridge(implementation: Implementation, charge_box_id: &str) {
    let central = CentralSystem::start(
        implementation,
        CentralOptions {
            initiate_calls: true,
            ..Default::default()
        },
    )
    .await;
    let bridge = Bridge::start(&central.url_base()).await;
    let run = run_charger(
        implementation,
        &bridge.charger_base_url(),
        charge_box_id,
        &["--sessions", "2", "--expect-central-calls"],
        PEER_LIMIT,
    )
    .await;
    if !run.status.success() {
        eprintln!("bridge stderr:\n{}", bridge.stderr());
    }
    assert_full_flow(&run, &central, charge_box_id, 2, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_ocpp_charge_point_and_central_system_complete_every_flow_through_the_bridge() {
    full_flow_through_bridge(Implementation::Python, "IT-PY-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocpp_rpc_strict_charger_and_server_complete_every_flow_through_the_bridge() {
    full_flow_through_bridge(Implementation::OcppRpc, "IT-RPC-1").await;
}

/// Frames a relay that parses, trims or re-encodes would change.
fn awkward_frames(tag: &str) -> Vec<Message> {
    let one_mib_payload = "x".repeat(1 << 20);
    let mut frames = vec![
        Message::text(format!("[2 ,  \"{tag}-sp\" ,\t\"Heartbeat\" ,{{ }} ]\n")),
        Message::text(format!(
            "[2,\"{tag}-u\",\"DataTransfer\",{{\"vendorId\":\"Ünïcødé ⚡ 充电 🚗\",\"data\":\"\\u00e9 vs é\"}}]"
        )),
        Message::text(format!(
            "[2,\"{tag}-big\",\"DataTransfer\",{{\"vendorId\":\"big\",\"data\":\"{one_mib_payload}\"}}]"
        )),
        Message::text("{this is not json]"),
        Message::text(format!(
            "[2,\"{tag}-trunc\",\"MeterValues\",{{\"connectorId\":1,"
        )),
        Message::text(format!(
            "[3,\"{tag}-num\",{{\"b\":1.0e3,\"a\":-0.0,\"b\":2}}]"
        )),
        Message::text(" "),
    ];
    // Many small frames in a row: order must be kept.
    frames.extend(
        (0..200).map(|i| Message::text(format!("[2,\"{tag}-seq-{i}\",\"Heartbeat\",{{}}]"))),
    );
    frames
}

async fn next_data_frame(charger: &mut ClientWs) -> Message {
    loop {
        let message = within(STEP, "next frame from the bridge", charger.next())
            .await
            .expect("the bridge closed the charger's stream early")
            .expect("read a frame from the bridge");
        match message {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_arrive_byte_identical_in_both_directions() {
    let to_charger = awkward_frames("down");
    let recorder = Recorder::start(Script {
        send_on_open: to_charger.clone(),
        ..Script::default()
    })
    .await;
    let bridge = Bridge::start(&recorder.url_base()).await;
    let (mut charger, _) = within(
        STEP,
        "connect",
        ws::connect(&bridge.charger_url("IT-BYTES"), &["ocpp1.6"], None),
    )
    .await
    .expect("bridge accepts the charger");

    let to_steve = awkward_frames("up");
    for frame in &to_steve {
        within(STEP, "send", charger.send(frame.clone()))
            .await
            .expect("send to the bridge");
    }
    let log = recorder
        .wait_for_frames(0, to_steve.len(), Duration::from_secs(30))
        .await;
    assert_eq!(log.frames.len(), to_steve.len(), "frames upstream received");
    for (i, (got, sent)) in log.frames.iter().zip(&to_steve).enumerate() {
        assert!(
            got == sent,
            "frame {i} upstream differs: sent {} bytes, got {} bytes",
            sent.len(),
            got.len()
        );
    }

    for (i, sent) in to_charger.iter().enumerate() {
        let got = next_data_frame(&mut charger).await;
        assert!(
            &got == sent,
            "frame {i} to the charger differs: sent {} bytes, got {} bytes",
            sent.len(),
            got.len()
        );
    }
}

/// Issue 16: both directions of one connection are pumped by one task, the socket polled before
/// the clock. Both ends flood at once (sequence-numbered frames, every 50th of 256 KiB so the
/// socket buffers fill and sends wait): every frame arrives in order and unchanged, neither
/// direction starves the other, and the charger's close then reaches upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_in_both_directions_at_once_arrives_in_order_and_unchanged() {
    const FRAMES: usize = 2000;
    let flood = |tag: &str| -> Vec<Message> {
        (0..FRAMES)
            .map(|i| {
                let data = if i % 50 == 49 { "y".repeat(256 * 1024) } else { format!("{i:0>40}") };
                Message::text(format!(
                    "[2,\"{tag}-{i}\",\"DataTransfer\",{{\"vendorId\":\"flood\",\"data\":\"{data}\"}}]"
                ))
            })
            .collect()
    };
    let to_charger = flood("down");
    let recorder = Recorder::start(Script {
        send_on_open: to_charger.clone(),
        ..Script::default()
    })
    .await;
    let bridge = Bridge::start(&recorder.url_base()).await;
    let (charger, _) = within(
        STEP,
        "connect",
        ws::connect(&bridge.charger_url("IT-FLOOD"), &["ocpp1.6"], None),
    )
    .await
    .expect("bridge accepts the charger");
    let (mut tx, mut rx) = charger.split();

    let to_steve = flood("up");
    let sending = {
        let to_steve = to_steve.clone();
        async move {
            for frame in to_steve {
                tx.send(frame).await.expect("send to the bridge");
            }
            tx
        }
    };
    let receiving = async {
        let mut got = Vec::with_capacity(FRAMES);
        while got.len() < FRAMES {
            match rx.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(message)) => got.push(message),
                other => panic!(
                    "the charger's stream ended after {} frames: {other:?}",
                    got.len()
                ),
            }
        }
        got
    };
    let (tx, got) = within(Duration::from_secs(60), "both floods", async {
        tokio::join!(sending, receiving)
    })
    .await;
    for (i, (got, sent)) in got.iter().zip(&to_charger).enumerate() {
        assert!(
            got == sent,
            "frame {i} to the charger differs or is out of order"
        );
    }
    let log = recorder
        .wait_for_frames(0, FRAMES, Duration::from_secs(60))
        .await;
    assert_eq!(log.frames.len(), FRAMES, "frames upstream received");
    for (i, (got, sent)) in log.frames.iter().zip(&to_steve).enumerate() {
        assert!(got == sent, "frame {i} upstream differs or is out of order");
    }

    let mut charger = tx.reunite(rx).expect("halves of one socket");
    assert_close_reaches_upstream(&mut charger, &recorder, 4003, "flood over").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charger_gets_the_subprotocol_upstream_chose_from_its_offer() {
    // The recorder picks the second offer, so a bridge answering on its own cannot pass.
    let recorder = Recorder::start(Script {
        subprotocol: Subprotocol::Fixed("ocpp1.5".into()),
        ..Script::default()
    })
    .await;
    let bridge = Bridge::start(&recorder.url_base()).await;
    let (_charger, response) = within(
        STEP,
        "connect",
        ws::connect(
            &bridge.charger_url("IT-PROTO"),
            &["ocpp1.6", "ocpp1.5", "ocpp1.2"],
            None,
        ),
    )
    .await
    .expect("bridge accepts the charger");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"ocpp1.5"[..])
    );
    let offered = recorder.handshakes()[0]
        .header("sec-websocket-protocol")
        .expect("offer forwarded upstream");
    let offered: Vec<&str> = offered.split(',').map(str::trim).collect();
    assert_eq!(
        offered,
        ["ocpp1.6", "ocpp1.5", "ocpp1.2"],
        "the charger's offer, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_and_percent_encoded_id_reach_upstream_unchanged() {
    let recorder = Recorder::start(Script::default()).await;
    let bridge = Bridge::start(&recorder.url_base()).await;
    // "CP/7 x:" percent-encoded; SteVe basic auth has username = chargeBoxId.
    let charge_box_id = "CP%2F7%20x%3A";
    let authorization = "Basic Q1AvNyB4OjpzM2NyM3Q=";
    let (_charger, _) = within(
        STEP,
        "connect",
        ws::connect(
            &bridge.charger_url(charge_box_id),
            &["ocpp1.6"],
            Some(authorization),
        ),
    )
    .await
    .expect("bridge accepts the charger");
    let seen = &recorder.handshakes()[0];
    assert_eq!(seen.header("authorization").as_deref(), Some(authorization));
    assert_eq!(seen.path, format!("{PATH_PREFIX}/{charge_box_id}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refusal_status_is_passed_to_the_charger() {
    for status in [404u16, 401] {
        let recorder = Recorder::start(Script {
            handshake: Handshake::Refuse(status),
            ..Script::default()
        })
        .await;
        let bridge = Bridge::start(&recorder.url_base()).await;
        let result = within(
            STEP,
            "connect",
            ws::connect(&bridge.charger_url("IT-UNKNOWN"), &["ocpp1.6"], None),
        )
        .await;
        assert_eq!(
            ws::refusal_status(&result),
            Ok(status),
            "charger's answer when upstream refuses with {status}"
        );
        assert_eq!(
            recorder.handshakes().len(),
            1,
            "the bridge dialled upstream exactly once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gives_502_at_once() {
    let bridge = Bridge::start(&format!("ws://{}{PATH_PREFIX}", net::dead_addr())).await;
    let started = Instant::now();
    let result = within(
        STEP,
        "connect",
        ws::connect(&bridge.charger_url("IT-DOWN"), &["ocpp1.6"], None),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(ws::refusal_status(&result), Ok(502));
    assert!(
        elapsed < Duration::from_secs(2),
        "502 took {elapsed:?}: no retries while the charger waits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_handshake_timeout_gives_504() {
    let recorder = Recorder::start(Script {
        handshake: Handshake::Hang,
        ..Script::default()
    })
    .await;
    let bridge = Bridge::start(&recorder.url_base()).await;
    let started = Instant::now();
    // Default upstream handshake timeout is 5 s.
    let result = within(
        Duration::from_secs(15),
        "connect",
        ws::connect(&bridge.charger_url("IT-HANG"), &["ocpp1.6"], None),
    )
    .await;
    assert_eq!(
        ws::refusal_status(&result),
        Ok(504),
        "after {:?}",
        started.elapsed()
    );
    assert!(recorder.tcp_accepted() >= 1, "the bridge dialled upstream");
}

async fn read_until_close(charger: &mut ClientWs) -> Option<CloseFrame> {
    for _ in 0..1000 {
        match within(STEP, "close from the bridge", charger.next()).await {
            Some(Ok(Message::Close(frame))) => return frame,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("charger stream failed before a close frame: {e}"),
            None => panic!("charger stream ended without a close frame"),
        }
    }
    panic!("no close frame within 1000 frames");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_close_code_and_reason_reach_the_charger() {
    let recorder = Recorder::start(Script {
        close_after: Some((1, 4001, "bye from steve".into())),
        ..Script::default()
    })
    .await;
    let bridge = Bridge::start(&recorder.url_base()).await;
    let (mut charger, _) = within(
        STEP,
        "connect",
        ws::connect(&bridge.charger_url("IT-CLOSE"), &["ocpp1.6"], None),
    )
    .await
    .expect("bridge accepts the charger");
    charger
        .send(Message::text("[2,\"c1\",\"Heartbeat\",{}]"))
        .await
        .expect("send");
    let frame = read_until_close(&mut charger)
        .await
        .expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), 4001);
    assert_eq!(frame.reason.as_str(), "bye from steve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charger_close_code_and_reason_reach_upstream() {
    let recorder = Recorder::start(Script::default()).await;
    let bridge = Bridge::start(&recorder.url_base()).await;
    let (mut charger, _) = within(
        STEP,
        "connect",
        ws::connect(&bridge.charger_url("IT-LEAVE"), &["ocpp1.6"], None),
    )
    .await
    .expect("bridge accepts the charger");
    assert_close_reaches_upstream(&mut charger, &recorder, 4002, "charger rebooting").await;
}

/// The charger closes with `code` and `reason`; the recorded upstream connection ends having
/// received exactly that close.
async fn assert_close_reaches_upstream(
    charger: &mut ClientWs,
    recorder: &Recorder,
    code: u16,
    reason: &str,
) {
    let leaving = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    within(STEP, "close", charger.close(Some(leaving)))
        .await
        .expect("send close");
    let log = recorder
        .wait_for_end(0, STEP)
        .await
        .expect("upstream connection ended");
    assert_eq!(log.close_received, Some((code, reason.to_owned())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_chargers_each_complete_a_session() {
    const CHARGERS: usize = 1000;
    // Each charger costs a socket in the peer, two in the bridge and one in the central system;
    // children inherit this limit.
    let limit = net::raise_fd_limit(8192);
    assert!(
        limit >= 4 * CHARGERS as u64 + 256,
        "open-file limit {limit} is too low for {CHARGERS} chargers"
    );
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let bridge = Bridge::start(&central.url_base()).await;
    let started = Instant::now();
    let run = run_charger(
        Implementation::Python,
        &bridge.charger_base_url(),
        "IT-K",
        &[
            "--connections",
            &CHARGERS.to_string(),
            "--sessions",
            "1",
            "--meter-values",
            "2",
        ],
        Duration::from_secs(90),
    )
    .await;
    if !run.status.success() {
        eprintln!(
            "bridge stderr (tail):\n{}",
            bridge
                .stderr()
                .lines()
                .rev()
                .take(50)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    run.assert_ok("1000 chargers");
    assert_eq!(run.summary["ok_connections"], CHARGERS);
    assert_eq!(run.summary["transactions"], CHARGERS);
    let events = central
        .wait_for_events(STEP, |events| {
            events
                .iter()
                .filter(|e| e["event"] == "call_received" && e["action"] == "StopTransaction")
                .count()
                >= CHARGERS
        })
        .await;
    for i in [0, CHARGERS / 2, CHARGERS - 1] {
        let id = format!("IT-K-{i}");
        assert_eq!(
            actions(&events, "call_received", &id),
            [
                "BootNotification",
                "Heartbeat",
                "StartTransaction",
                "MeterValues",
                "MeterValues",
                "StopTransaction"
            ],
            "{id}"
        );
    }
    let stops = events
        .iter()
        .filter(|e| e["event"] == "call_received" && e["action"] == "StopTransaction")
        .count();
    assert_eq!(
        stops, CHARGERS,
        "StopTransactions the central system received"
    );
    eprintln!(
        "{CHARGERS} chargers through the bridge in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_lists_three_independent_mistakes_and_exits_78() {
    // Three mistakes in three sections, none hiding another: an unknown key, an address that
    // does not parse, a mode outside its enum. Each must be named by its key path.
    let config = r#"
[proxy]
listen = "127.0.0.1:8180"
lisen = "127.0.0.1:8181"

[billing]
mode = "weekly"

[admin]
listen = "not an address"
"#;
    let output = check_config(config).await;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(78), "exit code; output:\n{said}");
    for key_path in ["proxy.lisen", "billing.mode", "admin.listen"] {
        assert!(
            said.contains(key_path),
            "check-config did not mention {key_path}; output:\n{said}"
        );
    }
}

/// A charger that stops answering pings (its modem died, the socket stays half-open) is found
/// dead after `ping_interval + pong_timeout` and SteVe is told it went away; a charger that only
/// stays silent but answers pings is kept alive, however long it says nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charger_that_stops_answering_pings_is_closed_and_a_silent_live_one_is_kept() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let recorder = Recorder::start(Script::default()).await;
    let bridge = Bridge::start_with_proxy(
        &recorder.url_base(),
        "ping_interval = \"200ms\"\npong_timeout = \"300ms\"",
        "",
    )
    .await;

    // Live but silent: tokio-tungstenite answers the bridge's pings while it is polled.
    let (mut live, _) = ws::connect(&bridge.charger_url("CP-LIVE"), &["ocpp1.6"], None)
        .await
        .expect("live charger connects");
    let live_reader = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            if tokio::time::timeout(Duration::from_millis(100), live.next())
                .await
                .is_ok_and(|m| m.is_none_or(|m| m.is_err() || m.is_ok_and(|m| m.is_close())))
            {
                return (live, false);
            }
        }
        (live, true)
    });

    // Dead: the upgrade is completed by hand, then nothing is ever read or answered.
    let mut dead = tokio::net::TcpStream::connect(bridge.proxy_addr)
        .await
        .expect("connect");
    let request = format!(
        "GET {PATH_PREFIX}/CP-DEAD HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: ocpp1.6\r\n\r\n"
    );
    dead.write_all(request.as_bytes()).await.expect("upgrade");
    let mut head = [0u8; 12];
    dead.read_exact(&mut head).await.expect("101 answer");
    assert_eq!(&head, b"HTTP/1.1 101");

    let dead_index = within(
        Duration::from_secs(5),
        "upstream connection of CP-DEAD",
        async {
            loop {
                if let Some(i) = recorder
                    .connections()
                    .iter()
                    .position(|c| c.path.ends_with("/CP-DEAD"))
                {
                    return i;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    let started = Instant::now();
    let log = recorder
        .wait_for_end(dead_index, Duration::from_secs(5))
        .await
        .expect("the dead charger's upstream connection is closed");
    assert_eq!(
        log.close_received.as_ref().map(|(code, _)| *code),
        Some(1001),
        "SteVe is told the charger went away: {log:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    let (_live, stayed) = live_reader.await.expect("live reader");
    assert!(stayed, "a charger answering pings is kept while silent");
    let live_index = recorder
        .connections()
        .iter()
        .position(|c| c.path.ends_with("/CP-LIVE"))
        .expect("live upstream connection");
    assert!(
        !recorder.connections()[live_index].ended,
        "the live charger's upstream stays"
    );
    drop(dead);
}
