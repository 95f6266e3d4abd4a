//! How a batch of messages divides into what is stored already, what is
//! refused and what is new: the same rules on every backend, apart from the
//! queries that find what is stored. A message is refused when its key
//! names another message, or when its recipient's inbox is frozen (it is
//! moving to another shard).
//!
//! A backend (1) looks up what [`Lookups`] asks for, (2) hands what it found
//! as [`Known`] to [`plan`], (3) stores the plan's new messages, numbering
//! them, with their key claims and their events, and (4) turns the plan and
//! the new messages' sequences into one [`Outcome`] per message.

use std::collections::{HashMap, HashSet};

use crate::message::{
    ExistingClaim, Fingerprint, KeyInUse, Message, Outcome, Refused, Stored, ToStore,
};

/// What to look up before a batch is planned.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Lookups<'a> {
    /// Message ids that may be stored already.
    pub(crate) ids: Vec<&'a str>,
    /// (sender, key) pairs whose claims may exist.
    pub(crate) keys: Vec<(&'a str, &'a str)>,
    /// Recipients whose inboxes may be frozen, each once.
    pub(crate) recipients: Vec<&'a str>,
}

/// What a backend needs to look up for `batch`. A first attempt looks up
/// only the ids of messages that may exist: a key claimed before fails the
/// insert of its claim (a unique violation), and the batch is tried again
/// with `everything`, which also looks up every key claimed and every id
/// (a failed attempt may have committed after all), and which of the
/// recipients' inboxes are frozen (a first attempt that met one fails: see
/// the migration that adds the fence).
pub(crate) fn lookups(batch: &[ToStore], everything: bool) -> Lookups<'_> {
    let mut lookups = Lookups::default();
    let mut recipients = HashSet::new();
    for item in batch {
        if everything && recipients.insert(item.message.recipient_id.as_str()) {
            lookups.recipients.push(&item.message.recipient_id);
        }
        if everything || item.may_exist {
            lookups.ids.push(&item.message.message_id);
        }
        if everything
            && item.claim.is_some()
            && let Some(key) = &item.message.idempotency_key
        {
            lookups.keys.push((&item.message.sender_id, key));
        }
    }
    lookups
}

/// What the shard holds of what was looked up.
#[derive(Debug, Default)]
pub(crate) struct Known {
    /// Stored messages by id: their sequence and when they were stored.
    pub(crate) stored: HashMap<String, (u64, i64)>,
    /// Claimed keys by (sender, key).
    pub(crate) claims: HashMap<(String, String), ExistingClaim>,
    /// Recipients whose inboxes are frozen.
    pub(crate) frozen: HashSet<String>,
}

impl Known {
    /// The message ids that the claims found name, to look up in turn.
    pub(crate) fn claimed_ids(&self) -> Vec<&str> {
        self.claims
            .values()
            .map(|claim| claim.message_id.as_str())
            .filter(|message_id| !self.stored.contains_key(*message_id))
            .collect()
    }

    fn stored(&self, message_id: &str) -> Option<Stored> {
        self.stored
            .get(message_id)
            .map(|&(sequence, stored_at_micros)| Stored {
                message_id: message_id.to_string(),
                sequence,
                stored_at_micros,
                duplicate: true,
            })
    }
}

/// A message the batch stores.
#[derive(Debug)]
pub(crate) struct NewMessage<'a> {
    /// The message.
    pub(crate) message: &'a Message,
    /// Its id: its own, or the one its key named already.
    pub(crate) message_id: &'a str,
    /// The claim of its key to insert with it.
    pub(crate) claim: Option<Fingerprint>,
}

/// What became of one message of the batch.
#[derive(Debug)]
enum Slot {
    Known(Stored),
    Refused(Refused),
    New(usize),
    SameAs(usize),
}

/// A batch divided up.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    slots: Vec<Slot>,
    /// The messages to store, in batch order.
    pub(crate) new: Vec<NewMessage<'a>>,
}

