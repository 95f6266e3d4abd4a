//! STORAGE: a shard's messages behind a trait, so the same gateway logic runs
//! on SQLite (dev mesh) and PostgreSQL (deployments).
//!
//! Every change writes its event to the shard's outbox in the same
//! transaction: storing a message writes `message.accepted`, acknowledging
//! it writes `message.delivered`.

mod sqlite;

pub use sqlite::SqliteMessageStore;

use std::sync::Arc;

use fedmesh_common::events::Outbox;

use crate::error::StoreError;
use crate::message::{InboxMessage, Message, Stored};

/// One shard's message store.
#[async_trait::async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Stores `messages` in one transaction, in order, and returns one
    /// [`Stored`] per message. A message whose id, or whose (sender,
    /// idempotency key), is already stored is not stored again: its entry
    /// names the original with `duplicate` set.
    async fn insert_batch(&self, messages: &[Message]) -> Result<Vec<Stored>, StoreError>;

    /// Up to `limit` unacknowledged messages of `recipient_id` with a
    /// sequence above `after_sequence`, in sequence order.
    async fn fetch_unacked(
        &self,
        recipient_id: &str,
        after_sequence: u64,
        limit: u32,
    ) -> Result<Vec<InboxMessage>, StoreError>;

    /// Marks the given sequences of `recipient_id` acknowledged; returns the
    /// sequences that were unacknowledged until now.
    async fn ack(&self, recipient_id: &str, sequences: &[u64]) -> Result<Vec<u64>, StoreError>;

    /// This shard's outbox, for the outbox relay.
    fn outbox(&self) -> Arc<dyn Outbox>;
}

#[cfg(test)]
mod tests;
