//! The chaos conservation test of issue 8: random sessions from a fleet of re-sending python
//! charge points while the bridge is SIGKILLed every few seconds, Lago misbehaves on its own
//! schedule and the upstream central system is killed and restarted on its state file. Then Lago
//! must hold exactly the energy every charger reported, per session and to the exact decimal,
//! with nothing duplicated, nothing pending and no dead letter.
//!
//! The defaults are the CI short form; `bench/chaos --long` sets `CHAOS_SESSIONS`,
//! `CHAOS_CHARGERS` and `CHAOS_DURATION_SECS` for hours, and `CHAOS_SEED` repeats a run's
//! schedule and session shapes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rust_decimal::Decimal;
use serde_json::Value;

use crate::delivery::{Rng, assert_exactly_once, join_fleet, spawn_fleet};
use crate::support::bridge::{Bridge, BridgeOptions};
use crate::support::e2e::{
    self, RanSession, SpoolCounts, dead_letter_details, spool_counts, stored_kwh,
};
use crate::support::lago::{Fault, LagoStandIn, StoreMode, StoredRow};
use crate::support::peers::{CentralOptions, CentralSystem, Implementation};
use crate::support::poll_until;

/// Connections per charge point process: enough to keep the process count (and CPU) low.
const CONNECTIONS_PER_PROCESS: usize = 10;

/// The size of a run, from the environment (defaults: the CI short form).
#[derive(Debug, Clone, Copy)]
struct Plan {
    seed: u64,
    processes: usize,
    connections: usize,
    sessions_per_connection: usize,
    /// How long the chargers are paced to take; kills and restarts only add to it.
    duration: Duration,
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={text:?} is not a whole number: {e}")),
        Err(_) => default,
    }
}

/// SplitMix64's finaliser: nearby clock readings become unrelated xorshift seeds.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Plan {
    fn from_env(mode: Mode) -> Plan {
        let sessions = env_u64("CHAOS_SESSIONS", 1_000).max(1) as usize;
        let chargers = env_u64("CHAOS_CHARGERS", 50).max(1) as usize;
        let duration = Duration::from_secs(env_u64("CHAOS_DURATION_SECS", 45).max(5));
        // Two runs started in the same instant still get unrelated seeds.
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let seed = env_u64("CHAOS_SEED", splitmix64(clock ^ mode as u64)) | 1;
        let processes = chargers.div_ceil(CONNECTIONS_PER_PROCESS);
        Plan {
            seed,
            processes,
            connections: chargers.div_ceil(processes),
            sessions_per_connection: sessions.div_ceil(chargers),
            duration,
        }
    }

    fn chargers(&self) -> usize {
        self.processes * self.connections
    }

    fn sessions(&self) -> usize {
        self.chargers() * self.sessions_per_connection
    }

    /// The pause after each transaction message that spreads the sessions over `duration`: a
    /// session is about 4 pauses (Start, 2 MeterValues on average, Stop).
    fn interval_secs(&self) -> f64 {
        (self.duration.as_secs_f64() / (self.sessions_per_connection as f64 * 4.0)).max(0.005)
    }

    /// The chargers' deadline: room for the kills, restarts and reconnects on top of the pace.
    fn fleet_limit(&self) -> Duration {
        self.duration * 2 + Duration::from_secs(60)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Session = 1,
    Incremental = 2,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Session => "session",
            Mode::Incremental => "incremental",
        }
    }

    /// Session mode against the Postgres path (unique ids, 422 on a duplicate); incremental
    /// against ClickHouse (a duplicate with another timestamp would be a second row).
    fn store(self) -> StoreMode {
        match self {
            Mode::Session => StoreMode::Postgres,
            Mode::Incremental => StoreMode::ClickHouse,
        }
    }
}

/// Lago faults injected, by kind.
#[derive(Debug, Default, Clone, Copy)]
struct LagoFaults {
    down: u64,
    internal_error: u64,
    rate_limited: u64,
    slow: u64,
}

impl LagoFaults {
    fn total(&self) -> u64 {
        self.down + self.internal_error + self.rate_limited + self.slow
    }
}

