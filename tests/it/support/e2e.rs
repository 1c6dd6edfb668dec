//! Shared plumbing of the end-to-end billing tests: the bridge's `[lago]`/`[billing]` config
//! against a Lago stand-in, the spool as the operator reads it, and what the charge points ran.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::Value;

use super::bridge::Bridge;
use super::http;
use super::lago::{LagoStandIn, MetricDef, StandInConfig, StoreMode, StoredRow};

/// The billable metric code the tests configure on both sides.
pub const METRIC: &str = "kwh";

/// A stand-in knowing `subscriptions` and the `kwh` sum_agg metric.
pub async fn stand_in(mode: StoreMode, subscriptions: &[&str]) -> LagoStandIn {
    LagoStandIn::start(StandInConfig {
        api_key: "lago-test-key-7f3a9c51e2".into(),
        mode,
        batch_limit: 100,
        metrics: vec![MetricDef::sum_of_value(METRIC)],
        subscriptions: subscriptions.iter().map(|s| s.to_string()).collect(),
    })
    .await
}

/// `[lago]` and `[billing]` sections sending to `lago` quickly, with the key in `key_file`.
pub fn lago_toml(lago: &LagoStandIn, key_file: Option<&Path>, mode: &str) -> String {
    let key_file = key_file.map_or_else(String::new, |p| {
        format!("api_key_file = \"{}\"\n", p.display())
    });
    format!(
        "[lago]\napi_url = \"{url}\"\n{key_file}metric_code = \"{METRIC}\"\nbatch_linger = \"100ms\"\n\
         max_requests_per_second = 100\nrequest_timeout = \"3s\"\nretry_max_delay = \"500ms\"\n\n\
         [billing]\nmode = \"{mode}\"\n",
        url = lago.url()
    )
}

/// Writes the stand-in's API key into a file of `dir` and returns its path.
pub fn key_file(lago: &LagoStandIn, dir: &Path) -> std::path::PathBuf {
    let path = dir.join("lago-api-key");
    std::fs::write(&path, format!("{}\n", lago.api_key())).expect("write key file");
    path
}

/// Outbox rows per state and dead letters per reason, read as an operator would.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SpoolCounts {
    pub pending: i64,
    pub delivered: i64,
    pub dead: i64,
    pub dead_letters: BTreeMap<String, i64>,
}

/// Reads the counts from the spool file (read-only; the daemon may be running).
pub fn spool_counts(path: &Path) -> SpoolCounts {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the spool read-only");
    conn.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    let mut counts = SpoolCounts::default();
    let mut stmt = conn
        .prepare("SELECT state, COUNT(*) FROM outbox GROUP BY state")
        .expect("outbox query");
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .expect("outbox rows");
    for row in rows {
        let (state, n) = row.expect("outbox row");
        match state.as_str() {
            "pending" => counts.pending = n,
            "delivered" => counts.delivered = n,
            _ => counts.dead = n,
        }
    }
    let mut stmt = conn
        .prepare(
            "SELECT reason, COUNT(*) FROM dead_letters WHERE requeued_at IS NULL GROUP BY reason",
        )
        .expect("dead letter query");
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .expect("dead letter rows");
    for row in rows {
        let (reason, n) = row.expect("dead letter row");
        counts.dead_letters.insert(reason, n);
    }
    counts
}

/// The `detail` of every open dead letter of `reason`.
pub fn dead_letter_details(path: &Path, reason: &str) -> Vec<String> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the spool read-only");
    let mut stmt = conn
        .prepare(
            "SELECT detail FROM dead_letters WHERE reason = ?1 AND requeued_at IS NULL ORDER BY id",
        )
        .expect("dead letter query");
    stmt.query_map([reason], |r| r.get(0))
        .expect("dead letter rows")
        .collect::<Result<_, _>>()
        .expect("dead letter detail")
}

/// One session a charge point ran: its OCPP transaction id and its register at start and stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RanSession {
    pub charge_box_id: String,
    pub ocpp_transaction_id: i64,
    pub meter_start_wh: i64,
    pub meter_stop_wh: i64,
}

impl RanSession {
    /// (meterStop − meterStart) / 1000, exactly.
    pub fn kwh(&self) -> Decimal {
        Decimal::new(self.meter_stop_wh - self.meter_start_wh, 3)
    }
}

/// The sessions in a charge point summary (single connection, or `--details`).
pub fn ran_sessions(summary: &Value) -> Vec<RanSession> {
    let results: Vec<&Value> = match summary["results"].as_array() {
        Some(results) => results.iter().collect(),
        None => vec![summary],
    };
    let mut sessions = Vec::new();
    for result in results {
        let charge_box_id = result["charge_box_id"].as_str().expect("charge_box_id");
        let ids = result["transaction_ids"]
            .as_array()
            .expect("transaction_ids");
        let meters = result["meter_wh"].as_array().expect("meter_wh");
        assert_eq!(ids.len(), meters.len(), "{result}");
        for (id, meter) in ids.iter().zip(meters) {
            sessions.push(RanSession {
                charge_box_id: charge_box_id.to_owned(),
                ocpp_transaction_id: id.as_i64().expect("transaction id"),
                meter_start_wh: meter[0].as_i64().expect("meter start"),
                meter_stop_wh: meter[1].as_i64().expect("meter stop"),
            });
        }
    }
    sessions
}

/// The exact decimal of a stored event's `value`.
pub fn stored_kwh(row: &StoredRow) -> Decimal {
    let text = row
        .value()
        .unwrap_or_else(|| panic!("event without a string value: {row:?}"));
    Decimal::from_str(text).unwrap_or_else(|e| panic!("value {text:?} is not a decimal: {e}"))
}

/// Asserts `secret` appears neither in the bridge's stderr nor in its `/metrics`.
pub async fn assert_secret_not_exposed(bridge: &Bridge, secret: &str) {
    assert!(
        !bridge.stderr().contains(secret),
        "the Lago API key appears in the bridge's stderr"
    );
    let (_, metrics) = http::get(bridge.admin_addr, "/metrics")
        .await
        .expect("/metrics answers");
    assert!(
        !metrics.contains(secret),
        "the Lago API key appears in /metrics"
    );
}

/// `ocpp_lago_bridge_events_delivered_total` from `/metrics` (0 when not yet counted).
pub async fn delivered_total(bridge: &Bridge) -> f64 {
    let (_, metrics) = http::get(bridge.admin_addr, "/metrics")
        .await
        .expect("/metrics answers");
    http::metric_value(&metrics, "ocpp_lago_bridge_events_delivered_total").unwrap_or(0.0)
}
