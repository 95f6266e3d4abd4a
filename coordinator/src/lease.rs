//! DOMAIN: the leader lease of the coordinator replicas, and the fencing
//! token that every singleton write carries.
//!
//! A replica holds the lease until `expires_at`, renewing it well before;
//! another replica takes it over only once it expired, with the next
//! token. A write of singleton work names the token it was decided under
//! and the store refuses it when the lease has moved on, so a deposed
//! leader (paused, cut off) cannot overwrite its successor's work.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use fedmesh_common::config::{ConfigError, check_range};

/// The name of the coordinators' leader lease.
pub const LEADER: &str = "leader";

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The replica holding it.
    pub holder: String,
    /// Its fencing token: one more with every new holder.
    pub token: i64,
    /// When the holder took it, microseconds since the epoch.
    pub acquired_at_micros: i64,
    /// Until when it holds it unless renewed.
    pub expires_at_micros: i64,
}

/// How the leader lease is held: settings of the coordinator, under
/// `[lease]` in its config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseSettings {
    /// How long the leader holds the lease without renewing it, in
    /// milliseconds: how long singleton work may stop when it dies.
    #[arg(long, env = "FEDMESH_LEASE_MS", default_value_t = 10_000)]
    pub lease_ms: u64,
    /// How often the leader renews the lease, in milliseconds.
    #[arg(long, env = "FEDMESH_LEASE_RENEW_MS", default_value_t = 3_000)]
    pub lease_renew_ms: u64,
    /// How often the other replicas try to take the lease, in
    /// milliseconds.
    #[arg(long, env = "FEDMESH_LEASE_RETRY_MS", default_value_t = 1_000)]
    pub lease_retry_ms: u64,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        fedmesh_common::config::defaults()
    }
}

impl LeaseSettings {
    /// Refuses values that cannot work: renewing must come well within the
    /// lease.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("lease_ms", self.lease_ms, 100..=3_600_000)?;
        check_range("lease_renew_ms", self.lease_renew_ms, 10..=3_600_000)?;
        check_range("lease_retry_ms", self.lease_retry_ms, 10..=3_600_000)?;
        if self.lease_renew_ms * 2 > self.lease_ms {
            return Err(ConfigError::setting(
                "lease_renew_ms",
                format!(
                    "{} ms renews too rarely for a lease of {} ms: renew at most every half lease",
                    self.lease_renew_ms, self.lease_ms
                ),
            ));
        }
        Ok(())
    }

    /// The lease's duration.
    pub fn duration(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}
