//! The SQLite file: schema, migrations and every statement. Synchronous; the writer thread and
//! the operator CLI are its only users, and only the writer thread writes while the daemon runs.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::event::LagoEvent;

/// Schema versions this binary knows, in order; `MIGRATIONS[n]` brings version n to n + 1.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tap_records (
    id INTEGER PRIMARY KEY,
    received_at INTEGER NOT NULL,          -- unix seconds, bridge clock
    charge_box_id TEXT NOT NULL,
    ocpp_transaction_id INTEGER,
    kind TEXT NOT NULL,                    -- start | meter_values | stop
    record TEXT NOT NULL                   -- the TapRecord as JSON: the source of truth for replay
);
CREATE INDEX tap_records_session ON tap_records (charge_box_id, ocpp_transaction_id);
CREATE INDEX tap_records_received ON tap_records (received_at);

CREATE TABLE sessions (
    charge_box_id TEXT NOT NULL,
    ocpp_transaction_id INTEGER NOT NULL,
    state TEXT NOT NULL,                   -- the ledger's SessionState as JSON
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (charge_box_id, ocpp_transaction_id)
);

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    lago_transaction_id TEXT NOT NULL,
    external_subscription_id TEXT NOT NULL,
    charge_box_id TEXT NOT NULL,
    ocpp_transaction_id INTEGER NOT NULL,
    event TEXT NOT NULL,                   -- the LagoEvent exactly as sent, every time
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'dead')),
    created_at INTEGER NOT NULL,
    delivered_at INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    UNIQUE (external_subscription_id, lago_transaction_id)
);
CREATE INDEX outbox_state ON outbox (state, id);

CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    charge_box_id TEXT,
    ocpp_transaction_id INTEGER,
    id_tag TEXT,                           -- what the operator maps to a subscription
    lago_transaction_id TEXT,
    external_subscription_id TEXT,
    event TEXT,                            -- the held LagoEvent, when there is one to requeue
    outbox_id INTEGER REFERENCES outbox (id),
    first_attempt INTEGER NOT NULL,
    last_attempt INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    requeued_at INTEGER
);
CREATE INDEX dead_letters_reason ON dead_letters (reason);
"#,
    // Version 2: each pending row's own retry state, so one row Lago keeps failing on (or one whose
    // outcome must be checked) waits on its own instead of holding every batch behind it.
    r#"
ALTER TABLE outbox ADD COLUMN retry_at_ms INTEGER NOT NULL DEFAULT 0;   -- not sent before (unix ms)
ALTER TABLE outbox ADD COLUMN backoff_ms INTEGER NOT NULL DEFAULT 0;    -- its last backoff alone
ALTER TABLE outbox ADD COLUMN needs_check INTEGER NOT NULL DEFAULT 0;   -- outcome unknown: GET first
ALTER TABLE outbox ADD COLUMN max_batch INTEGER;                        -- rides in batches up to this
"#,
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Why the spool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "spool schema version {found} is newer than this binary knows ({known}): the file is left untouched"
    )]
    NewerSchema { found: i64, known: i64 },
    #[error("spool I/O: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot create the spool directory {path}: {source}")]
    Directory {
        path: String,
        source: std::io::Error,
    },
    #[error("stored JSON does not parse: {0}")]
    Json(#[from] serde_json::Error),
}

/// A raw tap record row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRow {
    pub received_at: i64,
    pub charge_box_id: String,
    pub ocpp_transaction_id: Option<i64>,
    pub kind: &'static str,
    pub json: String,
}

/// A ledger session state row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub charge_box_id: String,
    pub ocpp_transaction_id: i64,
    pub state_json: String,
}

/// A dead letter as first recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeadLetter {
    pub reason: String,
    pub detail: String,
    pub charge_box_id: Option<String>,
    pub ocpp_transaction_id: Option<i64>,
    pub id_tag: Option<String>,
    pub event: Option<LagoEvent>,
}

/// What one tap record changed, committed atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub records: Vec<RecordRow>,
    pub sessions: Vec<SessionRow>,
    /// Sessions the ledger dropped from memory: (charge_box_id, ocpp_transaction_id).
    pub removed_sessions: Vec<(String, i64)>,
    pub events: Vec<LagoEvent>,
    pub dead_letters: Vec<NewDeadLetter>,
}

/// One outbox row: its id and the event exactly as first derived (and sent on every retry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub outbox_id: i64,
    pub event: LagoEvent,
}

