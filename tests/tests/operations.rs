//! What operators see: the admin listener (`/healthz`, `/readyz`,
//! `/metrics`) and the series a mesh exports once it worked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fedmesh_common::telemetry::{Readiness, serve_admin};
use fedmesh_tests::{TestMesh, http_get, within};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Whether `text` (the Prometheus text format) has a sample of `name` with
/// every label of `labels`.
fn has_series(text: &str, name: &str, labels: &[(&str, &str)]) -> bool {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.strip_prefix(name))
        .filter(|rest| rest.starts_with('{') || rest.starts_with(' '))
        .any(|rest| {
            labels
                .iter()
                .all(|(key, value)| rest.contains(&format!("{key}=\"{value}\"")))
        })
}

#[tokio::test]
async fn the_admin_listener_says_alive_ready_or_why_not_and_unready_while_draining() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let topology_loaded = Arc::new(AtomicBool::new(false));
    let readiness: Readiness = {
        let topology_loaded = Arc::clone(&topology_loaded);
        Arc::new(move || {
            let loaded = topology_loaded.load(Ordering::SeqCst);
            Box::pin(async move {
                if loaded {
                    Vec::new()
                } else {
                    vec!["no topology yet".to_string()]
                }
            })
        })
    };
    let draining = CancellationToken::new();
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(serve_admin(
        listener,
        readiness,
        draining.clone(),
        shutdown.clone(),
    ));

    assert_eq!(
        http_get(address, "/healthz").await,
        (200, "ok\n".to_string())
    );
    let (status, body) = http_get(address, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("no topology yet"), "{body}");
    topology_loaded.store(true, Ordering::SeqCst);
    assert_eq!(http_get(address, "/readyz").await.0, 200);

    metrics::counter!("fedmesh_admin_test_total", "region" => "east").increment(3);
    let (status, body) = http_get(address, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        has_series(&body, "fedmesh_admin_test_total", &[("region", "east")])
            && body.contains("fedmesh_admin_test_total{region=\"east\"} 3"),
        "{body}"
    );

    // Draining: unready, still alive.
    draining.cancel();
    assert_eq!(http_get(address, "/readyz").await.0, 503);
    assert_eq!(http_get(address, "/healthz").await.0, 200);
    shutdown.cancel();
    served.await.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(address).await.is_err());
}

#[tokio::test]
async fn a_dev_mesh_is_ready_and_exports_the_signals_of_a_relayed_send() {
    let mesh = TestMesh::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_admin(
        listener,
        mesh.readiness(),
        shutdown.clone(),
        shutdown.clone(),
    ));
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;
    mesh.gateway_knows("east", &["tax-office", "land-registry"])
        .await;
    let (status, body) = http_get(address, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    mesh.send("east", "tax-office", "land-registry", "counted", None)
        .await
        .unwrap();
    let (status, metrics) = http_get(address, "/metrics").await;
    assert_eq!(status, 200);
    let expected: &[(&str, &[(&str, &str)])] = &[
        (
            "fedmesh_grpc_server_requests_total",
            &[
                ("service", "fedmesh.v1.Exchange"),
                ("method", "Send"),
                ("code", "OK"),
            ],
        ),
        (
            "fedmesh_grpc_server_requests_total",
            &[
                ("service", "fedmesh.v1.Relay"),
                ("method", "ForwardBatch"),
                ("code", "OK"),
            ],
        ),
        (
            "fedmesh_grpc_server_request_duration_seconds_bucket",
            &[("method", "Send"), ("le", "+Inf")],
        ),
        (
            "fedmesh_relay_attempts_total",
            &[("region", "west"), ("attempt", "first")],
        ),
        (
            "fedmesh_commit_batch_size_bucket",
            &[("shard", "west-1"), ("kind", "messages")],
        ),
        (
            "fedmesh_commit_duration_seconds_count",
            &[("shard", "west-1"), ("kind", "messages")],
        ),
        (
            "fedmesh_commit_duration_seconds_count",
            &[("shard", "east-1"), ("kind", "spool_checks")],
        ),
        ("fedmesh_gateway_topology_version", &[("gateway", "east-0")]),
        ("fedmesh_gateway_open_streams", &[("gateway", "west-0")]),
    ];
    for (name, labels) in expected {
        assert!(
            has_series(&metrics, name, labels),
            "no {name} {labels:?} in:\n{metrics}"
        );
    }
    // The coordinator leads; the send's event left its shard's outbox
    // (asynchronously: scraped until it shows, as Prometheus would).
    assert!(has_series(&metrics, "fedmesh_coordinator_leading", &[]));
    let metrics = within("the outbox's series", async {
        loop {
            let (_, metrics) = http_get(address, "/metrics").await;
            if has_series(&metrics, "fedmesh_outbox_rows_published_total", &[]) {
                return metrics;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(has_series(
        &metrics,
        "fedmesh_outbox_publish_duration_seconds_count",
        &[]
    ));
    assert!(
        !metrics.contains("tax-office") && !metrics.contains("land-registry"),
        "no agency ids in labels"
    );
    shutdown.cancel();
}
