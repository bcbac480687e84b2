//! Reference drains: the rate of a consumer written for the bench from its first to
//! its N-th ack, with CPU and context switches over that window; and reference
//! consumers on a thread and runtime of their own, like a separate process.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::cpu::{ctx_switches, CpuReader, CpuSample, CpuUsage, Watched};

/// A reference drain by this process.
pub struct RefDrain {
    pub rps: f64,
    pub secs: f64,
    pub cpu: CpuUsage,
    /// Context switches of this process per message.
    pub switches: f64,
}

/// Times a drain of `n` messages: fed the running total of acks, it samples CPU at
/// the first ack and at the N-th.
pub struct DrainMeter<'a> {
    cpu: &'a CpuReader,
    watched: Vec<Watched>,
    n: u64,
    deadline: Instant,
    first: Option<(Instant, u64, CpuSample, u64)>,
}

impl<'a> DrainMeter<'a> {
    pub fn new(cpu: &'a CpuReader, watched: &[Watched], n: u64) -> Self {
        let deadline = Instant::now() + Duration::from_secs(60 + n / 200);
        DrainMeter { cpu, watched: watched.to_vec(), n, deadline, first: None }
    }

    /// `acked` so far in all; true once all `n` are.
    pub fn acked(&mut self, acked: u64) -> Result<bool> {
        if acked > 0 && self.first.is_none() {
            let me = std::process::id();
            self.first = Some((Instant::now(), acked, self.cpu.sample(&self.watched), ctx_switches(me)));
        }
        if acked >= self.n {
            return Ok(true);
        }
        if Instant::now() > self.deadline {
            bail!("reference drain timed out: {acked} of {} acked", self.n);
        }
        Ok(false)
    }

    /// The drain's rate, CPU and switches, from the first ack to now.
    pub fn finish(self) -> Result<RefDrain> {
        let end = Instant::now();
        let mut after = self.cpu.sample(&self.watched);
        let Some((t0, acked0, before, switches0)) = self.first else { bail!("nothing acked") };
        let n = self.n.saturating_sub(acked0);
        after.messages = n as f64;
        let secs = end.duration_since(t0).as_secs_f64();
        Ok(RefDrain {
            rps: n as f64 / secs,
            secs,
            cpu: self.cpu.usage(&before, &after),
            switches: ctx_switches(std::process::id()).saturating_sub(switches0) as f64 / n.max(1) as f64,
        })
    }
}

/// What a reference consumer shares with whoever watches it.
#[derive(Clone, Default)]
pub struct Flags {
    acked: Arc<AtomicU64>,
    consuming: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Flags {
    /// Count `k` more acks.
    pub fn acked(&self, k: u64) {
        self.acked.fetch_add(k, Ordering::Relaxed);
    }

    /// The consumer is subscribed: what is published from now on reaches it.
    pub fn consuming(&self) {
        self.consuming.store(true, Ordering::Relaxed);
    }

    /// The consumer should stop.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn total(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }
}

/// A reference consumer on a thread and runtime of its own, like a separate process.
pub struct RefConsumer {
    thread: Option<std::thread::JoinHandle<Result<()>>>,
    flags: Flags,
}

impl RefConsumer {
    /// Run `consume(flags)` on its own thread until it returns (it should when
    /// `flags.stopped()`).
    pub fn spawn<F, Fut>(consume: F) -> Self
    where
        F: FnOnce(Flags) -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>>,
    {
        let flags = Flags::default();
        let theirs = flags.clone();
        let thread = std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(consume(theirs))
        });
        RefConsumer { thread: Some(thread), flags }
    }

    fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    pub async fn wait_consuming(&mut self, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        while !self.flags.consuming.load(Ordering::Relaxed) {
            if self.ended() {
                return self.join().and_then(|()| Err(anyhow!("the reference consumer ended before consuming")));
            }
            if t.elapsed() > timeout {
                bail!("the reference consumer did not start");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Stop the consumer and wait for it; its error, if it failed.
    fn join(&mut self) -> Result<()> {
        self.flags.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(anyhow!("the reference consumer panicked")),
            None => Ok(()),
        }
    }

    /// Wait until `n` are acked, then stop the consumer.
    pub async fn finish(mut self, n: u64, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        while self.flags.total() < n && t.elapsed() < timeout && !self.ended() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.join()?;
        let acked = self.flags.total();
        if acked < n {
            bail!("the reference consumer acked {acked} of {n}");
        }
        Ok(())
    }

    /// Time the consumer draining a backlog (polling its acks every 2 ms), then stop it.
    pub async fn drain(mut self, mut meter: DrainMeter<'_>) -> Result<RefDrain> {
        while !meter.acked(self.flags.total())? {
            if self.ended() {
                self.join()?;
                bail!("the reference consumer stopped after {} acks", self.flags.total());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let drained = meter.finish();
        self.join()?;
        drained
    }
}

impl Drop for RefConsumer {
    fn drop(&mut self) {
        self.flags.stop.store(true, Ordering::Relaxed);
    }
}
