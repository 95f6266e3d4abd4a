//! DOMAIN: the shard databases of regions, as the directory keeps them.

/// A shard database of a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRecord {
    /// Its name, unique in the mesh (e.g. `east-1`).
    pub name: String,
    /// The region it belongs to.
    pub region: String,
    /// Where it is, for operators (host and database; no credentials).
    pub address: String,
    /// A draining shard takes no new agencies.
    pub draining: bool,
    /// Most agencies it should hold; 0: no limit.
    pub capacity: u32,
    /// When it was added, microseconds since the epoch.
    pub created_at_micros: i64,
}

impl ShardRecord {
    /// A shard seeded from the coordinator's `--region` flags.
    pub fn seeded(name: &str, region: &str, created_at_micros: i64) -> Self {
        ShardRecord {
            name: name.to_string(),
            region: region.to_string(),
            address: String::new(),
            draining: false,
            capacity: 0,
            created_at_micros,
        }
    }
}
