//! Serving a role's gRPC services: every server also answers
//! `grpc.health.v1` and server reflection, bounds what one connection and
//! one request may hold, notices clients that vanished (HTTP/2 and TCP
//! keepalive), and stops gracefully when its shutdown token is cancelled
//! (streams are ended by their handlers, unary calls in flight finish).
//!
//! A request message over the server's size limit is refused before it is
//! read, with the status the role builds for it (naming the limit that
//! applies), instead of the codec's "message length too large".
//!
//! [`Security`] is how a role's server and clients protect their
//! connections: mutual TLS ([`crate::tls`]) with the authorization layer of
//! [`crate::auth`] in front of every service, or, for development only and
//! only on loopback, plaintext with identity headers.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body as _, Frame};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::service::Routes;

use crate::auth::{
    AuditSink, AuditSlot, AuthLayer, Authentication, DenyList, Guard, PeerInfo, RateLimitSettings,
};
use crate::config::{ConfigError, check_range};
use crate::identity::{AttachIdentity, Identity};
use crate::tls::{ExpectedServer, MeshTls, TlsError, TlsSettings, certificate_identity};

/// Builds the status for a request message of the given size over the limit.
pub type RefuseOversized = Arc<dyn Fn(usize) -> tonic::Status + Send + Sync>;

/// How a server bounds and watches its connections.
#[derive(Clone)]
pub struct ServeOptions {
    /// Largest request message read; larger ones get `refuse_oversized`.
    pub max_request_bytes: usize,
    /// The status of a request over `max_request_bytes`.
    pub refuse_oversized: RefuseOversized,
    /// Most concurrent calls (HTTP/2 streams) per connection.
    pub max_concurrent_streams: u32,
    /// How often an idle connection is pinged (HTTP/2 PING).
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Idle time before TCP keepalive probes start.
    pub tcp_keepalive: Duration,
    /// TLS and the authorization layer.
    pub security: Security,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ServeOptions")
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_concurrent_streams", &self.max_concurrent_streams)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("tcp_keepalive", &self.tcp_keepalive)
            .field("security", &self.security)
            .finish_non_exhaustive()
    }
}

/// How a server treats its connections: settings every role has, under
/// `[connections]` in its config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionSettings {
    /// Most concurrent calls (HTTP/2 streams) on one client connection.
    #[arg(long, env = "FEDMESH_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,
    /// How often each connection is pinged (HTTP/2 PING), in milliseconds;
    /// a client that vanished is noticed by its missing answer.
    #[arg(long, env = "FEDMESH_KEEPALIVE_INTERVAL_MS", default_value_t = 30_000)]
    pub keepalive_interval_ms: u64,
    /// How long a ping may go unanswered, in milliseconds, before the
    /// connection is closed and its calls end.
    #[arg(long, env = "FEDMESH_KEEPALIVE_TIMEOUT_MS", default_value_t = 20_000)]
    pub keepalive_timeout_ms: u64,
    /// Idle seconds before TCP keepalive probes start on a connection.
    #[arg(long, env = "FEDMESH_TCP_KEEPALIVE_SECS", default_value_t = 60)]
    pub tcp_keepalive_secs: u64,
    /// On SIGTERM (or Ctrl-C), how long the role answers `/readyz` 503
    /// while still serving, in milliseconds, so that load balancers and DNS
    /// take it out before its streams end.
    #[arg(long, env = "FEDMESH_DRAIN_DELAY_MS", default_value_t = 5_000)]
    #[serde(default = "default_drain_delay_ms")]
    pub drain_delay_ms: u64,
    /// Then, how long its calls and writes may take to finish, in seconds,
    /// before the process exits anyway.
    #[arg(long, env = "FEDMESH_GRACE_SECS", default_value_t = 30)]
    #[serde(default = "default_grace_secs")]
    pub grace_secs: u64,
}

fn default_drain_delay_ms() -> u64 {
    5_000
}

