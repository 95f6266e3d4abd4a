//! DOMAIN: the directory of agencies, regions, shards and gateways, and the
//! versioned topology published from it.
//!
//! [`Directory`] validates and applies changes: the control database first
//! (with the event in the same transaction), then the in-memory
//! [`TopologyState`], which numbers the change and broadcasts it to watchers.
//! No tonic or sqlx types appear here: the store is reached through its trait.

mod state;
mod subscriptions;

pub(crate) use state::agency_to_pb;
pub use state::{GatewayRecord, NotifierRecord, TopologyState, WatchStart};
pub use subscriptions::NewSubscription;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use fedmesh_common::events::{AGENCY_DEREGISTERED, AGENCY_REGISTERED, DurableQueues, Event};
use fedmesh_common::validate;

use crate::agency::AgencyRecord;
use crate::config::RegionConfig;
use crate::error::{DirectoryError, StoreError};
use crate::store::DirectoryStore;

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
        let agencies = store.all_agencies().await?;
        let subscriptions = store
            .all_subscriptions()
            .await?
            .into_iter()
            .map(|subscription| (subscription.name.clone(), subscription))
            .collect();
        let initial_version = u64::try_from(fedmesh_common::time::now_micros()).unwrap_or(1);
        Ok(Directory {
            store,
            state: Mutex::new(TopologyState::new(regions, agencies, initial_version)),
            outbox_wake,
            queues,
            subscriptions: tokio::sync::Mutex::new(subscriptions),
        })
    }

    fn wake_outbox(&self) {
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

    /// Registers `agency_id` in `region` on the region's least-loaded shard.
    pub async fn register_agency(
        &self,
        agency_id: &str,
        region: &str,
        display_name: &str,
    ) -> Result<AgencyRecord, DirectoryError> {
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
            state
                .pick_shard(region)
                .ok_or_else(|| DirectoryError::RegionNotFound {
                    region: region.to_string(),
                    known: state.region_names().join(", "),
                })?
        };
        let record = AgencyRecord {
            agency_id: agency_id.to_string(),
            region: region.to_string(),
            shard,
            display_name: display_name.to_string(),
            registered_at_micros: fedmesh_common::time::now_micros(),
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

    /// Removes an agency.
    pub async fn deregister_agency(&self, agency_id: &str) -> Result<(), DirectoryError> {
        let record = self.get_agency(agency_id)?;
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
        Ok(())
    }
}
