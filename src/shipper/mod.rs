//! I/O: takes pending events from the spool's outbox in order, batches them, rate-limits and
//! retries requests to Lago, and reports each event's fate back to the spool writer.
//!
//! Every retry re-reads the same outbox rows, so the same events (same ids, values and
//! timestamps) are sent every time: delivery is idempotent by construction.
//!
//! A batch Lago accepted is marked delivered without waiting for that commit: the next batch is
//! read (skipping the rows being marked) and sent while the writer commits, so a backlog drains
//! at the rate limit instead of at one request plus one fsync per batch. Nothing is marked before
//! Lago accepted it; a mark that fails to commit leaves its rows pending, to be sent again.

pub mod outcome;
pub mod pause;

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::lago::{BatchOutcome, LagoClient, LagoError, RetryCause};
use crate::spool::SpoolHandle;
use crate::spool::store::{OutboxRow, Store, StoreError};
use crate::spool::writer::{Command, unix_now};
use crate::telemetry::Readiness;
use outcome::{Alarm, Decision, Fate, OperatorCause, decide, decide_error, resolve_verification};

/// Readiness check names owned by the shipper.
pub const READY_LAGO: &str = "lago";
pub const READY_METRIC: &str = "lago_metric";

/// How often an idle shipper looks for events queued by operator commands.
const IDLE_POLL: Duration = Duration::from_secs(2);
/// How often a paused shipper (bad key, bad metric) probes Lago again.
const REPROBE_EVERY: Duration = Duration::from_secs(5);
/// How long a confirmed subscription is trusted before it is looked up again.
const SUBSCRIPTION_TTL: Duration = Duration::from_secs(600);
/// How often the billable metric is re-validated while everything is fine.
const METRIC_RECHECK: Duration = Duration::from_secs(300);
/// Most batches whose "delivered" commit may be outstanding at once.
const MAX_OPEN_MARKS: usize = 4;
/// On shutdown, how long the shipper waits for its outstanding marks to commit.
const MARKS_ON_SHUTDOWN: Duration = Duration::from_secs(2);
/// While full batches go out, the backlog gauges are refreshed this often, not before every
/// batch: counting a million pending rows takes tens of milliseconds, several requests' worth.
const BACKLOG_PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// The shipper's settings (from `[lago]`).
#[derive(Debug, Clone)]
pub struct ShipperSettings {
    pub metric_code: String,
    pub batch_max_events: usize,
    pub batch_linger: Duration,
    pub max_requests_per_second: u32,
    pub retry_max_delay: Duration,
}

/// Where events go.
pub enum Destination {
    /// Lago's events API.
    Lago(LagoClient),
    /// `--dry-run`: one JSON line per event on stdout.
    Stdout,
}

/// The shipper's view of the spool: a read connection plus the writer for every change.
pub struct SpoolAccess {
    pub path: PathBuf,
    pub writer: SpoolHandle,
    /// Fired by the writer whenever new events were committed.
    pub events_committed: Arc<Notify>,
}

