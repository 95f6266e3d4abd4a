//! `fedmesh coordinator` and `fedmesh gateway`: one role per process, as in
//! a deployment. Each setting comes from, in order: its flag, its
//! environment variable (named in `--help`), the TOML file given with
//! `--config`, its default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use fedmesh_common::events::NoBus;
use fedmesh_common::identity::IdentityMode;
use fedmesh_coordinator::{CoordinatorConfig, RegionConfig};
use fedmesh_gateway::{GatewayConfig, ShardConfig};
use serde::Deserialize;

use crate::signal::stop_on_signal;

/// `fedmesh coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// TOML file with the settings below (keys as the flags, with `_` for
    /// `-`; regions as a table `[regions] east = ["east-1"]`).
    #[arg(long, env = "FEDMESH_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051].
    #[arg(long, env = "FEDMESH_LISTEN")]
    pub listen: Option<String>,
    /// Control database: postgres://user@host/db or sqlite:///path/control.sqlite.
    #[arg(long, env = "FEDMESH_DB")]
    pub db: Option<String>,
    /// A region and its shards, as NAME=SHARD[,SHARD...]; repeatable
    /// (environment: separated by ';').
    #[arg(
        long = "region",
        value_name = "NAME=SHARDS",
        env = "FEDMESH_REGIONS",
        value_delimiter = ';'
    )]
    pub regions: Vec<String>,
    /// Most connections to the control database [default: 8].
    #[arg(long, env = "FEDMESH_DB_POOL_SIZE")]
    pub pool_size: Option<u32>,
    /// Trust the x-fedmesh-identity header from loopback peers. Without it
    /// every call is refused until mutual TLS is configured.
    #[arg(long, env = "FEDMESH_DEV_IDENTITY")]
    pub dev_identity: bool,
}

/// The `--config` file of a coordinator.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CoordinatorFile {
    listen: Option<String>,
    db: Option<String>,
    #[serde(default)]
    regions: BTreeMap<String, Vec<String>>,
    pool_size: Option<u32>,
    #[serde(default)]
    dev_identity: bool,
}

/// `fedmesh gateway`.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// TOML file with the settings below (keys as the flags, with `_` for
    /// `-`; shards as a table `[shards] west-1 = "postgres://..."`).
    #[arg(long, env = "FEDMESH_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50052].
    #[arg(long, env = "FEDMESH_LISTEN")]
    pub listen: Option<String>,
    /// The region this gateway serves.
    #[arg(long, env = "FEDMESH_REGION")]
    pub region: Option<String>,
    /// Stable id of this replica [default: REGION-0].
    #[arg(long, env = "FEDMESH_GATEWAY_ID")]
    pub id: Option<String>,
    /// A shard of the region as NAME=URL (postgres://... or sqlite://...);
    /// repeatable (environment: separated by ';').
    #[arg(
        long = "shard",
        value_name = "NAME=URL",
        env = "FEDMESH_SHARDS",
        value_delimiter = ';'
    )]
    pub shards: Vec<String>,
    /// Most connections to each shard database for reads, acks and
    /// background work [default: 16]; each commit lane has one more.
    #[arg(long, env = "FEDMESH_SHARD_POOL_SIZE")]
    pub pool_size: Option<u32>,
    /// URL other gateways reach this one at [default: http:// and --listen].
    #[arg(long, env = "FEDMESH_ADVERTISE")]
    pub advertise: Option<String>,
    /// Largest payload accepted, in bytes [default: 1048576].
    #[arg(long, env = "FEDMESH_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Most messages committed in one transaction [default: 256].
    #[arg(long, env = "FEDMESH_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Commit lanes per shard (batches committing at once, each with its own
    /// database connection) [default: 4].
    #[arg(long, env = "FEDMESH_COMMIT_LANES")]
    pub commit_lanes: Option<usize>,
    /// How long a batch that is not full waits for more, in microseconds
    /// [default: 0].
    #[arg(long, env = "FEDMESH_COMMIT_LINGER_US")]
    pub commit_linger_us: Option<u64>,
    /// Days acknowledged messages are kept [default: 7].
    #[arg(long, env = "FEDMESH_RETENTION_DAYS")]
    pub retention_days: Option<u64>,
    /// Trust the x-fedmesh-identity header from loopback peers. Without it
    /// every call is refused until mutual TLS is configured.
    #[arg(long, env = "FEDMESH_DEV_IDENTITY")]
    pub dev_identity: bool,
}

