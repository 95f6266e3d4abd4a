//! Serving one Receive stream: admits it, claims the inbox on the shard,
//! then delivers pages of the inbox by the rules of [`StreamState`] while
//! acks are stored by a writer of their own. The gRPC handler only converts
//! between the wire and [`Inbound`] / [`Outbound`].
//!
//! A stream ends when the client goes, when a newer stream of the inbox
//! takes over (on this gateway or, through the shard, on another replica),
//! or when the gateway shuts down. Takeover and shutdown end it even while
//! it waits for a client that stopped reading. Every ack received before
//! the end is stored before the stream ends.

use std::sync::Arc;
use std::time::Duration;

use fedmesh_common::error::InvalidField;
use fedmesh_common::identity::Identity;
use tokio::sync::{Notify, mpsc};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::error::GatewayError;
use crate::inbox::InboxLease;
use crate::inbox::stream::{self, Ack, MAX_ACK_SEQUENCES, StreamState};
use crate::message::InboxMessage;
use crate::shared::{Shared, require_agency};
use crate::store::MessageStore;
use crate::trace_context::trace_id_of;

/// How often an idle stream looks for messages it was not woken for, and
/// checks with the shard that no newer stream of its inbox opened.
const FALLBACK_POLL: Duration = Duration::from_secs(5);

/// What the client sends after `open`, converted from the wire.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// An acknowledgement.
    Ack(Ack),
    /// Something other than an ack.
    Malformed(InvalidField),
    /// The client's side of the stream failed.
    Broken(String),
}

/// What the stream sends the client, before conversion to the wire. Nearly
/// every item is a delivery: boxing it would cost an allocation each.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Outbound {
    /// One message of the inbox.
    Delivery(InboxMessage),
    /// Nothing more to deliver for now.
    Idle {
        /// Deliveries not yet acknowledged.
        unacknowledged: u32,
    },
}

/// An admitted Receive stream, the inbox claimed, ready to deliver.
pub(crate) struct Receiver {
    lease: InboxLease,
    recipient_id: String,
    shard: String,
    window: u32,
    epoch: u64,
}

impl Receiver {
    /// Checks an `open` from `caller` and claims the inbox of `agency_id`;
    /// every refusal comes before anything is delivered.
    pub(crate) async fn open(
        shared: &Shared,
        caller: &Identity,
        agency_id: &str,
        requested_window: u32,
    ) -> Result<Receiver, GatewayError> {
        fedmesh_common::validate::agency_id("open.agency_id", agency_id)?;
        require_agency(caller, agency_id, "read the inbox of")?;
        let window = stream::window(requested_window, shared.config.default_window)?;
        let home = shared.require_homed_here(agency_id).await?;
        if home.moving {
            return Err(GatewayError::AgencyMoving {
                agency_id: agency_id.to_string(),
            });
        }
        let shard = shared.shard(&home.shard)?;
        let max = shared.config.max_streams_per_agency;
        let lease =
            shared
                .hub
                .admit(agency_id, max)
                .map_err(|refused| GatewayError::TooManyStreams {
                    agency_id: agency_id.to_string(),
                    open: refused.open,
                    max,
                })?;
        let epoch = shard
            .store
            .claim_inbox(agency_id)
            .await
            .map_err(|source| match source {
                // Frozen by a move this gateway's topology does not show yet.
                crate::error::StoreError::InboxMoved(_) => GatewayError::AgencyMoving {
                    agency_id: agency_id.to_string(),
                },
                source => GatewayError::shard_unavailable(
                    &home.shard,
                    "reconnect to read the inbox",
                    source,
                ),
            })?;
        lease.activate(epoch);
        tracing::debug!(agency_id, window, epoch, "inbox stream opened");
        Ok(Receiver {
            lease,
            recipient_id: agency_id.to_string(),
            shard: home.shard,
            window,
            epoch,
        })
    }

    /// Streams the inbox into `outbound` until the stream ends; an error
    /// says why it ended other than by the client going away.
    pub(crate) async fn run<S>(
        self,
        shared: &Shared,
        inbound: S,
        outbound: &mpsc::Sender<Outbound>,
    ) -> Result<(), GatewayError>
    where
        S: Stream<Item = Inbound> + Unpin,
    {
        let shard = shared.shard(&self.shard)?;
        // Acks are written by a task of their own, so that delivering goes
        // on while they commit; acks that queue up share transactions.
        let (acks, ack_queue) = mpsc::unbounded_channel();
        let acks_failed = CancellationToken::new();
        let ack_writer = tokio::spawn(write_acks(
            Arc::clone(&shard.store),
            self.recipient_id.clone(),
            ack_queue,
            Arc::clone(&shard.outbox_wake),
            acks_failed.clone(),
        ));
        let shard_name = self.shard.clone();
        let mut delivery = Delivery {
            shared,
            store: shard.store.as_ref(),
            receiver: self,
            outbound,
            acks: &acks,
            acks_failed: &acks_failed,
        };
        let outcome = match delivery.deliver(inbound).await {
            // A move froze the inbox (and so took the stream over): the
            // client reconnects once the move is done.
            Err(GatewayError::TakenOver(agency_id))
                if shared
                    .topology
                    .borrow()
                    .agencies
                    .get(&agency_id)
                    .is_none_or(|home| home.moving || home.shard != shard_name) =>
            {
                Err(GatewayError::AgencyMoving { agency_id })
            }
            outcome => outcome,
        };
        // Every ack received before the stream ended is stored before it ends.
        drop(acks);
        match ack_writer.await {
            Ok(Err(source)) => Err(GatewayError::shard_unavailable(
                &shard_name,
                "acknowledgements could not be stored; reconnect: what was not acknowledged is delivered again",
                source,
            )),
            _ => outcome,
        }
    }
}

