//! TRANSPORT (outbound): relaying messages to the gateways of other regions.
//!
//! Messages for one region are gathered into `ForwardBatch` calls, the way
//! the committer gathers stores into transactions: while some batches are
//! on their way, new messages queue and the next batch takes them, up to
//! [`MAX_BATCH`] messages and the byte size the receiving gateway decodes
//! (its payload limit and room for the envelope: the same limit every
//! gateway of a mesh is configured with). Each sender still gets its own
//! receipt or status. Per-sender order holds because a sender's next
//! message is relayed only after the receipt of the previous one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_common::error::ErrorKind;
use fedmesh_common::identity::AttachIdentity;
use fedmesh_common::server::Security;
use fedmesh_common::tls::ExpectedServer;
use fedmesh_proto::pb;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::GatewayError;

type RelayClient = pb::relay_client::RelayClient<InterceptedService<Channel, AttachIdentity>>;
pub(crate) type MovesClient =
    pb::moves_client::MovesClient<InterceptedService<Channel, AttachIdentity>>;
type Reply = oneshot::Sender<Result<pb::Receipt, GatewayError>>;

/// Most messages in one relayed batch.
const MAX_BATCH: usize = 256;
/// Batches on their way to one region at once.
const MAX_IN_FLIGHT: usize = 4;
/// What a message adds to a `ForwardBatchRequest` besides its own encoding:
/// the field's tag and length prefix.
const FIELD_OVERHEAD: usize = 6;

/// How relayed batches are bounded and timed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelayLimits {
    /// Most bytes of one `ForwardBatchRequest`: what a receiving gateway
    /// decodes.
    pub(crate) max_batch_bytes: usize,
    /// How long a batch may take at one gateway before the next is tried.
    pub(crate) timeout: Duration,
}

/// One lazily opened client per gateway address.
pub(crate) struct RelayClients {
    security: Security,
    /// The coordinator's Relay, for a region none of whose gateways answers.
    coordinator: Option<RelayClient>,
    limits: RelayLimits,
    channels: Mutex<HashMap<String, Channel>>,
}

