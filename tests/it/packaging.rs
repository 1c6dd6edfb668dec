//! What an operator installs: the systemd unit (verified and scored by `systemd-analyze` when
//! this machine has it), the packaged and compose configs (through the real `check-config`), the
//! compose site's wiring, and the `cargo deb` assets.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_norway::Value;

use crate::support::bridge::BRIDGE_BIN;
use crate::support::repo_root;

const UNIT: &str = "systemd/ocpp-lago-bridge.service";
const PACKAGED_CONFIG: &str = "config/packaged.toml";
const COMPOSE_FILE: &str = "deploy/docker-compose.yml";
/// The exposure `systemd-analyze security` may give the unit at most (issue 6).
const MAX_EXPOSURE: f64 = 2.0;

fn path(relative: &str) -> PathBuf {
    repo_root().join(relative)
}

fn read(relative: &str) -> String {
    fs::read_to_string(path(relative)).unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

/// `systemd-analyze` if it can run here; `None` (after saying so) otherwise; under `CI=true`
/// its absence fails the test.
fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if !found {
        crate::support::cannot_run(
            "systemd unit checks",
            "systemd-analyze not found; the unit was not verified or scored \
             (.ci/run installs the Debian package `systemd`)",
        );
    }
    found.then_some("systemd-analyze")
}

/// The unit with `ExecStart=` pointed at the binary cargo built: `verify` insists that the
/// command exists, and /usr/bin/ocpp-lago-bridge is only there once the package is installed.
fn unit_with_built_binary(dir: &Path) -> PathBuf {
    let unit = read(UNIT);
    let packaged = "ExecStart=/usr/bin/ocpp-lago-bridge ";
    assert_eq!(
        unit.matches(packaged).count(),
        1,
        "the unit must start /usr/bin/ocpp-lago-bridge exactly once"
    );
    let copy = dir.join("ocpp-lago-bridge.service");
    fs::write(
        &copy,
        unit.replace(packaged, &format!("ExecStart={BRIDGE_BIN} ")),
    )
    .expect("write the unit copy");
    copy
}

fn describe(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn systemd_unit_verifies_clean() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_with_built_binary(dir.path());
    let output = Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    // verify reports problems on stderr, sometimes with exit status 0.
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "systemd-analyze verify is not clean:\n{}",
        describe(&output)
    );
}

#[test]
fn systemd_unit_exposure_is_at_most_2() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let output = Command::new(analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(path(UNIT))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let exposure: f64 = stdout
        .lines()
        .find_map(|line| {
            line.split_once("Overall exposure level for ")?
                .1
                .split_once(": ")
        })
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure figure in:\n{}", describe(&output)));
    eprintln!("systemd-analyze security --offline=yes: exposure {exposure}");
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}:\n{}",
        describe(&output)
    );
}

#[test]
fn the_unit_keeps_its_operating_contract() {
    let unit = read(UNIT);
    let settings: BTreeSet<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && line.contains('='))
        .collect();
    for expected in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "ExecStart=/usr/bin/ocpp-lago-bridge run --config /etc/ocpp-lago-bridge/ocpp-lago-bridge.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StateDirectory=ocpp-lago-bridge",
        "DynamicUser=yes",
        "LoadCredential=lago-api-key:/etc/ocpp-lago-bridge/lago-api-key",
        "LimitNOFILE=262144",
        // The default spool.overflow_dir: a tmpfs that outlives a restart (issue 15 item 5).
        "RuntimeDirectory=ocpp-lago-bridge",
        "RuntimeDirectoryPreserve=restart",
    ] {
        assert!(settings.contains(expected), "the unit lacks `{expected}`");
    }
    assert!(
        settings
            .iter()
            .any(|s| s.starts_with("RestartPreventExitStatus=")
                && s.split(['=', ' ']).any(|code| code == "78")),
        "exit 78 (invalid config) must not be restarted"
    );
    assert!(
        !settings.iter().any(
            |s| s.starts_with("AmbientCapabilities=") && s.len() > "AmbientCapabilities=".len()
        ),
        "the default ports are above 1024: no capability is needed"
    );
}

