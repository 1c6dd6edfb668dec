//! Acceptance tests of issue 5 that need the whole daemon: the spool, the end-to-end ack and the
//! shipper against the Lago stand-in, with real `ocpp` peers, Lago faults and SIGKILLs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use ocpp_lago_bridge::event::{EventProperties, LagoEvent, TimestampSource};
use ocpp_lago_bridge::spool::store::{Changes, Store};

use crate::support::admin::readyz;
use crate::support::bridge::{Bridge, BridgeOptions};
use crate::support::e2e::{
    self, RanSession, SpoolCounts, assert_secret_not_exposed, dead_letter_details, delivered_total,
    ran_sessions, spool_counts, stored_kwh,
};
use crate::support::lago::{Fault, LagoStandIn, RouteKind, StoreMode};
use crate::support::peers::{CentralOptions, CentralSystem, Implementation, run_charger};
use crate::support::poll_until;

const PEER_LIMIT: Duration = Duration::from_secs(60);

/// A session event as the ledger would derive it, for seeding the spool.
pub(crate) fn seeded_event(
    transaction_id: &str,
    subscription: &str,
    value: &str,
    n: i64,
) -> LagoEvent {
    LagoEvent {
        transaction_id: transaction_id.into(),
        external_subscription_id: subscription.into(),
        code: e2e::METRIC.into(),
        timestamp: 1_767_225_600 + n,
        properties: EventProperties {
            value: value.into(),
            charge_box_id: "SEED-1".into(),
            connector_id: 1,
            ocpp_transaction_id: 10_000 + n,
            meter_start_wh: "0".into(),
            meter_stop_wh: "1000".into(),
            started_at: 1_767_225_000,
            stopped_at: 1_767_225_600 + n,
            charger_timestamp: Some(1_767_225_600 + n),
            received_at: 1_767_225_601 + n,
            timestamp_source: TimestampSource::Charger,
            origin: None,
        },
    }
}

/// Commits `events` into a new spool at `path` as the writer would, before the daemon starts.
pub(crate) fn seed_spool(path: &Path, events: Vec<LagoEvent>) {
    let mut store = Store::open(path).expect("create the spool");
    let changes = Changes {
        events,
        ..Default::default()
    };
    store
        .append_records(&[changes], 1_767_225_700)
        .expect("seed the spool");
}

pub(crate) async fn settle(
    bridge: &Bridge,
    limit: Duration,
    done: impl Fn(&SpoolCounts) -> bool,
) -> SpoolCounts {
    poll_until(limit, || {
        let counts = spool_counts(bridge.spool_path());
        done(&counts).then_some(counts)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "spool never settled: {:?}; bridge stderr:\n{}",
            spool_counts(bridge.spool_path()),
            bridge.stderr()
        )
    })
}

/// Poison event: one invalid event in a full batch of 100 → 99 delivered, 1 dead-lettered with
/// Lago's reason, and the batch is re-sent once without it (no retry loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_poison_event_in_a_batch_of_100_is_dead_lettered_and_99_are_delivered() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["sub-poison"]).await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    // An exponent form the Postgres path rejects; the ledger never writes one, an old or
    // hand-edited spool might.
    let events = (0..100)
        .map(|i| {
            let value = if i == 37 {
                "1e-3".to_owned()
            } else {
                format!("{i}.5")
            };
            seeded_event(&format!("p-{i:03}"), "sub-poison", &value, i)
        })
        .collect();
    seed_spool(&spool, events);
    let key_file = e2e::key_file(&lago, dir.path());
    let bridge = Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            extra_toml: e2e::lago_toml(&lago, Some(&key_file), "session"),
            spool_path: Some(spool.clone()),
            ..Default::default()
        },
    )
    .await;

    let counts = settle(&bridge, Duration::from_secs(20), |c| c.pending == 0).await;
    // Time for a retry loop to show itself, were there one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(counts.delivered, 99, "{counts:?}");
    assert_eq!(counts.dead, 1, "{counts:?}");
    assert_eq!(
        counts.dead_letters,
        BTreeMap::from([("lago_rejected".into(), 1)])
    );
    let details = dead_letter_details(&spool, "lago_rejected");
    assert!(
        details[0].contains("value_is_not_valid_number"),
        "Lago's reason is kept: {details:?}"
    );
    let stored = lago.stored_events();
    assert_eq!(stored.len(), 99);
    assert!(stored.iter().all(|r| r.transaction_id != "p-037"));
    let batches = lago.request_counts().batch;
    assert_eq!(
        batches, 2,
        "the 422'd batch, then the 99 without the poison"
    );
    assert_eq!(delivered_total(&bridge).await, 99.0);
    assert_secret_not_exposed(&bridge, &lago.api_key()).await;
}

