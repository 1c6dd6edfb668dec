//! I/O: leases pending events from the spool's outbox in order (`spool::lease`), batches them,
//! rate-limits and retries requests to Lago, and settles each lease with every row's fate.
//!
//! Every retry re-reads the same outbox rows, so the same events (same ids, values and
//! timestamps) are sent every time: delivery is idempotent by construction.
//!
//! Leases and settlements go to the spool's one writer thread, which serves them in the order
//! asked: the next lease always sees the last settlement, and the shipper never waits for a
//! settlement's commit itself. A lease excludes its rows from every other lease until settled,
//! so nothing is sent twice at once; a lease dropped unsettled is released, and a settlement
//! that fails to commit leaves its rows pending, to be sent again (Lago dedupes).
//!
//! Nothing here stalls on one event: a failed batch goes again in smaller batches, a row that
//! fails alone backs off alone (its state is in the outbox), a row whose outcome is unknown is
//! checked alone, and the metric and subscription lookups run in their own task (`lookups`).
//! The pure rules are in `outcome`.

mod lookups;
pub mod outcome;
pub mod pause;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::DefaultDirectRateLimiter;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::unix_now;
use crate::lago::{LagoClient, LagoError, RetryCause};
use crate::spool::lease::{Lease, OutboxError, OutboxHandle};
use crate::spool::store::{
    OutboxRow, Outcome, ReadyFilter, ReadyRow, RetryState, Store, StoreError,
};
use crate::telemetry::Readiness;
use lookups::{Metric, REPROBE_EVERY, Subscription, Triage};
use outcome::{
    Alarm, CheckStep, Decision, Fate, Job, OperatorCause, backed_off, check_by_id, check_listing,
    compose, decide, decide_error, grow, retry_rows, shrink,
};

/// Readiness check names owned by the shipper.
pub const READY_LAGO: &str = "lago";
pub const READY_METRIC: &str = "lago_metric";

/// How often an idle shipper looks for events queued by operator commands (`spool requeue`,
/// `replay`, `reconcile --backfill` write from another process: nothing notifies it), so that
/// they go out within a second. A look is one lease on an empty outbox: an index probe.
const IDLE_POLL: Duration = Duration::from_millis(500);
/// The backlog gauges and the `max_pending_age` check are refreshed this often.
const BACKLOG_PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// Most pending rows looked at per read: a long run of held rows costs a bounded read.
const SCAN_LIMIT: usize = 5_000;

/// The shipper's settings (from `[lago]`).
#[derive(Debug, Clone)]
pub struct ShipperSettings {
    pub metric_code: String,
    pub batch_max_events: usize,
    pub batch_linger: Duration,
    pub max_requests_per_second: u32,
    pub retry_max_delay: Duration,
    /// `/readyz` names `lago` while the oldest pending event is older than this.
    pub max_pending_age: Duration,
    /// The limiter to share with other Lago callers of the daemon (the periodic reconcile),
    /// so the bridge as a whole stays under `max_requests_per_second`; `None`: its own.
    pub shared_limiter: Option<Arc<DefaultDirectRateLimiter>>,
    /// Watches the shipper's helper tasks ([`TASK_LOOKUPS`], [`TASK_BACKLOG`]).
    pub supervisor: crate::supervise::Supervisor,
}

/// The supervised task name of the subscription and metric lookups (`/healthz`, logs,
/// `task_failures_total{task}`, `OCPP_LAGO_BRIDGE_TEST_PANIC`).
pub const TASK_LOOKUPS: &str = "shipper_lookups";
/// The supervised task name of the backlog gauges and `max_pending_age` check.
pub const TASK_BACKLOG: &str = "shipper_backlog";

/// Where events go.
pub enum Destination {
    /// Lago's events API.
    Lago(LagoClient),
    /// `--dry-run`: one JSON line per event on stdout.
    Stdout,
}

/// The shipper's view of the spool: a read-only connection for the backlog gauges, and the
/// writer thread's outbox for leases and settlements.
pub struct SpoolAccess {
    pub path: PathBuf,
    pub outbox: OutboxHandle,
    /// Fired by the writer whenever new events were committed.
    pub events_committed: Arc<Notify>,
}

