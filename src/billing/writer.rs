//! The single writer: tap records in, ledger applied, records + session state + events + dead
//! letters appended in one transaction per group, then every charger reply waiting on that group
//! released. Group commit: whatever queued up while the last fsync ran goes into the next one.
//! After each group it serves the shipper's leases and settlements (`spool::lease`) in the
//! order they were asked, on the same connection: the spool has one writer while the daemon runs.
//!
//! A Stop of a session the ledger does not know is *parked* when SteVe's REST API is configured:
//! its tap record is committed (releasing the charger's reply as usual) together with a
//! `parked_stops` row, and the session goes to the recovery task (`recovery.rs`), never awaited
//! here. The answer comes back as a command: SteVe's start as an ordinary Start record, after
//! which the parked Stops are applied as if the bridge had seen that Start; or "unknown", after
//! which they are applied as they are (`missing_start`). Applying them deletes the
//! `parked_stops` rows in the same transaction, so a crash in between neither loses a Stop nor
//! bills it twice; at startup the parked rows are read back and asked for again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};

use super::anomaly::{self, Anomaly};
use crate::clock::unix_now;
use crate::ledger::{Applied, BillingRules, Ledger, SessionKey, SessionState};
use crate::spool::lease::{self, OutboxHandle};
use crate::spool::overflow::{self, Overflow};
use crate::spool::store::{
    Changes, ParkedStopRow, RecordRow, SessionChanges, SessionRow, Store, StoreError,
};
use crate::spool::{Spool, Submission};
use crate::start_lookup::{Lookup, RecoveryHandle};
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

/// Most control commands queued at once (rules, recovery answers).
const CONTROL_QUEUE: usize = 1024;

/// A request to the writer other than a tap record from the relay (those come through
/// [`crate::spool::SpoolHandle`]) or the shipper's (`spool::lease`).
#[derive(Debug)]
pub enum Command {
    /// SteVe's record of a session start the bridge never saw (`recovery.rs`): applied as an
    /// ordinary Start record, after which the session's parked Stops are.
    RecoveredStart(TapRecord),
    /// New billing rules (subscription map reloaded on SIGHUP).
    Rules(Arc<BillingRules>),
    /// SteVe does not know this session's start (or could not be asked in time): its parked
    /// Stops are applied as they are. A found start comes back as [`Command::RecoveredStart`].
    StartUnknown { key: SessionKey },
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
    /// Where Stops of sessions the bridge never saw start are looked up (SteVe's REST API);
    /// `None`: they are applied at once (`missing_start`).
    pub recovery: Option<RecoveryHandle>,
    /// Where records go that the spool cannot commit (`spool.overflow_dir`); ingested at start.
    pub overflow: Option<Arc<Overflow>>,
}

/// The writer's three ways in. It ends once every `intake` sender is gone (the relay has
/// drained); `control` and `outbox` never keep it alive.
#[derive(Debug)]
pub struct Inputs {
    /// Tap records from the relay (wrap it in a [`crate::spool::SpoolHandle`]).
    pub intake: mpsc::Sender<Submission>,
    /// Rules and recovery answers.
    pub control: mpsc::Sender<Command>,
    /// The shipper's leases and settlements.
    pub outbox: OutboxHandle,
}

/// Applied but not yet committed, with the reply waiting on it.
#[derive(Debug)]
struct Pending {
    changes: Changes,
    committed: Option<oneshot::Sender<()>>,
    /// Its tap record is in an overflow file already (or it has none).
    overflowed: bool,
}

/// Rebuilds the ledger from the spool and returns the writer's inputs and its future.
pub fn start(
    store: Store,
    rules: Arc<BillingRules>,
    settings: WriterSettings,
    readiness: Readiness,
    events_committed: Arc<Notify>,
    heartbeat: Arc<AtomicI64>,
) -> Result<(Inputs, impl Future<Output = ()>), StoreError> {
    let mut sessions = Vec::new();
    for row in store.sessions()? {
        sessions.push(serde_json::from_str::<SessionState>(&row.state_json)?);
    }
    tracing::info!(sessions = sessions.len(), "ledger restored from the spool");
    let ledger = Ledger::from_sessions(sessions);
    let mut parked: HashMap<SessionKey, Vec<TapRecord>> = HashMap::new();
    for row in store.parked_stops()? {
        let record: TapRecord = serde_json::from_str(&row.json)?;
        parked
            .entry(SessionKey {
                charge_box_id: row.charge_box_id,
                ocpp_transaction_id: row.ocpp_transaction_id,
            })
            .or_default()
            .push(record);
    }
    if !parked.is_empty() {
        tracing::info!(
            sessions = parked.len(),
            "Stops parked for SteVe's start restored from the spool"
        );
    }
    let (intake, intake_rx) = mpsc::channel(MAX_GROUP * 4);
    let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let (outbox, outbox_rx) = OutboxHandle::channel();
    // Make sure a restart ships whatever was committed but not delivered before it.
    events_committed.notify_one();
    let writer = Writer {
        store: Some(Spool::new(store)),
        ledger,
        rules,
        settings,
        readiness,
        events_committed,
        heartbeat,
        backlog: VecDeque::new(),
        ingested: Vec::new(),
        wrote_uncommitted: false,
        keep_overflow: false,
        parked,
        next_housekeeping: std::time::Instant::now(),
        next_prune: std::time::Instant::now(),
        counters: RecordCounters::new(),
    };
    let inputs = Inputs {
        intake,
        control,
        outbox,
    };
    Ok((inputs, writer.run(intake_rx, control_rx, outbox_rx)))
}

