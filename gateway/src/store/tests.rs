//! The message store suite: the same cases on every backend.

use std::collections::BTreeMap;

use fedmesh_common::events::{Event, MESSAGE_ACCEPTED, MESSAGE_DELIVERED};

use super::*;
use crate::message::{Fate, KeyInUse, Refused, Stored};

fn message(message_id: &str, recipient_id: &str, idempotency_key: Option<&str>) -> Message {
    Message {
        message_id: message_id.to_string(),
        sender_id: "sender".to_string(),
        recipient_id: recipient_id.to_string(),
        kind: "test.kind".to_string(),
        payload: bytes::Bytes::from_static(b"body"),
        headers: BTreeMap::from([("h".to_string(), "v".to_string())]),
        idempotency_key: idempotency_key.map(str::to_string),
        origin_region: "east".to_string(),
        accepted_at_micros: 7,
        traceparent: TRACEPARENT.to_string(),
    }
}

/// The trace context every message of the suite carries, so that every
/// case that reads a message back checks it kept it.
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

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
    message.payload = bytes::Bytes::copy_from_slice(body.as_bytes());
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

/// A message `sender_id` sends `recipient_id`, its key claimed with it.
fn sent_by(sender_id: &str, message_id: &str, recipient_id: &str, key: &str) -> ToStore {
    let mut item = keyed(message_id, recipient_id, key, message_id);
    item.message.sender_id = sender_id.to_string();
    item.claim = Some(item.message.fingerprint());
    item
}

/// Every message of `agency_id`'s inbox, as a move exports it.
async fn exported_messages(store: &dyn MessageStore, agency_id: &str) -> Vec<MovedMessage> {
    store
        .export_messages(agency_id, 0, 1000, usize::MAX)
        .await
        .expect("export")
}

/// Every key claim of `agency_id`, as a move exports it.
async fn exported_keys(store: &dyn MessageStore, agency_id: &str) -> Vec<MovedKey> {
    store
        .export_keys(agency_id, None, 1000)
        .await
        .expect("export keys")
}

/// Copies the messages of `agency_id` page by page; returns the size of
/// each page and how many messages were new to `target`.
async fn copy_messages(
    source: &dyn MessageStore,
    target: &dyn MessageStore,
    agency_id: &str,
    max_rows: u32,
    max_bytes: usize,
) -> (Vec<usize>, u64) {
    let (mut pages, mut new, mut after_sequence) = (Vec::new(), 0, 0);
    loop {
        let page = source
            .export_messages(agency_id, after_sequence, max_rows, max_bytes)
            .await
            .expect("export");
        let Some(last) = page.last() else {
            return (pages, new);
        };
        after_sequence = last.sequence;
        new += target.import_messages(&page).await.expect("import");
        pages.push(page.len());
    }
}

