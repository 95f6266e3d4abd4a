//! The end-to-end test harness: [`TestMesh`] starts the dev mesh in-process
//! on ephemeral loopback ports over a temporary data folder, and hands out
//! clients that act as agencies or as an operator.
//!
//! Waiting is done on events (a delivery, an event, a status) with a
//! generous deadline, never by sleeping.

#![allow(clippy::unwrap_used)]

mod broker;
mod proxy;
mod webhook;

pub use broker::{TestBroker, TestQueue, broker_url};
pub use proxy::{Faults, TcpProxy};
pub use webhook::{Hook, WebhookReceiver};

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use fedmesh::client::{Authenticated, ClientTls, Endpoints};
use fedmesh::dev::{DevMesh, DevOptions, TuneGateway};
use fedmesh_common::amqp::{AmqpPublisher, AmqpQueues, EventBusSettings};
use fedmesh_common::events::{DurableQueues, EventPublisher};
use fedmesh_common::identity::{AttachIdentity, Identity};
use fedmesh_common::in_process::InProcessBus;
use fedmesh_common::testing::TestDatabase;
use fedmesh_proto::pb;
use tokio::sync::mpsc;
use tonic::{Code, Status};

/// How long any single awaited event may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Awaits `future`, failing the test with `what` after [`DEADLINE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Waits until some session of the PostgreSQL database at `url` waits on a
/// lock (what a test holds to make a write wait); `what` names it.
pub async fn someone_waits_on_a_lock(url: &str, what: &str) {
    use sqlx::Connection;
    let mut observer = sqlx::PgConnection::connect(url).await.unwrap();
    within(what, async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&mut observer)
            .await
            .unwrap();
            if waiting > 0 {
                return;
            }
            // pg_stat_activity says nothing when a session starts waiting.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Where the mesh keeps its shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite files in the data folder (the dev mesh's default).
    Sqlite,
    /// A fresh PostgreSQL database per shard, dropped after the test.
    Postgres,
}

