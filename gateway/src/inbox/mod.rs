//! DOMAIN: who is streaming which inbox, and waking them.
//!
//! [`InboxHub`] keeps, per recipient streamed by this gateway, a watch channel
//! of the last sequence stored, so a stream sleeps until there is something
//! new, and the token of the active stream, so that a newer stream for the
//! same inbox takes over from the older one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct InboxEntry {
    stored: Option<watch::Sender<u64>>,
    active: Option<(u64, CancellationToken)>,
}

/// The inboxes streamed by this gateway.
#[derive(Default)]
pub struct InboxHub {
    entries: Mutex<HashMap<String, InboxEntry>>,
    next_stream_id: AtomicU64,
}

/// An open inbox stream: wakes on new messages, ends on takeover. Dropping it
/// releases the inbox.
pub struct InboxLease<'a> {
    hub: &'a InboxHub,
    recipient_id: String,
    stream_id: u64,
    /// Changes when a message for this inbox is stored by this gateway.
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

    /// Opens the inbox of `recipient_id`, taking over from any older stream.
    pub fn open(&self, recipient_id: &str) -> InboxLease<'_> {
        let stream_id = self.next_stream_id.fetch_add(1, Ordering::Relaxed);
        let taken_over = CancellationToken::new();
        let mut entries = self.entries();
        let entry = entries.entry(recipient_id.to_string()).or_default();
        if let Some((_, older)) = entry.active.replace((stream_id, taken_over.clone())) {
            older.cancel();
        }
        let stored = entry
            .stored
            .get_or_insert_with(|| watch::channel(0).0)
            .subscribe();
        InboxLease {
            hub: self,
            recipient_id: recipient_id.to_string(),
            stream_id,
            stored,
            taken_over,
        }
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
        self.entries()
            .values()
            .filter(|entry| entry.active.is_some())
            .count()
    }
}

impl Drop for InboxLease<'_> {
    fn drop(&mut self) {
        let mut entries = self.hub.entries();
        if let Some(entry) = entries.get_mut(&self.recipient_id) {
            if entry
                .active
                .as_ref()
                .is_some_and(|(id, _)| *id == self.stream_id)
            {
                entry.active = None;
            }
            if entry.active.is_none() {
                entries.remove(&self.recipient_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_stream_takes_over() {
        let hub = InboxHub::default();
        let older = hub.open("alpha");
        let newer = hub.open("alpha");
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
    fn stores_wake_the_stream() {
        let hub = InboxHub::default();
        let mut lease = hub.open("alpha");
        assert!(!lease.stored.has_changed().expect("open"));
        hub.stored("alpha", 3);
        hub.stored("beta", 1);
        assert!(lease.stored.has_changed().expect("open"));
        assert_eq!(*lease.stored.borrow_and_update(), 3);
    }
}
