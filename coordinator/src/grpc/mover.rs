//! SINGLETON WORK (moves): the leader carries out the moves operators ask
//! for. It has no access to shard databases, so each step is a call to a
//! gateway of the region concerned (`fedmesh.v1.Moves`): transfer (freeze
//! the source inbox, copy it to the target), then the cut-over in the
//! control database under the lease's fencing token, then the release of
//! the source; or, for a cancelled move, the discard of the target's copy
//! and the thaw of the source. Every step may be run again: a leader that
//! dies anywhere leaves its successor a move it can finish.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_proto::pb;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::Request;

use super::GatewayChannels;

type MovesClient = pb::moves_client::MovesClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        fedmesh_common::identity::AttachIdentity,
    >,
>;
use crate::directory::Directory;
use crate::error::{DirectoryError, StoreError};
use crate::lease::Lease;
use crate::moves::{MovePhase, MoveRecord};

/// How often the leader looks for moves another replica recorded, and
/// retries a step that failed.
const POLL: Duration = Duration::from_secs(1);
/// How long a transfer may take at one gateway (it copies the whole inbox).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a release may take at one gateway.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(120);

/// Drives every move under way while this replica leads, until `shutdown`:
/// each move in a task of its own, so that one whose step hangs holds up
/// no other.
pub(crate) async fn run_moves(
    directory: Arc<Directory>,
    channels: Arc<GatewayChannels>,
    max_message_bytes: usize,
    mut leading: watch::Receiver<Option<Lease>>,
    shutdown: CancellationToken,
) {
    let mover = Arc::new(Mover {
        directory,
        channels,
        max_message_bytes,
    });
    // Dropped on return, which ends the moves' tasks; each task's move.
    let mut driving: JoinSet<()> = JoinSet::new();
    let mut driven: HashMap<tokio::task::Id, String> = HashMap::new();
    loop {
        while let Some(done) = driving.try_join_next_with_id() {
            driven.remove(&finished_task(done));
        }
        let lease = leading.borrow().clone();
        if let Some(lease) = lease {
            match mover.directory.store().moves_under_way().await {
                Ok(moves) => {
                    for record in moves {
                        if driven.values().any(|move_id| *move_id == record.move_id) {
                            continue;
                        }
                        let move_id = record.move_id.clone();
                        let mover = Arc::clone(&mover);
                        let task = driving.spawn(async move {
                            mover.drive(lease.token, record).await;
                        });
                        driven.insert(task.id(), move_id);
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot read the moves under way"),
            }
        } else if !driving.is_empty() {
            // Deposed: the new leader drives the moves.
            driving.abort_all();
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = mover.directory.moves_wake().notified() => {}
            _ = leading.changed() => {}
            Some(done) = driving.join_next_with_id() => {
                driven.remove(&finished_task(done));
            }
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// The task a join result is of, whether it ended, failed or was aborted.
fn finished_task(done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) -> tokio::task::Id {
    match done {
        Ok((id, ())) => id,
        Err(error) => error.id(),
    }
}

struct Mover {
    directory: Arc<Directory>,
    channels: Arc<GatewayChannels>,
    max_message_bytes: usize,
}

impl Mover {
    /// Takes `record` through its phases as far as it goes now; a failed
    /// step is recorded on the move and tried again at the next poll.
    async fn drive(&self, token: i64, mut record: MoveRecord) {
        loop {
            let step = match record.phase {
                MovePhase::Copying => self.copy_and_cut_over(token, &record).await,
                MovePhase::Releasing => self
                    .release(
                        &record.from_region,
                        &record,
                        &record.from_shard,
                        pb::Release::Tombstone,
                    )
                    .await
                    .map(|()| true),
                MovePhase::Cancelling => self.undo(&record).await.map(|()| true),
                MovePhase::Done | MovePhase::Cancelled => return,
            };
            let next = match step {
                Ok(true) if record.phase == MovePhase::Copying => {
                    self.directory.agency_move(&record.move_id).await
                }
                Ok(true) => self
                    .directory
                    .finish_move(token, &record.move_id)
                    .await
                    .and_then(|finished| {
                        finished.ok_or_else(|| DirectoryError::MoveNotFound(record.move_id.clone()))
                    }),
                // Cancelled meanwhile: the next round undoes it.
                Ok(false) => self.directory.agency_move(&record.move_id).await,
                Err(failure) => {
                    tracing::warn!(move_id = %record.move_id, agency_id = %record.agency_id, phase = record.phase.as_str(), %failure, "a step of the move failed; it is tried again");
                    let recorded = self
                        .directory
                        .store()
                        .record_move_progress(
                            &record.move_id,
                            record.messages_copied,
                            record.keys_copied,
                            &failure,
                        )
                        .await;
                    if let Err(error) = recorded {
                        tracing::warn!(%error, "cannot record the move's failure");
                    }
                    return;
                }
            };
            match next {
                Ok(next) => record = next,
                Err(DirectoryError::Store(StoreError::Fenced { token, current })) => {
                    tracing::warn!(token, ?current, move_id = %record.move_id, "not the leader any more: the move is left to the new one");
                    return;
                }
                Err(error) => {
                    tracing::warn!(move_id = %record.move_id, %error, "cannot go on with the move");
                    return;
                }
            }
        }
    }

    /// Copies the inbox through a gateway of the source region, then cuts
    /// over; false if the move was cancelled meanwhile.
    async fn copy_and_cut_over(&self, token: i64, record: &MoveRecord) -> Result<bool, String> {
        let copied = self.transfer(record).await?;
        tracing::info!(
            move_id = %record.move_id,
            agency_id = %record.agency_id,
            messages = copied.messages_copied,
            unacknowledged = copied.unacknowledged,
            keys = copied.keys_copied,
            "inbox copied to its new shard"
        );
        self.directory
            .store()
            .record_move_progress(
                &record.move_id,
                copied.messages_copied,
                copied.keys_copied,
                "",
            )
            .await
            .map_err(|error| format!("cannot record the copy: {error}"))?;
        match self.directory.cut_over_move(token, record).await {
            Ok(cut) => Ok(cut.is_some()),
            Err(error) => Err(format!("cut-over: {error}")),
        }
    }

    /// Undoes a cancelled move: the target's copy goes, the source thaws.
    async fn undo(&self, record: &MoveRecord) -> Result<(), String> {
        self.release(
            &record.to_region,
            record,
            &record.to_shard,
            pb::Release::Discard,
        )
        .await?;
        self.release(
            &record.from_region,
            record,
            &record.from_shard,
            pb::Release::Thaw,
        )
        .await
    }

    /// Makes `call` at the first gateway of `region` that answers it.
    async fn at_a_gateway<T, Answer>(
        &self,
        region: &str,
        step: &str,
        mut call: impl FnMut(MovesClient) -> Answer,
    ) -> Result<T, String>
    where
        Answer: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut failure = format!("no gateway of region {region} reports to the coordinator");
        let addresses = self.directory.state().gateway_addresses(region);
        for address in addresses {
            let channel = match self.channels.get(region, &address) {
                Ok(channel) => channel,
                Err(error) => {
                    failure = format!("{step} at {address}: {error}");
                    continue;
                }
            };
            let client =
                pb::moves_client::MovesClient::with_interceptor(channel, self.channels.attach())
                    .max_encoding_message_size(self.max_message_bytes)
                    .max_decoding_message_size(self.max_message_bytes);
            match call(client).await {
                Ok(answer) => return Ok(answer),
                Err(status) => failure = format!("{step} at {address}: {}", status.message()),
            }
        }
        Err(failure)
    }

    /// Runs the transfer on the first gateway of the source region that
    /// answers.
    async fn transfer(&self, record: &MoveRecord) -> Result<pb::TransferAgencyResponse, String> {
        let request = pb::TransferAgencyRequest {
            r#move: Some(super::directory::move_to_pb(record)),
        };
        self.at_a_gateway(&record.from_region, "transfer", |mut client| {
            let mut call = Request::new(request.clone());
            call.set_timeout(TRANSFER_TIMEOUT);
            async move { Ok(client.transfer_agency(call).await?.into_inner()) }
        })
        .await
    }

    /// Releases what the move left on `shard` of `region`, at the first of
    /// its gateways that answers.
    async fn release(
        &self,
        region: &str,
        record: &MoveRecord,
        shard: &str,
        release: pb::Release,
    ) -> Result<(), String> {
        let request = pb::ReleaseAgencyRequest {
            move_id: record.move_id.clone(),
            agency_id: record.agency_id.clone(),
            shard: shard.to_string(),
            release: release as i32,
        };
        let deleted = self
            .at_a_gateway(region, "release", |mut client| {
                let mut call = Request::new(request.clone());
                call.set_timeout(RELEASE_TIMEOUT);
                async move { Ok(client.release_agency(call).await?.into_inner().deleted) }
            })
            .await?;
        tracing::info!(move_id = %record.move_id, shard, release = release.as_str_name(), deleted, "move released a shard");
        Ok(())
    }
}
