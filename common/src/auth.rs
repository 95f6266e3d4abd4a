//! The one authorization layer in front of every service of every role.
//!
//! For each call, [`AuthLayer`]:
//!
//! 1. learns who calls: the identity of the verified client certificate of
//!    the connection ([`PeerInfo`], filled when the TLS handshake completes),
//!    or, in dev mode only, the identity header of a loopback peer;
//! 2. refuses an identity or certificate on the deny list ([`DenyList`]);
//! 3. checks the role × method allow-list ([`METHODS`]; default deny);
//! 4. takes a token from the calling agency's bucket ([`RateLimiter`]);
//! 5. puts the [`Identity`] in the request's extensions, where handlers find
//!    it with [`crate::identity::caller`] for their per-call object checks
//!    (sender = caller, an inbox read only by its owner...), and ends a
//!    streaming answer when its caller is revoked meanwhile.
//!
//! Health and reflection answer anyone the transport let in.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;

use crate::audit::AuditRecord;
use crate::config::{ConfigError, check_range};
use crate::error::{ErrorKind, ServiceError, to_status};
use crate::identity::{IDENTITY_HEADER, Identity, IdentityError};
use crate::tls::PeerCertificate;

/// What the server knows of a connection's peer; every request on the
/// connection carries it in its extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// On TLS: what the verified client certificate says, or why it names
    /// no identity.
    pub certificate: Option<Arc<Result<PeerCertificate, IdentityError>>>,
}

/// How a server learns who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authentication {
    /// Mutual TLS: the verified client certificate says; headers are
    /// ignored.
    Tls,
    /// Dev mode: the identity header of a loopback peer says.
    DevHeader,
}

/// The kinds of identity, as the allow-list names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// `agency/<id>`.
    Agency,
    /// `gateway/<region>`.
    Gateway,
    /// `coordinator`.
    Coordinator,
    /// `notifier`.
    Notifier,
    /// `operator/<name>`.
    Operator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [
        Role::Agency,
        Role::Gateway,
        Role::Coordinator,
        Role::Notifier,
        Role::Operator,
    ];

    /// The role of `identity`.
    pub fn of(identity: &Identity) -> Role {
        match identity {
            Identity::Agency(_) => Role::Agency,
            Identity::Gateway(_) => Role::Gateway,
            Identity::Coordinator => Role::Coordinator,
            Identity::Notifier => Role::Notifier,
            Identity::Operator(_) => Role::Operator,
        }
    }
}

use Role::{Agency, Coordinator, Gateway, Notifier, Operator};

