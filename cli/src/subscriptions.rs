//! `fedmesh subscription ...` (durable subscriptions at the coordinator)
//! and `fedmesh subscribe --subscription NAME` (consuming one).

use std::io::Write;

use clap::{Args, Subcommand, ValueEnum};
use fedmesh_common::Identity;
use fedmesh_proto::pb;
use serde_json::json;
use tokio::sync::mpsc;

use crate::client::{Authenticated, Failover, MeshArgs, rpc_error};
use crate::commands::{SubscribeArgs, print_event};
use crate::signal::wait_for_signal;

#[derive(Debug, Args)]
pub struct SubscriptionArgs {
    #[command(subcommand)]
    pub command: SubscriptionCommand,
}

/// Who acts: an agency (its own subscriptions) or the operator (all).
#[derive(Debug, Args)]
pub struct Actor {
    /// Act as this agency instead of as the operator.
    #[arg(long = "as", value_name = "ID")]
    pub agency: Option<String>,
    #[command(flatten)]
    pub mesh: MeshArgs,
}

impl Actor {
    fn directory(&self) -> anyhow::Result<pb::directory_client::DirectoryClient<Authenticated>> {
        let endpoints = self.mesh.endpoints(None, None);
        let identity = match &self.agency {
            Some(agency) => Identity::Agency(agency.clone()),
            None => Identity::Operator(endpoints.operator.clone()),
        };
        endpoints.directory(&identity)
    }
}

/// How a subscription's events reach its subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Order {
    /// One subscriber at a time receives every event, in order.
    Strict,
    /// Subscribers share the events.
    Throughput,
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionCommand {
    /// Create a durable subscription: from now on the events it selects are
    /// kept until a subscriber acknowledges them.
    #[command(
        after_help = "Examples:\n  fedmesh subscription create deliveries --kind message.delivered --region west\n  fedmesh subscription create mine --as land-registry --order throughput --json\n  fedmesh subscription create audit --webhook https://audit.example/fedmesh --kind message.accepted"
    )]
    Create {
        /// Name: 2-63 characters of a-z, 0-9 and '-', starting with a letter.
        name: String,
        /// Only events concerning this agency; repeatable (an agency's own
        /// subscription has only its own events).
        #[arg(long = "agency", value_name = "ID")]
        agencies: Vec<String>,
        /// Only events of this kind: agency.registered, agency.deregistered,
        /// message.accepted or message.delivered; repeatable.
        #[arg(long = "kind", value_name = "KIND")]
        kinds: Vec<String>,
        /// Only events of this region; repeatable.
        #[arg(long = "region", value_name = "REGION")]
        regions: Vec<String>,
        /// strict: one subscriber at a time, in order; throughput:
        /// subscribers share the events.
        #[arg(long, value_enum, default_value_t = Order::Strict)]
        order: Order,
        /// Deliver the events to this HTTPS endpoint (http:// only to a
        /// loopback address) instead of to `fedmesh subscribe
        /// --subscription`: each event is POSTed as CloudEvents JSON, signed
        /// as Standard Webhooks does with the secret this command prints.
        #[arg(long, value_name = "URL")]
        webhook: Option<String>,
        /// Print the subscription as one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        actor: Actor,
    },
    /// List the subscriptions you may use (the operator: all).
    #[command(
        after_help = "Examples:\n  fedmesh subscription list\n  fedmesh subscription list --as land-registry --json"
    )]
    List {
        /// Print a JSON array of subscriptions.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        actor: Actor,
    },
    /// Show one subscription.
    #[command(
        after_help = "Examples:\n  fedmesh subscription show deliveries\n  fedmesh subscription show mine --as land-registry --json"
    )]
    Show {
        /// The subscription's name.
        name: String,
        /// Print the subscription as one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        actor: Actor,
    },
    /// Delete a subscription and the events it still holds.
    #[command(
        after_help = "Examples:\n  fedmesh subscription delete deliveries\n  fedmesh subscription delete mine --as land-registry"
    )]
    Delete {
        /// The subscription's name.
        name: String,
        #[command(flatten)]
        actor: Actor,
    },
    /// List the dead letters of a webhook subscription (events its endpoint
    /// refused at every attempt), oldest first, or send them again.
    #[command(
        name = "dead-letters",
        after_help = "Examples:\n  fedmesh subscription dead-letters audit\n  fedmesh subscription dead-letters audit --json\n  fedmesh subscription dead-letters audit --replay"
    )]
    DeadLetters {
        /// The subscription's name.
        name: String,
        /// Put them back on the subscription, to be delivered again after
        /// the events waiting, instead of listing them.
        #[arg(long)]
        replay: bool,
        /// Most dead letters to list (1-1000) or replay [default: 100 listed,
        /// all replayed].
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Print each event as one line of CloudEvents JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        actor: Actor,
    },
}

