//! `fedmesh.v1.Exchange`: Send and the Receive stream.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use fedmesh_common::error::InvalidField;
use fedmesh_common::identity::{Identity, caller};
use fedmesh_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use crate::Shared;
use crate::error::GatewayError;
use crate::routing::{Route, route};

/// How often an idle stream looks for messages it was not woken for.
const FALLBACK_POLL: std::time::Duration = std::time::Duration::from_secs(5);

/// Most deliveries a client may leave unacknowledged on one stream.
const MAX_WINDOW: u32 = 10_000;

/// The Exchange service of one gateway.
pub(crate) struct ExchangeService {
    pub(crate) shared: Arc<Shared>,
}

type ReceiveStream = Pin<Box<dyn Stream<Item = Result<pb::ReceiveResponse, Status>> + Send>>;

fn require_agency(identity: &Identity, agency_id: &str, action: &str) -> Result<(), GatewayError> {
    if identity.is_agency(agency_id) {
        Ok(())
    } else {
        Err(GatewayError::PermissionDenied(format!(
            "{identity} may not {action} agency {agency_id:?}; an agency acts only as itself"
        )))
    }
}

#[tonic::async_trait]
impl pb::exchange_server::Exchange for ExchangeService {
    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let identity = caller(&request)?;
        let shared = &self.shared;
        let message = convert::message_from_send(request.into_inner(), &shared.config.region)
            .map_err(GatewayError::from)?;
        require_agency(&identity, &message.sender_id, "send as")?;
        shared.check_payload(message.payload.len())?;
        let _in_flight = shared.in_flight();
        shared.require_homed_here(&message.sender_id).await?;
        let home = shared.home_of(&message.recipient_id).await?;
        let route = route(
            &shared.topology.borrow(),
            &shared.config.region,
            &home,
            shared.spread(),
        );
        let receipt = match route {
            Route::Local { shard } => {
                convert::receipt_to_pb(shared.store_local(&shard, message).await?)
            }
            Route::Relay { region, gateways } => {
                shared
                    .upstream
                    .forward(&region, &gateways, convert::forward_request(message))
                    .await?
            }
        };
        Ok(Response::new(pb::SendResponse {
            receipt: Some(receipt),
        }))
    }

    type ReceiveStream = ReceiveStream;

    async fn receive(
        &self,
        request: Request<Streaming<pb::ReceiveRequest>>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        let identity = caller(&request)?;
        let mut inbound = request.into_inner();
        let open = match inbound.message().await? {
            Some(pb::ReceiveRequest {
                request: Some(pb::receive_request::Request::Open(open)),
            }) => open,
            _ => {
                return Err(GatewayError::from(InvalidField::new(
                    "open",
                    "the first request on a Receive stream must be `open`",
                ))
                .into());
            }
        };
        fedmesh_common::validate::agency_id("open.agency_id", &open.agency_id)
            .map_err(GatewayError::from)?;
        require_agency(&identity, &open.agency_id, "read the inbox of")?;
        let window = match open.window {
            0 => self.shared.config.default_window,
            window if window <= MAX_WINDOW => window,
            _ => {
                return Err(GatewayError::from(InvalidField::new(
                    "open.window",
                    format!("window must be 1 to {MAX_WINDOW} (0 means the gateway default)"),
                ))
                .into());
            }
        };
        let home = self.shared.require_homed_here(&open.agency_id).await?;
        // Fail now, not inside the stream, if the shard is not served here.
        self.shared.shard(&home.shard)?;
        let (sender, receiver) = mpsc::channel(64);
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let outcome = deliver(
                &shared,
                &open.agency_id,
                &home.shard,
                window,
                inbound,
                &sender,
            )
            .await;
            if let Err(status) = outcome {
                let _ = sender.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}

/// Streams one inbox until the client goes, a newer stream takes over or the
/// gateway shuts down.
async fn deliver(
    shared: &Shared,
    recipient_id: &str,
    shard: &str,
    window: u32,
    inbound: Streaming<pb::ReceiveRequest>,
    sender: &mpsc::Sender<Result<pb::ReceiveResponse, Status>>,
) -> Result<(), Status> {
    let shard_handle = shared.shard(shard)?;
    let store = Arc::clone(&shard_handle.store);
    // Acks are written by a task of their own, so that delivering goes on
    // while they commit; several acks that queue up share one transaction.
    let (acks, ack_queue) = mpsc::unbounded_channel();
    let acks_failed = CancellationToken::new();
    let ack_writer = tokio::spawn(write_acks(
        Arc::clone(&store),
        recipient_id.to_string(),
        ack_queue,
        Arc::clone(&shard_handle.outbox_wake),
        acks_failed.clone(),
    ));
    let outcome = stream_inbox(
        shared,
        recipient_id,
        window,
        inbound,
        sender,
        (shard, &store),
        &acks,
        &acks_failed,
    )
    .await;
    // Every ack received before the stream ended is stored before it ends.
    drop(acks);
    let _ = ack_writer.await;
    outcome
}

/// Stores acknowledgements as they come, until the stream drops its end.
async fn write_acks(
    store: Arc<dyn crate::store::MessageStore>,
    recipient_id: String,
    mut queue: mpsc::UnboundedReceiver<Vec<u64>>,
    outbox_wake: Arc<tokio::sync::Notify>,
    failed: CancellationToken,
) {
    let mut queued = Vec::new();
    while queue.recv_many(&mut queued, 256).await > 0 {
        let sequences: Vec<u64> = queued.drain(..).flatten().collect();
        if let Err(error) = store.ack(&recipient_id, &sequences).await {
            tracing::error!(%recipient_id, %error, "acknowledgements could not be stored");
            failed.cancel();
            return;
        }
        outbox_wake.notify_one();
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_inbox(
    shared: &Shared,
    recipient_id: &str,
    window: u32,
    mut inbound: Streaming<pb::ReceiveRequest>,
    sender: &mpsc::Sender<Result<pb::ReceiveResponse, Status>>,
    (shard, store): (&str, &Arc<dyn crate::store::MessageStore>),
    acks: &mpsc::UnboundedSender<Vec<u64>>,
    acks_failed: &CancellationToken,
) -> Result<(), Status> {
    let mut lease = shared.hub.open(recipient_id);
    let mut in_flight = BTreeSet::new();
    let mut last_sent = 0_u64;
    let mut idle_told = false;
    tracing::debug!(recipient_id, window, "inbox stream opened");
    loop {
        // Marking the wake-up seen before reading means a message stored
        // after the read wakes the wait below.
        lease.stored.borrow_and_update();
        let room = window.saturating_sub(u32::try_from(in_flight.len()).unwrap_or(u32::MAX));
        if room > 0 {
            let batch = store
                .fetch_unacked(recipient_id, last_sent, room)
                .await
                .map_err(|source| GatewayError::Store {
                    shard: shard.to_string(),
                    source,
                })?;
            if !batch.is_empty() {
                for entry in batch {
                    last_sent = entry.sequence;
                    in_flight.insert(entry.sequence);
                    let delivery = pb::ReceiveResponse {
                        response: Some(pb::receive_response::Response::Delivery(pb::Delivery {
                            sequence: entry.sequence,
                            message: Some(convert::message_to_pb(entry.message)),
                        })),
                    };
                    if sender.send(Ok(delivery)).await.is_err() {
                        return Ok(());
                    }
                }
                idle_told = false;
                continue;
            }
        }
        if !idle_told {
            let idle = pb::ReceiveResponse {
                response: Some(pb::receive_response::Response::Idle(pb::Idle {
                    unacknowledged: u32::try_from(in_flight.len()).unwrap_or(u32::MAX),
                })),
            };
            if sender.send(Ok(idle)).await.is_err() {
                return Ok(());
            }
            idle_told = true;
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => {
                return Err(GatewayError::Unavailable(
                    "gateway shutting down; reconnect to resume from the oldest unacknowledged message".into(),
                ).into());
            }
            () = acks_failed.cancelled() => {
                return Err(GatewayError::Unavailable(
                    "acknowledgements could not be stored; reconnect: what was not acknowledged is delivered again".into(),
                ).into());
            }
            () = lease.taken_over.cancelled() => {
                return Err(GatewayError::TakenOver(recipient_id.to_string()).into());
            }
            () = sender.closed() => return Ok(()),
            // A wake-up from another replica can be lost (a notification
            // that failed after its commit); looking again now and then
            // bounds the delay that causes.
            () = tokio::time::sleep(FALLBACK_POLL) => {}
            changed = lease.stored.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            request = inbound.next() => {
                let ack = match request {
                    None => return Ok(()),
                    Some(Err(status)) => {
                        tracing::debug!(recipient_id, error = %status.message(), "inbox stream broke");
                        return Ok(());
                    }
                    Some(Ok(pb::ReceiveRequest { request: Some(pb::receive_request::Request::Ack(ack)) })) => ack,
                    Some(Ok(_)) => {
                        return Err(GatewayError::from(InvalidField::new(
                            "ack",
                            "after `open`, only `ack` requests may be sent",
                        )).into());
                    }
                };
                // Only what this stream delivered can be acknowledged on it.
                let mut sequences: Vec<u64> = ack
                    .sequences
                    .iter()
                    .copied()
                    .filter(|sequence| in_flight.contains(sequence))
                    .collect();
                sequences.extend(in_flight.range(..=ack.up_to).copied().filter(|sequence| !ack.sequences.contains(sequence)));
                if sequences.is_empty() {
                    continue;
                }
                for sequence in &sequences {
                    in_flight.remove(sequence);
                }
                if acks.send(sequences).is_err() {
                    return Ok(());
                }
                idle_told = false;
            }
        }
    }
}
