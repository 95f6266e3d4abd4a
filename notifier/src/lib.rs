//! fedmesh notifier: fans mesh events out to subscribers.
//!
//! A notifier consumes the event bus through [`EventSource`] and serves
//! `Notifications.Subscribe`: each subscriber gets the events matching its
//! filter from the moment its call is answered.
//!
//! Access: an agency sees only events concerning itself; operators see all.
//! On the in-process bus of the dev mesh a subscriber too slow to keep up is
//! told so (RESOURCE_EXHAUSTED) rather than silently skipped.

mod durable;
mod webhooks;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_common::amqp::EventBusSettings;
use fedmesh_common::auth::RateLimitSettings;
use fedmesh_common::config::ConfigError;
use fedmesh_common::coordinators::Coordinators;
use fedmesh_common::discovery::{
    COORDINATOR_PORT, Discovery, DiscoveryOptions, parse_resolver_address,
};
use fedmesh_common::error::{ErrorKind, InvalidField, ServiceError, to_status};
use fedmesh_common::events::{DurableQueues, EventSource, Filter, FilterError};
use fedmesh_common::identity::{Identity, caller};
use fedmesh_common::server::{ConnectionSettings, Security, SecurityError};
use fedmesh_common::tls::TlsSettings;
use fedmesh_proto::pb;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub use webhooks::WebhookSettings;

/// Largest request a notifier reads: subscription filters.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Events handed from a subscriber's feed to its gRPC stream at once.
const STREAM_BUFFER: usize = 32;

/// Everything a notifier needs to run, each setting declared once (see
/// `fedmesh_common::config`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifierConfig {
    /// Address to listen on (`fedmesh notifier`; a notifier started in code
    /// serves on the listener it is given).
    #[arg(long, env = "FEDMESH_LISTEN", default_value = "127.0.0.1:50055")]
    pub listen: String,
    /// Address of the admin HTTP listener: `/metrics` (Prometheus text
    /// format), `/healthz` (alive) and `/readyz` (ready to work) [default:
    /// none].
    #[arg(long, env = "FEDMESH_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Stable id of this replica.
    #[arg(long, env = "FEDMESH_NOTIFIER_ID", default_value = "notifier-0")]
    pub id: String,
    /// URL of the coordinator, which tells clients where notifiers are;
    /// replicas comma separated (the next is tried when one does not
    /// answer).
    #[arg(
        long,
        env = "FEDMESH_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// DNS domain the coordinators are published under: the SRV records
    /// of `_fedmesh._tcp.coordinator.DOMAIN`, else the A/AAAA records of
    /// `coordinator.DOMAIN` on port 50051, tried before `--coordinator`
    /// [default: no DNS discovery].
    #[arg(long, env = "FEDMESH_DISCOVERY_DOMAIN")]
    pub discovery_domain: Option<String>,
    /// DNS server to ask, as IP or IP:PORT (port 53 without) [default: the
    /// system's resolver configuration, /etc/resolv.conf].
    #[arg(long, env = "FEDMESH_DISCOVERY_RESOLVER")]
    pub discovery_resolver: Option<String>,
    /// URL clients reach this notifier at [default: https:// (http://
    /// without TLS) and the listening address].
    #[arg(long, env = "FEDMESH_ADVERTISE")]
    pub advertise: Option<String>,
    /// Serve plaintext and trust the x-fedmesh-identity header from
    /// loopback peers (development only: refused on a non-loopback listen
    /// address, ignored when TLS is configured).
    #[arg(long, env = "FEDMESH_DEV_IDENTITY")]
    #[serde(default)]
    pub dev_identity: bool,
    /// Events a subscriber may fall behind before its stream ends with
    /// RESOURCE_EXHAUSTED (it subscribes again); the notifier keeps this many
    /// recent events in memory, shared by all its subscribers.
    #[arg(long, env = "FEDMESH_SUBSCRIBER_BUFFER", default_value_t = 16_384)]
    pub subscriber_buffer: usize,
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
    /// How subscriptions' webhooks are called (`[webhooks]` in the config
    /// file).
    #[command(flatten)]
    #[serde(default)]
    pub webhooks: WebhookSettings,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        fedmesh_common::config::defaults()
    }
}

impl NotifierConfig {
    /// Refuses settings the notifier cannot run with; names the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fedmesh_common::telemetry::check_admin_listen(self.admin_listen.as_deref())?;
        fedmesh_common::validate::agency_id("id", &self.id)
            .map_err(|invalid| ConfigError::setting("id", invalid.description))?;
        fedmesh_common::config::check_range(
            "subscriber_buffer",
            self.subscriber_buffer,
            1..=1_000_000,
        )?;
        fedmesh_common::discovery::check_dns_settings(
            self.discovery_domain.as_deref(),
            self.discovery_resolver.as_deref(),
        )?;
        self.connections.validate()?;
        self.tls.validate()?;
        self.rate_limits.validate()?;
        self.webhooks.validate()?;
        self.events.validate()
    }

    /// The same settings with the password in the broker URL hidden, to
    /// print them.
    pub fn redacted(&self) -> Self {
        NotifierConfig {
            events: self.events.redacted(),
            ..self.clone()
        }
    }
}

