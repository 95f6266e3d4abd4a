//! A shard on PostgreSQL: the deployment store.
//!
//! A batch of messages is one statement, whatever its size, when none of its
//! messages can be a repeat: it claims the keys, reserves sequences, inserts
//! the messages and one outbox row listing them. Relayed messages and
//! retries reusing an id are looked up first (one more statement); a key
//! claimed before makes the statement fail (unique violation), and the batch
//! is tried again with everything looked up (see `plan`); so does a message
//! for a frozen inbox (the fence's error), and the attempt after it refuses
//! the messages of the inboxes it finds frozen. After it, the new
//! messages are announced to the other replicas (see [`wakeups`]). Array
//! parameters (`UNNEST`) carry the batch. Reads, acks, the lookups and the
//! retention purges are planned at each execution, for the table as it is
//! then (see [`fedmesh_common::postgres`]).

mod wakeups;

use std::sync::Arc;

use fedmesh_common::events::{MESSAGE_ACCEPTED, MESSAGE_DELIVERED, Outbox};
use fedmesh_common::postgres::{PgOutbox, pool_options};
use fedmesh_common::time::now_micros;
use sqlx::Row;
use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::wakeups::Replicas;
use super::plan::{self, Known, NewMessage};
use super::spool::{PgSpool, SpoolStore};
use super::{
    BatchClock, FORGET_CHUNK, MessageStore, PoolUsage, fingerprint_from, inbox_message_from_row,
    moved_key_from_row, moved_message_from_row, stored_traceparent, to_sequence,
};
use crate::error::StoreError;
use crate::inbox::InboxHub;
use crate::inbox::stream::Page;
use crate::message::{
    Claimed, ExistingClaim, InboxMessage, InboxPosition, InboxStats, KeyClaim, MovedKey,
    MovedMessage, Outcome, ToStore,
};

pub use wakeups::{INBOX_CHANNEL, REPLICA_CHANNEL, STREAM_CHANNEL};

/// How often a batch that lost a race (unique violation, deadlock) is tried.
const MAX_ATTEMPTS: usize = 3;

/// The SQLSTATE of the fence: a statement reserved sequences of a frozen
/// inbox (see the `moving_inboxes` migration).
const INBOX_FROZEN: &str = "FM001";

