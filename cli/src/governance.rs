//! `fedmesh access` (who may send whom what) and `fedmesh audit` (the
//! tamper-evident log of denied calls and privileged actions).

use std::io::Write;

use clap::{Args, Subcommand};
use fedmesh_common::audit::{AuditEntry, AuditRecord};
use fedmesh_proto::pb;
use serde_json::json;

use crate::client::{MeshArgs, rpc_error};

/// `fedmesh access`.
#[derive(Debug, Args)]
pub struct AccessArgs {
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(subcommand)]
    pub command: AccessCommand,
}

#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Allow a sender (or any agency) to send a recipient messages of some
    /// kinds (or any kind). Needed when the mesh's access policy is closed
    /// (the default with TLS); prints the grant.
    #[command(
        after_help = "Examples:\n  fedmesh access grant --from tax-office --to land-registry --kind tax.return.filed\n  fedmesh access grant --to open-data   # any agency, any kind"
    )]
    Grant {
        /// The sending agency [default: any agency].
        #[arg(long = "from", value_name = "AGENCY")]
        sender: Option<String>,
        /// The receiving agency.
        #[arg(long = "to", value_name = "AGENCY")]
        recipient: String,
        /// A kind allowed; repeatable [default: any kind].
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// Print the grant as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Withdraw a grant, by the id `access list` prints.
    #[command(
        after_help = "Examples:\n  fedmesh access revoke 01936c1e-8d0b-7f3a-9c1e-5a2b3c4d5e6f"
    )]
    Revoke {
        /// The grant's id.
        grant_id: String,
    },
    /// List grants, optionally of one sender or to one recipient.
    #[command(
        after_help = "Examples:\n  fedmesh access list\n  fedmesh access list --to land-registry --json"
    )]
    List {
        /// Only grants this sender holds (with those to any agency).
        #[arg(long = "from", value_name = "AGENCY")]
        sender: Option<String>,
        /// Only grants to this recipient.
        #[arg(long = "to", value_name = "AGENCY")]
        recipient: Option<String>,
        /// Print a JSON array of grants.
        #[arg(long)]
        json: bool,
    },
}

fn grant_json(grant: &pb::AccessGrant) -> serde_json::Value {
    json!({
        "grant_id": grant.grant_id,
        "sender_id": (!grant.sender_id.is_empty()).then_some(&grant.sender_id),
        "recipient_id": grant.recipient_id,
        "kinds": grant.kinds,
        "granted_by": grant.granted_by,
        "granted_at": grant.granted_at.map(|at| at.to_string()),
    })
}

fn grant_line(grant: &pb::AccessGrant) -> String {
    let sender = if grant.sender_id.is_empty() {
        "any agency"
    } else {
        &grant.sender_id
    };
    let kinds = if grant.kinds.is_empty() {
        "any kind".to_string()
    } else {
        grant.kinds.join(", ")
    };
    format!(
        "{}  {sender} -> {}: {kinds} (by {})",
        grant.grant_id, grant.recipient_id, grant.granted_by
    )
}

/// Runs an `access` command.
pub async fn access(args: AccessArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let endpoints = args.mesh.endpoints(None, None);
    let mut directory = endpoints.directory_as_operator()?;
    match args.command {
        AccessCommand::Grant {
            sender,
            recipient,
            kinds,
            json,
        } => {
            let grant = directory
                .grant_access(pb::GrantAccessRequest {
                    sender_id: sender.unwrap_or_default(),
                    recipient_id: recipient,
                    kinds,
                })
                .await
                .map_err(|status| rpc_error(status, "cannot grant access"))?
                .into_inner()
                .grant
                .unwrap_or_default();
            if json {
                writeln!(out, "{}", grant_json(&grant))?;
            } else {
                writeln!(out, "granted {}", grant_line(&grant))?;
            }
        }
        AccessCommand::Revoke { grant_id } => {
            directory
                .revoke_access(pb::RevokeAccessRequest {
                    grant_id: grant_id.clone(),
                })
                .await
                .map_err(|status| rpc_error(status, "cannot revoke access"))?;
            writeln!(out, "revoked {grant_id}")?;
        }
        AccessCommand::List {
            sender,
            recipient,
            json,
        } => {
            let grants = directory
                .list_access(pb::ListAccessRequest {
                    sender_id: sender.unwrap_or_default(),
                    recipient_id: recipient.unwrap_or_default(),
                })
                .await
                .map_err(|status| rpc_error(status, "cannot list access grants"))?
                .into_inner()
                .grants;
            if json {
                let grants: Vec<_> = grants.iter().map(grant_json).collect();
                writeln!(out, "{}", serde_json::Value::Array(grants))?;
            } else if grants.is_empty() {
                writeln!(out, "no access grants")?;
            } else {
                for grant in &grants {
                    writeln!(out, "{}", grant_line(grant))?;
                }
            }
        }
    }
    Ok(())
}

