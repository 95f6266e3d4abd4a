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

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::events::{
    BoxFuture, BusError, CLOUDEVENTS_JSON, DurableQueues, Event, EventPublisher, EventSource,
    QueueConsumer, QueueSpec, QueuedEvent, Subscription,
};
use crate::store::redact_url;

/// How long connecting to the broker, or its confirms of one publish, may
/// take before the attempt counts as failed (and is made again on a new
/// connection): a broker answers in milliseconds, and a connection that
/// died without a word must not hold events back for long.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one operation on the queues of durable subscriptions may take
/// (declaring a quorum queue waits for its replicas).
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

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
/// each of `bindings` (topic patterns such as `#` or
/// `west.*.message.accepted`).
pub async fn consume_exclusive(
    channel: &Channel,
    exchange: &str,
    bindings: &[&str],
) -> lapin::Result<Consumer> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive().auto_delete(),
            FieldTable::default(),
        )
        .await?;
    for binding in bindings {
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                (*binding).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
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

/// Closes `connection`, not waiting long for a broker that may be gone.
async fn close_quietly(connection: &Connection, reason: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(1), connection.close(0, reason.into())).await;
}

/// The AMQP properties of an event's message: persistent, CloudEvents
/// JSON, the event id as message id.
fn event_properties(event: &Event) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CLOUDEVENTS_JSON.into())
        .with_message_id(event.event_id.as_str().into())
        .with_type(event.kind.as_str().into())
        .with_app_id("fedmesh".into())
        .with_timestamp(u64::try_from(event.occurred_at_micros / 1_000_000).unwrap_or(0))
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
            close_quietly(&connection, "reconnecting").await;
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
            close_quietly(&connection, "publish failed").await;
        }
    }

    async fn publish_all(&self, channel: &Channel, events: &[Event]) -> Result<(), BusError> {
        let mut confirms = Vec::with_capacity(events.len());
        for event in events {
            let properties = event_properties(event);
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
/// process and handed out in memory: however many subscribers want an
/// event, the broker delivers it here once.
///
/// The queue is bound with the union of what the current subscribers want
/// (each binding counted, unbound when its last subscriber leaves), so the
/// broker sends only events someone here wants. A subscriber receives what
/// arrives while it is subscribed; when the connection to the broker is
/// lost, every subscriber's feed is closed (events may pass while the
/// source reconnects), so a subscriber learns it must subscribe again
/// rather than silently missing events.
pub struct AmqpSource {
    feed: Mutex<broadcast::Sender<Event>>,
    capacity: usize,
    consuming: watch::Sender<bool>,
    bindings: Arc<Bindings>,
}

/// The bindings of a source's queue, counted by subscriber.
struct Bindings {
    exchange: String,
    /// How many subscriptions hold each binding; held across the broker's
    /// answers so that binding and unbinding one key never interleave.
    counts: tokio::sync::Mutex<HashMap<String, usize>>,
    /// The channel and queue consumed now, if any.
    queue: Mutex<Option<(Channel, ShortString)>>,
}

impl Bindings {
    fn queue(&self) -> Option<(Channel, ShortString)> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_queue(&self, queue: Option<(Channel, ShortString)>) {
        *self
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = queue;
    }

    /// Holds `keys`, binding those no one held before.
    async fn hold(&self, keys: &[String]) -> Result<(), BusError> {
        let mut counts = self.counts.lock().await;
        let new: Vec<&String> = keys
            .iter()
            .filter(|key| !counts.contains_key(key.as_str()))
            .collect();
        if !new.is_empty() {
            let (channel, queue) = self
                .queue()
                .ok_or_else(|| BusError("not consuming the exchange".to_string()))?;
            for key in new {
                channel
                    .queue_bind(
                        queue.clone(),
                        self.exchange.as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|error| bus_error(&format!("cannot bind {key}"), error))?;
                // Counted from the moment it is bound: a failure after this
                // leaves it bound and held by no one, which unbinding
                // would fix but which costs only unwanted deliveries.
                counts.insert(key.clone(), 0);
            }
        }
        for key in keys {
            *counts.entry(key.clone()).or_default() += 1;
        }
        Ok(())
    }

    /// Gives up `keys`, unbinding those no one holds any more.
    async fn release(&self, keys: Vec<String>) {
        let mut counts = self.counts.lock().await;
        let queue = self.queue();
        for key in keys {
            let Some(count) = counts.get_mut(&key) else {
                continue;
            };
            *count = count.saturating_sub(1);
            if *count > 0 {
                continue;
            }
            counts.remove(&key);
            if let Some((channel, queue)) = &queue {
                let unbound = channel
                    .queue_unbind(
                        queue.clone(),
                        self.exchange.as_str().into(),
                        key.as_str().into(),
                        FieldTable::default(),
                    )
                    .await;
                if let Err(error) = unbound {
                    tracing::debug!(%key, %error, "unbinding failed; the queue goes with its connection");
                }
            }
        }
    }

    /// The keys someone holds, to bind on a new queue.
    async fn held(&self) -> Vec<String> {
        self.counts.lock().await.keys().cloned().collect()
    }
}

/// What a subscription to an [`AmqpSource`] holds: its bindings, released
/// when it is dropped.
struct Held {
    bindings: Arc<Bindings>,
    keys: Vec<String>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let bindings = Arc::clone(&self.bindings);
        let keys = std::mem::take(&mut self.keys);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { bindings.release(keys).await });
        }
    }
}