/// A shard on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgMessageStore {
    pool: PgPool,
    /// Where the database is, for sessions outside the pools.
    url: String,
    /// Connections of the commit lanes, opened lazily by the lanes
    /// themselves so that their commit thread drives them.
    write_pool: PgPool,
    region: String,
    replicas: Arc<Replicas>,
    pub(super) clock: Arc<BatchClock>,
    /// Attempts per batch: enough to get past every pooled connection
    /// having been lost at once.
    max_attempts: usize,
    /// Whether events are written to the outbox (off without a bus).
    events: bool,
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
            url: url.to_string(),
            region: region.to_string(),
            replicas: Arc::new(Replicas::new()),
            clock: Arc::new(BatchClock::default()),
            max_attempts: MAX_ATTEMPTS.max(
                usize::try_from(max_connections.max(writers))
                    .unwrap_or(usize::MAX)
                    .saturating_add(2),
            ),
            events: true,
        })
    }

    /// The same store, writing no events (a gateway without an event bus).
    pub fn without_events(mut self) -> Self {
        self.events = false;
        self
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
             idempotency_key, origin_region, accepted_at, traceparent FROM ( \
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
        sequences: &[i64],
    ) -> Result<Vec<u64>, StoreError> {
        // One statement: the acked messages and their events' outbox row.
        // Each sequence is looked up on its own (the LIMIT keeps the lookup
        // from being turned into a join): a plan that scans the inbox's
        // unacknowledged messages for each ack, which PostgreSQL picks for
        // a table it has no statistics of yet, would make draining an inbox
        // quadratic.
        let acked: Vec<i64> = sqlx::query_scalar(
            "WITH acked AS ( \
               UPDATE messages SET acked_at = $1 \
               WHERE ctid = ANY(ARRAY( \
                   SELECT found.ctid FROM UNNEST($3::bigint[]) AS wanted (sequence) \
                   CROSS JOIN LATERAL ( \
                     SELECT ctid FROM messages WHERE recipient_id = $2 \
                       AND sequence = wanted.sequence AND acked_at IS NULL LIMIT 1 \
                   ) AS found)) \
                 AND acked_at IS NULL \
               RETURNING sequence, message_id, sender_id, kind, traceparent \
             ), events AS ( \
               INSERT INTO outbox (kind, region, occurred_at, message_ids, recipient_ids, \
                 sender_ids, message_kinds, sequences, traceparents) \
               SELECT $4, $5, $1, array_agg(message_id ORDER BY sequence), \
                 array_agg($2::text ORDER BY sequence), array_agg(sender_id ORDER BY sequence), \
                 array_agg(kind ORDER BY sequence), array_agg(sequence ORDER BY sequence), \
                 array_agg(traceparent ORDER BY sequence) \
               FROM acked HAVING count(*) > 0 AND $6 \
             ) \
             SELECT sequence FROM acked ORDER BY sequence",
        )
        .persistent(false)
        .bind(now_micros())
        .bind(recipient_id)
        .bind(sequences)
        .bind(MESSAGE_DELIVERED)
        .bind(&self.region)
        .bind(self.events)
        .fetch_all(&self.pool)
        .await?;
        acked.into_iter().map(to_sequence).collect()
    }

    /// Step 1: what the shard holds of what `batch` may repeat (see
    /// [`plan::lookups`]): claims of keys first, then the messages they and
    /// the batch name. Each is an index lookup; an OR of both would scan.
    async fn look_up(&self, batch: &[ToStore], everything: bool) -> Result<Known, StoreError> {
        let wanted = plan::lookups(batch, everything);
        let mut known = Known::default();
        if !wanted.recipients.is_empty() {
            let frozen: Vec<String> = sqlx::query_scalar(
                "SELECT recipient_id FROM inboxes WHERE recipient_id = ANY($1) AND frozen",
            )
            .persistent(false)
            .bind(&wanted.recipients)
            .fetch_all(&self.write_pool)
            .await?;
            known.frozen.extend(frozen);
        }
        if !wanted.keys.is_empty() {
            let (senders, keys): (Vec<&str>, Vec<&str>) = wanted.keys.iter().copied().unzip();
            let rows = sqlx::query(
                "SELECT sender_id, idempotency_key, message_id, fingerprint FROM idempotency_keys \
                 JOIN UNNEST($1::text[], $2::text[]) AS wanted (sender, key) \
                   ON sender_id = wanted.sender AND idempotency_key = wanted.key",
            )
            .persistent(false)
            .bind(senders)
            .bind(keys)
            .fetch_all(&self.write_pool)
            .await?;
            for row in &rows {
                known.claims.insert(
                    (row.try_get("sender_id")?, row.try_get("idempotency_key")?),
                    existing_claim(row)?,
                );
            }
        }
        let mut ids = wanted.ids;
        ids.extend(known.claimed_ids());
        if !ids.is_empty() {
            let rows = sqlx::query(
                "SELECT message_id, sequence, stored_at FROM messages WHERE message_id = ANY($1)",
            )
            .persistent(false)
            .bind(ids)
            .fetch_all(&self.write_pool)
            .await?;
            for row in &rows {
                let sequence = to_sequence(row.try_get("sequence")?)?;
                known.stored.insert(
                    row.try_get("message_id")?,
                    (sequence, row.try_get("stored_at")?),
                );
            }
        }
        Ok(known)
    }

    /// Step 3: stores the new messages in one statement, so one round trip
    /// and one implicit transaction: claims of their keys, sequences
    /// reserved per inbox (rows locked in recipient order, so concurrent
    /// batches cannot deadlock on them), the messages numbered in batch
    /// order, and one outbox row listing them for their `message.accepted`
    /// events. The gateway numbers each message within its inbox's share of
    /// the batch (`position` of `batch_count`), so the statement only adds
    /// the inbox's base (no outbox row when events are off). A key claimed meanwhile or a message stored by a
    /// racing writer fails the statement whole (unique violation) and the
    /// batch is tried again. Returns the sequences, in the order of `new`,
    /// and the last sequence of each inbox, to announce.
    async fn insert_new(
        &self,
        new: &[NewMessage<'_>],
        stored_at_micros: i64,
    ) -> Result<(Vec<u64>, Vec<(String, i64)>), StoreError> {
        if new.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let (positions, counts) = plan::positions(new);
        let mut headers = Vec::with_capacity(new.len());
        for entry in new {
            headers.push(if entry.message.headers.is_empty() {
                String::from("{}")
            } else {
                serde_json::to_string(&entry.message.headers).map_err(StoreError::corrupt)?
            });
        }
        let claims: Vec<(&NewMessage<'_>, &str, &[u8])> = new
            .iter()
            .filter_map(|entry| {
                let key = entry.message.idempotency_key.as_deref()?;
                Some((entry, key, &entry.claim.as_ref()?.0[..]))
            })
            .collect();
        let rows = sqlx::query(
            "WITH input AS ( \
               SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], \
                 $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::bigint[], \
                 $20::text[]) \
                 WITH ORDINALITY \
                 AS t (message_id, recipient_id, sender_id, kind, payload, headers, idempotency_key, \
                       origin_region, accepted_at, position, batch_count, traceparent, ord) \
             ), claimed AS ( \
               INSERT INTO idempotency_keys (sender_id, idempotency_key, fingerprint, message_id, claimed_at) \
               SELECT sender_id, idempotency_key, fingerprint, message_id, $12 \
               FROM UNNEST($13::text[], $14::text[], $15::bytea[], $16::text[]) \
                 AS c (sender_id, idempotency_key, fingerprint, message_id) \
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
                 headers, idempotency_key, origin_region, accepted_at, stored_at, traceparent) \
               SELECT message_id, recipient_id, sequence, sender_id, kind, payload, headers, \
                 idempotency_key, origin_region, accepted_at, $12, traceparent FROM numbered \
             ), events AS ( \
               INSERT INTO outbox (kind, region, occurred_at, message_ids, recipient_ids, \
                 sender_ids, message_kinds, sequences, traceparents) \
               SELECT $17, $18, $12, $1, $2, $3, $4, array_agg(sequence ORDER BY ord), $20 \
               FROM numbered \
               HAVING $19 \
             ) \
             SELECT recipient_id, last_sequence FROM reserved",
        )
        .bind(column(new, |entry| entry.message_id))
        .bind(column(new, |entry| entry.message.recipient_id.as_str()))
        .bind(column(new, |entry| entry.message.sender_id.as_str()))
        .bind(column(new, |entry| entry.message.kind.as_str()))
        .bind(column(new, |entry| entry.message.payload.as_ref()))
        .bind(headers)
        .bind(column(new, |entry| entry.message.idempotency_key.as_deref()))
        .bind(column(new, |entry| entry.message.origin_region.as_str()))
        .bind(column(new, |entry| entry.message.accepted_at_micros))
        .bind(&positions)
        .bind(&counts)
        .bind(stored_at_micros)
        .bind(claims.iter().map(|(entry, _, _)| entry.message.sender_id.as_str()).collect::<Vec<_>>())
        .bind(claims.iter().map(|(_, key, _)| *key).collect::<Vec<_>>())
        .bind(claims.iter().map(|(_, _, fingerprint)| *fingerprint).collect::<Vec<_>>())
        .bind(claims.iter().map(|(entry, _, _)| entry.message_id).collect::<Vec<_>>())
        .bind(MESSAGE_ACCEPTED)
        .bind(&self.region)
        .bind(self.events)
        .bind(column(new, |entry| stored_traceparent(entry.message)))
        .fetch_all(&self.write_pool)
        .await?;
        let mut last_of: Vec<(String, i64)> = Vec::with_capacity(rows.len());
        for row in &rows {
            last_of.push((row.try_get("recipient_id")?, row.try_get("last_sequence")?));
        }
        let mut sequences = Vec::with_capacity(new.len());
        for ((entry, position), count) in new.iter().zip(&positions).zip(&counts) {
            let last = last_of
                .iter()
                .find(|(recipient, _)| *recipient == entry.message.recipient_id)
                .map(|(_, last)| *last)
                .ok_or_else(|| {
                    StoreError::corrupt(format!(
                        "no sequence reserved for inbox {}",
                        entry.message.recipient_id
                    ))
                })?;
            sequences.push(to_sequence(last - count + position)?);
        }
        Ok((sequences, last_of))
    }

    /// One attempt at a batch; `everything` looks up every id and key (after
    /// a failed attempt, which may have committed).
    pub(super) async fn try_insert_batch(
        &self,
        batch: &[ToStore],
        stored_at_micros: i64,
        everything: bool,
    ) -> Result<(Vec<Outcome>, Vec<(String, i64)>), StoreError> {
        let known = self.look_up(batch, everything).await?;
        let plan = plan::plan(batch, &known);
        let (sequences, last_of) = self.insert_new(&plan.new, stored_at_micros).await?;
        Ok((plan.outcomes(&sequences, stored_at_micros), last_of))
    }

    /// Claims keys in one statement; a claim that met another one being
    /// committed meanwhile (not yet visible to the statement) is tried again.
    async fn try_claim_keys(
        &self,
        claims: &[&KeyClaim],
    ) -> Result<Vec<Option<Claimed>>, StoreError> {
        let rows = sqlx::query(
            "WITH wanted AS ( \
               SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::text[]) WITH ORDINALITY \
                 AS w (sender_id, idempotency_key, fingerprint, message_id, ord) \
             ), inserted AS ( \
               INSERT INTO idempotency_keys (sender_id, idempotency_key, fingerprint, message_id, claimed_at) \
               SELECT sender_id, idempotency_key, fingerprint, message_id, $5 FROM wanted \
               ON CONFLICT (sender_id, idempotency_key) DO NOTHING \
               RETURNING sender_id, idempotency_key \
             ) \
             SELECT inserted.sender_id IS NOT NULL AS new, existing.message_id, existing.fingerprint \
             FROM wanted \
             LEFT JOIN inserted USING (sender_id, idempotency_key) \
             LEFT JOIN idempotency_keys AS existing USING (sender_id, idempotency_key) \
             ORDER BY wanted.ord",
        )
        .persistent(false)
        .bind(claims.iter().map(|claim| claim.sender_id.as_str()).collect::<Vec<_>>())
        .bind(claims.iter().map(|claim| claim.idempotency_key.as_str()).collect::<Vec<_>>())
        .bind(claims.iter().map(|claim| &claim.fingerprint.0[..]).collect::<Vec<_>>())
        .bind(claims.iter().map(|claim| claim.message_id.as_str()).collect::<Vec<_>>())
        .bind(now_micros())
        .fetch_all(&self.write_pool)
        .await?;
        rows.iter()
            .map(|row| {
                if row.try_get("new")? {
                    return Ok(Some(Claimed::New));
                }
                let message_id: Option<String> = row.try_get("message_id")?;
                Ok(match message_id {
                    Some(_) => Some(Claimed::Existing(existing_claim(row)?)),
                    // Claimed by a transaction that committed after this
                    // statement's snapshot: not visible here.
                    None => None,
                })
            })
            .collect()
    }

    /// Deletes, a chunk per statement (and transaction), the rows
    /// `delete_chunk` names (a DELETE whose parameters are the agency and
    /// the chunk size); returns how many.
    async fn delete_in_chunks(
        &self,
        delete_chunk: &str,
        agency_id: &str,
    ) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let chunk = self
                .with_retries(StoreError::is_connection_loss, |_| async {
                    let done = sqlx::query(delete_chunk)
                        .persistent(false)
                        .bind(agency_id)
                        .bind(i64::from(FORGET_CHUNK))
                        .execute(&self.pool)
                        .await?;
                    Ok(done.rows_affected())
                })
                .await?;
            deleted += chunk;
            if chunk < u64::from(FORGET_CHUNK) {
                return Ok(deleted);
            }
        }
    }

    /// Announces the inboxes that got new messages to the other replicas.
    /// NOTIFY inside the transaction would hold PostgreSQL's global notify
    /// lock across the commit's fsync and serialise every commit of the
    /// cluster; sent afterwards (and not awaited) it costs one short
    /// statement.
    fn announce(&self, batch: &[ToStore], outcomes: &[Outcome]) {
        let mut last_of: Vec<(&str, u64)> = Vec::new();
        for (item, outcome) in batch.iter().zip(outcomes) {
            let Ok(stored) = outcome else { continue };
            if stored.duplicate {
                continue;
            }
            let recipient = item.message.recipient_id.as_str();
            match last_of.iter_mut().find(|(known, _)| *known == recipient) {
                Some((_, last)) => *last = (*last).max(stored.sequence),
                None => last_of.push((recipient, stored.sequence)),
            }
        }
        let wake_up = last_of
            .into_iter()
            .map(|(recipient, last)| format!("{recipient} {last}"))
            .collect();
        wakeups::announce(&self.pool, &self.replicas, wake_up);
    }
}