/// Lago already holding our transaction_id: with another value it is a collision (dead letter
/// `transaction_id_collision`, Lago's event untouched); with our very event it was delivered
/// before (a lost 200) and counts as delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_colliding_transaction_id_is_dead_lettered_and_an_identical_one_is_delivered() {
    let central = CentralSystem::start(
        Implementation::Python,
        CentralOptions {
            first_transaction_id: Some(500),
            ..Default::default()
        },
    )
    .await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["TAG-COL"]).await;
    // Another session's event under the id the central system will hand out next.
    lago.seed(serde_json::json!({
        "transaction_id": "500",
        "external_subscription_id": "TAG-COL",
        "code": e2e::METRIC,
        "timestamp": 1_700_000_000,
        "properties": {"value": "99.999", "charge_box_id": "ELSEWHERE", "ocpp_transaction_id": 500},
    }));
    // Our own event, stored by Lago on an earlier attempt whose answer was lost.
    let ours = seeded_event("again-1", "TAG-COL", "2.5", 1);
    lago.seed(serde_json::to_value(&ours).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    seed_spool(&spool, vec![ours]);
    let bridge = Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            extra_toml: e2e::lago_toml(&lago, None, "session"),
            env: vec![("LAGO_API_KEY".into(), lago.api_key())],
            spool_path: Some(spool.clone()),
            ..Default::default()
        },
    )
    .await;
    let run = run_charger(
        Implementation::Python,
        &bridge.charger_base_url(),
        "COL-1",
        &["--sessions", "1", "--id-tag", "TAG-COL"],
        PEER_LIMIT,
    )
    .await;
    run.assert_ok("colliding session");
    assert_eq!(ran_sessions(&run.summary)[0].ocpp_transaction_id, 500);

    let counts = settle(&bridge, Duration::from_secs(20), |c| {
        c.pending == 0 && c.delivered + c.dead == 2
    })
    .await;
    assert_eq!(counts.delivered, 1, "the identical event: {counts:?}");
    assert_eq!(
        counts.dead_letters,
        BTreeMap::from([("transaction_id_collision".into(), 1)])
    );
    let stored = lago.stored_events();
    assert_eq!(stored.len(), 2, "Lago gained nothing: {stored:?}");
    let theirs: Vec<_> = stored
        .iter()
        .filter(|r| r.transaction_id == "500")
        .collect();
    assert_eq!(theirs.len(), 1);
    assert_eq!(
        theirs[0].value(),
        Some("99.999"),
        "Lago's event is untouched"
    );
    assert_eq!(
        stored
            .iter()
            .filter(|r| r.transaction_id == "again-1")
            .count(),
        1
    );
    assert_eq!(delivered_total(&bridge).await, 1.0);
    assert_secret_not_exposed(&bridge, &lago.api_key()).await;
}

