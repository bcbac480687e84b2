//! Latency at a fixed rate: open-loop pacing, the direct HTTP client (the handler
//! alone), the stamps `bench/handlers/stamp.php` logs, percentiles.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::FutureExt;
use reqwest::header::HeaderMap;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::http::add;
use crate::now_ns;
use crate::wrk::body;

/// The message header that carries the send time (wall clock, unix ns); it reaches the
/// handler as `x-message-header-sent-ns`, which stamp.php reads.
pub const SENT_NS: &str = "sent-ns";

/// What a paced run sent.
pub struct Paced {
    pub start_ns: u64,
    pub sent: u64,
    pub errors: u64,
    /// The rate actually achieved.
    pub rate: f64,
}

/// Post to the handler at `rate` for `secs`, open loop: every request is scheduled on
/// time, and waits for one of `concurrency` slots like the router's max_in_flight.
/// `base`: the headers the router would send.
pub async fn direct_http(url: &str, base: &HeaderMap, rate: f64, secs: u64, concurrency: u32) -> Result<Paced> {
    let client = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(30)).build()?;
    let slots = Arc::new(Semaphore::new(concurrency as usize));
    let mut tasks = JoinSet::new();
    let mut errors = 0;
    let start_ns = now_ns();
    let mut pacer = Pacer::new(rate, secs);
    let mut sent = 0u64;
    while let Some(due) = pacer.due().await {
        for _ in 0..due {
            let i = sent;
            sent += 1;
            let (client, slots, url) = (client.clone(), slots.clone(), url.to_string());
            let mut headers = base.clone();
            add(&mut headers, &format!("x-message-header-{SENT_NS}"), &now_ns().to_string())?;
            add(&mut headers, "ce-id", &format!("direct-{i}"))?;
            tasks.spawn(async move {
                let _slot = slots.acquire_owned().await;
                match client.post(&url).headers(headers).body(body(i)).send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                }
            });
        }
        // Reap finished requests as we go (the JoinSet would otherwise keep them).
        while let Some(Some(res)) = tasks.join_next().now_or_never() {
            if !matches!(res, Ok(true)) {
                errors += 1;
            }
        }
    }
    let elapsed = (now_ns() - start_ns) as f64 / 1e9;
    while let Some(res) = tasks.join_next().await {
        if !matches!(res, Ok(true)) {
            errors += 1;
        }
    }
    Ok(Paced { start_ns, sent, errors, rate: sent as f64 / elapsed })
}

/// Open-loop pacing: after t seconds, rate × t sends are due.
pub struct Pacer {
    start: Instant,
    start_ns: u64,
    total: Duration,
    rate: f64,
    tick: tokio::time::Interval,
    done: u64,
}

impl Pacer {
    pub fn new(rate: f64, secs: u64) -> Self {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Pacer { start: Instant::now(), start_ns: now_ns(), total: Duration::from_secs(secs), rate, tick, done: 0 }
    }

    /// Wait for the next millisecond tick; how many sends are due now, None when over.
    pub async fn due(&mut self) -> Option<u64> {
        self.tick.tick().await;
        let elapsed = self.start.elapsed();
        if elapsed >= self.total {
            return None;
        }
        let due = (elapsed.as_secs_f64() * self.rate) as u64;
        let n = due.saturating_sub(self.done);
        self.done = self.done.max(due);
        Some(n)
    }

    /// What was sent so far (`sent` sends since the pacer started).
    pub fn paced(&self, sent: u64) -> Paced {
        let elapsed = (now_ns() - self.start_ns) as f64 / 1e9;
        Paced { start_ns: self.start_ns, sent, errors: 0, rate: sent as f64 / elapsed }
    }
}

/// Latencies (ns) logged by stamp.php for messages sent at least 1 s after `start_ns`
/// (the first second warms connections up); the log is moved to `keep`.
pub fn take_stamps(path: &Path, start_ns: u64, keep: &Path) -> Result<Vec<u64>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, "").with_context(|| format!("emptying {}", path.display()))?;
    // Raw "<sent_ns> <latency_ns>" lines, for looking at stalls over time.
    let _ = std::fs::write(keep, &text);
    let from = start_ns + 1_000_000_000;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (sent, lat) = l.split_once(' ')?;
            let (sent, lat) = (sent.parse::<u64>().ok()?, lat.trim().parse::<i64>().ok()?);
            (sent >= from).then_some(lat.max(0) as u64)
        })
        .collect())
}

pub struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(mut v: Vec<u64>) -> Stats {
        v.sort_unstable();
        let q = |q: f64| -> f64 {
            if v.is_empty() {
                return f64::NAN;
            }
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[rank - 1] as f64
        };
        Stats { n: v.len(), p50: q(0.5), p90: q(0.9), p99: q(0.99), p999: q(0.999), max: q(1.0) }
    }
}
