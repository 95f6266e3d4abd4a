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

mod commit_thread;
mod committer;
mod grpc;
mod relay;
mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use fedmesh_common::events::{EventPublisher, run_outbox_relay};
use fedmesh_common::identity::{Identity, IdentityInterceptor};
use fedmesh_common::topology::{AgencyHome, Topology};
use fedmesh_proto::pb;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;

pub use config::{GatewayConfig, ShardConfig};
pub use store::{MessageStore, SqliteMessageStore};

use commit_thread::CommitThread;
use committer::Committer;
use error::GatewayError;
use inbox::InboxHub;
use message::{Message, Receipt};
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
}

/// A gateway started by [`start`].
pub struct RunningGateway {
    /// The topology the gateway currently routes by.
    pub topology: watch::Receiver<Arc<Topology>>,
    /// The address other components reach it at.
    pub advertise_url: String,
    /// Resolves when the gateway has stopped.
    pub stopped: JoinHandle<Result<(), RunError>>,
}

/// One shard as the gateway uses it.
pub(crate) struct Shard {
    pub(crate) store: Arc<dyn MessageStore>,
    pub(crate) committer: Committer,
    pub(crate) outbox_wake: Arc<Notify>,
}

/// What every handler and task of one gateway shares.
pub(crate) struct Shared {
    pub(crate) config: GatewayConfig,
    pub(crate) topology: watch::Receiver<Arc<Topology>>,
    pub(crate) shards: HashMap<String, Shard>,
    pub(crate) hub: Arc<InboxHub>,
    pub(crate) upstream: Upstream,
    pub(crate) shutdown: CancellationToken,
    in_flight: AtomicU32,
    spread: AtomicUsize,
}

/// Counts a send in flight while alive.
pub(crate) struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// Refuses payloads over the limit.
    pub(crate) fn check_payload(&self, size: usize) -> Result<(), GatewayError> {
        let limit = self.config.max_payload_bytes;
        if size > limit {
            return Err(GatewayError::PayloadTooLarge { size, limit });
        }
        Ok(())
    }

    /// Where `agency_id` lives: from the topology, or from the coordinator
    /// for an agency registered after the last topology update.
    pub(crate) async fn home_of(&self, agency_id: &str) -> Result<AgencyHome, GatewayError> {
        let known = self.topology.borrow().agencies.get(agency_id).cloned();
        match known {
            Some(home) => Ok(home),
            None => self.upstream.lookup(agency_id).await,
        }
    }

    /// The home of `agency_id`, which must be this gateway's region.
    pub(crate) async fn require_homed_here(
        &self,
        agency_id: &str,
    ) -> Result<AgencyHome, GatewayError> {
        let home = self.home_of(agency_id).await?;
        if home.region != self.config.region {
            return Err(GatewayError::WrongRegion {
                agency_id: agency_id.to_string(),
                home_region: home.region,
                region: self.config.region.clone(),
            });
        }
        Ok(home)
    }

    /// The shard named `name`, if this gateway serves it.
    pub(crate) fn shard(&self, name: &str) -> Result<&Shard, GatewayError> {
        self.shards.get(name).ok_or_else(|| {
            GatewayError::Unavailable(format!(
                "shard {name} is not served by gateway {}; its configuration lacks the shard",
                self.config.gateway_id
            ))
        })
    }

    /// Stores `message` in `shard` of this region and returns its receipt.
    pub(crate) async fn store_local(
        &self,
        shard: &str,
        message: Message,
    ) -> Result<Receipt, GatewayError> {
        let stored = self
            .shard(shard)?
            .committer
            .store(message)
            .await
            .map_err(|error| match error {
                committer::CommitError::Stopped => {
                    GatewayError::Unavailable("gateway shutting down; retry on another gateway".into())
                }
                committer::CommitError::Store(source) => GatewayError::Unavailable(format!(
                    "shard {shard} could not commit ({source}); retry with the same idempotency key (a retry is never stored twice)"
                )),
            })?;
        Ok(Receipt {
            message_id: stored.message_id,
            home_region: self.config.region.clone(),
            stored_at_micros: stored.stored_at_micros,
            duplicate: stored.duplicate,
        })
    }

    /// The connection pool of each shard, sorted by shard.
    pub(crate) fn shard_pools(&self) -> Vec<pb::ShardPool> {
        let mut pools: Vec<pb::ShardPool> = self
            .shards
            .iter()
            .map(|(name, shard)| {
                let usage = shard.store.pool_usage();
                pb::ShardPool {
                    shard: name.clone(),
                    open: usage.open,
                    idle: usage.idle,
                    max: usage.max,
                }
            })
            .collect();
        pools.sort_by(|a, b| a.shard.cmp(&b.shard));
        pools
    }

    /// Counts a send until the guard drops.
    pub(crate) fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// A number that rotates relay targets between calls.
    pub(crate) fn spread(&self) -> usize {
        self.spread.fetch_add(1, Ordering::Relaxed)
    }
}

