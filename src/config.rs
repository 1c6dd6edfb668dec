//! TOML + flags → a validated [`Config`]. Parsing is two-staged (ripgrep style): the file is read
//! as a plain TOML table, then every key is taken out of it one by one, so that one run reports
//! every problem (unknown keys with their path, wrong types, invalid values) instead of the first.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::ledger::{BillingMode, BillingRules, IdTagCase, SubscriptionMap, Template};
use crate::tls::TlsConfig;
use tokio_tungstenite::tungstenite::http::Uri;

/// The config file used when `--config` is not given; absent means "all defaults".
pub const DEFAULT_CONFIG_PATH: &str = "config/ocpp-lago-bridge.toml";

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

/// `[reconcile]`: the audit of the bill against SteVe and Lago (`reconcile` command, and a
/// periodic run in the daemon when `interval` is set).
#[derive(Debug, Clone, PartialEq)]
pub struct ReconcileConfig {
    /// How often the daemon audits; `None` (the default) turns the periodic run off.
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
    /// e.g. `http://127.0.0.1:8080/steve`; `None` turns recovery off.
    pub api_url: Option<String>,
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
    /// The bridge dials `{upstream_url}/{chargeBoxId}`; no trailing slash.
    pub upstream_url: String,
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
    /// Most chargers connected at once; 0 means "what the open-file limit allows".
    pub max_connections: usize,
    /// Most connections from one IP address; 0 is off (fleets behind carrier NAT share one).
    pub max_connections_per_ip: usize,
    /// Most connections whose upgrade request is not complete yet (TLS and HTTP head), counted
    /// apart from `max_connections`; at the cap the oldest of them is closed, never the new one.
    pub max_pending_handshakes: usize,
    /// A charger that sends no frame for this long is closed; `None` is off.
    pub idle_timeout: Option<Duration>,
    /// Frames a charger may send per second before it is slowed down (never dropped); 0 is off.
    pub max_messages_per_second: u32,
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
    pub api_url: String,
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
        let beside = self.path.parent().unwrap_or(std::path::Path::new("."));
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

impl Default for Config {
    fn default() -> Self {
        Config {
            proxy: ProxyConfig {
                listen: "0.0.0.0:8180".parse().expect("literal address"),
                path_prefix: "/steve/websocket/CentralSystemService".into(),
                upstream_url: "ws://127.0.0.1:8080/steve/websocket/CentralSystemService".into(),
                upstream_handshake_timeout: Duration::from_secs(5),
                handshake_timeout: Duration::from_secs(10),
                max_frame_size: 8 << 20,
                ping_interval: Duration::from_secs(30),
                pong_timeout: Duration::from_secs(30),
                shutdown_grace: Duration::from_secs(5),
                allowlist_file: None,
                max_connections: 0,
                max_connections_per_ip: 0,
                max_pending_handshakes: 1024,
                idle_timeout: None,
                max_messages_per_second: 0,
                tls: None,
                upstream_ca_file: None,
                trusted_proxies: Vec::new(),
            },
            lago: LagoConfig {
                api_url: "http://127.0.0.1:3000".into(),
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

/// A warning when the open-file limit is below what `proxy.max_connections` needs (each
/// charger holds two sockets: its own and SteVe's); `None` when it fits, or when
/// `max_connections` is 0 and so sized from the limit itself.
pub fn fd_limit_warning(max_connections: usize) -> Option<String> {
    let (soft, hard) = open_file_limit()?;
    fd_limit_shortfall(max_connections, soft, hard)
}

fn fd_limit_shortfall(max_connections: usize, soft: u64, hard: u64) -> Option<String> {
    let fit = chargers_within(soft);
    (max_connections as u64 > fit).then(|| {
        format!(
            "`proxy.max_connections` = {max_connections} needs about {} open files, but the open-file limit is {soft} (hard {hard}): room for about {fit} chargers, and those beyond get 503 `fds_exhausted`; raise LimitNOFILE= (systemd) or `ulimit -n`, or lower max_connections",
            (max_connections as u64).saturating_mul(2).saturating_add(64)
        )
    })
}

/// The warning for a secret file (an API key) that users beyond its owner and group may read,
/// or anyone but its owner may write (wider than 0640); `None` when it is private enough or
/// cannot be examined (reading it reports that).
pub fn secret_file_warning(what: &str, path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o137 != 0).then(|| {
        format!(
            "the {what} file {} has mode {mode:04o}: other users can read or change the secret; chmod it 0600 (or 0640 for a service group)",
            path.display()
        )
    })
}

/// The process's open-file limit, (soft, hard).
pub fn open_file_limit() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0)
        .then_some((limit.rlim_cur, limit.rlim_max))
}

/// Chargers that fit in `open_files`: two sockets each, a few files for everything else.
pub fn chargers_within(open_files: u64) -> u64 {
    (open_files.saturating_sub(64) / 2).max(1)
}

/// Every problem found in one config, each naming the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub source: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} problem(s) in the configuration:",
            self.source,
            self.problems.len()
        )?;
        for problem in &self.problems {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A config read as far as it goes, for `check-config`: the values that were valid (defaults
/// where one was not) and every problem found, structural and in the files it names, at once.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Where the text came from (the file, or "built-in defaults").
    pub source: String,
    /// `None` only when there was nothing to read values from (unreadable file, TOML syntax).
    pub config: Option<Config>,
    pub problems: Vec<String>,
}

impl Config {
    /// Loads `path`, or the built-in defaults when `path` is `None` and the default file is absent.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
        let Checked {
            source,
            config,
            problems,
        } = Config::check(path);
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(ConfigErrors { source, problems }),
        }
    }

