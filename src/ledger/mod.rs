//! The ledger: a per-session state machine that turns [`TapRecord`]s into Lago events and
//! anomalies. Pure: no I/O, no logging; the caller logs and counts what [`Applied`] returns.
//!
//! Modes:
//! - `Session`: exactly one event per session, at StopTransaction, value = (meterStop −
//!   meterStart)/1000 kWh, id = the rendered `transaction_id` template.
//! - `Incremental`: one event per new energy register reading inside a transaction, billing up
//!   to (reading − its resolution, at least 1 Wh) so that a rounded or truncated reading never
//!   bills more than the meter counted; id = `{rendered}:{Wh billed up to}`; a final event at
//!   Stop bills the exact rest up to meterStop. Long sessions that cross a billing period are
//!   why this mode exists: in session mode all of a session's energy lands in the period its
//!   Stop falls in.
//!
//! The customer comes from the start only: a session's subscription and every template value
//! (`{connector_id}`, `{id_tag}`, `{started_at}`) are fixed by its StartTransaction (request +
//! accepted answer, or SteVe's record of it), so re-deriving a session in any order, after any
//! restart or eviction, renders byte-identical ids. A Stop's idTag is who *stopped* the session
//! (OCPP 1.6 §6.50), never the customer; a Stop without a known Start is `missing_start`.
//!
//! Invariant (property-tested): the distinct events of a session sum to (meterStop −
//! meterStart)/1000 whatever the retries, duplicates, late or reordered MeterValues and restarts
//! from serialised state, or the session has a dead letter; no two different events share a
//! `transaction_id`; no input panics (every register operation is checked, and registers beyond
//! [`MAX_PLAUSIBLE_REGISTER_WH`] are the anomaly `implausible_register`).
//!
//! Memory: finished sessions stay as tombstones (to recognise duplicate and conflicting Stops
//! and re-sent Starts) but at most [`MAX_FINISHED_PER_CHARGE_BOX`] per charge box; the oldest
//! stopped is dropped first. A Stop arriving after its tombstone is gone reads as
//! `missing_start`: a dead letter, never a second bill. Open sessions are capped at
//! [`MAX_OPEN_PER_CHARGE_BOX`]; the oldest is evicted as anomaly `open_session_evicted` (a lost
//! Stop).

pub mod subscriptions;
pub mod template;

use crate::event::{EventProperties, LagoEvent, TimestampSource, decimal_string, kwh_string};
use crate::ocpp::payload::EnergyReading;
use crate::ocpp::units::display_timestamp;
use crate::tap::{
    MeterValuesRecord, StartRecord, StopRecord, TapKind, TapRecord, UnreadableRecord,
};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
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
/// Default `billing.max_clock_lag`: 7 days (offline chargers upload late sessions).
pub const DEFAULT_MAX_CLOCK_LAG_SECS: i64 = 7 * 24 * 3600;
/// Default `billing.meter_start_tolerance`, in Wh.
pub const DEFAULT_METER_START_TOLERANCE_WH: u64 = 100;
/// A register beyond ±10^12 Wh (a petawatt-hour) is no meter reading.
pub const MAX_PLAUSIBLE_REGISTER_WH: Decimal = Decimal::from_parts(3_567_587_328, 232, 0, false, 0);
/// Most bytes of an unreadable payload quoted in its dead letter.
const MAX_QUOTED_PAYLOAD: usize = 4096;

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

/// `billing.id_tag_case`: how `{id_tag}` renders (matching is case-insensitive regardless).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdTagCase {
    /// The Start's spelling.
    #[default]
    AsSent,
    /// ASCII upper case.
    Upper,
    /// ASCII lower case.
    Lower,
}

impl IdTagCase {
    fn apply(self, id_tag: &str) -> Cow<'_, str> {
        match self {
            IdTagCase::AsSent => Cow::Borrowed(id_tag),
            IdTagCase::Upper => Cow::Owned(id_tag.to_ascii_uppercase()),
            IdTagCase::Lower => Cow::Owned(id_tag.to_ascii_lowercase()),
        }
    }
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
    /// How far behind the bridge clock a charger timestamp may be and still be believed.
    pub max_clock_lag_secs: i64,
    /// How `{id_tag}` renders.
    pub id_tag_case: IdTagCase,
    /// How far meterStart may be from the charger's own Transaction.Begin reading, in Wh.
    pub meter_start_tolerance_wh: Decimal,
}