/// A claim as a row holds it (`message_id`, `fingerprint`).
fn existing_claim(row: &sqlx::postgres::PgRow) -> Result<ExistingClaim, StoreError> {
    Ok(ExistingClaim {
        message_id: row.try_get("message_id")?,
        fingerprint: fingerprint_from(row.try_get("fingerprint")?)?,
    })
}

/// Takes the next stream epoch of `recipient_id`, announced on
/// [`STREAM_CHANNEL`] when the transaction commits (so that older streams
/// of the inbox end on every replica), and returns it.
async fn next_epoch(
    connection: &mut sqlx::PgConnection,
    recipient_id: &str,
) -> Result<u64, StoreError> {
    let epoch: i64 = sqlx::query_scalar(
        "INSERT INTO inbox_streams (recipient_id, epoch) VALUES ($1, 1) \
         ON CONFLICT (recipient_id) DO UPDATE SET epoch = inbox_streams.epoch + 1 \
         RETURNING epoch",
    )
    .bind(recipient_id)
    .fetch_one(&mut *connection)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(STREAM_CHANNEL)
        .bind(format!("{recipient_id} {epoch}"))
        .execute(&mut *connection)
        .await?;
    to_sequence(epoch)
}

/// Freezes or thaws the inbox of `recipient_id`, creating its row if it
/// has none. Its sequences are not touched, so the fence lets this through;
/// it waits for a batch holding the row.
async fn set_frozen(
    connection: &mut sqlx::PgConnection,
    recipient_id: &str,
    frozen: bool,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO inboxes (recipient_id, last_sequence, frozen) VALUES ($1, 0, $2) \
         ON CONFLICT (recipient_id) DO UPDATE SET frozen = EXCLUDED.frozen",
    )
    .bind(recipient_id)
    .bind(frozen)
    .execute(connection)
    .await?;
    Ok(())
}

