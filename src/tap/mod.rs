//! The tap: relayed OCPP-J text frames → [`TapRecord`]s, per websocket connection.
//!
//! The relay calls [`ConnectionTap::from_charger`] / [`ConnectionTap::from_central`] for every
//! text frame and acts on the returned [`Observation`]; the tap never blocks, never does I/O and
//! never changes a frame. Only billing actions have their payload parsed.
//!
//! Hold protocol (what the relay does with an observation):
//! - `Pass`, `Unbilled`, `Malformed` without a record: relay the frame at once (count the last
//!   two).
//! - `Record` from `from_charger` (MeterValues), or `Malformed` with a record from
//!   `from_charger` (a billing CALL the tap cannot read, recorded as [`TapKind::Unreadable`]):
//!   relay the CALL at once, persist the record; the central system's answer with `message_id`
//!   will come back from `from_central` as `BillingReply` and must be held until the record is
//!   committed.
//! - `Record` from `from_central`: the CALLRESULT that completes a StartTransaction (with its
//!   transactionId) or a StopTransaction (a Stop counts only once the central system accepted
//!   it: a CALLERROR answer leaves the session open for the charger's next Stop). The frame in
//!   hand is that answer; hold it until the record is committed.
//! - `BillingReply`: hold this answer until the record of its CALL is committed.
//! - When the connection ends, [`ConnectionTap::connection_ended`] returns the Stops that were
//!   never answered: persist them (nothing to hold). Stops forgotten to bound memory come out
//!   of [`ConnectionTap::take_unanswered_stops`] the same way, at once.

use crate::ocpp::frame::{self, FrameHead, MessageType};
use crate::ocpp::payload::{self, EnergyReading, StartTransactionReq, ViewError};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Most charger CALLs awaiting an answer we remember per connection; OCPP allows one in flight,
/// so this only bounds a charger that is never answered. The oldest is forgotten first (an
/// unanswered Stop is handed back to be recorded, never forgotten).
pub const MAX_PENDING_CALLS: usize = 16;

/// The OCPP version negotiated on the websocket, as far as the tap cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `ocpp1.6`: tapped fully.
    V16,
    /// `ocpp1.5` / `ocpp1.2`: Start and Stop tapped; MeterValues (`values` shape) untapped.
    V12OrV15,
    /// Anything else (or none): relayed, billing actions counted as untapped.
    Untapped,
}

impl Protocol {
    /// Maps a negotiated websocket subprotocol to what the tap does with it.
    pub fn from_subprotocol(subprotocol: Option<&str>) -> Protocol {
        match subprotocol.map(str::trim) {
            Some(p) if p.eq_ignore_ascii_case("ocpp1.6") => Protocol::V16,
            Some(p) if p.eq_ignore_ascii_case("ocpp1.5") || p.eq_ignore_ascii_case("ocpp1.2") => {
                Protocol::V12OrV15
            }
            _ => Protocol::Untapped,
        }
    }
}

/// One billing fact, stored raw as the source of truth for replaying the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapRecord {
    /// The charge box the connection belongs to.
    pub charge_box_id: String,
    /// Bridge clock, unix seconds, when the charger's message arrived.
    pub received_at: i64,
    /// What the charger reported.
    pub kind: TapKind,
}

/// The billing messages the tap records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TapKind {
    /// A StartTransaction with the central system's answer.
    Start(StartRecord),
    /// Energy register readings of a session.
    MeterValues(MeterValuesRecord),
    /// A StopTransaction (the central system accepted it, or never answered).
    Stop(StopRecord),
    /// A billing message relayed but unreadable: the ledger makes it a dead letter.
    Unreadable(UnreadableRecord),
}

/// `StartTransaction.req` joined with its `.conf`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRecord {
    /// The connector the session runs on.
    pub connector_id: i64,
    /// The idTag that started the session.
    pub id_tag: String,
    /// The register at the start.
    pub meter_start_wh: Decimal,
    /// The charger's start time, unix seconds (`None` when unreadable).
    pub timestamp: Option<i64>,
    /// The transactionId the central system assigned.
    pub ocpp_transaction_id: i64,
    /// `idTagInfo.status` of the answer ("Accepted", ...).
    pub id_tag_status: String,
}

/// `MeterValues.req` of a session (records exist only when a transactionId is given).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterValuesRecord {
    /// The connector measured.
    pub connector_id: i64,
    /// The session the readings belong to.
    pub ocpp_transaction_id: i64,
    /// Main-meter energy register readings, in message order.
    pub readings: Vec<EnergyReading>,
}

