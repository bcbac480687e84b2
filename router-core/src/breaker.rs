//! A circuit breaker per handler: when a handler fails most of what it gets (its
//! database is down, every pod crashes), stop feeding it instead of spending every
//! message's attempts on it.
//!
//! ```text
//!   closed ──(consecutive_failures in a row, or failure_ratio of the window)──▶ open
//!     ▲                                                                        │ open_for
//!     └──(every probe succeeds)── half-open: `probes` attempts let through ◀───┘
//!                                  │ a probe fails: open again, open_for doubled (≤ max_open_for)
//! ```
//!
//! While the circuit is open (and while half-open, beyond the probes) attempts wait
//! in [`Breaker::admit`]; subscriptions routed to the handler take nothing new from
//! the broker ([`Breaker::wait_not_open`]). A failed attempt that arrives while the
//! circuit is not closed (the one that tripped it, one that was under way) does not
//! count against its message: the message waits for the circuit and is tried again
//! with the same attempt number (see the engine). A probe is a real attempt: when it
//! fails it counts. That keeps the circuit live when it opened on a run of bad
//! messages rather than a broken handler: failing probes use up the bad messages'
//! attempts, until a good message probes and closes it. Time is tokio's, so
//! paused-time tests drive it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::CircuitBreakerConfig;

/// State of a circuit, as the `router_circuit_state` gauge shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

#[derive(Debug)]
enum State {
    Closed,
    Open { until: Instant, period: Duration },
    HalfOpen { out: u32, passed: u32, period: Duration },
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Outcomes of the last `window` while closed: (when, failed).
    window: VecDeque<(Instant, bool)>,
    consecutive: u32,
    last_error: String,
}

/// What the breaker reports to: metrics and the health of the subscriptions routed to
/// its handler (the engine wires these).
pub trait Observer: Send + Sync {
    fn changed(&self, handler: &str, state: CircuitState, reason: &str);
}

pub struct Breaker {
    handler: String,
    config: CircuitBreakerConfig,
    inner: Mutex<Inner>,
    changed: Notify,
    observers: Mutex<Vec<Arc<dyn Observer>>>,
}

/// What an attempt turned out to be, for the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The handler answered (handled, or rejected the message as poison).
    Success,
    /// The handler failed (error, timeout, unreachable, busy).
    Failure,
    /// The attempt never reached the handler for a reason of the message's own.
    Neutral,
}

/// Leave to make one attempt. A probe's slot is given back if it is dropped without
/// a verdict (the attempt was abandoned at shutdown).
pub struct Admission {
    breaker: Arc<Breaker>,
    probe: bool,
    recorded: bool,
}

impl Admission {
    /// Record how the attempt went. Returns true when a failed attempt must not count
    /// against its message: it was not a probe and the circuit is not closed after it.
    pub fn record(mut self, verdict: Verdict, error: &str) -> bool {
        self.recorded = true;
        self.breaker.record(self.probe, verdict, error)
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            self.breaker.give_back_probe();
        }
    }
}

impl Breaker {
    pub fn new(handler: &str, config: CircuitBreakerConfig) -> Arc<Self> {
        Arc::new(Breaker {
            handler: handler.to_string(),
            config,
            inner: Mutex::new(Inner {
                state: State::Closed,
                window: VecDeque::new(),
                consecutive: 0,
                last_error: String::new(),
            }),
            changed: Notify::new(),
            observers: Mutex::new(Vec::new()),
        })
    }

    pub fn observe(&self, observer: Arc<dyn Observer>) {
        self.observers.lock().push(observer);
    }

