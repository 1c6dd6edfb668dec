//! Response schemas of the Lago API (openapi `EventsCreated`, `EventObject`,
//! `ApiErrorUnprocessableEntity`, `BillableMetricObject`, `SubscriptionObject`), restricted to
//! the fields we read. Unknown fields are tolerated; a known field of another type is an error.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

/// `EventsCreated`: the 200 answer to `POST /api/v1/events/batch`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EventsCreated {
    /// One echo per stored event.
    pub events: Vec<StoredEvent>,
}

/// `Event`: the answer to `GET /api/v1/events/{transaction_id}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EventEnvelope {
    /// The stored event.
    pub event: StoredEvent,
}

/// `Events`: the answer to `GET /api/v1/events?...`, one page.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EventList {
    /// The page's events.
    pub events: Vec<StoredEvent>,
    /// Pagination; absent on servers that do not paginate.
    #[serde(default)]
    pub meta: Option<PaginationMeta>,
}

/// `PaginationMeta`: where the next page is.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PaginationMeta {
    /// The next page number, null on the last page.
    #[serde(default)]
    pub next_page: Option<u32>,
}

/// Lago's 404 body (`ApiResponses#not_found_error`): `code` is `<resource>_not_found`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NotFound {
    /// E.g. `billable_metric_not_found`.
    pub code: String,
}

/// `EventObject`: an event as Lago stored it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StoredEvent {
    /// Lago's own id (opaque; composite on ClickHouse stores).
    #[serde(default)]
    pub lago_id: Option<String>,
    /// Our idempotency key.
    pub transaction_id: String,
    /// The subscription the event was booked on.
    pub external_subscription_id: String,
    /// Billable metric code.
    pub code: String,
    /// ISO-8601 rendering of the timestamp we sent (Lago answers with a string).
    pub timestamp: String,
    /// The properties as Lago stored them (ClickHouse stores every value as a string).
    #[serde(default)]
    pub properties: Option<Map<String, Value>>,
    /// Lago's subscription id, null when the subscription is unknown to Lago.
    #[serde(default)]
    pub lago_subscription_id: Option<String>,
    /// Lago's customer id, null in the batch echo (processing is asynchronous).
    #[serde(default)]
    pub lago_customer_id: Option<String>,
}

/// `ApiErrorUnprocessableEntity`: the 422 body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UnprocessableEntity {
    /// 422.
    pub status: u16,
    /// "Unprocessable Entity".
    pub error: String,
    /// "validation_errors" for ingestion.
    pub code: String,
    /// Index-keyed (or field-keyed) details; the server may send a bare string.
    pub error_details: ErrorDetails,
}

/// `error_details` of a 422: an object in the documented case, a string for expression failures.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ErrorDetails {
    /// `{"0": {...}, "events": [...]}`.
    Map(BTreeMap<String, Value>),
    /// A bare message.
    Message(String),
}

/// `BillableMetric`: the answer to `GET /api/v1/billable_metrics/{code}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BillableMetricEnvelope {
    /// The metric.
    pub billable_metric: BillableMetricObject,
}

/// `BillableMetricObject`: what decides how our events are summed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BillableMetricObject {
    /// Lago's id.
    pub lago_id: String,
    /// Display name.
    pub name: String,
    /// The code events carry.
    pub code: String,
    /// `sum_agg`, `count_agg`, ... kept as text so a new aggregation is reported, not a parse error.
    pub aggregation_type: String,
    /// The property summed by `sum_agg`; must be the one we send (`value`).
    #[serde(default)]
    pub field_name: Option<String>,
    /// Whether usage carries over billing periods.
    pub recurring: bool,
    /// An expression replacing the field, if any.
    #[serde(default)]
    pub expression: Option<String>,
}

impl BillableMetricObject {
    /// True when this metric sums the property `field`, the only shape our events bill correctly.
    pub fn sums_field(&self, field: &str) -> bool {
        self.aggregation_type == "sum_agg"
            && self.field_name.as_deref() == Some(field)
            && self.expression.as_deref().is_none_or(str::is_empty)
    }
}

/// `Subscription` (SubscriptionExtended): the answer to `GET /api/v1/subscriptions/{external_id}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SubscriptionEnvelope {
    /// The subscription.
    pub subscription: SubscriptionObject,
}

/// `SubscriptionObject`: enough to confirm an `external_subscription_id` is real and live.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SubscriptionObject {
    /// Lago's id.
    pub lago_id: String,
    /// The id our events carry as `external_subscription_id`.
    pub external_id: String,
    /// The customer it bills.
    pub external_customer_id: String,
    /// The plan.
    pub plan_code: String,
    /// `active`, `pending`, `terminated`, ...
    pub status: String,
}