/// With `FEDMESH_TEST_LOG` set (a filter such as `debug` or
/// `fedmesh_common=debug`), the components log to the test's output.
fn log_if_asked() {
    if let Ok(filter) = std::env::var("FEDMESH_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Where a test mesh's events travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// The dev mesh's in-process bus (shards on SQLite).
    InProcess,
    /// An exchange of the test's own on the machine's RabbitMQ (shards on
    /// PostgreSQL, as deployed).
    RabbitMq,
}

impl Bus {
    /// A mesh on this bus, and the test's exchange when on RabbitMQ (kept
    /// until the test ends; drop it after the mesh).
    pub async fn mesh(self) -> (TestMesh, Option<TestBroker>) {
        self.mesh_configured(|_| {}).await
    }

    /// The bus alone: where events are published, and its durable queues,
    /// with the test's exchange when on RabbitMQ (drop it last).
    pub async fn alone(
        self,
    ) -> (
        std::sync::Arc<dyn EventPublisher>,
        std::sync::Arc<dyn DurableQueues>,
        Option<TestBroker>,
    ) {
        match self {
            Bus::InProcess => {
                let bus = InProcessBus::default();
                (
                    std::sync::Arc::new(bus.clone()),
                    std::sync::Arc::new(bus),
                    None,
                )
            }
            Bus::RabbitMq => {
                let broker = TestBroker::start().await;
                let publisher = AmqpPublisher::new(&broker.url, &broker.exchange, "test");
                let queues = AmqpQueues::new(&broker.url, &broker.exchange, "test");
                (
                    std::sync::Arc::new(publisher),
                    std::sync::Arc::new(queues),
                    Some(broker),
                )
            }
        }
    }

    /// Like [`Bus::mesh`], with the mesh's options changed by `configure`.
    pub async fn mesh_configured(
        self,
        configure: impl FnOnce(&mut DevOptions),
    ) -> (TestMesh, Option<TestBroker>) {
        match self {
            Bus::InProcess => (
                TestMesh::start_configured(Backend::Sqlite, configure).await,
                None,
            ),
            Bus::RabbitMq => {
                let broker = TestBroker::start().await;
                let events = broker.settings();
                let mesh = TestMesh::start_configured(Backend::Postgres, |options| {
                    options.events = events;
                    configure(options);
                })
                .await;
                (mesh, Some(broker))
            }
        }
    }
}

/// A dev mesh on ephemeral ports over its own data folder.
pub struct TestMesh {
    mesh: Option<DevMesh>,
    /// What the mesh was started with, to start it again.
    options: DevOptions,
    /// Kept until the mesh is gone: dropping them drops the databases.
    databases: Vec<TestDatabase>,
    data_dir: tempfile::TempDir,
}

fn channel(url: &str) -> tonic::transport::Channel {
    fedmesh_common::server::lazy_channel(url).unwrap()
}

impl TestMesh {
    /// Starts a mesh on SQLite over a fresh data folder.
    pub async fn start() -> TestMesh {
        Self::start_with(Backend::Sqlite).await
    }

    /// Starts a mesh whose shards live in `backend`.
    pub async fn start_with(backend: Backend) -> TestMesh {
        Self::start_configured(backend, |_| {}).await
    }

    /// Starts a mesh whose shards live in `backend`, every gateway's
    /// settings changed by `tune`.
    pub async fn start_tuned(backend: Backend, tune: Option<TuneGateway>) -> TestMesh {
        Self::start_configured(backend, |options| options.tune_gateway = tune).await
    }

    /// Starts a mesh whose shards live in `backend` and whose events go
    /// through the bus `events` names (a broker, or in process).
    pub async fn start_on_bus(backend: Backend, events: EventBusSettings) -> TestMesh {
        Self::start_configured(backend, |options| options.events = events).await
    }

    /// Starts a mesh whose shards live in `backend`, its options (the dev
    /// mesh's defaults) changed by `configure`.
    pub async fn start_configured(
        backend: Backend,
        configure: impl FnOnce(&mut DevOptions),
    ) -> TestMesh {
        log_if_asked();
        let data_dir = tempfile::tempdir().unwrap();
        let mut options = DevOptions {
            data_dir: data_dir.path().to_path_buf(),
            base_port: None,
            shard_urls: HashMap::new(),
            shards_per_region: 1,
            tune_gateway: None,
            events: EventBusSettings::default(),
            subscriber_buffer: fedmesh_notifier::NotifierConfig::default().subscriber_buffer,
            webhooks: fedmesh_notifier::NotifierConfig::default().webhooks,
            certs: None,
            tune_tls: None,
        };
        configure(&mut options);
        let mut databases = Vec::new();
        if backend == Backend::Postgres {
            for region in fedmesh::dev::DEV_REGIONS {
                for shard in fedmesh::dev::shard_names(region, options.shards_per_region) {
                    let database = TestDatabase::create().await;
                    options.shard_urls.insert(shard, database.url.clone());
                    databases.push(database);
                }
            }
        }
        let mesh = Self::start_on(options.clone()).await;
        TestMesh {
            mesh: Some(mesh),
            options,
            databases,
            data_dir,
        }
    }

    /// The database URL of `shard`.
    pub fn shard_url(&self, shard: &str) -> String {
        self.options
            .shard_urls
            .get(shard)
            .cloned()
            .unwrap_or_else(|| {
                let path = self.data_dir.path().join(format!("{shard}.sqlite"));
                format!("sqlite://{}", path.display())
            })
    }

    /// Starts another gateway replica of `region` on the region's shard;
    /// returns its URL.
    pub async fn add_gateway(&mut self, gateway_id: &str, region: &str) -> String {
        let shard = format!("{region}-1");
        let config = fedmesh_gateway::ShardConfig::new(shard.clone(), self.shard_url(&shard));
        let mesh = self.mesh.as_mut().unwrap();
        within(
            "the new gateway",
            mesh.add_gateway(gateway_id, region, config),
        )
        .await
        .unwrap()
    }

    /// The Exchange of the gateway at `url`, acting as agency `agency_id`.
    pub fn exchange_at(
        &self,
        url: &str,
        agency_id: &str,
    ) -> pb::exchange_client::ExchangeClient<Authenticated> {
        let (channel, attach) = self.channel_as(url, &Identity::Agency(agency_id.into()));
        pb::exchange_client::ExchangeClient::with_interceptor(channel, attach)
            .max_encoding_message_size(16 * 1024 * 1024)
            .max_decoding_message_size(16 * 1024 * 1024)
    }

    /// A channel to `url` on which calls are made as `identity`: on a
    /// mesh on TLS, with `identity`'s certificate (an agency's is issued
    /// when missing), else with the identity header.
    pub fn channel_as(
        &self,
        url: &str,
        identity: &Identity,
    ) -> (tonic::transport::Channel, AttachIdentity) {
        let Some(dir) = &self.options.certs else {
            return (channel(url), AttachIdentity::new(identity));
        };
        if let Identity::Agency(_) = identity
            && !fedmesh_common::tls::CertificateFiles::of(dir, identity)
                .cert
                .exists()
        {
            fedmesh::certs::issue(dir, identity, 30, false).unwrap();
        }
        let endpoints = Endpoints {
            coordinator: self.coordinator_url(),
            operator: "test".into(),
            gateway: None,
            notifier: None,
            tls: ClientTls::Folder {
                dir: dir.clone(),
                trust_domain: fedmesh_common::tls::DEFAULT_TRUST_DOMAIN.into(),
            },
        };
        endpoints
            .channel_as(url, identity, fedmesh_common::tls::ExpectedServer::Any)
            .unwrap()
    }

    /// The certificates folder of a mesh on TLS.
    pub fn certs(&self) -> Option<&std::path::Path> {
        self.options.certs.as_deref()
    }

    async fn start_on(options: DevOptions) -> DevMesh {
        within("the dev mesh to start", DevMesh::start(options))
            .await
            .unwrap()
    }

    fn mesh(&self) -> &DevMesh {
        self.mesh.as_ref().unwrap()
    }

    /// Stops the mesh gracefully and starts it again on the same folder.
    pub async fn restart(&mut self) {
        within("the dev mesh to stop", self.mesh.take().unwrap().stop())
            .await
            .unwrap();
        self.mesh = Some(Self::start_on(self.options.clone()).await);
    }

    /// Waits until the gateway of `region` routes with a topology that
    /// knows every agency in `agency_ids`.
    pub async fn gateway_knows(&self, region: &str, agency_ids: &[&str]) {
        let mut topology = self.mesh().gateway_topology(region).unwrap();
        within(
            "the gateway's topology",
            topology.wait_for(|topology| {
                agency_ids
                    .iter()
                    .all(|id| topology.agencies.contains_key(*id))
            }),
        )
        .await
        .unwrap();
    }

    /// Waits until the gateway of `region` routes with a topology that
    /// holds the grant `grant_id` (or, when `present` is false, does not).
    pub async fn gateway_knows_grant(&self, region: &str, grant_id: &str, present: bool) {
        let mut topology = self.mesh().gateway_topology(region).unwrap();
        within(
            "the gateway's grants",
            topology.wait_for(|topology| topology.grants.contains_key(grant_id) == present),
        )
        .await
        .unwrap();
    }

    /// The topology the gateway of `region` routes by, as it changes.
    pub fn gateway_topology(
        &self,
        region: &str,
    ) -> tokio::sync::watch::Receiver<std::sync::Arc<fedmesh_common::topology::Topology>> {
        self.mesh().gateway_topology(region).unwrap()
    }

    /// The control database's URL (SQLite in the data folder).
    pub fn control_database_url(&self) -> String {
        format!(
            "sqlite://{}",
            self.data_dir.path().join("control.sqlite").display()
        )
    }

    /// The number of inboxes the gateway of `region` streams, as it changes.
    pub fn gateway_open_streams(&self, region: &str) -> tokio::sync::watch::Receiver<usize> {
        self.mesh().gateway_open_streams(region).unwrap()
    }

    /// Whether the mesh can do its work (its gateways' readiness).
    pub fn readiness(&self) -> fedmesh_common::telemetry::Readiness {
        self.mesh().readiness()
    }

    /// The relay calls the gateway of `region` made so far.
    pub fn gateway_relay_attempts(
        &self,
        region: &str,
    ) -> std::sync::Arc<fedmesh_gateway::RelayAttempts> {
        self.mesh().gateway_relay_attempts(region).unwrap()
    }

    /// Waits until the gateway of `region` streams exactly `count` inboxes.
    pub async fn open_streams_become(&self, region: &str, count: usize) {
        let mut open_streams = self.mesh().gateway_open_streams(region).unwrap();
        within(
            &format!("{count} open streams on the {region} gateway"),
            open_streams.wait_for(|open| *open == count),
        )
        .await
        .unwrap();
    }

    /// Stops the coordinator alone; the rest of the mesh keeps running.
    pub async fn stop_coordinator(&mut self) {
        within(
            "the coordinator to stop",
            self.mesh.as_mut().unwrap().stop_coordinator(),
        )
        .await
        .unwrap();
    }

    /// URL of the gateway of `region`.
    pub fn gateway_url(&self, region: &str) -> String {
        self.mesh()
            .gateway_urls
            .iter()
            .find(|(name, _)| name == region)
            .map(|(_, url)| url.clone())
            .unwrap()
    }

    /// The coordinator's URL.
    pub fn coordinator_url(&self) -> String {
        self.mesh().coordinator_url.clone()
    }

    /// The notifier's URL.
    pub fn notifier_url(&self) -> String {
        self.mesh().notifier_url.clone()
    }

    /// The directory, as an operator.
    pub fn directory(&self) -> pb::directory_client::DirectoryClient<Authenticated> {
        self.directory_as(&Identity::Operator("test".into()))
    }

    /// The directory, as `identity`.
    pub fn directory_as(
        &self,
        identity: &Identity,
    ) -> pb::directory_client::DirectoryClient<Authenticated> {
        let (channel, attach) = self.channel_as(&self.mesh().coordinator_url, identity);
        pb::directory_client::DirectoryClient::with_interceptor(channel, attach)
    }

    /// The Exchange of `region`'s gateway, acting as agency `agency_id`.
    pub fn exchange(
        &self,
        region: &str,
        agency_id: &str,
    ) -> pb::exchange_client::ExchangeClient<Authenticated> {
        self.exchange_at(&self.gateway_url(region), agency_id)
    }

    /// The notifier, as an operator.
    pub fn notifications(&self) -> pb::notifications_client::NotificationsClient<Authenticated> {
        self.notifications_as(&Identity::Operator("test".into()))
    }

    /// Registers `agency_id` in `region`.
    pub async fn register(&self, agency_id: &str, region: &str) {
        self.directory()
            .register_agency(pb::RegisterAgencyRequest {
                agency_id: agency_id.into(),
                region: region.into(),
                display_name: String::new(),
                shard: String::new(),
            })
            .await
            .unwrap();
    }

    /// Sends `body` from `sender_id` (homed in `region`) to `recipient_id`.
    pub async fn send(
        &self,
        region: &str,
        sender_id: &str,
        recipient_id: &str,
        body: &str,
        idempotency_key: Option<&str>,
    ) -> Result<pb::Receipt, Status> {
        let response = self
            .exchange(region, sender_id)
            .send(send_request(sender_id, recipient_id, body, idempotency_key))
            .await?;
        Ok(response.into_inner().receipt.unwrap())
    }

    /// Opens the inbox of `agency_id` on the gateway of `region`.
    pub async fn open_inbox(
        &self,
        region: &str,
        agency_id: &str,
        window: u32,
    ) -> Result<Inbox, Status> {
        Inbox::open(self.exchange(region, agency_id), agency_id, window).await
    }

    /// Every agency in the directory.
    pub async fn agency_ids(&self) -> Vec<String> {
        let page = self
            .directory()
            .list_agencies(pb::ListAgenciesRequest::default())
            .await
            .unwrap()
            .into_inner();
        page.agencies
            .into_iter()
            .map(|agency| agency.agency_id)
            .collect()
    }
}

impl Drop for TestMesh {
    fn drop(&mut self) {
        if let Some(mesh) = &self.mesh {
            mesh.shutdown_token().cancel();
        }
        // The databases are dropped with FORCE, closing what is still open.
        self.databases.clear();
    }
}

/// A message from `sender` to `recipient` of `kind`, as a gateway of
/// `origin` relays it.
pub fn forward_request(
    sender: &str,
    recipient: &str,
    kind: &str,
    origin: &str,
) -> pb::ForwardRequest {
    pb::ForwardRequest {
        message: Some(pb::Message {
            message_id: uuid::Uuid::now_v7().to_string(),
            sender_id: sender.into(),
            recipient_id: recipient.into(),
            kind: kind.into(),
            payload: b"relayed".to_vec(),
            accepted_at: Some(prost_types::Timestamp::default()),
            origin_region: origin.into(),
            ..Default::default()
        }),
        idempotency_key: None,
        timeout_micros: 0,
    }
}

/// A `Send` request with kind `test.note`.
pub fn send_request(
    sender_id: &str,
    recipient_id: &str,
    body: &str,
    idempotency_key: Option<&str>,
) -> pb::SendRequest {
    pb::SendRequest {
        sender_id: sender_id.into(),
        recipient_id: recipient_id.into(),
        kind: "test.note".into(),
        payload: body.as_bytes().to_vec(),
        headers: Default::default(),
        idempotency_key: idempotency_key.map(str::to_string),
    }
}

/// One open Receive stream.
pub struct Inbox {
    requests: mpsc::Sender<pb::ReceiveRequest>,
    responses: tonic::Streaming<pb::ReceiveResponse>,
}

/// What the stream said next.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Next {
    /// A delivery.
    Delivery(pb::Delivery),
    /// Nothing more to deliver for now.
    Idle,
    /// The stream ended with this status (None: ended cleanly).
    Ended(Option<Status>),
}

