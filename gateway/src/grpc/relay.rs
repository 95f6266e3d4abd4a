//! `fedmesh.v1.Relay`: stores messages other regions accepted.

use std::sync::Arc;
use std::time::Duration;

use fedmesh_common::identity::{Identity, caller};
use fedmesh_proto::pb;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::convert;
use crate::error::GatewayError;
use crate::message::ToStore;
use crate::shared::Shared;
use crate::trace_context::trace_id_of;

/// The Relay service of one gateway.
pub(crate) struct RelayService {
    pub(crate) shared: Arc<Shared>,
}

impl RelayService {
    /// Stores one relayed message in its home shard of this region, if
    /// the gateway of `forwarder` (a region) may relay it: its sender must
    /// be homed there.
    async fn forward_one(
        shared: &Shared,
        forwarder: Option<&str>,
        request: pb::ForwardRequest,
        call_deadline: Option<Instant>,
    ) -> Result<pb::Receipt, GatewayError> {
        let deadline = message_deadline(request.timeout_micros, call_deadline);
        let message = convert::message_from_forward(request)?;
        shared.check_payload(message.payload.len())?;
        if let Some(forwarder) = forwarder
            && message.origin_region != forwarder
        {
            return Err(GatewayError::PermissionDenied(format!(
                "gateway/{forwarder} may not relay a message accepted in {}",
                message.origin_region
            )));
        }
        let sender_home = shared.home_of(&message.sender_id).await?;
        if sender_home.region != message.origin_region {
            return Err(GatewayError::PermissionDenied(format!(
                "gateway/{} may not relay a message of {}, who is homed in {}",
                message.origin_region, message.sender_id, sender_home.region
            )));
        }
        shared.check_access(&message.sender_id, &message.recipient_id, &message.kind)?;
        let home = shared.home_of(&message.recipient_id).await?;
        // The origin gateway holds a write for a moving agency and sends it
        // again once its topology shows where the agency went.
        if home.moving {
            return Err(GatewayError::AgencyMoving {
                agency_id: message.recipient_id,
            });
        }
        if home.region != shared.region {
            return Err(GatewayError::WrongRegion {
                agency_id: message.recipient_id,
                home_region: home.region,
                region: shared.region.clone(),
            });
        }
        // The same trace id as the origin gateway's log lines of the
        // message, so that one search finds it in both regions.
        let span = tracing::debug_span!(
            "forward",
            region = %shared.region,
            trace_id = %trace_id_of(&message.traceparent),
            message_id = %message.message_id,
            origin_region = %message.origin_region,
        );
        // A relayed message may be a retry: its id is looked up first.
        let item = ToStore {
            message,
            claim: None,
            may_exist: true,
        };
        let receipt = shared
            .store_local(&home.shard, item, deadline)
            .instrument(span.clone())
            .await?;
        span.in_scope(|| {
            tracing::debug!(
                shard = %home.shard,
                duplicate = receipt.duplicate,
                "relayed message stored"
            );
        });
        Ok(convert::receipt_to_pb(receipt))
    }
}

/// When a relayed message must be taken into a batch by: what its sender
/// had left when it was relayed (`timeout_micros`, 0: no deadline), and
/// never after the call's own deadline.
fn message_deadline(timeout_micros: u64, call_deadline: Option<Instant>) -> Option<Instant> {
    let own = (timeout_micros > 0)
        .then(|| Instant::now().checked_add(Duration::from_micros(timeout_micros)))
        .flatten();
    match (own, call_deadline) {
        (Some(own), Some(call)) => Some(own.min(call)),
        (own, call) => own.or(call),
    }
}

/// Most messages in one ForwardBatch.
const MAX_FORWARD_BATCH: usize = 1000;

/// Who relays: a gateway (the region it serves) or the coordinator (None:
/// relaying for a gateway that could not reach this region, it checked
/// that gateway's region already).
fn forwarder<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    match caller(request)? {
        Identity::Gateway(region) => Ok(Some(region)),
        Identity::Coordinator => Ok(None),
        other => Err(GatewayError::PermissionDenied(format!(
            "{other} may not relay messages; only gateways and the coordinator may"
        ))
        .into()),
    }
}

/// One message's result, as the origin gateway reads it.
fn result_to_pb(outcome: Result<pb::Receipt, GatewayError>) -> pb::ForwardResult {
    let result = match outcome {
        Ok(receipt) => pb::forward_result::Result::Receipt(receipt),
        Err(error) => {
            // The recipient does not live here (any more): the origin sends
            // again once its topology shows where it lives.
            let moved = matches!(
                error,
                GatewayError::AgencyMoving { .. } | GatewayError::WrongRegion { .. }
            );
            let status = Status::from(error);
            pb::forward_result::Result::Error(pb::ForwardError {
                code: status.code() as i32,
                message: status.message().to_string(),
                moved,
                unreachable: false,
            })
        }
    };
    pb::ForwardResult {
        result: Some(result),
    }
}

#[tonic::async_trait]
impl pb::relay_server::Relay for RelayService {
    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        let forwarder = forwarder(&request)?;
        let deadline = convert::deadline_of(&request);
        let receipt = Self::forward_one(
            &self.shared,
            forwarder.as_deref(),
            request.into_inner(),
            deadline,
        )
        .await?;
        Ok(Response::new(pb::ForwardResponse {
            receipt: Some(receipt),
        }))
    }

    async fn forward_batch(
        &self,
        request: Request<pb::ForwardBatchRequest>,
    ) -> Result<Response<pb::ForwardBatchResponse>, Status> {
        let forwarder = forwarder(&request)?;
        let deadline = convert::deadline_of(&request);
        let messages = request.into_inner().messages;
        if messages.len() > MAX_FORWARD_BATCH {
            return Err(GatewayError::from(fedmesh_common::error::InvalidField::new(
                "messages",
                format!(
                    "{} messages given, at most {MAX_FORWARD_BATCH} per batch",
                    messages.len()
                ),
            ))
            .into());
        }
        // All at once in this call's task, so that the shard's committer
        // takes them together into its lanes' next batches: no task per
        // message.
        let forwarder = forwarder.as_deref();
        let outcomes = futures_util::future::join_all(
            messages
                .into_iter()
                .map(|message| Self::forward_one(&self.shared, forwarder, message, deadline)),
        )
        .await;
        let results = outcomes.into_iter().map(result_to_pb).collect();
        Ok(Response::new(pb::ForwardBatchResponse { results }))
    }
}
