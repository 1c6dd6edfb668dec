//! OCPP 1.6J payloads built from `rust-ocpp` types (schema-valid by construction) and the checks
//! of the central system's answers against the same types.

use chrono::Utc;
use rust_ocpp::v1_6::messages::boot_notification::{
    BootNotificationRequest, BootNotificationResponse,
};
use rust_ocpp::v1_6::messages::change_availability::ChangeAvailabilityResponse;
use rust_ocpp::v1_6::messages::change_configuration::ChangeConfigurationResponse;
use rust_ocpp::v1_6::messages::clear_cache::ClearCacheResponse;
use rust_ocpp::v1_6::messages::data_transfer::DataTransferResponse;
use rust_ocpp::v1_6::messages::get_configuration::GetConfigurationResponse;
use rust_ocpp::v1_6::messages::heart_beat::{HeartbeatRequest, HeartbeatResponse};
use rust_ocpp::v1_6::messages::meter_values::{MeterValuesRequest, MeterValuesResponse};
use rust_ocpp::v1_6::messages::remote_start_transaction::RemoteStartTransactionResponse;
use rust_ocpp::v1_6::messages::remote_stop_transaction::RemoteStopTransactionResponse;
use rust_ocpp::v1_6::messages::reset::ResetResponse;
use rust_ocpp::v1_6::messages::start_transaction::{
    StartTransactionRequest, StartTransactionResponse,
};
use rust_ocpp::v1_6::messages::status_notification::{
    StatusNotificationRequest, StatusNotificationResponse,
};
use rust_ocpp::v1_6::messages::stop_transaction::{
    StopTransactionRequest, StopTransactionResponse,
};
use rust_ocpp::v1_6::messages::trigger_message::TriggerMessageResponse;
use rust_ocpp::v1_6::messages::unlock_connector::UnlockConnectorResponse;
use rust_ocpp::v1_6::types::{
    AuthorizationStatus, AvailabilityStatus, ChargePointErrorCode, ChargePointStatus,
    ClearCacheStatus, ConfigurationStatus, DataTransferStatus, KeyValue, Measurand, MeterValue,
    ReadingContext, Reason, RegistrationStatus, RemoteStartStopStatus, ResetResponseStatus,
    SampledValue, TriggerMessageStatus, UnitOfMeasure, UnlockStatus,
};
use serde::Deserialize;
use serde::Serialize;
use serde_json::Value;

/// How sampled energy values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EnergyUnit {
    /// Every sample in Wh (integer).
    Wh,
    /// Every sample in kWh (three decimals).
    Kwh,
    /// Alternating Wh and kWh from one sample to the next.
    Mixed,
}

/// The connector every simulated session uses.
pub const CONNECTOR_ID: u32 = 1;

/// Serializes a request payload; `rust-ocpp` types cannot fail to serialize.
fn to_value<T: Serialize>(payload: &T) -> Value {
    serde_json::to_value(payload).expect("rust-ocpp payloads serialize")
}

/// BootNotification.req for a simulated charger.
pub fn boot_notification() -> BootNotificationRequest {
    BootNotificationRequest {
        charge_point_vendor: "ocpp-lago-bridge".into(),
        charge_point_model: "simulate".into(),
        firmware_version: Some(env!("CARGO_PKG_VERSION").into()),
        ..Default::default()
    }
}

/// Heartbeat.req.
pub fn heartbeat() -> HeartbeatRequest {
    HeartbeatRequest {}
}

/// StatusNotification.req for the simulated connector.
pub fn status_notification(status: ChargePointStatus) -> StatusNotificationRequest {
    StatusNotificationRequest {
        connector_id: CONNECTOR_ID,
        error_code: ChargePointErrorCode::NoError,
        status,
        timestamp: Some(Utc::now()),
        ..Default::default()
    }
}

/// StartTransaction.req with the meter register at `meter_start_wh`.
pub fn start_transaction(id_tag: &str, meter_start_wh: i32) -> StartTransactionRequest {
    StartTransactionRequest {
        connector_id: CONNECTOR_ID,
        id_tag: id_tag.into(),
        meter_start: meter_start_wh,
        reservation_id: None,
        timestamp: Utc::now(),
    }
}

