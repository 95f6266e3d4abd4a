//! The path of a `Send`, from an accepted message to its receipt: where the
//! sender and the recipient live, the claim of the sender's idempotency
//! key, then the recipient's home shard, here or through a relay.
//!
//! A key is claimed in the sender's home shard. When the recipient lives on
//! that shard too, the claim and the message commit together; otherwise the
//! claim commits first, and a retry of the same message (same key, same
//! content) travels with the id the key named, so its home shard finds it
//! stored and answers with the first receipt.

use tokio::time::Instant;

use crate::error::GatewayError;
use crate::message::{Message, Receipt, ToStore};
use crate::routing::{Route, route};
use crate::shared::Shared;

/// Takes `message`, accepted from its sender by this gateway, to its
/// recipient's home shard; a write whose `deadline` passes before its batch
/// is taken is not stored.
pub(crate) async fn send(
    shared: &Shared,
    message: Message,
    deadline: Option<Instant>,
) -> Result<Receipt, GatewayError> {
    shared.check_payload(message.payload.len())?;
    let sender_home = shared.require_homed_here(&message.sender_id).await?;
    let recipient_home = shared.home_of(&message.recipient_id).await?;
    shared.check_access(&message.sender_id, &message.recipient_id, &message.kind)?;
    let route = route(
        &shared.topology.borrow(),
        &shared.region,
        &recipient_home,
        shared.spread(),
    );
    let Some(fingerprint) = message
        .idempotency_key
        .is_some()
        .then(|| message.fingerprint())
    else {
        return deliver(shared, route, message, false, deadline).await;
    };
    if matches!(&route, Route::Local { shard } if *shard == sender_home.shard) {
        let item = ToStore {
            message,
            claim: Some(fingerprint),
            may_exist: false,
        };
        return shared.store_local(&sender_home.shard, item, deadline).await;
    }
    let (message, retry) = shared
        .claim_key(&sender_home.shard, message, fingerprint, deadline)
        .await?;
    deliver(shared, route, message, retry, deadline).await
}

/// Stores `message` by `route`; `may_exist` says its id may be stored
/// already (a retry).
async fn deliver(
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
