//! Messages between regions: exactly once, in order, across restarts.

use fedmesh_proto::pb;
use fedmesh_tests::{Backend, TestMesh, body, expect_code, send_request, within};
use sqlx::Connection;
use tonic::Code;

async fn an_east_to_west_message_arrives_exactly_once(backend: Backend) {
    let mesh = TestMesh::start_with(backend).await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;

    let receipt = mesh
        .send(
            "east",
            "tax-office",
            "land-registry",
            "deed 42",
            Some("deed-42"),
        )
        .await
        .unwrap();
    assert_eq!(receipt.status(), pb::ReceiptStatus::Stored);
    assert_eq!(receipt.home_region, "west");
    assert!(!receipt.duplicate);

    // The client retries the same send: same receipt, nothing new stored.
    let retried = mesh
        .send(
            "east",
            "tax-office",
            "land-registry",
            "deed 42",
            Some("deed-42"),
        )
        .await
        .unwrap();
    assert_eq!(retried.message_id, receipt.message_id);
    assert!(retried.duplicate);

    let mut inbox = mesh.open_inbox("west", "land-registry", 0).await.unwrap();
    let deliveries = inbox.drain().await;
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    let message = deliveries[0].message.as_ref().unwrap();
    assert_eq!(message.message_id, receipt.message_id);
    assert_eq!(message.sender_id, "tax-office");
    assert_eq!(message.origin_region, "east");
    assert_eq!(body(&deliveries[0]), "deed 42");
}

async fn messages_from_one_sender_arrive_in_send_order(backend: Backend) {
    let mesh = TestMesh::start_with(backend).await;
    mesh.register("ministry", "central").await;
    mesh.register("registry", "east").await;
    mesh.register("town-hall", "east").await;

    // Two senders interleave; each one's messages must keep its order.
    for index in 0..40 {
        mesh.send(
            "central",
            "ministry",
            "registry",
            &format!("m{index}"),
            None,
        )
        .await
        .unwrap();
        mesh.send("east", "town-hall", "registry", &format!("t{index}"), None)
            .await
            .unwrap();
    }

    let mut inbox = mesh.open_inbox("east", "registry", 1000).await.unwrap();
    let deliveries = inbox.drain().await;
    assert_eq!(deliveries.len(), 80);
    let sequences: Vec<u64> = deliveries
        .iter()
        .map(|delivery| delivery.sequence)
        .collect();
    assert_eq!(
        sequences,
        (1..=80).collect::<Vec<u64>>(),
        "sequences are dense and increasing"
    );
    for (sender, prefix) in [("ministry", "m"), ("town-hall", "t")] {
        let bodies: Vec<String> = deliveries
            .iter()
            .filter(|delivery| delivery.message.as_ref().unwrap().sender_id == sender)
            .map(body)
            .collect();
        let expected: Vec<String> = (0..40).map(|index| format!("{prefix}{index}")).collect();
        assert_eq!(bodies, expected, "order of {sender}");
    }
}

async fn a_restart_on_the_same_data_keeps_agencies_and_undelivered_messages(backend: Backend) {
    let mut mesh = TestMesh::start_with(backend).await;
    mesh.register("sender-a", "west").await;
    mesh.register("receiver-b", "central").await;
    let first = mesh
        .send("west", "sender-a", "receiver-b", "before restart", None)
        .await
        .unwrap();
    let second = mesh
        .send(
            "west",
            "sender-a",
            "receiver-b",
            "acked before restart",
            None,
        )
        .await
        .unwrap();

    // Acknowledge only the second one before stopping.
    let mut inbox = mesh.open_inbox("central", "receiver-b", 0).await.unwrap();
    let deliveries = inbox.drain().await;
    assert_eq!(deliveries.len(), 2);
    inbox.ack(&[deliveries[1].sequence]).await;
    inbox.close().await;

    mesh.restart().await;

    assert_eq!(mesh.agency_ids().await, vec!["receiver-b", "sender-a"]);
    let mut inbox = mesh.open_inbox("central", "receiver-b", 0).await.unwrap();
    let deliveries = inbox.drain().await;
    let ids: Vec<&str> = deliveries
        .iter()
        .map(|delivery| delivery.message.as_ref().unwrap().message_id.as_str())
        .collect();
    assert_eq!(ids, vec![first.message_id.as_str()]);
    assert_ne!(first.message_id, second.message_id);

    // The restarted mesh routes new messages too.
    mesh.send("west", "sender-a", "receiver-b", "after restart", None)
        .await
        .unwrap();
    let next = inbox.next_delivery().await;
    assert_eq!(body(&next), "after restart");
    assert_eq!(next.sequence, 3, "sequences continue after the restart");
}