fn default_grace_secs() -> u64 {
    30
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        crate::config::defaults()
    }
}

impl ConnectionSettings {
    /// Refuses values a server cannot use.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range(
            "max_concurrent_streams",
            self.max_concurrent_streams,
            1..=100_000,
        )?;
        check_range(
            "keepalive_interval_ms",
            self.keepalive_interval_ms,
            10..=86_400_000,
        )?;
        check_range(
            "keepalive_timeout_ms",
            self.keepalive_timeout_ms,
            10..=86_400_000,
        )?;
        check_range("tcp_keepalive_secs", self.tcp_keepalive_secs, 1..=86_400)?;
        check_range("drain_delay_ms", self.drain_delay_ms, 0..=600_000)?;
        check_range("grace_secs", self.grace_secs, 1..=3_600)?;
        Ok(())
    }
}

/// How prost's decode errors begin.
const DECODE_ERROR: &str = "failed to decode Protobuf message";

/// A request message that is not the protobuf message of its method.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the request is not a valid message of this method ({0}); check the client's .proto files")]
pub struct MalformedRequest(String);

impl MalformedRequest {
    /// The malformed request a request stream's error reports, if it is
    /// one (the codec's decode error), rather than the client going away.
    pub fn in_stream(status: &tonic::Status) -> Option<MalformedRequest> {
        (status.code() == tonic::Code::Internal && status.message().starts_with(DECODE_ERROR))
            .then(|| MalformedRequest(status.message().to_string()))
    }
}

impl crate::error::ServiceError for MalformedRequest {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::InvalidArgument
    }
}

/// A request message over a server's size limit.
#[derive(Debug, Clone, thiserror::Error)]
#[error("request message is {size} bytes, this server reads at most {limit} bytes")]
pub struct RequestTooLarge {
    /// The message's size.
    pub size: usize,
    /// The limit.
    pub limit: usize,
}

impl crate::error::ServiceError for RequestTooLarge {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::ResourceExhausted
    }
}

impl ServeOptions {
    /// Options from `connections` that refuse requests over `max_request_bytes`
    /// with [`RequestTooLarge`].
    pub fn new(
        connections: ConnectionSettings,
        security: Security,
        max_request_bytes: usize,
    ) -> Self {
        ServeOptions::refusing(connections, security, max_request_bytes, move |size| {
            crate::error::to_status(&RequestTooLarge {
                size,
                limit: max_request_bytes,
            })
        })
    }

    /// Options from `connections` that refuse requests over
    /// `max_request_bytes` with the status `refuse` builds.
    pub fn refusing(
        connections: ConnectionSettings,
        security: Security,
        max_request_bytes: usize,
        refuse: impl Fn(usize) -> tonic::Status + Send + Sync + 'static,
    ) -> Self {
        ServeOptions {
            max_request_bytes,
            refuse_oversized: Arc::new(refuse),
            max_concurrent_streams: connections.max_concurrent_streams,
            keepalive_interval: Duration::from_millis(connections.keepalive_interval_ms),
            keepalive_timeout: Duration::from_millis(connections.keepalive_timeout_ms),
            tcp_keepalive: Duration::from_secs(connections.tcp_keepalive_secs),
            security,
        }
    }
}

