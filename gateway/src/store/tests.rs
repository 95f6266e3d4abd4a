//! The message store suite: the same cases on every backend.

use std::collections::BTreeMap;

use fedmesh_common::events::{MESSAGE_ACCEPTED, MESSAGE_DELIVERED};

use super::*;

fn message(message_id: &str, recipient_id: &str, idempotency_key: Option<&str>) -> Message {
    Message {
        message_id: message_id.to_string(),
        sender_id: "sender".to_string(),
        recipient_id: recipient_id.to_string(),
        kind: "test.kind".to_string(),
        payload: message_id.as_bytes().to_vec(),
        headers: BTreeMap::from([("h".to_string(), "v".to_string())]),
        idempotency_key: idempotency_key.map(str::to_string),
        origin_region: "east".to_string(),
        accepted_at_micros: 7,
    }
}

/// Up to `limit` messages after `after_sequence`, whatever their size.
fn page(after_sequence: u64, limit: u32) -> Page {
    Page {
        after_sequence,
        limit,
        max_bytes: u64::MAX,
    }
}

async fn event_kinds(store: &dyn MessageStore) -> Vec<String> {
    let events = fedmesh_common::testing::drain_outbox(store.outbox().as_ref()).await;
    events.into_iter().map(|event| event.kind).collect()
}

macro_rules! message_store_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn sequences_are_dense_per_recipient() {
                let (store, _guard) = $open.await;
                let stored = store
                    .insert_batch(&[
                        message("m1", "alpha", None),
                        message("m2", "beta", None),
                        message("m3", "alpha", None),
                    ])
                    .await
                    .expect("insert");
                let sequences: Vec<u64> = stored.iter().map(|stored| stored.sequence).collect();
                assert_eq!(sequences, vec![1, 1, 2]);
                let inbox = store
                    .fetch_unacked("alpha", page(0, 10))
                    .await
                    .expect("fetch");
                assert_eq!(inbox.len(), 2);
                assert_eq!(inbox[1].message, message("m3", "alpha", None));
            }

            #[tokio::test]
            async fn retries_are_stored_once() {
                let (store, _guard) = $open.await;
                let first = store
                    .insert_batch(&[message("m1", "alpha", Some("key-1"))])
                    .await
                    .expect("insert");
                // Same id (a retried Forward), then same key with a new id
                // (a retried Send), one of them in the same batch as a twin.
                let again = store
                    .insert_batch(&[
                        message("m1", "alpha", None),
                        message("m9", "alpha", Some("key-1")),
                        message("m2", "alpha", Some("key-2")),
                        message("m3", "alpha", Some("key-2")),
                    ])
                    .await
                    .expect("insert again");
                assert!(!first[0].duplicate);
                assert!(again[0].duplicate && again[1].duplicate && again[3].duplicate);
                assert!(!again[2].duplicate);
                assert_eq!(again[1].message_id, "m1");
                assert_eq!(again[1].sequence, first[0].sequence);
                assert_eq!(again[3].message_id, "m2");
                assert_eq!(
                    store
                        .fetch_unacked("alpha", page(0, 10))
                        .await
                        .expect("fetch")
                        .len(),
                    2
                );
                assert_eq!(
                    event_kinds(&store).await,
                    vec![MESSAGE_ACCEPTED, MESSAGE_ACCEPTED]
                );
            }

            #[tokio::test]
            async fn a_repeated_local_id_is_still_stored_once() {
                let (store, _guard) = $open.await;
                let first = store
                    .insert_batch(&[message("m1", "alpha", None)])
                    .await
                    .expect("insert");
                let again = store
                    .insert_batch(&[message("m1", "alpha", None)])
                    .await
                    .expect("insert again");
                assert!(again[0].duplicate);
                assert_eq!(again[0].sequence, first[0].sequence);
                assert_eq!(
                    store
                        .fetch_unacked("alpha", page(0, 10))
                        .await
                        .expect("fetch")
                        .len(),
                    1
                );
            }

            #[tokio::test]
            async fn acked_messages_leave_the_inbox_once() {
                let (store, _guard) = $open.await;
                store
                    .insert_batch(&[message("m1", "alpha", None), message("m2", "alpha", None)])
                    .await
                    .expect("insert");
                assert_eq!(store.ack("alpha", &[1, 5]).await.expect("ack"), vec![1]);
                assert_eq!(
                    store.ack("alpha", &[1]).await.expect("ack again"),
                    Vec::<u64>::new()
                );
                let inbox = store
                    .fetch_unacked("alpha", page(0, 10))
                    .await
                    .expect("fetch");
                assert_eq!(
                    inbox.iter().map(|entry| entry.sequence).collect::<Vec<_>>(),
                    vec![2]
                );
                assert!(
                    store
                        .fetch_unacked("alpha", page(2, 10))
                        .await
                        .expect("fetch after")
                        .is_empty()
                );
                let kinds = event_kinds(&store).await;
                assert_eq!(
                    kinds
                        .iter()
                        .filter(|kind| *kind == MESSAGE_DELIVERED)
                        .count(),
                    1
                );
            }

            #[tokio::test]
            async fn pages_stop_at_their_byte_limit_but_hold_one_message() {
                let (store, _guard) = $open.await;
                let mut messages = Vec::new();
                for index in 0..5 {
                    let mut big = message(&format!("m{index}"), "alpha", None);
                    big.payload = vec![b'x'; 1000];
                    messages.push(big);
                }
                store.insert_batch(&messages).await.expect("insert");
                let bounded = |after_sequence, max_bytes| Page {
                    after_sequence,
                    limit: 10,
                    max_bytes,
                };
                let sequences = |page: Vec<InboxMessage>| -> Vec<u64> {
                    page.iter().map(|entry| entry.sequence).collect()
                };
                let two = store
                    .fetch_unacked("alpha", bounded(0, 2000))
                    .await
                    .expect("fetch");
                assert_eq!(
                    sequences(two),
                    vec![1, 2],
                    "2000 bytes hold two messages of 1000"
                );
                let partly = store
                    .fetch_unacked("alpha", bounded(0, 2500))
                    .await
                    .expect("fetch");
                assert_eq!(
                    sequences(partly),
                    vec![1, 2, 3],
                    "the page stops after the message that crosses the limit"
                );
                let one = store
                    .fetch_unacked("alpha", bounded(3, 1))
                    .await
                    .expect("fetch");
                assert_eq!(sequences(one), vec![4], "a page always holds one message");
            }

            #[tokio::test]
            async fn every_stream_claims_a_newer_epoch() {
                let (store, _guard) = $open.await;
                assert_eq!(store.inbox_epoch("alpha").await.expect("epoch"), 0);
                let first = store.claim_inbox("alpha").await.expect("claim");
                let second = store.claim_inbox("alpha").await.expect("claim");
                assert!(second > first);
                assert_eq!(store.inbox_epoch("alpha").await.expect("epoch"), second);
                assert_eq!(store.inbox_epoch("beta").await.expect("epoch"), 0);
            }

            #[tokio::test]
            async fn retention_purges_only_acknowledged_messages() {
                let (store, _guard) = $open.await;
                store
                    .insert_batch(&[
                        message("m1", "alpha", Some("k1")),
                        message("m2", "alpha", None),
                    ])
                    .await
                    .expect("insert");
                store.ack("alpha", &[1]).await.expect("ack");
                // A cutoff in the past keeps everything.
                assert_eq!(store.purge_acked(0, 100).await.expect("purge"), 0);
                assert_eq!(store.purge_acked(i64::MAX, 100).await.expect("purge"), 1);
                let inbox = store
                    .fetch_unacked("alpha", page(0, 10))
                    .await
                    .expect("fetch");
                assert_eq!(
                    inbox.iter().map(|entry| entry.sequence).collect::<Vec<_>>(),
                    vec![2]
                );
                // Sequences go on after a purge.
                let next = store
                    .insert_batch(&[message("m3", "alpha", None)])
                    .await
                    .expect("insert");
                assert_eq!(next[0].sequence, 3);
            }
        }
    };
}