/// Divides `batch` by what is `known`. A repeat inside the batch (same id,
/// or same key with the same content) is a duplicate of its first
/// occurrence; the same key with other content is refused. A message for a
/// frozen inbox is refused unless it is stored already: its receipt is
/// true whatever became of the inbox since.
pub(crate) fn plan<'a>(batch: &'a [ToStore], known: &'a Known) -> Plan<'a> {
    let mut slots = Vec::with_capacity(batch.len());
    let mut new: Vec<NewMessage<'a>> = Vec::new();
    let mut first_by_id: HashMap<&str, usize> = HashMap::new();
    let mut first_by_key: HashMap<(&str, &str), usize> = HashMap::new();
    for item in batch {
        let message = &item.message;
        let key = message
            .idempotency_key
            .as_deref()
            .filter(|_| item.claim.is_some())
            .map(|key| (message.sender_id.as_str(), key));
        let mut message_id = message.message_id.as_str();
        // A claim needs a key to claim.
        let mut claim = key.and(item.claim);
        if let (Some((sender, key)), Some(fingerprint)) = (key, &item.claim) {
            let claimed = known.claims.get(&(sender.to_string(), key.to_string()));
            if let Some(claimed) = claimed {
                if !claimed.matches(fingerprint) {
                    slots.push(Slot::Refused(Refused::KeyInUse(KeyInUse {
                        message_id: claimed.message_id.clone(),
                    })));
                    continue;
                }
                // A retry: it is the message the key names.
                message_id = &claimed.message_id;
                claim = None;
            } else if let Some(&index) = first_by_key.get(&(sender, key)) {
                let first = &new[index];
                if first.claim.as_ref() == Some(fingerprint) {
                    slots.push(Slot::SameAs(index));
                } else {
                    slots.push(Slot::Refused(Refused::KeyInUse(KeyInUse {
                        message_id: first.message_id.to_string(),
                    })));
                }
                continue;
            }
        }
        if let Some(stored) = known.stored(message_id) {
            slots.push(Slot::Known(stored));
            continue;
        }
        // Its key is not claimed either: a retry sent to the inbox's new
        // shard claims it there.
        if known.frozen.contains(&message.recipient_id) {
            slots.push(Slot::Refused(Refused::Moved));
            continue;
        }
        if let Some(&index) = first_by_id.get(message_id) {
            slots.push(Slot::SameAs(index));
            continue;
        }
        let index = new.len();
        first_by_id.insert(message_id, index);
        if let (Some(key), Some(_)) = (key, claim) {
            first_by_key.insert(key, index);
        }
        new.push(NewMessage {
            message,
            message_id,
            claim,
        });
        slots.push(Slot::New(index));
    }
    Plan { slots, new }
}

impl Plan<'_> {
    /// One outcome per message of the batch, given the sequences the new
    /// messages got (in the order of `new`) and when they were stored.
    ///
    /// `stored_at_micros` is unique to the batch (see the stores' clocks):
    /// a message found stored at that very time was stored by an earlier
    /// attempt of this batch whose answer was lost, so it is new, not a
    /// duplicate (once: a repeat of it in the batch is a duplicate).
    pub(crate) fn outcomes(self, sequences: &[u64], stored_at_micros: i64) -> Vec<Outcome> {
        let fresh = |index: usize, duplicate: bool| Stored {
            message_id: self.new[index].message_id.to_string(),
            sequence: sequences.get(index).copied().unwrap_or_default(),
            stored_at_micros,
            duplicate,
        };
        let mut found_before: Vec<&str> = Vec::new();
        self.slots
            .iter()
            .map(|slot| match slot {
                Slot::Known(stored) => {
                    let ours = stored.stored_at_micros == stored_at_micros
                        && !found_before.contains(&stored.message_id.as_str());
                    found_before.push(&stored.message_id);
                    Ok(Stored {
                        duplicate: !ours,
                        ..stored.clone()
                    })
                }
                Slot::Refused(refused) => Err(refused.clone()),
                Slot::New(index) => Ok(fresh(*index, false)),
                Slot::SameAs(index) => Ok(fresh(*index, true)),
            })
            .collect()
    }
}

