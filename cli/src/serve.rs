//! Running the mesh: `fedmesh dev` (every role in one process) and
//! `fedmesh coordinator`, `gateway`, `notifier` (one role per process, as in
//! a deployment). A role's settings are its library's config struct (see
//! `fedmesh_common::config`): each comes from its flag, else its environment
//! variable, else the `--config` file, else its default. `--check-config`
//! validates them and prints them as they take effect, without starting.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgMatches, Args};
use fedmesh_common::amqp::{AmqpPublisher, AmqpQueues, AmqpSource, EventBusSettings};
use fedmesh_common::config::{ConfigError, load, to_toml};
use fedmesh_common::events::{EventBus, EventPublisher};
use fedmesh_common::server::{ConnectionSettings, check_security};
use fedmesh_common::telemetry::Readiness;
use fedmesh_common::tls::TlsSettings;
use fedmesh_coordinator::CoordinatorConfig;
use fedmesh_gateway::GatewayConfig;
use fedmesh_notifier::NotifierConfig;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::dev::{DEFAULT_BASE_PORT, DevMesh, DevOptions};
use crate::signal::{Drain, drain_on_signal, stop_on_signal};

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Port of the coordinator; the east, west and central gateways take the
    /// next three ports and the notifier the one after. 0 takes free ports
    /// (the mesh prints the coordinator's URL to export).
    #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
    pub base_port: u16,
    /// Folder for the SQLite files; agencies and undelivered messages
    /// survive a restart on the same folder.
    #[arg(long, default_value = "./fedmesh-data")]
    pub data_dir: PathBuf,
    /// Keep a shard in another database instead of a SQLite file, e.g.
    /// `--shard west-1=postgres://postgres@127.0.0.1/fedmesh_west_1`;
    /// repeatable. Shards are east-1, west-1 and central-1 (and east-2...
    /// with --shards-per-region).
    #[arg(long = "shard", value_name = "NAME=URL")]
    pub shards: Vec<fedmesh_gateway::ShardConfig>,
    /// Shards of each region (east-1, east-2, ...), all served by the
    /// region's gateway: agencies can then be moved between shards
    /// (`fedmesh agency move ID --shard east-2`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub shards_per_region: u16,
    /// Run every component over mutual TLS, with certificates from
    /// DATA_DIR/certs (a development CA and certificates are made there
    /// when missing); client commands then need --certs DATA_DIR/certs.
    #[arg(long)]
    pub tls: bool,
    /// The event bus: without --amqp, events travel in process.
    #[command(flatten)]
    pub events: EventBusSettings,
    /// Address of the admin HTTP listener: `/metrics` (Prometheus text
    /// format, every component's), `/healthz`, `/readyz` [default:
    /// 127.0.0.1 and the base port + 9; a free port with --base-port 0].
    #[arg(long, value_name = "IP:PORT")]
    pub admin_listen: Option<String>,
}

/// The file and mode flags every role command has besides its settings.
#[derive(Debug, Args)]
pub struct RoleFlags {
    /// TOML file with the settings below: keys as the flags with `_` for
    /// `-`, e.g. `max_batch = 64`; `[connections]` for the connection
    /// settings. Flags and environment variables win over it; unknown keys
    /// are errors.
    #[arg(long, env = "FEDMESH_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Check the settings and print them as they take effect (passwords
    /// hidden), then exit without starting.
    #[arg(long)]
    pub check_config: bool,
}

/// `fedmesh coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub flags: RoleFlags,
    #[command(flatten)]
    pub settings: CoordinatorConfig,
}

/// `fedmesh gateway`.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub flags: RoleFlags,
    #[command(flatten)]
    pub settings: GatewayConfig,
}

/// `fedmesh notifier`.
#[derive(Debug, Args)]
pub struct NotifierArgs {
    #[command(flatten)]
    pub flags: RoleFlags,
    #[command(flatten)]
    pub settings: NotifierConfig,
}

/// The settings a role command runs with, merged and validated; with
/// `--check-config` they are printed, and None says not to start.
fn settings<T>(
    flags: &RoleFlags,
    parsed: &T,
    matches: &ArgMatches,
    validate: impl Fn(&T) -> Result<(), ConfigError>,
    redacted: impl Fn(&T) -> T,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Option<T>>
where
    T: Serialize + serde::de::DeserializeOwned,
{
    let settings = load(matches, parsed, flags.config.as_deref())?;
    validate(&settings)?;
    if flags.check_config {
        writeln!(out, "# the settings are valid; as they take effect:")?;
        write!(out, "{}", to_toml(&redacted(&settings))?)?;
        return Ok(None);
    }
    Ok(Some(settings))
}

async fn bind(listen: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))
}

