//! Mutual TLS, identities from certificates, the authorization layer,
//! rate limits, rotation and revocation.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedmesh::dev::DevOptions;
use fedmesh_common::auth::{METHODS, Role, allowed};
use fedmesh_common::identity::Identity;
use fedmesh_common::tls::{CA_CERT, CertificateFiles, MeshTls, TlsSettings, read_certificates};
use fedmesh_proto::pb;
use fedmesh_tests::{Backend, TestMesh, forward_request, send_request, within};
use prost::Message as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::Code;

/// A mesh on mutual TLS with certificates under its data folder; every
/// component checks its files (and `deny_list`, if any) every second.
async fn mesh_on_tls(deny_list: Option<PathBuf>) -> TestMesh {
    TestMesh::start_configured(Backend::Sqlite, |options: &mut DevOptions| {
        options.certs = Some(options.data_dir.join("certs"));
        options.tune_tls = Some(Arc::new(move |settings: &mut TlsSettings| {
            settings.reload_secs = 1;
            settings.deny_list = deny_list.clone();
        }));
    })
    .await
}

#[tokio::test]
async fn a_mesh_on_mutual_tls_carries_messages_between_regions() {
    let mesh = mesh_on_tls(None).await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;
    mesh.gateway_knows("east", &["tax-office", "land-registry"])
        .await;
    let receipt = mesh
        .send("east", "tax-office", "land-registry", "over TLS", None)
        .await
        .expect("a relayed send over mutual TLS");
    let mut inbox = mesh.open_inbox("west", "land-registry", 8).await.unwrap();
    let delivery = inbox.next_delivery().await;
    assert_eq!(delivery.message.unwrap().message_id, receipt.message_id);

    // With TLS on, the identity header is ignored: the certificate says
    // who calls.
    let mut directory = mesh.directory_as(&Identity::Agency("tax-office".into()));
    let mut request = tonic::Request::new(pb::RegisterAgencyRequest {
        agency_id: "intruder".into(),
        region: "east".into(),
        display_name: String::new(),
        shard: String::new(),
    });
    request
        .metadata_mut()
        .insert("x-fedmesh-identity", "operator/root".parse().unwrap());
    let refused = directory.register_agency(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("agency/tax-office may not call fedmesh.v1.Directory/RegisterAgency"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_client_talks_only_to_the_server_it_expects() {
    let mesh = mesh_on_tls(None).await;
    let certs = mesh.certs().unwrap();
    let tls = MeshTls::load(
        &TlsSettings::from_folder(certs, &Identity::Operator("admin".into())),
        None,
    )
    .unwrap();
    let expecting = |server| {
        fedmesh_common::server::lazy_channel_with(&mesh.gateway_url("east"), tls.clone(), server)
            .unwrap()
    };
    // The east gateway's address given as the coordinator's.
    let mut impostor = pb::directory_client::DirectoryClient::new(expecting(
        fedmesh_common::tls::ExpectedServer::Is(Identity::Coordinator),
    ));
    let refused = impostor
        .get_agency(pb::GetAgencyRequest {
            agency_id: "tax-office".into(),
        })
        .await
        .unwrap_err();
    let chain = format!("{refused:?}");
    assert!(
        chain.contains("is gateway/east, not coordinator"),
        "{chain}"
    );
    // A server whose identity is revoked is refused too.
    let folder = tempfile::tempdir().unwrap();
    let deny = folder.path().join("deny");
    std::fs::write(&deny, "gateway/east\n").unwrap();
    let deny_list = fedmesh_common::auth::DenyList::load(deny).unwrap();
    let mut revoked = tonic_health::pb::health_client::HealthClient::new(
        fedmesh_common::server::lazy_channel_checked(
            &mesh.gateway_url("east"),
            tls.clone(),
            fedmesh_common::tls::ExpectedServer::Is(Identity::Gateway("east".into())),
            Some(deny_list),
        )
        .unwrap(),
    );
    let refused = revoked
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert!(
        format!("{refused:?}").contains("which is revoked"),
        "{refused:?}"
    );
    // The same address as a gateway's is fine.
    let mut health = tonic_health::pb::health_client::HealthClient::new(expecting(
        fedmesh_common::tls::ExpectedServer::Is(Identity::Gateway("east".into())),
    ));
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("the gateway it is");
}

/// Accepts any server: these tests are about what the server accepts.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client presenting `certificate` (PEM certificate and key), or none.
fn client_config(certificate: Option<&(String, String)>) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match certificate {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            use rustls::pki_types::pem::PemObject as _;
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

fn agency_params(agency: &str, trust_domain: &str) -> rcgen::CertificateParams {
    fedmesh::certs::leaf_params(&Identity::Agency(agency.into()), trust_domain, 30).unwrap()
}

fn self_signed(params: rcgen::CertificateParams) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = params.self_signed(&key).unwrap();
    (certificate.pem(), key.serialize_pem())
}

/// A certificate and its key, in PEM.
type Pem = (String, String);

/// How a refused certificate is refused.
#[derive(Debug)]
enum Refused {
    /// At the TLS handshake: no call reaches a service.
    Handshake,
    /// UNAUTHENTICATED, with a message saying this.
    Unauthenticated(&'static str),
}

#[tokio::test]
async fn client_certificates_that_prove_no_identity_of_the_mesh_are_refused() {
    let mesh = mesh_on_tls(None).await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "east").await;
    let certs = mesh.certs().unwrap().to_path_buf();
    let domain = fedmesh_common::tls::DEFAULT_TRUST_DOMAIN;
    let sign = |params| fedmesh::certs::sign_with_ca(&certs, params).unwrap();

    let another_ca = {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        (params.self_signed(&key).unwrap(), key)
    };
    let by_another_ca = {
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = agency_params("tax-office", domain)
            .signed_by(&key, &another_ca.0, &another_ca.1)
            .unwrap();
        (certificate.pem(), key.serialize_pem())
    };
    let expired = {
        let mut params = agency_params("tax-office", domain);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        sign(params)
    };
    let not_yet_valid = {
        let mut params = agency_params("tax-office", domain);
        params.not_before = rcgen::date_time_ymd(2090, 1, 1);
        params.not_after = rcgen::date_time_ymd(2091, 1, 1);
        sign(params)
    };
    let two_uri_sans = {
        let mut params = agency_params("tax-office", domain);
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://fedmesh.local/agency/land-registry"
                .try_into()
                .unwrap(),
        ));
        sign(params)
    };
    let ca_leaf = {
        let mut params = agency_params("tax-office", domain);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        sign(params)
    };
    let cn_only = {
        let mut params = agency_params("tax-office", domain);
        params.subject_alt_names.clear();
        sign(params)
    };
    let other_domain = sign(agency_params("tax-office", "other.example"));

    let cases: Vec<(&str, Option<Pem>, Refused)> = vec![
        ("no certificate", None, Refused::Handshake),
        (
            "self-signed",
            Some(self_signed(agency_params("tax-office", domain))),
            Refused::Handshake,
        ),
        ("another CA", Some(by_another_ca), Refused::Handshake),
        ("expired", Some(expired), Refused::Handshake),
        ("not yet valid", Some(not_yet_valid), Refused::Handshake),
        ("a CA as leaf", Some(ca_leaf), Refused::Handshake),
        (
            "two URI SANs",
            Some(two_uri_sans),
            Refused::Unauthenticated("2 URI SANs"),
        ),
        (
            "a common name only",
            Some(cn_only),
            Refused::Unauthenticated("no URI SAN"),
        ),
        (
            "another trust domain",
            Some(other_domain),
            Refused::Unauthenticated("trust domain \"other.example\""),
        ),
    ];
    for (what, certificate, expected) in cases {
        let channel = fedmesh_common::server::lazy_channel_with_config(
            &mesh.gateway_url("east"),
            client_config(certificate.as_ref()),
        )
        .unwrap();
        let mut exchange = pb::exchange_client::ExchangeClient::new(channel);
        let refused = within(
            what,
            exchange.send(send_request("tax-office", "land-registry", what, None)),
        )
        .await
        .expect_err(what);
        match expected {
            Refused::Handshake => assert!(
                refused.code() != Code::Ok && refused.code() != Code::PermissionDenied,
                "{what}: {refused:?}"
            ),
            Refused::Unauthenticated(text) => {
                assert_eq!(refused.code(), Code::Unauthenticated, "{what}: {refused:?}");
                assert!(refused.message().contains(text), "{what}: {refused:?}");
            }
        }
    }
    let inbox = mesh
        .exchange("east", "land-registry")
        .get_inbox(pb::GetInboxRequest {
            agency_id: "land-registry".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inbox.last_sequence, 0, "nothing was stored");
    // The mesh's own certificate of the agency is accepted.
    mesh.send("east", "tax-office", "land-registry", "proved", None)
        .await
        .expect("a certificate of the mesh");
}

/// Every method of every fedmesh service, as gRPC paths, with whether its
/// client and server stream.
fn service_methods() -> Vec<(String, bool, bool)> {
    let set = prost_types::FileDescriptorSet::decode(fedmesh_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut methods = Vec::new();
    for file in set.file {
        if !file.package().starts_with("fedmesh.") {
            continue;
        }
        for service in &file.service {
            for method in &service.method {
                methods.push((
                    format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    method.client_streaming(),
                    method.server_streaming(),
                ));
            }
        }
    }
    methods
}

#[test]
fn the_allow_list_names_every_method_and_only_methods_that_exist() {
    let methods: BTreeSet<String> = service_methods()
        .into_iter()
        .map(|(path, ..)| path)
        .collect();
    let listed: BTreeSet<String> = METHODS.iter().map(|(path, _)| path.to_string()).collect();
    assert_eq!(
        methods, listed,
        "every method of the services is in the allow-list (a new method must say who may call it)"
    );
    // What each role may do, as the design puts it.
    let may = |role, path: &str| allowed(role, path) == Some(true);
    for (path, _) in METHODS {
        if path.starts_with("/fedmesh.v1.Relay/") {
            assert!(
                may(Role::Gateway, path) && !may(Role::Agency, path),
                "{path}"
            );
        }
        if path.contains("Register") || path.contains("Deregister") || path.contains("ListAgencies")
        {
            assert!(
                Role::ALL
                    .iter()
                    .all(|role| may(*role, path) == (*role == Role::Operator)),
                "{path}: operators only"
            );
        }
    }
    assert!(!may(Role::Agency, "/fedmesh.v1.Directory/WatchTopology"));
    assert!(!may(Role::Operator, "/fedmesh.v1.Exchange/Send"));
    assert_eq!(
        allowed(Role::Operator, "/fedmesh.v1.Exchange/Unknown"),
        None
    );
}

/// Calls `path` on `channel` as whoever the channel's identity header says,
/// with an empty request; the status, if it failed.
async fn call_empty(
    channel: tonic::transport::Channel,
    identity: &Identity,
    path: &str,
    client_streaming: bool,
    server_streaming: bool,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|error| {
        fedmesh_common::error::to_status(&fedmesh_common::error::InvalidField::new(
            "channel",
            error.to_string(),
        ))
    })?;
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = http::uri::PathAndQuery::try_from(path).unwrap();
    fn with_identity<T>(identity: &Identity, mut request: tonic::Request<T>) -> tonic::Request<T> {
        request
            .metadata_mut()
            .insert("x-fedmesh-identity", identity.to_string().parse().unwrap());
        request.set_timeout(Duration::from_secs(10));
        request
    }
    match (client_streaming, server_streaming) {
        (false, false) => grpc
            .unary(
                with_identity(identity, tonic::Request::new(())),
                path,
                codec,
            )
            .await
            .map(drop),
        (false, true) => grpc
            .server_streaming(
                with_identity(identity, tonic::Request::new(())),
                path,
                codec,
            )
            .await
            .map(drop),
        (true, _) => grpc
            .streaming(
                with_identity(identity, tonic::Request::new(tokio_stream::empty::<()>())),
                path,
                codec,
            )
            .await
            .map(drop),
    }
}

#[tokio::test]
async fn every_role_reaches_exactly_the_methods_the_allow_list_gives_it() {
    let mesh = TestMesh::start().await;
    let identities = [
        Identity::Agency("tax-office".into()),
        Identity::Gateway("east".into()),
        Identity::Coordinator,
        Identity::Notifier,
        Identity::Operator("test".into()),
    ];
    for (path, client_streaming, server_streaming) in service_methods() {
        let url = if path.contains(".Directory/") {
            mesh.coordinator_url()
        } else if path.contains(".Notifications/") {
            mesh.notifier_url()
        } else {
            mesh.gateway_url("east")
        };
        for identity in &identities {
            let role = Role::of(identity);
            let channel = fedmesh_common::server::lazy_channel(&url).unwrap();
            let outcome =
                call_empty(channel, identity, &path, client_streaming, server_streaming).await;
            let refused_by_layer = matches!(&outcome, Err(status)
                if status.code() == Code::PermissionDenied && status.message().contains("may not call"));
            assert_eq!(
                refused_by_layer,
                allowed(role, &path) != Some(true),
                "{identity} calling {path}: {outcome:?}"
            );
        }
    }
}

#[tokio::test]
async fn an_agency_acts_only_as_itself_and_a_gateway_relays_only_for_its_region() {
    let mesh = TestMesh::start().await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "east").await;
    mesh.register("city-hall", "central").await;
    mesh.gateway_knows("central", &["tax-office", "city-hall"])
        .await;

    let as_other = mesh
        .send("east", "land-registry", "city-hall", "forged", None)
        .await;
    // The sender is tax-office's identity, the request says land-registry.
    let forged = mesh
        .exchange("east", "tax-office")
        .send(send_request("land-registry", "city-hall", "forged", None))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::PermissionDenied, "{forged:?}");
    assert!(as_other.is_ok(), "land-registry may send as itself");

    let other_inbox = mesh
        .exchange("east", "tax-office")
        .get_inbox(pb::GetInboxRequest {
            agency_id: "land-registry".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        other_inbox.code(),
        Code::PermissionDenied,
        "{other_inbox:?}"
    );
    // Acking another agency's delivery: a stream acks only its own inbox,
    // and only what it delivered.
    let pending = |agency: &'static str| {
        let mut exchange = mesh.exchange("east", agency);
        async move {
            exchange
                .get_inbox(pb::GetInboxRequest {
                    agency_id: agency.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .unacknowledged
        }
    };
    mesh.send(
        "east",
        "tax-office",
        "land-registry",
        "for the registry",
        None,
    )
    .await
    .expect("a send");
    assert_eq!(pending("land-registry").await, 1);
    let own = mesh.open_inbox("east", "tax-office", 8).await.unwrap();
    own.ack(&[1]).await;
    own.close().await;
    assert_eq!(
        pending("land-registry").await,
        1,
        "tax-office's ack of sequence 1 acked nothing of land-registry's"
    );

    // The west gateway relays an east sender's message to central.
    let (channel, _) = mesh.channel_as(
        &mesh.gateway_url("central"),
        &Identity::Gateway("west".into()),
    );
    let mut relay = pb::relay_client::RelayClient::with_interceptor(
        channel,
        fedmesh_common::identity::AttachIdentity::new(&Identity::Gateway("west".into())),
    );
    let results = relay
        .forward_batch(pb::ForwardBatchRequest {
            messages: vec![forward_request(
                "tax-office",
                "city-hall",
                "tax.notice",
                "west",
            )],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let Some(pb::forward_result::Result::Error(error)) = &results[0].result else {
        panic!("the relay was stored: {results:?}");
    };
    assert_eq!(error.code, Code::PermissionDenied as i32, "{error:?}");
    assert!(error.message.contains("homed in east"), "{error:?}");
    let city_hall = mesh
        .exchange("central", "city-hall")
        .get_inbox(pb::GetInboxRequest {
            agency_id: "city-hall".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        city_hall.last_sequence, 1,
        "only land-registry's own send is stored"
    );
}

#[tokio::test]
async fn an_agency_sees_of_another_only_its_home_region() {
    let mesh = TestMesh::start().await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;
    let mut directory = mesh.directory_as(&Identity::Agency("tax-office".into()));
    let get = |agency_id: &str| pb::GetAgencyRequest {
        agency_id: agency_id.into(),
    };
    let own = directory.get_agency(get("tax-office")).await.unwrap();
    let own = own.into_inner().agency.unwrap();
    assert_eq!(own.shard, "east-1", "its own entry whole");
    let other = directory.get_agency(get("land-registry")).await.unwrap();
    let other = other.into_inner().agency.unwrap();
    assert_eq!(
        other,
        pb::Agency {
            agency_id: "land-registry".into(),
            region: "west".into(),
            ..pb::Agency::default()
        }
    );
    let listed = directory
        .list_agencies(pb::ListAgenciesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(listed.code(), Code::PermissionDenied, "{listed:?}");
}

#[test]
fn a_production_configuration_refuses_the_development_ca() {
    let folder = tempfile::tempdir().unwrap();
    let gateway = Identity::Gateway("east".into());
    fedmesh::certs::init(
        folder.path(),
        "fedmesh.local",
        std::slice::from_ref(&gateway),
        30,
    )
    .unwrap();
    let mut settings = TlsSettings::from_folder(folder.path(), &gateway);
    assert!(
        MeshTls::load(&settings, Some(&gateway)).is_ok(),
        "allowed for trying out"
    );
    settings.allow_dev_ca = false;
    let error = MeshTls::load(&settings, Some(&gateway)).unwrap_err();
    assert!(error.to_string().contains("development CA"), "{error}");
    settings.allow_dev_ca = true;
    let error = MeshTls::load(&settings, Some(&Identity::Gateway("west".into()))).unwrap_err();
    assert!(
        error.to_string().contains("certificate of gateway/east"),
        "{error}"
    );
    // An expired certificate is refused with a line that says so.
    let mut params = fedmesh::certs::leaf_params(&gateway, "fedmesh.local", 30).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let (cert, key) = fedmesh::certs::sign_with_ca(folder.path(), params).unwrap();
    let files = CertificateFiles::of(folder.path(), &gateway);
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    let error = MeshTls::load(&settings, Some(&gateway)).unwrap_err();
    assert!(error.to_string().contains("expired"), "{error}");
}

#[tokio::test]
async fn the_walkthrough_runs_on_mutual_tls_from_the_command_line() {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let mesh = mesh_on_tls(None).await;
    let certs = mesh.certs().unwrap().display().to_string();
    let coordinator = mesh.coordinator_url();
    let run = async |argv: Vec<&str>| -> anyhow::Result<String> {
        let matches = fedmesh::cli::Cli::command().try_get_matches_from(argv)?;
        let cli = fedmesh::cli::Cli::from_arg_matches(&matches)?;
        let mut out = Vec::new();
        fedmesh::cli::run(cli, &matches, &mut out).await?;
        Ok(String::from_utf8(out)?)
    };
    let fedmesh = async |args: &[&str]| {
        let mut argv = vec!["fedmesh"];
        argv.extend_from_slice(args);
        argv.extend(["--coordinator", &coordinator, "--certs", &certs]);
        run(argv).await
    };
    for agency in ["agency/tax-office", "agency/land-registry"] {
        run(vec!["fedmesh", "certs", "issue", &certs, agency])
            .await
            .unwrap();
    }
    fedmesh(&["agency", "register", "tax-office", "--region", "east"])
        .await
        .unwrap();
    fedmesh(&["agency", "register", "land-registry", "--region", "west"])
        .await
        .unwrap();
    mesh.gateway_knows("east", &["land-registry"]).await;
    let sent = fedmesh(&[
        "send",
        "--as",
        "tax-office",
        "--to",
        "land-registry",
        "--kind",
        "tax.return.filed",
        "--body",
        "return 2026 filed",
    ])
    .await
    .unwrap();
    assert!(sent.starts_with("STORED"), "{sent}");
    let read = fedmesh(&["inbox", "--as", "land-registry", "--ack"])
        .await
        .unwrap();
    assert!(read.contains("return 2026 filed"), "{read}");
    fedmesh(&["agency", "register", "city-hall", "--region", "east"])
        .await
        .unwrap();
    let error = fedmesh(&[
        "send",
        "--as",
        "city-hall",
        "--to",
        "tax-office",
        "--kind",
        "k",
        "--body",
        "b",
    ])
    .await
    .unwrap_err();
    assert!(
        format!("{error:#}").contains("fedmesh certs issue"),
        "an agency without a certificate is told how to get one: {error:#}"
    );
}

#[tokio::test]
async fn an_agency_over_its_rate_limit_is_told_when_to_retry() {
    let mesh = TestMesh::start_tuned(
        Backend::Sqlite,
        Some(Arc::new(|config: &mut fedmesh_gateway::GatewayConfig| {
            config.rate_limits.rate_limit = 1;
            config.rate_limits.rate_burst = Some(1);
        })),
    )
    .await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "east").await;
    mesh.send("east", "tax-office", "land-registry", "first", None)
        .await
        .expect("within the burst");
    let refused = mesh
        .send("east", "tax-office", "land-registry", "second", None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("rate limit of 1 calls per second"),
        "{refused:?}"
    );
    use tonic_types::StatusExt as _;
    let retry = refused.get_details_retry_info().expect("retry information");
    assert!(
        retry.retry_delay.is_some_and(|delay| !delay.is_zero()),
        "{retry:?}"
    );
    // Other agencies have buckets of their own.
    mesh.send("east", "land-registry", "tax-office", "mine", None)
        .await
        .expect("another agency is not slowed");
}

/// The serial of the certificate the server at `url` presents to a new
/// connection.
async fn served_serial(url: &str, certs: &Path) -> String {
    let tls = MeshTls::load(
        &TlsSettings::from_folder(certs, &Identity::Operator("admin".into())),
        None,
    )
    .unwrap()
    .unwrap();
    let address = url.trim_start_matches("https://");
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls.client_config())
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
        .unwrap();
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    fedmesh_common::tls::certificate_identity(&leaf, fedmesh_common::tls::DEFAULT_TRUST_DOMAIN)
        .unwrap()
        .serial
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let mesh = mesh_on_tls(None).await;
    let certs = mesh.certs().unwrap().to_path_buf();
    let url = mesh.gateway_url("east");
    let before = served_serial(&url, &certs).await;
    let gateway = Identity::Gateway("east".into());
    fedmesh::certs::issue(&certs, &gateway, 30, true).unwrap();
    let rotated = read_certificates(&CertificateFiles::of(&certs, &gateway).cert).unwrap();
    let after = fedmesh_common::tls::certificate_identity(
        &rotated[0],
        fedmesh_common::tls::DEFAULT_TRUST_DOMAIN,
    )
    .unwrap()
    .serial;
    assert_ne!(before, after);
    within("the gateway to serve its new certificate", async {
        while served_serial(&url, &certs).await != after {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // The rotation is in the audit log, in the gateway's region's chain.
    let rotated = within("the rotation in the audit log", async {
        loop {
            let entries = mesh
                .directory()
                .list_audit(pb::ListAuditRequest {
                    chain: "east".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .entries;
            if let Some(entry) = entries
                .into_iter()
                .find(|entry| entry.action == "certificate-rotated")
            {
                return entry;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(rotated.actor, "gateway/east");
    assert!(rotated.detail.contains(&after), "{rotated:?}");
    // The mesh goes on working: the other components trust it.
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;
    mesh.gateway_knows("east", &["land-registry"]).await;
    mesh.send(
        "east",
        "tax-office",
        "land-registry",
        "after rotation",
        None,
    )
    .await
    .expect("a send through the rotated gateway");
    assert!(certs.join(CA_CERT).exists());
}

#[tokio::test]
async fn revoking_an_identity_ends_its_open_streams_and_refuses_its_calls() {
    let folder = tempfile::tempdir().unwrap();
    let deny_list = folder.path().join("deny");
    std::fs::write(&deny_list, "# nobody yet\n").unwrap();
    let mesh = mesh_on_tls(Some(deny_list.clone())).await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "east").await;
    let mut inbox = mesh.open_inbox("east", "land-registry", 8).await.unwrap();
    std::fs::write(&deny_list, "agency/land-registry # key lost\n").unwrap();
    let (_, ended) = within("the revoked stream to end", inbox.until_end()).await;
    let ended = ended.expect("an ending status");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("revoked"), "{ended:?}");
    let refused = mesh
        .send(
            "east",
            "land-registry",
            "tax-office",
            "after revocation",
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    mesh.send("east", "tax-office", "land-registry", "others go on", None)
        .await
        .expect("other agencies are not revoked");
}
