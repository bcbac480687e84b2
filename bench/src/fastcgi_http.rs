//! Benchmark (not a test): RabbitMQ → `message-router` → PHP-FPM over FastCGI, side by
//! side in one run with `wrk` → nginx → the same FPM pool, and with RabbitMQ → router →
//! nginx → FPM over HTTP. Prints a markdown report and writes it to
//! `bench/results/fastcgi_http.md` (router logs and raw latency samples go next to
//! it). Run it with `bench/run fastcgi` (builds release); `--help` lists the knobs.
//!
//! One PHP-FPM master of the bench's own (`fpm`: Debian's php8.2-fpm, `pm = static`,
//! `pm.max_children` = W, on a private unix socket by default) serves every phase, and
//! nginx of its own (`nginx`: Debian's, one worker process) sits in front of it where
//! HTTP is needed. The RabbitMQ side is the amqp bench's (`router_bench::amqp`), and so
//! are the router phases (`router_bench::phases::Bench`):
//!
//! - **A**: wrk → nginx → FPM running `noop.php`, two ways, as nginx can do it best:
//!   `wrk -t1 -cC` with a new FastCGI connection per request (Debian's default: FPM's
//!   listen backlog queues what its workers cannot take yet), and `wrk -t1 -cW` with
//!   upstream `keepalive W` and `fastcgi_keep_conn on`. Kept connections work only up
//!   to W clients and one nginx worker: each holds an FPM worker while it is open, and
//!   nginx (without the commercial `queue`) cannot wait for one, so at `-cC` the
//!   connections beyond W wait in FPM's backlog and C − W clients get no answer at
//!   all, and a second nginx worker keeps W more of its own (the keepalive cache is
//!   per worker), which stalls the first one's new connections the same way. Both are
//!   repeated after C, and each one's two rates averaged; the better is "nginx at its
//!   best";
//! - **B**: the router (handler `type: fastcgi`, the pool's endpoint, `max_in_flight`
//!   C, `max_connections` W: it waits for a free kept connection itself) drains a
//!   backlog of N persistent messages;
//! - **C**: the same with the handler `type: http` pointing at nginx (a new FastCGI
//!   connection per request: the router has C requests in flight);
//! - **L**: latency at fixed rates (default a quarter and a half of B's rate) with
//!   `stamp.php`: the bench's HTTP client → nginx → FPM (the handler's own time),
//!   publish → RabbitMQ → router → FastCGI → FPM, and publish → … → router → nginx → FPM.
//!
//! nginx runs only in the phases that use it: the connections it keeps to the pool
//! would hold FPM workers the router's `max_connections` counts on.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use router_bench::amqp::{Amqp, DEFAULT_URL};
use router_bench::broker::Broker;
use router_bench::cpu::CpuUsage;
use router_bench::fpm::{Fpm, Listen};
use router_bench::latency::{Paced, Stats};
use router_bench::nginx::{Nginx, NginxSettings};
use router_bench::opts::Common;
use router_bench::phases::{finish, wrk_measured, Bench, RouterLatency};
use router_bench::report::{command, latency_diff, latency_row, us, PhaseB, LATENCY_HEAD};
use router_bench::router::Target;
use router_bench::wrk::{lua, wrk, Wrk};
use router_bench::{file_name, git_commit, ms, utc_now, Scratch};

/// The report is bench/results/fastcgi_http.md.
const SLUG: &str = "fastcgi_http";

/// RabbitMQ → message-router → PHP-FPM over FastCGI, against wrk → nginx → the same
/// pool, and against the router → nginx → the pool over HTTP.
#[derive(Parser, Debug, Clone)]
#[command(name = "fastcgi-http")]
struct Args {
    #[command(flatten)]
    common: Common,
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_URL)]
    amqp_url: String,
    /// Where the PHP-FPM pool listens; nginx and the router reach it the same way.
    #[arg(long, value_enum, default_value = "unix")]
    fpm_listen: Listen,
    /// nginx's worker_processes where it opens a new FastCGI connection per request
    /// (phase C and one run of A); with kept connections it always has one.
    #[arg(long, default_value_t = 1)]
    nginx_workers: u32,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let broker = Amqp::new(&args.amqp_url, &args.common);
    let scratch = match Scratch::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fastcgi-http: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let bench = run(&args, &broker, &scratch.0);
    finish("fastcgi-http", &args.common, SLUG, &broker, bench).await
}

