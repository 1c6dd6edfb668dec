//! Dialling SteVe for one charger, before the charger's handshake is answered.
//!
//! The client handshake is written by hand, as the charger's side is: tungstenite's client
//! turns header values into `&str` (a non-UTF-8 `Authorization` could not pass unaltered),
//! and it fails a handshake in which the server selects none of the offered subprotocols,
//! which RFC 6455 §4.1 allows and a charger connected to SteVe directly accepts.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::handshake::{HttpResponse, UpgradeRequest};
use crate::config::BaseUrl;

/// The WebSocket to SteVe for one charger.
pub type UpstreamSocket = WebSocketStream<UpstreamStream>;

/// The connection to SteVe: plain TCP, or TLS behind a pointer. `tokio_tungstenite`'s
/// `MaybeTlsStream` holds rustls' client state inline, so every plain `ws://` connection
/// carried its size too (issue 16 item 3: idle memory).
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// Largest response head we read from SteVe, and largest refusal body we pass on.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
const MAX_REFUSAL_BODY: usize = 64 * 1024;
/// How long a refusal's body may take after its head; what came by then is passed on.
const REFUSAL_BODY_WAIT: Duration = Duration::from_secs(1);

/// Why SteVe did not accept the charger; each maps to the HTTP answer the charger gets.
/// The details are for the log: the charger's answer never names SteVe's address.
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
    #[error("out of file descriptors dialling SteVe: {0}")]
    FdsExhausted(String),
}

impl DialError {
    /// A stable label for the metric and the log.
    pub fn reason(&self) -> &'static str {
        match self {
            DialError::Refused { .. } => "upstream_refused",
            DialError::Unreachable(_) => "upstream_unreachable",
            DialError::Timeout(_) => "upstream_timeout",
            DialError::BadHandshake(_) => "upstream_bad_handshake",
            DialError::FdsExhausted(_) => "fds_exhausted",
        }
    }

    /// What the charger is told: SteVe's own refusal verbatim, else 502, 503 or 504 with a
    /// fixed text.
    pub fn response(&self) -> HttpResponse {
        match self {
            DialError::Refused { response, .. } => (**response).clone(),
            DialError::Timeout(_) => HttpResponse::text(
                504,
                "the central system did not answer the handshake in time\n",
            ),
            DialError::Unreachable(_) => {
                HttpResponse::text(502, "the central system is unreachable\n")
            }
            DialError::BadHandshake(_) => HttpResponse::text(
                502,
                "the central system's handshake answer was not acceptable\n",
            ),
            DialError::FdsExhausted(_) => {
                HttpResponse::text(503, "the bridge is out of file descriptors; retry later\n")
            }
        }
    }
}

fn io_error(error: std::io::Error) -> DialError {
    if super::fds_exhausted(&error) {
        DialError::FdsExhausted(error.to_string())
    } else {
        DialError::Unreachable(error.to_string())
    }
}