/// Who may call each method of the mesh's services (gRPC paths). A method
/// not listed is refused to everyone; what a role may do with the objects
/// of a call (whose inbox, as whom) is checked by the handlers.
pub const METHODS: &[(&str, &[Role])] = &[
    ("/fedmesh.v1.Exchange/Send", &[Agency]),
    ("/fedmesh.v1.Exchange/Receive", &[Agency]),
    ("/fedmesh.v1.Exchange/GetInbox", &[Agency, Operator]),
    ("/fedmesh.v1.Relay/Forward", &[Gateway, Coordinator]),
    ("/fedmesh.v1.Relay/ForwardBatch", &[Gateway, Coordinator]),
    ("/fedmesh.v1.Directory/RegisterAgency", &[Operator]),
    (
        "/fedmesh.v1.Directory/GetAgency",
        &[Agency, Gateway, Notifier, Operator],
    ),
    ("/fedmesh.v1.Directory/ListAgencies", &[Operator]),
    ("/fedmesh.v1.Directory/DeregisterAgency", &[Operator]),
    ("/fedmesh.v1.Directory/WatchTopology", &[Gateway, Operator]),
    ("/fedmesh.v1.Directory/ReportGateway", &[Gateway]),
    ("/fedmesh.v1.Directory/ReportNotifier", &[Notifier]),
    (
        "/fedmesh.v1.Directory/CreateSubscription",
        &[Agency, Operator],
    ),
    (
        "/fedmesh.v1.Directory/GetSubscription",
        &[Agency, Notifier, Operator],
    ),
    (
        "/fedmesh.v1.Directory/ListSubscriptions",
        &[Agency, Notifier, Operator],
    ),
    (
        "/fedmesh.v1.Directory/DeleteSubscription",
        &[Agency, Operator],
    ),
    ("/fedmesh.v1.Directory/ListDeadLetters", &[Agency, Operator]),
    (
        "/fedmesh.v1.Directory/ReplayDeadLetters",
        &[Agency, Operator],
    ),
    ("/fedmesh.v1.Directory/AddRegion", &[Operator]),
    ("/fedmesh.v1.Directory/ListRegions", &[Operator]),
    ("/fedmesh.v1.Directory/RemoveRegion", &[Operator]),
    ("/fedmesh.v1.Directory/AddShard", &[Operator]),
    ("/fedmesh.v1.Directory/ListShards", &[Operator]),
    ("/fedmesh.v1.Directory/DrainShard", &[Operator]),
    ("/fedmesh.v1.Directory/RemoveShard", &[Operator]),
    ("/fedmesh.v1.Directory/GrantAccess", &[Operator]),
    ("/fedmesh.v1.Directory/RevokeAccess", &[Operator]),
    ("/fedmesh.v1.Directory/ListAccess", &[Operator]),
    ("/fedmesh.v1.Directory/ListAudit", &[Operator]),
    ("/fedmesh.v1.Directory/RecordAudit", &[Gateway, Notifier]),
    ("/fedmesh.v1.Directory/MoveAgency", &[Operator]),
    ("/fedmesh.v1.Directory/GetMove", &[Operator]),
    ("/fedmesh.v1.Directory/CancelMove", &[Operator]),
    ("/fedmesh.v1.Directory/ListMoves", &[Operator]),
    ("/fedmesh.v1.Moves/TransferAgency", &[Coordinator]),
    ("/fedmesh.v1.Moves/ImportAgency", &[Gateway]),
    ("/fedmesh.v1.Moves/ReleaseAgency", &[Coordinator]),
    ("/fedmesh.v1.Notifications/Subscribe", &[Agency, Operator]),
    ("/fedmesh.v1.Notifications/Consume", &[Agency, Operator]),
];

/// Services that answer anyone the transport admitted: health checks and
/// server reflection (the public schema).
const PUBLIC_SERVICES: &[&str] = &["/grpc.health.v1.Health/", "/grpc.reflection.v1."];

/// Whether `role` may call the method at `path`: Some(true) or Some(false)
/// for a method of the mesh, None for one no one may call (not listed).
pub fn allowed(role: Role, path: &str) -> Option<bool> {
    METHODS
        .iter()
        .find(|(method, _)| *method == path)
        .map(|(_, roles)| roles.contains(&role))
}

fn is_public(path: &str) -> bool {
    PUBLIC_SERVICES
        .iter()
        .any(|service| path.starts_with(service))
}

/// Why a call was refused before it reached its handler.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The caller could not be identified.
    #[error(transparent)]
    Unauthenticated(#[from] IdentityError),
    /// The caller's role may not call the method.
    #[error("{identity} may not call {method}")]
    NotAllowed {
        /// Who called.
        identity: String,
        /// The gRPC path.
        method: String,
    },
    /// The caller is over its rate limit.
    #[error(
        "{identity} is over its rate limit of {rate} calls per second (bursts of {burst}); retry in {} ms",
        retry_after.as_millis()
    )]
    RateLimited {
        /// Who called.
        identity: String,
        /// Calls per second.
        rate: u32,
        /// Largest burst.
        burst: u32,
        /// When one call is allowed again.
        retry_after: Duration,
    },
}

impl ServiceError for Refusal {
    fn kind(&self) -> ErrorKind {
        match self {
            Refusal::Unauthenticated(_) => ErrorKind::Unauthenticated,
            Refusal::NotAllowed { .. } => ErrorKind::PermissionDenied,
            Refusal::RateLimited { .. } => ErrorKind::ResourceExhausted,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Refusal::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// Per-agency rate limits: settings every role has, under `[rate_limits]`
/// in its config file.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Calls per second each agency may make to this component (token
    /// bucket; 0: no limit). Over it a call is refused with
    /// RESOURCE_EXHAUSTED saying when to retry.
    #[arg(long, env = "FEDMESH_RATE_LIMIT", default_value_t = 10_000)]
    pub rate_limit: u32,
    /// Most calls an agency may make at once after being idle (the
    /// bucket's size) [default: twice the rate].
    #[arg(long, env = "FEDMESH_RATE_BURST")]
    pub rate_burst: Option<u32>,
    /// A rate for one agency, AGENCY=CALLS_PER_SECOND (0: no limit);
    /// repeatable (environment: separated by `;`; config file: a table
    /// `[rate_limits.agencies] tax-office = 500`).
    #[arg(
        long = "rate-limit-for",
        value_name = "AGENCY=RATE",
        env = "FEDMESH_RATE_LIMIT_FOR",
        value_delimiter = ';',
        value_parser = parse_agency_rate
    )]
    #[serde(default, with = "agency_table")]
    pub agencies: Vec<(String, u32)>,
}

