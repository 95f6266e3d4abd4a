//! Coordinator replicas sharing one control database on PostgreSQL: a
//! change made through one reaches the watchers of the others.

use fedmesh_common::identity::{AttachIdentity, Identity};
use fedmesh_common::testing::TestDatabase;
use fedmesh_coordinator::{CoordinatorConfig, RegionConfig};
use fedmesh_proto::pb;
use fedmesh_tests::within;
use tokio_util::sync::CancellationToken;

type Directory = pb::directory_client::DirectoryClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AttachIdentity>,
>;

/// Starts a coordinator replica on `database`; its URL.
async fn replica(database: &TestDatabase, shutdown: &CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut config = CoordinatorConfig::new(
        vec![RegionConfig {
            name: "east".into(),
            shards: vec!["east-1".into()],
        }],
        database.url.clone(),
    );
    config.dev_identity = true;
    config.sync_ms = 100;
    let shutdown = shutdown.clone();
    tokio::spawn(async move { fedmesh_coordinator::run(config, listener, None, shutdown).await });
    url
}

fn directory(url: &str, identity: &Identity) -> Directory {
    pb::directory_client::DirectoryClient::with_interceptor(
        fedmesh_common::server::lazy_channel(url).unwrap(),
        AttachIdentity::new(identity),
    )
}

