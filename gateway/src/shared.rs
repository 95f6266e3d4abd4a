//! What every handler and task of one gateway shares: its configuration,
//! topology, shards and upstream connections, and the steps of the send path
//! that several services take (where an agency lives, storing locally).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use fedmesh_common::identity::Identity;
use fedmesh_common::topology::{AccessPolicy, AgencyHome, Topology};
use fedmesh_proto::pb;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::committer::{self, Committer};
use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::inbox::InboxHub;
use crate::message::{
    Claimed, Fingerprint, InboxStats, KeyClaim, KeyInUse, Message, Receipt, Refused, SpoolDepth,
    ToStore,
};
use crate::store::{MessageStore, SpoolPair};
use crate::upstream::Upstream;

/// One shard as the gateway uses it.
pub(crate) struct Shard {
    pub(crate) store: Arc<dyn MessageStore>,
    pub(crate) committer: Committer,
    pub(crate) outbox_wake: Arc<Notify>,
    /// Wakes the shard's spool drainers: a message was spooled.
    pub(crate) spool_wake: Arc<Notify>,
}

/// What every handler and task of one gateway shares.
pub(crate) struct Shared {
    pub(crate) config: GatewayConfig,
    /// The region served, from the validated configuration.
    pub(crate) region: String,
    /// This replica's id.
    pub(crate) gateway_id: String,
    pub(crate) topology: watch::Receiver<Arc<Topology>>,
    pub(crate) shards: HashMap<String, Shard>,
    pub(crate) hub: Arc<InboxHub>,
    pub(crate) upstream: Upstream,
    pub(crate) shutdown: CancellationToken,
    in_flight: AtomicU32,
    /// What the spool of each shard held when its drainer last looked.
    spool_depths: Mutex<BTreeMap<String, Vec<SpoolDepth>>>,
}

