//! `fedmesh coordinator` and `fedmesh gateway`: one role per process, as in
//! a deployment. Every flag can also be given through the environment
//! variable named in its help.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use fedmesh_common::events::NoBus;
use fedmesh_common::identity::IdentityMode;
use fedmesh_coordinator::{CoordinatorConfig, RegionConfig};
use fedmesh_gateway::{GatewayConfig, ShardConfig};
use tokio_util::sync::CancellationToken;

use crate::cli::wait_for_signal;

/// `fedmesh coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// Address to listen on.
    #[arg(long, env = "FEDMESH_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Control database: postgres://user@host/db or sqlite:///path/control.sqlite.
    #[arg(long, env = "FEDMESH_DB")]
    pub db: String,
    /// A region and its shards, as NAME=SHARD[,SHARD...]; repeatable
    /// (environment: separated by ';').
    #[arg(
        long = "region",
        value_name = "NAME=SHARDS",
        env = "FEDMESH_REGIONS",
        value_delimiter = ';',
        required = true
    )]
    pub regions: Vec<String>,
    /// Most connections to the control database.
    #[arg(long, env = "FEDMESH_DB_POOL_SIZE", default_value_t = 8)]
    pub pool_size: u32,
    /// Trust the x-fedmesh-identity header from loopback peers. Without it
    /// every call is refused until mutual TLS is configured.
    #[arg(long, env = "FEDMESH_DEV_IDENTITY")]
    pub dev_identity: bool,
}

/// `fedmesh gateway`.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, env = "FEDMESH_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: String,
    /// The region this gateway serves.
    #[arg(long, env = "FEDMESH_REGION")]
    pub region: String,
    /// Stable id of this replica (default: REGION-0).
    #[arg(long, env = "FEDMESH_GATEWAY_ID")]
    pub id: Option<String>,
    /// A shard of the region as NAME=URL (postgres://... or sqlite://...);
    /// repeatable (environment: separated by ';').
    #[arg(
        long = "shard",
        value_name = "NAME=URL",
        env = "FEDMESH_SHARDS",
        value_delimiter = ';',
        required = true
    )]
    pub shards: Vec<String>,
    /// Most connections to each shard database.
    #[arg(long, env = "FEDMESH_SHARD_POOL_SIZE", default_value_t = 16)]
    pub pool_size: u32,
    /// URL other gateways reach this one at (default: http:// plus --listen).
    #[arg(long, env = "FEDMESH_ADVERTISE")]
    pub advertise: Option<String>,
    /// Largest payload accepted, in bytes.
    #[arg(long, env = "FEDMESH_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,
    /// Most messages committed in one transaction.
    #[arg(long, env = "FEDMESH_MAX_BATCH", default_value_t = 256)]
    pub max_batch: usize,
    /// Commit lanes per shard (batches committing at once).
    #[arg(long, env = "FEDMESH_COMMIT_LANES", default_value_t = 4)]
    pub commit_lanes: usize,
    /// How long a batch that is not full waits for more, in microseconds.
    #[arg(long, env = "FEDMESH_COMMIT_LINGER_US", default_value_t = 0)]
    pub commit_linger_us: u64,
    /// Days acknowledged messages are kept.
    #[arg(long, env = "FEDMESH_RETENTION_DAYS", default_value_t = 7)]
    pub retention_days: u64,
    /// Trust the x-fedmesh-identity header from loopback peers. Without it
    /// every call is refused until mutual TLS is configured.
    #[arg(long, env = "FEDMESH_DEV_IDENTITY")]
    pub dev_identity: bool,
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

fn stop_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: closing streams and finishing writes");
        trigger.cancel();
    });
    shutdown
}

/// Runs a coordinator until Ctrl-C or SIGTERM.
pub async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let mut regions = Vec::new();
    for region in &args.regions {
        let (name, shards) = split_pair(region, "--region", "NAME=SHARD[,SHARD...]")?;
        regions.push(RegionConfig {
            name: name.to_string(),
            shards: shards.split(',').map(str::to_string).collect(),
        });
    }
    let mut config = CoordinatorConfig::new(regions, args.db);
    config.max_connections = args.pool_size;
    config.identity_mode = identity_mode(args.dev_identity);
    let listener = bind(&args.listen).await?;
    fedmesh_coordinator::run(config, listener, Arc::new(NoBus), stop_on_signal()).await?;
    Ok(())
}

/// Runs a gateway until Ctrl-C or SIGTERM.
pub async fn gateway(args: GatewayArgs, coordinator_url: String) -> anyhow::Result<()> {
    let mut shards = Vec::new();
    for shard in &args.shards {
        let (name, url) = split_pair(shard, "--shard", "NAME=URL")?;
        let mut shard = ShardConfig::new(name, url);
        shard.max_connections = args.pool_size;
        shards.push(shard);
    }
    let gateway_id = args.id.unwrap_or_else(|| format!("{}-0", args.region));
    let mut config = GatewayConfig::new(gateway_id, args.region, shards, coordinator_url);
    config.advertise_url = Some(
        args.advertise
            .unwrap_or_else(|| format!("http://{}", args.listen)),
    );
    config.identity_mode = identity_mode(args.dev_identity);
    config.max_payload_bytes = args.max_payload_bytes;
    config.max_batch = args.max_batch;
    config.commit_lanes = args.commit_lanes;
    config.commit_linger = std::time::Duration::from_micros(args.commit_linger_us);
    config.retention = std::time::Duration::from_secs(args.retention_days * 24 * 3600);
    let listener = bind(&args.listen).await?;
    fedmesh_gateway::run(config, listener, Arc::new(NoBus), stop_on_signal()).await?;
    Ok(())
}
