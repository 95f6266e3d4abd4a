//! Reaching a mesh from the command line: the coordinator, and through it an
//! agency's home gateway and the notifiers; retrying what may be retried.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use fedmesh_common::error::code_name;
use fedmesh_common::identity::{AttachIdentity, Identity};
use fedmesh_common::tls::{
    CertificateFiles, DEFAULT_TRUST_DOMAIN, ExpectedServer, MeshTls, TlsSettings,
};
use fedmesh_proto::pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

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
    /// Operator name the CLI acts as for directory changes and status
    /// (with --certs: the operator whose certificate to use, by default
    /// the folder's only one).
    #[arg(long, global = true, env = "FEDMESH_OPERATOR", default_value = "cli")]
    pub operator: String,
    /// A folder made by `fedmesh certs`: the CLI speaks mutual TLS with the
    /// certificate of the identity it acts as (the agency of --as, else
    /// the operator).
    #[arg(long, global = true, env = "FEDMESH_CERTS", value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// One certificate to use for every call (with --key and --ca),
    /// instead of --certs.
    #[arg(long, global = true, env = "FEDMESH_CERT", value_name = "PEM", requires_all = ["key", "ca"], conflicts_with = "certs")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(
        long,
        global = true,
        env = "FEDMESH_KEY",
        value_name = "PEM",
        requires = "cert"
    )]
    pub key: Option<PathBuf>,
    /// The CA bundle the mesh's certificates chain to.
    #[arg(
        long,
        global = true,
        env = "FEDMESH_CA",
        value_name = "PEM",
        requires = "cert"
    )]
    pub ca: Option<PathBuf>,
    /// The SPIFFE trust domain of the mesh.
    #[arg(long, global = true, env = "FEDMESH_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

/// How the CLI proves who it is.
#[derive(Debug, Clone)]
pub enum ClientTls {
    /// Plaintext with identity headers (the dev mesh).
    Plain,
    /// The certificate of each identity in a `fedmesh certs` folder.
    Folder {
        /// The folder.
        dir: PathBuf,
        /// The trust domain.
        trust_domain: String,
    },
    /// One certificate for every call.
    Files(TlsSettings),
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
            tls: self.tls(),
        }
    }

    fn tls(&self) -> ClientTls {
        if let Some(dir) = &self.certs {
            return ClientTls::Folder {
                dir: dir.clone(),
                trust_domain: self.trust_domain.clone(),
            };
        }
        match (&self.cert, &self.key, &self.ca) {
            (Some(cert), Some(key), Some(ca)) => ClientTls::Files(TlsSettings {
                cert: Some(cert.clone()),
                key: Some(key.clone()),
                ca: Some(ca.clone()),
                trust_domain: self.trust_domain.clone(),
                allow_dev_ca: true,
                ..TlsSettings::default()
            }),
            _ => ClientTls::Plain,
        }
    }
}

/// A client channel that presents an identity.
pub type Authenticated = InterceptedService<Channel, AttachIdentity>;

/// Largest message the CLI decodes: a delivery of a gateway configured with
/// a payload limit far above the default.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Where the mesh is and who the CLI is.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Coordinator URL.
    pub coordinator: String,
    /// Operator name for directory changes and status.
    pub operator: String,
    /// Gateway URL overriding discovery, if given.
    pub gateway: Option<String>,
    /// Notifier URL overriding discovery, if given.
    pub notifier: Option<String>,
    /// How calls prove who makes them.
    pub tls: ClientTls,
}

/// Turns a failed call into one line that says what went wrong, with the
/// status code spelled as gRPC names it.
pub fn rpc_error(status: tonic::Status, what: &str) -> anyhow::Error {
    let code = code_name(status.code());
    let mut text = format!("{what}: {} ({code})", status.message());
    // A transport failure's cause (refused connection, TLS alert, the
    // wrong server) is at the end of the status's source chain.
    let mut cause = std::error::Error::source(&status);
    let mut deepest = None;
    while let Some(error) = cause {
        deepest = Some(error.to_string());
        cause = error.source();
    }
    if let Some(deepest) = deepest
        && !text.contains(&deepest)
    {
        text = format!("{what}: {} ({code}): {deepest}", status.message());
    }
    if is_transport_failure(&status) && status.message().contains("connect") {
        text.push_str("; is the mesh running? start it with `fedmesh dev`");
    }
    anyhow::anyhow!(text)
}

