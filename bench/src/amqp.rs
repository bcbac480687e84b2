//! RabbitMQ's side of the benches (`amqp-http`, `fastcgi-http`): the backlog (N
//! persistent messages on a fresh durable queue, pipelined publisher confirms; each
//! queue deleted at the end with the router's `.dlq` and retry queue), the router's
//! transport and subscription, the references of phase R (a lapin consumer with the
//! same prefetch that POSTs each delivery with reqwest, at most C in flight,
//! router-like headers, and acks it on a 2xx, one ack per message; and a lapin
//! consumer that only acks: the broker's cost), and publishing at a fixed rate, each
//! message stamped `sent-ns`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use reqwest::header::HeaderMap;
use tokio::sync::{OnceCell, Semaphore};
use tokio::task::JoinSet;

use crate::broker::Broker;
use crate::drain::{DrainMeter, Flags, RefConsumer, RefDrain};
use crate::http::{add, header_map, post, router_headers};
use crate::latency::{Paced, Pacer, SENT_NS};
use crate::opts::Common;
use crate::router::{config, Target};
use crate::wrk::body;
use crate::{now_ns, short_id};

/// The default `--amqp-url`.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The RabbitMQ side of the bench.
pub struct Amqp {
    url: String,
    opts: Common,
    /// Every queue this run declared (or the router will), for deletion.
    queues: Queues,
    rabbit: OnceCell<Rabbit>,
}

impl Amqp {
    /// The broker at `url`, for a bench run with `opts`.
    pub fn new(url: &str, opts: &Common) -> Self {
        Amqp { url: url.to_string(), opts: opts.clone(), queues: Queues::default(), rabbit: OnceCell::new() }
    }

    /// The same broker, writing router configs with `opts` instead (a bench comparing
    /// router settings run by run); its queues are deleted with this one's.
    pub fn with_opts(&self, opts: &Common) -> Self {
        Amqp { url: self.url.clone(), opts: opts.clone(), queues: self.queues.clone(), rabbit: OnceCell::new() }
    }

    async fn rabbit(&self) -> Result<&Rabbit> {
        self.rabbit.get_or_try_init(|| Rabbit::connect(&self.url)).await
    }
}

