//! TRANSPORT (outbound): this gateway as a client of the coordinator and of
//! the gateways of other regions.
//!
//! - the topology watcher keeps the last topology received and reconnects
//!   with backoff; while the coordinator is away the gateway serves from it;
//! - the reporter announces this gateway and its load periodically;
//! - lookups ask the coordinator for an agency the topology does not have yet;
//! - relays forward a message to a gateway of the recipient's region
//!   (batched per region, see `relay`); besides the topology's, a region's
//!   gateways come from DNS and the settings (`discovered`, see
//!   `fedmesh_common::discovery`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_common::coordinators::{CoordinatorClient, CoordinatorUrlError, Coordinators};
use fedmesh_common::discovery::{Discovery, RegionEndpoints};
use fedmesh_common::server::Security;
use fedmesh_common::topology::{AgencyHome, Topology};
use fedmesh_proto::pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::convert;
use crate::error::GatewayError;
use crate::message::{Message, Receipt};

use crate::relay::{RelayBatcher, RelayClients, RelayLimits};

/// Most bytes of a topology snapshot the gateway decodes: the directory of
/// a large mesh, far above the 4 MiB tonic allows by default.
const MAX_TOPOLOGY_BYTES: usize = 256 * 1024 * 1024;

/// The request that resumes from `topology` (a snapshot if it has none).
fn resume_from(topology: &Topology) -> pb::WatchTopologyRequest {
    pb::WatchTopologyRequest {
        epoch: topology.epoch.clone(),
        from_version: topology.version,
    }
}

/// Connections to the coordinator replicas and to other gateways.
pub(crate) struct Upstream {
    /// The coordinator replicas (DNS's, then the settings'); a failure
    /// moves to the next.
    coordinators: Coordinators,
    relays: Arc<RelayClients>,
    batchers: Mutex<HashMap<String, RelayBatcher>>,
    /// The gateways of other regions found besides the topology.
    discovery: Discovery,
}

impl Upstream {
    /// Lazy connections, secured by `security`, to the coordinator
    /// replicas at `coordinator_urls` (comma separated) and those
    /// `discovery` finds; other regions' gateways are also found through
    /// `discovery`.
    pub(crate) fn new(
        coordinator_urls: &str,
        security: &Security,
        relay_limits: RelayLimits,
        discovery: Discovery,
    ) -> Result<Self, CoordinatorUrlError> {
        let coordinators =
            Coordinators::new(coordinator_urls, discovery.clone(), security.clone())?;
        Ok(Upstream {
            relays: Arc::new(RelayClients::new(
                security.clone(),
                relay_limits,
                coordinators.relay(),
            )),
            coordinators,
            batchers: Mutex::new(HashMap::new()),
            discovery,
        })
    }

    /// Waits for the coordinators' first DNS answer, if DNS is used.
    pub(crate) async fn settle(&self) {
        self.coordinators.settle().await;
    }

    /// The gateways of `region` found through DNS and in the settings (the
    /// first call for a region may wait for DNS, later ones answer from
    /// the cache).
    pub(crate) async fn discovered(&self, region: &str) -> RegionEndpoints {
        self.discovery.endpoints(region).await
    }

    /// The coordinator's directory, for recording in the audit log.
    pub(crate) fn directory(&self) -> CoordinatorClient {
        self.directory_now()
    }

    /// A client of the coordinator replica in use.
    fn directory_now(&self) -> CoordinatorClient {
        self.coordinators
            .directory()
            .max_decoding_message_size(MAX_TOPOLOGY_BYTES)
    }

