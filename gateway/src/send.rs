//! The path of a `Send`, from an accepted message to its receipt: where the
//! sender and the recipient live, the claim of the sender's idempotency
//! key, then the recipient's home shard, here or through a relay.
//!
//! A key is claimed in the sender's home shard. When the recipient lives on
//! that shard too, the claim and the message commit together; otherwise the
//! claim commits first, and a retry of the same message (same key, same
//! content) travels with the id the key named, so its home shard finds it
//! stored and answers with the first receipt.
//!
//! When the recipient's region cannot be reached, the message goes to the
//! spool of the sender's home shard and the sender gets a `SPOOLED`
//! receipt; so does every later message of the sender for that recipient
//! while earlier ones wait there (see `crate::spool`).

use fedmesh_common::discovery::RegionEndpoints;
use fedmesh_common::topology::AgencyHome;
use tokio::time::Instant;

use crate::error::GatewayError;
use crate::message::{Fingerprint, Message, Receipt, ToStore};
use crate::routing::{Route, route};
use crate::shared::Shared;
use crate::spool;
use crate::store::SpoolPair;

/// Takes `message`, accepted from its sender by this gateway, to its
/// recipient's home shard; a write whose `deadline` passes before its batch
/// is taken is not stored. While the sender or the recipient is being
/// moved, the send waits for the move's cut-over (see `crate::moving`).
pub(crate) async fn send(
    shared: &Shared,
    message: Message,
    deadline: Option<Instant>,
) -> Result<Receipt, GatewayError> {
    shared.check_payload(message.payload.len())?;
    let hold = shared.hold_until(deadline);
    loop {
        let recipient_home = shared.settled_home(&message.recipient_id, hold).await?;
        // Kept for a resend; the payload is shared, not copied.
        match send_once(shared, message.clone(), &recipient_home, deadline, hold).await {
            Err(error) if error.moved_away() => {
                if !shared
                    .home_changes(&message.recipient_id, &recipient_home, hold)
                    .await
                {
                    return Err(error);
                }
                tracing::debug!(
                    message_id = %message.message_id,
                    recipient_id = %message.recipient_id,
                    "the recipient moved while its message was on the way: sending it again"
                );
            }
            outcome => return outcome,
        }
    }
}

/// One attempt of `send`, to the recipient at `recipient_home`.
async fn send_once(
    shared: &Shared,
    message: Message,
    recipient_home: &AgencyHome,
    deadline: Option<Instant>,
    hold: Instant,
) -> Result<Receipt, GatewayError> {
    let sender_home = shared.settled_home(&message.sender_id, hold).await?;
    if sender_home.region != shared.region {
        return Err(GatewayError::WrongRegion {
            agency_id: message.sender_id,
            home_region: sender_home.region,
            region: shared.region.clone(),
        });
    }
    shared.check_access(&message.sender_id, &message.recipient_id, &message.kind)?;
    let route = route_to(shared, recipient_home).await;
    let fingerprint = message
        .idempotency_key
        .is_some()
        .then(|| message.fingerprint());
    if let Some(fingerprint) = fingerprint
        && matches!(&route, Route::Local { shard } if *shard == sender_home.shard)
    {
        let item = ToStore {
            message,
            claim: Some(fingerprint),
            may_exist: false,
        };
        return shared.store_local(&sender_home.shard, item, deadline).await;
    }
    let Route::Relay { region, .. } = &route else {
        let (message, may_exist) =
            claim_key(shared, &sender_home.shard, message, fingerprint, deadline).await?;
        return deliver(shared, route, message, may_exist, deadline).await;
    };
    // Behind what the sender has spooled for this recipient, if anything:
    // asked while the key is claimed, both in the sender's home shard.
    let region = region.clone();
    let pair = SpoolPair::of(&message);
    let (claimed, held) = tokio::join!(
        claim_key(shared, &sender_home.shard, message, fingerprint, deadline),
        shared.spool_holds(&sender_home.shard, pair, deadline),
    );
    let (message, may_exist) = claimed?;
    if held? {
        return spool::spool(shared, &sender_home.shard, &region, message).await;
    }
    match deliver(shared, route, message.clone(), may_exist, deadline).await {
        Err(GatewayError::RegionUnreachable { source, .. }) => {
            tracing::debug!(
                message_id = %message.message_id,
                %region,
                error = source.as_ref().map(|status| status.message().to_string()),
                "the recipient's region cannot be reached: spooling the message"
            );
            spool::spool(shared, &sender_home.shard, &region, message).await
        }
        outcome => outcome,
    }
}

/// Claims the idempotency key of `message` in `shard` (its sender's home)
/// when it has one (`fingerprint`); returns the message to send (with the
/// id the key names) and whether that id may be stored already (a retry).
async fn claim_key(
    shared: &Shared,
    shard: &str,
    message: Message,
    fingerprint: Option<Fingerprint>,
    deadline: Option<Instant>,
) -> Result<(Message, bool), GatewayError> {
    match fingerprint {
        None => Ok((message, false)),
        Some(fingerprint) => {
            shared
                .claim_key(shard, message, fingerprint, deadline)
                .await
        }
    }
}

/// The route from this gateway to a recipient at `home`.
pub(crate) async fn route_to(shared: &Shared, home: &AgencyHome) -> Route {
    let found = if home.region == shared.region {
        RegionEndpoints::default()
    } else {
        shared.upstream.discovered(&home.region).await
    };
    route(&shared.topology.borrow(), &shared.region, home, &found)
}

/// Stores `message` by `route`; `may_exist` says its id may be stored
/// already (a retry).
pub(crate) async fn deliver(
    shared: &Shared,
    route: Route,
    message: Message,
    may_exist: bool,
    deadline: Option<Instant>,
) -> Result<Receipt, GatewayError> {
    match route {
        Route::Local { shard } => {
            let item = ToStore {
                message,
                claim: None,
                may_exist,
            };
            shared.store_local(&shard, item, deadline).await
        }
        Route::Relay { region, gateways } => {
            shared
                .upstream
                .forward(&region, &gateways, message, deadline)
                .await
        }
    }
}
