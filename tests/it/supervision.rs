//! Crash-only supervision (issue 12 item 1): a task billing depends on that panics makes
//! `/healthz` and `/readyz` fail naming it and the process exit non-zero within seconds, so
//! systemd restarts it; an orderly SIGTERM is not a failure. The panic is injected through
//! `OCPP_LAGO_BRIDGE_TEST_PANIC`, which only debug builds (the ones tests run) honour.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::admin;
use crate::support::bridge::{Bridge, BridgeOptions};
use crate::support::net;

/// When the injected panic fires, after the task starts: the bridge is accepting long before.
const PANIC_AFTER_MS: u64 = 4_000;
/// From the panic to the failed `/healthz`, and from there to the exit.
const NOTICE_LIMIT: Duration = Duration::from_secs(10);
/// "Within seconds": from the panic to the process gone.
const EXIT_LIMIT: Duration = Duration::from_secs(8);

async fn healthz(bridge: &Bridge) -> Option<(u16, Value)> {
    // The admin port refuses once the process is gone: no answer, not a test failure.
    tokio::net::TcpStream::connect(bridge.admin_addr)
        .await
        .ok()?;
    let (status, body) = admin::get(bridge.admin_addr, "/healthz").await;
    Some((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

/// The ERROR line that names the failed `task`.
fn failure_logged(bridge: &Bridge, task: &str) -> String {
    let stderr = bridge.stderr();
    let error_line = stderr
        .lines()
        .find(|l| l.contains("a task billing depends on stopped"))
        .unwrap_or_else(|| panic!("no ERROR line for the failed task:\n{stderr}"))
        .to_owned();
    assert!(
        error_line.contains("\"ERROR\"") && error_line.contains(task),
        "{error_line}"
    );
    error_line
}

/// Starts a bridge (nothing listening upstream: no charger is needed to run the pipeline's
/// tasks) whose `task` panics [`PANIC_AFTER_MS`] after it starts, and reads `/healthz` before
/// that: the bridge, when it started, and that first answer.
async fn start_with_injected_panic(
    task: &str,
    dry_run: bool,
    extra_toml: String,
) -> (Bridge, Instant, (u16, Value)) {
    // A run-time check, so a release test build fails here rather than failing to compile.
    if !cfg!(debug_assertions) {
        panic!("the fault is injected only into debug builds: run the tests without --release");
    }
    let upstream = format!(
        "ws://{}/steve/websocket/CentralSystemService",
        net::dead_addr()
    );
    let options = BridgeOptions {
        dry_run,
        extra_toml,
        env: vec![(
            "OCPP_LAGO_BRIDGE_TEST_PANIC".into(),
            format!("{task}@{PANIC_AFTER_MS}"),
        )],
        ..BridgeOptions::default()
    };
    let started = Instant::now();
    let bridge = Bridge::start_opts(&upstream, options).await;
    let first = healthz(&bridge).await.expect("the admin listener answers");
    assert!(
        started.elapsed() < Duration::from_millis(PANIC_AFTER_MS),
        "the bridge took too long to start to see it healthy first"
    );
    (bridge, started, first)
}

/// Starts a bridge whose `task` panics [`PANIC_AFTER_MS`] after it starts, checks it is healthy
/// before, then that `/healthz` and `/readyz` name the task and the process exits non-zero.
async fn injected_panic_fails_the_bridge(task: &str, dry_run: bool) {
    injected_panic_fails_the_bridge_with(task, dry_run, String::new()).await;
}

/// [`injected_panic_fails_the_bridge`] with `extra_toml` appended to the bridge's config.
async fn injected_panic_fails_the_bridge_with(task: &str, dry_run: bool, extra_toml: String) {
    let (mut bridge, started, (status, body)) =
        start_with_injected_panic(task, dry_run, extra_toml).await;
    assert_eq!(
        (status, &body["status"]),
        (200, &Value::from("ok")),
        "{body}"
    );

    // /healthz fails, naming the task and what happened.
    let deadline = Instant::now() + NOTICE_LIMIT;
    let (status, body) = loop {
        if let Some((status, body)) = healthz(&bridge).await
            && status != 200
        {
            break (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "/healthz never failed; stderr:\n{}",
            bridge.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let failed_seen = started.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "failed", "{body}");
    let reason = body["failed"][task].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("panicked:") && reason.contains("fault injected"),
        "{body}"
    );
    let (status, ready) = admin::get(bridge.admin_addr, "/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert!(ready.contains(task), "/readyz names the task: {ready}");

    // The process exits non-zero, promptly.
    let status = loop {
        if let Some(status) = bridge.exited() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_millis(PANIC_AFTER_MS) + EXIT_LIMIT,
            "the bridge did not exit after {task} failed; stderr:\n{}",
            bridge.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited = started.elapsed();
    assert_eq!(status.code(), Some(1), "stderr:\n{}", bridge.stderr());
    failure_logged(&bridge, task);
    eprintln!(
        "{task}: panic at ~{PANIC_AFTER_MS} ms, /healthz 503 seen at {} ms, exit {:?} at {} ms",
        failed_seen.as_millis(),
        status.code(),
        exited.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_spool_writer_fails_healthz_and_the_process_exits_non_zero() {
    injected_panic_fails_the_bridge("spool_writer", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_shipper_fails_healthz_and_the_process_exits_non_zero() {
    // A dry run ships to stdout: the shipper runs without a Lago.
    injected_panic_fails_the_bridge("shipper", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_accept_loop_fails_healthz_and_the_process_exits_non_zero() {
    injected_panic_fails_the_bridge("proxy_accept", false).await;
}

/// The subscription and metric lookups run only with a Lago to ship to: a stand-in knowing the
/// metric, the key in a file. Before issue 12's audit this helper was a bare `tokio::spawn`:
/// its panic went unnoticed and no unchecked subscription ever cleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_subscription_lookup_task_fails_healthz_and_the_process_exits_non_zero() {
    let lago = crate::support::e2e::stand_in(
        crate::support::lago::StoreMode::Postgres,
        &["sub_supervised"],
    )
    .await;
    let keys = tempfile::tempdir().expect("a directory for the key file");
    let key_file = crate::support::e2e::key_file(&lago, keys.path());
    let lago_toml = crate::support::e2e::lago_toml(&lago, Some(&key_file), "session");
    injected_panic_fails_the_bridge_with("shipper_lookups", false, lago_toml).await;
}

/// The backlog gauges and the `max_pending_age` readiness check: a bare `tokio::spawn` before,
/// so its end froze `/readyz` on its last verdict. It runs in a dry run too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_backlog_watch_fails_healthz_and_the_process_exits_non_zero() {
    injected_panic_fails_the_bridge("shipper_backlog", true).await;
}

/// The admin listener is what answers `/healthz`: once it panicked nothing answers there (the
/// port refuses, which a probe reads as failed), and the process exits non-zero, the ERROR line
/// naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_admin_listener_stops_answering_and_the_process_exits_non_zero() {
    let task = "admin_listener";
    let (mut bridge, started, (status, body)) =
        start_with_injected_panic(task, false, String::new()).await;
    assert_eq!(status, 200, "{body}");

    // The process exits non-zero, promptly; from the panic on, /healthz gets no 200.
    let panic_at = Duration::from_millis(PANIC_AFTER_MS);
    let status = loop {
        if let Some(status) = bridge.exited() {
            break status;
        }
        if started.elapsed() > panic_at + Duration::from_millis(500)
            && let Some((status, body)) = healthz(&bridge).await
        {
            assert_ne!(
                status, 200,
                "/healthz still 200 after the admin listener panicked: {body}"
            );
        }
        assert!(
            started.elapsed() < panic_at + EXIT_LIMIT,
            "the bridge did not exit after {task} failed; stderr:\n{}",
            bridge.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited = started.elapsed();
    assert!(
        exited >= panic_at,
        "exited before the injected panic: {status}"
    );
    assert_eq!(status.code(), Some(1), "stderr:\n{}", bridge.stderr());
    let error_line = failure_logged(&bridge, task);
    assert!(error_line.contains("fault injected"), "{error_line}");
    eprintln!(
        "{task}: panic at ~{PANIC_AFTER_MS} ms, exit {:?} at {} ms",
        status.code(),
        exited.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orderly_sigterm_ends_every_supervised_task_without_a_failure() {
    let upstream = format!(
        "ws://{}/steve/websocket/CentralSystemService",
        net::dead_addr()
    );
    let options = BridgeOptions {
        dry_run: true,
        ..BridgeOptions::default()
    };
    let mut bridge = Bridge::start_opts(&upstream, options).await;
    let (status, _) = healthz(&bridge).await.expect("the admin listener answers");
    assert_eq!(status, 200);
    // The SIGTERM handler is installed once startup is done (READY=1), a moment after the
    // admin port answers; a SIGTERM before it would end the process by the default action.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = bridge.terminate(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", bridge.stderr());
    assert!(
        !bridge
            .stderr()
            .contains("a task billing depends on stopped"),
        "{}",
        bridge.stderr()
    );
}
