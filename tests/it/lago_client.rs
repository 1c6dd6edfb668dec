//! The real Lago client against the Lago stand-in over loopback, one test per contract outcome.

use std::time::{Duration, Instant};

use ocpp_lago_bridge::event::{EventProperties, LagoEvent, TimestampSource};
use ocpp_lago_bridge::lago::{
    ApiKey, BatchOutcome, IndexError, LagoClient, LagoClientConfig, RetryCause,
};
use ocpp_lago_bridge::shipper::outcome::{
    CheckStep, DeadLetterReason, Decision, Fate, OutboxRow, check_by_id, decide, same_event,
};
use serde_json::json;

use crate::support::lago::{Fault, LagoStandIn, MetricDef, StandInConfig, StoreMode};

const REQUEST_TIMEOUT: Duration = Duration::from_millis(700);

fn event(n: i64) -> LagoEvent {
    LagoEvent {
        transaction_id: format!("cb1-{n}"),
        external_subscription_id: "sub-1".into(),
        code: "kwh".into(),
        timestamp: 1_700_000_000 + n,
        properties: EventProperties {
            value: format!("{n}.25"),
            charge_box_id: "cb1".into(),
            connector_id: 1,
            ocpp_transaction_id: n,
            meter_start_wh: "0".into(),
            meter_stop_wh: format!("{}", n * 1000 + 250),
            started_at: 1_700_000_000,
            stopped_at: 1_700_000_000 + n,
            charger_timestamp: Some(1_700_000_000 + n),
            received_at: 1_700_000_001 + n,
            timestamp_source: TimestampSource::Charger,
            origin: None,
        },
    }
}

fn events(range: std::ops::Range<i64>) -> Vec<LagoEvent> {
    range.map(event).collect()
}

fn rows(events: &[LagoEvent]) -> Vec<OutboxRow> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| OutboxRow {
            outbox_id: i as i64,
            event: e.clone(),
        })
        .collect()
}

fn client_with_key(lago: &LagoStandIn, key: &str) -> LagoClient {
    client_for(&lago.url(), key)
}

/// The client every test here uses, for any server root.
fn client_for(api_url: &str, key: &str) -> LagoClient {
    LagoClient::new(LagoClientConfig {
        api_url: api_url.parse().expect("a server URL"),
        api_key: ApiKey::new(key),
        connect_timeout: Duration::from_millis(500),
        request_timeout: REQUEST_TIMEOUT,
    })
    .expect("client")
}

async fn start(config: StandInConfig) -> (LagoStandIn, LagoClient) {
    let lago = LagoStandIn::start(config).await;
    let client = client_with_key(&lago, &lago.api_key());
    (lago, client)
}

#[tokio::test]
async fn a_batch_is_accepted_and_stored_with_unix_timestamps_and_decimal_values() {
    let (lago, client) = start(StandInConfig::default()).await;
    let sent = events(0..3);
    let BatchOutcome::Accepted(created) = client.post_batch(&sent).await.unwrap() else {
        panic!("not accepted");
    };
    let echoed: Vec<_> = created
        .events
        .iter()
        .map(|e| e.transaction_id.as_str())
        .collect();
    assert_eq!(echoed, ["cb1-0", "cb1-1", "cb1-2"]);
    let stored = lago.stored_events();
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[2].value(), Some("2.25"));
    assert_eq!(stored[2].timestamp_secs, 1_700_000_002.0);
    assert_eq!(lago.request_counts().batch, 1);
}

