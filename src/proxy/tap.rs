//! The relay's hook into the billing pipeline for one connection: every data frame is shown to
//! the pure tap; billing records go to the spool; the reply to a billing CALL is held until its
//! record is on disk, for at most `spool.hold_timeout` (charging never stalls on us).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Histogram};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

use super::side::Side;
use crate::clock::unix_now;
use crate::lock;
use crate::spool::SpoolHandle;
use crate::tap::{ConnectionTap, MAX_PENDING_CALLS, Observation, TapRecord, Unbilled};

/// Where billing records go, shared by all connections.
#[derive(Debug, Clone)]
pub struct Billing {
    pub spool: SpoolHandle,
    /// How long a billing reply waits for its record's commit.
    pub hold_timeout: Duration,
}

/// Observes every data frame of one connection on its way through the relay.
#[derive(Debug)]
pub struct FrameTap {
    charge_box_id: String,
    tap: Mutex<ConnectionTap>,
    /// Commit receipts of the records of charger CALLs, by OCPP message id, until the reply.
    receipts: Mutex<HashMap<String, oneshot::Receiver<()>>>,
    /// `None`: relay-only (no usable spool); frames are still parsed and counted.
    billing: Option<Billing>,
}

impl FrameTap {
    /// A tap for the connection of `charge_box_id` speaking `subprotocol`.
    pub fn new(charge_box_id: String, subprotocol: Option<&str>, billing: Option<Billing>) -> Self {
        FrameTap {
            tap: Mutex::new(ConnectionTap::new(charge_box_id.clone(), subprotocol)),
            charge_box_id,
            receipts: Mutex::new(HashMap::new()),
            billing,
        }
    }

    /// Sees a frame read from `from` before it is relayed; returns once it may be relayed,
    /// with the frame's label (see [`frame_label_name`]) for the relayed-frames counter.
    pub async fn observe(&self, from: Side, message: &Message) -> usize {
        let (label, held) = self.see(from, message);
        if let Some((receipt, message_id)) = held {
            // Boxed: only a held reply pays for the wait's future, not every connection's task
            // for its whole life. The box holds a receipt and a message id, not the record:
            // under 1 KiB, which glibc serves from its small bins (a larger request consolidates
            // the allocator's fast bins first, which it did on every billing frame).
            Box::pin(self.hold(receipt, message_id)).await;
        }
        label
    }

    /// [`Self::observe`]'s synchronous part: the label, and the commit receipt to wait for
    /// (with its message id) when the frame is a billing reply to hold. Records are queued here,
    /// at once.
    fn see(
        &self,
        from: Side,
        message: &Message,
    ) -> (usize, Option<(oneshot::Receiver<()>, String)>) {
        let text = match message {
            Message::Text(text) => text.as_str(),
            Message::Binary(bytes) => {
                count_frame(from, Outcome::Malformed);
                bad_frame(from, "binary");
                tracing::warn!(charge_box_id = %self.charge_box_id, direction = from.direction(), bytes = bytes.len(), "binary frame relayed: OCPP-J is text only");
                return (LABEL_BINARY, None);
            }
            _ => return (LABEL_CONTROL, None),
        };
        // The head is parsed once, for the label and for the tap.
        let head = crate::ocpp::frame::parse_head(text);
        let label = crate::ocpp::head_label_index(&head);
        let (billing, orphans) = self.classify(from, head);
        let held = billing.and_then(|billing| self.bill(from, billing));
        // Stops pushed out of the tap's bounded memory unanswered: recorded as they are.
        self.submit_all(orphans);
        (label, held)
    }

    /// Counts and logs what the tap made of a frame; returns it when it is billing work.
    fn classify(
        &self,
        from: Side,
        head: Result<crate::ocpp::frame::FrameHead<'_>, crate::ocpp::frame::FrameError>,
    ) -> (Option<Observation>, Vec<TapRecord>) {
        let (observation, orphans) = {
            let mut tap = lock(&self.tap);
            let observation = match from {
                Side::Charger => tap.charger_head(head, unix_now()),
                Side::Upstream => tap.central_head(head, unix_now()),
            };
            (observation, tap.take_unanswered_stops())
        };
        match observation {
            Observation::Pass => count_frame(from, Outcome::Pass),
            Observation::Unbilled { reason } => {
                count_frame(from, Outcome::Unbilled);
                count_unbilled(reason);
                self.log_unbilled(reason);
            }
            Observation::Malformed {
                reason,
                detail,
                record,
            } => {
                count_frame(from, Outcome::Malformed);
                bad_frame(from, reason);
                tracing::warn!(charge_box_id = %self.charge_box_id, direction = from.direction(), reason, %detail, "frame relayed unchanged but not understood");
                // A billing message: its record becomes an `unreadable_frame` dead letter.
                if let Some((record, message_id)) = record {
                    return (Some(Observation::Record { record, message_id }), orphans);
                }
            }
            Observation::Record { .. } => {
                count_frame(from, Outcome::Record);
                return (Some(observation), orphans);
            }
            Observation::BillingReply { .. } => {
                count_frame(from, Outcome::BillingReply);
                return (Some(observation), orphans);
            }
        }
        (None, orphans)
    }

