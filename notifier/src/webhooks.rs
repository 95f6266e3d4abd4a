//! Webhook delivery: every notifier with a bus consumes the queue of each
//! subscription that names a webhook and POSTs its events there, signed as
//! Standard Webhooks does (`fedmesh_common::webhook`).
//!
//! An event leaves the queue only once the endpoint answered 2xx, or once
//! it is kept among the subscription's dead letters after the last attempt;
//! a notifier that stops mid-way leaves it to be delivered again (by itself
//! or another notifier), so a receiver may see an event more than once and
//! deduplicates by `webhook-id`, the event id. Notifiers compete for the
//! events of a throughput subscription; a strict one is delivered one
//! event at a time, in order, by one notifier.
//!
//! Which subscriptions have webhooks is asked of the coordinator every
//! `--webhook-poll-ms`; events published meanwhile wait in the queue.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedmesh_common::config::{ConfigError, check_range};
use fedmesh_common::events::{CLOUDEVENTS_JSON, DurableQueues, Event, Filter, QueueConsumer};
use fedmesh_common::webhook;
use fedmesh_proto::pb;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::durable::DirectoryClient;

/// Webhook attempts, by `outcome` (`delivered`, `failed`).
const WEBHOOK_ATTEMPTS: &str = "fedmesh_webhook_attempts_total";
/// Events kept as dead letters after every attempt failed, by
/// `subscription` (a few: an alert, not a rate).
const DEAD_LETTERS: &str = "fedmesh_webhook_dead_letters_total";

/// How notifiers deliver to webhooks (`[webhooks]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Attempts to deliver an event to a webhook before it becomes a dead
    /// letter of its subscription (`fedmesh subscription dead-letters`).
    #[arg(long, env = "FEDMESH_WEBHOOK_ATTEMPTS", default_value_t = 8)]
    pub webhook_attempts: u32,
    /// Wait after the first failed attempt, in milliseconds; doubled after
    /// each further one, with random jitter of up to half of it.
    #[arg(long, env = "FEDMESH_WEBHOOK_BACKOFF_MS", default_value_t = 1_000)]
    pub webhook_backoff_ms: u64,
    /// Longest wait between two attempts, in milliseconds.
    #[arg(
        long,
        env = "FEDMESH_WEBHOOK_BACKOFF_MAX_MS",
        default_value_t = 300_000
    )]
    pub webhook_backoff_max_ms: u64,
    /// How long an endpoint has to answer an attempt, in milliseconds.
    #[arg(long, env = "FEDMESH_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000)]
    pub webhook_timeout_ms: u64,
    /// How often to ask the coordinator which subscriptions have webhooks,
    /// in milliseconds.
    #[arg(long, env = "FEDMESH_WEBHOOK_POLL_MS", default_value_t = 5_000)]
    pub webhook_poll_ms: u64,
    /// Events of one throughput subscription this notifier delivers at
    /// once (a strict subscription: one).
    #[arg(long, env = "FEDMESH_WEBHOOK_CONCURRENCY", default_value_t = 16)]
    pub webhook_concurrency: u16,
    /// PEM file of CA certificates to trust for webhook endpoints besides
    /// Mozilla's root certificates (e.g. an agency's own PKI).
    #[arg(long, env = "FEDMESH_WEBHOOK_CA", value_name = "PEM")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_ca: Option<PathBuf>,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        fedmesh_common::config::defaults()
    }
}

impl WebhookSettings {
    /// Refuses values out of range; names the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("webhook_attempts", self.webhook_attempts, 1..=100)?;
        check_range("webhook_backoff_ms", self.webhook_backoff_ms, 1..=3_600_000)?;
        check_range(
            "webhook_backoff_max_ms",
            self.webhook_backoff_max_ms,
            self.webhook_backoff_ms..=86_400_000,
        )?;
        check_range("webhook_timeout_ms", self.webhook_timeout_ms, 1..=600_000)?;
        check_range("webhook_poll_ms", self.webhook_poll_ms, 1..=3_600_000)?;
        check_range("webhook_concurrency", self.webhook_concurrency, 1..=1_000)?;
        if let Some(path) = &self.webhook_ca {
            ca_certificates(path).map_err(|why| ConfigError::setting("webhook_ca", why))?;
        }
        Ok(())
    }

    /// The wait after failed attempt `attempt` (1-based): doubled each
    /// time up to the maximum, the second half of it random.
    fn backoff(&self, attempt: u32) -> Duration {
        let doubled = self
            .webhook_backoff_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(32));
        let full = doubled.min(self.webhook_backoff_max_ms);
        Duration::from_millis(full / 2 + fastrand::u64(0..=full / 2))
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What delivering to webhooks takes.
pub(crate) struct Webhooks {
    pub(crate) settings: WebhookSettings,
    pub(crate) directory: DirectoryClient,
    pub(crate) queues: Arc<dyn DurableQueues>,
    pub(crate) shutdown: CancellationToken,
}