/// Serves `routes` plus health and reflection on `listener` until `shutdown`.
pub async fn serve(
    routes: Routes,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (_health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fedmesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1();
    let routes = match reflection {
        Ok(reflection) => routes.add_service(reflection),
        Err(error) => {
            tracing::warn!(%error, "server reflection unavailable");
            routes
        }
    };
    let incoming = accept(
        listener,
        options.security.tls.clone(),
        options.tcp_keepalive,
        shutdown.clone(),
    );
    tonic::transport::Server::builder()
        .max_concurrent_streams(options.max_concurrent_streams)
        .http2_keepalive_interval(Some(options.keepalive_interval))
        .http2_keepalive_timeout(Some(options.keepalive_timeout))
        .layer(crate::telemetry::GrpcMetricsLayer)
        .layer(AuthLayer::new(options.security.guard.clone()))
        .layer(RequestSizeLayer {
            max_bytes: options.max_request_bytes,
            refuse: options.refuse_oversized,
        })
        .add_routes(routes.add_service(health_service))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

/// Why a role cannot secure its connections as configured.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// The TLS material cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A setting cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Neither TLS nor dev identities are configured.
    #[error(
        "no TLS is configured: give --cert, --key and --ca (`fedmesh certs init DIR` makes a development set), or --dev-identity to serve plaintext on a loopback address for development"
    )]
    Unsecured,
    /// Plaintext was asked for on an address other hosts reach.
    #[error(
        "{0} is not a loopback address: plaintext with --dev-identity is served only on loopback; configure TLS (--cert, --key, --ca) to listen there"
    )]
    PlaintextOffLoopback(String),
}

/// How a role protects its connections: its TLS material (None: plaintext
/// with identity headers, development only), the layer in front of its
/// services, and the identity its clients act as.
#[derive(Debug, Clone)]
pub struct Security {
    /// The component's TLS material, if on TLS.
    pub tls: Option<Arc<MeshTls>>,
    /// What the authorization layer checks.
    pub guard: Guard,
    /// Who this component is when it calls others.
    pub identity: Identity,
    /// Where it records denied calls and certificate rotations.
    pub audit: AuditSlot,
}

impl Security {
    /// The security a role's settings ask for. `listen` is the address its
    /// server listens on, if it serves. Starts the tasks that reload the
    /// TLS files and the deny list until `shutdown`.
    pub fn establish(
        identity: Identity,
        tls: &TlsSettings,
        rate_limits: &RateLimitSettings,
        dev_identity: bool,
        listen: Option<std::net::SocketAddr>,
        shutdown: &CancellationToken,
    ) -> Result<Security, SecurityError> {
        tls.validate()?;
        rate_limits.validate()?;
        let deny_list = tls.deny_list.clone().map(DenyList::load).transpose()?;
        if let Some(deny_list) = &deny_list {
            deny_list.watch(tls.reload_period(), shutdown.clone());
        }
        let material = MeshTls::load(tls, Some(&identity))?;
        let audit = AuditSlot::default();
        let authentication = match (&material, dev_identity) {
            (Some(material), _) => {
                material.watch(shutdown.clone(), audit.clone());
                if dev_identity {
                    tracing::info!(
                        "TLS is configured: identity headers are ignored, --dev-identity has no effect"
                    );
                }
                Authentication::Tls
            }
            (None, true) => {
                if let Some(listen) = listen
                    && !listen.ip().is_loopback()
                {
                    return Err(SecurityError::PlaintextOffLoopback(listen.to_string()));
                }
                tracing::warn!(
                    %identity,
                    "serving plaintext and trusting identity headers from loopback peers: development only"
                );
                Authentication::DevHeader
            }
            (None, false) => return Err(SecurityError::Unsecured),
        };
        let chain = audit_chain(&identity);
        Ok(Security {
            tls: material,
            guard: Guard::new(authentication, deny_list, rate_limits.clone())
                .auditing(audit.clone(), chain),
            identity,
            audit,
        })
    }

    /// Records denied calls and certificate rotations in `sink` from now on.
    pub fn set_audit(&self, sink: Arc<dyn AuditSink>) {
        if self.audit.set(sink).is_err() {
            tracing::warn!("the audit sink was set already");
        }
    }

    /// Plaintext with identity headers from loopback and no rate limit:
    /// the dev mesh and tests.
    pub fn dev(identity: Identity) -> Security {
        let audit = AuditSlot::default();
        Security {
            tls: None,
            guard: Guard::new(
                Authentication::DevHeader,
                None,
                RateLimitSettings::unlimited(),
            )
            .auditing(audit.clone(), audit_chain(&identity)),
            identity,
            audit,
        }
    }

