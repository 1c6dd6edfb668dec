//! The reqwest client and the classification of every answer Lago can give to a batch.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::schema::{
    BillableMetricEnvelope, BillableMetricObject, ErrorDetails, EventEnvelope, EventList,
    EventsCreated, NotFound, StoredEvent, SubscriptionEnvelope, SubscriptionObject,
    UnprocessableEntity,
};
use super::{ApiKey, LagoError};
use crate::event::LagoEvent;

/// Bodies in errors are cut to this many bytes: enough to diagnose, never a log flood.
const BODY_EXCERPT_BYTES: usize = 2048;
/// A Lago answer larger than this is not read whole (a 100-event echo is ~50 KiB).
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// `X-RateLimit-Reset` values above this are unix times, below it delays in seconds.
const UNIX_TIME_THRESHOLD_SECS: u64 = 1_000_000_000;
/// Events per page when listing a subscription's events (Lago's default is 20, its max 100).
const LIST_PER_PAGE: u32 = 100;
/// Most pages the shipper reads to find one event: one second of one subscription holds few.
pub const LIST_MAX_PAGES: u32 = 20;

/// Every byte but the unreserved `A-Z a-z 0-9 - _ ~` is percent-encoded in a path segment,
/// `.` included: lago-api's routes (`config/routes.rb`, getlago/lago-api) give
/// `subscriptions/:external_id` no format constraint, so Rails reads `fleet.acme.com` as id
/// `fleet.acme` with format `com`; it matches the still-encoded path and decodes the parameter
/// afterwards (docs/lago-contract.md "URLs").
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'~');

/// The `endpoint` label of the request metrics, one per Lago route the bridge calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /api/v1/events/batch`.
    EventsBatch,
    /// `GET /api/v1/events/{transaction_id}`.
    Event,
    /// `GET /api/v1/events?external_subscription_id=...`.
    EventsList,
    /// `GET /api/v1/billable_metrics/{code}`.
    BillableMetric,
    /// `GET /api/v1/subscriptions/{external_id}`.
    Subscription,
}

impl Endpoint {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EventsBatch => "events_batch",
            Self::Event => "event",
            Self::EventsList => "events_list",
            Self::BillableMetric => "billable_metric",
            Self::Subscription => "subscription",
        }
    }
}

/// How to reach Lago; timeouts come from the caller's settings.
#[derive(Debug, Clone)]
pub struct LagoClientConfig {
    /// Server root, e.g. `https://api.getlago.com`; `/api/v1/...` is appended.
    pub api_url: Url,
    /// The secret API key.
    pub api_key: ApiKey,
    /// Limit for establishing the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Limit for the whole request, body included.
    pub request_timeout: Duration,
}

/// Why a request's outcome is unknown and the same request may be sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryCause {
    /// 408 or 5xx.
    Status(u16),
    /// The request timeout elapsed.
    Timeout,
    /// No connection could be made (refused, reset, DNS, TLS handshake).
    Connect(String),
    /// The connection broke while sending or reading.
    Io(String),
}

impl fmt::Display for RetryCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(status) => write!(f, "HTTP {status}"),
            Self::Timeout => f.write_str("timeout"),
            Self::Connect(detail) => write!(f, "connect: {detail}"),
            Self::Io(detail) => write!(f, "i/o: {detail}"),
        }
    }
}

/// One index's complaint in a 422: a field map or a bare message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexError {
    /// `{"transaction_id": ["value_already_exist"], ...}`.
    Fields(BTreeMap<String, Vec<String>>),
    /// A bare string, e.g. an expression-evaluation failure.
    Message(String),
}

impl IndexError {
    /// True when the only complaint is that Lago already holds this transaction_id.
    pub fn is_only_already_exist(&self) -> bool {
        match self {
            Self::Fields(fields) => {
                fields.len() == 1
                    && fields
                        .get("transaction_id")
                        .is_some_and(|codes| codes.iter().all(|c| c == "value_already_exist"))
            }
            Self::Message(_) => false,
        }
    }
}

