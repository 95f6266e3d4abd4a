//! The `fedmesh` command line as a library: the commands ([`cli`]), the
//! one-process dev mesh ([`dev`]) and the client plumbing ([`client`]). The
//! binary only parses arguments, sets up logging and calls [`cli::run`]; the
//! end-to-end tests start the same [`dev::DevMesh`].

pub mod bench;
pub mod certs;
pub mod cli;
pub mod client;
pub mod commands;
pub mod dev;
pub mod fanout;
pub mod governance;
pub mod moves;
pub mod regions;
pub mod serve;
pub mod signal;
pub mod subscriptions;
