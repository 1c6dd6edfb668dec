//! The Lago usage event and its wire form (docs/lago-contract.md): decimal-string value, unix-seconds timestamp.
//!
//! Every `properties` value goes on the wire as a JSON string. Lago's OpenAPI spec types a
//! property value as `oneOf [string, integer, number]`, so an integer matches two branches and
//! a strict validator rejects the event; lago-api itself takes any scalar and ClickHouse stores
//! every property as a string anyway. Integers are read back in either form, so outbox rows
//! spooled before this change (integers) are still read and are sent as strings.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// One usage event as POSTed to `/api/v1/events/batch`; field order is the wire order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagoEvent {
    /// The idempotency key Lago dedupes on, rendered from `billing.transaction_id`.
    pub transaction_id: String,
    /// Rendered from `billing.external_subscription_id` or the subscription map.
    pub external_subscription_id: String,
    /// `lago.metric_code`.
    pub code: String,
    /// Unix seconds, fixed when the event is first derived and never recomputed.
    pub timestamp: i64,
    /// `value` (kWh as a decimal string) plus the session facts that explain the bill.
    pub properties: EventProperties,
}

/// Where an event's `timestamp` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampSource {
    /// The charger's Stop/MeterValues timestamp.
    Charger,
    /// The bridge's receive time, because the charger's was missing or implausible.
    Bridge,
}

/// The properties of a charging event: one Lago row explains the bill.
///
/// On the wire every value is a string (see the module doc): integers are written in decimal
/// and read back from a string or a number; an absent `charger_timestamp` is left out (the
/// spec has no `null` branch), which reads back as `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventProperties {
    /// Energy in kWh as an exact decimal string ("3.2", "0.005").
    pub value: String,
    /// The charge box of the session.
    pub charge_box_id: String,
    /// The connector of the session (0 when only known from a Stop's transactionData).
    #[serde(with = "int_as_string")]
    pub connector_id: i64,
    /// SteVe's transactionId.
    #[serde(with = "int_as_string")]
    pub ocpp_transaction_id: i64,
    /// Register reading at the start of what this event bills, in Wh (decimal string).
    pub meter_start_wh: String,
    /// Register reading at the end of what this event bills, in Wh (decimal string).
    pub meter_stop_wh: String,
    /// Unix seconds of the session's start.
    #[serde(with = "int_as_string")]
    pub started_at: i64,
    /// Unix seconds of the reading that closes this event (the Stop in session mode).
    #[serde(with = "int_as_string")]
    pub stopped_at: i64,
    /// The charger's timestamp of that reading, unix seconds, if it sent a readable one.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_int_as_string"
    )]
    pub charger_timestamp: Option<i64>,
    /// Bridge clock, unix seconds, when that reading arrived.
    #[serde(with = "int_as_string")]
    pub received_at: i64,
    /// Whether `timestamp`/`stopped_at` is the charger's or the bridge's time.
    pub timestamp_source: TimestampSource,
    /// Who queued the event when it is not live billing: `"reconcile"` for an event derived
    /// from SteVe's record by `reconcile --backfill`. Left out of live events (so their wire
    /// form is unchanged); a string, like every property.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// The `origin` of an event `reconcile --backfill` derived from SteVe's record.
pub const ORIGIN_RECONCILE: &str = "reconcile";

/// An `i64` property written as a decimal string, read from a string or a JSON integer.
mod int_as_string {
    use serde::{Deserializer, Serializer, de};
    use std::fmt;

    pub fn serialize<S: Serializer>(value: &i64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
        deserializer.deserialize_any(IntVisitor)
    }

    pub(super) struct IntVisitor;

    impl de::Visitor<'_> for IntVisitor {
        type Value = i64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an integer, as a decimal string or a JSON number")
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<i64, E> {
            Ok(value)
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<i64, E> {
            i64::try_from(value)
                .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(value), &self))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<i64, E> {
            // Only what `serialize` writes: an optional '-' and ASCII digits ("+1", " 1" refused).
            let digits = text.strip_prefix('-').unwrap_or(text);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(E::invalid_value(de::Unexpected::Str(text), &self));
            }
            text.parse()
                .map_err(|_| E::invalid_value(de::Unexpected::Str(text), &self))
        }
    }
}

/// An `Option<i64>` property: `None` is left out of the wire form (see `skip_serializing_if`);
/// a stored `null` (rows spooled before) reads back as `None`.
mod opt_int_as_string {
    use serde::{Deserializer, Serializer, de};
    use std::fmt;

