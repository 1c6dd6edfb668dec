//! Who may connect and how fast: connection limits (total, per IP), the chargeBoxId allowlist,
//! the per-charger message rate (a charger over it is slowed down, never has frames dropped) and
//! the cap on handshakes still in progress (at which the oldest is closed, never the newest).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

use super::handshake::HttpResponse;
use crate::config::{ProxyConfig, load_allowlist};
use crate::lock;
use crate::rlimit::{chargers_within, open_file_limit};
use crate::telemetry::Throttle;

/// The per-charger message rate limiter, keyed by chargeBoxId.
pub type ChargerRateLimiter = DefaultKeyedRateLimiter<String>;

/// Why a charger was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the bridge is at proxy.max_connections ({0})")]
    TooManyConnections(usize),
    #[error("{ip} is at proxy.max_connections_per_ip ({limit})")]
    TooManyFromIp { ip: IpAddr, limit: usize },
    #[error("chargeBoxId {0:?} is not in proxy.allowlist_file")]
    NotAllowed(String),
    #[error("the client certificate is for {certificate:?}, not this chargeBoxId")]
    CertificateMismatch { certificate: String },
    #[error("the bridge is out of file descriptors; retry later")]
    FdsExhausted,
    #[error("newer connections took this one's place under proxy.max_pending_handshakes ({0})")]
    PendingEvicted(usize),
}

impl Refusal {
    /// A stable label for the metric and the log.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TooManyConnections(_) => "max_connections",
            Refusal::TooManyFromIp { .. } => "max_connections_per_ip",
            Refusal::NotAllowed(_) => "not_allowed",
            Refusal::CertificateMismatch { .. } => "certificate_mismatch",
            Refusal::FdsExhausted => "fds_exhausted",
            Refusal::PendingEvicted(_) => "max_pending_handshakes",
        }
    }

    /// The HTTP answer: 503 for load (retry later), 404 for an unknown id (as SteVe answers),
    /// 403 for a certificate that names another charger.
    pub fn response(&self) -> HttpResponse {
        let status = match self {
            Refusal::TooManyConnections(_)
            | Refusal::TooManyFromIp { .. }
            | Refusal::FdsExhausted
            | Refusal::PendingEvicted(_) => 503,
            Refusal::NotAllowed(_) => 404,
            Refusal::CertificateMismatch { .. } => 403,
        };
        HttpResponse::text(status, &format!("{self}\n"))
    }
}

/// Admission state shared by all connections.
pub struct Admission {
    max_connections: usize,
    max_per_ip: usize,
    active: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    allowlist: RwLock<Option<HashSet<String>>>,
    rate: Option<ChargerRateLimiter>,
    admitted: AtomicUsize,
    pending: PendingHandshakes,
}

/// A connection slot, given back when dropped.
pub struct Slot<'a> {
    admission: &'a Admission,
    ip: IpAddr,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.admission.active.fetch_sub(1, Ordering::Relaxed);
        if self.admission.max_per_ip > 0 {
            let mut per_ip = lock(&self.admission.per_ip);
            if let Some(count) = per_ip.get_mut(&self.ip) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
    }
}

impl Admission {
    /// Limits from `config`; `max_connections = 0` means what the open-file limit allows.
    pub fn new(config: &ProxyConfig) -> Self {
        let max_connections = match config.max_connections {
            None => open_file_limit().map_or(10_000, |(soft, _)| chargers_within(soft) as usize),
            Some(n) => n.get(),
        };
        let allowlist = config.allowlist_file.as_deref().and_then(|file| {
            load_allowlist(file)
                .inspect_err(|error| tracing::error!(%error, "allowlist unreadable: no charger is admitted until it is fixed (SIGHUP reloads it)"))
                .ok()
                .or_else(|| Some(HashSet::new()))
        });
        let rate = config
            .max_messages_per_second
            .map(|rate| RateLimiter::keyed(Quota::per_second(rate)));
        Admission {
            max_connections,
            max_per_ip: config.max_connections_per_ip.map_or(0, |n| n.get()),
            active: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            allowlist: RwLock::new(allowlist),
            rate,
            admitted: AtomicUsize::new(0),
            pending: PendingHandshakes::new(config.max_pending_handshakes),
        }
    }

