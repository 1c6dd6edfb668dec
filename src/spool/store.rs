//! The SQLite file: schema, migrations and every statement. Synchronous; the writer thread and
//! the operator CLI are its only users, and only the writer thread writes while the daemon runs.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::event::LagoEvent;
use crate::ledger::AnomalyReason;

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
    r#"
-- Stops of sessions the ledger did not know, waiting for their start from SteVe's REST API
-- (recovery.rs). Each is also in tap_records; this copy outlives pruning and a restart, and a
-- row is deleted in the same transaction that applies its Stop to the ledger.
CREATE TABLE parked_stops (
    id INTEGER PRIMARY KEY,
    charge_box_id TEXT NOT NULL,
    ocpp_transaction_id INTEGER NOT NULL,
    record TEXT NOT NULL,                  -- the Stop TapRecord as JSON
    parked_at INTEGER NOT NULL
);
CREATE INDEX parked_stops_session ON parked_stops (charge_box_id, ocpp_transaction_id);
"#,
    // Version 3: each pending row's own retry state, so one row Lago keeps failing on (or one whose
    // outcome must be checked) waits on its own instead of holding every batch behind it.
    r#"
ALTER TABLE outbox ADD COLUMN retry_at_ms INTEGER NOT NULL DEFAULT 0;   -- not sent before (unix ms)
ALTER TABLE outbox ADD COLUMN backoff_ms INTEGER NOT NULL DEFAULT 0;    -- its last backoff alone
ALTER TABLE outbox ADD COLUMN needs_check INTEGER NOT NULL DEFAULT 0;   -- outcome unknown: GET first
ALTER TABLE outbox ADD COLUMN max_batch INTEGER;                        -- rides in batches up to this
"#,
    // Version 4: who queued a row. 'live' is the bridge's own billing; 'reconcile' an event
    // `reconcile --backfill` derived from SteVe's record of a session Lago did not bill.
    r#"
ALTER TABLE outbox ADD COLUMN origin TEXT NOT NULL DEFAULT 'live';
"#,
    // Version 5 (issue 16): a MeterValues costs one appended row. The per-session index put
    // every tap record at its charger's spot in a B-tree, a random page written per record (a
    // plain SQLite loop here: 2-3x fewer rows/s with it); its one user, `replay --rederive`
    // (`Store::session_records`), finds a session's records by scanning instead. The index on
    // `received_at` stays: pruning and `replay --since` need it, and it grows at its end.
    r#"
DROP INDEX IF EXISTS tap_records_session;
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
    #[error("cannot create the spool file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("stored JSON does not parse: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the spool file {0} does not exist (is spool.path right?)")]
    Missing(String),
    #[error(
        "the spool file {0} can only be read (a read-only filesystem?): billing needs to write it"
    )]
    ReadOnly(String),
    #[error(
        "spool schema version {found} is older than this binary's ({known}) and a read-only command does not migrate it: start the daemon (or a writing command) once"
    )]
    OlderSchema { found: i64, known: i64 },
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

/// What one tap record changed, appended atomically by [`Store::append_records`]: the record,
/// what billing derived from it (events, dead letters, parking), and the session state apart,
/// so that its write can become a periodic checkpoint without touching the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub records: Vec<RecordRow>,
    /// The ledger's session state rows this record changed.
    pub sessions: SessionChanges,
    pub events: Vec<LagoEvent>,
    pub dead_letters: Vec<NewDeadLetter>,
    /// Stops parked until SteVe tells their session's start (kept across restarts).
    pub parked: Vec<ParkedStopRow>,
    /// Sessions whose parked Stops this change set applies: (charge_box_id, ocpp_transaction_id).
    pub unparked: Vec<(String, i64)>,
}

/// Session state writes of one change set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionChanges {
    /// Session states written (inserted or replaced).
    pub upserts: Vec<SessionRow>,
    /// Sessions the ledger dropped from memory: (charge_box_id, ocpp_transaction_id).
    pub removed: Vec<(String, i64)>,
}

/// A Stop waiting for its session's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedStopRow {
    pub charge_box_id: String,
    pub ocpp_transaction_id: i64,
    /// The Stop TapRecord as JSON.
    pub json: String,
}

/// One outbox row: its id and the event exactly as first derived (and sent on every retry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub outbox_id: i64,
    pub event: LagoEvent,
}

/// A pending row's own retry state (outbox columns of schema version 3).
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

/// What became of one leased outbox row (see [`Store::settle`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Lago stored it.
    Delivered,
    /// A failed attempt: it stays pending with this retry state.
    Retry { state: RetryState, error: String },
    /// It can never be delivered as it is: a dead letter with this reason.
    DeadLetter { reason: String, detail: String },
}

/// How many rows a settlement changed (rows no longer pending are left alone).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    pub delivered: usize,
    pub retried: usize,
    pub dead_lettered: usize,
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
    /// Outbox rows (pending or delivered) queued by `reconcile --backfill` (origin `reconcile`).
    pub reconcile_events: i64,
    /// Of those, the ones still pending.
    pub reconcile_pending_events: i64,
}

/// Creates `dir` and its missing parents 0700 whatever the umask (the spool holds idTags);
/// an existing directory open to others is left as it is, with a warning.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
        .collect();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    for created in &missing {
        std::fs::set_permissions(created, std::fs::Permissions::from_mode(0o700))?;
    }
    if missing.is_empty() {
        warn_if_open_to_others(dir, "spool directory");
    }
    Ok(())
}

/// Creates the spool file 0600 whatever the umask, before SQLite does (SQLite gives its
/// `-wal` and `-shm` files the database's mode); an existing one open to others is warned about.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            warn_if_open_to_others(path, "spool file");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Warns when `path` grants anything to users other than its owner (wider than 0700 / 0600).
fn warn_if_open_to_others(path: &Path, what: &'static str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:04o}"),
                "the {what} is open to other users and the spool holds idTags; left as it is: chmod it 0700 (directory) or 0600 (file)"
            );
        }
    }
}

/// An open spool file.
pub struct Store {
    conn: Connection,
    /// `session_records`' map of the tap records per session, built by one scan on its first
    /// call (there is no per-session index, see migration 5), with the highest id it covers.
    sessions_index: std::cell::RefCell<Option<SessionIndex>>,
}

/// Tap record ids per session, as one scan of `tap_records` found them.
#[derive(Default)]
struct SessionIndex {
    ids: std::collections::HashMap<(String, i64), Vec<i64>>,
    through_id: i64,
}

