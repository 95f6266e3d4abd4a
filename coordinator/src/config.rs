//! Coordinator settings, each declared once: flag, environment variable,
//! default and help on the field (clap), config-file key the field's name
//! (serde). See `fedmesh_common::config` for how they are merged.

use std::time::Duration;

use fedmesh_common::amqp::EventBusSettings;
use fedmesh_common::auth::RateLimitSettings;

use crate::lease::LeaseSettings;
use fedmesh_common::config::{ConfigError, check_range};
use fedmesh_common::server::ConnectionSettings;
use fedmesh_common::tls::TlsSettings;
use serde::{Deserialize, Serialize};

/// A region of the mesh and its shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionConfig {
    /// Region name, e.g. `east`.
    pub name: String,
    /// Shard names of the region, e.g. `east-1`. At least one.
    pub shards: Vec<String>,
}

impl std::str::FromStr for RegionConfig {
    type Err = String;

    /// `NAME=SHARD[,SHARD...]`, as `--region` takes it.
    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('=') {
            Some((name, shards)) if !name.is_empty() && !shards.is_empty() => Ok(RegionConfig {
                name: name.to_string(),
                shards: shards.split(',').map(str::to_string).collect(),
            }),
            _ => Err(format!(
                "{text:?} is not NAME=SHARD[,SHARD...], e.g. east=east-1,east-2"
            )),
        }
    }
}

/// The regions as a config file lists them: a table of name = [shards].
mod region_table {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::RegionConfig;

    pub(super) fn serialize<S: Serializer>(
        regions: &[RegionConfig],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        regions
            .iter()
            .map(|region| (region.name.as_str(), &region.shards))
            .collect::<BTreeMap<_, _>>()
            .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<RegionConfig>, D::Error> {
        let table = BTreeMap::<String, Vec<String>>::deserialize(deserializer)?;
        Ok(table
            .into_iter()
            .map(|(name, shards)| RegionConfig { name, shards })
            .collect())
    }
}

/// Everything a coordinator needs to run.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address to listen on (`fedmesh coordinator`; a coordinator started in
    /// code serves on the listener it is given).
    #[arg(long, env = "FEDMESH_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Address of the admin HTTP listener: `/metrics` (Prometheus text
    /// format), `/healthz` (alive) and `/readyz` (ready to work) [default:
    /// none].
    #[arg(long, env = "FEDMESH_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Stable id of this replica, as the leader lease names its holder
    /// [default: coordinator- and a random suffix, new at each start].
    #[arg(long, env = "FEDMESH_COORDINATOR_ID")]
    pub id: Option<String>,
    /// The leader lease (`[lease]` in the config file).
    #[command(flatten)]
    #[serde(default)]
    pub lease: LeaseSettings,
    /// Control database: postgres://user@host/db or
    /// sqlite:///path/control.sqlite (created if missing); migrations are
    /// applied at start (required).
    #[arg(long, env = "FEDMESH_DB")]
    pub db: Option<String>,
    /// A region and its shards, as NAME=SHARD[,SHARD...]; repeatable
    /// (environment: separated by `;`; config file: a table
    /// `[regions] east = ["east-1"]`). Agencies are registered only in these.
    #[arg(
        long = "region",
        value_name = "NAME=SHARDS",
        env = "FEDMESH_REGIONS",
        value_delimiter = ';'
    )]
    #[serde(default, with = "region_table")]
    pub regions: Vec<RegionConfig>,
    /// Most connections to the control database.
    #[arg(long, env = "FEDMESH_DB_POOL_SIZE", default_value_t = 8)]
    pub pool_size: u32,
    /// Serve plaintext and trust the x-fedmesh-identity header from
    /// loopback peers (development only: refused on a non-loopback listen
    /// address, ignored when TLS is configured).
    #[arg(long, env = "FEDMESH_DEV_IDENTITY")]
    #[serde(default)]
    pub dev_identity: bool,
    /// How often gateways and notifiers are asked to report, in
    /// milliseconds.
    #[arg(long, env = "FEDMESH_REPORT_INTERVAL_MS", default_value_t = 5_000)]
    pub report_interval_ms: u64,
    /// A gateway or notifier not heard from for this long, in milliseconds,
    /// leaves the topology.
    #[arg(long, env = "FEDMESH_EXPIRY_MS", default_value_t = 15_000)]
    pub expiry_ms: u64,
    /// How often the directory is read again for changes other replicas
    /// made, in milliseconds (how long they may take to show here).
    #[arg(long, env = "FEDMESH_SYNC_MS", default_value_t = 1_000)]
    pub sync_ms: u64,
    /// How often the outbox is looked at even when no change woke it, in
    /// milliseconds.
    #[arg(long, env = "FEDMESH_OUTBOX_POLL_MS", default_value_t = 1_000)]
    pub outbox_poll_ms: u64,
    /// How the server treats client connections.
    #[command(flatten)]
    pub connections: ConnectionSettings,
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

