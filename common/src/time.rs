//! Timestamps: stored as microseconds since the Unix epoch, sent as
//! `google.protobuf.Timestamp`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX)
}

/// A protobuf timestamp from microseconds since the epoch.
pub fn timestamp_from_micros(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
    }
}

/// Microseconds since the epoch from a protobuf timestamp (0 if absent).
pub fn micros_from_timestamp(timestamp: Option<&prost_types::Timestamp>) -> i64 {
    timestamp.map_or(0, |timestamp| {
        timestamp
            .seconds
            .saturating_mul(1_000_000)
            .saturating_add(i64::from(timestamp.nanos / 1_000))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        for micros in [0, 1, 1_700_000_000_123_456, -5] {
            let timestamp = timestamp_from_micros(micros);
            assert_eq!(micros_from_timestamp(Some(&timestamp)), micros);
        }
    }
}
