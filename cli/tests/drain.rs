//! A stand-alone role stopping on SIGTERM: unready first while it still
//! serves and answers `/healthz`, then it stops and the process exits.

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
    let mut gateway = Command::new(binary)
        .args([
            "gateway",
            "--region",
            "east",
            "--id",
            "east-9",
            "--dev-identity",
        ])
        .args(["--shard", &shard, "--coordinator", &coordinator])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--drain-delay-ms", "3000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = BufReader::new(gateway.stderr.take().unwrap()).lines();
    let admin: u16 = tokio::time::timeout(DEADLINE, async {
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
        panic!("the gateway stopped before serving:\n{}", seen.join("\n"));
    })
    .await
    .expect("the gateway starts");
    // The rest of its log is read (and dropped) so that it never blocks.
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    // Ready once it has the topology: asked until it says so, as a load
    // balancer would.
    tokio::time::timeout(DEADLINE, async {
        while status_of(admin, "/readyz").await != Some(200) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the gateway becomes ready");

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
