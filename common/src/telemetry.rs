//! TRANSPORT (operations): what a role shows operators besides its gRPC
//! API: metrics for Prometheus and health on an admin HTTP listener.
//!
//! - The process records metrics through the `metrics` crate's macros into
//!   one Prometheus recorder ([`recorder`], installed once per process; the
//!   roles of `fedmesh dev` share it, told apart by their labels).
//! - [`GrpcMetricsLayer`] counts every gRPC call a server answers, by
//!   service, method and status code, and times it (to the end of its
//!   answer: a stream's whole life).
//! - [`serve_admin`] serves `/metrics` (the Prometheus text format),
//!   `/healthz` (the process answers) and `/readyz` (the role can do its
//!   work: what [`Readiness`] says, 503 with the reasons when not).
//!
//! Label sets are bounded: a method, a status code, a region, a shard; no
//! agency ids.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use bytes::Bytes;
use http_body::Frame;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;

/// gRPC calls answered, by `service`, `method` and `code`.
pub const GRPC_REQUESTS: &str = "fedmesh_grpc_server_requests_total";
/// How long gRPC calls took, to the end of their answer, by `service` and
/// `method`.
pub const GRPC_DURATION: &str = "fedmesh_grpc_server_request_duration_seconds";

/// Histogram buckets, in seconds: 100 µs to 30 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];
/// Batch-size buckets, in writes.
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The process's recorder, installed on first use.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_batch_size".into()),
                    SIZE_BUCKETS,
                )
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was installed already: fedmesh's metrics go there");
        }
        describe();
        handle
    })
}

/// The help text of the metrics every role records.
fn describe() {
    metrics::describe_counter!(
        GRPC_REQUESTS,
        "gRPC calls answered, by service, method and status code"
    );
    metrics::describe_histogram!(
        GRPC_DURATION,
        metrics::Unit::Seconds,
        "how long gRPC calls took, to the end of their answer"
    );
}

// === gRPC ===

/// Counts and times the calls of the service it wraps.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        // Installed before the first call is counted.
        let _ = recorder();
        GrpcMetrics { inner }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let call = CallMetrics::start(request.uri().path());
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            let (parts, body) = response.into_parts();
            // A call refused at once has its status in the headers.
            let code = parts.headers.get("grpc-status").cloned();
            let mut body = CountedBody {
                inner: body,
                call: Some(call),
            };
            if let Some(code) = code {
                body.finish(Some(&code));
            }
            Ok(http::Response::from_parts(parts, Body::new(body)))
        })
    }
}

/// One call being answered.
struct CallMetrics {
    service: String,
    method: String,
    started: Instant,
}

impl CallMetrics {
    /// `path` is `/package.Service/Method`.
    fn start(path: &str) -> CallMetrics {
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let service = parts.next().unwrap_or_default();
        let method = parts.next().unwrap_or_default();
        CallMetrics {
            service: service.to_string(),
            method: method.to_string(),
            started: Instant::now(),
        }
    }

    fn record(self, code: &'static str) {
        metrics::counter!(
            GRPC_REQUESTS,
            "service" => self.service.clone(),
            "method" => self.method.clone(),
            "code" => code
        )
        .increment(1);
        metrics::histogram!(
            GRPC_DURATION,
            "service" => self.service,
            "method" => self.method
        )
        .record(self.started.elapsed().as_secs_f64());
    }
}

/// An answer's body, which records its call when its status is known.
struct CountedBody {
    inner: Body,
    call: Option<CallMetrics>,
}

impl CountedBody {
    /// Records the call with `status` (a `grpc-status` value; none: the
    /// answer ended without one, as when the client went away).
    fn finish(&mut self, status: Option<&http::HeaderValue>) {
        if let Some(call) = self.call.take() {
            let code = status
                .and_then(|status| status.to_str().ok())
                .and_then(|status| status.parse::<i32>().ok())
                .map_or("CANCELLED", |code| {
                    crate::error::code_name(tonic::Code::from_i32(code))
                });
            call.record(code);
        }
    }
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(context);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let status = trailers.get("grpc-status").cloned();
                    self.finish(status.as_ref());
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => self.finish(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        self.finish(None);
    }
}

// === admin listener ===

/// Refuses an `admin_listen` setting that is not an address to listen on.
pub fn check_admin_listen(admin_listen: Option<&str>) -> Result<(), crate::config::ConfigError> {
    match admin_listen {
        Some(address) if address.parse::<std::net::SocketAddr>().is_err() => {
            Err(crate::config::ConfigError::setting(
                "admin_listen",
                format!("{address:?} is not IP:PORT, e.g. 0.0.0.0:9090"),
            ))
        }
        _ => Ok(()),
    }
}

/// Whether a role can do its work; the reasons it cannot when not.
pub type Readiness =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Vec<String>> + Send>> + Send + Sync>;

/// A readiness that is always ready.
pub fn always_ready() -> Readiness {
    Arc::new(|| Box::pin(async { Vec::new() }))
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until
/// `shutdown`; once `draining` is cancelled (a role stopping, finishing
/// its work) `/readyz` answers 503 whatever `readiness` says.
pub async fn serve_admin(
    listener: TcpListener,
    readiness: Readiness,
    draining: CancellationToken,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let handle = recorder().clone();
    let upkeep = {
        let handle = handle.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = every.tick() => handle.run_upkeep(),
                }
            }
        })
    };
    let router = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        handle.render(),
                    )
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let readiness = Arc::clone(&readiness);
                let draining = draining.clone();
                async move {
                    let mut unmet = if draining.is_cancelled() {
                        vec!["stopping".to_string()]
                    } else {
                        readiness().await
                    };
                    if unmet.is_empty() {
                        (StatusCode::OK, "ready\n".to_string()).into_response()
                    } else {
                        unmet.push(String::new());
                        (StatusCode::SERVICE_UNAVAILABLE, unmet.join("\n")).into_response()
                    }
                }
            }),
        );
    let address = listener.local_addr()?;
    tracing::info!(%address, "admin listener serving /metrics, /healthz and /readyz");
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    upkeep.abort();
    served
}
