//! DOMAIN: access grants as the coordinator keeps them: who may send whom
//! which kinds of message.

/// A sender's (or any agency's) right to send a recipient messages of some
/// kinds (or any kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    /// Its id (UUIDv7).
    pub grant_id: String,
    /// The sending agency; empty: any agency.
    pub sender_id: String,
    /// The receiving agency.
    pub recipient_id: String,
    /// The kinds allowed, sorted; empty: any kind.
    pub kinds: Vec<String>,
    /// When it was granted, microseconds since the epoch.
    pub granted_at_micros: i64,
    /// Who granted it.
    pub granted_by: String,
}

impl GrantRecord {
    /// Whether this grant allows at least what `other` would.
    pub fn covers(&self, sender_id: &str, recipient_id: &str, kinds: &[String]) -> bool {
        self.recipient_id == recipient_id
            && (self.sender_id.is_empty() || self.sender_id == sender_id)
            && (self.kinds.is_empty()
                || (!kinds.is_empty() && kinds.iter().all(|kind| self.kinds.contains(kind))))
    }
}
