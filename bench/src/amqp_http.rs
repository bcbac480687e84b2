//! Benchmark (not a test): RabbitMQ → `message-router` → a no-op PHP handler, side by
//! side with the same handler driven directly by `wrk`. Prints a markdown report and
//! writes it to `bench/results/amqp_http.md` (raw latency samples, router logs and
//! traces go next to it). Run it with `bench/run amqp` (builds release); `--help` lists
//! the knobs. The phases are the library's (`router_bench::phases`), and so is the
//! RabbitMQ side (`router_bench::amqp`):
//!
//! - the backlog: N persistent messages on a fresh durable queue (pipelined publisher
//!   confirms), each queue deleted at the end with the router's `.dlq` and retry queue;
//! - the references of phase R: a lapin consumer with the same prefetch that POSTs each
//!   delivery with reqwest (at most C in flight, router-like headers) and acks it on a
//!   2xx, one ack per message; and a lapin consumer that only acks (the broker's cost);
//! - phase C publishes with confirms at a fixed rate, each message stamped `sent-ns`.

use std::process::ExitCode;

use clap::Parser;

use router_bench::amqp::{Amqp, DEFAULT_URL};
use router_bench::opts::Common;

/// RabbitMQ → message-router → no-op PHP, against the same handler driven by wrk.
#[derive(Parser, Debug, Clone)]
#[command(name = "amqp-http")]
struct Args {
    #[command(flatten)]
    common: Common,
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_URL)]
    amqp_url: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let bench = Amqp::new(&args.amqp_url, &args.common);
    router_bench::phases::main("amqp-http", &args.common, bench).await
}
