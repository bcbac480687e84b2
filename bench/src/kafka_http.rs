//! Benchmark (not a test): Kafka → `message-router` → a no-op PHP handler, side by side
//! with the same handler driven directly by `wrk`. Prints a markdown report and writes
//! it to `bench/results/kafka_http.md` (raw latency samples and router logs go next to
//! it). Run it with `bench/run kafka` (builds release); `--help` lists the knobs. The
//! phases are the library's (`router_bench::phases`); this file is the Kafka side:
//!
//! - the backlog: N records (a small JSON payload, header `message_id`, record key one
//!   of 64, each key always on the same partition) on a fresh topic of 8 partitions,
//!   written by one rdkafka producer, one record per batch (`kafka::backlog_producer`: tansu
//!   resumes a paused partition only at a batch start); every
//!   topic and group name has a UUID suffix, and the topic is deleted at the end (also
//!   on error and Ctrl-C) with those the router creates beside it: `<group>.retry` and
//!   `<topic>.dlq`;
//! - the router reads the topic as a fresh consumer group (`ordering: key`,
//!   `auto.offset.reset: earliest`, the subscription's prefetch, the handler's
//!   `max_in_flight` = C);
//! - the references of phase R, each a fresh group on a fresh topic: the minimal
//!   consumer a developer would write (rdkafka `StreamConsumer`, at most `prefetch`
//!   records read and not yet committed, a reqwest POST each with at most C in flight,
//!   the router's headers, offsets stored per partition up to the first record not yet
//!   answered and auto-committed every 200 ms like the router's) on a thread and
//!   runtime of its own; and the raw Kafka limit: a plain `StreamConsumer` loop storing
//!   each record's offset, auto-committed the same way, no HTTP;
//! - phase C produces at a fixed rate (linger 0), each record with the header
//!   `sent-ns`, which the router and the reference pass on as
//!   `x-message-header-sent-ns`; it starts once the group committed a warm-up record
//!   (no `sent-ns`), so joining the group is not timed.
//!
//! The broker of `scripts/setup` is tansu 0.6, which serves a fetch only from the start
//! of a record batch: a consumer starting or resuming at an offset inside a batch gets
//! nothing. The router pauses a partition whose head is stuck and resumes it where it
//! stopped, so the backlog is written one record per batch; the paced records of phase
//! C (linger 0) are single-record batches anyway.

use std::collections::{HashMap, VecDeque};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use futures::channel::oneshot::Canceled;
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use reqwest::header::HeaderMap;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use router_bench::broker::Broker;
use router_bench::drain::{DrainMeter, Flags, RefConsumer, RefDrain};
use router_bench::http::{add, header_map, post, router_headers};
use router_bench::kafka::{backlog_producer, client, consumer};
use router_bench::latency::{Paced, Pacer, SENT_NS};
use router_bench::opts::Common;
use router_bench::router::{config, Target};
use router_bench::wrk::body;
use router_bench::{now_ns, short_id};

/// Kafka → message-router → no-op PHP, against the same handler driven by wrk.
#[derive(Parser, Debug, Clone)]
#[command(name = "kafka-http")]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Bootstrap servers (host:port, comma-separated).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Partitions of each topic the bench creates.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Distinct record keys of the backlog (key `k-i % keys`, on partition
    /// `(i % keys) % partitions`).
    #[arg(long, default_value_t = 64)]
    keys: u64,
    /// `fetch.wait.max.ms` of every consumer, the router's included (librdkafka's
    /// default is 500). tansu 0.6 holds every fetch for about this long (half of it
    /// from 250 ms up) even when records are there, so it sets the latency floor.
    #[arg(long, default_value_t = 10)]
    fetch_wait_ms: u32,
}

/// Records produced and not yet confirmed when writing a backlog.
const IN_FLIGHT: usize = 20_000;
/// Admin, metadata and offset requests.
const TIMEOUT: Duration = Duration::from_secs(10);
const MESSAGE_ID: &str = "message_id";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let bench = match Kafka::new(&args) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kafka-http: {}: {e:#}", args.kafka_brokers);
            return ExitCode::FAILURE;
        }
    };
    let code = router_bench::phases::main("kafka-http", &args.common, bench).await;
    if code == ExitCode::SUCCESS {
        notes(&args);
    }
    code
}

