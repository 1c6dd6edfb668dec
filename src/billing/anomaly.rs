//! Billing's internal events (Vector's instrumentation spec): one type per happening whose
//! single `emit` writes the log line and the counter together, and for an anomaly the dead
//! letter too, so none of the three can be forgotten on one path.
//!
//! The WARN line `billing anomaly: see `spool dead-letters`` with its `reason` field and the
//! counter `ocpp_lago_bridge_anomalies_total{reason}` are operator interfaces (people `jq` the
//! log and alert on the counter): extend, never rename.

use crate::ledger::{self, AnomalyReason};
use crate::spool::store::{COLLISION_REASON, Collision, NewDeadLetter};

/// Something billing could not bill as it came: never silent.
#[derive(Debug)]
pub enum Anomaly {
    /// The ledger's verdict on a record (unmapped idTag, missing start, unreadable frame, ...).
    Ledger(ledger::Anomaly),
    /// An event whose outbox key holds another session's: the outbox refused it and wrote its
    /// dead letter in the same transaction.
    Collision(Collision),
}

impl Anomaly {
    /// Logs it at WARN, counts it and adds its dead letter to `dead_letters` (to be appended
    /// with the record that caused it; a collision's is written by the refusing insert).
    pub fn emit(self, dead_letters: &mut Vec<NewDeadLetter>) {
        match self {
            Anomaly::Ledger(anomaly) => {
                let reason = anomaly.reason.as_str();
                metrics::counter!("ocpp_lago_bridge_anomalies_total", "reason" => reason)
                    .increment(1);
                tracing::warn!(
                    charge_box_id = %anomaly.charge_box_id,
                    ocpp_transaction_id = anomaly.ocpp_transaction_id,
                    reason,
                    detail = %anomaly.detail,
                    held_event = anomaly.held_event.is_some(),
                    "billing anomaly: see `spool dead-letters`"
                );
                dead_letters.push(NewDeadLetter {
                    reason: reason.to_string(),
                    detail: anomaly.detail,
                    charge_box_id: Some(anomaly.charge_box_id),
                    // An unreadable frame has no transactionId the bridge could read.
                    ocpp_transaction_id: (anomaly.reason != AnomalyReason::UnreadableFrame)
                        .then_some(anomaly.ocpp_transaction_id),
                    id_tag: anomaly.id_tag,
                    event: anomaly.held_event,
                });
            }
            Anomaly::Collision(collision) => {
                let reason = COLLISION_REASON;
                metrics::counter!("ocpp_lago_bridge_anomalies_total", "reason" => reason)
                    .increment(1);
                tracing::warn!(
                    charge_box_id = %collision.event.properties.charge_box_id,
                    ocpp_transaction_id = collision.event.properties.ocpp_transaction_id,
                    lago_transaction_id = %collision.event.transaction_id,
                    external_subscription_id = %collision.event.external_subscription_id,
                    existing_charge_box_id = %collision.existing.properties.charge_box_id,
                    existing_ocpp_transaction_id = collision.existing.properties.ocpp_transaction_id,
                    reason,
                    detail = %collision.detail,
                    held_event = true,
                    "billing anomaly: see `spool dead-letters`"
                );
            }
        }
    }
}

/// The charger's clock was not believed: the event is dated by the bridge (logged, counted).
pub fn clock_fallback(fallback: &ledger::ClockFallback) {
    let reason = fallback.problem.as_str();
    metrics::counter!("ocpp_lago_bridge_charger_clock_fallbacks_total", "reason" => reason)
        .increment(1);
    tracing::warn!(
        charge_box_id = %fallback.charge_box_id,
        ocpp_transaction_id = fallback.ocpp_transaction_id,
        reason,
        // Unix seconds when the charger sent a readable time; left out when it sent none
        // (reason `missing`), never Rust's `Some(…)`/`None`.
        charger_timestamp = fallback.charger_timestamp,
        received_at = fallback.received_at,
        "charger clock not believed: the event is dated by the bridge's receive time (timestamp_source bridge)"
    );
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::Value;

    use super::*;
    use crate::ledger::{ClockFallback, ClockProblem};

    /// A log sink the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            crate::lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// Issue 12 item 5 (a WARN and a counter per reason) and issue 17 item 2 (no Rust debug
    /// text): the line said `charger_timestamp: "Some(1693526400)"`, and `"None"` when the
    /// charger sent no time. Logged through a real JSON subscriber, counted by a real
    /// Prometheus recorder, the metric name the one `telemetry` registers at start.
    #[test]
    fn a_clock_fallback_is_a_warn_line_in_plain_words_and_counted_per_reason() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(captured.clone())
            .finish();
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let fell_back = ClockFallback {
            problem: ClockProblem::TooOld,
            charge_box_id: "CB-RTC-RESET".into(),
            ocpp_transaction_id: 7,
            // 2023-09-01: a real-time clock that lost its battery.
            charger_timestamp: Some(1_693_526_400),
            received_at: 1_796_000_000,
        };
        let no_time = ClockFallback {
            problem: ClockProblem::Missing,
            charge_box_id: "CB-NO-TIME".into(),
            ocpp_transaction_id: 8,
            charger_timestamp: None,
            received_at: 1_796_000_060,
        };
        tracing::subscriber::with_default(subscriber, || {
            metrics::with_local_recorder(&recorder, || {
                clock_fallback(&fell_back);
                clock_fallback(&fell_back);
                clock_fallback(&no_time);
            })
        });

        let text = String::from_utf8(crate::lock(&captured.0).clone()).expect("UTF-8 log");
        let lines: Vec<Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object a line"))
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        let first = &lines[0];
        assert_eq!(first["level"], "WARN", "{first}");
        assert_eq!(first["charge_box_id"], "CB-RTC-RESET", "{first}");
        assert_eq!(first["ocpp_transaction_id"], 7, "{first}");
        assert_eq!(first["reason"], "too_old", "{first}");
        assert_eq!(first["charger_timestamp"], 1_693_526_400_i64, "{first}");
        assert_eq!(first["received_at"], 1_796_000_000_i64, "{first}");
        assert!(
            first["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("charger clock not believed")),
            "{first}"
        );
        let missing = &lines[2];
        assert_eq!(missing["level"], "WARN", "{missing}");
        assert_eq!(missing["charge_box_id"], "CB-NO-TIME", "{missing}");
        assert_eq!(missing["reason"], "missing", "{missing}");
        // No time sent: the field is left out, not written as `None`.
        assert!(missing.get("charger_timestamp").is_none(), "{missing}");
        for line in text.lines() {
            assert!(
                !line.contains("Some(") && !line.contains("None"),
                "Rust debug text in a log line: {line}"
            );
        }

        let rendered = handle.render();
        let name = "ocpp_lago_bridge_charger_clock_fallbacks_total";
        assert!(
            rendered
                .lines()
                .any(|l| l == format!("{name}{{reason=\"too_old\"}} 2")),
            "{rendered}"
        );
        assert!(
            rendered
                .lines()
                .any(|l| l == format!("{name}{{reason=\"missing\"}} 1")),
            "{rendered}"
        );
        // The name the bridge registers (zero-valued) at start, which dashboards and alerts use.
        assert!(
            include_str!("../telemetry.rs").contains(&format!("\"{name}\"")),
            "{name} is not the name telemetry registers"
        );
    }
}