    fn submit_all(&self, records: Vec<TapRecord>) {
        for record in records {
            let _ = self.submit(record);
        }
    }

    /// Queues a record for the spool; returns the receipt a reply must wait for, with its
    /// message id, when this frame is a billing reply to hold.
    fn bill(
        &self,
        from: Side,
        observation: Observation,
    ) -> Option<(oneshot::Receiver<()>, String)> {
        match observation {
            Observation::Record { record, message_id } => {
                let receipt = self.submit(record)?;
                match from {
                    // The CALL goes on at once; its reply will wait for this receipt.
                    Side::Charger => {
                        let mut receipts = lock(&self.receipts);
                        if receipts.len() >= MAX_PENDING_CALLS {
                            // Unanswered CALLs (the tap forgets them too): nothing waits on them.
                            receipts.clear();
                        }
                        receipts.insert(message_id, receipt);
                        None
                    }
                    // A StartTransaction reply completes its record: hold this very frame.
                    Side::Upstream => Some((receipt, message_id)),
                }
            }
            Observation::BillingReply { message_id } => {
                let receipt = lock(&self.receipts).remove(&message_id)?;
                Some((receipt, message_id))
            }
            Observation::Pass | Observation::Unbilled { .. } | Observation::Malformed { .. } => {
                None
            }
        }
    }

    /// The connection ended: Stops SteVe never answered are recorded now (no reply to hold), so
    /// a session never stays open because its answer was lost with the connection.
    pub async fn connection_ended(&self) {
        let stops = lock(&self.tap).connection_ended();
        if !stops.is_empty() {
            tracing::info!(charge_box_id = %self.charge_box_id, stops = stops.len(), "StopTransaction unanswered when the connection ended: recorded as sent");
        }
        self.submit_all(stops);
    }

    /// The unbilled reasons that need a log line beside their counter.
    fn log_unbilled(&self, reason: Unbilled) {
        match reason {
            Unbilled::StopCallError => tracing::warn!(
                charge_box_id = %self.charge_box_id,
                reason = reason.as_str(),
                "StopTransaction answered with a CALLERROR: not billed, the session stays open for the charger's next Stop"
            ),
            Unbilled::TransactionIdNotPositive
                if outside_session_log_due(&self.charge_box_id, unix_now()) =>
            {
                tracing::info!(
                    charge_box_id = %self.charge_box_id,
                    reason = reason.as_str(),
                    "MeterValues with transactionId 0 or below (outside a session): counted, not billed; logged at most once an hour per charge box"
                );
            }
            _ => {}
        }
    }

    /// Queues a record for the spool; never waits (a full queue overflows to disk, see
    /// [`crate::spool::SpoolHandle::try_submit`]), so a CALL is never delayed by the spool.
    fn submit(&self, record: TapRecord) -> Option<oneshot::Receiver<()>> {
        let billing = self.billing.as_ref()?;
        match billing.spool.try_submit(record) {
            Ok(receipt) => Some(receipt),
            Err(error) => {
                let json = serde_json::to_string(error.record()).expect("tap record serialises");
                crate::spool::overflow::log_lost(&json, &error.to_string());
                None
            }
        }
    }

