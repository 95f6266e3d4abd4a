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