async fn concurrent_senders_are_group_committed_exactly_once_in_their_order(backend: Backend) {
    let mesh = TestMesh::start_with(backend).await;
    mesh.register("reader", "west").await;
    let senders: Vec<String> = (0..16).map(|index| format!("sender-{index}")).collect();
    for (index, sender) in senders.iter().enumerate() {
        let region = ["east", "west", "central"][index % 3];
        mesh.register(sender, region).await;
    }
    let mesh = std::sync::Arc::new(mesh);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, sender) in senders.iter().cloned().enumerate() {
        let mesh = std::sync::Arc::clone(&mesh);
        tasks.spawn(async move {
            let region = ["east", "west", "central"][index % 3];
            for message in 0..25 {
                let key = format!("{sender}-{message}");
                mesh.send(region, &sender, "reader", &key, Some(&key))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }

    let mut inbox = mesh.open_inbox("west", "reader", 10_000).await.unwrap();
    let deliveries = inbox.drain().await;
    assert_eq!(deliveries.len(), 16 * 25);
    for sender in &senders {
        let bodies: Vec<String> = deliveries
            .iter()
            .filter(|delivery| &delivery.message.as_ref().unwrap().sender_id == sender)
            .map(body)
            .collect();
        let expected: Vec<String> = (0..25)
            .map(|message| format!("{sender}-{message}"))
            .collect();
        assert_eq!(
            bodies, expected,
            "messages of {sender}: each once, in order"
        );
    }
}

async fn gateways_keep_routing_from_their_last_topology_without_the_coordinator(backend: Backend) {
    let mut mesh = TestMesh::start_with(backend).await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "west").await;
    mesh.send("east", "sender", "reader", "with coordinator", None)
        .await
        .unwrap();
    for region in ["east", "west"] {
        mesh.gateway_knows(region, &["sender", "reader"]).await;
    }

    mesh.stop_coordinator().await;
    let receipt = mesh
        .send("east", "sender", "reader", "without coordinator", None)
        .await;
    assert_eq!(receipt.unwrap().home_region, "west");
    let mut inbox = mesh.open_inbox("west", "reader", 0).await.unwrap();
    let bodies: Vec<String> = inbox.drain().await.iter().map(body).collect();
    assert_eq!(bodies, ["with coordinator", "without coordinator"]);
}

fedmesh_tests::on_every_backend!(
    an_east_to_west_message_arrives_exactly_once,
    messages_from_one_sender_arrive_in_send_order,
    a_restart_on_the_same_data_keeps_agencies_and_undelivered_messages,
    concurrent_senders_are_group_committed_exactly_once_in_their_order,
    gateways_keep_routing_from_their_last_topology_without_the_coordinator,
    an_idempotency_key_names_one_message_across_the_mesh,
);

async fn an_idempotency_key_names_one_message_across_the_mesh(backend: Backend) {
    let mesh = TestMesh::start_with(backend).await;
    mesh.register("sender", "east").await;
    mesh.register("far", "west").await;
    mesh.register("near", "east").await;
    let send = |recipient: &'static str, body: &'static str, key: &'static str| {
        let mesh = &mesh;
        async move {
            mesh.send("east", "sender", recipient, body, Some(key))
                .await
        }
    };

    // A key first used for a relayed message...
    let first = send("far", "deed 1", "k1").await.unwrap();
    let retried = send("far", "deed 1", "k1").await.unwrap();
    assert_eq!(retried.message_id, first.message_id);
    assert!(retried.duplicate);
    // ... names that message when sent to another shard and region too.
    let refused = expect_code(send("near", "deed 1", "k1").await, Code::FailedPrecondition);
    assert!(
        refused.message().contains(&first.message_id) && refused.message().contains("k1"),
        "{}",
        refused.message()
    );
    expect_code(send("far", "deed 2", "k1").await, Code::FailedPrecondition);

    // A key first used on the sender's own shard holds for relays too.
    let local = send("near", "note", "k2").await.unwrap();
    let refused = expect_code(send("far", "note", "k2").await, Code::FailedPrecondition);
    assert!(
        refused.message().contains(&local.message_id),
        "{}",
        refused.message()
    );
    let again = send("near", "note", "k2").await.unwrap();
    assert_eq!(again.message_id, local.message_id);
    assert!(again.duplicate);

    let mut far = mesh.open_inbox("west", "far", 0).await.unwrap();
    let far_ids: Vec<String> = far
        .drain()
        .await
        .iter()
        .map(|delivery| delivery.message.as_ref().unwrap().message_id.clone())
        .collect();
    assert_eq!(far_ids, vec![first.message_id]);
    let mut near = mesh.open_inbox("east", "near", 0).await.unwrap();
    assert_eq!(near.drain().await.len(), 1);
}