#[tokio::test]
async fn postgres_duplicate_rolls_back_the_batch_and_verifies_as_delivered() {
    let (lago, client) = start(StandInConfig::default()).await;
    assert!(matches!(
        client.post_batch(&events(0..2)).await.unwrap(),
        BatchOutcome::Accepted(_)
    ));

    let retry = vec![event(2), event(1), event(3)];
    let outcome = client.post_batch(&retry).await.unwrap();
    let BatchOutcome::Rejected422 {
        index_errors,
        unattributed,
    } = &outcome
    else {
        panic!("expected 422, got {outcome:?}");
    };
    assert!(unattributed.is_empty());
    assert_eq!(index_errors.keys().copied().collect::<Vec<_>>(), [1]);
    assert!(index_errors[&1].is_only_already_exist());
    assert_eq!(lago.stored_events().len(), 2, "whole batch rolled back");

    let Decision::Settle { fates, .. } = decide(&rows(&retry), &outcome) else {
        panic!()
    };
    let fates: Vec<_> = fates.into_iter().map(|f| f.fate).collect();
    assert_eq!(fates, [Fate::Resend, Fate::Verify, Fate::Resend]);

    let stored = client
        .get_event("cb1-1")
        .await
        .unwrap()
        .expect("stored copy");
    assert!(same_event(&event(1), &stored));
    assert_eq!(
        check_by_id(&event(1), Some(&stored)),
        CheckStep::Done(Fate::Delivered)
    );

    let resend = vec![event(2), event(3)];
    assert!(matches!(
        client.post_batch(&resend).await.unwrap(),
        BatchOutcome::Accepted(_)
    ));
    let mut ids: Vec<_> = lago
        .stored_events()
        .into_iter()
        .map(|r| r.transaction_id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["cb1-0", "cb1-1", "cb1-2", "cb1-3"]);
}

#[tokio::test]
async fn a_transaction_id_held_by_another_session_is_a_collision() {
    let (lago, client) = start(StandInConfig::default()).await;
    lago.seed(json!({
        "transaction_id": "cb1-5", "external_subscription_id": "sub-1", "code": "kwh",
        "timestamp": 1_600_000_000,
        "properties": {"value": "9.0", "charge_box_id": "cb9", "ocpp_transaction_id": 5}
    }));
    let ours = event(5);
    let outcome = client
        .post_batch(std::slice::from_ref(&ours))
        .await
        .unwrap();
    let Decision::Settle { fates, .. } = decide(&rows(std::slice::from_ref(&ours)), &outcome)
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(fates[0].fate, Fate::Verify);
    let stored = client.get_event("cb1-5").await.unwrap();
    assert!(matches!(
        check_by_id(&ours, stored.as_ref()),
        CheckStep::Done(Fate::DeadLetter {
            reason: DeadLetterReason::TransactionIdCollision,
            ..
        })
    ));
}

#[tokio::test]
async fn clickhouse_accepts_duplicates_and_dedupes_on_identical_timestamp_only() {
    let (lago, client) = start(StandInConfig {
        mode: StoreMode::ClickHouse,
        ..StandInConfig::default()
    })
    .await;
    for _ in 0..2 {
        assert!(matches!(
            client.post_batch(&events(0..2)).await.unwrap(),
            BatchOutcome::Accepted(_)
        ));
    }
    assert_eq!(lago.stored_events().len(), 2, "same timestamps dedupe");
    let mut moved = event(0);
    moved.timestamp += 1;
    assert!(matches!(
        client.post_batch(&[moved]).await.unwrap(),
        BatchOutcome::Accepted(_)
    ));
    assert_eq!(
        lago.stored_events().len(),
        3,
        "another timestamp is another event"
    );
}

#[tokio::test]
async fn too_many_events_stores_nothing() {
    let (lago, client) = start(StandInConfig {
        batch_limit: 2,
        ..StandInConfig::default()
    })
    .await;
    assert_eq!(
        client.post_batch(&events(0..3)).await.unwrap(),
        BatchOutcome::TooManyEvents
    );
    assert!(lago.stored_events().is_empty());
    assert!(matches!(
        client.post_batch(&events(0..2)).await.unwrap(),
        BatchOutcome::Accepted(_)
    ));
}

#[tokio::test]
async fn a_wrong_key_or_an_injected_401_is_unauthorized() {
    let (lago, client) = start(StandInConfig::default()).await;
    let wrong = client_with_key(&lago, "not-the-key");
    assert_eq!(
        wrong.post_batch(&events(0..1)).await.unwrap(),
        BatchOutcome::Unauthorized { status: 401 }
    );
    lago.push_fault(Fault::Unauthorized);
    assert_eq!(
        client.post_batch(&events(0..1)).await.unwrap(),
        BatchOutcome::Unauthorized { status: 401 }
    );
    assert!(lago.stored_events().is_empty());
    let error = wrong.get_event("cb1-0").await.unwrap_err();
    assert!(!format!("{error} {error:?} {wrong:?}").contains("not-the-key"));
}

