//! `fedmesh.v1.Moves`: the steps of an agency's move that touch shards,
//! asked for by the leading coordinator (which has no access to shard
//! databases). See ARCHITECTURE.md, "Moving an agency".
//!
//! A transfer freezes the inbox on its source shard first: from then on no
//! write to it commits there, whatever a gateway's topology says, so what is
//! copied is all there is. Everything here may run again (a leader that
//! died mid-move leaves the move to its successor): the freeze, the copy
//! (imports keep what is there) and the releases are idempotent.

use std::sync::Arc;
use std::time::Duration;

use fedmesh_common::error::InvalidField;
use fedmesh_common::topology::AgencyHome;
use fedmesh_common::validate;
use fedmesh_proto::pb;
use prost::Message as _;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::error::{GatewayError, StoreError};
use crate::message::{InboxPosition, MovedKey, MovedMessage};
use crate::shared::{Shard, Shared};

/// Rows read from the source shard at a time.
const PAGE_ROWS: u32 = 1000;
/// How long one page may take at a gateway of the target region.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a step waits for this gateway's topology to show what the
/// coordinator decided (the move, its cut-over) before refusing.
const TOPOLOGY_WAIT: Duration = Duration::from_secs(5);

/// The Moves service of one gateway.
pub(crate) struct MovesService {
    pub(crate) shared: Arc<Shared>,
}

/// What a transfer copies into: a shard this gateway serves, or a gateway
/// of the target region.
enum Target<'a> {
    Local { shard: &'a Shard, name: &'a str },
    Remote(RemoteImport<'a>),
}

/// Pages of an import to a gateway of another region, each as large as a
/// gateway decodes.
struct RemoteImport<'a> {
    shared: &'a Shared,
    region: String,
    request: pb::ImportAgencyRequest,
    /// The encoded size of what `request` holds, kept as it grows.
    bytes: usize,
}

/// Tag and length prefix of an entry of a repeated field.
const FIELD_OVERHEAD: usize = 6;

impl Target<'_> {
    async fn messages(&mut self, page: Vec<MovedMessage>) -> Result<(), GatewayError> {
        match self {
            Target::Local { shard, name } => {
                shard
                    .store
                    .import_messages(&page)
                    .await
                    .map_err(|source| target_failed(name, source))?;
                Ok(())
            }
            Target::Remote(remote) => {
                for moved in page {
                    let moved = convert::moved_message_to_pb(moved);
                    remote.make_room(moved.encoded_len()).await?;
                    remote.request.messages.push(moved);
                }
                Ok(())
            }
        }
    }

    async fn keys(&mut self, page: Vec<MovedKey>) -> Result<(), GatewayError> {
        match self {
            Target::Local { shard, name } => {
                shard
                    .store
                    .import_keys(&page)
                    .await
                    .map_err(|source| target_failed(name, source))?;
                Ok(())
            }
            Target::Remote(remote) => {
                for key in page {
                    let key = convert::moved_key_to_pb(key);
                    remote.make_room(key.encoded_len()).await?;
                    remote.request.keys.push(key);
                }
                Ok(())
            }
        }
    }

    /// Opens the inbox at the target with its source position.
    async fn open(&mut self, agency_id: &str, position: InboxPosition) -> Result<(), GatewayError> {
        match self {
            Target::Local { shard, name } => shard
                .store
                .open_imported_inbox(agency_id, position)
                .await
                .map_err(|source| target_failed(name, source)),
            Target::Remote(remote) => {
                remote.request.last_sequence = position.last_sequence;
                remote.request.epoch = position.epoch;
                remote.request.last = true;
                remote.flush().await
            }
        }
    }
}

impl RemoteImport<'_> {
    /// Sends what the request holds if an entry of `size` bytes would take
    /// it past what a gateway decodes.
    async fn make_room(&mut self, size: usize) -> Result<(), GatewayError> {
        let limit = self.shared.upstream.gateways().max_request_bytes();
        let size = size + FIELD_OVERHEAD;
        if self.bytes > 0 && self.bytes + size > limit {
            self.flush().await?;
        }
        if self.bytes == 0 {
            // The request's own fields (ids, the last page's position).
            self.bytes = self.request.encoded_len() + 64;
        }
        self.bytes += size;
        Ok(())
    }

    /// Sends what the request holds to the first gateway of the target
    /// region that takes it.
    async fn flush(&mut self) -> Result<(), GatewayError> {
        let addresses: Vec<String> = self
            .shared
            .topology
            .borrow()
            .gateways
            .values()
            .filter(|gateway| gateway.region == self.region)
            .map(|gateway| gateway.address.clone())
            .collect();
        let mut failure = None;
        for address in addresses {
            let mut client = match self
                .shared
                .upstream
                .gateways()
                .moves_client(&self.region, &address)
            {
                Ok(client) => client,
                Err(error) => {
                    tracing::warn!(%address, %error, "cannot reach a gateway of the move's target region");
                    continue;
                }
            };
            let mut call = Request::new(self.request.clone());
            call.set_timeout(IMPORT_TIMEOUT);
            match client.import_agency(call).await {
                Ok(_) => {
                    self.request.messages.clear();
                    self.request.keys.clear();
                    self.bytes = 0;
                    return Ok(());
                }
                Err(status) => failure = Some(Arc::new(status)),
            }
        }
        Err(GatewayError::RegionUnreachable {
            region: self.region.clone(),
            source: failure,
        })
    }
}