/// A subscription with a webhook, as the coordinator lists it.
#[derive(Clone, PartialEq, Eq)]
struct Target {
    subscription: String,
    url: String,
    secret: String,
    strict_order: bool,
    /// What the subscription selects: its queue's bindings may select
    /// more (a wide filter is widened).
    filter: Filter,
}

/// The delivery of one subscription's events, while it runs.
struct Worker {
    target: Target,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Webhooks {
    /// Delivers to the webhooks of the mesh's subscriptions until shutdown.
    pub(crate) async fn run(self) {
        let client = match https_client(&self.settings) {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(%error, "cannot set up TLS for webhooks; this notifier delivers none");
                return;
            }
        };
        let mut workers: HashMap<String, Worker> = HashMap::new();
        let poll = Duration::from_millis(self.settings.webhook_poll_ms);
        loop {
            match self.targets().await {
                Ok(targets) => self.follow(targets, &mut workers, &client),
                Err(status) => {
                    tracing::debug!(code = ?status.code(), message = status.message(), "cannot list subscriptions for webhooks");
                }
            }
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = tokio::time::sleep(poll) => {}
            }
        }
        for worker in workers.into_values() {
            worker.stop.cancel();
            let _ = worker.task.await;
        }
    }

    /// The subscriptions with webhooks.
    async fn targets(&self) -> Result<Vec<Target>, tonic::Status> {
        let mut directory = self.directory.clone();
        let listed = directory
            .list_subscriptions(pb::ListSubscriptionsRequest {})
            .await?
            .into_inner();
        Ok(listed
            .subscriptions
            .into_iter()
            .filter_map(|subscription| {
                let webhook = subscription.webhook.as_ref()?;
                Some(Target {
                    strict_order: subscription.order() != pb::SubscriptionOrder::Throughput,
                    subscription: subscription.name.clone(),
                    url: webhook.url.clone(),
                    secret: webhook.secret.clone(),
                    filter: Filter {
                        regions: subscription.regions.clone(),
                        agencies: subscription.agencies.clone(),
                        kinds: subscription.kinds.clone(),
                    },
                })
            })
            .collect())
    }

    /// Starts delivering to new targets (and again where a delivery
    /// ended), stops delivering to those no longer listed.
    fn follow(
        &self,
        targets: Vec<Target>,
        workers: &mut HashMap<String, Worker>,
        client: &HttpsClient,
    ) {
        let listed: HashMap<String, Target> = targets
            .into_iter()
            .map(|target| (target.subscription.clone(), target))
            .collect();
        workers.retain(|name, worker| {
            let keep = listed.get(name) == Some(&worker.target) && !worker.task.is_finished();
            if !keep {
                worker.stop.cancel();
            }
            keep
        });
        for (name, target) in listed {
            if workers.contains_key(&name) {
                continue;
            }
            let stop = self.shutdown.child_token();
            let delivery = Delivery {
                target: target.clone(),
                settings: self.settings.clone(),
                queues: Arc::clone(&self.queues),
                client: client.clone(),
                stop: stop.clone(),
            };
            tracing::info!(subscription = %name, url = %target.url, "delivering to a webhook");
            // Shown from the start, at 0, so that alerts on them are defined.
            metrics::counter!(DEAD_LETTERS, "subscription" => name.to_string()).increment(0);
            for outcome in ["delivered", "failed"] {
                metrics::counter!(WEBHOOK_ATTEMPTS, "outcome" => outcome).increment(0);
            }
            let task = tokio::spawn(delivery.run());
            workers.insert(name, Worker { target, stop, task });
        }
    }
}

/// The certificates of a PEM file (at least one), or what is wrong with it.
fn ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    fedmesh_common::tls::read_certificates(path).map_err(|error| error.to_string())
}