#[tokio::test]
async fn a_429_pauses_for_retry_after_else_the_reset_header() {
    let (lago, client) = start(StandInConfig::default()).await;
    lago.push_fault(Fault::RateLimited {
        retry_after_secs: Some(7),
        reset_secs: 30,
    });
    lago.push_fault(Fault::RateLimited {
        retry_after_secs: None,
        reset_secs: 3,
    });
    assert_eq!(
        client.post_batch(&events(0..1)).await.unwrap(),
        BatchOutcome::RateLimited {
            pause: Some(Duration::from_secs(7))
        }
    );
    assert_eq!(
        client.post_batch(&events(0..1)).await.unwrap(),
        BatchOutcome::RateLimited {
            pause: Some(Duration::from_secs(3))
        }
    );
    assert!(lago.stored_events().is_empty());
}

#[tokio::test]
async fn a_500_is_retryable_and_the_same_batch_then_succeeds() {
    let (lago, client) = start(StandInConfig::default()).await;
    lago.push_faults(Fault::InternalError, 2);
    for _ in 0..2 {
        assert_eq!(
            client.post_batch(&events(0..2)).await.unwrap(),
            BatchOutcome::Retryable(RetryCause::Status(500))
        );
    }
    assert!(matches!(
        client.post_batch(&events(0..2)).await.unwrap(),
        BatchOutcome::Accepted(_)
    ));
    assert_eq!(lago.stored_events().len(), 2);
    assert_eq!(lago.request_counts().batch, 3);
}

#[tokio::test]
async fn lago_down_is_a_retryable_connection_error_until_it_comes_back() {
    let (lago, client) = start(StandInConfig::default()).await;
    lago.go_down();
    let outcome = client.post_batch(&events(0..1)).await.unwrap();
    assert!(
        matches!(
            outcome,
            BatchOutcome::Retryable(RetryCause::Connect(_) | RetryCause::Io(_))
        ),
        "a reset before any answer is retryable: {outcome:?}"
    );
    lago.come_up();
    assert!(matches!(
        client.post_batch(&events(0..1)).await.unwrap(),
        BatchOutcome::Accepted(_)
    ));
}

