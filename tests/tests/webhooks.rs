//! Webhook subscriptions: notifiers POST each event to the endpoint,
//! signed as Standard Webhooks does, retry what fails with backoff, and keep
//! what fails every attempt as a dead letter that can be replayed; on the
//! in-process bus and on RabbitMQ alike.

use std::time::Duration;

use fedmesh_common::events::MESSAGE_ACCEPTED;
use fedmesh_common::identity::Identity;
use fedmesh_proto::pb;
use fedmesh_tests::{Bus, Consumer, TestBroker, TestMesh, WebhookReceiver, subscription, within};
use tonic::Code;

fn operator() -> Identity {
    Identity::Operator("ops".into())
}

/// A mesh whose notifiers retry quickly and give up after `attempts`,
/// with agencies `sender` (east) and `reader` (west); on RabbitMQ the
/// queues of `subscriptions` are removed at the end.
async fn mesh_with_attempts(
    bus: Bus,
    attempts: u32,
    subscriptions: &[&str],
) -> (TestMesh, Option<TestBroker>) {
    let (mesh, broker) = bus
        .mesh_configured(|options| {
            options.webhooks.webhook_attempts = attempts;
            options.webhooks.webhook_backoff_ms = 10;
            options.webhooks.webhook_backoff_max_ms = 40;
            options.webhooks.webhook_poll_ms = 50;
        })
        .await;
    if let Some(broker) = &broker {
        for name in subscriptions {
            broker.forget_subscription_at_end(name);
        }
    }
    mesh.register("sender", "east").await;
    mesh.register("reader", "west").await;
    (mesh, broker)
}

/// A subscription to what `reader` is sent, delivered to `url`.
fn hooked(name: &str, url: &str) -> pb::Subscription {
    pb::Subscription {
        webhook: Some(pb::Webhook {
            url: url.into(),
            ..Default::default()
        }),
        ..subscription(name, &["reader"], &[MESSAGE_ACCEPTED])
    }
}

