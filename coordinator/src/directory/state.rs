//! The in-memory topology: what gateways see, numbered by version, and the
//! broadcast of each change to watchers.

use std::collections::BTreeMap;

use fedmesh_common::time::timestamp_from_micros;
use fedmesh_proto::pb;
use tokio::sync::broadcast;
use tokio::time::{Duration, Instant};

use crate::access::GrantRecord;
use crate::agency::AgencyRecord;
use crate::config::RegionConfig;
use crate::lease::Lease;
use crate::region::ShardRecord;
use crate::store::GatewayInstance;

/// A gateway as last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRecord {
    /// Stable id of the gateway instance.
    pub gateway_id: String,
    /// Region it serves.
    pub region: String,
    /// URL it is reached at.
    pub address: String,
    /// Open inbox streams it reported.
    pub open_streams: u32,
    /// Sends in flight it reported.
    pub in_flight: u32,
    /// Its connection pools to the shards, as it reported them.
    pub shard_pools: Vec<pb::ShardPool>,
    /// What waits in the spools of its shards, as it reported it.
    pub spools: Vec<pb::SpoolDepth>,
    /// When it last reported, microseconds since the epoch (for display).
    pub last_seen_micros: i64,
    /// When it last reported, for expiry.
    pub last_seen: Instant,
}

/// A notifier as last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifierRecord {
    /// Stable id of the notifier instance.
    pub notifier_id: String,
    /// URL subscribers reach it at.
    pub address: String,
    /// When it last reported, microseconds since the epoch (for display).
    pub last_seen_micros: i64,
    /// When it last reported, for expiry.
    pub last_seen: Instant,
}

/// Changes kept to resume watchers from (about a minute of a busy mesh).
const RECENT_CHANGES: usize = 4096;

/// What a new watcher starts from: a snapshot, or the changes it missed,
/// and the changes after them.
pub struct WatchStart {
    /// The full topology at its current version, or the changes after the
    /// version the watcher resumes from.
    pub first: Vec<pb::TopologyUpdate>,
    /// Every change after the snapshot.
    pub changes: broadcast::Receiver<pb::TopologyUpdate>,
}

/// The topology at a version, and the channel its changes go out on.
pub struct TopologyState {
    version: u64,
    regions: Vec<RegionConfig>,
    agencies: BTreeMap<String, AgencyRecord>,
    gateways: BTreeMap<String, GatewayRecord>,
    notifiers: BTreeMap<String, NotifierRecord>,
    grants: BTreeMap<String, GrantRecord>,
    /// Details of the shards of `regions`, by name.
    shards: BTreeMap<String, ShardRecord>,
    changes: broadcast::Sender<pb::TopologyUpdate>,
    /// This run's id: versions resume only within it.
    epoch: String,
    /// The leader lease as this replica last saw it.
    leader: Option<Lease>,
    /// The latest changes, oldest first.
    recent: std::collections::VecDeque<pb::TopologyUpdate>,
}

impl TopologyState {
    /// A topology holding `agencies`, at `initial_version`.
    pub fn new(
        regions: Vec<RegionConfig>,
        agencies: Vec<AgencyRecord>,
        initial_version: u64,
    ) -> Self {
        let (changes, _) = broadcast::channel(1024);
        TopologyState {
            version: initial_version,
            regions,
            agencies: agencies
                .into_iter()
                .map(|agency| (agency.agency_id.clone(), agency))
                .collect(),
            gateways: BTreeMap::new(),
            notifiers: BTreeMap::new(),
            grants: BTreeMap::new(),
            shards: BTreeMap::new(),
            changes,
            epoch: uuid::Uuid::now_v7().to_string(),
            leader: None,
            recent: std::collections::VecDeque::new(),
        }
    }

    /// Starts from `grants`, as stored (not published: watchers have none
    /// yet).
    pub fn load_grants(&mut self, grants: Vec<GrantRecord>) {
        self.grants = grants
            .into_iter()
            .map(|grant| (grant.grant_id.clone(), grant))
            .collect();
    }

