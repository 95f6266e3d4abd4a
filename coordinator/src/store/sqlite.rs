//! The directory store on SQLite (WAL, synchronous=FULL).

use std::sync::Arc;

use fedmesh_common::events::{Event, Outbox};
use fedmesh_common::sqlite::{SqliteOutbox, begin_write, insert_event, open_pool};
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use fedmesh_common::audit::{AuditEntry, AuditRecord};

use crate::access::GrantRecord;
use crate::agency::AgencyRecord;
use crate::error::StoreError;
use crate::lease::Lease;
use crate::region::ShardRecord;
use crate::subscription::SubscriptionRecord;

/// The control database on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteDirectoryStore {
    pool: SqlitePool,
}

impl SqliteDirectoryStore {
    // SQLite has no row locks: a write transaction (BEGIN IMMEDIATE) holds
    // the whole database.
    const FOR_UPDATE: &str = "";
    const FOR_SHARE: &str = "";

    async fn begin_write(&self) -> Result<sqlx::Transaction<'_, sqlx::Sqlite>, StoreError> {
        Ok(begin_write(&self.pool).await?)
    }

    /// Appends to an audit chain one transaction at a time: the write
    /// transaction does it already.
    async fn lock_chain(
        _transaction: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        _chain: &str,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    async fn write_event(
        transaction: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        event: &Event,
    ) -> Result<(), StoreError> {
        Ok(insert_event(transaction, event).await?)
    }

    /// Opens (creating if missing) the database at `url` and applies migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = open_pool(url, 4).await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteDirectoryStore { pool })
    }
}

directory_store_impl!(SqliteDirectoryStore {
    async fn insert_agency(
        &self,
        agency: &AgencyRecord,
        event: Option<Event>,
    ) -> Result<(), StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        let inserted = sqlx::query(
            "INSERT INTO agencies (agency_id, region, shard, display_name, registered_at) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (agency_id) DO NOTHING",
        )
        .bind(&agency.agency_id)
        .bind(&agency.region)
        .bind(&agency.shard)
        .bind(&agency.display_name)
        .bind(agency.registered_at_micros)
        .execute(&mut *transaction)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict);
        }
        if let Some(event) = &event {
            insert_event(&mut transaction, event).await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn delete_agency(
        &self,
        agency_id: &str,
        event: Option<Event>,
    ) -> Result<bool, StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        let deleted = sqlx::query("DELETE FROM agencies WHERE agency_id = ?")
            .bind(agency_id)
            .execute(&mut *transaction)
            .await?;
        if deleted.rows_affected() == 0 {
            return Ok(false);
        }
        if let Some(event) = &event {
            insert_event(&mut transaction, event).await?;
        }
        transaction.commit().await?;
        Ok(true)
    }

    async fn insert_subscription(
        &self,
        subscription: &SubscriptionRecord,
    ) -> Result<(), StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO subscriptions \
             (name, owner, filter, strict_order, created_at, webhook_url, webhook_secret) \
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&subscription.name)
        .bind(&subscription.owner)
        .bind(super::filter_to_text(&subscription.filter)?)
        .bind(subscription.strict_order)
        .bind(subscription.created_at_micros)
        .bind(subscription.webhook.as_ref().map(|webhook| &webhook.url))
        .bind(subscription.webhook.as_ref().map(|webhook| &webhook.secret))
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    async fn delete_subscription(&self, name: &str) -> Result<bool, StoreError> {
        let deleted = sqlx::query("DELETE FROM subscriptions WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn all_subscriptions(&self) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let rows = sqlx::query(super::ALL_SUBSCRIPTIONS)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(super::subscription_from_row).collect()
    }

    fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(SqliteOutbox::new(self.pool.clone()))
    }
});
