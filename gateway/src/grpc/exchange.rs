//! `fedmesh.v1.Exchange`: Send and the Receive stream, converted between the
//! wire and the gateway core (`Shared::store_local`, `receive`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use fedmesh_common::error::InvalidField;
use fedmesh_common::identity::{Identity, caller};
use fedmesh_proto::pb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::convert;
use crate::error::GatewayError;
use crate::receive::{Inbound, Outbound, Receiver};
use crate::shared::{Shared, require_agency};

/// Responses a Receive stream holds before the client takes them: at most a
/// page, so that with the page being read a stream holds at most two pages
/// (each bounded by bytes, see `StreamState`).
const OUTBOUND_BUFFER: usize = crate::inbox::stream::PAGE_ROWS as usize;

/// The Exchange service of one gateway.
pub(crate) struct ExchangeService {
    pub(crate) shared: Arc<Shared>,
}

/// The responses of a Receive stream: the deliveries the stream produced,
/// then the status it ended with. An ending status goes out at once,
/// ahead of deliveries still buffered for a client that stopped reading.
pub(crate) struct ReceiveStream {
    items: mpsc::Receiver<Outbound>,
    ended: Option<oneshot::Receiver<Status>>,
}

impl Stream for ReceiveStream {
    type Item = Result<pb::ReceiveResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(ended) = self.ended.as_mut()
            && let Poll::Ready(outcome) = Pin::new(ended).poll(context)
        {
            self.ended = None;
            if let Ok(status) = outcome {
                self.items.close();
                while self.items.try_recv().is_ok() {}
                return Poll::Ready(Some(Err(status)));
            }
        }
        self.items
            .poll_recv(context)
            .map(|item| item.map(|item| Ok(response_to_pb(item))))
    }
}

fn response_to_pb(item: Outbound) -> pb::ReceiveResponse {
    use pb::receive_response::Response;
    let response = match item {
        Outbound::Delivery(entry) => Response::Delivery(pb::Delivery {
            sequence: entry.sequence,
            message: Some(convert::message_to_pb(entry.message)),
        }),
        Outbound::Idle { unacknowledged } => Response::Idle(pb::Idle { unacknowledged }),
    };
    pb::ReceiveResponse {
        response: Some(response),
    }
}

fn inbound_from_pb(request: Result<pb::ReceiveRequest, Status>) -> Inbound {
    match request {
        Ok(pb::ReceiveRequest {
            request: Some(pb::receive_request::Request::Ack(ack)),
        }) => Inbound::Ack(convert::ack_from_pb(ack)),
        Ok(_) => Inbound::Malformed(InvalidField::new(
            "ack",
            "after `open`, only `ack` requests may be sent",
        )),
        Err(status) => match fedmesh_common::server::MalformedRequest::in_stream(&status) {
            Some(malformed) => Inbound::Malformed(InvalidField::new("ack", malformed.to_string())),
            None => Inbound::Broken(status.message().to_string()),
        },
    }
}

#[tonic::async_trait]
impl pb::exchange_server::Exchange for ExchangeService {
    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let identity = caller(&request)?;
        let deadline = convert::deadline_of(&request);
        let traceparent = convert::traceparent_of(&request);
        let shared = &self.shared;
        // Everything logged on the way to the receipt (routing, relay
        // failures, retries) carries the message's trace id.
        let span = tracing::debug_span!(
            "send",
            region = %shared.region,
            trace_id = %traceparent.trace_id(),
            message_id = tracing::field::Empty,
        );
        let message = convert::message_from_send(request.into_inner(), &shared.region, traceparent)
            .map_err(GatewayError::from)?;
        span.record("message_id", tracing::field::display(&message.message_id));
        require_agency(&identity, &message.sender_id, "send as")?;
        span.in_scope(|| {
            tracing::debug!(
                sender_id = %message.sender_id,
                recipient_id = %message.recipient_id,
                "message accepted"
            );
        });
        let _in_flight = shared.in_flight();
        let receipt = crate::send::send(shared, message, deadline)
            .instrument(span)
            .await?;
        Ok(Response::new(pb::SendResponse {
            receipt: Some(convert::receipt_to_pb(receipt)),
        }))
    }

    async fn get_inbox(
        &self,
        request: Request<pb::GetInboxRequest>,
    ) -> Result<Response<pb::GetInboxResponse>, Status> {
        let identity = caller(&request)?;
        let agency_id = request.into_inner().agency_id;
        fedmesh_common::validate::agency_id("agency_id", &agency_id).map_err(GatewayError::from)?;
        if !matches!(identity, Identity::Operator(_)) {
            require_agency(&identity, &agency_id, "read the inbox of")?;
        }
        let stats = self.shared.inbox_stats(&agency_id).await?;
        Ok(Response::new(pb::GetInboxResponse {
            unacknowledged: stats.unacknowledged,
            last_sequence: stats.last_sequence,
        }))
    }

    type ReceiveStream = ReceiveStream;

    async fn receive(
        &self,
        request: Request<Streaming<pb::ReceiveRequest>>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        let identity = caller(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound.message().await.map_err(|status| {
            match fedmesh_common::server::MalformedRequest::in_stream(&status) {
                Some(malformed) => fedmesh_common::error::to_status(&malformed),
                None => status,
            }
        })?;
        let open = match first {
            Some(pb::ReceiveRequest {
                request: Some(pb::receive_request::Request::Open(open)),
            }) => open,
            _ => {
                return Err(GatewayError::from(InvalidField::new(
                    "open",
                    "the first request on a Receive stream must be `open`",
                ))
                .into());
            }
        };
        let receiver =
            Receiver::open(&self.shared, &identity, &open.agency_id, open.window).await?;
        let (items, outbound) = mpsc::channel(OUTBOUND_BUFFER);
        let (end, ended) = oneshot::channel();
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let inbound = inbound.map(inbound_from_pb);
            if let Err(error) = receiver.run(&shared, inbound, &items).await {
                let _ = end.send(Status::from(error));
            }
        });
        Ok(Response::new(ReceiveStream {
            items: outbound,
            ended: Some(ended),
        }))
    }
}
