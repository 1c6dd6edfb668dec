//! The TOML reader: the file is parsed as a plain TOML table, then every key is taken out of it
//! one by one (ripgrep's two stages), each checked on its own and named by its path in any
//! problem, so that one run reports every problem (unknown keys, wrong types, invalid values)
//! instead of the first. An absent key takes its default from [`Config::default`]; the
//! spellings of "off" that files use (`0`, `"0s"`, `""`) are read into `None`.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::model::{
    AdminConfig, BaseUrl, BillingConfig, Config, HTTP_SCHEMES, LagoConfig, LogConfig, LogFormat,
    ProxyConfig, ReconcileConfig, SpoolConfig, SteveConfig, WEBSOCKET_SCHEMES,
};
use crate::ledger::{BillingMode, IdTagCase, Template};
use crate::tls::TlsConfig;

/// Reads TOML text into a config, with every problem found; the config is `None` only for a
/// TOML syntax error (there is nothing to read values from), else it holds the valid values
/// and defaults where a value was not.
pub fn read(text: &str) -> (Option<Config>, Vec<String>) {
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
        asked: Vec::new(),
    };
    let config = reader.read_all();
    (Some(config), reader.problems)
}

/// Every key the reader knows, as `section.key` (for the test that the example file documents
/// each of them).
#[cfg(test)]
pub fn known_keys() -> Vec<String> {
    let mut reader = Reader {
        table: toml::Table::new(),
        problems: Vec::new(),
        asked: Vec::new(),
    };
    reader.read_all();
    reader.asked
}

/// Takes keys out of the TOML table, recording a problem per bad or unknown key.
struct Reader {
    table: toml::Table,
    problems: Vec<String>,
    /// Every `section.key` asked for, present or not.
    asked: Vec<String>,
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
                WEBSOCKET_SCHEMES,
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
            max_connections: self.count_or_off(
                "proxy",
                "max_connections",
                d.proxy.max_connections,
                10_000_000,
            ),
            max_connections_per_ip: self.count_or_off(
                "proxy",
                "max_connections_per_ip",
                d.proxy.max_connections_per_ip,
                10_000_000,
            ),
            max_pending_handshakes: self.bounded(
                "proxy",
                "max_pending_handshakes",
                d.proxy.max_pending_handshakes,
                1..=10_000_000,
            ),
            idle_timeout: self.duration_or_off("proxy", "idle_timeout", d.proxy.idle_timeout),
            max_messages_per_second: self
                .count_or_off(
                    "proxy",
                    "max_messages_per_second",
                    d.proxy
                        .max_messages_per_second
                        .and_then(|n| NonZeroUsize::try_from(n).ok()),
                    1_000_000,
                )
                // At most 1_000_000: it fits.
                .and_then(|n| NonZeroU32::try_from(n).ok()),
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
            mode: self.choice(
                "billing",
                "mode",
                &[
                    ("session", BillingMode::Session),
                    ("incremental", BillingMode::Incremental),
                ],
                d.billing.mode,
            ),
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
            id_tag_case: self.choice(
                "billing",
                "id_tag_case",
                &[
                    ("as_sent", IdTagCase::AsSent),
                    ("upper", IdTagCase::Upper),
                    ("lower", IdTagCase::Lower),
                ],
                d.billing.id_tag_case,
            ),
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
            overflow_dir: self
                .optional_path("spool", "overflow_dir")
                .or(d.spool.overflow_dir),
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
        let log = LogConfig {
            level: self.log_level(d.log.level),
            format: self.choice(
                "log",
                "format",
                &[("json", LogFormat::Json), ("text", LogFormat::Text)],
                d.log.format,
            ),
        };
        let steve = SteveConfig {
            api_url: self.optional_url("steve", "api_url", HTTP_SCHEMES),
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
                })
                .or(d.reconcile.interval),
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

    /// Removes `section.key` from the table and deserialises it; `None` when absent or wrong.
    fn take<T: DeserializeOwned>(&mut self, section: &str, key: &str, expected: &str) -> Option<T> {
        self.asked.push(format!("{section}.{key}"));
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

    /// A key whose value is one of a few words: the word's variant, or a problem naming them all.
    fn choice<T: Copy>(&mut self, section: &str, key: &str, words: &[(&str, T)], default: T) -> T {
        let expected = words
            .iter()
            .map(|(word, _)| format!("{word:?}"))
            .collect::<Vec<_>>();
        let expected = match expected.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        let Some(word) = self.take::<String>(section, key, &expected) else {
            return default;
        };
        match words.iter().find(|(w, _)| *w == word) {
            Some((_, value)) => *value,
            None => {
                self.problems
                    .push(format!("`{section}.{key}` = {word:?} must be {expected}"));
                default
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
        self.asked.extend(
            ["cert_file", "key_file", "client_ca_file"].map(|key| format!("proxy.tls.{key}")),
        );
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

    fn url(&mut self, section: &str, key: &str, schemes: &[&str], default: BaseUrl) -> BaseUrl {
        self.take::<String>(section, key, "a URL string")
            .and_then(|text| self.check_url(section, key, schemes, &text))
            .unwrap_or(default)
    }

    /// A URL whose absence, or `""`, is off.
    fn optional_url(&mut self, section: &str, key: &str, schemes: &[&str]) -> Option<BaseUrl> {
        self.take::<String>(section, key, "a URL string (\"\" for off)")
            .filter(|text| !text.is_empty())
            .and_then(|text| self.check_url(section, key, schemes, &text))
    }

    /// `lago.api_url`: the server root. The bridge appends `/api/v1/...` itself, so a URL
    /// ending in `/api/v1` (the OpenAPI spec's server URL) would reach `/api/v1/api/v1/...`,
    /// where every route is 404.
    fn lago_api_url(&mut self, default: BaseUrl) -> BaseUrl {
        let url = self.url("lago", "api_url", HTTP_SCHEMES, default.clone());
        let text = url.as_str();
        if url
            .url()
            .path()
            .trim_end_matches('/')
            .to_ascii_lowercase()
            .ends_with("/api/v1")
        {
            self.problems.push(format!(
                "`lago.api_url` = {text:?} ends in /api/v1: give the Lago server root (e.g. {:?}); the bridge appends /api/v1 itself",
                &text[..text.len() - "/api/v1".len()]
            ));
            return default;
        }
        url
    }

    /// The URL in `text` if it is one of `schemes` with a host and no query, else a problem
    /// naming the key.
    fn check_url(
        &mut self,
        section: &str,
        key: &str,
        schemes: &[&str],
        text: &str,
    ) -> Option<BaseUrl> {
        BaseUrl::parse(text, schemes)
            .inspect_err(|why| {
                self.problems.push(format!(
                    "`{section}.{key}` = {text:?} is not a {} URL with a host and no query ({why})",
                    schemes.join("/")
                ));
            })
            .ok()
    }

    /// A count where `0` means off (or "no limit of its own"): `None`.
    fn count_or_off(
        &mut self,
        section: &str,
        key: &str,
        default: Option<NonZeroUsize>,
        max: usize,
    ) -> Option<NonZeroUsize> {
        let default = default.map_or(0, NonZeroUsize::get);
        NonZeroUsize::new(self.bounded(section, key, default, 0..=max))
    }

    /// A duration where `"0s"` means off: `None`.
    fn duration_or_off(
        &mut self,
        section: &str,
        key: &str,
        default: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.duration_allow_zero(section, key, default.unwrap_or(Duration::ZERO)))
            .filter(|d| !d.is_zero())
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
}