/// `StopTransaction.req`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopRecord {
    /// The session being stopped.
    pub ocpp_transaction_id: i64,
    /// The register at the stop.
    pub meter_stop_wh: Decimal,
    /// The charger's stop time, unix seconds (`None` when unreadable).
    pub timestamp: Option<i64>,
    /// The idTag that stopped the session, if sent (not the customer: OCPP 1.6 §6.50).
    pub id_tag: Option<String>,
    /// The stop reason, if sent.
    pub reason: Option<String>,
    /// The `Transaction.Begin` reading of `transactionData`, if sent.
    pub begin_reading: Option<EnergyReading>,
    /// All main-meter readings of `transactionData`.
    pub readings: Vec<EnergyReading>,
}

/// A billing message the tap could not read (a register such as `"4200,0"`, a wrong type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadableRecord {
    /// `StartTransaction`, `MeterValues`, `StopTransaction` or `StartTransaction.conf`.
    pub action: String,
    /// What could not be read.
    pub problem: String,
    /// The OCPP message id of the frame.
    pub message_id: String,
    /// The frame's payload exactly as relayed.
    pub raw_payload: String,
}

/// Why a billing message is relayed but not billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unbilled {
    /// Connector 0 is the charge point as a whole, never a session.
    ConnectorZero,
    /// MeterValues without a transactionId cannot be attributed without guessing.
    NoTransactionId,
    /// MeterValues with transactionId 0 or below: readings outside any session, which some
    /// chargers send between sessions. Counted and logged, never billed.
    TransactionIdNotPositive,
    /// The energy register came only as `SignedData`.
    SignedDataOnly,
    /// The energy register came only per phase or from a non-Outlet location.
    NotMainMeter,
    /// The subprotocol (or this message's shape in it) is not tapped.
    UntappedProtocol,
    /// The central system answered a StartTransaction with a CALLERROR: no session exists.
    StartCallError,
    /// The central system answered a StopTransaction with a CALLERROR: the session stays open
    /// and the charger's next Stop for it is the one billed.
    StopCallError,
}

impl Unbilled {
    /// Stable code for counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Unbilled::ConnectorZero => "connector_zero",
            Unbilled::NoTransactionId => "no_transaction_id",
            Unbilled::TransactionIdNotPositive => "transaction_id_not_positive",
            Unbilled::SignedDataOnly => "signed_data_only",
            Unbilled::NotMainMeter => "not_main_meter",
            Unbilled::UntappedProtocol => "untapped_protocol",
            Unbilled::StartCallError => "start_call_error",
            Unbilled::StopCallError => "stop_call_error",
        }
    }
}

/// What the relay does with a frame; see the module doc for the hold protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// Not billing relevant: relay without waiting.
    Pass,
    /// Persist `record`; hold the central system's answer with `message_id` until committed.
    Record {
        /// The billing fact to persist.
        record: TapRecord,
        /// The OCPP message id of the answer to hold.
        message_id: String,
    },
    /// The answer to a billing CALL whose record was emitted earlier: hold until committed.
    BillingReply {
        /// The OCPP message id of this answer.
        message_id: String,
    },
    /// A billing message that is relayed and counted, not billed.
    Unbilled {
        /// Why it is not billed.
        reason: Unbilled,
    },
    /// The frame or a tapped payload is unreadable: relayed unchanged and counted.
    Malformed {
        /// Stable code for counters.
        reason: &'static str,
        /// What was wrong, for the log line.
        detail: String,
        /// For a billing message: its [`TapKind::Unreadable`] record and the message id of the
        /// answer to hold, handled exactly like [`Observation::Record`].
        record: Option<(TapRecord, String)>,
    },
}

impl Observation {
    fn malformed_frame(e: frame::FrameError) -> Observation {
        Observation::Malformed {
            reason: e.as_str(),
            detail: e.to_string(),
            record: None,
        }
    }
}

#[derive(Debug, Clone)]
enum PendingCall {
    /// A StartTransaction waiting for its transactionId.
    Start {
        req: StartTransactionReq,
        received_at: i64,
    },
    /// A StopTransaction waiting for the central system to accept it.
    Stop(Box<TapRecord>),
    /// A MeterValues (or unreadable billing CALL) whose record was emitted; its answer is a
    /// BillingReply.
    Billing,
}

/// The tap state of one websocket connection.
#[derive(Debug)]
pub struct ConnectionTap {
    charge_box_id: String,
    protocol: Protocol,
    pending: VecDeque<(String, PendingCall)>,
    evicted_pending: u64,
    /// Stops pushed out of `pending` unanswered: recorded as they are, never dropped.
    unanswered_stops: Vec<TapRecord>,
}

