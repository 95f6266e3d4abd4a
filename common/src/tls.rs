//! Mutual TLS between every component of a mesh, with rustls.
//!
//! Every listener requires a client certificate chained to the mesh's CA
//! bundle; every client presents its own and checks the server's chain.
//! Only TLS 1.3 is spoken, 0-RTT is off. Who a peer is comes from exactly
//! one URI SAN of its verified leaf certificate,
//! `spiffe://<trust-domain>/<role>/<id>` ([`certificate_identity`]); a
//! server's certificate is checked the same way instead of against a host
//! name, so a component may be reached at any address.
//!
//! [`MeshTls`] holds the certificate, key and CA bundle of one component and
//! reloads them when their files change ([`MeshTls::watch`]): a rotated
//! certificate is used for every connection made after the next check.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::identity::{Identity, IdentityError};

/// The trust domain of identities when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "fedmesh.local";

/// The common name `fedmesh certs init` gives its development CA, by which
/// a production configuration recognises and refuses it.
pub const DEV_CA_NAME: &str = "fedmesh development CA";

/// Certificates, keys and the CA bundle of a component: settings every
/// role has, under `[tls]` in its config file.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// This component's certificate chain (PEM, leaf first), e.g. made by
    /// `fedmesh certs init`. With --cert, --key and --ca every listener
    /// and client speaks mutual TLS 1.3; without them the component starts
    /// only with --dev-identity on a loopback address.
    #[arg(long, env = "FEDMESH_CERT", value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM, readable only by its owner).
    #[arg(long, env = "FEDMESH_KEY", value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// The CA bundle peers' certificates must chain to (PEM).
    #[arg(long, env = "FEDMESH_CA", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// The SPIFFE trust domain of this mesh: peers' certificates must name
    /// `spiffe://<trust-domain>/...`.
    #[arg(long, env = "FEDMESH_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// How often, in seconds, the certificate, key, CA bundle and deny
    /// list are checked for changes; a change applies to new connections
    /// (and, for the deny list, to open streams) after the next check.
    #[arg(long, env = "FEDMESH_TLS_RELOAD_SECS", default_value_t = 5)]
    pub reload_secs: u64,
    /// A file of revoked identities (`agency/tax-office`) and certificate
    /// serials (hex, as `fedmesh certs inspect` prints them), one per line,
    /// `#` starting a comment; reloaded like the certificates. A revoked
    /// caller is refused and its open streams are ended.
    #[arg(long, env = "FEDMESH_DENY_LIST", value_name = "FILE")]
    pub deny_list: Option<PathBuf>,
    /// Accept the development CA `fedmesh certs init` makes (for trying a
    /// mesh out; never in production).
    #[arg(long, env = "FEDMESH_ALLOW_DEV_CA")]
    #[serde(default)]
    pub allow_dev_ca: bool,
}

impl Default for TlsSettings {
    fn default() -> Self {
        crate::config::defaults()
    }
}

impl TlsSettings {
    /// Settings for the files of `identity` in a folder made by `fedmesh
    /// certs` (development CA allowed).
    pub fn from_folder(folder: &Path, identity: &Identity) -> Self {
        let files = CertificateFiles::of(folder, identity);
        TlsSettings {
            cert: Some(files.cert),
            key: Some(files.key),
            ca: Some(folder.join(CA_CERT)),
            allow_dev_ca: true,
            ..TlsSettings::default()
        }
    }

    /// Whether TLS is asked for (any of the three files given; `validate`
    /// requires all three).
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    /// Refuses values a component cannot use.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        crate::config::check_range("reload_secs", self.reload_secs, 1..=86_400)?;
        if crate::validate::trust_domain(&self.trust_domain).is_err() {
            return Err(crate::config::ConfigError::setting(
                "trust_domain",
                format!(
                    "{:?} is not a trust domain: lower-case letters, digits, '.', '-' and '_'",
                    self.trust_domain
                ),
            ));
        }
        if self.enabled() {
            for (key, value) in [("cert", &self.cert), ("key", &self.key), ("ca", &self.ca)] {
                if value.is_none() {
                    return Err(crate::config::ConfigError::setting(
                        key,
                        "TLS needs --cert, --key and --ca together",
                    ));
                }
            }
        }
        Ok(())
    }

    /// How often files are checked for changes.
    pub fn reload_period(&self) -> Duration {
        Duration::from_secs(self.reload_secs)
    }
}

/// The CA certificate's file in a certificates folder.
pub const CA_CERT: &str = "ca.crt";
/// The CA key's file in a certificates folder.
pub const CA_KEY: &str = "ca.key";

