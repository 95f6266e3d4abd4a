//! DOMAIN: who is streaming which inbox, waking them, and the state of one
//! stream ([`stream`]).
//!
//! [`InboxHub`] keeps, per recipient streamed by this gateway, a watch channel
//! of the last sequence stored, so that a stream sleeps until there is
//! something new, and the streams open for it. A stream is admitted (up to a
//! cap per agency), then activated with its epoch: a number the shard hands
//! out, higher for every newer stream of the inbox, whichever replica opened
//! it. Activating a stream ends every older one of the inbox on this
//! gateway; hearing of a newer epoch from another replica ends this
//! gateway's stream too. So the newest stream wins, across replicas.

pub mod stream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The stream of an inbox that currently delivers.
struct Active {
    stream_id: u64,
    epoch: u64,
    taken_over: CancellationToken,
}

#[derive(Default)]
struct InboxEntry {
    stored: Option<watch::Sender<u64>>,
    active: Option<Active>,
    /// Streams admitted and not yet ended, the active one included.
    n_streams: usize,
}

/// The inboxes streamed by this gateway.
pub struct InboxHub {
    entries: Mutex<HashMap<String, InboxEntry>>,
    next_stream_id: AtomicU64,
    /// The number of inboxes with an active stream, as it changes.
    open_streams: watch::Sender<usize>,
}

impl Default for InboxHub {
    fn default() -> Self {
        InboxHub {
            entries: Mutex::new(HashMap::new()),
            next_stream_id: AtomicU64::new(0),
            open_streams: watch::channel(0).0,
        }
    }
}

/// The agency has as many streams open on this gateway as it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{open} Receive streams of this agency are open on this gateway, the most allowed")]
pub struct TooManyStreams {
    /// Streams open now.
    pub open: usize,
}

/// An admitted inbox stream: wakes on new messages, ends on takeover.
/// Dropping it releases the inbox.
pub struct InboxLease {
    hub: Arc<InboxHub>,
    recipient_id: String,
    stream_id: u64,
    /// Changes when a message for this inbox is stored by this gateway or
    /// announced by another replica.
    pub stored: watch::Receiver<u64>,
    /// Cancelled when a newer stream takes over.
    pub taken_over: CancellationToken,
}

impl InboxHub {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, InboxEntry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn count_active(&self, entries: &HashMap<String, InboxEntry>) {
        let active = entries
            .values()
            .filter(|entry| entry.active.is_some())
            .count();
        self.open_streams.send_if_modified(|open| {
            let changed = *open != active;
            *open = active;
            changed
        });
    }

    /// Admits a stream of `recipient_id` if fewer than `max_streams` of its
    /// streams are open here. It delivers nothing until
    /// [`InboxLease::activate`].
    pub fn admit(
        self: &Arc<Self>,
        recipient_id: &str,
        max_streams: usize,
    ) -> Result<InboxLease, TooManyStreams> {
        let stream_id = self.next_stream_id.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.entries();
        let entry = entries.entry(recipient_id.to_string()).or_default();
        if entry.n_streams >= max_streams {
            return Err(TooManyStreams {
                open: entry.n_streams,
            });
        }
        entry.n_streams += 1;
        let stored = entry
            .stored
            .get_or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Ok(InboxLease {
            hub: Arc::clone(self),
            recipient_id: recipient_id.to_string(),
            stream_id,
            stored,
            taken_over: CancellationToken::new(),
        })
    }

    /// Tells the stream of `recipient_id`, if any, that `sequence` was stored.
    pub fn stored(&self, recipient_id: &str, sequence: u64) {
        if let Some(InboxEntry {
            stored: Some(sender),
            ..
        }) = self.entries().get(recipient_id)
        {
            sender.send_replace(sequence);
        }
    }

    /// A stream of `recipient_id` with `epoch` opened elsewhere: the stream
    /// here ends if it is older.
    pub fn claimed(&self, recipient_id: &str, epoch: u64) {
        let mut entries = self.entries();
        let Some(entry) = entries.get_mut(recipient_id) else {
            return;
        };
        if entry
            .active
            .as_ref()
            .is_some_and(|active| active.epoch < epoch)
            && let Some(older) = entry.active.take()
        {
            older.taken_over.cancel();
            self.count_active(&entries);
        }
    }