/// Copies the key claims of `agency_id` page by page; returns the size of
/// each page and how many claims were new to `target`.
async fn copy_keys(
    source: &dyn MessageStore,
    target: &dyn MessageStore,
    agency_id: &str,
    max_rows: u32,
) -> (Vec<usize>, u64) {
    let (mut pages, mut new, mut after_key) = (Vec::new(), 0, None::<String>);
    loop {
        let page = source
            .export_keys(agency_id, after_key.as_deref(), max_rows)
            .await
            .expect("export keys");
        let Some(last) = page.last() else {
            return (pages, new);
        };
        after_key = Some(last.idempotency_key.clone());
        new += target.import_keys(&page).await.expect("import keys");
        pages.push(page.len());
    }
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
            async fn a_message_keeps_its_trace_context_through_store_events_and_move() {
                let (store, _guard) = $open.await;
                let mut untraced = fresh("m2", "alpha");
                untraced.message.traceparent = String::new();
                stored(
                    &store,
                    &[fresh("m1", "alpha"), untraced, relayed("m3", "alpha")],
                )
                .await;
                let inbox = store
                    .fetch_unacked("alpha", page(0, 10))
                    .await
                    .expect("fetch");
                let traceparents: Vec<&str> = inbox
                    .iter()
                    .map(|entry| entry.message.traceparent.as_str())
                    .collect();
                assert_eq!(traceparents, vec![TRACEPARENT, "", TRACEPARENT]);
                store.ack("alpha", &[1, 2, 3]).await.expect("ack");
                // Each message's events carry it; one without has none.
                let events = events(&store).await;
                for kind in [MESSAGE_ACCEPTED, MESSAGE_DELIVERED] {
                    let traceparents: Vec<Option<&str>> = events
                        .iter()
                        .filter(|event| event.kind == kind)
                        .map(Event::traceparent)
                        .collect();
                    assert_eq!(
                        traceparents,
                        vec![Some(TRACEPARENT), None, Some(TRACEPARENT)],
                        "{kind}"
                    );
                }
                // A move keeps it.
                let (target, _target_guard) = $open.await;
                let exported = exported_messages(&store, "alpha").await;
                assert_eq!(exported[0].message.traceparent, TRACEPARENT);
                assert_eq!(exported[1].message.traceparent, "");
                target.import_messages(&exported).await.expect("import");
                assert_eq!(exported_messages(&target, "alpha").await, exported);
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
                let refused = Refused::KeyInUse(KeyInUse {
                    message_id: "m1".into(),
                });
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
                assert_eq!(store.backlog().await.expect("backlog"), (0, None));
                let first = stored(&store, &[fresh("m1", "alpha"), fresh("m2", "alpha")]).await;
                let second = stored(&store, &[fresh("m3", "beta")]).await;
                let (count, oldest) = store.backlog().await.expect("backlog");
                assert_eq!(count, 3, "the unacknowledged of every inbox");
                assert_eq!(oldest, Some(first[0].stored_at_micros));
                assert_eq!(store.ack("beta", &[1]).await.expect("ack"), vec![1]);
                assert!(second[0].stored_at_micros >= first[0].stored_at_micros);
                assert_eq!(store.ack("alpha", &[1, 5]).await.expect("ack"), vec![1]);
                assert_eq!(
                    store.backlog().await.expect("backlog"),
                    (1, Some(first[1].stored_at_micros))
                );
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
                    .filter(|event| {
                        event.kind == MESSAGE_DELIVERED && event.message_id.as_deref() != Some("m3")
                    })
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
                    big.message.payload = vec![b'x'; 1000].into();
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
            async fn a_frozen_inbox_refuses_its_messages_and_the_rest_of_the_batch_is_stored() {
                let (store, _guard) = $open.await;
                stored(&store, &[fresh("a1", "alpha"), fresh("b1", "beta")]).await;
                store.freeze_inbox("alpha").await.expect("freeze");
                let outcomes = store
                    .insert_batch(&[
                        fresh("a2", "alpha"),
                        fresh("b2", "beta"),
                        keyed("a3", "alpha", "key-3", "c"),
                        fresh("g1", "gamma"),
                        fresh("b3", "beta"),
                    ])
                    .await
                    .expect("the batch does not fail whole");
                assert_eq!(outcomes[0], Err(Refused::Moved));
                assert_eq!(outcomes[2], Err(Refused::Moved));
                let sequences: Vec<u64> = [1, 3, 4]
                    .iter()
                    .map(|index| outcomes[*index].as_ref().expect("stored").sequence)
                    .collect();
                assert_eq!(sequences, vec![2, 1, 3], "the other inboxes go on as usual");
                assert_eq!(ids_in_inbox(&store, "alpha").await, vec!["a1"]);
                assert_eq!(ids_in_inbox(&store, "beta").await, vec!["b1", "b2", "b3"]);
                assert_eq!(
                    store
                        .inbox_stats("alpha")
                        .await
                        .expect("stats")
                        .last_sequence,
                    1,
                    "no sequence of the frozen inbox was taken"
                );
                let accepted: Vec<String> = events(&store)
                    .await
                    .into_iter()
                    .filter_map(|event| event.message_id)
                    .collect();
                assert_eq!(accepted, vec!["a1", "b1", "b2", "g1", "b3"]);
                // A batch of nothing but refusals; a message stored before
                // the freeze is still reported stored.
                let outcomes = store
                    .insert_batch(&[fresh("a4", "alpha"), relayed("a1", "alpha")])
                    .await
                    .expect("insert");
                assert_eq!(outcomes[0], Err(Refused::Moved));
                let before = outcomes[1].as_ref().expect("stored before the freeze");
                assert!(before.duplicate);
                assert_eq!(before.sequence, 1);
            }

            #[tokio::test]
            async fn freezing_an_inbox_takes_the_next_stream_epoch() {
                let (store, _guard) = $open.await;
                let streaming = store.claim_inbox("alpha").await.expect("claim");
                let frozen = store.freeze_inbox("alpha").await.expect("freeze");
                assert!(frozen > streaming, "the open stream ends");
                assert_eq!(store.inbox_epoch("alpha").await.expect("epoch"), frozen);
                let again = store.freeze_inbox("alpha").await.expect("freeze again");
                assert!(again > frozen);
                // An inbox this shard never saw is frozen all the same.
                assert_eq!(store.freeze_inbox("nobody").await.expect("freeze"), 1);
                assert_eq!(
                    store.inbox_position("nobody").await.expect("position"),
                    InboxPosition {
                        last_sequence: 0,
                        epoch: 1
                    }
                );
                let outcomes = store
                    .insert_batch(&[fresh("n1", "nobody")])
                    .await
                    .expect("insert");
                assert_eq!(outcomes, vec![Err(Refused::Moved)]);
            }

            #[tokio::test]
            async fn claiming_a_frozen_inbox_fails_with_inbox_moved() {
                let (store, _guard) = $open.await;
                stored(&store, &[fresh("a1", "alpha")]).await;
                let frozen = store.freeze_inbox("alpha").await.expect("freeze");
                match store.claim_inbox("alpha").await {
                    Err(StoreError::InboxMoved(agency_id)) => assert_eq!(agency_id, "alpha"),
                    other => panic!("a frozen inbox opens no stream: {other:?}"),
                }
                assert_eq!(
                    store.inbox_epoch("alpha").await.expect("epoch"),
                    frozen,
                    "a refused claim takes no epoch"
                );
                assert!(store.claim_inbox("beta").await.is_ok());
            }

            #[tokio::test]
            async fn a_thawed_inbox_takes_messages_again_where_it_stopped() {
                let (store, _guard) = $open.await;
                stored(&store, &[fresh("a1", "alpha"), fresh("a2", "alpha")]).await;
                store.freeze_inbox("alpha").await.expect("freeze");
                let refused = store
                    .insert_batch(&[keyed("a3", "alpha", "key-3", "c")])
                    .await
                    .expect("insert");
                assert_eq!(refused, vec![Err(Refused::Moved)]);
                store.thaw_inbox("alpha").await.expect("thaw");
                store
                    .thaw_inbox("nobody")
                    .await
                    .expect("thawing an unknown inbox");
                // The refused message claimed no key: sent again, it is new.
                let again = stored(&store, &[keyed("a3", "alpha", "key-3", "c")]).await;
                assert_eq!(again[0].sequence, 3);
                assert!(!again[0].duplicate);
                assert!(store.claim_inbox("alpha").await.is_ok());
            }

            #[tokio::test]
            async fn an_exported_inbox_imports_into_another_shard_and_goes_on_there() {
                let (source, _source_guard) = $open.await;
                let (target, _target_guard) = $open.await;
                let mut batch = Vec::new();
                for index in 1..=5 {
                    let mut item = keyed(
                        &format!("a{index}"),
                        "alpha",
                        &format!("key-{index}"),
                        "body",
                    );
                    item.message.payload = vec![b'0' + index; 1000].into();
                    item.message
                        .headers
                        .insert("index".into(), index.to_string());
                    item.claim = Some(item.message.fingerprint());
                    batch.push(item);
                }
                // What alpha sends: its own key claims, which move with it.
                batch.push(sent_by("alpha", "s1", "beta", "alpha-1"));
                batch.push(sent_by("alpha", "s2", "beta", "alpha-2"));
                batch.push(sent_by("alpha", "s3", "beta", "alpha-3"));
                stored(&source, &batch).await;
                let remote = sent_by("alpha", "s4", "remote", "alpha-0");
                source
                    .claim_keys(&[KeyClaim {
                        sender_id: "alpha".into(),
                        idempotency_key: "alpha-0".into(),
                        fingerprint: remote.claim.expect("keyed"),
                        message_id: "s4".into(),
                    }])
                    .await
                    .expect("claim");
                assert_eq!(source.ack("alpha", &[2]).await.expect("ack"), vec![2]);
                source.claim_inbox("alpha").await.expect("claim");
                source.freeze_inbox("alpha").await.expect("freeze");
                let position = source.inbox_position("alpha").await.expect("position");
                assert_eq!(
                    position,
                    InboxPosition {
                        last_sequence: 5,
                        epoch: 2
                    }
                );

                // Pages stop at their byte limit, the first message always in.
                let page =
                    |max_rows, max_bytes| source.export_messages("alpha", 0, max_rows, max_bytes);
                let sequences = |page: Vec<MovedMessage>| -> Vec<u64> {
                    page.iter().map(|moved| moved.sequence).collect()
                };
                assert_eq!(sequences(page(10, 2000).await.expect("export")), vec![1, 2]);
                assert_eq!(sequences(page(10, 2999).await.expect("export")), vec![1, 2]);
                assert_eq!(sequences(page(10, 1).await.expect("export")), vec![1]);
                assert_eq!(
                    sequences(page(2, usize::MAX).await.expect("export")),
                    vec![1, 2]
                );

                let (pages, new) = copy_messages(&source, &target, "alpha", 3, 2500).await;
                assert_eq!(pages, vec![2, 2, 1]);
                assert_eq!(new, 5);
                let (pages, new) = copy_keys(&source, &target, "alpha", 3).await;
                assert_eq!(pages, vec![3, 1]);
                assert_eq!(new, 4);
                let moved = exported_messages(&target, "alpha").await;
                assert_eq!(moved, exported_messages(&source, "alpha").await);
                assert_eq!(moved[2].message.payload, vec![b'3'; 1000]);
                assert_eq!(moved[2].message.headers["index"], "3");
                assert_eq!(moved[2].message.idempotency_key.as_deref(), Some("key-3"));
                assert!(moved[1].acked_at_micros.is_some());
                assert!(moved.iter().all(|moved| moved.stored_at_micros > 0));
                let keys = exported_keys(&target, "alpha").await;
                assert_eq!(keys, exported_keys(&source, "alpha").await);
                let key_names: Vec<&str> = keys
                    .iter()
                    .map(|key| key.idempotency_key.as_str())
                    .collect();
                assert_eq!(key_names, vec!["alpha-0", "alpha-1", "alpha-2", "alpha-3"]);
                assert!(
                    exported_keys(&target, "sender").await.is_empty(),
                    "only the moving agency's claims"
                );
                assert_eq!(unacked_sequences(&target, "alpha").await, vec![1, 3, 4, 5]);
                assert!(
                    events(&target).await.is_empty(),
                    "an import is no new message"
                );

                // A move run again changes nothing, but brings acknowledgements.
                assert_eq!(source.ack("alpha", &[3]).await.expect("ack"), vec![3]);
                let (_, new) = copy_messages(&source, &target, "alpha", 1000, usize::MAX).await;
                assert_eq!(new, 0);
                let (_, new) = copy_keys(&source, &target, "alpha", 1000).await;
                assert_eq!(new, 0);
                assert_eq!(unacked_sequences(&target, "alpha").await, vec![1, 4, 5]);
                assert_eq!(
                    exported_messages(&target, "alpha").await,
                    exported_messages(&source, "alpha").await
                );

                target
                    .open_imported_inbox("alpha", position)
                    .await
                    .expect("open");
                assert_eq!(
                    target.inbox_position("alpha").await.expect("position"),
                    position
                );
                let next = stored(&target, &[fresh("a6", "alpha")]).await;
                assert_eq!(next[0].sequence, 6, "sequences go on from the old shard's");
                let relayed_again = stored(&target, &[relayed("a1", "alpha")]).await;
                assert!(relayed_again[0].duplicate);
                assert_eq!(relayed_again[0].sequence, 1);
                let claimed = target
                    .claim_keys(&[KeyClaim {
                        sender_id: "alpha".into(),
                        idempotency_key: "alpha-1".into(),
                        fingerprint: sent_by("alpha", "s9", "beta", "alpha-1")
                            .claim
                            .expect("keyed"),
                        message_id: "s9".into(),
                    }])
                    .await
                    .expect("claim");
                let [Claimed::Existing(existing)] = claimed.as_slice() else {
                    panic!("the imported claim holds: {claimed:?}");
                };
                assert_eq!(existing.message_id, "s1");
                assert!(target.claim_inbox("alpha").await.expect("claim") > position.epoch);
            }

            #[tokio::test]
            async fn opening_an_imported_inbox_keeps_a_position_further_on() {
                let (store, _guard) = $open.await;
                stored(&store, &[fresh("a1", "alpha"), fresh("a2", "alpha")]).await;
                store.claim_inbox("alpha").await.expect("claim");
                store.claim_inbox("alpha").await.expect("claim");
                // An inbox frozen before its import opens too.
                store.freeze_inbox("alpha").await.expect("freeze");
                store
                    .open_imported_inbox(
                        "alpha",
                        InboxPosition {
                            last_sequence: 1,
                            epoch: 1,
                        },
                    )
                    .await
                    .expect("open");
                assert_eq!(
                    store.inbox_position("alpha").await.expect("position"),
                    InboxPosition {
                        last_sequence: 2,
                        epoch: 3
                    }
                );
                assert_eq!(stored(&store, &[fresh("a3", "alpha")]).await[0].sequence, 3);
            }

            #[tokio::test]
            async fn forgetting_a_moved_agency_leaves_a_tombstone_that_refuses_writes() {
                let (store, _guard) = $open.await;
                stored(
                    &store,
                    &[
                        fresh("a1", "alpha"),
                        keyed("a2", "alpha", "key-2", "b"),
                        sent_by("alpha", "s1", "beta", "alpha-1"),
                        sent_by("alpha", "s2", "beta", "alpha-2"),
                        fresh("a3", "alpha"),
                    ],
                )
                .await;
                store.ack("alpha", &[1]).await.expect("ack");
                store.claim_inbox("alpha").await.expect("claim");
                store.freeze_inbox("alpha").await.expect("freeze");
                let deleted = store.forget_agency("alpha", true).await.expect("forget");
                assert_eq!(deleted, 5, "three messages and two claims");
                assert!(exported_messages(&store, "alpha").await.is_empty());
                assert!(exported_keys(&store, "alpha").await.is_empty());
                assert_eq!(store.inbox_epoch("alpha").await.expect("epoch"), 0);
                let late = store
                    .insert_batch(&[fresh("a4", "alpha"), relayed("a1", "alpha")])
                    .await
                    .expect("insert");
                assert_eq!(late, vec![Err(Refused::Moved), Err(Refused::Moved)]);
                assert!(matches!(
                    store.claim_inbox("alpha").await,
                    Err(StoreError::InboxMoved(_))
                ));
                // What others hold stays: the messages alpha sent, the
                // claims of other senders.
                assert_eq!(ids_in_inbox(&store, "beta").await, vec!["s1", "s2"]);
                assert_eq!(exported_keys(&store, "sender").await.len(), 1);
                assert_eq!(store.forget_agency("alpha", true).await.expect("again"), 0);
            }

            #[tokio::test]
            async fn forgetting_without_a_tombstone_lets_the_inbox_start_anew() {
                let (store, _guard) = $open.await;
                stored(
                    &store,
                    &[
                        fresh("a1", "alpha"),
                        fresh("a2", "alpha"),
                        sent_by("alpha", "s1", "beta", "alpha-1"),
                    ],
                )
                .await;
                store.claim_inbox("alpha").await.expect("claim");
                let deleted = store.forget_agency("alpha", false).await.expect("forget");
                assert_eq!(deleted, 3);
                assert_eq!(
                    store.inbox_position("alpha").await.expect("position"),
                    InboxPosition::default()
                );
                let anew = stored(
                    &store,
                    &[
                        relayed("a1", "alpha"),
                        sent_by("alpha", "s9", "beta", "alpha-1"),
                    ],
                )
                .await;
                assert_eq!(anew[0].sequence, 1);
                assert!(!anew[0].duplicate, "forgotten");
                assert_eq!(anew[1].message_id, "s9", "the key is free again");
            }

            #[tokio::test]
            async fn forgetting_a_large_inbox_takes_several_chunks() {
                let (store, _guard) = $open.await;
                let count = FORGET_CHUNK as usize + 1;
                let batch: Vec<ToStore> = (0..count)
                    .map(|index| fresh(&format!("m{index}"), "alpha"))
                    .collect();
                stored(&store, &batch).await;
                store.ack("alpha", &[1, 2, 3]).await.expect("ack");
                let claims: Vec<KeyClaim> = (0..count)
                    .map(|index| KeyClaim {
                        sender_id: "alpha".into(),
                        idempotency_key: format!("key-{index}"),
                        fingerprint: Fingerprint([7; 32]),
                        message_id: format!("r{index}"),
                    })
                    .collect();
                store.claim_keys(&claims).await.expect("claim");
                let deleted = store.forget_agency("alpha", true).await.expect("forget");
                assert_eq!(deleted, 2 * count as u64);
                assert!(exported_messages(&store, "alpha").await.is_empty());
                assert!(exported_keys(&store, "alpha").await.is_empty());
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

            #[tokio::test]
            async fn the_spool_keeps_messages_in_order_once_each_until_taken_out_with_their_events()
            {
                let (store, _guard) = $open.await;
                let spool = store.spool();
                let first = spool
                    .spool("west", &message("s1", "alpha", Some("k1")))
                    .await
                    .expect("spool");
                assert!(!first.duplicate);
                // A retry of the same message finds it: nothing new.
                let again = spool
                    .spool("west", &message("s1", "alpha", Some("k1")))
                    .await
                    .expect("spool");
                assert!(again.duplicate);
                assert_eq!(again.spooled_at_micros, first.spooled_at_micros);
                let mut big = message("s2", "beta", None);
                big.payload = bytes::Bytes::from(vec![7_u8; 1000]);
                spool.spool("west", &big).await.expect("spool");
                spool
                    .spool("west", &message("s3", "alpha", None))
                    .await
                    .expect("spool");
                spool
                    .spool("central", &message("c1", "gamma", None))
                    .await
                    .expect("spool");

                let pair = |sender_id: &str, recipient_id: &str| SpoolPair {
                    sender_id: sender_id.into(),
                    recipient_id: recipient_id.into(),
                };
                let asked = [
                    pair("sender", "delta"),
                    pair("sender", "alpha"),
                    pair("other", "alpha"),
                    pair("sender", "gamma"),
                ];
                assert_eq!(
                    spool.holds(&asked).await.expect("holds"),
                    [false, true, false, true],
                    "each pair answered in its place"
                );
                assert!(spool.holds(&[]).await.expect("holds").is_empty());
                let depths = spool.depths().await.expect("depths");
                let counts: Vec<(String, u64)> = depths
                    .iter()
                    .map(|depth| (depth.destination_region.clone(), depth.messages))
                    .collect();
                assert_eq!(counts, vec![("central".into(), 1), ("west".into(), 3)]);
                assert_eq!(depths[1].oldest_spooled_at_micros, first.spooled_at_micros);

                // In the order spooled, whole, within the byte limit (the
                // first message always comes).
                let page = spool.next("west", 10, 2000).await.expect("next");
                let ids: Vec<&str> = page
                    .iter()
                    .map(|spooled| spooled.message.message_id.as_str())
                    .collect();
                assert_eq!(ids, vec!["s1", "s2", "s3"]);
                assert_eq!(page[0].message, message("s1", "alpha", Some("k1")));
                assert_eq!(page[1].message, big);
                assert_eq!(page[0].destination_region, "west");
                let bounded = spool.next("west", 10, 500).await.expect("next");
                assert_eq!(bounded.len(), 2, "stops before the message past the limit");
                assert_eq!(
                    spool.next("west", 1, usize::MAX).await.expect("next").len(),
                    1
                );

                spool
                    .attempted(&["s1".to_string()], "west: connection refused")
                    .await
                    .expect("attempted");
                let page = spool.next("west", 10, usize::MAX).await.expect("next");
                assert_eq!(page[0].attempts, 1);
                assert_eq!(page[1].attempts, 0);

                // Out with their events: forwarded, and undeliverable.
                let done = vec![
                    (
                        page[0].clone(),
                        Fate::Forwarded {
                            home_region: "west".into(),
                            duplicate: false,
                        },
                    ),
                    (
                        page[1].clone(),
                        Fate::Undeliverable {
                            reason: "agency \"beta\" is not registered".into(),
                        },
                    ),
                ];
                spool.remove(&done).await.expect("remove");
                // Taking them out again (a drainer that lost its answer)
                // writes no second event.
                spool.remove(&done).await.expect("remove again");
                let ids: Vec<String> = spool
                    .next("west", 10, usize::MAX)
                    .await
                    .expect("next")
                    .into_iter()
                    .map(|spooled| spooled.message.message_id)
                    .collect();
                assert_eq!(ids, vec!["s3"]);
                assert_eq!(
                    spool.holds(&asked[1..2]).await.expect("holds"),
                    [true],
                    "s3 still waits for alpha"
                );
                let events = events(&store).await;
                let kinds: Vec<(&str, Option<&str>, &str)> = events
                    .iter()
                    .map(|event| {
                        (
                            event.kind.as_str(),
                            event.message_id.as_deref(),
                            event.agency_id.as_str(),
                        )
                    })
                    .collect();
                assert_eq!(
                    kinds,
                    vec![
                        ("message.forwarded", Some("s1"), "sender"),
                        ("message.undeliverable", Some("s2"), "sender"),
                    ]
                );
                assert_eq!(events[0].attributes["recipient"], "alpha");
                assert_eq!(events[0].attributes["home_region"], "west");
                assert_eq!(events[0].attributes["traceparent"], TRACEPARENT);
                assert_eq!(events[0].region, "east");
                assert!(events[1].attributes["reason"].contains("not registered"));
            }

            #[tokio::test]
            async fn one_drainer_per_destination_holds_the_spool_lock() {
                let (store, _guard) = $open.await;
                let spool = store.spool();
                let west = spool.lock_drain("west").await.expect("lock");
                assert!(west.is_some());
                // Another drainer, through another handle of the same shard.
                let other = store.spool();
                assert!(other.lock_drain("west").await.expect("lock").is_none());
                assert!(other.lock_drain("central").await.expect("lock").is_some());
                drop(west);
                assert!(other.lock_drain("west").await.expect("lock").is_some());
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

#[tokio::test]
async fn the_sqlite_fence_refuses_any_reservation_of_a_frozen_inbox() {
    let (store, dir) = open_sqlite().await;
    stored(&store, &[fresh("a1", "alpha"), fresh("b1", "beta")]).await;
    store.freeze_inbox("alpha").await.expect("freeze");
    // A writer that reserves without looking, as a gateway with a stale
    // topology does.
    let url = format!("sqlite://{}", dir.path().join("shard.sqlite").display());
    let raw = sqlx::SqlitePool::connect(&url).await.expect("connect");
    let reserve = |recipient_id: &'static str| {
        sqlx::query(
            "INSERT INTO inboxes (recipient_id, last_sequence) VALUES (?, 1) \
             ON CONFLICT (recipient_id) DO UPDATE SET last_sequence = last_sequence + 1",
        )
        .bind(recipient_id)
        .execute(&raw)
    };
    let refused = reserve("alpha").await.expect_err("fenced");
    assert!(
        refused.to_string().contains("fedmesh: inbox frozen"),
        "{refused}"
    );
    reserve("beta").await.expect("another inbox");
    raw.close().await;
    assert_eq!(
        store
            .inbox_position("alpha")
            .await
            .expect("position")
            .last_sequence,
        1
    );
}

async fn open_postgres() -> (PgMessageStore, fedmesh_common::testing::TestDatabase) {
    let database = fedmesh_common::testing::TestDatabase::create().await;
    let store = PgMessageStore::open(&database.url, "east", 4)
        .await
        .expect("open");
    (store, database)
}

message_store_suite!(postgres, open_postgres());

#[tokio::test]
async fn the_postgres_fence_refuses_any_reservation_of_a_frozen_inbox() {
    let (store, database) = open_postgres().await;
    stored(&store, &[fresh("a1", "alpha"), fresh("b1", "beta")]).await;
    store.freeze_inbox("alpha").await.expect("freeze");
    let raw = sqlx::PgPool::connect(&database.url).await.expect("connect");
    let reserve = |recipient_id: &'static str| {
        sqlx::query("UPDATE inboxes SET last_sequence = last_sequence + 1 WHERE recipient_id = $1")
            .bind(recipient_id)
            .execute(&raw)
    };
    let refused = StoreError::from(reserve("alpha").await.expect_err("fenced"));
    assert_eq!(refused.sql_state().as_deref(), Some("FM001"), "{refused}");
    reserve("beta").await.expect("another inbox");
    raw.close().await;
}

#[tokio::test]
async fn a_postgres_freeze_waits_for_the_batch_holding_the_inbox() {
    let (store, database) = open_postgres().await;
    stored(&store, &[fresh("a1", "alpha")]).await;
    let raw = sqlx::PgPool::connect(&database.url).await.expect("connect");
    // A batch in flight: it has reserved a sequence, not yet committed.
    let mut in_flight = raw.begin().await.expect("begin");
    sqlx::query(
        "UPDATE inboxes SET last_sequence = last_sequence + 1 WHERE recipient_id = 'alpha'",
    )
    .execute(&mut *in_flight)
    .await
    .expect("reserve");
    let freeze = store.freeze_inbox("alpha");
    tokio::pin!(freeze);
    let waited = tokio::time::timeout(std::time::Duration::from_millis(300), &mut freeze).await;
    assert!(
        waited.is_err(),
        "the freeze waits for the batch: {waited:?}"
    );
    in_flight.commit().await.expect("commit");
    freeze.await.expect("freeze");
    assert_eq!(
        store
            .inbox_position("alpha")
            .await
            .expect("position")
            .last_sequence,
        2,
        "the batch in flight got through"
    );
    let late = store
        .insert_batch(&[fresh("a3", "alpha")])
        .await
        .expect("insert");
    assert_eq!(late, vec![Err(Refused::Moved)]);
    raw.close().await;
}

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
