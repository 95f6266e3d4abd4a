//! TRANSPORT: wire types to domain types and back, for the services
//! (`grpc`) and for the gateway as a client of other gateways (`upstream`).
//! Validation happens here, at the edge: a request that converts is
//! well-formed.

use std::collections::BTreeMap;

use fedmesh_common::error::InvalidField;
use fedmesh_common::time::{micros_from_timestamp, now_micros, timestamp_from_micros};
use fedmesh_common::validate;
use fedmesh_proto::pb;

use crate::inbox::stream::Ack;
use crate::message::{Fingerprint, Message, MovedKey, MovedMessage, Receipt};
use crate::trace_context::{TRACEPARENT_METADATA, TraceParent};

fn checked_headers(
    field: &'static str,
    headers: std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, InvalidField> {
    validate::headers(field, &headers)?;
    Ok(headers.into_iter().collect())
}

fn checked_idempotency_key(
    field: &'static str,
    key: Option<String>,
) -> Result<Option<String>, InvalidField> {
    if let Some(key) = &key {
        validate::idempotency_key(field, key)?;
    }
    Ok(key)
}

/// A new message from a `Send`, given a fresh UUIDv7 id, accepted now in
/// `origin_region`, in the trace of `traceparent`.
pub(crate) fn message_from_send(
    request: pb::SendRequest,
    origin_region: &str,
    traceparent: TraceParent,
) -> Result<Message, InvalidField> {
    validate::agency_id("sender_id", &request.sender_id)?;
    validate::agency_id("recipient_id", &request.recipient_id)?;
    validate::kind("kind", &request.kind)?;
    Ok(Message {
        message_id: uuid::Uuid::now_v7().to_string(),
        headers: checked_headers("headers", request.headers)?,
        idempotency_key: checked_idempotency_key("idempotency_key", request.idempotency_key)?,
        sender_id: request.sender_id,
        recipient_id: request.recipient_id,
        kind: request.kind,
        payload: request.payload.into(),
        origin_region: origin_region.to_string(),
        accepted_at_micros: now_micros(),
        traceparent: traceparent.into_string(),
    })
}

/// A relayed message from a `Forward`, keeping the id the origin gave it.
pub(crate) fn message_from_forward(request: pb::ForwardRequest) -> Result<Message, InvalidField> {
    let message = request
        .message
        .ok_or_else(|| InvalidField::new("message", "message is required"))?;
    uuid::Uuid::parse_str(&message.message_id).map_err(|_| {
        InvalidField::new(
            "message.message_id",
            "message id must be a UUID in text form",
        )
    })?;
    validate::agency_id("message.sender_id", &message.sender_id)?;
    validate::agency_id("message.recipient_id", &message.recipient_id)?;
    validate::kind("message.kind", &message.kind)?;
    validate::region("message.origin_region", &message.origin_region)?;
    Ok(Message {
        headers: checked_headers("message.headers", message.headers)?,
        idempotency_key: checked_idempotency_key("idempotency_key", request.idempotency_key)?,
        accepted_at_micros: micros_from_timestamp(message.accepted_at.as_ref()),
        message_id: message.message_id,
        sender_id: message.sender_id,
        recipient_id: message.recipient_id,
        kind: message.kind,
        payload: message.payload.into(),
        origin_region: message.origin_region,
        // Passed on as it came: the origin gateway checked it, and a hop
        // that dropped an odd one would break the trace it belongs to.
        traceparent: message.traceparent,
    })
}

/// The wire form of a message.
pub(crate) fn message_to_pb(message: Message) -> pb::Message {
    pb::Message {
        message_id: message.message_id,
        sender_id: message.sender_id,
        recipient_id: message.recipient_id,
        kind: message.kind,
        payload: message.payload.into(),
        headers: message.headers.into_iter().collect(),
        accepted_at: Some(timestamp_from_micros(message.accepted_at_micros)),
        origin_region: message.origin_region,
        traceparent: message.traceparent,
    }
}

/// The `Forward` that relays `message` to its home region.
pub(crate) fn forward_request(message: Message) -> pb::ForwardRequest {
    pb::ForwardRequest {
        idempotency_key: message.idempotency_key.clone(),
        message: Some(message_to_pb(message)),
        timeout_micros: 0,
    }
}

/// An ack from the wire.
pub(crate) fn ack_from_pb(ack: pb::Ack) -> Ack {
    Ack {
        sequences: ack.sequences,
        up_to: ack.up_to,
    }
}

/// A receipt from another region's gateway. Its home region is the region
/// it was relayed to, whatever the answer says.
pub(crate) fn receipt_from_pb(receipt: pb::Receipt, home_region: &str) -> Receipt {
    Receipt {
        message_id: receipt.message_id,
        home_region: home_region.to_string(),
        stored_at_micros: micros_from_timestamp(receipt.stored_at.as_ref()),
        duplicate: receipt.duplicate,
        spooled: false,
    }
}

/// The caller's deadline, from the `grpc-timeout` header (gRPC's own
/// encoding: at most 8 digits and a unit, H, M, S, m, u or n).
pub(crate) fn deadline_of<T>(request: &tonic::Request<T>) -> Option<tokio::time::Instant> {
    let text = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let split = text.len().checked_sub(1)?;
    let (value, unit) = text.split_at(split);
    if value.is_empty() || value.len() > 8 {
        return None;
    }
    let value: u64 = value.parse().ok()?;
    let timeout = match unit {
        "H" => std::time::Duration::from_secs(value.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(value.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(value),
        "m" => std::time::Duration::from_millis(value),
        "u" => std::time::Duration::from_micros(value),
        "n" => std::time::Duration::from_nanos(value),
        _ => return None,
    };
    tokio::time::Instant::now().checked_add(timeout)
}

/// The trace a `Send` continues: the caller's `traceparent` metadata if it
/// is a valid one, otherwise a new trace (a bad one is no reason to refuse
/// a message).
pub(crate) fn traceparent_of<T>(request: &tonic::Request<T>) -> TraceParent {
    let given = request
        .metadata()
        .get(TRACEPARENT_METADATA)
        .and_then(|value| value.to_str().ok());
    TraceParent::continue_or_start(given)
}

/// The wire form of a receipt: STORED, or SPOOLED for a message waiting in
/// the origin region's spool.
pub(crate) fn receipt_to_pb(receipt: Receipt) -> pb::Receipt {
    let status = if receipt.spooled {
        pb::ReceiptStatus::Spooled
    } else {
        pb::ReceiptStatus::Stored
    };
    pb::Receipt {
        message_id: receipt.message_id,
        status: status.into(),
        home_region: receipt.home_region,
        stored_at: Some(timestamp_from_micros(receipt.stored_at_micros)),
        duplicate: receipt.duplicate,
    }
}

/// A moved message on the wire (its recipient is the request's agency).
pub(crate) fn moved_message_to_pb(moved: MovedMessage) -> pb::MovedMessage {
    let message = moved.message;
    pb::MovedMessage {
        message_id: message.message_id,
        sender_id: message.sender_id,
        kind: message.kind,
        payload: message.payload.into(),
        headers: message.headers.into_iter().collect(),
        idempotency_key: message.idempotency_key,
        origin_region: message.origin_region,
        accepted_at_micros: message.accepted_at_micros,
        sequence: moved.sequence,
        stored_at_micros: moved.stored_at_micros,
        acked_at_micros: moved.acked_at_micros,
        traceparent: message.traceparent,
    }
}

/// A moved message of `agency_id` from the wire, checked as a relayed one.
pub(crate) fn moved_message_from_pb(
    agency_id: &str,
    moved: pb::MovedMessage,
) -> Result<MovedMessage, InvalidField> {
    let message = message_from_forward(pb::ForwardRequest {
        message: Some(pb::Message {
            message_id: moved.message_id,
            sender_id: moved.sender_id,
            recipient_id: agency_id.to_string(),
            kind: moved.kind,
            payload: moved.payload,
            headers: moved.headers,
            accepted_at: None,
            origin_region: moved.origin_region,
            traceparent: moved.traceparent,
        }),
        idempotency_key: moved.idempotency_key,
        timeout_micros: 0,
    })?;
    if moved.sequence == 0 || i64::try_from(moved.sequence).is_err() {
        return Err(InvalidField::new(
            "messages.sequence",
            "a moved message's sequence is from 1 up",
        ));
    }
    Ok(MovedMessage {
        sequence: moved.sequence,
        message: Message {
            accepted_at_micros: moved.accepted_at_micros,
            ..message
        },
        stored_at_micros: moved.stored_at_micros,
        acked_at_micros: moved.acked_at_micros,
    })
}

/// An idempotency key claim of a moving agency on the wire.
pub(crate) fn moved_key_to_pb(key: MovedKey) -> pb::MovedKey {
    pb::MovedKey {
        idempotency_key: key.idempotency_key,
        fingerprint: key.fingerprint.map(|fingerprint| fingerprint.0.to_vec()),
        message_id: key.message_id,
        claimed_at_micros: key.claimed_at_micros,
    }
}

/// A key claim of `agency_id` (the sender) from the wire.
pub(crate) fn moved_key_from_pb(
    agency_id: &str,
    key: pb::MovedKey,
) -> Result<MovedKey, InvalidField> {
    validate::idempotency_key("keys.idempotency_key", &key.idempotency_key)?;
    let fingerprint = key
        .fingerprint
        .map(|bytes| {
            <[u8; 32]>::try_from(bytes.as_slice())
                .map(Fingerprint)
                .map_err(|_| InvalidField::new("keys.fingerprint", "a fingerprint is 32 bytes"))
        })
        .transpose()?;
    Ok(MovedKey {
        sender_id: agency_id.to_string(),
        idempotency_key: key.idempotency_key,
        fingerprint,
        message_id: key.message_id,
        claimed_at_micros: key.claimed_at_micros,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send() -> pb::SendRequest {
        pb::SendRequest {
            sender_id: "alpha".into(),
            recipient_id: "beta".into(),
            kind: "note".into(),
            payload: b"hi".to_vec(),
            headers: Default::default(),
            idempotency_key: Some("k1".into()),
        }
    }

    #[test]
    fn a_forward_keeps_what_the_send_accepted() {
        let message = message_from_send(send(), "east", TraceParent::start()).expect("valid");
        assert!(!message.traceparent.is_empty());
        let forwarded = message_from_forward(forward_request(message.clone())).expect("valid");
        assert_eq!(forwarded, message);
    }

    #[test]
    fn a_move_keeps_the_trace_context() {
        let message = message_from_send(send(), "east", TraceParent::start()).expect("valid");
        let moved = MovedMessage {
            sequence: 3,
            message: message.clone(),
            stored_at_micros: 5,
            acked_at_micros: None,
        };
        let back =
            moved_message_from_pb("beta", moved_message_to_pb(moved.clone())).expect("valid");
        assert_eq!(back, moved);
    }

    #[test]
    fn the_trace_context_is_read_from_traceparent_metadata() {
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert("traceparent", given.parse().expect("ascii"));
        assert_eq!(traceparent_of(&request).as_str(), given);
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert("traceparent", "not-a-trace".parse().expect("ascii"));
        let started = traceparent_of(&request);
        assert_ne!(started.as_str(), "not-a-trace");
        assert!(TraceParent::parse(started.as_str()).is_some());
        assert!(TraceParent::parse(traceparent_of(&tonic::Request::new(())).as_str()).is_some());
    }

    #[test]
    fn deadlines_are_read_from_grpc_timeout() {
        let mut request = tonic::Request::new(());
        assert!(deadline_of(&request).is_none());
        request.set_timeout(std::time::Duration::from_secs(30));
        let deadline = deadline_of(&request).expect("a deadline");
        let left = deadline - tokio::time::Instant::now();
        assert!(
            left <= std::time::Duration::from_secs(30) && left > std::time::Duration::from_secs(20)
        );
        for bad in ["", "5", "123456789S", "5x", "-5S"] {
            let mut request = tonic::Request::new(());
            request
                .metadata_mut()
                .insert("grpc-timeout", bad.parse().expect("ascii"));
            assert!(deadline_of(&request).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_fields_are_named() {
        type Spoil = fn(&mut pb::SendRequest);
        let cases: [(Spoil, &str); 4] = [
            (|request| request.sender_id = "Alpha".into(), "sender_id"),
            (
                |request| request.recipient_id = String::new(),
                "recipient_id",
            ),
            (|request| request.kind = "no spaces".into(), "kind"),
            (
                |request| request.idempotency_key = Some(String::new()),
                "idempotency_key",
            ),
        ];
        for (spoil, field) in cases {
            let mut request = send();
            spoil(&mut request);
            let error = message_from_send(request, "east", TraceParent::start()).expect_err(field);
            assert_eq!(error.field, field);
        }
    }
}