impl BillingRules {
    /// Rules from template strings, with the default tolerances and no map.
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
            max_clock_lag_secs: DEFAULT_MAX_CLOCK_LAG_SECS,
            id_tag_case: IdTagCase::AsSent,
            meter_start_tolerance_wh: Decimal::from(DEFAULT_METER_START_TOLERANCE_WH),
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
    /// transactionId <= 0 in a Start or Stop.
    InvalidTransactionId,
    /// A Stop without a known Start (the event, when a Transaction.Begin reading values it, is
    /// held with no subscription: the customer comes from the start only).
    MissingStart,
    /// meterStop < meterStart, or a later register reading below the last billed one.
    MeterWentBackwards,
    /// A later Stop with different values; the first one counts.
    ConflictingStop,
    /// No subscription for the session's idTag; the event is held for requeue.
    UnmappedIdTag,
    /// An open session was evicted to bound memory; its Stop never came.
    OpenSessionEvicted,
    /// A register beyond ±[`MAX_PLAUSIBLE_REGISTER_WH`]: the session is not billed.
    ImplausibleRegister,
    /// A billing message the tap could not read (the raw payload is in the detail).
    UnreadableFrame,
    /// meterStart disagrees with the charger's own Transaction.Begin reading.
    MeterStartMismatch,
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
            AnomalyReason::ImplausibleRegister => "implausible_register",
            AnomalyReason::UnreadableFrame => "unreadable_frame",
            AnomalyReason::MeterStartMismatch => "meter_start_mismatch",
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
    /// SteVe's transactionId (0 when the frame could not be read).
    pub ocpp_transaction_id: i64,
    /// The session's idTag, when known (what an operator maps to a subscription); for a
    /// `missing_start`, the Stop's idTag, for information only.
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
    /// A reading within its resolution of what is billed already: nothing new to bill yet.
    WithinResolution,
    /// MeterValues for a session whose Start is unknown (the Stop will settle it).
    UnknownSession,
    /// MeterValues for a finished session.
    AfterStop,
    /// MeterValues with transactionId 0 or below: outside any session, never billed.
    TransactionIdNotPositive,
    /// A record of a session already dead-lettered as `implausible_register`.
    SessionUnbillable,
}

impl Ignored {
    /// The stable code for counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::DuplicateStart => "duplicate_start",
            Ignored::DuplicateStop => "duplicate_stop",
            Ignored::LateReading => "late_reading",
            Ignored::WithinResolution => "within_resolution",
            Ignored::UnknownSession => "unknown_session",
            Ignored::AfterStop => "after_stop",
            Ignored::TransactionIdNotPositive => "transaction_id_not_positive",
            Ignored::SessionUnbillable => "session_unbillable",
        }
    }
}

/// Why an event's `timestamp` is the bridge's receive time instead of the charger's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockProblem {
    /// The charger sent no readable timestamp.
    Missing,
    /// Older than `billing.max_clock_lag` (or before 2020): a clock that fell back.
    TooOld,
    /// Further ahead than `billing.future_timestamp_tolerance`.
    InFuture,
    /// Before the session's start as the charger sent it.
    BeforeStart,
}

impl ClockProblem {
    /// The stable code for logs and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            ClockProblem::Missing => "missing",
            ClockProblem::TooOld => "too_old",
            ClockProblem::InFuture => "in_future",
            ClockProblem::BeforeStart => "before_start",
        }
    }
}

