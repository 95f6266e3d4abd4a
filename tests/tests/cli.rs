//! The `fedmesh` commands against a running mesh, in-process.

use clap::Parser;
use fedmesh::cli::{Cli, run};
use fedmesh_tests::TestMesh;

async fn fedmesh(mesh: &TestMesh, args: &[&str]) -> anyhow::Result<String> {
    let coordinator = mesh.coordinator_url();
    let notifier = mesh.notifier_url();
    let mut argv = vec![
        "fedmesh",
        "--coordinator",
        &coordinator,
        "--notifier",
        &notifier,
    ];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv)?;
    let mut out = Vec::new();
    run(cli, &mut out).await?;
    Ok(String::from_utf8(out)?)
}

#[tokio::test]
async fn the_walkthrough_works_from_the_command_line() {
    let mesh = TestMesh::start().await;
    let registered = fedmesh(
        &mesh,
        &["agency", "register", "tax-office", "--region", "east"],
    )
    .await
    .unwrap();
    assert!(
        registered.contains("registered tax-office in east"),
        "{registered}"
    );
    fedmesh(
        &mesh,
        &["agency", "register", "land-registry", "--region", "west"],
    )
    .await
    .unwrap();

    let listed = fedmesh(&mesh, &["agency", "list", "--json"]).await.unwrap();
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(2));

    let sent = fedmesh(
        &mesh,
        &[
            "send",
            "--as",
            "tax-office",
            "--to",
            "land-registry",
            "--kind",
            "tax.return.filed",
            "--body",
            "hello west",
        ],
    )
    .await
    .unwrap();
    assert!(sent.starts_with("STORED "), "{sent}");

    let read = fedmesh(&mesh, &["inbox", "--as", "land-registry", "--ack"])
        .await
        .unwrap();
    assert!(
        read.contains("hello west") && read.contains("from tax-office"),
        "{read}"
    );
    let again = fedmesh(&mesh, &["inbox", "--as", "land-registry"])
        .await
        .unwrap();
    assert!(
        again.contains("inbox of land-registry is empty"),
        "acked, so not redelivered: {again}"
    );

    let status = fedmesh(&mesh, &["status"]).await.unwrap();
    for region in ["east", "west", "central"] {
        assert!(status.contains(&format!("{region}-0 http://")), "{status}");
        // Each gateway reports the connection pool of its shard.
        assert!(status.contains(&format!("{region}-1 pool ")), "{status}");
    }
    let status = fedmesh(&mesh, &["status", "--json"]).await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let east = &status["regions"][0]["gateways"][0]["shard_pools"][0];
    assert_eq!(east["shard"], "east-1", "{status}");
    assert!(east["max"].as_u64().unwrap() >= 1, "{status}");
    assert!(east["open"].as_u64().unwrap() <= east["max"].as_u64().unwrap());
}

#[tokio::test]
async fn command_line_errors_are_one_clear_line() {
    let mesh = TestMesh::start().await;
    let error = fedmesh(&mesh, &["agency", "register", "Bad Id", "--region", "east"])
        .await
        .unwrap_err();
    let line = format!("{error:#}");
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.contains("malformed") && line.contains("InvalidArgument"),
        "{line}"
    );

    let error = fedmesh(
        &mesh,
        &[
            "send", "--as", "ghost", "--to", "x1", "--kind", "k", "--body", "b",
        ],
    )
    .await
    .unwrap_err();
    let line = format!("{error:#}");
    assert!(
        line.contains("ghost") && line.contains("NotFound"),
        "{line}"
    );
}

#[tokio::test]
async fn the_benchmarks_run_against_a_mesh() {
    let mesh = TestMesh::start().await;
    let sent = fedmesh(
        &mesh,
        &["bench", "send", "--count", "40", "--concurrency", "4"],
    )
    .await
    .unwrap();
    assert!(sent.starts_with("bench send: 40 messages"), "{sent}");
    assert!(!sent.contains("errors"), "{sent}");

    let received = fedmesh(&mesh, &["bench", "receive"]).await.unwrap();
    assert!(
        received.starts_with("bench receive: 40 deliveries to bench-recipient"),
        "{received}"
    );

    let checked = fedmesh(
        &mesh,
        &["bench", "health", "--count", "40", "--concurrency", "4"],
    )
    .await
    .unwrap();
    assert!(
        checked.starts_with("bench health: 40 health checks"),
        "{checked}"
    );
    assert!(!checked.contains("errors"), "{checked}");
}
