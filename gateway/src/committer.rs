//! Group commit: concurrent writes to one shard are gathered into batches,
//! each one transaction, and every caller is answered when its batch has
//! committed.
//!
//! The lanes run on a thread of their own ([`CommitThread`]). A shard has
//! one or more commit lanes for messages; a message goes to the lane of its
//! recipient, so the batches of different lanes never contend for the same
//! inbox row, and one busy inbox still gets large batches. Claims of
//! idempotency keys for messages stored elsewhere have lanes of their own.
//! Within a lane, while a batch commits, new writes queue and the next
//! batch takes all that queued (up to the maximum), so batches grow with
//! load; an optional linger lets a batch wait briefly for more. Per-sender
//! order holds because a sender's next message is sent only after the
//! receipt of the previous one, that is after its batch committed.
//!
//! A write whose caller has gone (cancelled, or past its deadline, which
//! tonic enforces by dropping the call) or whose deadline has passed when
//! its batch is taken is not committed; the latter is answered with
//! [`CommitError::DeadlineExceeded`].

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmesh_common::events::BoxFuture;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::commit_thread::CommitThread;
use crate::error::StoreError;
use crate::inbox::InboxHub;
use crate::message::{Claimed, KeyClaim, Outcome, ToStore};
use crate::store::{MessageStore, SpoolPair};

/// How a shard's commits are batched.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batching {
    /// Most writes in one transaction.
    pub(crate) max_batch: usize,
    /// How long a batch that is not full waits for more writes.
    pub(crate) linger: Duration,
    /// How many lanes (batches committing at once) the shard has.
    pub(crate) lanes: usize,
}

/// The commit task could not take the write or failed to commit it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    /// The commit task has stopped (the gateway is shutting down).
    #[error("shard writer stopped")]
    Stopped,
    /// The caller's deadline passed before the batch was taken: nothing
    /// was committed.
    #[error("the deadline passed before the write was committed")]
    DeadlineExceeded,
    /// The transaction failed; nothing of the batch was stored.
    #[error(transparent)]
    Store(Arc<StoreError>),
}

/// One kind of write a lane commits in batches.
trait Batch: Send + Sync + 'static {
    /// What the batches are, in metrics.
    const KIND: &'static str;
    /// One write.
    type Request: Send + 'static;
    /// Its result.
    type Response: Send + 'static;

    /// Commits `requests` in one transaction: one response each, in order.
    fn commit<'a>(
        &'a self,
        requests: &'a [Self::Request],
    ) -> BoxFuture<'a, Result<Vec<Self::Response>, StoreError>>;
}

/// Stores messages, then wakes their inboxes' streams and the outbox relay.
struct StoreMessages {
    store: Arc<dyn MessageStore>,
    hub: Arc<InboxHub>,
    outbox_wake: Arc<Notify>,
}

impl Batch for StoreMessages {
    const KIND: &'static str = "messages";
    type Request = ToStore;
    type Response = Outcome;

    fn commit<'a>(
        &'a self,
        batch: &'a [ToStore],
    ) -> BoxFuture<'a, Result<Vec<Outcome>, StoreError>> {
        Box::pin(async move {
            let outcomes = self.store.insert_batch(batch).await?;
            for (item, outcome) in batch.iter().zip(&outcomes) {
                if let Ok(stored) = outcome
                    && !stored.duplicate
                {
                    self.hub.stored(&item.message.recipient_id, stored.sequence);
                }
            }
            self.outbox_wake.notify_one();
            Ok(outcomes)
        })
    }
}

/// Claims idempotency keys.
struct ClaimKeys {
    store: Arc<dyn MessageStore>,
}

impl Batch for ClaimKeys {
    const KIND: &'static str = "key_claims";
    type Request = KeyClaim;
    type Response = Claimed;

    fn commit<'a>(
        &'a self,
        claims: &'a [KeyClaim],
    ) -> BoxFuture<'a, Result<Vec<Claimed>, StoreError>> {
        Box::pin(self.store.claim_keys(claims))
    }
}

/// Asks the spool whether senders' messages wait there for their
/// recipients: read, not written, but batched the same way, one query for
/// the pairs of many sends.
struct CheckSpool {
    spool: Arc<dyn crate::store::SpoolStore>,
}

impl Batch for CheckSpool {
    const KIND: &'static str = "spool_checks";
    type Request = SpoolPair;
    type Response = bool;

    fn commit<'a>(
        &'a self,
        pairs: &'a [SpoolPair],
    ) -> BoxFuture<'a, Result<Vec<bool>, StoreError>> {
        Box::pin(self.spool.holds(pairs))
    }
}

type Reply<Response> = oneshot::Sender<Result<Response, CommitError>>;

/// A write waiting for its batch.
struct Queued<Request, Response> {
    request: Request,
    deadline: Option<tokio::time::Instant>,
    reply: Reply<Response>,
}

