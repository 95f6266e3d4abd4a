//! The `fedmesh` commands: arguments (clap) and what each does.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use fedmesh_common::identity::Identity;
use fedmesh_proto::pb;
use serde_json::json;

use crate::client::{Endpoints, rpc_error};
use crate::dev::{DEFAULT_BASE_PORT, DevMesh, DevOptions};
use crate::signal::wait_for_signal;

/// fedmesh: durable, exactly-once messaging between agencies across regions.
///
/// Every command but `dev` talks to a running mesh; with no address flags it
/// reaches the dev mesh at its default ports.
#[derive(Debug, Parser)]
#[command(name = "fedmesh", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub endpoints: EndpointArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the mesh is.
#[derive(Debug, Args)]
pub struct EndpointArgs {
    /// Coordinator URL; agencies' home gateways are found through it
    /// [default: http://127.0.0.1:50051].
    #[arg(long, global = true, env = "FEDMESH_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Gateway URL to use instead of the agency's home gateway.
    #[arg(long, global = true, env = "FEDMESH_GATEWAY")]
    pub gateway: Option<String>,
    /// Notifier URL, for `subscribe`.
    #[arg(
        long,
        global = true,
        env = "FEDMESH_NOTIFIER",
        default_value = "http://127.0.0.1:50055"
    )]
    pub notifier: String,
    /// Operator name the CLI acts as for directory changes and status.
    #[arg(long, global = true, env = "FEDMESH_OPERATOR", default_value = "cli")]
    pub operator: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole mesh in this process: a coordinator, gateways for east,
    /// west and central, and a notifier, on consecutive loopback ports.
    Dev(DevArgs),
    /// Run a coordinator (one role per process, as in a deployment).
    Coordinator(crate::serve::CoordinatorArgs),
    /// Run a gateway of one region on its shard databases.
    Gateway(crate::serve::GatewayArgs),
    /// Register, list, show and deregister agencies.
    #[command(subcommand)]
    Agency(AgencyCommand),
    /// Send a message as an agency; prints its receipt.
    Send(SendArgs),
    /// Read an agency's inbox.
    Inbox(InboxArgs),
    /// Print mesh events as they happen.
    Subscribe(SubscribeArgs),
    /// Regions, their shards and gateways, and agency counts.
    Status(JsonFlag),
    /// Measure a running mesh (load generators; see README).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Port of the coordinator; the east, west and central gateways take the
    /// next three ports and the notifier the one after.
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
    pub shards: Vec<String>,
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AgencyCommand {
    /// Register an agency in its home region.
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
        #[command(flatten)]
        output: JsonFlag,
    },
    /// List agencies.
    List {
        /// Only agencies homed in this region.
        #[arg(long)]
        region: Option<String>,
        #[command(flatten)]
        output: JsonFlag,
    },
    /// Show one agency.
    Show {
        /// Agency id.
        id: String,
        #[command(flatten)]
        output: JsonFlag,
    },
    /// Remove an agency from the directory.
    Deregister {
        /// Agency id.
        id: String,
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
    /// Idempotency key: a retry with the same key stores nothing new.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    #[command(flatten)]
    pub output: JsonFlag,
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
}

/// Runs `cli`, writing results to `out`.
pub async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    // A gateway's config file may name the coordinator; the flag's default
    // must not hide it.
    let coordinator_flag = cli.endpoints.coordinator.clone();
    let endpoints = Endpoints {
        coordinator: cli
            .endpoints
            .coordinator
            .unwrap_or_else(|| "http://127.0.0.1:50051".to_string()),
        gateway: cli.endpoints.gateway,
        notifier: cli.endpoints.notifier,
        operator: cli.endpoints.operator,
    };
    match cli.command {
        Command::Dev(args) => dev(args, out).await,
        Command::Coordinator(args) => crate::serve::coordinator(args).await,
        Command::Gateway(args) => crate::serve::gateway(args, coordinator_flag).await,
        Command::Agency(command) => agency(&endpoints, command, out).await,
        Command::Send(args) => send(&endpoints, args, out).await,
        Command::Inbox(args) => inbox(&endpoints, args, out).await,
        Command::Subscribe(args) => subscribe(&endpoints, args, out).await,
        Command::Status(output) => status(&endpoints, output.json, out).await,
        Command::Bench(command) => crate::bench::run(&endpoints, command, out).await,
    }
}

