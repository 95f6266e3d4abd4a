//! The mesh's events on RabbitMQ: what they look like to any consumer of
//! the exchange, and that none is lost while the broker is away.

use fedmesh_common::events::{AGENCY_REGISTERED, CLOUDEVENTS_JSON, MESSAGE_ACCEPTED};
use fedmesh_proto::pb;
use fedmesh_tests::{Backend, TcpProxy, TestBroker, TestMesh, within};
use tonic::Code;

#[tokio::test]
async fn events_on_rabbitmq_are_persistent_cloudevents_routed_by_region_agency_and_kind() {
    let broker = TestBroker::start().await;
    let mut reader_events = broker.queue("west.reader.#").await;
    let mut registrations = broker.queue("*.*.agency.registered").await;
    let mesh = TestMesh::start_on_bus(Backend::Sqlite, broker.settings()).await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "west").await;

    let first = registrations.next_event().await;
    assert_eq!(
        (first.kind.as_str(), first.agency_id.as_str()),
        (AGENCY_REGISTERED, "sender")
    );
    let registered = reader_events.next_delivery().await;
    assert_eq!(
        registered.routing_key.as_str(),
        "west.reader.agency.registered"
    );

    let receipt = mesh
        .send("east", "sender", "reader", "hello", None)
        .await
        .unwrap();
    let accepted = reader_events.next_delivery().await;
    assert_eq!(
        accepted.routing_key.as_str(),
        "west.reader.message.accepted"
    );
    let properties = &accepted.properties;
    assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
    assert_eq!(
        properties
            .content_type()
            .as_ref()
            .map(|value| value.as_str()),
        Some(CLOUDEVENTS_JSON)
    );
    let body: serde_json::Value = serde_json::from_slice(&accepted.data).unwrap();
    assert_eq!(body["specversion"], "1.0");
    assert_eq!(body["type"], MESSAGE_ACCEPTED);
    assert_eq!(body["source"], "/fedmesh/west/gateway");
    assert_eq!(body["subject"], "reader");
    assert_eq!(body["datacontenttype"], "application/json");
    assert_eq!(body["data"]["message_id"], receipt.message_id.as_str());
    assert_eq!(body["data"]["attributes"]["sender"], "sender");
    let time = body["time"].as_str().unwrap();
    assert!(
        time.parse::<prost_types::Timestamp>().is_ok(),
        "RFC 3339 time: {time}"
    );
    assert_eq!(
        properties.message_id().as_ref().map(|value| value.as_str()),
        body["id"].as_str(),
        "the AMQP message id is the event id, for consumers to deduplicate by"
    );
    assert_ne!(body["id"], serde_json::json!(null));
}

/// Rows in the outbox of the SQLite shard at `url`.
async fn outbox_rows(url: &str) -> i64 {
    use sqlx::Connection;
    let mut connection = sqlx::SqliteConnection::connect(url).await.unwrap();
    sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&mut connection)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_event_written_while_the_broker_is_down_is_published_once_it_is_back() {
    let broker = TestBroker::start().await;
    let mut accepted = broker.queue("*.*.message.accepted").await;
    let proxy = TcpProxy::start(&broker.address()).await;
    let mesh = TestMesh::start_on_bus(Backend::Sqlite, broker.settings_through(&proxy)).await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "west").await;

    proxy.stop();
    let receipt = mesh
        .send("east", "sender", "reader", "while down", None)
        .await
        .unwrap();
    assert_eq!(
        receipt.status,
        pb::ReceiptStatus::Stored as i32,
        "durable without the broker"
    );
    assert!(
        outbox_rows(&mesh.shard_url("west-1")).await > 0,
        "the event waits in the outbox"
    );

    proxy.resume();
    let event = accepted.next_event().await;
    assert_eq!(
        event.message_id.as_deref(),
        Some(receipt.message_id.as_str())
    );
    assert_eq!(event.agency_id, "reader");
}

#[tokio::test]
async fn a_notifier_that_loses_the_broker_tells_its_subscribers_and_serves_again_once_back() {
    let broker = TestBroker::start().await;
    let proxy = TcpProxy::start(&broker.address()).await;
    let mesh = TestMesh::start_on_bus(Backend::Sqlite, broker.settings_through(&proxy)).await;
    let subscribe = || {
        let mut notifications = mesh.notifications();
        async move {
            notifications
                .subscribe(pb::SubscribeRequest {
                    kinds: vec![AGENCY_REGISTERED.into()],
                    ..Default::default()
                })
                .await
        }
    };
    let mut events = subscribe().await.unwrap().into_inner();

    proxy.stop();
    let ended = within("the subscription to end", events.message())
        .await
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unavailable);
    assert!(
        ended.message().contains("not connected to the event bus")
            && ended.message().contains("may have been missed"),
        "{}",
        ended.message()
    );
    let refused = subscribe().await.unwrap_err();
    assert_eq!(
        refused.code(),
        Code::Unavailable,
        "no feed, no subscription"
    );

    proxy.resume();
    // A subscriber retries, as told, until the notifier consumes again.
    let mut events = within("the notifier to consume again", async {
        loop {
            match subscribe().await {
                Ok(events) => break events.into_inner(),
                Err(status) if status.code() == Code::Unavailable => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(status) => panic!("unexpected {status:?}"),
            }
        }
    })
    .await;
    mesh.register("after", "central").await;
    let event = within("agency.registered", events.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.agency_id, "after");
}

#[tokio::test]
async fn a_replica_consumes_once_what_its_subscribers_want_and_keeps_a_binding_while_one_holds_it()
{
    use fedmesh_common::amqp::{AmqpPublisher, AmqpSource};
    use fedmesh_common::events::{Event, EventPublisher, EventSource};

    let broker = TestBroker::start().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let source = AmqpSource::start(&broker.url, &broker.exchange, "test", 64, shutdown.clone());
    within("the source to consume", source.consuming()).await;
    let publisher = AmqpPublisher::new(&broker.url, &broker.exchange, "test");
    let east = vec!["east.*.#".to_string()];
    let first = source.subscribe(east.clone()).await.unwrap();
    let mut second = source.subscribe(east).await.unwrap();

    let event = |region: &str, agency: &str| Event::new(AGENCY_REGISTERED, region, agency);
    publisher
        .publish(vec![event("west", "unwanted"), event("east", "wanted")])
        .await
        .unwrap();
    let received = within("the east event", second.events.recv())
        .await
        .unwrap();
    assert_eq!(
        received.agency_id, "wanted",
        "no subscriber wants west: it is not bound, so the broker does not send it"
    );

    drop(first);
    publisher
        .publish(vec![event("east", "still")])
        .await
        .unwrap();
    let received = within("the next east event", second.events.recv())
        .await
        .unwrap();
    assert_eq!(
        received.agency_id, "still",
        "bound while the second subscriber holds it"
    );
    shutdown.cancel();
}
