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
    label_name(head_label_index(head))
}

/// How many labels [`head_label`] can return: the actions, then `other`, `CALLRESULT`,
/// `CALLERROR` and `invalid`.
pub const HEAD_LABELS: usize = ACTIONS.len() + 4;

/// [`head_label`] as an index below [`HEAD_LABELS`], for a table of metric handles registered
/// once instead of looked up per frame; [`label_name`] turns it back into the label.
pub fn head_label_index(head: &Result<frame::FrameHead<'_>, frame::FrameError>) -> usize {
    match head {
        Ok(head) => match head.message_type {
            // ACTIONS is sorted (a test checks), so a known action is found in ~6 compares.
            frame::MessageType::Call => head
                .action
                .as_deref()
                .and_then(|action| ACTIONS.binary_search(&action).ok())
                .unwrap_or(ACTIONS.len()),
            frame::MessageType::CallResult => ACTIONS.len() + 1,
            frame::MessageType::CallError => ACTIONS.len() + 2,
        },
        Err(_) => ACTIONS.len() + 3,
    }
}

/// The label of a [`head_label_index`]; `invalid` past the end.
pub fn label_name(index: usize) -> &'static str {
    match ACTIONS.get(index) {
        Some(action) => action,
        None => match index - ACTIONS.len() {
            0 => "other",
            1 => "CALLRESULT",
            2 => "CALLERROR",
            _ => "invalid",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::{ACTIONS, HEAD_LABELS, frame_label, label_name};

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

    #[test]
    fn actions_are_sorted_and_every_label_index_names_a_distinct_label() {
        assert!(
            ACTIONS.windows(2).all(|w| w[0] < w[1]),
            "binary search needs ACTIONS sorted"
        );
        for action in ACTIONS {
            assert_eq!(frame_label(&format!(r#"[2,"1","{action}",{{}}]"#)), *action);
        }
        let labels: std::collections::BTreeSet<_> = (0..HEAD_LABELS).map(label_name).collect();
        assert_eq!(labels.len(), HEAD_LABELS);
    }
}