/// Per-agency rates as a config file lists them: a table of agency = rate.
mod agency_table {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(
        rates: &[(String, u32)],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        rates
            .iter()
            .map(|(agency, rate)| (agency.as_str(), *rate))
            .collect::<BTreeMap<_, _>>()
            .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<(String, u32)>, D::Error> {
        Ok(BTreeMap::<String, u32>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

fn parse_agency_rate(text: &str) -> Result<(String, u32), String> {
    let invalid = || format!("{text:?} is not AGENCY=CALLS_PER_SECOND, e.g. tax-office=500");
    let (agency, rate) = text.split_once('=').ok_or_else(invalid)?;
    crate::validate::agency_id("agency", agency).map_err(|error| error.to_string())?;
    let rate = rate.trim().parse().map_err(|_| invalid())?;
    Ok((agency.to_string(), rate))
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        crate::config::defaults()
    }
}

impl RateLimitSettings {
    /// No limit at all (the dev mesh).
    pub fn unlimited() -> Self {
        RateLimitSettings {
            rate_limit: 0,
            rate_burst: None,
            agencies: Vec::new(),
        }
    }

    /// Refuses values that cannot be used.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("rate_limit", self.rate_limit, 0..=10_000_000)?;
        if let Some(burst) = self.rate_burst {
            check_range("rate_burst", burst, 1..=100_000_000)?;
        }
        for (agency, rate) in &self.agencies {
            if crate::validate::agency_id("agency", agency).is_err() {
                return Err(ConfigError::setting(
                    "agencies",
                    format!("{agency:?} is not an agency id"),
                ));
            }
            check_range("agencies", *rate, 0..=10_000_000)?;
        }
        Ok(())
    }
}

/// Token buckets of the agencies calling one component.
#[derive(Debug)]
pub struct RateLimiter {
    settings: RateLimitSettings,
    buckets: Mutex<Buckets>,
}

/// The buckets of the agencies that called lately.
#[derive(Debug, Default)]
struct Buckets {
    by_agency: HashMap<String, Bucket>,
    swept_at: Option<Instant>,
}

/// How often buckets that filled up again are dropped: a full bucket says
/// nothing a new one would not, and without this every agency that ever
/// called would keep one.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// Buckets by `settings`.
    pub fn new(settings: RateLimitSettings) -> Self {
        RateLimiter {
            settings,
            buckets: Mutex::new(Buckets::default()),
        }
    }

    fn rate_of(&self, agency: &str) -> u32 {
        self.settings
            .agencies
            .iter()
            .find(|(id, _)| id == agency)
            .map_or(self.settings.rate_limit, |(_, rate)| *rate)
    }

    fn burst_of(&self, rate: u32) -> u32 {
        self.settings.rate_burst.unwrap_or(rate.saturating_mul(2))
    }

    /// Drops the buckets that have filled up again by `now`.
    fn sweep(&self, buckets: &mut Buckets, now: Instant) {
        if buckets
            .swept_at
            .is_some_and(|swept_at| now.saturating_duration_since(swept_at) < SWEEP_EVERY)
        {
            return;
        }
        buckets.swept_at = Some(now);
        buckets.by_agency.retain(|agency, bucket| {
            let rate = self.rate_of(agency);
            let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
            rate > 0 && bucket.tokens + elapsed * f64::from(rate) < f64::from(self.burst_of(rate))
        });
    }

    /// Agencies with a bucket now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        match self.buckets.lock() {
            Ok(buckets) => buckets.by_agency.len(),
            Err(poisoned) => poisoned.into_inner().by_agency.len(),
        }
    }

    /// Takes one call from `agency`'s bucket, or says when one is allowed.
    pub fn take(&self, agency: &str, now: Instant) -> Result<(), Refusal> {
        let rate = self.rate_of(agency);
        if rate == 0 {
            return Ok(());
        }
        let burst = self.burst_of(rate);
        let mut buckets = match self.buckets.lock() {
            Ok(buckets) => buckets,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.sweep(&mut buckets, now);
        let bucket = buckets
            .by_agency
            .entry(agency.to_string())
            .or_insert(Bucket {
                tokens: f64::from(burst),
                at: now,
            });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) / f64::from(rate);
        Err(Refusal::RateLimited {
            identity: format!("agency/{agency}"),
            rate,
            burst,
            retry_after: Duration::from_secs_f64(wait).max(Duration::from_millis(1)),
        })
    }
}

