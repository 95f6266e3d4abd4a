//! DOMAIN: the directory of agencies, regions, shards and gateways, and the
//! versioned topology published from it.
//!
//! [`Directory`] validates and applies changes: the control database first
//! (with the event in the same transaction), then the in-memory
//! [`TopologyState`], which numbers the change and broadcasts it to watchers.
//! No tonic or sqlx types appear here: the store is reached through its trait.

mod moves;
mod state;
mod subscriptions;

pub use state::{GatewayRecord, NotifierRecord, TopologyState, WatchStart};
pub(crate) use state::{agency_to_pb, grant_to_pb, shard_to_pb};
pub use subscriptions::NewSubscription;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use fedmesh_common::events::{AGENCY_DEREGISTERED, AGENCY_REGISTERED, DurableQueues, Event};
use fedmesh_common::validate;

use fedmesh_common::audit::{AuditEntry, AuditRecord};
use fedmesh_common::identity::Identity;

use crate::access::GrantRecord;
use crate::agency::AgencyRecord;
use crate::config::RegionConfig;
use crate::error::{DirectoryError, StoreError};
use crate::region::ShardRecord;
use crate::store::DirectoryStore;
use fedmesh_proto::pb as pb_region;

/// The directory: store plus published topology.
pub struct Directory {
    store: Arc<dyn DirectoryStore>,
    state: Mutex<TopologyState>,
    /// Notified after every commit that wrote an event; None: events are off.
    outbox_wake: Option<Arc<tokio::sync::Notify>>,
    /// The queues of durable subscriptions on the bus; None: no bus.
    queues: Option<Arc<dyn DurableQueues>>,
    /// The durable subscriptions, as stored, by name.
    subscriptions: tokio::sync::Mutex<BTreeMap<String, crate::subscription::SubscriptionRecord>>,
    /// The directory version this replica is in step with; held across a
    /// change (store, then topology) and across a reload, so neither sees
    /// the other half done.
    synced: tokio::sync::Mutex<i64>,
    /// Wakes the leader's move driver.
    moves_wake: tokio::sync::Notify,
}

/// The regions (with their shard names) and the shards, as stored.
async fn regions_and_shards(
    store: &dyn DirectoryStore,
) -> Result<(Vec<RegionConfig>, Vec<ShardRecord>), StoreError> {
    let shards = store.all_shards().await?;
    let regions = store
        .all_regions()
        .await?
        .into_iter()
        .map(|name| RegionConfig {
            shards: shards
                .iter()
                .filter(|shard| shard.region == name)
                .map(|shard| shard.name.clone())
                .collect(),
            name,
        })
        .collect();
    Ok((regions, shards))
}