/// One latency rate: the handler's own time through nginx, and the two router paths.
struct Latency {
    rate: f64,
    direct: Paced,
    direct_stats: Stats,
    fastcgi: RouterLatency,
    http: RouterLatency,
}

/// One way of phase A: nginx run with `settings`, loaded by `wrk -c<connections>`.
struct Front {
    settings: NginxSettings,
    connections: u32,
    /// The first run (latencies, requests, errors), with the mean rate of all runs.
    wrk: Wrk,
    cpu: CpuUsage,
}

impl Front {
    fn describe(&self) -> String {
        describe(self.settings, self.connections)
    }
}

/// "wrk -t1 -c16 → nginx (1 worker, a new FastCGI connection per request) → PHP-FPM".
fn describe(settings: NginxSettings, connections: u32) -> String {
    format!("wrk -t1 -c{connections} → nginx ({}) → PHP-FPM", nginx_setup(settings))
}

/// "1 worker, upstream `keepalive 4`".
fn nginx_setup(settings: NginxSettings) -> String {
    let workers = settings.workers;
    let s = if workers == 1 { "" } else { "s" };
    if settings.keepalive > 0 {
        format!("{workers} worker{s}, upstream `keepalive {}`", settings.keepalive)
    } else {
        format!("{workers} worker{s}, a new FastCGI connection per request")
    }
}

