//! Acceptance tests of issue 4 that need the whole daemon: the `ocpp` charge point's sessions go
//! through the real bridge to the `ocpp` central system, and the events come out on stdout
//! (`--dry-run`) or in the Lago stand-in, checked to the exact decimal.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use rust_decimal::Decimal;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use ocpp_lago_bridge::event::LagoEvent;

use crate::delivery::settle;
use crate::support::bridge::{Bridge, BridgeOptions};
use crate::support::e2e::{
    self, RanSession, assert_secret_not_exposed, delivered_total, ran_sessions, spool_counts,
    stored_kwh,
};
use crate::support::lago::{RequestCounts, StoreMode};
use crate::support::peers::{CentralOptions, CentralSystem, Implementation, run_charger};
use crate::support::{poll_until, repo_root};

const PEER_LIMIT: Duration = Duration::from_secs(60);

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

async fn python_central() -> CentralSystem {
    CentralSystem::start(Implementation::Python, CentralOptions::default()).await
}

/// Waits (bounded) until the bridge printed `count` lines on stdout.
async fn stdout_lines(bridge: &Bridge, count: usize, limit: Duration) -> Vec<String> {
    poll_until(limit, || {
        let out = bridge.stdout();
        (out.lines().count() >= count).then(|| out.lines().map(str::to_owned).collect())
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "bridge printed {} of {count} event lines within {limit:?}; stdout:\n{}\nstderr:\n{}",
            bridge.stdout().lines().count(),
            bridge.stdout(),
            bridge.stderr()
        )
    })
}

/// The golden session: the `ocpp` charge point on a fixed clock, one session through the relay;
/// the derived event must be exactly `tests/golden/session_event.json`. `received_at` is the
/// bridge's own clock (the only field the charger cannot fix): checked to lie within the run and
/// written as 0 in the golden line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_session_produces_exactly_the_recorded_event_line() {
    let central = python_central().await;
    let mut bridge = Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            dry_run: true,
            // The charge point's clock is fixed at 2026-01-01; the charger clock check (issue
            // 12) would date the event by the bridge beyond `max_clock_lag` of that.
            extra_toml: "[billing]\nmax_clock_lag = \"36500days\"\n".into(),
            ..Default::default()
        },
    )
    .await;
    let before = unix_now();
    let run = run_charger(
        Implementation::Python,
        &bridge.charger_base_url(),
        "GOLDEN-1",
        &[
            "--sessions",
            "1",
            "--meter-values",
            "3",
            "--id-tag",
            "TAG-GOLDEN",
            "--clock",
            "2026-01-01T00:00:00Z",
        ],
        PEER_LIMIT,
    )
    .await;
    run.assert_ok("golden charge point");
    let lines = stdout_lines(&bridge, 1, Duration::from_secs(15)).await;
    let after = unix_now();
    // A clean exit; the dry run keeps its own spool (spool.dry-run.db) for the next start.
    let status = bridge.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "bridge exit: {status}");
    assert_eq!(
        bridge.stdout().lines().count(),
        1,
        "one event, printed once"
    );
    assert_eq!(lines.len(), 1, "exactly one event line: {lines:?}");
    let line = &lines[0];

    let event: Value = serde_json::from_str(line).expect("the event line is JSON");
    // Every property goes out as a string (Lago's spec: `oneOf [string, integer, number]`).
    let received_at: i64 = event["properties"]["received_at"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("received_at is unix seconds as a decimal string");
    assert!(
        (before..=after).contains(&received_at),
        "received_at {received_at} is the bridge clock during the run [{before}, {after}]"
    );
    let normalised = line.replacen(
        &format!("\"received_at\":\"{received_at}\","),
        "\"received_at\":\"0\",",
        1,
    );
    let golden = std::fs::read_to_string(repo_root().join("tests/golden/session_event.json"))
        .expect("read tests/golden/session_event.json");
    assert_eq!(
        normalised,
        golden.trim_end_matches('\n'),
        "the derived event differs from the golden line"
    );
}

