//! `ocpp-lago-bridge simulate` against the PyPI `ocpp` central system, directly and through
//! the bridge: the summary must match what the central system logged.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::support::bridge::{BRIDGE_BIN, Bridge};
use crate::support::peers::{CentralOptions, CentralSystem, Implementation, actions};
use crate::support::within;

const CHARGERS: usize = 5;
const SESSIONS: usize = 2;
const METER_VALUES: usize = 2;

/// Runs the simulator with a small fleet against `url`; returns (exit success, JSON summary).
async fn simulate(url: &str, id_prefix: &str) -> (bool, Value, String) {
    let child = tokio::process::Command::new(BRIDGE_BIN)
        .args(["simulate", "--json", "--url", url, "--id-prefix", id_prefix])
        .args(["--chargers", &CHARGERS.to_string()])
        .args(["--sessions-per-charger", &SESSIONS.to_string()])
        .args(["--meter-values-per-session", &METER_VALUES.to_string()])
        .args([
            "--meter-interval",
            "20ms",
            "--ramp-up",
            "100ms",
            "--unit",
            "mixed",
        ])
        .args(["--duration", "15s", "--reply-timeout", "5s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the simulator");
    let output = within(
        Duration::from_secs(20),
        "simulate",
        child.wait_with_output(),
    )
    .await
    .expect("wait for the simulator");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let summary = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("summary is not one JSON object ({e}): {stdout}\n{stderr}"));
    (output.status.success(), summary, stderr)
}

fn assert_clean_summary(ok: bool, summary: &Value, stderr: &str) {
    assert!(ok, "simulator failed: {summary}\n{stderr}");
    assert_eq!(summary["error_count"], 0, "{summary}");
    assert_eq!(summary["chargers_connected"], CHARGERS, "{summary}");
    assert_eq!(
        summary["sessions_completed"],
        CHARGERS * SESSIONS,
        "{summary}"
    );
    // Boot, Status, Heartbeat, then per session Start, Status, MeterValues, Stop, Status.
    let calls = CHARGERS * (3 + SESSIONS * (4 + METER_VALUES));
    assert_eq!(summary["replies"], calls, "{summary}");
    assert_eq!(
        summary["latency_us"]["billing"]["count"],
        CHARGERS * SESSIONS * (2 + METER_VALUES)
    );
}

/// Every charger's CALLs, in order, as the central system logged them.
async fn assert_central_saw_every_session(central: &CentralSystem, id_prefix: &str) {
    let stops = CHARGERS * SESSIONS;
    let events = central
        .wait_for_events(Duration::from_secs(5), |events| {
            events
                .iter()
                .filter(|e| e["event"] == "call_received" && e["action"] == "StopTransaction")
                .count()
                >= stops
        })
        .await;
    for n in 1..=CHARGERS {
        let id = format!("{id_prefix}{n}");
        let received = actions(&events, "call_received", &id);
        let mut expected = vec!["BootNotification", "StatusNotification", "Heartbeat"];
        for _ in 0..SESSIONS {
            expected.extend(["StartTransaction", "StatusNotification"]);
            expected.extend(std::iter::repeat_n("MeterValues", METER_VALUES));
            expected.extend(["StopTransaction", "StatusNotification"]);
        }
        assert_eq!(
            received, expected,
            "CALLs the central system logged for {id}"
        );
        let energy: Vec<i64> = events
            .iter()
            .filter(|e| e["charge_box_id"] == id && e["action"] == "StopTransaction")
            .map(|e| e["payload"]["meter_stop"].as_i64().expect("meter_stop"))
            .collect();
        assert_eq!(
            energy,
            [10_000, 20_000],
            "cumulative meter_stop of {id} in Wh"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_fleet_completes_every_session_against_the_python_central_system() {
    let central = CentralSystem::start(
        Implementation::Python,
        CentralOptions {
            initiate_calls: true,
            ..Default::default()
        },
    )
    .await;
    let (ok, summary, stderr) = simulate(&central.url_base(), "SIM-DIRECT-").await;
    assert_clean_summary(ok, &summary, &stderr);
    assert_central_saw_every_session(&central, "SIM-DIRECT-").await;
    // The central system's RemoteStart, Reset and GetConfiguration were answered validly.
    assert_eq!(summary["central_calls_answered"], CHARGERS * 3, "{summary}");
    let checked: Vec<Value> = central
        .events()
        .into_iter()
        .filter(|e| e["event"] == "central_call_result")
        .collect();
    assert_eq!(checked.len(), CHARGERS * 3);
    assert!(
        checked.iter().all(|e| e["ok"] == true),
        "central calls: {checked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_fleet_completes_every_session_through_the_bridge() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let bridge = Bridge::start(&central.url_base()).await;
    let (ok, summary, stderr) = simulate(&bridge.charger_base_url(), "SIM-BRIDGE-").await;
    if !ok {
        eprintln!("bridge stderr:\n{}", bridge.stderr());
    }
    assert_clean_summary(ok, &summary, &stderr);
    assert_central_saw_every_session(&central, "SIM-BRIDGE-").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_fleet_exits_non_zero_and_counts_the_refusals() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let url = format!("ws://127.0.0.1:{}/not-steve", central.port);
    let (ok, summary, _) = simulate(&url, "SIM-REFUSED-").await;
    assert!(!ok, "a fleet that never connected must fail: {summary}");
    assert_eq!(
        summary["errors"]["handshake_refused"], CHARGERS,
        "{summary}"
    );
}