/// Ships until `shutdown` fires. `draining` fires first, on SIGTERM: from then on a part-full
/// batch goes at once instead of lingering, so the flush window is spent sending.
pub async fn run(
    destination: Destination,
    spool: SpoolAccess,
    settings: ShipperSettings,
    readiness: Readiness,
    draining: CancellationToken,
    shutdown: CancellationToken,
) {
    let reader = match crate::app::open_store(&spool.path).await {
        Ok(store) => store,
        Err(error) => {
            tracing::error!(%error, "the shipper cannot read the spool: nothing is delivered until restart");
            readiness.set_problem(READY_LAGO, format!("spool unreadable: {error}"));
            return;
        }
    };
    let mut shipper = Shipper {
        reader: Some(reader),
        writer: spool.writer,
        limiter: RateLimiter::direct(Quota::per_second(
            NonZeroU32::new(settings.max_requests_per_second).unwrap_or(NonZeroU32::MIN),
        )),
        backoff: backoff(&settings),
        batch_max_events: settings.batch_max_events,
        settings,
        readiness,
        known_subscriptions: HashMap::new(),
        metric_checked_at: None,
        backlog_published_at: None,
        draining,
        marks: VecDeque::new(),
        marking: HashSet::new(),
        pause_log: pause::PauseLog::default(),
    };
    let wake = spool.events_committed;
    loop {
        let progressed = tokio::select! {
            progressed = shipper.step(&destination) => progressed,
            _ = shutdown.cancelled() => {
                // Unsettled marks are still committed by the writer; waiting only keeps the
                // delivered counter exact. Should it not happen, the rows are sent again.
                let _ = tokio::time::timeout(MARKS_ON_SHUTDOWN, shipper.settle_marks(0)).await;
                return;
            }
        };
        let pause = match progressed {
            Step::Idle => None,
            Step::Sent => continue,
            Step::Wait(pause) => Some(pause),
        };
        tokio::select! {
            _ = wake.notified(), if pause.is_none() => {}
            // Idle, it still looks now and then: `spool requeue` and `replay` write from outside.
            _ = tokio::time::sleep(pause.unwrap_or(IDLE_POLL)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

enum Step {
    /// Nothing pending.
    Idle,
    /// A batch was settled; look for more at once.
    Sent,
    /// Try again after this long (retry, 429, paused for an operator).
    Wait(Duration),
}

struct Shipper {
    reader: Option<Store>,
    writer: SpoolHandle,
    limiter: DefaultDirectRateLimiter,
    backoff: backon::ExponentialBackoff,
    /// Halved on `too_many_events`; never above the setting.
    batch_max_events: usize,
    settings: ShipperSettings,
    readiness: Readiness,
    known_subscriptions: HashMap<String, Instant>,
    metric_checked_at: Option<Instant>,
    backlog_published_at: Option<Instant>,
    draining: CancellationToken,
    /// "Delivered" commands sent to the writer whose commit is not confirmed yet, oldest first.
    marks: VecDeque<Mark>,
    /// The rows of `marks`: pending on disk until their commit, never to be read for sending.
    marking: HashSet<i64>,
    /// Whether a pause for an operator was logged, and when (reminders at most once a minute).
    pause_log: pause::PauseLog,
}

/// Outbox rows Lago accepted, being marked delivered by the writer.
struct Mark {
    ids: Vec<i64>,
    done: oneshot::Receiver<Result<(), String>>,
}

fn backoff(settings: &ShipperSettings) -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(settings.retry_max_delay)
        .with_jitter()
        .without_max_times()
        .build()
}

impl Shipper {
    async fn step(&mut self, destination: &Destination) -> Step {
        // Room for the mark this step may add.
        self.settle_marks(MAX_OPEN_MARKS - 1).await;
        let mut rows = match self.pending(self.batch_max_events).await {
            Ok(rows) => rows,
            Err(error) => {
                tracing::error!(%error, "reading pending events from the spool failed");
                return Step::Wait(REPROBE_EVERY);
            }
        };
        let short = rows.len() < self.batch_max_events;
        // The tail of a backlog (or nothing): let the marks land, so the gauge is exact and the
        // rows of a mark that failed are read again before the shipper goes idle.
        if short
            && self.settle_marks(0).await
            && let Ok(again) = self.pending(self.batch_max_events).await
        {
            rows = again;
        }
        // A short read is the tail of a backlog (or nothing): the count is cheap and exact then.
        if short
            || self
                .backlog_published_at
                .is_none_or(|at| at.elapsed() >= BACKLOG_PUBLISH_EVERY)
        {
            self.publish_backlog().await;
        }
        // Checked even with nothing to send: /readyz must say at start whether the key and the
        // metric are right, not when the first session ends.
        if let Destination::Lago(client) = destination
            && let Some(wait) = self.check_metric(client).await
        {
            return wait;
        }
        if rows.is_empty() {
            return Step::Idle;
        }
        let client = match destination {
            Destination::Stdout => return self.print(rows).await,
            Destination::Lago(client) => client,
        };
        // A part-full batch waits once for company (a full one, e.g. a backlog, goes at once).
        let rows = if rows.len() < self.batch_max_events && !self.settings.batch_linger.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(self.settings.batch_linger) => {}
                _ = self.draining.cancelled() => {}
            }
            match self.pending(self.batch_max_events).await {
                Ok(rows) => rows,
                Err(_) => rows,
            }
        } else {
            rows
        };
        let rows = match self.drop_unknown_subscriptions(client, rows).await {
            Ok(rows) if rows.is_empty() => return Step::Sent,
            Ok(rows) => rows,
            Err(wait) => return wait,
        };

        self.limiter.until_ready().await;
        let events: Vec<_> = rows.iter().map(|r| r.event.clone()).collect();
        let started = Instant::now();
        let result = client.post_batch(&events).await;
        metrics::histogram!("ocpp_lago_bridge_lago_request_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("ocpp_lago_bridge_lago_requests_total", "status_class" => status_class(&result))
            .increment(1);
        let decision = match &result {
            Ok(outcome) => decide(&rows, outcome),
            Err(error) => decide_error(&rows, error),
        };
        self.apply(client, &rows, decision).await
    }

    async fn apply(&mut self, client: &LagoClient, rows: &[OutboxRow], decision: Decision) -> Step {
        let ids: Vec<i64> = rows.iter().map(|r| r.outbox_id).collect();
        match decision {
            Decision::Settle { fates, alarm } => {
                if let Some(alarm) = alarm {
                    raise(&alarm);
                }
                self.readiness.clear_problem(READY_LAGO);
                self.backoff = backoff(&self.settings);
                let mut delivered = Vec::new();
                for fate in fates {
                    let Some(row) = rows.iter().find(|r| r.outbox_id == fate.outbox_id) else {
                        continue;
                    };
                    let fate = match fate.fate {
                        Fate::Verify => match client.get_event(&row.event.transaction_id).await {
                            Ok(stored) => resolve_verification(&row.event, stored.as_ref()),
                            Err(error) => {
                                // Stays pending: re-sent later, it meets value_already_exist again.
                                tracing::warn!(lago_transaction_id = %row.event.transaction_id, %error, "could not check the event Lago says it already has; will retry");
                                continue;
                            }
                        },
                        other => other,
                    };
                    match fate {
                        Fate::Delivered => delivered.push(row.outbox_id),
                        Fate::DeadLetter { reason, detail } => {
                            dead_letter(&self.writer, row, reason.as_str(), &detail).await
                        }
                        // Rolled back with the batch: still pending, re-read in order next step.
                        Fate::Resend | Fate::Verify => {}
                    }
                }
                if !delivered.is_empty() {
                    self.mark_delivered(delivered).await;
                }
                Step::Sent
            }
            Decision::RetryBatch { cause } => {
                metrics::counter!("ocpp_lago_bridge_lago_retries_total").increment(1);
                let delay = self.backoff.next().unwrap_or(self.settings.retry_max_delay);
                tracing::warn!(%cause, events = rows.len(), retry_in = ?delay, "Lago did not take the batch; the same events will be sent again");
                write(&self.writer, |done| Command::Attempted {
                    ids,
                    error: cause,
                    done,
                })
                .await;
                Step::Wait(delay)
            }
            Decision::HalveBatch {
                batch_max_events,
                alarm,
            } => {
                raise(&alarm);
                self.batch_max_events = batch_max_events.max(1);
                Step::Sent
            }
            Decision::Pause { pause } => {
                metrics::counter!("ocpp_lago_bridge_lago_retries_total").increment(1);
                tracing::warn!(pause = ?pause, "Lago rate limit: the shipper pauses");
                Step::Wait(pause)
            }
            Decision::PauseUntilOperator { cause } => match cause {
                OperatorCause::ApiKeyRejected { status } => self.key_refused(status),
                OperatorCause::Misconfigured { detail } => self.pause_for_operator(format!(
                    "Lago endpoint misconfigured: {detail}; check lago.api_url"
                )),
            },
        }
    }

    /// A refused API key pauses delivery under the `lago` readiness check, whichever request
    /// (metric check, subscription lookup or batch) met the refusal first.
    fn key_refused(&mut self, status: u16) -> Step {
        self.pause_for_operator(format!(
            "Lago refused the API key (HTTP {status}): fix lago.api_key_file / LAGO_API_KEY; nothing is dropped"
        ))
    }

    fn pause_for_operator(&mut self, what: String) -> Step {
        self.log_pause(&what);
        self.readiness.set_problem(READY_LAGO, what);
        // Probe through the metric check, which runs even when nothing is pending.
        self.metric_checked_at = None;
        Step::Wait(REPROBE_EVERY)
    }

    /// Logs a pause once when it starts (or its problem changes), then at most once a minute
    /// while Lago is re-probed every 5 s; events stay in the spool meanwhile.
    fn log_pause(&mut self, problem: &str) {
        match self.pause_log.paused(problem, Instant::now()) {
            pause::PauseLine::Started => tracing::error!(
                %problem,
                "delivery paused until an operator acts: events stay in the spool; re-probing every 5 s"
            ),
            pause::PauseLine::Reminder { paused_for } => tracing::error!(
                %problem,
                paused_for_secs = paused_for.as_secs(),
                "delivery still paused until an operator acts: events stay in the spool"
            ),
            pause::PauseLine::Quiet => {}
        }
    }

    /// Confirms (at start, then every few minutes) that the metric sums our `value` property:
    /// anything else silently bills 0. While it does not, delivery waits.
    async fn check_metric(&mut self, client: &LagoClient) -> Option<Step> {
        if self
            .metric_checked_at
            .is_some_and(|at| at.elapsed() < METRIC_RECHECK)
        {
            return None;
        }
        let code = &self.settings.metric_code;
        let problem = match client.get_billable_metric(code).await {
            Ok(Some(metric)) if metric.sums_field("value") => None,
            Ok(Some(metric)) => Some((
                READY_METRIC,
                format!(
                    "billable metric \"{code}\" is {} on field {}: it must be sum_agg on \"value\" or every event bills 0",
                    metric.aggregation_type,
                    metric
                        .field_name
                        .as_deref()
                        .map_or("(none)".into(), |f| format!("\"{f}\""))
                ),
            )),
            Ok(None) => Some((
                READY_METRIC,
                format!(
                    "billable metric {code:?} does not exist in Lago: create it (sum_agg on \"value\") or fix lago.metric_code"
                ),
            )),
            Err(LagoError::Unauthorized { status }) => return Some(self.key_refused(status)),
            Err(error) => {
                tracing::warn!(%error, "could not check the billable metric; will retry");
                return Some(Step::Wait(self.backoff.next().unwrap_or(REPROBE_EVERY)));
            }
        };
        match problem {
            None => {
                self.metric_checked_at = Some(Instant::now());
                self.readiness.clear_problem(READY_METRIC);
                self.readiness.clear_problem(READY_LAGO);
                if let Some(paused_for) = self.pause_log.resumed(Instant::now()) {
                    tracing::info!(
                        paused_for_secs = paused_for.as_secs(),
                        "delivery resumed: Lago accepts the key and the metric"
                    );
                }
                None
            }
            Some((check, problem)) => {
                self.log_pause(&problem);
                self.readiness.set_problem(check, problem);
                Some(Step::Wait(REPROBE_EVERY))
            }
        }
    }

    /// Lago accepts events for unknown subscriptions with 200 and the usage vanishes: check
    /// each subscription first and dead-letter (requeue-able) the events of unknown ones.
    async fn drop_unknown_subscriptions(
        &mut self,
        client: &LagoClient,
        rows: Vec<OutboxRow>,
    ) -> Result<Vec<OutboxRow>, Step> {
        let mut unknown = HashSet::new();
        let subscriptions: HashSet<String> = rows
            .iter()
            .map(|r| r.event.external_subscription_id.clone())
            .collect();
        for subscription in subscriptions {
            if self
                .known_subscriptions
                .get(&subscription)
                .is_some_and(|at| at.elapsed() < SUBSCRIPTION_TTL)
            {
                continue;
            }
            match client.get_subscription(&subscription).await {
                Ok(Some(_)) => {
                    self.known_subscriptions
                        .insert(subscription, Instant::now());
                }
                Ok(None) => {
                    unknown.insert(subscription);
                }
                Err(LagoError::Unauthorized { status }) => return Err(self.key_refused(status)),
                Err(error) => {
                    tracing::warn!(external_subscription_id = %subscription, %error, "could not check a subscription; will retry");
                    return Err(Step::Wait(self.backoff.next().unwrap_or(REPROBE_EVERY)));
                }
            }
        }
        let mut kept = Vec::with_capacity(rows.len());
        for row in rows {
            if unknown.contains(&row.event.external_subscription_id) {
                let detail = format!(
                    "Lago has no subscription {:?}: create it or fix the mapping, then `spool requeue --reason unknown_subscription`",
                    row.event.external_subscription_id
                );
                dead_letter(&self.writer, &row, "unknown_subscription", &detail).await;
            } else {
                kept.push(row);
            }
        }
        Ok(kept)
    }

    /// `--dry-run`: print instead of sending, then mark as handled so each is printed once.
    async fn print(&mut self, rows: Vec<OutboxRow>) -> Step {
        use std::io::Write;
        {
            let mut out = std::io::stdout().lock();
            for row in &rows {
                let line = serde_json::to_string(&row.event).expect("events serialise");
                let _ = writeln!(out, "{line}");
            }
            let _ = out.flush();
        }
        let ids = rows.iter().map(|r| r.outbox_id).collect();
        write(&self.writer, |done| Command::Delivered { ids, done }).await;
        Step::Sent
    }
}

async fn dead_letter(writer: &SpoolHandle, row: &OutboxRow, reason: &str, detail: &str) {
    metrics::counter!("ocpp_lago_bridge_dead_letters_total", "reason" => reason.to_string())
        .increment(1);
    tracing::error!(
        charge_box_id = %row.event.properties.charge_box_id,
        ocpp_transaction_id = row.event.properties.ocpp_transaction_id,
        lago_transaction_id = %row.event.transaction_id,
        external_subscription_id = %row.event.external_subscription_id,
        reason,
        %detail,
        "event moved to the dead letters: it is not billed until requeued (`spool dead-letters`)"
    );
    let (id, reason, detail) = (row.outbox_id, reason.to_string(), detail.to_string());
    write(writer, |done| Command::DeadLetter {
        id,
        reason,
        detail,
        done,
    })
    .await;
}

/// Sends a change to the writer and waits for it to be on disk.
async fn write(
    writer: &SpoolHandle,
    command: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Command,
) {
    let (done, result) = oneshot::channel();
    if writer.send(command(done)).await.is_err() {
        return;
    }
    if let Ok(Err(error)) = result.await {
        // The row stays pending: at worst the event is sent again, which Lago dedupes.
        tracing::error!(%error, "recording a delivery result in the spool failed");
    }
}

impl Shipper {
    /// The oldest pending rows, without those being marked delivered right now.
    async fn pending(&mut self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let marking = self.marking.clone();
        self.with_reader(move |store| store.pending_except(limit, &marking))
            .await
    }

    /// Sends "delivered" for rows Lago accepted to the writer, without waiting for the commit.
    async fn mark_delivered(&mut self, ids: Vec<i64>) {
        let (done, result) = oneshot::channel();
        let command = Command::Delivered {
            ids: ids.clone(),
            done,
        };
        if self.writer.send(command).await.is_err() {
            // The writer is gone (shutdown): the rows stay pending and go again after restart.
            return;
        }
        self.marking.extend(ids.iter().copied());
        self.marks.push_back(Mark { ids, done: result });
    }

    /// Takes in the marks that committed, then waits (oldest first) until at most `open` remain.
    /// True if a mark failed: its rows are pending again.
    async fn settle_marks(&mut self, open: usize) -> bool {
        let mut failed = false;
        loop {
            let over = self.marks.len() > open;
            let Some(mark) = self.marks.front_mut() else {
                break;
            };
            let result = match mark.done.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) if over => (&mut mark.done).await.ok(),
                Err(oneshot::error::TryRecvError::Empty) => return failed,
                Ok(result) => Some(result),
                Err(oneshot::error::TryRecvError::Closed) => None,
            };
            let mark = self
                .marks
                .pop_front()
                .expect("the front mark was just seen");
            for id in &mark.ids {
                self.marking.remove(id);
            }
            match result {
                Some(Ok(())) => metrics::counter!("ocpp_lago_bridge_events_delivered_total")
                    .increment(mark.ids.len() as u64),
                // The rows stay pending: at worst the events are sent again, which Lago dedupes.
                Some(Err(error)) => {
                    failed = true;
                    tracing::error!(%error, "recording a delivery result in the spool failed");
                }
                None => failed = true,
            }
        }
        failed
    }

    /// Publishes the backlog gauges (pending events, oldest pending age).
    async fn publish_backlog(&mut self) {
        let now = unix_now();
        self.backlog_published_at = Some(Instant::now());
        if let Ok((pending, oldest)) = self.with_reader(|store| store.backlog()).await {
            metrics::gauge!("ocpp_lago_bridge_spool_pending_events").set(pending as f64);
            let age = oldest.map_or(0, |created| (now - created).max(0));
            metrics::gauge!("ocpp_lago_bridge_spool_oldest_pending_age_seconds").set(age as f64);
        }
    }

    async fn with_reader<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self
            .reader
            .take()
            .expect("reader is put back after every use");
        let (store, out) = tokio::task::spawn_blocking(move || {
            let out = work(&store);
            (store, out)
        })
        .await
        .expect("spool reads do not panic");
        self.reader = Some(store);
        out
    }
}

