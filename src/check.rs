//! `check-config`: every problem of a configuration in one run. Offline: the structure and
//! values, every file the config names, the spool directory, the secrets' modes and the
//! open-file limit. With `--online` it also reaches SteVe and Lago, each bounded in time, all
//! at once. Exit code: 78 (EX_CONFIG) on any problem, else 69 (EX_UNAVAILABLE) when a service
//! is unreachable, else 0.
//!
//! The shape of `lago.api_url` (e.g. one ending in `/api/v1`) is judged where the URL is
//! parsed, in `config/reader.rs`, by the Lago interop work (issue 17 item 1 cites it).

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

/// EX_CONFIG from sysexits.h: the configuration is invalid.
pub const EXIT_CONFIG: u8 = 78;
/// EX_UNAVAILABLE from sysexits.h: a service the configuration names cannot be reached.
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Longest one online probe may take; they run concurrently, so this bounds `--online`.
pub const PROBE_LIMIT: Duration = Duration::from_secs(10);

/// The chargeBoxId the SteVe probe opens a WebSocket for; SteVe refuses unknown ids with 404,
/// which proves it is there and speaks WebSocket at that path.
pub const PROBE_CHARGE_BOX_ID: &str = "ocpp-lago-bridge-check-config";

/// Modes wider than this on a secret (API key, TLS key) are a warning.
const SECRET_MODE: u32 = 0o640;

/// What one online probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Reached and answered as it should.
    Ok(String),
    /// Reached, but the configuration is wrong for it (refused key, missing metric).
    Problem(String),
    /// Not reachable (refused, timed out, name not resolved).
    Unreachable(String),
}

/// Everything `check-config` found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub source: String,
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
    /// (service, what its probe found), in a fixed order.
    pub probes: Vec<(&'static str, Probe)>,
    /// Whether `--online` ran.
    pub online: bool,
}

impl Report {
    /// 78 on any problem (offline or online), else 69 when a service is unreachable, else 0.
    pub fn exit_code(&self) -> u8 {
        let probe_problem = self
            .probes
            .iter()
            .any(|(_, p)| matches!(p, Probe::Problem(_)));
        let unreachable = self
            .probes
            .iter()
            .any(|(_, p)| matches!(p, Probe::Unreachable(_)));
        if !self.problems.is_empty() || probe_problem {
            EXIT_CONFIG
        } else if unreachable {
            EXIT_UNAVAILABLE
        } else {
            0
        }
    }

    /// The verdict line(s) for stdout.
    pub fn stdout(&self) -> String {
        let mut out = String::new();
        for (service, probe) in &self.probes {
            if let Probe::Ok(detail) = probe {
                let _ = writeln!(out, "ok: {service}: {detail}");
            }
        }
        match self.exit_code() {
            0 if self.online => {
                let _ = writeln!(out, "configuration is valid; SteVe and Lago answer");
            }
            0 => {
                let _ = writeln!(
                    out,
                    "configuration is valid (offline checks; --online also reaches SteVe and Lago)"
                );
            }
            _ => {}
        }
        out
    }

    /// Problems, unreachable services and warnings for stderr, every one at once.
    pub fn stderr(&self) -> String {
        let mut out = String::new();
        let online_problems: Vec<_> = self
            .probes
            .iter()
            .filter(|(_, p)| !matches!(p, Probe::Ok(_)))
            .collect();
        if !self.problems.is_empty() {
            let _ = writeln!(
                out,
                "{}: {} problem(s) in the configuration:",
                self.source,
                self.problems.len()
            );
            for problem in &self.problems {
                let _ = writeln!(out, "  - {problem}");
            }
        }
        for (service, probe) in online_problems {
            match probe {
                Probe::Problem(detail) => {
                    let _ = writeln!(out, "problem: {service}: {detail}");
                }
                Probe::Unreachable(detail) => {
                    let _ = writeln!(out, "unreachable: {service}: {detail}");
                }
                Probe::Ok(_) => {}
            }
        }
        for warning in &self.warnings {
            let _ = writeln!(out, "warning: {warning}");
        }
        out
    }
}

