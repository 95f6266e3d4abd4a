//! The spool on SQLite (the dev mesh: one process per database file).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use fedmesh_common::sqlite::{begin_write, insert_event};
use fedmesh_common::time::now_micros;
use sqlx::sqlite::SqlitePool;

use super::{
    COLUMNS, DEPTHS, DrainLock, READ_COLUMNS, SpoolPair, SpoolStore, depth_from_row, fate_event,
    headers_json, spooled_from_row,
};
use crate::error::StoreError;
use crate::message::{Fate, Message, SpoolDepth, Spooled, SpooledMessage};

/// The destinations being drained, by database file: every store of this
/// process opened on one file shares them.
type Draining = Arc<Mutex<HashSet<(String, String)>>>;

fn draining() -> Draining {
    static DRAINING: std::sync::OnceLock<Draining> = std::sync::OnceLock::new();
    Arc::clone(DRAINING.get_or_init(Draining::default))
}

/// The spool of a SQLite shard.
#[derive(Debug, Clone)]
pub(crate) struct SqliteSpool {
    pool: SqlitePool,
    /// The database, naming its drainers' locks.
    url: String,
    region: String,
    events: bool,
}

impl SqliteSpool {
    /// The spool of the shard `pool` connects to (at `url`), in `region`.
    pub(crate) fn new(pool: SqlitePool, url: &str, region: &str, events: bool) -> Self {
        SqliteSpool {
            pool,
            url: url.to_string(),
            region: region.to_string(),
            events,
        }
    }
}

/// A destination marked as being drained; the mark goes when it drops.
struct HeldLock {
    draining: Draining,
    key: (String, String),
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        self.draining
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.key);
    }
}

#[async_trait::async_trait]
impl SpoolStore for SqliteSpool {
    async fn spool(
        &self,
        destination_region: &str,
        message: &Message,
    ) -> Result<Spooled, StoreError> {
        let spooled_at = now_micros();
        let mut transaction = begin_write(&self.pool).await?;
        let existing: Option<i64> =
            sqlx::query_scalar("SELECT spooled_at FROM spool WHERE message_id = ?")
                .bind(&message.message_id)
                .fetch_optional(&mut *transaction)
                .await?;
        if let Some(spooled_at_micros) = existing {
            return Ok(Spooled {
                spooled_at_micros,
                duplicate: true,
            });
        }
        sqlx::query(&format!(
            "INSERT INTO spool ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(Spooled {
            spooled_at_micros: spooled_at,
            duplicate: false,
        })
    }

    async fn holds(&self, pairs: &[SpoolPair]) -> Result<Vec<bool>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        let mut held = Vec::with_capacity(pairs.len());
        for pair in pairs {
            held.push(
                sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM spool WHERE sender_id = ? AND recipient_id = ?)",
                )
                .bind(&pair.sender_id)
                .bind(&pair.recipient_id)
                .fetch_one(&mut *connection)
                .await?,
            );
        }
        Ok(held)
    }

    async fn next(
        &self,
        destination_region: &str,
        max_rows: u32,
        max_bytes: usize,
    ) -> Result<Vec<SpooledMessage>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {READ_COLUMNS} FROM ( \
               SELECT *, sum(length(payload)) OVER (ORDER BY position) - length(payload) \
                 AS bytes_before \
               FROM spool WHERE destination_region = ?1 ORDER BY position LIMIT ?2) \
             WHERE bytes_before < ?3 ORDER BY position"
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
        let now = now_micros();
        let mut transaction = begin_write(&self.pool).await?;
        for (spooled, fate) in done {
            let removed = sqlx::query("DELETE FROM spool WHERE message_id = ?")
                .bind(&spooled.message.message_id)
                .execute(&mut *transaction)
                .await?
                .rows_affected();
            // A message another drainer took out already has its event.
            if removed > 0 && self.events {
                insert_event(
                    &mut transaction,
                    &fate_event(&self.region, spooled, fate, now),
                )
                .await?;
            }
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn attempted(&self, message_ids: &[String], error: &str) -> Result<(), StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        for message_id in message_ids {
            sqlx::query(
                "UPDATE spool SET attempts = attempts + 1, last_error = ? WHERE message_id = ?",
            )
            .bind(error)
            .bind(message_id)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn depths(&self) -> Result<Vec<SpoolDepth>, StoreError> {
        let rows = sqlx::query(DEPTHS).fetch_all(&self.pool).await?;
        rows.iter().map(depth_from_row).collect()
    }

    async fn lock_drain(&self, destination_region: &str) -> Result<Option<DrainLock>, StoreError> {
        let draining = draining();
        let key = (self.url.clone(), destination_region.to_string());
        let taken = draining
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key.clone());
        Ok(taken.then(|| DrainLock(Box::new(HeldLock { draining, key }))))
    }
}
