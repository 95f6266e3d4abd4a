//! `fedmesh agency move`: moves an agency to another shard or region while
//! it keeps sending and receiving, follows the move, or cancels it.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use fedmesh_proto::pb;
use serde_json::json;

use crate::client::{Authenticated, rpc_error};

/// How often `--wait` asks how the move goes.
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("whither").args(["shard", "region", "cancel", "show"]).required(true).multiple(true))]
pub struct MoveArgs {
    /// Agency id.
    pub id: String,
    /// Move it to this shard (of its region, or of --region).
    #[arg(long)]
    pub shard: Option<String>,
    /// Move it to this region (on its emptiest shard unless --shard names
    /// one).
    #[arg(long, conflicts_with_all = ["cancel", "show"])]
    pub region: Option<String>,
    /// Cancel the move with this id (before its cut-over): the agency stays
    /// where it was.
    #[arg(long, value_name = "MOVE_ID", conflicts_with_all = ["shard", "show"])]
    pub cancel: Option<String>,
    /// Show the move with this id.
    #[arg(long, value_name = "MOVE_ID", conflicts_with_all = ["shard", "cancel"])]
    pub show: Option<String>,
    /// Wait until the move is done (or cancelled), printing its progress.
    #[arg(long)]
    pub wait: bool,
    /// Print the move as one JSON object (the last state, with --wait).
    #[arg(long)]
    pub json: bool,
}

type Directory = pb::directory_client::DirectoryClient<Authenticated>;

/// `fedmesh agency move ...`.
pub async fn run(
    args: MoveArgs,
    directory: &mut Directory,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let id = args.id;
    let started = Instant::now();
    let mut current = if let Some(move_id) = &args.cancel {
        directory
            .cancel_move(pb::CancelMoveRequest {
                move_id: move_id.clone(),
            })
            .await
            .map_err(|status| rpc_error(status, &format!("cannot cancel move {move_id}")))?
            .into_inner()
            .r#move
    } else if let Some(move_id) = &args.show {
        Some(get(directory, move_id).await?)
    } else {
        directory
            .move_agency(pb::MoveAgencyRequest {
                agency_id: id.clone(),
                shard: args.shard.unwrap_or_default(),
                region: args.region.unwrap_or_default(),
            })
            .await
            .map_err(|status| rpc_error(status, &format!("cannot move {id:?}")))?
            .into_inner()
            .r#move
    }
    .context("the coordinator answered without the move")?;
    if current.agency_id != id {
        anyhow::bail!(
            "move {} is of agency {}, not {id}",
            current.move_id,
            current.agency_id
        );
    }
    if !args.json {
        writeln!(out, "{}", line(&current, started.elapsed()))?;
    }
    if args.wait {
        let progress = |current: &pb::Move| {
            (
                current.phase,
                current.messages_copied,
                current.keys_copied,
                current.last_error.clone(),
            )
        };
        let mut shown = progress(&current);
        while !finished(&current) {
            tokio::time::sleep(POLL).await;
            current = get(directory, &current.move_id).await?;
            // A line when something other than the clock changed.
            if !args.json && progress(&current) != shown {
                writeln!(out, "{}", line(&current, started.elapsed()))?;
                shown = progress(&current);
            }
        }
    }
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&move_json(&current))?
        )?;
    }
    Ok(())
}

async fn get(directory: &mut Directory, move_id: &str) -> anyhow::Result<pb::Move> {
    directory
        .get_move(pb::GetMoveRequest {
            move_id: move_id.to_string(),
        })
        .await
        .map_err(|status| rpc_error(status, &format!("cannot look move {move_id} up")))?
        .into_inner()
        .r#move
        .context("the coordinator answered without the move")
}

fn finished(current: &pb::Move) -> bool {
    matches!(
        current.phase(),
        pb::MovePhase::Done | pb::MovePhase::Cancelled
    )
}

fn phase_name(phase: pb::MovePhase) -> &'static str {
    match phase {
        pb::MovePhase::Copying => "copying",
        pb::MovePhase::Releasing => "cut over, releasing the old shard",
        pb::MovePhase::Done => "done",
        pb::MovePhase::Cancelling => "cancelling",
        pb::MovePhase::Cancelled => "cancelled",
        pb::MovePhase::Unspecified => "unknown",
    }
}

/// A move under way, as `fedmesh status` lists it.
pub fn summary(current: &pb::Move) -> String {
    let since = current
        .started_at
        .map(|at| {
            let micros = fedmesh_common::time::micros_from_timestamp(Some(&at));
            (fedmesh_common::time::now_micros() - micros).max(0) / 1_000_000
        })
        .unwrap_or_default();
    let mut text = describe(current);
    text.push_str(&format!(", for {since} s"));
    text
}

/// One progress line: what moves where, its phase, what was copied.
fn line(current: &pb::Move, elapsed: Duration) -> String {
    format!("{} after {:.1}s", describe(current), elapsed.as_secs_f64())
}

/// What moves where, its phase, what was copied, its last failure.
fn describe(current: &pb::Move) -> String {
    let mut text = format!(
        "move {} of {}: {} ({}) -> {} ({}): {}",
        current.move_id,
        current.agency_id,
        current.from_shard,
        current.from_region,
        current.to_shard,
        current.to_region,
        phase_name(current.phase()),
    );
    if current.messages_copied > 0 || current.keys_copied > 0 {
        text.push_str(&format!(
            ", {} messages and {} idempotency keys copied",
            current.messages_copied, current.keys_copied
        ));
    }
    if !current.last_error.is_empty() {
        text.push_str(&format!(" (retrying: {})", current.last_error));
    }
    text
}

/// A move as one JSON object.
pub fn move_json(current: &pb::Move) -> serde_json::Value {
    json!({
        "move_id": current.move_id,
        "agency_id": current.agency_id,
        "from_region": current.from_region,
        "from_shard": current.from_shard,
        "to_region": current.to_region,
        "to_shard": current.to_shard,
        "phase": current.phase().as_str_name().trim_start_matches("MOVE_PHASE_").to_lowercase(),
        "messages_copied": current.messages_copied,
        "keys_copied": current.keys_copied,
        "last_error": current.last_error,
        "started_at": current.started_at.map(|time| time.to_string()),
        "updated_at": current.updated_at.map(|time| time.to_string()),
    })
}
