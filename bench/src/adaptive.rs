//! Benchmark (not a test): `max_in_flight: auto` against fixed limits, on a handler
//! whose service time changes mid-run. Prints a markdown report and writes it to
//! `bench/results/adaptive.md` (router logs next to it). Run it with
//! `bench/run adaptive` (builds release); `--help` lists the knobs.
//!
//! `php -S` with W workers serves `bench/handlers/adaptive.php`: the first half of the
//! backlog's messages take `--fast-ms` each, the second half `--slow-ms` (sleeping, as
//! a handler waiting on a database does). For each `--settings` entry, a fresh backlog
//! of N persistent messages is drained by the router with that `max_in_flight`, the
//! RabbitMQ side and the drain being the amqp bench's (`router_bench::amqp`,
//! `router_bench::phases::Bench::router_drain`). Each drain is split where half of the
//! backlog was acked: msg/s, the router's handler round trip (mean and percentiles of
//! `router_handler_duration_seconds` over the phase: PHP's listen backlog plus the
//! service time), and the mean limit and in flight, per phase.
//!
//! Past what `php -S` serves at once, it only queues the extra requests in its listen
//! backlog: more concurrency buys no throughput, only latency. A good limit reaches
//! the handler's capacity with the round trip of an uncrowded handler.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};

use router_bench::amqp::{Amqp, DEFAULT_URL};
use router_bench::broker::Broker;
use router_bench::metrics::HistogramSummary;
use router_bench::opts::Common;
use router_bench::phases::{finish, Bench};
use router_bench::php::Php;
use router_bench::report::{command, us, PhaseB};
use router_bench::router::{Sample, Target};
use router_bench::{git_commit, utc_now, Scratch};

/// The report is bench/results/adaptive.md.
const SLUG: &str = "adaptive";
/// N when `-n` is not given: enough for each phase to settle, short at 20 ms.
const DEFAULT_MESSAGES: u64 = 6000;

/// `max_in_flight: auto` vs fixed limits, on a handler that slows down mid-run.
#[derive(Parser, Debug, Clone)]
#[command(name = "adaptive")]
struct Args {
    #[command(flatten)]
    common: Common,
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_URL)]
    amqp_url: String,
    /// The router's `max_in_flight` in each drain, in order: a number, `auto`, or
    /// `auto:MAX`.
    #[arg(long, value_delimiter = ',', default_value = "auto,4,16,64")]
    settings: Vec<String>,
    /// Service time of the first half of the messages, ms.
    #[arg(long, default_value_t = 5)]
    fast_ms: u64,
    /// Service time of the second half, ms.
    #[arg(long, default_value_t = 20)]
    slow_ms: u64,
    /// Times to go through `--settings` (interleaved: the machine's speed drifts).
    #[arg(long, default_value_t = 1)]
    rounds: u32,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let mut args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if matches.value_source("messages") == Some(ValueSource::DefaultValue) {
        args.common.messages = DEFAULT_MESSAGES;
    }
    let broker = Amqp::new(&args.amqp_url, &args.common);
    let scratch = match Scratch::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("adaptive: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let bench = run(&args, &broker, &scratch.0);
    finish("adaptive", &args.common, SLUG, &broker, bench).await
}

/// `auto` → `auto`; `auto:64` → `{ auto: { max: 64 } }`; a number as it is.
fn max_in_flight(setting: &str) -> Result<String> {
    match setting.split_once(':') {
        None if setting == "auto" || setting.parse::<u32>().is_ok_and(|n| n > 0) => Ok(setting.to_string()),
        Some(("auto", max)) if max.parse::<u32>().is_ok_and(|n| n > 0) => Ok(format!("{{ auto: {{ max: {max} }} }}")),
        _ => bail!("--settings: {setting:?} is not a number, `auto` or `auto:MAX`"),
    }
}

/// One phase of one drain.
struct Phase {
    rps: f64,
    rtt: HistogramSummary,
    limit: f64,
    in_flight: f64,
}

impl Phase {
    /// The phase between polls `from` and `to` (`to` included), with `rtt` over it.
    fn of(samples: &[Sample], from: &Sample, to: &Sample, rtt: HistogramSummary) -> Self {
        let inside: Vec<&Sample> = samples.iter().filter(|s| s.at > from.at && s.at <= to.at).collect();
        let mean = |f: fn(&Sample) -> f64| inside.iter().map(|s| f(s)).sum::<f64>() / inside.len().max(1) as f64;
        Phase {
            rps: (to.acked - from.acked) / (to.at - from.at).max(f64::MIN_POSITIVE),
            rtt,
            limit: mean(|s| s.limit),
            in_flight: mean(|s| s.in_flight),
        }
    }
}

/// One drain: its setting, the two phases, the whole.
struct Drain {
    setting: String,
    phases: [Phase; 2],
    b: PhaseB,
}

impl Drain {
    fn of(setting: &str, b: PhaseB) -> Result<Self> {
        let t = &b.t;
        let (Some(first), Some(last), Some(half)) =
            (t.samples.iter().find(|s| s.acked > 0.0), t.samples.last(), t.halfway.as_ref())
        else {
            bail!("max_in_flight {setting}: the drain has no samples");
        };
        let Some(turn) = t.samples.iter().find(|s| s.at >= half.at) else { bail!("no sample at halfway") };
        let name = "router_handler_duration_seconds";
        let phases = [
            Phase::of(&t.samples, first, turn, HistogramSummary::of(&half.metrics, name)),
            Phase::of(&t.samples, turn, last, HistogramSummary::between(&half.metrics, &t.last_metrics, name)),
        ];
        Ok(Drain { setting: setting.to_string(), phases, b })
    }
}

