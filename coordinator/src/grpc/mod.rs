//! TRANSPORT: the Directory service, and Relay for gateways that cannot
//! reach a region themselves. Decode, check the caller, call the domain,
//! encode; statuses come from `fedmesh_common::error::to_status`.

mod directory;
mod relay;

pub(crate) use directory::DirectoryService;
pub(crate) use relay::CoordinatorRelay;
