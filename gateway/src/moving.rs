//! What a gateway does with writes for an agency being moved: they wait
//! for the move's cut-over, then go to the agency's new home.
//!
//! The topology says an agency is moving from the moment its move is
//! recorded until its cut-over gives it a new home. Sends to or from it
//! wait meanwhile (at most `--move-hold-ms`, never past the caller's
//! deadline). A write that races the cut-over, from a gateway whose
//! topology is behind, is refused by the source shard itself (its inbox is
//! frozen there: `Refused::Moved`) or by the recipient's old home gateway
//! (`ForwardError.moved`); the sending gateway then waits for its topology
//! to change and sends again, with the same message id and key, so the
//! retry is never stored twice.

use tokio::time::Instant;

use fedmesh_common::topology::AgencyHome;

use crate::error::GatewayError;
use crate::shared::Shared;

impl Shared {
    /// Until when a write for a moving agency may wait: the hold setting,
    /// and never past `deadline`.
    pub(crate) fn hold_until(&self, deadline: Option<Instant>) -> Instant {
        let hold = Instant::now() + std::time::Duration::from_millis(self.config.move_hold_ms);
        deadline.map_or(hold, |deadline| deadline.min(hold))
    }

    /// Where `agency_id` lives, once no move of it is under way: waits
    /// while the topology says it moves, until `hold`.
    pub(crate) async fn settled_home(
        &self,
        agency_id: &str,
        hold: Instant,
    ) -> Result<AgencyHome, GatewayError> {
        let home = self.home_of(agency_id).await?;
        if !home.moving {
            return Ok(home);
        }
        let mut topology = self.topology.clone();
        loop {
            let now = topology
                .borrow_and_update()
                .agencies
                .get(agency_id)
                .cloned();
            match now {
                Some(home) if !home.moving => return Ok(home),
                Some(_) => {}
                // Deregistered meanwhile.
                None => return self.home_of(agency_id).await,
            }
            match tokio::time::timeout_at(hold, topology.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(GatewayError::ShuttingDown("retry on another gateway")),
                Err(_) => {
                    return Err(GatewayError::AgencyMoving {
                        agency_id: agency_id.to_string(),
                    });
                }
            }
        }
    }

    /// Waits until the topology's entry of `agency_id` is no longer `seen`
    /// (the home a write was refused at), until `hold`; false if it stays.
    pub(crate) async fn home_changes(
        &self,
        agency_id: &str,
        seen: &AgencyHome,
        hold: Instant,
    ) -> bool {
        self.home_becomes(agency_id, hold, |home| home != Some(seen))
            .await
    }

    /// Waits until the topology's entry of `agency_id` is `wanted`, until
    /// `until`; false if it is not by then.
    pub(crate) async fn home_becomes(
        &self,
        agency_id: &str,
        until: Instant,
        wanted: impl Fn(Option<&AgencyHome>) -> bool,
    ) -> bool {
        let mut topology = self.topology.clone();
        loop {
            if wanted(topology.borrow_and_update().agencies.get(agency_id)) {
                return true;
            }
            match tokio::time::timeout_at(until, topology.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }
}