impl Inbox {
    /// Opens an inbox stream on `exchange`.
    pub async fn open(
        mut exchange: pb::exchange_client::ExchangeClient<Authenticated>,
        agency_id: &str,
        window: u32,
    ) -> Result<Inbox, Status> {
        let (requests, outbound) = mpsc::channel(64);
        requests
            .send(pb::ReceiveRequest {
                request: Some(pb::receive_request::Request::Open(pb::OpenInbox {
                    agency_id: agency_id.into(),
                    window,
                })),
            })
            .await
            .unwrap();
        let responses = exchange
            .receive(tokio_stream::wrappers::ReceiverStream::new(outbound))
            .await?
            .into_inner();
        Ok(Inbox {
            requests,
            responses,
        })
    }

    /// The next thing the stream says.
    pub async fn next(&mut self) -> Next {
        match within("the inbox stream", self.responses.message()).await {
            Ok(Some(pb::ReceiveResponse {
                response: Some(pb::receive_response::Response::Delivery(delivery)),
            })) => Next::Delivery(delivery),
            Ok(Some(_)) => Next::Idle,
            Ok(None) => Next::Ended(None),
            Err(status) => Next::Ended(Some(status)),
        }
    }

    /// Deliveries up to the next Idle.
    pub async fn drain(&mut self) -> Vec<pb::Delivery> {
        let mut deliveries = Vec::new();
        loop {
            match self.next().await {
                Next::Delivery(delivery) => deliveries.push(delivery),
                Next::Idle => return deliveries,
                Next::Ended(status) => panic!("inbox stream ended: {status:?}"),
            }
        }
    }

