//! The `fedmesh` commands: their arguments (clap) and where each goes.
//!
//! Roles (`dev`, `coordinator`, `gateway`, `notifier`) take their settings;
//! client commands (`agency`, `send`, `inbox`, `subscribe`, `status`,
//! `bench`) take where the mesh is: the coordinator, through which they find
//! everything else.

use std::io::Write;
use std::path::PathBuf;

use clap::{ArgMatches, Args, CommandFactory, Parser, Subcommand};

use crate::client::Endpoints;
use crate::dev::DEFAULT_BASE_PORT;

/// fedmesh: durable, exactly-once messaging between agencies across regions.
///
/// `dev` runs a whole mesh in one process; `coordinator`, `gateway` and
/// `notifier` run one role each. The other commands talk to a running mesh:
/// they need only the coordinator's address (`--coordinator`, default the
/// dev mesh's).
#[derive(Debug, Parser)]
#[command(
    name = "fedmesh",
    version,
    propagate_version = true,
    disable_help_subcommand = true,
    after_help = "Examples:\n  fedmesh dev\n  fedmesh send --as tax-office --to land-registry --kind tax.return.filed --body 'return 2026 filed'"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole mesh in this process: a coordinator, gateways for east,
    /// west and central, and a notifier, on consecutive loopback ports.
    #[command(
        after_help = "Examples:\n  fedmesh dev\n  fedmesh dev --base-port 0 --data-dir /tmp/mesh   # free ports; prints the export line to use"
    )]
    Dev(DevArgs),
    /// Run a coordinator (one role per process, as in a deployment).
    #[command(
        after_help = "Examples:\n  fedmesh coordinator --dev-identity --db sqlite:///var/lib/fedmesh/control.sqlite --region east=east-1 --region west=west-1\n  fedmesh coordinator --config coordinator.toml --check-config"
    )]
    Coordinator(crate::serve::CoordinatorArgs),
    /// Run a gateway of one region on its shard databases.
    #[command(
        after_help = "Examples:\n  fedmesh gateway --dev-identity --region east --shard east-1=postgres://postgres@127.0.0.1/fedmesh_east_1\n  fedmesh gateway --config gateway.toml --check-config"
    )]
    Gateway(crate::serve::GatewayArgs),
    /// Run a notifier: serves subscriptions to the mesh's events.
    #[command(
        after_help = "Examples:\n  fedmesh notifier --dev-identity --listen 127.0.0.1:50055\n  fedmesh notifier --config notifier.toml --check-config"
    )]
    Notifier(crate::serve::NotifierArgs),
    /// Register, list, show and deregister agencies.
    #[command(
        after_help = "Examples:\n  fedmesh agency register tax-office --region east --name 'Tax Office'\n  fedmesh agency list --region east"
    )]
    Agency(AgencyArgs),
    /// Send a message as an agency; prints its receipt.
    #[command(
        after_help = "Examples:\n  fedmesh send --as tax-office --to land-registry --kind tax.return.filed --body 'return 2026 filed'\n  fedmesh send --as tax-office --to land-registry --kind deed.scan --body-file deed.pdf --header format=pdf --json"
    )]
    Send(SendArgs),
    /// Read an agency's inbox.
    #[command(
        after_help = "Examples:\n  fedmesh inbox --as land-registry --ack\n  fedmesh inbox --as land-registry --follow --json"
    )]
    Inbox(InboxArgs),
    /// Print mesh events as they happen.
    #[command(
        after_help = "Examples:\n  fedmesh subscribe --agency land-registry\n  fedmesh subscribe --kind message.delivered --region west --limit 10 --json"
    )]
    Subscribe(SubscribeArgs),
    /// Regions, their shards, gateways and notifiers, and agency counts.
    #[command(after_help = "Examples:\n  fedmesh status\n  fedmesh status --json")]
    Status(StatusArgs),
    /// Measure a running mesh (load generators; see README).
    #[command(
        after_help = "Examples:\n  fedmesh bench send --concurrency 64 --size 256 --duration 10\n  fedmesh bench receive"
    )]
    Bench(BenchArgs),
    /// Print the help of fedmesh or of one of its commands.
    #[command(after_help = "Examples:\n  fedmesh help\n  fedmesh help agency register")]
    Help(HelpArgs),
}