    async fn hold(&self, receipt: oneshot::Receiver<()>, message_id: String) {
        let Some(billing) = &self.billing else { return };
        let started = tokio::time::Instant::now();
        let deadline = started + billing.hold_timeout;
        let outcome = match tokio::time::timeout_at(deadline, receipt).await {
            Ok(Ok(())) => "committed",
            Ok(Err(_)) => {
                // The writer is gone: the daemon is failing and about to close every charger
                // (supervise.rs). Holding the reply to the end of the hold lets that close come
                // first, so the charger resends to the restarted bridge instead of getting an
                // answer whose record is not on disk; the bound stays `hold_timeout`.
                tokio::time::sleep_until(deadline).await;
                "writer_stopped"
            }
            Err(_) => "timeout",
        };
        static HOLD_SECONDS: OnceLock<Histogram> = OnceLock::new();
        HOLD_SECONDS
            .get_or_init(|| metrics::histogram!("ocpp_lago_bridge_reply_hold_seconds"))
            .record(started.elapsed().as_secs_f64());
        if outcome != "committed" {
            metrics::counter!("ocpp_lago_bridge_replies_released_uncommitted_total", "reason" => outcome).increment(1);
            tracing::error!(charge_box_id = %self.charge_box_id, %message_id, reason = outcome, "billing reply relayed before its record was on disk; the spool is not committing");
        }
    }
}

/// Charge boxes whose out-of-session MeterValues were logged, with when: such chargers send one
/// every sample interval, so one line an hour per charge box is enough next to the counter.
static OUTSIDE_SESSION_LOGGED: Mutex<Option<HashMap<String, i64>>> = Mutex::new(None);
/// Bounds [`OUTSIDE_SESSION_LOGGED`] (a fleet far larger than this only logs a bit more often).
const OUTSIDE_SESSION_LOG_ENTRIES: usize = 100_000;

fn outside_session_log_due(charge_box_id: &str, now: i64) -> bool {
    let mut logged = lock(&OUTSIDE_SESSION_LOGGED);
    let logged = logged.get_or_insert_with(HashMap::new);
    match logged.get(charge_box_id) {
        Some(&at) if now.saturating_sub(at) < 3600 => false,
        _ => {
            if logged.len() >= OUTSIDE_SESSION_LOG_ENTRIES {
                logged.retain(|_, at| now.saturating_sub(*at) < 3600);
                if logged.len() >= OUTSIDE_SESSION_LOG_ENTRIES {
                    logged.clear();
                }
            }
            logged.insert(charge_box_id.to_owned(), now);
            true
        }
    }
}

/// Labels of relayed frames beyond [`crate::ocpp::head_label_index`]'s.
pub const LABEL_BINARY: usize = crate::ocpp::HEAD_LABELS;
pub const LABEL_CONTROL: usize = crate::ocpp::HEAD_LABELS + 1;
/// How many frame labels there are.
pub const FRAME_LABELS: usize = crate::ocpp::HEAD_LABELS + 2;

/// The `action` label value of a frame label [`FrameTap::observe`] returned.
pub fn frame_label_name(label: usize) -> &'static str {
    match label {
        LABEL_BINARY => "binary",
        LABEL_CONTROL => "control",
        _ => crate::ocpp::label_name(label),
    }
}

/// What the tap made of a frame: the `outcome` label of `ocpp_lago_bridge_tap_frames_total`.
#[derive(Clone, Copy)]
enum Outcome {
    Pass,
    Unbilled,
    Malformed,
    Record,
    BillingReply,
}

impl Outcome {
    const COUNT: usize = 5;

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Unbilled => "unbilled",
            Outcome::Malformed => "malformed",
            Outcome::Record => "record",
            Outcome::BillingReply => "billing_reply",
        }
    }
}

/// Counts a frame in `ocpp_lago_bridge_tap_frames_total`. Its handles are registered on first
/// use and kept: `counter!` with labels builds a key (a `Vec` of labels) and looks it up in the
/// registry on every call, twice per relayed frame (issue 16 item 2).
fn count_frame(from: Side, outcome: Outcome) {
    static HANDLES: [[OnceLock<Counter>; Outcome::COUNT]; 2] =
        [const { [const { OnceLock::new() }; Outcome::COUNT] }; 2];
    HANDLES[from.index()][outcome as usize]
        .get_or_init(|| {
            metrics::counter!("ocpp_lago_bridge_tap_frames_total", "direction" => from.direction(), "outcome" => outcome.as_str())
        })
        .increment(1);
}