    /// Every grant, by id.
    pub fn grants(&self) -> impl Iterator<Item = &GrantRecord> {
        self.grants.values()
    }

    /// Adds a grant and publishes it.
    pub fn add_grant(&mut self, grant: GrantRecord) {
        let change = pb::topology_change::Change::GrantAdded(grant_to_pb(&grant));
        self.grants.insert(grant.grant_id.clone(), grant);
        self.publish(change);
    }

    /// Removes a grant and publishes it; the grant, if it existed.
    pub fn remove_grant(&mut self, grant_id: &str) -> Option<GrantRecord> {
        let removed = self.grants.remove(grant_id)?;
        self.publish(pb::topology_change::Change::GrantRemoved(
            grant_id.to_string(),
        ));
        Some(removed)
    }

    /// The current version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Names of the configured regions.
    pub fn region_names(&self) -> Vec<String> {
        self.regions
            .iter()
            .map(|region| region.name.clone())
            .collect()
    }

    /// Starts from the details of the shards (not published).
    pub fn load_shards(&mut self, shards: Vec<ShardRecord>) {
        self.shards = shards
            .into_iter()
            .map(|shard| (shard.name.clone(), shard))
            .collect();
    }

    /// Brings the directory to what the control database holds (changes
    /// made through another replica), publishing each difference.
    pub fn reconcile(
        &mut self,
        agencies: Vec<AgencyRecord>,
        grants: Vec<GrantRecord>,
        regions: Vec<RegionConfig>,
        shards: Vec<ShardRecord>,
    ) {
        let stored: BTreeMap<String, AgencyRecord> = agencies
            .into_iter()
            .map(|agency| (agency.agency_id.clone(), agency))
            .collect();
        let gone: Vec<String> = self
            .agencies
            .keys()
            .filter(|id| !stored.contains_key(*id))
            .cloned()
            .collect();
        for agency_id in gone {
            self.remove_agency(&agency_id);
        }
        for (agency_id, agency) in stored {
            if self.agencies.get(&agency_id) != Some(&agency) {
                self.upsert_agency(agency);
            }
        }
        let stored: BTreeMap<String, GrantRecord> = grants
            .into_iter()
            .map(|grant| (grant.grant_id.clone(), grant))
            .collect();
        let gone: Vec<String> = self
            .grants
            .keys()
            .filter(|id| !stored.contains_key(*id))
            .cloned()
            .collect();
        for grant_id in gone {
            self.remove_grant(&grant_id);
        }
        for (grant_id, grant) in stored {
            if !self.grants.contains_key(&grant_id) {
                self.add_grant(grant);
            }
        }
        self.shards = shards
            .into_iter()
            .map(|shard| (shard.name.clone(), shard))
            .collect();
        let gone: Vec<String> = self
            .regions
            .iter()
            .filter(|region| !regions.iter().any(|stored| stored.name == region.name))
            .map(|region| region.name.clone())
            .collect();
        for name in gone {
            self.regions.retain(|region| region.name != name);
            self.publish(pb::topology_change::Change::RegionRemoved(name));
        }
        for region in regions {
            match self
                .regions
                .iter_mut()
                .find(|known| known.name == region.name)
            {
                Some(known) if *known == region => {}
                Some(known) => {
                    *known = region.clone();
                    self.publish(pb::topology_change::Change::RegionUpserted(region_to_pb(
                        &region,
                    )));
                }
                None => {
                    self.publish(pb::topology_change::Change::RegionUpserted(region_to_pb(
                        &region,
                    )));
                    self.regions.push(region);
                }
            }
        }
    }

