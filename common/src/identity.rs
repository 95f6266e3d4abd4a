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

impl tonic::service::Interceptor for IdentityInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        match self.mode {
            IdentityMode::Refuse => Err(tonic::Status::unauthenticated(
                "this component has no authentication configured",
            )),
            IdentityMode::DevHeader => {
                let from_loopback = request
                    .remote_addr()
                    .is_some_and(|address| address.ip().is_loopback());
                if !from_loopback {
                    return Err(tonic::Status::unauthenticated(
                        "identity headers are accepted only from loopback in dev mode",
                    ));
                }
                let header = request
                    .metadata()
                    .get(IDENTITY_HEADER)
                    .ok_or_else(|| {
                        tonic::Status::unauthenticated(format!(
                            "missing {IDENTITY_HEADER} header (e.g. agency/<id> or operator/<name>)"
                        ))
                    })?
                    .to_str()
                    .map_err(|_| {
                        tonic::Status::unauthenticated(format!("{IDENTITY_HEADER} is not ASCII"))
                    })?;
                let identity = Identity::parse(header).ok_or_else(|| {
                    tonic::Status::unauthenticated(format!(
                        "{IDENTITY_HEADER} {header:?} is not agency/<id>, gateway/<region>, coordinator, notifier or operator/<name>"
                    ))
                })?;
                request.extensions_mut().insert(identity);
                Ok(request)
            }
        }
    }
}

/// The identity [`IdentityInterceptor`] stored for this request.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Identity, tonic::Status> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| tonic::Status::unauthenticated("caller identity unknown"))
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
