//! Online moves of an agency between shards and regions: senders keep
//! sending and the agency keeps receiving, and nothing is lost, stored
//! twice or reordered; idempotency keys are still recognised after the
//! move; a cancelled move leaves everything where it was.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use fedmesh_proto::pb;
use fedmesh_tests::{Backend, Next, TestMesh, body, on_every_backend, send_request, within};
use sqlx::Connection;
use tokio::sync::watch;
use tonic::Code;

/// Messages each sender sends.
const PER_SENDER: usize = 120;
/// Receipts each sender has before the move starts.
const BEFORE_MOVE: usize = 30;

/// A mesh of two shards per region whose gateways hold a write for a
/// moving agency as long as a move may take on a busy machine.
async fn mesh(backend: Backend) -> TestMesh {
    TestMesh::start_configured(backend, |options| {
        options.shards_per_region = 2;
        options.tune_gateway = Some(Arc::new(|config| config.move_hold_ms = 25_000));
    })
    .await
}

async fn register_on(mesh: &TestMesh, agency_id: &str, region: &str, shard: &str) {
    mesh.directory()
        .register_agency(pb::RegisterAgencyRequest {
            agency_id: agency_id.into(),
            region: region.into(),
            display_name: String::new(),
            shard: shard.into(),
        })
        .await
        .unwrap();
}

