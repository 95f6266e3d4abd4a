//! The one-process dev mesh: a coordinator, a gateway for each region and a
//! notifier, each on its own loopback port, SQLite files under a data folder
//! and an in-process event bus (or a RabbitMQ broker, with `--amqp`),
//! talking to each other over real gRPC.
//!
//! `fedmesh dev` and the end-to-end tests start the mesh through
//! [`DevMesh::start`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use fedmesh_common::amqp::{AmqpPublisher, AmqpQueues, AmqpSource, EventBusSettings};
use fedmesh_common::auth::RateLimitSettings;
use fedmesh_common::events::{DurableQueues, EventBus, EventPublisher, EventSource};
use fedmesh_common::identity::Identity;
use fedmesh_common::in_process::InProcessBus;
use fedmesh_common::store::redact_url;
use fedmesh_common::tls::TlsSettings;
use fedmesh_common::topology::AccessPolicy;
use fedmesh_common::topology::Topology;
use fedmesh_coordinator::{CoordinatorConfig, RegionConfig};
use fedmesh_gateway::{GatewayConfig, ShardConfig};
use fedmesh_notifier::{NotifierConfig, WebhookSettings};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The regions of the dev mesh, in port order.
pub const DEV_REGIONS: [&str; 3] = ["east", "west", "central"];
/// The shards of `region` in a dev mesh of `count` shards per region.
pub fn shard_names(region: &str, count: usize) -> Vec<String> {
    (1..=count.max(1))
        .map(|n| format!("{region}-{n}"))
        .collect()
}

/// The coordinator's port; the gateways and the notifier take the next ones.
pub const DEFAULT_BASE_PORT: u16 = 50051;

/// How to start a dev mesh.
#[derive(Clone)]
pub struct DevOptions {
    /// Folder of the SQLite files; created if missing.
    pub data_dir: PathBuf,
    /// Port of the coordinator; gateways take the next three (east, west,
    /// central), the notifier the one after. `None` binds every component to
    /// an ephemeral port (tests).
    pub base_port: Option<u16>,
    /// Database URLs of shards (`east-1`, `west-1`, `central-1`, ...) that
    /// are not to be SQLite files in `data_dir`, e.g. PostgreSQL databases.
    pub shard_urls: std::collections::HashMap<String, String>,
    /// Shards of each region (`east-1`, `east-2`, ...), all served by the
    /// region's gateway; agencies are placed on the emptiest.
    pub shards_per_region: usize,
    /// Changes to every gateway's settings (tests tune limits with it).
    pub tune_gateway: Option<TuneGateway>,
    /// The event bus: with a broker URL, RabbitMQ; without, in process.
    pub events: EventBusSettings,
    /// Events a subscriber may fall behind (see `NotifierConfig`).
    pub subscriber_buffer: usize,
    /// How notifiers call webhooks.
    pub webhooks: WebhookSettings,
    /// A `fedmesh certs` folder: every component speaks mutual TLS with
    /// its certificate from it (made by `certs init` when missing). None:
    /// plaintext with identity headers on loopback.
    pub certs: Option<PathBuf>,
    /// Changes to every component's TLS settings (tests set a deny list
    /// and a short reload period with it).
    pub tune_tls: Option<TuneTls>,
}

/// A change to a component's TLS settings before it starts.
pub type TuneTls = Arc<dyn Fn(&mut TlsSettings) + Send + Sync>;

/// How a component of the dev mesh secures its connections.
#[derive(Clone)]
struct DevSecurity {
    certs: Option<PathBuf>,
    tune: Option<TuneTls>,
}

impl DevSecurity {
    /// TLS settings and whether to trust identity headers, for `identity`.
    fn for_identity(&self, identity: &Identity) -> (TlsSettings, bool) {
        match &self.certs {
            Some(dir) => {
                let mut settings = TlsSettings::from_folder(dir, identity);
                if let Some(tune) = &self.tune {
                    tune(&mut settings);
                }
                (settings, false)
            }
            None => (TlsSettings::default(), true),
        }
    }