/// An event dated by the bridge because the charger's clock could not be believed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockFallback {
    /// Why.
    pub problem: ClockProblem,
    /// The charge box whose clock it is.
    pub charge_box_id: String,
    /// The session.
    pub ocpp_transaction_id: i64,
    /// What the charger sent.
    pub charger_timestamp: Option<i64>,
    /// The receive time used instead (of the first copy of the frame recorded).
    pub received_at: i64,
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
    /// A StartTransaction and its answer (or SteVe's record of it).
    StartTransaction,
    /// Sessions stored by earlier versions, started from a Stop's Transaction.Begin reading.
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
    /// The Start's idTag, as the charger spelled it.
    pub id_tag: String,
    /// idTagInfo.status of the Start answer.
    pub id_tag_status: String,
    /// The register at the start.
    pub meter_start_wh: Decimal,
    /// The Start's own timestamp as sent (to recognise a re-sent identical Start).
    pub start_timestamp: Option<i64>,
    /// `{started_at}` and the events' `started_at`: the Start's timestamp as the charger sent
    /// it (what SteVe stores), never corrected; the bridge's receive time of the Start when it
    /// had no readable timestamp.
    pub started_at: i64,
    /// Bridge clock when the Start arrived (orders open-session eviction).
    pub start_received_at: i64,
    /// Events are held as `transaction_id_reused` (the id would collide in Lago).
    pub held_reused: bool,
    /// The register billed up to so far (incremental), starts at meter_start.
    pub last_billed_wh: Decimal,
    /// The charger's timestamp of the reading billed last.
    pub last_billed_at: Option<i64>,
    /// Number of events derived (emitted or held) for this session.
    pub events_derived: u32,
    /// Set once the first Stop is counted.
    pub stop: Option<StopFacts>,
    /// An implausible register was dead-lettered: nothing more is billed for this session.
    #[serde(default)]
    pub unbillable: bool,
}

impl SessionState {
    fn same_start(&self, start: &StartRecord) -> bool {
        self.start_source == StartSource::StartTransaction
            && self.connector_id == start.connector_id
            && self.id_tag.eq_ignore_ascii_case(&start.id_tag)
            && self.meter_start_wh == start.meter_start_wh
            && self.start_timestamp == start.timestamp
    }

