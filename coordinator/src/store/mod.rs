//! STORAGE: the control database behind a trait, so the same directory logic
//! runs on SQLite (dev mesh) and PostgreSQL (deployments).
//!
//! Every change to the directory writes its event to the outbox in the same
//! transaction.

/// Refuses a singleton write under `$token` when the leader lease has
/// moved on to another token: the first statement of its transaction,
/// which shares the lease's row until the write commits.
macro_rules! check_lease_token {
    ($transaction:ident, $token:expr) => {
        let current: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT token FROM leases WHERE name = $1{}",
            Self::FOR_SHARE
        ))
        .bind(crate::lease::LEADER)
        .fetch_optional(&mut *$transaction)
        .await?;
        if current != Some($token) {
            return Err(StoreError::Fenced {
                token: $token,
                current,
            });
        }
    };
}

/// The methods of [`DirectoryStore`] whose SQL is the same on both
/// backends (`$N` parameters, which SQLite reads as named parameters in
/// order of first use), written once for both. Each store has what
/// differs: `begin_write` (a transaction that writes), `FOR_UPDATE` and
/// `FOR_SHARE` (row locks where the backend has them), `lock_chain` (one
/// appender per audit chain) and `write_event` (an outbox row).
macro_rules! directory_store_impl {
    ($store:ty { $($own:tt)* }) => {
        #[async_trait::async_trait]
        impl $crate::store::DirectoryStore for $store {
            $($own)*

    async fn all_agencies(&self) -> Result<Vec<AgencyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT agency_id, region, shard, display_name, registered_at, moving, version \
             FROM agencies ORDER BY agency_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| $crate::store::agency_from_row(row)).collect()
    }

    async fn begin_move(&self, record: &$crate::moves::MoveRecord) -> Result<bool, StoreError> {
        let mut transaction = self.begin_write().await?;
        let marked = sqlx::query(
            "UPDATE agencies SET moving = TRUE, version = version + 1 \
             WHERE agency_id = $1 AND region = $2 AND shard = $3 AND NOT moving",
        )
        .bind(&record.agency_id)
        .bind(&record.from_region)
        .bind(&record.from_shard)
        .execute(&mut *transaction)
        .await?;
        if marked.rows_affected() == 0 {
            let moving: Option<bool> =
                sqlx::query_scalar("SELECT moving FROM agencies WHERE agency_id = $1")
                    .bind(&record.agency_id)
                    .fetch_optional(&mut *transaction)
                    .await?;
            return match moving {
                Some(_) => Err(StoreError::Conflict),
                None => Ok(false),
            };
        }
        sqlx::query(&format!(
            "INSERT INTO agency_moves ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            $crate::store::MOVE_COLUMNS
        ))
        .bind(&record.move_id)
        .bind(&record.agency_id)
        .bind(&record.from_region)
        .bind(&record.from_shard)
        .bind(&record.to_region)
        .bind(&record.to_shard)
        .bind(record.phase.as_str())
        .bind(0_i64)
        .bind(0_i64)
        .bind("")
        .bind(record.started_at_micros)
        .bind(record.updated_at_micros)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(true)
    }

    async fn agency_move(&self, move_id: &str) -> Result<Option<$crate::moves::MoveRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {} FROM agency_moves WHERE move_id = $1",
            $crate::store::MOVE_COLUMNS
        ))
        .bind(move_id)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| $crate::store::move_from_row(&row))
        .transpose()
    }

    async fn moves_under_way(&self) -> Result<Vec<$crate::moves::MoveRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM agency_moves \
             WHERE phase IN ('copying', 'releasing', 'cancelling') ORDER BY started_at",
            $crate::store::MOVE_COLUMNS
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| $crate::store::move_from_row(row)).collect()
    }

    async fn record_move_progress(
        &self,
        move_id: &str,
        messages_copied: u64,
        keys_copied: u64,
        last_error: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agency_moves SET messages_copied = $1, keys_copied = $2, last_error = $3, \
             updated_at = $4 WHERE move_id = $5",
        )
        .bind(i64::try_from(messages_copied).unwrap_or(i64::MAX))
        .bind(i64::try_from(keys_copied).unwrap_or(i64::MAX))
        .bind(last_error)
        .bind(fedmesh_common::time::now_micros())
        .bind(move_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn cut_over_move(
        &self,
        token: i64,
        move_id: &str,
        event: Option<Event>,
    ) -> Result<Option<$crate::moves::MoveRecord>, StoreError> {
        let mut transaction = self.begin_write().await?;
        check_lease_token!(transaction, token);
        let Some(row) = sqlx::query(&format!(
            "UPDATE agency_moves SET phase = 'releasing', last_error = '', updated_at = $1 \
             WHERE move_id = $2 AND phase = 'copying' RETURNING {}",
            $crate::store::MOVE_COLUMNS
        ))
        .bind(fedmesh_common::time::now_micros())
        .bind(move_id)
        .fetch_optional(&mut *transaction)
        .await?
        else {
            return Ok(None);
        };
        let record = $crate::store::move_from_row(&row)?;
        sqlx::query(
            "UPDATE agencies SET region = $1, shard = $2, moving = FALSE, version = version + 1 \
             WHERE agency_id = $3",
        )
        .bind(&record.to_region)
        .bind(&record.to_shard)
        .bind(&record.agency_id)
        .execute(&mut *transaction)
        .await?;
        if let Some(event) = event {
            Self::write_event(&mut transaction, &event).await?;
        }
        transaction.commit().await?;
        Ok(Some(record))
    }

    async fn cancel_move(&self, move_id: &str) -> Result<Option<$crate::moves::MoveRecord>, StoreError> {
        let mut transaction = self.begin_write().await?;
        sqlx::query(
            "UPDATE agency_moves SET phase = 'cancelling', updated_at = $1 \
             WHERE move_id = $2 AND phase = 'copying'",
        )
        .bind(fedmesh_common::time::now_micros())
        .bind(move_id)
        .execute(&mut *transaction)
        .await?;
        let record = sqlx::query(&format!(
            "SELECT {} FROM agency_moves WHERE move_id = $1",
            $crate::store::MOVE_COLUMNS
        ))
        .bind(move_id)
        .fetch_optional(&mut *transaction)
        .await?
        .map(|row| $crate::store::move_from_row(&row))
        .transpose()?;
        transaction.commit().await?;
        Ok(record)
    }

    async fn finish_move(&self, token: i64, move_id: &str) -> Result<Option<$crate::moves::MoveRecord>, StoreError> {
        let mut transaction = self.begin_write().await?;
        check_lease_token!(transaction, token);
        let Some(row) = sqlx::query(&format!(
            "UPDATE agency_moves SET phase = CASE phase WHEN 'releasing' THEN 'done' ELSE 'cancelled' END, \
             last_error = '', updated_at = $1 \
             WHERE move_id = $2 AND phase IN ('releasing', 'cancelling') RETURNING {}",
            $crate::store::MOVE_COLUMNS
        ))
        .bind(fedmesh_common::time::now_micros())
        .bind(move_id)
        .fetch_optional(&mut *transaction)
        .await?
        else {
            return Ok(None);
        };
        let record = $crate::store::move_from_row(&row)?;
        if record.phase == $crate::moves::MovePhase::Cancelled {
            sqlx::query(
                "UPDATE agencies SET moving = FALSE, version = version + 1 WHERE agency_id = $1",
            )
                .bind(&record.agency_id)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(Some(record))
    }

    async fn delete_region(&self, name: &str) -> Result<bool, StoreError> {
        let mut transaction = self.begin_write().await?;
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
        let mut transaction = self.begin_write().await?;
        {
            // A first lease is created by one replica only; the row is then
            // locked by whoever reads it (FOR UPDATE where there is one).
            sqlx::query(
                "INSERT INTO leases (name, holder, token, acquired_at, expires_at) \
                 VALUES ($1, '', 0, 0, 0) ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .execute(&mut *transaction)
            .await?;
        }
        let current = sqlx::query(&format!(
            "SELECT holder, token, acquired_at, expires_at FROM leases WHERE name = $1{}",
            Self::FOR_UPDATE
        ))
        .bind(name)
        .fetch_optional(&mut *transaction)
        .await?
        .map(|row| $crate::store::lease_from_row(&row))
        .transpose()?
        .filter(|lease| lease.token > 0);
        let Some(next) = $crate::store::next_lease(current, holder, now_micros, duration_micros) else {
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
        let mut transaction = self.begin_write().await?;
        check_lease_token!(transaction, token);
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
            Self::write_event(&mut transaction, &event).await?;
        }
        transaction.commit().await?;
        Ok(true)
    }

    async fn append_audit(
        &self,
        record: &AuditRecord,
        at_micros: i64,
    ) -> Result<AuditEntry, StoreError> {
        let mut transaction = self.begin_write().await?;
        Self::lock_chain(&mut transaction, &record.chain).await?;
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

    async fn bump_directory_version(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "UPDATE directory_version SET version = version + 1 WHERE id = 1 RETURNING version",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    async fn directory_version(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT version FROM directory_version WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?
                .unwrap_or_default(),
        )
    }

    async fn report_gateway_instance(
        &self,
        instance: &$crate::store::GatewayInstance,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO gateway_instances \
             (gateway_id, region, address, last_seen, open_streams, in_flight) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (gateway_id) DO UPDATE SET \
             region = excluded.region, address = excluded.address, last_seen = excluded.last_seen, \
             open_streams = excluded.open_streams, in_flight = excluded.in_flight",
        )
        .bind(&instance.gateway_id)
        .bind(&instance.region)
        .bind(&instance.address)
        .bind(instance.last_seen_micros)
        .bind(i64::from(instance.open_streams))
        .bind(i64::from(instance.in_flight))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn gateway_instances(
        &self,
        seen_since_micros: i64,
    ) -> Result<Vec<$crate::store::GatewayInstance>, StoreError> {
        let rows = sqlx::query(
            "SELECT gateway_id, region, address, last_seen, open_streams, in_flight \
             FROM gateway_instances WHERE last_seen >= $1 ORDER BY gateway_id",
        )
        .bind(seen_since_micros)
        .fetch_all(&self.pool)
        .await?;
        let count = |row: &_, column: &str| -> Result<u32, StoreError> {
            let value: i64 = sqlx::Row::try_get(row, column)?;
            Ok(u32::try_from(value).unwrap_or(u32::MAX))
        };
        rows.iter()
            .map(|row| {
                Ok($crate::store::GatewayInstance {
                    gateway_id: row.try_get("gateway_id")?,
                    region: row.try_get("region")?,
                    address: row.try_get("address")?,
                    last_seen_micros: row.try_get("last_seen")?,
                    open_streams: count(row, "open_streams")?,
                    in_flight: count(row, "in_flight")?,
                })
            })
            .collect()
    }

    async fn report_notifier_instance(
        &self,
        notifier_id: &str,
        address: &str,
        last_seen_micros: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO notifier_instances (notifier_id, address, last_seen) \
             VALUES ($1, $2, $3) ON CONFLICT (notifier_id) DO UPDATE SET \
             address = excluded.address, last_seen = excluded.last_seen",
        )
        .bind(notifier_id)
        .bind(address)
        .bind(last_seen_micros)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn notifier_instances(
        &self,
        seen_since_micros: i64,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT notifier_id, address, last_seen FROM notifier_instances \
             WHERE last_seen >= $1 ORDER BY notifier_id",
        )
        .bind(seen_since_micros)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("notifier_id")?,
                    row.try_get("address")?,
                    row.try_get("last_seen")?,
                ))
            })
            .collect()
    }

    async fn insert_region(&self, name: &str, created_at_micros: i64) -> Result<(), StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO regions (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(created_at_micros)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    async fn all_regions(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT name FROM regions ORDER BY created_at, name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| row.try_get("name").map_err(StoreError::from))
            .collect()
    }

    async fn insert_shard(&self, shard: &ShardRecord) -> Result<(), StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO shards (name, region, address, draining, capacity, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&shard.name)
        .bind(&shard.region)
        .bind(&shard.address)
        .bind(shard.draining)
        .bind(i64::from(shard.capacity))
        .bind(shard.created_at_micros)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    async fn set_shard_draining(&self, name: &str, draining: bool) -> Result<bool, StoreError> {
        let updated = sqlx::query("UPDATE shards SET draining = $1 WHERE name = $2")
            .bind(draining)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(updated.rows_affected() > 0)
    }

    async fn delete_shard(&self, name: &str) -> Result<bool, StoreError> {
        // A move under way from or to it keeps it, whichever replica asks.
        let deleted = sqlx::query(
            "DELETE FROM shards WHERE name = $1 AND NOT EXISTS ( \
               SELECT 1 FROM agency_moves \
               WHERE phase IN ('copying', 'releasing', 'cancelling') \
                 AND (from_shard = $1 OR to_shard = $1))",
        )
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn all_shards(&self) -> Result<Vec<ShardRecord>, StoreError> {
        let rows = sqlx::query($crate::store::ALL_SHARDS).fetch_all(&self.pool).await?;
        rows.iter().map($crate::store::shard_from_row).collect()
    }

    async fn insert_grant(&self, grant: &GrantRecord) -> Result<(), StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO access_grants \
             (grant_id, sender_id, recipient_id, kinds, granted_at, granted_by) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&grant.grant_id)
        .bind(&grant.sender_id)
        .bind(&grant.recipient_id)
        .bind($crate::store::kinds_to_text(&grant.kinds)?)
        .bind(grant.granted_at_micros)
        .bind(&grant.granted_by)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    async fn delete_grant(&self, grant_id: &str) -> Result<bool, StoreError> {
        let deleted = sqlx::query("DELETE FROM access_grants WHERE grant_id = $1")
            .bind(grant_id)
            .execute(&self.pool)
            .await?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn all_grants(&self) -> Result<Vec<GrantRecord>, StoreError> {
        let rows = sqlx::query($crate::store::ALL_GRANTS).fetch_all(&self.pool).await?;
        rows.iter().map($crate::store::grant_from_row).collect()
    }

    async fn lease(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        let row = sqlx::query(
            "SELECT holder, token, acquired_at, expires_at FROM leases WHERE name = $1 AND token > 0",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| $crate::store::lease_from_row(&row)).transpose()
    }

    async fn audit_page(
        &self,
        chain: Option<&str>,
        after: Option<(&str, i64)>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let sql = $crate::store::audit_page_query(chain.is_some(), after.is_some(), |n| format!("${n}"));
        let mut query = sqlx::query(&sql);
        if let Some(chain) = chain {
            query = query.bind(chain);
        }
        if let Some((after_chain, after_seq)) = after {
            query = query.bind(after_chain).bind(after_chain).bind(after_seq);
        }
        let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter().map($crate::store::audit_from_row).collect()
    }
        }
    };
}

