//! A shard on PostgreSQL: the deployment store.
//!
//! A batch of messages is at most two statements, whatever its size: look up
//! duplicates (only when a message could be one), then reserve sequences,
//! insert the messages and insert their events in one statement; after it,
//! announce the new messages to the other replicas (see [`wakeups`]). Array
//! parameters (`UNNEST`) carry the batch. Reads, acks, the duplicate lookup
//! and the retention purge are planned at each execution, for the table as it
//! is then (see [`fedmesh_common::postgres`]).

mod wakeups;

use std::collections::HashMap;
use std::sync::Arc;

use fedmesh_common::events::{Event, MESSAGE_ACCEPTED, MESSAGE_DELIVERED, Outbox};
use fedmesh_common::postgres::{PgOutbox, insert_events, pool_options};
use fedmesh_common::time::now_micros;
use sqlx::Row;
use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::wakeups::Replicas;
use super::{MessageStore, PoolUsage, inbox_message_from_row, to_sequence};
use crate::error::StoreError;
use crate::inbox::InboxHub;
use crate::inbox::stream::Page;
use crate::message::{InboxMessage, InboxStats, Message, Stored};

pub use wakeups::{INBOX_CHANNEL, REPLICA_CHANNEL, STREAM_CHANNEL};

/// How often a batch that lost a race (unique violation, deadlock) is tried.
const MAX_ATTEMPTS: usize = 3;

/// A shard on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgMessageStore {
    pool: PgPool,
    /// Connections of the commit lanes, opened lazily by the lanes
    /// themselves so that their commit thread drives them.
    write_pool: PgPool,
    region: String,
    replicas: Arc<Replicas>,
    /// Attempts per batch: enough to get past every pooled connection
    /// having been lost at once.
    max_attempts: usize,
}

impl PgMessageStore {
    /// Connects with at most `max_connections` (and as many for batches) and
    /// applies migrations (under PostgreSQL's advisory lock, so replicas may
    /// start together).
    pub async fn open(url: &str, region: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::open_with_writers(url, region, max_connections, max_connections).await
    }

    /// Like [`PgMessageStore::open`], with `writers` connections for batches
    /// besides the `max_connections` for the rest.
    pub async fn open_with_writers(
        url: &str,
        region: &str,
        max_connections: u32,
        writers: u32,
    ) -> Result<Self, StoreError> {
        let pool = pool_options(max_connections).connect(url).await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let write_pool = pool_options(writers.max(1)).connect_lazy(url)?;
        Ok(PgMessageStore {
            write_pool,
            pool,
            region: region.to_string(),
            replicas: Arc::new(Replicas::new()),
            max_attempts: MAX_ATTEMPTS.max(
                usize::try_from(max_connections.max(writers))
                    .unwrap_or(usize::MAX)
                    .saturating_add(2),
            ),
        })
    }

    /// The other gateway replicas this one has heard of on the shard (their
    /// ids); announcements of new messages are sent only while there are any.
    pub fn other_replicas(&self) -> Vec<String> {
        self.replicas.known()
    }

    /// The number of other replicas heard of, as it changes.
    pub fn watch_other_replicas(&self) -> tokio::sync::watch::Receiver<usize> {
        self.replicas.watch()
    }

    /// How many announcements of new messages this replica has sent.
    pub fn announcements_sent(&self) -> u64 {
        self.replicas.announcements()
    }

