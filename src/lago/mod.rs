//! The Lago HTTP client: every request and response crosses typed serde schemas here, so a
//! change on Lago's side fails loudly at this boundary with the body in the error.

mod client;
pub mod schema;

pub use client::{
    BatchOutcome, Endpoint, EventPages, EventsWindow, IndexError, LIST_MAX_PAGES, LagoClient,
    LagoClientConfig, RetryCause, rate_limit_pause, strptime_timestamp,
};
pub use schema::{BillableMetricObject, StoredEvent, SubscriptionObject};

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// The rate limit of `lago.max_requests_per_second` (0 reads as 1; the config reader refuses
/// 0): one second's worth may go at once, then evenly. The daemon builds one and shares it
/// between the shipper and the periodic reconcile, so the bridge as a whole stays under it.
pub fn rate_limiter(max_requests_per_second: u32) -> Arc<DefaultDirectRateLimiter> {
    Arc::new(RateLimiter::direct(Quota::per_second(
        NonZeroU32::new(max_requests_per_second).unwrap_or(NonZeroU32::MIN),
    )))
}

/// The Lago API key; its Debug and Display never show the secret.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a secret key read from configuration.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The secret itself, only for building the Authorization header.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What can go wrong talking to Lago, in variants a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum LagoError {
    /// `lago.api_url` is not an absolute http(s) URL.
    #[error("invalid Lago api_url {url:?}: {reason}")]
    InvalidUrl {
        /// The configured URL.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The API key cannot be put in a header (control characters).
    #[error("the Lago API key is not a valid header value")]
    InvalidApiKey,
    /// reqwest could not build its client (TLS setup).
    #[error("cannot build the HTTP client: {0}")]
    ClientBuild(String),
    /// 401/403: the key is wrong or lacks rights; nothing was stored.
    #[error("Lago refused the API key (HTTP {status})")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
    },
    /// 429: Lago asks us to slow down; `pause` comes from `Retry-After` or `X-RateLimit-Reset`.
    #[error(
        "Lago rate limited the request ({})",
        pause.map_or("no pause given".to_string(), |p| format!("pause {}", humantime::format_duration(p)))
    )]
    RateLimited {
        /// How long to wait before the next request, when Lago said.
        pause: Option<Duration>,
    },
    /// 408, 5xx, timeout, connection failure: the request's effect is unknown.
    #[error("Lago unreachable or failing, outcome unknown: {0}")]
    Transient(RetryCause),
    /// The response status was expected but its body does not match the schema.
    #[error("{what}: HTTP {status} body does not match the schema ({reason}); body: {body}")]
    Schema {
        /// Which call.
        what: &'static str,
        /// HTTP status of the response.
        status: u16,
        /// serde's complaint.
        reason: String,
        /// The body, truncated.
        body: String,
    },
    /// A status this call has no meaning for (e.g. 400, 404 on a POST, 3xx).
    #[error("{what}: unexpected HTTP {status}; body: {body}")]
    UnexpectedStatus {
        /// Which call.
        what: &'static str,
        /// HTTP status of the response.
        status: u16,
        /// The body, truncated.
        body: String,
    },
    /// Lago answered 404 where its own "no such resource" was expected (or on a route that
    /// always exists): the route is not there, so `lago.api_url` points at the wrong place.
    #[error(
        "{what}: HTTP {status} from a route Lago always serves: lago.api_url is wrong (give the server root, e.g. https://api.getlago.com, without /api/v1); body: {body}"
    )]
    WrongUrl {
        /// Which call.
        what: &'static str,
        /// HTTP status of the response.
        status: u16,
        /// The body, truncated.
        body: String,
    },
    /// The request body could not be encoded as JSON.
    #[error("cannot encode the request: {0}")]
    Encode(String),
}
