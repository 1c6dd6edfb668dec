//! Fakes, peers and process plumbing shared by the integration tests.
#![allow(dead_code)] // Each test uses a different slice of the harness.

pub mod admin;
pub mod bridge;
pub mod e2e;
pub mod http;
pub mod net;
pub mod peers;
pub mod recorder;
pub mod steve;
pub mod ws;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// The path SteVe serves OCPP-J on, and so the one chargers use with the bridge.
pub const PATH_PREFIX: &str = "/steve/websocket/CentralSystemService";

/// The repository root, where `tests/it/peers` and `.ci/run` live.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fault test that cannot inject its fault here (not root, no tmpfs, no fsfreeze, no
/// systemd-analyze): under `CI=true` it fails, so CI never reports a fault test it did not run;
/// elsewhere (a developer's laptop) it says so on stderr and the caller returns.
pub fn cannot_run(test: &str, why: &str) {
    let on_ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    assert!(
        !on_ci,
        "{test} cannot run its fault under CI=true ({why}); .ci/run installs what it needs and runs as root"
    );
    eprintln!("NOT RUN (not under CI=true): {test}: {why}");
}

/// Runs `fut` or panics naming `what` once `limit` has passed, so no test can hang.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: did not finish within {limit:?}"),
    }
}

/// Polls `check` every 20 ms until it returns `Some` or `limit` passes (then `None`).
pub async fn poll_until<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
pub mod lago;
