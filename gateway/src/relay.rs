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
//!
//! Every batch goes through the same stack of policies:
//! - a **concurrency limit**: at most [`MAX_IN_FLIGHT`] batches per region
//!   on their way at once; further messages queue (and batch) meanwhile;
//! - **balancing** over the region's endpoints by load, tier by tier (DNS,
//!   the coordinator's, the settings'), with **ejection** of an endpoint
//!   that keeps failing ([`balance`]);
//! - a **timeout** per attempt: what is left of the longest sender's
//!   deadline, at most the relay timeout, sent as `grpc-timeout` (each
//!   message carries its own, so no hop extends it) and enforced here too,
//!   so a peer that holds a call does not hold the batch;
//! - **retries** of what did not get an answer (no answer, a reset, a
//!   timeout: never a refusal) on another endpoint, then through the
//!   coordinator, under a **retry budget** of 20% of first attempts. A
//!   retry is safe: a relayed message carries its id, and the home gateway
//!   stores an id once.
//!
//! What gets no answer within the budget is the region being unreachable:
//! the caller spools it. Connections are HTTP/2 channels opened once per
//! endpoint and shared by every call.

mod balance;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_common::coordinators::CoordinatorRelayClient;
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
use balance::Balancer;

type RelayClient = pb::relay_client::RelayClient<InterceptedService<Channel, AttachIdentity>>;
pub(crate) type MovesClient =
    pb::moves_client::MovesClient<InterceptedService<Channel, AttachIdentity>>;
type Reply = oneshot::Sender<Result<pb::Receipt, GatewayError>>;

/// Most messages in one relayed batch.
const MAX_BATCH: usize = 256;
/// Batches on their way to one region at once: the relay's concurrency
/// limit.
const MAX_IN_FLIGHT: usize = 4;
/// How long past an attempt's `grpc-timeout` the relay waits for its
/// answer before giving it up itself (the peer ends the call first when
/// it is there to).
const TIMEOUT_GRACE: Duration = Duration::from_millis(100);
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
    coordinator: CoordinatorRelayClient,
    limits: RelayLimits,
    channels: Mutex<HashMap<String, Channel>>,
    attempts: Arc<RelayAttempts>,
}

/// How many relay calls a gateway made: first attempts of batches and
/// retries (of all regions, since it started).
#[derive(Debug, Default)]
pub struct RelayAttempts {
    first: AtomicU64,
    retries: AtomicU64,
}

impl RelayAttempts {
    /// Batches relayed (their first attempts).
    pub fn first(&self) -> u64 {
        self.first.load(Ordering::Relaxed)
    }

    /// Further attempts of those batches, on another endpoint or through
    /// the coordinator.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}

impl RelayClients {
    /// Clients secured by `security`; what no gateway of a region takes
    /// goes through `coordinator`.
    pub(crate) fn new(
        security: Security,
        limits: RelayLimits,
        coordinator: CoordinatorRelayClient,
    ) -> Self {
        let coordinator = coordinator.max_encoding_message_size(limits.max_batch_bytes);
        RelayClients {
            coordinator,
            security,
            limits,
            channels: Mutex::new(HashMap::new()),
            attempts: Arc::default(),
        }
    }

