//! DOMAIN: a move of an agency between shards or regions, as the directory
//! keeps it, and its phases.
//!
//! A move starts `Copying` (the agency is `moving`: gateways hold writes to
//! and from it), is cut over by the leader once a gateway copied the inbox
//! (the agency gets its new home: `Releasing`, the source is cleared), and
//! ends `Done`. Before the cut-over it may be cancelled (`Cancelling`: the
//! copy is undone, then `Cancelled`, the agency where it was).

/// Where a move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MovePhase {
    /// The source is frozen and copied to the target.
    Copying,
    /// Cut over; the source is being cleared.
    Releasing,
    /// Finished.
    Done,
    /// Cancelled before the cut-over; the copy is being undone.
    Cancelling,
    /// Cancelled and undone.
    Cancelled,
}

impl MovePhase {
    /// Its name in the control database.
    pub fn as_str(self) -> &'static str {
        match self {
            MovePhase::Copying => "copying",
            MovePhase::Releasing => "releasing",
            MovePhase::Done => "done",
            MovePhase::Cancelling => "cancelling",
            MovePhase::Cancelled => "cancelled",
        }
    }

    /// The phase named `name` in the control database.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "copying" => MovePhase::Copying,
            "releasing" => MovePhase::Releasing,
            "done" => MovePhase::Done,
            "cancelling" => MovePhase::Cancelling,
            "cancelled" => MovePhase::Cancelled,
            _ => return None,
        })
    }

    /// Whether the leader still has work to do on it.
    pub fn under_way(self) -> bool {
        matches!(
            self,
            MovePhase::Copying | MovePhase::Releasing | MovePhase::Cancelling
        )
    }
}

/// A move as the control database keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveRecord {
    /// Its id (a UUID).
    pub move_id: String,
    /// The agency moving.
    pub agency_id: String,
    /// Where it lived.
    pub from_region: String,
    /// Its shard there.
    pub from_shard: String,
    /// Where it goes.
    pub to_region: String,
    /// Its shard there.
    pub to_shard: String,
    /// Where the move is.
    pub phase: MovePhase,
    /// Messages copied by the last transfer.
    pub messages_copied: u64,
    /// Idempotency keys copied by the last transfer.
    pub keys_copied: u64,
    /// The last failure of a step (retried meanwhile); empty when none.
    pub last_error: String,
    /// When it was asked for, microseconds since the epoch.
    pub started_at_micros: i64,
    /// When it last changed.
    pub updated_at_micros: i64,
}
