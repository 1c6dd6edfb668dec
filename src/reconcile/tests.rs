use std::collections::HashMap;

use proptest::prelude::*;
use rust_decimal::Decimal;
use serde_json::json;

use super::*;

fn session(cb: &str, tx: i64, start_wh: i64, stop_wh: i64) -> SteveSession {
    SteveSession {
        ocpp_transaction_id: tx,
        charge_box_id: cb.into(),
        connector_id: 1,
        id_tag: "TAG".into(),
        start_wh: Decimal::from(start_wh),
        stop_wh: Decimal::from(stop_wh),
        started_at: Some(1_000),
        stopped_at: 2_000,
    }
}

fn event(sub: &str, tid: &str, cb: &str, tx: i64, value: &str, timestamp: &str) -> StoredEvent {
    serde_json::from_value(json!({
        "transaction_id": tid,
        "external_subscription_id": sub,
        "code": "kwh",
        "timestamp": timestamp,
        "properties": {"value": value, "charge_box_id": cb, "ocpp_transaction_id": tx.to_string()},
    }))
    .unwrap()
}

const IN_WINDOW: &str = "1970-01-01T00:33:20Z"; // 2000
const WINDOW: (i64, i64) = (1_500, 2_500);

fn none(_: &SteveSession) -> Option<String> {
    Some("derived-sub".into())
}

#[test]
fn every_class_in_the_issue_order() {
    let sessions = vec![
        session("CB", 1, 1000, 4200), // ok: 3.2
        session("CB", 2, 0, 1500),    // pending (and Lago holds nothing)
        session("CB", 3, 0, 1500),    // dead letter
        session("CB", 4, 0, 1500),    // missing
        session("CB", 5, 0, 1500),    // mismatch: Lago 1.4
    ];
    let mut lago = LagoTally::default();
    lago.add(&event("s", "1", "CB", 1, "3.2", IN_WINDOW), WINDOW);
    lago.add(&event("s", "5", "CB", 5, "1.4", IN_WINDOW), WINDOW);
    lago.add(&event("s", "9", "CB", 9, "7", IN_WINDOW), WINDOW);
    lago.add(
        &serde_json::from_value(
            json!({"transaction_id": "x", "external_subscription_id": "s",
            "code": "kwh", "timestamp": IN_WINDOW, "properties": {"value": "2"}}),
        )
        .unwrap(),
        WINDOW,
    );
    let mut view = ReconcileView::default();
    view.pending.insert(("CB".into(), 2));
    view.dead_letters
        .insert(("CB".into(), 3), "unmapped_id_tag: no subscription".into());
    assert_eq!(orphans(&sessions, &lago), vec![("CB".to_string(), 9)]);
    let findings = classify(&sessions, &lago, &view, &none, &[("CB".into(), 9)]);
    let statuses: Vec<&str> = findings.iter().map(|f| f.status.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "ok",
            "pending",
            "dead_letter",
            "missing",
            "mismatch",
            "unknown_in_steve",
            "unknown_in_steve"
        ]
    );
    assert_eq!(findings[0].steve_kwh, Some(Decimal::new(32, 1)));
    assert_eq!(
        findings[3].external_subscription_id.as_deref(),
        Some("derived-sub")
    );
    assert_eq!(findings[4].lago_kwh, Some(Decimal::new(14, 1)));
    assert!(findings[2].detail.contains("unmapped_id_tag"));
    assert_eq!(exit_code(&findings), 1);
    assert_eq!(exit_code(&findings[..2]), 0);
    let json = render(&findings, Format::Json);
    assert_eq!(json.lines().count(), findings.len());
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(first["steve_kwh"], "3.2");
    assert_eq!(first["ocpp_transaction_id"], "1");
    let csv = render(&findings, Format::Csv);
    assert!(csv.starts_with("status,charge_box_id,"));
    let table = render(&findings, Format::Table);
    assert!(
        table
            .lines()
            .filter(|l| l.starts_with("ok "))
            .all(|l| l.contains("session(s)")),
        "ok sessions are not listed one by one, only counted:\n{table}"
    );
    assert!(table.contains("missing"));
}

