//! Finding the gateways of a region besides the topology, and the
//! coordinators besides the settings: through DNS, and from a static list
//! in the settings.
//!
//! DNS: the gateways of region `R` under domain `D` are named by the SRV
//! records of `_fedmesh._tcp.gateway.R.D` (each target's addresses with the
//! record's port) or, when that name has no SRV record, by the A/AAAA
//! records of `gateway.R.D` (a headless service) with one configured port;
//! the coordinators likewise by `_fedmesh._tcp.coordinator.D` or the A/AAAA
//! records of `coordinator.D` on [`COORDINATOR_PORT`].
//! Addresses become URLs with the scheme the mesh speaks (`https` on TLS):
//! servers are verified by the identity in their certificate, not by host
//! name, so a URL naming an IP address is as good as one naming a host.
//!
//! Answers are cached for their TTL (at least [`MIN_TTL`], at most
//! [`MAX_TTL`]). A background task per region in use, started by the first
//! request for the region's gateways and ended by the shutdown token, asks
//! again each time the TTL runs out, so only that first request waits for
//! DNS. When a lookup fails the last answer stays in use until its TTL plus a
//! grace period, and the lookup is retried with backoff; an answer that no
//! record name exists is an answer (no gateway), not a failure.
//!
//! This module only finds; in what order the lists are tried is the
//! gateway's routing decision.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The labels before `gateway.<region>.<domain>` in a gateway SRV name.
pub const SRV_SERVICE: &str = "_fedmesh._tcp";
/// The port of coordinators found by A/AAAA records: the one they listen
/// on by default.
pub const COORDINATOR_PORT: u16 = 50051;
/// The service name of the coordinators under the domain.
const COORDINATORS: &str = "coordinator";
/// The shortest time an answer is kept: a TTL of 0 would otherwise have
/// the region's task ask without pause.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest time an answer is kept, whatever its TTL, so that a changed
/// record with a long TTL is still seen within the hour.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// How long an empty answer (the name does not exist, or has no record of
/// the type) is kept when the server gives no negative TTL.
const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// How long the first request for a region waits for its first answer;
/// after it, the other lists are used and the task goes on in the
/// background.
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(5);
/// First and longest pause before a failed lookup is tried again.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Why gateways could not be found through DNS.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoveryError {
    /// The resolver could not be set up (e.g. the system's configuration
    /// cannot be read).
    #[error("cannot set up the DNS resolver: {0}")]
    Resolver(NetError),
    /// A lookup failed (time-out, refused, server failure).
    #[error("DNS lookup of {name} failed: {source}")]
    Lookup {
        /// The name looked up.
        name: String,
        /// What failed.
        source: NetError,
    },
}

// === settings ===

/// One gateway of another region given in the settings: `REGION=URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The region it serves.
    pub region: String,
    /// The URL it is reached at.
    pub url: String,
}

impl FromStr for Peer {
    type Err = String;

    /// `REGION=URL`, as `--peer` takes it.
    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('=') {
            Some((region, url)) if !region.is_empty() && !url.is_empty() => Ok(Peer {
                region: region.trim().to_string(),
                url: url.trim().to_string(),
            }),
            _ => Err(format!(
                "{text:?} is not REGION=URL, e.g. west=https://10.0.0.7:50052"
            )),
        }
    }
}

impl Peer {
    /// Refuses a URL a client cannot connect to: it needs an http or https
    /// scheme and a host.
    pub fn check(&self) -> Result<(), String> {
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|error| format!("{}: {error}", self.url))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            return Err(format!(
                "{} is not an http:// or https:// URL with a host",
                self.url
            ));
        }
        Ok(())
    }
}

