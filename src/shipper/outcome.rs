//! Pure decisions of the shipper: given a batch and what Lago answered, what happens to each
//! outbox row and to the shipper; which rows form the next job; how a failed row backs off;
//! what a verification proves. No I/O here; docs/lago-contract.md is the specification.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::event::LagoEvent;
use crate::lago::{BatchOutcome, IndexError, LagoError, StoredEvent};
use crate::spool::store::{ReadyRow, RetryState};

/// A 429 without a usable header pauses this long.
pub const DEFAULT_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(1);
/// A header asking for longer than this is capped: a bogus proxy must not stall us for days.
pub const MAX_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(15 * 60);
/// The first backoff of a row failing alone (then doubled up to `lago.retry_max_delay`).
pub const MIN_ROW_BACKOFF: Duration = Duration::from_millis(200);

pub use crate::spool::store::OutboxRow;

/// Why an event went to the dead letters (the spool's `reason` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Lago holds another event under our (subscription, transaction_id).
    TransactionIdCollision,
    /// Lago rejected the event itself (a 422 naming its index); the detail is Lago's error text.
    LagoRejected,
}

impl DeadLetterReason {
    /// The reason code stored in the spool and shown by `spool dead-letters`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TransactionIdCollision => "transaction_id_collision",
            Self::LagoRejected => "lago_rejected",
        }
    }
}

/// The fate of one event of a settled batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Lago holds it: mark delivered.
    Delivered,
    /// Never send again without an operator: move to dead letters.
    DeadLetter {
        /// Reason code.
        reason: DeadLetterReason,
        /// Lago's words or ours, for the operator.
        detail: String,
    },
    /// Lago may hold it already (`value_already_exist`): flag the row; it is checked alone
    /// ([`check_by_id`], [`check_listing`]) before it counts as delivered or goes again.
    Verify,
    /// Not stored (Lago rolled the batch back): send again, in order, without the others.
    Resend,
}

/// One row's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFate {
    /// The outbox row.
    pub outbox_id: i64,
    /// What happens to it.
    pub fate: Fate,
}

/// Something an operator must hear about (ERROR log + counter), beside the decision itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alarm {
    /// A 200 whose body is not Lago's answer (a proxy's maintenance page, a changed schema):
    /// no evidence that anything was stored, so the events go again and prove it.
    AcceptedUnparseable {
        /// Parse error and body excerpt.
        detail: String,
    },
    /// Lago's batch limit is below ours: `lago.batch_max_events` is too high.
    TooManyEvents {
        /// The batch size Lago refused.
        refused_len: usize,
    },
    /// Lago refused the batch without naming an event (a 422 without index, an odd status):
    /// retried in smaller batches, never dead-lettered for it.
    UnattributedRejection {
        /// What Lago said.
        detail: String,
    },
}

/// Why delivery stops until an operator acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorCause {
    /// 401/403: the API key is wrong or lacks rights.
    ApiKeyRejected {
        /// 401 or 403.
        status: u16,
    },
    /// The api_url or Lago's configuration is wrong (404, redirect, batch limit below 1).
    Misconfigured {
        /// What Lago answered.
        detail: String,
    },
}

/// What the shipper does with a batch after Lago's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every event has a fate, in batch order; the shipper's rhythm is unchanged.
    Settle {
        /// One per row, in the order of the batch.
        fates: Vec<EventFate>,
        /// Raised beside the fates, if any.
        alarm: Option<Alarm>,
    },
    /// Not taken, or the outcome is unknown (5xx, timeout, 400, an HTML 200): the rows go again
    /// after a backoff, in smaller batches ([`retry_rows`]), and a row alone backs off alone.
    Retry {
        /// Why, for the log and the spool's `last_error`.
        cause: String,
        /// Raised beside, if Lago answered outside its contract.
        alarm: Option<Alarm>,
    },
    /// `too_many_events`: Lago's own limit is below ours; every batch shrinks ([`shrink`]).
    ShrinkBatches {
        /// Why.
        alarm: Alarm,
    },
    /// Rate limited: pause the whole shipper, then retry the same batch.
    Pause {
        /// How long.
        pause: Duration,
    },
    /// Nothing can be delivered until an operator fixes something; re-probe, drop nothing.
    PauseUntilOperator {
        /// What must be fixed.
        cause: OperatorCause,
    },
}

