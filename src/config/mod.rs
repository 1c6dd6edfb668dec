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
}
