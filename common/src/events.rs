//! Mesh events and the event bus.
//!
//! Events are written to an outbox in the same transaction as the change they
//! report; an outbox relay publishes them through [`EventPublisher`] and
//! deletes them only once the bus accepted them. Notifiers consume them
//! through [`EventSource`] (live, in memory) and [`DurableQueues`] (the
//! queues of durable subscriptions). `crate::in_process` implements them
//! for the one-process dev mesh; `crate::amqp` implements them on RabbitMQ.
//! A role without a bus writes no events at all.
//!
//! A shard writes the events of a batch of messages (stored, acknowledged)
//! as one outbox row listing the messages; [`message_events`] makes the
//! events of such a row, attributes and ids included, the one place they
//! are built. Event ids are derived from the kind, region and message, so
//! an event published again after a crash keeps its id.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use fedmesh_proto::io::cloudevents::v1 as cloudevents;
use fedmesh_proto::pb;
use tokio::sync::broadcast;

use serde::{Deserialize, Serialize};

use crate::error::InvalidField;
use crate::identity::Identity;
use crate::time::{micros_from_timestamp, timestamp_from_micros};
use crate::validate;

/// `agency.registered`: an agency joined the directory.
pub const AGENCY_REGISTERED: &str = "agency.registered";
/// `agency.deregistered`: an agency left the directory.
pub const AGENCY_DEREGISTERED: &str = "agency.deregistered";
/// `message.accepted`: a message was stored in its recipient's home shard.
pub const MESSAGE_ACCEPTED: &str = "message.accepted";
/// `message.delivered`: the recipient acknowledged a message.
pub const MESSAGE_DELIVERED: &str = "message.delivered";

/// `gateway.down`: a gateway missed its reports (its id is the event's
/// agency field).
pub const GATEWAY_DOWN: &str = "gateway.down";
/// `gateway.up`: a gateway marked down reports again.
pub const GATEWAY_UP: &str = "gateway.up";
/// `agency.moved`: an agency's move cut over; the event's region is its new
/// home region.
pub const AGENCY_MOVED: &str = "agency.moved";

/// `message.forwarded`: a message that waited in its origin region's spool
/// reached its recipient's home region; the event's region is the origin's.
pub const MESSAGE_FORWARDED: &str = "message.forwarded";
/// `message.undeliverable`: a spooled message was refused by its recipient's
/// home region for good (the recipient left the directory, an access grant
/// was revoked...): it leaves the spool, and the event says why.
pub const MESSAGE_UNDELIVERABLE: &str = "message.undeliverable";

/// Every kind of event the mesh reports.
pub const EVENT_KINDS: [&str; 9] = [
    AGENCY_REGISTERED,
    AGENCY_DEREGISTERED,
    MESSAGE_ACCEPTED,
    MESSAGE_DELIVERED,
    GATEWAY_DOWN,
    GATEWAY_UP,
    AGENCY_MOVED,
    MESSAGE_FORWARDED,
    MESSAGE_UNDELIVERABLE,
];

/// The topic patterns that select, on the event exchange, the events of
/// `regions`, `agencies` and `kinds` (an empty list allows any): one per
/// combination, at most `max`. When the combinations are more, the list with
/// the most values is widened to any until they fit, so the patterns select
/// at least the wanted events; a subscriber filters what comes exactly.
pub fn binding_keys(
    regions: &[String],
    agencies: &[String],
    kinds: &[String],
    max: usize,
) -> Vec<String> {
    let mut lists: [Vec<&str>; 3] = [
        regions.iter().map(String::as_str).collect(),
        agencies.iter().map(String::as_str).collect(),
        kinds.iter().map(String::as_str).collect(),
    ];
    for list in &mut lists {
        list.sort_unstable();
        list.dedup();
    }
    let combinations = |lists: &[Vec<&str>; 3]| {
        lists
            .iter()
            .map(|list| list.len().max(1))
            .fold(1_usize, usize::saturating_mul)
    };
    while combinations(&lists) > max.max(1) {
        if let Some(longest) = lists.iter_mut().max_by_key(|list| list.len()) {
            longest.clear();
        }
    }
    // A region and an agency are one word each; a kind may be several.
    let [mut regions, mut agencies, mut kinds] = lists;
    for (list, any) in [(&mut regions, "*"), (&mut agencies, "*"), (&mut kinds, "#")] {
        if list.is_empty() {
            list.push(any);
        }
    }
    let mut keys = Vec::new();
    for region in &regions {
        for agency in &agencies {
            for kind in &kinds {
                keys.push(format!("{region}.{agency}.{kind}"));
            }
        }
    }
    keys
}

