//! The charger side of the WebSocket handshake, done by hand: tokio-tungstenite's accept callback
//! is synchronous, and we must dial SteVe *before* answering the charger, so we read the HTTP
//! upgrade request ourselves, dial, then answer with SteVe's choice (or its refusal).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Largest HTTP upgrade request head we read; chargers send a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// What a charger asked for in its upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// The chargeBoxId exactly as it appeared in the path (percent-encoding kept), for SteVe.
    pub charge_box_id_raw: String,
    /// The chargeBoxId percent-decoded, as SteVe knows it; used in logs and billing.
    pub charge_box_id: String,
    /// The query string, if any, passed on to SteVe unchanged (without the `?`).
    pub query: Option<String>,
    pub sec_websocket_key: String,
    /// Every `Sec-WebSocket-Protocol` header, byte for byte (e.g. "ocpp1.6, ocpp1.5"; RFC 6455
    /// allows the offer to span several headers).
    pub protocols: Vec<Vec<u8>>,
    /// Every `Authorization` header, byte for byte (SteVe basic auth: username = chargeBoxId;
    /// a password need not be UTF-8).
    pub authorization: Vec<Vec<u8>>,
    /// `X-Forwarded-For` from a proxy in front of us, extended with the peer before SteVe.
    pub forwarded_for: Option<String>,
    /// `X-Forwarded-Proto` from a proxy in front of us.
    pub forwarded_proto: Option<String>,
    /// Bytes the charger sent after the request head (early frames), replayed into the socket.
    pub leftover: Vec<u8>,
}

/// Why a charger's upgrade request was not accepted; each maps to one HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the charger sent no complete upgrade request within {0:?}")]
    Timeout(Duration),
    #[error("the charger closed the connection during the handshake")]
    Disconnected,
    #[error("reading the upgrade request failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the upgrade request head is larger than {MAX_REQUEST_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error(
        "the request target may hold only printable ASCII without `#` (percent-encode the rest)"
    )]
    InvalidTarget,
    #[error("not a WebSocket upgrade request: {0}")]
    NotUpgrade(&'static str),
    #[error("unsupported Sec-WebSocket-Version (only 13)")]
    UnsupportedVersion,
    #[error("the path {0:?} does not name a charge box under the configured path prefix")]
    NoChargeBoxId(String),
}

impl HandshakeError {
    /// A stable label for the metric and the log.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Timeout(_) => "handshake_timeout",
            HandshakeError::Disconnected | HandshakeError::Io(_) => "disconnected",
            HandshakeError::HeadTooLarge => "head_too_large",
            HandshakeError::Malformed(_) => "malformed_request",
            HandshakeError::InvalidTarget => "invalid_request_target",
            HandshakeError::NotUpgrade(_) => "not_websocket",
            HandshakeError::UnsupportedVersion => "unsupported_version",
            HandshakeError::NoChargeBoxId(_) => "no_charge_box_id",
        }
    }

    /// The HTTP answer, if the charger is still there to read one.
    pub fn response(&self) -> Option<HttpResponse> {
        let (status, extra) = match self {
            HandshakeError::Timeout(_) | HandshakeError::Disconnected | HandshakeError::Io(_) => {
                return None;
            }
            HandshakeError::HeadTooLarge => (431, None),
            HandshakeError::Malformed(_)
            | HandshakeError::InvalidTarget
            | HandshakeError::NotUpgrade(_) => (400, None),
            HandshakeError::UnsupportedVersion => (
                426,
                Some(("Sec-WebSocket-Version".to_string(), "13".to_string())),
            ),
            HandshakeError::NoChargeBoxId(_) => (404, None),
        };
        let mut response = HttpResponse::text(status, &format!("{self}\n"));
        response.headers.extend(extra);
        Some(response)
    }
}

/// Reads and validates the charger's upgrade request within `timeout`.
pub async fn read_upgrade_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    path_prefix: &str,
    timeout: Duration,
) -> Result<UpgradeRequest, HandshakeError> {
    tokio::time::timeout(timeout, read_request(stream, path_prefix))
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))?
}

async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    path_prefix: &str,
) -> Result<UpgradeRequest, HandshakeError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HandshakeError::Disconnected);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(request) = parse_request(&buf, path_prefix)? {
            return Ok(request);
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Err(HandshakeError::HeadTooLarge);
        }
    }
}