impl Store {
    /// Opens (creating if needed) and migrates the spool at `path`. A file with a newer schema is
    /// not modified in any way.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir).map_err(|source| StoreError::Directory {
                path: dir.display().to_string(),
                source,
            })?;
        }
        create_private_file(path).map_err(|source| StoreError::File {
            path: path.display().to_string(),
            source,
        })?;
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
        // SQLite falls back to reading a file it cannot write (a filesystem remounted read-only
        // after a disk error) where a spool must refuse: a writer on it could never commit. A
        // read-only command's `-shm` left beside it lets SQLite open such a file at all.
        if conn.is_readonly(rusqlite::MAIN_DB)? {
            return Err(StoreError::ReadOnly(path.display().to_string()));
        }
        conn.busy_timeout(Duration::from_secs(5))?;
        // WAL + FULL: a commit is on disk when it returns, which is what lets us ack a charger.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Session rows (written with what a record derives) and outbox rows land on pages spread
        // over the file: SQLite's default 2 MiB cache re-reads them from the OS on every commit;
        // 64 MiB keeps a large fleet's hot pages (it is a ceiling, used only as the spool grows).
        // A MeterValues itself appends at the ends of the table and its index (schema 5).
        conn.pragma_update(None, "cache_size", -65536)?;
        let mut store = Store {
            conn,
            sessions_index: Default::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Opens the spool at `path` for reading only (`SQLITE_OPEN_READ_ONLY`): never creates,
    /// migrates or writes it, so it is safe beside a running daemon and on a missing path. A
    /// schema other than this binary's is an error (an older one would need a migration).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Missing(path.display().to_string()));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                found,
                known: SCHEMA_VERSION,
            });
        }
        if found < SCHEMA_VERSION {
            return Err(StoreError::OlderSchema {
                found,
                known: SCHEMA_VERSION,
            });
        }
        Ok(Store {
            conn,
            sessions_index: Default::default(),
        })
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

    /// Appends every change set in one transaction (one fsync for the whole group). An event
    /// whose outbox key is taken by different content is not stored: it becomes a
    /// `transaction_id_collision` dead letter, returned so the caller logs and counts it.
    pub fn append_records<'a>(
        &mut self,
        groups: impl IntoIterator<Item = &'a Changes>,
        now: i64,
    ) -> Result<Vec<Collision>, StoreError> {
        let mut collisions = Vec::new();
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
            let mut removed = tx.prepare_cached(
                "DELETE FROM sessions WHERE charge_box_id = ?1 AND ocpp_transaction_id = ?2",
            )?;
            let mut dead = tx.prepare_cached(
                "INSERT INTO dead_letters (reason, detail, charge_box_id, ocpp_transaction_id, id_tag,
                     lago_transaction_id, external_subscription_id, event, first_attempt, last_attempt)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
            )?;
            let mut park = tx.prepare_cached(
                "INSERT INTO parked_stops (charge_box_id, ocpp_transaction_id, record, parked_at)
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut unpark = tx.prepare_cached(
                "DELETE FROM parked_stops WHERE charge_box_id = ?1 AND ocpp_transaction_id = ?2",
            )?;
            for changes in groups {
                for p in &changes.parked {
                    park.execute(params![p.charge_box_id, p.ocpp_transaction_id, p.json, now])?;
                }
                for (charge_box_id, ocpp_transaction_id) in &changes.unparked {
                    unpark.execute(params![charge_box_id, ocpp_transaction_id])?;
                }
                for r in &changes.records {
                    record.execute(params![
                        r.received_at,
                        r.charge_box_id,
                        r.ocpp_transaction_id,
                        r.kind,
                        r.json
                    ])?;
                }
                for s in &changes.sessions.upserts {
                    session.execute(params![
                        s.charge_box_id,
                        s.ocpp_transaction_id,
                        s.state_json,
                        now
                    ])?;
                }
                for (charge_box_id, ocpp_transaction_id) in &changes.sessions.removed {
                    removed.execute(params![charge_box_id, ocpp_transaction_id])?;
                }
                for e in &changes.events {
                    if let Inserted::Taken(existing) = insert_event(&tx, e, now)? {
                        collisions.push(dead_letter_collision(&tx, e, &existing, now)?);
                    }
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
        Ok(collisions)
    }

    /// The parked Stops, oldest first, to resume their lookups at startup.
    pub fn parked_stops(&self) -> Result<Vec<ParkedStopRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT charge_box_id, ocpp_transaction_id, record FROM parked_stops ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ParkedStopRow {
                charge_box_id: r.get(0)?,
                ocpp_transaction_id: r.get(1)?,
                json: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
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
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, event FROM outbox WHERE state = 'pending' ORDER BY id LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (outbox_id, json) = row?;
            out.push(OutboxRow {
                outbox_id,
                event: serde_json::from_str(&json)?,
            });
        }
        Ok(out)
    }

    /// The oldest pending rows the shipper may use now, in creation order, with their retry
    /// state: rows backing off, rows `leased` to a job already and rows of held subscriptions
    /// are skipped. Reads the subscription column before the event, so a skipped row costs no
    /// JSON parse. The shipper gets these through [`super::Spool::lease_batch`].
    pub fn ready(
        &self,
        filter: &ReadyFilter,
        leased: &HashSet<i64>,
    ) -> Result<Vec<ReadyRow>, StoreError> {
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
            if retry_at_ms > filter.now_ms || leased.contains(&outbox_id) {
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
        let outcomes: Vec<(i64, Outcome)> = updates
            .iter()
            .map(|&(id, state)| {
                (
                    id,
                    Outcome::Retry {
                        state,
                        error: error.to_string(),
                    },
                )
            })
            .collect();
        self.settle(&outcomes, 0).map(|_| ())
    }

    /// Applies the outcome of every row in one transaction: delivered, a new retry state (the
    /// row stays pending), or moved to the dead letters. Only pending rows change; the counts
    /// say how many did.
    pub fn settle(&mut self, outcomes: &[(i64, Outcome)], now: i64) -> Result<Settled, StoreError> {
        let mut settled = Settled::default();
        let tx = self.conn.transaction()?;
        {
            let mut delivered = tx.prepare_cached(
                "UPDATE outbox SET state = 'delivered', delivered_at = ?2, attempts = attempts + 1,
                     retry_at_ms = 0, backoff_ms = 0, needs_check = 0, max_batch = NULL
                 WHERE id = ?1 AND state = 'pending'",
            )?;
            let mut retry = tx.prepare_cached(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, retry_at_ms = ?3,
                     backoff_ms = ?4, needs_check = ?5, max_batch = ?6
                 WHERE id = ?1 AND state = 'pending'",
            )?;
            let mut dead = tx.prepare_cached(
                "UPDATE outbox SET state = 'dead', attempts = attempts + 1, last_error = ?2,
                     retry_at_ms = 0, backoff_ms = 0, needs_check = 0, max_batch = NULL
                 WHERE id = ?1 AND state = 'pending'",
            )?;
            let mut letter = tx.prepare_cached(
                "INSERT INTO dead_letters (reason, detail, charge_box_id, ocpp_transaction_id,
                     lago_transaction_id, external_subscription_id, event, outbox_id,
                     first_attempt, last_attempt)
                 SELECT ?2, ?3, charge_box_id, ocpp_transaction_id, lago_transaction_id,
                     external_subscription_id, event, id, created_at, ?4
                 FROM outbox WHERE id = ?1",
            )?;
            for (id, outcome) in outcomes {
                match outcome {
                    Outcome::Delivered => {
                        settled.delivered += delivered.execute(params![id, now])?
                    }
                    Outcome::Retry { state, error } => {
                        settled.retried += retry.execute(params![
                            id,
                            error,
                            state.retry_at_ms,
                            i64::try_from(state.backoff_ms).unwrap_or(i64::MAX),
                            state.needs_check,
                            state
                                .max_batch
                                .map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
                        ])?
                    }
                    Outcome::DeadLetter { reason, detail } => {
                        if dead.execute(params![id, detail])? == 1 {
                            letter.execute(params![id, reason, detail, now])?;
                            settled.dead_lettered += 1;
                        }
                    }
                }
            }
        }
        tx.commit()?;
        Ok(settled)
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
        let outcomes: Vec<(i64, Outcome)> =
            ids.iter().map(|&id| (id, Outcome::Delivered)).collect();
        self.settle(&outcomes, now).map(|_| ())
    }

    /// Moves a pending outbox row to the dead letters with Lago's (or our) reason.
    pub fn dead_letter(
        &mut self,
        id: i64,
        reason: &str,
        detail: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let outcome = Outcome::DeadLetter {
            reason: reason.to_string(),
            detail: detail.to_string(),
        };
        self.settle(&[(id, outcome)], now).map(|_| ())
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

    /// Puts dead letters that hold an event back into the outbox as pending, and tells for each
    /// selected open dead letter whether it did and why not. Only what was queued (or is in the
    /// outbox already, identical) is closed; the rest stays open.
    ///
    /// An event held for want of a subscription gets `subscription` when the operator named one
    /// (`--id N --subscription SUB`), else `resolve_subscription(id_tag)` (the current map),
    /// except for a `missing_start`: its idTag is the Stop's, the card that ended the session,
    /// not the customer's (OCPP 1.6 StopTransaction.idTag), so only the operator can name it.
    /// A held event whose key the outbox holds for different content is a collision: not queued.
    pub fn requeue(
        &mut self,
        selection: Requeue<'_>,
        now: i64,
        resolve_subscription: &dyn Fn(Option<&str>) -> Option<String>,
        subscription: Option<&str>,
    ) -> Result<Vec<Requeued>, StoreError> {
        type Candidate = (
            i64,
            String,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let tx = self.conn.transaction()?;
        let candidates: Vec<Candidate> = {
            let (filter, arg): (&str, Option<String>) = match selection {
                Requeue::Id(id) => ("id = CAST(?1 AS INTEGER)", Some(id.to_string())),
                Requeue::Reason(reason) => ("reason = ?1", Some(reason.to_string())),
                Requeue::All => ("?1 IS NULL", None),
            };
            let mut stmt = tx.prepare(&format!(
                "SELECT id, reason, charge_box_id, ocpp_transaction_id, outbox_id, event, id_tag
                 FROM dead_letters WHERE requeued_at IS NULL AND {filter} ORDER BY id"
            ))?;
            stmt.query_map([arg], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })?
            .collect::<Result<_, _>>()?
        };
        let mut report = Vec::with_capacity(candidates.len());
        for (id, reason, charge_box_id, ocpp_transaction_id, outbox_id, event, id_tag) in candidates
        {
            let held: Option<LagoEvent> = event.as_deref().map(serde_json::from_str).transpose()?;
            let outcome = match (outbox_id, held) {
                (_, None) => RequeueOutcome::NoHeldEvent,
                (Some(_), Some(e)) if subscription.is_some() => RequeueOutcome::HasSubscription {
                    external_subscription_id: e.external_subscription_id,
                },
                (Some(outbox_id), Some(e)) => {
                    let changed = tx.execute(
                        "UPDATE outbox SET state = 'pending' WHERE id = ?1 AND state = 'dead'",
                        [outbox_id],
                    )?;
                    if changed == 1 {
                        RequeueOutcome::Queued {
                            external_subscription_id: e.external_subscription_id,
                        }
                    } else {
                        // The row is pending or delivered already (a replay or an earlier
                        // requeue of another letter of the same row).
                        RequeueOutcome::AlreadyQueued
                    }
                }
                (None, Some(mut e)) => {
                    let named = if !e.external_subscription_id.is_empty() {
                        match subscription {
                            Some(_) => Err(RequeueOutcome::HasSubscription {
                                external_subscription_id: e.external_subscription_id.clone(),
                            }),
                            None => Ok(()),
                        }
                    } else {
                        let found = match subscription {
                            Some(sub) => Some(sub.to_string()),
                            None if reason == AnomalyReason::MissingStart.as_str() => None,
                            None => resolve_subscription(id_tag.as_deref()),
                        };
                        match found {
                            Some(sub) => {
                                e.external_subscription_id = sub;
                                Ok(())
                            }
                            None => Err(RequeueOutcome::NoSubscription),
                        }
                    };
                    match named {
                        Err(outcome) => outcome,
                        Ok(()) => match insert_event(&tx, &e, now)? {
                            Inserted::New => RequeueOutcome::Queued {
                                external_subscription_id: e.external_subscription_id.clone(),
                            },
                            Inserted::Identical => RequeueOutcome::AlreadyQueued,
                            // The letter stays open, holding the event: nothing is lost.
                            Inserted::Taken(existing) => RequeueOutcome::Collision {
                                charge_box_id: existing.properties.charge_box_id,
                                ocpp_transaction_id: existing.properties.ocpp_transaction_id,
                            },
                        },
                    }
                }
            };
            if outcome.closes() {
                tx.execute(
                    "UPDATE dead_letters SET requeued_at = ?2 WHERE id = ?1",
                    params![id, now],
                )?;
            }
            report.push(Requeued {
                dead_letter_id: id,
                reason,
                charge_box_id,
                ocpp_transaction_id,
                id_tag,
                outcome,
            });
        }
        tx.commit()?;
        Ok(report)
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
    ///
    /// There is no per-session index (it cost the daemon a random page per record, see
    /// migration 5): the first call scans `tap_records` once for every session's record ids
    /// (ids and keys only, kept in memory for this `Store`), later calls read the session's rows
    /// by primary key plus, by primary-key range, whatever was appended since that scan. So a
    /// command replaying many sessions scans the table once, and each call sees every record
    /// committed before it, as a query would.
    pub fn session_records(
        &self,
        charge_box_id: &str,
        ocpp_transaction_id: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut index = self.sessions_index.borrow_mut();
        let index = match &mut *index {
            Some(index) => index,
            None => {
                let mut built = SessionIndex::default();
                let mut stmt = self.conn.prepare(
                    "SELECT id, charge_box_id, ocpp_transaction_id FROM tap_records
                     WHERE ocpp_transaction_id IS NOT NULL ORDER BY id",
                )?;
                let mut rows = stmt.query([])?;
                while let Some(row) = rows.next()? {
                    let id: i64 = row.get(0)?;
                    built
                        .ids
                        .entry((row.get(1)?, row.get(2)?))
                        .or_default()
                        .push(id);
                    built.through_id = built.through_id.max(id);
                }
                index.insert(built)
            }
        };
        let mut out = Vec::new();
        let mut by_id = self
            .conn
            .prepare_cached("SELECT record FROM tap_records WHERE id = ?1")?;
        let key = (charge_box_id.to_owned(), ocpp_transaction_id);
        for id in index.ids.get(&key).map(Vec::as_slice).unwrap_or_default() {
            // A row pruned since the scan is simply gone, as it would be from a query.
            if let Some(record) = by_id.query_row([id], |r| r.get(0)).optional()? {
                out.push(record);
            }
        }
        let mut newer = self.conn.prepare_cached(
            "SELECT record FROM tap_records
             WHERE id > ?1 AND charge_box_id = ?2 AND ocpp_transaction_id = ?3 ORDER BY id",
        )?;
        let rows = newer.query_map(
            params![index.through_id, charge_box_id, ocpp_transaction_id],
            |r| r.get(0),
        )?;
        for record in rows {
            out.push(record?);
        }
        Ok(out)
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

    /// Queues a re-derived event for sending, replacing a stored one with the same key and
    /// session (only for sessions Lago holds nothing of: the caller checks). A stored event of
    /// another session under the same key is never replaced: the re-derived one becomes a
    /// `transaction_id_collision` dead letter instead, returned for the caller to report.
    pub fn upsert_pending(
        &mut self,
        event: &LagoEvent,
        now: i64,
    ) -> Result<Option<Collision>, StoreError> {
        let tx = self.conn.transaction()?;
        let existing = stored_event(&tx, &event.external_subscription_id, &event.transaction_id)?;
        if let Some(existing) = existing.filter(|x| {
            x.properties.charge_box_id != event.properties.charge_box_id
                || x.properties.ocpp_transaction_id != event.properties.ocpp_transaction_id
        }) {
            let collision = dead_letter_collision(&tx, event, &existing, now)?;
            tx.commit()?;
            return Ok(Some(collision));
        }
        tx.execute(
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
        tx.execute(
            "UPDATE dead_letters SET requeued_at = ?3
             WHERE requeued_at IS NULL AND outbox_id = (SELECT id FROM outbox
                 WHERE external_subscription_id = ?1 AND lago_transaction_id = ?2)",
            params![event.external_subscription_id, event.transaction_id, now],
        )?;
        tx.commit()?;
        Ok(None)
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
            reconcile_events: count("SELECT COUNT(*) FROM outbox WHERE origin = 'reconcile'")?,
            reconcile_pending_events: count(
                "SELECT COUNT(*) FROM outbox WHERE origin = 'reconcile' AND state = 'pending'",
            )?,
        })
    }

    /// What the spool holds of sessions, for `reconcile`: every outbox row created at or after
    /// `since` (its session, subscription, state) and every open dead letter of a session.
    pub fn reconcile_view(&self, since: i64) -> Result<ReconcileView, StoreError> {
        let mut view = ReconcileView::default();
        let mut stmt = self.conn.prepare(
            "SELECT charge_box_id, ocpp_transaction_id, external_subscription_id, state
             FROM outbox WHERE created_at >= ?1 OR state = 'pending'",
        )?;
        let mut rows = stmt.query([since])?;
        while let Some(row) = rows.next()? {
            let key: (String, i64) = (row.get(0)?, row.get(1)?);
            let subscription: String = row.get(2)?;
            let state: String = row.get(3)?;
            if state == "pending" {
                view.pending.insert(key.clone());
            }
            if !subscription.is_empty() {
                view.subscriptions.insert(subscription);
            }
        }
        let mut stmt = self.conn.prepare(
            "SELECT charge_box_id, ocpp_transaction_id, reason, detail FROM dead_letters
             WHERE requeued_at IS NULL AND charge_box_id IS NOT NULL
               AND ocpp_transaction_id IS NOT NULL ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let key: (String, i64) = (row.get(0)?, row.get(1)?);
            let reason: String = row.get(2)?;
            let detail: String = row.get(3)?;
            view.dead_letters
                .entry(key)
                .or_insert_with(|| format!("{reason}: {detail}"));
        }
        Ok(view)
    }

    /// Queues an event `reconcile --backfill` derived, marked `origin = 'reconcile'`. Never
    /// replaces a stored row of other content (that is a collision, held as a dead letter); a
    /// delivered identical row is set pending again (Lago lost it: it is sent again and Lago
    /// dedupes it if it does hold it after all); a pending identical row is left as it is.
    pub fn queue_backfill(
        &mut self,
        event: &LagoEvent,
        now: i64,
    ) -> Result<BackfillOutcome, StoreError> {
        let tx = self.conn.transaction()?;
        let outcome = match insert_event(&tx, event, now)? {
            Inserted::New => {
                tx.execute(
                    "UPDATE outbox SET origin = 'reconcile'
                     WHERE external_subscription_id = ?1 AND lago_transaction_id = ?2",
                    params![event.external_subscription_id, event.transaction_id],
                )?;
                BackfillOutcome::Queued
            }
            Inserted::Identical => {
                let changed = tx.execute(
                    "UPDATE outbox SET state = 'pending', origin = 'reconcile'
                     WHERE external_subscription_id = ?1 AND lago_transaction_id = ?2
                       AND state = 'delivered'",
                    params![event.external_subscription_id, event.transaction_id],
                )?;
                if changed == 1 {
                    BackfillOutcome::Requeued
                } else {
                    BackfillOutcome::AlreadyHeld
                }
            }
            Inserted::Taken(existing) => BackfillOutcome::Collision(Box::new(
                dead_letter_collision(&tx, event, &existing, now)?,
            )),
        };
        tx.commit()?;
        Ok(outcome)
    }

    /// Whether every one of these outbox keys (external_subscription_id, transaction_id) is
    /// delivered (`reconcile --wait`).
    pub fn all_delivered(&self, keys: &[(String, String)]) -> Result<bool, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT state FROM outbox WHERE external_subscription_id = ?1 AND lago_transaction_id = ?2",
        )?;
        for (subscription, transaction_id) in keys {
            let state: Option<String> = stmt
                .query_row(params![subscription, transaction_id], |r| r.get(0))
                .optional()?;
            if state.as_deref() != Some("delivered") {
                return Ok(false);
            }
        }
        Ok(true)
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

/// What the spool holds that `reconcile` classifies by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileView {
    /// Sessions (charge_box_id, ocpp_transaction_id) with an undelivered outbox row.
    pub pending: HashSet<(String, i64)>,
    /// Sessions with an open dead letter: "reason: detail" of the first.
    pub dead_letters: std::collections::HashMap<(String, i64), String>,
    /// Subscriptions of the recent outbox rows (Lago is asked about each).
    pub subscriptions: std::collections::BTreeSet<String>,
}

/// What `queue_backfill` did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackfillOutcome {
    /// A new pending outbox row, origin `reconcile`.
    Queued,
    /// The outbox held it delivered: pending again.
    Requeued,
    /// The outbox holds it pending already: nothing changed.
    AlreadyHeld,
    /// Its key holds another event: held in a `transaction_id_collision` dead letter.
    Collision(Box<Collision>),
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

/// Dead-letter reason of an event whose outbox key holds a different event (SteVe's ids reused
/// across charge boxes, a template that does not tell two sessions apart).
pub const COLLISION_REASON: &str = "transaction_id_collision";

/// An event that met different content under its outbox key (external_subscription_id,
/// transaction_id): it was not stored but held in a `transaction_id_collision` dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collision {
    /// The event that was not stored; the dead letter holds it.
    pub event: LagoEvent,
    /// The event the outbox holds under that key.
    pub existing: LagoEvent,
    /// The dead letter's detail: both sessions, both values.
    pub detail: String,
}

