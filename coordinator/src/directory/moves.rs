//! Moves of agencies as the directory records them: asked for by an
//! operator on any replica, carried out by the leader (`grpc::mover`),
//! which cuts them over and finishes them under its fencing token.

use fedmesh_common::audit::AuditRecord;
use fedmesh_common::events::{AGENCY_MOVED, Event};
use fedmesh_common::identity::Identity;
use fedmesh_common::validate;

use super::Directory;
use crate::agency::AgencyRecord;
use crate::error::{DirectoryError, StoreError};
use crate::moves::{MovePhase, MoveRecord};

impl Directory {
    /// Records a move of `agency_id` to `shard` (of `region`, or of its own
    /// region when `region` is empty; placed on the region's emptiest shard
    /// when `shard` is empty) and marks the agency moving, as `actor` asked.
    pub async fn move_agency(
        &self,
        actor: &Identity,
        agency_id: &str,
        shard: &str,
        region: &str,
    ) -> Result<MoveRecord, DirectoryError> {
        let mut synced = self.synced.lock().await;
        validate::agency_id("agency_id", agency_id)?;
        if !region.is_empty() {
            validate::region("region", region)?;
        }
        let agency = self.get_agency(agency_id)?;
        if agency.moving {
            return Err(DirectoryError::CannotMove(format!(
                "agency {agency_id} is being moved already; wait for that move to end or cancel it (`fedmesh agency move {agency_id} --cancel MOVE_ID`)"
            )));
        }
        let to_region = if region.is_empty() {
            agency.region.clone()
        } else {
            region.to_string()
        };
        let to_shard = {
            let state = self.state();
            if !state.has_region(&to_region) {
                return Err(DirectoryError::RegionNotFound {
                    region: to_region,
                    known: state.region_names().join(", "),
                });
            }
            if shard.is_empty() {
                if to_region == agency.region {
                    return Err(fedmesh_common::error::InvalidField::new(
                        "shard",
                        format!(
                            "agency {agency_id} lives in region {to_region} already: name a shard (--shard) or another region (--region) to move it to"
                        ),
                    )
                    .into());
                }
                state.pick_shard(&to_region).ok_or_else(|| {
                    DirectoryError::NoShardFor(format!(
                        "no shard of region {to_region} takes new agencies"
                    ))
                })?
            } else {
                let named = state
                    .shard(shard)
                    .filter(|named| named.region == to_region)
                    .ok_or_else(|| {
                        DirectoryError::ShardNotFound(format!("{shard} (in {to_region})"))
                    })?;
                if named.name == agency.shard {
                    return Err(DirectoryError::CannotMove(format!(
                        "agency {agency_id} lives on shard {shard} already"
                    )));
                }
                if !state.takes_agencies(named) {
                    return Err(DirectoryError::NoShardFor(format!(
                        "shard {shard} is draining or full"
                    )));
                }
                shard.to_string()
            }
        };
        let now = fedmesh_common::time::now_micros();
        let record = MoveRecord {
            move_id: uuid::Uuid::now_v7().to_string(),
            agency_id: agency_id.to_string(),
            from_region: agency.region.clone(),
            from_shard: agency.shard.clone(),
            to_region,
            to_shard,
            phase: MovePhase::Copying,
            messages_copied: 0,
            keys_copied: 0,
            last_error: String::new(),
            started_at_micros: now,
            updated_at_micros: now,
        };
        match self.store.begin_move(&record).await {
            Ok(true) => {}
            Ok(false) => return Err(DirectoryError::AgencyNotFound(agency_id.to_string())),
            Err(StoreError::Conflict) => {
                return Err(DirectoryError::CannotMove(format!(
                    "agency {agency_id} moved or began moving meanwhile; look it up and try again"
                )));
            }
            Err(error) => return Err(error.into()),
        }
        self.state().upsert_agency(AgencyRecord {
            moving: true,
            version: agency.version + 1,
            ..agency
        });
        tracing::info!(
            agency_id,
            move_id = %record.move_id,
            from = %record.from_shard,
            to = %record.to_shard,
            to_region = %record.to_region,
            "agency moving"
        );
        self.audit(AuditRecord {
            chain: record.from_region.clone(),
            actor: actor.to_string(),
            action: "move".into(),
            target: format!("agency/{agency_id}"),
            outcome: "ok".into(),
            detail: move_detail(&record),
        })
        .await;
        self.changed(&mut synced).await;
        self.moves_wake.notify_one();
        Ok(record)
    }

    /// One move.
    pub async fn agency_move(&self, move_id: &str) -> Result<MoveRecord, DirectoryError> {
        check_move_id(move_id)?;
        self.store
            .agency_move(move_id)
            .await?
            .ok_or_else(|| DirectoryError::MoveNotFound(move_id.to_string()))
    }