impl fmt::Display for IndexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Message(message) => f.write_str(message),
            Self::Fields(fields) => {
                let mut first = true;
                for (field, codes) in fields {
                    if !first {
                        f.write_str("; ")?;
                    }
                    first = false;
                    write!(f, "{field}: {}", codes.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

impl IndexError {
    fn from_value(value: Value) -> Self {
        match value {
            Value::String(message) => Self::Message(message),
            Value::Object(map) => Self::Fields(
                map.into_iter()
                    .map(|(field, codes)| (field, codes_of(codes)))
                    .collect(),
            ),
            other => Self::Message(other.to_string()),
        }
    }
}

fn codes_of(value: Value) -> Vec<String> {
    match value {
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(code) => code,
                other => other.to_string(),
            })
            .collect(),
        Value::String(code) => vec![code],
        other => vec![other.to_string()],
    }
}

/// What Lago did with a batch, classified so the shipper can act on it.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchOutcome {
    /// 200, parsed: every event is stored.
    Accepted(EventsCreated),
    /// 200 whose body is not the `EventsCreated` we know: a proxy's page (no evidence that
    /// anything was stored) or Lago's own answer in a changed shape (`echoed` events).
    AcceptedUnparseable {
        /// How many events the body echoes when it is `{"events": [...]}` JSON at all.
        echoed: Option<usize>,
        /// Why the body did not parse.
        reason: String,
        /// The body, truncated.
        body: String,
    },
    /// 422: the whole batch was rolled back; per failing index, Lago's complaint.
    Rejected422 {
        /// Keyed by the index in the batch we sent.
        index_errors: BTreeMap<usize, IndexError>,
        /// Details not attributable to an index (unknown key, index out of range, bare string).
        unattributed: BTreeMap<String, IndexError>,
    },
    /// 422 `{"events": ["too_many_events"]}`: the batch exceeds the server's limit.
    TooManyEvents,
    /// 401/403: nothing stored, retrying is useless until an operator fixes the key.
    Unauthorized {
        /// 401 or 403.
        status: u16,
    },
    /// 429: pause everything; `pause` is None when Lago gave no usable header.
    RateLimited {
        /// From `Retry-After` (seconds or HTTP-date), else `X-RateLimit-Reset`.
        pause: Option<Duration>,
    },
    /// 408, 5xx, timeout, connection error: outcome unknown, send the same batch again.
    Retryable(RetryCause),
}

/// The Lago API client: one connection pool, bearer auth, bounded timeouts.
#[derive(Clone)]
pub struct LagoClient {
    http: reqwest::Client,
    api_v1: Url,
    authorization: HeaderValue,
}

impl fmt::Debug for LagoClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LagoClient")
            .field("api_v1", &self.api_v1.as_str())
            .finish_non_exhaustive()
    }
}

impl LagoClient {
    /// Builds the client; fails on a bad URL or key, never on an unreachable server.
    pub fn new(config: LagoClientConfig) -> Result<Self, LagoError> {
        let invalid = |reason: &str| LagoError::InvalidUrl {
            url: config.api_url.to_string(),
            reason: reason.to_owned(),
        };
        let mut api_v1 = config.api_url.clone();
        if !matches!(api_v1.scheme(), "http" | "https") || api_v1.cannot_be_a_base() {
            return Err(invalid("must be an absolute http(s) URL"));
        }
        api_v1
            .path_segments_mut()
            .map_err(|()| invalid("cannot carry a path"))?
            .pop_if_empty()
            .extend(["api", "v1"]);

        let mut authorization =
            HeaderValue::try_from(format!("Bearer {}", config.api_key.expose()))
                .map_err(|_| LagoError::InvalidApiKey)?;
        // Keeps the key out of hyper's and reqwest's Debug output of the request.
        authorization.set_sensitive(true);

        crate::ensure_rustls_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            // A redirect means a misconfigured api_url; following it would turn a POST into a GET.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ocpp-lago-bridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| LagoError::ClientBuild(error_chain(&e)))?;
        Ok(Self {
            http,
            api_v1,
            authorization,
        })
    }