    /// Waits for the next delivery, skipping Idle markers.
    pub async fn next_delivery(&mut self) -> pb::Delivery {
        loop {
            match self.next().await {
                Next::Delivery(delivery) => return delivery,
                Next::Idle => {}
                Next::Ended(status) => panic!("inbox stream ended: {status:?}"),
            }
        }
    }

    /// Takes the next `count` deliveries, acknowledging each, and returns
    /// their bodies by sender in the order delivered; asserts each message
    /// came once and the sequences are the inbox's first `count` (nothing
    /// was stored twice).
    pub async fn bodies_by_sender(
        &mut self,
        count: usize,
    ) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut received: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let mut ids = std::collections::BTreeSet::new();
        let mut last_sequence = 0;
        for _ in 0..count {
            let delivery = self.next_delivery().await;
            assert!(delivery.sequence > last_sequence, "in sequence order");
            last_sequence = delivery.sequence;
            let message = delivery.message.as_ref().unwrap();
            assert!(ids.insert(message.message_id.clone()), "delivered once");
            received
                .entry(message.sender_id.clone())
                .or_default()
                .push(body(&delivery));
            self.ack(&[delivery.sequence]).await;
        }
        assert_eq!(last_sequence, count as u64, "nothing stored twice");
        received
    }

    /// Acknowledges `sequences`.
    pub async fn ack(&self, sequences: &[u64]) {
        self.requests
            .send(pb::ReceiveRequest {
                request: Some(pb::receive_request::Request::Ack(pb::Ack {
                    sequences: sequences.to_vec(),
                    up_to: 0,
                })),
            })
            .await
            .unwrap();
    }

    /// Reads until the stream ends, skipping deliveries and idle markers;
    /// returns how many deliveries came first and the ending status.
    pub async fn until_end(&mut self) -> (usize, Option<Status>) {
        let mut n_deliveries = 0;
        loop {
            match self.next().await {
                Next::Delivery(_) => n_deliveries += 1,
                Next::Idle => {}
                Next::Ended(status) => return (n_deliveries, status),
            }
        }
    }

    /// Closes the client side and waits for the gateway to end the stream,
    /// so that every ack sent was applied.
    pub async fn close(self) {
        let Inbox {
            requests,
            mut responses,
        } = self;
        drop(requests);
        within("the inbox stream to end", async {
            while let Ok(Some(_)) = responses.message().await {}
        })
        .await;
    }
}