/// Where the certificate and key of an identity are in a certificates
/// folder: `<folder>/<identity>.crt` and `.key`, e.g. `agency/tax-office.crt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
}

impl CertificateFiles {
    /// The files of `identity` under `folder`.
    pub fn of(folder: &Path, identity: &Identity) -> Self {
        let base = folder.join(identity.to_string());
        CertificateFiles {
            cert: base.with_extension("crt"),
            key: base.with_extension("key"),
        }
    }
}

/// Why TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or does not hold what it should.
    #[error("{path}: {problem}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// The certificate is not of the identity this component acts as.
    #[error(
        "{path} is the certificate of {found}, but this component acts as {expected}; give the certificate of {expected}"
    )]
    WrongIdentity {
        /// The certificate file.
        path: String,
        /// Whose it is.
        found: String,
        /// Whose it should be.
        expected: String,
    },
    /// The CA bundle holds the development CA and it is not allowed.
    #[error(
        "{path} holds fedmesh's development CA, which a production configuration refuses; use your own CA, or --allow-dev-ca to try a mesh out"
    )]
    DevelopmentCa {
        /// The CA file.
        path: String,
    },
    /// rustls refused the material.
    #[error("{0}")]
    Rustls(String),
}

fn file_error(path: &Path, problem: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        problem: problem.to_string(),
    }
}

/// What a verified certificate says of its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The identity of its one URI SAN.
    pub identity: Identity,
    /// Its serial number, lower-case hex without separators.
    pub serial: String,
    /// End of its validity, seconds since the Unix epoch.
    pub not_after: i64,
}

/// The identity a certificate (DER) names, by the rules of the mesh: not a
/// CA, exactly one URI SAN, `spiffe://<trust_domain>/<role>/<id>`.
pub fn certificate_identity(
    der: &[u8],
    trust_domain: &str,
) -> Result<PeerCertificate, IdentityError> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|error| IdentityError::BadCertificate(error.to_string()))?;
    let is_ca = certificate
        .basic_constraints()
        .map_err(|error| IdentityError::BadCertificate(error.to_string()))?
        .is_some_and(|constraints| constraints.value.ca);
    if is_ca {
        return Err(IdentityError::CaCertificate);
    }
    let names = certificate
        .subject_alternative_name()
        .map_err(|error| IdentityError::BadCertificate(error.to_string()))?;
    let uris: Vec<&str> = names
        .iter()
        .flat_map(|names| names.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let uri = match uris.as_slice() {
        [uri] => *uri,
        [] => return Err(IdentityError::NoUriSan),
        several => return Err(IdentityError::SeveralUriSans(several.len())),
    };
    let identity = identity_of_spiffe_id(uri, trust_domain)?;
    Ok(PeerCertificate {
        identity,
        serial: serial_hex(certificate.raw_serial()),
        not_after: certificate.validity().not_after.timestamp(),
    })
}

/// The identity of a SPIFFE id of `trust_domain`.
pub fn identity_of_spiffe_id(uri: &str, trust_domain: &str) -> Result<Identity, IdentityError> {
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| IdentityError::NotSpiffe(uri.to_string()))?;
    let (domain, path) = rest
        .split_once('/')
        .ok_or_else(|| IdentityError::NotSpiffe(uri.to_string()))?;
    if domain != trust_domain {
        return Err(IdentityError::ForeignTrustDomain {
            found: domain.to_string(),
            expected: trust_domain.to_string(),
        });
    }
    Identity::parse(path).ok_or_else(|| IdentityError::Malformed(uri.to_string()))
}

/// The SPIFFE id of `identity` in `trust_domain`.
pub fn spiffe_id(identity: &Identity, trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/{identity}")
}

/// A serial number as `fedmesh certs inspect` prints it and deny lists
/// name it: lower-case hex, leading zero bytes dropped.
pub fn serial_hex(raw: &[u8]) -> String {
    let significant = raw
        .iter()
        .position(|byte| *byte != 0)
        .map_or(&raw[raw.len().saturating_sub(1)..], |first| &raw[first..]);
    significant
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Which server a client expects at the other end of a connection: it
/// refuses any other, so a component cannot stand in for another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedServer {
    /// Exactly this identity (the coordinator, the gateway of a region).
    Is(Identity),
    /// A gateway of any region (an agency's gateway given by URL).
    AnyGateway,
    /// Any serving component.
    Any,
}

impl ExpectedServer {
    /// Whether `identity` is what is expected.
    pub fn admits(&self, identity: &Identity) -> bool {
        match self {
            ExpectedServer::Is(expected) => expected == identity,
            ExpectedServer::AnyGateway => matches!(identity, Identity::Gateway(_)),
            ExpectedServer::Any => true,
        }
    }
}

