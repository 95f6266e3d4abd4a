//! Who the caller is.
//!
//! Identities are the paths of SPIFFE ids: `agency/<id>`, `gateway/<region>`,
//! `coordinator`, `notifier`, `operator/<name>`. Every server learns the
//! caller's identity in one place, the authorization layer of
//! [`crate::auth`] (from the verified client certificate, see
//! [`crate::tls`], or in dev mode from the [`IDENTITY_HEADER`] of a loopback
//! peer), and handlers find it in the request extensions through
//! [`caller`].

use std::fmt;

use tonic::metadata::MetadataValue;

/// Metadata header that carries the caller's identity in dev mode.
pub const IDENTITY_HEADER: &str = "x-fedmesh-identity";

/// The authenticated identity of a caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An agency, acting for itself.
    Agency(String),
    /// A gateway of a region.
    Gateway(String),
    /// The coordinator.
    Coordinator,
    /// A notifier replica.
    Notifier,
    /// A human or tool operating the mesh.
    Operator(String),
}

impl Identity {
    /// Parses `agency/<id>`, `gateway/<region>`, `coordinator`, `notifier` or
    /// `operator/<name>`.
    pub fn parse(text: &str) -> Option<Identity> {
        let identity = match text.split_once('/') {
            Some(("agency", id)) => Identity::Agency(id.to_string()),
            Some(("gateway", region)) => Identity::Gateway(region.to_string()),
            Some(("operator", name)) => Identity::Operator(name.to_string()),
            None if text == "coordinator" => Identity::Coordinator,
            None if text == "notifier" => Identity::Notifier,
            _ => return None,
        };
        match &identity {
            Identity::Agency(name) | Identity::Gateway(name) | Identity::Operator(name)
                if crate::validate::agency_id("identity", name).is_err() =>
            {
                None
            }
            _ => Some(identity),
        }
    }

    /// Whether this identity is the agency `agency_id`.
    pub fn is_agency(&self, agency_id: &str) -> bool {
        matches!(self, Identity::Agency(id) if id == agency_id)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Agency(id) => write!(formatter, "agency/{id}"),
            Identity::Gateway(region) => write!(formatter, "gateway/{region}"),
            Identity::Coordinator => formatter.write_str("coordinator"),
            Identity::Notifier => formatter.write_str("notifier"),
            Identity::Operator(name) => write!(formatter, "operator/{name}"),
        }
    }
}

/// Why a caller could not be identified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The component has no means of authentication configured.
    #[error("this component has no authentication configured")]
    NotConfigured,
    /// Dev identity headers come only from loopback.
    #[error("identity headers are accepted only from loopback in dev mode")]
    NotLoopback,
    /// The header is missing.
    #[error("missing {IDENTITY_HEADER} header (e.g. agency/<id> or operator/<name>)")]
    Missing,
    /// The header is not an identity.
    #[error("{0:?} is not agency/<id>, gateway/<region>, coordinator, notifier or operator/<name>")]
    Malformed(String),
    /// The connection did not present a verified certificate.
    #[error("no client certificate was presented on this connection")]
    NoCertificate,
    /// The certificate cannot be read.
    #[error("the client certificate cannot be read: {0}")]
    BadCertificate(String),
    /// A CA certificate presented as a leaf.
    #[error(
        "the client certificate is a CA certificate; present a leaf certificate of your identity"
    )]
    CaCertificate,
    /// No URI SAN names the holder.
    #[error(
        "the client certificate has no URI SAN; a fedmesh identity is one URI SAN spiffe://<trust-domain>/<role>/<id>"
    )]
    NoUriSan,
    /// More than one URI SAN: which identity is meant is unclear.
    #[error("the client certificate has {0} URI SANs; a fedmesh identity is exactly one")]
    SeveralUriSans(usize),
    /// The URI SAN is not a SPIFFE id.
    #[error("the certificate's URI SAN {0:?} is not spiffe://<trust-domain>/<role>/<id>")]
    NotSpiffe(String),
    /// The identity belongs to another trust domain.
    #[error("the certificate is of trust domain {found:?}; this mesh trusts {expected:?}")]
    ForeignTrustDomain {
        /// Its trust domain.
        found: String,
        /// This mesh's.
        expected: String,
    },
    /// A server presented the certificate of a client role.
    #[error("the server presented the certificate of {0}, which serves nothing")]
    NotAServer(String),
    /// The certificate expired while its connection was open.
    #[error("the certificate of {0} has expired; reconnect with a valid one")]
    Expired(String),
    /// The identity or certificate is on the deny list.
    #[error("{0} is revoked on this mesh")]
    Revoked(String),
    /// The request passed no identity check (a server without the layer).
    #[error("caller identity unknown")]
    Unknown,
}

impl crate::error::ServiceError for IdentityError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Unauthenticated
    }
}

impl From<IdentityError> for tonic::Status {
    fn from(error: IdentityError) -> Self {
        crate::error::to_status(&error)
    }
}

/// The identity the authorization layer ([`crate::auth`]) stored for
/// this request.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Identity, IdentityError> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or(IdentityError::Unknown)
}

/// Client side: attaches an identity header to every outgoing call, for
/// servers in dev mode (servers on TLS ignore it: the certificate says who
/// calls).
#[derive(Debug, Clone)]
pub struct AttachIdentity {
    value: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl AttachIdentity {
    /// Attaches `identity` to each request.
    pub fn new(identity: &Identity) -> Self {
        let value = MetadataValue::try_from(identity.to_string())
            .unwrap_or_else(|_| MetadataValue::from_static("invalid"));
        AttachIdentity { value: Some(value) }
    }

    /// Attaches nothing: the connection's certificate says who calls.
    pub fn none() -> Self {
        AttachIdentity { value: None }
    }
}

impl tonic::service::Interceptor for AttachIdentity {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.value {
            request
                .metadata_mut()
                .insert(IDENTITY_HEADER, value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip() {
        for text in [
            "agency/tax-office",
            "gateway/east",
            "coordinator",
            "notifier",
            "operator/alice",
        ] {
            let identity = Identity::parse(text).expect(text);
            assert_eq!(identity.to_string(), text);
        }
        for bad in ["", "agency/", "agency/Bad", "root", "gateway/a b"] {
            assert_eq!(Identity::parse(bad), None, "{bad}");
        }
    }
}
