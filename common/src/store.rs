//! What the roles' stores share: the error a store fails with, and which
//! backend a database URL names.
//!
//! Each role keeps its data behind a trait of its own (a shard's messages,
//! the control database's directory) with a PostgreSQL and a SQLite
//! implementation; [`Backend::of_url`] is the one place a URL picks one.

/// A failure of a store: a shard or the control database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row to create exists already; nothing was written.
    #[error("already exists")]
    Conflict,
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Migrations could not be applied.
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be read back.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// A singleton write under a fencing token the lease no longer has:
    /// its writer is not the leader any more.
    #[error("fenced: the write carries lease token {token}, the lease has {current:?}")]
    Fenced {
        /// The write's token.
        token: i64,
        /// The lease's token now.
        current: Option<i64>,
    },
    /// The URL names no supported database.
    #[error("database URL {0:?} is neither postgres://... nor sqlite://...")]
    UnsupportedUrl(String),
}

impl StoreError {
    /// A value read back that does not have the shape it was stored with.
    pub fn corrupt(error: impl std::fmt::Display) -> Self {
        StoreError::Corrupt(error.to_string())
    }

    /// Whether the connection failed under the statement: closed, or ended
    /// by the server (shutdown, restart, terminated backend). What failed
    /// may be tried again on another connection.
    pub fn is_connection_loss(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Io(_)) => true,
            StoreError::Database(sqlx::Error::Database(database)) => database
                .code()
                .is_some_and(|code| code.starts_with("57P") || code.starts_with("08")),
            _ => false,
        }
    }

    /// The SQLSTATE of a database error, if this is one.
    pub fn sql_state(&self) -> Option<String> {
        match self {
            StoreError::Database(sqlx::Error::Database(database)) => {
                database.code().map(|code| code.into_owned())
            }
            _ => None,
        }
    }
}

/// The one event of an outbox row that is not a batch listing, on either
/// backend: `kind`, `region` and `occurred_at_micros` are read already.
pub(crate) fn single_event_from_row<R>(
    row: &R,
    kind: String,
    region: String,
    occurred_at_micros: i64,
) -> Result<crate::events::Event, sqlx::Error>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let attributes: Option<String> = row.try_get("attributes")?;
    Ok(crate::events::Event {
        event_id: row
            .try_get::<Option<String>, _>("event_id")?
            .unwrap_or_default(),
        kind,
        region,
        agency_id: row
            .try_get::<Option<String>, _>("agency_id")?
            .unwrap_or_default(),
        message_id: row.try_get("message_id")?,
        occurred_at_micros,
        attributes: match attributes {
            Some(text) => {
                serde_json::from_str(&text).map_err(|error| sqlx::Error::Decode(Box::new(error)))?
            }
            None => Default::default(),
        },
    })
}

/// The database software behind a URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `postgres://...` or `postgresql://...`.
    Postgres,
    /// `sqlite://...` (or `sqlite:...`).
    Sqlite,
}

impl Backend {
    /// The backend `url` names.
    pub fn of_url(url: &str) -> Result<Backend, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }
}

/// `url` with the password of its user, if any, replaced by `***`, for
/// logs and printed settings.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_their_backend() {
        assert_eq!(
            Backend::of_url("postgres://u@h/db").ok(),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::of_url("postgresql://u@h/db").ok(),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::of_url("sqlite:///tmp/x.sqlite").ok(),
            Some(Backend::Sqlite)
        );
        let error = Backend::of_url("mysql://root:secret@h/db").expect_err("unsupported");
        assert!(!error.to_string().contains("secret"), "{error}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://fedmesh:hunter2@db:5432/east_1?sslmode=require"),
            "postgres://fedmesh:***@db:5432/east_1?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://postgres@db/x"),
            "postgres://postgres@db/x"
        );
        assert_eq!(
            redact_url("sqlite:///var/x.sqlite"),
            "sqlite:///var/x.sqlite"
        );
    }
}
