//! `Notifications.Consume`: the events of a durable subscription, each
//! taken off the subscription's queue only when the subscriber acknowledges
//! it. The subscription is looked up at the coordinator (who owns it, what
//! it selects); its queue is on the bus.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use fedmesh_common::Identity;
use fedmesh_common::error::InvalidField;
use fedmesh_common::events::{DurableQueues, Filter, QueueConsumer};
use fedmesh_common::server::MalformedRequest;
use fedmesh_common::validate;
use fedmesh_proto::pb;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};

use crate::NotifierError;

/// Events handed to durable subscribers, by `redelivered`.
const DELIVERIES: &str = "fedmesh_notifier_deliveries_total";

/// Shows the deliveries' series from the start, at 0, so that rates over
/// them are defined before the first subscriber.
pub(crate) fn show_series() {
    for redelivered in ["false", "true"] {
        metrics::counter!(DELIVERIES, "redelivered" => redelivered).increment(0);
    }
}

/// Unacknowledged deliveries when the subscriber asks for none (0).
const DEFAULT_PREFETCH: u16 = 100;
/// Most unacknowledged deliveries a subscriber may ask for.
const MAX_PREFETCH: u32 = 10_000;

/// The coordinator's directory, as this notifier.
pub(crate) type DirectoryClient = fedmesh_common::coordinators::CoordinatorClient;

/// What serving durable subscriptions takes.
pub(crate) struct Durable {
    /// The queues on the bus; None: this notifier has no bus.
    pub(crate) queues: Option<Arc<dyn DurableQueues>>,
    pub(crate) directory: DirectoryClient,
    pub(crate) shutdown: CancellationToken,
}

pub(crate) type DeliveryStream =
    Pin<Box<dyn Stream<Item = Result<pb::EventDelivery, Status>> + Send>>;

impl Durable {
    /// Starts a Consume stream for `identity` from its first request.
    pub(crate) async fn consume(
        &self,
        identity: Identity,
        mut requests: Streaming<pb::ConsumeRequest>,
    ) -> Result<DeliveryStream, NotifierError> {
        let start = match requests.message().await {
            Ok(Some(pb::ConsumeRequest {
                request: Some(pb::consume_request::Request::Start(start)),
            })) => start,
            Ok(_) => {
                return Err(InvalidField::new(
                    "start",
                    "the first request must name the subscription (start)",
                )
                .into());
            }
            Err(status) => {
                return Err(match MalformedRequest::in_stream(&status) {
                    Some(malformed) => NotifierError::Malformed(malformed),
                    None => NotifierError::ClientGone,
                });
            }
        };
        validate::subscription_name("start.subscription", &start.subscription)?;
        let prefetch = match start.prefetch {
            0 => DEFAULT_PREFETCH,
            prefetch @ 1..=MAX_PREFETCH => u16::try_from(prefetch).unwrap_or(u16::MAX),
            _ => {
                return Err(InvalidField::new(
                    "start.prefetch",
                    format!("prefetch must be 1 to {MAX_PREFETCH} (0 means {DEFAULT_PREFETCH})"),
                )
                .into());
            }
        };
        let queues = self.queues.as_ref().ok_or(NotifierError::NoBus)?;
        let name = start.subscription;
        let subscription = self
            .directory
            .clone()
            .get_subscription(pb::GetSubscriptionRequest { name: name.clone() })
            .await
            .map_err(|status| match status.code() {
                Code::NotFound => NotifierError::SubscriptionNotFound(name.clone()),
                _ => {
                    tracing::warn!(subscription = %name, %status, "cannot look the subscription up");
                    NotifierError::NoCoordinator
                }
            })?
            .into_inner()
            .subscription
            .unwrap_or_default();
        let owns =
            matches!(identity, Identity::Operator(_)) || subscription.owner == identity.to_string();
        if !owns {
            return Err(NotifierError::PermissionDenied(format!(
                "subscription {name:?} is not {identity}'s"
            )));
        }
        if let Some(webhook) = &subscription.webhook {
            return Err(NotifierError::DeliveredToWebhook(name, webhook.url.clone()));
        }
        let filter = Filter {
            regions: subscription.regions,
            agencies: subscription.agencies,
            kinds: subscription.kinds,
        };
        let consumer = queues.consume(&name, prefetch).await.map_err(|error| {
            tracing::warn!(subscription = %name, %error, "cannot consume the subscription");
            NotifierError::NoFeed("")
        })?;
        tracing::debug!(%identity, subscription = %name, prefetch, "consumer joined");
        Ok(Serving {
            consumer,
            wanted: Wanted {
                filter,
                cloudevents: start.cloudevents,
            },
            requests,
            unacked: HashSet::new(),
            shutdown: self.shutdown.clone(),
        }
        .into_stream())
    }
}

