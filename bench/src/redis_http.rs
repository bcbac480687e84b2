//! Benchmark (not a test): Redis Streams → `message-router` → a no-op PHP handler, side
//! by side with the same handler driven directly by `wrk`. Prints a markdown report
//! and writes it to `bench/results/redis_http.md` (raw latency samples and router logs
//! go next to it). Run it with `bench/run redis` (builds release); `--help` lists the
//! knobs. The phases are the library's (`router_bench::phases`); this file is the
//! Redis side:
//!
//! - the backlog: N entries (`body` = a small JSON object, `message_id`) on a fresh
//!   stream with a fresh consumer group created at id 0, written with pipelined XADD;
//!   every stream and group name has a UUID suffix, and the stream is deleted at the
//!   end (also on error and Ctrl-C) with the keys the router creates beside it:
//!   `S.G.retry`, `S.G.delayed`, `S.dlq`;
//! - the router reads the stream through its group (redis transport, `claim_idle`
//!   60 s, the subscription's prefetch, the handler's `max_in_flight` = C);
//! - the references of phase R: the minimal consumer a developer would write
//!   (XREADGROUP of up to `prefetch` entries not yet acked, a reqwest POST each with at
//!   most C in flight, the router's headers, batched XACK of whatever finished while
//!   the previous XACK was under way) on a thread and runtime of its own; and the raw
//!   Redis limit: a plain loop XREADGROUP COUNT `prefetch` + one XACK per batch, no
//!   HTTP;
//! - phase C adds entries at a fixed rate, each with the field `sent-ns`, which the
//!   router and the reference pass on as `x-message-header-sent-ns`.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use futures::FutureExt;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamInfoGroupsReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig};
use tokio::sync::{mpsc, OnceCell, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use router_bench::broker::Broker;
use router_bench::drain::{DrainMeter, Flags, RefConsumer, RefDrain};
use router_bench::http::{add, header_map, post, router_headers};
use router_bench::latency::{Paced, Pacer, SENT_NS};
use router_bench::opts::Common;
use router_bench::router::{config, Target};
use router_bench::wrk::body;
use router_bench::{now_ns, short_id};

/// Redis Streams → message-router → no-op PHP, against the same handler driven by wrk.
#[derive(Parser, Debug, Clone)]
#[command(name = "redis-http")]
struct Args {
    #[command(flatten)]
    common: Common,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
}

/// XADDs per pipelined round trip when writing a backlog.
const XADD_BATCH: u64 = 1000;
/// The consumer name of the router (its config) and of the bench's consumers, each in
/// a group of its own.
const CONSUMER: &str = "bench";
/// The body field of every entry (the router's default `body_field`).
const BODY: &str = "body";
const MESSAGE_ID: &str = "message_id";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let client = match redis::Client::open(args.redis_url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("redis-http: {}: {e}", args.redis_url);
            return ExitCode::FAILURE;
        }
    };
    let bench = Redis {
        url: args.redis_url.clone(),
        opts: args.common.clone(),
        client,
        keys: Arc::default(),
        conn: OnceCell::new(),
    };
    router_bench::phases::main("redis-http", &args.common, bench).await
}

/// A stream and the consumer group that reads it.
#[derive(Clone, Debug)]
struct Stream {
    name: String,
    group: String,
}

/// The Redis side of the bench.
struct Redis {
    url: String,
    opts: Common,
    client: redis::Client,
    /// Every key this run created (or the router will), for deletion.
    keys: Arc<Mutex<Vec<String>>>,
    conn: OnceCell<MultiplexedConnection>,
}

/// A connection of its own, with timeouts that survive a busy machine.
async fn connect(client: &redis::Client) -> Result<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("connecting to Redis at {}", client.get_connection_info().addr()))
}

impl Redis {
    /// The shared connection (multiplexed: clones share it).
    async fn conn(&self) -> Result<MultiplexedConnection> {
        self.conn.get_or_try_init(|| connect(&self.client)).await.cloned()
    }

    async fn group(&self, s: &Stream) -> Result<redis::streams::StreamInfoGroup> {
        let reply: StreamInfoGroupsReply = self.conn().await?.xinfo_groups(&s.name).await?;
        reply
            .groups
            .into_iter()
            .find(|g| g.name == s.group)
            .ok_or_else(|| anyhow!("no group {} on {}", s.group, s.name))
    }
}

impl Broker for Redis {
    const NAME: &'static str = "Redis";
    const SLUG: &'static str = "redis_http";
    const PROCESS: (&'static str, &'static str) = ("redis", "redis-server");
    const FILL: &'static str = "pipelined XADD, 1000 a round trip";
    const REFERENCES: [&'static str; 2] = [
        "XREADGROUP + reqwest POST + batched XACK (minimal reference)",
        "XREADGROUP COUNT prefetch + one XACK per batch, no HTTP (raw Redis limit)",
    ];

    type Source = Stream;