/// `--dry-run`: every stdout line is a Lago event, every stderr line a JSON log object, and the
/// configured Lago (with a valid key) gets no request at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_events_on_stdout_logs_on_stderr_and_sends_nothing() {
    let central = python_central().await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["TAG-DRY"]).await;
    let key = lago.api_key();
    let mut bridge = Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            extra_toml: e2e::lago_toml(&lago, None, "session"),
            dry_run: true,
            env: vec![("LAGO_API_KEY".into(), key.clone())],
            ..Default::default()
        },
    )
    .await;
    let run = run_charger(
        Implementation::Python,
        &bridge.charger_base_url(),
        "DRY",
        &[
            "--connections",
            "2",
            "--sessions",
            "2",
            "--id-tag",
            "TAG-DRY",
            "--details",
        ],
        PEER_LIMIT,
    )
    .await;
    run.assert_ok("dry-run charge points");
    let sessions = ran_sessions(&run.summary);
    assert_eq!(sessions.len(), 4);
    let lines = stdout_lines(&bridge, sessions.len(), Duration::from_secs(15)).await;
    // Longer than batch_linger and a retry: a shipper sending to Lago would have done so.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_secret_not_exposed(&bridge, &key).await;
    let status = bridge.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "bridge exit: {status}");

    let stdout = bridge.stdout();
    assert_eq!(
        stdout.lines().count(),
        sessions.len(),
        "one line per session: {lines:?}"
    );
    let mut printed = BTreeMap::new();
    for line in stdout.lines() {
        let event: LagoEvent = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stdout line is not a Lago event ({e}): {line}"));
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            line,
            "a stdout line is exactly one event's wire form"
        );
        printed.insert(event.properties.ocpp_transaction_id, event);
    }
    for session in &sessions {
        let event = &printed[&session.ocpp_transaction_id];
        assert_eq!(
            event.properties.value.parse::<Decimal>().unwrap(),
            session.kwh()
        );
        assert_eq!(event.external_subscription_id, "TAG-DRY");
    }
    let stderr = bridge.stderr();
    assert!(stderr.lines().count() > 0, "the bridge logged something");
    for line in stderr.lines() {
        let log: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        assert!(log.is_object(), "log line is an object: {line}");
    }
    assert_eq!(
        lago.request_counts(),
        RequestCounts::default(),
        "a dry run sends nothing to Lago"
    );
    assert!(!stderr.contains(&key), "the API key is not logged");
}

/// Runs `processes` python charge points (each `connections` × `sessions`, its own id tag)
/// through `bridge` concurrently; returns every session they ran.
async fn run_fleet(
    bridge: &Bridge,
    prefix: &str,
    processes: usize,
    connections: usize,
    sessions: usize,
    meter_values: usize,
) -> Vec<RanSession> {
    let url = bridge.charger_base_url();
    let mut runs = Vec::new();
    for p in 0..processes {
        let url = url.clone();
        let (id, tag) = (format!("{prefix}{p}"), format!("TAG-{prefix}{p}"));
        let (connections, sessions, meter_values) = (
            connections.to_string(),
            sessions.to_string(),
            meter_values.to_string(),
        );
        runs.push(tokio::spawn(async move {
            run_charger(
                Implementation::Python,
                &url,
                &id,
                &[
                    "--connections",
                    &connections,
                    "--sessions",
                    &sessions,
                    "--meter-values",
                    &meter_values,
                    "--id-tag",
                    &tag,
                    "--details",
                ],
                PEER_LIMIT,
            )
            .await
        }));
    }
    let mut all = Vec::new();
    for run in runs {
        let run = run.await.expect("charge point task");
        run.assert_ok("fleet charge point");
        all.extend(ran_sessions(&run.summary));
    }
    all
}

