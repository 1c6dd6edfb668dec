//! Operator commands on the spool file: stats, dead letters, requeue, replay. They run beside
//! the daemon and print for humans or, with `--json`, for tools. `stats` and `dead-letters` open
//! the file read-only (`SQLITE_OPEN_READ_ONLY`: they never create, migrate or write it);
//! `requeue` and `replay` write under SQLite's locking (a busy daemon is waited for), and the
//! daemon's shipper, polling the outbox while idle, sends what they queued within a second.

use std::fmt::Write as _;
use std::path::Path;

use crate::clock::unix_now;
use crate::config::Config;
use crate::lago::LagoError;
use crate::ledger::Ledger;
use crate::secrets::{LagoClientError, LagoTimeouts};
use crate::spool::store::{Replay, Requeue, RequeueOutcome, Store, StoreError};
use crate::tap::TapRecord;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("spool {path}: {source}")]
    Spool { path: String, source: StoreError },
    #[error("the spool file {0} does not exist (is spool.path right?)")]
    NoSpool(String),
    #[error("Lago: {0}")]
    Lago(#[from] LagoError),
    #[error("{0}")]
    Refused(String),
    /// `spool requeue` left some selected dead letters open; the report says which and why.
    #[error("not every selected dead letter was queued")]
    NotAllQueued(String),
    /// The session named on the command line is not in the spool at all.
    #[error("session {0} not found in the spool: it has no tap record, event or dead letter there")]
    SessionNotFound(String),
}

/// Opens the spool to write (migrating it, as the daemon would); never creates one.
fn open(config: &Config) -> Result<Store, OperatorError> {
    let path = &config.spool.path;
    if !path.exists() {
        return Err(OperatorError::NoSpool(path.display().to_string()));
    }
    Store::open(path).map_err(|source| spool_error(path, source))
}

/// Opens the spool read-only: never creates, migrates or writes it.
fn open_read_only(config: &Config) -> Result<Store, OperatorError> {
    let path = &config.spool.path;
    Store::open_read_only(path).map_err(|source| match source {
        StoreError::Missing(path) => OperatorError::NoSpool(path),
        source => spool_error(path, source),
    })
}

fn spool_error(path: &Path, source: StoreError) -> OperatorError {
    OperatorError::Spool {
        path: path.display().to_string(),
        source,
    }
}

/// `spool stats`: size, pending count, oldest pending age.
pub fn stats(config: &Config, json: bool) -> Result<String, OperatorError> {
    let path = &config.spool.path;
    let stats = open_read_only(config)?
        .stats(path)
        .map_err(|e| spool_error(path, e))?;
    if json {
        return Ok(serde_json::to_string(&stats).expect("stats serialise"));
    }
    let oldest = stats
        .oldest_pending_created_at
        .map_or("-".to_string(), |t| {
            humantime::format_duration(std::time::Duration::from_secs(
                (unix_now() - t).max(0) as u64
            ))
            .to_string()
        });
    Ok(format!(
        "spool            {}\nsize             {} bytes\npending events   {}\noldest pending   {}\ndelivered events {}\ndead letters     {}\ntap records      {}\nsessions         {}\nreconcile events {} ({} pending), queued by reconcile --backfill",
        path.display(),
        stats.file_bytes,
        stats.pending_events,
        oldest,
        stats.delivered_events,
        stats.dead_letters,
        stats.tap_records,
        stats.sessions,
        stats.reconcile_events,
        stats.reconcile_pending_events,
    ))
}

/// `spool dead-letters`: one line per dead letter not yet requeued.
pub fn dead_letters(
    config: &Config,
    reason: Option<&str>,
    json: bool,
) -> Result<String, OperatorError> {
    let letters = open_read_only(config)?
        .dead_letters(reason)
        .map_err(|e| spool_error(&config.spool.path, e))?;
    let mut out = String::new();
    for letter in letters.iter().filter(|l| !l.requeued) {
        if json {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string(letter).expect("serialises")
            );
        } else {
            let _ = writeln!(
                out,
                "#{} {} lago_transaction_id={} external_subscription_id={} charge_box_id={} ocpp_transaction_id={} attempts={}: {}",
                letter.id,
                letter.reason,
                letter.lago_transaction_id.as_deref().unwrap_or("-"),
                // An event held for want of a subscription carries an empty one: say none.
                letter
                    .external_subscription_id
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .unwrap_or("-"),
                letter.charge_box_id.as_deref().unwrap_or("-"),
                letter
                    .ocpp_transaction_id
                    .map_or("-".into(), |t| t.to_string()),
                letter.attempts,
                letter.detail,
            );
        }
    }
    Ok(out.trim_end().to_string())
}

