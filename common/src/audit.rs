//! The tamper-evident audit log: denied calls and privileged actions, each
//! row chained to the one before it in its chain (a region, or `global`)
//! by a SHA-256 hash over its fields and the previous row's hash. Editing,
//! removing or inserting a row breaks the chain at the next row that
//! follows, which [`verify`] finds. The rows alone cannot show that the
//! newest rows of a chain were cut off, nor a chain rewritten whole and
//! rehashed by someone with write access to the database: for that,
//! `fedmesh audit verify` prints each chain's head (last row and hash), to
//! be kept elsewhere and compared. Rows never hold payloads or secrets.

use sha2::{Digest, Sha256};

/// `text` cut to at most `max` bytes at a character boundary.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Most bytes of a recorded field (`detail`; the others are shorter).
pub const MAX_FIELD_BYTES: usize = 2048;

/// The chain of what concerns no region.
pub const GLOBAL_CHAIN: &str = "global";

/// The `prev_hash` of a chain's first row.
pub const GENESIS: &str = "";

/// Something to record, before it is chained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// The chain: a region, or [`GLOBAL_CHAIN`].
    pub chain: String,
    /// Who acted or called (an identity; `unknown` when none was proved).
    pub actor: String,
    /// What: `register`, `deregister`, `grant`, `revoke`, `denied`,
    /// `certificate-rotated`...
    pub action: String,
    /// What it was done to: an agency, a grant, a method.
    pub target: String,
    /// `ok`, or the status code name of a refusal.
    pub outcome: String,
    /// More, without payloads or secrets.
    pub detail: String,
}

/// A row of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// What was recorded.
    pub record: AuditRecord,
    /// Its place in its chain, from 1.
    pub seq: i64,
    /// When, microseconds since the Unix epoch.
    pub at_micros: i64,
    /// The hash of the row before it in the chain ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// This row's hash.
    pub hash: String,
}

impl AuditEntry {
    /// Chains `record` after a row with `prev_hash` at `seq`.
    pub fn chain(record: AuditRecord, seq: i64, at_micros: i64, prev_hash: String) -> Self {
        let mut entry = AuditEntry {
            record,
            seq,
            at_micros,
            prev_hash,
            hash: String::new(),
        };
        entry.hash = entry.computed_hash();
        entry
    }

    /// The hash this row's fields and previous hash give: SHA-256 over each
    /// field length-prefixed, in lower-case hex.
    pub fn computed_hash(&self) -> String {
        let mut hasher = Sha256::new();
        let seq = self.seq.to_string();
        let at = self.at_micros.to_string();
        for field in [
            self.prev_hash.as_str(),
            &self.record.chain,
            &seq,
            &at,
            &self.record.actor,
            &self.record.action,
            &self.record.target,
            &self.record.outcome,
            &self.record.detail,
        ] {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field.as_bytes());
        }
        hasher
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }
}

/// Where a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit chain {chain} is broken at row {seq}: {problem}")]
pub struct ChainBreak {
    /// The chain.
    pub chain: String,
    /// The first bad row.
    pub seq: i64,
    /// What is wrong with it.
    pub problem: String,
}

/// Checks rows ordered by chain, then seq: each chain starts at 1, has no
/// gap, each row's previous hash is the hash of the row before it, and each
/// row's hash is what its fields give. The number of rows, or the first bad
/// one.
pub fn verify<'a>(entries: impl IntoIterator<Item = &'a AuditEntry>) -> Result<usize, ChainBreak> {
    let mut last: Option<&AuditEntry> = None;
    let mut count = 0;
    for entry in entries {
        let broken = |problem: String| ChainBreak {
            chain: entry.record.chain.clone(),
            seq: entry.seq,
            problem,
        };
        let (expected_seq, expected_prev) = match last {
            Some(previous) if previous.record.chain == entry.record.chain => {
                (previous.seq + 1, previous.hash.as_str())
            }
            _ => (1, GENESIS),
        };
        if entry.seq != expected_seq {
            return Err(broken(format!(
                "row {expected_seq} is missing (rows were removed or reordered)"
            )));
        }
        if entry.prev_hash != expected_prev {
            return Err(broken(
                "its previous hash is not the hash of the row before it (a row was removed, inserted or edited)".into(),
            ));
        }
        if entry.hash != entry.computed_hash() {
            return Err(broken(
                "its hash does not match its content (the row was edited)".into(),
            ));
        }
        last = Some(entry);
        count += 1;
    }
    Ok(count)
}

