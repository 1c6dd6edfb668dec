//! A minimal, fast OCPP 1.6J central system for benchmarks only: it answers every CALL with a
//! schema-valid CALLRESULT so the upstream is never the bottleneck when the bridge is measured.
//! Not part of the daemon.
//!
//! `cargo run --release --example responder -- --listen 127.0.0.1:9000 [--threads 1]`
//! Chargers connect to `ws://127.0.0.1:9000/steve/websocket/CentralSystemService/{id}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use ocpp_lago_bridge::ocpp::frame::{MessageType, parse_head};
use rust_ocpp::v1_6::messages::authorize::AuthorizeResponse;
use rust_ocpp::v1_6::messages::boot_notification::BootNotificationResponse;
use rust_ocpp::v1_6::messages::data_transfer::DataTransferResponse;
use rust_ocpp::v1_6::messages::heart_beat::HeartbeatResponse;
use rust_ocpp::v1_6::messages::meter_values::MeterValuesResponse;
use rust_ocpp::v1_6::messages::start_transaction::StartTransactionResponse;
use rust_ocpp::v1_6::messages::status_notification::StatusNotificationResponse;
use rust_ocpp::v1_6::messages::stop_transaction::StopTransactionResponse;
use rust_ocpp::v1_6::types::{
    AuthorizationStatus, DataTransferStatus, IdTagInfo, RegistrationStatus,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const PATH_PREFIX: &str = "/steve/websocket/CentralSystemService/";
const HEARTBEAT_INTERVAL_S: u32 = 300;

/// Answers that never change, serialized once from the rust-ocpp types.
struct Fixed {
    meter_values: String,
    status_notification: String,
    stop_transaction: String,
    authorize: String,
    data_transfer: String,
}

struct Responder {
    fixed: Fixed,
    next_transaction_id: AtomicI32,
}

fn json<T: serde::Serialize>(payload: &T) -> String {
    serde_json::to_string(payload).expect("rust-ocpp payloads serialize")
}

fn accepted() -> IdTagInfo {
    IdTagInfo {
        status: AuthorizationStatus::Accepted,
        ..Default::default()
    }
}

impl Responder {
    fn new() -> Self {
        Responder {
            fixed: Fixed {
                meter_values: json(&MeterValuesResponse {}),
                status_notification: json(&StatusNotificationResponse {}),
                stop_transaction: json(&StopTransactionResponse {
                    id_tag_info: Some(accepted()),
                }),
                authorize: json(&AuthorizeResponse {
                    id_tag_info: accepted(),
                }),
                data_transfer: json(&DataTransferResponse {
                    status: DataTransferStatus::Accepted,
                    data: None,
                }),
            },
            next_transaction_id: AtomicI32::new(1),
        }
    }

    /// The reply frame to one text frame, or `None` for anything but a CALL.
    ///
    /// Written into one `String` sized up front: the fixed answers are copied in, not cloned
    /// and re-formatted, and the message id is copied as it came unless it needs escaping.
    fn answer(&self, text: &str) -> Option<String> {
        let head = parse_head(text).ok()?;
        if head.message_type != MessageType::Call {
            return None;
        }
        let mut frame = String::with_capacity(96 + head.message_id.len());
        frame.push_str("[3,");
        push_json_string(&mut frame, &head.message_id);
        frame.push(',');
        match head.action.as_deref().unwrap_or("") {
            "Heartbeat" => frame.push_str(&json(&HeartbeatResponse {
                current_time: Utc::now(),
            })),
            "MeterValues" => frame.push_str(&self.fixed.meter_values),
            "StatusNotification" => frame.push_str(&self.fixed.status_notification),
            "StartTransaction" => frame.push_str(&json(&StartTransactionResponse {
                id_tag_info: accepted(),
                transaction_id: self.next_transaction_id.fetch_add(1, Ordering::Relaxed),
            })),
            "StopTransaction" => frame.push_str(&self.fixed.stop_transaction),
            "BootNotification" => frame.push_str(&json(&BootNotificationResponse {
                current_time: Utc::now(),
                interval: HEARTBEAT_INTERVAL_S,
                status: RegistrationStatus::Accepted,
            })),
            "Authorize" => frame.push_str(&self.fixed.authorize),
            "DataTransfer" => frame.push_str(&self.fixed.data_transfer),
            other => {
                let mut error = String::from("[4,");
                push_json_string(&mut error, &head.message_id);
                error.push_str(",\"NotImplemented\",");
                push_json_string(&mut error, &format!("responder does not implement {other}"));
                error.push_str(",{}]");
                return Some(error);
            }
        }
        frame.push(']');
        Some(frame)
    }
}

/// Appends `value` as a JSON string: copied between quotes when nothing in it needs escaping
/// (the usual numeric or UUID message id), else through serde_json.
fn push_json_string(out: &mut String, value: &str) {
    if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(value);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(value).expect("strings serialize"));
    }
}