/// The lanes of one kind of write.
struct Lanes<Request, Response> {
    lanes: Vec<mpsc::Sender<Queued<Request, Response>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl<Request: Send + 'static, Response: Send + 'static> Lanes<Request, Response> {
    fn spawn<B>(batch: Arc<B>, batching: Batching, thread: &CommitThread, shard: &Arc<str>) -> Self
    where
        B: Batch<Request = Request, Response = Response>,
    {
        let max_batch = batching.max_batch.max(1);
        let lanes = (0..batching.lanes.max(1))
            .map(|_| {
                let (sender, receiver) = mpsc::channel(max_batch * 4);
                thread.spawn(commit_loop(
                    Arc::clone(&batch),
                    receiver,
                    max_batch,
                    batching.linger,
                    Arc::clone(shard),
                ));
                sender
            })
            .collect();
        Lanes {
            lanes,
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The lane of `lane_key`.
    fn lane_of(&self, lane_key: &str) -> usize {
        let hash = self.hasher.hash_one(lane_key);
        usize::try_from(hash % self.lanes.len() as u64).unwrap_or(0)
    }

    /// Commits `request` in `lane`; answers once its batch has committed.
    async fn submit(
        &self,
        lane: usize,
        request: Request,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Response, CommitError> {
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            request,
            deadline,
            reply,
        };
        self.lanes[lane]
            .send(queued)
            .await
            .map_err(|_| CommitError::Stopped)?;
        answer.await.map_err(|_| CommitError::Stopped)?
    }
}

/// Hands writes to a shard's commit lanes.
#[derive(Clone)]
pub(crate) struct Committer {
    messages: Arc<Lanes<ToStore, Outcome>>,
    claims: Arc<Lanes<KeyClaim, Claimed>>,
    spool_checks: Arc<Lanes<SpoolPair, bool>>,
}

impl Committer {
    /// Starts the commit lanes of one shard. They end when every
    /// [`Committer`] clone is dropped, after committing what was queued.
    pub(crate) fn spawn(
        shard: &str,
        store: Arc<dyn MessageStore>,
        batching: Batching,
        hub: Arc<InboxHub>,
        outbox_wake: Arc<Notify>,
        thread: &CommitThread,
    ) -> Committer {
        let shard: Arc<str> = Arc::from(shard);
        let messages = StoreMessages {
            store: Arc::clone(&store),
            hub,
            outbox_wake,
        };
        let claims = ClaimKeys {
            store: Arc::clone(&store),
        };
        let spool_checks = CheckSpool {
            spool: store.spool(),
        };
        Committer {
            messages: Arc::new(Lanes::spawn(Arc::new(messages), batching, thread, &shard)),
            claims: Arc::new(Lanes::spawn(Arc::new(claims), batching, thread, &shard)),
            spool_checks: Arc::new(Lanes::spawn(
                Arc::new(spool_checks),
                batching,
                thread,
                &shard,
            )),
        }
    }

    /// Stores `item` and answers once its batch has committed.
    pub(crate) async fn store(
        &self,
        item: ToStore,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Outcome, CommitError> {
        let lane = self.messages.lane_of(&item.message.recipient_id);
        self.messages.submit(lane, item, deadline).await
    }

    /// Claims a key and answers once its batch has committed.
    pub(crate) async fn claim(
        &self,
        claim: KeyClaim,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Claimed, CommitError> {
        let lane = self.claims.lane_of(&claim.sender_id);
        self.claims.submit(lane, claim, deadline).await
    }

    /// Whether messages of `pair`'s sender for its recipient wait in the
    /// spool, asked with the other sends' pairs of the moment.
    pub(crate) async fn spool_holds(
        &self,
        pair: SpoolPair,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<bool, CommitError> {
        let lane = self.spool_checks.lane_of(&pair.sender_id);
        self.spool_checks.submit(lane, pair, deadline).await
    }
}

/// Takes the next batch: waits for a first write, then for up to `linger`
/// for more. Returns false once every sender is gone and nothing is queued.
async fn next_batch<Request, Response>(
    receiver: &mut mpsc::Receiver<Queued<Request, Response>>,
    queued: &mut Vec<Queued<Request, Response>>,
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

/// Whether a write taken into a batch is still wanted: its caller is still
/// waiting and its deadline has not passed (then it is told so).
fn still_wanted<Request, Response>(
    queued: Queued<Request, Response>,
) -> Option<(Request, Reply<Response>)> {
    if queued.reply.is_closed() {
        return None;
    }
    if queued
        .deadline
        .is_some_and(|deadline| deadline <= tokio::time::Instant::now())
    {
        let _ = queued.reply.send(Err(CommitError::DeadlineExceeded));
        return None;
    }
    Some((queued.request, queued.reply))
}

async fn commit_loop<B: Batch>(
    batch: Arc<B>,
    mut receiver: mpsc::Receiver<Queued<B::Request, B::Response>>,
    max_batch: usize,
    linger: Duration,
    shard: Arc<str>,
) {
    let mut queued = Vec::with_capacity(max_batch);
    while next_batch(&mut receiver, &mut queued, max_batch, linger).await {
        let (requests, replies): (Vec<B::Request>, Vec<Reply<B::Response>>) =
            queued.drain(..).filter_map(still_wanted).unzip();
        if requests.is_empty() {
            continue;
        }
        let started = Instant::now();
        let outcome = batch.commit(&requests).await;
        let elapsed = started.elapsed();
        tracing::debug!(n_writes = requests.len(), ?elapsed, "batch committed");
        crate::telemetry::committed(&shard, B::KIND, requests.len(), elapsed.as_secs_f64());
        match outcome {
            Ok(responses) => {
                for (reply, response) in replies.into_iter().zip(responses) {
                    // The caller may have gone; the write is committed anyway.
                    let _ = reply.send(Ok(response));
                }
            }
            Err(error) => {
                tracing::error!(%error, n_writes = requests.len(), "batch commit failed");
                let error = Arc::new(error);
                for reply in replies {
                    let _ = reply.send(Err(CommitError::Store(Arc::clone(&error))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::message::Message;

    /// A real store whose next batch waits at the door until let in.
    struct Gated {
        store: crate::store::SqliteMessageStore,
        entered: Notify,
        open: Notify,
    }

    impl Batch for Gated {
        const KIND: &'static str = "gated";
        type Request = ToStore;
        type Response = Outcome;

        fn commit<'a>(
            &'a self,
            batch: &'a [ToStore],
        ) -> BoxFuture<'a, Result<Vec<Outcome>, StoreError>> {
            Box::pin(async move {
                self.entered.notify_one();
                self.open.notified().await;
                self.store.insert_batch(batch).await
            })
        }
    }

    fn item(message_id: &str) -> ToStore {
        ToStore {
            message: Message {
                message_id: message_id.into(),
                sender_id: "sender".into(),
                recipient_id: "reader".into(),
                kind: "note".into(),
                payload: bytes::Bytes::new(),
                headers: BTreeMap::new(),
                idempotency_key: None,
                origin_region: "east".into(),
                accepted_at_micros: 1,
                traceparent: String::new(),
            },
            claim: None,
            may_exist: false,
        }
    }

    #[tokio::test]
    async fn writes_whose_deadline_passed_or_caller_left_before_their_batch_are_not_committed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("shard.sqlite").display());
        let store = crate::store::SqliteMessageStore::open(&url, "east")
            .await
            .expect("open");
        let gated = Arc::new(Gated {
            store: store.clone(),
            entered: Notify::new(),
            open: Notify::new(),
        });
        let thread = CommitThread::start().expect("thread");
        let batching = Batching {
            max_batch: 16,
            linger: Duration::ZERO,
            lanes: 1,
        };
        let lanes = Arc::new(Lanes::spawn(
            Arc::clone(&gated),
            batching,
            &thread,
            &Arc::from("east-1"),
        ));

        // The first write is taken and held inside its commit.
        let first = {
            let lanes = Arc::clone(&lanes);
            tokio::spawn(async move { lanes.submit(0, item("first"), None).await })
        };
        gated.entered.notified().await;
        // Meanwhile one write's deadline passes, another's caller leaves.
        let expired = {
            let lanes = Arc::clone(&lanes);
            // Passed by the time its batch is taken.
            let deadline = tokio::time::Instant::now();
            tokio::spawn(async move { lanes.submit(0, item("late"), Some(deadline)).await })
        };
        let abandoned = {
            let lanes = Arc::clone(&lanes);
            tokio::spawn(async move { lanes.submit(0, item("gone"), None).await })
        };
        let kept = {
            let lanes = Arc::clone(&lanes);
            tokio::spawn(async move { lanes.submit(0, item("kept"), None).await })
        };
        while lanes.lanes[0].capacity() > lanes.lanes[0].max_capacity() - 3 {
            tokio::task::yield_now().await;
        }
        abandoned.abort();
        let _ = abandoned.await;

        gated.open.notify_one();
        assert!(first.await.expect("task").expect("committed").is_ok());
        // The next batch holds the three others; let it through too.
        gated.entered.notified().await;
        gated.open.notify_one();
        assert!(matches!(
            expired.await.expect("task"),
            Err(CommitError::DeadlineExceeded)
        ));
        assert!(kept.await.expect("task").expect("committed").is_ok());

        let page = crate::inbox::stream::Page {
            after_sequence: 0,
            limit: 10,
            max_bytes: u64::MAX,
        };
        let stored: Vec<String> = store
            .fetch_unacked("reader", page)
            .await
            .expect("fetch")
            .into_iter()
            .map(|entry| entry.message.message_id)
            .collect();
        assert_eq!(stored, vec!["first", "kept"]);
        drop(lanes);
        thread.finished().await;
    }
}
