//! I/O: start recovery beside the writer. The billing writer parks a Stop whose session it does not
//! know (committing its tap record, so the charger's reply goes out at once) and hands the
//! session here; this task asks SteVe's REST API (`steve.rs`) with bounded concurrency, the rate
//! limit of `steve.max_requests_per_second` (one limiter the daemon shares with the periodic
//! reconcile, so SteVe sees that rate from the bridge as a whole), retries with backoff and a cache of answers, and sends the answer back to the
//! writer as a command: the recovered start as an ordinary Start tap record, or "SteVe does not
//! know it" (also after `steve.recovery_timeout` of failures), on which the writer bills the Stop
//! as it is (`missing_start`).
//!
//! Must not: hold the writer (it only ever sends to it), hold a charger's reply, or keep the
//! writer alive at shutdown (it holds a weak sender: the writer ends when the relay's handles
//! are gone; parked Stops are on disk and asked again after the restart).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use governor::DefaultDirectRateLimiter;
use tokio::sync::{Semaphore, mpsc};

use crate::billing::writer::Command;
use crate::ledger::SessionKey;
use crate::start_lookup::Lookup;
use crate::steve::{SteveClient, SteveError};
use crate::tap::TapRecord;

/// Answers kept this long: a session asked twice (a retried Stop after a restart of the
/// lookup, a second bridge process is separate) is not asked again.
const CACHE_TTL: Duration = Duration::from_secs(600);
/// Most answers cached; past it the expired go, then all (the cache only saves requests).
const CACHE_MAX: usize = 10_000;
/// First retry delay; doubles (with jitter) up to [`RETRY_MAX_DELAY`].
const RETRY_MIN_DELAY: Duration = Duration::from_millis(250);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(30);

/// The recovery task's limits (`[steve]`).
#[derive(Debug, Clone)]
pub struct RecoverySettings {
    /// Lookups in flight at once.
    pub max_concurrent_requests: usize,
    /// How long one session is retried before SteVe is taken not to know it.
    pub recovery_timeout: Duration,
}

/// What SteVe said about a session, as cached.
type Answer = Option<TapRecord>;

struct Shared {
    client: SteveClient,
    limiter: Arc<DefaultDirectRateLimiter>,
    settings: RecoverySettings,
    cache: Mutex<HashMap<SessionKey, (Instant, Answer)>>,
    in_flight: Mutex<HashSet<SessionKey>>,
}

