//! DOMAIN (of the relay client): which gateway of a region the next attempt
//! of a batch goes to, and whether one more attempt is allowed.
//!
//! - **Power of two choices by load.** Of the endpoints of a tier that this
//!   batch has not tried and that are not ejected, two are drawn at random
//!   and the one expected to answer sooner is taken: its peak-EWMA round
//!   trip time times its calls in flight plus one, the cost Finagle and
//!   tower's `PeakEwma` use. A slow or busy gateway gets less, an idle one
//!   more, and no gateway gets everything.
//! - **Ejection.** An endpoint whose calls failed [`FAILURES_TO_EJECT`]
//!   times in a row (no answer, a reset, a timeout) is left out for a
//!   cool-down of [`FIRST_COOL_DOWN`]; it is then tried again, and if that
//!   call fails too it is left out for twice as long, up to
//!   [`LONGEST_COOL_DOWN`]. One answer re-admits it fully. When every
//!   endpoint of a region is ejected, one is tried anyway before the
//!   coordinator (as a load balancer's panic mode ignores health when too
//!   little is healthy): a region that comes back is used directly at
//!   once, not only after the cool-down.
//! - **Retry budget.** A batch's first attempt is free and deposits into
//!   tower's [`TpsBudget`]; each further attempt (another gateway, the
//!   coordinator) withdraws from it: at most [`RETRY_PERCENT`] of the first
//!   attempts of the last [`BUDGET_WINDOW`], and [`MIN_RETRIES_PER_SEC`]
//!   besides, so that a failing region never sees more than 1.2 times the
//!   calls it would see healthy.
//!
//! tower's own `p2c::Balance` owns its endpoints as services and learns them
//! from a `Discover` stream; here the endpoints come from the route of each
//! batch (DNS, then the coordinator's, then the settings' tiers) and calls
//! share one HTTP/2 channel per endpoint, so the choice is made here with
//! the same cost, and tower's budget bounds the retries.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tower::retry::budget::{Budget as _, TpsBudget};

/// Failed calls in a row that eject an endpoint.
pub(crate) const FAILURES_TO_EJECT: u32 = 3;
/// How long an endpoint is left out the first time.
pub(crate) const FIRST_COOL_DOWN: Duration = Duration::from_secs(5);
/// The longest an endpoint is left out.
pub(crate) const LONGEST_COOL_DOWN: Duration = Duration::from_secs(60);
/// Retries allowed, as a share of first attempts.
pub(crate) const RETRY_PERCENT: f32 = 0.2;
/// How long a first attempt counts towards the budget.
pub(crate) const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Retries allowed every second whatever the traffic.
pub(crate) const MIN_RETRIES_PER_SEC: u32 = 1;
/// The round trip assumed of an endpoint not measured yet: short, so that
/// a new endpoint is tried soon and measured.
const DEFAULT_RTT: Duration = Duration::from_micros(1);
/// How fast a round-trip estimate forgets.
const DECAY: Duration = Duration::from_secs(10);

/// What is known of one endpoint.
#[derive(Debug)]
struct Endpoint {
    /// Peak-EWMA round trip, in nanoseconds, as of `measured`.
    rtt_ns: f64,
    measured: Instant,
    in_flight: u32,
    /// Failed calls since the last answer.
    failures: u32,
    /// Left out until then.
    ejected_until: Option<Instant>,
    /// How long the next ejection lasts.
    cool_down: Duration,
}

impl Endpoint {
    fn new(now: Instant) -> Endpoint {
        Endpoint {
            rtt_ns: nanos(DEFAULT_RTT),
            measured: now,
            in_flight: 0,
            failures: 0,
            ejected_until: None,
            cool_down: FIRST_COOL_DOWN,
        }
    }

    /// The round-trip estimate at `now`: it decays towards zero while
    /// nothing is measured, so an endpoint left idle is tried again.
    fn rtt_at(&self, now: Instant) -> f64 {
        let idle = now.saturating_duration_since(self.measured);
        self.rtt_ns * (-nanos(idle) / nanos(DECAY)).exp()
    }

    fn cost(&self, now: Instant) -> f64 {
        self.rtt_at(now) * f64::from(self.in_flight + 1)
    }

    fn measure(&mut self, rtt: Duration, now: Instant) {
        let sample = nanos(rtt);
        let estimate = self.rtt_at(now);
        self.rtt_ns = if sample > estimate {
            // A peak is taken at once; a fall is followed slowly.
            sample
        } else {
            let idle = now.saturating_duration_since(self.measured);
            let weight = (-nanos(idle) / nanos(DECAY)).exp();
            estimate * weight + sample * (1.0 - weight)
        };
        self.measured = now;
    }