impl std::fmt::Display for ExpectedServer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedServer::Is(identity) => write!(formatter, "{identity}"),
            ExpectedServer::AnyGateway => formatter.write_str("a gateway"),
            ExpectedServer::Any => formatter.write_str("a fedmesh server"),
        }
    }
}

/// What the files held when last read (SHA-256 of each), to tell whether
/// to reload: contents, not timestamps, which a same-size rewrite within
/// a coarse clock tick would leave unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<Option<[u8; 32]>>);

impl Stamp {
    fn of(paths: &[&Path]) -> Stamp {
        use sha2::Digest as _;
        Stamp(
            paths
                .iter()
                .map(|path| {
                    std::fs::read(path)
                        .ok()
                        .map(|contents| sha2::Sha256::digest(&contents).into())
                })
                .collect(),
        )
    }
}

/// One loaded set of certificate, key and CA bundle.
struct Loaded {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    own: PeerCertificate,
    stamp: Stamp,
}

/// Where a component's TLS material is and what it must say.
#[derive(Debug)]
struct Source {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    trust_domain: String,
    allow_dev_ca: bool,
    expected: Option<Identity>,
}

/// The TLS material of one component, reloaded when its files change.
pub struct MeshTls {
    source: Source,
    reload_period: Duration,
    current: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MeshTls")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const H2: &[u8] = b"h2";

impl Source {
    fn paths(&self) -> [&Path; 3] {
        [&self.cert, &self.key, &self.ca]
    }

    fn read(&self) -> Result<Loaded, TlsError> {
        let stamp = Stamp::of(&self.paths());
        let chain = read_certificates(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|error| file_error(&self.key, format!("no usable private key: {error}")))?;
        let ca = read_certificates(&self.ca)?;
        let mut roots = RootCertStore::empty();
        for certificate in &ca {
            if !self.allow_dev_ca && is_development_ca(certificate) {
                return Err(TlsError::DevelopmentCa {
                    path: self.ca.display().to_string(),
                });
            }
            roots
                .add(certificate.clone())
                .map_err(|error| file_error(&self.ca, error))?;
        }
        let own = chain
            .first()
            .ok_or_else(|| file_error(&self.cert, "holds no certificate"))
            .and_then(|leaf| {
                certificate_identity(leaf, &self.trust_domain)
                    .map_err(|error| file_error(&self.cert, error))
            })?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| {
                i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
            });
        if own.not_after < now {
            return Err(file_error(
                &self.cert,
                format!(
                    "the certificate of {} expired {} s ago; issue a new one (fedmesh certs rotate)",
                    own.identity,
                    now - own.not_after
                ),
            ));
        }
        if let Some(expected) = &self.expected
            && own.identity != *expected
        {
            return Err(TlsError::WrongIdentity {
                path: self.cert.display().to_string(),
                found: own.identity.to_string(),
                expected: expected.to_string(),
            });
        }
        let roots = Arc::new(roots);
        let rustls_error = |error: rustls::Error| TlsError::Rustls(error.to_string());
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|error| file_error(&self.ca, error))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_error)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|error| file_error(&self.key, error))?;
        server.alpn_protocols = vec![H2.to_vec()];
        server.max_early_data_size = 0;
        // No resumption: every connection presents (and has verified) its
        // client certificate as it is now.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_error)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots,
                trust_domain: self.trust_domain.clone(),
                provider: provider(),
            }))
            .with_client_auth_cert(chain, key)
            .map_err(|error| file_error(&self.key, error))?;
        client.alpn_protocols = vec![H2.to_vec()];
        client.enable_early_data = false;
        Ok(Loaded {
            server: Arc::new(server),
            client: Arc::new(client),
            own,
            stamp,
        })
    }
}

impl MeshTls {
    /// Loads the material `settings` names, or None when TLS is not
    /// configured. `expected` is the identity the component acts as: a
    /// certificate of another is refused (any identity when None).
    pub fn load(
        settings: &TlsSettings,
        expected: Option<&Identity>,
    ) -> Result<Option<Arc<MeshTls>>, TlsError> {
        let (Some(cert), Some(key), Some(ca)) = (&settings.cert, &settings.key, &settings.ca)
        else {
            return Ok(None);
        };
        let source = Source {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
            trust_domain: settings.trust_domain.clone(),
            allow_dev_ca: settings.allow_dev_ca,
            expected: expected.cloned(),
        };
        let loaded = source.read()?;
        Ok(Some(Arc::new(MeshTls {
            source,
            reload_period: settings.reload_period(),
            current: RwLock::new(Arc::new(loaded)),
        })))
    }

