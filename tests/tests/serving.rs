//! Every component answers the standard health and reflection services.

use fedmesh_tests::{TestMesh, within};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn services_of(url: &str) -> Vec<String> {
    let channel = fedmesh_common::server::lazy_channel(url).unwrap();
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving, "{url}");

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = within("reflection", responses.message())
        .await
        .unwrap()
        .unwrap();
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => list
            .service
            .into_iter()
            .map(|service| service.name)
            .collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn every_component_serves_health_and_reflection() {
    let mesh = TestMesh::start().await;
    let coordinator = services_of(&mesh.coordinator_url()).await;
    assert!(
        coordinator.contains(&"fedmesh.v1.Directory".to_string()),
        "{coordinator:?}"
    );
    for region in ["east", "west", "central"] {
        let gateway = services_of(&mesh.gateway_url(region)).await;
        assert!(
            gateway.contains(&"fedmesh.v1.Exchange".to_string()),
            "{gateway:?}"
        );
        assert!(
            gateway.contains(&"grpc.health.v1.Health".to_string()),
            "{gateway:?}"
        );
    }
    let notifier = services_of(&mesh.notifier_url()).await;
    assert!(
        notifier.contains(&"fedmesh.v1.Notifications".to_string()),
        "{notifier:?}"
    );
}
