//! Errors of the gateway's services and how callers see them.
//!
//! The text of each variant is what the caller reads; causes (database and
//! transport failures) are kept as `source` and only logged, with an error
//! id the caller receives (see `fedmesh_common::error::to_status`).

use std::sync::Arc;

use fedmesh_common::error::{ErrorKind, InvalidField, ServiceError};

/// A failure of a shard's store: what any store of the mesh may fail with,
/// or what only a shard's inboxes refuse.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The agency's inbox is frozen on this shard: it has moved, or is
    /// moving, to another shard, so no stream reads it here.
    #[error(
        "the inbox of agency {0:?} is frozen on this shard: it has moved or is moving to another shard"
    )]
    InboxMoved(String),
    /// The database failed, or returned what it should not have.
    #[error(transparent)]
    Common(#[from] fedmesh_common::store::StoreError),
}

impl StoreError {
    /// A value read back that does not have the shape it was stored with.
    pub fn corrupt(error: impl std::fmt::Display) -> Self {
        StoreError::Common(fedmesh_common::store::StoreError::corrupt(error))
    }

    /// The row to create exists already; nothing was written.
    pub fn conflict() -> Self {
        StoreError::Common(fedmesh_common::store::StoreError::Conflict)
    }

    /// Whether the connection failed under the statement, so that what
    /// failed may be tried again on another connection.
    pub fn is_connection_loss(&self) -> bool {
        match self {
            StoreError::Common(common) => common.is_connection_loss(),
            StoreError::InboxMoved(_) => false,
        }
    }

    /// The SQLSTATE of a database error, if this is one.
    pub fn sql_state(&self) -> Option<String> {
        match self {
            StoreError::Common(common) => common.sql_state(),
            StoreError::InboxMoved(_) => None,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        StoreError::Common(error.into())
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        StoreError::Common(error.into())
    }
}

/// Everything an Exchange or Relay call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// A request message is over what the gateway reads.
    #[error(
        "request message is {size} bytes; this gateway accepts payloads of at most {limit} bytes (with up to 64 headers)"
    )]
    MessageTooLarge {
        /// The message's size on the wire.
        size: usize,
        /// The gateway's payload limit.
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
    /// The agency has as many Receive streams open here as it may.
    #[error(
        "agency {agency_id:?} has {open} Receive streams open on this gateway, at most {max} are allowed; close one (or let the older ones end) and retry"
    )]
    TooManyStreams {
        /// The agency.
        agency_id: String,
        /// Its open streams.
        open: usize,
        /// The gateway's cap.
        max: usize,
    },
    /// The sender's idempotency key names another message.
    #[error(
        "idempotency key {key:?} of {sender_id} already names message {message_id}, sent with other content (recipient, kind, headers or payload); a new message needs a new key"
    )]
    KeyInUse {
        /// The sender.
        sender_id: String,
        /// Its key.
        key: String,
        /// The message the key names.
        message_id: String,
    },
    /// The recipient's inbox is being moved to another shard: its shard
    /// takes no message for it until the move is done.
    #[error(
        "agency {agency_id:?} is moving to another shard; retry in a moment with the same idempotency key (a retry is never stored twice)"
    )]
    AgencyMoving {
        /// The agency.
        agency_id: String,
    },
    /// The recipient's home gateway says it does not live there (any more),
    /// or is moving: its answer, passed on.
    #[error("{0}")]
    MovedAway(String),
    /// A move step for an agency this gateway's topology does not show
    /// moving.
    #[error(
        "agency {agency_id:?} is not moving as this gateway's topology shows it; a move step is taken only for a moving agency (the coordinator retries)"
    )]
    NotMoving {
        /// The agency.
        agency_id: String,
    },
    /// A release of a shard the agency still lives on, as this gateway's
    /// topology shows it.
    #[error(
        "agency {agency_id:?} still lives on shard {shard} as this gateway's topology shows it; its rows there stay (the coordinator retries once the topology shows the move)"
    )]
    StillHome {
        /// The agency.
        agency_id: String,
        /// The shard.
        shard: String,
    },
    /// The caller's deadline passed before its message was committed.
    #[error(
        "the deadline passed before the message was committed; nothing was stored, retry with the same idempotency key"
    )]
    DeadlineExceeded,
    /// The gateway is stopping.
    #[error("gateway shutting down; {0}")]
    ShuttingDown(&'static str),
    /// The agency's shard is not in this gateway's configuration.
    #[error(
        "shard {shard} is not served by gateway {gateway_id}; its configuration lacks the shard"
    )]
    ShardNotServed {
        /// The shard.
        shard: String,
        /// This gateway.
        gateway_id: String,
    },
    /// A shard could not be written or read for now.
    #[error("shard {shard} is unavailable; {advice}")]
    ShardUnavailable {
        /// The shard.
        shard: String,
        /// What the caller may do.
        advice: &'static str,
        /// What failed.
        #[source]
        source: Arc<StoreError>,
    },
    /// No gateway of the recipient's region could take the message.
    #[error(
        "region {region} cannot be reached; retry with the same idempotency key (a retry is never stored twice)"
    )]
    RegionUnreachable {
        /// The recipient's home region.
        region: String,
        /// The last failure, if a gateway was tried.
        #[source]
        source: Option<Arc<tonic::Status>>,
    },
    /// The coordinator could not be asked where an agency lives.
    #[error(
        "agency {agency_id:?} is not in this gateway's topology yet and the coordinator cannot be asked; retry shortly"
    )]
    CoordinatorUnavailable {
        /// The agency looked up.
        agency_id: String,
        /// Why the coordinator did not answer.
        #[source]
        source: Arc<tonic::Status>,
    },
    /// The recipient's home region refused the message: its answer, passed on.
    #[error("{message}")]
    Relayed {
        /// The kind of the home region's answer.
        kind: ErrorKind,
        /// Its text.
        message: String,
    },
    /// Another gateway answered something that cannot be right.
    #[error("invalid answer from gateway {address}: {problem}")]
    InvalidAnswer {
        /// The gateway.
        address: String,
        /// What is wrong with the answer.
        problem: String,
    },
    /// Something that cannot happen did (a task panicked...).
    #[error("{0}")]
    Internal(String),
    /// A shard database failed unexpectedly.
    #[error("shard {shard}: {source}")]
    Store {
        /// The shard.
        shard: String,
        /// What failed.
        source: Arc<StoreError>,
    },
}