    fn url_of(&self, listener: &TcpListener) -> anyhow::Result<String> {
        let scheme = if self.certs.is_some() {
            "https"
        } else {
            "http"
        };
        Ok(format!("{scheme}://{}", listener.local_addr()?))
    }

    /// Makes the certificates folder when it is missing.
    fn prepare(&self) -> anyhow::Result<()> {
        let Some(dir) = &self.certs else {
            return Ok(());
        };
        if dir.join(fedmesh_common::tls::CA_CERT).exists() {
            return Ok(());
        }
        let mut identities = vec![
            Identity::Coordinator,
            Identity::Notifier,
            Identity::Operator("admin".into()),
        ];
        identities.extend(
            DEV_REGIONS
                .iter()
                .map(|region| Identity::Gateway(region.to_string())),
        );
        crate::certs::init(
            dir,
            fedmesh_common::tls::DEFAULT_TRUST_DOMAIN,
            &identities,
            365,
        )?;
        tracing::info!(folder = %dir.display(), "made a development CA and certificates");
        Ok(())
    }
}

/// A change to a gateway's settings before it starts.
pub type TuneGateway = Arc<dyn Fn(&mut GatewayConfig) + Send + Sync>;

impl std::fmt::Debug for DevOptions {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DevOptions")
            .field("data_dir", &self.data_dir)
            .field("base_port", &self.base_port)
            .field("shard_urls", &self.shard_urls)
            .field("shards_per_region", &self.shards_per_region)
            .field("tune_gateway", &self.tune_gateway.is_some())
            .field("events", &self.events.redacted())
            .field("subscriber_buffer", &self.subscriber_buffer)
            .field("webhooks", &self.webhooks)
            .field("certs", &self.certs)
            .finish()
    }
}

/// A running dev mesh.
pub struct DevMesh {
    /// URL of the coordinator.
    pub coordinator_url: String,
    /// Region and URL of each gateway, in [`DEV_REGIONS`] order.
    pub gateway_urls: Vec<(String, String)>,
    /// URL of the notifier.
    pub notifier_url: String,
    shutdown: CancellationToken,
    coordinator_shutdown: CancellationToken,
    topologies: Vec<watch::Receiver<Arc<Topology>>>,
    signals: Vec<GatewaySignals>,
    components: JoinSet<(String, anyhow::Result<()>)>,
    bus: DevBus,
    tune_gateway: Option<TuneGateway>,
    subscriber_buffer: usize,
    webhooks: WebhookSettings,
    /// What stops each notifier started after the first.
    notifier_stops: std::collections::HashMap<String, CancellationToken>,
    security: DevSecurity,
}

/// Where the dev mesh's events go, and where its notifier reads them.
#[derive(Clone)]
struct DevBus {
    publisher: Arc<dyn EventPublisher>,
    source: Arc<dyn EventSource>,
    queues: Arc<dyn DurableQueues>,
}

impl DevBus {
    /// The in-process bus, or the broker `events` names once the notifier's
    /// side consumes it.
    async fn start(
        events: &EventBusSettings,
        subscriber_buffer: usize,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let Some(url) = events.amqp.as_deref() else {
            let bus = InProcessBus::new(subscriber_buffer);
            return Ok(DevBus {
                publisher: Arc::new(bus.clone()),
                source: Arc::new(bus.clone()),
                queues: Arc::new(bus),
            });
        };
        events.validate()?;
        let exchange = &events.amqp_exchange;
        let source = AmqpSource::start(
            url,
            exchange,
            "fedmesh-dev-notifier",
            subscriber_buffer,
            shutdown.clone(),
        );
        tokio::time::timeout(Duration::from_secs(30), source.consuming())
            .await
            .with_context(|| {
                format!(
                    "RabbitMQ at {} did not let the notifier consume exchange {exchange} within 30 s (the log says why)",
                    redact_url(url)
                )
            })?;
        Ok(DevBus {
            publisher: Arc::new(AmqpPublisher::new(url, exchange, "fedmesh-dev")),
            source,
            queues: Arc::new(AmqpQueues::new(url, exchange, "fedmesh-dev-queues")),
        })
    }
}

