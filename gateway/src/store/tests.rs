//! The message store suite: the same cases on every backend.

use std::collections::BTreeMap;

use fedmesh_common::events::{Event, MESSAGE_ACCEPTED, MESSAGE_DELIVERED};

use super::*;
use crate::message::{KeyInUse, Stored};

fn message(message_id: &str, recipient_id: &str, idempotency_key: Option<&str>) -> Message {
    Message {
        message_id: message_id.to_string(),
        sender_id: "sender".to_string(),
        recipient_id: recipient_id.to_string(),
        kind: "test.kind".to_string(),
        payload: b"body".to_vec(),
        headers: BTreeMap::from([("h".to_string(), "v".to_string())]),
        idempotency_key: idempotency_key.map(str::to_string),
        origin_region: "east".to_string(),
        accepted_at_micros: 7,
    }
}

/// A message sent in this region, new, without a key.
fn fresh(message_id: &str, recipient_id: &str) -> ToStore {
    ToStore {
        message: message(message_id, recipient_id, None),
        claim: None,
        may_exist: false,
    }
}

/// A message whose key is claimed with it, `body` its payload.
fn keyed(message_id: &str, recipient_id: &str, key: &str, body: &str) -> ToStore {
    let mut message = message(message_id, recipient_id, Some(key));
    message.payload = body.as_bytes().to_vec();
    ToStore {
        claim: Some(message.fingerprint()),
        message,
        may_exist: false,
    }
}

/// A message relayed from another region: its id may be stored already.
fn relayed(message_id: &str, recipient_id: &str) -> ToStore {
    ToStore {
        message: message(message_id, recipient_id, None),
        claim: None,
        may_exist: true,
    }
}

/// Stores `batch`, expecting every message stored.
async fn stored(store: &dyn MessageStore, batch: &[ToStore]) -> Vec<Stored> {
    store
        .insert_batch(batch)
        .await
        .expect("insert")
        .into_iter()
        .map(|outcome| outcome.expect("stored, not refused"))
        .collect()
}

/// Up to `limit` messages after `after_sequence`, whatever their size.
fn page(after_sequence: u64, limit: u32) -> Page {
    Page {
        after_sequence,
        limit,
        max_bytes: u64::MAX,
    }
}

async fn ids_in_inbox(store: &dyn MessageStore, recipient_id: &str) -> Vec<String> {
    store
        .fetch_unacked(recipient_id, page(0, 100))
        .await
        .expect("fetch")
        .into_iter()
        .map(|entry| entry.message.message_id)
        .collect()
}

async fn unacked_sequences(store: &dyn MessageStore, recipient_id: &str) -> Vec<u64> {
    store
        .fetch_unacked(recipient_id, page(0, 100))
        .await
        .expect("fetch")
        .iter()
        .map(|entry| entry.sequence)
        .collect()
}

async fn events(store: &dyn MessageStore) -> Vec<Event> {
    fedmesh_common::testing::drain_outbox(store.outbox().as_ref()).await
}

