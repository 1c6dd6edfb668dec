use super::*;
use proptest::prelude::*;
use std::collections::HashMap;
use std::str::FromStr;

const T0: i64 = 1_700_000_000;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn rules(mode: BillingMode) -> BillingRules {
    BillingRules::new(
        mode,
        "kwh",
        "{charge_box_id}-{transaction_id}",
        "sub_{id_tag}",
    )
    .unwrap()
}

fn start(txid: i64, meter_start: &str, ts: i64) -> TapRecord {
    TapRecord {
        charge_box_id: "CB".into(),
        received_at: ts,
        kind: TapKind::Start(StartRecord {
            connector_id: 1,
            id_tag: "TAG".into(),
            meter_start_wh: d(meter_start),
            timestamp: Some(ts),
            ocpp_transaction_id: txid,
            id_tag_status: "Accepted".into(),
        }),
    }
}

fn mv(txid: i64, readings: &[(&str, i64)], received_at: i64) -> TapRecord {
    TapRecord {
        charge_box_id: "CB".into(),
        received_at,
        kind: TapKind::MeterValues(MeterValuesRecord {
            connector_id: 1,
            ocpp_transaction_id: txid,
            readings: readings
                .iter()
                .map(|(wh, ts)| EnergyReading {
                    timestamp: Some(*ts),
                    wh: d(wh),
                    context: "Sample.Periodic".into(),
                    resolution_wh: Decimal::ONE,
                })
                .collect(),
        }),
    }
}

fn stop(txid: i64, meter_stop: &str, ts: i64) -> TapRecord {
    TapRecord {
        charge_box_id: "CB".into(),
        received_at: ts,
        kind: TapKind::Stop(StopRecord {
            ocpp_transaction_id: txid,
            meter_stop_wh: d(meter_stop),
            timestamp: Some(ts),
            id_tag: None,
            reason: None,
            begin_reading: None,
            readings: vec![],
        }),
    }
}

fn reasons(a: &Applied) -> Vec<&'static str> {
    a.anomalies.iter().map(|x| x.reason.as_str()).collect()
}

#[test]
fn session_mode_one_event_at_stop() {
    let r = rules(BillingMode::Session);
    let mut l = Ledger::new();
    assert!(l.apply(&start(42, "1000", T0), &r).events.is_empty());
    assert!(
        l.apply(&mv(42, &[("2000", T0 + 60)], T0 + 60), &r)
            .events
            .is_empty()
    );
    let a = l.apply(&stop(42, "4200", T0 + 3600), &r);
    assert_eq!(a.anomalies, vec![]);
    assert_eq!(
        a.events,
        vec![LagoEvent {
            transaction_id: "CB-42".into(),
            external_subscription_id: "sub_TAG".into(),
            code: "kwh".into(),
            timestamp: T0 + 3600,
            properties: EventProperties {
                value: "3.2".into(),
                charge_box_id: "CB".into(),
                connector_id: 1,
                ocpp_transaction_id: 42,
                meter_start_wh: "1000".into(),
                meter_stop_wh: "4200".into(),
                started_at: T0,
                stopped_at: T0 + 3600,
                charger_timestamp: Some(T0 + 3600),
                received_at: T0 + 3600,
                timestamp_source: TimestampSource::Charger,
            },
        }]
    );
    assert_eq!(a.touched.len(), 1);
    // duplicate and conflicting Stops
    let a = l.apply(&stop(42, "4200", T0 + 3600), &r);
    assert_eq!(a.ignored, vec![Ignored::DuplicateStop]);
    assert!(a.events.is_empty() && a.anomalies.is_empty());
    let a = l.apply(&stop(42, "4300", T0 + 3700), &r);
    assert_eq!(reasons(&a), vec!["conflicting_stop"]);
    assert!(a.events.is_empty());
}

