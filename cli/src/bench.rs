//! `fedmesh bench`: load generators against a running mesh. They measure;
//! they assert nothing. Latency is recorded per call in an HDR histogram.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use fedmesh_common::events::BoxFuture;
use fedmesh_common::identity::{AttachIdentity, Identity};
use fedmesh_proto::pb;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::client::{Endpoints, GatewayOverride, MeshArgs, rpc_error, with_retries};

/// How often `bench send` tries a message that met UNAVAILABLE.
const SEND_ATTEMPTS: u32 = 5;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(flatten)]
    pub gateway: GatewayOverride,
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Durable sends through one gateway: throughput and latency of `Send`.
    #[command(
        after_help = "Examples:\n  fedmesh bench send --concurrency 64 --size 256 --duration 10\n  fedmesh bench send --recipient-region west --count 100000 --json-out send.json"
    )]
    Send(BenchSendArgs),
    /// Draining one inbox through `Receive` with acks: deliveries per second.
    #[command(
        after_help = "Examples:\n  fedmesh bench receive\n  fedmesh bench receive --window 1000 --ack-every 100 --json-out receive.json"
    )]
    Receive(BenchReceiveArgs),
    /// The plain gRPC ceiling: `grpc.health.v1.Health/Check` calls, which do
    /// no work, with the same client and load as `bench send`.
    #[command(
        after_help = "Examples:\n  fedmesh bench health --duration 5\n  fedmesh bench health --concurrency 64 --connections 4 --count 200000"
    )]
    Health(BenchHealthArgs),
    /// Events delivered per second to N subscribers of one notifier, live
    /// or durable; `--baseline` measures RabbitMQ alone in the same run.
    #[command(
        after_help = "Examples:\n  fedmesh bench fanout --amqp amqp://guest:guest@127.0.0.1:5672/%2f --subscribers 100 --baseline\n  fedmesh bench fanout --amqp amqp://guest:guest@127.0.0.1:5672/%2f --mode durable --subscribers 100 --baseline\n  fedmesh bench fanout --amqp amqp://guest:guest@127.0.0.1:5672/%2f --idle 10000 --pid 4242"
    )]
    Fanout(crate::fanout::BenchFanoutArgs),
}

/// How a closed-loop benchmark loads its target: `concurrency` calls in
/// flight, each worker issuing its next call when the previous one answered.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Calls in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Stop after this many calls (instead of after --duration).
    #[arg(long)]
    pub count: Option<u64>,
    /// How long to call, in seconds, when no --count is given.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Also write the result as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json_out: Option<PathBuf>,
}

impl LoadArgs {
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.concurrency > 0 && self.connections > 0,
            "--concurrency and --connections must be at least 1"
        );
        Ok(())
    }
}