mod postgres;
mod sqlite;

pub use postgres::PgDirectoryStore;
pub use sqlite::SqliteDirectoryStore;

use std::sync::Arc;

use fedmesh_common::events::{Event, Outbox};
use fedmesh_common::store::Backend;

use fedmesh_common::audit::{AuditEntry, AuditRecord};

use crate::access::GrantRecord;
use crate::agency::AgencyRecord;
use crate::error::StoreError;
use crate::lease::Lease;
use crate::region::ShardRecord;
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

/// A gateway's last report, as the control database keeps it for every
/// replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayInstance {
    /// Stable id of the gateway instance.
    pub gateway_id: String,
    /// Region it serves.
    pub region: String,
    /// URL it is reached at.
    pub address: String,
    /// When it reported, microseconds since the epoch.
    pub last_seen_micros: i64,
    /// Open inbox streams it reported.
    pub open_streams: u32,
    /// Sends in flight it reported.
    pub in_flight: u32,
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

    /// Records a move and marks its agency moving, if the agency is where
    /// the move starts from; false if the agency does not exist,
    /// [`StoreError::Conflict`] if it moved meanwhile or another move of it
    /// is under way.
    async fn begin_move(&self, record: &crate::moves::MoveRecord) -> Result<bool, StoreError>;
    /// One move.
    async fn agency_move(
        &self,
        move_id: &str,
    ) -> Result<Option<crate::moves::MoveRecord>, StoreError>;
    /// The moves the leader still has work on, oldest first.
    async fn moves_under_way(&self) -> Result<Vec<crate::moves::MoveRecord>, StoreError>;
    /// What the last transfer of a move copied, and its last failure.
    async fn record_move_progress(
        &self,
        move_id: &str,
        messages_copied: u64,
        keys_copied: u64,
        last_error: &str,
    ) -> Result<(), StoreError>;
    /// Cuts a copying move over under the leader's `token`: the agency gets
    /// its new home and is no longer moving, with `event`, in one
    /// transaction. None if the move is not copying (cancelled meanwhile);
    /// [`StoreError::Fenced`] when the lease moved on.
    async fn cut_over_move(
        &self,
        token: i64,
        move_id: &str,
        event: Option<Event>,
    ) -> Result<Option<crate::moves::MoveRecord>, StoreError>;
    /// Asks a copying move to be cancelled; returns the move as it is after
    /// (cancelling, or a phase a cancel cannot change), None if unknown.
    async fn cancel_move(
        &self,
        move_id: &str,
    ) -> Result<Option<crate::moves::MoveRecord>, StoreError>;
    /// Ends a releasing move (done) or a cancelling one (cancelled: the
    /// agency is no longer moving) under the leader's `token`. None if the
    /// move was in neither phase.
    async fn finish_move(
        &self,
        token: i64,
        move_id: &str,
    ) -> Result<Option<crate::moves::MoveRecord>, StoreError>;

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

    /// Counts one more change of the directory, for the other replicas;
    /// the count now.
    async fn bump_directory_version(&self) -> Result<i64, StoreError>;
    /// The count of directory changes so far.
    async fn directory_version(&self) -> Result<i64, StoreError>;
    /// Records that a gateway reported (to any replica).
    async fn report_gateway_instance(&self, instance: &GatewayInstance) -> Result<(), StoreError>;
    /// The gateways that reported since `seen_since_micros`, with what they
    /// reported last.
    async fn gateway_instances(
        &self,
        seen_since_micros: i64,
    ) -> Result<Vec<GatewayInstance>, StoreError>;
    /// Records that a notifier reported (to any replica).
    async fn report_notifier_instance(
        &self,
        notifier_id: &str,
        address: &str,
        last_seen_micros: i64,
    ) -> Result<(), StoreError>;
    /// The notifiers that reported since `seen_since_micros`: id, address,
    /// last report.
    async fn notifier_instances(
        &self,
        seen_since_micros: i64,
    ) -> Result<Vec<(String, String, i64)>, StoreError>;
    /// Adds a region; [`StoreError::Conflict`] if it exists.
    async fn insert_region(&self, name: &str, created_at_micros: i64) -> Result<(), StoreError>;
    /// Removes a region and its shards; false if it did not exist.
    async fn delete_region(&self, name: &str) -> Result<bool, StoreError>;
    /// Every region, oldest first.
    async fn all_regions(&self) -> Result<Vec<String>, StoreError>;
    /// Adds a shard; [`StoreError::Conflict`] if the name is taken.
    async fn insert_shard(&self, shard: &ShardRecord) -> Result<(), StoreError>;
    /// Marks a shard draining (or not); false if it does not exist.
    async fn set_shard_draining(&self, name: &str, draining: bool) -> Result<bool, StoreError>;
    /// Deletes a shard, unless a move under way is from or to it; false if
    /// nothing was deleted.
    async fn delete_shard(&self, name: &str) -> Result<bool, StoreError>;
    /// Every shard, oldest first.
    async fn all_shards(&self) -> Result<Vec<ShardRecord>, StoreError>;

    /// Takes or renews the lease `name` for `holder` at `now`: a lease
    /// nobody holds, or that expired, is taken with the next token; the
    /// holder's own is renewed. The lease as it is now, if `holder` holds it.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now_micros: i64,
        duration_micros: i64,
    ) -> Result<Option<Lease>, StoreError>;
    /// The lease `name`, if anyone ever held it.
    async fn lease(&self, name: &str) -> Result<Option<Lease>, StoreError>;
    /// Marks a gateway down, or up again after down, and writes its event,
    /// under the leader lease's `token`: refused ([`StoreError::Fenced`])
    /// when the lease has another token now. Whether it was a change (a
    /// gateway never marked down is up already).
    async fn set_gateway_state(
        &self,
        token: i64,
        gateway_id: &str,
        region: &str,
        up: bool,
        event: Option<Event>,
    ) -> Result<bool, StoreError>;

    /// Inserts an access grant; [`StoreError::Conflict`] if a grant of the
    /// same sender, recipient and kinds exists.
    async fn insert_grant(&self, grant: &GrantRecord) -> Result<(), StoreError>;
    /// Deletes a grant; false if it did not exist.
    async fn delete_grant(&self, grant_id: &str) -> Result<bool, StoreError>;
    /// Every grant.
    async fn all_grants(&self) -> Result<Vec<GrantRecord>, StoreError>;

    /// Appends `record` to its chain of the audit log, after the chain's
    /// last row (appends to one chain are serialized).
    async fn append_audit(
        &self,
        record: &AuditRecord,
        at_micros: i64,
    ) -> Result<AuditEntry, StoreError>;
    /// Up to `limit` rows in chain then seq order, of `chain` only if
    /// given, after the row `after` (chain, seq) if given.
    async fn audit_page(
        &self,
        chain: Option<&str>,
        after: Option<(&str, i64)>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError>;

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

/// An `agencies` row, on either backend.
fn agency_from_row<R>(row: &R) -> Result<AgencyRecord, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(AgencyRecord {
        agency_id: row.try_get("agency_id")?,
        region: row.try_get("region")?,
        shard: row.try_get("shard")?,
        display_name: row.try_get("display_name")?,
        registered_at_micros: row.try_get("registered_at")?,
        moving: row.try_get("moving")?,
        version: {
            let version: i64 = row.try_get("version")?;
            u64::try_from(version)
                .map_err(|_| StoreError::Corrupt(format!("negative agency version {version}")))?
        },
    })
}