async fn run(args: &Args, b: &Amqp, scratch: &Path) -> Result<String> {
    let o = &args.common;
    let bench = Bench::new(o, b, scratch, SLUG)?;
    let cpu = &bench.cpu;
    let (c, w) = (o.concurrency, o.workers);
    let fresh = NginxSettings { workers: args.nginx_workers, keepalive: 0 };
    let kept = NginxSettings { workers: 1, keepalive: w };
    let stamps = scratch.join("stamps.log");
    let mut env = vec![("STAMP_LOG", stamps.display().to_string())];
    if o.handler == "busy" {
        env.push(("BUSY_US", o.busy_us.to_string()));
    }
    eprintln!("starting php-fpm8.2 (pm = static, {w} workers, {:?})", args.fpm_listen);
    let fpm = Fpm::start(scratch, w, args.fpm_listen, &env).await?;
    let nginx_dir = scratch.join("nginx");
    let start_nginx = |settings| Nginx::start(&nginx_dir, &bench.handlers, &fpm, settings);
    let script = format!("{}.php", o.handler);
    let (script_path, stamp_path) = (bench.handlers.join(&script), bench.handlers.join("stamp.php"));
    let fastcgi = |script| Target::Fastcgi { endpoint: &fpm.endpoint, script, max_connections: w };
    let (broker, me, pool) = (bench.broker(), bench.me(), fpm.watched());
    let lua_path = scratch.join("post.lua");
    std::fs::write(&lua_path, lua(&b.headers())).context("writing the wrk script")?;

    // ---- Phase A: wrk → nginx → FPM, both ways.
    let mut fronts = Vec::new();
    for (settings, connections) in [(fresh, c), (kept, w)] {
        let nginx = start_nginx(settings).await?;
        let url = nginx.url(&script);
        if o.warmup > 0 {
            eprintln!("phase A: warming up ({} s)", o.warmup);
            wrk(&url, &lua_path, connections, o.warmup, cpu).await?;
        }
        eprintln!("phase A: {}, {} s", describe(settings, connections), o.wrk_duration);
        let watched = [pool, nginx.watched()];
        let (wrk, usage) = wrk_measured(&url, &lua_path, connections, o.wrk_duration, cpu, &watched).await?;
        nginx.stop();
        fronts.push(Front { settings, connections, wrk, cpu: usage });
    }
    let nginx = start_nginx(kept).await?;
    let unloaded = o.wrk_duration.min(5);
    eprintln!("phase A: wrk -t1 -c1 -d{unloaded}s → nginx (keepalive) → PHP-FPM (unloaded round trip)");
    let wrk_1 = wrk(&nginx.url(&script), &lua_path, 1, unloaded, cpu).await?;
    eprintln!("  {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms", wrk_1.rps, wrk_1.p50_ms, wrk_1.p99_ms);
    nginx.stop();

    // ---- Phase B: the router over FastCGI.
    eprintln!("phase B: RabbitMQ → router → FastCGI → PHP-FPM");
    let via_fastcgi = bench.router_drain("router-fastcgi.log", &fastcgi(&script_path), &[pool, broker, me]).await?;

    // ---- Phase C: the router over HTTP to nginx.
    let nginx = start_nginx(fresh).await?;
    eprintln!("phase C: RabbitMQ → router → HTTP → nginx → PHP-FPM");
    let watched = [pool, nginx.watched(), broker, me];
    let via_http = bench.router_drain("router-http.log", &Target::Http(&nginx.url(&script)), &watched).await?;
    nginx.stop();

    // wrk once more: the box's speed drifts, so the ratios use the mean of a run
    // before the router's and one after.
    for front in &mut fronts {
        let nginx = start_nginx(front.settings).await?;
        bench.quiet().await;
        eprintln!("phase A again: {}, {} s", front.describe(), o.wrk_duration);
        let again = wrk(&nginx.url(&script), &lua_path, front.connections, o.wrk_duration, cpu).await?;
        eprintln!("  {:.0} req/s", again.rps);
        front.wrk.add_run(again.rps);
        nginx.stop();
    }
    let best = fronts.iter().map(|f| f.wrk.rps).fold(0.0, f64::max);
    for (what, b) in [("FastCGI", &via_fastcgi), ("HTTP via nginx", &via_http)] {
        eprintln!("router, {what}: {:.0} msg/s, {:.2} of nginx at its best ({best:.0} req/s)", b.t.rps, b.t.rps / best);
    }

    // ---- Phase L: latency at fixed rates.
    let mut latency = Vec::new();
    for rate in bench.latency_rates(via_fastcgi.t.rps) {
        let tag = format!("{rate:.0}");
        eprintln!("phase L: {rate:.0} msg/s, RabbitMQ → router → FastCGI → PHP-FPM");
        let target = fastcgi(&stamp_path);
        let fastcgi =
            bench.router_latency(rate, &format!("{tag}-fastcgi"), &target, &stamps, &[pool, broker, me]).await?;
        let nginx = start_nginx(fresh).await?;
        let url = nginx.url("stamp.php");
        eprintln!("phase L: {rate:.0} msg/s, bench HTTP client → nginx → PHP-FPM");
        let (direct, direct_stats) = bench.direct_latency(rate, &format!("{tag}-direct"), &url, &stamps).await?;
        eprintln!("phase L: {rate:.0} msg/s, RabbitMQ → router → HTTP → nginx → PHP-FPM");
        let watched = [pool, nginx.watched(), broker, me];
        let http = bench.router_latency(rate, &format!("{tag}-http"), &Target::Http(&url), &stamps, &watched).await?;
        nginx.stop();
        latency.push(Latency { rate, direct, direct_stats, fastcgi, http });
    }

    Ok(report(args, &fpm, &fronts, &wrk_1, &via_fastcgi, &via_http, &latency))
}