    /// Runs `operation` until it succeeds, fails with an error `retriable`
    /// does not accept, or has been tried `max_attempts` times. Each attempt
    /// is told the error of the one before it, if any.
    async fn with_retries<T, Operation, Attempt>(
        &self,
        retriable: fn(&StoreError) -> bool,
        mut operation: Operation,
    ) -> Result<T, StoreError>
    where
        Operation: FnMut(Option<&StoreError>) -> Attempt,
        Attempt: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut attempt = 1;
        let mut previous = None;
        loop {
            match operation(previous.as_ref()).await {
                Err(error) if attempt < self.max_attempts && retriable(&error) => {
                    tracing::debug!(%error, attempt, "retrying");
                    previous = Some(error);
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    async fn fetch_unacked_once(
        &self,
        recipient_id: &str,
        page: Page,
    ) -> Result<Vec<InboxMessage>, StoreError> {
        let rows = sqlx::query(
            "SELECT message_id, recipient_id, sequence, sender_id, kind, payload, headers, \
             idempotency_key, origin_region, accepted_at FROM ( \
               SELECT *, sum(octet_length(payload)) OVER (ORDER BY sequence) \
                 - octet_length(payload) AS bytes_before \
               FROM messages WHERE recipient_id = $1 AND acked_at IS NULL AND sequence > $2 \
               ORDER BY sequence LIMIT $3) AS page \
             WHERE bytes_before < $4 ORDER BY sequence",
        )
        .persistent(false)
        .bind(recipient_id.to_string())
        .bind(to_sql(page.after_sequence))
        .bind(i64::from(page.limit))
        .bind(to_sql(page.max_bytes))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(inbox_message_from_row).collect()
    }

    async fn ack_once(
        &self,
        recipient_id: &str,
        sequences: &[u64],
    ) -> Result<Vec<u64>, StoreError> {
        let mut transaction = self.pool.begin().await?;
        let sequences: Vec<i64> = sequences
            .iter()
            .map(|sequence| i64::try_from(*sequence).unwrap_or(i64::MAX))
            .collect();
        let rows = sqlx::query(
            "UPDATE messages SET acked_at = $1 \
             WHERE recipient_id = $2 AND sequence = ANY($3) AND acked_at IS NULL \
             RETURNING sequence, message_id, sender_id, kind",
        )
        .persistent(false)
        .bind(now_micros())
        .bind(recipient_id.to_string())
        .bind(sequences)
        .fetch_all(&mut *transaction)
        .await?;
        let mut acked = Vec::with_capacity(rows.len());
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let sequence = to_sequence(row.try_get("sequence")?)?;
            let message_id: String = row.try_get("message_id")?;
            let sender_id: String = row.try_get("sender_id")?;
            let kind: String = row.try_get("kind")?;
            events.push(
                Event::new(MESSAGE_DELIVERED, &self.region, recipient_id)
                    .with_message(&message_id)
                    .with_attribute("sender", sender_id)
                    .with_attribute("kind", kind)
                    .with_attribute("sequence", sequence),
            );
            acked.push(sequence);
        }
        if !events.is_empty() {
            insert_events(&mut transaction, &events).await?;
        }
        transaction.commit().await?;
        acked.sort_unstable();
        Ok(acked)
    }

    /// One attempt at a batch; `look_up_every_id` also looks up the ids of
    /// messages sent in this region (after a unique violation said one was
    /// stored after all).
    async fn try_insert_batch(
        &self,
        messages: &[Message],
        look_up_every_id: bool,
    ) -> Result<Vec<Stored>, StoreError> {
        let stored_at_micros = now_micros();

        // 1. What is stored already, by id or by (sender, idempotency key).
        //    A message sent in this region without a key has an id its
        //    gateway just made, so it cannot be stored yet: only relayed
        //    messages and keyed ones are looked up.
        let (key_senders, keys): (Vec<String>, Vec<String>) = messages
            .iter()
            .filter_map(|message| {
                let key = message.idempotency_key.clone()?;
                Some((message.sender_id.clone(), key))
            })
            .unzip();
        let ids: Vec<String> = messages
            .iter()
            .filter(|message| look_up_every_id || message.origin_region != self.region)
            .map(|message| message.message_id.clone())
            .collect();
        let existing = if ids.is_empty() && keys.is_empty() {
            Vec::new()
        } else {
            sqlx::query(
                // Two index lookups; an OR of both would scan the table.
                "SELECT message_id, sender_id, idempotency_key, sequence, stored_at FROM messages \
                 WHERE message_id = ANY($1) \
                 UNION \
                 SELECT message_id, sender_id, idempotency_key, sequence, stored_at \
                 FROM messages JOIN UNNEST($2::text[], $3::text[]) AS wanted (sender, key) \
                   ON sender_id = wanted.sender AND idempotency_key = wanted.key \
                 WHERE idempotency_key IS NOT NULL",
            )
            .persistent(false)
            .bind(ids)
            .bind(key_senders)
            .bind(keys)
            .fetch_all(&self.write_pool)
            .await?
        };
        let mut by_id: HashMap<String, Stored> = HashMap::new();
        let mut by_key: HashMap<(String, String), Stored> = HashMap::new();
        for row in &existing {
            let stored = Stored {
                message_id: row.try_get("message_id")?,
                sequence: to_sequence(row.try_get("sequence")?)?,
                stored_at_micros: row.try_get("stored_at")?,
                duplicate: true,
            };
            let key: Option<String> = row.try_get("idempotency_key")?;
            if let Some(key) = key {
                by_key.insert((row.try_get("sender_id")?, key), stored.clone());
            }
            by_id.insert(stored.message_id.clone(), stored);
        }

        // 2. Which messages are new; a repeat inside the batch points at the
        //    first occurrence.
        enum Slot {
            Stored(Stored),
            New(usize),
            SameAs(usize),
        }
        let mut slots = Vec::with_capacity(messages.len());
        let mut new_messages: Vec<&Message> = Vec::new();
        let mut first_by_id: HashMap<&str, usize> = HashMap::new();
        let mut first_by_key: HashMap<(&str, &str), usize> = HashMap::new();
        for message in messages {
            let key = message
                .idempotency_key
                .as_deref()
                .map(|key| (message.sender_id.as_str(), key));
            let earlier_key =
                key.and_then(|key| by_key.get(&(key.0.to_string(), key.1.to_string())));
            if let Some(stored) = by_id.get(&message.message_id).or(earlier_key) {
                slots.push(Slot::Stored(stored.clone()));
                continue;
            }
            let in_batch = first_by_id
                .get(message.message_id.as_str())
                .or_else(|| key.and_then(|key| first_by_key.get(&key)));
            if let Some(&index) = in_batch {
                slots.push(Slot::SameAs(index));
                continue;
            }
            let index = new_messages.len();
            first_by_id.insert(&message.message_id, index);
            if let Some(key) = key {
                first_by_key.insert(key, index);
            }
            new_messages.push(message);
            slots.push(Slot::New(index));
        }

        // 3. The new messages and their events in one statement, so one
        //    round trip and one implicit transaction: reserve sequences per
        //    inbox (rows locked in recipient order, so concurrent batches
        //    cannot deadlock on them), insert the messages numbered in batch
        //    order and their `message.accepted` events. The gateway numbers
        //    each message within its inbox's share of the batch (`position`
        //    of `count`), so the statement only adds the inbox's base and
        //    returns one row per inbox. A race with another writer (unique
        //    violation) fails the statement whole and the batch is tried
        //    again.
        let mut sequence_of: Vec<i64> = Vec::with_capacity(new_messages.len());
        let mut wake_up: Vec<String> = Vec::new();
        if !new_messages.is_empty() {
            let mut count_of: HashMap<&str, i64> = HashMap::new();
            let positions: Vec<i64> = new_messages
                .iter()
                .map(|message| {
                    let count = count_of.entry(message.recipient_id.as_str()).or_default();
                    *count += 1;
                    *count
                })
                .collect();
            let counts: Vec<i64> = new_messages
                .iter()
                .map(|message| count_of[message.recipient_id.as_str()])
                .collect();
            let mut headers = Vec::with_capacity(new_messages.len());
            for message in &new_messages {
                headers.push(
                    serde_json::to_string(&message.headers)
                        .map_err(|error| StoreError::Corrupt(error.to_string()))?,
                );
            }
            let event_ids: Vec<String> = new_messages
                .iter()
                .map(|_| uuid::Uuid::now_v7().to_string())
                .collect();
            let rows = sqlx::query(
                "WITH input AS ( \
                   SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], \
                     $6::text[], $7::text[], $8::text[], $9::bigint[], $10::text[], $11::bigint[], \
                     $12::bigint[]) \
                     AS t (message_id, recipient_id, sender_id, kind, payload, headers, idempotency_key, \
                           origin_region, accepted_at, event_id, position, batch_count) \
                 ), reserved AS ( \
                   INSERT INTO inboxes (recipient_id, last_sequence) \
                   SELECT DISTINCT recipient_id, batch_count FROM input ORDER BY recipient_id \
                   ON CONFLICT (recipient_id) DO UPDATE \
                   SET last_sequence = inboxes.last_sequence + EXCLUDED.last_sequence \
                   RETURNING recipient_id, last_sequence \
                 ), numbered AS ( \
                   SELECT input.*, reserved.last_sequence - input.batch_count + input.position AS sequence \
                   FROM input JOIN reserved USING (recipient_id) \
                 ), stored AS ( \
                   INSERT INTO messages (message_id, recipient_id, sequence, sender_id, kind, payload, \
                     headers, idempotency_key, origin_region, accepted_at, stored_at) \
                   SELECT message_id, recipient_id, sequence, sender_id, kind, payload, headers, \
                     idempotency_key, origin_region, accepted_at, $13 FROM numbered \
                 ), events AS ( \
                   INSERT INTO outbox (event_id, kind, region, agency_id, message_id, occurred_at, attributes) \
                   SELECT event_id, $14, $15, recipient_id, message_id, $13, \
                     json_build_object('sender', sender_id, 'kind', kind, 'sequence', sequence::text)::text \
                   FROM numbered \
                 ) \
                 SELECT recipient_id, last_sequence FROM reserved",
            )
            .bind(column(&new_messages, |message| message.message_id.clone()))
            .bind(column(&new_messages, |message| message.recipient_id.clone()))
            .bind(column(&new_messages, |message| message.sender_id.clone()))
            .bind(column(&new_messages, |message| message.kind.clone()))
            .bind(column(&new_messages, |message| message.payload.clone()))
            .bind(headers)
            .bind(column(&new_messages, |message| message.idempotency_key.clone()))
            .bind(column(&new_messages, |message| message.origin_region.clone()))
            .bind(column(&new_messages, |message| message.accepted_at_micros))
            .bind(event_ids)
            .bind(&positions)
            .bind(&counts)
            .bind(stored_at_micros)
            .bind(MESSAGE_ACCEPTED)
            .bind(&self.region)
            .fetch_all(&self.write_pool)
            .await?;
            let mut last_of: HashMap<String, i64> = HashMap::with_capacity(rows.len());
            for row in &rows {
                last_of.insert(row.try_get("recipient_id")?, row.try_get("last_sequence")?);
            }
            for ((message, position), count) in new_messages.iter().zip(&positions).zip(&counts) {
                let last = last_of.get(&message.recipient_id).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "no sequence reserved for inbox {}",
                        message.recipient_id
                    ))
                })?;
                sequence_of.push(last - count + position);
            }
            wake_up = last_of
                .iter()
                .map(|(recipient, last)| format!("{recipient} {last}"))
                .collect();
        }
        // 4. Wake the other replicas, if there are any. NOTIFY inside the
        //    transaction would hold PostgreSQL's global notify lock across
        //    the commit's fsync and serialise every commit of the cluster;
        //    sent afterwards (and not awaited) it costs one short statement.
        wakeups::announce(&self.pool, &self.replicas, wake_up);

        let fresh = |index: usize| {
            let sequence = sequence_of.get(index).copied().unwrap_or_default();
            Stored {
                message_id: new_messages[index].message_id.clone(),
                sequence: u64::try_from(sequence).unwrap_or_default(),
                stored_at_micros,
                duplicate: false,
            }
        };
        Ok(slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Stored(stored) => stored,
                Slot::New(index) => fresh(index),
                Slot::SameAs(index) => Stored {
                    duplicate: true,
                    ..fresh(index)
                },
            })
            .collect())
    }
}

