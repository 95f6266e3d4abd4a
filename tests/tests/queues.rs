//! The durable queues of subscriptions, the same on the in-process bus and
//! on RabbitMQ: kept until acknowledged, handed back when a consumer goes,
//! one consumer at a time with strict order, shared otherwise.

use fedmesh_common::amqp::AmqpQueues;
use fedmesh_common::events::{
    AGENCY_REGISTERED, DurableQueues, Event, MESSAGE_ACCEPTED, QueueConsumer, QueueSpec,
    QueuedEvent,
};
use fedmesh_tests::{Bus, TcpProxy, TestBroker, within};

fn spec(strict_order: bool, bindings: &[&str]) -> QueueSpec {
    QueueSpec {
        name: format!("test-{}", uuid::Uuid::now_v7().simple()),
        bindings: bindings.iter().map(|binding| binding.to_string()).collect(),
        strict_order,
        dead_letters: true,
    }
}

fn accepted(region: &str, agency: &str, message_id: &str) -> Event {
    Event::new(MESSAGE_ACCEPTED, region, agency).with_message(message_id)
}

async fn next(consumer: &mut Box<dyn QueueConsumer>) -> QueuedEvent {
    within("a queued event", consumer.next())
        .await
        .expect("the queue is there")
        .expect("consumed")
}

async fn a_queue_keeps_what_it_selects_until_acknowledged(bus: Bus) {
    let (publisher, queues, _broker) = bus.alone().await;
    let spec = spec(true, &["east.*.message.accepted"]);
    queues.declare(spec.clone()).await.unwrap();
    publisher
        .publish(vec![
            accepted("east", "a", "m1"),
            accepted("west", "a", "not-selected"),
            Event::new(AGENCY_REGISTERED, "east", "a"),
            accepted("east", "b", "m2"),
        ])
        .await
        .unwrap();

    let mut first = queues.consume(&spec.name, 10).await.unwrap();
    let m1 = next(&mut first).await;
    assert_eq!(
        (m1.event.message_id.as_deref(), m1.redelivered),
        (Some("m1"), false)
    );
    let m2 = next(&mut first).await;
    assert_eq!(m2.event.message_id.as_deref(), Some("m2"));
    first.ack(m1.tag).await.unwrap();
    drop(first);

    let mut second = queues.consume(&spec.name, 10).await.unwrap();
    let again = next(&mut second).await;
    assert_eq!(
        (again.event.message_id.as_deref(), again.redelivered),
        (Some("m2"), true),
        "what was not acknowledged comes back, and only that"
    );
    assert_eq!(again.event.event_id, m2.event.event_id);
    second.ack(again.tag).await.unwrap();
    publisher
        .publish(vec![accepted("east", "c", "m3")])
        .await
        .unwrap();
    assert_eq!(
        next(&mut second).await.event.message_id.as_deref(),
        Some("m3")
    );

    queues.delete(&spec.name).await.unwrap();
    let after = within("the end of the deleted queue", second.next()).await;
    assert!(!matches!(after, Some(Ok(_))), "{after:?}");
}

async fn strict_order_hands_everything_to_one_consumer_at_a_time(bus: Bus) {
    let (publisher, queues, _broker) = bus.alone().await;
    let spec = spec(true, &["#"]);
    queues.declare(spec.clone()).await.unwrap();
    let mut first = queues.consume(&spec.name, 1).await.unwrap();
    let mut second = queues.consume(&spec.name, 1).await.unwrap();
    publisher
        .publish(vec![
            accepted("east", "a", "m1"),
            accepted("east", "a", "m2"),
        ])
        .await
        .unwrap();
    let m1 = next(&mut first).await;
    first.ack(m1.tag).await.unwrap();
    let m2 = next(&mut first).await;
    assert_eq!(
        (
            m1.event.message_id.as_deref(),
            m2.event.message_id.as_deref()
        ),
        (Some("m1"), Some("m2")),
        "the active consumer gets every event, in order"
    );
    drop(first);
    let handed_over = next(&mut second).await;
    assert_eq!(
        (
            handed_over.event.message_id.as_deref(),
            handed_over.redelivered
        ),
        (Some("m2"), true),
        "the next consumer takes over what the first left"
    );
    queues.delete(&spec.name).await.unwrap();
}

async fn competing_consumers_share_the_events(bus: Bus) {
    let (publisher, queues, _broker) = bus.alone().await;
    let spec = spec(false, &["#"]);
    queues.declare(spec.clone()).await.unwrap();
    let mut first = queues.consume(&spec.name, 1).await.unwrap();
    let mut second = queues.consume(&spec.name, 1).await.unwrap();
    publisher
        .publish(vec![
            accepted("east", "a", "m1"),
            accepted("east", "a", "m2"),
        ])
        .await
        .unwrap();
    let (one, other) = tokio::join!(next(&mut first), next(&mut second));
    let mut ids = vec![
        one.event.message_id.unwrap(),
        other.event.message_id.unwrap(),
    ];
    ids.sort();
    assert_eq!(
        ids,
        vec!["m1", "m2"],
        "each consumer holds one, unacknowledged"
    );
    queues.delete(&spec.name).await.unwrap();
}

