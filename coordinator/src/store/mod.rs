//! STORAGE: the control database behind a trait, so the same directory logic
//! runs on SQLite (dev mesh) and PostgreSQL (deployments).
//!
//! Every change to the directory writes its event to the outbox in the same
//! transaction.

mod sqlite;

pub use sqlite::SqliteDirectoryStore;

use fedmesh_common::events::Event;

use crate::directory::AgencyRecord;
use crate::error::StoreError;

/// The control database.
#[async_trait::async_trait]
pub trait DirectoryStore: Send + Sync + 'static {
    /// Inserts `agency` and its event; [`StoreError::Conflict`] if the id is
    /// taken (then nothing is written).
    async fn insert_agency(&self, agency: &AgencyRecord, event: Event) -> Result<(), StoreError>;
    /// Deletes an agency and writes its event; false if it did not exist.
    async fn delete_agency(&self, agency_id: &str, event: Event) -> Result<bool, StoreError>;
    /// All agencies, for the topology.
    async fn all_agencies(&self) -> Result<Vec<AgencyRecord>, StoreError>;
}

#[cfg(test)]
mod tests;
