//! A Stop whose Start the bridge never saw is billed from the start SteVe recorded, through
//! SteVe's REST API (`[steve]`); one SteVe does not know either stays a `missing_start` dead
//! letter. SteVe's REST API is a stand-in on loopback answering like
//! `GET /steve/api/v1/transactions?transactionPk=N`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use crate::support::bridge::{Bridge, BridgeOptions};
use crate::support::e2e::{dead_letter_details, spool_counts};
use crate::support::recorder::{Recorder, Script};
use crate::support::{poll_until, within, ws};

const STEVE_KEY: &str = "steve-key-7a1c";

/// Serves SteVe's transactions endpoint: transaction 42 of CP-REC started at 1000 Wh; every
/// request line and its STEVE-API-KEY header are recorded.
async fn steve_rest() -> (String, Arc<Mutex<Vec<(String, Option<String>)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind SteVe REST");
    let url = format!("http://{}/steve", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        for _ in 0..100 {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16_384 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
            let key = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("steve-api-key: ")
                        .or(l.strip_prefix("STEVE-API-KEY: "))
                })
                .map(str::to_string);
            log.lock().unwrap().push((target.clone(), key));
            let body = if target.contains("transactionPk=42&") {
                r#"[{"id":42,"connectorId":2,"chargeBoxId":"CP-REC","chargeBoxPk":1,"ocppIdTag":"TAG-REC","ocppTagPk":1,"startTimestamp":"2026-01-01T10:00:00.000Z","startValue":"1000","stopTimestamp":null,"stopValue":null}]"#
            } else {
                "[]"
            };
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_without_a_seen_start_is_billed_from_steves_record() {
    let (steve_url, steve_requests) = steve_rest().await;
    let recorder = Recorder::start(Script {
        echo_callresult: true,
        ..Script::default()
    })
    .await;
    // No Lago key: the events stay in the spool, where the test reads them.
    let bridge = Bridge::start_opts(
        &recorder.url_base(),
        BridgeOptions {
            extra_toml: format!("[steve]\napi_url = \"{steve_url}\"\n"),
            env: vec![("STEVE_API_KEY".into(), STEVE_KEY.into())],
            ..BridgeOptions::default()
        },
    )
    .await;

    let (mut charger, _) = ws::connect(&bridge.charger_url("CP-REC"), &["ocpp1.6"], None)
        .await
        .unwrap_or_else(|e| panic!("charger connects: {e}; bridge stderr:\n{}", bridge.stderr()));
    for (id, transaction_id, meter_stop) in [("s1", 42, 4200), ("s2", 43, 9000)] {
        let stop = format!(
            r#"[2,"{id}","StopTransaction",{{"transactionId":{transaction_id},"meterStop":{meter_stop},"timestamp":"2026-01-01T11:00:00Z","reason":"Local"}}]"#
        );
        charger.send(Message::text(stop)).await.expect("send Stop");
        let reply = within(Duration::from_secs(10), "Stop reply", charger.next())
            .await
            .expect("a reply")
            .expect("a frame");
        assert_eq!(
            reply.into_text().unwrap().as_str(),
            format!(r#"[3,"{id}",{{}}]"#)
        );
    }

    let spool = bridge.spool_path().to_path_buf();
    let settled = poll_until(Duration::from_secs(10), || {
        let counts = spool_counts(&spool);
        (counts.pending == 1 && counts.dead_letters.get("missing_start") == Some(&1)).then_some(())
    })
    .await;
    assert!(settled.is_some(), "spool: {:?}", spool_counts(&spool));

    let conn = rusqlite::Connection::open(&spool).unwrap();
    let event: String = conn
        .query_row("SELECT event FROM outbox", [], |r| r.get(0))
        .unwrap();
    let event: serde_json::Value = serde_json::from_str(&event).unwrap();
    assert_eq!(event["transaction_id"], "42");
    assert_eq!(
        event["external_subscription_id"], "TAG-REC",
        "id tag from SteVe"
    );
    assert_eq!(
        event["properties"]["value"], "3.2",
        "(4200 - 1000) / 1000 kWh"
    );
    assert_eq!(event["properties"]["connector_id"], "2");
    assert_eq!(event["properties"]["meter_start_wh"], "1000");
    assert_eq!(
        event["properties"]["started_at"], "1767261600",
        "SteVe's start time"
    );
    let missing: i64 = conn
        .query_row(
            "SELECT ocpp_transaction_id FROM dead_letters WHERE reason = 'missing_start'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        missing,
        43,
        "{:?}",
        dead_letter_details(&spool, "missing_start")
    );

    let requests = steve_requests.lock().unwrap().clone();
    assert_eq!(
        requests.len(),
        2,
        "one lookup per unknown session: {requests:?}"
    );
    assert!(
        requests[0]
            .0
            .starts_with("/steve/api/v1/transactions?transactionPk=42&chargeBoxId=CP%2DREC")
    );
    assert!(
        requests
            .iter()
            .all(|(_, key)| key.as_deref() == Some(STEVE_KEY))
    );
    assert!(
        !bridge.stderr().contains(STEVE_KEY),
        "the SteVe key is never logged"
    );
}
