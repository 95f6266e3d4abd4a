//! `fedmesh.v1.Relay`: stores messages other regions accepted.

use std::sync::Arc;

use fedmesh_common::identity::{Identity, caller};
use fedmesh_proto::pb;
use tonic::{Request, Response, Status};

use super::convert;
use crate::Shared;
use crate::error::GatewayError;

/// The Relay service of one gateway.
pub(crate) struct RelayService {
    pub(crate) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl pb::relay_server::Relay for RelayService {
    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        let identity = caller(&request)?;
        if !matches!(identity, Identity::Gateway(_)) {
            return Err(GatewayError::PermissionDenied(format!(
                "{identity} may not relay messages; only gateways may"
            ))
            .into());
        }
        let message =
            convert::message_from_forward(request.into_inner()).map_err(GatewayError::from)?;
        let shared = &self.shared;
        shared.check_payload(message.payload.len())?;
        let home = shared.home_of(&message.recipient_id).await?;
        if home.region != shared.config.region {
            return Err(GatewayError::WrongRegion {
                agency_id: message.recipient_id,
                home_region: home.region,
                region: shared.config.region.clone(),
            }
            .into());
        }
        let receipt = shared.store_local(&home.shard, message).await?;
        Ok(Response::new(pb::ForwardResponse {
            receipt: Some(convert::receipt_to_pb(receipt)),
        }))
    }
}
