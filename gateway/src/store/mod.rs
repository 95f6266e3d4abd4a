//! STORAGE: a shard's messages behind a trait, so the same gateway logic runs
//! on SQLite (dev mesh) and PostgreSQL (deployments).
//!
//! Every change writes its events to the shard's outbox in the same
//! transaction: storing a batch writes the `message.accepted` of its
//! messages, acknowledging writes `message.delivered`, each one outbox row
//! listing the messages. A batch is divided into what is stored already,
//! refused or new by the same rules on every backend (`plan`).
//!
//! An inbox moves between shards online: its old shard freezes it (a fence
//! in the database refuses every later reservation of its sequences, see
//! the `moving_inboxes` migrations), its messages and its agency's key
//! claims are exported page by page and imported into the new shard, which
//! then opens it where the old one stopped; the old shard forgets it,
//! keeping the frozen row as a tombstone.

mod plan;
mod postgres;
mod spool;
mod sqlite;

pub use postgres::{INBOX_CHANNEL, PgMessageStore, REPLICA_CHANNEL, STREAM_CHANNEL};
pub use spool::{DrainLock, SpoolPair, SpoolStore};
pub use sqlite::SqliteMessageStore;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use fedmesh_common::events::Outbox;
use fedmesh_common::store::Backend;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::StoreError;
use crate::inbox::InboxHub;
use crate::inbox::stream::Page;
use crate::message::{
    Claimed, Fingerprint, InboxMessage, InboxPosition, InboxStats, KeyClaim, Message, MovedKey,
    MovedMessage, Outcome, ToStore,
};

/// How many rows one statement of [`MessageStore::forget_agency`] deletes:
/// each is its own transaction, so that forgetting a large inbox never
/// holds a lock (SQLite's one write lock) for long.
const FORGET_CHUNK: u32 = 5_000;

/// Opens the shard at `url`: `postgres://...` or `sqlite://...`, with at most
/// `max_connections` for reads, acks and background work, and on PostgreSQL
/// `writers` more for the commit lanes. Without `events` the store writes
/// nothing to its outbox.
pub async fn open_store(
    url: &str,
    region: &str,
    max_connections: u32,
    writers: u32,
    events: bool,
) -> Result<Arc<dyn MessageStore>, StoreError> {
    Ok(match Backend::of_url(url)? {
        Backend::Postgres => {
            let store =
                PgMessageStore::open_with_writers(url, region, max_connections, writers).await?;
            Arc::new(if events {
                store
            } else {
                store.without_events()
            })
        }
        Backend::Sqlite => {
            let store = SqliteMessageStore::open(url, region).await?;
            Arc::new(if events {
                store
            } else {
                store.without_events()
            })
        }
    })
}

/// The times a store gives its batches: microseconds since the epoch,
/// strictly increasing, so that a batch is known by its time (see
/// `plan::Plan::outcomes`).
#[derive(Debug, Default)]
struct BatchClock {
    last: AtomicI64,
}

impl BatchClock {
    /// The time of the next batch: now, or just after the last.
    fn next(&self) -> i64 {
        let now = fedmesh_common::time::now_micros();
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

/// A message's traceparent as stored: NULL when it has none.
fn stored_traceparent(message: &Message) -> Option<&str> {
    Some(message.traceparent.as_str()).filter(|traceparent| !traceparent.is_empty())
}

/// A stored sequence, which is never negative.
fn to_sequence(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::corrupt(format!("negative sequence {value}")))
}

/// A fingerprint as stored (NULL for keys claimed before they were kept).
fn fingerprint_from(bytes: Option<Vec<u8>>) -> Result<Option<Fingerprint>, StoreError> {
    bytes
        .map(|bytes| {
            <[u8; 32]>::try_from(bytes.as_slice())
                .map(Fingerprint)
                .map_err(|_| StoreError::corrupt("a fingerprint is not 32 bytes"))
        })
        .transpose()
}

/// The message of a `messages` or `spool` row (with its `headers` as a JSON
/// object), on either backend.
fn message_from_row<R>(row: &R) -> Result<Message, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let headers: String = row.try_get("headers")?;
    Ok(Message {
        message_id: row.try_get("message_id")?,
        sender_id: row.try_get("sender_id")?,
        recipient_id: row.try_get("recipient_id")?,
        kind: row.try_get("kind")?,
        payload: row.try_get::<Vec<u8>, _>("payload")?.into(),
        headers: serde_json::from_str(&headers).map_err(StoreError::corrupt)?,
        idempotency_key: row.try_get("idempotency_key")?,
        origin_region: row.try_get("origin_region")?,
        accepted_at_micros: row.try_get("accepted_at")?,
        // NULL for messages stored before messages carried one.
        traceparent: row
            .try_get::<Option<String>, _>("traceparent")?
            .unwrap_or_default(),
    })
}

