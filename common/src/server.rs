//! Serving a role's gRPC services: every server also answers
//! `grpc.health.v1` and server reflection, and stops gracefully when its
//! shutdown token is cancelled (streams are ended by their handlers, unary
//! calls in flight finish).

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// Serves `routes` plus health and reflection on `listener` until `shutdown`.
pub async fn serve(
    routes: Routes,
    listener: TcpListener,
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
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_routes(routes.add_service(health_service))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

/// Opens a lazy channel to `address` (an `http://host:port` URL).
pub fn lazy_channel(address: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    Ok(
        tonic::transport::Endpoint::from_shared(address.to_string())?
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect_lazy(),
    )
}