    pub fn serialize<S: Serializer>(value: &Option<i64>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => serializer.collect_str(value),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<i64>, D::Error> {
        deserializer.deserialize_option(OptVisitor)
    }

    struct OptVisitor;

    impl<'de> de::Visitor<'de> for OptVisitor {
        type Value = Option<i64>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("null or an integer, as a decimal string or a JSON number")
        }

        fn visit_none<E: de::Error>(self) -> Result<Option<i64>, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Option<i64>, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Option<i64>, D::Error> {
            deserializer
                .deserialize_any(super::int_as_string::IntVisitor)
                .map(Some)
        }
    }
}

/// Formats Wh as kWh: exact, plain decimal, trailing zeros stripped ("3.2", "0.005", "0").
pub fn kwh_string(wh: Decimal) -> String {
    // Dividing by 10^3 only moves the decimal point: exact while the scale stays <= 28, which
    // the reading parser guarantees (ocpp::units caps input scale at 15).
    let mut kwh = wh;
    if kwh.set_scale(wh.scale() + 3).is_err() {
        // Only reachable for a decimal no reading parser produces; rounds at 28 digits.
        kwh = wh / Decimal::ONE_THOUSAND;
    }
    decimal_string(kwh)
}

/// Formats a decimal plainly with trailing zeros stripped and no negative zero.
pub fn decimal_string(value: Decimal) -> String {
    if value.is_zero() {
        return "0".to_owned();
    }
    value.normalize().to_string()
}

