//! The independent OCPP peers in `tests/it/peers/`: PyPI `ocpp` and npm `ocpp-rpc` (strict mode).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use super::{PATH_PREFIX, poll_until, repo_root, within};

/// Which OCPP implementation plays a part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    /// PyPI `ocpp` over `websockets` (charge_point.py, central_system.py).
    Python,
    /// npm `ocpp-rpc` in strict mode (ocpp_rpc_charger.mjs, ocpp_rpc_server.mjs).
    OcppRpc,
}

/// The directory holding the peer scripts.
pub fn peers_dir() -> PathBuf {
    repo_root().join("tests/it/peers")
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The `python3` to run the Python peers with (env `OCPP_IT_PYTHON` overrides); panics clearly.
pub fn python3() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let python = std::env::var_os("OCPP_IT_PYTHON")
                .map(PathBuf::from)
                .or_else(|| find_on_path("python3"))
                .expect("python3 is not on PATH: the Python OCPP peers need it (see .ci/run)");
            let check = Command::new(&python)
                .args(["-c", "import ocpp, websockets"])
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("run {}: {e}", python.display()));
            assert!(
                check.status.success(),
                "the Python peers need the packages in tests/it/peers/requirements.txt; run .ci/run \
                 (or pip install -r tests/it/peers/requirements.txt). {} said:\n{}",
                python.display(),
                String::from_utf8_lossy(&check.stderr)
            );
            python
        })
        .clone()
}

/// The `node` to run the ocpp-rpc peers with (env `OCPP_IT_NODE` overrides); panics clearly.
pub fn node() -> PathBuf {
    static NODE: OnceLock<PathBuf> = OnceLock::new();
    NODE.get_or_init(|| {
        let node = std::env::var_os("OCPP_IT_NODE")
            .map(PathBuf::from)
            .or_else(|| find_on_path("node"))
            .expect("node is not on PATH: the ocpp-rpc peers need Node 20 (see .ci/run)");
        assert!(
            peers_dir()
                .join("node_modules/ocpp-rpc/package.json")
                .is_file(),
            "the ocpp-rpc peers are not installed in tests/it/peers/node_modules; run .ci/run \
             (or npm ci --prefix tests/it/peers)"
        );
        node
    })
    .clone()
}

fn command_for(implementation: Implementation, python_script: &str, node_script: &str) -> Command {
    let (program, script) = match implementation {
        Implementation::Python => (python3(), python_script),
        Implementation::OcppRpc => (node(), node_script),
    };
    let mut command = Command::new(program);
    command
        .arg(peers_dir().join(script))
        .current_dir(peers_dir())
        .stdin(Stdio::null());
    command
}

/// What a central system peer should do besides answering.
#[derive(Clone, Debug, Default)]
pub struct CentralOptions {
    /// Send RemoteStartTransaction, Reset and GetConfiguration after each BootNotification.
    pub initiate_calls: bool,
    /// Require HTTP basic auth with this password (username = charge box id), else 401.
    pub password: Option<String>,
    /// The first transaction id handed out (then increasing).
    pub first_transaction_id: Option<u64>,
    /// Keep the transaction id counter and Start dedupe in this file across restarts (Python).
    pub state_file: Option<PathBuf>,
}

