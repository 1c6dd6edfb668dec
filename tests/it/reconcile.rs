//! Reconcile (issue 14): `ocpp-lago-bridge reconcile` audits every session SteVe recorded as
//! stopped in a window against Lago's events and the spool, and `--backfill` queues what Lago
//! is missing. SteVe's websocket side is the Python central-system peer, its REST API the
//! stand-in of `support/steve.rs` (HTTP Basic, the list's `periodType=FROM_TO` filter on the
//! start time), Lago the stand-in of `support/lago.rs` (events list with filters and pages).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::support::bridge::{BRIDGE_BIN, Bridge, BridgeOptions};
use crate::support::e2e::{self, key_file, lago_toml};
use crate::support::http;
use crate::support::lago::{LagoStandIn, StoreMode};
use crate::support::peers::{CentralOptions, CentralSystem, Implementation};
use crate::support::steve::{SteveAuth, SteveRest, SteveTransaction};
use crate::support::ws::RawCharger;
use crate::support::{poll_until, within};

const USER: &str = "bridge-audit";
const PASSWORD: &str = "au:dit:pw-91";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn iso(unix: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(unix).unwrap();
    at.format(&time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
    ))
    .unwrap()
}

/// One charger's raw OCPP-J connection, with this test's session shapes.
struct Charger(RawCharger);

impl Charger {
    async fn connect(url: &str) -> Charger {
        Charger(RawCharger::connect(url).await)
    }

    async fn call(&mut self, action: &str, payload: Value) -> Value {
        self.0.call(action, payload).await.0
    }

    async fn start(&mut self, id_tag: &str, meter_start: i64, at: i64) -> i64 {
        let reply = self
            .call(
                "StartTransaction",
                json!({"connectorId": 1, "idTag": id_tag, "meterStart": meter_start, "timestamp": iso(at)}),
            )
            .await;
        reply["transactionId"].as_i64().expect("transactionId")
    }

    async fn stop(&mut self, transaction_id: i64, meter_stop: i64, at: i64) {
        self.call(
            "StopTransaction",
            json!({"transactionId": transaction_id, "meterStop": meter_stop, "timestamp": iso(at), "reason": "Local"}),
        )
        .await;
    }
}

/// One session a charger ran somewhere: through the bridge or directly at SteVe.
async fn session(
    base_url: &str,
    charge_box_id: &str,
    tag: &str,
    start_wh: i64,
    stop_wh: i64,
) -> i64 {
    let mut charger = Charger::connect(&format!("{base_url}/{charge_box_id}")).await;
    let t = now();
    let tx = charger.start(tag, start_wh, t - 2 * 3600).await;
    charger.stop(tx, stop_wh, t - 3600).await;
    tx
}

fn steve_toml(steve: &SteveRest, dir: &Path) -> String {
    let password_file = dir.join("steve-password");
    std::fs::write(&password_file, PASSWORD).unwrap();
    format!(
        "[steve]\napi_url = \"{}\"\napi_user = \"{USER}\"\napi_password_file = \"{}\"\n\
         max_requests_per_second = 50\n",
        steve.url(),
        password_file.display()
    )
}

fn basic_steve_auth() -> SteveAuth {
    SteveAuth::Basic {
        user: USER.into(),
        password: PASSWORD.into(),
    }
}

/// What a daemon test runs against: the Python central system, SteVe's REST stand-in reading
/// its sessions from that central system's log, the Lago stand-in knowing `subscriptions`, and
/// the bridge in session mode with both configured plus `more_toml`.
/// Bound in the tests in this order (central first): locals drop in reverse, so the bridge
/// goes first and its spool directory after it, as when each was a `let` of its own.
struct Stack {
    central: CentralSystem,
    steve: SteveRest,
    lago: LagoStandIn,
    dir: tempfile::TempDir,
    bridge: Bridge,
}