impl ConnectionTap {
    /// A tap for one connection of `charge_box_id` with the negotiated `subprotocol`.
    pub fn new(charge_box_id: String, subprotocol: Option<&str>) -> ConnectionTap {
        ConnectionTap {
            charge_box_id,
            protocol: Protocol::from_subprotocol(subprotocol),
            pending: VecDeque::new(),
            evicted_pending: 0,
            unanswered_stops: Vec::new(),
        }
    }

    /// The tap mode chosen from the subprotocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// How many unanswered charger CALLs were forgotten to bound memory (for a counter).
    pub fn evicted_pending(&self) -> u64 {
        self.evicted_pending
    }

    /// Stops pushed out of the pending calls before any answer came (a central system that
    /// never answers): persist them now, without a reply to hold.
    pub fn take_unanswered_stops(&mut self) -> Vec<TapRecord> {
        std::mem::take(&mut self.unanswered_stops)
    }

    /// The connection ended: every Stop still waiting for an answer, to persist as it is (the
    /// charger may have been answered by a central system we no longer see).
    pub fn connection_ended(&mut self) -> Vec<TapRecord> {
        let mut stops = self.take_unanswered_stops();
        for (_, call) in self.pending.drain(..) {
            if let PendingCall::Stop(record) = call {
                stops.push(*record);
            }
        }
        stops
    }

    fn remember(&mut self, message_id: String, call: PendingCall) {
        if let Some(pos) = self.pending.iter().position(|(id, _)| *id == message_id) {
            // The same message id again: the charger's retry of that CALL replaces it.
            self.pending.remove(pos);
        }
        if self.pending.len() >= MAX_PENDING_CALLS {
            if let Some((_, PendingCall::Stop(record))) = self.pending.pop_front() {
                self.unanswered_stops.push(*record);
            }
            self.evicted_pending += 1;
        }
        self.pending.push_back((message_id, call));
    }

    fn take(&mut self, message_id: &str) -> Option<PendingCall> {
        let pos = self.pending.iter().position(|(id, _)| id == message_id)?;
        self.pending.remove(pos).map(|(_, call)| call)
    }

    fn record(&self, received_at: i64, kind: TapKind) -> TapRecord {
        TapRecord {
            charge_box_id: self.charge_box_id.clone(),
            received_at,
            kind,
        }
    }

    /// A billing message that cannot be read: relayed, counted, and recorded as
    /// [`TapKind::Unreadable`] so that it becomes a dead letter instead of a silent gap.
    fn unreadable(
        &mut self,
        head: &FrameHead<'_>,
        action: &str,
        problem: String,
        e: &ViewError,
        received_at: i64,
    ) -> Observation {
        let message_id = head.message_id.clone().into_owned();
        let record = self.record(
            received_at,
            TapKind::Unreadable(UnreadableRecord {
                action: action.to_owned(),
                problem: problem.clone(),
                message_id: message_id.clone(),
                raw_payload: head.payload_text.to_owned(),
            }),
        );
        if head.message_type == MessageType::Call {
            self.remember(message_id.clone(), PendingCall::Billing);
        }
        Observation::Malformed {
            reason: e.as_str(),
            detail: format!("{action}: {problem}"),
            record: Some((record, message_id)),
        }
    }

    /// Observes a text frame sent by the charger; `received_at` is the bridge clock in unix seconds.
    pub fn from_charger(&mut self, text: &str, received_at: i64) -> Observation {
        self.charger_head(frame::parse_head(text), received_at)
    }

    /// Like [`ConnectionTap::from_charger`], for a head the caller already parsed (the relay
    /// parses each frame's head once, for its metric label and for the tap).
    pub fn charger_head(
        &mut self,
        head: Result<FrameHead<'_>, frame::FrameError>,
        received_at: i64,
    ) -> Observation {
        let head = match head {
            Ok(head) => head,
            Err(e) => return Observation::malformed_frame(e),
        };
        if head.message_type != MessageType::Call {
            return Observation::Pass;
        }
        let action = head.action.as_deref().unwrap_or_default();
        if !matches!(
            action,
            "StartTransaction" | "MeterValues" | "StopTransaction"
        ) {
            return Observation::Pass;
        }
        if self.protocol == Protocol::Untapped
            || (self.protocol == Protocol::V12OrV15 && action == "MeterValues")
        {
            return Observation::Unbilled {
                reason: Unbilled::UntappedProtocol,
            };
        }
        match action {
            "StartTransaction" => self.start_call(&head, received_at),
            "MeterValues" => self.meter_values_call(&head, received_at),
            _ => self.stop_call(&head, received_at),
        }
    }