/// Runs every check on the config at `path` (see [`Config::load`] for `None`).
pub async fn check_config(path: Option<&Path>, online: bool) -> Report {
    let checked = Config::check(path);
    let mut report = Report {
        source: checked.source,
        problems: checked.problems,
        online,
        ..Report::default()
    };
    let Some(config) = checked.config else {
        return report;
    };
    local_checks(&config, &mut report);
    if online && !report.problems.is_empty() {
        // Invalid values were replaced by defaults: probing those would report on services
        // the operator never named.
        report
            .warnings
            .push("--online: SteVe and Lago were not probed; fix the problems above first".into());
    } else if online {
        let (steve_ws, steve_rest, lago) = tokio::join!(
            bounded(probe_steve_websocket(&config)),
            bounded(probe_steve_rest(&config)),
            bounded(probe_lago(&config)),
        );
        report.probes.push(("SteVe WebSocket", steve_ws));
        if let Some(rest) = steve_rest {
            report.probes.push(("SteVe REST", rest));
        }
        report.probes.push(("Lago", lago));
    }
    report
}

/// Files, directories and limits: what `run` needs from this machine.
fn local_checks(config: &Config, report: &mut Report) {
    // The Lago key: a named file must be readable and hold a key; without one, the service's
    // environment (systemd credential, LAGO_API_KEY) may still provide it, so that is a warning.
    match &config.lago.api_key_file {
        Some(file) => {
            if let Err(problem) = crate::secrets::read_api_key(Some(file)) {
                report
                    .problems
                    .push(format!("`lago.api_key_file`: {problem}"));
            } else {
                secret_mode("lago.api_key_file", file, report);
            }
        }
        None => {
            if let Err(problem) = crate::secrets::read_api_key(None) {
                report.warnings.push(format!(
                    "{problem} (in this environment): `run` keeps events in the spool and sends none until it has one"
                ));
            }
        }
    }
    let steve_secrets = [
        ("steve.api_key_file", &config.steve.api_key_file),
        ("steve.api_password_file", &config.steve.api_password_file),
    ];
    for (key, file) in steve_secrets {
        let (true, Some(file)) = (config.steve.api_url.is_some(), file) else {
            continue;
        };
        match std::fs::read_to_string(file) {
            Ok(secret) if !secret.trim().is_empty() => secret_mode(key, file, report),
            Ok(_) => report
                .problems
                .push(format!("`{key}`: {} is empty", file.display())),
            Err(e) => report
                .problems
                .push(format!("`{key}`: cannot read {}: {e}", file.display())),
        }
    }
    if let Some(tls) = &config.proxy.tls {
        secret_mode("proxy.tls.key_file", &tls.key_file, report);
    }
    if let Some(problem) = spool_path_problem(&config.spool.path) {
        report.problems.push(problem);
    } else if let Some(problem) = spool_file_problem(&config.spool.path) {
        report.problems.push(problem);
    }
    if let Some(warning) = fd_limit_warning(config.proxy.max_connections) {
        report.warnings.push(warning);
    }
}

fn secret_mode(key: &str, file: &Path, report: &mut Report) {
    let Ok(metadata) = std::fs::metadata(file) else {
        return;
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & !SECRET_MODE != 0 {
        report.warnings.push(format!(
            "`{key}`: {} has mode {mode:04o}, wider than {SECRET_MODE:04o}: others can read or change the secret; chmod 0600 it",
            file.display()
        ));
    }
}

/// Why the spool cannot live at `path`: an ancestor that is a file, a directory in its place,
/// or a directory the bridge cannot write to. `None` when it can be created or opened.
pub fn spool_path_problem(path: &Path) -> Option<String> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            return Some(format!(
                "`spool.path` = \"{shown}\" is a directory; name a file in it, e.g. \"{}\"",
                path.join("spool.db").display()
            ));
        }
        Ok(_) => {
            return (!writable(path))
                .then(|| format!("`spool.path` = \"{shown}\": the spool file is not writable"));
        }
        Err(_) => {}
    }
    // The nearest ancestor that exists must be a directory the bridge can create the rest in.
    let mut ancestor: PathBuf = path.to_path_buf();
    while ancestor.pop() {
        let dir = if ancestor.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            ancestor.clone()
        };
        match std::fs::metadata(&dir) {
            Ok(meta) if !meta.is_dir() => {
                return Some(format!(
                    "`spool.path` = \"{shown}\" lies under {}, which is a file, not a directory",
                    dir.display()
                ));
            }
            Ok(_) if !writable(&dir) => {
                return Some(format!(
                    "`spool.path` = \"{shown}\": the directory {} is not writable",
                    dir.display()
                ));
            }
            Ok(_) => return None,
            Err(_) => continue,
        }
    }
    None
}

