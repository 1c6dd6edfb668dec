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