#[tokio::test]
async fn a_refused_connection_is_a_retryable_connect_error() {
    // A port bound without SO_REUSEADDR and never listened on refuses every connection, and no
    // other test can take it while the socket lives.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let client = client_for(&format!("http://{}", held.local_addr().unwrap()), "key");
    let outcome = client.post_batch(&events(0..1)).await.unwrap();
    assert!(
        matches!(outcome, BatchOutcome::Retryable(RetryCause::Connect(_))),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_slow_lago_times_out_with_the_outcome_unknown() {
    let (lago, client) = start(StandInConfig::default()).await;
    lago.push_fault(Fault::Slow(REQUEST_TIMEOUT * 2));
    let began = Instant::now();
    assert_eq!(
        client.post_batch(&events(0..1)).await.unwrap(),
        BatchOutcome::Retryable(RetryCause::Timeout)
    );
    assert!(began.elapsed() < REQUEST_TIMEOUT * 2);
    // The stand-in still stores it after the delay: why a timeout is "unknown", never "failed".
    let deadline = Instant::now() + Duration::from_secs(5);
    while lago.stored_events().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lago.stored_events().len(), 1);
}

#[tokio::test]
async fn an_unparseable_200_is_its_own_outcome() {
    let (lago, client) = start(StandInConfig::default()).await;
    lago.push_fault(Fault::GarbageOk);
    let outcome = client.post_batch(&events(0..2)).await.unwrap();
    let BatchOutcome::AcceptedUnparseable { body, .. } = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(body.contains("this is not json"));
    assert_eq!(lago.stored_events().len(), 2);
}

#[tokio::test]
async fn a_poison_event_in_100_is_dead_lettered_and_99_are_stored() {
    let (lago, client) = start(StandInConfig::default()).await;
    let mut batch = events(0..100);
    batch[41].properties.value = "1e-3".into();
    let outcome = client.post_batch(&batch).await.unwrap();
    let Decision::Settle { fates, .. } = decide(&rows(&batch), &outcome) else {
        panic!("{outcome:?}")
    };
    assert!(lago.stored_events().is_empty());
    let mut resend = Vec::new();
    for (event, fate) in batch.iter().zip(&fates) {
        match &fate.fate {
            Fate::Resend => resend.push(event.clone()),
            Fate::DeadLetter { reason, detail } => {
                assert_eq!(event.transaction_id, "cb1-41");
                assert_eq!(*reason, DeadLetterReason::LagoRejected);
                assert_eq!(detail, "properties: value_is_not_valid_number");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(resend.len(), 99);
    assert!(matches!(
        client.post_batch(&resend).await.unwrap(),
        BatchOutcome::Accepted(_)
    ));
    assert_eq!(lago.stored_events().len(), 99);
    assert_eq!(lago.request_counts().batch, 2);
}

#[tokio::test]
async fn a_plain_string_error_is_kept_per_index() {
    let mut broken = MetricDef::sum_of_value("broken");
    broken.expression_fails = true;
    let (_lago, client) = start(StandInConfig {
        metrics: vec![MetricDef::sum_of_value("kwh"), broken],
        ..StandInConfig::default()
    })
    .await;
    let mut batch = events(0..3);
    batch[2].code = "broken".into();
    let BatchOutcome::Rejected422 { index_errors, .. } = client.post_batch(&batch).await.unwrap()
    else {
        panic!("expected 422");
    };
    assert!(matches!(&index_errors[&2], IndexError::Message(m) if m.contains("undefined method")));
}

#[tokio::test]
async fn an_iso_timestamp_is_rejected_as_invalid_format() {
    // Our LagoEvent cannot carry one; this pins the stand-in to the contract with a raw request.
    let (lago, _client) = start(StandInConfig::default()).await;
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/events/batch", lago.url()))
        .bearer_auth(lago.api_key())
        .json(&json!({"events": [{
            "transaction_id": "t", "external_subscription_id": "sub-1", "code": "kwh",
            "timestamp": "2025-01-01T00:00:00Z", "properties": {"value": "1"}
        }]}))
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 422);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body["error_details"]["0"]["timestamp"],
        json!(["invalid_format"])
    );
}

#[tokio::test]
async fn unknown_subscriptions_and_codes_are_accepted_so_lookups_must_catch_them() {
    let (lago, client) = start(StandInConfig::default()).await;
    let mut stray = event(7);
    stray.external_subscription_id = "sub-unknown".into();
    stray.code = "no_such_metric".into();
    assert!(matches!(
        client.post_batch(&[stray]).await.unwrap(),
        BatchOutcome::Accepted(_)
    ));

    assert!(
        client
            .get_subscription("sub-unknown")
            .await
            .unwrap()
            .is_none()
    );
    let subscription = client
        .get_subscription("sub-1")
        .await
        .unwrap()
        .expect("known");
    assert_eq!(subscription.status, "active");

    assert!(
        client
            .get_billable_metric("no_such_metric")
            .await
            .unwrap()
            .is_none()
    );
    let metric = client
        .get_billable_metric("kwh")
        .await
        .unwrap()
        .expect("known");
    assert!(metric.sums_field("value"));

    lago.set_metrics(vec![MetricDef {
        field_name: Some("energy".into()),
        ..MetricDef::sum_of_value("kwh")
    }]);
    let metric = client
        .get_billable_metric("kwh")
        .await
        .unwrap()
        .expect("known");
    assert!(
        !metric.sums_field("value"),
        "a metric summing another field bills 0"
    );

    assert!(client.get_event("never-sent").await.unwrap().is_none());
    let counts = lago.request_counts();
    assert_eq!(
        (
            counts.get_subscription,
            counts.get_billable_metric,
            counts.get_event
        ),
        (2, 3, 1)
    );
}

#[tokio::test]
async fn a_transaction_id_needing_escapes_round_trips_through_the_path() {
    let (_lago, client) = start(StandInConfig::default()).await;
    let mut odd = event(1);
    odd.transaction_id = "cb 1/tx#1?x".into();
    assert!(matches!(
        client.post_batch(std::slice::from_ref(&odd)).await.unwrap(),
        BatchOutcome::Accepted(_)
    ));
    let stored = client
        .get_event(&odd.transaction_id)
        .await
        .unwrap()
        .expect("found");
    assert!(same_event(&odd, &stored));
}
