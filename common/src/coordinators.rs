//! TRANSPORT (outbound): the coordinator replicas a gateway or notifier
//! talks to, as one gRPC service that clients are built on.
//!
//! The replicas are those DNS names (`_fedmesh._tcp.coordinator.DOMAIN`, or
//! the A/AAAA records of `coordinator.DOMAIN`, when discovery is on), then
//! those the settings list (`--coordinator URL,URL,...`), each once. Calls
//! go to the replica in use; a call that gets no answer from it (it cannot
//! be connected to, the connection broke) or is answered `UNAVAILABLE` (it
//! is shutting down) moves the next calls to the next replica of the list
//! as it is then. One HTTP/2 channel per replica is opened lazily and kept.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use fedmesh_proto::pb;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::discovery::Discovery;
use crate::identity::{AttachIdentity, Identity};
use crate::server::Security;
use crate::tls::ExpectedServer;

/// A Directory client of the coordinator replicas.
pub type CoordinatorClient =
    pb::directory_client::DirectoryClient<InterceptedService<Coordinators, AttachIdentity>>;

/// A Relay client of the coordinator replicas.
pub type CoordinatorRelayClient =
    pb::relay_client::RelayClient<InterceptedService<Coordinators, AttachIdentity>>;

/// The coordinator replicas; cheap to clone (clones share the replica in
/// use and the channels).
#[derive(Clone)]
pub struct Coordinators {
    inner: Arc<Inner>,
}

struct Inner {
    configured: Vec<String>,
    discovery: Discovery,
    security: Security,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The replica in use; None until the first call.
    current: Option<String>,
    channels: HashMap<String, Channel>,
}

impl fmt::Debug for Coordinators {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Coordinators")
            .field("configured", &self.inner.configured)
            .field("discovery", &self.inner.discovery)
            .finish()
    }
}

/// Why the coordinators' list cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("coordinator URL {url:?} is not usable: {source}")]
pub struct CoordinatorUrlError {
    url: String,
    #[source]
    source: tonic::transport::Error,
}

impl Coordinators {
    /// The replicas at `configured` (comma separated) and those
    /// `discovery` finds, reached as `security` says.
    pub fn new(
        configured: &str,
        discovery: Discovery,
        security: Security,
    ) -> Result<Self, CoordinatorUrlError> {
        let mut urls: Vec<String> = Vec::new();
        for url in configured.split(',').map(str::trim) {
            if url.is_empty() || urls.iter().any(|known| known == url) {
                continue;
            }
            tonic::transport::Endpoint::from_shared(url.to_string()).map_err(|source| {
                CoordinatorUrlError {
                    url: url.to_string(),
                    source,
                }
            })?;
            urls.push(url.to_string());
        }
        Ok(Coordinators {
            inner: Arc::new(Inner {
                configured: urls,
                discovery,
                security,
                state: Mutex::default(),
            }),
        })
    }

    /// Waits for DNS's first answer (at most a few seconds), so that the
    /// first call goes to a replica DNS names.
    pub async fn settle(&self) {
        let _ = self.inner.discovery.coordinators().await;
    }

    /// The replicas as known now: DNS's, then the settings', each once.
    pub fn urls(&self) -> Vec<String> {
        merged(
            &self.inner.discovery.coordinators_now(),
            &self.inner.configured,
        )
    }

    /// A Directory client of the replicas.
    pub fn directory(&self) -> CoordinatorClient {
        pb::directory_client::DirectoryClient::with_interceptor(
            self.clone(),
            self.inner.security.attach(),
        )
    }

    /// A Relay client of the replicas.
    pub fn relay(&self) -> CoordinatorRelayClient {
        pb::relay_client::RelayClient::with_interceptor(self.clone(), self.inner.security.attach())
    }

    /// The replica in use and its channel.
    fn current(&self) -> Result<(String, Channel), tonic::transport::Error> {
        let urls = self.urls();
        let mut state = self.state();
        let url = match &state.current {
            Some(current) if urls.contains(current) => current.clone(),
            _ => {
                let first = urls.first().cloned().unwrap_or_default();
                state.current = Some(first.clone());
                first
            }
        };
        if let Some(channel) = state.channels.get(&url) {
            return Ok((url, channel.clone()));
        }
        let channel = self
            .inner
            .security
            .channel(&url, ExpectedServer::Is(Identity::Coordinator))?;
        state.channels.insert(url.clone(), channel.clone());
        Ok((url, channel))
    }