    /// `POST /api/v1/events/batch`; transport trouble becomes `Retryable`, never an `Err`.
    pub async fn post_batch(&self, events: &[LagoEvent]) -> Result<BatchOutcome, LagoError> {
        const WHAT: &str = "POST /events/batch";
        #[derive(serde::Serialize)]
        struct BatchInput<'a> {
            events: &'a [LagoEvent],
        }
        let body = serde_json::to_vec(&BatchInput { events })
            .map_err(|e| LagoError::Encode(e.to_string()))?;
        let request = self
            .http
            .post(self.url(&["events", "batch"]))
            .header(AUTHORIZATION, self.authorization.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let (status, headers, body) = match self.send(Endpoint::EventsBatch, request).await {
            Ok(answer) => answer,
            Err(LagoError::Transient(cause)) => return Ok(BatchOutcome::Retryable(cause)),
            Err(other) => return Err(other),
        };
        Ok(match status.as_u16() {
            200..=299 => match serde_json::from_slice::<EventsCreated>(&body) {
                Ok(created) => BatchOutcome::Accepted(created),
                Err(e) => BatchOutcome::AcceptedUnparseable {
                    echoed: echoed_events(&body),
                    reason: e.to_string(),
                    body: excerpt(&body),
                },
            },
            422 => classify_422(WHAT, &body)?,
            401 | 403 => BatchOutcome::Unauthorized {
                status: status.as_u16(),
            },
            429 => BatchOutcome::RateLimited {
                pause: rate_limit_pause(&headers, SystemTime::now()),
            },
            // 400 comes from a body Rails (or a proxy, a WAF) could not parse, never from one
            // event's content (docs/lago-contract.md "What the answers mean"): retried like a 5xx.
            400 | 408 | 500..=599 => BatchOutcome::Retryable(RetryCause::Status(status.as_u16())),
            other => {
                return Err(LagoError::UnexpectedStatus {
                    what: WHAT,
                    status: other,
                    body: excerpt(&body),
                });
            }
        })
    }

    /// `GET /api/v1/events/{transaction_id}`: the **first** event with that id in the
    /// organization, whatever its subscription; `None` when Lago holds none (404).
    pub async fn get_event(&self, transaction_id: &str) -> Result<Option<StoredEvent>, LagoError> {
        let found: Option<EventEnvelope> = self
            .get(
                Endpoint::Event,
                "GET /events/{transaction_id}",
                "event",
                &["events", transaction_id],
                &[],
            )
            .await?;
        Ok(found.map(|envelope| envelope.event))
    }

