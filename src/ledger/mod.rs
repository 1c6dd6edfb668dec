//! The ledger: a per-session state machine that turns [`TapRecord`]s into Lago events and
//! anomalies. Pure: no I/O, no logging; the caller logs and counts what [`Applied`] returns.
//!
//! Modes:
//! - `Session`: exactly one event per session, at StopTransaction, value = (meterStop −
//!   meterStart)/1000 kWh, id = the rendered `transaction_id` template.
//! - `Incremental`: one event per new energy register reading inside a transaction, value =
//!   delta since the last billed reading, id = `{rendered}:{reading Wh}`; a final event at Stop
//!   up to meterStop. Long sessions that cross a billing period are why this mode exists: in
//!   session mode all of a session's energy lands in the period its Stop falls in.
//!
//! Invariant (property-tested): the distinct events of a session sum to (meterStop −
//! meterStart)/1000 whatever the retries, duplicates, late or reordered MeterValues and restarts
//! from serialised state; no two different events share a `transaction_id`. Ids are derived
//! from content (session + register reading), never from counters.
//!
//! Memory: finished sessions stay as tombstones (to recognise duplicate and conflicting Stops
//! and re-sent Starts) but at most [`MAX_FINISHED_PER_CHARGE_BOX`] per charge box; the oldest
//! stopped is dropped first. A Stop arriving after its tombstone is gone reads as
//! `missing_start` (an anomaly, never a second bill unless transactionData has
//! Transaction.Begin, in which case the event id is re-derived from the same content).
//! Open sessions are capped at [`MAX_OPEN_PER_CHARGE_BOX`]; the oldest is evicted as anomaly
//! `open_session_evicted` (a lost Stop).

pub mod subscriptions;
pub mod template;

use crate::event::{EventProperties, LagoEvent, TimestampSource, decimal_string, kwh_string};
use crate::ocpp::payload::EnergyReading;
use crate::ocpp::units::display_timestamp;
use crate::tap::{MeterValuesRecord, StartRecord, StopRecord, TapKind, TapRecord};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
pub use subscriptions::{MapError, SubscriptionMap};
pub use template::{Placeholder, Template, TemplateError, TemplateValues};

/// Finished sessions kept per charge box for duplicate/conflict detection.
pub const MAX_FINISHED_PER_CHARGE_BOX: usize = 32;
/// Open sessions kept per charge box (far above any connector count).
pub const MAX_OPEN_PER_CHARGE_BOX: usize = 16;
/// 2020-01-01T00:00:00Z: a charger timestamp before it is an unset clock.
pub const EARLIEST_PLAUSIBLE_TIMESTAMP: i64 = 1_577_836_800;
/// Default tolerance for charger timestamps ahead of the bridge clock: 10 minutes.
pub const DEFAULT_FUTURE_TOLERANCE_SECS: i64 = 600;

/// `billing.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingMode {
    /// One event per session at Stop.
    #[default]
    Session,
    /// One event per new register reading, and a final one at Stop.
    Incremental,
}

/// The validated billing settings the ledger applies.
#[derive(Debug, Clone)]
pub struct BillingRules {
    /// Session or incremental.
    pub mode: BillingMode,
    /// `lago.metric_code`.
    pub metric_code: String,
    /// `billing.transaction_id` template (the Lago idempotency key).
    pub transaction_id: Template,
    /// `billing.external_subscription_id` template, used when there is no subscription map.
    pub external_subscription_id: Template,
    /// id_tag → external_subscription_id; when set, it replaces the template.
    pub subscriptions: Option<SubscriptionMap>,
    /// How far ahead of the bridge clock a charger timestamp may be and still be believed.
    pub future_tolerance_secs: i64,
}

impl BillingRules {
    /// Rules from template strings, with the default timestamp tolerance and no map.
    pub fn new(
        mode: BillingMode,
        metric_code: &str,
        transaction_id: &str,
        external_subscription_id: &str,
    ) -> Result<BillingRules, TemplateError> {
        Ok(BillingRules {
            mode,
            metric_code: metric_code.to_owned(),
            transaction_id: transaction_id.parse()?,
            external_subscription_id: external_subscription_id.parse()?,
            subscriptions: None,
            future_tolerance_secs: DEFAULT_FUTURE_TOLERANCE_SECS,
        })
    }
}

