//! TRANSPORT (outbound): relaying messages to the gateways of other regions.
//!
//! Messages for one region are gathered into `ForwardBatch` calls, the way
//! the committer gathers stores into transactions: while some batches are
//! on their way, new messages queue and the next batch takes them all. Each
//! sender still gets its own receipt or status. Per-sender order holds
//! because a sender's next message is relayed only after the receipt of the
//! previous one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_common::identity::AttachIdentity;
use fedmesh_proto::pb;
use tokio::sync::{mpsc, oneshot};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::GatewayError;

type RelayClient = pb::relay_client::RelayClient<InterceptedService<Channel, AttachIdentity>>;
type Reply = oneshot::Sender<Result<pb::Receipt, tonic::Status>>;

/// Most messages in one relayed batch.
const MAX_BATCH: usize = 256;
/// Batches on their way to one region at once.
const MAX_IN_FLIGHT: usize = 4;

/// One lazily opened client per gateway address.
pub(crate) struct RelayClients {
    identity: AttachIdentity,
    clients: Mutex<HashMap<String, RelayClient>>,
}

impl RelayClients {
    /// Clients that present `identity`.
    pub(crate) fn new(identity: AttachIdentity) -> Self {
        RelayClients {
            identity,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, address: &str) -> Result<RelayClient, GatewayError> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(client) = clients.get(address) {
            return Ok(client.clone());
        }
        let channel = fedmesh_common::server::lazy_channel(address).map_err(|error| {
            GatewayError::Unavailable(format!("gateway address {address:?} is unusable: {error}"))
        })?;
        let client =
            pb::relay_client::RelayClient::with_interceptor(channel, self.identity.clone())
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(usize::MAX);
        clients.insert(address.to_string(), client.clone());
        Ok(client)
    }

    /// Sends `messages` to the first of `gateways` that answers.
    async fn forward_batch(
        &self,
        region: &str,
        gateways: &[String],
        messages: Vec<pb::ForwardRequest>,
        timeout: Duration,
    ) -> Result<Vec<pb::ForwardResult>, tonic::Status> {
        let expected = messages.len();
        let request = pb::ForwardBatchRequest { messages };
        let mut last_failure = format!("no gateway of region {region} is known");
        for address in gateways {
            let mut call = tonic::Request::new(request.clone());
            call.set_timeout(timeout);
            let mut client = self.client(address)?;
            match client.forward_batch(call).await {
                Ok(response) => {
                    let results = response.into_inner().results;
                    if results.len() != expected {
                        return Err(tonic::Status::internal(format!(
                            "gateway {address} answered {} results for {expected} messages",
                            results.len()
                        )));
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
                    last_failure = format!("{address}: {}", status.message());
                }
                Err(status) => return Err(status),
            }
        }
        Err(GatewayError::Unavailable(format!(
            "region {region} cannot be reached ({last_failure}); retry with the same idempotency key (a retry is never stored twice)"
        ))
        .into())
    }
}

/// The queue of messages relayed to one region.
#[derive(Clone)]
pub(crate) struct RelayBatcher {
    sender: mpsc::Sender<(pb::ForwardRequest, Vec<String>, Reply)>,
}

impl RelayBatcher {
    /// Starts relaying to `region`; the task ends when the last clone of
    /// the batcher is dropped, after sending what was queued.
    pub(crate) fn spawn(region: String, clients: Arc<RelayClients>, timeout: Duration) -> Self {
        let (sender, receiver) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(relay_loop(region, clients, timeout, receiver));
        RelayBatcher { sender }
    }

    /// Relays `request` to one of `gateways` and returns its receipt.
    pub(crate) async fn forward(
        &self,
        request: pb::ForwardRequest,
        gateways: Vec<String>,
    ) -> Result<pb::Receipt, tonic::Status> {
        let (reply, answer) = oneshot::channel();
        let stopped =
            || tonic::Status::unavailable("gateway shutting down; retry on another gateway");
        self.sender
            .send((request, gateways, reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn relay_loop(
    region: String,
    clients: Arc<RelayClients>,
    timeout: Duration,
    mut receiver: mpsc::Receiver<(pb::ForwardRequest, Vec<String>, Reply)>,
) {
    let mut queued = Vec::with_capacity(MAX_BATCH);
    let mut in_flight = tokio::task::JoinSet::new();
    while receiver.recv_many(&mut queued, MAX_BATCH).await > 0 {
        // The newest message carries the newest view of the region's gateways.
        let gateways = queued
            .last()
            .map(|(_, gateways, _)| gateways.clone())
            .unwrap_or_default();
        let mut messages = Vec::with_capacity(queued.len());
        let mut replies = Vec::with_capacity(queued.len());
        for (message, _, reply) in queued.drain(..) {
            messages.push(message);
            replies.push(reply);
        }
        while in_flight.len() >= MAX_IN_FLIGHT {
            in_flight.join_next().await;
        }
        let clients = Arc::clone(&clients);
        let region = region.clone();
        in_flight.spawn(async move {
            match clients
                .forward_batch(&region, &gateways, messages, timeout)
                .await
            {
                Ok(results) => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let outcome = match result.result {
                            Some(pb::forward_result::Result::Receipt(receipt)) => Ok(receipt),
                            Some(pb::forward_result::Result::Error(error)) => Err(
                                tonic::Status::new(Code::from_i32(error.code), error.message),
                            ),
                            None => Err(tonic::Status::internal("relayed message got no result")),
                        };
                        let _ = reply.send(outcome);
                    }
                }
                Err(status) => {
                    for reply in replies {
                        let _ = reply.send(Err(status.clone()));
                    }
                }
            }
        });
    }
    while in_flight.join_next().await.is_some() {}
}
