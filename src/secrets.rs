//! Secrets the commands and the daemon read: the Lago API key and SteVe's credentials, from a
//! file, a systemd credential or the environment; and the one constructor of the Lago client
//! from the config, so the key goes from where it is kept straight into the client. Shared by
//! `app`, `check`, `operator` and `reconcile`, so it lives below them.
//!
//! Must not: put a secret into a log line, an error or a metric.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{LagoConfig, SteveConfig};
use crate::lago::{ApiKey, LagoClient, LagoClientConfig, LagoError};
use crate::steve::SteveAuth;

/// SteVe ≥ 3.8 takes HTTP Basic (`steve.api_user` + `steve.api_password_file` or
/// `STEVE_API_PASSWORD`); older SteVe the `STEVE-API-KEY` header (`steve.api_key_file` or
/// `STEVE_API_KEY`). `check-config` refuses both at once.
pub fn steve_auth(steve: &SteveConfig) -> Result<SteveAuth, String> {
    match &steve.api_user {
        Some(user) => read_secret(
            "SteVe API password",
            steve.api_password_file.as_deref(),
            None,
            "STEVE_API_PASSWORD",
            "set steve.api_password_file or STEVE_API_PASSWORD",
        )
        .map(|password| SteveAuth::Basic {
            user: user.clone(),
            password,
        }),
        None => read_secret(
            "SteVe API key",
            steve.api_key_file.as_deref(),
            None,
            "STEVE_API_KEY",
            "set steve.api_user and its API password (SteVe >= 3.8), or steve.api_key_file / STEVE_API_KEY (older SteVe)",
        )
        .map(SteveAuth::LegacyKey),
    }
}

/// The Lago API key: `lago.api_key_file`, else the systemd credential `lago-api-key`, else the
/// environment variable `LAGO_API_KEY`. Errors never contain the key.
pub fn read_api_key(api_key_file: Option<&Path>) -> Result<ApiKey, String> {
    read_secret(
        "Lago API key",
        api_key_file,
        Some("lago-api-key"),
        "LAGO_API_KEY",
        "set lago.api_key_file, a systemd credential `lago-api-key` or LAGO_API_KEY",
    )
}

/// How long a Lago client waits, by who uses it; they differ on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagoTimeouts {
    /// The daemon's shipper: `lago.request_timeout` per request, but connecting gives up after
    /// at most 10 s so an unreachable Lago is retried (and reported) soon.
    Daemon,
    /// A command an operator waits for (`replay`, `reconcile`): `lago.request_timeout` for both.
    Command,
    /// A `check-config --online` probe: this bound for both, whatever the config says.
    Probe(Duration),
}

/// Why [`lago_client`] could not build the client.
#[derive(Debug, thiserror::Error)]
pub enum LagoClientError {
    /// The API key could not be read (where it was looked for, never what it holds).
    #[error("{0}")]
    ApiKey(String),
    /// The client refused the URL or the key's bytes.
    #[error(transparent)]
    Client(#[from] LagoError),
}

/// The Lago client `[lago]` names, with the API key read as [`read_api_key`] does: the one way
/// the daemon and every command build it.
pub fn lago_client(
    lago: &LagoConfig,
    timeouts: LagoTimeouts,
) -> Result<LagoClient, LagoClientError> {
    let api_key = read_api_key(lago.api_key_file.as_deref()).map_err(LagoClientError::ApiKey)?;
    let (connect_timeout, request_timeout) = match timeouts {
        LagoTimeouts::Daemon => (
            lago.request_timeout.min(Duration::from_secs(10)),
            lago.request_timeout,
        ),
        LagoTimeouts::Command => (lago.request_timeout, lago.request_timeout),
        LagoTimeouts::Probe(limit) => (limit, limit),
    };
    Ok(LagoClient::new(LagoClientConfig {
        api_url: lago.api_url.url().clone(),
        api_key,
        connect_timeout,
        request_timeout,
    })?)
}

/// A secret from `file`, else the systemd credential `credential` (under
/// `$CREDENTIALS_DIRECTORY`), else the environment variable `var`; trimmed, never empty.
/// Errors name where it was looked for, never what it holds.
fn read_secret(
    what: &str,
    file: Option<&Path>,
    credential: Option<&str>,
    var: &str,
    how_to_set: &str,
) -> Result<ApiKey, String> {
    let credential = credential.and_then(|name| {
        std::env::var_os("CREDENTIALS_DIRECTORY").map(|dir| PathBuf::from(dir).join(name))
    });
    let file = file
        .map(Path::to_path_buf)
        .or(credential.filter(|p| p.exists()));
    let secret = match file {
        Some(path) => {
            if let Some(warning) = secret_file_warning(what, &path) {
                tracing::warn!(%warning, "secret file readable by others");
            }
            std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read the {what} file {}: {e}", path.display()))?
        }
        None => std::env::var(var).map_err(|_| format!("no {what}: {how_to_set}"))?,
    };
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    Ok(ApiKey::new(secret))
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
