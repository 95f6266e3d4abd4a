//! Error kinds and the mapping to gRPC statuses.
//!
//! Every service error enum implements [`ServiceError`]; [`to_status`] is the
//! only function in fedmesh that builds a `tonic::Status` (clippy's
//! `disallowed-methods` in `clippy.toml` refuses the constructors elsewhere).
//! What a caller reads is the error's `Display` text, which names what to
//! fix. Internal errors, and the underlying cause of any error (its
//! `source()`: a database or I/O failure), never reach the caller: they are
//! logged with an error id, and the caller gets the id.

use std::time::Duration;

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
    /// The caller could not be identified.
    Unauthenticated,
    /// A limit was hit (size, rate, streams).
    ResourceExhausted,
    /// The system is not in a state where this can be done (wrong region,
    /// an idempotency key that names another message...).
    FailedPrecondition,
    /// The call was cut short by a newer one (inbox stream takeover).
    Aborted,
    /// The caller's deadline passed before the work was done.
    DeadlineExceeded,
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
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::Aborted => Code::Aborted,
            ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Internal => Code::Internal,
        }
    }

    /// The kind of a status another component answered with, to pass its
    /// meaning on (a relayed message's result).
    pub fn of_code(code: Code) -> ErrorKind {
        match code {
            Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::PermissionDenied => ErrorKind::PermissionDenied,
            Code::Unauthenticated => ErrorKind::Unauthenticated,
            Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            Code::FailedPrecondition | Code::Unimplemented => ErrorKind::FailedPrecondition,
            Code::Aborted => ErrorKind::Aborted,
            Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            Code::Unavailable | Code::Cancelled | Code::Unknown => ErrorKind::Unavailable,
            Code::Ok | Code::Internal | Code::DataLoss => ErrorKind::Internal,
        }
    }
}

/// The name gRPC gives `code`, as callers see it spelled everywhere in
/// fedmesh: `INVALID_ARGUMENT`, `NOT_FOUND`...
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Implemented by each role's error enum.
///
/// The `Display` text is what the caller reads: it says what went wrong
/// and what to do, and never embeds the `source()`, which is logged only.
pub trait ServiceError: std::error::Error {
    /// The kind of this error.
    fn kind(&self) -> ErrorKind;

    /// For invalid arguments: the request field at fault.
    fn field(&self) -> Option<&str> {
        None
    }

    /// For limits and temporary failures: when a retry may succeed.
    fn retry_after(&self) -> Option<Duration> {
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

/// The causes of `error`, outermost first, joined for a log line.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

/// Builds the status a caller sees for `error`.
///
/// Invalid arguments carry a `BadRequest` field violation and limits a
/// `RetryInfo`; internal errors and the causes of others are logged with an
/// id that the caller receives instead of their text.
#[allow(clippy::disallowed_methods)]
pub fn to_status(error: &dyn ServiceError) -> tonic::Status {
    let kind = error.kind();
    let described = bounded(error.to_string());
    let message = match (kind, error.source()) {
        (ErrorKind::Internal, _) => {
            let error_id = uuid::Uuid::now_v7();
            tracing::error!(%error_id, error = %error, cause = error.source().map(causes), "internal error");
            format!("internal error, id {error_id}")
        }
        (_, Some(cause)) => {
            let error_id = uuid::Uuid::now_v7();
            tracing::warn!(%error_id, error = %error, cause = %causes(cause), "request failed");
            format!("{error} (error id {error_id})")
        }
        (_, None) => described.clone(),
    };
    let message = bounded(message);
    let mut details = ErrorDetails::new();
    let mut has_details = false;
    if let (ErrorKind::InvalidArgument, Some(field)) = (kind, error.field()) {
        details.add_bad_request_violation(field, described);
        has_details = true;
    }
    if let Some(delay) = error.retry_after() {
        details.set_retry_info(Some(delay));
        has_details = true;
    }
    if has_details {
        tonic::Status::with_error_details(kind.grpc_code(), message, details)
    } else {
        tonic::Status::new(kind.grpc_code(), message)
    }
}

/// Most bytes of a status message (and of a field violation): it travels
/// in an HTTP/2 header, and an error that quotes a huge value must not make
/// the header too large for the client to read.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// `text` cut to [`MAX_MESSAGE_BYTES`] at a character boundary, saying so.
fn bounded(mut text: String) -> String {
    if text.len() <= MAX_MESSAGE_BYTES {
        return text;
    }
    let cut = text.len();
    let mut end = MAX_MESSAGE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!("... ({} more bytes)", cut - end));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_message_is_bounded_at_a_character_boundary() {
        let long = "é".repeat(2000);
        let bounded = bounded(long);
        assert!(bounded.len() < MAX_MESSAGE_BYTES + 40, "{}", bounded.len());
        assert!(bounded.ends_with("more bytes)"), "{bounded}");
        assert_eq!(super::bounded("short".into()), "short");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("database on fire at /secret/path")]
    struct Boom;

    impl ServiceError for Boom {
        fn kind(&self) -> ErrorKind {
            ErrorKind::Internal
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("shard east-1 could not commit; retry")]
    struct Unavailable {
        #[source]
        cause: std::io::Error,
    }

    impl ServiceError for Unavailable {
        fn kind(&self) -> ErrorKind {
            ErrorKind::Unavailable
        }

        fn retry_after(&self) -> Option<Duration> {
            Some(Duration::from_secs(2))
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
    fn causes_are_logged_not_sent() {
        let error = Unavailable {
            cause: std::io::Error::other("connection to 10.0.0.7:5432 reset"),
        };
        let status = to_status(&error);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status
                .message()
                .starts_with("shard east-1 could not commit; retry (error id "),
            "{}",
            status.message()
        );
        assert!(
            !status.message().contains("10.0.0.7"),
            "{}",
            status.message()
        );
        let retry = status.get_error_details().retry_info().cloned();
        assert_eq!(
            retry.and_then(|info| info.retry_delay),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn invalid_fields_carry_a_bad_request_violation() {
        let status = to_status(&InvalidField::new("kind", "must not be empty"));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let bad_request = details.bad_request().expect("bad request details");
        assert_eq!(bad_request.field_violations[0].field, "kind");
    }

    #[test]
    fn codes_are_spelled_as_grpc_names_them() {
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
        for kind in [ErrorKind::NotFound, ErrorKind::Aborted, ErrorKind::Internal] {
            assert_eq!(ErrorKind::of_code(kind.grpc_code()), kind);
        }
    }
}