/// Whether two events under one outbox key bill the same thing: same metric code, timestamp,
/// value and session identity (charge box, OCPP transaction id). Bookkeeping (receive time,
/// where the timestamp came from, the register readings that explain the value) does not count.
pub fn same_billing_content(a: &LagoEvent, b: &LagoEvent) -> bool {
    let value = |e: &LagoEvent| e.properties.value.parse::<rust_decimal::Decimal>().ok();
    let same_value =
        a.properties.value == b.properties.value || value(a).is_some_and(|v| Some(v) == value(b));
    a.code == b.code
        && a.timestamp == b.timestamp
        && same_value
        && a.properties.charge_box_id == b.properties.charge_box_id
        && a.properties.ocpp_transaction_id == b.properties.ocpp_transaction_id
}

/// The detail of a `transaction_id_collision` dead letter: which session holds the key, which
/// one was held back, and what tells them apart.
pub fn collision_detail(existing: &LagoEvent, held: &LagoEvent) -> String {
    format!(
        "transaction_id {:?} of subscription {:?} already belongs to session {}:{} \
         ({} kWh at {}); this event of session {}:{} ({} kWh at {}) is held, not sent: \
         a billing.transaction_id template with {{charge_box_id}} and {{started_at}} tells them apart",
        held.transaction_id,
        held.external_subscription_id,
        existing.properties.charge_box_id,
        existing.properties.ocpp_transaction_id,
        existing.properties.value,
        existing.timestamp,
        held.properties.charge_box_id,
        held.properties.ocpp_transaction_id,
        held.properties.value,
        held.timestamp,
    )
}