async fn open_sqlite() -> (SqliteMessageStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("shard.sqlite").display());
    (
        SqliteMessageStore::open(&url, "east").await.expect("open"),
        dir,
    )
}

message_store_suite!(sqlite, open_sqlite());

async fn open_postgres() -> (PgMessageStore, fedmesh_common::testing::TestDatabase) {
    let database = fedmesh_common::testing::TestDatabase::create().await;
    let store = PgMessageStore::open(&database.url, "east", 4)
        .await
        .expect("open");
    (store, database)
}

message_store_suite!(postgres, open_postgres());

/// A publisher that holds its first batch until told to go on.
struct HeldPublisher {
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
    published: std::sync::Mutex<Vec<String>>,
}

impl fedmesh_common::events::EventPublisher for HeldPublisher {
    fn publish(
        &self,
        events: Vec<fedmesh_common::events::Event>,
    ) -> fedmesh_common::events::BoxFuture<'_, Result<(), fedmesh_common::events::BusError>> {
        Box::pin(async move {
            self.entered.notify_one();
            self.release.notified().await;
            let mut published = self
                .published
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            published.extend(events.into_iter().map(|event| event.event_id));
            Ok(())
        })
    }
}

#[tokio::test]
async fn two_relays_of_one_postgres_outbox_never_publish_the_same_rows() {
    let (store, _database) = open_postgres().await;
    store
        .insert_batch(&[message("m1", "alpha", None), message("m2", "beta", None)])
        .await
        .expect("insert");
    let outbox = store.outbox();
    let held = HeldPublisher {
        entered: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
        published: std::sync::Mutex::new(Vec::new()),
    };
    let first = outbox.relay_batch(100, &held);
    tokio::pin!(first);
    // Run the first relay until it is inside publish, holding the outbox.
    tokio::select! {
        () = held.entered.notified() => {}
        relayed = &mut first => panic!("the first relay finished early: {relayed:?}"),
    }
    // A second relay (another replica) finds the outbox taken.
    let collecting = fedmesh_common::testing::CollectingPublisher::default();
    let second = store
        .outbox()
        .relay_batch(100, &collecting)
        .await
        .expect("second relay");
    assert_eq!(second, 0);
    assert!(collecting.events().is_empty());

    held.release.notify_one();
    assert_eq!(first.await.expect("first relay"), 2);
    assert_eq!(held.published.lock().expect("lock").len(), 2);
    assert!(
        fedmesh_common::testing::drain_outbox(outbox.as_ref())
            .await
            .is_empty(),
        "published rows were deleted"
    );
}