/// `spool requeue`: dead letters with a held event go back to the outbox. One line per dead
/// letter says whether it was queued and, if not, why; only what was queued is closed. Any not
/// queued makes it [`OperatorError::NotAllQueued`] (a non-zero exit), with the same report.
/// `subscription` (`--id N --subscription SUB`) bills a held event that has none to SUB.
pub fn requeue(
    config: &Config,
    selection: Requeue<'_>,
    subscription: Option<&str>,
) -> Result<String, OperatorError> {
    // One subscription names the customer of one session, never of a whole selection.
    if subscription.is_some() && !matches!(selection, Requeue::Id(_)) {
        return Err(OperatorError::Refused(
            "--subscription goes with --id N only".into(),
        ));
    }
    if subscription.is_some_and(|s| s.trim().is_empty()) {
        return Err(OperatorError::Refused(
            "--subscription needs a Lago external_subscription_id".into(),
        ));
    }
    // The subscription map as it is now: the fix an unmapped id tag was waiting for.
    let rules = config
        .billing_rules()
        .map_err(|problems| OperatorError::Refused(problems.join("; ")))?;
    let resolve = |id_tag: Option<&str>| {
        let map = rules.subscriptions.as_ref()?;
        map.get(id_tag?).map(str::to_string)
    };
    let report = open(config)?
        .requeue(selection, unix_now(), &resolve, subscription)
        .map_err(|e| spool_error(&config.spool.path, e))?;
    let mut out = String::new();
    let (mut queued, mut unmapped) = (0, 0);
    for letter in &report {
        let session = match (&letter.charge_box_id, letter.ocpp_transaction_id) {
            (Some(cb), Some(tx)) => format!("{cb}:{tx}"),
            (Some(cb), None) => cb.clone(),
            _ => "-".into(),
        };
        let said = match &letter.outcome {
            RequeueOutcome::Queued {
                external_subscription_id,
            } => {
                queued += 1;
                format!("queued (subscription {external_subscription_id})")
            }
            RequeueOutcome::AlreadyQueued => {
                queued += 1;
                "queued: the outbox holds this very event already".into()
            }
            RequeueOutcome::Collision {
                charge_box_id,
                ocpp_transaction_id,
            } => format!(
                "NOT queued: transaction_id_collision: the outbox holds a different event under \
                 its transaction_id, of session {charge_box_id}:{ocpp_transaction_id}; left open"
            ),
            RequeueOutcome::NoHeldEvent => {
                "NOT queued: no held event (an anomaly to read, nothing to bill); left open".into()
            }
            RequeueOutcome::NoSubscription => {
                unmapped += 1;
                if letter.reason == "missing_start" {
                    "NOT queued: no subscription (the Stop's idTag is not the customer's): \
                     name one with --id N --subscription SUB; left open"
                        .into()
                } else {
                    format!(
                        "NOT queued: no subscription for id tag {}: map it in \
                         billing.subscription_map_file or use --id N --subscription SUB; left open",
                        letter.id_tag.as_deref().unwrap_or("-")
                    )
                }
            }
            RequeueOutcome::HasSubscription {
                external_subscription_id,
            } => format!(
                "NOT queued: it is billed to subscription {external_subscription_id} already; \
                 --subscription only names one for an event that has none; left open"
            ),
        };
        let _ = writeln!(
            out,
            "#{} {} {session}: {said}",
            letter.dead_letter_id, letter.reason
        );
    }
    if let (Requeue::Id(id), true) = (selection, report.is_empty()) {
        let _ = writeln!(out, "#{id}: no open dead letter with this id");
    }
    let _ = write!(
        out,
        "requeued {queued} dead letter(s); the running daemon sends them"
    );
    if unmapped > 0 {
        let _ = write!(
            out,
            "\n{unmapped} left as dead letters: their id tag is still not in billing.subscription_map_file (or name a subscription with --id N --subscription SUB)"
        );
    }
    let not_queued = report.len() - queued;
    if not_queued > 0 {
        let _ = write!(out, "\n{not_queued} dead letter(s) NOT queued (see above)");
        return Err(OperatorError::NotAllQueued(out));
    }
    Ok(out)
}