async fn run(args: &Args, base: &Amqp, scratch: &Path) -> Result<String> {
    let o = &args.common;
    let settings: Vec<(String, String)> =
        args.settings.iter().map(|s| Ok((s.clone(), max_in_flight(s)?))).collect::<Result<_>>()?;
    let env = [
        ("FAST_MS", args.fast_ms.to_string()),
        ("SLOW_MS", args.slow_ms.to_string()),
        ("SLOW_FROM", (o.messages / 2).to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let handlers = router_bench::root().join("bench/handlers");
    let php = Php::start(&handlers.join("adaptive.php"), o.workers, None, &env).await?;
    let mut drains = Vec::new();
    for round in 1..=args.rounds {
        for (setting, yaml) in &settings {
            let mut opts = o.clone();
            opts.max_in_flight = Some(yaml.clone());
            let broker = base.with_opts(&opts);
            let bench = Bench::new(&opts, &broker, scratch, SLUG)?;
            let watched = [("php", php.proc.pid(), true), bench.broker(), bench.me()];
            eprintln!("round {round}: max_in_flight {setting}");
            let tag = setting.replace(':', "-");
            let (log, url) = (format!("router-{tag}-{round}.log"), php.url());
            let drained = bench.router_drain(&log, &Target::Http(&url), &watched).await;
            // Each backlog goes as soon as it is drained: RabbitMQ's disk stays small.
            broker.cleanup().await;
            let d = Drain::of(setting, drained?)?;
            for (i, p) in d.phases.iter().enumerate() {
                eprintln!(
                    "  phase {}: {:.0} msg/s, round trip mean {:.1} ms, limit {:.1}, in flight {:.1}",
                    i + 1,
                    p.rps,
                    p.rtt.mean * 1e3,
                    p.limit,
                    p.in_flight
                );
            }
            drains.push(d);
        }
    }
    Ok(report(args, &drains))
}

/// The best rate of any drain in phase `i`.
fn top(drains: &[Drain], i: usize) -> f64 {
    drains.iter().map(|d| d.phases[i].rps).fold(0.0, f64::max)
}

fn report(args: &Args, drains: &[Drain]) -> String {
    let o = &args.common;
    let w = o.workers;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (fast, slow) = (args.fast_ms as f64, args.slow_ms as f64);
    let mut s = String::new();
    let _ = writeln!(s, "# Adaptive concurrency: `max_in_flight: auto` against fixed limits\n");
    let _ = writeln!(
        s,
        "{} · commit {} · {cores} cores shared by RabbitMQ, router, PHP and the bench · `php -S` with \
         PHP_CLI_SERVER_WORKERS={w} serving `adaptive.php`: messages 0..{} take {fast} ms, the rest {slow} ms \
         (usleep) · N={} persistent messages per drain · prefetch {} · router env: RUST_LOG={}\n",
        utc_now(),
        git_commit(),
        o.messages / 2,
        o.messages,
        o.prefetch,
        o.rust_log,
    );
    let _ = writeln!(s, "Command: `{}`\n", command(SLUG));
    let _ = writeln!(
        s,
        "Once PHP serves as many requests as it can at once, more in flight only wait in its listen \
         backlog: latency, not throughput (the fixed rows show where that starts; `php -S` with {w} \
         workers tops out at about {:.0} msg/s at {fast} ms and {:.0} at {slow} ms here, about {:.1} \
         requests at once).\n",
        top(drains, 0),
        top(drains, 1),
        top(drains, 1) * slow / 1e3
    );
    let _ = writeln!(
        s,
        "| max_in_flight | phase 1 ({fast} ms) msg/s | round trip mean / p50 / p99 | waiting at the handler | \
         limit (in flight) | phase 2 ({slow} ms) msg/s | round trip mean / p50 / p99 | waiting at the handler | \
         limit (in flight) | all msg/s | router CPU/msg |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let ms = |v: f64| v * 1e3;
    for d in drains {
        let mut row = format!("| {} ", d.setting);
        for (p, service) in d.phases.iter().zip([fast, slow]) {
            let _ = write!(
                row,
                "| {:.0} | {:.1} / {:.1} / {:.1} ms | {:.1} ms | {:.1} ({:.1}) ",
                p.rps,
                ms(p.rtt.mean),
                ms(p.rtt.p50),
                ms(p.rtt.p99),
                (ms(p.rtt.mean) - service).max(0.0),
                p.limit,
                p.in_flight
            );
        }
        let _ = writeln!(row, "| {:.0} | {} |", d.b.t.rps, us(d.b.t.cpu.us_per_message("router")));
        s.push_str(&row);
    }
    let _ = writeln!(
        s,
        "\nEach drain is split at the first poll of `/metrics` (every 20 ms) that saw half of the N acked. \
         msg/s: acked over the time between polls. Round trip: the router's `router_handler_duration_seconds` \
         over the phase (mean exact; percentiles interpolated inside its buckets, as Prometheus does); waiting \
         at the handler: the mean round trip less the service time. Limit: `router_handler_concurrency_limit` \
         (an `auto` limit starts at 1 with each drain), in flight: `router_in_flight`, both means of the polls.\n"
    );
    let _ = writeln!(s, "Details:\n");
    for d in drains {
        let _ = writeln!(
            s,
            "- {}: {:.1} s, {} left unacked, {} retried, {} dead-lettered; stop: {}; log {} ({})",
            d.setting,
            d.b.t.secs,
            d.b.left,
            d.b.t.retried,
            d.b.t.dead_lettered,
            d.b.stop,
            router_bench::file_name(&d.b.log_path),
            d.b.log.describe()
        );
    }
    s
}
