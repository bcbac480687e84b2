//! Benchmark (not a test): Kafka → router-core in process → a no-op [`Target`], side
//! by side with a raw rdkafka consume loop on the same topic: how much of the raw
//! Kafka rate the router keeps when the handler costs nothing (the `kafka-http` bench
//! measures the router with a real PHP handler, which sets the pace there). Run it
//! with `bench/run kafka-core` (builds release); `--help` lists the knobs.
//!
//! - One topic of P partitions holds N records (key `k-i % keys`, each key on one
//!   partition, a small JSON payload), written once by one rdkafka producer, one
//!   record per batch (see `router_bench::kafka::backlog_producer`).
//! - Each round runs both consumers, one after the other (the order alternates), each
//!   a fresh consumer group reading the topic from offset 0:
//!   - raw: a `StreamConsumer` loop storing each record's offset (auto-committed every
//!     200 ms), nothing else: the limit;
//!   - router: `router_core::Router` with one Kafka subscription (the chosen
//!     `ordering`, default `key`) and one route to a target that counts and acks.
//!     Every record goes through the whole engine: lanes, the pipeline's window and
//!     handler limit, the settle point, contiguous offset stores.
//! - The rate is N over the time from the first record handled to the N-th, so
//!   joining the group is not timed. The report holds every round and the median
//!   ratio router / raw, and goes to `bench/results/kafka_core.md`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use router_core::{DeliveryInfo, Metrics, Outcome, Target};
use tokio_util::sync::CancellationToken;

use router_bench::kafka::{backlog_producer, client, consumer};
use router_bench::short_id;

#[derive(Parser, Debug)]
#[command(name = "kafka-core")]
struct Args {
    /// Bootstrap servers (host:port, comma-separated).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Records in the topic.
    #[arg(long, short = 'n', default_value_t = 100_000)]
    messages: u64,
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Distinct record keys.
    #[arg(long, default_value_t = 64)]
    keys: u64,
    /// Rounds (each runs raw and router once).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// The subscription's prefetch (records read and not finished).
    #[arg(long, default_value_t = 256)]
    prefetch: u32,
    /// The subscription's ordering.
    #[arg(long, default_value = "key", value_parser = ["key", "partition", "unordered"])]
    ordering: String,
    /// `fetch.wait.max.ms` of both consumers (see the kafka-http bench: tansu holds
    /// every fetch about this long).
    #[arg(long, default_value_t = 10)]
    fetch_wait_ms: u32,
    /// Where the markdown report goes (default: bench/results/kafka_core.md).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

const TIMEOUT: Duration = Duration::from_secs(10);
/// A consumer that handles nothing for this long has stalled: the run fails.
const STALL: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args = Args::parse();
    // The runtime the daemon and the extension would give the router: worker threads
    // from MESSAGE_ROUTER_THREADS, else half the cores (both contenders run on it).
    let threads = match router_core::runtime::threads_from_env() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("kafka-core: {e}");
            return ExitCode::FAILURE;
        }
    };
    match tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build() {
        Ok(rt) => rt.block_on(bench(args, threads)),
        Err(e) => {
            eprintln!("kafka-core: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(args: Args, threads: usize) -> ExitCode {
    // The router's own log, on stderr, when RUST_LOG asks for it.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let admin: AdminClient<DefaultClientContext> = match client(&args.kafka_brokers).create() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kafka-core: {}: {e}", args.kafka_brokers);
            return ExitCode::FAILURE;
        }
    };
    let topic = format!("core-{}", short_id());
    let mut made = vec![topic.clone(), format!("{topic}.dlq")];
    let mut groups = Vec::new();
    let result = tokio::select! {
        r = run(&args, threads, &admin, &topic, &mut made, &mut groups) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let options = AdminOptions::new().operation_timeout(Some(TIMEOUT)).request_timeout(Some(TIMEOUT));
    let names: Vec<&str> = made.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &options).await;
    let names: Vec<&str> = groups.iter().map(String::as_str).collect();
    let _ = admin.delete_groups(&names, &options).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kafka-core: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    args: &Args,
    threads: usize,
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    made: &mut Vec<String>,
    groups: &mut Vec<String>,
) -> Result<()> {
    let options = AdminOptions::new().operation_timeout(Some(TIMEOUT)).request_timeout(Some(TIMEOUT));
    let created = admin
        .create_topics(&[NewTopic::new(topic, args.partitions, TopicReplication::Fixed(1))], &options)
        .await
        .with_context(|| format!("creating {topic}"))?;
    if let Some(Err((t, code))) = created.into_iter().next() {
        bail!("creating {t}: {code}");
    }
    let fill = fill(args, topic).await?;
    println!(
        "kafka-core: {} records on {topic} ({} partitions), written at {fill:.0} msg/s",
        args.messages, args.partitions
    );
    let mut rows = Vec::new();
    for round in 0..args.rounds {
        let mut raw_rate = 0.0;
        let mut router_rate = 0.0;
        // Alternate which goes first, so a broker warming up favours neither.
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for router in order {
            let group = format!("group-{}", short_id());
            groups.push(group.clone());
            if router {
                made.push(format!("{group}.retry"));
                router_rate = router_drain(args, topic, &group).await?;
            } else {
                raw_rate = raw_drain(args, topic, &group).await?;
            }
        }
        println!(
            "round {}: raw {raw_rate:.0} msg/s, router {router_rate:.0} msg/s, ratio {:.2}",
            round + 1,
            router_rate / raw_rate
        );
        rows.push((raw_rate, router_rate));
    }
    report(args, threads, fill, &rows)
}

