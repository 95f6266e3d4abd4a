//! The retention task: acknowledged messages are deleted once they are older
//! than the retention period.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::store::MessageStore;

/// Deletes acknowledged messages older than `retention`, in chunks, every
/// `interval`, until `shutdown`.
pub(crate) async fn purge_acked(
    shard: String,
    store: Arc<dyn MessageStore>,
    retention: std::time::Duration,
    interval: std::time::Duration,
    shutdown: CancellationToken,
) {
    const CHUNK: u32 = 10_000;
    let retention_micros = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let acked_before = fedmesh_common::time::now_micros().saturating_sub(retention_micros);
        let mut n_purged = 0;
        loop {
            match store.purge_acked(acked_before, CHUNK).await {
                Ok(n_deleted) => {
                    n_purged += n_deleted;
                    if n_deleted < u64::from(CHUNK) || shutdown.is_cancelled() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%shard, %error, "retention purge failed, will retry");
                    break;
                }
            }
        }
        if n_purged > 0 {
            tracing::info!(%shard, n_purged, "acknowledged messages past retention deleted");
        }
    }
}
