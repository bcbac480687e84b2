//! The one backoff of the router: reconnecting a consumer, restarting one that died,
//! retrying a settlement or an ack the broker refused, cooling down an unreachable
//! endpoint. Exponential (factor 2) with jitter, from `min` up to `max`, never giving
//! up; built on `backon`, whose [`ExponentialBackoff`] is an iterator of delays that
//! the caller sleeps on (so paused tokio time drives it in tests).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

pub use backon::ExponentialBackoff;

/// Delays from about `min`, doubling, capped near `max` (jitter adds up to one more
/// step's worth, never beyond `2 × max`), forever.
pub fn exponential(min: Duration, max: Duration) -> Backoff {
    let inner = ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build();
    Backoff { inner, max }
}

/// An endless iterator of delays (see [`exponential`]).
#[derive(Debug)]
pub struct Backoff {
    inner: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        // `without_max_times` never ends the iterator; the fallback is belt and braces.
        self.inner.next().unwrap_or(self.max)
    }
}

/// Reconnecting a consumer after a broker failure, and restarting a consumer that
/// ended: from 100 ms up to the transport's `reconnect_max_delay`.
pub fn reconnect(max: Duration) -> Backoff {
    exponential(Duration::from_millis(100), max.max(Duration::from_millis(100)))
}

/// Retrying a settlement (a dead-letter or retry write, an ack) that the broker
/// refused: from 100 ms up to 30 s.
pub fn settle() -> Backoff {
    exponential(Duration::from_millis(100), Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_from_min_to_max_and_never_ends() {
        let mut b = exponential(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..40).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] < Duration::from_millis(200), "{delays:?}");
        assert!(delays[3] >= Duration::from_millis(800), "doubles: {delays:?}");
        for d in &delays {
            assert!(*d <= Duration::from_secs(4), "capped (jitter at most one more max): {d:?}");
        }
        assert!(delays[39] >= Duration::from_secs(2), "still going after 40: {delays:?}");
    }
}
