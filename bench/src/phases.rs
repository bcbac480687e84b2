//! The phases every bench runs, whatever the broker, and `main`.
//!
//! Everything shares this machine's cores (broker, router, PHP, load generator), so the
//! absolute numbers are noisy; the ratios within one run are what matter. Before each
//! measured window the bench waits for the broker to go quiet (RabbitMQ keeps writing
//! its message store for a while after a burst of persistent messages).
//!
//! - **Phase A, handler alone.** `php -S` serving `bench/handlers/noop.php` with
//!   `PHP_CLI_SERVER_WORKERS=W`, loaded by `wrk -t1 -cC --latency` POSTing a small JSON
//!   body with the headers the router sends; then `wrk -t1 -c1` (the unloaded round
//!   trip). The `-cC` run is repeated after phase B and the two rates averaged, since
//!   the box's speed drifts.
//! - **Phase B, router throughput.** N messages are written first, then the router
//!   starts with `max_in_flight: C`. msg/s counts from the first ack to the N-th ack
//!   (`router_messages_acked_total`, polled from `/metrics` every 20 ms), so
//!   connecting is not timed.
//! - **Phase R, references** (for what limits the router): a backlog of N each,
//!   drained by the plainest consumer that POSTs each message to the handler (same
//!   prefetch, at most C in flight), and by one that only acks (the broker's own cost).
//! - **Phase C, latency at fixed rates** (default 25 % and 50 % of B's rate), served by
//!   `bench/handlers/stamp.php`, which logs "the PHP script starts" minus the send time
//!   carried in the message header `sent-ns` (wall clock, unix ns). For each rate:
//!   this program's own HTTP client posting straight to the handler (open loop, at most
//!   C in flight, like the router); publishing to the broker for the router to deliver;
//!   and the same through the reference consumer. Router minus direct is what the
//!   broker + router path adds.
//!
//! CPU use of every process (and the CPU time per message) is read from `/proc`
//! around each measured window. Children run in process groups of their own and are
//! killed with them, and the broker's queues or streams are deleted, at the end, on
//! error and on Ctrl-C.

use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::broker::Broker;
use crate::cpu::{CpuReader, CpuUsage, Watched};
use crate::drain::DrainMeter;
use crate::http::header_map;
use crate::latency::{direct_http, take_stamps, Paced, Stats};
use crate::metrics::{sum_metric, HistogramSummary};
use crate::opts::Common;
use crate::php::Php;
use crate::report::{report, LatencyReport, PhaseB};
use crate::router::{measure_throughput, LogSummary, Router, Target};
use crate::wrk::{lua, wrk, Wrk};
use crate::{interrupted, ms, root, target_dir, Scratch};

/// Run the bench of `broker`, print the report and write it to `--out` (default
/// `bench/results/<SLUG>.md`). `name` prefixes error messages.
pub async fn main<B: Broker>(name: &str, opts: &Common, broker: B) -> ExitCode {
    let scratch = match Scratch::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let bench = run(opts, &broker, &scratch.0);
    finish(name, opts, B::SLUG, &broker, bench).await
}

