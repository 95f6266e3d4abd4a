//! A shard on SQLite (WAL, synchronous=FULL): the dev mesh's store.

use std::sync::Arc;

use fedmesh_common::events::{MESSAGE_ACCEPTED, MESSAGE_DELIVERED, MessageEntry, Outbox};
use fedmesh_common::sqlite::{SqliteOutbox, begin_write, insert_message_events, open_pool};
use fedmesh_common::time::now_micros;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use super::plan::{self, Known, NewMessage};
use super::spool::{SpoolStore, SqliteSpool};
use super::{
    BatchClock, FORGET_CHUNK, MessageStore, PoolUsage, fingerprint_from, inbox_message_from_row,
    moved_key_from_row, moved_message_from_row, stored_traceparent, to_sequence,
};
use crate::error::StoreError;
use crate::inbox::stream::Page;
use crate::message::{
    Claimed, ExistingClaim, Fingerprint, InboxMessage, InboxPosition, InboxStats, KeyClaim,
    MovedKey, MovedMessage, Outcome, ToStore,
};

/// A shard on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteMessageStore {
    pool: SqlitePool,
    /// The database, naming what belongs to it in this process.
    url: String,
    region: String,
    clock: Arc<BatchClock>,
    /// Whether events are written to the outbox (off without a bus).
    events: bool,
}

impl SqliteMessageStore {
    /// Opens (creating if missing) the shard at `url` in `region` and
    /// applies migrations.
    pub async fn open(url: &str, region: &str) -> Result<Self, StoreError> {
        let pool = open_pool(url, 4).await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteMessageStore {
            pool,
            url: url.to_string(),
            region: region.to_string(),
            clock: Arc::new(BatchClock::default()),
            events: true,
        })
    }

    /// The same store, writing no events (a gateway without an event bus).
    pub fn without_events(mut self) -> Self {
        self.events = false;
        self
    }
}