/// Starts `processes` python charge points (each `connections` × `sessions`, tag `TAG-{prefix}{p}`)
/// with extra `args`; the handles yield their summaries.
pub(crate) fn spawn_fleet(
    url: &str,
    prefix: &str,
    processes: usize,
    connections: usize,
    sessions: usize,
    args: &[&str],
    limit: Duration,
) -> Vec<tokio::task::JoinHandle<crate::support::peers::ChargerRun>> {
    (0..processes)
        .map(|p| {
            let url = url.to_owned();
            let id = format!("{prefix}{p}");
            let mut all: Vec<String> = vec![
                "--connections".into(),
                connections.to_string(),
                "--sessions".into(),
                sessions.to_string(),
                "--id-tag".into(),
                format!("TAG-{id}"),
                "--details".into(),
            ];
            all.extend(args.iter().map(|a| a.to_string()));
            tokio::spawn(async move {
                let args: Vec<&str> = all.iter().map(String::as_str).collect();
                run_charger(Implementation::Python, &url, &id, &args, limit).await
            })
        })
        .collect()
}

/// Every session the fleet ran, and how often its chargers had to reconnect (with `--retry`).
pub(crate) async fn join_fleet(
    fleet: Vec<tokio::task::JoinHandle<crate::support::peers::ChargerRun>>,
) -> (Vec<RanSession>, u64) {
    let mut sessions = Vec::new();
    let mut reconnects = 0;
    for run in fleet {
        let run = run.await.expect("charge point task");
        run.assert_ok("charge point");
        sessions.extend(ran_sessions(&run.summary));
        if let Some(results) = run.summary["results"].as_array() {
            reconnects += results
                .iter()
                .filter_map(|r| r["reconnects"].as_u64())
                .sum::<u64>();
        }
    }
    (sessions, reconnects)
}

/// Every session has exactly one event in Lago, with the exact kWh.
pub(crate) fn assert_exactly_once(lago: &LagoStandIn, sessions: &[RanSession]) {
    let stored = lago.stored_events();
    let mut by_id: BTreeMap<&str, Vec<_>> = BTreeMap::new();
    for row in &stored {
        by_id
            .entry(row.transaction_id.as_str())
            .or_default()
            .push(row);
    }
    for session in sessions {
        let id = session.ocpp_transaction_id.to_string();
        let rows = by_id.get(id.as_str()).map_or(0, Vec::len);
        assert_eq!(rows, 1, "events in Lago for {session:?}");
        let row = by_id[id.as_str()][0];
        assert_eq!(stored_kwh(row), session.kwh(), "{session:?}: {row:?}");
        assert_eq!(
            row.properties["charge_box_id"],
            session.charge_box_id.as_str()
        );
    }
    assert_eq!(
        stored.len(),
        sessions.len(),
        "no event beyond the sessions'"
    );
}

/// The sum of metric `name` over the series matching `labels`.
async fn metric(bridge: &Bridge, name: &str, labels: &[(&str, &str)]) -> f64 {
    crate::support::admin::scrape(bridge.admin_addr)
        .await
        .sum(name, labels)
}

