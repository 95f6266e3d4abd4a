//! Durable subscriptions: recorded in the control database, their queues
//! declared on the bus before a creation is answered, so that from then on
//! every event they select is kept.

use fedmesh_common::Identity;
use fedmesh_common::error::InvalidField;
use fedmesh_common::events::{Event, Filter};
use fedmesh_common::validate;

use super::Directory;
use crate::error::{DirectoryError, StoreError};
use crate::subscription::{SubscriptionRecord, WebhookTarget};

/// What a caller asks a new subscription to be.
#[derive(Debug, Clone, Default)]
pub struct NewSubscription {
    /// Its name.
    pub name: String,
    /// Allowed regions (empty: all).
    pub regions: Vec<String>,
    /// Allowed agencies (empty: all).
    pub agencies: Vec<String>,
    /// Allowed kinds (empty: all).
    pub kinds: Vec<String>,
    /// One subscriber at a time, in order.
    pub strict_order: bool,
    /// Deliver to this webhook URL rather than to Consume streams.
    pub webhook_url: Option<String>,
}

/// Dead letters listed at once when the caller asks for none (0), and at
/// most.
const DEFAULT_DEAD_LETTERS_LISTED: u32 = 100;
const MAX_DEAD_LETTERS_LISTED: u32 = 1000;
/// Dead letters replayed at once, at most.
const MAX_DEAD_LETTERS_REPLAYED: u32 = 100_000;

/// Whether `identity` may see and change `subscription`: its owner and
/// operators may.
fn may_use(identity: &Identity, subscription: &SubscriptionRecord) -> bool {
    matches!(identity, Identity::Operator(_) | Identity::Coordinator)
        || subscription.owner == identity.to_string()
}

/// Whether `identity` may see `subscription`: who may use it, and notifiers,
/// which serve its subscribers and deliver to its webhook.
fn may_see(identity: &Identity, subscription: &SubscriptionRecord) -> bool {
    *identity == Identity::Notifier || may_use(identity, subscription)
}

