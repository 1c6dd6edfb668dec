//! I/O: SteVe's REST API (`GET {root}/api/v1/transactions`), used for one thing: recovering the
//! start of a session whose StartTransaction the bridge never saw (it was started before the
//! bridge was in the path, on another bridge, or during an outage), so its Stop can still be
//! billed instead of becoming a `missing_start` dead letter.
//!
//! What SteVe serves, from its source (steve-community/steve):
//! - `web/api/TransactionsRestController.java`: `GET /api/v1/transactions` → a JSON array of
//!   `repository/dto/Transaction.java` (no paging); the query form
//!   (`web/dto/TransactionQueryForm.java`) takes repeatable `transactionPk` and `chargeBoxId`
//!   and `type` = `ACTIVE` | `STOPPED` | `ALL`. We ask `type=ALL`: once SteVe has answered the
//!   Stop the session is already STOPPED there.
//! - `repository/dto/Transaction.java`: `id` (int, the OCPP transactionId), `connectorId`,
//!   `chargeBoxId`, `ocppIdTag`, `startValue` (String, Wh), `startTimestamp` (Joda `DateTime`,
//!   written ISO-8601 by Jackson's Joda module, e.g. `2022-10-01T00:00:00.000Z` as in
//!   `TransactionRestControllerTest.java`), stop fields null while active.
//! - `config/ApiAuthenticationManager.java` (SteVe ≥ 3.8.0, PR #1545): HTTP Basic with a web
//!   user that has API access and its API password; 401 with a JSON error body otherwise.
//!   Older SteVe took a `STEVE-API-KEY` header instead.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rust_decimal::Decimal;
use serde::Deserialize;

use crate::lago::ApiKey;
use crate::ocpp::units::{parse_decimal, parse_timestamp};
use crate::tap::{StartRecord, TapKind, TapRecord};

/// How the bridge authenticates to SteVe's REST API.
#[derive(Clone, PartialEq, Eq)]
pub enum SteveAuth {
    /// SteVe ≥ 3.8.0: HTTP Basic with a web user with API access and its API password (which
    /// may contain `:`; only the user name may not).
    Basic {
        /// The SteVe web user.
        user: String,
        /// Its API password.
        password: ApiKey,
    },
    /// SteVe < 3.8.0: the `STEVE-API-KEY` header.
    LegacyKey(ApiKey),
}

impl std::fmt::Debug for SteveAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SteveAuth::Basic { user, .. } => f
                .debug_struct("Basic")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            SteveAuth::LegacyKey(_) => f.write_str("LegacyKey(<redacted>)"),
        }
    }
}

impl SteveAuth {
    /// `basic` or `legacy_key`, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            SteveAuth::Basic { .. } => "basic",
            SteveAuth::LegacyKey(_) => "legacy_key",
        }
    }
}

/// SteVe's REST endpoint and credentials.
#[derive(Clone)]
pub struct SteveClient {
    http: reqwest::Client,
    /// `{steve.api_url}/api/v1/transactions`, built once from the parsed config value.
    transactions_url: url::Url,
    auth: SteveAuth,
}

impl std::fmt::Debug for SteveClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SteveClient")
            .field("transactions_url", &self.transactions_url.as_str())
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// Why SteVe could not tell us a session's start. Never carries a credential.
#[derive(Debug, thiserror::Error)]
pub enum SteveError {
    #[error("SteVe REST request failed: {0}")]
    Http(String),
    #[error("SteVe REST answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("SteVe REST answer does not parse: {0}")]
    Schema(String),
}

impl SteveError {
    /// A label for metrics: `http`, `unauthorized`, `status`, `schema`.
    pub fn reason(&self) -> &'static str {
        match self {
            SteveError::Http(_) => "http",
            SteveError::Status {
                status: 401 | 403, ..
            } => "unauthorized",
            SteveError::Status { .. } => "status",
            SteveError::Schema(_) => "schema",
        }
    }
}

/// The fields of SteVe's `Transaction` DTO we use; SteVe adds others freely.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SteveTransaction {
    id: i64,
    connector_id: i64,
    charge_box_id: String,
    ocpp_id_tag: String,
    start_timestamp: Option<String>,
    start_value: serde_json::Value,
    #[serde(default)]
    stop_timestamp: Option<String>,
    #[serde(default)]
    stop_value: Option<serde_json::Value>,
}

/// A session SteVe recorded as stopped: what `reconcile` compares the bill with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SteveSession {
    /// SteVe's `transaction_pk`, the OCPP transactionId.
    pub ocpp_transaction_id: i64,
    pub charge_box_id: String,
    pub connector_id: i64,
    /// The idTag that started it.
    pub id_tag: String,
    /// `startValue`, Wh.
    pub start_wh: Decimal,
    /// `stopValue`, Wh.
    pub stop_wh: Decimal,
    /// `startTimestamp`, unix seconds (`None` when SteVe has none).
    pub started_at: Option<i64>,
    /// `stopTimestamp`, unix seconds.
    pub stopped_at: i64,
}