/// Stable anomaly reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyReason {
    /// idTagInfo was not Accepted; the energy is held, not dropped.
    StartRejected,
    /// A transactionId was seen for a different Start of the same charge box.
    TransactionIdReused,
    /// transactionId <= 0.
    InvalidTransactionId,
    /// A Stop without a known Start and without a Transaction.Begin reading.
    MissingStart,
    /// meterStop < meterStart, or a later register reading below the last billed one.
    MeterWentBackwards,
    /// A later Stop with different values; the first one counts.
    ConflictingStop,
    /// No subscription for the session's idTag; the event is held for requeue.
    UnmappedIdTag,
    /// An open session was evicted to bound memory; its Stop never came.
    OpenSessionEvicted,
}

impl AnomalyReason {
    /// The stable code for logs and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyReason::StartRejected => "start_rejected",
            AnomalyReason::TransactionIdReused => "transaction_id_reused",
            AnomalyReason::InvalidTransactionId => "invalid_transaction_id",
            AnomalyReason::MissingStart => "missing_start",
            AnomalyReason::MeterWentBackwards => "meter_went_backwards",
            AnomalyReason::ConflictingStop => "conflicting_stop",
            AnomalyReason::UnmappedIdTag => "unmapped_id_tag",
            AnomalyReason::OpenSessionEvicted => "open_session_evicted",
        }
    }
}

/// Something the operator must see; carries the held event when energy is at stake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    /// Stable reason code.
    pub reason: AnomalyReason,
    /// The charge box.
    pub charge_box_id: String,
    /// SteVe's transactionId.
    pub ocpp_transaction_id: i64,
    /// The session's idTag, when known (what an operator maps to a subscription).
    pub id_tag: Option<String>,
    /// What happened, with the readings involved.
    pub detail: String,
    /// The event held back instead of sent (requeue it once the cause is fixed).
    pub held_event: Option<LagoEvent>,
}

/// Records that changed nothing, counted but not errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// The same Start again (SteVe returns the same transactionId for it).
    DuplicateStart,
    /// The same Stop again for a finished session.
    DuplicateStop,
    /// A reading at or below the last billed one, or dated before it: already covered.
    LateReading,
    /// MeterValues for a session whose Start is unknown (the Stop will settle it).
    UnknownSession,
    /// MeterValues for a finished session.
    AfterStop,
}

impl Ignored {
    /// The stable code for counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::DuplicateStart => "duplicate_start",
            Ignored::DuplicateStop => "duplicate_stop",
            Ignored::LateReading => "late_reading",
            Ignored::UnknownSession => "unknown_session",
            Ignored::AfterStop => "after_stop",
        }
    }
}

/// A session's identity: unique only within one SteVe database.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionKey {
    /// The charge box.
    pub charge_box_id: String,
    /// SteVe's transactionId.
    pub ocpp_transaction_id: i64,
}

/// Where a session's start reading came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartSource {
    /// A StartTransaction and its answer.
    StartTransaction,
    /// The Transaction.Begin reading of a Stop's transactionData.
    TransactionBegin,
    /// Unknown: a tombstone for a Stop without a Start (nothing billed).
    Missing,
}

/// How the Stop of a finished session looked (for duplicate/conflict detection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopFacts {
    /// meterStop.
    pub meter_stop_wh: Decimal,
    /// The charger's stop time.
    pub timestamp: Option<i64>,
    /// Bridge clock when the counted Stop arrived (orders tombstone eviction).
    pub received_at: i64,
}

/// The state of one session; stored per row by the delivery stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// Identity.
    pub key: SessionKey,
    /// Where the start came from.
    pub start_source: StartSource,
    /// The connector (0 when unknown).
    pub connector_id: i64,
    /// The Start's idTag (or the Stop's, for a TransactionBegin start).
    pub id_tag: String,
    /// idTagInfo.status of the Start answer.
    pub id_tag_status: String,
    /// The register at the start.
    pub meter_start_wh: Decimal,
    /// The Start's own timestamp as sent (to recognise a re-sent identical Start).
    pub start_timestamp: Option<i64>,
    /// Effective start time, unix seconds (charger's if plausible, else bridge's).
    pub started_at: i64,
    /// Bridge clock when the Start arrived (orders open-session eviction).
    pub start_received_at: i64,
    /// Events are held as `transaction_id_reused` (the id would collide in Lago).
    pub held_reused: bool,
    /// The highest register reading billed so far (incremental), starts at meter_start.
    pub last_billed_wh: Decimal,
    /// The charger's timestamp of that reading.
    pub last_billed_at: Option<i64>,
    /// Number of events derived (emitted or held) for this session.
    pub events_derived: u32,
    /// Set once the first Stop is counted.
    pub stop: Option<StopFacts>,
}