/// A pending row's own retry state (outbox columns of schema version 2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryState {
    /// Lago may hold this event already (`value_already_exist`): check before sending again.
    pub needs_check: bool,
    /// After a failed batch: ride only in batches of at most this many (1 = alone).
    pub max_batch: Option<usize>,
    /// The backoff of its last failure alone (0 = none), doubled on the next one.
    pub backoff_ms: u64,
    /// Not to be sent or checked before this unix time in milliseconds.
    pub retry_at_ms: i64,
}

/// A pending row ready to go, with its retry state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyRow {
    pub row: OutboxRow,
    pub retry: RetryState,
}

/// What to read for the shipper's next job.
#[derive(Debug, Clone, Default)]
pub struct ReadyFilter {
    /// Most rows returned.
    pub limit: usize,
    /// Unix ms now: rows waiting for a later `retry_at_ms` are skipped.
    pub now_ms: i64,
    /// Rows being marked delivered right now (still pending on disk).
    pub skip_ids: HashSet<i64>,
    /// Subscriptions whose events are held back (not yet confirmed in Lago).
    pub held_subscriptions: HashSet<String>,
    /// Most pending rows looked at, so a long run of held rows costs a bounded read.
    pub scan_limit: usize,
}

/// A dead letter as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub reason: String,
    pub detail: String,
    pub charge_box_id: Option<String>,
    pub ocpp_transaction_id: Option<i64>,
    pub lago_transaction_id: Option<String>,
    pub external_subscription_id: Option<String>,
    pub first_attempt: i64,
    pub last_attempt: i64,
    pub attempts: i64,
    pub requeued: bool,
}

/// Size and backlog, for `spool stats`, metrics and alarms.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub file_bytes: u64,
    pub tap_records: i64,
    pub sessions: i64,
    pub pending_events: i64,
    pub delivered_events: i64,
    pub dead_letters: i64,
    /// Unix seconds of the oldest pending event's creation.
    pub oldest_pending_created_at: Option<i64>,
}

