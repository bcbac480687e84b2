//! RabbitMQ (AMQP 0-9-1) through lapin.
//!
//! - `mod.rs`: connection (shared by the transport's subscriptions, re-opened after a
//!   failure, with heartbeats so a silent network is noticed), the consume session
//!   loop with reconnect backoff, topology, publish, the backlog for the stall watchdog.
//! - `settle.rs`: ack batching, durable retries and dead letters, all publishes
//!   confirmed before the original is acked.
//! - `delay.rs`: the delay queues retries wait in, and the mover that brings them back.
//! - `publisher.rs`: the confirm-mode publish channel, reopened after a refusal.
//! - `convert.rs`: AMQP properties and headers ↔ the router's message model.
//! - `config.rs`: the transport and subscription sections of the config.
//!
//! Each consume session has its own consume channel (QoS = the subscription's prefetch),
//! its own publisher and its own retry mover. Delivery tags belong to a channel, so a
//! reconnect starts a new session: handles of the old one find their channel closed,
//! and the broker redelivers those messages (duplicates, never losses). A refused
//! publish (a dead-letter exchange that does not exist) only costs the publisher its
//! channel; the consume channel and every message in flight on it stay.

pub mod config;
mod convert;
mod delay;
mod publisher;
mod settle;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use delay::{declare_all, run_mover};
pub use delay::{delay_queue, delay_queues, MOVER_PREFETCH};
use publisher::Publisher;
use settle::{declare_owned_queue, run_acker, AckCmd, AmqpHandle, Session};

use super::{
    ConsumeError, ConsumeSpec, Decide, Depths, Inbox, Rework, Reworked, SourceConfig, SourceStatus, Transport,
    TransportError,
};
use crate::dlq::DeadLetter;
use crate::message::{Delivery, Message};
use config::{AmqpConfig, AmqpSource, ArgValue, ExchangeType, Topology, DEFAULT_HEARTBEAT};

/// A broker that does not answer a connect within this is treated as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest frame asked for unless the URL sets `?frame_max=`. lapin keeps a send
/// and a receive buffer of 32 frames per connection, zero-filled to the negotiated
/// frame_max: RabbitMQ's default 128 KiB makes that 8 MiB of RSS per connection,
/// 32 KiB makes it 2 MiB. Bodies larger than a frame still go through (split into
/// frames); the cost is a few more frame headers per large message.
const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

pub struct AmqpTransport {
    name: String,
    url: String,
    /// The URL without credentials, for logs and CloudEvents `source`.
    display: String,
    topology: Topology,
    reconnect_max: Duration,
    heartbeat: Duration,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// Publisher for [`Transport::publish`], made on first use (per connection).
    publisher: tokio::sync::Mutex<Option<Arc<Publisher>>>,
    /// One dead-letter walk at a time: a walk holds what it read unacked until it
    /// ends, so a second walk beside it (the status page's list beside its stats)
    /// would not see those.
    dead_letter_walk: tokio::sync::Mutex<()>,
    /// Per source queue: retries its mover holds unacked until they are due.
    held: parking_lot::Mutex<std::collections::HashMap<String, Arc<AtomicU64>>>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    #[error("{0}")]
    Other(String),
}

impl AmqpTransport {
    pub fn new(name: &str, config: &AmqpConfig, reconnect_max: Duration) -> Self {
        let url = config.url.clone();
        let display = super::display_url(&url, name);
        AmqpTransport {
            name: name.to_string(),
            url,
            display,
            topology: config.topology.clone(),
            reconnect_max,
            heartbeat: config.heartbeat.unwrap_or(DEFAULT_HEARTBEAT),
            connection: tokio::sync::Mutex::new(None),
            publisher: tokio::sync::Mutex::new(None),
            held: parking_lot::Mutex::default(),
            dead_letter_walk: tokio::sync::Mutex::new(()),
        }
    }