fn check_config(relative: &str) {
    let output = Command::new(BRIDGE_BIN)
        .args(["check-config", "--config"])
        .arg(path(relative))
        .env_remove("LAGO_API_KEY")
        .output()
        .unwrap();
    // check-config also reads the files a config names; Docker secrets (/run/secrets/) exist
    // only inside the container, so their absence here is the one problem accepted.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("  - "))
        .collect();
    let only_container_secrets = output.status.code() == Some(78)
        && !problems.is_empty()
        && problems.iter().all(|p| p.contains("/run/secrets/"));
    assert!(
        output.status.success() || only_container_secrets,
        "check-config rejects {relative}:\n{}",
        describe(&output)
    );
}

#[test]
fn shipped_configs_pass_check_config() {
    for config in [
        PACKAGED_CONFIG,
        "config/ocpp-lago-bridge.toml",
        "deploy/ocpp-lago-bridge.compose.toml",
    ] {
        check_config(config);
    }
}

/// `section.key` for every key of a TOML config.
fn config_keys(relative: &str) -> BTreeSet<String> {
    let table: toml::Table = toml::from_str(&read(relative)).unwrap();
    table
        .iter()
        .flat_map(|(section, keys)| {
            keys.as_table()
                .expect("sections only")
                .keys()
                .map(move |key| format!("{section}.{key}"))
        })
        .collect()
}

#[test]
fn packaged_config_lists_the_same_keys_with_the_spool_in_the_state_directory() {
    assert_eq!(
        config_keys(PACKAGED_CONFIG),
        config_keys("config/ocpp-lago-bridge.toml")
    );
    let table: toml::Table = toml::from_str(&read(PACKAGED_CONFIG)).unwrap();
    assert_eq!(
        table["spool"]["path"].as_str(),
        Some("/var/lib/ocpp-lago-bridge/spool.db")
    );
    // The key comes from the unit's LoadCredential=, never from a file the config names.
    assert_eq!(table["lago"]["api_key_file"].as_str(), Some(""));
}

fn compose() -> Value {
    let mut doc: Value = serde_norway::from_str(&read(COMPOSE_FILE)).expect("compose file is YAML");
    doc.apply_merge().expect("YAML merge keys resolve");
    doc
}