/// What `replay` re-sends.
#[derive(Debug, Clone)]
pub enum ReplaySelection {
    /// One session: (charge_box_id, ocpp_transaction_id).
    Session(String, i64),
    /// Everything since this unix time.
    Since(i64),
}

/// `replay`: re-send stored events unchanged (safe by construction: same ids, values and
/// timestamps), or with `rederive`, derive them again from the tap records with the current
/// rules, only for sessions Lago holds nothing of.
pub async fn replay(
    config: &Config,
    selection: ReplaySelection,
    rederive: bool,
) -> Result<String, OperatorError> {
    let mut store = open(config)?;
    let path = config.spool.path.clone();
    if !rederive {
        let replay = match &selection {
            ReplaySelection::Session(charge_box_id, ocpp_transaction_id) => Replay::Session {
                charge_box_id,
                ocpp_transaction_id: *ocpp_transaction_id,
            },
            ReplaySelection::Since(since) => Replay::Since(*since),
        };
        let n = store.replay(replay).map_err(|e| spool_error(&path, e))?;
        if n == 0
            && let ReplaySelection::Session(charge_box_id, tx) = &selection
            && !session_known(&store, charge_box_id, *tx).map_err(|e| spool_error(&path, e))?
        {
            return Err(OperatorError::SessionNotFound(format!(
                "{charge_box_id}:{tx}"
            )));
        }
        return Ok(format!(
            "{n} delivered event(s) queued again unchanged; Lago recognises the ones it holds"
        ));
    }

    let sessions = match selection {
        ReplaySelection::Session(cb, tx) => {
            if !session_known(&store, &cb, tx).map_err(|e| spool_error(&path, e))? {
                return Err(OperatorError::SessionNotFound(format!("{cb}:{tx}")));
            }
            vec![(cb, tx)]
        }
        ReplaySelection::Since(since) => store
            .sessions_with_records_since(since)
            .map_err(|e| spool_error(&path, e))?,
    };
    let rules = config
        .billing_rules()
        .map_err(|problems| OperatorError::Refused(problems.join("; ")))?;
    let client =
        crate::secrets::lago_client(&config.lago, LagoTimeouts::Command).map_err(|e| match e {
            LagoClientError::ApiKey(problem) => OperatorError::Refused(problem),
            LagoClientError::Client(e) => OperatorError::from(e),
        })?;
    let mut out = String::new();
    for (charge_box_id, ocpp_transaction_id) in sessions {
        let mut ledger = Ledger::new();
        let mut events = Vec::new();
        let mut held = Vec::new();
        let mut records = Vec::new();
        for json in store
            .session_records(&charge_box_id, ocpp_transaction_id)
            .map_err(|e| spool_error(&path, e))?
        {
            let record: TapRecord =
                serde_json::from_str(&json).map_err(|e| spool_error(&path, StoreError::Json(e)))?;
            records.push(record);
        }
        for record in in_ledger_order(records) {
            let applied = ledger.apply(&record, &rules);
            events.extend(applied.events);
            held.extend(applied.anomalies.into_iter().map(|a| a.reason.as_str()));
        }
        let mut held_by_lago = None;
        for event in &events {
            if client.get_event(&event.transaction_id).await?.is_some() {
                held_by_lago = Some(event.transaction_id.clone());
                break;
            }
        }
        match held_by_lago {
            Some(tid) => {
                let _ = writeln!(
                    out,
                    "{charge_box_id}:{ocpp_transaction_id}: skipped, Lago already holds {tid} (replay without --rederive re-sends the stored events)"
                );
            }
            None => {
                let mut queued = 0;
                for event in &events {
                    let collision = store
                        .upsert_pending(event, unix_now())
                        .map_err(|e| spool_error(&path, e))?;
                    if let Some(collision) = collision {
                        // Never replaces another session's event: held as a dead letter.
                        held.push(crate::spool::store::COLLISION_REASON);
                        let _ = writeln!(
                            out,
                            "{charge_box_id}:{ocpp_transaction_id}: transaction_id_collision: {}",
                            collision.detail
                        );
                    } else {
                        queued += 1;
                    }
                }
                let _ = write!(
                    out,
                    "{charge_box_id}:{ocpp_transaction_id}: {queued} event(s) re-derived and queued"
                );
                if held.is_empty() {
                    let _ = writeln!(out);
                } else {
                    // The same anomalies the daemon would dead-letter: say why nothing went.
                    let _ = writeln!(out, "; held, not queued: {}", held.join(", "));
                }
            }
        }
    }
    Ok(out.trim_end().to_string())
}