    /// What the router sends for an entry with the fields `body` and `message_id`.
    fn headers(&self) -> Vec<(&'static str, String)> {
        let stream = "bench-tput-0123456789";
        let source = format!("{}/{stream}", self.url.trim_end_matches('/'));
        let mut headers =
            router_headers("application/octet-stream", &source, stream, "2026-01-01T00:00:00.000Z", "all");
        headers.push(("x-message-header-message_id", "m-12345".into()));
        headers
    }

    /// A fresh stream holding `n` entries, its group still before the first.
    async fn fill(&self, prefix: &str, n: u64) -> Result<(Stream, f64)> {
        let s = self.create(prefix).await?;
        let mut conn = self.conn().await?;
        let t = Instant::now();
        let mut i = 0;
        while i < n {
            let mut pipe = redis::pipe();
            for i in i..(i + XADD_BATCH).min(n) {
                pipe.xadd(&s.name, "*", &[(BODY, body(i)), (MESSAGE_ID, format!("m-{i}"))]).ignore();
            }
            pipe.query_async::<()>(&mut conn).await.with_context(|| format!("XADD to {}", s.name))?;
            i += XADD_BATCH;
        }
        let rate = n as f64 / t.elapsed().as_secs_f64();
        let len: u64 = conn.xlen(&s.name).await?;
        if len != n {
            bail!("{} holds {len} entries after adding {n}", s.name);
        }
        Ok((s, rate))
    }

    /// A fresh stream with a fresh group at id 0, its keys remembered for deletion.
    async fn create(&self, prefix: &str) -> Result<Stream> {
        let id = short_id();
        let s = Stream { name: format!("{prefix}-{id}"), group: format!("group-{id}") };
        if let Ok(mut keys) = self.keys.lock() {
            let (name, group) = (&s.name, &s.group);
            keys.extend([
                name.clone(),
                format!("{name}.{group}.retry"),
                format!("{name}.{group}.delayed"),
                format!("{name}.dlq"),
            ]);
        }
        let () = self
            .conn()
            .await?
            .xgroup_create_mkstream(&s.name, &s.group, "0")
            .await
            .with_context(|| format!("creating group {} on {}", s.group, s.name))?;
        Ok(s)
    }

    async fn left(&self, s: &Stream) -> Result<u64> {
        let g = self.group(s).await?;
        Ok((g.pending + g.lag.unwrap_or(0)) as u64)
    }

    async fn backlog(&self, s: &Stream) -> Result<u64> {
        Ok(self.group(s).await?.lag.unwrap_or(0) as u64)
    }

    fn router_yaml(&self, admin: u16, s: &Stream, target: &Target) -> String {
        let transport = format!("{{ type: redis, url: \"{}\", consumer: {CONSUMER} }}", self.url);
        let source = format!("streams: [{}]\ngroup: {}\nclaim_idle: 60s", s.name, s.group);
        config(&self.opts, admin, ("redis", &transport), target, &source, "{ name: all, handler: php }")
    }

    async fn drain(&self, which: usize, s: &Stream, url: &str, meter: DrainMeter<'_>) -> Result<RefDrain> {
        if which == 0 {
            return self.reference(s, url).drain(meter).await;
        }
        raw_drain(connect(&self.client).await?, s, usize::from(self.opts.prefetch), meter).await
    }

    /// Add entries at `rate` for `secs`, each with the field `sent-ns`.
    async fn publish_paced(&self, s: &Stream, rate: f64, secs: u64) -> Result<Paced> {
        let mut conn = self.conn().await?;
        let mut pacer = Pacer::new(rate, secs);
        let mut sent = 0u64;
        while let Some(due) = pacer.due().await {
            if due == 0 {
                continue;
            }
            let mut pipe = redis::pipe();
            for i in sent..sent + due {
                let fields = [(BODY, body(i)), (MESSAGE_ID, format!("lat-{i}")), (SENT_NS, now_ns().to_string())];
                pipe.xadd(&s.name, "*", &fields).ignore();
            }
            pipe.query_async::<()>(&mut conn).await.with_context(|| format!("XADD to {}", s.name))?;
            sent += due;
        }
        Ok(pacer.paced(sent))
    }

    fn reference(&self, s: &Stream, url: &str) -> RefConsumer {
        let reference = Reference {
            client: self.client.clone(),
            stream: s.clone(),
            url: url.to_string(),
            prefetch: usize::from(self.opts.prefetch),
            concurrency: self.opts.concurrency as usize,
            headers: self.headers(),
        };
        RefConsumer::spawn(move |flags| reference.consume(flags))
    }

    async fn cleanup(&self) {
        let keys: Vec<String> = self.keys.lock().map(|k| k.clone()).unwrap_or_default();
        if keys.is_empty() {
            return;
        }
        let deleted: Result<usize> = async { Ok(connect(&self.client).await?.del(&keys).await?) }.await;
        if let Err(e) = deleted {
            eprintln!("redis-http: cannot delete the keys {keys:?}: {e:#}");
        }
    }
}

