//! Store and forward: messages for a region that cannot be reached wait in
//! the spool of their sender's home shard, and a drainer forwards them once
//! the region answers again.
//!
//! - A send whose relay finds no gateway of the recipient's region (nor the
//!   coordinator's relay) able to take it spools the message and answers
//!   `SPOOLED`: the message is durable in the origin region.
//! - Order per (sender, recipient): while the sender has messages for the
//!   recipient in the spool, its next message for that recipient joins
//!   them instead of overtaking them (every replica of the shard asks the
//!   spool itself, so this holds whichever replica the sender reaches).
//! - Each replica keeps a drainer per shard. It looks at the spool when a
//!   message is spooled here and every [`LOOK_INTERVAL`] (for what other
//!   replicas spooled, or left when they stopped), and forwards each
//!   destination under that destination's lock, so one drainer per
//!   destination runs at a time across replicas. It takes the spooled
//!   messages in order, a page at a time, forwards the page (batched per
//!   region like any relay, so a recipient's messages keep their order in
//!   its home's commit lane), and takes out what was stored, writing
//!   `message.forwarded`. What failed stays, with its attempt counted, and
//!   is tried again after a backoff.
//! - A message is never delivered twice: it carries its id, so its home
//!   shard stores it once however often it is forwarded (a drainer that
//!   died between the home's commit and the spool's delete forwards it
//!   again, and is told it is a duplicate).
//! - A message its home refuses for good (the recipient left the directory,
//!   an access grant was revoked, the sender left the region) leaves the
//!   spool with a `message.undeliverable` event saying why: a receipt
//!   cannot be taken back, the event is how the sender learns.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_common::error::{ErrorKind, ServiceError};
use tokio_util::sync::CancellationToken;

use crate::error::GatewayError;
use crate::message::{Fate, Message, Receipt, SpoolDepth, SpooledMessage};
use crate::send::{deliver, route_to};
use crate::shared::Shared;
use crate::store::{DrainLock, SpoolStore};

/// How often a drainer looks at the spool without being woken.
pub(crate) const LOOK_INTERVAL: Duration = Duration::from_secs(1);
/// The first wait before a page that could not be forwarded is tried again.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Most messages a drainer forwards at once.
const PAGE_ROWS: u32 = 512;
/// Most payload bytes a drainer reads at once (a larger message comes
/// alone).
const PAGE_BYTES: usize = 16 * 1024 * 1024;

/// What a failure of the spool of `shard` tells the sender.
fn spool_unavailable(shard: &str, source: crate::error::StoreError) -> GatewayError {
    GatewayError::shard_unavailable(
        shard,
        "nothing was promised: retry with the same idempotency key (a retry is never stored twice)",
        source,
    )
}

/// Spools `message` in `shard` (its sender's home) for `destination` (its
/// recipient's home region) and returns its `SPOOLED` receipt.
pub(crate) async fn spool(
    shared: &Shared,
    shard: &str,
    destination: &str,
    message: Message,
) -> Result<Receipt, GatewayError> {
    let served = shared.shard(shard)?;
    let spooled = served
        .store
        .spool()
        .spool(destination, &message)
        .await
        .map_err(|source| spool_unavailable(shard, source))?;
    served.spool_wake.notify_one();
    Ok(Receipt {
        message_id: message.message_id,
        home_region: destination.to_string(),
        stored_at_micros: spooled.spooled_at_micros,
        duplicate: spooled.duplicate,
        spooled: true,
    })
}

/// Whether a forwarded message refused with `error` can never be stored:
/// its home region refused it for what it is, not for how things are now.
fn refused_for_good(error: &GatewayError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::InvalidArgument
            | ErrorKind::NotFound
            | ErrorKind::PermissionDenied
            | ErrorKind::FailedPrecondition
            | ErrorKind::AlreadyExists
    )
}

/// Runs the drainers of `shard` until `shutdown`: looks at its spool when
/// woken and every [`LOOK_INTERVAL`], keeps `depths` up to date, and drains
/// each destination with messages whose lock it gets.
pub(crate) async fn drain_shard(shared: Arc<Shared>, shard: String, shutdown: CancellationToken) {
    let Ok(served) = shared.shard(&shard) else {
        return;
    };
    let spool = served.store.spool();
    let wake = Arc::clone(&served.spool_wake);
    let mut drainers = tokio::task::JoinSet::new();
    let mut draining: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = wake.notified() => {}
            () = tokio::time::sleep(LOOK_INTERVAL) => {}
            Some(finished) = drainers.join_next(), if !drainers.is_empty() => {
                if let Ok(destination) = finished {
                    draining.remove(&destination);
                }
            }
        }
        let depths = match spool.depths().await {
            Ok(depths) => depths,
            Err(error) => {
                tracing::warn!(%shard, %error, "cannot read the spool; will look again");
                continue;
            }
        };
        shared.set_spool_depths(&shard, depths.clone());
        for SpoolDepth {
            destination_region, ..
        } in depths
        {
            if draining.contains(&destination_region) {
                continue;
            }
            let lock = match spool.lock_drain(&destination_region).await {
                Ok(Some(lock)) => lock,
                // Another replica drains it.
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%shard, destination = %destination_region, %error, "cannot take the spool drainer's lock; will look again");
                    continue;
                }
            };
            draining.insert(destination_region.clone());
            drainers.spawn(drain(
                Arc::clone(&shared),
                shard.clone(),
                Arc::clone(&spool),
                destination_region,
                lock,
                shutdown.clone(),
            ));
        }
    }
    while drainers.join_next().await.is_some() {}
}

