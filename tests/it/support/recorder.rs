//! A recording upstream standing in for SteVe: a websocket server on 127.0.0.1 that keeps every
//! frame it receives byte-for-byte, sends scripted frames, can echo CALLRESULTs, and can refuse,
//! close or hang on command.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use super::PATH_PREFIX;
use super::ws::large_frames;

/// How the recorder answers a websocket upgrade.
#[derive(Clone, Debug, Default)]
pub enum Handshake {
    /// Complete the upgrade.
    #[default]
    Accept,
    /// Refuse with this HTTP status (e.g. 404 unknown charge box, 401 bad credentials).
    Refuse(u16),
    /// Accept the TCP connection, never answer the upgrade (a SteVe stuck in GC, say).
    Hang,
}

/// Which subprotocol the recorder answers with.
#[derive(Clone, Debug, Default)]
pub enum Subprotocol {
    /// The first one the client offered, as SteVe does when it supports it.
    #[default]
    FirstOffered,
    /// This one, whatever was offered (to prove the charger sees upstream's choice).
    Fixed(String),
    /// No `Sec-WebSocket-Protocol` in the answer.
    None,
}

/// What the recorder does on each connection.
#[derive(Clone, Debug, Default)]
pub struct Script {
    /// How to answer the upgrade.
    pub handshake: Handshake,
    /// Which subprotocol to select.
    pub subprotocol: Subprotocol,
    /// Frames sent, in order, right after the upgrade.
    pub send_on_open: Vec<Message>,
    /// Frames sent after `send_on_open` only to the connection whose path ends with
    /// `/{key}` (a chargeBoxId), so one recorder can feed each charger its own frames.
    pub send_on_open_to: BTreeMap<String, Vec<Message>>,
    /// Answer each text frame that parses as a CALL `[2,"id",...]` with `[3,"id",{}]`.
    pub echo_callresult: bool,
    /// After receiving this many text/binary frames (0: right after `send_on_open`), close with
    /// this code and reason.
    pub close_after: Option<(usize, u16, String)>,
}

