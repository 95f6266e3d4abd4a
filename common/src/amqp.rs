//! The event bus on RabbitMQ, through lapin on tokio.
//!
//! Every event of the mesh goes to one durable topic exchange
//! (`fedmesh.events` unless configured otherwise) as a persistent message:
//! the body is the event in the CloudEvents JSON format, the routing key is
//! `<region>.<agency>.<kind>` ([`Event::routing_key`]), the AMQP
//! `message_id` is the event id. [`AmqpPublisher`] publishes with publisher
//! confirms and resolves only once the broker confirmed every event, so an
//! outbox relay deletes only rows whose events the broker holds.
//! [`AmqpSource`] consumes the exchange through an exclusive queue of its
//! own and hands the events to its subscribers in memory.
//!
//! Neither reconnects in the background on its own schedule: the publisher
//! reconnects on the next publish after a failure (the outbox relay retries
//! with backoff), the source reconnects with backoff and, since events may
//! have passed meanwhile, ends its subscribers' feeds so they know.

use std::sync::Mutex;
use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::events::{BoxFuture, BusError, CLOUDEVENTS_JSON, Event, EventPublisher, EventSource};
use crate::store::redact_url;

/// How long connecting to the broker, or its confirms of one publish, may
/// take before the attempt counts as failed.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a role's events go: settings every role has, under `[events]` in
/// its config file.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventBusSettings {
    /// RabbitMQ URL of the mesh's event bus (amqp:// or amqps://, e.g.
    /// amqp://user:password@rabbitmq:5672/%2f). Without one a stand-alone
    /// gateway or coordinator keeps no events and a notifier has none to
    /// deliver.
    #[arg(long = "amqp", env = "FEDMESH_AMQP", value_name = "URL")]
    #[serde(default)]
    pub amqp: Option<String>,
    /// The topic exchange the mesh's events go through; every role of a
    /// mesh must name the same.
    #[arg(long, env = "FEDMESH_AMQP_EXCHANGE", default_value = "fedmesh.events")]
    pub amqp_exchange: String,
}

impl Default for EventBusSettings {
    fn default() -> Self {
        crate::config::defaults()
    }
}

impl EventBusSettings {
    /// Settings that use the broker at `url`.
    pub fn broker(url: impl Into<String>) -> Self {
        EventBusSettings {
            amqp: Some(url.into()),
            ..EventBusSettings::default()
        }
    }

    /// Refuses a URL lapin cannot use and an exchange name RabbitMQ refuses.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.amqp {
            url.parse::<AMQPUri>().map_err(|problem| {
                ConfigError::setting(
                    "amqp",
                    format!("{} is not an AMQP URL ({problem})", redact_url(url)),
                )
            })?;
        }
        let exchange = &self.amqp_exchange;
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
        if exchange.is_empty()
            || exchange.len() > 255
            || !exchange.chars().all(allowed)
            || exchange.starts_with("amq.")
        {
            return Err(ConfigError::setting(
                "amqp_exchange",
                format!(
                    "{exchange:?} is not a usable exchange name: use 1-255 letters, digits, \
                     '-', '_', '.' or ':', not starting with \"amq.\""
                ),
            ));
        }
        Ok(())
    }

    /// The same settings with the password in the URL hidden.
    pub fn redacted(&self) -> Self {
        EventBusSettings {
            amqp: self.amqp.as_deref().map(redact_url),
            amqp_exchange: self.amqp_exchange.clone(),
        }
    }
}

fn bus_error(what: &str, error: impl std::fmt::Display) -> BusError {
    BusError(format!("{what}: {error}"))
}

