//! I/O: accept chargers, dial SteVe for each before answering, relay frames both ways.
//!
//! A bridge bug may cost a billing event, never a charging session: nothing here waits on the
//! billing pipeline except the commit acknowledgement of a billing reply, and no frame is
//! changed on its way through.

pub mod handshake;
pub mod relay;
pub mod tap;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::ProxyConfig;
use crate::shutdown::Shutdown;
use handshake::{HttpResponse, read_upgrade_request};
use relay::{Keepalive, relay};
use tap::{Billing, FrameTap};

/// Everything a connection handler needs, shared by all connections.
#[derive(Debug)]
pub struct Proxy {
    config: ProxyConfig,
    socket_config: WebSocketConfig,
    billing: Option<Billing>,
}

impl Proxy {
    /// A proxy relaying per `config`, billing through `billing` (`None`: relay only).
    pub fn new(config: ProxyConfig, billing: Option<Billing>) -> Arc<Self> {
        let socket_config = upstream::socket_config(config.max_frame_size);
        Arc::new(Proxy {
            config,
            socket_config,
            billing,
        })
    }

    /// Accepts chargers until `shutdown.stop_accepting` fires; connections are tracked by `tasks`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: Shutdown,
        tasks: TaskTracker,
    ) {
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
                Err(error) => {
                    // Typically EMFILE: back off instead of spinning; existing chargers go on.
                    metrics::counter!("ocpp_lago_bridge_accept_errors_total").increment(1);
                    tracing::error!(%error, "accepting a charger connection failed; raise LimitNOFILE if this is `too many open files`");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn handle(&self, mut stream: TcpStream, peer: SocketAddr, close: CancellationToken) {
        let _ = stream.set_nodelay(true);
        let request = match read_upgrade_request(
            &mut stream,
            &self.config.path_prefix,
            self.config.handshake_timeout,
        )
        .await
        {
            Ok(request) => request,
            Err(error) => {
                count_handshake(error.reason());
                tracing::warn!(%peer, reason = error.reason(), %error, "charger handshake refused");
                if let Some(response) = error.response() {
                    let _ = response.write_to(&mut stream).await;
                }
                return;
            }
        };
        let span = tracing::info_span!("charger", charge_box_id = %request.charge_box_id);
        self.relay_charger(stream, peer, request, close)
            .instrument(span)
            .await
    }

    async fn relay_charger(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        request: handshake::UpgradeRequest,
        close: CancellationToken,
    ) {
        let dialled = upstream::dial(
            &self.config.upstream_url,
            &request,
            self.socket_config,
            self.config.upstream_handshake_timeout,
        )
        .await;
        let (upstream, protocol) = match dialled {
            Ok(dialled) => dialled,
            Err(error) => {
                count_handshake(error.reason());
                tracing::warn!(%peer, reason = error.reason(), %error, "charger refused: no upstream connection");
                let _ = error.response().write_to(&mut stream).await;
                return;
            }
        };
        let accept =
            HttpResponse::switching_protocols(&request.sec_websocket_key, protocol.as_deref());
        if let Err(error) = accept.write_to(&mut stream).await {
            count_handshake("disconnected");
            tracing::warn!(%peer, %error, "charger left before its handshake was answered");
            return;
        }
        count_handshake("accepted");
        let charger = WebSocketStream::from_partially_read(
            stream,
            request.leftover,
            Role::Server,
            Some(self.socket_config),
        )
        .await;

        let connections = metrics::gauge!("ocpp_lago_bridge_charger_connections");
        connections.increment(1.0);
        tracing::info!(%peer, protocol = protocol.as_deref().unwrap_or(""), "charger connected");
        let keepalive = Keepalive {
            ping_interval: self.config.ping_interval,
            pong_timeout: self.config.pong_timeout,
        };
        let tap = FrameTap::new(
            request.charge_box_id,
            protocol.as_deref(),
            self.billing.clone(),
        );
        let end = relay(charger, upstream, keepalive, &tap, &close).await;
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

fn count_handshake(outcome: &'static str) {
    metrics::counter!("ocpp_lago_bridge_handshakes_total", "outcome" => outcome).increment(1);
}