/// Lago down, 500s, 429 with Retry-After and 401 while sessions run: every event still reaches
/// Lago exactly once, and while the key is refused `/readyz` says 503 naming `lago`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lago_faults_while_sessions_run_delay_but_never_lose_or_duplicate_events() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let tags = ["TAG-F0", "TAG-F1", "TAG-F2"];
    let lago = e2e::stand_in(StoreMode::Postgres, &tags).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = e2e::key_file(&lago, dir.path());
    let bridge = Bridge::start_with(
        &central.url_base(),
        &e2e::lago_toml(&lago, Some(&key_file), "session"),
    )
    .await;
    let fleet = spawn_fleet(
        &bridge.charger_base_url(),
        "F",
        3,
        2,
        8,
        // Slow enough that sessions still end (and events wait) in every fault phase below.
        &["--meter-values", "2", "--interval", "0.3"],
        Duration::from_secs(90),
    );

    // Down: connections refused.
    lago.go_down();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    lago.come_up();
    // 500s: each answered, each retried (the shipper backs off and sends again).
    let retries_before = metric(&bridge, "ocpp_lago_bridge_lago_retries_total", &[]).await;
    // On the batch route: a general fault goes to whatever comes first, the startup checks.
    lago.push_route_faults(RouteKind::Batch, Fault::InternalError, 4);
    let consumed = poll_until(Duration::from_secs(15), || {
        (lago.pending_faults() == 0).then_some(())
    })
    .await;
    assert!(
        consumed.is_some(),
        "the bridge never sent the requests that get the 500s"
    );
    let answered_500 = lago
        .arrivals()
        .iter()
        .filter(|a| a.fault == Some("500") && a.path.ends_with("/events/batch"))
        .count();
    assert_eq!(answered_500, 4, "{:?}", lago.arrivals());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut retried = false;
    while !retried && Instant::now() < deadline {
        let now = metric(&bridge, "ocpp_lago_bridge_lago_retries_total", &[]).await;
        retried = now - retries_before >= 1.0;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        retried,
        "the 500s were retried: {:?}\n{}",
        lago.arrivals(),
        crate::support::admin::scrape(bridge.admin_addr).await.text
    );
    assert!(
        metric(
            &bridge,
            "ocpp_lago_bridge_lago_requests_total",
            &[("status_class", "5xx")]
        )
        .await
            >= 1.0,
        "the bridge counted the 500s"
    );
    // Then 429 with Retry-After: 1: the shipper pauses, its next batch comes no sooner.
    lago.push_route_faults(
        RouteKind::Batch,
        Fault::RateLimited {
            retry_after_secs: Some(1),
            reset_secs: 1,
        },
        2,
    );
    let consumed = poll_until(Duration::from_secs(15), || {
        (lago.pending_faults() == 0).then_some(())
    })
    .await;
    assert!(
        consumed.is_some(),
        "the bridge never sent the requests that get the 429s"
    );
    // Wait for a batch after the last 429 to be answered normally.
    let resumed = poll_until(Duration::from_secs(15), || {
        let arrivals = lago.arrivals();
        let last_429 = arrivals.iter().rposition(|a| a.fault == Some("429"))?;
        arrivals[last_429 + 1..]
            .iter()
            .any(|a| a.path.ends_with("/events/batch") && a.fault.is_none())
            .then_some(arrivals)
    })
    .await;
    let arrivals = resumed.unwrap_or_else(|| {
        panic!(
            "no batch after the 429s: {:?}\nstderr:\n{}",
            lago.arrivals(),
            bridge.stderr()
        )
    });
    for (i, limited) in arrivals.iter().enumerate() {
        if limited.fault != Some("429") || !limited.path.ends_with("/events/batch") {
            continue;
        }
        if let Some(next) = arrivals[i + 1..]
            .iter()
            .find(|a| a.path.ends_with("/events/batch"))
        {
            let gap = next.at.duration_since(limited.at);
            // Retry-After is whole seconds; a little less for the time the answer travelled.
            assert!(
                gap >= Duration::from_millis(900),
                "a batch {gap:?} after a 429 with Retry-After: 1"
            );
        }
    }
    assert!(
        bridge
            .stderr()
            .contains("Lago rate limit: the shipper pauses"),
        "the pause is logged"
    );
    // The key refused: delivery pauses and the bridge is not ready, naming Lago.
    lago.clear_faults();
    lago.push_faults(Fault::Unauthorized, 1000);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut saw_503 = None;
    while Instant::now() < deadline {
        let (status, body) = readyz(bridge.admin_addr).await;
        if status == 503 && body["not_ready"].get("lago").is_some() {
            saw_503 = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = saw_503.unwrap_or_else(|| {
        panic!(
            "/readyz never said 503 naming lago while Lago refused the key; stderr:\n{}",
            bridge.stderr()
        )
    });
    assert_eq!(body["ready"], false, "{body}");
    lago.clear_faults();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ready = false;
    while Instant::now() < deadline {
        if readyz(bridge.admin_addr).await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "/readyz is 200 again once Lago takes the key");

    let (sessions, _) = join_fleet(fleet).await;
    assert_eq!(sessions.len(), 48);
    settle(&bridge, Duration::from_secs(30), |c| {
        c.pending == 0 && c.delivered == sessions.len() as i64
    })
    .await;
    assert_exactly_once(&lago, &sessions);
    assert!(spool_counts(bridge.spool_path()).dead_letters.is_empty());
    assert_eq!(delivered_total(&bridge).await, sessions.len() as f64);
    assert_eq!(readyz(bridge.admin_addr).await.0, 200);
    assert_secret_not_exposed(&bridge, &lago.api_key()).await;
}

/// xorshift64*: reproducible randomness from a printed seed, without a dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(crate) fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

/// The crash test: 600 sessions from python charge points that re-send unanswered transaction
/// messages, while the bridge is SIGKILLed at random points ≥ 20 times and restarted on the same
/// spool and ports, and Lago goes down and answers 500 meanwhile. Afterwards Lago holds exactly
/// one event per session with the exact kWh and the spool has nothing pending or dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_points_loses_and_duplicates_nothing() {
    const PROCESSES: usize = 5;
    const CONNECTIONS: usize = 4;
    const SESSIONS: usize = 30;
    const MIN_KILLS: usize = 20;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let started = Instant::now();

    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let tags: Vec<String> = (0..PROCESSES).map(|p| format!("TAG-K{p}")).collect();
    let tag_refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    let lago = Arc::new(e2e::stand_in(StoreMode::Postgres, &tag_refs).await);
    let key = lago.api_key();
    let mut bridge = Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            extra_toml: e2e::lago_toml(&lago, None, "session"),
            env: vec![("LAGO_API_KEY".into(), key.clone())],
            ..Default::default()
        },
    )
    .await;

    let fleet = spawn_fleet(
        &bridge.charger_base_url(),
        "K",
        PROCESSES,
        CONNECTIONS,
        SESSIONS,
        &[
            "--meter-values",
            "1",
            "--retry",
            "--call-timeout",
            "3",
            "--interval",
            "0.02",
        ],
        Duration::from_secs(150),
    );

    // Lago misbehaves on its own schedule meanwhile.
    let chaos_stop = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (lago, stop, mut rng) = (lago.clone(), chaos_stop.clone(), Rng(seed.rotate_left(17)));
        tokio::spawn(async move {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) && rounds < 500 {
                rounds += 1;
                tokio::time::sleep(rng.millis(300, 1200)).await;
                match rng.next() % 3 {
                    0 => {
                        lago.go_down();
                        tokio::time::sleep(rng.millis(200, 800)).await;
                        lago.come_up();
                    }
                    1 => lago.push_faults(Fault::InternalError, 1 + (rng.next() % 3) as usize),
                    // Stored late: a kill meanwhile leaves a batch Lago holds but the spool
                    // does not know is delivered (re-sent, then verified).
                    _ => lago.push_fault(Fault::Slow(rng.millis(100, 400))),
                }
            }
            lago.come_up();
            lago.clear_faults();
        })
    };

    let (mut kills, mut kills_while_charging) = (0, 0);
    while (kills < MIN_KILLS || !fleet.iter().all(|run| run.is_finished()))
        && kills < 60
        && started.elapsed() < Duration::from_secs(150)
    {
        // Quick kills (messages in flight) until the minimum is reached, which keeps the chargers
        // slow enough to be there for it; then now and then a longer life, so the shipper gets
        // batches out and is killed while delivering too.
        let life = if kills >= MIN_KILLS && rng.next().is_multiple_of(3) {
            rng.millis(300, 1200)
        } else {
            rng.millis(50, 250)
        };
        tokio::time::sleep(life).await;
        let charging = !fleet.iter().all(|run| run.is_finished());
        bridge.restart().await;
        kills += 1;
        kills_while_charging += usize::from(charging);
    }
    let fleet_done_after = started.elapsed();
    let (sessions, reconnects) = join_fleet(fleet).await;
    chaos_stop.store(true, Ordering::Relaxed);
    chaos.await.expect("chaos task");
    assert!(
        kills_while_charging >= MIN_KILLS,
        "only {kills_while_charging} SIGKILLs happened while the chargers ran ({fleet_done_after:?}); slow the chargers down"
    );
    assert!(
        reconnects >= kills_while_charging as u64,
        "the chargers re-sent after the kills: {reconnects} reconnects"
    );
    assert_eq!(sessions.len(), PROCESSES * CONNECTIONS * SESSIONS);

    // Settled: all delivered, or a loss already visible as a dead letter (then asserted below).
    let counts = settle(&bridge, Duration::from_secs(60), |c| {
        c.pending == 0
            && (lago.stored_events().len() >= sessions.len() || !c.dead_letters.is_empty())
    })
    .await;
    assert!(counts.dead_letters.is_empty(), "{counts:?}");
    assert_exactly_once(&lago, &sessions);
    assert_eq!(counts.dead, 0, "{counts:?}");
    assert!(counts.dead_letters.is_empty(), "{counts:?}");
    assert_eq!(
        counts.delivered,
        sessions.len() as i64,
        "one outbox row per session"
    );
    assert_secret_not_exposed(&bridge, &key).await;
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for line in bridge.stderr().lines() {
        let log: Value = serde_json::from_str(line).unwrap_or_default();
        if log["level"] == "ERROR" {
            *errors.entry(log["message"].to_string()).or_default() += 1;
        }
    }
    eprintln!("crash test: bridge ERROR lines by message: {errors:#?}");
    let status = bridge.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "bridge exit: {status}");
    let after_exit = spool_counts(bridge.spool_path());
    assert_eq!((after_exit.pending, after_exit.dead), (0, 0));
    eprintln!(
        "crash test: {} sessions, {kills} SIGKILLs ({kills_while_charging} while charging), \
         {reconnects} charger reconnects, {} events in Lago, {} batch requests, {} verified \
         re-sends, {:?}",
        sessions.len(),
        lago.stored_events().len(),
        lago.request_counts().batch,
        lago.request_counts().get_event,
        started.elapsed()
    );
}

