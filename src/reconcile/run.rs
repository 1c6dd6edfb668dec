//! The I/O of reconcile: SteVe's stopped sessions, the spool's view of them, Lago's events of
//! every involved subscription (page by page, under the Lago rate limit), the backfill into
//! the outbox, and the daemon's periodic audit.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use governor::DefaultDirectRateLimiter;
use tokio_util::sync::CancellationToken;

use super::{Finding, LagoTally, Status, classify, orphans};
use crate::clock::unix_now;
use crate::config::Config;
use crate::event::{LagoEvent, ORIGIN_RECONCILE};
use crate::lago::{EventsWindow, LagoClient, LagoError};
use crate::ledger::{BillingRules, Ledger};
use crate::spool::store::{BackfillOutcome, ReconcileView, Store, StoreError};
use crate::steve::{SteveClient, SteveError, SteveSession};
use crate::tap::{StartRecord, StopRecord, TapKind, TapRecord};

/// Why an audit could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The configuration does not allow an audit (exit 78).
    #[error("{0}")]
    Config(String),
    /// The command line asks for something impossible, e.g. a window that ends before it
    /// starts (exit 2, as clap's usage errors).
    #[error("{0}")]
    Usage(String),
    /// SteVe could not be asked (exit 69).
    #[error("SteVe: {0}")]
    Steve(#[from] SteveError),
    /// Lago could not be asked (exit 69).
    #[error("Lago: {0}")]
    Lago(#[from] LagoError),
    /// The spool could not be read or written (exit 1).
    #[error("spool: {0}")]
    Spool(#[from] StoreError),
}

impl ReconcileError {
    /// The process exit code: 78 bad config, 2 usage, 69 a service unreachable, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ReconcileError::Config(_) => 78,
            ReconcileError::Usage(_) => 2,
            ReconcileError::Steve(_) | ReconcileError::Lago(_) => 69,
            ReconcileError::Spool(_) => 1,
        }
    }
}

/// What an audit reads from and writes to.
pub struct Sources {
    pub steve: SteveClient,
    pub lago: LagoClient,
    /// Every Lago request takes a permit first (the daemon passes the shipper's).
    pub lago_limiter: Arc<DefaultDirectRateLimiter>,
    /// Every SteVe request takes a permit first (`steve.max_requests_per_second`; the daemon
    /// passes the one it shares with start recovery).
    pub steve_limiter: Arc<DefaultDirectRateLimiter>,
    pub rules: BillingRules,
    pub spool_path: PathBuf,
    pub max_session_length: Duration,
}

/// A completed audit.
#[derive(Debug, Clone)]
pub struct Audit {
    pub findings: Vec<Finding>,
    /// SteVe sessions stopped in the window.
    pub sessions: usize,
    /// Lago list requests made (pages).
    pub lago_requests: u64,
    /// SteVe requests made.
    pub steve_requests: u64,
    /// Distinct subscriptions listed.
    pub subscriptions: usize,
    /// SteVe's records of the `missing` sessions, for the backfill.
    pub missing: Vec<SteveSession>,
}

/// What `--backfill` did.
#[derive(Debug, Clone, Default)]
pub struct Backfill {
    /// Events newly queued or set pending again: (external_subscription_id, transaction_id).
    pub queued: Vec<(String, String)>,
    /// Sessions it could not queue anything for, with why.
    pub not_queued: Vec<(String, i64, String)>,
}

impl Sources {
    /// The sources a config names; SteVe's REST API and the Lago key are required. A limiter
    /// not given is made from the config (the `reconcile` command runs alone); the daemon gives
    /// both, shared with the shipper (Lago) and start recovery (SteVe).
    pub fn from_config(
        config: &Config,
        lago_limiter: Option<Arc<DefaultDirectRateLimiter>>,
        steve_limiter: Option<Arc<DefaultDirectRateLimiter>>,
    ) -> Result<Sources, ReconcileError> {
        let api_url = config
            .steve
            .api_url
            .as_ref()
            .map(|url| url.url())
            .ok_or_else(|| {
                ReconcileError::Config(
                    "reconcile needs SteVe's REST API: set [steve] api_url and its credentials"
                        .into(),
                )
            })?;
        let auth = crate::secrets::steve_auth(&config.steve).map_err(ReconcileError::Config)?;
        let steve = SteveClient::new(api_url, auth, config.steve.request_timeout)?;
        let lago = crate::secrets::lago_client(&config.lago, crate::secrets::LagoTimeouts::Command)
            .map_err(|e| ReconcileError::Config(e.to_string()))?;
        let rules = config
            .billing_rules()
            .map_err(|problems| ReconcileError::Config(problems.join("; ")))?;
        Ok(Sources {
            steve,
            lago,
            lago_limiter: lago_limiter
                .unwrap_or_else(|| crate::lago::rate_limiter(config.lago.max_requests_per_second)),
            steve_limiter: steve_limiter.unwrap_or_else(|| {
                crate::steve::rate_limiter(config.steve.max_requests_per_second)
            }),
            rules,
            spool_path: config.spool.path.clone(),
            max_session_length: config.reconcile.max_session_length,
        })
    }
}

