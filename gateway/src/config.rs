//! Gateway settings, each declared once: its flag, environment variable,
//! default and help on the field (clap), its config-file key the field's
//! name (serde). `fedmesh gateway` merges them from defaults, the `--config`
//! file, the environment and flags (see `fedmesh_common::config`); the dev
//! mesh and tests start from [`GatewayConfig::new`].

use std::time::Duration;

use fedmesh_common::amqp::EventBusSettings;
use fedmesh_common::auth::RateLimitSettings;
use fedmesh_common::config::{ConfigError, check_range};
use fedmesh_common::discovery::{DiscoveryOptions, Peer};
use fedmesh_common::server::ConnectionSettings;
use fedmesh_common::tls::TlsSettings;
use fedmesh_common::topology::AccessPolicy;
use serde::{Deserialize, Serialize};

/// One shard database this gateway writes and reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardConfig {
    /// Shard name as the coordinator knows it, e.g. `west-1`.
    pub name: String,
    /// Database URL: `postgres://user@host/db` or
    /// `sqlite:///var/lib/fedmesh/west-1.sqlite`.
    pub database_url: String,
}

impl ShardConfig {
    /// The shard `name` in the database at `database_url`.
    pub fn new(name: impl Into<String>, database_url: impl Into<String>) -> Self {
        ShardConfig {
            name: name.into(),
            database_url: database_url.into(),
        }
    }
}

impl std::str::FromStr for ShardConfig {
    type Err = String;

    /// `NAME=URL`, as `--shard` takes it.
    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('=') {
            Some((name, url)) if !name.is_empty() && !url.is_empty() => {
                Ok(ShardConfig::new(name, url))
            }
            _ => Err(format!(
                "{text:?} is not NAME=URL, e.g. east-1=postgres://fedmesh@db/east_1"
            )),
        }
    }
}

/// The shards as a config file lists them: a table of name = URL.
mod shard_table {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::ShardConfig;