async fn dev(args: DevArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let mut shard_urls = std::collections::HashMap::new();
    for shard in &args.shards {
        let (name, url) = shard
            .split_once('=')
            .with_context(|| format!("--shard {shard:?} is not NAME=URL"))?;
        shard_urls.insert(name.to_string(), url.to_string());
    }
    let mesh = DevMesh::start(DevOptions {
        data_dir: args.data_dir.clone(),
        base_port: Some(args.base_port),
        shard_urls,
        tune_gateway: None,
    })
    .await?;
    writeln!(
        out,
        "fedmesh dev mesh is up (data in {})",
        args.data_dir.display()
    )?;
    writeln!(out, "  coordinator      {}", mesh.coordinator_url)?;
    for (region, url) in &mesh.gateway_urls {
        writeln!(out, "  gateway {region:<8} {url}")?;
    }
    writeln!(out, "  notifier         {}", mesh.notifier_url)?;
    writeln!(out, "press Ctrl-C to stop")?;
    out.flush()?;
    let shutdown = mesh.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: closing streams and finishing writes");
        shutdown.cancel();
    });
    mesh.wait().await
}

fn agency_json(agency: &pb::Agency) -> serde_json::Value {
    json!({
        "agency_id": agency.agency_id,
        "region": agency.region,
        "shard": agency.shard,
        "display_name": agency.display_name,
        "registered_at": agency.registered_at.map(|time| time.to_string()),
    })
}

fn print_agencies(
    agencies: &[pb::Agency],
    json_output: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if json_output {
        let list: Vec<_> = agencies.iter().map(agency_json).collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<24} {:<10} {:<12} NAME",
        "AGENCY", "REGION", "SHARD"
    )?;
    for agency in agencies {
        writeln!(
            out,
            "{:<24} {:<10} {:<12} {}",
            agency.agency_id, agency.region, agency.shard, agency.display_name
        )?;
    }
    Ok(())
}

async fn agency(
    endpoints: &Endpoints,
    command: AgencyCommand,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let mut directory = endpoints.directory_as_operator()?;
    match command {
        AgencyCommand::Register {
            id,
            region,
            name,
            output,
        } => {
            let agency = directory
                .register_agency(pb::RegisterAgencyRequest {
                    agency_id: id.clone(),
                    region,
                    display_name: name,
                })
                .await
                .map_err(|status| rpc_error(status, &format!("cannot register {id:?}")))?
                .into_inner()
                .agency
                .context("the coordinator answered without the agency")?;
            if output.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&agency_json(&agency))?
                )?;
            } else {
                writeln!(
                    out,
                    "registered {} in {} (shard {})",
                    agency.agency_id, agency.region, agency.shard
                )?;
            }
        }
        AgencyCommand::List { region, output } => {
            let mut agencies = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = directory
                    .list_agencies(pb::ListAgenciesRequest {
                        page_size: 1000,
                        page_token,
                        region: region.clone().unwrap_or_default(),
                    })
                    .await
                    .map_err(|status| rpc_error(status, "cannot list agencies"))?
                    .into_inner();
                agencies.extend(page.agencies);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print_agencies(&agencies, output.json, out)?;
        }
        AgencyCommand::Show { id, output } => {
            let agency = directory
                .get_agency(pb::GetAgencyRequest {
                    agency_id: id.clone(),
                })
                .await
                .map_err(|status| rpc_error(status, &format!("cannot show {id:?}")))?
                .into_inner()
                .agency
                .context("the coordinator answered without the agency")?;
            print_agencies(&[agency], output.json, out)?;
        }
        AgencyCommand::Deregister { id } => {
            directory
                .deregister_agency(pb::DeregisterAgencyRequest {
                    agency_id: id.clone(),
                })
                .await
                .map_err(|status| rpc_error(status, &format!("cannot deregister {id:?}")))?;
            writeln!(out, "deregistered {id}")?;
        }
    }
    Ok(())
}

fn read_body(args: &SendArgs) -> anyhow::Result<Vec<u8>> {
    match (&args.body, &args.body_file) {
        (Some(body), _) => Ok(body.clone().into_bytes()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut body)
                .context("cannot read the body from standard input")?;
            Ok(body)
        }
        (None, Some(path)) => std::fs::read(path)
            .with_context(|| format!("cannot read the body file {}", path.display())),
        (None, None) => anyhow::bail!("give the body with --body TEXT or --body-file PATH"),
    }
}

