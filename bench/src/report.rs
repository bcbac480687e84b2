//! The markdown report of a run: header (time, commit, machine, settings), the
//! ratios, throughput, CPU per process, latency.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::broker::Broker;
use crate::cpu::CpuUsage;
use crate::drain::RefDrain;
use crate::latency::{Paced, Stats};
use crate::opts::Common;
use crate::phases::RouterLatency;
use crate::router::{LogSummary, Throughput};
use crate::wrk::Wrk;
use crate::{file_name, git_commit, ms, utc_now};

pub struct LatencyReport {
    pub rate: f64,
    pub secs: u64,
    pub direct: Paced,
    pub direct_stats: Stats,
    pub router: RouterLatency,
    /// The same through the minimal reference consumer.
    pub reference: Option<(Paced, Stats)>,
}

pub struct PhaseB {
    pub publish_rps: f64,
    pub t: Throughput,
    pub left: u64,
    pub stop: String,
    pub log: LogSummary,
    pub log_path: PathBuf,
}

/// The command of this run: `bench/run amqp …` for the report `amqp_http` (the first
/// word of its slug), with this run's arguments.
pub fn command(slug: &str) -> String {
    let bench = format!("bench/run {}", slug.split('_').next().unwrap_or(slug));
    std::iter::once(bench).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ")
}

/// "123 µs", or "–" when unknown.
pub fn us(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0} µs")).unwrap_or_else(|| "–".into())
}

pub fn report<B: Broker>(
    o: &Common,
    wrk_c: &Wrk,
    wrk_1: &Wrk,
    cpu_a: &CpuUsage,
    b: &PhaseB,
    references: &[(&str, RefDrain)],
    latency: &[LatencyReport],
) -> String {
    let c = o.concurrency;
    let t = &b.t;
    let ratio = t.rps / wrk_c.rps;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let broker = B::PROCESS.0;
    let mut s = String::new();
    let _ = writeln!(s, "# {} → message-router → PHP handler, vs the same handler driven by wrk\n", B::NAME);
    let env: Vec<String> = o.router_env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(
        s,
        "{} · commit {} · {cores} cores shared by broker, router, PHP and load generator · \
         handler {} · `php -S` with PHP_CLI_SERVER_WORKERS={} · concurrency C={c} (wrk connections = router max_in_flight) · \
         prefetch {} · balance {} · N={} messages · router env: RUST_LOG={} {}\n",
        utc_now(),
        git_commit(),
        if o.handler == "busy" { format!("busy.php ({} µs CPU per request)", o.busy_us) } else { "noop.php".into() },
        o.workers,
        o.prefetch,
        o.balance,
        o.messages,
        o.rust_log,
        env.join(" ")
    );
    let _ = writeln!(s, "Command: `{}`\n", command(B::SLUG));

    let _ = writeln!(s, "## Summary\n");
    let _ = writeln!(s, "| figure | value |");
    let _ = writeln!(s, "|---|---:|");
    let _ = writeln!(s, "| router / handler alone (msg/s over wrk's req/s) | **{ratio:.2}** |");
    for (what, r) in references {
        let _ = writeln!(s, "| router / {what} | {:.2} |", t.rps / r.rps);
    }
    let _ = writeln!(s, "| router CPU per message (its own process) | {} |", us(t.cpu.us_per_message("router")));
    if let Some((what, r)) = references.first() {
        let _ = writeln!(s, "| {what}: CPU per message (the bench process) | {} |", us(r.cpu.us_per_message("bench")));
    }
    let _ = writeln!(
        s,
        "| {} CPU per message: router path{} | {} |",
        B::NAME,
        if references.is_empty() { "" } else { " / references" },
        [us(t.cpu.us_per_message(broker))]
            .into_iter()
            .chain(references.iter().map(|(_, r)| us(r.cpu.us_per_message(broker))))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    let _ = writeln!(
        s,
        "| machine CPU per message: handler alone / router path{} | {} |\n",
        if references.is_empty() { "" } else { " / references" },
        [cpu_a.machine_us(), t.cpu.machine_us()]
            .into_iter()
            .chain(references.iter().map(|(_, r)| r.cpu.machine_us()))
            .map(|v| format!("{v:.0} µs"))
            .collect::<Vec<_>>()
            .join(" / ")
    );

    let _ = writeln!(s, "## Throughput\n");
    let _ = writeln!(s, "| path | msg/s | p50 | p99 | ratio router/handler |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    let _ = writeln!(
        s,
        "| handler alone (wrk -t1 -c{c}, {} s, mean of runs before and after the router's: {}) | {:.0} | {:.2} ms | {:.2} ms | 1.00 |",
        o.wrk_duration,
        wrk_c.runs.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" / "),
        wrk_c.rps,
        wrk_c.p50_ms,
        wrk_c.p99_ms
    );
    let _ = writeln!(
        s,
        "| {} → router → handler (max_in_flight {c}, {:.1} s) | {:.0} | {:.2} ms | {:.2} ms | **{ratio:.2}** |",
        B::NAME,
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
         The references drain their own backlog of N in this bench process, with the same prefetch and C.\n",
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
        "- writing the backlog: {:.0} msg/s ({}); router's first ack {:.2} s after its start; {} messages left unacked after it stopped",
        b.publish_rps,
        B::FILL,
        t.first_ack_after,
        b.left
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
        t.cpu.machine_us(),
        cpu_a.machine_us()
    );

    let _ = writeln!(
        s,
        "\n## CPU: % of one core · CPU time per message (the machine has {cores} cores = {}%)\n",
        cores * 100
    );
    let _ = writeln!(
        s,
        "| window | php (all workers) | {broker} | router | load generator | machine busy | other processes |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    let mut row = |window: String, u: &CpuUsage, router: String, load: String| {
        let _ = writeln!(
            s,
            "| {window} | {} | {} | {router} | {load} | {} | {} |",
            u.get("php"),
            u.get(broker),
            u.machine(),
            u.other()
        );
    };
    row(format!("A: wrk -c{c}"), cpu_a, "–".into(), format!("{} (wrk)", cpu_a.get("wrk")));
    row("B: router draining".into(), &t.cpu, t.cpu.get("router"), format!("{} (bench, polling)", t.cpu.get("bench")));
    for (what, r) in references {
        row(format!("R: {what}"), &r.cpu, "–".into(), format!("{} (bench = the consumer)", r.cpu.get("bench")));
    }
    for l in latency {
        let (window, cpu) = (format!("C: router at {:.0} msg/s", l.rate), &l.router.cpu);
        row(window, cpu, cpu.get("router"), format!("{} (bench, publishing)", cpu.get("bench")));
    }

    for l in latency {
        latency_section::<B>(&mut s, l, c, wrk_1);
    }
    s
}