/// The columns of `agency_moves`, in the order `begin_move` binds them.
const MOVE_COLUMNS: &str = "move_id, agency_id, from_region, from_shard, to_region, to_shard, \
     phase, messages_copied, keys_copied, last_error, started_at, updated_at";

/// An `agency_moves` row, on either backend.
fn move_from_row<R>(row: &R) -> Result<crate::moves::MoveRecord, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let phase: String = row.try_get("phase")?;
    let count = |column: &str| -> Result<u64, StoreError> {
        let value: i64 = row.try_get(column)?;
        u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative {column} {value}")))
    };
    Ok(crate::moves::MoveRecord {
        move_id: row.try_get("move_id")?,
        agency_id: row.try_get("agency_id")?,
        from_region: row.try_get("from_region")?,
        from_shard: row.try_get("from_shard")?,
        to_region: row.try_get("to_region")?,
        to_shard: row.try_get("to_shard")?,
        phase: crate::moves::MovePhase::parse(&phase)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown move phase {phase:?}")))?,
        messages_copied: count("messages_copied")?,
        keys_copied: count("keys_copied")?,
        last_error: row.try_get("last_error")?,
        started_at_micros: row.try_get("started_at")?,
        updated_at_micros: row.try_get("updated_at")?,
    })
}

/// A `leases` row, on either backend.
fn lease_from_row<R>(row: &R) -> Result<Lease, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Lease {
        holder: row.try_get("holder")?,
        token: row.try_get("token")?,
        acquired_at_micros: row.try_get("acquired_at")?,
        expires_at_micros: row.try_get("expires_at")?,
    })
}

