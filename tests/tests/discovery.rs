//! Gateways found through DNS: a DNS server on loopback (hickory-server, an
//! in-memory zone with 1 s TTLs the test changes) names the west gateways;
//! east's gateway relays to those it names, and to those only once DNS
//! names them alone. The relays go through proxies that fail on cue: a
//! gateway that refuses is ejected, and an unreliable network (latency,
//! resets, connections gone dark) loses nothing and costs at most the
//! retry budget.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use fedmesh_gateway::GatewayConfig;
use fedmesh_proto::pb;
use fedmesh_tests::{Backend, Faults, TcpProxy, TestMesh, send_request, within};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::rr::rdata::{A, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use tokio::sync::watch;

/// The test zone, the gateways' discovery domain.
const ZONE: &str = "mesh.test.";
/// Every record's TTL, and the zone's negative TTL.
const TTL: u32 = 1;
/// The SRV name of the west gateways.
const WEST_SRV: &str = "_fedmesh._tcp.gateway.west.mesh.test.";
/// The SRV name of the coordinators.
const COORDINATOR_SRV: &str = "_fedmesh._tcp.coordinator.mesh.test.";

fn name(text: &str) -> Name {
    Name::from_ascii(text).unwrap()
}

/// Answers from the catalog, counting the SRV queries for the west gateways.
struct CountingCatalog {
    catalog: Catalog,
    west_srv_queries: watch::Sender<usize>,
}

#[async_trait::async_trait]
impl RequestHandler for CountingCatalog {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        if let Ok(info) = request.request_info()
            && info.query.query_type() == RecordType::SRV
            && *info.query.name() == LowerName::from(name(WEST_SRV))
        {
            self.west_srv_queries.send_modify(|count| *count += 1);
        }
        self.catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// A DNS server on loopback, authoritative for [`ZONE`].
struct TestDns {
    address: SocketAddr,
    zone: Arc<InMemoryZoneHandler>,
    west_srv_queries: watch::Receiver<usize>,
    /// Serving until dropped.
    _server: Server<CountingCatalog>,
}

impl TestDns {
    async fn start() -> TestDns {
        let origin = name(ZONE);
        let mut zone =
            InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(origin.clone(), name("admin.mesh.test."), 1, 60, 60, 60, TTL);
        assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), TTL, RData::SOA(soa)), 1));
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::from(origin),
            vec![Arc::clone(&zone) as Arc<dyn ZoneHandler>],
        );
        let (west_srv_queries, queries) = watch::channel(0);
        let mut server = Server::new(CountingCatalog {
            catalog,
            west_srv_queries,
        });
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        server.register_socket(socket);
        TestDns {
            address,
            zone,
            west_srv_queries: queries,
            _server: server,
        }
    }

    async fn add(&self, record: Record) {
        assert!(self.zone.upsert(record, 2).await, "record added");
    }

    /// `host` A 127.0.0.1.
    async fn add_host(&self, host: &str) {
        let address = RData::A(A(Ipv4Addr::LOCALHOST));
        self.add(Record::from_rdata(name(host), TTL, address)).await;
    }

    /// A west gateway at `target`:`port`.
    fn west_srv(target: &str, port: u16) -> Record {
        let srv = RData::SRV(SRV::new(0, 0, port, name(target)));
        Record::from_rdata(name(WEST_SRV), TTL, srv)
    }

    /// A coordinator at `target`:`port`.
    async fn add_coordinator(&self, target: &str, port: u16) {
        let srv = RData::SRV(SRV::new(0, 0, port, name(target)));
        self.add(Record::from_rdata(name(COORDINATOR_SRV), TTL, srv))
            .await;
    }

    async fn add_west_gateway(&self, target: &str, port: u16) {
        self.add(Self::west_srv(target, port)).await;
    }

    /// Takes the west gateway at `target`:`port` out of the SRV records,
    /// leaving the others.
    async fn remove_west_gateway(&self, target: &str, port: u16) {
        let key = RrKey::new(LowerName::from(name(WEST_SRV)), RecordType::SRV);
        let mut records = self.zone.records_mut().await;
        let set = records.get_mut(&key).expect("the west SRV records");
        assert!(Arc::make_mut(set).remove(&Self::west_srv(target, port), 3));
    }

    /// SRV queries for the west gateways so far.
    fn west_srv_queries(&self) -> usize {
        *self.west_srv_queries.borrow()
    }

    /// Waits until the server has answered `count` SRV queries for the west
    /// gateways.
    async fn west_srv_queries_reach(&self, count: usize) {
        let mut queries = self.west_srv_queries.clone();
        within(
            &format!("{count} SRV lookups of the west gateways"),
            queries.wait_for(|queries| *queries >= count),
        )
        .await
        .unwrap();
    }
}