/// Lago misbehaves on its own random schedule until `stop`: down, 500s, 429 with Retry-After,
/// slow answers (some beyond the bridge's 3 s request timeout, so Lago stores a batch the bridge
/// thinks failed).
fn lago_chaos(
    lago: Arc<LagoStandIn>,
    stop: Arc<AtomicBool>,
    mut rng: Rng,
    max_rounds: u64,
) -> tokio::task::JoinHandle<LagoFaults> {
    tokio::spawn(async move {
        let mut faults = LagoFaults::default();
        for _ in 0..max_rounds {
            tokio::time::sleep(rng.millis(300, 1500)).await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            match rng.next() % 4 {
                0 => {
                    lago.go_down();
                    tokio::time::sleep(rng.millis(200, 1500)).await;
                    lago.come_up();
                    faults.down += 1;
                }
                1 => {
                    let times = 1 + rng.next() % 3;
                    lago.push_faults(Fault::InternalError, times as usize);
                    faults.internal_error += times;
                }
                2 => {
                    let times = 1 + rng.next() % 2;
                    let fault = Fault::RateLimited {
                        retry_after_secs: Some(1),
                        reset_secs: 1,
                    };
                    lago.push_faults(fault, times as usize);
                    faults.rate_limited += times;
                }
                _ => {
                    let delay = if rng.next().is_multiple_of(4) {
                        rng.millis(3_000, 4_000)
                    } else {
                        rng.millis(100, 1_000)
                    };
                    lago.push_fault(Fault::Slow(delay));
                    faults.slow += 1;
                }
            }
        }
        lago.come_up();
        lago.clear_faults();
        faults
    })
}

/// Kills the central system and restarts it on its port and state file `restarts` times, spread
/// over `span`, until `stop`; hands the central system back with the count.
fn upstream_chaos(
    mut central: CentralSystem,
    stop: Arc<AtomicBool>,
    mut rng: Rng,
    restarts: u64,
    span: Duration,
) -> tokio::task::JoinHandle<(CentralSystem, u64)> {
    tokio::spawn(async move {
        let gap = span.as_millis() as u64 / (restarts + 1);
        let mut done = 0;
        for _ in 0..restarts {
            tokio::time::sleep(rng.millis(gap / 2, gap * 3 / 2)).await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            central.kill();
            tokio::time::sleep(rng.millis(300, 2_000)).await;
            central.restart().await;
            done += 1;
        }
        (central, done)
    })
}

/// The last `lines` ERROR and WARN lines of the bridge, for a failure message.
fn bridge_trouble(bridge: &Bridge, lines: usize) -> String {
    let stderr = bridge.stderr();
    let trouble: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("\"ERROR\"") || l.contains("\"WARN\""))
        .collect();
    trouble[trouble.len().saturating_sub(lines)..].join("\n")
}

/// The open dead letters with their reasons and details, one per line (20 per reason at most).
fn dead_letters_explained(bridge: &Bridge, counts: &SpoolCounts) -> String {
    let mut out = String::new();
    for reason in counts.dead_letters.keys() {
        let details = dead_letter_details(bridge.spool_path(), reason);
        for detail in details.iter().take(20) {
            out.push_str(&format!("  {reason}: {detail}\n"));
        }
        if details.len() > 20 {
            out.push_str(&format!("  … and {} more {reason}\n", details.len() - 20));
        }
    }
    out
}

/// The bridge's ERROR lines counted by message: what the chaos cost, for the log.
fn errors_by_message(bridge: &Bridge) -> BTreeMap<String, usize> {
    let mut errors = BTreeMap::new();
    for line in bridge.stderr().lines() {
        let log: Value = serde_json::from_str(line).unwrap_or_default();
        if log["level"] == "ERROR" {
            *errors.entry(log["message"].to_string()).or_default() += 1;
        }
    }
    errors
}

