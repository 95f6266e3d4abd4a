//! The directory store on PostgreSQL: the control database of deployments.

use std::sync::Arc;

use fedmesh_common::events::{Event, Outbox};
use fedmesh_common::postgres::{PgOutbox, insert_events, pool_options};
use sqlx::Row;
use sqlx::postgres::PgPool;

use fedmesh_common::audit::{AuditEntry, AuditRecord};

use crate::access::GrantRecord;
use crate::agency::AgencyRecord;
use crate::error::StoreError;
use crate::lease::Lease;
use crate::region::ShardRecord;
use crate::subscription::SubscriptionRecord;

/// The control database on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgDirectoryStore {
    pool: PgPool,
}

impl PgDirectoryStore {
    const FOR_UPDATE: &str = " FOR UPDATE";
    const FOR_SHARE: &str = " FOR SHARE";

    async fn begin_write(&self) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    /// Appends to an audit chain one transaction at a time.
    async fn lock_chain(
        transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        chain: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(chain)
            .execute(&mut **transaction)
            .await?;
        Ok(())
    }

    async fn write_event(
        transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        event: &Event,
    ) -> Result<(), StoreError> {
        Ok(insert_events(transaction, std::slice::from_ref(event)).await?)
    }

    /// Connects with at most `max_connections` and applies migrations (under
    /// PostgreSQL's advisory lock, so replicas may start together).
    pub async fn open(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        // The control database is not on the hot path: a connection is
        // checked before each use rather than each store retrying.
        let pool = pool_options(max_connections)
            .test_before_acquire(true)
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PgDirectoryStore { pool })
    }
}

directory_store_impl!(PgDirectoryStore {
    async fn insert_agency(
        &self,
        agency: &AgencyRecord,
        event: Option<Event>,
    ) -> Result<(), StoreError> {
        let mut transaction = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO agencies (agency_id, region, shard, display_name, registered_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (agency_id) DO NOTHING",
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
        if let Some(event) = event {
            insert_events(&mut transaction, &[event]).await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn delete_agency(
        &self,
        agency_id: &str,
        event: Option<Event>,
    ) -> Result<bool, StoreError> {
        let mut transaction = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM agencies WHERE agency_id = $1")
            .bind(agency_id)
            .execute(&mut *transaction)
            .await?;
        if deleted.rows_affected() == 0 {
            return Ok(false);
        }
        if let Some(event) = event {
            insert_events(&mut transaction, &[event]).await?;
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
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
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
        let deleted = sqlx::query("DELETE FROM subscriptions WHERE name = $1")
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
        Arc::new(PgOutbox::new(self.pool.clone()))
    }
});
