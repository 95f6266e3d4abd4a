//! The retention task: acknowledged messages are deleted once they were
//! acknowledged longer ago than the retention period, and idempotency keys
//! once they were claimed longer ago. A key is claimed before its message is
//! acknowledged, so it is forgotten no later than its message: a retry
//! within the retention period finds the first receipt.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::error::StoreError;
use crate::store::MessageStore;

/// Rows deleted per statement, so that no purge holds locks for long.
const CHUNK: u32 = 10_000;

/// Every `interval` until `shutdown`, deletes what is older than `retention`.
pub(crate) async fn purge_expired(
    shard: String,
    store: Arc<dyn MessageStore>,
    retention: std::time::Duration,
    interval: std::time::Duration,
    shutdown: CancellationToken,
) {
    let retention_micros = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let before = fedmesh_common::time::now_micros().saturating_sub(retention_micros);
        let messages = in_chunks(&shutdown, || store.purge_acked(before, CHUNK)).await;
        let keys = in_chunks(&shutdown, || store.purge_keys(before, CHUNK)).await;
        match (messages, keys) {
            (Ok(n_messages), Ok(n_keys)) if n_messages + n_keys > 0 => {
                tracing::info!(%shard, n_messages, n_keys, "acknowledged messages and idempotency keys past retention deleted");
            }
            (Ok(_), Ok(_)) => {}
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%shard, %error, "retention purge failed, will retry");
            }
        }
    }
}

/// Runs `purge` until it deletes less than a chunk; returns how many rows
/// it deleted.
async fn in_chunks<Purge, Chunk>(
    shutdown: &CancellationToken,
    mut purge: Purge,
) -> Result<u64, StoreError>
where
    Purge: FnMut() -> Chunk,
    Chunk: std::future::Future<Output = Result<u64, StoreError>>,
{
    let mut n_deleted = 0;
    loop {
        let deleted = purge().await?;
        n_deleted += deleted;
        if deleted < u64::from(CHUNK) || shutdown.is_cancelled() {
            return Ok(n_deleted);
        }
    }
}