/// Something that happened in the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Unique id (UUIDv7, text form); subscribers deduplicate by it.
    pub event_id: String,
    /// One of the kinds above.
    pub kind: String,
    /// Region where it happened.
    pub region: String,
    /// The agency concerned.
    pub agency_id: String,
    /// The message concerned, if any.
    pub message_id: Option<String>,
    /// When it happened, microseconds since the epoch.
    pub occurred_at_micros: i64,
    /// More about it.
    pub attributes: BTreeMap<String, String>,
}

impl Event {
    /// A new event with a fresh id, happening now.
    pub fn new(kind: &str, region: &str, agency_id: &str) -> Self {
        Event {
            event_id: uuid::Uuid::now_v7().to_string(),
            kind: kind.to_string(),
            region: region.to_string(),
            agency_id: agency_id.to_string(),
            message_id: None,
            occurred_at_micros: crate::time::now_micros(),
            attributes: BTreeMap::new(),
        }
    }

    /// The same event, concerning `message_id`.
    pub fn with_message(mut self, message_id: &str) -> Self {
        self.message_id = Some(message_id.to_string());
        self
    }

    /// The same event with one more attribute.
    pub fn with_attribute(mut self, key: &str, value: impl ToString) -> Self {
        self.attributes.insert(key.to_string(), value.to_string());
        self
    }
}

/// `specversion` of the CloudEvents events fedmesh writes.
pub const CLOUDEVENTS_VERSION: &str = "1.0";
/// Media type of an event in the CloudEvents JSON format (structured mode).
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";
/// `datacontenttype` of the protobuf form's data.
pub const PROTOBUF_DATA: &str = "application/protobuf";
/// Type URL of the protobuf form's data.
pub const EVENT_DATA_TYPE_URL: &str = "type.googleapis.com/fedmesh.v1.EventData";

/// An event in the CloudEvents 1.0 JSON format: the context attributes
/// every CloudEvents tool reads, and the rest of the event as JSON `data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CloudEvent {
    specversion: String,
    id: String,
    /// `/fedmesh/<region>/<component>`: where the event happened.
    source: String,
    /// The event kind, e.g. `message.accepted`.
    #[serde(rename = "type")]
    kind: String,
    /// The agency concerned.
    subject: String,
    /// RFC 3339, microseconds.
    time: String,
    datacontenttype: String,
    /// The distributed-tracing extension: the W3C trace context of the
    /// message the event is about, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
    data: EventData,
}

/// The `data` of a fedmesh CloudEvent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct EventData {
    region: String,
    agency_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message_id: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

/// An event body that is not a fedmesh CloudEvent.
#[derive(Debug, thiserror::Error)]
#[error("not a fedmesh CloudEvent: {0}")]
pub struct NotAnEvent(String);

