//! One simulated charger: its connection, its OCPP flow, and its answers to the central system.
//!
//! OCPP 1.6J allows one outstanding CALL per direction, so a charger is a single task that
//! sends a CALL and then reads frames until its answer arrives, answering central-system CALLs
//! and pings on the way.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rust_ocpp::v1_6::types::{ChargePointStatus, UnitOfMeasure};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::messages::{self, EnergyUnit, Reply};
use super::stats::{ActionClass, Stats};
use crate::ocpp::frame::{FrameHead, MessageType, parse_head};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What every charger of a run does; shared read-only.
#[derive(Debug, Clone)]
pub struct Plan {
    pub base_url: String,
    pub subprotocol: String,
    pub sessions: u32,
    pub meter_values_per_session: u32,
    pub meter_interval: Duration,
    pub energy_per_session_wh: i32,
    pub unit: EnergyUnit,
    pub heartbeat_interval: Duration,
    pub reply_timeout: Duration,
    pub idle: bool,
}

/// Why a charger stopped before its plan was done; the label is the summary's error kind.
#[derive(Debug, thiserror::Error)]
pub enum ChargerError {
    #[error("invalid URL {0}: {1}")]
    Url(String, tungstenite::Error),
    #[error("the central system refused the connection with HTTP {0}")]
    Refused(u16),
    #[error("connecting failed: {0}")]
    Connect(tungstenite::Error),
    // `got` in words: the quoted name, or "none" (never Rust's `Some(..)`/`None`).
    #[error(
        "negotiated subprotocol {}, offered {offered:?}",
        .got.as_deref().map_or_else(|| "none".to_owned(), |got| format!("{got:?}"))
    )]
    Subprotocol {
        got: Option<String>,
        offered: String,
    },
    #[error("the connection failed: {0}")]
    Io(tungstenite::Error),
    #[error("the central system closed the connection")]
    Closed,
    #[error("no answer to {0} within the reply timeout")]
    ReplyTimeout(&'static str),
    #[error("{action} got CALLERROR {code}: {description}")]
    CallError {
        action: &'static str,
        code: String,
        description: String,
    },
    #[error("expected the answer to message {expected}, got one to {got}")]
    WrongMessageId { expected: String, got: String },
    #[error(transparent)]
    InvalidReply(#[from] messages::InvalidReply),
    #[error("not an OCPP-J frame: {0}")]
    NotOcpp(String),
    #[error("BootNotification was not accepted")]
    BootRejected,
    #[error("StartTransaction was not accepted")]
    StartRejected,
}

impl ChargerError {
    /// The summary's error kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ChargerError::Url(..) => "invalid_url",
            ChargerError::Refused(_) => "handshake_refused",
            ChargerError::Connect(_) => "connect",
            ChargerError::Subprotocol { .. } => "subprotocol",
            ChargerError::Io(_) => "connection_failed",
            ChargerError::Closed => "closed_by_peer",
            ChargerError::ReplyTimeout(_) => "reply_timeout",
            ChargerError::CallError { .. } => "call_error",
            ChargerError::WrongMessageId { .. } => "wrong_message_id",
            ChargerError::InvalidReply(_) => "invalid_reply",
            ChargerError::NotOcpp(_) => "not_ocpp",
            ChargerError::BootRejected => "boot_rejected",
            ChargerError::StartRejected => "start_rejected",
        }
    }
}

/// A connected charger.
pub struct Charger {
    charge_box_id: String,
    ws: Ws,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    next_message_id: u64,
    last_heartbeat: Instant,
    register_wh: i32,
    samples_sent: u64,
}

