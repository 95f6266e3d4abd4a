//! End-to-end tests: the dev mesh in-process on ephemeral ports, driven over
//! gRPC as agencies, operators and subscribers would.

#![allow(clippy::unwrap_used, unreachable_pub)]

mod bad_input;
mod bus;
mod cli;
mod discovery;
mod events;
mod governance;
mod inbox;
mod limits;
mod messaging;
mod moves;
mod operations;
mod properties;
mod queues;
mod replicas;
mod scale;
mod security;
mod serving;
mod spool;
mod subscriptions;
mod trace;
mod webhooks;
