//! How many deliveries may be in flight to one handler at once: a fixed number, or
//! one found and followed while the router runs (`max_in_flight: auto`).
//!
//! A fixed limit is a semaphore. The adaptive one is the same semaphore with a
//! controller that resizes it, after Vector's adaptive request concurrency
//! (`src/sinks/util/adaptive_concurrency/controller.rs`): AIMD on the round-trip time
//! (RTT) of the attempts, in windows of at least `limit` and at least [`MIN_WINDOW`]
//! attempts, starting at 1.
//!
//! - A window's RTT level (the mean of its fastest 7/8) is compared with the
//!   handler's uncrowded level: the lowest one seen (`floor`, as TCP Vegas and BBR
//!   keep the minimum RTT). Above it by more than [`SLACK`] plus [`DEVIATION_SCALE`]
//!   standard errors of the floor's window (latency is climbing: requests queue at
//!   the handler), or with a failed attempt in the window (429, 503, a timeout, a
//!   refused connection): the limit shrinks to [`DECREASE_RATIO`] of itself, not
//!   below 1.
//! - Otherwise, when the limit was used in full (more would have been sent): it grows
//!   by one, up to `max`.
//! - A handler that gets faster lowers the floor at once. One that gets slower keeps
//!   counting as climbing, and the limit comes down to 1, where nothing queues: a
//!   window at 1 sets the floor, and the limit grows again from there. (Guessing
//!   "slower, not more crowded" from a cut that did not lower the RTT was tried: on a
//!   busy machine one noisy window raised the floor to a crowded latency for good.)
//!
//! Why not Vector's reference, an exponentially weighted mean of the window means
//! and its deviation: the mean follows the latency up as the limit grows, and the
//! steps (1/limit of the RTT each, above the handler's knee) come within its
//! deviation: in simulation a handler with 16 workers got a limit of 50–86. After a
//! jump in latency its deviation is so wide that nothing counts as climbing, so the
//! limit stays where the handler lost capacity. The floor does not move with the
//! queueing. Nor is the noise measured in the window at hand: once requests queue,
//! its RTTs split in two (served at once, or after a whole service time: `php -S` at
//! 20 ms answered in 21 or 41 ms), and that spread hid the climb; the noise of the
//! uncrowded window that set the floor does not. The slowest eighth of a window is
//! left out: on a busy machine a request now and then waits for a core.
//!
//! The hot path: [`Limiter::acquire`] is a semaphore acquire plus, when adaptive, a
//! clock read, a relaxed load and now and then a relaxed store; the release
//! ([`Permit::done`]) takes a mutex for a push onto the window's vector (a window's
//! end also sorts out its slowest eighth, O(window)). A fixed limit does neither.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::IntGauge;
use serde::de::{self, Deserializer, MapAccess, Unexpected, Visitor};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Standard errors (of the floor's window) above the floor that count as latency
/// climbing (Vector's `rtt_deviation_scale`).
pub const DEVIATION_SCALE: f64 = 2.5;
/// Share of the floor a window's RTT may exceed it by (beyond the noise) before it
/// counts as climbing: a busier handler is a little slower without queueing.
pub const SLACK: f64 = 0.05;
/// What a decrease leaves of the limit (Vector's `decrease_ratio`).
pub const DECREASE_RATIO: f64 = 0.9;
/// Fewest attempts in a window: a mean of fewer is noise.
pub const MIN_WINDOW: usize = 8;
/// `max` of `max_in_flight: auto` when it is not given.
pub const DEFAULT_AUTO_MAX: usize = 256;

/// `handlers.<name>.max_in_flight`: `64`, `auto` or `{ auto: { max: 32 } }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxInFlight {
    /// At most this many, always.
    Fixed(usize),
    /// Found while running, between 1 and `max`.
    Auto { max: usize },
}

impl MaxInFlight {
    /// The most that can ever be in flight (what a connection pool is sized for).
    pub fn most(&self) -> usize {
        match *self {
            MaxInFlight::Fixed(n) | MaxInFlight::Auto { max: n } => n,
        }
    }
}

impl Default for MaxInFlight {
    fn default() -> Self {
        MaxInFlight::Fixed(64)
    }
}

impl fmt::Display for MaxInFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxInFlight::Fixed(n) => write!(f, "{n}"),
            MaxInFlight::Auto { max } => write!(f, "auto (max {max})"),
        }
    }
}