    /// The shared connection, opened (and topology declared) when there is none or
    /// the last one failed.
    async fn connection(&self) -> Result<Arc<Connection>, SessionError> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.status().connected() {
                return Ok(c.clone());
            }
        }
        let props =
            ConnectionProperties::default().with_connection_name(format!("message-router/{}", self.name).into());
        let mut uri: AMQPUri = self
            .url
            .parse()
            .map_err(|e: String| SessionError::Other(format!("the url of transport {:?}: {e}", self.name)))?;
        // Heartbeats every `heartbeat`: a connection silent for two of them (a network
        // partition, a hung broker) is closed, so the consumer reconnects and
        // `/readyz` says so instead of waiting on a dead socket.
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(u16::try_from(self.heartbeat.as_secs()).unwrap_or(u16::MAX).max(1));
        }
        if uri.query.frame_max.is_none() {
            uri.query.frame_max = Some(DEFAULT_FRAME_MAX);
        }
        let conn =
            tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, props)).await.map_err(|_| {
                SessionError::Other(format!("no answer from {} within {CONNECT_TIMEOUT:?}", self.display))
            })??;
        let conn = Arc::new(conn);
        info!(transport = %self.name, broker = %self.display, "connected");
        self.declare_topology(&conn).await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// The shared connection if it is up; never opens one (the stall watchdog must not
    /// connect on its own).
    async fn live_connection(&self) -> Option<Arc<Connection>> {
        self.connection.lock().await.as_ref().filter(|c| c.status().connected()).cloned()
    }

    async fn declare_topology(&self, conn: &Connection) -> Result<(), SessionError> {
        let t = &self.topology;
        if t.is_empty() {
            return Ok(());
        }
        let ch = conn.create_channel().await?;
        for e in &t.exchanges {
            let kind = match e.kind {
                ExchangeType::Direct => ExchangeKind::Direct,
                ExchangeType::Topic => ExchangeKind::Topic,
                ExchangeType::Fanout => ExchangeKind::Fanout,
                ExchangeType::Headers => ExchangeKind::Headers,
            };
            let opts = ExchangeDeclareOptions { durable: e.durable, ..Default::default() };
            ch.exchange_declare(e.name.as_str().into(), kind, opts, FieldTable::default())
                .await
                .map_err(|err| SessionError::Other(format!("declaring exchange {:?}: {err}", e.name)))?;
        }
        for q in &t.queues {
            let mut args = FieldTable::default();
            for (k, v) in &q.arguments {
                let v = match v {
                    ArgValue::Bool(b) => AMQPValue::Boolean(*b),
                    ArgValue::Int(i) => AMQPValue::LongLongInt(*i),
                    ArgValue::Text(s) => AMQPValue::LongString(s.as_str().into()),
                };
                args.insert(k.as_str().into(), v);
            }
            let opts = QueueDeclareOptions { durable: q.durable, ..Default::default() };
            ch.queue_declare(q.name.as_str().into(), opts, args)
                .await
                .map_err(|err| SessionError::Other(format!("declaring queue {:?}: {err}", q.name)))?;
        }
        for b in &t.bindings {
            ch.queue_bind(
                b.queue.as_str().into(),
                b.exchange.as_str().into(),
                b.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| SessionError::Other(format!("binding {:?} to {:?}: {err}", b.queue, b.exchange)))?;
        }
        let _ = ch.close(200, "topology declared".into()).await;
        Ok(())
    }

    /// One consume session: from connect to failure (Err) or stop (Ok).
    async fn session(
        &self,
        spec: &ConsumeSpec,
        source: &AmqpSource,
        inbox: &Arc<dyn Inbox>,
        status: &SourceStatus,
        stop: &CancellationToken,
    ) -> Result<(), SessionError> {
        let connection = self.connection().await?;
        let dead_letter = source.dead_letter();
        if dead_letter.exchange.is_empty() {
            declare_owned_queue(&connection, &dead_letter.routing_key, FieldTable::default())
                .await
                .map_err(SessionError::Other)?;
        }
        declare_all(&connection, &source.queue).await.map_err(SessionError::Other)?;
        let channel = connection.create_channel().await?;
        channel.basic_qos(spec.config.prefetch, BasicQosOptions::default()).await?;
        let consumer_tag = format!("message-router/{}/{}", spec.subscription, uuid::Uuid::new_v4());
        let mut consumer = channel
            .basic_consume(
                source.queue.as_str().into(),
                consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| SessionError::Other(format!("consuming queue {:?}: {e}", source.queue)))?;
        status.set_connected(true);
        info!(subscription = %spec.subscription, queue = %source.queue, prefetch = spec.config.prefetch, "consuming");

        let publisher = Arc::new(Publisher::new(connection.clone()));
        let session = Arc::new(Session {
            consume_channel: channel.clone(),
            publisher: publisher.clone(),
            subscription: spec.subscription.clone(),
            queue: source.queue.clone(),
            dead_letter,
        });
        let mover_stop = stop.child_token();
        let held = self.held.lock().entry(source.queue.clone()).or_default().clone();
        let mover = tokio::spawn(run_mover(
            connection.clone(),
            publisher.clone(),
            source.queue.clone(),
            held,
            mover_stop.clone(),
        ));
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let acker = tokio::spawn(run_acker(channel.clone(), ack_rx));
        let origin = super::source_uri(&self.display, &source.queue);
        let result = loop {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => break Ok(()),
                next = consumer.next() => next,
            };
            let d = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => break Err(e.into()),
                None => {
                    break Err(SessionError::Other("consumer cancelled by the broker (was the queue deleted?)".into()))
                }
            };
            let _ = acks.send(AckCmd::Delivered(d.delivery_tag));
            let body = Bytes::from(d.data);
            let (message, defect) = convert::to_message(&origin, d.routing_key.as_str(), &d.properties, body.clone());
            let handle = AmqpHandle {
                tag: d.delivery_tag,
                acks: acks.clone(),
                session: session.clone(),
                exchange: d.exchange.as_str().to_string(),
                routing_key: d.routing_key.as_str().to_string(),
                properties: d.properties,
                body,
                id: message.id.clone(),
            };
            let redelivered = d.redelivered;
            let mut delivery = Delivery::new(message, Box::new(handle));
            delivery.redelivered = redelivered;
            delivery.defect = defect;
            if inbox.put(delivery).await.is_err() {
                // The router is stopping; the refused delivery is dropped, so handed back.
                break Ok(());
            }
        };
        status.set_connected(false);
        if channel.status().connected() {
            let _ = channel.basic_cancel(consumer_tag.as_str().into(), BasicCancelOptions::default()).await;
        }
        drop(acks);
        drop(session);
        mover_stop.cancel();
        if result.is_ok() {
            // Stopping: wait until every delivery of this session is settled or
            // dropped, so their acks reach the broker before the channel closes.
            let _ = acker.await;
            let _ = mover.await;
            if channel.status().connected() {
                let _ = channel.close(200, "subscription stopped".into()).await;
            }
            publisher.close().await;
        }
        // On failure the channel is gone: the broker redelivers everything unacked, so
        // reconnect at once instead of waiting for handlers whose acks cannot land.
        result
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    async fn consume(
        &self,
        spec: ConsumeSpec,
        inbox: Arc<dyn Inbox>,
        status: Arc<SourceStatus>,
        stop: CancellationToken,
    ) -> Result<(), ConsumeError> {
        let source = spec.source("amqp", SourceConfig::amqp).map_err(ConsumeError::Fatal)?;
        let session = || self.session(&spec, source, &inbox, &status, &stop);
        super::keep_consuming(&self.name, &spec.subscription, self.reconnect_max, &status, &stop, session).await;
        Ok(())
    }

    async fn publish(&self, exchange: &str, routing_key: &str, message: &Message) -> Result<(), TransportError> {
        let conn = self.connection().await.map_err(|e| TransportError::Broker(e.to_string()))?;
        let publisher = {
            let mut slot = self.publisher.lock().await;
            match slot.as_ref().filter(|p| p.is_on(&conn)) {
                Some(p) => p.clone(),
                None => {
                    let p = Arc::new(Publisher::new(conn));
                    *slot = Some(p.clone());
                    p
                }
            }
        };
        let props = convert::publish_properties(message);
        publisher.publish(exchange, routing_key, &message.body, props).await.map_err(|e| TransportError::NotConfirmed {
            destination: format!("exchange {exchange:?} routing key {routing_key:?}"),
            reason: e.to_string(),
        })
    }

    async fn backlog(&self, spec: &ConsumeSpec) -> Result<Option<u64>, TransportError> {
        let source = spec.source("amqp", SourceConfig::amqp).map_err(TransportError::Unsupported)?;
        let Some(conn) = self.live_connection().await else { return Ok(None) };
        let ch = conn.create_channel().await.map_err(|e| TransportError::Broker(e.to_string()))?;
        let declared = ch
            .queue_declare(
                source.queue.as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await;
        if ch.status().connected() {
            let _ = ch.close(200, "looked".into()).await;
        }
        let queue = declared.map_err(|e| TransportError::Broker(format!("queue {:?}: {e}", source.queue)))?;
        Ok(Some(u64::from(queue.message_count())))
    }

    /// Ready messages of the queue, of its delay queues (plus the copies this
    /// router's mover holds until due) and of its dead-letter queue, by passive
    /// declares on one channel, once a session has declared them (nothing before: the
    /// depths are unknown then; a queue not declared yet counts 0; the refusal closes
    /// the channel, so the next question takes a new one).
    async fn depths(&self, spec: &ConsumeSpec) -> Result<Depths, TransportError> {
        let source = spec.source("amqp", SourceConfig::amqp).map_err(TransportError::Unsupported)?;
        // Not before a session of this transport has declared the subscription's
        // queues: a passive declare of a queue that does not exist yet makes the
        // broker close the channel, which lapin logs as an ERROR (at every first start
        // on fresh queues, the first read raced the session's declarations).
        let Some(held) = self.held.lock().get(&source.queue).cloned() else { return Ok(Depths::default()) };
        let Some(conn) = self.live_connection().await else { return Ok(Depths::default()) };
        let mut ch = conn.create_channel().await.map_err(|e| TransportError::Broker(e.to_string()))?;
        let backlog = ready_count(&conn, &mut ch, &source.queue).await?;
        let mut waiting = held.load(Ordering::Relaxed);
        for q in delay_queues(&source.queue) {
            waiting += ready_count(&conn, &mut ch, &q).await?;
        }
        let dl = source.dead_letter();
        // Dead letters published to an exchange land in queues the router does not know.
        let dead_letters =
            if dl.exchange.is_empty() { Some(ready_count(&conn, &mut ch, &dl.routing_key).await?) } else { None };
        if ch.status().connected() {
            let _ = ch.close(200, "counted".into()).await;
        }
        Ok(Depths { backlog: Some(backlog), retries_waiting: Some(waiting), dead_letters })
    }

    /// The dead-letter queue of `spec`, each message taken unacked and given back when
    /// the reading channel closes: the queue keeps every one it is not told to
    /// remove, in its order, whatever happens to this reader. At most the count at the
    /// start is taken, so none is seen twice. A replayed copy is published (confirmed)
    /// to the subscription's queue before its dead letter is acked.
    async fn rework_dead_letters(
        &self,
        spec: &ConsumeSpec,
        decide: Decide<'_>,
        pace: Duration,
    ) -> Result<Reworked, TransportError> {
        let source = spec.source("amqp", SourceConfig::amqp).map_err(TransportError::Unsupported)?;
        let dl = source.dead_letter();
        if !dl.exchange.is_empty() {
            return Err(TransportError::Unsupported(format!(
                "the dead letters of {:?} go to exchange {:?}: read them from the queues bound to it",
                spec.subscription, dl.exchange
            )));
        }
        let broker = |e: lapin::Error| TransportError::Broker(e.to_string());
        let _walking = self.dead_letter_walk.lock().await;
        let conn = self.connection().await.map_err(|e| TransportError::Broker(e.to_string()))?;
        let ch = conn.create_channel().await.map_err(broker)?;
        let queue = dl.routing_key.as_str();
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let mut done = Reworked::default();
        // A queue not declared yet: nothing was dead-lettered (the declare failed and
        // closed this channel).
        let Ok(declared) = ch.queue_declare(queue.into(), passive, FieldTable::default()).await else {
            return Ok(done);
        };
        let origin = super::source_uri(&self.display, queue);
        let publisher = Publisher::new(conn.clone());
        let mut result = Ok(());
        for _ in 0..declared.message_count() {
            let got = match ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await {
                Ok(Some(got)) => got.delivery,
                Ok(None) => break,
                Err(e) => {
                    result = Err(broker(e));
                    break;
                }
            };
            let body = Bytes::from(got.data);
            let (message, _) = convert::to_message(&origin, got.routing_key.as_str(), &got.properties, body.clone());
            let letter = DeadLetter { id: message.id.clone(), destination: queue.to_string(), message };
            let act = decide(&letter);
            if act == Rework::Replay {
                let props = convert::replay_properties(&got.properties);
                if let Err(e) = publisher.publish("", &source.queue, &body, props).await {
                    result = Err(TransportError::NotConfirmed {
                        destination: format!("queue {:?}", source.queue),
                        reason: e.to_string(),
                    });
                    break;
                }
            }
            match act {
                Rework::Keep => continue,
                Rework::Stop => break,
                Rework::Replay | Rework::Purge => {
                    if let Err(e) = ch.basic_ack(got.delivery_tag, BasicAckOptions::default()).await {
                        result = Err(broker(e));
                        break;
                    }
                    done.count(act);
                    tokio::time::sleep(pace).await;
                }
            }
        }
        publisher.close().await;
        if ch.status().connected() {
            let _ = ch.close(200, "dead letters read".into()).await;
        }
        result.map(|()| done)
    }

    async fn close(&self) {
        if let Some(c) = self.connection.lock().await.take() {
            if c.status().connected() {
                let _ = c.close(200, ShortString::from("message-router stopping")).await;
            }
        }
    }
}

/// Ready messages of `queue`, by a passive declare on `ch`. A queue not declared yet
/// holds none; its refusal closed `ch`, which is replaced by a new channel.
async fn ready_count(conn: &Connection, ch: &mut lapin::Channel, queue: &str) -> Result<u64, TransportError> {
    let broker = |e: lapin::Error| TransportError::Broker(format!("queue {queue:?}: {e}"));
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    match ch.queue_declare(queue.into(), passive, FieldTable::default()).await {
        Ok(q) => Ok(u64::from(q.message_count())),
        Err(e) if !conn.status().connected() => Err(broker(e)),
        Err(_) => {
            *ch = conn.create_channel().await.map_err(broker)?;
            Ok(0)
        }
    }
}