/// A sequence or size as PostgreSQL's BIGINT.
fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn column<T>(messages: &[&Message], field: impl Fn(&Message) -> T) -> Vec<T> {
    messages.iter().map(|message| field(message)).collect()
}

/// Whether a failed batch may be tried again: it lost a race with another
/// writer, or its connection was lost. The next attempt looks up every id,
/// so what the failed one committed is not stored twice.
fn worth_retrying(error: &StoreError) -> bool {
    let StoreError::Database(sqlx::Error::Database(database)) = error else {
        return error.is_connection_loss();
    };
    // unique_violation, deadlock_detected, serialization_failure
    matches!(
        database.code().as_deref(),
        Some("23505" | "40P01" | "40001")
    ) || error.is_connection_loss()
}

#[async_trait::async_trait]
impl MessageStore for PgMessageStore {
    async fn insert_batch(&self, messages: &[Message]) -> Result<Vec<Stored>, StoreError> {
        let mut connection_lost = false;
        let mut stored = self
            .with_retries(worth_retrying, |previous| {
                connection_lost |= previous.is_some_and(StoreError::is_connection_loss);
                self.try_insert_batch(messages, previous.is_some())
            })
            .await?;
        if connection_lost {
            // The attempt that lost its connection may have committed. Ids of
            // messages sent in this region are fresh, so one found stored was
            // stored by that attempt, not by an earlier send.
            for (message, stored) in messages.iter().zip(&mut stored) {
                if message.origin_region == self.region && stored.message_id == message.message_id {
                    stored.duplicate = false;
                }
            }
        }
        Ok(stored)
    }

