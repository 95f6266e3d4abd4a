//! `fedmesh certs`: a development CA and the certificates of a mesh's
//! components, agencies and operators.
//!
//! A certificates folder holds `ca.crt` and `ca.key`, and for each identity
//! `<identity>.crt` and `<identity>.key` (`gateway/east.crt`,
//! `agency/tax-office.key`...). Each certificate names its holder by one
//! URI SAN, `spiffe://<trust-domain>/<identity>`. Keys are written readable
//! by their owner only (0600). The CA's common name marks it as the
//! development CA, which a production configuration refuses.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use fedmesh_common::identity::Identity;
use fedmesh_common::tls::{
    CA_CERT, CA_KEY, CertificateFiles, DEFAULT_TRUST_DOMAIN, DEV_CA_NAME, certificate_identity,
    read_certificates, serial_hex, spiffe_id,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// `fedmesh certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a development CA and certificates for a coordinator, a
    /// notifier, a gateway of each region and an operator.
    #[command(
        after_help = "Examples:\n  fedmesh certs init ./certs\n  fedmesh certs init ./certs --trust-domain gov.example --regions north,south --operator alice"
    )]
    Init {
        /// Folder to create them in (made if missing; must hold no CA yet).
        dir: PathBuf,
        /// The SPIFFE trust domain of the mesh.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Regions to make gateway certificates for.
        #[arg(long, value_delimiter = ',', default_value = "east,west,central")]
        regions: Vec<String>,
        /// Name of the operator to make a certificate for.
        #[arg(long, default_value = "admin")]
        operator: String,
        /// Days the component certificates are valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Add the certificate of one identity: agency/ID, operator/NAME,
    /// gateway/REGION, coordinator or notifier.
    #[command(
        after_help = "Examples:\n  fedmesh certs issue ./certs agency/tax-office\n  fedmesh certs issue ./certs operator/alice --days 30"
    )]
    Issue {
        /// The folder `certs init` made.
        dir: PathBuf,
        /// Whose certificate, e.g. agency/tax-office.
        identity: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Replace the key and certificate of an identity (new key, new
    /// serial); running components load theirs within one reload period.
    #[command(after_help = "Examples:\n  fedmesh certs rotate ./certs gateway/east")]
    Rotate {
        /// The folder `certs init` made.
        dir: PathBuf,
        /// Whose certificate, e.g. gateway/east.
        identity: String,
        /// Days the new certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Print a certificate's identity, serial and validity.
    #[command(after_help = "Examples:\n  fedmesh certs inspect ./certs/agency/tax-office.crt")]
    Inspect {
        /// A PEM certificate file.
        file: PathBuf,
        /// The trust domain to read its identity in.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

/// Runs a `certs` command.
pub fn run(args: CertsArgs, out: &mut (dyn std::io::Write + Send)) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Init {
            dir,
            trust_domain,
            regions,
            operator,
            days,
        } => {
            let mut identities = vec![Identity::Coordinator, Identity::Notifier];
            for region in regions {
                fedmesh_common::validate::region("regions", &region)
                    .map_err(|invalid| anyhow::anyhow!("--regions: {}", invalid.description))?;
                identities.push(Identity::Gateway(region));
            }
            identities.push(
                Identity::parse(&format!("operator/{operator}"))
                    .with_context(|| format!("--operator {operator:?} is not a name"))?,
            );
            init(&dir, &trust_domain, &identities, days)?;
            writeln!(out, "created a development CA in {}", dir.display())?;
            for identity in &identities {
                let files = CertificateFiles::of(&dir, identity);
                writeln!(out, "  {identity}: {}", files.cert.display())?;
            }
            writeln!(
                out,
                "add agencies with `fedmesh certs issue {} agency/ID`",
                dir.display()
            )?;
        }
        CertsCommand::Issue {
            dir,
            identity,
            days,
        } => {
            let identity = parse_identity(&identity)?;
            let files = issue(&dir, &identity, days, false)?;
            writeln!(out, "{identity}: {}", files.cert.display())?;
        }
        CertsCommand::Rotate {
            dir,
            identity,
            days,
        } => {
            let identity = parse_identity(&identity)?;
            let files = CertificateFiles::of(&dir, &identity);
            let before = read_certificates(&files.cert)
                .with_context(|| format!("{identity} has no certificate to rotate; issue one"))?;
            let before = serial_of(&before[0]);
            issue(&dir, &identity, days, true)?;
            let after = serial_of(&read_certificates(&files.cert)?[0]);
            writeln!(
                out,
                "{identity}: serial {before} replaced by {after} ({})",
                files.cert.display()
            )?;
        }
        CertsCommand::Inspect { file, trust_domain } => inspect(&file, &trust_domain, out)?,
    }
    Ok(())
}

fn parse_identity(text: &str) -> anyhow::Result<Identity> {
    Identity::parse(text).with_context(|| {
        format!(
            "{text:?} is not an identity: agency/ID, operator/NAME, gateway/REGION, coordinator or notifier"
        )
    })
}

fn serial_of(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, certificate)| serial_hex(certificate.raw_serial()))
        .unwrap_or_default()
}