/// Revoked identities and certificate serials, read from a file and read
/// again when it changes.
#[derive(Debug)]
pub struct DenyList {
    path: PathBuf,
    entries: watch::Sender<Arc<HashSet<String>>>,
}

impl DenyList {
    /// Reads the deny list at `path`.
    pub fn load(path: PathBuf) -> Result<Arc<DenyList>, ConfigError> {
        let entries = read_deny_list(&path).map_err(|problem| {
            ConfigError::setting("deny_list", format!("{}: {problem}", path.display()))
        })?;
        let (sender, _) = watch::channel(Arc::new(entries));
        Ok(Arc::new(DenyList {
            path,
            entries: sender,
        }))
    }

    /// Whether `identity` or the certificate `serial` is revoked.
    pub fn denies(&self, identity: &Identity, serial: Option<&str>) -> bool {
        is_denied(&self.entries.borrow(), identity, serial)
    }

    /// Reads the file again; whether it changed.
    pub fn reload(&self) -> bool {
        match read_deny_list(&self.path) {
            Ok(entries) => self.entries.send_if_modified(|current| {
                if **current == entries {
                    return false;
                }
                tracing::info!(entries = entries.len(), path = %self.path.display(), "deny list reloaded");
                *current = Arc::new(entries);
                true
            }),
            Err(problem) => {
                tracing::warn!(path = %self.path.display(), %problem, "the deny list cannot be read; keeping the previous one");
                false
            }
        }
    }

    /// Reads the file every `period` until `shutdown`.
    pub fn watch(self: &Arc<Self>, period: Duration, shutdown: CancellationToken) {
        let list = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticks.tick() => {
                        list.reload();
                    }
                }
            }
        });
    }

    fn subscribe(&self) -> watch::Receiver<Arc<HashSet<String>>> {
        self.entries.subscribe()
    }
}

fn is_denied(entries: &HashSet<String>, identity: &Identity, serial: Option<&str>) -> bool {
    entries.contains(&identity.to_string()) || serial.is_some_and(|serial| entries.contains(serial))
}

fn read_deny_list(path: &std::path::Path) -> Result<HashSet<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|error| error.to_string())?;
    let mut entries = HashSet::new();
    for (number, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        let is_serial = entry.bytes().all(|byte| byte.is_ascii_hexdigit());
        if is_serial {
            // As `serial_hex` prints serials: no leading zero bytes.
            let mut serial = entry.to_ascii_lowercase();
            while serial.len() > 2 && serial.starts_with("00") {
                serial.drain(..2);
            }
            entries.insert(serial);
            continue;
        }
        if Identity::parse(entry).is_none() {
            return Err(format!(
                "line {}: {entry:?} is neither an identity (agency/<id>...) nor a certificate serial (hex)",
                number + 1
            ));
        }
        entries.insert(entry.to_ascii_lowercase());
    }
    Ok(entries)
}

/// Where a component records what it refused or did, without waiting.
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// Records `record` (a failure is logged by the sink).
    fn record(&self, record: AuditRecord);
}

/// The audit sink of a component, set once its log is reachable (the
/// coordinator's store, or the coordinator for the others).
pub type AuditSlot = Arc<std::sync::OnceLock<Arc<dyn AuditSink>>>;

