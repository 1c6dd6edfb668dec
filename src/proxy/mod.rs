//! I/O: accept chargers, dial SteVe for each before answering, relay frames both ways.
//!
//! A bridge bug may cost a billing event, never a charging session: nothing here waits on the
//! billing pipeline except the commit acknowledgement of a billing reply, and no frame is
//! changed on its way through.

pub mod admission;
pub mod handshake;
pub mod relay;
pub mod side;
pub mod tap;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::ProxyConfig;
use crate::shutdown::Shutdown;
use crate::tls::{self, ReloadableAcceptor, TlsError};
use admission::{Admission, Refusal, Slot};
use futures_util::StreamExt;
use handshake::{HttpResponse, UpgradeRequest, read_upgrade_request};
use relay::{Halves, Limits, relay};
use tap::{Billing, FrameTap};

use crate::telemetry::Throttle;

/// Everything a connection handler needs, shared by all connections.
pub struct Proxy {
    config: ProxyConfig,
    socket_config: WebSocketConfig,
    billing: Option<Billing>,
    admission: Admission,
    tls: Option<ReloadableAcceptor>,
    upstream_tls: Option<Arc<rustls::ClientConfig>>,
    /// Running out of file descriptors is logged at most once a second, however many chargers
    /// it turns away (each is counted).
    fds_exhausted_log: std::sync::Mutex<Throttle>,
}

impl Proxy {
    /// A proxy relaying per `config`, billing through `billing` (`None`: relay only).
    pub fn new(config: ProxyConfig, billing: Option<Billing>) -> Result<Arc<Self>, TlsError> {
        let socket_config = upstream::socket_config(config.max_frame_size);
        let tls = config
            .tls
            .clone()
            .map(ReloadableAcceptor::new)
            .transpose()?;
        let upstream_tls = if config.upstream_url.scheme() == "wss" {
            Some(tls::client_config(config.upstream_ca_file.as_deref())?)
        } else {
            None
        };
        Ok(Arc::new(Proxy {
            admission: Admission::new(&config),
            config,
            socket_config,
            billing,
            tls,
            upstream_tls,
            fds_exhausted_log: std::sync::Mutex::new(Throttle::per_second()),
        }))
    }