/// Parses a complete request head from `buf`; `Ok(None)` while more bytes are needed.
pub fn parse_request(
    buf: &[u8],
    path_prefix: &str,
) -> Result<Option<UpgradeRequest>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    check_target(buf)?;
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HandshakeError::Malformed(e.to_string())),
    };
    let target = request.path.unwrap_or_default();
    if request.method != Some("GET") {
        return Err(HandshakeError::NotUpgrade("method is not GET"));
    }
    let header = |name: &str| -> Option<String> {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    let raw_headers = |name: &str| -> Vec<Vec<u8>> {
        request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name) && !h.value.is_empty())
            .map(|h| h.value.to_vec())
            .collect()
    };
    let has_token = |name: &str, token: &str| {
        request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .flat_map(|h| h.value.split(|&b| b == b','))
            .any(|v| {
                String::from_utf8_lossy(v)
                    .trim()
                    .eq_ignore_ascii_case(token)
            })
    };
    if !has_token("Upgrade", "websocket") {
        return Err(HandshakeError::NotUpgrade("no `Upgrade: websocket` header"));
    }
    if !has_token("Connection", "upgrade") {
        return Err(HandshakeError::NotUpgrade(
            "no `Connection: Upgrade` header",
        ));
    }
    if header("Sec-WebSocket-Version").as_deref() != Some("13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let sec_websocket_key = header("Sec-WebSocket-Key")
        .filter(|k| !k.is_empty())
        .ok_or(HandshakeError::NotUpgrade("no Sec-WebSocket-Key header"))?;

    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_string())),
        None => (target, None),
    };
    let charge_box_id_raw = path
        .strip_prefix(path_prefix)
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .ok_or_else(|| HandshakeError::NoChargeBoxId(path.to_string()))?
        .to_string();
    let charge_box_id = percent_encoding::percent_decode_str(&charge_box_id_raw)
        .decode_utf8()
        .map(|id| id.into_owned())
        .unwrap_or_else(|_| charge_box_id_raw.clone());

    Ok(Some(UpgradeRequest {
        charge_box_id_raw,
        charge_box_id,
        query,
        sec_websocket_key,
        protocols: raw_headers("Sec-WebSocket-Protocol"),
        authorization: raw_headers("Authorization"),
        forwarded_for: header("X-Forwarded-For"),
        forwarded_proto: header("X-Forwarded-Proto"),
        leftover: buf[head_len..].to_vec(),
    }))
}

/// Refuses a request line whose target holds anything but printable ASCII, or a `#`. A `#`
/// starts a fragment, which a client never sends: SteVe would see the id up to it and we the
/// whole, so the two would disagree on who the charger is; raw spaces, control characters and
/// bytes beyond ASCII must be percent-encoded (RFC 3986 §2). Checked on the raw line, before
/// httparse, which would call a raw space a bad HTTP version. A line that does not look like
/// `METHOD target HTTP/x` is left to httparse.
fn check_target(buf: &[u8]) -> Result<(), HandshakeError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(());
    };
    let line = &buf[..end];
    let method_len = line.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == 0 || line.get(method_len) != Some(&b' ') {
        return Ok(());
    }
    let rest = &line[method_len + 1..];
    let Some(version_at) = rest.iter().rposition(|&b| b == b' ') else {
        return Ok(());
    };
    let target = &rest[..version_at];
    if !rest[version_at + 1..].starts_with(b"HTTP/") || target.is_empty() {
        return Ok(());
    }
    if target.iter().any(|&b| b == b'#' || !b.is_ascii_graphic()) {
        return Err(HandshakeError::InvalidTarget);
    }
    Ok(())
}

