//! Test support shared by the crates' test suites (feature `testing`):
//! a throwaway PostgreSQL database per test, and a publisher that keeps
//! what it was given.

use std::sync::Mutex;

use sqlx::Connection;

use crate::events::{BoxFuture, BusError, Event, EventPublisher, Outbox};

/// The PostgreSQL server tests use: `FEDMESH_TEST_DATABASE_URL`, or this
/// machine's server.
pub fn postgres_server_url() -> String {
    std::env::var("FEDMESH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A database created for one test and dropped when the value is dropped.
pub struct TestDatabase {
    /// URL of the new database.
    pub url: String,
    name: String,
    server_url: String,
}

impl TestDatabase {
    /// Creates a fresh, empty database. Panics with the command that starts
    /// PostgreSQL when the server cannot be reached: a missing service fails
    /// the test, it never skips it.
    pub async fn create() -> TestDatabase {
        let server_url = postgres_server_url();
        let mut connection = match sqlx::PgConnection::connect(&server_url).await {
            Ok(connection) => connection,
            Err(error) => panic!(
                "PostgreSQL is not reachable at {server_url} ({error}); start it with \
                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
                 or point FEDMESH_TEST_DATABASE_URL at a server"
            ),
        };
        let name = format!("fedmesh_test_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .unwrap_or_else(|error| panic!("cannot create test database {name}: {error}"));
        let _ = connection.close().await;
        let url = match server_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("FEDMESH_TEST_DATABASE_URL {server_url:?} names no database"),
        };
        TestDatabase {
            url,
            name,
            server_url,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let server_url = self.server_url.clone();
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop runs outside async context guarantees: use a runtime of our own
        // on a thread of our own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let mut connection = sqlx::PgConnection::connect(&server_url).await.ok()?;
                sqlx::query(&statement).execute(&mut connection).await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("warning: test database {} was not dropped", self.name);
        }
    }
}

/// A publisher that keeps every event it accepts.
#[derive(Default)]
pub struct CollectingPublisher {
    events: Mutex<Vec<Event>>,
}

impl CollectingPublisher {
    /// The events accepted so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl EventPublisher for CollectingPublisher {
    fn publish(&self, events: Vec<Event>) -> BoxFuture<'_, Result<(), BusError>> {
        self.events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend(events);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Relays everything in `outbox` and returns the events, in order.
pub async fn drain_outbox(outbox: &dyn Outbox) -> Vec<Event> {
    let publisher = CollectingPublisher::default();
    while outbox
        .relay_batch(1000, &publisher)
        .await
        .unwrap_or_else(|error| panic!("outbox relay failed: {error}"))
        > 0
    {}
    publisher.events()
}
