//! Pure decisions of the shipper: given a batch and what Lago answered, what happens to each
//! outbox row and to the shipper. No I/O here; EVENTS-CONTRACT.md is the specification.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::event::LagoEvent;
use crate::lago::{BatchOutcome, IndexError, LagoError, StoredEvent};

/// A 429 without a usable header pauses this long.
pub const DEFAULT_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(1);
/// A header asking for longer than this is capped: a bogus proxy must not stall us for days.
pub const MAX_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(15 * 60);

pub use crate::spool::store::OutboxRow;

/// Why an event went to the dead letters (the spool's `reason` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Lago holds another event under our (subscription, transaction_id).
    TransactionIdCollision,
    /// Lago rejected the event itself; the detail is Lago's error text.
    LagoRejected,
    /// Lago says the transaction_id exists but does not show it to us.
    DuplicateUnverified,
}

impl DeadLetterReason {
    /// The reason code stored in the spool and shown by `spool dead-letters`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TransactionIdCollision => "transaction_id_collision",
            Self::LagoRejected => "lago_rejected",
            Self::DuplicateUnverified => "duplicate_unverified",
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
    /// Lago says `value_already_exist`: GET the stored event and apply [`resolve_verification`].
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
    /// Lago stored the batch but its answer did not parse: its schema changed.
    AcceptedUnparseable {
        /// Parse error and body excerpt.
        detail: String,
    },
    /// Lago's batch limit is below ours: `lago.batch_max_events` is too high.
    TooManyEvents {
        /// The batch size Lago refused.
        refused_len: usize,
    },
    /// Lago rejected the batch without saying which event; we bisect to find it.
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
    /// Outcome unknown (408, 5xx, timeout, connection): same batch again after backoff.
    RetryBatch {
        /// Why, for the log.
        cause: String,
    },
    /// Send the same events again in batches of at most `batch_max_events`.
    HalveBatch {
        /// The new batch size limit (at least 1).
        batch_max_events: usize,
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
        BatchOutcome::AcceptedUnparseable { reason, body } => settle_all(
            batch,
            Fate::Delivered,
            Some(Alarm::AcceptedUnparseable {
                detail: format!("{reason}; body: {body}"),
            }),
        ),
        BatchOutcome::Rejected422 {
            index_errors,
            unattributed,
        } => decide_rejection(batch, index_errors, unattributed),
        BatchOutcome::TooManyEvents => {
            let alarm = Alarm::TooManyEvents {
                refused_len: batch.len(),
            };
            if batch.len() > 1 {
                Decision::HalveBatch {
                    batch_max_events: batch.len() / 2,
                    alarm,
                }
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
        BatchOutcome::Retryable(cause) => Decision::RetryBatch {
            cause: cause.to_string(),
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
        LagoError::Transient(cause) => Decision::RetryBatch {
            cause: cause.to_string(),
        },
        LagoError::UnexpectedStatus { status: 413, .. } if batch.len() > 1 => {
            Decision::HalveBatch {
                batch_max_events: batch.len() / 2,
                alarm: Alarm::UnattributedRejection {
                    detail: error.to_string(),
                },
            }
        }
        // A 404 or redirect on the batch path means the api_url is wrong, not the events.
        LagoError::UnexpectedStatus {
            status: 300..=399 | 404,
            ..
        }
        | LagoError::InvalidUrl { .. }
        | LagoError::InvalidApiKey
        | LagoError::ClientBuild(_) => Decision::PauseUntilOperator {
            cause: OperatorCause::Misconfigured {
                detail: error.to_string(),
            },
        },
        // Lago (or our encoder) refuses the batch without naming an event: nothing was stored,
        // and the same batch would fail the same way, so bisect down to the event at fault.
        LagoError::Schema { .. } | LagoError::UnexpectedStatus { .. } | LagoError::Encode(_) => {
            bisect_or_dead_letter(batch, error.to_string())
        }
    }
}

/// The fate of a `Verify` event once Lago's stored copy (None on 404) is known.
pub fn resolve_verification(ours: &LagoEvent, stored: Option<&StoredEvent>) -> Fate {
    match stored {
        Some(stored) if same_event(ours, stored) => Fate::Delivered,
        Some(stored) => Fate::DeadLetter {
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
        },
        None => Fate::DeadLetter {
            reason: DeadLetterReason::DuplicateUnverified,
            detail: "Lago answered value_already_exist but GET /events/{transaction_id} found none"
                .into(),
        },
    }
}

/// True when Lago's stored event is ours: same subscription, code, value and session properties.
///
/// Properties are compared as opaque JSON: every property we send must be stored with the same
/// value; a number stored as its decimal string (ClickHouse keeps strings) counts as equal.
/// The timestamp is not compared: Lago renders it as ISO text, and the session properties
/// already tell one session from another.
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
    our_properties.iter().all(|(name, our_value)| {
        stored_properties
            .get(name)
            .is_some_and(|stored_value| same_scalar(our_value, stored_value))
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
        return bisect_or_dead_letter(batch, detail);
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

/// A rejection no event can be blamed for: halve until one event is left, then dead-letter it.
fn bisect_or_dead_letter(batch: &[OutboxRow], detail: String) -> Decision {
    if batch.len() > 1 {
        Decision::HalveBatch {
            batch_max_events: batch.len() / 2,
            alarm: Alarm::UnattributedRejection { detail },
        }
    } else {
        settle_all(
            batch,
            Fate::DeadLetter {
                reason: DeadLetterReason::LagoRejected,
                detail,
            },
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::lago::RetryCause;
    use crate::lago::schema::EventsCreated;

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
    fn accepted_unparseable_is_delivered_and_alarms() {
        let rows = batch(2);
        let outcome = BatchOutcome::AcceptedUnparseable {
            reason: "expected value".into(),
            body: "garbage".into(),
        };
        let Decision::Settle { fates, alarm } = decide(&rows, &outcome) else {
            panic!()
        };
        assert!(fates.iter().all(|f| f.fate == Fate::Delivered));
        assert!(
            matches!(alarm, Some(Alarm::AcceptedUnparseable { detail }) if detail.contains("garbage"))
        );
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
    fn too_many_events_halves_and_alarms() {
        let decision = decide(&batch(100), &BatchOutcome::TooManyEvents);
        assert_eq!(
            decision,
            Decision::HalveBatch {
                batch_max_events: 50,
                alarm: Alarm::TooManyEvents { refused_len: 100 }
            }
        );
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
    fn unknown_outcomes_retry_the_same_batch() {
        for cause in [
            RetryCause::Status(503),
            RetryCause::Status(408),
            RetryCause::Timeout,
            RetryCause::Connect("refused".into()),
        ] {
            assert!(matches!(
                decide(&batch(3), &BatchOutcome::Retryable(cause)),
                Decision::RetryBatch { .. }
            ));
        }
        let error = LagoError::Transient(RetryCause::Timeout);
        assert!(matches!(
            decide_error(&batch(3), &error),
            Decision::RetryBatch { .. }
        ));
    }

    #[test]
    fn an_unattributed_rejection_bisects_then_dead_letters_the_single_event() {
        let outcome = BatchOutcome::Rejected422 {
            index_errors: BTreeMap::new(),
            unattributed: BTreeMap::from([("".to_owned(), IndexError::Message("boom".into()))]),
        };
        assert!(matches!(
            decide(&batch(8), &outcome),
            Decision::HalveBatch {
                batch_max_events: 4,
                ..
            }
        ));
        assert_eq!(
            fates_of(decide(&batch(1), &outcome)),
            [Fate::DeadLetter {
                reason: DeadLetterReason::LagoRejected,
                detail: ": boom".into()
            }]
        );
        let out_of_range = rejected(vec![(7, fields("code", "x"))]);
        assert!(matches!(
            decide(&batch(2), &out_of_range),
            Decision::HalveBatch {
                batch_max_events: 1,
                ..
            }
        ));
        let schema = LagoError::Schema {
            what: "t",
            status: 422,
            reason: "bad".into(),
            body: "<html>".into(),
        };
        assert!(matches!(
            decide_error(&batch(4), &schema),
            Decision::HalveBatch {
                batch_max_events: 2,
                ..
            }
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
    fn verification_delivers_our_copy_and_dead_letters_a_collision() {
        let ours = event(3);
        assert_eq!(
            resolve_verification(&ours, Some(&stored(&ours))),
            Fate::Delivered
        );

        let mut other_session = stored(&ours);
        other_session
            .properties
            .as_mut()
            .unwrap()
            .insert("charge_box_id".into(), Value::String("cb2".into()));
        assert!(!same_event(&ours, &other_session));
        assert!(matches!(
            resolve_verification(&ours, Some(&other_session)),
            Fate::DeadLetter {
                reason: DeadLetterReason::TransactionIdCollision,
                ..
            }
        ));

        let mut other_value = stored(&ours);
        other_value
            .properties
            .as_mut()
            .unwrap()
            .insert("value".into(), Value::String("9.9".into()));
        assert!(!same_event(&ours, &other_value));

        let mut other_subscription = stored(&ours);
        other_subscription.external_subscription_id = "sub-2".into();
        assert!(!same_event(&ours, &other_subscription));

        assert!(matches!(
            resolve_verification(&ours, None),
            Fate::DeadLetter {
                reason: DeadLetterReason::DuplicateUnverified,
                ..
            }
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
}