/// Where the mesh is, for client commands.
#[derive(Debug, Args)]
pub struct MeshArgs {
    /// Coordinator URL; agencies' home gateways and the notifiers are found
    /// through it.
    #[arg(
        long,
        global = true,
        env = "FEDMESH_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// Operator name the CLI acts as for directory changes and status.
    #[arg(long, global = true, env = "FEDMESH_OPERATOR", default_value = "cli")]
    pub operator: String,
}

/// A gateway to use instead of the one the coordinator names.
#[derive(Debug, Args)]
pub struct GatewayOverride {
    /// Gateway URL to use instead of the agency's home gateway.
    #[arg(long, global = true, env = "FEDMESH_GATEWAY")]
    pub gateway: Option<String>,
}

impl MeshArgs {
    /// The endpoints these flags give, with optional overrides.
    pub fn endpoints(&self, gateway: Option<&str>, notifier: Option<&str>) -> Endpoints {
        Endpoints {
            coordinator: self.coordinator.clone(),
            operator: self.operator.clone(),
            gateway: gateway.map(str::to_string),
            notifier: notifier.map(str::to_string),
        }
    }
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Port of the coordinator; the east, west and central gateways take the
    /// next three ports and the notifier the one after. 0 takes free ports
    /// (the mesh prints the coordinator's URL to export).
    #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
    pub base_port: u16,
    /// Folder for the SQLite files; agencies and undelivered messages
    /// survive a restart on the same folder.
    #[arg(long, default_value = "./fedmesh-data")]
    pub data_dir: PathBuf,
    /// Keep a shard in another database instead of a SQLite file, e.g.
    /// `--shard west-1=postgres://postgres@127.0.0.1/fedmesh_west_1`;
    /// repeatable. Shards are east-1, west-1 and central-1.
    #[arg(long = "shard", value_name = "NAME=URL")]
    pub shards: Vec<fedmesh_gateway::ShardConfig>,
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AgencyArgs {
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(subcommand)]
    pub command: AgencyCommand,
}

#[derive(Debug, Subcommand)]
pub enum AgencyCommand {
    /// Register an agency in its home region; the coordinator picks its shard.
    #[command(
        after_help = "Examples:\n  fedmesh agency register tax-office --region east --name 'Tax Office'\n  fedmesh agency register land-registry --region west --json"
    )]
    Register {
        /// Agency id: 2-63 characters of a-z, 0-9 and '-', starting with a
        /// letter and not ending with '-'.
        id: String,
        /// Home region (east, west or central in the dev mesh).
        #[arg(long)]
        region: String,
        /// Display name.
        #[arg(long, default_value = "")]
        name: String,
        /// Print the registered agency as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List agencies.
    #[command(
        after_help = "Examples:\n  fedmesh agency list\n  fedmesh agency list --region west --json"
    )]
    List {
        /// Only agencies homed in this region.
        #[arg(long)]
        region: Option<String>,
        /// Print a JSON array of agencies.
        #[arg(long)]
        json: bool,
    },
    /// Show one agency.
    #[command(
        after_help = "Examples:\n  fedmesh agency show tax-office\n  fedmesh agency show tax-office --json"
    )]
    Show {
        /// Agency id.
        id: String,
        /// Print the agency as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Remove an agency from the directory. Refused while its inbox holds
    /// unacknowledged messages, unless --force.
    #[command(
        after_help = "Examples:\n  fedmesh agency deregister old-office\n  fedmesh agency deregister old-office --force   # abandons its unread messages"
    )]
    Deregister {
        /// Agency id.
        id: String,
        /// Deregister even though its inbox holds unacknowledged messages
        /// (they are abandoned) or cannot be checked.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        gateway: GatewayOverride,
    },
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("body_source").required(true).args(["body", "body_file"]))]
pub struct SendArgs {
    /// The sending agency (the CLI acts as it).
    #[arg(long = "as", value_name = "ID")]
    pub sender: String,
    /// The receiving agency, in any region.
    #[arg(long = "to", value_name = "ID")]
    pub recipient: String,
    /// Message kind: 1-128 characters of a-z, 0-9, '.', '_' and '-',
    /// starting with a letter.
    #[arg(long)]
    pub kind: String,
    /// Message body as text.
    #[arg(long)]
    pub body: Option<String>,
    /// Read the body from this file ('-' for standard input).
    #[arg(long, value_name = "PATH")]
    pub body_file: Option<PathBuf>,
    /// Header as NAME=VALUE; repeatable.
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Idempotency key: the same key with the same message stores nothing
    /// new, with another message is refused. Without one the CLI makes one,
    /// so that its own retries (after UNAVAILABLE) never store twice.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Print the receipt as one JSON object: message_id, status,
    /// home_region, stored_at, duplicate.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(flatten)]
    pub gateway: GatewayOverride,
}