    /// Registers a connection whose handshake has begun (at accept); at
    /// `max_pending_handshakes` the oldest pending one is told to close.
    pub fn begin_handshake(&self) -> Pending<'_> {
        self.pending.begin()
    }

    /// Takes a connection slot for a charger from `ip`.
    pub fn admit(&self, ip: IpAddr) -> Result<Slot<'_>, Refusal> {
        if self.active.fetch_add(1, Ordering::Relaxed) >= self.max_connections {
            self.active.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::TooManyConnections(self.max_connections));
        }
        if self.max_per_ip > 0 {
            let mut per_ip = lock(&self.per_ip);
            let count = per_ip.entry(ip).or_insert(0);
            if *count >= self.max_per_ip {
                drop(per_ip);
                self.active.fetch_sub(1, Ordering::Relaxed);
                return Err(Refusal::TooManyFromIp {
                    ip,
                    limit: self.max_per_ip,
                });
            }
            *count += 1;
        }
        // The keyed limiter keeps a cell per chargeBoxId; forget idle ones now and then.
        if let Some(rate) = &self.rate
            && self.admitted.fetch_add(1, Ordering::Relaxed) % 1024 == 1023
        {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
        Ok(Slot {
            admission: self,
            ip,
        })
    }

    /// Whether `charge_box_id` may connect under the allowlist.
    pub fn allowed(&self, charge_box_id: &str) -> Result<(), Refusal> {
        match &*self.allowlist.read().unwrap_or_else(|e| e.into_inner()) {
            Some(allowed) if !allowed.contains(charge_box_id) => {
                Err(Refusal::NotAllowed(charge_box_id.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Re-reads the allowlist; on error the previous one stays.
    pub fn reload_allowlist(&self, config: &ProxyConfig) {
        let Some(file) = &config.allowlist_file else {
            return;
        };
        match load_allowlist(file) {
            Ok(ids) => {
                tracing::info!(chargers = ids.len(), "SIGHUP: allowlist reloaded");
                *self.allowlist.write().unwrap_or_else(|e| e.into_inner()) = Some(ids);
            }
            Err(error) => {
                tracing::error!(%error, "SIGHUP: allowlist not reloaded; the previous one stays")
            }
        }
    }

    /// The per-charger message rate limiter, if one is configured.
    pub fn rate_limiter(&self) -> Option<&ChargerRateLimiter> {
        self.rate.as_ref()
    }
}

/// Connections accepted whose upgrade request is not complete yet, oldest first. They are
/// counted apart from established chargers, so stalled handshakes cannot lock chargers out; at
/// the cap the oldest is closed: a flood of stalled ones then turns over within the time it
/// takes to open `cap` new connections, while each real charger needs only a moment.
struct PendingHandshakes {
    cap: usize,
    state: Mutex<PendingState>,
}

struct PendingState {
    next_id: u64,
    /// By registration order; the token closes that connection's handshake.
    open: BTreeMap<u64, CancellationToken>,
    evictions_logged: Throttle,
}

/// A handshake in progress; deregistered when dropped.
pub struct Pending<'a> {
    registry: &'a PendingHandshakes,
    id: u64,
    evicted: CancellationToken,
}

impl PendingHandshakes {
    fn new(cap: usize) -> Self {
        PendingHandshakes {
            cap: cap.max(1),
            state: Mutex::new(PendingState {
                next_id: 0,
                open: BTreeMap::new(),
                evictions_logged: Throttle::per_second(),
            }),
        }
    }

    fn begin(&self) -> Pending<'_> {
        let evicted = CancellationToken::new();
        let mut state = lock(&self.state);
        while state.open.len() >= self.cap {
            let Some((_, oldest)) = state.open.pop_first() else {
                break;
            };
            oldest.cancel();
            if let Some(suppressed) = state.evictions_logged.ready() {
                tracing::warn!(
                    max_pending_handshakes = self.cap,
                    suppressed,
                    "the oldest pending handshake was closed to admit a new connection"
                );
            }
        }
        let id = state.next_id;
        state.next_id = state.next_id.wrapping_add(1);
        state.open.insert(id, evicted.clone());
        drop(state);
        Pending {
            registry: self,
            id,
            evicted,
        }
    }
}

impl Pending<'_> {
    /// Resolves when newer connections pushed this one out; cancel-safe.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await
    }

    /// The refusal a pushed-out connection is answered with.
    pub fn refusal(&self) -> Refusal {
        Refusal::PendingEvicted(self.registry.cap)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        lock(&self.registry.state).open.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_pending_handshake_is_closed_never_the_new_one() {
        let registry = PendingHandshakes::new(3);
        let first = registry.begin();
        let second = registry.begin();
        let third = registry.begin();
        let fourth = registry.begin();
        assert!(first.evicted.is_cancelled());
        assert!(!second.evicted.is_cancelled());
        assert!(!fourth.evicted.is_cancelled());
        // A finished handshake frees its place: nobody is closed for the next one.
        drop(third);
        let fifth = registry.begin();
        assert!(!second.evicted.is_cancelled());
        let sixth = registry.begin();
        assert!(second.evicted.is_cancelled());
        assert!(!fourth.evicted.is_cancelled() && !fifth.evicted.is_cancelled());
        assert!(!sixth.evicted.is_cancelled());
        assert_eq!(lock(&registry.state).open.len(), 3);
    }
}