async fn dead_letters_stay_in_order_until_replayed_behind_what_waits(bus: Bus) {
    let (publisher, queues, _broker) = bus.alone().await;
    let spec = spec(true, &["#"]);
    queues.declare(spec.clone()).await.unwrap();
    let dead = [accepted("east", "a", "d1"), accepted("east", "a", "d2")];
    for event in &dead {
        queues.dead_letter(&spec.name, event).await.unwrap();
    }
    assert_eq!(queues.dead_letters(&spec.name, 10).await.unwrap(), dead);
    assert_eq!(
        queues.dead_letters(&spec.name, 1).await.unwrap(),
        dead[..1],
        "listing leaves them in place, oldest first"
    );
    publisher
        .publish(vec![accepted("east", "a", "waiting")])
        .await
        .unwrap();

    assert_eq!(queues.replay_dead_letters(&spec.name, 1).await.unwrap(), 1);
    assert_eq!(
        queues.dead_letters(&spec.name, 10).await.unwrap(),
        dead[1..]
    );
    assert_eq!(queues.replay_dead_letters(&spec.name, 10).await.unwrap(), 1);
    assert!(
        queues
            .dead_letters(&spec.name, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let mut consumer = queues.consume(&spec.name, 10).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..3 {
        let queued = next(&mut consumer).await;
        order.push(queued.event.message_id.clone().unwrap());
        consumer.ack(queued.tag).await.unwrap();
    }
    assert_eq!(order, ["waiting", "d1", "d2"]);
    drop(consumer);

    queues.dead_letter(&spec.name, &dead[0]).await.unwrap();
    queues.delete(&spec.name).await.unwrap();
    queues.declare(spec.clone()).await.unwrap();
    assert!(
        queues
            .dead_letters(&spec.name, 10)
            .await
            .unwrap()
            .is_empty(),
        "deleted with the queue"
    );
    queues.delete(&spec.name).await.unwrap();
}

async fn acks_in_any_order_and_grouping_take_exactly_those_events(bus: Bus) {
    let (publisher, queues, _broker) = bus.alone().await;
    let spec = spec(true, &["#"]);
    queues.declare(spec.clone()).await.unwrap();
    let events: Vec<Event> = (1..=6)
        .map(|n| accepted("east", "a", &format!("m{n}")))
        .collect();
    publisher.publish(events).await.unwrap();
    let mut consumer = queues.consume(&spec.name, 10).await.unwrap();
    let mut tags = Vec::new();
    for _ in 0..6 {
        tags.push(next(&mut consumer).await.tag);
    }
    // Not from the oldest, then the oldest alone, then a run from the
    // oldest outstanding with a gap after it.
    consumer.ack_all(&[tags[1], tags[2]]).await.unwrap();
    consumer.ack_all(&[tags[0]]).await.unwrap();
    consumer.ack_all(&[tags[3], tags[5]]).await.unwrap();
    drop(consumer);

    let mut again = queues.consume(&spec.name, 10).await.unwrap();
    let back = next(&mut again).await;
    assert_eq!(
        back.event.message_id.as_deref(),
        Some("m5"),
        "only the one left unacknowledged comes back"
    );
    again.ack_all(&[back.tag]).await.unwrap();
    publisher
        .publish(vec![accepted("east", "a", "m7")])
        .await
        .unwrap();
    assert_eq!(
        next(&mut again).await.event.message_id.as_deref(),
        Some("m7")
    );
    drop(again);
    queues.delete(&spec.name).await.unwrap();
}

#[tokio::test]
async fn queue_operations_on_a_broker_that_stopped_answering_fail_instead_of_hanging() {
    let broker = TestBroker::start().await;
    let proxy = TcpProxy::start(&broker.address()).await;
    let url = broker.settings_through(&proxy).amqp.unwrap();
    let queues = AmqpQueues::new(&url, &broker.exchange, "test")
        .with_timeout(std::time::Duration::from_millis(500));
    let spec = spec(true, &["#"]);
    queues.declare(spec.clone()).await.unwrap();

    proxy.freeze();
    let stalled = within("the operation to give up", queues.declare(spec.clone()))
        .await
        .unwrap_err();
    assert!(stalled.to_string().contains("did not answer"), "{stalled}");
    let listed = within(
        "the operation to give up",
        queues.dead_letters(&spec.name, 10),
    )
    .await
    .unwrap_err();
    assert!(listed.to_string().contains("did not answer"), "{listed}");

    // Once the broker answers again, the next operation connects anew.
    proxy.stop();
    proxy.thaw();
    proxy.resume();
    queues.delete(&spec.name).await.unwrap();
}

fedmesh_tests::on_every_bus!(
    acks_in_any_order_and_grouping_take_exactly_those_events,
    dead_letters_stay_in_order_until_replayed_behind_what_waits,
    a_queue_keeps_what_it_selects_until_acknowledged,
    strict_order_hands_everything_to_one_consumer_at_a_time,
    competing_consumers_share_the_events,
);
