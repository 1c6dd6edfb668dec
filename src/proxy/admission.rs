//! Who may connect and how fast: connection limits (total, per IP), the chargeBoxId allowlist and
//! the per-charger message rate (a charger over it is slowed down, never has frames dropped).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::handshake::HttpResponse;
use crate::config::{ProxyConfig, chargers_within, load_allowlist, open_file_limit};
use crate::lock;

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
}

impl Refusal {
    /// A stable label for the metric and the log.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TooManyConnections(_) => "max_connections",
            Refusal::TooManyFromIp { .. } => "max_connections_per_ip",
            Refusal::NotAllowed(_) => "not_allowed",
            Refusal::CertificateMismatch { .. } => "certificate_mismatch",
        }
    }

    /// The HTTP answer: 503 for load (retry later), 404 for an unknown id (as SteVe answers),
    /// 403 for a certificate that names another charger.
    pub fn response(&self) -> HttpResponse {
        let status = match self {
            Refusal::TooManyConnections(_) | Refusal::TooManyFromIp { .. } => 503,
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
            0 => open_file_limit().map_or(10_000, |(soft, _)| chargers_within(soft) as usize),
            n => n,
        };
        let allowlist = config.allowlist_file.as_deref().and_then(|file| {
            load_allowlist(file)
                .inspect_err(|error| tracing::error!(%error, "allowlist unreadable: no charger is admitted until it is fixed (SIGHUP reloads it)"))
                .ok()
                .or_else(|| Some(HashSet::new()))
        });
        let rate = NonZeroU32::new(config.max_messages_per_second)
            .map(|rate| RateLimiter::keyed(Quota::per_second(rate)));
        Admission {
            max_connections,
            max_per_ip: config.max_connections_per_ip,
            active: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            allowlist: RwLock::new(allowlist),
            rate,
            admitted: AtomicUsize::new(0),
        }
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