/// `fedmesh audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the audit log: denied calls and privileged actions, by chain
    /// (a region, or global) in order.
    #[command(
        after_help = "Examples:\n  fedmesh audit list\n  fedmesh audit list --region east --limit 20 --json"
    )]
    List {
        /// Only this chain: a region, or `global`.
        #[arg(long = "region", value_name = "CHAIN")]
        chain: Option<String>,
        /// The last N rows only.
        #[arg(long)]
        limit: Option<usize>,
        /// Print one JSON object per row.
        #[arg(long)]
        json: bool,
    },
    /// Check every chain of the audit log: each row's hash against its
    /// content and the row before it. Names the first bad row and exits
    /// non-zero if a row was edited, removed or inserted.
    #[command(
        after_help = "Examples:\n  fedmesh audit verify\n  fedmesh audit verify --region east"
    )]
    Verify {
        /// Only this chain: a region, or `global`.
        #[arg(long = "region", value_name = "CHAIN")]
        chain: Option<String>,
    },
}

/// Every row of the audit log (of `chain` only, if given), in order.
async fn read_audit(args: &MeshArgs, chain: Option<&str>) -> anyhow::Result<Vec<AuditEntry>> {
    let mut directory = args.endpoints(None, None).directory_as_operator()?;
    let mut entries = Vec::new();
    let mut after: Option<(String, i64)> = None;
    loop {
        let (after_chain, after_seq) = after.clone().unwrap_or_default();
        let page = directory
            .list_audit(pb::ListAuditRequest {
                chain: chain.unwrap_or_default().to_string(),
                after_chain,
                after_seq,
                limit: 1000,
            })
            .await
            .map_err(|status| rpc_error(status, "cannot read the audit log"))?
            .into_inner()
            .entries;
        let Some(last) = page.last() else {
            return Ok(entries);
        };
        after = Some((last.chain.clone(), last.seq));
        entries.extend(page.into_iter().map(|entry| AuditEntry {
            record: AuditRecord {
                chain: entry.chain,
                actor: entry.actor,
                action: entry.action,
                target: entry.target,
                outcome: entry.outcome,
                detail: entry.detail,
            },
            seq: entry.seq,
            at_micros: entry.at_micros,
            prev_hash: entry.prev_hash,
            hash: entry.hash,
        }));
    }
}

/// Runs an `audit` command.
pub async fn audit(args: AuditArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    match args.command {
        AuditCommand::List { chain, limit, json } => {
            let entries = read_audit(&args.mesh, chain.as_deref()).await?;
            let skip = limit.map_or(0, |limit| entries.len().saturating_sub(limit));
            for entry in &entries[skip..] {
                let at = fedmesh_common::time::timestamp_from_micros(entry.at_micros).to_string();
                let record = &entry.record;
                if json {
                    let row = json!({
                        "chain": record.chain,
                        "seq": entry.seq,
                        "at": at,
                        "actor": record.actor,
                        "action": record.action,
                        "target": record.target,
                        "outcome": record.outcome,
                        "detail": record.detail,
                        "hash": entry.hash,
                    });
                    writeln!(out, "{row}")?;
                } else {
                    writeln!(
                        out,
                        "{} #{} {at} {} {} {} {} {}",
                        record.chain,
                        entry.seq,
                        record.actor,
                        record.action,
                        record.target,
                        record.outcome,
                        record.detail
                    )?;
                }
            }
            if entries.is_empty() && !json {
                writeln!(out, "the audit log is empty")?;
            }
        }
        AuditCommand::Verify { chain } => {
            let entries = read_audit(&args.mesh, chain.as_deref()).await?;
            let count = fedmesh_common::audit::verify(&entries)?;
            let chains: std::collections::BTreeSet<&str> = entries
                .iter()
                .map(|entry| entry.record.chain.as_str())
                .collect();
            writeln!(
                out,
                "the audit log is intact: {count} rows in {} chains ({})",
                chains.len(),
                chains.iter().copied().collect::<Vec<_>>().join(", ")
            )?;
            // The heads, to keep elsewhere: rows cut off the end of a chain,
            // or a chain rewritten whole, show only against them.
            for chain in chains {
                if let Some(head) = entries
                    .iter()
                    .rev()
                    .find(|entry| entry.record.chain == chain)
                {
                    writeln!(out, "  head of {chain}: row {} {}", head.seq, head.hash)?;
                }
            }
        }
    }
    Ok(())
}