/// A central system peer (standing in for SteVe) on an ephemeral loopback port; killed on drop.
pub struct CentralSystem {
    child: Child,
    /// The implementation running.
    pub implementation: Implementation,
    /// The loopback port it listens on (kept across [`CentralSystem::restart`]).
    pub port: u16,
    options: CentralOptions,
    log_path: PathBuf,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl CentralSystem {
    /// Starts a central system and waits (at most 20 s) until it listens.
    pub async fn start(implementation: Implementation, options: CentralOptions) -> CentralSystem {
        assert!(
            options.state_file.is_none() || implementation == Implementation::Python,
            "only the Python central system keeps state across restarts"
        );
        let dir = tempfile::tempdir().expect("temp dir for the central system");
        let log_path = dir.path().join("events.jsonl");
        let stdout_path = dir.path().join("stdout");
        let stderr_path = dir.path().join("stderr");
        let child = spawn_central(
            implementation,
            &options,
            0,
            &log_path,
            &stdout_path,
            &stderr_path,
        );
        let mut central = CentralSystem {
            child,
            implementation,
            port: 0,
            options,
            log_path,
            stdout_path,
            stderr_path,
            _dir: dir,
        };
        match central.listening_port().await {
            Some(port) => central.port = port,
            None => panic!(
                "central system {implementation:?} did not report a listening port; stderr:\n{}",
                central.stderr()
            ),
        }
        central
    }

    /// SIGKILLs the central system (as a crash would) and reaps it; [`Self::restart`] brings it back.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the central system if it runs and starts it again on the same port with the same
    /// options (so the same `--state-file`), as SteVe restarting on its database. Panics if it
    /// does not listen again within 20 s of tries.
    pub async fn restart(&mut self) {
        self.kill();
        // Connections of the killed process may hold the port for a moment.
        for _attempt in 0..20 {
            self.child = spawn_central(
                self.implementation,
                &self.options,
                self.port,
                &self.log_path,
                &self.stdout_path,
                &self.stderr_path,
            );
            if let Some(port) = self.listening_port().await {
                assert_eq!(port, self.port, "the central system came back on its port");
                return;
            }
            self.kill();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "central system did not listen again on port {}; stderr:\n{}",
            self.port,
            self.stderr()
        );
    }

    /// The port of the `listening` line on stdout, or `None` if the process exited or 20 s passed.
    async fn listening_port(&mut self) -> Option<u16> {
        let (child, stdout_path) = (&mut self.child, &self.stdout_path);
        poll_until(Duration::from_secs(20), || {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(None);
            }
            let stdout = fs::read_to_string(stdout_path).ok()?;
            let line = stdout.lines().next()?;
            let event: Value = serde_json::from_str(line).ok()?;
            Some(event["port"].as_u64().map(|p| p as u16))
        })
        .await
        .flatten()
    }

    /// The `upstream_url` for a bridge in front of this central system.
    pub fn url_base(&self) -> String {
        format!("ws://127.0.0.1:{}{PATH_PREFIX}", self.port)
    }

    /// The file its events are logged to (read by the SteVe REST stand-in).
    pub fn log_path(&self) -> PathBuf {
        self.log_path.clone()
    }

    /// The events logged so far (connected, call_received, central_call_result, disconnected).
    pub fn events(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.log_path).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Waits (at most `limit`) until `done(events)` holds; returns the events either way.
    pub async fn wait_for_events(
        &self,
        limit: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        poll_until(limit, || {
            let events = self.events();
            done(&events).then_some(events)
        })
        .await
        .unwrap_or_else(|| self.events())
    }

    /// The central system's stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for CentralSystem {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns a central system on `port` (0: ephemeral) logging events to `log_path` (appended);
/// stdout (for the `listening` line) is truncated, stderr appended.
fn spawn_central(
    implementation: Implementation,
    options: &CentralOptions,
    port: u16,
    log_path: &Path,
    stdout_path: &Path,
    stderr_path: &Path,
) -> Child {
    let mut command = command_for(implementation, "central_system.py", "ocpp_rpc_server.mjs");
    command.args([
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--path-prefix",
        PATH_PREFIX,
        "--log",
    ]);
    command.arg(log_path);
    if options.initiate_calls {
        command.arg("--initiate-calls");
    }
    if let Some(password) = &options.password {
        command.args(["--password", password]);
    }
    if let Some(first) = options.first_transaction_id {
        command.args(["--first-transaction-id", &first.to_string()]);
    }
    if let Some(state_file) = &options.state_file {
        command.arg("--state-file").arg(state_file);
    }
    let stderr = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr_path)
        .expect("open stderr file");
    command
        .stdout(fs::File::create(stdout_path).expect("create stdout file"))
        .stderr(stderr);
    command
        .spawn()
        .unwrap_or_else(|e| panic!("spawn central system {implementation:?}: {e}"))
}

/// The outcome of one charge point peer run.
#[derive(Debug)]
pub struct ChargerRun {
    /// Exit status; success means every connection completed its flow.
    pub status: ExitStatus,
    /// The JSON summary line the peer printed (Null if it printed none).
    pub summary: Value,
    /// The peer's stdout and stderr, for failure messages.
    pub stdout: String,
    /// The peer's stderr.
    pub stderr: String,
}

