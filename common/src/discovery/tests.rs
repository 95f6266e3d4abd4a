use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an IP address")
}

fn target(port: u16) -> SrvTarget {
    SrvTarget {
        target: "gw.mesh.example.".into(),
        port,
    }
}

#[test]
fn srv_and_host_answers_become_urls_with_the_mesh_scheme() {
    let targets = [
        (target(50052), vec![ip("10.0.0.7"), ip("fd00::7")]),
        (target(50053), vec![ip("10.0.0.8")]),
        // A second record naming the same gateway adds nothing.
        (target(50052), vec![ip("10.0.0.7")]),
        // A target without addresses adds nothing either.
        (target(50054), vec![]),
    ];
    assert_eq!(
        srv_urls("https", &targets),
        [
            "https://10.0.0.7:50052",
            "https://[fd00::7]:50052",
            "https://10.0.0.8:50053"
        ]
    );
    assert_eq!(
        host_urls("http", 50052, &[ip("10.1.0.1"), ip("10.1.0.2")]),
        ["http://10.1.0.1:50052", "http://10.1.0.2:50052"]
    );
    assert_eq!(
        srv_name(&gateways_of("west"), "mesh.example."),
        "_fedmesh._tcp.gateway.west.mesh.example."
    );
    assert_eq!(
        host_name(&gateways_of("west"), "mesh.example."),
        "gateway.west.mesh.example."
    );
    assert_eq!(
        srv_name(COORDINATORS, "mesh.example."),
        "_fedmesh._tcp.coordinator.mesh.example."
    );
    assert_eq!(
        host_name(COORDINATORS, "mesh.example."),
        "coordinator.mesh.example."
    );
    assert_eq!(fully_qualified("mesh.example"), "mesh.example.");
    assert_eq!(fully_qualified("mesh.example."), "mesh.example.");
}

