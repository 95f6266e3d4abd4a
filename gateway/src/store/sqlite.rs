//! A shard on SQLite (WAL, synchronous=FULL): the dev mesh's store.

use std::sync::Arc;

use fedmesh_common::events::{Event, MESSAGE_ACCEPTED, MESSAGE_DELIVERED, Outbox};
use fedmesh_common::sqlite::{SqliteOutbox, begin_write, insert_event, open_pool};
use fedmesh_common::time::now_micros;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use super::{MessageStore, PoolUsage, inbox_message_from_row, to_sequence};
use crate::error::StoreError;
use crate::inbox::stream::Page;
use crate::message::{InboxMessage, InboxStats, Message, Stored};

/// A shard on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteMessageStore {
    pool: SqlitePool,
    region: String,
}

impl SqliteMessageStore {
    /// Opens (creating if missing) the shard at `url` in `region` and
    /// applies migrations.
    pub async fn open(url: &str, region: &str) -> Result<Self, StoreError> {
        let pool = open_pool(url, 4).await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteMessageStore {
            pool,
            region: region.to_string(),
        })
    }
}

fn to_sql_sequence(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl MessageStore for SqliteMessageStore {
    async fn insert_batch(&self, messages: &[Message]) -> Result<Vec<Stored>, StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        let stored_at_micros = now_micros();
        let mut results = Vec::with_capacity(messages.len());
        for message in messages {
            let existing = sqlx::query(
                "SELECT message_id, sequence, stored_at FROM messages \
                 WHERE message_id = ? OR (sender_id = ? AND idempotency_key = ?) LIMIT 1",
            )
            .bind(&message.message_id)
            .bind(&message.sender_id)
            .bind(&message.idempotency_key)
            .fetch_optional(&mut *transaction)
            .await?;
            if let Some(row) = existing {
                results.push(Stored {
                    message_id: row.try_get("message_id")?,
                    sequence: to_sequence(row.try_get("sequence")?)?,
                    stored_at_micros: row.try_get("stored_at")?,
                    duplicate: true,
                });
                continue;
            }
            let sequence: i64 = sqlx::query_scalar(
                "INSERT INTO inboxes (recipient_id, last_sequence) VALUES (?, 1) \
                 ON CONFLICT (recipient_id) DO UPDATE SET last_sequence = last_sequence + 1 \
                 RETURNING last_sequence",
            )
            .bind(&message.recipient_id)
            .fetch_one(&mut *transaction)
            .await?;
            let headers = serde_json::to_string(&message.headers)
                .map_err(|error| StoreError::Corrupt(error.to_string()))?;
            sqlx::query(
                "INSERT INTO messages (message_id, recipient_id, sequence, sender_id, kind, payload, \
                 headers, idempotency_key, origin_region, accepted_at, stored_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&message.message_id)
            .bind(&message.recipient_id)
            .bind(sequence)
            .bind(&message.sender_id)
            .bind(&message.kind)
            .bind(&message.payload)
            .bind(headers)
            .bind(&message.idempotency_key)
            .bind(&message.origin_region)
            .bind(message.accepted_at_micros)
            .bind(stored_at_micros)
            .execute(&mut *transaction)
            .await?;
            let event = Event::new(MESSAGE_ACCEPTED, &self.region, &message.recipient_id)
                .with_message(&message.message_id)
                .with_attribute("sender", &message.sender_id)
                .with_attribute("kind", &message.kind)
                .with_attribute("sequence", sequence);
            insert_event(&mut transaction, &event).await?;
            results.push(Stored {
                message_id: message.message_id.clone(),
                sequence: to_sequence(sequence)?,
                stored_at_micros,
                duplicate: false,
            });
        }
        transaction.commit().await?;
        Ok(results)
    }

    async fn fetch_unacked(
        &self,
        recipient_id: &str,
        page: Page,
    ) -> Result<Vec<InboxMessage>, StoreError> {
        let rows = sqlx::query(
            "SELECT message_id, recipient_id, sequence, sender_id, kind, payload, headers, \
             idempotency_key, origin_region, accepted_at FROM ( \
               SELECT *, sum(length(payload)) OVER (ORDER BY sequence) - length(payload) AS bytes_before \
               FROM messages WHERE recipient_id = ? AND acked_at IS NULL AND sequence > ? \
               ORDER BY sequence LIMIT ?) \
             WHERE bytes_before < ? ORDER BY sequence",
        )
        .bind(recipient_id)
        .bind(to_sql_sequence(page.after_sequence))
        .bind(i64::from(page.limit))
        .bind(to_sql_sequence(page.max_bytes))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(inbox_message_from_row).collect()
    }

    async fn claim_inbox(&self, recipient_id: &str) -> Result<u64, StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        let epoch: i64 = sqlx::query_scalar(
            "INSERT INTO inbox_streams (recipient_id, epoch) VALUES (?, 1) \
             ON CONFLICT (recipient_id) DO UPDATE SET epoch = epoch + 1 RETURNING epoch",
        )
        .bind(recipient_id)
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;
        to_sequence(epoch)
    }

    async fn inbox_stats(&self, recipient_id: &str) -> Result<InboxStats, StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM messages WHERE recipient_id = ? AND acked_at IS NULL) \
               AS unacknowledged, \
             (SELECT last_sequence FROM inboxes WHERE recipient_id = ?) AS last_sequence",
        )
        .bind(recipient_id)
        .bind(recipient_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(InboxStats {
            unacknowledged: to_sequence(row.try_get("unacknowledged")?)?,
            last_sequence: to_sequence(
                row.try_get::<Option<i64>, _>("last_sequence")?.unwrap_or(0),
            )?,
        })
    }

    async fn inbox_epoch(&self, recipient_id: &str) -> Result<u64, StoreError> {
        let epoch: Option<i64> =
            sqlx::query_scalar("SELECT epoch FROM inbox_streams WHERE recipient_id = ?")
                .bind(recipient_id)
                .fetch_optional(&self.pool)
                .await?;
        to_sequence(epoch.unwrap_or(0))
    }

    async fn ack(&self, recipient_id: &str, sequences: &[u64]) -> Result<Vec<u64>, StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        let acked_at = now_micros();
        let mut acked = Vec::with_capacity(sequences.len());
        for &sequence in sequences {
            let row = sqlx::query(
                "UPDATE messages SET acked_at = ? \
                 WHERE recipient_id = ? AND sequence = ? AND acked_at IS NULL \
                 RETURNING message_id, sender_id, kind",
            )
            .bind(acked_at)
            .bind(recipient_id)
            .bind(to_sql_sequence(sequence))
            .fetch_optional(&mut *transaction)
            .await?;
            let Some(row) = row else { continue };
            let message_id: String = row.try_get("message_id")?;
            let sender_id: String = row.try_get("sender_id")?;
            let kind: String = row.try_get("kind")?;
            let event = Event::new(MESSAGE_DELIVERED, &self.region, recipient_id)
                .with_message(&message_id)
                .with_attribute("sender", sender_id)
                .with_attribute("kind", kind)
                .with_attribute("sequence", sequence);
            insert_event(&mut transaction, &event).await?;
            acked.push(sequence);
        }
        transaction.commit().await?;
        Ok(acked)
    }

    async fn purge_acked(&self, acked_before: i64, limit: u32) -> Result<u64, StoreError> {
        let deleted = sqlx::query(
            "DELETE FROM messages WHERE message_id IN \
             (SELECT message_id FROM messages WHERE acked_at IS NOT NULL AND acked_at < ? LIMIT ?)",
        )
        .bind(acked_before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(deleted.rows_affected())
    }

    fn pool_usage(&self) -> PoolUsage {
        PoolUsage::of(&self.pool)
    }

    fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(SqliteOutbox::new(self.pool.clone()))
    }
}