impl Event {
    /// The component that reports events of this kind.
    fn component(&self) -> &'static str {
        if self.kind.starts_with("agency.") || self.kind.starts_with("gateway.") {
            "coordinator"
        } else {
            "gateway"
        }
    }

    /// The W3C trace context of the message the event is about, if it has
    /// one: its `traceparent` attribute, which the CloudEvents forms also
    /// carry as the distributed-tracing extension attribute.
    pub fn traceparent(&self) -> Option<&str> {
        self.attributes
            .get(TRACEPARENT_ATTRIBUTE)
            .map(String::as_str)
            .filter(|traceparent| !traceparent.is_empty())
    }

    /// The CloudEvents `source`: `/fedmesh/<region>/<component>`.
    pub fn source(&self) -> String {
        format!("/fedmesh/{}/{}", self.region, self.component())
    }

    /// The routing key on the event exchange: `<region>.<agency>.<kind>`
    /// (a kind has dots of its own: `east.registry-a.message.accepted`).
    pub fn routing_key(&self) -> String {
        format!("{}.{}.{}", self.region, self.agency_id, self.kind)
    }

    /// The event in the CloudEvents 1.0 JSON format.
    pub fn to_cloudevent_json(&self) -> Vec<u8> {
        let cloud_event = CloudEvent {
            specversion: CLOUDEVENTS_VERSION.to_string(),
            id: self.event_id.clone(),
            source: self.source(),
            kind: self.kind.clone(),
            subject: self.agency_id.clone(),
            time: timestamp_from_micros(self.occurred_at_micros).to_string(),
            datacontenttype: "application/json".to_string(),
            traceparent: self.traceparent().map(str::to_string),
            data: EventData {
                region: self.region.clone(),
                agency_id: self.agency_id.clone(),
                message_id: self.message_id.clone(),
                attributes: self.attributes.clone(),
            },
        };
        // A struct of strings and a map of strings always serializes.
        serde_json::to_vec(&cloud_event).unwrap_or_default()
    }

    /// The event in the CloudEvents 1.0 protobuf format: the context
    /// attributes of the JSON format (time, subject and datacontenttype in
    /// the attribute map), the data a `fedmesh.v1.EventData`.
    pub fn to_cloudevent_proto(&self) -> cloudevents::CloudEvent {
        use cloudevents::cloud_event::cloud_event_attribute_value::Attr;
        use cloudevents::cloud_event::{CloudEventAttributeValue, Data};
        let value = |attr| CloudEventAttributeValue { attr: Some(attr) };
        let traceparent = self.traceparent().map(|traceparent| {
            (
                "traceparent",
                value(Attr::CeString(traceparent.to_string())),
            )
        });
        let attributes = [
            (
                "time",
                value(Attr::CeTimestamp(timestamp_from_micros(
                    self.occurred_at_micros,
                ))),
            ),
            ("subject", value(Attr::CeString(self.agency_id.clone()))),
            (
                "datacontenttype",
                value(Attr::CeString(PROTOBUF_DATA.to_string())),
            ),
        ];
        let data = pb::EventData {
            region: self.region.clone(),
            agency_id: self.agency_id.clone(),
            message_id: self.message_id.clone().unwrap_or_default(),
            attributes: self.attributes.clone().into_iter().collect(),
        };
        cloudevents::CloudEvent {
            id: self.event_id.clone(),
            source: self.source(),
            spec_version: CLOUDEVENTS_VERSION.to_string(),
            r#type: self.kind.clone(),
            attributes: attributes
                .into_iter()
                .chain(traceparent)
                .map(|(name, value)| (name.to_string(), value))
                .collect(),
            data: Some(Data::ProtoData(prost_types::Any {
                type_url: EVENT_DATA_TYPE_URL.to_string(),
                value: prost::Message::encode_to_vec(&data),
            })),
        }
    }

    /// The event as gRPC carries it; with its CloudEvents protobuf form
    /// too if `cloudevents`.
    pub fn to_pb(self, cloudevents: bool) -> pb::Event {
        let cloud_event = cloudevents.then(|| self.to_cloudevent_proto());
        pb::Event {
            cloud_event,
            ..pb::Event::from(self)
        }
    }

    /// Reads an event written by [`Event::to_cloudevent_json`].
    pub fn from_cloudevent_json(body: &[u8]) -> Result<Event, NotAnEvent> {
        let cloud_event: CloudEvent =
            serde_json::from_slice(body).map_err(|error| NotAnEvent(error.to_string()))?;
        if cloud_event.specversion != CLOUDEVENTS_VERSION {
            return Err(NotAnEvent(format!(
                "specversion {:?}, expected {CLOUDEVENTS_VERSION}",
                cloud_event.specversion
            )));
        }
        let time: prost_types::Timestamp = cloud_event
            .time
            .parse()
            .map_err(|error| NotAnEvent(format!("time {:?}: {error}", cloud_event.time)))?;
        Ok(Event {
            event_id: cloud_event.id,
            kind: cloud_event.kind,
            region: cloud_event.data.region,
            agency_id: cloud_event.data.agency_id,
            message_id: cloud_event.data.message_id,
            occurred_at_micros: micros_from_timestamp(Some(&time)),
            attributes: cloud_event.data.attributes,
        })
    }
}