#[tokio::test]
async fn a_send_whose_deadline_passed_before_its_batch_is_not_stored() {
    deadline_honoured("east", std::time::Duration::from_millis(200)).await;
}

/// West is slow: a relayed send whose sender gives up after 50 ms is not
/// stored when west's turn comes, since the deadline travels with it and
/// no hop extends it.
#[tokio::test]
async fn a_deadline_travels_with_a_relayed_send_and_is_honoured_at_its_home() {
    deadline_honoured("west", std::time::Duration::from_millis(50)).await;
}

/// A send from east to a reader homed in `region`, queued at the reader's
/// shard behind a batch that waits on a lock, whose caller gives up after
/// `deadline`: answered DEADLINE_EXCEEDED and never stored.
async fn deadline_honoured(region: &str, deadline: std::time::Duration) {
    let mesh = TestMesh::start_with(Backend::Postgres).await;
    mesh.register("sender", "east").await;
    mesh.register("reader", region).await;
    mesh.gateway_knows("east", &["sender", "reader"]).await;
    mesh.send("east", "sender", "reader", "before", None)
        .await
        .unwrap();
    // Hold the reader's inbox row: the next batch for it waits on the lock.
    let mut holder = sqlx::PgConnection::connect(&mesh.shard_url(&format!("{region}-1")))
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT * FROM inboxes WHERE recipient_id = 'reader' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let blocked = {
        let mut exchange = mesh.exchange("east", "sender");
        tokio::spawn(async move {
            exchange
                .send(send_request("sender", "reader", "blocked", None))
                .await
        })
    };
    fedmesh_tests::someone_waits_on_a_lock(
        &mesh.shard_url(&format!("{region}-1")),
        "the batch to wait on the lock",
    )
    .await;

    // Queued behind it, a send whose caller gives up after `deadline`.
    let mut late = send_request("sender", "reader", "late", None);
    late.idempotency_key = Some("late-1".into());
    let mut request = tonic::Request::new(late);
    request.set_timeout(deadline);
    let failed = mesh.exchange("east", "sender").send(request).await;
    let status = failed.expect_err("the caller's deadline passed");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // A hop passes on what is left of a deadline, and its receiver counts
    // it from when the message reached it: the home's deadline may end
    // later than the sender's by the time the message spent on the way.
    // Nothing tells when that margin has passed; it is far below this.
    if region != "east" {
        tokio::time::sleep(deadline).await;
    }

    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    within("the blocked send", blocked).await.unwrap().unwrap();
    // A send queued after the late one (same inbox, same lane) is answered
    // only once the late one's batch was taken.
    mesh.send("east", "sender", "reader", "after", None)
        .await
        .unwrap();
    let mut inbox = mesh.open_inbox(region, "reader", 0).await.unwrap();
    let bodies: Vec<String> = inbox.drain().await.iter().map(body).collect();
    assert_eq!(
        bodies,
        ["before", "blocked", "after"],
        "the late send was not stored"
    );
}

