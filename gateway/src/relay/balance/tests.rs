use super::*;

fn tier(addresses: &[&str]) -> Vec<String> {
    addresses
        .iter()
        .map(|address| address.to_string())
        .collect()
}

/// `address` answers once after `rtt`.
async fn answers_after(balancer: &Balancer, address: &str, rtt: Duration) {
    let call = balancer.start(address);
    tokio::time::advance(rtt).await;
    call.answered();
}

fn fail(balancer: &Balancer, address: &str) -> bool {
    balancer.start(address).failed()
}

#[tokio::test(start_paused = true)]
async fn the_faster_of_two_is_taken_and_the_slowest_of_three_never() {
    let balancer = Balancer::default();
    answers_after(&balancer, "slow", Duration::from_millis(200)).await;
    answers_after(&balancer, "fast", Duration::from_millis(2)).await;
    answers_after(&balancer, "middling", Duration::from_millis(20)).await;
    for _ in 0..50 {
        assert_eq!(
            balancer
                .pick(&tier(&["slow", "fast"]), &[], false)
                .as_deref(),
            Some("fast")
        );
        // Whichever two are drawn, one of them is cheaper than "slow".
        assert_ne!(
            balancer
                .pick(&tier(&["slow", "fast", "middling"]), &[], false)
                .as_deref(),
            Some("slow")
        );
    }
}

#[tokio::test(start_paused = true)]
async fn equal_endpoints_share_the_load_and_calls_in_flight_count() {
    let balancer = Balancer::default();
    let both = tier(&["a", "b"]);
    let mut picked_a = 0;
    for _ in 0..200 {
        if balancer.pick(&both, &[], false).as_deref() == Some("a") {
            picked_a += 1;
        }
    }
    assert!(
        (40..=160).contains(&picked_a),
        "both get work: a was picked {picked_a} times of 200"
    );
    // Three calls under way at a: b is cheaper until they end.
    let calls: Vec<_> = (0..3).map(|_| balancer.start("a")).collect();
    for _ in 0..20 {
        assert_eq!(balancer.pick(&both, &[], false).as_deref(), Some("b"));
    }
    drop(calls);
    let after = (0..200)
        .filter(|_| balancer.pick(&both, &[], false).as_deref() == Some("a"))
        .count();
    assert!(after > 0, "a calls ended (given up): it is picked again");
}

#[tokio::test(start_paused = true)]
async fn a_batch_tries_each_endpoint_of_a_tier_once() {
    let balancer = Balancer::default();
    let three = tier(&["a", "b", "c"]);
    let mut tried = Vec::new();
    while let Some(address) = balancer.pick(&three, &tried, false) {
        assert!(!tried.contains(&address), "{address} picked twice");
        tried.push(address);
    }
    tried.sort();
    assert_eq!(tried, three);
    assert_eq!(balancer.pick(&[], &[], false), None);
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_that_keeps_failing_is_left_out_for_a_doubling_cool_down() {
    let balancer = Balancer::default();
    let both = tier(&["bad", "good"]);
    for _ in 1..FAILURES_TO_EJECT {
        assert!(!fail(&balancer, "bad"));
    }
    assert!(!balancer.is_ejected("bad"), "not on fewer failures");
    assert!(fail(&balancer, "bad"), "ejected on the third in a row");
    for _ in 0..20 {
        assert_eq!(balancer.pick(&both, &[], false).as_deref(), Some("good"));
    }
    assert_eq!(
        balancer.pick(&tier(&["bad"]), &[], false),
        None,
        "an ejected endpoint is not tried even when it is the only one"
    );
    assert_eq!(
        balancer.pick(&tier(&["bad"]), &[], true).as_deref(),
        Some("bad"),
        "unless asked for even an ejected one"
    );

    tokio::time::advance(FIRST_COOL_DOWN).await;
    assert!(
        !balancer.is_ejected("bad"),
        "re-admitted after the cool-down"
    );
    assert_eq!(
        balancer.pick(&tier(&["bad"]), &[], false).as_deref(),
        Some("bad")
    );
    assert!(fail(&balancer, "bad"), "one failure back from a cool-down");
    tokio::time::advance(FIRST_COOL_DOWN).await;
    assert!(
        balancer.is_ejected("bad"),
        "the second cool-down is twice as long"
    );
    tokio::time::advance(FIRST_COOL_DOWN).await;
    assert!(!balancer.is_ejected("bad"));

    // An answer clears it: failing again takes three in a row.
    answers_after(&balancer, "bad", Duration::from_millis(1)).await;
    assert!(!fail(&balancer, "bad"));
    assert!(!balancer.is_ejected("bad"));
}

#[tokio::test(start_paused = true)]
async fn cool_downs_stop_growing_at_the_longest() {
    let balancer = Balancer::default();
    for _ in 0..FAILURES_TO_EJECT {
        fail(&balancer, "bad");
    }
    for _ in 0..10 {
        tokio::time::advance(LONGEST_COOL_DOWN).await;
        assert!(!balancer.is_ejected("bad"));
        assert!(fail(&balancer, "bad"));
    }
    tokio::time::advance(LONGEST_COOL_DOWN - Duration::from_millis(1)).await;
    assert!(balancer.is_ejected("bad"));
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(!balancer.is_ejected("bad"));
}

#[tokio::test(start_paused = true)]
async fn retries_are_a_fifth_of_first_attempts_besides_a_small_reserve() {
    let balancer = Balancer::default();
    let reserve = MIN_RETRIES_PER_SEC as usize * BUDGET_WINDOW.as_secs() as usize;
    let mut retries = 0;
    while balancer.may_retry() {
        retries += 1;
        assert!(retries <= reserve, "more retries than the reserve");
    }
    assert_eq!(retries, reserve, "the reserve allows some retries at once");
    for _ in 0..100 {
        balancer.first_attempt();
    }
    let mut more = 0;
    while balancer.may_retry() {
        more += 1;
        assert!(more <= 20, "more than 20% of first attempts retried");
    }
    assert_eq!(more, 20);
    // Once the window passed, what was spent is forgotten as what was
    // deposited: the reserve alone again.
    tokio::time::advance(BUDGET_WINDOW + Duration::from_secs(1)).await;
    let later = std::iter::from_fn(|| balancer.may_retry().then_some(())).count();
    assert_eq!(later, reserve);
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_not_measured_yet_is_tried_before_measured_ones() {
    let balancer = Balancer::default();
    answers_after(&balancer, "known", Duration::from_millis(1)).await;
    for _ in 0..20 {
        assert_eq!(
            balancer
                .pick(&tier(&["known", "new"]), &[], false)
                .as_deref(),
            Some("new")
        );
    }
}
