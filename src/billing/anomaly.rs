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
        charger_timestamp = ?fallback.charger_timestamp,
        received_at = fallback.received_at,
        "charger clock not believed: the event is dated by the bridge's receive time (timestamp_source bridge)"
    );
}