impl AmqpSource {
    /// Starts consuming `exchange` on the broker at `url` until `shutdown`;
    /// `name` is the connection's name on the broker. A subscriber may fall
    /// `capacity` events behind before its feed reports it lagged.
    pub fn start(
        url: &str,
        exchange: &str,
        name: &str,
        capacity: usize,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let source = Arc::new(AmqpSource {
            feed: Mutex::new(broadcast::channel(capacity).0),
            capacity,
            consuming: watch::channel(false).0,
            bindings: Arc::new(Bindings {
                exchange: exchange.to_string(),
                counts: tokio::sync::Mutex::new(HashMap::new()),
                queue: Mutex::new(None),
            }),
        });
        tokio::spawn(consume(
            Arc::clone(&source),
            url.to_string(),
            name.to_string(),
            shutdown,
        ));
        source
    }

    /// Waits until the source consumes the exchange: from then on a
    /// subscription receives every event it binds.
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
    fn subscribe(&self, bindings: Vec<String>) -> BoxFuture<'_, Result<Subscription, BusError>> {
        Box::pin(async move {
            // Subscribed before binding: nothing bound for it is missed.
            let events = self.sender().subscribe();
            self.bindings.hold(&bindings).await?;
            let held = Held {
                bindings: Arc::clone(&self.bindings),
                keys: bindings,
            };
            Ok(Subscription::new(events, Some(Box::new(held))))
        })
    }

    fn is_live(&self) -> bool {
        *self.consuming.borrow()
    }
}