    fn start_call(&mut self, head: &FrameHead<'_>, received_at: i64) -> Observation {
        let req = match payload::start_transaction_req(head.payload_text) {
            Ok(req) => req,
            Err(e) => {
                return self.unreadable(head, "StartTransaction", e.to_string(), &e, received_at);
            }
        };
        if req.connector_id == 0 {
            return Observation::Unbilled {
                reason: Unbilled::ConnectorZero,
            };
        }
        self.remember(
            head.message_id.clone().into_owned(),
            PendingCall::Start { req, received_at },
        );
        // The record is complete only with the answer; the CALL itself goes through at once.
        Observation::Pass
    }

    fn meter_values_call(&mut self, head: &FrameHead<'_>, received_at: i64) -> Observation {
        let req = match payload::meter_values_req(head.payload_text) {
            Ok(req) => req,
            Err(e) => {
                return self.unreadable(head, "MeterValues", e.to_string(), &e, received_at);
            }
        };
        let unbilled = |reason| Observation::Unbilled { reason };
        if req.connector_id == 0 {
            return unbilled(Unbilled::ConnectorZero);
        }
        let Some(ocpp_transaction_id) = req.transaction_id else {
            return unbilled(Unbilled::NoTransactionId);
        };
        if ocpp_transaction_id <= 0 {
            return unbilled(Unbilled::TransactionIdNotPositive);
        }
        if req.readings.is_empty() {
            return if req.skipped.signed > 0 {
                unbilled(Unbilled::SignedDataOnly)
            } else if req.skipped.not_main_meter > 0 {
                unbilled(Unbilled::NotMainMeter)
            } else {
                // Power, current, SoC...: no energy register at all, nothing to bill.
                Observation::Pass
            };
        }
        let message_id = head.message_id.clone().into_owned();
        self.remember(message_id.clone(), PendingCall::Billing);
        let record = self.record(
            received_at,
            TapKind::MeterValues(MeterValuesRecord {
                connector_id: req.connector_id,
                ocpp_transaction_id,
                readings: req.readings,
            }),
        );
        Observation::Record { record, message_id }
    }

    fn stop_call(&mut self, head: &FrameHead<'_>, received_at: i64) -> Observation {
        let read_transaction_data = self.protocol == Protocol::V16;
        let req = match payload::stop_transaction_req(head.payload_text, read_transaction_data) {
            Ok(req) => req,
            Err(e) => {
                return self.unreadable(head, "StopTransaction", e.to_string(), &e, received_at);
            }
        };
        let begin_reading = req.begin_reading().cloned();
        let record = self.record(
            received_at,
            TapKind::Stop(StopRecord {
                ocpp_transaction_id: req.transaction_id,
                meter_stop_wh: req.meter_stop_wh,
                timestamp: req.timestamp,
                id_tag: req.id_tag,
                reason: req.reason,
                begin_reading,
                readings: req.readings,
            }),
        );
        // Recorded when the central system accepts it (or the connection ends unanswered).
        self.remember(
            head.message_id.clone().into_owned(),
            PendingCall::Stop(Box::new(record)),
        );
        Observation::Pass
    }

    /// Observes a text frame sent by the central system; `received_at` is the bridge clock.
    pub fn from_central(&mut self, text: &str, received_at: i64) -> Observation {
        self.central_head(frame::parse_head(text), received_at)
    }

