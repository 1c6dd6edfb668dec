//! Acceptance tests of issue 8 items 1 and 2: TLS at the bridge and towards SteVe, charger
//! certificates (security profile 3) and admission limits, proven through the built binary over
//! loopback with certificates minted here by rcgen.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::bridge::Bridge;
use crate::support::recorder::{Recorder, Script};
use crate::support::ws::{self, ClientWs, large_frames, refusal_status};
use crate::support::{PATH_PREFIX, poll_until, within};

const STEP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Certificates

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test certificate authority.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    der: CertificateDer<'static>,
}

/// A certificate and its key, as files want them and as rustls wants them.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Leaf {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, cn);
    name
}

impl Ca {
    fn new(cn: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name = common_name(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
            der: cert.der().clone(),
        }
    }

    fn issue(&self, cn: &str, names: &[&str], serial: u64, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name = common_name(cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    /// A server certificate valid for `localhost` and 127.0.0.1.
    fn server(&self, cn: &str, serial: u64) -> Leaf {
        self.issue(
            cn,
            &["localhost", "127.0.0.1"],
            serial,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A charger certificate for security profile 3: subject CN = its chargeBoxId.
    fn charger(&self, charge_box_id: &str, serial: u64) -> Leaf {
        self.issue(
            charge_box_id,
            &[],
            serial,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// A CA and the bridge's certificate and key files in a temp dir.
struct Pki {
    ca: Ca,
    dir: tempfile::TempDir,
}

impl Pki {
    /// A fresh CA, with a server certificate (CN `bridge-a`) written out for the bridge.
    fn new() -> (Pki, Leaf) {
        let pki = Pki {
            ca: Ca::new("ocpp-lago-bridge test CA"),
            dir: tempfile::tempdir().expect("temp dir for certificates"),
        };
        std::fs::write(pki.ca_file(), &pki.ca.pem).expect("write CA file");
        let server = pki.ca.server("bridge-a", 0xA1);
        pki.install_server(&server);
        (pki, server)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca_file(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// Overwrites the bridge's certificate and key files with `leaf`.
    fn install_server(&self, leaf: &Leaf) {
        std::fs::write(self.path("cert.pem"), &leaf.cert_pem).expect("write cert file");
        std::fs::write(self.path("key.pem"), &leaf.key_pem).expect("write key file");
    }

    /// The `[proxy.tls]` table; `client_ca` turns on security profile 3.
    fn tls_table(&self, client_ca: Option<&Path>) -> String {
        let mut table = format!(
            "[proxy.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            self.path("cert.pem"),
            self.path("key.pem")
        );
        if let Some(ca) = client_ca {
            table.push_str(&format!("client_ca_file = {ca:?}\n"));
        }
        table
    }
}

/// A charger's TLS configuration trusting `ca`, presenting `identity` if given.
fn client_tls(ca: &Ca, identity: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).expect("trust the test CA");
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.cert_der.clone()], leaf.key())
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

fn server_tls(leaf: &Leaf) -> Arc<rustls::ServerConfig> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.cert_der.clone()], leaf.key())
        .expect("server certificate");
    Arc::new(config)
}

// ---------------------------------------------------------------------------------------------
// Chargers, upstreams, metrics

type TlsWs = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// How a `wss://` connection attempt ended.
enum Attempt {
    Connected(Box<TlsWs>),
    /// The bridge answered the upgrade with this HTTP status.
    Refused(u16),
    /// No HTTP answer: TLS or the connection failed.
    Failed(String),
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Connected(_) => write!(f, "Connected"),
            Attempt::Refused(status) => write!(f, "Refused({status})"),
            Attempt::Failed(error) => write!(f, "Failed({error})"),
        }
    }
}

impl Attempt {
    fn connected(self, what: &str) -> TlsWs {
        match self {
            Attempt::Connected(ws) => *ws,
            other => panic!("{what}: expected a relayed connection, got {other:?}"),
        }
    }
}

/// A TLS connection to `addr` as `localhost` (no websocket yet).
async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    TlsConnector::from(config).connect(name, tcp).await
}

/// A charger connecting over `wss://` to the bridge at `addr` as `charge_box_id`.
async fn wss_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    charge_box_id: &str,
) -> Attempt {
    let attempt = async {
        let tls = match tls_connect(addr, config).await {
            Ok(tls) => tls,
            Err(error) => return Attempt::Failed(format!("TLS handshake: {error}")),
        };
        let url = format!(
            "wss://localhost:{}{PATH_PREFIX}/{charge_box_id}",
            addr.port()
        );
        let mut request = url.into_client_request().expect("request");
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("ocpp1.6"),
        );
        match tokio_tungstenite::client_async_with_config(request, tls, Some(large_frames())).await
        {
            Ok((ws, _)) => Attempt::Connected(Box::new(ws)),
            Err(tungstenite::Error::Http(response)) => Attempt::Refused(response.status().as_u16()),
            Err(error) => Attempt::Failed(format!("upgrade: {error}")),
        }
    };
    within(STEP, "wss connect", attempt).await
}

