//! Dialling SteVe for one charger, before the charger's handshake is answered.

use std::time::Duration;

use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::handshake::{HttpResponse, UpgradeRequest};

/// The WebSocket to SteVe for one charger.
pub type UpstreamSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why SteVe did not accept the charger; each maps to the HTTP answer the charger gets.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("SteVe refused the charger with HTTP {status}")]
    Refused {
        status: u16,
        response: Box<HttpResponse>,
    },
    #[error("SteVe is unreachable: {0}")]
    Unreachable(String),
    #[error("SteVe did not complete the handshake within {0:?}")]
    Timeout(Duration),
    #[error("SteVe's handshake answer was not acceptable: {0}")]
    BadHandshake(String),
}

impl DialError {
    /// A stable label for the metric and the log.
    pub fn reason(&self) -> &'static str {
        match self {
            DialError::Refused { .. } => "upstream_refused",
            DialError::Unreachable(_) => "upstream_unreachable",
            DialError::Timeout(_) => "upstream_timeout",
            DialError::BadHandshake(_) => "upstream_bad_handshake",
        }
    }

    /// What the charger is told: SteVe's own refusal verbatim, else 502 or 504.
    pub fn response(&self) -> HttpResponse {
        match self {
            DialError::Refused { response, .. } => (**response).clone(),
            DialError::Timeout(_) => HttpResponse::text(504, &format!("{self}\n")),
            DialError::Unreachable(_) | DialError::BadHandshake(_) => {
                HttpResponse::text(502, &format!("{self}\n"))
            }
        }
    }
}

/// Dials `{upstream_url}/{chargeBoxId}` with the charger's subprotocol offer and credentials.
/// No retries: the charger is waiting, and it retries by itself.
pub async fn dial(
    upstream_url: &str,
    request: &UpgradeRequest,
    forwarded: &[(&'static str, String)],
    tls: Option<Arc<rustls::ClientConfig>>,
    config: WebSocketConfig,
    timeout: Duration,
) -> Result<(UpstreamSocket, Option<String>), DialError> {
    let mut url = format!("{upstream_url}/{}", request.charge_box_id_raw);
    if let Some(query) = &request.query {
        url.push('?');
        url.push_str(query);
    }
    let mut client_request = url
        .as_str()
        .into_client_request()
        .map_err(|e| DialError::Unreachable(format!("invalid upstream URL {url:?}: {e}")))?;
    let headers = client_request.headers_mut();
    for (name, value) in [
        ("Sec-WebSocket-Protocol", &request.protocols),
        ("Authorization", &request.authorization),
    ] {
        if let Some(value) = value {
            let value = HeaderValue::from_str(value)
                .map_err(|_| DialError::BadHandshake(format!("unforwardable {name} header")))?;
            headers.insert(name, value);
        }
    }

    for (name, value) in forwarded {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(*name, value);
        }
    }

    let connecting = tokio_tungstenite::connect_async_tls_with_config(
        client_request,
        Some(config),
        true,
        tls.map(Connector::Rustls),
    );
    let (socket, response) = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => return Err(DialError::Timeout(timeout)),
        Ok(Ok(connected)) => connected,
        Ok(Err(e)) => return Err(classify(e)),
    };
    let protocol = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((socket, protocol))
}

fn classify(error: WsError) -> DialError {
    match error {
        WsError::Http(response) => {
            let status = response.status().as_u16();
            let mut forwarded = HttpResponse {
                status,
                headers: Vec::new(),
                body: response.body().clone().unwrap_or_default(),
            };
            for name in ["Content-Type", "WWW-Authenticate"] {
                if let Some(value) = response.headers().get(name).and_then(|v| v.to_str().ok()) {
                    forwarded
                        .headers
                        .push((name.to_string(), value.to_string()));
                }
            }
            DialError::Refused {
                status,
                response: Box::new(forwarded),
            }
        }
        WsError::Io(e) => DialError::Unreachable(e.to_string()),
        WsError::Url(e) => DialError::Unreachable(e.to_string()),
        WsError::Tls(e) => DialError::Unreachable(format!("TLS: {e}")),
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            DialError::Unreachable("connection closed during the handshake".into())
        }
        other @ (WsError::Protocol(_)
        | WsError::Capacity(_)
        | WsError::Utf8(_)
        | WsError::AttackAttempt
        | WsError::HttpFormat(_)
        | WsError::WriteBufferFull(_)) => DialError::BadHandshake(other.to_string()),
    }
}

/// The tungstenite limits used on both sides of a relayed connection.
pub fn socket_config(max_frame_size: usize) -> WebSocketConfig {
    // An idle charger should cost kilobytes: tungstenite's default reserves 128 KiB to read and
    // buffers 128 KiB to write, per side. Messages are flushed one by one anyway, and OCPP frames
    // are a few hundred bytes, so 1 KiB reads cost nothing in throughput; a large frame reserves
    // its full length when its header arrives and is read in 1 KiB steps (BENCHMARKS.md: 4 KiB
    // read buffers put an idle charger at 17.5 KB RSS, over the 16 KB target).
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * max_frame_size + 1024)
        .max_message_size(Some(max_frame_size))
        .max_frame_size(Some(max_frame_size))
}
