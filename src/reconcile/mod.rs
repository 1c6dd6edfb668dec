//! Reconcile: proves, for a window, that every session SteVe recorded is billed exactly in
//! Lago, and says which are not. This module is the pure part (tallying Lago's events page by
//! page, classifying, rendering); `run.rs` is the I/O at its edges (SteVe, the spool, Lago,
//! the backfill and the daemon's periodic run).
//!
//! A session is matched by charge box + OCPP transaction id: the properties of every event the
//! bridge sends carry both (`event.rs`). Classes, first rule that applies (issue 14):
//! `ok` (Lago's events of the session sum exactly to SteVe's (stop − start) / 1000 kWh),
//! `pending` (the spool holds an undelivered event of it), `dead_letter` (an open dead letter),
//! `missing` (Lago holds no event of it), `mismatch` (anything else); and `unknown_in_steve` for
//! an event in the window whose session SteVe does not know even when asked by its id.

pub mod run;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;

use rust_decimal::Decimal;
use serde_json::Value;

use crate::event::{decimal_string, kwh_string};
use crate::lago::StoredEvent;
use crate::ocpp::units::{parse_decimal, parse_timestamp};
use crate::spool::store::ReconcileView;
use crate::steve::SteveSession;

/// A session: (charge_box_id, ocpp_transaction_id).
pub type SessionKey = (String, i64);

/// A reconcile class; the label of `ocpp_lago_bridge_reconcile_sessions{status}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Ok,
    Pending,
    DeadLetter,
    Missing,
    Mismatch,
    UnknownInSteve,
}

impl Status {
    /// Every class, in report order.
    pub const ALL: [Status; 6] = [
        Status::Ok,
        Status::Pending,
        Status::DeadLetter,
        Status::Missing,
        Status::Mismatch,
        Status::UnknownInSteve,
    ];

    /// The public label.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Pending => "pending",
            Status::DeadLetter => "dead_letter",
            Status::Missing => "missing",
            Status::Mismatch => "mismatch",
            Status::UnknownInSteve => "unknown_in_steve",
        }
    }

    /// Whether the class needs nobody: `ok`, and `pending` (the bridge is delivering it).
    pub fn is_fine(self) -> bool {
        matches!(self, Status::Ok | Status::Pending)
    }
}

/// One line of the report: a SteVe session, or a Lago event SteVe does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub status: Status,
    pub charge_box_id: String,
    /// `None` for a Lago event without a readable `ocpp_transaction_id` property.
    pub ocpp_transaction_id: Option<i64>,
    /// Lago's subscription of the session's events; for a `missing` one, the subscription the
    /// billing rules derive (`None` when they derive none, e.g. an unmapped idTag).
    pub external_subscription_id: Option<String>,
    /// SteVe's energy, (stopValue − startValue) / 1000, exact.
    pub steve_kwh: Option<Decimal>,
    /// The sum of Lago's events of the session, exact.
    pub lago_kwh: Option<Decimal>,
    /// Why, for a person.
    pub detail: String,
}

/// SteVe's energy of a session in kWh, exact (`None` only on a register overflow).
pub fn steve_kwh(session: &SteveSession) -> Option<Decimal> {
    let wh = session.stop_wh.checked_sub(session.start_wh)?;
    parse_decimal(&kwh_string(wh)).ok()
}

/// What Lago holds of one session, summed as the pages go by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Sum of the readable `value`s, kWh.
    pub kwh: Decimal,
    /// Events counted.
    pub events: u32,
    /// Events whose `value` does not read as a decimal (the sum cannot be exact).
    pub unreadable: u32,
    /// Whether one of its events has a timestamp inside the audited window.
    pub in_window: bool,
    /// The subscriptions its events are booked on.
    pub subscriptions: BTreeSet<String>,
}

/// A Lago event of the metric in the window that names no session (no `charge_box_id` or
/// `ocpp_transaction_id` property): SteVe cannot know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    pub transaction_id: String,
    pub external_subscription_id: String,
    pub charge_box_id: String,
    pub kwh: Option<Decimal>,
}

/// Lago's side, fed one page at a time: per session a sum, never the events themselves, so
/// memory grows with the sessions, not with the events of a month.
#[derive(Debug, Clone, Default)]
pub struct LagoTally {
    pub sessions: HashMap<SessionKey, Tally>,
    pub foreign: Vec<Foreign>,
    /// Events read in all.
    pub events_read: u64,
    /// (subscription, transaction_id) already counted: one subscription is listed once, but a
    /// server that repeats an event across pages must not double a sum.
    counted: HashSet<(String, String)>,
}

fn property<'a>(event: &'a StoredEvent, name: &str) -> Option<&'a Value> {
    event.properties.as_ref()?.get(name)
}

fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl LagoTally {
    /// Counts one event; `window` is the audited (from, to), unix seconds, inclusive.
    pub fn add(&mut self, event: &StoredEvent, window: (i64, i64)) {
        self.events_read = self.events_read.saturating_add(1);
        if !self.counted.insert((
            event.external_subscription_id.clone(),
            event.transaction_id.clone(),
        )) {
            return;
        }
        let at = parse_timestamp(&event.timestamp).ok();
        let in_window = at.is_some_and(|t| t >= window.0 && t <= window.1);
        let kwh = property(event, "value")
            .and_then(text_of)
            .and_then(|v| parse_decimal(&v).ok());
        let charge_box_id = property(event, "charge_box_id").and_then(text_of);
        let tx = property(event, "ocpp_transaction_id")
            .and_then(text_of)
            .and_then(|t| t.parse::<i64>().ok());
        let (Some(charge_box_id), Some(tx)) = (charge_box_id.clone(), tx) else {
            if in_window {
                self.foreign.push(Foreign {
                    transaction_id: event.transaction_id.clone(),
                    external_subscription_id: event.external_subscription_id.clone(),
                    charge_box_id: charge_box_id.unwrap_or_default(),
                    kwh,
                });
            }
            return;
        };
        let tally = self.sessions.entry((charge_box_id, tx)).or_default();
        tally.events = tally.events.saturating_add(1);
        tally.in_window |= in_window;
        tally
            .subscriptions
            .insert(event.external_subscription_id.clone());
        match kwh.and_then(|k| tally.kwh.checked_add(k)) {
            Some(sum) => tally.kwh = sum,
            None => tally.unreadable = tally.unreadable.saturating_add(1),
        }
    }
}

/// Sessions Lago bills in the window that are not among SteVe's stopped sessions: each is
/// asked of SteVe by its id before it is called `unknown_in_steve`.
pub fn orphans(sessions: &[SteveSession], lago: &LagoTally) -> Vec<SessionKey> {
    let known: HashSet<(&str, i64)> = sessions
        .iter()
        .map(|s| (s.charge_box_id.as_str(), s.ocpp_transaction_id))
        .collect();
    let mut out: Vec<SessionKey> = lago
        .sessions
        .iter()
        .filter(|(key, tally)| tally.in_window && !known.contains(&(key.0.as_str(), key.1)))
        .map(|(key, _)| key.clone())
        .collect();
    out.sort();
    out
}

fn joined(subscriptions: &BTreeSet<String>) -> Option<String> {
    (!subscriptions.is_empty()).then(|| subscriptions.iter().cloned().collect::<Vec<_>>().join(","))
}

/// Classifies every SteVe session (first rule that applies, see the module doc), then every
/// orphan SteVe confirmed it does not know and every foreign event. `derived` is the
/// subscription the billing rules derive for a session.
pub fn classify(
    sessions: &[SteveSession],
    lago: &LagoTally,
    spool: &ReconcileView,
    derived: &dyn Fn(&SteveSession) -> Option<String>,
    unknown_in_steve: &[SessionKey],
) -> Vec<Finding> {
    let mut findings = Vec::with_capacity(sessions.len() + unknown_in_steve.len());
    for session in sessions {
        let key = (session.charge_box_id.clone(), session.ocpp_transaction_id);
        let steve = steve_kwh(session);
        let tally = lago.sessions.get(&key).filter(|t| t.events > 0);
        let lago_kwh = tally.map(|t| t.kwh);
        let exact = tally.is_some_and(|t| t.unreadable == 0 && Some(t.kwh) == steve);
        let (status, detail) = if exact {
            (Status::Ok, String::new())
        } else if spool.pending.contains(&key) {
            (
                Status::Pending,
                "the bridge holds undelivered events of it".to_string(),
            )
        } else if let Some(letter) = spool.dead_letters.get(&key) {
            (Status::DeadLetter, letter.clone())
        } else if let Some(t) = tally {
            let mut detail = format!(
                "Lago sums {} kWh over {} event(s), SteVe recorded {} kWh",
                decimal_string(t.kwh),
                t.events,
                steve.map_or("?".into(), decimal_string)
            );
            if t.unreadable > 0 {
                let _ = write!(detail, "; {} event value(s) unreadable", t.unreadable);
            }
            (Status::Mismatch, detail)
        } else {
            (Status::Missing, "Lago holds no event of it".to_string())
        };
        let external_subscription_id = match tally {
            Some(t) => joined(&t.subscriptions),
            None => derived(session),
        };
        findings.push(Finding {
            status,
            charge_box_id: session.charge_box_id.clone(),
            ocpp_transaction_id: Some(session.ocpp_transaction_id),
            external_subscription_id,
            steve_kwh: steve,
            lago_kwh,
            detail,
        });
    }
    for key in unknown_in_steve {
        let tally = lago.sessions.get(key);
        findings.push(Finding {
            status: Status::UnknownInSteve,
            charge_box_id: key.0.clone(),
            ocpp_transaction_id: Some(key.1),
            external_subscription_id: tally.and_then(|t| joined(&t.subscriptions)),
            steve_kwh: None,
            lago_kwh: tally.map(|t| t.kwh),
            detail: "SteVe does not know this session, even asked by its transactionPk".into(),
        });
    }
    for foreign in &lago.foreign {
        findings.push(Finding {
            status: Status::UnknownInSteve,
            charge_box_id: foreign.charge_box_id.clone(),
            ocpp_transaction_id: None,
            external_subscription_id: Some(foreign.external_subscription_id.clone()),
            steve_kwh: None,
            lago_kwh: foreign.kwh,
            detail: format!(
                "event {} names no session (no charge_box_id / ocpp_transaction_id property)",
                foreign.transaction_id
            ),
        });
    }
    findings
}