/// Incremental mode: the distinct events of each session sum exactly to its energy, every
/// session has at least its final event, no event belongs to no session, ids are distinct.
fn assert_sums_exact(stored: &[StoredRow], sessions: &[RanSession]) {
    let ids: HashSet<(&str, &str)> = stored
        .iter()
        .map(|r| {
            (
                r.external_subscription_id.as_str(),
                r.transaction_id.as_str(),
            )
        })
        .collect();
    assert_eq!(ids.len(), stored.len(), "duplicate event ids in Lago");
    let mut by_session: BTreeMap<(String, i64), Vec<&StoredRow>> = BTreeMap::new();
    for row in stored {
        let key = (
            row.properties["charge_box_id"]
                .as_str()
                .unwrap_or_else(|| panic!("event without charge_box_id: {row:?}"))
                .to_owned(),
            row.properties["ocpp_transaction_id"]
                .as_str()
                .and_then(|s| s.parse::<i64>().ok())
                .unwrap_or_else(|| panic!("event without ocpp_transaction_id: {row:?}")),
        );
        by_session.entry(key).or_default().push(row);
    }
    for session in sessions {
        let key = (session.charge_box_id.clone(), session.ocpp_transaction_id);
        let rows = by_session.remove(&key).unwrap_or_default();
        assert!(!rows.is_empty(), "no event in Lago for {session:?}");
        let sum: Decimal = rows.iter().map(|r| stored_kwh(r)).sum();
        assert_eq!(
            sum,
            session.kwh(),
            "{session:?}: events {:?}",
            rows.iter()
                .map(|r| (&r.transaction_id, r.value()))
                .collect::<Vec<_>>()
        );
        let prefix = format!("{}-{}:", session.charge_box_id, session.ocpp_transaction_id);
        for row in &rows {
            assert!(row.transaction_id.starts_with(&prefix), "{row:?}");
        }
    }
    assert!(
        by_session.is_empty(),
        "events of sessions no charger ran: {:?}",
        by_session.keys().collect::<Vec<_>>()
    );
}

