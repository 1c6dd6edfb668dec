//! Cutover and failover in session mode (issue 13, item 3), against SteVe stand-ins: a Python
//! OCPP central system for SteVe's websocket side and `support/steve.rs` for its REST API
//! (HTTP Basic), answering from the transactions the websocket side assigned.
//!
//! - Cutover: sessions started directly at SteVe, then continued through a bridge put in the
//!   path, are billed exactly once with their starter's subscription (start from SteVe's REST,
//!   answering 300 ms a request), while other chargers' billing replies stay fast.
//! - Failover: two bridges with separate spools in front of one SteVe; a charger moving from one
//!   to the other mid-session (the first killed, or stopped) is billed exactly once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::bridge::{Bridge, BridgeOptions};
use crate::support::e2e::{self, key_file, lago_toml, spool_counts};
use crate::support::lago::{LagoStandIn, StoreMode};
use crate::support::peers::{CentralOptions, CentralSystem, Implementation};
use crate::support::poll_until;
use crate::support::steve::{SteveAuth, SteveRest};
use crate::support::ws::RawCharger;

const USER: &str = "bridge-api";
const PASSWORD: &str = "cut:over:pw";
/// The cutover's sessions started directly at SteVe.
const CUTOVER_SESSIONS: usize = 60;
/// Chargers running ordinary sessions through the bridge meanwhile.
const OTHER_CHARGERS: usize = 8;
/// Each of them runs sessions until every cut-over start is recovered: at least this many, at
/// most `OTHER_MAX_SESSIONS` (a bound the recovery's few seconds never reach).
const OTHER_MIN_SESSIONS: usize = 3;
const OTHER_MAX_SESSIONS: usize = 1_000;
const START_ISO: &str = "2026-01-01T10:00:00Z";
const START_UNIX: i64 = 1_767_261_600;

/// One charger's raw OCPP-J connection, with this test's session shapes.
struct Charger(RawCharger);

impl Charger {
    async fn connect(url: &str) -> Charger {
        Charger(RawCharger::connect(url).await)
    }

    /// Sends a CALL and waits for its answer: (payload, how long the answer took).
    async fn call(&mut self, action: &str, payload: Value) -> (Value, Duration) {
        self.0.call(action, payload).await
    }

    async fn start(&mut self, id_tag: &str, meter_start: i64) -> (i64, Duration) {
        let (reply, took) = self
            .call(
                "StartTransaction",
                json!({"connectorId": 1, "idTag": id_tag, "meterStart": meter_start, "timestamp": START_ISO}),
            )
            .await;
        let transaction_id = reply["transactionId"].as_i64().expect("transactionId");
        (transaction_id, took)
    }

    async fn meter_values(&mut self, transaction_id: i64, wh: i64) -> Duration {
        self.call(
            "MeterValues",
            json!({"connectorId": 1, "transactionId": transaction_id, "meterValue": [{
                "timestamp": "2026-01-01T10:30:00Z",
                "sampledValue": [{"value": wh.to_string(), "measurand": "Energy.Active.Import.Register", "unit": "Wh"}]
            }]}),
        )
        .await
        .1
    }

    async fn stop(&mut self, transaction_id: i64, meter_stop: i64) -> Duration {
        self.call(
            "StopTransaction",
            json!({"transactionId": transaction_id, "meterStop": meter_stop, "timestamp": "2026-01-01T11:00:00Z", "reason": "Local"}),
        )
        .await
        .1
    }
}

fn steve_keys(steve: &SteveRest, dir: &std::path::Path) -> String {
    let password_file = dir.join("steve-password");
    std::fs::write(&password_file, PASSWORD).unwrap();
    format!(
        "[steve]\napi_url = \"{}\"\napi_user = \"{USER}\"\napi_password_file = \"{}\"\n\
         max_concurrent_requests = 4\nmax_requests_per_second = 20\n",
        steve.url(),
        password_file.display()
    )
}

