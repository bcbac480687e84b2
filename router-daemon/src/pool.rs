//! A handler's endpoint pool, for every target that has endpoints (HTTP URLs, FastCGI
//! sockets): load balancing and passive health.
//!
//! An endpoint that refuses connections (or cannot be reached) is marked down for a
//! cool-down that doubles per consecutive failure (100 ms up to 10 s); while any
//! endpoint is up, down ones get no traffic. When all are down, the one whose cool-down
//! ends first is tried, so recovery is noticed without a separate health checker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use router_core::config::ConfigIssue;
use serde::Deserialize;

/// The checks of a target's `endpoints` list (at `{path}.endpoints`): not empty
/// (`empty` says what to list), and each accepted by `parse`, else reported as
/// `"<endpoint>" must be <expected> (<why parse refused it>)`.
pub fn check_endpoints(
    path: &str,
    endpoints: &[String],
    empty: &str,
    expected: &str,
    parse: impl Fn(&str) -> Result<(), String>,
) -> Vec<ConfigIssue> {
    let mut issues = Vec::new();
    if endpoints.is_empty() {
        issues.push(ConfigIssue::new(format!("{path}.endpoints"), empty));
    }
    for (i, endpoint) in endpoints.iter().enumerate() {
        if let Err(problem) = parse(endpoint) {
            issues.push(ConfigIssue::new(
                format!("{path}.endpoints[{i}]"),
                format!("{endpoint:?} must be {expected} ({problem})"),
            ));
        }
    }
    issues
}

/// An endpoint as metric labels, logs and the admin API show it: without the
/// credentials a URL may carry (`http://user:secret@host/` shows as `http://host/`).
pub fn endpoint_label(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(u) if !u.username().is_empty() || u.password().is_some() => {
            router_core::transport::display_url(endpoint, endpoint)
        }
        _ => endpoint.to_string(),
    }
}

/// `handlers.<name>.balance`: how a target picks among its endpoints.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Send to the endpoint with the fewest requests in flight.
    #[default]
    LeastOutstanding,
    RoundRobin,
}

pub struct Endpoint {
    pub url: reqwest::Url,
    /// The URL without credentials, for logs and errors ([`endpoint_label`]).
    pub label: String,
    outstanding: AtomicUsize,
    health: Mutex<Health>,
    pub up_gauge: prometheus::IntGauge,
}

#[derive(Default)]
struct Health {
    failures: u32,
    down_until: Option<Instant>,
}

/// Counts a request as outstanding on its endpoint while alive.
pub struct InFlight<'a>(&'a Endpoint);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Endpoint {
    pub fn new(url: reqwest::Url, up_gauge: prometheus::IntGauge) -> Self {
        up_gauge.set(1);
        Endpoint {
            label: endpoint_label(url.as_str()),
            url,
            outstanding: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
            up_gauge,
        }
    }

    pub fn start(&self) -> InFlight<'_> {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    fn down_until(&self, now: Instant) -> Option<Instant> {
        self.health.lock().down_until.filter(|t| *t > now)
    }

    pub fn mark_down(&self) {
        let mut h = self.health.lock();
        h.failures = h.failures.saturating_add(1);
        let cool = Duration::from_millis(100).saturating_mul(1u32 << h.failures.min(7)).min(Duration::from_secs(10));
        h.down_until = Some(Instant::now() + cool);
        self.up_gauge.set(0);
    }

    /// No connection could be made (nothing reached a handler): mark the endpoint
    /// down, log it, and return the error to report if no endpoint answers.
    pub fn unreachable(&self, handler: &str, what: &str, error: &dyn std::fmt::Display) -> String {
        self.mark_down();
        tracing::warn!(handler, endpoint = %self.label, error = %error, "{what} unreachable; trying another");
        format!("{}: cannot connect: {error}", self.label)
    }

    pub fn mark_up(&self) {
        let mut h = self.health.lock();
        if h.failures > 0 || h.down_until.is_some() {
            *h = Health::default();
            self.up_gauge.set(1);
        }
    }
}

pub struct Pool {
    pub endpoints: Vec<Endpoint>,
    balance: Balance,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(endpoints: Vec<Endpoint>, balance: Balance) -> Self {
        Pool { endpoints, balance, next: AtomicUsize::new(0) }
    }

    /// The endpoint for the next request, skipping those in `tried`.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.endpoints.len();
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let candidates = (0..n).map(|i| (start + i) % n).filter(|i| !tried.contains(i));
        let up: Vec<usize> = candidates.clone().filter(|&i| self.endpoints[i].down_until(now).is_none()).collect();
        if up.is_empty() {
            // All down: probe the one that comes back first.
            return candidates.min_by_key(|&i| self.endpoints[i].down_until(now));
        }
        match self.balance {
            Balance::RoundRobin => up.first().copied(),
            // Rotating the start spreads ties evenly.
            Balance::LeastOutstanding => {
                up.into_iter().min_by_key(|&i| self.endpoints[i].outstanding.load(Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize, balance: Balance) -> Pool {
        let eps = (0..n)
            .map(|i| {
                let url = reqwest::Url::parse(&format!("http://127.0.0.1:{}/", 9000 + i)).expect("url");
                Endpoint::new(url, prometheus::IntGauge::new(format!("g{i}"), "h").expect("gauge"))
            })
            .collect();
        Pool::new(eps, balance)
    }

    #[test]
    fn round_robin_rotates_and_skips_down_endpoints() {
        let p = pool(3, Balance::RoundRobin);
        let picks: Vec<_> = (0..6).filter_map(|_| p.pick(&[])).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        p.endpoints[1].mark_down();
        let picks: Vec<_> = (0..6).filter_map(|_| p.pick(&[])).collect();
        assert!(!picks.contains(&1), "{picks:?}");
        p.endpoints[1].mark_up();
        assert!((0..6).filter_map(|_| p.pick(&[])).any(|i| i == 1));
    }

    #[test]
    fn least_outstanding_prefers_idle_endpoint() {
        let p = pool(2, Balance::LeastOutstanding);
        let _busy = p.endpoints[0].start();
        assert!((0..4).all(|_| p.pick(&[]) == Some(1)));
        assert_eq!(p.pick(&[1]), Some(0), "tried endpoints are skipped");
        assert_eq!(p.pick(&[0, 1]), None);
    }

    #[test]
    fn all_down_probes_the_earliest_recovery() {
        let p = pool(2, Balance::LeastOutstanding);
        p.endpoints[0].mark_down();
        p.endpoints[0].mark_down(); // longer cool-down
        p.endpoints[1].mark_down();
        assert_eq!(p.pick(&[]), Some(1));
    }
}
