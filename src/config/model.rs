//! The typed model: what a validated configuration holds, and every built-in default in one
//! place ([`Config::default`]). A value here cannot be invalid: URLs are parsed ([`BaseUrl`]),
//! "off" is `None` (the files' `0`, `"0s"` and `""` spellings are read into it by
//! `reader.rs`), modes are enums. Cross-key rules live in [`Config::invariant_problems`].
//!
//! Must not: read files or the environment, or ask the machine anything (that is `files.rs`,
//! `secrets.rs`, `rlimit.rs`, `check.rs`).

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use crate::ledger::{BillingMode, IdTagCase, Template};
use crate::tls::TlsConfig;

/// A validated configuration: it cannot hold an invalid value.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub lago: LagoConfig,
    pub billing: BillingConfig,
    pub spool: SpoolConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub steve: SteveConfig,
    pub reconcile: ReconcileConfig,
}

/// An absolute URL of one of a key's schemes, with a host and no query or fragment, to which the
/// bridge appends paths (`{upstream_url}/{chargeBoxId}`, `{api_url}/api/v1/…`). Parsed once, when
/// the config is read; shown (and [`BaseUrl::as_str`]) without a trailing slash.
#[derive(Clone, PartialEq, Eq)]
pub struct BaseUrl(Url);

impl BaseUrl {
    /// `text` if it is a URL of one of `schemes` with a host and no query or fragment; the
    /// problem (without the key, which the caller names) otherwise.
    pub fn parse(text: &str, schemes: &[&str]) -> Result<BaseUrl, String> {
        let url = Url::parse(text).map_err(|e| e.to_string())?;
        if !schemes.contains(&url.scheme()) {
            return Err(format!("the scheme must be {}", schemes.join(" or ")));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("it has no host".into());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err("it has a query or fragment".into());
        }
        Ok(BaseUrl(url))
    }

    /// A built-in default; only for literals known to be valid.
    fn literal(text: &str, schemes: &[&str]) -> BaseUrl {
        BaseUrl::parse(text, schemes).expect("a valid literal URL")
    }

    /// The parsed URL (its path may end in `/`).
    pub fn url(&self) -> &Url {
        &self.0
    }

    /// The URL without a trailing slash: `{as_str}/{segment}` is the URL of `segment` below it.
    pub fn as_str(&self) -> &str {
        self.0.as_str().trim_end_matches('/')
    }

    /// The scheme, e.g. `ws`, `wss`, `http`, `https`.
    pub fn scheme(&self) -> &str {
        self.0.scheme()
    }