/// One stream at work.
struct Delivery<'a> {
    shared: &'a Shared,
    store: &'a dyn MessageStore,
    receiver: Receiver,
    outbound: &'a mpsc::Sender<Outbound>,
    acks: &'a mpsc::UnboundedSender<Vec<u64>>,
    acks_failed: &'a CancellationToken,
}

impl Delivery<'_> {
    /// Hands `item` to the client, unless the stream must end first: a
    /// client that stopped reading does not keep a takeover or a shutdown
    /// waiting. Ok(false): the client has gone.
    async fn send(&self, item: Outbound) -> Result<bool, GatewayError> {
        tokio::select! {
            biased;
            () = self.receiver.lease.taken_over.cancelled() => {
                Err(GatewayError::TakenOver(self.receiver.recipient_id.clone()))
            }
            () = self.shared.shutdown.cancelled() => Err(shutting_down()),
            sent = self.outbound.send(item) => Ok(sent.is_ok()),
        }
    }

    fn store_failed(&self, source: crate::error::StoreError) -> GatewayError {
        GatewayError::shard_unavailable(
            &self.receiver.shard,
            "reconnect: what was not acknowledged is delivered again",
            source,
        )
    }

    async fn deliver<S>(&mut self, mut inbound: S) -> Result<(), GatewayError>
    where
        S: Stream<Item = Inbound> + Unpin,
    {
        let recipient_id = self.receiver.recipient_id.clone();
        let mut state =
            StreamState::new(self.receiver.window, self.shared.config.receive_page_bytes);
        loop {
            // Marking the wake-up seen before reading means a message stored
            // after the read wakes the wait below.
            self.receiver.lease.stored.borrow_and_update();
            if let Some(page) = state.next_page() {
                let batch = self
                    .store
                    .fetch_unacked(&recipient_id, page)
                    .await
                    .map_err(|source| self.store_failed(source))?;
                if !batch.is_empty() {
                    for entry in batch {
                        state.delivered(entry.sequence);
                        tracing::debug!(
                            region = %self.shared.region,
                            trace_id = %trace_id_of(&entry.message.traceparent),
                            message_id = %entry.message.message_id,
                            %recipient_id,
                            sequence = entry.sequence,
                            "delivering message"
                        );
                        if !self.send(Outbound::Delivery(entry)).await? {
                            return Ok(());
                        }
                    }
                    continue;
                }
            }
            if let Some(unacknowledged) = state.idle()
                && !self.send(Outbound::Idle { unacknowledged }).await?
            {
                return Ok(());
            }
            let lease = &mut self.receiver.lease;
            tokio::select! {
                () = self.shared.shutdown.cancelled() => return Err(shutting_down()),
                // The stream ends with the ack writer's error (see `run`).
                () = self.acks_failed.cancelled() => return Ok(()),
                () = lease.taken_over.cancelled() => {
                    return Err(GatewayError::TakenOver(recipient_id));
                }
                () = self.outbound.closed() => return Ok(()),
                // A wake-up or a takeover from another replica can be lost
                // (a notification that failed after its commit); looking
                // again now and then bounds the delay that causes.
                () = tokio::time::sleep(FALLBACK_POLL) => {
                    let newest = self
                        .store
                        .inbox_epoch(&recipient_id)
                        .await
                        .map_err(|source| self.store_failed(source))?;
                    if newest > self.receiver.epoch {
                        return Err(GatewayError::TakenOver(recipient_id));
                    }
                }
                changed = lease.stored.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                request = inbound.next() => {
                    let ack = match request {
                        None => return Ok(()),
                        Some(Inbound::Broken(error)) => {
                            tracing::debug!(%recipient_id, %error, "inbox stream broke");
                            return Ok(());
                        }
                        Some(Inbound::Malformed(invalid)) => return Err(invalid.into()),
                        Some(Inbound::Ack(ack)) => ack,
                    };
                    let sequences = state.ack(&ack)?;
                    if !sequences.is_empty() && self.acks.send(sequences).is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

fn shutting_down() -> GatewayError {
    GatewayError::ShuttingDown("reconnect to resume from the oldest unacknowledged message")
}

/// Stores acknowledgements as they come, until the stream drops its end;
/// on a failure it stops and says so through `failed`.
/// Queued acks share a transaction, up to [`MAX_ACK_SEQUENCES`] sequences
/// each, so that no transaction holds the shard's write lock for long.
async fn write_acks(
    store: Arc<dyn MessageStore>,
    recipient_id: String,
    mut queue: mpsc::UnboundedReceiver<Vec<u64>>,
    outbox_wake: Arc<Notify>,
    failed: CancellationToken,
) -> Result<(), crate::error::StoreError> {
    let mut queued = Vec::new();
    while queue.recv_many(&mut queued, 64).await > 0 {
        let sequences: Vec<u64> = queued.drain(..).flatten().collect();
        for chunk in sequences.chunks(MAX_ACK_SEQUENCES) {
            if let Err(error) = store.ack(&recipient_id, chunk).await {
                failed.cancel();
                return Err(error);
            }
        }
        outbox_wake.notify_one();
    }
    Ok(())
}