fn to_sql_sequence(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl SqliteMessageStore {
    /// The claim of (`sender_id`, `key`), if there is one.
    async fn claim_of(
        connection: &mut sqlx::SqliteConnection,
        sender_id: &str,
        key: &str,
    ) -> Result<Option<ExistingClaim>, StoreError> {
        let row = sqlx::query(
            "SELECT message_id, fingerprint FROM idempotency_keys \
             WHERE sender_id = ? AND idempotency_key = ?",
        )
        .bind(sender_id)
        .bind(key)
        .fetch_optional(connection)
        .await?;
        row.map(|row| {
            Ok(ExistingClaim {
                message_id: row.try_get("message_id")?,
                fingerprint: fingerprint_from(row.try_get("fingerprint")?)?,
            })
        })
        .transpose()
    }

    async fn insert_claim(
        connection: &mut sqlx::SqliteConnection,
        sender_id: &str,
        key: &str,
        fingerprint: &Fingerprint,
        message_id: &str,
        claimed_at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO idempotency_keys (sender_id, idempotency_key, fingerprint, message_id, claimed_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(sender_id)
        .bind(key)
        .bind(&fingerprint.0[..])
        .bind(message_id)
        .bind(claimed_at)
        .execute(connection)
        .await?;
        Ok(())
    }

    /// Step 1: what the shard holds of what `batch` may repeat, and which
    /// of its recipients' inboxes are frozen. In one write transaction
    /// nothing races, so everything is looked up at once, and the fence (a
    /// trigger) never fails a statement of the batch.
    async fn look_up(
        connection: &mut sqlx::SqliteConnection,
        batch: &[ToStore],
    ) -> Result<Known, StoreError> {
        let wanted = plan::lookups(batch, true);
        let mut known = Known::default();
        let recipients = serde_json::to_string(&wanted.recipients).map_err(StoreError::corrupt)?;
        let frozen: Vec<String> = sqlx::query_scalar(
            "SELECT recipient_id FROM inboxes \
             WHERE frozen AND recipient_id IN (SELECT value FROM json_each(?))",
        )
        .bind(recipients)
        .fetch_all(&mut *connection)
        .await?;
        known.frozen.extend(frozen);
        for (sender_id, key) in wanted.keys {
            if let Some(claim) = Self::claim_of(connection, sender_id, key).await? {
                known
                    .claims
                    .insert((sender_id.to_string(), key.to_string()), claim);
            }
        }
        let claimed: Vec<String> = known
            .claimed_ids()
            .into_iter()
            .map(str::to_string)
            .collect();
        for message_id in wanted
            .ids
            .into_iter()
            .chain(claimed.iter().map(String::as_str))
        {
            let row = sqlx::query("SELECT sequence, stored_at FROM messages WHERE message_id = ?")
                .bind(message_id)
                .fetch_optional(&mut *connection)
                .await?;
            if let Some(row) = row {
                let sequence = to_sequence(row.try_get("sequence")?)?;
                known.stored.insert(
                    message_id.to_string(),
                    (sequence, row.try_get("stored_at")?),
                );
            }
        }
        Ok(known)
    }

    /// Step 3: stores the new messages with their claims, numbered in batch
    /// order; returns their sequences.
    async fn insert_new(
        connection: &mut sqlx::SqliteConnection,
        new: &[NewMessage<'_>],
        stored_at_micros: i64,
    ) -> Result<Vec<u64>, StoreError> {
        let mut sequences = Vec::with_capacity(new.len());
        for entry in new {
            let message = entry.message;
            let sequence: i64 = sqlx::query_scalar(
                "INSERT INTO inboxes (recipient_id, last_sequence) VALUES (?, 1) \
                 ON CONFLICT (recipient_id) DO UPDATE SET last_sequence = last_sequence + 1 \
                 RETURNING last_sequence",
            )
            .bind(&message.recipient_id)
            .fetch_one(&mut *connection)
            .await?;
            let headers = serde_json::to_string(&message.headers).map_err(StoreError::corrupt)?;
            sqlx::query(
                "INSERT INTO messages (message_id, recipient_id, sequence, sender_id, kind, payload, \
                 headers, idempotency_key, origin_region, accepted_at, stored_at, traceparent) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(entry.message_id)
            .bind(&message.recipient_id)
            .bind(sequence)
            .bind(&message.sender_id)
            .bind(&message.kind)
            .bind(message.payload.as_ref())
            .bind(headers)
            .bind(&message.idempotency_key)
            .bind(&message.origin_region)
            .bind(message.accepted_at_micros)
            .bind(stored_at_micros)
            .bind(stored_traceparent(message))
            .execute(&mut *connection)
            .await?;
            if let (Some(fingerprint), Some(key)) = (&entry.claim, &message.idempotency_key) {
                Self::insert_claim(
                    connection,
                    &message.sender_id,
                    key,
                    fingerprint,
                    entry.message_id,
                    stored_at_micros,
                )
                .await?;
            }
            sequences.push(to_sequence(sequence)?);
        }
        Ok(sequences)
    }

    /// Takes the next stream epoch of `recipient_id`.
    async fn next_epoch(
        connection: &mut sqlx::SqliteConnection,
        recipient_id: &str,
    ) -> Result<u64, StoreError> {
        let epoch: i64 = sqlx::query_scalar(
            "INSERT INTO inbox_streams (recipient_id, epoch) VALUES (?, 1) \
             ON CONFLICT (recipient_id) DO UPDATE SET epoch = epoch + 1 RETURNING epoch",
        )
        .bind(recipient_id)
        .fetch_one(connection)
        .await?;
        to_sequence(epoch)
    }

    /// Freezes or thaws the inbox of `recipient_id`, creating its row if
    /// it has none. Its sequences are not touched, so the fence lets this
    /// through.
    async fn set_frozen(
        connection: &mut sqlx::SqliteConnection,
        recipient_id: &str,
        frozen: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO inboxes (recipient_id, last_sequence, frozen) VALUES (?, 0, ?) \
             ON CONFLICT (recipient_id) DO UPDATE SET frozen = excluded.frozen",
        )
        .bind(recipient_id)
        .bind(frozen)
        .execute(connection)
        .await?;
        Ok(())
    }

    /// Deletes, a chunk per transaction, the rows `delete_chunk` names
    /// (a DELETE whose parameters are the agency and the chunk size);
    /// returns how many.
    async fn delete_in_chunks(
        &self,
        delete_chunk: &str,
        agency_id: &str,
    ) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let mut transaction = begin_write(&self.pool).await?;
            let chunk = sqlx::query(delete_chunk)
                .bind(agency_id)
                .bind(i64::from(FORGET_CHUNK))
                .execute(&mut *transaction)
                .await?
                .rows_affected();
            transaction.commit().await?;
            deleted += chunk;
            if chunk < u64::from(FORGET_CHUNK) {
                return Ok(deleted);
            }
        }
    }
}

#[async_trait::async_trait]
impl MessageStore for SqliteMessageStore {
    async fn insert_batch(&self, batch: &[ToStore]) -> Result<Vec<Outcome>, StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        let stored_at_micros = self.clock.next();
        let known = Self::look_up(&mut transaction, batch).await?;
        let plan = plan::plan(batch, &known);
        let sequences = Self::insert_new(&mut transaction, &plan.new, stored_at_micros).await?;
        if self.events && !plan.new.is_empty() {
            let entries: Vec<MessageEntry> = plan
                .new
                .iter()
                .zip(&sequences)
                .map(|(entry, &sequence)| MessageEntry {
                    message_id: entry.message_id.to_string(),
                    recipient_id: entry.message.recipient_id.clone(),
                    sender_id: entry.message.sender_id.clone(),
                    message_kind: entry.message.kind.clone(),
                    sequence,
                    traceparent: entry.message.traceparent.clone(),
                })
                .collect();
            insert_message_events(
                &mut transaction,
                MESSAGE_ACCEPTED,
                &self.region,
                stored_at_micros,
                &entries,
            )
            .await?;
        }
        transaction.commit().await?;
        Ok(plan.outcomes(&sequences, stored_at_micros))
    }

    async fn claim_keys(&self, claims: &[KeyClaim]) -> Result<Vec<Claimed>, StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        let claimed_at = self.clock.next();
        let mut outcomes = Vec::with_capacity(claims.len());
        for claim in claims {
            let existing =
                Self::claim_of(&mut transaction, &claim.sender_id, &claim.idempotency_key).await?;
            outcomes.push(match existing {
                Some(existing) => Claimed::Existing(existing),
                None => {
                    Self::insert_claim(
                        &mut transaction,
                        &claim.sender_id,
                        &claim.idempotency_key,
                        &claim.fingerprint,
                        &claim.message_id,
                        claimed_at,
                    )
                    .await?;
                    Claimed::New
                }
            });
        }
        transaction.commit().await?;
        Ok(outcomes)
    }

    async fn purge_keys(&self, claimed_before: i64, limit: u32) -> Result<u64, StoreError> {
        let deleted = sqlx::query(
            "DELETE FROM idempotency_keys WHERE rowid IN \
             (SELECT rowid FROM idempotency_keys WHERE claimed_at < ? LIMIT ?)",
        )
        .bind(claimed_before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(deleted.rows_affected())
    }

    async fn fetch_unacked(
        &self,
        recipient_id: &str,
        page: Page,
    ) -> Result<Vec<InboxMessage>, StoreError> {
        let rows = sqlx::query(
            "SELECT message_id, recipient_id, sequence, sender_id, kind, payload, headers, \
             idempotency_key, origin_region, accepted_at, traceparent FROM ( \
               SELECT *, sum(length(payload)) OVER (ORDER BY sequence) - length(payload) AS bytes_before \
               FROM messages WHERE recipient_id = ?1 AND acked_at IS NULL AND sequence > ?2 \
               ORDER BY sequence LIMIT ?3) \
             WHERE bytes_before < ?4 ORDER BY sequence",
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
        let frozen: Option<bool> =
            sqlx::query_scalar("SELECT frozen FROM inboxes WHERE recipient_id = ?")
                .bind(recipient_id)
                .fetch_optional(&mut *transaction)
                .await?;
        if frozen == Some(true) {
            return Err(StoreError::InboxMoved(recipient_id.to_string()));
        }
        let epoch = Self::next_epoch(&mut transaction, recipient_id).await?;
        transaction.commit().await?;
        Ok(epoch)
    }

    async fn inbox_stats(&self, recipient_id: &str) -> Result<InboxStats, StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM messages WHERE recipient_id = ?1 AND acked_at IS NULL) \
               AS unacknowledged, \
             (SELECT last_sequence FROM inboxes WHERE recipient_id = ?1) AS last_sequence",
        )
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
        let mut entries = Vec::with_capacity(sequences.len());
        for &sequence in sequences {
            let row = sqlx::query(
                "UPDATE messages SET acked_at = ? \
                 WHERE recipient_id = ? AND sequence = ? AND acked_at IS NULL \
                 RETURNING message_id, sender_id, kind, traceparent",
            )
            .bind(acked_at)
            .bind(recipient_id)
            .bind(to_sql_sequence(sequence))
            .fetch_optional(&mut *transaction)
            .await?;
            let Some(row) = row else { continue };
            entries.push(MessageEntry {
                message_id: row.try_get("message_id")?,
                recipient_id: recipient_id.to_string(),
                sender_id: row.try_get("sender_id")?,
                message_kind: row.try_get("kind")?,
                sequence,
                traceparent: row
                    .try_get::<Option<String>, _>("traceparent")?
                    .unwrap_or_default(),
            });
        }
        if self.events && !entries.is_empty() {
            insert_message_events(
                &mut transaction,
                MESSAGE_DELIVERED,
                &self.region,
                acked_at,
                &entries,
            )
            .await?;
        }
        transaction.commit().await?;
        Ok(entries.into_iter().map(|entry| entry.sequence).collect())
    }

    async fn purge_acked(&self, acked_before: i64, limit: u32) -> Result<u64, StoreError> {
        let deleted = sqlx::query(
            // acked_at < cutoff implies stored_at < cutoff, which the index finds.
            "DELETE FROM messages WHERE message_id IN \
             (SELECT message_id FROM messages WHERE stored_at < ?1 AND acked_at < ?1 LIMIT ?2)",
        )
        .bind(acked_before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(deleted.rows_affected())
    }

    async fn freeze_inbox(&self, agency_id: &str) -> Result<u64, StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        Self::set_frozen(&mut transaction, agency_id, true).await?;
        let epoch = Self::next_epoch(&mut transaction, agency_id).await?;
        transaction.commit().await?;
        Ok(epoch)
    }

    async fn thaw_inbox(&self, agency_id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE inboxes SET frozen = FALSE WHERE recipient_id = ?")
            .bind(agency_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn inbox_position(&self, agency_id: &str) -> Result<InboxPosition, StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT last_sequence FROM inboxes WHERE recipient_id = ?1) AS last_sequence, \
             (SELECT epoch FROM inbox_streams WHERE recipient_id = ?1) AS epoch",
        )
        .bind(agency_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(InboxPosition {
            last_sequence: to_sequence(
                row.try_get::<Option<i64>, _>("last_sequence")?.unwrap_or(0),
            )?,
            epoch: to_sequence(row.try_get::<Option<i64>, _>("epoch")?.unwrap_or(0))?,
        })
    }

    async fn export_messages(
        &self,
        agency_id: &str,
        after_sequence: u64,
        max_rows: u32,
        max_bytes: usize,
    ) -> Result<Vec<MovedMessage>, StoreError> {
        let rows = sqlx::query(
            "SELECT message_id, recipient_id, sequence, sender_id, kind, payload, headers, \
             idempotency_key, origin_region, accepted_at, stored_at, acked_at, traceparent FROM ( \
               SELECT *, sum(length(payload)) OVER (ORDER BY sequence) AS bytes_through, \
                 row_number() OVER (ORDER BY sequence) AS row_number \
               FROM (SELECT * FROM messages WHERE recipient_id = ?1 AND sequence > ?2 \
                     ORDER BY sequence LIMIT ?3)) \
             WHERE bytes_through <= ?4 OR row_number = 1 ORDER BY sequence",
        )
        .bind(agency_id)
        .bind(to_sql_sequence(after_sequence))
        .bind(i64::from(max_rows))
        .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(moved_message_from_row).collect()
    }

    async fn export_keys(
        &self,
        agency_id: &str,
        after_key: Option<&str>,
        max_rows: u32,
    ) -> Result<Vec<MovedKey>, StoreError> {
        // Two statements rather than one with `?2 IS NULL OR ...`, which
        // would read every page from the sender's first key.
        let query = match after_key {
            Some(after_key) => sqlx::query(
                "SELECT sender_id, idempotency_key, fingerprint, message_id, claimed_at \
                 FROM idempotency_keys WHERE sender_id = ? AND idempotency_key > ? \
                 ORDER BY idempotency_key LIMIT ?",
            )
            .bind(agency_id)
            .bind(after_key),
            None => sqlx::query(
                "SELECT sender_id, idempotency_key, fingerprint, message_id, claimed_at \
                 FROM idempotency_keys WHERE sender_id = ? ORDER BY idempotency_key LIMIT ?",
            )
            .bind(agency_id),
        };
        let rows = query
            .bind(i64::from(max_rows))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(moved_key_from_row).collect()
    }

    async fn import_messages(&self, messages: &[MovedMessage]) -> Result<u64, StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        let mut new = 0;
        for moved in messages {
            let message = &moved.message;
            let headers = serde_json::to_string(&message.headers).map_err(StoreError::corrupt)?;
            let inserted = sqlx::query(
                "INSERT INTO messages (message_id, recipient_id, sequence, sender_id, kind, \
                 payload, headers, idempotency_key, origin_region, accepted_at, stored_at, acked_at, \
                 traceparent) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (message_id) DO NOTHING",
            )
            .bind(&message.message_id)
            .bind(&message.recipient_id)
            .bind(to_sql_sequence(moved.sequence))
            .bind(&message.sender_id)
            .bind(&message.kind)
            .bind(message.payload.as_ref())
            .bind(headers)
            .bind(&message.idempotency_key)
            .bind(&message.origin_region)
            .bind(message.accepted_at_micros)
            .bind(moved.stored_at_micros)
            .bind(moved.acked_at_micros)
            .bind(stored_traceparent(message))
            .execute(&mut *transaction)
            .await?
            .rows_affected();
            new += inserted;
            if inserted == 0
                && let Some(acked_at) = moved.acked_at_micros
            {
                sqlx::query(
                    "UPDATE messages SET acked_at = ? WHERE message_id = ? AND acked_at IS NULL",
                )
                .bind(acked_at)
                .bind(&message.message_id)
                .execute(&mut *transaction)
                .await?;
            }
        }
        transaction.commit().await?;
        Ok(new)
    }

    async fn import_keys(&self, keys: &[MovedKey]) -> Result<u64, StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        let mut new = 0;
        for key in keys {
            new += sqlx::query(
                "INSERT INTO idempotency_keys (sender_id, idempotency_key, fingerprint, message_id, claimed_at) \
                 VALUES (?, ?, ?, ?, ?) ON CONFLICT (sender_id, idempotency_key) DO NOTHING",
            )
            .bind(&key.sender_id)
            .bind(&key.idempotency_key)
            .bind(key.fingerprint.as_ref().map(|fingerprint| &fingerprint.0[..]))
            .bind(&key.message_id)
            .bind(key.claimed_at_micros)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
        }
        transaction.commit().await?;
        Ok(new)
    }

    async fn open_imported_inbox(
        &self,
        agency_id: &str,
        position: InboxPosition,
    ) -> Result<(), StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        // Thawed first: the fence refuses a new last sequence for a row
        // that is frozen when the statement starts.
        Self::set_frozen(&mut transaction, agency_id, false).await?;
        sqlx::query(
            "UPDATE inboxes SET last_sequence = ?2 WHERE recipient_id = ?1 AND last_sequence < ?2",
        )
        .bind(agency_id)
        .bind(to_sql_sequence(position.last_sequence))
        .execute(&mut *transaction)
        .await?;
        sqlx::query(
            "INSERT INTO inbox_streams (recipient_id, epoch) VALUES (?, ?) \
             ON CONFLICT (recipient_id) DO UPDATE SET epoch = max(epoch, excluded.epoch)",
        )
        .bind(agency_id)
        .bind(to_sql_sequence(position.epoch))
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn forget_agency(&self, agency_id: &str, keep_frozen: bool) -> Result<u64, StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        Self::set_frozen(&mut transaction, agency_id, true).await?;
        transaction.commit().await?;
        let messages = self
            .delete_in_chunks(
                "DELETE FROM messages WHERE rowid IN \
                 (SELECT rowid FROM messages WHERE recipient_id = ?1 LIMIT ?2)",
                agency_id,
            )
            .await?;
        let keys = self
            .delete_in_chunks(
                "DELETE FROM idempotency_keys WHERE rowid IN \
                 (SELECT rowid FROM idempotency_keys WHERE sender_id = ?1 LIMIT ?2)",
                agency_id,
            )
            .await?;
        let mut transaction = begin_write(&self.pool).await?;
        sqlx::query("DELETE FROM inbox_streams WHERE recipient_id = ?")
            .bind(agency_id)
            .execute(&mut *transaction)
            .await?;
        if !keep_frozen {
            sqlx::query("DELETE FROM inboxes WHERE recipient_id = ?")
                .bind(agency_id)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(messages + keys)
    }

    async fn backlog(&self) -> Result<(u64, Option<i64>), StoreError> {
        let (count, oldest): (i64, Option<i64>) =
            sqlx::query_as("SELECT count(*), min(stored_at) FROM messages WHERE acked_at IS NULL")
                .fetch_one(&self.pool)
                .await?;
        Ok((u64::try_from(count).unwrap_or(0), oldest))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn pool_usage(&self) -> PoolUsage {
        PoolUsage::of(&self.pool)
    }

    fn spool(&self) -> Arc<dyn SpoolStore> {
        Arc::new(SqliteSpool::new(
            self.pool.clone(),
            &self.url,
            &self.region,
            self.events,
        ))
    }

    fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(SqliteOutbox::new(self.pool.clone()))
    }
}
