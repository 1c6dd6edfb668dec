//! The outbox as the shipper sees it: a job *leases* the oldest ready rows (a second lease does
//! not return them) and *settles* the lease with each row's outcome in one transaction. The one
//! writer thread serves both on its own connection, in the order they were asked, so a lease
//! always sees every settlement asked before it; the shipper never reads the outbox itself.
//!
//! A lease lives in the writer's memory only: its rows stay `pending` on disk until settled. A
//! lease dropped unsettled (the job was cancelled, the shipper ended) is released by its `Drop`,
//! and a lease the process never settled (it died) is gone with the process: after a restart its
//! rows are pending again and go out as before. Nothing is marked on disk that a crash would
//! have to undo.

use std::collections::{HashMap, HashSet};

use tokio::sync::{mpsc, oneshot};

use super::store::{Outcome, ReadyFilter, ReadyRow, Settled, Store, StoreError};

/// A request from the shipper to the writer thread.
#[derive(Debug)]
pub enum Request {
    /// Lease the oldest ready rows matching the filter.
    Lease {
        filter: ReadyFilter,
        reply: oneshot::Sender<Result<(LeaseId, Vec<ReadyRow>), String>>,
    },
    /// Apply these outcomes to the lease's rows in one transaction and end the lease; its
    /// rows without an outcome stay pending, untouched.
    Settle {
        lease: LeaseId,
        outcomes: Vec<(i64, Outcome)>,
        reply: oneshot::Sender<Result<Settled, String>>,
    },
    /// End the lease without changing anything (dropped unsettled).
    Release { lease: LeaseId },
}

/// Names one lease.
pub type LeaseId = u64;

/// The shipper's way to the outbox; sending never waits (the queue is unbounded: one shipper
/// asks one thing at a time, plus at most one release per lease).
#[derive(Debug, Clone)]
pub struct OutboxHandle {
    requests: mpsc::UnboundedSender<Request>,
}

/// The writer thread is gone: nothing can be leased or settled (the rows stay pending).
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("the spool writer has stopped")]
    Stopped,
    #[error("spool: {0}")]
    Store(String),
}

/// Rows leased to one job. Settle it with [`OutboxHandle::settle`]; dropped unsettled, it is
/// released and its rows are ready again.
#[derive(Debug)]
pub struct Lease {
    id: LeaseId,
    rows: Vec<ReadyRow>,
    release: Option<mpsc::UnboundedSender<Request>>,
}

impl Lease {
    /// The leased rows, oldest first.
    pub fn rows(&self) -> &[ReadyRow] {
        &self.rows
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(requests) = self.release.take() {
            let _ = requests.send(Request::Release { lease: self.id });
        }
    }
}

impl OutboxHandle {
    /// A handle and the receiving end the writer thread serves.
    pub fn channel() -> (OutboxHandle, mpsc::UnboundedReceiver<Request>) {
        let (requests, receiver) = mpsc::unbounded_channel();
        (OutboxHandle { requests }, receiver)
    }

    /// Leases the oldest ready rows matching `filter` (none leased already). The request is
    /// queued at once, in order with the handle's other requests, whenever the answer is
    /// awaited: a lease asked before a settlement is served before it (and does not see it).
    /// Dropped unawaited, the lease is released.
    pub fn lease_batch(
        &self,
        filter: ReadyFilter,
    ) -> impl Future<Output = Result<Lease, OutboxError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let sent = self.requests.send(Request::Lease { filter, reply });
        let release = self.requests.clone();
        async move {
            sent.map_err(|_| OutboxError::Stopped)?;
            let (id, rows) = answer
                .await
                .map_err(|_| OutboxError::Stopped)?
                .map_err(OutboxError::Store)?;
            Ok(Lease {
                id,
                rows,
                release: Some(release),
            })
        }
    }

    /// Settles `lease` with `outcomes` (rows of the lease only; others are ignored). Does not
    /// wait: the receiver tells once it is committed. A later lease sees it either way.
    pub fn settle(
        &self,
        mut lease: Lease,
        outcomes: Vec<(i64, Outcome)>,
    ) -> oneshot::Receiver<Result<Settled, String>> {
        lease.release = None;
        let (reply, answer) = oneshot::channel();
        // A stopped writer drops `reply`: the receiver then reports it, and the rows stay pending.
        let _ = self.requests.send(Request::Settle {
            lease: lease.id,
            outcomes,
            reply,
        });
        answer
    }
}

