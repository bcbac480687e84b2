//! The `message-router` under test: started with a YAML config, read through its
//! admin server (`/readyz`, `/metrics`), stopped with SIGTERM; its throughput from a
//! full backlog; warnings and errors in its log.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cpu::{ctx_switches, CpuReader, CpuSample, CpuUsage, Watched};
use crate::free_port;
use crate::metrics::{sum_metric, HistogramSummary};
use crate::opts::Common;
use crate::proc::Proc;

/// The router under test.
pub struct Router {
    pub proc: Proc,
    admin: u16,
    pub log: PathBuf,
}

impl Router {
    /// Start `bin` with the config `yaml(admin port)` (written to `scratch`), its
    /// stderr to `log`, RUST_LOG and extra environment from `opts`.
    pub fn start(bin: &Path, scratch: &Path, log: &Path, opts: &Common, yaml: impl Fn(u16) -> String) -> Result<Self> {
        let admin = free_port()?;
        let config = scratch.join(format!("router-{admin}.yaml"));
        std::fs::write(&config, yaml(admin)).context("writing the router config")?;
        let stderr = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", &opts.rust_log)
            .envs(opts.router_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let proc = Proc::spawn(&mut cmd, "message-router")?;
        Ok(Router { proc, admin, log: log.to_path_buf() })
    }

    pub async fn metrics(&self, http: &reqwest::Client) -> Option<String> {
        let r = http.get(format!("http://127.0.0.1:{}/metrics", self.admin)).send().await.ok()?;
        r.text().await.ok()
    }

    /// The CPU accounting entry of the router (its own process, no children).
    pub fn watched(&self) -> Watched {
        ("router", self.proc.pid(), false)
    }

    pub async fn wait_ready(&mut self, http: &reqwest::Client) -> Result<()> {
        let t = Instant::now();
        let url = format!("http://127.0.0.1:{}/readyz", self.admin);
        loop {
            if matches!(http.get(&url).send().await, Ok(r) if r.status().is_success()) {
                return Ok(());
            }
            if let Some(status) = self.proc.exited() {
                bail!("the router exited ({status}); see {}", self.log.display());
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the router was not ready within 30 s; see {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_acked(&mut self, http: &reqwest::Client, n: u64, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        let mut acked = 0.0;
        while t.elapsed() < timeout {
            if let Some(text) = self.metrics(http).await {
                acked = sum_metric(&text, "router_messages_acked_total");
                if acked >= n as f64 {
                    return Ok(());
                }
            }
            if let Some(status) = self.proc.exited() {
                bail!("the router exited ({status}); see {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("only {acked} of {n} messages acked within {timeout:?}; see {}", self.log.display())
    }

    pub fn stop(&mut self, timeout: Duration) -> String {
        self.proc.terminate(timeout)
    }
}

/// What the router's handler `php` delivers to.
pub enum Target<'a> {
    /// `type: http`, one endpoint URL.
    Http(&'a str),
    /// `type: fastcgi`, one PHP-FPM pool (`tcp://host:port` or `unix:///path`) running
    /// `script` (an absolute path), keeping at most `max_connections` open to it (each
    /// pins an FPM worker: at most the pool's `pm.max_children`).
    Fastcgi { endpoint: &'a str, script: &'a Path, max_connections: u32 },
}

impl Target<'_> {
    /// The handler's lines of its target (type, endpoint, its own keys), indented for
    /// the handler section.
    fn yaml(&self) -> String {
        match self {
            Target::Http(url) => format!("    endpoints: [\"{url}\"]\n"),
            Target::Fastcgi { endpoint, script, max_connections } => format!(
                "    type: fastcgi\n    endpoints: [\"{endpoint}\"]\n    script_filename: \"{}\"\n    max_connections: {max_connections}\n",
                script.display()
            ),
        }
    }
}

/// The router's config in the bench: the admin server on `admin`, the transport
/// `transport` (its name and a YAML flow mapping), the handler `php` (`target`,
/// `max_in_flight` C or `--max-in-flight`, the balance), the subscription `main` of that transport with
/// the lines `source` (queue, or streams and group …), the prefetch and a short retry
/// policy, and the one route `route` (a YAML flow mapping) to `php`; with
/// `--tracing-endpoint`, tracing on.
pub fn config(
    opts: &Common,
    admin: u16,
    transport: (&str, &str),
    target: &Target,
    source: &str,
    route: &str,
) -> String {
    let source: String = source.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        r#"log: {{ level: info }}
admin: {{ listen: "127.0.0.1:{admin}" }}
shutdown: {{ grace_period: 10s }}
transports:
  {name}: {kind}
handlers:
  php:
{target}    balance: {balance}
    timeout: 10s
    max_in_flight: {max_in_flight}
subscriptions:
  main:
    transport: {name}
{source}    prefetch: {prefetch}
    retry: {{ max_attempts: 3, initial_delay: 1s, multiplier: 1, max_delay: 1s, jitter: 0 }}
routes:
  - {route}
{tracing}"#,
        tracing = opts
            .tracing_endpoint
            .as_ref()
            .map_or(String::new(), |e| format!("tracing: {{ enabled: true, endpoint: \"{e}\", sampling: 1.0 }}\n")),
        name = transport.0,
        kind = transport.1,
        target = target.yaml(),
        balance = opts.balance,
        max_in_flight = opts.max_in_flight.clone().unwrap_or_else(|| opts.concurrency.to_string()),
        prefetch = opts.prefetch,
    )
}

pub struct Throughput {
    pub rps: f64,
    /// Between 10% and 90% acked: the steady state without ramp-up and tail.
    pub steady_rps: f64,
    pub secs: f64,
    /// Seconds from starting the process to its first ack.
    pub first_ack_after: f64,
    pub handler: HistogramSummary,
    pub mean_in_flight: f64,
    pub max_in_flight: f64,
    pub cpu: CpuUsage,
    /// Context switches of the router per message.
    pub switches: f64,
    pub retried: f64,
    pub dead_lettered: f64,
    /// Every poll of `/metrics` while draining.
    pub samples: Vec<Sample>,
    /// The first poll that saw half of the N acked: where a two-phase run turns.
    pub halfway: Option<Halfway>,
    /// `/metrics` at the N-th ack.
    pub last_metrics: String,
}

/// One poll of `/metrics` while draining.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Seconds since the router started.
    pub at: f64,
    pub acked: f64,
    pub in_flight: f64,
    /// `router_handler_concurrency_limit`: the handler's limit (fixed, or where `auto`
    /// stands).
    pub limit: f64,
}

/// The router's state when half of the backlog was acked.
pub struct Halfway {
    /// Seconds since the router started.
    pub at: f64,
    pub acked: f64,
    /// `/metrics` then (histograms to subtract from the final ones).
    pub metrics: String,
}

/// Poll `/metrics` every 20 ms until the router acked `n` messages; the rate counts
/// from the first poll that saw an ack to the N-th ack, so connecting is not timed.
/// CPU is accounted for `watched` and the router over the same window.
pub async fn measure_throughput(
    n: u64,
    http: &reqwest::Client,
    router: &mut Router,
    cpu: &CpuReader,
    watched: &[Watched],
) -> Result<Throughput> {
    let messages = n;
    let n = n as f64;
    let watched: Vec<Watched> = watched.iter().copied().chain([router.watched()]).collect();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60 + messages / 200);
    let mut first: Option<(Instant, f64, CpuSample)> = None;
    let mut switches0 = 0;
    let mut samples: Vec<Sample> = Vec::new();
    let mut halfway = None;
    loop {
        if let Some(text) = router.metrics(http).await {
            let now = Instant::now();
            let acked = sum_metric(&text, "router_messages_acked_total");
            let in_flight = sum_metric(&text, "router_in_flight");
            let at = now.duration_since(started).as_secs_f64();
            let limit = sum_metric(&text, "router_handler_concurrency_limit");
            samples.push(Sample { at, acked, in_flight, limit });
            if halfway.is_none() && acked >= n / 2.0 {
                halfway = Some(Halfway { at, acked, metrics: text.clone() });
            }
            if acked > 0.0 && first.is_none() {
                first = Some((now, acked, cpu.sample(&watched)));
                switches0 = ctx_switches(router.proc.pid());
            }
            if acked >= n {
                let mut end = cpu.sample(&watched);
                let switches = ctx_switches(router.proc.pid()).saturating_sub(switches0) as f64;
                let Some((t0, acked0, start_cpu)) = first else { bail!("no first ack seen") };
                end.messages = n - acked0;
                let secs = now.duration_since(t0).as_secs_f64();
                let at = |fraction: f64| samples.iter().find(|s| s.acked >= fraction * n).map_or(0.0, |s| s.at);
                let (t10, t90) = (at(0.1), at(0.9));
                let window: Vec<f64> =
                    samples.iter().filter(|s| s.acked > 0.0 && s.acked < n).map(|s| s.in_flight).collect();
                return Ok(Throughput {
                    rps: (n - acked0) / secs,
                    steady_rps: if t90 > t10 { 0.8 * n / (t90 - t10) } else { 0.0 },
                    secs,
                    first_ack_after: t0.duration_since(started).as_secs_f64(),
                    handler: HistogramSummary::of(&text, "router_handler_duration_seconds"),
                    mean_in_flight: window.iter().sum::<f64>() / window.len().max(1) as f64,
                    max_in_flight: window.iter().copied().fold(0.0, f64::max),
                    cpu: cpu.usage(&start_cpu, &end),
                    switches: switches / (n - acked0).max(1.0),
                    retried: sum_metric(&text, "router_messages_retried_total"),
                    dead_lettered: sum_metric(&text, "router_messages_dead_lettered_total"),
                    samples,
                    halfway,
                    last_metrics: text,
                });
            }
            let failed = sum_metric(&text, "router_messages_retried_total")
                + sum_metric(&text, "router_messages_dead_lettered_total");
            if failed > 0.0 {
                bail!("the router retried or dead-lettered {failed} messages; see {}", router.log.display());
            }
            if Instant::now() > deadline {
                bail!("timed out: {acked} of {n} acked; see {}", router.log.display());
            }
        }
        if let Some(status) = router.proc.exited() {
            bail!("the router exited ({status}); see {}", router.log.display());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for the router's metrics; see {}", router.log.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Warnings and errors in a router log.
pub struct LogSummary {
    warn: usize,
    error: usize,
    first: Vec<String>,
}

impl LogSummary {
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut s = LogSummary { warn: 0, error: 0, first: Vec::new() };
        for line in text.lines() {
            let (w, e) = (line.contains(" WARN "), line.contains(" ERROR "));
            s.warn += usize::from(w);
            s.error += usize::from(e);
            if (w || e) && s.first.len() < 3 {
                s.first.push(line.to_string());
            }
        }
        s
    }

    pub fn describe(&self) -> String {
        if self.warn + self.error == 0 {
            "no warnings or errors".into()
        } else {
            format!("{} warnings, {} errors, first: `{}`", self.warn, self.error, self.first.join("` / `"))
        }
    }
}