/// A bridge in front of `central`, shipping to `lago`, asking `steve`; the directory holds
/// its Lago key and SteVe password files.
async fn bridge(
    central: &CentralSystem,
    lago: &LagoStandIn,
    steve: &SteveRest,
) -> (Bridge, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(lago, dir.path());
    let bridge = Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            extra_toml: format!(
                "{}\n{}",
                lago_toml(lago, Some(&key), "session"),
                steve_keys(steve, dir.path())
            ),
            ..BridgeOptions::default()
        },
    )
    .await;
    (bridge, dir)
}

/// Lago's stored events by transaction_id (all of them: a duplicate shows as a second entry).
fn stored_by_transaction(lago: &LagoStandIn) -> BTreeMap<String, Vec<(String, String)>> {
    let mut by = BTreeMap::<String, Vec<(String, String)>>::new();
    for row in lago.stored_events() {
        by.entry(row.transaction_id.clone()).or_default().push((
            row.external_subscription_id.clone(),
            row.value().unwrap_or("").to_string(),
        ));
    }
    by
}

/// Reply latencies in a histogram, printed as the test's evidence.
fn print_histogram(what: &str, latencies_us: &[u64]) -> hdrhistogram::Histogram<u64> {
    let mut histogram = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for &us in latencies_us {
        histogram.record(us.max(1)).unwrap();
    }
    println!("{what}: {} replies", histogram.len());
    for quantile in [0.5, 0.9, 0.99, 0.999, 1.0] {
        println!(
            "  p{:<5} {:>9.1} ms",
            quantile * 100.0,
            histogram.value_at_quantile(quantile) as f64 / 1000.0
        );
    }
    let mut lower = 0u64;
    for upper_ms in [5u64, 10, 25, 50, 100, 250, 500, 1000, 5000, 60_000] {
        let upper = upper_ms * 1000;
        let count = histogram.count_between(lower, upper.saturating_sub(1));
        println!("  [{:>5} ms, {:>5} ms) {count}", lower / 1000, upper_ms);
        lower = upper;
    }
    histogram
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_bills_sessions_started_before_the_bridge_once_and_other_chargers_never_wait() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let steve = SteveRest::start(
        SteveAuth::Basic {
            user: USER.into(),
            password: PASSWORD.into(),
        },
        Some(central.log_path()),
    )
    .await;
    let cut_tags: Vec<String> = (0..CUTOVER_SESSIONS)
        .map(|i| format!("TAG-CUT-{i:02}"))
        .collect();
    let mut subscriptions: Vec<&str> = cut_tags.iter().map(String::as_str).collect();
    subscriptions.push("TAG-OTHER");
    let lago = e2e::stand_in(StoreMode::Postgres, &subscriptions).await;

    // Before the bridge is in the path: sessions started directly at SteVe.
    let mut cut = Vec::new();
    for (i, tag) in cut_tags.iter().enumerate() {
        let charge_box_id = format!("CUT-{i:02}");
        let mut charger =
            Charger::connect(&format!("{}/{charge_box_id}", central.url_base())).await;
        let meter_start = 100_000 + i as i64 * 1000;
        let (transaction_id, _) = charger.start(tag, meter_start).await;
        cut.push((charge_box_id, tag.clone(), transaction_id, meter_start));
    }

    // The bridge goes in; SteVe's REST is slow from now on.
    steve.set_delay(Duration::from_millis(300));
    let (bridge, _secrets) = bridge(&central, &lago, &steve).await;
    let bridge_url = bridge.charger_base_url();

    // Other chargers bill through the bridge while the cut-over sessions stop.
    let recovering = Arc::new(AtomicBool::new(true));
    let mut others = tokio::task::JoinSet::new();
    for j in 0..OTHER_CHARGERS {
        let url = format!("{bridge_url}/OTHER-{j}");
        let recovering = recovering.clone();
        others.spawn(async move {
            let mut charger = Charger::connect(&url).await;
            let mut latencies = Vec::new();
            let mut sessions = Vec::new();
            while sessions.len() < OTHER_MAX_SESSIONS
                && (sessions.len() < OTHER_MIN_SESSIONS || recovering.load(Ordering::Relaxed))
            {
                let meter_start = 1_000 * sessions.len() as i64;
                let (tx, took) = charger.start("TAG-OTHER", meter_start).await;
                latencies.push(took);
                latencies.push(charger.meter_values(tx, meter_start + 200).await);
                latencies.push(charger.stop(tx, meter_start + 500).await);
                sessions.push(tx);
            }
            (latencies, sessions)
        });
    }
    let mut cut_stops = tokio::task::JoinSet::new();
    for (charge_box_id, _, transaction_id, meter_start) in cut.clone() {
        let url = format!("{bridge_url}/{charge_box_id}");
        cut_stops.spawn(async move {
            let mut charger = Charger::connect(&url).await;
            charger
                .meter_values(transaction_id, meter_start + 2_000)
                .await;
            charger.stop(transaction_id, meter_start + 5_000 + 7).await
        });
    }
    let mut cut_stop_latencies = Vec::new();
    while let Some(took) = cut_stops.join_next().await {
        cut_stop_latencies.push(took.expect("cut-over charger"));
    }
    // The recoveries: one SteVe request per cut-over session, 300 ms each.
    let asked = poll_until(Duration::from_secs(60), || {
        (steve.requests().len() >= CUTOVER_SESSIONS).then_some(())
    })
    .await;
    recovering.store(false, Ordering::Relaxed);
    assert!(
        asked.is_some(),
        "SteVe asked {} times",
        steve.requests().len()
    );
    let mut other_latencies = Vec::new();
    let mut other_sessions = Vec::new();
    while let Some(done) = others.join_next().await {
        let (latencies, sessions) = done.expect("other charger");
        assert!(
            sessions.len() < OTHER_MAX_SESSIONS,
            "the other chargers billed for as long as the recoveries ran"
        );
        other_latencies.extend(latencies);
        other_sessions.extend(sessions);
    }

    // Everything reaches Lago exactly once.
    let expected = CUTOVER_SESSIONS + other_sessions.len();
    let delivered = poll_until(Duration::from_secs(60), || {
        (lago.stored_events().len() >= expected).then_some(())
    })
    .await;
    let stored = stored_by_transaction(&lago);
    assert!(
        delivered.is_some(),
        "Lago holds {} of {expected} events; spool {:?}",
        lago.stored_events().len(),
        spool_counts(bridge.spool_path())
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(lago.stored_events().len(), expected, "no duplicates");
    for (charge_box_id, tag, transaction_id, _) in &cut {
        let events = &stored[&transaction_id.to_string()];
        assert_eq!(
            events,
            &vec![(tag.clone(), "5.007".to_string())],
            "{charge_box_id} billed once with its starter's subscription"
        );
    }
    for tx in &other_sessions {
        assert_eq!(
            stored[&tx.to_string()],
            vec![("TAG-OTHER".to_string(), "0.5".to_string())]
        );
    }
    let row = lago
        .stored_events()
        .into_iter()
        .find(|r| r.transaction_id == cut[0].2.to_string())
        .unwrap();
    assert_eq!(
        row.properties["started_at"],
        START_UNIX.to_string(),
        "SteVe's start time"
    );
    let counts = spool_counts(bridge.spool_path());
    assert!(counts.dead_letters.is_empty(), "{counts:?}");
    let requests = steve.requests();
    assert_eq!(
        requests.len(),
        CUTOVER_SESSIONS,
        "one lookup per cut-over session, none for sessions the bridge saw start"
    );
    assert!(requests.iter().all(|r| r.authorized && r.status == 200));
    let concurrent = steve.max_in_flight();
    println!("SteVe REST requests in flight at once: at most {concurrent}");
    assert!(
        (2..=4).contains(&concurrent),
        "lookups run in parallel, bounded by steve.max_concurrent_requests = 4: {concurrent}"
    );

    let us = |d: &Duration| d.as_micros() as u64;
    print_histogram(
        "cut-over chargers' Stop replies",
        &cut_stop_latencies.iter().map(us).collect::<Vec<_>>(),
    );
    let histogram = print_histogram(
        &format!(
            "other chargers' billing replies ({} sessions while {CUTOVER_SESSIONS} starts were recovered at 300 ms a request)",
            other_sessions.len()
        ),
        &other_latencies.iter().map(us).collect::<Vec<_>>(),
    );
    let p99 = Duration::from_micros(histogram.value_at_quantile(0.99));
    assert!(
        p99 <= Duration::from_secs(1),
        "other chargers' billing replies p99 {p99:?} > 1 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charger_moving_between_two_bridges_mid_session_is_billed_exactly_once() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let steve = SteveRest::start(
        SteveAuth::Basic {
            user: USER.into(),
            password: PASSWORD.into(),
        },
        Some(central.log_path()),
    )
    .await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["TAG-X", "TAG-Y"]).await;
    let (mut bridge_a, _secrets_a) = bridge(&central, &lago, &steve).await;
    let (mut bridge_b, _secrets_b) = bridge(&central, &lago, &steve).await;

    // X starts on A; A is SIGKILLed mid-session; X goes on through B and stops there.
    let mut x = Charger::connect(&bridge_a.charger_url("CP-X")).await;
    let (tx_x, _) = x.start("TAG-X", 10_000).await;
    x.meter_values(tx_x, 12_000).await;
    bridge_a.kill();
    drop(x);
    let mut x = Charger::connect(&bridge_b.charger_url("CP-X")).await;
    x.meter_values(tx_x, 14_000).await;
    x.stop(tx_x, 15_000).await;
    drop(x);

    // A comes back on its spool (it holds X's open session, which it must never bill).
    bridge_a.restart().await;
    // Y starts on B; B is stopped (SIGTERM) mid-session; Y stops on A.
    let mut y = Charger::connect(&bridge_b.charger_url("CP-Y")).await;
    let (tx_y, _) = y.start("TAG-Y", 20_000).await;
    let stored = poll_until(Duration::from_secs(20), || {
        (lago.stored_events().len() == 1).then_some(())
    })
    .await;
    assert!(stored.is_some(), "X's event reached Lago from B");
    let status = bridge_b.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "B stops cleanly: {status}");
    drop(y);
    let mut y = Charger::connect(&bridge_a.charger_url("CP-Y")).await;
    y.meter_values(tx_y, 21_000).await;
    y.stop(tx_y, 21_500).await;

    let delivered = poll_until(Duration::from_secs(20), || {
        (lago.stored_events().len() >= 2).then_some(())
    })
    .await;
    assert!(
        delivered.is_some(),
        "Lago holds {:?}; A's spool {:?}",
        lago.stored_events(),
        spool_counts(bridge_a.spool_path())
    );
    // Give a duplicate every chance to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stored = stored_by_transaction(&lago);
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(
        stored[&tx_x.to_string()],
        vec![("TAG-X".to_string(), "5".to_string())],
        "X: 15000 - 10000 Wh, once"
    );
    assert_eq!(
        stored[&tx_y.to_string()],
        vec![("TAG-Y".to_string(), "1.5".to_string())],
        "Y: 21500 - 20000 Wh, once"
    );
    // Each bridge billed only the session it saw stop, and nothing is left in either spool.
    let a = spool_counts(bridge_a.spool_path());
    let b = spool_counts(bridge_b.spool_path());
    assert_eq!((a.pending, a.delivered, a.dead), (0, 1, 0), "A: {a:?}");
    assert_eq!((b.pending, b.delivered, b.dead), (0, 1, 0), "B: {b:?}");
    assert!(a.dead_letters.is_empty() && b.dead_letters.is_empty());
    let requests = steve.requests();
    assert_eq!(requests.len(), 2, "one lookup per move: {requests:?}");
}
