//! Pure OCPP-J: the frame header parser, lenient 1.6 payload views and exact unit conversion.
//!
//! Nothing here does I/O or logs; every problem comes back as a typed error for the caller.

pub mod frame;
pub mod payload;
pub mod units;

/// Every OCPP 1.6 action (core profiles and the security extension), for metric labels: a
/// charger's arbitrary action string must not become a label value.
const ACTIONS: &[&str] = &[
    "Authorize",
    "BootNotification",
    "CancelReservation",
    "CertificateSigned",
    "ChangeAvailability",
    "ChangeConfiguration",
    "ClearCache",
    "ClearChargingProfile",
    "DataTransfer",
    "DeleteCertificate",
    "DiagnosticsStatusNotification",
    "ExtendedTriggerMessage",
    "FirmwareStatusNotification",
    "GetCompositeSchedule",
    "GetConfiguration",
    "GetDiagnostics",
    "GetInstalledCertificateIds",
    "GetLocalListVersion",
    "GetLog",
    "Heartbeat",
    "InstallCertificate",
    "LogStatusNotification",
    "MeterValues",
    "RemoteStartTransaction",
    "RemoteStopTransaction",
    "ReserveNow",
    "Reset",
    "SecurityEventNotification",
    "SendLocalList",
    "SetChargingProfile",
    "SignCertificate",
    "SignedFirmwareStatusNotification",
    "SignedUpdateFirmware",
    "StartTransaction",
    "StatusNotification",
    "StopTransaction",
    "TriggerMessage",
    "UnlockConnector",
    "UpdateFirmware",
];

/// A bounded label for a text frame: the action of a CALL (`other` if not an OCPP 1.6 action),
/// `CALLRESULT`, `CALLERROR`, or `invalid` for a frame that is not OCPP-J.
pub fn frame_label(text: &str) -> &'static str {
    head_label(&frame::parse_head(text))
}

/// [`frame_label`] of a head already parsed.
pub fn head_label(head: &Result<frame::FrameHead<'_>, frame::FrameError>) -> &'static str {
    match head {
        Ok(head) => match head.message_type {
            frame::MessageType::Call => head
                .action
                .as_deref()
                .and_then(|action| ACTIONS.iter().find(|known| **known == action).copied())
                .unwrap_or("other"),
            frame::MessageType::CallResult => "CALLRESULT",
            frame::MessageType::CallError => "CALLERROR",
        },
        Err(_) => "invalid",
    }
}

#[cfg(test)]
mod tests {
    use super::frame_label;

    #[test]
    fn frame_labels_are_bounded() {
        assert_eq!(frame_label(r#"[2,"1","Heartbeat",{}]"#), "Heartbeat");
        assert_eq!(frame_label(r#"[2,"1","Evil\u0041ction",{}]"#), "other");
        assert_eq!(frame_label(r#"[3,"1",{}]"#), "CALLRESULT");
        assert_eq!(
            frame_label(r#"[4,"1","NotImplemented","",{}]"#),
            "CALLERROR"
        );
        assert_eq!(frame_label("not json"), "invalid");
    }
}