/// Why an existing spool file cannot be used by this binary (not a spool, or a newer schema),
/// read through a read-only connection: the probe never creates, migrates or writes it, so it is
/// safe beside the running daemon. An absent file or an older schema is fine (the daemon
/// creates or migrates it at start).
fn spool_file_problem(path: &Path) -> Option<String> {
    use crate::spool::store::{Store, StoreError};
    match Store::open_read_only(path) {
        Ok(_) | Err(StoreError::Missing(_) | StoreError::OlderSchema { .. }) => None,
        Err(error) => Some(format!("`spool.path` = \"{}\": {error}", path.display())),
    }
}

fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) only reads the NUL-terminated path we pass.
    unsafe { libc::access(c_path.as_ptr(), libc::W_OK) == 0 }
}

async fn bounded<T: From<Probe>>(probe: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PROBE_LIMIT, probe)
        .await
        .unwrap_or_else(|_| {
            Probe::Unreachable(format!("no answer within {}s", PROBE_LIMIT.as_secs())).into()
        })
}

/// Opens a WebSocket to `{upstream_url}/{PROBE_CHARGE_BOX_ID}` offering `ocpp1.6`.
async fn probe_steve_websocket(config: &Config) -> Probe {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::{Error, http};
    let url = format!("{}/{PROBE_CHARGE_BOX_ID}", config.proxy.upstream_url);
    let mut request = match url.as_str().into_client_request() {
        Ok(request) => request,
        Err(e) => return Probe::Problem(format!("{url} is not a WebSocket URL: {e}")),
    };
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        http::HeaderValue::from_static("ocpp1.6"),
    );
    crate::ensure_rustls_provider();
    let tls = match crate::tls::client_config(config.proxy.upstream_ca_file.as_deref()) {
        Ok(tls) => tls,
        Err(e) => return Probe::Problem(e.to_string()),
    };
    let connector = tokio_tungstenite::Connector::Rustls(tls);
    let upstream = &config.proxy.upstream_url;
    match tokio_tungstenite::connect_async_tls_with_config(request, None, false, Some(connector))
        .await
    {
        Ok((mut socket, _)) => {
            let _ = socket.close(None).await;
            Probe::Ok(format!(
                "{upstream} accepted a WebSocket for the test id {PROBE_CHARGE_BOX_ID}"
            ))
        }
        Err(Error::Http(response)) => {
            let status = response.status().as_u16();
            if status == 404 {
                Probe::Ok(format!(
                    "{upstream} answers WebSocket upgrades (HTTP 404 for the unregistered test id {PROBE_CHARGE_BOX_ID}, as SteVe does)"
                ))
            } else {
                Probe::Problem(format!(
                    "{upstream} answered the WebSocket upgrade for the test id with HTTP {status}: is `proxy.upstream_url` SteVe's WebSocket path?"
                ))
            }
        }
        Err(Error::Tls(e)) => Probe::Problem(format!(
            "{upstream}: TLS failed ({e}); check `proxy.upstream_ca_file`"
        )),
        Err(Error::Io(e)) => Probe::Unreachable(format!("{upstream}: {e}")),
        Err(e) => Probe::Problem(format!("{upstream}: the WebSocket handshake failed: {e}")),
    }
}

/// With `[steve] api_url`: one authenticated REST call (a transaction lookup that finds
/// nothing) proves the URL and the key.
async fn probe_steve_rest(config: &Config) -> Option<Probe> {
    let base = config.steve.api_url.as_ref()?;
    let api_url = base.as_str();
    let auth = match crate::secrets::steve_auth(&config.steve) {
        Ok(auth) => auth,
        Err(problem) => return Some(Probe::Problem(problem)),
    };
    let client = match crate::steve::SteveClient::new(base.url(), auth, PROBE_LIMIT) {
        Ok(client) => client,
        Err(e) => return Some(Probe::Problem(e.to_string())),
    };
    use crate::steve::SteveError;
    Some(
        match client
            .recover_start(PROBE_CHARGE_BOX_ID, 0, crate::clock::unix_now())
            .await
        {
            Ok(_) => Probe::Ok(format!("{api_url} accepted the credentials")),
            Err(SteveError::Status {
                status: status @ (401 | 403),
                ..
            }) => Probe::Problem(format!(
                "{api_url} refused the credentials (HTTP {status}): fix steve.api_user + steve.api_password_file / STEVE_API_PASSWORD (SteVe >= 3.8), or steve.api_key_file / STEVE_API_KEY (older SteVe)"
            )),
            Err(SteveError::Status { status, .. }) => Probe::Problem(format!(
                "{api_url} answered HTTP {status}: is `steve.api_url` SteVe's base URL (e.g. http://127.0.0.1:8080/steve)?"
            )),
            Err(SteveError::Http(e)) => Probe::Unreachable(format!("{api_url}: {e}")),
            Err(e @ SteveError::Schema(_)) => Probe::Problem(format!("{api_url}: {e}")),
        },
    )
}

