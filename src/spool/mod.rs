//! I/O: the durable SQLite spool. `store` is the file and its statements; `writer` is the single
//! task that group-commits tap records with the ledger state and events they produce.

#[cfg(test)]
mod model_tests;
pub mod store;
pub mod writer;

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::tap::TapRecord;
use writer::Command;

/// The way into the writer, cloned into every connection.
#[derive(Debug, Clone)]
pub struct SpoolHandle {
    commands: mpsc::Sender<Command>,
}

/// Why a tap record could not even be queued for the spool.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the spool writer did not take the record within {0:?}")]
    Full(Duration),
    #[error("the spool writer has stopped")]
    Stopped,
}

impl SpoolHandle {
    /// A handle sending to `commands`.
    pub fn new(commands: mpsc::Sender<Command>) -> Self {
        SpoolHandle { commands }
    }

    /// Queues `record`; the receiver fires once it (and what it derived) is on disk.
    pub async fn submit(
        &self,
        record: TapRecord,
        wait: Duration,
    ) -> Result<oneshot::Receiver<()>, SubmitError> {
        let (committed, receipt) = oneshot::channel();
        let command = Command::Record { record, committed };
        match tokio::time::timeout(wait, self.commands.send(command)).await {
            Ok(Ok(())) => Ok(receipt),
            Ok(Err(_)) => Err(SubmitError::Stopped),
            Err(_) => Err(SubmitError::Full(wait)),
        }
    }

    /// Sends a command other than a record (shipper results, new rules).
    pub async fn send(&self, command: Command) -> Result<(), SubmitError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| SubmitError::Stopped)
    }
}
