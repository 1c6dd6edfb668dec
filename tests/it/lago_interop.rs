//! Issue 13's Lago cases, each against the Lago stand-in behaving as lago-api does (Rails'
//! format suffix, `GET /events/{id}` answering the first event in the organization, the
//! filtered list) and scripted to fail the way production does: a check that keeps failing,
//! proxy 400s, a maintenance page, one event Lago keeps failing on, a lookup that hangs, an
//! outage, a wrong `api_url`. Every test here failed before the shipper's rework.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ocpp_lago_bridge::event::LagoEvent;

use crate::delivery::{seed_spool, seeded_event, settle};
use crate::support::admin::{readyz, readyz_until, scrape};
use crate::support::bridge::{Bridge, BridgeOptions, check_config};
use crate::support::e2e::{self, dead_letter_details, spool_counts};
use crate::support::lago::{Fault, LagoStandIn, RouteKind, StoreMode};
use crate::support::peers::{CentralOptions, CentralSystem, Implementation};
use crate::support::poll_until;

/// A bridge in front of a central system, shipping the seeded spool to `lago`.
async fn bridge_with(
    central: &CentralSystem,
    lago: &LagoStandIn,
    dir: &std::path::Path,
    events: Vec<LagoEvent>,
    lago_keys: &str,
) -> Bridge {
    let toml = e2e::lago_toml(lago, None, "session")
        .replace("[billing]", &format!("{lago_keys}\n[billing]"));
    bridge_with_toml(central, lago, dir, events, toml).await
}

/// [`bridge_with`] on a whole config of the caller's.
async fn bridge_with_toml(
    central: &CentralSystem,
    lago: &LagoStandIn,
    dir: &std::path::Path,
    events: Vec<LagoEvent>,
    toml: String,
) -> Bridge {
    let spool = dir.join("spool.db");
    seed_spool(&spool, events);
    Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            extra_toml: toml,
            env: vec![("LAGO_API_KEY".into(), lago.api_key())],
            spool_path: Some(spool),
            ..Default::default()
        },
    )
    .await
}

/// Once Lago takes events again: everything pending is delivered and `/readyz` answers 200.
async fn delivered_and_ready_again(bridge: &Bridge, what: &str) {
    settle(bridge, Duration::from_secs(30), |c| c.pending == 0).await;
    let last = readyz_until(bridge.admin_addr, Duration::from_secs(10), |status, _| {
        status == 200
    })
    .await;
    assert_eq!(last.0, 200, "{what}: {}", last.1);
}

fn events(prefix: &str, subscription: &str, n: i64) -> Vec<LagoEvent> {
    (0..n)
        .map(|i| {
            seeded_event(
                &format!("{prefix}{i:03}"),
                subscription,
                &format!("{i}.5"),
                i,
            )
        })
        .collect()
}

fn stored_ids(lago: &LagoStandIn) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    for row in lago.stored_events() {
        *ids.entry(row.transaction_id).or_default() += 1;
    }
    ids
}

/// Rails reads `fleet.acme.com` as id `fleet.acme` with format `com` (`subscriptions/:external_id`
/// has no format constraint in lago-api's routes): with `.` sent literally, the subscription was
/// "unknown" (dead letter) and the check of an incremental id `101:1234.5` asked for `101:1234`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dotted_subscription_and_event_ids_reach_lago_whole() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["fleet.acme.com"]).await;
    // Our event, stored by Lago on an earlier attempt whose answer was lost.
    let checked = seeded_event("101:1234.5", "fleet.acme.com", "2.5", 1);
    lago.seed(serde_json::to_value(&checked).unwrap());
    let fresh = seeded_event("101:1234.6", "fleet.acme.com", "3.5", 2);
    let dir = tempfile::tempdir().unwrap();
    let bridge = bridge_with(&central, &lago, dir.path(), vec![checked, fresh], "").await;

    let counts = settle(&bridge, Duration::from_secs(20), |c| c.pending == 0).await;
    assert_eq!(counts.delivered, 2, "{counts:?}");
    assert!(counts.dead_letters.is_empty(), "{counts:?}");
    assert_eq!(
        stored_ids(&lago),
        BTreeMap::from([("101:1234.5".into(), 1), ("101:1234.6".into(), 1)])
    );
    let paths = lago.request_paths();
    assert!(
        paths
            .iter()
            .any(|p| p == "/api/v1/subscriptions/fleet%2Eacme%2Ecom"),
        "{paths:?}"
    );
    assert!(
        paths.iter().any(|p| p == "/api/v1/events/101%3A1234%2E5"),
        "the check asked for the whole id: {paths:?}"
    );
}