/// Consumes until `shutdown`, reconnecting with backoff.
async fn consume(source: Arc<AmqpSource>, url: String, name: String, shutdown: CancellationToken) {
    const FIRST_RETRY: Duration = Duration::from_millis(100);
    let mut retry_in = FIRST_RETRY;
    loop {
        let consumed = consume_once(&source, &url, &name, &shutdown).await;
        source.consuming.send_replace(false);
        source.bindings.set_queue(None);
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
    name: &str,
    shutdown: &CancellationToken,
) -> Result<Consumed, BusError> {
    let exchange = source.bindings.exchange.as_str();
    let (connection, channel) = tokio::select! {
        () = shutdown.cancelled() => return Ok(Consumed::Stopped),
        connected = connect(url, name, exchange) => connected?,
    };
    let held = source.bindings.held().await;
    let held: Vec<&str> = held.iter().map(String::as_str).collect();
    let mut deliveries = consume_exclusive(&channel, exchange, &held)
        .await
        .map_err(|error| bus_error("cannot consume the exchange", error))?;
    tracing::info!(broker = %redact_url(url), %exchange, queue = %deliveries.queue(), "consuming events");
    source
        .bindings
        .set_queue(Some((channel.clone(), deliveries.queue())));
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
    close_quietly(&connection, "closing").await;
    Ok(ended)
}

/// The queues of durable subscriptions on the broker: one quorum queue per
/// subscription, named `<exchange>.sub.<subscription>` (so that meshes
/// sharing a broker under other exchanges never meet), bound to the
/// exchange with the subscription's bindings. Consumers acknowledge each
/// event; the broker hands what a consumer left unacknowledged to the next.
pub struct AmqpQueues {
    url: String,
    exchange: String,
    name: String,
    connection: tokio::sync::Mutex<Option<Connection>>,
    /// How long one operation may wait for the broker.
    timeout: Duration,
}

impl AmqpQueues {
    /// The queues of subscriptions to `exchange` on the broker at `url`;
    /// `name` is the connection's name on the broker.
    pub fn new(url: &str, exchange: &str, name: &str) -> Self {
        AmqpQueues {
            url: url.to_string(),
            exchange: exchange.to_string(),
            name: name.to_string(),
            connection: tokio::sync::Mutex::new(None),
            timeout: QUEUE_TIMEOUT,
        }
    }

    /// The same queues, each operation giving up after `timeout` rather
    /// than 30 s.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        AmqpQueues { timeout, ..self }
    }

    /// The queues of `settings`, if they name a broker.
    pub fn from_settings(settings: &EventBusSettings, name: &str) -> Option<Self> {
        let url = settings.amqp.as_deref()?;
        Some(Self::new(url, &settings.amqp_exchange, name))
    }

    /// The broker's name of the queue of `subscription`.
    pub fn queue_name(&self, subscription: &str) -> String {
        format!("{}.sub.{subscription}", self.exchange)
    }

    /// The broker's name of the dead-letter queue of `subscription`.
    pub fn dead_letter_queue_name(&self, subscription: &str) -> String {
        format!("{}.sub.{subscription}.dead", self.exchange)
    }

    /// Runs `operation` on the broker, giving up after its timeout (30 s):
    /// the connection is then dropped (a broker that stopped answering on it
    /// may never answer), so the next operation connects anew.
    fn bounded<'a, T: Send + 'a>(
        &'a self,
        what: &'static str,
        operation: impl Future<Output = Result<T, BusError>> + Send + 'a,
    ) -> BoxFuture<'a, Result<T, BusError>> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, operation).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    if let Some(connection) = self.connection.lock().await.take() {
                        close_quietly(&connection, "no answer").await;
                    }
                    Err(BusError(format!(
                        "the broker did not answer within {:?} ({what})",
                        self.timeout
                    )))
                }
            }
        })
    }

    /// A new channel in confirm mode.
    async fn confirm_channel(&self) -> Result<Channel, BusError> {
        let channel = self.channel().await?;
        if let Err(error) = channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
        {
            let _ = channel.close(200, "no confirms".into()).await;
            return Err(bus_error("cannot enable publisher confirms", error));
        }
        Ok(channel)
    }

    /// A new channel on the connection held, or on a new one.
    async fn channel(&self) -> Result<Channel, BusError> {
        let mut held = self.connection.lock().await;
        if let Some(connection) = held.as_ref()
            && connection.status().connected()
        {
            return connection
                .create_channel()
                .await
                .map_err(|error| bus_error("cannot open a channel", error));
        }
        let (connection, channel) = connect(&self.url, &self.name, &self.exchange).await?;
        *held = Some(connection);
        Ok(channel)
    }
}

impl DurableQueues for AmqpQueues {
    fn declare(&self, spec: QueueSpec) -> BoxFuture<'_, Result<(), BusError>> {
        self.bounded("declaring a queue", async move {
            let channel = self.channel().await?;
            let queue = self.queue_name(&spec.name);
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            arguments.insert(
                "x-single-active-consumer".into(),
                AMQPValue::Boolean(spec.strict_order),
            );
            let declared = async {
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions::durable(),
                        arguments,
                    )
                    .await?;
                // Few events and listed in place: a classic queue, which
                // keeps their order when a listing hands them back.
                if spec.dead_letters {
                    channel
                        .queue_declare(
                            self.dead_letter_queue_name(&spec.name).as_str().into(),
                            QueueDeclareOptions::durable(),
                            FieldTable::default(),
                        )
                        .await?;
                }
                for binding in &spec.bindings {
                    channel
                        .queue_bind(
                            queue.as_str().into(),
                            self.exchange.as_str().into(),
                            binding.as_str().into(),
                            QueueBindOptions::default(),
                            FieldTable::default(),
                        )
                        .await?;
                }
                Ok::<(), lapin::Error>(())
            }
            .await;
            let _ = channel.close(200, "declared".into()).await;
            declared.map_err(|error| bus_error(&format!("cannot declare queue {queue}"), error))
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), BusError>> {
        self.bounded("deleting a queue", async move {
            let channel = self.channel().await?;
            let queue = self.queue_name(name);
            let dead_letters = self.dead_letter_queue_name(name);
            let deleted = async {
                channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await?;
                channel
                    .queue_delete(dead_letters.as_str().into(), QueueDeleteOptions::default())
                    .await
            }
            .await;
            let _ = channel.close(200, "deleted".into()).await;
            deleted
                .map(|_| ())
                .map_err(|error| bus_error(&format!("cannot delete queue {queue}"), error))
        })
    }