impl From<Event> for pb::Event {
    fn from(event: Event) -> Self {
        pb::Event {
            event_id: event.event_id,
            kind: event.kind,
            region: event.region,
            agency_id: event.agency_id,
            message_id: event.message_id.unwrap_or_default(),
            occurred_at: Some(timestamp_from_micros(event.occurred_at_micros)),
            attributes: event.attributes.into_iter().collect(),
            cloud_event: None,
        }
    }
}

impl From<pb::Event> for Event {
    fn from(event: pb::Event) -> Self {
        Event {
            event_id: event.event_id,
            kind: event.kind,
            region: event.region,
            agency_id: event.agency_id,
            message_id: Some(event.message_id).filter(|id| !id.is_empty()),
            occurred_at_micros: micros_from_timestamp(event.occurred_at.as_ref()),
            attributes: event.attributes.into_iter().collect(),
        }
    }
}

/// One message of an outbox row that lists the messages of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageEntry {
    /// The message.
    pub message_id: String,
    /// Its recipient: the agency the event concerns.
    pub recipient_id: String,
    /// Its sender.
    pub sender_id: String,
    /// Its kind.
    pub message_kind: String,
    /// Its sequence in the recipient's inbox.
    pub sequence: u64,
    /// Its W3C trace context; empty if it has none (stored before messages
    /// carried one).
    pub traceparent: String,
}

/// The attribute of a message's events that holds its W3C trace context,
/// named as the CloudEvents distributed-tracing extension names it.
pub const TRACEPARENT_ATTRIBUTE: &str = "traceparent";

/// The id of the event of `kind` about `message_id` in `region`: the same
/// whenever the event is published again.
pub fn message_event_id(kind: &str, region: &str, message_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    for part in [kind, region, message_id] {
        digest.update(part.as_bytes());
        digest.update([0]);
    }
    let digest: [u8; 32] = digest.finalize().into();
    let mut bytes = [0_u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Uuid::new_v8(bytes).to_string()
}

/// The events of `kind` that happened in `region` at `occurred_at_micros`,
/// one per message of `entries`, in order.
pub fn message_events(
    kind: &str,
    region: &str,
    occurred_at_micros: i64,
    entries: Vec<MessageEntry>,
) -> Vec<Event> {
    entries
        .into_iter()
        .map(|entry| {
            let mut attributes = BTreeMap::from([
                ("sender".to_string(), entry.sender_id),
                ("kind".to_string(), entry.message_kind),
                ("sequence".to_string(), entry.sequence.to_string()),
            ]);
            if !entry.traceparent.is_empty() {
                attributes.insert(TRACEPARENT_ATTRIBUTE.to_string(), entry.traceparent);
            }
            Event {
                event_id: message_event_id(kind, region, &entry.message_id),
                kind: kind.to_string(),
                region: region.to_string(),
                agency_id: entry.recipient_id,
                attributes,
                message_id: Some(entry.message_id),
                occurred_at_micros,
            }
        })
        .collect()
}

/// The bus refused or failed to take events; the outbox keeps them.
#[derive(Debug, thiserror::Error)]
#[error("event bus unavailable: {0}")]
pub struct BusError(pub String);

/// A boxed future, for the dyn-compatible bus traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Publishes events. Resolves only once the bus has accepted all of them.
pub trait EventPublisher: Send + Sync + 'static {
    /// Publishes `events` in order.
    fn publish(&self, events: Vec<Event>) -> BoxFuture<'_, Result<(), BusError>>;
}

/// Events as a subscriber receives them from an [`EventSource`]; what the
/// source holds for it is given up when it is dropped.
pub struct Subscription {
    /// The events. Closed when the source cannot tell what it missed (it
    /// lost its bus): the subscriber must subscribe again. Lagged when the
    /// subscriber fell further behind than the source buffers.
    pub events: broadcast::Receiver<Event>,
    _held: Option<Box<dyn Send + Sync>>,
}

impl Subscription {
    /// Events from `events`; `held` is dropped with the subscription.
    pub fn new(
        events: broadcast::Receiver<Event>,
        held: Option<Box<dyn Send + Sync>>,
    ) -> Subscription {
        Subscription {
            events,
            _held: held,
        }
    }
}