/// The open leases, kept by the writer thread.
#[derive(Debug, Default)]
pub struct Leases {
    next: LeaseId,
    open: HashMap<LeaseId, Vec<i64>>,
    leased: HashSet<i64>,
}

impl Leases {
    /// Leases the oldest ready rows matching `filter` that no open lease holds.
    pub fn lease_batch(
        &mut self,
        store: &Store,
        filter: &ReadyFilter,
    ) -> Result<(LeaseId, Vec<ReadyRow>), StoreError> {
        let rows = store.ready(filter, &self.leased)?;
        self.next += 1;
        let ids: Vec<i64> = rows.iter().map(|r| r.row.outbox_id).collect();
        self.leased.extend(ids.iter().copied());
        self.open.insert(self.next, ids);
        Ok((self.next, rows))
    }

    /// Applies the outcomes of the lease's own rows in one transaction and ends the lease
    /// (also when the commit fails: its rows are then pending as before, to be leased again).
    pub fn settle(
        &mut self,
        store: &mut Store,
        lease: LeaseId,
        outcomes: &[(i64, Outcome)],
        now: i64,
    ) -> Result<Settled, StoreError> {
        let ids = self.release(lease);
        let own: Vec<(i64, Outcome)> = outcomes
            .iter()
            .filter(|(id, _)| ids.contains(id))
            .cloned()
            .collect();
        store.settle(&own, now)
    }

    /// Ends a lease; returns its rows.
    pub fn release(&mut self, lease: LeaseId) -> Vec<i64> {
        let ids = self.open.remove(&lease).unwrap_or_default();
        for id in &ids {
            self.leased.remove(id);
        }
        ids
    }

    /// How many rows are leased now.
    pub fn leased(&self) -> usize {
        self.leased.len()
    }