impl SessionState {
    fn template_values(&self) -> TemplateValues<'_> {
        TemplateValues {
            ocpp_transaction_id: self.key.ocpp_transaction_id,
            charge_box_id: &self.key.charge_box_id,
            connector_id: self.connector_id,
            id_tag: &self.id_tag,
            started_at: self.started_at,
        }
    }

    fn same_start(&self, start: &StartRecord) -> bool {
        self.start_source == StartSource::StartTransaction
            && self.connector_id == start.connector_id
            && self.id_tag == start.id_tag
            && self.meter_start_wh == start.meter_start_wh
            && self.start_timestamp == start.timestamp
    }
}

/// What applying one record produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Events to send, in derivation order.
    pub events: Vec<LagoEvent>,
    /// Anomalies to log, count and (with a held event) keep for requeue.
    pub anomalies: Vec<Anomaly>,
    /// Records or readings that changed nothing.
    pub ignored: Vec<Ignored>,
    /// Sessions whose state changed (upsert these rows).
    pub touched: Vec<SessionKey>,
    /// Sessions dropped from memory (delete these rows).
    pub removed: Vec<SessionKey>,
}

/// All session state; serialisable so it can be persisted with the events it emits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "LedgerRepr", into = "LedgerRepr")]
pub struct Ledger {
    sessions: BTreeMap<SessionKey, SessionState>,
}

#[derive(Serialize, Deserialize)]
struct LedgerRepr {
    sessions: Vec<SessionState>,
}

impl From<LedgerRepr> for Ledger {
    fn from(repr: LedgerRepr) -> Ledger {
        Ledger::from_sessions(repr.sessions)
    }
}

impl From<Ledger> for LedgerRepr {
    fn from(ledger: Ledger) -> LedgerRepr {
        LedgerRepr {
            sessions: ledger.sessions.into_values().collect(),
        }
    }
}

struct Derivation {
    id_suffix: Option<String>,
    from_wh: Decimal,
    to_wh: Decimal,
    charger_timestamp: Option<i64>,
    received_at: i64,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Rebuilds a ledger from stored session rows.
    pub fn from_sessions(sessions: impl IntoIterator<Item = SessionState>) -> Ledger {
        Ledger {
            sessions: sessions.into_iter().map(|s| (s.key.clone(), s)).collect(),
        }
    }

    /// One session's state.
    pub fn session(&self, key: &SessionKey) -> Option<&SessionState> {
        self.sessions.get(key)
    }

    /// All sessions, ordered by key.
    pub fn sessions(&self) -> impl Iterator<Item = &SessionState> {
        self.sessions.values()
    }

    /// Applies one tap record.
    pub fn apply(&mut self, record: &TapRecord, rules: &BillingRules) -> Applied {
        let mut out = Applied::default();
        let cb = &record.charge_box_id;
        let txid = match &record.kind {
            TapKind::Start(s) => s.ocpp_transaction_id,
            TapKind::MeterValues(m) => m.ocpp_transaction_id,
            TapKind::Stop(s) => s.ocpp_transaction_id,
        };
        if txid <= 0 {
            out.anomalies.push(Anomaly {
                reason: AnomalyReason::InvalidTransactionId,
                charge_box_id: cb.clone(),
                ocpp_transaction_id: txid,
                id_tag: match &record.kind {
                    TapKind::Start(s) => Some(s.id_tag.clone()),
                    TapKind::Stop(s) => s.id_tag.clone(),
                    TapKind::MeterValues(_) => None,
                },
                detail: format!("{} with transactionId {txid}", kind_name(&record.kind)),
                held_event: None,
            });
            return out;
        }
        let key = SessionKey {
            charge_box_id: cb.clone(),
            ocpp_transaction_id: txid,
        };
        match &record.kind {
            TapKind::Start(start) => self.start(key, start, record.received_at, rules, &mut out),
            TapKind::MeterValues(mv) => {
                self.meter_values(key, mv, record.received_at, rules, &mut out)
            }
            TapKind::Stop(stop) => self.stop(key, stop, record.received_at, rules, &mut out),
        }
        out
    }

