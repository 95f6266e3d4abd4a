//! The directory store suite, run on every backend.

use fedmesh_common::events::{AGENCY_REGISTERED, Event};

use super::*;

fn agency(agency_id: &str) -> AgencyRecord {
    AgencyRecord {
        agency_id: agency_id.to_string(),
        region: "east".to_string(),
        shard: "east-1".to_string(),
        display_name: String::new(),
        registered_at_micros: 1,
        moving: false,
        version: 1,
    }
}

macro_rules! directory_store_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn duplicate_registration_conflicts_and_writes_nothing() {
                let (store, _guard) = $open.await;
                let event = || Event::new(AGENCY_REGISTERED, "east", "alpha");
                store
                    .insert_agency(&agency("alpha"), Some(event()))
                    .await
                    .expect("first insert");
                let second = store.insert_agency(&agency("alpha"), Some(event())).await;
                assert!(matches!(second, Err(StoreError::Conflict)), "{second:?}");
                assert_eq!(store.all_agencies().await.expect("list").len(), 1);
                let outbox = fedmesh_common::testing::drain_outbox(store.outbox().as_ref()).await;
                assert_eq!(outbox.len(), 1, "the rejected insert wrote no event");
            }

            #[tokio::test]
            async fn subscriptions_are_kept_by_name_with_their_filter() {
                let (store, _guard) = $open.await;
                let subscription = SubscriptionRecord {
                    name: "deliveries".into(),
                    owner: "agency/alpha".into(),
                    filter: fedmesh_common::events::Filter {
                        regions: vec!["east".into()],
                        agencies: vec!["alpha".into()],
                        kinds: vec!["message.accepted".into()],
                    },
                    strict_order: false,
                    created_at_micros: 42,
                    webhook: None,
                };
                store
                    .insert_subscription(&subscription)
                    .await
                    .expect("insert");
                let again = store.insert_subscription(&subscription).await;
                assert!(matches!(again, Err(StoreError::Conflict)), "{again:?}");
                let hooked = SubscriptionRecord {
                    name: "hooked".into(),
                    webhook: Some(crate::subscription::WebhookTarget {
                        url: "https://receiver.example/events".into(),
                        secret: "whsec_c2VjcmV0".into(),
                    }),
                    ..subscription.clone()
                };
                store.insert_subscription(&hooked).await.expect("insert");
                assert_eq!(
                    store.all_subscriptions().await.expect("list"),
                    vec![subscription.clone(), hooked]
                );
                assert!(store.delete_subscription("hooked").await.expect("delete"));
                assert!(
                    store
                        .delete_subscription("deliveries")
                        .await
                        .expect("delete")
                );
                assert!(
                    !store
                        .delete_subscription("deliveries")
                        .await
                        .expect("again")
                );
                assert!(store.all_subscriptions().await.expect("list").is_empty());
            }

            #[tokio::test]
            async fn delete_removes_and_reports_absence() {
                let (store, _guard) = $open.await;
                let event = || Event::new(AGENCY_REGISTERED, "east", "alpha");
                store
                    .insert_agency(&agency("alpha"), Some(event()))
                    .await
                    .expect("insert");
                assert!(
                    store
                        .delete_agency("alpha", Some(event()))
                        .await
                        .expect("delete")
                );
                assert!(
                    !store
                        .delete_agency("alpha", Some(event()))
                        .await
                        .expect("delete again")
                );
                assert!(store.all_agencies().await.expect("list").is_empty());
            }

            #[tokio::test]
            async fn a_move_cuts_over_once_under_the_current_token_and_a_cancel_undoes_it() {
                let (store, _guard) = $open.await;
                store
                    .insert_agency(&agency("alpha"), None)
                    .await
                    .expect("insert");
                let now = fedmesh_common::time::now_micros();
                let first = store
                    .acquire_lease(crate::lease::LEADER, "a", now, 1)
                    .await
                    .expect("acquire")
                    .expect("a leads");
                let record = |move_id: &str| crate::moves::MoveRecord {
                    move_id: move_id.to_string(),
                    agency_id: "alpha".into(),
                    from_region: "east".into(),
                    from_shard: "east-1".into(),
                    to_region: "west".into(),
                    to_shard: "west-1".into(),
                    phase: crate::moves::MovePhase::Copying,
                    messages_copied: 0,
                    keys_copied: 0,
                    last_error: String::new(),
                    started_at_micros: 5,
                    updated_at_micros: 5,
                };
                assert!(store.begin_move(&record("m1")).await.expect("begin"));
                let again = store.begin_move(&record("m2")).await;
                assert!(matches!(again, Err(StoreError::Conflict)), "{again:?}");
                let mut ghost = record("m3");
                ghost.agency_id = "nobody".into();
                assert!(!store.begin_move(&ghost).await.expect("begin"));
                assert!(store.all_agencies().await.expect("list")[0].moving);
                assert_eq!(
                    store.moves_under_way().await.expect("list").len(),
                    1,
                    "only the first began"
                );
                // Another replica took the lease: the old token cuts nothing over.
                let taken = store
                    .acquire_lease(crate::lease::LEADER, "b", now + 10, 1_000_000)
                    .await
                    .expect("acquire")
                    .expect("b takes it");
                let fenced = store.cut_over_move(first.token, "m1", None).await;
                assert!(
                    matches!(fenced, Err(StoreError::Fenced { .. })),
                    "{fenced:?}"
                );
                let cut = store
                    .cut_over_move(taken.token, "m1", None)
                    .await
                    .expect("cut over")
                    .expect("copying");
                assert_eq!(cut.phase, crate::moves::MovePhase::Releasing);
                let moved = &store.all_agencies().await.expect("list")[0];
                assert_eq!(
                    (moved.region.as_str(), moved.shard.as_str(), moved.moving),
                    ("west", "west-1", false)
                );
                assert_eq!(moved.version, 3, "registered, moving, cut over");
                let late = store
                    .cancel_move("m1")
                    .await
                    .expect("cancel")
                    .expect("known");
                assert_eq!(
                    late.phase,
                    crate::moves::MovePhase::Releasing,
                    "too late to cancel"
                );
                let done = store
                    .finish_move(taken.token, "m1")
                    .await
                    .expect("finish")
                    .expect("releasing");
                assert_eq!(done.phase, crate::moves::MovePhase::Done);
                assert!(store.moves_under_way().await.expect("list").is_empty());

                // A move back, cancelled before its cut-over, leaves alpha in the west.
                let mut back = record("m4");
                (back.from_region, back.from_shard) = ("west".into(), "west-1".into());
                (back.to_region, back.to_shard) = ("east".into(), "east-1".into());
                assert!(store.begin_move(&back).await.expect("begin"));
                let cancelling = store
                    .cancel_move("m4")
                    .await
                    .expect("cancel")
                    .expect("known");
                assert_eq!(cancelling.phase, crate::moves::MovePhase::Cancelling);
                assert_eq!(
                    store
                        .cut_over_move(taken.token, "m4", None)
                        .await
                        .expect("cut over"),
                    None
                );
                let cancelled = store
                    .finish_move(taken.token, "m4")
                    .await
                    .expect("finish")
                    .expect("cancelling");
                assert_eq!(cancelled.phase, crate::moves::MovePhase::Cancelled);
                let stayed = &store.all_agencies().await.expect("list")[0];
                assert_eq!(
                    (stayed.region.as_str(), stayed.shard.as_str(), stayed.moving),
                    ("west", "west-1", false)
                );
                assert_eq!(stayed.version, 5, "moving again, then cancelled");
                assert_eq!(store.agency_move("m4").await.expect("get"), Some(cancelled));
            }

            #[tokio::test]
            async fn a_lease_passes_on_only_once_expired_and_fences_its_old_holder() {
                let (store, _guard) = $open.await;
                let second = 1_000_000;
                let lease = |holder: &'static str, now: i64| {
                    store.acquire_lease(crate::lease::LEADER, holder, now, 10 * second)
                };
                let first = lease("a", 0).await.expect("acquire").expect("a takes it");
                assert_eq!(first.token, 1);
                assert_eq!(
                    lease("b", 5 * second).await.expect("acquire"),
                    None,
                    "a holds it"
                );
                let renewed = lease("a", 8 * second)
                    .await
                    .expect("renew")
                    .expect("a renews");
                assert_eq!((renewed.token, renewed.expires_at_micros), (1, 18 * second));
                assert_eq!(
                    lease("b", 17 * second).await.expect("acquire"),
                    None,
                    "renewed"
                );
                assert!(
                    !store
                        .set_gateway_state(1, "east-0", "east", true, None)
                        .await
                        .expect("the leader's write"),
                    "a gateway never down is up already"
                );
                assert!(
                    store
                        .set_gateway_state(1, "east-0", "east", false, None)
                        .await
                        .expect("the leader's write")
                );
                // a goes quiet; b takes over after the lease expired.
                let taken = lease("b", 19 * second)
                    .await
                    .expect("acquire")
                    .expect("b takes it");
                assert_eq!((taken.holder.as_str(), taken.token), ("b", 2));
                assert_eq!(
                    lease("a", 20 * second).await.expect("renew"),
                    None,
                    "a is deposed"
                );
                let fenced = store
                    .set_gateway_state(1, "east-0", "east", true, None)
                    .await;
                assert!(
                    matches!(
                        fenced,
                        Err(StoreError::Fenced {
                            token: 1,
                            current: Some(2)
                        })
                    ),
                    "{fenced:?}"
                );
                assert!(
                    store
                        .set_gateway_state(2, "east-0", "east", true, None)
                        .await
                        .expect("the new leader's write")
                );
                assert_eq!(
                    store.lease(crate::lease::LEADER).await.expect("lease"),
                    Some(taken)
                );
            }

            #[tokio::test]
            async fn regions_and_shards_are_data() {
                let (store, _guard) = $open.await;
                store.insert_region("east", 1).await.expect("region");
                let again = store.insert_region("east", 2).await;
                assert!(matches!(again, Err(StoreError::Conflict)), "{again:?}");
                store.insert_region("west", 3).await.expect("region");
                let shard = crate::region::ShardRecord {
                    name: "east-1".into(),
                    region: "east".into(),
                    address: "db1/east_1".into(),
                    draining: false,
                    capacity: 500,
                    created_at_micros: 4,
                };
                store.insert_shard(&shard).await.expect("shard");
                let taken = store.insert_shard(&shard).await;
                assert!(matches!(taken, Err(StoreError::Conflict)), "{taken:?}");
                assert!(
                    store
                        .set_shard_draining("east-1", true)
                        .await
                        .expect("drain")
                );
                assert!(
                    !store
                        .set_shard_draining("nowhere", true)
                        .await
                        .expect("drain")
                );
                let shards = store.all_shards().await.expect("shards");
                assert_eq!(
                    shards,
                    vec![crate::region::ShardRecord {
                        draining: true,
                        ..shard
                    }]
                );
                assert_eq!(
                    store.all_regions().await.expect("regions"),
                    ["east", "west"]
                );
                assert!(store.delete_region("east").await.expect("remove"));
                assert!(
                    store.all_shards().await.expect("shards").is_empty(),
                    "with its shards"
                );
                assert_eq!(store.all_regions().await.expect("regions"), ["west"]);
                assert!(!store.delete_shard("east-1").await.expect("gone"));
            }

            #[tokio::test]
            async fn grants_are_kept_until_deleted() {
                let (store, _guard) = $open.await;
                let grant = GrantRecord {
                    grant_id: uuid::Uuid::now_v7().to_string(),
                    sender_id: String::new(),
                    recipient_id: "beta".into(),
                    kinds: vec!["tax.notice".into()],
                    granted_at_micros: 7,
                    granted_by: "operator/alice".into(),
                };
                store.insert_grant(&grant).await.expect("insert");
                let same_right = GrantRecord {
                    grant_id: uuid::Uuid::now_v7().to_string(),
                    ..grant.clone()
                };
                let again = store.insert_grant(&same_right).await;
                assert!(matches!(again, Err(StoreError::Conflict)), "{again:?}");
                assert_eq!(store.all_grants().await.expect("list"), vec![grant.clone()]);
                assert!(store.delete_grant(&grant.grant_id).await.expect("delete"));
                assert!(!store.delete_grant(&grant.grant_id).await.expect("again"));
                assert!(store.all_grants().await.expect("list").is_empty());
            }

            #[tokio::test]
            async fn audit_rows_chain_per_region_even_when_appended_together() {
                let (store, _guard) = $open.await;
                let store = std::sync::Arc::new(store);
                let record = |chain: &str, n: usize| AuditRecord {
                    chain: chain.into(),
                    actor: "operator/alice".into(),
                    action: "register".into(),
                    target: format!("agency/a{n}"),
                    outcome: "ok".into(),
                    detail: String::new(),
                };
                let mut appends = tokio::task::JoinSet::new();
                for n in 0..20 {
                    let store = std::sync::Arc::clone(&store);
                    let chain = if n % 2 == 0 { "east" } else { "west" };
                    let record = record(chain, n);
                    appends.spawn(async move { store.append_audit(&record, 5).await });
                }
                while let Some(appended) = appends.join_next().await {
                    appended.expect("task").expect("append");
                }
                let all = store.audit_page(None, None, 1000).await.expect("page");
                assert_eq!(all.len(), 20);
                assert_eq!(fedmesh_common::audit::verify(&all), Ok(20));
                let west = store
                    .audit_page(Some("west"), None, 1000)
                    .await
                    .expect("page");
                assert_eq!(
                    west.iter().map(|entry| entry.seq).collect::<Vec<_>>(),
                    (1..=10).collect::<Vec<_>>()
                );
                let after = store
                    .audit_page(None, Some(("east", 9)), 3)
                    .await
                    .expect("page");
                let places: Vec<_> = after
                    .iter()
                    .map(|entry| (entry.record.chain.as_str(), entry.seq))
                    .collect();
                assert_eq!(places, [("east", 10), ("west", 1), ("west", 2)]);
            }
        }
    };
}

async fn open_sqlite() -> (SqliteDirectoryStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("control.sqlite").display());
    (SqliteDirectoryStore::open(&url).await.expect("open"), dir)
}

directory_store_suite!(sqlite, open_sqlite());

async fn open_postgres() -> (PgDirectoryStore, fedmesh_common::testing::TestDatabase) {
    let database = fedmesh_common::testing::TestDatabase::create().await;
    let store = PgDirectoryStore::open(&database.url, 4)
        .await
        .expect("open");
    (store, database)
}

directory_store_suite!(postgres, open_postgres());