    /// Adds the gateways that reported to other replicas, as of when they
    /// last reported there.
    pub fn reconcile_gateways(&mut self, reported: Vec<GatewayInstance>) {
        for instance in reported {
            let last_seen_micros = instance.last_seen_micros;
            let last_seen = instant_of(last_seen_micros);
            match self.gateways.get_mut(&instance.gateway_id) {
                // What this replica heard is as new: the row is older (a
                // previous run's address, say).
                Some(known) if last_seen_micros <= known.last_seen_micros => {}
                Some(known)
                    if known.address == instance.address && known.region == instance.region =>
                {
                    known.last_seen = last_seen.max(known.last_seen);
                    known.last_seen_micros = last_seen_micros;
                    known.open_streams = instance.open_streams;
                    known.in_flight = instance.in_flight;
                }
                _ => {
                    self.report_gateway(GatewayRecord {
                        gateway_id: instance.gateway_id,
                        region: instance.region,
                        address: instance.address,
                        open_streams: instance.open_streams,
                        in_flight: instance.in_flight,
                        shard_pools: Vec::new(),
                        spools: Vec::new(),
                        last_seen_micros,
                        last_seen,
                    });
                }
            }
        }
    }

    /// Adds the notifiers that report to other replicas.
    pub fn reconcile_notifiers(&mut self, reported: Vec<(String, String, i64)>) {
        for (notifier_id, address, last_seen_micros) in reported {
            let last_seen = instant_of(last_seen_micros);
            match self.notifiers.get_mut(&notifier_id) {
                Some(known) if last_seen_micros <= known.last_seen_micros => {}
                Some(known) if known.address == address => {
                    known.last_seen = last_seen.max(known.last_seen);
                    known.last_seen_micros = last_seen_micros;
                }
                _ => self.report_notifier(NotifierRecord {
                    notifier_id,
                    address,
                    last_seen_micros,
                    last_seen,
                }),
            }
        }
    }

    /// Records the leader lease as last seen (for snapshots and status).
    pub fn set_leader(&mut self, leader: Option<Lease>) {
        self.leader = leader;
    }

    /// The regions of the gateways that report, by gateway id.
    pub fn gateway_regions(&self) -> BTreeMap<String, String> {
        self.gateways
            .values()
            .map(|gateway| (gateway.gateway_id.clone(), gateway.region.clone()))
            .collect()
    }

    /// Whether `region` exists.
    pub fn has_region(&self, region: &str) -> bool {
        self.regions.iter().any(|known| known.name == region)
    }

    /// One shard's details.
    pub fn shard(&self, name: &str) -> Option<&ShardRecord> {
        self.shards.get(name)
    }

    /// The shards (of `region` only, if given), with their agency counts.
    pub fn shards_with_counts(&self, region: Option<&str>) -> Vec<(ShardRecord, usize)> {
        self.shards
            .values()
            .filter(|shard| region.is_none_or(|region| shard.region == region))
            .map(|shard| (shard.clone(), self.agencies_on(&shard.name)))
            .collect()
    }

    /// The number of agencies on `shard`.
    pub fn agencies_on(&self, shard: &str) -> usize {
        self.agencies
            .values()
            .filter(|agency| agency.shard == shard)
            .count()
    }

    /// Whether `shard` takes a new agency: active, and below its capacity.
    pub fn takes_agencies(&self, shard: &ShardRecord) -> bool {
        !shard.draining
            && (shard.capacity == 0
                || self.agencies_on(&shard.name)
                    < usize::try_from(shard.capacity).unwrap_or(usize::MAX))
    }

    /// The active shard of `region` for a new agency: with no capacity set,
    /// the one holding the fewest agencies; shards with a capacity come
    /// after those without, by most free room; None when the region
    /// does not exist or has no shard that takes agencies.
    pub fn pick_shard(&self, region: &str) -> Option<String> {
        let region = self
            .regions
            .iter()
            .find(|candidate| candidate.name == region)?;
        region
            .shards
            .iter()
            .filter_map(|name| {
                let count = self.agencies_on(name);
                match self.shards.get(name) {
                    Some(shard) if !self.takes_agencies(shard) => None,
                    Some(shard) if shard.capacity > 0 => Some((
                        name,
                        (
                            1,
                            usize::try_from(shard.capacity).unwrap_or(usize::MAX) - count,
                        ),
                    )),
                    _ => Some((name, (2, usize::MAX - count))),
                }
            })
            .max_by_key(|(_, room)| *room)
            .map(|(name, _)| name.clone())
    }

