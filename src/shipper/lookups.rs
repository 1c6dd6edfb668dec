//! I/O: the billable-metric and subscription checks, in a task of their own with their own
//! timeouts and backoff, so a lookup that hangs holds back only the events that need it.
//!
//! The shipper asks for a subscription by marking it wanted; this task looks it up (a few at a
//! time, through the same rate limiter as every Lago call) and records what Lago said. Until a
//! subscription is confirmed its events stay pending and the others go.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{READY_METRIC, Shared};
use crate::lago::{LagoClient, LagoError};

/// How long a confirmed subscription is trusted before it is looked up again.
const SUBSCRIPTION_TTL: Duration = Duration::from_secs(600);
/// How long "Lago has no such subscription" stands before its events make Lago be asked again
/// (e.g. after `spool requeue --reason unknown_subscription`).
const UNKNOWN_TTL: Duration = Duration::from_secs(5);
/// How often the billable metric is re-validated while everything is fine.
const METRIC_RECHECK: Duration = Duration::from_secs(300);
/// How often a paused shipper (bad key, bad metric, wrong URL) probes Lago again.
pub(super) const REPROBE_EVERY: Duration = Duration::from_secs(5);
/// Subscription lookups in flight at once.
const LOOKUP_CONCURRENCY: usize = 4;
/// The longest this task sleeps without looking at what is wanted.
const POLL: Duration = Duration::from_millis(500);

/// What is known of one subscription.
#[derive(Debug, Clone)]
pub(super) enum Subscription {
    /// Events wait for it; not asked yet (or asked again after expiry).
    Wanted,
    /// A lookup is in flight.
    Asking,
    /// Lago has it (active or not) as of `at`.
    Known { at: Instant },
    /// Lago answered 404 at `at`: its events are dead-lettered `unknown_subscription`.
    Unknown { at: Instant },
    /// The lookup failed; asked again at `retry_at`.
    Failed { retry_at: Instant, failures: u32 },
}

impl Subscription {
    /// Whether its events may be sent now.
    pub(super) fn confirmed(&self) -> bool {
        matches!(self, Self::Known { at } if at.elapsed() < SUBSCRIPTION_TTL)
    }
}

/// What is known of the billable metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Metric {
    /// Not checked yet, or due again after a problem: nothing is sent meanwhile.
    Unchecked,
    /// Sums our `value`: delivery may go on until `until`.
    Ok { until: Instant },
    /// Wrong or missing, or Lago refused us: re-probed at `retry_at`.
    Blocked { retry_at: Instant },
}

impl Metric {
    /// Whether events may be sent.
    pub(super) fn allows_sending(&self) -> bool {
        matches!(self, Self::Ok { .. })
    }
}