/// Whether the spool holds anything of the session: tap records, a ledger state or a dead
/// letter (a replay that queued nothing for a known session is not an error).
fn session_known(
    store: &Store,
    charge_box_id: &str,
    ocpp_transaction_id: i64,
) -> Result<bool, StoreError> {
    if !store
        .session_records(charge_box_id, ocpp_transaction_id)?
        .is_empty()
    {
        return Ok(true);
    }
    let is_it = |cb: Option<&str>, tx: Option<i64>| {
        cb == Some(charge_box_id) && tx == Some(ocpp_transaction_id)
    };
    Ok(store
        .sessions()?
        .iter()
        .any(|s| is_it(Some(&s.charge_box_id), Some(s.ocpp_transaction_id)))
        || store
            .dead_letters(None)?
            .iter()
            .any(|d| is_it(d.charge_box_id.as_deref(), d.ocpp_transaction_id)))
}

/// One session's tap records in the order the daemon applied them: a Stop parked while SteVe
/// was asked for the start is stored before the Start recovered for it (billing/writer.rs), and
/// was applied after that Start; any Stop read before the session has a Start waits for the
/// next Start record, if there is one.
fn in_ledger_order(records: Vec<TapRecord>) -> Vec<TapRecord> {
    use crate::tap::TapKind;
    let mut ordered = Vec::with_capacity(records.len());
    let mut waiting = Vec::new();
    let mut started = false;
    for (i, record) in records.iter().enumerate() {
        match record.kind {
            TapKind::Stop(_)
                if !started
                    && records[i + 1..]
                        .iter()
                        .any(|r| matches!(r.kind, TapKind::Start(_))) =>
            {
                waiting.push(record.clone());
            }
            TapKind::Start(_) => {
                started = true;
                ordered.push(record.clone());
                ordered.append(&mut waiting);
            }
            _ => ordered.push(record.clone()),
        }
    }
    ordered.append(&mut waiting);
    ordered
}

#[cfg(test)]
mod tests {
    use super::in_ledger_order;
    use crate::tap::{StartRecord, StopRecord, TapKind, TapRecord};
    use rust_decimal::Decimal;

    fn start(tx: i64) -> TapRecord {
        TapRecord {
            charge_box_id: "CP".into(),
            received_at: 1,
            kind: TapKind::Start(StartRecord {
                connector_id: 1,
                id_tag: "T".into(),
                meter_start_wh: Decimal::ZERO,
                timestamp: None,
                ocpp_transaction_id: tx,
                id_tag_status: "Accepted".into(),
            }),
        }
    }

    fn stop(tx: i64, wh: i64) -> TapRecord {
        TapRecord {
            charge_box_id: "CP".into(),
            received_at: 1,
            kind: TapKind::Stop(StopRecord {
                ocpp_transaction_id: tx,
                meter_stop_wh: Decimal::from(wh),
                timestamp: None,
                id_tag: None,
                reason: None,
                begin_reading: None,
                readings: vec![],
            }),
        }
    }

    #[test]
    fn a_parked_stop_is_replayed_after_the_start_recovered_for_it() {
        assert_eq!(
            in_ledger_order(vec![stop(7, 10), stop(7, 10), start(7)]),
            vec![start(7), stop(7, 10), stop(7, 10)]
        );
        // Seen in order, or reused ids (Start, Stop, Start, Stop): unchanged.
        let seen = vec![start(7), stop(7, 10), start(7), stop(7, 20)];
        assert_eq!(in_ledger_order(seen.clone()), seen);
        // No Start at all: the Stop stays (and reads as missing_start).
        assert_eq!(in_ledger_order(vec![stop(7, 10)]), vec![stop(7, 10)]);
    }
}