/// What a subscriber wants of the queue's events.
struct Wanted {
    /// Which.
    filter: Filter,
    /// Also in the CloudEvents protobuf format.
    cloudevents: bool,
}

/// One Consume stream: the queue's events go down, the subscriber's acks
/// come up. Polled by the gRPC stream itself (no task between them);
/// dropping it, when the subscriber goes, drops the consumer, which gives
/// back what is unacknowledged.
struct Serving {
    consumer: Box<dyn QueueConsumer>,
    wanted: Wanted,
    requests: Streaming<pb::ConsumeRequest>,
    /// Deliveries made and not acknowledged.
    unacked: HashSet<u64>,
    shutdown: CancellationToken,
}

/// What the stream does next.
enum Step {
    Deliver(Box<pb::EventDelivery>),
    /// The subscriber is done: every ack it sent is applied, the stream
    /// ends (OK).
    End,
    /// The stream ends with this status.
    Fail(NotifierError),
}

impl Serving {
    /// The deliveries of this stream, then its end.
    fn into_stream(self) -> DeliveryStream {
        Box::pin(futures_util::stream::unfold(
            Some(self),
            |serving| async move {
                let mut serving = serving?;
                match serving.step().await {
                    Step::Deliver(delivery) => Some((Ok(*delivery), Some(serving))),
                    Step::End => None,
                    Step::Fail(error) => Some((Err(error.into()), None)),
                }
            },
        ))
    }

    /// Applies acks until the next delivery or the end.
    async fn step(&mut self) -> Step {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return Step::Fail(NotifierError::ShuttingDown),
                delivery = self.consumer.next() => match delivery {
                    None => return Step::Fail(NotifierError::SubscriptionGone),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "consuming a subscription failed");
                        return Step::Fail(NotifierError::NoFeed(" (its connection was lost)"));
                    }
                    Some(Ok(queued)) => {
                        // Bindings may select more than the filter (a wide
                        // filter is widened): what it does not want is done.
                        if !self.wanted.filter.matches(&queued.event) {
                            if let Err(error) = self.consumer.ack(queued.tag).await {
                                tracing::warn!(%error, "acknowledging a filtered event failed");
                                return Step::Fail(NotifierError::NoFeed(" (its connection was lost)"));
                            }
                            continue;
                        }
                        self.unacked.insert(queued.tag);
                        let redelivered = if queued.redelivered { "true" } else { "false" };
                        metrics::counter!(DELIVERIES, "redelivered" => redelivered).increment(1);
                        return Step::Deliver(Box::new(pb::EventDelivery {
                            delivery_id: queued.tag,
                            redelivered: queued.redelivered,
                            event: Some(queued.event.to_pb(self.wanted.cloudevents)),
                        }));
                    }
                },
                request = self.requests.message() => match request {
                    Ok(Some(pb::ConsumeRequest { request: Some(pb::consume_request::Request::Ack(ack)) })) => {
                        if let Err(error) = acknowledge(self.consumer.as_mut(), &mut self.unacked, ack).await {
                            return Step::Fail(error);
                        }
                    }
                    Ok(Some(_)) => {
                        return Step::Fail(InvalidField::new("ack", "after the start, requests only acknowledge deliveries").into());
                    }
                    Ok(None) | Err(_) => return Step::End,
                },
            }
        }
    }
}

/// Acknowledges the deliveries `ack` names, each one this stream made and
/// did not see acknowledged yet.
async fn acknowledge(
    consumer: &mut dyn QueueConsumer,
    unacked: &mut HashSet<u64>,
    ack: pb::ConsumeAck,
) -> Result<(), NotifierError> {
    for delivery_id in &ack.delivery_ids {
        if !unacked.remove(delivery_id) {
            return Err(InvalidField::new(
                "ack.delivery_ids",
                format!("{delivery_id} is not an unacknowledged delivery of this stream"),
            )
            .into());
        }
    }
    consumer.ack_all(&ack.delivery_ids).await.map_err(|error| {
        tracing::warn!(%error, "acknowledging failed");
        NotifierError::NoFeed(" (its connection was lost)")
    })
}