/// Another session's event under `subscription` with the transaction id ours will have: what
/// `GET /events/{id}` finds first when it is older than ours.
fn seed_another_sessions_event(lago: &LagoStandIn, ocpp_transaction_id: i64, subscription: &str) {
    lago.seed(serde_json::json!({
        "transaction_id": ocpp_transaction_id.to_string(),
        "external_subscription_id": subscription,
        "code": e2e::METRIC,
        "timestamp": 1_700_000_000,
        "properties": {
            "value": "9.9",
            "charge_box_id": "ELSEWHERE",
            "ocpp_transaction_id": ocpp_transaction_id,
        },
    }));
}

/// `GET /events/{id}` answers the first event with that id in the organization: one of another
/// subscription proves nothing. Our subscription's list at our timestamp finds our copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_event_with_our_id_under_another_subscription_is_no_collision() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["sub-ours", "sub-other"]).await;
    seed_another_sessions_event(&lago, 777, "sub-other");
    let ours = seeded_event("777", "sub-ours", "2.5", 7);
    lago.seed(serde_json::to_value(&ours).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let bridge = bridge_with(&central, &lago, dir.path(), vec![ours], "").await;

    let counts = settle(&bridge, Duration::from_secs(20), |c| c.pending == 0).await;
    assert_eq!(counts.delivered, 1, "{counts:?}");
    assert!(
        counts.dead_letters.is_empty(),
        "no collision: {counts:?} {:?}",
        dead_letter_details(bridge.spool_path(), "transaction_id_collision")
    );
    assert_eq!(lago.stored_events().len(), 2, "Lago gained nothing");
    let lists: Vec<String> = lago
        .request_paths()
        .into_iter()
        .filter(|p| p.starts_with("/api/v1/events?"))
        .collect();
    assert!(!lists.is_empty(), "our subscription's events were listed");
    // DateTime.strptime-style filters: whole seconds with a zone, nothing else.
    assert!(
        lists[0].contains("timestamp_from=2026-01-01T00%3A00%3A07Z")
            && lists[0].contains("timestamp_to=2026-01-01T00%3A00%3A07Z")
            && lists[0].contains("external_subscription_id=sub-ours"),
        "{lists:?}"
    );
}

/// While the check of one event fails (500), that row waits alone with its own backoff: the
/// other events are delivered, and the batch path does not spin (it was 40 POSTs in 8 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_keeps_failing_holds_back_only_its_own_row() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["sub-c"]).await;
    let all = events("c-", "sub-c", 21);
    let checked = all[0].clone();
    lago.seed(serde_json::to_value(&checked).unwrap());
    lago.set_sticky_fault(RouteKind::GetEvent, Some(Fault::InternalError));
    let dir = tempfile::tempdir().unwrap();
    let bridge = bridge_with(&central, &lago, dir.path(), all, "").await;

    let counts = settle(&bridge, Duration::from_secs(15), |c| c.delivered == 20).await;
    assert_eq!(counts.pending, 1, "only the row to check waits: {counts:?}");
    let before = lago.request_counts();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = lago.request_counts();
    assert_eq!(
        after.batch, before.batch,
        "no POST while the check fails: {before:?} → {after:?}"
    );
    let checks = after.get_event - before.get_event;
    // retry_max_delay is 500 ms in these tests: about 8 checks in 4 s, not hundreds.
    assert!(
        (2..=12).contains(&checks),
        "the check is retried with a backoff: {checks} in 4 s"
    );
    assert!(spool_counts(bridge.spool_path()).dead_letters.is_empty());

    lago.set_sticky_fault(RouteKind::GetEvent, None);
    let counts = settle(&bridge, Duration::from_secs(20), |c| c.pending == 0).await;
    assert_eq!(counts.delivered, 21, "{counts:?}");
    assert!(counts.dead_letters.is_empty(), "{counts:?}");
    assert_eq!(stored_ids(&lago).len(), 21);
    assert!(stored_ids(&lago).values().all(|n| *n == 1));
}