    /// A lazy channel to `address` (`https://host:port`, or `http://` in
    /// dev mode): over mutual TLS when this component has TLS, whatever the
    /// URL's scheme, to the `server` expected there and no other.
    pub fn channel(
        &self,
        address: &str,
        server: ExpectedServer,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        lazy_channel_checked(
            address,
            self.tls.clone(),
            server,
            self.guard.deny_list().cloned(),
        )
    }

    /// What to attach to calls so the peer knows who calls: the identity
    /// header in dev mode, nothing on TLS (the certificate says).
    pub fn attach(&self) -> AttachIdentity {
        match self.tls {
            Some(_) => AttachIdentity::none(),
            None => AttachIdentity::new(&self.identity),
        }
    }

    /// The scheme of this component's URLs: `https` on TLS.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// The audit chain a component writes to: its region for a gateway, the
/// global chain for the others.
pub fn audit_chain(identity: &Identity) -> String {
    match identity {
        Identity::Gateway(region) => region.clone(),
        _ => crate::audit::GLOBAL_CHAIN.to_string(),
    }
}

/// Checks that a role's settings secure its connections: TLS, or
/// `--dev-identity` on a loopback `listen` address.
pub fn check_security(
    tls: &TlsSettings,
    dev_identity: bool,
    listen: &str,
) -> Result<(), ConfigError> {
    tls.validate()?;
    if tls.enabled() {
        // The material is read and checked as the role would at start:
        // files there, a key that matches, a chain to the CA.
        return match MeshTls::load(tls, None) {
            Ok(_) => Ok(()),
            Err(error) => Err(ConfigError::setting("cert", error.to_string())),
        };
    }
    if !dev_identity {
        return Err(ConfigError::setting(
            "cert",
            SecurityError::Unsecured.to_string(),
        ));
    }
    let loopback = listen
        .parse::<std::net::SocketAddr>()
        .map(|address| address.ip().is_loopback())
        .unwrap_or_else(|_| listen.starts_with("localhost:"));
    if !loopback {
        return Err(ConfigError::setting(
            "listen",
            SecurityError::PlaintextOffLoopback(listen.to_string()).to_string(),
        ));
    }
    Ok(())
}

/// Opens a lazy plaintext channel to `address` (an `http://host:port` URL).
pub fn lazy_channel(address: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    lazy_channel_with(address, None, ExpectedServer::Any)
}

/// How often a client pings a connection that has calls open.
const CLIENT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a client waits for a ping's answer before it closes the
/// connection.
const CLIENT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a lazy channel to `address`, over mutual TLS with `tls` if given,
/// to the `server` expected there (a connection to another is refused).
pub fn lazy_channel_with(
    address: &str,
    tls: Option<Arc<MeshTls>>,
    server: ExpectedServer,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    lazy_channel_checked(address, tls, server, None)
}

/// As [`lazy_channel_with`], refusing also a server whose identity or
/// certificate `deny_list` names (a stolen server key).
pub fn lazy_channel_checked(
    address: &str,
    tls: Option<Arc<MeshTls>>,
    server: ExpectedServer,
    deny_list: Option<Arc<DenyList>>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    // HTTP/2 pings while calls are open notice a connection that went
    // dark (no reset, no answer), so the next calls open a new one.
    let endpoint = tonic::transport::Endpoint::from_shared(address.to_string())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(CLIENT_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(CLIENT_KEEPALIVE_TIMEOUT);
    Ok(match tls {
        Some(tls) => endpoint.connect_with_connector_lazy(TlsConnector {
            config: ClientConfigSource::Mesh(tls),
            server,
            deny_list,
        }),
        None => endpoint.connect_lazy(),
    })
}

/// Opens a lazy channel to `address` over TLS with a fixed rustls client
/// configuration (tests present certificates a component would not).
pub fn lazy_channel_with_config(
    address: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    Ok(
        tonic::transport::Endpoint::from_shared(address.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(TlsConnector {
                config: ClientConfigSource::Fixed(config),
                server: ExpectedServer::Any,
                deny_list: None,
            }),
    )
}

#[derive(Clone)]
enum ClientConfigSource {
    /// A component's material, as it is when a connection is made.
    Mesh(Arc<MeshTls>),
    Fixed(Arc<rustls::ClientConfig>),
}

/// Connects to a server over TCP and mutual TLS, with the client
/// configuration current at connection time (rotated certificates are
/// used by new connections).
#[derive(Clone)]
struct TlsConnector {
    config: ClientConfigSource,
    server: ExpectedServer,
    deny_list: Option<Arc<DenyList>>,
}

impl tower::Service<http::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (config, trust_domain) = match &self.config {
            ClientConfigSource::Mesh(tls) => {
                (tls.client_config(), Some(tls.trust_domain().to_string()))
            }
            ClientConfigSource::Fixed(config) => (Arc::clone(config), None),
        };
        let server = self.server.clone();
        let deny_list = self.deny_list.clone();
        Box::pin(async move {
            let invalid =
                |problem: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, problem);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri} names no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|error| invalid(error.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            // The chain was verified in the handshake; here, whose it is.
            if let Some(trust_domain) = trust_domain {
                let found = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|leaf| certificate_identity(leaf, &trust_domain));
                match found {
                    Some(Ok(peer))
                        if deny_list.as_ref().is_some_and(|list| {
                            list.denies(&peer.identity, Some(&peer.serial))
                        }) =>
                    {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            format!("the server at {uri} is {}, which is revoked", peer.identity),
                        ));
                    }
                    Some(Ok(peer)) if server.admits(&peer.identity) => {}
                    Some(Ok(peer)) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            format!("the server at {uri} is {}, not {server}", peer.identity),
                        ));
                    }
                    _ => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            format!("the server at {uri} presented no identity of this mesh"),
                        ));
                    }
                }
            }
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// Most TLS handshakes in progress at once on one listener.
const MAX_HANDSHAKES: usize = 1024;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connections `listener` accepts, each with its TCP options set and,
/// on TLS, its handshake done (each in a task of its own, so a slow client
/// holds up no other) and its peer's certificate read.
fn accept(
    listener: TcpListener,
    tls: Option<Arc<MeshTls>>,
    tcp_keepalive: Duration,
    shutdown: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<MeshStream, std::io::Error>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset
                    // before it was accepted: go on after a pause.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let keepalive = socket2::TcpKeepalive::new().with_time(tcp_keepalive);
            if let Err(error) = stream
                .set_nodelay(true)
                .and_then(|()| socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive))
            {
                tracing::debug!(%error, "cannot set TCP options of a connection");
            }
            let Some(tls) = &tls else {
                let plain = MeshStream {
                    io: Io::Plain(stream),
                    peer: PeerInfo {
                        remote: Some(remote),
                        certificate: None,
                    },
                };
                if sender.send(Ok(plain)).await.is_err() {
                    return;
                }
                continue;
            };
            // At most so many handshakes at once: a flood of connections
            // that never finish theirs is turned away, not queued.
            let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                tracing::warn!(peer = %remote, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
            let trust_domain = tls.trust_domain().to_string();
            let sender = sender.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::info!(peer = %remote, %error, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(peer = %remote, "TLS handshake not finished in time");
                            return;
                        }
                    };
                let certificate = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|leaf| Arc::new(certificate_identity(leaf, &trust_domain)));
                let tls = MeshStream {
                    io: Io::Tls(Box::new(stream)),
                    peer: PeerInfo {
                        remote: Some(remote),
                        certificate,
                    },
                };
                let _ = sender.send(Ok(tls)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// An accepted connection, plaintext or TLS, with what is known of its peer.
struct MeshStream {
    io: Io,
    peer: PeerInfo,
}

enum Io {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

impl tonic::transport::server::Connected for MeshStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl tokio::io::AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_read(context, buffer),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_read(context, buffer),
        }
    }
}