/// The CA's distinguished name: its common name marks it as the
/// development CA, its organisation is the trust domain.
fn ca_name(trust_domain: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, trust_domain);
    name.push(DnType::CommonName, DEV_CA_NAME);
    name
}

fn ca_params(trust_domain: &str) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = ca_name(trust_domain);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn random_serial() -> anyhow::Result<SerialNumber> {
    let mut bytes = [0_u8; 16];
    getrandom::fill(&mut bytes).map_err(|error| anyhow::anyhow!("no randomness: {error}"))?;
    // Positive, and without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Creates a development CA in `dir` (which must hold none) and a
/// certificate for each of `identities`.
pub fn init(
    dir: &Path,
    trust_domain: &str,
    identities: &[Identity],
    days: u32,
) -> anyhow::Result<()> {
    fedmesh_common::validate::trust_domain(trust_domain)
        .map_err(|invalid| anyhow::anyhow!("--trust-domain: {}", invalid.description))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca_key_path = dir.join(CA_KEY);
    if ca_key_path.exists() {
        anyhow::bail!(
            "{} already holds a CA; add certificates with `fedmesh certs issue`",
            dir.display()
        );
    }
    let key = KeyPair::generate()?;
    let mut params = ca_params(trust_domain)?;
    params.serial_number = Some(random_serial()?);
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    let ca = params.self_signed(&key)?;
    write_private(&ca_key_path, key.serialize_pem().as_bytes())?;
    write_public(&dir.join(CA_CERT), ca.pem().as_bytes())?;
    for identity in identities {
        issue(dir, identity, days, false)?;
    }
    Ok(())
}

/// The development CA of `dir`, as an issuer.
struct Ca {
    certificate: rcgen::Certificate,
    key: KeyPair,
    trust_domain: String,
}

fn load_ca(dir: &Path) -> anyhow::Result<Ca> {
    let cert_path = dir.join(CA_CERT);
    let der = read_certificates(&cert_path)?
        .into_iter()
        .next()
        .with_context(|| format!("{} holds no certificate", cert_path.display()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .map_err(|error| anyhow::anyhow!("{}: {error}", cert_path.display()))?;
    let subject = parsed.subject();
    let is_dev_ca = subject
        .iter_common_name()
        .any(|name| name.as_str() == Ok(DEV_CA_NAME));
    anyhow::ensure!(
        is_dev_ca,
        "{} is not a development CA made by `fedmesh certs init`; issue certificates with your own CA",
        cert_path.display()
    );
    let trust_domain = subject
        .iter_organization()
        .next()
        .and_then(|name| name.as_str().ok())
        .map(str::to_string)
        .with_context(|| format!("{} names no trust domain", cert_path.display()))?;
    let key_path = dir.join(CA_KEY);
    let pem = std::fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    let key = KeyPair::from_pem(&pem).with_context(|| format!("{}", key_path.display()))?;
    // The same name and key make an issuer whose certificates chain to the
    // CA on disk.
    let certificate = ca_params(&trust_domain)?.self_signed(&key)?;
    Ok(Ca {
        certificate,
        key,
        trust_domain,
    })
}

/// Issues the certificate of `identity` in `dir`, replacing one that
/// exists only when `replace`.
pub fn issue(
    dir: &Path,
    identity: &Identity,
    days: u32,
    replace: bool,
) -> anyhow::Result<CertificateFiles> {
    anyhow::ensure!(
        (1..=3650).contains(&days),
        "--days {days} is out of range: use 1 to 3650"
    );
    let ca = load_ca(dir)?;
    let files = CertificateFiles::of(dir, identity);
    if !replace && files.cert.exists() {
        anyhow::bail!(
            "{} exists; replace it with `fedmesh certs rotate {} {identity}`",
            files.cert.display(),
            dir.display()
        );
    }
    let key = KeyPair::generate()?;
    let params = leaf_params(identity, &ca.trust_domain, days)?;
    let certificate = params.signed_by(&key, &ca.certificate, &ca.key)?;
    if let Some(parent) = files.cert.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // The key first: a component reloading between the two writes sees a
    // key that does not match its certificate and keeps the old pair.
    replace_file(&files.key, key.serialize_pem().as_bytes(), true)?;
    replace_file(&files.cert, certificate.pem().as_bytes(), false)?;
    Ok(files)
}

/// Signs a certificate of `params` with the development CA of `dir`; its
/// PEM and its new key's PEM.
pub fn sign_with_ca(dir: &Path, params: CertificateParams) -> anyhow::Result<(String, String)> {
    let ca = load_ca(dir)?;
    let key = KeyPair::generate()?;
    let certificate = params.signed_by(&key, &ca.certificate, &ca.key)?;
    Ok((certificate.pem(), key.serialize_pem()))
}

/// What a certificate of `identity` says, valid for `days` from now.
pub fn leaf_params(
    identity: &Identity,
    trust_domain: &str,
    days: u32,
) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, identity.to_string());
    params.subject_alt_names = vec![SanType::URI(spiffe_id(identity, trust_domain).try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match identity {
        Identity::Agency(_) | Identity::Operator(_) => vec![ExtendedKeyUsagePurpose::ClientAuth],
        _ => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    params.serial_number = Some(random_serial()?);
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(i64::from(days));
    Ok(params)
}

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn write_public(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `path` whole or not at all: a temporary file beside it, renamed
/// over it.
fn replace_file(path: &Path, contents: &[u8], private: bool) -> anyhow::Result<()> {
    let temporary = path.with_extension("new");
    let _ = std::fs::remove_file(&temporary);
    if private {
        write_private(&temporary, contents)?;
    } else {
        write_public(&temporary, contents)?;
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::rename(&temporary, path).with_context(|| format!("cannot replace {}", path.display()))
}

fn inspect(
    file: &Path,
    trust_domain: &str,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    let der = read_certificates(file)?
        .into_iter()
        .next()
        .with_context(|| format!("{} holds no certificate", file.display()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .map_err(|error| anyhow::anyhow!("{}: {error}", file.display()))?;
    let identity = match certificate_identity(&der, trust_domain) {
        Ok(peer) => peer.identity.to_string(),
        Err(error) => format!("none ({error})"),
    };
    let validity = parsed.validity();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let state = if now < validity.not_before.timestamp() {
        "not yet valid"
    } else if now > validity.not_after.timestamp() {
        "expired"
    } else {
        "valid"
    };
    writeln!(out, "identity:   {identity}")?;
    writeln!(out, "subject:    {}", parsed.subject())?;
    writeln!(out, "issuer:     {}", parsed.issuer())?;
    writeln!(out, "serial:     {}", serial_hex(parsed.raw_serial()))?;
    writeln!(out, "not before: {}", validity.not_before)?;
    writeln!(out, "not after:  {} ({state})", validity.not_after)?;
    if parsed.is_ca() {
        writeln!(out, "CA:         yes")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_holds_a_ca_and_certificates_that_chain_to_it() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let dir = folder.path().join("certs");
        let gateway = Identity::Gateway("east".into());
        init(&dir, "gov.example", std::slice::from_ref(&gateway), 30).expect("init");
        assert!(
            init(&dir, "gov.example", &[], 30).is_err(),
            "one CA per folder"
        );
        let agency = Identity::Agency("tax-office".into());
        let files = issue(&dir, &agency, 30, false).expect("issue");
        assert!(
            issue(&dir, &agency, 30, false).is_err(),
            "issue does not replace"
        );
        let mode = std::fs::metadata(&files.key)
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "keys are private");
        let leaf = &read_certificates(&files.cert).expect("certificate")[0];
        let peer = certificate_identity(leaf, "gov.example").expect("an identity");
        assert_eq!(peer.identity, agency);
        // It chains to the CA on disk.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(read_certificates(&dir.join(CA_CERT)).expect("ca")[0].clone())
            .expect("a root");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("a verifier");
        verifier
            .verify_client_cert(leaf, &[], rustls::pki_types::UnixTime::now())
            .expect("the agency's certificate chains to the CA");
        let before = peer.serial;
        issue(&dir, &agency, 30, true).expect("rotate");
        let rotated = &read_certificates(&files.cert).expect("certificate")[0];
        assert_ne!(serial_of(rotated), before, "a rotated certificate is new");
    }
}