/// `YYYY-MM-DDTHH:MM:SS.000Z` of a unix time: the ISO-8601 form SteVe's `from`/`to` take
/// (`QueryPeriodFromToFilter`, e.g. `2024-08-25T14:30:00.000Z`, BEHAVIOUR.md).
pub fn steve_timestamp(unix_secs: i64) -> Option<String> {
    let at = time::OffsetDateTime::from_unix_timestamp(unix_secs).ok()?;
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].000Z");
    at.format(&format).ok()
}

/// The rate limit of `steve.max_requests_per_second` (0 reads as 1). The daemon builds one and
/// hands it to every user of SteVe's REST API (start recovery and the periodic reconcile), so
/// together they stay under the limit rather than each under its own copy of it. Requests are
/// spaced evenly (a burst of one): governor's default burst of a whole second's quota would let
/// up to twice the rate arrive within one second, and the key promises SteVe at most that many
/// in any second.
pub fn rate_limiter(max_requests_per_second: u32) -> Arc<DefaultDirectRateLimiter> {
    let per_second = NonZeroU32::new(max_requests_per_second).unwrap_or(NonZeroU32::MIN);
    Arc::new(RateLimiter::direct(
        Quota::per_second(per_second).allow_burst(NonZeroU32::MIN),
    ))
}