/// Decides what Lago's answer to `batch` means for each row and for the shipper.
pub fn decide(batch: &[OutboxRow], outcome: &BatchOutcome) -> Decision {
    match outcome {
        BatchOutcome::Accepted(_) => settle_all(batch, Fate::Delivered, None),
        // Lago's own `{"events": [...]}`, one echo per event sent, whose objects changed shape:
        // stored; the alarm asks for a look at the Lago version.
        BatchOutcome::AcceptedUnparseable {
            echoed: Some(echoed),
            reason,
            body,
        } if *echoed == batch.len() => settle_all(
            batch,
            Fate::Delivered,
            Some(Alarm::AcceptedUnparseable {
                detail: format!("{reason}; body: {body}"),
            }),
        ),
        // docs/lago-contract.md "What the answers mean": any other 200 (a maintenance page, a truncated
        // body) proves nothing; sent again, the events either go in or meet
        // `value_already_exist` and are checked.
        BatchOutcome::AcceptedUnparseable { reason, body, .. } => Decision::Retry {
            cause: format!("HTTP 200 whose body is not Lago's answer: {reason}"),
            alarm: Some(Alarm::AcceptedUnparseable {
                detail: format!("{reason}; body: {body}"),
            }),
        },
        BatchOutcome::Rejected422 {
            index_errors,
            unattributed,
        } => decide_rejection(batch, index_errors, unattributed),
        BatchOutcome::TooManyEvents => {
            let alarm = Alarm::TooManyEvents {
                refused_len: batch.len(),
            };
            if batch.len() > 1 {
                Decision::ShrinkBatches { alarm }
            } else {
                Decision::PauseUntilOperator {
                    cause: OperatorCause::Misconfigured {
                        detail: "Lago refuses a batch of one event as too_many_events".into(),
                    },
                }
            }
        }
        BatchOutcome::Unauthorized { status } => Decision::PauseUntilOperator {
            cause: OperatorCause::ApiKeyRejected { status: *status },
        },
        BatchOutcome::RateLimited { pause } => Decision::Pause {
            pause: pause
                .unwrap_or(DEFAULT_RATE_LIMIT_PAUSE)
                .min(MAX_RATE_LIMIT_PAUSE),
        },
        BatchOutcome::Retryable(cause) => Decision::Retry {
            cause: cause.to_string(),
            alarm: None,
        },
    }
}

/// Decides for an answer the client could not classify (`post_batch` returned `Err`).
pub fn decide_error(batch: &[OutboxRow], error: &LagoError) -> Decision {
    match error {
        LagoError::Unauthorized { status } => Decision::PauseUntilOperator {
            cause: OperatorCause::ApiKeyRejected { status: *status },
        },
        LagoError::RateLimited { pause } => {
            decide(batch, &BatchOutcome::RateLimited { pause: *pause })
        }
        LagoError::Transient(cause) => Decision::Retry {
            cause: cause.to_string(),
            alarm: None,
        },
        // A 404 or redirect on the batch path means the api_url is wrong, not the events.
        LagoError::UnexpectedStatus {
            status: 300..=399 | 404,
            ..
        }
        | LagoError::WrongUrl { .. }
        | LagoError::InvalidUrl { .. }
        | LagoError::InvalidApiKey
        | LagoError::ClientBuild(_) => Decision::PauseUntilOperator {
            cause: OperatorCause::Misconfigured {
                detail: error.to_string(),
            },
        },
        // Refused without naming an event (an unparseable 422, 413, another status, our own
        // encoder): only a 422 naming an index is evidence against an event, so retry smaller.
        LagoError::Schema { .. } | LagoError::UnexpectedStatus { .. } | LagoError::Encode(_) => {
            Decision::Retry {
                cause: error.to_string(),
                alarm: Some(Alarm::UnattributedRejection {
                    detail: error.to_string(),
                }),
            }
        }
    }
}

/// What a job of the shipper is: a batch to POST, or one row to check alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// POST these rows as one batch.
    Send(Vec<ReadyRow>),
    /// GET what Lago holds for this row before it counts as delivered or is sent again.
    Check(Box<ReadyRow>),
    /// Nothing ready.
    Nothing,
}

/// The next job from the ready rows (oldest first): a row waiting for a check is checked alone
/// and never rides with others; a batch is at most `batch_size` rows and at most the
/// `max_batch` of every row in it (rows of a failed batch go again in smaller ones).
pub fn compose(ready: Vec<ReadyRow>, batch_size: usize) -> Job {
    let mut rows = ready.into_iter();
    let Some(first) = rows.next() else {
        return Job::Nothing;
    };
    if first.retry.needs_check {
        return Job::Check(Box::new(first));
    }
    let mut limit = batch_size
        .min(first.retry.max_batch.unwrap_or(usize::MAX))
        .max(1);
    let mut batch = vec![first];
    for row in rows {
        if batch.len() >= limit {
            break;
        }
        if row.retry.needs_check {
            // Its turn comes when it is the oldest ready row.
            continue;
        }
        let row_limit = row.retry.max_batch.unwrap_or(usize::MAX);
        if batch.len() + 1 > row_limit {
            break;
        }
        limit = limit.min(row_limit);
        batch.push(row);
    }
    Job::Send(batch)
}

