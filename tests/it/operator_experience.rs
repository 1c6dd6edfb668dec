//! Issue 17 items 1-5, as a new operator meets the bridge: `check-config` reporting everything
//! in one run (offline and `--online`), a CLI that explains itself, logs worth tailing, a shadow
//! bridge that survives restarts, and the dashboard and alert rules matching what `/metrics`
//! exports. Every test runs the built binary as a child process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::SinkExt;
use rust_decimal::Decimal;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use ocpp_lago_bridge::ledger::{BillingMode, BillingRules, Ledger};
use ocpp_lago_bridge::spool::store::Store;
use ocpp_lago_bridge::tap::{StopRecord, TapKind, TapRecord};

use crate::support::bridge::{BRIDGE_BIN, Bridge, BridgeOptions};
use crate::support::e2e::spool_counts;
use crate::support::lago::{LagoStandIn, MetricDef, StandInConfig};
use crate::support::peers::{CentralOptions, CentralSystem, Implementation};
use crate::support::{net, poll_until, ws};

/// No CLI command may take longer than this.
const CLI_LIMIT: Duration = Duration::from_secs(40);

/// What one CLI run printed and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn all(&self) -> String {
        format!(
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs the binary with exactly `args` and `env`, in `dir`, killed if it outlives `CLI_LIMIT`.
async fn bridge_cli(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let started = std::time::Instant::now();
    let child = tokio::process::Command::new(BRIDGE_BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("LAGO_API_KEY")
        .env_remove("STEVE_API_KEY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the bridge binary");
    let output = tokio::time::timeout(CLI_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`{}` did not finish within {CLI_LIMIT:?}", args.join(" ")))
        .expect("wait for the bridge binary");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: started.elapsed(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path
}

// ---------------------------------------------------------------------------------------------
// Item 1: check-config finds everything in one run.

/// One config with structural errors *and* missing files: every one is reported in the same run
/// (the old code listed the 2 structural ones, then the files only once those were fixed), plus
/// a missing `lago.api_key_file` and a spool path under a file, which the old code called valid.
#[tokio::test]
async fn check_config_reports_structure_files_key_and_spool_problems_in_one_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().display();
    let plain_file = write(dir.path(), "not-a-dir", "x");
    let config = write(
        dir.path(),
        "bridge.toml",
        &format!(
            "[proxy]\nlisten = \"nowhere\"\nallowlist_file = \"{d}/no-allowlist.txt\"\n\
             [lago]\nbatch_linger = \"soon\"\napi_key_file = \"{d}/no-lago-key\"\n\
             [billing]\nsubscription_map_file = \"{d}/no-map.csv\"\n\
             [spool]\npath = \"{}/spool.db\"\n",
            plain_file.display()
        ),
    );
    let run = bridge_cli(
        dir.path(),
        &["check-config", "--config", config.to_str().unwrap()],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(78), "{}", run.all());
    for needle in [
        "`proxy.listen`",
        "`lago.batch_linger`",
        "proxy.allowlist_file",
        "billing.subscription_map_file",
        "`lago.api_key_file`",
        "`spool.path`",
    ] {
        assert!(
            run.stderr.contains(needle),
            "{needle} not reported:\n{}",
            run.all()
        );
    }
    assert!(
        run.stderr.contains("6 problem(s)"),
        "all six at once:\n{}",
        run.all()
    );
    assert!(!run.stdout.contains("valid"), "{}", run.all());
    assert!(
        run.took < Duration::from_secs(5),
        "offline checks are quick: {:?}",
        run.took
    );
}

/// A secret readable by others is a warning, not a failure; a good config is valid and says
/// what was (not) checked.
#[tokio::test]
async fn check_config_warns_about_a_world_readable_key_file_and_otherwise_passes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = write(dir.path(), "lago-api-key", "secret-key-for-check\n");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = write(
        dir.path(),
        "bridge.toml",
        &format!(
            "[lago]\napi_key_file = \"{}\"\n[spool]\npath = \"{}/data/spool.db\"\n",
            key.display(),
            dir.path().display()
        ),
    );
    let run = bridge_cli(
        dir.path(),
        &["check-config", "--config", config.to_str().unwrap()],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(
        run.stderr.contains("warning:") && run.stderr.contains("0644"),
        "{}",
        run.all()
    );
    assert!(
        run.stdout.contains("configuration is valid"),
        "{}",
        run.all()
    );
    assert!(!run.all().contains("secret-key-for-check"), "{}", run.all());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = bridge_cli(
        dir.path(),
        &["check-config", "--config", config.to_str().unwrap()],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(!run.stderr.contains("0600"), "{}", run.all());
}

/// `--online` against a Lago stand-in and a SteVe-shaped WebSocket server that refuses the
/// unknown test id with 404: one `ok:` line each, exit 0. A wrong metric is a problem (78) named
/// for people; services that are down exit 69 within the probe bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_online_reaches_steve_and_lago_and_exits_69_when_they_are_down() {
    let lago = LagoStandIn::start(StandInConfig {
        metrics: vec![MetricDef::sum_of_value("kwh")],
        ..StandInConfig::default()
    })
    .await;
    let steve = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = write(dir.path(), "lago-api-key", &lago.api_key());
    let config_text = |upstream: &str, lago_url: &str| {
        format!(
            "[proxy]\nupstream_url = \"{upstream}\"\n[lago]\napi_url = \"{lago_url}\"\napi_key_file = \"{}\"\nmetric_code = \"kwh\"\n[spool]\npath = \"{}/spool.db\"\n",
            key.display(),
            dir.path().display()
        )
    };
    let config = write(
        dir.path(),
        "up.toml",
        &config_text(&steve.url_base(), &lago.url()),
    );
    let run = bridge_cli(
        dir.path(),
        &[
            "check-config",
            "--online",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(
        run.stdout.contains("ok: SteVe WebSocket") && run.stdout.contains("ok: Lago"),
        "{}",
        run.all()
    );

    lago.set_metrics(vec![MetricDef {
        code: "kwh".into(),
        aggregation_type: "sum_agg".into(),
        field_name: Some("gb".into()),
        expression_fails: false,
    }]);
    let run = bridge_cli(
        dir.path(),
        &[
            "check-config",
            "--online",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(78), "{}", run.all());
    assert!(run.stderr.contains("field \"gb\""), "{}", run.all());
    assert!(
        !format!("{}{}", run.stdout, run.stderr).contains("Some("),
        "no Debug text: {}",
        run.all()
    );

    // Nobody listens on these ports: both services unreachable, bounded in time.
    let closed_ws = format!(
        "ws://{}/steve/websocket/CentralSystemService",
        net::free_addr()
    );
    let closed_http = format!("http://{}", net::free_addr());
    let down = write(
        dir.path(),
        "down.toml",
        &config_text(&closed_ws, &closed_http),
    );
    let run = bridge_cli(
        dir.path(),
        &[
            "check-config",
            "--online",
            "--config",
            down.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(69), "{}", run.all());
    assert!(
        run.stderr.contains("unreachable: SteVe WebSocket")
            && run.stderr.contains("unreachable: Lago"),
        "{}",
        run.all()
    );
    assert!(
        run.took < Duration::from_secs(12),
        "probes are bounded: {:?}",
        run.took
    );
}

// ---------------------------------------------------------------------------------------------
// Item 2: a CLI that explains itself.

/// Every verb's help documents every flag (no bare `--json`, `--id`, ...), `simulate` keeps
/// `{n}`-free text intact, the long help has examples, and the global flags appear once.
#[tokio::test]
async fn every_help_documents_every_flag_with_examples_and_global_flags_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let verbs: [&[&str]; 9] = [
        &[],
        &["run"],
        &["check-config"],
        &["spool", "stats"],
        &["spool", "dead-letters"],
        &["spool", "requeue"],
        &["replay"],
        &["reconcile"],
        &["simulate"],
    ];
    for verb in verbs {
        let name = if verb.is_empty() {
            "(top level)".to_string()
        } else {
            verb.join(" ")
        };
        let short = bridge_cli(dir.path(), &[verb, &["-h"]].concat(), &[]).await;
        assert_eq!(short.code, Some(0), "{name} -h: {}", short.all());
        let lines: Vec<&str> = short.stdout.lines().collect();
        let options_at = lines
            .iter()
            .position(|l| *l == "Options:")
            .unwrap_or_else(|| panic!("{name}: no Options section:\n{}", short.stdout));
        for (i, line) in lines.iter().enumerate().skip(options_at + 1) {
            let trimmed = line.trim_start();
            if !trimmed.starts_with('-') {
                continue;
            }
            let parts: Vec<&str> = trimmed.splitn(2, "  ").collect();
            let described = parts.get(1).is_some_and(|d| !d.trim().is_empty())
                || lines
                    .get(i + 1)
                    .is_some_and(|next| !next.trim().is_empty() && !next.trim().starts_with('-'));
            assert!(
                described,
                "{name}: option without a description: {line:?}\n{}",
                short.stdout
            );
        }
        for global in ["--config", "--log-format"] {
            assert_eq!(
                short.stdout.matches(global).count()
                    - short.stdout.matches(&format!("`{global}`")).count(),
                1,
                "{name}: {global} shown once:\n{}",
                short.stdout
            );
        }
        let long = bridge_cli(dir.path(), &[verb, &["--help"]].concat(), &[]).await;
        assert_eq!(long.code, Some(0), "{name} --help: {}", long.all());
        assert!(
            long.stdout.contains("Examples:"),
            "{name} --help has no examples:\n{}",
            long.stdout
        );
    }
    let requeue = bridge_cli(dir.path(), &["spool", "requeue", "-h"], &[]).await;
    for flag in ["--id", "--reason", "--all"] {
        assert!(requeue.stdout.contains(flag), "{}", requeue.stdout);
    }
    let simulate = bridge_cli(dir.path(), &["simulate", "-h"], &[]).await;
    assert!(
        simulate.stdout.contains("SIM-1, SIM-2"),
        "the --id-prefix help survives clap's `{{n}}`:\n{}",
        simulate.stdout
    );
}

/// Usage errors exit 2 (clap's code) and name every choice; global flags go before or after
/// the verb.
#[tokio::test]
async fn usage_errors_exit_2_and_global_flags_go_before_or_after_the_verb() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        dir.path(),
        "bridge.toml",
        &format!("[spool]\npath = \"{}/spool.db\"\n", dir.path().display()),
    );
    let config = config.to_str().unwrap();
    let requeue = bridge_cli(dir.path(), &["spool", "requeue", "--config", config], &[]).await;
    assert_eq!(requeue.code, Some(2), "{}", requeue.all());
    for flag in ["--id", "--reason", "--all"] {
        assert!(requeue.stderr.contains(flag), "{}", requeue.all());
    }
    let replay = bridge_cli(dir.path(), &["replay", "--config", config], &[]).await;
    assert_eq!(replay.code, Some(2), "{}", replay.all());
    assert!(
        replay.stderr.contains("--session") && replay.stderr.contains("--since"),
        "{}",
        replay.all()
    );
    for args in [
        &["replay", "--session", "CP1"][..],
        &["replay", "--session", "CP1:x"],
        &["replay", "--session", "CP1:1", "--since", "6h"],
        &["replay", "--since", "yesterday-ish"],
        &["spool", "requeue", "--id", "1", "--all"],
        &["no-such-verb"],
    ] {
        let run = bridge_cli(dir.path(), &[args, &["--config", config]].concat(), &[]).await;
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.all());
    }
    ocpp_lago_bridge::spool::store::Store::open(&dir.path().join("spool.db")).expect("spool");
    let before = bridge_cli(
        dir.path(),
        &["--config", config, "spool", "stats", "--json"],
        &[],
    )
    .await;
    let after = bridge_cli(
        dir.path(),
        &["spool", "stats", "--json", "--config", config],
        &[],
    )
    .await;
    assert_eq!(before.code, Some(0), "{}", before.all());
    assert_eq!(after.code, Some(0), "{}", after.all());
    assert_eq!(before.stdout, after.stdout);
}

/// `replay --session` of a session the spool does not know says so and exits 1 (the old code
/// said "0 queued" and exited 0), with and without `--rederive`.
#[tokio::test]
async fn replay_of_an_unknown_session_says_not_found_and_exits_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(
        dir.path(),
        "bridge.toml",
        &format!("[spool]\npath = \"{}/spool.db\"\n", dir.path().display()),
    );
    ocpp_lago_bridge::spool::store::Store::open(&dir.path().join("spool.db")).expect("spool");
    for extra in [&[][..], &["--rederive"]] {
        let run = bridge_cli(
            dir.path(),
            &[
                &[
                    "replay",
                    "--session",
                    "CP9:999",
                    "--config",
                    config.to_str().unwrap(),
                ][..],
                extra,
            ]
            .concat(),
            &[],
        )
        .await;
        assert_eq!(run.code, Some(1), "{extra:?}: {}", run.all());
        assert!(
            run.stderr.contains("CP9:999 not found"),
            "{extra:?}: {}",
            run.all()
        );
        assert!(run.stdout.is_empty(), "{}", run.all());
    }
}

/// Dead-letter details are read by people: times as RFC 3339, absent ones as "none", never
/// `Some(1796160600)`.
#[test]
fn anomaly_details_show_times_not_rust_debug_text() {
    let rules =
        BillingRules::new(BillingMode::Session, "kwh", "{transaction_id}", "{id_tag}").unwrap();
    let stop = |timestamp| TapRecord {
        charge_box_id: "CP-DEBUG".into(),
        received_at: 1_796_160_700,
        kind: TapKind::Stop(StopRecord {
            ocpp_transaction_id: 7,
            meter_stop_wh: Decimal::from(1500),
            timestamp,
            id_tag: None,
            reason: None,
            begin_reading: None,
            readings: Vec::new(),
        }),
    };
    let mut details = Vec::new();
    for timestamp in [Some(1_796_160_600), None] {
        let mut ledger = Ledger::new();
        let applied = ledger.apply(&stop(timestamp), &rules);
        details.extend(applied.anomalies.into_iter().map(|a| a.detail));
    }
    assert_eq!(details.len(), 2, "{details:?}");
    assert!(details[0].contains("2026-12-01T"), "{}", details[0]);
    assert!(details[1].contains("timestamp none"), "{}", details[1]);
    for detail in &details {
        assert!(
            !detail.contains("Some(") && !detail.contains("None"),
            "{detail}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Item 4: shadow mode that survives restarts.

async fn booted_charger(bridge: &Bridge, charge_box_id: &str) -> ws::ClientWs {
    let (mut socket, _) = ws::connect(&bridge.charger_url(charge_box_id), &["ocpp1.6"], None)
        .await
        .expect("connect a charger through the bridge");
    let boot =
        r#"[2,"boot","BootNotification",{"chargePointVendor":"it","chargePointModel":"dry"}]"#;
    ws::call_frame(&mut socket, boot, "boot").await;
    socket
}

/// A shadow bridge killed mid-session and started again still knows the session: its Stop
/// becomes one printed event (the old throw-away spool in /tmp made it `missing_start`), the
/// event is not printed again after another restart, and the live spool is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_keeps_its_own_spool_across_restarts_and_prints_each_event_once() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let mut bridge = Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            dry_run: true,
            ..Default::default()
        },
    )
    .await;
    let mut charger = booted_charger(&bridge, "DRY-RESTART").await;
    let start = ws::call_frame(
        &mut charger,
        r#"[2,"start","StartTransaction",{"connectorId":1,"idTag":"TAG-DRY","meterStart":1000,"timestamp":"2026-12-01T10:00:00Z"}]"#,
        "start",
    )
    .await;
    let tx = start[2]["transactionId"]
        .as_i64()
        .unwrap_or_else(|| panic!("no transactionId: {start}"));
    drop(charger);

    // SIGKILL mid-session, then the same config again.
    bridge.restart().await;
    let mut charger = booted_charger(&bridge, "DRY-RESTART").await;
    ws::call_frame(
        &mut charger,
        &format!(
            r#"[2,"stop","StopTransaction",{{"transactionId":{tx},"meterStop":3500,"timestamp":"2026-12-01T10:30:00Z"}}]"#
        ),
        "stop",
    )
    .await;
    let printed = poll_until(Duration::from_secs(15), || {
        let stdout = bridge.stdout();
        (!stdout.trim().is_empty()).then_some(stdout)
    })
    .await
    .unwrap_or_else(|| panic!("no event printed; stderr:\n{}", bridge.stderr()));
    let event: Value = serde_json::from_str(printed.lines().next().unwrap()).expect("event JSON");
    assert_eq!(event["properties"]["value"], "2.5", "{event}");
    assert_eq!(
        event["properties"]["ocpp_transaction_id"],
        tx.to_string(),
        "{event}"
    );
    drop(charger);

    // The print is recorded as delivered after the line is written; a SIGKILL in between may
    // print the line again (README: same `transaction_id`). Kill only once it is recorded: this
    // test asserts that a recorded print is never repeated.
    let dry_spool = bridge.dir().join("spool.dry-run.db");
    poll_until(Duration::from_secs(10), || {
        (spool_counts(&dry_spool).delivered == 1).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the printed event was never recorded as delivered"));

    // Another restart prints nothing again: longer than the shipper's idle poll.
    bridge.restart().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status = bridge.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "bridge exit: {status}");
    assert_eq!(
        bridge.stdout().lines().count(),
        1,
        "each event printed once across restarts:\n{}",
        bridge.stdout()
    );

    assert!(
        !bridge.spool_path().exists(),
        "a dry run never creates or touches the live spool {}",
        bridge.spool_path().display()
    );
    let store = Store::open(&dry_spool).expect("the dry-run spool stays for the next start");
    let dead = store.dead_letters(None).expect("dead letters");
    assert!(
        dead.is_empty(),
        "no missing_start or other dead letter: {dead:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 3: logs worth tailing.

/// The top-level keys of one JSON object, duplicates kept (serde_json's `Value` keeps the last).
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Keys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some((key, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(key);
                }
                Ok(Keys(keys))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// A tap warning logged inside the charger's span names `charge_box_id` once, not twice (the
/// old layer wrote the span's and the event's), and so does every other line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_have_each_key_once_even_inside_a_charger_span() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let bridge = Bridge::start(&central.url_base()).await;
    let mut charger = booted_charger(&bridge, "LOG-DUP").await;
    // Not an OCPP-J array: relayed unchanged, and the tap warns naming the charger.
    charger
        .send(Message::text(r#"{"not":"ocpp"}"#))
        .await
        .expect("send a frame the tap does not understand");
    let warned = poll_until(Duration::from_secs(10), || {
        bridge
            .stderr()
            .lines()
            .find(|l| l.contains("not understood"))
            .map(str::to_owned)
    })
    .await
    .unwrap_or_else(|| panic!("no tap warning:\n{}", bridge.stderr()));
    let keys: Keys = serde_json::from_str(&warned).expect("a JSON object");
    assert_eq!(
        keys.0.iter().filter(|k| *k == "charge_box_id").count(),
        1,
        "{warned}"
    );
    drop(charger);
    for line in bridge.stderr().lines() {
        let Keys(keys) = serde_json::from_str(line).expect("every line a JSON object");
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), keys.len(), "a key twice in: {line}");
    }
}

/// Every metric name the dashboard and the alerts may use is on `/metrics` before any charger
/// connects (the old bridge showed 2 series until traffic arrived), counters and gauges at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_is_exported_at_zero_before_any_traffic() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let bridge = Bridge::start(&central.url_base()).await;
    let metrics = crate::support::admin::scrape(bridge.admin_addr).await;
    for name in ocpp_lago_bridge::telemetry::metric_names() {
        let exported = metrics.has(name) || metrics.has(&format!("{name}_count"));
        assert!(exported, "{name} missing at start:\n{}", metrics.text);
    }
    assert_eq!(
        metrics.sum("ocpp_lago_bridge_charger_connections", &[]),
        0.0
    );
    assert_eq!(metrics.sum("ocpp_lago_bridge_dead_letters_total", &[]), 0.0);
    assert!(
        metrics.samples.len() > 30,
        "every series at zero: {}",
        metrics.text
    );
}

/// `--log-format text` into a file: no ANSI colours, and a chargeBoxId holding `%0A` (a newline
/// once decoded) stays inside its line, escaped, instead of forging a line of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_in_a_file_have_no_colours_and_escape_control_characters() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (proxy, admin) = (net::free_addr(), net::free_addr());
    let config = write(
        dir.path(),
        "bridge.toml",
        &format!(
            "[proxy]\nlisten = \"{proxy}\"\npath_prefix = \"{prefix}\"\nupstream_url = \"{upstream}\"\n\
             [admin]\nlisten = \"{admin}\"\n[spool]\npath = \"{d}/spool.db\"\n[log]\nlevel = \"debug\"\n",
            prefix = crate::support::PATH_PREFIX,
            upstream = central.url_base(),
            d = dir.path().display()
        ),
    );
    let stderr_path = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(BRIDGE_BIN)
        .args(["run", "--log-format", "text", "--config"])
        .arg(&config)
        .env_remove("LAGO_API_KEY")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("spawn the bridge");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut child);
    assert!(
        net::wait_until_accepting(proxy, Duration::from_secs(15)).await,
        "bridge not accepting:\n{}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
    let forged = "EVIL%0A1999-01-01T00:00:00.000000Z%20ERROR%20forged%20line%0D%1B[31m";
    let url = format!("ws://{proxy}{}/{forged}", crate::support::PATH_PREFIX);
    if let Ok((mut socket, _)) = ws::connect(&url, &["ocpp1.6"], None).await {
        let _ = ws::call_frame(&mut socket, r#"[2,"hb","Heartbeat",{}]"#, "hb").await;
        let _ = socket.close(None).await;
    }
    let logged = poll_until(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        text.contains("EVIL").then_some(text)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the charger's id was never logged:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        )
    });
    assert!(
        !logged.contains('\u{1b}'),
        "no ANSI escape in a file:\n{logged:?}"
    );
    assert!(
        !logged.contains('\r'),
        "no raw carriage return:\n{logged:?}"
    );
    for line in logged.lines() {
        assert!(
            !line.starts_with("1999-"),
            "a chargeBoxId forged a log line:\n{logged}"
        );
    }
    assert!(
        logged.contains("EVIL\\n1999-"),
        "escaped in place:\n{logged}"
    );
}

/// Lago's billable metric is wrong: delivery pauses, is re-probed every 5 s, and the pause is
/// logged once (the old shipper logged an ERROR every 5 s); once fixed, its end is logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_pause_is_logged_once_and_its_end_once() {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = LagoStandIn::start(StandInConfig {
        metrics: vec![MetricDef {
            code: "kwh".into(),
            aggregation_type: "count_agg".into(),
            field_name: None,
            expression_fails: false,
        }],
        ..StandInConfig::default()
    })
    .await;
    let bridge = Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            extra_toml: format!(
                "[lago]\napi_url = \"{}\"\nmetric_code = \"kwh\"\n",
                lago.url()
            ),
            env: vec![("LAGO_API_KEY".into(), lago.api_key())],
            ..Default::default()
        },
    )
    .await;
    let count = |needle: &str| {
        bridge
            .stderr()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    };
    poll_until(Duration::from_secs(10), || {
        (count("delivery paused") > 0).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("no pause logged:\n{}", bridge.stderr()));
    // Three re-probes' worth.
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(count("delivery paused"), 1, "{}", bridge.stderr());
    assert_eq!(count("still paused"), 0, "{}", bridge.stderr());

    lago.set_metrics(vec![MetricDef::sum_of_value("kwh")]);
    poll_until(Duration::from_secs(15), || {
        (count("delivery resumed") > 0).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("no resumption logged:\n{}", bridge.stderr()));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(count("delivery resumed"), 1, "{}", bridge.stderr());
    assert_eq!(count("delivery paused"), 1, "{}", bridge.stderr());
}

// ---------------------------------------------------------------------------------------------
// Item 5: a dashboard and alerts.

/// Every `ocpp_lago_bridge_*` name in `text`.
fn bridge_metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("ocpp_lago_bridge_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The dashboard's queries and the alert rules use only metrics a freshly started bridge
/// exports (histograms through their `_bucket` series), and `up`, which Prometheus makes; the
/// dashboard has the panels issue 17 lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alert_rules_use_only_metrics_the_bridge_exports() {
    let root = crate::support::repo_root();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/ocpp-lago-bridge.json"))
            .expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut exprs: Vec<(String, String)> = Vec::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        let title = panel["title"].as_str().expect("a title").to_string();
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            exprs.push((
                format!("panel {title}"),
                target["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    let rules: Value = serde_norway::from_str(
        &std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml"))
            .expect("read the alert rules"),
    )
    .expect("the rules are YAML");
    let mut alerts = Vec::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name").to_string();
            exprs.push((
                format!("alert {name}"),
                rule["expr"].as_str().expect("expr").to_string(),
            ));
            alerts.push(name);
        }
    }
    assert_eq!(alerts.len(), 6, "{alerts:?}");

    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let bridge = Bridge::start(&central.url_base()).await;
    let exported = crate::support::admin::scrape(bridge.admin_addr).await;
    for (what, expr) in &exprs {
        let names = bridge_metric_names(expr);
        assert!(
            !names.is_empty() || expr.starts_with("up{"),
            "{what}: `{expr}` uses no bridge metric"
        );
        for name in names {
            assert!(
                exported.has(&name),
                "{what}: `{expr}` uses {name}, which the bridge does not export:\n{}",
                exported.text
            );
        }
    }
    let titles: Vec<String> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap().to_lowercase())
        .collect();
    for wanted in [
        "connected chargers",
        "frames",
        "reply hold",
        "pending events",
        "oldest pending",
        "delivered",
        "dead letters",
        "lago requests",
        "lago request latency",
        "released uncommitted",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel for {wanted}: {titles:?}"
        );
    }
}

/// The open-file-limit warning only when the limit is below what `proxy.max_connections`
/// needs: with the limit at 256, `max_connections = 0` (sized from the limit) gets no warning
/// (the old check warned whatever the fleet), `max_connections = 1000` does.
#[tokio::test]
async fn the_fd_limit_warning_appears_only_when_max_connections_does_not_fit() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().expect("temp dir");
    for (max_connections, warned) in [(0, false), (50, false), (1000, true)] {
        let config = write(
            dir.path(),
            "bridge.toml",
            &format!(
                "[proxy]\nmax_connections = {max_connections}\n[spool]\npath = \"{}/spool.db\"\n",
                dir.path().display()
            ),
        );
        let mut command = std::process::Command::new(BRIDGE_BIN);
        command
            .args(["check-config", "--config"])
            .arg(&config)
            .env("LAGO_API_KEY", "k")
            .stdin(Stdio::null());
        // SAFETY: setrlimit is async-signal-safe; it only lowers this child's own limit.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 256,
                    rlim_max: 256,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let output = command.output().expect("run check-config");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        assert_eq!(
            stderr.contains("open-file limit"),
            warned,
            "max_connections = {max_connections}:\n{stderr}"
        );
    }
}
