//! The gateway's metrics (recorded through the `metrics` crate into the
//! process's Prometheus recorder, see `fedmesh_common::telemetry`); label
//! values are regions, shards and kinds of writes, never agencies.

/// Writes per committed batch, by `shard` and `kind`.
pub(crate) const COMMIT_BATCH_SIZE: &str = "fedmesh_commit_batch_size";
/// How long a batch took to commit, by `shard` and `kind`.
pub(crate) const COMMIT_DURATION: &str = "fedmesh_commit_duration_seconds";
/// Relay calls, by `region` and `attempt` (`first`, `retry`).
pub(crate) const RELAY_ATTEMPTS: &str = "fedmesh_relay_attempts_total";
/// Gateways ejected for failing, by `region`.
pub(crate) const RELAY_EJECTIONS: &str = "fedmesh_relay_ejections_total";
/// Messages waiting in a spool, by `shard` and `destination`.
pub(crate) const SPOOL_MESSAGES: &str = "fedmesh_spool_messages";
/// Age of the oldest message of a spool, by `shard` and `destination`.
pub(crate) const SPOOL_OLDEST_AGE: &str = "fedmesh_spool_oldest_age_seconds";
/// The version of the topology the gateway routes by.
pub(crate) const TOPOLOGY_VERSION: &str = "fedmesh_gateway_topology_version";
/// A shard's database connections, by `shard` and `state` (`busy`,
/// `idle`, `max`).
pub(crate) const POOL_CONNECTIONS: &str = "fedmesh_db_pool_connections";
/// Messages unacknowledged in a shard's inboxes, by `shard`.
pub(crate) const INBOX_UNACKED: &str = "fedmesh_inbox_unacked_messages";
/// Age of the oldest unacknowledged message of a shard, by `shard`.
pub(crate) const INBOX_OLDEST_UNACKED_AGE: &str = "fedmesh_inbox_oldest_unacked_age_seconds";
/// How often the inbox backlog of each shard is read.
const BACKLOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Inboxes streamed now.
pub(crate) const OPEN_STREAMS: &str = "fedmesh_gateway_open_streams";

/// Describes the gateway's metrics to the recorder.
pub(crate) fn describe() {
    let _ = fedmesh_common::telemetry::recorder();
    metrics::describe_histogram!(COMMIT_BATCH_SIZE, "writes per committed batch");
    metrics::describe_histogram!(
        COMMIT_DURATION,
        metrics::Unit::Seconds,
        "how long a batch took to commit"
    );
    metrics::describe_counter!(
        RELAY_ATTEMPTS,
        "relay calls to another region, first attempts and retries"
    );
    metrics::describe_counter!(
        RELAY_EJECTIONS,
        "gateways of another region ejected for failing"
    );
    metrics::describe_gauge!(
        SPOOL_MESSAGES,
        "messages waiting in a spool for their region"
    );
    metrics::describe_gauge!(
        SPOOL_OLDEST_AGE,
        metrics::Unit::Seconds,
        "age of the oldest message waiting in a spool"
    );
    metrics::describe_gauge!(
        TOPOLOGY_VERSION,
        "version of the topology the gateway routes by"
    );
    metrics::describe_gauge!(OPEN_STREAMS, "inboxes streamed by this gateway");
    metrics::describe_gauge!(
        INBOX_UNACKED,
        "messages unacknowledged in a shard's inboxes"
    );
    metrics::describe_gauge!(
        INBOX_OLDEST_UNACKED_AGE,
        metrics::Unit::Seconds,
        "age of the oldest unacknowledged message of a shard"
    );
    metrics::describe_gauge!(
        POOL_CONNECTIONS,
        "a shard's database connections: busy, idle, and the most there may be"
    );
}