/// One upgrade request as the recorder received it.
#[derive(Clone, Debug)]
pub struct HandshakeSeen {
    /// The request target, e.g. `/steve/websocket/CentralSystemService/CP-1`.
    pub path: String,
    /// Every header, name lowercased, value as raw bytes.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl HandshakeSeen {
    /// The value of header `name` (case-insensitive) as text, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// What one accepted connection carried.
#[derive(Clone, Debug, Default)]
pub struct ConnectionLog {
    /// The upgrade request path.
    pub path: String,
    /// The subprotocol the recorder selected.
    pub subprotocol: Option<String>,
    /// Every text and binary frame received, in order, exactly as received.
    pub frames: Vec<Message>,
    /// The close frame received from the client side (code, reason), if any.
    pub close_received: Option<(u16, String)>,
    /// True once the connection has ended.
    pub ended: bool,
}

#[derive(Default)]
struct State {
    handshakes: Vec<HandshakeSeen>,
    connections: Vec<ConnectionLog>,
    tcp_accepted: usize,
}

/// A running recorder; stops (dropping every connection) when dropped.
pub struct Recorder {
    /// Its loopback address.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
}

impl Recorder {
    /// Starts a recorder following `script` on an ephemeral loopback port.
    pub async fn start(script: Script) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind recorder");
        let addr = listener.local_addr().expect("recorder addr");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = CancellationToken::new();
        let (accept_state, accept_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                // Cancel-safe: accept() loses nothing if the stop arm wins.
                let (stream, _) = tokio::select! {
                    _ = accept_stop.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                };
                accept_state.lock().unwrap().tcp_accepted += 1;
                let (state, stop, script) =
                    (accept_state.clone(), accept_stop.clone(), script.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = serve(stream, script, state) => {}
                    }
                });
            }
        });
        Recorder { addr, state, stop }
    }

    /// The `upstream_url` for a bridge in front of this recorder.
    pub fn url_base(&self) -> String {
        format!("ws://{}{PATH_PREFIX}", self.addr)
    }

    /// Upgrade requests received so far (refused and hung ones included).
    pub fn handshakes(&self) -> Vec<HandshakeSeen> {
        self.state.lock().unwrap().handshakes.clone()
    }

    /// TCP connections accepted so far.
    pub fn tcp_accepted(&self) -> usize {
        self.state.lock().unwrap().tcp_accepted
    }

    /// Accepted websocket connections so far.
    pub fn connections(&self) -> Vec<ConnectionLog> {
        self.state.lock().unwrap().connections.clone()
    }

    /// Waits (at most `limit`) until connection `index` has received `count` frames or ended;
    /// returns its log as it then is (panics if the connection never opened).
    pub async fn wait_for_frames(
        &self,
        index: usize,
        count: usize,
        limit: Duration,
    ) -> ConnectionLog {
        super::poll_until(limit, || {
            let state = self.state.lock().unwrap();
            let conn = state.connections.get(index)?;
            (conn.frames.len() >= count || conn.ended).then(|| conn.clone())
        })
        .await
        .or_else(|| self.connections().get(index).cloned())
        .unwrap_or_else(|| panic!("recorder connection {index} never opened within {limit:?}"))
    }

    /// Waits (at most `limit`) until connection `index` has ended; returns its log.
    pub async fn wait_for_end(&self, index: usize, limit: Duration) -> Option<ConnectionLog> {
        super::poll_until(limit, || {
            let state = self.state.lock().unwrap();
            state.connections.get(index).filter(|c| c.ended).cloned()
        })
        .await
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// The handshake callback's error type is fixed by tungstenite's `Callback` trait.
#[allow(clippy::result_large_err)]
async fn serve(stream: TcpStream, script: Script, state: Arc<Mutex<State>>) {
    if let Handshake::Hang = script.handshake {
        // Read the request so the client is not blocked on a full buffer, then say nothing
        // until the recorder is dropped (the select! in start() ends this task).
        let mut stream = stream;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            use tokio::io::AsyncReadExt;
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    let selected: Arc<Mutex<Option<String>>> = Arc::default();
    let path_seen: Arc<Mutex<String>> = Arc::default();
    let callback = {
        let (state, script, selected, path_seen) = (
            state.clone(),
            script.clone(),
            selected.clone(),
            path_seen.clone(),
        );
        move |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
            let seen = HandshakeSeen {
                path: request.uri().to_string(),
                headers: request
                    .headers()
                    .iter()
                    .map(|(n, v)| (n.as_str().to_ascii_lowercase(), v.as_bytes().to_vec()))
                    .collect(),
            };
            *path_seen.lock().unwrap() = seen.path.clone();
            let offered = seen.header("sec-websocket-protocol");
            state.lock().unwrap().handshakes.push(seen);
            if let Handshake::Refuse(status) = script.handshake {
                let mut refusal =
                    ErrorResponse::new(Some(format!("refused with {status} by the recorder")));
                *refusal.status_mut() = StatusCode::from_u16(status).expect("valid status");
                return Err(refusal);
            }
            let choice = match &script.subprotocol {
                Subprotocol::FirstOffered => offered.and_then(|o| {
                    o.split(',')
                        .map(str::trim)
                        .find(|p| !p.is_empty())
                        .map(str::to_owned)
                }),
                Subprotocol::Fixed(p) => Some(p.clone()),
                Subprotocol::None => None,
            };
            if let Some(choice) = &choice {
                response.headers_mut().insert(
                    "Sec-WebSocket-Protocol",
                    HeaderValue::from_str(choice).expect("subprotocol header"),
                );
            }
            *selected.lock().unwrap() = choice;
            Ok(response)
        }
    };
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(large_frames()))
            .await
    else {
        return;
    };

    let index = {
        let mut state = state.lock().unwrap();
        state.connections.push(ConnectionLog {
            path: path_seen.lock().unwrap().clone(),
            subprotocol: selected.lock().unwrap().clone(),
            ..ConnectionLog::default()
        });
        state.connections.len() - 1
    };
    let record =
        |f: &mut dyn FnMut(&mut ConnectionLog)| f(&mut state.lock().unwrap().connections[index]);

    let path = path_seen.lock().unwrap().clone();
    let own_frames = path
        .rsplit('/')
        .next()
        .and_then(|id| script.send_on_open_to.get(id));
    for frame in script
        .send_on_open
        .iter()
        .chain(own_frames.into_iter().flatten())
    {
        if ws.send(frame.clone()).await.is_err() {
            record(&mut |c| c.ended = true);
            return;
        }
    }
    let close = |ws_code: u16, reason: &str| {
        Message::Close(Some(CloseFrame {
            code: CloseCode::from(ws_code),
            reason: Utf8Bytes::from(reason.to_owned()),
        }))
    };
    if let Some((0, code, reason)) = &script.close_after {
        let _ = ws.send(close(*code, reason)).await;
    }

    let mut received = 0usize;
    while let Some(next) = ws.next().await {
        let Ok(message) = next else { break };
        match &message {
            Message::Text(_) | Message::Binary(_) => {
                received += 1;
                record(&mut |c| c.frames.push(message.clone()));
                if script.echo_callresult
                    && let Some(reply) = callresult_for(&message)
                    && ws.send(Message::text(reply)).await.is_err()
                {
                    break;
                }
                if let Some((after, code, reason)) = &script.close_after
                    && *after == received
                {
                    let _ = ws.send(close(*code, reason)).await;
                }
            }
            Message::Close(frame) => {
                let seen = frame
                    .as_ref()
                    .map(|f| (u16::from(f.code), f.reason.to_string()));
                record(&mut |c| c.close_received = seen.clone());
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
    record(&mut |c| c.ended = true);
}

/// `[3,"id",{}]` for a text frame holding a CALL `[2,"id",...]`.
fn callresult_for(message: &Message) -> Option<String> {
    let Message::Text(text) = message else {
        return None;
    };
    let value: serde_json::Value = serde_json::from_str(text.as_str()).ok()?;
    let array = value.as_array()?;
    if array.first()?.as_u64()? != 2 {
        return None;
    }
    Some(serde_json::json!([3, array.get(1)?, {}]).to_string())
}