/// What inserting an event into the outbox did.
enum Inserted {
    /// A new pending row.
    New,
    /// The key held the same billing content: nothing changed.
    Identical,
    /// The key holds this different event: nothing changed.
    Taken(Box<LagoEvent>),
}

/// Inserts `e` as a pending outbox row unless its key is taken; never replaces a stored row.
fn insert_event(conn: &Connection, e: &LagoEvent, now: i64) -> Result<Inserted, StoreError> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO outbox (lago_transaction_id, external_subscription_id,
                 charge_box_id, ocpp_transaction_id, event, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (external_subscription_id, lago_transaction_id) DO NOTHING",
        )?
        .execute(params![
            e.transaction_id,
            e.external_subscription_id,
            e.properties.charge_box_id,
            e.properties.ocpp_transaction_id,
            serde_json::to_string(e)?,
            now
        ])?;
    if inserted == 1 {
        return Ok(Inserted::New);
    }
    let existing = stored_event(conn, &e.external_subscription_id, &e.transaction_id)?
        .ok_or(rusqlite::Error::QueryReturnedNoRows)?;
    Ok(if same_billing_content(&existing, e) {
        Inserted::Identical
    } else {
        Inserted::Taken(Box::new(existing))
    })
}

/// The event the outbox holds under a key.
fn stored_event(
    conn: &Connection,
    external_subscription_id: &str,
    transaction_id: &str,
) -> Result<Option<LagoEvent>, StoreError> {
    let json: Option<String> = conn
        .prepare_cached(
            "SELECT event FROM outbox
             WHERE external_subscription_id = ?1 AND lago_transaction_id = ?2",
        )?
        .query_row(params![external_subscription_id, transaction_id], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(json.as_deref().map(serde_json::from_str).transpose()?)
}

/// Holds `held` in a `transaction_id_collision` dead letter; the same event colliding again
/// (a re-derivation) counts as another attempt of the open letter, not a second letter.
fn dead_letter_collision(
    conn: &Connection,
    held: &LagoEvent,
    existing: &LagoEvent,
    now: i64,
) -> Result<Collision, StoreError> {
    let detail = collision_detail(existing, held);
    let json = serde_json::to_string(held)?;
    let again = conn.execute(
        "UPDATE dead_letters SET attempts = attempts + 1, last_attempt = ?5
         WHERE reason = ?1 AND requeued_at IS NULL AND external_subscription_id = ?2
           AND lago_transaction_id = ?3 AND event = ?4",
        params![
            COLLISION_REASON,
            held.external_subscription_id,
            held.transaction_id,
            json,
            now
        ],
    )?;
    if again == 0 {
        conn.execute(
            "INSERT INTO dead_letters (reason, detail, charge_box_id, ocpp_transaction_id,
                 lago_transaction_id, external_subscription_id, event, first_attempt, last_attempt)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
            params![
                COLLISION_REASON,
                detail,
                held.properties.charge_box_id,
                held.properties.ocpp_transaction_id,
                held.transaction_id,
                held.external_subscription_id,
                json,
                now
            ],
        )?;
    }
    Ok(Collision {
        event: held.clone(),
        existing: existing.clone(),
        detail,
    })
}

