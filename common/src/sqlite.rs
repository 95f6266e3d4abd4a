//! SQLite plumbing shared by the roles' stores: opening a durable pool and
//! the event outbox (table `outbox`, created by each role's migrations with
//! the same columns).

use std::str::FromStr;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::events::{BoxFuture, BusError, Event, Outbox};

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

fn event_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<(i64, Event), sqlx::Error> {
    let attributes: String = row.try_get("attributes")?;
    let event = Event {
        event_id: row.try_get("event_id")?,
        kind: row.try_get("kind")?,
        region: row.try_get("region")?,
        agency_id: row.try_get("agency_id")?,
        message_id: row.try_get("message_id")?,
        occurred_at_micros: row.try_get("occurred_at")?,
        attributes: serde_json::from_str(&attributes)
            .map_err(|error| sqlx::Error::Decode(Box::new(error)))?,
    };
    Ok((row.try_get("row_id")?, event))
}

impl SqliteOutbox {
    async fn fetch(&self, limit: u32) -> Result<Vec<(i64, Event)>, BusError> {
        let rows = sqlx::query(
            "SELECT row_id, event_id, kind, region, agency_id, message_id, occurred_at, attributes \
             FROM outbox ORDER BY row_id LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(outbox_error)?;
        rows.iter()
            .map(|row| event_from_row(row).map_err(outbox_error))
            .collect()
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
            let rows = self.fetch(limit).await?;
            let Some(last) = rows.last().map(|(row_id, _)| *row_id) else {
                return Ok(0);
            };
            let count = rows.len();
            publisher
                .publish(rows.into_iter().map(|(_, event)| event).collect())
                .await?;
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