/// Per class: how many, and the kWh involved (SteVe's for sessions, Lago's for unknown events).
pub fn totals(findings: &[Finding]) -> BTreeMap<Status, (u64, Decimal)> {
    let mut totals: BTreeMap<Status, (u64, Decimal)> = Status::ALL
        .iter()
        .map(|s| (*s, (0, Decimal::ZERO)))
        .collect();
    for f in findings {
        let entry = totals.entry(f.status).or_default();
        entry.0 += 1;
        let kwh = f.steve_kwh.or(f.lago_kwh).unwrap_or_default();
        entry.1 = entry.1.checked_add(kwh).unwrap_or(entry.1);
    }
    totals
}

/// 0 when every finding is `ok` or `pending`, else 1.
pub fn exit_code(findings: &[Finding]) -> u8 {
    if findings.iter().all(|f| f.status.is_fine()) {
        0
    } else {
        1
    }
}

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
}

fn kwh(value: Option<Decimal>) -> Option<String> {
    value.map(decimal_string)
}

/// The report on stdout.
pub fn render(findings: &[Finding], format: Format) -> String {
    let mut out = String::new();
    match format {
        Format::Json => {
            for f in findings {
                let line = serde_json::json!({
                    "status": f.status.as_str(),
                    "charge_box_id": f.charge_box_id,
                    "ocpp_transaction_id": f.ocpp_transaction_id.map(|t| t.to_string()),
                    "external_subscription_id": f.external_subscription_id,
                    "steve_kwh": kwh(f.steve_kwh),
                    "lago_kwh": kwh(f.lago_kwh),
                    "detail": f.detail,
                });
                let _ = writeln!(out, "{line}");
            }
        }
        Format::Csv => {
            out.push_str("status,charge_box_id,ocpp_transaction_id,external_subscription_id,steve_kwh,lago_kwh,detail\n");
            for f in findings {
                let cells = [
                    f.status.as_str().to_string(),
                    f.charge_box_id.clone(),
                    f.ocpp_transaction_id
                        .map_or(String::new(), |t| t.to_string()),
                    f.external_subscription_id.clone().unwrap_or_default(),
                    kwh(f.steve_kwh).unwrap_or_default(),
                    kwh(f.lago_kwh).unwrap_or_default(),
                    f.detail.clone(),
                ];
                let line: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
                let _ = writeln!(out, "{}", line.join(","));
            }
        }
        Format::Table => {
            let _ = writeln!(
                out,
                "{:<16} {:<20} {:>10} {:<24} {:>12} {:>12}  DETAIL",
                "STATUS", "CHARGE_BOX_ID", "TX", "SUBSCRIPTION", "STEVE_KWH", "LAGO_KWH"
            );
            for f in findings.iter().filter(|f| f.status != Status::Ok) {
                let _ = writeln!(
                    out,
                    "{:<16} {:<20} {:>10} {:<24} {:>12} {:>12}  {}",
                    f.status.as_str(),
                    f.charge_box_id,
                    f.ocpp_transaction_id.map_or("-".into(), |t| t.to_string()),
                    f.external_subscription_id.as_deref().unwrap_or("-"),
                    kwh(f.steve_kwh).unwrap_or("-".into()),
                    kwh(f.lago_kwh).unwrap_or("-".into()),
                    f.detail
                );
            }
            let _ = writeln!(out);
            for (status, (count, kwh)) in totals(findings) {
                let _ = writeln!(
                    out,
                    "{:<16} {:>8} session(s) {:>14} kWh",
                    status.as_str(),
                    count,
                    decimal_string(kwh)
                );
            }
        }
    }
    out
}

/// RFC 4180: a cell with a comma, quote or line break is quoted, quotes doubled.
fn csv_cell(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_string()
    }
}

#[cfg(test)]
mod tests;
