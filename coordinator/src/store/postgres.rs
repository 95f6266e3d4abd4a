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

    async fn all_agencies(&self) -> Result<Vec<AgencyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT agency_id, region, shard, display_name, registered_at FROM agencies ORDER BY agency_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AgencyRecord {
                    agency_id: row.try_get("agency_id")?,
                    region: row.try_get("region")?,
                    shard: row.try_get("shard")?,
                    display_name: row.try_get("display_name")?,
                    registered_at_micros: row.try_get("registered_at")?,
                })
            })
            .collect()
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

    async fn delete_region(&self, name: &str) -> Result<bool, StoreError> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query("DELETE FROM shards WHERE region = $1")
            .bind(name)
            .execute(&mut *transaction)
            .await?;
        let deleted = sqlx::query("DELETE FROM regions WHERE name = $1")
            .bind(name)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now_micros: i64,
        duration_micros: i64,
    ) -> Result<Option<Lease>, StoreError> {
        let mut transaction = self.pool.begin().await?;
        {
            // A first lease is created by one replica only; the row is then
            // locked (FOR UPDATE) by whoever reads it.
            sqlx::query(
                "INSERT INTO leases (name, holder, token, acquired_at, expires_at) \
                 VALUES ($1, '', 0, 0, 0) ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .execute(&mut *transaction)
            .await?;
        }
        let current = sqlx::query(
            "SELECT holder, token, acquired_at, expires_at FROM leases WHERE name = $1 FOR UPDATE",
        )
        .bind(name)
        .fetch_optional(&mut *transaction)
        .await?
        .map(|row| super::lease_from_row(&row))
        .transpose()?
        .filter(|lease| lease.token > 0);
        let Some(next) = super::next_lease(current, holder, now_micros, duration_micros) else {
            return Ok(None);
        };
        sqlx::query(
            "INSERT INTO leases (name, holder, token, acquired_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = excluded.token, \
             acquired_at = excluded.acquired_at, expires_at = excluded.expires_at",
        )
        .bind(name)
        .bind(&next.holder)
        .bind(next.token)
        .bind(next.acquired_at_micros)
        .bind(next.expires_at_micros)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(Some(next))
    }

    async fn set_gateway_state(
        &self,
        token: i64,
        gateway_id: &str,
        region: &str,
        up: bool,
        event: Option<Event>,
    ) -> Result<bool, StoreError> {
        let mut transaction = self.pool.begin().await?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT token FROM leases WHERE name = $1 FOR SHARE")
                .bind(crate::lease::LEADER)
                .fetch_optional(&mut *transaction)
                .await?;
        if current != Some(token) {
            return Err(StoreError::Fenced { token, current });
        }
        // Only a change is recorded: a gateway's first report is no "up".
        let was_up: Option<bool> =
            sqlx::query_scalar("SELECT up FROM gateway_states WHERE gateway_id = $1")
                .bind(gateway_id)
                .fetch_optional(&mut *transaction)
                .await?;
        if was_up.unwrap_or(true) == up {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO gateway_states (gateway_id, region, up, changed_at, token) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (gateway_id) DO UPDATE SET region = excluded.region, up = excluded.up, \
             changed_at = excluded.changed_at, token = excluded.token",
        )
        .bind(gateway_id)
        .bind(region)
        .bind(up)
        .bind(fedmesh_common::time::now_micros())
        .bind(token)
        .execute(&mut *transaction)
        .await?;
        if let Some(event) = event {
            insert_events(&mut transaction, &[event]).await?;
        }
        transaction.commit().await?;
        Ok(true)
    }

    async fn append_audit(
        &self,
        record: &AuditRecord,
        at_micros: i64,
    ) -> Result<AuditEntry, StoreError> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&record.chain)
            .execute(&mut *transaction)
            .await?;
        let last = sqlx::query(
            "SELECT seq, hash FROM audit_log WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(&record.chain)
        .fetch_optional(&mut *transaction)
        .await?;
        let (seq, prev_hash) = match last {
            Some(row) => (row.try_get::<i64, _>("seq")? + 1, row.try_get("hash")?),
            None => (1, fedmesh_common::audit::GENESIS.to_string()),
        };
        let entry = AuditEntry::chain(record.clone(), seq, at_micros, prev_hash);
        sqlx::query(
            "INSERT INTO audit_log \
             (chain, seq, at, actor, action, target, outcome, detail, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&entry.record.chain)
        .bind(entry.seq)
        .bind(entry.at_micros)
        .bind(&entry.record.actor)
        .bind(&entry.record.action)
        .bind(&entry.record.target)
        .bind(&entry.record.outcome)
        .bind(&entry.record.detail)
        .bind(&entry.prev_hash)
        .bind(&entry.hash)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(entry)
    }

    fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(PgOutbox::new(self.pool.clone()))
    }
});