    fn consume<'a>(
        &'a self,
        name: &'a str,
        prefetch: u16,
    ) -> BoxFuture<'a, Result<Box<dyn QueueConsumer>, BusError>> {
        self.bounded("consuming a queue", async move {
            let channel = self.channel().await?;
            let queue = self.queue_name(name);
            let consumer = async {
                channel
                    .basic_qos(prefetch.max(1), BasicQosOptions::default())
                    .await?;
                channel
                    .basic_consume(
                        queue.as_str().into(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
            }
            .await;
            match consumer {
                Ok(deliveries) => Ok(Box::new(AmqpConsumer {
                    channel,
                    deliveries,
                    outstanding: BTreeSet::new(),
                }) as Box<dyn QueueConsumer>),
                Err(error) => {
                    let _ = channel.close(200, "not consumed".into()).await;
                    Err(bus_error(&format!("cannot consume queue {queue}"), error))
                }
            }
        })
    }
    fn dead_letter<'a>(
        &'a self,
        name: &'a str,
        event: &'a Event,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        self.bounded("keeping a dead letter", async move {
            let channel = self.confirm_channel().await?;
            let queue = self.dead_letter_queue_name(name);
            let kept = publish_to_queue(&channel, &queue, event).await;
            let _ = channel.close(200, "dead-lettered".into()).await;
            kept
        })
    }

    fn dead_letters<'a>(
        &'a self,
        name: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, BusError>> {
        self.bounded("listing dead letters", async move {
            let channel = self.channel().await?;
            let queue = self.dead_letter_queue_name(name);
            let mut events = Vec::new();
            let listed = async {
                while events.len() < limit {
                    // Taken unacknowledged: closing the channel puts every
                    // one back where it was.
                    let Some(message) = channel
                        .basic_get(queue.as_str().into(), BasicGetOptions::default())
                        .await?
                    else {
                        break;
                    };
                    match Event::from_cloudevent_json(&message.delivery.data) {
                        Ok(event) => events.push(event),
                        Err(error) => {
                            tracing::warn!(%queue, %error, "a dead letter is not an event");
                        }
                    }
                }
                Ok::<(), lapin::Error>(())
            }
            .await;
            let _ = channel.close(200, "listed".into()).await;
            listed.map_err(|error| bus_error(&format!("cannot list {queue}"), error))?;
            Ok(events)
        })
    }

    fn replay_dead_letters<'a>(
        &'a self,
        name: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<usize, BusError>> {
        Box::pin(async move {
            let dead_letters = self.dead_letter_queue_name(name);
            let queue = self.queue_name(name);
            let (channel, limit) = self
                .bounded("starting a replay", async {
                    let channel = self.confirm_channel().await?;
                    // Those there now: what fails again and comes back is
                    // not replayed again in the same call.
                    let waiting = channel
                        .queue_declare(
                            dead_letters.as_str().into(),
                            QueueDeclareOptions {
                                passive: true,
                                ..QueueDeclareOptions::default()
                            },
                            FieldTable::default(),
                        )
                        .await;
                    match waiting {
                        Ok(declared) => Ok((channel, limit.min(declared.message_count() as usize))),
                        Err(error) => {
                            let _ = channel.close(200, "no dead letters".into()).await;
                            Err(bus_error(&format!("cannot read {dead_letters}"), error))
                        }
                    }
                })
                .await?;
            let mut replayed = 0;
            let outcome = async {
                while replayed < limit {
                    let read = channel
                        .basic_get(dead_letters.as_str().into(), BasicGetOptions::default());
                    let got = self
                        .bounded("reading dead letters", async {
                            read.await.map_err(|error| {
                                bus_error(&format!("cannot read {dead_letters}"), error)
                            })
                        })
                        .await?;
                    let Some(message) = got else {
                        break;
                    };
                    let delivery = message.delivery;
                    match Event::from_cloudevent_json(&delivery.data) {
                        Ok(event) => {
                            publish_to_queue(&channel, &queue, &event).await?;
                            replayed += 1;
                        }
                        Err(error) => {
                            tracing::warn!(queue = %dead_letters, %error, "dropped a dead letter that is not an event");
                        }
                    }
                    channel
                        .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                        .await
                        .map_err(|error| bus_error("ack failed", error))?;
                }
                Ok::<(), BusError>(())
            }
            .await;
            let _ = channel.close(200, "replayed".into()).await;
            outcome?;
            Ok(replayed)
        })
    }
}