    /// `GET /api/v1/events?external_subscription_id=S&code=C&timestamp_from=F&timestamp_to=T`,
    /// read page by page (`next_page` of [`EventPages`]), so a caller holds one page at a time
    /// and takes its rate limit before each request. lago-api's `EventsQuery` parses both time
    /// filters with `DateTime.strptime` (`BaseQuery#parse_datetime_filter`), so they are written
    /// `YYYY-MM-DDTHH:MM:SSZ`: fractions or unix seconds get 422 `invalid_date`.
    pub fn list_events(&self, window: &EventsWindow<'_>) -> Result<EventPages<'_>, LagoError> {
        let at = |t: i64| {
            strptime_timestamp(t)
                .ok_or_else(|| LagoError::Encode(format!("timestamp {t} is outside the calendar")))
        };
        Ok(EventPages {
            client: self,
            external_subscription_id: window.external_subscription_id.to_owned(),
            code: window.code.to_owned(),
            from: at(window.from)?,
            to: at(window.to)?,
            next: Some(1),
            pages_read: 0,
        })
    }

    /// `GET /api/v1/billable_metrics/{code}`; `None` when the code is unknown (404).
    pub async fn get_billable_metric(
        &self,
        code: &str,
    ) -> Result<Option<BillableMetricObject>, LagoError> {
        let found: Option<BillableMetricEnvelope> = self
            .get(
                Endpoint::BillableMetric,
                "GET /billable_metrics/{code}",
                "billable_metric",
                &["billable_metrics", code],
                &[],
            )
            .await?;
        Ok(found.map(|envelope| envelope.billable_metric))
    }

    /// `GET /api/v1/subscriptions/{external_id}`; `None` when no active one exists (404).
    pub async fn get_subscription(
        &self,
        external_id: &str,
    ) -> Result<Option<SubscriptionObject>, LagoError> {
        let found: Option<SubscriptionEnvelope> = self
            .get(
                Endpoint::Subscription,
                "GET /subscriptions/{external_id}",
                "subscription",
                &["subscriptions", external_id],
                &[],
            )
            .await?;
        Ok(found.map(|envelope| envelope.subscription))
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.api_v1.clone();
        let mut path = url.path().trim_end_matches('/').to_owned();
        for segment in segments {
            path.push('/');
            path.extend(percent_encoding::utf8_percent_encode(segment, PATH_SEGMENT));
        }
        // Already percent-encoded: set_path keeps `%XX` as it is.
        url.set_path(&path);
        url
    }

    /// GETs one resource; `None` only on a 404 that is Lago's own "no such `resource`"
    /// (`{"code": "<resource>_not_found"}`, lago-api `ApiResponses#not_found_error`): any other
    /// 404 means the route does not exist there, i.e. a wrong `api_url`.
    async fn get<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        what: &'static str,
        resource: &str,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<Option<T>, LagoError> {
        let mut url = self.url(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let request = self
            .http
            .get(url)
            .header(AUTHORIZATION, self.authorization.clone());
        let (status, headers, body) = self.send(endpoint, request).await?;
        match status.as_u16() {
            200 => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| LagoError::Schema {
                    what,
                    status: 200,
                    reason: e.to_string(),
                    body: excerpt(&body),
                }),
            404 => {
                let theirs = serde_json::from_slice::<NotFound>(&body)
                    .is_ok_and(|n| n.code.strip_suffix("_not_found") == Some(resource));
                if theirs {
                    Ok(None)
                } else {
                    Err(LagoError::WrongUrl {
                        what,
                        status: 404,
                        body: excerpt(&body),
                    })
                }
            }
            401 | 403 => Err(LagoError::Unauthorized {
                status: status.as_u16(),
            }),
            429 => Err(LagoError::RateLimited {
                pause: rate_limit_pause(&headers, SystemTime::now()),
            }),
            // A 400 on a GET is a proxy's or a WAF's doing as well: transient.
            400 | 408 | 500..=599 => Err(LagoError::Transient(RetryCause::Status(status.as_u16()))),
            other => Err(LagoError::UnexpectedStatus {
                what,
                status: other,
                body: excerpt(&body),
            }),
        }
    }

    /// Sends and reads the whole (capped) body; every transport failure is `Transient`. Every
    /// request counts in `ocpp_lago_bridge_lago_requests_total{endpoint,status_class}` and
    /// `ocpp_lago_bridge_lago_request_seconds{endpoint}`, whatever its outcome.
    async fn send(
        &self,
        endpoint: Endpoint,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, HeaderMap, Vec<u8>), LagoError> {
        let started = std::time::Instant::now();
        let result = self.exchange(request).await;
        let status_class = match &result {
            Ok((status, _, _)) => match status.as_u16() {
                100..=199 => "1xx",
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            },
            Err(LagoError::Transient(RetryCause::Timeout)) => "timeout",
            Err(_) => "error",
        };
        metrics::histogram!("ocpp_lago_bridge_lago_request_seconds", "endpoint" => endpoint.as_str())
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(
            "ocpp_lago_bridge_lago_requests_total",
            "endpoint" => endpoint.as_str(),
            "status_class" => status_class
        )
        .increment(1);
        result
    }

    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, HeaderMap, Vec<u8>), LagoError> {
        let mut response = request.send().await.map_err(transient)?;
        let status = response.status();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transient)? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                // Keep what fits: it is only ever parsed (and fails) or quoted in an error.
                let room = MAX_BODY_BYTES - body.len();
                body.extend_from_slice(&chunk[..room]);
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, headers, body))
    }
}

