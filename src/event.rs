//! The Lago usage event and its wire form (EVENTS-CONTRACT.md): decimal-string value, unix-seconds timestamp.

use serde::{Deserialize, Serialize};

/// One usage event as POSTed to `/api/v1/events/batch`; field order is the wire order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagoEvent {
    /// The idempotency key Lago dedupes on, rendered from `billing.transaction_id`.
    pub transaction_id: String,
    /// Rendered from `billing.external_subscription_id` or the subscription map.
    pub external_subscription_id: String,
    /// `lago.metric_code`.
    pub code: String,
    /// Unix seconds, fixed when the event is first derived and never recomputed.
    pub timestamp: i64,
    /// `value` (kWh as a decimal string) plus the session facts that explain the bill.
    pub properties: EventProperties,
}

/// The properties of a charging event: one Lago row explains the bill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventProperties {
    /// Energy in kWh as an exact decimal string ("3.2", "0.005").
    pub value: String,
    pub charge_box_id: String,
    pub connector_id: i64,
    pub ocpp_transaction_id: i64,
    /// Register reading at the start of what this event bills, in Wh (decimal string).
    pub meter_start_wh: String,
    /// Register reading at the end of what this event bills, in Wh (decimal string).
    pub meter_stop_wh: String,
    /// Unix seconds of the session's start.
    pub started_at: i64,
    /// Unix seconds of the reading that closes this event (the Stop in session mode).
    pub stopped_at: i64,
}
