//! The `fedmesh` commands against a running mesh, in-process.

use clap::{CommandFactory, FromArgMatches};
use fedmesh::cli::{Cli, run};
use fedmesh_tests::{TestMesh, within};

/// Runs `fedmesh ARGS --coordinator URL`: client commands need only the
/// coordinator's address.
async fn fedmesh(mesh: &TestMesh, args: &[&str]) -> anyhow::Result<String> {
    let coordinator = mesh.coordinator_url();
    let mut argv = vec!["fedmesh"];
    argv.extend_from_slice(args);
    argv.extend(["--coordinator", &coordinator]);
    let matches = Cli::command().try_get_matches_from(argv)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let mut out = Vec::new();
    run(cli, &matches, &mut out).await?;
    Ok(String::from_utf8(out)?)
}

#[tokio::test]
async fn the_walkthrough_works_from_the_command_line() {
    let mesh = TestMesh::start().await;
    let registered = fedmesh(
        &mesh,
        &["agency", "register", "tax-office", "--region", "east"],
    )
    .await
    .unwrap();
    assert!(
        registered.contains("registered tax-office in east"),
        "{registered}"
    );
    fedmesh(
        &mesh,
        &["agency", "register", "land-registry", "--region", "west"],
    )
    .await
    .unwrap();

    let listed = fedmesh(&mesh, &["agency", "list", "--json"]).await.unwrap();
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(2));

    let sent = fedmesh(
        &mesh,
        &[
            "send",
            "--as",
            "tax-office",
            "--to",
            "land-registry",
            "--kind",
            "tax.return.filed",
            "--body",
            "hello west",
        ],
    )
    .await
    .unwrap();
    assert!(sent.starts_with("STORED "), "{sent}");

    let read = fedmesh(&mesh, &["inbox", "--as", "land-registry", "--ack"])
        .await
        .unwrap();
    assert!(
        read.contains("hello west") && read.contains("from tax-office"),
        "{read}"
    );
    let again = fedmesh(&mesh, &["inbox", "--as", "land-registry"])
        .await
        .unwrap();
    assert!(
        again.contains("inbox of land-registry is empty"),
        "acked, so not redelivered: {again}"
    );

    let status = fedmesh(&mesh, &["status"]).await.unwrap();
    assert!(status.contains("notifiers notifier-0 http://"), "{status}");
    for region in ["east", "west", "central"] {
        assert!(status.contains(&format!("{region}-0 http://")), "{status}");
        // Each gateway reports the connection pool of its shard.
        assert!(status.contains(&format!("{region}-1 pool ")), "{status}");
    }
    let status = fedmesh(&mesh, &["status", "--json"]).await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let east = &status["regions"][0]["gateways"][0]["shard_pools"][0];
    assert_eq!(east["shard"], "east-1", "{status}");
    assert!(east["max"].as_u64().unwrap() >= 1, "{status}");
    assert!(east["open"].as_u64().unwrap() <= east["max"].as_u64().unwrap());
}

#[tokio::test]
async fn command_line_errors_are_one_clear_line() {
    let mesh = TestMesh::start().await;
    let error = fedmesh(&mesh, &["agency", "register", "Bad Id", "--region", "east"])
        .await
        .unwrap_err();
    let line = format!("{error:#}");
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.contains("malformed") && line.contains("(INVALID_ARGUMENT)"),
        "{line}"
    );

    let error = fedmesh(
        &mesh,
        &[
            "send", "--as", "ghost", "--to", "x1", "--kind", "k", "--body", "b",
        ],
    )
    .await
    .unwrap_err();
    let line = format!("{error:#}");
    assert!(
        line.contains("ghost") && line.contains("(NOT_FOUND)"),
        "{line}"
    );
}