/// The retry state of each row of a batch Lago did not take: a batch of several goes again as
/// batches of half its size (down to one); a row alone backs off alone (doubling, capped), its
/// backoff counted from the end of the shipper's own `pause`, so that the other rows go first
/// and one event Lago keeps failing on holds back no other.
pub fn retry_rows(
    batch: &[ReadyRow],
    now_ms: i64,
    max_backoff: Duration,
    pause: Duration,
) -> Vec<(i64, RetryState)> {
    if batch.len() > 1 {
        let half = (batch.len() / 2).max(1);
        return batch
            .iter()
            .map(|r| {
                let max_batch = Some(r.retry.max_batch.map_or(half, |m| m.min(half)));
                (
                    r.row.outbox_id,
                    RetryState {
                        max_batch,
                        ..r.retry
                    },
                )
            })
            .collect();
    }
    let after_pause = now_ms.saturating_add(i64::try_from(pause.as_millis()).unwrap_or(i64::MAX));
    batch
        .iter()
        .map(|r| {
            (
                r.row.outbox_id,
                backed_off(r.retry, after_pause, max_backoff),
            )
        })
        .collect()
}

/// `state` after a failure alone (a send or a check): the next backoff, doubled and capped.
pub fn backed_off(state: RetryState, now_ms: i64, max_backoff: Duration) -> RetryState {
    let max_ms = u64::try_from(max_backoff.as_millis()).unwrap_or(u64::MAX);
    let min_ms = u64::try_from(MIN_ROW_BACKOFF.as_millis())
        .unwrap_or(200)
        .min(max_ms);
    let backoff_ms = state
        .backoff_ms
        .saturating_mul(2)
        .clamp(min_ms, max_ms.max(1));
    RetryState {
        max_batch: Some(1),
        backoff_ms,
        retry_at_ms: now_ms.saturating_add(i64::try_from(backoff_ms).unwrap_or(i64::MAX)),
        ..state
    }
}

/// The batch size after `too_many_events` on a batch of `refused_len`: half of it, at least 1.
pub fn shrink(current: usize, refused_len: usize) -> usize {
    (current.min(refused_len) / 2).max(1)
}

/// The batch size after a batch was taken: additive increase by a tenth of
/// `lago.batch_max_events` (at least 1), up to it: back to full within ten batches.
pub fn grow(current: usize, max: usize) -> usize {
    let max = max.max(1);
    current.saturating_add((max / 10).max(1)).clamp(1, max)
}

/// What the first look (`GET /api/v1/events/{transaction_id}`) proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckStep {
    /// The row's fate is known.
    Done(Fate),
    /// Lago answered with the first event of that id in the organization, under another
    /// subscription: that proves nothing about ours; list our subscription's events.
    ListOurs,
}

/// The fate of a row to check once `GET /events/{id}` answered (`None` on 404). lago-api's
/// `events_controller.rb#show` is `Event.find_by(organization, transaction_id)`: the first such
/// event, whatever its subscription (docs/lago-contract.md "Exactly once").
pub fn check_by_id(ours: &LagoEvent, stored: Option<&StoredEvent>) -> CheckStep {
    match stored {
        // No event with that id at all: ours was never stored; send it again.
        None => CheckStep::Done(Fate::Resend),
        Some(stored) if stored.external_subscription_id != ours.external_subscription_id => {
            CheckStep::ListOurs
        }
        Some(stored) => CheckStep::Done(judge(ours, stored)),
    }
}

/// The fate of a row to check from our subscription's events listed at its timestamp: our very
/// event → delivered; another one under our (subscription, id) → collision; none → send again.
pub fn check_listing(ours: &LagoEvent, listed: &[StoredEvent]) -> Fate {
    let under_our_key = listed.iter().filter(|s| {
        s.transaction_id == ours.transaction_id
            && s.external_subscription_id == ours.external_subscription_id
    });
    let mut other = None;
    for stored in under_our_key {
        if same_event(ours, stored) {
            return Fate::Delivered;
        }
        other.get_or_insert(stored);
    }
    match other {
        Some(stored) => judge(ours, stored),
        None => Fate::Resend,
    }
}

fn judge(ours: &LagoEvent, stored: &StoredEvent) -> Fate {
    if same_event(ours, stored) {
        return Fate::Delivered;
    }
    Fate::DeadLetter {
        reason: DeadLetterReason::TransactionIdCollision,
        detail: format!(
            "Lago holds transaction_id {} for subscription {} code {} with properties {}",
            stored.transaction_id,
            stored.external_subscription_id,
            stored.code,
            stored.properties.as_ref().map_or_else(
                || "null".to_owned(),
                |p| Value::Object(p.clone()).to_string()
            ),
        ),
    }
}

