//! Gateway configuration.

use std::time::Duration;

use fedmesh_common::identity::IdentityMode;
use fedmesh_common::server::ConnectionSettings;

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
    /// Most payload bytes one read of an inbox returns, so that a stream
    /// holds about this much in memory whatever its window (a page always
    /// holds one message). Default: 1 MiB.
    pub receive_page_bytes: u64,
    /// Most Receive streams of one agency open on this gateway at once,
    /// counting older streams still ending after a newer one took over.
    /// Default: 4; with 1, a new stream is refused while the old one lives.
    pub max_streams_per_agency: usize,
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
    /// How the server treats connections (streams per connection,
    /// keepalive). Default: see [`ConnectionSettings`].
    pub connections: ConnectionSettings,
}

/// Room above the payload limit for the rest of a message on the wire: its
/// ids, kind and up to 64 headers of 4 KiB.
pub const ENVELOPE_BYTES: usize = 512 * 1024;

impl GatewayConfig {
    /// The largest gRPC message this gateway sends or receives: one
    /// message of the largest payload with its envelope.
    pub fn max_message_bytes(&self) -> usize {
        self.max_payload_bytes.saturating_add(ENVELOPE_BYTES)
    }

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
            receive_page_bytes: 1024 * 1024,
            max_streams_per_agency: 4,
            max_batch: 256,
            commit_linger: Duration::ZERO,
            commit_lanes: 4,
            relay_timeout: Duration::from_secs(10),
            retention: Duration::from_secs(7 * 24 * 3600),
            retention_interval: Duration::from_secs(60),
            outbox_poll_interval: Duration::from_secs(1),
            connections: ConnectionSettings::default(),
        }
    }
}
