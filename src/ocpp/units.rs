//! Exact unit conversion (energy to Wh as a decimal, never a float) and charger timestamps.

use rust_decimal::Decimal;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, PrimitiveDateTime};

/// Most fractional digits accepted in a reading; leaves headroom for the exact kWh/Wh scaling.
const MAX_SCALE: u32 = 15;

/// Why a reading could not be turned into Wh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// The value is not a plain decimal number (NaN, inf, garbage, too large).
    #[error("not a decimal number: {0:?}")]
    NotANumber(String),
    /// More fractional digits than can be scaled exactly.
    #[error("too many fractional digits: {0:?}")]
    TooPrecise(String),
    /// The unit is not an energy unit we bill (Wh, kWh).
    #[error("not an energy unit: {0:?}")]
    NotEnergy(String),
}

/// Why a charger timestamp could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an RFC 3339 timestamp: {0:?}")]
pub struct TimestampError(pub String);

fn is_plain_number(text: &str) -> bool {
    // JSON number grammar, with an optional leading '+' that some chargers send.
    let b = text.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'-' | b'+')) {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if i == int_start {
        return false;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let frac_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == frac_start {
            return false;
        }
    }
    if i < b.len() && matches!(b[i], b'e' | b'E') {
        i += 1;
        if i < b.len() && matches!(b[i], b'-' | b'+') {
            i += 1;
        }
        let exp_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == exp_start {
            return false;
        }
    }
    i == b.len()
}

/// Parses a decimal from its textual form ("1234", "1234.0", "1.5e3"); no float on the way.
pub fn parse_decimal(text: &str) -> Result<Decimal, UnitError> {
    let trimmed = text.trim();
    if !is_plain_number(trimmed) {
        return Err(UnitError::NotANumber(text.to_owned()));
    }
    let unsigned = trimmed.strip_prefix('+').unwrap_or(trimmed);
    let parsed = if unsigned.contains(['e', 'E']) {
        Decimal::from_scientific(unsigned)
    } else {
        Decimal::from_str_exact(unsigned)
    };
    let value = parsed.map_err(|_| UnitError::NotANumber(text.to_owned()))?;
    if value.scale() > MAX_SCALE {
        let normalized = value.normalize();
        if normalized.scale() > MAX_SCALE {
            return Err(UnitError::TooPrecise(text.to_owned()));
        }
        return Ok(normalized);
    }
    Ok(value)
}

/// Converts an energy reading to Wh exactly: unit "Wh"/"kWh" case-insensitive, absent = Wh.
pub fn energy_to_wh(value_text: &str, unit: Option<&str>) -> Result<Decimal, UnitError> {
    energy_reading_wh(value_text, unit).map(|(wh, _)| wh)
}

/// Like [`energy_to_wh`], with the reading's resolution in Wh: one unit of its last written
/// digit (`"3.5"` kWh → 100 Wh, `"51608.5"` Wh → 0.1 Wh, `"4200"` Wh → 1 Wh). A charger may
/// have rounded the value by up to that much, so it is how far the reading can be trusted.
pub fn energy_reading_wh(
    value_text: &str,
    unit: Option<&str>,
) -> Result<(Decimal, Decimal), UnitError> {
    let value = parse_decimal(value_text)?;
    let resolution = Decimal::new(1, value.scale());
    let kwh = |d: Decimal| {
        d.checked_mul(Decimal::ONE_THOUSAND)
            .ok_or_else(|| UnitError::NotANumber(value_text.to_owned()))
    };
    match unit.map(str::trim) {
        None => Ok((value, resolution)),
        Some(u) if u.eq_ignore_ascii_case("wh") => Ok((value, resolution)),
        Some(u) if u.eq_ignore_ascii_case("kwh") => Ok((kwh(value)?, kwh(resolution)?)),
        Some(other) => Err(UnitError::NotEnergy(other.to_owned())),
    }
}