/// `fedmesh bench health`.
#[derive(Debug, Args)]
pub struct BenchHealthArgs {
    /// Agency whose home gateway to call, found through the coordinator
    /// (`--gateway` names a gateway directly).
    #[arg(long, default_value = "bench-sender")]
    pub agency: String,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// `fedmesh bench send`.
#[derive(Debug, Args)]
pub struct BenchSendArgs {
    /// Home region of the sending and receiving agencies (registered if missing).
    #[arg(long, default_value = "east")]
    pub region: String,
    /// Sending agency.
    #[arg(long, default_value = "bench-sender")]
    pub sender: String,
    /// Receiving agency.
    #[arg(long, default_value = "bench-recipient")]
    pub recipient: String,
    /// Home region of the recipient; another region than `--region` measures relays.
    #[arg(long)]
    pub recipient_region: Option<String>,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Send without idempotency keys, and so without retries: measures the
    /// store and relay path alone, without the key claim (a commit in the
    /// sender's shard) a careful client's sends pay for.
    #[arg(long)]
    pub no_keys: bool,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// `fedmesh bench receive`.
#[derive(Debug, Args)]
pub struct BenchReceiveArgs {
    /// The agency whose inbox to drain (fill it first with `bench send`).
    #[arg(long, default_value = "bench-recipient")]
    pub agency: String,
    /// Unacknowledged deliveries allowed in flight.
    #[arg(long, default_value_t = 1000)]
    pub window: u32,
    /// Acknowledge cumulatively after this many deliveries.
    #[arg(long, default_value_t = 100)]
    pub ack_every: u32,
    /// Stop after this many deliveries (default: when the inbox is drained).
    #[arg(long)]
    pub count: Option<u64>,
    /// Also write the result as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json_out: Option<PathBuf>,
}

/// Runs a benchmark.
pub async fn run(
    endpoints: &Endpoints,
    command: BenchCommand,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    match command {
        BenchCommand::Send(args) => send(endpoints, args, out).await,
        BenchCommand::Receive(args) => receive(endpoints, args, out).await,
        BenchCommand::Health(args) => health(endpoints, args, out).await,
        BenchCommand::Fanout(args) => crate::fanout::fanout(endpoints, args, out).await,
    }
}

async fn ensure_agency(endpoints: &Endpoints, agency_id: &str, region: &str) -> anyhow::Result<()> {
    let registered = endpoints
        .directory_as_operator()?
        .register_agency(pb::RegisterAgencyRequest {
            agency_id: agency_id.to_string(),
            region: region.to_string(),
            display_name: "benchmark".to_string(),
            shard: String::new(),
        })
        .await;
    match registered {
        Ok(_) => {}
        Err(status) if status.code() == tonic::Code::AlreadyExists => {}
        Err(status) => return Err(rpc_error(status, &format!("cannot register {agency_id}"))),
    }
    // On a mesh whose certificates folder holds its development CA (`fedmesh
    // dev --tls`), the benchmark's agencies get certificates of their own.
    if let crate::client::ClientTls::Folder { dir, .. } = &endpoints.tls {
        let identity = fedmesh_common::identity::Identity::Agency(agency_id.to_string());
        let files = fedmesh_common::tls::CertificateFiles::of(dir, &identity);
        if !files.cert.exists() && dir.join(fedmesh_common::tls::CA_KEY).exists() {
            crate::certs::issue(dir, &identity, 30, false)?;
        }
    }
    Ok(())
}

fn progress(total: Option<u64>, duration: Duration) -> indicatif::ProgressBar {
    let bar = match total {
        Some(total) => indicatif::ProgressBar::new(total),
        None => indicatif::ProgressBar::new(duration.as_secs()),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} {msg}")
    {
        bar.set_style(style);
    }
    bar
}

fn millis(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

/// One call of a benchmark, issued again and again by a worker.
type Call = Box<dyn FnMut() -> BoxFuture<'static, Result<(), tonic::Status>> + Send>;

/// What a closed-loop run measured.
struct Measured {
    histogram: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.histogram.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn latency_line(&self) -> String {
        format!(
            "  latency     p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
            millis(&self.histogram, 0.5),
            millis(&self.histogram, 0.99),
            millis(&self.histogram, 0.999),
            self.histogram.max() as f64 / 1000.0
        )
    }

    fn latency_json(&self) -> serde_json::Value {
        json!({
            "p50": millis(&self.histogram, 0.5),
            "p99": millis(&self.histogram, 0.99),
            "p999": millis(&self.histogram, 0.999),
            "max": self.histogram.max() as f64 / 1000.0,
        })
    }

    fn write_errors(&self, out: &mut (dyn std::io::Write + Send)) -> std::io::Result<()> {
        if self.errors > 0 {
            writeln!(
                out,
                "  errors      {} (first: {})",
                self.errors,
                self.first_error.as_deref().unwrap_or_default()
            )?;
        }
        Ok(())
    }
}

/// Runs `load` with one [`Call`] per worker from `call_for(worker)`, with a
/// progress bar; latency is recorded per answered call.
async fn drive(
    load: &LoadArgs,
    mut call_for: impl FnMut(usize) -> Call,
) -> anyhow::Result<Measured> {
    let duration = Duration::from_secs(load.duration);
    let issued = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let bar = progress(load.count, duration);
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..load.concurrency {
        let mut call = call_for(worker);
        let issued = Arc::clone(&issued);
        let completed = Arc::clone(&completed);
        let count = load.count;
        workers.spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            let mut errors = 0_u64;
            let mut first_error = None;
            loop {
                match count {
                    Some(count) if issued.fetch_add(1, Ordering::Relaxed) >= count => break,
                    None if Instant::now() >= deadline => break,
                    _ => {}
                }
                let call_started = Instant::now();
                match call().await {
                    Ok(()) => {
                        let micros =
                            u64::try_from(call_started.elapsed().as_micros()).unwrap_or(u64::MAX);
                        histogram.saturating_record(micros.max(1));
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| {
                            format!("{:?}: {}", status.code(), status.message())
                        });
                    }
                }
            }
            Ok::<_, anyhow::Error>((histogram, errors, first_error))
        });
    }
    let ticker = {
        let bar = bar.clone();
        let completed = Arc::clone(&completed);
        let counted = load.count.is_some();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let done = completed.load(Ordering::Relaxed);
                if counted {
                    bar.set_position(done);
                } else {
                    bar.set_position(started.elapsed().as_secs());
                }
                bar.set_message(format!("{done} answered"));
            }
        })
    };
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let mut errors = 0;
    let mut first_error = None;
    while let Some(worker) = workers.join_next().await {
        let (worker_histogram, worker_errors, worker_error) =
            worker.context("a benchmark worker panicked")??;
        histogram
            .add(&worker_histogram)
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        errors += worker_errors;
        if first_error.is_none() {
            first_error = worker_error;
        }
    }
    let elapsed = started.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    Ok(Measured {
        histogram,
        errors,
        first_error,
        elapsed,
    })
}