/// What one gateway of the dev mesh is started with.
struct GatewayStart {
    gateway_id: String,
    region: String,
    shards: Vec<ShardConfig>,
    coordinator_url: String,
    tune: Option<TuneGateway>,
    security: DevSecurity,
}

/// What a dev gateway shows of itself besides its topology.
struct GatewaySignals {
    /// Whether it can do its work.
    readiness: fedmesh_common::telemetry::Readiness,
    /// The number of inboxes it streams, as it changes.
    open_streams: watch::Receiver<usize>,
    /// The relay calls it made.
    relay_attempts: Arc<fedmesh_gateway::RelayAttempts>,
}

/// Starts a gateway in dev mode and adds it to `components`; returns its
/// topology and its signals.
async fn spawn_gateway(
    gateway: GatewayStart,
    listener: TcpListener,
    bus: &DevBus,
    shutdown: &CancellationToken,
    components: &mut JoinSet<(String, anyhow::Result<()>)>,
) -> anyhow::Result<(watch::Receiver<Arc<Topology>>, GatewaySignals)> {
    let mut config = GatewayConfig::new(
        gateway.gateway_id.clone(),
        gateway.region,
        gateway.shards,
        gateway.coordinator_url,
    );
    (config.tls, config.dev_identity) = gateway
        .security
        .for_identity(&Identity::Gateway(config.region().to_string()));
    config.rate_limits = RateLimitSettings::unlimited();
    config.access_policy = Some(AccessPolicy::Open);
    if let Some(tune) = &gateway.tune {
        tune(&mut config);
    }
    let publisher = Some(Arc::clone(&bus.publisher));
    let running = fedmesh_gateway::start(config, listener, publisher, shutdown.clone())
        .await
        .with_context(|| format!("cannot start gateway {}", gateway.gateway_id))?;
    let topology = running.topology.clone();
    let signals = GatewaySignals {
        readiness: Arc::clone(&running.readiness),
        open_streams: running.open_streams.clone(),
        relay_attempts: Arc::clone(&running.relay_attempts),
    };
    let name = format!("gateway {}", gateway.gateway_id);
    components.spawn(async move {
        let outcome = match running.stopped.await {
            Ok(outcome) => outcome.map_err(anyhow::Error::from),
            Err(error) => Err(anyhow::Error::from(error)),
        };
        (name, outcome)
    });
    Ok((topology, signals))
}

/// What one notifier of the dev mesh is started with.
struct NotifierStart {
    id: String,
    coordinator_url: String,
    subscriber_buffer: usize,
    webhooks: WebhookSettings,
    security: DevSecurity,
}

/// Starts a notifier in dev mode, stopped by `shutdown`, and adds it to
/// `components`; returns its URL.
fn spawn_notifier(
    notifier: NotifierStart,
    listener: TcpListener,
    bus: &DevBus,
    shutdown: CancellationToken,
    components: &mut JoinSet<(String, anyhow::Result<()>)>,
) -> anyhow::Result<String> {
    let url = notifier.security.url_of(&listener)?;
    let (tls, dev_identity) = notifier.security.for_identity(&Identity::Notifier);
    let config = NotifierConfig {
        id: notifier.id.clone(),
        dev_identity,
        tls,
        rate_limits: RateLimitSettings::unlimited(),
        coordinator: notifier.coordinator_url,
        advertise: Some(url.clone()),
        subscriber_buffer: notifier.subscriber_buffer,
        webhooks: notifier.webhooks,
        ..NotifierConfig::default()
    };
    let source = Arc::clone(&bus.source);
    let queues = Some(Arc::clone(&bus.queues));
    let name = format!("notifier {}", notifier.id);
    components.spawn(async move {
        let outcome = fedmesh_notifier::run(config, listener, source, queues, shutdown).await;
        (name, outcome.map_err(anyhow::Error::from))
    });
    Ok(url)
}

