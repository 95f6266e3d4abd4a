//! PostgreSQL plumbing shared by the roles' stores: the event outbox (table
//! `outbox`, created by each role's migrations with the same columns: a row
//! is one event, or the events of a batch of messages as arrays) and how
//! events are written to it.
//!
//! Queries that find rows by a predicate an index or a scan could serve
//! (`= ANY($1)`, `ORDER BY ... LIMIT`) are not kept as prepared statements
//! (`persistent(false)`): PostgreSQL plans them at each execution for the
//! table as it is then. A kept statement's generic plan, made while the table
//! was small, would keep scanning it whole as it grows, until the next
//! `ANALYZE`. Statements that only insert keep their plans.

use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::events::{
    BoxFuture, BusError, Event, EventPublisher, MessageEntry, Outbox, message_events,
};

/// Advisory lock key of an outbox: one relay drains a database at a time.
const OUTBOX_LOCK: i64 = 0x6665_646d_6573_6801;

/// How the roles connect: at most `max_connections`, waiting up to 10 s for
/// one. A connection is not pinged before each use (that would be a round
/// trip per statement): a connection found broken is closed by the pool, and
/// the stores retry what it failed.
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
}

/// Writes `events` to the outbox on `connection` (inside the caller's
/// transaction), in one statement.
pub async fn insert_events(
    connection: &mut sqlx::PgConnection,
    events: &[Event],
) -> Result<(), sqlx::Error> {
    let mut attributes = Vec::with_capacity(events.len());
    for event in events {
        attributes.push(
            serde_json::to_string(&event.attributes)
                .map_err(|error| sqlx::Error::Encode(Box::new(error)))?,
        );
    }
    sqlx::query(
        "INSERT INTO outbox (event_id, kind, region, agency_id, message_id, occurred_at, attributes) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[])",
    )
    .bind(events.iter().map(|event| event.event_id.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|event| event.kind.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|event| event.region.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|event| event.agency_id.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|event| event.message_id.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|event| event.occurred_at_micros).collect::<Vec<_>>())
    .bind(attributes)
    .execute(connection)
    .await?;
    Ok(())
}

/// The outbox of a PostgreSQL shard.
pub struct PgOutbox {
    pool: PgPool,
}

impl PgOutbox {
    /// The outbox in `pool`'s database.
    pub fn new(pool: PgPool) -> Self {
        PgOutbox { pool }
    }
}

fn outbox_error(error: impl std::fmt::Display) -> BusError {
    BusError(format!("outbox: {error}"))
}

/// The events of one outbox row: a single event, or the events of a batch
/// of messages (its arrays set).
fn events_of_row(row: &sqlx::postgres::PgRow) -> Result<Vec<Event>, sqlx::Error> {
    let kind: String = row.try_get("kind")?;
    let region: String = row.try_get("region")?;
    let occurred_at_micros: i64 = row.try_get("occurred_at")?;
    let message_ids: Option<Vec<String>> = row.try_get("message_ids")?;
    if let Some(message_ids) = message_ids {
        let recipient_ids: Vec<String> = row.try_get("recipient_ids")?;
        let sender_ids: Vec<String> = row.try_get("sender_ids")?;
        let message_kinds: Vec<String> = row.try_get("message_kinds")?;
        let sequences: Vec<i64> = row.try_get("sequences")?;
        // NULL on rows written before messages carried a trace context, and
        // NULL elements for messages stored before.
        let traceparents: Vec<Option<String>> = row
            .try_get::<Option<Vec<Option<String>>>, _>("traceparents")?
            .unwrap_or_default();
        let mut traceparents = traceparents.into_iter();
        let entries = message_ids
            .into_iter()
            .zip(recipient_ids)
            .zip(sender_ids)
            .zip(message_kinds)
            .zip(sequences)
            .map(
                |((((message_id, recipient_id), sender_id), message_kind), sequence)| {
                    MessageEntry {
                        message_id,
                        recipient_id,
                        sender_id,
                        message_kind,
                        sequence: u64::try_from(sequence).unwrap_or_default(),
                        traceparent: traceparents.next().flatten().unwrap_or_default(),
                    }
                },
            )
            .collect();
        return Ok(message_events(&kind, &region, occurred_at_micros, entries));
    }
    Ok(vec![crate::store::single_event_from_row(
        row,
        kind,
        region,
        occurred_at_micros,
    )?])
}

impl Outbox for PgOutbox {
    fn relay_batch<'a>(
        &'a self,
        limit: u32,
        publisher: &'a dyn EventPublisher,
    ) -> BoxFuture<'a, Result<usize, BusError>> {
        Box::pin(async move {
            let mut transaction = self.pool.begin().await.map_err(outbox_error)?;
            // One drainer at a time keeps the order; the others find the
            // lock taken and come back later.
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                .bind(OUTBOX_LOCK)
                .fetch_one(&mut *transaction)
                .await
                .map_err(outbox_error)?;
            if !locked {
                return Ok(0);
            }
            let rows = sqlx::query(
                "SELECT row_id, event_id, kind, region, agency_id, message_id, occurred_at, attributes, \
                 message_ids, recipient_ids, sender_ids, message_kinds, sequences, traceparents \
                 FROM outbox ORDER BY row_id LIMIT $1",
            )
            .persistent(false)
            .bind(i64::from(limit))
            .fetch_all(&mut *transaction)
            .await
            .map_err(outbox_error)?;
            if rows.is_empty() {
                return Ok(0);
            }
            let mut row_ids = Vec::with_capacity(rows.len());
            let mut events = Vec::with_capacity(rows.len());
            for row in &rows {
                row_ids.push(row.try_get::<i64, _>("row_id").map_err(outbox_error)?);
                events.extend(events_of_row(row).map_err(outbox_error)?);
            }
            let count = events.len();
            publisher.publish(events).await?;
            sqlx::query("DELETE FROM outbox WHERE row_id = ANY($1)")
                .persistent(false)
                .bind(row_ids)
                .execute(&mut *transaction)
                .await
                .map_err(outbox_error)?;
            transaction.commit().await.map_err(outbox_error)?;
            Ok(count)
        })
    }
}