/// One lazily connected channel per connection of `load`, on which calls
/// are made as `identity`, and what to attach to them.
fn channels(
    endpoints: &Endpoints,
    url: &str,
    identity: &Identity,
    load: &LoadArgs,
) -> anyhow::Result<(Vec<tonic::transport::Channel>, AttachIdentity)> {
    let mut channels = Vec::new();
    let mut attach = AttachIdentity::none();
    for _ in 0..load.connections {
        let (channel, attached) = endpoints.channel_as(
            url,
            identity,
            fedmesh_common::tls::ExpectedServer::AnyGateway,
        )?;
        channels.push(channel);
        attach = attached;
    }
    Ok((channels, attach))
}

fn write_json(path: &std::path::Path, result: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(result)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

async fn send(
    endpoints: &Endpoints,
    args: BenchSendArgs,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    args.load.check()?;
    let recipient_region = args
        .recipient_region
        .clone()
        .unwrap_or_else(|| args.region.clone());
    ensure_agency(endpoints, &args.sender, &args.region).await?;
    ensure_agency(endpoints, &args.recipient, &recipient_region).await?;
    let url = endpoints.gateway_url_for(&args.sender).await?;
    let (channels, identity) = channels(
        endpoints,
        &url,
        &Identity::Agency(args.sender.clone()),
        &args.load,
    )?;
    let clients: Vec<_> = channels
        .into_iter()
        .map(|channel| {
            pb::exchange_client::ExchangeClient::with_interceptor(channel, identity.clone())
        })
        .collect();
    let request = pb::SendRequest {
        sender_id: args.sender.clone(),
        recipient_id: args.recipient.clone(),
        kind: "bench.message".to_string(),
        payload: vec![b'x'; args.size],
        headers: Default::default(),
        idempotency_key: None,
    };
    // Every message has an idempotency key, as a careful client's have (the
    // CLI's: a UUIDv7), and a send that meets UNAVAILABLE or loses its
    // answer is retried with it, so a retry never stores twice.
    let (keys, attempts) = if args.no_keys {
        (false, 1)
    } else {
        (true, SEND_ATTEMPTS)
    };
    let measured = drive(&args.load, |worker| {
        let client = clients[worker % clients.len()].clone();
        let request = request.clone();
        Box::new(move || {
            let client = client.clone();
            let mut request = request.clone();
            if keys {
                request.idempotency_key = Some(crate::commands::new_idempotency_key());
            }
            Box::pin(async move {
                with_retries(
                    attempts,
                    || {
                        let mut client = client.clone();
                        let request = request.clone();
                        async move { client.send(request).await }
                    },
                    |_, _| {},
                )
                .await
                .map(|_| ())
            })
        })
    })
    .await?;

    let sent = measured.histogram.len();
    let rate = measured.rate();
    writeln!(
        out,
        "bench send: {sent} messages of {} bytes to {} ({}), concurrency {}, {} connections, {:.1} s",
        args.size,
        args.recipient,
        recipient_region,
        args.load.concurrency,
        args.load.connections,
        measured.elapsed.as_secs_f64()
    )?;
    writeln!(out, "  throughput  {rate:.0} messages/s")?;
    writeln!(out, "{}", measured.latency_line())?;
    measured.write_errors(out)?;
    if let Some(path) = &args.load.json_out {
        write_json(
            path,
            &json!({
                "benchmark": "send",
                "gateway": url,
                "messages": sent,
                "errors": measured.errors,
                "payload_bytes": args.size,
                "concurrency": args.load.concurrency,
                "connections": args.load.connections,
                "elapsed_seconds": measured.elapsed.as_secs_f64(),
                "messages_per_second": rate,
                "latency_ms": measured.latency_json(),
            }),
        )?;
    }
    Ok(())
}

async fn health(
    endpoints: &Endpoints,
    args: BenchHealthArgs,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    args.load.check()?;
    let url = endpoints.gateway_url_for(&args.agency).await?;
    let (channels, _) = channels(
        endpoints,
        &url,
        &Identity::Agency(args.agency.clone()),
        &args.load,
    )?;
    let clients: Vec<_> = channels
        .into_iter()
        .map(tonic_health::pb::health_client::HealthClient::new)
        .collect();
    let measured = drive(&args.load, |worker| {
        let client = clients[worker % clients.len()].clone();
        Box::new(move || {
            let mut client = client.clone();
            Box::pin(async move {
                client
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .map(|_| ())
            })
        })
    })
    .await?;
    let calls = measured.histogram.len();
    let rate = measured.rate();
    writeln!(
        out,
        "bench health: {calls} health checks of {url}, concurrency {}, {} connections, {:.1} s",
        args.load.concurrency,
        args.load.connections,
        measured.elapsed.as_secs_f64()
    )?;
    writeln!(out, "  throughput  {rate:.0} calls/s")?;
    writeln!(out, "{}", measured.latency_line())?;
    measured.write_errors(out)?;
    if let Some(path) = &args.load.json_out {
        write_json(
            path,
            &json!({
                "benchmark": "health",
                "target": url,
                "calls": calls,
                "errors": measured.errors,
                "concurrency": args.load.concurrency,
                "connections": args.load.connections,
                "elapsed_seconds": measured.elapsed.as_secs_f64(),
                "calls_per_second": rate,
                "latency_ms": measured.latency_json(),
            }),
        )?;
    }
    Ok(())
}

/// Acknowledges every delivery up to `sequence`.
async fn ack_up_to(
    requests: &tokio::sync::mpsc::Sender<pb::ReceiveRequest>,
    sequence: u64,
) -> anyhow::Result<()> {
    let ack = pb::Ack {
        sequences: vec![],
        up_to: sequence,
    };
    requests
        .send(pb::ReceiveRequest {
            request: Some(pb::receive_request::Request::Ack(ack)),
        })
        .await
        .context("inbox stream closed")
}

async fn receive(
    endpoints: &Endpoints,
    args: BenchReceiveArgs,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    let mut exchange = endpoints.exchange_for(&args.agency).await?;
    let (requests, outbound) = tokio::sync::mpsc::channel(64);
    let open = pb::ReceiveRequest {
        request: Some(pb::receive_request::Request::Open(pb::OpenInbox {
            agency_id: args.agency.clone(),
            window: args.window,
        })),
    };
    requests
        .send(open)
        .await
        .context("cannot open the inbox stream")?;
    let mut responses = exchange
        .receive(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .map_err(|status| rpc_error(status, "cannot open the inbox"))?
        .into_inner();
    let bar = progress(args.count, Duration::ZERO);
    let mut received = 0_u64;
    let mut since_ack = 0_u32;
    let mut started = None;
    let mut last_sequence = 0;
    while let Some(response) = responses
        .message()
        .await
        .map_err(|status| rpc_error(status, "inbox stream failed"))?
    {
        match response.response {
            Some(pb::receive_response::Response::Delivery(delivery)) => {
                started.get_or_insert_with(Instant::now);
                received += 1;
                since_ack += 1;
                last_sequence = delivery.sequence;
                if since_ack >= args.ack_every.max(1) {
                    ack_up_to(&requests, last_sequence).await?;
                    since_ack = 0;
                }
                if received.is_multiple_of(1000) {
                    bar.set_position(received);
                }
                if args.count.is_some_and(|count| received >= count) {
                    break;
                }
            }
            // Idle with nothing unacknowledged: the inbox is drained.
            Some(pb::receive_response::Response::Idle(idle)) if idle.unacknowledged == 0 => break,
            Some(pb::receive_response::Response::Idle(_)) => {
                ack_up_to(&requests, last_sequence).await?;
                since_ack = 0;
            }
            None => {}
        }
    }
    bar.finish_and_clear();
    let _ = ack_up_to(&requests, last_sequence).await;
    drop(requests);
    // The gateway ends the stream once every ack is stored: that is part of
    // the measured time.
    while let Ok(Some(_)) = responses.message().await {}
    let elapsed = started.map_or(Duration::ZERO, |started| started.elapsed());
    let rate = received as f64 / elapsed.as_secs_f64().max(f64::EPSILON);
    writeln!(
        out,
        "bench receive: {received} deliveries to {} in {:.2} s, window {}, ack every {}",
        args.agency,
        elapsed.as_secs_f64(),
        args.window,
        args.ack_every
    )?;
    writeln!(out, "  throughput  {rate:.0} deliveries/s")?;
    if let Some(path) = &args.json_out {
        let result = json!({
            "benchmark": "receive",
            "agency": args.agency,
            "deliveries": received,
            "window": args.window,
            "elapsed_seconds": elapsed.as_secs_f64(),
            "deliveries_per_second": rate,
        });
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