/// Write the topic: record i keyed `k-(i % keys)`, on partition `(i % keys) % P`.
async fn fill(args: &Args, topic: &str) -> Result<f64> {
    let producer: FutureProducer = backlog_producer(&args.kafka_brokers).create()?;
    let t = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for i in 0..args.messages {
        let key = format!("k-{}", i % args.keys.max(1));
        let partition = ((i % args.keys.max(1)) % args.partitions.max(1) as u64) as i32;
        let payload = format!("{{\"id\":{i},\"kind\":\"bench\"}}");
        let record = FutureRecord::to(topic).partition(partition).key(&key).payload(&payload);
        match producer.send_result(record) {
            Ok(p) => pending.push_back(p),
            Err((e, _)) => bail!("producing to {topic}: {e}"),
        }
        while pending.len() > 20_000 {
            if let Some(p) = pending.pop_front() {
                delivered(p.await, topic)?;
            }
        }
    }
    while let Some(p) = pending.pop_front() {
        delivered(p.await, topic)?;
    }
    Ok(args.messages as f64 / t.elapsed().as_secs_f64())
}

fn delivered(
    res: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
    topic: &str,
) -> Result<()> {
    match res {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => bail!("producing to {topic}: {e}"),
        Err(_) => bail!("producing to {topic}: the producer went away"),
    }
}

/// The limit: receive, store the offset, again, until N are stored.
async fn raw_drain(args: &Args, topic: &str, group: &str) -> Result<f64> {
    let consumer: StreamConsumer = consumer(&args.kafka_brokers, args.fetch_wait_ms, group, topic)?;
    let mut first = None;
    for n in 0..args.messages {
        let m = match tokio::time::timeout(STALL, consumer.recv()).await {
            Ok(m) => m.with_context(|| format!("reading {topic}"))?,
            Err(_) => bail!("raw: {topic} ran dry after {n} records"),
        };
        first.get_or_insert_with(Instant::now);
        consumer.store_offset_from_message(&m).context("storing an offset")?;
    }
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    Ok(args.messages as f64 / secs)
}

/// Counts what it is handed and acks it.
#[derive(Default)]
struct NoOp {
    handled: AtomicU64,
    first: OnceLock<Instant>,
}

#[async_trait]
impl Target for NoOp {
    async fn deliver(&self, _delivery: DeliveryInfo<'_>) -> Outcome {
        self.first.get_or_init(Instant::now);
        self.handled.fetch_add(1, Ordering::Relaxed);
        Outcome::Ack
    }
}

/// router-core with one Kafka subscription and the no-op target, until N are handled.
async fn router_drain(args: &Args, topic: &str, group: &str) -> Result<f64> {
    let yaml = format!(
        r#"
transports:
  kafka:
    type: kafka
    brokers: [{brokers}]
    properties: {{ fetch.wait.max.ms: "{wait}" }}
handlers:
  noop: {{ max_in_flight: {prefetch} }}
subscriptions:
  bench:
    transport: kafka
    topics: ["{topic}"]
    group: {group}
    ordering: {ordering}
    prefetch: {prefetch}
routes:
  - {{ name: all, handler: noop }}
"#,
        brokers = args.kafka_brokers.split(',').map(|b| format!("\"{}\"", b.trim())).collect::<Vec<_>>().join(", "),
        wait = args.fetch_wait_ms,
        prefetch = args.prefetch,
        ordering = args.ordering,
    );
    let config = router_core::config::parse(&yaml, "kafka-core.yaml", &|_| None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let target = Arc::new(NoOp::default());
    let targets = [("noop".to_string(), target.clone() as Arc<dyn Target>)].into_iter().collect();
    let router = router_core::Router::new(&config, targets, Arc::new(Metrics::new()?))?;
    let stop = CancellationToken::new();
    let running = tokio::spawn(router.run(stop.clone()));
    let (mut last, mut since) = (0, Instant::now());
    loop {
        let n = target.handled.load(Ordering::Relaxed);
        if n >= args.messages {
            break;
        }
        if n != last {
            (last, since) = (n, Instant::now());
        } else if since.elapsed() > STALL {
            stop.cancel();
            bail!("router: stalled at {n} of {} records", args.messages);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = target.first.get().map_or(0.0, |t| t.elapsed().as_secs_f64());
    stop.cancel();
    running.await.context("the router task")??;
    Ok(args.messages as f64 / secs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn report(args: &Args, threads: usize, fill: f64, rows: &[(f64, f64)]) -> Result<()> {
    use std::fmt::Write as _;
    let mut md = String::from("# Kafka → router-core (in process, no-op target) vs raw rdkafka\n\n");
    let _ = writeln!(
        md,
        "{} records, {} partitions, {} keys, `ordering: {}`, prefetch {}, `fetch.wait.max.ms: {}`, \
         {threads} runtime worker thread(s); topic written at {fill:.0} msg/s. Rates from the first record handled to the last; each round runs \
         both, each a fresh group from offset 0, in alternating order.\n",
        args.messages, args.partitions, args.keys, args.ordering, args.prefetch, args.fetch_wait_ms
    );
    md.push_str("| round | raw rdkafka (msg/s) | router-core (msg/s) | router / raw |\n| --- | ---: | ---: | ---: |\n");
    for (i, (raw, router)) in rows.iter().enumerate() {
        let _ = writeln!(md, "| {} | {raw:.0} | {router:.0} | {:.2} |", i + 1, router / raw);
    }
    let ratio = median(rows.iter().map(|(raw, router)| router / raw).collect());
    let _ = writeln!(md, "\nMedian router / raw: **{ratio:.2}**.");
    println!("\n{md}");
    let out = args.out.clone().unwrap_or_else(|| router_bench::root().join("bench/results/kafka_core.md"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))
}
