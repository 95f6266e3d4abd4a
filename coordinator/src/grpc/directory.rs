//! `fedmesh.v1.Directory` on top of [`Directory`].

use std::pin::Pin;
use std::sync::Arc;

use fedmesh_common::audit::{AuditEntry, AuditRecord};
use fedmesh_common::identity::{Identity, caller};
use fedmesh_common::time::now_micros;
use fedmesh_common::validate;
use fedmesh_proto::pb;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::directory::{Directory, GatewayRecord, NewSubscription, NotifierRecord};
use crate::directory::{agency_to_pb, grant_to_pb, shard_to_pb};
use crate::error::DirectoryError;
use crate::moves::{MovePhase, MoveRecord};
use crate::region::ShardRecord;
use crate::subscription::SubscriptionRecord;

/// The Directory service of one coordinator.
pub(crate) struct DirectoryService {
    pub(crate) directory: Arc<Directory>,
    /// The lease this replica holds, if it leads.
    pub(crate) leadership: tokio::sync::watch::Receiver<Option<crate::lease::Lease>>,
    pub(crate) report_interval: std::time::Duration,
    pub(crate) shutdown: CancellationToken,
}

fn require_operator(identity: &Identity) -> Result<(), Status> {
    match identity {
        Identity::Operator(_) | Identity::Coordinator => Ok(()),
        other => Err(DirectoryError::PermissionDenied(format!(
            "{other} may not change the directory; only operators may"
        ))
        .into()),
    }
}

/// Most audit rows in one page.
const MAX_AUDIT_PAGE: u32 = 1000;

fn audit_to_pb(entry: &AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        chain: entry.record.chain.clone(),
        seq: entry.seq,
        at: Some(fedmesh_common::time::timestamp_from_micros(entry.at_micros)),
        actor: entry.record.actor.clone(),
        action: entry.record.action.clone(),
        target: entry.record.target.clone(),
        outcome: entry.record.outcome.clone(),
        detail: entry.record.detail.clone(),
        prev_hash: entry.prev_hash.clone(),
        hash: entry.hash.clone(),
        at_micros: entry.at_micros,
    }
}

fn subscription_to_pb(subscription: &SubscriptionRecord) -> pb::Subscription {
    pb::Subscription {
        name: subscription.name.clone(),
        regions: subscription.filter.regions.clone(),
        agencies: subscription.filter.agencies.clone(),
        kinds: subscription.filter.kinds.clone(),
        order: if subscription.strict_order {
            pb::SubscriptionOrder::Strict
        } else {
            pb::SubscriptionOrder::Throughput
        } as i32,
        owner: subscription.owner.clone(),
        created_at: Some(fedmesh_common::time::timestamp_from_micros(
            subscription.created_at_micros,
        )),
        webhook: subscription.webhook.as_ref().map(|webhook| pb::Webhook {
            url: webhook.url.clone(),
            secret: webhook.secret.clone(),
        }),
    }
}