/// The raw limit: XREADGROUP a batch, XACK it in one command, again, until done.
async fn raw_drain(
    mut conn: MultiplexedConnection,
    s: &Stream,
    count: usize,
    mut meter: DrainMeter<'_>,
) -> Result<RefDrain> {
    let reads = StreamReadOptions::default().group(&s.group, CONSUMER).count(count);
    let mut acked = 0u64;
    while !meter.acked(acked)? {
        let reply: Option<StreamReadReply> = conn.xread_options(&[&s.name], &[">"], &reads).await?;
        let ids: Vec<String> = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).map(|e| e.id).collect();
        if ids.is_empty() {
            bail!("{} ran dry after {acked} entries", s.name);
        }
        let n: u64 = conn.xack(&s.name, &s.group, &ids).await?;
        acked += n;
    }
    meter.finish()
}

/// The minimal reference consumer: what a hand-written Redis → HTTP consumer does.
struct Reference {
    client: redis::Client,
    stream: Stream,
    url: String,
    /// At most this many entries read and not yet acked.
    prefetch: usize,
    /// At most this many POSTs under way.
    concurrency: usize,
    headers: Vec<(&'static str, String)>,
}

/// A POSTed entry waiting for its XACK, holding its place in the prefetch window.
type Done = (String, OwnedSemaphorePermit);

impl Reference {
    async fn consume(self, flags: Flags) -> Result<()> {
        let mut reader = connect(&self.client).await?;
        let acker = connect(&self.client).await?;
        let window = Arc::new(Semaphore::new(self.prefetch));
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let http = reqwest::Client::new();
        let base = header_map(&self.headers)?;
        let (done, finished) = mpsc::unbounded_channel::<Done>();
        let mut acks = tokio::spawn(ack(acker, self.stream.clone(), finished, flags.clone()));
        let mut posts: JoinSet<Result<()>> = JoinSet::new();
        flags.consuming();
        while !flags.stopped() {
            // Room in the window: at least one place, then every free one.
            let Ok(permit) = tokio::time::timeout(Duration::from_millis(100), window.clone().acquire_owned()).await
            else {
                continue;
            };
            let mut permit = permit?;
            if let Ok(more) = window.clone().try_acquire_many_owned(window.available_permits() as u32) {
                permit.merge(more);
            }
            let reads =
                StreamReadOptions::default().group(&self.stream.group, CONSUMER).count(permit.num_permits()).block(100);
            let reply: Option<StreamReadReply> = reader.xread_options(&[&self.stream.name], &[">"], &reads).await?;
            for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                let place = permit.split(1).ok_or_else(|| anyhow!("XREADGROUP returned more than COUNT"))?;
                let slot = slots.clone().acquire_owned().await?;
                let headers = entry_headers(&base, &entry)?;
                let (http, url, done) = (http.clone(), self.url.clone(), done.clone());
                posts.spawn(async move {
                    let posted = post(&http, &url, headers, entry.get::<Vec<u8>>(BODY).unwrap_or_default()).await;
                    drop(slot);
                    posted?;
                    done.send((entry.id, place)).map_err(|_| anyhow!("the acker stopped"))
                });
            }
            // Surface failed POSTs (and free the finished tasks).
            while let Some(Some(res)) = posts.join_next().now_or_never() {
                res.map_err(|e| anyhow!("a delivery task failed: {e}"))??;
            }
            if let Some(res) = (&mut acks).now_or_never() {
                res.map_err(|e| anyhow!("the acker failed: {e}"))??;
                bail!("the acker stopped");
            }
        }
        posts.shutdown().await;
        acks.abort();
        Ok(())
    }
}

/// The router's headers for `entry`: its `message_id` as `ce-id`, each field but the
/// body as `x-message-header-<field>`.
fn entry_headers(base: &reqwest::header::HeaderMap, entry: &StreamId) -> Result<reqwest::header::HeaderMap> {
    let mut headers = base.clone();
    for name in entry.map.keys().filter(|k| *k != BODY) {
        let value: String = entry.get(name).unwrap_or_default();
        if name == MESSAGE_ID {
            add(&mut headers, "ce-id", &value)?;
        }
        add(&mut headers, &format!("x-message-header-{}", name.to_ascii_lowercase()), &value)?;
    }
    Ok(headers)
}

/// XACK whatever finished, in one command each round: what finishes while one XACK is
/// under way goes into the next.
async fn ack(
    mut conn: MultiplexedConnection,
    s: Stream,
    mut finished: mpsc::UnboundedReceiver<Done>,
    flags: Flags,
) -> Result<()> {
    let mut batch: Vec<Done> = Vec::new();
    while finished.recv_many(&mut batch, usize::MAX).await > 0 {
        let ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
        let n: u64 = conn.xack(&s.name, &s.group, &ids).await?;
        flags.acked(n);
        // Dropping the places frees the window for the next read.
        batch.clear();
    }
    Ok(())
}