/// The directory client a gateway or notifier records through.
pub type AuditClient = crate::coordinators::CoordinatorClient;

/// Most records waiting to be sent; more are dropped (and said so in the
/// log) rather than slow down the calls they record.
const REMOTE_QUEUE: usize = 4096;

/// Sends audit records to the coordinator (`RecordAudit`), in batches,
/// from a task of its own: a caller never waits for it.
#[derive(Debug)]
pub struct RemoteAudit {
    sender: tokio::sync::mpsc::Sender<AuditRecord>,
}

impl RemoteAudit {
    /// A sink sending through `directory` until `shutdown` (what is queued
    /// then is sent once more).
    pub fn spawn(
        directory: AuditClient,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::sync::Arc<RemoteAudit> {
        let (sender, mut receiver) = tokio::sync::mpsc::channel(REMOTE_QUEUE);
        tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    first = receiver.recv() => first,
                    () = shutdown.cancelled() => None,
                };
                let mut batch: Vec<AuditRecord> = first.into_iter().collect();
                while batch.len() < 200
                    && let Ok(record) = receiver.try_recv()
                {
                    batch.push(record);
                }
                if batch.is_empty() {
                    return;
                }
                send_batch(&directory, batch).await;
            }
        });
        std::sync::Arc::new(RemoteAudit { sender })
    }
}

async fn send_batch(directory: &AuditClient, batch: Vec<AuditRecord>) {
    let records: Vec<_> = batch
        .into_iter()
        .map(|record| fedmesh_proto::pb::AuditRecord {
            chain: record.chain,
            actor: record.actor,
            action: record.action,
            target: record.target,
            outcome: record.outcome,
            detail: record.detail,
        })
        .collect();
    let mut delay = std::time::Duration::from_millis(200);
    for attempt in 1..=5 {
        let request = fedmesh_proto::pb::RecordAuditRequest {
            records: records.clone(),
        };
        match directory.clone().record_audit(request).await {
            Ok(_) => return,
            Err(status) if attempt < 5 => {
                tracing::debug!(error = %status.message(), "recording audit rows failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(status) => {
                tracing::error!(error = %status.message(), rows = records.len(), "the coordinator did not take audit rows; they are lost");
            }
        }
    }
}

impl crate::auth::AuditSink for RemoteAudit {
    fn record(&self, record: AuditRecord) {
        if self.sender.try_send(record).is_err() {
            tracing::warn!("the audit queue is full or closed: a record was dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(chain: &str, action: &str) -> AuditRecord {
        AuditRecord {
            chain: chain.into(),
            actor: "operator/alice".into(),
            action: action.into(),
            target: "agency/tax-office".into(),
            outcome: "ok".into(),
            detail: String::new(),
        }
    }

    fn chain_of(chain: &str, n: i64) -> Vec<AuditEntry> {
        let mut entries: Vec<AuditEntry> = Vec::new();
        for seq in 1..=n {
            let prev = entries
                .last()
                .map_or(String::new(), |entry| entry.hash.clone());
            entries.push(AuditEntry::chain(
                record(chain, "register"),
                seq,
                seq * 10,
                prev,
            ));
        }
        entries
    }

    #[test]
    fn an_edited_removed_or_reordered_row_breaks_the_chain_there() {
        let mut entries = chain_of("east", 4);
        entries.extend(chain_of("west", 2));
        assert_eq!(verify(&entries), Ok(6));

        let mut edited = entries.clone();
        edited[2].record.target = "agency/someone-else".into();
        let broken = verify(&edited).expect_err("an edited row");
        assert_eq!((broken.chain.as_str(), broken.seq), ("east", 3));

        let mut rehashed = edited.clone();
        rehashed[2].hash = rehashed[2].computed_hash();
        let broken = verify(&rehashed).expect_err("a rehashed row");
        assert_eq!(broken.seq, 4, "a row edited and rehashed breaks the next");

        let mut removed = entries.clone();
        removed.remove(1);
        assert_eq!(verify(&removed).expect_err("a removed row").seq, 3);
    }
}