    /// Serves one request on the writer thread's connection.
    pub fn serve(&mut self, store: &mut Store, request: Request, now: i64) {
        match request {
            Request::Lease { filter, reply } => {
                let leased = self.lease_batch(store, &filter);
                let leased = match leased {
                    Ok((id, rows)) => {
                        if reply.send(Ok((id, rows))).is_err() {
                            // The asker is gone before it saw the lease.
                            self.release(id);
                        }
                        return;
                    }
                    Err(error) => Err(error.to_string()),
                };
                let _ = reply.send(leased);
            }
            Request::Settle {
                lease,
                outcomes,
                reply,
            } => {
                let settled = self.settle(store, lease, &outcomes, now);
                let _ = reply.send(settled.map_err(|e| e.to_string()));
            }
            Request::Release { lease } => {
                self.release(lease);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::store::{Changes, RetryState};

    /// A spool at `path` with `n` pending events; their outbox ids, oldest first.
    fn spool_with(path: &std::path::Path, n: usize) -> (Store, Vec<i64>) {
        let mut store = Store::open(path).unwrap();
        let events = (1..=n)
            .map(|i| crate::event::sample_event(&i.to_string(), "sub", 7))
            .collect();
        let changes = Changes {
            events,
            ..Changes::default()
        };
        store.append_records(&[changes], 100).unwrap();
        let ids = store
            .pending(n)
            .unwrap()
            .iter()
            .map(|r| r.outbox_id)
            .collect();
        (store, ids)
    }

    fn filter(limit: usize) -> ReadyFilter {
        ReadyFilter {
            limit,
            scan_limit: 100,
            ..ReadyFilter::default()
        }
    }

    fn ids(rows: &[ReadyRow]) -> Vec<i64> {
        rows.iter().map(|r| r.row.outbox_id).collect()
    }

    #[test]
    fn a_second_lease_never_returns_rows_leased_and_unsettled() {
        let dir = tempfile::tempdir().unwrap();
        let (store, all) = spool_with(&dir.path().join("spool.db"), 5);
        let mut leases = Leases::default();
        let (first, rows) = leases.lease_batch(&store, &filter(2)).unwrap();
        assert_eq!(ids(&rows), all[..2]);
        let (second, rows) = leases.lease_batch(&store, &filter(10)).unwrap();
        assert_eq!(
            ids(&rows),
            all[2..],
            "the first lease's rows are not leased again"
        );
        let (_, rows) = leases.lease_batch(&store, &filter(10)).unwrap();
        assert!(rows.is_empty(), "every row is leased");
        assert_eq!(leases.leased(), 5);
        // Released unsettled: ready again, in order, and still pending on disk.
        leases.release(first);
        let (_, rows) = leases.lease_batch(&store, &filter(10)).unwrap();
        assert_eq!(ids(&rows), all[..2]);
        leases.release(second);
        assert_eq!(store.backlog().unwrap().0, 5);
    }

    #[test]
    fn a_settlement_applies_every_outcome_of_its_own_rows_and_ends_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, all) = spool_with(&dir.path().join("spool.db"), 4);
        let mut leases = Leases::default();
        let (lease, _) = leases.lease_batch(&store, &filter(3)).unwrap();
        let retry = RetryState {
            needs_check: true,
            max_batch: Some(1),
            backoff_ms: 500,
            retry_at_ms: 0,
        };
        let outcomes = vec![
            (all[0], Outcome::Delivered),
            (
                all[1],
                Outcome::Retry {
                    state: retry,
                    error: "HTTP 503".into(),
                },
            ),
            (
                all[2],
                Outcome::DeadLetter {
                    reason: "lago_rejected".into(),
                    detail: "code: does not exist".into(),
                },
            ),
            // Not this lease's row: left alone.
            (all[3], Outcome::Delivered),
        ];
        let settled = leases.settle(&mut store, lease, &outcomes, 200).unwrap();
        assert_eq!(
            (settled.delivered, settled.retried, settled.dead_lettered),
            (1, 1, 1)
        );
        assert_eq!(leases.leased(), 0, "the lease has ended");
        let pending = store.pending(10).unwrap();
        assert_eq!(
            pending.iter().map(|r| r.outbox_id).collect::<Vec<_>>(),
            vec![all[1], all[3]]
        );
        let (_, rows) = leases.lease_batch(&store, &filter(10)).unwrap();
        assert_eq!(rows[0].retry, retry, "the retry state is stored");
        let letters = store.dead_letters(Some("lago_rejected")).unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].lago_transaction_id.as_deref(), Some("3"));
    }

    #[test]
    fn a_settlement_that_fails_changes_nothing_and_its_rows_are_leased_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let (mut store, all) = spool_with(&path, 2);
        // The dead letter's insert fails after the delivered row's update ran.
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON dead_letters
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        let mut leases = Leases::default();
        let (lease, _) = leases.lease_batch(&store, &filter(2)).unwrap();
        let outcomes = vec![
            (all[0], Outcome::Delivered),
            (
                all[1],
                Outcome::DeadLetter {
                    reason: "lago_rejected".into(),
                    detail: "no".into(),
                },
            ),
        ];
        assert!(leases.settle(&mut store, lease, &outcomes, 200).is_err());
        assert_eq!(store.backlog().unwrap().0, 2, "both rows still pending");
        assert!(store.dead_letters(None).unwrap().is_empty());
        let (_, rows) = leases.lease_batch(&store, &filter(2)).unwrap();
        assert_eq!(
            ids(&rows),
            all,
            "a failed settlement ends the lease all the same"
        );
    }

    #[test]
    fn an_unsettled_lease_is_pending_again_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let (store, all) = spool_with(&path, 3);
        let mut leases = Leases::default();
        let (_lease, rows) = leases.lease_batch(&store, &filter(3)).unwrap();
        assert_eq!(ids(&rows), all);
        // The process dies with the lease open.
        drop((store, leases));
        let store = Store::open(&path).unwrap();
        let mut leases = Leases::default();
        let (_, rows) = leases.lease_batch(&store, &filter(3)).unwrap();
        assert_eq!(ids(&rows), all, "nothing of a lease is on disk");
    }
}
