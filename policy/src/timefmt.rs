//! Time formats: RFC 3339 (UTC, nanoseconds) for records and the CLI, Cedar's datetime
//! literal (UTC, milliseconds) for policies.

use std::time::SystemTime;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

/// RFC 3339 in UTC, e.g. `2025-01-02T03:04:05.123456789Z`. Times outside the years
/// 0000–9999 fall back to the Unix epoch (they cannot come from a real clock).
pub fn to_rfc3339(t: SystemTime) -> String {
    offset_date_time(t)
        .and_then(|dt| dt.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// `t` as a date, or `None` past what `time` represents (`OffsetDateTime::from` panics
/// there: a solver's counterexample can be that far out).
fn offset_date_time(t: SystemTime) -> Option<OffsetDateTime> {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => OffsetDateTime::UNIX_EPOCH.checked_add(after.try_into().ok()?),
        Err(before) => OffsetDateTime::UNIX_EPOCH.checked_sub(before.duration().try_into().ok()?),
    }
}

/// Parses RFC 3339 (any offset).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// Cedar's `datetime("…")` literal form: `YYYY-MM-DDThh:mm:ss.SSSZ`.
pub(crate) fn cedar_datetime(t: SystemTime) -> Option<String> {
    let fmt =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    let dt = offset_date_time(t)?;
    if !(0..=9999).contains(&dt.year()) {
        return None;
    }
    dt.format(&fmt).ok()
}

/// Serde for `SystemTime` as an RFC 3339 string.
pub(crate) mod serde_system_time {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::to_rfc3339(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_rfc3339(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not an RFC 3339 time")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn formats_round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let s = to_rfc3339(t);
        assert_eq!(s, "2023-11-14T22:13:20.123456789Z");
        assert_eq!(parse_rfc3339(&s), Some(t));
        assert_eq!(cedar_datetime(t).unwrap(), "2023-11-14T22:13:20.123Z");
        assert_eq!(parse_rfc3339("yesterday"), None);
        // Far out of range: the epoch, not a panic.
        let far = UNIX_EPOCH + Duration::from_millis(i64::MAX as u64);
        assert_eq!(to_rfc3339(far), "1970-01-01T00:00:00Z");
        assert_eq!(cedar_datetime(far), None);
    }
}