/// Run `bench` until it ends, or is dropped on Ctrl-C or SIGTERM (its process guards
/// then kill the children); delete what it created in the broker in every case; print
/// its report and write it to `--out` (default `bench/results/<slug>.md`). `name`
/// prefixes error messages.
pub async fn finish<B: Broker>(
    name: &str,
    opts: &Common,
    slug: &str,
    broker: &B,
    bench: impl Future<Output = Result<String>>,
) -> ExitCode {
    let outcome = tokio::select! {
        r = bench => r,
        _ = interrupted() => Err(anyhow!("interrupted")),
    };
    broker.cleanup().await;
    let report = match outcome {
        Ok(report) => report,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("{report}");
    let out = opts.out.clone().unwrap_or_else(|| root().join(format!("bench/results/{slug}.md")));
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&out, &report) {
        Ok(()) => {
            eprintln!("report written to {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: cannot write {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

/// What the phases of a run share: the options, the broker, the router binary, where
/// results go, the client of the router's admin server, CPU accounting.
pub struct Bench<'a, B: Broker> {
    pub o: &'a Common,
    pub b: &'a B,
    pub scratch: &'a Path,
    pub router_bin: PathBuf,
    /// `bench/handlers`.
    pub handlers: PathBuf,
    pub http: reqwest::Client,
    pub cpu: CpuReader,
    results: PathBuf,
    slug: &'a str,
    broker_pid: Option<u32>,
}

/// One router run at a fixed rate (phase C): what was published, the latencies
/// `stamp.php` logged, CPU over the run, the router's own histogram, its stop and log.
pub struct RouterLatency {
    pub via: Paced,
    pub stats: Stats,
    pub cpu: CpuUsage,
    /// The router's own delivery → response histogram over the run.
    pub handler: Option<HistogramSummary>,
    pub stop: String,
    pub log: LogSummary,
    pub log_path: PathBuf,
}

impl<'a, B: Broker> Bench<'a, B> {
    /// Files of the run are `bench/results/<slug>-…`.
    pub fn new(o: &'a Common, b: &'a B, scratch: &'a Path, slug: &'a str) -> Result<Self> {
        let root = root();
        let router_bin = o.router_bin.clone().unwrap_or_else(|| target_dir(&root).join("release/message-router"));
        if !router_bin.exists() {
            bail!("{} not found: run bench/run (it builds the release binaries first)", router_bin.display());
        }
        let results = root.join("bench/results");
        std::fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
        let cpu = CpuReader::new();
        let broker_pid = cpu.find_comm(B::PROCESS.1);
        Ok(Bench {
            o,
            b,
            scratch,
            router_bin,
            handlers: root.join("bench/handlers"),
            http: reqwest::Client::new(),
            cpu,
            results,
            slug,
            broker_pid,
        })
    }

    /// `bench/results/<slug>-<name>`.
    pub fn result(&self, name: &str) -> PathBuf {
        self.results.join(format!("{}-{name}", self.slug))
    }

    /// The broker's CPU accounting entry (with its children: RabbitMQ's helpers).
    pub fn broker(&self) -> Watched {
        (B::PROCESS.0, self.broker_pid.unwrap_or(0), true)
    }

    /// This bench process (the load generator, the publisher, the poller).
    pub fn me(&self) -> Watched {
        ("bench", std::process::id(), false)
    }

    /// Wait for the broker to go quiet before a measured window.
    pub async fn quiet(&self) {
        self.cpu.wait_quiet(B::NAME, self.broker_pid).await;
    }

    /// Phase B: write a backlog of N, then start the router delivering it to `target`
    /// (its log `bench/results/<slug>-<log>`) and time it draining; CPU of `watched`
    /// and the router.
    pub async fn router_drain(&self, log: &str, target: &Target<'_>, watched: &[Watched]) -> Result<PhaseB> {
        let (b, n) = (self.b, self.o.messages);
        eprintln!("  writing {n} messages ({})", B::FILL);
        let (source, publish_rps) = b.fill("bench-tput", n).await?;
        eprintln!("  {publish_rps:.0} msg/s written");
        self.quiet().await;
        eprintln!("  starting the router");
        let log_path = self.result(log);
        let mut router = Router::start(&self.router_bin, self.scratch, &log_path, self.o, |admin| {
            b.router_yaml(admin, &source, target)
        })?;
        let t = measure_throughput(n, &self.http, &mut router, &self.cpu, watched).await?;
        let stop = router.stop(Duration::from_secs(20));
        let left = b.left(&source).await?;
        eprintln!("  {:.0} msg/s (first → last ack); {left} left unacked", t.rps);
        Ok(PhaseB { publish_rps, t, left, stop, log: LogSummary::read(&log_path), log_path })
    }

    /// Phase C through the router: a fresh source, the router delivering it to `target`
    /// (which runs `stamp.php`, logging to `stamps`), messages published at `rate` for
    /// `--latency-duration` seconds; the latencies logged for them (kept in
    /// `bench/results/<slug>-stamps-<tag>.txt`, the router's log in
    /// `…-router-latency-<tag>.log`), CPU of `watched` and the router over the run.
    pub async fn router_latency(
        &self,
        rate: f64,
        tag: &str,
        target: &Target<'_>,
        stamps: &Path,
        watched: &[Watched],
    ) -> Result<RouterLatency> {
        let (b, secs) = (self.b, self.o.latency_duration);
        let source = b.create("bench-lat").await?;
        let log_path = self.result(&format!("router-latency-{tag}.log"));
        let mut router = Router::start(&self.router_bin, self.scratch, &log_path, self.o, |admin| {
            b.router_yaml(admin, &source, target)
        })?;
        router.wait_ready(&self.http).await?;
        self.quiet().await;
        eprintln!("  {rate:.0} msg/s for {secs} s through {} and the router", B::NAME);
        let watched: Vec<Watched> = watched.iter().copied().chain([router.watched()]).collect();
        let before = self.cpu.sample(&watched);
        let via = if self.o.trace {
            let path = self.result(&format!("trace-{tag}.tsv"));
            let (done, stopped) = tokio::sync::oneshot::channel::<()>();
            let publish = async {
                let r = b.publish_paced(&source, rate, secs).await;
                let _ = done.send(());
                r
            };
            let (via, traced) = tokio::join!(publish, trace(b, &self.http, &router, &source, stopped, &path));
            traced?;
            eprintln!("  timeline written to {}", path.display());
            via?
        } else {
            b.publish_paced(&source, rate, secs).await?
        };
        router.wait_acked(&self.http, via.sent, Duration::from_secs(60)).await?;
        let mut after = self.cpu.sample(&watched);
        after.messages = via.sent as f64;
        let handler =
            router.metrics(&self.http).await.map(|text| HistogramSummary::of(&text, "router_handler_duration_seconds"));
        let stop = router.stop(Duration::from_secs(20));
        let stats = Stats::of(take_stamps(stamps, via.start_ns, &self.result(&format!("stamps-{tag}.txt")))?);
        eprintln!("  p50 {:.3} ms, p99 {:.3} ms", ms(stats.p50), ms(stats.p99));
        Ok(RouterLatency {
            via,
            stats,
            cpu: self.cpu.usage(&before, &after),
            handler,
            stop,
            log: LogSummary::read(&log_path),
            log_path,
        })
    }

    /// Phase C straight to the handler at `url` (which runs `stamp.php`, logging to
    /// `stamps`): this program's own HTTP client, open loop, at most C in flight; the
    /// latencies kept in `bench/results/<slug>-stamps-<tag>.txt`.
    pub async fn direct_latency(&self, rate: f64, tag: &str, url: &str, stamps: &Path) -> Result<(Paced, Stats)> {
        let secs = self.o.latency_duration;
        self.quiet().await;
        eprintln!("  {rate:.0} msg/s for {secs} s straight to the handler (bench HTTP client)");
        let direct = direct_http(url, &header_map(&self.b.headers())?, rate, secs, self.o.concurrency).await?;
        let stats = Stats::of(take_stamps(stamps, direct.start_ns, &self.result(&format!("stamps-{tag}.txt")))?);
        eprintln!("  p50 {:.3} ms, p99 {:.3} ms", ms(stats.p50), ms(stats.p99));
        Ok((direct, stats))
    }

    /// The rates of phase C: `--latency-rate`, else `--latency-fraction` of `rps`.
    pub fn latency_rates(&self, rps: f64) -> Vec<f64> {
        let o = self.o;
        let rates = if o.latency_rate.is_empty() {
            o.latency_fraction.iter().map(|f| rps * f).collect()
        } else {
            o.latency_rate.clone()
        };
        if o.skip_latency {
            Vec::new()
        } else {
            rates.into_iter().map(|r| r.max(1.0)).collect()
        }
    }
}

async fn run<B: Broker>(o: &Common, b: &B, scratch: &Path) -> Result<String> {
    let bench = Bench::new(o, b, scratch, B::SLUG)?;
    let cpu = &bench.cpu;
    let c = o.concurrency;
    let n = o.messages;
    let (broker, me) = (bench.broker(), bench.me());
    let headers = b.headers();

    // ---- Phase A: the handler alone, driven by wrk.
    let script = bench.handlers.join(format!("{}.php", o.handler));
    let busy_us = o.busy_us.to_string();
    let env: &[(&str, &str)] = if o.handler == "busy" { &[("BUSY_US", &busy_us)] } else { &[] };
    let noop = Php::start(&script, o.workers, None, env).await?;
    let watched = [("php", noop.proc.pid(), true), broker, me];
    let lua_path = scratch.join("post.lua");
    std::fs::write(&lua_path, lua(&headers)).context("writing the wrk script")?;
    if o.warmup > 0 {
        eprintln!("phase A: warming up the handler ({} s)", o.warmup);
        wrk(&noop.url(), &lua_path, c, o.warmup, cpu).await?;
    }
    eprintln!("phase A: wrk -t1 -c{c} -d{}s against the handler alone", o.wrk_duration);
    let (mut wrk_c, cpu_a) = wrk_measured(&noop.url(), &lua_path, c, o.wrk_duration, cpu, &watched[..2]).await?;
    let unloaded_secs = o.wrk_duration.min(5);
    eprintln!("phase A: wrk -t1 -c1 -d{unloaded_secs}s (unloaded round trip)");
    let wrk_1 = wrk(&noop.url(), &lua_path, 1, unloaded_secs, cpu).await?;
    eprintln!("  {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms", wrk_1.rps, wrk_1.p50_ms, wrk_1.p99_ms);

    // ---- Phase B: router throughput from a full backlog.
    eprintln!("phase B: the router draining a backlog");
    let phase_b = bench.router_drain("router-throughput.log", &Target::Http(&noop.url()), &watched).await?;
    eprintln!("  ratio {:.2} of wrk", phase_b.t.rps / wrk_c.rps);

    // The handler alone once more: the box's speed drifts between runs, so the ratio
    // uses the mean of a run before and one after the router's.
    bench.quiet().await;
    eprintln!("phase A again: wrk -t1 -c{c} -d{}s against the handler alone", o.wrk_duration);
    let again = wrk(&noop.url(), &lua_path, c, o.wrk_duration, cpu).await?;
    eprintln!("  {:.0} req/s", again.rps);
    wrk_c.add_run(again.rps);

    // ---- Phase R: reference consumers in this process, for what limits the router.
    let mut references = Vec::new();
    if !o.skip_reference {
        for (which, what) in B::REFERENCES.into_iter().enumerate() {
            let (source, _) = b.fill("bench-ref", n).await?;
            bench.quiet().await;
            eprintln!("phase R: draining with a {what}");
            let r = b.drain(which, &source, &noop.url(), DrainMeter::new(cpu, &watched, n)).await?;
            eprintln!("  {:.0} msg/s", r.rps);
            references.push((what, r));
        }
    }
    drop(noop);

    // ---- Phase C: latency at fixed rates.
    let mut latency = Vec::new();
    let rates = bench.latency_rates(phase_b.t.rps);
    if !rates.is_empty() {
        let stamps = scratch.join("stamps.log");
        let stamp = Php::start(&bench.handlers.join("stamp.php"), o.workers, Some(&stamps), &[]).await?;
        let watched = [("php", stamp.proc.pid(), true), broker, me];
        let secs = o.latency_duration;
        for rate in rates {
            let tag = format!("{rate:.0}");
            eprintln!("phase C: {rate:.0} msg/s");
            let (direct, direct_stats) =
                bench.direct_latency(rate, &format!("{tag}-direct"), &stamp.url(), &stamps).await?;
            let router = bench
                .router_latency(rate, &format!("{tag}-router"), &Target::Http(&stamp.url()), &stamps, &watched)
                .await?;
            let mut reference = None;
            if !o.skip_reference {
                let source = b.create("bench-lat-ref").await?;
                let mut consumer = b.reference(&source, &stamp.url());
                consumer.wait_consuming(Duration::from_secs(10)).await?;
                bench.quiet().await;
                eprintln!(
                    "phase C: {rate:.0} msg/s for {secs} s through {} and the minimal reference consumer",
                    B::NAME
                );
                let paced = b.publish_paced(&source, rate, secs).await?;
                consumer.finish(paced.sent, Duration::from_secs(60)).await?;
                let kept = bench.result(&format!("stamps-{tag}-reference.txt"));
                let stats = Stats::of(take_stamps(&stamps, paced.start_ns, &kept)?);
                eprintln!("  p50 {:.3} ms, p99 {:.3} ms", ms(stats.p50), ms(stats.p99));
                reference = Some((paced, stats));
            }
            latency.push(LatencyReport { rate, secs, direct, direct_stats, router, reference });
        }
    }

    Ok(report::<B>(o, &wrk_c, &wrk_1, &cpu_a, &phase_b, &references, &latency))
}

/// `wrk -t1 -c<connections>` against `url` for `secs`, with the CPU of `watched` (and
/// wrk's) per request over the run.
pub async fn wrk_measured(
    url: &str,
    lua: &Path,
    connections: u32,
    secs: u64,
    cpu: &CpuReader,
    watched: &[Watched],
) -> Result<(Wrk, CpuUsage)> {
    let before = cpu.sample(watched);
    let w = wrk(url, lua, connections, secs, cpu).await?;
    let mut after = cpu.sample(watched);
    after.messages = w.requests as f64;
    let mut usage = cpu.usage(&before, &after);
    usage.procs.push(("wrk".into(), w.cpu_pct));
    eprintln!("  {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms", w.rps, w.p50_ms, w.p99_ms);
    Ok((w, usage))
}

/// Every 10 ms until `stop`: ms since start, the broker's backlog of `source`, and the
/// router's received, acked and in-flight counts; as TSV to `path`.
async fn trace<B: Broker>(
    b: &B,
    http: &reqwest::Client,
    router: &Router,
    source: &B::Source,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    path: &Path,
) -> Result<()> {
    let start = Instant::now();
    let mut out = String::from("ms\tbacklog\treceived\tacked\tin_flight\n");
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        let backlog = b.backlog(source).await?;
        let text = router.metrics(http).await.unwrap_or_default();
        let _ = writeln!(
            out,
            "{}\t{backlog}\t{}\t{}\t{}",
            start.elapsed().as_millis(),
            sum_metric(&text, "router_messages_received_total"),
            sum_metric(&text, "router_messages_acked_total"),
            sum_metric(&text, "router_in_flight")
        );
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}