impl Directory {
    /// Loads the agencies from `store` and starts the topology at a version
    /// above any a previous run of this coordinator handed out.
    /// `outbox_wake` is notified after every commit that wrote an event;
    /// without it events are off and none is written. `queues` keep the
    /// events of durable subscriptions; without them there are none.
    pub async fn load(
        store: Arc<dyn DirectoryStore>,
        regions: Vec<RegionConfig>,
        outbox_wake: Option<Arc<tokio::sync::Notify>>,
        queues: Option<Arc<dyn DurableQueues>>,
    ) -> Result<Self, StoreError> {
        // The --region flags seed regions and shards the database does not
        // have yet; what it has stays (operators change it at run time).
        let seeded_at = fedmesh_common::time::now_micros();
        let mut order = 0;
        for region in &regions {
            order += 1;
            match store.insert_region(&region.name, seeded_at + order).await {
                Ok(()) | Err(StoreError::Conflict) => {}
                Err(error) => return Err(error),
            }
            for shard in &region.shards {
                order += 1;
                let record = ShardRecord::seeded(shard, &region.name, seeded_at + order);
                match store.insert_shard(&record).await {
                    Ok(()) | Err(StoreError::Conflict) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        let (regions, shards) = regions_and_shards(store.as_ref()).await?;
        let version = store.directory_version().await?;
        let agencies = store.all_agencies().await?;
        let subscriptions = store
            .all_subscriptions()
            .await?
            .into_iter()
            .map(|subscription| (subscription.name.clone(), subscription))
            .collect();
        let initial_version = u64::try_from(fedmesh_common::time::now_micros()).unwrap_or(1);
        let mut state = TopologyState::new(regions, agencies, initial_version);
        state.load_grants(store.all_grants().await?);
        state.load_shards(shards);
        Ok(Directory {
            store,
            state: Mutex::new(state),
            outbox_wake,
            queues,
            subscriptions: tokio::sync::Mutex::new(subscriptions),
            synced: tokio::sync::Mutex::new(version),
            moves_wake: tokio::sync::Notify::new(),
        })
    }

    /// Says a change was made through this replica, for the others; holds
    /// the sync lock the caller took for the change.
    async fn changed(&self, synced: &mut i64) {
        match self.store.bump_directory_version().await {
            // Nothing else changed meanwhile: no need to reload.
            Ok(version) if version == *synced + 1 => *synced = version,
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot count a directory change; other coordinator replicas see it at their next full reload");
            }
        }
    }

    /// Reloads the directory from the control database if another replica
    /// changed it since, publishing the differences to this replica's
    /// watchers; and adds the gateways that report to other replicas.
    pub async fn sync_from_store(
        &self,
        gateway_expiry: std::time::Duration,
    ) -> Result<(), StoreError> {
        {
            let mut synced = self.synced.lock().await;
            let version = self.store.directory_version().await?;
            if version != *synced {
                let (regions, shards) = regions_and_shards(self.store.as_ref()).await?;
                let agencies = self.store.all_agencies().await?;
                let grants = self.store.all_grants().await?;
                let subscriptions = self.store.all_subscriptions().await?;
                self.state().reconcile(agencies, grants, regions, shards);
                *self.subscriptions.lock().await = subscriptions
                    .into_iter()
                    .map(|subscription| (subscription.name.clone(), subscription))
                    .collect();
                tracing::debug!(version, "directory reloaded: another replica changed it");
                *synced = version;
            }
        }
        let expiry = i64::try_from(gateway_expiry.as_micros()).unwrap_or(i64::MAX);
        let since = fedmesh_common::time::now_micros().saturating_sub(expiry);
        let gateways = self.store.gateway_instances(since).await?;
        let notifiers = self.store.notifier_instances(since).await?;
        let mut state = self.state();
        state.reconcile_gateways(gateways);
        state.reconcile_notifiers(notifiers);
        Ok(())
    }

    /// The control database.
    pub fn store(&self) -> &Arc<dyn DirectoryStore> {
        &self.store
    }

    /// Whether events are on (an event bus is configured).
    pub fn events_on(&self) -> bool {
        self.outbox_wake.is_some()
    }

    /// Tells the outbox relay an event was written.
    pub fn wake_outbox(&self) {
        if let Some(wake) = &self.outbox_wake {
            wake.notify_one();
        }
    }

    /// The topology state; held only briefly, never across an await.
    pub fn state(&self) -> MutexGuard<'_, TopologyState> {
        // A panic while holding the lock leaves the state as consistent as
        // any single-field update, so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers `agency_id` in `region` on the region's least-loaded shard,
    /// as `actor` asked.
    pub async fn register_agency(
        &self,
        actor: &Identity,
        agency_id: &str,
        region: &str,
        display_name: &str,
        shard: &str,
    ) -> Result<AgencyRecord, DirectoryError> {
        let mut synced = self.synced.lock().await;
        validate::agency_id("agency_id", agency_id)?;
        validate::region("region", region)?;
        if display_name.chars().count() > 200 {
            return Err(fedmesh_common::error::InvalidField::new(
                "display_name",
                "display name must be at most 200 characters",
            )
            .into());
        }
        let shard = {
            let state = self.state();
            if !state.has_region(region) {
                return Err(DirectoryError::RegionNotFound {
                    region: region.to_string(),
                    known: state.region_names().join(", "),
                });
            }
            if shard.is_empty() {
                state.pick_shard(region).ok_or_else(|| {
                    DirectoryError::NoShardFor(format!(
                        "no shard of region {region} takes new agencies"
                    ))
                })?
            } else {
                let named = state
                    .shard(shard)
                    .filter(|named| named.region == region)
                    .ok_or_else(|| {
                        DirectoryError::ShardNotFound(format!("{shard} (in {region})"))
                    })?;
                if !state.takes_agencies(named) {
                    return Err(DirectoryError::NoShardFor(format!(
                        "shard {shard} is draining or full"
                    )));
                }
                shard.to_string()
            }
        };
        let record = AgencyRecord {
            agency_id: agency_id.to_string(),
            region: region.to_string(),
            shard,
            display_name: display_name.to_string(),
            registered_at_micros: fedmesh_common::time::now_micros(),
            moving: false,
            version: 1,
        };
        let event = self.outbox_wake.as_ref().map(|_| {
            Event::new(AGENCY_REGISTERED, region, agency_id).with_attribute("shard", &record.shard)
        });
        match self.store.insert_agency(&record, event).await {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                return Err(DirectoryError::AgencyExists(agency_id.to_string()));
            }
            Err(error) => return Err(error.into()),
        }
        self.wake_outbox();
        self.state().upsert_agency(record.clone());
        tracing::info!(agency_id, region, shard = %record.shard, "agency registered");
        self.audit(AuditRecord {
            chain: region.to_string(),
            actor: actor.to_string(),
            action: "register".into(),
            target: format!("agency/{agency_id}"),
            outcome: "ok".into(),
            detail: format!("shard {}", record.shard),
        })
        .await;
        self.changed(&mut synced).await;
        Ok(record)
    }

    /// One agency.
    pub fn get_agency(&self, agency_id: &str) -> Result<AgencyRecord, DirectoryError> {
        validate::agency_id("agency_id", agency_id)?;
        self.state()
            .agency(agency_id)
            .cloned()
            .ok_or_else(|| DirectoryError::AgencyNotFound(agency_id.to_string()))
    }

    /// Removes an agency, as `actor` asked.
    pub async fn deregister_agency(
        &self,
        actor: &Identity,
        agency_id: &str,
    ) -> Result<(), DirectoryError> {
        let mut synced = self.synced.lock().await;
        let record = self.get_agency(agency_id)?;
        if record.moving {
            return Err(DirectoryError::CannotMove(format!(
                "agency {agency_id} is being moved; wait for the move to end or cancel it (`fedmesh agency move {agency_id} --cancel MOVE_ID`), then deregister it"
            )));
        }
        let event = self
            .outbox_wake
            .as_ref()
            .map(|_| Event::new(AGENCY_DEREGISTERED, &record.region, agency_id));
        if !self.store.delete_agency(agency_id, event).await? {
            return Err(DirectoryError::AgencyNotFound(agency_id.to_string()));
        }
        self.wake_outbox();
        self.state().remove_agency(agency_id);
        tracing::info!(agency_id, "agency deregistered");
        self.audit(AuditRecord {
            chain: record.region.clone(),
            actor: actor.to_string(),
            action: "deregister".into(),
            target: format!("agency/{agency_id}"),
            outcome: "ok".into(),
            detail: String::new(),
        })
        .await;
        self.changed(&mut synced).await;
        Ok(())
    }

    /// Adds a region (without shards yet).
    pub async fn add_region(
        &self,
        actor: &Identity,
        name: &str,
    ) -> Result<pb_region::Region, DirectoryError> {
        let mut synced = self.synced.lock().await;
        validate::region("name", name)?;
        match self
            .store
            .insert_region(name, fedmesh_common::time::now_micros())
            .await
        {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                return Err(DirectoryError::RegionExists(name.to_string()));
            }
            Err(error) => return Err(error.into()),
        }
        self.state().add_region(name);
        tracing::info!(region = name, "region added");
        self.audit_change(
            actor,
            name,
            "region-add",
            &format!("region/{name}"),
            String::new(),
        )
        .await;
        self.changed(&mut synced).await;
        Ok(pb_region::Region {
            name: name.to_string(),
            shards: Vec::new(),
        })
    }