/// What a lease becomes when `holder` asks for it at `now`, given what it
/// is (`current`): None when someone else holds it still.
fn next_lease(
    current: Option<Lease>,
    holder: &str,
    now_micros: i64,
    duration_micros: i64,
) -> Option<Lease> {
    let expires_at_micros = now_micros.saturating_add(duration_micros);
    match current {
        None => Some(Lease {
            holder: holder.to_string(),
            token: 1,
            acquired_at_micros: now_micros,
            expires_at_micros,
        }),
        Some(lease) if lease.holder == holder && lease.expires_at_micros >= now_micros => {
            Some(Lease {
                expires_at_micros,
                ..lease
            })
        }
        Some(lease) if lease.expires_at_micros < now_micros => Some(Lease {
            holder: holder.to_string(),
            token: lease.token + 1,
            acquired_at_micros: now_micros,
            expires_at_micros,
        }),
        Some(_) => None,
    }
}

/// Every shard, on either backend.
const ALL_SHARDS: &str = "SELECT name, region, address, draining, capacity, created_at \
     FROM shards ORDER BY created_at, name";

/// A `shards` row, on either backend.
fn shard_from_row<R>(row: &R) -> Result<ShardRecord, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let capacity: i64 = row.try_get("capacity")?;
    Ok(ShardRecord {
        name: row.try_get("name")?,
        region: row.try_get("region")?,
        address: row.try_get("address")?,
        draining: row.try_get("draining")?,
        capacity: u32::try_from(capacity).map_err(StoreError::corrupt)?,
        created_at_micros: row.try_get("created_at")?,
    })
}