/// Session mode, end to end: several chargers with Wh and kWh readings → Lago holds exactly one
/// event per session whose value is exactly (meterStop − meterStart)/1000, and the bridge
/// counts each as delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_delivers_one_exact_event_per_session_to_lago() {
    let central = python_central().await;
    let tags = ["TAG-S0", "TAG-S1", "TAG-S2"];
    let lago = e2e::stand_in(StoreMode::Postgres, &tags).await;
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = e2e::key_file(&lago, key_dir.path());
    let bridge = Bridge::start_with(
        &central.url_base(),
        &e2e::lago_toml(&lago, Some(&key_file), "session"),
    )
    .await;
    let sessions = run_fleet(&bridge, "S", 3, 2, 3, 3).await;
    assert_eq!(sessions.len(), 18);

    let stored = poll_until(Duration::from_secs(30), || {
        let stored = lago.stored_events();
        (stored.len() >= sessions.len()).then_some(stored)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "Lago holds {} of {} events; bridge stderr:\n{}",
            lago.stored_events().len(),
            sessions.len(),
            bridge.stderr()
        )
    });
    assert_eq!(stored.len(), sessions.len(), "one event per session");
    for session in &sessions {
        let rows: Vec<_> = stored
            .iter()
            .filter(|r| r.transaction_id == session.ocpp_transaction_id.to_string())
            .collect();
        assert_eq!(rows.len(), 1, "exactly one event for {session:?}");
        let row = rows[0];
        assert_eq!(stored_kwh(row), session.kwh(), "{session:?}: {row:?}");
        assert_eq!(row.code, e2e::METRIC);
        assert_eq!(
            row.external_subscription_id,
            format!("TAG-{}", &session.charge_box_id[..2])
        );
        assert_eq!(
            row.properties["charge_box_id"],
            session.charge_box_id.as_str()
        );
    }
    let delivered = poll_until(Duration::from_secs(10), || {
        let counts = spool_counts(bridge.spool_path());
        (counts.delivered == sessions.len() as i64).then_some(counts)
    })
    .await;
    assert!(
        delivered.is_some(),
        "spool: {:?}",
        spool_counts(bridge.spool_path())
    );
    assert_eq!(delivered_total(&bridge).await, sessions.len() as f64);
    assert!(
        spool_counts(bridge.spool_path()).dead_letters.is_empty(),
        "no dead letters"
    );
    assert_secret_not_exposed(&bridge, &lago.api_key()).await;
}

/// Incremental mode, end to end: the distinct events of each session sum exactly to
/// (meterStop − meterStart)/1000, and no two events share a transaction_id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_mode_events_of_each_session_sum_exactly_to_its_energy() {
    let central = python_central().await;
    let tags = ["TAG-I0", "TAG-I1"];
    let lago = e2e::stand_in(StoreMode::Postgres, &tags).await;
    let key = lago.api_key();
    let mut extra = e2e::lago_toml(&lago, None, "incremental");
    extra.push_str("transaction_id = \"{charge_box_id}-{transaction_id}\"\n");
    let bridge = Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            extra_toml: extra,
            env: vec![("LAGO_API_KEY".into(), key.clone())],
            ..Default::default()
        },
    )
    .await;
    let sessions = run_fleet(&bridge, "I", 2, 2, 2, 4).await;
    assert_eq!(sessions.len(), 8);

    let sums = |stored: &[crate::support::lago::StoredRow]| {
        let mut sums: BTreeMap<(String, i64), Decimal> = BTreeMap::new();
        for row in stored {
            let key = (
                row.properties["charge_box_id"].as_str().unwrap().to_owned(),
                row.properties["ocpp_transaction_id"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap(),
            );
            *sums.entry(key).or_default() += stored_kwh(row);
        }
        sums
    };
    let expected: BTreeMap<(String, i64), Decimal> = sessions
        .iter()
        .map(|s| ((s.charge_box_id.clone(), s.ocpp_transaction_id), s.kwh()))
        .collect();
    let settled = poll_until(Duration::from_secs(30), || {
        let stored = lago.stored_events();
        (sums(&stored) == expected && spool_counts(bridge.spool_path()).pending == 0)
            .then_some(stored)
    })
    .await;
    let stored = settled.unwrap_or_else(|| {
        panic!(
            "per-session sums {:?} never matched {expected:?}; bridge stderr:\n{}",
            sums(&lago.stored_events()),
            bridge.stderr()
        )
    });
    let ids: HashSet<_> = stored.iter().map(|r| r.transaction_id.clone()).collect();
    assert_eq!(ids.len(), stored.len(), "event ids are distinct");
    // 4 readings + the Stop per session: several events each, not one.
    assert!(
        stored.len() > sessions.len() * 2,
        "incremental events: {}",
        stored.len()
    );
    assert_eq!(delivered_total(&bridge).await, stored.len() as f64);
    assert_secret_not_exposed(&bridge, &key).await;
}