struct Writer {
    /// Taken while a blocking commit runs, put back after.
    store: Option<Spool>,
    ledger: Ledger,
    rules: Arc<BillingRules>,
    settings: WriterSettings,
    readiness: Readiness,
    events_committed: Arc<Notify>,
    /// Unix seconds of the loop's last turn (the systemd watchdog checks it).
    heartbeat: Arc<AtomicI64>,
    /// Applied but not yet committed, in order, with the replies waiting on them.
    backlog: VecDeque<Pending>,
    /// Overflow files whose records are in the backlog; removed once it is committed.
    ingested: Vec<std::path::PathBuf>,
    /// This run appended to the overflow directory's `uncommitted.jsonl` (a stat per commit
    /// would cost the writer a syscall for nothing).
    wrote_uncommitted: bool,
    /// Records only in an overflow file were dropped from the backlog: its files stay until the
    /// next start ingests them (a duplicate there is harmless, a removal would lose them).
    keep_overflow: bool,
    /// Stops waiting for their session's start from SteVe, in arrival order per session.
    parked: HashMap<SessionKey, Vec<TapRecord>>,
    next_housekeeping: std::time::Instant,
    next_prune: std::time::Instant,
    counters: RecordCounters,
}

impl Writer {
    async fn run(
        mut self,
        mut intake: mpsc::Receiver<Submission>,
        mut control: mpsc::Receiver<Command>,
        mut outbox: mpsc::UnboundedReceiver<lease::Request>,
    ) {
        let mut records = Vec::with_capacity(MAX_GROUP);
        let mut commands = Vec::new();
        let mut requests = Vec::new();
        let (mut control_open, mut outbox_open) = (true, true);
        self.resume_parked();
        // Records a full disk kept out of the spool before the restart come first.
        self.ingest_overflow();
        if !self.backlog.is_empty() {
            self.commit_backlog().await;
        }
        loop {
            self.heartbeat.store(unix_now(), Ordering::Relaxed);
            // With a backlog (the last commit failed) retry soon, taking in what arrives meanwhile.
            let wait = if self.backlog.is_empty() {
                HEARTBEAT
            } else {
                RETRY_AFTER_FAILURE
            };
            // Cancel-safe: `recv_many` and `recv` take nothing from a channel unless they return it.
            tokio::select! {
                n = intake.recv_many(&mut records, MAX_GROUP) => if n == 0 { break },
                command = control.recv(), if control_open => match command {
                    Some(command) => commands.push(command),
                    None => control_open = false,
                },
                request = outbox.recv(), if outbox_open => match request {
                    Some(request) => requests.push(request),
                    None => outbox_open = false,
                },
                _ = tokio::time::sleep(wait) => {}
            }
            // Whatever else is queued joins this group: control first, so an answer sent before
            // a record is applied before it.
            while let Ok(command) = control.try_recv() {
                commands.push(command);
            }
            while records.len() < MAX_GROUP {
                let Ok(submission) = intake.try_recv() else {
                    break;
                };
                records.push(submission);
            }
            while let Ok(request) = outbox.try_recv() {
                requests.push(request);
            }
            self.housekeeping().await;
            for command in commands.drain(..) {
                self.command(command);
            }
            for Submission { record, committed } in records.drain(..) {
                self.record(record, Some(committed), false);
            }
            self.bound_backlog();
            if !self.backlog.is_empty() {
                self.commit_backlog().await;
            }
            if !requests.is_empty() {
                self.serve(std::mem::take(&mut requests)).await;
            }
        }
        // The relay is gone. Settlements the shipper asked for before it stopped still land.
        while let Ok(request) = outbox.try_recv() {
            requests.push(request);
        }
        if !requests.is_empty() {
            self.serve(requests).await;
        }
        // The channel closed: every sender is gone (shutdown). Try once more to save the rest.
        if !self.backlog.is_empty() {
            self.commit_backlog().await;
        }
        if !self.backlog.is_empty() {
            self.overflow_backlog();
            let records = self.backlog.len();
            let lost: Vec<Pending> = self.backlog.drain(..).filter(|p| !p.overflowed).collect();
            for pending in &lost {
                for row in &pending.changes.records {
                    overflow::log_lost(&row.json, "the spool could not commit before exit");
                }
            }
            let overflow_dir = self
                .settings
                .overflow
                .as_ref()
                .map(|o| o.dir().display().to_string());
            tracing::warn!(
                records,
                lost = lost.len(),
                overflow_dir,
                "tap records not committed to the spool before exit: those in spool.overflow_dir are ingested at the next start; systemd removes its RuntimeDirectory on stop (kept on restart): restart, or copy the files first"
            );
        }
    }