async fn dead_letters(mesh: &TestMesh, name: &str) -> Vec<pb::Event> {
    mesh.directory_as(&operator())
        .list_dead_letters(pb::ListDeadLettersRequest {
            name: name.into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .events
}

/// Asks for the dead letters of `name` until there are `count`: the
/// notifier keeps one right after the endpoint's last refusal, which the
/// test has seen, but nothing tells the test when it is kept.
async fn dead_letters_become(mesh: &TestMesh, name: &str, count: usize) -> Vec<pb::Event> {
    within("the dead letters", async {
        loop {
            let events = dead_letters(mesh, name).await;
            if events.len() == count {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

async fn a_webhook_that_fails_twice_gets_the_event_three_times_signed(bus: Bus) {
    let (mesh, _broker) = mesh_with_attempts(bus, 5, &["hooked"]).await;
    let mut receiver = WebhookReceiver::start().await;
    receiver.answer(&[500, 503]);
    let created = mesh
        .create_subscription(&operator(), hooked("hooked", &receiver.url))
        .await
        .unwrap();
    let webhook = created.webhook.unwrap();
    assert_eq!(webhook.url, receiver.url);
    assert!(webhook.secret.starts_with("whsec_"), "{}", webhook.secret);

    let sent = mesh
        .send("east", "sender", "reader", "one", None)
        .await
        .unwrap();
    let attempts = [
        receiver.next().await,
        receiver.next().await,
        receiver.next().await,
    ];
    let event = attempts[2].json();
    assert_eq!(event["specversion"], "1.0", "CloudEvents JSON");
    assert_eq!(event["type"], MESSAGE_ACCEPTED);
    assert_eq!(event["data"]["message_id"], sent.message_id.as_str());
    for attempt in &attempts {
        assert_eq!(
            attempt.headers["content-type"],
            "application/cloudevents+json"
        );
        assert_eq!(
            attempt.headers["webhook-id"].to_str().unwrap(),
            event["id"].as_str().unwrap(),
            "every attempt names the event"
        );
        assert_eq!(attempt.body, attempts[2].body);
        attempt.verify(&webhook.secret).unwrap();
        assert!(
            attempt
                .verify("whsec_c29tZW9uZSBlbHNlJ3Mgc2VjcmV0IGtleQ==")
                .is_err(),
            "another secret does not verify"
        );
    }

    // Taken off the subscription once answered 200: the next request is the
    // next event, and nothing is dead.
    let next = mesh
        .send("east", "sender", "reader", "two", None)
        .await
        .unwrap();
    let hook = receiver.next().await;
    assert_eq!(hook.json()["data"]["message_id"], next.message_id.as_str());
    hook.verify(&webhook.secret).unwrap();
    assert!(dead_letters(&mesh, "hooked").await.is_empty());
}

async fn an_event_refused_at_every_attempt_is_a_dead_letter_until_replayed(bus: Bus) {
    let (mesh, _broker) = mesh_with_attempts(bus, 3, &["hooked"]).await;
    let mut receiver = WebhookReceiver::start().await;
    receiver.answer(&[500, 500, 500]);
    let secret = mesh
        .create_subscription(&operator(), hooked("hooked", &receiver.url))
        .await
        .unwrap()
        .webhook
        .unwrap()
        .secret;
    let sent = mesh
        .send("east", "sender", "reader", "one", None)
        .await
        .unwrap();
    for _ in 0..3 {
        receiver.next().await;
    }
    let dead = dead_letters_become(&mesh, "hooked", 1).await;
    assert_eq!(dead[0].message_id, sent.message_id);
    assert_eq!(
        dead_letters(&mesh, "hooked").await,
        dead,
        "listing leaves them in place"
    );
    assert!(receiver.try_next().is_none(), "no fourth attempt");

    // A later event is not held up by the dead one.
    let later = mesh
        .send("east", "sender", "reader", "two", None)
        .await
        .unwrap();
    let hook = receiver.next().await;
    assert_eq!(hook.json()["data"]["message_id"], later.message_id.as_str());
    // At least this test's (the recorder is the process's: other tests
    // running in it add theirs).
    let metrics = fedmesh_common::telemetry::recorder().render();
    for (series, least) in [
        ("fedmesh_webhook_attempts_total{outcome=\"failed\"} ", 3.0),
        (
            "fedmesh_webhook_dead_letters_total{subscription=\"hooked\"} ",
            1.0,
        ),
    ] {
        let value: f64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix(series))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"));
        assert!(value >= least, "{series}{value}, fewer than {least}");
    }

    let replayed = mesh
        .directory_as(&operator())
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            name: "hooked".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .replayed;
    assert_eq!(replayed, 1);
    let again = receiver.next().await;
    assert_eq!(again.json()["data"]["message_id"], sent.message_id.as_str());
    assert_eq!(
        again.headers["webhook-id"].to_str().unwrap(),
        dead[0].event_id,
        "the same event, by id"
    );
    again.verify(&secret).unwrap();
    assert!(dead_letters(&mesh, "hooked").await.is_empty());
}

async fn webhook_subscriptions_refuse_what_cannot_work(bus: Bus) {
    let (mesh, _broker) = mesh_with_attempts(bus, 3, &["hooked", "streamed"]).await;
    mesh.register("other", "east").await;
    for (url, says) in [
        ("http://receiver.example/hook", "not a loopback address"),
        ("ftp://127.0.0.1/hook", "neither https:// nor http://"),
        ("", "is not a URL"),
    ] {
        let refused = mesh
            .create_subscription(&operator(), hooked("hooked", url))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{url}: {refused:?}");
        assert!(
            refused.message().contains("subscription.webhook.url")
                && refused.message().contains(says),
            "{url}: {}",
            refused.message()
        );
    }
    let receiver = WebhookReceiver::start().await;
    let local = mesh
        .create_subscription(
            &Identity::Agency("reader".into()),
            hooked("hooked", &receiver.url),
        )
        .await
        .unwrap_err();
    assert_eq!(local.code(), Code::InvalidArgument);
    assert!(
        local.message().contains("an agency's webhook is https://"),
        "{local:?}"
    );
    let listed = mesh
        .directory_as(&operator())
        .list_subscriptions(pb::ListSubscriptionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .subscriptions;
    assert!(listed.is_empty(), "nothing was created: {listed:?}");

    mesh.create_subscription(&operator(), hooked("hooked", &receiver.url))
        .await
        .unwrap();
    let streamed = Consumer::open(mesh.notifications_as(&operator()), "hooked", 1)
        .await
        .err()
        .unwrap();
    assert_eq!(streamed.code(), Code::FailedPrecondition, "{streamed:?}");
    assert!(streamed.message().contains("webhook"), "{streamed:?}");

    let mut directory = mesh.directory_as(&operator());
    let too_many = directory
        .list_dead_letters(pb::ListDeadLettersRequest {
            name: "hooked".into(),
            limit: 5000,
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert!(too_many.message().contains("limit"), "{too_many:?}");
    let unknown = directory
        .list_dead_letters(pb::ListDeadLettersRequest {
            name: "nope".into(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    mesh.create_subscription(&operator(), subscription("streamed", &["reader"], &[]))
        .await
        .unwrap();
    let no_dead_letters = directory
        .list_dead_letters(pb::ListDeadLettersRequest {
            name: "streamed".into(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(no_dead_letters.code(), Code::FailedPrecondition);
    assert!(
        no_dead_letters
            .message()
            .contains("only webhook subscriptions"),
        "{no_dead_letters:?}"
    );
    let stranger = mesh
        .directory_as(&Identity::Agency("other".into()))
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            name: "hooked".into(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(stranger.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_webhook_over_https_is_delivered_to_an_endpoint_its_ca_vouches_for() {
    let (mut receiver, ca) = WebhookReceiver::start_https().await;
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), ca).unwrap();
    let mesh = TestMesh::start_configured(fedmesh_tests::Backend::Sqlite, |options| {
        options.webhooks.webhook_poll_ms = 50;
        options.webhooks.webhook_ca = Some(ca_file.path().to_path_buf());
    })
    .await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "west").await;
    assert!(receiver.url.starts_with("https://"), "{}", receiver.url);
    let secret = mesh
        .create_subscription(&operator(), hooked("secure", &receiver.url))
        .await
        .unwrap()
        .webhook
        .unwrap()
        .secret;
    let sent = mesh
        .send("east", "sender", "reader", "one", None)
        .await
        .unwrap();
    let hook = receiver.next().await;
    assert_eq!(hook.json()["data"]["message_id"], sent.message_id.as_str());
    hook.verify(&secret).unwrap();
}

#[tokio::test]
async fn a_webhook_over_https_is_not_delivered_to_an_endpoint_no_trusted_ca_vouches_for() {
    let (mut receiver, _ca) = WebhookReceiver::start_https().await;
    let mesh = TestMesh::start_configured(fedmesh_tests::Backend::Sqlite, |options| {
        options.webhooks.webhook_attempts = 2;
        options.webhooks.webhook_backoff_ms = 10;
        options.webhooks.webhook_poll_ms = 50;
    })
    .await;
    mesh.register("sender", "east").await;
    mesh.register("reader", "west").await;
    mesh.create_subscription(&operator(), hooked("untrusted", &receiver.url))
        .await
        .unwrap();
    let sent = mesh
        .send("east", "sender", "reader", "one", None)
        .await
        .unwrap();
    let dead = dead_letters_become(&mesh, "untrusted", 1).await;
    assert_eq!(dead[0].message_id, sent.message_id);
    assert!(
        receiver.try_next().is_none(),
        "the endpoint got nothing over an unverified connection"
    );
}

async fn a_webhook_gets_only_what_its_filter_selects_when_its_bindings_are_wider(bus: Bus) {
    let (mesh, _broker) = mesh_with_attempts(bus, 3, &["wide"]).await;
    mesh.register("other", "west").await;
    let mut receiver = WebhookReceiver::start().await;
    // 3 regions x 22 agencies: more combinations than a queue is bound
    // with, so its bindings take any agency of these regions.
    let mut agencies = vec!["reader".to_string()];
    agencies.extend((1..=21).map(|n| format!("a{n}")));
    let agencies: Vec<&str> = agencies.iter().map(String::as_str).collect();
    let wide = pb::Subscription {
        regions: vec!["east".into(), "west".into(), "central".into()],
        webhook: Some(pb::Webhook {
            url: receiver.url.clone(),
            ..Default::default()
        }),
        ..subscription("wide", &agencies, &[MESSAGE_ACCEPTED])
    };
    mesh.create_subscription(&operator(), wide).await.unwrap();
    mesh.send("east", "sender", "other", "not selected", None)
        .await
        .unwrap();
    let selected = mesh
        .send("east", "sender", "reader", "selected", None)
        .await
        .unwrap();
    let hook = receiver.next().await;
    assert_eq!(hook.json()["subject"], "reader", "{:?}", hook.json());
    assert_eq!(
        hook.json()["data"]["message_id"],
        selected.message_id.as_str()
    );
}

fedmesh_tests::on_every_bus!(
    a_webhook_gets_only_what_its_filter_selects_when_its_bindings_are_wider,
    a_webhook_that_fails_twice_gets_the_event_three_times_signed,
    an_event_refused_at_every_attempt_is_a_dead_letter_until_replayed,
    webhook_subscriptions_refuse_what_cannot_work,
);