impl RelayClients {
    /// Clients secured by `security`; what no gateway of a region takes
    /// goes through the coordinator at `coordinator_url`.
    pub(crate) fn new(security: Security, limits: RelayLimits, coordinator_url: &str) -> Self {
        let coordinator = security
            .channel(
                coordinator_url,
                ExpectedServer::Is(fedmesh_common::identity::Identity::Coordinator),
            )
            .map(|channel| {
                pb::relay_client::RelayClient::with_interceptor(channel, security.attach())
                    .max_encoding_message_size(limits.max_batch_bytes)
            })
            .ok();
        RelayClients {
            coordinator,
            security,
            limits,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The channel to the gateway of `region` at `address`, opened once.
    fn channel(&self, region: &str, address: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = self.security.channel(
            address,
            ExpectedServer::Is(fedmesh_common::identity::Identity::Gateway(
                region.to_string(),
            )),
        )?;
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    fn client(&self, region: &str, address: &str) -> Result<RelayClient, tonic::transport::Error> {
        Ok(pb::relay_client::RelayClient::with_interceptor(
            self.channel(region, address)?,
            self.security.attach(),
        )
        .max_encoding_message_size(self.limits.max_batch_bytes))
    }

    /// A Moves client for the gateway of `region` at `address`, sending
    /// requests of at most what a gateway decodes.
    pub(crate) fn moves_client(
        &self,
        region: &str,
        address: &str,
    ) -> Result<MovesClient, tonic::transport::Error> {
        Ok(pb::moves_client::MovesClient::with_interceptor(
            self.channel(region, address)?,
            self.security.attach(),
        )
        .max_encoding_message_size(self.limits.max_batch_bytes))
    }

    /// The most bytes of one request a gateway decodes.
    pub(crate) fn max_request_bytes(&self) -> usize {
        self.limits.max_batch_bytes
    }

    /// Gives each message of `request` what is left of its sender's
    /// deadline now (a retry on another gateway carries less, never more);
    /// returns the call's timeout: as long as the longest of them needs,
    /// never longer than the relay timeout.
    fn stamp(
        &self,
        request: &mut pb::ForwardBatchRequest,
        deadlines: &[Option<Instant>],
    ) -> Duration {
        let now = Instant::now();
        let mut timeout = Duration::ZERO;
        for (message, deadline) in request.messages.iter_mut().zip(deadlines) {
            let left = deadline.map_or(self.limits.timeout, |deadline| {
                deadline.saturating_duration_since(now)
            });
            if deadline.is_some() {
                // 0 means no deadline: one that ran out is the least there is.
                message.timeout_micros = u64::try_from(left.as_micros()).unwrap_or(u64::MAX).max(1);
            }
            timeout = timeout.max(left.min(self.limits.timeout));
        }
        timeout.max(Duration::from_millis(1))
    }

    /// Sends `messages` to the first of `gateways` that answers.
    async fn forward_batch(
        &self,
        region: &str,
        gateways: &[String],
        messages: Vec<pb::ForwardRequest>,
        deadlines: &[Option<Instant>],
    ) -> Result<Vec<pb::ForwardResult>, GatewayError> {
        let expected = messages.len();
        let mut request = pb::ForwardBatchRequest { messages };
        let mut last_failure = None;
        for address in gateways {
            let mut client = match self.client(region, address) {
                Ok(client) => client,
                Err(error) => {
                    tracing::warn!(%region, %address, %error, "unusable gateway address");
                    continue;
                }
            };
            let timeout = self.stamp(&mut request, deadlines);
            let mut call = tonic::Request::new(request.clone());
            call.set_timeout(timeout);
            match client.forward_batch(call).await {
                Ok(response) => {
                    let results = response.into_inner().results;
                    if results.len() != expected {
                        return Err(GatewayError::InvalidAnswer {
                            address: address.clone(),
                            problem: format!("{} results for {expected} messages", results.len()),
                        });
                    }
                    return Ok(results);
                }
                Err(status)
                    if matches!(
                        status.code(),
                        Code::Unavailable
                            | Code::DeadlineExceeded
                            | Code::Cancelled
                            | Code::Unknown
                    ) =>
                {
                    tracing::warn!(%region, %address, error = %status.message(), "relay failed, trying next gateway");
                    last_failure = Some(Arc::new(status));
                }
                Err(status) => {
                    return Err(GatewayError::Relayed {
                        kind: ErrorKind::of_code(status.code()),
                        message: status.message().to_string(),
                    });
                }
            }
        }
        // No gateway of the region answered: the coordinator may reach it.
        if let Some(coordinator) = &self.coordinator {
            tracing::warn!(%region, "no gateway of the region answers; relaying through the coordinator");
            let timeout = self.stamp(&mut request, deadlines);
            let mut call = tonic::Request::new(request);
            call.set_timeout(timeout);
            match coordinator.clone().forward_batch(call).await {
                Ok(response) => {
                    let results = response.into_inner().results;
                    if results.len() == expected {
                        return Ok(results);
                    }
                }
                Err(status) => {
                    tracing::warn!(%region, error = %status.message(), "relay through the coordinator failed");
                    last_failure = Some(Arc::new(status));
                }
            }
        }
        Err(GatewayError::RegionUnreachable {
            region: region.to_string(),
            source: last_failure,
        })
    }
}

/// A message waiting for its batch.
struct Queued {
    request: pb::ForwardRequest,
    gateways: Vec<String>,
    reply: Reply,
    size: usize,
    deadline: Option<Instant>,
}

/// The queue of messages relayed to one region.
#[derive(Clone)]
pub(crate) struct RelayBatcher {
    sender: mpsc::Sender<Queued>,
}

impl RelayBatcher {
    /// Starts relaying to `region`; the task ends when the last clone of
    /// the batcher is dropped, after sending what was queued.
    pub(crate) fn spawn(region: String, clients: Arc<RelayClients>) -> Self {
        let (sender, receiver) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(relay_loop(region, clients, receiver));
        RelayBatcher { sender }
    }

    /// Relays `request` to one of `gateways` and returns its receipt. A
    /// message whose `deadline` passed before its batch was taken is not
    /// sent.
    pub(crate) async fn forward(
        &self,
        request: pb::ForwardRequest,
        gateways: Vec<String>,
        deadline: Option<Instant>,
    ) -> Result<pb::Receipt, GatewayError> {
        let (reply, answer) = oneshot::channel();
        let stopped =
            || GatewayError::ShuttingDown("retry on another gateway with the same idempotency key");
        let queued = Queued {
            size: request.encoded_len() + FIELD_OVERHEAD,
            request,
            gateways,
            reply,
            deadline,
        };
        self.sender.send(queued).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Takes the next batch: waits for a first message, then takes what queued
/// meanwhile while it fits `max_bytes` and [`MAX_BATCH`]; a message that
/// does not fit waits in `carried` for the next batch. Messages whose
/// deadline passed are answered at once and left out. Returns an empty
/// batch once every sender is gone and nothing is queued.
async fn next_batch(
    receiver: &mut mpsc::Receiver<Queued>,
    carried: &mut Option<Queued>,
    max_bytes: usize,
) -> Vec<Queued> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    loop {
        let next = match carried.take() {
            Some(queued) => Some(queued),
            None if batch.is_empty() => receiver.recv().await,
            None => receiver.try_recv().ok(),
        };
        let Some(queued) = next else {
            return batch;
        };
        if queued
            .deadline
            .is_some_and(|deadline| deadline <= Instant::now())
        {
            let _ = queued.reply.send(Err(GatewayError::DeadlineExceeded));
            continue;
        }
        if !batch.is_empty() && (bytes + queued.size > max_bytes || batch.len() >= MAX_BATCH) {
            *carried = Some(queued);
            return batch;
        }
        bytes += queued.size;
        batch.push(queued);
    }
}

async fn relay_loop(
    region: String,
    clients: Arc<RelayClients>,
    mut receiver: mpsc::Receiver<Queued>,
) {
    let mut carried = None;
    let mut in_flight = tokio::task::JoinSet::new();
    let max_bytes = clients.limits.max_batch_bytes;
    loop {
        let batch = next_batch(&mut receiver, &mut carried, max_bytes).await;
        if batch.is_empty() {
            break;
        }
        // The newest message carries the newest view of the region's gateways.
        let gateways = batch
            .last()
            .map(|queued| queued.gateways.clone())
            .unwrap_or_default();
        let mut messages = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        let mut deadlines = Vec::with_capacity(batch.len());
        for queued in batch {
            messages.push(queued.request);
            replies.push(queued.reply);
            deadlines.push(queued.deadline);
        }
        while in_flight.len() >= MAX_IN_FLIGHT {
            in_flight.join_next().await;
        }
        let clients = Arc::clone(&clients);
        let region = region.clone();
        in_flight.spawn(async move {
            match clients
                .forward_batch(&region, &gateways, messages, &deadlines)
                .await
            {
                Ok(results) => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result_from_pb(&region, result));
                    }
                }
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        });
    }
    while in_flight.join_next().await.is_some() {}
}

/// One message's result of a `ForwardBatch` to `region`.
fn result_from_pb(region: &str, result: pb::ForwardResult) -> Result<pb::Receipt, GatewayError> {
    match result.result {
        Some(pb::forward_result::Result::Receipt(receipt)) => Ok(receipt),
        // The coordinator's relay could not reach the region either.
        Some(pb::forward_result::Result::Error(error)) if error.unreachable => {
            Err(GatewayError::RegionUnreachable {
                region: region.to_string(),
                source: None,
            })
        }
        Some(pb::forward_result::Result::Error(error)) if error.moved => {
            Err(GatewayError::MovedAway(error.message))
        }
        Some(pb::forward_result::Result::Error(error)) => Err(GatewayError::Relayed {
            kind: ErrorKind::of_code(Code::from_i32(error.code)),
            message: error.message,
        }),
        None => Err(GatewayError::Relayed {
            kind: ErrorKind::Internal,
            message: "the home region answered no result for the message".into(),
        }),
    }
}