/// The filters of one events listing: one subscription, one metric, a closed time range (unix
/// seconds, both ends included).
#[derive(Debug, Clone, Copy)]
pub struct EventsWindow<'a> {
    pub external_subscription_id: &'a str,
    pub code: &'a str,
    pub from: i64,
    pub to: i64,
}

/// A listing read one page per request; see [`LagoClient::list_events`].
#[derive(Debug)]
pub struct EventPages<'a> {
    client: &'a LagoClient,
    external_subscription_id: String,
    code: String,
    from: String,
    to: String,
    next: Option<u32>,
    pages_read: u32,
}

impl EventPages<'_> {
    /// The next page's events; `None` once the last page was read. A `next_page` that does not
    /// move forward ends the listing (a server that repeats a page cannot loop us).
    pub async fn next_page(&mut self) -> Result<Option<Vec<StoredEvent>>, LagoError> {
        const WHAT: &str = "GET /events?external_subscription_id";
        let Some(page) = self.next else {
            return Ok(None);
        };
        let (page_text, per_page) = (page.to_string(), LIST_PER_PAGE.to_string());
        let query = [
            (
                "external_subscription_id",
                self.external_subscription_id.as_str(),
            ),
            ("code", self.code.as_str()),
            ("timestamp_from", self.from.as_str()),
            ("timestamp_to", self.to.as_str()),
            ("page", page_text.as_str()),
            ("per_page", per_page.as_str()),
        ];
        let listed: Option<EventList> = self
            .client
            .get(Endpoint::EventsList, WHAT, "event", &["events"], &query)
            .await?;
        // A 404 on the list means no route, not an empty list.
        let Some(listed) = listed else {
            return Err(LagoError::WrongUrl {
                what: WHAT,
                status: 404,
                body: String::new(),
            });
        };
        self.pages_read = self.pages_read.saturating_add(1);
        self.next = listed
            .meta
            .and_then(|m| m.next_page)
            .filter(|&next| next > page);
        Ok(Some(listed.events))
    }

    /// How many pages were read so far (one request each).
    pub fn pages_read(&self) -> u32 {
        self.pages_read
    }
}