    fn start(
        &mut self,
        key: SessionKey,
        start: &StartRecord,
        received_at: i64,
        rules: &BillingRules,
        out: &mut Applied,
    ) {
        let mut held_reused = false;
        if let Some(existing) = self.sessions.get(&key) {
            if existing.same_start(start) {
                out.ignored.push(Ignored::DuplicateStart);
                return;
            }
            held_reused = !rules.transaction_id.uses(Placeholder::StartedAt);
            out.anomalies.push(Anomaly {
                reason: AnomalyReason::TransactionIdReused,
                charge_box_id: key.charge_box_id.clone(),
                ocpp_transaction_id: key.ocpp_transaction_id,
                id_tag: Some(start.id_tag.clone()),
                detail: format!(
                    "new Start (connector {}, idTag {}, meterStart {} Wh, timestamp {}) replaces \
                     session (connector {}, idTag {}, meterStart {} Wh, timestamp {}, {}); events {}",
                    start.connector_id,
                    start.id_tag,
                    start.meter_start_wh,
                    display_timestamp(start.timestamp),
                    existing.connector_id,
                    existing.id_tag,
                    existing.meter_start_wh,
                    display_timestamp(existing.start_timestamp),
                    if existing.stop.is_some() { "stopped" } else { "still open" },
                    if held_reused { "held" } else { "sent ({started_at} tells them apart)" },
                ),
                held_event: None,
            });
        }
        let started_at =
            plausible(start.timestamp, received_at, None, rules).unwrap_or(received_at);
        let state = SessionState {
            key: key.clone(),
            start_source: StartSource::StartTransaction,
            connector_id: start.connector_id,
            id_tag: start.id_tag.clone(),
            id_tag_status: start.id_tag_status.clone(),
            meter_start_wh: start.meter_start_wh,
            start_timestamp: start.timestamp,
            started_at,
            start_received_at: received_at,
            held_reused,
            last_billed_wh: start.meter_start_wh,
            last_billed_at: start.timestamp,
            events_derived: 0,
            stop: None,
        };
        self.sessions.insert(key.clone(), state);
        out.touched.push(key.clone());
        self.evict_open(&key.charge_box_id, rules, out);
    }

    fn meter_values(
        &mut self,
        key: SessionKey,
        mv: &MeterValuesRecord,
        received_at: i64,
        rules: &BillingRules,
        out: &mut Applied,
    ) {
        let Some(session) = self.sessions.get_mut(&key) else {
            out.ignored.push(Ignored::UnknownSession);
            return;
        };
        if session.stop.is_some() {
            out.ignored.push(Ignored::AfterStop);
            return;
        }
        if rules.mode == BillingMode::Session {
            // Session mode bills the Stop alone; readings change nothing.
            return;
        }
        let mut changed = false;
        for reading in &mv.readings {
            changed |= bill_reading(session, reading, received_at, rules, out);
        }
        if changed {
            out.touched.push(key);
        }
    }

