//! DOMAIN: the state of one Receive stream, apart from any IO.
//!
//! A stream delivers an inbox in sequence order from the oldest
//! unacknowledged message, with at most `window` deliveries unacknowledged
//! at once. It reads the inbox a page at a time, each page bounded by rows
//! and by bytes, so what a stream holds in memory is bounded whatever the
//! window. It says it is idle once when nothing more can be delivered, and
//! again only after something changed. Acks are accepted only for what this
//! stream delivered, at most [`MAX_ACK_SEQUENCES`] named per ack.

use std::collections::BTreeSet;

use fedmesh_common::error::InvalidField;

/// Most deliveries a client may leave unacknowledged on one stream.
pub const MAX_WINDOW: u32 = 10_000;

/// Most sequences one ack may name (`up_to` comes on top): one ack is one
/// write to the shard, and must stay short.
pub const MAX_ACK_SEQUENCES: usize = 1_000;

/// Most rows one read of the inbox returns.
pub const PAGE_ROWS: u32 = 256;

/// An acknowledgement from the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ack {
    /// Sequences processed.
    pub sequences: Vec<u64>,
    /// Every delivery up to and including this sequence is processed too
    /// (0: none).
    pub up_to: u64,
}

/// The next read of the inbox a stream wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Messages with a sequence above this one.
    pub after_sequence: u64,
    /// At most this many.
    pub limit: u32,
    /// At most about this many payload bytes: a page stops at the first
    /// message that would go past it, but always holds one message.
    pub max_bytes: u64,
}

/// Checks the window a client asked for; 0 means `default_window`.
pub fn window(requested: u32, default_window: u32) -> Result<u32, InvalidField> {
    match requested {
        0 => Ok(default_window),
        window if window <= MAX_WINDOW => Ok(window),
        _ => Err(InvalidField::new(
            "open.window",
            format!("window must be 1 to {MAX_WINDOW} (0 means the gateway default)"),
        )),
    }
}

/// What one stream delivered and what it is owed.
#[derive(Debug)]
pub struct StreamState {
    window: u32,
    page_bytes: u64,
    in_flight: BTreeSet<u64>,
    last_sent: u64,
    idle_told: bool,
}

impl StreamState {
    /// A new stream with `window` deliveries unacknowledged at most, reading
    /// pages of at most `page_bytes` payload bytes.
    pub fn new(window: u32, page_bytes: u64) -> Self {
        StreamState {
            window,
            page_bytes,
            in_flight: BTreeSet::new(),
            last_sent: 0,
            idle_told: false,
        }
    }

    /// Deliveries sent and not yet acknowledged.
    pub fn unacknowledged(&self) -> u32 {
        u32::try_from(self.in_flight.len()).unwrap_or(u32::MAX)
    }

    /// The next page to read, or None while the window is full.
    pub fn next_page(&self) -> Option<Page> {
        let room = self.window.saturating_sub(self.unacknowledged());
        (room > 0).then(|| Page {
            after_sequence: self.last_sent,
            limit: room.min(PAGE_ROWS),
            max_bytes: self.page_bytes,
        })
    }

    /// Records that `sequence` was sent.
    pub fn delivered(&mut self, sequence: u64) {
        self.last_sent = self.last_sent.max(sequence);
        self.in_flight.insert(sequence);
        self.idle_told = false;
    }

    /// Whether to tell the client the stream is idle now (nothing was
    /// delivered since it was last told), and with how many unacknowledged.
    pub fn idle(&mut self) -> Option<u32> {
        if self.idle_told {
            return None;
        }
        self.idle_told = true;
        Some(self.unacknowledged())
    }

    /// Applies an ack: returns the sequences to mark acknowledged in the
    /// shard, those of this stream's deliveries it names, in order.
    pub fn ack(&mut self, ack: &Ack) -> Result<Vec<u64>, InvalidField> {
        if ack.sequences.len() > MAX_ACK_SEQUENCES {
            return Err(InvalidField::new(
                "ack.sequences",
                format!(
                    "{} sequences in one ack, at most {MAX_ACK_SEQUENCES}; use up_to or send several acks",
                    ack.sequences.len()
                ),
            ));
        }
        let mut acked: BTreeSet<u64> = ack
            .sequences
            .iter()
            .copied()
            .filter(|sequence| self.in_flight.contains(sequence))
            .collect();
        acked.extend(self.in_flight.range(..=ack.up_to));
        for sequence in &acked {
            self.in_flight.remove(sequence);
        }
        if !acked.is_empty() {
            self.idle_told = false;
        }
        Ok(acked.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_bounds_what_is_read() {
        let mut state = StreamState::new(3, 1 << 20);
        assert_eq!(
            state.next_page(),
            Some(Page {
                after_sequence: 0,
                limit: 3,
                max_bytes: 1 << 20
            })
        );
        for sequence in 1..=3 {
            state.delivered(sequence);
        }
        assert_eq!(state.next_page(), None, "the window is full");
        let acked = state
            .ack(&Ack {
                sequences: vec![2],
                up_to: 0,
            })
            .expect("valid");
        assert_eq!(acked, vec![2]);
        assert_eq!(state.next_page().map(|page| page.after_sequence), Some(3));
        assert_eq!(state.next_page().map(|page| page.limit), Some(1));
    }

    #[test]
    fn pages_are_bounded_by_rows_whatever_the_window() {
        let state = StreamState::new(MAX_WINDOW, 4096);
        let page = state.next_page().expect("room");
        assert_eq!(page.limit, PAGE_ROWS);
        assert_eq!(page.max_bytes, 4096);
    }

    #[test]
    fn only_delivered_sequences_are_acknowledged() {
        let mut state = StreamState::new(10, 1024);
        for sequence in [4, 5, 6] {
            state.delivered(sequence);
        }
        let acked = state
            .ack(&Ack {
                sequences: vec![1, 6, 99],
                up_to: 4,
            })
            .expect("valid");
        assert_eq!(acked, vec![4, 6], "1 and 99 were not delivered here");
        assert_eq!(state.unacknowledged(), 1);
        let again = state
            .ack(&Ack {
                sequences: vec![6],
                up_to: 0,
            })
            .expect("valid");
        assert!(again.is_empty(), "an ack counts once");
    }

    #[test]
    fn an_ack_names_a_bounded_number_of_sequences() {
        let mut state = StreamState::new(10, 1024);
        let too_many = Ack {
            sequences: (1..=MAX_ACK_SEQUENCES as u64 + 1).collect(),
            up_to: 0,
        };
        let error = state.ack(&too_many).expect_err("too many");
        assert_eq!(error.field, "ack.sequences");
        assert!(error.description.contains("1000"), "{}", error.description);
    }

    #[test]
    fn idle_is_told_once_until_something_changes() {
        let mut state = StreamState::new(2, 1024);
        assert_eq!(state.idle(), Some(0));
        assert_eq!(state.idle(), None);
        state.delivered(1);
        assert_eq!(state.idle(), Some(1));
        assert_eq!(state.idle(), None);
        state
            .ack(&Ack {
                sequences: vec![],
                up_to: 1,
            })
            .expect("valid");
        assert_eq!(state.idle(), Some(0));
    }

    #[test]
    fn windows_are_checked() {
        assert_eq!(window(0, 128), Ok(128));
        assert_eq!(window(5, 128), Ok(5));
        assert_eq!(
            window(MAX_WINDOW + 1, 128).map_err(|error| error.field),
            Err("open.window")
        );
    }
}