/// Proxy 400s are not Lago's verdict on an event and a maintenance page is no proof of storage:
/// no event is dead-lettered or counted delivered without being in Lago (four 400s used to
/// bisect 8→4→2→1 and dead-letter a valid event; an HTML 200 was marked delivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_400s_and_a_maintenance_page_neither_dead_letter_nor_lose_an_event() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["sub-p"]).await;
    lago.push_route_faults(RouteKind::Batch, Fault::ProxyBadRequest, 4);
    lago.push_route_faults(RouteKind::Batch, Fault::MaintenancePage, 1);
    let dir = tempfile::tempdir().unwrap();
    let bridge = bridge_with(&central, &lago, dir.path(), events("p-", "sub-p", 8), "").await;

    let counts = settle(&bridge, Duration::from_secs(30), |c| c.pending == 0).await;
    assert!(counts.dead_letters.is_empty(), "{counts:?}");
    assert_eq!(counts.delivered, 8, "{counts:?}");
    let ids = stored_ids(&lago);
    assert_eq!(ids.len(), 8, "every delivered event is in Lago: {ids:?}");
    assert!(ids.values().all(|n| *n == 1));
    let metrics = scrape(bridge.admin_addr).await;
    assert!(
        metrics.sum(
            "ocpp_lago_bridge_lago_requests_total",
            &[("endpoint", "events_batch"), ("status_class", "4xx")]
        ) >= 4.0,
        "{}",
        metrics.text
    );
}

/// `too_many_events` halves every batch, and they grow back once Lago takes more: a batch
/// size that never grew back drained a later backlog up to 100× slower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_shrink_on_too_many_events_and_grow_back() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["sub-g"]).await;
    lago.set_batch_limit(30);
    let dir = tempfile::tempdir().unwrap();
    let bridge = bridge_with(&central, &lago, dir.path(), events("g-", "sub-g", 1500), "").await;

    let shrunk = poll_until(Duration::from_secs(20), || {
        (lago.stats()["accepted_batches"].as_u64() >= Some(3)).then_some(())
    })
    .await;
    assert!(shrunk.is_some(), "stderr:\n{}", bridge.stderr());
    lago.set_batch_limit(100);
    let counts = settle(&bridge, Duration::from_secs(40), |c| c.pending == 0).await;
    assert_eq!(counts.delivered, 1500, "{counts:?}");
    assert!(counts.dead_letters.is_empty(), "{counts:?}");
    let sizes = lago.stats()["accepted_batch_sizes"].clone();
    assert!(
        sizes.get("100").and_then(|n| n.as_u64()).unwrap_or(0) >= 5,
        "full batches again once Lago takes them: {sizes}"
    );
    assert!(
        sizes
            .as_object()
            .unwrap()
            .keys()
            .any(|size| size.parse::<usize>().unwrap() <= 30),
        "batches shrank under Lago's limit first: {sizes}"
    );
}

