//! Wake-ups between the gateway replicas of one shard, over PostgreSQL's
//! `LISTEN`/`NOTIFY`.
//!
//! A replica that stores a message for an inbox announces it on
//! [`INBOX_CHANNEL`], so that a replica streaming that inbox reads it at
//! once. Announcing costs a statement per batch, so a replica announces only
//! while it knows of another replica on the shard. Replicas find each other on
//! [`REPLICA_CHANNEL`]:
//!
//! - on (re)connecting its listener, a replica says `hello <id>`;
//! - a replica that hears `hello` from another records it and answers
//!   `here <id>`; every replica also says `here <id>` every
//!   [`HEARTBEAT`], and `bye <id>` when it stops;
//! - a replica forgets another after [`FORGET_AFTER`] without hearing it.
//!
//! A replica that opens a Receive stream announces its epoch on
//! [`STREAM_CHANNEL`] (always: streams open rarely), so that an older
//! stream of the inbox on another replica ends at once.
//!
//! No wake-up is lost in the hand-over: when B starts, A stores messages
//! without announcing them only until it hears B's `hello`; it answers after
//! that, and B, on hearing of A for the first time, has every stream read
//! its inbox again, which finds whatever A stored before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::inbox::InboxHub;

/// The channel new messages are announced on: payload `<recipient> <sequence>`.
pub const INBOX_CHANNEL: &str = "fedmesh_inbox";

/// The channel new Receive streams are announced on: payload
/// `<recipient> <epoch>`. A replica streaming that inbox with an older epoch
/// ends its stream.
pub const STREAM_CHANNEL: &str = "fedmesh_streams";

/// The channel replicas of a shard announce themselves on: payload
/// `hello|here|bye <replica id>`.
pub const REPLICA_CHANNEL: &str = "fedmesh_replicas";

/// How often a replica says it is still there.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// How long a replica is remembered without being heard.
const FORGET_AFTER: Duration = Duration::from_secs(20);

/// The other replicas of a shard this replica has heard of, and its own id.
#[derive(Debug)]
pub(super) struct Replicas {
    id: String,
    others: Mutex<HashMap<String, Instant>>,
    /// How many others are known; changes as replicas come and go.
    count: watch::Sender<usize>,
    announcements: AtomicU64,
}

impl Replicas {
    pub(super) fn new() -> Self {
        Replicas {
            id: uuid::Uuid::now_v7().to_string(),
            others: Mutex::new(HashMap::new()),
            count: watch::channel(0).0,
            announcements: AtomicU64::new(0),
        }
    }

    fn others(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.others
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether another replica may be streaming from this shard.
    pub(super) fn any_other(&self) -> bool {
        let mut others = self.others();
        let before = others.len();
        others.retain(|_, heard| heard.elapsed() < FORGET_AFTER);
        if others.len() != before {
            self.count.send_replace(others.len());
        }
        !others.is_empty()
    }

    /// The number of other replicas known, as it changes.
    pub(super) fn watch(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    /// The ids of the other replicas heard of, sorted.
    pub(super) fn known(&self) -> Vec<String> {
        let mut known: Vec<String> = self.others().keys().cloned().collect();
        known.sort();
        known
    }

    /// How many inbox announcements this replica has sent.
    pub(super) fn announcements(&self) -> u64 {
        self.announcements.load(Ordering::Relaxed)
    }

    /// Records that `id` was heard; true if it was not known before.
    fn heard(&self, id: &str) -> bool {
        let mut others = self.others();
        let new = others.insert(id.to_string(), Instant::now()).is_none();
        self.count.send_replace(others.len());
        new
    }

    fn forget(&self, id: &str) {
        let mut others = self.others();
        others.remove(id);
        self.count.send_replace(others.len());
    }
}

/// Announces new messages (`<recipient> <last sequence>` each) to the other
/// replicas, if there are any. Not awaited by the caller: a lost
/// announcement is covered by the streams' fallback poll.
pub(super) fn announce(pool: &PgPool, replicas: &Replicas, wake_up: Vec<String>) {
    if wake_up.is_empty() || !replicas.any_other() {
        return;
    }
    replicas.announcements.fetch_add(1, Ordering::Relaxed);
    let pool = pool.clone();
    tokio::spawn(async move {
        let notified =
            sqlx::query("SELECT pg_notify($1, payload) FROM UNNEST($2::text[]) AS payload")
                .bind(INBOX_CHANNEL)
                .bind(wake_up)
                .execute(&pool)
                .await;
        if let Err(error) = notified {
            tracing::warn!(%error, "inbox notification failed; other replicas will poll");
        }
    });
}

async fn say(pool: &PgPool, word: &str, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(REPLICA_CHANNEL)
        .bind(format!("{word} {id}"))
        .execute(pool)
        .await?;
    Ok(())
}

/// Listens until `shutdown`, reconnecting with a growing pause; after every
/// reconnection each stream reads its inbox again.
pub(super) async fn run(
    pool: PgPool,
    replicas: std::sync::Arc<Replicas>,
    hub: std::sync::Arc<InboxHub>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let listened = listen(&pool, &replicas, &hub, &shutdown).await;
        if shutdown.is_cancelled() {
            let goodbye = say(&pool, "bye", &replicas.id);
            if !matches!(
                tokio::time::timeout(Duration::from_secs(1), goodbye).await,
                Ok(Ok(()))
            ) {
                tracing::debug!("could not say goodbye to the other replicas");
            }
            return;
        }
        if let Err(error) = listened {
            tracing::warn!(%error, retry_in = ?backoff, "inbox notifications lost, reconnecting");
        }
        // Notifications may have been missed: every stream looks again.
        hub.wake_all();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn listen(
    pool: &PgPool,
    replicas: &Replicas,
    hub: &InboxHub,
    shutdown: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([INBOX_CHANNEL, REPLICA_CHANNEL, STREAM_CHANNEL])
        .await?;
    say(pool, "hello", &replicas.id).await?;
    // Anything stored before LISTEN took effect is found by the streams'
    // next read.
    hub.wake_all();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let notification = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = heartbeat.tick() => {
                say(pool, "here", &replicas.id).await?;
                continue;
            }
            notification = listener.try_recv() => notification?,
        };
        let Some(notification) = notification else {
            return Err(sqlx::Error::Protocol("listener connection closed".into()));
        };
        let payload = notification.payload();
        if notification.channel() == REPLICA_CHANNEL {
            let Some((word, id)) = payload.split_once(' ') else {
                tracing::warn!(payload, "malformed replica notification");
                continue;
            };
            if id == replicas.id {
                continue;
            }
            match word {
                "hello" | "here" => {
                    if replicas.heard(id) {
                        tracing::info!(replica = id, "another gateway replica shares this shard");
                        // It may have stored messages before it knew of
                        // this replica, without announcing them.
                        hub.wake_all();
                    }
                    if word == "hello" {
                        say(pool, "here", &replicas.id).await?;
                    }
                }
                "bye" => {
                    tracing::info!(replica = id, "a gateway replica left this shard");
                    replicas.forget(id);
                }
                _ => tracing::warn!(payload, "unknown replica notification"),
            }
            continue;
        }
        let parsed = payload
            .rsplit_once(' ')
            .and_then(|(recipient, number)| Some((recipient, number.parse::<u64>().ok()?)));
        match parsed {
            Some((recipient, epoch)) if notification.channel() == STREAM_CHANNEL => {
                hub.claimed(recipient, epoch);
            }
            Some((recipient, sequence)) => hub.stored(recipient, sequence),
            None => tracing::warn!(payload, "malformed inbox notification"),
        }
    }
}
