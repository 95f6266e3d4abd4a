//! The directory as a gateway sees it: regions and their shards, where each
//! agency lives, and which gateways serve each region, at a version.
//!
//! Gateways keep the last [`Topology`] they received and keep serving from it
//! while the coordinator is unavailable.

use std::collections::{BTreeMap, HashMap};

use fedmesh_proto::pb;

/// Where an agency lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgencyHome {
    /// Home region.
    pub region: String,
    /// Shard of the home region that holds its inbox.
    pub shard: String,
    /// A move of it is under way: writes to and from it wait for its new
    /// home.
    pub moving: bool,
}

/// A gateway others can reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayEntry {
    /// Region it serves.
    pub region: String,
    /// URL it is reached at.
    pub address: String,
}

/// A versioned copy of the directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// Version of the last update applied; 0 before the first snapshot.
    pub version: u64,
    /// Region name to its shard names.
    pub regions: BTreeMap<String, Vec<String>>,
    /// Agency id to its home.
    pub agencies: HashMap<String, AgencyHome>,
    /// Gateway id to its entry.
    pub gateways: BTreeMap<String, GatewayEntry>,
    /// Notifier id to the URL subscribers reach it at.
    pub notifiers: BTreeMap<String, String>,
    /// Grant id to the access grant.
    pub grants: BTreeMap<String, pb::AccessGrant>,
    /// Recipient to the ids of its grants: a send looks at its recipient's
    /// grants only.
    grants_to: HashMap<String, Vec<String>>,
    /// The coordinator run the versions belong to (from the last snapshot).
    pub epoch: String,
    /// Snapshots applied so far (a resumed stream adds none).
    pub snapshots: u64,
}

/// Whether agencies may send each other without a grant.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AccessPolicy {
    /// Any agency may send any other.
    Open,
    /// A send needs a grant (`fedmesh access grant`).
    Closed,
}

impl Topology {
    /// Applies one update from the topology stream. A snapshot replaces
    /// everything; a change older than the current version is ignored.
    pub fn apply(&mut self, update: pb::TopologyUpdate) {
        match update.update {
            Some(pb::topology_update::Update::Snapshot(snapshot)) => {
                let snapshots = self.snapshots + 1;
                *self = Topology::from_snapshot(update.version, snapshot);
                self.snapshots = snapshots;
            }
            Some(pb::topology_update::Update::Change(change)) if update.version > self.version => {
                self.version = update.version;
                self.apply_change(change);
            }
            _ => {}
        }
    }

    fn from_snapshot(version: u64, snapshot: pb::TopologySnapshot) -> Topology {
        let mut topology = Topology {
            version,
            epoch: snapshot.epoch,
            regions: snapshot
                .regions
                .into_iter()
                .map(|region| (region.name, region.shards))
                .collect(),
            ..Topology::default()
        };
        for agency in snapshot.agencies {
            topology.upsert_agency(agency);
        }
        for gateway in snapshot.gateways {
            topology.upsert_gateway(gateway);
        }
        for notifier in snapshot.notifiers {
            topology
                .notifiers
                .insert(notifier.notifier_id, notifier.address);
        }
        for grant in snapshot.grants {
            topology.add_grant(grant);
        }
        topology
    }

    fn apply_change(&mut self, change: pb::TopologyChange) {
        use pb::topology_change::Change;
        match change.change {
            Some(Change::AgencyUpserted(agency)) => self.upsert_agency(agency),
            Some(Change::AgencyRemoved(agency_id)) => {
                self.agencies.remove(&agency_id);
            }
            Some(Change::GatewayUpserted(gateway)) => self.upsert_gateway(gateway),
            Some(Change::GatewayRemoved(gateway_id)) => {
                self.gateways.remove(&gateway_id);
            }
            Some(Change::NotifierUpserted(notifier)) => {
                self.notifiers
                    .insert(notifier.notifier_id, notifier.address);
            }
            Some(Change::NotifierRemoved(notifier_id)) => {
                self.notifiers.remove(&notifier_id);
            }
            Some(Change::GrantAdded(grant)) => {
                self.add_grant(grant);
            }
            Some(Change::GrantRemoved(grant_id)) => {
                self.remove_grant(&grant_id);
            }
            Some(Change::RegionUpserted(region)) => {
                self.regions.insert(region.name, region.shards);
            }
            Some(Change::RegionRemoved(name)) => {
                self.regions.remove(&name);
            }
            None => {}
        }
    }

    /// Records where `agency` lives.
    pub fn upsert_agency(&mut self, agency: pb::Agency) {
        self.agencies.insert(
            agency.agency_id,
            AgencyHome {
                region: agency.region,
                shard: agency.shard,
                moving: agency.moving,
            },
        );
    }

    fn upsert_gateway(&mut self, gateway: pb::Gateway) {
        self.gateways.insert(
            gateway.gateway_id,
            GatewayEntry {
                region: gateway.region,
                address: gateway.address,
            },
        );
    }

    fn add_grant(&mut self, grant: pb::AccessGrant) {
        self.remove_grant(&grant.grant_id);
        self.grants_to
            .entry(grant.recipient_id.clone())
            .or_default()
            .push(grant.grant_id.clone());
        self.grants.insert(grant.grant_id.clone(), grant);
    }