    /// Adds a region without shards and publishes it.
    pub fn add_region(&mut self, name: &str) {
        let region = RegionConfig {
            name: name.to_string(),
            shards: Vec::new(),
        };
        let change = pb::topology_change::Change::RegionUpserted(region_to_pb(&region));
        self.regions.push(region);
        self.publish(change);
    }

    /// Removes a region and its shards and publishes it.
    pub fn remove_region(&mut self, name: &str) {
        self.regions.retain(|region| region.name != name);
        self.shards.retain(|_, shard| shard.region != name);
        self.publish(pb::topology_change::Change::RegionRemoved(name.to_string()));
    }

    /// Adds or replaces a shard's details; a new shard is published with
    /// its region.
    pub fn upsert_shard(&mut self, shard: ShardRecord) {
        let Some(region) = self
            .regions
            .iter_mut()
            .find(|region| region.name == shard.region)
        else {
            return;
        };
        let added = !region.shards.contains(&shard.name);
        if added {
            region.shards.push(shard.name.clone());
        }
        let change = pb::topology_change::Change::RegionUpserted(region_to_pb(region));
        self.shards.insert(shard.name.clone(), shard);
        if added {
            self.publish(change);
        }
    }

    /// Removes a shard and publishes its region without it.
    pub fn remove_shard(&mut self, name: &str) {
        let Some(shard) = self.shards.remove(name) else {
            return;
        };
        if let Some(region) = self
            .regions
            .iter_mut()
            .find(|region| region.name == shard.region)
        {
            region.shards.retain(|known| known != name);
            let change = pb::topology_change::Change::RegionUpserted(region_to_pb(region));
            self.publish(change);
        }
    }

    /// The regions, with their shard names.
    pub fn regions(&self) -> Vec<pb::Region> {
        self.regions.iter().map(region_to_pb).collect()
    }

    /// The addresses of the gateways of `region`, in id order.
    pub fn gateway_addresses(&self, region: &str) -> Vec<String> {
        self.gateways
            .values()
            .filter(|gateway| gateway.region == region)
            .map(|gateway| gateway.address.clone())
            .collect()
    }

    /// The region of the gateway `gateway_id`, if it reports.
    pub fn gateway_region(&self, gateway_id: &str) -> Option<String> {
        self.gateways
            .get(gateway_id)
            .map(|gateway| gateway.region.clone())
    }

    /// One agency.
    pub fn agency(&self, agency_id: &str) -> Option<&AgencyRecord> {
        self.agencies.get(agency_id)
    }