/// True when Lago's stored event is ours: same subscription, code, value and session properties.
///
/// Properties are compared leniently: a number and its decimal string are equal either way
/// (ClickHouse keeps strings, and the wire form may send every value as a string), and a
/// property we send as null matches one Lago does not show. The timestamp is not compared:
/// Lago renders it as ISO text, and the session properties already tell sessions apart.
pub fn same_event(ours: &LagoEvent, stored: &StoredEvent) -> bool {
    if ours.transaction_id != stored.transaction_id
        || ours.external_subscription_id != stored.external_subscription_id
        || ours.code != stored.code
    {
        return false;
    }
    let Ok(Value::Object(our_properties)) = serde_json::to_value(&ours.properties) else {
        return false;
    };
    let empty = Map::new();
    let stored_properties = stored.properties.as_ref().unwrap_or(&empty);
    our_properties
        .iter()
        .all(|(name, our_value)| match stored_properties.get(name) {
            Some(stored_value) => same_scalar(our_value, stored_value),
            None => our_value.is_null(),
        })
}

fn same_scalar(ours: &Value, stored: &Value) -> bool {
    match (ours, stored) {
        (Value::Number(n), Value::String(s)) | (Value::String(s), Value::Number(n)) => {
            n.to_string() == *s
        }
        _ => ours == stored,
    }
}

fn settle_all(batch: &[OutboxRow], fate: Fate, alarm: Option<Alarm>) -> Decision {
    Decision::Settle {
        fates: batch
            .iter()
            .map(|row| EventFate {
                outbox_id: row.outbox_id,
                fate: fate.clone(),
            })
            .collect(),
        alarm,
    }
}