macro_rules! message_store_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn sequences_are_dense_per_recipient() {
                let (store, _guard) = $open.await;
                let stored = stored(
                    &store,
                    &[
                        fresh("m1", "alpha"),
                        fresh("m2", "beta"),
                        fresh("m3", "alpha"),
                    ],
                )
                .await;
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
            async fn a_store_without_events_keeps_no_outbox_rows() {
                let (store, _guard) = $open.await;
                let store = store.without_events();
                let stored = stored(&store, &[fresh("m1", "alpha"), fresh("m2", "alpha")]).await;
                assert_eq!(stored.len(), 2);
                assert_eq!(store.ack("alpha", &[1, 2]).await.expect("ack"), vec![1, 2]);
                assert_eq!(
                    events(&store).await,
                    Vec::new(),
                    "neither accepted nor delivered"
                );
            }

            #[tokio::test]
            async fn accepted_messages_are_listed_for_their_events() {
                let (store, _guard) = $open.await;
                stored(&store, &[fresh("m1", "alpha"), fresh("m2", "beta")]).await;
                let events = events(&store).await;
                assert_eq!(events.len(), 2);
                assert!(events.iter().all(|event| event.kind == MESSAGE_ACCEPTED));
                assert_eq!(events[0].message_id.as_deref(), Some("m1"));
                assert_eq!(events[0].agency_id, "alpha");
                assert_eq!(events[0].region, "east");
                assert_eq!(events[1].attributes["sender"], "sender");
                assert_eq!(events[1].attributes["kind"], "test.kind");
                assert_eq!(events[1].attributes["sequence"], "1");
                assert_ne!(events[0].event_id, events[1].event_id);
            }

            #[tokio::test]
            async fn retries_are_stored_once() {
                let (store, _guard) = $open.await;
                let first = stored(&store, &[keyed("m1", "alpha", "key-1", "a")]).await;
                // The same id relayed again; the same key and content under a
                // new id (a retried Send); a new key twice in one batch.
                let again = stored(
                    &store,
                    &[
                        relayed("m1", "alpha"),
                        keyed("m9", "alpha", "key-1", "a"),
                        keyed("m2", "alpha", "key-2", "b"),
                        keyed("m3", "alpha", "key-2", "b"),
                    ],
                )
                .await;
                assert!(!first[0].duplicate);
                assert!(again[0].duplicate && again[1].duplicate && again[3].duplicate);
                assert!(!again[2].duplicate);
                assert_eq!(again[1].message_id, "m1", "the key names the first message");
                assert_eq!(again[1].sequence, first[0].sequence);
                assert_eq!(again[3].message_id, "m2");
                assert_eq!(ids_in_inbox(&store, "alpha").await, vec!["m1", "m2"]);
                let kinds: Vec<String> = events(&store)
                    .await
                    .into_iter()
                    .map(|event| event.kind)
                    .collect();
                assert_eq!(kinds, vec![MESSAGE_ACCEPTED, MESSAGE_ACCEPTED]);
            }

            #[tokio::test]
            async fn a_key_with_other_content_is_refused_and_stores_nothing() {
                let (store, _guard) = $open.await;
                stored(&store, &[keyed("m1", "alpha", "key-1", "a")]).await;
                let outcomes = store
                    .insert_batch(&[
                        keyed("m2", "alpha", "key-1", "other body"),
                        keyed("m3", "beta", "key-1", "a"),
                        fresh("m4", "alpha"),
                    ])
                    .await
                    .expect("insert");
                let refused = KeyInUse {
                    message_id: "m1".into(),
                };
                assert_eq!(outcomes[0], Err(refused.clone()));
                assert_eq!(
                    outcomes[1],
                    Err(refused),
                    "another recipient is other content"
                );
                assert!(outcomes[2].is_ok(), "the rest of the batch is stored");
                assert_eq!(ids_in_inbox(&store, "alpha").await, vec!["m1", "m4"]);
                assert!(ids_in_inbox(&store, "beta").await.is_empty());
            }

            #[tokio::test]
            async fn keys_claimed_alone_name_their_message() {
                let (store, _guard) = $open.await;
                let claim = |message_id: &str, body: &str| {
                    let message = keyed(message_id, "remote", "key-1", body);
                    KeyClaim {
                        sender_id: "sender".into(),
                        idempotency_key: "key-1".into(),
                        fingerprint: message.claim.expect("keyed"),
                        message_id: message_id.into(),
                    }
                };
                let first = store
                    .claim_keys(&[claim("m1", "a"), claim("m2", "b")])
                    .await
                    .expect("claim");
                assert_eq!(first[0], Claimed::New);
                let Claimed::Existing(repeat) = &first[1] else {
                    panic!("a repeat in the batch names the first: {first:?}");
                };
                assert_eq!(repeat.message_id, "m1");
                assert!(!repeat.matches(&claim("m2", "b").fingerprint));
                let again = store.claim_keys(&[claim("m5", "a")]).await.expect("claim");
                let Claimed::Existing(existing) = &again[0] else {
                    panic!("claimed before: {again:?}");
                };
                assert_eq!(existing.message_id, "m1");
                assert!(existing.matches(&claim("m5", "a").fingerprint));
                // A message sent with the key later, to a recipient of this
                // shard, is the message the key names.
                let stored = stored(&store, &[keyed("m7", "remote", "key-1", "a")]).await;
                assert_eq!(stored[0].message_id, "m1");
                assert_eq!(ids_in_inbox(&store, "remote").await, vec!["m1"]);
            }

            #[tokio::test]
            async fn a_repeated_local_id_is_still_stored_once() {
                let (store, _guard) = $open.await;
                let first = stored(&store, &[fresh("m1", "alpha")]).await;
                let again = stored(&store, &[relayed("m1", "alpha")]).await;
                assert!(again[0].duplicate);
                assert_eq!(again[0].sequence, first[0].sequence);
                assert_eq!(ids_in_inbox(&store, "alpha").await, vec!["m1"]);
            }

            #[tokio::test]
            async fn acked_messages_leave_the_inbox_once() {
                let (store, _guard) = $open.await;
                stored(&store, &[fresh("m1", "alpha"), fresh("m2", "alpha")]).await;
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
                assert_eq!(
                    store.inbox_stats("alpha").await.expect("stats"),
                    InboxStats {
                        unacknowledged: 1,
                        last_sequence: 2
                    }
                );
                assert_eq!(
                    store.inbox_stats("nobody").await.expect("stats"),
                    InboxStats::default()
                );
                assert!(
                    store
                        .fetch_unacked("alpha", page(2, 10))
                        .await
                        .expect("fetch after")
                        .is_empty()
                );
                let delivered: Vec<Event> = events(&store)
                    .await
                    .into_iter()
                    .filter(|event| event.kind == MESSAGE_DELIVERED)
                    .collect();
                assert_eq!(delivered.len(), 1);
                assert_eq!(delivered[0].message_id.as_deref(), Some("m1"));
                assert_eq!(delivered[0].attributes["sequence"], "1");
            }

            #[tokio::test]
            async fn acks_out_of_order_leave_exactly_the_unacknowledged() {
                let (store, _guard) = $open.await;
                let batch: Vec<ToStore> = (1..=5)
                    .map(|index| fresh(&format!("m{index}"), "alpha"))
                    .collect();
                stored(&store, &batch).await;
                assert_eq!(store.ack("alpha", &[2, 3]).await.expect("ack"), vec![2, 3]);
                assert_eq!(unacked_sequences(&store, "alpha").await, vec![1, 4, 5]);
                assert_eq!(store.ack("alpha", &[1]).await.expect("ack"), vec![1]);
                assert_eq!(unacked_sequences(&store, "alpha").await, vec![4, 5]);
                assert_eq!(
                    store
                        .inbox_stats("alpha")
                        .await
                        .expect("stats")
                        .unacknowledged,
                    2
                );
                assert_eq!(
                    store.ack("alpha", &[5, 2]).await.expect("ack"),
                    vec![5],
                    "2 counts once"
                );
                assert_eq!(unacked_sequences(&store, "alpha").await, vec![4]);
                assert_eq!(store.ack("alpha", &[4]).await.expect("ack"), vec![4]);
                assert!(unacked_sequences(&store, "alpha").await.is_empty());
                assert_eq!(
                    store
                        .inbox_stats("alpha")
                        .await
                        .expect("stats")
                        .unacknowledged,
                    0
                );
                // New messages after the watermark are delivered.
                stored(&store, &[fresh("m6", "alpha")]).await;
                assert_eq!(unacked_sequences(&store, "alpha").await, vec![6]);
            }

            #[tokio::test]
            async fn pages_stop_at_their_byte_limit_but_hold_one_message() {
                let (store, _guard) = $open.await;
                let mut batch = Vec::new();
                for index in 0..5 {
                    let mut big = fresh(&format!("m{index}"), "alpha");
                    big.message.payload = vec![b'x'; 1000];
                    batch.push(big);
                }
                stored(&store, &batch).await;
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
            async fn retention_purges_only_acknowledged_messages_and_old_keys() {
                let (store, _guard) = $open.await;
                stored(
                    &store,
                    &[keyed("m1", "alpha", "k1", "a"), fresh("m2", "alpha")],
                )
                .await;
                store.ack("alpha", &[1]).await.expect("ack");
                // A cutoff in the past keeps everything.
                assert_eq!(store.purge_acked(0, 100).await.expect("purge"), 0);
                assert_eq!(store.purge_keys(0, 100).await.expect("purge"), 0);
                assert_eq!(store.purge_acked(i64::MAX, 100).await.expect("purge"), 1);
                assert_eq!(store.purge_keys(i64::MAX, 100).await.expect("purge"), 1);
                let inbox = store
                    .fetch_unacked("alpha", page(0, 10))
                    .await
                    .expect("fetch");
                assert_eq!(
                    inbox.iter().map(|entry| entry.sequence).collect::<Vec<_>>(),
                    vec![2]
                );
                // Sequences go on after a purge; the forgotten key is free.
                let next = stored(&store, &[keyed("m3", "alpha", "k1", "other")]).await;
                assert_eq!(next[0].sequence, 3);
                assert!(!next[0].duplicate);
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
        .insert_batch(&[fresh("m1", "alpha"), fresh("m2", "beta")])
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
    stored(&first, &[fresh("m1", "alpha")]).await;
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
    let sequence = stored(&first, &[fresh("m2", "alpha")]).await[0].sequence;
    assert_eq!(first.announcements_sent(), 1);
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
    stored(&first, &[fresh("m3", "alpha")]).await;
    assert_eq!(first.announcements_sent(), 1);

    first_shutdown.cancel();
    first_tasks.close();
    first_tasks.wait().await;
}

#[tokio::test]
async fn a_postgres_shard_store_outlives_the_loss_of_its_connections() {
    let (store, database) = open_postgres().await;
    // Fill the pool with connections, then have the server end them all.
    let batches: Vec<Vec<ToStore>> = (0..4)
        .map(|index| vec![fresh(&format!("w{index}"), "alpha")])
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
    let after = stored(&store, &[fresh("after", "alpha")]).await;
    assert!(!after[0].duplicate);

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

#[tokio::test]
async fn what_a_postgres_batch_committed_before_its_answer_was_lost_is_reported_new() {
    let (store, _database) = open_postgres().await;
    let batch = [relayed("r1", "alpha"), keyed("k1", "alpha", "key-1", "a")];
    let stored_at = store.clock.next();
    // The first attempt commits; its answer never comes back.
    let (_, _) = store
        .try_insert_batch(&batch, stored_at, false)
        .await
        .expect("first attempt");
    // The attempt after it looks everything up and finds both stored, at
    // the batch's own time: they are new, not duplicates.
    let (outcomes, _) = store
        .try_insert_batch(&batch, stored_at, true)
        .await
        .expect("second attempt");
    for outcome in outcomes {
        let stored = outcome.expect("stored");
        assert!(!stored.duplicate, "{stored:?}");
    }
    assert_eq!(ids_in_inbox(&store, "alpha").await, vec!["r1", "k1"]);
    // A later batch relaying the same id is a duplicate.
    let later = stored(&store, &[relayed("r1", "alpha")]).await;
    assert!(later[0].duplicate);
}

#[test]
fn batch_times_are_unique_even_within_a_microsecond() {
    let clock = BatchClock::default();
    let times: Vec<i64> = (0..1000).map(|_| clock.next()).collect();
    assert!(times.windows(2).all(|pair| pair[0] < pair[1]));
}