    fn stop(
        &mut self,
        key: SessionKey,
        stop: &StopRecord,
        received_at: i64,
        rules: &BillingRules,
        out: &mut Applied,
    ) {
        let facts = StopFacts {
            meter_stop_wh: stop.meter_stop_wh,
            timestamp: stop.timestamp,
            received_at,
        };
        if !self.sessions.contains_key(&key) {
            let session = match &stop.begin_reading {
                Some(begin) => SessionState {
                    key: key.clone(),
                    start_source: StartSource::TransactionBegin,
                    connector_id: 0,
                    id_tag: stop.id_tag.clone().unwrap_or_default(),
                    id_tag_status: "Accepted".to_owned(),
                    meter_start_wh: begin.wh,
                    start_timestamp: begin.timestamp,
                    started_at: plausible(begin.timestamp, received_at, None, rules)
                        .unwrap_or(received_at),
                    start_received_at: received_at,
                    held_reused: false,
                    last_billed_wh: begin.wh,
                    last_billed_at: begin.timestamp,
                    events_derived: 0,
                    stop: None,
                },
                None => {
                    out.anomalies.push(Anomaly {
                        reason: AnomalyReason::MissingStart,
                        charge_box_id: key.charge_box_id.clone(),
                        ocpp_transaction_id: key.ocpp_transaction_id,
                        id_tag: stop.id_tag.clone(),
                        detail: format!(
                            "Stop (meterStop {} Wh, timestamp {}) without a known Start or \
                             Transaction.Begin reading; recover it from SteVe's transactions",
                            stop.meter_stop_wh,
                            display_timestamp(stop.timestamp)
                        ),
                        held_event: None,
                    });
                    // A tombstone so that retries of this Stop read as duplicates.
                    let tombstone = SessionState {
                        key: key.clone(),
                        start_source: StartSource::Missing,
                        connector_id: 0,
                        id_tag: stop.id_tag.clone().unwrap_or_default(),
                        id_tag_status: String::new(),
                        meter_start_wh: stop.meter_stop_wh,
                        start_timestamp: None,
                        started_at: received_at,
                        start_received_at: received_at,
                        held_reused: false,
                        last_billed_wh: stop.meter_stop_wh,
                        last_billed_at: None,
                        events_derived: 0,
                        stop: Some(facts),
                    };
                    self.sessions.insert(key.clone(), tombstone);
                    out.touched.push(key.clone());
                    self.evict_finished(&key.charge_box_id, out);
                    return;
                }
            };
            self.sessions.insert(key.clone(), session);
        }
        let session = self.sessions.get_mut(&key).expect("inserted above");
        if let Some(first) = &session.stop {
            if first.meter_stop_wh == facts.meter_stop_wh && first.timestamp == facts.timestamp {
                out.ignored.push(Ignored::DuplicateStop);
            } else {
                out.anomalies.push(Anomaly {
                    reason: AnomalyReason::ConflictingStop,
                    charge_box_id: key.charge_box_id.clone(),
                    ocpp_transaction_id: key.ocpp_transaction_id,
                    id_tag: Some(session.id_tag.clone()),
                    detail: format!(
                        "Stop (meterStop {} Wh, timestamp {}) differs from the counted one \
                         (meterStop {} Wh, timestamp {}); the first counts",
                        facts.meter_stop_wh,
                        display_timestamp(facts.timestamp),
                        first.meter_stop_wh,
                        display_timestamp(first.timestamp)
                    ),
                    held_event: None,
                });
            }
            return;
        }
        let stop_wh = stop.meter_stop_wh;
        if stop_wh < session.last_billed_wh {
            let (what, billed) = if session.last_billed_wh == session.meter_start_wh {
                ("meterStart", session.meter_start_wh)
            } else {
                ("last billed reading", session.last_billed_wh)
            };
            out.anomalies.push(Anomaly {
                reason: AnomalyReason::MeterWentBackwards,
                charge_box_id: key.charge_box_id.clone(),
                ocpp_transaction_id: key.ocpp_transaction_id,
                id_tag: Some(session.id_tag.clone()),
                detail: format!(
                    "meterStop {stop_wh} Wh is below the {what} {billed} Wh (meterStart {} Wh); \
                     nothing more billed",
                    session.meter_start_wh
                ),
                held_event: None,
            });
        } else {
            match rules.mode {
                BillingMode::Session => {
                    let d = Derivation {
                        id_suffix: None,
                        from_wh: session.meter_start_wh,
                        to_wh: stop_wh,
                        charger_timestamp: stop.timestamp,
                        received_at,
                    };
                    derive(session, d, rules, out);
                }
                BillingMode::Incremental => {
                    if stop_wh > session.last_billed_wh || session.events_derived == 0 {
                        let d = Derivation {
                            id_suffix: Some(decimal_string(stop_wh)),
                            from_wh: session.last_billed_wh,
                            to_wh: stop_wh,
                            charger_timestamp: stop.timestamp,
                            received_at,
                        };
                        derive(session, d, rules, out);
                        session.last_billed_wh = stop_wh;
                    }
                }
            }
        }
        session.stop = Some(facts);
        out.touched.push(key.clone());
        self.evict_finished(&key.charge_box_id, out);
    }

