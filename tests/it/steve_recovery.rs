//! A Stop whose Start the bridge never saw is billed from the start SteVe recorded, through
//! SteVe's REST API (`[steve]`): HTTP Basic for SteVe ≥ 3.8, the legacy `STEVE-API-KEY` header
//! for older ones. The lookup runs beside the spool writer, so the Stop's reply never waits on
//! SteVe, and a parked Stop survives a SIGKILL. One SteVe does not know stays a `missing_start`
//! dead letter. SteVe's REST API is the stand-in of `support/steve.rs`.

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::delivery::settle;
use crate::support::bridge::{Bridge, BridgeOptions, check_config};
use crate::support::e2e::{dead_letter_details, spool_counts};
use crate::support::http;
use crate::support::recorder::{Recorder, Script};
use crate::support::steve::{SteveAuth, SteveRest, SteveTransaction};
use crate::support::ws::{self, ClientWs};
use crate::support::{poll_until, within};

const USER: &str = "bridge";
/// SteVe's API passwords may contain `:` (only the user name may not).
const PASSWORD: &str = "pa:ss:7a1c-wd";
const LEGACY_KEY: &str = "steve-key-7a1c";

fn transaction_42() -> SteveTransaction {
    SteveTransaction {
        id: 42,
        charge_box_id: "CP-REC".into(),
        connector_id: 2,
        id_tag: "TAG-REC".into(),
        start_value_wh: 1000,
        start_timestamp: "2026-01-01T10:00:00.000Z".into(),
        stop_value_wh: None,
        stop_timestamp: None,
    }
}

fn basic() -> SteveAuth {
    SteveAuth::Basic {
        user: USER.into(),
        password: PASSWORD.into(),
    }
}