fn target_failed(shard: &str, source: StoreError) -> GatewayError {
    GatewayError::shard_unavailable(shard, "the move is tried again", source)
}

impl MovesService {
    /// Freezes the inbox of the move's agency on its source shard (this
    /// region's) and copies it to the target.
    async fn transfer(
        &self,
        request: pb::TransferAgencyRequest,
    ) -> Result<pb::TransferAgencyResponse, GatewayError> {
        let shared = self.shared.as_ref();
        let order = request
            .r#move
            .ok_or_else(|| InvalidField::new("move", "move is required"))?;
        let agency_id = order.agency_id.as_str();
        validate::agency_id("move.agency_id", agency_id)?;
        validate::region("move.to_region", &order.to_region)?;
        if order.from_region != shared.region {
            return Err(InvalidField::new(
                "move.from_region",
                format!(
                    "this gateway serves {}, not the move's source region {}",
                    shared.region, order.from_region
                ),
            )
            .into());
        }
        let source = shared.shard(&order.from_shard)?;
        let source_failed = |source: StoreError| {
            GatewayError::shard_unavailable(&order.from_shard, "the move is tried again", source)
        };
        let epoch = source
            .store
            .freeze_inbox(agency_id)
            .await
            .map_err(source_failed)?;
        // Streams on this replica end now; other replicas hear of the new
        // epoch through the shard.
        shared.hub.claimed(agency_id, epoch);
        let position = source
            .store
            .inbox_position(agency_id)
            .await
            .map_err(source_failed)?;
        let mut target = if order.to_region == shared.region {
            Target::Local {
                shard: shared.shard(&order.to_shard)?,
                name: &order.to_shard,
            }
        } else {
            Target::Remote(RemoteImport {
                shared,
                region: order.to_region.clone(),
                request: pb::ImportAgencyRequest {
                    move_id: order.move_id.clone(),
                    agency_id: agency_id.to_string(),
                    shard: order.to_shard.clone(),
                    ..Default::default()
                },
                bytes: 0,
            })
        };
        let page_bytes = shared.config.max_payload_bytes;
        let (mut messages, mut unacknowledged, mut after) = (0_u64, 0_u64, 0_u64);
        loop {
            let page = source
                .store
                .export_messages(agency_id, after, PAGE_ROWS, page_bytes)
                .await
                .map_err(source_failed)?;
            let Some(last) = page.last() else {
                break;
            };
            after = last.sequence;
            messages += page.len() as u64;
            unacknowledged += page
                .iter()
                .filter(|moved| moved.acked_at_micros.is_none())
                .count() as u64;
            target.messages(page).await?;
        }
        let (mut keys, mut after_key) = (0_u64, None::<String>);
        loop {
            let page = source
                .store
                .export_keys(agency_id, after_key.as_deref(), PAGE_ROWS)
                .await
                .map_err(source_failed)?;
            let Some(last) = page.last() else {
                break;
            };
            after_key = Some(last.idempotency_key.clone());
            keys += page.len() as u64;
            target.keys(page).await?;
        }
        target.open(agency_id, position).await?;
        tracing::info!(
            move_id = %order.move_id,
            agency_id,
            messages,
            unacknowledged,
            keys,
            to = %order.to_shard,
            "inbox copied"
        );
        Ok(pb::TransferAgencyResponse {
            messages_copied: messages,
            keys_copied: keys,
            unacknowledged,
        })
    }

