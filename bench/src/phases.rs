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
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::broker::Broker;
use crate::cpu::{CpuReader, Watched};
use crate::drain::DrainMeter;
use crate::http::header_map;
use crate::latency::{direct_http, take_stamps, Stats};
use crate::metrics::{sum_metric, HistogramSummary};
use crate::opts::Common;
use crate::php::Php;
use crate::report::{report, LatencyReport, PhaseB};
use crate::router::{measure_throughput, LogSummary, Router};
use crate::wrk::{lua, wrk};
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
    // Dropping the bench future (error, Ctrl-C, SIGTERM) drops its process guards,
    // which kill the children; the broker's queues or streams are deleted in every case.
    let outcome = tokio::select! {
        r = run(opts, &broker, &scratch.0) => r,
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
    let out = opts.out.clone().unwrap_or_else(|| root().join(format!("bench/results/{}.md", B::SLUG)));
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

async fn run<B: Broker>(o: &Common, b: &B, scratch: &Path) -> Result<String> {
    let root = root();
    let router_bin = o.router_bin.clone().unwrap_or_else(|| target_dir(&root).join("release/message-router"));
    if !router_bin.exists() {
        bail!("{} not found: run bench/run (it builds the release binaries first)", router_bin.display());
    }
    let results = root.join("bench/results");
    std::fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    let result = |name: String| results.join(format!("{}-{name}", B::SLUG));
    let handlers = root.join("bench/handlers");
    let http = reqwest::Client::new();
    let cpu = CpuReader::new();
    let c = o.concurrency;
    let n = o.messages;
    let broker_pid = cpu.find_comm(B::PROCESS.1);
    let broker: Watched = (B::PROCESS.0, broker_pid.unwrap_or(0), true);
    let me: Watched = ("bench", std::process::id(), false);
    let quiet = || cpu.wait_quiet(B::NAME, broker_pid);
    let headers = b.headers();
    let base = header_map(&headers)?;

    // ---- Phase A: the handler alone, driven by wrk.
    let script = handlers.join(format!("{}.php", o.handler));
    let busy_us = o.busy_us.to_string();
    let env: &[(&str, &str)] = if o.handler == "busy" { &[("BUSY_US", &busy_us)] } else { &[] };
    let noop = Php::start(&script, o.workers, None, env).await?;
    let watched = [("php", noop.proc.pid(), true), broker, me];
    let lua_path = scratch.join("post.lua");
    std::fs::write(&lua_path, lua(&headers)).context("writing the wrk script")?;
    if o.warmup > 0 {
        eprintln!("phase A: warming up the handler ({} s)", o.warmup);
        wrk(&noop.url(), &lua_path, c, o.warmup, &cpu).await?;
    }
    eprintln!("phase A: wrk -t1 -c{c} -d{}s against the handler alone", o.wrk_duration);
    let before = cpu.sample(&watched[..2]);
    let mut wrk_c = wrk(&noop.url(), &lua_path, c, o.wrk_duration, &cpu).await?;
    let mut after = cpu.sample(&watched[..2]);
    after.messages = wrk_c.requests as f64;
    let mut cpu_a = cpu.usage(&before, &after);
    cpu_a.procs.push(("wrk".into(), wrk_c.cpu_pct));
    eprintln!("  {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms", wrk_c.rps, wrk_c.p50_ms, wrk_c.p99_ms);
    let unloaded_secs = o.wrk_duration.min(5);
    eprintln!("phase A: wrk -t1 -c1 -d{unloaded_secs}s (unloaded round trip)");
    let wrk_1 = wrk(&noop.url(), &lua_path, 1, unloaded_secs, &cpu).await?;
    eprintln!("  {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms", wrk_1.rps, wrk_1.p50_ms, wrk_1.p99_ms);

    // ---- Phase B: router throughput from a full backlog.
    eprintln!("phase B: writing {n} messages ({})", B::FILL);
    let (source, publish_rps) = b.fill("bench-tput", n).await?;
    eprintln!("  {publish_rps:.0} msg/s written");
    quiet().await;
    eprintln!("phase B: starting the router");
    let log_b = result("router-throughput.log".into());
    let mut router =
        Router::start(&router_bin, scratch, &log_b, o, |admin| b.router_yaml(admin, &source, &noop.url()))?;
    let tput = measure_throughput(n, &http, &mut router, &cpu, &watched).await?;
    let stop_b = router.stop(Duration::from_secs(20));
    let left = b.left(&source).await?;
    eprintln!(
        "  {:.0} msg/s (first → last ack), ratio {:.2} of wrk; {left} left unacked",
        tput.rps,
        tput.rps / wrk_c.rps
    );

    // The handler alone once more: the box's speed drifts between runs, so the ratio
    // uses the mean of a run before and one after the router's.
    quiet().await;
    eprintln!("phase A again: wrk -t1 -c{c} -d{}s against the handler alone", o.wrk_duration);
    let again = wrk(&noop.url(), &lua_path, c, o.wrk_duration, &cpu).await?;
    eprintln!("  {:.0} req/s", again.rps);
    wrk_c.add_run(again.rps);

    // ---- Phase R: reference consumers in this process, for what limits the router.
    let mut references = Vec::new();
    if !o.skip_reference {
        for (which, what) in B::REFERENCES.into_iter().enumerate() {
            let (source, _) = b.fill("bench-ref", n).await?;
            quiet().await;
            eprintln!("phase R: draining with a {what}");
            let r = b.drain(which, &source, &noop.url(), DrainMeter::new(&cpu, &watched, n)).await?;
            eprintln!("  {:.0} msg/s", r.rps);
            references.push((what, r));
        }
    }
    drop(noop);

    // ---- Phase C: latency at fixed rates.
    let mut latency = Vec::new();
    let rates: Vec<f64> = if o.latency_rate.is_empty() {
        o.latency_fraction.iter().map(|f| tput.rps * f).collect()
    } else {
        o.latency_rate.clone()
    };
    if !o.skip_latency && !rates.is_empty() {
        let stamps = scratch.join("stamps.log");
        let stamp = Php::start(&handlers.join("stamp.php"), o.workers, Some(&stamps), &[]).await?;
        let secs = o.latency_duration;
        for rate in rates.into_iter().map(|r| r.max(1.0)) {
            let tag = format!("{rate:.0}");
            quiet().await;
            eprintln!("phase C: {rate:.0} msg/s for {secs} s straight to the handler (bench HTTP client)");
            let direct = direct_http(&stamp.url(), &base, rate, secs, c).await?;
            let direct_stats =
                Stats::of(take_stamps(&stamps, direct.start_ns, &result(format!("stamps-{tag}-direct.txt")))?);
            eprintln!("  p50 {:.3} ms, p99 {:.3} ms", ms(direct_stats.p50), ms(direct_stats.p99));

            let source = b.create("bench-lat").await?;
            let log_c = result(format!("router-latency-{tag}.log"));
            let mut router =
                Router::start(&router_bin, scratch, &log_c, o, |admin| b.router_yaml(admin, &source, &stamp.url()))?;
            router.wait_ready(&http).await?;
            quiet().await;
            eprintln!("phase C: {rate:.0} msg/s for {secs} s through {} and the router", B::NAME);
            let watched = [("php", stamp.proc.pid(), true), broker, me, router.watched()];
            let before = cpu.sample(&watched);
            let via = if o.trace {
                let path = result(format!("trace-{tag}.tsv"));
                let (done, stopped) = tokio::sync::oneshot::channel::<()>();
                let publish = async {
                    let r = b.publish_paced(&source, rate, secs).await;
                    let _ = done.send(());
                    r
                };
                let (via, traced) = tokio::join!(publish, trace(b, &http, &router, &source, stopped, &path));
                traced?;
                eprintln!("  timeline written to {}", path.display());
                via?
            } else {
                b.publish_paced(&source, rate, secs).await?
            };
            router.wait_acked(&http, via.sent, Duration::from_secs(60)).await?;
            let mut after = cpu.sample(&watched);
            after.messages = via.sent as f64;
            let handler =
                router.metrics(&http).await.map(|text| HistogramSummary::of(&text, "router_handler_duration_seconds"));
            let stop = router.stop(Duration::from_secs(20));
            let via_stats = Stats::of(take_stamps(&stamps, via.start_ns, &result(format!("stamps-{tag}-router.txt")))?);
            eprintln!("  p50 {:.3} ms, p99 {:.3} ms", ms(via_stats.p50), ms(via_stats.p99));
            let mut reference = None;
            if !o.skip_reference {
                let source = b.create("bench-lat-ref").await?;
                let mut consumer = b.reference(&source, &stamp.url());
                consumer.wait_consuming(Duration::from_secs(10)).await?;
                quiet().await;
                eprintln!(
                    "phase C: {rate:.0} msg/s for {secs} s through {} and the minimal reference consumer",
                    B::NAME
                );
                let paced = b.publish_paced(&source, rate, secs).await?;
                consumer.finish(paced.sent, Duration::from_secs(60)).await?;
                let kept = result(format!("stamps-{tag}-reference.txt"));
                let stats = Stats::of(take_stamps(&stamps, paced.start_ns, &kept)?);
                eprintln!("  p50 {:.3} ms, p99 {:.3} ms", ms(stats.p50), ms(stats.p99));
                reference = Some((paced, stats));
            }
            latency.push(LatencyReport {
                rate,
                secs,
                direct,
                direct_stats,
                via,
                via_stats,
                reference,
                cpu: cpu.usage(&before, &after),
                handler,
                stop,
                log: LogSummary::read(&log_c),
                log_path: log_c,
            });
        }
    }

    let phase_b = PhaseB { publish_rps, t: tput, left, stop: stop_b, log: LogSummary::read(&log_b), log_path: log_b };
    Ok(report::<B>(o, &wrk_c, &wrk_1, &cpu_a, &phase_b, &references, &latency))
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