/// The `--config` file of a gateway.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayFile {
    listen: Option<String>,
    region: Option<String>,
    id: Option<String>,
    coordinator: Option<String>,
    #[serde(default)]
    shards: BTreeMap<String, String>,
    pool_size: Option<u32>,
    advertise: Option<String>,
    max_payload_bytes: Option<usize>,
    max_batch: Option<usize>,
    commit_lanes: Option<usize>,
    commit_linger_us: Option<u64>,
    retention_days: Option<u64>,
    #[serde(default)]
    dev_identity: bool,
}

fn read_file<T: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text)
        .map_err(|error| anyhow::anyhow!("{}: {}", path.display(), error.to_string().trim()))
}

fn identity_mode(dev_identity: bool) -> IdentityMode {
    if dev_identity {
        tracing::warn!(
            "dev identity: the caller identity is read from the x-fedmesh-identity header, from loopback peers only; no TLS"
        );
        IdentityMode::DevHeader
    } else {
        tracing::warn!(
            "no authentication is configured yet (mutual TLS is not available): every call will be refused; use --dev-identity on a development machine"
        );
        IdentityMode::Refuse
    }
}

fn split_pair<'a>(text: &'a str, flag: &str, shape: &str) -> anyhow::Result<(&'a str, &'a str)> {
    text.split_once('=')
        .filter(|(name, value)| !name.is_empty() && !value.is_empty())
        .with_context(|| format!("{flag} {text:?} is not {shape}"))
}

async fn bind(listen: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))
}

/// The coordinator configuration and listen address `args` and its file give.
fn coordinator_config(args: CoordinatorArgs) -> anyhow::Result<(CoordinatorConfig, String)> {
    let file: CoordinatorFile = read_file(args.config.as_deref())?;
    let mut regions = Vec::new();
    if args.regions.is_empty() {
        for (name, shards) in file.regions {
            regions.push(RegionConfig { name, shards });
        }
    } else {
        for region in &args.regions {
            let (name, shards) = split_pair(region, "--region", "NAME=SHARD[,SHARD...]")?;
            regions.push(RegionConfig {
                name: name.to_string(),
                shards: shards.split(',').map(str::to_string).collect(),
            });
        }
    }
    anyhow::ensure!(
        !regions.is_empty(),
        "no region given: use --region NAME=SHARD[,SHARD...] or [regions] in --config"
    );
    let db = args
        .db
        .or(file.db)
        .context("no control database given: use --db URL or db in --config")?;
    let mut config = CoordinatorConfig::new(regions, db);
    config.max_connections = args
        .pool_size
        .or(file.pool_size)
        .unwrap_or(config.max_connections);
    config.identity_mode = identity_mode(args.dev_identity || file.dev_identity);
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| "127.0.0.1:50051".to_string());
    Ok((config, listen))
}

/// Runs a coordinator until Ctrl-C or SIGTERM.
pub async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let (config, listen) = coordinator_config(args)?;
    let listener = bind(&listen).await?;
    fedmesh_coordinator::run(config, listener, Arc::new(NoBus), stop_on_signal()).await?;
    Ok(())
}

