//! Who the caller is.
//!
//! Identities are SPIFFE-style paths: `agency/<id>`, `gateway/<region>`,
//! `coordinator`, `notifier`, `operator/<name>`. Every server reads the
//! caller's identity in one place, [`IdentityInterceptor`], and handlers find
//! it in the request extensions through [`caller`].
//!
//! Until mutual TLS is in place the identity travels in the
//! [`IDENTITY_HEADER`] metadata header. That is accepted only when the
//! component runs in dev mode and the peer is on loopback; otherwise the call
//! is refused with UNAUTHENTICATED.

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

/// How a server learns who its callers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMode {
    /// Dev mode: trust the [`IDENTITY_HEADER`] from loopback peers.
    DevHeader,
    /// No means of authentication is configured: every call is refused.
    Refuse,
}

impl IdentityMode {
    /// The mode a role's `dev_identity` setting asks for.
    pub fn from_dev_identity(dev_identity: bool) -> Self {
        if dev_identity {
            IdentityMode::DevHeader
        } else {
            IdentityMode::Refuse
        }
    }
}

/// Reads the caller's identity and stores it in the request extensions.
#[derive(Debug, Clone, Copy)]
pub struct IdentityInterceptor {
    mode: IdentityMode,
}

impl IdentityInterceptor {
    /// An interceptor for the given mode.
    pub fn new(mode: IdentityMode) -> Self {
        IdentityInterceptor { mode }
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
    #[error(
        "{IDENTITY_HEADER} {0:?} is not agency/<id>, gateway/<region>, coordinator, notifier or operator/<name>"
    )]
    Malformed(String),
    /// The request passed no identity check (a server without the interceptor).
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

impl IdentityInterceptor {
    fn identify<T>(&self, request: &tonic::Request<T>) -> Result<Identity, IdentityError> {
        match self.mode {
            IdentityMode::Refuse => Err(IdentityError::NotConfigured),
            IdentityMode::DevHeader => {
                let from_loopback = request
                    .remote_addr()
                    .is_some_and(|address| address.ip().is_loopback());
                if !from_loopback {
                    return Err(IdentityError::NotLoopback);
                }
                let header = request
                    .metadata()
                    .get(IDENTITY_HEADER)
                    .ok_or(IdentityError::Missing)?;
                let text = header.to_str().map_err(|_| {
                    IdentityError::Malformed(
                        String::from_utf8_lossy(header.as_bytes()).into_owned(),
                    )
                })?;
                Identity::parse(text).ok_or_else(|| IdentityError::Malformed(text.to_string()))
            }
        }
    }
}

impl tonic::service::Interceptor for IdentityInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let identity = self.identify(&request)?;
        request.extensions_mut().insert(identity);
        Ok(request)
    }
}

/// The identity [`IdentityInterceptor`] stored for this request.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Identity, IdentityError> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or(IdentityError::Unknown)
}

/// Client side: attaches an identity to every outgoing call (dev mode).
#[derive(Debug, Clone)]
pub struct AttachIdentity {
    value: MetadataValue<tonic::metadata::Ascii>,
}

impl AttachIdentity {
    /// Attaches `identity` to each request.
    pub fn new(identity: &Identity) -> Self {
        let value = MetadataValue::try_from(identity.to_string())
            .unwrap_or_else(|_| MetadataValue::from_static("invalid"));
        AttachIdentity { value }
    }
}

impl tonic::service::Interceptor for AttachIdentity {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(IDENTITY_HEADER, self.value.clone());
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
