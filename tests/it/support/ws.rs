//! A bare websocket charger in Rust, for tests that need exact control of frames and headers.

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config, tungstenite};

/// A client websocket as returned by tokio-tungstenite.
pub type ClientWs = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a websocket to `url` offering `subprotocols` (sent as one comma-separated header, as
/// chargers do) and, if given, an `Authorization` header. Returns the HTTP error for a refusal.
pub async fn connect(
    url: &str,
    subprotocols: &[&str],
    authorization: Option<&str>,
) -> Result<(ClientWs, Response), tungstenite::Error> {
    let mut request = url.into_client_request()?;
    if !subprotocols.is_empty() {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(&subprotocols.join(", ")).expect("header value"),
        );
    }
    if let Some(authorization) = authorization {
        request.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(authorization).expect("header value"),
        );
    }
    connect_async_with_config(request, Some(large_frames()), true).await
}

/// A config accepting the 8 MiB frames SteVe accepts, with room to spare.
pub fn large_frames() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(32 << 20))
        .max_frame_size(Some(32 << 20))
}

/// The HTTP status of a refused handshake, or a description of what happened instead.
pub fn refusal_status(
    result: &Result<(ClientWs, Response), tungstenite::Error>,
) -> Result<u16, String> {
    match result {
        Err(tungstenite::Error::Http(response)) => Ok(response.status().as_u16()),
        Err(other) => Err(format!("handshake failed without an HTTP status: {other}")),
        Ok((_, response)) => Err(format!("handshake succeeded with {}", response.status())),
    }
}

/// A charger speaking raw OCPP-J over one connection: each CALL gets the next message id and
/// waits (15 s at most) for its CALLRESULT; a CALLERROR fails the test.
pub struct RawCharger {
    ws: ClientWs,
    next_id: u64,
}

impl RawCharger {
    /// Connects with subprotocol `ocpp1.6` (15 s at most).
    pub async fn connect(url: &str) -> RawCharger {
        let (ws, _) = crate::support::within(
            std::time::Duration::from_secs(15),
            "charger connects",
            connect(url, &["ocpp1.6"], None),
        )
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        RawCharger { ws, next_id: 0 }
    }

    /// Sends a CALL and waits for its answer: (payload, how long the answer took).
    pub async fn call(
        &mut self,
        action: &str,
        payload: serde_json::Value,
    ) -> (serde_json::Value, std::time::Duration) {
        use futures_util::{SinkExt, StreamExt};
        self.next_id += 1;
        let id = format!("m{}", self.next_id);
        let frame = serde_json::json!([2, id, action, payload]).to_string();
        let sent = std::time::Instant::now();
        self.ws
            .send(tungstenite::Message::text(frame))
            .await
            .expect("send CALL");
        loop {
            let message =
                crate::support::within(std::time::Duration::from_secs(15), action, self.ws.next())
                    .await
                    .unwrap_or_else(|| panic!("{action}: connection closed"))
                    .unwrap_or_else(|e| panic!("{action}: {e}"));
            let tungstenite::Message::Text(text) = message else {
                continue;
            };
            let reply: serde_json::Value = serde_json::from_str(text.as_str()).expect("JSON reply");
            if reply[0] == 3 && reply[1] == id.as_str() {
                return (reply[2].clone(), sent.elapsed());
            }
            assert_ne!(reply[0], 4, "{action} got a CALLERROR: {reply}");
        }
    }
}

/// Sends the CALL `frame` on a raw charger socket and returns the CALLRESULT with message id
/// `id` (10 s at most); anything else with that id fails the test.
pub async fn call_frame(socket: &mut ClientWs, frame: &str, id: &str) -> serde_json::Value {
    use futures_util::{SinkExt, StreamExt};
    socket
        .send(tungstenite::Message::text(frame))
        .await
        .expect("send CALL through the bridge");
    let reply = crate::support::within(std::time::Duration::from_secs(10), "CALLRESULT", async {
        loop {
            match socket.next().await {
                Some(Ok(tungstenite::Message::Text(text))) => {
                    let value: serde_json::Value = serde_json::from_str(&text).expect("JSON reply");
                    if value[1] == id {
                        return value;
                    }
                }
                Some(Ok(_)) => continue,
                other => panic!("connection ended while waiting for {id}: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(reply[0], 3, "CALLRESULT for {id}: {reply}");
    reply
}