async fn bind(port: u16, what: &str) -> anyhow::Result<TcpListener> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} for the {what} (is another fedmesh dev running? try --base-port)"))
}

fn sqlite_url(data_dir: &Path, name: &str) -> String {
    format!(
        "sqlite://{}",
        data_dir.join(format!("{name}.sqlite")).display()
    )
}

impl DevMesh {
    /// Starts every component and returns once each gateway knows the
    /// gateways of every region and the notifier.
    pub async fn start(options: DevOptions) -> anyhow::Result<DevMesh> {
        std::fs::create_dir_all(&options.data_dir)
            .with_context(|| format!("cannot create data folder {}", options.data_dir.display()))?;
        let port = |offset: u16| {
            options.base_port.map_or(Ok(0), |base| {
                base.checked_add(offset)
                    .context("--base-port is too high: five consecutive ports are needed")
            })
        };
        let coordinator_listener = bind(port(0)?, "coordinator").await?;
        let mut gateway_listeners = Vec::new();
        for (offset, region) in (1..).zip(DEV_REGIONS) {
            gateway_listeners.push((
                region,
                bind(port(offset)?, &format!("{region} gateway")).await?,
            ));
        }
        let notifier_listener = bind(port(4)?, "notifier").await?;

        let security = DevSecurity {
            certs: options.certs.clone(),
            tune: options.tune_tls.clone(),
        };
        security.prepare()?;
        let shutdown = CancellationToken::new();
        let bus = DevBus::start(&options.events, options.subscriber_buffer, &shutdown).await?;
        let mut components = JoinSet::new();
        let coordinator_url = security.url_of(&coordinator_listener)?;

        let regions = DEV_REGIONS
            .iter()
            .map(|region| RegionConfig {
                name: region.to_string(),
                shards: shard_names(region, options.shards_per_region),
            })
            .collect();
        let mut coordinator =
            CoordinatorConfig::new(regions, sqlite_url(&options.data_dir, "control"));
        (coordinator.tls, coordinator.dev_identity) = security.for_identity(&Identity::Coordinator);
        coordinator.rate_limits = RateLimitSettings::unlimited();
        // Small intervals keep the dev mesh's view fresh after restarts.
        coordinator.report_interval_ms = 2_000;
        coordinator.expiry_ms = 6_000;
        // The control database is opened before anything else needs it.
        let coordinator_bus = Some(EventBus {
            publisher: Arc::clone(&bus.publisher),
            queues: Arc::clone(&bus.queues),
        });
        let coordinator_shutdown = shutdown.child_token();
        let coordinator_stop = coordinator_shutdown.clone();
        components.spawn(async move {
            let outcome = fedmesh_coordinator::run(
                coordinator,
                coordinator_listener,
                coordinator_bus,
                coordinator_shutdown,
            )
            .await;
            (
                "coordinator".to_string(),
                outcome.map_err(anyhow::Error::from),
            )
        });

        let mut gateway_urls = Vec::new();
        let mut topologies: Vec<watch::Receiver<Arc<Topology>>> = Vec::new();
        let mut signals = Vec::new();
        for (region, listener) in gateway_listeners {
            let shards = shard_names(region, options.shards_per_region)
                .into_iter()
                .map(|shard| {
                    let url = options
                        .shard_urls
                        .get(&shard)
                        .cloned()
                        .unwrap_or_else(|| sqlite_url(&options.data_dir, &shard));
                    ShardConfig::new(shard, url)
                })
                .collect();
            let gateway = GatewayStart {
                gateway_id: format!("{region}-0"),
                region: region.to_string(),
                shards,
                coordinator_url: coordinator_url.clone(),
                tune: options.tune_gateway.clone(),
                security: security.clone(),
            };
            gateway_urls.push((region.to_string(), security.url_of(&listener)?));
            let (topology, gateway_signals) =
                spawn_gateway(gateway, listener, &bus, &shutdown, &mut components).await?;
            topologies.push(topology);
            signals.push(gateway_signals);
        }

        let notifier_url = spawn_notifier(
            NotifierStart {
                id: "notifier-0".to_string(),
                coordinator_url: coordinator_url.clone(),
                subscriber_buffer: options.subscriber_buffer,
                webhooks: options.webhooks.clone(),
                security: security.clone(),
            },
            notifier_listener,
            &bus,
            shutdown.clone(),
            &mut components,
        )?;

        let mut mesh = DevMesh {
            coordinator_url,
            gateway_urls,
            notifier_url,
            shutdown,
            coordinator_shutdown: coordinator_stop,
            topologies: topologies.clone(),
            signals,
            components,
            bus,
            tune_gateway: options.tune_gateway.clone(),
            subscriber_buffer: options.subscriber_buffer,
            webhooks: options.webhooks.clone(),
            notifier_stops: std::collections::HashMap::new(),
            security,
        };
        if let Err(error) = mesh.wait_ready(topologies).await {
            mesh.shutdown.cancel();
            while mesh.components.join_next().await.is_some() {}
            return Err(error);
        }
        Ok(mesh)
    }

