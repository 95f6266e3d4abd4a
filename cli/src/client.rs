//! Reaching a mesh from the command line: the coordinator, an agency's home
//! gateway (found through the coordinator), and the notifier.

use anyhow::Context as _;
use fedmesh_common::identity::{AttachIdentity, Identity};
use fedmesh_proto::pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A client channel that presents an identity.
pub type Authenticated = InterceptedService<Channel, AttachIdentity>;

/// Where the mesh is and who the CLI is.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Coordinator URL.
    pub coordinator: String,
    /// Gateway URL overriding discovery, if given.
    pub gateway: Option<String>,
    /// Notifier URL.
    pub notifier: String,
    /// Operator name for directory changes.
    pub operator: String,
}

/// Turns a failed call into one line that says what went wrong.
pub fn rpc_error(status: tonic::Status, what: &str) -> anyhow::Error {
    let code = format!("{:?}", status.code());
    let mut text = format!("{what}: {} ({code})", status.message());
    if status.code() == tonic::Code::Unavailable && status.message().contains("connect") {
        text.push_str("; is the mesh running? start it with `fedmesh dev`");
    }
    anyhow::anyhow!(text)
}

fn channel(url: &str) -> anyhow::Result<Channel> {
    fedmesh_common::server::lazy_channel(url)
        .with_context(|| format!("{url:?} is not a usable URL"))
}

impl Endpoints {
    /// The directory, as `identity`.
    pub fn directory(
        &self,
        identity: &Identity,
    ) -> anyhow::Result<pb::directory_client::DirectoryClient<Authenticated>> {
        Ok(pb::directory_client::DirectoryClient::with_interceptor(
            channel(&self.coordinator)?,
            AttachIdentity::new(identity),
        ))
    }

    /// The directory, as this operator.
    pub fn directory_as_operator(
        &self,
    ) -> anyhow::Result<pb::directory_client::DirectoryClient<Authenticated>> {
        self.directory(&Identity::Operator(self.operator.clone()))
    }

    /// The notifier, as `identity`.
    pub fn notifications(
        &self,
        identity: &Identity,
    ) -> anyhow::Result<pb::notifications_client::NotificationsClient<Authenticated>> {
        Ok(
            pb::notifications_client::NotificationsClient::with_interceptor(
                channel(&self.notifier)?,
                AttachIdentity::new(identity),
            ),
        )
    }

    /// The current topology, from the coordinator.
    pub async fn topology(&self) -> anyhow::Result<pb::TopologySnapshot> {
        let mut stream = self
            .directory_as_operator()?
            .watch_topology(pb::WatchTopologyRequest {})
            .await
            .map_err(|status| rpc_error(status, "cannot read the topology"))?
            .into_inner();
        let first = stream
            .message()
            .await
            .map_err(|status| rpc_error(status, "cannot read the topology"))?
            .context("the coordinator closed the topology stream")?;
        match first.update {
            Some(pb::topology_update::Update::Snapshot(snapshot)) => Ok(snapshot),
            _ => anyhow::bail!("the coordinator did not start the topology with a snapshot"),
        }
    }

    /// The URL of `agency_id`'s home gateway (or the `--gateway` override).
    pub async fn gateway_url_for(&self, agency_id: &str) -> anyhow::Result<String> {
        match &self.gateway {
            Some(url) => Ok(url.clone()),
            None => self.home_gateway(agency_id).await,
        }
    }

    /// The Exchange of `agency_id`'s home gateway, acting as that agency.
    pub async fn exchange_for(
        &self,
        agency_id: &str,
    ) -> anyhow::Result<pb::exchange_client::ExchangeClient<Authenticated>> {
        let identity = Identity::Agency(agency_id.to_string());
        let url = self.gateway_url_for(agency_id).await?;
        Ok(pb::exchange_client::ExchangeClient::with_interceptor(
            channel(&url)?,
            AttachIdentity::new(&identity),
        )
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024))
    }

    async fn home_gateway(&self, agency_id: &str) -> anyhow::Result<String> {
        let agency = self
            .directory_as_operator()?
            .get_agency(pb::GetAgencyRequest {
                agency_id: agency_id.to_string(),
            })
            .await
            .map_err(|status| rpc_error(status, &format!("cannot look up agency {agency_id:?}")))?
            .into_inner()
            .agency
            .context("the coordinator answered without the agency")?;
        let topology = self.topology().await?;
        topology
            .gateways
            .into_iter()
            .find(|gateway| gateway.region == agency.region)
            .map(|gateway| gateway.address)
            .with_context(|| {
                format!(
                    "no gateway of region {} is running; agency {agency_id} is homed there",
                    agency.region
                )
            })
    }
}
