//! Access rights between agencies and the tamper-evident audit log.

use std::sync::Arc;

use clap::{CommandFactory as _, FromArgMatches as _};
use fedmesh_common::identity::Identity;
use fedmesh_common::topology::AccessPolicy;
use fedmesh_proto::pb;
use fedmesh_tests::{Backend, TestMesh, forward_request, send_request, within};
use tonic::Code;

async fn fedmesh(mesh: &TestMesh, args: &[&str]) -> anyhow::Result<String> {
    let coordinator = mesh.coordinator_url();
    let mut argv = vec!["fedmesh"];
    argv.extend_from_slice(args);
    argv.extend(["--coordinator", &coordinator]);
    let matches = fedmesh::cli::Cli::command().try_get_matches_from(argv)?;
    let cli = fedmesh::cli::Cli::from_arg_matches(&matches)?;
    let mut out = Vec::new();
    fedmesh::cli::run(cli, &matches, &mut out).await?;
    Ok(String::from_utf8(out)?)
}

async fn last_sequence(mesh: &TestMesh, region: &str, agency_id: &str) -> u64 {
    mesh.exchange(region, agency_id)
        .get_inbox(pb::GetInboxRequest {
            agency_id: agency_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .last_sequence
}

async fn grant(mesh: &TestMesh, sender: &str, recipient: &str, kinds: &[&str]) -> pb::AccessGrant {
    mesh.directory()
        .grant_access(pb::GrantAccessRequest {
            sender_id: sender.into(),
            recipient_id: recipient.into(),
            kinds: kinds.iter().map(|kind| kind.to_string()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap()
}

#[tokio::test]
async fn under_a_closed_policy_only_granted_sends_are_stored() {
    let mesh = TestMesh::start_tuned(
        Backend::Sqlite,
        Some(Arc::new(|config: &mut fedmesh_gateway::GatewayConfig| {
            config.access_policy = Some(AccessPolicy::Closed);
        })),
    )
    .await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;
    mesh.gateway_knows("east", &["tax-office", "land-registry"])
        .await;

    let refused = mesh
        .send("east", "tax-office", "land-registry", "no grant", None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("fedmesh access grant --from tax-office --to land-registry"),
        "the refusal says how to grant: {refused:?}"
    );

    let granted = grant(&mesh, "tax-office", "land-registry", &["test.note"]).await;
    let again = grant(&mesh, "tax-office", "land-registry", &["test.note"]).await;
    assert_eq!(
        again.grant_id, granted.grant_id,
        "granting twice keeps one grant"
    );
    mesh.gateway_knows_grant("east", &granted.grant_id, true)
        .await;
    mesh.gateway_knows_grant("west", &granted.grant_id, true)
        .await;
    mesh.send("east", "tax-office", "land-registry", "granted", None)
        .await
        .expect("a granted send");
    let other_kind = mesh
        .exchange("east", "tax-office")
        .send(pb::SendRequest {
            kind: "deed.scan".into(),
            ..send_request("tax-office", "land-registry", "another kind", None)
        })
        .await
        .unwrap_err();
    assert_eq!(other_kind.code(), Code::PermissionDenied, "{other_kind:?}");
    let back = mesh
        .send("west", "land-registry", "tax-office", "the other way", None)
        .await
        .unwrap_err();
    assert_eq!(back.code(), Code::PermissionDenied, "a grant goes one way");

    // The recipient's home gateway checks again: a relay of an ungranted
    // kind is refused there.
    let (channel, attach) =
        mesh.channel_as(&mesh.gateway_url("west"), &Identity::Gateway("east".into()));
    let mut relay = pb::relay_client::RelayClient::with_interceptor(channel, attach);
    let results = relay
        .forward_batch(pb::ForwardBatchRequest {
            messages: vec![forward_request(
                "tax-office",
                "land-registry",
                "deed.scan",
                "east",
            )],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let Some(pb::forward_result::Result::Error(error)) = &results[0].result else {
        panic!("an ungranted relay was stored: {results:?}");
    };
    assert_eq!(error.code, Code::PermissionDenied as i32, "{error:?}");
    assert_eq!(
        last_sequence(&mesh, "west", "land-registry").await,
        1,
        "only the granted send"
    );

    let listed = fedmesh(&mesh, &["access", "list", "--to", "land-registry"])
        .await
        .unwrap();
    assert!(listed.contains(&granted.grant_id), "{listed}");
    assert!(
        listed.contains("tax-office -> land-registry: test.note"),
        "{listed}"
    );
    let revoked = fedmesh(&mesh, &["access", "revoke", &granted.grant_id])
        .await
        .unwrap();
    assert!(revoked.contains("revoked"), "{revoked}");
    mesh.gateway_knows_grant("east", &granted.grant_id, false)
        .await;
    let after = mesh
        .send("east", "tax-office", "land-registry", "revoked", None)
        .await
        .unwrap_err();
    assert_eq!(after.code(), Code::PermissionDenied, "{after:?}");
    let unknown = fedmesh(&mesh, &["access", "revoke", &granted.grant_id])
        .await
        .unwrap_err();
    assert!(format!("{unknown:#}").contains("NOT_FOUND"), "{unknown:#}");

    // Any agency may be granted, and an agency may not grant.
    let open = fedmesh(
        &mesh,
        &["access", "grant", "--to", "land-registry", "--json"],
    )
    .await
    .unwrap();
    let open: serde_json::Value = serde_json::from_str(&open).unwrap();
    mesh.gateway_knows_grant("east", open["grant_id"].as_str().unwrap(), true)
        .await;
    mesh.send(
        "east",
        "tax-office",
        "land-registry",
        "any agency, any kind",
        None,
    )
    .await
    .expect("a grant to any agency");
    let by_agency = mesh
        .directory_as(&Identity::Agency("tax-office".into()))
        .grant_access(pb::GrantAccessRequest {
            sender_id: "tax-office".into(),
            recipient_id: "land-registry".into(),
            kinds: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(by_agency.code(), Code::PermissionDenied);
    let bad = mesh
        .directory()
        .grant_access(pb::GrantAccessRequest {
            sender_id: "Tax Office".into(),
            recipient_id: "land-registry".into(),
            kinds: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
}

/// The audit rows of `chain`, once there are at least `count`.
async fn audit_rows(mesh: &TestMesh, chain: &str, count: usize) -> Vec<pb::AuditEntry> {
    within("the audit rows", async {
        loop {
            let entries = mesh
                .directory()
                .list_audit(pb::ListAuditRequest {
                    chain: chain.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .entries;
            if entries.len() >= count {
                return entries;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test]
async fn privileged_actions_and_denied_calls_are_chained_and_an_edit_is_found() {
    let mesh = TestMesh::start().await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "east").await;
    // Denied by the coordinator's layer: an agency registering.
    let denied = mesh
        .directory_as(&Identity::Agency("tax-office".into()))
        .register_agency(pb::RegisterAgencyRequest {
            agency_id: "intruder".into(),
            region: "east".into(),
            display_name: String::new(),
            shard: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // Denied by the east gateway's handler: sending as another agency.
    let forged = mesh
        .exchange("east", "tax-office")
        .send(send_request("land-registry", "tax-office", "forged", None))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::PermissionDenied);

    let east = audit_rows(&mesh, "east", 3).await;
    let actions: Vec<(&str, &str, &str)> = east
        .iter()
        .map(|entry| {
            (
                entry.actor.as_str(),
                entry.action.as_str(),
                entry.target.as_str(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("operator/test", "register", "agency/tax-office"),
            ("operator/test", "register", "agency/land-registry"),
            ("agency/tax-office", "denied", "fedmesh.v1.Exchange/Send"),
        ]
    );
    assert_eq!(east[2].outcome, "PERMISSION_DENIED");
    let global = audit_rows(&mesh, "global", 1).await;
    assert_eq!(global[0].actor, "agency/tax-office");
    assert_eq!(global[0].target, "fedmesh.v1.Directory/RegisterAgency");
    for entry in east.iter().chain(&global) {
        assert!(
            !entry.detail.contains("forged"),
            "no payload in the log: {entry:?}"
        );
    }

    let verified = fedmesh(&mesh, &["audit", "verify"]).await.unwrap();
    assert!(
        verified.contains("intact: 4 rows in 2 chains"),
        "{verified}"
    );
    let listed = fedmesh(&mesh, &["audit", "list", "--region", "east"])
        .await
        .unwrap();
    assert_eq!(listed.lines().count(), 3, "{listed}");

    // Someone with access to the database edits one row quietly.
    let pool = sqlx::SqlitePool::connect(&mesh.control_database_url())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE audit_log SET actor = 'operator/someone-else' WHERE chain = 'east' AND seq = 2",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let broken = fedmesh(&mesh, &["audit", "verify"]).await.unwrap_err();
    let broken = format!("{broken:#}");
    assert!(broken.contains("chain east is broken at row 2"), "{broken}");
    assert!(broken.contains("edited"), "{broken}");
}

#[tokio::test]
async fn regions_and_shards_change_at_run_time_and_outlive_a_restart() {
    let mut mesh = TestMesh::start().await;
    fedmesh(&mesh, &["region", "add", "north"]).await.unwrap();
    fedmesh(&mesh, &["shard", "add", "north-1", "--region", "north"])
        .await
        .unwrap();
    let mut topology = mesh.gateway_topology("east");
    within(
        "the gateways to learn of the region",
        topology.wait_for(|topology| {
            topology.regions.get("north") == Some(&vec!["north-1".to_string()])
        }),
    )
    .await
    .unwrap();
    let registered = fedmesh(
        &mesh,
        &["agency", "register", "harbour", "--region", "north"],
    )
    .await
    .unwrap();
    assert!(registered.contains("(shard north-1)"), "{registered}");

    // Placement: a draining shard takes no agency, a full one neither.
    fedmesh(
        &mesh,
        &[
            "shard",
            "add",
            "east-2",
            "--region",
            "east",
            "--capacity",
            "1",
            "--address",
            "db2/east_2",
        ],
    )
    .await
    .unwrap();
    fedmesh(&mesh, &["shard", "drain", "east-1"]).await.unwrap();
    let placed = fedmesh(&mesh, &["agency", "register", "mint", "--region", "east"])
        .await
        .unwrap();
    assert!(placed.contains("(shard east-2)"), "{placed}");
    let full = fedmesh(
        &mesh,
        &["agency", "register", "treasury", "--region", "east"],
    )
    .await
    .unwrap_err();
    assert!(
        format!("{full:#}").contains("FAILED_PRECONDITION"),
        "{full:#}"
    );
    let listed = fedmesh(&mesh, &["shard", "list", "--region", "east", "--json"])
        .await
        .unwrap();
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["name"], "east-1");
    assert_eq!(listed[0]["state"], "draining");
    assert_eq!(listed[1]["agencies"], 1);
    assert_eq!(listed[1]["capacity"], 1);

    // What holds agencies cannot be removed.
    let refused = fedmesh(&mesh, &["shard", "remove", "east-2"])
        .await
        .unwrap_err();
    assert!(
        format!("{refused:#}").contains("still holds 1 agencies"),
        "{refused:#}"
    );
    let refused = fedmesh(&mesh, &["region", "remove", "north"])
        .await
        .unwrap_err();
    assert!(
        format!("{refused:#}").contains("region north still holds"),
        "{refused:#}"
    );
    let taken = fedmesh(&mesh, &["region", "add", "east"])
        .await
        .unwrap_err();
    assert!(format!("{taken:#}").contains("ALREADY_EXISTS"), "{taken:#}");

    // What the operators changed is data: it outlives a restart.
    mesh.restart().await;
    let regions = fedmesh(&mesh, &["region", "list", "--json"]).await.unwrap();
    let regions: serde_json::Value = serde_json::from_str(&regions).unwrap();
    let north = regions
        .as_array()
        .unwrap()
        .iter()
        .find(|region| region["name"] == "north")
        .expect("north is still there");
    assert_eq!(north["shards"], serde_json::json!(["north-1"]));
    fedmesh(&mesh, &["agency", "deregister", "harbour", "--force"])
        .await
        .unwrap();
    fedmesh(&mesh, &["region", "remove", "north"])
        .await
        .unwrap();
    let audit = fedmesh(&mesh, &["audit", "list", "--region", "north"])
        .await
        .unwrap();
    assert!(audit.contains("region-add region/north"), "{audit}");
    assert!(audit.contains("region-remove region/north"), "{audit}");
}

#[tokio::test]
async fn status_names_the_coordinator_that_holds_the_leader_lease() {
    let mesh = TestMesh::start().await;
    let leader = within("the coordinator to take the lease", async {
        loop {
            let status = fedmesh(&mesh, &["status", "--json"]).await.unwrap();
            let status: serde_json::Value = serde_json::from_str(&status).unwrap();
            if !status["leader"].is_null() {
                return status["leader"].clone();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        leader["holder"]
            .as_str()
            .unwrap()
            .starts_with("coordinator-"),
        "{leader}"
    );
    assert!(leader["token"].as_i64().unwrap() >= 1, "{leader}");
    let text = fedmesh(&mesh, &["status"]).await.unwrap();
    assert!(text.contains("leader coordinator-"), "{text}");
}
