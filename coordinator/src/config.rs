//! Coordinator configuration.

use std::time::Duration;

use fedmesh_common::identity::IdentityMode;
use fedmesh_common::server::ConnectionSettings;

/// A region of the mesh and its shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionConfig {
    /// Region name, e.g. `east`.
    pub name: String,
    /// Shard names of the region, e.g. `east-1`. At least one.
    pub shards: Vec<String>,
}

/// Everything a coordinator needs to run.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The regions of the mesh. Agencies can be registered only in these.
    pub regions: Vec<RegionConfig>,
    /// Control database URL: `postgres://user@host/db` or
    /// `sqlite:///var/lib/fedmesh/control.sqlite` (created if missing).
    /// Migrations are applied at start.
    pub database_url: String,
    /// Most connections to the control database (PostgreSQL). Default: 8.
    pub max_connections: u32,
    /// How callers are authenticated. Default: refuse everything.
    pub identity_mode: IdentityMode,
    /// How often gateways are asked to report. Default: 5 s.
    pub gateway_report_interval: Duration,
    /// A gateway not heard from for this long leaves the topology.
    /// Default: three report intervals.
    pub gateway_expiry: Duration,
    /// How often the outbox is polled even when no commit woke it.
    /// Default: 1 s.
    pub outbox_poll_interval: Duration,
    /// How the server treats connections (streams per connection,
    /// keepalive). Default: see [`ConnectionSettings`].
    pub connections: ConnectionSettings,
}

impl CoordinatorConfig {
    /// A configuration with the defaults above.
    pub fn new(regions: Vec<RegionConfig>, database_url: impl Into<String>) -> Self {
        let gateway_report_interval = Duration::from_secs(5);
        CoordinatorConfig {
            regions,
            database_url: database_url.into(),
            max_connections: 8,
            identity_mode: IdentityMode::Refuse,
            gateway_report_interval,
            gateway_expiry: gateway_report_interval * 3,
            outbox_poll_interval: Duration::from_secs(1),
            connections: ConnectionSettings::default(),
        }
    }
}