/// A sequence or size as PostgreSQL's BIGINT.
fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// One column of the batch's new messages, as an array parameter.
fn column<'a, T>(new: &'a [NewMessage<'a>], field: impl Fn(&'a NewMessage<'a>) -> T) -> Vec<T> {
    new.iter().map(field).collect()
}

/// Whether a failed batch may be tried again: it lost a race with another
/// writer, met a frozen inbox, or its connection was lost. The next attempt
/// looks up every id, so what the failed one committed is not stored twice,
/// and which inboxes are frozen, so that only their messages are refused.
fn worth_retrying(error: &StoreError) -> bool {
    // unique_violation, deadlock_detected, serialization_failure, the fence
    matches!(
        error.sql_state().as_deref(),
        Some("23505" | "40P01" | "40001" | INBOX_FROZEN)
    ) || error.is_connection_loss()
}

#[async_trait::async_trait]
impl MessageStore for PgMessageStore {
    async fn insert_batch(&self, batch: &[ToStore]) -> Result<Vec<Outcome>, StoreError> {
        // The batch's time is its mark: what a lost attempt of it committed
        // is found stored at that time, and reported as new (see `plan`).
        let stored_at_micros = self.clock.next();
        let (outcomes, _) = self
            .with_retries(worth_retrying, |previous| {
                self.try_insert_batch(batch, stored_at_micros, previous.is_some())
            })
            .await?;
        self.announce(batch, &outcomes);
        Ok(outcomes)
    }