/// The `auto:` mapping.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AutoSection {
    #[serde(default = "default_auto_max")]
    max: usize,
}

fn default_auto_max() -> usize {
    DEFAULT_AUTO_MAX
}

impl<'de> Deserialize<'de> for MaxInFlight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Form;
        impl<'de> Visitor<'de> for Form {
            type Value = MaxInFlight;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of deliveries (64), `auto`, or `{ auto: { max: 256 } }`")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MaxInFlight, E> {
                usize::try_from(v).map(MaxInFlight::Fixed).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MaxInFlight, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
                }
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaxInFlight, E> {
                match v {
                    "auto" => Ok(MaxInFlight::Auto { max: DEFAULT_AUTO_MAX }),
                    _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MaxInFlight, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::invalid_length(0, &self));
                };
                if key != "auto" {
                    return Err(de::Error::unknown_field(&key, &["auto"]));
                }
                // `auto:` with nothing after it is `auto` with its defaults.
                let section = map.next_value::<Option<AutoSection>>()?;
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::unknown_field(&extra, &["auto"]));
                }
                Ok(MaxInFlight::Auto { max: section.map_or(DEFAULT_AUTO_MAX, |s| s.max) })
            }
        }
        d.deserialize_any(Form)
    }
}

/// What an attempt said about the handler's load, for [`Permit::done`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feedback {
    /// The handler answered (ack or rejection): its RTT counts.
    Answered,
    /// The attempt failed (429, 503, other 5xx, a timeout, no connection): the
    /// handler or the way to it is overloaded or down; the limit shrinks.
    BackPressure,
    /// Nothing reached the handler: no information.
    NotSent,
}

/// The in-flight limit of one handler, shared by every subscription routed to it.
#[derive(Clone)]
pub struct Limiter {
    slots: Arc<Semaphore>,
    /// The size of a fixed limit.
    fixed: usize,
    /// `None`: a fixed limit.
    adaptive: Option<Arc<Adaptive>>,
}

/// A slot of a [`Limiter`]: one attempt in flight. Dropped without [`Permit::done`]
/// (shutdown cut the attempt short) it gives the slot back and reports nothing.
pub struct Permit {
    slot: Option<OwnedSemaphorePermit>,
    /// Set when adaptive: its controller, when the attempt started, and the limit's
    /// generation then.
    timed: Option<(Arc<Adaptive>, Instant, u64)>,
}

impl Limiter {
    /// A limiter for `limit`; `gauge` (`router_handler_concurrency_limit`) shows the
    /// current limit.
    pub fn new(limit: MaxInFlight, gauge: Option<IntGauge>) -> Self {
        // Above the semaphore's own bound it would panic; nobody can use that many.
        let clamp = |n: usize| n.clamp(1, Semaphore::MAX_PERMITS);
        match limit {
            MaxInFlight::Fixed(n) => {
                let n = clamp(n);
                if let Some(g) = &gauge {
                    g.set(i64::try_from(n).unwrap_or(i64::MAX));
                }
                Limiter { slots: Arc::new(Semaphore::new(n)), fixed: n, adaptive: None }
            }
            MaxInFlight::Auto { max } => {
                let slots = Arc::new(Semaphore::new(1));
                let adaptive = Arc::new(Adaptive {
                    max: clamp(max),
                    slots: slots.clone(),
                    owed: AtomicUsize::new(0),
                    reached: AtomicBool::new(false),
                    generation: AtomicU64::new(0),
                    window: Mutex::new(Window { limit: 1, ..Window::default() }),
                    gauge,
                });
                adaptive.show(1);
                Limiter { slots, fixed: 0, adaptive: Some(adaptive) }
            }
        }
    }

    /// Wait for a slot. `None` only if the semaphore was closed, which nothing does.
    pub async fn acquire(&self) -> Option<Permit> {
        let slot = self.slots.clone().acquire_owned().await.ok()?;
        let timed = self.adaptive.as_ref().map(|a| {
            // Every slot taken: demand reached the limit, so a larger one may be used.
            if self.slots.available_permits() == 0 {
                a.reached.store(true, Ordering::Relaxed);
            }
            (a.clone(), Instant::now(), a.generation.load(Ordering::Relaxed))
        });
        Some(Permit { slot: Some(slot), timed })
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        match &self.adaptive {
            Some(a) => a.window.lock().limit,
            None => self.fixed,
        }
    }
}