/// The certificate the bridge at `addr` presents to a new connection.
async fn served_certificate(addr: SocketAddr, ca: &Ca) -> CertificateDer<'static> {
    let tls = within(STEP, "TLS connect", tls_connect(addr, client_tls(ca, None)))
        .await
        .expect("TLS handshake with the bridge");
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the bridge presents a certificate")
        .clone()
        .into_owned()
}

async fn next_data_frame<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let message = within(STEP, "next frame", ws.next())
            .await
            .expect("connection still open")
            .expect("frame readable");
        match message {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

fn call(id: &str) -> Message {
    Message::text(format!("[2,\"{id}\",\"Heartbeat\",{{}}]"))
}

/// Sends a CALL and expects the recorder's CALLRESULT: the connection relays both ways.
async fn round_trip<S>(ws: &mut WebSocketStream<S>, id: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    within(STEP, "send a CALL", ws.send(call(id)))
        .await
        .unwrap_or_else(|e| panic!("send {id}: {e}"));
    let reply = next_data_frame(ws).await;
    assert_eq!(
        reply,
        Message::text(format!("[3,\"{id}\",{{}}]")),
        "reply to {id}"
    );
}

/// Reads until the close frame (or the end of the connection, then `None`).
async fn read_until_close<S>(ws: &mut WebSocketStream<S>) -> Option<CloseFrame>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for _ in 0..1000 {
        match within(STEP, "read until close", ws.next()).await {
            Some(Ok(Message::Close(frame))) => return frame,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
    panic!("no close frame after 1000 frames");
}

/// A plain `ws://` charger the bridge must admit; retried while it answers 503, because a slot
/// is given back only once the bridge notices a connection ended (its own startup probe too).
async fn connect_admitted(bridge: &Bridge, charge_box_id: &str) -> ClientWs {
    for _ in 0..50 {
        let attempt = within(
            STEP,
            "connect",
            ws::connect(&bridge.charger_url(charge_box_id), &["ocpp1.6"], None),
        )
        .await;
        match attempt {
            Ok((charger, _)) => return charger,
            Err(tungstenite::Error::Http(r)) if r.status() == 503 => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(error) => panic!("{charge_box_id} not admitted: {error}"),
        }
    }
    panic!("{charge_box_id} still refused with 503 after 50 tries");
}

fn echo_script() -> Script {
    Script {
        echo_callresult: true,
        ..Script::default()
    }
}

/// The recorder's counts right after the bridge's readiness probe (a bare TCP connect every
/// 5 s) has made its first connection, so a refusal checked within seconds sees no probe.
async fn upstream_counts(recorder: &Recorder) -> (usize, usize) {
    poll_until(STEP, || (recorder.tcp_accepted() >= 1).then_some(()))
        .await
        .expect("the bridge's readiness probe reaches the recorder");
    (recorder.tcp_accepted(), recorder.handshakes().len())
}

/// Asserts the bridge opened no connection to the recorder since `before` was taken.
async fn assert_never_dialled(recorder: &Recorder, before: (usize, usize), what: &str) {
    // A dial would have started before the charger got its answer; give it time to show anyway.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        (recorder.tcp_accepted(), recorder.handshakes().len()),
        before,
        "{what}: upstream (TCP connections, upgrade requests) must not be dialled"
    );
}

/// The admin listener's `/metrics` text.
async fn metrics(bridge: &Bridge) -> String {
    let fetch = async {
        let mut stream = TcpStream::connect(bridge.admin_addr).await?;
        // HTTP/1.0: the body is not chunked and ends with the connection.
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        std::io::Result::Ok(text)
    };
    within(STEP, "GET /metrics", fetch)
        .await
        .expect("admin /metrics answers")
}

/// The value of counter `name` with `label="value"` (0 when not yet exported).
fn counter(metrics: &str, name: &str, label: &str, value: &str) -> f64 {
    let label = format!("{label}=\"{value}\"");
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(&label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (≤ 3 s) until the counter reaches `at_least`; returns its last value.
async fn wait_counter(bridge: &Bridge, name: &str, label: &str, value: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = counter(&metrics(bridge).await, name, label, value);
        if now >= at_least || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn handshake_counter(bridge: &Bridge, outcome: &str) -> f64 {
    counter(&metrics(bridge).await, HANDSHAKES, "outcome", outcome)
}

const HANDSHAKES: &str = "ocpp_lago_bridge_handshakes_total";
const CLOSED: &str = "ocpp_lago_bridge_connections_closed_total";

/// A TLS terminator in front of `backend`: a SteVe behind `wss://`, as the bridge sees it.
struct TlsFront {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TlsFront {
    async fn start(backend: SocketAddr, config: Arc<rustls::ServerConfig>) -> TlsFront {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind TLS front");
        let addr = listener.local_addr().expect("TLS front addr");
        let acceptor = TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // The bridge's readiness probe connects without TLS: nothing to relay.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut plain) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront { addr, task }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TLS 1.1 ClientHello (no `supported_versions`, so `client_version` 1.1 is its highest): what
/// an old charger modem sends. rustls clients cannot speak below 1.2, hence hand-made bytes.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // session id
    // TLS 1.1's CBC suites, and the ECDHE-GCM ones rustls has, so only the version can fail.
    body.extend_from_slice(&[0x00, 0x08, 0xc0, 0x13, 0x00, 0x2f, 0xc0, 0x2b, 0xc0, 0x2f]);
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    // signature_algorithms (ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256) and supported_groups
    // (x25519, secp256r1), without which rustls refuses before it looks at the version.
    body.extend_from_slice(&[0x00, 0x14]);
    body.extend_from_slice(&[0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04]);
    body.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    let mut handshake = vec![0x01, 0x00, 0x00, body.len() as u8];
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    record
}

// ---------------------------------------------------------------------------------------------
// 1. wss:// at the bridge

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_listener_relays_byte_identical_and_tells_upstream_it_was_https() {
    let (pki, _) = Pki::new();
    let to_charger = vec![
        Message::text("[2,\"down-1\",\"Reset\",{\"type\":\"Soft\"}]"),
        Message::text("[2 , \"down-2\",\"DataTransfer\",{\"data\":\"Ünïcødé ⚡ 充电\"} ]\n"),
        Message::binary(vec![0u8, 1, 2, 254, 255]),
    ];
    let recorder = Recorder::start(Script {
        send_on_open: to_charger.clone(),
        ..Script::default()
    })
    .await;
    let bridge = Bridge::start_with(&recorder.url_base(), &pki.tls_table(None)).await;
    let mut charger = wss_connect(bridge.proxy_addr, client_tls(&pki.ca, None), "CP-TLS")
        .await
        .connected("charger over wss://");

    let to_steve = vec![
        Message::text(
            "[2,\"up-1\",\"BootNotification\",{\"chargePointVendor\":\"V\",\"chargePointModel\":\"M\"}]",
        ),
        Message::text("{not json ]"),
        Message::text(format!(
            "[2,\"up-big\",\"DataTransfer\",{{\"data\":\"{}\"}}]",
            "x".repeat(100_000)
        )),
        Message::binary(vec![9u8, 8, 7]),
    ];
    for frame in &to_steve {
        within(STEP, "send", charger.send(frame.clone()))
            .await
            .expect("send over wss://");
    }
    let log = recorder.wait_for_frames(0, to_steve.len(), STEP).await;
    assert_eq!(log.frames, to_steve, "frames upstream, byte for byte");
    for sent in &to_charger {
        assert_eq!(
            &next_data_frame(&mut charger).await,
            sent,
            "frame to the charger"
        );
    }

    let seen = &recorder.handshakes()[0];
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("https"));
    let forwarded_for = seen.header("x-forwarded-for").unwrap_or_default();
    assert!(
        forwarded_for.contains("127.0.0.1"),
        "X-Forwarded-For names the charger: {forwarded_for:?}"
    );

    // Plain ws:// to the TLS port: no websocket, and nothing reaches upstream.
    let plain = within(
        STEP,
        "plain ws:// to the TLS port",
        ws::connect(&bridge.charger_url("CP-PLAIN"), &["ocpp1.6"], None),
    )
    .await;
    assert!(
        plain.is_err(),
        "plain ws:// must not be upgraded on the TLS listener"
    );
    assert_eq!(
        recorder.handshakes().len(),
        1,
        "only the TLS charger was relayed"
    );

    // TLS 1.1: the bridge answers with a fatal protocol_version alert, never a ServerHello.
    let tls_errors = handshake_counter(&bridge, "tls_error").await;
    let mut old = TcpStream::connect(bridge.proxy_addr)
        .await
        .expect("connect");
    old.write_all(&tls11_client_hello())
        .await
        .expect("send ClientHello");
    let mut answer = [0u8; 7];
    within(STEP, "TLS 1.1 answer", old.read_exact(&mut answer))
        .await
        .expect("the bridge answers the TLS 1.1 hello");
    assert_eq!(
        answer[0], 0x15,
        "an alert record, not a handshake: {answer:?}"
    );
    assert_eq!(
        answer[5..7],
        [2, 70],
        "fatal protocol_version alert: {answer:?}"
    );
    assert!(
        wait_counter(
            &bridge,
            HANDSHAKES,
            "outcome",
            "tls_error",
            tls_errors + 1.0
        )
        .await
            >= tls_errors + 1.0,
        "the refused TLS 1.1 hello counts as tls_error"
    );
}

// 2. Certificate reload on SIGHUP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_certificate_for_new_chargers_and_keeps_connected_ones() {
    let (pki, first) = Pki::new();
    let recorder = Recorder::start(echo_script()).await;
    let bridge = Bridge::start_with(&recorder.url_base(), &pki.tls_table(None)).await;
    assert_eq!(
        served_certificate(bridge.proxy_addr, &pki.ca).await,
        first.cert_der
    );
    let mut before = wss_connect(bridge.proxy_addr, client_tls(&pki.ca, None), "CP-BEFORE")
        .await
        .connected("charger before the reload");
    round_trip(&mut before, "before-1").await;

    // A half-written certificate file is not loaded: the previous certificate stays.
    std::fs::write(
        pki.path("cert.pem"),
        "-----BEGIN CERTIFICATE-----\ntruncated",
    )
    .expect("break the cert file");
    bridge.reload();
    poll_until(STEP, || {
        bridge
            .stderr()
            .contains("TLS certificate not reloaded")
            .then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("no reload error logged; stderr:\n{}", bridge.stderr()));
    assert_eq!(
        served_certificate(bridge.proxy_addr, &pki.ca).await,
        first.cert_der,
        "a broken certificate file leaves the previous certificate in use"
    );

    let second = pki.ca.server("bridge-b", 0xB2);
    pki.install_server(&second);
    bridge.reload();
    let swapped = async {
        for _ in 0..100 {
            if served_certificate(bridge.proxy_addr, &pki.ca).await == second.cert_der {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(
        within(STEP, "certificate swap", swapped).await,
        "new connections get the new certificate after SIGHUP; stderr:\n{}",
        bridge.stderr()
    );

    round_trip(&mut before, "before-2").await;
    let mut after = wss_connect(bridge.proxy_addr, client_tls(&pki.ca, None), "CP-AFTER")
        .await
        .connected("charger after the reload");
    round_trip(&mut after, "after-1").await;
    let log = recorder.wait_for_frames(0, 2, STEP).await;
    assert_eq!(
        log.frames,
        [call("before-1"), call("before-2")],
        "the first charger's upstream connection carried on"
    );
    assert!(
        !log.ended,
        "the first charger's upstream connection is still open"
    );
}

// 3. Security profile 3

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_must_name_the_charge_box_id_and_come_from_the_ca() {
    let (pki, _) = Pki::new();
    let recorder = Recorder::start(echo_script()).await;
    let bridge =
        Bridge::start_with(&recorder.url_base(), &pki.tls_table(Some(&pki.ca_file()))).await;
    let cp1 = pki.ca.charger("CP-1", 1);
    let counts = upstream_counts(&recorder).await;

    let mut charger = wss_connect(bridge.proxy_addr, client_tls(&pki.ca, Some(&cp1)), "CP-1")
        .await
        .connected("CP-1 with its own certificate");
    round_trip(&mut charger, "cp1-1").await;
    assert_eq!(
        recorder.handshakes().len(),
        counts.1 + 1,
        "CP-1 reached upstream"
    );

    let before = (recorder.tcp_accepted(), recorder.handshakes().len());
    let other_id = wss_connect(bridge.proxy_addr, client_tls(&pki.ca, Some(&cp1)), "CP-2").await;
    assert!(
        matches!(other_id, Attempt::Refused(403)),
        "CP-1's certificate used as CP-2: {other_id:?}"
    );
    assert_never_dialled(&recorder, before, "certificate for another chargeBoxId").await;
    assert!(handshake_counter(&bridge, "certificate_mismatch").await >= 1.0);

    let tls_errors = handshake_counter(&bridge, "tls_error").await;
    let anonymous = wss_connect(bridge.proxy_addr, client_tls(&pki.ca, None), "CP-1").await;
    assert!(
        matches!(anonymous, Attempt::Failed(_)),
        "no client certificate: {anonymous:?}"
    );
    let rogue_ca = Ca::new("someone else's CA");
    let rogue = rogue_ca.charger("CP-1", 1);
    let forged = wss_connect(bridge.proxy_addr, client_tls(&pki.ca, Some(&rogue)), "CP-1").await;
    assert!(
        matches!(forged, Attempt::Failed(_)),
        "certificate from another CA: {forged:?}"
    );
    assert_never_dialled(&recorder, before, "TLS-refused chargers").await;
    assert!(
        wait_counter(
            &bridge,
            HANDSHAKES,
            "outcome",
            "tls_error",
            tls_errors + 2.0
        )
        .await
            >= tls_errors + 2.0,
        "both refused TLS handshakes count as tls_error"
    );
    round_trip(&mut charger, "cp1-2").await;
}

// 4. wss:// upstream

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_upstream_is_trusted_through_upstream_ca_file_only() {
    let (pki, server) = Pki::new();
    let recorder = Recorder::start(echo_script()).await;
    let front = TlsFront::start(recorder.addr, server_tls(&server)).await;
    let upstream_url = format!("wss://localhost:{}{PATH_PREFIX}", front.addr.port());

    let bridge = Bridge::start_with_proxy(
        &upstream_url,
        &format!("upstream_ca_file = {:?}", pki.ca_file()),
        "",
    )
    .await;
    let (mut charger, _) = within(
        STEP,
        "connect",
        ws::connect(&bridge.charger_url("CP-WSS-UP"), &["ocpp1.6"], None),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "relayed to a wss:// upstream: {e}; stderr:\n{}",
            bridge.stderr()
        )
    });
    for i in 0..5 {
        round_trip(&mut charger, &format!("wss-up-{i}")).await;
    }
    let log = recorder.wait_for_frames(0, 5, STEP).await;
    let sent: Vec<Message> = (0..5).map(|i| call(&format!("wss-up-{i}"))).collect();
    assert_eq!(
        log.frames, sent,
        "frames through TLS upstream, byte for byte"
    );

    // Without the CA, the system roots do not trust the test CA: the charger gets 502.
    let untrusting = Bridge::start(&upstream_url).await;
    let handshakes = recorder.handshakes().len();
    let refused = within(
        STEP,
        "connect",
        ws::connect(&untrusting.charger_url("CP-NO-CA"), &["ocpp1.6"], None),
    )
    .await;
    assert_eq!(refusal_status(&refused), Ok(502));
    assert_eq!(
        recorder.handshakes().len(),
        handshakes,
        "no upgrade request crosses an untrusted TLS connection"
    );
}

// 5. Admission

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlist_refuses_unlisted_ids_with_404_and_is_reloaded_on_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let allowlist = dir.path().join("allowlist");
    std::fs::write(&allowlist, "# fleet\nCP-LISTED\n").expect("write allowlist");
    let recorder = Recorder::start(echo_script()).await;
    let bridge = Bridge::start_with_proxy(
        &recorder.url_base(),
        &format!("allowlist_file = {allowlist:?}"),
        "",
    )
    .await;
    let counts = upstream_counts(&recorder).await;

    let refused = within(
        STEP,
        "connect",
        ws::connect(&bridge.charger_url("CP-NEW"), &["ocpp1.6"], None),
    )
    .await;
    assert_eq!(refusal_status(&refused), Ok(404));
    assert_never_dialled(&recorder, counts, "unlisted chargeBoxId").await;
    assert!(handshake_counter(&bridge, "not_allowed").await >= 1.0);

    let mut listed = connect_admitted(&bridge, "CP-LISTED").await;
    round_trip(&mut listed, "listed-1").await;

    std::fs::write(&allowlist, "CP-LISTED\nCP-NEW\n").expect("rewrite allowlist");
    bridge.reload();
    let mut admitted = None;
    for _ in 0..50 {
        let attempt = within(
            STEP,
            "connect",
            ws::connect(&bridge.charger_url("CP-NEW"), &["ocpp1.6"], None),
        )
        .await;
        match attempt {
            Ok((charger, _)) => {
                admitted = Some(charger);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut admitted = admitted.unwrap_or_else(|| {
        panic!(
            "CP-NEW still refused after SIGHUP; stderr:\n{}",
            bridge.stderr()
        )
    });
    round_trip(&mut admitted, "new-1").await;
    round_trip(&mut listed, "listed-2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_the_third_charger_with_503_until_one_leaves() {
    let recorder = Recorder::start(echo_script()).await;
    let bridge = Bridge::start_with_proxy(&recorder.url_base(), "max_connections = 2", "").await;
    let mut first = connect_admitted(&bridge, "CP-MAX-1").await;
    let mut second = connect_admitted(&bridge, "CP-MAX-2").await;

    let third = within(
        STEP,
        "connect",
        ws::connect(&bridge.charger_url("CP-MAX-3"), &["ocpp1.6"], None),
    )
    .await;
    assert_eq!(refusal_status(&third), Ok(503));
    assert!(handshake_counter(&bridge, "max_connections").await >= 1.0);
    round_trip(&mut first, "max-1a").await;
    round_trip(&mut second, "max-2a").await;

    within(STEP, "close", first.close(None))
        .await
        .expect("close the first charger");
    let mut fourth = connect_admitted(&bridge, "CP-MAX-4").await;
    round_trip(&mut fourth, "max-4a").await;
    round_trip(&mut second, "max-2b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_ip_refuses_a_second_charger_from_the_same_address() {
    let recorder = Recorder::start(echo_script()).await;
    let bridge =
        Bridge::start_with_proxy(&recorder.url_base(), "max_connections_per_ip = 1", "").await;
    let mut first = connect_admitted(&bridge, "CP-IP-1").await;
    let second = within(
        STEP,
        "connect",
        ws::connect(&bridge.charger_url("CP-IP-2"), &["ocpp1.6"], None),
    )
    .await;
    assert_eq!(refusal_status(&second), Ok(503));
    assert!(handshake_counter(&bridge, "max_connections_per_ip").await >= 1.0);
    round_trip(&mut first, "ip-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_a_silent_charger_with_1001_and_spares_an_active_one() {
    let recorder = Recorder::start(echo_script()).await;
    let bridge = Bridge::start_with_proxy(
        &recorder.url_base(),
        "idle_timeout = \"1s\"\nping_interval = \"200ms\"",
        "",
    )
    .await;
    let mut silent = connect_admitted(&bridge, "CP-SILENT").await;
    let silent_since = Instant::now();
    let mut active = connect_admitted(&bridge, "CP-ACTIVE").await;
    // The silent charger reads (answering pings, which are not activity) until it is closed.
    let closed = tokio::spawn(async move {
        let frame = read_until_close(&mut silent).await;
        (frame, silent_since.elapsed())
    });

    for i in 0..12 {
        round_trip(&mut active, &format!("active-{i}")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (frame, after) = within(STEP, "silent charger closed", closed)
        .await
        .expect("reader task");
    let frame = frame.expect("the silent charger gets a close frame");
    assert_eq!(frame.code, CloseCode::Away, "close code 1001: {frame:?}");
    assert!(
        after >= Duration::from_millis(900) && after <= Duration::from_millis(2500),
        "closed {after:?} after its last frame (idle_timeout 1s, pinged every 200ms)"
    );
    round_trip(&mut active, "active-last").await;
    assert_eq!(
        counter(&metrics(&bridge).await, CLOSED, "reason", "idle_timeout"),
        1.0,
        "only the silent charger was closed as idle"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_messages_per_second_slows_a_charger_without_dropping_frames() {
    let recorder = Recorder::start(Script::default()).await;
    let bridge =
        Bridge::start_with_proxy(&recorder.url_base(), "max_messages_per_second = 5", "").await;
    let mut charger = connect_admitted(&bridge, "CP-FAST").await;
    let sent: Vec<Message> = (0..20).map(|i| call(&format!("fast-{i}"))).collect();
    for frame in &sent {
        within(STEP, "send", charger.send(frame.clone()))
            .await
            .expect("send");
    }

    let count = || recorder.connections().first().map_or(0, |c| c.frames.len());
    let first_at = poll_until(STEP, || (count() >= 1).then(Instant::now))
        .await
        .expect("the first frame arrives");
    let last_at = poll_until(STEP, || (count() >= sent.len()).then(Instant::now))
        .await
        .expect("all 20 frames arrive");
    let spread = last_at - first_at;
    assert_eq!(
        recorder.connections()[0].frames,
        sent,
        "every frame, in order"
    );
    // A burst of 5, then one per 200 ms: the 20th is due 3 s after the first.
    assert!(
        spread >= Duration::from_millis(2500),
        "20 frames at 5/s arrived within {spread:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_with_one_charge_box_id_never_mix_frames() {
    let recorder = Recorder::start(echo_script()).await;
    let bridge = Bridge::start(&recorder.url_base()).await;
    let mut twins = [
        connect_admitted(&bridge, "CP-TWIN").await,
        connect_admitted(&bridge, "CP-TWIN").await,
    ];
    const FRAMES: usize = 20;
    for i in 0..FRAMES {
        for (t, twin) in twins.iter_mut().enumerate() {
            within(STEP, "send", twin.send(call(&format!("twin{t}-{i}"))))
                .await
                .expect("send");
        }
    }
    for (t, twin) in twins.iter_mut().enumerate() {
        for i in 0..FRAMES {
            assert_eq!(
                next_data_frame(twin).await,
                Message::text(format!("[3,\"twin{t}-{i}\",{{}}]")),
                "twin {t} gets its own replies, in order"
            );
        }
    }
    let mut upstream_tags = Vec::new();
    for index in 0..2 {
        let log = recorder.wait_for_frames(index, FRAMES, STEP).await;
        let text = log
            .frames
            .first()
            .map(|f| f.to_string())
            .unwrap_or_default();
        let t = if text.contains("\"twin0-") { 0 } else { 1 };
        let expected: Vec<Message> = (0..FRAMES).map(|i| call(&format!("twin{t}-{i}"))).collect();
        assert_eq!(
            log.frames, expected,
            "upstream connection {index} carries one twin only"
        );
        upstream_tags.push(t);
    }
    upstream_tags.sort();
    assert_eq!(
        upstream_tags,
        [0, 1],
        "each twin has its own upstream connection"
    );
}

// Found while writing the tests above, fixed since.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refusal_on_the_tls_listener_is_a_503() {
    let (pki, _) = Pki::new();
    let recorder = Recorder::start(echo_script()).await;
    let bridge = Bridge::start_with_proxy(
        &recorder.url_base(),
        "max_connections = 1",
        &pki.tls_table(None),
    )
    .await;
    let mut first = None;
    for _ in 0..50 {
        match wss_connect(bridge.proxy_addr, client_tls(&pki.ca, None), "CP-TLS-MAX-1").await {
            Attempt::Connected(ws) => {
                first = Some(ws);
                break;
            }
            // The bridge's startup probe may still hold the only slot.
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut first = first.expect("the first wss:// charger is admitted");
    let second = wss_connect(bridge.proxy_addr, client_tls(&pki.ca, None), "CP-TLS-MAX-2").await;
    assert!(
        matches!(second, Attempt::Refused(503)),
        "the second wss:// charger over max_connections = 1: {second:?}"
    );
    round_trip(&mut first, "tls-max-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_charger_cannot_claim_https_to_upstream() {
    let recorder = Recorder::start(Script::default()).await;
    let bridge = Bridge::start(&recorder.url_base()).await;
    let mut request = bridge
        .charger_url("CP-SPOOF")
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("X-Forwarded-Proto", HeaderValue::from_static("https"));
    let (_charger, _) = within(
        STEP,
        "connect",
        tokio_tungstenite::connect_async_with_config(request, Some(large_frames()), true),
    )
    .await
    .expect("bridge accepts the charger");
    assert_eq!(
        recorder.handshakes()[0]
            .header("x-forwarded-proto")
            .as_deref(),
        Some("http"),
        "a charger on plain ws:// is reported to SteVe as http"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_shorter_than_ping_interval_is_honoured() {
    let recorder = Recorder::start(Script::default()).await;
    let bridge = Bridge::start_with_proxy(&recorder.url_base(), "idle_timeout = \"1s\"", "").await;
    let mut silent = connect_admitted(&bridge, "CP-SILENT-30S").await;
    let closed = tokio::time::timeout(Duration::from_secs(3), read_until_close(&mut silent)).await;
    assert!(
        closed.is_ok(),
        "a charger silent for 3 s under idle_timeout = 1s is still connected"
    );
}