/// Records `record` in the slot's sink, if one is set.
pub fn audit_to(slot: &AuditSlot, record: AuditRecord) {
    if let Some(sink) = slot.get() {
        sink.record(record);
    }
}

/// What the layer needs: how callers are identified, the deny list, the
/// rate limits, and where refusals are recorded.
#[derive(Clone)]
pub struct Guard {
    authentication: Authentication,
    deny_list: Option<Arc<DenyList>>,
    limiter: Arc<RateLimiter>,
    audit: AuditSlot,
    chain: String,
    /// Denied calls recorded per actor.
    denials: Arc<RateLimiter>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Guard")
            .field("authentication", &self.authentication)
            .field("deny_list", &self.deny_list)
            .field("chain", &self.chain)
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// A guard identifying callers by `authentication`.
    pub fn new(
        authentication: Authentication,
        deny_list: Option<Arc<DenyList>>,
        limits: RateLimitSettings,
    ) -> Self {
        Guard {
            authentication,
            deny_list,
            limiter: Arc::new(RateLimiter::new(limits)),
            audit: AuditSlot::default(),
            chain: crate::audit::GLOBAL_CHAIN.to_string(),
            denials: Arc::new(RateLimiter::new(RateLimitSettings {
                rate_limit: 5,
                rate_burst: Some(50),
                agencies: Vec::new(),
            })),
        }
    }

    /// The deny list, if one is configured.
    pub fn deny_list(&self) -> Option<&Arc<DenyList>> {
        self.deny_list.as_ref()
    }

    /// Records refusals in `audit`'s sink, in `chain`.
    pub fn auditing(mut self, audit: AuditSlot, chain: String) -> Self {
        self.audit = audit;
        self.chain = chain;
        self
    }

    /// Records a denied call.
    fn record_denial(
        &self,
        actor: Option<&Identity>,
        method: &str,
        code: tonic::Code,
        reason: &str,
    ) {
        let actor = actor.map_or_else(|| "unknown".to_string(), ToString::to_string);
        // A caller repeating refused calls does not flood the log: at most
        // a burst, then a few rows a second per actor (the rest are logged).
        if self.denials.take(&actor, Instant::now()).is_err() {
            tracing::debug!(%actor, method, "denied call not recorded: too many from this caller");
            return;
        }
        audit_to(
            &self.audit,
            AuditRecord {
                chain: self.chain.clone(),
                actor,
                action: "denied".into(),
                target: crate::audit::bounded(method.trim_start_matches('/'), 256),
                outcome: crate::error::code_name(code).into(),
                detail: crate::audit::bounded(reason, 1024),
            },
        );
    }

    /// The identity of the caller of `request`, and its certificate's
    /// serial on TLS.
    fn identify<B>(
        &self,
        request: &http::Request<B>,
    ) -> Result<(Identity, Option<String>), IdentityError> {
        let peer = request.extensions().get::<PeerInfo>();
        match self.authentication {
            Authentication::Tls => {
                let certificate = peer
                    .and_then(|peer| peer.certificate.as_deref())
                    .ok_or(IdentityError::NoCertificate)?;
                let certificate = certificate.as_ref().map_err(Clone::clone)?;
                // A connection outlives nothing: a certificate that expired
                // since its handshake proves nothing any more.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| {
                        i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
                    });
                if certificate.not_after < now {
                    return Err(IdentityError::Expired(certificate.identity.to_string()));
                }
                Ok((
                    certificate.identity.clone(),
                    Some(certificate.serial.clone()),
                ))
            }
            Authentication::DevHeader => {
                let from_loopback = peer
                    .and_then(|peer| peer.remote)
                    .is_some_and(|address| address.ip().is_loopback());
                if !from_loopback {
                    return Err(IdentityError::NotLoopback);
                }
                let header = request
                    .headers()
                    .get(IDENTITY_HEADER)
                    .ok_or(IdentityError::Missing)?;
                let text = header.to_str().map_err(|_| {
                    IdentityError::Malformed(String::from_utf8_lossy(header.as_bytes()).into())
                })?;
                let identity =
                    Identity::parse(text).ok_or_else(|| IdentityError::Malformed(text.into()))?;
                Ok((identity, None))
            }
        }
    }

    /// Admits the call to `path` or says why not.
    fn admit<B>(
        &self,
        request: &http::Request<B>,
        path: &str,
    ) -> Result<(Identity, Option<String>), Refusal> {
        let (identity, serial) = self.identify(request)?;
        if let Some(deny_list) = &self.deny_list
            && deny_list.denies(&identity, serial.as_deref())
        {
            return Err(IdentityError::Revoked(identity.to_string()).into());
        }
        if allowed(Role::of(&identity), path) != Some(true) {
            return Err(Refusal::NotAllowed {
                identity: identity.to_string(),
                method: path.trim_start_matches('/').to_string(),
            });
        }
        if let Identity::Agency(agency) = &identity {
            self.limiter.take(agency, Instant::now())?;
        }
        Ok((identity, serial))
    }
}