/// Hands out live subscriptions to the events on the bus.
pub trait EventSource: Send + Sync + 'static {
    /// A subscription to the events published from the moment it resolves
    /// whose routing keys match one of `bindings` (see [`binding_keys`]); it
    /// may receive other events too, which the subscriber filters out.
    fn subscribe(&self, bindings: Vec<String>) -> BoxFuture<'_, Result<Subscription, BusError>>;

    /// Whether the source receives the bus's events now (a subscriber that
    /// subscribes while it does not would wait in vain).
    fn is_live(&self) -> bool {
        true
    }
}

/// Most bindings one filter adds to a queue; a filter with more
/// combinations is widened (and its subscriber filters exactly).
pub const MAX_BINDINGS: usize = 64;

/// Which events a subscriber wants; an empty list allows all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Allowed regions.
    pub regions: Vec<String>,
    /// Allowed agencies.
    pub agencies: Vec<String>,
    /// Allowed event kinds.
    pub kinds: Vec<String>,
}

/// A filter that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// A field is malformed.
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    /// It names events that do not concern the caller.
    #[error("{0}")]
    NotOwn(String),
}

impl Filter {
    /// The topic patterns that select at least these events on the event
    /// exchange (see [`binding_keys`]).
    pub fn binding_keys(&self) -> Vec<String> {
        binding_keys(&self.regions, &self.agencies, &self.kinds, MAX_BINDINGS)
    }

    /// Whether `event` passes the filter.
    pub fn matches(&self, event: &Event) -> bool {
        let allows = |allowed: &[String], value: &str| {
            allowed.is_empty() || allowed.iter().any(|item| item == value)
        };
        allows(&self.regions, &event.region)
            && allows(&self.agencies, &event.agency_id)
            && allows(&self.kinds, &event.kind)
    }

    /// Validates a filter and narrows it to what `identity` may see: an
    /// agency only events concerning itself.
    pub fn for_caller(
        regions: Vec<String>,
        agencies: Vec<String>,
        kinds: Vec<String>,
        identity: &Identity,
    ) -> Result<Filter, FilterError> {
        for region in &regions {
            validate::region("regions", region)?;
        }
        for agency in &agencies {
            validate::agency_id("agencies", agency)?;
        }
        for kind in &kinds {
            if !EVENT_KINDS.contains(&kind.as_str()) {
                return Err(InvalidField::new(
                    "kinds",
                    format!(
                        "{kind:?} is not an event kind: use {}",
                        EVENT_KINDS.join(", ")
                    ),
                )
                .into());
            }
        }
        let mut filter = Filter {
            regions,
            agencies,
            kinds,
        };
        if let Identity::Agency(own) = identity {
            if filter.agencies.iter().any(|agency| agency != own) {
                return Err(FilterError::NotOwn(format!(
                    "{identity} may subscribe only to events concerning itself"
                )));
            }
            filter.agencies = vec![own.clone()];
        }
        Ok(filter)
    }
}

/// A durable subscription's queue: the events its bindings select are kept
/// in it, from the moment it is declared, until a consumer acknowledges them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// The subscription's name.
    pub name: String,
    /// The topic patterns selecting its events (see [`binding_keys`]).
    pub bindings: Vec<String>,
    /// One consumer at a time receives its events, in order (else
    /// consumers compete for them).
    pub strict_order: bool,
    /// It keeps dead letters beside it (a webhook subscription's events
    /// that every attempt failed to deliver).
    pub dead_letters: bool,
}

/// An event handed to the consumer of a durable queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedEvent {
    /// What the consumer acknowledges it by, unique per consumer.
    pub tag: u64,
    /// The event.
    pub event: Event,
    /// It was handed out before and not acknowledged.
    pub redelivered: bool,
}