/// Serves a role's admin listener (`/metrics`, `/healthz`, `/readyz`) if
/// its settings name one: unready once `drain` starts, serving until the
/// process exits.
async fn admin(
    admin_listen: Option<&str>,
    readiness: fedmesh_common::telemetry::Readiness,
    drain: &Drain,
) -> anyhow::Result<()> {
    if let Some(address) = admin_listen {
        let listener = bind(address).await?;
        let draining = drain.draining.clone();
        tokio::spawn(async move {
            let served = fedmesh_common::telemetry::serve_admin(
                listener,
                readiness,
                draining,
                CancellationToken::new(),
            )
            .await;
            if let Err(error) = served {
                tracing::error!(%error, "the admin listener failed");
            }
        });
    }
    Ok(())
}

/// The two steps of a role's stop, as its connection settings time them.
fn drain(connections: &ConnectionSettings) -> Drain {
    drain_on_signal(Duration::from_millis(connections.drain_delay_ms))
}

/// Runs `role` until it ends; once `drain` stops it, waits at most the
/// grace period of `connections` for it to finish.
async fn finish_within<E>(
    role: impl std::future::Future<Output = Result<(), E>>,
    drain: &Drain,
    connections: &ConnectionSettings,
) -> anyhow::Result<()>
where
    anyhow::Error: From<E>,
{
    let grace = Duration::from_secs(connections.grace_secs);
    tokio::select! {
        ended = role => Ok(ended?),
        () = async {
            drain.stop.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "calls and writes did not finish within the grace period: exiting anyway");
            Ok(())
        }
    }
}

/// The scheme of a role's URL: https when it has TLS.
fn scheme(tls: &TlsSettings) -> &'static str {
    if tls.enabled() { "https" } else { "http" }
}

/// The publisher to the broker `events` name, if any; `name` is the
/// connection's name on the broker.
fn publisher(events: &EventBusSettings, name: &str) -> Option<Arc<dyn EventPublisher>> {
    let publisher = AmqpPublisher::from_settings(events, name)?;
    Some(Arc::new(publisher))
}

/// Runs a coordinator until Ctrl-C or SIGTERM.
pub async fn coordinator(
    args: CoordinatorArgs,
    matches: &ArgMatches,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let Some(config) = settings(
        &args.flags,
        &args.settings,
        matches,
        validate_coordinator,
        CoordinatorConfig::redacted,
        out,
    )?
    else {
        return Ok(());
    };
    let listener = bind(&config.listen).await?;
    let bus = publisher(&config.events, "fedmesh-coordinator").and_then(|publisher| {
        let queues = AmqpQueues::from_settings(&config.events, "fedmesh-coordinator-queues")?;
        Some(EventBus {
            publisher,
            queues: Arc::new(queues),
        })
    });
    let drain = drain(&config.connections);
    // Unready until the coordinator has opened its control database.
    let opened: Arc<std::sync::OnceLock<Readiness>> = Arc::default();
    let ready: Readiness = {
        let opened = Arc::clone(&opened);
        Arc::new(move || match opened.get() {
            Some(readiness) => readiness(),
            None => {
                Box::pin(async { vec!["starting: the control database is not open yet".into()] })
            }
        })
    };
    admin(config.admin_listen.as_deref(), ready, &drain).await?;
    let connections = config.connections;
    let role = fedmesh_coordinator::run_telling_readiness(
        config,
        listener,
        bus,
        drain.stop.clone(),
        move |readiness| {
            let _ = opened.set(readiness);
        },
    );
    finish_within(role, &drain, &connections).await?;
    Ok(())
}

/// Runs a gateway until Ctrl-C or SIGTERM.
pub async fn gateway(
    args: GatewayArgs,
    matches: &ArgMatches,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let Some(mut config) = settings(
        &args.flags,
        &args.settings,
        matches,
        validate_gateway,
        GatewayConfig::redacted,
        out,
    )?
    else {
        return Ok(());
    };
    if config.advertise.is_none() {
        config.advertise = Some(format!("{}://{}", scheme(&config.tls), config.listen));
    }
    let listener = bind(&config.listen).await?;
    let publisher = publisher(
        &config.events,
        &format!("fedmesh-gateway-{}", config.gateway_id()),
    );
    let drain = drain(&config.connections);
    let admin_listen = config.admin_listen.clone();
    let connections = config.connections;
    let running = fedmesh_gateway::start(config, listener, publisher, drain.stop.clone()).await?;
    admin(admin_listen.as_deref(), running.readiness, &drain).await?;
    let role = async { anyhow::Ok(running.stopped.await??) };
    finish_within(role, &drain, &connections).await?;
    Ok(())
}