/// Every grant, on either backend.
const ALL_GRANTS: &str = "SELECT grant_id, sender_id, recipient_id, kinds, granted_at, granted_by \
     FROM access_grants ORDER BY recipient_id, sender_id, grant_id";

/// An `access_grants` row as a grant, on either backend.
fn grant_from_row<R>(row: &R) -> Result<GrantRecord, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let kinds: String = row.try_get("kinds")?;
    Ok(GrantRecord {
        grant_id: row.try_get("grant_id")?,
        sender_id: row.try_get("sender_id")?,
        recipient_id: row.try_get("recipient_id")?,
        kinds: serde_json::from_str(&kinds).map_err(StoreError::corrupt)?,
        granted_at_micros: row.try_get("granted_at")?,
        granted_by: row.try_get("granted_by")?,
    })
}

/// A grant's kinds as stored: a JSON array.
fn kinds_to_text(kinds: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(kinds).map_err(StoreError::corrupt)
}

/// The columns of an audit row, in the order `audit_from_row` reads.
const AUDIT_COLUMNS: &str =
    "chain, seq, at, actor, action, target, outcome, detail, prev_hash, hash";

/// An `audit_log` row, on either backend.
fn audit_from_row<R>(row: &R) -> Result<AuditEntry, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(AuditEntry {
        record: AuditRecord {
            chain: row.try_get("chain")?,
            actor: row.try_get("actor")?,
            action: row.try_get("action")?,
            target: row.try_get("target")?,
            outcome: row.try_get("outcome")?,
            detail: row.try_get("detail")?,
        },
        seq: row.try_get("seq")?,
        at_micros: row.try_get("at")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

/// The `WHERE` clause of an audit page, with placeholders made by
/// `placeholder(n)` for the chain, then the after-chain and after-seq.
fn audit_page_query(chain: bool, after: bool, placeholder: impl Fn(usize) -> String) -> String {
    let mut conditions = Vec::new();
    let mut n = 0;
    let mut next = || {
        n += 1;
        placeholder(n)
    };
    if chain {
        conditions.push(format!("chain = {}", next()));
    }
    if after {
        let (after_chain, after_chain_again, after_seq) = (next(), next(), next());
        conditions.push(format!(
            "(chain > {after_chain} OR (chain = {after_chain_again} AND seq > {after_seq}))"
        ));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    format!(
        "SELECT {AUDIT_COLUMNS} FROM audit_log {filter} ORDER BY chain, seq LIMIT {}",
        next()
    )
}

#[cfg(test)]
mod tests;
