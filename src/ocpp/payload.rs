//! Lenient views of the billing payloads (StartTransaction, MeterValues, StopTransaction).
//!
//! Real chargers deviate from the 1.6 schemas in fields we do not need (extra fields, numbers
//! where strings are required, lowercase units), so these views read only what billing needs and
//! accept a number or a string for every scalar. JSON numbers are read from their text through
//! [`RawValue`]: no float ever touches a reading.

use crate::ocpp::units::{self, UnitError};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;

/// The default and only billed measurand (OCPP 1.6 §7.31 default).
pub const ENERGY_REGISTER: &str = "Energy.Active.Import.Register";

/// Why a billing payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// The payload (or a nested element) is not a JSON object of the expected shape.
    #[error("{0}")]
    BadShape(String),
    /// A field billing needs is absent or null.
    #[error("missing field {0}")]
    Missing(&'static str),
    /// A field billing needs has a value we cannot read.
    #[error("invalid field {field}: {detail}")]
    Invalid {
        /// The OCPP field name.
        field: &'static str,
        /// What was wrong with it.
        detail: String,
    },
}

impl ViewError {
    /// Stable code for counters.
    pub fn as_str(&self) -> &'static str {
        match self {
            ViewError::BadShape(_) => "bad_shape",
            ViewError::Missing(_) => "missing_field",
            ViewError::Invalid { .. } => "invalid_field",
        }
    }
}

type Raw<'a> = Option<&'a RawValue>;

fn required<'a>(raw: Raw<'a>, field: &'static str) -> Result<&'a RawValue, ViewError> {
    match raw {
        Some(r) if r.get() != "null" => Ok(r),
        _ => Err(ViewError::Missing(field)),
    }
}

fn optional(raw: Raw<'_>) -> Option<&RawValue> {
    raw.filter(|r| r.get() != "null")
}

/// The scalar text of a JSON string (unescaped) or number (verbatim); `None` for other kinds.
fn scalar_text(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    match text.as_bytes().first()? {
        b'"' => {
            let inner = &text[1..text.len() - 1];
            if inner.contains('\\') {
                serde_json::from_str::<String>(text).ok().map(Cow::Owned)
            } else {
                Some(Cow::Borrowed(inner))
            }
        }
        b'-' | b'0'..=b'9' => Some(Cow::Borrowed(text)),
        _ => None,
    }
}

fn text_field(raw: &RawValue, field: &'static str) -> Result<String, ViewError> {
    scalar_text(raw)
        .map(Cow::into_owned)
        .ok_or_else(|| ViewError::Invalid {
            field,
            detail: format!("not a string or number: {}", raw.get()),
        })
}

fn opt_text(raw: Raw<'_>) -> Option<Cow<'_, str>> {
    optional(raw).and_then(scalar_text)
}

fn decimal_field(raw: &RawValue, field: &'static str) -> Result<Decimal, ViewError> {
    let text = text_field(raw, field)?;
    units::parse_decimal(&text).map_err(|e| ViewError::Invalid {
        field,
        detail: e.to_string(),
    })
}

fn int_field(raw: &RawValue, field: &'static str) -> Result<i64, ViewError> {
    let value = decimal_field(raw, field)?;
    let invalid = || ViewError::Invalid {
        field,
        detail: format!("not an integer: {}", raw.get()),
    };
    if !value.fract().is_zero() {
        return Err(invalid());
    }
    i64::try_from(value.trunc()).map_err(|_| invalid())
}

fn opt_timestamp(raw: Raw<'_>) -> Option<i64> {
    opt_text(raw).and_then(|t| units::parse_timestamp(&t).ok())
}

fn object<'a, T: Deserialize<'a>>(text: &'a str, what: &str) -> Result<T, ViewError> {
    // A derived struct would also accept a JSON array positionally; OCPP payloads are objects.
    if !text.trim_start().starts_with('{') {
        return Err(ViewError::BadShape(format!("{what}: not an object")));
    }
    serde_json::from_str(text).map_err(|e| ViewError::BadShape(format!("{what}: {e}")))
}

fn array<'a>(raw: &'a RawValue, field: &'static str) -> Result<Vec<&'a RawValue>, ViewError> {
    serde_json::from_str(raw.get()).map_err(|_| ViewError::Invalid {
        field,
        detail: "not an array".to_owned(),
    })
}

/// One reading of the main energy register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnergyReading {
    /// The charger's timestamp of the meter value, unix seconds (`None` when unreadable).
    pub timestamp: Option<i64>,
    /// The register in Wh.
    pub wh: Decimal,
    /// The reading context (`Sample.Periodic` when absent).
    pub context: String,
    /// One unit of the reading's last digit, in Wh (`"3.5"` kWh → 100); records stored before
    /// this field read as 1 Wh.
    #[serde(default = "one_wh")]
    pub resolution_wh: Decimal,
}