/// A stand-alone notifier's settings must name the broker it consumes.
fn validate_notifier(config: &NotifierConfig) -> Result<(), ConfigError> {
    config.validate()?;
    if config.events.amqp.is_none() {
        return Err(ConfigError::setting(
            "amqp",
            "a notifier delivers the events of a RabbitMQ bus: give its URL with --amqp URL \
             (the dev mesh's notifier carries events in process)",
        ));
    }
    check_security(&config.tls, config.dev_identity, &config.listen)
}

/// A stand-alone coordinator's settings must secure its connections.
fn validate_coordinator(config: &CoordinatorConfig) -> Result<(), ConfigError> {
    config.validate()?;
    check_security(&config.tls, config.dev_identity, &config.listen)
}

/// A stand-alone gateway's settings must secure its connections.
fn validate_gateway(config: &GatewayConfig) -> Result<(), ConfigError> {
    config.validate()?;
    check_security(&config.tls, config.dev_identity, &config.listen)
}

/// Runs a notifier until Ctrl-C or SIGTERM.
pub async fn notifier(
    args: NotifierArgs,
    matches: &ArgMatches,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let Some(mut config) = settings(
        &args.flags,
        &args.settings,
        matches,
        validate_notifier,
        NotifierConfig::redacted,
        out,
    )?
    else {
        return Ok(());
    };
    if config.advertise.is_none() {
        config.advertise = Some(format!("{}://{}", scheme(&config.tls), config.listen));
    }
    let listener = bind(&config.listen).await?;
    let drain = drain(&config.connections);
    let stop = drain.stop.clone();
    let Some(url) = config.events.amqp.as_deref() else {
        anyhow::bail!("unreachable: the settings were validated");
    };
    let source = AmqpSource::start(
        url,
        &config.events.amqp_exchange,
        &format!("fedmesh-notifier-{}", config.id),
        config.subscriber_buffer,
        stop.clone(),
    );
    let queues = AmqpQueues::new(
        url,
        &config.events.amqp_exchange,
        &format!("fedmesh-notifier-{}-queues", config.id),
    );
    // Ready while it consumes the broker's exchange.
    let ready: Readiness = {
        let source = Arc::clone(&source);
        Arc::new(move || {
            let live = fedmesh_common::events::EventSource::is_live(source.as_ref());
            Box::pin(async move {
                if live {
                    Vec::new()
                } else {
                    vec!["not consuming the broker's exchange: is RabbitMQ reachable?".into()]
                }
            })
        })
    };
    admin(config.admin_listen.as_deref(), ready, &drain).await?;
    let connections = config.connections;
    let role = fedmesh_notifier::run(config, listener, source, Some(Arc::new(queues)), stop);
    finish_within(role, &drain, &connections).await?;
    Ok(())
}

/// The dev mesh's admin listener is on the base port plus this.
const ADMIN_PORT_OFFSET: u16 = 9;