/// The tower layer applying a [`Guard`] to every call of a server.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    guard: Guard,
}

impl AuthLayer {
    /// A layer applying `guard`.
    pub fn new(guard: Guard) -> Self {
        AuthLayer { guard }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            guard: self.guard.clone(),
        }
    }
}

/// A service behind [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    guard: Guard,
}

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The service that was polled ready serves this call; a clone takes
        // its place for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path().to_string();
        let admitted = self.guard.admit(&request, &path);
        let (identity, serial) = match admitted {
            Ok(admitted) => admitted,
            Err(_) if is_public(&path) => {
                return Box::pin(inner.call(request));
            }
            Err(refusal) => {
                let peer = request
                    .extensions()
                    .get::<PeerInfo>()
                    .and_then(|peer| peer.remote);
                tracing::info!(method = %path, peer = ?peer, reason = %refusal, "call refused");
                let status = to_status(&refusal);
                if !matches!(refusal, Refusal::RateLimited { .. }) {
                    let actor = self
                        .guard
                        .identify(&request)
                        .ok()
                        .map(|(identity, _)| identity);
                    self.guard.record_denial(
                        actor.as_ref(),
                        &path,
                        status.code(),
                        &refusal.to_string(),
                    );
                }
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        request.extensions_mut().insert(identity.clone());
        let revocations = self.guard.deny_list.as_ref().map(|list| list.subscribe());
        let guard = self.guard.clone();
        Box::pin(async move {
            let response = inner.call(request).await?;
            // A handler's refusal of the call's objects (sending as
            // another agency, without a grant) is recorded too.
            if let Some(status) = tonic::Status::from_header_map(response.headers())
                && status.code() == tonic::Code::PermissionDenied
            {
                guard.record_denial(Some(&identity), &path, status.code(), status.message());
            }
            let Some(revocations) = revocations else {
                return Ok(response);
            };
            Ok(response.map(|body| {
                Body::new(Revocable {
                    inner: body,
                    revoked: Box::pin(revoked(revocations, identity, serial)),
                    ended: false,
                })
            }))
        })
    }
}