/// What the shipper and its lookup task share: the one rate limit every Lago call goes
/// through, what is known of the metric and the subscriptions, and the `lago` readiness.
struct Shared {
    limiter: Arc<DefaultDirectRateLimiter>,
    metric: Mutex<Metric>,
    subscriptions: Mutex<std::collections::HashMap<String, Subscription>>,
    lookups_wanted: Notify,
    readiness: Readiness,
    health: Mutex<LagoHealth>,
    /// Whether a pause for an operator was logged, and when (reminders at most once a minute).
    pause_log: Mutex<pause::PauseLog>,
}

/// The reasons `/readyz` names `lago`, each set and cleared by what observes it.
#[derive(Debug, Default)]
struct LagoHealth {
    /// The last Lago request failed in transport, timed out or got a 5xx.
    reach: Option<String>,
    /// The oldest pending event is older than `lago.max_pending_age`.
    backlog: Option<String>,
    /// Lago refused the key, or the api_url is wrong: an operator must act.
    operator: Option<String>,
}

impl Shared {
    /// Changes the `lago` health and publishes it to `/readyz`.
    fn health(&self, change: impl FnOnce(&mut LagoHealth)) {
        let mut health = crate::lock(&self.health);
        change(&mut health);
        let reasons: Vec<&str> = [&health.operator, &health.reach, &health.backlog]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        if reasons.is_empty() {
            self.readiness.clear_problem(READY_LAGO);
        } else {
            self.readiness.set_problem(READY_LAGO, reasons.join("; "));
        }
    }

    /// Records whether Lago answered a request at all (any HTTP answer but a 5xx counts).
    fn observe<T>(&self, result: &Result<T, LagoError>) {
        match result {
            Err(LagoError::Transient(cause)) => self.unreachable(cause),
            _ => self.health(|h| h.reach = None),
        }
    }

    fn unreachable(&self, cause: &RetryCause) {
        let reason = match cause {
            RetryCause::Timeout => {
                "Lago did not answer within lago.request_timeout; events wait in the spool".into()
            }
            other => format!("Lago unreachable or failing ({other}); events wait in the spool"),
        };
        self.health(|h| h.reach = Some(reason));
    }

    /// A refused API key pauses delivery under the `lago` readiness check, whichever request
    /// (metric check, subscription lookup or batch) met the refusal first.
    fn key_refused(&self, status: u16) {
        self.operator_problem(format!(
            "Lago refused the API key (HTTP {status}): fix lago.api_key_file / LAGO_API_KEY; nothing is dropped"
        ));
    }

    fn misconfigured(&self, detail: String) {
        self.operator_problem(format!(
            "Lago endpoint misconfigured: {detail}; check lago.api_url"
        ));
    }

    fn operator_problem(&self, what: String) {
        self.log_pause(&what);
        self.health(|h| h.operator = Some(what));
        // The metric check re-probes; until it passes, nothing is sent.
        let mut metric = crate::lock(&self.metric);
        if metric.allows_sending() {
            *metric = Metric::Blocked {
                retry_at: Instant::now() + REPROBE_EVERY,
            };
        }
    }
}