fn decide_rejection(
    batch: &[OutboxRow],
    index_errors: &std::collections::BTreeMap<usize, IndexError>,
    unattributed: &std::collections::BTreeMap<String, IndexError>,
) -> Decision {
    let out_of_range: Vec<_> = index_errors.keys().filter(|&&i| i >= batch.len()).collect();
    if !unattributed.is_empty() || !out_of_range.is_empty() || index_errors.is_empty() {
        let detail = if unattributed.is_empty() && index_errors.is_empty() {
            "422 without error_details".to_owned()
        } else {
            let mut parts: Vec<String> = unattributed
                .iter()
                .map(|(key, error)| format!("{key}: {error}"))
                .collect();
            parts.extend(
                out_of_range
                    .iter()
                    .map(|i| format!("index {i} out of range: {}", index_errors[i])),
            );
            parts.join("; ")
        };
        // No index names an event: nothing is evidence against one (docs/lago-contract.md), so
        // the rows go again in smaller batches and are never dead-lettered for it.
        return Decision::Retry {
            cause: format!("422 naming no event: {detail}"),
            alarm: Some(Alarm::UnattributedRejection { detail }),
        };
    }
    let fates = batch
        .iter()
        .enumerate()
        .map(|(index, row)| EventFate {
            outbox_id: row.outbox_id,
            fate: match index_errors.get(&index) {
                None => Fate::Resend,
                Some(error) if error.is_only_already_exist() => Fate::Verify,
                Some(error) => Fate::DeadLetter {
                    reason: DeadLetterReason::LagoRejected,
                    detail: error.to_string(),
                },
            },
        })
        .collect();
    Decision::Settle { fates, alarm: None }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::lago::RetryCause;
    use crate::lago::schema::EventsCreated;
    use crate::spool::store::{ReadyRow, RetryState};

    fn event(n: i64) -> LagoEvent {
        crate::event::sample_event(&format!("cb1-{n}"), "sub-1", n)
    }

    fn batch(len: usize) -> Vec<OutboxRow> {
        (0..len as i64)
            .map(|n| OutboxRow {
                outbox_id: 100 + n,
                event: event(n),
            })
            .collect()
    }

    fn stored(ours: &LagoEvent) -> StoredEvent {
        let Value::Object(properties) = serde_json::to_value(&ours.properties).unwrap() else {
            unreachable!()
        };
        StoredEvent {
            lago_id: Some("l-1".into()),
            transaction_id: ours.transaction_id.clone(),
            external_subscription_id: ours.external_subscription_id.clone(),
            code: ours.code.clone(),
            timestamp: "2023-11-14T22:13:20.000Z".into(),
            properties: Some(properties),
            lago_subscription_id: None,
            lago_customer_id: None,
        }
    }

    fn fields(field: &str, code: &str) -> IndexError {
        IndexError::Fields(BTreeMap::from([(field.to_owned(), vec![code.to_owned()])]))
    }

    fn rejected(errors: Vec<(usize, IndexError)>) -> BatchOutcome {
        BatchOutcome::Rejected422 {
            index_errors: errors.into_iter().collect(),
            unattributed: BTreeMap::new(),
        }
    }

    fn fates_of(decision: Decision) -> Vec<Fate> {
        match decision {
            Decision::Settle { fates, .. } => fates.into_iter().map(|f| f.fate).collect(),
            other => panic!("expected Settle, got {other:?}"),
        }
    }

    #[test]
    fn accepted_marks_every_event_delivered() {
        let rows = batch(3);
        let decision = decide(
            &rows,
            &BatchOutcome::Accepted(EventsCreated { events: vec![] }),
        );
        let Decision::Settle { fates, alarm } = decision else {
            panic!()
        };
        assert_eq!(alarm, None);
        assert_eq!(
            fates.iter().map(|f| f.outbox_id).collect::<Vec<_>>(),
            [100, 101, 102]
        );
        assert!(fates.iter().all(|f| f.fate == Fate::Delivered));
    }

    #[test]
    fn an_unparseable_200_proves_nothing_retries_and_alarms() {
        let rows = batch(2);
        let outcome = BatchOutcome::AcceptedUnparseable {
            echoed: None,
            reason: "expected value".into(),
            body: "<html>maintenance</html>".into(),
        };
        let Decision::Retry { alarm, .. } = decide(&rows, &outcome) else {
            panic!("an HTML 200 must not count as delivered")
        };
        assert!(
            matches!(alarm, Some(Alarm::AcceptedUnparseable { detail }) if detail.contains("maintenance"))
        );
        // Lago's JSON in a changed shape, one echo per event: stored, with the alarm.
        let changed = BatchOutcome::AcceptedUnparseable {
            echoed: Some(2),
            reason: "missing field `code`".into(),
            body: "{\"events\":[{},{}]}".into(),
        };
        let Decision::Settle { fates, alarm } = decide(&rows, &changed) else {
            panic!()
        };
        assert!(fates.iter().all(|f| f.fate == Fate::Delivered));
        assert!(alarm.is_some());
        let short = BatchOutcome::AcceptedUnparseable {
            echoed: Some(1),
            reason: "r".into(),
            body: "b".into(),
        };
        assert!(matches!(decide(&rows, &short), Decision::Retry { .. }));
    }

    #[test]
    fn a_422_mixing_duplicates_and_a_plain_string_error() {
        let rows = batch(5);
        let mut both = BTreeMap::new();
        both.insert(
            "transaction_id".to_owned(),
            vec!["value_already_exist".to_owned()],
        );
        both.insert("code".to_owned(), vec!["value_is_mandatory".to_owned()]);
        let outcome = rejected(vec![
            (0, fields("transaction_id", "value_already_exist")),
            (
                2,
                IndexError::Message("undefined method `*' for nil".into()),
            ),
            (3, IndexError::Fields(both)),
        ]);
        let fates = fates_of(decide(&rows, &outcome));
        assert_eq!(fates[0], Fate::Verify);
        assert_eq!(fates[1], Fate::Resend);
        assert_eq!(
            fates[2],
            Fate::DeadLetter {
                reason: DeadLetterReason::LagoRejected,
                detail: "undefined method `*' for nil".into()
            }
        );
        // A duplicate that is also invalid cannot be ours as sent: Lago's complaint stands.
        assert_eq!(
            fates[3],
            Fate::DeadLetter {
                reason: DeadLetterReason::LagoRejected,
                detail: "code: value_is_mandatory; transaction_id: value_already_exist".into()
            }
        );
        assert_eq!(fates[4], Fate::Resend);
    }

    #[test]
    fn a_poison_event_is_dead_lettered_and_the_rest_delivered_without_a_loop() {
        let mut pending = batch(100);
        let mut delivered = Vec::new();
        let mut dead = Vec::new();
        // Lago (Postgres, whole-batch rollback) rejects index 41 while it is in the batch.
        let lago = |rows: &[OutboxRow]| match rows.iter().position(|r| r.outbox_id == 141) {
            Some(index) => rejected(vec![(
                index,
                fields("properties", "value_is_not_valid_number"),
            )]),
            None => BatchOutcome::Accepted(EventsCreated { events: vec![] }),
        };
        let mut rounds = 0;
        while !pending.is_empty() {
            rounds += 1;
            assert!(rounds <= 2, "retry loop");
            let Decision::Settle { fates, .. } = decide(&pending, &lago(&pending)) else {
                panic!()
            };
            let mut resend = Vec::new();
            for (row, fate) in pending.iter().zip(fates) {
                assert_eq!(row.outbox_id, fate.outbox_id);
                match fate.fate {
                    Fate::Delivered => delivered.push(row.outbox_id),
                    Fate::Resend => resend.push(row.clone()),
                    Fate::DeadLetter { reason, detail } => {
                        dead.push((row.outbox_id, reason, detail))
                    }
                    Fate::Verify => panic!("no duplicate here"),
                }
            }
            pending = resend;
        }
        assert_eq!(delivered.len(), 99);
        assert!(!delivered.contains(&141));
        assert_eq!(
            dead,
            [(
                141,
                DeadLetterReason::LagoRejected,
                "properties: value_is_not_valid_number".to_owned()
            )]
        );
    }

    #[test]
    fn too_many_events_shrinks_and_alarms() {
        let decision = decide(&batch(100), &BatchOutcome::TooManyEvents);
        assert_eq!(
            decision,
            Decision::ShrinkBatches {
                alarm: Alarm::TooManyEvents { refused_len: 100 }
            }
        );
        assert_eq!(shrink(100, 100), 50);
        assert_eq!(grow(50, 100), 60);
        assert_eq!(grow(95, 100), 100);
        assert_eq!(grow(1, 5), 2);
        assert!(matches!(
            decide(&batch(1), &BatchOutcome::TooManyEvents),
            Decision::PauseUntilOperator {
                cause: OperatorCause::Misconfigured { .. }
            }
        ));
    }

    #[test]
    fn unauthorized_pauses_until_the_key_is_fixed() {
        for status in [401, 403] {
            assert_eq!(
                decide(&batch(2), &BatchOutcome::Unauthorized { status }),
                Decision::PauseUntilOperator {
                    cause: OperatorCause::ApiKeyRejected { status }
                }
            );
        }
    }

    #[test]
    fn rate_limited_pauses_for_the_given_time_bounded() {
        let pause_of = |pause| decide(&batch(1), &BatchOutcome::RateLimited { pause });
        assert_eq!(
            pause_of(Some(Duration::from_secs(7))),
            Decision::Pause {
                pause: Duration::from_secs(7)
            }
        );
        assert_eq!(
            pause_of(None),
            Decision::Pause {
                pause: DEFAULT_RATE_LIMIT_PAUSE
            }
        );
        assert_eq!(
            pause_of(Some(Duration::from_secs(86_400))),
            Decision::Pause {
                pause: MAX_RATE_LIMIT_PAUSE
            }
        );
    }

    #[test]
    fn unknown_outcomes_and_400s_retry() {
        for cause in [
            RetryCause::Status(503),
            RetryCause::Status(400),
            RetryCause::Status(408),
            RetryCause::Timeout,
            RetryCause::Connect("refused".into()),
        ] {
            assert!(matches!(
                decide(&batch(3), &BatchOutcome::Retryable(cause)),
                Decision::Retry { .. }
            ));
        }
        let error = LagoError::Transient(RetryCause::Timeout);
        assert!(matches!(
            decide_error(&batch(3), &error),
            Decision::Retry { .. }
        ));
    }

    #[test]
    fn a_rejection_naming_no_event_retries_and_never_dead_letters() {
        let outcome = BatchOutcome::Rejected422 {
            index_errors: BTreeMap::new(),
            unattributed: BTreeMap::from([("".to_owned(), IndexError::Message("boom".into()))]),
        };
        for len in [8, 1] {
            assert!(matches!(
                decide(&batch(len), &outcome),
                Decision::Retry {
                    alarm: Some(Alarm::UnattributedRejection { .. }),
                    ..
                }
            ));
        }
        let out_of_range = rejected(vec![(7, fields("code", "x"))]);
        assert!(matches!(
            decide(&batch(2), &out_of_range),
            Decision::Retry { .. }
        ));
        let schema = LagoError::Schema {
            what: "t",
            status: 422,
            reason: "bad".into(),
            body: "<html>".into(),
        };
        assert!(matches!(
            decide_error(&batch(1), &schema),
            Decision::Retry { .. }
        ));
        let wrong_url = LagoError::UnexpectedStatus {
            what: "t",
            status: 404,
            body: String::new(),
        };
        assert!(matches!(
            decide_error(&batch(4), &wrong_url),
            Decision::PauseUntilOperator { .. }
        ));
    }

    #[test]
    fn a_check_delivers_our_copy_and_dead_letters_a_collision_under_our_key() {
        let ours = event(3);
        assert_eq!(
            check_by_id(&ours, Some(&stored(&ours))),
            CheckStep::Done(Fate::Delivered)
        );

        let mut other_session = stored(&ours);
        other_session
            .properties
            .as_mut()
            .unwrap()
            .insert("charge_box_id".into(), Value::String("cb2".into()));
        assert!(!same_event(&ours, &other_session));
        assert!(matches!(
            check_by_id(&ours, Some(&other_session)),
            CheckStep::Done(Fate::DeadLetter {
                reason: DeadLetterReason::TransactionIdCollision,
                ..
            })
        ));

        let mut other_value = stored(&ours);
        other_value
            .properties
            .as_mut()
            .unwrap()
            .insert("value".into(), Value::String("9.9".into()));
        assert!(!same_event(&ours, &other_value));

        // The first event with that id belongs to another subscription: no proof either way.
        let mut other_subscription = stored(&ours);
        other_subscription.external_subscription_id = "sub-2".into();
        assert!(!same_event(&ours, &other_subscription));
        assert_eq!(
            check_by_id(&ours, Some(&other_subscription)),
            CheckStep::ListOurs
        );
        assert_eq!(
            check_listing(&ours, &[other_subscription.clone(), stored(&ours)]),
            Fate::Delivered
        );
        assert_eq!(check_listing(&ours, &[other_subscription]), Fate::Resend);
        assert!(matches!(
            check_listing(&ours, &[other_value]),
            Fate::DeadLetter {
                reason: DeadLetterReason::TransactionIdCollision,
                ..
            }
        ));

        // No event with that id at all: send again.
        assert_eq!(check_by_id(&ours, None), CheckStep::Done(Fate::Resend));
    }

    #[test]
    fn same_event_reads_properties_back_as_strings_or_numbers() {
        let ours = event(5);
        let mut copy = stored(&ours);
        let properties = copy.properties.as_mut().unwrap();
        for (_, value) in properties.iter_mut() {
            if let Value::Number(n) = value {
                *value = Value::String(n.to_string());
            }
        }
        assert!(same_event(&ours, &copy));
        // And the other way round: we send strings, Lago shows numbers.
        assert!(same_scalar(
            &Value::String("1".into()),
            &serde_json::json!(1)
        ));
        assert!(!same_scalar(
            &Value::String("2".into()),
            &serde_json::json!(1)
        ));
    }

    #[test]
    fn same_event_accepts_clickhouse_stringified_numbers_and_extra_properties() {
        let ours = event(4);
        let mut copy = stored(&ours);
        let properties = copy.properties.as_mut().unwrap();
        properties.insert("connector_id".into(), Value::String("1".into()));
        properties.insert("added_by_lago".into(), Value::Bool(true));
        assert!(same_event(&ours, &copy));
    }

    proptest! {
        /// Whatever indexes Lago blames, every row gets exactly one fate, in batch order, and
        /// only unblamed rows are re-sent.
        #[test]
        fn every_row_gets_one_fate_in_order(
            len in 1usize..120,
            blamed in proptest::collection::btree_map(0usize..120, 0u8..3, 0..10),
        ) {
            let rows = batch(len);
            let errors: Vec<_> = blamed
                .iter()
                .filter(|(i, _)| **i < len)
                .map(|(i, kind)| (*i, match kind {
                    0 => fields("transaction_id", "value_already_exist"),
                    1 => fields("timestamp", "invalid_format"),
                    _ => IndexError::Message("expression failed".into()),
                }))
                .collect();
            prop_assume!(!errors.is_empty());
            let blamed_indexes: Vec<usize> = errors.iter().map(|(i, _)| *i).collect();
            let Decision::Settle { fates, alarm } = decide(&rows, &rejected(errors)) else {
                panic!("a fully attributed 422 settles");
            };
            prop_assert_eq!(alarm, None);
            prop_assert_eq!(fates.len(), len);
            for (index, (row, fate)) in rows.iter().zip(&fates).enumerate() {
                prop_assert_eq!(row.outbox_id, fate.outbox_id);
                prop_assert_eq!(fate.fate == Fate::Resend, !blamed_indexes.contains(&index));
                prop_assert_ne!(&fate.fate, &Fate::Delivered);
            }
        }
    }

    fn ready(id: i64, needs_check: bool, max_batch: Option<usize>) -> ReadyRow {
        ReadyRow {
            row: OutboxRow {
                outbox_id: id,
                event: event(id),
            },
            retry: RetryState {
                needs_check,
                max_batch,
                ..RetryState::default()
            },
        }
    }

    fn arb_ready() -> impl Strategy<Value = Vec<ReadyRow>> {
        proptest::collection::vec((any::<bool>(), proptest::option::of(1usize..8)), 0..40).prop_map(
            |specs| {
                specs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (check, max))| ready(i as i64, check && i % 3 == 0, max))
                    .collect()
            },
        )
    }

    #[test]
    fn a_row_to_check_goes_alone_and_a_split_row_rides_in_small_batches() {
        let rows = vec![ready(1, true, None), ready(2, false, None)];
        assert!(matches!(compose(rows, 100), Job::Check(r) if r.row.outbox_id == 1));
        let rows = vec![
            ready(1, false, None),
            ready(2, true, None),
            ready(3, false, Some(1)),
        ];
        let Job::Send(batch) = compose(rows, 100) else {
            panic!()
        };
        assert_eq!(
            batch.len(),
            1,
            "the checked row is skipped, the solo row waits its turn"
        );
        // The rows of a failed batch of 8: 4, 2, 1; a failure alone backs off alone.
        let eight: Vec<_> = (0..8).map(|i| ready(i, false, None)).collect();
        let after = retry_rows(&eight, 1_000, Duration::from_secs(10), Duration::ZERO);
        assert!(
            after
                .iter()
                .all(|(_, s)| s.max_batch == Some(4) && s.retry_at_ms == 0)
        );
        let alone = retry_rows(&eight[..1], 1_000, Duration::from_secs(10), Duration::ZERO);
        assert_eq!(alone[0].1.retry_at_ms, 1_200);
        // Counted from the end of the shipper's pause: the others go first.
        let paused = retry_rows(
            &eight[..1],
            1_000,
            Duration::from_secs(10),
            Duration::from_millis(300),
        );
        assert_eq!(paused[0].1.retry_at_ms, 1_500);
        let again = backed_off(alone[0].1, 2_000, Duration::from_secs(10));
        assert_eq!((again.backoff_ms, again.retry_at_ms), (400, 2_400));
        let capped = (0..20).fold(alone[0].1, |s, _| backed_off(s, 0, Duration::from_secs(10)));
        assert_eq!(capped.backoff_ms, 10_000);
    }

    proptest! {
        /// A job never mixes a row to check with others, never exceeds the batch size or any
        /// member's own limit, keeps the rows' order, and takes the oldest ready row.
        #[test]
        fn composed_jobs_respect_every_limit(ready in arb_ready(), size in 1usize..20) {
            let first = ready.first().map(|r| r.row.outbox_id);
            match compose(ready.clone(), size) {
                Job::Nothing => prop_assert!(ready.is_empty()),
                Job::Check(row) => {
                    prop_assert!(row.retry.needs_check);
                    prop_assert_eq!(Some(row.row.outbox_id), first);
                }
                Job::Send(batch) => {
                    prop_assert!(!batch.is_empty() && batch.len() <= size);
                    prop_assert_eq!(Some(batch[0].row.outbox_id), first);
                    prop_assert!(batch.windows(2).all(|w| w[0].row.outbox_id < w[1].row.outbox_id));
                    for row in &batch {
                        prop_assert!(!row.retry.needs_check);
                        prop_assert!(batch.len() <= row.retry.max_batch.unwrap_or(usize::MAX));
                    }
                }
            }
        }

        /// Repeated failures split any batch down to single rows within log2(n) rounds, and
        /// single rows back off within the cap; a row's limit never grows through a failure.
        #[test]
        fn failures_split_down_to_one_and_back_off_capped(
            len in 1usize..200,
            max_ms in 1u64..60_000,
            now in 0i64..1_000_000,
        ) {
            let cap = Duration::from_millis(max_ms);
            let mut rows: Vec<ReadyRow> = (0..len as i64).map(|i| ready(i, false, None)).collect();
            let mut rounds = 0;
            loop {
                let Job::Send(batch) = compose(rows.clone(), len) else { unreachable!() };
                let updates = retry_rows(&batch, now, cap, Duration::ZERO);
                for (id, state) in &updates {
                    let row = rows.iter_mut().find(|r| r.row.outbox_id == *id).unwrap();
                    prop_assert!(state.max_batch.unwrap() <= row.retry.max_batch.unwrap_or(usize::MAX));
                    row.retry = *state;
                }
                rounds += 1;
                if batch.len() == 1 {
                    let state = updates[0].1;
                    prop_assert!(state.backoff_ms >= 1 && state.backoff_ms <= max_ms);
                    prop_assert_eq!(state.retry_at_ms, now + state.backoff_ms as i64);
                    break;
                }
                prop_assert!(rounds <= 8, "no split to one after {} rounds", rounds);
            }
        }

        /// Halving on too_many_events then growing on success stays within 1..=max and gets
        /// back to max.
        #[test]
        fn batch_size_shrinks_and_grows_back(max in 1usize..500, refusals in 0usize..12) {
            let mut size = max;
            for _ in 0..refusals {
                size = shrink(size, size);
                prop_assert!(size >= 1 && size <= max);
            }
            for _ in 0..20 {
                size = grow(size, max);
                prop_assert!(size >= 1 && size <= max);
            }
            prop_assert_eq!(size, max);
        }
    }
}