    /// Asks the coordinator where `agency_id` lives.
    pub(crate) async fn lookup(&self, agency_id: &str) -> Result<AgencyHome, GatewayError> {
        let mut request = tonic::Request::new(pb::GetAgencyRequest {
            agency_id: agency_id.to_string(),
        });
        request.set_timeout(Duration::from_secs(5));
        match self.directory_now().get_agency(request).await {
            Ok(response) => {
                let agency = response.into_inner().agency.unwrap_or_default();
                Ok(AgencyHome {
                    region: agency.region,
                    shard: agency.shard,
                    moving: agency.moving,
                })
            }
            Err(status) if status.code() == Code::NotFound => {
                Err(GatewayError::AgencyNotFound(agency_id.to_string()))
            }
            Err(status) => Err(GatewayError::CoordinatorUnavailable {
                agency_id: agency_id.to_string(),
                source: Arc::new(status),
            }),
        }
    }

    /// Forwards `message` to a gateway of `region` (of the tiers of
    /// `gateways`, balanced by load), batched with the other messages relayed to that region
    /// meanwhile, and returns its home region's receipt. An error other than
    /// "unreachable" from the home region is passed on as it is.
    pub(crate) async fn forward(
        &self,
        region: &str,
        gateways: &[Vec<String>],
        message: Message,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Receipt, GatewayError> {
        let batcher = {
            let mut batchers = self
                .batchers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            batchers
                .entry(region.to_string())
                .or_insert_with(|| {
                    RelayBatcher::spawn(region.to_string(), Arc::clone(&self.relays))
                })
                .clone()
        };
        let receipt = batcher
            .forward(
                convert::forward_request(message),
                gateways.to_vec(),
                deadline,
            )
            .await?;
        Ok(convert::receipt_from_pb(receipt, region))
    }

    /// The clients of other gateways, for moves.
    pub(crate) fn gateways(&self) -> &RelayClients {
        &self.relays
    }

    /// Follows the coordinator's topology stream into `topology` until
    /// `shutdown`, reconnecting with backoff. The last topology is kept while
    /// disconnected.
    pub(crate) async fn watch_topology(
        &self,
        topology: watch::Sender<Arc<Topology>>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = self.follow_topology(&topology, &mut backoff) => outcome,
            };
            // Again after a pause jittered so that gateways do not all come
            // back at once (to the next replica if this one does not answer).
            let wait = backoff.mul_f64(0.5 + fastrand::f64());
            tracing::warn!(error = %outcome, retry_in = ?wait, "topology stream lost, serving from the last topology");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Applies the topology stream to `topology` until it ends; returns why
    /// it ended.
    async fn follow_topology(
        &self,
        topology: &watch::Sender<Arc<Topology>>,
        backoff: &mut Duration,
    ) -> String {
        let resume = resume_from(&topology.borrow());
        let mut stream = match self.directory_now().watch_topology(resume).await {
            Ok(response) => response.into_inner(),
            Err(status) => return status.message().to_string(),
        };
        loop {
            let update = match stream.message().await {
                Ok(Some(update)) => update,
                Ok(None) => return "coordinator closed the topology stream".to_string(),
                Err(status) => return status.message().to_string(),
            };
            *backoff = Duration::from_millis(100);
            let snapshot = matches!(
                update.update,
                Some(pb::topology_update::Update::Snapshot(_))
            );
            topology.send_modify(|current| Arc::make_mut(current).apply(update));
            if snapshot {
                let current = topology.borrow();
                tracing::info!(
                    version = current.version,
                    n_agencies = current.agencies.len(),
                    n_gateways = current.gateways.len(),
                    "topology snapshot received"
                );
            }
        }
    }

    /// Reports `gateway` (with the load `load` gives) every interval the
    /// coordinator asks for, until `shutdown`.
    pub(crate) async fn report(
        &self,
        gateway: pb::Gateway,
        load: impl Fn() -> pb::GatewayLoad,
        shutdown: CancellationToken,
    ) {
        let report = || {
            let request = pb::ReportGatewayRequest {
                gateway: Some(pb::Gateway {
                    load: Some(load()),
                    ..gateway.clone()
                }),
            };
            let mut directory = self.directory_now();
            async move {
                let response = directory.report_gateway(request).await;
                Ok(response?.into_inner().report_interval_ms)
            }
        };
        fedmesh_common::topology::report_periodically("gateway", report, shutdown).await;
    }
}