/// Waits on `updates` for a change `wanted` accepts.
async fn change_seen(
    updates: &mut tonic::Streaming<pb::TopologyUpdate>,
    what: &str,
    wanted: impl Fn(&pb::topology_change::Change) -> bool,
) {
    within(what, async {
        loop {
            let update = updates.message().await.unwrap().unwrap();
            if let Some(pb::topology_update::Update::Change(pb::TopologyChange {
                change: Some(change),
            })) = &update.update
                && wanted(change)
            {
                return;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_change_through_one_replica_reaches_the_watchers_of_another() {
    let database = TestDatabase::create().await;
    let shutdown = CancellationToken::new();
    let first = replica(&database, &shutdown).await;
    let second = replica(&database, &shutdown).await;
    let operator = Identity::Operator("test".into());
    let gateway = Identity::Gateway("east".into());
    // A watcher of the second replica, from a snapshot (retried while the
    // replica starts).
    let mut updates = within("the second replica to serve", async {
        loop {
            if let Ok(response) = directory(&second, &gateway)
                .watch_topology(pb::WatchTopologyRequest::default())
                .await
            {
                return response.into_inner();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let _snapshot = updates.message().await.unwrap().unwrap();

    within("the first replica to register", async {
        loop {
            let registered = directory(&first, &operator)
                .register_agency(pb::RegisterAgencyRequest {
                    agency_id: "harbour".into(),
                    region: "east".into(),
                    display_name: String::new(),
                    shard: String::new(),
                })
                .await;
            if registered.is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    change_seen(&mut updates, "the registration on the other replica", |change| {
        matches!(change, pb::topology_change::Change::AgencyUpserted(agency) if agency.agency_id == "harbour")
    })
    .await;

    // A gateway reporting to the first replica is known to the second.
    directory(&first, &gateway)
        .report_gateway(pb::ReportGatewayRequest {
            gateway: Some(pb::Gateway {
                gateway_id: "east-0".into(),
                region: "east".into(),
                address: "http://127.0.0.1:1".into(),
                load: None,
                last_seen: None,
            }),
        })
        .await
        .unwrap();
    change_seen(&mut updates, "the gateway on the other replica", |change| {
        matches!(change, pb::topology_change::Change::GatewayUpserted(gateway) if gateway.gateway_id == "east-0")
    })
    .await;

    // And so is a notifier.
    directory(&first, &Identity::Notifier)
        .report_notifier(pb::ReportNotifierRequest {
            notifier: Some(pb::Notifier {
                notifier_id: "notifier-0".into(),
                address: "http://127.0.0.1:2".into(),
                last_seen: None,
            }),
        })
        .await
        .unwrap();
    change_seen(&mut updates, "the notifier on the other replica", |change| {
        matches!(change, pb::topology_change::Change::NotifierUpserted(notifier) if notifier.notifier_id == "notifier-0")
    })
    .await;

    // A grant through the second replica; a deregistration through the
    // first: both reach the second's watchers.
    directory(&second, &operator)
        .grant_access(pb::GrantAccessRequest {
            sender_id: String::new(),
            recipient_id: "harbour".into(),
            kinds: vec![],
        })
        .await
        .unwrap();
    change_seen(&mut updates, "the grant", |change| {
        matches!(change, pb::topology_change::Change::GrantAdded(_))
    })
    .await;
    directory(&first, &operator)
        .deregister_agency(pb::DeregisterAgencyRequest {
            agency_id: "harbour".into(),
        })
        .await
        .unwrap();
    change_seen(&mut updates, "the deregistration", |change| {
        matches!(change, pb::topology_change::Change::AgencyRemoved(id) if id == "harbour")
    })
    .await;
    let on_second = directory(&second, &operator)
        .get_agency(pb::GetAgencyRequest {
            agency_id: "harbour".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(on_second.code(), tonic::Code::NotFound);
    shutdown.cancel();
}

#[tokio::test]
async fn a_gateway_moves_to_the_next_coordinator_when_one_does_not_answer() {
    // Every gateway is given a coordinator that is not there first.
    let mesh = fedmesh_tests::TestMesh::start_tuned(
        fedmesh_tests::Backend::Sqlite,
        Some(std::sync::Arc::new(
            |config: &mut fedmesh_gateway::GatewayConfig| {
                config.coordinator = format!("http://127.0.0.1:1,{}", config.coordinator);
            },
        )),
    )
    .await;
    // The mesh started: the gateways found each other through the replica
    // that answers. A registration reaches them, and a relayed send works.
    mesh.register("sender", "east").await;
    mesh.register("reader", "west").await;
    mesh.gateway_knows("east", &["sender", "reader"]).await;
    mesh.send("east", "sender", "reader", "through the second", None)
        .await
        .expect("a relayed send");
}

/// Starts coordinator replica `id` of east (shards east-1 and east-2) on
/// `database`, with a leader lease of 1 s retried every 100 ms; its URL.
async fn leasing_replica(
    database: &TestDatabase,
    id: &str,
    shutdown: &CancellationToken,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut config = CoordinatorConfig::new(
        vec![RegionConfig {
            name: "east".into(),
            shards: vec!["east-1".into(), "east-2".into()],
        }],
        database.url.clone(),
    );
    config.dev_identity = true;
    config.sync_ms = 100;
    config.id = Some(id.to_string());
    config.lease.lease_ms = 1_000;
    config.lease.lease_renew_ms = 300;
    config.lease.lease_retry_ms = 100;
    let shutdown = shutdown.clone();
    tokio::spawn(async move { fedmesh_coordinator::run(config, listener, None, shutdown).await });
    url
}

/// The replica holding the leader lease, as the replica at `url` sees it.
async fn leader_seen_by(url: &str) -> Option<String> {
    let mut updates = directory(url, &Identity::Operator("root".into()))
        .watch_topology(pb::WatchTopologyRequest::default())
        .await
        .ok()?
        .into_inner();
    match updates.message().await.ok()??.update? {
        pb::topology_update::Update::Snapshot(snapshot) => {
            snapshot.leader.map(|leader| leader.holder)
        }
        pb::topology_update::Update::Change(_) => None,
    }
}

/// Three replicas and a gateway of east reporting to all of them; the
/// leader dies while a move waits on its target shard's database. Another
/// replica leads within the lease's duration and a bit, and finishes the
/// move its predecessor began: nothing the agency held is lost.
#[tokio::test]
async fn the_next_leader_finishes_a_move_its_predecessor_began() {
    let control = TestDatabase::create().await;
    let shards = [TestDatabase::create().await, TestDatabase::create().await];
    let mut replicas = Vec::new();
    for id in ["c1", "c2", "c3"] {
        let stop = CancellationToken::new();
        replicas.push((id, leasing_replica(&control, id, &stop).await, stop));
    }
    let coordinators: Vec<String> = replicas.iter().map(|(_, url, _)| url.clone()).collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_url = format!("http://{}", listener.local_addr().unwrap());
    let mut config = fedmesh_gateway::GatewayConfig::new(
        "east-0",
        "east",
        vec![
            fedmesh_gateway::ShardConfig::new("east-1", shards[0].url.clone()),
            fedmesh_gateway::ShardConfig::new("east-2", shards[1].url.clone()),
        ],
        coordinators.join(","),
    );
    config.dev_identity = true;
    let gateway_stop = CancellationToken::new();
    let gateway = fedmesh_gateway::start(config, listener, None, gateway_stop.clone())
        .await
        .unwrap();
    let operator = Identity::Operator("root".into());
    directory(&coordinators[0], &operator)
        .register_agency(pb::RegisterAgencyRequest {
            agency_id: "registry".into(),
            region: "east".into(),
            display_name: String::new(),
            shard: "east-1".into(),
        })
        .await
        .unwrap();
    let mut topology = gateway.topology.clone();
    within("the gateway to know the registry", async {
        topology
            .wait_for(|topology| topology.agencies.contains_key("registry"))
            .await
            .unwrap();
    })
    .await;
    let exchange = pb::exchange_client::ExchangeClient::with_interceptor(
        fedmesh_common::server::lazy_channel(&gateway_url).unwrap(),
        AttachIdentity::new(&Identity::Agency("registry".into())),
    );
    for index in 0..20 {
        exchange
            .clone()
            .send(fedmesh_tests::send_request(
                "registry",
                "registry",
                &format!("note {index}"),
                None,
            ))
            .await
            .unwrap();
    }

    // The target shard's database refuses connections: the move stays
    // before its cut-over, its copy retried by the leader.
    let target = shards[1].url.rsplit('/').next().unwrap().to_string();
    let admin = sqlx::PgPool::connect(&fedmesh_common::testing::postgres_server_url())
        .await
        .unwrap();
    let allow = |allowed: bool| {
        let admin = admin.clone();
        let statement = format!("ALTER DATABASE \"{target}\" ALLOW_CONNECTIONS {allowed}");
        async move { sqlx::query(&statement).execute(&admin).await.unwrap() }
    };
    allow(false).await;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&target)
        .execute(&admin)
        .await
        .unwrap();
    let started = directory(&coordinators[1], &operator)
        .move_agency(pb::MoveAgencyRequest {
            agency_id: "registry".into(),
            shard: "east-2".into(),
            region: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .r#move
        .unwrap();
    let get_move = |url: String| {
        let request = pb::GetMoveRequest {
            move_id: started.move_id.clone(),
        };
        let operator = operator.clone();
        async move {
            directory(&url, &operator)
                .get_move(request)
                .await
                .unwrap()
                .into_inner()
                .r#move
                .unwrap()
        }
    };
    within("the leader to try the copy", async {
        while get_move(coordinators[1].clone())
            .await
            .last_error
            .is_empty()
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let leader = within("a leader", async {
        loop {
            if let Some(leader) = leader_seen_by(&coordinators[0]).await {
                return leader;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;

    // Kill the leader; let the target shard back.
    let position = replicas.iter().position(|(id, ..)| *id == leader).unwrap();
    let (_, _, stop) = replicas.remove(position);
    stop.cancel();
    let killed_at = std::time::Instant::now();
    allow(true).await;
    let survivor = replicas[0].1.clone();
    let successor = within("another replica to lead", async {
        loop {
            match leader_seen_by(&survivor).await {
                Some(holder) if holder != leader => return holder,
                _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    let failover = killed_at.elapsed();
    let done = within("the new leader to finish the move", async {
        loop {
            let current = get_move(survivor.clone()).await;
            if current.phase() == pb::MovePhase::Done {
                return current;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    println!(
        "failover: {} ms to a new leader ({successor} after {leader}; lease 1000 ms, retry 100 ms), move done {} ms after the kill",
        failover.as_millis(),
        killed_at.elapsed().as_millis()
    );
    assert_eq!(done.messages_copied, 20, "{done:?}");
    within("the gateway to see the registry on east-2", async {
        topology
            .wait_for(|topology| {
                topology
                    .agencies
                    .get("registry")
                    .is_some_and(|home| home.shard == "east-2" && !home.moving)
            })
            .await
            .unwrap();
    })
    .await;
    let mut inbox = fedmesh_tests::Inbox::open(exchange, "registry", 64)
        .await
        .unwrap();
    let delivered: Vec<String> = inbox
        .drain()
        .await
        .iter()
        .map(fedmesh_tests::body)
        .collect();
    assert_eq!(
        delivered,
        (0..20)
            .map(|index| format!("note {index}"))
            .collect::<Vec<_>>()
    );
    gateway_stop.cancel();
    for (_, _, stop) in &replicas {
        stop.cancel();
    }
}