/// Declares the durable topic exchange `exchange` (nothing changes if it
/// exists as such).
pub async fn declare_exchange(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Consumes, without acknowledgements, a queue of the channel's connection
/// alone (exclusive: deleted with the connection) bound to `exchange` with
/// `binding` (a topic pattern such as `#` or `west.*.message.accepted`).
pub async fn consume_exclusive(
    channel: &Channel,
    exchange: &str,
    binding: &str,
) -> lapin::Result<Consumer> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive().auto_delete(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Connects to the broker at `url` as `name` and opens a channel on which
/// the durable topic exchange `exchange` exists.
async fn connect(url: &str, name: &str, exchange: &str) -> Result<(Connection, Channel), BusError> {
    let connected = async {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection = Connection::connect(url, properties)
            .await
            .map_err(|error| bus_error(&format!("cannot connect to {}", redact_url(url)), error))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|error| bus_error("cannot open a channel", error))?;
        declare_exchange(&channel, exchange)
            .await
            .map_err(|error| bus_error(&format!("cannot declare exchange {exchange}"), error))?;
        Ok((connection, channel))
    };
    tokio::time::timeout(BROKER_TIMEOUT, connected)
        .await
        .map_err(|_| {
            BusError(format!(
                "{} did not answer within {BROKER_TIMEOUT:?}",
                redact_url(url)
            ))
        })?
}

/// Publishes events to the exchange with publisher confirms; one
/// connection, opened on first use and again after a failure.
pub struct AmqpPublisher {
    url: String,
    exchange: String,
    name: String,
    held: tokio::sync::Mutex<Option<(Connection, Channel)>>,
}

impl AmqpPublisher {
    /// A publisher to the broker at `url`, exchange `exchange`; `name` is
    /// the connection's name on the broker (e.g. `fedmesh-gateway-east`).
    pub fn new(url: &str, exchange: &str, name: &str) -> Self {
        AmqpPublisher {
            url: url.to_string(),
            exchange: exchange.to_string(),
            name: name.to_string(),
            held: tokio::sync::Mutex::new(None),
        }
    }

    /// The publisher of `settings`, if they name a broker.
    pub fn from_settings(settings: &EventBusSettings, name: &str) -> Option<Self> {
        let url = settings.amqp.as_deref()?;
        Some(Self::new(url, &settings.amqp_exchange, name))
    }

    /// A confirm-mode channel: the one held if it still works, else a new one.
    async fn channel(&self) -> Result<Channel, BusError> {
        let mut held = self.held.lock().await;
        if let Some((connection, channel)) = held.as_ref()
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        if let Some((connection, _)) = held.take() {
            let _ = connection.close(0, "reconnecting".into()).await;
        }
        let (connection, channel) = connect(&self.url, &self.name, &self.exchange).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|error| bus_error("cannot enable publisher confirms", error))?;
        tracing::info!(broker = %redact_url(&self.url), exchange = %self.exchange, "publishing events");
        *held = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Forgets the connection after a failure, so the next publish opens a
    /// new one.
    async fn forget(&self) {
        if let Some((connection, _)) = self.held.lock().await.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                connection.close(0, "publish failed".into()),
            )
            .await;
        }
    }

    async fn publish_all(&self, channel: &Channel, events: &[Event]) -> Result<(), BusError> {
        let mut confirms = Vec::with_capacity(events.len());
        for event in events {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(CLOUDEVENTS_JSON.into())
                .with_message_id(event.event_id.as_str().into())
                .with_type(event.kind.as_str().into())
                .with_app_id("fedmesh".into())
                .with_timestamp(u64::try_from(event.occurred_at_micros / 1_000_000).unwrap_or(0));
            let confirm = channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    event.routing_key().into(),
                    BasicPublishOptions::default(),
                    &event.to_cloudevent_json(),
                    properties,
                )
                .await
                .map_err(|error| bus_error("publish failed", error))?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirmation = confirm
                .await
                .map_err(|error| bus_error("no confirm", error))?;
            if confirmation.is_nack() {
                return Err(BusError("the broker refused an event (nack)".to_string()));
            }
        }
        Ok(())
    }
}

impl EventPublisher for AmqpPublisher {
    fn publish(&self, events: Vec<Event>) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            if events.is_empty() {
                return Ok(());
            }
            let published = async {
                let channel = self.channel().await?;
                tokio::time::timeout(BROKER_TIMEOUT, self.publish_all(&channel, &events))
                    .await
                    .map_err(|_| {
                        BusError(format!(
                            "the broker confirmed nothing within {BROKER_TIMEOUT:?}"
                        ))
                    })?
            }
            .await;
            if published.is_err() {
                self.forget().await;
            }
            published
        })
    }
}

/// The events on the exchange, consumed by one exclusive queue of this
/// process (bound to every routing key) and handed out in memory.
///
/// A subscriber receives what arrives while it is subscribed. When the
/// connection to the broker is lost, every subscriber's receiver is closed
/// (events may pass while the source reconnects), so a subscriber learns it
/// must subscribe again rather than silently missing events.
pub struct AmqpSource {
    feed: Mutex<broadcast::Sender<Event>>,
    capacity: usize,
    consuming: watch::Sender<bool>,
}