#[test]
fn a_repeated_event_is_counted_once_and_an_unreadable_value_is_never_ok() {
    let sessions = vec![session("CB", 1, 0, 1000)];
    let mut lago = LagoTally::default();
    let e = event("s", "1", "CB", 1, "1", IN_WINDOW);
    lago.add(&e, WINDOW);
    lago.add(&e, WINDOW);
    let view = ReconcileView::default();
    assert_eq!(
        classify(&sessions, &lago, &view, &none, &[])[0].status,
        Status::Ok
    );
    lago.add(&event("s", "1b", "CB", 1, "a lot", IN_WINDOW), WINDOW);
    let f = &classify(&sessions, &lago, &view, &none, &[])[0];
    assert_eq!(f.status, Status::Mismatch);
    assert!(f.detail.contains("unreadable"), "{}", f.detail);
}

#[test]
fn csv_cells_with_commas_are_quoted() {
    assert_eq!(csv_cell("a,b \"c\""), "\"a,b \"\"c\"\"\"");
    assert_eq!(csv_cell("plain"), "plain");
}

proptest! {
    /// Whatever SteVe, Lago and the spool say: every session gets exactly one finding, `ok`
    /// exactly when Lago's events sum to SteVe's energy, and the first applicable rule wins.
    #[test]
    fn classification_follows_the_rules_in_order(
        cases in proptest::collection::vec(
            (0i64..1_000_000, 0i64..1_000_000, proptest::option::of(proptest::collection::vec(0i64..2_000_000, 1..4)), any::<bool>(), any::<bool>()),
            1..40,
        )
    ) {
        let mut sessions = Vec::new();
        let mut lago = LagoTally::default();
        let mut view = ReconcileView::default();
        let mut expected = HashMap::new();
        for (i, (start, energy, events, pending, dead)) in cases.iter().enumerate() {
            let tx = i as i64;
            let s = session("CB", tx, *start, start + energy);
            let steve = steve_kwh(&s).unwrap();
            prop_assert_eq!(steve * Decimal::ONE_THOUSAND, Decimal::from(*energy));
            sessions.push(s);
            let mut sum = None;
            if let Some(values) = events {
                let mut total = Decimal::ZERO;
                for (j, wh) in values.iter().enumerate() {
                    let kwh = Decimal::new(*wh, 3);
                    total += kwh;
                    lago.add(&event("s", &format!("{tx}-{j}"), "CB", tx, &kwh.to_string(), IN_WINDOW), WINDOW);
                }
                sum = Some(total);
            }
            if *pending { view.pending.insert(("CB".into(), tx)); }
            if *dead { view.dead_letters.insert(("CB".into(), tx), "r: d".into()); }
            let status = if sum == Some(steve) {
                Status::Ok
            } else if *pending {
                Status::Pending
            } else if *dead {
                Status::DeadLetter
            } else if sum.is_none() {
                Status::Missing
            } else {
                Status::Mismatch
            };
            expected.insert(tx, (status, sum));
        }
        let findings = classify(&sessions, &lago, &view, &none, &[]);
        prop_assert_eq!(findings.len(), sessions.len());
        prop_assert!(orphans(&sessions, &lago).is_empty());
        for f in &findings {
            let (status, sum) = expected[&f.ocpp_transaction_id.unwrap()];
            prop_assert_eq!(f.status, status);
            prop_assert_eq!(f.lago_kwh, sum);
        }
        let counted: u64 = totals(&findings).values().map(|(n, _)| n).sum();
        prop_assert_eq!(counted as usize, findings.len());
        prop_assert_eq!(
            exit_code(&findings) == 0,
            findings.iter().all(|f| matches!(f.status, Status::Ok | Status::Pending))
        );
    }
}