// tungstenite's accept callback must return its (large) ErrorResponse by value.
#[allow(clippy::result_large_err)]
async fn serve(responder: Arc<Responder>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let callback = |request: &Request, mut response: Response| {
        let path = request.uri().path();
        let id = path.strip_prefix(PATH_PREFIX).unwrap_or("");
        if id.is_empty() || id.contains('/') {
            let mut refusal = ErrorResponse::new(Some("unknown path\n".into()));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            return Err(refusal);
        }
        let offers_ocpp16 = request
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == "ocpp1.6");
        if offers_ocpp16 {
            response.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static("ocpp1.6"),
            );
        }
        Ok(response)
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        let reply = match &message {
            Message::Text(text) => responder.answer(text.as_str()),
            Message::Close(_) => break,
            _ => None,
        };
        if let Some(reply) = reply
            && ws.send(Message::text(reply)).await.is_err()
        {
            break;
        }
    }
}

fn main() {
    let mut listen: SocketAddr = "127.0.0.1:9000".parse().expect("static address");
    let mut threads = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next();
        match (arg.as_str(), value) {
            ("--listen", Some(v)) => listen = v.parse().expect("--listen HOST:PORT"),
            ("--threads", Some(v)) => threads = v.parse().expect("--threads N"),
            _ => {
                eprintln!("usage: responder [--listen 127.0.0.1:9000] [--threads N]");
                #[allow(
                    clippy::disallowed_methods,
                    reason = "a bench tool's usage error, before any runtime or spool exists"
                )]
                std::process::exit(2);
            }
        }
    }
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    let runtime = builder.enable_all().build().expect("tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await.expect("bind --listen");
        eprintln!(
            "responder listening on {}",
            listener.local_addr().expect("local addr")
        );
        let responder = Arc::new(Responder::new());
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(Arc::clone(&responder), stream));
                }
                // EMFILE and friends: back off rather than spin a core.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn answer(text: &str) -> Value {
        let frame = Responder::new().answer(text).expect("an answer");
        serde_json::from_str(&frame).expect("the answer is JSON")
    }

    #[test]
    fn answers_are_json_with_the_call_s_message_id() {
        assert_eq!(answer(r#"[2,"17","MeterValues",{}]"#), json!([3, "17", {}]));
        assert_eq!(
            answer(r#"[2,"a\"b\\c","StatusNotification",{}]"#),
            json!([3, "a\"b\\c", {}])
        );
        let start = answer(r#"[2,"1","StartTransaction",{}]"#);
        assert_eq!(start[2]["idTagInfo"]["status"], "Accepted");
        assert!(start[2]["transactionId"].is_i64());
        let error = answer(r#"[2,"9","GetDiagnostics",{}]"#);
        assert_eq!(error[0], 4);
        assert_eq!(error[1], "9");
        assert_eq!(error[2], "NotImplemented");
        assert!(Responder::new().answer(r#"[3,"1",{}]"#).is_none());
    }
}
