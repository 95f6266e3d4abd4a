//! Events reach subscribers, on the in-process bus and on RabbitMQ alike.

use fedmesh_common::events::{MESSAGE_ACCEPTED, MESSAGE_DELIVERED};
use fedmesh_common::identity::{AttachIdentity, Identity};
use fedmesh_proto::pb;
use fedmesh_tests::{Bus, within};
use futures_util::future::join_all;

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
            cloudevents: true,
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
    assert_is_cloudevent_of(&accepted);

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

/// The event's CloudEvents protobuf form says what the event says.
fn assert_is_cloudevent_of(event: &pb::Event) {
    use fedmesh_proto::io::cloudevents::v1::cloud_event::Data;
    use fedmesh_proto::io::cloudevents::v1::cloud_event::cloud_event_attribute_value::Attr;
    use prost::Message;
    let cloud_event = event.cloud_event.as_ref().expect("asked for CloudEvents");
    assert_eq!(cloud_event.id, event.event_id);
    assert_eq!(cloud_event.spec_version, "1.0");
    assert_eq!(cloud_event.r#type, event.kind);
    assert_eq!(
        cloud_event.source,
        format!("/fedmesh/{}/gateway", event.region)
    );
    let attribute = |name: &str| {
        cloud_event.attributes[name]
            .attr
            .clone()
            .unwrap_or_else(|| panic!("{name} has a value"))
    };
    assert_eq!(
        attribute("subject"),
        Attr::CeString(event.agency_id.clone())
    );
    assert_eq!(
        attribute("datacontenttype"),
        Attr::CeString("application/protobuf".into())
    );
    assert_eq!(
        attribute("time"),
        Attr::CeTimestamp(event.occurred_at.unwrap())
    );
    let Some(Data::ProtoData(data)) = &cloud_event.data else {
        panic!("protobuf data: {cloud_event:?}");
    };
    assert_eq!(data.type_url, "type.googleapis.com/fedmesh.v1.EventData");
    let data = pb::EventData::decode(data.value.as_slice()).unwrap();
    assert_eq!(data.region, event.region);
    assert_eq!(data.agency_id, event.agency_id);
    assert_eq!(data.message_id, event.message_id);
    assert_eq!(data.attributes, event.attributes);
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
    assert!(event.cloud_event.is_none(), "not asked for");
}

async fn a_slow_subscriber_is_cut_off_without_slowing_the_others(bus: Bus) {
    const BUFFER: usize = 64;
    const SENT: usize = 600;
    let (mesh, _broker) = bus
        .mesh_configured(|options| options.subscriber_buffer = BUFFER)
        .await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "east").await;
    let request = || pb::SubscribeRequest {
        kinds: vec![MESSAGE_ACCEPTED.into()],
        ..Default::default()
    };
    // The slow subscriber's connection takes 1 KiB before it must be read,
    // and it is not read until the end.
    let slow_channel = tonic::transport::Endpoint::from_shared(mesh.notifier_url())
        .unwrap()
        .initial_stream_window_size(1024)
        .initial_connection_window_size(1024)
        .connect_lazy();
    let mut slow = pb::notifications_client::NotificationsClient::with_interceptor(
        slow_channel,
        AttachIdentity::new(&Identity::Operator("slow".into())),
    )
    .subscribe(request())
    .await
    .unwrap()
    .into_inner();
    let mut fast = mesh
        .notifications()
        .subscribe(request())
        .await
        .unwrap()
        .into_inner();

    let sending = async {
        for n in 0..SENT {
            mesh.send("east", "sender", "reader", &n.to_string(), None)
                .await
                .unwrap();
        }
    };
    let reading = async {
        let mut message_ids = std::collections::HashSet::new();
        while message_ids.len() < SENT {
            let event = within("the fast subscriber's events", fast.message())
                .await
                .unwrap()
                .unwrap();
            message_ids.insert(event.message_id);
        }
        message_ids.len()
    };
    let ((), received) = tokio::join!(sending, reading);
    assert_eq!(received, SENT, "the fast subscriber got every event");

    let mut buffered = 0;
    let ended = loop {
        match within("the slow subscriber's stream", slow.message()).await {
            Ok(Some(_)) => buffered += 1,
            Ok(None) => panic!("the slow stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::ResourceExhausted, "{ended:?}");
    assert!(ended.message().contains("behind"), "{}", ended.message());
    assert!(buffered < SENT, "what it held is bounded: {buffered}");
}

async fn a_thousand_events_reach_a_hundred_subscribers_once_each(bus: Bus) {
    const SUBSCRIBERS: usize = 100;
    const EVENTS: usize = 1_000;
    const SENDERS: usize = 10;
    let (mesh, _broker) = bus.mesh().await;
    mesh.register("reader", "east").await;
    for sender in 0..SENDERS {
        mesh.register(&format!("sender-{sender}"), "east").await;
    }
    let mut streams = Vec::new();
    for subscriber in 0..SUBSCRIBERS {
        // Half filter on the agency, half on the kind: two bindings.
        let request = if subscriber % 2 == 0 {
            pb::SubscribeRequest {
                agencies: vec!["reader".into()],
                kinds: vec![MESSAGE_ACCEPTED.into()],
                ..Default::default()
            }
        } else {
            pb::SubscribeRequest {
                kinds: vec![MESSAGE_ACCEPTED.into()],
                ..Default::default()
            }
        };
        let stream = mesh
            .notifications()
            .subscribe(request)
            .await
            .unwrap()
            .into_inner();
        streams.push(stream);
    }
    let sends = (0..SENDERS).map(|sender| {
        let mesh = &mesh;
        async move {
            for n in 0..EVENTS / SENDERS {
                mesh.send(
                    "east",
                    &format!("sender-{sender}"),
                    "reader",
                    &n.to_string(),
                    None,
                )
                .await
                .unwrap();
            }
        }
    });
    let reads = streams.into_iter().map(|mut stream| async move {
        let mut message_ids = std::collections::HashSet::new();
        while message_ids.len() < EVENTS {
            let event = within("the events", stream.message())
                .await
                .unwrap()
                .unwrap();
            assert!(message_ids.insert(event.message_id), "an event came twice");
        }
        message_ids.len()
    });
    let (_, counts) = tokio::join!(join_all(sends), join_all(reads));
    assert!(counts.iter().all(|count| *count == EVENTS), "{counts:?}");
}

fedmesh_tests::on_every_bus!(
    a_thousand_events_reach_a_hundred_subscribers_once_each,
    a_subscriber_sees_message_accepted_and_delivered,
    a_subscriber_sees_registrations_of_its_regions_only,
    a_slow_subscriber_is_cut_off_without_slowing_the_others,
);