/// The durable queues of subscriptions on the bus.
pub trait DurableQueues: Send + Sync + 'static {
    /// Declares the queue of `spec` (again: its bindings become those of
    /// `spec`); resolves once every event published afterwards that the
    /// bindings select is kept.
    fn declare(&self, spec: QueueSpec) -> BoxFuture<'_, Result<(), BusError>>;

    /// Deletes the queue `name` and what it holds; nothing if there is none.
    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), BusError>>;

    /// Consumes the queue `name`, at most `prefetch` events unacknowledged
    /// at a time. What is unacknowledged when the consumer is dropped goes
    /// back to the queue, for this or another consumer.
    fn consume<'a>(
        &'a self,
        name: &'a str,
        prefetch: u16,
    ) -> BoxFuture<'a, Result<Box<dyn QueueConsumer>, BusError>>;

    /// Keeps `event` among the dead letters of the queue `name` (events its
    /// subscription could not deliver); resolves once they hold it. The
    /// dead letters are declared and deleted with the queue.
    fn dead_letter<'a>(
        &'a self,
        name: &'a str,
        event: &'a Event,
    ) -> BoxFuture<'a, Result<(), BusError>>;

    /// Up to `limit` dead letters of `name`, oldest first, left in place.
    fn dead_letters<'a>(
        &'a self,
        name: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, BusError>>;

    /// Moves up to `limit` dead letters of `name`, oldest first, back to the
    /// end of its queue; how many moved. An event leaves the dead letters
    /// only once the queue holds it again.
    fn replay_dead_letters<'a>(
        &'a self,
        name: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<usize, BusError>>;
}

/// A consumer of a durable queue.
pub trait QueueConsumer: Send {
    /// The next event; None once the queue is deleted.
    fn next(&mut self) -> BoxFuture<'_, Option<Result<QueuedEvent, BusError>>>;

    /// Acknowledges the event handed out as `tag`: the queue forgets it.
    fn ack(&mut self, tag: u64) -> BoxFuture<'_, Result<(), BusError>>;

    /// Acknowledges every event handed out as one of `tags`, at once where
    /// the queue can.
    fn ack_all<'a>(&'a mut self, tags: &'a [u64]) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            for tag in tags {
                self.ack(*tag).await?;
            }
            Ok(())
        })
    }
}

/// Whether the routing key `key` matches the topic pattern `pattern`: words
/// separated by '.', `*` standing for one word and `#` for any number.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn matches(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skipped| matches(rest, &key[skipped..])),
            Some((word, rest)) => key.split_first().is_some_and(|(first, key_rest)| {
                (*word == "*" || word == first) && matches(rest, key_rest)
            }),
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = key.split('.').collect();
    matches(&pattern, &key)
}

/// A role's way onto the event bus: where it publishes, and the queues of
/// durable subscriptions.
#[derive(Clone)]
pub struct EventBus {
    /// Where events go.
    pub publisher: std::sync::Arc<dyn EventPublisher>,
    /// The queues of durable subscriptions.
    pub queues: std::sync::Arc<dyn DurableQueues>,
}

/// The events a store committed and has not yet handed to the bus.
pub trait Outbox: Send + Sync + 'static {
    /// Publishes the events of up to `limit` of the oldest outbox rows (a
    /// row is one event, or the events of a batch of messages) through
    /// `publisher`, in order, and deletes the rows once it accepted them;
    /// returns how many events were relayed (0: the outbox is empty, or
    /// another relay is draining it).
    /// Two relays of one outbox never publish the same rows concurrently.
    fn relay_batch<'a>(
        &'a self,
        limit: u32,
        publisher: &'a dyn EventPublisher,
    ) -> BoxFuture<'a, Result<usize, BusError>>;
}

/// How long a page of outbox rows took to publish, confirms included, by
/// `outbox` (a shard, or the coordinator's).
pub const OUTBOX_PUBLISH_DURATION: &str = "fedmesh_outbox_publish_duration_seconds";
/// Outbox rows published (a row holds the events of one commit).
pub const OUTBOX_ROWS_PUBLISHED: &str = "fedmesh_outbox_rows_published_total";
/// Failed attempts to drain an outbox (the broker did not take them).
pub const OUTBOX_FAILURES: &str = "fedmesh_outbox_failures_total";