    pub fn state(&self) -> CircuitState {
        match self.inner.lock().state {
            State::Closed => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Whether the subscriptions routed to this handler must take nothing new.
    pub fn is_open(&self) -> bool {
        self.config.enabled && matches!(self.inner.lock().state, State::Open { .. })
    }

    /// Wait for leave to make an attempt: at once while closed; while open, until it
    /// turns half-open and a probe slot is free. `None` when `cancel` fires first.
    pub async fn admit(self: &Arc<Self>, cancel: &CancellationToken) -> Option<Admission> {
        if !self.config.enabled {
            return Some(Admission { breaker: self.clone(), probe: false, recorded: false });
        }
        loop {
            let changed = self.changed.notified();
            let wait_until = {
                let mut inner = self.inner.lock();
                self.expire(&mut inner);
                match &mut inner.state {
                    State::Closed => return Some(Admission { breaker: self.clone(), probe: false, recorded: false }),
                    State::HalfOpen { out, .. } if *out < self.config.probes => {
                        *out += 1;
                        return Some(Admission { breaker: self.clone(), probe: true, recorded: false });
                    }
                    State::HalfOpen { .. } => None,
                    State::Open { until, .. } => Some(*until),
                }
            };
            let sleep = async {
                match wait_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = changed => {}
                _ = sleep => {}
            }
        }
    }

    /// Wait while the circuit is open (not while half-open: probes must be able to
    /// come from new messages). False when `cancel` fires first.
    pub async fn wait_not_open(&self, cancel: &CancellationToken) -> bool {
        if !self.config.enabled {
            return true;
        }
        loop {
            let changed = self.changed.notified();
            let until = {
                let mut inner = self.inner.lock();
                self.expire(&mut inner);
                match inner.state {
                    State::Open { until, .. } => until,
                    _ => return true,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = changed => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// A future that completes at the next state change (for callers that poll
    /// [`Breaker::is_open`] and must not block).
    pub async fn changed(&self) {
        let until = match self.inner.lock().state {
            State::Open { until, .. } => Some(until),
            _ => None,
        };
        let changed = self.changed.notified();
        match until {
            Some(t) => {
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep_until(t) => {}
                }
            }
            None => changed.await,
        }
    }

    /// Open → half-open once the open period is over.
    fn expire(&self, inner: &mut Inner) {
        if let State::Open { until, period } = inner.state {
            if Instant::now() >= until {
                inner.state = State::HalfOpen { out: 0, passed: 0, period };
                info!(handler = %self.handler, "circuit half-open: probing the handler");
                self.notify(CircuitState::HalfOpen, "probing");
            }
        }
    }

    fn record(&self, probe: bool, verdict: Verdict, error: &str) -> bool {
        if !self.config.enabled {
            return false;
        }
        let now = Instant::now();
        let mut inner = self.inner.lock();
        self.expire(&mut inner);
        let failed = verdict == Verdict::Failure;
        if failed {
            inner.last_error = error.chars().take(300).collect();
        }
        match (&mut inner.state, probe) {
            (State::Closed, _) => {
                if verdict == Verdict::Neutral {
                    return false;
                }
                inner.consecutive = if failed { inner.consecutive + 1 } else { 0 };
                inner.window.push_back((now, failed));
                let horizon = self.config.window;
                while inner.window.front().is_some_and(|(t, _)| now.duration_since(*t) > horizon) {
                    inner.window.pop_front();
                }
                // Only a failure can open the circuit.
                if let Some(why) = failed.then(|| self.trips(&inner)).flatten() {
                    let period = self.config.open_for;
                    inner.state = State::Open { until: now + period, period };
                    inner.window.clear();
                    inner.consecutive = 0;
                    let reason = format!("{why}; last error: {}", inner.last_error);
                    warn!(handler = %self.handler, reason = %reason, open_for = ?period, "circuit open: the subscriptions routed to this handler take nothing new until a probe succeeds");
                    self.notify(CircuitState::Open, &reason);
                    return true;
                }
                false
            }
            (State::HalfOpen { out, passed, period }, true) => {
                *out = out.saturating_sub(1);
                match verdict {
                    Verdict::Failure => {
                        let period = (*period * 2).min(self.config.max_open_for);
                        inner.state = State::Open { until: now + period, period };
                        let reason = format!("a probe failed: {}", inner.last_error);
                        warn!(handler = %self.handler, reason = %reason, open_for = ?period, "circuit open again");
                        self.notify(CircuitState::Open, &reason);
                        // A probe's failure counts against its message (see the module doc).
                        false
                    }
                    Verdict::Success => {
                        *passed += 1;
                        if *passed >= self.config.probes {
                            inner.state = State::Closed;
                            info!(handler = %self.handler, "circuit closed: the handler answers again");
                            self.notify(CircuitState::Closed, "");
                            return false;
                        }
                        true
                    }
                    Verdict::Neutral => true,
                }
            }
            // An attempt admitted before the circuit opened, finishing late: the
            // circuit already knows; only report that it is not closed.
            (State::HalfOpen { .. } | State::Open { .. }, _) => true,
        }
    }

    /// Why the closed circuit must open now, if it must.
    fn trips(&self, inner: &Inner) -> Option<String> {
        let c = &self.config;
        if c.consecutive_failures > 0 && inner.consecutive >= c.consecutive_failures {
            return Some(format!("{} attempts in a row failed", inner.consecutive));
        }
        let total = inner.window.len() as u32;
        let failed = inner.window.iter().filter(|(_, f)| *f).count() as u32;
        if c.failure_ratio > 0.0
            && total >= c.min_attempts.max(1)
            && f64::from(failed) >= c.failure_ratio * f64::from(total)
        {
            return Some(format!("{failed} of the last {total} attempts failed within {:?}", c.window));
        }
        None
    }

    fn give_back_probe(&self) {
        let mut inner = self.inner.lock();
        if let State::HalfOpen { out, .. } = &mut inner.state {
            *out = out.saturating_sub(1);
        }
        drop(inner);
        self.changed.notify_waiters();
    }

    fn notify(&self, state: CircuitState, reason: &str) {
        self.changed.notify_waiters();
        for o in self.observers.lock().iter() {
            o.changed(&self.handler, state, reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            enabled: true,
            consecutive_failures: 3,
            failure_ratio: 0.5,
            min_attempts: 6,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(15),
            probes: 2,
        }
    }

    async fn attempt(b: &Arc<Breaker>, verdict: Verdict) -> bool {
        let a = b.admit(&CancellationToken::new()).await.expect("admitted");
        a.record(verdict, "HTTP 500")
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_probes_its_way_back() {
        let b = Breaker::new("php", config());
        assert!(!attempt(&b, Verdict::Failure).await);
        assert!(!attempt(&b, Verdict::Failure).await);
        assert!(attempt(&b, Verdict::Failure).await, "the third failure in a row trips it");
        assert_eq!(b.state(), CircuitState::Open);
        assert!(b.is_open());

        // Nothing is admitted for open_for.
        let started = Instant::now();
        let first = b.admit(&CancellationToken::new()).await.expect("probe");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(!b.is_open(), "half-open: subscriptions may take messages again (probes come from them)");
        let second = b.admit(&CancellationToken::new()).await.expect("second probe");
        // Both probes are out: a third attempt waits.
        let third = tokio::time::timeout(Duration::from_secs(60), b.admit(&CancellationToken::new())).await;
        assert!(third.is_err(), "no third probe while two are out");

        // A failed probe opens it again for twice as long, and counts against its message.
        assert!(!first.record(Verdict::Failure, "still down"));
        drop(second); // abandoned: its slot comes back
        assert_eq!(b.state(), CircuitState::Open);
        let reopened = Instant::now();
        let p1 = b.admit(&CancellationToken::new()).await.expect("probe");
        assert_eq!(reopened.elapsed(), Duration::from_secs(10));
        let p2 = b.admit(&CancellationToken::new()).await.expect("probe");
        assert!(p1.record(Verdict::Success, ""), "one of two probes passed: still half-open");
        assert!(!p2.record(Verdict::Success, ""), "both passed: closed");
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn open_period_doubles_up_to_the_max() {
        let b = Breaker::new("php", CircuitBreakerConfig { probes: 1, ..config() });
        for _ in 0..3 {
            attempt(&b, Verdict::Failure).await;
        }
        let mut waits = Vec::new();
        for _ in 0..4 {
            let t = Instant::now();
            let p = b.admit(&CancellationToken::new()).await.expect("probe");
            waits.push(t.elapsed().as_secs());
            p.record(Verdict::Failure, "down");
        }
        assert_eq!(waits, [5, 10, 15, 15]);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_the_failure_ratio_of_the_window_only() {
        let b = Breaker::new("php", CircuitBreakerConfig { consecutive_failures: 0, ..config() });
        // Alternating: never 3 in a row, but half fail; trips once 6 are seen.
        let mut open = false;
        for i in 0..6 {
            let v = if i % 2 == 0 { Verdict::Failure } else { Verdict::Success };
            open = attempt(&b, v).await;
            assert_eq!(open, i == 5 && v == Verdict::Failure, "attempt {i}");
        }
        assert!(!open, "the 6th was a success");
        assert_eq!(b.state(), CircuitState::Closed, "3 of 6 failed, but the last one succeeded");
        assert!(attempt(&b, Verdict::Failure).await, "4 of 7 failed: open");

        // Old outcomes leave the window: spread failures never trip it.
        let b = Breaker::new("php", CircuitBreakerConfig { consecutive_failures: 0, ..config() });
        for _ in 0..20 {
            assert!(!attempt(&b, Verdict::Failure).await);
            tokio::time::advance(Duration::from_secs(11)).await;
            for _ in 0..5 {
                attempt(&b, Verdict::Success).await;
            }
        }
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn rejections_and_neutral_attempts_are_not_failures() {
        let b = Breaker::new("php", config());
        for _ in 0..10 {
            assert!(!attempt(&b, Verdict::Success).await);
            assert!(!attempt(&b, Verdict::Neutral).await);
        }
        attempt(&b, Verdict::Failure).await;
        attempt(&b, Verdict::Neutral).await;
        attempt(&b, Verdict::Failure).await;
        assert_eq!(b.state(), CircuitState::Closed, "a neutral attempt neither trips nor resets");
        assert!(attempt(&b, Verdict::Failure).await);
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_never_opens_and_cancel_ends_the_wait() {
        let b = Breaker::new("php", CircuitBreakerConfig { enabled: false, ..config() });
        for _ in 0..50 {
            assert!(!attempt(&b, Verdict::Failure).await, "a failure is counted against its message");
        }
        assert!(!b.is_open());
        assert!(b.admit(&CancellationToken::new()).await.is_some());

        let b = Breaker::new("php", config());
        for _ in 0..3 {
            attempt(&b, Verdict::Failure).await;
        }
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(b.admit(&cancel).await.is_none());
        assert!(!b.wait_not_open(&cancel).await);
        assert!(b.wait_not_open(&CancellationToken::new()).await, "open_for passes: half-open");
    }
}