/// For each new message, its position within its inbox's share of the
/// batch (1, 2, ...) and that share's size: a backend adds the inbox's last
/// sequence to number them.
pub(crate) fn positions(new: &[NewMessage<'_>]) -> (Vec<i64>, Vec<i64>) {
    let mut count_of: HashMap<&str, i64> = HashMap::new();
    let positions: Vec<i64> = new
        .iter()
        .map(|entry| {
            let count = count_of
                .entry(entry.message.recipient_id.as_str())
                .or_default();
            *count += 1;
            *count
        })
        .collect();
    let counts = new
        .iter()
        .map(|entry| count_of[entry.message.recipient_id.as_str()])
        .collect();
    (positions, counts)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn item(message_id: &str, key: Option<&str>, payload: &str, may_exist: bool) -> ToStore {
        let message = Message {
            message_id: message_id.into(),
            sender_id: "sender".into(),
            recipient_id: "reader".into(),
            kind: "note".into(),
            payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
            headers: BTreeMap::new(),
            idempotency_key: key.map(str::to_string),
            origin_region: "east".into(),
            accepted_at_micros: 1,
            traceparent: String::new(),
        };
        let claim = key.map(|_| message.fingerprint());
        ToStore {
            message,
            claim,
            may_exist,
        }
    }

    #[test]
    fn a_first_attempt_looks_up_only_ids_that_may_exist() {
        let batch = [
            item("m1", Some("k1"), "a", false),
            item("m2", None, "b", true),
        ];
        let first = lookups(&batch, false);
        assert_eq!(first.ids, vec!["m2"]);
        assert!(first.keys.is_empty());
        assert!(first.recipients.is_empty());
        let again = lookups(&batch, true);
        assert_eq!(again.ids, vec!["m1", "m2"]);
        assert_eq!(again.keys, vec![("sender", "k1")]);
        assert_eq!(again.recipients, vec!["reader"], "each recipient once");
    }

    #[test]
    fn a_claimed_key_makes_a_retry_or_a_refusal() {
        let batch = [
            item("m2", Some("k1"), "same", false),
            item("m3", Some("k2"), "other", false),
            item("m4", Some("k3"), "new", false),
        ];
        let mut known = Known::default();
        known.claims.insert(
            ("sender".into(), "k1".into()),
            ExistingClaim {
                message_id: "m1".into(),
                fingerprint: Some(batch[0].message.fingerprint()),
            },
        );
        known.claims.insert(
            ("sender".into(), "k2".into()),
            ExistingClaim {
                message_id: "m0".into(),
                fingerprint: Some(
                    item("x", None, "first content", false)
                        .message
                        .fingerprint(),
                ),
            },
        );
        known.stored.insert("m1".into(), (4, 99));
        let plan = plan(&batch, &known);
        assert_eq!(plan.new.len(), 1);
        assert_eq!(plan.new[0].message_id, "m4");
        let outcomes = plan.outcomes(&[5], 100);
        let retry = outcomes[0].as_ref().expect("the first receipt");
        assert_eq!(
            (retry.message_id.as_str(), retry.sequence, retry.duplicate),
            ("m1", 4, true)
        );
        assert_eq!(
            outcomes[1],
            Err(Refused::KeyInUse(KeyInUse {
                message_id: "m0".into()
            }))
        );
        assert!(!outcomes[2].as_ref().expect("stored").duplicate);
    }

    #[test]
    fn a_claim_whose_message_is_not_here_stores_it_under_the_claimed_id() {
        let batch = [item("m2", Some("k1"), "same", false)];
        let mut known = Known::default();
        known.claims.insert(
            ("sender".into(), "k1".into()),
            ExistingClaim {
                message_id: "m1".into(),
                fingerprint: None,
            },
        );
        assert_eq!(known.claimed_ids(), vec!["m1"]);
        let plan = plan(&batch, &known);
        assert_eq!(plan.new[0].message_id, "m1");
        assert_eq!(plan.new[0].claim, None, "the key is claimed already");
    }

    #[test]
    fn repeats_inside_a_batch_are_stored_once() {
        let batch = [
            item("m1", Some("k1"), "a", false),
            item("m2", Some("k1"), "a", false),
            item("m3", Some("k1"), "b", false),
            item("m9", None, "x", true),
            item("m9", None, "x", true),
        ];
        let known = Known::default();
        let plan = plan(&batch, &known);
        assert_eq!(plan.new.len(), 2);
        let outcomes = plan.outcomes(&[1, 2], 7);
        assert_eq!(outcomes[1].as_ref().expect("same").message_id, "m1");
        assert!(outcomes[1].as_ref().expect("same").duplicate);
        assert_eq!(
            outcomes[2],
            Err(Refused::KeyInUse(KeyInUse {
                message_id: "m1".into()
            }))
        );
        assert!(outcomes[4].as_ref().expect("same id").duplicate);
        assert_eq!(outcomes[4].as_ref().expect("same id").sequence, 2);
    }

    #[test]
    fn what_a_lost_attempt_of_the_batch_stored_is_new_once() {
        let batch = [
            item("m1", None, "a", true),
            item("m1", None, "a", true),
            item("m2", None, "b", true),
        ];
        let mut known = Known::default();
        known.stored.insert("m1".into(), (3, 500));
        known.stored.insert("m2".into(), (2, 400));
        let outcomes = plan(&batch, &known).outcomes(&[], 500);
        let duplicate = |index: usize| outcomes[index].as_ref().expect("stored").duplicate;
        assert!(!duplicate(0), "stored by this batch's lost attempt");
        assert!(duplicate(1), "a repeat inside the batch");
        assert!(duplicate(2), "stored by an earlier batch");
    }

    #[test]
    fn a_frozen_inbox_refuses_what_it_does_not_hold_already() {
        let mut batch = vec![
            item("m1", None, "a", true),
            item("m2", Some("k2"), "b", false),
            item("m3", None, "c", false),
            item("m4", None, "d", false),
        ];
        batch[3].message.recipient_id = "other".into();
        let mut known = Known::default();
        known.stored.insert("m1".into(), (1, 10));
        known.frozen.insert("reader".into());
        let plan = plan(&batch, &known);
        assert_eq!(plan.new.len(), 1);
        assert_eq!(plan.new[0].message_id, "m4");
        let outcomes = plan.outcomes(&[1], 20);
        assert!(outcomes[0].as_ref().expect("held already").duplicate);
        assert_eq!(outcomes[1], Err(Refused::Moved));
        assert_eq!(outcomes[2], Err(Refused::Moved));
        assert!(!outcomes[3].as_ref().expect("another inbox").duplicate);
    }

    #[test]
    fn positions_number_each_inbox_share() {
        let mut batch = vec![item("a", None, "", false), item("b", None, "", false)];
        batch.push(item("c", None, "", false));
        batch[1].message.recipient_id = "other".into();
        let known = Known::default();
        let plan = plan(&batch, &known);
        let (positions, counts) = positions(&plan.new);
        assert_eq!(positions, vec![1, 1, 2]);
        assert_eq!(counts, vec![2, 1, 2]);
    }
}