/// A plain HTTP/1.1 response written to a charger before (or instead of) the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// A response with a plain-text body.
    pub fn text(status: u16, body: &str) -> Self {
        HttpResponse {
            status,
            headers: vec![("Content-Type".into(), "text/plain; charset=utf-8".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// The `101 Switching Protocols` answer, carrying the subprotocol SteVe chose.
    pub fn switching_protocols(sec_websocket_key: &str, protocol: Option<&str>) -> Self {
        let mut headers = vec![
            ("Upgrade".to_string(), "websocket".to_string()),
            ("Connection".to_string(), "Upgrade".to_string()),
            (
                "Sec-WebSocket-Accept".to_string(),
                derive_accept_key(sec_websocket_key.as_bytes()),
            ),
        ];
        if let Some(protocol) = protocol {
            headers.push(("Sec-WebSocket-Protocol".to_string(), protocol.to_string()));
        }
        HttpResponse {
            status: 101,
            headers,
            body: Vec::new(),
        }
    }

    /// Serialises the response; non-101 answers close the connection.
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = tokio_tungstenite::tungstenite::http::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Unknown");
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason);
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        if self.status != 101 {
            out.push_str(&format!(
                "Content-Length: {}\r\nConnection: close\r\n",
                self.body.len()
            ));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }

    /// Writes the response; errors mean the charger is gone, which the caller cannot fix.
    pub async fn write_to<S: AsyncWrite + Unpin>(&self, stream: &mut S) -> std::io::Result<()> {
        stream.write_all(&self.to_bytes()).await?;
        stream.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "/steve/websocket/CentralSystemService";

    fn request(path: &str, extra: &str) -> Vec<u8> {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn parses_a_charger_upgrade() {
        let mut bytes = request(
            &format!("{PREFIX}/CP%201"),
            "Sec-WebSocket-Protocol: ocpp1.6, ocpp1.5\r\nAuthorization: Basic Q1AgMTpzZWNyZXQ=\r\n",
        );
        bytes.extend_from_slice(b"early");
        let req = parse_request(&bytes, PREFIX).unwrap().unwrap();
        assert_eq!(req.charge_box_id_raw, "CP%201");
        assert_eq!(req.charge_box_id, "CP 1");
        assert_eq!(req.protocols, vec![b"ocpp1.6, ocpp1.5".to_vec()]);
        assert_eq!(req.authorization, vec![b"Basic Q1AgMTpzZWNyZXQ=".to_vec()]);
        assert_eq!(req.leftover, b"early");
    }

    #[test]
    fn every_protocol_header_and_raw_authorization_bytes_are_kept() {
        let mut extra = b"Sec-WebSocket-Protocol: ocpp2.0.1\r\nSec-WebSocket-Protocol: ocpp1.6\r\nAuthorization: Basic \xff\xfe\r\n".to_vec();
        extra.extend_from_slice(b"\r\n");
        let mut bytes = request(&format!("{PREFIX}/CP1"), "");
        bytes.truncate(bytes.len() - 2);
        bytes.extend_from_slice(&extra);
        let req = parse_request(&bytes, PREFIX).unwrap().unwrap();
        assert_eq!(
            req.protocols,
            vec![b"ocpp2.0.1".to_vec(), b"ocpp1.6".to_vec()]
        );
        assert_eq!(req.authorization, vec![b"Basic \xff\xfe".to_vec()]);
    }

    #[test]
    fn targets_that_are_not_printable_ascii_or_hold_a_fragment_are_refused() {
        for target in [
            b"/CPX#a".to_vec(),
            b"/CP X".to_vec(),
            b"/CP\x01X".to_vec(),
            b"/CP\x7fX".to_vec(),
            b"/CP\xffX".to_vec(),
            "/CP\u{e9}X".as_bytes().to_vec(),
        ] {
            let mut bytes = b"GET ".to_vec();
            bytes.extend_from_slice(PREFIX.as_bytes());
            bytes.extend_from_slice(&target);
            bytes.extend_from_slice(&request("", "")[4..]);
            let err = parse_request(&bytes, PREFIX).unwrap_err();
            let shown = String::from_utf8_lossy(&target);
            assert_eq!(err.reason(), "invalid_request_target", "{shown}");
            assert_eq!(err.response().unwrap().status, 400, "{shown}");
        }
        let encoded = parse_request(&request(&format!("{PREFIX}/CP%23a%20%C3%A9"), ""), PREFIX)
            .unwrap()
            .unwrap();
        assert_eq!(encoded.charge_box_id_raw, "CP%23a%20%C3%A9");
        assert_eq!(encoded.charge_box_id, "CP#a \u{e9}");
    }

    #[test]
    fn partial_head_waits_for_more() {
        let bytes = request(&format!("{PREFIX}/CP1"), "");
        assert_eq!(
            parse_request(&bytes[..bytes.len() - 2], PREFIX).unwrap(),
            None
        );
    }

    #[test]
    fn refuses_paths_without_an_id() {
        for path in [
            PREFIX.to_string(),
            format!("{PREFIX}/"),
            "/other/CP1".into(),
            format!("{PREFIX}/a/b"),
        ] {
            let err = parse_request(&request(&path, ""), PREFIX).unwrap_err();
            assert_eq!(err.reason(), "no_charge_box_id", "{path}");
            assert_eq!(err.response().unwrap().status, 404);
        }
    }

    #[test]
    fn refuses_non_websocket_requests() {
        let plain = b"GET /steve/websocket/CentralSystemService/CP1 HTTP/1.1\r\nHost: x\r\n\r\n";
        let err = parse_request(plain, PREFIX).unwrap_err();
        assert_eq!(err.response().unwrap().status, 400);
        let garbage = b"\x16\x03\x01 TLS hello\r\n\r\n";
        assert_eq!(
            parse_request(garbage, PREFIX).unwrap_err().reason(),
            "malformed_request"
        );
    }

    #[test]
    fn accept_key_matches_rfc6455_example() {
        let response =
            HttpResponse::switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", Some("ocpp1.6"));
        let text = String::from_utf8(response.to_bytes()).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: ocpp1.6\r\n"));
    }
}