    fn push(&mut self, changes: Changes, committed: Option<oneshot::Sender<()>>, overflowed: bool) {
        // A change set without a tap record (parked Stops applied) is rebuilt from the spool.
        let overflowed = overflowed || changes.records.is_empty();
        self.backlog.push_back(Pending {
            changes,
            committed,
            overflowed,
        });
    }

    /// Takes every record waiting in the overflow directory into the backlog (in order, as if
    /// they had just arrived); their files are removed once the backlog is committed.
    fn ingest_overflow(&mut self) {
        let Some(overflow) = self.settings.overflow.clone() else {
            return;
        };
        let taken = match overflow.take() {
            Ok(taken) => taken,
            Err(error) => {
                metrics::counter!("ocpp_lago_bridge_overflow_errors_total").increment(1);
                tracing::error!(overflow_dir = %overflow.dir().display(), %error, "spool.overflow_dir unreadable: its records are not ingested now; fix it and restart");
                return;
            }
        };
        if taken.files.is_empty() {
            return;
        }
        tracing::info!(
            records = taken.records.len(),
            files = taken.files.len(),
            overflow_dir = %overflow.dir().display(),
            "ingesting records the spool could not take earlier"
        );
        metrics::counter!("ocpp_lago_bridge_overflow_ingested_total")
            .increment(taken.records.len() as u64);
        for record in taken.records {
            self.record(record, None, true);
        }
        self.ingested.extend(taken.files);
    }

    /// After a failed commit: appends the records of the backlog not yet in the overflow
    /// directory to it, fsync'd, so a restart does not lose them.
    fn overflow_backlog(&mut self) {
        let fresh: Vec<usize> = (0..self.backlog.len())
            .filter(|&i| !self.backlog[i].overflowed)
            .collect();
        if fresh.is_empty() {
            return;
        }
        let Some(overflow) = self.settings.overflow.clone() else {
            return;
        };
        let lines: Vec<&str> = fresh
            .iter()
            .flat_map(|&i| {
                self.backlog[i]
                    .changes
                    .records
                    .iter()
                    .map(|r| r.json.as_str())
            })
            .collect();
        let count = lines.len();
        match overflow.append(overflow::UNCOMMITTED, lines) {
            Ok(()) => {
                metrics::counter!("ocpp_lago_bridge_overflow_appended_total")
                    .increment(count as u64);
                for i in fresh {
                    self.backlog[i].overflowed = true;
                }
                self.wrote_uncommitted = true;
            }
            Err(error) => {
                metrics::counter!("ocpp_lago_bridge_overflow_errors_total").increment(1);
                tracing::error!(overflow_dir = %overflow.dir().display(), %error, records = count, "spool.overflow_dir cannot take the records the spool cannot commit either: they are only in memory, lost if the bridge stops before the spool commits");
            }
        }
    }

