//! Group commit: concurrent stores into one shard are gathered into batches,
//! each one transaction, and every caller is answered when its batch has
//! committed.
//!
//! The lanes run on a thread of their own ([`CommitThread`]).
//! A shard has one or more commit lanes; a message goes to the lane of its
//! recipient, so the batches of different lanes never contend for the same
//! inbox row, and one busy inbox still gets large batches. Within a lane,
//! while a batch commits, new messages queue and the next batch takes all
//! that queued (up to the maximum), so batches grow with load; an optional
//! linger lets a batch wait briefly for more. Per-sender order holds because
//! a sender's next message is sent only after the receipt of the previous
//! one, that is after its batch committed.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::commit_thread::CommitThread;
use crate::error::StoreError;
use crate::inbox::InboxHub;
use crate::message::{Message, Stored};
use crate::store::MessageStore;

type Reply = oneshot::Sender<Result<Stored, Arc<StoreError>>>;

/// How a shard's commits are batched.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batching {
    /// Most messages in one transaction.
    pub(crate) max_batch: usize,
    /// How long a batch that is not full waits for more messages.
    pub(crate) linger: Duration,
    /// How many lanes (batches committing at once) the shard has.
    pub(crate) lanes: usize,
}

/// Hands messages to a shard's commit lanes.
#[derive(Clone)]
pub(crate) struct Committer {
    lanes: Vec<mpsc::Sender<(Message, Reply)>>,
    hasher: std::collections::hash_map::RandomState,
}

/// The commit task could not take the message or failed to commit it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    /// The commit task has stopped (the gateway is shutting down).
    #[error("shard writer stopped")]
    Stopped,
    /// The transaction failed; nothing of the batch was stored.
    #[error(transparent)]
    Store(Arc<StoreError>),
}

impl Committer {
    /// Starts the commit lanes of one shard. They end when every
    /// [`Committer`] clone is dropped, after committing what was queued.
    pub(crate) fn spawn(
        store: Arc<dyn MessageStore>,
        batching: Batching,
        hub: Arc<InboxHub>,
        outbox_wake: Arc<Notify>,
        thread: &CommitThread,
    ) -> Committer {
        let max_batch = batching.max_batch.max(1);
        let lanes = (0..batching.lanes.max(1))
            .map(|_| {
                let (sender, receiver) = mpsc::channel(max_batch * 4);
                thread.spawn(commit_loop(
                    Arc::clone(&store),
                    receiver,
                    max_batch,
                    batching.linger,
                    Arc::clone(&hub),
                    Arc::clone(&outbox_wake),
                ));
                sender
            })
            .collect();
        Committer {
            lanes,
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Stores `message` and answers once its batch has committed.
    pub(crate) async fn store(&self, message: Message) -> Result<Stored, CommitError> {
        let hash = self.hasher.hash_one(&message.recipient_id);
        let lane = usize::try_from(hash % self.lanes.len() as u64).unwrap_or(0);
        let (reply, answer) = oneshot::channel();
        self.lanes[lane]
            .send((message, reply))
            .await
            .map_err(|_| CommitError::Stopped)?;
        answer
            .await
            .map_err(|_| CommitError::Stopped)?
            .map_err(CommitError::Store)
    }
}

/// Takes the next batch: waits for a first message, then for up to `linger`
/// for more. Returns false once every sender is gone and nothing is queued.
async fn next_batch(
    receiver: &mut mpsc::Receiver<(Message, Reply)>,
    queued: &mut Vec<(Message, Reply)>,
    max_batch: usize,
    linger: Duration,
) -> bool {
    if receiver.recv_many(queued, max_batch).await == 0 {
        return false;
    }
    if !linger.is_zero() && queued.len() < max_batch {
        let deadline = tokio::time::Instant::now() + linger;
        while queued.len() < max_batch {
            let more = max_batch - queued.len();
            match tokio::time::timeout_at(deadline, receiver.recv_many(queued, more)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    true
}

async fn commit_loop(
    store: Arc<dyn MessageStore>,
    mut receiver: mpsc::Receiver<(Message, Reply)>,
    max_batch: usize,
    linger: Duration,
    hub: Arc<InboxHub>,
    outbox_wake: Arc<Notify>,
) {
    let mut queued = Vec::with_capacity(max_batch);
    while next_batch(&mut receiver, &mut queued, max_batch, linger).await {
        let (messages, replies): (Vec<Message>, Vec<Reply>) = queued.drain(..).unzip();
        let started = Instant::now();
        let outcome = store.insert_batch(&messages).await;
        tracing::debug!(n_messages = messages.len(), elapsed = ?started.elapsed(), "batch committed");
        match outcome {
            Ok(stored) => {
                for (message, stored) in messages.iter().zip(&stored) {
                    if !stored.duplicate {
                        hub.stored(&message.recipient_id, stored.sequence);
                    }
                }
                outbox_wake.notify_one();
                for (reply, stored) in replies.into_iter().zip(stored) {
                    // The caller may have gone; the message is stored anyway.
                    let _ = reply.send(Ok(stored));
                }
            }
            Err(error) => {
                tracing::error!(%error, n_messages = messages.len(), "batch commit failed");
                let error = Arc::new(error);
                for reply in replies {
                    let _ = reply.send(Err(Arc::clone(&error)));
                }
            }
        }
    }
}