/// Opens the websocket of `charge_box_id`, offering the plan's subprotocol.
pub async fn connect(
    charge_box_id: &str,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    register_wh: i32,
) -> Result<Charger, ChargerError> {
    let url = format!("{}/{charge_box_id}", plan.base_url.trim_end_matches('/'));
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ChargerError::Url(url.clone(), e))?;
    let offered = HeaderValue::from_str(&plan.subprotocol)
        .map_err(|e| ChargerError::Url(url.clone(), tungstenite::Error::HttpFormat(e.into())))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", offered);
    // Thousands of idle chargers: keep each connection's buffers small, like the bridge does.
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let (ws, response) =
        match tokio_tungstenite::connect_async_with_config(request, Some(config), true).await {
            Ok(connected) => connected,
            Err(tungstenite::Error::Http(response)) => {
                return Err(ChargerError::Refused(response.status().as_u16()));
            }
            Err(error) => return Err(ChargerError::Connect(error)),
        };
    let got = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if got.as_deref() != Some(plan.subprotocol.as_str()) {
        return Err(ChargerError::Subprotocol {
            got,
            offered: plan.subprotocol.clone(),
        });
    }
    Stats::bump(&stats.chargers_connected);
    Ok(Charger {
        charge_box_id: charge_box_id.to_owned(),
        ws,
        plan,
        stats,
        next_message_id: 1,
        last_heartbeat: Instant::now(),
        register_wh,
        samples_sent: 0,
    })
}

impl Charger {
    /// Runs the whole plan: boot, status, heartbeat, then sessions (or idling).
    pub async fn run(&mut self) -> Result<(), ChargerError> {
        match self
            .call("BootNotification", messages::boot_notification())
            .await?
        {
            Reply::Boot { accepted: true, .. } => {}
            _ => return Err(ChargerError::BootRejected),
        }
        self.call(
            "StatusNotification",
            messages::status_notification(ChargePointStatus::Available),
        )
        .await?;
        self.heartbeat().await?;
        if self.plan.idle {
            // Ends when the run's deadline cancels this future.
            loop {
                let due = self.last_heartbeat + self.plan.heartbeat_interval;
                self.serve_until(due).await?;
                self.heartbeat().await?;
            }
        }
        for session in 0..self.plan.sessions {
            self.session(session).await?;
        }
        let _ = self.ws.close(None).await;
        Ok(())
    }

    async fn session(&mut self, session: u32) -> Result<(), ChargerError> {
        let id_tag = format!("SIM-{}", session % 1000);
        let meter_start_wh = self.register_wh;
        let started = self
            .call(
                "StartTransaction",
                messages::start_transaction(&id_tag, meter_start_wh),
            )
            .await?;
        let ocpp_transaction_id = match started {
            Reply::Start {
                ocpp_transaction_id,
                accepted: true,
            } => ocpp_transaction_id,
            _ => return Err(ChargerError::StartRejected),
        };
        self.call(
            "StatusNotification",
            messages::status_notification(ChargePointStatus::Charging),
        )
        .await?;
        let samples = self.plan.meter_values_per_session.max(1);
        for sample in 1..=samples {
            self.serve_until(Instant::now() + self.plan.meter_interval)
                .await?;
            if self.last_heartbeat.elapsed() >= self.plan.heartbeat_interval {
                self.heartbeat().await?;
            }
            // Integer share of the session's energy so the last sample lands exactly on it.
            let energy_wh = (i64::from(self.plan.energy_per_session_wh) * i64::from(sample)
                / i64::from(samples)) as i32;
            self.register_wh = meter_start_wh + energy_wh;
            let unit = self.next_unit();
            self.call(
                "MeterValues",
                messages::meter_values(ocpp_transaction_id, self.register_wh, unit),
            )
            .await?;
        }
        self.call(
            "StopTransaction",
            messages::stop_transaction(ocpp_transaction_id, &id_tag, self.register_wh),
        )
        .await?;
        self.call(
            "StatusNotification",
            messages::status_notification(ChargePointStatus::Available),
        )
        .await?;
        Stats::bump(&self.stats.sessions_completed);
        Ok(())
    }

    fn next_unit(&mut self) -> UnitOfMeasure {
        self.samples_sent += 1;
        match self.plan.unit {
            EnergyUnit::Wh => UnitOfMeasure::Wh,
            EnergyUnit::Kwh => UnitOfMeasure::KWh,
            EnergyUnit::Mixed if self.samples_sent.is_multiple_of(2) => UnitOfMeasure::KWh,
            EnergyUnit::Mixed => UnitOfMeasure::Wh,
        }
    }

    async fn heartbeat(&mut self) -> Result<(), ChargerError> {
        self.call("Heartbeat", messages::heartbeat()).await?;
        self.last_heartbeat = Instant::now();
        Ok(())
    }