    /// SIGHUP: re-reads the TLS certificate and the allowlist; connected chargers stay.
    pub fn reload(&self) {
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Err(error) => {
                    tracing::error!(%error, "SIGHUP: TLS certificate not reloaded; the previous one stays")
                }
            }
        }
        self.admission.reload_allowlist(&self.config);
    }

    /// Accepts chargers until `shutdown.stop_accepting` fires; connections are tracked by `tasks`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: Shutdown,
        tasks: TaskTracker,
    ) {
        // One descriptor held in reserve: out of descriptors, it is given up to accept the
        // waiting charger and tell it 503 `fds_exhausted` (nginx and libev do the same),
        // instead of leaving it in the backlog until its own timeout.
        let mut reserve = std::fs::File::open("/dev/null").ok();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.stop_accepting.cancelled() => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let proxy = Arc::clone(&self);
                    let close = shutdown.close_connections.clone();
                    tasks.spawn(async move { proxy.handle(stream, peer, close).await });
                }
                Err(error) if fds_exhausted(&error) => {
                    metrics::counter!("ocpp_lago_bridge_accept_errors_total").increment(1);
                    self.log_fds_exhausted(None, &error);
                    match reserve.take() {
                        Some(spare) => {
                            drop(spare);
                            self.refuse_waiting_charger(&listener).await;
                            reserve = std::fs::File::open("/dev/null").ok();
                        }
                        // Back off instead of spinning; connected chargers go on.
                        None => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            reserve = std::fs::File::open("/dev/null").ok();
                        }
                    }
                }
                Err(error) => {
                    metrics::counter!("ocpp_lago_bridge_accept_errors_total").increment(1);
                    tracing::error!(%error, "accepting a charger connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// With the reserve descriptor freed: accepts the charger waiting in the backlog and answers
    /// it 503 `fds_exhausted` (inside TLS on a `wss://` listener), within a second at most.
    async fn refuse_waiting_charger(&self, listener: &TcpListener) {
        let refuse = async {
            let Ok((mut stream, peer)) = listener.accept().await else {
                return;
            };
            let refusal = Refusal::FdsExhausted;
            count_handshake(refusal.reason());
            match &self.tls {
                None => answer_and_close(&mut stream, refusal, &self.config.path_prefix).await,
                Some(tls) => {
                    if let Ok(mut stream) = tls.acceptor().accept(stream).await {
                        answer_and_close(&mut stream, refusal, &self.config.path_prefix).await
                    }
                }
            }
            tracing::debug!(%peer, "charger refused: out of file descriptors");
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), refuse).await;
    }

    /// Logs (at most once a second) that a charger was turned away for lack of descriptors.
    fn log_fds_exhausted(&self, peer: Option<SocketAddr>, error: &dyn std::fmt::Display) {
        if let Some(suppressed) = crate::lock(&self.fds_exhausted_log).ready() {
            let peer = peer.map(|p| p.to_string()).unwrap_or_default();
            tracing::error!(
                reason = "fds_exhausted",
                %peer,
                %error,
                suppressed,
                "out of file descriptors: chargers are refused with 503; raise LimitNOFILE= or lower proxy.max_connections"
            );
        }
    }

    async fn handle(&self, stream: TcpStream, peer: SocketAddr, close: CancellationToken) {
        let _ = stream.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return self.serve_charger(stream, peer, None, close).await;
        };
        // wss:// chargers pay one more allocation, so that plain ws:// ones do not carry
        // rustls' state in their task.
        Box::pin(self.handle_tls(tls, stream, peer, close)).await
    }

    async fn handle_tls(
        &self,
        tls: &ReloadableAcceptor,
        stream: TcpStream,
        peer: SocketAddr,
        close: CancellationToken,
    ) {
        // The TLS handshake is part of the pending phase: a stalled ClientHello holds a
        // descriptor too.
        let pending = self.admission.begin_handshake();
        let accepting = tokio::time::timeout(
            self.config.handshake_timeout,
            Box::pin(tls.acceptor().accept(stream)),
        );
        let stream = tokio::select! {
            accepted = accepting => match accepted {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    count_handshake("tls_error");
                    return tracing::warn!(%peer, %error, "charger TLS handshake failed");
                }
                Err(_) => {
                    count_handshake("handshake_timeout");
                    return tracing::warn!(%peer, "charger TLS handshake timed out");
                }
            },
            () = pending.evicted() => {
                // Logged by the registry, at most once a second.
                return count_handshake(pending.refusal().reason());
            }
        };
        drop(pending);
        let certified_id = if tls.requires_client_certificate() {
            let cn = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(tls::subject_common_name);
            match cn {
                Some(cn) => Some(cn),
                None => {
                    count_handshake("client_certificate_without_cn");
                    tracing::warn!(%peer, "charger refused: its certificate has no subject CN to match a chargeBoxId");
                    return;
                }
            }
        } else {
            None
        };
        self.serve_charger(stream, peer, Some(certified_id), close)
            .await
    }

    /// Handshakes, then relays inside the charger's span. The handshakes are boxed: a task's
    /// future is as large as its largest state, and theirs (read buffers, the client handshake
    /// to SteVe) would otherwise size every connection for its whole life (BENCHMARKS.md, idle
    /// memory).
    async fn serve_charger<S>(
        &self,
        stream: S,
        peer: SocketAddr,
        tls: Option<Option<String>>,
        close: CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if let Some((mut connected, span)) = Box::pin(self.connect(stream, peer, tls)).await {
            self.relay_connected(&mut connected, close)
                .instrument(span)
                .await;
        }
    }

    /// The WebSocket upgrade on a plain or TLS stream, and SteVe dialled for it. `tls` is
    /// `None` on plain `ws://`, else `Some(certified chargeBoxId)` (that inner `Some` only
    /// under security profile 3). `None` when the charger was refused (and told why); else the
    /// connection and the charger's span.
    async fn connect<S>(
        &self,
        mut stream: S,
        peer: SocketAddr,
        tls: Option<Option<String>>,
    ) -> Option<(Connected<'_, S>, tracing::Span)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        // Until its request head is complete the connection is only pending: it holds no
        // charger slot, and newer connections may push it out.
        let pending = self.admission.begin_handshake();
        let read = tokio::select! {
            read = read_upgrade_request(
                &mut stream,
                &self.config.path_prefix,
                self.config.handshake_timeout,
            ) => Some(read),
            () = pending.evicted() => None,
        };
        let Some(read) = read else {
            count_handshake(pending.refusal().reason());
            let _ = pending.refusal().response().write_to(&mut stream).await;
            return None;
        };
        drop(pending);
        let request = match read {
            Ok(request) => request,
            Err(error) => {
                count_handshake(error.reason());
                tracing::warn!(%peer, reason = error.reason(), %error, "charger handshake refused");
                if let Some(response) = error.response() {
                    let _ = response.write_to(&mut stream).await;
                }
                return None;
            }
        };
        let span = tracing::info_span!("charger", charge_box_id = %request.charge_box_id);
        let connected = async {
            let slot = match self.admission.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(refusal) => {
                    refuse(&mut stream, peer, refusal).await;
                    return None;
                }
            };
            if let Err(refusal) = self.authorise(&request, tls.as_ref().and_then(Option::as_deref))
            {
                count_handshake(refusal.reason());
                tracing::warn!(%peer, reason = refusal.reason(), "charger refused: {refusal}");
                let _ = refusal.response().write_to(&mut stream).await;
                return None;
            }
            self.dial_for(stream, peer, request, tls.is_some(), slot)
                .await
        }
        .instrument(span.clone())
        .await?;
        Some((connected, span))
    }

    fn authorise(
        &self,
        request: &UpgradeRequest,
        certified_id: Option<&str>,
    ) -> Result<(), Refusal> {
        if let Some(cn) = certified_id
            && cn != request.charge_box_id
        {
            return Err(Refusal::CertificateMismatch {
                certificate: cn.to_string(),
            });
        }
        self.admission.allowed(&request.charge_box_id)
    }

    /// Dials SteVe for the charger and answers the charger's handshake with SteVe's choice.
    async fn dial_for<'a, S>(
        &'a self,
        mut stream: S,
        peer: SocketAddr,
        request: UpgradeRequest,
        tls_at_bridge: bool,
        slot: Slot<'a>,
    ) -> Option<Connected<'a, S>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        // SteVe sees a reverse proxy: who the charger is, and whether it came over TLS (it
        // refuses security-profile-2 stations on plain ws otherwise). Only a trusted proxy in
        // front of us may say so for the charger; anyone else's headers are replaced.
        let trusted = self
            .config
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&peer.ip()));
        let forwarded_for = match (&request.forwarded_for, trusted) {
            (Some(chain), true) => format!("{chain}, {}", peer.ip()),
            _ => peer.ip().to_string(),
        };
        let forwarded_proto = match (&request.forwarded_proto, trusted) {
            _ if tls_at_bridge => "https".to_string(),
            (Some(proto), true) => proto.clone(),
            _ => "http".to_string(),
        };
        let forwarded = [
            ("X-Forwarded-For", forwarded_for),
            ("X-Forwarded-Proto", forwarded_proto),
        ];
        let dialled = upstream::dial(
            &self.config.upstream_url,
            &request,
            &forwarded,
            self.upstream_tls.clone(),
            self.socket_config,
            self.config.upstream_handshake_timeout,
        )
        .await;
        let (upstream, protocol) = match dialled {
            Ok(dialled) => dialled,
            Err(error) => {
                count_handshake(error.reason());
                if matches!(error, upstream::DialError::FdsExhausted(_)) {
                    self.log_fds_exhausted(Some(peer), &error);
                } else {
                    tracing::warn!(%peer, reason = error.reason(), %error, "charger refused: no upstream connection");
                }
                let _ = error.response().write_to(&mut stream).await;
                return None;
            }
        };
        let accept =
            HttpResponse::switching_protocols(&request.sec_websocket_key, protocol.as_deref());
        if let Err(error) = accept.write_to(&mut stream).await {
            count_handshake("disconnected");
            tracing::warn!(%peer, %error, "charger left before its handshake was answered");
            return None;
        }
        count_handshake("accepted");
        let charger = WebSocketStream::from_partially_read(
            stream,
            request.leftover,
            Role::Server,
            Some(self.socket_config),
        )
        .await;
        Some(Connected {
            charger: charger.split(),
            upstream: upstream.split(),
            charge_box_id: request.charge_box_id,
            protocol,
            peer,
            _slot: slot,
        })
    }

    /// Relays a connected charger until either side ends. `connected` is borrowed: its caller
    /// holds it (and the charger's slot) for the connection's life, once.
    async fn relay_connected<S>(&self, connected: &mut Connected<'_, S>, close: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Connected {
            charger,
            upstream,
            charge_box_id,
            protocol,
            peer,
            ..
        } = connected;
        let connections = metrics::gauge!("ocpp_lago_bridge_charger_connections");
        connections.increment(1.0);
        tracing::info!(%peer, protocol = protocol.as_deref().unwrap_or(""), "charger connected");
        let limits = Limits {
            ping_interval: self.config.ping_interval,
            pong_timeout: self.config.pong_timeout,
            idle_timeout: self.config.idle_timeout,
            rate: self.admission.rate_limiter(),
            charge_box_id,
        };
        let tap = FrameTap::new(
            charge_box_id.clone(),
            protocol.as_deref(),
            self.billing.clone(),
        );
        let end = relay(charger, upstream, limits, &tap, &close).await;
        tap.connection_ended().await;
        connections.decrement(1.0);
        metrics::counter!("ocpp_lago_bridge_connections_closed_total", "reason" => end.reason())
            .increment(1);
        match &end {
            relay::End::Violation { side, error, .. } => {
                tracing::warn!(reason = end.reason(), side = side.as_str(), %error, "connection closed: protocol violation")
            }
            relay::End::Lost { side, error } => tracing::info!(
                reason = end.reason(),
                side = side.as_str(),
                error = error.as_deref().unwrap_or(""),
                "connection closed"
            ),
            _ => tracing::info!(reason = end.reason(), "connection closed"),
        }
    }
}

