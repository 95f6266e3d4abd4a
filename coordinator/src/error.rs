//! Errors of the coordinator's services and how callers see them.

use fedmesh_common::error::{ErrorKind, InvalidField, ServiceError};
pub use fedmesh_common::store::StoreError;

/// Everything a Directory call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// A request field is malformed.
    #[error(transparent)]
    InvalidField(#[from] InvalidField),
    /// The agency is unknown.
    #[error("agency {0:?} is not registered")]
    AgencyNotFound(String),
    /// The region is unknown.
    #[error("region {region:?} does not exist; known regions: {known}")]
    RegionNotFound {
        /// The region asked for.
        region: String,
        /// The regions that exist, comma separated.
        known: String,
    },
    /// The agency id is taken.
    #[error("agency {0:?} is already registered")]
    AgencyExists(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The region exists already.
    #[error("region {0:?} exists already")]
    RegionExists(String),
    /// The shard name is taken.
    #[error("shard {0:?} exists already")]
    ShardExists(String),
    /// No shard has the name.
    #[error("shard {0:?} does not exist; `fedmesh shard list` lists them")]
    ShardNotFound(String),
    /// What still holds agencies cannot be removed.
    #[error("{what} still holds {count} agencies: deregister or move them first")]
    HoldsAgencies {
        /// The region or shard.
        what: String,
        /// How many agencies.
        count: usize,
    },
    /// No shard of the region takes new agencies.
    #[error("{0}; add a shard (fedmesh shard add) or raise a capacity")]
    NoShardFor(String),
    /// A gateway's answer to a relayed message, passed on.
    #[error("{message}")]
    Relayed {
        /// Its kind.
        kind: ErrorKind,
        /// Its text.
        message: String,
    },
    /// No grant has the id.
    #[error("no access grant has id {0:?}; `fedmesh access list` lists them")]
    GrantNotFound(String),
    /// The subscription is unknown.
    #[error("subscription {0:?} does not exist")]
    SubscriptionNotFound(String),
    /// The subscription name is taken.
    #[error("subscription {0:?} already exists")]
    SubscriptionExists(String),
    /// Durable subscriptions need the event bus, which this coordinator has not.
    #[error("this coordinator has no event bus (--amqp), so it keeps no durable subscriptions")]
    NoBus,
    /// Only webhook subscriptions have dead letters.
    #[error(
        "subscription {0:?} is delivered to streams, which acknowledge what they take: it has no dead letters (only webhook subscriptions do)"
    )]
    NoDeadLetters(String),
    /// The bus did not take the change (logged where it happened).
    #[error("the event bus did not answer; {0}; retry")]
    BusUnavailable(&'static str),
    /// The coordinator is stopping.
    #[error("coordinator shutting down; reconnect (to another coordinator, if there is one)")]
    ShuttingDown,
    /// No move has the id.
    #[error("no move has id {0:?}")]
    MoveNotFound(String),
    /// The move cannot be made or changed as asked.
    #[error("{0}")]
    CannotMove(String),
    /// The control database failed.
    #[error("control database: {0}")]
    Store(#[from] StoreError),
}

impl ServiceError for DirectoryError {
    fn kind(&self) -> ErrorKind {
        match self {
            DirectoryError::InvalidField(_) => ErrorKind::InvalidArgument,
            DirectoryError::AgencyNotFound(_) | DirectoryError::RegionNotFound { .. } => {
                ErrorKind::NotFound
            }
            DirectoryError::AgencyExists(_) | DirectoryError::SubscriptionExists(_) => {
                ErrorKind::AlreadyExists
            }
            DirectoryError::Relayed { kind, .. } => *kind,
            DirectoryError::RegionExists(_) | DirectoryError::ShardExists(_) => {
                ErrorKind::AlreadyExists
            }
            DirectoryError::HoldsAgencies { .. } | DirectoryError::NoShardFor(_) => {
                ErrorKind::FailedPrecondition
            }
            DirectoryError::SubscriptionNotFound(_)
            | DirectoryError::GrantNotFound(_)
            | DirectoryError::ShardNotFound(_)
            | DirectoryError::MoveNotFound(_) => ErrorKind::NotFound,
            DirectoryError::CannotMove(_) => ErrorKind::FailedPrecondition,
            DirectoryError::NoBus | DirectoryError::NoDeadLetters(_) => {
                ErrorKind::FailedPrecondition
            }
            DirectoryError::BusUnavailable(_) => ErrorKind::Unavailable,
            DirectoryError::PermissionDenied(_) => ErrorKind::PermissionDenied,
            DirectoryError::ShuttingDown => ErrorKind::Unavailable,
            DirectoryError::Store(_) => ErrorKind::Internal,
        }
    }

    fn field(&self) -> Option<&str> {
        match self {
            DirectoryError::InvalidField(invalid) => Some(invalid.field),
            _ => None,
        }
    }
}

impl From<fedmesh_common::events::FilterError> for DirectoryError {
    fn from(error: fedmesh_common::events::FilterError) -> Self {
        match error {
            fedmesh_common::events::FilterError::Invalid(invalid) => {
                DirectoryError::InvalidField(invalid)
            }
            fedmesh_common::events::FilterError::NotOwn(why) => {
                DirectoryError::PermissionDenied(why)
            }
        }
    }
}

impl From<DirectoryError> for tonic::Status {
    fn from(error: DirectoryError) -> Self {
        fedmesh_common::error::to_status(&error)
    }
}