#[derive(Debug, Args)]
pub struct InboxArgs {
    /// The agency whose inbox to read (the CLI acts as it).
    #[arg(long = "as", value_name = "ID")]
    pub agency: String,
    /// Keep waiting for new messages until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// Acknowledge each message once printed, so it is not delivered again.
    #[arg(long)]
    pub ack: bool,
    /// Stop after this many messages.
    #[arg(long)]
    pub limit: Option<u32>,
    /// Print one JSON object per message.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(flatten)]
    pub gateway: GatewayOverride,
}

#[derive(Debug, Args)]
pub struct SubscribeArgs {
    /// Only events concerning this agency; repeatable.
    #[arg(long = "agency", value_name = "ID")]
    pub agencies: Vec<String>,
    /// Only events of this kind (e.g. message.accepted); repeatable.
    #[arg(long = "kind", value_name = "KIND")]
    pub kinds: Vec<String>,
    /// Only events of this region; repeatable.
    #[arg(long = "region", value_name = "REGION")]
    pub regions: Vec<String>,
    /// Subscribe as this agency (sees only its own events) instead of as
    /// the operator.
    #[arg(long = "as", value_name = "ID")]
    pub agency: Option<String>,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Print one JSON object per event.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub mesh: MeshArgs,
    /// Notifier URL to use instead of one the coordinator names.
    #[arg(long, env = "FEDMESH_NOTIFIER")]
    pub notifier: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub output: JsonFlag,
    #[command(flatten)]
    pub mesh: MeshArgs,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(flatten)]
    pub gateway: GatewayOverride,
    #[command(subcommand)]
    pub command: crate::bench::BenchCommand,
}

#[derive(Debug, Args)]
pub struct HelpArgs {
    /// The command, and its subcommand, to explain.
    pub command: Vec<String>,
}

/// Runs `cli` (parsed from `matches`), writing results to `out`.
pub async fn run(
    cli: Cli,
    matches: &ArgMatches,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let role_matches = |name: &str| matches.subcommand_matches(name).unwrap_or(matches);
    match cli.command {
        Command::Dev(args) => crate::serve::dev(args, out).await,
        Command::Coordinator(args) => {
            crate::serve::coordinator(args, role_matches("coordinator"), out).await
        }
        Command::Gateway(args) => crate::serve::gateway(args, role_matches("gateway"), out).await,
        Command::Notifier(args) => {
            crate::serve::notifier(args, role_matches("notifier"), out).await
        }
        Command::Agency(args) => crate::commands::agency(args, out).await,
        Command::Send(args) => crate::commands::send(args, out).await,
        Command::Inbox(args) => crate::commands::inbox(args, out).await,
        Command::Subscribe(args) => crate::commands::subscribe(args, out).await,
        Command::Status(args) => crate::commands::status(args, out).await,
        Command::Bench(args) => {
            let endpoints = args.mesh.endpoints(args.gateway.gateway.as_deref(), None);
            crate::bench::run(&endpoints, args.command, out).await
        }
        Command::Help(args) => help(&args.command, out),
    }
}

/// Prints the long help of the command named by `path` (fedmesh itself
/// when empty).
fn help(path: &[String], out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let mut command = Cli::command();
    command.build();
    let mut current = &mut command;
    for name in path {
        current = current.find_subcommand_mut(name).ok_or_else(|| {
            anyhow::anyhow!(
                "no command `{}`; `fedmesh --help` lists them",
                path.join(" ")
            )
        })?;
    }
    write!(out, "{}", current.render_long_help())?;
    Ok(())
}