fn one_wh() -> Decimal {
    Decimal::ONE
}

/// `StartTransaction.req`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartTransactionReq {
    /// The connector the session runs on.
    pub connector_id: i64,
    /// The idTag that started the session.
    pub id_tag: String,
    /// The register at the start, in Wh.
    pub meter_start_wh: Decimal,
    /// The charger's start time, unix seconds (`None` when unreadable).
    pub timestamp: Option<i64>,
}

#[derive(Deserialize)]
struct StartReqRaw<'a> {
    #[serde(rename = "connectorId", borrow, default)]
    connector_id: Raw<'a>,
    #[serde(rename = "idTag", borrow, default)]
    id_tag: Raw<'a>,
    #[serde(rename = "meterStart", borrow, default)]
    meter_start: Raw<'a>,
    #[serde(borrow, default)]
    timestamp: Raw<'a>,
}

/// Reads a `StartTransaction.req` payload.
pub fn start_transaction_req(payload: &str) -> Result<StartTransactionReq, ViewError> {
    let raw: StartReqRaw = object(payload, "StartTransaction")?;
    Ok(StartTransactionReq {
        connector_id: int_field(required(raw.connector_id, "connectorId")?, "connectorId")?,
        id_tag: text_field(required(raw.id_tag, "idTag")?, "idTag")?,
        meter_start_wh: decimal_field(required(raw.meter_start, "meterStart")?, "meterStart")?,
        timestamp: opt_timestamp(raw.timestamp),
    })
}

/// `StartTransaction.conf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartTransactionConf {
    /// The id the central system gave the session.
    pub transaction_id: i64,
    /// `idTagInfo.status` ("Accepted", "Invalid", ...).
    pub id_tag_status: String,
}

#[derive(Deserialize)]
struct StartConfRaw<'a> {
    #[serde(rename = "transactionId", borrow, default)]
    transaction_id: Raw<'a>,
    #[serde(rename = "idTagInfo", borrow, default)]
    id_tag_info: Raw<'a>,
}

#[derive(Deserialize)]
struct IdTagInfoRaw<'a> {
    #[serde(borrow, default)]
    status: Raw<'a>,
}

/// Reads a `StartTransaction.conf` payload.
pub fn start_transaction_conf(payload: &str) -> Result<StartTransactionConf, ViewError> {
    let raw: StartConfRaw = object(payload, "StartTransaction.conf")?;
    let info: IdTagInfoRaw = object(required(raw.id_tag_info, "idTagInfo")?.get(), "idTagInfo")?;
    Ok(StartTransactionConf {
        transaction_id: int_field(
            required(raw.transaction_id, "transactionId")?,
            "transactionId",
        )?,
        id_tag_status: text_field(
            required(info.status, "idTagInfo.status")?,
            "idTagInfo.status",
        )?,
    })
}

/// What a list of meter values held besides main-meter energy readings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkippedValues {
    /// Energy register values in `SignedData` format (not billed: we cannot read them).
    pub signed: usize,
    /// Energy register values of one phase or of another location (not the main meter).
    pub not_main_meter: usize,
}

