//! Stand-alone roles' admin listeners: ready once they can work (or saying
//! why not), and on
//! SIGTERM unready first while they still serve and answer `/healthz`,
//! then they stop and the process exits.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use support::DEADLINE;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

mod support;

/// The status of `GET path` on the admin listener at `port`; None while
/// nothing listens there.
async fn status_of(port: u16, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

/// Starts `fedmesh ARGS` (a role) listening on ports it picks; returns the
/// process (killed when dropped) and its admin port.
async fn role(args: &[&str]) -> (tokio::process::Child, u16) {
    let mut role = Command::new(Path::new(env!("CARGO_BIN_EXE_fedmesh")))
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let admin = admin_port(&mut role).await;
    (role, admin)
}

/// The port of the admin listener of `role`, from its log; the rest of
/// the log is read (and dropped) so that it never blocks.
async fn admin_port(role: &mut tokio::process::Child) -> u16 {
    let mut log = BufReader::new(role.stderr.take().unwrap()).lines();
    let port = tokio::time::timeout(DEADLINE, async {
        let mut seen = Vec::new();
        while let Ok(Some(line)) = log.next_line().await {
            if line.contains("admin listener serving")
                && let Some(port) = line
                    .rsplit_once("address=127.0.0.1:")
                    .and_then(|(_, port)| port.trim().parse().ok())
            {
                return port;
            }
            seen.push(line);
        }
        panic!("stopped before serving:\n{}", seen.join("\n"));
    })
    .await
    .expect("the role starts");
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    port
}

/// Asks `/readyz` on `port` until it answers 200, as a load balancer
/// would; says what it last answered if it never does.
async fn becomes_ready(port: u16) {
    let mut last = String::new();
    let ready = tokio::time::timeout(DEADLINE, async {
        loop {
            last = get(port, "/readyz").await;
            if last.starts_with("HTTP/1.1 200") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(ready.is_ok(), "never ready; it last said:\n{last}");
}

#[tokio::test]
async fn a_coordinator_is_ready_once_its_control_database_is_open_and_shows_its_lease() {
    let data_dir = tempfile::tempdir().unwrap();
    let control = format!(
        "sqlite://{}",
        data_dir.path().join("control.sqlite").display()
    );
    let (_coordinator, admin) = role(&[
        "coordinator",
        "--dev-identity",
        "--db",
        &control,
        "--region",
        "east=east-1",
    ])
    .await;
    becomes_ready(admin).await;
    // Its election runs beside: scraped until the lease shows, as
    // Prometheus would.
    tokio::time::timeout(DEADLINE, async {
        while !get(admin, "/metrics")
            .await
            .contains("fedmesh_coordinator_leading{")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the lease's series");
}

/// A notifier consuming `amqp`, on ports it picks; its admin port.
async fn notifier_on(amqp: &str) -> (tokio::process::Child, u16) {
    // One name for every run: the exchange stays on the broker, alone.
    let exchange = "fedmesh.test.readiness";
    role(&[
        "notifier",
        "--dev-identity",
        "--id",
        "notifier-9",
        "--amqp",
        amqp,
        "--amqp-exchange",
        exchange,
        "--coordinator",
        "http://127.0.0.1:1",
    ])
    .await
}

/// The whole answer to `GET path` on the admin listener at `port`.
async fn get(port: u16, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn a_notifier_is_ready_while_it_consumes_its_broker_and_says_why_not() {
    let amqp = std::env::var("FEDMESH_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let (_consuming, admin) = notifier_on(&amqp).await;
    becomes_ready(admin).await;

    // Nothing listens on port 1: it never consumes, and says so.
    let (_alone, admin) = notifier_on("amqp://guest:guest@127.0.0.1:1/%2f").await;
    assert_eq!(status_of(admin, "/healthz").await, Some(200));
    let answer = get(admin, "/readyz").await;
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("RabbitMQ"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_gateway_on_sigterm_turns_unready_while_alive_then_exits() {
    let binary = Path::new(env!("CARGO_BIN_EXE_fedmesh"));
    let data_dir = tempfile::tempdir().unwrap();
    let (_dev, coordinator) = support::start_dev(binary, &data_dir.path().join("mesh")).await;

    // A second east gateway, on its own copy of shard east-1, on ports it
    // picks; its log says where its admin listener is.
    let shard = format!(
        "east-1=sqlite://{}",
        data_dir.path().join("east-1.sqlite").display()
    );
    let (mut gateway, admin) = role(&[
        "gateway",
        "--region",
        "east",
        "--id",
        "east-9",
        "--dev-identity",
        "--shard",
        &shard,
        "--coordinator",
        &coordinator,
        "--drain-delay-ms",
        "3000",
    ])
    .await;
    // Ready once it has the topology.
    becomes_ready(admin).await;

    let pid = gateway.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    // Unready at once, alive and serving until the drain delay is over.
    tokio::time::timeout(DEADLINE, async {
        while status_of(admin, "/readyz").await != Some(503) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the gateway turns unready");
    assert_eq!(
        status_of(admin, "/healthz").await,
        Some(200),
        "alive while draining"
    );
    let exited = tokio::time::timeout(DEADLINE, gateway.wait())
        .await
        .expect("the gateway exits after draining")
        .unwrap();
    assert!(exited.success(), "{exited:?}");
}