/// Everything a Subscribe call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    /// A filter field is malformed.
    #[error(transparent)]
    InvalidField(#[from] InvalidField),
    /// The caller may not see these events.
    #[error("{0}")]
    PermissionDenied(String),
    /// The subscriber fell behind the bus.
    #[error("subscriber fell {0} events behind and was disconnected; resubscribe")]
    Lagged(u64),
    /// The notifier is stopping.
    #[error("notifier shutting down; resubscribe")]
    ShuttingDown,
    /// No durable subscription of that name.
    #[error("subscription {0:?} does not exist")]
    SubscriptionNotFound(String),
    /// The subscription was deleted while consumed.
    #[error("the subscription was deleted")]
    SubscriptionGone,
    /// This notifier serves no durable subscriptions.
    #[error("this notifier has no event bus, so no durable subscriptions")]
    NoBus,
    /// The subscription's events go to a webhook, not to streams.
    #[error("subscription {0:?} delivers its events to the webhook {1}, not to Consume streams")]
    DeliveredToWebhook(String, String),
    /// The coordinator, which knows the subscriptions, did not answer.
    #[error(
        "this notifier cannot reach the coordinator to look the subscription up; retry shortly"
    )]
    NoCoordinator,
    /// The subscriber went away before saying what it wants.
    #[error("the subscriber went away")]
    ClientGone,
    /// The first request is not a `ConsumeRequest`.
    #[error(transparent)]
    Malformed(#[from] fedmesh_common::server::MalformedRequest),
    /// The notifier is not receiving the bus's events (it lost its broker,
    /// or has not reached it yet).
    #[error(
        "this notifier is not connected to the event bus{0}; subscribe again shortly (to it or another notifier)"
    )]
    NoFeed(&'static str),
}

impl ServiceError for NotifierError {
    fn kind(&self) -> ErrorKind {
        match self {
            NotifierError::InvalidField(_) | NotifierError::Malformed(_) => {
                ErrorKind::InvalidArgument
            }
            NotifierError::PermissionDenied(_) => ErrorKind::PermissionDenied,
            NotifierError::Lagged(_) => ErrorKind::ResourceExhausted,
            NotifierError::ShuttingDown
            | NotifierError::NoFeed(_)
            | NotifierError::NoCoordinator
            | NotifierError::ClientGone => ErrorKind::Unavailable,
            NotifierError::SubscriptionNotFound(_) | NotifierError::SubscriptionGone => {
                ErrorKind::NotFound
            }
            NotifierError::NoBus | NotifierError::DeliveredToWebhook(..) => {
                ErrorKind::FailedPrecondition
            }
        }
    }

    fn field(&self) -> Option<&str> {
        match self {
            NotifierError::InvalidField(invalid) => Some(invalid.field),
            _ => None,
        }
    }
}

impl From<FilterError> for NotifierError {
    fn from(error: FilterError) -> Self {
        match error {
            FilterError::Invalid(invalid) => NotifierError::InvalidField(invalid),
            FilterError::NotOwn(why) => NotifierError::PermissionDenied(why),
        }
    }
}

impl From<NotifierError> for Status {
    fn from(error: NotifierError) -> Self {
        to_status(&error)
    }
}