#[derive(Deserialize)]
struct MeterValueRaw<'a> {
    #[serde(borrow, default)]
    timestamp: Raw<'a>,
    #[serde(rename = "sampledValue", borrow, default)]
    sampled_value: Raw<'a>,
}

#[derive(Deserialize)]
struct SampledValueRaw<'a> {
    #[serde(borrow, default)]
    value: Raw<'a>,
    #[serde(borrow, default)]
    context: Raw<'a>,
    #[serde(borrow, default)]
    format: Raw<'a>,
    #[serde(borrow, default)]
    measurand: Raw<'a>,
    #[serde(borrow, default)]
    phase: Raw<'a>,
    #[serde(borrow, default)]
    location: Raw<'a>,
    #[serde(borrow, default)]
    unit: Raw<'a>,
}

/// Picks the main-meter energy reading of each `meterValue` element (the first one, if several).
fn energy_readings(
    meter_value: &RawValue,
    field: &'static str,
) -> Result<(Vec<EnergyReading>, SkippedValues), ViewError> {
    let mut readings = Vec::new();
    let mut skipped = SkippedValues::default();
    for element in array(meter_value, field)? {
        let mv: MeterValueRaw = object(element.get(), field)?;
        let timestamp = opt_timestamp(mv.timestamp);
        let Some(sampled) = optional(mv.sampled_value) else {
            continue;
        };
        for sv_raw in array(sampled, "sampledValue")? {
            let sv: SampledValueRaw = object(sv_raw.get(), "sampledValue")?;
            let is_register = opt_text(sv.measurand)
                .is_none_or(|m| m.trim().eq_ignore_ascii_case(ENERGY_REGISTER));
            if !is_register {
                continue;
            }
            let is_main = optional(sv.phase).is_none()
                && opt_text(sv.location).is_none_or(|l| l.trim().eq_ignore_ascii_case("Outlet"));
            if !is_main {
                skipped.not_main_meter += 1;
                continue;
            }
            if opt_text(sv.format).is_some_and(|f| f.trim().eq_ignore_ascii_case("SignedData")) {
                skipped.signed += 1;
                continue;
            }
            let value = text_field(
                required(sv.value, "sampledValue.value")?,
                "sampledValue.value",
            )?;
            let unit = opt_text(sv.unit);
            let (wh, resolution_wh) = match units::energy_reading_wh(&value, unit.as_deref()) {
                Ok(reading) => reading,
                // A sampled value with no measurand but a non-energy unit is not a register.
                Err(UnitError::NotEnergy(_)) => continue,
                Err(e) => {
                    return Err(ViewError::Invalid {
                        field: "sampledValue.value",
                        detail: e.to_string(),
                    });
                }
            };
            let context = opt_text(sv.context)
                .map(|c| c.trim().to_owned())
                .unwrap_or_else(|| "Sample.Periodic".to_owned());
            readings.push(EnergyReading {
                timestamp,
                wh,
                context,
                resolution_wh,
            });
            break;
        }
    }
    Ok((readings, skipped))
}

/// `MeterValues.req` (1.6 shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterValuesReq {
    /// The connector measured (0 = the whole charge point).
    pub connector_id: i64,
    /// The session, when the charger says which.
    pub transaction_id: Option<i64>,
    /// Main-meter energy register readings, in message order.
    pub readings: Vec<EnergyReading>,
    /// Energy values that are not billed.
    pub skipped: SkippedValues,
}

#[derive(Deserialize)]
struct MeterValuesRaw<'a> {
    #[serde(rename = "connectorId", borrow, default)]
    connector_id: Raw<'a>,
    #[serde(rename = "transactionId", borrow, default)]
    transaction_id: Raw<'a>,
    #[serde(rename = "meterValue", borrow, default)]
    meter_value: Raw<'a>,
}