impl SteveClient {
    /// A client for SteVe at `api_url` (its root, e.g. `http://127.0.0.1:8080/steve`).
    pub fn new(api_url: &url::Url, auth: SteveAuth, timeout: Duration) -> Result<Self, SteveError> {
        let mut transactions_url = api_url.clone();
        transactions_url
            .path_segments_mut()
            .map_err(|()| SteveError::Http(format!("{api_url} cannot carry a path")))?
            .pop_if_empty()
            .extend(["api", "v1", "transactions"]);
        crate::ensure_rustls_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| SteveError::Http(e.to_string()))?;
        Ok(SteveClient {
            http,
            transactions_url,
            auth,
        })
    }

    /// `GET {root}/api/v1/transactions?type=STOPPED&periodType=FROM_TO&from=…&to=…`: the
    /// stopped transactions that **started** in `[from, to]` (SteVe's period filters on the
    /// start time), the whole list (SteVe does not page). Checked against SteVe's source
    /// (steve-community/steve, Aug 2026): `web/dto/TransactionQueryForm.java` (`type` ALL |
    /// ACTIVE | STOPPED, `periodType`, repeatable `transactionPk` / `chargeBoxId`),
    /// `web/dto/QueryPeriodFromToFilter.java` (`from`/`to`, ISO 8601 with zone, `to` after
    /// `from`) and `repository/impl/TransactionRepositoryImpl.java`, whose period condition is
    /// on `START_TIMESTAMP` and whose STOPPED type means `STOP_TIMESTAMP IS NOT NULL`.
    pub async fn stopped_started_between(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<SteveSession>, SteveError> {
        let bad = |t: i64| SteveError::Schema(format!("time {t} is outside the calendar"));
        let from = steve_timestamp(from).ok_or_else(|| bad(from))?;
        let to = steve_timestamp(to).ok_or_else(|| bad(to))?;
        let url = self.transactions_with(&format!(
            "type=STOPPED&periodType=FROM_TO&from={from}&to={to}"
        ));
        sessions_from_transactions(&self.get(url).await?)
    }

    /// `GET {root}/api/v1/transactions?transactionPk=N&chargeBoxId=CB&type=ALL`: whether SteVe
    /// knows this session at all (active or stopped, whenever it started).
    pub async fn knows(
        &self,
        charge_box_id: &str,
        ocpp_transaction_id: i64,
    ) -> Result<bool, SteveError> {
        let body = self
            .get(self.by_pk_url(charge_box_id, ocpp_transaction_id))
            .await?;
        let transactions: Vec<SteveTransaction> = parse(&body)?;
        Ok(transactions
            .iter()
            .any(|t| t.id == ocpp_transaction_id && t.charge_box_id == charge_box_id))
    }

    fn by_pk_url(&self, charge_box_id: &str, ocpp_transaction_id: i64) -> url::Url {
        self.transactions_with(&format!(
            "transactionPk={ocpp_transaction_id}&chargeBoxId={}&type=ALL",
            percent_encoding::utf8_percent_encode(
                charge_box_id,
                percent_encoding::NON_ALPHANUMERIC
            )
        ))
    }

    /// The transactions URL with `query` (already encoded).
    fn transactions_with(&self, query: &str) -> url::Url {
        let mut url = self.transactions_url.clone();
        url.set_query(Some(query));
        url
    }

    /// One authenticated GET; the body of a 200, else an error without the credentials.
    async fn get(&self, url: url::Url) -> Result<String, SteveError> {
        let request = match &self.auth {
            SteveAuth::Basic { user, password } => {
                self.http.get(url).basic_auth(user, Some(password.expose()))
            }
            SteveAuth::LegacyKey(key) => self.http.get(url).header("STEVE-API-KEY", key.expose()),
        };
        let response = request
            .send()
            .await
            .map_err(|e| SteveError::Http(e.without_url().to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .text()
            .await
            .map_err(|e| SteveError::Http(e.without_url().to_string()))?;
        if status != 200 {
            return Err(SteveError::Status {
                status,
                body: body.chars().take(300).collect(),
            });
        }
        Ok(body)
    }

    /// The start of `ocpp_transaction_id` at `charge_box_id` as SteVe recorded it, as a tap
    /// record received at `received_at` (`None` if SteVe does not know it at that charge box).
    /// SteVe's REST does not report the idTagInfo status of the start: SteVe stored the
    /// transaction, so it is taken as accepted.
    pub async fn recover_start(
        &self,
        charge_box_id: &str,
        ocpp_transaction_id: i64,
        received_at: i64,
    ) -> Result<Option<TapRecord>, SteveError> {
        let body = self
            .get(self.by_pk_url(charge_box_id, ocpp_transaction_id))
            .await?;
        start_from_transactions(&body, charge_box_id, ocpp_transaction_id, received_at)
    }
}

/// Picks the transaction `ocpp_transaction_id` of `charge_box_id` out of SteVe's answer and
/// turns it into a Start record. A record of another charge box is never taken: transaction
/// ids are SteVe's, but a stale or filtered-out answer must not bill the wrong charger.
fn start_from_transactions(
    body: &str,
    charge_box_id: &str,
    ocpp_transaction_id: i64,
    received_at: i64,
) -> Result<Option<TapRecord>, SteveError> {
    let transactions: Vec<SteveTransaction> = parse(body)?;
    let Some(found) = transactions
        .into_iter()
        .find(|t| t.id == ocpp_transaction_id && t.charge_box_id == charge_box_id)
    else {
        return Ok(None);
    };
    let meter_start_wh = number(&found.start_value).ok_or_else(|| {
        SteveError::Schema(format!("startValue {} is not a number", found.start_value))
    })?;
    let timestamp =
        match found.start_timestamp.as_deref() {
            Some(text) => Some(parse_timestamp(text).map_err(|_| {
                SteveError::Schema(format!("startTimestamp {text:?} is not ISO-8601"))
            })?),
            None => None,
        };
    Ok(Some(TapRecord {
        charge_box_id: charge_box_id.to_string(),
        received_at,
        kind: TapKind::Start(StartRecord {
            connector_id: found.connector_id,
            id_tag: found.ocpp_id_tag,
            meter_start_wh,
            timestamp,
            ocpp_transaction_id,
            id_tag_status: "Accepted".into(),
        }),
    }))
}

fn parse(body: &str) -> Result<Vec<SteveTransaction>, SteveError> {
    serde_json::from_str(body).map_err(|e| {
        SteveError::Schema(format!(
            "{e}: {}",
            body.chars().take(500).collect::<String>()
        ))
    })
}

/// SteVe's list as stopped sessions. A transaction without a stop (an answer that ignored
/// `type=STOPPED`) is not a stopped session and is left out; a stopped one whose values or
/// times do not parse fails the whole answer: a session is never silently left out.
fn sessions_from_transactions(body: &str) -> Result<Vec<SteveSession>, SteveError> {
    let mut sessions = Vec::new();
    for t in parse(body)? {
        let (Some(stop_value), Some(stop_timestamp)) = (&t.stop_value, &t.stop_timestamp) else {
            continue;
        };
        if stop_value.is_null() {
            continue;
        }
        let value = |v: &serde_json::Value, what: &str| {
            number(v).ok_or_else(|| {
                SteveError::Schema(format!(
                    "transaction {} at {}: {what} {v} is not a number",
                    t.id, t.charge_box_id
                ))
            })
        };
        let time = |text: &str, what: &str| {
            parse_timestamp(text).map_err(|_| {
                SteveError::Schema(format!(
                    "transaction {} at {}: {what} {text:?} is not ISO-8601",
                    t.id, t.charge_box_id
                ))
            })
        };
        sessions.push(SteveSession {
            ocpp_transaction_id: t.id,
            start_wh: value(&t.start_value, "startValue")?,
            stop_wh: value(stop_value, "stopValue")?,
            started_at: t
                .start_timestamp
                .as_deref()
                .map(|text| time(text, "startTimestamp"))
                .transpose()?,
            stopped_at: time(stop_timestamp, "stopTimestamp")?,
            charge_box_id: t.charge_box_id,
            connector_id: t.connector_id,
            id_tag: t.ocpp_id_tag,
        });
    }
    Ok(sessions)
}

fn number(value: &serde_json::Value) -> Option<Decimal> {
    match value {
        serde_json::Value::String(s) => parse_decimal(s).ok(),
        serde_json::Value::Number(n) => parse_decimal(&n.to_string()).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SteVe's answer to `GET /api/v1/transactions?...&type=ALL`, built from the field names
    /// and formats of `repository/dto/Transaction.java` and the expectations of
    /// `web/api/TransactionRestControllerTest.java` (steve-community/steve).
    const FIXTURE: &str = include_str!("../tests/fixtures/steve/transactions.json");

    fn start(record: TapRecord) -> StartRecord {
        match record.kind {
            TapKind::Start(start) => start,
            other => panic!("not a start: {other:?}"),
        }
    }

    #[test]
    fn a_stopped_transaction_of_the_charger_becomes_its_start() {
        let found = start_from_transactions(FIXTURE, "cb-2", 1, 99)
            .unwrap()
            .expect("transaction 1 of cb-2");
        let s = start(found);
        assert_eq!(s.ocpp_transaction_id, 1);
        assert_eq!(s.connector_id, 2);
        assert_eq!(s.id_tag, "id-3");
        assert_eq!(s.meter_start_wh, Decimal::from(12_345));
        assert_eq!(s.timestamp, Some(1_664_582_400), "2022-10-01T00:00:00.000Z");
        assert_eq!(s.id_tag_status, "Accepted");
    }

    #[test]
    fn an_active_transaction_with_a_zone_offset_is_read_in_utc() {
        let s = start(
            start_from_transactions(FIXTURE, "cb-2", 7, 99)
                .unwrap()
                .unwrap(),
        );
        assert_eq!(s.meter_start_wh, Decimal::new(5005, 1), "500.5 Wh");
        assert_eq!(s.timestamp, Some(1_664_582_400), "02:00+02:00 is 00:00Z");
    }

    #[test]
    fn a_record_of_another_charge_box_is_never_taken() {
        // Transaction 1 exists, but at cb-2: cb-9 asking for 1 learns nothing.
        assert!(
            start_from_transactions(FIXTURE, "cb-9", 1, 99)
                .unwrap()
                .is_none()
        );
        assert!(
            start_from_transactions("[]", "cb-2", 1, 99)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_broken_answer_is_an_error_not_a_missing_start() {
        for body in [
            "<html>",
            r#"{"status":401}"#,
            r#"[{"id":1,"connectorId":1,"chargeBoxId":"cb-2","ocppIdTag":"t","startValue":"x","startTimestamp":null}]"#,
            r#"[{"id":1,"connectorId":1,"chargeBoxId":"cb-2","ocppIdTag":"t","startValue":"1","startTimestamp":"yesterday"}]"#,
        ] {
            assert!(
                start_from_transactions(body, "cb-2", 1, 99).is_err(),
                "{body}"
            );
        }
    }

    #[test]
    fn stopped_transactions_become_sessions_active_ones_are_left_out() {
        let sessions = sessions_from_transactions(FIXTURE).unwrap();
        assert!(
            sessions.iter().all(|s| s.ocpp_transaction_id != 7),
            "7 is active"
        );
        let one = sessions
            .iter()
            .find(|s| s.ocpp_transaction_id == 1)
            .expect("transaction 1 is stopped");
        assert_eq!(one.charge_box_id, "cb-2");
        assert_eq!(one.start_wh, Decimal::from(12_345));
        assert_eq!(one.started_at, Some(1_664_582_400));
        assert!(one.stop_wh >= one.start_wh);
    }

    #[test]
    fn steve_period_times_are_iso_with_millis() {
        assert_eq!(
            steve_timestamp(1_724_596_200).as_deref(),
            Some("2024-08-25T14:30:00.000Z")
        );
        assert_eq!(steve_timestamp(i64::MAX), None);
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let basic = SteveAuth::Basic {
            user: "bridge".into(),
            password: ApiKey::new("pa:ss"),
        };
        let legacy = SteveAuth::LegacyKey(ApiKey::new("k-123"));
        let client = SteveClient::new(
            &"http://127.0.0.1:1/steve".parse().unwrap(),
            basic.clone(),
            Duration::from_secs(1),
        )
        .unwrap();
        let shown = format!("{basic:?} {legacy:?} {client:?}");
        assert!(shown.contains("bridge"));
        assert!(
            !shown.contains("pa:ss") && !shown.contains("k-123"),
            "{shown}"
        );
    }
}