#[tokio::test]
async fn postgres_replicas_announce_new_messages_only_while_another_replica_listens() {
    let (first, database) = open_postgres().await;
    let first_tasks = TaskTracker::new();
    let first_shutdown = CancellationToken::new();
    first.spawn_wakeups(
        Arc::new(InboxHub::default()),
        &first_tasks,
        first_shutdown.clone(),
    );

    // Alone on the shard, a replica announces nothing.
    first
        .insert_batch(&[message("m1", "alpha", None)])
        .await
        .expect("insert");
    assert_eq!(first.announcements_sent(), 0);

    // A second replica joins; each hears of the other.
    let second = PgMessageStore::open(&database.url, "east", 4)
        .await
        .expect("open");
    let second_hub = Arc::new(InboxHub::default());
    let mut lease = second_hub.admit("alpha", 4).expect("admitted");
    lease.activate(1);
    let second_tasks = TaskTracker::new();
    let second_shutdown = CancellationToken::new();
    second.spawn_wakeups(
        Arc::clone(&second_hub),
        &second_tasks,
        second_shutdown.clone(),
    );
    let mut first_knows = first.watch_other_replicas();
    first_knows
        .wait_for(|n| *n == 1)
        .await
        .expect("first hears");
    let mut second_knows = second.watch_other_replicas();
    second_knows
        .wait_for(|n| *n == 1)
        .await
        .expect("second hears");
    assert_eq!(first.other_replicas().len(), 1);

    // Now a message stored by the first wakes the second's stream.
    let stored = first
        .insert_batch(&[message("m2", "alpha", None)])
        .await
        .expect("insert");
    assert_eq!(first.announcements_sent(), 1);
    let sequence = stored[0].sequence;
    lease
        .stored
        .wait_for(|announced| *announced == sequence)
        .await
        .expect("the second replica was told");

    // The second leaves; the first forgets it and announces nothing again.
    second_shutdown.cancel();
    second_tasks.close();
    second_tasks.wait().await;
    first_knows
        .wait_for(|n| *n == 0)
        .await
        .expect("first forgets");
    first
        .insert_batch(&[message("m3", "alpha", None)])
        .await
        .expect("insert");
    assert_eq!(first.announcements_sent(), 1);

    first_shutdown.cancel();
    first_tasks.close();
    first_tasks.wait().await;
}

#[tokio::test]
async fn a_postgres_shard_store_outlives_the_loss_of_its_connections() {
    let (store, database) = open_postgres().await;
    // Fill the pool with connections, then have the server end them all.
    let batches: Vec<Vec<Message>> = (0..4)
        .map(|index| vec![message(&format!("w{index}"), "alpha", None)])
        .collect();
    let filled = tokio::join!(
        store.insert_batch(&batches[0]),
        store.insert_batch(&batches[1]),
        store.insert_batch(&batches[2]),
        store.insert_batch(&batches[3]),
    );
    for stored in [filled.0, filled.1, filled.2, filled.3] {
        stored.expect("insert");
    }
    let admin = sqlx::PgPool::connect(&database.url).await.expect("connect");
    let end_connections = || async {
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_all(&admin)
        .await
        .expect("terminate");
        assert!(!ended.is_empty());
    };
    end_connections().await;

    // The next batch finds dead connections, retries on fresh ones, and
    // reports its messages as new, stored once.
    let stored = store
        .insert_batch(&[message("after", "alpha", None)])
        .await
        .expect("insert after the connections were lost");
    assert!(!stored[0].duplicate);

    // Reads and acks are retried on fresh connections too.
    end_connections().await;
    let inbox = store
        .fetch_unacked("alpha", page(0, 10))
        .await
        .expect("fetch");
    assert_eq!(inbox.len(), 5);
    end_connections().await;
    let acked = store.ack("alpha", &[1, 2]).await.expect("ack");
    assert_eq!(acked, vec![1, 2]);
    admin.close().await;
}