    /// Moves the next calls to the replica after the one in use.
    fn next(&self) {
        let urls = self.urls();
        let mut state = self.state();
        let position = state
            .current
            .as_ref()
            .and_then(|current| urls.iter().position(|url| url == current));
        let next = match position {
            Some(index) => urls.get((index + 1) % urls.len()),
            None => urls.first(),
        };
        if let Some(next) = next
            && state.current.as_ref() != Some(next)
        {
            tracing::info!(coordinator = %next, "moving to another coordinator replica");
            state.current = Some(next.clone());
        }
    }

    /// After a call to `url` got no answer: the next calls go to the next
    /// replica, unless another call already moved them.
    fn failed(&self, url: &str) {
        if self.state().current.as_deref() == Some(url) {
            self.next();
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether `response` answers the call `UNAVAILABLE` at once (a
/// trailers-only answer, whose status is in its headers).
fn unavailable(response: &http::Response<Body>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|status| status.as_bytes() == b"14")
}

/// `dns` then `configured`, each URL once.
fn merged(dns: &[String], configured: &[String]) -> Vec<String> {
    let mut urls: Vec<String> = Vec::with_capacity(dns.len() + configured.len());
    for url in dns.iter().chain(configured) {
        if !urls.contains(url) {
            urls.push(url.clone());
        }
    }
    urls
}

impl tower::Service<http::Request<Body>> for Coordinators {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<http::Response<Body>, tonic::transport::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The replica's channel is made ready in the call, once chosen.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let coordinators = self.clone();
        Box::pin(async move {
            let (url, mut channel) = coordinators.current()?;
            std::future::poll_fn(|context| tower::Service::poll_ready(&mut channel, context))
                .await
                .inspect_err(|_| coordinators.failed(&url))?;
            let response = tower::Service::call(&mut channel, request)
                .await
                .inspect_err(|_| coordinators.failed(&url))?;
            if unavailable(&response) {
                coordinators.failed(&url);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_security(identity: Identity) -> Security {
        Security::establish(
            identity,
            &crate::tls::TlsSettings::default(),
            &crate::auth::RateLimitSettings::unlimited(),
            true,
            None,
            &tokio_util::sync::CancellationToken::new(),
        )
        .expect("dev security")
    }

    fn urls(urls: &[&str]) -> Vec<String> {
        urls.iter().map(|url| url.to_string()).collect()
    }

    #[test]
    fn dns_names_come_first_then_the_settings_each_once() {
        assert_eq!(
            merged(
                &urls(&["http://10.0.0.1:50051", "http://c:1"]),
                &urls(&["http://c:1", "http://d:1"])
            ),
            urls(&["http://10.0.0.1:50051", "http://c:1", "http://d:1"])
        );
        assert_eq!(merged(&[], &urls(&["http://d:1"])), urls(&["http://d:1"]));
    }

    #[tokio::test]
    async fn a_call_that_gets_no_answer_moves_the_next_to_the_next_replica() {
        let security = dev_security(Identity::Gateway("east".into()));
        let coordinators = Coordinators::new(
            "http://127.0.0.1:1, http://127.0.0.1:2,http://127.0.0.1:1",
            Discovery::default(),
            security,
        )
        .expect("usable URLs");
        assert_eq!(
            coordinators.urls(),
            urls(&["http://127.0.0.1:1", "http://127.0.0.1:2"])
        );
        let in_use = |coordinators: &Coordinators| coordinators.current().expect("a channel").0;
        assert_eq!(in_use(&coordinators), "http://127.0.0.1:1");
        // Nothing listens on port 1: the call fails on the way.
        let answer = coordinators
            .directory()
            .get_agency(pb::GetAgencyRequest::default())
            .await;
        assert!(answer.is_err());
        assert_eq!(in_use(&coordinators), "http://127.0.0.1:2");
        coordinators.next();
        assert_eq!(
            in_use(&coordinators),
            "http://127.0.0.1:1",
            "round the list"
        );
        let security = dev_security(Identity::Notifier);
        assert!(Coordinators::new("not a url", Discovery::default(), security).is_err());
    }
}
