//! Durable subscriptions: recorded in the control database, their queues
//! declared on the bus before a creation is answered, so that from then on
//! every event they select is kept.

use fedmesh_common::Identity;
use fedmesh_common::events::Filter;
use fedmesh_common::validate;

use super::Directory;
use crate::error::{DirectoryError, StoreError};
use crate::subscription::SubscriptionRecord;

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
}

/// Whether `identity` may see and change `subscription`: its owner and
/// operators may; notifiers may see it, to serve its subscribers.
fn may_use(identity: &Identity, subscription: &SubscriptionRecord) -> bool {
    matches!(identity, Identity::Operator(_) | Identity::Coordinator)
        || subscription.owner == identity.to_string()
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
        let queues = self.queues.as_ref().ok_or(DirectoryError::NoBus)?;
        let record = SubscriptionRecord {
            name: new.name,
            owner: identity.to_string(),
            filter,
            strict_order: new.strict_order,
            created_at_micros: fedmesh_common::time::now_micros(),
        };
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
        validate::subscription_name("name", name)?;
        let subscriptions = self.subscriptions.lock().await;
        let subscription = subscriptions
            .get(name)
            .ok_or_else(|| DirectoryError::SubscriptionNotFound(name.to_string()))?;
        if !may_use(identity, subscription) && *identity != Identity::Notifier {
            return Err(DirectoryError::PermissionDenied(format!(
                "subscription {name:?} is not {identity}'s"
            )));
        }
        Ok(subscription.clone())
    }

    /// The subscriptions `identity` may use, by name.
    pub async fn list_subscriptions(&self, identity: &Identity) -> Vec<SubscriptionRecord> {
        self.subscriptions
            .lock()
            .await
            .values()
            .filter(|subscription| may_use(identity, subscription))
            .cloned()
            .collect()
    }

    /// Deletes a subscription and its queue with what it holds.
    pub async fn delete_subscription(
        &self,
        identity: &Identity,
        name: &str,
    ) -> Result<(), DirectoryError> {
        validate::subscription_name("name", name)?;
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
        tracing::info!(subscription = %name, "subscription deleted");
        Ok(())
    }
}