impl tokio::io::AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_write(context, data),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write(context, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_write_vectored(context, buffers),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(context, buffers),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(stream) => stream.is_write_vectored(),
            Io::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_flush(context),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(context),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_shutdown(context),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(context),
        }
    }
}

/// Refuses requests whose first message is over a size, from the length
/// prefix of the gRPC frame, before the message is read.
#[derive(Clone)]
struct RequestSizeLayer {
    max_bytes: usize,
    refuse: RefuseOversized,
}

impl<S> tower::Layer<S> for RequestSizeLayer {
    type Service = RequestSize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSize {
            inner,
            max_bytes: self.max_bytes,
            refuse: Arc::clone(&self.refuse),
        }
    }
}

#[derive(Clone)]
struct RequestSize<S> {
    inner: S,
    max_bytes: usize,
    refuse: RefuseOversized,
}

/// Most frames read looking for the 5-byte prefix (empty DATA frames may
/// come first).
const MAX_PREFIX_FRAMES: usize = 16;

/// The 5 bytes before each gRPC message: a compression flag and the length.
const FRAME_PREFIX: usize = 5;

impl<S> tower::Service<http::Request<Body>> for RequestSize<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The service that was polled ready serves this call; a clone takes
        // its place for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let max_bytes = self.max_bytes;
        let refuse = Arc::clone(&self.refuse);
        Box::pin(async move {
            let (parts, mut body) = request.into_parts();
            let mut replay = Replay {
                read: VecDeque::new(),
                rest: Body::empty(),
            };
            if let Some(size) = first_message_size(&mut body, &mut replay.read).await
                && size > max_bytes
            {
                return Ok(refuse(size).into_http());
            }
            replay.rest = body;
            let response = inner
                .call(http::Request::from_parts(parts, Body::new(replay)))
                .await?;
            // The codec answers a request that is not protobuf with
            // INTERNAL; the caller is told it is its request that is wrong.
            if let Some(status) = tonic::Status::from_header_map(response.headers())
                && status.code() == tonic::Code::Internal
                && status.message().starts_with(DECODE_ERROR)
            {
                return Ok(crate::error::to_status(&MalformedRequest(
                    status.message().to_string(),
                ))
                .into_http());
            }
            Ok(response)
        })
    }
}