#[test]
fn zero_and_small_sessions() {
    let r = rules(BillingMode::Session);
    let mut l = Ledger::new();
    l.apply(&start(1, "1000", T0), &r);
    assert_eq!(
        l.apply(&stop(1, "1000", T0 + 1), &r).events[0]
            .properties
            .value,
        "0"
    );
    l.apply(&start(2, "1000", T0), &r);
    assert_eq!(
        l.apply(&stop(2, "1005", T0 + 1), &r).events[0]
            .properties
            .value,
        "0.005"
    );
    let r = rules(BillingMode::Incremental);
    l.apply(&start(3, "1000", T0), &r);
    let a = l.apply(&stop(3, "1000", T0 + 1), &r);
    assert_eq!(a.events.len(), 1);
    assert_eq!(a.events[0].properties.value, "0");
    assert_eq!(a.events[0].transaction_id, "CB-3:1000");
}

#[test]
fn incremental_mode_bills_deltas() {
    let r = rules(BillingMode::Incremental);
    let mut l = Ledger::new();
    l.apply(&start(7, "1000", T0), &r);
    let a = l.apply(
        &mv(7, &[("1500", T0 + 60), ("2250.5", T0 + 120)], T0 + 120),
        &r,
    );
    // Each reading bills up to (reading − 1 Wh, its least resolution); the Stop the rest.
    let ids: Vec<_> = a.events.iter().map(|e| e.transaction_id.as_str()).collect();
    assert_eq!(ids, vec!["CB-7:1499", "CB-7:2249.5"]);
    let values: Vec<_> = a
        .events
        .iter()
        .map(|e| e.properties.value.as_str())
        .collect();
    assert_eq!(values, vec!["0.499", "0.7505"]);
    // a retried MeterValues and a late reading change nothing
    let a = l.apply(
        &mv(7, &[("1500", T0 + 60), ("2250.5", T0 + 120)], T0 + 130),
        &r,
    );
    assert!(a.events.is_empty());
    assert_eq!(
        a.ignored,
        vec![Ignored::LateReading, Ignored::WithinResolution]
    );
    let a = l.apply(&mv(7, &[("2100", T0 + 90)], T0 + 140), &r);
    assert!(a.events.is_empty() && a.anomalies.is_empty());
    // a newer, lower reading is a meter going backwards
    let a = l.apply(&mv(7, &[("100", T0 + 180)], T0 + 180), &r);
    assert_eq!(reasons(&a), vec!["meter_went_backwards"]);
    assert!(a.anomalies[0].detail.contains("100") && a.anomalies[0].detail.contains("2249.5"));
    let a = l.apply(&stop(7, "3000", T0 + 240), &r);
    assert_eq!(a.events.len(), 1);
    assert_eq!(a.events[0].transaction_id, "CB-7:3000");
    assert_eq!(a.events[0].properties.value, "0.7505");
    assert_eq!(
        l.apply(&mv(7, &[("3100", T0 + 300)], T0 + 300), &r).ignored,
        vec![Ignored::AfterStop]
    );
}

#[test]
fn incremental_stop_equal_to_what_is_billed_emits_nothing_more() {
    let r = rules(BillingMode::Incremental);
    let mut l = Ledger::new();
    l.apply(&start(7, "1000", T0), &r);
    assert_eq!(
        l.apply(&mv(7, &[("1501", T0 + 60)], T0 + 60), &r)
            .events
            .len(),
        1
    );
    let a = l.apply(&stop(7, "1500", T0 + 120), &r);
    assert!(a.events.is_empty() && a.anomalies.is_empty());
    // meterStop equal to the reading bills the last Wh the reading could not vouch for.
    l.apply(&start(8, "1000", T0), &r);
    l.apply(&mv(8, &[("1500", T0 + 60)], T0 + 60), &r);
    let a = l.apply(&stop(8, "1500", T0 + 120), &r);
    assert_eq!(a.anomalies, vec![]);
    assert_eq!(a.events[0].properties.value, "0.001");
}

#[test]
fn meter_stop_below_start() {
    let r = rules(BillingMode::Session);
    let mut l = Ledger::new();
    l.apply(&start(5, "5000", T0), &r);
    let a = l.apply(&stop(5, "10", T0 + 60), &r);
    assert_eq!(reasons(&a), vec!["meter_went_backwards"]);
    assert!(a.anomalies[0].detail.contains("5000") && a.anomalies[0].detail.contains("10"));
    assert!(a.events.is_empty());
}

