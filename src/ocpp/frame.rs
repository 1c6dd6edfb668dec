//! OCPP-J framing: a cheap header parser that never parses a payload it is not asked for.
//!
//! Every relayed frame goes through [`parse_head`] (the hot path, ~50k frames/s), so it only
//! scans the message type, the message id and, for a CALL, the action; the payload stays a
//! borrowed slice until a billing action asks for it.

use std::borrow::Cow;

/// The OCPP-J message type (the first array element).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// `2`: a request.
    Call,
    /// `3`: the answer to a request.
    CallResult,
    /// `4`: the error answer to a request.
    CallError,
}

impl MessageType {
    /// The OCPP-J wire number of this message type.
    pub fn number(self) -> u8 {
        match self {
            MessageType::Call => 2,
            MessageType::CallResult => 3,
            MessageType::CallError => 4,
        }
    }
}

/// The header of one OCPP-J text frame; the payload is kept as raw text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHead<'a> {
    /// CALL, CALLRESULT or CALLERROR.
    pub message_type: MessageType,
    /// The unescaped OCPP message id that correlates a CALL with its answer.
    pub message_id: Cow<'a, str>,
    /// The action of a CALL (`None` for answers).
    pub action: Option<Cow<'a, str>>,
    /// Raw JSON text after the header: the payload of a CALL/CALLRESULT; for a CALLERROR the
    /// remaining `errorCode, errorDescription, errorDetails` elements.
    pub payload_text: &'a str,
}

/// Why a text frame is not OCPP-J.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame does not start with `[`.
    #[error("frame is not a JSON array")]
    NotAnArray,
    /// The first element is not 2, 3 or 4.
    #[error("message type is not 2, 3 or 4")]
    BadMessageType,
    /// A string was expected (message id or action).
    #[error("expected a JSON string for the {0}")]
    ExpectedString(&'static str),
    /// A `,` separating array elements was expected.
    #[error("expected ',' after the {0}")]
    ExpectedComma(&'static str),
    /// The frame ends before its payload, or does not end with `]`.
    #[error("frame is truncated or not closed with ']'")]
    Truncated,
    /// The payload is not valid JSON of the expected shape.
    #[error("payload is not valid JSON: {0}")]
    InvalidPayload(String),
}

impl FrameError {
    /// Stable code for counters.
    pub fn as_str(&self) -> &'static str {
        match self {
            FrameError::NotAnArray => "not_an_array",
            FrameError::BadMessageType => "bad_message_type",
            FrameError::ExpectedString(_) => "expected_string",
            FrameError::ExpectedComma(_) => "expected_comma",
            FrameError::Truncated => "truncated",
            FrameError::InvalidPayload(_) => "invalid_payload",
        }
    }
}

impl<'a> FrameHead<'a> {
    /// The payload as a generic JSON value; parses it fully, so call only when needed.
    pub fn payload_value(&self) -> Result<serde_json::Value, FrameError> {
        serde_json::from_str(self.payload_text)
            .map_err(|e| FrameError::InvalidPayload(e.to_string()))
    }

    /// The payload deserialised into a borrowed view type.
    pub fn payload_as<T: serde::Deserialize<'a>>(&self) -> Result<T, FrameError> {
        serde_json::from_str(self.payload_text)
            .map_err(|e| FrameError::InvalidPayload(e.to_string()))
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn skip_ws(&mut self) {
        let bytes = self.text.as_bytes();
        while self.pos < bytes.len() && is_ws(bytes[self.pos]) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn expect_comma(&mut self, after: &'static str) -> Result<(), FrameError> {
        self.skip_ws();
        if self.peek() == Some(b',') {
            self.pos += 1;
            Ok(())
        } else {
            Err(FrameError::ExpectedComma(after))
        }
    }

    /// Scans a JSON string; borrows it when it has no escapes.
    fn string(&mut self, what: &'static str) -> Result<Cow<'a, str>, FrameError> {
        self.skip_ws();
        if self.peek() != Some(b'"') {
            return Err(FrameError::ExpectedString(what));
        }
        let start = self.pos;
        let bytes = self.text.as_bytes();
        let mut i = start + 1;
        let mut escaped = false;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => {
                    escaped = true;
                    i += 2;
                }
                b'"' => {
                    self.pos = i + 1;
                    if escaped {
                        return serde_json::from_str::<String>(&self.text[start..=i])
                            .map(Cow::Owned)
                            .map_err(|_| FrameError::ExpectedString(what));
                    }
                    return Ok(Cow::Borrowed(&self.text[start + 1..i]));
                }
                _ => i += 1,
            }
        }
        Err(FrameError::Truncated)
    }
}