#[tokio::test]
async fn the_benchmarks_run_against_a_mesh() {
    let mesh = TestMesh::start().await;
    let sent = fedmesh(
        &mesh,
        &["bench", "send", "--count", "40", "--concurrency", "4"],
    )
    .await
    .unwrap();
    assert!(sent.starts_with("bench send: 40 messages"), "{sent}");
    assert!(!sent.contains("errors"), "{sent}");

    let unkeyed = fedmesh(
        &mesh,
        &[
            "bench",
            "send",
            "--count",
            "20",
            "--concurrency",
            "4",
            "--no-keys",
        ],
    )
    .await
    .unwrap();
    assert!(unkeyed.starts_with("bench send: 20 messages"), "{unkeyed}");

    let received = fedmesh(&mesh, &["bench", "receive"]).await.unwrap();
    assert!(
        received.starts_with("bench receive: 60 deliveries to bench-recipient"),
        "{received}"
    );

    let checked = fedmesh(
        &mesh,
        &["bench", "health", "--count", "40", "--concurrency", "4"],
    )
    .await
    .unwrap();
    assert!(
        checked.starts_with("bench health: 40 health checks"),
        "{checked}"
    );
    assert!(!checked.contains("errors"), "{checked}");
}

#[test]
fn every_command_explains_itself_with_examples() {
    fn visit(command: &clap::Command, path: &str, checked: &mut Vec<String>) {
        let path = format!("{path} {}", command.get_name()).trim().to_string();
        let help = command.clone().render_long_help().to_string();
        assert!(
            help.contains("Examples:\n  fedmesh "),
            "`{path} --help` ends with no example:\n{help}"
        );
        checked.push(path.clone());
        for sub in command.get_subcommands() {
            visit(sub, &path, checked);
        }
    }
    let mut command = Cli::command();
    command.build();
    let mut checked = Vec::new();
    visit(&command, "", &mut checked);
    assert!(
        checked.contains(&"fedmesh agency register".to_string()),
        "{checked:?}"
    );
    assert!(
        checked.contains(&"fedmesh bench health".to_string()),
        "{checked:?}"
    );
    // `help` is a command like the others, with its own help.
    let asked = Cli::command().try_get_matches_from(["fedmesh", "help", "--help"]);
    assert_eq!(
        asked.map(|_| ()).map_err(|error| error.kind()),
        Err(clap::error::ErrorKind::DisplayHelp)
    );
}

#[test]
fn client_flags_belong_to_client_commands_only() {
    for argv in [
        ["fedmesh", "dev", "--coordinator", "http://x:1"],
        ["fedmesh", "gateway", "--operator", "alice"],
        ["fedmesh", "coordinator", "--gateway", "http://x:1"],
        ["fedmesh", "notifier", "--notifier", "http://x:1"],
    ] {
        let parsed = Cli::command().try_get_matches_from(argv);
        assert!(parsed.is_err(), "{argv:?} was accepted");
    }
    assert!(
        Cli::command()
            .try_get_matches_from(["fedmesh", "agency", "list", "--coordinator", "http://x:1"])
            .is_ok()
    );
}

#[tokio::test]
async fn show_prints_one_object_and_deregister_protects_unread_messages() {
    let mesh = TestMesh::start().await;
    fedmesh(
        &mesh,
        &["agency", "register", "tax-office", "--region", "east"],
    )
    .await
    .unwrap();
    fedmesh(
        &mesh,
        &["agency", "register", "archive", "--region", "west"],
    )
    .await
    .unwrap();
    let shown = fedmesh(&mesh, &["agency", "show", "archive", "--json"])
        .await
        .unwrap();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["agency_id"], "archive", "one object: {shown}");

    for body in ["one", "two"] {
        fedmesh(
            &mesh,
            &[
                "send",
                "--as",
                "tax-office",
                "--to",
                "archive",
                "--kind",
                "note",
                "--body",
                body,
            ],
        )
        .await
        .unwrap();
    }
    let refused = fedmesh(&mesh, &["agency", "deregister", "archive"])
        .await
        .unwrap_err();
    let line = format!("{refused:#}");
    assert!(
        line.contains("2 unacknowledged messages") && line.contains("--force"),
        "{line}"
    );
    assert_eq!(mesh.agency_ids().await.len(), 2, "nothing was deregistered");
    let forced = fedmesh(&mesh, &["agency", "deregister", "archive", "--force"])
        .await
        .unwrap();
    assert!(forced.contains("deregistered archive"), "{forced}");
    assert_eq!(mesh.agency_ids().await, vec!["tax-office"]);
}