impl Shared {
    /// Logs a pause once when it starts (or its problem changes), then at most once a minute
    /// while Lago is re-probed every 5 s; events stay in the spool meanwhile.
    fn log_pause(&self, problem: &str) {
        let line = crate::lock(&self.pause_log).paused(problem, Instant::now());
        match line {
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

    /// Delivery works again: says so once, with how long it was paused.
    fn log_resumed(&self) {
        let resumed = crate::lock(&self.pause_log).resumed(Instant::now());
        if let Some(paused_for) = resumed {
            tracing::info!(
                paused_for_secs = paused_for.as_secs(),
                "delivery resumed: Lago accepts the key and the metric"
            );
        }
    }
}

/// Our subscription's events of our metric at the event's own second, every page up to
/// `LIST_MAX_PAGES`, each request under the shared rate limit.
async fn list_at(
    client: &LagoClient,
    limiter: &DefaultDirectRateLimiter,
    ours: &crate::event::LagoEvent,
) -> Result<Vec<crate::lago::schema::StoredEvent>, LagoError> {
    let mut pages = client.list_events(&crate::lago::EventsWindow {
        external_subscription_id: &ours.external_subscription_id,
        code: &ours.code,
        from: ours.timestamp,
        to: ours.timestamp,
    })?;
    let mut events = Vec::new();
    while pages.pages_read() < crate::lago::LIST_MAX_PAGES {
        limiter.until_ready().await;
        match pages.next_page().await? {
            Some(page) => events.extend(page),
            None => break,
        }
    }
    Ok(events)
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
    let reader = match crate::spool::open_read_only(&spool.path).await {
        Ok(store) => store,
        Err(error) => {
            tracing::error!(%error, "the shipper cannot read the spool: nothing is delivered until restart");
            readiness.set_problem(READY_LAGO, format!("spool unreadable: {error}"));
            return;
        }
    };
    let shared = Arc::new(Shared {
        limiter: settings
            .shared_limiter
            .clone()
            .unwrap_or_else(|| crate::lago::rate_limiter(settings.max_requests_per_second)),
        metric: Mutex::new(match destination {
            Destination::Lago(_) => Metric::Unchecked,
            Destination::Stdout => Metric::Ok {
                until: Instant::now(),
            },
        }),
        subscriptions: Mutex::new(std::collections::HashMap::new()),
        lookups_wanted: Notify::new(),
        readiness,
        health: Mutex::new(LagoHealth::default()),
        pause_log: Mutex::new(pause::PauseLog::default()),
    });
    let stop_helpers = shutdown.child_token();
    let _stop_helpers_on_return = stop_helpers.clone().drop_guard();
    // Supervised like the shipper itself: without the lookups no unchecked subscription ever
    // clears (billing stops silently), without the backlog watch the pending-age readiness
    // freezes. Either ending or panicking while the shipper runs fails the daemon, naming it
    // (issue 12 item 1); when the shipper itself ends, they end with it, unreported.
    if let Destination::Lago(client) = &destination {
        tokio::spawn(settings.supervisor.watch_helper(
            TASK_LOOKUPS,
            lookups::run(
                client.clone(),
                shared.clone(),
                settings.metric_code.clone(),
                settings.retry_max_delay,
                stop_helpers.clone(),
            ),
            stop_helpers.clone(),
        ));
    }
    tokio::spawn(settings.supervisor.watch_helper(
        TASK_BACKLOG,
        watch_backlog(
            spool.path.clone(),
            shared.clone(),
            settings.max_pending_age,
            stop_helpers.clone(),
        ),
        stop_helpers.clone(),
    ));
    let mut shipper = Shipper {
        reader: Some(reader),
        outbox: spool.outbox,
        shared,
        failures: 0,
        batch_size: settings.batch_max_events,
        settings,
        draining,
        dry_run: matches!(destination, Destination::Stdout),
        prefetched: None,
    };
    let wake = spool.events_committed;
    loop {
        let progressed = tokio::select! {
            progressed = shipper.step(&destination) => progressed,
            // A job cut short drops its lease, which releases it; settlements already asked
            // for are committed by the writer before it ends.
            _ = shutdown.cancelled() => return,
        };
        let pause = match progressed {
            Step::Idle => None,
            Step::Sent => continue,
            Step::Wait(pause) => Some(pause),
        };
        tokio::select! {
            _ = wake.notified(), if pause.is_none() => {}
            // Idle, it still looks now and then: `spool requeue` and `replay` write from outside,
            // and rows backing off come due.
            _ = tokio::time::sleep(pause.unwrap_or(IDLE_POLL)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Keeps the backlog gauges current within a second, and the `lago` readiness told when the
/// oldest pending event is older than `max_pending_age`, whatever the shipper is waiting for.
async fn watch_backlog(
    path: PathBuf,
    shared: Arc<Shared>,
    max_pending_age: Duration,
    stop: CancellationToken,
) {
    let store = match crate::spool::open_read_only(&path).await {
        Ok(store) => Arc::new(Mutex::new(store)),
        Err(error) => {
            tracing::error!(%error, "the backlog gauges cannot read the spool");
            return;
        }
    };
    let mut tick = tokio::time::interval(BACKLOG_PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let store = store.clone();
        let backlog = tokio::task::spawn_blocking(move || crate::lock(&store).backlog()).await;
        let Ok(Ok((pending, oldest))) = backlog else {
            continue;
        };
        let age = publish_backlog(pending, oldest);
        let limit = max_pending_age.as_secs();
        let stale = u64::try_from(age).is_ok_and(|age| pending > 0 && age > limit);
        shared.health(|h| {
            h.backlog = stale.then(|| {
                format!(
                    "the oldest of {pending} pending events is {age} s old, over lago.max_pending_age ({limit} s)"
                )
            })
        });
    }
}

/// Sets the backlog gauges; returns the oldest pending event's age in seconds.
fn publish_backlog(pending: i64, oldest: Option<i64>) -> i64 {
    let age = oldest.map_or(0, |created| unix_now().saturating_sub(created).max(0));
    metrics::gauge!("ocpp_lago_bridge_spool_pending_events").set(pending as f64);
    metrics::gauge!("ocpp_lago_bridge_spool_oldest_pending_age_seconds").set(age as f64);
    age
}

enum Step {
    /// Nothing pending.
    Idle,
    /// A job was settled; look for more at once.
    Sent,
    /// Try again after this long (retry, 429, paused for an operator, rows backing off).
    Wait(Duration),
}

struct Shipper {
    /// Read-only: the backlog, when idle.
    reader: Option<Store>,
    outbox: OutboxHandle,
    shared: Arc<Shared>,
    /// Failed requests in a row, for the shipper-wide backoff; 0 after any success.
    failures: u32,
    /// Halved on `too_many_events`, grown by a tenth of the setting on every batch taken; never
    /// above the setting.
    batch_size: usize,
    settings: ShipperSettings,
    draining: CancellationToken,
    /// `--dry-run`: events are printed, no subscription is looked up.
    dry_run: bool,
    /// The next lease, asked for before the last one's settlement so that it is read while the
    /// writer commits that settlement (a backlog drains at the rate limit, not at one request
    /// plus one fsync per batch). Only asked when every row of the last lease left `pending`,
    /// so it is exactly what a lease after the settlement would return.
    prefetched: Option<PendingLease>,
}

/// A lease asked for and not yet answered.
type PendingLease =
    std::pin::Pin<Box<dyn Future<Output = Result<Lease, OutboxError>> + Send + 'static>>;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Shipper {
    async fn step(&mut self, destination: &Destination) -> Step {
        if !crate::lock(&self.shared.metric).allows_sending() {
            // The lookup task proves the metric (and the key, and the URL) first. A lease asked
            // for meanwhile is released.
            self.prefetched = None;
            return Step::Wait(Duration::from_millis(200));
        }
        let mut lease = match self.lease(self.batch_size).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return self.idle().await,
            Err(error) => {
                tracing::error!(%error, "leasing pending events from the spool failed");
                return Step::Wait(REPROBE_EVERY);
            }
        };
        let client = match destination {
            Destination::Stdout => return self.print(lease),
            Destination::Lago(client) => client,
        };
        // A part-full batch waits once for company (a full one, e.g. a backlog, goes at once).
        if lease.rows().len() < self.batch_size
            && !lease.rows()[0].retry.needs_check
            && !self.settings.batch_linger.is_zero()
        {
            tokio::select! {
                _ = tokio::time::sleep(self.settings.batch_linger) => {}
                _ = self.draining.cancelled() => {}
            }
            // Released first (the writer serves requests in order), then leased again with
            // whatever arrived meanwhile.
            drop(lease);
            lease = match self.lease(self.batch_size).await {
                Ok(Some(lease)) => lease,
                Ok(None) => return self.idle().await,
                Err(error) => {
                    tracing::error!(%error, "leasing pending events from the spool failed");
                    return Step::Wait(REPROBE_EVERY);
                }
            };
        }
        // Rows of the lease the job leaves out are released untouched when it is settled.
        match compose(lease.rows().to_vec(), self.batch_size) {
            Job::Nothing => {
                drop(lease);
                self.idle().await
            }
            Job::Check(row) => self.check(client, lease, *row).await,
            Job::Send(rows) => self.send(client, lease, rows).await,
        }
    }

    /// Nothing can go now: publish the exact backlog, then wait for new events, or for the
    /// earliest row backing off or held for a lookup.
    async fn idle(&mut self) -> Step {
        if let Ok((pending, oldest)) = self.with_reader(|store| store.backlog()).await {
            publish_backlog(pending, oldest);
            if pending > 0 {
                // Rows wait (backing off, held for a lookup): look again soon.
                return Step::Wait(Duration::from_millis(250));
            }
        }
        Step::Idle
    }

    /// What to lease now: up to `limit` rows due, none of a held subscription.
    fn filter(&self, limit: usize) -> ReadyFilter {
        ReadyFilter {
            limit,
            now_ms: now_ms(),
            held_subscriptions: self.shared.held_subscriptions(),
            scan_limit: SCAN_LIMIT,
        }
    }

    /// Leases the oldest rows ready to go now, of confirmed subscriptions: rows of unknown ones
    /// are dead-lettered, rows of unconfirmed ones stay pending while their lookup runs.
    /// `None`: nothing can go now.
    async fn lease(&mut self, limit: usize) -> Result<Option<Lease>, OutboxError> {
        for _ in 0..3 {
            let lease = match self.prefetched.take() {
                Some(asked) => asked.await?,
                None => self.outbox.lease_batch(self.filter(limit)).await?,
            };
            if lease.rows().is_empty() {
                return Ok(None);
            }
            if self.dry_run {
                return Ok(Some(lease));
            }
            let triage = self.shared.triage_subscriptions(
                lease
                    .rows()
                    .iter()
                    .map(|r| r.row.event.external_subscription_id.as_str()),
            );
            let mut dead = Vec::new();
            let mut held = false;
            for row in lease.rows() {
                match triage[&row.row.event.external_subscription_id] {
                    Triage::Send => {}
                    Triage::Hold => held = true,
                    Triage::Unknown => {
                        let detail = format!(
                            "Lago has no subscription {:?}: create it or fix the mapping, then `spool requeue --reason unknown_subscription`",
                            row.row.event.external_subscription_id
                        );
                        dead.push(dead_letter(&row.row, "unknown_subscription", &detail));
                    }
                }
            }
            if dead.is_empty() && !held {
                return Ok(Some(lease));
            }
            // Dead-letter the unknown, release the rest, and lease again: the held
            // subscriptions are in the filter now, so the others fill the batch.
            self.settle(lease, dead);
        }
        Ok(None)
    }
}

impl Shipper {
    /// POSTs one batch and settles its lease with Lago's answer.
    async fn send(&mut self, client: &LagoClient, lease: Lease, rows: Vec<ReadyRow>) -> Step {
        self.shared.limiter.until_ready().await;
        let events: Vec<_> = rows.iter().map(|r| r.row.event.clone()).collect();
        let result = client.post_batch(&events).await;
        match &result {
            // `post_batch` answers transport trouble, timeouts and 5xx as a retryable outcome,
            // not an error: it still means Lago did not answer, so `/readyz` must say so (else
            // each failed batch during an outage would mark Lago reachable again).
            Ok(crate::lago::BatchOutcome::Retryable(cause)) => self.shared.unreachable(cause),
            other => self.shared.observe(other),
        }
        let plain: Vec<OutboxRow> = rows.iter().map(|r| r.row.clone()).collect();
        let decision = match &result {
            Ok(outcome) => decide(&plain, outcome),
            Err(error) => decide_error(&plain, error),
        };
        match decision {
            Decision::Settle { fates, alarm } => {
                if let Some(alarm) = alarm {
                    raise(&alarm);
                }
                self.failures = 0;
                self.batch_size = grow(self.batch_size, self.settings.batch_max_events);
                let mut outcomes = Vec::new();
                for fate in fates {
                    let Some(row) = rows.iter().find(|r| r.row.outbox_id == fate.outbox_id) else {
                        continue;
                    };
                    match fate.fate {
                        Fate::Delivered => outcomes.push((row.row.outbox_id, Outcome::Delivered)),
                        Fate::DeadLetter { reason, detail } => {
                            outcomes.push(dead_letter(&row.row, reason.as_str(), &detail))
                        }
                        // Lago may hold it: checked alone before anything else happens to it.
                        Fate::Verify => outcomes.push((
                            row.row.outbox_id,
                            Outcome::Retry {
                                state: RetryState {
                                    needs_check: true,
                                    ..row.retry
                                },
                                error: "value_already_exist: to be checked".into(),
                            },
                        )),
                        // Rolled back with the batch: still pending, leased again in order.
                        Fate::Resend => {}
                    }
                }
                let all_leave_pending = lease.rows().iter().all(|r| {
                    outcomes.iter().any(|(id, outcome)| {
                        *id == r.row.outbox_id
                            && matches!(outcome, Outcome::Delivered | Outcome::DeadLetter { .. })
                    })
                });
                if all_leave_pending {
                    self.prefetched = Some(Box::pin(
                        self.outbox.lease_batch(self.filter(self.batch_size)),
                    ));
                }
                self.settle(lease, outcomes);
                Step::Sent
            }
            Decision::Retry { cause, alarm } => {
                if let Some(alarm) = alarm {
                    raise(&alarm);
                }
                metrics::counter!("ocpp_lago_bridge_lago_retries_total").increment(1);
                let delay = self.failed();
                let updates = retry_rows(&rows, now_ms(), self.settings.retry_max_delay, delay);
                let next_batch = updates.first().and_then(|(_, s)| s.max_batch).unwrap_or(1);
                tracing::warn!(%cause, events = rows.len(), retry_in = %humantime::format_duration(delay), next_batch, "Lago did not take the batch; its events go again in smaller batches");
                self.settle(lease, retried(updates, &cause));
                Step::Wait(delay)
            }
            Decision::ShrinkBatches { alarm } => {
                raise(&alarm);
                self.batch_size = shrink(self.batch_size, rows.len());
                drop(lease);
                Step::Sent
            }
            Decision::Pause { pause } => {
                metrics::counter!("ocpp_lago_bridge_lago_retries_total").increment(1);
                tracing::warn!(pause = %humantime::format_duration(pause), "Lago rate limit: the shipper pauses");
                Step::Wait(pause)
            }
            Decision::PauseUntilOperator { cause } => {
                match cause {
                    OperatorCause::ApiKeyRejected { status } => self.shared.key_refused(status),
                    OperatorCause::Misconfigured { detail } => self.shared.misconfigured(detail),
                }
                Step::Wait(REPROBE_EVERY)
            }
        }
    }

    /// Checks alone a row Lago may already hold: `GET /events/{id}`, and when that names
    /// another subscription, our subscription's events at its timestamp. A check that fails
    /// backs off this row only.
    async fn check(&mut self, client: &LagoClient, lease: Lease, row: ReadyRow) -> Step {
        let ours = &row.row.event;
        self.shared.limiter.until_ready().await;
        let by_id = client.get_event(&ours.transaction_id).await;
        self.shared.observe(&by_id);
        let fate = match by_id.map(|stored| check_by_id(ours, stored.as_ref())) {
            Ok(CheckStep::Done(fate)) => Ok(fate),
            Ok(CheckStep::ListOurs) => {
                let listed = list_at(client, &self.shared.limiter, ours).await;
                self.shared.observe(&listed);
                listed.map(|listed| check_listing(ours, &listed))
            }
            Err(error) => Err(error),
        };
        let result = match &fate {
            Ok(Fate::Delivered) => "delivered",
            Ok(Fate::DeadLetter { .. }) => "collision",
            Ok(Fate::Resend | Fate::Verify) => "not_found",
            Err(_) => "failed",
        };
        metrics::counter!("ocpp_lago_bridge_lago_checks_total", "result" => result).increment(1);
        match fate {
            Ok(Fate::Delivered) => {
                self.failures = 0;
                self.settle(lease, vec![(row.row.outbox_id, Outcome::Delivered)]);
                Step::Sent
            }
            Ok(Fate::DeadLetter { reason, detail }) => {
                self.failures = 0;
                let outcome = dead_letter(&row.row, reason.as_str(), &detail);
                self.settle(lease, vec![outcome]);
                Step::Sent
            }
            Ok(Fate::Resend | Fate::Verify) => {
                // Lago holds nothing of ours under that key: send it again (alone, after its
                // backoff, so a loop of "exists" / "not found" stays slow and visible).
                tracing::warn!(
                    charge_box_id = %ours.properties.charge_box_id,
                    lago_transaction_id = %ours.transaction_id,
                    external_subscription_id = %ours.external_subscription_id,
                    "Lago shows no event of ours under this transaction_id; sending it again"
                );
                let state = RetryState {
                    needs_check: false,
                    ..backed_off(row.retry, now_ms(), self.settings.retry_max_delay)
                };
                self.settle(
                    lease,
                    retried(
                        vec![(row.row.outbox_id, state)],
                        "checked: not in Lago, to be sent again",
                    ),
                );
                Step::Sent
            }
            Err(LagoError::Unauthorized { status }) => {
                self.shared.key_refused(status);
                Step::Wait(REPROBE_EVERY)
            }
            Err(LagoError::RateLimited { pause }) => Step::Wait(
                pause
                    .unwrap_or(outcome::DEFAULT_RATE_LIMIT_PAUSE)
                    .min(outcome::MAX_RATE_LIMIT_PAUSE),
            ),
            Err(error) => {
                if let LagoError::WrongUrl { .. } = error {
                    self.shared.misconfigured(error.to_string());
                }
                let state = backed_off(row.retry, now_ms(), self.settings.retry_max_delay);
                tracing::warn!(
                    lago_transaction_id = %ours.transaction_id,
                    %error,
                    retry_in_ms = state.backoff_ms,
                    "could not check an event Lago may already hold; it waits alone, the others go"
                );
                self.settle(
                    lease,
                    retried(vec![(row.row.outbox_id, state)], &error.to_string()),
                );
                Step::Sent
            }
        }
    }

    /// One more failure in a row: the shipper-wide wait before the next request.
    fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        lookups::backoff(self.settings.retry_max_delay, self.failures)
    }

    /// Settles `lease` with `outcomes` without waiting for the commit (the next lease comes
    /// after it anyway); the delivered counter and a failure are taken care of when it lands.
    fn settle(&self, lease: Lease, outcomes: Vec<(i64, Outcome)>) {
        let committed = self.outbox.settle(lease, outcomes);
        tokio::spawn(async move {
            match committed.await {
                Ok(Ok(settled)) => metrics::counter!("ocpp_lago_bridge_events_delivered_total")
                    .increment(settled.delivered as u64),
                // The rows stay pending: at worst the events are sent again, which Lago dedupes.
                Ok(Err(error)) => {
                    tracing::error!(%error, "recording a delivery result in the spool failed")
                }
                // The writer has stopped (shutdown): the rows stay pending, sent after restart.
                Err(_) => {}
            }
        });
    }

    /// `--dry-run`: print instead of sending, then settle as delivered so each is printed once.
    fn print(&mut self, lease: Lease) -> Step {
        use std::io::Write;
        {
            let mut out = std::io::stdout().lock();
            for row in lease.rows() {
                let line = serde_json::to_string(&row.row.event).expect("events serialise");
                let _ = writeln!(out, "{line}");
            }
            let _ = out.flush();
        }
        let outcomes = lease
            .rows()
            .iter()
            .map(|r| (r.row.outbox_id, Outcome::Delivered))
            .collect();
        self.settle(lease, outcomes);
        Step::Sent
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

/// Failed attempts: each row's new retry state, with the error that caused it.
fn retried(updates: Vec<(i64, RetryState)>, error: &str) -> Vec<(i64, Outcome)> {
    updates
        .into_iter()
        .map(|(id, state)| {
            (
                id,
                Outcome::Retry {
                    state,
                    error: error.to_string(),
                },
            )
        })
        .collect()
}

/// A row that can never be delivered as it is: logged at ERROR and counted here, moved to the
/// dead letters by the settlement that carries the returned outcome.
fn dead_letter(row: &OutboxRow, reason: &str, detail: &str) -> (i64, Outcome) {
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
    (
        row.outbox_id,
        Outcome::DeadLetter {
            reason: reason.to_string(),
            detail: detail.to_string(),
        },
    )
}

fn raise(alarm: &Alarm) {
    // What happened in words for the log line (no Rust debug text in messages for people).
    let (kind, detail) = match alarm {
        Alarm::AcceptedUnparseable { detail } => ("accepted_unparseable", detail.clone()),
        Alarm::TooManyEvents { refused_len } => (
            "too_many_events",
            format!("Lago refused a batch of {refused_len} events as too many"),
        ),
        Alarm::UnattributedRejection { detail } => ("unattributed_rejection", detail.clone()),
    };
    metrics::counter!("ocpp_lago_bridge_lago_alarms_total", "kind" => kind).increment(1);
    tracing::error!(kind, %detail, "Lago answered outside its contract: check the Lago version, a proxy in front of it and lago.batch_max_events");
}