/// `text` with each `${VAR:-default}` replaced by its default, as compose does with VAR unset.
fn with_defaults(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = start + rest[start..].find('}').expect("closed ${...}");
        let (_, default) = rest[start + 2..end]
            .split_once(":-")
            .unwrap_or_else(|| panic!("{text}: a port variable without a default"));
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// `(host port, container port)` for each entry of a service's `ports:` (short or long syntax).
fn published_ports(service: &Value) -> Vec<(u16, u16)> {
    let Some(ports) = service.get("ports").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    ports
        .iter()
        .map(|entry| match entry {
            Value::String(short) => {
                // [ip:]host:container[/protocol]
                let short = with_defaults(short);
                let short = short.split('/').next().unwrap();
                let mut parts = short.rsplit(':');
                let container = parts.next().unwrap().parse().unwrap();
                let host = parts
                    .next()
                    .expect("a published host port")
                    .parse()
                    .unwrap();
                (host, container)
            }
            long => {
                let port = |key: &str| match &long[key] {
                    Value::Number(n) => n.as_u64().unwrap() as u16,
                    Value::String(s) => s.parse().unwrap(),
                    other => panic!("port `{key}` is {other:?}"),
                };
                (port("published"), port("target"))
            }
        })
        .collect()
}

#[test]
fn compose_points_chargers_at_the_bridge_and_the_bridge_at_steve() {
    let doc = compose();
    let services = doc["services"].as_mapping().expect("services");
    let bridge = &doc["services"]["bridge"];
    assert!(bridge.is_mapping(), "no `bridge` service");

    // Chargers dial host port 8180: only the bridge may publish it.
    assert!(
        published_ports(bridge).contains(&(8180, 8180)),
        "the bridge does not publish 8180"
    );
    for (name, service) in services {
        if name.as_str() != Some("bridge") {
            assert!(
                !published_ports(service)
                    .iter()
                    .any(|&(host, _)| host == 8180),
                "{name:?} publishes host port 8180, where chargers connect"
            );
        }
    }

    // The bridge's config is the mounted compose config; its upstream is the `steve` service.
    let mount = bridge["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|v| v.contains(":/etc/ocpp-lago-bridge/ocpp-lago-bridge.toml"))
        .expect("the bridge mounts its config");
    let config_file = mount.split(':').next().unwrap().trim_start_matches("./");
    let config_path = format!("deploy/{config_file}");
    check_config(&config_path);
    let config: toml::Table = toml::from_str(&read(&config_path)).unwrap();
    let upstream = config["proxy"]["upstream_url"].as_str().unwrap();
    let upstream_host = upstream
        .strip_prefix("ws://")
        .and_then(|rest| rest.split([':', '/']).next())
        .unwrap_or_else(|| panic!("upstream_url {upstream:?} is not ws://HOST..."));
    assert_eq!(upstream_host, "steve");
    let steve = &doc["services"]["steve"];
    assert!(steve.is_mapping(), "no `steve` service");
    assert!(
        steve["build"]["context"]
            .as_str()
            .is_some_and(|c| c.contains("steve-community/steve")),
        "the `steve` service is not built from steve-community/steve"
    );
    assert!(
        upstream.contains(":8180/steve/websocket/CentralSystemService"),
        "SteVe's docker profile serves OCPP-J on 8180 under /steve: {upstream}"
    );

    // Lago as published, and the key handed over as a secret, not in the file.
    for lago in [
        "lago-api",
        "lago-worker",
        "lago-clock",
        "lago-front",
        "lago-db",
        "lago-redis",
    ] {
        assert!(doc["services"][lago].is_mapping(), "no `{lago}` service");
    }
    assert_eq!(
        config["lago"]["api_key_file"].as_str(),
        Some("/run/secrets/lago_api_key")
    );
    assert!(
        bridge["secrets"]
            .as_sequence()
            .is_some_and(|s| s.iter().any(|v| v.as_str() == Some("lago_api_key")))
    );
}

#[test]
fn deb_assets_exist_and_install_the_config_as_a_conffile() {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let assets = deb["assets"].as_array().expect("deb assets");
    let pairs: Vec<(&str, &str)> = assets
        .iter()
        .map(|a| (a[0].as_str().unwrap(), a[1].as_str().unwrap()))
        .collect();
    for (source, _) in &pairs {
        // target/release/ is cargo-deb's placeholder for the built binary.
        if !source.starts_with("target/release/") {
            assert!(path(source).exists(), "deb asset {source} is missing");
        }
    }
    assert!(pairs.contains(&("target/release/ocpp-lago-bridge", "usr/bin/")));
    // Under /etc, so dpkg treats it as a conffile and keeps the operator's edits.
    assert!(pairs.contains(&(
        PACKAGED_CONFIG,
        "etc/ocpp-lago-bridge/ocpp-lago-bridge.toml"
    )));
    let units_dir = deb["systemd-units"]["unit-scripts"].as_str().unwrap();
    assert!(path(units_dir).join("ocpp-lago-bridge.service").exists());
}

/// The design card pins one tokio-tungstenite across the tree: two would mean two WebSocket
/// stacks with different limits and buffer settings.
#[test]
fn the_tree_has_one_tokio_tungstenite() {
    let lock = std::fs::read_to_string(crate::support::repo_root().join("Cargo.lock")).unwrap();
    for name in ["tokio-tungstenite", "tungstenite"] {
        let versions = lock
            .split("[[package]]")
            .filter(|package| package.contains(&format!("\nname = \"{name}\"\n")))
            .count();
        assert_eq!(versions, 1, "{name} appears {versions} times in Cargo.lock");
    }
}
