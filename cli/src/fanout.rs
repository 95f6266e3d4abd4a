//! `fedmesh bench fanout`: events delivered per second to N subscribers of
//! one notifier replica, live (ephemeral) or through durable subscriptions,
//! with latency from publish to delivery; `--baseline` measures RabbitMQ
//! alone (a lapin publisher, N queues, one consumer process) in the same
//! run; `--idle N` measures what N idle subscriber streams cost the
//! notifier's process.
//!
//! The benchmark publishes the events itself, to the mesh's exchange, as a
//! gateway's outbox relay does: what is measured is the notifier, not the
//! senders.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use fedmesh_common::Identity;
use fedmesh_common::amqp::{AmqpPublisher, consume_exclusive, declare_exchange};
use fedmesh_common::events::{Event, EventPublisher, MESSAGE_ACCEPTED};
use fedmesh_proto::pb;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::client::{Authenticated, Endpoints};

/// The agency the benchmark's events concern, and their region.
const AGENCY: &str = "bench-fanout";
const REGION: &str = "bench";
/// Events published per confirmed batch.
const PUBLISH_BATCH: usize = 100;

/// How subscribers receive the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FanoutMode {
    /// Live subscribers (`Subscribe`): one queue per notifier, fanned out in
    /// memory.
    Ephemeral,
    /// One durable subscription per subscriber (`Consume`, acked).
    Durable,
}

#[derive(Debug, Args)]
pub struct BenchFanoutArgs {
    /// Subscribers, each receiving every event.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Live subscribers or durable subscriptions.
    #[arg(long, value_enum, default_value_t = FanoutMode::Ephemeral)]
    pub mode: FanoutMode,
    /// Events to publish (each reaches every subscriber).
    #[arg(long, default_value_t = 2_000)]
    pub events: u64,
    /// Most events published ahead of the slowest subscriber.
    #[arg(long, default_value_t = 500)]
    pub window: u64,
    /// The RabbitMQ broker the mesh's events go through.
    #[arg(long, env = "FEDMESH_AMQP", value_name = "URL")]
    pub amqp: String,
    /// The mesh's event exchange.
    #[arg(long, env = "FEDMESH_AMQP_EXCHANGE", default_value = "fedmesh.events")]
    pub amqp_exchange: String,
    /// Also measure RabbitMQ alone: a lapin publisher, as many queues
    /// (durable or transient, as the mode), one consumer process.
    #[arg(long)]
    pub baseline: bool,
    /// Instead: open this many idle live subscriber streams and print the
    /// resident memory of the process serving the notifier (--pid).
    #[arg(long, value_name = "STREAMS", requires = "pid")]
    pub idle: Option<usize>,
    /// The process serving the notifier, for --idle (its /proc status).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Also write the result as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json_out: Option<std::path::PathBuf>,
}