/// A SteVe stand-in speaking OCPP 1.6J on loopback: every StartTransaction gets the next
/// transactionId (from 1) with `Accepted`; a StopTransaction whose meterStop is 9999 gets a
/// CALLERROR (as SteVe answers a Stop it cannot store); every other CALL gets `{}`.
async fn numbering_central() -> String {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind central");
    let url = format!(
        "ws://{}{}",
        listener.local_addr().unwrap(),
        crate::support::PATH_PREFIX
    );
    let next_transaction_id = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(1));
    tokio::spawn(async move {
        for _ in 0..64 {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let next = next_transaction_id.clone();
            tokio::spawn(async move {
                // tungstenite's callback type returns its large ErrorResponse by value.
                #[allow(clippy::result_large_err)]
                let select = |_: &Request, mut response: Response| {
                    response.headers_mut().insert(
                        "Sec-WebSocket-Protocol",
                        HeaderValue::from_static("ocpp1.6"),
                    );
                    Ok(response)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, select).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let Ok(Value::Array(call)) = serde_json::from_str::<Value>(text.as_str())
                    else {
                        continue;
                    };
                    if call.first().and_then(Value::as_u64) != Some(2) {
                        continue;
                    }
                    let id = call[1].clone();
                    let payload = &call[3];
                    let answer = match call[2].as_str() {
                        Some("StartTransaction") => serde_json::json!([3, id, {
                            "idTagInfo": {"status": "Accepted"},
                            "transactionId": next.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                        }]),
                        Some("StopTransaction") if payload["meterStop"] == 9999 => {
                            serde_json::json!([4, id, "InternalError", "cannot store", {}])
                        }
                        _ => serde_json::json!([3, id, {}]),
                    };
                    if ws.send(Message::text(answer.to_string())).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// Sends one CALL and returns the answer's text.
async fn call(charger: &mut crate::support::ws::ClientWs, frame: &str) -> String {
    charger
        .send(Message::text(frame.to_owned()))
        .await
        .expect("send CALL");
    let reply = crate::support::within(Duration::from_secs(10), "the answer", charger.next())
        .await
        .expect("an answer")
        .expect("a frame");
    reply
        .into_text()
        .expect("a text answer")
        .as_str()
        .to_owned()
}

/// Issue 12: one Start/Stop pair with registers `-5E28` / `5E28` panicked the spool writer, and
/// from then on every charger's billing record was dropped. Now it is an `implausible_register`
/// dead letter, the daemon stays healthy, and the next charger's session is billed. The same
/// run shows a Stop SteVe refused (CALLERROR) does not count, the corrected Stop does (no
/// `conflicting_stop`), and a `"4200,0"` meterStop is an `unreadable_frame` dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_panicked_the_writer_is_contained_and_the_next_session_is_billed() {
    let central = numbering_central().await;
    // No Lago key: the events stay in the spool, where the test reads them.
    let bridge = Bridge::start_opts(&central, BridgeOptions::default()).await;
    let connect = |id: &'static str| {
        let url = bridge.charger_url(id);
        async move {
            crate::support::ws::connect(&url, &["ocpp1.6"], None)
                .await
                .unwrap_or_else(|e| panic!("{id} connects: {e}"))
                .0
        }
    };
    let start = |connector: u32, meter_start: &str| {
        format!(
            r#"[2,"s","StartTransaction",{{"connectorId":{connector},"idTag":"TAG-F","meterStart":{meter_start},"timestamp":"2026-01-01T10:00:00Z"}}]"#
        )
    };
    let stop = |id: &str, txid: i64, meter_stop: &str| {
        format!(
            r#"[2,"{id}","StopTransaction",{{"transactionId":{txid},"meterStop":{meter_stop},"timestamp":"2026-01-01T11:00:00Z","reason":"Local"}}]"#
        )
    };

    let mut huge = connect("CP-HUGE").await;
    let answer = call(&mut huge, &start(1, "-5E28")).await;
    assert!(answer.contains(r#""transactionId":1"#), "{answer}");
    assert_eq!(
        call(&mut huge, &stop("t", 1, "5E28")).await,
        r#"[3,"t",{}]"#
    );

    let mut next = connect("CP-NEXT").await;
    let answer = call(&mut next, &start(1, "1000")).await;
    assert!(answer.contains(r#""transactionId":2"#), "{answer}");
    // SteVe refuses the first Stop; the charger's corrected one is billed.
    assert!(
        call(&mut next, &stop("x", 2, "9999"))
            .await
            .starts_with(r#"[4,"x""#)
    );
    assert_eq!(
        call(&mut next, &stop("y", 2, r#""4200,0""#)).await,
        r#"[3,"y",{}]"#
    );
    assert_eq!(
        call(&mut next, &stop("z", 2, "4300")).await,
        r#"[3,"z",{}]"#
    );

    let spool = bridge.spool_path().to_path_buf();
    let settled = poll_until(Duration::from_secs(10), || {
        let counts = spool_counts(&spool);
        (counts.pending == 1
            && counts.dead_letters.get("implausible_register") == Some(&1)
            && counts.dead_letters.get("unreadable_frame") == Some(&1))
        .then_some(counts)
    })
    .await;
    let counts = settled.unwrap_or_else(|| {
        panic!(
            "spool: {:?}; bridge stderr:\n{}",
            spool_counts(&spool),
            bridge.stderr()
        )
    });
    assert_eq!(counts.dead_letters.len(), 2, "{counts:?}");
    let conn = rusqlite::Connection::open(&spool).unwrap();
    let event: String = conn
        .query_row("SELECT event FROM outbox", [], |r| r.get(0))
        .unwrap();
    let event: Value = serde_json::from_str(&event).unwrap();
    assert_eq!(event["properties"]["charge_box_id"], "CP-NEXT");
    assert_eq!(
        event["properties"]["value"], "3.3",
        "(4300 - 1000) / 1000 kWh"
    );
    let unreadable = crate::support::e2e::dead_letter_details(&spool, "unreadable_frame");
    assert!(unreadable[0].contains("4200,0"), "{unreadable:?}");
    // The writer is alive and the daemon healthy.
    let (status, body) = crate::support::admin::get(bridge.admin_addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !bridge.stderr().contains("panicked"),
        "no task panicked:\n{}",
        bridge.stderr()
    );
}

/// Issue 16 item 1: a MeterValues that derives nothing is one appended tap record, and the
/// session rows are written only with what a record derives. SIGKILLed right after such
/// readings (between two writes of the session's row), the restarted bridge restores the session
/// exactly: the charger's re-sent reading is a duplicate, the Stop bills exactly the remainder
/// (no second event for a reading, nothing lost), and no anomaly is logged or dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_readings_that_derive_nothing_restores_the_session_exactly() {
    let central = numbering_central().await;
    // No Lago key: the events stay in the spool, where the test reads them.
    let mut bridge = Bridge::start_opts(
        &central,
        BridgeOptions {
            extra_toml: "[billing]\nmode = \"incremental\"\n".into(),
            ..Default::default()
        },
    )
    .await;
    let at = |offset: i64| {
        humantime::format_rfc3339_seconds(
            UNIX_EPOCH + Duration::from_secs((unix_now() + offset) as u64),
        )
        .to_string()
    };
    let meter_values = |id: &str, wh: &str, offset: i64| {
        format!(
            r#"[2,"{id}","MeterValues",{{"connectorId":1,"transactionId":1,"meterValue":[{{"timestamp":"{}","sampledValue":[{{"value":"{wh}","unit":"Wh","context":"Sample.Periodic","measurand":"Energy.Active.Import.Register"}}]}}]}}]"#,
            at(offset)
        )
    };
    let connect = |bridge: &Bridge| {
        let url = bridge.charger_url("CP-CKPT");
        async move {
            crate::support::ws::connect(&url, &["ocpp1.6"], None)
                .await
                .expect("the charger connects")
                .0
        }
    };
    let mut charger = connect(&bridge).await;
    let start = format!(
        r#"[2,"s","StartTransaction",{{"connectorId":1,"idTag":"TAG-K","meterStart":1000,"timestamp":"{}"}}]"#,
        at(-60)
    );
    assert!(
        call(&mut charger, &start)
            .await
            .contains(r#""transactionId":1"#)
    );
    // Bills 1000 → 1499 (the last Wh waits for the Stop): an event and the session's row.
    assert_eq!(
        call(&mut charger, &meter_values("m1", "1500", -50)).await,
        r#"[3,"m1",{}]"#
    );
    // Derive nothing: the same register again (within its resolution), then a late reading.
    assert_eq!(
        call(&mut charger, &meter_values("m2", "1500", -40)).await,
        r#"[3,"m2",{}]"#
    );
    assert_eq!(
        call(&mut charger, &meter_values("m3", "1500", -55)).await,
        r#"[3,"m3",{}]"#
    );
    let spool = bridge.spool_path().to_path_buf();
    let records = |spool: &std::path::Path| -> i64 {
        rusqlite::Connection::open(spool)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM tap_records", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(
        records(&spool),
        4,
        "every reading is on disk before its reply"
    );
    drop(charger);

    bridge.restart().await;
    let mut charger = connect(&bridge).await;
    // The charger re-sends the reading it is not sure of, then stops.
    assert_eq!(
        call(&mut charger, &meter_values("m2", "1500", -40)).await,
        r#"[3,"m2",{}]"#
    );
    let stop = format!(
        r#"[2,"t","StopTransaction",{{"transactionId":1,"meterStop":2000,"timestamp":"{}","reason":"Local"}}]"#,
        at(-1)
    );
    assert_eq!(call(&mut charger, &stop).await, r#"[3,"t",{}]"#);

    let counts = settle(&bridge, Duration::from_secs(10), |c| c.pending == 2).await;
    assert!(counts.dead_letters.is_empty(), "{counts:?}");
    let conn = rusqlite::Connection::open(&spool).unwrap();
    let mut values: Vec<String> = conn
        .prepare("SELECT event FROM outbox ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|e| {
            let event: Value = serde_json::from_str(&e.unwrap()).unwrap();
            event["properties"]["value"].as_str().unwrap().to_owned()
        })
        .collect();
    values.sort();
    assert_eq!(values, ["0.499", "0.501"], "(2000 - 1000) Wh, billed once");
    assert!(
        !bridge.stderr().contains("billing anomaly"),
        "no anomaly: {}",
        bridge.stderr()
    );
    assert_eq!(records(&spool), 6);
}
