//! TRANSPORT (inbound): the Exchange, Relay and Moves services. Each handler
//! decodes (see `crate::convert`), checks the caller, calls the gateway core
//! and encodes; statuses come from `fedmesh_common::error::to_status`.

mod exchange;
mod moves;
mod relay;

pub(crate) use exchange::ExchangeService;
pub(crate) use moves::MovesService;
pub(crate) use relay::RelayService;
