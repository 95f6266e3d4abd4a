//! Group commit: concurrent stores into one shard are gathered into batches,
//! each one transaction, and every caller is answered when its batch has
//! committed.
//!
//! While a batch commits, new messages queue; the next batch takes all that
//! queued (up to the configured maximum), so batches grow with load and a
//! lone message is never delayed.

use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};

use crate::error::StoreError;
use crate::inbox::InboxHub;
use crate::message::{Message, Stored};
use crate::store::MessageStore;

type Reply = oneshot::Sender<Result<Stored, Arc<StoreError>>>;

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
        max_batch: usize,
        hub: Arc<InboxHub>,
        outbox_wake: Arc<Notify>,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Committer {
        let (sender, receiver) = mpsc::channel(max_batch.max(1) * 4);
        tasks.spawn(commit_loop(
            store,
            receiver,
            max_batch.max(1),
            hub,
            outbox_wake,
        ));
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

async fn commit_loop(
    store: Arc<dyn MessageStore>,
    mut receiver: mpsc::Receiver<(Message, Reply)>,
    max_batch: usize,
    hub: Arc<InboxHub>,
    outbox_wake: Arc<Notify>,
) {
    let mut queued = Vec::with_capacity(max_batch);
    while receiver.recv_many(&mut queued, max_batch).await > 0 {
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
