//! SINGLETON WORK: which coordinator replica leads, and what only the
//! leader does. Every replica runs [`run_election`]; the one holding the
//! lease renews it every renew interval, the others try to take it every
//! retry period. Singleton writes carry the lease's fencing token, which
//! the store checks (see `DirectoryStore::set_gateway_state`).

use std::sync::Arc;
use std::time::Duration;

use fedmesh_common::events::{Event, GATEWAY_DOWN, GATEWAY_UP};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::directory::Directory;
use crate::error::StoreError;
use crate::lease::{LEADER, Lease, LeaseSettings};

/// Takes and holds the leader lease for `holder` until `shutdown`;
/// `leading` says which lease this replica holds (None: it does not lead).
/// 1 while this replica holds the leader lease, else 0, by `replica`.
const LEADING: &str = "fedmesh_coordinator_leading";
/// The fencing token of the lease this replica holds.
const TOKEN: &str = "fedmesh_coordinator_lease_token";
/// Times this replica took the lease (a new token): more than one in a
/// short while is a lease that flaps.
const LEADERSHIPS: &str = "fedmesh_coordinator_leaderships_total";
/// Renewals of the lease this replica holds.
const RENEWALS: &str = "fedmesh_coordinator_lease_renewals_total";

pub async fn run_election(
    directory: Arc<Directory>,
    holder: String,
    settings: LeaseSettings,
    leading: watch::Sender<Option<Lease>>,
    shutdown: CancellationToken,
) {
    let duration = i64::try_from(settings.duration().as_micros()).unwrap_or(i64::MAX);
    loop {
        let now = fedmesh_common::time::now_micros();
        let held = leading.borrow().clone();
        let wait = match directory
            .store()
            .acquire_lease(LEADER, &holder, now, duration)
            .await
        {
            Ok(Some(lease)) => {
                if held.as_ref().is_none_or(|held| held.token != lease.token) {
                    tracing::info!(%holder, token = lease.token, "this coordinator leads: it holds the lease");
                    metrics::counter!(LEADERSHIPS, "replica" => holder.clone()).increment(1);
                } else {
                    metrics::counter!(RENEWALS, "replica" => holder.clone()).increment(1);
                }
                metrics::gauge!(LEADING, "replica" => holder.clone()).set(1.0);
                metrics::gauge!(TOKEN, "replica" => holder.clone()).set(lease.token as f64);
                directory.state().set_leader(Some(lease.clone()));
                leading.send_replace(Some(lease));
                Duration::from_millis(settings.lease_renew_ms)
            }
            Ok(None) => {
                if held.is_some() {
                    tracing::warn!(%holder, "this coordinator lost the lease: another leads");
                }
                metrics::gauge!(LEADING, "replica" => holder.clone()).set(0.0);
                leading.send_replace(None);
                if let Ok(current) = directory.store().lease(LEADER).await {
                    directory.state().set_leader(current);
                }
                Duration::from_millis(settings.lease_retry_ms)
            }
            Err(error) => {
                // Without the database, a leader steps down before its
                // lease could have passed to another.
                if held
                    .as_ref()
                    .is_some_and(|lease| lease.expires_at_micros - duration / 2 < now)
                {
                    tracing::warn!(%holder, %error, "cannot renew the lease: stepping down");
                    metrics::gauge!(LEADING, "replica" => holder.clone()).set(0.0);
                    leading.send_replace(None);
                } else {
                    tracing::warn!(%holder, %error, "cannot reach the lease");
                }
                Duration::from_millis(settings.lease_retry_ms)
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Records, if this replica leads, that a gateway went down (missed its
/// reports) or came up again, with its event, under the lease's token.
pub async fn gateway_changed(
    directory: &Directory,
    leading: &watch::Receiver<Option<Lease>>,
    gateway_id: &str,
    region: &str,
    up: bool,
) {
    let Some(lease) = leading.borrow().clone() else {
        return;
    };
    let kind = if up { GATEWAY_UP } else { GATEWAY_DOWN };
    let event = directory
        .events_on()
        .then(|| Event::new(kind, region, gateway_id));
    match directory
        .store()
        .set_gateway_state(lease.token, gateway_id, region, up, event)
        .await
    {
        Ok(true) => {
            directory.wake_outbox();
            if up {
                tracing::info!(gateway_id, region, token = lease.token, "gateway up again");
            } else {
                tracing::warn!(
                    gateway_id,
                    region,
                    token = lease.token,
                    "gateway down: it missed its reports"
                );
            }
        }
        Ok(false) => {}
        Err(StoreError::Fenced { token, current }) => {
            tracing::warn!(
                gateway_id,
                token,
                ?current,
                "not the leader any more: the write was refused"
            );
        }
        Err(error) => tracing::warn!(gateway_id, %error, "cannot record the gateway's state"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DirectoryStore, PgDirectoryStore};

    type Replica = (
        &'static str,
        Arc<Directory>,
        watch::Receiver<Option<Lease>>,
        CancellationToken,
    );

    fn leaders(replicas: &[Replica]) -> Vec<(&'static str, Lease)> {
        replicas
            .iter()
            .filter_map(|(name, _, leadership, _)| {
                leadership.borrow().clone().map(|lease| (*name, lease))
            })
            .collect()
    }

    /// Waits until exactly one replica leads, woken by their changes.
    async fn one_leader(replicas: &[Replica]) -> (&'static str, Lease) {
        let mut receivers: Vec<_> = replicas
            .iter()
            .map(|(_, _, leadership, _)| leadership.clone())
            .collect();
        loop {
            if let [one] = leaders(replicas).as_slice() {
                return one.clone();
            }
            let changes = receivers
                .iter_mut()
                .map(|receiver| Box::pin(receiver.changed()));
            let _ = futures_util::future::select_all(changes).await;
        }
    }

    #[tokio::test]
    async fn another_replica_leads_soon_after_the_leader_dies_and_the_old_one_is_fenced() {
        let database = fedmesh_common::testing::TestDatabase::create().await;
        let settings = LeaseSettings {
            lease_ms: 1_000,
            lease_renew_ms: 300,
            lease_retry_ms: 100,
        };
        let mut replicas: Vec<Replica> = Vec::new();
        for name in ["c1", "c2", "c3"] {
            let store: Arc<dyn DirectoryStore> = Arc::new(
                PgDirectoryStore::open(&database.url, 2)
                    .await
                    .expect("open"),
            );
            let directory = Arc::new(
                Directory::load(store, vec![], None, None)
                    .await
                    .expect("load"),
            );
            let (leading, leadership) = watch::channel(None);
            let shutdown = CancellationToken::new();
            tokio::spawn(run_election(
                Arc::clone(&directory),
                name.to_string(),
                settings,
                leading,
                shutdown.clone(),
            ));
            replicas.push((name, directory, leadership, shutdown));
        }
        let first = tokio::time::timeout(Duration::from_secs(30), one_leader(&replicas))
            .await
            .expect("a replica leads");
        // Kill the leader: it stops renewing.
        let killed_at = std::time::Instant::now();
        let position = replicas
            .iter()
            .position(|(name, ..)| *name == first.0)
            .expect("the leader");
        let (_, deposed, _, stop) = replicas.remove(position);
        stop.cancel();
        let second = tokio::time::timeout(Duration::from_secs(30), one_leader(&replicas))
            .await
            .expect("another replica leads");
        let failover = killed_at.elapsed();
        println!(
            "failover: {} ms (lease 1000 ms, retry 100 ms)",
            failover.as_millis()
        );
        assert_ne!(second.0, first.0);
        assert_eq!(second.1.token, first.1.token + 1);
        // What the dead leader would still write is refused.
        let fenced = deposed
            .store()
            .set_gateway_state(first.1.token, "east-0", "east", false, None)
            .await;
        assert!(
            matches!(fenced, Err(StoreError::Fenced { .. })),
            "{fenced:?}"
        );
        for (_, _, _, stop) in &replicas {
            stop.cancel();
        }
    }
}
