//! What the client commands do: `agency`, `send`, `inbox`, `subscribe` and
//! `status` against a running mesh.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use fedmesh_common::events::Event;
use fedmesh_common::identity::Identity;
use fedmesh_proto::pb;
use serde_json::json;

use crate::client::{Endpoints, Failover, GatewayOverride, MeshArgs, rpc_error, with_retries};
use crate::signal::wait_for_signal;

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
        /// The shard to place it on [default: the region's active shard
        /// with the most room, or the fewest agencies].
        #[arg(long)]
        shard: Option<String>,
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
    /// Move an agency to another shard or region while it keeps sending
    /// and receiving: its unacknowledged messages, sequences and
    /// idempotency keys move with it; its Receive streams end and it
    /// reconnects (to the new region's gateway after a move between
    /// regions). A move can be cancelled until its cut-over.
    #[command(
        after_help = "Examples:\n  fedmesh agency move tax-office --shard east-2 --wait\n  fedmesh agency move tax-office --region west\n  fedmesh agency move tax-office --show MOVE_ID\n  fedmesh agency move tax-office --cancel MOVE_ID"
    )]
    Move(crate::moves::MoveArgs),
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
    /// Receive the events of this durable subscription (see `fedmesh
    /// subscription create`) instead of live ones: each is acknowledged once
    /// printed, so it is not delivered again.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["agencies", "kinds", "regions"])]
    pub subscription: Option<String>,
    /// With --subscription: most events unacknowledged at once.
    #[arg(long, default_value_t = 100, requires = "subscription")]
    pub prefetch: u32,
    /// Only events concerning this agency; repeatable.
    #[arg(long = "agency", value_name = "ID")]
    pub agencies: Vec<String>,
    /// Only events of this kind: agency.registered, agency.deregistered,
    /// message.accepted or message.delivered; repeatable.
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

/// How often `send` tries a message that met UNAVAILABLE or a lost answer.
const SEND_ATTEMPTS: u32 = 5;

fn agency_json(agency: &pb::Agency) -> serde_json::Value {
    json!({
        "agency_id": agency.agency_id,
        "region": agency.region,
        "shard": agency.shard,
        "display_name": agency.display_name,
        "registered_at": agency.registered_at.map(|time| time.to_string()),
        "moving": agency.moving,
        "version": agency.version,
    })
}

