//! Gateways found through DNS: a DNS server on loopback (hickory-server, an
//! in-memory zone with 1 s TTLs the test changes) names the west gateways;
//! east's gateway relays to those it names, and to those only once DNS
//! names them alone.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use fedmesh_gateway::GatewayConfig;
use fedmesh_tests::{Backend, TcpProxy, TestMesh, send_request, within};
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
    let resolver = dns.address.to_string();
    TestMesh::start_configured(Backend::Sqlite, |options| {
        options.tune_gateway = Some(Arc::new(move |config: &mut GatewayConfig| {
            config.discovery_domain = Some(ZONE.into());
            config.discovery_resolver = Some(resolver.clone());
            config.discovery_port = port;
        }));
    })
    .await
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