/// Resolves once `identity` (or its certificate) is on the deny list.
async fn revoked(
    mut entries: watch::Receiver<Arc<HashSet<String>>>,
    identity: Identity,
    serial: Option<String>,
) -> Identity {
    loop {
        // Checked before waiting too: the list may have changed between the
        // call's admission and this subscription.
        if is_denied(&entries.borrow_and_update(), &identity, serial.as_deref()) {
            return identity;
        }
        if entries.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// An answer that ends with UNAUTHENTICATED when its caller is revoked
/// while it streams.
struct Revocable {
    inner: Body,
    revoked: Pin<Box<dyn Future<Output = Identity> + Send>>,
    ended: bool,
}

impl http_body::Body for Revocable {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(identity) = self.revoked.as_mut().poll(context) {
            self.ended = true;
            tracing::info!(%identity, "ending a stream of a revoked caller");
            let status = to_status(&Refusal::from(IdentityError::Revoked(identity.to_string())));
            let mut trailers = http::HeaderMap::new();
            return match status.add_header(&mut trailers) {
                Ok(()) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                Err(status) => Poll::Ready(Some(Err(status))),
            };
        }
        Pin::new(&mut self.inner).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_and_says_when_to_retry() {
        let limiter = RateLimiter::new(RateLimitSettings {
            rate_limit: 10,
            rate_burst: Some(2),
            agencies: vec![("open-data".into(), 0)],
        });
        let start = Instant::now();
        assert!(limiter.take("tax-office", start).is_ok());
        assert!(limiter.take("tax-office", start).is_ok());
        let Err(Refusal::RateLimited { retry_after, .. }) = limiter.take("tax-office", start)
        else {
            panic!("a third call in a burst of 2 is refused");
        };
        assert!(retry_after <= Duration::from_millis(100) && !retry_after.is_zero());
        assert!(
            limiter.take("land-registry", start).is_ok(),
            "buckets are per agency"
        );
        assert!(limiter.take("tax-office", start + retry_after).is_ok());
        for _ in 0..1000 {
            assert!(limiter.take("open-data", start).is_ok(), "0 is no limit");
        }
    }

    #[test]
    fn buckets_that_filled_up_again_are_dropped() {
        let limiter = RateLimiter::new(RateLimitSettings {
            rate_limit: 10,
            rate_burst: Some(2),
            agencies: vec![],
        });
        let start = Instant::now();
        for index in 0..100 {
            assert!(limiter.take(&format!("agency-{index}"), start).is_ok());
        }
        assert!(limiter.take("busy", start).is_ok());
        assert!(limiter.take("busy", start).is_ok());
        assert_eq!(limiter.tracked(), 101);
        // A minute on, every bucket is full again but the busy one, which
        // has just been drained.
        let later = start + SWEEP_EVERY;
        assert!(limiter.take("busy", later).is_ok());
        assert!(limiter.take("busy", later).is_ok());
        assert!(limiter.take("busy", later).is_err(), "its bucket is empty");
        let after = later + SWEEP_EVERY;
        assert!(limiter.take("newcomer", after).is_ok());
        assert_eq!(limiter.tracked(), 1, "only the newcomer's bucket is left");
        assert!(limiter.take("busy", after).is_ok(), "a full bucket again");
    }

    #[derive(Debug, Default)]
    struct Collect(Mutex<Vec<AuditRecord>>);

    impl AuditSink for Collect {
        fn record(&self, record: AuditRecord) {
            if let Ok(mut records) = self.0.lock() {
                records.push(record);
            }
        }
    }

    #[test]
    fn a_caller_repeating_refused_calls_does_not_flood_the_audit_log() {
        let sink = Arc::new(Collect::default());
        let slot = AuditSlot::default();
        assert!(slot.set(sink.clone()).is_ok());
        let guard = Guard::new(Authentication::Tls, None, RateLimitSettings::unlimited())
            .auditing(slot, "east".into());
        let pest = Identity::Agency("pest".into());
        let huge = "x".repeat(100_000);
        for _ in 0..1000 {
            guard.record_denial(Some(&pest), &huge, tonic::Code::PermissionDenied, &huge);
        }
        guard.record_denial(
            None,
            "/fedmesh.v1.Exchange/Send",
            tonic::Code::Unauthenticated,
            "no SAN",
        );
        let records = sink.0.lock().expect("records");
        let from_pest = records
            .iter()
            .filter(|record| record.actor == "agency/pest")
            .count();
        assert!(
            (1..=60).contains(&from_pest),
            "{from_pest} rows from one caller"
        );
        assert!(
            records
                .iter()
                .all(|record| record.detail.len() <= 1100 && record.target.len() <= 300)
        );
        assert!(
            records.iter().any(|record| record.actor == "unknown"),
            "another caller is still recorded"
        );
    }

    #[test]
    fn deny_lists_name_identities_and_serials() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let path = folder.path().join("deny");
        std::fs::write(
            &path,
            "# revoked\nagency/tax-office\n  000A1b # a lost laptop\n\n",
        )
        .expect("write");
        let list = DenyList::load(path.clone()).expect("a deny list");
        assert!(list.denies(&Identity::Agency("tax-office".into()), None));
        assert!(list.denies(&Identity::Agency("other".into()), Some("0a1b")));
        assert!(!list.denies(&Identity::Agency("other".into()), Some("0a1c")));
        std::fs::write(&path, "root\n").expect("write");
        assert!(!list.reload(), "a bad file keeps the previous list");
        assert!(list.denies(&Identity::Agency("tax-office".into()), None));
        std::fs::write(&path, "").expect("write");
        assert!(list.reload());
        assert!(!list.denies(&Identity::Agency("tax-office".into()), None));
    }
}