/// Reads an OCPP 1.6 `MeterValues.req` payload.
pub fn meter_values_req(payload: &str) -> Result<MeterValuesReq, ViewError> {
    let raw: MeterValuesRaw = object(payload, "MeterValues")?;
    let connector_id = int_field(required(raw.connector_id, "connectorId")?, "connectorId")?;
    let transaction_id = optional(raw.transaction_id)
        .map(|r| int_field(r, "transactionId"))
        .transpose()?;
    let (readings, skipped) =
        energy_readings(required(raw.meter_value, "meterValue")?, "meterValue")?;
    Ok(MeterValuesReq {
        connector_id,
        transaction_id,
        readings,
        skipped,
    })
}

/// `StopTransaction.req`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopTransactionReq {
    /// The session being stopped.
    pub transaction_id: i64,
    /// The register at the stop, in Wh.
    pub meter_stop_wh: Decimal,
    /// The charger's stop time, unix seconds (`None` when unreadable).
    pub timestamp: Option<i64>,
    /// The idTag that stopped the session, if sent.
    pub id_tag: Option<String>,
    /// The stop reason, if sent.
    pub reason: Option<String>,
    /// Main-meter energy readings from `transactionData` (empty when absent or unreadable).
    pub readings: Vec<EnergyReading>,
}

impl StopTransactionReq {
    /// The `Transaction.Begin` reading of `transactionData`, if the charger sent one.
    pub fn begin_reading(&self) -> Option<&EnergyReading> {
        self.readings
            .iter()
            .find(|r| r.context.eq_ignore_ascii_case("Transaction.Begin"))
    }
}

#[derive(Deserialize)]
struct StopRaw<'a> {
    #[serde(rename = "transactionId", borrow, default)]
    transaction_id: Raw<'a>,
    #[serde(rename = "meterStop", borrow, default)]
    meter_stop: Raw<'a>,
    #[serde(borrow, default)]
    timestamp: Raw<'a>,
    #[serde(rename = "idTag", borrow, default)]
    id_tag: Raw<'a>,
    #[serde(borrow, default)]
    reason: Raw<'a>,
    #[serde(rename = "transactionData", borrow, default)]
    transaction_data: Raw<'a>,
}