/// How many events a 200 body echoes when it is Lago's JSON `{"events": [...]}` whose event
/// objects merely changed shape; `None` for anything else (an HTML page, a truncated body).
fn echoed_events(body: &[u8]) -> Option<usize> {
    match serde_json::from_slice::<Value>(body).ok()? {
        Value::Object(mut map) => match map.remove("events")? {
            Value::Array(events) => Some(events.len()),
            _ => None,
        },
        _ => None,
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a unix time, the form `DateTime.strptime` reads; `None` outside
/// the calendar `time` knows.
pub fn strptime_timestamp(unix_secs: i64) -> Option<String> {
    let at = time::OffsetDateTime::from_unix_timestamp(unix_secs).ok()?;
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    at.format(&format).ok()
}

fn transient(error: reqwest::Error) -> LagoError {
    let detail = error_chain(&error);
    LagoError::Transient(if error.is_timeout() {
        RetryCause::Timeout
    } else if error.is_connect() {
        RetryCause::Connect(detail)
    } else {
        RetryCause::Io(detail)
    })
}

/// The error and its sources on one line (reqwest's Display alone hides the cause).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn classify_422(what: &'static str, body: &[u8]) -> Result<BatchOutcome, LagoError> {
    let rejected: UnprocessableEntity =
        serde_json::from_slice(body).map_err(|e| LagoError::Schema {
            what,
            status: 422,
            reason: e.to_string(),
            body: excerpt(body),
        })?;
    let details = match rejected.error_details {
        ErrorDetails::Message(message) => {
            return Ok(BatchOutcome::Rejected422 {
                index_errors: BTreeMap::new(),
                unattributed: BTreeMap::from([(String::new(), IndexError::Message(message))]),
            });
        }
        ErrorDetails::Map(details) => details,
    };
    if details.len() == 1
        && details.get("events").is_some_and(|codes| {
            codes_of(codes.clone())
                .iter()
                .any(|c| c == "too_many_events")
        })
    {
        return Ok(BatchOutcome::TooManyEvents);
    }
    let mut index_errors = BTreeMap::new();
    let mut unattributed = BTreeMap::new();
    for (key, value) in details {
        match key.parse::<usize>() {
            Ok(index) => {
                index_errors.insert(index, IndexError::from_value(value));
            }
            Err(_) => {
                // A field-level complaint about the request itself, e.g. `"events": [...]`.
                let error = match value {
                    Value::Array(_) => {
                        IndexError::Fields(BTreeMap::from([(key.clone(), codes_of(value))]))
                    }
                    other => IndexError::from_value(other),
                };
                unattributed.insert(key, error);
            }
        }
    }
    Ok(BatchOutcome::Rejected422 {
        index_errors,
        unattributed,
    })
}

/// The pause a 429 asks for: `Retry-After` (seconds or HTTP-date), else `X-RateLimit-Reset`
/// (seconds to wait, or a unix time when it is that large).
pub fn rate_limit_pause(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(retry_after) = text(RETRY_AFTER.as_str()) {
        if let Ok(secs) = retry_after.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(at) = httpdate::parse_http_date(retry_after) {
            return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
        }
    }
    let reset = text("x-ratelimit-reset")?;
    let secs = reset.parse::<u64>().ok().or_else(|| {
        reset
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| s.ceil() as u64)
    })?;
    if secs >= UNIX_TIME_THRESHOLD_SECS {
        // `UNIX_EPOCH + secs` panics past the platform's time range (`18446744073709551615`,
        // `1e30`); such a time is just very far away, which the shipper caps.
        match SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs)) {
            Some(at) => Some(at.duration_since(now).unwrap_or(Duration::ZERO)),
            None => Some(Duration::from_secs(secs)),
        }
    } else {
        Some(Duration::from_secs(secs))
    }
}