    fn charge_box_sessions<'a>(
        &'a self,
        charge_box_id: &str,
    ) -> impl Iterator<Item = &'a SessionState> + 'a {
        let lo = SessionKey {
            charge_box_id: charge_box_id.to_owned(),
            ocpp_transaction_id: i64::MIN,
        };
        let hi = SessionKey {
            charge_box_id: charge_box_id.to_owned(),
            ocpp_transaction_id: i64::MAX,
        };
        self.sessions.range(lo..=hi).map(|(_, s)| s)
    }

    fn evict_finished(&mut self, charge_box_id: &str, out: &mut Applied) {
        let mut finished: Vec<(i64, &SessionKey)> = self
            .charge_box_sessions(charge_box_id)
            .filter_map(|s| s.stop.as_ref().map(|f| (f.received_at, &s.key)))
            .collect();
        if finished.len() <= MAX_FINISHED_PER_CHARGE_BOX {
            return;
        }
        finished.sort();
        let excess = finished.len() - MAX_FINISHED_PER_CHARGE_BOX;
        let victims: Vec<SessionKey> = finished[..excess]
            .iter()
            .map(|(_, k)| (*k).clone())
            .collect();
        for key in victims {
            self.sessions.remove(&key);
            out.touched.retain(|k| *k != key);
            out.removed.push(key);
        }
    }

    fn evict_open(&mut self, charge_box_id: &str, rules: &BillingRules, out: &mut Applied) {
        let mut open: Vec<(i64, &SessionKey)> = self
            .charge_box_sessions(charge_box_id)
            .filter(|s| s.stop.is_none())
            .map(|s| (s.start_received_at, &s.key))
            .collect();
        if open.len() <= MAX_OPEN_PER_CHARGE_BOX {
            return;
        }
        open.sort();
        let excess = open.len() - MAX_OPEN_PER_CHARGE_BOX;
        let victims: Vec<SessionKey> = open[..excess].iter().map(|(_, k)| (*k).clone()).collect();
        for key in victims {
            let s = self.sessions.remove(&key).expect("listed above");
            out.anomalies.push(Anomaly {
                reason: AnomalyReason::OpenSessionEvicted,
                charge_box_id: key.charge_box_id.clone(),
                ocpp_transaction_id: key.ocpp_transaction_id,
                id_tag: Some(s.id_tag.clone()),
                detail: format!(
                    "more than {MAX_OPEN_PER_CHARGE_BOX} open sessions; dropped the oldest \
                     (meterStart {} Wh, billed up to {} Wh, billing.mode {}); its Stop will read as missing_start",
                    s.meter_start_wh,
                    s.last_billed_wh,
                    match rules.mode {
                        BillingMode::Session => "session",
                        BillingMode::Incremental => "incremental",
                    }
                ),
                held_event: None,
            });
            out.touched.retain(|k| *k != key);
            out.removed.push(key);
        }
    }
}

fn kind_name(kind: &TapKind) -> &'static str {
    match kind {
        TapKind::Start(_) => "StartTransaction",
        TapKind::MeterValues(_) => "MeterValues",
        TapKind::Stop(_) => "StopTransaction",
    }
}

/// The charger's timestamp if believable: not beyond the tolerance ahead of the bridge clock,
/// not before 2020, not before the session's start.
fn plausible(
    charger: Option<i64>,
    received_at: i64,
    started_at: Option<i64>,
    rules: &BillingRules,
) -> Option<i64> {
    charger.filter(|&t| {
        t <= received_at.saturating_add(rules.future_tolerance_secs)
            && t >= EARLIEST_PLAUSIBLE_TIMESTAMP
            && started_at.is_none_or(|s| t >= s)
    })
}

