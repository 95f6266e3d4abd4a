//! STORAGE: the control database behind a trait, so the same directory logic
//! runs on SQLite (dev mesh) and PostgreSQL (deployments).
//!
//! Every change to the directory writes its event to the outbox in the same
//! transaction.

mod postgres;
mod sqlite;

pub use postgres::PgDirectoryStore;
pub use sqlite::SqliteDirectoryStore;

use std::sync::Arc;

use fedmesh_common::events::{Event, Outbox};
use fedmesh_common::store::Backend;

use crate::agency::AgencyRecord;
use crate::error::StoreError;
use crate::subscription::{SubscriptionRecord, WebhookTarget};

/// Opens the control database at `url`: `postgres://...` or `sqlite://...`.
pub async fn open_store(
    url: &str,
    max_connections: u32,
) -> Result<Arc<dyn DirectoryStore>, StoreError> {
    Ok(match Backend::of_url(url)? {
        Backend::Postgres => Arc::new(PgDirectoryStore::open(url, max_connections).await?),
        Backend::Sqlite => Arc::new(SqliteDirectoryStore::open(url).await?),
    })
}

/// The control database.
#[async_trait::async_trait]
pub trait DirectoryStore: Send + Sync + 'static {
    /// Inserts `agency` and its event, if any (none while events are off);
    /// [`StoreError::Conflict`] if the id is taken (then nothing is written).
    async fn insert_agency(
        &self,
        agency: &AgencyRecord,
        event: Option<Event>,
    ) -> Result<(), StoreError>;
    /// Deletes an agency and writes its event, if any; false if it did not
    /// exist.
    async fn delete_agency(
        &self,
        agency_id: &str,
        event: Option<Event>,
    ) -> Result<bool, StoreError>;
    /// All agencies, for the topology.
    async fn all_agencies(&self) -> Result<Vec<AgencyRecord>, StoreError>;

    /// Inserts a durable subscription; [`StoreError::Conflict`] if the
    /// name is taken (then nothing is written).
    async fn insert_subscription(
        &self,
        subscription: &SubscriptionRecord,
    ) -> Result<(), StoreError>;
    /// Deletes a subscription; false if it did not exist.
    async fn delete_subscription(&self, name: &str) -> Result<bool, StoreError>;
    /// Every subscription, by name.
    async fn all_subscriptions(&self) -> Result<Vec<SubscriptionRecord>, StoreError>;

    /// This store's outbox, for the outbox relay.
    fn outbox(&self) -> Arc<dyn Outbox>;
}

/// A subscription's filter as stored: JSON.
fn filter_to_text(filter: &fedmesh_common::events::Filter) -> Result<String, StoreError> {
    serde_json::to_string(filter).map_err(StoreError::corrupt)
}

/// Every subscription, by name, on either backend.
const ALL_SUBSCRIPTIONS: &str = "SELECT name, owner, filter, strict_order, created_at, \
     webhook_url, webhook_secret FROM subscriptions ORDER BY name";

/// A `subscriptions` row as a subscription, on either backend.
fn subscription_from_row<R>(row: &R) -> Result<SubscriptionRecord, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let name: String = row.try_get("name")?;
    let filter: String = row.try_get("filter")?;
    let webhook = match (row.try_get("webhook_url")?, row.try_get("webhook_secret")?) {
        (Some(url), Some(secret)) => Some(WebhookTarget { url, secret }),
        (None, None) => None,
        _ => {
            return Err(StoreError::corrupt(format!(
                "subscription {name:?} has a webhook URL or secret without the other"
            )));
        }
    };
    Ok(SubscriptionRecord {
        name,
        owner: row.try_get("owner")?,
        filter: serde_json::from_str(&filter).map_err(StoreError::corrupt)?,
        strict_order: row.try_get("strict_order")?,
        created_at_micros: row.try_get("created_at")?,
        webhook,
    })
}

#[cfg(test)]
mod tests;
