//! The single writer: tap records in, ledger applied, records + session state + events + dead
//! letters committed in one transaction per group, then every charger reply waiting on that group
//! released. Group commit: whatever queued up while the last fsync ran goes into the next one.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};

use super::store::{Changes, NewDeadLetter, RecordRow, SessionRow, Store, StoreError};
use crate::ledger::{Applied, BillingRules, Ledger, SessionKey, SessionState};
use crate::steve::SteveClient;
use crate::tap::{TapKind, TapRecord};
use crate::telemetry::Readiness;

/// Most commands taken into one group commit.
const MAX_GROUP: usize = 4096;
/// How long after a failed commit the writer tries again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);
/// The writer's loop turns at least this often, so its heartbeat proves it is not stuck.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Readiness check name of the writer.
pub const READY_CHECK: &str = "spool";

/// A request to the writer.
#[derive(Debug)]
pub enum Command {
    /// Persist a tap record (and what the ledger derives from it); `committed` fires once on disk.
    Record {
        record: TapRecord,
        committed: oneshot::Sender<()>,
    },
    /// Outbox rows Lago stored.
    Delivered {
        ids: Vec<i64>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// A failed delivery attempt on pending rows (they stay pending), with each row's new
    /// retry state.
    Attempted {
        retry: Vec<(i64, super::store::RetryState)>,
        error: String,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Outbox rows that can never be delivered as they are.
    DeadLetter {
        id: i64,
        reason: String,
        detail: String,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// New billing rules (subscription map reloaded on SIGHUP).
    Rules(Arc<BillingRules>),
}

/// The writer's settings.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    /// Most uncommitted tap records kept in memory while the spool cannot commit.
    pub max_backlog: usize,
    /// Delivered events (and their sessions' tap records) older than this are pruned.
    pub retention: Duration,
    /// The spool must never reach this size; alarms start at 80 %.
    pub disk_cap_bytes: u64,
    /// The spool file, for its size.
    pub path: std::path::PathBuf,
    /// Recovers the start of sessions the bridge never saw from SteVe's REST API.
    pub steve: Option<SteveClient>,
}

/// Opens the spool, rebuilds the ledger from it and returns the writer's future.
pub fn start(
    store: Store,
    rules: Arc<BillingRules>,
    settings: WriterSettings,
    readiness: Readiness,
    events_committed: Arc<Notify>,
    heartbeat: Arc<AtomicI64>,
) -> Result<(mpsc::Sender<Command>, impl Future<Output = ()>), StoreError> {
    let mut sessions = Vec::new();
    for row in store.sessions()? {
        sessions.push(serde_json::from_str::<SessionState>(&row.state_json)?);
    }
    tracing::info!(sessions = sessions.len(), "ledger restored from the spool");
    let ledger = Ledger::from_sessions(sessions);
    let (tx, rx) = mpsc::channel(MAX_GROUP * 4);
    // Make sure a restart ships whatever was committed but not delivered before it.
    events_committed.notify_one();
    let writer = Writer {
        store: Some(store),
        ledger,
        rules,
        settings,
        readiness,
        events_committed,
        heartbeat,
        backlog: VecDeque::new(),
        next_housekeeping: std::time::Instant::now(),
        next_prune: std::time::Instant::now(),
    };
    Ok((tx, writer.run(rx)))
}

struct Writer {
    /// Taken while a blocking commit runs, put back after.
    store: Option<Store>,
    ledger: Ledger,
    rules: Arc<BillingRules>,
    settings: WriterSettings,
    readiness: Readiness,
    events_committed: Arc<Notify>,
    /// Unix seconds of the loop's last turn (the systemd watchdog checks it).
    heartbeat: Arc<AtomicI64>,
    /// Applied but not yet committed, in order, with the replies waiting on them.
    backlog: VecDeque<(Changes, Option<oneshot::Sender<()>>)>,
    next_housekeeping: std::time::Instant,
    next_prune: std::time::Instant,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut commands = Vec::with_capacity(MAX_GROUP);
        loop {
            self.heartbeat.store(unix_now(), Ordering::Relaxed);
            commands.clear();
            // With a backlog (the last commit failed) retry soon, taking in what arrives meanwhile.
            let wait = if self.backlog.is_empty() {
                HEARTBEAT
            } else {
                RETRY_AFTER_FAILURE
            };
            tokio::select! {
                n = rx.recv_many(&mut commands, MAX_GROUP) => if n == 0 { break },
                _ = tokio::time::sleep(wait) => {}
            }
            self.housekeeping().await;
            let mut store_ops = Vec::new();
            for command in commands.drain(..) {
                match command {
                    Command::Record { record, committed } => {
                        let steve = self.settings.steve.as_ref();
                        if let Some(start) = recover_start(steve, &self.ledger, &record).await {
                            let applied = self.ledger.apply(&start, &self.rules);
                            let changes = self.changes(&start, applied);
                            self.backlog.push_back((changes, None));
                        }
                        let applied = self.ledger.apply(&record, &self.rules);
                        let changes = self.changes(&record, applied);
                        self.backlog.push_back((changes, Some(committed)));
                    }
                    Command::Rules(rules) => self.rules = rules,
                    other => store_ops.push(other),
                }
            }
            self.bound_backlog();
            if !self.backlog.is_empty() {
                self.commit_backlog().await;
            }
            if !store_ops.is_empty() {
                self.run_store_ops(store_ops).await;
            }
        }
        // The channel closed: every sender is gone (shutdown). Try once more to save the rest.
        if !self.backlog.is_empty() {
            self.commit_backlog().await;
        }
        if !self.backlog.is_empty() {
            tracing::error!(
                records = self.backlog.len(),
                "tap records could not be written to the spool before exit and are lost; the chargers were answered after the hold timeout"
            );
        }
    }

    /// Turns what the ledger derived from `record` into rows, logging and counting on the way.
    fn changes(&self, record: &TapRecord, applied: Applied) -> Changes {
        let (kind, ocpp_transaction_id) = match &record.kind {
            TapKind::Start(s) => ("start", s.ocpp_transaction_id),
            TapKind::MeterValues(m) => ("meter_values", m.ocpp_transaction_id),
            TapKind::Stop(s) => ("stop", s.ocpp_transaction_id),
        };
        metrics::counter!("ocpp_lago_bridge_tap_records_total", "kind" => kind).increment(1);
        for ignored in &applied.ignored {
            metrics::counter!("ocpp_lago_bridge_ledger_ignored_total", "reason" => ignored.as_str())
                .increment(1);
        }
        for event in &applied.events {
            metrics::counter!("ocpp_lago_bridge_events_derived_total").increment(1);
            tracing::info!(
                charge_box_id = %record.charge_box_id,
                ocpp_transaction_id,
                lago_transaction_id = %event.transaction_id,
                external_subscription_id = %event.external_subscription_id,
                value_kwh = %event.properties.value,
                "event derived"
            );
        }
        let mut dead_letters = Vec::new();
        for anomaly in applied.anomalies {
            let reason = anomaly.reason.as_str();
            metrics::counter!("ocpp_lago_bridge_anomalies_total", "reason" => reason).increment(1);
            tracing::warn!(
                charge_box_id = %anomaly.charge_box_id,
                ocpp_transaction_id = anomaly.ocpp_transaction_id,
                reason,
                detail = %anomaly.detail,
                held_event = anomaly.held_event.is_some(),
                "billing anomaly: see `spool dead-letters`"
            );
            dead_letters.push(NewDeadLetter {
                reason: reason.to_string(),
                detail: anomaly.detail,
                charge_box_id: Some(anomaly.charge_box_id),
                ocpp_transaction_id: Some(anomaly.ocpp_transaction_id),
                id_tag: anomaly.id_tag,
                event: anomaly.held_event,
            });
        }
        let sessions = applied
            .touched
            .iter()
            .filter_map(|key| self.ledger.session(key))
            .map(|state| SessionRow {
                charge_box_id: state.key.charge_box_id.clone(),
                ocpp_transaction_id: state.key.ocpp_transaction_id,
                state_json: serde_json::to_string(state).expect("session state serialises"),
            })
            .collect();
        Changes {
            records: vec![RecordRow {
                received_at: record.received_at,
                charge_box_id: record.charge_box_id.clone(),
                ocpp_transaction_id: Some(ocpp_transaction_id),
                kind,
                json: serde_json::to_string(record).expect("tap record serialises"),
            }],
            sessions,
            removed_sessions: applied
                .removed
                .into_iter()
                .map(|key| (key.charge_box_id, key.ocpp_transaction_id))
                .collect(),
            events: applied.events,
            dead_letters,
        }
    }

    /// Every minute: the size alarm; every hour: retention pruning (never undelivered data).
    async fn housekeeping(&mut self) {
        let now = std::time::Instant::now();
        if now < self.next_housekeeping {
            return;
        }
        self.next_housekeeping = now + Duration::from_secs(60);
        let bytes = super::store::file_bytes(&self.settings.path);
        metrics::gauge!("ocpp_lago_bridge_spool_bytes").set(bytes as f64);
        let cap = self.settings.disk_cap_bytes;
        if bytes >= cap / 10 * 8 {
            metrics::counter!("ocpp_lago_bridge_spool_size_alarms_total").increment(1);
            tracing::error!(
                spool_bytes = bytes,
                disk_cap_bytes = cap,
                "spool above 80 % of spool.disk_cap_bytes: Lago is probably not taking events (see `spool stats`); nothing undelivered is ever dropped"
            );
        }
        if now < self.next_prune {
            return;
        }
        self.next_prune = now + Duration::from_secs(3600);
        let cutoff = unix_now() - self.settings.retention.as_secs() as i64;
        match self.with_store(move |store| store.prune(cutoff)).await {
            Ok((events, records)) if events + records > 0 => {
                tracing::info!(
                    events,
                    records,
                    "pruned delivered data past spool.retention"
                )
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "pruning the spool failed; will retry in an hour"),
        }
    }

    /// The memory queue used while the spool cannot commit is bounded: past the bound the
    /// oldest records are lost, loudly.
    fn bound_backlog(&mut self) {
        while self.backlog.len() > self.settings.max_backlog {
            self.backlog.pop_front();
            metrics::counter!("ocpp_lago_bridge_tap_records_lost_total").increment(1);
            tracing::error!(
                max_backlog = self.settings.max_backlog,
                "spool backlog full: the oldest uncommitted tap record was dropped; fix the spool disk"
            );
        }
    }

    async fn commit_backlog(&mut self) {
        // The backlog travels to the blocking thread and back instead of being copied.
        let backlog = std::mem::take(&mut self.backlog);
        let started = std::time::Instant::now();
        let (backlog, result) = self
            .with_store(move |store| {
                let result = store.commit(backlog.iter().map(|(changes, _)| changes), unix_now());
                (backlog, result)
            })
            .await;
        self.backlog = backlog;
        metrics::histogram!("ocpp_lago_bridge_spool_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                let mut derived = false;
                for (changes, committed) in self.backlog.drain(..) {
                    derived |= !changes.events.is_empty();
                    if let Some(committed) = committed {
                        let _ = committed.send(());
                    }
                }
                if derived {
                    self.events_committed.notify_one();
                }
                self.readiness.clear_problem(READY_CHECK);
            }
            Err(error) => {
                metrics::counter!("ocpp_lago_bridge_spool_commit_errors_total").increment(1);
                tracing::error!(
                    %error,
                    backlog = self.backlog.len(),
                    "spool commit failed: billing replies are released after the hold timeout and the records kept in memory; check the spool disk"
                );
                self.readiness
                    .set_problem(READY_CHECK, format!("spool commit failed: {error}"));
            }
        }
    }

