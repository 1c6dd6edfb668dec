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
const INHERITED_ENV_CLEARED: [&str; 8] = [
    "RUNTIME_DIRECTORY",
    "LAGO_API_KEY",
    "STEVE_API_KEY",
    "STEVE_API_PASSWORD",
    "CREDENTIALS_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// How to run the bridge besides its upstream.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// Key = value lines added to the generated `[proxy]` section.
    pub proxy_toml: String,
    /// More `[spool]` keys, one `key = value` a line (e.g. `hold_timeout = "1s"`).
    pub spool_keys: String,
    /// More `[admin]` keys, one `key = value` a line (e.g. `header_timeout = "1s"`).
    pub admin_keys: String,
    /// Extra TOML appended to the generated config (whole sections).
    pub extra_toml: String,
    /// Pass `--dry-run`.
    pub dry_run: bool,
    /// Extra environment variables of the process.
    pub env: Vec<(String, String)>,
    /// A spool file to use (e.g. seeded by the test) instead of a fresh one.
    pub spool_path: Option<PathBuf>,
    /// Return only once the proxy port accepts (else right after spawning).
    pub wait_until_accepting: bool,
    /// The open-file limit (soft and hard) the bridge runs under, if not this process's.
    pub fd_limit: Option<u64>,
    /// The umask the bridge starts with, if not this process's.
    pub umask: Option<u32>,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        BridgeOptions {
            proxy_toml: String::new(),
            spool_keys: String::new(),
            admin_keys: String::new(),
            extra_toml: String::new(),
            dry_run: false,
            env: Vec::new(),
            spool_path: None,
            wait_until_accepting: true,
            fd_limit: None,
            umask: None,
        }
    }
}

/// The name the operations tests use for [`BridgeOptions`].
pub type LaunchOptions = BridgeOptions;

/// A running bridge; killed with SIGKILL when dropped.
pub struct Bridge {
    child: Child,
    /// Where chargers connect.
    pub proxy_addr: SocketAddr,
    /// Where `/metrics` and `/healthz` are served.
    pub admin_addr: SocketAddr,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
    config_path: PathBuf,
    spool_path: PathBuf,
    options: BridgeOptions,
    _dir: tempfile::TempDir,
}

impl Bridge {
    /// Starts the bridge relaying to `upstream_url` (a `ws://` base; `/{chargeBoxId}` is appended).
    pub async fn start(upstream_url: &str) -> Bridge {
        Self::start_with(upstream_url, "").await
    }

    /// Like [`Bridge::start`], with extra TOML appended to the generated config (whole sections).
    pub async fn start_with(upstream_url: &str, extra_toml: &str) -> Bridge {
        Self::start_with_proxy(upstream_url, "", extra_toml).await
    }

    /// Like [`Bridge::start_with`], with `proxy_toml` (key = value lines) added to `[proxy]`,
    /// e.g. a small `max_frame_size` or a short `handshake_timeout`.
    pub async fn start_with_proxy(
        upstream_url: &str,
        proxy_toml: &str,
        extra_toml: &str,
    ) -> Bridge {
        let options = BridgeOptions {
            proxy_toml: proxy_toml.into(),
            extra_toml: extra_toml.into(),
            ..Default::default()
        };
        Self::start_opts(upstream_url, options).await
    }

    /// Like [`Bridge::start_opts`], borrowing `options`.
    pub async fn launch(upstream_url: &str, options: &LaunchOptions) -> Bridge {
        Self::start_opts(upstream_url, options.clone()).await
    }

    /// Like [`Bridge::start`], with `options`.
    pub async fn start_opts(upstream_url: &str, options: BridgeOptions) -> Bridge {
        // The port is picked free, then bound by the child: another process may win that race,
        // so a startup that fails on an address in use is retried with fresh ports.
        let mut last_stderr = String::new();
        for _attempt in 0..3 {
            match Self::try_start(upstream_url, &options).await {
                Ok(bridge) => return bridge,
                Err(stderr) if stderr.to_lowercase().contains("in use") => last_stderr = stderr,
                Err(stderr) => panic!("bridge did not start; its stderr:\n{stderr}"),
            }
        }
        panic!("bridge could not bind a port after 3 tries; its stderr:\n{last_stderr}");
    }