/// A bridge in front of an echoing recorder with `[steve]` pointing at `steve`, Basic auth with
/// the password in a file (written into `dir`), and extra `[steve]` lines.
async fn bridge_with_basic_auth(
    recorder: &Recorder,
    steve: &SteveRest,
    dir: &Path,
    password: &str,
    steve_keys: &str,
) -> Bridge {
    let password_file = dir.join("steve-password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    // No Lago key: the events stay in the spool, where the test reads them.
    Bridge::start_opts(
        &recorder.url_base(),
        BridgeOptions {
            extra_toml: format!(
                "[steve]\napi_url = \"{}\"\napi_user = \"{USER}\"\napi_password_file = \"{}\"\n{steve_keys}\n",
                steve.url(),
                password_file.display()
            ),
            ..BridgeOptions::default()
        },
    )
    .await
}

async fn echo_recorder() -> Recorder {
    Recorder::start(Script {
        echo_callresult: true,
        ..Script::default()
    })
    .await
}

/// Sends a StopTransaction and returns how long its reply took.
async fn stop(charger: &mut ClientWs, id: &str, transaction_id: i64, meter_stop: i64) -> Duration {
    let frame = format!(
        r#"[2,"{id}","StopTransaction",{{"transactionId":{transaction_id},"meterStop":{meter_stop},"timestamp":"2026-01-01T11:00:00Z","reason":"Local"}}]"#
    );
    let sent = Instant::now();
    charger.send(Message::text(frame)).await.expect("send Stop");
    let reply = within(Duration::from_secs(10), "Stop reply", charger.next())
        .await
        .expect("a reply")
        .expect("a frame");
    assert_eq!(
        reply.into_text().unwrap().as_str(),
        format!(r#"[3,"{id}",{{}}]"#)
    );
    sent.elapsed()
}

fn outbox_events(spool: &Path) -> Vec<serde_json::Value> {
    let conn = rusqlite::Connection::open(spool).unwrap();
    let mut stmt = conn
        .prepare("SELECT event FROM outbox ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|e| serde_json::from_str(&e.unwrap()).unwrap())
        .collect()
}

fn parked_rows(spool: &Path) -> i64 {
    let conn = rusqlite::Connection::open(spool).unwrap();
    conn.query_row("SELECT COUNT(*) FROM parked_stops", [], |r| r.get(0))
        .unwrap()
}

/// CP-REC stops transaction 42, which the bridge never saw start: the Stop is billed from
/// SteVe's record of its start (`transaction_42`).
async fn stop_of_transaction_42_is_billed_from_steve(bridge: &Bridge) {
    let (mut charger, _) = ws::connect(&bridge.charger_url("CP-REC"), &["ocpp1.6"], None)
        .await
        .expect("charger connects");
    stop(&mut charger, "s1", 42, 4200).await;
    settle(bridge, Duration::from_secs(10), |c| c.pending == 1).await;
    assert_billed_from_steve(&outbox_events(bridge.spool_path())[0]);
}

fn assert_billed_from_steve(event: &serde_json::Value) {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_without_a_seen_start_is_billed_from_steves_record() {
    let steve = SteveRest::start(basic(), None).await;
    steve.register(transaction_42());
    // SteVe answers slowly: the Stop's reply must not wait for it.
    steve.set_delay(Duration::from_millis(1500));
    let recorder = echo_recorder().await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = bridge_with_basic_auth(&recorder, &steve, dir.path(), PASSWORD, "").await;

    let (mut charger, _) = ws::connect(&bridge.charger_url("CP-REC"), &["ocpp1.6"], None)
        .await
        .unwrap_or_else(|e| panic!("charger connects: {e}; bridge stderr:\n{}", bridge.stderr()));
    for (id, transaction_id, meter_stop) in [("s1", 42, 4200), ("s2", 43, 9000)] {
        let took = stop(&mut charger, id, transaction_id, meter_stop).await;
        assert!(
            took < Duration::from_millis(1000),
            "the Stop's reply waited {took:?}: it must not wait for SteVe's 1.5 s lookup"
        );
    }

    let spool = bridge.spool_path().to_path_buf();
    let settled = poll_until(Duration::from_secs(15), || {
        let counts = spool_counts(&spool);
        (counts.pending == 1 && counts.dead_letters.get("missing_start") == Some(&1)).then_some(())
    })
    .await;
    assert!(settled.is_some(), "spool: {:?}", spool_counts(&spool));
    let events = outbox_events(&spool);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_billed_from_steve(&events[0]);
    let conn = rusqlite::Connection::open(&spool).unwrap();
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
    assert_eq!(parked_rows(&spool), 0, "nothing stays parked");

    let requests = steve.requests();
    assert_eq!(
        requests.len(),
        2,
        "one lookup per unknown session: {requests:?}"
    );
    let targets: Vec<&str> = requests.iter().map(|r| r.target.as_str()).collect();
    assert!(
        targets
            .contains(&"/steve/api/v1/transactions?transactionPk=42&chargeBoxId=CP%2DREC&type=ALL"),
        "{targets:?}"
    );
    assert!(
        requests.iter().all(|r| r.authorized && r.status == 200),
        "{requests:?}"
    );
    let metrics = http::get(bridge.admin_addr, "/metrics").await.unwrap().1;
    for result in ["recovered", "unknown_to_steve"] {
        assert!(
            metrics.contains(&format!(
                "ocpp_lago_bridge_start_recoveries_total{{result=\"{result}\"}} 1"
            )),
            "{result}: {metrics}"
        );
    }
    assert!(
        !bridge.stderr().contains(PASSWORD) && !bridge.stderr().contains("pa:ss"),
        "the SteVe password is never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_steve_api_key_header_still_works_for_steve_before_3_8() {
    let steve = SteveRest::start(SteveAuth::LegacyKey(LEGACY_KEY.into()), None).await;
    steve.register(transaction_42());
    let recorder = echo_recorder().await;
    let bridge = Bridge::start_opts(
        &recorder.url_base(),
        BridgeOptions {
            extra_toml: format!("[steve]\napi_url = \"{}\"\n", steve.url()),
            env: vec![("STEVE_API_KEY".into(), LEGACY_KEY.into())],
            ..BridgeOptions::default()
        },
    )
    .await;
    stop_of_transaction_42_is_billed_from_steve(&bridge).await;
    let requests = steve.requests();
    assert!(requests.iter().all(|r| r.authorized), "{requests:?}");
    assert!(
        !bridge.stderr().contains(LEGACY_KEY),
        "the SteVe key is never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_steve_credentials_are_named_and_the_stop_becomes_missing_start_after_the_recovery_timeout()
 {
    let steve = SteveRest::start(basic(), None).await;
    steve.register(transaction_42());
    let recorder = echo_recorder().await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = "not:the-password";
    let bridge = bridge_with_basic_auth(
        &recorder,
        &steve,
        dir.path(),
        wrong,
        "recovery_timeout = \"2s\"",
    )
    .await;
    let (mut charger, _) = ws::connect(&bridge.charger_url("CP-REC"), &["ocpp1.6"], None)
        .await
        .expect("charger connects");
    let took = stop(&mut charger, "s1", 42, 4200).await;
    assert!(took < Duration::from_secs(1), "reply waited {took:?}");
    let spool = bridge.spool_path().to_path_buf();
    assert_eq!(
        within(Duration::from_secs(2), "parked", async {
            poll_until(Duration::from_secs(2), || {
                (parked_rows(&spool) == 1).then_some(())
            })
            .await
        })
        .await,
        Some(()),
        "the Stop is parked while SteVe is asked"
    );
    let settled = poll_until(Duration::from_secs(10), || {
        (spool_counts(&spool).dead_letters.get("missing_start") == Some(&1)).then_some(())
    })
    .await;
    assert!(settled.is_some(), "spool: {:?}", spool_counts(&spool));
    assert_eq!(parked_rows(&spool), 0);
    let requests = steve.requests();
    assert!(requests.len() >= 2, "retried: {requests:?}");
    assert!(requests.iter().all(|r| r.status == 401), "{requests:?}");
    let stderr = bridge.stderr();
    assert!(
        stderr.contains("refuses the bridge's REST credentials"),
        "the 401 is named: {stderr}"
    );
    assert!(
        !stderr.contains(wrong) && !stderr.contains("the-password"),
        "{stderr}"
    );
    let metrics = http::get(bridge.admin_addr, "/metrics").await.unwrap().1;
    assert!(
        metrics.contains("ocpp_lago_bridge_start_recoveries_total{result=\"error\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_stop_survives_a_sigkill_during_the_lookup_and_is_billed_once() {
    let steve = SteveRest::start(basic(), None).await;
    steve.register(transaction_42());
    // The first lookup is still in flight when the bridge is killed.
    steve.set_delay(Duration::from_secs(30));
    let recorder = echo_recorder().await;
    let dir = tempfile::tempdir().unwrap();
    let mut bridge = bridge_with_basic_auth(&recorder, &steve, dir.path(), PASSWORD, "").await;
    let (mut charger, _) = ws::connect(&bridge.charger_url("CP-REC"), &["ocpp1.6"], None)
        .await
        .expect("charger connects");
    stop(&mut charger, "s1", 42, 4200).await;
    let spool = bridge.spool_path().to_path_buf();
    assert_eq!(
        parked_rows(&spool),
        1,
        "the reply went out once the parked Stop was on disk"
    );
    bridge.kill();
    drop(charger);
    assert_eq!(
        spool_counts(&spool).pending,
        0,
        "nothing billed before SteVe answered"
    );

    steve.set_delay(Duration::ZERO);
    bridge.restart().await;
    settle(&bridge, Duration::from_secs(10), |c| {
        c.pending == 1 && parked_rows(&spool) == 0
    })
    .await;
    // A charger that resends the Stop now is a duplicate, never a second bill.
    let (mut charger, _) = ws::connect(&bridge.charger_url("CP-REC"), &["ocpp1.6"], None)
        .await
        .expect("charger reconnects");
    stop(&mut charger, "s1", 42, 4200).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = outbox_events(&spool);
    assert_eq!(events.len(), 1, "billed exactly once: {events:?}");
    assert_billed_from_steve(&events[0]);
    assert!(
        spool_counts(&spool).dead_letters.is_empty(),
        "{:?}",
        spool_counts(&spool)
    );
}

#[tokio::test]
async fn check_config_refuses_basic_auth_and_the_legacy_key_together() {
    let output = check_config(
        "[steve]\napi_url = \"http://127.0.0.1:8080/steve\"\napi_user = \"bridge\"\n\
         api_password_file = \"/run/steve-password\"\napi_key_file = \"/run/steve-key\"\n",
    )
    .await;
    assert_eq!(output.status.code(), Some(78), "{output:?}");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        said.contains("steve.api_key_file") && said.contains("both set"),
        "{said}"
    );
}

/// The recovery task as the daemon runs it (`recovery::run`, driven through the writer's own
/// channel types) against the SteVe stand-in: a session asked twice is asked of SteVe once (the
/// answer cache), and however many sessions are queued at once, SteVe never sees more than
/// `steve.max_requests_per_second` requests within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_asks_steve_once_per_session_and_never_above_its_rate() {
    use ocpp_lago_bridge::billing::writer::Command;
    use ocpp_lago_bridge::ledger::SessionKey;
    use ocpp_lago_bridge::start_lookup::{self, Lookup};

    const RATE: u32 = 4;
    const SESSIONS: i64 = 14;
    let steve = SteveRest::start(basic(), None).await;
    steve.register(transaction_42());
    let client = ocpp_lago_bridge::steve::SteveClient::new(
        &steve.url().parse().unwrap(),
        ocpp_lago_bridge::steve::SteveAuth::Basic {
            user: USER.into(),
            password: ocpp_lago_bridge::lago::ApiKey::new(PASSWORD),
        },
        Duration::from_secs(5),
    )
    .unwrap();
    let (handle, lookups) = start_lookup::channel();
    let (writer, mut commands) = tokio::sync::mpsc::channel::<Command>(64);
    let task = tokio::spawn(ocpp_lago_bridge::recovery::run(
        client,
        ocpp_lago_bridge::recovery::RecoverySettings {
            max_concurrent_requests: 8,
            recovery_timeout: Duration::from_secs(20),
        },
        ocpp_lago_bridge::steve::rate_limiter(RATE),
        lookups,
        writer.downgrade(),
    ));
    let lookup = |charge_box_id: &str, ocpp_transaction_id: i64| Lookup {
        key: SessionKey {
            charge_box_id: charge_box_id.into(),
            ocpp_transaction_id,
        },
        received_at: 1_767_265_200,
    };

    // The same session twice, the second after the first was answered: SteVe is asked once.
    for _ in 0..2 {
        assert!(handle.request(lookup("CP-REC", 42)));
        let answer = within(Duration::from_secs(5), "recovery answer", commands.recv())
            .await
            .expect("an answer");
        let Command::RecoveredStart(start) = answer else {
            panic!("SteVe knows transaction 42: {answer:?}");
        };
        assert_eq!(start.charge_box_id, "CP-REC");
    }
    assert_eq!(
        steve.requests().len(),
        1,
        "the second lookup is answered from the cache: {:?}",
        steve.requests()
    );

    // Many sessions at once (more than the concurrency allows): paced at the rate.
    for tx in 0..SESSIONS {
        assert!(handle.request(lookup("CP-RATE", 1_000 + tx)));
    }
    for _ in 0..SESSIONS {
        let answer = within(Duration::from_secs(15), "recovery answers", commands.recv())
            .await
            .expect("an answer");
        assert!(
            matches!(answer, Command::StartUnknown { .. }),
            "SteVe does not know them: {answer:?}"
        );
    }
    let requests = steve.requests();
    assert_eq!(requests.len(), 1 + SESSIONS as usize, "{requests:?}");
    // 950 ms rather than 1 s: a request that arrives a few ms late must not count twice.
    let busiest = steve.max_requests_within(Duration::from_millis(950));
    println!("recovery: {SESSIONS} lookups at {RATE}/s, busiest second at SteVe: {busiest}");
    assert!(
        busiest <= RATE as usize,
        "SteVe saw {busiest} requests within a second; the limit is {RATE}"
    );
    drop(handle);
    within(Duration::from_secs(5), "recovery task ends", task)
        .await
        .unwrap();
}

/// The daemon has two users of SteVe's REST API, start recovery and the periodic reconcile;
/// both running at once, SteVe still sees no more than `steve.max_requests_per_second` within
/// any second (each had its own limiter before, so together they reached twice the rate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_and_the_periodic_reconcile_share_one_steve_rate_limit() {
    use crate::support::e2e::{self, key_file, lago_toml};
    use crate::support::lago::StoreMode;

    const RATE: usize = 4;
    const GHOSTS: i64 = 12;
    const STOPS: i64 = 12;
    let steve = SteveRest::start(basic(), None).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["TAG-GHOST"]).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // One session SteVe knows under the subscription, so the audit lists its events; and
    // events of sessions SteVe never had: every reconcile run asks SteVe about each by id.
    let at = |unix: i64| ocpp_lago_bridge::steve::steve_timestamp(unix).unwrap();
    steve.register(SteveTransaction {
        id: 77,
        charge_box_id: "CPREAL".into(),
        connector_id: 1,
        id_tag: "TAG-GHOST".into(),
        start_value_wh: 0,
        start_timestamp: at(now - 7200),
        stop_value_wh: Some(1_000),
        stop_timestamp: Some(at(now - 3600)),
    });
    for i in 0..GHOSTS {
        lago.seed(serde_json::json!({
            "transaction_id": format!("ghost-{i}"),
            "external_subscription_id": "TAG-GHOST",
            "code": e2e::METRIC,
            "timestamp": now - 3600,
            "properties": {"value": "1", "charge_box_id": "CPGHOST", "ocpp_transaction_id": (900_000 + i).to_string()},
        }));
    }
    let recorder = echo_recorder().await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(&lago, dir.path());
    let bridge = bridge_with_basic_auth(
        &recorder,
        &steve,
        dir.path(),
        PASSWORD,
        &format!(
            "max_requests_per_second = {RATE}\nmax_concurrent_requests = 8\n\n{}\n\
             [reconcile]\ninterval = \"1s\"\nlookback = \"3h\"\n",
            lago_toml(&lago, Some(&key), "session")
        ),
    )
    .await;
    let asked = |name: &str| {
        steve
            .requests()
            .into_iter()
            .filter(|r| r.target.contains(&format!("chargeBoxId={name}")))
            .map(|r| r.arrived)
            .collect::<Vec<_>>()
    };
    let auditing = poll_until(Duration::from_secs(20), || {
        (asked("CPGHOST").len() >= 2).then_some(())
    })
    .await;
    assert!(
        auditing.is_some(),
        "the periodic reconcile asks SteVe about the ghosts: {:?}\n{}",
        steve.requests(),
        bridge.stderr()
    );

    // Stops of sessions the bridge never saw start: each is a recovery lookup.
    let (mut charger, _) = ws::connect(&bridge.charger_url("CPCUT"), &["ocpp1.6"], None)
        .await
        .expect("charger connects");
    for tx in 0..STOPS {
        stop(&mut charger, &format!("s{tx}"), 5_000 + tx, 1_000).await;
    }
    let recovered = poll_until(Duration::from_secs(30), || {
        (asked("CPCUT").len() >= STOPS as usize).then_some(())
    })
    .await;
    assert!(recovered.is_some(), "{:?}", steve.requests());
    let recovery = asked("CPCUT");
    let (first, last) = (
        *recovery.iter().min().unwrap(),
        *recovery.iter().max().unwrap(),
    );
    let audit_meanwhile = asked("CPGHOST")
        .into_iter()
        .filter(|at| *at >= first && *at <= last)
        .count();
    assert!(
        audit_meanwhile >= 2,
        "both users must be asking at once for this test to mean anything: {audit_meanwhile}"
    );
    let busiest = steve.max_requests_within(Duration::from_millis(950));
    println!(
        "SteVe: {} recovery and {audit_meanwhile} reconcile requests interleaved over {:?}; busiest second: {busiest} (limit {RATE})",
        recovery.len(),
        last - first
    );
    assert!(
        busiest <= RATE,
        "SteVe saw {busiest} requests within a second; steve.max_requests_per_second = {RATE}"
    );
}

/// `[steve] api_user` with the password from the environment (`STEVE_API_PASSWORD`, no
/// `api_password_file`): HTTP Basic with it, the Stop billed from SteVe's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_steve_api_password_may_come_from_the_environment() {
    let steve = SteveRest::start(basic(), None).await;
    steve.register(transaction_42());
    let recorder = echo_recorder().await;
    let bridge = Bridge::start_opts(
        &recorder.url_base(),
        BridgeOptions {
            extra_toml: format!(
                "[steve]\napi_url = \"{}\"\napi_user = \"{USER}\"\n",
                steve.url()
            ),
            env: vec![("STEVE_API_PASSWORD".into(), PASSWORD.into())],
            ..BridgeOptions::default()
        },
    )
    .await;
    stop_of_transaction_42_is_billed_from_steve(&bridge).await;
    let requests = steve.requests();
    assert!(
        !requests.is_empty() && requests.iter().all(|r| r.authorized),
        "{requests:?}"
    );
    assert!(!bridge.stderr().contains(PASSWORD), "never logged");
}

/// `check-config --online` probes SteVe's REST API with the configured credentials: accepted
/// with the right password (here from `STEVE_API_PASSWORD`), named as refused with a wrong one
/// (from `api_password_file`), and the password is never printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_online_probes_steve_rest_credentials() {
    use crate::support::bridge::BRIDGE_BIN;
    use crate::support::lago::{LagoStandIn, MetricDef, StandInConfig};

    let steve = SteveRest::start(basic(), None).await;
    let lago = LagoStandIn::start(StandInConfig {
        metrics: vec![MetricDef::sum_of_value("kwh")],
        ..StandInConfig::default()
    })
    .await;
    let recorder = echo_recorder().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("lago-api-key");
    std::fs::write(&key, lago.api_key()).unwrap();
    let wrong_file = dir.path().join("steve-password");
    std::fs::write(&wrong_file, "wrong:pass-9x").unwrap();
    let config_text = |password_file: Option<&Path>| {
        format!(
            "[proxy]\nupstream_url = \"{}\"\n[lago]\napi_url = \"{}\"\napi_key_file = \"{}\"\n\
             metric_code = \"kwh\"\n[spool]\npath = \"{}/spool.db\"\n\
             [steve]\napi_url = \"{}\"\napi_user = \"{USER}\"\n{}",
            recorder.url_base(),
            lago.url(),
            key.display(),
            dir.path().display(),
            steve.url(),
            password_file.map_or(String::new(), |f| format!(
                "api_password_file = \"{}\"\n",
                f.display()
            )),
        )
    };
    let probe = |name: &str, text: String, env: Option<&str>| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let mut command = tokio::process::Command::new(BRIDGE_BIN);
        command
            .args(["check-config", "--online", "--config"])
            .arg(path)
            .env_remove("STEVE_API_PASSWORD")
            .env_remove("STEVE_API_KEY")
            .kill_on_drop(true);
        if let Some(password) = env {
            command.env("STEVE_API_PASSWORD", password);
        }
        async move {
            let out = within(
                Duration::from_secs(30),
                "check-config --online",
                command.output(),
            )
            .await
            .expect("run check-config");
            (
                out.status.code(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            )
        }
    };

    let (code, said) = probe("good.toml", config_text(None), Some(PASSWORD)).await;
    println!("check-config --online, right password:\n{said}");
    assert!(
        said.contains("ok: SteVe REST") && said.contains("accepted the credentials"),
        "{said}"
    );
    assert_eq!(code, Some(0), "{said}");
    assert!(!said.contains(PASSWORD), "{said}");

    let (code, said) = probe("wrong.toml", config_text(Some(&wrong_file)), None).await;
    println!("check-config --online, wrong password:\n{said}");
    assert!(
        said.contains("SteVe REST") && said.contains("refused the credentials (HTTP 401)"),
        "{said}"
    );
    assert_ne!(code, Some(0), "{said}");
    assert!(!said.contains("wrong:pass"), "{said}");
    let statuses: Vec<u16> = steve.requests().iter().map(|r| r.status).collect();
    assert!(
        statuses.contains(&401) && statuses.iter().any(|s| *s != 401),
        "SteVe saw the right and the wrong credentials: {statuses:?}"
    );
}
