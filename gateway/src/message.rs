//! DOMAIN: a message as the gateway handles it, independent of the wire and
//! of storage.

use std::collections::BTreeMap;

/// A message accepted by a gateway, not yet (or being) stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// UUIDv7 given by the origin gateway, text form.
    pub message_id: String,
    /// The sending agency.
    pub sender_id: String,
    /// The receiving agency.
    pub recipient_id: String,
    /// Message kind.
    pub kind: String,
    /// Opaque body.
    pub payload: Vec<u8>,
    /// Application headers.
    pub headers: BTreeMap<String, String>,
    /// The sender's idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// Region of the gateway that accepted it.
    pub origin_region: String,
    /// When it was accepted, microseconds since the epoch.
    pub accepted_at_micros: i64,
}

/// What storing a message in its home shard produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The id of the stored message: the original one for a duplicate.
    pub message_id: String,
    /// Its sequence in the recipient's inbox.
    pub sequence: u64,
    /// When it was committed, microseconds since the epoch.
    pub stored_at_micros: i64,
    /// Whether it was stored before (same message id or idempotency key),
    /// so that nothing was stored now.
    pub duplicate: bool,
}

/// A message in an inbox, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    /// Position in the recipient's inbox.
    pub sequence: u64,
    /// The message.
    pub message: Message,
}

/// A receipt as the sender sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The message id.
    pub message_id: String,
    /// The recipient's home region.
    pub home_region: String,
    /// When it was committed, microseconds since the epoch.
    pub stored_at_micros: i64,
    /// Whether nothing new was stored (a retry).
    pub duplicate: bool,
}

/// The state of an inbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxStats {
    /// Messages stored and not yet acknowledged.
    pub unacknowledged: u64,
    /// The sequence of the newest message stored (0: none yet).
    pub last_sequence: u64,
}