    /// Wakes every stream, to look for messages it may not have been told of.
    pub fn wake_all(&self) {
        for entry in self.entries().values() {
            if let Some(sender) = &entry.stored {
                sender.send_modify(|_| {});
            }
        }
    }

    /// Number of inboxes being streamed.
    pub fn open_streams(&self) -> usize {
        *self.open_streams.borrow()
    }

    /// The number of inboxes being streamed, as it changes.
    pub fn watch_open_streams(&self) -> watch::Receiver<usize> {
        self.open_streams.subscribe()
    }
}

impl InboxLease {
    /// Makes this stream, of `epoch`, the one that delivers the inbox: an
    /// older stream here ends. If a newer one is active already, this one is
    /// taken over at once.
    pub fn activate(&self, epoch: u64) {
        let mut entries = self.hub.entries();
        let Some(entry) = entries.get_mut(&self.recipient_id) else {
            return;
        };
        if entry
            .active
            .as_ref()
            .is_some_and(|active| active.epoch > epoch)
        {
            self.taken_over.cancel();
            return;
        }
        let newer = Active {
            stream_id: self.stream_id,
            epoch,
            taken_over: self.taken_over.clone(),
        };
        if let Some(older) = entry.active.replace(newer) {
            older.taken_over.cancel();
        }
        self.hub.count_active(&entries);
    }
}

impl Drop for InboxLease {
    fn drop(&mut self) {
        let mut entries = self.hub.entries();
        if let Some(entry) = entries.get_mut(&self.recipient_id) {
            entry.n_streams = entry.n_streams.saturating_sub(1);
            if entry
                .active
                .as_ref()
                .is_some_and(|active| active.stream_id == self.stream_id)
            {
                entry.active = None;
            }
            if entry.n_streams == 0 {
                entries.remove(&self.recipient_id);
            }
        }
        self.hub.count_active(&entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_stream_takes_over() {
        let hub = Arc::new(InboxHub::default());
        let older = hub.admit("alpha", 4).expect("admitted");
        older.activate(1);
        let newer = hub.admit("alpha", 4).expect("admitted");
        newer.activate(2);
        assert!(older.taken_over.is_cancelled());
        assert!(!newer.taken_over.is_cancelled());
        drop(older);
        assert_eq!(
            hub.open_streams(),
            1,
            "the older stream's end leaves the newer open"
        );
        drop(newer);
        assert_eq!(hub.open_streams(), 0);
    }

    #[test]
    fn the_higher_epoch_wins_whatever_the_order_of_activation() {
        let hub = Arc::new(InboxHub::default());
        let newer = hub.admit("alpha", 4).expect("admitted");
        newer.activate(7);
        let late = hub.admit("alpha", 4).expect("admitted");
        late.activate(6);
        assert!(late.taken_over.is_cancelled(), "an older epoch never wins");
        assert!(!newer.taken_over.is_cancelled());
    }

    #[test]
    fn another_replica_claiming_the_inbox_ends_an_older_stream_only() {
        let hub = Arc::new(InboxHub::default());
        let lease = hub.admit("alpha", 4).expect("admitted");
        lease.activate(5);
        hub.claimed("alpha", 4);
        assert!(!lease.taken_over.is_cancelled());
        hub.claimed("alpha", 6);
        assert!(lease.taken_over.is_cancelled());
        assert_eq!(hub.open_streams(), 0);
    }

    #[test]
    fn an_agency_has_at_most_the_cap_of_streams_open() {
        let hub = Arc::new(InboxHub::default());
        let first = hub.admit("alpha", 2).expect("admitted");
        let _second = hub.admit("alpha", 2).expect("admitted");
        assert_eq!(
            hub.admit("alpha", 2).err(),
            Some(TooManyStreams { open: 2 })
        );
        assert!(hub.admit("beta", 2).is_ok(), "the cap is per agency");
        drop(first);
        assert!(hub.admit("alpha", 2).is_ok());
    }

    #[test]
    fn stores_wake_the_stream() {
        let hub = Arc::new(InboxHub::default());
        let mut lease = hub.admit("alpha", 4).expect("admitted");
        lease.activate(1);
        assert!(!lease.stored.has_changed().expect("open"));
        hub.stored("alpha", 3);
        hub.stored("beta", 1);
        assert!(lease.stored.has_changed().expect("open"));
        assert_eq!(*lease.stored.borrow_and_update(), 3);
    }
}