    /// `host:port`, with the scheme's default port when the URL names none (what a TCP probe
    /// dials).
    pub fn host_port(&self) -> Option<String> {
        let host = self.0.host_str()?;
        let port = self.0.port_or_known_default()?;
        Some(format!("{host}:{port}"))
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl PartialEq<&str> for BaseUrl {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The schemes `proxy.upstream_url` accepts.
pub const WEBSOCKET_SCHEMES: &[&str] = &["ws", "wss"];
/// The schemes `lago.api_url` and `steve.api_url` accept.
pub const HTTP_SCHEMES: &[&str] = &["http", "https"];

/// `[reconcile]`: the audit of the bill against SteVe and Lago (`reconcile` command, and a
/// periodic run in the daemon when `interval` is set).
#[derive(Debug, Clone, PartialEq)]
pub struct ReconcileConfig {
    /// How often the daemon audits; `None` (the default, `""` in the file) turns it off.
    pub interval: Option<Duration>,
    /// The window each periodic run audits: sessions stopped in the last `lookback`.
    pub lookback: Duration,
    /// Whether the periodic run queues what is missing (as `reconcile --backfill` does).
    pub backfill: bool,
    /// Sessions that started up to this long before a window are still found in it.
    pub max_session_length: Duration,
}

/// `[steve]`: SteVe's REST API, to recover the start of a session the bridge did not see.
#[derive(Debug, Clone, PartialEq)]
pub struct SteveConfig {
    /// e.g. `http://127.0.0.1:8080/steve`; `None` (`""` in the file) turns recovery off.
    pub api_url: Option<BaseUrl>,
    /// File holding SteVe's legacy API key (SteVe < 3.8, header `STEVE-API-KEY`); `None` means
    /// the `STEVE_API_KEY` environment variable.
    pub api_key_file: Option<PathBuf>,
    /// SteVe ≥ 3.8: the web user with API access (HTTP Basic); never set with `api_key_file`.
    pub api_user: Option<String>,
    /// File holding that user's API password; `None` means the `STEVE_API_PASSWORD` environment
    /// variable.
    pub api_password_file: Option<PathBuf>,
    /// How long one REST request may take.
    pub request_timeout: Duration,
    /// Most lookups in flight at once.
    pub max_concurrent_requests: usize,
    /// Most lookups started per second.
    pub max_requests_per_second: u32,
    /// How long a parked Stop waits for SteVe (with retries) before it is billed as it is,
    /// which makes it a `missing_start` dead letter.
    pub recovery_timeout: Duration,
}

/// `[proxy]`: where chargers connect and where SteVe is.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// Chargers connect to `{path_prefix}/{chargeBoxId}`; no trailing slash.
    pub path_prefix: String,
    /// The bridge dials `{upstream_url}/{chargeBoxId}` (a `ws://` or `wss://` URL).
    pub upstream_url: BaseUrl,
    /// How long SteVe may take to answer our handshake before the charger gets 504.
    pub upstream_handshake_timeout: Duration,
    /// How long a charger may take to send its HTTP upgrade request.
    pub handshake_timeout: Duration,
    /// Largest frame or message accepted from either side (SteVe's own limit is 8 MiB).
    pub max_frame_size: usize,
    /// How often each side is pinged to keep it (and NAT mappings) alive.
    pub ping_interval: Duration,
    /// A side that sent nothing (not even a pong) for `ping_interval + pong_timeout` is dead.
    pub pong_timeout: Duration,
    /// After SIGTERM, how long connected chargers keep being relayed before they get 1001.
    pub shutdown_grace: Duration,
    /// File listing the chargeBoxIds allowed to connect (one per line, `#` comments); reloaded on
    /// SIGHUP. `None`: every id SteVe accepts.
    pub allowlist_file: Option<PathBuf>,
    /// Most chargers connected at once; `None` (`0` in the file) means "what the open-file
    /// limit allows".
    pub max_connections: Option<NonZeroUsize>,
    /// Most connections from one IP address; `None` (`0` in the file) is off (fleets behind
    /// carrier NAT share one).
    pub max_connections_per_ip: Option<NonZeroUsize>,
    /// Most connections whose upgrade request is not complete yet (TLS and HTTP head), counted
    /// apart from `max_connections`; at the cap the oldest of them is closed, never the new one.
    pub max_pending_handshakes: usize,
    /// A charger that sends no frame for this long is closed; `None` (`"0s"`) is off.
    pub idle_timeout: Option<Duration>,
    /// Frames a charger may send per second before it is slowed down (never dropped); `None`
    /// (`0` in the file) is off.
    pub max_messages_per_second: Option<NonZeroU32>,
    /// TLS at the bridge (`wss://`); `None` is plain `ws://`.
    pub tls: Option<TlsConfig>,
    /// Extra CA (PEM) trusted for a `wss://` upstream, beside the system's roots.
    pub upstream_ca_file: Option<PathBuf>,
    /// Proxies in front of the bridge (IPs or CIDRs) whose `X-Forwarded-For/-Proto` are passed
    /// on; anyone else's are replaced, so a charger cannot claim it came over TLS.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// `[lago]`: the Lago events API.
#[derive(Debug, Clone, PartialEq)]
pub struct LagoConfig {
    /// The server root (never ending in `/api/v1`): the client appends `/api/v1/...`.
    pub api_url: BaseUrl,
    /// File holding the API key; `None` means the `LAGO_API_KEY` environment variable.
    pub api_key_file: Option<PathBuf>,
    pub metric_code: String,
    pub batch_max_events: usize,
    pub batch_linger: Duration,
    pub max_requests_per_second: u32,
    pub request_timeout: Duration,
    pub retry_max_delay: Duration,
    /// On SIGTERM, how long the shipper may keep sending before the rest waits for restart.
    pub shutdown_flush_timeout: Duration,
    /// `/readyz` names `lago` while the oldest pending event is older than this.
    pub max_pending_age: Duration,
}

/// `[billing]`: how sessions become Lago events.
#[derive(Debug, Clone, PartialEq)]
pub struct BillingConfig {
    pub mode: BillingMode,
    pub transaction_id: Template,
    pub external_subscription_id: Template,
    pub subscription_map_file: Option<PathBuf>,
    /// A charger timestamp further in the future than this is implausible.
    pub future_timestamp_tolerance: Duration,
    /// A charger timestamp further in the past than this is implausible (a clock that fell
    /// back); offline chargers upload late sessions, hence days, not minutes.
    pub max_clock_lag: Duration,
    /// How `{id_tag}` renders; matching idTags is case-insensitive regardless.
    pub id_tag_case: IdTagCase,
    /// How far meterStart may be from the charger's own Transaction.Begin reading, in Wh.
    pub meter_start_tolerance_wh: u64,
}

/// `[spool]`: the durable SQLite spool.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolConfig {
    pub path: PathBuf,
    /// A billing reply waits at most this long for its record's commit, then is relayed anyway.
    pub hold_timeout: Duration,
    /// Delivered events and their tap records are pruned after this long.
    pub retention: Duration,
    /// Most uncommitted tap records kept in memory while the spool cannot commit.
    pub max_memory_records: usize,
    /// Spool size that must never be reached; alarms start at 80 % of it. Nothing is dropped.
    pub disk_cap_bytes: u64,
    /// Where records go that the spool cannot commit (disk full); `None`: systemd's
    /// `$RUNTIME_DIRECTORY`, else `overflow/` beside the spool (see [`SpoolConfig::overflow_dir`]).
    pub overflow_dir: Option<PathBuf>,
}

impl SpoolConfig {
    /// The overflow directory in effect, given systemd's `$RUNTIME_DIRECTORY` (colon-separated
    /// when the unit names several; the first is ours), and whether it is the last-resort
    /// default beside the spool (on the very disk that may fill up: worth a WARN at start).
    pub fn overflow_dir(&self, runtime_directory: Option<&str>) -> (PathBuf, bool) {
        if let Some(dir) = &self.overflow_dir {
            return (dir.clone(), false);
        }
        if let Some(first) = runtime_directory
            .and_then(|dirs| dirs.split(':').next())
            .filter(|dir| !dir.is_empty())
        {
            return (PathBuf::from(first), false);
        }
        let beside = self.path.parent().unwrap_or(Path::new("."));
        (beside.join("overflow"), true)
    }

    /// The spool of `run --dry-run`: `path` with `.dry-run` before the extension
    /// (`data/spool.db` → `data/spool.dry-run.db`), never the live spool itself.
    pub fn dry_run_path(&self) -> PathBuf {
        let stem = self
            .path
            .file_stem()
            .map_or_else(|| "spool".into(), |s| s.to_string_lossy().into_owned());
        let name = match self.path.extension() {
            Some(ext) => format!("{stem}.dry-run.{}", ext.to_string_lossy()),
            None => format!("{stem}.dry-run"),
        };
        self.path.with_file_name(name)
    }
}

/// `[admin]`: the metrics and health listener.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Allow `listen` on a non-loopback address (metrics and health are not authenticated).
    pub allow_remote: bool,
    /// A client must send a request's complete head within this long (and an idle keep-alive
    /// connection is closed after it), so half-sent requests cannot pile up.
    pub header_timeout: Duration,
    /// Most admin connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// `[log]`: level filter and format.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// A `RUST_LOG`-style filter, e.g. `info,ocpp_lago_bridge::proxy=debug`.
    pub level: String,
    pub format: LogFormat,
}

/// The built-in defaults, the one place they are stated: `reader.rs` falls back to these for
/// every absent key, and `config/ocpp-lago-bridge.toml` documents them (a test holds the two
/// equal).
impl Default for Config {
    fn default() -> Self {
        Config {
            proxy: ProxyConfig {
                listen: "0.0.0.0:8180".parse().expect("literal address"),
                path_prefix: "/steve/websocket/CentralSystemService".into(),
                upstream_url: BaseUrl::literal(
                    "ws://127.0.0.1:8080/steve/websocket/CentralSystemService",
                    WEBSOCKET_SCHEMES,
                ),
                upstream_handshake_timeout: Duration::from_secs(5),
                handshake_timeout: Duration::from_secs(10),
                max_frame_size: 8 << 20,
                ping_interval: Duration::from_secs(30),
                pong_timeout: Duration::from_secs(30),
                shutdown_grace: Duration::from_secs(5),
                allowlist_file: None,
                max_connections: None,
                max_connections_per_ip: None,
                max_pending_handshakes: 1024,
                idle_timeout: None,
                max_messages_per_second: None,
                tls: None,
                upstream_ca_file: None,
                trusted_proxies: Vec::new(),
            },
            lago: LagoConfig {
                api_url: BaseUrl::literal("http://127.0.0.1:3000", HTTP_SCHEMES),
                api_key_file: None,
                metric_code: "charging_energy_kwh".into(),
                batch_max_events: 100,
                batch_linger: Duration::from_secs(1),
                max_requests_per_second: 10,
                request_timeout: Duration::from_secs(30),
                retry_max_delay: Duration::from_secs(10),
                shutdown_flush_timeout: Duration::from_secs(5),
                max_pending_age: Duration::from_secs(15 * 60),
            },
            billing: BillingConfig {
                mode: BillingMode::Session,
                transaction_id: "{transaction_id}".parse().expect("literal template"),
                external_subscription_id: "{id_tag}".parse().expect("literal template"),
                subscription_map_file: None,
                future_timestamp_tolerance: Duration::from_secs(600),
                max_clock_lag: Duration::from_secs(7 * 24 * 3600),
                id_tag_case: IdTagCase::AsSent,
                // The ledger's own default (its tests use it without a config): one value.
                meter_start_tolerance_wh: crate::ledger::DEFAULT_METER_START_TOLERANCE_WH,
            },
            spool: SpoolConfig {
                path: PathBuf::from("data/spool.db"),
                hold_timeout: Duration::from_secs(5),
                retention: Duration::from_secs(30 * 24 * 3600),
                max_memory_records: 100_000,
                disk_cap_bytes: 10 << 30,
                overflow_dir: None,
            },
            admin: AdminConfig {
                listen: "127.0.0.1:9180".parse().expect("literal address"),
                allow_remote: false,
                header_timeout: Duration::from_secs(5),
                max_connections: 64,
            },
            log: LogConfig {
                level: "info".into(),
                format: LogFormat::Json,
            },
            steve: SteveConfig {
                api_url: None,
                api_key_file: None,
                api_user: None,
                api_password_file: None,
                request_timeout: Duration::from_secs(2),
                max_concurrent_requests: 4,
                max_requests_per_second: 10,
                recovery_timeout: Duration::from_secs(300),
            },
            reconcile: ReconcileConfig {
                interval: None,
                lookback: Duration::from_secs(48 * 3600),
                backfill: false,
                max_session_length: Duration::from_secs(7 * 24 * 3600),
            },
        }
    }
}

impl Config {
    /// Rules that tie keys together (each key's own value is checked as it is read): one
    /// problem per broken rule, naming the keys.
    pub fn invariant_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.admin.listen.ip().is_loopback() && !self.admin.allow_remote {
            problems.push(format!(
                "`admin.listen` = \"{}\" is not a loopback address: /metrics and /readyz have no authentication; set `admin.allow_remote = true` to mean it",
                self.admin.listen
            ));
        }
        let steve = &self.steve;
        // SteVe takes one way of authenticating: HTTP Basic (≥ 3.8) or the legacy header key.
        if steve.api_key_file.is_some()
            && (steve.api_user.is_some() || steve.api_password_file.is_some())
        {
            problems.push(
                "`steve.api_key_file` (legacy STEVE-API-KEY header, SteVe < 3.8) and `steve.api_user`/`steve.api_password_file` (HTTP Basic, SteVe >= 3.8) are both set: keep the one your SteVe speaks".into(),
            );
        }
        if steve.api_password_file.is_some() && steve.api_user.is_none() {
            problems.push(
                "`steve.api_password_file` is set without `steve.api_user`: HTTP Basic needs the SteVe web user too".into(),
            );
        }
        if let Some(user) = &steve.api_user
            && user.contains(':')
        {
            // RFC 7617: the user-id of Basic credentials cannot contain a colon (the password can).
            problems.push(
                "`steve.api_user` must not contain `:` (HTTP Basic splits on the first one)".into(),
            );
        }
        if self.reconcile.interval.is_some() && steve.api_url.is_none() {
            problems.push(
                "`reconcile.interval` is set but `steve.api_url` is not: the audit compares the bill with SteVe's sessions, set [steve] api_url and its credentials (or leave the interval out)".into(),
            );
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_is_shown_without_its_trailing_slash() {
        let url = BaseUrl::parse("wss://steve.example/ws/", WEBSOCKET_SCHEMES).unwrap();
        assert_eq!(url.as_str(), "wss://steve.example/ws");
        assert_eq!(format!("{url}/CB1"), "wss://steve.example/ws/CB1");
        assert_eq!(url.host_port().as_deref(), Some("steve.example:443"));
        let root = BaseUrl::parse("http://127.0.0.1:3000", HTTP_SCHEMES).unwrap();
        assert_eq!(format!("{root}/api"), "http://127.0.0.1:3000/api");
        assert_eq!(root.host_port().as_deref(), Some("127.0.0.1:3000"));
        for (bad, schemes) in [
            ("http://steve", WEBSOCKET_SCHEMES),
            ("ws://steve", HTTP_SCHEMES),
            ("http://h/x?y=1", HTTP_SCHEMES),
            ("http://h/x#y", HTTP_SCHEMES),
            ("127.0.0.1:3000", HTTP_SCHEMES),
            ("", HTTP_SCHEMES),
        ] {
            assert!(BaseUrl::parse(bad, schemes).is_err(), "{bad}");
        }
    }
}