    async fn claim_keys(&self, claims: &[KeyClaim]) -> Result<Vec<Claimed>, StoreError> {
        // A key twice in one statement would be claimed twice: a repeat is
        // answered by the first claim of it in the batch.
        let mut firsts: Vec<&KeyClaim> = Vec::new();
        let mut first_of = Vec::with_capacity(claims.len());
        for claim in claims {
            let same_key = |first: &&KeyClaim| {
                first.sender_id == claim.sender_id && first.idempotency_key == claim.idempotency_key
            };
            match firsts.iter().position(same_key) {
                Some(index) => first_of.push((index, false)),
                None => {
                    first_of.push((firsts.len(), true));
                    firsts.push(claim);
                }
            }
        }
        let mut answers: Vec<Option<Claimed>> = vec![None; firsts.len()];
        for _ in 0..self.max_attempts {
            let pending: Vec<usize> = (0..firsts.len())
                .filter(|index| answers[*index].is_none())
                .collect();
            if pending.is_empty() {
                break;
            }
            let wanted: Vec<&KeyClaim> = pending.iter().map(|index| firsts[*index]).collect();
            let found = self
                .with_retries(StoreError::is_connection_loss, |_| {
                    self.try_claim_keys(&wanted)
                })
                .await?;
            for (index, answer) in pending.into_iter().zip(found) {
                answers[index] = answer;
            }
        }
        first_of
            .into_iter()
            .map(|(index, first)| match (&answers[index], first) {
                (Some(answer), true) => Ok(answer.clone()),
                (Some(Claimed::New), false) => Ok(Claimed::Existing(ExistingClaim {
                    message_id: firsts[index].message_id.clone(),
                    fingerprint: Some(firsts[index].fingerprint),
                })),
                (Some(existing), false) => Ok(existing.clone()),
                // Claimed by a writer whose commit stayed out of sight.
                (None, _) => Err(StoreError::conflict()),
            })
            .collect()
    }

