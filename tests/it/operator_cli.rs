//! The operator CLI (issue 5 item 6) as an operator runs it: the built binary as a child process
//! against a spool seeded through the library, with a temp config naming it. `spool stats`,
//! `spool dead-letters`, `spool requeue` and `replay` (unchanged, and `--rederive` against the
//! Lago stand-in).

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rust_decimal::Decimal;
use serde_json::Value;

use ocpp_lago_bridge::event::{EventProperties, LagoEvent, TimestampSource};
use ocpp_lago_bridge::spool::store::{
    Changes, NewDeadLetter, RecordRow, SessionChanges, SessionRow, Store,
};
use ocpp_lago_bridge::tap::{StartRecord, StopRecord, TapKind, TapRecord};

use crate::support::e2e::{self, spool_counts};
use crate::support::lago::StoreMode;

/// No CLI command may take longer than this.
const CLI_LIMIT: Duration = Duration::from_secs(30);

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// What one CLI run printed and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn assert_ok(&self, what: &str) {
        assert_eq!(
            self.code,
            Some(0),
            "{what}: exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
    }
}

/// Runs the binary with `args`, `--config config` and `env`, killed if it outlives `CLI_LIMIT`.
async fn cli(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ocpp-lago-bridge"));
    command
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("LAGO_API_KEY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("spawn the bridge binary");
    let output: Output = tokio::time::timeout(CLI_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`{}` did not finish within {CLI_LIMIT:?}", args.join(" ")))
        .expect("wait for the bridge binary");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A temp dir holding a config whose `[spool] path` is `spool.db` beside it, plus `extra` TOML.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Setup {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn spool(&self) -> PathBuf {
        self.dir.path().join("spool.db")
    }

    /// Writes `config.toml` with `[spool] path` and `extra` (other sections) and returns it.
    fn config(&self, extra: &str) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        let text = format!(
            "{extra}\n[spool]\npath = \"{}\"\n\n[log]\nformat = \"text\"\n",
            self.spool().display()
        );
        std::fs::write(&path, text).expect("write config");
        path
    }

    fn store(&self) -> Store {
        Store::open(&self.spool()).expect("open the spool")
    }
}

/// A session event as the ledger derives it.
fn event(transaction_id: &str, subscription: &str, charge_box_id: &str, tx: i64) -> LagoEvent {
    LagoEvent {
        transaction_id: transaction_id.into(),
        external_subscription_id: subscription.into(),
        code: e2e::METRIC.into(),
        timestamp: 1_767_225_600 + tx,
        properties: EventProperties {
            value: format!("{tx}.25"),
            charge_box_id: charge_box_id.into(),
            connector_id: 1,
            ocpp_transaction_id: tx,
            meter_start_wh: "0".into(),
            meter_stop_wh: format!("{}", tx * 1000 + 250),
            started_at: 1_767_225_000,
            stopped_at: 1_767_225_600 + tx,
            charger_timestamp: Some(1_767_225_600 + tx),
            received_at: 1_767_225_601 + tx,
            timestamp_source: TimestampSource::Charger,
            origin: None,
        },
    }
}

/// Commits `changes` as the writer would at `at`.
fn commit(store: &mut Store, changes: Changes, at: i64) {
    store
        .append_records(&[changes], at)
        .expect("seed the spool");
}

/// Marks the pending outbox rows of these Lago transaction ids delivered.
fn deliver(store: &mut Store, transaction_ids: &[&str], at: i64) {
    let ids: Vec<i64> = store
        .pending(1_000)
        .expect("pending")
        .into_iter()
        .filter(|row| transaction_ids.contains(&row.event.transaction_id.as_str()))
        .map(|row| row.outbox_id)
        .collect();
    assert_eq!(ids.len(), transaction_ids.len(), "seeded rows to deliver");
    store.mark_delivered(&ids, at).expect("mark delivered");
}

/// Outbox rows as an operator reads them: (lago transaction id, subscription, state, event JSON).
fn outbox(spool: &Path) -> Vec<(String, String, String, String)> {
    let conn =
        rusqlite::Connection::open_with_flags(spool, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the spool read-only");
    let mut stmt = conn
        .prepare(
            "SELECT lago_transaction_id, external_subscription_id, state, event FROM outbox ORDER BY id",
        )
        .expect("outbox query");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .expect("outbox rows")
        .collect::<Result<_, _>>()
        .expect("outbox row")
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
        })
        .collect()
}

/// A dead letter holding an event for want of a subscription (the ledger's unmapped id tag).
fn unmapped(tag: &str, charge_box_id: &str, tx: i64) -> NewDeadLetter {
    NewDeadLetter {
        reason: "unmapped_id_tag".into(),
        detail: format!("no subscription for id tag {tag}"),
        charge_box_id: Some(charge_box_id.into()),
        ocpp_transaction_id: Some(tx),
        id_tag: Some(tag.into()),
        event: Some(event(&tx.to_string(), "", charge_box_id, tx)),
    }
}

/// Two pending (created an hour and a minute ago), one delivered, one `lago_rejected` dead
/// letter and one `unmapped_id_tag` one.
fn seed_mixed(setup: &Setup) {
    let mut store = setup.store();
    let t = now();
    commit(
        &mut store,
        Changes {
            records: vec![RecordRow {
                received_at: t - 3_600,
                charge_box_id: "CB-A".into(),
                ocpp_transaction_id: Some(1),
                kind: "stop",
                json: "{}".into(),
            }],
            sessions: SessionChanges {
                upserts: vec![SessionRow {
                    charge_box_id: "CB-A".into(),
                    ocpp_transaction_id: 1,
                    state_json: "{}".into(),
                }],
                removed: vec![],
            },
            events: vec![
                event("1", "sub-a", "CB-A", 1),
                event("2", "sub-a", "CB-A", 2),
            ],
            ..Default::default()
        },
        t - 3_600,
    );
    commit(
        &mut store,
        Changes {
            events: vec![
                event("3", "sub-b", "CB-B", 3),
                event("4", "sub-b", "CB-B", 4),
            ],
            dead_letters: vec![unmapped("TAG-X", "CB-C", 5)],
            ..Default::default()
        },
        t - 60,
    );
    deliver(&mut store, &["2"], t - 30);
    let four = store
        .pending(10)
        .unwrap()
        .into_iter()
        .find(|r| r.event.transaction_id == "4")
        .unwrap()
        .outbox_id;
    store
        .dead_letter(four, "lago_rejected", "code: metric_not_found", t - 20)
        .unwrap();
}

#[tokio::test]
async fn spool_stats_counts_the_backlog_and_refuses_a_missing_spool() {
    let setup = Setup::new();
    seed_mixed(&setup);
    let config = setup.config("");

    let json = cli(&config, &["spool", "stats", "--json"], &[]).await;
    json.assert_ok("spool stats --json");
    let stats: Value = serde_json::from_str(json.stdout.trim()).expect("one JSON object");
    assert_eq!(stats["pending_events"], 2, "{stats}");
    assert_eq!(stats["delivered_events"], 1, "{stats}");
    assert_eq!(stats["dead_letters"], 2, "{stats}");
    assert_eq!(stats["tap_records"], 1, "{stats}");
    assert_eq!(stats["sessions"], 1, "{stats}");
    assert!(stats["file_bytes"].as_u64().unwrap() > 0, "{stats}");
    let oldest = stats["oldest_pending_created_at"]
        .as_i64()
        .expect("oldest pending present");
    assert!(
        (now() - oldest - 3_600).abs() <= 5,
        "the oldest pending event is the hour-old one: {stats}"
    );

    let text = cli(&config, &["spool", "stats"], &[]).await;
    text.assert_ok("spool stats");
    let field = |name: &str| -> String {
        text.stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name:?} line:\n{}", text.stdout))
            .trim()
            .to_string()
    };
    assert_eq!(field("pending events"), "2");
    assert_eq!(field("delivered events"), "1");
    assert_eq!(field("dead letters"), "2");
    let size: u64 = field("size")
        .strip_suffix(" bytes")
        .expect("size in bytes")
        .parse()
        .unwrap();
    assert!(size > 0);
    let age = field("oldest pending");
    let age = humantime::parse_duration(&age).unwrap_or_else(|e| panic!("age {age:?}: {e}"));
    assert!(
        (3_595..3_700).contains(&age.as_secs()),
        "oldest pending about an hour: {age:?}"
    );

    // Nothing pending: the age says so rather than inventing one.
    let empty = Setup::new();
    drop(empty.store());
    let run = cli(&empty.config(""), &["spool", "stats"], &[]).await;
    run.assert_ok("stats of an empty spool");
    assert!(
        run.stdout.contains("pending events   0") && run.stdout.contains("oldest pending   -"),
        "{}",
        run.stdout
    );
    let run = cli(&empty.config(""), &["spool", "stats", "--json"], &[]).await;
    run.assert_ok("stats --json of an empty spool");
    let stats: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert!(stats["oldest_pending_created_at"].is_null(), "{stats}");

    // A config naming a spool that does not exist: a clear error, no file created.
    let missing = Setup::new();
    let run = cli(&missing.config(""), &["spool", "stats"], &[]).await;
    assert_eq!(run.code, Some(1), "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains("does not exist") && run.stderr.contains("spool.db"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(!missing.spool().exists(), "the CLI must not create a spool");
}

#[tokio::test]
async fn spool_dead_letters_lists_each_open_one_filters_by_reason_and_speaks_json() {
    let setup = Setup::new();
    seed_mixed(&setup);
    let config = setup.config("");

    let run = cli(&config, &["spool", "dead-letters"], &[]).await;
    run.assert_ok("spool dead-letters");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    let unmapped = lines
        .iter()
        .find(|l| l.contains("unmapped_id_tag"))
        .expect("the unmapped dead letter");
    for part in [
        "lago_transaction_id=5",
        "external_subscription_id=- ",
        "charge_box_id=CB-C",
        "ocpp_transaction_id=5",
        "no subscription for id tag TAG-X",
    ] {
        assert!(unmapped.contains(part), "{part:?} missing in {unmapped:?}");
    }
    let rejected = lines
        .iter()
        .find(|l| l.contains("lago_rejected"))
        .expect("the rejected dead letter");
    for part in [
        "lago_transaction_id=4",
        "external_subscription_id=sub-b",
        "charge_box_id=CB-B",
        "ocpp_transaction_id=4",
        "metric_not_found",
    ] {
        assert!(rejected.contains(part), "{part:?} missing in {rejected:?}");
    }

    let run = cli(
        &config,
        &["spool", "dead-letters", "--reason", "lago_rejected"],
        &[],
    )
    .await;
    run.assert_ok("dead-letters --reason");
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.stdout);
    assert!(
        run.stdout.contains("lago_transaction_id=4"),
        "{}",
        run.stdout
    );

    let run = cli(&config, &["spool", "dead-letters", "--reason", "nope"], &[]).await;
    run.assert_ok("dead-letters of an absent reason");
    assert!(run.stdout.trim().is_empty(), "{}", run.stdout);

    let run = cli(&config, &["spool", "dead-letters", "--json"], &[]).await;
    run.assert_ok("dead-letters --json");
    let objects = json_lines(&run.stdout);
    assert_eq!(objects.len(), 2, "{}", run.stdout);
    let rejected = objects
        .iter()
        .find(|o| o["reason"] == "lago_rejected")
        .unwrap();
    assert_eq!(rejected["lago_transaction_id"], "4");
    assert_eq!(rejected["external_subscription_id"], "sub-b");
    assert_eq!(rejected["charge_box_id"], "CB-B");
    assert_eq!(rejected["ocpp_transaction_id"], 4);
    assert_eq!(rejected["requeued"], false);
    let unmapped = objects
        .iter()
        .find(|o| o["reason"] == "unmapped_id_tag")
        .unwrap();
    assert_eq!(unmapped["lago_transaction_id"], "5");
    assert_eq!(unmapped["charge_box_id"], "CB-C");
    assert_eq!(unmapped["ocpp_transaction_id"], 5);

    let run = cli(
        &config,
        &[
            "spool",
            "dead-letters",
            "--json",
            "--reason",
            "unmapped_id_tag",
        ],
        &[],
    )
    .await;
    run.assert_ok("dead-letters --json --reason");
    let objects = json_lines(&run.stdout);
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0]["reason"], "unmapped_id_tag");
}