/// Runs until the writer drops its [`RecoveryHandle`] (it has ended), answering every lookup
/// through `writer` (a weak sender: this task never keeps the writer alive). Every request
/// (retries included) takes a permit of `limiter` first: the daemon passes the one limiter of
/// `steve.max_requests_per_second` it shares with the periodic reconcile
/// ([`crate::steve::rate_limiter`]).
pub async fn run(
    client: SteveClient,
    settings: RecoverySettings,
    limiter: Arc<DefaultDirectRateLimiter>,
    mut requests: mpsc::UnboundedReceiver<Lookup>,
    writer: mpsc::WeakSender<Command>,
) {
    let permits = Arc::new(Semaphore::new(settings.max_concurrent_requests.max(1)));
    let shared = Arc::new(Shared {
        client,
        limiter,
        settings,
        cache: Mutex::new(HashMap::new()),
        in_flight: Mutex::new(HashSet::new()),
    });
    let mut lookups = tokio::task::JoinSet::new();
    while let Some(lookup) = requests.recv().await {
        // Reap finished lookups so the set does not grow with the run's history.
        while lookups.try_join_next().is_some() {}
        if !crate::lock(&shared.in_flight).insert(lookup.key.clone()) {
            continue; // Already being asked; its answer serves this request too.
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let shared = shared.clone();
        let writer = writer.clone();
        lookups.spawn(async move {
            let answer = shared.answer(&lookup).await;
            crate::lock(&shared.in_flight).remove(&lookup.key);
            drop(permit);
            deliver(&writer, lookup, answer).await;
        });
    }
    // The writer has ended: answers could no longer be applied (the parked Stops are on disk).
    lookups.abort_all();
}

impl Shared {
    /// SteVe's answer: cached, else asked (rate-limited, retried until `recovery_timeout`).
    /// `Err` means SteVe never answered usefully in time.
    async fn answer(&self, lookup: &Lookup) -> Result<Answer, SteveError> {
        if let Some(answer) = self.cached(&lookup.key) {
            metrics::counter!("ocpp_lago_bridge_start_recovery_cache_hits_total").increment(1);
            return Ok(answer.map(|mut record| {
                record.received_at = lookup.received_at;
                record
            }));
        }
        let deadline = tokio::time::Instant::now() + self.settings.recovery_timeout;
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(RETRY_MIN_DELAY)
            .with_max_delay(RETRY_MAX_DELAY)
            .with_jitter()
            .without_max_times()
            .build();
        let key = &lookup.key;
        loop {
            self.limiter.until_ready().await;
            let attempt = self
                .client
                .recover_start(
                    &key.charge_box_id,
                    key.ocpp_transaction_id,
                    lookup.received_at,
                )
                .await;
            let error = match attempt {
                Ok(answer) => {
                    self.remember(key, &answer);
                    return Ok(answer);
                }
                Err(error) => error,
            };
            let reason = error.reason();
            metrics::counter!("ocpp_lago_bridge_start_recovery_errors_total", "reason" => reason)
                .increment(1);
            let delay = delays.next().unwrap_or(RETRY_MAX_DELAY);
            if tokio::time::Instant::now() + delay >= deadline {
                return Err(error);
            }
            // 401/403 will not heal by itself: an operator must fix the credentials.
            if reason == "unauthorized" {
                tracing::error!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, %error, "SteVe refuses the bridge's REST credentials: check steve.api_user and its API password (SteVe >= 3.8) or steve.api_key_file (older SteVe); retrying");
            } else {
                tracing::warn!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, %error, retry_in = %humantime::format_duration(delay), "asking SteVe for a session start failed; retrying");
            }
            tokio::time::sleep(delay).await;
        }
    }

    fn cached(&self, key: &SessionKey) -> Option<Answer> {
        let cache = crate::lock(&self.cache);
        let (at, answer) = cache.get(key)?;
        (at.elapsed() < CACHE_TTL).then(|| answer.clone())
    }

    fn remember(&self, key: &SessionKey, answer: &Answer) {
        let mut cache = crate::lock(&self.cache);
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key.clone(), (Instant::now(), answer.clone()));
    }
}

/// Hands SteVe's answer to the writer: a found start as an ordinary Start record, otherwise
/// "unknown" so the writer bills the parked Stop as it is.
async fn deliver(
    writer: &mpsc::WeakSender<Command>,
    lookup: Lookup,
    answer: Result<Answer, SteveError>,
) {
    let key = &lookup.key;
    let result = match &answer {
        Ok(Some(_)) => "recovered",
        Ok(None) => "unknown_to_steve",
        Err(_) => "error",
    };
    metrics::counter!("ocpp_lago_bridge_start_recoveries_total", "result" => result).increment(1);
    let command = match answer {
        Ok(Some(start)) => {
            tracing::info!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, "session start recovered from SteVe's REST API");
            Command::RecoveredStart(start)
        }
        Ok(None) => {
            tracing::warn!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, "SteVe does not know the transaction at this charge box either: missing_start");
            Command::StartUnknown { key: key.clone() }
        }
        Err(error) => {
            tracing::warn!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, %error, "gave up asking SteVe for the session start after steve.recovery_timeout: missing_start");
            Command::StartUnknown { key: key.clone() }
        }
    };
    let Some(writer) = writer.upgrade() else {
        tracing::info!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, "the writer has stopped: the parked Stop stays in the spool and is looked up again after restart");
        return;
    };
    if writer.send(command).await.is_err() {
        tracing::info!(charge_box_id = %key.charge_box_id, ocpp_transaction_id = key.ocpp_transaction_id, "the writer has stopped: the parked Stop stays in the spool and is looked up again after restart");
    }
}
