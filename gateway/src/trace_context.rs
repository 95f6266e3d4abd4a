//! DOMAIN: the W3C trace context (`traceparent`) a message carries from its
//! sender's client to its recipient, so that one trace id follows it through
//! the logs of every gateway on its way.
//!
//! A client's own `traceparent` is kept as it came, byte for byte, when it
//! is valid; anything else (absent, malformed, a version this gateway does
//! not know) is replaced by a new trace, never refused: tracing is advice,
//! not a precondition of delivery.

/// The gRPC metadata key a client's trace context comes in.
pub const TRACEPARENT_METADATA: &str = "traceparent";

/// A valid `traceparent` of version 00:
/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent(String);

impl TraceParent {
    /// `text` if it is a valid version-00 traceparent: lowercase hex, trace
    /// and parent ids not all zeros (the specification makes those invalid).
    pub fn parse(text: &str) -> Option<TraceParent> {
        let mut parts = text.split('-');
        let (Some(version), Some(trace_id), Some(parent_id), Some(flags), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let valid = version == "00"
            && is_lower_hex(trace_id, 32)
            && is_lower_hex(parent_id, 16)
            && is_lower_hex(flags, 2)
            && !is_zeros(trace_id)
            && !is_zeros(parent_id);
        valid.then(|| TraceParent(text.to_string()))
    }

    /// A new trace started here: random trace and span ids, sampled.
    pub fn start() -> TraceParent {
        // fastrand is not a cryptographic generator; trace ids need to be
        // unlikely to collide, not unguessable. Zero is invalid, hence max(1).
        let trace_id = fastrand::u128(..).max(1);
        let span_id = fastrand::u64(..).max(1);
        TraceParent(format!("00-{trace_id:032x}-{span_id:016x}-01"))
    }

    /// The client's traceparent if it is valid, otherwise a new trace.
    pub fn continue_or_start(given: Option<&str>) -> TraceParent {
        given
            .and_then(TraceParent::parse)
            .unwrap_or_else(TraceParent::start)
    }

    /// The 32 hex digits of the trace id.
    pub fn trace_id(&self) -> &str {
        &self.0[3..35]
    }

    /// The header text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The header text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// The trace id of a stored or relayed message's traceparent, for its log
/// lines: empty for a message that has none (stored before messages carried
/// one) or whose traceparent is not valid.
pub fn trace_id_of(traceparent: &str) -> &str {
    match TraceParent::parse(traceparent) {
        Some(_) => &traceparent[3..35],
        None => "",
    }
}

fn is_lower_hex(text: &str, length: usize) -> bool {
    text.len() == length
        && text
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

fn is_zeros(text: &str) -> bool {
    text.bytes().all(|byte| byte == b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIVEN: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_kept_as_it_is() {
        let kept = TraceParent::continue_or_start(Some(GIVEN));
        assert_eq!(kept.as_str(), GIVEN);
        assert_eq!(kept.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace_id_of(GIVEN), "4bf92f3577b34da6a3ce929d0e0e4736");
        // Flags other than sampled are kept too.
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(
            TraceParent::continue_or_start(Some(unsampled)).as_str(),
            unsampled
        );
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        let bad = [
            "",
            "garbage",
            // Another version.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Upper case.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Wrong lengths, extra or missing parts.
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // Not hex.
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ];
        for text in bad {
            assert_eq!(TraceParent::parse(text), None, "{text:?}");
            assert_eq!(trace_id_of(text), "", "{text:?}");
        }
    }

    #[test]
    fn a_missing_or_malformed_traceparent_starts_a_new_trace() {
        for given in [None, Some("garbage"), Some("01-00-00-00")] {
            let started = TraceParent::continue_or_start(given);
            assert!(
                TraceParent::parse(started.as_str()).is_some(),
                "{started:?}"
            );
            assert!(started.as_str().ends_with("-01"), "sampled: {started:?}");
        }
        let first = TraceParent::start();
        let second = TraceParent::start();
        assert_ne!(first.trace_id(), second.trace_id());
    }
}