    /// Writes a page of a moving agency's rows into a shard of this region.
    async fn import(
        &self,
        request: pb::ImportAgencyRequest,
    ) -> Result<pb::ImportAgencyResponse, GatewayError> {
        let shared = self.shared.as_ref();
        let agency_id = request.agency_id.as_str();
        validate::agency_id("agency_id", agency_id)?;
        // Only an agency moving takes rows: a stray import cannot write
        // into an inbox that lives. The move's topology version may reach
        // this gateway a moment after the transfer began.
        let moving = shared
            .home_becomes(agency_id, Instant::now() + TOPOLOGY_WAIT, |home| {
                home.is_some_and(|home| home.moving)
            })
            .await;
        if !moving {
            return Err(GatewayError::NotMoving {
                agency_id: agency_id.to_string(),
            });
        }
        let shard = shared.shard(&request.shard)?;
        let failed = |source: StoreError| {
            GatewayError::shard_unavailable(&request.shard, "the move is tried again", source)
        };
        let messages = request
            .messages
            .into_iter()
            .map(|moved| convert::moved_message_from_pb(agency_id, moved))
            .collect::<Result<Vec<_>, _>>()?;
        let keys = request
            .keys
            .into_iter()
            .map(|key| convert::moved_key_from_pb(agency_id, key))
            .collect::<Result<Vec<_>, _>>()?;
        let messages_new = shard
            .store
            .import_messages(&messages)
            .await
            .map_err(failed)?;
        let keys_new = shard.store.import_keys(&keys).await.map_err(failed)?;
        if request.last {
            shard
                .store
                .open_imported_inbox(
                    agency_id,
                    InboxPosition {
                        last_sequence: request.last_sequence,
                        epoch: request.epoch,
                    },
                )
                .await
                .map_err(failed)?;
        }
        Ok(pb::ImportAgencyResponse {
            messages_new,
            keys_new,
        })
    }

    /// Clears what a move left on a shard of this region, when the topology
    /// shows the agency does not live there (or, for a thaw, that it does).
    async fn release(
        &self,
        request: pb::ReleaseAgencyRequest,
    ) -> Result<pb::ReleaseAgencyResponse, GatewayError> {
        let shared = self.shared.as_ref();
        let agency_id = request.agency_id.as_str();
        validate::agency_id("agency_id", agency_id)?;
        let release = pb::Release::try_from(request.release)
            .ok()
            .filter(|release| *release != pb::Release::Unspecified)
            .ok_or_else(|| {
                InvalidField::new("release", "release must be TOMBSTONE, DISCARD or THAW")
            })?;
        let shard = shared.shard(&request.shard)?;
        // After a cut-over or a cancel, this gateway's topology may show it
        // a moment after the coordinator asks.
        let region = shared.region.as_str();
        let lives_here = |home: Option<&AgencyHome>| {
            home.is_some_and(|home| home.region == region && home.shard == request.shard)
        };
        let wait = Instant::now() + TOPOLOGY_WAIT;
        let lives_here = match release {
            pb::Release::Thaw => shared.home_becomes(agency_id, wait, lives_here).await,
            _ => {
                !shared
                    .home_becomes(agency_id, wait, |home| !lives_here(home))
                    .await
            }
        };
        let failed = |source: StoreError| {
            GatewayError::shard_unavailable(&request.shard, "the move is tried again", source)
        };
        let deleted = match release {
            pb::Release::Thaw => {
                if !lives_here {
                    return Err(GatewayError::NotMoving {
                        agency_id: agency_id.to_string(),
                    });
                }
                shard.store.thaw_inbox(agency_id).await.map_err(failed)?;
                0
            }
            pb::Release::Tombstone | pb::Release::Discard => {
                if lives_here {
                    // This gateway's topology is behind the move's cut-over
                    // (or the move was cancelled): the leader asks again.
                    return Err(GatewayError::StillHome {
                        agency_id: agency_id.to_string(),
                        shard: request.shard.clone(),
                    });
                }
                shard
                    .store
                    .forget_agency(agency_id, release == pb::Release::Tombstone)
                    .await
                    .map_err(failed)?
            }
            pb::Release::Unspecified => 0,
        };
        Ok(pb::ReleaseAgencyResponse { deleted })
    }
}

#[tonic::async_trait]
impl pb::moves_server::Moves for MovesService {
    async fn transfer_agency(
        &self,
        request: Request<pb::TransferAgencyRequest>,
    ) -> Result<Response<pb::TransferAgencyResponse>, Status> {
        Ok(Response::new(self.transfer(request.into_inner()).await?))
    }

    async fn import_agency(
        &self,
        request: Request<pb::ImportAgencyRequest>,
    ) -> Result<Response<pb::ImportAgencyResponse>, Status> {
        Ok(Response::new(self.import(request.into_inner()).await?))
    }

    async fn release_agency(
        &self,
        request: Request<pb::ReleaseAgencyRequest>,
    ) -> Result<Response<pb::ReleaseAgencyResponse>, Status> {
        Ok(Response::new(self.release(request.into_inner()).await?))
    }
}
