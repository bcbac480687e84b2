//! The options every bench binary takes (flattened into each binary's own `Args`,
//! beside the broker's URL).

use std::path::PathBuf;

/// Handler, concurrency, sizes, durations and the router under test.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// PHP_CLI_SERVER_WORKERS of the `php -S` handler.
    #[arg(long, short = 'w', default_value_t = 4)]
    pub workers: u32,
    /// The handler of phases A, B and R: `noop` (bench/handlers/noop.php) or `busy`
    /// (bench/handlers/busy.php, which spins --busy-us of CPU per request).
    #[arg(long, default_value = "noop", value_parser = ["noop", "busy"])]
    pub handler: String,
    /// CPU microseconds per request of the busy handler.
    #[arg(long, default_value_t = 1000)]
    pub busy_us: u64,
    /// Concurrency: wrk connections, and the handler's max_in_flight in the router.
    #[arg(long, short = 'c', default_value_t = 16)]
    pub concurrency: u32,
    /// The handler's max_in_flight in the router instead of C (wrk and the reference
    /// consumers keep C): a number, `auto`, or a YAML mapping like
    /// `"{ auto: { max: 64 } }"`.
    #[arg(long)]
    pub max_in_flight: Option<String>,
    /// Messages queued for the throughput phase.
    #[arg(long, short = 'n', default_value_t = 50_000)]
    pub messages: u64,
    /// The subscription's prefetch.
    #[arg(long, default_value_t = 256)]
    pub prefetch: u16,
    /// The handler's balance setting (one endpoint, so it should not matter).
    #[arg(long, default_value = "least_outstanding")]
    pub balance: String,
    /// Seconds of each measured wrk run.
    #[arg(long, default_value_t = 10)]
    pub wrk_duration: u64,
    /// Seconds of unrecorded wrk load before the measured run (PHP workers warm up).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Seconds of each fixed-rate latency run.
    #[arg(long, default_value_t = 10)]
    pub latency_duration: u64,
    /// Rates of the latency runs as fractions of the router's measured throughput.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5")]
    pub latency_fraction: Vec<f64>,
    /// Rates of the latency runs in msg/s (overrides --latency-fraction).
    #[arg(long, value_delimiter = ',')]
    pub latency_rate: Vec<f64>,
    /// During latency runs, record a timeline (every 10 ms: broker backlog, router
    /// received/acked/in flight) to bench/results/<bench>-trace-RATE.tsv.
    #[arg(long)]
    pub trace: bool,
    /// Skip phase C (latency at a fixed rate).
    #[arg(long)]
    pub skip_latency: bool,
    /// Skip the reference consumers (phase R).
    #[arg(long)]
    pub skip_reference: bool,
    /// Extra environment of the router, e.g. TOKIO_WORKER_THREADS=1 (repeatable).
    #[arg(long = "router-env", value_parser = parse_env)]
    pub router_env: Vec<(String, String)>,
    /// Turn the router's tracing on, exporting every span (sampling 1.0) with OTLP/HTTP
    /// to this base URL (README "Tracing"); off when absent.
    #[arg(long)]
    pub tracing_endpoint: Option<String>,
    /// RUST_LOG of the router.
    #[arg(long, default_value = "info")]
    pub rust_log: String,
    /// The router binary (default: target/release/message-router).
    #[arg(long, env = "MESSAGE_ROUTER_BIN")]
    pub router_bin: Option<PathBuf>,
    /// Where the markdown report goes (default: bench/results/<bench>.md).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}