    fn current(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The rustls configuration for accepting connections now.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.current().server)
    }

    /// The rustls configuration for making connections now.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.current().client)
    }

    /// What this component's own certificate says.
    pub fn own_certificate(&self) -> PeerCertificate {
        self.current().own.clone()
    }

    /// The trust domain peers must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.source.trust_domain
    }

    /// Reads the files again if they changed since last read; whether the
    /// material changed. Material that cannot be used is logged and the
    /// previous one kept.
    pub fn reload_if_changed(&self, audit: &crate::auth::AuditSlot) -> bool {
        let current = self.current();
        let stamp = Stamp::of(&self.source.paths());
        if stamp == current.stamp {
            return false;
        }
        match self.source.read() {
            Ok(loaded) => {
                let own = loaded.own.clone();
                let changed = own != current.own;
                if changed {
                    crate::auth::audit_to(
                        audit,
                        crate::audit::AuditRecord {
                            chain: crate::server::audit_chain(&own.identity),
                            actor: own.identity.to_string(),
                            action: "certificate-rotated".into(),
                            target: own.identity.to_string(),
                            outcome: "ok".into(),
                            detail: format!(
                                "serial {} replaced by {}, valid until {}",
                                current.own.serial, own.serial, own.not_after
                            ),
                        },
                    );
                }
                if let Ok(mut slot) = self.current.write() {
                    *slot = Arc::new(loaded);
                }
                tracing::info!(
                    identity = %own.identity,
                    serial = %own.serial,
                    certificate_changed = changed,
                    "TLS certificate, key and CA bundle reloaded; new connections use them"
                );
                true
            }
            Err(error) => {
                // Keep what works, and do not read the same files again
                // until they change once more.
                if let Ok(mut slot) = self.current.write() {
                    *slot = Arc::new(Loaded {
                        server: Arc::clone(&current.server),
                        client: Arc::clone(&current.client),
                        own: current.own.clone(),
                        stamp,
                    });
                }
                tracing::warn!(%error, "changed TLS files cannot be used; keeping the previous ones");
                false
            }
        }
    }

    /// Checks the files every reload period until `shutdown`; a new
    /// certificate is recorded in `audit`'s sink.
    pub fn watch(self: &Arc<Self>, shutdown: CancellationToken, audit: crate::auth::AuditSlot) {
        let tls = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(tls.reload_period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticks.tick() => {
                        tls.reload_if_changed(&audit);
                    }
                }
            }
        });
    }
}

/// The certificates of a PEM file (at least one).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|error| file_error(path, error))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(path, format!("not PEM certificates: {error}")))?;
    if certificates.is_empty() {
        return Err(file_error(path, "holds no certificate"));
    }
    Ok(certificates)
}

/// Whether `certificate` is a development CA made by `fedmesh certs`.
pub fn is_development_ca(certificate: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(certificate).is_ok_and(|(_, certificate)| {
        certificate
            .subject()
            .iter_common_name()
            .any(|name| name.as_str() == Ok(DEV_CA_NAME))
    })
}

/// Checks a server's certificate chain against the CA bundle, and its
/// identity against the trust domain, instead of against a host name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let peer = certificate_identity(end_entity, &self.trust_domain).map_err(|error| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(error),
            )))
        })?;
        match peer.identity {
            Identity::Gateway(_) | Identity::Coordinator | Identity::Notifier => {
                Ok(ServerCertVerified::assertion())
            }
            other => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                    IdentityError::NotAServer(other.to_string()),
                ))),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_print_without_leading_zeros() {
        assert_eq!(serial_hex(&[0, 0x1f, 0xa0]), "1fa0");
        assert_eq!(serial_hex(&[0]), "00");
        assert_eq!(serial_hex(&[]), "");
    }

    #[test]
    fn spiffe_ids_name_identities_of_one_trust_domain() {
        let identity = Identity::Agency("tax-office".into());
        let id = spiffe_id(&identity, "gov.example");
        assert_eq!(id, "spiffe://gov.example/agency/tax-office");
        assert_eq!(identity_of_spiffe_id(&id, "gov.example"), Ok(identity));
        assert!(matches!(
            identity_of_spiffe_id(&id, "other.example"),
            Err(IdentityError::ForeignTrustDomain { .. })
        ));
        assert!(matches!(
            identity_of_spiffe_id("https://gov.example/agency/x", "gov.example"),
            Err(IdentityError::NotSpiffe(_))
        ));
        assert!(matches!(
            identity_of_spiffe_id("spiffe://gov.example/root", "gov.example"),
            Err(IdentityError::Malformed(_))
        ));
    }
}
