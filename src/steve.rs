//! I/O: SteVe's REST API (`GET /api/v1/transactions`), used for one thing: recovering the start
//! of a session whose StartTransaction the bridge never saw (it was started before the bridge
//! was in the path, or during an outage), so its Stop can still be billed instead of becoming a
//! `missing_start` dead letter.

use std::time::Duration;

use rust_decimal::Decimal;
use serde::Deserialize;

use crate::lago::ApiKey;
use crate::ocpp::units::{parse_decimal, parse_timestamp};
use crate::tap::{StartRecord, TapKind, TapRecord};

/// SteVe's REST endpoint and key.
#[derive(Clone)]
pub struct SteveClient {
    http: reqwest::Client,
    transactions_url: String,
    api_key: ApiKey,
}

impl std::fmt::Debug for SteveClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SteveClient")
            .field("transactions_url", &self.transactions_url)
            .finish_non_exhaustive()
    }
}

/// Why SteVe could not tell us a session's start.
#[derive(Debug, thiserror::Error)]
pub enum SteveError {
    #[error("SteVe REST request failed: {0}")]
    Http(String),
    #[error("SteVe REST answered HTTP {0}")]
    Status(u16),
    #[error("SteVe REST answer does not parse: {0}")]
    Schema(String),
}

/// The fields of SteVe's `Transaction` DTO we use; SteVe adds others freely.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SteveTransaction {
    id: i64,
    connector_id: i64,
    charge_box_id: String,
    ocpp_id_tag: String,
    start_timestamp: Option<serde_json::Value>,
    start_value: serde_json::Value,
}

impl SteveClient {
    /// A client for SteVe at `api_url` (e.g. `http://127.0.0.1:8080/steve`).
    pub fn new(api_url: &str, api_key: ApiKey, timeout: Duration) -> Result<Self, SteveError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| SteveError::Http(e.to_string()))?;
        Ok(SteveClient {
            http,
            transactions_url: format!("{}/api/v1/transactions", api_url.trim_end_matches('/')),
            api_key,
        })
    }

    /// The start of `ocpp_transaction_id` at `charge_box_id` as SteVe recorded it, as a tap
    /// record (`None` if SteVe does not know it). SteVe's REST does not report the idTagInfo
    /// status of the start: SteVe stored the transaction, so it is taken as accepted.
    pub async fn recover_start(
        &self,
        charge_box_id: &str,
        ocpp_transaction_id: i64,
        received_at: i64,
    ) -> Result<Option<TapRecord>, SteveError> {
        let url = format!(
            "{}?transactionPk={ocpp_transaction_id}&chargeBoxId={}&type=ALL",
            self.transactions_url,
            percent_encoding::utf8_percent_encode(
                charge_box_id,
                percent_encoding::NON_ALPHANUMERIC
            )
        );
        let response = self
            .http
            .get(url)
            .header("STEVE-API-KEY", self.api_key.expose())
            .send()
            .await
            .map_err(|e| SteveError::Http(e.without_url().to_string()))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(SteveError::Status(status));
        }
        let body = response
            .text()
            .await
            .map_err(|e| SteveError::Http(e.to_string()))?;
        let transactions: Vec<SteveTransaction> = serde_json::from_str(&body).map_err(|e| {
            SteveError::Schema(format!(
                "{e}: {}",
                body.chars().take(500).collect::<String>()
            ))
        })?;
        let Some(found) = transactions
            .into_iter()
            .find(|t| t.id == ocpp_transaction_id && t.charge_box_id == charge_box_id)
        else {
            return Ok(None);
        };
        let meter_start_wh = number(&found.start_value).ok_or_else(|| {
            SteveError::Schema(format!("startValue {} is not a number", found.start_value))
        })?;
        let timestamp = found
            .start_timestamp
            .as_ref()
            .and_then(|t| t.as_str())
            .and_then(|t| parse_timestamp(t).ok());
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
}

fn number(value: &serde_json::Value) -> Option<Decimal> {
    match value {
        serde_json::Value::String(s) => parse_decimal(s).ok(),
        serde_json::Value::Number(n) => parse_decimal(&n.to_string()).ok(),
        _ => None,
    }
}