    /// Reads `path` like [`Config::load`] and reports every problem in one run: the structure
    /// and values, and the files named by whatever values are valid (a typo elsewhere does not
    /// hide a missing file).
    pub fn check(path: Option<&Path>) -> Checked {
        let (source, text) = match path {
            Some(path) => (path.display().to_string(), read(path)),
            None => {
                let default = Path::new(DEFAULT_CONFIG_PATH);
                if !default.exists() {
                    return Checked {
                        source: "built-in defaults".into(),
                        config: Some(Config::default()),
                        problems: Vec::new(),
                    };
                }
                (DEFAULT_CONFIG_PATH.to_string(), read(default))
            }
        };
        let text = match text {
            Ok(text) => text,
            Err(problem) => {
                return Checked {
                    source,
                    config: None,
                    problems: vec![problem],
                };
            }
        };
        let (config, mut problems) = Config::parse_partial(&text);
        if let Some(config) = &config {
            problems.extend(config.file_problems());
        }
        Checked {
            source,
            config,
            problems,
        }
    }

    /// Problems in the files the config names: they are part of it, so a broken map fails
    /// check-config, not a session hours later.
    fn file_problems(&self) -> Vec<String> {
        let mut problems = self.billing_rules().err().unwrap_or_default();
        if let Some(Err(e)) = self.proxy.tls.as_ref().map(crate::tls::server_config) {
            problems.push(e.to_string());
        }
        if let Some(Err(e)) = self
            .proxy
            .upstream_ca_file
            .as_deref()
            .map(|ca| crate::tls::client_config(Some(ca)))
        {
            problems.push(e.to_string());
        }
        if let Some(Err(e)) = self.proxy.allowlist_file.as_deref().map(load_allowlist) {
            problems.push(e);
        }
        problems
    }

    /// The ledger's rules, reading `billing.subscription_map_file` (also on SIGHUP).
    pub fn billing_rules(&self) -> Result<BillingRules, Vec<String>> {
        let subscriptions = match &self.billing.subscription_map_file {
            None => None,
            Some(path) => Some(load_subscription_map(path)?),
        };
        Ok(BillingRules {
            mode: self.billing.mode,
            metric_code: self.lago.metric_code.clone(),
            transaction_id: self.billing.transaction_id.clone(),
            external_subscription_id: self.billing.external_subscription_id.clone(),
            subscriptions,
            future_tolerance_secs: secs(self.billing.future_timestamp_tolerance),
            max_clock_lag_secs: secs(self.billing.max_clock_lag),
            id_tag_case: self.billing.id_tag_case,
            meter_start_tolerance_wh: rust_decimal::Decimal::from(
                self.billing.meter_start_tolerance_wh,
            ),
        })
    }

    /// Parses and validates TOML text, reporting every problem.
    pub fn parse(text: &str) -> Result<Config, Vec<String>> {
        match Config::parse_partial(text) {
            (Some(config), problems) if problems.is_empty() => Ok(config),
            (_, problems) => Err(problems),
        }
    }

    /// Like [`Config::parse`], but also returns the values read so far (defaults where a value
    /// was invalid); `None` only for a TOML syntax error.
    fn parse_partial(text: &str) -> (Option<Config>, Vec<String>) {
        // The parser's message quotes the offending line, which may hold a pasted secret: say
        // where the error is instead.
        let table: toml::Table = match toml::from_str(text) {
            Ok(table) => table,
            Err(e) => {
                let line = e.span().map_or(0, |span| {
                    text[..span.start.min(text.len())].matches('\n').count() + 1
                });
                return (
                    None,
                    vec![format!("TOML syntax error on line {line}: {}", e.message())],
                );
            }
        };
        let mut reader = Reader {
            table,
            problems: Vec::new(),
        };
        let config = reader.read_all();
        (Some(config), reader.problems)
    }
}

/// Reads an id_tag → external_subscription_id map: CSV unless the file name ends in `.toml`.
pub fn load_subscription_map(path: &Path) -> Result<SubscriptionMap, Vec<String>> {
    let name = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![format!(
            "`billing.subscription_map_file`: cannot read {name}: {e}"
        )]
    })?;
    let parsed = if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
    {
        SubscriptionMap::from_toml(&text)
    } else {
        SubscriptionMap::from_csv(&text)
    };
    parsed.map_err(|errors| {
        errors
            .into_iter()
            .map(|e| format!("`billing.subscription_map_file` {name}: {e}"))
            .collect()
    })
}

