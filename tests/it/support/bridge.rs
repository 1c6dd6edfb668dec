//! The built `ocpp-lago-bridge` binary as a real child process on loopback ports.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::{PATH_PREFIX, net};

/// Path of the daemon binary cargo built for this test run.
pub const BRIDGE_BIN: &str = env!("CARGO_BIN_EXE_ocpp-lago-bridge");

/// How long the daemon may take from spawn to accepting chargers.
const STARTUP_LIMIT: Duration = Duration::from_secs(15);

/// Environment variables the bridge reads that a test sets only on purpose.
const INHERITED_ENV_CLEARED: [&str; 5] = [
    "LAGO_API_KEY",
    "CREDENTIALS_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// How [`Bridge::launch`] starts the bridge.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// TOML appended to the generated config (whole sections other than proxy/admin/spool).
    pub extra_toml: String,
    /// `spool.path`; `None`: `spool.db` in the bridge's temp dir.
    pub spool_path: Option<PathBuf>,
    /// More `[spool]` keys, one `key = value` a line (e.g. `hold_timeout = "1s"`).
    pub spool_keys: String,
    /// Extra environment variables for the child.
    pub env: Vec<(String, String)>,
    /// Return only once the proxy port accepts (else right after spawning).
    pub wait_until_accepting: bool,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        Self {
            extra_toml: String::new(),
            spool_path: None,
            spool_keys: String::new(),
            env: Vec::new(),
            wait_until_accepting: true,
        }
    }
}

/// A running bridge; killed with SIGKILL when dropped.
pub struct Bridge {
    child: Child,
    /// Where chargers connect.
    pub proxy_addr: SocketAddr,
    /// Where `/metrics` and `/healthz` are served.
    pub admin_addr: SocketAddr,
    stderr_path: PathBuf,
    config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bridge {
    /// Starts the bridge relaying to `upstream_url` (a `ws://` base; `/{chargeBoxId}` is appended).
    pub async fn start(upstream_url: &str) -> Bridge {
        Self::start_with(upstream_url, "").await
    }

    /// Like [`Bridge::start`], with extra TOML appended to the generated config (whole sections).
    pub async fn start_with(upstream_url: &str, extra_toml: &str) -> Bridge {
        let options = LaunchOptions {
            extra_toml: extra_toml.to_owned(),
            ..LaunchOptions::default()
        };
        Self::launch(upstream_url, &options).await
    }

    /// Like [`Bridge::start_with`], with the spool path, environment and startup wait of `options`.
    pub async fn launch(upstream_url: &str, options: &LaunchOptions) -> Bridge {
        // The port is picked free, then bound by the child: another process may win that race,
        // so a startup that fails on an address in use is retried with fresh ports.
        let mut last_stderr = String::new();
        for _attempt in 0..3 {
            match Self::try_start(upstream_url, options).await {
                Ok(bridge) => return bridge,
                Err(stderr) if stderr.to_lowercase().contains("in use") => last_stderr = stderr,
                Err(stderr) => panic!("bridge did not start; its stderr:\n{stderr}"),
            }
        }
        panic!("bridge could not bind a port after 3 tries; its stderr:\n{last_stderr}");
    }

    async fn try_start(upstream_url: &str, options: &LaunchOptions) -> Result<Bridge, String> {
        let extra_toml = &options.extra_toml;
        let dir = tempfile::tempdir().expect("temp dir for the bridge");
        let proxy_addr = net::free_addr();
        let admin_addr = net::free_addr();
        let config = format!(
            "[proxy]\nlisten = \"{proxy_addr}\"\npath_prefix = \"{PATH_PREFIX}\"\nupstream_url = \"{upstream_url}\"\n\n\
             [admin]\nlisten = \"{admin_addr}\"\n\n[spool]\npath = \"{spool}\"\n{spool_keys}\n\n{extra_toml}\n",
            spool_keys = options.spool_keys,
            spool = options
                .spool_path
                .clone()
                .unwrap_or_else(|| dir.path().join("spool.db"))
                .display(),
        );
        let config_path = dir.path().join("bridge.toml");
        fs::write(&config_path, config).expect("write bridge config");
        let stderr_path = dir.path().join("bridge.stderr");
        let stderr_file = fs::File::create(&stderr_path).expect("create bridge stderr file");
        let mut command = Command::new(BRIDGE_BIN);
        // What systemd or an operator's shell might have set must not leak into a test.
        for name in INHERITED_ENV_CLEARED {
            command.env_remove(name);
        }
        command.envs(options.env.iter().map(|(k, v)| (k, v)));
        let child = command
            .args(["run", "--config"])
            .arg(&config_path)
            .args(["--log-format", "json"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BRIDGE_BIN}: {e}"));
        let mut bridge = Bridge {
            child,
            proxy_addr,
            admin_addr,
            stderr_path,
            config_path,
            _dir: dir,
        };

        if !options.wait_until_accepting {
            return Ok(bridge);
        }
        let deadline = Instant::now() + STARTUP_LIMIT;
        while Instant::now() < deadline {
            if let Some(status) = bridge.child.try_wait().expect("try_wait on the bridge") {
                return Err(format!("(exited with {status})\n{}", bridge.stderr()));
            }
            if net::wait_until_accepting(proxy_addr, Duration::from_millis(100)).await {
                return Ok(bridge);
            }
        }
        Err(format!(
            "(not accepting on {proxy_addr} after {STARTUP_LIMIT:?})\n{}",
            bridge.stderr()
        ))
    }

    /// The base URL chargers use: `ws://{listen}{path_prefix}`.
    pub fn charger_base_url(&self) -> String {
        format!("ws://{}{PATH_PREFIX}", self.proxy_addr)
    }

    /// The URL charger `charge_box_id` connects to.
    pub fn charger_url(&self, charge_box_id: &str) -> String {
        format!("{}/{charge_box_id}", self.charger_base_url())
    }

    /// Everything the bridge has written to stderr so far (JSON log lines).
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The config file the bridge was started with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// OS process id of the bridge.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `limit` for the exit; SIGKILLs and panics if it takes longer.
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid; the child is not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait on the bridge") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
        panic!(
            "bridge did not exit within {limit:?} of SIGTERM; stderr:\n{}",
            self.stderr()
        );
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the bridge.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; the child is not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// SIGKILLs the bridge and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `Some(status)` if the bridge has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on the bridge")
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `ocpp-lago-bridge check-config --config FILE` on `config_toml`, bounded to 30 s.
pub async fn check_config(config_toml: &str) -> Output {
    let dir = tempfile::tempdir().expect("temp dir for check-config");
    let config_path = dir.path().join("bridge.toml");
    fs::write(&config_path, config_toml).expect("write config");
    let child = tokio::process::Command::new(BRIDGE_BIN)
        .args(["check-config", "--config"])
        .arg(&config_path)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {BRIDGE_BIN}: {e}"));
    super::within(
        Duration::from_secs(30),
        "check-config",
        child.wait_with_output(),
    )
    .await
    .expect("wait for check-config")
}