/// Asks for a move of `agency_id` to `shard` of `region` (empty: its own).
async fn start_move(
    mesh: &TestMesh,
    agency_id: &str,
    shard: &str,
    region: &str,
) -> Result<pb::Move, tonic::Status> {
    let response = mesh
        .directory()
        .move_agency(pb::MoveAgencyRequest {
            agency_id: agency_id.into(),
            shard: shard.into(),
            region: region.into(),
        })
        .await?;
    Ok(response.into_inner().r#move.unwrap())
}

/// Where `agency_id` lives, as the directory says.
async fn home(mesh: &TestMesh, agency_id: &str) -> pb::Agency {
    mesh.directory()
        .get_agency(pb::GetAgencyRequest {
            agency_id: agency_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .agency
        .unwrap()
}

/// The move `move_id`, as the coordinator reports it.
async fn get_move(mesh: &TestMesh, move_id: &str) -> pb::Move {
    mesh.directory()
        .get_move(pb::GetMoveRequest {
            move_id: move_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .r#move
        .unwrap()
}

/// Waits until the move is done or cancelled, as the coordinator reports
/// it; returns it.
async fn move_ends(mesh: &TestMesh, move_id: &str) -> pb::Move {
    within("the move to end", async {
        loop {
            let current = get_move(mesh, move_id).await;
            if matches!(
                current.phase(),
                pb::MovePhase::Done | pb::MovePhase::Cancelled
            ) {
                return current;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Sends `PER_SENDER` messages from `sender` (homed in `region`) to
/// `recipient` one after the other, each with its own key; the gateways
/// hold what races the move, so none fails. The receipts, by index; `sent`
/// counts them.
async fn send_all(
    mesh: Arc<TestMesh>,
    region: &'static str,
    sender: &'static str,
    recipient: &'static str,
    sent: watch::Sender<usize>,
) -> Vec<pb::Receipt> {
    let mut receipts = Vec::with_capacity(PER_SENDER);
    for index in 0..PER_SENDER {
        let key = format!("{sender}-{index}");
        let request = send_request(sender, recipient, &format!("{sender}:{index}"), Some(&key));
        let receipt = within(
            "a send to a moving agency",
            mesh.exchange(region, sender).send(request),
        )
        .await
        .unwrap_or_else(|status| panic!("{sender} #{index}: {status:?}"));
        receipts.push(receipt.into_inner().receipt.unwrap());
        sent.send_replace(index + 1);
    }
    receipts
}

/// Reads the inbox of `agency_id` until it has held `expected` distinct
/// messages, acknowledging each, reconnecting (to the gateway of its home
/// region, as the directory says) whenever the stream ends. Every delivery,
/// redeliveries included, in order of arrival.
async fn receive_all(
    mesh: Arc<TestMesh>,
    agency_id: &'static str,
    expected: usize,
) -> Vec<pb::Delivery> {
    let mut deliveries = Vec::new();
    let mut distinct = std::collections::HashSet::new();
    let mut ends = 0;
    while distinct.len() < expected {
        let region = home(&mesh, agency_id).await.region;
        let mut inbox = match mesh.open_inbox(&region, agency_id, 64).await {
            Ok(inbox) => inbox,
            Err(status) => {
                assert!(
                    matches!(status.code(), Code::Unavailable | Code::FailedPrecondition),
                    "{status:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        loop {
            match inbox.next().await {
                Next::Delivery(delivery) => {
                    inbox.ack(&[delivery.sequence]).await;
                    distinct.insert(delivery.message.as_ref().unwrap().message_id.clone());
                    deliveries.push(delivery);
                    if distinct.len() == expected {
                        inbox.close().await;
                        return deliveries;
                    }
                }
                Next::Idle => {}
                Next::Ended(status) => {
                    ends += 1;
                    assert!(ends < 1000, "the stream keeps ending: {status:?}");
                    if let Some(status) = status {
                        assert!(
                            matches!(
                                status.code(),
                                Code::Unavailable | Code::FailedPrecondition | Code::Aborted
                            ),
                            "{status:?}"
                        );
                    }
                    break;
                }
            }
        }
    }
    deliveries
}

/// Moves `registry` (on east-1) to `to_shard` of `to_region` while three
/// senders of two regions send to it and it reads its inbox, and while it
/// also sends (its own keys move with it).
async fn move_under_load(backend: Backend, to_region: &'static str, to_shard: &'static str) {
    let mesh = mesh(backend).await;
    register_on(&mesh, "registry", "east", "east-1").await;
    register_on(&mesh, "notary", "east", "east-2").await;
    register_on(&mesh, "tax-office", "east", "east-1").await;
    register_on(&mesh, "customs", "west", "west-1").await;
    mesh.gateway_knows("east", &["registry", "notary", "tax-office", "customs"])
        .await;
    mesh.gateway_knows("west", &["registry", "notary", "tax-office", "customs"])
        .await;
    // The registry sends with keys before the move.
    let first = mesh
        .send(
            "east",
            "registry",
            "customs",
            "before",
            Some("registry-key"),
        )
        .await
        .unwrap();
    let mesh = Arc::new(mesh);

    let senders = [
        ("east", "notary"),
        ("east", "tax-office"),
        ("west", "customs"),
    ];
    let mut counts = Vec::new();
    let mut sending = Vec::new();
    for (region, sender) in senders {
        let (sent, count) = watch::channel(0);
        counts.push(count);
        sending.push(tokio::spawn(send_all(
            Arc::clone(&mesh),
            region,
            sender,
            "registry",
            sent,
        )));
    }
    let receiving = tokio::spawn(receive_all(
        Arc::clone(&mesh),
        "registry",
        senders.len() * PER_SENDER,
    ));
    for count in &mut counts {
        within(
            "the senders to be under way",
            count.wait_for(|sent| *sent >= BEFORE_MOVE),
        )
        .await
        .unwrap();
    }
    let region = if to_region == "east" { "" } else { to_region };
    let started = start_move(&mesh, "registry", to_shard, region)
        .await
        .unwrap();
    assert_eq!(
        (
            started.from_shard.as_str(),
            started.to_shard.as_str(),
            started.to_region.as_str()
        ),
        ("east-1", to_shard, to_region)
    );
    let ended = move_ends(&mesh, &started.move_id).await;
    assert_eq!(ended.phase(), pb::MovePhase::Done, "{ended:?}");
    let moved = home(&mesh, "registry").await;
    assert_eq!(moved.version, 3, "registered, moving, moved: {moved:?}");
    assert_eq!(
        (moved.region.as_str(), moved.shard.as_str(), moved.moving),
        (to_region, to_shard, false)
    );

    let mut receipts = BTreeMap::new();
    for (task, (_, sender)) in sending.into_iter().zip(senders) {
        receipts.insert(sender, task.await.unwrap());
    }
    let deliveries = receiving.await.unwrap();

    // Every message is in the inbox once: one sequence per message id, one
    // message id per sequence, and per sender in the order sent.
    let mut sequence_of: HashMap<String, u64> = HashMap::new();
    let mut id_at: HashMap<u64, String> = HashMap::new();
    let mut by_sender: BTreeMap<String, Vec<(usize, u64)>> = BTreeMap::new();
    for delivery in &deliveries {
        let message = delivery.message.as_ref().unwrap();
        let known = sequence_of.insert(message.message_id.clone(), delivery.sequence);
        let again = id_at.insert(delivery.sequence, message.message_id.clone());
        if known.is_some() || again.is_some() {
            assert_eq!(
                known,
                Some(delivery.sequence),
                "message stored twice: {message:?}"
            );
            assert_eq!(again.as_deref(), Some(message.message_id.as_str()));
            continue;
        }
        let text = body(delivery);
        let (sender, index) = text.split_once(':').unwrap();
        by_sender
            .entry(sender.to_string())
            .or_default()
            .push((index.parse().unwrap(), delivery.sequence));
    }
    assert_eq!(sequence_of.len(), senders.len() * PER_SENDER);
    for (sender, receipts) in &receipts {
        let mut seen = by_sender.remove(*sender).unwrap();
        seen.sort_by_key(|(_, sequence)| *sequence);
        let order: Vec<usize> = seen.iter().map(|(index, _)| *index).collect();
        assert_eq!(
            order,
            (0..PER_SENDER).collect::<Vec<_>>(),
            "{sender}'s order"
        );
        for receipt in receipts {
            assert!(
                sequence_of.contains_key(&receipt.message_id),
                "{receipt:?} not delivered"
            );
        }
    }

    // Keys sent to the registry before the move, and its own, are
    // recognised at its new home.
    let retried = mesh
        .send(
            "east",
            "tax-office",
            "registry",
            "tax-office:0",
            Some("tax-office-0"),
        )
        .await
        .unwrap();
    assert!(retried.duplicate, "{retried:?}");
    assert_eq!(retried.message_id, receipts["tax-office"][0].message_id);
    let own = mesh
        .send(
            to_region,
            "registry",
            "customs",
            "before",
            Some("registry-key"),
        )
        .await
        .unwrap();
    assert!(own.duplicate, "{own:?}");
    assert_eq!(own.message_id, first.message_id);
    let inbox = mesh
        .exchange(to_region, "registry")
        .get_inbox(pb::GetInboxRequest {
            agency_id: "registry".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inbox.unacknowledged, 0, "{inbox:?}");
    assert_eq!(
        inbox.last_sequence,
        u64::try_from(senders.len() * PER_SENDER).unwrap(),
        "sequences went on from where they were, none taken twice"
    );
}

async fn an_agency_moved_to_another_shard_under_load_loses_nothing(backend: Backend) {
    move_under_load(backend, "east", "east-2").await;
}

async fn an_agency_moved_to_another_region_under_load_loses_nothing(backend: Backend) {
    move_under_load(backend, "west", "west-2").await;
}

on_every_backend!(
    an_agency_moved_to_another_shard_under_load_loses_nothing,
    an_agency_moved_to_another_region_under_load_loses_nothing,
);

/// A move whose target shard cannot be written stays before its cut-over;
/// cancelled, it leaves the agency where it was, with every message, and
/// the target holds nothing of it.
#[tokio::test]
async fn a_cancelled_move_leaves_everything_where_it_was() {
    let mesh = TestMesh::start_configured(Backend::Postgres, |options| {
        options.shards_per_region = 2;
        options.tune_gateway = Some(Arc::new(|config| config.move_hold_ms = 100));
    })
    .await;
    register_on(&mesh, "registry", "east", "east-1").await;
    register_on(&mesh, "notary", "east", "east-1").await;
    mesh.gateway_knows("east", &["registry", "notary"]).await;
    for index in 0..5 {
        mesh.send(
            "east",
            "notary",
            "registry",
            &format!("n{index}"),
            Some(&format!("k{index}")),
        )
        .await
        .unwrap();
    }
    let target = mesh.shard_url("east-2");
    let target_name = target.rsplit('/').next().unwrap().to_string();
    let admin = sqlx::PgPool::connect(&fedmesh_common::testing::postgres_server_url())
        .await
        .unwrap();
    // The target shard's database refuses connections: the copy fails and
    // is retried, the move stays before its cut-over.
    sqlx::query(&format!(
        "ALTER DATABASE \"{target_name}\" ALLOW_CONNECTIONS false"
    ))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&target_name)
        .execute(&admin)
        .await
        .unwrap();
    let started = start_move(&mesh, "registry", "east-2", "").await.unwrap();
    within("the copy to fail", async {
        loop {
            let current = get_move(&mesh, &started.move_id).await;
            if !current.last_error.is_empty() {
                assert_eq!(current.phase(), pb::MovePhase::Copying);
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Operators see it under way.
    let under_way = mesh
        .directory()
        .list_moves(pb::ListMovesRequest {})
        .await
        .unwrap()
        .into_inner()
        .moves;
    assert_eq!(under_way.len(), 1);
    assert_eq!(under_way[0].move_id, started.move_id);
    assert!(!under_way[0].last_error.is_empty(), "{under_way:?}");
    // Meanwhile a send to it waits, then is told to retry.
    let held = mesh
        .send("east", "notary", "registry", "held", Some("held"))
        .await;
    assert_eq!(held.unwrap_err().code(), Code::Unavailable);
    // ... its target shard cannot be removed ...
    let remove = mesh
        .directory()
        .remove_shard(pb::RemoveShardRequest {
            name: "east-2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(remove.code(), Code::FailedPrecondition, "{remove:?}");
    assert!(remove.message().contains("move under way"), "{remove:?}");
    // ... and a moving agency cannot be deregistered.
    let deregister = mesh
        .directory()
        .deregister_agency(pb::DeregisterAgencyRequest {
            agency_id: "registry".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        deregister.code(),
        Code::FailedPrecondition,
        "{deregister:?}"
    );

    let cancelling = mesh
        .directory()
        .cancel_move(pb::CancelMoveRequest {
            move_id: started.move_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .r#move
        .unwrap();
    assert_eq!(cancelling.phase(), pb::MovePhase::Cancelling);
    sqlx::query(&format!(
        "ALTER DATABASE \"{target_name}\" ALLOW_CONNECTIONS true"
    ))
    .execute(&admin)
    .await
    .unwrap();
    let ended = move_ends(&mesh, &started.move_id).await;
    assert_eq!(ended.phase(), pb::MovePhase::Cancelled, "{ended:?}");
    let under_way = mesh
        .directory()
        .list_moves(pb::ListMovesRequest {})
        .await
        .unwrap()
        .into_inner()
        .moves;
    assert!(under_way.is_empty(), "{under_way:?}");
    let stayed = home(&mesh, "registry").await;
    assert_eq!(
        (stayed.region.as_str(), stayed.shard.as_str(), stayed.moving),
        ("east", "east-1", false)
    );
    let again = mesh
        .directory()
        .cancel_move(pb::CancelMoveRequest {
            move_id: started.move_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .r#move
        .unwrap();
    assert_eq!(
        again.phase(),
        pb::MovePhase::Cancelled,
        "cancelling twice changes nothing"
    );

    // Everything is where it was: the next send takes the next sequence,
    // the stream delivers every message, a key sent before is recognised.
    within("the gateway to see the move cancelled", async {
        let mut topology = mesh.gateway_topology("east");
        topology
            .wait_for(|topology| {
                topology
                    .agencies
                    .get("registry")
                    .is_some_and(|home| !home.moving)
            })
            .await
            .unwrap();
    })
    .await;
    let next = mesh
        .send("east", "notary", "registry", "n5", Some("k5"))
        .await
        .unwrap();
    let retried = mesh
        .send("east", "notary", "registry", "n0", Some("k0"))
        .await
        .unwrap();
    assert!(retried.duplicate);
    let mut inbox = mesh.open_inbox("east", "registry", 64).await.unwrap();
    let delivered: Vec<(u64, String)> = inbox
        .drain()
        .await
        .iter()
        .map(|delivery| (delivery.sequence, body(delivery)))
        .collect();
    let expected: Vec<(u64, String)> = (0..6)
        .map(|index| (index + 1, format!("n{index}")))
        .collect();
    assert_eq!(delivered, expected);
    assert_eq!(
        delivered.last().map(|(_, _)| next.message_id.clone()),
        Some(next.message_id)
    );
    let target = sqlx::PgPool::connect(&target).await.unwrap();
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM messages WHERE recipient_id = 'registry') \
         + (SELECT count(*) FROM inboxes WHERE recipient_id = 'registry')",
    )
    .fetch_one(&target)
    .await
    .unwrap();
    assert_eq!(left, 0, "the target keeps nothing of a cancelled move");
}

/// Bad move requests are refused with a status that says what to fix, and
/// change nothing.
#[tokio::test]
async fn a_move_that_cannot_be_made_is_refused_precisely() {
    let mesh = mesh(Backend::Sqlite).await;
    register_on(&mesh, "registry", "east", "east-1").await;

    let cases = [
        ("registry", "", "", Code::InvalidArgument, "name a shard"),
        (
            "registry",
            "east-1",
            "",
            Code::FailedPrecondition,
            "already",
        ),
        ("registry", "west-1", "", Code::NotFound, "west-1"),
        ("registry", "", "north", Code::NotFound, "north"),
        ("nobody", "east-2", "", Code::NotFound, "nobody"),
        ("Bad Id", "east-2", "", Code::InvalidArgument, "agency_id"),
    ];
    for (agency_id, shard, region, code, says) in cases {
        let status = start_move(&mesh, agency_id, shard, region)
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            code,
            "{agency_id} {shard} {region}: {status:?}"
        );
        assert!(status.message().contains(says), "{status:?}");
    }
    let unknown = mesh
        .directory()
        .get_move(pb::GetMoveRequest {
            move_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let malformed = mesh
        .directory()
        .cancel_move(pb::CancelMoveRequest {
            move_id: "not-a-move".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    let agency = home(&mesh, "registry").await;
    assert_eq!((agency.shard.as_str(), agency.moving), ("east-1", false));
    // An agency cannot move twice at once.
    let first = start_move(&mesh, "registry", "east-2", "").await.unwrap();
    // Under way, or done already (then the agency is on east-2): either way
    // a second move to east-2 is refused.
    let second = start_move(&mesh, "registry", "east-2", "").await;
    assert_eq!(second.unwrap_err().code(), Code::FailedPrecondition);
    move_ends(&mesh, &first.move_id).await;
}

/// A move whose copy hangs (its source inbox row is locked) holds up no
/// other: another agency's move is done meanwhile, and the first one ends
/// once the lock goes.
#[tokio::test]
async fn a_move_that_hangs_holds_up_no_other() {
    let mesh = mesh(Backend::Postgres).await;
    register_on(&mesh, "registry", "east", "east-1").await;
    register_on(&mesh, "notary", "east", "east-1").await;
    mesh.gateway_knows("east", &["registry", "notary"]).await;
    for recipient in ["registry", "notary"] {
        mesh.send("east", "notary", recipient, "hello", None)
            .await
            .unwrap();
    }
    let mut holder = sqlx::PgConnection::connect(&mesh.shard_url("east-1"))
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT * FROM inboxes WHERE recipient_id = 'registry' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let hanging = start_move(&mesh, "registry", "east-2", "").await.unwrap();
    fedmesh_tests::someone_waits_on_a_lock(
        &mesh.shard_url("east-1"),
        "the copy to wait on the lock",
    )
    .await;
    let other = start_move(&mesh, "notary", "east-2", "").await.unwrap();
    let done = move_ends(&mesh, &other.move_id).await;
    assert_eq!(done.phase(), pb::MovePhase::Done, "{done:?}");
    let still = get_move(&mesh, &hanging.move_id).await;
    assert_eq!(still.phase(), pb::MovePhase::Copying, "{still:?}");
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let done = move_ends(&mesh, &hanging.move_id).await;
    assert_eq!(done.phase(), pb::MovePhase::Done, "{done:?}");
    assert_eq!(done.messages_copied, 1);
}
