//! Model test of the spool (issue 8): random sequences of `Store` operations, with simulated
//! crashes between any two steps, checked after every step against an in-memory model of what
//! must hold.
//!
//! The model predicts SQLite's rowids too (an `INTEGER PRIMARY KEY` without AUTOINCREMENT gets
//! one more than the largest present), so outbox ids are compared exactly. Besides the public
//! API (`pending`, `backlog`, `stats`, `dead_letters`, `sessions` and every return value) the
//! check reads the outbox and dead-letter tables through a second, read-only connection, so a
//! row the API does not show (a delivered or dead one) cannot drift unnoticed.
//!
//! Two crashes: a clean one (drop the `Store`, open the file again) and a kill (copy the
//! database and its write-ahead log while the `Store` is still open, as a SIGKILL or power cut
//! would leave them, and open the copy). Either ends every open lease: leases and settlements
//! (`spool::lease`) are steps too, so a lease never returns a row another open lease holds, a
//! settlement changes only its own still-pending rows, and after a crash every leased row is
//! pending and leased again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use rusqlite::{Connection, OpenFlags};

use super::lease::{LeaseId, Leases};
use super::store::{
    COLLISION_REASON, Changes, DeadLetter, NewDeadLetter, Outcome, ReadyFilter, RecordRow, Replay,
    Requeue, RequeueOutcome, RetryState, SessionChanges, SessionRow, Settled, Store,
    collision_detail, same_billing_content,
};
use crate::event::{LagoEvent, sample_event};

const CHARGE_BOXES: [&str; 2] = ["CP1", "CP2"];
const SUBSCRIPTIONS: [&str; 2] = ["sub-a", "sub-b"];
const REASONS: [&str; 3] = ["unmapped_id_tag", "lago_rejected", "invalid_reading"];
const ID_TAGS: [&str; 3] = ["TAG1", "TAG2", "TAG3"];

// ---------------------------------------------------------------------------------------------
// Operations (generated as small indices into the pools above, made concrete when run)

/// An event from a small pool: the id is derived from (charge box, transaction, n) the way the
/// ledger derives it from content, so the same spec is a re-derivation; `variant` changes the
/// value only (a re-derivation that came out different: a collision, the store keeps the
/// first). With `n == 1` the id leaves the charge box out, as the `{transaction_id}` template
/// does, so two charge boxes' sessions can meet under one key.
#[derive(Debug, Clone)]
struct EventSpec {
    cb: usize,
    tx: i64,
    n: u8,
    sub: usize,
    variant: u8,
}

impl EventSpec {
    fn event(&self) -> LagoEvent {
        let cb = CHARGE_BOXES[self.cb];
        let tid = match self.n {
            1 => format!("{}-1", self.tx),
            n => format!("{cb}-{}-{n}", self.tx),
        };
        let mut e = sample_event(&tid, SUBSCRIPTIONS[self.sub], self.tx);
        e.properties.charge_box_id = cb.to_string();
        e.properties.value = format!("{}.{}", self.tx, self.variant);
        e
    }
}

#[derive(Debug, Clone)]
struct DeadSpec {
    reason: usize,
    session: Option<(usize, i64)>,
    id_tag: Option<usize>,
    /// The held event, and whether it is held for want of a subscription (empty subscription).
    event: Option<(EventSpec, bool)>,
}

#[derive(Debug, Clone)]
struct GroupSpec {
    /// (charge box, transaction, kind index)
    records: Vec<(usize, Option<i64>, usize)>,
    /// (charge box, transaction, state version)
    sessions: Vec<(usize, i64, u8)>,
    removed: Vec<(usize, i64)>,
    events: Vec<EventSpec>,
    dead: Vec<DeadSpec>,
}

#[derive(Debug, Clone)]
enum RequeueSpec {
    /// Index into the dead letters (one past the end: an id that does not exist).
    Id(usize),
    Reason(usize),
    All,
}

/// An outbox row to act on: from the pending rows or from all rows (delivered and dead ones
/// too, where the operation must do nothing), or an id that does not exist.
#[derive(Debug, Clone, Copy)]
struct Pick {
    from_pending: bool,
    index: usize,
}

#[derive(Debug, Clone)]
enum Op {
    Commit(Vec<GroupSpec>),
    Deliver(Vec<Pick>),
    Attempt(Vec<Pick>),
    DeadLetterOutbox(Pick, usize),
    /// The selection, whether the subscription map has learnt TAG3 meanwhile, and whether the
    /// operator names a subscription (`--subscription`, with an `Id` selection only).
    Requeue(RequeueSpec, bool, bool),
    ReplaySession(usize, i64),
    ReplaySince(i64),
    Prune(i64),
    Upsert(EventSpec),
    /// `upsert_pending` of a re-derivation (new value) of a row the outbox holds, in any state.
    Rederive(Pick, u8),
    Crash {
        kill: bool,
    },
    /// `lease_batch` of at most this many rows.
    Lease(usize),
    /// `settle` of an open lease (index among them): per row of the lease (index among its
    /// rows, or past them: a row of no lease) an outcome, 0 delivered, 1 retry, 2 dead letter.
    Settle(usize, Vec<(usize, u8)>),
}