/// Append what is particular to this broker to the report: the topic layout and the
/// quirks of tansu that shape the figures.
fn notes(args: &Args) {
    use std::io::Write as _;
    let out = args.common.out.clone().unwrap_or_else(|| router_bench::root().join("bench/results/kafka_http.md"));
    let text = format!(
        "\n## Kafka notes\n\n\
         - Topics of {p} partitions; records keyed `k-0` … `k-{k}` ({keys} keys, each on one partition); \
         the router reads with `ordering: key`. Every consumer (router, references) is a fresh group starting at \
         offset 0 (`auto.offset.reset: earliest`), offsets stored after handling and auto-committed every 200 ms, \
         `fetch.wait.max.ms: {w}`.\n\
         - tansu 0.6 (the broker of `scripts/setup`, in-memory storage) holds every fetch for about \
         `fetch.wait.max.ms` (half of it from 250 ms up) even when records are waiting, so with librdkafka's default \
         of 500 ms every record would wait ~250 ms: phase C's latencies are mostly this wait (the same for router and \
         reference). It also serves a fetch only from the start of a record batch (the backlog is written one \
         record per batch, as a consumer resuming a paused partition mid-batch would get nothing), and answers ListOffsets \"latest\" with the first offset of the last batch + 1, \
         so records left are counted from the producer's delivery reports, not watermarks.\n\
         - \"left unacked\" = records produced minus the group's committed offsets after the router stopped.\n",
        p = args.partitions,
        k = args.keys.max(1) - 1,
        keys = args.keys,
        w = args.fetch_wait_ms,
    );
    let appended = std::fs::OpenOptions::new().append(true).open(&out).and_then(|mut f| f.write_all(text.as_bytes()));
    match appended {
        Ok(()) => print!("{text}"),
        Err(e) => eprintln!("kafka-http: cannot append the Kafka notes to {}: {e}", out.display()),
    }
}

/// A topic and the consumer group that reads it.
#[derive(Clone, Debug)]
struct Topic {
    name: String,
    group: String,
}

/// The Kafka side of the bench.
struct Kafka {
    brokers: String,
    opts: Common,
    partitions: i32,
    keys: u64,
    admin: AdminClient<DefaultClientContext>,
    /// Writes backlogs: one record per batch (see `kafka::backlog_producer`).
    producer: FutureProducer,
    /// Writes the paced records of phase C: no linger.
    paced: FutureProducer,
    /// Every topic this run created (or the router will), for deletion.
    topics: Arc<Mutex<Vec<String>>>,
    /// Every group this run used.
    groups: Arc<Mutex<Vec<String>>>,
    fetch_wait_ms: u32,
    /// Per topic this run produced to, per partition: the offset after the last
    /// record produced (from the delivery reports; tansu 0.6 answers ListOffsets
    /// "latest" with the first offset of the last batch + 1, so watermarks are wrong).
    ends: Mutex<HashMap<String, Vec<i64>>>,
}

impl Kafka {
    fn new(args: &Args) -> Result<Self> {
        let brokers = args.kafka_brokers.clone();
        let producer = backlog_producer(&brokers).create().context("creating the kafka producer")?;
        let paced = client(&brokers)
            .set("acks", "all")
            .set("linger.ms", "0")
            .create()
            .context("creating the kafka producer")?;
        let admin = client(&brokers).create().context("creating the kafka admin client")?;
        Ok(Kafka {
            brokers,
            opts: args.common.clone(),
            partitions: args.partitions.max(1),
            keys: args.keys.max(1),
            admin,
            producer,
            paced,
            topics: Arc::default(),
            groups: Arc::default(),
            ends: Mutex::default(),
            fetch_wait_ms: args.fetch_wait_ms,
        })
    }

    /// Wait for the records handed to the producer until at most `keep` are pending;
    /// an error names the first that failed.
    async fn confirm(&self, pending: &mut VecDeque<DeliveryFuture>, keep: usize, topic: &str) -> Result<()> {
        while pending.len() > keep {
            let Some(p) = pending.pop_front() else { break };
            self.delivered(p.await, topic)?;
        }
        Ok(())
    }