/// Publishes `event` straight to the queue `queue` (through the default
/// exchange) on a confirm-mode channel; resolves once the broker holds it.
async fn publish_to_queue(channel: &Channel, queue: &str, event: &Event) -> Result<(), BusError> {
    let confirmed = async {
        let confirmation = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &event.to_cloudevent_json(),
                event_properties(event),
            )
            .await?
            .await?;
        Ok::<_, lapin::Error>(confirmation)
    };
    match tokio::time::timeout(BROKER_TIMEOUT, confirmed).await {
        Err(_) => Err(BusError(format!(
            "the broker confirmed nothing within {BROKER_TIMEOUT:?}"
        ))),
        Ok(Err(error)) => Err(bus_error(&format!("cannot publish to {queue}"), error)),
        Ok(Ok(confirmation)) => {
            // Refused, or returned as unroutable: the queue is not there.
            if confirmation.is_nack() || confirmation.take_message().is_some() {
                Err(BusError(format!("{queue} did not take the event")))
            } else {
                Ok(())
            }
        }
    }
}

/// A consumer of a subscription's queue, on a channel of its own: closing
/// it hands what it left unacknowledged back to the queue.
struct AmqpConsumer {
    channel: Channel,
    deliveries: Consumer,
    /// Delivery tags handed out and not acknowledged, oldest first.
    outstanding: BTreeSet<u64>,
}

impl QueueConsumer for AmqpConsumer {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<QueuedEvent, BusError>>> {
        Box::pin(async move {
            loop {
                let delivery = match self.deliveries.next().await {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(error)) => return Some(Err(bus_error("consuming failed", error))),
                    // The broker cancels a consumer whose queue is deleted,
                    // its channel still open; a closed channel means the
                    // connection went, not the queue.
                    None if self.channel.status().connected() => return None,
                    None => {
                        return Some(Err(BusError(
                            "the connection to the broker closed".to_string(),
                        )));
                    }
                };
                match Event::from_cloudevent_json(&delivery.data) {
                    Ok(event) => {
                        self.outstanding.insert(delivery.delivery_tag);
                        return Some(Ok(QueuedEvent {
                            tag: delivery.delivery_tag,
                            event,
                            redelivered: delivery.redelivered,
                        }));
                    }
                    Err(error) => {
                        // Not ours to deliver: dropped, not handed out again.
                        tracing::warn!(routing_key = %delivery.routing_key, %error, "rejected a message");
                        let _ = self
                            .channel
                            .basic_reject(
                                delivery.delivery_tag,
                                BasicRejectOptions { requeue: false },
                            )
                            .await;
                    }
                }
            }
        })
    }

    fn ack(&mut self, tag: u64) -> BoxFuture<'_, Result<(), BusError>> {
        self.ack_all_owned(vec![tag])
    }

    fn ack_all<'a>(&'a mut self, tags: &'a [u64]) -> BoxFuture<'a, Result<(), BusError>> {
        self.ack_all_owned(tags.to_vec())
    }
}

impl AmqpConsumer {
    /// Acknowledges `tags` (those outstanding): the run of outstanding tags
    /// from the oldest that are all acknowledged now goes as one `multiple`
    /// ack, the rest one by one.
    fn ack_all_owned(&mut self, tags: Vec<u64>) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            let wanted: BTreeSet<u64> = tags
                .into_iter()
                .filter(|tag| self.outstanding.contains(tag))
                .collect();
            let through = self
                .outstanding
                .iter()
                .take_while(|tag| wanted.contains(tag))
                .last()
                .copied();
            let acked = |error| bus_error("ack failed", error);
            if let Some(through) = through {
                self.channel
                    .basic_ack(through, BasicAckOptions { multiple: true })
                    .await
                    .map_err(acked)?;
                self.outstanding = self.outstanding.split_off(&(through + 1));
            }
            for tag in wanted.range(through.map_or(0, |through| through + 1)..) {
                self.channel
                    .basic_ack(*tag, BasicAckOptions::default())
                    .await
                    .map_err(acked)?;
                self.outstanding.remove(tag);
            }
            Ok(())
        })
    }
}

impl Drop for AmqpConsumer {
    fn drop(&mut self) {
        let channel = self.channel.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    channel.close(200, "consumer gone".into()),
                )
                .await;
            });
        }
    }
}