    /// Removes a region without agencies, and its shards.
    pub async fn remove_region(&self, actor: &Identity, name: &str) -> Result<(), DirectoryError> {
        let mut synced = self.synced.lock().await;
        validate::region("name", name)?;
        {
            let state = self.state();
            if !state.has_region(name) {
                return Err(DirectoryError::RegionNotFound {
                    region: name.to_string(),
                    known: state.region_names().join(", "),
                });
            }
            let count = state
                .agency_counts()
                .into_iter()
                .find(|(region, _)| region == name)
                .map_or(0, |(_, count)| count);
            if count > 0 {
                return Err(DirectoryError::HoldsAgencies {
                    what: format!("region {name}"),
                    count,
                });
            }
        }
        self.store.delete_region(name).await?;
        self.state().remove_region(name);
        tracing::info!(region = name, "region removed");
        self.audit_change(
            actor,
            name,
            "region-remove",
            &format!("region/{name}"),
            String::new(),
        )
        .await;
        self.changed(&mut synced).await;
        Ok(())
    }

    /// Adds a shard to a region.
    pub async fn add_shard(
        &self,
        actor: &Identity,
        shard: ShardRecord,
    ) -> Result<ShardRecord, DirectoryError> {
        let mut synced = self.synced.lock().await;
        validate::agency_id("name", &shard.name).map_err(|invalid| {
            fedmesh_common::error::InvalidField::new(
                "name",
                invalid.description.replace("agency id", "shard name"),
            )
        })?;
        validate::region("region", &shard.region)?;
        if shard.address.len() > 512 || shard.address.contains('@') {
            return Err(fedmesh_common::error::InvalidField::new(
                "address",
                "an address is at most 512 characters, host and database, without credentials",
            )
            .into());
        }
        {
            let state = self.state();
            if !state.has_region(&shard.region) {
                return Err(DirectoryError::RegionNotFound {
                    region: shard.region.clone(),
                    known: state.region_names().join(", "),
                });
            }
        }
        match self.store.insert_shard(&shard).await {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                return Err(DirectoryError::ShardExists(shard.name.clone()));
            }
            Err(error) => return Err(error.into()),
        }
        self.state().upsert_shard(shard.clone());
        tracing::info!(shard = %shard.name, region = %shard.region, "shard added");
        let detail = format!("capacity {}", shard.capacity);
        self.audit_change(
            actor,
            &shard.region,
            "shard-add",
            &format!("shard/{}", shard.name),
            detail,
        )
        .await;
        self.changed(&mut synced).await;
        Ok(shard)
    }

    /// Stops placing agencies on a shard.
    pub async fn drain_shard(
        &self,
        actor: &Identity,
        name: &str,
    ) -> Result<ShardRecord, DirectoryError> {
        let mut synced = self.synced.lock().await;
        let Some(mut shard) = self.state().shard(name).cloned() else {
            return Err(DirectoryError::ShardNotFound(name.to_string()));
        };
        if !self.store.set_shard_draining(name, true).await? {
            return Err(DirectoryError::ShardNotFound(name.to_string()));
        }
        shard.draining = true;
        self.state().upsert_shard(shard.clone());
        tracing::info!(shard = name, "shard draining: it takes no new agencies");
        self.audit_change(
            actor,
            &shard.region,
            "shard-drain",
            &format!("shard/{name}"),
            String::new(),
        )
        .await;
        self.changed(&mut synced).await;
        Ok(shard)
    }

    /// Removes a shard without agencies.
    pub async fn remove_shard(&self, actor: &Identity, name: &str) -> Result<(), DirectoryError> {
        let mut synced = self.synced.lock().await;
        let (shard, count) = {
            let state = self.state();
            let Some(shard) = state.shard(name).cloned() else {
                return Err(DirectoryError::ShardNotFound(name.to_string()));
            };
            let count = state.agencies_on(name);
            (shard, count)
        };
        if count > 0 {
            return Err(DirectoryError::HoldsAgencies {
                what: format!("shard {name}"),
                count,
            });
        }
        if !self.store.delete_shard(name).await?
            && self
                .store
                .moves_under_way()
                .await?
                .iter()
                .any(|under_way| under_way.from_shard == name || under_way.to_shard == name)
        {
            return Err(DirectoryError::CannotMove(format!(
                "shard {name} is the source or target of a move under way (`fedmesh status` lists it): wait for the move to end or cancel it, then remove the shard"
            )));
        }
        self.state().remove_shard(name);
        tracing::info!(shard = name, "shard removed");
        self.audit_change(
            actor,
            &shard.region,
            "shard-remove",
            &format!("shard/{name}"),
            String::new(),
        )
        .await;
        self.changed(&mut synced).await;
        Ok(())
    }

    async fn audit_change(
        &self,
        actor: &Identity,
        chain: &str,
        action: &str,
        target: &str,
        detail: String,
    ) {
        self.audit(AuditRecord {
            chain: chain.to_string(),
            actor: actor.to_string(),
            action: action.into(),
            target: target.to_string(),
            outcome: "ok".into(),
            detail,
        })
        .await;
    }

    /// Appends `record` to the audit log; a failure is logged (the action
    /// it records is done).
    pub async fn audit(&self, record: AuditRecord) {
        let at = fedmesh_common::time::now_micros();
        if let Err(error) = self.store.append_audit(&record, at).await {
            tracing::error!(%error, chain = %record.chain, action = %record.action, target = %record.target, "cannot append to the audit log");
        }
    }

    /// Records what a gateway or notifier refused or did: a gateway only in
    /// its region's chain, a notifier only in the global chain.
    pub async fn record_audit(
        &self,
        caller: &Identity,
        records: Vec<AuditRecord>,
    ) -> Result<(), DirectoryError> {
        const MAX_RECORDS: usize = 1000;
        if records.len() > MAX_RECORDS {
            return Err(fedmesh_common::error::InvalidField::new(
                "records",
                format!(
                    "{} records given, at most {MAX_RECORDS} per call",
                    records.len()
                ),
            )
            .into());
        }
        let own_chain = match caller {
            Identity::Gateway(region) => region.clone(),
            _ => fedmesh_common::audit::GLOBAL_CHAIN.to_string(),
        };
        let oversized = records.iter().find(|record| {
            [
                &record.actor,
                &record.action,
                &record.target,
                &record.outcome,
                &record.detail,
            ]
            .iter()
            .any(|field| field.len() > fedmesh_common::audit::MAX_FIELD_BYTES)
        });
        if oversized.is_some() {
            return Err(fedmesh_common::error::InvalidField::new(
                "records",
                format!(
                    "a record's field is over {} bytes",
                    fedmesh_common::audit::MAX_FIELD_BYTES
                ),
            )
            .into());
        }
        if let Some(other) = records.iter().find(|record| record.chain != own_chain) {
            return Err(DirectoryError::PermissionDenied(format!(
                "{caller} records only in the audit chain {own_chain:?}, not {:?}",
                other.chain
            )));
        }
        for record in records {
            self.audit(record).await;
        }
        Ok(())
    }

    /// A page of the audit log (see `DirectoryStore::audit_page`).
    pub async fn audit_page(
        &self,
        chain: Option<&str>,
        after: Option<(&str, i64)>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, DirectoryError> {
        Ok(self.store.audit_page(chain, after, limit).await?)
    }

    /// The chain of audit rows about an agency: its home region's if it is
    /// registered, else the global one.
    fn chain_of_agency(&self, agency_id: &str) -> String {
        self.state()
            .agency(agency_id)
            .map_or(fedmesh_common::audit::GLOBAL_CHAIN.to_string(), |agency| {
                agency.region.clone()
            })
    }

    /// Allows `sender_id` (empty: any agency) to send `recipient_id`
    /// messages of `kinds` (empty: any kind); a grant that allows that
    /// already is returned instead of a new one.
    pub async fn grant_access(
        &self,
        actor: &Identity,
        sender_id: &str,
        recipient_id: &str,
        mut kinds: Vec<String>,
    ) -> Result<GrantRecord, DirectoryError> {
        let mut synced = self.synced.lock().await;
        if !sender_id.is_empty() {
            validate::agency_id("sender_id", sender_id)?;
        }
        validate::agency_id("recipient_id", recipient_id)?;
        for kind in &kinds {
            validate::kind("kinds", kind)?;
        }
        kinds.sort();
        kinds.dedup();
        let existing = self
            .state()
            .grants()
            .find(|grant| grant.covers(sender_id, recipient_id, &kinds))
            .cloned();
        if let Some(existing) = existing {
            return Ok(existing);
        }
        let grant = GrantRecord {
            grant_id: uuid::Uuid::now_v7().to_string(),
            sender_id: sender_id.to_string(),
            recipient_id: recipient_id.to_string(),
            kinds,
            granted_at_micros: fedmesh_common::time::now_micros(),
            granted_by: actor.to_string(),
        };
        match self.store.insert_grant(&grant).await {
            Ok(()) => {}
            // The same right granted at the same instant: that grant.
            Err(StoreError::Conflict) => {
                let stored = self.store.all_grants().await?.into_iter().find(|stored| {
                    stored.sender_id == grant.sender_id
                        && stored.recipient_id == grant.recipient_id
                        && stored.kinds == grant.kinds
                });
                if let Some(stored) = stored {
                    return Ok(stored);
                }
                return Err(StoreError::Conflict.into());
            }
            Err(error) => return Err(error.into()),
        }
        self.state().add_grant(grant.clone());
        tracing::info!(grant_id = %grant.grant_id, sender = %grant.sender_id, recipient = %grant.recipient_id, kinds = ?grant.kinds, "access granted");
        self.audit(AuditRecord {
            chain: self.chain_of_agency(recipient_id),
            actor: actor.to_string(),
            action: "grant".into(),
            target: format!("grant/{}", grant.grant_id),
            outcome: "ok".into(),
            detail: grant_detail(&grant),
        })
        .await;
        self.changed(&mut synced).await;
        Ok(grant)
    }

    /// Withdraws the grant `grant_id`.
    pub async fn revoke_access(
        &self,
        actor: &Identity,
        grant_id: &str,
    ) -> Result<GrantRecord, DirectoryError> {
        let mut synced = self.synced.lock().await;
        if uuid::Uuid::parse_str(grant_id).is_err() {
            return Err(fedmesh_common::error::InvalidField::new(
                "grant_id",
                format!("{grant_id:?} is not a grant id (a UUID, as `fedmesh access list` prints)"),
            )
            .into());
        }
        if !self.store.delete_grant(grant_id).await? {
            return Err(DirectoryError::GrantNotFound(grant_id.to_string()));
        }
        let Some(grant) = self.state().remove_grant(grant_id) else {
            return Err(DirectoryError::GrantNotFound(grant_id.to_string()));
        };
        tracing::info!(grant_id, "access revoked");
        self.audit(AuditRecord {
            chain: self.chain_of_agency(&grant.recipient_id),
            actor: actor.to_string(),
            action: "revoke".into(),
            target: format!("grant/{grant_id}"),
            outcome: "ok".into(),
            detail: grant_detail(&grant),
        })
        .await;
        self.changed(&mut synced).await;
        Ok(grant)
    }

    /// The grants of `sender_id` (with those to any agency) and to
    /// `recipient_id`, each filter only if given.
    pub fn list_access(&self, sender_id: &str, recipient_id: &str) -> Vec<GrantRecord> {
        let mut grants: Vec<GrantRecord> = self
            .state()
            .grants()
            .filter(|grant| {
                (sender_id.is_empty() || grant.sender_id.is_empty() || grant.sender_id == sender_id)
                    && (recipient_id.is_empty() || grant.recipient_id == recipient_id)
            })
            .cloned()
            .collect();
        grants.sort_by(|a, b| {
            (&a.recipient_id, &a.sender_id, &a.grant_id).cmp(&(
                &b.recipient_id,
                &b.sender_id,
                &b.grant_id,
            ))
        });
        grants
    }
}

/// What a grant allows, for the audit log.
fn grant_detail(grant: &GrantRecord) -> String {
    let sender = if grant.sender_id.is_empty() {
        "any agency"
    } else {
        grant.sender_id.as_str()
    };
    let kinds = if grant.kinds.is_empty() {
        "any kind".to_string()
    } else {
        grant.kinds.join(",")
    };
    format!("{sender} -> {}: {kinds}", grant.recipient_id)
}