/// Forwards what `shard` spooled for `destination` until nothing is left
/// (or `shutdown`), holding the destination's `lock`; returns the
/// destination.
async fn drain(
    shared: Arc<Shared>,
    shard: String,
    spool: Arc<dyn SpoolStore>,
    destination: String,
    lock: DrainLock,
    shutdown: CancellationToken,
) -> String {
    let mut backoff = FIRST_BACKOFF;
    let mut n_forwarded: u64 = 0;
    let started = tokio::time::Instant::now();
    // When the first page that got through was read: the drain's pace is
    // counted from there, not from the failed attempts before.
    let mut getting_through: Option<tokio::time::Instant> = None;
    tracing::info!(%shard, %destination, "draining the spool");
    while !shutdown.is_cancelled() {
        let page_started = tokio::time::Instant::now();
        let page = match spool.next(&destination, PAGE_ROWS, PAGE_BYTES).await {
            Ok(page) if page.is_empty() => break,
            Ok(page) => page,
            Err(error) => {
                tracing::warn!(%shard, %destination, %error, "cannot read the spool; will try again");
                backoff = wait(backoff, &shutdown).await;
                continue;
            }
        };
        let outcomes =
            futures_util::future::join_all(page.iter().map(|spooled| forward(&shared, spooled)))
                .await;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut last_error = None;
        for (spooled, outcome) in page.into_iter().zip(outcomes) {
            match outcome {
                Ok(receipt) => done.push((
                    spooled,
                    Fate::Forwarded {
                        home_region: receipt.home_region,
                        duplicate: receipt.duplicate,
                    },
                )),
                Err(error) if refused_for_good(&error) => {
                    tracing::warn!(%shard, message_id = %spooled.message.message_id, %error, "a spooled message was refused by its home region: it leaves the spool as undeliverable");
                    done.push((
                        spooled,
                        Fate::Undeliverable {
                            reason: error.to_string(),
                        },
                    ));
                }
                Err(error) => {
                    failed.push(spooled.message.message_id);
                    last_error = Some(error);
                }
            }
        }
        let forwarded = done.len() as u64;
        if let Err(error) = spool.remove(&done).await {
            // They stay spooled and are forwarded again: their home shard
            // knows them by id and stores nothing twice.
            tracing::warn!(%shard, %destination, %error, "cannot take forwarded messages out of the spool; they will be forwarded again");
            backoff = wait(backoff, &shutdown).await;
            continue;
        }
        n_forwarded += forwarded;
        if forwarded > 0 {
            getting_through.get_or_insert(page_started);
        }
        match last_error {
            None => backoff = FIRST_BACKOFF,
            Some(error) => {
                tracing::warn!(%shard, %destination, n_failed = failed.len(), %error, "spooled messages could not be forwarded; will try again");
                if let Err(error) = spool.attempted(&failed, &error.to_string()).await {
                    tracing::warn!(%shard, %destination, %error, "cannot record the attempt");
                }
                backoff = wait(backoff, &shutdown).await;
            }
        }
    }
    drop(lock);
    if n_forwarded > 0 {
        let forwarding = getting_through.map_or(Duration::ZERO, |since| since.elapsed());
        tracing::info!(
            %shard,
            %destination,
            n_forwarded,
            elapsed_ms = started.elapsed().as_millis() as u64,
            forwarding_ms = forwarding.as_millis() as u64,
            per_second = (n_forwarded as f64 / forwarding.as_secs_f64().max(1e-3)).round(),
            "spooled messages forwarded"
        );
    }
    destination
}

/// Waits `backoff` (or until `shutdown`) and returns the next backoff.
async fn wait(backoff: Duration, shutdown: &CancellationToken) -> Duration {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(backoff) => {}
    }
    (backoff * 2).min(MAX_BACKOFF)
}

/// Forwards one spooled message to its recipient's home as it is now (it
/// may have moved since it was spooled, even to this region).
async fn forward(shared: &Shared, spooled: &SpooledMessage) -> Result<Receipt, GatewayError> {
    let hold = shared.hold_until(None);
    let home = shared
        .settled_home(&spooled.message.recipient_id, hold)
        .await?;
    let route = route_to(shared, &home).await;
    deliver(shared, route, spooled.message.clone(), true, None).await
}
