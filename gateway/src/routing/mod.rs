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
//! Each list is a tier: the relay client balances over a tier's gateways
//! by load; a later tier is tried only after every gateway of the earlier
//! ones failed (or was left out for failing).

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
        /// Gateways of that region, in tiers to try in order.
        gateways: Vec<Vec<String>>,
    },
}

/// The route to `home` from a gateway of `own_region`; `found` are the
/// gateways of `home`'s region found besides the topology (none for a
/// local route).
pub fn route(
    topology: &Topology,
    own_region: &str,
    home: &AgencyHome,
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
        ),
    }
}

/// The tiers of gateways to try, in the module's order of precedence:
/// `dns`, then `announced`, then `configured`, each URL once (in the first
/// tier that names it); empty tiers are left out.
pub fn relay_targets(
    dns: &[String],
    announced: &[String],
    configured: &[String],
) -> Vec<Vec<String>> {
    let mut tiers: Vec<Vec<String>> = Vec::with_capacity(3);
    for list in [dns, announced, configured] {
        let mut tier = Vec::with_capacity(list.len());
        for url in list {
            let seen = tiers.iter().any(|tier| tier.contains(url));
            if !seen && !tier.contains(url) {
                tier.push(url.clone());
            }
        }
        if !tier.is_empty() {
            tiers.push(tier);
        }
    }
    tiers
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
            route(&topology, "east", &home("east"), &nothing_found),
            Route::Local {
                shard: "east-1".into()
            }
        );
        assert_eq!(
            route(&topology, "east", &home("west"), &nothing_found),
            Route::Relay {
                region: "west".into(),
                gateways: vec![urls(&["http://west-0", "http://west-1"])],
            },
            "without discovery, the coordinator's gateways"
        );
        let found = RegionEndpoints {
            dns: urls(&["http://10.0.0.7", "http://west-1"]).into(),
            configured: urls(&["http://static"]).into(),
        };
        assert_eq!(
            route(&topology, "east", &home("west"), &found),
            Route::Relay {
                region: "west".into(),
                gateways: vec![
                    urls(&["http://10.0.0.7", "http://west-1"]),
                    urls(&["http://west-0"]),
                    urls(&["http://static"]),
                ],
            }
        );
    }

    #[test]
    fn dns_comes_first_then_the_coordinator_then_the_settings_each_url_once() {
        let dns = urls(&["http://a", "http://b"]);
        let announced = urls(&["http://b", "http://c", "http://d", "http://c"]);
        let configured = urls(&["http://d", "http://e", "http://a"]);
        assert_eq!(
            relay_targets(&dns, &announced, &configured),
            vec![
                urls(&["http://a", "http://b"]),
                urls(&["http://c", "http://d"]),
                urls(&["http://e"]),
            ]
        );
        assert_eq!(
            relay_targets(&[], &announced, &configured),
            vec![
                urls(&["http://b", "http://c", "http://d"]),
                urls(&["http://e", "http://a"]),
            ]
        );
        assert_eq!(
            relay_targets(&dns, &[], &dns),
            vec![urls(&["http://a", "http://b"])],
            "a tier naming only what an earlier one did is left out"
        );
        assert!(relay_targets(&[], &[], &[]).is_empty());
    }
}
