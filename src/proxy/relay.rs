//! Relaying frames between one charger and its SteVe connection, byte for byte, in order.
//!
//! Two pumps run concurrently inside the connection's task, one per direction, so a reply held
//! back for the spool (or a slow peer) never stalls the other direction. Each pump also pings the
//! side it writes to and watches that side's liveness, which the *other* pump records when it
//! reads from it. When either pump ends, the other is dropped (every await in a pump is
//! cancel-safe: `StreamExt::next` keeps partial frames inside the socket, and a frame handed to
//! `send` is either fully buffered or not at all), and the close is propagated.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use metrics::Counter;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use super::admission::ChargerRateLimiter;
use super::side::Side;
use super::tap::{FRAME_LABELS, FrameTap, frame_label_name};

/// How long a close handshake may take before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the other side is told when `side` vanishes. A lost charger is "going away" for
/// SteVe; a lost SteVe is a server-side failure for the charger (1005/1006 cannot be sent).
fn loss_close(side: Side) -> CloseFrame {
    match side {
        Side::Charger => close_frame(CloseCode::Away, "charger connection lost"),
        Side::Upstream => close_frame(CloseCode::Error, "upstream connection lost"),
    }
}

/// Keep-alive and rate settings of a relayed connection.
#[derive(Clone, Copy)]
pub struct Limits<'a> {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// Close a charger that sent no data frame for this long.
    pub idle_timeout: Option<Duration>,
    /// Slows a charger down past its message rate.
    pub rate: Option<&'a ChargerRateLimiter>,
    pub charge_box_id: &'a String,
}

/// Why a relayed connection ended.
#[derive(Debug)]
pub enum End {
    /// A side sent a close frame; it is forwarded as is.
    Closed { by: Side, frame: Option<CloseFrame> },
    /// A side's connection dropped without a close handshake (or could not be written to).
    Lost { side: Side, error: Option<String> },
    /// A side broke the protocol or our limits (too large, invalid UTF-8); it gets `code`.
    Violation {
        side: Side,
        code: CloseCode,
        error: String,
    },
    /// A side sent nothing, not even a pong, for longer than the keep-alive allows.
    Unresponsive { side: Side },
    /// The charger sent no data frame for longer than `proxy.idle_timeout`.
    Idle,
    /// The bridge is shutting down.
    Shutdown,
}

impl End {
    /// A stable label for the metric and the log.
    pub fn reason(&self) -> &'static str {
        match self {
            End::Closed {
                by: Side::Charger, ..
            } => "charger_closed",
            End::Closed {
                by: Side::Upstream, ..
            } => "upstream_closed",
            End::Lost {
                side: Side::Charger,
                ..
            } => "charger_lost",
            End::Lost {
                side: Side::Upstream,
                ..
            } => "upstream_lost",
            End::Violation { .. } => "protocol_violation",
            End::Unresponsive {
                side: Side::Charger,
            } => "charger_unresponsive",
            End::Unresponsive {
                side: Side::Upstream,
            } => "upstream_unresponsive",
            End::Idle => "idle_timeout",
            End::Shutdown => "shutdown",
        }
    }
}

/// When each side was last heard from, in milliseconds since the connection started.
struct Liveness {
    started: Instant,
    last_heard_ms: [AtomicU64; 2],
}

impl Liveness {
    fn heard(&self, side: Side, now: Instant) {
        let since_start = now.saturating_duration_since(self.started).as_millis();
        self.last_heard_ms[side.index()].store(since_start as u64, Ordering::Relaxed);
    }

