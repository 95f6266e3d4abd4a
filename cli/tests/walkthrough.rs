//! The README's walkthrough, run as written: the real `fedmesh` binary
//! starts a dev mesh on free ports, and the walkthrough's shell block runs
//! in a plain (non-interactive) bash with `fedmesh` on its PATH and the
//! coordinator the dev mesh printed to export.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;

use support::DEADLINE;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

mod support;

/// The shell block between the walkthrough markers of README.md.
fn walkthrough_script() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = readme
        .find("<!-- walkthrough: begin -->")
        .expect("README.md marks the walkthrough's beginning");
    let end = readme
        .find("<!-- walkthrough: end -->")
        .expect("README.md marks the walkthrough's end");
    let block = &readme[start..end];
    let code_start = block.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let code_end = block[code_start..].find("```").expect("the block ends") + code_start;
    block[code_start..code_end].to_string()
}

#[tokio::test]
async fn the_readme_walkthrough_runs_as_a_script() {
    let binary = Path::new(env!("CARGO_BIN_EXE_fedmesh"));
    let data_dir = tempfile::tempdir().unwrap();
    let (mut dev, coordinator) = support::start_dev(binary, data_dir.path()).await;

    let path = format!(
        "{}:{}",
        binary.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let work = tempfile::tempdir().unwrap();
    let output = tokio::time::timeout(
        DEADLINE,
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", &walkthrough_script()])
            .current_dir(work.path())
            .env("PATH", path)
            .env("FEDMESH_COORDINATOR", &coordinator)
            .env_remove("FEDMESH_GATEWAY")
            .env_remove("FEDMESH_NOTIFIER")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the walkthrough ends")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the walkthrough failed:\n{stdout}\n{stderr}"
    );
    for expected in [
        "registered tax-office in east",
        "registered land-registry in west",
        "STORED ",
        "return 2026 filed",
        "inbox of land-registry is empty",
        "message.accepted",
        "message.delivered",
        "notifiers notifier-0",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }
    dev.kill().await.unwrap();
}

#[tokio::test]
async fn inbox_follow_says_on_stderr_that_it_waits() {
    let binary = Path::new(env!("CARGO_BIN_EXE_fedmesh"));
    let data_dir = tempfile::tempdir().unwrap();
    let (mut dev, coordinator) = support::start_dev(binary, data_dir.path()).await;
    let registered = Command::new(binary)
        .args([
            "agency",
            "register",
            "reader",
            "--region",
            "east",
            "--coordinator",
            &coordinator,
        ])
        .output()
        .await
        .unwrap();
    assert!(registered.status.success(), "{registered:?}");
    let mut follow = Command::new(binary)
        .args([
            "inbox",
            "--as",
            "reader",
            "--follow",
            "--coordinator",
            &coordinator,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(follow.stderr.take().unwrap()).lines();
    let said = tokio::time::timeout(DEADLINE, stderr.next_line())
        .await
        .expect("inbox --follow says something")
        .unwrap()
        .unwrap_or_default();
    assert!(
        said.contains("waiting for new messages to reader"),
        "{said}"
    );
    follow.kill().await.unwrap();
    dev.kill().await.unwrap();
}