    /// One tap record: parked if it is a Stop waiting for SteVe, else applied to the ledger
    /// (a Start of a parked session then applies the parked Stops after it, in one change set).
    fn record(
        &mut self,
        record: TapRecord,
        committed: Option<oneshot::Sender<()>>,
        overflowed: bool,
    ) {
        let key = session_key(&record);
        if self.parks(&record, &key) {
            let first = !self.parked.contains_key(&key);
            let changes = Changes {
                records: vec![record_row(&record, &self.counters)],
                parked: vec![ParkedStopRow {
                    charge_box_id: key.charge_box_id.clone(),
                    ocpp_transaction_id: key.ocpp_transaction_id,
                    json: serde_json::to_string(&record).expect("tap record serialises"),
                }],
                ..Changes::default()
            };
            let received_at = record.received_at;
            self.parked.entry(key.clone()).or_default().push(record);
            self.push(changes, committed, overflowed);
            metrics::counter!("ocpp_lago_bridge_stops_parked_total").increment(1);
            if first {
                tracing::info!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, "Stop without a known start: parked while SteVe is asked for the start");
                self.ask(key, received_at);
            }
            metrics::gauge!("ocpp_lago_bridge_parked_sessions").set(self.parked.len() as f64);
            return;
        }
        let applied = self.ledger.apply(&record, &self.rules);
        let mut changes = self.applied_changes(&record, applied);
        changes.records.push(record_row(&record, &self.counters));
        if matches!(record.kind, TapKind::Start(_)) && self.parked.contains_key(&key) {
            changes = self.apply_parked(&key, changes);
        }
        self.push(changes, committed, overflowed);
    }

    /// A Stop is parked when SteVe can be asked and the ledger does not know its session (or
    /// earlier Stops of it are parked already). A `Transaction.Begin` reading does not exempt it:
    /// only SteVe's record names who started the session.
    fn parks(&self, record: &TapRecord, key: &SessionKey) -> bool {
        matches!(record.kind, TapKind::Stop(_))
            && self.settings.recovery.is_some()
            && key.ocpp_transaction_id > 0
            && (self.parked.contains_key(key) || self.ledger.session(key).is_none())
    }

    /// Hands a parked session to the recovery task; if it has ended, applies the Stops as they
    /// are rather than leaving them parked for ever.
    fn ask(&mut self, key: SessionKey, received_at: i64) {
        let asked = self.settings.recovery.as_ref().is_some_and(|recovery| {
            recovery.request(Lookup {
                key: key.clone(),
                received_at,
            })
        });
        if !asked {
            metrics::counter!("ocpp_lago_bridge_start_recoveries_total", "result" => "error")
                .increment(1);
            if self.settings.recovery.is_some() {
                tracing::error!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, "the SteVe recovery task is not running: the Stop is billed as it is (missing_start)");
            } else {
                tracing::warn!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, "a Stop parked before the restart cannot be looked up: [steve] is no longer configured; billed as it is (missing_start)");
            }
            let changes = self.apply_parked(&key, Changes::default());
            self.push(changes, None, true);
        }
    }

    /// At startup: asks again for every session whose Stops were parked before the restart (or,
    /// with `[steve]` no longer configured, applies them as they are).
    fn resume_parked(&mut self) {
        let mut keys: Vec<(SessionKey, i64)> = self
            .parked
            .iter()
            .map(|(key, stops)| (key.clone(), stops.first().map_or(0, |s| s.received_at)))
            .collect();
        keys.sort();
        for (key, received_at) in keys {
            self.ask(key, received_at);
        }
        metrics::gauge!("ocpp_lago_bridge_parked_sessions").set(self.parked.len() as f64);
    }

    /// Applies the parked Stops of `key` to the ledger (after the Start `changes` may hold),
    /// adding what they derive and the removal of their parking to `changes`.
    fn apply_parked(&mut self, key: &SessionKey, mut changes: Changes) -> Changes {
        let Some(stops) = self.parked.remove(key) else {
            // Already applied (a Start for the session arrived first): nothing is waiting.
            tracing::debug!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, "SteVe's answer came after the session's Stops were applied");
            return changes;
        };
        for stop in &stops {
            let applied = self.ledger.apply(stop, &self.rules);
            let more = self.applied_changes(stop, applied);
            changes.sessions.upserts.extend(more.sessions.upserts);
            changes.sessions.removed.extend(more.sessions.removed);
            changes.events.extend(more.events);
            changes.dead_letters.extend(more.dead_letters);
        }
        changes
            .unparked
            .push((key.charge_box_id.clone(), key.ocpp_transaction_id));
        metrics::gauge!("ocpp_lago_bridge_parked_sessions").set(self.parked.len() as f64);
        changes
    }

    /// Turns what the ledger derived from `record` into rows (the record's own row aside),
    /// logging and counting on the way.
    fn applied_changes(&self, record: &TapRecord, applied: Applied) -> Changes {
        let ocpp_transaction_id = session_key(record).ocpp_transaction_id;
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
        applied
            .clock_fallbacks
            .iter()
            .for_each(anomaly::clock_fallback);
        let mut dead_letters = Vec::new();
        for found in applied.anomalies {
            Anomaly::Ledger(found).emit(&mut dead_letters);
        }
        let upserts = applied
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
            sessions: SessionChanges {
                upserts,
                removed: applied
                    .removed
                    .into_iter()
                    .map(|key| (key.charge_box_id, key.ocpp_transaction_id))
                    .collect(),
            },
            events: applied.events,
            dead_letters,
            ..Changes::default()
        }
    }

    /// Every minute: the size alarm; every hour: retention pruning (never undelivered data).
    async fn housekeeping(&mut self) {
        let now = std::time::Instant::now();
        if now < self.next_housekeeping {
            return;
        }
        self.next_housekeeping = now + Duration::from_secs(60);
        // Records the relay could not queue: taken in once the spool is committing again.
        if self.backlog.is_empty()
            && !self.keep_overflow
            && self
                .settings
                .overflow
                .as_ref()
                .is_some_and(|o| o.dir().join(overflow::QUEUE_FULL).exists())
        {
            self.ingest_overflow();
        }
        let bytes = crate::spool::store::file_bytes(&self.settings.path);
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
            let Some(oldest) = self.backlog.pop_front() else {
                break;
            };
            if oldest.overflowed {
                if !self.keep_overflow {
                    tracing::warn!(
                        max_backlog = self.settings.max_backlog,
                        "spool backlog full: the oldest uncommitted records are kept only in spool.overflow_dir until the next start ingests them; fix the spool disk"
                    );
                }
                self.keep_overflow = true;
                continue;
            }
            for row in &oldest.changes.records {
                overflow::log_lost(
                    &row.json,
                    "spool backlog full (spool.max_memory_records) and not in spool.overflow_dir",
                );
            }
        }
    }

    async fn commit_backlog(&mut self) {
        // The backlog travels to the blocking thread and back instead of being copied.
        let backlog = std::mem::take(&mut self.backlog);
        let started = std::time::Instant::now();
        let (backlog, result) = self
            .with_store(move |store| {
                let result = store.append_records(backlog.iter().map(|p| &p.changes), unix_now());
                (backlog, result)
            })
            .await;
        self.backlog = backlog;
        metrics::histogram!("ocpp_lago_bridge_spool_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(collisions) => {
                for collision in collisions {
                    // Its dead letter is in the transaction that refused the event.
                    Anomaly::Collision(collision).emit(&mut Vec::new());
                }
                let mut derived = false;
                for pending in self.backlog.drain(..) {
                    derived |= !pending.changes.events.is_empty();
                    if let Some(committed) = pending.committed {
                        let _ = committed.send(());
                    }
                }
                self.overflow_committed();
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
                self.overflow_backlog();
            }
        }
    }

    /// Everything in memory is committed: the overflow files hold nothing the spool lacks.
    fn overflow_committed(&mut self) {
        let Some(overflow) = self.settings.overflow.clone() else {
            return;
        };
        if self.keep_overflow || (self.ingested.is_empty() && !self.wrote_uncommitted) {
            return;
        }
        let removed = overflow.remove_uncommitted().and_then(|()| {
            for file in &self.ingested {
                overflow::remove(file)?;
            }
            Ok(())
        });
        match removed {
            Ok(()) => {
                self.ingested.clear();
                self.wrote_uncommitted = false;
                tracing::info!(overflow_dir = %overflow.dir().display(), "records kept in spool.overflow_dir are committed to the spool");
            }
            Err(error) => {
                // Left in place: the next start ingests them again, as duplicates the ledger drops.
                metrics::counter!("ocpp_lago_bridge_overflow_errors_total").increment(1);
                tracing::warn!(overflow_dir = %overflow.dir().display(), %error, "committed overflow files could not be removed");
            }
        }
    }

    /// A command other than a relay record.
    fn command(&mut self, command: Command) {
        match command {
            Command::RecoveredStart(record) => self.record(record, None, false),
            Command::StartUnknown { key } => {
                let changes = self.apply_parked(&key, Changes::default());
                self.push(changes, None, true);
            }
            Command::Rules(rules) => self.rules = rules,
        }
    }

    /// Serves the shipper's leases and settlements, in the order asked.
    async fn serve(&mut self, requests: Vec<lease::Request>) {
        let now = unix_now();
        self.with_store(move |spool| {
            for request in requests {
                spool.serve(request, now);
            }
        })
        .await;
    }

    /// Runs blocking SQLite work off the async threads.
    async fn with_store<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut Spool) -> T + Send + 'static,
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

