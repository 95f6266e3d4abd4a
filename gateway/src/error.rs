//! Errors of the gateway's services and how callers see them.

use fedmesh_common::error::{ErrorKind, InvalidField, ServiceError};

/// Everything an Exchange or Relay call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A request field is malformed.
    #[error(transparent)]
    InvalidField(#[from] InvalidField),
    /// The payload is over the limit.
    #[error("payload is {size} bytes, the limit is {limit} bytes")]
    PayloadTooLarge {
        /// Payload size.
        size: usize,
        /// The gateway's limit.
        limit: usize,
    },
    /// The caller acts as someone else.
    #[error("{0}")]
    PermissionDenied(String),
    /// The agency is not in the directory.
    #[error("agency {0:?} is not registered")]
    AgencyNotFound(String),
    /// The agency must use a gateway of its home region.
    #[error(
        "agency {agency_id:?} is homed in region {home_region}; use a gateway of {home_region}, this one serves {region}"
    )]
    WrongRegion {
        /// The agency.
        agency_id: String,
        /// Its home region.
        home_region: String,
        /// This gateway's region.
        region: String,
    },
    /// A newer inbox stream took over.
    #[error("a newer Receive stream for {0:?} took over this one")]
    TakenOver(String),
    /// Temporarily impossible; the text says what to retry.
    #[error("{0}")]
    Unavailable(String),
    /// A shard database failed.
    #[error("shard {shard}: {source}")]
    Store {
        /// The shard.
        shard: String,
        /// What failed.
        source: StoreError,
    },
}

/// A failure of a shard store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Migrations could not be applied.
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be read back.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
}

impl ServiceError for GatewayError {
    fn kind(&self) -> ErrorKind {
        match self {
            GatewayError::InvalidField(_) => ErrorKind::InvalidArgument,
            GatewayError::PayloadTooLarge { .. } => ErrorKind::ResourceExhausted,
            GatewayError::PermissionDenied(_) => ErrorKind::PermissionDenied,
            GatewayError::AgencyNotFound(_) => ErrorKind::NotFound,
            GatewayError::WrongRegion { .. } => ErrorKind::FailedPrecondition,
            GatewayError::TakenOver(_) => ErrorKind::Aborted,
            GatewayError::Unavailable(_) => ErrorKind::Unavailable,
            GatewayError::Store { .. } => ErrorKind::Internal,
        }
    }

    fn field(&self) -> Option<&str> {
        match self {
            GatewayError::InvalidField(invalid) => Some(invalid.field),
            _ => None,
        }
    }
}

impl From<GatewayError> for tonic::Status {
    fn from(error: GatewayError) -> Self {
        fedmesh_common::error::to_status(&error)
    }
}
