//! Issue 15 item 1: the spool's operator commands beside the running daemon. `spool stats` and
//! `spool dead-letters` open the file read-only (`SQLITE_OPEN_READ_ONLY`): they work on a
//! running daemon's spool and never create one; `spool requeue` writes under SQLite's locking,
//! and the daemon ships what it queued within a second or two.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use ocpp_lago_bridge::spool::store::{Changes, NewDeadLetter, Store};

use crate::delivery::seeded_event;
use crate::support::bridge::{BRIDGE_BIN, Bridge, BridgeOptions};
use crate::support::e2e;
use crate::support::lago::StoreMode;
use crate::support::peers::{CentralOptions, CentralSystem, Implementation};
use crate::support::poll_until;

/// No CLI command may take longer than this.
const CLI_LIMIT: Duration = Duration::from_secs(30);

async fn cli(config: &Path, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(BRIDGE_BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("LAGO_API_KEY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(CLI_LIMIT, child)
        .await
        .unwrap_or_else(|_| panic!("`{}` did not finish within {CLI_LIMIT:?}", args.join(" ")))
        .expect("run the bridge binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_commands_work_beside_the_daemon_and_its_requeued_row_reaches_lago_within_two_seconds()
 {
    let central = CentralSystem::start(Implementation::Python, CentralOptions::default()).await;
    let lago = e2e::stand_in(StoreMode::Postgres, &["sub-rq"]).await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    {
        // One pending event (it confirms the subscription) and one held by a dead letter.
        let mut store = Store::open(&spool).expect("create the spool");
        let changes = Changes {
            events: vec![seeded_event("rq-1", "sub-rq", "1.5", 1)],
            dead_letters: vec![NewDeadLetter {
                reason: "lago_rejected".into(),
                detail: "rejected before the fix".into(),
                charge_box_id: Some("SEED-1".into()),
                ocpp_transaction_id: Some(10_002),
                id_tag: None,
                event: Some(seeded_event("rq-2", "sub-rq", "2.5", 2)),
            }],
            ..Default::default()
        };
        store
            .append_records(&[changes], 1_767_225_700)
            .expect("seed the spool");
    }
    let key_file = e2e::key_file(&lago, dir.path());
    let bridge = Bridge::start_opts(
        &central.url_base(),
        BridgeOptions {
            extra_toml: e2e::lago_toml(&lago, Some(&key_file), "session"),
            spool_path: Some(spool.clone()),
            ..Default::default()
        },
    )
    .await;
    let stored = |tid: &str| {
        lago.stored_events()
            .iter()
            .any(|row| row.transaction_id == tid)
    };
    poll_until(Duration::from_secs(20), || stored("rq-1").then_some(()))
        .await
        .unwrap_or_else(|| panic!("rq-1 never delivered:\n{}", bridge.stderr()));

    // Read-only commands on the running daemon's spool. Lago holds the event a moment before
    // the shipper's settlement commits, so `stats` is read until it shows the delivery.
    let read_stats = || async {
        let stats = cli(bridge.config_path(), &["spool", "stats", "--json"]).await;
        assert!(stats.status.success(), "stats: {}", text(&stats.stderr));
        serde_json::from_str::<serde_json::Value>(text(&stats.stdout).trim()).unwrap()
    };
    let mut stats = read_stats().await;
    let settled_by = Instant::now() + Duration::from_secs(10);
    while stats["delivered_events"] != 1 && Instant::now() < settled_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
        stats = read_stats().await;
    }
    assert_eq!(stats["delivered_events"], 1, "{stats}");
    assert_eq!(stats["dead_letters"], 1, "{stats}");
    let letters = cli(bridge.config_path(), &["spool", "dead-letters"]).await;
    assert!(
        letters.status.success(),
        "dead-letters: {}",
        text(&letters.stderr)
    );
    assert!(
        text(&letters.stdout).contains("lago_rejected lago_transaction_id=rq-2"),
        "{}",
        text(&letters.stdout)
    );

    // A write beside the daemon: queued under SQLite's locking, shipped by the daemon.
    let requeue = cli(bridge.config_path(), &["spool", "requeue", "--id", "1"]).await;
    assert!(
        requeue.status.success(),
        "requeue: {}\n{}",
        text(&requeue.stdout),
        text(&requeue.stderr)
    );
    let queued = Instant::now();
    poll_until(Duration::from_secs(10), || stored("rq-2").then_some(()))
        .await
        .unwrap_or_else(|| panic!("rq-2 never delivered:\n{}", bridge.stderr()));
    let took = queued.elapsed();
    eprintln!("the requeued row reached Lago {took:?} after the requeue");
    assert!(
        took < Duration::from_secs(2),
        "the requeued row reached Lago {took:?} after the requeue"
    );
}

#[tokio::test]
async fn a_read_only_command_on_a_missing_spool_is_a_clear_error_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent");
    let spool = absent.join("spool.db");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[spool]\npath = \"{}\"\n", spool.display()),
    )
    .unwrap();
    for args in [
        &["spool", "stats"][..],
        &["spool", "stats", "--json"],
        &["spool", "dead-letters"],
    ] {
        let run = cli(&config, args).await;
        assert_eq!(
            run.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&run.stderr)
        );
        let stderr = text(&run.stderr);
        assert!(
            stderr.contains("does not exist") && stderr.contains("spool.db"),
            "{args:?}: {stderr}"
        );
        assert!(!absent.exists(), "{args:?} created {}", absent.display());
    }
}

/// `check-config` probes an existing spool read-only: a running daemon's passes untouched, one
/// written by a newer binary is named, a missing one is not created.
#[tokio::test]
async fn check_config_probes_the_spool_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[spool]\npath = \"{}\"\n", spool.display()),
    )
    .unwrap();
    let check = || async {
        let output = tokio::process::Command::new(BRIDGE_BIN)
            .args(["check-config", "--config"])
            .arg(&config)
            .env_remove("LAGO_API_KEY")
            .env_remove("CREDENTIALS_DIRECTORY")
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(CLI_LIMIT, output)
            .await
            .expect("check-config finishes")
            .expect("run check-config")
    };
    let run = check().await;
    assert!(!spool.exists(), "check-config created the spool");
    assert!(
        !text(&run.stderr).contains("spool.path"),
        "{}",
        text(&run.stderr)
    );

    // A spool in use (held open by a writer, as the daemon holds it) is left as it is.
    let store = Store::open(&spool).unwrap();
    let version = |path: &Path| -> i64 {
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    };
    let run = check().await;
    assert!(
        !text(&run.stderr).contains("spool.path"),
        "{}",
        text(&run.stderr)
    );
    drop(store);

    // Written by a newer binary: named, and not touched.
    let newer = version(&spool) + 1;
    rusqlite::Connection::open(&spool)
        .unwrap()
        .pragma_update(None, "user_version", newer)
        .unwrap();
    let run = check().await;
    assert_eq!(run.status.code(), Some(78), "{}", text(&run.stderr));
    assert!(
        text(&run.stderr).contains("`spool.path`") && text(&run.stderr).contains("newer"),
        "{}",
        text(&run.stderr)
    );
    assert_eq!(version(&spool), newer, "the probe left the file as it was");
}
