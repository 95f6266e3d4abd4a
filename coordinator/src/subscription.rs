//! DOMAIN: a durable subscription as the coordinator keeps it. The
//! directory, the control database and the bus's queues all speak of it.

use fedmesh_common::events::{Filter, QueueSpec};

/// A durable subscription: a named filter whose events the bus keeps until
/// a subscriber acknowledges them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRecord {
    /// Its name, unique in the mesh.
    pub name: String,
    /// Who created it (`agency/<id>` or `operator/<name>`): who may consume
    /// and delete it, besides operators.
    pub owner: String,
    /// The events it keeps.
    pub filter: Filter,
    /// One subscriber at a time, in order (else subscribers share events).
    pub strict_order: bool,
    /// When it was created, microseconds since the epoch.
    pub created_at_micros: i64,
    /// Delivered to this endpoint rather than to Consume streams.
    pub webhook: Option<WebhookTarget>,
}

/// Where notifiers POST a subscription's events, and how they sign them.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    /// The endpoint's URL.
    pub url: String,
    /// The Standard Webhooks signing secret (`whsec_` and base64).
    pub secret: String,
}

impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("url", &self.url)
            .field("secret", &"<hidden>")
            .finish()
    }
}

impl SubscriptionRecord {
    /// Its queue on the bus.
    pub fn queue_spec(&self) -> QueueSpec {
        QueueSpec {
            name: self.name.clone(),
            bindings: self.filter.binding_keys(),
            strict_order: self.strict_order,
            dead_letters: self.webhook.is_some(),
        }
    }
}