    pub(super) fn serialize<S: Serializer>(
        shards: &[ShardConfig],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        shards
            .iter()
            .map(|shard| (shard.name.as_str(), shard.database_url.as_str()))
            .collect::<BTreeMap<_, _>>()
            .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<ShardConfig>, D::Error> {
        let table = BTreeMap::<String, String>::deserialize(deserializer)?;
        Ok(table
            .into_iter()
            .map(|(name, url)| ShardConfig::new(name, url))
            .collect())
    }
}

/// Room above the payload limit for the rest of a message on the wire: its
/// ids, kind and up to 64 headers of 4 KiB.
pub const ENVELOPE_BYTES: usize = 512 * 1024;

/// Everything a gateway needs to run.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address to listen on (`fedmesh gateway`; a gateway started in code
    /// serves on the listener it is given).
    #[arg(long, env = "FEDMESH_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: String,
    /// Address of the admin HTTP listener: `/metrics` (Prometheus text
    /// format), `/healthz` (alive) and `/readyz` (ready to work) [default:
    /// none].
    #[arg(long, env = "FEDMESH_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// The region this gateway serves (required).
    #[arg(long, env = "FEDMESH_REGION")]
    pub region: Option<String>,
    /// Stable id of this replica [default: REGION-0].
    #[arg(long, env = "FEDMESH_GATEWAY_ID")]
    pub id: Option<String>,
    /// A shard of the region as NAME=URL (postgres://... or sqlite://...);
    /// repeatable, every shard of the region (environment: separated by
    /// `;`; config file: a table `[shards] east-1 = "postgres://..."`).
    #[arg(
        long = "shard",
        value_name = "NAME=URL",
        env = "FEDMESH_SHARDS",
        value_delimiter = ';'
    )]
    #[serde(default, with = "shard_table")]
    pub shards: Vec<ShardConfig>,
    /// URL of the coordinator, or of its replicas separated by commas: the
    /// gateway moves to the next when one does not answer.
    #[arg(
        long,
        env = "FEDMESH_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// URL other gateways reach this one at [default: https:// (http://
    /// without TLS) and the listening address].
    #[arg(long, env = "FEDMESH_ADVERTISE")]
    pub advertise: Option<String>,
    /// Serve plaintext and trust the x-fedmesh-identity header from
    /// loopback peers (development only: refused on a non-loopback listen
    /// address, ignored when TLS is configured).
    #[arg(long, env = "FEDMESH_DEV_IDENTITY")]
    #[serde(default)]
    pub dev_identity: bool,
    /// Most connections to each shard database for reads, acks and
    /// background work; each commit lane has one more.
    #[arg(long, env = "FEDMESH_SHARD_POOL_SIZE", default_value_t = 16)]
    pub pool_size: u32,
    /// Largest payload accepted, in bytes. Every gateway of a mesh must
    /// have the same: relayed batches are sized by it.
    #[arg(long, env = "FEDMESH_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,
    /// Unacknowledged deliveries per inbox stream when the client asks for
    /// none (0).
    #[arg(long, env = "FEDMESH_DEFAULT_WINDOW", default_value_t = 128)]
    pub default_window: u32,
    /// Most payload bytes one read of an inbox returns, so that a stream
    /// holds about this much in memory whatever its window (a read always
    /// returns at least one message).
    #[arg(long, env = "FEDMESH_RECEIVE_PAGE_BYTES", default_value_t = 1024 * 1024)]
    pub receive_page_bytes: u64,
    /// Most Receive streams of one agency open on this gateway at once,
    /// counting older streams still ending after a newer one took over;
    /// with 1, a new stream is refused while the old one lives.
    #[arg(long, env = "FEDMESH_MAX_STREAMS_PER_AGENCY", default_value_t = 4)]
    pub max_streams_per_agency: usize,
    /// Most messages committed in one transaction.
    #[arg(long, env = "FEDMESH_MAX_BATCH", default_value_t = 256)]
    pub max_batch: usize,
    /// Commit lanes per shard: batches committing at once, each with its
    /// own database connection (SQLite: always 1). A message takes the lane
    /// of its recipient.
    #[arg(long, env = "FEDMESH_COMMIT_LANES", default_value_t = 4)]
    pub commit_lanes: usize,
    /// How long a batch that is not full waits for more, in microseconds
    /// (batches still form while a commit is running).
    #[arg(long, env = "FEDMESH_COMMIT_LINGER_US", default_value_t = 0)]
    pub commit_linger_us: u64,
    /// How long a relay to another region may take, in milliseconds,
    /// before the next gateway of the region is tried.
    #[arg(long, env = "FEDMESH_RELAY_TIMEOUT_MS", default_value_t = 10_000)]
    pub relay_timeout_ms: u64,
    /// DNS domain the gateways of every region are published under: a
    /// region's gateways are the SRV records of
    /// `_fedmesh._tcp.gateway.REGION.DOMAIN`, else the A/AAAA records of
    /// `gateway.REGION.DOMAIN` with `--discovery-port`. Tried before the
    /// gateways the coordinator announces. The coordinators too: the SRV
    /// records of `_fedmesh._tcp.coordinator.DOMAIN`, else the A/AAAA
    /// records of `coordinator.DOMAIN` on port 50051, tried before
    /// `--coordinator` [default: no DNS discovery].
    #[arg(long, env = "FEDMESH_DISCOVERY_DOMAIN")]
    pub discovery_domain: Option<String>,
    /// DNS server to ask, as IP or IP:PORT (port 53 without) [default: the
    /// system's resolver configuration, /etc/resolv.conf].
    #[arg(long, env = "FEDMESH_DISCOVERY_RESOLVER")]
    pub discovery_resolver: Option<String>,
    /// Port of the gateways found by A/AAAA records (a headless service);
    /// SRV records carry their own.
    #[arg(long, env = "FEDMESH_DISCOVERY_PORT", default_value_t = 50052)]
    pub discovery_port: u16,
    /// Seconds a DNS answer is still used after its TTL while lookups fail.
    #[arg(long, env = "FEDMESH_DISCOVERY_GRACE_SECS", default_value_t = 300)]
    pub discovery_grace_secs: u64,
    /// A gateway of another region as REGION=URL, tried after those DNS
    /// and the coordinator name; repeatable (environment: separated by
    /// `;`; config file: a table `[peers] west = ["https://10.0.0.7:50052"]`).
    #[arg(
        long = "peer",
        value_name = "REGION=URL",
        env = "FEDMESH_PEERS",
        value_delimiter = ';'
    )]
    #[serde(default, with = "fedmesh_common::discovery::peer_table")]
    pub peers: Vec<Peer>,
    /// How long a send to or from an agency being moved waits for the
    /// move's cut-over, in milliseconds (at most the caller's deadline);
    /// after it the send is answered UNAVAILABLE, to retry with the same
    /// idempotency key.
    #[arg(long, env = "FEDMESH_MOVE_HOLD_MS", default_value_t = 10_000)]
    pub move_hold_ms: u64,
    /// Days acknowledged messages are kept, and idempotency keys
    /// recognised, before they are deleted.
    #[arg(long, env = "FEDMESH_RETENTION_DAYS", default_value_t = 7)]
    pub retention_days: u64,
    /// How often the retention task runs, in seconds.
    #[arg(long, env = "FEDMESH_RETENTION_INTERVAL_SECS", default_value_t = 60)]
    pub retention_interval_secs: u64,
    /// How often the outbox is looked at even when no commit woke it, in
    /// milliseconds.
    #[arg(long, env = "FEDMESH_OUTBOX_POLL_MS", default_value_t = 1_000)]
    pub outbox_poll_ms: u64,
    /// How the server treats client connections.
    #[command(flatten)]
    pub connections: ConnectionSettings,
    /// Whether agencies may send each other without an access grant
    /// (`fedmesh access grant`): open or closed [default: closed when TLS
    /// is configured, open otherwise]. Checked at the origin gateway and
    /// again at the recipient's home gateway.
    #[arg(long, env = "FEDMESH_ACCESS_POLICY", value_enum)]
    pub access_policy: Option<AccessPolicy>,
    /// Mutual TLS (`[tls]` in the config file).
    #[command(flatten)]
    #[serde(default)]
    pub tls: TlsSettings,
    /// Per-agency rate limits (`[rate_limits]` in the config file).
    #[command(flatten)]
    #[serde(default)]
    pub rate_limits: RateLimitSettings,
    /// Where events go (`[events]` in the config file).
    #[command(flatten)]
    #[serde(default)]
    pub events: EventBusSettings,
}