impl Permit {
    /// The attempt ended: give the slot back and, when adaptive, report its RTT.
    pub fn done(mut self, feedback: Feedback) {
        if let Some((adaptive, started, generation)) = &self.timed {
            adaptive.record(started.elapsed().as_secs_f64(), *generation, feedback);
        }
        self.release();
    }

    fn release(&mut self) {
        let Some(slot) = self.slot.take() else { return };
        if let Some((adaptive, _, _)) = &self.timed {
            // A decrease that found this slot out takes it now.
            if adaptive.owed.load(Ordering::Relaxed) > 0
                && adaptive.owed.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |o| o.checked_sub(1)).is_ok()
            {
                slot.forget();
                return;
            }
        }
        drop(slot);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.release();
    }
}

/// The controller of an adaptive limit.
struct Adaptive {
    max: usize,
    slots: Arc<Semaphore>,
    /// Slots a decrease could not take because they were in flight: taken back as
    /// they are released (the semaphore cannot forget permits that are out).
    owed: AtomicUsize,
    /// Whether the limit was used in full during this window.
    reached: AtomicBool,
    /// Bumped by every change of the limit: an attempt started before it tells
    /// nothing about the new limit (after a cut, the first answers are still those of
    /// the crowd before it).
    generation: AtomicU64,
    window: Mutex<Window>,
    gauge: Option<IntGauge>,
}

#[derive(Default)]
struct Window {
    limit: usize,
    /// Attempts in this window, and the RTTs (seconds) of those answered (kept to
    /// leave the slowest out; the vector is reused from window to window).
    attempts: usize,
    rtts: Vec<f64>,
    back_pressure: bool,
    /// The lowest window level: the uncrowded handler's RTT, and its standard error
    /// then (the noise of an uncrowded window).
    floor: Option<(f64, f64)>,
}

impl Adaptive {
    fn record(&self, rtt: f64, generation: u64, feedback: Feedback) {
        if generation != self.generation.load(Ordering::Relaxed) {
            return;
        }
        let mut w = self.window.lock();
        match feedback {
            Feedback::Answered => {
                w.rtts.push(rtt);
            }
            Feedback::BackPressure => w.back_pressure = true,
            Feedback::NotSent => return,
        }
        w.attempts += 1;
        if w.attempts < w.limit.max(MIN_WINDOW) {
            return;
        }
        let reached = self.reached.swap(false, Ordering::Relaxed);
        let before = w.limit;
        let after = next_limit(&mut w, reached, self.max);
        w.attempts = 0;
        w.rtts.clear();
        w.back_pressure = false;
        if after != before {
            // Under the lock: no answer of the old generation lands in the new window.
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        drop(w);
        if after > before {
            self.grow(after - before);
        } else if after < before {
            self.shrink(before - after);
        }
        if after != before {
            self.show(after);
        }
    }

    fn grow(&self, by: usize) {
        // Slots still owed from a decrease are cancelled before new ones are made.
        let mut left = by;
        while left > 0 {
            match self.owed.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |o| o.checked_sub(1)) {
                Ok(_) => left -= 1,
                Err(_) => break,
            }
        }
        if left > 0 {
            self.slots.add_permits(left);
        }
    }

    fn shrink(&self, by: usize) {
        let taken = self.slots.forget_permits(by);
        if taken < by {
            self.owed.fetch_add(by - taken, Ordering::AcqRel);
        }
    }

    fn show(&self, limit: usize) {
        if let Some(g) = &self.gauge {
            g.set(i64::try_from(limit).unwrap_or(i64::MAX));
        }
    }
}

/// A window's RTT level: the mean of its fastest 7/8 (the slowest eighth is left
/// out: a request that waited for a busy core, once in a while), and that mean's
/// standard error. Reorders `rtts`.
fn level(rtts: &mut [f64]) -> Option<(f64, f64)> {
    if rtts.is_empty() {
        return None;
    }
    let kept = rtts.len() - rtts.len() / 8;
    if kept < rtts.len() {
        rtts.select_nth_unstable_by(kept, f64::total_cmp);
    }
    let fastest = &rtts[..kept];
    let n = kept as f64;
    let mean = fastest.iter().sum::<f64>() / n;
    let variance = fastest.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / n;
    Some((mean, (variance / n).sqrt()))
}