impl AmqpSource {
    /// Starts consuming `exchange` on the broker at `url` until `shutdown`;
    /// `name` is the connection's name on the broker. `capacity` events are
    /// buffered for a slow subscriber.
    pub fn start(
        url: &str,
        exchange: &str,
        name: &str,
        capacity: usize,
        shutdown: CancellationToken,
    ) -> std::sync::Arc<Self> {
        let source = std::sync::Arc::new(AmqpSource {
            feed: Mutex::new(broadcast::channel(capacity).0),
            capacity,
            consuming: watch::channel(false).0,
        });
        tokio::spawn(consume(
            std::sync::Arc::clone(&source),
            url.to_string(),
            exchange.to_string(),
            name.to_string(),
            shutdown,
        ));
        source
    }

    /// Waits until the source consumes the exchange (its queue is bound):
    /// from then on every event published reaches it.
    pub async fn consuming(&self) {
        let mut consuming = self.consuming.subscribe();
        let _ = consuming.wait_for(|consuming| *consuming).await;
    }

    fn sender(&self) -> broadcast::Sender<Event> {
        self.feed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Ends every current subscriber's feed; later subscribers get a new one.
    fn interrupt(&self) {
        let mut feed = self
            .feed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *feed = broadcast::channel(self.capacity).0;
    }
}

impl EventSource for AmqpSource {
    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender().subscribe()
    }

    fn is_live(&self) -> bool {
        *self.consuming.borrow()
    }
}

/// Consumes until `shutdown`, reconnecting with backoff.
async fn consume(
    source: std::sync::Arc<AmqpSource>,
    url: String,
    exchange: String,
    name: String,
    shutdown: CancellationToken,
) {
    const FIRST_RETRY: Duration = Duration::from_millis(100);
    let mut retry_in = FIRST_RETRY;
    loop {
        let consumed = consume_once(&source, &url, &exchange, &name, &shutdown).await;
        source.consuming.send_replace(false);
        source.interrupt();
        match consumed {
            Ok(Consumed::Stopped) => return,
            Ok(Consumed::Lost(error)) => {
                // It had worked: start the backoff again.
                retry_in = FIRST_RETRY;
                tracing::warn!(%error, ?retry_in, "event bus lost; subscribers must resubscribe");
            }
            Err(error) => tracing::warn!(%error, ?retry_in, "event bus unreachable"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(retry_in) => {}
        }
        retry_in = (retry_in * 2).min(Duration::from_secs(10));
    }
}

/// How consuming on one connection ended.
enum Consumed {
    /// Shut down.
    Stopped,
    /// The connection or the consumer failed.
    Lost(BusError),
}

/// Consumes on one connection until `shutdown` or a failure; fails if it
/// cannot start consuming.
async fn consume_once(
    source: &AmqpSource,
    url: &str,
    exchange: &str,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<Consumed, BusError> {
    let (connection, channel) = tokio::select! {
        () = shutdown.cancelled() => return Ok(Consumed::Stopped),
        connected = connect(url, name, exchange) => connected?,
    };
    let mut deliveries = consume_exclusive(&channel, exchange, "#")
        .await
        .map_err(|error| bus_error("cannot consume the exchange", error))?;
    tracing::info!(broker = %redact_url(url), %exchange, queue = %deliveries.queue(), "consuming events");
    source.consuming.send_replace(true);
    let sender = source.sender();
    let ended = loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => break Consumed::Stopped,
            delivery = deliveries.next() => delivery,
        };
        match delivery {
            Some(Ok(delivery)) => match Event::from_cloudevent_json(&delivery.data) {
                // Nobody subscribed is not an error.
                Ok(event) => drop(sender.send(event)),
                Err(error) => {
                    tracing::warn!(routing_key = %delivery.routing_key, %error, "skipped a message");
                }
            },
            Some(Err(error)) => break Consumed::Lost(bus_error("consuming failed", error)),
            None => break Consumed::Lost(BusError("the broker ended the consumer".to_string())),
        }
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        connection.close(0, "closing".into()),
    )
    .await;
    Ok(ended)
}
