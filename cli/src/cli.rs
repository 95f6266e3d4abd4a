//! The `fedmesh` commands: their arguments (clap) and where each goes.
//!
//! Roles (`dev`, `coordinator`, `gateway`, `notifier`) take their settings;
//! client commands (`agency`, `send`, `inbox`, `subscribe`, `status`,
//! `bench`) take where the mesh is: the coordinator, through which they find
//! everything else.

use std::io::Write;

use clap::{ArgMatches, Args, CommandFactory, Parser, Subcommand};

use crate::bench::BenchArgs;
use crate::certs::CertsArgs;
use crate::commands::{AgencyArgs, InboxArgs, SendArgs, StatusArgs, SubscribeArgs};
use crate::governance::{AccessArgs, AuditArgs};
use crate::regions::{RegionArgs, ShardArgs};
use crate::serve::{CoordinatorArgs, DevArgs, GatewayArgs, NotifierArgs};
use crate::subscriptions::SubscriptionArgs;

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
        after_help = "Examples:\n  fedmesh dev\n  fedmesh dev --tls   # every component on mutual TLS; certificates in ./fedmesh-data/certs\n  fedmesh dev --base-port 0 --data-dir /tmp/mesh   # free ports; prints the export line to use"
    )]
    Dev(DevArgs),
    /// Run a coordinator (one role per process, as in a deployment).
    #[command(
        after_help = "Examples:\n  fedmesh coordinator --listen 0.0.0.0:50051 --cert certs/coordinator.crt --key certs/coordinator.key --ca certs/ca.crt --db postgres://fedmesh@db/control --region east=east-1\n  fedmesh coordinator --dev-identity --db sqlite:///var/lib/fedmesh/control.sqlite --region east=east-1 --region west=west-1\n  fedmesh coordinator --config coordinator.toml --check-config"
    )]
    Coordinator(CoordinatorArgs),
    /// Run a gateway of one region on its shard databases.
    #[command(
        after_help = "Examples:\n  fedmesh gateway --listen 0.0.0.0:50052 --advertise https://gw1.east.example:50052 --cert certs/gateway/east.crt --key certs/gateway/east.key --ca certs/ca.crt --coordinator https://coordinator.example:50051 --region east --shard east-1=postgres://fedmesh@db/east_1\n  fedmesh gateway --dev-identity --region east --shard east-1=postgres://postgres@127.0.0.1/fedmesh_east_1\n  fedmesh gateway --config gateway.toml --check-config"
    )]
    Gateway(GatewayArgs),
    /// Run a notifier: serves subscriptions to the mesh's events.
    #[command(
        after_help = "Examples:\n  fedmesh notifier --listen 0.0.0.0:50055 --cert certs/notifier.crt --key certs/notifier.key --ca certs/ca.crt --coordinator https://coordinator.example:50051 --amqp amqp://fedmesh:secret@mq:5672/%2f\n  fedmesh notifier --dev-identity --listen 127.0.0.1:50055 --amqp amqp://guest:guest@127.0.0.1:5672/%2f\n  fedmesh notifier --config notifier.toml --check-config"
    )]
    Notifier(NotifierArgs),
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
    /// Print mesh events as they happen, or those a durable subscription kept.
    #[command(
        after_help = "Examples:\n  fedmesh subscribe --agency land-registry\n  fedmesh subscribe --kind message.delivered --region west --limit 10 --json\n  fedmesh subscribe --subscription deliveries --limit 100"
    )]
    Subscribe(SubscribeArgs),
    /// Create, list, show and delete durable subscriptions.
    #[command(
        after_help = "Examples:\n  fedmesh subscription create deliveries --kind message.delivered\n  fedmesh subscription list"
    )]
    Subscription(SubscriptionArgs),
    /// Add, list and remove regions.
    #[command(after_help = "Examples:\n  fedmesh region add north\n  fedmesh region list")]
    Region(RegionArgs),
    /// Add, list, drain and remove the shard databases of regions.
    #[command(
        after_help = "Examples:\n  fedmesh shard add east-2 --region east --capacity 5000\n  fedmesh shard drain east-1\n  fedmesh shard list"
    )]
    Shard(ShardArgs),
    /// Grant, revoke and list who may send whom which kinds of message.
    #[command(
        after_help = "Examples:\n  fedmesh access grant --from tax-office --to land-registry --kind tax.return.filed\n  fedmesh access list"
    )]
    Access(AccessArgs),
    /// Read and verify the tamper-evident audit log.
    #[command(after_help = "Examples:\n  fedmesh audit list --region east\n  fedmesh audit verify")]
    Audit(AuditArgs),
    /// Regions, their shards, gateways and notifiers, and agency counts.
    #[command(after_help = "Examples:\n  fedmesh status\n  fedmesh status --json")]
    Status(StatusArgs),
    /// Make a development CA and certificates, and inspect certificates.
    #[command(
        after_help = "Examples:\n  fedmesh certs init ./certs\n  fedmesh certs issue ./certs agency/tax-office\n  fedmesh certs rotate ./certs gateway/east\n  fedmesh certs inspect ./certs/agency/tax-office.crt"
    )]
    Certs(CertsArgs),
    /// Measure a running mesh (load generators; see README).
    #[command(
        after_help = "Examples:\n  fedmesh bench send --concurrency 64 --size 256 --duration 10\n  fedmesh bench receive"
    )]
    Bench(BenchArgs),
    /// Print the help of fedmesh or of one of its commands.
    #[command(after_help = "Examples:\n  fedmesh help\n  fedmesh help agency register")]
    Help(HelpArgs),
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
        Command::Subscribe(args) if args.subscription.is_some() => {
            crate::subscriptions::consume(args, out).await
        }
        Command::Subscribe(args) => crate::commands::subscribe(args, out).await,
        Command::Subscription(args) => crate::subscriptions::subscription(args, out).await,
        Command::Status(args) => crate::commands::status(args, out).await,
        Command::Region(args) => crate::regions::region(args, out).await,
        Command::Shard(args) => crate::regions::shard(args, out).await,
        Command::Access(args) => crate::governance::access(args, out).await,
        Command::Audit(args) => crate::governance::audit(args, out).await,
        Command::Bench(args) => {
            let endpoints = args.mesh.endpoints(args.gateway.gateway.as_deref(), None);
            crate::bench::run(&endpoints, args.command, out).await
        }
        Command::Certs(args) => crate::certs::run(args, out),
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