/// Counts a send in flight while alive.
pub(crate) struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// Refuses a message no access grant allows, when the access policy is
    /// closed.
    pub(crate) fn check_access(
        &self,
        sender_id: &str,
        recipient_id: &str,
        kind: &str,
    ) -> Result<(), GatewayError> {
        if self.config.access_policy() == AccessPolicy::Open
            || self
                .topology
                .borrow()
                .grants_access(sender_id, recipient_id, kind)
        {
            return Ok(());
        }
        Err(GatewayError::PermissionDenied(format!(
            "no access grant lets {sender_id} send {recipient_id} messages of kind {kind}; an operator grants it with `fedmesh access grant --from {sender_id} --to {recipient_id} --kind {kind}`"
        )))
    }

    /// The state of a gateway about to serve.
    pub(crate) fn new(
        config: GatewayConfig,
        topology: watch::Receiver<Arc<Topology>>,
        shards: HashMap<String, Shard>,
        hub: Arc<InboxHub>,
        upstream: Upstream,
        shutdown: CancellationToken,
    ) -> Self {
        Shared {
            region: config.region().to_string(),
            gateway_id: config.gateway_id(),
            config,
            topology,
            shards,
            hub,
            upstream,
            shutdown,
            in_flight: AtomicU32::new(0),
            spool_depths: Mutex::default(),
        }
    }

    /// Sends being processed now.
    pub(crate) fn sends_in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Refuses payloads over the limit.
    pub(crate) fn check_payload(&self, size: usize) -> Result<(), GatewayError> {
        let limit = self.config.max_payload_bytes;
        if size > limit {
            return Err(GatewayError::PayloadTooLarge { size, limit });
        }
        Ok(())
    }

    /// Where `agency_id` lives: from the topology, or from the coordinator
    /// for an agency registered after the last topology update.
    pub(crate) async fn home_of(&self, agency_id: &str) -> Result<AgencyHome, GatewayError> {
        let known = self.topology.borrow().agencies.get(agency_id).cloned();
        match known {
            Some(home) => Ok(home),
            None => self.upstream.lookup(agency_id).await,
        }
    }

    /// The home of `agency_id`, which must be this gateway's region.
    pub(crate) async fn require_homed_here(
        &self,
        agency_id: &str,
    ) -> Result<AgencyHome, GatewayError> {
        let home = self.home_of(agency_id).await?;
        if home.region != self.region {
            return Err(GatewayError::WrongRegion {
                agency_id: agency_id.to_string(),
                home_region: home.region,
                region: self.region.clone(),
            });
        }
        Ok(home)
    }

    /// The shard named `name`, if this gateway serves it.
    pub(crate) fn shard(&self, name: &str) -> Result<&Shard, GatewayError> {
        self.shards
            .get(name)
            .ok_or_else(|| GatewayError::ShardNotServed {
                shard: name.to_string(),
                gateway_id: self.gateway_id.clone(),
            })
    }

    /// Stores `item` in `shard` of this region and returns its receipt. A
    /// write whose `deadline` passes before its batch is taken is not
    /// stored.
    pub(crate) async fn store_local(
        &self,
        shard: &str,
        item: ToStore,
        deadline: Option<Instant>,
    ) -> Result<Receipt, GatewayError> {
        let sender_id = item.message.sender_id.clone();
        let recipient_id = item.message.recipient_id.clone();
        let key = item.message.idempotency_key.clone();
        let outcome = self
            .shard(shard)?
            .committer
            .store(item, deadline)
            .await
            .map_err(|error| commit_failed(shard, error))?;
        match outcome {
            Ok(stored) => Ok(Receipt {
                message_id: stored.message_id,
                home_region: self.region.clone(),
                stored_at_micros: stored.stored_at_micros,
                duplicate: stored.duplicate,
                spooled: false,
            }),
            Err(Refused::KeyInUse(KeyInUse { message_id })) => Err(GatewayError::KeyInUse {
                sender_id,
                key: key.unwrap_or_default(),
                message_id,
            }),
            Err(Refused::Moved) => Err(GatewayError::AgencyMoving {
                agency_id: recipient_id,
            }),
        }
    }

    /// Claims the idempotency key of `message` in `shard`, the sender's home
    /// shard, for a message stored in another: returns the message to store,
    /// with the id the key named already if it is a retry (then true).
    pub(crate) async fn claim_key(
        &self,
        shard: &str,
        mut message: Message,
        fingerprint: Fingerprint,
        deadline: Option<Instant>,
    ) -> Result<(Message, bool), GatewayError> {
        let claim = KeyClaim {
            sender_id: message.sender_id.clone(),
            idempotency_key: message.idempotency_key.clone().unwrap_or_default(),
            fingerprint,
            message_id: message.message_id.clone(),
        };
        let claimed = self
            .shard(shard)?
            .committer
            .claim(claim.clone(), deadline)
            .await
            .map_err(|error| commit_failed(shard, error))?;
        match claimed {
            Claimed::New => Ok((message, false)),
            Claimed::Existing(existing) if existing.matches(&fingerprint) => {
                message.message_id = existing.message_id;
                Ok((message, true))
            }
            Claimed::Existing(existing) => Err(GatewayError::KeyInUse {
                sender_id: claim.sender_id,
                key: claim.idempotency_key,
                message_id: existing.message_id,
            }),
        }
    }

    /// Whether messages of `pair`'s sender for its recipient wait in the
    /// spool of `shard` (the sender's home), asked together with the other
    /// sends of the moment.
    pub(crate) async fn spool_holds(
        &self,
        shard: &str,
        pair: SpoolPair,
        deadline: Option<Instant>,
    ) -> Result<bool, GatewayError> {
        self.shard(shard)?
            .committer
            .spool_holds(pair, deadline)
            .await
            .map_err(|error| commit_failed(shard, error))
    }

    /// The state of the inbox of `agency_id`, homed in this region.
    pub(crate) async fn inbox_stats(&self, agency_id: &str) -> Result<InboxStats, GatewayError> {
        let home = self.require_homed_here(agency_id).await?;
        self.shard(&home.shard)?
            .store
            .inbox_stats(agency_id)
            .await
            .map_err(|source| GatewayError::shard_unavailable(&home.shard, "retry shortly", source))
    }

    /// The connection pool of each shard, sorted by shard.
    pub(crate) fn shard_pools(&self) -> Vec<pb::ShardPool> {
        let mut pools: Vec<pb::ShardPool> = self
            .shards
            .iter()
            .map(|(name, shard)| {
                let usage = shard.store.pool_usage();
                crate::telemetry::pool(name, usage.open, usage.idle, usage.max);
                pb::ShardPool {
                    shard: name.clone(),
                    open: usage.open,
                    idle: usage.idle,
                    max: usage.max,
                }
            })
            .collect();
        pools.sort_by(|a, b| a.shard.cmp(&b.shard));
        pools
    }

    /// Records what the spool of `shard` holds.
    pub(crate) fn set_spool_depths(&self, shard: &str, depths: Vec<SpoolDepth>) {
        let now = fedmesh_common::time::now_micros();
        let mut known = self
            .spool_depths
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Every other region's spool is shown, empty ones at 0.
        let regions: Vec<String> = self
            .topology
            .borrow()
            .regions
            .keys()
            .filter(|region| **region != self.region)
            .cloned()
            .collect();
        for region in regions {
            if !depths
                .iter()
                .any(|depth| depth.destination_region == region)
            {
                crate::telemetry::spool_depth(shard, &region, 0, 0.0);
            }
        }
        for depth in &depths {
            let age = (now - depth.oldest_spooled_at_micros).max(0) as f64 / 1e6;
            crate::telemetry::spool_depth(shard, &depth.destination_region, depth.messages, age);
        }
        known.insert(shard.to_string(), depths);
    }

    /// What waits in the spools of the shards served, by shard and
    /// destination region, as the drainers last saw it.
    pub(crate) fn spool_depths(&self) -> Vec<pb::SpoolDepth> {
        let depths = self
            .spool_depths
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        depths
            .iter()
            .flat_map(|(shard, depths)| {
                depths.iter().map(move |depth| pb::SpoolDepth {
                    shard: shard.clone(),
                    region: depth.destination_region.clone(),
                    messages: depth.messages,
                    oldest: Some(fedmesh_common::time::timestamp_from_micros(
                        depth.oldest_spooled_at_micros,
                    )),
                })
            })
            .collect()
    }

    /// Counts a send until the guard drops.
    pub(crate) fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }
}

/// What a failed write of `shard` means to its caller.
fn commit_failed(shard: &str, error: committer::CommitError) -> GatewayError {
    match error {
        committer::CommitError::Stopped => {
            GatewayError::ShuttingDown("retry on another gateway with the same idempotency key")
        }
        committer::CommitError::DeadlineExceeded => GatewayError::DeadlineExceeded,
        committer::CommitError::Store(source) => GatewayError::shard_unavailable(
            shard,
            "nothing was promised: retry with the same idempotency key (a retry is never stored twice)",
            source,
        ),
    }
}

/// Refuses `identity` acting as another agency than `agency_id`.
pub(crate) fn require_agency(
    identity: &Identity,
    agency_id: &str,
    action: &str,
) -> Result<(), GatewayError> {
    if identity.is_agency(agency_id) {
        Ok(())
    } else {
        Err(GatewayError::PermissionDenied(format!(
            "{identity} may not {action} agency {agency_id:?}; an agency acts only as itself"
        )))
    }
}