/// What one fan-out run measured.
struct FanoutRun {
    deliveries: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl FanoutRun {
    fn rate(&self) -> f64 {
        self.deliveries as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    fn line(&self, what: &str) -> String {
        let millis = |quantile| self.latency.value_at_quantile(quantile) as f64 / 1000.0;
        format!(
            "  {what:<10} {:>9.0} deliveries/s ({} in {:.1} s), publish to delivery p50 {:.2} ms p99 {:.2} ms",
            self.rate(),
            self.deliveries,
            self.elapsed.as_secs_f64(),
            millis(0.5),
            millis(0.99)
        )
    }
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|error| anyhow::anyhow!("{error}"))
}

/// Microseconds since the epoch.
fn now_micros() -> i64 {
    fedmesh_common::time::now_micros()
}

/// Records the age of an event stamped at `stamped_micros`.
fn record_age(latency: &mut Histogram<u64>, stamped_micros: i64) {
    let age = u64::try_from(now_micros().saturating_sub(stamped_micros)).unwrap_or(0);
    latency.saturating_record(age.max(1));
}

/// Publishes `events` events to the exchange, in confirmed batches, never
/// more than `window` ahead of the slowest subscriber (`delivered` counts
/// deliveries to all of them).
async fn publish(
    publisher: &AmqpPublisher,
    events: u64,
    window: u64,
    subscribers: u64,
    delivered: &AtomicU64,
) -> anyhow::Result<()> {
    let mut published = 0_u64;
    while published < events {
        while published.saturating_sub(delivered.load(Ordering::Relaxed) / subscribers.max(1))
            > window
        {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let batch = (events - published).min(PUBLISH_BATCH as u64);
        let batch: Vec<Event> = (0..batch)
            .map(|_| Event::new(MESSAGE_ACCEPTED, REGION, AGENCY).with_message("bench"))
            .collect();
        published += batch.len() as u64;
        publisher
            .publish(batch)
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?;
    }
    Ok(())
}

/// `fedmesh bench fanout`.
pub async fn fanout(
    endpoints: &Endpoints,
    args: BenchFanoutArgs,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=100_000).contains(&args.subscribers),
        "--subscribers must be 1 to 100000"
    );
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    let operator = Identity::Operator(endpoints.operator.clone());
    let url = endpoints
        .notifier_urls()
        .await?
        .into_iter()
        .next()
        .context("no notifier is running: the coordinator knows none")?;
    if let Some(streams) = args.idle {
        return idle(endpoints, &url, &operator, streams, args.pid, out).await;
    }
    let mesh = match args.mode {
        FanoutMode::Ephemeral => ephemeral(endpoints, &url, &operator, &args).await?,
        FanoutMode::Durable => durable(endpoints, &url, &operator, &args).await?,
    };
    let mode = match args.mode {
        FanoutMode::Ephemeral => "ephemeral",
        FanoutMode::Durable => "durable",
    };
    writeln!(
        out,
        "bench fanout: {} events to {} {mode} subscribers through notifier {url}",
        args.events, args.subscribers
    )?;
    writeln!(out, "{}", mesh.line("fedmesh"))?;
    let mut result = json!({
        "benchmark": "fanout",
        "mode": mode,
        "subscribers": args.subscribers,
        "events": args.events,
        "deliveries_per_second": mesh.rate(),
        "latency_ms": {
            "p50": mesh.latency.value_at_quantile(0.5) as f64 / 1000.0,
            "p99": mesh.latency.value_at_quantile(0.99) as f64 / 1000.0,
        },
    });
    if args.baseline {
        let alone = baseline(&args).await?;
        writeln!(out, "{}", alone.line("RabbitMQ"))?;
        let ratio = mesh.rate() / alone.rate().max(f64::EPSILON);
        writeln!(out, "  ratio      {ratio:.2} (fedmesh / RabbitMQ alone)")?;
        result["baseline_deliveries_per_second"] = json!(alone.rate());
        result["ratio"] = json!(ratio);
    }
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn notifications(
    endpoints: &Endpoints,
    url: &str,
    identity: &Identity,
) -> anyhow::Result<pb::notifications_client::NotificationsClient<Authenticated>> {
    endpoints.notifications_at(url, identity)
}

/// Live subscribers: each counts until it has every event.
async fn ephemeral(
    endpoints: &Endpoints,
    url: &str,
    operator: &Identity,
    args: &BenchFanoutArgs,
) -> anyhow::Result<FanoutRun> {
    let delivered = Arc::new(AtomicU64::new(0));
    let mut readers = tokio::task::JoinSet::new();
    // A few connections, as many subscribers' applications would have.
    let clients: Vec<_> = (0..args.subscribers.clamp(1, 16))
        .map(|_| notifications(endpoints, url, operator))
        .collect::<anyhow::Result<_>>()?;
    for subscriber in 0..args.subscribers {
        let mut client = clients[subscriber % clients.len()].clone();
        let mut stream = client
            .subscribe(pb::SubscribeRequest {
                agencies: vec![AGENCY.into()],
                kinds: vec![MESSAGE_ACCEPTED.into()],
                regions: vec![REGION.into()],
                cloudevents: false,
            })
            .await
            .map_err(|status| anyhow::anyhow!("cannot subscribe: {}", status.message()))?
            .into_inner();
        let delivered = Arc::clone(&delivered);
        let events = args.events;
        readers.spawn(async move {
            let mut latency = histogram()?;
            for _ in 0..events {
                let event = stream
                    .message()
                    .await
                    .map_err(|status| anyhow::anyhow!("subscriber: {}", status.message()))?
                    .context("the notifier ended a subscription")?;
                let stamped =
                    fedmesh_common::time::micros_from_timestamp(event.occurred_at.as_ref());
                record_age(&mut latency, stamped);
                delivered.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(latency)
        });
    }
    run_publisher_and(readers, delivered, args).await
}

/// Publishes while `readers` read; their histograms merged.
async fn run_publisher_and(
    mut readers: tokio::task::JoinSet<anyhow::Result<Histogram<u64>>>,
    delivered: Arc<AtomicU64>,
    args: &BenchFanoutArgs,
) -> anyhow::Result<FanoutRun> {
    let publisher = AmqpPublisher::new(&args.amqp, &args.amqp_exchange, "fedmesh-bench-fanout");
    let started = Instant::now();
    publish(
        &publisher,
        args.events,
        args.window,
        args.subscribers as u64,
        &delivered,
    )
    .await?;
    let mut latency = histogram()?;
    while let Some(reader) = readers.join_next().await {
        latency
            .add(&reader.context("a subscriber panicked")??)
            .map_err(|error| anyhow::anyhow!("{error}"))?;
    }
    Ok(FanoutRun {
        deliveries: delivered.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        latency,
    })
}

/// One durable subscription per subscriber, each consumed and acked.
async fn durable(
    endpoints: &Endpoints,
    url: &str,
    operator: &Identity,
    args: &BenchFanoutArgs,
) -> anyhow::Result<FanoutRun> {
    let mut directory = endpoints.directory(operator)?;
    let names: Vec<String> = (0..args.subscribers)
        .map(|subscriber| format!("bench-fanout-{subscriber}"))
        .collect();
    // Whatever happens, the subscriptions go at the end: each holds a
    // queue on the broker.
    let run = async {
        for name in &names {
            // Left over from an interrupted run: start empty.
            let _ = directory
                .delete_subscription(pb::DeleteSubscriptionRequest { name: name.clone() })
                .await;
            directory
                .create_subscription(pb::CreateSubscriptionRequest {
                    subscription: Some(pb::Subscription {
                        name: name.clone(),
                        agencies: vec![AGENCY.into()],
                        kinds: vec![MESSAGE_ACCEPTED.into()],
                        regions: vec![REGION.into()],
                        ..Default::default()
                    }),
                })
                .await
                .map_err(|status| anyhow::anyhow!("cannot create {name}: {}", status.message()))?;
        }
        let delivered = Arc::new(AtomicU64::new(0));
        let mut readers = tokio::task::JoinSet::new();
        let clients: Vec<_> = (0..args.subscribers.clamp(1, 16))
            .map(|_| notifications(endpoints, url, operator))
            .collect::<anyhow::Result<_>>()?;
        for (subscriber, name) in names.iter().enumerate() {
            let mut client = clients[subscriber % clients.len()].clone();
            let (requests, outgoing) = mpsc::channel(64);
            let start = pb::ConsumeRequest {
                request: Some(pb::consume_request::Request::Start(pb::ConsumeStart {
                    subscription: name.clone(),
                    prefetch: 500,
                    cloudevents: false,
                })),
            };
            requests
                .send(start)
                .await
                .map_err(|_| anyhow::anyhow!("cannot start consuming"))?;
            let mut stream = client
                .consume(tokio_stream::wrappers::ReceiverStream::new(outgoing))
                .await
                .map_err(|status| anyhow::anyhow!("cannot consume {name}: {}", status.message()))?
                .into_inner();
            let delivered = Arc::clone(&delivered);
            let events = args.events;
            readers.spawn(async move {
                let mut latency = histogram()?;
                let mut unacked = Vec::new();
                for _ in 0..events {
                    let delivery = stream
                        .message()
                        .await
                        .map_err(|status| anyhow::anyhow!("subscriber: {}", status.message()))?
                        .context("the notifier ended a subscription")?;
                    let event = delivery.event.unwrap_or_default();
                    let stamped =
                        fedmesh_common::time::micros_from_timestamp(event.occurred_at.as_ref());
                    record_age(&mut latency, stamped);
                    delivered.fetch_add(1, Ordering::Relaxed);
                    unacked.push(delivery.delivery_id);
                    if unacked.len() >= 50 {
                        let ack = pb::ConsumeRequest {
                            request: Some(pb::consume_request::Request::Ack(pb::ConsumeAck {
                                delivery_ids: std::mem::take(&mut unacked),
                            })),
                        };
                        requests
                            .send(ack)
                            .await
                            .map_err(|_| anyhow::anyhow!("the stream ended"))?;
                    }
                }
                Ok::<_, anyhow::Error>(latency)
            });
        }
        run_publisher_and(readers, delivered, args).await
    }
    .await;
    for name in &names {
        let _ = directory
            .delete_subscription(pb::DeleteSubscriptionRequest { name: name.clone() })
            .await;
    }
    run
}

/// RabbitMQ alone: a lapin publisher with confirms to as many queues
/// (durable quorum queues or transient ones, as the mode), all consumed by
/// this process with acks in batches.
async fn baseline(args: &BenchFanoutArgs) -> anyhow::Result<FanoutRun> {
    let connection = Connection::connect(&args.amqp, ConnectionProperties::default())
        .await
        .context("cannot connect to RabbitMQ for the baseline")?;
    let exchange = format!("{}.baseline", args.amqp_exchange);
    let admin = connection.create_channel().await?;
    declare_exchange(&admin, &exchange).await?;
    let durable = args.mode == FanoutMode::Durable;
    let delivered = Arc::new(AtomicU64::new(0));
    let mut readers = tokio::task::JoinSet::new();
    let mut queues = Vec::new();
    for subscriber in 0..args.subscribers {
        let channel = connection.create_channel().await?;
        channel.basic_qos(500, BasicQosOptions::default()).await?;
        let consumer = if durable {
            let queue = format!("{exchange}.{subscriber}");
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-queue-type".into(),
                lapin::types::AMQPValue::LongString("quorum".into()),
            );
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions::durable(),
                    arguments,
                )
                .await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            queues.push(queue.clone());
            channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?
        } else {
            consume_exclusive(&channel, &exchange, &["#"]).await?
        };
        let delivered = Arc::clone(&delivered);
        let events = args.events;
        let mut consumer = consumer;
        readers.spawn(async move {
            let mut latency = histogram()?;
            for received in 1..=events {
                let delivery = consumer
                    .next()
                    .await
                    .context("the consumer ended")?
                    .map_err(|error| anyhow::anyhow!("{error}"))?;
                let event = Event::from_cloudevent_json(&delivery.data)
                    .map_err(|error| anyhow::anyhow!("{error}"))?;
                record_age(&mut latency, event.occurred_at_micros);
                delivered.fetch_add(1, Ordering::Relaxed);
                if durable && (received % 50 == 0 || received == events) {
                    delivery
                        .acker
                        .ack(BasicAckOptions { multiple: true })
                        .await
                        .map_err(|error| anyhow::anyhow!("{error}"))?;
                }
            }
            Ok::<_, anyhow::Error>(latency)
        });
    }
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    let mut published = 0_u64;
    while published < args.events {
        while published
            .saturating_sub(delivered.load(Ordering::Relaxed) / (args.subscribers as u64).max(1))
            > args.window
        {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let batch = (args.events - published).min(PUBLISH_BATCH as u64);
        let mut confirms = Vec::new();
        for _ in 0..batch {
            let event = Event::new(MESSAGE_ACCEPTED, REGION, AGENCY).with_message("bench");
            let properties =
                BasicProperties::default().with_delivery_mode(if durable { 2 } else { 1 });
            confirms.push(
                publisher
                    .basic_publish(
                        exchange.as_str().into(),
                        event.routing_key().into(),
                        BasicPublishOptions::default(),
                        &event.to_cloudevent_json(),
                        properties,
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            confirm.await?;
        }
        published += batch;
    }
    let mut latency = histogram()?;
    while let Some(reader) = readers.join_next().await {
        latency
            .add(&reader.context("a consumer panicked")??)
            .map_err(|error| anyhow::anyhow!("{error}"))?;
    }
    let run = FanoutRun {
        deliveries: delivered.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        latency,
    };
    for queue in queues {
        admin
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    let _ = admin
        .exchange_delete(
            exchange.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = connection.close(200, "baseline done".into()).await;
    Ok(run)
}

/// Resident memory of process `pid`, in KiB.
fn resident_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read the status of process {pid}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("process {pid} reports no resident memory"))
}

/// Opens `streams` idle live subscriptions and reports the notifier
/// process's resident memory before and after.
async fn idle(
    endpoints: &Endpoints,
    url: &str,
    operator: &Identity,
    streams: usize,
    pid: Option<u32>,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    let pid = pid.context("--idle needs --pid of the process serving the notifier")?;
    let before = resident_kib(pid)?;
    // Under the 256 calls a server takes per connection by default
    // (`--max-concurrent-streams`): a call past it would wait for a slot
    // that idle streams never free.
    const STREAMS_PER_CONNECTION: usize = 200;
    let clients: Vec<_> = (0..streams.div_ceil(STREAMS_PER_CONNECTION).max(1))
        .map(|_| notifications(endpoints, url, operator))
        .collect::<anyhow::Result<_>>()?;
    let mut open = Vec::with_capacity(streams);
    for stream in 0..streams {
        let mut client = clients[stream % clients.len()].clone();
        let subscription = client
            .subscribe(pb::SubscribeRequest {
                agencies: vec![format!("idle-{}", stream % 1000)],
                ..Default::default()
            })
            .await
            .map_err(|status| anyhow::anyhow!("stream {stream}: {}", status.message()))?;
        open.push(subscription.into_inner());
    }
    let after = resident_kib(pid)?;
    writeln!(
        out,
        "bench fanout --idle: {streams} idle subscriber streams; notifier process {pid} resident {:.1} MiB (was {:.1} MiB before them)",
        after as f64 / 1024.0,
        before as f64 / 1024.0
    )?;
    drop(open);
    Ok(())
}