impl ChargerRun {
    /// Panics with everything the peer said unless it succeeded.
    pub fn assert_ok(&self, what: &str) {
        assert!(
            self.status.success() && self.summary["ok"] == Value::Bool(true),
            "{what}: charge point failed ({}).\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
                .chars()
                .rev()
                .take(4000)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        );
    }
}

/// Runs a charge point peer against `url_base` (`/{charge_box_id}` is appended) with extra CLI
/// `args` (e.g. `--sessions 2`, `--expect-central-calls`, `--connections 1000`), bounded by `limit`.
pub async fn run_charger(
    implementation: Implementation,
    url_base: &str,
    charge_box_id: &str,
    args: &[&str],
    limit: Duration,
) -> ChargerRun {
    let mut command = command_for(implementation, "charge_point.py", "ocpp_rpc_charger.mjs");
    // The peer's own deadline is a little shorter than ours, so it can report what was missing.
    let peer_limit_s = (limit.as_secs_f64() - 2.0).max(1.0);
    command
        .args([
            "--url",
            url_base,
            "--id",
            charge_box_id,
            "--timeout",
            &format!("{peer_limit_s}"),
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn charge point {implementation:?}: {e}"));
    let output = within(limit, "charge point peer", child.wait_with_output())
        .await
        .expect("wait for the charge point peer");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let summary = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or(Value::Null);
    ChargerRun {
        status: output.status,
        summary,
        stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The `action` of each event of `kind` (e.g. "call_received") for `charge_box_id`, in order.
pub fn actions<'a>(events: &'a [Value], kind: &str, charge_box_id: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|e| e["event"] == kind && e["charge_box_id"] == charge_box_id)
        .filter_map(|e| e["action"].as_str())
        .collect()
}

/// Asserts one charger's whole flow completed on both ends: the charge point's summary (boot
/// accepted, `sessions` transactions, the central system's calls answered) and the central
/// system's log (every CALL arrived in order; with `central_calls`, each of its calls got the
/// reply it checks for). Waits at most 10 s for the central system's log to catch up.
pub async fn assert_full_flow(
    run: &ChargerRun,
    central: &CentralSystem,
    charge_box_id: &str,
    sessions: usize,
    central_calls: bool,
) {
    run.assert_ok(charge_box_id);
    let summary = &run.summary;
    assert_eq!(
        summary["subprotocol"], "ocpp1.6",
        "negotiated subprotocol: {summary}"
    );
    assert_eq!(summary["boot_status"], "Accepted", "{summary}");
    let transaction_ids = summary["transaction_ids"]
        .as_array()
        .expect("transaction_ids");
    assert_eq!(transaction_ids.len(), sessions, "{summary}");

    let central_calls_expected = if central_calls { 3 } else { 0 };
    let events = central
        .wait_for_events(Duration::from_secs(10), |events| {
            actions(events, "central_call_result", charge_box_id).len() >= central_calls_expected
                && actions(events, "call_received", charge_box_id).contains(&"StopTransaction")
                && actions(events, "call_received", charge_box_id)
                    .iter()
                    .filter(|a| **a == "StopTransaction")
                    .count()
                    >= sessions
        })
        .await;
    let received = actions(&events, "call_received", charge_box_id);
    let meter_values =
        summary["sent"]["MeterValues"].as_u64().unwrap_or(0) as usize / sessions.max(1);
    let mut expected = vec!["BootNotification", "Heartbeat"];
    for _ in 0..sessions {
        expected.push("StartTransaction");
        expected.extend(std::iter::repeat_n("MeterValues", meter_values));
        expected.push("StopTransaction");
    }
    assert_eq!(
        received, expected,
        "CALLs the central system received from {charge_box_id}"
    );

    if central_calls {
        for action in ["RemoteStartTransaction", "Reset", "GetConfiguration"] {
            let result = events
                .iter()
                .find(|e| {
                    e["event"] == "central_call_result"
                        && e["charge_box_id"] == charge_box_id
                        && e["action"] == action
                })
                .unwrap_or_else(|| {
                    panic!("central system never got a reply to {action} from {charge_box_id}")
                });
            assert_eq!(result["ok"], true, "reply to {action}: {result}");
            assert_eq!(
                summary["received_calls"][action], 1,
                "charger saw {action} once: {summary}"
            );
        }
    }
}
