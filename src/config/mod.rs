//! TOML + flags → a validated [`Config`], in three parts: `model.rs` the typed model and every
//! default, `reader.rs` the TOML reader (every problem in one run, each with its key's path),
//! `files.rs` the loaders of the files the config names (subscription map, allowlist; TLS
//! material through `tls.rs`). This file joins them: [`Config::load`] and [`Config::check`].
//!
//! Must not: ask the machine anything beyond reading the files the config names (the open-file
//! limit is `rlimit.rs`'s, secrets are `secrets.rs`'s).

use std::fmt;
use std::path::Path;

mod files;
mod model;
mod reader;

pub use files::{load_allowlist, load_subscription_map};
pub use model::{
    AdminConfig, BaseUrl, BillingConfig, Config, HTTP_SCHEMES, LagoConfig, LogConfig, LogFormat,
    ProxyConfig, ReconcileConfig, SpoolConfig, SteveConfig, WEBSOCKET_SCHEMES,
};

/// The config file used when `--config` is not given; absent means "all defaults".
pub const DEFAULT_CONFIG_PATH: &str = "config/ocpp-lago-bridge.toml";

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
        let (config, mut problems) = reader::read(text);
        if let Some(config) = &config {
            problems.extend(config.invariant_problems());
        }
        (config, problems)
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read the config file: {e}"))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::ledger::{BillingMode, IdTagCase};

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

    /// One run reports what each part finds: the reader (a wrong type, an unknown key, a bad
    /// URL), the model's cross-key rules, and the files the valid values name (a missing
    /// allowlist, a subscription map with a bad row, a missing TLS certificate).
    #[test]
    fn every_problem_is_reported_at_once_across_the_three_parts() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("map.csv");
        std::fs::write(&map, "id_tag,external_subscription_id\nTAG1\n").unwrap();
        let config = dir.path().join("bridge.toml");
        std::fs::write(
            &config,
            format!(
                r#"
                [proxy]
                allowlist_file = "{0}/no-allowlist"
                max_connections = "many"
                colour = "blue"
                [proxy.tls]
                cert_file = "{0}/no-cert.pem"
                key_file = "{0}/no-key.pem"
                [lago]
                api_url = "lago.example"
                [billing]
                subscription_map_file = "{1}"
                [steve]
                api_password_file = "/run/steve-password"
                "#,
                dir.path().display(),
                map.display()
            ),
        )
        .unwrap();
        let problems = Config::check(Some(&config)).problems;
        for needle in [
            "`proxy.max_connections`",
            "unknown key `proxy.colour`",
            "`lago.api_url`",
            "without `steve.api_user`",
            "proxy.allowlist_file",
            "billing.subscription_map_file",
            "no-cert.pem",
        ] {
            assert_eq!(
                problems.iter().filter(|p| p.contains(needle)).count(),
                1,
                "not exactly one problem mentions {needle}: {problems:#?}"
            );
        }
        assert_eq!(problems.len(), 7, "{problems:#?}");
        assert!(Config::load(Some(&config)).is_err());
    }

    /// A key that takes one of a few words names the key, the word given and every word it
    /// takes; a word of the right kind selects its variant.
    #[test]
    fn a_word_outside_its_choices_is_named_with_every_choice() {
        let parsed = Config::parse;
        let problems = parsed(
            "[billing]\nmode = \"monthly\"\nid_tag_case = \"UPPER\"\n[log]\nformat = \"xml\"\n",
        )
        .unwrap_err();
        assert_eq!(
            problems,
            [
                "`billing.mode` = \"monthly\" must be \"session\" or \"incremental\"",
                "`billing.id_tag_case` = \"UPPER\" must be \"as_sent\", \"upper\" or \"lower\"",
                "`log.format` = \"xml\" must be \"json\" or \"text\"",
            ]
        );
        let config = parsed(
            "[billing]\nmode = \"incremental\"\nid_tag_case = \"lower\"\n[log]\nformat = \"text\"\n",
        )
        .unwrap();
        assert_eq!(config.billing.mode, BillingMode::Incremental);
        assert_eq!(config.billing.id_tag_case, IdTagCase::Lower);
        assert_eq!(config.log.format, LogFormat::Text);
        assert!(parsed("[billing]\nmode = 1\n").unwrap_err()[0].contains("`billing.mode` must be"));
    }

    /// Operators' files spell "off" `0`, `"0s"` or `""`: still accepted, meaning the same, and
    /// held as `None`; any other value is `Some`.
    #[test]
    fn zero_means_off_keys_are_none() {
        let off = Config::parse(
            r#"
            [proxy]
            max_connections = 0
            max_connections_per_ip = 0
            max_messages_per_second = 0
            idle_timeout = "0s"
            [steve]
            api_url = ""
            [reconcile]
            interval = ""
        "#,
        )
        .unwrap();
        assert_eq!(off.proxy.max_connections, None);
        assert_eq!(off.proxy.max_connections_per_ip, None);
        assert_eq!(off.proxy.max_messages_per_second, None);
        assert_eq!(off.proxy.idle_timeout, None);
        assert_eq!(off.steve.api_url, None);
        assert_eq!(off.reconcile.interval, None);
        assert_eq!(off, Config::default(), "off is also the default of each");
        let on = Config::parse(
            r#"
            [proxy]
            max_connections = 500
            max_connections_per_ip = 3
            max_messages_per_second = 5
            idle_timeout = "10m"
            [steve]
            api_url = "http://127.0.0.1:8080/steve/"
            [reconcile]
            interval = "1h"
        "#,
        )
        .unwrap();
        assert_eq!(on.proxy.max_connections.map(|n| n.get()), Some(500));
        assert_eq!(on.proxy.max_connections_per_ip.map(|n| n.get()), Some(3));
        assert_eq!(on.proxy.max_messages_per_second.map(|n| n.get()), Some(5));
        assert_eq!(on.proxy.idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(
            on.steve.api_url.as_ref().map(BaseUrl::as_str),
            Some("http://127.0.0.1:8080/steve")
        );
        assert_eq!(on.reconcile.interval, Some(Duration::from_secs(3600)));
        for bad in [
            "[proxy]\nmax_connections = -1\n",
            "[proxy]\nmax_messages_per_second = 1000001\n",
            "[proxy]\nidle_timeout = 0\n",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
    }

    /// A URL that does not parse, or has the wrong scheme, is a problem naming its key and the
    /// value (URLs are not secrets), and it is parsed once, here: consumers get a `BaseUrl`.
    #[test]
    fn a_bad_url_is_named_with_its_key() {
        for (toml, key) in [
            (
                "[proxy]\nupstream_url = \"http://steve/ws\"\n",
                "`proxy.upstream_url`",
            ),
            (
                "[proxy]\nupstream_url = \"ws://\"\n",
                "`proxy.upstream_url`",
            ),
            ("[lago]\napi_url = \"api.getlago.com\"\n", "`lago.api_url`"),
            ("[lago]\napi_url = \"ftp://lago\"\n", "`lago.api_url`"),
            (
                "[lago]\napi_url = \"https://lago/?x=1\"\n",
                "`lago.api_url`",
            ),
            (
                "[lago]\napi_url = \"https://lago/api/v1/\"\n",
                "`lago.api_url`",
            ),
            ("[steve]\napi_url = \"ws://steve\"\n", "`steve.api_url`"),
            ("[steve]\napi_url = \"http://st eve\"\n", "`steve.api_url`"),
            ("[steve]\napi_url = 8080\n", "`steve.api_url`"),
        ] {
            let problems = Config::parse(toml).unwrap_err();
            assert_eq!(problems.len(), 1, "{toml}: {problems:#?}");
            assert!(problems[0].contains(key), "{toml}: {problems:#?}");
        }
        let root = Config::parse("[lago]\napi_url = \"https://lago.example/base/\"\n").unwrap();
        assert_eq!(root.lago.api_url, "https://lago.example/base");
        assert_eq!(root.lago.api_url.url().path(), "/base/");
    }

    /// The defaults live in `Config::default` alone, and the shipped example documents every
    /// key the reader knows (the commented-out ones have no value by default), each at exactly
    /// that default (`the_documented_example_parses`).
    #[test]
    fn the_example_file_documents_every_key_at_its_default() {
        let text = std::fs::read_to_string(DEFAULT_CONFIG_PATH).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        // `# key = …` lines name a key by its leaf, `# [section.table]` lines by its path.
        let commented: Vec<&str> = text
            .lines()
            .filter_map(|line| line.trim_start().strip_prefix('#'))
            .map(str::trim_start)
            .filter_map(|rest| match rest.strip_prefix('[') {
                Some(header) => header.split(']').next(),
                None => rest.split('=').next(),
            })
            .map(str::trim)
            .collect();
        let mut missing = Vec::new();
        for key in reader::known_keys() {
            let mut path = key.split('.').peekable();
            let mut value = Some(&table);
            let mut found = false;
            while let Some(part) = path.next() {
                let next = value.and_then(|t| t.get(part));
                if path.peek().is_none() {
                    found = next.is_some();
                }
                value = next.and_then(toml::Value::as_table);
            }
            let leaf = key.rsplit('.').next().unwrap();
            if !found && !commented.contains(&leaf) && !commented.contains(&key.as_str()) {
                missing.push(key);
            }
        }
        assert_eq!(missing, Vec::<String>::new(), "undocumented keys");
        let known = reader::known_keys();
        for key in [
            "proxy.tls.client_ca_file",
            "spool.overflow_dir",
            "log.format",
        ] {
            assert!(known.iter().any(|k| k == key), "{key}: {known:?}");
        }
        assert_eq!(Config::parse(&text).unwrap(), Config::default());
    }
}
