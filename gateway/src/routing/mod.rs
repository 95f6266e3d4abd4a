//! DOMAIN: where a message goes, decided from the topology and the gateways
//! found besides it (DNS, the settings), which the caller looked up.
//!
//! The gateways of another region are tried in this order:
//! 1. those DNS names: the deployment's own, current list (what the
//!    orchestrator runs and an operator published, each answer fresh within
//!    its TTL); a gateway taken out of DNS gets no more relays;
//! 2. those the coordinator announces and DNS did not name: gateways that
//!    reported themselves lately, also where no DNS is set up;
//! 3. those the settings list and neither named: fixed at start, so the
//!    likeliest to be out of date, but there without DNS and without a
//!    coordinator.
//!
//! Each list is rotated by a number that changes per call, so that its
//! gateways share the load; a later list is tried only after every gateway
//! of the earlier ones failed.

use fedmesh_common::discovery::RegionEndpoints;
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

/// The route to `home` from a gateway of `own_region`; `found` are the
/// gateways of `home`'s region found besides the topology (none for a
/// local route). Relay targets are rotated by `spread` so that gateways
/// share the load.
pub fn route(
    topology: &Topology,
    own_region: &str,
    home: &AgencyHome,
    spread: usize,
    found: &RegionEndpoints,
) -> Route {
    if home.region == own_region {
        return Route::Local {
            shard: home.shard.clone(),
        };
    }
    Route::Relay {
        region: home.region.clone(),
        gateways: relay_targets(
            &found.dns,
            &topology.gateways_of(&home.region),
            &found.configured,
            spread,
        ),
    }
}

/// The gateways to try, in the module's order of precedence: `dns`, then
/// `announced`, then `configured`, each URL once (where it first appears),
/// each list rotated by `spread`.
pub fn relay_targets(
    dns: &[String],
    announced: &[String],
    configured: &[String],
    spread: usize,
) -> Vec<String> {
    let mut targets: Vec<String> =
        Vec::with_capacity(dns.len() + announced.len() + configured.len());
    for list in [dns, announced, configured] {
        let start = targets.len();
        for url in list {
            if !targets.contains(url) {
                targets.push(url.clone());
            }
        }
        let added = &mut targets[start..];
        if !added.is_empty() {
            let len = added.len();
            added.rotate_left(spread % len);
        }
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_common::topology::GatewayEntry;

    fn urls(urls: &[&str]) -> Vec<String> {
        urls.iter().map(|url| url.to_string()).collect()
    }

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
        let nothing_found = RegionEndpoints::default();
        assert_eq!(
            route(&topology, "east", &home("east"), 0, &nothing_found),
            Route::Local {
                shard: "east-1".into()
            }
        );
        assert_eq!(
            route(&topology, "east", &home("west"), 1, &nothing_found),
            Route::Relay {
                region: "west".into(),
                gateways: urls(&["http://west-1", "http://west-0"]),
            },
            "without discovery, the coordinator's gateways rotated, as they were"
        );
        let found = RegionEndpoints {
            dns: urls(&["http://10.0.0.7", "http://west-1"]).into(),
            configured: urls(&["http://static"]).into(),
        };
        assert_eq!(
            route(&topology, "east", &home("west"), 0, &found),
            Route::Relay {
                region: "west".into(),
                gateways: urls(&[
                    "http://10.0.0.7",
                    "http://west-1",
                    "http://west-0",
                    "http://static"
                ]),
            }
        );
    }

    #[test]
    fn dns_comes_first_then_the_coordinator_then_the_settings_each_url_once() {
        let dns = urls(&["http://a", "http://b"]);
        let announced = urls(&["http://b", "http://c", "http://d"]);
        let configured = urls(&["http://d", "http://e", "http://a"]);
        assert_eq!(
            relay_targets(&dns, &announced, &configured, 0),
            urls(&["http://a", "http://b", "http://c", "http://d", "http://e"])
        );
        // Each list rotates on its own: the first gateway tried is always
        // one of DNS's, and the coordinator's come before the settings'.
        assert_eq!(
            relay_targets(&dns, &announced, &configured, 1),
            urls(&["http://b", "http://a", "http://d", "http://c", "http://e"])
        );
        assert_eq!(
            relay_targets(&[], &announced, &configured, 2),
            urls(&["http://d", "http://b", "http://c", "http://e", "http://a"])
        );
        assert_eq!(
            relay_targets(&[], &[], &configured, 1),
            urls(&["http://e", "http://a", "http://d"])
        );
        assert!(relay_targets(&[], &[], &[], 3).is_empty());
    }
}