    async fn fetch_unacked(
        &self,
        recipient_id: &str,
        page: Page,
    ) -> Result<Vec<InboxMessage>, StoreError> {
        self.with_retries(StoreError::is_connection_loss, |_| {
            self.fetch_unacked_once(recipient_id, page)
        })
        .await
    }

    async fn claim_inbox(&self, recipient_id: &str) -> Result<u64, StoreError> {
        self.with_retries(StoreError::is_connection_loss, |_| async {
            // The announcement is sent at commit, with the epoch stored.
            let mut transaction = self.pool.begin().await?;
            let epoch: i64 = sqlx::query_scalar(
                "INSERT INTO inbox_streams (recipient_id, epoch) VALUES ($1, 1) \
                 ON CONFLICT (recipient_id) DO UPDATE SET epoch = inbox_streams.epoch + 1 \
                 RETURNING epoch",
            )
            .bind(recipient_id)
            .fetch_one(&mut *transaction)
            .await?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(STREAM_CHANNEL)
                .bind(format!("{recipient_id} {epoch}"))
                .execute(&mut *transaction)
                .await?;
            transaction.commit().await?;
            to_sequence(epoch)
        })
        .await
    }

    async fn inbox_stats(&self, recipient_id: &str) -> Result<InboxStats, StoreError> {
        self.with_retries(StoreError::is_connection_loss, |_| async {
            let row = sqlx::query(
                "SELECT (SELECT count(*) FROM messages WHERE recipient_id = $1 AND acked_at IS NULL) \
                   AS unacknowledged, \
                 (SELECT last_sequence FROM inboxes WHERE recipient_id = $1) AS last_sequence",
            )
            .persistent(false)
            .bind(recipient_id)
            .fetch_one(&self.pool)
            .await?;
            Ok(InboxStats {
                unacknowledged: to_sequence(row.try_get("unacknowledged")?)?,
                last_sequence: to_sequence(
                    row.try_get::<Option<i64>, _>("last_sequence")?.unwrap_or(0),
                )?,
            })
        })
        .await
    }