    /// Up to `limit` agencies after `after` in id order, optionally of one region.
    pub fn agencies_page(
        &self,
        after: &str,
        region: Option<&str>,
        limit: usize,
    ) -> Vec<AgencyRecord> {
        use std::ops::Bound;
        self.agencies
            .range::<str, _>((Bound::Excluded(after), Bound::Unbounded))
            .map(|(_, agency)| agency)
            .filter(|agency| region.is_none_or(|region| agency.region == region))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Number of agencies per region, in region order.
    pub fn agency_counts(&self) -> Vec<(String, usize)> {
        self.regions
            .iter()
            .map(|region| {
                let count = self
                    .agencies
                    .values()
                    .filter(|agency| agency.region == region.name)
                    .count();
                (region.name.clone(), count)
            })
            .collect()
    }

    /// Adds or replaces an agency and publishes the change.
    pub fn upsert_agency(&mut self, agency: AgencyRecord) {
        let change = pb::topology_change::Change::AgencyUpserted(agency_to_pb(&agency));
        self.agencies.insert(agency.agency_id.clone(), agency);
        self.publish(change);
    }

    /// Removes an agency and publishes the change.
    pub fn remove_agency(&mut self, agency_id: &str) {
        if self.agencies.remove(agency_id).is_some() {
            self.publish(pb::topology_change::Change::AgencyRemoved(
                agency_id.to_string(),
            ));
        }
    }

    /// Records a gateway report. A new gateway or a changed address is
    /// published; a load change alone is kept for snapshots only.
    pub fn report_gateway(&mut self, gateway: GatewayRecord) -> bool {
        let changed = self
            .gateways
            .get(&gateway.gateway_id)
            .is_none_or(|known| known.address != gateway.address || known.region != gateway.region);
        let change = pb::topology_change::Change::GatewayUpserted(gateway_to_pb(&gateway));
        if changed {
            tracing::info!(gateway_id = %gateway.gateway_id, region = %gateway.region, address = %gateway.address, "gateway joined");
        }
        self.gateways.insert(gateway.gateway_id.clone(), gateway);
        if changed {
            self.publish(change);
        }
        changed
    }

    /// Records a notifier report; a new notifier or a changed address is
    /// published.
    pub fn report_notifier(&mut self, notifier: NotifierRecord) {
        let changed = self
            .notifiers
            .get(&notifier.notifier_id)
            .is_none_or(|known| known.address != notifier.address);
        let change = pb::topology_change::Change::NotifierUpserted(notifier_to_pb(&notifier));
        if changed {
            tracing::info!(notifier_id = %notifier.notifier_id, address = %notifier.address, "notifier joined");
        }
        self.notifiers
            .insert(notifier.notifier_id.clone(), notifier);
        if changed {
            self.publish(change);
        }
    }

    /// Drops gateways and notifiers not heard from within `expiry` of
    /// `now`; returns the ids of the gateways.
    pub fn expire(&mut self, now: Instant, expiry: Duration) -> Vec<String> {
        let silent: Vec<String> = self
            .notifiers
            .values()
            .filter(|notifier| now.saturating_duration_since(notifier.last_seen) > expiry)
            .map(|notifier| notifier.notifier_id.clone())
            .collect();
        for notifier_id in silent {
            self.notifiers.remove(&notifier_id);
            tracing::warn!(%notifier_id, "notifier stopped reporting, removed from topology");
            self.publish(pb::topology_change::Change::NotifierRemoved(notifier_id));
        }
        self.expire_gateways(now, expiry)
    }

    /// Drops gateways not heard from within `expiry` of `now`; returns their ids.
    fn expire_gateways(&mut self, now: Instant, expiry: Duration) -> Vec<String> {
        let expired: Vec<String> = self
            .gateways
            .values()
            .filter(|gateway| now.saturating_duration_since(gateway.last_seen) > expiry)
            .map(|gateway| gateway.gateway_id.clone())
            .collect();
        for gateway_id in &expired {
            self.gateways.remove(gateway_id);
            tracing::warn!(%gateway_id, "gateway stopped reporting, removed from topology");
            self.publish(pb::topology_change::Change::GatewayRemoved(
                gateway_id.clone(),
            ));
        }
        expired
    }

    /// A snapshot at the current version and a receiver of the changes after it.
    pub fn watch(&self) -> WatchStart {
        self.watch_from(None)
    }

    /// For a watcher resuming from `(epoch, version)`: the changes after
    /// that version when this run still has them all, else a snapshot; and
    /// a receiver of the changes after those.
    pub fn watch_from(&self, resume: Option<(&str, u64)>) -> WatchStart {
        let changes = self.changes.subscribe();
        if let Some((epoch, version)) = resume
            && epoch == self.epoch
            && version <= self.version
        {
            let oldest_kept = self
                .recent
                .front()
                .map_or(self.version + 1, |update| update.version);
            if version + 1 >= oldest_kept {
                let missed = self
                    .recent
                    .iter()
                    .filter(|update| update.version > version)
                    .cloned()
                    .collect();
                return WatchStart {
                    first: missed,
                    changes,
                };
            }
        }
        WatchStart {
            first: vec![self.snapshot()],
            changes,
        }
    }

    /// The full topology at the current version.
    pub fn snapshot(&self) -> pb::TopologyUpdate {
        pb::TopologyUpdate {
            version: self.version,
            update: Some(pb::topology_update::Update::Snapshot(
                pb::TopologySnapshot {
                    regions: self.regions(),
                    agencies: self.agencies.values().map(agency_to_pb).collect(),
                    gateways: self.gateways.values().map(gateway_to_pb).collect(),
                    notifiers: self.notifiers.values().map(notifier_to_pb).collect(),
                    grants: self.grants.values().map(grant_to_pb).collect(),
                    epoch: self.epoch.clone(),
                    leader: self.leader.as_ref().map(|lease| pb::Leader {
                        holder: lease.holder.clone(),
                        token: lease.token,
                        held_since: Some(timestamp_from_micros(lease.acquired_at_micros)),
                        expires_at: Some(timestamp_from_micros(lease.expires_at_micros)),
                    }),
                },
            )),
        }
    }

    fn publish(&mut self, change: pb::topology_change::Change) {
        self.version += 1;
        let update = pb::TopologyUpdate {
            version: self.version,
            update: Some(pb::topology_update::Update::Change(pb::TopologyChange {
                change: Some(change),
            })),
        };
        if self.recent.len() == RECENT_CHANGES {
            self.recent.pop_front();
        }
        self.recent.push_back(update.clone());
        // No watcher is not an error.
        let _ = self.changes.send(update);
    }
}

/// The instant of a time stored in microseconds since the epoch (an
/// instance's last report, heard by another replica).
fn instant_of(micros: i64) -> Instant {
    let now = Instant::now();
    let age = fedmesh_common::time::now_micros().saturating_sub(micros);
    now.checked_sub(Duration::from_micros(u64::try_from(age).unwrap_or(0)))
        .unwrap_or(now)
}

/// The wire form of a region.
fn region_to_pb(region: &RegionConfig) -> pb::Region {
    pb::Region {
        name: region.name.clone(),
        shards: region.shards.clone(),
    }
}

/// The wire form of a shard, with the agencies it holds.
pub(crate) fn shard_to_pb(shard: &ShardRecord, agencies: usize) -> pb::Shard {
    pb::Shard {
        name: shard.name.clone(),
        region: shard.region.clone(),
        address: shard.address.clone(),
        state: if shard.draining {
            pb::ShardState::Draining
        } else {
            pb::ShardState::Active
        } as i32,
        capacity: shard.capacity,
        agencies: u32::try_from(agencies).unwrap_or(u32::MAX),
    }
}

/// The wire form of an access grant.
pub(crate) fn grant_to_pb(grant: &GrantRecord) -> pb::AccessGrant {
    pb::AccessGrant {
        grant_id: grant.grant_id.clone(),
        sender_id: grant.sender_id.clone(),
        recipient_id: grant.recipient_id.clone(),
        kinds: grant.kinds.clone(),
        granted_at: Some(timestamp_from_micros(grant.granted_at_micros)),
        granted_by: grant.granted_by.clone(),
    }
}

/// The wire form of an agency.
pub(crate) fn agency_to_pb(agency: &AgencyRecord) -> pb::Agency {
    pb::Agency {
        agency_id: agency.agency_id.clone(),
        region: agency.region.clone(),
        shard: agency.shard.clone(),
        display_name: agency.display_name.clone(),
        registered_at: Some(timestamp_from_micros(agency.registered_at_micros)),
        moving: agency.moving,
        version: agency.version,
    }
}

fn gateway_to_pb(gateway: &GatewayRecord) -> pb::Gateway {
    pb::Gateway {
        gateway_id: gateway.gateway_id.clone(),
        region: gateway.region.clone(),
        address: gateway.address.clone(),
        load: Some(pb::GatewayLoad {
            open_streams: gateway.open_streams,
            in_flight: gateway.in_flight,
            shard_pools: gateway.shard_pools.clone(),
            spools: gateway.spools.clone(),
        }),
        last_seen: Some(timestamp_from_micros(gateway.last_seen_micros)),
    }
}

fn notifier_to_pb(notifier: &NotifierRecord) -> pb::Notifier {
    pb::Notifier {
        notifier_id: notifier.notifier_id.clone(),
        address: notifier.address.clone(),
        last_seen: Some(timestamp_from_micros(notifier.last_seen_micros)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TopologyState {
        let regions = vec![RegionConfig {
            name: "east".into(),
            shards: vec!["east-1".into(), "east-2".into()],
        }];
        TopologyState::new(regions, vec![], 100)
    }

    fn gateway(gateway_id: &str, last_seen: Instant) -> GatewayRecord {
        GatewayRecord {
            gateway_id: gateway_id.into(),
            region: "east".into(),
            address: "http://127.0.0.1:1".into(),
            open_streams: 0,
            in_flight: 0,
            shard_pools: Vec::new(),
            spools: Vec::new(),
            last_seen_micros: 0,
            last_seen,
        }
    }

    fn agency(agency_id: &str) -> AgencyRecord {
        AgencyRecord {
            agency_id: agency_id.into(),
            region: "east".into(),
            shard: "east-1".into(),
            display_name: String::new(),
            registered_at_micros: 0,
            moving: false,
            version: 1,
        }
    }

    fn is_snapshot(update: &pb::TopologyUpdate) -> bool {
        matches!(
            update.update,
            Some(pb::topology_update::Update::Snapshot(_))
        )
    }

    #[test]
    fn a_watcher_resumes_with_what_it_missed_or_starts_over_from_a_snapshot() {
        let mut state = state();
        let first = state.watch().first;
        let [snapshot] = first.as_slice() else {
            panic!("a new watcher starts from one snapshot: {first:?}");
        };
        let Some(pb::topology_update::Update::Snapshot(taken)) = &snapshot.update else {
            panic!("not a snapshot");
        };
        let (epoch, version) = (taken.epoch.clone(), snapshot.version);
        state.upsert_agency(agency("alpha"));
        state.upsert_agency(agency("beta"));
        let missed = state.watch_from(Some((&epoch, version))).first;
        assert_eq!(
            missed
                .iter()
                .map(|update| update.version)
                .collect::<Vec<_>>(),
            [version + 1, version + 2],
            "only the changes missed"
        );
        assert!(missed.iter().all(|update| !is_snapshot(update)));
        assert!(
            state
                .watch_from(Some((&epoch, version + 2)))
                .first
                .is_empty(),
            "up to date: nothing to send"
        );
        let other_run = state.watch_from(Some(("another-run", version))).first;
        assert!(other_run.len() == 1 && is_snapshot(&other_run[0]));
        let ahead = state.watch_from(Some((&epoch, version + 50))).first;
        assert!(
            ahead.len() == 1 && is_snapshot(&ahead[0]),
            "a version this run never had"
        );
        for n in 0..RECENT_CHANGES {
            state.upsert_agency(agency(&format!("a{n}")));
        }
        let too_old = state.watch_from(Some((&epoch, version))).first;
        assert!(
            too_old.len() == 1 && is_snapshot(&too_old[0]),
            "changes no longer kept"
        );
    }

    #[test]
    fn placement_skips_draining_and_full_shards_and_prefers_room() {
        let mut state = state();
        let shard = |name: &str, draining: bool, capacity: u32| ShardRecord {
            name: name.into(),
            region: "east".into(),
            address: String::new(),
            draining,
            capacity,
            created_at_micros: 0,
        };
        state.load_shards(vec![shard("east-1", true, 0), shard("east-2", false, 2)]);
        assert_eq!(
            state.pick_shard("east").as_deref(),
            Some("east-2"),
            "east-1 drains"
        );
        state.upsert_agency(AgencyRecord {
            shard: "east-2".into(),
            ..agency("alpha")
        });
        state.upsert_agency(AgencyRecord {
            shard: "east-2".into(),
            ..agency("beta")
        });
        assert_eq!(
            state.pick_shard("east"),
            None,
            "east-2 is full, east-1 drains"
        );
        state.add_region("north");
        assert_eq!(state.pick_shard("north"), None, "a region without shards");
        state.upsert_shard(ShardRecord {
            region: "north".into(),
            ..shard("north-1", false, 0)
        });
        state.upsert_shard(ShardRecord {
            region: "north".into(),
            ..shard("north-2", false, 10)
        });
        assert_eq!(
            state.pick_shard("north").as_deref(),
            Some("north-1"),
            "a shard without a limit comes before one with"
        );
        let regions = state.regions();
        assert_eq!(
            regions.last().map(|region| region.shards.clone()),
            Some(vec!["north-1".to_string(), "north-2".to_string()])
        );
        state.remove_shard("north-1");
        assert_eq!(state.pick_shard("north").as_deref(), Some("north-2"));
    }

    #[test]
    fn a_gateway_row_older_than_what_this_replica_heard_changes_nothing() {
        let mut state = state();
        let now = fedmesh_common::time::now_micros();
        state.report_gateway(GatewayRecord {
            address: "http://127.0.0.1:2".into(),
            last_seen_micros: now,
            ..gateway("east-0", Instant::now())
        });
        let row = |address: &str, at: i64| GatewayInstance {
            gateway_id: "east-0".into(),
            region: "east".into(),
            address: address.into(),
            last_seen_micros: at,
            open_streams: 3,
            in_flight: 1,
        };
        state.reconcile_gateways(vec![row("http://127.0.0.1:1", now - 1_000_000)]);
        assert_eq!(
            state.gateway_addresses("east"),
            ["http://127.0.0.1:2"],
            "a stale row"
        );
        state.reconcile_gateways(vec![row("http://127.0.0.1:3", now + 1_000)]);
        assert_eq!(
            state.gateway_addresses("east"),
            ["http://127.0.0.1:3"],
            "a newer report elsewhere"
        );
        let reported = &state.gateways["east-0"];
        assert_eq!(
            (reported.open_streams, reported.in_flight),
            (3, 1),
            "its load as reported to another replica"
        );
    }

    #[test]
    fn shards_fill_evenly_and_unknown_regions_have_none() {
        let mut state = state();
        assert_eq!(state.pick_shard("mars"), None);
        let first = state.pick_shard("east").expect("shard");
        state.upsert_agency(AgencyRecord {
            agency_id: "alpha".into(),
            region: "east".into(),
            shard: first.clone(),
            display_name: String::new(),
            registered_at_micros: 0,
            moving: false,
            version: 1,
        });
        let second = state.pick_shard("east").expect("shard");
        assert_ne!(first, second);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_gateways_expire_and_watchers_hear_of_it() {
        let mut state = state();
        let mut watch = state.watch();
        state.report_gateway(gateway("east-0", Instant::now()));
        tokio::time::advance(Duration::from_secs(10)).await;
        state.report_gateway(gateway("east-1", Instant::now()));
        tokio::time::advance(Duration::from_secs(10)).await;

        let expired = state.expire(Instant::now(), Duration::from_secs(15));
        assert_eq!(expired, vec!["east-0".to_string()]);

        let versions: Vec<u64> = std::iter::from_fn(|| watch.changes.try_recv().ok())
            .map(|update| update.version)
            .collect();
        assert_eq!(versions, vec![101, 102, 103]);
    }

    #[test]
    fn pages_walk_all_agencies_once() {
        let mut state = state();
        for index in 0..5 {
            state.upsert_agency(AgencyRecord {
                agency_id: format!("a{index}"),
                region: "east".into(),
                shard: "east-1".into(),
                display_name: String::new(),
                registered_at_micros: 0,
                moving: false,
                version: 1,
            });
        }
        let first = state.agencies_page("", None, 3);
        let second = state.agencies_page(&first[2].agency_id, None, 3);
        assert_eq!(first.len() + second.len(), 5);
        assert!(state.agencies_page("", Some("west"), 10).is_empty());
    }
}