    async fn wait_ready(
        &mut self,
        topologies: Vec<watch::Receiver<Arc<Topology>>>,
    ) -> anyhow::Result<()> {
        let n_gateways = self.gateway_urls.len();
        let expected: Vec<&String> = self.gateway_urls.iter().map(|(_, url)| url).collect();
        for mut topology in topologies {
            let ready = topology.wait_for(|topology| {
                let known: Vec<&String> = topology
                    .gateways
                    .values()
                    .map(|gateway| &gateway.address)
                    .collect();
                known.len() == n_gateways
                    && expected.iter().all(|url| known.contains(url))
                    && !topology.notifiers.is_empty()
            });
            tokio::select! {
                ready = tokio::time::timeout(Duration::from_secs(60), ready) => {
                    ready
                        .context("the gateways did not learn of each other within 60 s")?
                        .context("a gateway stopped while starting")?;
                }
                Some(stopped) = self.components.join_next() => {
                    let (name, outcome) = stopped.context("a component panicked")?;
                    outcome.with_context(|| format!("the {name} stopped while starting"))?;
                    anyhow::bail!("the {name} stopped while starting");
                }
            }
        }
        Ok(())
    }

    /// Starts one more gateway of `region` on an ephemeral port, serving
    /// `shard` (as another replica would), and returns its URL once it
    /// routes with a topology that knows every gateway of the mesh.
    pub async fn add_gateway(
        &mut self,
        gateway_id: &str,
        region: &str,
        shard: ShardConfig,
    ) -> anyhow::Result<String> {
        let listener = bind(0, &format!("gateway {gateway_id}")).await?;
        let url = self.security.url_of(&listener)?;
        let gateway = GatewayStart {
            gateway_id: gateway_id.to_string(),
            region: region.to_string(),
            shards: vec![shard],
            coordinator_url: self.coordinator_url.clone(),
            tune: self.tune_gateway.clone(),
            security: self.security.clone(),
        };
        let (mut topology, _) = spawn_gateway(
            gateway,
            listener,
            &self.bus,
            &self.shutdown,
            &mut self.components,
        )
        .await?;
        let n_gateways = self.gateway_urls.len();
        tokio::time::timeout(
            Duration::from_secs(60),
            topology.wait_for(|topology| topology.gateways.len() > n_gateways),
        )
        .await
        .context("the new gateway did not join within 60 s")?
        .context("the new gateway stopped while starting")?;
        Ok(url)
    }

    /// Starts one more notifier replica, `notifier_id`, on an ephemeral
    /// port, and returns its URL once it serves.
    pub async fn add_notifier(&mut self, notifier_id: &str) -> anyhow::Result<String> {
        let listener = bind(0, &format!("notifier {notifier_id}")).await?;
        let stop = self.shutdown.child_token();
        let url = spawn_notifier(
            NotifierStart {
                id: notifier_id.to_string(),
                coordinator_url: self.coordinator_url.clone(),
                subscriber_buffer: self.subscriber_buffer,
                webhooks: self.webhooks.clone(),
                security: self.security.clone(),
            },
            listener,
            &self.bus,
            stop.clone(),
            &mut self.components,
        )?;
        self.notifier_stops.insert(notifier_id.to_string(), stop);
        Ok(url)
    }

