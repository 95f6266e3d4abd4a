//! What the command-line tests share: a dev mesh of the real binary.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A guard against a hang, not a performance bound.
pub(crate) const DEADLINE: Duration = Duration::from_secs(120);

/// Starts `fedmesh dev` of `binary` on free ports over `data_dir`; returns
/// the process (killed when dropped) and the coordinator URL it printed.
pub(crate) async fn start_dev(binary: &Path, data_dir: &Path) -> (Child, String) {
    let mut dev = Command::new(binary)
        .args(["dev", "--base-port", "0", "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("fedmesh dev starts");
    let stdout = dev.stdout.take().expect("the dev mesh's output");
    let mut lines = BufReader::new(stdout).lines();
    let coordinator = tokio::time::timeout(DEADLINE, async {
        let mut coordinator = None;
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = line.trim().strip_prefix("export FEDMESH_COORDINATOR=") {
                coordinator = Some(url.to_string());
            }
            if line.starts_with("press Ctrl-C") {
                break;
            }
        }
        coordinator.expect("the dev mesh printed a coordinator to export")
    })
    .await
    .expect("the dev mesh starts");
    // Its output is read to the end: a closed pipe would fail its next
    // write and stop it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (dev, coordinator)
}