fn event_spec() -> impl Strategy<Value = EventSpec> {
    (0..2usize, 1..4i64, 0..2u8, 0..2usize, 0..2u8).prop_map(|(cb, tx, n, sub, variant)| {
        EventSpec {
            cb,
            tx,
            n,
            sub,
            variant,
        }
    })
}

fn dead_spec() -> impl Strategy<Value = DeadSpec> {
    (
        0..REASONS.len(),
        proptest::option::of((0..2usize, 1..4i64)),
        proptest::option::of(0..ID_TAGS.len()),
        proptest::option::of((event_spec(), any::<bool>())),
    )
        .prop_map(|(reason, session, id_tag, event)| DeadSpec {
            reason,
            session,
            id_tag,
            event,
        })
}

fn group_spec() -> impl Strategy<Value = GroupSpec> {
    (
        prop::collection::vec((0..2usize, proptest::option::of(1..4i64), 0..3usize), 0..3),
        prop::collection::vec((0..2usize, 1..4i64, 0..3u8), 0..3),
        prop::collection::vec((0..2usize, 1..4i64), 0..2),
        prop::collection::vec(event_spec(), 0..4),
        prop::collection::vec(dead_spec(), 0..2),
    )
        .prop_map(|(records, sessions, removed, events, dead)| GroupSpec {
            records,
            sessions,
            removed,
            events,
            dead,
        })
}

fn pick() -> impl Strategy<Value = Pick> {
    (prop::bool::weighted(0.8), 0..16usize).prop_map(|(from_pending, index)| Pick {
        from_pending,
        index,
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec(group_spec(), 1..3).prop_map(Op::Commit),
        4 => prop::collection::vec(pick(), 1..4).prop_map(Op::Deliver),
        1 => prop::collection::vec(pick(), 1..3).prop_map(Op::Attempt),
        2 => (pick(), 0..REASONS.len()).prop_map(|(p, r)| Op::DeadLetterOutbox(p, r)),
        3 => (
            prop_oneof![
                (0..8usize).prop_map(RequeueSpec::Id),
                (0..REASONS.len()).prop_map(RequeueSpec::Reason),
                Just(RequeueSpec::All),
            ],
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(s, learnt, named)| Op::Requeue(s, learnt, named)),
        1 => (0..2usize, 1..4i64).prop_map(|(cb, tx)| Op::ReplaySession(cb, tx)),
        1 => (0..20i64).prop_map(Op::ReplaySince),
        2 => (0..20i64).prop_map(Op::Prune),
        1 => event_spec().prop_map(Op::Upsert),
        2 => (pick(), 0..3u8).prop_map(|(p, v)| Op::Rederive(p, v)),
        2 => any::<bool>().prop_map(|kill| Op::Crash { kill }),
        3 => (1..5usize).prop_map(Op::Lease),
        3 => (0..3usize, prop::collection::vec((0..6usize, 0..3u8), 0..4))
            .prop_map(|(lease, outcomes)| Op::Settle(lease, outcomes)),
    ]
}

// ---------------------------------------------------------------------------------------------
// The model

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Delivered,
    Dead,
}

