//! What every fedmesh role shares.
//!
//! - [`amqp`]: the event bus on RabbitMQ: confirmed publishing, consuming.
//! - [`config`]: settings declared once, merged from defaults, file,
//!   environment and flags.
//! - [`discovery`]: the gateways of a region found through DNS (SRV or
//!   A/AAAA records, cached for their TTL) and from a static list.
//! - [`error`]: the small set of error kinds, their gRPC codes, and the one
//!   place a `tonic::Status` is built from a service error.
//! - [`identity`]: who the caller is, read in one interceptor.
//! - [`validate`]: the patterns of agency ids, regions, kinds and headers.
//! - [`events`]: mesh events and the event bus interface, with the
//!   in-process bus of the dev mesh.
//! - [`in_process`]: the dev mesh's bus, standing in for RabbitMQ.
//! - [`topology`]: the directory as gateways see it, and how updates apply.
//! - [`server`]: health, reflection and graceful serving for every role.
//! - [`postgres`]: the outbox on PostgreSQL.
//! - [`sqlite`]: durable SQLite pools and the outbox they share.
//! - [`store`]: the error every store fails with; which backend a URL names.
//! - [`time`]: timestamps as stored and as sent.
//! - [`webhook`]: Standard Webhooks secrets, signatures and URLs.
//!
//! Architecture Invariant: this crate depends on no role crate.

pub mod amqp;
pub mod audit;
pub mod auth;
pub mod config;
pub mod coordinators;
pub mod discovery;
pub mod error;
pub mod events;
pub mod identity;
pub mod in_process;
pub mod postgres;
pub mod server;
pub mod sqlite;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;
pub mod tls;
pub mod topology;
pub mod validate;
pub mod webhook;

pub use error::{ErrorKind, ServiceError};
pub use identity::Identity;