/// The event(s) live billing would have derived for a SteVe session: its record fed as a Start
/// and a Stop tap record, received when SteVe says they happened, into a fresh ledger with the
/// daemon's rules (same templates, subscription map and id derivation). Anomalies (e.g. an
/// unmapped idTag) come back as their reasons, with any held event.
pub fn derive(session: &SteveSession, rules: &BillingRules) -> (Vec<LagoEvent>, Vec<String>) {
    let started = session.started_at.unwrap_or(session.stopped_at);
    let start = TapRecord {
        charge_box_id: session.charge_box_id.clone(),
        received_at: started,
        kind: TapKind::Start(StartRecord {
            connector_id: session.connector_id,
            id_tag: session.id_tag.clone(),
            meter_start_wh: session.start_wh,
            timestamp: session.started_at,
            ocpp_transaction_id: session.ocpp_transaction_id,
            id_tag_status: "Accepted".into(),
        }),
    };
    let stop = TapRecord {
        charge_box_id: session.charge_box_id.clone(),
        received_at: session.stopped_at,
        kind: TapKind::Stop(StopRecord {
            ocpp_transaction_id: session.ocpp_transaction_id,
            meter_stop_wh: session.stop_wh,
            timestamp: Some(session.stopped_at),
            id_tag: None,
            reason: None,
            begin_reading: None,
            readings: Vec::new(),
        }),
    };
    let mut ledger = Ledger::new();
    let mut events = Vec::new();
    let mut anomalies = Vec::new();
    for record in [start, stop] {
        let applied = ledger.apply(&record, rules);
        events.extend(applied.events);
        for anomaly in applied.anomalies {
            anomalies.push(format!("{}: {}", anomaly.reason.as_str(), anomaly.detail));
        }
    }
    (events, anomalies)
}

/// The subscription the rules derive for a session (`None` when they derive none).
pub fn derived_subscription(session: &SteveSession, rules: &BillingRules) -> Option<String> {
    let (events, _) = derive(session, rules);
    events
        .into_iter()
        .map(|e| e.external_subscription_id)
        .find(|s| !s.is_empty())
}

async fn spool_view(path: PathBuf, since: i64) -> Result<ReconcileView, ReconcileError> {
    tokio::task::spawn_blocking(move || {
        if !path.exists() {
            // No spool yet: the bridge holds nothing of any session.
            return Ok(ReconcileView::default());
        }
        // Read-only: an audit never creates, migrates or writes the spool.
        Store::open_read_only(&path)?.reconcile_view(since)
    })
    .await
    .map_err(|e| ReconcileError::Config(format!("spool reader task: {e}")))?
    .map_err(ReconcileError::Spool)
}