#[tokio::test]
async fn spool_requeue_maps_held_events_and_requeues_each_dead_letter_once() {
    let setup = Setup::new();
    let t = now();
    {
        let mut store = setup.store();
        commit(
            &mut store,
            Changes {
                events: vec![event("20", "sub-r", "CB-R", 20)],
                dead_letters: vec![
                    unmapped("TAG-MAPPED", "CB-M", 10),
                    unmapped("TAG-STILL-UNKNOWN", "CB-U", 11),
                ],
                ..Default::default()
            },
            t - 100,
        );
        let id = store.pending(1).unwrap()[0].outbox_id;
        store
            .dead_letter(id, "lago_rejected", "code: metric_not_found", t - 50)
            .unwrap();
    }
    let map = setup.dir.path().join("subscriptions.csv");
    std::fs::write(
        &map,
        "id_tag,external_subscription_id\nTAG-MAPPED,sub-mapped\nOTHER,sub-other\n",
    )
    .unwrap();
    let config = setup.config(&format!(
        "[billing]\nsubscription_map_file = \"{}\"\n",
        map.display()
    ));
    let letters = setup.store().dead_letters(None).unwrap();
    let id_of = |reason: &str, cb: &str| {
        letters
            .iter()
            .find(|l| l.reason == reason && l.charge_box_id.as_deref() == Some(cb))
            .unwrap()
            .id
    };
    let (mapped_id, unknown_id, rejected_id) = (
        id_of("unmapped_id_tag", "CB-M"),
        id_of("unmapped_id_tag", "CB-U"),
        id_of("lago_rejected", "CB-R"),
    );

    let run = cli(
        &config,
        &["spool", "requeue", "--reason", "unmapped_id_tag"],
        &[],
    )
    .await;
    // One of the two is still unmapped: said per dead letter, and the exit is not 0.
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("requeued 1 dead letter(s)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("#{mapped_id} unmapped_id_tag CB-M:10: queued (subscription sub-mapped)"))
            && run.stdout.contains(&format!("#{unknown_id} unmapped_id_tag CB-U:11: NOT queued: no subscription for id tag TAG-STILL-UNKNOWN")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("1 left as dead letters")
            && run.stdout.contains("billing.subscription_map_file"),
        "the output says one tag is still unmapped: {}",
        run.stdout
    );
    let rows = outbox(&setup.spool());
    let mapped = rows
        .iter()
        .find(|r| r.0 == "10")
        .expect("the mapped event is in the outbox");
    assert_eq!(
        (mapped.1.as_str(), mapped.2.as_str()),
        ("sub-mapped", "pending")
    );
    let sent: LagoEvent = serde_json::from_str(&mapped.3).unwrap();
    assert_eq!(
        sent,
        event("10", "sub-mapped", "CB-M", 10),
        "the held event, now with its subscription, otherwise unchanged"
    );
    assert!(
        rows.iter().all(|r| r.0 != "11"),
        "the unknown tag stays out"
    );
    let open: Vec<i64> = setup
        .store()
        .dead_letters(None)
        .unwrap()
        .into_iter()
        .filter(|l| !l.requeued)
        .map(|l| l.id)
        .collect();
    assert_eq!(open, vec![unknown_id, rejected_id]);
    assert!(!open.contains(&mapped_id));

    // --id: the Lago-rejected event's outbox row goes back to pending, the same row.
    let run = cli(
        &config,
        &["spool", "requeue", "--id", &rejected_id.to_string()],
        &[],
    )
    .await;
    run.assert_ok("requeue --id");
    assert!(
        run.stdout.contains("requeued 1 dead letter(s)"),
        "{}",
        run.stdout
    );
    let rows = outbox(&setup.spool());
    let rejected: Vec<_> = rows.iter().filter(|r| r.0 == "20").collect();
    assert_eq!(rejected.len(), 1, "{rows:?}");
    assert_eq!(rejected[0].2, "pending");

    // --all with the map now knowing the last tag.
    std::fs::write(
        &map,
        "id_tag,external_subscription_id\nTAG-MAPPED,sub-mapped\nTAG-STILL-UNKNOWN,sub-late\n",
    )
    .unwrap();
    let run = cli(&config, &["spool", "requeue", "--all"], &[]).await;
    run.assert_ok("requeue --all");
    assert!(
        run.stdout.contains("requeued 1 dead letter(s)"),
        "{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains("left as dead letters"),
        "{}",
        run.stdout
    );
    let rows = outbox(&setup.spool());
    let late = rows
        .iter()
        .find(|r| r.0 == "11")
        .expect("the late-mapped event");
    assert_eq!((late.1.as_str(), late.2.as_str()), ("sub-late", "pending"));

    // Requeued once only.
    for args in [
        vec!["spool", "requeue", "--all"],
        vec!["spool", "requeue", "--reason", "unmapped_id_tag"],
        vec!["spool", "requeue", "--id", &mapped_id.to_string()],
    ] {
        let run = cli(&config, &args, &[]).await;
        run.assert_ok("a second requeue");
        assert!(
            run.stdout.contains("requeued 0 dead letter(s)"),
            "{args:?}: {}",
            run.stdout
        );
    }
    assert_eq!(outbox(&setup.spool()).len(), 3);
    let counts = spool_counts(&setup.spool());
    assert_eq!((counts.pending, counts.dead), (3, 0), "{counts:?}");
    assert!(counts.dead_letters.is_empty(), "{counts:?}");

    // Requeue needs to be told which.
    let run = cli(&config, &["spool", "requeue"], &[]).await;
    assert_ne!(run.code, Some(0), "{}", run.stdout);
}

#[tokio::test]
async fn replay_queues_delivered_events_again_byte_identical() {
    let setup = Setup::new();
    let t = now();
    {
        let mut store = setup.store();
        commit(
            &mut store,
            Changes {
                events: vec![event("31", "sub-p", "CB-P", 31)],
                ..Default::default()
            },
            t - 7_200,
        );
        commit(
            &mut store,
            Changes {
                events: vec![
                    event("32", "sub-p", "CB-P", 32),
                    event("33", "sub-q", "CB-Q", 33),
                ],
                ..Default::default()
            },
            t - 600,
        );
        deliver(&mut store, &["31", "32", "33"], t - 300);
    }
    let config = setup.config("");
    let before = outbox(&setup.spool());
    assert!(before.iter().all(|r| r.2 == "delivered"));

    let run = cli(&config, &["replay", "--session", "CB-P:32"], &[]).await;
    run.assert_ok("replay --session");
    assert!(
        run.stdout.starts_with("1 delivered event(s) queued again"),
        "{}",
        run.stdout
    );
    let after = outbox(&setup.spool());
    assert_eq!(after.len(), before.len(), "no new rows: {after:?}");
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a.3, b.3, "the event JSON is byte-identical");
        assert_eq!((&a.0, &a.1), (&b.0, &b.1));
        let expected = if a.0 == "32" { "pending" } else { "delivered" };
        assert_eq!(a.2, expected, "{a:?}");
    }
    let replayed: LagoEvent = serde_json::from_str(&after[1].3).unwrap();
    assert_eq!(replayed, event("32", "sub-p", "CB-P", 32));

    // --since 1h: the two events created ten minutes ago, not the one of two hours ago.
    deliver(&mut setup.store(), &["32"], t);
    let run = cli(&config, &["replay", "--since", "1h"], &[]).await;
    run.assert_ok("replay --since 1h");
    assert!(
        run.stdout.starts_with("2 delivered event(s)"),
        "{}",
        run.stdout
    );
    let after = outbox(&setup.spool());
    let states: Vec<(&str, &str)> = after.iter().map(|r| (r.0.as_str(), r.2.as_str())).collect();
    assert_eq!(
        states,
        [("31", "delivered"), ("32", "pending"), ("33", "pending")]
    );
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a.3, b.3, "the event JSON is byte-identical");
    }

    // An unknown session replays nothing and says it is not found (exit 1, issue 17).
    let run = cli(&config, &["replay", "--session", "CB-P:999"], &[]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("CB-P:999 not found"), "{}", run.stderr);

    // A malformed --session is refused with exit code 2 and changes nothing.
    for bad in ["CB-P", "CB-P:abc", "CB-P:"] {
        let run = cli(&config, &["replay", "--session", bad], &[]).await;
        assert_eq!(run.code, Some(2), "--session {bad:?}: {}", run.stderr);
        assert!(run.stderr.contains("--session"), "{}", run.stderr);
    }
    assert_eq!(outbox(&setup.spool()), after);
}

