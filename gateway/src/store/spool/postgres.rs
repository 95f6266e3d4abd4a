//! The spool on PostgreSQL.

use fedmesh_common::postgres::insert_events;
use fedmesh_common::time::now_micros;
use sqlx::postgres::PgPool;
use sqlx::{Connection, Row};

use super::{
    COLUMNS, DEPTHS, DrainLock, READ_COLUMNS, SpoolPair, SpoolStore, depth_from_row, fate_event,
    headers_json, spooled_from_row,
};
use crate::error::StoreError;
use crate::message::{Fate, Message, SpoolDepth, Spooled, SpooledMessage};

/// The first key of the drainers' advisory locks (the second is the hash of
/// the destination region): "fmsp".
const DRAIN_LOCK_CLASS: i32 = 0x666d_7370;

/// The spool of a PostgreSQL shard.
#[derive(Debug, Clone)]
pub(crate) struct PgSpool {
    pool: PgPool,
    url: String,
    region: String,
    events: bool,
}

impl PgSpool {
    /// The spool of the shard `pool` connects to (at `url`, where the
    /// drainers' locks open connections of their own), in `region`.
    pub(crate) fn new(pool: PgPool, url: &str, region: &str, events: bool) -> Self {
        PgSpool {
            pool,
            url: url.to_string(),
            region: region.to_string(),
            events,
        }
    }
}

/// Holds a drainer's advisory lock: the session that took it. Dropping it
/// closes the session, which releases the lock.
struct HeldLock(#[allow(dead_code)] sqlx::PgConnection);

#[async_trait::async_trait]
impl SpoolStore for PgSpool {
    async fn spool(
        &self,
        destination_region: &str,
        message: &Message,
    ) -> Result<Spooled, StoreError> {
        let spooled_at = now_micros();
        // The row inserted now, or the one an earlier attempt spooled (the
        // statement's snapshot does not see the row it inserts).
        let row = sqlx::query(&format!(
            "WITH inserted AS ( \
               INSERT INTO spool ({COLUMNS}) \
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
               ON CONFLICT (message_id) DO NOTHING RETURNING spooled_at \
             ) \
             SELECT spooled_at, true AS new FROM inserted \
             UNION ALL SELECT spooled_at, false FROM spool WHERE message_id = $2 \
             LIMIT 1"
        ))
        .bind(destination_region)
        .bind(&message.message_id)
        .bind(&message.sender_id)
        .bind(&message.recipient_id)
        .bind(&message.kind)
        .bind(message.payload.as_ref())
        .bind(headers_json(message)?)
        .bind(&message.idempotency_key)
        .bind(&message.origin_region)
        .bind(message.accepted_at_micros)
        .bind(super::super::stored_traceparent(message))
        .bind(spooled_at)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Spooled {
                spooled_at_micros: row.try_get("spooled_at")?,
                duplicate: !row.try_get::<bool, _>("new")?,
            }),
            // Taken out between the conflict and the lookup: it was
            // forwarded meanwhile, which a retry may also say.
            None => Ok(Spooled {
                spooled_at_micros: spooled_at,
                duplicate: true,
            }),
        }
    }

    async fn holds(&self, pairs: &[SpoolPair]) -> Result<Vec<bool>, StoreError> {
        let (senders, recipients): (Vec<&str>, Vec<&str>) = pairs
            .iter()
            .map(|pair| (pair.sender_id.as_str(), pair.recipient_id.as_str()))
            .unzip();
        // The ordinals (from 1) of the pairs that hold messages.
        let held: Vec<i64> = sqlx::query_scalar(
            "SELECT q.n FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS q(s, r, n) \
             WHERE EXISTS (SELECT 1 FROM spool WHERE sender_id = q.s AND recipient_id = q.r)",
        )
        .bind(&senders)
        .bind(&recipients)
        .fetch_all(&self.pool)
        .await?;
        let mut holds = vec![false; pairs.len()];
        for n in held {
            if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| holds.get_mut(i)) {
                *slot = true;
            }
        }
        Ok(holds)
    }

    async fn next(
        &self,
        destination_region: &str,
        max_rows: u32,
        max_bytes: usize,
    ) -> Result<Vec<SpooledMessage>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {READ_COLUMNS} FROM ( \
               SELECT *, sum(octet_length(payload)) OVER (ORDER BY position) \
                 - octet_length(payload) AS bytes_before \
               FROM spool WHERE destination_region = $1 ORDER BY position LIMIT $2) AS page \
             WHERE bytes_before < $3 ORDER BY position"
        ))
        .bind(destination_region)
        .bind(i64::from(max_rows))
        .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(spooled_from_row).collect()
    }

    async fn remove(&self, done: &[(SpooledMessage, Fate)]) -> Result<(), StoreError> {
        if done.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = done
            .iter()
            .map(|(spooled, _)| spooled.message.message_id.as_str())
            .collect();
        let now = now_micros();
        let mut transaction = self.pool.begin().await?;
        let removed: Vec<String> =
            sqlx::query_scalar("DELETE FROM spool WHERE message_id = ANY($1) RETURNING message_id")
                .bind(&ids)
                .fetch_all(&mut *transaction)
                .await?;
        if self.events {
            // Only what this transaction took out: a message another
            // drainer took out already has its event.
            let events: Vec<_> = done
                .iter()
                .filter(|(spooled, _)| removed.contains(&spooled.message.message_id))
                .map(|(spooled, fate)| fate_event(&self.region, spooled, fate, now))
                .collect();
            if !events.is_empty() {
                insert_events(&mut transaction, &events).await?;
            }
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn attempted(&self, message_ids: &[String], error: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE spool SET attempts = attempts + 1, last_error = $2 WHERE message_id = ANY($1)",
        )
        .bind(message_ids)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn depths(&self) -> Result<Vec<SpoolDepth>, StoreError> {
        let rows = sqlx::query(DEPTHS).fetch_all(&self.pool).await?;
        rows.iter().map(depth_from_row).collect()
    }

    async fn lock_drain(&self, destination_region: &str) -> Result<Option<DrainLock>, StoreError> {
        // A session of its own, outside the pool: the lock lasts as long as
        // the session, and a pooled connection would outlive the guard.
        let mut connection = sqlx::PgConnection::connect(&self.url).await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(DRAIN_LOCK_CLASS)
            .bind(destination_region)
            .fetch_one(&mut connection)
            .await?;
        if locked {
            Ok(Some(DrainLock(Box::new(HeldLock(connection)))))
        } else {
            connection.close().await?;
            Ok(None)
        }
    }
}
