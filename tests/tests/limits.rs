//! Limits that hold, each with the status that names it.

use std::sync::Arc;

use fedmesh_proto::pb;
use fedmesh_tests::{Next, TestMesh, expect_code, send_request};
use tonic::Code;

#[tokio::test]
async fn a_payload_far_over_the_limit_is_refused_naming_the_limit() {
    let mesh = TestMesh::start().await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "east").await;
    let mut request = send_request("sender", "reader", "", None);
    request.payload = vec![0; 2 * 1024 * 1024];
    let status = expect_code(
        mesh.exchange("east", "sender").send(request).await,
        Code::ResourceExhausted,
    );
    assert!(
        status.message().contains("1048576"),
        "the status names the payload limit: {}",
        status.message()
    );
    let mut inbox = mesh.open_inbox("east", "reader", 0).await.unwrap();
    assert!(inbox.drain().await.is_empty(), "nothing was stored");
}

#[tokio::test]
async fn large_relayed_messages_travel_in_batches_the_receiver_accepts() {
    let mesh = Arc::new(TestMesh::start().await);
    mesh.register("reader", "west").await;
    let mut tasks = tokio::task::JoinSet::new();
    let sizes = std::iter::repeat_n(256 * 1024, 32).chain(std::iter::repeat_n(1024 * 1024, 8));
    for (index, size) in sizes.enumerate() {
        let sender = format!("sender-{index}");
        mesh.register(&sender, "east").await;
        let mesh = Arc::clone(&mesh);
        tasks.spawn(async move {
            let mut request = send_request(&sender, "reader", "", None);
            request.payload = vec![b'x'; size];
            mesh.exchange("east", &sender).send(request).await
        });
    }
    while let Some(sent) = tasks.join_next().await {
        let receipt = sent.unwrap().unwrap().into_inner().receipt.unwrap();
        assert_eq!(receipt.status(), pb::ReceiptStatus::Stored);
    }
    let mut inbox = mesh.open_inbox("west", "reader", 100).await.unwrap();
    let deliveries = inbox.drain().await;
    assert_eq!(deliveries.len(), 40);
    let total: usize = deliveries
        .iter()
        .map(|delivery| delivery.message.as_ref().unwrap().payload.len())
        .sum();
    assert_eq!(total, 32 * 256 * 1024 + 8 * 1024 * 1024);
}

#[tokio::test]
async fn an_ack_naming_too_many_sequences_is_refused() {
    let mesh = TestMesh::start().await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "east").await;
    mesh.send("east", "sender", "reader", "one", None)
        .await
        .unwrap();
    let mut inbox = mesh.open_inbox("east", "reader", 0).await.unwrap();
    assert_eq!(inbox.drain().await.len(), 1);
    let too_many: Vec<u64> = (1..=1001).collect();
    inbox.ack(&too_many).await;
    match inbox.next().await {
        Next::Ended(Some(status)) => {
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(
                status.message().contains("ack.sequences") && status.message().contains("1000"),
                "{}",
                status.message()
            );
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    // Nothing was acknowledged: the message comes again.
    let mut inbox = mesh.open_inbox("east", "reader", 0).await.unwrap();
    assert_eq!(inbox.drain().await.len(), 1);
}
