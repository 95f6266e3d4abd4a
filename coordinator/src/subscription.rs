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
}

impl SubscriptionRecord {
    /// Its queue on the bus.
    pub fn queue_spec(&self) -> QueueSpec {
        QueueSpec {
            name: self.name.clone(),
            bindings: self.filter.binding_keys(),
            strict_order: self.strict_order,
        }
    }
}