    async fn run_store_ops(&mut self, ops: Vec<Command>) {
        let now = unix_now();
        self.with_store(move |store| {
            for op in ops {
                let (result, done) = match op {
                    Command::Delivered { ids, done } => (store.mark_delivered(&ids, now), done),
                    Command::Attempted { retry, error, done } => {
                        (store.record_retry(&retry, &error), done)
                    }
                    Command::DeadLetter {
                        id,
                        reason,
                        detail,
                        done,
                    } => (store.dead_letter_outbox(id, &reason, &detail, now), done),
                    Command::Record { .. } | Command::Rules(_) => continue,
                };
                let _ = done.send(result.map_err(|e| e.to_string()));
            }
        })
        .await;
    }

    /// Runs blocking SQLite work off the async threads.
    async fn with_store<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut Store) -> T + Send + 'static,
    ) -> T {
        let mut store = self
            .store
            .take()
            .expect("store is put back after every use");
        // The writer runs on a thread of its own (`spawn_writer`): blocking here stalls nothing
        // else, and saves the hand-off to a pool thread and back on every group commit.
        let out = work(&mut store);
        self.store = Some(store);
        out
    }
}

/// A Stop of a session the ledger never saw start (and without a Transaction.Begin reading)
/// is looked up in SteVe before it is applied, so it can be billed rather than dead-lettered.
/// Rare (the bridge was put in the path mid-session), so the writer simply waits for it.
async fn recover_start(
    steve: Option<&SteveClient>,
    ledger: &Ledger,
    record: &TapRecord,
) -> Option<TapRecord> {
    let steve = steve?;
    let TapKind::Stop(stop) = &record.kind else {
        return None;
    };
    let key = SessionKey {
        charge_box_id: record.charge_box_id.clone(),
        ocpp_transaction_id: stop.ocpp_transaction_id,
    };
    if stop.begin_reading.is_some()
        || key.ocpp_transaction_id <= 0
        || ledger.session(&key).is_some()
    {
        return None;
    }
    let outcome = steve
        .recover_start(
            &key.charge_box_id,
            key.ocpp_transaction_id,
            record.received_at,
        )
        .await;
    let result = match &outcome {
        Ok(Some(_)) => "recovered",
        Ok(None) => "unknown_to_steve",
        Err(_) => "error",
    };
    metrics::counter!("ocpp_lago_bridge_start_recoveries_total", "result" => result).increment(1);
    match outcome {
        Ok(Some(start)) => {
            tracing::info!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, "session start recovered from SteVe's REST API");
            Some(start)
        }
        Ok(None) => {
            tracing::warn!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, "SteVe does not know the transaction either: missing_start");
            None
        }
        Err(error) => {
            tracing::warn!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, %error, "could not ask SteVe for the session start: missing_start");
            None
        }
    }
}

/// Runs the writer on a dedicated thread with its own single-threaded runtime: SQLite's blocking
/// calls and fsyncs then never wait for (or take) a thread of the relay's runtime. The receiver
/// fires when the writer has ended.
pub fn spawn_writer(writer: impl Future<Output = ()> + Send + 'static) -> oneshot::Receiver<()> {
    let (ended, receiver) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    std::thread::Builder::new()
        .name("spool-writer".into())
        .spawn(move || {
            runtime.block_on(writer);
            let _ = ended.send(());
        })
        .expect("the writer thread starts");
    receiver
}

/// The bridge clock in unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
