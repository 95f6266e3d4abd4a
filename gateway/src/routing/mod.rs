//! DOMAIN: where a message goes, decided from the topology alone.

use fedmesh_common::topology::{AgencyHome, Topology};

/// Where to take a message for a recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The recipient lives in this gateway's region, on this shard.
    Local {
        /// Shard name.
        shard: String,
    },
    /// The recipient lives in another region: relay to one of its gateways.
    Relay {
        /// The recipient's home region.
        region: String,
        /// Gateways of that region, in the order to try them.
        gateways: Vec<String>,
    },
}

/// The route to `home` from a gateway of `own_region`. Relay targets are
/// rotated by `spread` so that gateways share the load.
pub fn route(topology: &Topology, own_region: &str, home: &AgencyHome, spread: usize) -> Route {
    if home.region == own_region {
        return Route::Local {
            shard: home.shard.clone(),
        };
    }
    let mut gateways = topology.gateways_of(&home.region);
    if !gateways.is_empty() {
        let len = gateways.len();
        gateways.rotate_left(spread % len);
    }
    Route::Relay {
        region: home.region.clone(),
        gateways,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_common::topology::GatewayEntry;

    #[test]
    fn local_and_relayed_routes() {
        let mut topology = Topology::default();
        for (id, region) in [("west-0", "west"), ("west-1", "west"), ("east-0", "east")] {
            topology.gateways.insert(
                id.into(),
                GatewayEntry {
                    region: region.into(),
                    address: format!("http://{id}"),
                },
            );
        }
        let home = |region: &str| AgencyHome {
            region: region.into(),
            shard: format!("{region}-1"),
            moving: false,
        };
        assert_eq!(
            route(&topology, "east", &home("east"), 0),
            Route::Local {
                shard: "east-1".into()
            }
        );
        assert_eq!(
            route(&topology, "east", &home("west"), 1),
            Route::Relay {
                region: "west".into(),
                gateways: vec!["http://west-1".into(), "http://west-0".into()],
            }
        );
    }
}
