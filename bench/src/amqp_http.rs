//! Benchmark (not a test): RabbitMQ → `message-router` → a no-op PHP handler, side by
//! side with the same handler driven directly by `wrk`. Prints a markdown report and
//! writes it to `bench/results/amqp_http.md` (raw latency samples, router logs and
//! traces go next to it). Run it with `bench/run` (builds release); `--help` lists the
//! knobs.
//!
//! Everything shares this machine's cores (broker, router, PHP, load generator), so the
//! absolute numbers are noisy; the ratios within one run are what matter. Before each
//! measured window the bench waits for RabbitMQ to go quiet (it keeps writing its
//! message store for a while after a burst of persistent messages).
//!
//! - **Phase A, handler alone.** `php -S` serving `bench/handlers/noop.php` with
//!   `PHP_CLI_SERVER_WORKERS=W`, loaded by `wrk -t1 -cC --latency` POSTing a small JSON
//!   body with the headers the router sends; then `wrk -t1 -c1` (the unloaded round
//!   trip). The `-cC` run is repeated after phase B and the two rates averaged, since
//!   the box's speed drifts.
//! - **Phase B, router throughput.** N persistent messages are queued first (pipelined
//!   publisher confirms), then the router starts with `max_in_flight: C`. msg/s counts
//!   from the first ack to the N-th ack (`router_messages_acked_total`, polled from
//!   `/metrics` every 20 ms), so connecting is not timed.
//! - **Phase R, references** (for what limits the router): the same backlog drained
//!   by the plainest consumer in this process (lapin, same prefetch, a reqwest POST per
//!   message with at most C in flight, one ack per message), and by a consumer that
//!   only acks (the broker's own cost).
//! - **Phase C, latency at fixed rates** (default 25 % and 50 % of B's rate), served by
//!   `bench/handlers/stamp.php`, which logs "the PHP script starts" minus the send time
//!   carried in the message header `sent-ns` (wall clock, unix ns). For each rate:
//!   this program's own HTTP client posting straight to the handler (open loop, at most
//!   C in flight, like the router); publishing to RabbitMQ for the router to deliver;
//!   and the same through the reference consumer. Router minus direct is what the
//!   broker + router path adds.
//!
//! CPU use of every process (and the CPU time per message) is read from `/proc`
//! around each measured window. Children run in process groups of their own and are
//! killed with them, and the queues are deleted, at the end, on error and on Ctrl-C.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// RabbitMQ → message-router → no-op PHP, against the same handler driven by wrk.
#[derive(Parser, Debug, Clone)]
#[command(name = "amqp-http")]
struct Args {
    /// PHP_CLI_SERVER_WORKERS of the `php -S` handler.
    #[arg(long, short = 'w', default_value_t = 4)]
    workers: u32,
    /// The handler of phases A, B and R: `noop` (bench/handlers/noop.php) or `busy`
    /// (bench/handlers/busy.php, which spins --busy-us of CPU per request).
    #[arg(long, default_value = "noop", value_parser = ["noop", "busy"])]
    handler: String,
    /// CPU microseconds per request of the busy handler.
    #[arg(long, default_value_t = 1000)]
    busy_us: u64,
    /// Concurrency: wrk connections, and the handler's max_in_flight in the router.
    #[arg(long, short = 'c', default_value_t = 16)]
    concurrency: u32,
    /// Messages queued for the throughput phase.
    #[arg(long, short = 'n', default_value_t = 50_000)]
    messages: u64,
    /// The subscription's prefetch.
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// The handler's balance setting (one endpoint, so it should not matter).
    #[arg(long, default_value = "least_outstanding")]
    balance: String,
    /// Seconds of each measured wrk run.
    #[arg(long, default_value_t = 10)]
    wrk_duration: u64,
    /// Seconds of unrecorded wrk load before the measured run (PHP workers warm up).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Seconds of each fixed-rate latency run.
    #[arg(long, default_value_t = 10)]
    latency_duration: u64,
    /// Rates of the latency runs as fractions of the router's measured throughput.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5")]
    latency_fraction: Vec<f64>,
    /// Rates of the latency runs in msg/s (overrides --latency-fraction).
    #[arg(long, value_delimiter = ',')]
    latency_rate: Vec<f64>,
    /// During latency runs, record a timeline (every 10 ms: queue depth, router
    /// received/acked/in flight) to bench/results/amqp_http-trace-RATE.tsv.
    #[arg(long)]
    trace: bool,
    /// Skip phase C (latency at a fixed rate).
    #[arg(long)]
    skip_latency: bool,
    /// Skip the reference consumers (phase R).
    #[arg(long)]
    skip_reference: bool,
    /// Extra environment of the router, e.g. TOKIO_WORKER_THREADS=1 (repeatable).
    #[arg(long = "router-env", value_parser = parse_env)]
    router_env: Vec<(String, String)>,
    /// RUST_LOG of the router.
    #[arg(long, default_value = "info")]
    rust_log: String,
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// The router binary (default: target/release/message-router).
    #[arg(long, env = "MESSAGE_ROUTER_BIN")]
    router_bin: Option<PathBuf>,
    /// Where the markdown report goes (default: bench/results/amqp_http.md).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let queues = Queues::default();
    let scratch = match Scratch::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("amqp-http: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // Dropping the bench future (error, Ctrl-C, SIGTERM) drops its process guards,
    // which kill the children; the queues are deleted below in every case.
    let outcome = tokio::select! {
        r = bench(&args, &scratch.0, &queues) => r,
        _ = interrupted() => Err(anyhow!("interrupted")),
    };
    delete_queues(&args.amqp_url, &queues).await;
    match outcome {
        Ok(report) => {
            println!("{report}");
            let out = args.out.clone().unwrap_or_else(|| root().join("bench/results/amqp_http.md"));
            if let Some(dir) = out.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match std::fs::write(&out, &report) {
                Ok(()) => {
                    eprintln!("report written to {}", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("amqp-http: cannot write {}: {e}", out.display());
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("amqp-http: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

// ---------------------------------------------------------------------------------
// The phases
// ---------------------------------------------------------------------------------

async fn bench(args: &Args, scratch: &Path, queues: &Queues) -> Result<String> {
    let root = root();
    let router_bin = args.router_bin.clone().unwrap_or_else(|| target_dir(&root).join("release/message-router"));
    if !router_bin.exists() {
        bail!("{} not found: run bench/run (it builds the release binaries first)", router_bin.display());
    }
    let results = root.join("bench/results");
    std::fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    let handlers = root.join("bench/handlers");
    let http = reqwest::Client::new();
    let cpu = CpuReader::new();
    let c = args.concurrency;

    // ---- Phase A: the handler alone, driven by wrk.
    let script = handlers.join(format!("{}.php", args.handler));
    let busy_us = args.busy_us.to_string();
    let env: &[(&str, &str)] = if args.handler == "busy" { &[("BUSY_US", &busy_us)] } else { &[] };
    let noop = Php::start(&script, args.workers, None, env).await?;
    let lua = scratch.join("post.lua");
    std::fs::write(&lua, WRK_LUA).context("writing the wrk script")?;
    if args.warmup > 0 {
        eprintln!("phase A: warming up the handler ({} s)", args.warmup);
        wrk(&noop.url(), &lua, c, args.warmup, &cpu).await?;
    }
    eprintln!("phase A: wrk -t1 -c{c} -d{}s against the handler alone", args.wrk_duration);
    let beam = cpu.find_comm("beam.smp");
    let before = cpu.sample(&[("php", noop.proc.pid(), true), ("rabbitmq", beam.unwrap_or(0), true)]);
    let mut wrk_c = wrk(&noop.url(), &lua, c, args.wrk_duration, &cpu).await?;
    let mut after = cpu.sample(&[("php", noop.proc.pid(), true), ("rabbitmq", beam.unwrap_or(0), true)]);
    after.messages = wrk_c.requests as f64;
    let mut cpu_a = cpu.usage(&before, &after);
    cpu_a.procs.push(("wrk".into(), wrk_c.cpu_pct));
    eprintln!("  {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms", wrk_c.rps, wrk_c.p50_ms, wrk_c.p99_ms);
    let unloaded_secs = args.wrk_duration.min(5);
    eprintln!("phase A: wrk -t1 -c1 -d{unloaded_secs}s (unloaded round trip)");
    let wrk_1 = wrk(&noop.url(), &lua, 1, unloaded_secs, &cpu).await?;
    eprintln!("  {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms", wrk_1.rps, wrk_1.p50_ms, wrk_1.p99_ms);

    // ---- Phase B: router throughput from a full queue.
    let rabbit = Rabbit::connect(&args.amqp_url).await?;
    let (queue, publish_rps) = fill_queue(&rabbit, queues, "bench-tput", args.messages).await?;
    eprintln!("  {publish_rps:.0} msg/s published");
    wait_broker_quiet(&cpu, beam).await;
    eprintln!("phase B: starting the router");
    let log_b = results.join("amqp_http-router-throughput.log");
    let mut router =
        Router::start(&router_bin, scratch, &log_b, args, |admin| router_yaml(args, admin, &queue, &noop.url()))?;
    let tput = measure_throughput(args, &http, &mut router, &cpu, &noop, beam).await?;
    let left = rabbit.count(&queue).await?;
    let stop_b = router.stop(Duration::from_secs(20));
    let log_b_summary = LogSummary::read(&log_b);
    eprintln!(
        "  {:.0} msg/s (first → last ack), ratio {:.2} of wrk; queue left with {left} ready",
        tput.rps,
        tput.rps / wrk_c.rps
    );

    // The handler alone once more: the box's speed drifts between runs, so the ratio
    // uses the mean of a run before and one after the router's.
    wait_broker_quiet(&cpu, beam).await;
    eprintln!("phase A again: wrk -t1 -c{c} -d{}s against the handler alone", args.wrk_duration);
    let again = wrk(&noop.url(), &lua, c, args.wrk_duration, &cpu).await?;
    eprintln!("  {:.0} req/s", again.rps);
    wrk_c.runs.push(again.rps);
    wrk_c.rps = wrk_c.runs.iter().sum::<f64>() / wrk_c.runs.len() as f64;

    // ---- Phase R: reference consumers in this process, for what limits the router.
    let mut references = Vec::new();
    if !args.skip_reference {
        for http_too in [true, false] {
            let what = if http_too {
                "lapin consumer + reqwest POST + ack (minimal reference)"
            } else {
                "lapin consumer, ack only (no HTTP)"
            };
            let (queue, _) = fill_queue(&rabbit, queues, "bench-ref", args.messages).await?;
            wait_broker_quiet(&cpu, beam).await;
            eprintln!("phase R: draining with a {what}");
            let url = http_too.then(|| noop.url());
            let r = reference_drain(&rabbit, &queue, args, url.as_deref(), &cpu, &noop, beam).await?;
            eprintln!("  {:.0} msg/s", r.rps);
            references.push((what, r));
        }
    }
    drop(noop);

    // ---- Phase C: latency at fixed rates.
    let mut latency = Vec::new();
    let rates: Vec<f64> = if args.latency_rate.is_empty() {
        args.latency_fraction.iter().map(|f| tput.rps * f).collect()
    } else {
        args.latency_rate.clone()
    };
    if !args.skip_latency && !rates.is_empty() {
        let stamps = scratch.join("stamps.log");
        let stamp = Php::start(&handlers.join("stamp.php"), args.workers, Some(&stamps), &[]).await?;
        let secs = args.latency_duration;
        for rate in rates.into_iter().map(|r| r.max(1.0)) {
            let tag = format!("{rate:.0}");
            wait_broker_quiet(&cpu, beam).await;
            eprintln!("phase C: {rate:.0} msg/s for {secs} s straight to the handler (bench HTTP client)");
            let direct = direct_http(&stamp.url(), rate, secs, c).await?;
            let kept = results.join(format!("amqp_http-stamps-{tag}-direct.txt"));
            let direct_stats = Stats::of(take_stamps(&stamps, direct.start_ns, &kept)?);
            eprintln!("  p50 {:.3} ms, p99 {:.3} ms", ms(direct_stats.p50), ms(direct_stats.p99));

            let queue = format!("bench-lat-{}", short_id());
            rabbit.declare(&queue, queues).await?;
            let log_c = results.join(format!("amqp_http-router-latency-{tag}.log"));
            let mut router = Router::start(&router_bin, scratch, &log_c, args, |admin| {
                router_yaml(args, admin, &queue, &stamp.url())
            })?;
            router.wait_ready(&http).await?;
            wait_broker_quiet(&cpu, beam).await;
            eprintln!("phase C: {rate:.0} msg/s for {secs} s through RabbitMQ and the router");
            let before = cpu.sample(&procs(&stamp, Some(&router), beam));
            let via = if args.trace {
                let path = results.join(format!("amqp_http-trace-{tag}.tsv"));
                let (done, stopped) = tokio::sync::oneshot::channel::<()>();
                let publish = async {
                    let r = publish_paced(&rabbit, &queue, rate, secs).await;
                    let _ = done.send(());
                    r
                };
                let (via, traced) = tokio::join!(publish, trace(&rabbit, &http, &router, &queue, stopped, &path));
                traced?;
                eprintln!("  timeline written to {}", path.display());
                via?
            } else {
                publish_paced(&rabbit, &queue, rate, secs).await?
            };
            router.wait_acked(&http, via.sent, Duration::from_secs(60)).await?;
            let mut after = cpu.sample(&procs(&stamp, Some(&router), beam));
            after.messages = via.sent as f64;
            let handler =
                router.metrics(&http).await.map(|text| HistogramSummary::of(&text, "router_handler_duration_seconds"));
            let stop = router.stop(Duration::from_secs(20));
            let kept = results.join(format!("amqp_http-stamps-{tag}-router.txt"));
            let via_stats = Stats::of(take_stamps(&stamps, via.start_ns, &kept)?);
            eprintln!("  p50 {:.3} ms, p99 {:.3} ms", ms(via_stats.p50), ms(via_stats.p99));
            let mut reference = None;
            if !args.skip_reference {
                let queue = format!("bench-lat-ref-{}", short_id());
                rabbit.declare(&queue, queues).await?;
                let consumer = RefConsumer::spawn(args, &queue, &stamp.url());
                consumer.wait_consuming(Duration::from_secs(10)).await?;
                wait_broker_quiet(&cpu, beam).await;
                eprintln!("phase C: {rate:.0} msg/s for {secs} s through RabbitMQ and the minimal reference consumer");
                let paced = publish_paced(&rabbit, &queue, rate, secs).await?;
                consumer.finish(paced.sent, Duration::from_secs(60)).await?;
                let kept = results.join(format!("amqp_http-stamps-{tag}-reference.txt"));
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
    rabbit.close().await;

    let phase_b = PhaseB { publish_rps, t: tput, left, stop: stop_b, log: log_b_summary, log_path: log_b };
    Ok(report(args, &wrk_c, &wrk_1, &cpu_a, &phase_b, &references, &latency))
}

/// What to account CPU for: label, pid, and whether its children count too (php -S
/// forks its workers; the bench's own children are the processes under test).
type Watched = (&'static str, u32, bool);

fn procs(php: &Php, router: Option<&Router>, beam: Option<u32>) -> Vec<Watched> {
    vec![
        ("php", php.proc.pid(), true),
        ("rabbitmq", beam.unwrap_or(0), true),
        ("router", router.map(|r| r.proc.pid()).unwrap_or(0), false),
        ("bench", std::process::id(), false),
    ]
}

/// Wait (at most 30 s) until RabbitMQ uses under 10 % of a core: after a burst of
/// persistent messages it writes and compacts its message store for a while, and that
/// would land in the next measurement.
async fn wait_broker_quiet(cpu: &CpuReader, beam: Option<u32>) {
    let Some(pid) = beam else { return };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        let a = cpu.proc_secs(pid).unwrap_or(0.0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let b = cpu.proc_secs(pid).unwrap_or(0.0);
        if (b - a) / 0.5 < 0.10 {
            break;
        }
    }
    if t.elapsed() > Duration::from_secs(1) {
        eprintln!("  (waited {:.1} s for RabbitMQ to go quiet)", t.elapsed().as_secs_f64());
    }
}

/// A fresh durable queue holding `n` persistent messages; and the publish rate.
async fn fill_queue(rabbit: &Rabbit, queues: &Queues, prefix: &str, n: u64) -> Result<(String, f64)> {
    let queue = format!("{prefix}-{}", short_id());
    rabbit.declare(&queue, queues).await?;
    eprintln!("publishing {n} persistent messages to {queue}");
    let t = Instant::now();
    let mut publisher = rabbit.publisher().await?;
    for i in 0..n {
        let body = format!("{{\"n\":{i}}}");
        publisher.publish(&queue, body.as_bytes(), props(&format!("m-{i}"), None)).await?;
    }
    publisher.finish().await?;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let ready = rabbit.count(&queue).await?;
    if u64::from(ready) != n {
        bail!("{queue} holds {ready} messages after publishing {n} confirmed ones");
    }
    Ok((queue, rate))
}

/// A reference drain by this process.
struct RefDrain {
    rps: f64,
    secs: f64,
    cpu: CpuUsage,
    /// Context switches of this process per message.
    switches: f64,
}

/// Drain `queue` the plainest way: a lapin consumer with the same prefetch; with `url`,
/// each delivery is POSTed (at most C in flight, a task each, router-like headers) and
/// acked on a 2xx, one ack per message; without, acked at once.
async fn reference_drain(
    rabbit: &Rabbit,
    queue: &str,
    args: &Args,
    url: Option<&str>,
    cpu: &CpuReader,
    php: &Php,
    beam: Option<u32>,
) -> Result<RefDrain> {
    let n = args.messages;
    let ch = rabbit.conn.create_channel().await?;
    ch.basic_qos(args.prefetch, BasicQosOptions::default()).await?;
    let mut consumer =
        ch.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let client = reqwest::Client::new();
    let slots = Arc::new(Semaphore::new(args.concurrency as usize));
    let base = router_like_headers()?;
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let me = std::process::id();
    let watched = procs(php, None, beam);
    let mut acked = 0u64;
    let mut first: Option<(Instant, u64, CpuSample, u64)> = None;
    let deadline = Instant::now() + Duration::from_secs(60 + n / 200);
    while acked < n {
        let done = tokio::select! {
            biased;
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                res.map_err(|e| anyhow!("a delivery task failed: {e}"))??;
                true
            }
            next = consumer.next() => {
                let d = next.ok_or_else(|| anyhow!("the consumer stopped"))??;
                match url {
                    None => {
                        d.acker.ack(BasicAckOptions::default()).await?;
                        true
                    }
                    Some(url) => {
                        let slot = slots.clone().acquire_owned().await?;
                        let (client, url, mut headers) = (client.clone(), url.to_string(), base.clone());
                        if let Some(id) = d.properties.message_id() {
                            if let Ok(v) = HeaderValue::from_str(id.as_str()) {
                                headers.insert(HeaderName::from_static("ce-id"), v);
                            }
                        }
                        tasks.spawn(post_and_ack(client, url, headers, d, slot));
                        false
                    }
                }
            }
        };
        if done {
            acked += 1;
            if first.is_none() {
                first = Some((Instant::now(), acked, cpu.sample(&watched), ctx_switches(me)));
            }
        }
        if Instant::now() > deadline {
            bail!("reference drain timed out: {acked} of {n} acked");
        }
    }
    let end = Instant::now();
    let mut after = cpu.sample(&watched);
    let Some((t0, acked0, before, switches0)) = first else { bail!("nothing acked") };
    after.messages = (n - acked0) as f64;
    let _ = ch.close(200, "".into()).await;
    let secs = end.duration_since(t0).as_secs_f64();
    Ok(RefDrain {
        rps: (n - acked0) as f64 / secs,
        secs,
        cpu: cpu.usage(&before, &after),
        switches: ctx_switches(me).saturating_sub(switches0) as f64 / (n - acked0).max(1) as f64,
    })
}

struct Throughput {
    rps: f64,
    /// Between 10% and 90% acked: the steady state without ramp-up and tail.
    steady_rps: f64,
    secs: f64,
    /// Seconds from starting the process to its first ack.
    first_ack_after: f64,
    handler: HistogramSummary,
    mean_in_flight: f64,
    max_in_flight: f64,
    cpu: CpuUsage,
    /// Context switches of the router per message.
    switches: f64,
    retried: f64,
    dead_lettered: f64,
}

async fn measure_throughput(
    args: &Args,
    http: &reqwest::Client,
    router: &mut Router,
    cpu: &CpuReader,
    php: &Php,
    beam: Option<u32>,
) -> Result<Throughput> {
    let n = args.messages as f64;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60 + args.messages / 200);
    let mut first: Option<(Instant, f64, CpuSample)> = None;
    let mut switches0 = 0;
    // (seconds since start, acked, in flight)
    let mut samples: Vec<(f64, f64, f64)> = Vec::new();
    loop {
        if let Some(text) = router.metrics(http).await {
            let now = Instant::now();
            let acked = sum_metric(&text, "router_messages_acked_total");
            let in_flight = sum_metric(&text, "router_in_flight");
            samples.push((now.duration_since(started).as_secs_f64(), acked, in_flight));
            if acked > 0.0 && first.is_none() {
                first = Some((now, acked, cpu.sample(&procs(php, Some(router), beam))));
                switches0 = ctx_switches(router.proc.pid());
            }
            if acked >= n {
                let mut end = cpu.sample(&procs(php, Some(router), beam));
                let switches = ctx_switches(router.proc.pid()).saturating_sub(switches0) as f64;
                let Some((t0, acked0, start_cpu)) = first else { bail!("no first ack seen") };
                end.messages = n - acked0;
                let secs = now.duration_since(t0).as_secs_f64();
                let at = |fraction: f64| samples.iter().find(|s| s.1 >= fraction * n).map(|s| s.0).unwrap_or(0.0);
                let (t10, t90) = (at(0.1), at(0.9));
                let window: Vec<f64> = samples.iter().filter(|s| s.1 > 0.0 && s.1 < n).map(|s| s.2).collect();
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

/// What a paced run sent.
struct Paced {
    start_ns: u64,
    sent: u64,
    errors: u64,
    /// The rate actually achieved.
    rate: f64,
}

/// Post to the handler at `rate` for `secs`, open loop: every request is scheduled on
/// time, and waits for one of `concurrency` slots like the router's max_in_flight.
async fn direct_http(url: &str, rate: f64, secs: u64, concurrency: u32) -> Result<Paced> {
    let client = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(30)).build()?;
    let slots = Arc::new(Semaphore::new(concurrency as usize));
    let base = router_like_headers()?;
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
            if let Ok(v) = HeaderValue::from_str(&now_ns().to_string()) {
                headers.insert(HeaderName::from_static("x-message-header-sent-ns"), v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("direct-{i}")) {
                headers.insert(HeaderName::from_static("ce-id"), v);
            }
            tasks.spawn(async move {
                let _slot = slots.acquire_owned().await;
                let body = format!("{{\"n\":{i}}}");
                match client.post(&url).headers(headers).body(body).send().await {
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

/// Publish to `queue` at `rate` for `secs`, each message stamped with `sent-ns`.
async fn publish_paced(rabbit: &Rabbit, queue: &str, rate: f64, secs: u64) -> Result<Paced> {
    let mut publisher = rabbit.publisher().await?;
    let start_ns = now_ns();
    let mut pacer = Pacer::new(rate, secs);
    let mut sent = 0u64;
    while let Some(due) = pacer.due().await {
        for _ in 0..due {
            let body = format!("{{\"n\":{sent}}}");
            publisher.publish(queue, body.as_bytes(), props(&format!("lat-{sent}"), Some(now_ns()))).await?;
            sent += 1;
        }
    }
    let elapsed = (now_ns() - start_ns) as f64 / 1e9;
    publisher.finish().await?;
    Ok(Paced { start_ns, sent, errors: 0, rate: sent as f64 / elapsed })
}

/// The minimal reference consumer (lapin + reqwest + one ack per message) on a thread
/// and runtime of its own, like a separate process: it forwards the `sent-ns` header
/// as the router does, for latency comparisons.
struct RefConsumer {
    thread: Option<std::thread::JoinHandle<Result<()>>>,
    acked: Arc<std::sync::atomic::AtomicU64>,
    consuming: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl RefConsumer {
    fn spawn(args: &Args, queue: &str, url: &str) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let acked = Arc::new(AtomicU64::new(0));
        let consuming = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (amqp, queue, url) = (args.amqp_url.clone(), queue.to_string(), url.to_string());
        let (prefetch, c) = (args.prefetch, args.concurrency as usize);
        let flags = (acked.clone(), consuming.clone(), stop.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(ref_consume(amqp, queue, url, prefetch, c, flags))
        });
        RefConsumer { thread: Some(thread), acked, consuming, stop }
    }

    async fn wait_consuming(&self, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        while !self.consuming.load(std::sync::atomic::Ordering::Relaxed) {
            if t.elapsed() > timeout || self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                bail!("the reference consumer did not start");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Wait until `n` are acked, then stop the consumer.
    async fn finish(mut self, n: u64, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        while self.acked.load(std::sync::atomic::Ordering::Relaxed) < n {
            if t.elapsed() > timeout || self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let result = match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(anyhow!("the reference consumer panicked")),
            None => Ok(()),
        };
        result?;
        let acked = self.acked.load(std::sync::atomic::Ordering::Relaxed);
        if acked < n {
            bail!("the reference consumer acked {acked} of {n}");
        }
        Ok(())
    }
}

impl Drop for RefConsumer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn ref_consume(
    amqp: String,
    queue: String,
    url: String,
    prefetch: u16,
    concurrency: usize,
    (acked, consuming, stop): (
        Arc<std::sync::atomic::AtomicU64>,
        Arc<std::sync::atomic::AtomicBool>,
        Arc<std::sync::atomic::AtomicBool>,
    ),
) -> Result<()> {
    use std::sync::atomic::Ordering;
    let rabbit = Rabbit::connect(&amqp).await?;
    let ch = rabbit.conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    consuming.store(true, Ordering::Relaxed);
    let client = reqwest::Client::new();
    let slots = Arc::new(Semaphore::new(concurrency));
    let base = router_like_headers()?;
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            biased;
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                res.map_err(|e| anyhow!("a delivery task failed: {e}"))??;
                acked.fetch_add(1, Ordering::Relaxed);
            }
            next = consumer.next() => {
                let d = next.ok_or_else(|| anyhow!("the consumer stopped"))??;
                let slot = slots.clone().acquire_owned().await?;
                let mut headers = base.clone();
                let sent = d.properties.headers().as_ref().and_then(|h| match h.inner().get("sent-ns") {
                    Some(AMQPValue::LongString(v)) => Some(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                    _ => None,
                });
                if let Some(v) = sent.and_then(|v| HeaderValue::from_str(&v).ok()) {
                    headers.insert(HeaderName::from_static("x-message-header-sent-ns"), v);
                }
                let (client, url) = (client.clone(), url.clone());
                tasks.spawn(post_and_ack(client, url, headers, d, slot));
            }
            _ = tick.tick() => {}
        }
    }
    let _ = ch.close(200, "".into()).await;
    rabbit.close().await;
    Ok(())
}

/// Every 10 ms until `stop`: ms since start, messages ready in `queue`, and the
/// router's received, acked and in-flight counts; as TSV to `path`.
async fn trace(
    rabbit: &Rabbit,
    http: &reqwest::Client,
    router: &Router,
    queue: &str,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    path: &Path,
) -> Result<()> {
    let ch = rabbit.conn.create_channel().await?;
    let start = Instant::now();
    let mut out = String::from("ms\tready\treceived\tacked\tin_flight\n");
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        let opts = QueueDeclareOptions { passive: true, ..Default::default() };
        let ready = ch.queue_declare(queue.into(), opts, FieldTable::default()).await?.message_count();
        let text = router.metrics(http).await.unwrap_or_default();
        let _ = writeln!(
            out,
            "{}\t{ready}\t{}\t{}\t{}",
            start.elapsed().as_millis(),
            sum_metric(&text, "router_messages_received_total"),
            sum_metric(&text, "router_messages_acked_total"),
            sum_metric(&text, "router_in_flight")
        );
    }
    let _ = ch.close(200, "".into()).await;
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// Open-loop pacing: after t seconds, rate × t sends are due.
struct Pacer {
    start: Instant,
    total: Duration,
    rate: f64,
    tick: tokio::time::Interval,
    done: u64,
}

impl Pacer {
    fn new(rate: f64, secs: u64) -> Self {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Pacer { start: Instant::now(), total: Duration::from_secs(secs), rate, tick, done: 0 }
    }

    /// Wait for the next millisecond tick; how many sends are due now, None when over.
    async fn due(&mut self) -> Option<u64> {
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
}

/// Latencies (ns) logged by stamp.php for messages sent at least 1 s after `start_ns`
/// (the first second warms connections up); the log is moved to `keep`.
fn take_stamps(path: &Path, start_ns: u64, keep: &Path) -> Result<Vec<u64>> {
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

struct Stats {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Stats {
    fn of(mut v: Vec<u64>) -> Stats {
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

fn ms(ns: f64) -> f64 {
    ns / 1e6
}

// ---------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------

struct LatencyReport {
    rate: f64,
    secs: u64,
    direct: Paced,
    direct_stats: Stats,
    via: Paced,
    via_stats: Stats,
    /// The same through the minimal reference consumer.
    reference: Option<(Paced, Stats)>,
    cpu: CpuUsage,
    /// The router's own delivery → response histogram over the run.
    handler: Option<HistogramSummary>,
    stop: String,
    log: LogSummary,
    log_path: PathBuf,
}

struct PhaseB {
    publish_rps: f64,
    t: Throughput,
    left: u32,
    stop: String,
    log: LogSummary,
    log_path: PathBuf,
}

fn file_name(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or_default()
}

fn report(
    args: &Args,
    wrk_c: &Wrk,
    wrk_1: &Wrk,
    cpu_a: &CpuUsage,
    b: &PhaseB,
    references: &[(&str, RefDrain)],
    latency: &[LatencyReport],
) -> String {
    let c = args.concurrency;
    let t = &b.t;
    let ratio = t.rps / wrk_c.rps;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut s = String::new();
    let _ = writeln!(s, "# RabbitMQ → message-router → PHP handler, vs the same handler driven by wrk\n");
    let env: Vec<String> = args.router_env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(
        s,
        "{} · commit {} · {cores} cores shared by broker, router, PHP and load generator · \
         handler {} · `php -S` with PHP_CLI_SERVER_WORKERS={} · concurrency C={c} (wrk connections = router max_in_flight) · \
         prefetch {} · balance {} · N={} messages · router env: RUST_LOG={} {}\n",
        utc_now(),
        git_commit(),
        if args.handler == "busy" { format!("busy.php ({} µs CPU per request)", args.busy_us) } else { "noop.php".into() },
        args.workers,
        args.prefetch,
        args.balance,
        args.messages,
        args.rust_log,
        env.join(" ")
    );
    let _ = writeln!(s, "Command: `bench/run {}`\n", std::env::args().skip(1).collect::<Vec<_>>().join(" "));
    let _ = writeln!(s, "## Throughput\n");
    let _ = writeln!(s, "| path | msg/s | p50 | p99 | ratio router/handler |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    let _ = writeln!(
        s,
        "| handler alone (wrk -t1 -c{c}, {} s, mean of runs before and after the router's: {}) | {:.0} | {:.2} ms | {:.2} ms | 1.00 |",
        args.wrk_duration,
        wrk_c.runs.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" / "),
        wrk_c.rps,
        wrk_c.p50_ms,
        wrk_c.p99_ms
    );
    let _ = writeln!(
        s,
        "| RabbitMQ → router → handler (max_in_flight {c}, {:.1} s) | {:.0} | {:.2} ms | {:.2} ms | **{ratio:.2}** |",
        t.secs,
        t.rps,
        t.handler.p50 * 1e3,
        t.handler.p99 * 1e3
    );
    for (what, r) in references {
        let _ = writeln!(s, "| reference: {what} ({:.1} s) | {:.0} | | | {:.2} |", r.secs, r.rps, r.rps / wrk_c.rps);
    }
    let _ = writeln!(
        s,
        "\nmsg/s: wrk's Requests/sec (p50/p99 and CPU from the first run); for the router, the messages acked after the first poll that saw an ack, \
         over the time from that poll to the N-th ack (steady state, 10 % → 90 % acked: {:.0} msg/s, ratio {:.2}). \
         p50/p99: one HTTP round trip at C concurrent requests, saturated: for wrk its request latency, \
         for the router `router_handler_duration_seconds` (delivery handed to the HTTP client → response), \
         interpolated inside histogram buckets, so coarse (mean {:.2} ms exact; wrk mean {:.2} ms). \
         The references drain their own queue of N in this bench process, with the same prefetch and C.\n",
        t.steady_rps,
        t.steady_rps / wrk_c.rps,
        t.handler.mean * 1e3,
        wrk_c.avg_ms
    );
    let _ = writeln!(s, "Details:\n");
    let _ = writeln!(
        s,
        "- wrk -c{c}: {} requests, errors: {}; wrk -c1 (unloaded): {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms",
        wrk_c.requests, wrk_c.errors, wrk_1.rps, wrk_1.p50_ms, wrk_1.p99_ms
    );
    let _ = writeln!(
        s,
        "- publishing the backlog: {:.0} msg/s (persistent, pipelined confirms); \
         router's first ack {:.2} s after its start; queue left with {} ready messages",
        b.publish_rps, t.first_ack_after, b.left
    );
    let _ = writeln!(
        s,
        "- router in flight (sampled every ~20 ms while draining): mean {:.1}, max {:.0} of max_in_flight {c}; \
         retried {}, dead-lettered {}; {:.2} context switches per message",
        t.mean_in_flight, t.max_in_flight, t.retried, t.dead_lettered, t.switches
    );
    for (what, r) in references {
        let _ = writeln!(s, "- reference ({what}): {:.2} context switches per message", r.switches);
    }
    let _ = writeln!(s, "- router stop: {}; log {}: {}", b.stop, file_name(&b.log_path), b.log.describe());
    let budget = cores as f64 * 1e6 / (0.9 * wrk_c.rps);
    let _ = writeln!(
        s,
        "- CPU budget: 90 % of wrk's rate on {cores} cores leaves {budget:.0} µs of machine CPU per message; \
         the router path used {:.0} µs (table below), the handler alone {:.0} µs",
        t.cpu.machine / 100.0 / t.cpu.rate.max(1e-9) * 1e6,
        cpu_a.machine / 100.0 / cpu_a.rate.max(1e-9) * 1e6
    );

    let _ = writeln!(
        s,
        "\n## CPU: % of one core · CPU time per message (the machine has {cores} cores = {}%)\n",
        cores * 100
    );
    let _ = writeln!(
        s,
        "| window | php (all workers) | rabbitmq | router | load generator | machine busy | other processes |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        s,
        "| A: wrk -c{c} | {} | {} | – | {} (wrk) | {} | {} |",
        cpu_a.get("php"),
        cpu_a.get("rabbitmq"),
        cpu_a.get("wrk"),
        cpu_a.machine(),
        cpu_a.other()
    );
    let _ = writeln!(
        s,
        "| B: router draining | {} | {} | {} | {} (bench, polling) | {} | {} |",
        t.cpu.get("php"),
        t.cpu.get("rabbitmq"),
        t.cpu.get("router"),
        t.cpu.get("bench"),
        t.cpu.machine(),
        t.cpu.other()
    );
    for (what, r) in references {
        let _ = writeln!(
            s,
            "| R: {what} | {} | {} | – | {} (bench = the consumer) | {} | {} |",
            r.cpu.get("php"),
            r.cpu.get("rabbitmq"),
            r.cpu.get("bench"),
            r.cpu.machine(),
            r.cpu.other()
        );
    }
    for l in latency {
        let _ = writeln!(
            s,
            "| C: router at {:.0} msg/s | {} | {} | {} | {} (bench, publishing) | {} | {} |",
            l.rate,
            l.cpu.get("php"),
            l.cpu.get("rabbitmq"),
            l.cpu.get("router"),
            l.cpu.get("bench"),
            l.cpu.machine(),
            l.cpu.other()
        );
    }

    for l in latency {
        let d = &l.direct_stats;
        let v = &l.via_stats;
        let _ = writeln!(s, "\n## Latency at a fixed {:.0} msg/s ({} s each, first second dropped)\n", l.rate, l.secs);
        let _ = writeln!(
            s,
            "Measured: wall-clock send time (`sent-ns`, unix ns, taken just before the request or the \
             basic.publish) → the moment `stamp.php` starts running (PHP `microtime()`), same clock, same host.\n"
        );
        let _ = writeln!(s, "| path | rate achieved | samples | p50 | p90 | p99 | p99.9 | max |");
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
        let row = |name: &str, p: &Paced, st: &Stats| {
            format!(
                "| {name} | {:.0} | {} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms |",
                p.rate,
                st.n,
                ms(st.p50),
                ms(st.p90),
                ms(st.p99),
                ms(st.p999),
                ms(st.max)
            )
        };
        let _ = writeln!(
            s,
            "{}",
            row(&format!("handler alone: bench HTTP client, open loop, ≤{c} in flight"), &l.direct, d)
        );
        let _ = writeln!(s, "{}", row("publish → RabbitMQ → router → handler", &l.via, v));
        if let Some((p, st)) = &l.reference {
            let _ = writeln!(s, "{}", row("publish → RabbitMQ → minimal reference consumer → handler", p, st));
        }
        let _ = writeln!(
            s,
            "| **added by broker + router** (difference) | | | {:+.3} ms | {:+.3} ms | {:+.3} ms | {:+.3} ms | |",
            ms(v.p50 - d.p50),
            ms(v.p90 - d.p90),
            ms(v.p99 - d.p99),
            ms(v.p999 - d.p999)
        );
        if let Some((_, r)) = &l.reference {
            let _ = writeln!(
                s,
                "| added by broker + minimal reference consumer (difference) | | | {:+.3} ms | {:+.3} ms | {:+.3} ms | {:+.3} ms | |",
                ms(r.p50 - d.p50),
                ms(r.p90 - d.p90),
                ms(r.p99 - d.p99),
                ms(r.p999 - d.p999)
            );
        }
        if let Some(h) = &l.handler {
            let _ = writeln!(
                s,
                "\nThe router's `router_handler_duration_seconds` over this run (its HTTP round trip alone, \
                 bucket-interpolated): p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms.",
                h.p50 * 1e3,
                h.p99 * 1e3,
                h.mean * 1e3
            );
        }
        let _ = writeln!(
            s,
            "\nFor reference, wrk -t1 -c1 against the handler (closed loop, full round trip incl. response): \
             p50 {:.3} ms, p99 {:.3} ms at {:.0} req/s. Direct-client errors: {}. Router stop: {}; log {}: {}",
            wrk_1.p50_ms,
            wrk_1.p99_ms,
            wrk_1.rps,
            l.direct.errors,
            l.stop,
            file_name(&l.log_path),
            l.log.describe()
        );
    }
    s
}

// ---------------------------------------------------------------------------------
// wrk
// ---------------------------------------------------------------------------------

/// POST a small JSON body with the headers the router sends (HTTP contract).
const WRK_LUA: &str = r#"wrk.method = "POST"
wrk.body = '{"n":12345}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["ce-specversion"] = "1.0"
wrk.headers["ce-id"] = "m-12345"
wrk.headers["ce-source"] = "amqp://127.0.0.1:5672/%2fbench-tput-0123456789"
wrk.headers["ce-type"] = "bench-tput-0123456789"
wrk.headers["ce-time"] = "2026-01-01T00:00:00Z"
wrk.headers["x-router-key"] = "bench-tput-0123456789"
wrk.headers["x-router-attempt"] = "1"
wrk.headers["x-router-route"] = "work"
wrk.headers["x-router-subscription"] = "main"
wrk.headers["x-router-handler"] = "php"
"#;

fn router_like_headers() -> Result<HeaderMap> {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json"),
        ("ce-specversion", "1.0"),
        ("ce-source", "amqp://127.0.0.1:5672/%2fbench-lat-0123456789"),
        ("ce-type", "bench-lat-0123456789"),
        ("ce-time", "2026-01-01T00:00:00Z"),
        ("x-router-key", "bench-lat-0123456789"),
        ("x-router-attempt", "1"),
        ("x-router-route", "work"),
        ("x-router-subscription", "main"),
        ("x-router-handler", "php"),
    ] {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    Ok(h)
}

#[derive(Default)]
struct Wrk {
    rps: f64,
    /// Requests/sec of each run behind `rps` (their mean).
    runs: Vec<f64>,
    avg_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: String,
    cpu_pct: f64,
}

async fn wrk(url: &str, lua: &Path, connections: u32, secs: u64, cpu: &CpuReader) -> Result<Wrk> {
    let out_path = lua.with_file_name(format!("wrk-{}.out", short_id()));
    let out = std::fs::File::create(&out_path)?;
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{secs}s"), "--latency", "-s"])
        .arg(lua)
        .arg(url)
        .stdout(out)
        .stderr(Stdio::null());
    let mut p = Proc::spawn(&mut cmd, "wrk").context("starting wrk (is it installed?)")?;
    let started = Instant::now();
    let mut cpu_secs = 0.0;
    let status = loop {
        if let Some(status) = p.exited() {
            break status;
        }
        if let Some(t) = cpu.proc_secs(p.pid()) {
            cpu_secs = t;
        }
        if started.elapsed() > Duration::from_secs(secs + 30) {
            bail!("wrk did not finish");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    if !status.success() {
        bail!("wrk failed ({status}):\n{text}");
    }
    let mut w = parse_wrk(&text).ok_or_else(|| anyhow!("cannot read wrk's output:\n{text}"))?;
    w.cpu_pct = 100.0 * cpu_secs / secs as f64;
    Ok(w)
}

fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut w = Wrk { errors: "none".into(), ..Wrk::default() };
    let (mut rps, mut p50, mut p99) = (None, None, None);
    let mut errors = Vec::new();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Requests/sec:") => rps = words.next().and_then(|v| v.parse().ok()),
            Some("50%") => p50 = words.next().and_then(wrk_ms),
            Some("99%") => p99 = words.next().and_then(wrk_ms),
            Some("Latency") if w.avg_ms == 0.0 => w.avg_ms = words.next().and_then(wrk_ms).unwrap_or(0.0),
            Some(n) if line.contains(" requests in ") => w.requests = n.parse().unwrap_or(0),
            _ if line.starts_with("Non-2xx") || line.starts_with("Socket errors") => errors.push(line.to_string()),
            _ => {}
        }
    }
    if !errors.is_empty() {
        w.errors = errors.join("; ");
    }
    w.rps = rps?;
    w.runs = vec![w.rps];
    w.p50_ms = p50?;
    w.p99_ms = p99?;
    Some(w)
}

/// wrk's durations ("812.00us", "1.23ms", "2.01s", "1.00m") in milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => num / 1e3,
        "ms" => num,
        "s" => num * 1e3,
        "m" => num * 60e3,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------

/// A child in its own process group, killed with its whole group when dropped.
struct Proc {
    child: Child,
    name: String,
    reaped: bool,
}

impl Proc {
    fn spawn(cmd: &mut Command, name: &str) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let child = cmd.process_group(0).spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc { child, name: name.to_string(), reaped: false })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.reaped = true;
                Some(status)
            }
            _ => None,
        }
    }

    /// SIGTERM, then wait up to `timeout` (SIGKILL after). Describes what happened.
    fn terminate(&mut self, timeout: Duration) -> String {
        if let Some(status) = self.exited() {
            return format!("{} had already exited ({status})", self.name);
        }
        signal(&self.pid().to_string(), "TERM");
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Some(status) = self.exited() {
                return format!("exited {:.2} s after SIGTERM ({status})", t.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        format!("did not exit within {timeout:?} of SIGTERM: killed")
    }

    fn kill(&mut self) {
        if !self.reaped {
            // The group: php -S forks its workers into it.
            signal(&format!("-{}", self.pid()), "KILL");
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(target: &str, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `php -S` serving one script with W workers.
struct Php {
    proc: Proc,
    port: u16,
}

impl Php {
    async fn start(script: &Path, workers: u32, stamp_log: Option<&Path>, env: &[(&str, &str)]) -> Result<Self> {
        let port = free_port()?;
        let mut cmd = Command::new("php");
        cmd.arg("-S")
            .arg(format!("127.0.0.1:{port}"))
            .arg(script)
            .env("PHP_CLI_SERVER_WORKERS", workers.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(log) = stamp_log {
            cmd.env("STAMP_LOG", log);
        }
        cmd.envs(env.iter().copied());
        let mut proc = Proc::spawn(&mut cmd, "php -S")?;
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = proc.exited() {
                bail!("php -S exited at start ({status})");
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("php -S did not listen on {port} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Php { proc, port })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

/// The router under test.
struct Router {
    proc: Proc,
    admin: u16,
    log: PathBuf,
}

impl Router {
    fn start(bin: &Path, scratch: &Path, log: &Path, args: &Args, yaml: impl Fn(u16) -> String) -> Result<Self> {
        let admin = free_port()?;
        let config = scratch.join(format!("router-{admin}.yaml"));
        std::fs::write(&config, yaml(admin)).context("writing the router config")?;
        let stderr = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", &args.rust_log)
            .envs(args.router_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let proc = Proc::spawn(&mut cmd, "message-router")?;
        Ok(Router { proc, admin, log: log.to_path_buf() })
    }

    async fn metrics(&self, http: &reqwest::Client) -> Option<String> {
        let r = http.get(format!("http://127.0.0.1:{}/metrics", self.admin)).send().await.ok()?;
        r.text().await.ok()
    }

    async fn wait_ready(&mut self, http: &reqwest::Client) -> Result<()> {
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

    async fn wait_acked(&mut self, http: &reqwest::Client, n: u64, timeout: Duration) -> Result<()> {
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

    fn stop(&mut self, timeout: Duration) -> String {
        self.proc.terminate(timeout)
    }
}

fn router_yaml(args: &Args, admin: u16, queue: &str, endpoint: &str) -> String {
    format!(
        r#"log: {{ level: info }}
admin: {{ listen: "127.0.0.1:{admin}" }}
shutdown: {{ grace_period: 10s }}
transports:
  rabbit: {{ type: amqp, url: "{url}" }}
handlers:
  php:
    endpoints: ["{endpoint}"]
    balance: {balance}
    timeout: 10s
    max_in_flight: {c}
subscriptions:
  main:
    transport: rabbit
    queue: {queue}
    prefetch: {prefetch}
    retry: {{ max_attempts: 3, initial_delay: 1s, multiplier: 1, max_delay: 1s, jitter: 0 }}
routes:
  - {{ name: work, match: {{ routing_key: "{queue}" }}, handler: php }}
"#,
        url = args.amqp_url,
        balance = args.balance,
        c = args.concurrency,
        prefetch = args.prefetch,
    )
}

/// Warnings and errors in a router log.
struct LogSummary {
    warn: usize,
    error: usize,
    first: Vec<String>,
}

impl LogSummary {
    fn read(path: &Path) -> Self {
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

    fn describe(&self) -> String {
        if self.warn + self.error == 0 {
            "no warnings or errors".into()
        } else {
            format!("{} warnings, {} errors, first: `{}`", self.warn, self.error, self.first.join("` / `"))
        }
    }
}

// ---------------------------------------------------------------------------------
// RabbitMQ
// ---------------------------------------------------------------------------------

type Queues = Arc<Mutex<Vec<String>>>;

struct Rabbit {
    conn: Connection,
}

impl Rabbit {
    async fn connect(url: &str) -> Result<Self> {
        let props = ConnectionProperties::default().with_connection_name("router-bench".into());
        let conn = Connection::connect(url, props).await.with_context(|| format!("connecting to RabbitMQ at {url}"))?;
        Ok(Rabbit { conn })
    }

    /// A durable queue, remembered (with the router's `.dlq` and retry queue) for deletion.
    async fn declare(&self, name: &str, queues: &Queues) -> Result<()> {
        if let Ok(mut q) = queues.lock() {
            q.extend([name.to_string(), format!("{name}.dlq"), format!("{name}.retry.1000ms")]);
        }
        let ch = self.conn.create_channel().await?;
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring {name}"))?;
        let _ = ch.close(200, "".into()).await;
        Ok(())
    }

    /// Messages ready in `queue`.
    async fn count(&self, queue: &str) -> Result<u32> {
        let ch = self.conn.create_channel().await?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let _ = ch.close(200, "".into()).await;
        Ok(q.message_count())
    }

    async fn publisher(&self) -> Result<Publisher> {
        let channel = self.conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Publisher { channel, pending: FuturesUnordered::new(), window: 4096, nacked: 0 })
    }

    async fn close(self) {
        let _ = self.conn.close(200, "".into()).await;
    }
}

/// Publishes with confirms pipelined: up to `window` unconfirmed at a time.
struct Publisher {
    channel: Channel,
    pending: FuturesUnordered<PublisherConfirm>,
    window: usize,
    nacked: u64,
}

impl Publisher {
    async fn publish(&mut self, queue: &str, body: &[u8], props: BasicProperties) -> Result<()> {
        let confirm =
            self.channel.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, props).await?;
        self.pending.push(confirm);
        while self.pending.len() >= self.window {
            if let Some(c) = self.pending.next().await {
                self.count(c)?;
            }
        }
        while let Some(Some(c)) = self.pending.next().now_or_never() {
            self.count(c)?;
        }
        Ok(())
    }

    fn count(&mut self, c: lapin::Result<lapin::Confirmation>) -> Result<()> {
        if !c?.is_ack() {
            self.nacked += 1;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        while let Some(c) = self.pending.next().await {
            self.count(c)?;
        }
        if self.nacked > 0 {
            bail!("the broker nacked {} publishes", self.nacked);
        }
        let _ = self.channel.close(200, "".into()).await;
        Ok(())
    }
}

fn props(id: &str, sent_ns: Option<u64>) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(ns) = sent_ns {
        headers.insert("sent-ns".into(), AMQPValue::LongString(ns.to_string().as_str().into()));
    }
    BasicProperties::default()
        .with_message_id(id.into())
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_timestamp(now_ns() / 1_000_000_000)
        .with_headers(headers)
}

async fn delete_queues(url: &str, queues: &Queues) {
    let names: Vec<String> = queues.lock().map(|q| q.clone()).unwrap_or_default();
    if names.is_empty() {
        return;
    }
    let Ok(rabbit) = Rabbit::connect(url).await else {
        eprintln!("amqp-http: cannot connect to delete the queues {names:?}");
        return;
    };
    for name in &names {
        // A channel per delete: an error closes only that channel.
        if let Ok(ch) = rabbit.conn.create_channel().await {
            let _ = ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
            let _ = ch.close(200, "".into()).await;
        }
    }
    rabbit.close().await;
}

// ---------------------------------------------------------------------------------
// Metrics text
// ---------------------------------------------------------------------------------

/// Sum of every series of `name` (all label sets).
fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

struct HistogramSummary {
    p50: f64,
    p99: f64,
    mean: f64,
}

impl HistogramSummary {
    /// Quantiles as Prometheus' histogram_quantile computes them (linear inside a bucket).
    fn of(text: &str, name: &str) -> Self {
        let bucket = format!("{name}_bucket{{");
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for line in text.lines().filter(|l| l.starts_with(&bucket)) {
            let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("");
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
            let count = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            match buckets.iter_mut().find(|b| b.0 == le) {
                Some(b) => b.1 += count,
                None => buckets.push((le, count)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
        let q = |q: f64| -> f64 {
            let rank = q * total;
            let mut prev = (0.0, 0.0);
            for &(le, count) in &buckets {
                if count >= rank && count > 0.0 {
                    if le.is_infinite() {
                        return prev.0;
                    }
                    return prev.0 + (le - prev.0) * (rank - prev.1) / (count - prev.1).max(f64::MIN_POSITIVE);
                }
                prev = (le, count);
            }
            f64::NAN
        };
        let sum = sum_metric(text, &format!("{name}_sum"));
        let count = sum_metric(text, &format!("{name}_count"));
        HistogramSummary { p50: q(0.5), p99: q(0.99), mean: sum / count.max(1.0) }
    }
}

// ---------------------------------------------------------------------------------
// CPU accounting from /proc
// ---------------------------------------------------------------------------------

struct CpuReader {
    ticks: f64,
}

struct CpuSample {
    at: Instant,
    /// CPU seconds per label (a process and its children).
    procs: Vec<(String, f64)>,
    busy: f64,
    total: f64,
    /// Messages handled since the sample this one is compared with (set by the caller).
    messages: f64,
}

struct CpuUsage {
    /// % of one core per label.
    procs: Vec<(String, f64)>,
    /// % of one core, all cores together.
    machine: f64,
    /// Messages per second in the window, for CPU time per message.
    rate: f64,
}

impl CpuUsage {
    /// "87% · 56 µs" : share of one core, and CPU time per message.
    fn get(&self, label: &str) -> String {
        match self.procs.iter().find(|(l, _)| l == label) {
            Some((_, pct)) if self.rate > 0.0 => format!("{pct:.0}% · {:.0} µs", pct / 100.0 / self.rate * 1e6),
            Some((_, pct)) => format!("{pct:.0}%"),
            None => "–".into(),
        }
    }

    /// Machine CPU not used by any watched process: other work on the box (noise).
    fn other(&self) -> String {
        let other = (self.machine - self.procs.iter().map(|p| p.1).sum::<f64>()).max(0.0);
        format!("{other:.0}%")
    }

    fn machine(&self) -> String {
        if self.rate > 0.0 {
            format!("{:.0}% · {:.0} µs", self.machine, self.machine / 100.0 / self.rate * 1e6)
        } else {
            format!("{:.0}%", self.machine)
        }
    }
}

/// Context switches (voluntary and not) of every thread of `pid` so far.
fn ctx_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

impl CpuReader {
    fn new() -> Self {
        let ticks = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
            .unwrap_or(100.0);
        CpuReader { ticks }
    }

    /// (pid, ppid, utime + stime in seconds) from /proc/PID/stat.
    fn stat(&self, path: &Path) -> Option<(u32, u32, f64)> {
        let text = std::fs::read_to_string(path).ok()?;
        let (head, rest) = text.rsplit_once(')')?;
        let pid = head.split(' ').next()?.parse().ok()?;
        // Fields after the command: state ppid ... utime (14th field) stime (15th).
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((pid, ppid, (utime + stime) / self.ticks))
    }

    fn proc_secs(&self, pid: u32) -> Option<f64> {
        self.stat(&PathBuf::from(format!("/proc/{pid}/stat"))).map(|s| s.2)
    }

    fn find_comm(&self, comm: &str) -> Option<u32> {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let c = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (c.trim() == comm).then_some(pid)
        })
    }

    fn sample(&self, procs: &[Watched]) -> CpuSample {
        let all: Vec<(u32, u32, f64)> = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    // Numeric entries only: /proc/self and /proc/thread-self would count
                    // this process again.
                    .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
                    .filter_map(|e| self.stat(&e.path().join("stat")))
                    .collect()
            })
            .unwrap_or_default();
        let procs = procs
            .iter()
            .filter(|(_, pid, _)| *pid != 0)
            .map(|(label, pid, children)| {
                let secs: f64 = all.iter().filter(|p| p.0 == *pid || (*children && p.1 == *pid)).map(|p| p.2).sum();
                (label.to_string(), secs)
            })
            .collect();
        let (busy, total) = machine_ticks();
        CpuSample { at: Instant::now(), procs, busy, total, messages: 0.0 }
    }

    fn usage(&self, a: &CpuSample, b: &CpuSample) -> CpuUsage {
        let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
        let procs = b
            .procs
            .iter()
            .filter_map(|(label, secs)| {
                let before = a.procs.iter().find(|(l, _)| l == label)?.1;
                Some((label.clone(), 100.0 * (secs - before) / wall))
            })
            .collect();
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        let machine = 100.0 * cores * (b.busy - a.busy) / (b.total - a.total).max(1.0);
        CpuUsage { procs, machine, rate: b.messages / wall }
    }
}

/// (busy, total) jiffies of all cores from /proc/stat.
fn machine_ticks() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else { return (0.0, 0.0) };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy, busy + get(3) + get(4))
}

// ---------------------------------------------------------------------------------
// Small things
// ---------------------------------------------------------------------------------

/// A scratch directory removed at drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("router-bench-{}", short_id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The workspace root (this crate lives in `bench/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_string()
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn git_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root())
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    if dirty {
        format!("{commit}+changes")
    } else {
        commit
    }
}

/// What every reference consumer does per message: POST it, release the concurrency
/// slot, ack only after a 2xx.
async fn post_and_ack(
    client: reqwest::Client,
    url: String,
    headers: reqwest::header::HeaderMap,
    d: lapin::message::Delivery,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Result<()> {
    let r = client.post(&url).headers(headers).body(d.data).send().await?;
    let status = r.status();
    let _ = r.bytes().await;
    drop(slot);
    if !status.is_success() {
        bail!("the handler answered {status}");
    }
    d.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}
