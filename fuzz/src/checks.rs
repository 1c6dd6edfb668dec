//! One function per fuzz target: arbitrary bytes in, a panic only when an invariant breaks.
//! Plain Rust on the public API of `ocpp_lago_bridge`, so it builds on stable too.

use std::time::{Duration, SystemTime};

use ocpp_lago_bridge::lago::rate_limit_pause;
use ocpp_lago_bridge::lago::schema::{
    BillableMetricEnvelope, EventEnvelope, EventsCreated, SubscriptionEnvelope, UnprocessableEntity,
};
use ocpp_lago_bridge::ocpp::frame::{MessageType, parse_head};
use ocpp_lago_bridge::tap::{ConnectionTap, MAX_PENDING_CALLS, Observation, TapKind};
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::Value;

/// `ocpp::frame::parse_head` on the bytes read lossily as UTF-8: it never panics, its payload is
/// a slice of the input, and on a well-formed OCPP-J array it agrees with serde_json.
pub fn frame_head(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let head = parse_head(&text);
    if let Ok(head) = &head {
        let range = text.as_bytes().as_ptr_range();
        let payload = head.payload_text.as_bytes().as_ptr_range();
        assert!(
            range.start <= payload.start && payload.end <= range.end,
            "payload outside the frame"
        );
        assert!(
            !head.payload_text.is_empty(),
            "an accepted frame has a payload"
        );
        assert_eq!(
            head.action.is_some(),
            head.message_type == MessageType::Call
        );
    }
    let Ok(Value::Array(full)) = serde_json::from_str::<Value>(&text) else {
        return;
    };
    let (Some(number), Some(id)) = (
        full.first().and_then(Value::as_u64),
        full.get(1).and_then(Value::as_str),
    ) else {
        return;
    };
    let (message_type, action, elements) = match number {
        2 => match full.get(2).and_then(Value::as_str) {
            Some(action) => (MessageType::Call, Some(action), 4),
            None => return,
        },
        3 => (MessageType::CallResult, None, 3),
        4 => (MessageType::CallError, None, 5),
        _ => return,
    };
    if full.len() != elements {
        return;
    }
    // serde_json accepts it as a complete OCPP-J message: the cheap parser must too, and agree.
    let head = head.unwrap_or_else(|e| panic!("parse_head refused a well-formed frame: {e}"));
    assert_eq!(head.message_type, message_type);
    assert_eq!(head.message_id, id);
    assert_eq!(head.action.as_deref(), action);
    if message_type != MessageType::CallError {
        let payload = head
            .payload_value()
            .expect("the payload of a well-formed frame parses");
        assert_eq!(&payload, full.last().expect("non-empty"));
    }
}

/// `ConnectionTap` over a conversation: the bytes split at 0x1e into frames (read lossily as
/// UTF-8), alternately from the charger and from the central system; the subprotocol picked by
/// the length. Never panics; records and replies only come from the direction that owns them.
pub fn tap(data: &[u8]) {
    let subprotocol = [Some("ocpp1.6"), Some("ocpp1.5"), None][data.len() % 3];
    let mut tap = ConnectionTap::new("FUZZ".into(), subprotocol);
    // Each frame is also shown to a second tap from the other side first, so a frame meets
    // both a fresh and a primed pending-call table.
    let mut mirror = ConnectionTap::new("FUZZ".into(), Some("ocpp1.6"));
    for (i, segment) in data.split(|&b| b == 0x1e).enumerate().take(64) {
        let text = String::from_utf8_lossy(segment);
        let from_charger = i % 2 == 0;
        let observation = if from_charger {
            mirror.from_central(&text, 0);
            tap.from_charger(&text, 1_700_000_000)
        } else {
            mirror.from_charger(&text, 0);
            tap.from_central(&text, 1_700_000_000)
        };
        match &observation {
            Observation::Record { record, message_id } => {
                assert_eq!(record.charge_box_id, "FUZZ");
                let head = parse_head(&text).expect("a recorded frame has a head");
                assert_eq!(
                    head.message_id,
                    message_id.as_str(),
                    "record keyed by the frame's id"
                );
                let start = matches!(record.kind, TapKind::Start(_));
                assert_eq!(
                    start, !from_charger,
                    "a Start is recorded from its answer only"
                );
            }
            Observation::BillingReply { message_id } => {
                assert!(
                    !from_charger,
                    "only the central system answers a billing CALL"
                );
                assert_eq!(
                    parse_head(&text).expect("reply head").message_id,
                    message_id.as_str()
                );
            }
            Observation::Malformed { reason, .. } => assert!(!reason.is_empty()),
            Observation::Pass | Observation::Unbilled { .. } => {}
        }
    }
    assert!(tap.evicted_pending() <= 64 + MAX_PENDING_CALLS as u64);
}

/// Lago response bodies through every response schema, and the 429 headers through
/// `rate_limit_pause`: the first two lines of the input are `Retry-After` and
/// `X-RateLimit-Reset`. Never panics; a pause is never longer than the header said.
pub fn lago_response(data: &[u8]) {
    let _ = serde_json::from_slice::<EventsCreated>(data);
    let _ = serde_json::from_slice::<EventEnvelope>(data);
    let _ = serde_json::from_slice::<UnprocessableEntity>(data);
    let _ = serde_json::from_slice::<BillableMetricEnvelope>(data);
    let _ = serde_json::from_slice::<SubscriptionEnvelope>(data);

    let mut lines = data.split(|&b| b == b'\n');
    let mut headers = HeaderMap::new();
    for name in ["retry-after", "x-ratelimit-reset"] {
        if let Some(value) = lines.next().and_then(|l| HeaderValue::from_bytes(l).ok()) {
            headers.insert(name, value);
        }
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let pause = rate_limit_pause(&headers, now);
    if let (Some(pause), Some(secs)) = (
        pause,
        headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok()),
    ) {
        assert_eq!(
            pause,
            Duration::from_secs(secs),
            "Retry-After in seconds is taken as is"
        );
    }
}