type TopologyStream = Pin<Box<dyn Stream<Item = Result<pb::TopologyUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl pb::directory_server::Directory for DirectoryService {
    async fn register_agency(
        &self,
        request: Request<pb::RegisterAgencyRequest>,
    ) -> Result<Response<pb::RegisterAgencyResponse>, Status> {
        let identity = caller(&request)?;
        require_operator(&identity)?;
        let request = request.into_inner();
        let agency = self
            .directory
            .register_agency(
                &identity,
                &request.agency_id,
                &request.region,
                &request.display_name,
                &request.shard,
            )
            .await?;
        Ok(Response::new(pb::RegisterAgencyResponse {
            agency: Some(agency_to_pb(&agency)),
        }))
    }

    async fn get_agency(
        &self,
        request: Request<pb::GetAgencyRequest>,
    ) -> Result<Response<pb::GetAgencyResponse>, Status> {
        let identity = caller(&request)?;
        let agency = self.directory.get_agency(&request.get_ref().agency_id)?;
        let mut agency = agency_to_pb(&agency);
        // An agency sees its own entry whole, and of another only where it
        // lives: its home region.
        if matches!(&identity, Identity::Agency(_)) && !identity.is_agency(&agency.agency_id) {
            agency = pb::Agency {
                agency_id: agency.agency_id,
                region: agency.region,
                ..pb::Agency::default()
            };
        }
        Ok(Response::new(pb::GetAgencyResponse {
            agency: Some(agency),
        }))
    }

    async fn list_agencies(
        &self,
        request: Request<pb::ListAgenciesRequest>,
    ) -> Result<Response<pb::ListAgenciesResponse>, Status> {
        caller(&request)?;
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => 100,
            size @ 1..=1000 => size as usize,
            _ => {
                return Err(
                    DirectoryError::from(fedmesh_common::error::InvalidField::new(
                        "page_size",
                        "page size must be 1 to 1000 (0 means 100)",
                    ))
                    .into(),
                );
            }
        };
        let region = (!request.region.is_empty()).then_some(request.region.as_str());
        if let Some(region) = region {
            validate::region("region", region).map_err(DirectoryError::from)?;
        }
        // One more than asked tells whether another page follows.
        let mut agencies =
            self.directory
                .state()
                .agencies_page(&request.page_token, region, page_size + 1);
        let next_page_token = if agencies.len() > page_size {
            agencies.truncate(page_size);
            agencies
                .last()
                .map(|agency| agency.agency_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListAgenciesResponse {
            agencies: agencies.iter().map(agency_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn deregister_agency(
        &self,
        request: Request<pb::DeregisterAgencyRequest>,
    ) -> Result<Response<pb::DeregisterAgencyResponse>, Status> {
        let identity = caller(&request)?;
        require_operator(&identity)?;
        self.directory
            .deregister_agency(&identity, &request.get_ref().agency_id)
            .await?;
        Ok(Response::new(pb::DeregisterAgencyResponse {}))
    }

    async fn create_subscription(
        &self,
        request: Request<pb::CreateSubscriptionRequest>,
    ) -> Result<Response<pb::CreateSubscriptionResponse>, Status> {
        let identity = caller(&request)?;
        let subscription = request.into_inner().subscription.unwrap_or_default();
        let strict_order = subscription.order() != pb::SubscriptionOrder::Throughput;
        let new = NewSubscription {
            name: subscription.name,
            regions: subscription.regions,
            agencies: subscription.agencies,
            kinds: subscription.kinds,
            strict_order,
            webhook_url: subscription.webhook.map(|webhook| webhook.url),
        };
        let created = self.directory.create_subscription(&identity, new).await?;
        Ok(Response::new(pb::CreateSubscriptionResponse {
            subscription: Some(subscription_to_pb(&created)),
        }))
    }

    async fn get_subscription(
        &self,
        request: Request<pb::GetSubscriptionRequest>,
    ) -> Result<Response<pb::GetSubscriptionResponse>, Status> {
        let identity = caller(&request)?;
        let subscription = self
            .directory
            .get_subscription(&identity, &request.get_ref().name)
            .await?;
        Ok(Response::new(pb::GetSubscriptionResponse {
            subscription: Some(subscription_to_pb(&subscription)),
        }))
    }

    async fn list_subscriptions(
        &self,
        request: Request<pb::ListSubscriptionsRequest>,
    ) -> Result<Response<pb::ListSubscriptionsResponse>, Status> {
        let identity = caller(&request)?;
        let subscriptions = self.directory.list_subscriptions(&identity).await;
        Ok(Response::new(pb::ListSubscriptionsResponse {
            subscriptions: subscriptions.iter().map(subscription_to_pb).collect(),
        }))
    }

    async fn delete_subscription(
        &self,
        request: Request<pb::DeleteSubscriptionRequest>,
    ) -> Result<Response<pb::DeleteSubscriptionResponse>, Status> {
        let identity = caller(&request)?;
        self.directory
            .delete_subscription(&identity, &request.get_ref().name)
            .await?;
        Ok(Response::new(pb::DeleteSubscriptionResponse {}))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let identity = caller(&request)?;
        let request = request.into_inner();
        let events = self
            .directory
            .dead_letters(&identity, &request.name, request.limit)
            .await?;
        Ok(Response::new(pb::ListDeadLettersResponse {
            events: events.into_iter().map(pb::Event::from).collect(),
        }))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<pb::ReplayDeadLettersRequest>,
    ) -> Result<Response<pb::ReplayDeadLettersResponse>, Status> {
        let identity = caller(&request)?;
        let request = request.into_inner();
        let replayed = self
            .directory
            .replay_dead_letters(&identity, &request.name, request.limit)
            .await?;
        Ok(Response::new(pb::ReplayDeadLettersResponse {
            replayed: u32::try_from(replayed).unwrap_or(u32::MAX),
        }))
    }

    type WatchTopologyStream = TopologyStream;

    async fn watch_topology(
        &self,
        request: Request<pb::WatchTopologyRequest>,
    ) -> Result<Response<Self::WatchTopologyStream>, Status> {
        caller(&request)?;
        let request = request.into_inner();
        let directory = Arc::clone(&self.directory);
        let shutdown = self.shutdown.clone();
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let resume =
            (!request.epoch.is_empty()).then_some((request.epoch.as_str(), request.from_version));
        let start = directory.state().watch_from(resume);
        tokio::spawn(async move {
            let mut changes = start.changes;
            let mut last = 0;
            for update in start.first {
                last = update.version;
                if sender.send(Ok(update)).await.is_err() {
                    return;
                }
            }
            loop {
                let update = tokio::select! {
                    () = shutdown.cancelled() => {
                        let _ = sender.send(Err(DirectoryError::ShuttingDown.into())).await;
                        return;
                    }
                    () = sender.closed() => return,
                    update = changes.recv() => update,
                };
                let update = match update {
                    // Sent already among the missed changes.
                    Ok(update) if update.version <= last => continue,
                    Ok(update) => update,
                    // The watcher fell behind: start it over from a snapshot.
                    Err(RecvError::Lagged(_)) => {
                        let start = directory.state().watch();
                        changes = start.changes;
                        let Some(snapshot) = start.first.into_iter().next() else {
                            return;
                        };
                        snapshot
                    }
                    Err(RecvError::Closed) => return,
                };
                last = update.version;
                if sender.send(Ok(update)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn report_gateway(
        &self,
        request: Request<pb::ReportGatewayRequest>,
    ) -> Result<Response<pb::ReportGatewayResponse>, Status> {
        let identity = caller(&request)?;
        let gateway = request.into_inner().gateway.unwrap_or_default();
        validate::agency_id("gateway.gateway_id", &gateway.gateway_id)
            .map_err(DirectoryError::from)?;
        validate::region("gateway.region", &gateway.region).map_err(DirectoryError::from)?;
        if identity != Identity::Gateway(gateway.region.clone()) {
            return Err(DirectoryError::PermissionDenied(format!(
                "{identity} may not report a gateway of region {}",
                gateway.region
            ))
            .into());
        }
        let known_regions = self.directory.state().region_names();
        if !known_regions.contains(&gateway.region) {
            return Err(DirectoryError::RegionNotFound {
                known: known_regions.join(", "),
                region: gateway.region,
            }
            .into());
        }
        check_address("gateway.address", &gateway.address)?;
        let owner = self
            .directory
            .state()
            .gateway_region(&gateway.gateway_id)
            .filter(|region| *region != gateway.region);
        if let Some(region) = owner {
            return Err(DirectoryError::PermissionDenied(format!(
                "gateway id {:?} belongs to a gateway of region {region}; give this replica an id of its own (--id)",
                gateway.gateway_id
            ))
            .into());
        }
        let load = gateway.load.unwrap_or_default();
        let (gateway_id, region) = (gateway.gateway_id.clone(), gateway.region.clone());
        // Other replicas learn of it from the control database.
        {
            let directory = Arc::clone(&self.directory);
            let instance = crate::store::GatewayInstance {
                gateway_id: gateway_id.clone(),
                region: region.clone(),
                address: gateway.address.clone(),
                last_seen_micros: now_micros(),
                open_streams: load.open_streams,
                in_flight: load.in_flight,
            };
            tokio::spawn(async move {
                if let Err(error) = directory.store().report_gateway_instance(&instance).await {
                    tracing::warn!(gateway_id = %instance.gateway_id, %error, "cannot record the gateway's report");
                }
            });
        }
        let joined = self.directory.state().report_gateway(GatewayRecord {
            gateway_id: gateway.gateway_id,
            region: gateway.region,
            address: gateway.address,
            open_streams: load.open_streams,
            in_flight: load.in_flight,
            shard_pools: load.shard_pools,
            spools: load.spools,
            last_seen_micros: now_micros(),
            last_seen: tokio::time::Instant::now(),
        });
        if joined {
            // Singleton work: the leader records the gateway up.
            let directory = Arc::clone(&self.directory);
            let leadership = self.leadership.clone();
            tokio::spawn(async move {
                crate::leader::gateway_changed(&directory, &leadership, &gateway_id, &region, true)
                    .await;
            });
        }
        Ok(Response::new(pb::ReportGatewayResponse {
            report_interval_ms: u64::try_from(self.report_interval.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn add_region(
        &self,
        request: Request<pb::AddRegionRequest>,
    ) -> Result<Response<pb::AddRegionResponse>, Status> {
        let identity = caller(&request)?;
        require_operator(&identity)?;
        let region = self
            .directory
            .add_region(&identity, &request.get_ref().name)
            .await?;
        Ok(Response::new(pb::AddRegionResponse {
            region: Some(region),
        }))
    }

    async fn list_regions(
        &self,
        request: Request<pb::ListRegionsRequest>,
    ) -> Result<Response<pb::ListRegionsResponse>, Status> {
        require_operator(&caller(&request)?)?;
        let regions = self.directory.state().regions();
        Ok(Response::new(pb::ListRegionsResponse { regions }))
    }

    async fn remove_region(
        &self,
        request: Request<pb::RemoveRegionRequest>,
    ) -> Result<Response<pb::RemoveRegionResponse>, Status> {
        let identity = caller(&request)?;
        require_operator(&identity)?;
        self.directory
            .remove_region(&identity, &request.get_ref().name)
            .await?;
        Ok(Response::new(pb::RemoveRegionResponse {}))
    }

    async fn add_shard(
        &self,
        request: Request<pb::AddShardRequest>,
    ) -> Result<Response<pb::AddShardResponse>, Status> {
        let identity = caller(&request)?;
        require_operator(&identity)?;
        let request = request.into_inner();
        let shard = self
            .directory
            .add_shard(
                &identity,
                ShardRecord {
                    name: request.name,
                    region: request.region,
                    address: request.address,
                    draining: false,
                    capacity: request.capacity,
                    created_at_micros: now_micros(),
                },
            )
            .await?;
        let agencies = self.directory.state().agencies_on(&shard.name);
        Ok(Response::new(pb::AddShardResponse {
            shard: Some(shard_to_pb(&shard, agencies)),
        }))
    }

    async fn list_shards(
        &self,
        request: Request<pb::ListShardsRequest>,
    ) -> Result<Response<pb::ListShardsResponse>, Status> {
        require_operator(&caller(&request)?)?;
        let region = &request.get_ref().region;
        let shards = self
            .directory
            .state()
            .shards_with_counts((!region.is_empty()).then_some(region.as_str()))
            .iter()
            .map(|(shard, agencies)| shard_to_pb(shard, *agencies))
            .collect();
        Ok(Response::new(pb::ListShardsResponse { shards }))
    }

    async fn drain_shard(
        &self,
        request: Request<pb::DrainShardRequest>,
    ) -> Result<Response<pb::DrainShardResponse>, Status> {
        let identity = caller(&request)?;
        require_operator(&identity)?;
        let shard = self
            .directory
            .drain_shard(&identity, &request.get_ref().name)
            .await?;
        let agencies = self.directory.state().agencies_on(&shard.name);
        Ok(Response::new(pb::DrainShardResponse {
            shard: Some(shard_to_pb(&shard, agencies)),
        }))
    }

    async fn remove_shard(
        &self,
        request: Request<pb::RemoveShardRequest>,
    ) -> Result<Response<pb::RemoveShardResponse>, Status> {
        let identity = caller(&request)?;
        require_operator(&identity)?;
        self.directory
            .remove_shard(&identity, &request.get_ref().name)
            .await?;
        Ok(Response::new(pb::RemoveShardResponse {}))
    }

    async fn grant_access(
        &self,
        request: Request<pb::GrantAccessRequest>,
    ) -> Result<Response<pb::GrantAccessResponse>, Status> {
        let identity = caller(&request)?;
        require_operator(&identity)?;
        let request = request.into_inner();
        let grant = self
            .directory
            .grant_access(
                &identity,
                &request.sender_id,
                &request.recipient_id,
                request.kinds,
            )
            .await?;
        Ok(Response::new(pb::GrantAccessResponse {
            grant: Some(grant_to_pb(&grant)),
        }))
    }

    async fn revoke_access(
        &self,
        request: Request<pb::RevokeAccessRequest>,
    ) -> Result<Response<pb::RevokeAccessResponse>, Status> {
        let identity = caller(&request)?;
        require_operator(&identity)?;
        self.directory
            .revoke_access(&identity, &request.get_ref().grant_id)
            .await?;
        Ok(Response::new(pb::RevokeAccessResponse {}))
    }

    async fn list_access(
        &self,
        request: Request<pb::ListAccessRequest>,
    ) -> Result<Response<pb::ListAccessResponse>, Status> {
        require_operator(&caller(&request)?)?;
        let request = request.into_inner();
        let grants = self
            .directory
            .list_access(&request.sender_id, &request.recipient_id);
        Ok(Response::new(pb::ListAccessResponse {
            grants: grants.iter().map(grant_to_pb).collect(),
        }))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        require_operator(&caller(&request)?)?;
        let request = request.into_inner();
        if request.limit > MAX_AUDIT_PAGE {
            return Err(
                DirectoryError::from(fedmesh_common::error::InvalidField::new(
                    "limit",
                    format!("at most {MAX_AUDIT_PAGE} rows per page"),
                ))
                .into(),
            );
        }
        let limit = if request.limit == 0 {
            100
        } else {
            request.limit
        };
        let chain = (!request.chain.is_empty()).then_some(request.chain.as_str());
        let after = (!request.after_chain.is_empty())
            .then_some((request.after_chain.as_str(), request.after_seq));
        let entries = self.directory.audit_page(chain, after, limit).await?;
        Ok(Response::new(pb::ListAuditResponse {
            entries: entries.iter().map(audit_to_pb).collect(),
        }))
    }

    async fn record_audit(
        &self,
        request: Request<pb::RecordAuditRequest>,
    ) -> Result<Response<pb::RecordAuditResponse>, Status> {
        let identity = caller(&request)?;
        let records = request
            .into_inner()
            .records
            .into_iter()
            .map(|record| AuditRecord {
                chain: record.chain,
                actor: record.actor,
                action: record.action,
                target: record.target,
                outcome: record.outcome,
                detail: record.detail,
            })
            .collect();
        self.directory.record_audit(&identity, records).await?;
        Ok(Response::new(pb::RecordAuditResponse {}))
    }

    async fn report_notifier(
        &self,
        request: Request<pb::ReportNotifierRequest>,
    ) -> Result<Response<pb::ReportNotifierResponse>, Status> {
        let identity = caller(&request)?;
        if identity != Identity::Notifier {
            return Err(DirectoryError::PermissionDenied(format!(
                "{identity} may not report a notifier; only notifiers may"
            ))
            .into());
        }
        let notifier = request.into_inner().notifier.unwrap_or_default();
        validate::agency_id("notifier.notifier_id", &notifier.notifier_id)
            .map_err(DirectoryError::from)?;
        check_address("notifier.address", &notifier.address)?;
        {
            let directory = Arc::clone(&self.directory);
            let (notifier_id, address) = (notifier.notifier_id.clone(), notifier.address.clone());
            tokio::spawn(async move {
                if let Err(error) = directory
                    .store()
                    .report_notifier_instance(&notifier_id, &address, now_micros())
                    .await
                {
                    tracing::warn!(%notifier_id, %error, "cannot record the notifier's report");
                }
            });
        }
        self.directory.state().report_notifier(NotifierRecord {
            notifier_id: notifier.notifier_id,
            address: notifier.address,
            last_seen_micros: now_micros(),
            last_seen: tokio::time::Instant::now(),
        });
        Ok(Response::new(pb::ReportNotifierResponse {
            report_interval_ms: u64::try_from(self.report_interval.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn move_agency(
        &self,
        request: Request<pb::MoveAgencyRequest>,
    ) -> Result<Response<pb::MoveAgencyResponse>, Status> {
        let identity = caller(&request)?;
        require_operator(&identity)?;
        let request = request.into_inner();
        let record = self
            .directory
            .move_agency(
                &identity,
                &request.agency_id,
                &request.shard,
                &request.region,
            )
            .await?;
        Ok(Response::new(pb::MoveAgencyResponse {
            r#move: Some(move_to_pb(&record)),
        }))
    }

    async fn get_move(
        &self,
        request: Request<pb::GetMoveRequest>,
    ) -> Result<Response<pb::GetMoveResponse>, Status> {
        require_operator(&caller(&request)?)?;
        let record = self
            .directory
            .agency_move(&request.get_ref().move_id)
            .await?;
        Ok(Response::new(pb::GetMoveResponse {
            r#move: Some(move_to_pb(&record)),
        }))
    }

    async fn cancel_move(
        &self,
        request: Request<pb::CancelMoveRequest>,
    ) -> Result<Response<pb::CancelMoveResponse>, Status> {
        let identity = caller(&request)?;
        require_operator(&identity)?;
        let record = self
            .directory
            .cancel_move(&identity, &request.get_ref().move_id)
            .await?;
        Ok(Response::new(pb::CancelMoveResponse {
            r#move: Some(move_to_pb(&record)),
        }))
    }

    async fn list_moves(
        &self,
        request: Request<pb::ListMovesRequest>,
    ) -> Result<Response<pb::ListMovesResponse>, Status> {
        require_operator(&caller(&request)?)?;
        let moves = self.directory.moves_under_way().await?;
        Ok(Response::new(pb::ListMovesResponse {
            moves: moves.iter().map(move_to_pb).collect(),
        }))
    }
}

/// A move as the API shows it.
pub(crate) fn move_to_pb(record: &MoveRecord) -> pb::Move {
    let phase = match record.phase {
        MovePhase::Copying => pb::MovePhase::Copying,
        MovePhase::Releasing => pb::MovePhase::Releasing,
        MovePhase::Done => pb::MovePhase::Done,
        MovePhase::Cancelling => pb::MovePhase::Cancelling,
        MovePhase::Cancelled => pb::MovePhase::Cancelled,
    };
    pb::Move {
        move_id: record.move_id.clone(),
        agency_id: record.agency_id.clone(),
        from_region: record.from_region.clone(),
        from_shard: record.from_shard.clone(),
        to_region: record.to_region.clone(),
        to_shard: record.to_shard.clone(),
        phase: phase as i32,
        messages_copied: record.messages_copied,
        keys_copied: record.keys_copied,
        last_error: record.last_error.clone(),
        started_at: Some(fedmesh_common::time::timestamp_from_micros(
            record.started_at_micros,
        )),
        updated_at: Some(fedmesh_common::time::timestamp_from_micros(
            record.updated_at_micros,
        )),
    }
}

/// Refuses an address that is not a URL a client can connect to.
fn check_address(field: &'static str, address: &str) -> Result<(), DirectoryError> {
    if tonic::transport::Endpoint::from_shared(address.to_string()).is_err() {
        return Err(DirectoryError::from(
            fedmesh_common::error::InvalidField::new(
                field,
                format!("{address:?} is not a URL such as http://10.0.0.5:50052"),
            ),
        ));
    }
    Ok(())
}