/// Bills one incremental reading; returns whether the session changed.
fn bill_reading(
    session: &mut SessionState,
    reading: &EnergyReading,
    received_at: i64,
    rules: &BillingRules,
    out: &mut Applied,
) -> bool {
    let dated_before_last = matches!(
        (reading.timestamp, session.last_billed_at),
        (Some(t), Some(last)) if t < last
    );
    if dated_before_last || reading.wh == session.last_billed_wh {
        out.ignored.push(Ignored::LateReading);
        return false;
    }
    if reading.wh < session.last_billed_wh {
        let dated_after_last = matches!(
            (reading.timestamp, session.last_billed_at),
            (Some(t), Some(last)) if t > last
        );
        if dated_after_last {
            out.anomalies.push(Anomaly {
                reason: AnomalyReason::MeterWentBackwards,
                charge_box_id: session.key.charge_box_id.clone(),
                ocpp_transaction_id: session.key.ocpp_transaction_id,
                id_tag: Some(session.id_tag.clone()),
                detail: format!(
                    "register reading {} Wh at {} is below the last billed {} Wh at {}; not billed",
                    reading.wh,
                    display_timestamp(reading.timestamp),
                    session.last_billed_wh,
                    display_timestamp(session.last_billed_at)
                ),
                held_event: None,
            });
        } else {
            // Without a later date a lower reading cannot be told from a late one.
            out.ignored.push(Ignored::LateReading);
        }
        return false;
    }
    let d = Derivation {
        id_suffix: Some(decimal_string(reading.wh)),
        from_wh: session.last_billed_wh,
        to_wh: reading.wh,
        charger_timestamp: reading.timestamp,
        received_at,
    };
    derive(session, d, rules, out);
    session.last_billed_wh = reading.wh;
    if reading.timestamp.is_some() {
        session.last_billed_at = reading.timestamp;
    }
    true
}

/// Builds one event of `session` and sends it or holds it in an anomaly.
fn derive(session: &mut SessionState, d: Derivation, rules: &BillingRules, out: &mut Applied) {
    let values = session.template_values();
    let mut transaction_id = rules.transaction_id.render(&values);
    if let Some(suffix) = &d.id_suffix {
        transaction_id.push(':');
        transaction_id.push_str(suffix);
    }
    let subscription = match &rules.subscriptions {
        Some(map) => map.get(&session.id_tag).map(str::to_owned),
        None if session.id_tag.is_empty()
            && rules.external_subscription_id.uses(Placeholder::IdTag) =>
        {
            None
        }
        None => Some(rules.external_subscription_id.render(&values)),
    };
    let charger_ts = plausible(
        d.charger_timestamp,
        d.received_at,
        Some(session.started_at),
        rules,
    );
    let (timestamp, timestamp_source) = match charger_ts {
        Some(t) => (t, TimestampSource::Charger),
        None => (d.received_at, TimestampSource::Bridge),
    };
    let event = LagoEvent {
        transaction_id,
        external_subscription_id: subscription.clone().unwrap_or_default(),
        code: rules.metric_code.clone(),
        timestamp,
        properties: EventProperties {
            value: kwh_string(d.to_wh - d.from_wh),
            charge_box_id: session.key.charge_box_id.clone(),
            connector_id: session.connector_id,
            ocpp_transaction_id: session.key.ocpp_transaction_id,
            meter_start_wh: decimal_string(d.from_wh),
            meter_stop_wh: decimal_string(d.to_wh),
            started_at: session.started_at,
            stopped_at: timestamp,
            charger_timestamp: d.charger_timestamp,
            received_at: d.received_at,
            timestamp_source,
        },
    };
    session.events_derived += 1;
    let hold = if session.held_reused {
        Some((
            AnomalyReason::TransactionIdReused,
            "transactionId reused and the transaction_id template has no {started_at}: \
             this event would collide with the earlier session's in Lago"
                .to_owned(),
        ))
    } else if !session.id_tag_status.eq_ignore_ascii_case("Accepted") {
        Some((
            AnomalyReason::StartRejected,
            format!(
                "Start answered with idTagInfo.status {}, but the charger delivered energy",
                session.id_tag_status
            ),
        ))
    } else if subscription.is_none() {
        Some((
            AnomalyReason::UnmappedIdTag,
            format!(
                "no external_subscription_id for idTag {:?}; fix the map and requeue",
                session.id_tag
            ),
        ))
    } else {
        None
    };
    match hold {
        None => out.events.push(event),
        Some((reason, detail)) => out.anomalies.push(Anomaly {
            reason,
            charge_box_id: session.key.charge_box_id.clone(),
            ocpp_transaction_id: session.key.ocpp_transaction_id,
            id_tag: Some(session.id_tag.clone()),
            detail,
            held_event: Some(event),
        }),
    }
}

#[cfg(test)]
mod tests;
