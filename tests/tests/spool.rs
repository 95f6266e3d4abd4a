//! Store and forward across a partition: while west cannot be reached, east
//! spools what its senders send there and answers `SPOOLED`; the spool
//! survives a gateway restart and is drained once west is back, in order,
//! exactly once, with a `message.forwarded` event per message.
//!
//! Everything on PostgreSQL: a control database, one shard per region, two
//! east gateway replicas on east's shard and one west gateway, each started
//! and stopped on its own.

use std::collections::BTreeMap;
use std::sync::Arc;

use fedmesh_common::events::{EventPublisher, EventSource, MESSAGE_FORWARDED};
use fedmesh_common::identity::{AttachIdentity, Identity};
use fedmesh_common::in_process::InProcessBus;
use fedmesh_common::testing::TestDatabase;
use fedmesh_coordinator::{CoordinatorConfig, RegionConfig};
use fedmesh_gateway::{GatewayConfig, ShardConfig};
use fedmesh_proto::pb;
use fedmesh_tests::{Inbox, send_request, within};
use tokio_util::sync::CancellationToken;

type Exchange = pb::exchange_client::ExchangeClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AttachIdentity>,
>;
type Directory = pb::directory_client::DirectoryClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AttachIdentity>,
>;

/// One gateway started on its own.
struct Gateway {
    url: String,
    stop: CancellationToken,
    running: fedmesh_gateway::RunningGateway,
}

impl Gateway {
    async fn start(
        id: &str,
        region: &str,
        shard: &TestDatabase,
        coordinator: &str,
        bus: &Arc<InProcessBus>,
    ) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut config = GatewayConfig::new(
            id,
            region,
            vec![ShardConfig::new(format!("{region}-1"), shard.url.clone())],
            coordinator,
        );
        config.dev_identity = true;
        let stop = CancellationToken::new();
        let publisher: Arc<dyn EventPublisher> = bus.clone();
        let running = fedmesh_gateway::start(config, listener, Some(publisher), stop.clone())
            .await
            .unwrap();
        Gateway { url, stop, running }
    }

    /// Stops the gateway and waits until it has.
    async fn stop(self) {
        self.stop.cancel();
        within("the gateway to stop", self.running.stopped)
            .await
            .unwrap()
            .unwrap();
    }

    /// Waits until the gateway's topology knows `agency_ids`.
    async fn knows(&self, agency_ids: &[&str]) {
        let mut topology = self.running.topology.clone();
        within("the gateway to know the agencies", async {
            topology
                .wait_for(|topology| {
                    agency_ids
                        .iter()
                        .all(|agency| topology.agencies.contains_key(*agency))
                })
                .await
                .unwrap();
        })
        .await;
    }

    fn exchange(&self, agency_id: &str) -> Exchange {
        pb::exchange_client::ExchangeClient::with_interceptor(
            fedmesh_common::server::lazy_channel(&self.url).unwrap(),
            AttachIdentity::new(&Identity::Agency(agency_id.into())),
        )
    }
}

fn directory(url: &str) -> Directory {
    pb::directory_client::DirectoryClient::with_interceptor(
        fedmesh_common::server::lazy_channel(url).unwrap(),
        AttachIdentity::new(&Identity::Operator("root".into())),
    )
}

/// Sends `body` from `sender` to the archive with a key, on `gateway`;
/// returns the receipt.
async fn send(gateway: &Gateway, sender: &str, body: &str) -> pb::Receipt {
    gateway
        .exchange(sender)
        .send(send_request(
            sender,
            "archive",
            body,
            Some(&body.replace(' ', "-")),
        ))
        .await
        .unwrap_or_else(|status| panic!("send {body}: {status:?}"))
        .into_inner()
        .receipt
        .unwrap()
}

fn status(receipt: &pb::Receipt) -> pb::ReceiptStatus {
    pb::ReceiptStatus::try_from(receipt.status).unwrap()
}