    fn anomaly(&self, reason: AnomalyReason, detail: String) -> Anomaly {
        Anomaly {
            reason,
            charge_box_id: self.key.charge_box_id.clone(),
            ocpp_transaction_id: self.key.ocpp_transaction_id,
            id_tag: Some(self.id_tag.clone()),
            detail,
            held_event: None,
        }
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
    /// Events (sent or held) dated by the bridge: log and count each.
    pub clock_fallbacks: Vec<ClockFallback>,
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

/// Whether a register reading can be a meter's.
fn plausible_register(wh: Decimal) -> bool {
    wh.abs() <= MAX_PLAUSIBLE_REGISTER_WH
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
            TapKind::Unreadable(u) => {
                out.anomalies.push(unreadable(cb, u));
                return out;
            }
        };
        if txid <= 0 {
            if let TapKind::MeterValues(_) = record.kind {
                // Readings between sessions (transactionId 0 or -1): nothing to bill.
                out.ignored.push(Ignored::TransactionIdNotPositive);
                return out;
            }
            out.anomalies.push(Anomaly {
                reason: AnomalyReason::InvalidTransactionId,
                charge_box_id: cb.clone(),
                ocpp_transaction_id: txid,
                id_tag: match &record.kind {
                    TapKind::Start(s) => Some(s.id_tag.clone()),
                    TapKind::Stop(s) => s.id_tag.clone(),
                    TapKind::MeterValues(_) | TapKind::Unreadable(_) => None,
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
            TapKind::Unreadable(_) => {}
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
        let state = SessionState {
            key: key.clone(),
            start_source: StartSource::StartTransaction,
            connector_id: start.connector_id,
            id_tag: start.id_tag.clone(),
            id_tag_status: start.id_tag_status.clone(),
            meter_start_wh: start.meter_start_wh,
            start_timestamp: start.timestamp,
            // As the charger sent it (what SteVe stores): the clock check only dates events.
            started_at: start.timestamp.unwrap_or(received_at),
            start_received_at: received_at,
            held_reused,
            last_billed_wh: start.meter_start_wh,
            last_billed_at: start.timestamp,
            events_derived: 0,
            stop: None,
            unbillable: !plausible_register(start.meter_start_wh),
        };
        if state.unbillable {
            out.anomalies.push(state.anomaly(
                AnomalyReason::ImplausibleRegister,
                format!(
                    "meterStart {} Wh is beyond ±{MAX_PLAUSIBLE_REGISTER_WH} Wh: this session is \
                     not billed; bill it by hand from the charger's own records",
                    start.meter_start_wh
                ),
            ));
        }
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
            if session.unbillable {
                out.ignored.push(Ignored::SessionUnbillable);
                continue;
            }
            if !plausible_register(reading.wh) {
                out.anomalies.push(session.anomaly(
                    AnomalyReason::ImplausibleRegister,
                    format!(
                        "register reading {} Wh at {} is beyond ±{MAX_PLAUSIBLE_REGISTER_WH} Wh: \
                         nothing more is billed for this session (billed up to {} Wh)",
                        reading.wh,
                        display_timestamp(reading.timestamp),
                        session.last_billed_wh
                    ),
                ));
                session.unbillable = true;
                changed = true;
                continue;
            }
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
        let Some(session) = self.sessions.get_mut(&key) else {
            self.missing_start(key, stop, facts, rules, out);
            return;
        };
        if let Some(first) = &session.stop {
            if first.meter_stop_wh == facts.meter_stop_wh && first.timestamp == facts.timestamp {
                out.ignored.push(Ignored::DuplicateStop);
            } else {
                out.anomalies.push(session.anomaly(
                    AnomalyReason::ConflictingStop,
                    format!(
                        "Stop (meterStop {} Wh, timestamp {}) differs from the counted one \
                         (meterStop {} Wh, timestamp {}); the first counts",
                        facts.meter_stop_wh,
                        display_timestamp(facts.timestamp),
                        first.meter_stop_wh,
                        display_timestamp(first.timestamp)
                    ),
                ));
            }
            return;
        }
        let stop_wh = stop.meter_stop_wh;
        if session.unbillable {
            out.ignored.push(Ignored::SessionUnbillable);
        } else if !plausible_register(stop_wh) {
            out.anomalies.push(session.anomaly(
                AnomalyReason::ImplausibleRegister,
                format!(
                    "meterStop {stop_wh} Wh is beyond ±{MAX_PLAUSIBLE_REGISTER_WH} Wh (meterStart \
                     {} Wh, billed up to {} Wh): the rest of this session is not billed",
                    session.meter_start_wh, session.last_billed_wh
                ),
            ));
            session.unbillable = true;
        } else if stop_wh < session.last_billed_wh {
            let (what, billed) = if session.last_billed_wh == session.meter_start_wh {
                ("meterStart", session.meter_start_wh)
            } else {
                ("last billed reading", session.last_billed_wh)
            };
            let detail = format!(
                "meterStop {stop_wh} Wh is below the {what} {billed} Wh (meterStart {} Wh); \
                 nothing more billed",
                session.meter_start_wh
            );
            out.anomalies
                .push(session.anomaly(AnomalyReason::MeterWentBackwards, detail));
        } else {
            let mismatch = meter_start_mismatch(session, stop, rules);
            match rules.mode {
                BillingMode::Session => {
                    let d = Derivation {
                        id_suffix: None,
                        from_wh: session.meter_start_wh,
                        to_wh: stop_wh,
                        charger_timestamp: stop.timestamp,
                        received_at,
                    };
                    derive(session, d, rules, out, mismatch);
                }
                BillingMode::Incremental => {
                    if stop_wh > session.last_billed_wh
                        || session.events_derived == 0
                        || mismatch.is_some()
                    {
                        let d = Derivation {
                            id_suffix: Some(decimal_string(stop_wh)),
                            from_wh: session.last_billed_wh,
                            to_wh: stop_wh,
                            charger_timestamp: stop.timestamp,
                            received_at,
                        };
                        derive(session, d, rules, out, mismatch);
                        session.last_billed_wh = stop_wh;
                    }
                }
            }
        }
        session.stop = Some(facts);
        out.touched.push(key.clone());
        self.evict_finished(&key.charge_box_id, out);
    }

    /// A Stop for a session the ledger does not know: a dead letter, never billed to anyone on
    /// its own (its idTag is who stopped the session, not the customer). With a
    /// Transaction.Begin reading the event is held with no subscription, for an operator to
    /// requeue to the subscription they name.
    fn missing_start(
        &mut self,
        key: SessionKey,
        stop: &StopRecord,
        facts: StopFacts,
        rules: &BillingRules,
        out: &mut Applied,
    ) {
        let received_at = facts.received_at;
        let begin = stop.begin_reading.as_ref();
        let mut tombstone = SessionState {
            key: key.clone(),
            start_source: StartSource::Missing,
            connector_id: 0,
            id_tag: String::new(),
            id_tag_status: String::new(),
            meter_start_wh: begin.map_or(stop.meter_stop_wh, |b| b.wh),
            start_timestamp: begin.and_then(|b| b.timestamp),
            started_at: begin.and_then(|b| b.timestamp).unwrap_or(received_at),
            start_received_at: received_at,
            held_reused: false,
            last_billed_wh: stop.meter_stop_wh,
            last_billed_at: None,
            events_derived: 0,
            stop: None,
            unbillable: false,
        };
        let stopped_by = stop.id_tag.as_deref().unwrap_or("none");
        let mut held_event = None;
        let detail = match begin {
            None => format!(
                "Stop (meterStop {} Wh, timestamp {}, stopped by idTag {stopped_by}) without a \
                 known Start or Transaction.Begin reading: nothing held; bill it from SteVe's \
                 transaction record",
                stop.meter_stop_wh,
                display_timestamp(stop.timestamp)
            ),
            Some(b)
                if plausible_register(b.wh)
                    && plausible_register(stop.meter_stop_wh)
                    && b.wh <= stop.meter_stop_wh =>
            {
                let d = Derivation {
                    id_suffix: (rules.mode == BillingMode::Incremental)
                        .then(|| decimal_string(stop.meter_stop_wh)),
                    from_wh: b.wh,
                    to_wh: stop.meter_stop_wh,
                    charger_timestamp: stop.timestamp,
                    received_at,
                };
                let mut event = build_event(&tombstone, d, rules, out);
                event.external_subscription_id = String::new();
                held_event = Some(event);
                format!(
                    "Stop (meterStop {} Wh, timestamp {}, stopped by idTag {stopped_by}) without \
                     a known Start; its Transaction.Begin reading {} Wh values the held event, \
                     which has no subscription: the customer comes from the start only \
                     (`spool requeue --id N --subscription SUB`)",
                    stop.meter_stop_wh,
                    display_timestamp(stop.timestamp),
                    b.wh
                )
            }
            Some(b) => format!(
                "Stop (meterStop {} Wh, timestamp {}, stopped by idTag {stopped_by}) without a \
                 known Start; its Transaction.Begin reading {} Wh cannot value it: nothing held",
                stop.meter_stop_wh,
                display_timestamp(stop.timestamp),
                b.wh
            ),
        };
        out.anomalies.push(Anomaly {
            reason: AnomalyReason::MissingStart,
            charge_box_id: key.charge_box_id.clone(),
            ocpp_transaction_id: key.ocpp_transaction_id,
            id_tag: stop.id_tag.clone(),
            detail,
            held_event,
        });
        // A tombstone so that retries of this Stop read as duplicates.
        tombstone.stop = Some(facts);
        self.sessions.insert(key.clone(), tombstone);
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
            let Some(s) = self.sessions.remove(&key) else {
                continue;
            };
            out.anomalies.push(s.anomaly(
                AnomalyReason::OpenSessionEvicted,
                format!(
                    "more than {MAX_OPEN_PER_CHARGE_BOX} open sessions; dropped the oldest \
                     (meterStart {} Wh, billed up to {} Wh, mode {}); its Stop will read as missing_start",
                    s.meter_start_wh,
                    s.last_billed_wh,
                    // The config word, not Rust's `Incremental`.
                    match rules.mode {
                        BillingMode::Session => "session",
                        BillingMode::Incremental => "incremental",
                    }
                ),
            ));
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
        TapKind::Unreadable(_) => "unreadable billing message",
    }
}

/// The dead letter of a billing message the tap could not read.
fn unreadable(charge_box_id: &str, u: &UnreadableRecord) -> Anomaly {
    let mut quoted = u.raw_payload.as_str();
    if quoted.len() > MAX_QUOTED_PAYLOAD {
        let mut end = MAX_QUOTED_PAYLOAD;
        while !quoted.is_char_boundary(end) {
            end -= 1;
        }
        quoted = &quoted[..end];
    }
    let cut = if quoted.len() < u.raw_payload.len() {
        format!(" (first {} of {} bytes)", quoted.len(), u.raw_payload.len())
    } else {
        String::new()
    };
    Anomaly {
        reason: AnomalyReason::UnreadableFrame,
        charge_box_id: charge_box_id.to_owned(),
        ocpp_transaction_id: 0,
        id_tag: None,
        detail: format!(
            "{} (message id {:?}) relayed unchanged but not billable: {}; payload{cut}: {quoted}",
            u.action, u.message_id, u.problem
        ),
        held_event: None,
    }
}

/// meterStart against the charger's own Transaction.Begin reading of the same session: beyond
/// the tolerance (never less than the reading's resolution) one of them is wrong, and the
/// bridge does not guess which.
fn meter_start_mismatch(
    session: &SessionState,
    stop: &StopRecord,
    rules: &BillingRules,
) -> Option<(AnomalyReason, String)> {
    if session.start_source != StartSource::StartTransaction {
        return None;
    }
    let begin = stop.begin_reading.as_ref()?;
    let tolerance = rules.meter_start_tolerance_wh.max(begin.resolution_wh);
    let off = begin
        .wh
        .checked_sub(session.meter_start_wh)
        .map(|d| d.abs());
    if off.is_some_and(|off| off <= tolerance) {
        return None;
    }
    Some((
        AnomalyReason::MeterStartMismatch,
        format!(
            "meterStart {} Wh and the charger's Transaction.Begin reading {} Wh differ by more \
             than {tolerance} Wh; the held event bills from meterStart (to {} Wh): requeue it if \
             that is right, else bill from the Begin reading by hand",
            session.meter_start_wh, begin.wh, stop.meter_stop_wh
        ),
    ))
}

/// The charger's timestamp if believable: within [received − `max_clock_lag`, received +
/// `future_timestamp_tolerance`], not before 2020, not before the session's start.
fn check_clock(
    charger: Option<i64>,
    received_at: i64,
    started_at: Option<i64>,
    rules: &BillingRules,
) -> Result<i64, ClockProblem> {
    let t = charger.ok_or(ClockProblem::Missing)?;
    if t > received_at.saturating_add(rules.future_tolerance_secs) {
        Err(ClockProblem::InFuture)
    } else if t < received_at.saturating_sub(rules.max_clock_lag_secs)
        || t < EARLIEST_PLAUSIBLE_TIMESTAMP
    {
        Err(ClockProblem::TooOld)
    } else if started_at.is_some_and(|s| t < s) {
        Err(ClockProblem::BeforeStart)
    } else {
        Ok(t)
    }
}

/// Bills one incremental reading; returns whether the session changed.
///
/// A reading is trusted only up to its resolution (at least 1 Wh: meterStart and meterStop are
/// whole Wh that chargers truncate or round), so it bills up to (reading − resolution); the
/// Stop bills the exact rest. A reading below what is billed by more than its resolution, and
/// dated after the last billed one, is the meter going backwards.
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
    if dated_before_last {
        out.ignored.push(Ignored::LateReading);
        return false;
    }
    let resolution = reading.resolution_wh.max(Decimal::ONE);
    let (Some(bill_to), Some(upper)) = (
        reading.wh.checked_sub(resolution),
        reading.wh.checked_add(resolution),
    ) else {
        // Unreachable for a plausible register; never a panic.
        out.ignored.push(Ignored::LateReading);
        return false;
    };
    if bill_to <= session.last_billed_wh {
        let dated_after_last = matches!(
            (reading.timestamp, session.last_billed_at),
            (Some(t), Some(last)) if t > last
        );
        if upper < session.last_billed_wh && dated_after_last {
            out.anomalies.push(session.anomaly(
                AnomalyReason::MeterWentBackwards,
                format!(
                    "register reading {} Wh (resolution {resolution} Wh) at {} is below the \
                     {} Wh billed up to at {}; not billed",
                    reading.wh,
                    display_timestamp(reading.timestamp),
                    session.last_billed_wh,
                    display_timestamp(session.last_billed_at)
                ),
            ));
        } else if reading.wh <= session.last_billed_wh {
            // Without a later date a lower reading cannot be told from a late one.
            out.ignored.push(Ignored::LateReading);
        } else {
            out.ignored.push(Ignored::WithinResolution);
        }
        return false;
    }
    let d = Derivation {
        id_suffix: Some(decimal_string(bill_to)),
        from_wh: session.last_billed_wh,
        to_wh: bill_to,
        charger_timestamp: reading.timestamp,
        received_at,
    };
    derive(session, d, rules, out, None);
    session.last_billed_wh = bill_to;
    if reading.timestamp.is_some() {
        session.last_billed_at = reading.timestamp;
    }
    true
}

/// The event of `d` for `session`: id and subscription from the session's start facts alone,
/// timestamp from the charger's clock when believable (else the receive time, reported).
fn build_event(
    session: &SessionState,
    d: Derivation,
    rules: &BillingRules,
    out: &mut Applied,
) -> LagoEvent {
    let id_tag = rules.id_tag_case.apply(&session.id_tag);
    let values = TemplateValues {
        ocpp_transaction_id: session.key.ocpp_transaction_id,
        charge_box_id: &session.key.charge_box_id,
        connector_id: session.connector_id,
        id_tag: &id_tag,
        started_at: session.started_at,
    };
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
    let (timestamp, timestamp_source) = match check_clock(
        d.charger_timestamp,
        d.received_at,
        Some(session.started_at),
        rules,
    ) {
        Ok(t) => (t, TimestampSource::Charger),
        Err(problem) => {
            out.clock_fallbacks.push(ClockFallback {
                problem,
                charge_box_id: session.key.charge_box_id.clone(),
                ocpp_transaction_id: session.key.ocpp_transaction_id,
                charger_timestamp: d.charger_timestamp,
                received_at: d.received_at,
            });
            (d.received_at, TimestampSource::Bridge)
        }
    };
    // Both registers are plausible (|Wh| <= 10^12), so this cannot overflow; checked anyway.
    let energy_wh = d.to_wh.checked_sub(d.from_wh).unwrap_or(Decimal::ZERO);
    LagoEvent {
        transaction_id,
        external_subscription_id: subscription.unwrap_or_default(),
        code: rules.metric_code.clone(),
        timestamp,
        properties: EventProperties {
            value: kwh_string(energy_wh),
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
            origin: None,
        },
    }
}

/// Builds one event of `session` and sends it or holds it in an anomaly (`hold` first).
fn derive(
    session: &mut SessionState,
    d: Derivation,
    rules: &BillingRules,
    out: &mut Applied,
    hold: Option<(AnomalyReason, String)>,
) {
    let event = build_event(session, d, rules, out);
    session.events_derived = session.events_derived.saturating_add(1);
    let hold = hold.or_else(|| {
        if session.held_reused {
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
        } else if event.external_subscription_id.is_empty() {
            Some((
                AnomalyReason::UnmappedIdTag,
                format!(
                    "no external_subscription_id for idTag {:?}; fix the map and requeue",
                    session.id_tag
                ),
            ))
        } else {
            None
        }
    });
    match hold {
        None => out.events.push(event),
        Some((reason, detail)) => {
            let mut anomaly = session.anomaly(reason, detail);
            anomaly.held_event = Some(event);
            out.anomalies.push(anomaly);
        }
    }
}

#[cfg(test)]
mod tests;