/// MeterValues.req carrying the cumulative Energy.Active.Import.Register in `unit`.
pub fn meter_values(
    ocpp_transaction_id: i32,
    register_wh: i32,
    unit: UnitOfMeasure,
) -> MeterValuesRequest {
    let value = match unit {
        UnitOfMeasure::KWh => format!("{}.{:03}", register_wh / 1000, register_wh % 1000),
        _ => register_wh.to_string(),
    };
    MeterValuesRequest {
        connector_id: CONNECTOR_ID,
        transaction_id: Some(ocpp_transaction_id),
        meter_value: vec![MeterValue {
            timestamp: Utc::now(),
            sampled_value: vec![SampledValue {
                value,
                context: Some(ReadingContext::SamplePeriodic),
                measurand: Some(Measurand::EnergyActiveImportRegister),
                unit: Some(unit),
                ..Default::default()
            }],
        }],
    }
}

/// StopTransaction.req with the meter register at `meter_stop_wh`.
pub fn stop_transaction(
    ocpp_transaction_id: i32,
    id_tag: &str,
    meter_stop_wh: i32,
) -> StopTransactionRequest {
    StopTransactionRequest {
        id_tag: Some(id_tag.into()),
        meter_stop: meter_stop_wh,
        timestamp: Utc::now(),
        transaction_id: ocpp_transaction_id,
        reason: Some(Reason::Local),
        transaction_data: None,
    }
}

/// Why a CALLRESULT payload is not what the action's schema demands.
#[derive(Debug, thiserror::Error)]
#[error("{action}.conf does not match its schema: {source}")]
pub struct InvalidReply {
    action: &'static str,
    source: serde_json::Error,
}

/// Deserializes the payload text straight into the rust-ocpp type: the same checks as going
/// through a `serde_json::Value` first (types, required fields, enum values, no trailing text),
/// without building the intermediate tree.
fn parse<'a, T: Deserialize<'a>>(
    action: &'static str,
    payload: &'a str,
) -> Result<T, InvalidReply> {
    serde_json::from_str(payload).map_err(|source| InvalidReply { action, source })
}

/// What the simulator needs from a valid answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// BootNotification.conf: whether the charger was accepted, and the heartbeat interval.
    Boot { accepted: bool, interval_s: u32 },
    /// StartTransaction.conf: the transaction id and whether the id tag was accepted.
    Start {
        ocpp_transaction_id: i32,
        accepted: bool,
    },
    /// Any other answer: valid, nothing to act on.
    Other,
}

/// Checks a CALLRESULT payload (its JSON text) against the schema of `action`'s .conf.
pub fn check_reply(action: &'static str, payload: &str) -> Result<Reply, InvalidReply> {
    Ok(match action {
        "BootNotification" => {
            let conf: BootNotificationResponse = parse(action, payload)?;
            Reply::Boot {
                accepted: conf.status == RegistrationStatus::Accepted,
                interval_s: conf.interval,
            }
        }
        "Heartbeat" => {
            parse::<HeartbeatResponse>(action, payload)?;
            Reply::Other
        }
        "StatusNotification" => {
            parse::<StatusNotificationResponse>(action, payload)?;
            Reply::Other
        }
        "StartTransaction" => {
            let conf: StartTransactionResponse = parse(action, payload)?;
            Reply::Start {
                ocpp_transaction_id: conf.transaction_id,
                accepted: conf.id_tag_info.status == AuthorizationStatus::Accepted,
            }
        }
        "MeterValues" => {
            parse::<MeterValuesResponse>(action, payload)?;
            Reply::Other
        }
        "StopTransaction" => {
            parse::<StopTransactionResponse>(action, payload)?;
            Reply::Other
        }
        _ => {
            parse::<serde::de::IgnoredAny>(action, payload)?;
            Reply::Other
        }
    })
}