struct NotificationsService {
    source: Arc<dyn EventSource>,
    durable: durable::Durable,
    shutdown: CancellationToken,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl pb::notifications_server::Notifications for NotificationsService {
    type SubscribeStream = EventStream;
    type ConsumeStream = durable::DeliveryStream;

    async fn consume(
        &self,
        request: Request<tonic::Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let identity = caller(&request)?;
        let deliveries = self.durable.consume(identity, request.into_inner()).await?;
        Ok(Response::new(deliveries))
    }

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let identity = caller(&request)?;
        let request = request.into_inner();
        let cloudevents = request.cloudevents;
        let filter =
            Filter::for_caller(request.regions, request.agencies, request.kinds, &identity)
                .map_err(NotifierError::from)?;
        if !self.source.is_live() {
            return Err(NotifierError::NoFeed("").into());
        }
        // Subscribed before the call is answered: every event published after
        // the answer reaches this subscriber.
        let subscription = self
            .source
            .subscribe(filter.binding_keys())
            .await
            .map_err(|error| {
                tracing::warn!(%error, "cannot subscribe");
                NotifierError::NoFeed("")
            })?;
        let shutdown = self.shutdown.clone();
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        tracing::debug!(%identity, ?filter, "subscriber joined");
        tokio::spawn(async move {
            // The whole subscription, bindings included, lives as long as
            // the task (not only the field the loop reads).
            let mut subscription = subscription;
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => Err(NotifierError::ShuttingDown),
                    () = sender.closed() => return,
                    event = subscription.events.recv() => match event {
                        Ok(event) => Ok(event),
                        Err(RecvError::Lagged(n_missed)) => Err(NotifierError::Lagged(n_missed)),
                        Err(RecvError::Closed) if shutdown.is_cancelled() => Err(NotifierError::ShuttingDown),
                        Err(RecvError::Closed) => Err(NotifierError::NoFeed(" (its connection was lost: events may have been missed)")),
                    },
                };
                match event {
                    Ok(event) if filter.matches(&event) => {
                        if sender.send(Ok(event.to_pb(cloudevents))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        let _ = sender.send(Err(error.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}

/// Why a notifier could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A setting is out of range or missing.
    #[error(transparent)]
    Setting(#[from] ConfigError),
    /// The gRPC server failed, or the coordinator's URL is unusable.
    #[error("grpc: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The listener has no address.
    #[error("listener: {0}")]
    Listener(#[from] std::io::Error),
    /// Connections cannot be secured as configured.
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// The coordinators cannot be found as configured.
    #[error("coordinator: {0}")]
    Coordinator(String),
}

/// Runs a notifier on `listener`, consuming `source`, until `shutdown`; it
/// reports itself to the coordinator, which tells subscribers where it is.
pub async fn run(
    config: NotifierConfig,
    listener: TcpListener,
    source: Arc<dyn EventSource>,
    queues: Option<Arc<dyn DurableQueues>>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.validate()?;
    let local_address = listener.local_addr()?;
    let security = Security::establish(
        Identity::Notifier,
        &config.tls,
        &config.rate_limits,
        config.dev_identity,
        Some(local_address),
        &shutdown,
    )?;
    let address = match &config.advertise {
        Some(url) => url.clone(),
        None => format!("{}://{local_address}", security.scheme()),
    };
    let discovery = Discovery::new(
        DiscoveryOptions {
            domain: config.discovery_domain.clone(),
            resolver: config
                .discovery_resolver
                .as_deref()
                .and_then(|resolver| parse_resolver_address(resolver).ok()),
            port: COORDINATOR_PORT,
            grace: Duration::from_secs(300),
            scheme: security.scheme(),
            peers: Vec::new(),
        },
        shutdown.clone(),
    )
    .map_err(|error| RunError::Coordinator(error.to_string()))?;
    let coordinators = Coordinators::new(&config.coordinator, discovery, security.clone())
        .map_err(|error| RunError::Coordinator(error.to_string()))?;
    coordinators.settle().await;
    let directory = coordinators.directory();
    security.set_audit(fedmesh_common::audit::RemoteAudit::spawn(
        directory.clone(),
        shutdown.clone(),
    ));
    let notifier = pb::Notifier {
        notifier_id: config.id.clone(),
        address: address.clone(),
        last_seen: None,
    };
    let webhooks = queues.as_ref().map(|queues| {
        tokio::spawn(
            webhooks::Webhooks {
                settings: config.webhooks.clone(),
                directory: directory.clone(),
                queues: Arc::clone(queues),
                shutdown: shutdown.clone(),
            }
            .run(),
        )
    });
    durable::show_series();
    let durable = durable::Durable {
        queues,
        directory: directory.clone(),
        shutdown: shutdown.clone(),
    };
    let reporter = tokio::spawn(fedmesh_common::topology::report_periodically(
        "notifier",
        move || {
            let mut directory = directory.clone();
            let request = pb::ReportNotifierRequest {
                notifier: Some(notifier.clone()),
            };
            async move {
                let response = directory.report_notifier(request).await?;
                Ok(response.into_inner().report_interval_ms)
            }
        },
        shutdown.clone(),
    ));
    let service = NotificationsService {
        source,
        durable,
        shutdown: shutdown.clone(),
    };
    let routes =
        tonic::service::Routes::new(pb::notifications_server::NotificationsServer::new(service));
    tracing::info!(notifier_id = %config.id, %address, "notifier serving");
    let options =
        fedmesh_common::server::ServeOptions::new(config.connections, security, MAX_REQUEST_BYTES);
    let served = fedmesh_common::server::serve(routes, listener, options, shutdown.clone()).await;
    shutdown.cancel();
    let _ = reporter.await;
    if let Some(webhooks) = webhooks {
        let _ = webhooks.await;
    }
    tracing::info!(notifier_id = %config.id, "notifier stopped");
    Ok(served?)
}
