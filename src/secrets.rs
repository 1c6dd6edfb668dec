//! Secrets the commands and the daemon read: the Lago API key and SteVe's credentials, from a
//! file, a systemd credential or the environment. Shared by `app`, `check`, `operator` and
//! `reconcile`, so it lives below them.
//!
//! Must not: put a secret into a log line, an error or a metric.

use std::path::{Path, PathBuf};

use crate::config::{SteveConfig, secret_file_warning};
use crate::lago::ApiKey;
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