/// A charger whose handshakes with the bridge and with SteVe are done.
struct Connected<'a, S> {
    charger: Halves<WebSocketStream<S>>,
    upstream: Halves<upstream::UpstreamSocket>,
    charge_box_id: String,
    protocol: Option<String>,
    peer: SocketAddr,
    _slot: Slot<'a>,
}

/// Whether an I/O error means the process (EMFILE) or the system (ENFILE) is out of
/// file descriptors.
pub(crate) fn fds_exhausted(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Answers a connection accepted only to be refused: reads its request head for a moment (so
/// closing does not reset the answer away), writes `refusal`'s response, closes.
async fn answer_and_close<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    refusal: Refusal,
    path_prefix: &str,
) {
    let _ = read_upgrade_request(stream, path_prefix, Duration::from_millis(200)).await;
    let _ = refusal.response().write_to(stream).await;
    let _ = tokio::io::AsyncWriteExt::shutdown(stream).await;
}

/// Answers a charger over a connection limit with 503 (it retries later).
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, peer: SocketAddr, refusal: Refusal) {
    count_handshake(refusal.reason());
    tracing::warn!(%peer, reason = refusal.reason(), "charger refused: connection limit");
    let _ = refusal.response().write_to(stream).await;
}

fn count_handshake(outcome: &'static str) {
    metrics::counter!("ocpp_lago_bridge_handshakes_total", "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16 item 3: a connection's task holds its future inline for the connection's whole
    /// life, so every state it can be in (timers, a rate limiter's wait, a send's deadline)
    /// costs every idle charger. Rare states are boxed; this keeps them so.
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let proxy = Proxy::new(crate::config::Config::default().proxy, None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let task = proxy.handle(stream, peer, CancellationToken::new());
        let size = std::mem::size_of_val(&task);
        eprintln!("connection task future: {size} bytes");
        // 2 752 bytes in a debug build after issue 16 (3 808 before: a send's deadline, the
        // rate limiter's wait and a whole tap observation were held inline, and the halves
        // twice); release builds lay it out smaller.
        assert!(
            size <= 3 * 1024,
            "the connection task's future is {size} bytes"
        );
    }
}