    /// Stops a notifier started with [`DevMesh::add_notifier`], as when its
    /// replica goes away; its subscribers' streams end.
    pub fn stop_notifier(&mut self, notifier_id: &str) -> anyhow::Result<()> {
        let stop = self
            .notifier_stops
            .remove(notifier_id)
            .with_context(|| format!("no notifier {notifier_id} was added"))?;
        stop.cancel();
        Ok(())
    }

    /// The topology the gateway of `region` routes by.
    pub fn gateway_topology(&self, region: &str) -> Option<watch::Receiver<Arc<Topology>>> {
        let index = self
            .gateway_urls
            .iter()
            .position(|(name, _)| name == region)?;
        self.topologies.get(index).cloned()
    }

    /// The number of inboxes the gateway of `region` streams, as it changes.
    pub fn gateway_open_streams(&self, region: &str) -> Option<watch::Receiver<usize>> {
        Some(self.signals_of(region)?.open_streams.clone())
    }

    /// Whether the mesh can do its work: each gateway's readiness, the
    /// reasons named by gateway.
    pub fn readiness(&self) -> fedmesh_common::telemetry::Readiness {
        let gateways: Vec<(String, fedmesh_common::telemetry::Readiness)> = self
            .gateway_urls
            .iter()
            .zip(&self.signals)
            .map(|((region, _), signals)| (region.clone(), Arc::clone(&signals.readiness)))
            .collect();
        let gateways = Arc::new(gateways);
        Arc::new(move || {
            let gateways = Arc::clone(&gateways);
            Box::pin(async move {
                let mut unmet = Vec::new();
                for (region, readiness) in gateways.iter() {
                    for reason in readiness().await {
                        unmet.push(format!("gateway {region}: {reason}"));
                    }
                }
                unmet
            })
        })
    }

    /// The relay calls the gateway of `region` made so far.
    pub fn gateway_relay_attempts(
        &self,
        region: &str,
    ) -> Option<Arc<fedmesh_gateway::RelayAttempts>> {
        Some(Arc::clone(&self.signals_of(region)?.relay_attempts))
    }

    fn signals_of(&self, region: &str) -> Option<&GatewaySignals> {
        let index = self
            .gateway_urls
            .iter()
            .position(|(name, _)| name == region)?;
        self.signals.get(index)
    }

    /// Stops only the coordinator, as when it becomes unreachable; the
    /// gateways keep serving from their last topology.
    pub async fn stop_coordinator(&mut self) -> anyhow::Result<()> {
        self.coordinator_shutdown.cancel();
        let (name, outcome) = self
            .components
            .join_next()
            .await
            .context("no component is running")?
            .context("a component panicked")?;
        anyhow::ensure!(
            name == "coordinator",
            "the {name} stopped instead of the coordinator"
        );
        outcome
    }

    /// The certificates folder of a mesh on TLS.
    pub fn certs(&self) -> Option<&Path> {
        self.security.certs.as_deref()
    }

    /// A token that stops the mesh when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until a component stops (an error, or after the shutdown token
    /// was cancelled), then stops the rest and waits for all of them.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        while let Some(stopped) = self.components.join_next().await {
            // Whatever stopped first, the others follow.
            self.shutdown.cancel();
            let outcome = match stopped {
                Ok((name, outcome)) => outcome.with_context(|| format!("the {name} failed")),
                Err(error) => Err(anyhow::Error::from(error).context("a component panicked")),
            };
            if let Err(error) = outcome {
                tracing::error!(error = %format!("{error:#}"), "dev mesh component failed");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Stops every component gracefully and waits for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}