/// Runs the one-process dev mesh until Ctrl-C or SIGTERM.
pub async fn dev(args: DevArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let shard_urls = args
        .shards
        .iter()
        .map(|shard| (shard.name.clone(), shard.database_url.clone()))
        .collect();
    let mesh = DevMesh::start(DevOptions {
        data_dir: args.data_dir.clone(),
        base_port: (args.base_port != 0).then_some(args.base_port),
        shard_urls,
        shards_per_region: usize::from(args.shards_per_region),
        tune_gateway: None,
        events: args.events.clone(),
        subscriber_buffer: NotifierConfig::default().subscriber_buffer,
        webhooks: NotifierConfig::default().webhooks,
        certs: args.tls.then(|| args.data_dir.join("certs")),
        tune_tls: None,
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
    let admin_listen = args.admin_listen.clone().unwrap_or_else(|| {
        let port = match args.base_port {
            0 => 0,
            base => base.saturating_add(ADMIN_PORT_OFFSET),
        };
        format!("127.0.0.1:{port}")
    });
    fedmesh_common::telemetry::check_admin_listen(Some(&admin_listen))?;
    let admin_listener = bind(&admin_listen).await?;
    writeln!(
        out,
        "  admin            http://{} (/metrics, /healthz, /readyz)",
        admin_listener.local_addr()?
    )?;
    {
        let readiness = mesh.readiness();
        let shutdown = mesh.shutdown_token();
        tokio::spawn(async move {
            let served = fedmesh_common::telemetry::serve_admin(
                admin_listener,
                readiness,
                shutdown.clone(),
                shutdown,
            )
            .await;
            if let Err(error) = served {
                tracing::error!(%error, "the admin listener failed");
            }
        });
    }
    match mesh.certs() {
        Some(dir) => writeln!(
            out,
            "  security         mutual TLS; client commands need:\n                   export FEDMESH_CERTS={}",
            dir.display()
        )?,
        None => writeln!(
            out,
            "  security         plaintext with identity headers, loopback only (--tls for mutual TLS)"
        )?,
    }
    match &args.events.amqp {
        Some(url) => writeln!(
            out,
            "  events           RabbitMQ {}, exchange {}",
            fedmesh_common::store::redact_url(url),
            args.events.amqp_exchange
        )?,
        None => writeln!(
            out,
            "  events           in process (--amqp URL for RabbitMQ)"
        )?,
    }
    if args.base_port != DEFAULT_BASE_PORT {
        writeln!(
            out,
            "client commands reach this mesh after, in their shell:\n  export FEDMESH_COORDINATOR={}",
            mesh.coordinator_url
        )?;
    }
    writeln!(out, "press Ctrl-C to stop")?;
    out.flush()?;
    let stop = stop_on_signal();
    let shutdown = mesh.shutdown_token();
    tokio::spawn(async move {
        stop.cancelled().await;
        shutdown.cancel();
    });
    mesh.wait().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Debug, Parser)]
    struct Gateway {
        #[command(flatten)]
        args: GatewayArgs,
    }

    fn gateway_settings(argv: &[&str]) -> anyhow::Result<Option<GatewayConfig>> {
        let matches = Gateway::command().try_get_matches_from(argv)?;
        let args = Gateway::from_arg_matches(&matches)?.args;
        let mut out = Vec::new();
        settings(
            &args.flags,
            &args.settings,
            &matches,
            GatewayConfig::validate,
            Clone::clone,
            &mut out,
        )
    }

    #[test]
    fn flags_override_the_config_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            "region = \"west\"\nmax_batch = 64\ncoordinator = \"http://10.0.0.1:50051\"\n[shards]\nwest-1 = \"postgres://db/west_1\"\n[connections]\nkeepalive_interval_ms = 5000\n",
        )
        .expect("write");
        let config_flag = path.display().to_string();
        let config = gateway_settings(&["gateway", "--config", &config_flag, "--max-batch", "32"])
            .expect("valid")
            .expect("not a check");
        assert_eq!(config.region(), "west");
        assert_eq!(config.gateway_id(), "west-0");
        assert_eq!(config.max_batch, 32, "the flag wins over the file");
        assert_eq!(config.coordinator, "http://10.0.0.1:50051");
        assert_eq!(config.shards[0].database_url, "postgres://db/west_1");
        assert_eq!(config.connections.keepalive_interval_ms, 5000);
        assert_eq!(config.listen, "127.0.0.1:50052");
    }

    #[test]
    fn unknown_keys_and_missing_settings_are_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, "regoin = \"west\"\n").expect("write");
        let config_flag = path.display().to_string();
        let error = gateway_settings(&["gateway", "--config", &config_flag]).expect_err("typo");
        assert!(format!("{error:#}").contains("regoin"), "{error:#}");

        let error = gateway_settings(&["gateway", "--region", "west"]).expect_err("no shard");
        assert!(format!("{error:#}").contains("--shard"), "{error:#}");

        let error = gateway_settings(&[
            "gateway",
            "--region",
            "west",
            "--shard",
            "west-1=sqlite:///tmp/w.sqlite",
            "--retention-days",
            "99999999999",
        ])
        .expect_err("overflow");
        assert!(format!("{error:#}").contains("retention_days"), "{error:#}");
    }

    #[test]
    fn check_config_prints_the_effective_settings_with_passwords_hidden() {
        let matches = Gateway::command()
            .try_get_matches_from([
                "gateway",
                "--check-config",
                "--region",
                "east",
                "--shard",
                "east-1=postgres://fedmesh:hunter2@db/east_1",
                "--amqp",
                "amqp://fedmesh:rabbit-secret@mq:5672/%2f",
            ])
            .expect("parse");
        let args = Gateway::from_arg_matches(&matches).expect("parse").args;
        let mut out = Vec::new();
        let started = settings(
            &args.flags,
            &args.settings,
            &matches,
            GatewayConfig::validate,
            GatewayConfig::redacted,
            &mut out,
        )
        .expect("valid");
        assert!(started.is_none(), "--check-config does not start");
        let printed = String::from_utf8(out).expect("utf-8");
        assert!(printed.contains("region = \"east\""), "{printed}");
        assert!(printed.contains("max_batch = 256"), "{printed}");
        assert!(
            printed.contains("east-1 = \"postgres://fedmesh:***@db/east_1\""),
            "{printed}"
        );
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("[events]"), "{printed}");
        assert!(
            printed.contains("amqp = \"amqp://fedmesh:***@mq:5672/%2f\""),
            "{printed}"
        );
        assert!(!printed.contains("rabbit-secret"), "{printed}");
    }

    #[test]
    fn a_role_starts_only_on_tls_or_with_dev_identities_on_loopback() {
        let check = |argv: &[&str]| {
            let matches = Gateway::command().try_get_matches_from(argv)?;
            let args = Gateway::from_arg_matches(&matches)?.args;
            settings(
                &args.flags,
                &args.settings,
                &matches,
                validate_gateway,
                Clone::clone,
                &mut Vec::new(),
            )
        };
        let base = [
            "gateway",
            "--region",
            "east",
            "--shard",
            "east-1=sqlite:///tmp/e.sqlite",
        ];
        let error = check(&base).expect_err("no TLS, no dev identities");
        assert!(
            format!("{error:#}").contains("--cert, --key and --ca"),
            "{error:#}"
        );
        let with = |extra: &[&'static str]| {
            let mut argv = base.to_vec();
            argv.extend_from_slice(extra);
            check(&argv)
        };
        with(&["--dev-identity"]).expect("dev identities on the default loopback address");
        let error = with(&["--dev-identity", "--listen", "0.0.0.0:50052"])
            .expect_err("plaintext off loopback");
        assert!(
            format!("{error:#}").contains("not a loopback address"),
            "{error:#}"
        );
        let error = with(&["--cert", "/etc/fedmesh/gateway.crt"]).expect_err("half of TLS");
        assert!(
            format!("{error:#}").contains("--cert, --key and --ca together"),
            "{error:#}"
        );
        let error = with(&[
            "--listen",
            "0.0.0.0:50052",
            "--cert",
            "/nonexistent/gateway.crt",
            "--key",
            "/nonexistent/gateway.key",
            "--ca",
            "/nonexistent/ca.crt",
        ])
        .expect_err("TLS material that is not there");
        assert!(
            format!("{error:#}").contains("/nonexistent/gateway.crt"),
            "{error:#}"
        );

        // With the material there (a development CA, allowed), on any address.
        let certs = tempfile::tempdir().expect("temp dir");
        let gateway = fedmesh_common::identity::Identity::Gateway("east".into());
        crate::certs::init(certs.path(), "fedmesh.local", &[gateway], 1).expect("certs");
        let path = |name: &str| certs.path().join(name).display().to_string();
        let (cert, key, ca) = (
            path("gateway/east.crt"),
            path("gateway/east.key"),
            path("ca.crt"),
        );
        let mut argv = base.to_vec();
        argv.extend_from_slice(&["--listen", "0.0.0.0:50052", "--allow-dev-ca"]);
        argv.extend_from_slice(&["--cert", &cert, "--key", &key, "--ca", &ca]);
        check(&argv).expect("TLS on any address");
    }

    #[test]
    fn discovery_settings_come_from_flags_and_the_file_and_are_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            "region = \"east\"\ndiscovery_domain = \"mesh.example.org\"\n[shards]\neast-1 = \"sqlite:///tmp/e.sqlite\"\n[peers]\nwest = [\"https://10.0.0.7:50052\", \"https://10.0.0.8:50052\"]\ncentral = \"https://10.2.0.1:50052\"\n",
        )
        .expect("write");
        let config_flag = path.display().to_string();
        let with = |extra: &[&str]| {
            let mut argv = vec!["gateway", "--config", &config_flag];
            argv.extend_from_slice(extra);
            gateway_settings(&argv)
        };
        let config = with(&[]).expect("valid").expect("not a check");
        assert_eq!(config.discovery_domain.as_deref(), Some("mesh.example.org"));
        assert_eq!(config.discovery_resolver, None, "the system's resolver");
        assert_eq!(config.discovery_port, 50052);
        assert_eq!(config.discovery_grace_secs, 300);
        let peers: Vec<(&str, &str)> = config
            .peers
            .iter()
            .map(|peer| (peer.region.as_str(), peer.url.as_str()))
            .collect();
        assert_eq!(
            peers,
            [
                ("central", "https://10.2.0.1:50052"),
                ("west", "https://10.0.0.7:50052"),
                ("west", "https://10.0.0.8:50052"),
            ]
        );

        let config = with(&[
            "--discovery-resolver",
            "10.0.0.2:5353",
            "--peer",
            "west=https://10.0.0.9:50052",
        ])
        .expect("valid")
        .expect("not a check");
        assert_eq!(config.discovery_resolver.as_deref(), Some("10.0.0.2:5353"));
        let peers: Vec<(&str, &str)> = config
            .peers
            .iter()
            .map(|peer| (peer.region.as_str(), peer.url.as_str()))
            .collect();
        assert_eq!(
            peers,
            [
                ("central", "https://10.2.0.1:50052"),
                ("west", "https://10.0.0.9:50052")
            ],
            "the flag's region replaces the file's; the file's other regions stay"
        );

        for (flags, named) in [
            (
                &["--discovery-domain", "mesh_example"][..],
                "discovery_domain (--discovery-domain)",
            ),
            (
                &["--discovery-resolver", "dns.example"][..],
                "discovery_resolver (--discovery-resolver)",
            ),
            (
                &["--discovery-port", "0"][..],
                "discovery_port (--discovery-port)",
            ),
            (&["--peer", "west=ftp://10.0.0.9"][..], "peers (--peer)"),
            (
                &["--peer", "east=https://10.0.0.9:50052"][..],
                "peers (--peer)",
            ),
        ] {
            let error = with(flags).expect_err("refused");
            assert!(format!("{error:#}").contains(named), "{flags:?}: {error:#}");
        }

        let matches = Gateway::command()
            .try_get_matches_from(["gateway", "--config", &config_flag, "--check-config"])
            .expect("parse");
        let args = Gateway::from_arg_matches(&matches).expect("parse").args;
        let mut out = Vec::new();
        settings(
            &args.flags,
            &args.settings,
            &matches,
            GatewayConfig::validate,
            GatewayConfig::redacted,
            &mut out,
        )
        .expect("valid");
        let printed = String::from_utf8(out).expect("utf-8");
        assert!(
            printed.contains("discovery_domain = \"mesh.example.org\""),
            "{printed}"
        );
        assert!(printed.contains("[peers]"), "{printed}");
        assert!(
            printed.contains("central = [\"https://10.2.0.1:50052\"]"),
            "{printed}"
        );
    }

    #[test]
    fn the_event_bus_settings_are_checked() {
        let shard = "east-1=sqlite:///tmp/e.sqlite";
        let gateway = |extra: &[&str]| {
            let mut argv = vec!["gateway", "--region", "east", "--shard", shard];
            argv.extend_from_slice(extra);
            gateway_settings(&argv)
        };
        let config = gateway(&[]).expect("valid").expect("not a check");
        assert_eq!(config.events.amqp, None, "events are off by default");
        assert_eq!(config.events.amqp_exchange, "fedmesh.events");

        let error = gateway(&["--amqp", "http://mq:5672"]).expect_err("not AMQP");
        assert!(format!("{error:#}").contains("--amqp"), "{error:#}");
        let error = gateway(&["--amqp", "amqp://mq", "--amqp-exchange", "amq.topic"])
            .expect_err("reserved name");
        assert!(
            format!("{error:#}").contains("--amqp-exchange"),
            "{error:#}"
        );

        #[derive(Debug, Parser)]
        struct Notifier {
            #[command(flatten)]
            args: NotifierArgs,
        }
        let matches = Notifier::command()
            .try_get_matches_from(["notifier"])
            .expect("parse");
        let args = Notifier::from_arg_matches(&matches).expect("parse").args;
        let error = settings(
            &args.flags,
            &args.settings,
            &matches,
            validate_notifier,
            Clone::clone,
            &mut Vec::new(),
        )
        .expect_err("a notifier needs the broker");
        assert!(format!("{error:#}").contains("--amqp URL"), "{error:#}");
    }
}