/// One event Lago keeps failing on (500 whenever it is in a batch) waits alone with its own
/// backoff; every other event is delivered, and it is never dead-lettered for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_lago_keeps_failing_on_waits_alone() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["sub-x"]).await;
    lago.set_poison("x-003", true);
    let dir = tempfile::tempdir().unwrap();
    let bridge = bridge_with(&central, &lago, dir.path(), events("x-", "sub-x", 30), "").await;

    let counts = settle(&bridge, Duration::from_secs(20), |c| c.delivered == 29).await;
    assert_eq!(counts.pending, 1, "{counts:?}");
    assert!(!stored_ids(&lago).contains_key("x-003"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(spool_counts(bridge.spool_path()).dead_letters.is_empty());

    lago.set_poison("x-003", false);
    let counts = settle(&bridge, Duration::from_secs(20), |c| c.pending == 0).await;
    assert_eq!((counts.delivered, counts.dead), (30, 0), "{counts:?}");
    assert_eq!(stored_ids(&lago).len(), 30);
}

/// A subscription lookup that hangs past `request_timeout` holds back that subscription's
/// events only (it held the whole batch: 0 POSTs in 150 s), and the failed lookups are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_subscription_lookup_holds_back_only_its_events() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["sub-a", "sub-slow"]).await;
    lago.set_subscription_fault("sub-slow", Some(Fault::Slow(Duration::from_secs(5))));
    let mut all = events("s-", "sub-slow", 2);
    all.extend(events("a-", "sub-a", 10));
    let dir = tempfile::tempdir().unwrap();
    let bridge = bridge_with(&central, &lago, dir.path(), all, "").await;
    // e2e's request_timeout is 3 s: the lookup of sub-slow times out.
    let counts = settle(&bridge, Duration::from_secs(10), |c| c.delivered == 10).await;
    assert_eq!(counts.pending, 2, "{counts:?}");
    let metrics = scrape(bridge.admin_addr).await;
    let failed = metrics.sum(
        "ocpp_lago_bridge_lago_requests_total",
        &[("endpoint", "subscription"), ("status_class", "timeout")],
    );
    let seconds = metrics.sum(
        "ocpp_lago_bridge_lago_request_seconds_count",
        &[("endpoint", "subscription")],
    );
    if failed < 1.0 {
        // The 3 s timeout may not have elapsed yet: wait for it.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let metrics = scrape(bridge.admin_addr).await;
    assert!(
        metrics.sum(
            "ocpp_lago_bridge_lago_requests_total",
            &[("endpoint", "subscription"), ("status_class", "timeout")],
        ) >= 1.0
            && seconds >= 1.0,
        "a failed lookup is counted with its endpoint:\n{}",
        metrics.text
    );
    lago.set_subscription_fault("sub-slow", None);
    let counts = settle(&bridge, Duration::from_secs(30), |c| c.pending == 0).await;
    assert_eq!(counts.delivered, 12, "{counts:?}");
}

/// `/readyz` names `lago` while Lago is down with events waiting (and while the oldest pending
/// event is older than `lago.max_pending_age`), and is ready again once they are delivered;
/// the failed GETs are counted with their endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_lago_during_an_outage_and_recovers() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["sub-r"]).await;
    lago.go_down();
    let dir = tempfile::tempdir().unwrap();
    let bridge = bridge_with(
        &central,
        &lago,
        dir.path(),
        events("r-", "sub-r", 3),
        "max_pending_age = \"10m\"",
    )
    .await;

    // Both reasons: Lago unreachable (the first failed request) and, the seeded events being
    // months old, past max_pending_age (the backlog gauge's next turn, within a second).
    let (_, last) = readyz_until(
        bridge.admin_addr,
        Duration::from_secs(15),
        |status, body| {
            let reason = body["not_ready"]["lago"].as_str().unwrap_or_default();
            status == 503 && reason.contains("unreachable") && reason.contains("max_pending_age")
        },
    )
    .await;
    let reason = last["not_ready"]["lago"].as_str().unwrap_or_default();
    assert!(
        reason.contains("unreachable") && reason.contains("max_pending_age"),
        "/readyz did not name lago as unreachable and past max_pending_age: {last}; stderr:\n{}",
        bridge.stderr()
    );
    let metrics = scrape(bridge.admin_addr).await;
    assert!(
        metrics.sum(
            "ocpp_lago_bridge_lago_requests_total",
            &[("endpoint", "billable_metric"), ("status_class", "error")]
        ) >= 1.0,
        "{}",
        metrics.text
    );
    assert_eq!(
        metrics.get("ocpp_lago_bridge_spool_pending_events", &[]),
        Some(3.0),
        "the gauge is current"
    );

    lago.come_up();
    delivered_and_ready_again(&bridge, "ready again once delivered").await;
    let metrics = scrape(bridge.admin_addr).await;
    assert_eq!(
        metrics.get("ocpp_lago_bridge_spool_pending_events", &[]),
        Some(0.0)
    );
}