/// Dials `{upstream_url}/{chargeBoxId}` with the charger's subprotocol offers and credentials
/// byte for byte. No retries: the charger is waiting, and it retries by itself. The second
/// value is the subprotocol SteVe selected, if any.
pub async fn dial(
    upstream_url: &BaseUrl,
    request: &UpgradeRequest,
    forwarded: &[(&'static str, String)],
    tls: Option<Arc<rustls::ClientConfig>>,
    config: WebSocketConfig,
    timeout: Duration,
) -> Result<(UpstreamSocket, Option<String>), DialError> {
    let handshake = handshake(upstream_url, request, forwarded, tls, config);
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| DialError::Timeout(timeout))?
}

async fn handshake(
    upstream_url: &BaseUrl,
    request: &UpgradeRequest,
    forwarded: &[(&'static str, String)],
    tls: Option<Arc<rustls::ClientConfig>>,
    config: WebSocketConfig,
) -> Result<(UpstreamSocket, Option<String>), DialError> {
    let invalid = |what: &str| DialError::Unreachable(format!("upstream URL: {what}"));
    // Parsed once, when the config was read (`proxy.upstream_url`).
    let url = upstream_url.url();
    let secure = match url.scheme() {
        "wss" => true,
        "ws" => false,
        _ => return Err(invalid("not ws:// or wss://")),
    };
    let host_in_url = url.host_str().ok_or_else(|| invalid("no host"))?;
    let host = host_in_url.trim_start_matches('[').trim_end_matches(']');
    let port = url
        .port_or_known_default()
        .unwrap_or(if secure { 443 } else { 80 });
    // The Host header: the host, and the port when the URL names one other than the default.
    let authority = match url.port() {
        Some(port) => format!("{host_in_url}:{port}"),
        None => host_in_url.to_string(),
    };

    let tcp = TcpStream::connect((host, port)).await.map_err(io_error)?;
    let _ = tcp.set_nodelay(true);
    let mut stream = match (secure, tls) {
        (false, _) => UpstreamStream::Plain(tcp),
        (true, Some(tls)) => {
            let name = rustls_pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| DialError::Unreachable(format!("TLS: server name: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| DialError::Unreachable(format!("TLS: {e}")))?;
            UpstreamStream::Tls(Box::new(stream))
        }
        (true, None) => return Err(invalid("wss:// without a TLS client configuration")),
    };

    let key = generate_key();
    let head = request_head(url.path(), &authority, &key, request, forwarded);
    stream.write_all(&head).await.map_err(io_error)?;
    stream.flush().await.map_err(io_error)?;

    let mut buf = Vec::with_capacity(1024);
    let (answer, head_len) = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.map_err(io_error)?;
        if n == 0 {
            return Err(DialError::Unreachable(
                "connection closed during the handshake".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(parsed) = Answer::parse(&buf)? {
            break parsed;
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(DialError::BadHandshake("response head too large".into()));
        }
    };
    let leftover = buf.split_off(head_len);
    if answer.status != 101 {
        return Err(refused(answer, leftover, &mut stream).await);
    }
    let protocol = answer.check_switch(&key, &request.protocols)?;
    let socket =
        WebSocketStream::from_partially_read(stream, leftover, Role::Client, Some(config)).await;
    Ok((socket, protocol))
}

/// The upgrade request to SteVe: the charger's path and query, its subprotocol offers and
/// credentials as it sent them, and the bridge's `X-Forwarded-*`.
fn request_head(
    path: &str,
    authority: &str,
    key: &str,
    request: &UpgradeRequest,
    forwarded: &[(&'static str, String)],
) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    let base = path.trim_end_matches('/');
    head.extend_from_slice(format!("GET {base}/{}", request.charge_box_id_raw).as_bytes());
    if let Some(query) = &request.query {
        head.push(b'?');
        head.extend_from_slice(query.as_bytes());
    }
    head.extend_from_slice(
        format!(
            " HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
        )
        .as_bytes(),
    );
    // httparse guarantees the charger's values hold no CR or LF.
    let mut header = |name: &str, value: &[u8]| {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    };
    for offer in &request.protocols {
        header("Sec-WebSocket-Protocol", offer);
    }
    for credentials in &request.authorization {
        header("Authorization", credentials);
    }
    for (name, value) in forwarded {
        if !value.bytes().any(|b| b == b'\r' || b == b'\n') {
            header(name, value.as_bytes());
        }
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// SteVe's answer head, owned.
struct Answer {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
}

impl Answer {
    /// The answer and its head's length once complete; `None` while more bytes are needed.
    fn parse(buf: &[u8]) -> Result<Option<(Answer, usize)>, DialError> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let answer = Answer {
                    status: response.code.unwrap_or_default(),
                    headers: response
                        .headers
                        .iter()
                        .map(|h| (h.name.to_string(), h.value.to_vec()))
                        .collect(),
                };
                Ok(Some((answer, len)))
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(e) => Err(DialError::BadHandshake(format!(
                "malformed HTTP response: {e}"
            ))),
        }
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    fn text(&self, name: &str) -> Option<String> {
        self.values(name)
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|v| v.trim().to_string())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(|v| v.split(|&b| b == b','))
            .any(|t| {
                String::from_utf8_lossy(t)
                    .trim()
                    .eq_ignore_ascii_case(token)
            })
    }

    /// Checks a 101 as RFC 6455 §4.1 asks; `Ok(the selected subprotocol)`, `None` when SteVe
    /// selected none (the charger then gets none, as it would from SteVe directly).
    fn check_switch(&self, key: &str, offers: &[Vec<u8>]) -> Result<Option<String>, DialError> {
        let bad = |what: &str| Err(DialError::BadHandshake(what.to_string()));
        if !self.has_token("Upgrade", "websocket") {
            return bad("no `Upgrade: websocket` header");
        }
        if !self.has_token("Connection", "upgrade") {
            return bad("no `Connection: Upgrade` header");
        }
        if self.text("Sec-WebSocket-Accept").as_deref() != Some(&derive_accept_key(key.as_bytes()))
        {
            return bad("wrong Sec-WebSocket-Accept");
        }
        if self.values("Sec-WebSocket-Extensions").next().is_some() {
            return bad("an extension was selected though none was offered");
        }
        if self.values("Sec-WebSocket-Protocol").count() > 1 {
            return bad("more than one subprotocol selected");
        }
        let Some(selected) = self.text("Sec-WebSocket-Protocol") else {
            return Ok(None);
        };
        let offered = offers
            .iter()
            .flat_map(|offer| offer.split(|&b| b == b','))
            .any(|token| String::from_utf8_lossy(token).trim() == selected);
        if !offered {
            return bad("a subprotocol the charger did not offer was selected");
        }
        Ok(Some(selected))
    }
}

/// SteVe's refusal as the charger gets it: status, `Content-Type`, `WWW-Authenticate` and the
/// body (up to its `Content-Length`, what arrived within a second, at most 64 KiB).
async fn refused(answer: Answer, mut body: Vec<u8>, stream: &mut UpstreamStream) -> DialError {
    let length = answer
        .text("Content-Length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_REFUSAL_BODY);
    let rest = async {
        while body.len() < length {
            let mut chunk = [0u8; 1024];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_BODY_WAIT, rest).await;
    // Without a Content-Length the body is what came with the head (as tungstenite did).
    body.truncate(if length > 0 { length } else { MAX_REFUSAL_BODY });
    let mut response = HttpResponse {
        status: answer.status,
        headers: Vec::new(),
        body,
    };
    for name in ["Content-Type", "WWW-Authenticate"] {
        if let Some(value) = answer.text(name) {
            response.headers.push((name.to_string(), value));
        }
    }
    DialError::Refused {
        status: answer.status,
        response: Box::new(response),
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
