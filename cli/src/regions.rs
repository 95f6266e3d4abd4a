//! `fedmesh region` and `fedmesh shard`: the regions of a mesh and their
//! shard databases, changed at run time.

use std::io::Write;

use clap::{Args, Subcommand};
use fedmesh_proto::pb;
use serde_json::json;

use crate::client::{MeshArgs, rpc_error};

/// `fedmesh region`.
#[derive(Debug, Args)]
pub struct RegionArgs {
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(subcommand)]
    pub command: RegionCommand,
}

#[derive(Debug, Subcommand)]
pub enum RegionCommand {
    /// Add a region (then its shards with `fedmesh shard add`).
    #[command(after_help = "Examples:\n  fedmesh region add north")]
    Add {
        /// Region name: 2-63 characters of a-z, 0-9 and '-'.
        name: String,
    },
    /// List the regions and their shards.
    #[command(after_help = "Examples:\n  fedmesh region list\n  fedmesh region list --json")]
    List {
        /// Print a JSON array of regions.
        #[arg(long)]
        json: bool,
    },
    /// Remove a region that holds no agencies, with its shards.
    #[command(after_help = "Examples:\n  fedmesh region remove north")]
    Remove {
        /// Region name.
        name: String,
    },
}

/// `fedmesh shard`.
#[derive(Debug, Args)]
pub struct ShardArgs {
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(subcommand)]
    pub command: ShardCommand,
}

#[derive(Debug, Subcommand)]
pub enum ShardCommand {
    /// Add a shard database to a region; new agencies may be placed on it
    /// at once (its region's gateways need its URL with --shard).
    #[command(
        after_help = "Examples:\n  fedmesh shard add east-2 --region east --address db2.internal/fedmesh_east_2 --capacity 5000"
    )]
    Add {
        /// Shard name, e.g. east-2.
        name: String,
        /// Its region.
        #[arg(long)]
        region: String,
        /// Where it is, for operators: host and database, no credentials.
        #[arg(long, default_value = "")]
        address: String,
        /// Most agencies it should hold [default: no limit].
        #[arg(long, default_value_t = 0)]
        capacity: u32,
    },
    /// List shards with their state, capacity and agencies.
    #[command(
        after_help = "Examples:\n  fedmesh shard list\n  fedmesh shard list --region east --json"
    )]
    List {
        /// Only this region's.
        #[arg(long)]
        region: Option<String>,
        /// Print a JSON array of shards.
        #[arg(long)]
        json: bool,
    },
    /// Stop placing new agencies on a shard.
    #[command(after_help = "Examples:\n  fedmesh shard drain east-1")]
    Drain {
        /// Shard name.
        name: String,
    },
    /// Remove a shard that holds no agencies.
    #[command(after_help = "Examples:\n  fedmesh shard remove east-2")]
    Remove {
        /// Shard name.
        name: String,
    },
}

fn state_name(shard: &pb::Shard) -> &'static str {
    match shard.state() {
        pb::ShardState::Draining => "draining",
        _ => "active",
    }
}

fn shard_json(shard: &pb::Shard) -> serde_json::Value {
    json!({
        "name": shard.name,
        "region": shard.region,
        "address": shard.address,
        "state": state_name(shard),
        "capacity": (shard.capacity > 0).then_some(shard.capacity),
        "agencies": shard.agencies,
    })
}

/// Runs a `region` command.
pub async fn region(args: RegionArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let mut directory = args.mesh.endpoints(None, None).directory_as_operator()?;
    match args.command {
        RegionCommand::Add { name } => {
            directory
                .add_region(pb::AddRegionRequest { name: name.clone() })
                .await
                .map_err(|status| rpc_error(status, &format!("cannot add region {name:?}")))?;
            writeln!(
                out,
                "added region {name}; give it shards with `fedmesh shard add NAME --region {name}`"
            )?;
        }
        RegionCommand::List { json } => {
            let regions = directory
                .list_regions(pb::ListRegionsRequest {})
                .await
                .map_err(|status| rpc_error(status, "cannot list regions"))?
                .into_inner()
                .regions;
            if json {
                let regions: Vec<_> = regions
                    .iter()
                    .map(|region| json!({"name": region.name, "shards": region.shards}))
                    .collect();
                writeln!(out, "{}", serde_json::Value::Array(regions))?;
            } else {
                for region in &regions {
                    writeln!(out, "{:<10} {}", region.name, region.shards.join(", "))?;
                }
            }
        }
        RegionCommand::Remove { name } => {
            directory
                .remove_region(pb::RemoveRegionRequest { name: name.clone() })
                .await
                .map_err(|status| rpc_error(status, &format!("cannot remove region {name:?}")))?;
            writeln!(out, "removed region {name}")?;
        }
    }
    Ok(())
}

/// Runs a `shard` command.
pub async fn shard(args: ShardArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let mut directory = args.mesh.endpoints(None, None).directory_as_operator()?;
    match args.command {
        ShardCommand::Add {
            name,
            region,
            address,
            capacity,
        } => {
            directory
                .add_shard(pb::AddShardRequest {
                    name: name.clone(),
                    region: region.clone(),
                    address,
                    capacity,
                })
                .await
                .map_err(|status| rpc_error(status, &format!("cannot add shard {name:?}")))?;
            writeln!(out, "added shard {name} to region {region}")?;
        }
        ShardCommand::List { region, json } => {
            let shards = directory
                .list_shards(pb::ListShardsRequest {
                    region: region.unwrap_or_default(),
                })
                .await
                .map_err(|status| rpc_error(status, "cannot list shards"))?
                .into_inner()
                .shards;
            if json {
                let shards: Vec<_> = shards.iter().map(shard_json).collect();
                writeln!(out, "{}", serde_json::Value::Array(shards))?;
            } else {
                writeln!(
                    out,
                    "{:<14} {:<10} {:<9} {:>9} {:>9}  ADDRESS",
                    "SHARD", "REGION", "STATE", "AGENCIES", "CAPACITY"
                )?;
                for shard in &shards {
                    let capacity = if shard.capacity > 0 {
                        shard.capacity.to_string()
                    } else {
                        "-".to_string()
                    };
                    writeln!(
                        out,
                        "{:<14} {:<10} {:<9} {:>9} {:>9}  {}",
                        shard.name,
                        shard.region,
                        state_name(shard),
                        shard.agencies,
                        capacity,
                        shard.address
                    )?;
                }
            }
        }
        ShardCommand::Drain { name } => {
            directory
                .drain_shard(pb::DrainShardRequest { name: name.clone() })
                .await
                .map_err(|status| rpc_error(status, &format!("cannot drain shard {name:?}")))?;
            writeln!(out, "shard {name} is draining: it takes no new agencies")?;
        }
        ShardCommand::Remove { name } => {
            directory
                .remove_shard(pb::RemoveShardRequest { name: name.clone() })
                .await
                .map_err(|status| rpc_error(status, &format!("cannot remove shard {name:?}")))?;
            writeln!(out, "removed shard {name}")?;
        }
    }
    Ok(())
}