fn print_agencies(agencies: &[pb::Agency], out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
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

fn print_json(value: &serde_json::Value, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    writeln!(out, "{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// `fedmesh agency ...`.
pub async fn agency(args: AgencyArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let gateway = match &args.command {
        AgencyCommand::Deregister { gateway, .. } => gateway.gateway.as_deref(),
        _ => None,
    };
    let endpoints = args.mesh.endpoints(gateway, None);
    let mut directory = endpoints.directory_as_operator()?;
    match args.command {
        AgencyCommand::Register {
            id,
            region,
            name,
            shard,
            json,
        } => {
            let agency = directory
                .register_agency(pb::RegisterAgencyRequest {
                    agency_id: id.clone(),
                    region,
                    display_name: name,
                    shard: shard.unwrap_or_default(),
                })
                .await
                .map_err(|status| rpc_error(status, &format!("cannot register {id:?}")))?
                .into_inner()
                .agency
                .context("the coordinator answered without the agency")?;
            if json {
                print_json(&agency_json(&agency), out)?;
            } else {
                writeln!(
                    out,
                    "registered {} in {} (shard {})",
                    agency.agency_id, agency.region, agency.shard
                )?;
            }
        }
        AgencyCommand::List { region, json } => {
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
            if json {
                let list: Vec<_> = agencies.iter().map(agency_json).collect();
                print_json(&serde_json::Value::Array(list), out)?;
            } else {
                print_agencies(&agencies, out)?;
            }
        }
        AgencyCommand::Show { id, json } => {
            let agency = directory
                .get_agency(pb::GetAgencyRequest {
                    agency_id: id.clone(),
                })
                .await
                .map_err(|status| rpc_error(status, &format!("cannot show {id:?}")))?
                .into_inner()
                .agency
                .context("the coordinator answered without the agency")?;
            if json {
                print_json(&agency_json(&agency), out)?;
            } else {
                print_agencies(&[agency], out)?;
            }
        }
        AgencyCommand::Deregister { id, force, .. } => {
            if !force {
                refuse_unread_inbox(&endpoints, &id).await?;
            }
            directory
                .deregister_agency(pb::DeregisterAgencyRequest {
                    agency_id: id.clone(),
                })
                .await
                .map_err(|status| rpc_error(status, &format!("cannot deregister {id:?}")))?;
            writeln!(out, "deregistered {id}")?;
        }
        AgencyCommand::Move(args) => crate::moves::run(args, &mut directory, out).await?,
    }
    Ok(())
}

/// Fails if the inbox of `agency_id` holds unacknowledged messages, or
/// cannot be checked.
async fn refuse_unread_inbox(endpoints: &Endpoints, agency_id: &str) -> anyhow::Result<()> {
    let operator = Identity::Operator(endpoints.operator.clone());
    let inbox = endpoints
        .exchange_as(agency_id, &operator)
        .await?
        .get_inbox(pb::GetInboxRequest {
            agency_id: agency_id.to_string(),
        })
        .await
        .map_err(|status| {
            rpc_error(
                status,
                &format!("cannot check the inbox of {agency_id:?} (--force deregisters anyway)"),
            )
        })?
        .into_inner();
    anyhow::ensure!(
        inbox.unacknowledged == 0,
        "agency {agency_id:?} has {} unacknowledged messages in its inbox; read them first \
         (fedmesh inbox --as {agency_id} --ack) or deregister with --force to abandon them",
        inbox.unacknowledged
    );
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

/// A fresh idempotency key, for a send the user gave none.
pub fn new_idempotency_key() -> String {
    format!("cli-{}", uuid::Uuid::now_v7().simple())
}

/// `fedmesh send`.
pub async fn send(args: SendArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let endpoints = args.mesh.endpoints(args.gateway.gateway.as_deref(), None);
    let payload = read_body(&args)?;
    let mut headers = std::collections::HashMap::new();
    for header in &args.headers {
        let (name, value) = header
            .split_once('=')
            .with_context(|| format!("header {header:?} is not NAME=VALUE"))?;
        headers.insert(name.to_string(), value.to_string());
    }
    let exchange = endpoints.exchange_for(&args.sender).await?;
    let request = pb::SendRequest {
        sender_id: args.sender.clone(),
        recipient_id: args.recipient.clone(),
        kind: args.kind.clone(),
        payload,
        headers,
        idempotency_key: Some(
            args.idempotency_key
                .clone()
                .unwrap_or_else(new_idempotency_key),
        ),
    };
    let sent = with_retries(
        SEND_ATTEMPTS,
        || {
            let mut exchange = exchange.clone();
            let request = request.clone();
            async move { exchange.send(request).await }
        },
        |status, attempt| {
            eprintln!(
                "send: {} ({}); trying again with the same idempotency key, attempt {attempt} of {SEND_ATTEMPTS}",
                status.message(),
                fedmesh_common::error::code_name(status.code())
            );
        },
    )
    .await;
    let receipt = sent
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
    if args.json {
        print_json(
            &json!({
                "message_id": receipt.message_id,
                "status": status,
                "home_region": receipt.home_region,
                "stored_at": stored_at,
                "duplicate": receipt.duplicate,
            }),
            out,
        )?;
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

/// `fedmesh inbox`.
pub async fn inbox(args: InboxArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    if args.limit == Some(0) {
        anyhow::bail!("--limit must be at least 1");
    }
    let endpoints = args.mesh.endpoints(args.gateway.gateway.as_deref(), None);
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
    let mut told_waiting = false;
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
            Some(pb::receive_response::Response::Idle(_)) => {
                if !told_waiting {
                    eprintln!(
                        "waiting for new messages to {} (Ctrl-C to stop)",
                        args.agency
                    );
                    told_waiting = true;
                }
            }
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

/// `fedmesh subscribe`.
/// `fedmesh subscribe` to live events (with `--subscription`, see
/// `crate::subscriptions::consume`).
pub async fn subscribe(args: SubscribeArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let endpoints = args.mesh.endpoints(None, args.notifier.as_deref());
    let identity = match &args.agency {
        Some(agency) => Identity::Agency(agency.clone()),
        None => Identity::Operator(endpoints.operator.clone()),
    };
    let mut n_events = 0_u64;
    let interrupted = wait_for_signal();
    tokio::pin!(interrupted);
    let mut failover = Failover::default();
    let mut first = true;
    loop {
        let url = failover.pick(&endpoints.notifier_urls().await?)?;
        let request = pb::SubscribeRequest {
            regions: args.regions.clone(),
            agencies: args.agencies.clone(),
            kinds: args.kinds.clone(),
            cloudevents: false,
        };
        let subscribed = endpoints
            .notifications_at(&url, &identity)?
            .subscribe(request)
            .await;
        let lost = match subscribed {
            Ok(events) => {
                if first && !args.json {
                    writeln!(out, "subscribed; waiting for events (Ctrl-C to stop)")?;
                    out.flush()?;
                }
                first = false;
                let mut events = events.into_inner();
                loop {
                    let event = tokio::select! {
                        () = &mut interrupted => return Ok(()),
                        event = events.message() => event,
                    };
                    let event = match event {
                        Ok(Some(event)) => event,
                        Ok(None) => return Ok(()),
                        Err(status) if status.code() == tonic::Code::Unavailable => break status,
                        Err(status) => return Err(rpc_error(status, "event stream failed")),
                    };
                    print_event(out, &event, args.json, None)?;
                    failover.received();
                    n_events += 1;
                    if args.limit.is_some_and(|limit| n_events >= limit) {
                        return Ok(());
                    }
                }
            }
            Err(status) if status.code() == tonic::Code::Unavailable => status,
            Err(status) => return Err(rpc_error(status, "cannot subscribe")),
        };
        eprintln!(
            "notifier {url} is gone or cannot serve ({}); subscribing through another: events meanwhile are not shown",
            lost.message()
        );
        let Some(delay) = failover.lost(url) else {
            anyhow::bail!(
                "no notifier could serve the subscription: {} lost in a row",
                Failover::MAX_IN_A_ROW
            );
        };
        tokio::select! {
            () = &mut interrupted => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Prints `event` as one line (or one JSON object); `redelivered` is told
/// for the events of a durable subscription.
pub fn print_event(
    out: &mut (dyn Write + Send),
    event: &pb::Event,
    json: bool,
    redelivered: Option<bool>,
) -> std::io::Result<()> {
    let occurred_at = event
        .occurred_at
        .map(|time| time.to_string())
        .unwrap_or_default();
    if json {
        // The CloudEvents JSON format, as webhooks receive it; whether a
        // durable subscription's event came before is an extension
        // attribute.
        let cloud_event = Event::from(event.clone()).to_cloudevent_json();
        match redelivered {
            None => writeln!(out, "{}", String::from_utf8_lossy(&cloud_event))?,
            Some(redelivered) => {
                let mut value: serde_json::Value =
                    serde_json::from_slice(&cloud_event).map_err(std::io::Error::other)?;
                value["redelivered"] = json!(redelivered);
                writeln!(out, "{value}")?;
            }
        }
    } else {
        let mut attributes: Vec<String> = event
            .attributes
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        attributes.sort();
        if redelivered == Some(true) {
            attributes.push("(redelivered)".to_string());
        }
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
    out.flush()
}

/// `fedmesh status`.
pub async fn status(args: StatusArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let endpoints = args.mesh.endpoints(None, None);
    let topology = endpoints.topology().await?;
    let moves = endpoints
        .directory_as_operator()?
        .list_moves(pb::ListMovesRequest {})
        .await
        .map_err(|status| rpc_error(status, "cannot list the moves under way"))?
        .into_inner()
        .moves;
    let count = |region: &str| {
        topology
            .agencies
            .iter()
            .filter(|agency| agency.region == region)
            .count()
    };
    if args.output.json {
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
        let notifiers: Vec<_> = topology
            .notifiers
            .iter()
            .map(|notifier| {
                json!({
                    "notifier_id": notifier.notifier_id,
                    "address": notifier.address,
                    "last_seen": notifier.last_seen.map(|time| time.to_string()),
                })
            })
            .collect();
        return print_json(
            &json!({
                "coordinator": endpoints.coordinator,
                "leader": topology.leader.as_ref().map(|leader| json!({
                    "holder": leader.holder,
                    "token": leader.token,
                    "held_since": leader.held_since.map(|at| at.to_string()),
                    "expires_at": leader.expires_at.map(|at| at.to_string()),
                })),
                "regions": regions,
                "notifiers": notifiers,
                "moves": moves.iter().map(crate::moves::move_json).collect::<Vec<_>>(),
                "spools": spools(&topology).iter().map(|spool| json!({
                    "shard": spool.shard,
                    "region": spool.region,
                    "messages": spool.messages,
                    "oldest": spool.oldest.map(|at| at.to_string()),
                })).collect::<Vec<_>>(),
            }),
            out,
        );
    }
    writeln!(out, "coordinator {}", endpoints.coordinator)?;
    match &topology.leader {
        Some(leader) => {
            let since = leader
                .held_since
                .map(|at| at.to_string())
                .unwrap_or_default();
            let held = leader
                .held_since
                .map(|at| {
                    let micros = fedmesh_common::time::micros_from_timestamp(Some(&at));
                    (fedmesh_common::time::now_micros() - micros).max(0) / 1_000_000
                })
                .unwrap_or_default();
            writeln!(
                out,
                "leader {} (lease token {}, held since {since}, {held} s)",
                leader.holder, leader.token
            )?;
        }
        None => writeln!(out, "leader none (no coordinator holds the lease)")?,
    }
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
    let notifiers: Vec<String> = topology
        .notifiers
        .iter()
        .map(|notifier| format!("{} {}", notifier.notifier_id, notifier.address))
        .collect();
    writeln!(
        out,
        "notifiers {}",
        if notifiers.is_empty() {
            "none".to_string()
        } else {
            notifiers.join(", ")
        }
    )?;
    for current in &moves {
        writeln!(out, "{}", crate::moves::summary(current))?;
    }
    for spool in spools(&topology) {
        let oldest = fedmesh_common::time::micros_from_timestamp(spool.oldest.as_ref());
        let age = (fedmesh_common::time::now_micros() - oldest).max(0) / 1_000_000;
        writeln!(
            out,
            "spool {} for {}: {} messages waiting, the oldest spooled {age} s ago",
            spool.shard, spool.region, spool.messages
        )?;
    }
    Ok(())
}

/// What waits in the spools, per shard and destination region: as the
/// gateway that reported last saw it (every replica of a shard reports the
/// same spool).
fn spools(topology: &pb::TopologySnapshot) -> Vec<pb::SpoolDepth> {
    let mut newest: std::collections::BTreeMap<(String, String), (i64, pb::SpoolDepth)> =
        std::collections::BTreeMap::new();
    for gateway in &topology.gateways {
        let seen = fedmesh_common::time::micros_from_timestamp(gateway.last_seen.as_ref());
        let reported = gateway.load.iter().flat_map(|load| load.spools.iter());
        for spool in reported {
            let key = (spool.shard.clone(), spool.region.clone());
            if newest.get(&key).is_none_or(|(at, _)| *at < seen) {
                newest.insert(key, (seen, spool.clone()));
            }
        }
    }
    newest.into_values().map(|(_, spool)| spool).collect()
}