/// Lago going down after the bridge confirmed the metric and the subscription: only batch POSTs
/// fail then, and each must keep `lago` named in `/readyz` (a failed batch used to count as
/// "Lago answered", so an outage behind a confirmed metric never showed, or flapped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_keeps_naming_lago_while_batches_fail() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["sub-f"]).await;
    let dir = tempfile::tempdir().unwrap();
    // The seeded events are months old: a max_pending_age far beyond it keeps the backlog
    // reason out of the way, so only reachability can name lago.
    let bridge = bridge_with(
        &central,
        &lago,
        dir.path(),
        events("f-", "sub-f", 2),
        "max_pending_age = \"3650days\"",
    )
    .await;
    settle(&bridge, Duration::from_secs(20), |c| c.pending == 0).await;
    let (status, body) = readyz(bridge.admin_addr).await;
    assert!(body["not_ready"]["lago"].is_null(), "{status} {body}");

    lago.go_down();
    // New events while Lago is down (committed from outside, as `spool requeue` does).
    seed_spool(bridge.spool_path(), events("g-", "sub-f", 2));
    let mut polls = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let (status, body) = readyz(bridge.admin_addr).await;
        let named = status == 503 && body["not_ready"]["lago"].is_string();
        if named || !polls.is_empty() {
            polls.push((named, body));
        }
        if polls.len() >= 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !polls.is_empty(),
        "/readyz never named lago while every batch failed; stderr:\n{}",
        bridge.stderr()
    );
    assert_eq!(polls.len(), 40, "polled 4 s once lago was named");
    let cleared: Vec<_> = polls.iter().filter(|(named, _)| !named).collect();
    assert!(
        cleared.is_empty(),
        "/readyz stopped naming lago during the outage: {:?}",
        cleared.first()
    );
    lago.come_up();
    settle(&bridge, Duration::from_secs(30), |c| c.pending == 0).await;
}

/// An `api_url` ending in `/api/v1` (the OpenAPI spec's server URL) is named by `check-config`;
/// one where every route is 404 is named a wrong URL, not "the metric does not exist".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_url_mistakes_are_named() {
    let output = check_config(
        "[lago]\napi_url = \"https://lago.example.com/api/v1\"\nmetric_code = \"kwh\"\n",
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("ends in /api/v1") && stderr.contains("https://lago.example.com"),
        "{stderr}"
    );

    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["sub-u"]).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = e2e::lago_toml(&lago, None, "session").replace(
        &format!("api_url = \"{}\"", lago.url()),
        &format!("api_url = \"{}/lago\"", lago.url()),
    );
    let bridge =
        bridge_with_toml(&central, &lago, dir.path(), events("u-", "sub-u", 1), toml).await;
    // Another reason may come first (e.g. the shipper's first failed batch under load): wait
    // for the one this test is about, not merely for any.
    let (_, body) = readyz_until(
        bridge.admin_addr,
        Duration::from_secs(15),
        |status, body| {
            let named = body["not_ready"]["lago"]
                .as_str()
                .is_some_and(|r| r.contains("api_url is wrong"));
            status == 503 && named
        },
    )
    .await;
    let reason = body["not_ready"]["lago"].as_str().unwrap_or_default();
    assert!(
        reason.contains("api_url is wrong"),
        "the URL is named: {body}; stderr:\n{}",
        bridge.stderr()
    );
    assert!(
        body["not_ready"].get("lago_metric").is_none(),
        "not a missing metric: {body}"
    );
    assert_eq!(
        spool_counts(bridge.spool_path()).pending,
        1,
        "nothing dropped"
    );
}

