//! Events reach subscribers, on the in-process bus and on RabbitMQ alike.

use fedmesh_common::events::{MESSAGE_ACCEPTED, MESSAGE_DELIVERED};
use fedmesh_proto::pb;
use fedmesh_tests::{Bus, within};

async fn a_subscriber_sees_message_accepted_and_delivered(bus: Bus) {
    let (mesh, _broker) = bus.mesh().await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "west").await;
    let mut events = mesh
        .notifications()
        .subscribe(pb::SubscribeRequest {
            agencies: vec!["reader".into()],
            kinds: vec![MESSAGE_ACCEPTED.into(), MESSAGE_DELIVERED.into()],
            regions: vec![],
        })
        .await
        .unwrap()
        .into_inner();

    let receipt = mesh
        .send("east", "sender", "reader", "watched", None)
        .await
        .unwrap();
    let accepted = within("message.accepted", events.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(accepted.kind, MESSAGE_ACCEPTED);
    assert_eq!(accepted.message_id, receipt.message_id);
    assert_eq!(accepted.region, "west");
    assert_eq!(
        accepted.attributes.get("sender").map(String::as_str),
        Some("sender")
    );

    let mut inbox = mesh.open_inbox("west", "reader", 0).await.unwrap();
    let delivery = inbox.next_delivery().await;
    inbox.ack(&[delivery.sequence]).await;
    let delivered = within("message.delivered", events.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivered.kind, MESSAGE_DELIVERED);
    assert_eq!(delivered.message_id, receipt.message_id);
    assert_ne!(delivered.event_id, accepted.event_id);
}

async fn a_subscriber_sees_registrations_of_its_regions_only(bus: Bus) {
    let (mesh, _broker) = bus.mesh().await;
    let mut events = mesh
        .notifications()
        .subscribe(pb::SubscribeRequest {
            regions: vec!["central".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    mesh.register("elsewhere", "east").await;
    mesh.register("ministry", "central").await;
    let event = within("agency.registered", events.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.kind, fedmesh_common::events::AGENCY_REGISTERED);
    assert_eq!(
        event.agency_id, "ministry",
        "the east registration was filtered out"
    );
    assert_eq!(
        event.attributes.get("shard").map(String::as_str),
        Some("central-1")
    );
}

fedmesh_tests::on_every_bus!(
    a_subscriber_sees_message_accepted_and_delivered,
    a_subscriber_sees_registrations_of_its_regions_only,
);
