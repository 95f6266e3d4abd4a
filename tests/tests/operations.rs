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

/// A dev mesh (its options changed by `configure`) with an admin listener
/// at the returned address, serving until the returned token is
/// cancelled; `tax-office` (east) and `land-registry` (west) registered.
async fn watched_mesh(
    configure: impl FnOnce(&mut fedmesh::dev::DevOptions),
) -> (TestMesh, std::net::SocketAddr, CancellationToken) {
    let mesh = TestMesh::start_configured(fedmesh_tests::Backend::Sqlite, configure).await;
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
    (mesh, address, shutdown)
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
    let (mesh, address, shutdown) = watched_mesh(|_| {}).await;
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
        (
            "fedmesh_db_pool_connections",
            &[("shard", "east-1"), ("state", "idle")],
        ),
        ("fedmesh_inbox_unacked_messages", &[("shard", "west-1")]),
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

/// The names of the series `text` (rules, a dashboard) queries.
fn series_named_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("fedmesh_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn every_series_the_alerts_and_the_dashboard_query_is_exported() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut queried = std::collections::BTreeSet::new();
    for file in ["prometheus/alerts.yml", "grafana/fedmesh.json"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        let named = series_named_in(&text);
        assert!(named.len() > 5, "{file} names the series it queries");
        queried.extend(named);
    }

    let (mesh, address, shutdown) = watched_mesh(|options| {
        options.webhooks.webhook_poll_ms = 50;
    })
    .await;
    // A webhook subscription, and a relayed send it is told of.
    let mut receiver = fedmesh_tests::WebhookReceiver::start().await;
    let subscription = fedmesh_proto::pb::Subscription {
        webhook: Some(fedmesh_proto::pb::Webhook {
            url: receiver.url.clone(),
            ..Default::default()
        }),
        ..fedmesh_tests::subscription(
            "hooked",
            &["land-registry"],
            &[fedmesh_common::events::MESSAGE_ACCEPTED],
        )
    };
    mesh.create_subscription(
        &fedmesh_common::identity::Identity::Operator("ops".into()),
        subscription,
    )
    .await
    .unwrap();
    mesh.send("east", "tax-office", "land-registry", "watched", None)
        .await
        .unwrap();
    receiver.next().await;

    // Scraped until every queried series shows (gauges of the spools are
    // set by their drainers' next look).
    let missing = |metrics: &str| -> Vec<String> {
        queried
            .iter()
            .filter(|name| !has_series(metrics, name, &[]))
            .cloned()
            .collect()
    };
    let mut last = Vec::new();
    // The timeout guards against a hang; it bounds nothing measured.
    let shown = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        loop {
            let (_, metrics) = http_get(address, "/metrics").await;
            last = missing(&metrics);
            if last.is_empty() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(shown.is_ok(), "not exported: {last:?}");
    shutdown.cancel();
}