/// Peers as a config file lists them: a table of region = URL or
/// region = [URL, ...].
pub mod peer_table {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Peer;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }

    /// The peers as a table of region to its URLs.
    pub fn serialize<S: Serializer>(peers: &[Peer], serializer: S) -> Result<S::Ok, S::Error> {
        let mut table = BTreeMap::<&str, Vec<&str>>::new();
        for peer in peers {
            table.entry(&peer.region).or_default().push(&peer.url);
        }
        table.serialize(serializer)
    }

    /// The peers of a table of region to a URL or a list of URLs.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Peer>, D::Error> {
        let table = BTreeMap::<String, OneOrMany>::deserialize(deserializer)?;
        let mut peers = Vec::new();
        for (region, urls) in table {
            let urls = match urls {
                OneOrMany::One(url) => vec![url],
                OneOrMany::Many(urls) => urls,
            };
            peers.extend(urls.into_iter().map(|url| Peer {
                region: region.clone(),
                url,
            }));
        }
        Ok(peers)
    }
}

/// The DNS server at `text`: an IP address, with a port (53 without);
/// IPv6 with a port as `[::1]:5353`.
pub fn parse_resolver_address(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{text:?} is not an IP address or IP:PORT, e.g. 10.0.0.2:53"))
}

/// Refuses a discovery domain that is not a DNS name (letters, digits and
/// hyphens in dot-separated labels of at most 63 characters; at most 253
/// in all; a final dot is allowed).
pub fn check_domain(text: &str) -> Result<(), String> {
    let name = text.strip_suffix('.').unwrap_or(text);
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{text:?} is not a DNS domain: letters, digits and hyphens in labels separated by dots, e.g. mesh.example.org"
        ));
    }
    Ok(())
}

/// Refuses DNS discovery settings that cannot be used (`discovery_domain`,
/// `discovery_resolver`); names the setting.
pub fn check_dns_settings(
    domain: Option<&str>,
    resolver: Option<&str>,
) -> Result<(), crate::config::ConfigError> {
    use crate::config::ConfigError;
    if let Some(domain) = domain {
        check_domain(domain)
            .map_err(|problem| ConfigError::setting("discovery_domain", problem))?;
    }
    if let Some(resolver) = resolver {
        parse_resolver_address(resolver)
            .map_err(|problem| ConfigError::setting("discovery_resolver", problem))?;
        if domain.is_none() {
            return Err(ConfigError::setting(
                "discovery_resolver",
                "a resolver is asked only for a discovery domain: give --discovery-domain too",
            ));
        }
    }
    Ok(())
}

/// What to discover with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryOptions {
    /// The domain the regions' gateways are published under; None: no DNS.
    pub domain: Option<String>,
    /// The DNS server to ask; None: the system's resolver configuration.
    pub resolver: Option<SocketAddr>,
    /// The port of gateways found by A/AAAA records.
    pub port: u16,
    /// How long an answer is still used after its TTL while lookups fail.
    pub grace: Duration,
    /// `https` on TLS, else `http`.
    pub scheme: &'static str,
    /// Gateways given in the settings.
    pub peers: Vec<Peer>,
}

// === discovery ===

/// The gateways of one region found outside the topology.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionEndpoints {
    /// From DNS, as last answered (empty without DNS or when the answer
    /// is too old).
    pub dns: Arc<[String]>,
    /// From the settings.
    pub configured: Arc<[String]>,
}

/// Finds the gateways of regions; cheap to clone.
#[derive(Clone, Default)]
pub struct Discovery {
    dns: Option<Arc<DnsDiscovery<HickoryLookup>>>,
    peers: Arc<HashMap<String, Arc<[String]>>>,
}

impl fmt::Debug for Discovery {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Discovery")
            .field("dns", &self.dns.is_some())
            .field("peers", &self.peers)
            .finish()
    }
}

impl Discovery {
    /// Discovery as `options` say; the regions' DNS tasks end when
    /// `shutdown` is cancelled. Without a domain, no resolver is set up.
    pub fn new(
        options: DiscoveryOptions,
        shutdown: CancellationToken,
    ) -> Result<Self, DiscoveryError> {
        let mut peers = BTreeMap::<String, Vec<String>>::new();
        for peer in options.peers {
            let urls = peers.entry(peer.region).or_default();
            if !urls.contains(&peer.url) {
                urls.push(peer.url);
            }
        }
        let peers = peers
            .into_iter()
            .map(|(region, urls)| (region, Arc::from(urls)))
            .collect();
        let dns = match options.domain {
            Some(domain) => {
                let lookup = HickoryLookup {
                    resolver: build_resolver(options.resolver)?,
                    domain: fully_qualified(&domain),
                    port: options.port,
                    scheme: options.scheme,
                };
                Some(Arc::new(DnsDiscovery::new(lookup, options.grace, shutdown)))
            }
            None => None,
        };
        Ok(Discovery {
            dns,
            peers: Arc::new(peers),
        })
    }

