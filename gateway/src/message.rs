//! DOMAIN: a message as the gateway handles it, independent of the wire and
//! of storage, and what storing it may find: a key already claimed, a
//! retry of a message already stored.
//!
//! An idempotency key names one message per sender across the mesh. The
//! claim of a key lives in the sender's home shard, with a [`Fingerprint`]
//! of what was sent under it: a retry with the same content is the same
//! message (it reuses the message id the claim names), other content under
//! the same key is refused.
//!
//! An inbox moves from one shard to another as [`MovedMessage`]s and
//! [`MovedKey`]s copied over, then its [`InboxPosition`]; while it moves,
//! its old shard refuses messages for it ([`Refused::Moved`]).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

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
    /// Opaque body, shared rather than copied when the message is (a send
    /// keeps one for a resend after a move).
    pub payload: bytes::Bytes,
    /// Application headers.
    pub headers: BTreeMap<String, String>,
    /// The sender's idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// Region of the gateway that accepted it.
    pub origin_region: String,
    /// When it was accepted, microseconds since the epoch.
    pub accepted_at_micros: i64,
    /// Its W3C trace context (see `crate::trace_context`): the sender's
    /// client's, or one its origin gateway started. Empty only for messages
    /// stored before messages carried one. Not part of the
    /// [`Message::fingerprint`]: a retry is the same message whatever trace
    /// it came in.
    pub traceparent: String,
}

impl Message {
    /// The digest of what the sender asked to send.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut digest = Sha256::new();
        // Each field with its length, so that no two contents share a digest
        // by moving bytes from one field to the next.
        let mut field = |bytes: &[u8]| {
            digest.update((bytes.len() as u64).to_be_bytes());
            digest.update(bytes);
        };
        field(self.recipient_id.as_bytes());
        field(self.kind.as_bytes());
        field(&(self.headers.len() as u64).to_be_bytes());
        for (name, value) in &self.headers {
            field(name.as_bytes());
            field(value.as_bytes());
        }
        field(&self.payload);
        Fingerprint(digest.finalize().into())
    }
}

/// A digest (SHA-256) of a message's recipient, kind, headers and payload.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in &self.0[..8] {
            write!(formatter, "{byte:02x}")?;
        }
        formatter.write_str("..")
    }
}

/// A message on its way into its home shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToStore {
    /// The message.
    pub message: Message,
    /// Claim the sender's idempotency key in the same transaction, with
    /// this fingerprint: the sender is homed on this shard too.
    pub claim: Option<Fingerprint>,
    /// The message's id may be stored already: it was relayed, or it is a
    /// retry reusing the id its key names. It is looked up first.
    pub may_exist: bool,
}

/// A claim of an idempotency key alone, in the sender's home shard, for a
/// message stored in another shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyClaim {
    /// The sender.
    pub sender_id: String,
    /// Its key.
    pub idempotency_key: String,
    /// What was sent under it.
    pub fingerprint: Fingerprint,
    /// The id of the message the key is to name.
    pub message_id: String,
}

/// What claiming a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The key was free: it now names the message of the claim.
    New,
    /// The key names a message already.
    Existing(ExistingClaim),
}

/// A key claimed before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingClaim {
    /// The message the key names.
    pub message_id: String,
    /// What was sent under it; None for keys claimed before fingerprints
    /// were kept, which match any content.
    pub fingerprint: Option<Fingerprint>,
}

impl ExistingClaim {
    /// Whether a message with `fingerprint` may be the one the key names.
    pub fn matches(&self, fingerprint: &Fingerprint) -> bool {
        self.fingerprint
            .is_none_or(|claimed| claimed == *fingerprint)
    }
}

/// The sender's key names another message: nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInUse {
    /// The message the key names.
    pub message_id: String,
}

/// Why a message was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The sender's key names another message.
    KeyInUse(KeyInUse),
    /// The recipient's inbox is frozen on this shard: it has moved, or is
    /// moving, to another shard. Sent again with the same id or key once
    /// the move is done, the message is stored once.
    Moved,
}

impl From<KeyInUse> for Refused {
    fn from(refused: KeyInUse) -> Self {
        Refused::KeyInUse(refused)
    }
}

/// What storing one message came to.
pub type Outcome = Result<Stored, Refused>;

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
    /// When it was committed, microseconds since the epoch: in the
    /// recipient's home shard, or in the spool.
    pub stored_at_micros: i64,
    /// Whether nothing new was stored (a retry).
    pub duplicate: bool,
    /// Whether it was committed to the origin region's spool, not (yet) to
    /// the recipient's home shard.
    pub spooled: bool,
}

/// A message waiting in the spool of its sender's home shard for its
/// recipient's region to be reachable (see `crate::spool`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledMessage {
    /// The message, as it was accepted.
    pub message: Message,
    /// The region it is for: its recipient's home when it was spooled.
    pub destination_region: String,
    /// When it was spooled, microseconds since the epoch.
    pub spooled_at_micros: i64,
    /// How many times a drainer tried to forward it.
    pub attempts: u32,
}

/// What spooling a message found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spooled {
    /// When it was spooled: now, or when a first attempt spooled it.
    pub spooled_at_micros: i64,
    /// Whether it was in the spool already (a retry): nothing was written.
    pub duplicate: bool,
}

/// What waits in one shard's spool for one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolDepth {
    /// The region the messages are for.
    pub destination_region: String,
    /// How many.
    pub messages: u64,
    /// When the oldest was spooled, microseconds since the epoch.
    pub oldest_spooled_at_micros: i64,
}

/// What became of a spooled message a drainer took out of the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Its recipient's home shard stored it (`duplicate`: it had already).
    Forwarded {
        /// The region that stored it.
        home_region: String,
        /// Whether it was stored before (an earlier attempt's answer was lost).
        duplicate: bool,
    },
    /// Its recipient's home refused it for good; `reason` says why.
    Undeliverable {
        /// The refusal.
        reason: String,
    },
}

/// The state of an inbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxStats {
    /// Messages stored and not yet acknowledged.
    pub unacknowledged: u64,
    /// The sequence of the newest message stored (0: none yet).
    pub last_sequence: u64,
}

/// A message of an inbox copied from one shard to another, as it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedMessage {
    /// Its position in the recipient's inbox, kept by the move.
    pub sequence: u64,
    /// The message.
    pub message: Message,
    /// When its first shard committed it, microseconds since the epoch.
    pub stored_at_micros: i64,
    /// When the recipient acknowledged it, if it did.
    pub acked_at_micros: Option<i64>,
}

/// A claim of an idempotency key copied from one shard to another with its
/// sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedKey {
    /// The sender.
    pub sender_id: String,
    /// Its key.
    pub idempotency_key: String,
    /// What was sent under it; None for keys claimed before fingerprints
    /// were kept.
    pub fingerprint: Option<Fingerprint>,
    /// The message the key names.
    pub message_id: String,
    /// When the key was claimed, microseconds since the epoch.
    pub claimed_at_micros: i64,
}

/// Where an inbox stands on its shard: what a shard it moves to continues
/// from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxPosition {
    /// The last sequence handed out (0: none yet).
    pub last_sequence: u64,
    /// The epoch of its newest Receive stream (0: none yet).
    pub epoch: u64,
}