/// Counts an unbilled frame in `ocpp_lago_bridge_unbilled_total`: a fleet on an untapped
/// subprotocol, or sending readings between sessions, does so with every MeterValues. Handles
/// are kept per reason; a reason added to [`Unbilled`] later is counted uncached until
/// `CACHED` grows (never lost).
fn count_unbilled(reason: Unbilled) {
    const CACHED: usize = 8;
    static HANDLES: [OnceLock<Counter>; CACHED] = [const { OnceLock::new() }; CACHED];
    let register =
        || metrics::counter!("ocpp_lago_bridge_unbilled_total", "reason" => reason.as_str());
    match HANDLES.get(reason as usize) {
        Some(slot) => slot.get_or_init(register).increment(1),
        None => register().increment(1),
    }
}

fn bad_frame(from: Side, reason: &'static str) {
    metrics::counter!("ocpp_lago_bridge_bad_frames_total", "direction" => from.direction(), "reason" => reason).increment(1);
}

#[cfg(test)]
mod tests {
    use super::outside_session_log_due;
    use super::{Billing, FrameTap, Side};
    use crate::spool::overflow::{Overflow, QUEUE_FULL};
    use crate::spool::{SpoolHandle, Submission};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::sync::mpsc;
    use tokio_tungstenite::tungstenite::Message;

    const HOLD: Duration = Duration::from_millis(600);
    /// Scheduling slack of a loaded test machine on top of the bound.
    const SLACK: Duration = Duration::from_millis(250);

    fn tap(commands: mpsc::Sender<Submission>, overflow: Arc<Overflow>) -> FrameTap {
        let billing = Billing {
            spool: SpoolHandle::new(commands, Some(overflow)),
            hold_timeout: HOLD,
        };
        FrameTap::new("CP-HOLD".into(), Some("ocpp1.6"), Some(billing))
    }

    /// A record that takes the queue's one slot.
    fn filler() -> Submission {
        Submission {
            record: crate::tap::TapRecord {
                charge_box_id: "CP-HOLD".into(),
                received_at: 0,
                kind: crate::tap::TapKind::Unreadable(crate::tap::UnreadableRecord {
                    action: "MeterValues".into(),
                    problem: "filler".into(),
                    message_id: "0".into(),
                    raw_payload: "{}".into(),
                }),
            },
            committed: tokio::sync::oneshot::channel().0,
        }
    }

    async fn timed(tap: &FrameTap, from: Side, frame: &str) -> Duration {
        let started = Instant::now();
        tap.observe(from, &Message::text(frame)).await;
        started.elapsed()
    }

    /// Issue 15 item 3: queueing never waits and a reply waits at most `hold_timeout` in all.
    /// The writer's queue is full and frees one slot just before the hold timeout, then
    /// never commits: the old code delayed the MeterValues CALL by the hold timeout and held
    /// the Start reply for almost twice it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_writer_queue_never_delays_a_call_and_a_reply_waits_at_most_the_hold_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let overflow = Arc::new(Overflow::new(dir.path().join("overflow")));
        let (commands, mut writer) = mpsc::channel(1);
        commands.try_send(filler()).unwrap();
        let taken = tokio::spawn(async move {
            tokio::time::sleep(HOLD.mul_f32(0.9)).await;
            let mut kept = Vec::new();
            // Takes commands but never commits them: receipts stay pending for the whole test.
            while let Ok(Some(command)) =
                tokio::time::timeout(Duration::from_secs(5), writer.recv()).await
            {
                kept.push(command);
            }
            kept.len()
        });
        let tap = tap(commands, overflow);

        let call = r#"[2,"mv1","MeterValues",{"connectorId":1,"transactionId":42,"meterValue":[{"timestamp":"2023-11-14T22:13:20Z","sampledValue":[{"value":"1.5","unit":"kWh"}]}]}]"#;
        let took = timed(&tap, Side::Charger, call).await;
        assert!(took < SLACK, "the CALL waited {took:?} for queue space");

        let start = r#"[2,"s1","StartTransaction",{"connectorId":1,"idTag":"TAG","meterStart":1000,"timestamp":"2023-11-14T22:13:20Z"}]"#;
        timed(&tap, Side::Charger, start).await;
        let reply = r#"[3,"s1",{"transactionId":43,"idTagInfo":{"status":"Accepted"}}]"#;
        let took = timed(&tap, Side::Upstream, reply).await;
        assert!(took <= HOLD + SLACK, "the Start reply was held {took:?}");