fn latency_section<B: Broker>(s: &mut String, l: &LatencyReport, c: u32, wrk_1: &Wrk) {
    let d = &l.direct_stats;
    let v = &l.router.stats;
    let _ = writeln!(s, "\n## Latency at a fixed {:.0} msg/s ({} s each, first second dropped)\n", l.rate, l.secs);
    let _ = writeln!(
        s,
        "Measured: wall-clock send time (`sent-ns`, unix ns, taken just before the request or the \
         publish) → the moment `stamp.php` starts running (PHP `microtime()`), same clock, same host.\n"
    );
    let _ = writeln!(s, "{LATENCY_HEAD}");
    let _ = writeln!(
        s,
        "{}",
        latency_row(&format!("handler alone: bench HTTP client, open loop, ≤{c} in flight"), &l.direct, d)
    );
    let _ = writeln!(s, "{}", latency_row(&format!("publish → {} → router → handler", B::NAME), &l.router.via, v));
    if let Some((p, st)) = &l.reference {
        let _ = writeln!(
            s,
            "{}",
            latency_row(&format!("publish → {} → minimal reference consumer → handler", B::NAME), p, st)
        );
    }
    let _ = writeln!(s, "{}", latency_diff("**added by broker + router**", v, d));
    if let Some((_, r)) = &l.reference {
        let _ = writeln!(s, "{}", latency_diff("added by broker + minimal reference consumer", r, d));
    }
    if let Some(h) = &l.router.handler {
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
        l.router.stop,
        file_name(&l.router.log_path),
        l.router.log.describe()
    );
}

/// The head of a latency table (rows: [`latency_row`], [`latency_diff`]).
pub const LATENCY_HEAD: &str =
    "| path | rate achieved | samples | p50 | p90 | p99 | p99.9 | max |\n|---|---:|---:|---:|---:|---:|---:|---:|";

/// A row of a latency table: path `name`, sent as `p`, latencies `st`.
pub fn latency_row(name: &str, p: &Paced, st: &Stats) -> String {
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
}

/// A row of a latency table: what path `name` (latencies `x`) adds to `base`.
pub fn latency_diff(name: &str, x: &Stats, base: &Stats) -> String {
    format!(
        "| {name} (difference) | | | {:+.3} ms | {:+.3} ms | {:+.3} ms | {:+.3} ms | |",
        ms(x.p50 - base.p50),
        ms(x.p90 - base.p90),
        ms(x.p99 - base.p99),
        ms(x.p999 - base.p999)
    )
}