/// A mesh whose gateways find each other's regions under [`ZONE`] through
/// `dns`, the A/AAAA port of a headless service being `port`.
async fn mesh_on(dns: &TestDns, port: u16) -> TestMesh {
    mesh_tuned(dns, port, |_| {}).await
}

/// As [`mesh_on`], each gateway's settings changed by `tune` besides.
async fn mesh_tuned(
    dns: &TestDns,
    port: u16,
    tune: impl Fn(&mut GatewayConfig) + Send + Sync + 'static,
) -> TestMesh {
    let resolver = dns.address.to_string();
    TestMesh::start_configured(Backend::Sqlite, |options| {
        options.tune_gateway = Some(Arc::new(move |config: &mut GatewayConfig| {
            config.discovery_domain = Some(ZONE.into());
            config.discovery_resolver = Some(resolver.clone());
            config.discovery_port = port;
            tune(config);
        }));
    })
    .await
}

/// A mesh with a second west gateway, each west gateway named by DNS
/// through a proxy of its own (which the coordinator's list does not
/// name): a relay through a proxy is a relay to an address DNS gave.
async fn west_behind_proxies(
    dns: &TestDns,
    tune: impl Fn(&mut GatewayConfig) + Send + Sync + 'static,
) -> (TestMesh, [TcpProxy; 2]) {
    let mut mesh = mesh_tuned(dns, 50052, tune).await;
    let second_url = mesh.add_gateway("west-1", "west").await;
    let proxies = [
        TcpProxy::start(&mesh.gateway_url("west")).await,
        TcpProxy::start(&second_url).await,
    ];
    for (proxy, host) in proxies
        .iter()
        .zip(["first.mesh.test.", "second.mesh.test."])
    {
        dns.add_host(host).await;
        dns.add_west_gateway(host, proxy.address.port()).await;
    }
    (mesh, proxies)
}

/// The most retries a relay budget allows: a fifth of the first attempts,
/// and a reserve of 10 for each 10 s window the test spanned.
fn retry_budget(first_attempts: u64, elapsed: Duration) -> u64 {
    first_attempts / 5 + 10 * (elapsed.as_secs() / 10 + 1)
}

/// A send from tax-office (east) to land-registry (west) that must be
/// answered within 3 s: much less than the relay timeout (10 s), so a relay
/// to a gateway that holds it fails the send instead of moving on.
async fn send(mesh: &TestMesh, body: &str) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(send_request("tax-office", "land-registry", body, None));
    request.set_timeout(Duration::from_secs(3));
    mesh.exchange("east", "tax-office").send(request).await?;
    Ok(())
}

#[tokio::test]
async fn traffic_leaves_a_gateway_once_dns_no_longer_names_it() {
    let dns = TestDns::start().await;
    let mut mesh = mesh_on(&dns, 50052).await;
    let second_url = mesh.add_gateway("west-1", "west").await;
    // DNS names the west gateways through proxies, which the coordinator's
    // list does not name: a connection through one is a relay to an
    // address DNS gave.
    let first = TcpProxy::start(&mesh.gateway_url("west")).await;
    let second = TcpProxy::start(&second_url).await;
    dns.add_host("first.mesh.test.").await;
    dns.add_host("second.mesh.test.").await;
    dns.add_west_gateway("first.mesh.test.", first.address.port())
        .await;
    dns.add_west_gateway("second.mesh.test.", second.address.port())
        .await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;
    mesh.gateway_knows("east", &["tax-office", "land-registry"])
        .await;

    let mut n_sent = 0;
    for _ in 0..10 {
        send(&mesh, &format!("message {n_sent}")).await.unwrap();
        n_sent += 1;
    }
    for (proxy, which) in [(&first, "first"), (&second, "second")] {
        let mut connections = proxy.connections();
        within(
            &format!("a relay to the {which} west gateway DNS names"),
            connections.wait_for(|count| *count > 0),
        )
        .await
        .unwrap();
    }

    dns.remove_west_gateway("first.mesh.test.", first.address.port())
        .await;
    // Every query counted from here on is answered without the first
    // gateway. East's gateway asks again only after it took in the answer
    // of its previous lookup and waited its TTL, so once the second such
    // query arrived the first answer without the gateway is the one in use.
    let asked = dns.west_srv_queries();
    dns.west_srv_queries_reach(asked + 2).await;

    // Frozen, the first gateway would hold a relay past the send's
    // deadline (stopped, it would refuse the connection and the relay
    // would quietly move on to the next gateway): every send succeeding
    // shows none goes to it.
    first.freeze();
    for _ in 0..20 {
        send(&mesh, &format!("message {n_sent}"))
            .await
            .unwrap_or_else(|status| {
                panic!("send {n_sent} after the first gateway left DNS failed: {status:?}")
            });
        n_sent += 1;
    }

    let mut inbox = mesh.open_inbox("west", "land-registry", 64).await.unwrap();
    assert_eq!(inbox.drain().await.len(), n_sent, "every message arrived");
}