impl Directory {
    /// Records a durable subscription and declares its queue; answers only
    /// once the queue keeps its events.
    pub async fn create_subscription(
        &self,
        identity: &Identity,
        new: NewSubscription,
    ) -> Result<SubscriptionRecord, DirectoryError> {
        validate::subscription_name("name", &new.name)?;
        if !matches!(identity, Identity::Agency(_) | Identity::Operator(_)) {
            return Err(DirectoryError::PermissionDenied(format!(
                "{identity} may not create subscriptions; agencies and operators may"
            )));
        }
        let filter = Filter::for_caller(new.regions, new.agencies, new.kinds, identity)?;
        let webhook = match new.webhook_url {
            Some(url) => {
                let uri = fedmesh_common::webhook::url("subscription.webhook.url", &url)?;
                // Plain http reaches the notifiers' own host: operators
                // only, never an agency (it could reach local services).
                if uri.scheme_str() != Some("https") && !matches!(identity, Identity::Operator(_)) {
                    return Err(InvalidField::new(
                        "subscription.webhook.url",
                        format!("{url:?} is plain http: an agency's webhook is https://"),
                    )
                    .into());
                }
                let secret = fedmesh_common::webhook::new_secret().map_err(|error| {
                    DirectoryError::Store(StoreError::corrupt(format!(
                        "no randomness for a webhook secret: {error}"
                    )))
                })?;
                Some(WebhookTarget { url, secret })
            }
            None => None,
        };
        let queues = self.queues.as_ref().ok_or(DirectoryError::NoBus)?;
        let record = SubscriptionRecord {
            name: new.name,
            owner: identity.to_string(),
            filter,
            strict_order: new.strict_order,
            created_at_micros: fedmesh_common::time::now_micros(),
            webhook,
        };
        let mut synced = self.synced.lock().await;
        let mut subscriptions = self.subscriptions.lock().await;
        match self.store.insert_subscription(&record).await {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                return Err(DirectoryError::SubscriptionExists(record.name));
            }
            Err(error) => return Err(error.into()),
        }
        if let Err(error) = queues.declare(record.queue_spec()).await {
            tracing::warn!(subscription = %record.name, %error, "cannot declare the subscription's queue");
            if let Err(error) = self.store.delete_subscription(&record.name).await {
                tracing::error!(subscription = %record.name, %error, "cannot forget the subscription whose queue failed");
            }
            return Err(DirectoryError::BusUnavailable("nothing was created"));
        }
        subscriptions.insert(record.name.clone(), record.clone());
        drop(subscriptions);
        self.changed(&mut synced).await;
        tracing::info!(subscription = %record.name, owner = %record.owner, "subscription created");
        Ok(record)
    }

    /// Declares the queue of every subscription (at start: a bus kept in
    /// memory starts empty, and a broker's queue may have been removed by
    /// hand); a queue that exists is left as it is.
    pub async fn declare_subscription_queues(&self) {
        let Some(queues) = &self.queues else { return };
        let subscriptions = self.subscriptions.lock().await;
        for subscription in subscriptions.values() {
            if let Err(error) = queues.declare(subscription.queue_spec()).await {
                tracing::warn!(subscription = %subscription.name, %error, "cannot declare the subscription's queue");
            }
        }
    }

    /// One subscription, for its owner, an operator or a notifier.
    pub async fn get_subscription(
        &self,
        identity: &Identity,
        name: &str,
    ) -> Result<SubscriptionRecord, DirectoryError> {
        self.subscription_for(identity, name, may_see).await
    }

    /// The subscriptions `identity` may see, by name; a notifier sees all
    /// (it delivers those with webhooks).
    pub async fn list_subscriptions(&self, identity: &Identity) -> Vec<SubscriptionRecord> {
        self.subscriptions
            .lock()
            .await
            .values()
            .filter(|subscription| may_see(identity, subscription))
            .cloned()
            .collect()
    }

    /// The subscription `name` if `allowed` lets `identity` have it.
    async fn subscription_for(
        &self,
        identity: &Identity,
        name: &str,
        allowed: fn(&Identity, &SubscriptionRecord) -> bool,
    ) -> Result<SubscriptionRecord, DirectoryError> {
        validate::subscription_name("name", name)?;
        let subscriptions = self.subscriptions.lock().await;
        let subscription = subscriptions
            .get(name)
            .ok_or_else(|| DirectoryError::SubscriptionNotFound(name.to_string()))?;
        if !allowed(identity, subscription) {
            return Err(DirectoryError::PermissionDenied(format!(
                "subscription {name:?} is not {identity}'s"
            )));
        }
        Ok(subscription.clone())
    }

    /// Up to `limit` (0: 100) dead letters of a subscription, oldest first.
    pub async fn dead_letters(
        &self,
        identity: &Identity,
        name: &str,
        limit: u32,
    ) -> Result<Vec<Event>, DirectoryError> {
        let limit = match limit {
            0 => DEFAULT_DEAD_LETTERS_LISTED,
            1..=MAX_DEAD_LETTERS_LISTED => limit,
            _ => {
                return Err(InvalidField::new(
                    "limit",
                    format!("list 1 to {MAX_DEAD_LETTERS_LISTED} dead letters at once (0 means {DEFAULT_DEAD_LETTERS_LISTED})"),
                )
                .into());
            }
        };
        let subscription = self.subscription_for(identity, name, may_use).await?;
        if subscription.webhook.is_none() {
            return Err(DirectoryError::NoDeadLetters(subscription.name));
        }
        let queues = self.queues.as_ref().ok_or(DirectoryError::NoBus)?;
        queues
            .dead_letters(name, limit as usize)
            .await
            .map_err(|error| {
                tracing::warn!(subscription = %name, %error, "cannot list dead letters");
                DirectoryError::BusUnavailable("nothing was listed")
            })
    }

    /// Puts up to `limit` (0: all) dead letters of a subscription back on
    /// it; how many.
    pub async fn replay_dead_letters(
        &self,
        identity: &Identity,
        name: &str,
        limit: u32,
    ) -> Result<usize, DirectoryError> {
        if limit > MAX_DEAD_LETTERS_REPLAYED {
            return Err(InvalidField::new(
                "limit",
                format!(
                    "replay at most {MAX_DEAD_LETTERS_REPLAYED} dead letters at once (0 means all)"
                ),
            )
            .into());
        }
        let subscription = self.subscription_for(identity, name, may_use).await?;
        if subscription.webhook.is_none() {
            return Err(DirectoryError::NoDeadLetters(subscription.name));
        }
        let queues = self.queues.as_ref().ok_or(DirectoryError::NoBus)?;
        let limit = if limit == 0 {
            usize::MAX
        } else {
            limit as usize
        };
        let replayed = queues
            .replay_dead_letters(name, limit)
            .await
            .map_err(|error| {
                tracing::warn!(subscription = %name, %error, "cannot replay dead letters");
                DirectoryError::BusUnavailable("some dead letters may have been replayed")
            })?;
        tracing::info!(subscription = %name, replayed, %identity, "dead letters replayed");
        Ok(replayed)
    }

    /// Deletes a subscription and its queue with what it holds.
    pub async fn delete_subscription(
        &self,
        identity: &Identity,
        name: &str,
    ) -> Result<(), DirectoryError> {
        validate::subscription_name("name", name)?;
        let mut synced = self.synced.lock().await;
        let mut subscriptions = self.subscriptions.lock().await;
        let subscription = subscriptions
            .get(name)
            .ok_or_else(|| DirectoryError::SubscriptionNotFound(name.to_string()))?;
        if !may_use(identity, subscription) {
            return Err(DirectoryError::PermissionDenied(format!(
                "subscription {name:?} is not {identity}'s"
            )));
        }
        let queues = self.queues.as_ref().ok_or(DirectoryError::NoBus)?;
        if let Err(error) = queues.delete(name).await {
            tracing::warn!(subscription = %name, %error, "cannot delete the subscription's queue");
            return Err(DirectoryError::BusUnavailable(
                "the subscription is still there",
            ));
        }
        self.store.delete_subscription(name).await?;
        subscriptions.remove(name);
        drop(subscriptions);
        self.changed(&mut synced).await;
        tracing::info!(subscription = %name, "subscription deleted");
        Ok(())
    }
}