/// A plausible session event for tests of the stages that store and ship events.
#[cfg(test)]
pub(crate) fn sample_event(
    transaction_id: &str,
    external_subscription_id: &str,
    ocpp_transaction_id: i64,
) -> LagoEvent {
    LagoEvent {
        transaction_id: transaction_id.into(),
        external_subscription_id: external_subscription_id.into(),
        code: "charging_energy_kwh".into(),
        timestamp: 1_700_000_000 + ocpp_transaction_id,
        properties: EventProperties {
            value: format!("{ocpp_transaction_id}.5"),
            charge_box_id: "CP1".into(),
            connector_id: 1,
            ocpp_transaction_id,
            meter_start_wh: "0".into(),
            meter_stop_wh: format!("{}", ocpp_transaction_id * 1000 + 500),
            started_at: 1_700_000_000,
            stopped_at: 1_700_000_000 + ocpp_transaction_id,
            charger_timestamp: Some(1_700_000_000 + ocpp_transaction_id),
            received_at: 1_700_000_001 + ocpp_transaction_id,
            timestamp_source: TimestampSource::Charger,
            origin: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn kwh_examples() {
        assert_eq!(kwh_string(d("3200")), "3.2");
        assert_eq!(kwh_string(d("5")), "0.005");
        assert_eq!(kwh_string(d("0")), "0");
        assert_eq!(kwh_string(d("0.000")), "0");
        assert_eq!(kwh_string(d("-0.0")), "0");
        assert_eq!(kwh_string(d("1000000")), "1000");
        assert_eq!(kwh_string(d("1234.5")), "1.2345");
        assert_eq!(kwh_string(d("-250")), "-0.25");
        assert_eq!(kwh_string(d("0.001")), "0.000001");
        assert_eq!(decimal_string(d("1500.00")), "1500");
    }

    #[test]
    fn event_wire_form() {
        let event = LagoEvent {
            transaction_id: "CB-1".into(),
            external_subscription_id: "sub".into(),
            code: "kwh".into(),
            timestamp: 1_700_000_000,
            properties: EventProperties {
                value: "3.2".into(),
                charge_box_id: "CB".into(),
                connector_id: 1,
                ocpp_transaction_id: 1,
                meter_start_wh: "0".into(),
                meter_stop_wh: "3200".into(),
                started_at: 1_699_990_000,
                stopped_at: 1_700_000_000,
                charger_timestamp: Some(1_700_000_000),
                received_at: 1_700_000_001,
                timestamp_source: TimestampSource::Charger,
                origin: None,
            },
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            json,
            r#"{"transaction_id":"CB-1","external_subscription_id":"sub","code":"kwh","timestamp":1700000000,"properties":{"value":"3.2","charge_box_id":"CB","connector_id":"1","ocpp_transaction_id":"1","meter_start_wh":"0","meter_stop_wh":"3200","started_at":"1699990000","stopped_at":"1700000000","charger_timestamp":"1700000000","received_at":"1700000001","timestamp_source":"charger"}}"#
        );
        assert_eq!(serde_json::from_str::<LagoEvent>(&json).unwrap(), event);
    }

    /// Outbox rows spooled before properties went out as strings hold integers and a `null`
    /// charger timestamp: they still read back, and are then sent in the string form.
    #[test]
    fn rows_spooled_with_integer_properties_still_read_back() {
        let old = r#"{"transaction_id":"CB-1","external_subscription_id":"sub","code":"kwh","timestamp":1700000000,"properties":{"value":"3.2","charge_box_id":"CB","connector_id":1,"ocpp_transaction_id":-7,"meter_start_wh":"0","meter_stop_wh":"3200","started_at":1699990000,"stopped_at":1700000000,"charger_timestamp":null,"received_at":1700000001,"timestamp_source":"bridge"}}"#;
        let event: LagoEvent = serde_json::from_str(old).unwrap();
        assert_eq!(event.properties.connector_id, 1);
        assert_eq!(event.properties.ocpp_transaction_id, -7);
        assert_eq!(event.properties.started_at, 1_699_990_000);
        assert_eq!(event.properties.charger_timestamp, None);
        let json = serde_json::to_string(&event).unwrap();
        assert!(
            json.contains(r#""connector_id":"1","ocpp_transaction_id":"-7","#),
            "{json}"
        );
        assert!(!json.contains("charger_timestamp"), "{json}");
        assert_eq!(serde_json::from_str::<LagoEvent>(&json).unwrap(), event);

        let with_timestamp = old.replace(
            r#""charger_timestamp":null"#,
            r#""charger_timestamp":1700000000"#,
        );
        let event: LagoEvent = serde_json::from_str(&with_timestamp).unwrap();
        assert_eq!(event.properties.charger_timestamp, Some(1_700_000_000));
    }

    /// Lago's spec types a property as `oneOf [string, integer, number]`: an integer matches
    /// two branches and fails validation, `null` matches none. Guards every field added later.
    #[test]
    fn every_property_is_a_string_on_the_wire() {
        let mut event = sample_event("t", "s", 1);
        event.properties.ocpp_transaction_id = i64::MIN;
        event.properties.received_at = i64::MAX;
        let wire = serde_json::to_value(&event).unwrap();
        let properties = wire["properties"].as_object().unwrap();
        assert!(properties.contains_key("charger_timestamp"));
        for (name, value) in properties {
            assert!(
                value.is_string(),
                "properties.{name} is {value}, not a string"
            );
        }
        assert_eq!(properties["ocpp_transaction_id"], "-9223372036854775808");
        assert_eq!(serde_json::from_value::<LagoEvent>(wire).unwrap(), event);

        event.properties.charger_timestamp = None;
        let wire = serde_json::to_value(&event).unwrap();
        assert!(
            wire["properties"].get("charger_timestamp").is_none(),
            "{wire}"
        );
        assert_eq!(serde_json::from_value::<LagoEvent>(wire).unwrap(), event);
    }

    #[test]
    fn integer_properties_accept_only_what_is_written() {
        let with = |connector_id: &str| {
            let json = serde_json::to_string(&sample_event("t", "s", 1))
                .unwrap()
                .replacen(
                    r#""connector_id":"1""#,
                    &format!(r#""connector_id":{connector_id}"#),
                    1,
                );
            serde_json::from_str::<LagoEvent>(&json).map(|e| e.properties.connector_id)
        };
        assert_eq!(with(r#""2""#).unwrap(), 2);
        assert_eq!(with(r#""-2""#).unwrap(), -2);
        assert_eq!(with("3").unwrap(), 3);
        for bad in [
            r#""""#,
            r#""-""#,
            r#""+1""#,
            r#"" 1""#,
            r#""1.0""#,
            r#""1e3""#,
            r#""9223372036854775808""#,
            "1.5",
            "9223372036854775808",
            "null",
            "true",
        ] {
            assert!(with(bad).is_err(), "{bad} was accepted");
        }
    }

    proptest! {
        #[test]
        fn kwh_string_is_exact_plain_and_minimal(mantissa in any::<i64>(), scale in 0u32..=15) {
            let wh = Decimal::new(mantissa, scale);
            let text = kwh_string(wh);
            // Lago's sum_agg pattern; no exponent, no trailing zeros, no "-0".
            let b = text.as_bytes();
            let digits = text.strip_prefix('-').unwrap_or(&text);
            let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
            prop_assert!(!int.is_empty() && int.bytes().all(|c| c.is_ascii_digit()), "{}", text);
            prop_assert!(frac.bytes().all(|c| c.is_ascii_digit()), "{}", text);
            prop_assert!(!digits.contains('.') || !frac.is_empty() && !frac.ends_with('0'), "{}", text);
            prop_assert!(int == "0" || !int.starts_with('0'), "{}", text);
            prop_assert!(text != "-0" && b[0] != b'+');
            prop_assert_eq!(Decimal::from_str(&text).unwrap() * Decimal::ONE_THOUSAND, wh);
        }
    }
}