#[test]
fn start_rejected_keeps_energy_in_the_anomaly() {
    let r = rules(BillingMode::Session);
    let mut l = Ledger::new();
    let mut s = start(9, "0", T0);
    if let TapKind::Start(st) = &mut s.kind {
        st.id_tag_status = "Invalid".into();
    }
    l.apply(&s, &r);
    let a = l.apply(&stop(9, "2500", T0 + 60), &r);
    assert!(a.events.is_empty());
    assert_eq!(reasons(&a), vec!["start_rejected"]);
    assert_eq!(
        a.anomalies[0].held_event.as_ref().unwrap().properties.value,
        "2.5"
    );
}

#[test]
fn transaction_id_reuse() {
    let r = rules(BillingMode::Session);
    let mut l = Ledger::new();
    l.apply(&start(1, "0", T0), &r);
    // identical re-sent Start: same session
    assert_eq!(
        l.apply(&start(1, "0", T0), &r).ignored,
        vec![Ignored::DuplicateStart]
    );
    l.apply(&stop(1, "1000", T0 + 60), &r);
    // SteVe database rebuilt: id 1 again for a new session
    let a = l.apply(&start(1, "5000", T0 + 86_400), &r);
    assert_eq!(reasons(&a), vec!["transaction_id_reused"]);
    let a = l.apply(&stop(1, "6000", T0 + 90_000), &r);
    assert!(a.events.is_empty());
    assert_eq!(reasons(&a), vec!["transaction_id_reused"]);
    assert_eq!(
        a.anomalies[0].held_event.as_ref().unwrap().properties.value,
        "1"
    );
    // with {started_at} in the template the ids differ, so events go out
    let r = BillingRules::new(
        BillingMode::Session,
        "kwh",
        "{charge_box_id}-{transaction_id}-{started_at}",
        "s",
    )
    .unwrap();
    let mut l = Ledger::new();
    l.apply(&start(1, "0", T0), &r);
    let first = l.apply(&stop(1, "1000", T0 + 60), &r).events;
    l.apply(&start(1, "5000", T0 + 86_400), &r);
    let second = l.apply(&stop(1, "6000", T0 + 90_000), &r).events;
    assert_eq!(second.len(), 1);
    assert_ne!(first[0].transaction_id, second[0].transaction_id);
}

#[test]
fn invalid_transaction_ids() {
    let r = rules(BillingMode::Session);
    let mut l = Ledger::new();
    for rec in [start(0, "0", T0), stop(-1, "10", T0)] {
        let a = l.apply(&rec, &r);
        assert_eq!(reasons(&a), vec!["invalid_transaction_id"]);
    }
    assert_eq!(l.sessions().count(), 0);
}

/// Issue 12: MeterValues with transactionId 0 or -1 between sessions are counted (and logged
/// at most hourly by the relay), never a billing anomaly or a dead letter.
#[test]
fn meter_values_outside_a_session_are_no_anomaly() {
    let r = rules(BillingMode::Incremental);
    let mut l = Ledger::new();
    for txid in [0, -1] {
        let a = l.apply(&mv(txid, &[("1", T0)], T0), &r);
        assert_eq!(a.anomalies, vec![]);
        assert_eq!(a.ignored, vec![Ignored::TransactionIdNotPositive]);
    }
    assert_eq!(l.sessions().count(), 0);
}

fn begin(wh: &str, ts: i64) -> EnergyReading {
    EnergyReading {
        timestamp: Some(ts),
        wh: d(wh),
        context: "Transaction.Begin".into(),
        resolution_wh: Decimal::ONE,
    }
}

#[test]
fn missing_start_and_transaction_begin() {
    let r = rules(BillingMode::Session);
    let mut l = Ledger::new();
    let a = l.apply(&stop(3, "900", T0), &r);
    assert_eq!(reasons(&a), vec!["missing_start"]);
    assert!(a.anomalies[0].held_event.is_none());
    assert_eq!(
        l.apply(&stop(3, "900", T0), &r).ignored,
        vec![Ignored::DuplicateStop]
    );
}