    async fn purge_keys(&self, claimed_before: i64, limit: u32) -> Result<u64, StoreError> {
        let deleted = sqlx::query(
            "DELETE FROM idempotency_keys WHERE ctid IN \
             (SELECT ctid FROM idempotency_keys WHERE claimed_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .persistent(false)
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
        self.with_retries(StoreError::is_connection_loss, |_| {
            self.fetch_unacked_once(recipient_id, page)
        })
        .await
    }

    async fn claim_inbox(&self, recipient_id: &str) -> Result<u64, StoreError> {
        self.with_retries(StoreError::is_connection_loss, |_| async {
            let mut transaction = self.pool.begin().await?;
            let epoch = next_epoch(&mut transaction, recipient_id).await?;
            // Read after the epoch is taken: a freeze takes the epoch after
            // freezing, so either this statement sees the freeze committed
            // or the freeze's epoch comes after this one and ends the stream.
            let frozen: Option<bool> =
                sqlx::query_scalar("SELECT frozen FROM inboxes WHERE recipient_id = $1")
                    .bind(recipient_id)
                    .fetch_optional(&mut *transaction)
                    .await?;
            if frozen == Some(true) {
                // Rolled back, announcement and all.
                return Err(StoreError::InboxMoved(recipient_id.to_string()));
            }
            transaction.commit().await?;
            Ok(epoch)
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
        let sequences: Vec<i64> = sequences.iter().map(|sequence| to_sql(*sequence)).collect();
        self.with_retries(StoreError::is_connection_loss, |_| {
            self.ack_once(recipient_id, &sequences)
        })
        .await
    }

    async fn purge_acked(&self, acked_before: i64, limit: u32) -> Result<u64, StoreError> {
        let deleted = sqlx::query(
            // acked_at < cutoff implies stored_at < cutoff, which the
            // BRIN index narrows to the oldest pages.
            "DELETE FROM messages WHERE ctid IN \
             (SELECT ctid FROM messages WHERE stored_at < $1 AND acked_at < $1 \
              LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .persistent(false)
        .bind(acked_before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(deleted.rows_affected())
    }

    async fn freeze_inbox(&self, agency_id: &str) -> Result<u64, StoreError> {
        self.with_retries(StoreError::is_connection_loss, |_| async {
            let mut transaction = self.pool.begin().await?;
            set_frozen(&mut transaction, agency_id, true).await?;
            let epoch = next_epoch(&mut transaction, agency_id).await?;
            transaction.commit().await?;
            Ok(epoch)
        })
        .await
    }

    async fn thaw_inbox(&self, agency_id: &str) -> Result<(), StoreError> {
        self.with_retries(StoreError::is_connection_loss, |_| async {
            sqlx::query("UPDATE inboxes SET frozen = FALSE WHERE recipient_id = $1")
                .bind(agency_id)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    async fn inbox_position(&self, agency_id: &str) -> Result<InboxPosition, StoreError> {
        self.with_retries(StoreError::is_connection_loss, |_| async {
            let row = sqlx::query(
                "SELECT (SELECT last_sequence FROM inboxes WHERE recipient_id = $1) AS last_sequence, \
                 (SELECT epoch FROM inbox_streams WHERE recipient_id = $1) AS epoch",
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
        })
        .await
    }

    async fn export_messages(
        &self,
        agency_id: &str,
        after_sequence: u64,
        max_rows: u32,
        max_bytes: usize,
    ) -> Result<Vec<MovedMessage>, StoreError> {
        self.with_retries(StoreError::is_connection_loss, |_| async {
            // Unacknowledged and acknowledged messages each in the order of
            // their own partial index, merged.
            let rows = sqlx::query(
                "SELECT message_id, recipient_id, sequence, sender_id, kind, payload, headers, \
                 idempotency_key, origin_region, accepted_at, stored_at, acked_at, traceparent FROM ( \
                   SELECT candidates.*, \
                     sum(octet_length(payload)) OVER (ORDER BY sequence) AS bytes_through, \
                     row_number() OVER (ORDER BY sequence) AS row_number \
                   FROM ( \
                     (SELECT * FROM messages WHERE recipient_id = $1 AND sequence > $2 \
                        AND acked_at IS NULL ORDER BY sequence LIMIT $3) \
                     UNION ALL \
                     (SELECT * FROM messages WHERE recipient_id = $1 AND sequence > $2 \
                        AND acked_at IS NOT NULL ORDER BY sequence LIMIT $3) \
                     ORDER BY sequence LIMIT $3 \
                   ) AS candidates \
                 ) AS page \
                 WHERE bytes_through <= $4 OR row_number = 1 ORDER BY sequence",
            )
            .persistent(false)
            .bind(agency_id)
            .bind(to_sql(after_sequence))
            .bind(i64::from(max_rows))
            .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(moved_message_from_row).collect()
        })
        .await
    }

    async fn export_keys(
        &self,
        agency_id: &str,
        after_key: Option<&str>,
        max_rows: u32,
    ) -> Result<Vec<MovedKey>, StoreError> {
        self.with_retries(StoreError::is_connection_loss, |_| async {
            // Two statements rather than one with `$2 IS NULL OR ...`, whose
            // generic plan would read every page from the sender's first key.
            let query = match after_key {
                Some(after_key) => sqlx::query(
                    "SELECT sender_id, idempotency_key, fingerprint, message_id, claimed_at \
                     FROM idempotency_keys WHERE sender_id = $1 AND idempotency_key > $2 \
                     ORDER BY idempotency_key LIMIT $3",
                )
                .bind(agency_id)
                .bind(after_key),
                None => sqlx::query(
                    "SELECT sender_id, idempotency_key, fingerprint, message_id, claimed_at \
                     FROM idempotency_keys WHERE sender_id = $1 \
                     ORDER BY idempotency_key LIMIT $2",
                )
                .bind(agency_id),
            };
            let rows = query
                .bind(i64::from(max_rows))
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(moved_key_from_row).collect()
        })
        .await
    }

    async fn import_messages(&self, messages: &[MovedMessage]) -> Result<u64, StoreError> {
        if messages.is_empty() {
            return Ok(0);
        }
        let text = |field: fn(&MovedMessage) -> &str| -> Vec<&str> {
            messages.iter().map(field).collect()
        };
        let number =
            |field: fn(&MovedMessage) -> i64| -> Vec<i64> { messages.iter().map(field).collect() };
        let mut headers = Vec::with_capacity(messages.len());
        for moved in messages {
            let json =
                serde_json::to_string(&moved.message.headers).map_err(StoreError::corrupt)?;
            headers.push(json);
        }
        let payloads: Vec<&[u8]> = messages
            .iter()
            .map(|moved| moved.message.payload.as_ref())
            .collect();
        let keys: Vec<Option<&str>> = messages
            .iter()
            .map(|moved| moved.message.idempotency_key.as_deref())
            .collect();
        let acked_at: Vec<Option<i64>> =
            messages.iter().map(|moved| moved.acked_at_micros).collect();
        let traceparents: Vec<Option<&str>> = messages
            .iter()
            .map(|moved| stored_traceparent(&moved.message))
            .collect();
        let (acked_ids, acked_times): (Vec<&str>, Vec<i64>) = messages
            .iter()
            .filter_map(|moved| Some((moved.message.message_id.as_str(), moved.acked_at_micros?)))
            .unzip();
        // Importing again is harmless, so a lost connection is retried.
        self.with_retries(StoreError::is_connection_loss, |_| async {
            let mut transaction = self.pool.begin().await?;
            let new = sqlx::query(
                "INSERT INTO messages (message_id, recipient_id, sequence, sender_id, kind, \
                 payload, headers, idempotency_key, origin_region, accepted_at, stored_at, acked_at, \
                 traceparent) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], \
                   $6::bytea[], $7::text[], $8::text[], $9::text[], $10::bigint[], $11::bigint[], \
                   $12::bigint[], $13::text[]) \
                 ON CONFLICT (message_id) DO NOTHING",
            )
            .persistent(false)
            .bind(text(|moved| &moved.message.message_id))
            .bind(text(|moved| &moved.message.recipient_id))
            .bind(number(|moved| to_sql(moved.sequence)))
            .bind(text(|moved| &moved.message.sender_id))
            .bind(text(|moved| &moved.message.kind))
            .bind(&payloads)
            .bind(&headers)
            .bind(&keys)
            .bind(text(|moved| &moved.message.origin_region))
            .bind(number(|moved| moved.message.accepted_at_micros))
            .bind(number(|moved| moved.stored_at_micros))
            .bind(&acked_at)
            .bind(&traceparents)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
            if !acked_ids.is_empty() {
                sqlx::query(
                    "UPDATE messages SET acked_at = imported.acked_at \
                     FROM UNNEST($1::text[], $2::bigint[]) AS imported (message_id, acked_at) \
                     WHERE messages.message_id = imported.message_id AND messages.acked_at IS NULL",
                )
                .persistent(false)
                .bind(&acked_ids)
                .bind(&acked_times)
                .execute(&mut *transaction)
                .await?;
            }
            transaction.commit().await?;
            Ok(new)
        })
        .await
    }

    async fn import_keys(&self, keys: &[MovedKey]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        self.with_retries(StoreError::is_connection_loss, |_| async {
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (sender_id, idempotency_key, fingerprint, message_id, claimed_at) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::text[], $5::bigint[]) \
                 ON CONFLICT (sender_id, idempotency_key) DO NOTHING",
            )
            .persistent(false)
            .bind(keys.iter().map(|key| key.sender_id.as_str()).collect::<Vec<_>>())
            .bind(keys.iter().map(|key| key.idempotency_key.as_str()).collect::<Vec<_>>())
            .bind(
                keys.iter()
                    .map(|key| key.fingerprint.as_ref().map(|fingerprint| &fingerprint.0[..]))
                    .collect::<Vec<_>>(),
            )
            .bind(keys.iter().map(|key| key.message_id.as_str()).collect::<Vec<_>>())
            .bind(keys.iter().map(|key| key.claimed_at_micros).collect::<Vec<_>>())
            .execute(&self.pool)
            .await?;
            Ok(inserted.rows_affected())
        })
        .await
    }

    async fn open_imported_inbox(
        &self,
        agency_id: &str,
        position: InboxPosition,
    ) -> Result<(), StoreError> {
        self.with_retries(StoreError::is_connection_loss, |_| async {
            let mut transaction = self.pool.begin().await?;
            // Thawed first: the fence refuses a new last sequence for a row
            // that is frozen when the statement starts.
            set_frozen(&mut transaction, agency_id, false).await?;
            sqlx::query(
                "UPDATE inboxes SET last_sequence = $2 WHERE recipient_id = $1 AND last_sequence < $2",
            )
            .bind(agency_id)
            .bind(to_sql(position.last_sequence))
            .execute(&mut *transaction)
            .await?;
            sqlx::query(
                "INSERT INTO inbox_streams (recipient_id, epoch) VALUES ($1, $2) \
                 ON CONFLICT (recipient_id) DO UPDATE \
                 SET epoch = GREATEST(inbox_streams.epoch, EXCLUDED.epoch)",
            )
            .bind(agency_id)
            .bind(to_sql(position.epoch))
            .execute(&mut *transaction)
            .await?;
            transaction.commit().await?;
            Ok(())
        })
        .await
    }

    async fn forget_agency(&self, agency_id: &str, keep_frozen: bool) -> Result<u64, StoreError> {
        self.with_retries(StoreError::is_connection_loss, |_| async {
            let mut connection = self.pool.acquire().await?;
            set_frozen(&mut connection, agency_id, true).await
        })
        .await?;
        // Unacknowledged first: a message acknowledged meanwhile is among
        // the acknowledged ones, deleted after. Each kind is found by its
        // own partial index.
        let mut deleted = 0;
        for delete_chunk in [
            "DELETE FROM messages WHERE ctid = ANY(ARRAY( \
               SELECT ctid FROM messages WHERE recipient_id = $1 AND acked_at IS NULL LIMIT $2))",
            "DELETE FROM messages WHERE ctid = ANY(ARRAY( \
               SELECT ctid FROM messages WHERE recipient_id = $1 AND acked_at IS NOT NULL LIMIT $2))",
            "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY( \
               SELECT ctid FROM idempotency_keys WHERE sender_id = $1 LIMIT $2))",
        ] {
            deleted += self.delete_in_chunks(delete_chunk, agency_id).await?;
        }
        self.with_retries(StoreError::is_connection_loss, |_| async {
            let mut transaction = self.pool.begin().await?;
            sqlx::query("DELETE FROM inbox_streams WHERE recipient_id = $1")
                .bind(agency_id)
                .execute(&mut *transaction)
                .await?;
            if !keep_frozen {
                sqlx::query("DELETE FROM inboxes WHERE recipient_id = $1")
                    .bind(agency_id)
                    .execute(&mut *transaction)
                    .await?;
            }
            transaction.commit().await?;
            Ok(())
        })
        .await?;
        Ok(deleted)
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
        PoolUsage::of(&self.pool) + PoolUsage::of(&self.write_pool)
    }

    fn spool(&self) -> Arc<dyn SpoolStore> {
        Arc::new(PgSpool::new(
            self.pool.clone(),
            &self.url,
            &self.region,
            self.events,
        ))
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