/// Reads the chargeBoxId allowlist: one id per line, blank lines and `#` comments ignored.
pub fn load_allowlist(path: &Path) -> Result<std::collections::HashSet<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "`proxy.allowlist_file`: cannot read {}: {e}",
            path.display()
        )
    })?;
    Ok(text
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .collect())
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read the config file: {e}"))
}

/// Takes keys out of the TOML table, recording a problem per bad or unknown key.
struct Reader {
    table: toml::Table,
    problems: Vec<String>,
}

impl Reader {
    fn read_all(&mut self) -> Config {
        let d = Config::default();
        let known_sections = [
            "proxy",
            "lago",
            "billing",
            "spool",
            "admin",
            "log",
            "steve",
            "reconcile",
        ];
        for (name, value) in &self.table {
            if !known_sections.contains(&name.as_str()) {
                self.problems.push(format!("unknown key `{name}`"));
            } else if !value.is_table() {
                self.problems
                    .push(format!("`{name}` must be a table (a [{name}] section)"));
            }
        }

        let proxy = ProxyConfig {
            listen: self.addr("proxy", "listen", d.proxy.listen),
            path_prefix: self.path_prefix(d.proxy.path_prefix),
            upstream_url: self.url(
                "proxy",
                "upstream_url",
                &["ws", "wss"],
                d.proxy.upstream_url,
            ),
            upstream_handshake_timeout: self.duration(
                "proxy",
                "upstream_handshake_timeout",
                d.proxy.upstream_handshake_timeout,
            ),
            handshake_timeout: self.duration(
                "proxy",
                "handshake_timeout",
                d.proxy.handshake_timeout,
            ),
            max_frame_size: self.bounded(
                "proxy",
                "max_frame_size",
                d.proxy.max_frame_size,
                1024..=(256 << 20),
            ),
            ping_interval: self.duration("proxy", "ping_interval", d.proxy.ping_interval),
            pong_timeout: self.duration("proxy", "pong_timeout", d.proxy.pong_timeout),
            shutdown_grace: self.duration_allow_zero(
                "proxy",
                "shutdown_grace",
                d.proxy.shutdown_grace,
            ),
            allowlist_file: self.optional_path("proxy", "allowlist_file"),
            max_connections: self.bounded("proxy", "max_connections", 0, 0..=10_000_000),
            max_connections_per_ip: self.bounded(
                "proxy",
                "max_connections_per_ip",
                0,
                0..=10_000_000,
            ),
            max_pending_handshakes: self.bounded(
                "proxy",
                "max_pending_handshakes",
                d.proxy.max_pending_handshakes,
                1..=10_000_000,
            ),
            idle_timeout: Some(self.duration_allow_zero("proxy", "idle_timeout", Duration::ZERO))
                .filter(|d| !d.is_zero()),
            max_messages_per_second: self.bounded(
                "proxy",
                "max_messages_per_second",
                0,
                0..=1_000_000,
            ) as u32,
            tls: self.tls(),
            upstream_ca_file: self.optional_path("proxy", "upstream_ca_file"),
            trusted_proxies: self.networks("proxy", "trusted_proxies"),
        };
        let lago = LagoConfig {
            api_url: self.lago_api_url(d.lago.api_url),
            api_key_file: self.optional_path("lago", "api_key_file"),
            metric_code: self.non_empty("lago", "metric_code", d.lago.metric_code),
            batch_max_events: self.bounded(
                "lago",
                "batch_max_events",
                d.lago.batch_max_events,
                1..=10_000,
            ),
            batch_linger: self.duration_allow_zero("lago", "batch_linger", d.lago.batch_linger),
            max_requests_per_second: self.bounded(
                "lago",
                "max_requests_per_second",
                d.lago.max_requests_per_second as usize,
                1..=100_000,
            ) as u32,
            request_timeout: self.duration("lago", "request_timeout", d.lago.request_timeout),
            retry_max_delay: self.duration("lago", "retry_max_delay", d.lago.retry_max_delay),
            shutdown_flush_timeout: self.duration_allow_zero(
                "lago",
                "shutdown_flush_timeout",
                d.lago.shutdown_flush_timeout,
            ),
            max_pending_age: self.duration("lago", "max_pending_age", d.lago.max_pending_age),
        };
        let billing = BillingConfig {
            mode: self.mode(d.billing.mode),
            transaction_id: self.template("transaction_id", d.billing.transaction_id.clone()),
            external_subscription_id: self.template(
                "external_subscription_id",
                d.billing.external_subscription_id,
            ),
            subscription_map_file: self.optional_path("billing", "subscription_map_file"),
            future_timestamp_tolerance: self.duration(
                "billing",
                "future_timestamp_tolerance",
                d.billing.future_timestamp_tolerance,
            ),
            max_clock_lag: self.duration("billing", "max_clock_lag", d.billing.max_clock_lag),
            id_tag_case: self.id_tag_case(d.billing.id_tag_case),
            meter_start_tolerance_wh: self
                .meter_start_tolerance(d.billing.meter_start_tolerance_wh),
        };
        let spool = SpoolConfig {
            path: self.optional_path("spool", "path").unwrap_or(d.spool.path),
            hold_timeout: self.duration("spool", "hold_timeout", d.spool.hold_timeout),
            retention: self.duration("spool", "retention", d.spool.retention),
            max_memory_records: self.bounded(
                "spool",
                "max_memory_records",
                d.spool.max_memory_records,
                1..=10_000_000,
            ),
            disk_cap_bytes: self.bounded(
                "spool",
                "disk_cap_bytes",
                d.spool.disk_cap_bytes as usize,
                (1 << 20)..=usize::MAX,
            ) as u64,
            overflow_dir: self.optional_path("spool", "overflow_dir"),
        };
        let admin = AdminConfig {
            listen: self.addr("admin", "listen", d.admin.listen),
            allow_remote: self
                .take::<bool>("admin", "allow_remote", "true or false")
                .unwrap_or(d.admin.allow_remote),
            header_timeout: self.duration("admin", "header_timeout", d.admin.header_timeout),
            max_connections: self.bounded(
                "admin",
                "max_connections",
                d.admin.max_connections,
                1..=100_000,
            ),
        };
        if !admin.listen.ip().is_loopback() && !admin.allow_remote {
            self.problems.push(format!(
                "`admin.listen` = \"{}\" is not a loopback address: /metrics and /readyz have no authentication; set `admin.allow_remote = true` to mean it",
                admin.listen
            ));
        }
        let log = LogConfig {
            level: self.log_level(d.log.level),
            format: self.log_format(d.log.format),
        };
        let steve = SteveConfig {
            api_url: self
                .take::<String>("steve", "api_url", "a URL string")
                .filter(|url| !url.is_empty())
                .and_then(|url| self.check_url("steve", "api_url", &["http", "https"], &url)),
            api_key_file: self.optional_path("steve", "api_key_file"),
            api_user: self
                .take::<String>("steve", "api_user", "a user name string")
                .filter(|user| !user.is_empty()),
            api_password_file: self.optional_path("steve", "api_password_file"),
            request_timeout: self.duration("steve", "request_timeout", d.steve.request_timeout),
            max_concurrent_requests: self.bounded(
                "steve",
                "max_concurrent_requests",
                d.steve.max_concurrent_requests,
                1..=1024,
            ),
            max_requests_per_second: self.bounded(
                "steve",
                "max_requests_per_second",
                d.steve.max_requests_per_second as usize,
                1..=100_000,
            ) as u32,
            recovery_timeout: self.duration("steve", "recovery_timeout", d.steve.recovery_timeout),
        };
        self.check_steve_auth(&steve);
        let reconcile = ReconcileConfig {
            interval: self
                .take::<String>(
                    "reconcile",
                    "interval",
                    "a duration string like \"1h\" (or \"\" for off)",
                )
                .filter(|text| !text.is_empty())
                .and_then(|text| match humantime::parse_duration(&text) {
                    Ok(d) if !d.is_zero() => Some(d),
                    _ => {
                        self.problems.push(format!(
                            "`reconcile.interval` = {text:?} is not a duration longer than zero; write e.g. \"1h\", or leave it out (off)"
                        ));
                        None
                    }
                }),
            lookback: self.duration("reconcile", "lookback", d.reconcile.lookback),
            backfill: self
                .take::<bool>("reconcile", "backfill", "true or false")
                .unwrap_or(d.reconcile.backfill),
            max_session_length: self.duration(
                "reconcile",
                "max_session_length",
                d.reconcile.max_session_length,
            ),
        };
        if reconcile.interval.is_some() && steve.api_url.is_none() {
            self.problems.push(
                "`reconcile.interval` is set but `steve.api_url` is not: the audit compares the bill with SteVe's sessions, set [steve] api_url and its credentials (or leave the interval out)".into(),
            );
        }
        self.reject_unknown_keys();
        Config {
            reconcile,
            steve,
            proxy,
            lago,
            billing,
            spool,
            admin,
            log,
        }
    }