/// An HTTP/1.1 client for https:// (Mozilla's roots and those of
/// `--webhook-ca`) and plain http://.
fn https_client(settings: &WebhookSettings) -> Result<HttpsClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &settings.webhook_ca {
        for certificate in ca_certificates(path)? {
            roots
                .add(certificate)
                .map_err(|error| format!("{}: {error}", path.display()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| error.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector))
}

/// What became of an event.
enum Outcome {
    /// The endpoint took it.
    Delivered,
    /// Every attempt failed: a dead letter.
    Refused,
    /// The delivery stopped before either: the event stays on the queue.
    Stopped,
}

/// Delivers one subscription's events to its webhook.
struct Delivery {
    target: Target,
    settings: WebhookSettings,
    queues: Arc<dyn DurableQueues>,
    client: HttpsClient,
    stop: CancellationToken,
}

impl Delivery {
    async fn run(self) {
        let name = &self.target.subscription;
        let mut failures = 0u32;
        while !self.stop.is_cancelled() {
            let prefetch = if self.target.strict_order {
                1
            } else {
                self.settings.webhook_concurrency
            };
            match self.queues.consume(name, prefetch).await {
                Ok(consumer) => {
                    failures = 0;
                    if self.deliver_from(consumer, usize::from(prefetch)).await {
                        return;
                    }
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(subscription = %name, %error, "cannot consume the subscription's queue; trying again");
                }
            }
            let wait = Duration::from_millis(250u64 << failures.min(7));
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Delivers what `consumer` hands out, `limit` events at a time; true
    /// once there is nothing more to do (stopped, or the queue is gone),
    /// false to consume again.
    async fn deliver_from(&self, mut consumer: Box<dyn QueueConsumer>, limit: usize) -> bool {
        let name = &self.target.subscription;
        let mut in_flight = FuturesUnordered::new();
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return true,
                next = consumer.next(), if in_flight.len() < limit => match next {
                    None => {
                        tracing::info!(subscription = %name, "the subscription's queue is gone; no more deliveries");
                        return true;
                    }
                    Some(Err(error)) => {
                        tracing::warn!(subscription = %name, %error, "lost the subscription's queue; consuming again");
                        return false;
                    }
                    Some(Ok(queued)) => {
                        let wanted = self.target.filter.matches(&queued.event);
                        in_flight.push(async move {
                            // What the filter does not want is done.
                            let outcome = if wanted {
                                self.deliver(&queued.event).await
                            } else {
                                Outcome::Delivered
                            };
                            (queued, outcome)
                        });
                    }
                },
                Some((queued, outcome)) = in_flight.next() => {
                    let done = match outcome {
                        Outcome::Delivered => true,
                        Outcome::Refused => match self.queues.dead_letter(name, &queued.event).await {
                            Ok(()) => {
                                metrics::counter!(DEAD_LETTERS, "subscription" => name.to_string()).increment(1);
                                tracing::warn!(subscription = %name, event_id = %queued.event.event_id, attempts = self.settings.webhook_attempts, "the webhook refused every attempt; the event is a dead letter");
                                true
                            }
                            Err(error) => {
                                tracing::warn!(subscription = %name, %error, "cannot keep a dead letter; the event stays on the queue");
                                return false;
                            }
                        },
                        Outcome::Stopped => return true,
                    };
                    if done && let Err(error) = consumer.ack(queued.tag).await {
                        tracing::warn!(subscription = %name, %error, "cannot acknowledge a delivered event; it may come again");
                        return false;
                    }
                }
            }
        }
    }

    /// POSTs `event` until the endpoint takes it, the attempts run out, or
    /// the delivery stops.
    async fn deliver(&self, event: &Event) -> Outcome {
        let body = Bytes::from(event.to_cloudevent_json());
        for attempt in 1..=self.settings.webhook_attempts {
            let answer = tokio::select! {
                () = self.stop.cancelled() => return Outcome::Stopped,
                answer = self.post(event, body.clone()) => answer,
            };
            match answer {
                Ok(()) => {
                    metrics::counter!(WEBHOOK_ATTEMPTS, "outcome" => "delivered").increment(1);
                    return Outcome::Delivered;
                }
                Err(why) => {
                    metrics::counter!(WEBHOOK_ATTEMPTS, "outcome" => "failed").increment(1);
                    tracing::info!(subscription = %self.target.subscription, event_id = %event.event_id, attempt, %why, "webhook attempt failed");
                }
            }
            if attempt == self.settings.webhook_attempts {
                break;
            }
            tokio::select! {
                () = self.stop.cancelled() => return Outcome::Stopped,
                () = tokio::time::sleep(self.settings.backoff(attempt)) => {}
            }
        }
        Outcome::Refused
    }

    /// One attempt: Ok on a 2xx answer, else why not.
    async fn post(&self, event: &Event, body: Bytes) -> Result<(), String> {
        let timestamp = fedmesh_common::time::now_micros() / 1_000_000;
        let signature = webhook::signature(&self.target.secret, &event.event_id, timestamp, &body)
            .ok_or("the subscription's secret is not a webhook secret")?;
        let request = http::Request::post(self.target.url.as_str())
            .header(http::header::CONTENT_TYPE, CLOUDEVENTS_JSON)
            .header(http::header::USER_AGENT, "fedmesh-notifier")
            .header(webhook::HEADER_ID, event.event_id.as_str())
            .header(webhook::HEADER_TIMESTAMP, timestamp)
            .header(webhook::HEADER_SIGNATURE, signature)
            .body(Full::new(body))
            .map_err(|error| format!("cannot build the request: {error}"))?;
        let timeout = Duration::from_millis(self.settings.webhook_timeout_ms);
        let response = tokio::time::timeout(timeout, self.client.request(request))
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
            .map_err(|error| format!("request failed: {error}"))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the endpoint answered {status}"))
        }
    }
}