/// Sets the connections of `shard`'s pool, as the gateway reports them.
pub(crate) fn pool(shard: &str, open: u32, idle: u32, max: u32) {
    for (state, count) in [
        ("busy", open.saturating_sub(idle)),
        ("idle", idle),
        ("max", max),
    ] {
        metrics::gauge!(POOL_CONNECTIONS, "shard" => shard.to_string(), "state" => state)
            .set(f64::from(count));
    }
}

/// Records a committed batch.
pub(crate) fn committed(shard: &str, kind: &'static str, writes: usize, seconds: f64) {
    metrics::histogram!(COMMIT_BATCH_SIZE, "shard" => shard.to_string(), "kind" => kind)
        .record(writes as f64);
    metrics::histogram!(COMMIT_DURATION, "shard" => shard.to_string(), "kind" => kind)
        .record(seconds);
}

/// Records a relay call to `region`.
pub(crate) fn relay_attempt(region: &str, retry: bool) {
    let attempt = if retry { "retry" } else { "first" };
    metrics::counter!(RELAY_ATTEMPTS, "region" => region.to_string(), "attempt" => attempt)
        .increment(1);
}

/// Shows the relay series of `region` (at 0) from the first relay to it,
/// so that a rate over them is defined before anything fails.
pub(crate) fn relaying_to(region: &str) {
    for attempt in ["first", "retry"] {
        metrics::counter!(RELAY_ATTEMPTS, "region" => region.to_string(), "attempt" => attempt)
            .increment(0);
    }
    metrics::counter!(RELAY_EJECTIONS, "region" => region.to_string()).increment(0);
}

/// Records the ejection of a gateway of `region`.
pub(crate) fn ejected(region: &str) {
    metrics::counter!(RELAY_EJECTIONS, "region" => region.to_string()).increment(1);
}

/// Sets what waits in the spool of `shard` for `destination`.
pub(crate) fn spool_depth(shard: &str, destination: &str, messages: u64, oldest_age: f64) {
    let labels = [
        ("shard", shard.to_string()),
        ("destination", destination.to_string()),
    ];
    metrics::gauge!(SPOOL_MESSAGES, &labels).set(messages as f64);
    metrics::gauge!(SPOOL_OLDEST_AGE, &labels).set(oldest_age);
}

/// Keeps the gauges of gateway `gateway_id` (its topology's version, the
/// inboxes it streams) as they change, until `shutdown`.
pub(crate) async fn follow(
    gateway_id: String,
    mut topology: tokio::sync::watch::Receiver<std::sync::Arc<fedmesh_common::topology::Topology>>,
    mut open_streams: tokio::sync::watch::Receiver<usize>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let version = metrics::gauge!(TOPOLOGY_VERSION, "gateway" => gateway_id.clone());
    let streams = metrics::gauge!(OPEN_STREAMS, "gateway" => gateway_id);
    loop {
        version.set(topology.borrow_and_update().version as f64);
        streams.set(*open_streams.borrow_and_update() as f64);
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = topology.changed() => if changed.is_err() { return },
            changed = open_streams.changed() => if changed.is_err() { return },
        }
    }
}

/// Reads the inbox backlog of `shard` every [`BACKLOG_INTERVAL`] (at once
/// first) into its gauges, until `shutdown`.
pub(crate) async fn follow_backlog(
    shard: String,
    store: std::sync::Arc<dyn crate::store::MessageStore>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let unacked = metrics::gauge!(INBOX_UNACKED, "shard" => shard.clone());
    let oldest = metrics::gauge!(INBOX_OLDEST_UNACKED_AGE, "shard" => shard.clone());
    let mut every = tokio::time::interval(BACKLOG_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        match store.backlog().await {
            Ok((count, oldest_stored)) => {
                unacked.set(count as f64);
                let age = oldest_stored.map_or(0.0, |stored| {
                    (fedmesh_common::time::now_micros() - stored).max(0) as f64 / 1e6
                });
                oldest.set(age);
            }
            Err(error) => {
                tracing::warn!(%shard, %error, "cannot read the inbox backlog for its metrics");
            }
        }
    }
}