/// Audits the sessions SteVe recorded as stopped in `[from, to]` (unix seconds).
pub async fn audit(sources: &Sources, from: i64, to: i64) -> Result<Audit, ReconcileError> {
    if to < from {
        return Err(ReconcileError::Usage(format!(
            "the window ends before it starts: --to {to} is before --from {from} (unix seconds)"
        )));
    }
    let reach = i64::try_from(sources.max_session_length.as_secs()).unwrap_or(i64::MAX);
    let earliest = from.saturating_sub(reach);
    // SteVe's period filters on the start: sessions started up to max_session_length before
    // the window are asked for too, then only those stopped in the window are kept.
    sources.steve_limiter.until_ready().await;
    let mut steve_requests = 1;
    let sessions: Vec<SteveSession> = sources
        .steve
        .stopped_started_between(earliest, to)
        .await?
        .into_iter()
        .filter(|s| s.stopped_at >= from && s.stopped_at <= to)
        .collect();
    let view = spool_view(sources.spool_path.clone(), earliest).await?;

    let mut subscriptions: BTreeSet<String> = view.subscriptions.clone();
    let mut derived = std::collections::HashMap::new();
    for session in &sessions {
        if let Some(sub) = derived_subscription(session, &sources.rules) {
            subscriptions.insert(sub.clone());
            derived.insert(
                (session.charge_box_id.clone(), session.ocpp_transaction_id),
                sub,
            );
        }
    }

    // A session's events count whatever their timestamp: incremental events lie between its
    // start and stop, a bridge-dated one may be later than SteVe's stop. The listing reaches
    // max_session_length on both sides of the window.
    let mut lago = LagoTally::default();
    let mut lago_requests = 0u64;
    for subscription in &subscriptions {
        let mut pages = sources.lago.list_events(&EventsWindow {
            external_subscription_id: subscription,
            code: &sources.rules.metric_code,
            from: earliest,
            to: to.saturating_add(reach),
        })?;
        loop {
            sources.lago_limiter.until_ready().await;
            let page = pages.next_page().await;
            lago_requests += 1;
            match page? {
                Some(events) => {
                    for event in &events {
                        if event.code == sources.rules.metric_code {
                            lago.add(event, (from, to));
                        }
                    }
                }
                None => break,
            }
        }
    }

    let mut unknown = Vec::new();
    for key in orphans(&sessions, &lago) {
        sources.steve_limiter.until_ready().await;
        steve_requests += 1;
        if !sources.steve.knows(&key.0, key.1).await? {
            unknown.push(key);
        }
    }
    let findings = classify(
        &sessions,
        &lago,
        &view,
        &|s: &SteveSession| {
            derived
                .get(&(s.charge_box_id.clone(), s.ocpp_transaction_id))
                .cloned()
        },
        &unknown,
    );
    let missing = sessions
        .iter()
        .zip(&findings)
        .filter(|(_, f)| f.status == Status::Missing)
        .map(|(s, _)| s.clone())
        .collect();
    Ok(Audit {
        sessions: sessions.len(),
        missing,
        findings,
        lago_requests,
        steve_requests,
        subscriptions: subscriptions.len(),
    })
}

/// Queues, for each `missing` session of `sessions`, the events live billing would have
/// derived, marked `origin = "reconcile"`; each such finding becomes `pending` (queued) or
/// says why nothing was. `mismatch` is never touched: it needs a person.
pub async fn backfill(
    sources: &Sources,
    findings: &mut [Finding],
    sessions: &[SteveSession],
) -> Result<Backfill, ReconcileError> {
    let mut to_queue: Vec<(usize, Vec<LagoEvent>, Vec<String>)> = Vec::new();
    for (i, finding) in findings.iter().enumerate() {
        if finding.status != Status::Missing {
            continue;
        }
        let Some(session) = sessions.iter().find(|s| {
            s.charge_box_id == finding.charge_box_id
                && Some(s.ocpp_transaction_id) == finding.ocpp_transaction_id
        }) else {
            continue;
        };
        let (mut events, anomalies) = derive(session, &sources.rules);
        for event in &mut events {
            event.properties.origin = Some(ORIGIN_RECONCILE.to_string());
        }
        to_queue.push((i, events, anomalies));
    }
    let path = sources.spool_path.clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        let mut store = Store::open(&path)?;
        let now = unix_now();
        let mut out = Vec::with_capacity(to_queue.len());
        for (i, events, anomalies) in to_queue {
            let mut done = Vec::with_capacity(events.len());
            for event in events {
                let outcome = store.queue_backfill(&event, now)?;
                done.push((event, outcome));
            }
            out.push((i, done, anomalies));
        }
        Ok::<_, StoreError>(out)
    })
    .await
    .map_err(|e| ReconcileError::Config(format!("spool writer task: {e}")))??;

    let mut report = Backfill::default();
    for (i, done, anomalies) in outcomes {
        let finding = &mut findings[i];
        let tx = finding.ocpp_transaction_id.unwrap_or_default();
        let mut queued = 0;
        let mut problems = anomalies;
        for (event, outcome) in done {
            match outcome {
                BackfillOutcome::Queued | BackfillOutcome::Requeued => {
                    queued += 1;
                    report
                        .queued
                        .push((event.external_subscription_id, event.transaction_id));
                }
                BackfillOutcome::AlreadyHeld => {}
                BackfillOutcome::Collision(collision) => {
                    problems.push(format!("transaction_id_collision: {}", collision.detail));
                }
            }
        }
        if queued > 0 {
            finding.status = Status::Pending;
            finding.detail = format!("queued {queued} event(s) by --backfill (origin reconcile)");
        } else {
            let why = if problems.is_empty() {
                "nothing derived".to_string()
            } else {
                problems.join("; ")
            };
            finding.detail = format!("{}; backfill queued nothing: {why}", finding.detail);
            report
                .not_queued
                .push((finding.charge_box_id.clone(), tx, why));
        }
    }
    Ok(report)
}