    /// SteVe takes one way of authenticating: HTTP Basic (≥ 3.8) or the legacy header key.
    fn check_steve_auth(&mut self, steve: &SteveConfig) {
        if steve.api_key_file.is_some()
            && (steve.api_user.is_some() || steve.api_password_file.is_some())
        {
            self.problems.push(
                "`steve.api_key_file` (legacy STEVE-API-KEY header, SteVe < 3.8) and `steve.api_user`/`steve.api_password_file` (HTTP Basic, SteVe >= 3.8) are both set: keep the one your SteVe speaks".into(),
            );
        }
        if steve.api_password_file.is_some() && steve.api_user.is_none() {
            self.problems.push(
                "`steve.api_password_file` is set without `steve.api_user`: HTTP Basic needs the SteVe web user too".into(),
            );
        }
        if let Some(user) = &steve.api_user
            && user.contains(':')
        {
            // RFC 7617: the user-id of Basic credentials cannot contain a colon (the password can).
            self.problems.push(
                "`steve.api_user` must not contain `:` (HTTP Basic splits on the first one)".into(),
            );
        }
    }

    /// Removes `section.key` from the table and deserialises it; `None` when absent or wrong.
    fn take<T: DeserializeOwned>(&mut self, section: &str, key: &str, expected: &str) -> Option<T> {
        let value = self.table.get_mut(section)?.as_table_mut()?.remove(key)?;
        match value.clone().try_into::<T>() {
            Ok(v) => Some(v),
            Err(_) => {
                self.problems.push(format!(
                    "`{section}.{key}` must be {expected}, found {}",
                    value.type_str()
                ));
                None
            }
        }
    }

