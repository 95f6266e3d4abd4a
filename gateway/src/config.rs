//! Gateway configuration.

use std::time::Duration;

use fedmesh_common::identity::IdentityMode;

/// One shard database this gateway writes and reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardConfig {
    /// Shard name as the coordinator knows it, e.g. `west-1`.
    pub name: String,
    /// Database URL: `postgres://user@host/db` or
    /// `sqlite:///var/lib/fedmesh/west-1.sqlite`.
    pub database_url: String,
    /// Most connections to this shard (PostgreSQL). Default: 16.
    pub max_connections: u32,
}

impl ShardConfig {
    /// A shard with the default pool size.
    pub fn new(name: impl Into<String>, database_url: impl Into<String>) -> Self {
        ShardConfig {
            name: name.into(),
            database_url: database_url.into(),
            max_connections: 16,
        }
    }
}

/// Everything a gateway needs to run.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Stable id of this gateway instance, e.g. `east-0`.
    pub gateway_id: String,
    /// The region this gateway serves.
    pub region: String,
    /// The shards of the region. Every shard of the region must be listed
    /// for the gateway to reach every agency homed in it.
    pub shards: Vec<ShardConfig>,
    /// URL of the coordinator, e.g. `http://127.0.0.1:50051`.
    pub coordinator_url: String,
    /// URL other gateways reach this one at. Default: `http://` plus the
    /// listener's local address.
    pub advertise_url: Option<String>,
    /// How callers are authenticated. Default: refuse everything.
    pub identity_mode: IdentityMode,
    /// Largest payload accepted, in bytes. Default: 1 MiB.
    pub max_payload_bytes: usize,
    /// Unacknowledged deliveries per inbox stream when the client asks for
    /// none. Default: 128.
    pub default_window: u32,
    /// Most messages committed in one transaction. Default: 256.
    pub max_batch: usize,
    /// How long a batch that is not full waits for more messages before it
    /// commits. Default: 0 (batches still form while a commit is running).
    pub commit_linger: Duration,
    /// Commit lanes per shard: how many batches may commit at once. A
    /// message takes the lane of its recipient. Default: 4 (SQLite: 1).
    pub commit_lanes: usize,
    /// How long a relay to another region may take before the next gateway
    /// is tried. Default: 10 s.
    pub relay_timeout: Duration,
    /// How long acknowledged messages are kept (and retried sends with their
    /// idempotency key recognised) before they are deleted. Default: 7 days.
    pub retention: Duration,
    /// How often the gateway's retention task runs. Default: 60 s.
    pub retention_interval: Duration,
    /// How often the outbox is polled even when no commit woke it.
    /// Default: 1 s.
    pub outbox_poll_interval: Duration,
}

impl GatewayConfig {
    /// A configuration with the defaults above.
    pub fn new(
        gateway_id: impl Into<String>,
        region: impl Into<String>,
        shards: Vec<ShardConfig>,
        coordinator_url: impl Into<String>,
    ) -> Self {
        GatewayConfig {
            gateway_id: gateway_id.into(),
            region: region.into(),
            shards,
            coordinator_url: coordinator_url.into(),
            advertise_url: None,
            identity_mode: IdentityMode::Refuse,
            max_payload_bytes: 1024 * 1024,
            default_window: 128,
            max_batch: 256,
            commit_linger: Duration::ZERO,
            commit_lanes: 4,
            relay_timeout: Duration::from_secs(10),
            retention: Duration::from_secs(7 * 24 * 3600),
            retention_interval: Duration::from_secs(60),
            outbox_poll_interval: Duration::from_secs(1),
        }
    }
}