/// The status code and body of `GET path` over HTTP/1.1 at `address`.
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    within(
        &format!("the answer to GET {path}"),
        stream.read_to_string(&mut answer),
    )
    .await
    .unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The payload of a delivery, as text.
pub fn body(delivery: &pb::Delivery) -> String {
    String::from_utf8(delivery.message.as_ref().unwrap().payload.clone()).unwrap()
}

/// Asserts that `result` failed with `code`, and returns the status.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    match result {
        Err(status) if status.code() == code => status,
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

/// Runs each named `async fn(Bus)` as a test on every event bus: an
/// `in_process` and a `rabbitmq` module with one `#[tokio::test]` per name.
/// The in-process bus stands in for RabbitMQ in the dev mesh, so both pass
/// the same tests.
#[macro_export]
macro_rules! on_every_bus {
    ($($test:ident),* $(,)?) => {
        mod in_process {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::Bus::InProcess).await;
                }
            )*
        }
        mod rabbitmq {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::Bus::RabbitMq).await;
                }
            )*
        }
    };
}

/// Runs each named `async fn(Backend)` as a test on every backend: a
/// `sqlite` and a `postgres` module with one `#[tokio::test]` per name.
#[macro_export]
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::Backend::Postgres).await;
                }
            )*
        }
    };
}