/// The CALLRESULT payload a simulated charger answers a central-system CALL with, or `None`
/// for an action it does not implement (answered with a NotImplemented CALLERROR).
pub fn answer_central_call(action: &str, heartbeat_interval_s: u64) -> Option<Value> {
    Some(match action {
        "RemoteStartTransaction" => to_value(&RemoteStartTransactionResponse {
            status: RemoteStartStopStatus::Accepted,
        }),
        "RemoteStopTransaction" => to_value(&RemoteStopTransactionResponse {
            status: RemoteStartStopStatus::Accepted,
        }),
        "Reset" => to_value(&ResetResponse {
            status: ResetResponseStatus::Accepted,
        }),
        "GetConfiguration" => to_value(&GetConfigurationResponse {
            configuration_key: Some(vec![KeyValue {
                key: "HeartbeatInterval".into(),
                readonly: false,
                value: Some(heartbeat_interval_s.to_string()),
            }]),
            unknown_key: None,
        }),
        "ChangeConfiguration" => to_value(&ChangeConfigurationResponse {
            status: ConfigurationStatus::NotSupported,
        }),
        "ChangeAvailability" => to_value(&ChangeAvailabilityResponse {
            status: AvailabilityStatus::Accepted,
        }),
        "ClearCache" => to_value(&ClearCacheResponse {
            status: ClearCacheStatus::Accepted,
        }),
        "UnlockConnector" => to_value(&UnlockConnectorResponse {
            status: UnlockStatus::NotSupported,
        }),
        "TriggerMessage" => to_value(&TriggerMessageResponse {
            status: TriggerMessageStatus::NotImplemented,
        }),
        "DataTransfer" => to_value(&DataTransferResponse {
            status: DataTransferStatus::UnknownVendorId,
            data: None,
        }),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kwh_samples_keep_three_decimals_of_the_wh_register() {
        let payload = serde_json::to_value(meter_values(7, 12_005, UnitOfMeasure::KWh)).unwrap();
        let sample = &payload["meterValue"][0]["sampledValue"][0];
        assert_eq!(sample["value"], "12.005");
        assert_eq!(sample["unit"], "kWh");
        assert_eq!(sample["measurand"], "Energy.Active.Import.Register");
        assert_eq!(payload["transactionId"], 7);
    }

    #[test]
    fn a_start_conf_without_id_tag_info_is_invalid() {
        let error = check_reply("StartTransaction", r#"{"transactionId": 1}"#);
        assert!(error.is_err());
        let ok = check_reply(
            "StartTransaction",
            r#"{"transactionId": 3, "idTagInfo": {"status": "Accepted"}}"#,
        )
        .unwrap();
        assert_eq!(
            ok,
            Reply::Start {
                ocpp_transaction_id: 3,
                accepted: true
            }
        );
    }

    #[test]
    fn replies_are_checked_as_text_like_a_parsed_value_would_be() {
        // Wrong type, unknown enum value, trailing garbage and a non-object all fail.
        for bad in [
            r#"{"transactionId": "3", "idTagInfo": {"status": "Accepted"}}"#,
            r#"{"transactionId": 3, "idTagInfo": {"status": "Maybe"}}"#,
            r#"{"transactionId": 3, "idTagInfo": {"status": "Accepted"}} x"#,
            r#"[3]"#,
        ] {
            assert!(check_reply("StartTransaction", bad).is_err(), "{bad}");
        }
        assert!(check_reply("MeterValues", "{}").is_ok());
        assert!(check_reply("MeterValues", "{").is_err());
        assert!(
            check_reply("Heartbeat", "{}").is_err(),
            "currentTime is required"
        );
        let boot = check_reply(
            "BootNotification",
            r#"{"currentTime":"2026-11-25T23:00:00Z","interval":300,"status":"Accepted"}"#,
        )
        .unwrap();
        assert_eq!(
            boot,
            Reply::Boot {
                accepted: true,
                interval_s: 300
            }
        );
    }

    #[test]
    fn request_payloads_serialize_without_an_intermediate_value() {
        // The frame is written straight from the typed request; it must equal the Value route.
        let request = stop_transaction(9, "SIM-1", 1234);
        let direct = serde_json::to_string(&(2, "17", "StopTransaction", &request)).unwrap();
        let via_value = serde_json::json!([2, "17", "StopTransaction", request]);
        assert_eq!(serde_json::from_str::<Value>(&direct).unwrap(), via_value);
    }

    #[test]
    fn unknown_central_calls_are_not_answered_with_a_result() {
        assert!(answer_central_call("GetDiagnostics", 60).is_none());
        assert_eq!(
            answer_central_call("Reset", 60).unwrap(),
            serde_json::json!({"status": "Accepted"})
        );
    }
}