/// `/readyz` names `lago` when Lago answers, but slower than `lago.request_timeout` (a slow
/// Lago is as bad as a down one for the backlog), and is ready again once it is quick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_lago_while_it_answers_slower_than_the_request_timeout() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["sub-slow-r"]).await;
    let slow = Fault::Slow(Duration::from_secs(3));
    for route in [
        RouteKind::Batch,
        RouteKind::GetEvent,
        RouteKind::ListEvents,
        RouteKind::GetBillableMetric,
        RouteKind::GetSubscription,
    ] {
        lago.set_sticky_fault(route, Some(slow.clone()));
    }
    let dir = tempfile::tempdir().unwrap();
    // request_timeout 1 s against a Lago that takes 3 s; the backlog reason kept out of the way.
    let toml = e2e::lago_toml(&lago, None, "session")
        .replace("request_timeout = \"3s\"", "request_timeout = \"1s\"")
        .replace("[billing]", "max_pending_age = \"3650days\"\n[billing]");
    let events = events("slow-", "sub-slow-r", 2);
    let bridge = bridge_with_toml(&central, &lago, dir.path(), events, toml).await;
    let last = readyz_until(
        bridge.admin_addr,
        Duration::from_secs(15),
        |status, body| status == 503 && body["not_ready"]["lago"].is_string(),
    )
    .await;
    let reason = last.1["not_ready"]["lago"].as_str().unwrap_or_default();
    assert!(
        last.0 == 503 && reason.contains("lago.request_timeout"),
        "/readyz did not name lago as slower than request_timeout: {} {}; stderr:\n{}",
        last.0,
        last.1,
        bridge.stderr()
    );

    lago.clear_faults();
    delivered_and_ready_again(&bridge, "ready again once Lago is quick").await;
}

/// The shipper's check lists our subscription's events at our second page by page: with 110
/// other events of ours at the same second ahead of it, our copy is on page 2 (100 a page), and
/// only reading that page proves it delivered (page 1 alone would say "send again", and Lago
/// would answer `value_already_exist` forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_reads_the_second_page_of_our_subscriptions_events() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["sub-crowd", "sub-else"]).await;
    seed_another_sessions_event(&lago, 888, "sub-else");
    let ours = seeded_event("888", "sub-crowd", "2.5", 7);
    for i in 0..110 {
        let mut crowd = seeded_event(&format!("crowd-{i:03}"), "sub-crowd", "1", 7);
        crowd.properties.ocpp_transaction_id = 20_000 + i;
        lago.seed(serde_json::to_value(&crowd).unwrap());
    }
    lago.seed(serde_json::to_value(&ours).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let bridge = bridge_with(&central, &lago, dir.path(), vec![ours], "").await;

    let counts = settle(&bridge, Duration::from_secs(20), |c| c.pending == 0).await;
    assert_eq!(counts.delivered, 1, "{counts:?}");
    assert!(counts.dead_letters.is_empty(), "{counts:?}");
    assert_eq!(lago.stored_events().len(), 112, "Lago gained nothing");
    let lists: Vec<String> = lago
        .request_paths()
        .into_iter()
        .filter(|p| p.starts_with("/api/v1/events?") && p.contains("sub-crowd"))
        .collect();
    assert!(
        lists.iter().any(|p| p.contains("page=2")),
        "the check read page 2: {lists:?}"
    );
}