/// The Start and Stop tap records of one session, as the tap stores them.
fn session_records(charge_box_id: &str, tx: i64, id_tag: &str, t: i64) -> Vec<RecordRow> {
    let start = TapRecord {
        charge_box_id: charge_box_id.into(),
        received_at: t - 3_600,
        kind: TapKind::Start(StartRecord {
            connector_id: 2,
            id_tag: id_tag.into(),
            meter_start_wh: Decimal::from(1_000),
            timestamp: Some(t - 3_600),
            ocpp_transaction_id: tx,
            id_tag_status: "Accepted".into(),
        }),
    };
    let stop = TapRecord {
        charge_box_id: charge_box_id.into(),
        received_at: t - 60,
        kind: TapKind::Stop(StopRecord {
            ocpp_transaction_id: tx,
            meter_stop_wh: Decimal::from(8_250),
            timestamp: Some(t - 60),
            id_tag: Some(id_tag.into()),
            reason: Some("Local".into()),
            begin_reading: None,
            readings: vec![],
        }),
    };
    [("start", start), ("stop", stop)]
        .into_iter()
        .map(|(kind, record)| RecordRow {
            received_at: record.received_at,
            charge_box_id: charge_box_id.into(),
            ocpp_transaction_id: Some(tx),
            kind,
            json: serde_json::to_string(&record).unwrap(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rederive_derives_from_tap_records_only_when_lago_holds_nothing() {
    let lago = e2e::stand_in(StoreMode::Postgres, &["TAG-RD"]).await;
    let key = lago.api_key();
    let env = [("LAGO_API_KEY", key.as_str())];
    let lago_toml = format!(
        "[lago]\napi_url = \"{}\"\nmetric_code = \"{}\"\nrequest_timeout = \"3s\"\n",
        lago.url(),
        e2e::METRIC
    );
    let t = now();

    // Nothing in Lago, nothing in the outbox: the event is derived again and queued.
    let setup = Setup::new();
    commit(
        &mut setup.store(),
        Changes {
            records: session_records("CB-RD", 42, "TAG-RD", t),
            ..Default::default()
        },
        t - 60,
    );
    let config = setup.config(&lago_toml);
    let run = cli(
        &config,
        &["replay", "--session", "CB-RD:42", "--rederive"],
        &env,
    )
    .await;
    run.assert_ok("replay --rederive");
    assert!(
        run.stdout
            .contains("CB-RD:42: 1 event(s) re-derived and queued"),
        "{}",
        run.stdout
    );
    assert_eq!(lago.request_counts().get_event, 1, "asked Lago first");
    let rows = outbox(&setup.spool());
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (tid, sub, state, json) = &rows[0];
    assert_eq!(
        (tid.as_str(), sub.as_str(), state.as_str()),
        ("42", "TAG-RD", "pending")
    );
    let derived: LagoEvent = serde_json::from_str(json).unwrap();
    assert_eq!(derived.code, e2e::METRIC);
    assert_eq!(derived.timestamp, t - 60, "the charger's stop time");
    assert_eq!(derived.properties.value, "7.25", "(8250 - 1000) Wh");
    assert_eq!(derived.properties.charge_box_id, "CB-RD");
    assert_eq!(derived.properties.connector_id, 2);
    assert_eq!(derived.properties.ocpp_transaction_id, 42);
    assert_eq!(derived.properties.started_at, t - 3_600);
    assert!(
        lago.stored_events().is_empty(),
        "replay only queues; the daemon sends"
    );

    // --since finds the same session by its records' receive time.
    let run = cli(&config, &["replay", "--since", "2h", "--rederive"], &env).await;
    run.assert_ok("replay --since --rederive");
    assert!(
        run.stdout
            .contains("CB-RD:42: 1 event(s) re-derived and queued"),
        "{}",
        run.stdout
    );
    assert_eq!(
        outbox(&setup.spool()).len(),
        1,
        "the same row, not a second"
    );

    // Lago already holds the transaction id: skipped, said so, nothing queued.
    lago.seed(serde_json::to_value(&derived).unwrap());
    let held = Setup::new();
    commit(
        &mut held.store(),
        Changes {
            records: session_records("CB-RD", 42, "TAG-RD", t),
            ..Default::default()
        },
        t - 60,
    );
    let run = cli(
        &held.config(&lago_toml),
        &["replay", "--session", "CB-RD:42", "--rederive"],
        &env,
    )
    .await;
    run.assert_ok("replay --rederive of a session Lago holds");
    assert!(
        run.stdout.contains("skipped, Lago already holds 42"),
        "{}",
        run.stdout
    );
    assert!(outbox(&held.spool()).is_empty());

    // Without a key it refuses rather than guessing.
    let run = cli(
        &held.config(&lago_toml),
        &["replay", "--session", "CB-RD:42", "--rederive"],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("no Lago API key"), "{}", run.stderr);
    assert!(!run.stderr.contains(&key));
}

/// Issue 12: `spool requeue` tells per dead letter whether it queued it, closes only what it
/// queued and exits 1 otherwise; `--id N --subscription SUB` bills a `missing_start` (held with
/// no subscription: the Stop's idTag is not the customer's) to the subscription named.
#[tokio::test]
async fn spool_requeue_says_what_it_did_not_queue_and_subscription_bills_a_missing_start() {
    let setup = Setup::new();
    let t = now();
    let first = event("5", "ALICE", "CB1", 5);
    // The same id again after SteVe's database was rebuilt: another session, another value.
    let mut reused = event("5", "ALICE", "CB1", 5);
    reused.properties.value = "9.5".into();
    reused.timestamp += 86_400;
    let orphan = event("CB-X-30", "", "CB-X", 30);
    {
        let mut store = setup.store();
        let letter =
            |reason: &str, cb: &str, tx: i64, tag: &str, event: Option<LagoEvent>| NewDeadLetter {
                reason: reason.into(),
                detail: format!("detail of {reason}"),
                charge_box_id: Some(cb.into()),
                ocpp_transaction_id: Some(tx),
                id_tag: Some(tag.into()),
                event,
            };
        commit(
            &mut store,
            Changes {
                events: vec![first.clone()],
                dead_letters: vec![
                    letter("transaction_id_reused", "CB1", 5, "ALICE", Some(reused)),
                    letter(
                        "missing_start",
                        "CB-X",
                        30,
                        "FLEET-MGR",
                        Some(orphan.clone()),
                    ),
                    letter("invalid_transaction_id", "CB-Y", 0, "BOB", None),
                ],
                ..Default::default()
            },
            t - 100,
        );
    }
    // The map knows the Stop's idTag: a missing_start must still not be billed by it.
    let map = setup.dir.path().join("subscriptions.csv");
    std::fs::write(
        &map,
        "id_tag,external_subscription_id\nFLEET-MGR,sub-fleet\n",
    )
    .unwrap();
    let config = setup.config(&format!(
        "[billing]\nsubscription_map_file = \"{}\"\n",
        map.display()
    ));
    let letters = setup.store().dead_letters(None).unwrap();
    let id_of = |reason: &str| letters.iter().find(|l| l.reason == reason).unwrap().id;
    let (reused_id, missing_id, invalid_id) = (
        id_of("transaction_id_reused"),
        id_of("missing_start"),
        id_of("invalid_transaction_id"),
    );

    let run = cli(&config, &["spool", "requeue", "--all"], &[]).await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    for line in [
        format!(
            "#{reused_id} transaction_id_reused CB1:5: NOT queued: transaction_id_collision: \
             the outbox holds a different event under its transaction_id, of session CB1:5"
        ),
        format!(
            "#{missing_id} missing_start CB-X:30: NOT queued: no subscription (the Stop's idTag \
             is not the customer's)"
        ),
        format!("#{invalid_id} invalid_transaction_id CB-Y:0: NOT queued: no held event"),
        "requeued 0 dead letter(s)".to_string(),
        "3 dead letter(s) NOT queued".to_string(),
    ] {
        assert!(run.stdout.contains(&line), "{line:?} in:\n{}", run.stdout);
    }
    assert!(
        run.stderr
            .contains("not every selected dead letter was queued"),
        "{}",
        run.stderr
    );
    let rows = outbox(&setup.spool());
    assert_eq!(rows.len(), 1, "nothing was queued: {rows:?}");
    assert_eq!(
        serde_json::from_str::<LagoEvent>(&rows[0].3).unwrap(),
        first
    );
    assert_eq!(
        spool_counts(&setup.spool())
            .dead_letters
            .values()
            .sum::<i64>(),
        3,
        "every letter stays open"
    );

    // --subscription needs --id.
    let run = cli(
        &config,
        &["spool", "requeue", "--all", "--subscription", "sub-x"],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(2), "{}\n{}", run.stdout, run.stderr);
    // It does not re-bill an event that has a subscription.
    let run = cli(
        &config,
        &[
            "spool",
            "requeue",
            "--id",
            &reused_id.to_string(),
            "--subscription",
            "sub-x",
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("NOT queued: it is billed to subscription ALICE already"),
        "{}",
        run.stdout
    );

    // The operator names the customer of the orphaned Stop.
    let run = cli(
        &config,
        &[
            "spool",
            "requeue",
            "--id",
            &missing_id.to_string(),
            "--subscription",
            "sub-alice",
        ],
        &[],
    )
    .await;
    run.assert_ok("requeue --id N --subscription SUB");
    assert!(
        run.stdout.contains(&format!(
            "#{missing_id} missing_start CB-X:30: queued (subscription sub-alice)"
        )) && run.stdout.contains("requeued 1 dead letter(s)"),
        "{}",
        run.stdout
    );
    let rows = outbox(&setup.spool());
    let billed = rows.iter().find(|r| r.0 == "CB-X-30").expect("queued");
    assert_eq!(
        (billed.1.as_str(), billed.2.as_str()),
        ("sub-alice", "pending")
    );
    let mut expected = orphan;
    expected.external_subscription_id = "sub-alice".into();
    assert_eq!(
        serde_json::from_str::<LagoEvent>(&billed.3).unwrap(),
        expected,
        "the held event, with the named subscription, otherwise unchanged"
    );
    let open: Vec<i64> = setup
        .store()
        .dead_letters(None)
        .unwrap()
        .into_iter()
        .filter(|l| !l.requeued)
        .map(|l| l.id)
        .collect();
    assert_eq!(open, vec![reused_id, invalid_id]);

    // Documented in --help.
    let help = tokio::process::Command::new(env!("CARGO_BIN_EXE_ocpp-lago-bridge"))
        .args(["spool", "requeue", "--help"])
        .output()
        .await
        .expect("run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--subscription <SUB>") && help.contains("missing_start"),
        "{help}"
    );
}
