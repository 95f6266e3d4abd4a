//! Group commit: concurrent stores into one shard are gathered into batches,
//! each one transaction, and every caller is answered when its batch has
//! committed.
//!
//! While a batch commits, new messages queue; the next batch takes all that
//! queued (up to the configured maximum), so batches grow with load. An
//! optional linger lets a batch wait briefly for more. Several batches of
//! one shard may commit at once (`concurrency`): per-sender order still
//! holds, because a sender's next message is sent only after the receipt of
//! the previous one, that is after its batch committed.

use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};

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
    pub(crate) linger: std::time::Duration,
    /// How many batches may commit at once.
    pub(crate) concurrency: usize,
}

/// Hands messages to a shard's commit task.
#[derive(Clone)]
pub(crate) struct Committer {
    sender: mpsc::Sender<(Message, Reply)>,
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
    /// Starts the commit task of one shard. It ends when every [`Committer`]
    /// clone is dropped, after committing what was queued.
    pub(crate) fn spawn(
        store: Arc<dyn MessageStore>,
        batching: Batching,
        hub: Arc<InboxHub>,
        outbox_wake: Arc<Notify>,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Committer {
        let max_batch = batching.max_batch.max(1);
        let (sender, receiver) = mpsc::channel(max_batch * 4);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        for _ in 0..batching.concurrency.max(1) {
            tasks.spawn(commit_loop(
                Arc::clone(&store),
                Arc::clone(&receiver),
                max_batch,
                batching.linger,
                Arc::clone(&hub),
                Arc::clone(&outbox_wake),
            ));
        }
        Committer { sender }
    }

    /// Stores `message` and answers once its batch has committed.
    pub(crate) async fn store(&self, message: Message) -> Result<Stored, CommitError> {
        let (reply, answer) = oneshot::channel();
        self.sender
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
    receiver: &tokio::sync::Mutex<mpsc::Receiver<(Message, Reply)>>,
    queued: &mut Vec<(Message, Reply)>,
    max_batch: usize,
    linger: std::time::Duration,
) -> bool {
    let mut receiver = receiver.lock().await;
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
    receiver: Arc<tokio::sync::Mutex<mpsc::Receiver<(Message, Reply)>>>,
    max_batch: usize,
    linger: std::time::Duration,
    hub: Arc<InboxHub>,
    outbox_wake: Arc<Notify>,
) {
    let mut queued = Vec::with_capacity(max_batch);
    while next_batch(&receiver, &mut queued, max_batch, linger).await {
        let (messages, replies): (Vec<Message>, Vec<Reply>) = queued.drain(..).unzip();
        match store.insert_batch(&messages).await {
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