    fn reject_unknown_keys(&mut self) {
        for (section, value) in &self.table {
            if let Some(table) = value.as_table() {
                for key in table.keys() {
                    self.problems.push(format!("unknown key `{section}.{key}`"));
                }
            }
        }
    }

    fn tls(&mut self) -> Option<TlsConfig> {
        let mut table = self.take::<toml::Table>("proxy", "tls", "a table ([proxy.tls])")?;
        let mut path = |key: &str, problems: &mut Vec<String>| match table.remove(key) {
            Some(toml::Value::String(p)) if !p.is_empty() => Some(PathBuf::from(p)),
            None => None,
            Some(other) => {
                problems.push(format!(
                    "`proxy.tls.{key}` must be a file path string, found {}",
                    other.type_str()
                ));
                None
            }
        };
        let cert_file = path("cert_file", &mut self.problems);
        let key_file = path("key_file", &mut self.problems);
        let client_ca_file = path("client_ca_file", &mut self.problems);
        for key in table.keys() {
            self.problems.push(format!("unknown key `proxy.tls.{key}`"));
        }
        match (cert_file, key_file) {
            (Some(cert_file), Some(key_file)) => Some(TlsConfig {
                cert_file,
                key_file,
                client_ca_file,
            }),
            _ => {
                self.problems
                    .push("`[proxy.tls]` needs both `cert_file` and `key_file`".into());
                None
            }
        }
    }