/// The session a record belongs to.
fn session_key(record: &TapRecord) -> SessionKey {
    let ocpp_transaction_id = match &record.kind {
        TapKind::Start(s) => s.ocpp_transaction_id,
        TapKind::MeterValues(m) => m.ocpp_transaction_id,
        TapKind::Stop(s) => s.ocpp_transaction_id,
        // No transactionId could be read: no session (the ledger dead-letters the frame).
        TapKind::Unreadable(_) => 0,
    };
    SessionKey {
        charge_box_id: record.charge_box_id.clone(),
        ocpp_transaction_id,
    }
}

/// `ocpp_lago_bridge_tap_records_total{kind}`'s handles, looked up once (a lookup per record
/// hashed its name and labels in the registry on the writer thread).
struct RecordCounters([metrics::Counter; 4]);

impl RecordCounters {
    const KINDS: [&'static str; 4] = ["start", "meter_values", "stop", "unreadable"];

    fn new() -> Self {
        RecordCounters(
            Self::KINDS.map(
                |kind| metrics::counter!("ocpp_lago_bridge_tap_records_total", "kind" => kind),
            ),
        )
    }
}

/// The tap record's own row, counted as it is taken in.
fn record_row(record: &TapRecord, counters: &RecordCounters) -> RecordRow {
    let index = match &record.kind {
        TapKind::Start(_) => 0,
        TapKind::MeterValues(_) => 1,
        TapKind::Stop(_) => 2,
        TapKind::Unreadable(_) => 3,
    };
    let kind = RecordCounters::KINDS[index];
    counters.0[index].increment(1);
    let ocpp_transaction_id = match record.kind {
        TapKind::Unreadable(_) => None,
        _ => Some(session_key(record).ocpp_transaction_id),
    };
    RecordRow {
        received_at: record.received_at,
        charge_box_id: record.charge_box_id.clone(),
        ocpp_transaction_id,
        kind,
        json: serde_json::to_string(record).expect("tap record serialises"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::start_lookup;
    use crate::tap::{StartRecord, StopRecord};
    use rust_decimal::Decimal;

    fn stop(tx: i64, wh: i64) -> TapRecord {
        TapRecord {
            charge_box_id: "CP".into(),
            received_at: 1_767_265_200,
            kind: TapKind::Stop(StopRecord {
                ocpp_transaction_id: tx,
                meter_stop_wh: Decimal::from(wh),
                timestamp: Some(1_767_265_200),
                id_tag: None,
                reason: None,
                begin_reading: None,
                readings: vec![],
            }),
        }
    }

    fn start_record(tx: i64, wh: i64) -> TapRecord {
        TapRecord {
            charge_box_id: "CP".into(),
            received_at: 1_767_265_200,
            kind: TapKind::Start(StartRecord {
                connector_id: 1,
                id_tag: "TAG".into(),
                meter_start_wh: Decimal::from(wh),
                timestamp: Some(1_767_261_600),
                ocpp_transaction_id: tx,
                id_tag_status: "Accepted".into(),
            }),
        }
    }

    /// A writer on a fresh spool in `dir`, with recovery; returns its commands, the lookups
    /// it asks for, and the end of its thread.
    fn writer(
        dir: &std::path::Path,
    ) -> (
        Inputs,
        mpsc::UnboundedReceiver<Lookup>,
        oneshot::Receiver<()>,
    ) {
        let path = dir.join("spool.db");
        let store = Store::open(&path).unwrap();
        let rules = Arc::new(crate::config::Config::default().billing_rules().unwrap());
        let (handle, lookups) = start_lookup::channel();
        let settings = WriterSettings {
            max_backlog: 100,
            retention: Duration::from_secs(3600),
            disk_cap_bytes: 1 << 30,
            path,
            recovery: Some(handle),
            overflow: None,
        };
        let (tx, future) = start(
            store,
            rules,
            settings,
            Readiness::default(),
            Arc::new(Notify::new()),
            Arc::new(AtomicI64::new(0)),
        )
        .unwrap();
        (tx, lookups, spawn_writer(future))
    }

    /// One step of `a_record_that_derives_nothing_writes_no_session_row`.
    #[derive(Debug, Clone)]
    enum Step {
        Start(i64, i64),
        Meter(i64, i64, i64, i64, bool),
        Stop(i64, i64),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            1 => (1..4i64, 0..3_000i64).prop_map(|(tx, wh)| Step::Start(tx, wh)),
            6 => (1..4i64, -50..6_000i64, -4_000..400i64, 0..3i64, any::<bool>())
                .prop_map(|(tx, wh, dt, res, dated)| Step::Meter(tx, wh, dt, res, dated)),
            1 => (1..4i64, 0..6_000i64).prop_map(|(tx, wh)| Step::Stop(tx, wh)),
        ]
    }

    fn step_record(step: &Step) -> TapRecord {
        use crate::ocpp::payload::EnergyReading;
        use crate::tap::MeterValuesRecord;
        match *step {
            Step::Start(tx, wh) => start_record(tx, wh),
            Step::Stop(tx, wh) => stop(tx, wh),
            Step::Meter(tx, wh, dt, res, dated) => TapRecord {
                charge_box_id: "CP".into(),
                received_at: 1_767_265_200,
                kind: TapKind::MeterValues(MeterValuesRecord {
                    connector_id: 1,
                    ocpp_transaction_id: tx,
                    readings: vec![EnergyReading {
                        timestamp: dated.then_some(1_767_265_200 + dt),
                        wh: Decimal::from(wh),
                        context: "Sample.Periodic".into(),
                        resolution_wh: Decimal::from(10i64.pow(res as u32)),
                    }],
                }),
            },
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Issue 16 item 1 ("a MeterValues costs one appended row"): the writer writes a
        /// session row only for the sessions the ledger reports `touched`, and the ledger
        /// touches a session on a MeterValues only when that record derives something (an
        /// event, an anomaly) that must be committed with the new state anyway. So a reading
        /// that derives nothing costs its `tap_records` row alone, and the session rows are
        /// always exactly the ledger's state after the last committed record: a restart
        /// restores every session from its row with nothing to re-apply.
        #[test]
        fn a_record_that_derives_nothing_writes_no_session_row(
            steps in proptest::collection::vec(step(), 1..60),
            incremental in proptest::prelude::any::<bool>(),
        ) {
            let mut config = crate::config::Config::default();
            if incremental {
                config.billing.mode = crate::ledger::BillingMode::Incremental;
            }
            let rules = config.billing_rules().unwrap();
            let mut ledger = Ledger::new();
            for step in &steps {
                let record = step_record(step);
                let applied = ledger.apply(&record, &rules);
                let derived = !applied.events.is_empty()
                    || !applied.anomalies.is_empty()
                    || !applied.removed.is_empty();
                if matches!(record.kind, TapKind::MeterValues(_)) && !derived {
                    proptest::prop_assert!(
                        applied.touched.is_empty(),
                        "{step:?} derived nothing but touched {:?}",
                        applied.touched
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn records_in_the_overflow_directory_are_ingested_first_and_their_files_removed() {
        let dir = tempfile::tempdir().unwrap();
        let overflow = Arc::new(Overflow::new(dir.path().join("overflow")));
        let json = |r: &TapRecord| serde_json::to_string(r).unwrap();
        // As a full disk left them: the writer's own file and the relay's, then a restart.
        overflow
            .append(
                overflow::UNCOMMITTED,
                [json(&start_record(7, 1_000)).as_str()],
            )
            .unwrap();
        overflow
            .append(overflow::QUEUE_FULL, [json(&stop(7, 5_000)).as_str()])
            .unwrap();
        let path = dir.path().join("spool.db");
        let settings = WriterSettings {
            max_backlog: 100,
            retention: Duration::from_secs(3600),
            disk_cap_bytes: 1 << 30,
            path: path.clone(),
            recovery: None,
            overflow: Some(overflow),
        };
        let (tx, future) = start(
            Store::open(&path).unwrap(),
            Arc::new(crate::config::Config::default().billing_rules().unwrap()),
            settings,
            Readiness::default(),
            Arc::new(Notify::new()),
            Arc::new(AtomicI64::new(0)),
        )
        .unwrap();
        let ended = spawn_writer(future);
        // A record sent now commits after the ingested ones.
        record(&tx, stop(8, 1)).await;
        drop(tx);
        ended.await.unwrap();
        let store = Store::open(&path).unwrap();
        let pending = store.pending(10).unwrap();
        assert_eq!(pending.len(), 1, "session 7 billed once");
        assert_eq!(pending[0].event.properties.value, "4");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("overflow"))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert!(left.is_empty(), "ingested files removed: {left:?}");
    }

    async fn record(tx: &Inputs, record: TapRecord) {
        let (committed, receipt) = oneshot::channel();
        tx.intake
            .send(Submission { record, committed })
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), receipt)
            .await
            .expect("committed in time")
            .expect("committed");
    }

    fn counts(dir: &std::path::Path) -> (i64, usize, usize) {
        let store = Store::open(&dir.join("spool.db")).unwrap();
        (
            store.backlog().unwrap().0,
            store.parked_stops().unwrap().len(),
            store.dead_letters(Some("missing_start")).unwrap().len(),
        )
    }

    #[tokio::test]
    async fn a_parked_stop_waits_for_its_start_is_kept_across_a_restart_and_billed_once() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut lookups, ended) = writer(dir.path());
        // Two copies of the Stop (a charger retrying): one lookup, both parked.
        record(&tx, stop(7, 5_000)).await;
        record(&tx, stop(7, 5_000)).await;
        let asked = lookups.recv().await.unwrap();
        assert_eq!(asked.key.ocpp_transaction_id, 7);
        assert!(lookups.try_recv().is_err(), "one lookup per session");
        assert_eq!(counts(dir.path()), (0, 2, 0), "parked, nothing billed");
        drop(tx);
        ended.await.unwrap();

        // After a restart the parked Stops are read back and asked for again.
        let (tx, mut lookups, ended) = writer(dir.path());
        let asked = lookups.recv().await.unwrap();
        assert_eq!(asked.key.charge_box_id, "CP");
        record(&tx, start_record(7, 1_000)).await;
        assert_eq!(counts(dir.path()), (1, 0, 0), "one event, nothing parked");
        // A Stop arriving now is a duplicate of a known session: never parked again.
        record(&tx, stop(7, 5_000)).await;
        assert!(lookups.try_recv().is_err());
        assert_eq!(counts(dir.path()), (1, 0, 0));
        drop(tx);
        ended.await.unwrap();
        let store = Store::open(&dir.path().join("spool.db")).unwrap();
        let event = &store.pending(10).unwrap()[0].event;
        assert_eq!(event.properties.value, "4", "(5000 - 1000) / 1000 kWh");
    }

    #[tokio::test]
    async fn a_start_steve_does_not_know_bills_the_parked_stop_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut lookups, ended) = writer(dir.path());
        record(&tx, stop(9, 5_000)).await;
        let asked = lookups.recv().await.unwrap();
        tx.control
            .send(Command::StartUnknown { key: asked.key })
            .await
            .unwrap();
        // A later record's commit comes after the StartUnknown's.
        record(&tx, stop(10, 1)).await;
        assert_eq!(counts(dir.path()).2, 1, "missing_start for 9");
        assert_eq!(counts(dir.path()).1, 1, "10 is parked, 9 is not");
        drop(tx);
        ended.await.unwrap();
    }

    #[tokio::test]
    async fn a_stop_with_a_transaction_begin_reading_is_still_looked_up_in_steve() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut lookups, ended) = writer(dir.path());
        let mut with_begin = stop(11, 5_000);
        if let TapKind::Stop(s) = &mut with_begin.kind {
            s.begin_reading = Some(crate::ocpp::payload::EnergyReading {
                timestamp: Some(1_767_261_600),
                wh: Decimal::from(1_000),
                context: "Transaction.Begin".into(),
                resolution_wh: Decimal::ONE,
            });
        }
        record(&tx, with_begin).await;
        let asked = lookups.recv().await.unwrap();
        assert_eq!(
            asked.key.ocpp_transaction_id, 11,
            "only SteVe names who started it"
        );
        assert_eq!(counts(dir.path()), (0, 1, 0));
        drop(tx);
        ended.await.unwrap();
    }

    #[tokio::test]
    async fn the_writer_serves_leases_in_order_and_a_dropped_lease_is_released() {
        use crate::spool::store::{Outcome, ReadyFilter};
        let dir = tempfile::tempdir().unwrap();
        let (tx, _lookups, ended) = writer(dir.path());
        // Two sessions billed: two pending events.
        for n in [21, 22] {
            record(&tx, start_record(n, 1_000)).await;
            record(&tx, stop(n, 3_000)).await;
        }
        let filter = || ReadyFilter {
            limit: 10,
            scan_limit: 100,
            ..ReadyFilter::default()
        };
        let lease = tx.outbox.lease_batch(filter()).await.unwrap();
        assert_eq!(lease.rows().len(), 2);
        assert!(
            tx.outbox
                .lease_batch(filter())
                .await
                .unwrap()
                .rows()
                .is_empty(),
            "leased rows are not leased twice"
        );
        // Dropped unsettled (a job cut short): released, leased again.
        drop(lease);
        let lease = tx.outbox.lease_batch(filter()).await.unwrap();
        let first = lease.rows()[0].row.outbox_id;
        // Settled without waiting: the next lease already sees it.
        let committed = tx.outbox.settle(lease, vec![(first, Outcome::Delivered)]);
        let next = tx.outbox.lease_batch(filter()).await.unwrap();
        assert_eq!(next.rows().len(), 1, "one delivered, one released");
        assert_ne!(next.rows()[0].row.outbox_id, first);
        assert_eq!(committed.await.unwrap().unwrap().delivered, 1);
        drop(next);
        drop(tx);
        ended.await.unwrap();
        assert_eq!(
            counts(dir.path()).0,
            1,
            "one event pending after the restart"
        );
    }

    #[tokio::test]
    async fn a_lease_asked_before_a_settlement_is_read_before_it_and_excludes_its_rows() {
        use crate::spool::store::{Outcome, ReadyFilter};
        let dir = tempfile::tempdir().unwrap();
        let (tx, _lookups, ended) = writer(dir.path());
        for n in [31, 32, 33] {
            record(&tx, start_record(n, 1_000)).await;
            record(&tx, stop(n, 3_000)).await;
        }
        let filter = |limit| ReadyFilter {
            limit,
            scan_limit: 100,
            ..ReadyFilter::default()
        };
        let first = tx.outbox.lease_batch(filter(1)).await.unwrap();
        let delivered = first.rows()[0].row.outbox_id;
        // The shipper's pipelining: the next lease is asked for, then the first settled.
        let next = tx.outbox.lease_batch(filter(10));
        let committed = tx
            .outbox
            .settle(first, vec![(delivered, Outcome::Delivered)]);
        let next = next.await.unwrap();
        assert_eq!(next.rows().len(), 2);
        assert!(next.rows().iter().all(|r| r.row.outbox_id != delivered));
        assert_eq!(committed.await.unwrap().unwrap().delivered, 1);
        drop(next);
        drop(tx);
        ended.await.unwrap();
        assert_eq!(counts(dir.path()).0, 2);
    }
}