/// Issue 12: a Stop whose Start the bridge never saw was billed to the Stop's idTag (the fleet
/// manager's card that ended the session). The customer comes from the start only: the event
/// valued from the Transaction.Begin reading is held with no subscription.
#[test]
fn stop_without_start_is_never_billed_to_the_stops_id_tag() {
    let r = rules(BillingMode::Session);
    let mut l = Ledger::new();
    let mut s = stop(4, "4000", T0 + 3600);
    if let TapKind::Stop(st) = &mut s.kind {
        st.id_tag = Some("FLEET-MANAGER".into());
        st.begin_reading = Some(begin("1000", T0));
    }
    let a = l.apply(&s, &r);
    assert_eq!(a.events, vec![]);
    assert_eq!(reasons(&a), vec!["missing_start"]);
    let held = a.anomalies[0].held_event.as_ref().expect("held event");
    assert_eq!(held.properties.value, "3");
    assert_eq!(held.external_subscription_id, "");
    assert_eq!(a.anomalies[0].id_tag.as_deref(), Some("FLEET-MANAGER"));
    // Re-sent: a duplicate, nothing new.
    let a = l.apply(&s, &r);
    assert_eq!((a.events.len(), a.anomalies.len()), (0, 0));
    // A Begin reading above meterStop cannot value it: nothing held, still a dead letter.
    let mut s = stop(5, "4000", T0 + 3600);
    if let TapKind::Stop(st) = &mut s.kind {
        st.begin_reading = Some(begin("5000", T0));
    }
    let a = l.apply(&s, &r);
    assert_eq!(reasons(&a), vec!["missing_start"]);
    assert!(a.anomalies[0].held_event.is_none());
}

#[test]
fn unmapped_id_tag_is_held() {
    let mut r = rules(BillingMode::Session);
    r.subscriptions = Some(SubscriptionMap::from_csv("OTHER,sub_other\n").unwrap());
    let mut l = Ledger::new();
    l.apply(&start(1, "0", T0), &r);
    let a = l.apply(&stop(1, "1000", T0 + 60), &r);
    assert!(a.events.is_empty());
    assert_eq!(reasons(&a), vec!["unmapped_id_tag"]);
    assert_eq!(a.anomalies[0].id_tag.as_deref(), Some("TAG"));
    assert!(a.anomalies[0].held_event.is_some());
    r.subscriptions = Some(SubscriptionMap::from_csv("TAG,sub_tag\n").unwrap());
    l.apply(&start(2, "0", T0), &r);
    assert_eq!(
        l.apply(&stop(2, "1000", T0 + 60), &r).events[0].external_subscription_id,
        "sub_tag"
    );
}

#[test]
fn implausible_timestamps_fall_back_to_receive_time() {
    let r = rules(BillingMode::Session);
    let cases = [
        (T0 + 3600 + 601, TimestampSource::Bridge), // beyond the future tolerance
        (T0 + 3600 + 600, TimestampSource::Charger),
        (T0 - 1, TimestampSource::Bridge), // before the session start
        (1_500_000_000, TimestampSource::Bridge), // before 2020
        (T0 + 10, TimestampSource::Charger), // replayed late: normal
    ];
    for (charger_ts, source) in cases {
        let mut l = Ledger::new();
        l.apply(&start(1, "0", T0), &r);
        let mut s = stop(1, "10", T0 + 3600);
        if let TapKind::Stop(st) = &mut s.kind {
            st.timestamp = Some(charger_ts);
        }
        let e = &l.apply(&s, &r).events[0];
        assert_eq!(e.properties.timestamp_source, source, "{charger_ts}");
        assert_eq!(e.properties.charger_timestamp, Some(charger_ts));
        assert_eq!(e.properties.received_at, T0 + 3600);
        let expected = if source == TimestampSource::Charger {
            charger_ts
        } else {
            T0 + 3600
        };
        assert_eq!((e.timestamp, e.properties.stopped_at), (expected, expected));
    }
}