/// The key is valid and the billable metric sums `value` (anything else bills 0).
async fn probe_lago(config: &Config) -> Probe {
    use crate::lago::LagoError;
    use crate::secrets::{LagoClientError, LagoTimeouts};
    let api_url = &config.lago.api_url;
    let client = match crate::secrets::lago_client(&config.lago, LagoTimeouts::Probe(PROBE_LIMIT)) {
        Ok(client) => client,
        Err(LagoClientError::ApiKey(problem)) => {
            return Probe::Problem(format!("cannot ask {api_url}: {problem}"));
        }
        Err(LagoClientError::Client(e)) => return Probe::Problem(e.to_string()),
    };
    let code = &config.lago.metric_code;
    match client.get_billable_metric(code).await {
        Ok(Some(metric)) if metric.sums_field("value") => Probe::Ok(format!(
            "{api_url} accepted the API key; billable metric \"{code}\" sums \"value\""
        )),
        Ok(Some(metric)) => Probe::Problem(format!(
            "billable metric \"{code}\" is {} on field {}: it must be sum_agg on \"value\" or every event bills 0",
            metric.aggregation_type,
            metric
                .field_name
                .as_deref()
                .map_or("(none)".to_string(), |f| format!("\"{f}\""))
        )),
        Ok(None) => Probe::Problem(format!(
            "billable metric \"{code}\" does not exist in Lago at {api_url}: create it (sum_agg on \"value\") or fix `lago.metric_code`"
        )),
        Err(LagoError::Unauthorized { status }) => Probe::Problem(format!(
            "{api_url} refused the API key (HTTP {status}): fix lago.api_key_file / LAGO_API_KEY"
        )),
        Err(LagoError::Transient(cause)) => Probe::Unreachable(format!("{api_url}: {cause}")),
        Err(e) => Probe::Problem(format!("{api_url}: {e}")),
    }
}

/// A warning when the open-file limit is below what `proxy.max_connections` needs (each
/// charger holds two sockets: its own and SteVe's); `None` when it fits, or when
/// `max_connections` is off (`None`) and so sized from the limit itself. The daemon logs it
/// at start too.
pub fn fd_limit_warning(max_connections: Option<std::num::NonZeroUsize>) -> Option<String> {
    let (soft, hard) = crate::rlimit::open_file_limit()?;
    fd_limit_shortfall(max_connections.map_or(0, |n| n.get()), soft, hard)
}

fn fd_limit_shortfall(max_connections: usize, soft: u64, hard: u64) -> Option<String> {
    let fit = crate::rlimit::chargers_within(soft);
    (max_connections as u64 > fit).then(|| {
        format!(
            "`proxy.max_connections` = {max_connections} needs about {} open files, but the open-file limit is {soft} (hard {hard}): room for about {fit} chargers, and those beyond get 503 `fds_exhausted`; raise LimitNOFILE= (systemd) or `ulimit -n`, or lower max_connections",
            (max_connections as u64).saturating_mul(2).saturating_add(64)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spool_path_under_a_file_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, "x").unwrap();
        let problem = spool_path_problem(&file.join("sub/spool.db")).expect("under a file");
        assert!(problem.contains("is a file"), "{problem}");
        assert!(spool_path_problem(dir.path()).is_some(), "a directory");
        assert_eq!(
            spool_path_problem(&dir.path().join("new/dir/spool.db")),
            None
        );
        assert_eq!(spool_path_problem(&file), None, "an existing writable file");
    }

    #[test]
    fn problems_outrank_unreachable_services() {
        let mut report = Report::default();
        assert_eq!(report.exit_code(), 0);
        report
            .probes
            .push(("Lago", Probe::Unreachable("refused".into())));
        assert_eq!(report.exit_code(), EXIT_UNAVAILABLE);
        report.problems.push("bad".into());
        assert_eq!(report.exit_code(), EXIT_CONFIG);
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
}