/// An open spool file.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) and migrates the spool at `path`. A file with a newer schema is
    /// not modified in any way.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Directory {
                path: dir.display().to_string(),
                source,
            })?;
        }
        // Read the version before anything that could write (WAL mode, migrations).
        if path.exists() {
            let probe = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            let found: i64 = probe.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            if found > SCHEMA_VERSION {
                return Err(StoreError::NewerSchema {
                    found,
                    known: SCHEMA_VERSION,
                });
            }
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // WAL + FULL: a commit is on disk when it returns, which is what lets us ack a charger.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Every tap record inserts into the per-session index at its charger's spot and rewrites
        // that session's state: with a fleet, that is a random page each. SQLite's default 2 MiB
        // cache re-reads them from the OS on every commit; 64 MiB keeps a large fleet's hot
        // pages (it is a ceiling, used only as the spool grows).
        conn.pragma_update(None, "cache_size", -65536)?;
        let mut store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let found: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                found,
                known: SCHEMA_VERSION,
            });
        }
        for (version, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version as i64 + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Commits every change set in one transaction (one fsync for the whole group).
    pub fn commit<'a>(
        &mut self,
        groups: impl IntoIterator<Item = &'a Changes>,
        now: i64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut record = tx.prepare_cached(
                "INSERT INTO tap_records (received_at, charge_box_id, ocpp_transaction_id, kind, record)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut session = tx.prepare_cached(
                "INSERT INTO sessions (charge_box_id, ocpp_transaction_id, state, updated_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (charge_box_id, ocpp_transaction_id)
                 DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
            )?;
            // Ids are content-derived, so a re-derived event is the same row: keep the first.
            let mut event = tx.prepare_cached(
                "INSERT OR IGNORE INTO outbox (lago_transaction_id, external_subscription_id,
                     charge_box_id, ocpp_transaction_id, event, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut removed = tx.prepare_cached(
                "DELETE FROM sessions WHERE charge_box_id = ?1 AND ocpp_transaction_id = ?2",
            )?;
            let mut dead = tx.prepare_cached(
                "INSERT INTO dead_letters (reason, detail, charge_box_id, ocpp_transaction_id, id_tag,
                     lago_transaction_id, external_subscription_id, event, first_attempt, last_attempt)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
            )?;
            for changes in groups {
                for r in &changes.records {
                    record.execute(params![
                        r.received_at,
                        r.charge_box_id,
                        r.ocpp_transaction_id,
                        r.kind,
                        r.json
                    ])?;
                }
                for s in &changes.sessions {
                    session.execute(params![
                        s.charge_box_id,
                        s.ocpp_transaction_id,
                        s.state_json,
                        now
                    ])?;
                }
                for (charge_box_id, ocpp_transaction_id) in &changes.removed_sessions {
                    removed.execute(params![charge_box_id, ocpp_transaction_id])?;
                }
                for e in &changes.events {
                    event.execute(params![
                        e.transaction_id,
                        e.external_subscription_id,
                        e.properties.charge_box_id,
                        e.properties.ocpp_transaction_id,
                        serde_json::to_string(e)?,
                        now
                    ])?;
                }
                for d in &changes.dead_letters {
                    dead.execute(params![
                        d.reason,
                        d.detail,
                        d.charge_box_id,
                        d.ocpp_transaction_id,
                        d.id_tag,
                        d.event.as_ref().map(|e| e.transaction_id.clone()),
                        d.event.as_ref().map(|e| e.external_subscription_id.clone()),
                        d.event.as_ref().map(serde_json::to_string).transpose()?,
                        now
                    ])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// All persisted session states, to rebuild the ledger at startup.
    pub fn sessions(&self) -> Result<Vec<SessionRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT charge_box_id, ocpp_transaction_id, state FROM sessions")?;
        let rows = stmt.query_map([], |r| {
            Ok(SessionRow {
                charge_box_id: r.get(0)?,
                ocpp_transaction_id: r.get(1)?,
                state_json: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The oldest pending events, in creation order (so a session's events go out in order).
    pub fn pending(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        self.pending_except(limit, &HashSet::new())
    }

    /// Like [`Self::pending`], skipping the rows in `except` (the shipper's rows whose delivery
    /// is being committed right now: still pending on disk, but not to be sent again).
    pub fn pending_except(
        &self,
        limit: usize,
        except: &HashSet<i64>,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, event FROM outbox WHERE state = 'pending' ORDER BY id LIMIT ?1",
        )?;
        let mut rows = stmt.query([(limit + except.len()) as i64])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            if out.len() == limit {
                break;
            }
            let outbox_id: i64 = row.get(0)?;
            if except.contains(&outbox_id) {
                continue;
            }
            out.push(OutboxRow {
                outbox_id,
                event: serde_json::from_str(&row.get::<_, String>(1)?)?,
            });
        }
        Ok(out)
    }

    /// The oldest pending rows the shipper may use now, in creation order, with their retry
    /// state: rows backing off, rows being marked and rows of held subscriptions are skipped.
    /// Reads the subscription column before the event, so a skipped row costs no JSON parse.
    pub fn ready(&self, filter: &ReadyFilter) -> Result<Vec<ReadyRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, external_subscription_id, retry_at_ms, event, needs_check, max_batch,
                    backoff_ms
             FROM outbox WHERE state = 'pending' ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        let mut scanned = 0;
        while let Some(row) = rows.next()? {
            if out.len() >= filter.limit || scanned >= filter.scan_limit.max(filter.limit) {
                break;
            }
            scanned += 1;
            let outbox_id: i64 = row.get(0)?;
            let retry_at_ms: i64 = row.get(2)?;
            if retry_at_ms > filter.now_ms || filter.skip_ids.contains(&outbox_id) {
                continue;
            }
            if !filter.held_subscriptions.is_empty()
                && filter
                    .held_subscriptions
                    .contains(row.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?)
            {
                continue;
            }
            let max_batch: Option<i64> = row.get(5)?;
            let backoff_ms: i64 = row.get(6)?;
            out.push(ReadyRow {
                row: OutboxRow {
                    outbox_id,
                    event: serde_json::from_str(&row.get::<_, String>(3)?)?,
                },
                retry: RetryState {
                    needs_check: row.get(4)?,
                    max_batch: max_batch.map(|m| usize::try_from(m.max(1)).unwrap_or(1)),
                    backoff_ms: u64::try_from(backoff_ms).unwrap_or(0),
                    retry_at_ms,
                },
            });
        }
        Ok(out)
    }

    /// Records a failed attempt on pending rows with each row's new retry state (they stay
    /// pending).
    pub fn record_retry(
        &mut self,
        updates: &[(i64, RetryState)],
        error: &str,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, retry_at_ms = ?3,
                     backoff_ms = ?4, needs_check = ?5, max_batch = ?6
                 WHERE id = ?1 AND state = 'pending'",
            )?;
            for (id, retry) in updates {
                stmt.execute(params![
                    id,
                    error,
                    retry.retry_at_ms,
                    i64::try_from(retry.backoff_ms).unwrap_or(i64::MAX),
                    retry.needs_check,
                    retry
                        .max_batch
                        .map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// How many events are pending and when the oldest was created (unix seconds).
    ///
    /// The oldest is the pending row with the lowest id: ids and `created_at` both come from the
    /// single writer's commit, so they grow together (a requeued or replayed row keeps both).
    /// `MIN(created_at)` would visit every pending row: ~0.3 s per call on a million-event backlog,
    /// which the shipper paid before each batch. Both parts here read only the `(state, id)` index,
    /// plus one row.
    pub fn backlog(&self) -> Result<(i64, Option<i64>), StoreError> {
        let pending = self.conn.query_row(
            "SELECT COUNT(*) FROM outbox WHERE state = 'pending'",
            [],
            |r| r.get(0),
        )?;
        let oldest = self
            .conn
            .query_row(
                "SELECT created_at FROM outbox WHERE state = 'pending' ORDER BY id LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok((pending, oldest))
    }

    /// Marks outbox rows delivered.
    pub fn mark_delivered(&mut self, ids: &[i64], now: i64) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE outbox SET state = 'delivered', delivered_at = ?2, attempts = attempts + 1,
                     retry_at_ms = 0, backoff_ms = 0, needs_check = 0, max_batch = NULL
                 WHERE id = ?1 AND state = 'pending'",
            )?;
            for id in ids {
                stmt.execute(params![id, now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Moves an outbox row to the dead letters with Lago's (or our) reason.
    pub fn dead_letter_outbox(
        &mut self,
        id: i64,
        reason: &str,
        detail: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let changed = tx.execute(
            "UPDATE outbox SET state = 'dead', attempts = attempts + 1, last_error = ?2,
                 retry_at_ms = 0, backoff_ms = 0, needs_check = 0, max_batch = NULL
             WHERE id = ?1 AND state = 'pending'",
            params![id, detail],
        )?;
        if changed == 1 {
            tx.execute(
                "INSERT INTO dead_letters (reason, detail, charge_box_id, ocpp_transaction_id,
                     lago_transaction_id, external_subscription_id, event, outbox_id,
                     first_attempt, last_attempt)
                 SELECT ?2, ?3, charge_box_id, ocpp_transaction_id, lago_transaction_id,
                     external_subscription_id, event, id, created_at, ?4
                 FROM outbox WHERE id = ?1",
                params![id, reason, detail, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Dead letters, optionally of one reason, oldest first.
    pub fn dead_letters(&self, reason: Option<&str>) -> Result<Vec<DeadLetter>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, reason, detail, charge_box_id, ocpp_transaction_id, lago_transaction_id,
                    external_subscription_id, first_attempt, last_attempt, attempts,
                    requeued_at IS NOT NULL
             FROM dead_letters WHERE ?1 IS NULL OR reason = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([reason], |r| {
            Ok(DeadLetter {
                id: r.get(0)?,
                reason: r.get(1)?,
                detail: r.get(2)?,
                charge_box_id: r.get(3)?,
                ocpp_transaction_id: r.get(4)?,
                lago_transaction_id: r.get(5)?,
                external_subscription_id: r.get(6)?,
                first_attempt: r.get(7)?,
                last_attempt: r.get(8)?,
                attempts: r.get(9)?,
                requeued: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Puts dead letters that hold an event back into the outbox as pending. An event held for
    /// want of a subscription gets one from `resolve_subscription(id_tag)` (the current map) or
    /// stays a dead letter. Returns (requeued, still unmapped).
    pub fn requeue(
        &mut self,
        selection: Requeue<'_>,
        now: i64,
        resolve_subscription: &dyn Fn(Option<&str>) -> Option<String>,
    ) -> Result<(usize, usize), StoreError> {
        let tx = self.conn.transaction()?;
        let candidates: Vec<(i64, Option<i64>, String, Option<String>)> = {
            let (filter, arg): (&str, Option<String>) = match selection {
                Requeue::Id(id) => ("id = CAST(?1 AS INTEGER)", Some(id.to_string())),
                Requeue::Reason(reason) => ("reason = ?1", Some(reason.to_string())),
                Requeue::All => ("?1 IS NULL", None),
            };
            let mut stmt = tx.prepare(&format!(
                "SELECT id, outbox_id, event, id_tag FROM dead_letters
                 WHERE requeued_at IS NULL AND event IS NOT NULL AND {filter} ORDER BY id"
            ))?;
            stmt.query_map([arg], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<Result<_, _>>()?
        };
        let (mut requeued, mut unmapped) = (0, 0);
        for (id, outbox_id, event, id_tag) in candidates {
            match outbox_id {
                Some(outbox_id) => {
                    tx.execute(
                        "UPDATE outbox SET state = 'pending' WHERE id = ?1 AND state = 'dead'",
                        [outbox_id],
                    )?;
                }
                None => {
                    let mut e: LagoEvent = serde_json::from_str(&event)?;
                    if e.external_subscription_id.is_empty() {
                        match resolve_subscription(id_tag.as_deref()) {
                            Some(subscription) => e.external_subscription_id = subscription,
                            None => {
                                unmapped += 1;
                                continue;
                            }
                        }
                    }
                    tx.execute(
                        "INSERT OR IGNORE INTO outbox (lago_transaction_id, external_subscription_id,
                             charge_box_id, ocpp_transaction_id, event, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![
                            e.transaction_id,
                            e.external_subscription_id,
                            e.properties.charge_box_id,
                            e.properties.ocpp_transaction_id,
                            serde_json::to_string(&e)?,
                            now
                        ],
                    )?;
                }
            }
            tx.execute(
                "UPDATE dead_letters SET requeued_at = ?2 WHERE id = ?1",
                params![id, now],
            )?;
            requeued += 1;
        }
        tx.commit()?;
        Ok((requeued, unmapped))
    }

    /// Sets delivered events back to pending so they are sent again unchanged (same ids, values
    /// and timestamps: Lago dedupes them). Returns how many.
    pub fn replay(&mut self, selection: Replay<'_>) -> Result<usize, StoreError> {
        Ok(match selection {
            Replay::Session {
                charge_box_id,
                ocpp_transaction_id,
            } => self.conn.execute(
                "UPDATE outbox SET state = 'pending'
                 WHERE state = 'delivered' AND charge_box_id = ?1 AND ocpp_transaction_id = ?2",
                params![charge_box_id, ocpp_transaction_id],
            )?,
            Replay::Since(since) => self.conn.execute(
                "UPDATE outbox SET state = 'pending' WHERE state = 'delivered' AND created_at >= ?1",
                [since],
            )?,
        })
    }

    /// The stored tap records of one session, in arrival order (the source of truth for replay).
    pub fn session_records(
        &self,
        charge_box_id: &str,
        ocpp_transaction_id: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT record FROM tap_records WHERE charge_box_id = ?1 AND ocpp_transaction_id = ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![charge_box_id, ocpp_transaction_id], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sessions with tap records received at or after `since` (unix seconds).
    pub fn sessions_with_records_since(
        &self,
        since: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT DISTINCT charge_box_id, ocpp_transaction_id FROM tap_records
             WHERE received_at >= ?1 AND ocpp_transaction_id IS NOT NULL ORDER BY 1, 2",
        )?;
        let rows = stmt.query_map([since], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Queues a re-derived event for sending, replacing a stored one with the same key (only
    /// for sessions Lago holds nothing of: the caller checks).
    pub fn upsert_pending(&mut self, event: &LagoEvent, now: i64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO outbox (lago_transaction_id, external_subscription_id, charge_box_id,
                 ocpp_transaction_id, event, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (external_subscription_id, lago_transaction_id)
             DO UPDATE SET event = excluded.event, state = 'pending'",
            params![
                event.transaction_id,
                event.external_subscription_id,
                event.properties.charge_box_id,
                event.properties.ocpp_transaction_id,
                serde_json::to_string(event)?,
                now
            ],
        )?;
        // A row that was dead is pending again: its dead letter is settled, as by a requeue.
        self.conn.execute(
            "UPDATE dead_letters SET requeued_at = ?3
             WHERE requeued_at IS NULL AND outbox_id = (SELECT id FROM outbox
                 WHERE external_subscription_id = ?1 AND lago_transaction_id = ?2)",
            params![event.external_subscription_id, event.transaction_id, now],
        )?;
        Ok(())
    }

    /// Size and backlog figures.
    pub fn stats(&self, path: &Path) -> Result<Stats, StoreError> {
        let count = |sql: &str| -> Result<i64, rusqlite::Error> {
            self.conn.query_row(sql, [], |r| r.get(0))
        };
        Ok(Stats {
            file_bytes: file_bytes(path),
            tap_records: count("SELECT COUNT(*) FROM tap_records")?,
            sessions: count("SELECT COUNT(*) FROM sessions")?,
            pending_events: count("SELECT COUNT(*) FROM outbox WHERE state = 'pending'")?,
            delivered_events: count("SELECT COUNT(*) FROM outbox WHERE state = 'delivered'")?,
            dead_letters: count("SELECT COUNT(*) FROM dead_letters WHERE requeued_at IS NULL")?,
            oldest_pending_created_at: self
                .conn
                .query_row(
                    "SELECT MIN(created_at) FROM outbox WHERE state = 'pending'",
                    [],
                    |r| r.get(0),
                )
                .optional()?
                .flatten(),
        })
    }

    /// Deletes events delivered before `cutoff`, then tap records received before it whose
    /// session has no event left (pending, dead or recently delivered) and no open dead letter.
    /// Undelivered data is never pruned; the ledger state stays. Returns (events, records).
    pub fn prune(&mut self, cutoff: i64) -> Result<(usize, usize), StoreError> {
        let tx = self.conn.transaction()?;
        let events = tx.execute(
            "DELETE FROM outbox WHERE state = 'delivered' AND delivered_at < ?1
               AND id NOT IN (SELECT outbox_id FROM dead_letters WHERE outbox_id IS NOT NULL)",
            [cutoff],
        )?;
        let records = tx.execute(
            "DELETE FROM tap_records WHERE received_at < ?1
               AND NOT EXISTS (SELECT 1 FROM outbox o
                               WHERE o.charge_box_id = tap_records.charge_box_id
                                 AND o.ocpp_transaction_id = tap_records.ocpp_transaction_id)
               AND NOT EXISTS (SELECT 1 FROM dead_letters d
                               WHERE d.charge_box_id = tap_records.charge_box_id
                                 AND d.ocpp_transaction_id = tap_records.ocpp_transaction_id
                                 AND d.requeued_at IS NULL)",
            [cutoff],
        )?;
        tx.commit()?;
        Ok((events, records))
    }
}

/// The spool's size on disk: the database file plus its write-ahead log.
pub fn file_bytes(path: &Path) -> u64 {
    ["", "-wal"]
        .iter()
        .filter_map(|suffix| {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            std::fs::metadata(file).ok().map(|m| m.len())
        })
        .sum()
}

/// Which delivered events `replay` sends again.
#[derive(Debug, Clone, Copy)]
pub enum Replay<'a> {
    Session {
        charge_box_id: &'a str,
        ocpp_transaction_id: i64,
    },
    /// Events created at or after this unix time.
    Since(i64),
}

/// Which dead letters `requeue` takes.
#[derive(Debug, Clone, Copy)]
pub enum Requeue<'a> {
    Id(i64),
    Reason(&'a str),
    All,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(tid: &str, sub: &str) -> LagoEvent {
        crate::event::sample_event(tid, sub, 7)
    }

    fn changes(events: Vec<LagoEvent>) -> Changes {
        Changes {
            records: vec![RecordRow {
                received_at: 100,
                charge_box_id: "CP1".into(),
                ocpp_transaction_id: Some(7),
                kind: "stop",
                json: "{}".into(),
            }],
            sessions: vec![SessionRow {
                charge_box_id: "CP1".into(),
                ocpp_transaction_id: 7,
                state_json: r#"{"v":1}"#.into(),
            }],
            removed_sessions: vec![],
            events,
            dead_letters: vec![],
        }
    }

    #[test]
    fn pending_except_skips_rows_being_marked_and_still_fills_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let mut store = Store::open(&path).unwrap();
        let events = (1..=6).map(|n| event(&n.to_string(), "sub")).collect();
        store.commit(&[changes(events)], 100).unwrap();
        let ids: Vec<i64> = store
            .pending(10)
            .unwrap()
            .iter()
            .map(|r| r.outbox_id)
            .collect();
        assert_eq!(ids.len(), 6);

        // The first two are being marked delivered: the next three after them, in order.
        let marking: HashSet<i64> = ids[..2].iter().copied().collect();
        let next = store.pending_except(3, &marking).unwrap();
        let got: Vec<i64> = next.iter().map(|r| r.outbox_id).collect();
        assert_eq!(got, ids[2..5]);
        assert_eq!(next[0].event, event("3", "sub"));
        // A skipped row below the others (a failed batch's rest) still comes first.
        let marking: HashSet<i64> = [ids[1], ids[3]].into_iter().collect();
        let got: Vec<i64> = store
            .pending_except(10, &marking)
            .unwrap()
            .iter()
            .map(|r| r.outbox_id)
            .collect();
        assert_eq!(got, vec![ids[0], ids[2], ids[4], ids[5]]);
        assert_eq!(store.backlog().unwrap(), (6, Some(100)));
    }

    #[test]
    fn ready_rows_skip_backing_off_held_and_marking_rows_and_keep_their_retry_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("spool.db")).unwrap();
        let mut events: Vec<LagoEvent> = (1..=5).map(|n| event(&n.to_string(), "sub")).collect();
        events.push(event("6", "held"));
        store.commit(&[changes(events)], 100).unwrap();
        let ids: Vec<i64> = store
            .pending(10)
            .unwrap()
            .iter()
            .map(|r| r.outbox_id)
            .collect();
        let backing_off = RetryState {
            needs_check: false,
            max_batch: Some(1),
            backoff_ms: 400,
            retry_at_ms: 5_000,
        };
        let to_check = RetryState {
            needs_check: true,
            max_batch: Some(2),
            backoff_ms: 0,
            retry_at_ms: 0,
        };
        store
            .record_retry(&[(ids[0], backing_off), (ids[1], to_check)], "HTTP 503")
            .unwrap();
        let filter = |now_ms| ReadyFilter {
            limit: 10,
            now_ms,
            skip_ids: [ids[2]].into_iter().collect(),
            held_subscriptions: ["held".to_owned()].into_iter().collect(),
            scan_limit: 100,
        };
        let ready = store.ready(&filter(4_999)).unwrap();
        let got: Vec<i64> = ready.iter().map(|r| r.row.outbox_id).collect();
        assert_eq!(got, [ids[1], ids[3], ids[4]]);
        assert_eq!(ready[0].retry, to_check);
        assert_eq!(ready[1].retry, RetryState::default());
        let ready = store.ready(&filter(5_000)).unwrap();
        assert_eq!(ready[0].retry, backing_off, "due at its retry_at_ms");
        // The scan is bounded even when every row is skipped.
        let bounded = ReadyFilter {
            scan_limit: 1,
            limit: 1,
            ..filter(0)
        };
        assert!(store.ready(&bounded).unwrap().is_empty());
        // Settling a row clears its retry state (a requeued or replayed row starts afresh).
        store.mark_delivered(&[ids[0]], 200).unwrap();
        store.replay(Replay::Since(0)).unwrap();
        let again = store.ready(&filter(0)).unwrap();
        assert_eq!(again[0].row.outbox_id, ids[0]);
        assert_eq!(again[0].retry, RetryState::default());
    }

    #[test]
    fn a_schema_1_spool_migrates_forward_with_its_pending_rows_ready() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO outbox (lago_transaction_id, external_subscription_id, charge_box_id,
                     ocpp_transaction_id, event, created_at)
                 VALUES ('7', 'sub', 'CP1', 7, ?1, 100)",
                [serde_json::to_string(&event("7", "sub")).unwrap()],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let version: i64 = store
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let ready = store
            .ready(&ReadyFilter {
                limit: 10,
                scan_limit: 10,
                ..ReadyFilter::default()
            })
            .unwrap();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].row.event, event("7", "sub"));
        assert_eq!(ready[0].retry, RetryState::default());
    }

    #[test]
    fn the_wal_stays_bounded_under_a_continuous_writer() {
        // SQLite's own checkpoint, at the end of the commit crossing 1 000 pages, lets the next
        // commit restart the WAL. (A checkpoint from another connection never caught up with a
        // busy writer: the WAL reached 13.9 GB beside a 0.88 GB spool, BENCHMARKS.md.)
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let mut writer = Store::open(&path).unwrap();
        let reader = Store::open(&path).unwrap();
        for n in 0..1500 {
            let mut group = changes(vec![event(&n.to_string(), "sub")]);
            group.records[0].json = "x".repeat(8 * 1024);
            writer.commit(&[group], 100).unwrap();
            if n % 100 == 0 {
                // A reader (the shipper) comes and goes meanwhile.
                assert!(!reader.pending(10).unwrap().is_empty());
            }
        }
        let wal = std::fs::metadata(dir.path().join("spool.db-wal"))
            .unwrap()
            .len();
        assert!(
            wal < 8 * 1024 * 1024,
            "WAL {wal} bytes after 1 500 commits of ~12 KB"
        );
    }

    #[test]
    fn a_committed_event_survives_reopening_and_is_delivered_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/spool.db");
        let mut store = Store::open(&path).unwrap();
        store
            .commit(&[changes(vec![event("7", "sub")])], 100)
            .unwrap();
        // A re-derived identical event is the same row.
        store
            .commit(&[changes(vec![event("7", "sub")])], 101)
            .unwrap();
        drop(store);

        let mut store = Store::open(&path).unwrap();
        let pending = store.pending(100).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].event, event("7", "sub"));
        assert_eq!(store.sessions().unwrap().len(), 1);
        store.mark_delivered(&[pending[0].outbox_id], 200).unwrap();
        assert!(store.pending(100).unwrap().is_empty());
        let stats = store.stats(&path).unwrap();
        assert_eq!(
            (
                stats.pending_events,
                stats.delivered_events,
                stats.tap_records
            ),
            (0, 1, 2)
        );
        assert!(stats.file_bytes > 0);
    }

    #[test]
    fn dead_letters_are_listed_and_requeued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let mut store = Store::open(&path).unwrap();
        let mut c = changes(vec![event("1", "a"), event("2", "b")]);
        c.dead_letters.push(NewDeadLetter {
            reason: "unmapped_id_tag".into(),
            detail: "no subscription for id tag TAG".into(),
            charge_box_id: Some("CP1".into()),
            ocpp_transaction_id: Some(9),
            id_tag: Some("TAG".into()),
            event: Some(event("9", "")),
        });
        store.commit(&[c], 100).unwrap();
        let first = store.pending(1).unwrap()[0].outbox_id;
        store
            .dead_letter_outbox(first, "lago_rejected", "code: does not exist", 150)
            .unwrap();
        let letters = store.dead_letters(None).unwrap();
        assert_eq!(letters.len(), 2);
        assert_eq!(store.dead_letters(Some("lago_rejected")).unwrap().len(), 1);
        assert_eq!(store.pending(10).unwrap().len(), 1);

        let unmapped = |_: Option<&str>| None;
        let mapped = |id_tag: Option<&str>| id_tag.map(|t| format!("sub-of-{t}"));
        let reason = Requeue::Reason("unmapped_id_tag");
        assert_eq!(
            store.requeue(reason, 155, &unmapped).unwrap(),
            (0, 1),
            "map still lacks it"
        );
        assert_eq!(store.requeue(reason, 160, &mapped).unwrap(), (1, 0));
        assert_eq!(store.requeue(Requeue::All, 170, &mapped).unwrap(), (1, 0));
        assert_eq!(
            store.requeue(Requeue::All, 180, &mapped).unwrap(),
            (0, 0),
            "requeued once only"
        );
        let pending: Vec<(String, String)> = store
            .pending(10)
            .unwrap()
            .into_iter()
            .map(|r| (r.event.transaction_id, r.event.external_subscription_id))
            .collect();
        assert_eq!(
            pending,
            [
                ("1".into(), "a".into()),
                ("2".into(), "b".into()),
                ("9".into(), "sub-of-TAG".into())
            ]
        );
        assert_eq!(store.stats(&path).unwrap().dead_letters, 0);
    }

    #[test]
    fn pruning_keeps_everything_undelivered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let mut store = Store::open(&path).unwrap();
        store
            .commit(&[changes(vec![event("1", "a")])], 100)
            .unwrap();
        assert_eq!(
            store.prune(1_000).unwrap(),
            (0, 0),
            "pending event protects its records"
        );
        let id = store.pending(1).unwrap()[0].outbox_id;
        store.mark_delivered(&[id], 200).unwrap();
        assert_eq!(
            store.prune(150).unwrap(),
            (0, 0),
            "delivered after the cutoff"
        );
        assert_eq!(store.prune(1_000).unwrap(), (1, 1));
    }

    #[test]
    fn a_newer_schema_is_never_touched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        match Store::open(&path) {
            Err(StoreError::NewerSchema { found, known }) => {
                assert_eq!((found, known), (SCHEMA_VERSION + 1, SCHEMA_VERSION))
            }
            other => panic!("expected NewerSchema, got {:?}", other.err()),
        }
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(!dir.path().join("spool.db-wal").exists());
    }
}