/// Runs the lookups until `shutdown`.
pub(super) async fn run(
    client: LagoClient,
    shared: Arc<Shared>,
    metric_code: String,
    retry_max_delay: Duration,
    shutdown: CancellationToken,
) {
    let mut metric_failures = 0u32;
    let mut lookups: JoinSet<(String, Result<bool, LagoError>)> = JoinSet::new();
    loop {
        // The metric first: without it nothing is sent anyway.
        if shared.metric_due() <= Instant::now() {
            shared.limiter.until_ready().await;
            let result = client.get_billable_metric(&metric_code).await;
            shared.observe(&result);
            metric_failures = shared.record_metric(&metric_code, result, metric_failures);
            if metric_failures > 0 {
                // A metric proven right stays so through a failed recheck; one never proven
                // keeps delivery waiting until Lago can say.
                let retry_at = Instant::now() + backoff(retry_max_delay, metric_failures);
                let next = match &*crate::lock(&shared.metric) {
                    Metric::Ok { .. } => Metric::Ok { until: retry_at },
                    _ => Metric::Blocked { retry_at },
                };
                shared.set_metric(next);
            }
        }
        for subscription in
            shared.subscriptions_to_ask(LOOKUP_CONCURRENCY.saturating_sub(lookups.len()))
        {
            let (client, shared) = (client.clone(), shared.clone());
            lookups.spawn(async move {
                shared.limiter.until_ready().await;
                let result = client.get_subscription(&subscription).await;
                (subscription, result.map(|found| found.is_some()))
            });
        }
        tokio::select! {
            Some(done) = lookups.join_next(), if !lookups.is_empty() => {
                if let Ok((subscription, result)) = done {
                    shared.observe(&result);
                    shared.record_subscription(subscription, result, retry_max_delay);
                }
            }
            _ = shared.lookups_wanted.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The wait after `failures` failures in a row: 200 ms doubled, capped, with jitter.
pub(super) fn backoff(max: Duration, failures: u32) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(failures.saturating_sub(1) as usize)
        .unwrap_or(max)
        .min(max)
}

impl Shared {
    fn metric_due(&self) -> Instant {
        match &*crate::lock(&self.metric) {
            Metric::Unchecked => Instant::now(),
            Metric::Ok { until } => *until,
            Metric::Blocked { retry_at } => *retry_at,
        }
    }

    pub(super) fn set_metric(&self, metric: Metric) {
        *crate::lock(&self.metric) = metric;
    }

    /// Applies a metric check's answer; returns the failures in a row (0 once Lago answered).
    fn record_metric(
        &self,
        code: &str,
        result: Result<Option<crate::lago::BillableMetricObject>, LagoError>,
        failures: u32,
    ) -> u32 {
        let problem = match result {
            Ok(Some(metric)) if metric.sums_field("value") => {
                self.set_metric(Metric::Ok {
                    until: Instant::now() + METRIC_RECHECK,
                });
                self.readiness.clear_problem(READY_METRIC);
                self.health(|h| h.operator = None);
                self.log_resumed();
                return 0;
            }
            Ok(Some(metric)) => format!(
                "billable metric \"{code}\" is {} on field {}: it must be sum_agg on \"value\" or every event bills 0",
                metric.aggregation_type,
                metric
                    .field_name
                    .as_deref()
                    .map_or("(none)".into(), |f| format!("\"{f}\""))
            ),
            Ok(None) => format!(
                "billable metric \"{code}\" does not exist in Lago: create it (sum_agg on \"value\") or fix lago.metric_code"
            ),
            Err(LagoError::Unauthorized { status }) => {
                self.key_refused(status);
                self.set_metric(Metric::Blocked {
                    retry_at: Instant::now() + REPROBE_EVERY,
                });
                return 0;
            }
            Err(error @ (LagoError::WrongUrl { .. } | LagoError::UnexpectedStatus { .. })) => {
                self.misconfigured(error.to_string());
                self.set_metric(Metric::Blocked {
                    retry_at: Instant::now() + REPROBE_EVERY,
                });
                return 0;
            }
            Err(error) => {
                tracing::warn!(%error, "could not check the billable metric; will retry");
                // Only a metric proven right lets events go; while Lago cannot say, they wait.
                return failures.saturating_add(1);
            }
        };
        self.log_pause(&problem);
        self.readiness.set_problem(READY_METRIC, problem);
        self.health(|h| h.operator = None);
        self.set_metric(Metric::Blocked {
            retry_at: Instant::now() + REPROBE_EVERY,
        });
        0
    }

    /// Up to `room` subscriptions to look up now, marked as being asked.
    fn subscriptions_to_ask(&self, room: usize) -> Vec<String> {
        let now = Instant::now();
        let mut subscriptions = crate::lock(&self.subscriptions);
        let mut due = Vec::new();
        for (subscription, state) in subscriptions.iter_mut() {
            if due.len() >= room {
                break;
            }
            let ask = match state {
                Subscription::Wanted => true,
                Subscription::Failed { retry_at, .. } => *retry_at <= now,
                Subscription::Asking
                | Subscription::Known { .. }
                | Subscription::Unknown { .. } => false,
            };
            if ask {
                *state = Subscription::Asking;
                due.push(subscription.clone());
            }
        }
        due
    }

    fn record_subscription(
        &self,
        subscription: String,
        result: Result<bool, LagoError>,
        retry_max_delay: Duration,
    ) {
        let now = Instant::now();
        let failures = match crate::lock(&self.subscriptions).get(&subscription) {
            Some(Subscription::Failed { failures, .. }) => *failures,
            _ => 0,
        };
        let state = match result {
            Ok(true) => Subscription::Known { at: now },
            Ok(false) => Subscription::Unknown { at: now },
            Err(LagoError::Unauthorized { status }) => {
                self.key_refused(status);
                Subscription::Failed {
                    retry_at: now + REPROBE_EVERY,
                    failures,
                }
            }
            Err(error) => {
                let failures = failures.saturating_add(1);
                let wait = backoff(retry_max_delay, failures);
                metrics::counter!("ocpp_lago_bridge_lago_lookup_failures_total", "kind" => "subscription")
                    .increment(1);
                tracing::warn!(external_subscription_id = %subscription, %error, retry_in = %humantime::format_duration(wait), "could not check a subscription; its events wait, the others go");
                if let LagoError::WrongUrl { .. } = error {
                    self.misconfigured(error.to_string());
                }
                Subscription::Failed {
                    retry_at: now + wait,
                    failures,
                }
            }
        };
        crate::lock(&self.subscriptions).insert(subscription, state);
    }

    /// Sorts the subscriptions of `rows`: which may be sent, which Lago does not know, and
    /// which wait for a lookup (asked for here).
    pub(super) fn triage_subscriptions<'a>(
        &self,
        subscriptions: impl Iterator<Item = &'a str>,
    ) -> HashMap<String, Triage> {
        let mut states = crate::lock(&self.subscriptions);
        let mut out = HashMap::new();
        let mut wanted = false;
        for subscription in subscriptions {
            if out.contains_key(subscription) {
                continue;
            }
            let triage = match states.get(subscription) {
                Some(state) if state.confirmed() => Triage::Send,
                Some(Subscription::Unknown { at }) if at.elapsed() < UNKNOWN_TTL => Triage::Unknown,
                Some(Subscription::Asking | Subscription::Failed { .. }) => Triage::Hold,
                Some(Subscription::Wanted) => Triage::Hold,
                // Never asked, expired, or unknown long enough to ask again.
                _ => {
                    states.insert(subscription.to_owned(), Subscription::Wanted);
                    wanted = true;
                    Triage::Hold
                }
            };
            out.insert(subscription.to_owned(), triage);
        }
        drop(states);
        if wanted {
            self.lookups_wanted.notify_one();
        }
        out
    }

    /// Subscriptions whose events are held back now (asked or failing).
    pub(super) fn held_subscriptions(&self) -> std::collections::HashSet<String> {
        crate::lock(&self.subscriptions)
            .iter()
            .filter(|(_, s)| {
                matches!(
                    s,
                    Subscription::Wanted | Subscription::Asking | Subscription::Failed { .. }
                )
            })
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// What to do with the events of one subscription now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Triage {
    /// Confirmed: send.
    Send,
    /// Lago has no such subscription: dead-letter (requeue-able).
    Unknown,
    /// Not confirmed yet: keep pending, send the others.
    Hold,
}