    fn ejected_at(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

fn nanos(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e9
}

/// The relay client's view of one region's endpoints and its retry budget.
pub(crate) struct Balancer {
    endpoints: Mutex<HashMap<String, Endpoint>>,
    budget: TpsBudget,
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer {
            endpoints: Mutex::new(HashMap::new()),
            budget: TpsBudget::new(BUDGET_WINDOW, MIN_RETRIES_PER_SEC, RETRY_PERCENT),
        }
    }
}

impl Balancer {
    fn endpoints(&self) -> std::sync::MutexGuard<'_, HashMap<String, Endpoint>> {
        self.endpoints
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The endpoint of `tier` to try next: none of `tried`, none ejected
    /// (unless `even_ejected`); the cheaper of two drawn at random. `None`
    /// when the tier has none left.
    pub(crate) fn pick(
        &self,
        tier: &[String],
        tried: &[String],
        even_ejected: bool,
    ) -> Option<String> {
        let now = Instant::now();
        let mut endpoints = self.endpoints();
        let candidates: Vec<&String> = tier
            .iter()
            .filter(|address| !tried.contains(address))
            .filter(|address| {
                even_ejected
                    || endpoints
                        .get(address.as_str())
                        .is_none_or(|endpoint| !endpoint.ejected_at(now))
            })
            .collect();
        let chosen = match candidates.len() {
            0 => return None,
            1 => candidates[0],
            n => {
                let first = fastrand::usize(..n);
                let second = (first + 1 + fastrand::usize(..n - 1)) % n;
                let cost = |address: &String| {
                    endpoints
                        .get(address.as_str())
                        .map_or(nanos(DEFAULT_RTT), |endpoint| endpoint.cost(now))
                };
                if cost(candidates[second]) < cost(candidates[first]) {
                    candidates[second]
                } else {
                    candidates[first]
                }
            }
        };
        let address = chosen.clone();
        endpoints
            .entry(address.clone())
            .or_insert_with(|| Endpoint::new(now));
        Some(address)
    }

    /// Counts a batch's first attempt towards the retry budget.
    pub(crate) fn first_attempt(&self) {
        self.budget.deposit();
    }

    /// Whether the budget allows one more attempt of a batch; takes it if so.
    pub(crate) fn may_retry(&self) -> bool {
        self.budget.withdraw()
    }

    /// A call to `address` starts: it counts as in flight until the
    /// returned guard says how it ended (or is dropped, as a call whose
    /// caller gave up: neither an answer nor a failure).
    pub(crate) fn start(&self, address: &str) -> Call<'_> {
        let now = Instant::now();
        self.endpoints()
            .entry(address.to_string())
            .or_insert_with(|| Endpoint::new(now))
            .in_flight += 1;
        Call {
            balancer: self,
            address: address.to_string(),
            started: now,
            ended: false,
        }
    }

    /// Whether `address` is left out now.
    #[cfg(test)]
    fn is_ejected(&self, address: &str) -> bool {
        let now = Instant::now();
        self.endpoints()
            .get(address)
            .is_some_and(|endpoint| endpoint.ejected_at(now))
    }
}

/// A call under way to one endpoint.
pub(crate) struct Call<'a> {
    balancer: &'a Balancer,
    address: String,
    started: Instant,
    ended: bool,
}

impl Call<'_> {
    /// The endpoint answered (whatever the answer says of the messages):
    /// its round trip counts, and it is in good standing again.
    pub(crate) fn answered(mut self) {
        let now = Instant::now();
        let rtt = now.saturating_duration_since(self.started);
        self.end(|endpoint| {
            endpoint.measure(rtt, now);
            endpoint.failures = 0;
            endpoint.ejected_until = None;
            endpoint.cool_down = FIRST_COOL_DOWN;
        });
    }

    /// The endpoint did not answer. Returns whether it is now ejected.
    pub(crate) fn failed(mut self) -> bool {
        let now = Instant::now();
        let mut ejected = false;
        self.end(|endpoint| {
            endpoint.failures += 1;
            // Back from a cool-down, one more failure is enough.
            let on_probation = endpoint.ejected_until.is_some();
            if endpoint.failures >= FAILURES_TO_EJECT || on_probation {
                endpoint.ejected_until = Some(now + endpoint.cool_down);
                endpoint.cool_down = (endpoint.cool_down * 2).min(LONGEST_COOL_DOWN);
                endpoint.failures = 0;
                ejected = true;
            }
        });
        ejected
    }

    fn end(&mut self, update: impl FnOnce(&mut Endpoint)) {
        self.ended = true;
        if let Some(endpoint) = self.balancer.endpoints().get_mut(&self.address) {
            endpoint.in_flight = endpoint.in_flight.saturating_sub(1);
            update(endpoint);
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.end(|_| {});
        }
    }
}

#[cfg(test)]
mod tests;
