//! `fedmesh.v1.Relay` on the coordinator: a gateway that cannot reach a
//! region's gateways itself sends its batch here, and the coordinator
//! forwards each message to a gateway of its recipient's home region.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_common::error::ErrorKind;
use fedmesh_common::identity::{AttachIdentity, Identity, caller};
use fedmesh_proto::pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::GatewayChannels;
use crate::directory::Directory;
use crate::error::DirectoryError;

type RelayClient = pb::relay_client::RelayClient<InterceptedService<Channel, AttachIdentity>>;

/// Most messages in one batch relayed through the coordinator.
const MAX_BATCH: usize = 1000;

/// How long one gateway may take over a batch before the next is tried.
const RELAY_TIMEOUT: Duration = Duration::from_secs(10);

/// The Relay service of a coordinator.
pub(crate) struct CoordinatorRelay {
    pub(crate) directory: Arc<Directory>,
    pub(crate) channels: Arc<GatewayChannels>,
    pub(crate) max_message_bytes: usize,
}

impl CoordinatorRelay {
    fn client(&self, region: &str, address: &str) -> Result<RelayClient, tonic::transport::Error> {
        let channel = self.channels.get(region, address)?;
        Ok(
            pb::relay_client::RelayClient::with_interceptor(channel, self.channels.attach())
                .max_encoding_message_size(self.max_message_bytes)
                .max_decoding_message_size(self.max_message_bytes),
        )
    }

    /// Sends `messages` to the first gateway of `region` that answers.
    async fn to_region(
        &self,
        region: &str,
        messages: Vec<pb::ForwardRequest>,
        timeout: Duration,
    ) -> Result<Vec<pb::ForwardResult>, String> {
        let expected = messages.len();
        let request = pb::ForwardBatchRequest { messages };
        let gateways = self.directory.state().gateway_addresses(region);
        let mut failure = format!("no gateway of region {region} reports to the coordinator");
        for address in gateways {
            let mut client = match self.client(region, &address) {
                Ok(client) => client,
                Err(error) => {
                    failure = error.to_string();
                    continue;
                }
            };
            let mut call = Request::new(request.clone());
            call.set_timeout(timeout);
            match client.forward_batch(call).await {
                Ok(response) => {
                    let results = response.into_inner().results;
                    if results.len() == expected {
                        return Ok(results);
                    }
                    failure = format!(
                        "{address} answered {} results for {expected} messages",
                        results.len()
                    );
                }
                Err(status) => failure = format!("{address}: {}", status.message()),
            }
        }
        Err(failure)
    }
}

fn error_result(kind: ErrorKind, message: String) -> pb::ForwardResult {
    pb::ForwardResult {
        result: Some(pb::forward_result::Result::Error(pb::ForwardError {
            code: kind.grpc_code() as i32,
            message,
            moved: false,
            unreachable: false,
        })),
    }
}

#[tonic::async_trait]
impl pb::relay_server::Relay for CoordinatorRelay {
    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        let batch = Request::from_parts(
            metadata,
            extensions,
            pb::ForwardBatchRequest {
                messages: vec![message],
            },
        );
        let mut results = self.forward_batch(batch).await?.into_inner().results;
        match results.pop().and_then(|result| result.result) {
            Some(pb::forward_result::Result::Receipt(receipt)) => {
                Ok(Response::new(pb::ForwardResponse {
                    receipt: Some(receipt),
                }))
            }
            Some(pb::forward_result::Result::Error(error)) => Err(DirectoryError::Relayed {
                kind: ErrorKind::of_code(tonic::Code::from_i32(error.code)),
                message: error.message,
            }
            .into()),
            None => Err(DirectoryError::Relayed {
                kind: ErrorKind::Internal,
                message: "the relay answered nothing".into(),
            }
            .into()),
        }
    }

    async fn forward_batch(
        &self,
        request: Request<pb::ForwardBatchRequest>,
    ) -> Result<Response<pb::ForwardBatchResponse>, Status> {
        // A gateway relays only what its own region accepted.
        let Identity::Gateway(forwarder) = caller(&request)? else {
            return Err(DirectoryError::PermissionDenied(
                "only gateways relay through the coordinator".into(),
            )
            .into());
        };
        let messages = request.into_inner().messages;
        if messages.len() > MAX_BATCH {
            return Err(
                DirectoryError::from(fedmesh_common::error::InvalidField::new(
                    "messages",
                    format!(
                        "{} messages given, at most {MAX_BATCH} per batch",
                        messages.len()
                    ),
                ))
                .into(),
            );
        }
        let mut results: Vec<Option<pb::ForwardResult>> = vec![None; messages.len()];
        let mut by_region: BTreeMap<String, Vec<(usize, pb::ForwardRequest)>> = BTreeMap::new();
        for (index, forward) in messages.into_iter().enumerate() {
            let Some(message) = &forward.message else {
                results[index] = Some(error_result(
                    ErrorKind::InvalidArgument,
                    "message: a relayed request carries its message".into(),
                ));
                continue;
            };
            if message.origin_region != forwarder {
                results[index] = Some(error_result(
                    ErrorKind::PermissionDenied,
                    format!(
                        "gateway/{forwarder} may not relay a message accepted in {}",
                        message.origin_region
                    ),
                ));
                continue;
            }
            match self.directory.get_agency(&message.recipient_id) {
                Ok(recipient) => by_region
                    .entry(recipient.region)
                    .or_default()
                    .push((index, forward)),
                Err(error) => {
                    let status = Status::from(error);
                    results[index] = Some(error_result(
                        ErrorKind::of_code(status.code()),
                        status.message().to_string(),
                    ));
                }
            }
        }
        for (region, batch) in by_region {
            let (indexes, messages): (Vec<usize>, Vec<pb::ForwardRequest>) =
                batch.into_iter().unzip();
            tracing::debug!(%forwarder, %region, messages = messages.len(), "relaying through the coordinator");
            // No longer than the longest deadline the messages carry: a hop
            // never extends a sender's deadline.
            let timeout = messages
                .iter()
                .map(|forward| match forward.timeout_micros {
                    0 => RELAY_TIMEOUT,
                    micros => Duration::from_micros(micros).min(RELAY_TIMEOUT),
                })
                .max()
                .unwrap_or(RELAY_TIMEOUT);
            match self.to_region(&region, messages, timeout).await {
                Ok(answers) => {
                    for (index, answer) in indexes.into_iter().zip(answers) {
                        results[index] = Some(answer);
                    }
                }
                Err(failure) => {
                    for index in indexes {
                        let mut result = error_result(
                            ErrorKind::Unavailable,
                            format!(
                                "region {region} cannot be reached from the coordinator either ({failure}); retry"
                            ),
                        );
                        if let Some(pb::forward_result::Result::Error(error)) = &mut result.result {
                            error.unreachable = true;
                        }
                        results[index] = Some(result);
                    }
                }
            }
        }
        let results = results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| error_result(ErrorKind::Internal, "no result".into()))
            })
            .collect();
        Ok(Response::new(pb::ForwardBatchResponse { results }))
    }
}