/// How often a test asks the coordinator what the gateways reported: a
/// spool's depth is a figure to read, not an event to wait for.
const POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// What the coordinator's topology says waits in east-1's spool for west
/// (0 when nothing is reported).
fn spooled_for_west(topology: &pb::TopologySnapshot) -> u64 {
    topology
        .gateways
        .iter()
        .flat_map(|gateway| gateway.load.iter().flat_map(|load| load.spools.iter()))
        .filter(|spool| spool.shard == "east-1" && spool.region == "west")
        .map(|spool| spool.messages)
        .max()
        .unwrap_or(0)
}

async fn topology(coordinator: &str) -> pb::TopologySnapshot {
    let mut updates = directory(coordinator)
        .watch_topology(pb::WatchTopologyRequest::default())
        .await
        .unwrap()
        .into_inner();
    match updates.message().await.unwrap().unwrap().update.unwrap() {
        pb::topology_update::Update::Snapshot(snapshot) => snapshot,
        pb::topology_update::Update::Change(_) => panic!("a snapshot comes first"),
    }
}

#[tokio::test]
async fn what_east_spools_while_west_is_away_arrives_in_order_exactly_once() {
    let control = TestDatabase::create().await;
    let east_shard = TestDatabase::create().await;
    let west_shard = TestDatabase::create().await;
    let bus = Arc::new(InProcessBus::default());
    let mut forwarded_events = bus
        .subscribe(vec![format!("east.*.{MESSAGE_FORWARDED}")])
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coordinator = format!("http://{}", listener.local_addr().unwrap());
    let mut config = CoordinatorConfig::new(
        vec![
            RegionConfig {
                name: "east".into(),
                shards: vec!["east-1".into()],
            },
            RegionConfig {
                name: "west".into(),
                shards: vec!["west-1".into()],
            },
        ],
        control.url.clone(),
    );
    config.dev_identity = true;
    config.report_interval_ms = 200;
    let coordinator_stop = shutdown.clone();
    tokio::spawn(async move {
        fedmesh_coordinator::run(config, listener, None, coordinator_stop).await
    });

    let mut east = [
        Gateway::start("east-0", "east", &east_shard, &coordinator, &bus).await,
        Gateway::start("east-1", "east", &east_shard, &coordinator, &bus).await,
    ];
    let west = Gateway::start("west-0", "west", &west_shard, &coordinator, &bus).await;
    for (agency, region) in [
        ("ministry", "east"),
        ("registry", "east"),
        ("clerk", "east"),
        ("archive", "west"),
    ] {
        directory(&coordinator)
            .register_agency(pb::RegisterAgencyRequest {
                agency_id: agency.into(),
                region: region.into(),
                display_name: String::new(),
                shard: String::new(),
            })
            .await
            .unwrap();
    }
    let agencies = ["ministry", "registry", "clerk", "archive"];
    for gateway in east.iter().chain([&west]) {
        gateway.knows(&agencies).await;
    }

    // West is there: stored.
    let senders = ["ministry", "registry"];
    let mut sent: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for round in 0..3 {
        for (index, sender) in senders.iter().enumerate() {
            let text = format!("{sender} {round}");
            let receipt = send(&east[index], sender, &text).await;
            assert_eq!(status(&receipt), pb::ReceiptStatus::Stored, "{text}");
            sent.entry(sender).or_default().push(text);
        }
    }

    // West goes away: spooled, whichever east replica a sender reaches.
    west.stop().await;
    let mut spooled_ids = BTreeMap::new();
    for round in 3..13 {
        for (index, sender) in senders.iter().enumerate() {
            let text = format!("{sender} {round}");
            let receipt = send(&east[(index + round) % 2], sender, &text).await;
            assert_eq!(status(&receipt), pb::ReceiptStatus::Spooled, "{text}");
            assert_eq!(receipt.home_region, "west");
            assert!(!receipt.duplicate);
            spooled_ids.insert(text.clone(), receipt.message_id);
            sent.entry(sender).or_default().push(text);
        }
    }
    // A retry of a spooled message (same key, same content) is the same
    // message, spooled once.
    let retry = send(&east[1], "ministry", "ministry 7").await;
    assert_eq!(status(&retry), pb::ReceiptStatus::Spooled);
    assert!(retry.duplicate);
    assert_eq!(retry.message_id, spooled_ids["ministry 7"]);

    // The operator sees the spool.
    within("the spool depth to be reported", async {
        while spooled_for_west(&topology(&coordinator).await) != 20 {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;

    // A replica restarts: the spool is in the shard, not in the replica.
    let [first, second] = east;
    first.stop().await;
    east = [
        Gateway::start("east-0", "east", &east_shard, &coordinator, &bus).await,
        second,
    ];
    east[0].knows(&agencies).await;

    // The test holds ministry's spooled rows, as a slow transaction would:
    // no drainer can take them out (nor count an attempt on them).
    let mut holder = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&east_shard.url).await.unwrap()
    };
    let mut held = sqlx::Connection::begin(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM spool WHERE sender_id = 'ministry' FOR UPDATE")
        .fetch_all(&mut *held)
        .await
        .unwrap();
    fedmesh_tests::someone_waits_on_a_lock(&east_shard.url, "the drainer to wait on the held rows")
        .await;

    // West is back. A message of a sender with messages in the spool waits
    // behind them, though west could take it now; a sender with none goes
    // straight through.
    let west = Gateway::start("west-0", "west", &west_shard, &coordinator, &bus).await;
    west.knows(&agencies).await;
    for gateway in &east {
        let text = format!("ministry {}", sent["ministry"].len());
        let receipt = send(gateway, "ministry", &text).await;
        assert_eq!(
            status(&receipt),
            pb::ReceiptStatus::Spooled,
            "behind the spooled ones"
        );
        sent.entry("ministry").or_default().push(text);
    }
    let clerk = send(&east[0], "clerk", "clerk 0").await;
    assert_eq!(
        status(&clerk),
        pb::ReceiptStatus::Stored,
        "nothing of the clerk's is spooled"
    );
    sent.entry("clerk").or_default().push("clerk 0".into());
    held.rollback().await.unwrap();

    // Senders keep sending while the spool drains.
    for round in 0..5 {
        for (index, sender) in senders.iter().enumerate() {
            let text = format!("{sender} {}", sent[sender].len());
            let receipt = send(&east[(index + round) % 2], sender, &text).await;
            assert_eq!(receipt.home_region, "west");
            sent.entry(sender).or_default().push(text);
        }
    }

    // Everything arrives, once, in each sender's order.
    let total: usize = sent.values().map(Vec::len).sum();
    let mut inbox = Inbox::open(west.exchange("archive"), "archive", 256)
        .await
        .unwrap();
    let received = inbox.bodies_by_sender(total).await;
    for sender in ["ministry", "registry", "clerk"] {
        assert_eq!(received[sender], sent[sender], "{sender}'s order");
    }

    // Each spooled message was forwarded once, with its event; the spool
    // is empty.
    let mut forwarded = std::collections::BTreeSet::new();
    within("a message.forwarded event per spooled message", async {
        while forwarded.len() < spooled_ids.len() {
            let event = forwarded_events.events.recv().await.unwrap();
            // The source sends more than the binding asks for.
            if event.kind != MESSAGE_FORWARDED {
                continue;
            }
            assert_eq!(event.region, "east");
            assert_eq!(event.attributes["recipient"], "archive");
            assert_eq!(event.attributes["home_region"], "west");
            forwarded.insert(event.message_id.unwrap());
        }
    })
    .await;
    let expected: std::collections::BTreeSet<String> = spooled_ids.into_values().collect();
    assert!(expected.is_subset(&forwarded), "{forwarded:?}");
    within("the spool to be reported empty", async {
        while spooled_for_west(&topology(&coordinator).await) != 0 {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;

    for gateway in east {
        gateway.stop().await;
    }
    west.stop().await;
    shutdown.cancel();
}