/// A `messages` row as an inbox message, on either backend.
fn inbox_message_from_row<R>(row: &R) -> Result<InboxMessage, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(InboxMessage {
        sequence: to_sequence(row.try_get("sequence")?)?,
        message: message_from_row(row)?,
    })
}

/// A `messages` row with `stored_at` and `acked_at` as a message to move,
/// on either backend.
fn moved_message_from_row<R>(row: &R) -> Result<MovedMessage, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let InboxMessage { sequence, message } = inbox_message_from_row(row)?;
    Ok(MovedMessage {
        sequence,
        message,
        stored_at_micros: row.try_get("stored_at")?,
        acked_at_micros: row.try_get("acked_at")?,
    })
}

/// An `idempotency_keys` row as a claim to move, on either backend.
fn moved_key_from_row<R>(row: &R) -> Result<MovedKey, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(MovedKey {
        sender_id: row.try_get("sender_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        fingerprint: fingerprint_from(row.try_get("fingerprint")?)?,
        message_id: row.try_get("message_id")?,
        claimed_at_micros: row.try_get("claimed_at")?,
    })
}

/// Connections of a store to its database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    /// Connections open now.
    pub open: u32,
    /// Open connections not in use.
    pub idle: u32,
    /// Most connections the store opens.
    pub max: u32,
}

impl PoolUsage {
    /// The connections of `pool`.
    pub fn of<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> Self {
        PoolUsage {
            open: pool.size(),
            idle: u32::try_from(pool.num_idle()).unwrap_or(u32::MAX),
            max: pool.options().get_max_connections(),
        }
    }
}

impl std::ops::Add for PoolUsage {
    type Output = PoolUsage;

    fn add(self, other: PoolUsage) -> PoolUsage {
        PoolUsage {
            open: self.open.saturating_add(other.open),
            idle: self.idle.saturating_add(other.idle),
            max: self.max.saturating_add(other.max),
        }
    }
}