    async fn try_start(upstream_url: &str, options: &BridgeOptions) -> Result<Bridge, String> {
        let dir = tempfile::tempdir().expect("temp dir for the bridge");
        let proxy_addr = net::free_addr();
        let admin_addr = net::free_addr();
        let spool_path = options
            .spool_path
            .clone()
            .unwrap_or_else(|| dir.path().join("spool.db"));
        let config = format!(
            "[proxy]\nlisten = \"{proxy_addr}\"\npath_prefix = \"{PATH_PREFIX}\"\nupstream_url = \"{upstream_url}\"\n{proxy_toml}\n\n\
             [admin]\nlisten = \"{admin_addr}\"\n{admin_keys}\n\n[spool]\npath = \"{spool}\"\n{spool_keys}\n\n{extra_toml}\n",
            spool = spool_path.display(),
            spool_keys = options.spool_keys,
            admin_keys = options.admin_keys,
            extra_toml = options.extra_toml,
            proxy_toml = options.proxy_toml,
        );
        let config_path = dir.path().join("bridge.toml");
        fs::write(&config_path, config).expect("write bridge config");
        let stderr_path = dir.path().join("bridge.stderr");
        let stdout_path = dir.path().join("bridge.stdout");
        let child = spawn(
            &config_path,
            dir.path(),
            &stdout_path,
            &stderr_path,
            options,
        );
        let mut bridge = Bridge {
            child,
            proxy_addr,
            admin_addr,
            stderr_path,
            stdout_path,
            config_path,
            spool_path,
            options: options.clone(),
            _dir: dir,
        };
        if !options.wait_until_accepting {
            return Ok(bridge);
        }
        bridge.wait_until_up().await.map(|()| bridge)
    }

    /// SIGKILLs the bridge and starts it again: same config, ports and spool; its stdout and
    /// stderr are appended to. Panics if it is not accepting within the startup limit.
    pub async fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        // The ports were ours a moment ago; a lingering socket may hold one for a short while.
        for _attempt in 0..20 {
            self.child = spawn(
                &self.config_path,
                self._dir.path(),
                &self.stdout_path,
                &self.stderr_path,
                &self.options,
            );
            match self.wait_until_up().await {
                Ok(()) => return,
                Err(stderr) if stderr.to_lowercase().contains("in use") => {
                    last = stderr;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(stderr) => panic!("bridge did not restart; its stderr:\n{stderr}"),
            }
        }
        panic!("bridge could not rebind its ports on restart; its stderr:\n{last}");
    }

    async fn wait_until_up(&mut self) -> Result<(), String> {
        let proxy_addr = self.proxy_addr;
        let bridge = self;
        let deadline = Instant::now() + STARTUP_LIMIT;
        while Instant::now() < deadline {
            if let Some(status) = bridge.child.try_wait().expect("try_wait on the bridge") {
                return Err(format!("(exited with {status})\n{}", bridge.stderr()));
            }
            if net::wait_until_accepting(proxy_addr, Duration::from_millis(100)).await {
                return Ok(());
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

    /// Everything the bridge has written to stdout so far (dry-run events).
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// The spool file of the bridge.
    pub fn spool_path(&self) -> &Path {
        &self.spool_path
    }

    /// The directory holding the bridge's config, spool and output.
    pub fn dir(&self) -> &Path {
        self._dir.path()
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

    /// Sends SIGHUP: the bridge re-reads its TLS certificate, allowlist and config file.
    pub fn reload(&self) {
        // SAFETY: kill(2) on our own child's pid; the child is not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGHUP) };
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

/// Spawns the daemon on `config_path`, appending to its output files.
fn spawn(
    config_path: &Path,
    dir: &Path,
    stdout_path: &Path,
    stderr_path: &Path,
    options: &BridgeOptions,
) -> Child {
    let append = |path: &Path| {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
    };
    let mut command = Command::new(BRIDGE_BIN);
    // What systemd or an operator's shell might have set must not leak into a test.
    for name in INHERITED_ENV_CLEARED {
        command.env_remove(name);
    }
    command
        .args(["run", "--config"])
        .arg(config_path)
        .args(["--log-format", "json"]);
    if options.dry_run {
        command.arg("--dry-run");
    }
    let (fd_limit, umask) = (options.fd_limit, options.umask);
    if fd_limit.is_some() || umask.is_some() {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only async-signal-safe calls (setrlimit, umask) run.
        unsafe {
            command.pre_exec(move || {
                if let Some(limit) = fd_limit {
                    let limit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(mask) = umask {
                    libc::umask(mask as libc::mode_t);
                }
                Ok(())
            });
        }
    }
    command
        .envs(options.env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(append(stdout_path))
        .stderr(append(stderr_path))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {BRIDGE_BIN}: {e}"))
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