/// Drains `outbox` to `publisher` until `shutdown`: woken by `wake` after each
/// commit that wrote events, and every `poll_interval` regardless. Rows are
/// deleted only after the publisher accepted them, so an event may be
/// published twice after a crash but is never lost.
pub async fn run_outbox_relay(
    name: String,
    outbox: std::sync::Arc<dyn Outbox>,
    publisher: std::sync::Arc<dyn EventPublisher>,
    wake: std::sync::Arc<tokio::sync::Notify>,
    poll_interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    // Rows; a row may hold the events of a whole batch of messages.
    const BATCH: u32 = 64;
    // Shown from the start, at 0, so that an alert on its rate is defined.
    metrics::counter!(OUTBOX_FAILURES, "outbox" => name.clone()).increment(0);
    metrics::counter!(OUTBOX_ROWS_PUBLISHED, "outbox" => name.clone()).increment(0);
    let mut backoff = poll_interval;
    loop {
        let drained = async {
            loop {
                let started = std::time::Instant::now();
                let relayed = outbox.relay_batch(BATCH, publisher.as_ref()).await?;
                if relayed == 0 {
                    return Ok::<(), BusError>(());
                }
                metrics::histogram!(OUTBOX_PUBLISH_DURATION, "outbox" => name.clone())
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!(OUTBOX_ROWS_PUBLISHED, "outbox" => name.clone())
                    .increment(u64::try_from(relayed).unwrap_or(u64::MAX));
            }
        }
        .await;
        if let Err(error) = drained {
            metrics::counter!(OUTBOX_FAILURES, "outbox" => name.clone()).increment(1);
            tracing::warn!(outbox = %name, %error, retry_in = ?backoff, "outbox relay failed, will retry");
            // After a failure only the backoff wakes the relay, not commits.
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            // At most a few seconds: once the broker is back, events flow
            // again soon; a connection attempt every few seconds per
            // outbox costs a broker that is down nothing.
            backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            continue;
        }
        backoff = poll_interval;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(poll_interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agencies_see_only_their_own_events() {
        let alpha = Identity::Agency("alpha".into());
        let filter = Filter::for_caller(vec![], vec![], vec![], &alpha).expect("own");
        let mut event = Event::new(MESSAGE_ACCEPTED, "east", "alpha");
        assert!(filter.matches(&event));
        event.agency_id = "beta".into();
        assert!(!filter.matches(&event));
        assert!(matches!(
            Filter::for_caller(vec![], vec!["beta".into()], vec![], &alpha),
            Err(FilterError::NotOwn(_))
        ));
    }

    #[test]
    fn filters_combine_regions_and_kinds() {
        let operator = Identity::Operator("ops".into());
        let filter = Filter::for_caller(
            vec!["west".into()],
            vec![],
            vec![MESSAGE_DELIVERED.into()],
            &operator,
        )
        .expect("valid");
        assert!(filter.matches(&Event::new(MESSAGE_DELIVERED, "west", "x1")));
        assert!(!filter.matches(&Event::new(MESSAGE_ACCEPTED, "west", "x1")));
        assert!(!filter.matches(&Event::new(MESSAGE_DELIVERED, "east", "x1")));
        assert!(matches!(
            Filter::for_caller(vec![], vec![], vec!["message.sent".into()], &operator),
            Err(FilterError::Invalid(_))
        ));
    }

    #[test]
    fn topic_patterns_match_as_amqp_topic_exchanges_do() {
        assert!(topic_matches("*.*.#", "east.a.message.accepted"));
        assert!(topic_matches(
            "east.*.message.accepted",
            "east.a.message.accepted"
        ));
        assert!(!topic_matches(
            "east.*.message.accepted",
            "west.a.message.accepted"
        ));
        assert!(!topic_matches("*.a.message", "east.a.message.accepted"));
        assert!(topic_matches("east.#", "east"));
        assert!(topic_matches("#.accepted", "east.a.message.accepted"));
        assert!(!topic_matches("*.*", "east"));
    }

    #[test]
    fn binding_keys_select_at_least_the_wanted_events_within_the_limit() {
        let strings = |values: &[&str]| {
            values
                .iter()
                .map(|value| value.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(binding_keys(&[], &[], &[], 64), vec!["*.*.#"]);
        assert_eq!(
            binding_keys(
                &strings(&["west", "east"]),
                &strings(&["a"]),
                &strings(&[MESSAGE_ACCEPTED]),
                64
            ),
            vec!["east.a.message.accepted", "west.a.message.accepted"]
        );
        // 3 x 2 combinations over a limit of 4: the three agencies become any.
        let widened = binding_keys(
            &strings(&["east", "west"]),
            &strings(&["a", "b", "c"]),
            &[],
            4,
        );
        assert_eq!(widened, vec!["east.*.#", "west.*.#"]);
        let everything = binding_keys(&strings(&["r1", "r2"]), &strings(&["a1", "a2"]), &[], 1);
        assert_eq!(everything, vec!["*.*.#"]);
        let event = Event::new(MESSAGE_DELIVERED, "west", "b");
        assert_eq!(event.routing_key(), "west.b.message.delivered");
    }

    #[test]
    fn an_event_reads_back_from_its_cloudevent_json() {
        let event = Event::new(MESSAGE_ACCEPTED, "west", "reader")
            .with_message("m1")
            .with_attribute("sender", "writer");
        let json = event.to_cloudevent_json();
        let value: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(value["specversion"], "1.0");
        assert_eq!(value["type"], "message.accepted");
        assert_eq!(value["source"], "/fedmesh/west/gateway");
        assert_eq!(value["subject"], "reader");
        assert_eq!(event.routing_key(), "west.reader.message.accepted");
        assert_eq!(Event::from_cloudevent_json(&json).expect("event"), event);

        let registered = Event::new(AGENCY_REGISTERED, "east", "ministry");
        assert_eq!(registered.source(), "/fedmesh/east/coordinator");
        assert!(Event::from_cloudevent_json(b"{\"specversion\":\"0.3\"}").is_err());
        assert!(Event::from_cloudevent_json(b"not json").is_err());
    }

    #[test]
    fn message_events_carry_their_attributes_and_stable_ids() {
        let entry = MessageEntry {
            message_id: "m1".into(),
            recipient_id: "reader".into(),
            sender_id: "sender".into(),
            message_kind: "note".into(),
            sequence: 7,
            traceparent: String::new(),
        };
        let events = message_events(MESSAGE_ACCEPTED, "west", 5, vec![entry.clone()]);
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert_eq!(event.agency_id, "reader");
        assert_eq!(event.message_id.as_deref(), Some("m1"));
        assert_eq!(event.attributes["sender"], "sender");
        assert_eq!(event.attributes["kind"], "note");
        assert_eq!(event.attributes["sequence"], "7");
        assert_eq!(
            event.traceparent(),
            None,
            "a message without a trace context"
        );
        let again = message_events(MESSAGE_ACCEPTED, "west", 9, vec![entry.clone()]);
        assert_eq!(
            again[0].event_id, event.event_id,
            "published again, same id"
        );
        let delivered = message_events(MESSAGE_DELIVERED, "west", 9, vec![entry]);
        assert_ne!(delivered[0].event_id, event.event_id);
        assert!(uuid::Uuid::parse_str(&event.event_id).is_ok());
    }

    #[test]
    fn message_events_carry_the_trace_context_as_the_cloudevents_extension() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let entry = MessageEntry {
            message_id: "m1".into(),
            recipient_id: "reader".into(),
            sender_id: "sender".into(),
            message_kind: "note".into(),
            sequence: 7,
            traceparent: traceparent.into(),
        };
        let events = message_events(MESSAGE_DELIVERED, "west", 5, vec![entry]);
        let event = &events[0];
        assert_eq!(event.traceparent(), Some(traceparent));
        let json = event.to_cloudevent_json();
        let value: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(value["traceparent"], traceparent);
        assert_eq!(&Event::from_cloudevent_json(&json).expect("event"), event);
        let proto = event.to_cloudevent_proto();
        let attribute = proto
            .attributes
            .get("traceparent")
            .and_then(|value| value.attr.clone());
        assert_eq!(
            attribute,
            Some(
                cloudevents::cloud_event::cloud_event_attribute_value::Attr::CeString(
                    traceparent.into()
                )
            )
        );
        // An event about no message has no such attribute.
        let plain = Event::new(AGENCY_REGISTERED, "east", "ministry");
        let value: serde_json::Value =
            serde_json::from_slice(&plain.to_cloudevent_json()).expect("json");
        assert!(value.get("traceparent").is_none());
        assert!(
            !plain
                .to_cloudevent_proto()
                .attributes
                .contains_key("traceparent")
        );
    }
}
