//! TRANSPORT (inbound): the Exchange and Relay services. Each handler
//! decodes (see `convert`), checks the caller, calls the gateway core and
//! encodes; statuses come from `fedmesh_common::error::to_status`.

pub(crate) mod convert;
mod exchange;
mod relay;

pub(crate) use exchange::ExchangeService;
pub(crate) use relay::RelayService;