    async fn send(&mut self, frame: String) -> Result<(), ChargerError> {
        self.ws
            .send(Message::text(frame))
            .await
            .map_err(ChargerError::Io)?;
        Stats::bump(&self.stats.frames_sent);
        Ok(())
    }

    /// Sends a CALL and waits for its CALLRESULT, checked against the action's schema.
    ///
    /// The frame is serialized straight from the rust-ocpp request type (no intermediate
    /// `serde_json::Value`), and the answer's payload is deserialized straight from its text
    /// into the rust-ocpp response type: the same checks, without building JSON trees.
    async fn call<T: Serialize>(
        &mut self,
        action: &'static str,
        payload: T,
    ) -> Result<Reply, ChargerError> {
        let message_id = self.next_message_id;
        self.next_message_id += 1;
        let frame = serde_json::to_string(&(2, message_id.to_string(), action, &payload))
            .expect("rust-ocpp payloads serialize");
        let sent_at = Instant::now();
        self.send(frame).await?;
        let deadline = sent_at + self.plan.reply_timeout;
        loop {
            let answer = match tokio::time::timeout_at(deadline, self.next_frame()).await {
                Ok(frame) => frame?,
                Err(_) => return Err(ChargerError::ReplyTimeout(action)),
            };
            let Some(text) = answer else {
                continue; // a central-system CALL, already answered
            };
            let head = parse_answer(&text)?;
            if !id_matches(&head.message_id, message_id) {
                return Err(ChargerError::WrongMessageId {
                    expected: message_id.to_string(),
                    got: head.message_id.into_owned(),
                });
            }
            self.stats
                .record_latency(ActionClass::of(action), sent_at.elapsed());
            return match head.message_type {
                MessageType::CallResult => Ok(messages::check_reply(action, head.payload_text)?),
                _ => {
                    let (code, description) = call_error_fields(&text, head.payload_text)?;
                    Err(ChargerError::CallError {
                        action,
                        code,
                        description,
                    })
                }
            };
        }
    }

    /// Reads frames until `until`, answering central-system CALLs; any answer is unexpected.
    async fn serve_until(&mut self, until: Instant) -> Result<(), ChargerError> {
        if until <= Instant::now() {
            // Back to back (`--meter-interval 0s`): no frame can be pending (one CALL
            // outstanding, the central system's CALLs are answered as they come while
            // waiting for a reply), and skipping the zero timeout saves a timer per message.
            return Ok(());
        }
        loop {
            match tokio::time::timeout_at(until, self.next_frame()).await {
                Err(_) => return Ok(()),
                Ok(Ok(None)) => continue,
                Ok(Ok(Some(text))) => {
                    return Err(ChargerError::WrongMessageId {
                        expected: "none (no CALL outstanding)".into(),
                        got: parse_answer(&text)?.message_id.into_owned(),
                    });
                }
                Ok(Err(error)) => return Err(error),
            }
        }
    }

    /// The next OCPP-J answer (CALLRESULT or CALLERROR) as its text, its head already
    /// checked; `None` after answering a central-system CALL. Pings are answered by
    /// tungstenite as it reads.
    async fn next_frame(&mut self) -> Result<Option<Utf8Bytes>, ChargerError> {
        loop {
            let message = match self.ws.next().await {
                None => return Err(ChargerError::Closed),
                Some(Err(error)) => return Err(ChargerError::Io(error)),
                Some(Ok(message)) => message,
            };
            let text = match message {
                Message::Text(text) => text,
                Message::Close(_) => return Err(ChargerError::Closed),
                Message::Binary(_) => return Err(ChargerError::NotOcpp("a binary frame".into())),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            Stats::bump(&self.stats.frames_received);
            let head = parse_head(&text).map_err(|_| not_ocpp(&text))?;
            if head.message_type == MessageType::Call {
                // The whole frame must be JSON, as for answers (checked by their payload parse).
                if serde_json::from_str::<serde::de::IgnoredAny>(head.payload_text).is_err() {
                    return Err(not_ocpp(&text));
                }
                let id = head.message_id.into_owned();
                let action = head.action.map(|a| a.into_owned());
                self.answer_central_call(&id, action.as_deref()).await?;
                return Ok(None);
            }
            return Ok(Some(text));
        }
    }

    async fn answer_central_call(
        &mut self,
        message_id: &str,
        action: Option<&str>,
    ) -> Result<(), ChargerError> {
        let interval_s = self.plan.heartbeat_interval.as_secs();
        let frame = match action.and_then(|a| messages::answer_central_call(a, interval_s)) {
            Some(payload) => json!([3, message_id, payload]),
            None => json!([
                4,
                message_id,
                "NotImplemented",
                format!(
                    "{} does not implement {}",
                    self.charge_box_id,
                    action.unwrap_or("?")
                ),
                {}
            ]),
        };
        self.send(frame.to_string()).await?;
        Stats::bump(&self.stats.central_calls_answered);
        Ok(())
    }
}

fn not_ocpp(text: &str) -> ChargerError {
    ChargerError::NotOcpp(text.chars().take(200).collect())
}

/// The head of an answer frame that `next_frame` already accepted.
fn parse_answer(text: &str) -> Result<FrameHead<'_>, ChargerError> {
    parse_head(text).map_err(|_| not_ocpp(text))
}

