//! TRANSPORT: the Directory service. Decode, check the caller, call the
//! domain, encode; statuses come from `fedmesh_common::error::to_status`.

mod directory;

pub(crate) use directory::DirectoryService;