    /// Note where a record went, or fail with its error.
    fn delivered(&self, res: Result<OwnedDeliveryResult, Canceled>, topic: &str) -> Result<()> {
        let d = match res {
            Ok(Ok(d)) => d,
            Ok(Err((e, _))) => bail!("producing to {topic}: {e}"),
            Err(_) => bail!("producing to {topic}: the producer went away"),
        };
        let mut ends = self.ends.lock().map_err(|_| anyhow!("a poisoned lock"))?;
        let ends = ends.entry(topic.to_string()).or_insert_with(|| vec![0; self.partitions as usize]);
        if let Some(end) = usize::try_from(d.partition).ok().and_then(|p| ends.get_mut(p)) {
            *end = (*end).max(d.offset + 1);
        }
        Ok(())
    }

    /// Records produced to each partition of `topic` by this run (all start at 0).
    fn ends(&self, topic: &str) -> Vec<i64> {
        let ends = self.ends.lock().map(|e| e.get(topic).cloned()).ok().flatten();
        ends.unwrap_or_else(|| vec![0; self.partitions as usize])
    }

    /// Whether the broker knows `topic` with all its partitions.
    async fn known(&self, topic: &str) -> Result<bool> {
        let (producer, topic, partitions) = (self.producer.clone(), topic.to_string(), self.partitions);
        tokio::task::spawn_blocking(move || {
            let metadata = producer.client().fetch_metadata(Some(&topic), TIMEOUT)?;
            Ok(metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && t.partitions().len() == partitions as usize))
        })
        .await?
    }

    /// The offset `group` committed on each partition of `topic` (None: none yet).
    async fn committed(&self, s: &Topic) -> Result<Vec<Option<i64>>> {
        let (brokers, s, partitions) = (self.brokers.clone(), s.clone(), self.partitions);
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer =
                client(&brokers).set("group.id", &s.group).create().context("creating an offset reader")?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition(&s.name, p);
            }
            let got = consumer
                .committed_offsets(tpl, TIMEOUT)
                .with_context(|| format!("committed offsets of {} on {}", s.group, s.name))?;
            let offsets = got
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .collect();
            Ok(offsets)
        })
        .await?
    }

    /// Records of `s` its group has not committed.
    async fn uncommitted(&self, s: &Topic) -> Result<u64> {
        let committed = self.committed(s).await?;
        let ends = self.ends(&s.name).into_iter().enumerate();
        let left = ends.map(|(p, end)| (end - committed.get(p).copied().flatten().unwrap_or(0)).max(0));
        Ok(left.sum::<i64>() as u64)
    }

    /// Produce one record without `sent-ns` (the stamp handler ignores it) and wait
    /// until the group committed it: its consumer has joined, has its partitions and
    /// reads, so joining the group (a second or more on tansu) is not timed.
    async fn warm_up(&self, s: &Topic) -> Result<()> {
        let id = format!("warm-up-{}", s.group);
        let headers = OwnedHeaders::new().insert(Header { key: MESSAGE_ID, value: Some(id.as_str()) });
        let record = FutureRecord::to(&s.name).partition(0).key("warm-up").payload("{}").headers(headers);
        let mut pending: VecDeque<DeliveryFuture> = VecDeque::new();
        match self.paced.send_result(record) {
            Ok(p) => pending.push_back(p),
            Err((e, _)) => bail!("producing to {}: {e}", s.name),
        }
        self.confirm(&mut pending, 0, &s.name).await?;
        let t = Instant::now();
        while self.committed(s).await?.into_iter().flatten().sum::<i64>() < 1 {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("group {} did not commit a warm-up record within 30 s", s.group);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The headers the router sends for a record of `topic` (before the record's own).
    fn base_headers(&self, topic: &str) -> Vec<(&'static str, String)> {
        let first = self.brokers.split(',').next().unwrap_or_default();
        let source = format!("kafka://{first}/{topic}");
        router_headers("application/octet-stream", &source, topic, "2026-01-01T00:00:00.000Z", "all")
    }
}

impl Broker for Kafka {
    const NAME: &'static str = "Kafka (tansu)";
    const SLUG: &'static str = "kafka_http";
    const PROCESS: (&'static str, &'static str) = ("tansu", "tansu");
    const FILL: &'static str = "one rdkafka producer, acks=all, one record per batch";
    const REFERENCES: [&'static str; 2] = [
        "rdkafka StreamConsumer + reqwest POST + stored/auto-committed offsets (minimal reference)",
        "rdkafka StreamConsumer, store each offset, auto-commit, no HTTP (raw Kafka limit)",
    ];

    type Source = Topic;

    /// What the router sends for a record with the header `message_id` and a key.
    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = self.base_headers("bench-tput-0123456789");
        headers.push(("x-message-header-message_id", "m-12345".into()));
        headers.push(("x-message-header-kafka-key", "k-57".into()));
        headers
    }

    /// A fresh topic holding `n` records, its group without offsets.
    async fn fill(&self, prefix: &str, n: u64) -> Result<(Topic, f64)> {
        let s = self.create(prefix).await?;
        let t = Instant::now();
        let mut pending = VecDeque::new();
        for i in 0..n {
            let key = format!("k-{}", i % self.keys);
            let partition = ((i % self.keys) % self.partitions as u64) as i32;
            let (id, payload) = (format!("m-{i}"), body(i));
            let headers = OwnedHeaders::new().insert(Header { key: MESSAGE_ID, value: Some(id.as_str()) });
            let record = FutureRecord::to(&s.name).partition(partition).key(&key).payload(&payload).headers(headers);
            match self.producer.send_result(record) {
                Ok(p) => pending.push_back(p),
                Err((e, _)) => bail!("producing to {}: {e}", s.name),
            }
            self.confirm(&mut pending, IN_FLIGHT, &s.name).await?;
        }
        self.confirm(&mut pending, 0, &s.name).await?;
        let rate = n as f64 / t.elapsed().as_secs_f64();
        let held: i64 = self.ends(&s.name).iter().sum();
        if held != n as i64 {
            bail!("{} holds {held} records after producing {n}", s.name);
        }
        Ok((s, rate))
    }

    /// A fresh topic of `partitions` partitions and a fresh group name, remembered for
    /// deletion with the topics the router creates for them.
    async fn create(&self, prefix: &str) -> Result<Topic> {
        let id = short_id();
        let s = Topic { name: format!("{prefix}-{id}"), group: format!("group-{id}") };
        if let Ok(mut topics) = self.topics.lock() {
            topics.extend([s.name.clone(), format!("{}.retry", s.group), format!("{}.dlq", s.name)]);
        }
        if let Ok(mut groups) = self.groups.lock() {
            groups.push(s.group.clone());
        }
        let topic = NewTopic::new(&s.name, self.partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(TIMEOUT)).request_timeout(Some(TIMEOUT));
        let created =
            self.admin.create_topics(&[topic], &options).await.with_context(|| format!("creating {}", s.name))?;
        for r in created {
            if let Err((topic, code)) = r {
                bail!("creating {topic}: {code}");
            }
        }
        // Produce only once the topic's partitions are known (all of them have leaders).
        let t = Instant::now();
        while !self.known(&s.name).await? {
            if t.elapsed() > TIMEOUT {
                bail!("{} did not appear in the metadata within {TIMEOUT:?}", s.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(s)
    }

    /// Records the group has not committed (the router commits within 200 ms of
    /// settling and once more when it stops).
    async fn left(&self, s: &Topic) -> Result<u64> {
        self.uncommitted(s).await
    }

    /// Kafka does not tell what was fetched from what was not: records not committed.
    async fn backlog(&self, s: &Topic) -> Result<u64> {
        self.uncommitted(s).await
    }

    fn router_yaml(&self, admin: u16, s: &Topic, target: &Target) -> String {
        let brokers: Vec<String> = self.brokers.split(',').map(|b| format!("\"{}\"", b.trim())).collect();
        let transport = format!(
            "{{ type: kafka, brokers: [{}], properties: {{ fetch.wait.max.ms: \"{}\" }} }}",
            brokers.join(", "),
            self.fetch_wait_ms
        );
        let source = format!("topics: [{}]\ngroup: {}\nordering: key", s.name, s.group);
        config(&self.opts, admin, ("kafka", &transport), target, &source, "{ name: all, handler: php }")
    }

    async fn drain(&self, which: usize, s: &Topic, url: &str, meter: DrainMeter<'_>) -> Result<RefDrain> {
        if which == 0 {
            return self.reference(s, url).drain(meter).await;
        }
        raw_drain(consumer(&self.brokers, self.fetch_wait_ms, &s.group, &s.name)?, s, meter).await
    }

    /// Produce at `rate` for `secs`, each record with the header `sent-ns`, once the
    /// group reads the topic (after a warm-up record, counted in `sent`).
    async fn publish_paced(&self, s: &Topic, rate: f64, secs: u64) -> Result<Paced> {
        self.warm_up(s).await?;
        let mut pacer = Pacer::new(rate, secs);
        let mut pending = VecDeque::new();
        let mut sent = 0u64;
        while let Some(due) = pacer.due().await {
            for i in sent..sent + due {
                let key = format!("k-{}", i % self.keys);
                let partition = ((i % self.keys) % self.partitions as u64) as i32;
                let (id, payload, stamp) = (format!("lat-{i}"), body(i), now_ns().to_string());
                let headers = OwnedHeaders::new()
                    .insert(Header { key: MESSAGE_ID, value: Some(id.as_str()) })
                    .insert(Header { key: SENT_NS, value: Some(stamp.as_str()) });
                let record =
                    FutureRecord::to(&s.name).partition(partition).key(&key).payload(&payload).headers(headers);
                match self.paced.send_result(record) {
                    Ok(p) => pending.push_back(p),
                    Err((e, _)) => bail!("producing to {}: {e}", s.name),
                }
            }
            sent += due;
            // Reap what is confirmed; fail on the first error.
            while let Some(Some(res)) = pending.front_mut().map(|p| p.now_or_never()) {
                pending.pop_front();
                self.delivered(res, &s.name)?;
            }
        }
        let mut paced = pacer.paced(sent);
        self.confirm(&mut pending, 0, &s.name).await?;
        // The warm-up record is acked too: waiting for `sent` acks waits for the last.
        paced.sent += 1;
        Ok(paced)
    }

    fn reference(&self, s: &Topic, url: &str) -> RefConsumer {
        let reference = Reference {
            brokers: self.brokers.clone(),
            fetch_wait_ms: self.fetch_wait_ms,
            topic: s.clone(),
            url: url.to_string(),
            prefetch: usize::from(self.opts.prefetch),
            concurrency: self.opts.concurrency as usize,
            headers: self.base_headers(&s.name),
        };
        RefConsumer::spawn(move |flags| reference.consume(flags))
    }

    async fn cleanup(&self) {
        let topics: Vec<String> = self.topics.lock().map(|t| t.clone()).unwrap_or_default();
        let groups: Vec<String> = self.groups.lock().map(|g| g.clone()).unwrap_or_default();
        if topics.is_empty() {
            return;
        }
        let options = AdminOptions::new().operation_timeout(Some(TIMEOUT)).request_timeout(Some(TIMEOUT));
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        match self.admin.delete_topics(&names, &options).await {
            // A topic the router never created (latency references) is not an error.
            Ok(results) => {
                for (topic, code) in results.into_iter().filter_map(Result::err) {
                    if code != rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition {
                        eprintln!("kafka-http: cannot delete {topic}: {code}");
                    }
                }
            }
            Err(e) => eprintln!("kafka-http: cannot delete the topics {topics:?}: {e}"),
        }
        // Groups hold only offsets; a broker that cannot delete them keeps them.
        let names: Vec<&str> = groups.iter().map(String::as_str).collect();
        let _ = self.admin.delete_groups(&names, &options).await;
    }
}

/// The raw limit: receive, store the offset (auto-committed every 200 ms), again,
/// until all are stored.
async fn raw_drain(consumer: StreamConsumer, s: &Topic, mut meter: DrainMeter<'_>) -> Result<RefDrain> {
    let mut stored = 0u64;
    while !meter.acked(stored)? {
        let m = match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
            Ok(m) => m.with_context(|| format!("reading {}", s.name))?,
            Err(_) => bail!("{} ran dry after {stored} records", s.name),
        };
        consumer.store_offset_from_message(&m).context("storing an offset")?;
        stored += 1;
    }
    let drained = meter.finish();
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    drained
}

/// The minimal reference consumer: what a hand-written Kafka → HTTP consumer does.
struct Reference {
    brokers: String,
    fetch_wait_ms: u32,
    topic: Topic,
    url: String,
    /// At most this many records read and not yet committed.
    prefetch: usize,
    /// At most this many POSTs under way.
    concurrency: usize,
    /// The router's headers for a record of the topic, before the record's own.
    headers: Vec<(&'static str, String)>,
}

/// Records of one partition read and not yet stored, in offset order: their offset,
/// whether they were answered, and their place in the prefetch window.
type Pending = VecDeque<(i64, bool, OwnedSemaphorePermit)>;

impl Reference {
    async fn consume(self, flags: Flags) -> Result<()> {
        let consumer = consumer(&self.brokers, self.fetch_wait_ms, &self.topic.group, &self.topic.name)?;
        let window = Arc::new(Semaphore::new(self.prefetch));
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let http = reqwest::Client::new();
        let base = header_map(&self.headers)?;
        let (done, mut answered) = mpsc::unbounded_channel::<(i32, i64)>();
        let mut posts: JoinSet<Result<()>> = JoinSet::new();
        let mut partitions: HashMap<i32, Pending> = HashMap::new();
        let mut place = None;
        let mut consuming = false;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !flags.stopped() {
            if !consuming && consumer.assignment().is_ok_and(|a| a.count() > 0) {
                flags.consuming();
                consuming = true;
            }
            if place.is_none() {
                place = window.clone().try_acquire_owned().ok();
            }
            tokio::select! {
                biased;
                Some((partition, offset)) = answered.recv() => {
                    let n = self.settle(&consumer, &mut partitions, partition, offset)?;
                    flags.acked(n);
                }
                m = consumer.recv(), if place.is_some() => {
                    let m = m.with_context(|| format!("reading {}", self.topic.name))?;
                    let Some(place) = place.take() else { continue };
                    let (partition, offset) = (m.partition(), m.offset());
                    partitions.entry(partition).or_default().push_back((offset, false, place));
                    let headers = record_headers(&base, &m)?;
                    let payload = m.payload().map(<[u8]>::to_vec).unwrap_or_default();
                    let (http, url, done, slots) = (http.clone(), self.url.clone(), done.clone(), slots.clone());
                    posts.spawn(async move {
                        let slot = slots.acquire_owned().await?;
                        let posted = post(&http, &url, headers, payload).await;
                        drop(slot);
                        posted?;
                        done.send((partition, offset)).map_err(|_| anyhow!("the consumer stopped"))
                    });
                }
                _ = tick.tick() => {}
            }
            // Surface failed POSTs (and free the finished tasks).
            while let Some(Some(res)) = posts.join_next().now_or_never() {
                res.map_err(|e| anyhow!("a delivery task failed: {e}"))??;
            }
        }
        posts.shutdown().await;
        Ok(())
    }

    /// Mark `offset` of `partition` answered and store the offset after the answered
    /// records at the head of the partition; how many that frees.
    fn settle(
        &self,
        consumer: &StreamConsumer,
        partitions: &mut HashMap<i32, Pending>,
        partition: i32,
        offset: i64,
    ) -> Result<u64> {
        let Some(pending) = partitions.get_mut(&partition) else { bail!("an answer for partition {partition}") };
        let Ok(at) = pending.binary_search_by_key(&offset, |(o, _, _)| *o) else {
            bail!("an answer for offset {offset} of partition {partition}, not read")
        };
        pending[at].1 = true;
        let mut next = None;
        let mut freed = 0;
        while pending.front().is_some_and(|(_, answered, _)| *answered) {
            // Dropping the place frees the window for the next read.
            if let Some((o, _, _)) = pending.pop_front() {
                next = Some(o + 1);
                freed += 1;
            }
        }
        if let Some(next) = next {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&self.topic.name, partition, Offset::Offset(next))?;
            consumer.store_offsets(&tpl).context("storing an offset")?;
        }
        Ok(freed)
    }
}

/// The router's headers for record `m`: its `message_id` as `ce-id`, each header as
/// `x-message-header-<name>`, the key as `x-message-header-kafka-key`.
fn record_headers(base: &HeaderMap, m: &impl Message) -> Result<HeaderMap> {
    let mut headers = base.clone();
    if let Some(h) = m.headers() {
        for h in h.iter() {
            let value = String::from_utf8_lossy(h.value.unwrap_or_default());
            if h.key == MESSAGE_ID {
                add(&mut headers, "ce-id", &value)?;
            }
            add(&mut headers, &format!("x-message-header-{}", h.key.to_ascii_lowercase()), &value)?;
        }
    }
    if let Some(key) = m.key() {
        add(&mut headers, "x-message-header-kafka-key", &String::from_utf8_lossy(key))?;
    }
    Ok(headers)
}