fn subscription_json(subscription: &pb::Subscription) -> serde_json::Value {
    json!({
        "name": subscription.name,
        "regions": subscription.regions,
        "agencies": subscription.agencies,
        "kinds": subscription.kinds,
        "order": order_name(subscription.order()),
        "owner": subscription.owner,
        "created_at": subscription.created_at.map(|time| time.to_string()),
        "webhook": subscription.webhook.as_ref().map(|webhook| json!({
            "url": webhook.url,
            "secret": webhook.secret,
        })),
    })
}

fn order_name(order: pb::SubscriptionOrder) -> &'static str {
    match order {
        pb::SubscriptionOrder::Throughput => "throughput",
        pb::SubscriptionOrder::Strict | pb::SubscriptionOrder::Unspecified => "strict",
    }
}

/// `any` for an empty filter list, else the values.
fn listed(values: &[String]) -> String {
    if values.is_empty() {
        "any".to_string()
    } else {
        values.join(",")
    }
}

fn print_subscription(
    out: &mut (dyn Write + Send),
    subscription: &pb::Subscription,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<24} {:<10} owner {:<24} regions {} agencies {} kinds {}",
        subscription.name,
        order_name(subscription.order()),
        subscription.owner,
        listed(&subscription.regions),
        listed(&subscription.agencies),
        listed(&subscription.kinds),
    )?;
    if let Some(webhook) = &subscription.webhook {
        writeln!(out, "  webhook {} (secret {})", webhook.url, webhook.secret)?;
    }
    Ok(())
}

