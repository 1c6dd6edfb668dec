//! I/O: the durable SQLite spool, storage only. `store` is the file and its statements;
//! [`Spool`] is the typed API the one writer thread (`billing::writer`) uses: `append_records`,
//! `lease_batch` / `settle` for the shipper (`lease`), `dead_letter` and the queries;
//! [`SpoolHandle`] is the intake queue the relay puts tap records on; `overflow` keeps the
//! records SQLite cannot take. What a record means (the ledger, anomalies, parking, pruning
//! policy) is `billing/`'s: this module does not know it.

pub mod lease;
#[cfg(test)]
mod model_tests;
pub mod overflow;
pub mod store;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::tap::TapRecord;
use lease::{LeaseId, Leases, Request};
use overflow::Overflow;
use store::{Changes, Collision, Outcome, ReadyFilter, ReadyRow, Settled, Store, StoreError};

/// A tap record on its way to the writer; `committed` fires once it is on disk.
#[derive(Debug)]
pub struct Submission {
    pub record: TapRecord,
    pub committed: oneshot::Sender<()>,
}

/// The way into the writer, cloned into every connection.
#[derive(Debug, Clone)]
pub struct SpoolHandle {
    commands: mpsc::Sender<Submission>,
    /// Where a record goes when the writer's queue is full.
    overflow: Option<Arc<Overflow>>,
}

/// Why a tap record could not even be queued for the spool.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The record comes back, so that its loss can be logged with its readings.
    #[error("the spool writer's queue is full and there is no overflow directory")]
    Full(Box<TapRecord>),
    #[error("the spool writer has stopped")]
    Stopped(Box<TapRecord>),
}

impl SubmitError {
    /// The record that was not queued.
    pub fn record(&self) -> &TapRecord {
        match self {
            SubmitError::Full(record) | SubmitError::Stopped(record) => record,
        }
    }
}

impl SpoolHandle {
    /// A handle sending to `commands`, overflowing into `overflow` when they are full.
    pub fn new(commands: mpsc::Sender<Submission>, overflow: Option<Arc<Overflow>>) -> Self {
        SpoolHandle { commands, overflow }
    }

    /// Queues `record` without ever waiting; the receiver fires once it (and what it derived)
    /// is on disk. With the writer's queue full, or the writer stopped, the record is appended
    /// to the overflow directory instead (off the async threads; the receiver fires once that is fsync'd) and
    /// ingested at the next start; only if that fails too is it lost, logged at ERROR with
    /// its readings.
    pub fn try_submit(&self, record: TapRecord) -> Result<oneshot::Receiver<()>, SubmitError> {
        let (committed, receipt) = oneshot::channel();
        let submission = Submission { record, committed };
        let Submission { record, committed } = match self.commands.try_send(submission) {
            Ok(()) => return Ok(receipt),
            Err(
                mpsc::error::TrySendError::Closed(submission)
                | mpsc::error::TrySendError::Full(submission),
            ) => submission,
        };
        // A stopped writer (the daemon is failing and about to exit, see supervise.rs) takes no
        // more records either: the overflow file keeps them for the next start all the same.
        let stopped = self.commands.is_closed();
        let Some(overflow) = self.overflow.clone() else {
            return Err(if stopped {
                SubmitError::Stopped(Box::new(record))
            } else {
                SubmitError::Full(Box::new(record))
            });
        };
        if stopped {
            tracing::warn!(charge_box_id = %record.charge_box_id, overflow_dir = %overflow.dir().display(), "spool writer stopped: record appended to spool.overflow_dir, ingested at the next start");
        } else {
            metrics::counter!("ocpp_lago_bridge_spool_queue_full_total").increment(1);
            tracing::warn!(charge_box_id = %record.charge_box_id, overflow_dir = %overflow.dir().display(), "spool writer queue full: record appended to spool.overflow_dir, ingested at the next start");
        }
        let json = serde_json::to_string(&record).expect("tap record serialises");
        tokio::task::spawn_blocking(move || {
            match overflow.append(overflow::QUEUE_FULL, [json.as_str()]) {
                Ok(()) => {
                    let _ = committed.send(());
                }
                Err(error) => overflow::log_lost(&json, &error.to_string()),
            }
        });
        Ok(receipt)
    }
}

/// How long opening the spool may take before the bridge relays without it: a hung disk must
/// not keep chargers from SteVe.
const SPOOL_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the spool (read/write, creating and migrating it) off the async threads, bounded in
/// time.
pub async fn open_store(spool_path: &Path) -> Result<Store, String> {
    open_bounded(spool_path, Store::open).await
}

/// Opens the spool read-only off the async threads, bounded in time (see
/// [`Store::open_read_only`]): for the daemon's own readers.
pub async fn open_read_only(spool_path: &Path) -> Result<Store, String> {
    open_bounded(spool_path, Store::open_read_only).await
}

async fn open_bounded(
    spool_path: &Path,
    open: fn(&Path) -> Result<Store, StoreError>,
) -> Result<Store, String> {
    let path = spool_path.to_path_buf();
    let opening = tokio::task::spawn_blocking(move || open(&path));
    match tokio::time::timeout(SPOOL_OPEN_TIMEOUT, opening).await {
        Ok(Ok(result)) => result.map_err(|e| e.to_string()),
        Ok(Err(join)) => Err(format!("opening the spool failed: {join}")),
        Err(_) => Err(format!(
            "opening the spool took longer than {SPOOL_OPEN_TIMEOUT:?}: is its disk hung?"
        )),
    }
}

/// The spool as its one writer uses it: the file plus the shipper's open leases.
pub struct Spool {
    store: Store,
    leases: Leases,
}

impl Spool {
    /// The writer's spool on an opened (migrated) store; no lease is open.
    pub fn new(store: Store) -> Spool {
        Spool {
            store,
            leases: Leases::default(),
        }
    }

    /// Appends tap records with what billing derived from them, every change set in one
    /// transaction; returns the events refused as collisions (already dead letters).
    pub fn append_records<'a>(
        &mut self,
        groups: impl IntoIterator<Item = &'a Changes>,
        now: i64,
    ) -> Result<Vec<Collision>, StoreError> {
        self.store.append_records(groups, now)
    }

    /// Leases the oldest ready rows (see [`lease`]).
    pub fn lease_batch(
        &mut self,
        filter: &ReadyFilter,
    ) -> Result<(LeaseId, Vec<ReadyRow>), StoreError> {
        self.leases.lease_batch(&self.store, filter)
    }

    /// Settles a lease: each of its rows' outcome in one transaction.
    pub fn settle(
        &mut self,
        lease: LeaseId,
        outcomes: &[(i64, Outcome)],
        now: i64,
    ) -> Result<Settled, StoreError> {
        self.leases.settle(&mut self.store, lease, outcomes, now)
    }

    /// Moves a pending outbox row to the dead letters.
    pub fn dead_letter(
        &mut self,
        outbox_id: i64,
        reason: &str,
        detail: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.store.dead_letter(outbox_id, reason, detail, now)
    }

    /// Serves one of the shipper's requests.
    pub fn serve(&mut self, request: Request, now: i64) {
        self.leases.serve(&mut self.store, request, now);
    }

    /// Deletes delivered events and finished sessions' tap records older than `cutoff`.
    pub fn prune(&mut self, cutoff: i64) -> Result<(usize, usize), StoreError> {
        self.store.prune(cutoff)
    }

    /// The queries (sessions, parked Stops, pending rows, stats, ...).
    pub fn store(&self) -> &Store {
        &self.store
    }
}