async fn send(
    endpoints: &Endpoints,
    args: SendArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let payload = read_body(&args)?;
    let mut headers = std::collections::HashMap::new();
    for header in &args.headers {
        let (name, value) = header
            .split_once('=')
            .with_context(|| format!("header {header:?} is not NAME=VALUE"))?;
        headers.insert(name.to_string(), value.to_string());
    }
    let mut exchange = endpoints.exchange_for(&args.sender).await?;
    let receipt = exchange
        .send(pb::SendRequest {
            sender_id: args.sender.clone(),
            recipient_id: args.recipient.clone(),
            kind: args.kind.clone(),
            payload,
            headers,
            idempotency_key: args.idempotency_key.clone(),
        })
        .await
        .map_err(|status| rpc_error(status, "send failed"))?
        .into_inner()
        .receipt
        .context("the gateway answered without a receipt")?;
    let status = match receipt.status() {
        pb::ReceiptStatus::Stored => "STORED",
        pb::ReceiptStatus::Spooled => "SPOOLED",
        pb::ReceiptStatus::Unspecified => "UNSPECIFIED",
    };
    let stored_at = receipt
        .stored_at
        .map(|time| time.to_string())
        .unwrap_or_default();
    if args.output.json {
        let value = json!({
            "message_id": receipt.message_id,
            "status": status,
            "home_region": receipt.home_region,
            "stored_at": stored_at,
            "duplicate": receipt.duplicate,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        let retry = if receipt.duplicate {
            " (retry: already stored, nothing new stored)"
        } else {
            ""
        };
        writeln!(
            out,
            "{status} {} in {} at {stored_at}{retry}",
            receipt.message_id, receipt.home_region
        )?;
    }
    Ok(())
}

fn print_delivery(
    delivery: &pb::Delivery,
    json_output: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let message = delivery.message.clone().unwrap_or_default();
    let body = String::from_utf8_lossy(&message.payload);
    if json_output {
        let value = json!({
            "sequence": delivery.sequence,
            "message_id": message.message_id,
            "sender_id": message.sender_id,
            "recipient_id": message.recipient_id,
            "kind": message.kind,
            "headers": message.headers,
            "body": body,
            "accepted_at": message.accepted_at.map(|time| time.to_string()),
            "origin_region": message.origin_region,
        });
        writeln!(out, "{value}")?;
    } else {
        writeln!(
            out,
            "#{} from {} ({}) kind {} id {}",
            delivery.sequence,
            message.sender_id,
            message.origin_region,
            message.kind,
            message.message_id
        )?;
        writeln!(out, "  {body}")?;
    }
    out.flush()?;
    Ok(())
}

async fn inbox(
    endpoints: &Endpoints,
    args: InboxArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if args.limit == Some(0) {
        anyhow::bail!("--limit must be at least 1");
    }
    let mut exchange = endpoints.exchange_for(&args.agency).await?;
    let (requests, outbound) = tokio::sync::mpsc::channel(64);
    requests
        .send(pb::ReceiveRequest {
            request: Some(pb::receive_request::Request::Open(pb::OpenInbox {
                agency_id: args.agency.clone(),
                window: args.limit.map_or(0, |limit| limit.min(10_000)),
            })),
        })
        .await
        .context("cannot open the inbox stream")?;
    let mut responses = exchange
        .receive(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .map_err(|status| rpc_error(status, "cannot open the inbox"))?
        .into_inner();
    let mut n_received = 0_u32;
    let interrupted = wait_for_signal();
    tokio::pin!(interrupted);
    loop {
        let response = tokio::select! {
            () = &mut interrupted => break,
            response = responses.message() => response.map_err(|status| rpc_error(status, "inbox stream failed"))?,
        };
        match response.and_then(|response| response.response) {
            None => break,
            Some(pb::receive_response::Response::Idle(_)) if !args.follow => break,
            Some(pb::receive_response::Response::Idle(_)) => {}
            Some(pb::receive_response::Response::Delivery(delivery)) => {
                print_delivery(&delivery, args.json, out)?;
                n_received += 1;
                if args.ack {
                    let ack = pb::ReceiveRequest {
                        request: Some(pb::receive_request::Request::Ack(pb::Ack {
                            sequences: vec![delivery.sequence],
                            up_to: 0,
                        })),
                    };
                    requests.send(ack).await.context("inbox stream closed")?;
                }
                if args.limit.is_some_and(|limit| n_received >= limit) {
                    break;
                }
            }
        }
    }
    // Closing our side lets the gateway apply the acks sent so far and end
    // the stream; wait for that so no ack is lost.
    drop(requests);
    while let Ok(Some(_)) = responses.message().await {}
    if n_received == 0 && !args.json {
        writeln!(out, "inbox of {} is empty", args.agency)?;
    }
    Ok(())
}

async fn subscribe(
    endpoints: &Endpoints,
    args: SubscribeArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let identity = match &args.agency {
        Some(agency) => Identity::Agency(agency.clone()),
        None => Identity::Operator(endpoints.operator.clone()),
    };
    let mut events = endpoints
        .notifications(&identity)?
        .subscribe(pb::SubscribeRequest {
            regions: args.regions,
            agencies: args.agencies,
            kinds: args.kinds,
        })
        .await
        .map_err(|status| rpc_error(status, "cannot subscribe"))?
        .into_inner();
    if !args.json {
        writeln!(out, "subscribed; waiting for events (Ctrl-C to stop)")?;
        out.flush()?;
    }
    let mut n_events = 0_u64;
    let interrupted = wait_for_signal();
    tokio::pin!(interrupted);
    loop {
        let event = tokio::select! {
            () = &mut interrupted => return Ok(()),
            event = events.message() => event.map_err(|status| rpc_error(status, "event stream failed"))?,
        };
        let Some(event) = event else { return Ok(()) };
        let occurred_at = event
            .occurred_at
            .map(|time| time.to_string())
            .unwrap_or_default();
        if args.json {
            let value = json!({
                "event_id": event.event_id,
                "kind": event.kind,
                "region": event.region,
                "agency_id": event.agency_id,
                "message_id": event.message_id,
                "occurred_at": occurred_at,
                "attributes": event.attributes,
            });
            writeln!(out, "{value}")?;
        } else {
            let mut attributes: Vec<String> = event
                .attributes
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            attributes.sort();
            writeln!(
                out,
                "{occurred_at} {:<18} {:<8} {:<20} {} {}",
                event.kind,
                event.region,
                event.agency_id,
                event.message_id,
                attributes.join(" ")
            )?;
        }
        out.flush()?;
        n_events += 1;
        if args.limit.is_some_and(|limit| n_events >= limit) {
            return Ok(());
        }
    }
}

async fn status(
    endpoints: &Endpoints,
    json_output: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let topology = endpoints.topology().await?;
    let count = |region: &str| {
        topology
            .agencies
            .iter()
            .filter(|agency| agency.region == region)
            .count()
    };
    if json_output {
        let regions: Vec<_> = topology
            .regions
            .iter()
            .map(|region| {
                let gateways: Vec<_> = topology
                    .gateways
                    .iter()
                    .filter(|gateway| gateway.region == region.name)
                    .map(|gateway| {
                        let load = gateway.load.clone().unwrap_or_default();
                        let pools: Vec<_> = load
                            .shard_pools
                            .iter()
                            .map(|pool| {
                                json!({ "shard": pool.shard, "open": pool.open, "idle": pool.idle, "max": pool.max })
                            })
                            .collect();
                        json!({
                            "gateway_id": gateway.gateway_id,
                            "address": gateway.address,
                            "open_streams": load.open_streams,
                            "in_flight": load.in_flight,
                            "shard_pools": pools,
                            "last_seen": gateway.last_seen.map(|time| time.to_string()),
                        })
                    })
                    .collect();
                json!({ "region": region.name, "shards": region.shards, "agencies": count(&region.name), "gateways": gateways })
            })
            .collect();
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(
                &json!({ "coordinator": endpoints.coordinator, "regions": regions })
            )?
        )?;
        return Ok(());
    }
    writeln!(out, "coordinator {}", endpoints.coordinator)?;
    writeln!(
        out,
        "{:<10} {:<16} {:>8}  GATEWAYS",
        "REGION", "SHARDS", "AGENCIES"
    )?;
    for region in &topology.regions {
        let gateways: Vec<String> = topology
            .gateways
            .iter()
            .filter(|gateway| gateway.region == region.name)
            .map(|gateway| {
                let load = gateway.load.clone().unwrap_or_default();
                let pools: Vec<String> = load
                    .shard_pools
                    .iter()
                    .map(|pool| {
                        format!(
                            ", {} pool {}/{} open, {} idle",
                            pool.shard, pool.open, pool.max, pool.idle
                        )
                    })
                    .collect();
                format!(
                    "{} {} (streams {}, in flight {}{})",
                    gateway.gateway_id,
                    gateway.address,
                    load.open_streams,
                    load.in_flight,
                    pools.concat()
                )
            })
            .collect();
        let gateways = if gateways.is_empty() {
            "none".to_string()
        } else {
            gateways.join(", ")
        };
        writeln!(
            out,
            "{:<10} {:<16} {:>8}  {}",
            region.name,
            region.shards.join(","),
            count(&region.name),
            gateways
        )?;
    }
    Ok(())
}