    async fn inbox_epoch(&self, recipient_id: &str) -> Result<u64, StoreError> {
        self.with_retries(StoreError::is_connection_loss, |_| async {
            let epoch: Option<i64> =
                sqlx::query_scalar("SELECT epoch FROM inbox_streams WHERE recipient_id = $1")
                    .bind(recipient_id)
                    .fetch_optional(&self.pool)
                    .await?;
            to_sequence(epoch.unwrap_or(0))
        })
        .await
    }

    async fn ack(&self, recipient_id: &str, sequences: &[u64]) -> Result<Vec<u64>, StoreError> {
        // Acking again what a lost attempt acked finds nothing left to ack.
        self.with_retries(StoreError::is_connection_loss, |_| {
            self.ack_once(recipient_id, sequences)
        })
        .await
    }

    async fn purge_acked(&self, acked_before: i64, limit: u32) -> Result<u64, StoreError> {
        let deleted = sqlx::query(
            "DELETE FROM messages WHERE message_id IN \
             (SELECT message_id FROM messages WHERE acked_at IS NOT NULL AND acked_at < $1 \
              LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .persistent(false)
        .bind(acked_before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(deleted.rows_affected())
    }

    fn pool_usage(&self) -> PoolUsage {
        PoolUsage::of(&self.pool) + PoolUsage::of(&self.write_pool)
    }

    fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(PgOutbox::new(self.pool.clone()))
    }

    fn max_concurrent_batches(&self) -> usize {
        usize::MAX
    }

    fn spawn_wakeups(&self, hub: Arc<InboxHub>, tasks: &TaskTracker, shutdown: CancellationToken) {
        tasks.spawn(wakeups::run(
            self.pool.clone(),
            Arc::clone(&self.replicas),
            hub,
            shutdown,
        ));
    }
}