async fn stack(subscriptions: &[&str], more_toml: &str) -> Stack {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let steve = SteveRest::start(basic_steve_auth(), Some(central.log_path())).await;
    let lago = e2e::stand_in(StoreMode::Postgres, subscriptions).await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(&lago, dir.path());
    let bridge = Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            extra_toml: format!(
                "{}\n{}\n{more_toml}",
                lago_toml(&lago, Some(&key), "session"),
                steve_toml(&steve, dir.path())
            ),
            ..BridgeOptions::default()
        },
    )
    .await;
    Stack {
        central,
        steve,
        lago,
        dir,
        bridge,
    }
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// The `--format json` lines, by "charge_box_id:ocpp_transaction_id".
    fn by_session(&self) -> std::collections::BTreeMap<String, Value> {
        self.stdout
            .lines()
            .map(|line| {
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"));
                let key = format!(
                    "{}:{}",
                    v["charge_box_id"].as_str().unwrap(),
                    v["ocpp_transaction_id"].as_str().unwrap_or("-")
                );
                (key, v)
            })
            .collect()
    }
}

async fn reconcile(config: &Path, args: &[&str]) -> Ran {
    let output = within(
        Duration::from_secs(60),
        "reconcile",
        tokio::process::Command::new(BRIDGE_BIN)
            .arg("reconcile")
            .arg("--config")
            .arg(config)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run reconcile");
    Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn status_of<'a>(by: &'a std::collections::BTreeMap<String, Value>, key: &str) -> &'a Value {
    by.get(key)
        .unwrap_or_else(|| panic!("no finding for {key}: {by:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_classifies_every_session_and_backfill_bills_the_missing_exactly_once() {
    let Stack {
        central,
        steve,
        lago,
        dir: _dir,
        bridge,
    } = stack(
        &["TAG-OK", "TAG-DIRECT", "TAG-PEND", "TAG-GHOST"],
        "[reconcile]\ninterval = \"1s\"\nlookback = \"3h\"\n",
    )
    .await;
    let base = bridge.charger_base_url();

    // ok: billed through the bridge. One of them is then altered in Lago (mismatch).
    let ok_a = session(&base, "CP-OK-A", "TAG-OK", 1_000, 4_200).await; // 3.2 kWh
    let ok_b = session(&base, "CP-OK-B", "TAG-OK", 0, 7).await; // 0.007 kWh
    let altered = session(&base, "CP-ALT", "TAG-OK", 10_000, 12_500).await; // 2.5 kWh
    let delivered = poll_until(Duration::from_secs(30), || {
        (lago.stored_events().len() >= 3).then_some(())
    })
    .await;
    assert!(delivered.is_some(), "Lago holds {:?}", lago.stored_events());
    assert_eq!(lago.alter_value(&altered.to_string(), "2.4"), 1);

    // pending: billed through the bridge, but Lago keeps failing on its batch (500).
    let mut pend = Charger::connect(&format!("{base}/CP-PEND")).await;
    let t = now();
    let pend_tx = pend.start("TAG-PEND", 500, t - 2 * 3600).await;
    lago.set_poison(&pend_tx.to_string(), true);
    pend.stop(pend_tx, 1_500, t - 3600).await;

    // missing: started and stopped directly at SteVe (a charger still configured for it).
    let direct_a = session(
        &central.url_base(),
        "CP-DIRECT-A",
        "TAG-DIRECT",
        2_000,
        5_333,
    )
    .await;
    let direct_b = session(&central.url_base(), "CP-DIRECT-B", "TAG-DIRECT", 0, 1_000).await;

    // unknown_in_steve: an event of the metric for a session SteVe never had.
    lago.seed(json!({
        "transaction_id": "ghost-1",
        "external_subscription_id": "TAG-OK",
        "code": e2e::METRIC,
        "timestamp": now() - 3600,
        "properties": {"value": "1.5", "charge_box_id": "CP-GHOST", "ocpp_transaction_id": "987654"},
    }));

    // Let the bridge try (and fail) the pending one at least once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let config = bridge.config_path().to_path_buf();
    let first = reconcile(&config, &["--from", "3h", "--format", "json"]).await;
    assert_eq!(
        first.code, 1,
        "stdout {}\nstderr {}",
        first.stdout, first.stderr
    );
    let by = first.by_session();
    let check = |key: String, status: &str, steve_kwh: Value, lago_kwh: Value| {
        let f = status_of(&by, &key);
        assert_eq!(f["status"], status, "{key}: {f}");
        assert_eq!(f["steve_kwh"], steve_kwh, "{key}: {f}");
        assert_eq!(f["lago_kwh"], lago_kwh, "{key}: {f}");
    };
    check(format!("CP-OK-A:{ok_a}"), "ok", json!("3.2"), json!("3.2"));
    check(
        format!("CP-OK-B:{ok_b}"),
        "ok",
        json!("0.007"),
        json!("0.007"),
    );
    check(
        format!("CP-ALT:{altered}"),
        "mismatch",
        json!("2.5"),
        json!("2.4"),
    );
    check(
        format!("CP-PEND:{pend_tx}"),
        "pending",
        json!("1"),
        json!(null),
    );
    check(
        format!("CP-DIRECT-A:{direct_a}"),
        "missing",
        json!("3.333"),
        json!(null),
    );
    check(
        format!("CP-DIRECT-B:{direct_b}"),
        "missing",
        json!("1"),
        json!(null),
    );
    check(
        "CP-GHOST:987654".into(),
        "unknown_in_steve",
        json!(null),
        json!("1.5"),
    );
    assert_eq!(
        status_of(&by, &format!("CP-DIRECT-A:{direct_a}"))["external_subscription_id"],
        "TAG-DIRECT",
        "a missing session names the subscription the rules derive"
    );
    assert_eq!(
        by.len(),
        7,
        "one line per session and unknown event: {by:#?}"
    );
    // SteVe was asked for the list with its own parameters, and about the ghost by its id.
    let targets: Vec<String> = steve.requests().iter().map(|r| r.target.clone()).collect();
    assert!(
        targets
            .iter()
            .any(|t| t.contains("type=STOPPED&periodType=FROM_TO&from=")),
        "{targets:?}"
    );
    assert!(
        targets.iter().any(|t| t.contains("transactionPk=987654")),
        "{targets:?}"
    );

    // The table for people: the sessions that are not ok, then totals per class.
    let table = reconcile(&config, &["--from", "3h"]).await;
    println!("reconcile --from 3h (table):\n{}", table.stdout);
    assert_eq!(table.code, 1);
    assert!(table.stdout.contains("mismatch"), "{}", table.stdout);
    assert!(!table.stdout.contains("CP-OK-A"), "{}", table.stdout);
    let csv = reconcile(&config, &["--from", "3h", "--format", "csv"]).await;
    assert!(csv.stdout.starts_with("status,charge_box_id,ocpp_transaction_id,external_subscription_id,steve_kwh,lago_kwh,detail\n"));
    assert_eq!(csv.stdout.lines().count(), 8);

    // --backfill: the two missing sessions are queued with origin "reconcile" and delivered
    // by the running daemon; the report after --wait is a fresh audit: they are ok now.
    let backfilled = reconcile(
        &config,
        &[
            "--from",
            "3h",
            "--format",
            "json",
            "--backfill",
            "--wait",
            "20s",
        ],
    )
    .await;
    assert!(
        backfilled.stderr.contains("backfill: queued 2 event(s)"),
        "{}",
        backfilled.stderr
    );
    let by = backfilled.by_session();
    assert_eq!(
        status_of(&by, &format!("CP-DIRECT-A:{direct_a}"))["status"],
        "ok"
    );
    assert_eq!(
        status_of(&by, &format!("CP-DIRECT-B:{direct_b}"))["lago_kwh"],
        "1"
    );
    assert_eq!(
        status_of(&by, &format!("CP-ALT:{altered}"))["status"],
        "mismatch",
        "never fixed"
    );
    assert_eq!(backfilled.code, 1, "the mismatch and the ghost remain");
    let direct_events: Vec<_> = lago
        .stored_events()
        .into_iter()
        .filter(|r| r.external_subscription_id == "TAG-DIRECT")
        .collect();
    assert_eq!(direct_events.len(), 2, "exactly once: {direct_events:?}");
    for row in &direct_events {
        assert_eq!(row.properties["origin"], "reconcile");
        assert!(
            row.properties["charge_box_id"]
                .as_str()
                .unwrap()
                .starts_with("CP-DIRECT"),
            "{row:?}"
        );
    }
    assert_eq!(
        direct_events
            .iter()
            .find(|r| r.transaction_id == direct_a.to_string())
            .map(|r| r.properties["value"].clone()),
        Some(json!("3.333")),
        "the id live billing would give ({{transaction_id}}) and SteVe's energy"
    );

    // Twice: nothing new is queued, nothing doubles.
    let again = reconcile(&config, &["--from", "3h", "--format", "json", "--backfill"]).await;
    assert!(
        again.stderr.contains("backfill: queued 0 event(s)"),
        "{}",
        again.stderr
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        lago.stored_events()
            .iter()
            .filter(|r| r.external_subscription_id == "TAG-DIRECT")
            .count(),
        2
    );
    // `spool stats` shows what reconcile queued.
    let stats = tokio::process::Command::new(BRIDGE_BIN)
        .args(["spool", "stats", "--json", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let stats: Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["reconcile_events"], 2, "{stats}");

    // The periodic run (interval 1s) publishes the classes.
    let seen = poll_until(Duration::from_secs(20), || {
        let metrics = futures_executor_get(&bridge);
        let mismatch = http::metric_value(
            &metrics,
            "ocpp_lago_bridge_reconcile_sessions{status=\"mismatch\"}",
        );
        let ok = http::metric_value(
            &metrics,
            "ocpp_lago_bridge_reconcile_sessions{status=\"ok\"}",
        );
        (mismatch == Some(1.0) && ok.is_some_and(|ok| ok >= 4.0)).then_some(metrics)
    })
    .await;
    let metrics = seen.unwrap_or_else(|| futures_executor_get(&bridge));
    assert!(
        http::metric_value(
            &metrics,
            "ocpp_lago_bridge_reconcile_last_complete_timestamp_seconds"
        )
        .is_some_and(|t| t > 0.0),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("reconcile"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// /metrics of the bridge, fetched on a helper thread (poll_until's check is synchronous).
fn futures_executor_get(bridge: &Bridge) -> String {
    let addr = bridge.admin_addr;
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(http::get(addr, "/metrics"))
            .map(|(_, body)| body)
            .unwrap_or_default()
    })
    .join()
    .unwrap()
}

/// The loss of issue 14: the spool's disk filled up, the bridge held the records it could not
/// commit in memory, and the process restarted: 16 of 20 sessions never billed, no dead letter.
/// Simulated honestly at the spool: the sessions run through the bridge while Lago is down (so
/// nothing is delivered yet), the bridge is SIGKILLed, and the tap records, session states and
/// outbox rows of 16 sessions are deleted from the spool file, which is exactly what a spool
/// that never got them holds. After the restart the bridge cannot know them; SteVe does, and
/// `reconcile --backfill` bills them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_lost_to_a_full_disk_and_a_restart_are_recovered_by_backfill() {
    let Stack {
        central: _central,
        steve: _steve,
        lago,
        dir: _dir,
        mut bridge,
    } = stack(&["TAG-LOSS"], "").await;
    lago.go_down();
    let base = bridge.charger_base_url();
    let mut sessions = Vec::new();
    for i in 0..20 {
        let tx = session(&base, &format!("CP-LOSS-{i:02}"), "TAG-LOSS", 0, 1_000 + i).await;
        sessions.push((format!("CP-LOSS-{i:02}"), tx));
    }
    bridge.kill();
    {
        let conn = rusqlite::Connection::open(bridge.spool_path()).unwrap();
        for (cb, tx) in &sessions[4..] {
            for table in ["tap_records", "sessions", "outbox"] {
                conn.execute(
                    &format!(
                        "DELETE FROM {table} WHERE charge_box_id = ?1 AND ocpp_transaction_id = ?2"
                    ),
                    rusqlite::params![cb, tx],
                )
                .unwrap();
            }
        }
    }
    lago.come_up();
    bridge.restart().await;
    let four = poll_until(Duration::from_secs(30), || {
        (lago.stored_events().len() >= 4).then_some(())
    })
    .await;
    assert!(
        four.is_some(),
        "the 4 kept sessions are delivered after the restart"
    );
    let config = bridge.config_path().to_path_buf();
    let before = reconcile(&config, &["--from", "3h", "--format", "json"]).await;
    assert_eq!(before.code, 1, "{}", before.stderr);
    let by = before.by_session();
    let missing = by.values().filter(|f| f["status"] == "missing").count();
    assert_eq!(missing, 16, "{by:#?}");
    let after = reconcile(
        &config,
        &[
            "--from",
            "3h",
            "--format",
            "json",
            "--backfill",
            "--wait",
            "20s",
        ],
    )
    .await;
    assert_eq!(
        after.code, 0,
        "stdout {}\nstderr {}",
        after.stdout, after.stderr
    );
    let by = after.by_session();
    assert_eq!(by.len(), 20);
    assert!(by.values().all(|f| f["status"] == "ok"), "{by:#?}");
    let mut ids: Vec<String> = lago
        .stored_events()
        .iter()
        .map(|r| r.transaction_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20);
    assert_eq!(
        lago.stored_events().len(),
        20,
        "each session billed exactly once"
    );
    for (i, (_, tx)) in sessions.iter().enumerate() {
        let row = lago
            .stored_events()
            .into_iter()
            .find(|r| r.transaction_id == tx.to_string())
            .unwrap();
        assert_eq!(
            e2e::stored_kwh(&row),
            rust_decimal::Decimal::new(1_000 + i as i64, 3)
        );
    }
}

/// Exit codes: 78 without SteVe's REST API configured, 69 when SteVe cannot be reached, 2 for a
/// window that ends before it starts or a time that does not parse; stdout stays empty.
#[tokio::test]
async fn exit_codes_tell_bad_config_unreachable_and_usage_apart() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("lago-key");
    std::fs::write(&key, "k-reconcile-exit").unwrap();
    let password = dir.path().join("steve-password");
    std::fs::write(&password, "pw").unwrap();
    let base = format!(
        "[lago]\napi_url = \"http://127.0.0.1:1\"\napi_key_file = \"{}\"\n[spool]\npath = \"{}/spool.db\"\n",
        key.display(),
        dir.path().display()
    );
    let without_steve = dir.path().join("no-steve.toml");
    std::fs::write(&without_steve, &base).unwrap();
    let ran = reconcile(&without_steve, &["--from", "1h"]).await;
    assert_eq!(ran.code, 78, "{}", ran.stderr);
    assert!(ran.stderr.contains("[steve] api_url"), "{}", ran.stderr);

    // Port 1 on loopback: nothing listens there.
    let unreachable = dir.path().join("unreachable.toml");
    std::fs::write(
        &unreachable,
        format!(
            "{base}[steve]\napi_url = \"http://127.0.0.1:1/steve\"\napi_user = \"u\"\napi_password_file = \"{}\"\n",
            password.display()
        ),
    )
    .unwrap();
    let ran = reconcile(&unreachable, &["--from", "1h", "--format", "json"]).await;
    assert_eq!(ran.code, 69, "{}", ran.stderr);
    assert!(ran.stdout.is_empty(), "{}", ran.stdout);
    assert!(!ran.stderr.contains("k-reconcile-exit"), "{}", ran.stderr);

    let ran = reconcile(&unreachable, &["--from", "1h", "--to", "2h"]).await;
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    let ran = reconcile(&unreachable, &["--from", "last tuesday"]).await;
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    let ran = reconcile(&unreachable, &["--from", "1h", "--wait", "5s"]).await;
    assert_eq!(ran.code, 2, "--wait needs --backfill: {}", ran.stderr);
}

/// A `[reconcile]` config for `reconcile` run as a command (no daemon): Lago and SteVe
/// stand-ins, a spool in `dir`.
fn command_config(
    lago: &crate::support::lago::LagoStandIn,
    steve: &SteveRest,
    dir: &Path,
) -> std::path::PathBuf {
    let key = key_file(lago, dir);
    let config = dir.join("reconcile.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n{}\n[spool]\npath = \"{}/spool.db\"\n",
            lago_toml(lago, Some(&key), "session"),
            steve_toml(steve, dir),
            dir.display()
        ),
    )
    .unwrap();
    config
}

fn steve_session(
    id: i64,
    charge_box_id: &str,
    tag: &str,
    wh: (i64, i64),
    at: (i64, i64),
) -> SteveTransaction {
    let ts = |unix: i64| ocpp_lago_bridge::steve::steve_timestamp(unix).unwrap();
    SteveTransaction {
        id,
        charge_box_id: charge_box_id.into(),
        connector_id: 1,
        id_tag: tag.into(),
        start_value_wh: wh.0,
        start_timestamp: ts(at.0),
        stop_value_wh: Some(wh.1),
        stop_timestamp: Some(ts(at.1)),
    }
}

/// The command's paths no other test takes: more than one page (100) of Lago events of one
/// subscription and metric; a session that started long before `--from` (RFC 3339 here) but
/// stopped inside the window, found through `reconcile.max_session_length`; the table's totals
/// line per class with its kWh; and `--backfill --wait` with no daemon to ship, which exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reads_every_page_reaches_back_for_long_sessions_and_waits_honestly() {
    const PAGED: i64 = 105;
    let steve = SteveRest::start(basic_steve_auth(), None).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["TAG-PAGE"]).await;
    let t = now();
    // 105 sessions billed in Lago under one subscription: all ok only if page 2 is read.
    for i in 0..PAGED {
        steve.register(steve_session(
            1 + i,
            "CP-PAGE",
            "TAG-PAGE",
            (0, 1_000),
            (t - 7200 + i, t - 3600 + i),
        ));
        lago.seed(json!({
            "transaction_id": (1 + i).to_string(),
            "external_subscription_id": "TAG-PAGE",
            "code": e2e::METRIC,
            "timestamp": t - 3600 + i,
            "properties": {"value": "1", "charge_box_id": "CP-PAGE", "ocpp_transaction_id": (1 + i).to_string()},
        }));
    }
    // Started 30 h before the window, stopped inside it: SteVe's list filters on the start,
    // so only the max_session_length lookback (7 days by default) finds it. Not in Lago.
    steve.register(steve_session(
        500,
        "CP-LONG",
        "TAG-PAGE",
        (10_000, 12_500),
        (t - 30 * 3600, t - 3600),
    ));
    // Started and stopped before the window: not the window's business.
    steve.register(steve_session(
        501,
        "CP-EARLY",
        "TAG-PAGE",
        (0, 4_000),
        (t - 30 * 3600, t - 3 * 3600),
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = command_config(&lago, &steve, dir.path());
    let from = iso(t - 2 * 3600);

    let ran = reconcile(&config, &["--from", &from, "--format", "json"]).await;
    assert_eq!(ran.code, 1, "stdout {}\nstderr {}", ran.stdout, ran.stderr);
    let by = ran.by_session();
    assert_eq!(by.len(), PAGED as usize + 1, "{by:#?}");
    let paged_ok = (1..=PAGED)
        .filter(|tx| status_of(&by, &format!("CP-PAGE:{tx}"))["status"] == "ok")
        .count();
    assert_eq!(paged_ok, PAGED as usize, "every page read: {by:#?}");
    let long = status_of(&by, "CP-LONG:500");
    assert_eq!(long["status"], "missing", "{long}");
    assert_eq!(long["steve_kwh"], "2.5", "{long}");
    assert!(!by.contains_key("CP-EARLY:501"), "{by:#?}");
    let pages: Vec<String> = lago
        .request_paths()
        .into_iter()
        .filter(|p| p.contains("external_subscription_id=TAG"))
        .collect();
    assert!(
        pages.iter().any(|p| p.contains("page=2")),
        "Lago's second page was asked for: {pages:?}"
    );
    assert!(
        pages.iter().all(|p| !p.contains("page=3")),
        "no page past the last: {pages:?}"
    );

    // The table: totals per class with the kWh involved.
    let table = reconcile(&config, &["--from", &from]).await;
    println!("reconcile (table):\n{}", table.stdout);
    assert_eq!(table.code, 1);
    let total = |class: &str| {
        table
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(class) && l.contains("session(s)"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no totals line for {class}: {}", table.stdout))
    };
    assert_eq!(total("ok"), ["ok", "105", "session(s)", "105", "kWh"]);
    assert_eq!(
        total("missing"),
        ["missing", "1", "session(s)", "2.5", "kWh"]
    );
    assert_eq!(
        total("mismatch"),
        ["mismatch", "0", "session(s)", "0", "kWh"]
    );
    let missing_line = table
        .stdout
        .lines()
        .find(|l| l.contains("CP-LONG"))
        .unwrap_or_else(|| panic!("{}", table.stdout));
    assert!(missing_line.starts_with("missing"), "{missing_line}");

    // --backfill --wait with no daemon running: queued, never delivered, exit 1.
    let waited = reconcile(
        &config,
        &[
            "--from",
            &from,
            "--format",
            "json",
            "--backfill",
            "--wait",
            "1s",
        ],
    )
    .await;
    assert_eq!(
        waited.code, 1,
        "stdout {}\nstderr {}",
        waited.stdout, waited.stderr
    );
    assert!(
        waited.stderr.contains("backfill: queued 1 event(s)")
            && waited
                .stderr
                .contains("NOT every queued event was delivered within 1s"),
        "{}",
        waited.stderr
    );
    assert_eq!(
        status_of(&waited.by_session(), "CP-LONG:500")["status"],
        "pending",
        "queued, not delivered"
    );
    assert!(
        lago.stored_events()
            .iter()
            .all(|r| r.external_subscription_id == "TAG-PAGE" && r.transaction_id != "500"),
        "nothing ships without a daemon"
    );
}

/// The daemon's periodic run with `[reconcile] backfill = true`: a session started and stopped
/// directly at SteVe is logged at WARN with its id, queued, and delivered to Lago exactly once;
/// later runs find it `ok` and the gauge says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_run_with_backfill_bills_a_session_only_steve_saw_exactly_once() {
    let Stack {
        central,
        steve: _steve,
        lago,
        dir: _dir,
        bridge,
    } = stack(
        &["TAG-OK", "TAG-DIRECT"],
        "[reconcile]\ninterval = \"1s\"\nlookback = \"3h\"\nbackfill = true\n",
    )
    .await;
    let through = session(&bridge.charger_base_url(), "CP-OK-P", "TAG-OK", 0, 2_000).await;
    let direct = session(
        &central.url_base(),
        "CP-DIRECT-P",
        "TAG-DIRECT",
        1_000,
        3_250,
    )
    .await;
    let direct_id = direct.to_string();
    let billed = poll_until(Duration::from_secs(30), || {
        lago.stored_events()
            .iter()
            .any(|r| r.transaction_id == direct_id)
            .then_some(())
    })
    .await;
    assert!(
        billed.is_some(),
        "the periodic backfill delivers it: {:?}\n{}",
        lago.stored_events(),
        bridge.stderr()
    );
    let stderr = bridge.stderr();
    let warned = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| {
            l["level"] == "WARN"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("not billed exactly"))
        })
        .unwrap_or_else(|| panic!("no WARN of the missing session:\n{stderr}"));
    assert!(
        warned["sessions_to_check"]
            .as_str()
            .is_some_and(|s| s.contains(&format!("missing:CP-DIRECT-P:{direct}"))),
        "{warned}"
    );
    // Later runs: ok, and the gauge says so (both sessions ok, none missing or pending).
    let settled = poll_until(Duration::from_secs(20), || {
        let metrics = futures_executor_get(&bridge);
        let gauge = |status: &str| {
            http::metric_value(
                &metrics,
                &format!("ocpp_lago_bridge_reconcile_sessions{{status=\"{status}\"}}"),
            )
        };
        (gauge("ok") == Some(2.0) && gauge("missing") == Some(0.0) && gauge("pending") == Some(0.0))
            .then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "{}",
        futures_executor_get(&bridge)
            .lines()
            .filter(|l| l.contains("reconcile"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Two more runs: nothing doubles.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let rows: Vec<_> = lago
        .stored_events()
        .into_iter()
        .filter(|r| r.transaction_id == direct_id)
        .collect();
    assert_eq!(rows.len(), 1, "exactly once: {rows:?}");
    assert_eq!(rows[0].properties["origin"], "reconcile");
    assert_eq!(rows[0].properties["value"], "2.25");
    assert_eq!(
        lago.stored_events()
            .iter()
            .filter(|r| r.transaction_id == through.to_string())
            .count(),
        1
    );
}
