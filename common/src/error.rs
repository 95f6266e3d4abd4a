//! Error kinds and the mapping to gRPC statuses.
//!
//! Every service error enum implements [`ServiceError`]; [`to_status`] is the
//! only function in fedmesh that turns such an error into a `tonic::Status`.
//! Internal errors never leak their text to the caller: they are logged with
//! an error id and the caller gets the id.

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// What kind of failure an error is, as far as a caller is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed; fixing it is up to the caller.
    InvalidArgument,
    /// Something named in the request does not exist.
    NotFound,
    /// Something the request creates exists already.
    AlreadyExists,
    /// The caller may not do this.
    PermissionDenied,
    /// A limit was hit (size, rate, window).
    ResourceExhausted,
    /// The system is not in a state where this can be done (wrong region...).
    FailedPrecondition,
    /// The call was cut short by a newer one (inbox stream takeover).
    Aborted,
    /// Temporarily impossible; retrying later may work.
    Unavailable,
    /// A bug or an unexpected failure of a dependency.
    Internal,
}

impl ErrorKind {
    /// The gRPC code callers see for this kind.
    pub fn grpc_code(self) -> Code {
        match self {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::Aborted => Code::Aborted,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Internal => Code::Internal,
        }
    }
}

/// Implemented by each role's error enum.
pub trait ServiceError: std::error::Error {
    /// The kind of this error.
    fn kind(&self) -> ErrorKind;

    /// For invalid arguments: the request field at fault.
    fn field(&self) -> Option<&str> {
        None
    }
}

/// A malformed request field: which one and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {description}")]
pub struct InvalidField {
    /// The request field, e.g. `recipient_id`.
    pub field: &'static str,
    /// What is wrong and what is allowed.
    pub description: String,
}

impl InvalidField {
    /// An invalid field with its description.
    pub fn new(field: &'static str, description: impl Into<String>) -> Self {
        InvalidField {
            field,
            description: description.into(),
        }
    }
}

impl ServiceError for InvalidField {
    fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidArgument
    }

    fn field(&self) -> Option<&str> {
        Some(self.field)
    }
}

/// Builds the status a caller sees for `error`.
///
/// Invalid arguments carry a `BadRequest` field violation; internal errors
/// are logged with an id that the caller receives instead of the text.
pub fn to_status(error: &dyn ServiceError) -> tonic::Status {
    let kind = error.kind();
    match kind {
        ErrorKind::Internal => {
            let error_id = uuid::Uuid::now_v7();
            tracing::error!(%error_id, error = %error, "internal error");
            tonic::Status::internal(format!("internal error, id {error_id}"))
        }
        ErrorKind::InvalidArgument => match error.field() {
            Some(field) => {
                let details = ErrorDetails::with_bad_request_violation(field, error.to_string());
                tonic::Status::with_error_details(kind.grpc_code(), error.to_string(), details)
            }
            None => tonic::Status::invalid_argument(error.to_string()),
        },
        _ => tonic::Status::new(kind.grpc_code(), error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("database on fire at /secret/path")]
    struct Boom;

    impl ServiceError for Boom {
        fn kind(&self) -> ErrorKind {
            ErrorKind::Internal
        }
    }

    #[test]
    fn internal_errors_do_not_leak_their_text() {
        let status = to_status(&Boom);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret"), "{}", status.message());
        assert!(status.message().starts_with("internal error, id "));
    }

    #[test]
    fn invalid_fields_carry_a_bad_request_violation() {
        let status = to_status(&InvalidField::new("kind", "must not be empty"));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let bad_request = details.bad_request().expect("bad request details");
        assert_eq!(bad_request.field_violations[0].field, "kind");
    }
}