impl Broker for Amqp {
    const NAME: &'static str = "RabbitMQ";
    const SLUG: &'static str = "amqp_http";
    const PROCESS: (&'static str, &'static str) = ("rabbitmq", "beam.smp");
    const FILL: &'static str = "persistent, pipelined confirms";
    const REFERENCES: [&'static str; 2] =
        ["lapin consumer + reqwest POST + ack (minimal reference)", "lapin consumer, ack only (no HTTP)"];

    type Source = String;

    fn headers(&self) -> Vec<(&'static str, String)> {
        let queue = "bench-tput-0123456789";
        let source = format!("amqp://127.0.0.1:5672/%2f{queue}");
        router_headers("application/json", &source, queue, "2026-01-01T00:00:00Z", "work")
    }

    /// A fresh durable queue holding `n` persistent messages.
    async fn fill(&self, prefix: &str, n: u64) -> Result<(String, f64)> {
        let rabbit = self.rabbit().await?;
        let queue = self.create(prefix).await?;
        let t = Instant::now();
        let mut publisher = rabbit.publisher().await?;
        for i in 0..n {
            publisher.publish(&queue, body(i).as_bytes(), props(&format!("m-{i}"), None)).await?;
        }
        publisher.finish().await?;
        let rate = n as f64 / t.elapsed().as_secs_f64();
        let ready = rabbit.count(&queue).await?;
        if u64::from(ready) != n {
            bail!("{queue} holds {ready} messages after publishing {n} confirmed ones");
        }
        Ok((queue, rate))
    }

    async fn create(&self, prefix: &str) -> Result<String> {
        let queue = format!("{prefix}-{}", short_id());
        self.rabbit().await?.declare(&queue, &self.queues).await?;
        Ok(queue)
    }

    async fn left(&self, queue: &String) -> Result<u64> {
        Ok(self.rabbit().await?.count(queue).await?.into())
    }

    async fn backlog(&self, queue: &String) -> Result<u64> {
        self.left(queue).await
    }

    fn router_yaml(&self, admin: u16, queue: &String, target: &Target) -> String {
        let transport = format!("{{ type: amqp, url: \"{}\" }}", self.url);
        let route = format!("{{ name: work, match: {{ routing_key: \"{queue}\" }}, handler: php }}");
        config(&self.opts, admin, ("rabbit", &transport), target, &format!("queue: {queue}"), &route)
    }

    async fn drain(&self, which: usize, queue: &String, url: &str, meter: DrainMeter<'_>) -> Result<RefDrain> {
        let url = (which == 0).then_some(url);
        reference_drain(self.rabbit().await?, queue, &self.opts, url, &self.headers(), meter).await
    }

    /// Publish to `queue` at `rate` for `secs`, each message stamped with `sent-ns`.
    async fn publish_paced(&self, queue: &String, rate: f64, secs: u64) -> Result<Paced> {
        let mut publisher = self.rabbit().await?.publisher().await?;
        let mut pacer = Pacer::new(rate, secs);
        let mut sent = 0u64;
        while let Some(due) = pacer.due().await {
            for _ in 0..due {
                publisher.publish(queue, body(sent).as_bytes(), props(&format!("lat-{sent}"), Some(now_ns()))).await?;
                sent += 1;
            }
        }
        let paced = pacer.paced(sent);
        publisher.finish().await?;
        Ok(paced)
    }

    fn reference(&self, queue: &String, url: &str) -> RefConsumer {
        let (amqp, queue, url) = (self.url.clone(), queue.clone(), url.to_string());
        let (prefetch, c, headers) = (self.opts.prefetch, self.opts.concurrency as usize, self.headers());
        RefConsumer::spawn(move |flags| ref_consume(amqp, queue, url, prefetch, c, headers, flags))
    }

    async fn cleanup(&self) {
        if let Some(rabbit) = self.rabbit.get() {
            rabbit.close().await;
        }
        delete_queues(&self.url, &self.queues).await;
    }
}

/// Drain `queue` the plainest way: a lapin consumer with the same prefetch; with `url`,
/// each delivery is POSTed (at most C in flight, a task each, router-like headers) and
/// acked on a 2xx, one ack per message; without, acked at once.
async fn reference_drain(
    rabbit: &Rabbit,
    queue: &str,
    opts: &Common,
    url: Option<&str>,
    headers: &[(&str, String)],
    mut meter: DrainMeter<'_>,
) -> Result<RefDrain> {
    let ch = rabbit.conn.create_channel().await?;
    ch.basic_qos(opts.prefetch, BasicQosOptions::default()).await?;
    let mut consumer =
        ch.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let client = reqwest::Client::new();
    let slots = Arc::new(Semaphore::new(opts.concurrency as usize));
    let base = header_map(headers)?;
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let mut acked = 0u64;
    loop {
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
                            add(&mut headers, "ce-id", id.as_str())?;
                        }
                        tasks.spawn(post_and_ack(client, url, headers, d, slot));
                        false
                    }
                }
            }
        };
        if done {
            acked += 1;
        }
        if meter.acked(acked)? {
            break;
        }
    }
    let drained = meter.finish();
    let _ = ch.close(200, "".into()).await;
    drained
}

/// What every reference consumer does per message: POST it, release the concurrency
/// slot, ack only after a 2xx.
async fn post_and_ack(
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    d: lapin::message::Delivery,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Result<()> {
    let posted = post(&client, &url, headers, d.data).await;
    drop(slot);
    posted?;
    d.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}

/// The minimal reference consumer (lapin + reqwest + one ack per message) for latency
/// runs: it forwards the `sent-ns` header as the router does.
async fn ref_consume(
    amqp: String,
    queue: String,
    url: String,
    prefetch: u16,
    concurrency: usize,
    headers: Vec<(&'static str, String)>,
    flags: Flags,
) -> Result<()> {
    let rabbit = Rabbit::connect(&amqp).await?;
    let ch = rabbit.conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    flags.consuming();
    let client = reqwest::Client::new();
    let slots = Arc::new(Semaphore::new(concurrency));
    let base = header_map(&headers)?;
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !flags.stopped() {
        tokio::select! {
            biased;
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                res.map_err(|e| anyhow!("a delivery task failed: {e}"))??;
                flags.acked(1);
            }
            next = consumer.next() => {
                let d = next.ok_or_else(|| anyhow!("the consumer stopped"))??;
                let slot = slots.clone().acquire_owned().await?;
                let mut headers = base.clone();
                let sent = d.properties.headers().as_ref().and_then(|h| match h.inner().get(SENT_NS) {
                    Some(AMQPValue::LongString(v)) => Some(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                    _ => None,
                });
                if let Some(v) = sent {
                    add(&mut headers, &format!("x-message-header-{SENT_NS}"), &v)?;
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

    async fn close(&self) {
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
        headers.insert(SENT_NS.into(), AMQPValue::LongString(ns.to_string().as_str().into()));
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
        eprintln!("cannot connect to RabbitMQ to delete the queues {names:?}");
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