/// SIGTERM sends what is pending before the bridge exits: a part-full batch lingering for
/// `lago.batch_linger` goes at once, within `lago.shutdown_flush_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_a_lingering_batch_before_exit() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["TAG-FLUSH"]).await;
    let toml = e2e::lago_toml(&lago, None, "session").replace(
        "batch_linger = \"100ms\"",
        "batch_linger = \"60s\"\nshutdown_flush_timeout = \"10s\"",
    );
    let mut bridge = Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            extra_toml: toml,
            env: vec![("LAGO_API_KEY".into(), lago.api_key())],
            ..Default::default()
        },
    )
    .await;
    let run = run_charger(
        Implementation::Python,
        &bridge.charger_base_url(),
        "CP-FLUSH",
        &["--sessions", "1", "--id-tag", "TAG-FLUSH"],
        Duration::from_secs(30),
    )
    .await;
    run.assert_ok("charge point");
    let pending = poll_until(Duration::from_secs(5), || {
        (spool_counts(bridge.spool_path()).pending == 1).then_some(())
    })
    .await;
    assert!(pending.is_some(), "the event waits in the spool, lingering");
    assert!(
        lago.stored_events().is_empty(),
        "nothing sent before the linger ends"
    );

    let started = Instant::now();
    let status = bridge.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "bridge exit: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the flush did not wait out the 60 s linger: {:?}",
        started.elapsed()
    );
    assert_eq!(
        lago.stored_events().len(),
        1,
        "the pending event was sent on SIGTERM"
    );
    assert_eq!(spool_counts(bridge.spool_path()).pending, 0);
}