/// Parses the header of an OCPP-J text frame without parsing its payload.
pub fn parse_head(text: &str) -> Result<FrameHead<'_>, FrameError> {
    let mut cur = Cursor { text, pos: 0 };
    cur.skip_ws();
    if cur.peek() != Some(b'[') {
        return Err(FrameError::NotAnArray);
    }
    cur.pos += 1;
    cur.skip_ws();
    let digits_start = cur.pos;
    while cur.peek().is_some_and(|b| b.is_ascii_digit()) {
        cur.pos += 1;
    }
    let message_type = match &text[digits_start..cur.pos] {
        "2" => MessageType::Call,
        "3" => MessageType::CallResult,
        "4" => MessageType::CallError,
        _ => return Err(FrameError::BadMessageType),
    };
    cur.expect_comma("message type")?;
    let message_id = cur.string("message id")?;
    cur.expect_comma("message id")?;
    let action = if message_type == MessageType::Call {
        let action = cur.string("action")?;
        cur.expect_comma("action")?;
        Some(action)
    } else {
        None
    };
    let rest = text[cur.pos..].trim_matches(|c: char| c.is_ascii() && is_ws(c as u8));
    let payload_text = match rest.strip_suffix(']') {
        Some(inner) => inner.trim_matches(|c: char| c.is_ascii() && is_ws(c as u8)),
        None => return Err(FrameError::Truncated),
    };
    if payload_text.is_empty() {
        return Err(FrameError::Truncated);
    }
    Ok(FrameHead {
        message_type,
        message_id,
        action,
        payload_text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    #[test]
    fn parses_call_header_and_payload() {
        let head =
            parse_head(r#"[2, "19223201", "StartTransaction", {"connectorId": 1}]"#).unwrap();
        assert_eq!(head.message_type, MessageType::Call);
        assert_eq!(head.message_id, "19223201");
        assert_eq!(head.action.as_deref(), Some("StartTransaction"));
        assert_eq!(head.payload_text, r#"{"connectorId": 1}"#);
        assert_eq!(head.payload_value().unwrap(), json!({"connectorId": 1}));
    }

    #[test]
    fn parses_callresult_and_callerror() {
        let head = parse_head("[3,\"a\",{}]").unwrap();
        assert_eq!(head.message_type, MessageType::CallResult);
        assert_eq!(head.action, None);
        assert_eq!(head.payload_text, "{}");
        let head = parse_head(r#"[4,"a","InternalError","boom",{}]"#).unwrap();
        assert_eq!(head.message_type, MessageType::CallError);
        assert_eq!(head.payload_text, r#""InternalError","boom",{}"#);
    }

    #[test]
    fn unescapes_message_ids() {
        let head = parse_head(r#"[3,"a\"b\u0041",{}]"#).unwrap();
        assert_eq!(head.message_id, "a\"bA");
        assert!(matches!(head.message_id, Cow::Owned(_)));
    }

    #[test]
    fn rejects_non_frames() {
        assert_eq!(parse_head("{}"), Err(FrameError::NotAnArray));
        assert_eq!(parse_head("[5,\"a\",{}]"), Err(FrameError::BadMessageType));
        assert_eq!(parse_head("[22,\"a\",{}]"), Err(FrameError::BadMessageType));
        assert_eq!(
            parse_head("[2,1,\"A\",{}]"),
            Err(FrameError::ExpectedString("message id"))
        );
        assert_eq!(
            parse_head("[2,\"1\",{}]"),
            Err(FrameError::ExpectedString("action"))
        );
        assert_eq!(parse_head("[3,\"1\",{}"), Err(FrameError::Truncated));
        assert_eq!(parse_head("[3,\"1\",]"), Err(FrameError::Truncated));
        assert_eq!(parse_head("[3,\"1"), Err(FrameError::Truncated));
        assert_eq!(
            parse_head("[3 \"1\",{}]"),
            Err(FrameError::ExpectedComma("message type"))
        );
        assert_eq!(parse_head(""), Err(FrameError::NotAnArray));
    }

    fn json_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "\\PC{0,8}".prop_map(Value::String),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        json_leaf().prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("\\PC{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn frame() -> impl Strategy<Value = Value> {
        let id = "\\PC{0,12}";
        prop_oneof![
            (id, "[A-Za-z\"\\\\]{1,20}", json_value())
                .prop_map(|(id, action, p)| json!([2, id, action, p])),
            (id, json_value()).prop_map(|(id, p)| json!([3, id, p])),
            (id, json_value()).prop_map(|(id, p)| json!([4, id, "GenericError", "x", p])),
        ]
    }

    /// Spreads JSON whitespace between tokens of a compact serialisation.
    fn with_spaces(compact: &str, spaces: &[u8]) -> String {
        let mut out = String::new();
        let mut in_string = false;
        let mut escape = false;
        let mut k = 0;
        for c in compact.chars() {
            out.push(c);
            if in_string {
                if escape {
                    escape = false;
                } else if c == '\\' {
                    escape = true;
                } else if c == '"' {
                    in_string = false;
                }
            } else if c == '"' {
                in_string = true;
            } else if matches!(c, ',' | '[' | ':') {
                let n = spaces.get(k).copied().unwrap_or(0) % 3;
                k += 1;
                out.extend(std::iter::repeat_n(' ', n as usize));
            }
        }
        out
    }

    proptest! {
        #[test]
        fn head_agrees_with_full_parse(frame in frame(), spaces in prop::collection::vec(any::<u8>(), 0..32), pretty in any::<bool>()) {
            let text = if pretty {
                serde_json::to_string_pretty(&frame).unwrap()
            } else {
                with_spaces(&serde_json::to_string(&frame).unwrap(), &spaces)
            };
            let head = parse_head(&text).unwrap();
            let full = frame.as_array().unwrap();
            prop_assert_eq!(u64::from(head.message_type.number()), full[0].as_u64().unwrap());
            prop_assert_eq!(head.message_id.as_ref(), full[1].as_str().unwrap());
            match head.message_type {
                MessageType::Call => {
                    prop_assert_eq!(head.action.as_deref(), full[2].as_str());
                    prop_assert_eq!(&head.payload_value().unwrap(), &full[3]);
                }
                MessageType::CallResult => {
                    prop_assert_eq!(head.action.as_deref(), None);
                    prop_assert_eq!(&head.payload_value().unwrap(), &full[2]);
                }
                MessageType::CallError => {
                    let rest: Value = serde_json::from_str(&format!("[{}]", head.payload_text)).unwrap();
                    prop_assert_eq!(rest.as_array().unwrap().as_slice(), &full[2..]);
                }
            }
        }

        #[test]
        fn head_never_contradicts_full_parse(text in "\\[[234], ?\"[a-z\\\\\"]{0,4}\"(, ?\"[A-Za-z]{0,4}\")?, ?[\\[\\]{}0-9,\" ]{0,8}\\]?") {
            // Arbitrary near-frames: whenever both parsers accept, they agree on the header.
            if let (Ok(head), Ok(Value::Array(full))) = (parse_head(&text), serde_json::from_str::<Value>(&text)) {
                prop_assert_eq!(Some(u64::from(head.message_type.number())), full[0].as_u64());
                prop_assert_eq!(Some(head.message_id.as_ref()), full[1].as_str());
                if head.message_type == MessageType::Call {
                    prop_assert_eq!(head.action.as_deref(), full[2].as_str());
                }
            }
        }
    }
}