impl State {
    fn column(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Delivered => "delivered",
            State::Dead => "dead",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Row {
    id: i64,
    subscription: String,
    transaction_id: String,
    charge_box_id: String,
    ocpp_transaction_id: i64,
    event: LagoEvent,
    state: State,
    created_at: i64,
    delivered_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
struct Letter {
    /// As `dead_letters()` must list it.
    listed: DeadLetter,
    id_tag: Option<String>,
    event: Option<LagoEvent>,
    outbox_id: Option<i64>,
}

#[derive(Debug, Default)]
struct Model {
    /// The outbox in id (= creation) order.
    rows: Vec<Row>,
    letters: Vec<Letter>,
    sessions: BTreeMap<(String, i64), String>,
    /// (received_at, charge_box_id, ocpp_transaction_id)
    records: Vec<(i64, String, Option<i64>)>,
}

impl Model {
    fn row_by_key(&mut self, sub: &str, tid: &str) -> Option<&mut Row> {
        self.rows
            .iter_mut()
            .find(|r| r.subscription == sub && r.transaction_id == tid)
    }

    /// A key already present (in any state) keeps its row unchanged: the same billing content
    /// is a no-op, different content is reported with the stored event.
    fn insert(&mut self, e: &LagoEvent, now: i64) -> Result<bool, Box<LagoEvent>> {
        if let Some(r) = self.row_by_key(&e.external_subscription_id, &e.transaction_id) {
            return if same_billing_content(&r.event, e) {
                Ok(false)
            } else {
                Err(Box::new(r.event.clone()))
            };
        }
        let id = self.rows.last().map_or(1, |r| r.id + 1);
        self.rows.push(Row {
            id,
            subscription: e.external_subscription_id.clone(),
            transaction_id: e.transaction_id.clone(),
            charge_box_id: e.properties.charge_box_id.clone(),
            ocpp_transaction_id: e.properties.ocpp_transaction_id,
            event: e.clone(),
            state: State::Pending,
            created_at: now,
            delivered_at: None,
        });
        Ok(true)
    }

    /// A `transaction_id_collision` dead letter holding `held`; the same one again is another
    /// attempt of the open letter.
    fn collide(&mut self, held: &LagoEvent, existing: &LagoEvent, now: i64) {
        if let Some(open) = self.letters.iter_mut().find(|l| {
            l.listed.reason == COLLISION_REASON
                && !l.listed.requeued
                && l.listed.external_subscription_id.as_ref()
                    == Some(&held.external_subscription_id)
                && l.listed.lago_transaction_id.as_ref() == Some(&held.transaction_id)
                && l.event.as_ref() == Some(held)
        }) {
            open.listed.attempts += 1;
            open.listed.last_attempt = now;
            return;
        }
        let id = self.next_letter_id();
        self.letters.push(Letter {
            listed: DeadLetter {
                id,
                reason: COLLISION_REASON.into(),
                detail: collision_detail(existing, held),
                charge_box_id: Some(held.properties.charge_box_id.clone()),
                ocpp_transaction_id: Some(held.properties.ocpp_transaction_id),
                lago_transaction_id: Some(held.transaction_id.clone()),
                external_subscription_id: Some(held.external_subscription_id.clone()),
                first_attempt: now,
                last_attempt: now,
                attempts: 1,
                requeued: false,
            },
            id_tag: None,
            event: Some(held.clone()),
            outbox_id: None,
        });
    }

    fn pending(&self) -> Vec<&Row> {
        self.rows
            .iter()
            .filter(|r| r.state == State::Pending)
            .collect()
    }

    fn next_letter_id(&self) -> i64 {
        self.letters.last().map_or(1, |l| l.listed.id + 1)
    }

    fn commit(&mut self, groups: &[Changes], now: i64) {
        for c in groups {
            for r in &c.records {
                self.records.push((
                    r.received_at,
                    r.charge_box_id.clone(),
                    r.ocpp_transaction_id,
                ));
            }
            for s in &c.sessions.upserts {
                self.sessions.insert(
                    (s.charge_box_id.clone(), s.ocpp_transaction_id),
                    s.state_json.clone(),
                );
            }
            for key in &c.sessions.removed {
                self.sessions.remove(key);
            }
            for e in &c.events {
                if let Err(existing) = self.insert(e, now) {
                    self.collide(e, &existing, now);
                }
            }
            for d in &c.dead_letters {
                let id = self.next_letter_id();
                self.letters.push(Letter {
                    listed: DeadLetter {
                        id,
                        reason: d.reason.clone(),
                        detail: d.detail.clone(),
                        charge_box_id: d.charge_box_id.clone(),
                        ocpp_transaction_id: d.ocpp_transaction_id,
                        lago_transaction_id: d.event.as_ref().map(|e| e.transaction_id.clone()),
                        external_subscription_id: d
                            .event
                            .as_ref()
                            .map(|e| e.external_subscription_id.clone()),
                        first_attempt: now,
                        last_attempt: now,
                        attempts: 1,
                        requeued: false,
                    },
                    id_tag: d.id_tag.clone(),
                    event: d.event.clone(),
                    outbox_id: None,
                });
            }
        }
    }

    fn mark_delivered(&mut self, ids: &[i64], now: i64) {
        for id in ids {
            if let Some(r) = self
                .rows
                .iter_mut()
                .find(|r| r.id == *id && r.state == State::Pending)
            {
                r.state = State::Delivered;
                r.delivered_at = Some(now);
            }
        }
    }

    fn dead_letter_outbox(&mut self, id: i64, reason: &str, detail: &str, now: i64) {
        let letter_id = self.next_letter_id();
        let Some(r) = self
            .rows
            .iter_mut()
            .find(|r| r.id == id && r.state == State::Pending)
        else {
            return;
        };
        r.state = State::Dead;
        let letter = Letter {
            listed: DeadLetter {
                id: letter_id,
                reason: reason.to_string(),
                detail: detail.to_string(),
                charge_box_id: Some(r.charge_box_id.clone()),
                ocpp_transaction_id: Some(r.ocpp_transaction_id),
                lago_transaction_id: Some(r.transaction_id.clone()),
                external_subscription_id: Some(r.subscription.clone()),
                first_attempt: r.created_at,
                last_attempt: now,
                attempts: 1,
                requeued: false,
            },
            id_tag: None,
            event: Some(r.event.clone()),
            outbox_id: Some(id),
        };
        self.letters.push(letter);
    }

    fn requeue(
        &mut self,
        selection: Requeue<'_>,
        now: i64,
        resolve: &dyn Fn(Option<&str>) -> Option<String>,
        named: Option<&str>,
    ) -> Vec<(i64, RequeueOutcome)> {
        let mut report = Vec::new();
        for i in 0..self.letters.len() {
            let l = self.letters[i].clone();
            let selected = match selection {
                Requeue::Id(id) => l.listed.id == id,
                Requeue::Reason(reason) => l.listed.reason == reason,
                Requeue::All => true,
            };
            if l.listed.requeued || !selected {
                continue;
            }
            let outcome = match (l.outbox_id, l.event) {
                (_, None) => RequeueOutcome::NoHeldEvent,
                (Some(_), Some(e)) if named.is_some() => RequeueOutcome::HasSubscription {
                    external_subscription_id: e.external_subscription_id,
                },
                (Some(outbox_id), Some(e)) => {
                    let row = self
                        .rows
                        .iter_mut()
                        .find(|r| r.id == outbox_id)
                        .expect("a dead letter's outbox row is never pruned");
                    if row.state == State::Dead {
                        row.state = State::Pending;
                        RequeueOutcome::Queued {
                            external_subscription_id: e.external_subscription_id,
                        }
                    } else {
                        RequeueOutcome::AlreadyQueued
                    }
                }
                (None, Some(e)) if !e.external_subscription_id.is_empty() && named.is_some() => {
                    RequeueOutcome::HasSubscription {
                        external_subscription_id: e.external_subscription_id,
                    }
                }
                (None, Some(mut e)) => {
                    if e.external_subscription_id.is_empty() {
                        let found = match named {
                            Some(sub) => Some(sub.to_string()),
                            None if l.listed.reason == "missing_start" => None,
                            None => resolve(l.id_tag.as_deref()),
                        };
                        e.external_subscription_id = found.unwrap_or_default();
                    }
                    if e.external_subscription_id.is_empty() {
                        RequeueOutcome::NoSubscription
                    } else {
                        match self.insert(&e, now) {
                            Ok(true) => RequeueOutcome::Queued {
                                external_subscription_id: e.external_subscription_id,
                            },
                            Ok(false) => RequeueOutcome::AlreadyQueued,
                            Err(existing) => RequeueOutcome::Collision {
                                charge_box_id: existing.properties.charge_box_id,
                                ocpp_transaction_id: existing.properties.ocpp_transaction_id,
                            },
                        }
                    }
                }
            };
            if outcome.closes() {
                self.letters[i].listed.requeued = true;
            }
            report.push((l.listed.id, outcome));
        }
        report
    }

    fn replay(&mut self, selection: Replay<'_>) -> usize {
        let mut n = 0;
        for r in self.rows.iter_mut().filter(|r| r.state == State::Delivered) {
            let selected = match selection {
                Replay::Session {
                    charge_box_id,
                    ocpp_transaction_id,
                } => {
                    r.charge_box_id == charge_box_id && r.ocpp_transaction_id == ocpp_transaction_id
                }
                Replay::Since(since) => r.created_at >= since,
            };
            if selected {
                r.state = State::Pending;
                n += 1;
            }
        }
        n
    }

    fn upsert_pending(&mut self, e: &LagoEvent, now: i64) -> bool {
        if let Some(r) = self.row_by_key(&e.external_subscription_id, &e.transaction_id) {
            if r.charge_box_id != e.properties.charge_box_id
                || r.ocpp_transaction_id != e.properties.ocpp_transaction_id
            {
                // Another session's event is never replaced: the re-derived one is held.
                let existing = r.event.clone();
                self.collide(e, &existing, now);
                return true;
            }
            // Only the event and the state change: the id, creation time and session stay.
            r.event = e.clone();
            r.state = State::Pending;
            // The row is pending again: its open dead letters are settled, as by a requeue.
            let id = r.id;
            for letter in &mut self.letters {
                if letter.outbox_id == Some(id) && !letter.listed.requeued {
                    letter.listed.requeued = true;
                }
            }
        } else {
            let _ = self.insert(e, now);
        }
        false
    }

    fn prune(&mut self, cutoff: i64) -> (usize, usize) {
        let held: BTreeSet<i64> = self.letters.iter().filter_map(|l| l.outbox_id).collect();
        let before = self.rows.len();
        self.rows.retain(|r| {
            !(r.state == State::Delivered
                && r.delivered_at.is_some_and(|t| t < cutoff)
                && !held.contains(&r.id))
        });
        let events = before - self.rows.len();
        let before = self.records.len();
        let rows = &self.rows;
        let letters = &self.letters;
        self.records.retain(|(received_at, cb, tx)| {
            // SQL equality with NULL is never true: a record without a transaction has no
            // session to protect it.
            let has_event = tx.is_some_and(|tx| {
                rows.iter()
                    .any(|r| &r.charge_box_id == cb && r.ocpp_transaction_id == tx)
            });
            let has_letter = tx.is_some_and(|tx| {
                letters.iter().any(|l| {
                    !l.listed.requeued
                        && l.listed.charge_box_id.as_ref() == Some(cb)
                        && l.listed.ocpp_transaction_id == Some(tx)
                })
            });
            !(*received_at < cutoff && !has_event && !has_letter)
        });
        (events, before - self.records.len())
    }
}

// ---------------------------------------------------------------------------------------------
// What the file holds, read behind the API

#[derive(Debug, Clone, PartialEq)]
struct RawRow {
    id: i64,
    subscription: String,
    transaction_id: String,
    charge_box_id: String,
    ocpp_transaction_id: i64,
    event: LagoEvent,
    state: String,
    created_at: i64,
    delivered_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
struct RawLetter {
    id: i64,
    id_tag: Option<String>,
    event: Option<LagoEvent>,
    outbox_id: Option<i64>,
}

fn raw(path: &Path) -> (Vec<RawRow>, Vec<RawLetter>, Vec<i64>) {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT id, external_subscription_id, lago_transaction_id, charge_box_id,
                    ocpp_transaction_id, event, state, created_at, delivered_at
             FROM outbox ORDER BY id",
        )
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            let json: String = r.get(5)?;
            Ok(RawRow {
                id: r.get(0)?,
                subscription: r.get(1)?,
                transaction_id: r.get(2)?,
                charge_box_id: r.get(3)?,
                ocpp_transaction_id: r.get(4)?,
                event: serde_json::from_str(&json).unwrap(),
                state: r.get(6)?,
                created_at: r.get(7)?,
                delivered_at: r.get(8)?,
            })
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let mut stmt = conn
        .prepare("SELECT id, id_tag, event, outbox_id FROM dead_letters ORDER BY id")
        .unwrap();
    let letters = stmt
        .query_map([], |r| {
            let json: Option<String> = r.get(2)?;
            Ok(RawLetter {
                id: r.get(0)?,
                id_tag: r.get(1)?,
                event: json.map(|j| serde_json::from_str(&j).unwrap()),
                outbox_id: r.get(3)?,
            })
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let mut stmt = conn
        .prepare("SELECT received_at FROM tap_records ORDER BY id")
        .unwrap();
    let records = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<Vec<i64>, _>>()
        .unwrap();
    (rows, letters, records)
}

/// The store and the model agree, through the API and in the tables.
fn check(store: &Store, path: &Path, model: &Model) -> Result<(), TestCaseError> {
    let pending = store.pending(10_000).unwrap();
    let expected: Vec<(i64, &LagoEvent)> = model
        .pending()
        .into_iter()
        .map(|r| (r.id, &r.event))
        .collect();
    let got: Vec<(i64, &LagoEvent)> = pending.iter().map(|r| (r.outbox_id, &r.event)).collect();
    prop_assert_eq!(&got, &expected, "pending(): ids, order or content");
    let first_two: Vec<i64> = store
        .pending(2)
        .unwrap()
        .iter()
        .map(|r| r.outbox_id)
        .collect();
    let expected_two: Vec<i64> = expected.iter().take(2).map(|(id, _)| *id).collect();
    prop_assert_eq!(first_two, expected_two, "pending(2) is the oldest two");

    let oldest = model.pending().iter().map(|r| r.created_at).min();
    let count = |s: State| model.rows.iter().filter(|r| r.state == s).count() as i64;
    prop_assert_eq!(
        store.backlog().unwrap(),
        (count(State::Pending), oldest),
        "backlog()"
    );
    let stats = store.stats(path).unwrap();
    prop_assert_eq!(
        (
            stats.tap_records,
            stats.sessions,
            stats.pending_events,
            stats.delivered_events,
            stats.dead_letters,
            stats.oldest_pending_created_at,
        ),
        (
            model.records.len() as i64,
            model.sessions.len() as i64,
            count(State::Pending),
            count(State::Delivered),
            model.letters.iter().filter(|l| !l.listed.requeued).count() as i64,
            oldest,
        ),
        "stats(): (tap records, sessions, pending, delivered, open dead letters, oldest)"
    );
    prop_assert!(stats.file_bytes > 0);

    let listed: Vec<DeadLetter> = model.letters.iter().map(|l| l.listed.clone()).collect();
    prop_assert_eq!(
        store.dead_letters(None).unwrap(),
        listed.clone(),
        "dead_letters(None)"
    );
    for reason in REASONS {
        let of_reason: Vec<DeadLetter> = listed
            .iter()
            .filter(|l| l.reason == reason)
            .cloned()
            .collect();
        prop_assert_eq!(
            store.dead_letters(Some(reason)).unwrap(),
            of_reason,
            "dead_letters({})",
            reason
        );
    }

    let mut sessions: Vec<(String, i64, String)> = store
        .sessions()
        .unwrap()
        .into_iter()
        .map(|s| (s.charge_box_id, s.ocpp_transaction_id, s.state_json))
        .collect();
    sessions.sort();
    let expected_sessions: Vec<(String, i64, String)> = model
        .sessions
        .iter()
        .map(|((cb, tx), state)| (cb.clone(), *tx, state.clone()))
        .collect();
    prop_assert_eq!(sessions, expected_sessions, "sessions()");

    let (rows, letters, records) = raw(path);
    let expected_rows: Vec<RawRow> = model
        .rows
        .iter()
        .map(|r| RawRow {
            id: r.id,
            subscription: r.subscription.clone(),
            transaction_id: r.transaction_id.clone(),
            charge_box_id: r.charge_box_id.clone(),
            ocpp_transaction_id: r.ocpp_transaction_id,
            event: r.event.clone(),
            state: r.state.column().to_string(),
            created_at: r.created_at,
            delivered_at: r.delivered_at,
        })
        .collect();
    prop_assert_eq!(rows, expected_rows, "outbox table");
    let expected_letters: Vec<RawLetter> = model
        .letters
        .iter()
        .map(|l| RawLetter {
            id: l.listed.id,
            id_tag: l.id_tag.clone(),
            event: l.event.clone(),
            outbox_id: l.outbox_id,
        })
        .collect();
    prop_assert_eq!(letters, expected_letters, "dead_letters table");
    let expected_records: Vec<i64> = model.records.iter().map(|r| r.0).collect();
    prop_assert_eq!(records, expected_records, "tap_records table");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Running a sequence

fn changes(spec: &GroupSpec, now: i64) -> Changes {
    const KINDS: [&str; 3] = ["start", "meter_values", "stop"];
    Changes {
        records: spec
            .records
            .iter()
            .map(|&(cb, tx, kind)| RecordRow {
                // Records arrive a little before they are committed.
                received_at: now - kind as i64,
                charge_box_id: CHARGE_BOXES[cb].into(),
                ocpp_transaction_id: tx,
                kind: KINDS[kind],
                json: format!(r#"{{"kind":"{}"}}"#, KINDS[kind]),
            })
            .collect(),
        sessions: SessionChanges {
            upserts: spec
                .sessions
                .iter()
                .map(|&(cb, tx, v)| SessionRow {
                    charge_box_id: CHARGE_BOXES[cb].into(),
                    ocpp_transaction_id: tx,
                    state_json: format!(r#"{{"v":{v}}}"#),
                })
                .collect(),
            removed: spec
                .removed
                .iter()
                .map(|&(cb, tx)| (CHARGE_BOXES[cb].to_string(), tx))
                .collect(),
        },
        events: spec.events.iter().map(EventSpec::event).collect(),
        dead_letters: spec
            .dead
            .iter()
            .map(|d| {
                let event = d.event.as_ref().map(|(e, unmapped)| {
                    let mut e = e.event();
                    if *unmapped {
                        e.external_subscription_id.clear();
                    }
                    e
                });
                NewDeadLetter {
                    reason: REASONS[d.reason].into(),
                    detail: format!("detail of {}", REASONS[d.reason]),
                    charge_box_id: d.session.map(|(cb, _)| CHARGE_BOXES[cb].to_string()),
                    ocpp_transaction_id: d.session.map(|(_, tx)| tx),
                    id_tag: d.id_tag.map(|t| ID_TAGS[t].to_string()),
                    event,
                }
            })
            .collect(),
        ..Changes::default()
    }
}

fn picked(model: &Model, p: Pick) -> i64 {
    let ids: Vec<i64> = if p.from_pending {
        model.pending().iter().map(|r| r.id).collect()
    } else {
        model.rows.iter().map(|r| r.id).collect()
    };
    // One past the end is an id no row has.
    ids.get(p.index % (ids.len() + 1))
        .copied()
        .unwrap_or(1_000_000)
}

/// Keys in a state, from the model (already checked equal to the file).
fn keys(model: &Model, state: State) -> BTreeSet<(String, String)> {
    model
        .rows
        .iter()
        .filter(|r| r.state == state)
        .map(|r| (r.subscription.clone(), r.transaction_id.clone()))
        .collect()
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut generation = 0;
    let mut path: PathBuf = dir.path().join("spool-0.db");
    let mut store = Store::open(&path).unwrap();
    let mut model = Model::default();
    // The writer's open leases and, in the model, each with its rows; both die with a crash.
    let mut leases = Leases::default();
    let mut open_leases: Vec<(LeaseId, Vec<i64>)> = Vec::new();
    let mut now = 100;
    check(&store, &path, &model)?;
    for (step, op) in ops.iter().enumerate() {
        now += 1 + (step as i64 % 3);
        let delivered_before = keys(&model, State::Delivered);
        let pending_before = keys(&model, State::Pending);
        let undelivered_before: Vec<Row> = model
            .rows
            .iter()
            .filter(|r| r.state != State::Delivered)
            .cloned()
            .collect();
        let rows_before = model.rows.len();
        match op {
            Op::Commit(specs) => {
                let groups: Vec<Changes> = specs.iter().map(|s| changes(s, now)).collect();
                store.append_records(&groups, now).unwrap();
                model.commit(&groups, now);
                // A re-derived event never makes a second row: the rows added are exactly the
                // distinct keys that were not in the outbox.
                let before_keys: BTreeSet<(String, String)> = model.rows[..rows_before]
                    .iter()
                    .map(|r| (r.subscription.clone(), r.transaction_id.clone()))
                    .collect();
                let new_keys: BTreeSet<(String, String)> = groups
                    .iter()
                    .flat_map(|g| &g.events)
                    .map(|e| (e.external_subscription_id.clone(), e.transaction_id.clone()))
                    .filter(|k| !before_keys.contains(k))
                    .collect();
                prop_assert_eq!(model.rows.len(), rows_before + new_keys.len());
            }
            Op::Deliver(picks) => {
                let ids: Vec<i64> = picks.iter().map(|p| picked(&model, *p)).collect();
                store.mark_delivered(&ids, now).unwrap();
                model.mark_delivered(&ids, now);
            }
            Op::Attempt(picks) => {
                // A failed attempt changes nothing the model tracks (attempts and the error
                // are diagnostics), whatever the row's state.
                let updates: Vec<_> = picks
                    .iter()
                    .map(|p| (picked(&model, *p), super::store::RetryState::default()))
                    .collect();
                store.record_retry(&updates, "503 from Lago").unwrap();
            }
            Op::DeadLetterOutbox(p, reason) => {
                let id = picked(&model, *p);
                let reason = REASONS[*reason];
                store
                    .dead_letter(id, reason, "rejected by Lago", now)
                    .unwrap();
                model.dead_letter_outbox(id, reason, "rejected by Lago", now);
            }
            Op::Requeue(spec, learnt, named) => {
                let learnt = *learnt;
                let resolve = move |tag: Option<&str>| match tag? {
                    "TAG1" => Some("sub-a".to_string()),
                    "TAG2" => Some("sub-b".to_string()),
                    "TAG3" if learnt => Some("sub-a".to_string()),
                    _ => None,
                };
                let selection = match spec {
                    RequeueSpec::Id(i) => Requeue::Id(
                        model
                            .letters
                            .get(*i % (model.letters.len() + 1))
                            .map_or(1_000_000, |l| l.listed.id),
                    ),
                    RequeueSpec::Reason(r) => Requeue::Reason(REASONS[*r]),
                    RequeueSpec::All => Requeue::All,
                };
                let named = (*named && matches!(selection, Requeue::Id(_))).then_some("sub-op");
                let got: Vec<(i64, RequeueOutcome)> = store
                    .requeue(selection, now, &resolve, named)
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.dead_letter_id, r.outcome))
                    .collect();
                let expected = model.requeue(selection, now, &resolve, named);
                prop_assert_eq!(got, expected, "requeue() outcome per dead letter");
            }
            Op::ReplaySession(cb, tx) => {
                let selection = Replay::Session {
                    charge_box_id: CHARGE_BOXES[*cb],
                    ocpp_transaction_id: *tx,
                };
                let got = store.replay(selection).unwrap();
                prop_assert_eq!(got, model.replay(selection), "replay() count");
            }
            Op::ReplaySince(back) => {
                let selection = Replay::Since(now - back);
                let got = store.replay(selection).unwrap();
                prop_assert_eq!(got, model.replay(selection), "replay() count");
            }
            Op::Prune(back) => {
                let got = store.prune(now - back).unwrap();
                prop_assert_eq!(got, model.prune(now - back), "prune() counts");
            }
            Op::Upsert(spec) => {
                let e = spec.event();
                let collided = store.upsert_pending(&e, now).unwrap().is_some();
                prop_assert_eq!(collided, model.upsert_pending(&e, now), "upsert collision");
            }
            Op::Rederive(p, variant) => {
                let id = picked(
                    &model,
                    Pick {
                        from_pending: false,
                        ..*p
                    },
                );
                if let Some(row) = model.rows.iter().find(|r| r.id == id) {
                    let mut e = row.event.clone();
                    e.properties.value = format!("{}.{variant}", e.properties.ocpp_transaction_id);
                    let collided = store.upsert_pending(&e, now).unwrap().is_some();
                    prop_assert_eq!(collided, model.upsert_pending(&e, now), "upsert collision");
                }
            }
            Op::Crash { kill } => {
                if *kill {
                    generation += 1;
                    let next = dir.path().join(format!("spool-{generation}.db"));
                    // What a kill leaves: the database and the log as they are, no checkpoint.
                    for suffix in ["", "-wal"] {
                        let mut from = path.as_os_str().to_owned();
                        from.push(suffix);
                        let mut to = next.as_os_str().to_owned();
                        to.push(suffix);
                        if Path::new(&from).exists() {
                            std::fs::copy(&from, &to).unwrap();
                        }
                    }
                    drop(store);
                    path = next;
                } else {
                    drop(store);
                }
                store = Store::open(&path).unwrap();
                leases = Leases::default();
                open_leases.clear();
            }
            Op::Lease(limit) => {
                let filter = ReadyFilter {
                    limit: *limit,
                    now_ms: i64::MAX,
                    scan_limit: 1_000,
                    ..ReadyFilter::default()
                };
                let (id, rows) = leases.lease_batch(&store, &filter).unwrap();
                let got: Vec<i64> = rows.iter().map(|r| r.row.outbox_id).collect();
                let leased: BTreeSet<i64> = open_leases
                    .iter()
                    .flat_map(|(_, ids)| ids)
                    .copied()
                    .collect();
                let expected: Vec<i64> = model
                    .pending()
                    .iter()
                    .map(|r| r.id)
                    .filter(|id| !leased.contains(id))
                    .take(*limit)
                    .collect();
                prop_assert_eq!(
                    &got,
                    &expected,
                    "lease_batch(): the oldest unleased pending"
                );
                open_leases.push((id, got));
            }
            Op::Settle(which, specs) => {
                if !open_leases.is_empty() {
                    let (id, own) = open_leases.remove(*which % open_leases.len());
                    let outcomes: Vec<(i64, Outcome)> = specs
                        .iter()
                        .map(|&(row, kind)| {
                            let outbox_id = own.get(row).copied().unwrap_or_else(|| {
                                picked(
                                    &model,
                                    Pick {
                                        from_pending: true,
                                        index: row,
                                    },
                                )
                            });
                            let outcome = match kind {
                                0 => Outcome::Delivered,
                                1 => Outcome::Retry {
                                    state: RetryState::default(),
                                    error: "503 from Lago".into(),
                                },
                                _ => Outcome::DeadLetter {
                                    reason: REASONS[row % REASONS.len()].into(),
                                    detail: "rejected by Lago".into(),
                                },
                            };
                            (outbox_id, outcome)
                        })
                        .collect();
                    let got = leases.settle(&mut store, id, &outcomes, now).unwrap();
                    // Only the lease's own rows change, each while it is still pending.
                    let mut expected = Settled::default();
                    for (outbox_id, outcome) in outcomes.iter().filter(|(i, _)| own.contains(i)) {
                        let pending = model
                            .rows
                            .iter()
                            .any(|r| r.id == *outbox_id && r.state == State::Pending);
                        if !pending {
                            continue;
                        }
                        match outcome {
                            Outcome::Delivered => {
                                expected.delivered += 1;
                                model.mark_delivered(&[*outbox_id], now);
                            }
                            Outcome::Retry { .. } => expected.retried += 1,
                            Outcome::DeadLetter { reason, detail } => {
                                expected.dead_lettered += 1;
                                model.dead_letter_outbox(*outbox_id, reason, detail, now);
                            }
                        }
                    }
                    prop_assert_eq!(got, expected, "settle() counts");
                }
            }
        }

        // Invariants, stated on their own (the model encodes them too).
        let pending_after = keys(&model, State::Pending);
        let may_resend = matches!(
            op,
            Op::Requeue(..)
                | Op::ReplaySession(..)
                | Op::ReplaySince(_)
                | Op::Upsert(_)
                | Op::Rederive(..)
        );
        if !may_resend {
            for key in pending_after.difference(&pending_before) {
                prop_assert!(
                    !delivered_before.contains(key),
                    "step {}: delivered {:?} pending again after {:?}",
                    step,
                    key,
                    op
                );
            }
        }
        if let Op::Prune(_) = op {
            for r in &undelivered_before {
                prop_assert!(
                    model.rows.contains(r),
                    "step {}: prune removed undelivered {:?}",
                    step,
                    r
                );
            }
        }
        let mut seen = BTreeSet::new();
        for r in &model.rows {
            prop_assert!(
                seen.insert((&r.subscription, &r.transaction_id)),
                "duplicate key"
            );
        }
        check(&store, &path, &model)
            .map_err(|e| TestCaseError::fail(format!("after step {step} ({op:?}): {e}")))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn the_spool_matches_its_model_across_crashes(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops)?;
    }
}