#[test]
fn finished_sessions_are_bounded() {
    let r = rules(BillingMode::Session);
    let mut l = Ledger::new();
    let mut removed = Vec::new();
    for txid in 1..=(MAX_FINISHED_PER_CHARGE_BOX as i64 + 3) {
        l.apply(&start(txid, "0", T0 + txid * 10), &r);
        removed.extend(l.apply(&stop(txid, "10", T0 + txid * 10 + 5), &r).removed);
    }
    assert_eq!(l.sessions().count(), MAX_FINISHED_PER_CHARGE_BOX);
    assert_eq!(
        removed
            .iter()
            .map(|k| k.ocpp_transaction_id)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // open sessions too
    let mut l = Ledger::new();
    let mut evicted = 0;
    for txid in 1..=(MAX_OPEN_PER_CHARGE_BOX as i64 + 2) {
        let a = l.apply(&start(txid, "0", T0 + txid), &r);
        evicted += reasons(&a)
            .iter()
            .filter(|r| **r == "open_session_evicted")
            .count();
    }
    assert_eq!(evicted, 2);
    assert!(
        l.session(&SessionKey {
            charge_box_id: "CB".into(),
            ocpp_transaction_id: 1
        })
        .is_none()
    );
}

#[test]
fn ledger_round_trips_through_json() {
    let r = rules(BillingMode::Incremental);
    let mut l = Ledger::new();
    l.apply(&start(1, "0.5", T0), &r);
    l.apply(&mv(1, &[("100.25", T0 + 1)], T0 + 1), &r);
    let json = serde_json::to_string(&l).unwrap();
    let restored: Ledger = serde_json::from_str(&json).unwrap();
    assert_eq!(restored, l);
}

// ---- property tests ----

#[derive(Debug, Clone)]
struct SessionPlan {
    txid: i64,
    meter_start_wh: Decimal,
    /// Cumulative readings (Wh, seconds after start), strictly increasing in both.
    readings: Vec<(Decimal, i64)>,
    meter_stop_wh: Decimal,
}

fn session_plan(txid: i64) -> impl Strategy<Value = SessionPlan> {
    (
        0i64..10_000_000,
        prop::collection::vec((0i64..50_000, 1i64..900), 0..8),
        0i64..5000,
    )
        .prop_map(move |(start_milli, steps, tail)| {
            // Thousandths of a Wh exercise kWh readings with 6 decimals.
            let meter_start_wh = Decimal::new(start_milli, 3);
            let mut wh = meter_start_wh;
            let mut t = 0;
            let mut readings = Vec::new();
            for (delta_milli, dt) in steps {
                wh += Decimal::new(delta_milli, 3);
                t += dt;
                readings.push((wh, t));
            }
            SessionPlan {
                txid,
                meter_start_wh,
                readings,
                meter_stop_wh: wh + Decimal::new(tail, 0),
            }
        })
}

#[derive(Debug, Clone)]
enum Step {
    Apply(TapRecord),
    Restart,
}

fn records_of(plan: &SessionPlan, t_start: i64) -> (TapRecord, Vec<TapRecord>, TapRecord) {
    let s = start(plan.txid, &plan.meter_start_wh.to_string(), t_start);
    let mvs = plan
        .readings
        .iter()
        .map(|(wh, dt)| mv(plan.txid, &[(&wh.to_string(), t_start + dt)], t_start + dt))
        .collect();
    let last = plan.readings.last().map(|(_, t)| *t).unwrap_or(0);
    let st = stop(
        plan.txid,
        &plan.meter_stop_wh.to_string(),
        t_start + last + 60,
    );
    (s, mvs, st)
}

fn schedule() -> impl Strategy<Value = (Vec<SessionPlan>, Vec<Step>)> {
    (1usize..4)
        .prop_flat_map(|n| (1..=n as i64).map(session_plan).collect::<Vec<_>>())
        .prop_flat_map(|plans| {
            let n_records: usize = plans.iter().map(|p| p.readings.len() + 2).sum();
            (
                Just(plans),
                prop::collection::vec(any::<u32>(), n_records),
                prop::collection::vec(
                    (any::<prop::sample::Index>(), any::<prop::sample::Index>()),
                    0..10,
                ),
                prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            )
        })
        .prop_map(|(plans, keys, dups, restarts)| {
            // Random interleaving, except that each Start precedes its own Stop (a Stop before
            // its Start is the missing_start case, tested separately).
            let mut tagged: Vec<(u32, TapRecord)> = Vec::new();
            let mut k = keys.into_iter();
            for (i, plan) in plans.iter().enumerate() {
                let (s, mvs, st) = records_of(plan, T0 + i as i64 * 100_000);
                let ks = k.next().unwrap();
                let kst = k.next().unwrap().max(ks);
                tagged.push((ks, s));
                tagged.push((kst, st));
                for m in mvs {
                    tagged.push((k.next().unwrap(), m));
                }
            }
            tagged.sort_by_key(|(key, _)| *key);
            let mut records: Vec<TapRecord> = tagged.into_iter().map(|(_, r)| r).collect();
            // Retries: a copy of a random record re-sent at a random later point.
            for (from, to) in dups {
                let i = from.index(records.len());
                let j = i + 1 + to.index(records.len() - i);
                records.insert(j, records[i].clone());
            }
            let mut steps: Vec<Step> = records.into_iter().map(Step::Apply).collect();
            for at in restarts {
                let i = at.index(steps.len() + 1);
                steps.insert(i, Step::Restart);
            }
            (plans, steps)
        })
}

fn run_schedule(steps: &[Step], r: &BillingRules) -> (Vec<LagoEvent>, Vec<Anomaly>) {
    let mut ledger = Ledger::new();
    let mut events = Vec::new();
    let mut anomalies = Vec::new();
    for step in steps {
        match step {
            Step::Restart => {
                let json = serde_json::to_string(&ledger).unwrap();
                ledger = serde_json::from_str(&json).unwrap();
            }
            Step::Apply(record) => {
                let a = ledger.apply(record, r);
                events.extend(a.events);
                anomalies.extend(a.anomalies);
            }
        }
    }
    (events, anomalies)
}

fn check_conservation(
    plans: &[SessionPlan],
    steps: &[Step],
    mode: BillingMode,
) -> Result<(), TestCaseError> {
    let r = rules(mode);
    let (events, anomalies) = run_schedule(steps, &r);
    prop_assert_eq!(anomalies, vec![]);
    let mut by_id: HashMap<&str, &LagoEvent> = HashMap::new();
    for e in &events {
        if let Some(prev) = by_id.insert(&e.transaction_id, e) {
            prop_assert_eq!(prev, e, "two different events with one transaction_id");
        }
    }
    for plan in plans {
        let mine: Vec<&&LagoEvent> = by_id
            .values()
            .filter(|e| e.properties.ocpp_transaction_id == plan.txid)
            .collect();
        let total: Decimal = mine
            .iter()
            .map(|e| Decimal::from_str(&e.properties.value).unwrap())
            .sum();
        prop_assert_eq!(
            total * Decimal::ONE_THOUSAND,
            plan.meter_stop_wh - plan.meter_start_wh,
            "session {} events {:?}",
            plan.txid,
            mine
        );
        if mode == BillingMode::Session {
            prop_assert_eq!(mine.len(), 1);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn energy_is_conserved_in_session_mode((plans, steps) in schedule()) {
        check_conservation(&plans, &steps, BillingMode::Session)?;
    }

    #[test]
    fn energy_is_conserved_in_incremental_mode((plans, steps) in schedule()) {
        check_conservation(&plans, &steps, BillingMode::Incremental)?;
    }

    #[test]
    fn restarts_do_not_change_the_outcome((_plans, steps) in schedule()) {
        // Serialising and restoring the ledger anywhere yields exactly the same events as
        // never restarting.
        let r = rules(BillingMode::Incremental);
        let without: Vec<Step> = steps.iter().filter(|s| matches!(s, Step::Apply(_))).cloned().collect();
        prop_assert_eq!(run_schedule(&steps, &r), run_schedule(&without, &r));
    }
}
