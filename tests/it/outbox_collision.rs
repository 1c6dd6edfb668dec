//! Issue 12 "Why": SteVe's database is rebuilt and its transaction ids restart, so ALICE gets
//! transactionId 5 at CB1 and later again at CB2 (and once more at CB1). With the default
//! `{transaction_id}` template those sessions share one Lago transaction_id. Before, the
//! second was derived, logged "event derived", then vanished at the outbox's INSERT OR IGNORE;
//! and `spool requeue` of the held `transaction_id_reused` event printed "requeued 1" and closed
//! it having queued nothing. Now each is a dead letter holding its event, and requeue says "NOT
//! queued" and exits 1.

use std::time::Duration;

use crate::support::admin;
use crate::support::bridge::{BRIDGE_BIN, Bridge};
use crate::support::e2e::{dead_letter_details, spool_counts};
use crate::support::peers::{CentralOptions, CentralSystem, Implementation, run_charger};
use crate::support::poll_until;

const PEER_LIMIT: Duration = Duration::from_secs(30);
const COMMIT_LIMIT: Duration = Duration::from_secs(10);

async fn charge(bridge: &Bridge, charge_box_id: &str) -> i64 {
    let run = run_charger(
        Implementation::Python,
        &bridge.charger_base_url(),
        charge_box_id,
        &[
            "--sessions",
            "1",
            "--meter-values",
            "2",
            "--id-tag",
            "ALICE",
        ],
        PEER_LIMIT,
    )
    .await;
    run.assert_ok(charge_box_id);
    run.summary["transaction_ids"][0]
        .as_i64()
        .unwrap_or_else(|| panic!("no transaction id in {}", run.stdout))
}

async fn requeue(bridge: &Bridge, args: &[&str]) -> (Option<i32>, String) {
    let output = tokio::process::Command::new(BRIDGE_BIN)
        .args(["spool", "requeue"])
        .args(args)
        .arg("--config")
        .arg(bridge.config_path())
        .env_remove("LAGO_API_KEY")
        .output()
        .await
        .expect("run spool requeue");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.code(), stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steve_ids_restarting_never_lose_a_session_and_requeue_says_it_cannot_queue_it() {
    let options = CentralOptions {
        first_transaction_id: Some(5),
        ..CentralOptions::default()
    };
    let mut central = CentralSystem::start(Implementation::Python, options).await;
    // No Lago key: the events stay in the spool, where the operator sees them.
    let mut bridge = Bridge::start(&central.url_base()).await;
    let spool = bridge.spool_path().to_path_buf();

    assert_eq!(charge(&bridge, "CB1").await, 5);
    central.restart().await; // SteVe's database rebuilt: ids start again.
    assert_eq!(charge(&bridge, "CB2").await, 5);
    let counts = poll_until(COMMIT_LIMIT, || {
        let counts = spool_counts(&spool);
        counts
            .dead_letters
            .contains_key("transaction_id_collision")
            .then_some(counts)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "CB2's session vanished: {:?}\n{}",
            spool_counts(&spool),
            bridge.stderr()
        )
    });
    assert_eq!(counts.pending, 1, "CB1's event, untouched: {counts:?}");
    let detail = &dead_letter_details(&spool, "transaction_id_collision")[0];
    assert!(
        detail.contains("session CB1:5") && detail.contains("session CB2:5"),
        "names both sessions: {detail}"
    );
    let stderr = bridge.stderr();
    assert!(
        stderr.lines().any(|l| l.contains("\"WARN\"")
            && l.contains("transaction_id_collision")
            && l.contains("\"charge_box_id\":\"CB2\"")),
        "a WARN naming the charge box:\n{stderr}"
    );
    let (_, metrics) = admin::get(bridge.admin_addr, "/metrics").await;
    assert!(
        metrics
            .contains(r#"ocpp_lago_bridge_anomalies_total{reason="transaction_id_collision"} 1"#),
        "{metrics}"
    );

    // And once more at CB1: the ledger holds it as transaction_id_reused.
    central.restart().await;
    assert_eq!(charge(&bridge, "CB1").await, 5);
    poll_until(COMMIT_LIMIT, || {
        spool_counts(&spool)
            .dead_letters
            .contains_key("transaction_id_reused")
            .then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("no transaction_id_reused: {:?}", spool_counts(&spool)));
    let status = bridge.terminate(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));

    for reason in ["transaction_id_reused", "transaction_id_collision"] {
        let (code, stdout) = requeue(&bridge, &["--reason", reason]).await;
        assert_eq!(code, Some(1), "requeue --reason {reason}:\n{stdout}");
        assert!(
            stdout.contains("NOT queued: transaction_id_collision")
                && stdout.contains("session CB1:5")
                && stdout.contains("requeued 0 dead letter(s)"),
            "{stdout}"
        );
    }
    let counts = spool_counts(&spool);
    assert_eq!(counts.pending, 1, "{counts:?}");
    assert_eq!(
        (
            counts.dead_letters.get("transaction_id_reused"),
            counts.dead_letters.get("transaction_id_collision")
        ),
        // The reuse is two letters: the Start's anomaly, and the Stop's event it holds.
        (Some(&2), Some(&1)),
        "all stay open, holding their events: {counts:?}"
    );
}

/// The same rebuild with a template that tells the sessions apart: both are billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steve_ids_restarting_bill_both_sessions_when_the_template_tells_them_apart() {
    let options = CentralOptions {
        first_transaction_id: Some(5),
        ..CentralOptions::default()
    };
    let mut central = CentralSystem::start(Implementation::Python, options).await;
    let bridge = Bridge::start_with(
        &central.url_base(),
        "[billing]\ntransaction_id = \"{charge_box_id}-{transaction_id}-{started_at}\"\n",
    )
    .await;
    let spool = bridge.spool_path().to_path_buf();
    assert_eq!(charge(&bridge, "CB1").await, 5);
    central.restart().await;
    assert_eq!(charge(&bridge, "CB2").await, 5);
    let counts = poll_until(COMMIT_LIMIT, || {
        let counts = spool_counts(&spool);
        (counts.pending == 2).then_some(counts)
    })
    .await
    .unwrap_or_else(|| panic!("{:?}\n{}", spool_counts(&spool), bridge.stderr()));
    assert!(counts.dead_letters.is_empty(), "{counts:?}");
}