#[tokio::test]
async fn a_topology_watcher_that_reconnects_receives_only_what_it_missed() {
    let mesh = TestMesh::start().await;
    let mut directory =
        mesh.directory_as(&fedmesh_common::identity::Identity::Gateway("east".into()));
    let mut stream = directory
        .watch_topology(pb::WatchTopologyRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = within("the snapshot", stream.message())
        .await
        .unwrap()
        .unwrap();
    let Some(pb::topology_update::Update::Snapshot(snapshot)) = first.update else {
        panic!("a new watcher starts from a snapshot: {first:?}");
    };
    drop(stream);

    mesh.register("late-comer", "west").await;
    let mut resumed = directory
        .watch_topology(pb::WatchTopologyRequest {
            epoch: snapshot.epoch.clone(),
            from_version: first.version,
        })
        .await
        .unwrap()
        .into_inner();
    let next = within("the missed change", resumed.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.version, first.version + 1, "the next version, no gap");
    let Some(pb::topology_update::Update::Change(change)) = next.update else {
        panic!("a resumed watcher gets changes, not a snapshot: {next:?}");
    };
    assert!(
        matches!(&change.change, Some(pb::topology_change::Change::AgencyUpserted(agency)) if agency.agency_id == "late-comer"),
        "{change:?}"
    );

    // Another run's epoch: a snapshot again.
    let mut other = directory
        .watch_topology(pb::WatchTopologyRequest {
            epoch: "another-run".into(),
            from_version: first.version,
        })
        .await
        .unwrap()
        .into_inner();
    let fresh = within("a snapshot", other.message())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        fresh.update,
        Some(pb::topology_update::Update::Snapshot(_))
    ));
}

#[tokio::test]
async fn the_coordinator_relays_for_a_gateway_only_what_its_region_accepted() {
    let mesh = TestMesh::start().await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "west").await;
    let (channel, attach) = mesh.channel_as(
        &mesh.coordinator_url(),
        &fedmesh_common::identity::Identity::Gateway("east".into()),
    );
    let mut relay = pb::relay_client::RelayClient::with_interceptor(channel, attach);
    let forward = |origin: &str, recipient: &str| {
        fedmesh_tests::forward_request("sender", recipient, "test.note", origin)
    };
    let results = relay
        .forward_batch(pb::ForwardBatchRequest {
            messages: vec![
                forward("east", "reader"),
                forward("west", "reader"),
                forward("east", "nobody"),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let Some(pb::forward_result::Result::Receipt(receipt)) = &results[0].result else {
        panic!("the coordinator did not relay: {results:?}");
    };
    assert_eq!(receipt.home_region, "west");
    let codes: Vec<i32> = results[1..]
        .iter()
        .map(|result| match &result.result {
            Some(pb::forward_result::Result::Error(error)) => error.code,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        codes,
        [Code::PermissionDenied as i32, Code::NotFound as i32],
        "another region's message, an unknown recipient"
    );
    let mut inbox = mesh.open_inbox("west", "reader", 0).await.unwrap();
    let delivered = inbox.next_delivery().await;
    assert_eq!(
        delivered.message.unwrap().message_id,
        receipt.message_id,
        "stored once, in the recipient's home"
    );
    // An agency may not relay through the coordinator.
    let (channel, attach) = mesh.channel_as(
        &mesh.coordinator_url(),
        &fedmesh_common::identity::Identity::Agency("sender".into()),
    );
    let refused = pb::relay_client::RelayClient::with_interceptor(channel, attach)
        .forward_batch(pb::ForwardBatchRequest { messages: vec![] })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
}