#[tokio::test]
async fn a_send_whose_answer_was_lost_is_retried_and_stored_once() {
    let mesh = TestMesh::start().await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "east").await;
    let proxy = fedmesh_tests::TcpProxy::start(&mesh.gateway_url("east")).await;
    // The gateway stores the message; its answer never reaches the CLI.
    proxy.cut_after_response_headers();
    let sent = fedmesh(
        &mesh,
        &[
            "send",
            "--as",
            "sender",
            "--to",
            "reader",
            "--kind",
            "note",
            "--body",
            "once",
            "--gateway",
            &proxy.url,
            "--json",
        ],
    )
    .await
    .unwrap();
    let receipt: serde_json::Value = serde_json::from_str(&sent).unwrap();
    assert_eq!(receipt["status"], "STORED");
    assert_eq!(
        receipt["duplicate"], true,
        "the retry found what the first attempt stored: {receipt}"
    );
    let mut inbox = mesh.open_inbox("east", "reader", 0).await.unwrap();
    let deliveries = inbox.drain().await;
    assert_eq!(deliveries.len(), 1, "stored once");
    assert_eq!(
        deliveries[0].message.as_ref().unwrap().message_id,
        receipt["message_id"].as_str().unwrap()
    );
}

#[tokio::test]
async fn a_webhook_subscription_and_its_dead_letters_from_the_command_line() {
    let mesh = TestMesh::start_configured(fedmesh_tests::Backend::Sqlite, |options| {
        options.webhooks.webhook_attempts = 2;
        options.webhooks.webhook_backoff_ms = 10;
        options.webhooks.webhook_poll_ms = 50;
    })
    .await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;
    let mut receiver = fedmesh_tests::WebhookReceiver::start().await;
    receiver.answer(&[500, 500]);
    let created = fedmesh(
        &mesh,
        &[
            "subscription",
            "create",
            "audit",
            "--webhook",
            &receiver.url,
            "--kind",
            "message.accepted",
            "--json",
        ],
    )
    .await
    .unwrap();
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["webhook"]["url"], receiver.url.as_str());
    let secret = created["webhook"]["secret"].as_str().unwrap().to_string();
    let shown = fedmesh(&mesh, &["subscription", "show", "audit"])
        .await
        .unwrap();
    assert!(
        shown.contains(&format!("webhook {}", receiver.url)) && shown.contains(&secret),
        "{shown}"
    );

    let sent = mesh
        .send("east", "tax-office", "land-registry", "deed", None)
        .await
        .unwrap();
    receiver.next().await;
    receiver.next().await;
    let listed = within("the dead letter", async {
        loop {
            let listed = fedmesh(&mesh, &["subscription", "dead-letters", "audit", "--json"])
                .await
                .unwrap();
            if !listed.is_empty() {
                return listed;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let dead: serde_json::Value = serde_json::from_str(listed.trim()).unwrap();
    assert_eq!(dead["specversion"], "1.0", "CloudEvents JSON: {listed}");
    assert_eq!(dead["data"]["message_id"], sent.message_id.as_str());

    let replayed = fedmesh(
        &mesh,
        &["subscription", "dead-letters", "audit", "--replay"],
    )
    .await
    .unwrap();
    assert_eq!(
        replayed.trim(),
        "replayed 1 dead letters of subscription audit"
    );
    let delivered = receiver.next().await;
    assert_eq!(delivered.json()["id"], dead["id"]);
    delivered.verify(&secret).unwrap();
    let empty = fedmesh(&mesh, &["subscription", "dead-letters", "audit"])
        .await
        .unwrap();
    assert_eq!(empty.trim(), "no dead letters in subscription audit");

    let refused = fedmesh(
        &mesh,
        &[
            "subscription",
            "create",
            "plain",
            "--webhook",
            "http://receiver.example/hook",
        ],
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("INVALID_ARGUMENT") && refused.contains("loopback"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_durable_subscription_from_the_command_line() {
    let mesh = TestMesh::start().await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;
    let created = fedmesh(
        &mesh,
        &[
            "subscription",
            "create",
            "deeds",
            "--as",
            "land-registry",
            "--kind",
            "message.accepted",
            "--json",
        ],
    )
    .await
    .unwrap();
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["owner"], "agency/land-registry");
    assert_eq!(created["agencies"], serde_json::json!(["land-registry"]));
    assert_eq!(created["order"], "strict");

    let first = mesh
        .send("east", "tax-office", "land-registry", "one", None)
        .await
        .unwrap();
    let second = mesh
        .send("east", "tax-office", "land-registry", "two", None)
        .await
        .unwrap();
    let consume_one = || {
        fedmesh(
            &mesh,
            &[
                "subscribe",
                "--subscription",
                "deeds",
                "--as",
                "land-registry",
                "--limit",
                "1",
                "--json",
            ],
        )
    };
    let printed = consume_one().await.unwrap();
    let event: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
    assert_eq!(event["specversion"], "1.0", "CloudEvents JSON: {printed}");
    assert_eq!(event["type"], "message.accepted");
    assert_eq!(event["data"]["message_id"], first.message_id.as_str());
    assert_eq!(event["redelivered"], false);
    // The first was acknowledged once printed: the next run starts after it.
    let printed = consume_one().await.unwrap();
    let event: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
    assert_eq!(event["data"]["message_id"], second.message_id.as_str());

    let listed = fedmesh(&mesh, &["subscription", "list"]).await.unwrap();
    assert!(
        listed.contains("deeds") && listed.contains("agency/land-registry"),
        "{listed}"
    );
    let refused = fedmesh(
        &mesh,
        &["subscription", "delete", "deeds", "--as", "tax-office"],
    )
    .await
    .unwrap_err();
    assert!(
        format!("{refused:#}").contains("PERMISSION_DENIED"),
        "{refused:#}"
    );
    let deleted = fedmesh(&mesh, &["subscription", "delete", "deeds"])
        .await
        .unwrap();
    assert_eq!(deleted.trim(), "deleted subscription deeds");
    let gone = fedmesh(&mesh, &["subscribe", "--subscription", "deeds"])
        .await
        .unwrap_err();
    assert!(format!("{gone:#}").contains("NOT_FOUND"), "{gone:#}");
}

#[tokio::test]
async fn subscribe_to_a_subscription_moves_to_another_notifier_when_its_own_is_gone() {
    let mut mesh = TestMesh::start().await;
    mesh.register("tax-office", "east").await;
    mesh.register("land-registry", "west").await;
    fedmesh(
        &mesh,
        &[
            "subscription",
            "create",
            "deeds",
            "--kind",
            "message.accepted",
        ],
    )
    .await
    .unwrap();
    // A replica the command would pick first (ids in order) goes away,
    // while the coordinator still lists it.
    mesh.add_notifier("a-replica").await;
    mesh.notifier_known("a-replica").await;
    mesh.stop_notifier("a-replica");
    let sent = mesh
        .send("east", "tax-office", "land-registry", "one", None)
        .await
        .unwrap();
    let printed = fedmesh(
        &mesh,
        &[
            "subscribe",
            "--subscription",
            "deeds",
            "--limit",
            "1",
            "--json",
        ],
    )
    .await
    .unwrap();
    let event: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
    assert_eq!(event["specversion"], "1.0", "CloudEvents JSON: {printed}");
    assert_eq!(event["data"]["message_id"], sent.message_id.as_str());
}

#[tokio::test]
async fn subscribe_moves_to_another_notifier_when_its_own_is_gone() {
    let mut mesh = TestMesh::start().await;
    // A replica the command would pick first (ids in order) goes away,
    // while the coordinator still lists it.
    mesh.add_notifier("a-replica").await;
    mesh.notifier_known("a-replica").await;
    mesh.stop_notifier("a-replica");
    let subscribed = fedmesh(
        &mesh,
        &[
            "subscribe",
            "--kind",
            "agency.registered",
            "--limit",
            "1",
            "--json",
        ],
    );
    tokio::pin!(subscribed);
    // Live events reach a subscriber from the moment it subscribed, which
    // the test cannot see: agencies register until one event is printed.
    let mut registered = 0;
    let printed = within("an event through the other notifier", async {
        loop {
            tokio::select! {
                printed = &mut subscribed => return printed.unwrap(),
                () = tokio::time::sleep(std::time::Duration::from_millis(50)) => {
                    registered += 1;
                    mesh.register(&format!("agency-{registered}"), "east").await;
                }
            }
        }
    })
    .await;
    let event: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
    assert_eq!(event["type"], "agency.registered", "{printed}");
    assert!(
        event["subject"].as_str().unwrap().starts_with("agency-"),
        "{printed}"
    );
}

#[tokio::test]
async fn the_fanout_benchmark_runs_against_a_mesh_on_rabbitmq() {
    let broker = fedmesh_tests::TestBroker::start().await;
    let mesh = TestMesh::start_on_bus(fedmesh_tests::Backend::Sqlite, broker.settings()).await;
    for mode in ["ephemeral", "durable"] {
        for subscriber in 0..3 {
            broker.forget_subscription_at_end(&format!("bench-fanout-{subscriber}"));
        }
        let printed = fedmesh(
            &mesh,
            &[
                "bench",
                "fanout",
                "--amqp",
                &broker.url,
                "--amqp-exchange",
                &broker.exchange,
                "--mode",
                mode,
                "--subscribers",
                "3",
                "--events",
                "60",
                "--baseline",
            ],
        )
        .await
        .unwrap();
        assert!(printed.contains("60 events to 3 "), "{printed}");
        assert!(
            printed.contains("fedmesh") && printed.contains("(180 in"),
            "{printed}"
        );
        assert!(
            printed.contains("RabbitMQ") && printed.contains("ratio"),
            "{printed}"
        );
    }
    let idle = fedmesh(
        &mesh,
        &[
            "bench",
            "fanout",
            "--amqp",
            &broker.url,
            "--idle",
            "20",
            "--pid",
            &std::process::id().to_string(),
        ],
    )
    .await
    .unwrap();
    assert!(
        idle.contains("20 idle subscriber streams") && idle.contains("MiB"),
        "{idle}"
    );
}

#[tokio::test]
async fn an_agency_moves_from_the_command_line_with_its_progress() {
    let mesh = TestMesh::start_configured(fedmesh_tests::Backend::Sqlite, |options| {
        options.shards_per_region = 2
    })
    .await;
    fedmesh(
        &mesh,
        &[
            "agency",
            "register",
            "tax-office",
            "--region",
            "east",
            "--shard",
            "east-1",
        ],
    )
    .await
    .unwrap();
    for body in ["one", "two"] {
        fedmesh(
            &mesh,
            &[
                "send",
                "--as",
                "tax-office",
                "--to",
                "tax-office",
                "--kind",
                "note",
                "--body",
                body,
            ],
        )
        .await
        .unwrap();
    }
    let moved = fedmesh(
        &mesh,
        &[
            "agency",
            "move",
            "tax-office",
            "--region",
            "west",
            "--shard",
            "west-2",
            "--wait",
        ],
    )
    .await
    .unwrap();
    let lines: Vec<&str> = moved.lines().collect();
    assert!(
        lines[0].contains("tax-office: east-1 (east) -> west-2 (west): copying"),
        "{moved}"
    );
    assert!(
        lines.last().unwrap().contains("done, 2 messages"),
        "{moved}"
    );
    let move_id = lines[0].split_whitespace().nth(1).unwrap();
    let shown = fedmesh(
        &mesh,
        &["agency", "move", "tax-office", "--show", move_id, "--json"],
    )
    .await
    .unwrap();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["phase"], "done");
    assert_eq!(shown["to_shard"], "west-2");
    let agency = fedmesh(&mesh, &["agency", "show", "tax-office", "--json"])
        .await
        .unwrap();
    let agency: serde_json::Value = serde_json::from_str(&agency).unwrap();
    assert_eq!(
        (
            &agency["region"],
            &agency["shard"],
            &agency["moving"],
            &agency["version"]
        ),
        (
            &serde_json::json!("west"),
            &serde_json::json!("west-2"),
            &serde_json::json!(false),
            &serde_json::json!(3)
        )
    );
    // Too late to cancel, and said in one line.
    let error = fedmesh(
        &mesh,
        &["agency", "move", "tax-office", "--cancel", move_id],
    )
    .await
    .unwrap_err();
    let error = format!("{error:#}");
    assert!(
        error.contains("cut over already") && !error.contains('\n'),
        "{error}"
    );
    let inbox = fedmesh(&mesh, &["inbox", "--as", "tax-office", "--json"])
        .await
        .unwrap();
    assert_eq!(inbox.lines().count(), 2, "{inbox}");
    let status = fedmesh(&mesh, &["status", "--json"]).await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["moves"], serde_json::json!([]), "none under way");
    let error = fedmesh(&mesh, &["agency", "move", "tax-office"])
        .await
        .unwrap_err();
    assert!(format!("{error}").contains("--shard"), "{error}");
}