    /// The gateways of `region` from DNS and from the settings. The first
    /// call for a region waits for its first DNS answer (at most a few
    /// seconds); later calls answer from the cache.
    pub async fn endpoints(&self, region: &str) -> RegionEndpoints {
        let dns = match &self.dns {
            Some(dns) => dns.endpoints(&gateways_of(region)).await,
            None => Arc::default(),
        };
        RegionEndpoints {
            dns,
            configured: self.peers.get(region).cloned().unwrap_or_default(),
        }
    }
}

impl Discovery {
    /// The coordinators DNS names, waiting for the first answer (at most a
    /// few seconds); none without DNS.
    pub async fn coordinators(&self) -> Arc<[String]> {
        match &self.dns {
            Some(dns) => dns.endpoints(COORDINATORS).await,
            None => Arc::default(),
        }
    }

    /// The coordinators DNS names as last answered, without waiting (none
    /// before the first answer).
    pub fn coordinators_now(&self) -> Arc<[String]> {
        match &self.dns {
            Some(dns) => dns.answers(COORDINATORS).borrow().usable(Instant::now()),
            None => Arc::default(),
        }
    }
}

/// The service name of the gateways of `region` under the domain.
fn gateways_of(region: &str) -> String {
    format!("gateway.{region}")
}

/// `domain` with its final dot, so that no search domain is tried.
fn fully_qualified(domain: &str) -> String {
    if domain.ends_with('.') {
        domain.to_string()
    } else {
        format!("{domain}.")
    }
}

/// A resolver asking `address`, or the one the system's configuration
/// describes.
fn build_resolver(address: Option<SocketAddr>) -> Result<TokioResolver, DiscoveryError> {
    let builder = match address {
        Some(address) => {
            let mut server = NameServerConfig::udp_and_tcp(address.ip());
            for connection in &mut server.connections {
                connection.port = address.port();
            }
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![server]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio().map_err(DiscoveryError::Resolver)?,
    };
    builder.build().map_err(DiscoveryError::Resolver)
}

/// What one lookup of a region found.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resolved {
    urls: Vec<String>,
    ttl: Duration,
}

/// Looks up the gateways of a region (DNS, or a stand-in in tests).
trait ResolveRegion: Send + Sync + 'static {
    fn resolve(
        &self,
        region: &str,
    ) -> impl Future<Output = Result<Resolved, DiscoveryError>> + Send;
}

/// The last answer for a region, as requests read it.
#[derive(Debug, Clone, Default)]
struct Answer {
    urls: Arc<[String]>,
    /// Until when `urls` may be used: its TTL plus the grace period.
    usable_until: Option<Instant>,
    /// The first lookup finished, well or not.
    settled: bool,
}

impl Answer {
    fn usable(&self, now: Instant) -> Arc<[String]> {
        match self.usable_until {
            Some(until) if now < until => Arc::clone(&self.urls),
            _ => Arc::default(),
        }
    }
}

/// The cached answers of each region in use, each kept fresh by a task.
struct DnsDiscovery<R> {
    resolver: Arc<R>,
    grace: Duration,
    regions: Mutex<HashMap<String, watch::Receiver<Answer>>>,
    shutdown: CancellationToken,
}