    fn silent_for(&self, side: Side) -> Duration {
        let last = self.last_heard_ms[side.index()].load(Ordering::Relaxed);
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

/// A connection split into its sending and receiving halves. Each half is a pointer to the
/// shared connection: a relay's task holds these, not the (large) connections themselves.
pub type Halves<S> = (SplitSink<S, Message>, SplitStream<S>);

/// Relays until either side ends or `close` fires, then propagates the close to both sides.
///
/// The halves are borrowed, not moved in: an async fn keeps its arguments for its whole life,
/// so every value passed down the connection's task would be held twice (idle memory).
pub async fn relay<C, U>(
    charger: &mut Halves<C>,
    upstream: &mut Halves<U>,
    limits: Limits<'_>,
    tap: &FrameTap,
    close: &CancellationToken,
) -> End
where
    C: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
    U: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let (charger_tx, charger_rx) = charger;
    let (upstream_tx, upstream_rx) = upstream;
    let liveness = Liveness {
        started: Instant::now(),
        last_heard_ms: [AtomicU64::new(0), AtomicU64::new(0)],
    };
    let end = tokio::select! {
        // A fixed order (no random start per wake-up): the pumps, then the shutdown signal,
        // which is checked on every wake-up either way.
        biased;
        end = pump(charger_rx, upstream_tx, Side::Charger, &liveness, limits, tap) => end,
        end = pump(upstream_rx, charger_tx, Side::Upstream, &liveness, limits, tap) => end,
        _ = close.cancelled() => End::Shutdown,
    };

    let (charger_close, upstream_close) = match &end {
        End::Closed {
            by: Side::Charger,
            frame,
        } => (None, Some(frame.clone())),
        End::Closed {
            by: Side::Upstream,
            frame,
        } => (Some(frame.clone()), None),
        End::Lost { side, .. } | End::Unresponsive { side } => match side {
            Side::Charger => (None, Some(Some(loss_close(*side)))),
            Side::Upstream => (Some(Some(loss_close(*side))), None),
        },
        End::Violation { side, code, error } => {
            let own = Some(Some(close_frame(*code, error)));
            let other = Some(Some(loss_close(*side)));
            match side {
                Side::Charger => (own, other),
                Side::Upstream => (other, own),
            }
        }
        End::Shutdown => {
            let going_away = Some(Some(close_frame(CloseCode::Away, "bridge shutting down")));
            (going_away.clone(), going_away)
        }
        End::Idle => {
            let idle = Some(Some(close_frame(CloseCode::Away, "idle timeout")));
            (idle.clone(), idle)
        }
    };
    // A side that closed (or vanished) gets no close frame from us; one that closed has its
    // close answered by tungstenite, which a flush sends.
    tokio::join!(
        close_side(charger_tx, charger_rx, charger_close),
        close_side(upstream_tx, upstream_rx, upstream_close),
    );
    end
}

/// Sends `frame` (when `Some`) and waits briefly for the peer's answer; otherwise just flushes
/// whatever tungstenite queued (the answer to a close the peer sent).
async fn close_side<W, R>(tx: &mut W, rx: &mut R, frame: Option<Option<CloseFrame>>)
where
    W: Sink<Message, Error = WsError> + Unpin,
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let closing = async {
        match frame {
            None => {
                let _ = tx.flush().await;
            }
            Some(frame) => {
                if tx.send(Message::Close(frame)).await.is_ok() {
                    while let Some(Ok(message)) = rx.next().await {
                        if message.is_close() {
                            break;
                        }
                    }
                }
            }
        }
    };
    // Boxed: only a closing connection pays for its timer, not every idle connection's task.
    let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, closing)).await;
}