/// One shard's message store.
#[async_trait::async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Stores `batch` in one transaction, in order, with the claims of the
    /// keys it claims and the messages' events, and returns one outcome per
    /// message. A message whose id is stored already, or whose key names a
    /// message with the same content, is not stored again: its outcome
    /// names the original with `duplicate` set. A message whose key names a
    /// message with other content is refused
    /// ([`crate::message::Refused::KeyInUse`]), and so is a message for a
    /// frozen inbox ([`crate::message::Refused::Moved`]); the rest of the
    /// batch is stored all the same.
    async fn insert_batch(&self, batch: &[ToStore]) -> Result<Vec<Outcome>, StoreError>;

    /// Claims idempotency keys of senders homed on this shard for messages
    /// stored elsewhere, in one transaction: a key already claimed is left
    /// as it is and its claim returned.
    async fn claim_keys(&self, claims: &[KeyClaim]) -> Result<Vec<Claimed>, StoreError>;

    /// Forgets up to `limit` idempotency keys claimed before
    /// `claimed_before` (microseconds since the epoch); returns how many.
    async fn purge_keys(&self, claimed_before: i64, limit: u32) -> Result<u64, StoreError>;

    /// The unacknowledged messages of `recipient_id` that `page` asks for,
    /// in sequence order: after its sequence, at most its row limit, and
    /// stopping before the first message that would take the payloads past
    /// its byte limit (the first message is always returned).
    async fn fetch_unacked(
        &self,
        recipient_id: &str,
        page: Page,
    ) -> Result<Vec<InboxMessage>, StoreError>;

    /// Records that a new Receive stream of `recipient_id` opens and returns
    /// its epoch: higher than that of every earlier stream of the inbox on
    /// this shard. Other replicas hear of it and end their older streams.
    /// Fails with [`StoreError::InboxMoved`] if the inbox is frozen.
    async fn claim_inbox(&self, recipient_id: &str) -> Result<u64, StoreError>;

    /// The epoch of the newest stream of `recipient_id` (0 before any).
    async fn inbox_epoch(&self, recipient_id: &str) -> Result<u64, StoreError>;

    /// How many messages of `recipient_id` wait for an acknowledgement, and
    /// its newest sequence.
    async fn inbox_stats(&self, recipient_id: &str) -> Result<InboxStats, StoreError>;

    /// Marks the given sequences of `recipient_id` acknowledged; returns the
    /// sequences that were unacknowledged until now.
    async fn ack(&self, recipient_id: &str, sequences: &[u64]) -> Result<Vec<u64>, StoreError>;

    /// Deletes up to `limit` messages acknowledged before `acked_before`
    /// (microseconds since the epoch); returns how many. Unacknowledged
    /// messages are never deleted.
    async fn purge_acked(&self, acked_before: i64, limit: u32) -> Result<u64, StoreError>;

    /// Freezes the inbox of `agency_id` before it moves to another shard
    /// (creating its row, at sequence 0, if it has none): from its commit
    /// on, no message for it is stored here ([`crate::message::Refused::Moved`])
    /// and no stream of it opens. It waits for a batch in flight for the
    /// inbox, which holds the inbox's row. Like [`MessageStore::claim_inbox`]
    /// it takes the next stream epoch, so that the inbox's streams end on
    /// every replica, and returns it. Freezing a frozen inbox again is
    /// harmless.
    async fn freeze_inbox(&self, agency_id: &str) -> Result<u64, StoreError>;

    /// Lets the inbox of `agency_id` take messages and streams again (its
    /// move was cancelled); its sequences go on where they stopped.
    async fn thaw_inbox(&self, agency_id: &str) -> Result<(), StoreError>;

    /// Where the inbox of `agency_id` stands: its last sequence and stream
    /// epoch (0 each for an inbox this shard has never seen).
    async fn inbox_position(&self, agency_id: &str) -> Result<InboxPosition, StoreError>;

    /// A page of the messages of `agency_id` (as recipient) to move,
    /// acknowledged or not: those after `after_sequence` in sequence order,
    /// at most `max_rows`, stopping before the message whose payload would
    /// take the page past `max_bytes` (the first message is always
    /// returned). An empty page means the inbox is exported.
    async fn export_messages(
        &self,
        agency_id: &str,
        after_sequence: u64,
        max_rows: u32,
        max_bytes: usize,
    ) -> Result<Vec<MovedMessage>, StoreError>;

    /// A page of the idempotency key claims of `agency_id` (as sender) to
    /// move: at most `max_rows` of those after `after_key`, in key order.
    async fn export_keys(
        &self,
        agency_id: &str,
        after_key: Option<&str>,
        max_rows: u32,
    ) -> Result<Vec<MovedKey>, StoreError>;

    /// Stores moved messages as they were, in one transaction and without
    /// events: their sequences, when they were stored and acknowledged. A
    /// message stored already keeps its row, and takes the acknowledgement
    /// time of the moved one if it had none (so that copying an inbox again
    /// brings the acknowledgements made meanwhile). Returns how many were
    /// new here.
    async fn import_messages(&self, messages: &[MovedMessage]) -> Result<u64, StoreError>;

    /// Stores moved key claims in one transaction; a claim of the same
    /// (sender, key) already here is kept. Returns how many were new here.
    async fn import_keys(&self, keys: &[MovedKey]) -> Result<u64, StoreError>;

    /// Opens the inbox of `agency_id` after its messages were imported:
    /// it takes messages (and streams) again, its sequences continue after
    /// `position.last_sequence` and its stream epochs after
    /// `position.epoch`, unless it is further on here already.
    async fn open_imported_inbox(
        &self,
        agency_id: &str,
        position: InboxPosition,
    ) -> Result<(), StoreError>;

    /// Deletes what this shard holds of `agency_id`: its messages (as
    /// recipient), its key claims (as sender) and its stream epoch, in
    /// chunks of their own transactions, and returns how many messages and
    /// claims it deleted. The inbox is frozen first, so that nothing is
    /// stored for it meanwhile; with `keep_frozen` its row stays frozen
    /// after, a tombstone that still refuses a stale gateway's messages,
    /// without it the row goes too and the inbox starts anew from sequence
    /// 1 (an import undone).
    async fn forget_agency(&self, agency_id: &str, keep_frozen: bool) -> Result<u64, StoreError>;

    /// This shard's spool: messages of its senders for regions that could
    /// not be reached.
    fn spool(&self) -> Arc<dyn SpoolStore>;

    /// This shard's outbox, for the outbox relay.
    fn outbox(&self) -> Arc<dyn Outbox>;

    /// The store's connections, all its pools together.
    fn pool_usage(&self) -> PoolUsage;

    /// Whether the shard answers: one round trip on a connection of its
    /// pool.
    async fn ping(&self) -> Result<(), StoreError>;

    /// What waits unacknowledged in all the shard's inboxes: how many
    /// messages, and when the oldest was stored (microseconds since the
    /// epoch; None when none waits). Reads every unacknowledged row: for
    /// metrics, every few seconds, not per call.
    async fn backlog(&self) -> Result<(u64, Option<i64>), StoreError>;

    /// How many batches may usefully commit at once: 1 for a store with a
    /// single writer lock (SQLite).
    fn max_concurrent_batches(&self) -> usize {
        1
    }

    /// Starts telling `hub` what other processes do on this shard: messages
    /// they store, streams they open. Stores only one process writes need
    /// nothing: the committer and the streams tell the hub themselves.
    fn spawn_wakeups(&self, hub: Arc<InboxHub>, tasks: &TaskTracker, shutdown: CancellationToken) {
        let _ = (hub, tasks, shutdown);
    }
}

#[cfg(test)]
mod tests;