fn cores() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    fpm: &Fpm,
    fronts: &[Front],
    wrk_1: &Wrk,
    fastcgi: &PhaseB,
    http: &PhaseB,
    latency: &[Latency],
) -> String {
    let o = &args.common;
    let (c, w) = (o.concurrency, o.workers);
    let cores = cores();
    let broker = <Amqp as Broker>::PROCESS.0;
    let best = fronts.iter().map(|f| f.wrk.rps).fold(0.0, f64::max);
    let mut s = String::new();
    let _ = writeln!(s, "# FastCGI: RabbitMQ → message-router → PHP-FPM, vs wrk → nginx → the same PHP-FPM\n");
    let env: Vec<String> = o.router_env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(
        s,
        "{} · commit {} · {cores} cores shared by RabbitMQ, router, nginx, PHP-FPM and load generator · \
         php-fpm8.2 pool `pm = static`, `pm.max_children = {w}`, on `{}` · handler {} · nginx {} \
         · concurrency C={c} (wrk connections = router `max_in_flight`; \
         the FastCGI handler's `max_connections` = {w}) · prefetch {} · N={} messages · \
         router env: RUST_LOG={} {}\n",
        utc_now(),
        git_commit(),
        fpm.endpoint,
        if o.handler == "busy" { format!("busy.php ({} µs CPU per request)", o.busy_us) } else { "noop.php".into() },
        nginx_version(),
        o.prefetch,
        o.messages,
        o.rust_log,
        env.join(" ")
    );
    let _ = writeln!(s, "Command: `{}`\n", command(SLUG));

    let _ = writeln!(s, "## Throughput\n");
    let _ = writeln!(
        s,
        "| path | msg/s | ratio to nginx at its best | router CPU/msg (kernel) | nginx CPU/msg | PHP-FPM CPU/msg | \
         {} CPU/msg | machine CPU/msg |",
        <Amqp as Broker>::NAME
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let per = |u: &CpuUsage, label: &str| us(u.us_per_message(label));
    for f in fronts {
        let _ = writeln!(
            s,
            "| A: {} (mean of {} s runs before B and after C: {}) | {:.0} | {:.2} | – | {} | {} | – | {:.0} µs |",
            f.describe(),
            o.wrk_duration,
            f.wrk.runs.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" / "),
            f.wrk.rps,
            f.wrk.rps / best,
            per(&f.cpu, "nginx"),
            per(&f.cpu, "fpm"),
            f.cpu.machine_us()
        );
    }
    let fresh = nginx_setup(NginxSettings { workers: args.nginx_workers, keepalive: 0 });
    let paths = [
        ("B: RabbitMQ → router → FastCGI → PHP-FPM".to_string(), fastcgi),
        (format!("C: RabbitMQ → router → HTTP → nginx ({fresh}) → PHP-FPM"), http),
    ];
    for (what, b) in paths {
        let u = &b.t.cpu;
        let kernel = u.kernel_share("router").map(|k| format!(" ({:.0} %)", k * 100.0)).unwrap_or_default();
        let _ = writeln!(
            s,
            "| {what} | {:.0} | **{:.2}** | {}{kernel} | {} | {} | {} | {:.0} µs |",
            b.t.rps,
            b.t.rps / best,
            per(u, "router"),
            per(u, "nginx"),
            per(u, "fpm"),
            per(u, broker),
            u.machine_us()
        );
    }
    let _ = writeln!(
        s,
        "\nmsg/s: wrk's Requests/sec; for the router, the messages acked after the first poll of `/metrics` \
         that saw an ack, over the time from that poll to the N-th ack. Ratio: to the faster of the two wrk \
         runs ({best:.0} req/s). CPU/msg: CPU time of the process (with its children: nginx's and FPM's \
         workers) over the measured window, per message; the router's share in the kernel in brackets. \
         nginx keeps FastCGI connections only for as many clients as FPM has workers, with one nginx \
         worker: each kept connection holds an FPM worker while it is open, and nginx cannot wait for \
         one, so with C={c} clients on {w} FPM workers C − {w} clients would get no answer (and a second \
         nginx worker keeps {w} more). The router waits for a free kept connection itself \
         (`max_connections` {w}, `max_in_flight` {c}).\n"
    );
    let _ = writeln!(s, "Details:\n");
    for f in fronts {
        let _ = writeln!(
            s,
            "- {}: {} requests, errors: {}, p50 {:.2} ms, p99 {:.2} ms (first run)",
            f.describe(),
            f.wrk.requests,
            f.wrk.errors,
            f.wrk.p50_ms,
            f.wrk.p99_ms
        );
    }
    let _ = writeln!(
        s,
        "- wrk -c1 → nginx (keepalive) → PHP-FPM, unloaded: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms",
        wrk_1.rps, wrk_1.p50_ms, wrk_1.p99_ms
    );
    for (what, b) in [("B (FastCGI)", fastcgi), ("C (HTTP via nginx)", http)] {
        let t = &b.t;
        let _ = writeln!(
            s,
            "- {what}: backlog written at {:.0} msg/s; {:.1} s draining (steady 10 → 90 %: {:.0} msg/s); first ack \
             {:.2} s after the router's start; in flight mean {:.1}, max {:.0} of {c}; handler round trip \
             (`router_handler_duration_seconds`) p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms; {:.2} context switches \
             per message; retried {}, dead-lettered {}, {} left unacked; stop: {}; log {}: {}",
            b.publish_rps,
            t.secs,
            t.steady_rps,
            t.first_ack_after,
            t.mean_in_flight,
            t.max_in_flight,
            t.handler.p50 * 1e3,
            t.handler.p99 * 1e3,
            t.handler.mean * 1e3,
            t.switches,
            t.retried,
            t.dead_lettered,
            b.left,
            b.stop,
            file_name(&b.log_path),
            b.log.describe()
        );
    }

    let _ = writeln!(
        s,
        "\n## CPU: % of one core · CPU time per message (the machine has {cores} cores = {}%)\n",
        cores * 100
    );
    let _ = writeln!(
        s,
        "| window | PHP-FPM (all workers) | nginx | {broker} | router | load generator | machine busy | other processes |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut row = |window: String, u: &CpuUsage, load: String| {
        let _ = writeln!(
            s,
            "| {window} | {} | {} | {} | {} | {load} | {} | {} |",
            u.get("fpm"),
            u.get("nginx"),
            u.get(broker),
            u.get("router"),
            u.machine(),
            u.other()
        );
    };
    for f in fronts {
        row(format!("A: {}", f.describe()), &f.cpu, format!("{} (wrk)", f.cpu.get("wrk")));
    }
    for (what, b) in [("B: router → FastCGI", fastcgi), ("C: router → nginx", http)] {
        row(format!("{what}, draining"), &b.t.cpu, format!("{} (bench, polling)", b.t.cpu.get("bench")));
    }
    for l in latency {
        for (what, r) in [("FastCGI", &l.fastcgi), ("nginx", &l.http)] {
            let publishing = format!("{} (bench, publishing)", r.cpu.get("bench"));
            row(format!("L: router → {what} at {:.0} msg/s", l.rate), &r.cpu, publishing);
        }
    }

    for l in latency {
        latency_section(&mut s, l, o.latency_duration, c);
    }
    s
}

