//! DOMAIN: an agency as the coordinator keeps it. The directory and the
//! control database both speak of it; neither owns it.

/// An agency as the directory keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgencyRecord {
    /// Agency id.
    pub agency_id: String,
    /// Home region.
    pub region: String,
    /// Shard of the home region holding its inbox.
    pub shard: String,
    /// Free-form display name.
    pub display_name: String,
    /// When it was registered, microseconds since the epoch.
    pub registered_at_micros: i64,
    /// A move of it is under way: gateways hold writes to and from it.
    pub moving: bool,
    /// One more with every change of it (from 1 at registration).
    pub version: u64,
}