/// Reads `body` up to the length prefix of its first gRPC message, keeping
/// the frames read in `read`; the message's size, if the body has one. The
/// first frame nearly always holds the whole prefix.
async fn first_message_size(
    body: &mut Body,
    read: &mut VecDeque<Result<Frame<Bytes>, tonic::Status>>,
) -> Option<usize> {
    let mut prefix = [0_u8; FRAME_PREFIX];
    let mut n_prefix = 0;
    while n_prefix < FRAME_PREFIX {
        let frame =
            std::future::poll_fn(|context| Pin::new(&mut *body).poll_frame(context)).await?;
        let data = frame.as_ref().ok().and_then(Frame::data_ref);
        let Some(data) = data else {
            // Trailers or a broken body: let the service see them.
            read.push_back(frame);
            return None;
        };
        if read.len() >= MAX_PREFIX_FRAMES {
            // Empty frames without end: the service reads the rest.
            read.push_back(frame);
            return None;
        }
        let taken = (FRAME_PREFIX - n_prefix).min(data.len());
        prefix[n_prefix..n_prefix + taken].copy_from_slice(&data[..taken]);
        n_prefix += taken;
        read.push_back(frame);
    }
    let mut length = &prefix[1..];
    usize::try_from(length.get_u32()).ok()
}

/// A request body whose first frames were read already.
struct Replay {
    read: VecDeque<Result<Frame<Bytes>, tonic::Status>>,
    rest: Body,
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(frame) = self.read.pop_front() {
            return Poll::Ready(Some(frame));
        }
        Pin::new(&mut self.rest).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }
}