/// Whether an answer's message id is the decimal `expected` the CALL was sent with.
fn id_matches(got: &str, expected: u64) -> bool {
    // Compare digits without allocating: "007" or "+7" are other ids, not 7.
    !got.is_empty()
        && (got == "0" || !got.starts_with('0'))
        && got.bytes().all(|b| b.is_ascii_digit())
        && got.parse::<u64>() == Ok(expected)
}

/// errorCode and errorDescription of a CALLERROR, whose elements after the message id are
/// `payload_text`; the frame must be JSON, missing or non-string fields read as "?" and "",
/// as before (a CALLERROR is an error whatever its shape; this is the rare path).
fn call_error_fields(text: &str, payload_text: &str) -> Result<(String, String), ChargerError> {
    let elements: Vec<Value> =
        serde_json::from_str(&format!("[{payload_text}]")).map_err(|_| not_ocpp(text))?;
    let field = |i: usize, default: &str| {
        elements
            .get(i)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_owned()
    };
    Ok((field(0, "?"), field(1, "")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17 item 2: the error read `negotiated subprotocol Some("ocpp2.0.1")`, or `None`.
    #[test]
    fn a_subprotocol_error_names_what_was_negotiated_in_words() {
        let other = ChargerError::Subprotocol {
            got: Some("ocpp2.0.1".into()),
            offered: "ocpp1.6".into(),
        };
        assert_eq!(
            other.to_string(),
            r#"negotiated subprotocol "ocpp2.0.1", offered "ocpp1.6""#
        );
        let none = ChargerError::Subprotocol {
            got: None,
            offered: "ocpp1.6".into(),
        };
        assert_eq!(
            none.to_string(),
            r#"negotiated subprotocol none, offered "ocpp1.6""#
        );
    }

    #[test]
    fn message_ids_match_only_their_own_decimal_form() {
        assert!(id_matches("7", 7));
        assert!(id_matches("0", 0));
        assert!(id_matches("18446744073709551615", u64::MAX));
        for other in ["", "8", "07", "+7", "7 ", "x7", "70", "-7"] {
            assert!(!id_matches(other, 7), "{other:?}");
        }
    }

    #[test]
    fn call_errors_give_code_and_description() {
        let text = r#"[4,"3","NotImplemented","no such action",{}]"#;
        let head = parse_answer(text).unwrap();
        assert_eq!(
            call_error_fields(text, head.payload_text).unwrap(),
            ("NotImplemented".to_owned(), "no such action".to_owned())
        );
        let text = r#"[4,"3","NotImplemented"]"#;
        let head = parse_answer(text).unwrap();
        assert_eq!(
            call_error_fields(text, head.payload_text).unwrap(),
            ("NotImplemented".to_owned(), String::new())
        );
        let text = r#"[4,"3","NotImplemented",}]"#;
        let head = parse_answer(text).unwrap();
        assert!(call_error_fields(text, head.payload_text).is_err());
    }

    #[test]
    fn answers_that_are_not_ocpp_frames_are_rejected() {
        for bad in ["{}", "[5,\"1\",{}]", "[3,1,{}]", "[3,\"1\"", "not json"] {
            assert!(parse_answer(bad).is_err(), "{bad}");
        }
    }
}