fn raise(alarm: &Alarm) {
    let kind = match alarm {
        Alarm::AcceptedUnparseable { .. } => "accepted_unparseable",
        Alarm::TooManyEvents { .. } => "too_many_events",
        Alarm::UnattributedRejection { .. } => "unattributed_rejection",
    };
    metrics::counter!("ocpp_lago_bridge_lago_alarms_total", "kind" => kind).increment(1);
    tracing::error!(kind, alarm = ?alarm, "Lago answered outside its contract: check the Lago version and lago.batch_max_events");
}

fn status_class(result: &Result<BatchOutcome, LagoError>) -> &'static str {
    match result {
        Ok(BatchOutcome::Accepted(_) | BatchOutcome::AcceptedUnparseable { .. }) => "2xx",
        Ok(
            BatchOutcome::Rejected422 { .. }
            | BatchOutcome::TooManyEvents
            | BatchOutcome::Unauthorized { .. }
            | BatchOutcome::RateLimited { .. },
        ) => "4xx",
        Ok(BatchOutcome::Retryable(RetryCause::Status(status))) if *status >= 500 => "5xx",
        Ok(BatchOutcome::Retryable(RetryCause::Status(_))) => "4xx",
        Ok(BatchOutcome::Retryable(_)) | Err(_) => "error",
    }
}