/// Whether the call failed in the network rather than in a server's answer
/// (tonic keeps the transport error as the status's source).
fn is_transport_failure(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some() || status.code() == tonic::Code::Unavailable
}

/// Whether a call that failed with `status` may be made again: the server
/// said UNAVAILABLE, or the answer was lost on the way.
pub fn worth_retrying(status: &tonic::Status) -> bool {
    is_transport_failure(status)
}

/// Makes `call` up to `attempts` times while it fails in a way
/// [`worth_retrying`] accepts, waiting 200 ms and then twice as long each
/// time; `on_retry` hears of each retry. Only calls that are safe to repeat
/// may be retried: a send carries an idempotency key.
pub async fn with_retries<T, Call, Attempt>(
    attempts: u32,
    mut call: Call,
    mut on_retry: impl FnMut(&tonic::Status, u32),
) -> Result<T, tonic::Status>
where
    Call: FnMut() -> Attempt,
    Attempt: Future<Output = Result<T, tonic::Status>>,
{
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match call().await {
            Err(status) if attempt < attempts && worth_retrying(&status) => {
                on_retry(&status, attempt + 1);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

impl Endpoints {
    /// A channel to `url` on which calls are made as `identity`, and what
    /// to attach to them.
    pub fn channel_as(
        &self,
        url: &str,
        identity: &Identity,
        server: ExpectedServer,
    ) -> anyhow::Result<(Channel, AttachIdentity)> {
        let settings = match &self.tls {
            ClientTls::Plain if url.starts_with("https://") => anyhow::bail!(
                "{url} speaks mutual TLS: give --certs DIR (FEDMESH_CERTS), or --cert, --key and --ca"
            ),
            ClientTls::Plain => {
                let channel = fedmesh_common::server::lazy_channel(url)
                    .with_context(|| format!("{url:?} is not a usable URL"))?;
                return Ok((channel, AttachIdentity::new(identity)));
            }
            ClientTls::Folder { dir, trust_domain } => {
                let identity = self.identity_in_folder(dir, identity)?;
                TlsSettings {
                    trust_domain: trust_domain.clone(),
                    ..TlsSettings::from_folder(dir, &identity)
                }
            }
            ClientTls::Files(settings) => settings.clone(),
        };
        let tls = MeshTls::load(&settings, None)?;
        let channel = fedmesh_common::server::lazy_channel_with(url, tls, server)
            .with_context(|| format!("{url:?} is not a usable URL"))?;
        Ok((channel, AttachIdentity::none()))
    }

    /// The identity whose certificate in `dir` to use for `identity`: its
    /// own, or for an operator without one, the folder's only operator.
    fn identity_in_folder(&self, dir: &Path, identity: &Identity) -> anyhow::Result<Identity> {
        let files = CertificateFiles::of(dir, identity);
        if files.cert.exists() {
            return Ok(identity.clone());
        }
        if let Identity::Operator(_) = identity {
            let operators: Vec<String> = std::fs::read_dir(dir.join("operator"))
                .into_iter()
                .flatten()
                .filter_map(|entry| {
                    let name = entry.ok()?.file_name().into_string().ok()?;
                    name.strip_suffix(".crt").map(str::to_string)
                })
                .collect();
            if let [only] = operators.as_slice() {
                return Ok(Identity::Operator(only.clone()));
            }
        }
        anyhow::bail!(
            "{} holds no certificate of {identity}: issue one with `fedmesh certs issue {} {identity}`",
            dir.display(),
            dir.display()
        )
    }

    /// The directory, as `identity`.
    pub fn directory(
        &self,
        identity: &Identity,
    ) -> anyhow::Result<pb::directory_client::DirectoryClient<Authenticated>> {
        let (channel, attach) = self.channel_as(
            &self.coordinator,
            identity,
            ExpectedServer::Is(Identity::Coordinator),
        )?;
        Ok(
            pb::directory_client::DirectoryClient::with_interceptor(channel, attach)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// The directory, as this operator.
    pub fn directory_as_operator(
        &self,
    ) -> anyhow::Result<pb::directory_client::DirectoryClient<Authenticated>> {
        self.directory(&Identity::Operator(self.operator.clone()))
    }

    /// A notifier, as `identity`: `--notifier`, or one the coordinator
    /// knows.
    pub async fn notifications(
        &self,
        identity: &Identity,
    ) -> anyhow::Result<pb::notifications_client::NotificationsClient<Authenticated>> {
        let url = self
            .notifier_urls()
            .await?
            .into_iter()
            .next()
            .context("no notifier is running: the coordinator knows none")?;
        self.notifications_at(&url, identity)
    }

    /// The notifier at `url`, as `identity`.
    pub fn notifications_at(
        &self,
        url: &str,
        identity: &Identity,
    ) -> anyhow::Result<pb::notifications_client::NotificationsClient<Authenticated>> {
        let (channel, attach) =
            self.channel_as(url, identity, ExpectedServer::Is(Identity::Notifier))?;
        Ok(pb::notifications_client::NotificationsClient::with_interceptor(channel, attach))
    }

    /// The URLs of the notifiers, by notifier id (the one given with
    /// `--notifier` alone, if any).
    pub async fn notifier_urls(&self) -> anyhow::Result<Vec<String>> {
        if let Some(url) = &self.notifier {
            return Ok(vec![url.clone()]);
        }
        let mut notifiers = self.topology().await?.notifiers;
        notifiers.sort_by(|a, b| a.notifier_id.cmp(&b.notifier_id));
        Ok(notifiers
            .into_iter()
            .map(|notifier| notifier.address)
            .collect())
    }

    /// The current topology, from the coordinator.
    pub async fn topology(&self) -> anyhow::Result<pb::TopologySnapshot> {
        let mut stream = self
            .directory_as_operator()?
            .watch_topology(pb::WatchTopologyRequest::default())
            .await
            .map_err(|status| rpc_error(status, "cannot read the topology"))?
            .into_inner();
        let first = stream
            .message()
            .await
            .map_err(|status| rpc_error(status, "cannot read the topology"))?
            .context("the coordinator closed the topology stream")?;
        match first.update {
            Some(pb::topology_update::Update::Snapshot(snapshot)) => Ok(snapshot),
            _ => anyhow::bail!("the coordinator did not start the topology with a snapshot"),
        }
    }

    /// The URL of `agency_id`'s home gateway (or the `--gateway` override).
    pub async fn gateway_url_for(&self, agency_id: &str) -> anyhow::Result<String> {
        match &self.gateway {
            Some(url) => Ok(url.clone()),
            None => self.home_gateway(agency_id).await,
        }
    }

    /// The Exchange of `agency_id`'s home gateway, acting as `identity`.
    pub async fn exchange_as(
        &self,
        agency_id: &str,
        identity: &Identity,
    ) -> anyhow::Result<pb::exchange_client::ExchangeClient<Authenticated>> {
        let url = self.gateway_url_for(agency_id).await?;
        let (channel, attach) = self.channel_as(&url, identity, ExpectedServer::AnyGateway)?;
        Ok(
            pb::exchange_client::ExchangeClient::with_interceptor(channel, attach)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// The Exchange of `agency_id`'s home gateway, acting as that agency.
    pub async fn exchange_for(
        &self,
        agency_id: &str,
    ) -> anyhow::Result<pb::exchange_client::ExchangeClient<Authenticated>> {
        self.exchange_as(agency_id, &Identity::Agency(agency_id.to_string()))
            .await
    }

    async fn home_gateway(&self, agency_id: &str) -> anyhow::Result<String> {
        let agency = self
            .directory_as_operator()?
            .get_agency(pb::GetAgencyRequest {
                agency_id: agency_id.to_string(),
            })
            .await
            .map_err(|status| rpc_error(status, &format!("cannot look up agency {agency_id:?}")))?
            .into_inner()
            .agency
            .context("the coordinator answered without the agency")?;
        let topology = self.topology().await?;
        topology
            .gateways
            .into_iter()
            .find(|gateway| gateway.region == agency.region)
            .map(|gateway| gateway.address)
            .with_context(|| {
                format!(
                    "no gateway of region {} is running; agency {agency_id} is homed there",
                    agency.region
                )
            })
    }
}

/// Which notifier a subscribing command uses, and when it gives up: it
/// moves to the next notifier the coordinator lists when its own goes, and
/// gives up after [`Failover::MAX_IN_A_ROW`] losses with nothing received
/// in between.
#[derive(Debug)]
pub struct Failover {
    lost_at: Option<String>,
    in_a_row: u32,
    delay: std::time::Duration,
}

impl Default for Failover {
    fn default() -> Self {
        Failover {
            lost_at: None,
            in_a_row: 0,
            delay: Failover::FIRST_DELAY,
        }
    }
}

impl Failover {
    /// Losses in a row before giving up.
    pub const MAX_IN_A_ROW: u32 = 10;
    const FIRST_DELAY: std::time::Duration = std::time::Duration::from_millis(100);
    const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

    /// The notifier to use: the one listed after the one lost last (the
    /// first if none was lost or it is no longer listed).
    pub fn pick(&self, urls: &[String]) -> anyhow::Result<String> {
        let after_lost = self
            .lost_at
            .as_ref()
            .and_then(|lost| urls.iter().position(|url| url == lost))
            .map_or(0, |lost| (lost + 1) % urls.len().max(1));
        urls.get(after_lost)
            .cloned()
            .context("no notifier is running: the coordinator knows none")
    }

    /// The stream through `url` was lost: how long to wait before the
    /// next, or None to give up.
    pub fn lost(&mut self, url: String) -> Option<std::time::Duration> {
        self.lost_at = Some(url);
        self.in_a_row += 1;
        if self.in_a_row >= Failover::MAX_IN_A_ROW {
            return None;
        }
        let delay = self.delay;
        self.delay = (delay * 2).min(Failover::MAX_DELAY);
        Some(delay)
    }

    /// Something came through: losses count from zero again.
    pub fn received(&mut self) {
        self.in_a_row = 0;
        self.delay = Failover::FIRST_DELAY;
    }
}

#[cfg(test)]
mod failover_tests {
    use super::Failover;

    #[test]
    fn it_moves_round_the_notifiers_and_gives_up_only_after_losses_in_a_row() {
        let urls: Vec<String> = ["a", "b", "c"].iter().map(|url| url.to_string()).collect();
        let mut failover = Failover::default();
        assert_eq!(failover.pick(&urls).expect("a notifier"), "a");
        assert!(failover.lost("a".into()).is_some());
        assert_eq!(failover.pick(&urls).expect("a notifier"), "b");
        assert!(failover.lost("b".into()).is_some());
        assert_eq!(
            failover.pick(&urls).expect("a notifier"),
            "c",
            "a third one is tried"
        );
        assert!(failover.lost("c".into()).is_some());
        assert_eq!(failover.pick(&urls).expect("a notifier"), "a");
        for _ in 0..20 {
            failover.received();
            assert!(
                failover.lost("a".into()).is_some(),
                "losses far apart never give up"
            );
        }
        let gave_up = (0..Failover::MAX_IN_A_ROW).any(|_| failover.lost("a".into()).is_none());
        assert!(gave_up);
        assert!(Failover::default().pick(&[]).is_err());
    }
}