/// `fedmesh subscription ...`.
pub async fn subscription(
    args: SubscriptionArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    match args.command {
        SubscriptionCommand::Create {
            name,
            agencies,
            kinds,
            regions,
            order,
            webhook,
            json,
            actor,
        } => {
            let order = match order {
                Order::Strict => pb::SubscriptionOrder::Strict,
                Order::Throughput => pb::SubscriptionOrder::Throughput,
            };
            let request = pb::CreateSubscriptionRequest {
                subscription: Some(pb::Subscription {
                    name,
                    regions,
                    agencies,
                    kinds,
                    order: order as i32,
                    webhook: webhook.map(|url| pb::Webhook {
                        url,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            };
            let created = actor
                .directory()?
                .create_subscription(request)
                .await
                .map_err(|status| rpc_error(status, "cannot create the subscription"))?
                .into_inner()
                .subscription
                .unwrap_or_default();
            if json {
                writeln!(out, "{}", subscription_json(&created))?;
            } else {
                write!(out, "created ")?;
                print_subscription(out, &created)?;
            }
        }
        SubscriptionCommand::List { json, actor } => {
            let subscriptions = actor
                .directory()?
                .list_subscriptions(pb::ListSubscriptionsRequest {})
                .await
                .map_err(|status| rpc_error(status, "cannot list subscriptions"))?
                .into_inner()
                .subscriptions;
            if json {
                let values: Vec<_> = subscriptions.iter().map(subscription_json).collect();
                writeln!(out, "{}", serde_json::Value::Array(values))?;
            } else if subscriptions.is_empty() {
                writeln!(out, "no subscriptions")?;
            } else {
                for subscription in &subscriptions {
                    print_subscription(out, subscription)?;
                }
            }
        }
        SubscriptionCommand::Show { name, json, actor } => {
            let subscription = actor
                .directory()?
                .get_subscription(pb::GetSubscriptionRequest { name })
                .await
                .map_err(|status| rpc_error(status, "cannot show the subscription"))?
                .into_inner()
                .subscription
                .unwrap_or_default();
            if json {
                writeln!(out, "{}", subscription_json(&subscription))?;
            } else {
                print_subscription(out, &subscription)?;
            }
        }
        SubscriptionCommand::Delete { name, actor } => {
            actor
                .directory()?
                .delete_subscription(pb::DeleteSubscriptionRequest { name: name.clone() })
                .await
                .map_err(|status| rpc_error(status, "cannot delete the subscription"))?;
            writeln!(out, "deleted subscription {name}")?;
        }
        SubscriptionCommand::DeadLetters {
            name,
            replay,
            limit,
            json,
            actor,
        } => {
            let mut directory = actor.directory()?;
            if replay {
                let replayed = directory
                    .replay_dead_letters(pb::ReplayDeadLettersRequest {
                        name: name.clone(),
                        limit: limit.unwrap_or(0),
                    })
                    .await
                    .map_err(|status| rpc_error(status, "cannot replay the dead letters"))?
                    .into_inner()
                    .replayed;
                writeln!(
                    out,
                    "replayed {replayed} dead letters of subscription {name}"
                )?;
            } else {
                let events = directory
                    .list_dead_letters(pb::ListDeadLettersRequest {
                        name: name.clone(),
                        limit: limit.unwrap_or(0),
                    })
                    .await
                    .map_err(|status| rpc_error(status, "cannot list the dead letters"))?
                    .into_inner()
                    .events;
                if events.is_empty() && !json {
                    writeln!(out, "no dead letters in subscription {name}")?;
                }
                for event in &events {
                    print_event(out, event, json, None)?;
                }
            }
        }
    }
    Ok(())
}

/// How one Consume stream ended.
enum Ended {
    /// Done (limit reached, interrupted, or the notifier closed it).
    Done,
    /// The notifier went away or lost its bus: consume elsewhere.
    Lost(tonic::Status),
}

/// `fedmesh subscribe --subscription NAME`: prints each event and then
/// acknowledges it; on Ctrl-C or after `--limit` it ends the stream so that
/// every acknowledgement is applied first. When its notifier goes away it
/// consumes through another one the coordinator knows (what it had not
/// acknowledged comes again, marked redelivered).
pub async fn consume(args: SubscribeArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let name = args.subscription.as_deref().unwrap_or_default();
    let endpoints = args.mesh.endpoints(None, args.notifier.as_deref());
    let identity = match &args.agency {
        Some(agency) => Identity::Agency(agency.clone()),
        None => Identity::Operator(endpoints.operator.clone()),
    };
    let mut progress = Progress {
        printed: 0,
        done: false,
    };
    let interrupted = wait_for_signal();
    tokio::pin!(interrupted);
    let mut failover = Failover::default();
    let mut first = true;
    loop {
        let url = failover.pick(&endpoints.notifier_urls().await?)?;
        let notifications = endpoints.notifications_at(&url, &identity)?;
        let printed_before = progress.printed;
        let ended = consume_from(
            notifications,
            name,
            &args,
            out,
            &mut progress,
            &mut interrupted,
            first,
        )
        .await?;
        first = false;
        if progress.printed > printed_before {
            failover.received();
        }
        match ended {
            Ended::Done => return Ok(()),
            Ended::Lost(status) => {
                eprintln!(
                    "notifier {url} is gone or cannot serve ({}); consuming through another",
                    status.message()
                );
                let Some(delay) = failover.lost(url) else {
                    anyhow::bail!(
                        "no notifier could serve subscription {name}: {} lost in a row",
                        Failover::MAX_IN_A_ROW
                    );
                };
                tokio::select! {
                    () = interrupted.as_mut() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// What a `subscribe --subscription` run has done so far.
struct Progress {
    printed: u64,
    /// The limit was reached or the user interrupted: no more events.
    done: bool,
}

fn is_lost(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
}

/// One Consume stream through `notifications`.
async fn consume_from(
    mut notifications: pb::notifications_client::NotificationsClient<Authenticated>,
    name: &str,
    args: &SubscribeArgs,
    out: &mut (dyn Write + Send),
    progress: &mut Progress,
    interrupted: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    first: bool,
) -> anyhow::Result<Ended> {
    let (requests, outgoing) = mpsc::channel(64);
    let start = pb::ConsumeRequest {
        request: Some(pb::consume_request::Request::Start(pb::ConsumeStart {
            subscription: name.to_string(),
            prefetch: args.prefetch,
            cloudevents: false,
        })),
    };
    requests
        .send(start)
        .await
        .map_err(|_| anyhow::anyhow!("cannot start consuming"))?;
    let mut deliveries = match notifications
        .consume(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) if is_lost(&status) => return Ok(Ended::Lost(status)),
        Err(status) => return Err(rpc_error(status, "cannot consume the subscription")),
    };
    if first && !args.json {
        writeln!(
            out,
            "consuming subscription {name}; waiting for events (Ctrl-C to stop)"
        )?;
        out.flush()?;
    }
    let mut requests = (!progress.done).then_some(requests);
    loop {
        let delivery = tokio::select! {
            // Done: no more acks; the notifier applies those sent and ends
            // the stream, whose end is awaited below.
            () = interrupted.as_mut(), if requests.is_some() => {
                progress.done = true;
                requests = None;
                continue;
            }
            delivery = deliveries.message() => delivery,
        };
        let delivery = match delivery {
            Ok(Some(delivery)) => delivery,
            Ok(None) => return Ok(Ended::Done),
            Err(status) if is_lost(&status) && !progress.done => return Ok(Ended::Lost(status)),
            Err(status) => return Err(rpc_error(status, "event stream failed")),
        };
        let Some(sender) = &requests else {
            // Arrived after we were done: not acknowledged, delivered again.
            continue;
        };
        let event = delivery.event.unwrap_or_default();
        print_event(out, &event, args.json, Some(delivery.redelivered))?;
        let ack = pb::ConsumeRequest {
            request: Some(pb::consume_request::Request::Ack(pb::ConsumeAck {
                delivery_ids: vec![delivery.delivery_id],
            })),
        };
        if sender.send(ack).await.is_err() {
            anyhow::bail!("the event stream ended");
        }
        progress.printed += 1;
        if args.limit.is_some_and(|limit| progress.printed >= limit) {
            progress.done = true;
            requests = None;
        }
    }
}
