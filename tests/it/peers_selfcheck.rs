//! The harness checks itself without the bridge: each peer against its counterpart and the
//! other implementation, and the recorder against a bare client. When a relay test fails,
//! these passing is what says the bridge, not the harness, is at fault.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::peers::{
    CentralOptions, CentralSystem, Implementation, assert_full_flow, run_charger,
};
use crate::support::recorder::{Handshake, Recorder, Script, Subprotocol};
use crate::support::{PATH_PREFIX, within, ws};

const PEER_LIMIT: Duration = Duration::from_secs(40);

async fn direct_flow(charger: Implementation, central: Implementation, charge_box_id: &str) {
    let central_system = CentralSystem::start(
        central,
        CentralOptions {
            initiate_calls: true,
            ..Default::default()
        },
    )
    .await;
    let run = run_charger(
        charger,
        &central_system.url_base(),
        charge_box_id,
        &["--sessions", "2", "--expect-central-calls"],
        PEER_LIMIT,
    )
    .await;
    assert_full_flow(&run, &central_system, charge_box_id, 2, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_charge_point_and_central_system_agree_directly() {
    direct_flow(Implementation::Python, Implementation::Python, "SELF-PY-PY").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocpp_rpc_charger_and_server_agree_directly() {
    direct_flow(
        Implementation::OcppRpc,
        Implementation::OcppRpc,
        "SELF-RPC-RPC",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_ocpp_rpc_peers_interoperate_directly() {
    direct_flow(
        Implementation::Python,
        Implementation::OcppRpc,
        "SELF-PY-RPC",
    )
    .await;
    direct_flow(
        Implementation::OcppRpc,
        Implementation::Python,
        "SELF-RPC-PY",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_systems_refuse_unknown_paths_with_404() {
    for implementation in [Implementation::Python, Implementation::OcppRpc] {
        let central = CentralSystem::start(implementation, CentralOptions::default()).await;
        let url = format!("ws://127.0.0.1:{}/not/steve/CP-1", central.port);
        let result = within(
            Duration::from_secs(10),
            "connect",
            ws::connect(&url, &["ocpp1.6"], None),
        )
        .await;
        assert_eq!(ws::refusal_status(&result), Ok(404), "{implementation:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_keeps_frames_and_headers_exactly() {
    let scripted = vec![
        Message::text("[3, \"x\" ,{ }]"),
        Message::binary(vec![0u8, 159, 146, 150]),
    ];
    let recorder = Recorder::start(Script {
        subprotocol: Subprotocol::Fixed("ocpp1.5".into()),
        send_on_open: scripted.clone(),
        ..Script::default()
    })
    .await;
    let url = format!("{}/SELF-REC", recorder.url_base());
    let (mut charger, response) = within(
        Duration::from_secs(10),
        "connect",
        ws::connect(
            &url,
            &["ocpp1.6", "ocpp1.5"],
            Some("Basic U0VMRi1SRUM6cHc="),
        ),
    )
    .await
    .expect("recorder accepts");
    assert_eq!(response.headers()["sec-websocket-protocol"], "ocpp1.5");
    let sent = vec![
        Message::text("not json {"),
        Message::text("[2,\"1\",\"Heartbeat\",{}]"),
    ];
    for frame in &sent {
        charger.send(frame.clone()).await.unwrap();
    }
    let log = recorder
        .wait_for_frames(0, sent.len(), Duration::from_secs(10))
        .await;
    assert_eq!(log.frames, sent);
    assert_eq!(log.path, format!("{PATH_PREFIX}/SELF-REC"));
    let seen = &recorder.handshakes()[0];
    assert_eq!(
        seen.header("authorization").as_deref(),
        Some("Basic U0VMRi1SRUM6cHc=")
    );
    assert_eq!(
        seen.header("sec-websocket-protocol").as_deref(),
        Some("ocpp1.6, ocpp1.5")
    );
    for expected in &scripted {
        let got = within(Duration::from_secs(10), "scripted frame", charger.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_refuses_and_hangs_on_command() {
    let refusing = Recorder::start(Script {
        handshake: Handshake::Refuse(401),
        ..Script::default()
    })
    .await;
    let result = ws::connect(&format!("{}/X", refusing.url_base()), &["ocpp1.6"], None).await;
    assert_eq!(ws::refusal_status(&result), Ok(401));

    let hanging = Recorder::start(Script {
        handshake: Handshake::Hang,
        ..Script::default()
    })
    .await;
    let attempt = tokio::time::timeout(
        Duration::from_millis(500),
        ws::connect(&format!("{}/X", hanging.url_base()), &["ocpp1.6"], None),
    )
    .await;
    assert!(
        attempt.is_err(),
        "a hanging recorder must not answer the upgrade"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_echoes_callresults_and_closes_on_command() {
    let recorder = Recorder::start(Script {
        echo_callresult: true,
        close_after: Some((2, 4003, "enough".into())),
        ..Script::default()
    })
    .await;
    let (mut charger, _) = ws::connect(
        &format!("{}/SELF-ECHO", recorder.url_base()),
        &["ocpp1.6"],
        None,
    )
    .await
    .expect("recorder accepts");
    charger
        .send(Message::text("[2,\"e1\",\"Heartbeat\",{}]"))
        .await
        .unwrap();
    let reply = within(Duration::from_secs(10), "echo", charger.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, Message::text("[3,\"e1\",{}]"));
    charger.send(Message::text("not a call")).await.unwrap();
    let close = within(Duration::from_secs(10), "close", charger.next())
        .await
        .unwrap()
        .unwrap();
    let Message::Close(Some(frame)) = close else {
        panic!("expected a close frame, got {close:?}")
    };
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (4003, "enough")
    );
}