        // Now the queue has room and the writer never commits: the hold alone bounds the reply.
        tokio::time::sleep(HOLD).await;
        let took = timed(&tap, Side::Upstream, r#"[3,"mv1",{}]"#).await;
        assert!(
            took <= HOLD + SLACK,
            "the MeterValues reply was held {took:?}"
        );
        let call = r#"[2,"mv2","MeterValues",{"connectorId":1,"transactionId":43,"meterValue":[{"timestamp":"2023-11-14T22:13:20Z","sampledValue":[{"value":"2","unit":"kWh"}]}]}]"#;
        let took = timed(&tap, Side::Charger, call).await;
        assert!(took < SLACK, "the CALL waited {took:?}");
        let took = timed(&tap, Side::Upstream, r#"[3,"mv2",{}]"#).await;
        assert!(
            took >= HOLD.mul_f32(0.9) && took <= HOLD + SLACK,
            "held for the hold timeout, no longer: {took:?}"
        );

        // The records the full queue refused are on disk in the overflow directory.
        let lines = std::fs::read_to_string(dir.path().join("overflow").join(QUEUE_FULL)).unwrap();
        assert_eq!(lines.lines().count(), 2, "{lines}");
        assert!(lines.contains("\"ocpp_transaction_id\":42"), "{lines}");
        assert!(lines.contains("\"ocpp_transaction_id\":43"), "{lines}");
        drop(tap);
        assert!(taken.await.unwrap() >= 2, "rules + the later MeterValues");
    }

    /// A held reply's future stays under 1 KiB: glibc serves larger requests from its large
    /// bins after consolidating its fast bins, which cost 3 % of the relay's CPU when this box
    /// carried the whole tap record (issue 16). The Start reply and the MeterValues reply are
    /// the two held frames; their records are queued before the wait begins.
    #[tokio::test]
    async fn a_held_reply_waits_in_a_box_under_one_kib_with_its_record_already_queued() {
        let dir = tempfile::tempdir().unwrap();
        let overflow = Arc::new(Overflow::new(dir.path().join("overflow")));
        let (commands, mut writer) = mpsc::channel(16);
        let tap = tap(commands, overflow);
        let start = r#"[2,"s1","StartTransaction",{"connectorId":1,"idTag":"TAG","meterStart":1000,"timestamp":"2023-11-14T22:13:20Z"}]"#;
        assert!(tap.see(Side::Charger, &Message::text(start)).1.is_none());
        let reply = r#"[3,"s1",{"transactionId":43,"idTagInfo":{"status":"Accepted"}}]"#;
        let (_, held) = tap.see(Side::Upstream, &Message::text(reply));
        let (receipt, message_id) = held.expect("the Start reply is held");
        let wait = tap.hold(receipt, message_id);
        assert!(
            std::mem::size_of_val(&wait) < 1024,
            "{} bytes",
            std::mem::size_of_val(&wait)
        );
        drop(wait);
        let queued = writer
            .try_recv()
            .expect("queued before the hold is awaited");
        assert!(matches!(queued.record.kind, crate::tap::TapKind::Start(_)));

        let call = r#"[2,"mv1","MeterValues",{"connectorId":1,"transactionId":43,"meterValue":[{"timestamp":"2023-11-14T22:13:20Z","sampledValue":[{"value":"1.5","unit":"kWh"}]}]}]"#;
        assert!(tap.see(Side::Charger, &Message::text(call)).1.is_none());
        let queued = writer
            .try_recv()
            .expect("the CALL's record is queued at once");
        assert!(matches!(
            queued.record.kind,
            crate::tap::TapKind::MeterValues(_)
        ));
        let (_, held) = tap.see(Side::Upstream, &Message::text(r#"[3,"mv1",{}]"#));
        let (receipt, message_id) = held.expect("the MeterValues reply is held");
        let wait = tap.hold(receipt, message_id);
        assert!(std::mem::size_of_val(&wait) < 1024);
        // Committed: the reply goes on.
        queued.committed.send(()).unwrap();
        tokio::time::timeout(SLACK, wait)
            .await
            .expect("released at its commit");
    }

    #[test]
    fn out_of_session_meter_values_are_logged_once_an_hour_per_charge_box() {
        let now = 1_700_000_000;
        assert!(outside_session_log_due("LOG-ONCE-A", now));
        assert!(!outside_session_log_due("LOG-ONCE-A", now + 10));
        assert!(outside_session_log_due("LOG-ONCE-B", now + 10));
        assert!(!outside_session_log_due("LOG-ONCE-A", now + 3599));
        assert!(outside_session_log_due("LOG-ONCE-A", now + 3600));
    }
}