impl GatewayConfig {
    /// A gateway of `region` with id `gateway_id` on `shards`, reporting to
    /// the coordinator at `coordinator_url`, every other setting at its
    /// default.
    pub fn new(
        gateway_id: impl Into<String>,
        region: impl Into<String>,
        shards: Vec<ShardConfig>,
        coordinator_url: impl Into<String>,
    ) -> Self {
        GatewayConfig {
            id: Some(gateway_id.into()),
            region: Some(region.into()),
            shards,
            coordinator: coordinator_url.into(),
            ..fedmesh_common::config::defaults()
        }
    }

    /// Refuses settings the gateway cannot run with; names the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fedmesh_common::telemetry::check_admin_listen(self.admin_listen.as_deref())?;
        let region = self.region.as_deref().ok_or_else(|| {
            ConfigError::setting(
                "region",
                "no region given: use --region NAME or region in --config",
            )
        })?;
        fedmesh_common::validate::region("region", region)
            .map_err(|invalid| ConfigError::setting("region", invalid.description))?;
        if self.shards.is_empty() {
            return Err(ConfigError::Setting {
                key: "shards",
                flag: "shard".into(),
                problem: "no shard given: use --shard NAME=URL or [shards] in --config".into(),
            });
        }
        for shard in &self.shards {
            fedmesh_common::store::Backend::of_url(&shard.database_url).map_err(|error| {
                ConfigError::Setting {
                    key: "shards",
                    flag: "shard".into(),
                    problem: format!("shard {}: {error}", shard.name),
                }
            })?;
        }
        check_range("pool_size", self.pool_size, 1..=1_000)?;
        check_range(
            "max_payload_bytes",
            self.max_payload_bytes,
            1..=64 * 1024 * 1024,
        )?;
        check_range(
            "default_window",
            self.default_window,
            1..=crate::inbox::stream::MAX_WINDOW,
        )?;
        check_range("receive_page_bytes", self.receive_page_bytes, 1..=1 << 30)?;
        check_range(
            "max_streams_per_agency",
            self.max_streams_per_agency,
            1..=1_000,
        )?;
        check_range("max_batch", self.max_batch, 1..=10_000)?;
        check_range("commit_lanes", self.commit_lanes, 1..=64)?;
        check_range("commit_linger_us", self.commit_linger_us, 0..=1_000_000)?;
        check_range("relay_timeout_ms", self.relay_timeout_ms, 1..=3_600_000)?;
        check_range("move_hold_ms", self.move_hold_ms, 0..=3_600_000)?;
        self.validate_discovery()?;
        check_range("retention_days", self.retention_days, 1..=36_500)?;
        check_range(
            "retention_interval_secs",
            self.retention_interval_secs,
            1..=86_400,
        )?;
        check_range("outbox_poll_ms", self.outbox_poll_ms, 1..=3_600_000)?;
        self.connections.validate()?;
        self.tls.validate()?;
        self.rate_limits.validate()?;
        self.events.validate()
    }

    /// Refuses discovery settings that cannot be used; names the setting.
    fn validate_discovery(&self) -> Result<(), ConfigError> {
        fedmesh_common::discovery::check_dns_settings(
            self.discovery_domain.as_deref(),
            self.discovery_resolver.as_deref(),
        )?;
        check_range("discovery_port", self.discovery_port, 1..=u16::MAX)?;
        check_range(
            "discovery_grace_secs",
            self.discovery_grace_secs,
            0..=86_400,
        )?;
        let peer_problem = |problem: String| ConfigError::Setting {
            key: "peers",
            flag: "peer".into(),
            problem,
        };
        for peer in &self.peers {
            fedmesh_common::validate::region("peers", &peer.region).map_err(|invalid| {
                peer_problem(format!(
                    "{}={}: {}",
                    peer.region, peer.url, invalid.description
                ))
            })?;
            if peer.region == self.region() {
                return Err(peer_problem(format!(
                    "{} is in this gateway's own region {}: peers are gateways of other regions",
                    peer.url, peer.region
                )));
            }
            peer.check().map_err(peer_problem)?;
        }
        Ok(())
    }

    /// How this gateway finds the gateways of other regions besides the
    /// topology; `scheme` is the mesh's (`https` on TLS). Call after
    /// [`GatewayConfig::validate`].
    pub fn discovery(&self, scheme: &'static str) -> DiscoveryOptions {
        DiscoveryOptions {
            domain: self.discovery_domain.clone(),
            resolver: self.discovery_resolver.as_deref().and_then(|resolver| {
                fedmesh_common::discovery::parse_resolver_address(resolver).ok()
            }),
            port: self.discovery_port,
            grace: Duration::from_secs(self.discovery_grace_secs),
            scheme,
            peers: self.peers.clone(),
        }
    }

    /// The same settings with the passwords in database URLs hidden, to
    /// print them.
    pub fn redacted(&self) -> Self {
        let mut redacted = self.clone();
        for shard in &mut redacted.shards {
            shard.database_url = fedmesh_common::store::redact_url(&shard.database_url);
        }
        redacted.events = self.events.redacted();
        redacted
    }

    /// The region this gateway serves (empty before validation).
    pub fn region(&self) -> &str {
        self.region.as_deref().unwrap_or_default()
    }

    /// The id of this replica: `--id`, or the region's first.
    pub fn gateway_id(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("{}-0", self.region()))
    }

    /// Whether sends need a grant.
    pub fn access_policy(&self) -> AccessPolicy {
        self.access_policy.unwrap_or(if self.tls.enabled() {
            AccessPolicy::Closed
        } else {
            AccessPolicy::Open
        })
    }

    /// The largest gRPC message this gateway sends or receives: one
    /// message of the largest payload with its envelope.
    pub fn max_message_bytes(&self) -> usize {
        self.max_payload_bytes.saturating_add(ENVELOPE_BYTES)
    }

    /// How long a batch that is not full waits for more messages.
    pub fn commit_linger(&self) -> Duration {
        Duration::from_micros(self.commit_linger_us)
    }

    /// How long a relayed batch may take at one gateway.
    pub fn relay_timeout(&self) -> Duration {
        Duration::from_millis(self.relay_timeout_ms)
    }

    /// How long acknowledged messages and idempotency keys are kept.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_days.saturating_mul(24 * 3600))
    }

    /// How often the retention task runs.
    pub fn retention_interval(&self) -> Duration {
        Duration::from_secs(self.retention_interval_secs)
    }

    /// How often the outbox is polled regardless of commits.
    pub fn outbox_poll_interval(&self) -> Duration {
        Duration::from_millis(self.outbox_poll_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_given_a_region_and_a_shard() {
        let config = GatewayConfig::new(
            "east-0",
            "east",
            vec![ShardConfig::new("east-1", "sqlite:///tmp/east-1.sqlite")],
            "http://127.0.0.1:50051",
        );
        config.validate().expect("valid");
        assert_eq!(config.max_payload_bytes, 1024 * 1024);
        assert_eq!(config.retention(), Duration::from_secs(7 * 24 * 3600));
        assert_eq!(config.gateway_id(), "east-0");
    }

    #[test]
    fn discovery_is_off_by_default_and_its_settings_are_checked() {
        let mut config = GatewayConfig::new(
            "east-0",
            "east",
            vec![ShardConfig::new("east-1", "sqlite:///tmp/east-1.sqlite")],
            "http://127.0.0.1:50051",
        );
        let options = config.discovery("http");
        assert_eq!(options.domain, None, "no DNS unless asked");
        assert!(options.peers.is_empty());
        assert_eq!(options.port, 50052);
        assert_eq!(options.grace, Duration::from_secs(300));

        config.discovery_domain = Some("mesh.example.org".into());
        config.discovery_resolver = Some("10.0.0.2".into());
        config.peers = vec!["west=https://10.0.0.7:50052".parse().expect("peer")];
        config.validate().expect("valid");
        let options = config.discovery("https");
        assert_eq!(options.resolver, "10.0.0.2:53".parse().ok());
        assert_eq!(options.scheme, "https");
        assert_eq!(options.peers.len(), 1);

        config.discovery_domain = None;
        let error = config.validate().expect_err("a resolver without a domain");
        assert!(
            error
                .to_string()
                .starts_with("discovery_resolver (--discovery-resolver)"),
            "{error}"
        );
        assert!(error.to_string().contains("--discovery-domain"), "{error}");
    }

    #[test]
    fn overflowing_and_missing_settings_are_refused_by_name() {
        let mut config = GatewayConfig::new(
            "east-0",
            "east",
            vec![ShardConfig::new("east-1", "sqlite:///tmp/east-1.sqlite")],
            "http://127.0.0.1:50051",
        );
        config.retention_days = u64::MAX / 1000;
        let error = config.validate().expect_err("overflow");
        assert!(
            error
                .to_string()
                .starts_with("retention_days (--retention-days)"),
            "{error}"
        );
        config.retention_days = 7;
        config.shards.clear();
        let error = config.validate().expect_err("no shard");
        assert!(error.to_string().contains("--shard"), "{error}");
        config.shards = vec![ShardConfig::new("east-1", "mysql://db/x")];
        let error = config.validate().expect_err("bad url");
        assert!(error.to_string().contains("neither postgres"), "{error}");
    }
}
