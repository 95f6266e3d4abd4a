//! The Receive stream: acks, redelivery, flow control, takeover.

use std::sync::Arc;

use fedmesh_tests::{Backend, Inbox, Next, TcpProxy, TestMesh, body, send_request};
use tonic::Code;

/// Enough 64 KiB messages that a client that stops reading leaves most of
/// them unsent: far more than HTTP/2 flow control and the stream buffer hold.
const N_LARGE: usize = 200;

async fn send_large_messages(mesh: &TestMesh, region: &str, sender: &str, recipient: &str) {
    let mut exchange = mesh.exchange(region, sender);
    for index in 0..N_LARGE {
        let mut request = send_request(sender, recipient, "", None);
        request.payload = vec![u8::try_from(index % 256).unwrap(); 64 * 1024];
        exchange.send(request).await.unwrap();
    }
}

/// Ends `older` (a stream whose client stopped reading) by opening `newer`,
/// and checks the newer one delivers from the start while the older one
/// ended with ABORTED long before it could deliver everything.
async fn takes_over_a_stalled_stream(mut older: Inbox, open_newer: impl Future<Output = Inbox>) {
    let mut newer = open_newer.await;
    let first = newer.next_delivery().await;
    assert_eq!(first.sequence, 1, "nothing was acknowledged");
    let (n_delivered, status) = older.until_end().await;
    let status = status.expect("the older stream ends with a status");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        n_delivered < N_LARGE,
        "the stalled stream ended at once, it did not deliver all {N_LARGE} first"
    );
}

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

async fn a_newer_stream_takes_over_a_stream_whose_client_stopped_reading(backend: Backend) {
    let mesh = TestMesh::start_with(backend).await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "east").await;
    send_large_messages(&mesh, "east", "sender", "reader").await;
    // The older stream's client reads nothing.
    let older = mesh.open_inbox("east", "reader", 1000).await.unwrap();
    takes_over_a_stalled_stream(older, async {
        mesh.open_inbox("east", "reader", 1000).await.unwrap()
    })
    .await;
}

fedmesh_tests::on_every_backend!(
    an_acked_message_is_not_redelivered_and_an_unacked_one_is,
    the_window_bounds_unacknowledged_deliveries,
    a_live_stream_is_woken_by_new_messages,
    a_newer_stream_takes_over_the_inbox,
    a_newer_stream_takes_over_a_stream_whose_client_stopped_reading,
);

#[tokio::test]
async fn a_newer_stream_on_another_replica_takes_over_a_stalled_stream() {
    let mut mesh = TestMesh::start_with(Backend::Postgres).await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "east").await;
    let replica = mesh.add_gateway("east-1", "east").await;
    send_large_messages(&mesh, "east", "sender", "reader").await;
    let older = mesh.open_inbox("east", "reader", 1000).await.unwrap();
    takes_over_a_stalled_stream(older, async {
        Inbox::open(mesh.exchange_at(&replica, "reader"), "reader", 1000)
            .await
            .unwrap()
    })
    .await;
}

#[tokio::test]
async fn an_agency_has_at_most_the_configured_number_of_streams_open() {
    let tune: fedmesh::dev::TuneGateway = Arc::new(|config| config.max_streams_per_agency = 1);
    let mesh = TestMesh::start_tuned(Backend::Sqlite, Some(tune)).await;
    mesh.register("reader", "east").await;
    let mut first = mesh.open_inbox("east", "reader", 0).await.unwrap();
    assert!(first.drain().await.is_empty());
    let refused = mesh.open_inbox("east", "reader", 0).await.map(|_| ());
    let status = fedmesh_tests::expect_code(refused, Code::ResourceExhausted);
    assert!(
        status.message().contains("at most 1"),
        "{}",
        status.message()
    );
    first.close().await;
    let mut second = mesh.open_inbox("east", "reader", 0).await.unwrap();
    assert!(
        second.drain().await.is_empty(),
        "the cap frees with the stream"
    );
}

#[tokio::test]
async fn a_stream_whose_client_vanished_ends_by_keepalive() {
    let tune: fedmesh::dev::TuneGateway = Arc::new(|config| {
        config.connections.keepalive_interval_ms = 200;
        config.connections.keepalive_timeout_ms = 200;
    });
    let mesh = TestMesh::start_tuned(Backend::Sqlite, Some(tune)).await;
    mesh.register("reader", "east").await;
    let proxy = TcpProxy::start(&mesh.gateway_url("east")).await;
    let mut inbox = Inbox::open(mesh.exchange_at(&proxy.url, "reader"), "reader", 0)
        .await
        .unwrap();
    assert!(inbox.drain().await.is_empty());
    mesh.open_streams_become("east", 1).await;
    // The client's host goes silent without closing anything.
    proxy.freeze();
    mesh.open_streams_become("east", 0).await;
}

#[tokio::test]
async fn a_connection_carries_at_most_the_configured_number_of_calls() {
    let tune: fedmesh::dev::TuneGateway =
        Arc::new(|config| config.connections.max_concurrent_streams = 2);
    let mesh = TestMesh::start_tuned(Backend::Sqlite, Some(tune)).await;
    for reader in ["reader-a", "reader-b", "reader-c"] {
        mesh.register(reader, "east").await;
    }
    // One client connection for the three streams.
    let channel = fedmesh_common::server::lazy_channel(&mesh.gateway_url("east")).unwrap();
    let exchange = |agency: &str| {
        fedmesh_proto::pb::exchange_client::ExchangeClient::with_interceptor(
            channel.clone(),
            fedmesh_common::identity::AttachIdentity::new(
                &fedmesh_common::identity::Identity::Agency(agency.into()),
            ),
        )
    };
    let mut first = Inbox::open(exchange("reader-a"), "reader-a", 0)
        .await
        .unwrap();
    assert!(first.drain().await.is_empty());
    let mut second = Inbox::open(exchange("reader-b"), "reader-b", 0)
        .await
        .unwrap();
    assert!(second.drain().await.is_empty());
    mesh.open_streams_become("east", 2).await;
    // A third call waits for a free stream: the server never holds three.
    let third = tokio::spawn({
        let exchange = exchange("reader-c");
        async move { Inbox::open(exchange, "reader-c", 0).await }
    });
    let mut open_streams = mesh.gateway_open_streams("east");
    let reached_three = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        open_streams.wait_for(|open| *open >= 3),
    )
    .await;
    assert!(reached_three.is_err(), "a third stream was served");
    first.close().await;
    let mut third = third.await.unwrap().unwrap();
    assert!(
        third.drain().await.is_empty(),
        "the third is served once a slot is free"
    );
}
