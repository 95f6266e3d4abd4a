//! fedmesh gateway: serves the agency-facing `Exchange` API and the
//! gateway-to-gateway `Relay` API of one region.
//!
//! - `config`: [`GatewayConfig`].
//! - `message`, `routing`, `inbox` (DOMAIN): messages, where they go, who
//!   streams which inbox. No IO.
//! - `committer`: group commit into a shard.
//! - `store` (STORAGE): a shard behind [`MessageStore`].
//! - `grpc` (TRANSPORT, inbound) and `upstream` (TRANSPORT, outbound).
//!
//! Invariants: a receipt is returned only after the message is committed in
//! its home shard (or, relayed, after the home region's gateway answered
//! with its receipt); an inbox is streamed only to the agency itself, from a
//! gateway of its home region; the gateway keeps serving from its last
//! topology while the coordinator is away.

pub mod config;
pub mod error;
pub mod inbox;
pub mod message;
pub mod routing;
pub mod store;
pub mod trace_context;

mod commit_thread;
mod committer;
mod convert;
mod grpc;
mod moving;
mod receive;
mod relay;
mod retention;
mod send;
mod shared;
mod spool;
mod telemetry;
mod upstream;

use std::collections::HashMap;
use std::sync::Arc;

use fedmesh_common::events::{EventPublisher, run_outbox_relay};
use fedmesh_common::identity::Identity;
use fedmesh_common::server::{Security, SecurityError};
use fedmesh_common::topology::Topology;
use fedmesh_proto::pb;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{GatewayConfig, ShardConfig};
pub use relay::RelayAttempts;
pub use store::{MessageStore, SqliteMessageStore};

use commit_thread::CommitThread;
use committer::Committer;
use error::GatewayError;
use fedmesh_common::server::ServeOptions;
use inbox::InboxHub;
use relay::RelayLimits;
use shared::{Shard, Shared};
use upstream::Upstream;