    fn remove_grant(&mut self, grant_id: &str) {
        if let Some(removed) = self.grants.remove(grant_id) {
            self.unindex(&removed);
        }
    }

    fn unindex(&mut self, grant: &pb::AccessGrant) {
        if let Some(ids) = self.grants_to.get_mut(&grant.recipient_id) {
            ids.retain(|id| *id != grant.grant_id);
            if ids.is_empty() {
                self.grants_to.remove(&grant.recipient_id);
            }
        }
    }

    /// Whether a grant allows `sender` to send `recipient` a message of
    /// `kind`.
    pub fn grants_access(&self, sender: &str, recipient: &str, kind: &str) -> bool {
        let Some(ids) = self.grants_to.get(recipient) else {
            return false;
        };
        ids.iter()
            .filter_map(|id| self.grants.get(id))
            .any(|grant| {
                (grant.sender_id.is_empty() || grant.sender_id == sender)
                    && (grant.kinds.is_empty() || grant.kinds.iter().any(|allowed| allowed == kind))
            })
    }

    /// Addresses of the gateways serving `region`, in gateway id order.
    pub fn gateways_of(&self, region: &str) -> Vec<String> {
        self.gateways
            .values()
            .filter(|gateway| gateway.region == region)
            .map(|gateway| gateway.address.clone())
            .collect()
    }
}

/// Reports an instance (a gateway, a notifier) to the coordinator until
/// `shutdown`: `report` makes one call and answers the interval the
/// coordinator asks for, in milliseconds (0 keeps the last one). A failed
/// report is logged and tried again after at most a second.
pub async fn report_periodically<Report, Call>(
    what: &'static str,
    mut report: Report,
    shutdown: tokio_util::sync::CancellationToken,
) where
    Report: FnMut() -> Call,
    Call: std::future::Future<Output = Result<u64, tonic::Status>>,
{
    let mut interval = std::time::Duration::from_secs(5);
    loop {
        // A failed report is tried again sooner: until it gets through,
        // the instance is unknown to the mesh.
        let wait = match report().await {
            Ok(0) => interval,
            Ok(asked) => {
                interval = std::time::Duration::from_millis(asked);
                interval
            }
            Err(status) => {
                tracing::warn!(what, error = %status.message(), "report to the coordinator failed");
                interval.min(std::time::Duration::from_secs(1))
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::topology_change::Change;

    fn agency(id: &str, region: &str) -> pb::Agency {
        pb::Agency {
            agency_id: id.to_string(),
            region: region.to_string(),
            shard: format!("{region}-1"),
            ..pb::Agency::default()
        }
    }

    fn change(version: u64, change: Change) -> pb::TopologyUpdate {
        pb::TopologyUpdate {
            version,
            update: Some(pb::topology_update::Update::Change(pb::TopologyChange {
                change: Some(change),
            })),
        }
    }

    #[test]
    fn snapshot_then_changes() {
        let mut topology = Topology::default();
        topology.apply(pb::TopologyUpdate {
            version: 10,
            update: Some(pb::topology_update::Update::Snapshot(
                pb::TopologySnapshot {
                    regions: vec![pb::Region {
                        name: "east".into(),
                        shards: vec!["east-1".into()],
                    }],
                    agencies: vec![agency("alpha", "east")],
                    gateways: vec![],
                    notifiers: vec![],
                    grants: vec![],
                    epoch: "run-1".into(),
                    leader: None,
                },
            )),
        });
        assert_eq!(topology.agencies["alpha"].shard, "east-1");

        topology.apply(change(11, Change::AgencyUpserted(agency("beta", "west"))));
        topology.apply(change(12, Change::AgencyRemoved("alpha".into())));
        // A stale change is ignored.
        topology.apply(change(9, Change::AgencyUpserted(agency("gamma", "west"))));

        assert_eq!(topology.version, 12);
        assert!(!topology.agencies.contains_key("alpha"));
        assert!(topology.agencies.contains_key("beta"));
        assert!(!topology.agencies.contains_key("gamma"));

        let grant = |id: &str, sender: &str, kinds: &[&str]| pb::AccessGrant {
            grant_id: id.into(),
            sender_id: sender.into(),
            recipient_id: "beta".into(),
            kinds: kinds.iter().map(|kind| kind.to_string()).collect(),
            ..pb::AccessGrant::default()
        };
        assert!(!topology.grants_access("alpha", "beta", "tax.notice"));
        topology.apply(change(
            13,
            Change::GrantAdded(grant("g1", "alpha", &["tax.notice"])),
        ));
        assert!(topology.grants_access("alpha", "beta", "tax.notice"));
        assert!(
            !topology.grants_access("alpha", "beta", "deed.scan"),
            "another kind"
        );
        assert!(
            !topology.grants_access("gamma", "beta", "tax.notice"),
            "another sender"
        );
        assert!(
            !topology.grants_access("beta", "alpha", "tax.notice"),
            "the other way"
        );
        topology.apply(change(14, Change::GrantAdded(grant("g2", "", &[]))));
        assert!(
            topology.grants_access("gamma", "beta", "deed.scan"),
            "any sender, any kind"
        );
        topology.apply(change(15, Change::GrantRemoved("g2".into())));
        assert!(!topology.grants_access("gamma", "beta", "deed.scan"));
    }
}