#[test]
fn settings_are_parsed_and_checked() {
    assert_eq!(
        parse_resolver_address("127.0.0.1"),
        Ok("127.0.0.1:53".parse().expect("address"))
    );
    assert_eq!(
        parse_resolver_address("127.0.0.1:5353"),
        Ok("127.0.0.1:5353".parse().expect("address"))
    );
    assert_eq!(
        parse_resolver_address("[::1]:5353"),
        Ok("[::1]:5353".parse().expect("address"))
    );
    assert_eq!(
        parse_resolver_address("::1"),
        Ok("[::1]:53".parse().expect("address"))
    );
    assert!(parse_resolver_address("dns.example").is_err());

    assert!(check_domain("mesh.example.org").is_ok());
    assert!(check_domain("mesh.example.org.").is_ok());
    for bad in [
        "",
        ".",
        "mesh..org",
        "-mesh.org",
        "mesh_example.org",
        "mesh.org/x",
    ] {
        assert!(check_domain(bad).is_err(), "{bad:?}");
    }

    let peer: Peer = "west=https://10.0.0.7:50052".parse().expect("peer");
    assert_eq!(peer.region, "west");
    assert_eq!(peer.url, "https://10.0.0.7:50052");
    assert!(peer.check().is_ok());
    assert!("west".parse::<Peer>().is_err());
    assert!("=https://10.0.0.7:50052".parse::<Peer>().is_err());
    for bad in ["ftp://10.0.0.7", "10.0.0.7:50052", "https://"] {
        let peer = Peer {
            region: "west".into(),
            url: bad.into(),
        };
        assert!(peer.check().is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn without_a_domain_only_the_configured_peers_are_found() {
    let peer = |text: &str| text.parse::<Peer>().expect("peer");
    let options = DiscoveryOptions {
        domain: None,
        resolver: None,
        port: 50052,
        grace: Duration::from_secs(300),
        scheme: "http",
        peers: vec![
            peer("west=http://10.0.0.7:50052"),
            peer("west=http://10.0.0.8:50052"),
            peer("west=http://10.0.0.7:50052"),
            peer("central=http://10.2.0.1:50052"),
        ],
    };
    let discovery = Discovery::new(options, CancellationToken::new()).expect("discovery");
    let west = discovery.endpoints("west").await;
    assert!(west.dns.is_empty());
    assert_eq!(
        &*west.configured,
        ["http://10.0.0.7:50052", "http://10.0.0.8:50052"]
    );
    assert!(discovery.endpoints("east").await.configured.is_empty());
}

/// A DNS stand-in: answers what the test last set, counting lookups.
#[derive(Default)]
struct Scripted {
    answer: Mutex<Option<Resolved>>,
    lookups: AtomicUsize,
}

impl Scripted {
    /// Answers `urls` with `ttl` from now on; None fails every lookup.
    fn set(&self, answer: Option<(&[&str], Duration)>) {
        *self.answer.lock().expect("lock") = answer.map(|(urls, ttl)| Resolved {
            urls: urls.iter().map(|url| url.to_string()).collect(),
            ttl,
        });
    }

    fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }
}

impl ResolveRegion for Arc<Scripted> {
    async fn resolve(&self, region: &str) -> Result<Resolved, DiscoveryError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.answer
            .lock()
            .expect("lock")
            .clone()
            .ok_or_else(|| DiscoveryError::Lookup {
                name: format!("_fedmesh._tcp.gateway.{region}.mesh.test."),
                source: NetError::Timeout,
            })
    }
}

const SECOND: Duration = Duration::from_secs(1);

fn scripted(grace: Duration) -> (Arc<Scripted>, DnsDiscovery<Arc<Scripted>>) {
    let script = Arc::new(Scripted::default());
    let discovery = DnsDiscovery::new(Arc::clone(&script), grace, CancellationToken::new());
    (script, discovery)
}

#[tokio::test(start_paused = true)]
async fn an_answer_is_used_until_its_ttl_runs_out_then_asked_again() {
    let (script, discovery) = scripted(Duration::from_secs(60));
    script.set(Some((&["http://10.0.0.7:1", "http://10.0.0.8:1"], SECOND)));
    assert_eq!(
        &*discovery.endpoints("west").await,
        ["http://10.0.0.7:1", "http://10.0.0.8:1"],
        "the first request waits for the first answer"
    );
    script.set(Some((&["http://10.0.0.8:1"], SECOND)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        &*discovery.endpoints("west").await,
        ["http://10.0.0.7:1", "http://10.0.0.8:1"],
        "within its TTL the answer is not asked again"
    );
    assert_eq!(script.lookups(), 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(&*discovery.endpoints("west").await, ["http://10.0.0.8:1"]);
    assert_eq!(script.lookups(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_lookup_keeps_the_last_answer_until_its_ttl_plus_the_grace() {
    let (script, discovery) = scripted(Duration::from_secs(10));
    script.set(Some((&["http://10.0.0.7:1"], SECOND)));
    assert_eq!(&*discovery.endpoints("west").await, ["http://10.0.0.7:1"]);
    script.set(None);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(script.lookups() > 2, "failed lookups are retried");
    assert_eq!(
        &*discovery.endpoints("west").await,
        ["http://10.0.0.7:1"],
        "within TTL plus grace the last answer serves"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        discovery.endpoints("west").await.is_empty(),
        "past TTL plus grace it is no longer used"
    );
    script.set(Some((&["http://10.0.0.9:1"], SECOND)));
    // Retries back off to at most RETRY_MAX.
    tokio::time::sleep(RETRY_MAX).await;
    assert_eq!(&*discovery.endpoints("west").await, ["http://10.0.0.9:1"]);
}

#[tokio::test(start_paused = true)]
async fn a_zero_ttl_is_asked_again_once_a_second_not_without_pause() {
    let (script, discovery) = scripted(Duration::ZERO);
    script.set(Some((&["http://10.0.0.7:1"], Duration::ZERO)));
    assert_eq!(&*discovery.endpoints("west").await, ["http://10.0.0.7:1"]);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(script.lookups(), 3, "at 0, 1 and 2 seconds");
    assert_eq!(&*discovery.endpoints("west").await, ["http://10.0.0.7:1"]);
}

#[tokio::test(start_paused = true)]
async fn a_first_lookup_that_fails_leaves_the_region_to_the_other_lists() {
    let (script, discovery) = scripted(Duration::from_secs(60));
    script.set(None);
    assert!(discovery.endpoints("west").await.is_empty());
    assert_eq!(script.lookups(), 1, "the first failure answers the request");
}

#[tokio::test(start_paused = true)]
async fn each_region_has_its_own_answer_and_task_which_stop_on_shutdown() {
    let script = Arc::new(Scripted::default());
    let shutdown = CancellationToken::new();
    let discovery = DnsDiscovery::new(Arc::clone(&script), SECOND, shutdown.clone());
    script.set(Some((&["http://10.0.0.7:1"], SECOND)));
    discovery.endpoints("west").await;
    discovery.endpoints("central").await;
    discovery.endpoints("west").await;
    assert_eq!(script.lookups(), 2, "one first lookup per region");
    shutdown.cancel();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(script.lookups(), 2, "no lookup after shutdown");
}
