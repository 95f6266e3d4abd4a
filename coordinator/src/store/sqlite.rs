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
    /// Opens (creating if missing) the database at `url` and applies migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = open_pool(url, 4).await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteDirectoryStore { pool })
    }
}

fn agency_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<AgencyRecord, StoreError> {
    Ok(AgencyRecord {
        agency_id: row.try_get("agency_id")?,
        region: row.try_get("region")?,
        shard: row.try_get("shard")?,
        display_name: row.try_get("display_name")?,
        registered_at_micros: row.try_get("registered_at")?,
    })
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

    async fn all_agencies(&self) -> Result<Vec<AgencyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT agency_id, region, shard, display_name, registered_at FROM agencies ORDER BY agency_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(agency_from_row).collect()
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

    async fn delete_region(&self, name: &str) -> Result<bool, StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        sqlx::query("DELETE FROM shards WHERE region = ?")
            .bind(name)
            .execute(&mut *transaction)
            .await?;
        let deleted = sqlx::query("DELETE FROM regions WHERE name = ?")
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
        let mut transaction = begin_write(&self.pool).await?;
        let current =
            sqlx::query("SELECT holder, token, acquired_at, expires_at FROM leases WHERE name = ?")
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
             VALUES (?, ?, ?, ?, ?) \
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
        let mut transaction = begin_write(&self.pool).await?;
        let current: Option<i64> = sqlx::query_scalar("SELECT token FROM leases WHERE name = ?")
            .bind(crate::lease::LEADER)
            .fetch_optional(&mut *transaction)
            .await?;
        if current != Some(token) {
            return Err(StoreError::Fenced { token, current });
        }
        // Only a change is recorded: a gateway's first report is no "up".
        let was_up: Option<bool> =
            sqlx::query_scalar("SELECT up FROM gateway_states WHERE gateway_id = ?")
                .bind(gateway_id)
                .fetch_optional(&mut *transaction)
                .await?;
        if was_up.unwrap_or(true) == up {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO gateway_states (gateway_id, region, up, changed_at, token) \
             VALUES (?, ?, ?, ?, ?) \
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
            insert_event(&mut transaction, &event).await?;
        }
        transaction.commit().await?;
        Ok(true)
    }

    async fn append_audit(
        &self,
        record: &AuditRecord,
        at_micros: i64,
    ) -> Result<AuditEntry, StoreError> {
        let mut transaction = begin_write(&self.pool).await?;
        let last = sqlx::query(
            "SELECT seq, hash FROM audit_log WHERE chain = ? ORDER BY seq DESC LIMIT 1",
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        Arc::new(SqliteOutbox::new(self.pool.clone()))
    }
});