    /// The moves under way, oldest first.
    pub async fn moves_under_way(&self) -> Result<Vec<MoveRecord>, DirectoryError> {
        Ok(self.store.moves_under_way().await?)
    }

    /// Cancels a move before its cut-over, as `actor` asked: the leader then
    /// undoes the copy and the agency stays where it was.
    pub async fn cancel_move(
        &self,
        actor: &Identity,
        move_id: &str,
    ) -> Result<MoveRecord, DirectoryError> {
        check_move_id(move_id)?;
        let record = self
            .store
            .cancel_move(move_id)
            .await?
            .ok_or_else(|| DirectoryError::MoveNotFound(move_id.to_string()))?;
        match record.phase {
            MovePhase::Cancelling | MovePhase::Cancelled => {}
            MovePhase::Copying | MovePhase::Releasing | MovePhase::Done => {
                return Err(DirectoryError::CannotMove(format!(
                    "move {move_id} cut over already: agency {} lives on shard {} ({}); move it back with `fedmesh agency move`",
                    record.agency_id, record.to_shard, record.to_region
                )));
            }
        }
        tracing::info!(move_id, agency_id = %record.agency_id, "move cancelled");
        self.audit(AuditRecord {
            chain: record.from_region.clone(),
            actor: actor.to_string(),
            action: "cancel-move".into(),
            target: format!("agency/{}", record.agency_id),
            outcome: "ok".into(),
            detail: move_detail(&record),
        })
        .await;
        self.moves_wake.notify_one();
        Ok(record)
    }

    /// Cuts `record` over under the leader's `token`: the agency gets its new
    /// home, published to watchers. None if the move was cancelled meanwhile.
    pub async fn cut_over_move(
        &self,
        token: i64,
        record: &MoveRecord,
    ) -> Result<Option<MoveRecord>, DirectoryError> {
        let mut synced = self.synced.lock().await;
        let event = self.outbox_wake.as_ref().map(|_| {
            Event::new(AGENCY_MOVED, &record.to_region, &record.agency_id)
                .with_attribute("from_region", &record.from_region)
                .with_attribute("from_shard", &record.from_shard)
                .with_attribute("shard", &record.to_shard)
                .with_attribute("move_id", &record.move_id)
        });
        let Some(cut) = self
            .store
            .cut_over_move(token, &record.move_id, event)
            .await?
        else {
            return Ok(None);
        };
        self.wake_outbox();
        let moved = self.state().agency(&cut.agency_id).cloned();
        if let Some(agency) = moved {
            self.state().upsert_agency(AgencyRecord {
                region: cut.to_region.clone(),
                shard: cut.to_shard.clone(),
                moving: false,
                version: agency.version + 1,
                ..agency
            });
        }
        tracing::info!(
            move_id = %cut.move_id,
            agency_id = %cut.agency_id,
            shard = %cut.to_shard,
            region = %cut.to_region,
            "move cut over: the agency lives at its new home"
        );
        self.changed(&mut synced).await;
        Ok(Some(cut))
    }

    /// Ends a released or cancelled move under the leader's `token`; a
    /// cancelled agency is no longer moving, published to watchers.
    pub async fn finish_move(
        &self,
        token: i64,
        move_id: &str,
    ) -> Result<Option<MoveRecord>, DirectoryError> {
        let mut synced = self.synced.lock().await;
        let Some(record) = self.store.finish_move(token, move_id).await? else {
            return Ok(None);
        };
        if record.phase == MovePhase::Cancelled {
            let agency = self.state().agency(&record.agency_id).cloned();
            if let Some(agency) = agency {
                self.state().upsert_agency(AgencyRecord {
                    moving: false,
                    version: agency.version + 1,
                    ..agency
                });
            }
            self.changed(&mut synced).await;
        }
        tracing::info!(move_id, phase = record.phase.as_str(), "move ended");
        Ok(Some(record))
    }

    /// Notified when a move is asked for or cancelled on this replica.
    pub fn moves_wake(&self) -> &tokio::sync::Notify {
        &self.moves_wake
    }
}

/// A move as the audit log describes it.
fn move_detail(record: &MoveRecord) -> String {
    format!(
        "move {}: shard {} ({}) to shard {} ({})",
        record.move_id, record.from_shard, record.from_region, record.to_shard, record.to_region
    )
}

/// Refuses a move id that cannot be one (a UUID).
fn check_move_id(move_id: &str) -> Result<(), DirectoryError> {
    if uuid::Uuid::parse_str(move_id).is_err() {
        return Err(fedmesh_common::error::InvalidField::new(
            "move_id",
            format!("{move_id:?} is not a move id (a UUID, as `fedmesh agency move` prints it)"),
        )
        .into());
    }
    Ok(())
}