impl<R: ResolveRegion> DnsDiscovery<R> {
    fn new(resolver: R, grace: Duration, shutdown: CancellationToken) -> Self {
        DnsDiscovery {
            resolver: Arc::new(resolver),
            grace,
            regions: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    /// The answers for `region`, starting its task on first use.
    fn answers(&self, region: &str) -> watch::Receiver<Answer> {
        let mut regions = self
            .regions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        regions
            .entry(region.to_string())
            .or_insert_with(|| {
                let (sender, receiver) = watch::channel(Answer::default());
                tokio::spawn(follow_region(
                    region.to_string(),
                    Arc::clone(&self.resolver),
                    sender,
                    self.grace,
                    self.shutdown.clone(),
                ));
                receiver
            })
            .clone()
    }

    async fn endpoints(&self, region: &str) -> Arc<[String]> {
        let mut answers = self.answers(region);
        if !answers.borrow().settled {
            // Past the wait (or once the task ended) the other lists serve.
            let _ =
                tokio::time::timeout(FIRST_ANSWER_WAIT, answers.wait_for(|answer| answer.settled))
                    .await;
        }
        answers.borrow().usable(Instant::now())
    }
}

/// Looks `service` up each time its answer's TTL runs out, until `shutdown`;
/// after a failure, keeps the last answer and retries with backoff.
async fn follow_region<R: ResolveRegion>(
    service: String,
    resolver: Arc<R>,
    answers: watch::Sender<Answer>,
    grace: Duration,
    shutdown: CancellationToken,
) {
    let mut retry = RETRY_MIN;
    loop {
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = resolver.resolve(&service) => outcome,
        };
        let now = Instant::now();
        let wait = match outcome {
            Ok(resolved) => {
                let ttl = resolved.ttl.clamp(MIN_TTL, MAX_TTL);
                let urls: Arc<[String]> = Arc::from(resolved.urls);
                if *answers.borrow().urls != *urls || !answers.borrow().settled {
                    tracing::info!(%service, found = ?urls, ttl = ?ttl, "found through DNS");
                }
                answers.send_replace(Answer {
                    urls,
                    usable_until: Some(now + ttl + grace),
                    settled: true,
                });
                retry = RETRY_MIN;
                ttl
            }
            Err(error) => {
                let kept = answers
                    .borrow()
                    .usable_until
                    .is_some_and(|until| now < until);
                tracing::warn!(%service, %error, keeping_last_answer = kept, retry_in = ?retry, "discovery through DNS failed");
                answers.send_modify(|answer| answer.settled = true);
                let wait = retry;
                retry = (retry * 2).min(RETRY_MAX);
                wait
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

// === lookups ===

/// The SRV name of `service` (`gateway.<region>`, `coordinator`) under
/// `domain` (fully qualified).
fn srv_name(service: &str, domain: &str) -> String {
    format!("{SRV_SERVICE}.{service}.{domain}")
}

/// The headless service name of `service` under `domain`.
fn host_name(service: &str, domain: &str) -> String {
    format!("{service}.{domain}")
}

/// One SRV record: a host name and the port a gateway listens on there.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SrvTarget {
    target: String,
    port: u16,
}

/// The URL of a gateway at `ip`:`port`.
fn url(scheme: &str, ip: IpAddr, port: u16) -> String {
    // SocketAddr writes an IPv6 address in brackets, as a URL needs.
    format!("{scheme}://{}", SocketAddr::new(ip, port))
}

/// The URLs of the SRV targets, each with its addresses, in the order
/// given; the same URL once. Priority and weight are not used: the relay
/// spreads its load over every gateway the records name.
fn srv_urls(scheme: &str, targets: &[(SrvTarget, Vec<IpAddr>)]) -> Vec<String> {
    let mut urls = Vec::new();
    for (target, addresses) in targets {
        for ip in addresses {
            let url = url(scheme, *ip, target.port);
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
    }
    urls
}

/// The URLs of the addresses of a headless service, all on `port`.
fn host_urls(scheme: &str, port: u16, addresses: &[IpAddr]) -> Vec<String> {
    srv_urls(
        scheme,
        &[(
            SrvTarget {
                target: String::new(),
                port,
            },
            addresses.to_vec(),
        )],
    )
}

/// The TTL of an empty answer of `error`, or None when `error` is not an
/// answer that the records do not exist.
fn no_records_ttl(error: &NetError) -> Option<Duration> {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(no_records)) => {
            Some(no_records.negative_ttl.map_or(DEFAULT_NEGATIVE_TTL, |ttl| {
                Duration::from_secs(u64::from(ttl))
            }))
        }
        _ => None,
    }
}

/// Lookups through hickory-resolver.
struct HickoryLookup {
    resolver: TokioResolver,
    /// Fully qualified.
    domain: String,
    port: u16,
    scheme: &'static str,
}

impl HickoryLookup {
    /// The SRV records of `name` and their TTL; None (with the negative
    /// TTL) when the name has none.
    async fn srv_targets(
        &self,
        name: &str,
    ) -> Result<(Option<Vec<SrvTarget>>, Duration), DiscoveryError> {
        // The region's task is the cache: the resolver's own would hand back
        // the answer it holds until its TTL, whenever the task asks.
        self.resolver.clear_lookup_cache(name, RecordType::SRV);
        match self.resolver.srv_lookup(name).await {
            Ok(lookup) => {
                let mut ttl = MAX_TTL;
                let mut targets = None;
                for record in lookup.answers() {
                    if let RData::SRV(srv) = &record.data {
                        ttl = ttl.min(Duration::from_secs(u64::from(record.ttl)));
                        let targets = targets.get_or_insert_with(Vec::new);
                        // "." as the target says the service is not offered.
                        if !srv.target.is_root() {
                            targets.push(SrvTarget {
                                target: srv.target.to_ascii(),
                                port: srv.port,
                            });
                        }
                    }
                }
                Ok((targets, ttl))
            }
            Err(error) => match no_records_ttl(&error) {
                Some(ttl) => Ok((None, ttl)),
                None => Err(DiscoveryError::Lookup {
                    name: name.to_string(),
                    source: error,
                }),
            },
        }
    }

    /// The addresses of `name` and their TTL; none (with the negative TTL)
    /// when it has none.
    async fn addresses(&self, name: &str) -> Result<(Vec<IpAddr>, Duration), DiscoveryError> {
        self.resolver.clear_lookup_cache(name, RecordType::A);
        self.resolver.clear_lookup_cache(name, RecordType::AAAA);
        match self.resolver.lookup_ip(name).await {
            Ok(lookup) => {
                let mut ttl = MAX_TTL;
                let mut addresses = Vec::new();
                for record in lookup.as_lookup().answers() {
                    if let Some(ip) = record.data.ip_addr() {
                        ttl = ttl.min(Duration::from_secs(u64::from(record.ttl)));
                        addresses.push(ip);
                    }
                }
                Ok((addresses, ttl))
            }
            Err(error) => match no_records_ttl(&error) {
                Some(ttl) => Ok((Vec::new(), ttl)),
                None => Err(DiscoveryError::Lookup {
                    name: name.to_string(),
                    source: error,
                }),
            },
        }
    }
}

impl ResolveRegion for HickoryLookup {
    async fn resolve(&self, service: &str) -> Result<Resolved, DiscoveryError> {
        let (targets, srv_ttl) = self.srv_targets(&srv_name(service, &self.domain)).await?;
        let Some(targets) = targets else {
            let (addresses, ttl) = self.addresses(&host_name(service, &self.domain)).await?;
            let port = if service == COORDINATORS {
                COORDINATOR_PORT
            } else {
                self.port
            };
            return Ok(Resolved {
                urls: host_urls(self.scheme, port, &addresses),
                // SRV records may appear: asked again as soon as their
                // absence expires too.
                ttl: ttl.min(srv_ttl),
            });
        };
        let mut ttl = srv_ttl;
        let mut found = Vec::with_capacity(targets.len());
        for target in targets {
            let (addresses, target_ttl) = self.addresses(&target.target).await?;
            ttl = ttl.min(target_ttl);
            found.push((target, addresses));
        }
        Ok(Resolved {
            urls: srv_urls(self.scheme, &found),
            ttl,
        })
    }
}

#[cfg(test)]
mod tests;
