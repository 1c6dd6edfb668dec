//! The channel on which the billing writer asks the recovery task (`recovery.rs`) for the start of
//! a session it does not know. It lives below both: the writer only asks, the recovery task
//! answers through the writer's own command queue, so neither names the other's module.

use tokio::sync::mpsc;

use crate::ledger::SessionKey;

/// A session whose start the writer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// The session.
    pub key: SessionKey,
    /// When its (first) Stop arrived: the recovered Start record carries the same time.
    pub received_at: i64,
}

/// The writer's way to ask for a start; sending never waits.
#[derive(Debug, Clone)]
pub struct RecoveryHandle {
    requests: mpsc::UnboundedSender<Lookup>,
}

impl RecoveryHandle {
    /// Queues a lookup; `false` if the recovery task has ended.
    pub fn request(&self, lookup: Lookup) -> bool {
        self.requests.send(lookup).is_ok()
    }
}

/// The channel between the writer and the recovery task. The queue is unbounded on purpose:
/// the writer must never wait on it, and it holds at most one entry per parked session (the
/// writer asks once per session), which the writer keeps in memory anyway.
pub fn channel() -> (RecoveryHandle, mpsc::UnboundedReceiver<Lookup>) {
    let (requests, receiver) = mpsc::unbounded_channel();
    (RecoveryHandle { requests }, receiver)
}