#[tokio::test]
async fn without_srv_records_the_headless_service_is_tried_first() {
    let dns = TestDns::start().await;
    // Where `gateway.west.mesh.test` points: a port that accepts and hangs
    // up, as a gateway that went away.
    let vanished = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mesh = mesh_on(&dns, vanished.local_addr().unwrap().port()).await;
    dns.add_host("gateway.west.mesh.test.").await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;
    mesh.gateway_knows("east", &["tax-office", "land-registry"])
        .await;

    let hang_up = tokio::spawn(async move {
        let (connection, _) = vanished.accept().await.unwrap();
        drop(connection);
    });
    send(&mesh, "through the coordinator's list")
        .await
        .expect("the gateway the coordinator announces takes the relay");
    within("a connection to the headless service's address", hang_up)
        .await
        .unwrap();
    assert!(
        dns.west_srv_queries() >= 1,
        "the SRV name was asked before the headless one"
    );
}

#[tokio::test]
async fn a_west_gateway_that_refuses_is_ejected_and_sends_go_on_through_the_other() {
    let dns = TestDns::start().await;
    let (mesh, [refusing, working]) = west_behind_proxies(&dns, |_| {}).await;
    refusing.stop();
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;
    mesh.gateway_knows("east", &["tax-office", "land-registry"])
        .await;

    let started = tokio::time::Instant::now();
    for n in 0..30 {
        send(&mesh, &format!("message {n}"))
            .await
            .unwrap_or_else(|status| panic!("send {n} with one west gateway refusing: {status:?}"));
    }
    // A gateway never answering costs nothing to pick: without ejection
    // every send would try it first. Ejected after three failures, it is
    // tried again only once per cool-down (5 s, then longer).
    let refused = refusing.injected().refused();
    let cool_downs = started.elapsed().as_secs() / 5;
    assert!(
        (1..=3 + cool_downs).contains(&refused),
        "the refusing gateway was tried {refused} times for 30 sends"
    );
    assert_eq!(*refusing.connections().borrow(), 0);
    assert_eq!(
        *working.connections().borrow(),
        1,
        "every relay to the working gateway shares one HTTP/2 connection"
    );
    let attempts = mesh.gateway_relay_attempts("east");
    assert_eq!(attempts.retries(), refused, "each refusal was retried once");

    // Back, it is tried again once its cool-down is over.
    refusing.resume();
    let mut back = refusing.connections();
    let mut n = 30;
    within("a relay to the gateway that is back", async {
        while *back.borrow_and_update() == 0 {
            send(&mesh, &format!("message {n}")).await.unwrap();
            n += 1;
            tokio::select! {
                _ = back.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    })
    .await;

    let mut inbox = mesh.open_inbox("west", "land-registry", 256).await.unwrap();
    assert_eq!(inbox.drain().await.len(), n, "every message arrived once");
}

#[tokio::test]
async fn through_latency_resets_and_dark_links_every_message_arrives_once_in_order() {
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 40;
    let dns = TestDns::start().await;
    // An attempt that gets no answer in 1 s is given up (a dark link).
    let (mesh, proxies) = west_behind_proxies(&dns, |config| config.relay_timeout_ms = 1_000).await;
    let senders: Vec<String> = (0..SENDERS).map(|n| format!("sender-{n}")).collect();
    for sender in &senders {
        mesh.register(sender, "east").await;
    }
    mesh.register("land-registry", "west").await;
    let mut known: Vec<&str> = senders.iter().map(String::as_str).collect();
    known.push("land-registry");
    mesh.gateway_knows("east", &known).await;

    let faults = Faults {
        latency: Duration::from_millis(4),
        reset_one_in: 30,
        drop_one_in: 100,
    };
    for proxy in &proxies {
        proxy.inject(faults);
    }
    let injected: Vec<_> = proxies.iter().map(TcpProxy::injected).collect();
    let both_faults_seen = {
        let injected = injected.clone();
        move || {
            injected.iter().map(|faults| faults.resets()).sum::<u64>() > 0
                && injected.iter().map(|faults| faults.drops()).sum::<u64>() > 0
        }
    };
    let started = tokio::time::Instant::now();
    // Each sender sends its messages one after the other, with a key, and
    // sends again with the same key what was not answered; it goes on
    // past its share until the network both reset a connection and took
    // one dark, or it sent four times its share (when both proxies are
    // left out for failing, relays go around them and draw no faults).
    let mut load = tokio::task::JoinSet::new();
    for sender in &senders {
        let exchange = mesh.exchange("east", sender);
        let sender = sender.clone();
        let both_faults_seen = both_faults_seen.clone();
        load.spawn(async move {
            let mut statuses = Vec::new();
            while statuses.len() < PER_SENDER
                || (!both_faults_seen() && statuses.len() < 4 * PER_SENDER)
            {
                let n = statuses.len();
                let text = format!("{sender} {n}");
                let key = format!("{sender}-{n}");
                let receipt = loop {
                    let request = send_request(&sender, "land-registry", &text, Some(&key));
                    match exchange.clone().send(request).await {
                        Ok(response) => break response.into_inner().receipt.unwrap(),
                        Err(status) if status.code() == tonic::Code::Unavailable => {}
                        Err(status) => panic!("send {text}: {status:?}"),
                    }
                };
                statuses.push(pb::ReceiptStatus::try_from(receipt.status).unwrap());
            }
            (sender, statuses)
        });
    }
    let sent: BTreeMap<String, Vec<pb::ReceiptStatus>> =
        within("the load through the faults", load.join_all())
            .await
            .into_iter()
            .collect();
    let elapsed = started.elapsed();
    let total: usize = sent.values().map(Vec::len).sum();
    assert!(
        sent.values().flatten().all(|status| matches!(
            status,
            pb::ReceiptStatus::Stored | pb::ReceiptStatus::Spooled
        )),
        "every send answered stored or spooled: {sent:?}"
    );
    let faults: u64 = injected
        .iter()
        .map(|faults| faults.resets() + faults.drops())
        .sum();
    assert!(faults > 0, "the network failed on the way");
    let attempts = mesh.gateway_relay_attempts("east");
    let (first, retries) = (attempts.first(), attempts.retries());
    assert!(retries > 0, "failed relays were retried");
    assert!(
        retries <= retry_budget(first, elapsed),
        "{retries} retries for {first} batches in {elapsed:?}: over the budget"
    );

    // Healed, what was spooled drains; everything arrives once, each
    // sender's messages in the order sent.
    for proxy in &proxies {
        proxy.inject(Faults::default());
    }
    let mut inbox = mesh
        .open_inbox("west", "land-registry", 1_000)
        .await
        .unwrap();
    let received = inbox.bodies_by_sender(total).await;
    assert!(inbox.drain().await.is_empty(), "nothing more than was sent");
    for (sender, statuses) in &sent {
        let expected: Vec<String> = (0..statuses.len())
            .map(|n| format!("{sender} {n}"))
            .collect();
        assert_eq!(received[sender], expected, "{sender}'s messages in order");
    }
}

#[tokio::test]
async fn a_gateway_whose_settings_name_no_live_coordinator_finds_one_through_dns() {
    let dns = TestDns::start().await;
    // The gateway added below is given a coordinator URL where nothing
    // listens: only DNS can lead it to the coordinator.
    let mut mesh = mesh_tuned(&dns, 50052, |config| {
        if config.id.as_deref() == Some("east-1") {
            config.coordinator = "http://127.0.0.1:1".into();
        }
    })
    .await;
    let port = mesh
        .coordinator_url()
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap();
    dns.add_host("control.mesh.test.").await;
    dns.add_coordinator("control.mesh.test.", port).await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;

    // It joins: it watched the topology and reported itself.
    let url = mesh.add_gateway("east-1", "east").await;
    let mut exchange = mesh.exchange_at(&url, "tax-office");
    let receipt = within(
        "a send through the gateway that found the coordinator through DNS",
        exchange.send(send_request("tax-office", "land-registry", "found", None)),
    )
    .await
    .unwrap()
    .into_inner()
    .receipt
    .unwrap();
    assert_eq!(receipt.home_region, "west");
}
