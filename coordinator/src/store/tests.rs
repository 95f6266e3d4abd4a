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