/// The body as text, cut at a char boundary so an error line stays bounded.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if text.len() <= BODY_EXCERPT_BYTES {
        return text.into_owned();
    }
    let mut end = BODY_EXCERPT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], body.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn retry_after_seconds_wins_over_reset() {
        let h = headers(&[("retry-after", "7"), ("x-ratelimit-reset", "30")]);
        assert_eq!(
            rate_limit_pause(&h, SystemTime::now()),
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn retry_after_http_date_is_relative_to_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = httpdate::fmt_http_date(now + Duration::from_secs(12));
        let h = headers(&[("retry-after", &at)]);
        assert_eq!(rate_limit_pause(&h, now), Some(Duration::from_secs(12)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(12));
        let h = headers(&[("retry-after", &past)]);
        assert_eq!(rate_limit_pause(&h, now), Some(Duration::ZERO));
    }

    #[test]
    fn ratelimit_reset_beyond_the_time_range_is_far_away_not_a_panic() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for reset in ["18446744073709551615", "1e30", "9223372036854775808"] {
            let pause = rate_limit_pause(&headers(&[("x-ratelimit-reset", reset)]), now);
            assert!(
                pause.is_some_and(|p| p > Duration::from_secs(1 << 40)),
                "{reset}: {pause:?}"
            );
        }
    }

    #[test]
    fn ratelimit_reset_as_delay_or_unix_time() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = headers(&[("x-ratelimit-reset", "3")]);
        assert_eq!(rate_limit_pause(&h, now), Some(Duration::from_secs(3)));
        let h = headers(&[("x-ratelimit-reset", "1700000005")]);
        assert_eq!(rate_limit_pause(&h, now), Some(Duration::from_secs(5)));
        let h = headers(&[("retry-after", "soon")]);
        assert_eq!(rate_limit_pause(&h, now), None);
        assert_eq!(rate_limit_pause(&HeaderMap::new(), now), None);
    }

    #[test]
    fn a_422_splits_index_errors_from_unattributed_ones() {
        let body = br#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors",
            "error_details":{"0":{"transaction_id":["value_already_exist"]},"3":"undefined method",
            "foo":["bar"]},"extra":true}"#;
        let BatchOutcome::Rejected422 {
            index_errors,
            unattributed,
        } = classify_422("t", body).unwrap()
        else {
            panic!("not a rejection");
        };
        assert!(index_errors[&0].is_only_already_exist());
        assert_eq!(
            index_errors[&3],
            IndexError::Message("undefined method".into())
        );
        assert_eq!(unattributed["foo"].to_string(), "foo: bar");
    }

    #[test]
    fn too_many_events_is_its_own_outcome() {
        let body = br#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":{"events":["too_many_events"]}}"#;
        assert_eq!(
            classify_422("t", body).unwrap(),
            BatchOutcome::TooManyEvents
        );
    }

    #[test]
    fn an_unparseable_422_is_a_schema_error_with_the_body() {
        let error = classify_422("t", b"<html>oops</html>").unwrap_err();
        assert!(error.to_string().contains("<html>oops</html>"), "{error}");
    }

    #[test]
    fn the_key_never_shows_in_debug_or_display() {
        let key = ApiKey::new("sekret-123");
        let config = LagoClientConfig {
            api_url: "http://127.0.0.1:9".parse().unwrap(),
            api_key: key.clone(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        };
        let client = LagoClient::new(config.clone()).unwrap();
        for text in [
            format!("{key:?}"),
            format!("{key}"),
            format!("{config:?}"),
            format!("{client:?}"),
        ] {
            assert!(!text.contains("sekret"), "{text}");
        }
    }

    #[test]
    fn every_path_segment_is_encoded_dots_included() {
        let client = LagoClient::new(LagoClientConfig {
            api_url: "https://lago.example/base/".parse().unwrap(),
            api_key: ApiKey::new("k"),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        })
        .unwrap();
        assert_eq!(
            client.url(&["subscriptions", "fleet.acme.com"]).as_str(),
            "https://lago.example/base/api/v1/subscriptions/fleet%2Eacme%2Ecom"
        );
        assert_eq!(
            client.url(&["events", "101:1234.5"]).as_str(),
            "https://lago.example/base/api/v1/events/101%3A1234%2E5"
        );
        assert_eq!(
            client.url(&["events", "a/b ?#%é"]).as_str(),
            "https://lago.example/base/api/v1/events/a%2Fb%20%3F%23%25%C3%A9"
        );
        assert_eq!(
            client.url(&["events", "batch"]).as_str(),
            "https://lago.example/base/api/v1/events/batch"
        );
    }

    #[test]
    fn list_filters_are_whole_utc_seconds_with_z() {
        assert_eq!(
            strptime_timestamp(1_700_000_000).as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
        assert_eq!(
            strptime_timestamp(0).as_deref(),
            Some("1970-01-01T00:00:00Z")
        );
        assert_eq!(strptime_timestamp(i64::MAX), None);
    }

    #[test]
    fn excerpt_is_bounded_and_char_safe() {
        let long = "é".repeat(5000);
        let cut = excerpt(long.as_bytes());
        assert!(cut.len() < BODY_EXCERPT_BYTES + 64);
        assert!(cut.ends_with("(10000 bytes)"));
    }
}