fn latency_section(s: &mut String, l: &Latency, secs: u64, c: u32) {
    let d = &l.direct_stats;
    let _ = writeln!(s, "\n## Latency at a fixed {:.0} msg/s ({secs} s each, first second dropped)\n", l.rate);
    let _ = writeln!(
        s,
        "Measured: wall-clock send time (`sent-ns`, unix ns, taken just before the request or the publish) → \
         the moment `stamp.php` starts running under PHP-FPM (PHP `microtime()`), same clock, same host.\n"
    );
    let _ = writeln!(s, "{LATENCY_HEAD}");
    let direct = format!("handler's own time: bench HTTP client → nginx → PHP-FPM, open loop, ≤{c} in flight");
    let _ = writeln!(s, "{}", latency_row(&direct, &l.direct, d));
    let _ = writeln!(
        s,
        "{}",
        latency_row("publish → RabbitMQ → router → FastCGI → PHP-FPM", &l.fastcgi.via, &l.fastcgi.stats)
    );
    let _ = writeln!(
        s,
        "{}",
        latency_row("publish → RabbitMQ → router → HTTP → nginx → PHP-FPM", &l.http.via, &l.http.stats)
    );
    let _ = writeln!(s, "{}", latency_diff("**added by RabbitMQ + router, FastCGI**", &l.fastcgi.stats, d));
    let _ = writeln!(s, "{}", latency_diff("added by RabbitMQ + router, HTTP via nginx", &l.http.stats, d));
    let _ = writeln!(s);
    for (what, r) in [("FastCGI", &l.fastcgi), ("HTTP via nginx", &l.http)] {
        let h = r.handler.as_ref().map(|h| {
            format!(
                "its handler round trip (`router_handler_duration_seconds`) p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms",
                h.p50 * 1e3,
                h.p99 * 1e3,
                h.mean * 1e3
            )
        });
        let _ = writeln!(
            s,
            "- router {what}: {}; router CPU {} per message; stop: {}; log {}: {}",
            h.unwrap_or_else(|| "no metrics".into()),
            us(r.cpu.us_per_message("router")),
            r.stop,
            file_name(&r.log_path),
            r.log.describe()
        );
    }
    let _ = writeln!(s, "- direct-client errors: {}; p50 {:.3} ms", l.direct.errors, ms(d.p50));
}

/// "1.22.1", from `nginx -v` (which writes to stderr).
fn nginx_version() -> String {
    std::process::Command::new("/usr/sbin/nginx")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().rsplit('/').next().unwrap_or_default().to_string())
        .unwrap_or_default()
}