/// Opens the shards, starts the background tasks and serves on `listener`
/// until `shutdown` is cancelled. Events go to `publisher`.
pub async fn start(
    config: GatewayConfig,
    listener: TcpListener,
    publisher: Arc<dyn EventPublisher>,
    shutdown: CancellationToken,
) -> Result<RunningGateway, RunError> {
    if config.shards.is_empty() {
        return Err(RunError::Config(format!(
            "gateway {} has no shard",
            config.gateway_id
        )));
    }
    let advertise_url = match &config.advertise_url {
        Some(url) => url.clone(),
        None => format!(
            "http://{}",
            listener
                .local_addr()
                .map_err(|error| RunError::Config(error.to_string()))?
        ),
    };
    let tasks = TaskTracker::new();
    let hub = Arc::new(InboxHub::default());
    let commit_thread = CommitThread::start()
        .map_err(|error| RunError::Config(format!("cannot start the commit thread: {error}")))?;
    let mut shards = HashMap::new();
    for shard in &config.shards {
        let store = store::open_store(
            &shard.database_url,
            &config.region,
            shard.max_connections,
            u32::try_from(config.commit_lanes.max(1)).unwrap_or(u32::MAX),
        )
        .await
        .map_err(|source| RunError::Store {
            shard: shard.name.clone(),
            source,
        })?;
        store.spawn_wakeups(Arc::clone(&hub), &tasks, shutdown.clone());
        tasks.spawn(purge_acked(
            shard.name.clone(),
            Arc::clone(&store),
            config.retention,
            config.retention_interval,
            shutdown.clone(),
        ));
        let outbox_wake = Arc::new(Notify::new());
        tasks.spawn(run_outbox_relay(
            shard.name.clone(),
            store.outbox(),
            Arc::clone(&publisher),
            Arc::clone(&outbox_wake),
            config.outbox_poll_interval,
            shutdown.clone(),
        ));
        let batching = committer::Batching {
            max_batch: config.max_batch,
            linger: config.commit_linger,
            lanes: config.commit_lanes.min(store.max_concurrent_batches()),
        };
        let committer = Committer::spawn(
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
            },
        );
    }

    // The lanes end once their committers are dropped (after the server
    // stopped); the gateway's tasks include waiting for them.
    tasks.spawn(commit_thread.finished());

    let identity = Identity::Gateway(config.region.clone());
    let upstream = Upstream::new(&config.coordinator_url, &identity, config.relay_timeout)?;
    let (topology_sender, topology) = watch::channel(Arc::new(Topology::default()));
    let shared = Arc::new(Shared {
        config: config.clone(),
        topology: topology.clone(),
        shards,
        hub,
        upstream,
        shutdown: shutdown.clone(),
        in_flight: AtomicU32::new(0),
        spread: AtomicUsize::new(0),
    });

    let watcher = Arc::clone(&shared);
    tasks.spawn(async move {
        watcher
            .upstream
            .watch_topology(topology_sender, watcher.shutdown.clone())
            .await;
    });
    let reporter = Arc::clone(&shared);
    let gateway = pb::Gateway {
        gateway_id: config.gateway_id.clone(),
        region: config.region.clone(),
        address: advertise_url.clone(),
        load: None,
        last_seen: None,
    };
    tasks.spawn(async move {
        let load = || pb::GatewayLoad {
            open_streams: u32::try_from(reporter.hub.open_streams()).unwrap_or(u32::MAX),
            in_flight: reporter.in_flight.load(Ordering::Relaxed),
            shard_pools: reporter.shard_pools(),
        };
        reporter
            .upstream
            .report(gateway, load, reporter.shutdown.clone())
            .await;
    });

    let interceptor = IdentityInterceptor::new(config.identity_mode);
    // Room for headers and framing above the payload limit, so that an
    // oversized payload is refused with a precise message, not by the codec.
    let max_message = config.max_payload_bytes + 512 * 1024;
    let exchange = pb::exchange_server::ExchangeServer::new(grpc::ExchangeService {
        shared: Arc::clone(&shared),
    })
    .max_decoding_message_size(max_message);
    let relay = pb::relay_server::RelayServer::new(grpc::RelayService {
        shared: Arc::clone(&shared),
    })
    .max_decoding_message_size(max_message);
    let routes = tonic::service::Routes::new(InterceptedService::new(exchange, interceptor))
        .add_service(InterceptedService::new(relay, interceptor));
    tracing::info!(gateway_id = %config.gateway_id, region = %config.region, address = %advertise_url, "gateway serving");
    let stopped = tokio::spawn(async move {
        let served = fedmesh_common::server::serve(routes, listener, shutdown.clone()).await;
        shutdown.cancel();
        // The commit tasks end once the last handle to the shards is gone,
        // after committing what was queued.
        drop(shared);
        tasks.close();
        tasks.wait().await;
        tracing::info!(gateway_id = %config.gateway_id, "gateway stopped");
        Ok(served?)
    });
    Ok(RunningGateway {
        topology,
        advertise_url,
        stopped,
    })
}

/// Deletes acknowledged messages older than `retention`, in chunks, every
/// `interval`, until `shutdown`.
async fn purge_acked(
    shard: String,
    store: Arc<dyn MessageStore>,
    retention: std::time::Duration,
    interval: std::time::Duration,
    shutdown: CancellationToken,
) {
    const CHUNK: u32 = 10_000;
    let retention_micros = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let acked_before = fedmesh_common::time::now_micros().saturating_sub(retention_micros);
        let mut n_purged = 0;
        loop {
            match store.purge_acked(acked_before, CHUNK).await {
                Ok(n_deleted) => {
                    n_purged += n_deleted;
                    if n_deleted < u64::from(CHUNK) || shutdown.is_cancelled() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%shard, %error, "retention purge failed, will retry");
                    break;
                }
            }
        }
        if n_purged > 0 {
            tracing::info!(%shard, n_purged, "acknowledged messages past retention deleted");
        }
    }
}

/// Runs a gateway until `shutdown` is cancelled; see [`start`].
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    publisher: Arc<dyn EventPublisher>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let running = start(config, listener, publisher, shutdown).await?;
    running
        .stopped
        .await
        .map_err(|error| RunError::Config(format!("gateway task failed: {error}")))?
}
