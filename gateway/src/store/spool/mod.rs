//! STORAGE: a shard's spool, the messages its senders sent to a region that
//! could not be reached, behind a trait like the messages' (see
//! `crate::spool` for how they are forwarded).
//!
//! Spooling is idempotent by message id: a retry of a spooled message finds
//! it there and is answered as the first attempt was. Taking a message out
//! writes its event (`message.forwarded` or `message.undeliverable`) to the
//! outbox in the same transaction. One drainer per destination region takes
//! them out at a time, across every replica of the shard: on PostgreSQL
//! under an advisory lock held by a connection of its own (released if the
//! replica dies), on SQLite (one process) under a lock of the process.

mod postgres;
mod sqlite;

pub(crate) use postgres::PgSpool;
pub(crate) use sqlite::SqliteSpool;

use fedmesh_common::events::{Event, MESSAGE_FORWARDED, MESSAGE_UNDELIVERABLE, message_event_id};

use crate::error::StoreError;
use crate::message::{Fate, Message, SpoolDepth, Spooled, SpooledMessage};

/// A sender and a recipient, whose messages keep their order through the
/// spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolPair {
    /// The sender.
    pub sender_id: String,
    /// The recipient.
    pub recipient_id: String,
}

impl SpoolPair {
    /// The pair of `message`.
    pub fn of(message: &Message) -> Self {
        SpoolPair {
            sender_id: message.sender_id.clone(),
            recipient_id: message.recipient_id.clone(),
        }
    }
}

/// One shard's spool.
#[async_trait::async_trait]
pub trait SpoolStore: Send + Sync + 'static {
    /// Spools `message` for `destination_region` (its recipient's home); a
    /// message whose id is spooled already is left as it is and found
    /// `duplicate`.
    async fn spool(
        &self,
        destination_region: &str,
        message: &Message,
    ) -> Result<Spooled, StoreError>;

    /// For each pair, whether messages of its sender for its recipient
    /// wait in the spool (then the sender's next message for that recipient
    /// waits behind them); asked for many pairs at once, as sends come.
    async fn holds(&self, pairs: &[SpoolPair]) -> Result<Vec<bool>, StoreError>;

    /// The first spooled messages for `destination_region`, in the order
    /// they were spooled: at most `max_rows`, stopping before the message
    /// whose payload would take them past `max_bytes` (the first is always
    /// returned).
    async fn next(
        &self,
        destination_region: &str,
        max_rows: u32,
        max_bytes: usize,
    ) -> Result<Vec<SpooledMessage>, StoreError>;

    /// Takes `done` out of the spool with each one's event, in one
    /// transaction.
    async fn remove(&self, done: &[(SpooledMessage, Fate)]) -> Result<(), StoreError>;

    /// Records a failed attempt to forward the messages `message_ids`, and
    /// why.
    async fn attempted(&self, message_ids: &[String], error: &str) -> Result<(), StoreError>;

    /// What waits for each region, by region.
    async fn depths(&self) -> Result<Vec<SpoolDepth>, StoreError>;

    /// Takes the drainer's lock of `destination_region`, or None while
    /// another drainer (of this or another replica) holds it. The lock is
    /// held until the returned guard drops.
    async fn lock_drain(&self, destination_region: &str) -> Result<Option<DrainLock>, StoreError>;
}

/// The lock of one destination's drainer, released when dropped.
pub struct DrainLock(#[allow(dead_code)] Box<dyn Send + Sync>);

impl std::fmt::Debug for DrainLock {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("DrainLock")
    }
}

/// The event of a message leaving the spool of `region` by `fate`. Both
/// concern the sender, whose message it is: `recipient` names the other
/// end. The id follows from the kind, region and message, so an event
/// written again keeps it.
fn fate_event(region: &str, spooled: &SpooledMessage, fate: &Fate, now_micros: i64) -> Event {
    let message = &spooled.message;
    let kind = match fate {
        Fate::Forwarded { .. } => MESSAGE_FORWARDED,
        Fate::Undeliverable { .. } => MESSAGE_UNDELIVERABLE,
    };
    let mut event = Event::new(kind, region, &message.sender_id)
        .with_message(&message.message_id)
        .with_attribute("recipient", &message.recipient_id)
        .with_attribute("kind", &message.kind)
        .with_attribute("destination_region", &spooled.destination_region)
        .with_attribute("spooled_at_micros", spooled.spooled_at_micros);
    event.event_id = message_event_id(kind, region, &message.message_id);
    event.occurred_at_micros = now_micros;
    match fate {
        Fate::Forwarded {
            home_region,
            duplicate,
        } => {
            event = event
                .with_attribute("home_region", home_region)
                .with_attribute("duplicate", duplicate);
        }
        Fate::Undeliverable { reason } => event = event.with_attribute("reason", reason),
    }
    if !message.traceparent.is_empty() {
        event = event.with_attribute(
            fedmesh_common::events::TRACEPARENT_ATTRIBUTE,
            &message.traceparent,
        );
    }
    event
}

/// A `spool` row as a spooled message, on either backend.
fn spooled_from_row<R>(row: &R) -> Result<SpooledMessage, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(SpooledMessage {
        message: super::message_from_row(row)?,
        destination_region: row.try_get("destination_region")?,
        spooled_at_micros: row.try_get("spooled_at")?,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or_default(),
    })
}

/// A row of [`DEPTHS`] as a spool's depth, on either backend.
fn depth_from_row<R>(row: &R) -> Result<SpoolDepth, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(SpoolDepth {
        destination_region: row.try_get("destination_region")?,
        messages: u64::try_from(row.try_get::<i64, _>("messages")?).unwrap_or_default(),
        oldest_spooled_at_micros: row.try_get("oldest")?,
    })
}

/// What waits for each destination region, the same on every backend.
const DEPTHS: &str = "SELECT destination_region, count(*) AS messages, min(spooled_at) AS oldest \
     FROM spool GROUP BY destination_region ORDER BY destination_region";

/// A message's headers as stored.
fn headers_json(message: &Message) -> Result<String, StoreError> {
    serde_json::to_string(&message.headers).map_err(StoreError::corrupt)
}

/// The columns of a spooled message, in the order the inserts bind them.
const COLUMNS: &str = "destination_region, message_id, sender_id, recipient_id, kind, payload, \
     headers, idempotency_key, origin_region, accepted_at, traceparent, spooled_at";

/// The columns a drainer reads.
const READ_COLUMNS: &str = "destination_region, message_id, sender_id, recipient_id, kind, \
     payload, headers, idempotency_key, origin_region, accepted_at, traceparent, spooled_at, \
     attempts";