/// Waits until every queued event is delivered, at most `limit`; whether they all were.
pub async fn wait_delivered(
    spool_path: PathBuf,
    queued: Vec<(String, String)>,
    limit: Duration,
) -> Result<bool, ReconcileError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (path, keys) = (spool_path.clone(), queued.clone());
        let done =
            tokio::task::spawn_blocking(move || Store::open_read_only(&path)?.all_delivered(&keys))
                .await
                .map_err(|e| ReconcileError::Config(format!("spool reader task: {e}")))??;
        if done {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Publishes a completed audit: `ocpp_lago_bridge_reconcile_sessions{status}` and the time of
/// the last complete run.
pub fn publish(findings: &[Finding]) {
    for (status, (count, _)) in super::totals(findings) {
        metrics::gauge!("ocpp_lago_bridge_reconcile_sessions", "status" => status.as_str())
            .set(count as f64);
    }
    metrics::gauge!("ocpp_lago_bridge_reconcile_last_complete_timestamp_seconds")
        .set(unix_now() as f64);
}

/// Logs an audit's summary; WARN with the sessions when any is `missing` or `mismatch`.
pub fn log_summary(audit: &Audit, from: i64, to: i64) {
    let totals = super::totals(&audit.findings);
    let summary: Vec<String> = totals
        .iter()
        .map(|(s, (n, _))| format!("{}={n}", s.as_str()))
        .collect();
    let needs: Vec<String> = audit
        .findings
        .iter()
        .filter(|f| matches!(f.status, Status::Missing | Status::Mismatch))
        .map(|f| {
            format!(
                "{}:{}:{}",
                f.status.as_str(),
                f.charge_box_id,
                f.ocpp_transaction_id.map_or("-".into(), |t| t.to_string())
            )
        })
        .collect();
    if needs.is_empty() {
        tracing::info!(
            from,
            to,
            sessions = audit.sessions,
            lago_requests = audit.lago_requests,
            summary = %summary.join(" "),
            "reconcile: the bill was audited against SteVe and Lago"
        );
    } else {
        tracing::warn!(
            from,
            to,
            sessions = audit.sessions,
            summary = %summary.join(" "),
            sessions_to_check = %needs.join(" "),
            "reconcile: sessions SteVe recorded are not billed exactly in Lago"
        );
    }
}

/// The daemon's periodic audit (`[reconcile] interval`): one run at start, then one per
/// interval, each over the last `lookback`; never returns before `shutdown`. Each run works on a
/// thread of its own with its own current-thread runtime (parsing SteVe's whole list and
/// deriving every session costs CPU: ~2 s for 100 000 sessions, BENCHMARKS.md), so it never
/// takes a worker the relay or the shipper needs. Its Lago requests take permits of the
/// shipper's limiter and its SteVe requests those of start recovery's, so the bridge as a whole
/// stays under `lago.max_requests_per_second` and `steve.max_requests_per_second`.
pub async fn periodic(
    config: Config,
    interval: Duration,
    lago_limiter: Arc<DefaultDirectRateLimiter>,
    steve_limiter: Arc<DefaultDirectRateLimiter>,
    shutdown: CancellationToken,
) {
    // Checked once up front, so a config that cannot audit is said at start, not every run.
    if let Err(error) = Sources::from_config(
        &config,
        Some(lago_limiter.clone()),
        Some(steve_limiter.clone()),
    ) {
        tracing::error!(%error, "reconcile.interval is set but the audit cannot run");
        shutdown.cancelled().await;
        return;
    }
    let config = Arc::new(config);
    let lookback = i64::try_from(config.reconcile.lookback.as_secs()).unwrap_or(i64::MAX);
    loop {
        let to = unix_now();
        let from = to.saturating_sub(lookback);
        let (config, limiter, stop) = (config.clone(), lago_limiter.clone(), shutdown.clone());
        let steve_limiter = steve_limiter.clone();
        let run = tokio::task::spawn_blocking(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::warn!(%error, "reconcile: no runtime for the audit; the next run tries again");
                    return;
                }
            };
            runtime.block_on(async {
                // Clients are built inside this runtime: their connections live and die with it.
                let sources = match Sources::from_config(&config, Some(limiter), Some(steve_limiter)) {
                    Ok(sources) => sources,
                    Err(error) => {
                        tracing::warn!(%error, "reconcile: the audit cannot run; the next run tries again");
                        return;
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = run_once(&sources, from, to, config.reconcile.backfill) => {}
                }
            });
        });
        tokio::select! {
            () = shutdown.cancelled() => return,
            joined = run => {
                if let Err(error) = joined {
                    metrics::counter!("ocpp_lago_bridge_reconcile_runs_total", "result" => "failed")
                        .increment(1);
                    tracing::error!(%error, "reconcile: the audit's thread failed; the next run tries again");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

async fn run_once(sources: &Sources, from: i64, to: i64, with_backfill: bool) {
    let mut audit = match audit(sources, from, to).await {
        Ok(audit) => audit,
        Err(error) => {
            metrics::counter!("ocpp_lago_bridge_reconcile_runs_total", "result" => "failed")
                .increment(1);
            tracing::warn!(%error, "reconcile: the audit could not complete; the next run tries again");
            return;
        }
    };
    log_summary(&audit, from, to);
    if with_backfill && audit.findings.iter().any(|f| f.status == Status::Missing) {
        let missing = std::mem::take(&mut audit.missing);
        match backfill(sources, &mut audit.findings, &missing).await {
            Ok(report) => tracing::info!(
                queued = report.queued.len(),
                not_queued = report.not_queued.len(),
                "reconcile: missing sessions queued for Lago (origin reconcile)"
            ),
            Err(error) => {
                tracing::warn!(%error, "reconcile: the backfill failed; the next run tries again")
            }
        }
    }
    publish(&audit.findings);
    metrics::counter!("ocpp_lago_bridge_reconcile_runs_total", "result" => "complete").increment(1);
}

/// `ocpp-lago-bridge reconcile`: the report on stdout, logs and the backfill summary on stderr
/// (on stdout too for `--format table`); returns the exit code.
pub async fn command(
    config: &Config,
    from: i64,
    to: i64,
    format: super::Format,
    with_backfill: bool,
    wait: Option<Duration>,
) -> u8 {
    let sources = match Sources::from_config(config, None, None) {
        Ok(sources) => sources,
        Err(error) => {
            eprintln!("error: {error}");
            return error.exit_code();
        }
    };
    let audit_fn = audit;
    let mut audit = match audit_fn(&sources, from, to).await {
        Ok(audit) => audit,
        Err(error) => {
            eprintln!("error: {error}");
            return error.exit_code();
        }
    };
    log_summary(&audit, from, to);
    let mut note = String::new();
    let mut delivered = true;
    if with_backfill {
        let missing = std::mem::take(&mut audit.missing);
        match backfill(&sources, &mut audit.findings, &missing).await {
            Ok(report) => {
                note = format!(
                    "backfill: queued {} event(s) (origin reconcile); {} missing session(s) not queued",
                    report.queued.len(),
                    report.not_queued.len()
                );
                for (cb, tx, why) in &report.not_queued {
                    note.push_str(&format!("\n  {cb}:{tx}: {why}"));
                }
                if let Some(limit) = wait.filter(|_| !report.queued.is_empty()) {
                    match wait_delivered(sources.spool_path.clone(), report.queued.clone(), limit)
                        .await
                    {
                        Ok(true) => {
                            // Lago took them: audit again, so the report and the exit code
                            // say what Lago holds now rather than what was sent.
                            note.push_str(
                                "\nbackfill: every queued event is delivered; the report is a fresh audit",
                            );
                            match audit_fn(&sources, from, to).await {
                                Ok(fresh) => audit = fresh,
                                Err(error) => {
                                    eprintln!("error: {error}");
                                    return error.exit_code();
                                }
                            }
                        }
                        Ok(false) => {
                            delivered = false;
                            note.push_str(&format!(
                                "\nbackfill: NOT every queued event was delivered within {}",
                                humantime::format_duration(limit)
                            ));
                        }
                        Err(error) => {
                            eprintln!("error: {error}");
                            return error.exit_code();
                        }
                    }
                }
            }
            Err(error) => {
                eprintln!("error: {error}");
                return error.exit_code();
            }
        }
    }
    print!("{}", super::render(&audit.findings, format));
    if !note.is_empty() {
        if format == super::Format::Table {
            println!("\n{note}");
        } else {
            eprintln!("{note}");
        }
    }
    if !delivered {
        return 1;
    }
    super::exit_code(&audit.findings)
}
