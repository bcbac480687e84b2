//! Per-subscription message rates for the admin API and the status page: the core's
//! counters sampled once a second, rates over the last [`WINDOW`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use router_core::Metrics;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Rates are averaged over this long.
pub const WINDOW: Duration = Duration::from_secs(10);
const EVERY: Duration = Duration::from_secs(1);

/// How many messages of a subscription the router received and settled each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Counts<T> {
    pub received: T,
    pub acked: T,
    pub retried: T,
    pub dead_lettered: T,
}

type Totals = HashMap<String, Counts<u64>>;

pub struct Rates {
    metrics: Arc<Metrics>,
    samples: Mutex<VecDeque<(Instant, Totals)>>,
}

impl Rates {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Rates { metrics, samples: Mutex::new(VecDeque::new()) })
    }

    /// Sample every second until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = (Instant::now(), totals(&self.metrics));
            let mut samples = self.samples.lock();
            samples.push_back(now);
            while samples.front().is_some_and(|(t, _)| t.elapsed() > WINDOW) {
                samples.pop_front();
            }
        }
    }

    /// The totals of `subscription` now, and its rates per second over the window
    /// (zero until two samples are a moment apart).
    pub fn of(&self, subscription: &str) -> (Counts<u64>, Counts<f64>) {
        let now = totals(&self.metrics).remove(subscription).unwrap_or_default();
        let samples = self.samples.lock();
        let Some((at, then)) = samples.front() else { return (now, Counts::default()) };
        let secs = at.elapsed().as_secs_f64();
        if secs < 0.5 {
            return (now, Counts::default());
        }
        let then = then.get(subscription).copied().unwrap_or_default();
        let rate = |n: u64, t: u64| (n.saturating_sub(t) as f64 / secs * 10.0).round() / 10.0;
        let rates = Counts {
            received: rate(now.received, then.received),
            acked: rate(now.acked, then.acked),
            retried: rate(now.retried, then.retried),
            dead_lettered: rate(now.dead_lettered, then.dead_lettered),
        };
        (now, rates)
    }
}

/// Every subscription's totals, summed over routes and handlers.
fn totals(metrics: &Metrics) -> Totals {
    let mut out = Totals::new();
    let families = [
        ("router_messages_received_total", 0),
        ("router_messages_acked_total", 1),
        ("router_messages_retried_total", 2),
        ("router_messages_dead_lettered_total", 3),
    ];
    for family in metrics.registry.gather() {
        let Some(&(_, which)) = families.iter().find(|(n, _)| *n == family.name()) else { continue };
        for m in family.get_metric() {
            let Some(sub) = m.get_label().iter().find(|l| l.name() == "subscription") else { continue };
            let c = out.entry(sub.value().to_string()).or_default();
            let v = m.get_counter().get_value() as u64;
            match which {
                0 => c.received += v,
                1 => c.acked += v,
                2 => c.retried += v,
                _ => c.dead_lettered += v,
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rates_are_the_counters_over_the_window() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let rates = Rates::new(metrics.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(rates.clone().run(stop.clone()));
        tokio::time::sleep(Duration::from_millis(10)).await;
        metrics.received.with_label_values(&["s"]).inc_by(50);
        metrics.acked.with_label_values(&["s", "r1", "h"]).inc_by(30);
        metrics.acked.with_label_values(&["s", "r2", "h"]).inc_by(10);
        metrics.dead_lettered.with_label_values(&["s", "r1", "h"]).inc_by(5);
        metrics.received.with_label_values(&["other"]).inc_by(1000);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (totals, per_sec) = rates.of("s");
        assert_eq!(totals, Counts { received: 50, acked: 40, retried: 0, dead_lettered: 5 });
        assert_eq!(per_sec, Counts { received: 10.0, acked: 8.0, retried: 0.0, dead_lettered: 1.0 });
        // Once the window has passed with nothing new, the rates fall to zero.
        tokio::time::sleep(WINDOW + Duration::from_secs(2)).await;
        assert_eq!(rates.of("s").1, Counts::default());
        assert_eq!(rates.of("unknown").0, Counts::default());
        stop.cancel();
        task.await.expect("sampler");
    }
}
