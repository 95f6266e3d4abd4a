//! SQLite plumbing shared by the roles' stores: opening a durable pool and
//! the event outbox (table `outbox`, created by each role's migrations with
//! the same columns).

use std::str::FromStr;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::events::{BoxFuture, BusError, Event, MessageEntry, Outbox, message_events};

/// Opens (creating if missing) the SQLite database at `url` in WAL mode with
/// `synchronous=FULL`, so a commit is on disk before it returns.
pub async fn open_pool(url: &str, max_connections: u32) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(std::time::Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options)
        .await
}

/// Writes `event` to the outbox on `connection` (inside the caller's transaction).
pub async fn insert_event(
    connection: &mut sqlx::SqliteConnection,
    event: &Event,
) -> Result<(), sqlx::Error> {
    let attributes = serde_json::to_string(&event.attributes)
        .map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
    sqlx::query(
        "INSERT INTO outbox (event_id, kind, region, agency_id, message_id, occurred_at, attributes) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&event.event_id)
    .bind(&event.kind)
    .bind(&event.region)
    .bind(&event.agency_id)
    .bind(&event.message_id)
    .bind(event.occurred_at_micros)
    .bind(attributes)
    .execute(connection)
    .await?;
    Ok(())
}

/// One message of an outbox row's `entries` (JSON): id, recipient, sender,
/// kind, sequence and traceparent; rows written before messages carried a
/// traceparent list the first five only.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum ListedEntry {
    Traced((String, String, String, String, u64, String)),
    Untraced((String, String, String, String, u64)),
}

impl From<ListedEntry> for MessageEntry {
    fn from(listed: ListedEntry) -> Self {
        let (message_id, recipient_id, sender_id, message_kind, sequence, traceparent) =
            match listed {
                ListedEntry::Traced(entry) => entry,
                ListedEntry::Untraced((id, recipient, sender, kind, sequence)) => {
                    (id, recipient, sender, kind, sequence, String::new())
                }
            };
        MessageEntry {
            message_id,
            recipient_id,
            sender_id,
            message_kind,
            sequence,
            traceparent,
        }
    }
}

/// Writes the events of `kind` about the messages of `entries` to the outbox
/// as one row (inside the caller's transaction); `entries` is not empty.
pub async fn insert_message_events(
    connection: &mut sqlx::SqliteConnection,
    kind: &str,
    region: &str,
    occurred_at_micros: i64,
    entries: &[MessageEntry],
) -> Result<(), sqlx::Error> {
    let listed: Vec<ListedEntry> = entries
        .iter()
        .map(|entry| {
            ListedEntry::Traced((
                entry.message_id.clone(),
                entry.recipient_id.clone(),
                entry.sender_id.clone(),
                entry.message_kind.clone(),
                entry.sequence,
                entry.traceparent.clone(),
            ))
        })
        .collect();
    let listed =
        serde_json::to_string(&listed).map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
    sqlx::query("INSERT INTO outbox (kind, region, occurred_at, entries) VALUES (?, ?, ?, ?)")
        .bind(kind)
        .bind(region)
        .bind(occurred_at_micros)
        .bind(listed)
        .execute(connection)
        .await?;
    Ok(())
}

/// The outbox of a SQLite database, read by an outbox relay.
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
}

impl SqliteOutbox {
    /// The outbox in `pool`'s database.
    pub fn new(pool: SqlitePool) -> Self {
        SqliteOutbox { pool }
    }
}

fn outbox_error(error: impl std::fmt::Display) -> BusError {
    BusError(format!("outbox: {error}"))
}

/// The events of one outbox row: a single event, or the events of a batch
/// of messages (`entries` set).
fn events_of_row(row: &sqlx::sqlite::SqliteRow) -> Result<Vec<Event>, sqlx::Error> {
    let decode = |error: serde_json::Error| sqlx::Error::Decode(Box::new(error));
    let kind: String = row.try_get("kind")?;
    let region: String = row.try_get("region")?;
    let occurred_at_micros: i64 = row.try_get("occurred_at")?;
    if let Some(entries) = row.try_get::<Option<String>, _>("entries")? {
        let listed: Vec<ListedEntry> = serde_json::from_str(&entries).map_err(decode)?;
        let entries = listed.into_iter().map(MessageEntry::from).collect();
        return Ok(message_events(&kind, &region, occurred_at_micros, entries));
    }
    Ok(vec![crate::store::single_event_from_row(
        row,
        kind,
        region,
        occurred_at_micros,
    )?])
}

impl SqliteOutbox {
    /// The last row id and the events of up to `limit` rows; None when the
    /// outbox is empty.
    async fn fetch(&self, limit: u32) -> Result<Option<(i64, Vec<Event>)>, BusError> {
        let rows = sqlx::query(
            "SELECT row_id, event_id, kind, region, agency_id, message_id, occurred_at, attributes, \
             entries FROM outbox ORDER BY row_id LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(outbox_error)?;
        let Some(last) = rows.last() else {
            return Ok(None);
        };
        let last = last.try_get("row_id").map_err(outbox_error)?;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            events.extend(events_of_row(row).map_err(outbox_error)?);
        }
        Ok(Some((last, events)))
    }
}

impl Outbox for SqliteOutbox {
    fn relay_batch<'a>(
        &'a self,
        limit: u32,
        publisher: &'a dyn crate::events::EventPublisher,
    ) -> BoxFuture<'a, Result<usize, BusError>> {
        // One process owns a SQLite file, so one relay drains it: no lock is
        // held while publishing.
        Box::pin(async move {
            let Some((last, events)) = self.fetch(limit).await? else {
                return Ok(0);
            };
            let count = events.len();
            publisher.publish(events).await?;
            sqlx::query("DELETE FROM outbox WHERE row_id <= ?")
                .bind(last)
                .execute(&self.pool)
                .await
                .map_err(outbox_error)?;
            Ok(count)
        })
    }
}

/// Begins a write transaction that takes the write lock at once
/// (`BEGIN IMMEDIATE`): a transaction that reads first and writes later
/// would otherwise fail with SQLITE_BUSY_SNAPSHOT when another connection
/// committed in between, instead of waiting for the lock.
pub async fn begin_write(
    pool: &SqlitePool,
) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}