/// The AIMD step at the end of window `w`: the new limit. Keeps the floor up to date.
fn next_limit(w: &mut Window, reached: bool, max: usize) -> usize {
    let limit = w.limit;
    let cut = ((limit as f64 * DECREASE_RATIO) as usize).max(1);
    let Some((m, error)) = level(&mut w.rtts) else {
        // Only failures: nothing to learn about latency.
        w.limit = if w.back_pressure { cut } else { limit };
        return w.limit;
    };
    let (floor, noise) = *w.floor.get_or_insert((m, error));
    let climbing = m > floor * (1.0 + SLACK) + DEVIATION_SCALE * noise;
    let new = if w.back_pressure {
        cut
    } else if climbing && limit == 1 {
        // One at a time nothing queues: this is the handler's uncrowded latency,
        // higher than the floor because the handler itself got slower.
        w.floor = Some((m, error));
        limit
    } else if climbing {
        cut
    } else if reached {
        (limit + 1).min(max)
    } else {
        limit
    };
    if m < floor {
        w.floor = Some((m, error));
    }
    tracing::debug!(
        limit,
        new,
        rtt_ms = m * 1e3,
        error_ms = error * 1e3,
        floor_ms = floor * 1e3,
        floor_error_ms = noise * 1e3,
        climbing,
        reached,
        back_pressure = w.back_pressure,
        "concurrency window"
    );
    w.limit = new;
    new
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A handler with `workers` that each take `service` (±10 %) per request; requests
    /// beyond the workers queue. `set` changes both mid-run, as a handler that slows
    /// down or gets more instances would. Paused time moves in whole milliseconds:
    /// service times are tens of them, so that rounding is not a step in latency.
    struct Server {
        shape: Mutex<(Arc<Semaphore>, Duration)>,
    }

    impl Server {
        fn new(workers: usize, service: Duration) -> Arc<Self> {
            Arc::new(Server { shape: Mutex::new((Arc::new(Semaphore::new(workers)), service)) })
        }

        fn set(&self, workers: usize, service: Duration) {
            *self.shape.lock() = (Arc::new(Semaphore::new(workers)), service);
        }

        async fn serve(&self, rng: &mut fastrand::Rng) {
            let (workers, service) = self.shape.lock().clone();
            let _worker = workers.acquire_owned().await;
            tokio::time::sleep(service.mul_f64(0.9 + 0.2 * rng.f64())).await;
        }
    }

    /// What a run saw: the most in flight at once, and the limit after each request.
    #[derive(Default)]
    struct Seen {
        in_flight: AtomicUsize,
        peak: AtomicUsize,
        limits: Mutex<Vec<usize>>,
    }

    /// `requests` requests from 300 clients (more than any limit here) through
    /// `limiter` to `server`.
    async fn drive(limiter: &Limiter, server: &Arc<Server>, requests: usize, seen: &Arc<Seen>) {
        let left = Arc::new(AtomicUsize::new(requests));
        let mut clients = Vec::new();
        for seed in 0..300 {
            let (limiter, server, left, seen) = (limiter.clone(), server.clone(), left.clone(), seen.clone());
            clients.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed);
                while left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
                    let permit = limiter.acquire().await.expect("never closed");
                    let now = seen.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                    seen.peak.fetch_max(now, Ordering::Relaxed);
                    server.serve(&mut rng).await;
                    seen.in_flight.fetch_sub(1, Ordering::Relaxed);
                    permit.done(Feedback::Answered);
                    seen.limits.lock().push(limiter.limit());
                }
            }));
        }
        for c in clients {
            c.await.expect("client");
        }
    }

    /// The limits of the last `share` of a run: where it settled.
    fn settled(seen: &Seen, share: f64) -> (usize, usize) {
        let limits = std::mem::take(&mut *seen.limits.lock());
        let tail = &limits[limits.len() - (limits.len() as f64 * share) as usize..];
        (tail.iter().copied().min().unwrap_or(0), tail.iter().copied().max().unwrap_or(0))
    }

    #[tokio::test(start_paused = true)]
    async fn finds_where_latency_climbs_follows_a_slowdown_and_recovers() {
        let gauge = IntGauge::new("limit", "limit").expect("gauge");
        let limiter = Limiter::new(MaxInFlight::Auto { max: 256 }, Some(gauge.clone()));
        assert_eq!((limiter.limit(), gauge.get()), (1, 1), "starts at 1");
        let server = Server::new(16, Duration::from_millis(40));
        let seen = Arc::new(Seen::default());

        drive(&limiter, &server, 20_000, &seen).await;
        let (low, high) = settled(&seen, 0.5);
        assert!((10..=24).contains(&low) && high <= 24, "16 workers: settled at {low}..={high}");

        // Half the workers, each twice as slow: the knee halves.
        server.set(8, Duration::from_millis(80));
        drive(&limiter, &server, 10_000, &seen).await;
        let (low, high) = settled(&seen, 0.5);
        assert!((6..=14).contains(&low) && high <= 14, "8 slower workers: settled at {low}..={high}");

        server.set(16, Duration::from_millis(40));
        drive(&limiter, &server, 20_000, &seen).await;
        let (low, high) = settled(&seen, 0.5);
        assert!((10..=24).contains(&low) && high <= 24, "16 workers again: settled at {low}..={high}");

        assert!(seen.peak.load(Ordering::Relaxed) <= 26, "never far above the knee");
        assert_eq!(gauge.get(), limiter.limit() as i64, "the gauge shows the limit");
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_that_never_slows_gets_max_and_never_more() {
        let limiter = Limiter::new(MaxInFlight::Auto { max: 24 }, None);
        // More workers than the max: latency never climbs.
        let server = Server::new(1000, Duration::from_millis(50));
        let seen = Arc::new(Seen::default());
        drive(&limiter, &server, 20_000, &seen).await;
        let limits = seen.limits.lock();
        assert_eq!(limits.iter().max(), Some(&24), "reached max");
        assert!(limits.iter().all(|l| (1..=24).contains(l)));
        let low = limits[limits.len() / 2..].iter().copied().min().unwrap_or(0);
        assert!(low >= 20, "stays near max in the second half, down to {low}");
        assert_eq!(seen.peak.load(Ordering::Relaxed), 24, "never above max");
    }

    #[tokio::test(start_paused = true)]
    async fn back_pressure_shrinks_the_limit_to_one_and_not_below() {
        let limiter = Limiter::new(MaxInFlight::Auto { max: 64 }, None);
        let server = Server::new(1000, Duration::from_millis(50));
        let seen = Arc::new(Seen::default());
        drive(&limiter, &server, 5_000, &seen).await;
        let grown = limiter.limit();
        assert!(grown > 16, "grew to {grown}");
        // Every attempt fails (429s, timeouts): shrink while slots are out.
        let mut out = Vec::new();
        for _ in 0..grown {
            out.push(limiter.acquire().await.expect("slot"));
        }
        for _ in 0..1000 {
            let permit = match out.pop() {
                Some(p) => p,
                None => limiter.acquire().await.expect("slot"),
            };
            permit.done(Feedback::BackPressure);
            assert!(limiter.limit() >= 1);
        }
        assert_eq!(limiter.limit(), 1);
        // The slots taken back while they were out are gone: one at a time now.
        let one = limiter.acquire().await.expect("slot");
        assert!(
            tokio::time::timeout(Duration::from_millis(10), limiter.acquire()).await.is_err(),
            "a second slot while the limit is 1"
        );
        drop(one);
        assert!(limiter.acquire().await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_limit_stays_what_it_is() {
        let gauge = IntGauge::new("limit", "limit").expect("gauge");
        let limiter = Limiter::new(MaxInFlight::Fixed(8), Some(gauge.clone()));
        let server = Server::new(2, Duration::from_millis(40));
        let seen = Arc::new(Seen::default());
        drive(&limiter, &server, 2_000, &seen).await;
        assert_eq!(seen.peak.load(Ordering::Relaxed), 8);
        assert!(seen.limits.lock().iter().all(|l| *l == 8));
        assert_eq!(gauge.get(), 8);
    }

    #[test]
    fn the_most_in_flight_is_the_fixed_value_or_the_auto_max() {
        assert_eq!(MaxInFlight::Fixed(16).most(), 16);
        assert_eq!(MaxInFlight::Auto { max: 32 }.most(), 32);
        assert_eq!(MaxInFlight::default(), MaxInFlight::Fixed(64));
    }
}
