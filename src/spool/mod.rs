//! I/O: the durable SQLite spool. `store` is the file and its statements; `writer` is the single
//! task that group-commits tap records with the ledger state and events they produce.

#[cfg(test)]
mod model_tests;
pub mod overflow;
pub mod store;
pub mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::tap::TapRecord;
use overflow::Overflow;
use store::Store;
use writer::Command;

/// The way into the writer, cloned into every connection.
#[derive(Debug, Clone)]
pub struct SpoolHandle {
    commands: mpsc::Sender<Command>,
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

/// The writer has stopped: a command other than a record was not taken.
#[derive(Debug, thiserror::Error)]
#[error("the spool writer has stopped")]
pub struct WriterStopped;

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
    pub fn new(commands: mpsc::Sender<Command>, overflow: Option<Arc<Overflow>>) -> Self {
        SpoolHandle { commands, overflow }
    }

    /// Queues `record` without ever waiting; the receiver fires once it (and what it derived)
    /// is on disk. With the writer's queue full, or the writer stopped, the record is appended
    /// to the overflow directory instead (off the async threads; the receiver fires once that is fsync'd) and
    /// ingested at the next start; only if that fails too is it lost, logged at ERROR with
    /// its readings.
    pub fn try_submit(&self, record: TapRecord) -> Result<oneshot::Receiver<()>, SubmitError> {
        let (committed, receipt) = oneshot::channel();
        let command = Command::Record { record, committed };
        let command = match self.commands.try_send(command) {
            Ok(()) => return Ok(receipt),
            Err(
                mpsc::error::TrySendError::Closed(command)
                | mpsc::error::TrySendError::Full(command),
            ) => command,
        };
        let Command::Record { record, committed } = command else {
            unreachable!("the command sent was a record");
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

    /// Sends a command other than a record (shipper results, new rules).
    pub async fn send(&self, command: Command) -> Result<(), WriterStopped> {
        self.commands.send(command).await.map_err(|_| WriterStopped)
    }
}

/// How long opening the spool may take before the bridge relays without it: a hung disk must
/// not keep chargers from SteVe.
const SPOOL_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the spool off the async threads, bounded in time.
pub async fn open_store(spool_path: &Path) -> Result<Store, String> {
    let path = spool_path.to_path_buf();
    let opening = tokio::task::spawn_blocking(move || Store::open(&path));
    match tokio::time::timeout(SPOOL_OPEN_TIMEOUT, opening).await {
        Ok(Ok(result)) => result.map_err(|e| e.to_string()),
        Ok(Err(join)) => Err(format!("opening the spool failed: {join}")),
        Err(_) => Err(format!(
            "opening the spool took longer than {SPOOL_OPEN_TIMEOUT:?}: is its disk hung?"
        )),
    }
}
