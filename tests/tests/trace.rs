//! Trace context: one W3C trace id follows a message from its sender's
//! client through the logs of its origin and home gateways to the delivery
//! its recipient gets.
//!
//! The logs of the whole mesh (every component runs in this process) are
//! captured in memory by a global subscriber at debug level for the fedmesh
//! crates; each test looks for its own trace id only, so tests sharing the
//! process (outside nextest) do not disturb each other.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use fedmesh_common::events::{MESSAGE_ACCEPTED, MESSAGE_DELIVERED};
use fedmesh_gateway::trace_context::TraceParent;
use fedmesh_proto::pb;
use fedmesh_tests::{Bus, TestMesh, send_request, within};

/// Everything the mesh logged so far.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    /// The lines that contain every one of `parts`.
    fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|line| parts.iter().all(|part| line.contains(part)))
            .map(str::to_string)
            .collect()
    }
}

/// The process's log capture, installed on first use. The mesh is started
/// after, so its `FEDMESH_TEST_LOG` subscriber (if asked for) finds one
/// installed and leaves it.
fn captured_logs() -> CapturedLogs {
    static LOGS: OnceLock<CapturedLogs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "warn,fedmesh=debug,fedmesh_gateway=debug,fedmesh_common=debug,\
                 fedmesh_coordinator=debug,fedmesh_notifier=debug",
            ))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init()
            .expect("the trace tests install the process's subscriber first");
        logs
    })
    .clone()
}

/// A mesh with `tax-office` in east and `land-registry` in west.
async fn east_and_west() -> (TestMesh, CapturedLogs) {
    let logs = captured_logs();
    let mesh = TestMesh::start().await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;
    (mesh, logs)
}

/// Sends `body` from tax-office (east) to land-registry (west) with
/// `traceparent` metadata if given, and returns the delivery west makes of
/// it.
async fn send_east_to_west(mesh: &TestMesh, body: &str, traceparent: Option<&str>) -> pb::Message {
    let mut request = tonic::Request::new(send_request("tax-office", "land-registry", body, None));
    if let Some(traceparent) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
    }
    let receipt = mesh
        .exchange("east", "tax-office")
        .send(request)
        .await
        .expect("a traceparent, whatever it is, never refuses a message")
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(receipt.home_region, "west");
    let mut inbox = mesh.open_inbox("west", "land-registry", 0).await.unwrap();
    let delivery = inbox.next_delivery().await;
    inbox.ack(&[delivery.sequence]).await;
    inbox.close().await;
    let message = delivery.message.unwrap();
    assert_eq!(message.message_id, receipt.message_id);
    message
}

/// The trace id of `traceparent` appears in what the east gateway logged
/// of the message it accepted, in what the west gateway logged of storing
/// it, and in what west logged of delivering it.
fn assert_logged_in_both_regions(logs: &CapturedLogs, traceparent: &str, message_id: &str) {
    let trace_id = TraceParent::parse(traceparent)
        .unwrap()
        .trace_id()
        .to_string();
    let trace_field = format!("trace_id={trace_id}");
    let message_field = format!("message_id={message_id}");
    for (region, what) in [
        ("east", "message accepted"),
        ("west", "relayed message stored"),
        ("west", "delivering message"),
    ] {
        let region_field = format!("region={region}");
        let lines = logs.lines_with(&[&trace_field, &message_field, &region_field, what]);
        assert!(
            !lines.is_empty(),
            "no {what:?} line of {region} with {trace_field}; lines with it: {:#?}",
            logs.lines_with(&[&trace_field])
        );
    }
}

#[tokio::test]
async fn a_clients_trace_id_follows_its_message_through_both_gateways_to_the_delivery() {
    let (mesh, logs) = east_and_west().await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let message = send_east_to_west(&mesh, "deed 1", Some(traceparent)).await;
    assert_eq!(
        message.traceparent, traceparent,
        "kept as the client sent it"
    );
    assert_logged_in_both_regions(&logs, traceparent, &message.message_id);
}

#[tokio::test]
async fn a_send_without_traceparent_gets_a_trace_started_by_its_gateway() {
    let (mesh, logs) = east_and_west().await;
    let message = send_east_to_west(&mesh, "deed 2", None).await;
    let started = TraceParent::parse(&message.traceparent)
        .unwrap_or_else(|| panic!("a valid traceparent: {:?}", message.traceparent));
    assert!(message.traceparent.ends_with("-01"), "sampled");
    assert_logged_in_both_regions(&logs, started.as_str(), &message.message_id);
}

#[tokio::test]
async fn a_malformed_traceparent_is_replaced_not_refused() {
    let (mesh, logs) = east_and_west().await;
    for malformed in [
        "garbage",
        // Upper-case hex, an all-zero trace id, an unknown version.
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ] {
        let message = send_east_to_west(&mesh, malformed, Some(malformed)).await;
        assert_ne!(message.traceparent, malformed);
        assert!(
            TraceParent::parse(&message.traceparent).is_some(),
            "{malformed:?} replaced by {:?}",
            message.traceparent
        );
        assert_logged_in_both_regions(&logs, &message.traceparent, &message.message_id);
    }
}

/// The `message.accepted` and `message.delivered` events of a message carry
/// its traceparent, as an attribute and as the CloudEvents
/// distributed-tracing extension attribute.
async fn the_events_of_a_message_carry_its_traceparent(bus: Bus) {
    use fedmesh_proto::io::cloudevents::v1::cloud_event::cloud_event_attribute_value::Attr;
    let (mesh, _broker) = bus.mesh().await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;
    let mut events = mesh
        .notifications()
        .subscribe(pb::SubscribeRequest {
            agencies: vec!["land-registry".into()],
            kinds: vec![MESSAGE_ACCEPTED.into(), MESSAGE_DELIVERED.into()],
            regions: vec![],
            cloudevents: true,
        })
        .await
        .unwrap()
        .into_inner();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let message = send_east_to_west(&mesh, "deed 3", Some(traceparent)).await;
    for kind in [MESSAGE_ACCEPTED, MESSAGE_DELIVERED] {
        let event = within(kind, events.message()).await.unwrap().unwrap();
        assert_eq!(event.kind, kind);
        assert_eq!(event.message_id, message.message_id);
        assert_eq!(
            event.attributes.get("traceparent").map(String::as_str),
            Some(traceparent)
        );
        let extension = event
            .cloud_event
            .as_ref()
            .and_then(|cloud_event| cloud_event.attributes.get("traceparent"))
            .and_then(|value| value.attr.clone());
        assert_eq!(extension, Some(Attr::CeString(traceparent.into())));
    }
}

fedmesh_tests::on_every_bus!(the_events_of_a_message_carry_its_traceparent);