/// A `Consume` stream of a durable subscription, as its subscriber.
pub struct Consumer {
    requests: mpsc::Sender<pb::ConsumeRequest>,
    deliveries: tonic::Streaming<pb::EventDelivery>,
}

impl Consumer {
    /// Starts consuming `subscription` through `notifications`, at most
    /// `prefetch` deliveries unacknowledged.
    pub async fn open(
        notifications: pb::notifications_client::NotificationsClient<Authenticated>,
        subscription: &str,
        prefetch: u32,
    ) -> Result<Consumer, Status> {
        Consumer::start(
            notifications,
            pb::ConsumeStart {
                subscription: subscription.into(),
                prefetch,
                cloudevents: false,
            },
        )
        .await
    }

    /// Starts consuming as `start` asks.
    pub async fn start(
        mut notifications: pb::notifications_client::NotificationsClient<Authenticated>,
        start: pb::ConsumeStart,
    ) -> Result<Consumer, Status> {
        let (requests, outgoing) = mpsc::channel(16);
        let start = pb::ConsumeRequest {
            request: Some(pb::consume_request::Request::Start(start)),
        };
        requests.send(start).await.unwrap();
        let deliveries = notifications
            .consume(tokio_stream::wrappers::ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        Ok(Consumer {
            requests,
            deliveries,
        })
    }

    /// The next delivery; fails the test if the stream ends first.
    pub async fn next(&mut self) -> pb::EventDelivery {
        within("a delivery", self.deliveries.message())
            .await
            .unwrap_or_else(|status| panic!("the stream ended: {status:?}"))
            .expect("the stream ended without a status")
    }

    /// Acknowledges deliveries.
    pub async fn ack(&self, delivery_ids: &[u64]) {
        let ack = pb::ConsumeRequest {
            request: Some(pb::consume_request::Request::Ack(pb::ConsumeAck {
                delivery_ids: delivery_ids.to_vec(),
            })),
        };
        self.requests.send(ack).await.unwrap();
    }

    /// Ends the stream as a subscriber that is done does: its acks are
    /// applied when this returns; what it did not acknowledge goes back.
    pub async fn close(self) {
        let Consumer {
            requests,
            mut deliveries,
        } = self;
        drop(requests);
        loop {
            match within("the stream to close", deliveries.message()).await {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(status) => panic!("the stream failed instead of closing: {status:?}"),
            }
        }
    }

    /// How the stream ends, after any deliveries still on their way.
    pub async fn ended(&mut self) -> Status {
        loop {
            match within("the stream to end", self.deliveries.message()).await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    }
}

/// A subscription request for `create_subscription`.
pub fn subscription(name: &str, agencies: &[&str], kinds: &[&str]) -> pb::Subscription {
    pb::Subscription {
        name: name.into(),
        agencies: agencies.iter().map(|agency| agency.to_string()).collect(),
        kinds: kinds.iter().map(|kind| kind.to_string()).collect(),
        ..Default::default()
    }
}

impl TestMesh {
    /// Creates `subscription` as `identity`.
    pub async fn create_subscription(
        &self,
        identity: &Identity,
        subscription: pb::Subscription,
    ) -> Result<pb::Subscription, Status> {
        let response = self
            .directory_as(identity)
            .create_subscription(pb::CreateSubscriptionRequest {
                subscription: Some(subscription),
            })
            .await?;
        Ok(response.into_inner().subscription.unwrap())
    }

    /// The notifier, as `identity`.
    pub fn notifications_as(
        &self,
        identity: &Identity,
    ) -> pb::notifications_client::NotificationsClient<Authenticated> {
        self.notifications_at(&self.mesh().notifier_url, identity)
    }

    /// The notifier at `url`, as `identity`.
    pub fn notifications_at(
        &self,
        url: &str,
        identity: &Identity,
    ) -> pb::notifications_client::NotificationsClient<Authenticated> {
        let (channel, attach) = self.channel_as(url, identity);
        pb::notifications_client::NotificationsClient::with_interceptor(channel, attach)
    }

    /// Starts another notifier replica; returns its URL.
    pub async fn add_notifier(&mut self, notifier_id: &str) -> String {
        let mesh = self.mesh.as_mut().unwrap();
        within("the new notifier", mesh.add_notifier(notifier_id))
            .await
            .unwrap()
    }

    /// Waits until the topology lists notifier `notifier_id`.
    pub async fn notifier_known(&self, notifier_id: &str) {
        let mut topology = self.mesh().gateway_topology("east").unwrap();
        within(
            "the notifier in the topology",
            topology.wait_for(|topology| topology.notifiers.contains_key(notifier_id)),
        )
        .await
        .unwrap();
    }

    /// Stops a notifier started with [`TestMesh::add_notifier`].
    pub fn stop_notifier(&mut self, notifier_id: &str) {
        self.mesh
            .as_mut()
            .unwrap()
            .stop_notifier(notifier_id)
            .unwrap();
    }
}
