//! fedmesh coordinator: keeps the directory (agencies, regions, shards,
//! gateways) and publishes it to gateways as a versioned topology stream.
//!
//! - `config`: [`CoordinatorConfig`].
//! - `agency` (DOMAIN): [`agency::AgencyRecord`], what the directory and the store share.
//! - `directory` (DOMAIN): the directory and the in-memory topology.
//! - `store` (STORAGE): the control database behind [`DirectoryStore`].
//! - `grpc` (TRANSPORT): the `Directory` service.
//!
//! Every directory change is committed with its event (outbox) before it is
//! published to watchers, so a gateway never sees an agency that a crash
//! could forget.

pub mod access;
pub mod agency;
pub mod config;
pub mod directory;
pub mod error;
pub mod leader;
pub mod lease;
pub mod moves;
pub mod region;
pub mod store;
pub mod subscription;

mod grpc;

use std::sync::Arc;

use fedmesh_common::events::{EventBus, run_outbox_relay};
use fedmesh_common::identity::Identity;
use fedmesh_common::server::{Security, SecurityError};
use fedmesh_proto::pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{CoordinatorConfig, RegionConfig};
pub use store::{DirectoryStore, PgDirectoryStore, SqliteDirectoryStore};

/// Largest request the coordinator reads: the directory's requests carry
/// names and addresses; a batch relayed through it carries messages (room
/// for gateways whose payload limit is far above the default).
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// Why a coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The control database could not be opened or migrated.
    #[error("control database: {0}")]
    Store(#[from] error::StoreError),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// A setting is out of range or missing.
    #[error(transparent)]
    Setting(#[from] fedmesh_common::config::ConfigError),
    /// Connections cannot be secured as configured.
    #[error(transparent)]
    Security(#[from] SecurityError),
}

/// Runs a coordinator on `listener` until `shutdown` is cancelled; events go
/// through the control database's outbox to the bus's publisher, and durable
/// subscriptions are queues on it (without a bus, events are off and none
/// is written). Returns once every task has stopped.
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    bus: Option<EventBus>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    run_telling_readiness(config, listener, bus, shutdown, |_| {}).await
}

/// As [`run`], handing `readiness` what says whether the coordinator can do
/// its work (its control database answers) once it is open.
pub async fn run_telling_readiness(
    config: CoordinatorConfig,
    listener: TcpListener,
    bus: Option<EventBus>,
    shutdown: CancellationToken,
    readiness: impl FnOnce(fedmesh_common::telemetry::Readiness),
) -> Result<(), RunError> {
    config.validate()?;
    let security = Security::establish(
        Identity::Coordinator,
        &config.tls,
        &config.rate_limits,
        config.dev_identity,
        listener.local_addr().ok(),
        &shutdown,
    )?;
    let store = store::open_store(config.database_url(), config.pool_size).await?;
    let outbox = store.outbox();
    let tasks = TaskTracker::new();
    let outbox_wake = match &bus {
        Some(bus) => {
            let outbox_wake = Arc::new(tokio::sync::Notify::new());
            tasks.spawn(run_outbox_relay(
                "control".into(),
                outbox,
                Arc::clone(&bus.publisher),
                Arc::clone(&outbox_wake),
                config.outbox_poll_interval(),
                shutdown.clone(),
            ));
            Some(outbox_wake)
        }
        None => {
            tracing::warn!("no event bus is configured (--amqp): events are off, none are kept");
            None
        }
    };
    let queues = bus.map(|bus| bus.queues);
    let directory =
        directory::Directory::load(store, config.regions.clone(), outbox_wake, queues).await?;
    directory.declare_subscription_queues().await;
    let directory = Arc::new(directory);
    readiness({
        let store = Arc::clone(directory.store());
        Arc::new(move || {
            let store = Arc::clone(&store);
            Box::pin(async move {
                match store.lease(lease::LEADER).await {
                    Ok(_) => Vec::new(),
                    Err(error) => vec![format!("the control database does not answer: {error}")],
                }
            })
        })
    });
    security.set_audit(DirectoryAudit::spawn(Arc::clone(&directory)));
    let holder = config.id.clone().unwrap_or_else(|| {
        // The random end of a UUIDv7.
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        format!("coordinator-{}", &suffix[suffix.len() - 8..])
    });
    let (leading, leadership) = tokio::sync::watch::channel(None);
    tasks.spawn(leader::run_election(
        Arc::clone(&directory),
        holder,
        config.lease,
        leading,
        shutdown.clone(),
    ));
    tasks.spawn(follow_directory(
        Arc::clone(&directory),
        config.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(expire_instances(
        Arc::clone(&directory),
        leadership.clone(),
        config.clone(),
        shutdown.clone(),
    ));

    let service = grpc::DirectoryService {
        directory,
        leadership,
        report_interval: config.report_interval(),
        shutdown: shutdown.clone(),
    };
    let channels = Arc::new(grpc::GatewayChannels::new(security.clone()));
    tasks.spawn(grpc::run_moves(
        Arc::clone(&service.directory),
        Arc::clone(&channels),
        MAX_REQUEST_BYTES,
        service.leadership.clone(),
        shutdown.clone(),
    ));
    let relay = grpc::CoordinatorRelay {
        directory: Arc::clone(&service.directory),
        channels,
        max_message_bytes: MAX_REQUEST_BYTES,
    };
    let routes = tonic::service::Routes::new(pb::directory_server::DirectoryServer::new(service))
        .add_service(
            pb::relay_server::RelayServer::new(relay)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_REQUEST_BYTES),
        );
    let local_address = listener.local_addr().ok();
    tracing::info!(address = ?local_address, "coordinator serving");
    let options =
        fedmesh_common::server::ServeOptions::new(config.connections, security, MAX_REQUEST_BYTES);
    let served = fedmesh_common::server::serve(routes, listener, options, shutdown.clone()).await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    tracing::info!("coordinator stopped");
    Ok(served?)
}

/// Records the coordinator's own refusals and rotations in its store, one
/// at a time from a bounded queue (a full queue drops, and says so).
#[derive(Debug)]
struct DirectoryAudit {
    sender: tokio::sync::mpsc::Sender<fedmesh_common::audit::AuditRecord>,
}

impl DirectoryAudit {
    fn spawn(directory: Arc<directory::Directory>) -> Arc<DirectoryAudit> {
        let (sender, mut receiver) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(async move {
            while let Some(record) = receiver.recv().await {
                directory.audit(record).await;
            }
        });
        Arc::new(DirectoryAudit { sender })
    }
}

impl fedmesh_common::auth::AuditSink for DirectoryAudit {
    fn record(&self, record: fedmesh_common::audit::AuditRecord) {
        if self.sender.try_send(record).is_err() {
            tracing::warn!("the audit queue is full: a record was dropped");
        }
    }
}

/// Keeps this replica in step with changes made through the others, every
/// sync interval.
async fn follow_directory(
    directory: Arc<directory::Directory>,
    config: CoordinatorConfig,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(config.sync_interval());
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {
                if let Err(error) = directory.sync_from_store(config.expiry()).await {
                    tracing::warn!(%error, "cannot read the directory's changes from the control database");
                }
            }
        }
    }
}

async fn expire_instances(
    directory: Arc<directory::Directory>,
    leadership: tokio::sync::watch::Receiver<Option<lease::Lease>>,
    config: CoordinatorConfig,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(config.report_interval());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {
                let expired = {
                    let mut state = directory.state();
                    let regions = state.gateway_regions();
                    state
                        .expire(tokio::time::Instant::now(), config.expiry())
                        .into_iter()
                        .filter_map(|gateway_id| {
                            let region = regions.get(&gateway_id)?.clone();
                            Some((gateway_id, region))
                        })
                        .collect::<Vec<_>>()
                };
                // Singleton work: the leader records the gateways down.
                for (gateway_id, region) in expired {
                    leader::gateway_changed(&directory, &leadership, &gateway_id, &region, false).await;
                }
            }
        }
    }
}
