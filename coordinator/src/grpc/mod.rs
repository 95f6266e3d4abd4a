//! TRANSPORT: the Directory service, and Relay for gateways that cannot
//! reach a region themselves. Decode, check the caller, call the domain,
//! encode; statuses come from `fedmesh_common::error::to_status`.

mod directory;
mod mover;
mod relay;

pub(crate) use directory::DirectoryService;
pub(crate) use mover::run_moves;
pub(crate) use relay::CoordinatorRelay;

use std::collections::HashMap;
use std::sync::Mutex;

use fedmesh_common::identity::{AttachIdentity, Identity};
use fedmesh_common::server::Security;
use fedmesh_common::tls::ExpectedServer;
use tonic::transport::Channel;

/// One lazily opened channel per gateway address, shared by the relay and
/// the move driver.
pub(crate) struct GatewayChannels {
    security: Security,
    channels: Mutex<HashMap<String, Channel>>,
}

impl GatewayChannels {
    pub(crate) fn new(security: Security) -> Self {
        GatewayChannels {
            security,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The channel to the gateway of `region` at `address`, which must prove
    /// it is one.
    pub(crate) fn get(
        &self,
        region: &str,
        address: &str,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = self.security.channel(
            address,
            ExpectedServer::Is(Identity::Gateway(region.to_string())),
        )?;
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// What identifies the coordinator on a call (dev mode).
    pub(crate) fn attach(&self) -> AttachIdentity {
        self.security.attach()
    }
}