/// Reads a `StopTransaction.req` payload; `transactionData` only in the 1.6 shape.
///
/// An unreadable `transactionData` is dropped rather than failing the Stop: the Stop's own
/// `meterStop` is what bills the session, `transactionData` only helps.
pub fn stop_transaction_req(
    payload: &str,
    read_transaction_data: bool,
) -> Result<StopTransactionReq, ViewError> {
    let raw: StopRaw = object(payload, "StopTransaction")?;
    let readings = match optional(raw.transaction_data) {
        Some(data) if read_transaction_data => energy_readings(data, "transactionData")
            .map(|(r, _)| r)
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    Ok(StopTransactionReq {
        transaction_id: int_field(
            required(raw.transaction_id, "transactionId")?,
            "transactionId",
        )?,
        meter_stop_wh: decimal_field(required(raw.meter_stop, "meterStop")?, "meterStop")?,
        timestamp: opt_timestamp(raw.timestamp),
        id_tag: opt_text(raw.id_tag).map(Cow::into_owned),
        reason: opt_text(raw.reason).map(Cow::into_owned),
        readings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn start_req_strict_and_lenient() {
        let s = start_transaction_req(
            r#"{"connectorId":1,"idTag":"ABC","meterStart":1234,"timestamp":"2023-11-14T22:13:20Z"}"#,
        )
        .unwrap();
        assert_eq!(
            s,
            StartTransactionReq {
                connector_id: 1,
                id_tag: "ABC".into(),
                meter_start_wh: d("1234"),
                timestamp: Some(1_700_000_000),
            }
        );
        let s = start_transaction_req(
            r#"{"connectorId":"2","idTag":12345,"meterStart":"1234.0","timestamp":"garbage","vendor":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(s.connector_id, 2);
        assert_eq!(s.id_tag, "12345");
        assert_eq!(s.meter_start_wh, d("1234"));
        assert_eq!(s.timestamp, None);
        let s = start_transaction_req(r#"{"connectorId":1.0,"idTag":"A","meterStart":1234.5}"#)
            .unwrap();
        assert_eq!(s.meter_start_wh, d("1234.5"));
        assert_eq!(s.connector_id, 1);
    }

    #[test]
    fn start_req_errors() {
        assert_eq!(
            start_transaction_req(r#"{"connectorId":1,"idTag":"A"}"#),
            Err(ViewError::Missing("meterStart"))
        );
        assert_eq!(
            start_transaction_req(r#"{"connectorId":1,"idTag":"A","meterStart":null}"#),
            Err(ViewError::Missing("meterStart"))
        );
        assert!(matches!(
            start_transaction_req(r#"{"connectorId":1,"idTag":"A","meterStart":"NaN"}"#),
            Err(ViewError::Invalid {
                field: "meterStart",
                ..
            })
        ));
        assert!(matches!(
            start_transaction_req(r#"{"connectorId":1.5,"idTag":"A","meterStart":1}"#),
            Err(ViewError::Invalid {
                field: "connectorId",
                ..
            })
        ));
        assert!(matches!(
            start_transaction_req(r#"[1,2]"#),
            Err(ViewError::BadShape(_))
        ));
        assert!(matches!(
            start_transaction_req(r#"{"connectorId":1,"idTag":{"a":1},"meterStart":1}"#),
            Err(ViewError::Invalid { field: "idTag", .. })
        ));
    }

    #[test]
    fn start_conf() {
        let c = start_transaction_conf(
            r#"{"idTagInfo":{"status":"Accepted","expiryDate":"x"},"transactionId":42}"#,
        )
        .unwrap();
        assert_eq!(c.transaction_id, 42);
        assert_eq!(c.id_tag_status, "Accepted");
        assert_eq!(
            start_transaction_conf(r#"{"transactionId":42}"#),
            Err(ViewError::Missing("idTagInfo"))
        );
        let c =
            start_transaction_conf(r#"{"idTagInfo":{"status":"Invalid"},"transactionId":"-1"}"#)
                .unwrap();
        assert_eq!(c.transaction_id, -1);
    }

    fn mv(sampled: &str) -> MeterValuesReq {
        meter_values_req(&format!(
            r#"{{"connectorId":1,"transactionId":7,"meterValue":[{{"timestamp":"2023-11-14T22:13:20Z","sampledValue":{sampled}}}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn meter_values_shapes() {
        let r = |wh: &str| EnergyReading {
            timestamp: Some(1_700_000_000),
            wh: d(wh),
            context: "Sample.Periodic".into(),
            resolution_wh: Decimal::ONE,
        };
        let kwh = |wh: &str, resolution: &str| EnergyReading {
            resolution_wh: d(resolution),
            ..r(wh)
        };
        // strict 1.6
        assert_eq!(
            mv(r#"[{"value":"1500","measurand":"Energy.Active.Import.Register","unit":"Wh"}]"#)
                .readings,
            vec![r("1500")]
        );
        // lowercase kWh, numeric value, missing unit, float string
        assert_eq!(
            mv(r#"[{"value":"1.5","unit":"kwh"}]"#).readings,
            vec![kwh("1500", "100")]
        );
        assert_eq!(
            mv(r#"[{"value":1.5,"unit":"kWh"}]"#).readings,
            vec![kwh("1500", "100")]
        );
        assert_eq!(mv(r#"[{"value":1500}]"#).readings, vec![r("1500")]);
        assert_eq!(
            mv(r#"[{"value":"1500.0"}]"#).readings,
            vec![kwh("1500", "0.1")]
        );
        // other measurands are skipped, the register is found after them
        let m = mv(
            r#"[{"value":"7400","measurand":"Power.Active.Import","unit":"W"},{"value":"16","measurand":"Current.Import","unit":"A","phase":"L1"},{"value":"2000","context":"Sample.Clock"}]"#,
        );
        assert_eq!(m.readings.len(), 1);
        assert_eq!(m.readings[0].wh, d("2000"));
        assert_eq!(m.readings[0].context, "Sample.Clock");
        // phase-split registers are not the main meter; the main one still wins
        let m = mv(
            r#"[{"value":"600","phase":"L1"},{"value":"600","phase":"L2"},{"value":"1800"},{"value":"1700","location":"Inlet"}]"#,
        );
        assert_eq!(m.readings, vec![r("1800")]);
        assert_eq!(m.skipped.not_main_meter, 2);
        let m = mv(r#"[{"value":"600","phase":"L1"},{"value":"600","phase":"L2"}]"#);
        assert!(m.readings.is_empty());
        assert_eq!(m.skipped.not_main_meter, 2);
        // location Outlet is the main meter
        assert_eq!(
            mv(r#"[{"value":"1500","location":"Outlet"}]"#).readings,
            vec![r("1500")]
        );
        // SignedData is not billed
        let m = mv(r#"[{"value":"AbCd==","format":"SignedData"}]"#);
        assert!(m.readings.is_empty());
        assert_eq!(m.skipped.signed, 1);
        // no measurand but a non-energy unit: not a register
        assert!(mv(r#"[{"value":"230","unit":"V"}]"#).readings.is_empty());
        // garbage register value
        assert!(meter_values_req(
            r#"{"connectorId":1,"meterValue":[{"timestamp":"x","sampledValue":[{"value":"abc"}]}]}"#
        )
        .is_err());
    }

    #[test]
    fn meter_values_without_transaction() {
        let m = meter_values_req(
            r#"{"connectorId":0,"meterValue":[{"timestamp":"2023-11-14T22:13:20Z","sampledValue":[{"value":"1"}]}]}"#,
        )
        .unwrap();
        assert_eq!(m.connector_id, 0);
        assert_eq!(m.transaction_id, None);
    }

    #[test]
    fn stop_with_transaction_data() {
        let s = stop_transaction_req(
            r#"{"transactionId":7,"meterStop":"4200.0","timestamp":"2023-11-14T22:13:20Z","reason":"EVDisconnected","idTag":"ABC",
               "transactionData":[
                 {"timestamp":"2023-11-14T20:00:00Z","sampledValue":[{"value":"1.0","unit":"kWh","context":"Transaction.Begin"}]},
                 {"timestamp":"2023-11-14T22:13:20Z","sampledValue":[{"value":"4200","context":"Transaction.End"}]}]}"#,
            true,
        )
        .unwrap();
        assert_eq!(s.transaction_id, 7);
        assert_eq!(s.meter_stop_wh, d("4200"));
        assert_eq!(s.reason.as_deref(), Some("EVDisconnected"));
        assert_eq!(s.id_tag.as_deref(), Some("ABC"));
        assert_eq!(s.readings.len(), 2);
        let begin = s.begin_reading().unwrap();
        assert_eq!(begin.wh, d("1000"));
        assert_eq!(begin.timestamp, Some(1_700_000_000 - 8000));
        // 1.5 shape (`values`) and garbage transactionData do not fail the Stop
        let s = stop_transaction_req(
            r#"{"transactionId":7,"meterStop":10,"timestamp":"2023-11-14T22:13:20Z","transactionData":[{"values":[]}]}"#,
            false,
        )
        .unwrap();
        assert!(s.readings.is_empty());
        let s = stop_transaction_req(
            r#"{"transactionId":7,"meterStop":10,"timestamp":"2023-11-14T22:13:20Z","transactionData":"x"}"#,
            true,
        )
        .unwrap();
        assert!(s.readings.is_empty() && s.begin_reading().is_none());
        assert_eq!(
            stop_transaction_req(r#"{"transactionId":7,"timestamp":"x"}"#, true),
            Err(ViewError::Missing("meterStop"))
        );
    }
}