    /// Like [`ConnectionTap::from_central`], for a head the caller already parsed.
    pub fn central_head(
        &mut self,
        head: Result<FrameHead<'_>, frame::FrameError>,
        received_at: i64,
    ) -> Observation {
        let _ = received_at; // Records are dated by their request, not by the answer.
        let head = match head {
            Ok(head) => head,
            Err(e) => return Observation::malformed_frame(e),
        };
        if head.message_type == MessageType::Call || self.pending.is_empty() {
            return Observation::Pass;
        }
        let message_id = head.message_id.clone().into_owned();
        match (self.take(&message_id), head.message_type) {
            (None, _) => Observation::Pass,
            (Some(PendingCall::Billing), _) => Observation::BillingReply { message_id },
            (Some(PendingCall::Start { .. }), MessageType::CallError) => Observation::Unbilled {
                reason: Unbilled::StartCallError,
            },
            (Some(PendingCall::Stop(_)), MessageType::CallError) => Observation::Unbilled {
                reason: Unbilled::StopCallError,
            },
            (Some(PendingCall::Stop(record)), _) => Observation::Record {
                record: *record,
                message_id,
            },
            (Some(PendingCall::Start { req, received_at }), _) => {
                let conf = match payload::start_transaction_conf(head.payload_text) {
                    Ok(conf) => conf,
                    Err(e) => {
                        let problem = format!(
                            "{e}; the request: connectorId {}, idTag {:?}, meterStart {} Wh, \
                             timestamp {:?}",
                            req.connector_id, req.id_tag, req.meter_start_wh, req.timestamp
                        );
                        return self.unreadable(
                            &head,
                            "StartTransaction.conf",
                            problem,
                            &e,
                            received_at,
                        );
                    }
                };
                let record = self.record(
                    received_at,
                    TapKind::Start(StartRecord {
                        connector_id: req.connector_id,
                        id_tag: req.id_tag,
                        meter_start_wh: req.meter_start_wh,
                        timestamp: req.timestamp,
                        ocpp_transaction_id: conf.transaction_id,
                        id_tag_status: conf.id_tag_status,
                    }),
                );
                Observation::Record { record, message_id }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    const T0: i64 = 1_700_000_000;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn tap() -> ConnectionTap {
        ConnectionTap::new("CB1".into(), Some("ocpp1.6"))
    }

    fn start_req(id: &str) -> String {
        format!(
            r#"[2,"{id}","StartTransaction",{{"connectorId":1,"idTag":"TAG","meterStart":1000,"timestamp":"2023-11-14T22:13:20Z"}}]"#
        )
    }

    #[test]
    fn start_is_recorded_from_the_answer() {
        let mut tap = tap();
        assert_eq!(tap.from_charger(&start_req("m1"), T0), Observation::Pass);
        let obs = tap.from_central(
            r#"[3,"m1",{"idTagInfo":{"status":"Accepted"},"transactionId":42}]"#,
            T0 + 1,
        );
        assert_eq!(
            obs,
            Observation::Record {
                record: TapRecord {
                    charge_box_id: "CB1".into(),
                    received_at: T0,
                    kind: TapKind::Start(StartRecord {
                        connector_id: 1,
                        id_tag: "TAG".into(),
                        meter_start_wh: d("1000"),
                        timestamp: Some(T0),
                        ocpp_transaction_id: 42,
                        id_tag_status: "Accepted".into(),
                    }),
                },
                message_id: "m1".into(),
            }
        );
        // The same answer again is not correlated a second time.
        assert_eq!(
            tap.from_central(
                r#"[3,"m1",{"idTagInfo":{"status":"Accepted"},"transactionId":42}]"#,
                T0
            ),
            Observation::Pass
        );
    }

    #[test]
    fn start_answers_correlate_by_message_id_only() {
        let mut tap = tap();
        tap.from_charger(&start_req("a"), T0);
        // The charger's own answers and central CALLs with the same id do not complete it.
        assert_eq!(tap.from_charger(r#"[3,"a",{}]"#, T0), Observation::Pass);
        assert_eq!(
            tap.from_central(r#"[2,"a","Reset",{"type":"Soft"}]"#, T0),
            Observation::Pass
        );
        assert_eq!(tap.from_central(r#"[3,"b",{}]"#, T0), Observation::Pass);
        assert!(matches!(
            tap.from_central(
                r#"[3,"a",{"idTagInfo":{"status":"Invalid"},"transactionId":7}]"#,
                T0
            ),
            Observation::Record { .. }
        ));
    }

    #[test]
    fn start_call_error_and_bad_answer() {
        let mut tap = tap();
        tap.from_charger(&start_req("a"), T0);
        assert_eq!(
            tap.from_central(r#"[4,"a","InternalError","x",{}]"#, T0),
            Observation::Unbilled {
                reason: Unbilled::StartCallError
            }
        );
        tap.from_charger(&start_req("b"), T0);
        assert!(matches!(
            tap.from_central(r#"[3,"b",{"transactionId":7}]"#, T0),
            Observation::Malformed {
                reason: "missing_field",
                ..
            }
        ));
    }

    #[test]
    fn pending_calls_are_bounded() {
        let mut tap = tap();
        for i in 0..(MAX_PENDING_CALLS + 5) {
            tap.from_charger(&start_req(&i.to_string()), T0);
        }
        assert_eq!(tap.pending.len(), MAX_PENDING_CALLS);
        assert_eq!(tap.evicted_pending(), 5);
        assert_eq!(
            tap.from_central(
                r#"[3,"0",{"idTagInfo":{"status":"Accepted"},"transactionId":1}]"#,
                T0
            ),
            Observation::Pass
        );
        let last = (MAX_PENDING_CALLS + 4).to_string();
        assert!(matches!(
            tap.from_central(
                &format!(
                    r#"[3,"{last}",{{"idTagInfo":{{"status":"Accepted"}},"transactionId":1}}]"#
                ),
                T0
            ),
            Observation::Record { .. }
        ));
    }

    #[test]
    fn meter_values_and_their_reply() {
        let mut tap = tap();
        let obs = tap.from_charger(
            r#"[2,"mv1","MeterValues",{"connectorId":1,"transactionId":42,"meterValue":[{"timestamp":"2023-11-14T22:13:20Z","sampledValue":[{"value":"1.5","unit":"kwh"}]}]}]"#,
            T0,
        );
        let Observation::Record { record, message_id } = obs else {
            panic!("{obs:?}")
        };
        assert_eq!(message_id, "mv1");
        assert_eq!(
            record.kind,
            TapKind::MeterValues(MeterValuesRecord {
                connector_id: 1,
                ocpp_transaction_id: 42,
                readings: vec![EnergyReading {
                    timestamp: Some(T0),
                    wh: d("1500"),
                    context: "Sample.Periodic".into(),
                    resolution_wh: d("100"),
                }],
            })
        );
        assert_eq!(
            tap.from_central(r#"[3,"mv1",{}]"#, T0),
            Observation::BillingReply {
                message_id: "mv1".into()
            }
        );
        assert_eq!(tap.from_central(r#"[3,"mv1",{}]"#, T0), Observation::Pass);
    }

    #[test]
    fn unbilled_meter_values() {
        let mut tap = tap();
        let mv = |body: &str| format!(r#"[2,"x","MeterValues",{body}]"#);
        let mut check = |body: &str, reason| {
            assert_eq!(
                tap.from_charger(&mv(body), T0),
                Observation::Unbilled { reason },
                "{body}"
            );
        };
        check(
            r#"{"connectorId":0,"transactionId":1,"meterValue":[{"timestamp":"2023-11-14T22:13:20Z","sampledValue":[{"value":"1"}]}]}"#,
            Unbilled::ConnectorZero,
        );
        check(
            r#"{"connectorId":1,"meterValue":[{"timestamp":"2023-11-14T22:13:20Z","sampledValue":[{"value":"1"}]}]}"#,
            Unbilled::NoTransactionId,
        );
        check(
            r#"{"connectorId":1,"transactionId":1,"meterValue":[{"timestamp":"2023-11-14T22:13:20Z","sampledValue":[{"value":"xx","format":"SignedData"}]}]}"#,
            Unbilled::SignedDataOnly,
        );
        check(
            r#"{"connectorId":1,"transactionId":1,"meterValue":[{"timestamp":"2023-11-14T22:13:20Z","sampledValue":[{"value":"1","phase":"L1"}]}]}"#,
            Unbilled::NotMainMeter,
        );
        assert_eq!(
            tap.from_charger(
                &mv(r#"{"connectorId":1,"transactionId":1,"meterValue":[{"timestamp":"2023-11-14T22:13:20Z","sampledValue":[{"value":"7","measurand":"Power.Active.Import","unit":"W"}]}]}"#),
                T0
            ),
            Observation::Pass
        );
        assert!(tap.pending.is_empty());
        assert_eq!(tap.from_central(r#"[3,"x",{}]"#, T0), Observation::Pass);
    }

    #[test]
    fn stop_from_transaction_data_only() {
        let mut tap = tap();
        let obs = tap.from_charger(
            r#"[2,"s1","StopTransaction",{"transactionId":42,"meterStop":"4000.0","timestamp":"2023-11-14T22:13:20Z",
                "transactionData":[{"timestamp":"2023-11-14T21:13:20Z","sampledValue":[{"value":"1","unit":"kWh","context":"Transaction.Begin"}]}]}]"#,
            T0,
        );
        assert_eq!(obs, Observation::Pass);
        let obs = tap.from_central(r#"[3,"s1",{}]"#, T0 + 1);
        let Observation::Record { record, .. } = obs else {
            panic!("{obs:?}")
        };
        let TapKind::Stop(stop) = record.kind else {
            panic!()
        };
        assert_eq!(stop.ocpp_transaction_id, 42);
        assert_eq!(stop.meter_stop_wh, d("4000"));
        assert_eq!(stop.begin_reading.unwrap().wh, d("1000"));
        assert_eq!(stop.readings.len(), 1);
    }

    #[test]
    fn protocols() {
        let stop = r#"[2,"s","StopTransaction",{"transactionId":1,"meterStop":5,"timestamp":"2023-11-14T22:13:20Z","transactionData":[{"timestamp":"2023-11-14T22:13:20Z","values":[{"value":"1"}]}]}]"#;
        let mv = r#"[2,"m","MeterValues",{"connectorId":1,"transactionId":1,"values":[{"timestamp":"2023-11-14T22:13:20Z","value":[{"value":"1"}]}]}]"#;
        for sub in [Some("ocpp1.5"), Some("OCPP1.2")] {
            let mut tap = ConnectionTap::new("CB".into(), sub);
            assert_eq!(tap.from_charger(stop, T0), Observation::Pass);
            assert!(matches!(
                tap.from_central(r#"[3,"s",{}]"#, T0),
                Observation::Record { .. }
            ));
            assert_eq!(
                tap.from_charger(mv, T0),
                Observation::Unbilled {
                    reason: Unbilled::UntappedProtocol
                }
            );
            assert_eq!(tap.from_charger(&start_req("a"), T0), Observation::Pass);
            assert!(matches!(
                tap.from_central(
                    r#"[3,"a",{"idTagInfo":{"status":"Accepted"},"transactionId":1}]"#,
                    T0
                ),
                Observation::Record { .. }
            ));
        }
        for sub in [None, Some("ocpp2.0.1")] {
            let mut tap = ConnectionTap::new("CB".into(), sub);
            assert_eq!(tap.protocol(), Protocol::Untapped);
            assert_eq!(
                tap.from_charger(stop, T0),
                Observation::Unbilled {
                    reason: Unbilled::UntappedProtocol
                }
            );
            assert_eq!(
                tap.from_charger(r#"[2,"h","Heartbeat",{}]"#, T0),
                Observation::Pass
            );
        }
    }

    #[test]
    fn malformed_frames_and_payloads() {
        let mut tap = tap();
        assert!(matches!(
            tap.from_charger("not json", T0),
            Observation::Malformed {
                reason: "not_an_array",
                ..
            }
        ));
        assert!(matches!(
            tap.from_charger(
                r#"[2,"x","StopTransaction",{"transactionId":1,"meterStop":"lots"}]"#,
                T0
            ),
            Observation::Malformed {
                reason: "invalid_field",
                ..
            }
        ));
        assert!(matches!(
            tap.from_charger(
                r#"[2,"x","StartTransaction",{"connectorId":1,"idTag":"A","meterStart":1,}]"#,
                T0
            ),
            Observation::Malformed {
                reason: "bad_shape",
                ..
            }
        ));
        // Non-billing payloads are never parsed, even when broken.
        assert_eq!(
            tap.from_charger(r#"[2,"x","DataTransfer",{broken]"#, T0),
            Observation::Pass
        );
        assert_eq!(
            tap.from_charger(
                r#"[2,"x","StartTransaction",{"connectorId":0,"idTag":"A","meterStart":1}]"#,
                T0
            ),
            Observation::Unbilled {
                reason: Unbilled::ConnectorZero
            }
        );
    }

    fn stop_call(id: &str, meter_stop: &str) -> String {
        format!(
            r#"[2,"{id}","StopTransaction",{{"transactionId":42,"meterStop":{meter_stop},"timestamp":"2023-11-14T22:13:20Z"}}]"#
        )
    }

    #[test]
    fn stop_is_recorded_when_the_central_system_accepts_it() {
        let mut tap = tap();
        assert_eq!(
            tap.from_charger(&stop_call("s1", "4200"), T0),
            Observation::Pass
        );
        // Another answer id, then the answer to the Stop: that frame is the one to hold.
        assert_eq!(tap.from_central(r#"[3,"x",{}]"#, T0), Observation::Pass);
        let obs = tap.from_central(r#"[3,"s1",{"idTagInfo":{"status":"Accepted"}}]"#, T0 + 5);
        let Observation::Record { record, message_id } = obs else {
            panic!("{obs:?}")
        };
        assert_eq!((message_id.as_str(), record.received_at), ("s1", T0));
        assert!(matches!(record.kind, TapKind::Stop(ref s) if s.meter_stop_wh == d("4200")));
        assert!(tap.connection_ended().is_empty());
    }

    #[test]
    fn stop_answered_with_a_call_error_is_not_recorded() {
        let mut tap = tap();
        tap.from_charger(&stop_call("s1", "4200"), T0);
        assert_eq!(
            tap.from_central(r#"[4,"s1","InternalError","no such transaction",{}]"#, T0),
            Observation::Unbilled {
                reason: Unbilled::StopCallError
            }
        );
        // The corrected Stop is the one recorded.
        tap.from_charger(&stop_call("s2", "4300"), T0 + 10);
        let Observation::Record { record, .. } = tap.from_central(r#"[3,"s2",{}]"#, T0 + 11) else {
            panic!("the corrected Stop is recorded")
        };
        assert!(matches!(record.kind, TapKind::Stop(ref s) if s.meter_stop_wh == d("4300")));
    }

    #[test]
    fn unanswered_stops_are_handed_back_never_dropped() {
        let mut tap = tap();
        tap.from_charger(&stop_call("s1", "4200"), T0);
        let stops = tap.connection_ended();
        assert_eq!(stops.len(), 1);
        assert_eq!(stops[0].received_at, T0);
        assert!(tap.connection_ended().is_empty());
        // Pushed out of the bounded memory by later CALLs: handed back at once.
        tap.from_charger(&stop_call("s2", "4300"), T0);
        for i in 0..MAX_PENDING_CALLS {
            tap.from_charger(&start_req(&format!("st{i}")), T0);
        }
        let orphans = tap.take_unanswered_stops();
        assert_eq!(orphans.len(), 1);
        assert!(matches!(orphans[0].kind, TapKind::Stop(ref s) if s.meter_stop_wh == d("4300")));
        assert!(tap.connection_ended().is_empty());
    }

    #[test]
    fn unreadable_billing_messages_become_records() {
        for (frame, action) in [
            (stop_call("u1", r#""4200,0""#), "StopTransaction"),
            (stop_call("u1", r#""abc""#), "StopTransaction"),
            (
                r#"[2,"u1","StartTransaction",{"connectorId":1,"idTag":"A","meterStart":[1]}]"#
                    .to_owned(),
                "StartTransaction",
            ),
            (
                r#"[2,"u1","MeterValues",{"connectorId":1,"transactionId":4,"meterValue":[{"timestamp":"2023-11-14T22:13:20Z","sampledValue":[{"value":"1,5"}]}]}]"#
                    .to_owned(),
                "MeterValues",
            ),
        ] {
            let mut tap = tap();
            let obs = tap.from_charger(&frame, T0);
            let Observation::Malformed {
                record: Some((record, message_id)),
                ..
            } = obs
            else {
                panic!("{frame}: {obs:?}")
            };
            assert_eq!(message_id, "u1");
            let TapKind::Unreadable(u) = record.kind else {
                panic!("{frame}")
            };
            assert_eq!(u.action, action);
            assert!(frame.contains(&u.raw_payload), "{frame}");
            // Its answer is held like any billing reply.
            assert_eq!(
                tap.from_central(r#"[3,"u1",{}]"#, T0),
                Observation::BillingReply {
                    message_id: "u1".into()
                }
            );
        }
        // Exponent forms, JSON numbers and padded strings are exact numbers.
        for (meter_stop, wh) in [
            (r#""4.2E3""#, "4200"),
            ("4.2e3", "4200"),
            (r#"" 4200 ""#, "4200"),
            ("4200.0", "4200"),
            ("-5E28", "-50000000000000000000000000000"),
        ] {
            let mut tap = tap();
            tap.from_charger(&stop_call("s", meter_stop), T0);
            let Observation::Record { record, .. } = tap.from_central(r#"[3,"s",{}]"#, T0) else {
                panic!("{meter_stop}")
            };
            assert!(
                matches!(record.kind, TapKind::Stop(ref s) if s.meter_stop_wh == d(wh)),
                "{meter_stop}"
            );
        }
    }

    #[test]
    fn meter_values_outside_a_session_are_unbilled() {
        let mut tap = tap();
        for txid in ["0", "-1"] {
            assert_eq!(
                tap.from_charger(
                    &format!(r#"[2,"m","MeterValues",{{"connectorId":1,"transactionId":{txid},"meterValue":[{{"timestamp":"2023-11-14T22:13:20Z","sampledValue":[{{"value":"10"}}]}}]}}]"#),
                    T0
                ),
                Observation::Unbilled {
                    reason: Unbilled::TransactionIdNotPositive
                }
            );
        }
    }

    #[test]
    fn tap_record_round_trips_through_json() {
        let record = TapRecord {
            charge_box_id: "CB".into(),
            received_at: T0,
            kind: TapKind::Stop(StopRecord {
                ocpp_transaction_id: 1,
                meter_stop_wh: d("1234.5"),
                timestamp: None,
                id_tag: Some("A".into()),
                reason: None,
                begin_reading: None,
                readings: vec![EnergyReading {
                    timestamp: Some(1),
                    wh: d("0.001"),
                    context: "Transaction.End".into(),
                    resolution_wh: d("0.001"),
                }],
            }),
        };
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<TapRecord>(&json).unwrap(), record);
    }
}