/// The gateway configuration and listen address `args` and its file give;
/// `coordinator_url` is the `--coordinator` flag, if given.
fn gateway_config(
    args: GatewayArgs,
    coordinator_url: Option<String>,
) -> anyhow::Result<(GatewayConfig, String)> {
    let file: GatewayFile = read_file(args.config.as_deref())?;
    let mut shards: Vec<(String, String)> = Vec::new();
    if args.shards.is_empty() {
        shards.extend(file.shards);
    } else {
        for shard in &args.shards {
            let (name, url) = split_pair(shard, "--shard", "NAME=URL")?;
            shards.push((name.to_string(), url.to_string()));
        }
    }
    anyhow::ensure!(
        !shards.is_empty(),
        "no shard given: use --shard NAME=URL or [shards] in --config"
    );
    let pool_size = args.pool_size.or(file.pool_size);
    let shards = shards
        .into_iter()
        .map(|(name, url)| {
            let mut shard = ShardConfig::new(name, url);
            shard.max_connections = pool_size.unwrap_or(shard.max_connections);
            shard
        })
        .collect();
    let region = args
        .region
        .or(file.region)
        .context("no region given: use --region NAME or region in --config")?;
    let gateway_id = args.id.or(file.id).unwrap_or_else(|| format!("{region}-0"));
    let coordinator_url = coordinator_url
        .or(file.coordinator)
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_string());
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| "127.0.0.1:50052".to_string());
    let mut config = GatewayConfig::new(gateway_id, region, shards, coordinator_url);
    config.advertise_url = Some(
        args.advertise
            .or(file.advertise)
            .unwrap_or_else(|| format!("http://{listen}")),
    );
    config.identity_mode = identity_mode(args.dev_identity || file.dev_identity);
    config.max_payload_bytes = args
        .max_payload_bytes
        .or(file.max_payload_bytes)
        .unwrap_or(config.max_payload_bytes);
    config.max_batch = args
        .max_batch
        .or(file.max_batch)
        .unwrap_or(config.max_batch);
    config.commit_lanes = args
        .commit_lanes
        .or(file.commit_lanes)
        .unwrap_or(config.commit_lanes);
    if let Some(linger) = args.commit_linger_us.or(file.commit_linger_us) {
        config.commit_linger = Duration::from_micros(linger);
    }
    if let Some(days) = args.retention_days.or(file.retention_days) {
        config.retention = Duration::from_secs(days * 24 * 3600);
    }
    Ok((config, listen))
}

/// Runs a gateway until Ctrl-C or SIGTERM.
pub async fn gateway(args: GatewayArgs, coordinator_url: Option<String>) -> anyhow::Result<()> {
    let (config, listen) = gateway_config(args, coordinator_url)?;
    let listener = bind(&listen).await?;
    fedmesh_gateway::run(config, listener, Arc::new(NoBus), stop_on_signal()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Gateway {
        #[command(flatten)]
        args: GatewayArgs,
    }

    #[test]
    fn flags_override_the_config_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            "region = \"west\"\nmax_batch = 64\ncoordinator = \"http://10.0.0.1:50051\"\n[shards]\nwest-1 = \"postgres://db/west_1\"\n",
        )
        .expect("write");
        let config_flag = path.display().to_string();
        let parsed =
            Gateway::try_parse_from(["gateway", "--config", &config_flag, "--max-batch", "32"])
                .expect("parse");
        let (config, listen) = gateway_config(parsed.args, None).expect("config");
        assert_eq!(config.region, "west");
        assert_eq!(config.gateway_id, "west-0");
        assert_eq!(config.max_batch, 32, "the flag wins over the file");
        assert_eq!(config.coordinator_url, "http://10.0.0.1:50051");
        assert_eq!(config.shards[0].database_url, "postgres://db/west_1");
        assert_eq!(listen, "127.0.0.1:50052");
    }

    #[test]
    fn unknown_keys_and_missing_settings_are_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, "regoin = \"west\"\n").expect("write");
        let config_flag = path.display().to_string();
        let parsed = Gateway::try_parse_from(["gateway", "--config", &config_flag]).expect("parse");
        let error = gateway_config(parsed.args, None).expect_err("typo");
        assert!(format!("{error:#}").contains("regoin"), "{error:#}");

        let parsed = Gateway::try_parse_from(["gateway", "--region", "west"]).expect("parse");
        let error = gateway_config(parsed.args, None).expect_err("no shard");
        assert!(format!("{error:#}").contains("--shard"), "{error:#}");
    }
}
