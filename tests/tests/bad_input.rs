//! Bad input gets a precise status and leaves no trace.

use fedmesh_common::identity::Identity;
use fedmesh_proto::pb;
use fedmesh_tests::{TestMesh, expect_code, send_request};
use tonic::Code;

fn register(agency_id: &str, region: &str) -> pb::RegisterAgencyRequest {
    pb::RegisterAgencyRequest {
        agency_id: agency_id.into(),
        region: region.into(),
        display_name: String::new(),
        shard: String::new(),
    }
}

#[tokio::test]
async fn bad_registrations_are_refused_and_store_nothing() {
    let mesh = TestMesh::start().await;
    mesh.register("ministry", "east").await;
    let mut directory = mesh.directory();

    let status = expect_code(
        directory.register_agency(register("Bad_Id", "east")).await,
        Code::InvalidArgument,
    );
    assert!(
        status.message().contains("agency_id"),
        "{}",
        status.message()
    );
    let status = expect_code(
        directory
            .register_agency(register("ministry", "west"))
            .await,
        Code::AlreadyExists,
    );
    assert!(
        status.message().contains("ministry"),
        "{}",
        status.message()
    );
    let status = expect_code(
        directory
            .register_agency(register("newcomer", "mars"))
            .await,
        Code::NotFound,
    );
    assert!(
        status.message().contains("east, west, central"),
        "{}",
        status.message()
    );
    // An agency may not change the directory.
    let mut as_agency = mesh.directory_as(&Identity::Agency("ministry".into()));
    expect_code(
        as_agency.register_agency(register("sneaky", "east")).await,
        Code::PermissionDenied,
    );
    expect_code(
        directory
            .get_agency(pb::GetAgencyRequest {
                agency_id: "nobody".into(),
            })
            .await,
        Code::NotFound,
    );

    assert_eq!(mesh.agency_ids().await, vec!["ministry"]);
    let shown = directory
        .get_agency(pb::GetAgencyRequest {
            agency_id: "ministry".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        shown.agency.unwrap().region,
        "east",
        "the refused duplicate changed nothing"
    );
}

#[tokio::test]
async fn bad_sends_are_refused_and_store_nothing() {
    let mesh = TestMesh::start().await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "west").await;
    let mut exchange = mesh.exchange("east", "sender");

    let mut malformed_kind = send_request("sender", "reader", "x", None);
    malformed_kind.kind = "Not A Kind".into();
    let status = expect_code(exchange.send(malformed_kind).await, Code::InvalidArgument);
    assert!(status.message().contains("kind"), "{}", status.message());

    let mut malformed_recipient = send_request("sender", "reader", "x", None);
    malformed_recipient.recipient_id = "-reader".into();
    expect_code(
        exchange.send(malformed_recipient).await,
        Code::InvalidArgument,
    );

    let mut too_big = send_request("sender", "reader", "", None);
    too_big.payload = vec![0; 1024 * 1024 + 1];
    let status = expect_code(exchange.send(too_big).await, Code::ResourceExhausted);
    assert!(status.message().contains("1048576"), "{}", status.message());

    let status = expect_code(
        exchange
            .send(send_request("sender", "nobody", "x", None))
            .await,
        Code::NotFound,
    );
    assert!(status.message().contains("nobody"), "{}", status.message());

    // Acting as another agency.
    let status = expect_code(
        mesh.exchange("east", "reader")
            .send(send_request("sender", "reader", "x", None))
            .await,
        Code::PermissionDenied,
    );
    assert!(status.message().contains("itself"), "{}", status.message());
    let as_sender = mesh.exchange("west", "sender");
    expect_code(
        fedmesh_tests::Inbox::open(as_sender, "reader", 0)
            .await
            .map(|_| ()),
        Code::PermissionDenied,
    );
    // Sending through a gateway of another region than one's own.
    expect_code(
        mesh.exchange("west", "sender")
            .send(send_request("sender", "reader", "x", None))
            .await,
        Code::FailedPrecondition,
    );

    let mut inbox = mesh.open_inbox("west", "reader", 0).await.unwrap();
    assert!(
        inbox.drain().await.is_empty(),
        "a refused send stored nothing"
    );
    // A good send afterwards gets the first sequence: nothing was used up.
    mesh.send("east", "sender", "reader", "fine", None)
        .await
        .unwrap();
    assert_eq!(inbox.next_delivery().await.sequence, 1);
}

#[tokio::test]
async fn a_relayed_batch_answers_each_message_on_its_own() {
    let mesh = TestMesh::start().await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "west").await;
    let relay_as = |identity: Identity| {
        let channel = fedmesh_common::server::lazy_channel(&mesh.gateway_url("west")).unwrap();
        pb::relay_client::RelayClient::with_interceptor(
            channel,
            fedmesh_common::identity::AttachIdentity::new(&identity),
        )
    };
    let forward = |message_id: &str, kind: &str| pb::ForwardRequest {
        message: Some(pb::Message {
            message_id: message_id.into(),
            sender_id: "sender".into(),
            recipient_id: "reader".into(),
            kind: kind.into(),
            payload: b"relayed".to_vec(),
            origin_region: "east".into(),
            ..Default::default()
        }),
        idempotency_key: None,
        timeout_micros: 0,
    };
    let good = "01a20000-0000-7000-8000-000000000001";
    let batch = pb::ForwardBatchRequest {
        messages: vec![
            forward(good, "note"),
            forward(good, "Bad Kind"),
            forward(good, "note"),
        ],
    };

    // Only gateways relay.
    let refused = relay_as(Identity::Agency("sender".into()))
        .forward_batch(batch.clone())
        .await;
    expect_code(refused, Code::PermissionDenied);

    let results = relay_as(Identity::Gateway("east".into()))
        .forward_batch(batch)
        .await
        .unwrap()
        .into_inner()
        .results;
    let receipt = |index: usize| match &results[index].result {
        Some(pb::forward_result::Result::Receipt(receipt)) => receipt.clone(),
        other => panic!("message {index}: expected a receipt, got {other:?}"),
    };
    assert_eq!(receipt(0).message_id, good);
    match &results[1].result {
        Some(pb::forward_result::Result::Error(error)) => {
            assert_eq!(error.code, Code::InvalidArgument as i32);
            assert!(error.message.contains("kind"), "{}", error.message);
        }
        other => panic!("message 1: expected an error, got {other:?}"),
    }
    // The same id twice in one batch is stored once.
    assert_eq!(receipt(2).message_id, good);
    assert!(
        receipt(0).duplicate != receipt(2).duplicate,
        "exactly one of the two is the duplicate"
    );

    let mut inbox = mesh.open_inbox("west", "reader", 0).await.unwrap();
    assert_eq!(inbox.drain().await.len(), 1);
}

#[tokio::test]
async fn a_subscription_to_no_event_kind_is_refused_with_the_kinds_there_are() {
    let mesh = TestMesh::start().await;
    let refused = mesh
        .notifications()
        .subscribe(pb::SubscribeRequest {
            kinds: vec!["message.acepted".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("message.acepted")
            && refused
                .message()
                .contains("message.accepted, message.delivered"),
        "{}",
        refused.message()
    );
}