    /// The relay calls made so far.
    pub(crate) fn attempts(&self) -> Arc<RelayAttempts> {
        Arc::clone(&self.attempts)
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

    /// Sends `messages` to a gateway of `region`, tier by tier of
    /// `tiers`, then through the coordinator, retrying what got no answer
    /// while the budget allows.
    async fn forward_batch(
        &self,
        region: &str,
        balancer: &Balancer,
        tiers: &[Vec<String>],
        messages: Vec<pb::ForwardRequest>,
        deadlines: &[Option<Instant>],
    ) -> Result<Vec<pb::ForwardResult>, GatewayError> {
        let expected = messages.len();
        let mut request = pb::ForwardBatchRequest { messages };
        let mut last_failure = None;
        let mut targets = Targets::new(tiers, Some(&self.coordinator));
        let mut attempted = false;
        while let Some(target) = targets.next(balancer) {
            // An address no channel can be opened to is passed over, not
            // attempted.
            let client = match &target {
                Target::Gateway(address) => match self.client(region, address) {
                    Ok(client) => Some(client),
                    Err(error) => {
                        tracing::warn!(%region, %address, %error, "unusable gateway address");
                        continue;
                    }
                },
                Target::Coordinator(_) => None,
            };
            if !std::mem::replace(&mut attempted, true) {
                balancer.first_attempt();
                self.attempts.first.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::relay_attempt(region, false);
            } else if !balancer.may_retry() {
                tracing::warn!(%region, "relay retry budget spent: the region counts as unreachable for this batch");
                break;
            } else {
                self.attempts.retries.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::relay_attempt(region, true);
            }
            if all_passed(deadlines) {
                return Err(GatewayError::DeadlineExceeded);
            }
            let timeout = self.stamp(&mut request, deadlines);
            let answer = match (&target, client) {
                (Target::Gateway(address), Some(client)) => {
                    let call = balancer.start(address);
                    let answer = attempt(&request, timeout, |call| async move {
                        let mut client = client;
                        client.forward_batch(call).await
                    })
                    .await;
                    match &answer {
                        Err(status) if gets_no_answer(status) => {
                            if call.failed() {
                                tracing::warn!(%region, %address, "gateway ejected after failing in a row");
                                crate::telemetry::ejected(region);
                            }
                        }
                        _ => call.answered(),
                    }
                    answer
                }
                (Target::Gateway(_), None) => continue,
                (Target::Coordinator(coordinator), _) => {
                    tracing::warn!(%region, "no gateway of the region answers; relaying through the coordinator");
                    let client = CoordinatorRelayClient::clone(coordinator);
                    attempt(&request, timeout, |call| async move {
                        let mut client = client;
                        client.forward_batch(call).await
                    })
                    .await
                }
            };
            match answer {
                Ok(results) if results.len() == expected => return Ok(results),
                Ok(results) => {
                    return Err(GatewayError::InvalidAnswer {
                        address: target.to_string(),
                        problem: format!("{} results for {expected} messages", results.len()),
                    });
                }
                Err(status) if gets_no_answer(&status) => {
                    tracing::warn!(%region, to = %target, error = %status.message(), "relay got no answer, trying the next");
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
        Err(GatewayError::RegionUnreachable {
            region: region.to_string(),
            source: last_failure,
        })
    }
}

/// Where one attempt of a batch goes.
#[derive(Debug, PartialEq, Eq)]
enum Target<C> {
    Gateway(String),
    Coordinator(C),
}

/// The targets of a batch's attempts, in order: a gateway of each tier
/// (picked by the balancer, each once) until the tier has none left; when
/// every gateway was left out as ejected, one of the first tier anyway;
/// then the coordinator.
struct Targets<'a, C> {
    tiers: &'a [Vec<String>],
    tier: usize,
    tried: Vec<String>,
    coordinator: Option<C>,
}

impl<'a, C> Targets<'a, C> {
    fn new(tiers: &'a [Vec<String>], coordinator: Option<C>) -> Self {
        Targets {
            tiers,
            tier: 0,
            tried: Vec::new(),
            coordinator,
        }
    }

    fn next(&mut self, balancer: &Balancer) -> Option<Target<C>> {
        while let Some(tier) = self.tiers.get(self.tier) {
            if let Some(address) = balancer.pick(tier, &self.tried, false) {
                self.tried.push(address.clone());
                return Some(Target::Gateway(address));
            }
            self.tier += 1;
        }
        if self.tried.is_empty()
            && let Some(address) = self
                .tiers
                .first()
                .and_then(|tier| balancer.pick(tier, &[], true))
        {
            self.tried.push(address.clone());
            return Some(Target::Gateway(address));
        }
        self.coordinator.take().map(Target::Coordinator)
    }
}

impl<C> std::fmt::Display for Target<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Gateway(address) => f.write_str(address),
            Target::Coordinator(_) => f.write_str("the coordinator"),
        }
    }
}

/// Whether every message's deadline passed (none has none).
fn all_passed(deadlines: &[Option<Instant>]) -> bool {
    let now = Instant::now();
    deadlines
        .iter()
        .all(|deadline| deadline.is_some_and(|deadline| deadline <= now))
}

/// Whether a call's failure means the peer gave no answer (it may be
/// down, slow or cut off; the work may or may not have been done), as
/// opposed to a refusal: only such failures are retried elsewhere.
fn gets_no_answer(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

/// One attempt of `request` by `forward_batch`, with `timeout` sent as
/// `grpc-timeout` and enforced here as well.
async fn attempt<Call>(
    request: &pb::ForwardBatchRequest,
    timeout: Duration,
    forward_batch: impl FnOnce(tonic::Request<pb::ForwardBatchRequest>) -> Call,
) -> Result<Vec<pb::ForwardResult>, tonic::Status>
where
    Call: Future<Output = Result<tonic::Response<pb::ForwardBatchResponse>, tonic::Status>>,
{
    let mut call = tonic::Request::new(request.clone());
    call.set_timeout(timeout);
    match tokio::time::timeout(timeout + TIMEOUT_GRACE, forward_batch(call)).await {
        Ok(answer) => Ok(answer?.into_inner().results),
        // As the peer would have ended it.
        Err(_) => Err(tonic::Status::from(GatewayError::DeadlineExceeded)),
    }
}

/// A message waiting for its batch.
struct Queued {
    request: pb::ForwardRequest,
    gateways: Vec<Vec<String>>,
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
        crate::telemetry::relaying_to(&region);
        let (sender, receiver) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(relay_loop(region, clients, receiver));
        RelayBatcher { sender }
    }

    /// Relays `request` to a gateway of `gateways` (tiers, in order of
    /// precedence) and returns its receipt. A
    /// message whose `deadline` passed before its batch was taken is not
    /// sent.
    pub(crate) async fn forward(
        &self,
        request: pb::ForwardRequest,
        gateways: Vec<Vec<String>>,
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
    let balancer = Arc::new(Balancer::default());
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
        let balancer = Arc::clone(&balancer);
        let region = region.clone();
        in_flight.spawn(async move {
            match clients
                .forward_batch(&region, &balancer, &gateways, messages, &deadlines)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(urls: &[&str]) -> Vec<String> {
        urls.iter().map(|url| url.to_string()).collect()
    }

    /// The targets of one batch, the coordinator named "coordinator".
    fn targets_of(balancer: &Balancer, tiers: &[Vec<String>]) -> Vec<String> {
        let mut targets = Targets::new(tiers, Some("coordinator"));
        std::iter::from_fn(|| targets.next(balancer))
            .map(|target| match target {
                Target::Gateway(address) => address,
                Target::Coordinator(name) => name.to_string(),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_batch_tries_every_tier_in_order_then_the_coordinator() {
        let balancer = Balancer::default();
        let tiers = [urls(&["a", "b"]), urls(&["c"])];
        let tried = targets_of(&balancer, &tiers);
        assert_eq!(tried.len(), 4);
        assert_eq!(
            {
                let mut first = tried[..2].to_vec();
                first.sort();
                first
            },
            urls(&["a", "b"])
        );
        assert_eq!(tried[2..], urls(&["c", "coordinator"]));
    }

    #[tokio::test]
    async fn when_every_gateway_is_ejected_one_is_tried_anyway_before_the_coordinator() {
        let balancer = Balancer::default();
        for address in ["a", "c"] {
            for _ in 0..balance::FAILURES_TO_EJECT {
                balancer.start(address).failed();
            }
        }
        let tiers = [urls(&["a"]), urls(&["c"])];
        assert_eq!(targets_of(&balancer, &tiers), urls(&["a", "coordinator"]));
        // With one gateway left, only it and the coordinator.
        let tiers = [urls(&["a", "b"]), urls(&["c"])];
        assert_eq!(targets_of(&balancer, &tiers), urls(&["b", "coordinator"]));
    }
}