impl CoordinatorConfig {
    /// A coordinator of `regions` on the control database at
    /// `database_url`, every other setting at its default.
    pub fn new(regions: Vec<RegionConfig>, database_url: impl Into<String>) -> Self {
        CoordinatorConfig {
            regions,
            db: Some(database_url.into()),
            ..fedmesh_common::config::defaults()
        }
    }

    /// Refuses settings the coordinator cannot run with; names the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fedmesh_common::telemetry::check_admin_listen(self.admin_listen.as_deref())?;
        let db = self.db.as_deref().ok_or_else(|| {
            ConfigError::setting(
                "db",
                "no control database given: use --db URL or db in --config",
            )
        })?;
        fedmesh_common::store::Backend::of_url(db)
            .map_err(|error| ConfigError::setting("db", error.to_string()))?;
        if self.regions.is_empty() {
            return Err(ConfigError::Setting {
                key: "regions",
                flag: "region".into(),
                problem:
                    "no region given: use --region NAME=SHARD[,SHARD...] or [regions] in --config"
                        .into(),
            });
        }
        for region in &self.regions {
            let invalid = fedmesh_common::validate::region("regions", &region.name)
                .err()
                .map(|invalid| invalid.description)
                .or_else(|| {
                    region
                        .shards
                        .iter()
                        .find_map(|shard| {
                            fedmesh_common::validate::agency_id("regions", shard).err()
                        })
                        .map(|invalid| {
                            format!("region {}: shard {}", region.name, invalid.description)
                        })
                });
            if let Some(problem) = invalid {
                return Err(ConfigError::Setting {
                    key: "regions",
                    flag: "region".into(),
                    problem,
                });
            }
        }
        check_range("pool_size", self.pool_size, 1..=1_000)?;
        check_range(
            "report_interval_ms",
            self.report_interval_ms,
            10..=3_600_000,
        )?;
        check_range("expiry_ms", self.expiry_ms, 10..=86_400_000)?;
        check_range("outbox_poll_ms", self.outbox_poll_ms, 1..=3_600_000)?;
        self.connections.validate()?;
        self.tls.validate()?;
        self.rate_limits.validate()?;
        self.lease.validate()?;
        check_range("sync_ms", self.sync_ms, 10..=3_600_000)?;
        if let Some(id) = &self.id {
            fedmesh_common::validate::agency_id("id", id)
                .map_err(|invalid| ConfigError::setting("id", invalid.description))?;
        }
        self.events.validate()
    }

    /// The same settings with the password in the database URL hidden, to
    /// print them.
    pub fn redacted(&self) -> Self {
        CoordinatorConfig {
            db: self.db.as_deref().map(fedmesh_common::store::redact_url),
            events: self.events.redacted(),
            ..self.clone()
        }
    }

    /// The control database URL (empty before validation).
    pub fn database_url(&self) -> &str {
        self.db.as_deref().unwrap_or_default()
    }

    /// How often gateways and notifiers report.
    pub fn report_interval(&self) -> Duration {
        Duration::from_millis(self.report_interval_ms)
    }

    /// How long an instance may stay silent before it leaves the topology.
    pub fn expiry(&self) -> Duration {
        Duration::from_millis(self.expiry_ms)
    }

    /// How often the directory is read again for other replicas' changes.
    pub fn sync_interval(&self) -> Duration {
        Duration::from_millis(self.sync_ms)
    }

    /// How often the outbox is polled regardless of changes.
    pub fn outbox_poll_interval(&self) -> Duration {
        Duration::from_millis(self.outbox_poll_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_need_shards_with_valid_names() {
        let config = CoordinatorConfig::new(
            vec!["east=east-1,east-2".parse().expect("valid")],
            "sqlite:///tmp/control.sqlite",
        );
        config.validate().expect("valid");
        assert_eq!(config.regions[0].shards, vec!["east-1", "east-2"]);
        assert!("east".parse::<RegionConfig>().is_err());
        let bad = CoordinatorConfig::new(
            vec!["east=East_1".parse().expect("parses")],
            "sqlite:///tmp/control.sqlite",
        );
        let error = bad.validate().expect_err("bad shard name");
        assert!(error.to_string().contains("East_1"), "{error}");
    }
}