/// A timestamp for people: RFC 3339 UTC ("2026-12-01T10:00:00Z"), "none" when absent, or the
/// raw number when outside what a date can hold.
pub fn display_timestamp(unix_seconds: Option<i64>) -> String {
    let Some(t) = unix_seconds else {
        return "none".into();
    };
    OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|dt| dt.format(&Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}

/// Parses a charger timestamp to unix seconds (fractions truncated toward the past).
///
/// RFC 3339 with `Z` or an offset; a timestamp without any offset is read as UTC, since
/// chargers that omit it run on UTC in practice (OCPP 1.6 requires UTC).
pub fn parse_timestamp(text: &str) -> Result<i64, TimestampError> {
    let err = || TimestampError(text.to_owned());
    let mut normalized = text.trim().to_owned();
    // Lowercase 't'/'z' and a space separator are allowed by RFC 3339's note on ISO 8601.
    if normalized.len() > 10 {
        let sep = normalized.as_bytes()[10];
        if matches!(sep, b' ' | b't') {
            normalized.replace_range(10..11, "T");
        }
    }
    if normalized.ends_with('z') {
        normalized.pop();
        normalized.push('Z');
    }
    if let Ok(dt) = OffsetDateTime::parse(&normalized, &Rfc3339) {
        return Ok(dt.unix_timestamp());
    }
    let naive = time::macros::format_description!(
        version = 2,
        "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    PrimitiveDateTime::parse(&normalized, &naive)
        .map(|dt| dt.assume_utc().unix_timestamp())
        .map_err(|_| err())
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
    fn energy_units() {
        assert_eq!(energy_to_wh("1234", Some("Wh")), Ok(d("1234")));
        assert_eq!(energy_to_wh("1234.0", None), Ok(d("1234")));
        assert_eq!(energy_to_wh("1.2345", Some("kWh")), Ok(d("1234.5")));
        assert_eq!(energy_to_wh("1.2345", Some("kwh")), Ok(d("1234.5")));
        assert_eq!(energy_to_wh("1.2345", Some("KWH")), Ok(d("1234.5")));
        assert_eq!(energy_to_wh(" 42 ", Some("wh")), Ok(d("42")));
        assert_eq!(energy_to_wh("1.5e3", None), Ok(d("1500")));
        assert_eq!(energy_to_wh("+7", None), Ok(d("7")));
        assert_eq!(
            energy_to_wh("0.1", Some("kWh")).unwrap().to_string(),
            "100.0"
        );
        assert_eq!(
            energy_to_wh("5", Some("W")),
            Err(UnitError::NotEnergy("W".into()))
        );
    }

    #[test]
    fn reading_resolutions() {
        let res = |v: &str, u: Option<&str>| energy_reading_wh(v, u).unwrap().1.normalize();
        assert_eq!(res("3.5", Some("kWh")), d("100"));
        assert_eq!(res("3", Some("kWh")), d("1000"));
        assert_eq!(res("51608.5", Some("Wh")), d("0.1"));
        assert_eq!(res("4200", None), d("1"));
        assert_eq!(res(" 1.234 ", Some("kwh")), d("1"));
        assert_eq!(energy_reading_wh("4.2E3", None).unwrap().0, d("4200"));
    }

    #[test]
    fn rejects_non_numbers() {
        for bad in [
            "NaN", "nan", "inf", "-inf", "Infinity", "", "1,5", "1.", ".5", "0x10", "12abc",
            "1_000", "1e", "--1", "1 2",
        ] {
            assert!(
                matches!(parse_decimal(bad), Err(UnitError::NotANumber(_))),
                "{bad:?} accepted"
            );
        }
        assert!(parse_decimal("1e400").is_err());
        assert!(parse_decimal("99999999999999999999999999999999").is_err());
        assert!(matches!(
            parse_decimal("0.1234567890123456789"),
            Err(UnitError::TooPrecise(_))
        ));
        assert_eq!(parse_decimal("1.50000000000000000000"), Ok(d("1.5")));
    }

    #[test]
    fn timestamps() {
        let t = 1_700_000_000; // 2023-11-14T22:13:20Z
        assert_eq!(parse_timestamp("2023-11-14T22:13:20Z"), Ok(t));
        assert_eq!(parse_timestamp("2023-11-14T22:13:20.999Z"), Ok(t));
        assert_eq!(parse_timestamp("2023-11-14T22:13:20.123456789Z"), Ok(t));
        assert_eq!(parse_timestamp("2023-11-14T23:13:20+01:00"), Ok(t));
        assert_eq!(parse_timestamp("2023-11-14T20:13:20-02:00"), Ok(t));
        assert_eq!(parse_timestamp("2023-11-14T22:13:20"), Ok(t));
        assert_eq!(parse_timestamp("2023-11-14T22:13:20.5"), Ok(t));
        assert_eq!(parse_timestamp("2023-11-14 22:13:20Z"), Ok(t));
        assert_eq!(parse_timestamp("2023-11-14t22:13:20z"), Ok(t));
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Ok(0));
        for bad in [
            "",
            "yesterday",
            "2023-13-01T00:00:00Z",
            "2023-02-30T00:00:00Z",
            "1700000000",
        ] {
            assert!(parse_timestamp(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn decimal_text_round_trips(mantissa in any::<i64>(), scale in 0u32..=MAX_SCALE) {
            let value = Decimal::new(mantissa, scale);
            prop_assert_eq!(parse_decimal(&value.to_string()), Ok(value));
            prop_assert_eq!(
                energy_to_wh(&value.to_string(), Some("kWh")),
                Ok(value * Decimal::ONE_THOUSAND)
            );
        }

        #[test]
        fn garbage_never_panics(text in "\\PC{0,12}") {
            let _ = parse_decimal(&text);
            let _ = parse_timestamp(&text);
        }
    }
}