async fn run_chaos(mode: Mode) {
    let plan = Plan::from_env(mode);
    eprintln!(
        "chaos {}: seed {} (CHAOS_SEED={} gives the same schedule and shapes); {plan:?}",
        mode.name(),
        plan.seed,
        plan.seed
    );
    let mut rng = Rng(plan.seed);
    let started = Instant::now();
    let prefix = match mode {
        Mode::Session => "CS",
        Mode::Incremental => "CI",
    };

    let state_dir = tempfile::tempdir().expect("temp dir for the central system's state");
    let central = CentralSystem::start(
        Implementation::Python,
        CentralOptions {
            state_file: Some(state_dir.path().join("central-state.json")),
            ..Default::default()
        },
    )
    .await;
    let tags: Vec<String> = (0..plan.processes)
        .map(|p| format!("TAG-{prefix}{p}"))
        .collect();
    let tag_refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    let lago = Arc::new(e2e::stand_in(mode.store(), &tag_refs).await);
    let key = lago.api_key();
    let mut extra = e2e::lago_toml(&lago, None, mode.name());
    if mode == Mode::Incremental {
        extra.push_str("transaction_id = \"{charge_box_id}-{transaction_id}\"\n");
    }
    let mut bridge = Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            extra_toml: extra,
            env: vec![("LAGO_API_KEY".into(), key.clone())],
            ..Default::default()
        },
    )
    .await;

    let (seed, interval) = (
        plan.seed.to_string(),
        format!("{:.3}", plan.interval_secs()),
    );
    let fleet = spawn_fleet(
        &bridge.charger_base_url(),
        prefix,
        plan.processes,
        plan.connections,
        plan.sessions_per_connection,
        &[
            "--seed",
            &seed,
            "--meter-values",
            "4",
            "--retry",
            "--call-timeout",
            "3",
            "--interval",
            &interval,
        ],
        plan.fleet_limit() + Duration::from_secs(10),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let duration_secs = plan.duration.as_secs();
    let lago_task = lago_chaos(
        lago.clone(),
        stop.clone(),
        Rng(plan.seed.rotate_left(17)),
        duration_secs * 4 + 100,
    );
    let upstream_task = upstream_chaos(
        central,
        stop.clone(),
        Rng(plan.seed.rotate_left(31)),
        (duration_secs / 15).max(3),
        plan.duration * 3 / 4,
    );

    // SIGKILL the bridge after random lives of 0.3-3 s for as long as the chargers run.
    let (mut kills, mut kills_while_charging) = (0usize, 0usize);
    let max_kills = plan.fleet_limit().as_secs() as usize * 4 + 10;
    let mut last_kill = Instant::now();
    while !fleet.iter().all(|run| run.is_finished())
        && kills < max_kills
        && started.elapsed() < plan.fleet_limit() + Duration::from_secs(30)
    {
        tokio::time::sleep(rng.millis(300, 3_000)).await;
        let charging = !fleet.iter().all(|run| run.is_finished());
        bridge.restart().await;
        last_kill = Instant::now();
        kills += 1;
        kills_while_charging += usize::from(charging);
    }
    let fleet_done_after = started.elapsed();
    let (sessions, reconnects) = join_fleet(fleet).await;
    stop.store(true, Ordering::Relaxed);
    let lago_faults = lago_task.await.expect("Lago chaos task");
    let (central, upstream_restarts) = upstream_task.await.expect("upstream chaos task");

    assert_eq!(sessions.len(), plan.sessions(), "every session ran");
    assert!(
        kills_while_charging >= (duration_secs / 5) as usize,
        "only {kills_while_charging} SIGKILLs while the chargers ran ({fleet_done_after:?})"
    );
    assert!(
        upstream_restarts >= 3,
        "only {upstream_restarts} upstream restarts while the chargers ran ({fleet_done_after:?})"
    );
    assert!(
        reconnects >= kills_while_charging as u64,
        "the chargers re-sent after the kills: {reconnects} reconnects"
    );

    // Every transaction message is committed before its reply, and every charger got its
    // replies: once nothing is pending, everything was delivered or dead-lettered.
    let settle_limit = Duration::from_secs(60) + Duration::from_millis(plan.sessions() as u64);
    let counts = poll_until(settle_limit, || {
        let counts = spool_counts(bridge.spool_path());
        (counts.pending == 0).then_some(counts)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "spool never settled within {settle_limit:?} of the fleet's end: {:?}; bridge trouble:\n{}",
            spool_counts(bridge.spool_path()),
            bridge_trouble(&bridge, 40)
        )
    });
    let recovered_after = last_kill.elapsed();

    assert!(
        counts.dead_letters.is_empty() && counts.dead == 0,
        "no anomaly is expected, yet: {counts:?}\n{}",
        dead_letters_explained(&bridge, &counts)
    );
    let ocpp_ids: HashSet<i64> = sessions.iter().map(|s| s.ocpp_transaction_id).collect();
    assert_eq!(
        ocpp_ids.len(),
        sessions.len(),
        "the central system gave every session its own transaction id across its restarts \
         (a harness fault: the bridge is not to blame)"
    );
    let stored = lago.stored_events();
    match mode {
        Mode::Session => assert_exactly_once(&lago, &sessions),
        Mode::Incremental => assert_sums_exact(&stored, &sessions),
    }
    assert_eq!(
        counts.delivered,
        stored.len() as i64,
        "one delivered outbox row per event in Lago"
    );
    let errors = errors_by_message(&bridge);
    let status = bridge.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "bridge exit: {status}");
    let after_exit = spool_counts(bridge.spool_path());
    assert_eq!((after_exit.pending, after_exit.dead), (0, 0));
    drop(central);

    eprintln!(
        "chaos {}: bridge ERROR lines by message: {errors:#?}",
        mode.name()
    );
    eprintln!(
        "chaos {mode}: {sessions} sessions, {chargers} chargers, {kills} SIGKILLs ({kills_while_charging} \
         while charging), {upstream_restarts} upstream restarts, {faults} Lago faults ({f:?}), \
         {events} events in Lago, 0 lost, 0 duplicates, 0 dead letters, {reconnects} charger \
         reconnects, fleet {fleet:.1}s, recovered {recovered:.1}s after the last kill, total \
         {total:.1}s, seed {seed}",
        mode = mode.name(),
        sessions = sessions.len(),
        chargers = plan.chargers(),
        faults = lago_faults.total(),
        f = lago_faults,
        events = stored.len(),
        fleet = fleet_done_after.as_secs_f64(),
        recovered = recovered_after.as_secs_f64(),
        total = started.elapsed().as_secs_f64(),
        seed = plan.seed,
    );
}

/// Session mode: exactly one event per session with the exact kWh, through every kind of chaos.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_conserves_every_session_through_kills_restarts_and_lago_faults() {
    run_chaos(Mode::Session).await;
}

/// Incremental mode: each session's distinct events sum to its exact energy, through every kind
/// of chaos.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_mode_conserves_every_session_through_kills_restarts_and_lago_faults() {
    run_chaos(Mode::Incremental).await;
}