/// Moves frames read from `from` to the other side until something ends the connection.
async fn pump<R, W>(
    src: &mut R,
    dst: &mut W,
    from: Side,
    liveness: &Liveness,
    limits: Limits<'_>,
    tap: &FrameTap,
) -> End
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
    W: Sink<Message, Error = WsError> + Unpin,
{
    let to = match from {
        Side::Charger => Side::Upstream,
        Side::Upstream => Side::Charger,
    };
    let deadline = limits.ping_interval + limits.pong_timeout;
    // Only the charger's data frames count as activity for the idle timeout.
    let idle_timeout = limits.idle_timeout.filter(|_| from == Side::Charger);
    let mut last_data = Instant::now();
    // The clock ticks often enough for both the pings and a shorter idle timeout.
    let period = idle_timeout.map_or(limits.ping_interval, |idle| {
        limits
            .ping_interval
            .min(idle / 4)
            .max(Duration::from_millis(10))
    });
    let mut clock = tokio::time::interval_at(Instant::now() + period, period);
    clock.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_ping = Instant::now();
    loop {
        let (outgoing, label) = tokio::select! {
            // The socket first: a frame ready to relay does not pay for polling the clock
            // (a timer poll re-registers its waker). The clock gets its turn whenever the
            // socket has nothing ready, which tokio's cooperative budget also forces on a
            // socket that never runs dry.
            biased;
            // Cancel-safe: a partially received frame stays buffered inside the socket.
            message = src.next() => {
                // One clock read per frame serves both the liveness and the idle timeout.
                let now = Instant::now();
                liveness.heard(from, now);
                match message {
                    // A binary frame is not OCPP-J; SteVe (or the charger) decides what it
                    // means, exactly as if we were not here.
                    Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                        last_data = now;
                        if let (Side::Charger, Some(rate)) = (from, limits.rate)
                            && rate.check_key(limits.charge_box_id).is_err()
                        {
                            // Over its rate: waits for the next cell (taking it, as a passed
                            // check did). Boxed: the limiter's future would otherwise size
                            // every connection's task for its whole life.
                            Box::pin(rate.until_key_ready(limits.charge_box_id)).await;
                        }
                        let label = tap.observe(from, &message).await;
                        (message, Some(label))
                    }
                    // tungstenite answers pings itself; pongs only prove liveness.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(frame))) => return End::Closed { by: from, frame },
                    Some(Err(error)) => return read_error(from, error),
                    None => return End::Lost { side: from, error: None },
                }
            }
            _ = clock.tick() => {
                if liveness.silent_for(to) > deadline {
                    return End::Unresponsive { side: to };
                }
                if idle_timeout.is_some_and(|idle| last_data.elapsed() > idle) {
                    return End::Idle;
                }
                if last_ping.elapsed() < limits.ping_interval {
                    continue;
                }
                last_ping = Instant::now();
                (Message::Ping(Default::default()), None)
            }
        };
        // Almost every frame fits the socket buffer at once; only a send that has to wait
        // arms a deadline (a timer per frame costs two timer-wheel locks for nothing), in a
        // box: a timer held inline would size every idle connection's task for it.
        let mut sending = std::pin::pin!(dst.send(outgoing));
        let sent = match futures_util::poll!(sending.as_mut()) {
            Poll::Ready(result) => Ok(result),
            Poll::Pending => Box::pin(tokio::time::timeout(deadline, sending)).await,
        };
        match sent {
            Ok(Ok(())) => {
                if let Some(label) = label {
                    count_relayed(from, label);
                }
            }
            Ok(Err(error)) => {
                return End::Lost {
                    side: to,
                    error: Some(error.to_string()),
                };
            }
            Err(_) => return End::Unresponsive { side: to },
        }
    }
}

/// Counts a relayed frame in `ocpp_lago_bridge_frames_relayed_total`; its handles are registered
/// on first use and kept, instead of a registry lookup (and a label `Vec`) per frame.
fn count_relayed(from: Side, label: usize) {
    static HANDLES: [[OnceLock<Counter>; FRAME_LABELS]; 2] =
        [const { [const { OnceLock::new() }; FRAME_LABELS] }; 2];
    let Some(slot) = HANDLES[from.index()].get(label) else {
        return;
    };
    slot.get_or_init(|| {
        metrics::counter!("ocpp_lago_bridge_frames_relayed_total", "direction" => from.direction(), "action" => frame_label_name(label))
    })
    .increment(1);
}

fn read_error(side: Side, error: WsError) -> End {
    let code = match &error {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) | WsError::Capacity(_) => {
            CloseCode::Size
        }
        WsError::Utf8(_) => CloseCode::Invalid,
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            return End::Lost {
                side,
                error: Some(error.to_string()),
            };
        }
        WsError::Protocol(_) => CloseCode::Protocol,
        _ => {
            return End::Lost {
                side,
                error: Some(error.to_string()),
            };
        }
    };
    End::Violation {
        side,
        code,
        error: error.to_string(),
    }
}

fn close_frame(code: CloseCode, reason: &str) -> CloseFrame {
    // A close reason may hold at most 123 bytes; keep it on a char boundary.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: reason[..end].to_string().into(),
    }
}