/// One dead letter `requeue` looked at, and what it did with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requeued {
    pub dead_letter_id: i64,
    pub reason: String,
    pub charge_box_id: Option<String>,
    pub ocpp_transaction_id: Option<i64>,
    pub id_tag: Option<String>,
    pub outcome: RequeueOutcome,
}

/// Whether `requeue` queued a dead letter's event, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequeueOutcome {
    /// Back in the outbox as pending; the dead letter is closed.
    Queued { external_subscription_id: String },
    /// The outbox holds this very event already (pending or delivered); the dead letter is
    /// closed.
    AlreadyQueued,
    /// Not queued: the outbox holds a different event of this session under its key.
    Collision {
        charge_box_id: String,
        ocpp_transaction_id: i64,
    },
    /// Not queued: an anomaly without an event to bill (read it, nothing to send).
    NoHeldEvent,
    /// Not queued: the held event has no subscription (map the id tag, or `--subscription`).
    NoSubscription,
    /// Not queued: `--subscription` names one for an event that has one already.
    HasSubscription { external_subscription_id: String },
}

impl RequeueOutcome {
    /// Whether the event is in the outbox now, so the dead letter is closed.
    pub fn closes(&self) -> bool {
        matches!(
            self,
            RequeueOutcome::Queued { .. } | RequeueOutcome::AlreadyQueued
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_new_spool_and_its_directories_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/spool.db");
        // SAFETY: umask only swaps the process's mask; restored below. Other tests running
        // meanwhile may create files with a wider mode, which they do not check.
        let previous = unsafe { libc::umask(0) };
        let opened = Store::open(&path);
        unsafe { libc::umask(previous) };
        let mut store = opened.unwrap();
        store.append_records(std::iter::empty(), 0).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&dir.path().join("a/b")), 0o700);
        for file in ["spool.db", "spool.db-wal", "spool.db-shm"] {
            assert_eq!(mode(&dir.path().join("a/b").join(file)), 0o600, "{file}");
        }
    }

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
            sessions: SessionChanges {
                upserts: vec![SessionRow {
                    charge_box_id: "CP1".into(),
                    ocpp_transaction_id: 7,
                    state_json: r#"{"v":1}"#.into(),
                }],
                removed: vec![],
            },
            events,
            dead_letters: vec![],
            ..Changes::default()
        }
    }

    #[test]
    fn ready_rows_skip_backing_off_held_and_leased_rows_and_keep_their_retry_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("spool.db")).unwrap();
        let mut events: Vec<LagoEvent> = (1..=5).map(|n| event(&n.to_string(), "sub")).collect();
        events.push(event("6", "held"));
        store.append_records(&[changes(events)], 100).unwrap();
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
            held_subscriptions: ["held".to_owned()].into_iter().collect(),
            scan_limit: 100,
        };
        let leased: HashSet<i64> = [ids[2]].into_iter().collect();
        let ready = store.ready(&filter(4_999), &leased).unwrap();
        let got: Vec<i64> = ready.iter().map(|r| r.row.outbox_id).collect();
        assert_eq!(got, [ids[1], ids[3], ids[4]]);
        assert_eq!(ready[0].retry, to_check);
        assert_eq!(ready[1].retry, RetryState::default());
        let ready = store.ready(&filter(5_000), &leased).unwrap();
        assert_eq!(ready[0].retry, backing_off, "due at its retry_at_ms");
        // The scan is bounded even when every row is skipped.
        let bounded = ReadyFilter {
            scan_limit: 1,
            limit: 1,
            ..filter(0)
        };
        assert!(store.ready(&bounded, &leased).unwrap().is_empty());
        // Settling a row clears its retry state (a requeued or replayed row starts afresh).
        store.mark_delivered(&[ids[0]], 200).unwrap();
        store.replay(Replay::Since(0)).unwrap();
        let again = store.ready(&filter(0), &leased).unwrap();
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
            .ready(
                &ReadyFilter {
                    limit: 10,
                    scan_limit: 10,
                    ..ReadyFilter::default()
                },
                &HashSet::new(),
            )
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
            writer.append_records(&[group], 100).unwrap();
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
            .append_records(&[changes(vec![event("7", "sub")])], 100)
            .unwrap();
        // A re-derived identical event is the same row.
        store
            .append_records(&[changes(vec![event("7", "sub")])], 101)
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
        store.append_records(&[c], 100).unwrap();
        let first = store.pending(1).unwrap()[0].outbox_id;
        store
            .dead_letter(first, "lago_rejected", "code: does not exist", 150)
            .unwrap();
        let letters = store.dead_letters(None).unwrap();
        assert_eq!(letters.len(), 2);
        assert_eq!(store.dead_letters(Some("lago_rejected")).unwrap().len(), 1);
        assert_eq!(store.pending(10).unwrap().len(), 1);

        let unmapped = |_: Option<&str>| None;
        let mapped = |id_tag: Option<&str>| id_tag.map(|t| format!("sub-of-{t}"));
        let reason = Requeue::Reason("unmapped_id_tag");
        let tally = |report: Vec<Requeued>| {
            let queued = report.iter().filter(|r| r.outcome.closes()).count();
            let unmapped = report
                .iter()
                .filter(|r| r.outcome == RequeueOutcome::NoSubscription)
                .count();
            (queued, unmapped)
        };
        assert_eq!(
            tally(store.requeue(reason, 155, &unmapped, None).unwrap()),
            (0, 1),
            "map still lacks it"
        );
        assert_eq!(
            tally(store.requeue(reason, 160, &mapped, None).unwrap()),
            (1, 0)
        );
        assert_eq!(
            tally(store.requeue(Requeue::All, 170, &mapped, None).unwrap()),
            (1, 0)
        );
        assert_eq!(
            tally(store.requeue(Requeue::All, 180, &mapped, None).unwrap()),
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

    /// SteVe's database rebuilt: transactionId 5 again, at another charge box, with the
    /// `{transaction_id}` template. The second session must not vanish under the first's key.
    #[test]
    fn a_second_session_under_a_taken_key_is_a_collision_dead_letter_never_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let mut store = Store::open(&path).unwrap();
        let first = event("5", "ALICE");
        let mut second = event("5", "ALICE");
        second.properties.charge_box_id = "CB2".into();
        second.properties.value = "7.25".into();
        second.timestamp += 86_400;
        assert_eq!(
            store
                .append_records(&[changes(vec![first.clone()])], 100)
                .unwrap(),
            []
        );

        let collisions = store
            .append_records(&[changes(vec![second.clone()])], 200)
            .unwrap();
        assert_eq!(collisions.len(), 1);
        assert_eq!(
            (&collisions[0].event, &collisions[0].existing),
            (&second, &first)
        );
        let letters = store.dead_letters(None).unwrap();
        assert_eq!(letters.len(), 1);
        let letter = &letters[0];
        assert_eq!(letter.reason, "transaction_id_collision");
        assert_eq!(
            (letter.charge_box_id.as_deref(), letter.ocpp_transaction_id),
            (Some("CB2"), Some(7))
        );
        for named in ["CP1:7", "CB2:7", "7.5 kWh", "7.25 kWh"] {
            assert!(
                letter.detail.contains(named),
                "{named} in {}",
                letter.detail
            );
        }
        // The first row is untouched; the second is held by the dead letter, byte for byte.
        let pending = store.pending(10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].event, first);
        let held: String = store
            .conn
            .query_row("SELECT event FROM dead_letters", [], |r| r.get(0))
            .unwrap();
        assert_eq!(serde_json::from_str::<LagoEvent>(&held).unwrap(), second);

        // The same collision again is another attempt of that letter, not a second letter.
        assert_eq!(
            store
                .append_records(&[changes(vec![second.clone()])], 300)
                .unwrap()
                .len(),
            1
        );
        let letters = store.dead_letters(None).unwrap();
        assert_eq!((letters.len(), letters[0].attempts), (1, 2));

        // Requeue cannot put it in the outbox: it says so and leaves the letter open.
        let none = |_: Option<&str>| None;
        let report = store.requeue(Requeue::All, 400, &none, None).unwrap();
        assert_eq!(
            report[0].outcome,
            RequeueOutcome::Collision {
                charge_box_id: "CP1".into(),
                ocpp_transaction_id: 7
            }
        );
        assert_eq!(store.stats(&path).unwrap().dead_letters, 1);
        assert_eq!(store.pending(10).unwrap().len(), 1);
    }

    #[test]
    fn the_same_billing_content_again_is_a_no_op_whatever_the_bookkeeping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let mut store = Store::open(&path).unwrap();
        let first = event("5", "sub");
        let mut again = first.clone();
        again.properties.received_at += 60;
        again.properties.timestamp_source = crate::event::TimestampSource::Bridge;
        again.properties.value = "7.50".into();
        assert!(same_billing_content(&first, &again));
        store
            .append_records(&[changes(vec![first.clone()])], 100)
            .unwrap();
        assert_eq!(
            store.append_records(&[changes(vec![again])], 101).unwrap(),
            []
        );
        assert_eq!(
            store.pending(10).unwrap()[0].event,
            first,
            "the first row stays"
        );
        assert!(store.dead_letters(None).unwrap().is_empty());

        // Each field that bills counts.
        let changed: [fn(&mut LagoEvent); 5] = [
            |e| e.code = "other_metric".into(),
            |e| e.timestamp += 1,
            |e| e.properties.value = "7.6".into(),
            |e| e.properties.charge_box_id = "CP9".into(),
            |e| e.properties.ocpp_transaction_id += 1,
        ];
        for (n, change) in changed.iter().enumerate() {
            let mut other = first.clone();
            change(&mut other);
            assert!(!same_billing_content(&first, &other), "field {n}");
            assert_eq!(
                store
                    .append_records(&[changes(vec![other])], 200)
                    .unwrap()
                    .len(),
                1,
                "field {n}"
            );
        }
        assert_eq!(store.dead_letters(None).unwrap().len(), 5);
        assert_eq!(store.pending(10).unwrap().len(), 1);
    }

    #[test]
    fn requeue_with_a_named_subscription_bills_a_held_event_that_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let mut store = Store::open(&path).unwrap();
        let mut c = changes(vec![]);
        for (reason, tag) in [("missing_start", "FLEET-MANAGER"), ("start_rejected", "T")] {
            c.dead_letters.push(NewDeadLetter {
                reason: reason.into(),
                detail: "-".into(),
                charge_box_id: Some("CP1".into()),
                ocpp_transaction_id: Some(9),
                id_tag: Some(tag.into()),
                event: Some(event(&format!("9-{reason}"), "")),
            });
        }
        c.dead_letters.push(NewDeadLetter {
            reason: "invalid_transaction_id".into(),
            detail: "-".into(),
            charge_box_id: Some("CP1".into()),
            ocpp_transaction_id: Some(0),
            id_tag: None,
            event: None,
        });
        store.append_records(&[c], 100).unwrap();
        // The map knows the Stop's idTag, but a missing_start is never billed by it.
        let map = |_: Option<&str>| Some("sub-of-the-stop-tag".to_string());
        let report = store.requeue(Requeue::All, 110, &map, None).unwrap();
        let outcomes: Vec<_> = report.iter().map(|r| r.outcome.clone()).collect();
        assert_eq!(
            outcomes,
            [
                RequeueOutcome::NoSubscription,
                RequeueOutcome::Queued {
                    external_subscription_id: "sub-of-the-stop-tag".into()
                },
                RequeueOutcome::NoHeldEvent,
            ]
        );
        let missing = report[0].dead_letter_id;
        let report = store
            .requeue(Requeue::Id(missing), 120, &map, Some("sub-ops"))
            .unwrap();
        assert_eq!(
            report[0].outcome,
            RequeueOutcome::Queued {
                external_subscription_id: "sub-ops".into()
            }
        );
        let pending: Vec<String> = store
            .pending(10)
            .unwrap()
            .into_iter()
            .map(|r| r.event.external_subscription_id)
            .collect();
        assert_eq!(pending, ["sub-of-the-stop-tag", "sub-ops"]);
        // Only the anomaly without an event is left open.
        assert_eq!(store.stats(&path).unwrap().dead_letters, 1);
    }

    #[test]
    fn a_rederived_event_never_replaces_another_sessions_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let mut store = Store::open(&path).unwrap();
        let first = event("5", "sub");
        store
            .append_records(&[changes(vec![first.clone()])], 100)
            .unwrap();
        let mut other = first.clone();
        other.properties.charge_box_id = "CB2".into();
        let collision = store.upsert_pending(&other, 110).unwrap();
        assert!(collision.is_some_and(|c| c.existing == first));
        assert_eq!(store.pending(10).unwrap()[0].event, first);
        assert_eq!(store.dead_letters(None).unwrap().len(), 1);
        // The same session re-derived with new rules replaces its own row, as before.
        let mut same = first.clone();
        same.properties.value = "8".into();
        assert_eq!(store.upsert_pending(&same, 120).unwrap(), None);
        assert_eq!(store.pending(10).unwrap()[0].event, same);
    }

    #[test]
    fn a_backfill_queues_once_requeues_what_lago_lost_and_never_replaces_another_session() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let mut store = Store::open(&path).unwrap();
        let mut backfilled = event("9", "sub");
        backfilled.properties.origin = Some(crate::event::ORIGIN_RECONCILE.into());
        assert_eq!(
            store.queue_backfill(&backfilled, 100).unwrap(),
            BackfillOutcome::Queued
        );
        assert_eq!(
            store.queue_backfill(&backfilled, 101).unwrap(),
            BackfillOutcome::AlreadyHeld,
            "twice queues nothing new"
        );
        let stats = store.stats(&path).unwrap();
        assert_eq!(
            (stats.reconcile_events, stats.reconcile_pending_events),
            (1, 1)
        );
        let view = store.reconcile_view(0).unwrap();
        assert!(view.pending.contains(&("CP1".to_string(), 7)));
        assert!(view.subscriptions.contains("sub"));
        let id = store.pending(10).unwrap()[0].outbox_id;
        store.mark_delivered(&[id], 102).unwrap();
        assert!(store.all_delivered(&[("sub".into(), "9".into())]).unwrap());
        // Delivered, yet Lago holds nothing (deleted there): pending again, same row.
        assert_eq!(
            store.queue_backfill(&backfilled, 103).unwrap(),
            BackfillOutcome::Requeued
        );
        assert_eq!(store.pending(10).unwrap()[0].outbox_id, id);
        // A live row of the same billing content is the same event: nothing new.
        let live = event("10", "sub");
        store
            .append_records(&[changes(vec![live.clone()])], 104)
            .unwrap();
        let mut again = live.clone();
        again.properties.origin = Some(crate::event::ORIGIN_RECONCILE.into());
        assert_eq!(
            store.queue_backfill(&again, 105).unwrap(),
            BackfillOutcome::AlreadyHeld
        );
        // Another session under a taken key: held as a collision dead letter, row untouched.
        let mut other = live.clone();
        other.properties.charge_box_id = "CB2".into();
        assert!(matches!(
            store.queue_backfill(&other, 106).unwrap(),
            BackfillOutcome::Collision(_)
        ));
        assert_eq!(store.dead_letters(None).unwrap().len(), 1);
        let view = store.reconcile_view(0).unwrap();
        assert!(view.dead_letters.contains_key(&("CB2".to_string(), 7)));
    }

    #[test]
    fn pruning_keeps_everything_undelivered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let mut store = Store::open(&path).unwrap();
        store
            .append_records(&[changes(vec![event("1", "a")])], 100)
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

    fn record_row(cb: &str, tx: i64, json: &str) -> Changes {
        Changes {
            records: vec![RecordRow {
                received_at: 100,
                charge_box_id: cb.into(),
                ocpp_transaction_id: Some(tx),
                kind: "meter_values",
                json: json.into(),
            }],
            ..Changes::default()
        }
    }

    #[test]
    fn a_schema_4_spool_loses_the_per_session_index_and_replay_still_finds_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..4] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 4).unwrap();
            conn.execute(
                "INSERT INTO tap_records (received_at, charge_box_id, ocpp_transaction_id, kind, record)
                 VALUES (100, 'CP1', 7, 'start', 'old')",
                [],
            )
            .unwrap();
        }
        let mut store = Store::open(&path).unwrap();
        let indexes: Vec<String> = store
            .conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'tap_records'",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(indexes, ["tap_records_received"]);
        // The record path appends to the table and the received_at index only.
        let plan: Vec<String> = store
            .conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT record FROM tap_records
                 WHERE id > 1 AND charge_box_id = 'CP1' AND ocpp_transaction_id = 7 ORDER BY id",
            )
            .unwrap()
            .query_map([], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter().any(|p| p.contains("INTEGER PRIMARY KEY")),
            "{plan:?}"
        );
        store
            .append_records(&[record_row("CP1", 7, "a"), record_row("CP2", 7, "x")], 100)
            .unwrap();
        assert_eq!(store.session_records("CP1", 7).unwrap(), ["old", "a"]);
        // Appended after the first call's scan (by another process): still found, in order.
        let mut other = Store::open(&path).unwrap();
        other
            .append_records(&[record_row("CP1", 7, "b")], 100)
            .unwrap();
        assert_eq!(store.session_records("CP1", 7).unwrap(), ["old", "a", "b"]);
        assert_eq!(store.session_records("CP2", 7).unwrap(), ["x"]);
        assert!(store.session_records("CP3", 7).unwrap().is_empty());
        // Pruned since the scan: gone, as from a query.
        other
            .conn
            .execute("DELETE FROM tap_records WHERE record = 'a'", [])
            .unwrap();
        assert_eq!(store.session_records("CP1", 7).unwrap(), ["old", "b"]);
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
