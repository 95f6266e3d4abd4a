//! Serving a role's gRPC services: every server also answers
//! `grpc.health.v1` and server reflection, bounds what one connection and
//! one request may hold, notices clients that vanished (HTTP/2 and TCP
//! keepalive), and stops gracefully when its shutdown token is cancelled
//! (streams are ended by their handlers, unary calls in flight finish).
//!
//! A request message over the server's size limit is refused before it is
//! read, with the status the role builds for it (naming the limit that
//! applies), instead of the codec's "message length too large".

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

use crate::config::{ConfigError, check_range};

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
        Ok(())
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
    pub fn new(connections: ConnectionSettings, max_request_bytes: usize) -> Self {
        ServeOptions::refusing(connections, max_request_bytes, move |size| {
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
    // TCP keepalive is set on the incoming stream: the server's own setting
    // is ignored with `serve_with_incoming_shutdown`.
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(options.tcp_keepalive));
    tonic::transport::Server::builder()
        .max_concurrent_streams(options.max_concurrent_streams)
        .http2_keepalive_interval(Some(options.keepalive_interval))
        .http2_keepalive_timeout(Some(options.keepalive_timeout))
        .layer(RequestSizeLayer {
            max_bytes: options.max_request_bytes,
            refuse: options.refuse_oversized,
        })
        .add_routes(routes.add_service(health_service))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

/// Opens a lazy channel to `address` (an `http://host:port` URL).
pub fn lazy_channel(address: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    Ok(
        tonic::transport::Endpoint::from_shared(address.to_string())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy(),
    )
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
            inner
                .call(http::Request::from_parts(parts, Body::new(replay)))
                .await
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