    fn networks(&mut self, section: &str, key: &str) -> Vec<ipnet::IpNet> {
        let entries = self
            .take::<Vec<String>>(section, key, "a list of IP addresses or CIDRs")
            .unwrap_or_default();
        let mut networks = Vec::new();
        for entry in entries {
            let parsed = entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => networks.push(net),
                Err(_) => self.problems.push(format!(
                    "`{section}.{key}`: {entry:?} is not an IP address or CIDR (e.g. \"127.0.0.1\", \"10.0.0.0/8\")"
                )),
            }
        }
        networks
    }

    fn addr(&mut self, section: &str, key: &str, default: SocketAddr) -> SocketAddr {
        let Some(text) = self.take::<String>(section, key, "a string like \"127.0.0.1:8180\"")
        else {
            return default;
        };
        text.parse().unwrap_or_else(|_| {
            self.problems.push(format!(
                "`{section}.{key}` = {text:?} is not an IP address with a port (e.g. \"0.0.0.0:8180\")"
            ));
            default
        })
    }

    fn path_prefix(&mut self, default: String) -> String {
        let Some(text) = self.take::<String>("proxy", "path_prefix", "a string") else {
            return default;
        };
        let trimmed = text.trim_end_matches('/').to_string();
        if !text.starts_with('/') || text.contains(['?', '#', ' ']) {
            self.problems.push(format!(
                "`proxy.path_prefix` = {text:?} must be an absolute URL path such as \"/steve/websocket/CentralSystemService\""
            ));
            return default;
        }
        trimmed
    }

    fn url(&mut self, section: &str, key: &str, schemes: &[&str], default: String) -> String {
        self.take::<String>(section, key, "a URL string")
            .and_then(|text| self.check_url(section, key, schemes, &text))
            .unwrap_or(default)
    }

    /// `lago.api_url`: the server root. The bridge appends `/api/v1/...` itself, so a URL
    /// ending in `/api/v1` (the OpenAPI spec's server URL) would reach `/api/v1/api/v1/...`,
    /// where every route is 404.
    fn lago_api_url(&mut self, default: String) -> String {
        let url = self.url("lago", "api_url", &["http", "https"], default.clone());
        let path = url
            .parse::<Uri>()
            .map(|uri| uri.path().trim_end_matches('/').to_ascii_lowercase())
            .unwrap_or_default();
        if path.ends_with("/api/v1") {
            self.problems.push(format!(
                "`lago.api_url` = {url:?} ends in /api/v1: give the Lago server root (e.g. {:?}); the bridge appends /api/v1 itself",
                &url[..url.len() - "/api/v1".len()]
            ));
            return default;
        }
        url
    }

    /// `text` without a trailing slash if it is a URL of one of `schemes` with a host.
    fn check_url(
        &mut self,
        section: &str,
        key: &str,
        schemes: &[&str],
        text: &str,
    ) -> Option<String> {
        let valid = text.parse::<Uri>().ok().filter(|uri| {
            uri.scheme_str().is_some_and(|s| schemes.contains(&s))
                && uri.host().is_some_and(|h| !h.is_empty())
                && uri.query().is_none()
        });
        if valid.is_none() {
            self.problems.push(format!(
                "`{section}.{key}` = {text:?} is not a {} URL with a host and no query",
                schemes.join("/")
            ));
        }
        valid.map(|_| text.trim_end_matches('/').to_string())
    }

    fn duration(&mut self, section: &str, key: &str, default: Duration) -> Duration {
        let d = self.duration_allow_zero(section, key, default);
        if d.is_zero() {
            self.problems
                .push(format!("`{section}.{key}` must be longer than zero"));
            return default;
        }
        d
    }

    fn duration_allow_zero(&mut self, section: &str, key: &str, default: Duration) -> Duration {
        let Some(text) =
            self.take::<String>(section, key, "a duration string like \"1s\" or \"250ms\"")
        else {
            return default;
        };
        humantime::parse_duration(&text).unwrap_or_else(|e| {
            self.problems.push(format!(
                "`{section}.{key}` = {text:?} is not a duration ({e}); write e.g. \"1s\", \"250ms\", \"5m\""
            ));
            default
        })
    }

    fn bounded(
        &mut self,
        section: &str,
        key: &str,
        default: usize,
        range: std::ops::RangeInclusive<usize>,
    ) -> usize {
        let Some(n) = self.take::<i64>(section, key, "an integer") else {
            return default;
        };
        match usize::try_from(n) {
            Ok(n) if range.contains(&n) => n,
            _ => {
                self.problems.push(format!(
                    "`{section}.{key}` = {n} is out of range {}..={}",
                    range.start(),
                    range.end()
                ));
                default
            }
        }
    }

    fn non_empty(&mut self, section: &str, key: &str, default: String) -> String {
        let Some(text) = self.take::<String>(section, key, "a string") else {
            return default;
        };
        if text.trim().is_empty() {
            self.problems
                .push(format!("`{section}.{key}` must not be empty"));
            return default;
        }
        text
    }

    fn optional_path(&mut self, section: &str, key: &str) -> Option<PathBuf> {
        let text = self.take::<String>(section, key, "a file path string")?;
        (!text.is_empty()).then(|| PathBuf::from(text))
    }

    fn mode(&mut self, default: BillingMode) -> BillingMode {
        match self
            .take::<String>("billing", "mode", "\"session\" or \"incremental\"")
            .as_deref()
        {
            None => default,
            Some("session") => BillingMode::Session,
            Some("incremental") => BillingMode::Incremental,
            Some(other) => {
                self.problems.push(format!(
                    "`billing.mode` = {other:?} must be \"session\" or \"incremental\""
                ));
                default
            }
        }
    }

    fn id_tag_case(&mut self, default: IdTagCase) -> IdTagCase {
        let expected = "\"as_sent\", \"upper\" or \"lower\"";
        match self
            .take::<String>("billing", "id_tag_case", expected)
            .as_deref()
        {
            None => default,
            Some("as_sent") => IdTagCase::AsSent,
            Some("upper") => IdTagCase::Upper,
            Some("lower") => IdTagCase::Lower,
            Some(other) => {
                self.problems.push(format!(
                    "`billing.id_tag_case` = {other:?} must be {expected}"
                ));
                default
            }
        }
    }

    fn meter_start_tolerance(&mut self, default: u64) -> u64 {
        let Some(n) = self.take::<i64>("billing", "meter_start_tolerance", "an integer (Wh)")
        else {
            return default;
        };
        // Beyond a megawatt-hour the check would catch nothing a charger gets wrong.
        match u64::try_from(n) {
            Ok(n) if n <= 1_000_000 => n,
            _ => {
                self.problems.push(format!(
                    "`billing.meter_start_tolerance` = {n} Wh is out of range 0..=1000000"
                ));
                default
            }
        }
    }

    fn template(&mut self, key: &str, default: Template) -> Template {
        let Some(text) = self.take::<String>("billing", key, "a template string") else {
            return default;
        };
        match text.parse::<Template>() {
            // A constant subscription is a valid site setup; a constant Lago transaction_id
            // would make every session after the first a duplicate.
            Ok(template) if key == "transaction_id" && template.is_constant() => {
                self.problems.push(format!(
                    "`billing.{key}` = {text:?} uses no placeholder: every session would get the same Lago transaction_id"
                ));
                default
            }
            Ok(template) => template,
            Err(e) => {
                self.problems
                    .push(format!("`billing.{key}` = {text:?}: {e}"));
                default
            }
        }
    }

    fn log_level(&mut self, default: String) -> String {
        let Some(text) = self.take::<String>("log", "level", "a filter string like \"info\"")
        else {
            return default;
        };
        match tracing_subscriber::EnvFilter::builder().parse(&text) {
            Ok(_) => text,
            Err(e) => {
                self.problems
                    .push(format!("`log.level` = {text:?} is not a valid filter: {e}"));
                default
            }
        }
    }

    fn log_format(&mut self, default: LogFormat) -> LogFormat {
        match self
            .take::<String>("log", "format", "\"json\" or \"text\"")
            .as_deref()
        {
            None => default,
            Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(other) => {
                self.problems.push(format!(
                    "`log.format` = {other:?} must be \"json\" or \"text\""
                ));
                default
            }
        }
    }
}

