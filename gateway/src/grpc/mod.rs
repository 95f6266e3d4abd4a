//! TRANSPORT (inbound): the Exchange and Relay services. Each handler
//! decodes (see `crate::convert`), checks the caller, calls the gateway core
//! and encodes; statuses come from `fedmesh_common::error::to_status`.

mod exchange;
mod relay;

pub(crate) use exchange::ExchangeService;
pub(crate) use relay::RelayService;
