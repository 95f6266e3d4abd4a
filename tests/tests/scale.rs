//! Several gateway replicas on one shard, and many concurrent senders.

use std::collections::HashMap;
use std::sync::Arc;

use fedmesh_tests::{Backend, Inbox, TestMesh, body, send_request, within};

#[tokio::test]
async fn a_message_stored_by_one_replica_is_streamed_by_another_woken_by_notify() {
    let mut mesh = TestMesh::start_with(Backend::Postgres).await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "east").await;
    let replica = mesh.add_gateway("east-1", "east").await;

    // The reader streams from the new replica and is idle ...
    let mut inbox = Inbox::open(mesh.exchange_at(&replica, "reader"), "reader", 0)
        .await
        .unwrap();
    assert!(inbox.drain().await.is_empty());
    // ... when the first replica stores a message for it. Only the shard's
    // NOTIFY can tell the new replica: the streams do not poll.
    let receipt = mesh
        .send("east", "sender", "reader", "via the other replica", None)
        .await
        .unwrap();
    let delivery = inbox.next_delivery().await;
    assert_eq!(
        delivery.message.as_ref().unwrap().message_id,
        receipt.message_id
    );
    assert_eq!(body(&delivery), "via the other replica");

    // A retry through the other replica is recognised as the same message.
    let retried = mesh
        .exchange_at(&replica, "sender")
        .send(send_request("sender", "reader", "again", Some("k")))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    let first_try = mesh
        .send("east", "sender", "reader", "again", Some("k"))
        .await
        .unwrap();
    assert_eq!(first_try.message_id, retried.message_id);
    assert!(first_try.duplicate);
}

const N_SENDERS: usize = 50;
const N_PER_SENDER: usize = 200;

async fn ten_thousand_messages_from_fifty_senders_arrive_once_in_order(backend: Backend) {
    let mesh = TestMesh::start_with(backend).await;
    mesh.register("reader", "west").await;
    let senders: Vec<String> = (0..N_SENDERS)
        .map(|index| format!("sender-{index}"))
        .collect();
    for sender in &senders {
        mesh.register(sender, "west").await;
    }
    let mesh = Arc::new(mesh);
    let mut tasks = tokio::task::JoinSet::new();
    for sender in senders.clone() {
        let mesh = Arc::clone(&mesh);
        tasks.spawn(async move {
            let mut exchange = mesh.exchange("west", &sender);
            for index in 0..N_PER_SENDER {
                let body = format!("{sender} {index}");
                exchange
                    .send(send_request(&sender, "reader", &body, None))
                    .await
                    .unwrap();
            }
        });
    }
    within("all sends", async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    })
    .await;

    let mut inbox = mesh.open_inbox("west", "reader", 10_000).await.unwrap();
    let deliveries = inbox.drain().await;
    assert_eq!(deliveries.len(), N_SENDERS * N_PER_SENDER);
    let mut next_index: HashMap<String, usize> = HashMap::new();
    for (position, delivery) in deliveries.iter().enumerate() {
        assert_eq!(delivery.sequence, position as u64 + 1, "dense sequences");
        let text = body(delivery);
        let (sender, index) = text.split_once(' ').unwrap();
        let expected = next_index.entry(sender.to_string()).or_default();
        assert_eq!(
            index.parse::<usize>().unwrap(),
            *expected,
            "order of {sender}"
        );
        *expected += 1;
    }
    assert!(next_index.values().all(|count| *count == N_PER_SENDER));
}

fedmesh_tests::on_every_backend!(ten_thousand_messages_from_fifty_senders_arrive_once_in_order);