impl GatewayError {
    /// Whether the write went to where the recipient no longer lives, or
    /// while it moved: sent again once the topology shows its new home.
    pub(crate) fn moved_away(&self) -> bool {
        matches!(
            self,
            GatewayError::AgencyMoving { .. } | GatewayError::MovedAway(_)
        )
    }

    /// A store failure of `shard` that a retry may get past.
    pub(crate) fn shard_unavailable(
        shard: &str,
        advice: &'static str,
        source: impl Into<Arc<StoreError>>,
    ) -> Self {
        GatewayError::ShardUnavailable {
            shard: shard.to_string(),
            advice,
            source: source.into(),
        }
    }
}

impl ServiceError for GatewayError {
    fn kind(&self) -> ErrorKind {
        match self {
            GatewayError::InvalidField(_) => ErrorKind::InvalidArgument,
            GatewayError::PayloadTooLarge { .. }
            | GatewayError::MessageTooLarge { .. }
            | GatewayError::TooManyStreams { .. } => ErrorKind::ResourceExhausted,
            GatewayError::PermissionDenied(_) => ErrorKind::PermissionDenied,
            GatewayError::AgencyNotFound(_) => ErrorKind::NotFound,
            GatewayError::WrongRegion { .. } | GatewayError::KeyInUse { .. } => {
                ErrorKind::FailedPrecondition
            }
            GatewayError::TakenOver(_) => ErrorKind::Aborted,
            GatewayError::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            GatewayError::ShuttingDown(_)
            | GatewayError::ShardNotServed { .. }
            | GatewayError::ShardUnavailable { .. }
            | GatewayError::RegionUnreachable { .. }
            | GatewayError::CoordinatorUnavailable { .. }
            | GatewayError::AgencyMoving { .. }
            | GatewayError::MovedAway(_) => ErrorKind::Unavailable,
            GatewayError::NotMoving { .. } | GatewayError::StillHome { .. } => {
                ErrorKind::FailedPrecondition
            }
            GatewayError::Relayed { kind, .. } => *kind,
            GatewayError::InvalidAnswer { .. }
            | GatewayError::Internal(_)
            | GatewayError::Store { .. } => ErrorKind::Internal,
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