/// Why a gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A shard could not be opened or migrated.
    #[error("shard {shard}: {source}")]
    Store {
        /// The shard.
        shard: String,
        /// What failed.
        source: error::StoreError,
    },
    /// The gRPC server failed.
    #[error("grpc: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A setting is out of range or missing.
    #[error(transparent)]
    Setting(#[from] fedmesh_common::config::ConfigError),
    /// Connections cannot be secured as configured.
    #[error(transparent)]
    Security(#[from] SecurityError),
}

/// A gateway started by [`start`].
pub struct RunningGateway {
    /// The topology the gateway currently routes by.
    pub topology: watch::Receiver<Arc<Topology>>,
    /// The number of inboxes streamed, as it changes.
    pub open_streams: watch::Receiver<usize>,
    /// The relay calls it made to other regions.
    pub relay_attempts: Arc<RelayAttempts>,
    /// Whether it can do its work: a topology from the coordinator, and
    /// every shard answering.
    pub readiness: fedmesh_common::telemetry::Readiness,
    /// The address other components reach it at.
    pub advertise_url: String,
    /// Resolves when the gateway has stopped.
    pub stopped: JoinHandle<Result<(), RunError>>,
}

/// Opens the shards, starts the background tasks and serves on `listener`
/// until `shutdown` is cancelled. Events go through each shard's outbox to
/// `publisher`; without one, events are off and no outbox rows are written.
pub async fn start(
    config: GatewayConfig,
    listener: TcpListener,
    publisher: Option<Arc<dyn EventPublisher>>,
    shutdown: CancellationToken,
) -> Result<RunningGateway, RunError> {
    config.validate()?;
    let gateway_id = config.gateway_id();
    let region = config.region().to_string();
    let local_address = listener
        .local_addr()
        .map_err(|error| RunError::Config(error.to_string()))?;
    let security = Security::establish(
        Identity::Gateway(region.clone()),
        &config.tls,
        &config.rate_limits,
        config.dev_identity,
        Some(local_address),
        &shutdown,
    )?;
    let advertise_url = match &config.advertise {
        Some(url) => url.clone(),
        None => format!("{}://{local_address}", security.scheme()),
    };
    let tasks = TaskTracker::new();
    if publisher.is_none() {
        tracing::warn!("no event bus is configured (--amqp): events are off, none are kept");
    }
    let hub = Arc::new(InboxHub::default());
    let commit_thread = CommitThread::start()
        .map_err(|error| RunError::Config(format!("cannot start the commit thread: {error}")))?;
    let mut shards = HashMap::new();
    for shard in &config.shards {
        let store = store::open_store(
            &shard.database_url,
            &region,
            config.pool_size,
            u32::try_from(config.commit_lanes.max(1)).unwrap_or(u32::MAX),
            publisher.is_some(),
        )
        .await
        .map_err(|source| RunError::Store {
            shard: shard.name.clone(),
            source,
        })?;
        store.spawn_wakeups(Arc::clone(&hub), &tasks, shutdown.clone());
        tasks.spawn(retention::purge_expired(
            shard.name.clone(),
            Arc::clone(&store),
            config.retention(),
            config.retention_interval(),
            shutdown.clone(),
        ));
        let outbox_wake = Arc::new(Notify::new());
        if let Some(publisher) = &publisher {
            tasks.spawn(run_outbox_relay(
                shard.name.clone(),
                store.outbox(),
                Arc::clone(publisher),
                Arc::clone(&outbox_wake),
                config.outbox_poll_interval(),
                shutdown.clone(),
            ));
        }
        let batching = committer::Batching {
            max_batch: config.max_batch,
            linger: config.commit_linger(),
            lanes: config.commit_lanes.min(store.max_concurrent_batches()),
        };
        let committer = Committer::spawn(
            &shard.name,
            Arc::clone(&store),
            batching,
            Arc::clone(&hub),
            Arc::clone(&outbox_wake),
            &commit_thread,
        );
        shards.insert(
            shard.name.clone(),
            Shard {
                store,
                committer,
                outbox_wake,
                spool_wake: Arc::new(Notify::new()),
            },
        );
    }

    // The lanes end once their committers are dropped (after the server
    // stopped); the gateway's tasks include waiting for them.
    tasks.spawn(commit_thread.finished());

    let relay_limits = RelayLimits {
        max_batch_bytes: config.max_message_bytes(),
        timeout: config.relay_timeout(),
    };
    let discovery = fedmesh_common::discovery::Discovery::new(
        config.discovery(security.scheme()),
        shutdown.clone(),
    )
    .map_err(|error| RunError::Config(error.to_string()))?;
    let upstream = Upstream::new(&config.coordinator, &security, relay_limits, discovery)
        .map_err(|error| RunError::Config(error.to_string()))?;
    upstream.settle().await;
    let relay_attempts = upstream.gateways().attempts();
    security.set_audit(fedmesh_common::audit::RemoteAudit::spawn(
        upstream.directory(),
        shutdown.clone(),
    ));
    let (topology_sender, topology) = watch::channel(Arc::new(Topology::default()));
    let open_streams = hub.watch_open_streams();
    telemetry::describe();
    tasks.spawn(telemetry::follow(
        gateway_id.to_string(),
        topology.clone(),
        open_streams.clone(),
        shutdown.clone(),
    ));
    let readiness = readiness(
        topology.clone(),
        shards
            .iter()
            .map(|(name, shard)| (name.clone(), Arc::clone(&shard.store)))
            .collect(),
    );
    let shared = Arc::new(Shared::new(
        config.clone(),
        topology.clone(),
        shards,
        hub,
        upstream,
        shutdown.clone(),
    ));

    for (name, shard) in &shared.shards {
        tasks.spawn(telemetry::follow_backlog(
            name.clone(),
            Arc::clone(&shard.store),
            shutdown.clone(),
        ));
    }
    for shard in &config.shards {
        tasks.spawn(spool::drain_shard(
            Arc::clone(&shared),
            shard.name.clone(),
            shutdown.clone(),
        ));
    }
    let watcher = Arc::clone(&shared);
    tasks.spawn(async move {
        watcher
            .upstream
            .watch_topology(topology_sender, watcher.shutdown.clone())
            .await;
    });
    let reporter = Arc::clone(&shared);
    let gateway = pb::Gateway {
        gateway_id: gateway_id.clone(),
        region: region.clone(),
        address: advertise_url.clone(),
        load: None,
        last_seen: None,
    };
    tasks.spawn(async move {
        let load = || pb::GatewayLoad {
            open_streams: u32::try_from(reporter.hub.open_streams()).unwrap_or(u32::MAX),
            in_flight: reporter.sends_in_flight(),
            shard_pools: reporter.shard_pools(),
            spools: reporter.spool_depths(),
        };
        reporter
            .upstream
            .report(gateway, load, reporter.shutdown.clone())
            .await;
    });

    // One message of the largest payload with its envelope, both ways; a
    // larger request is refused by the server with a status naming the
    // payload limit before it is read (see `ServeOptions`).
    let max_message = config.max_message_bytes();
    let exchange = pb::exchange_server::ExchangeServer::new(grpc::ExchangeService {
        shared: Arc::clone(&shared),
    })
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    let relay = pb::relay_server::RelayServer::new(grpc::RelayService {
        shared: Arc::clone(&shared),
    })
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    let limit = config.max_payload_bytes;
    let options = ServeOptions::refusing(config.connections, security, max_message, move |size| {
        GatewayError::MessageTooLarge { size, limit }.into()
    });
    let moves = pb::moves_server::MovesServer::new(grpc::MovesService {
        shared: Arc::clone(&shared),
    })
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    let routes = tonic::service::Routes::new(exchange)
        .add_service(relay)
        .add_service(moves);
    tracing::info!(%gateway_id, %region, address = %advertise_url, "gateway serving");
    let stopped = tokio::spawn(async move {
        let served =
            fedmesh_common::server::serve(routes, listener, options, shutdown.clone()).await;
        shutdown.cancel();
        // The commit tasks end once the last handle to the shards is gone,
        // after committing what was queued.
        drop(shared);
        tasks.close();
        tasks.wait().await;
        tracing::info!(%gateway_id, "gateway stopped");
        Ok(served?)
    });
    Ok(RunningGateway {
        topology,
        open_streams,
        relay_attempts,
        readiness,
        advertise_url,
        stopped,
    })
}

/// Ready once a topology came from the coordinator, while every shard of
/// `stores` answers.
fn readiness(
    topology: watch::Receiver<Arc<Topology>>,
    stores: Vec<(String, Arc<dyn MessageStore>)>,
) -> fedmesh_common::telemetry::Readiness {
    let stores = Arc::new(stores);
    Arc::new(move || {
        let loaded = topology.borrow().version > 0;
        let stores = Arc::clone(&stores);
        Box::pin(async move {
            let mut unmet = Vec::new();
            if !loaded {
                unmet.push("no topology from the coordinator yet".to_string());
            }
            for (name, store) in stores.iter() {
                if let Err(error) = store.ping().await {
                    unmet.push(format!("shard {name} does not answer: {error}"));
                }
            }
            unmet
        })
    })
}

/// Runs a gateway until `shutdown` is cancelled; see [`start`].
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    publisher: Option<Arc<dyn EventPublisher>>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let running = start(config, listener, publisher, shutdown).await?;
    running
        .stopped
        .await
        .map_err(|error| RunError::Config(format!("gateway task failed: {error}")))?
}