/// A duration in whole seconds as the ledger's i64 (saturating: no config can overflow it).
fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_documented_example_parses() {
        let text = std::fs::read_to_string(DEFAULT_CONFIG_PATH).unwrap();
        assert_eq!(Config::parse(&text).unwrap(), Config::default());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            colour = "blue"
            [proxy]
            listen = "nowhere"
            upstream_url = "http://steve"
            extra = 1
            [lago]
            batch_linger = "soon"
            batch_max_events = 0
            max_requests_per_second = "ten"
            [billing]
            mode = "hourly"
            transaction_id = "{session}"
            [admin]
            listen = "0.0.0.0:9180"
        "#;
        let problems = Config::parse(text).unwrap_err();
        let expected = [
            "unknown key `colour`",
            "`proxy.listen`",
            "`admin.listen`",
            "`proxy.upstream_url`",
            "unknown key `proxy.extra`",
            "`lago.batch_linger`",
            "`lago.batch_max_events`",
            "`lago.max_requests_per_second`",
            "`billing.mode`",
            "`billing.transaction_id`",
        ];
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
        for needle in expected {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "no problem mentions {needle}: {problems:#?}"
            );
        }
    }

    #[test]
    fn reconcile_is_off_by_default_and_reads_its_keys() {
        let d = Config::parse("").unwrap().reconcile;
        assert_eq!(d.interval, None);
        assert_eq!(d.lookback, Duration::from_secs(48 * 3600));
        assert!(!d.backfill);
        assert_eq!(d.max_session_length, Duration::from_secs(7 * 24 * 3600));
        let problems = Config::parse("[reconcile]\ninterval = \"1h\"\n").unwrap_err();
        assert!(problems[0].contains("steve.api_url"), "{problems:?}");
        let set = Config::parse(
            "[steve]\napi_url = \"http://127.0.0.1:8080/steve\"\n[reconcile]\ninterval = \"1h\"\nlookback = \"6h\"\nbackfill = true\nmax_session_length = \"2days\"\n",
        )
        .unwrap()
        .reconcile;
        assert_eq!(set.interval, Some(Duration::from_secs(3600)));
        assert_eq!(set.lookback, Duration::from_secs(6 * 3600));
        assert!(set.backfill);
        assert_eq!(set.max_session_length, Duration::from_secs(2 * 86_400));
        assert_eq!(
            Config::parse("[reconcile]\ninterval = \"\"\n")
                .unwrap()
                .reconcile
                .interval,
            None
        );
        for bad in [
            "[reconcile]\ninterval = \"0s\"\n",
            "[reconcile]\ninterval = \"often\"\n",
            "[reconcile]\nbackfill = \"yes\"\n",
            "[reconcile]\nlookback = \"0s\"\n",
            "[reconcile]\nwindow = \"1h\"\n",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn steve_takes_basic_auth_or_the_legacy_key_never_both() {
        let both = Config::parse(
            r#"
            [steve]
            api_url = "http://127.0.0.1:8080/steve"
            api_user = "bridge"
            api_password_file = "/run/steve-password"
            api_key_file = "/run/steve-key"
        "#,
        )
        .unwrap_err();
        assert_eq!(both.len(), 1, "{both:?}");
        assert!(both[0].contains("both set"), "{both:?}");
        let problems = Config::parse("[steve]\napi_password_file = \"/p\"\n").unwrap_err();
        assert!(
            problems[0].contains("without `steve.api_user`"),
            "{problems:?}"
        );
        let problems = Config::parse("[steve]\napi_user = \"a:b\"\n").unwrap_err();
        assert!(problems[0].contains("must not contain `:`"), "{problems:?}");
        let basic = Config::parse(
            "[steve]\napi_url = \"http://h/steve\"\napi_user = \"bridge\"\nmax_concurrent_requests = 2\nrecovery_timeout = \"30s\"\n",
        )
        .unwrap();
        assert_eq!(basic.steve.api_user.as_deref(), Some("bridge"));
        assert_eq!(basic.steve.max_concurrent_requests, 2);
        assert_eq!(basic.steve.recovery_timeout, Duration::from_secs(30));
    }

    #[test]
    fn a_secret_file_wider_than_0640_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "secret-value").unwrap();
        for (mode, warned) in [
            (0o600, false),
            (0o640, false),
            (0o400, false),
            (0o644, true),
            (0o660, true),
            (0o604, true),
        ] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let warning = secret_file_warning("Lago API key", &key);
            assert_eq!(warning.is_some(), warned, "{mode:o}: {warning:?}");
            assert!(!warning.unwrap_or_default().contains("secret-value"));
        }
    }

    #[test]
    fn the_dry_run_spool_sits_beside_the_live_one_under_another_name() {
        let spool = |path: &str| SpoolConfig {
            path: PathBuf::from(path),
            ..Config::default().spool
        };
        for (live, dry) in [
            ("data/spool.db", "data/spool.dry-run.db"),
            (
                "/var/lib/x/spool.sqlite3",
                "/var/lib/x/spool.dry-run.sqlite3",
            ),
            ("spool", "spool.dry-run"),
            ("/srv/.spool", "/srv/.spool.dry-run"),
        ] {
            let config = spool(live);
            assert_eq!(config.dry_run_path(), PathBuf::from(dry), "{live}");
            assert_ne!(config.dry_run_path(), config.path);
        }
    }

    #[test]
    fn the_fd_limit_warns_only_when_max_connections_does_not_fit() {
        // 1024 descriptors: (1024 - 64) / 2 = 480 chargers.
        assert_eq!(fd_limit_shortfall(480, 1024, 4096), None);
        assert_eq!(fd_limit_shortfall(0, 1024, 4096), None);
        let warning = fd_limit_shortfall(481, 1024, 4096).unwrap();
        assert!(
            warning.contains("`proxy.max_connections` = 481"),
            "{warning}"
        );
        assert!(warning.contains("about 480 chargers"), "{warning}");
        // 0 means "what the limit allows": nothing to warn about, whatever the limit.
        assert_eq!(fd_limit_shortfall(0, 1024, 1024), None);
        assert_eq!(fd_limit_shortfall(100, 1024, 4096), None);
        assert_eq!(fd_limit_shortfall(480, 1024, 4096), None);
        let warning = fd_limit_shortfall(5000, 1024, 4096).expect("5000 chargers do not fit");
        assert!(
            warning.contains("5000") && warning.contains("1024"),
            "{warning}"
        );
    }

    #[test]
    fn check_reports_missing_files_together_with_structural_errors() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("bridge.toml");
        std::fs::write(
            &config,
            format!(
                "[proxy]\nlisten = \"nowhere\"\nallowlist_file = \"{0}/no-allowlist\"\n[billing]\nmode = \"weekly\"\nsubscription_map_file = \"{0}/no-map.csv\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let checked = Config::check(Some(&config));
        let problems = checked.problems;
        for needle in [
            "`proxy.listen`",
            "`billing.mode`",
            "proxy.allowlist_file",
            "billing.subscription_map_file",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "no problem mentions {needle}: {problems:#?}"
            );
        }
        assert_eq!(problems.len(), 4, "{problems:#?}");
    }

    #[test]
    fn a_syntax_error_names_the_line_not_its_text() {
        let problems = Config::parse("[lago]\napi_key = \"sk-secret-123\" oops\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("line 2"), "{problems:?}");
        assert!(!problems[0].contains("sk-secret-123"), "{problems:?}");
    }

    #[test]
    fn values_are_read() {
        let config = Config::parse(
            r#"
            [proxy]
            listen = "127.0.0.1:1"
            path_prefix = "/ocpp/"
            upstream_url = "wss://steve.example/ws/"
            ping_interval = "250ms"
            [billing]
            mode = "incremental"
            transaction_id = "{charge_box_id}-{transaction_id}-{started_at}"
            [log]
            format = "text"
            level = "debug,hyper=warn"
        "#,
        )
        .unwrap();
        assert_eq!(config.proxy.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(config.proxy.path_prefix, "/ocpp");
        assert_eq!(config.proxy.upstream_url, "wss://steve.example/ws");
        assert_eq!(config.proxy.ping_interval, Duration::from_millis(250));
        assert_eq!(config.billing.mode, BillingMode::Incremental);
        assert_eq!(config.log.format, LogFormat::Text);
    }

    #[test]
    fn field_billing_keys() {
        let config = Config::parse(
            r#"
            [billing]
            max_clock_lag = "2days"
            id_tag_case = "upper"
            meter_start_tolerance = 250
        "#,
        )
        .unwrap();
        let rules = config.billing_rules().unwrap();
        assert_eq!(rules.max_clock_lag_secs, 2 * 86_400);
        assert_eq!(rules.id_tag_case, IdTagCase::Upper);
        assert_eq!(
            rules.meter_start_tolerance_wh,
            rust_decimal::Decimal::from(250)
        );
        let defaults = Config::default().billing_rules().unwrap();
        assert_eq!(defaults.max_clock_lag_secs, 7 * 86_400);
        assert_eq!(defaults.future_tolerance_secs, 600);
        assert_eq!(defaults.id_tag_case, IdTagCase::AsSent);
        let problems = Config::parse(
            r#"
            [billing]
            max_clock_lag = "0s"
            id_tag_case = "title"
            meter_start_tolerance = -1
        "#,
        )
        .unwrap_err();
        for needle in [
            "`billing.max_clock_lag`",
            "`billing.id_tag_case`",
            "`billing.meter_start_tolerance`",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "no problem mentions {needle}: {problems:#?}"
            );
        }
        assert_eq!(problems.len(), 3, "{problems:#?}");
    }
}
