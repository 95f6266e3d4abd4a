//! The Receive stream: acks, redelivery, flow control, takeover.

use fedmesh_tests::{Backend, Next, TestMesh, body};
use tonic::Code;

async fn an_acked_message_is_not_redelivered_and_an_unacked_one_is(backend: Backend) {
    let mesh = TestMesh::start_with(backend).await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "east").await;
    for text in ["one", "two", "three"] {
        mesh.send("east", "sender", "reader", text, None)
            .await
            .unwrap();
    }

    let mut inbox = mesh.open_inbox("east", "reader", 0).await.unwrap();
    let deliveries = inbox.drain().await;
    assert_eq!(
        deliveries.iter().map(body).collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
    inbox
        .ack(&[deliveries[0].sequence, deliveries[2].sequence])
        .await;
    inbox.close().await;

    let mut inbox = mesh.open_inbox("east", "reader", 0).await.unwrap();
    let redelivered = inbox.drain().await;
    assert_eq!(redelivered.len(), 1);
    assert_eq!(body(&redelivered[0]), "two");
    assert_eq!(redelivered[0].sequence, deliveries[1].sequence);
}

async fn the_window_bounds_unacknowledged_deliveries(backend: Backend) {
    let mesh = TestMesh::start_with(backend).await;
    mesh.register("sender", "west").await;
    mesh.register("reader", "west").await;
    for index in 0..5 {
        mesh.send("west", "sender", "reader", &format!("m{index}"), None)
            .await
            .unwrap();
    }
    let mut inbox = mesh.open_inbox("west", "reader", 2).await.unwrap();
    let first = inbox.drain().await;
    assert_eq!(first.iter().map(body).collect::<Vec<_>>(), ["m0", "m1"]);
    inbox.ack(&[first[0].sequence]).await;
    let second = inbox.drain().await;
    assert_eq!(second.iter().map(body).collect::<Vec<_>>(), ["m2"]);
}

async fn a_live_stream_is_woken_by_new_messages(backend: Backend) {
    let mesh = TestMesh::start_with(backend).await;
    mesh.register("sender", "central").await;
    mesh.register("reader", "west").await;
    let mut inbox = mesh.open_inbox("west", "reader", 0).await.unwrap();
    assert!(inbox.drain().await.is_empty());
    mesh.send("central", "sender", "reader", "live", None)
        .await
        .unwrap();
    assert_eq!(body(&inbox.next_delivery().await), "live");
}

async fn a_newer_stream_takes_over_the_inbox(backend: Backend) {
    let mesh = TestMesh::start_with(backend).await;
    mesh.register("reader", "east").await;
    let mut older = mesh.open_inbox("east", "reader", 0).await.unwrap();
    assert!(older.drain().await.is_empty());
    let mut newer = mesh.open_inbox("east", "reader", 0).await.unwrap();
    assert!(newer.drain().await.is_empty());
    match older.next().await {
        Next::Ended(Some(status)) => {
            assert_eq!(status.code(), Code::Aborted);
            assert!(status.message().contains("newer"), "{}", status.message());
        }
        other => panic!("the older stream should end with ABORTED, got {other:?}"),
    }
}

fedmesh_tests::on_every_backend!(
    an_acked_message_is_not_redelivered_and_an_unacked_one_is,
    the_window_bounds_unacknowledged_deliveries,
    a_live_stream_is_woken_by_new_messages,
    a_newer_stream_takes_over_the_inbox,
);
