//! Redis Streams through consumer groups (redis crate, tokio).
//!
//! - `mod.rs`: connections, group creation, the consume loop, publish.
//! - `settle.rs`: batched XACK, the atomic retry / dead-letter scripts, the mover
//!   that brings due retries back, trimming of the retry stream.
//! - `convert.rs`: stream entries ↔ the router's message model; reply parsing.
//!
//! Keys, for a source stream `S` read by group `G`:
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `S` | stream | the source; read by `G` |
//! | `S.G.delayed` | sorted set | retries waiting for their time (score: due, ms) |
//! | `S.G.retry` | stream | due retries; read by `G` beside `S` |
//! | `S.dlq` | stream | dead letters (or the subscription's `dead_letter.stream`) |
//! | `S__queue` | sorted set | with `envelope: messenger`: Symfony Messenger's delayed messages, moved into `S` when due |
//!
//! The consume loop, per subscription: (1) this consumer's own pending entries first
//! (what a previous run of this instance had in flight when it died), (2) every
//! `claim_idle / 4`, entries of any consumer idle longer than `claim_idle`
//! (XAUTOCLAIM: a dead instance's work), (3) new entries (XREADGROUP `>` with BLOCK).
//! It reads at most `prefetch` minus what is in flight.
//!
//! The pending-entries list counts how often an entry was delivered. A redelivered
//! entry's attempt is its `x-router-attempt` plus the deliveries before this one, so
//! the retry policy's `max_attempts` also stops a message that keeps killing its
//! consumer: the engine dead-letters it instead of delivering it again.
//!
//! Blocking reads use a connection of their own; acks, scripts and claims share one
//! multiplexed connection per transport, which reconnects by itself.
//!
//! `config.rs` holds the transport and subscription sections of the config.

pub mod config;
mod convert;
mod settle;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use convert::field;
use convert::Entry;
pub use settle::trim_acked;
use settle::{run_acker, run_mover, Done, Finished, ReadKey, RedisHandle, Shared, StreamKeys};

use super::{
    ConsumeError, ConsumeSpec, Decide, Depths, Inbox, Rework, Reworked, SourceConfig, SourceStatus, Transport,
    TransportError,
};
use crate::config::Envelope;
use crate::dlq::DeadLetter;
use crate::message::{header, Delivery, Message};
use config::{RedisConfig, RedisSource};

/// How long a blocking read waits for new entries before looking at claims and stop.
const BLOCK: Duration = Duration::from_secs(2);
/// Longest answer time for a non-blocking command.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After stopping, how long acks Redis refuses are retried.
const ACK_GIVE_UP: Duration = Duration::from_secs(5);
/// Entries read at once when dead letters are read back.
const DEAD_LETTER_PAGE: usize = 500;
/// Replay one dead letter: delete it from the dead-letter stream and add its copy to
/// its source stream, in one step (nothing added when it was already gone). KEYS:
/// source stream, dead-letter stream; ARGV: entry id, then field, value ...
const REPLAY: &str = r"
if redis.call('XDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
local args = {'XADD', KEYS[1], '*'}
for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
redis.call(unpack(args))
return 1
";

pub struct RedisTransport {
    name: String,
    /// `Err` when the URL cannot be used (validation catches this before start).
    client: Result<redis::Client, String>,
    commands: Result<ConnectionManager, String>,
    /// The URL without credentials, for logs and CloudEvents `source`.
    display: String,
    consumer: String,
    reconnect_max: Duration,
}

impl RedisTransport {
    pub fn new(name: &str, config: &RedisConfig, reconnect_max: Duration) -> Self {
        let url = config.url.clone();
        let client = redis::Client::open(url.as_str()).map_err(|e| format!("redis url: {e}"));
        let commands = client.as_ref().map_err(Clone::clone).and_then(|c| {
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_max_delay(Duration::from_secs(2));
            c.get_connection_manager_lazy(config).map_err(|e| e.to_string())
        });
        RedisTransport {
            name: name.to_string(),
            client,
            commands,
            display: super::display_url(&url, name),
            consumer: config.consumer.clone().unwrap_or_else(host_name),
            reconnect_max,
        }
    }

    fn commands(&self) -> Result<ConnectionManager, String> {
        self.commands.clone()
    }

    /// A connection of its own for blocking reads.
    async fn reader(&self) -> Result<MultiplexedConnection, String> {
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(BLOCK + RESPONSE_TIMEOUT));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.display))
    }

    /// One session: from connect to failure (Err) or stop (Ok).
    async fn session(&self, s: &Session<'_>) -> Result<(), String> {
        let mut conn = self.reader().await?;
        s.ensure_groups(&mut conn).await?;
        s.status.set_connected(true);
        info!(subscription = %s.shared.subscription, streams = ?s.source.streams, group = %s.shared.group, consumer = %self.consumer, "consuming");

        // (1) What this consumer had in flight before: its own pending entries.
        for &key in &s.read_keys {
            if !s.read_history(&mut conn, key).await? {
                return Ok(());
            }
        }
        let claim_every = (s.source.claim_idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
        let mut next_claim = tokio::time::Instant::now();
        loop {
            // (2) A dead consumer's entries.
            if tokio::time::Instant::now() >= next_claim {
                if !s.claim().await? {
                    return Ok(());
                }
                next_claim = tokio::time::Instant::now() + claim_every;
            }
            // (3) New entries.
            let Some(count) = s.shared.capacity(s.limit, s.stop).await else { return Ok(()) };
            let block = BLOCK.min(next_claim.saturating_duration_since(tokio::time::Instant::now()));
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP").arg(&s.shared.group).arg(s.consumer).arg("COUNT").arg(count);
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64).arg("STREAMS");
            for k in &s.read_keys {
                cmd.arg(k.name(&s.shared.streams));
            }
            cmd.arg(vec![">"; s.read_keys.len()]);
            let reply: Value = tokio::select! {
                _ = s.stop.cancelled() => return Ok(()),
                r = cmd.query_async(&mut conn) => r.map_err(|e| s.explain(e))?,
            };
            for (name, entries) in convert::parse_read(&reply)? {
                let Some(key) = s.read_keys.iter().find(|k| k.name(&s.shared.streams) == name).copied() else {
                    continue;
                };
                for e in entries {
                    // New entries were never handed out before.
                    if s.shared.take(key, &e.id) && !s.hand_out(key, e, 1).await {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// One subscription's consume state, shared by its sessions.
struct Session<'a> {
    source: &'a RedisSource,
    shared: Arc<Shared>,
    acks: mpsc::UnboundedSender<Finished>,
    inbox: &'a Arc<dyn Inbox>,
    status: &'a SourceStatus,
    stop: &'a CancellationToken,
    read_keys: Vec<ReadKey>,
    limit: usize,
    /// `redis://host:port/` for CloudEvents `source`.
    display: &'a str,
    /// This instance's name in the group.
    consumer: &'a str,
}

impl Session<'_> {
    /// Create the group on every stream it reads: on the source streams when the
    /// config says `declare`, on the router's own retry streams always.
    async fn ensure_groups(&self, conn: &mut MultiplexedConnection) -> Result<(), String> {
        for k in &self.read_keys {
            if !k.retry && !self.source.declare {
                continue;
            }
            let name = k.name(&self.shared.streams);
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(name)
                .arg(&self.shared.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(conn)
                .await;
            match created {
                Ok(()) => info!(stream = name, group = %self.shared.group, "created consumer group"),
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(format!("creating group {:?} on stream {name:?}: {e}", self.shared.group)),
            }
        }
        Ok(())
    }

    /// Turn a read error into advice where there is one.
    fn explain(&self, e: redis::RedisError) -> String {
        if e.code() == Some("NOGROUP") {
            let g = &self.shared.group;
            let fixes: Vec<String> =
                self.source.streams.iter().map(|s| format!("XGROUP CREATE {s} {g} 0 MKSTREAM")).collect();
            return format!(
                "consumer group {g:?} does not exist on every stream ({e}); set `declare: true` on the subscription or create it: {}",
                fixes.join("; ")
            );
        }
        format!("reading: {e}")
    }

    /// Hand out this consumer's pending entries of `key` (history read from id 0).
    /// Entries still in flight here are skipped. Returns false when stopping.
    async fn read_history(&self, conn: &mut MultiplexedConnection, key: ReadKey) -> Result<bool, String> {
        let name = key.name(&self.shared.streams);
        let mut cursor = "0".to_string();
        let mut recovered = 0usize;
        loop {
            let Some(count) = self.shared.capacity(self.limit, self.stop).await else { return Ok(false) };
            let reply: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.shared.group)
                .arg(self.consumer())
                .arg("COUNT")
                .arg(count)
                .arg("STREAMS")
                .arg(name)
                .arg(&cursor)
                .query_async(conn)
                .await
                .map_err(|e| self.explain(e))?;
            let entries: Vec<Entry> = convert::parse_read(&reply)?.into_iter().flat_map(|(_, e)| e).collect();
            let Some(last) = entries.last() else { break };
            cursor = last.id.clone();
            match self.hand_out_pending(key, entries).await? {
                Some(n) => recovered += n,
                None => return Ok(false),
            }
        }
        if recovered > 0 {
            info!(subscription = %self.shared.subscription, stream = name, entries = recovered, "re-reading this consumer's pending entries");
        }
        Ok(true)
    }

    /// Claim entries idle longer than `claim_idle` from any consumer of the group
    /// (XAUTOCLAIM) and hand them out. Returns false when stopping.
    async fn claim(&self) -> Result<bool, String> {
        let min_idle = u64::try_from(self.source.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.shared.commands.clone();
        for &key in &self.read_keys {
            let name = key.name(&self.shared.streams);
            let mut cursor = "0-0".to_string();
            loop {
                let Some(count) = self.shared.capacity(self.limit, self.stop).await else { return Ok(false) };
                let reply: Value = redis::cmd("XAUTOCLAIM")
                    .arg(name)
                    .arg(&self.shared.group)
                    .arg(self.consumer)
                    .arg(min_idle)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| format!("claiming idle entries of {name:?}: {e}"))?;
                let (next, entries, deleted) = convert::parse_autoclaim(&reply)?;
                if !deleted.is_empty() {
                    warn!(subscription = %self.shared.subscription, stream = name, ids = ?deleted, "pending entries were trimmed from the stream before anyone handled them; Redis dropped them from the pending list");
                }
                if !entries.is_empty() {
                    info!(subscription = %self.shared.subscription, stream = name, entries = entries.len(), "claimed entries idle longer than claim_idle");
                    if self.hand_out_pending(key, entries).await?.is_none() {
                        return Ok(false);
                    }
                }
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
        }
        Ok(true)
    }

    /// Hand out entries that a history read or a claim returned. Each is first marked
    /// in flight (skipped if it already is), then checked to be still pending with this
    /// consumer: an ack of this process that landed after Redis built the reply, or a
    /// claim by another instance, settles it elsewhere. Marking before checking closes
    /// the race: an ack lands before its entry leaves the in-flight set. Returns how
    /// many were handed out, or `None` when stopping.
    async fn hand_out_pending(&self, key: ReadKey, entries: Vec<Entry>) -> Result<Option<usize>, String> {
        let taken: Vec<Entry> = entries.into_iter().filter(|e| self.shared.take(key, &e.id)).collect();
        let counts = match self.pending_here(key, &taken).await {
            Ok(c) => c,
            Err(e) => {
                for t in &taken {
                    self.shared.release(key, &t.id);
                }
                return Err(e);
            }
        };
        let mut handed = 0;
        for e in taken {
            let Some(&deliveries) = counts.get(&e.id) else {
                self.shared.release(key, &e.id);
                continue;
            };
            handed += 1;
            if !self.hand_out(key, e, deliveries).await {
                return Ok(None);
            }
        }
        Ok(Some(handed))
    }

    /// Of `entries`, those pending with this consumer, with how often each has been
    /// delivered (this delivery included), from the group's pending-entries list.
    async fn pending_here(&self, key: ReadKey, entries: &[Entry]) -> Result<HashMap<String, u32>, String> {
        if entries.is_empty() {
            return Ok(HashMap::new());
        }
        let stream = key.name(&self.shared.streams);
        let mut pipe = redis::pipe();
        for e in entries {
            pipe.cmd("XPENDING").arg(stream).arg(&self.shared.group).arg(&e.id).arg(&e.id).arg(1);
        }
        let mut conn = self.shared.commands.clone();
        let replies: Vec<Value> =
            pipe.query_async(&mut conn).await.map_err(|e| format!("reading delivery counts of {stream:?}: {e}"))?;
        let mut out = HashMap::new();
        for r in &replies {
            // [[id, consumer, idle ms, deliveries]], or [] when no longer pending.
            let Some(row) = convert::items(r).and_then(|rows| rows.first()).and_then(convert::items) else { continue };
            let text = |i: usize| row.get(i).and_then(convert::text);
            if let (Some(id), Some(consumer), Some(count)) = (text(0), text(1), text(3)) {
                if consumer == self.consumer {
                    out.insert(id, count.parse().unwrap_or(1));
                }
            }
        }
        Ok(out)
    }

    fn consumer(&self) -> &str {
        self.consumer
    }

    /// Give one entry, already marked in flight, to the pipeline. Returns false when
    /// the router is stopping.
    async fn hand_out(&self, key: ReadKey, entry: Entry, deliveries: u32) -> bool {
        let Some(fields) = entry.fields else {
            // Pending, but trimmed from the stream: there is nothing left to deliver.
            warn!(subscription = %self.shared.subscription, id = %entry.id, "pending entry no longer in the stream (trimmed); acking it");
            let _ = self.acks.send((key, entry.id, Done::Ack));
            return true;
        };
        let origin = &self.shared.streams[key.source].stream;
        let (message, defect) = convert::to_message(self.display, origin, &entry.id, &fields, &self.source.body_field);
        let position = crate::trace::enabled()
            .then(|| crate::trace::Position::Redis { stream: origin.clone(), id: entry.id.clone() });
        let handle =
            RedisHandle { shared: self.shared.clone(), acks: self.acks.clone(), key, id: entry.id, fields, deliveries };
        let mut delivery = Delivery::new(message, Box::new(handle));
        delivery.redelivered = deliveries > 1;
        delivery.attempt = delivery.attempt.saturating_add(deliveries.saturating_sub(1));
        delivery.defect = defect;
        delivery.position = position;
        self.inbox.put(delivery).await.is_ok()
    }
}

#[async_trait]
impl Transport for RedisTransport {
    async fn consume(
        &self,
        spec: ConsumeSpec,
        inbox: Arc<dyn Inbox>,
        status: Arc<SourceStatus>,
        stop: CancellationToken,
    ) -> Result<(), ConsumeError> {
        // The URL was validated; a client that still cannot be made never will be.
        let commands = self.commands().map_err(ConsumeError::Fatal)?;
        let source = spec.source("redis", SourceConfig::redis).map_err(ConsumeError::Fatal)?;
        let group = source.group.clone();
        let dl = &source.dead_letter;
        let messenger = spec.config.envelope == Some(Envelope::Messenger);
        let streams: Vec<StreamKeys> = source
            .streams
            .iter()
            .map(|s| StreamKeys::new(s, &group, dl.stream.as_deref()))
            .map(|keys| if messenger { keys.with_messenger_delayed() } else { keys })
            .collect();
        let read_keys =
            (0..streams.len()).flat_map(|source| [false, true].map(|retry| ReadKey { source, retry })).collect();
        let shared = Arc::new(Shared::new(
            spec.subscription.clone(),
            group,
            self.consumer.clone(),
            streams,
            dl.maxlen,
            commands,
        ));
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let acker = tokio::spawn(run_acker(shared.clone(), ack_rx, ACK_GIVE_UP));
        let mover_stop = stop.child_token();
        let mover = tokio::spawn(run_mover(shared.clone(), mover_stop.clone()));
        let session = Session {
            source,
            shared: shared.clone(),
            acks,
            inbox: &inbox,
            status: &status,
            stop: &stop,
            read_keys,
            // Read no further ahead than the pipeline's window: an entry read but not
            // started ages toward claim_idle, and in ordered mode must not be claimed
            // by another instance while an earlier one is still being handled.
            limit: if source.ordered { 1 } else { usize::from(spec.config.prefetch.max(1)) },
            display: &self.display,
            consumer: &self.consumer,
        };

        let run = || self.session(&session);
        super::keep_consuming(&self.name, &spec.subscription, self.reconnect_max, &status, &stop, run).await;
        status.set_connected(false);
        // Stopping: the acker runs until every handed-out delivery is settled or
        // dropped, so acks of finished work reach Redis.
        drop(session);
        let _ = acker.await;
        mover_stop.cancel();
        let _ = mover.await;
        Ok(())
    }

    async fn backlog(&self, spec: &ConsumeSpec) -> Result<Option<u64>, TransportError> {
        let mut conn = self.commands().map_err(TransportError::Broker)?;
        let source = spec.source("redis", SourceConfig::redis).map_err(TransportError::Unsupported)?;
        let mut waiting = 0u64;
        for stream in &source.streams {
            let retry = StreamKeys::new(stream, &source.group, None).retry;
            for key in [stream.as_str(), retry.as_str()] {
                // Only whether anything waits matters here: count at most one.
                waiting += group_depth(&mut conn, key, &source.group, 1).await?.map_or(0, |(lag, _)| lag);
            }
        }
        Ok(Some(waiting))
    }

    /// Backlog: the group's lag plus pending on the source streams; retries waiting:
    /// the delayed set plus lag and pending of the retry streams; dead letters: the
    /// length of each dead-letter stream (counted once when streams share one).
    async fn depths(&self, spec: &ConsumeSpec) -> Result<Depths, TransportError> {
        let mut conn = self.commands().map_err(TransportError::Broker)?;
        let source = spec.source("redis", SourceConfig::redis).map_err(TransportError::Unsupported)?;
        let failed = |what: &str, e: redis::RedisError| TransportError::Broker(format!("{what}: {e}"));
        let (mut backlog, mut retries, mut dead) = (0u64, 0u64, 0u64);
        let mut dead_keys: Vec<String> = Vec::new();
        for stream in &source.streams {
            let keys = StreamKeys::new(stream, &source.group, source.dead_letter.stream.as_deref());
            let depth = |d: Option<(u64, u64)>| d.map_or(0, |(lag, pending)| lag + pending);
            backlog += depth(group_depth(&mut conn, stream, &source.group, DEPTH_CAP).await?);
            retries += depth(group_depth(&mut conn, &keys.retry, &source.group, DEPTH_CAP).await?);
            let delayed: u64 =
                redis::cmd("ZCARD").arg(&keys.delayed).query_async(&mut conn).await.map_err(|e| failed("ZCARD", e))?;
            retries += delayed;
            if !dead_keys.contains(&keys.dead_letter) {
                dead += redis::cmd("XLEN")
                    .arg(&keys.dead_letter)
                    .query_async::<u64>(&mut conn)
                    .await
                    .map_err(|e| failed("XLEN", e))?;
                dead_keys.push(keys.dead_letter);
            }
        }
        Ok(Depths { backlog: Some(backlog), retries_waiting: Some(retries), dead_letters: Some(dead) })
    }

    /// Each dead-letter stream of `spec` (each once: they may share one), read with
    /// XRANGE page by page. A replayed copy is added to the stream the entry came from
    /// (`x-router-original-stream`) in the same script that deletes the dead letter.
    async fn rework_dead_letters(
        &self,
        spec: &ConsumeSpec,
        decide: Decide<'_>,
        pace: Duration,
    ) -> Result<Reworked, TransportError> {
        let source = spec.source("redis", SourceConfig::redis).map_err(TransportError::Unsupported)?;
        let mut conn = self.commands().map_err(TransportError::Broker)?;
        let failed = |what: &str, e: redis::RedisError| TransportError::Broker(format!("{what}: {e}"));
        let mut keys: Vec<String> = Vec::new();
        for stream in &source.streams {
            let key = StreamKeys::new(stream, &source.group, source.dead_letter.stream.as_deref()).dead_letter;
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        let replay = redis::Script::new(REPLAY);
        let mut done = Reworked::default();
        for key in &keys {
            let origin = super::source_uri(&self.display, key);
            let mut start = "-".to_string();
            loop {
                let page: Value = redis::cmd("XRANGE")
                    .arg(key)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(DEAD_LETTER_PAGE)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| failed("XRANGE", e))?;
                let entries = convert::parse_entries(&page).map_err(TransportError::Broker)?;
                let Some(last) = entries.last().map(|e| e.id.clone()) else { break };
                for entry in entries {
                    let fields = entry.fields.unwrap_or_default();
                    let (message, _) = convert::to_message(&origin, key, &entry.id, &fields, &source.body_field);
                    let letter = DeadLetter { id: format!("{key}/{}", entry.id), destination: key.clone(), message };
                    let act = decide(&letter);
                    match act {
                        Rework::Keep => continue,
                        Rework::Stop => return Ok(done),
                        Rework::Replay => {
                            let Some(stream) = letter.message.headers.get(header::ORIGINAL_STREAM) else {
                                return Err(TransportError::Unsupported(format!(
                                    "dead letter {} has no {} field: which stream it came from is unknown",
                                    letter.id,
                                    header::ORIGINAL_STREAM
                                )));
                            };
                            let mut call = replay.key(stream);
                            call.key(key).arg(&entry.id);
                            let dropped = |n: &[u8]| {
                                n == header::REPLAYED.as_bytes()
                                    || crate::dlq::FAILURE_HEADERS.iter().any(|f| f.as_bytes() == n)
                            };
                            for (n, v) in fields.iter().filter(|(n, _)| !dropped(n)) {
                                call.arg(n.as_ref()).arg(v.as_ref());
                            }
                            call.arg(header::REPLAYED).arg(crate::dlq::replayed_now());
                            call.invoke_async::<i64>(&mut conn).await.map_err(|e| failed("replay", e))?;
                        }
                        Rework::Purge => {
                            redis::cmd("XDEL")
                                .arg(key)
                                .arg(&entry.id)
                                .query_async::<i64>(&mut conn)
                                .await
                                .map_err(|e| failed("XDEL", e))?;
                        }
                    }
                    done.count(act);
                    tokio::time::sleep(pace).await;
                }
                start = format!("({last}");
            }
        }
        Ok(done)
    }

    async fn publish(&self, exchange: &str, routing_key: &str, message: &Message) -> Result<(), TransportError> {
        if !exchange.is_empty() {
            return Err(TransportError::Unsupported(format!(
                "redis has no exchanges (got {exchange:?}): the routing key names the stream"
            )));
        }
        let mut conn = self.commands().map_err(TransportError::Broker)?;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(routing_key).arg("*");
        for (n, v) in convert::to_fields(message, "body") {
            cmd.arg(n.as_ref()).arg(v.as_ref());
        }
        cmd.query_async::<Value>(&mut conn).await.map(|_| ()).map_err(|e| TransportError::NotConfirmed {
            destination: format!("stream {routing_key:?}"),
            reason: e.to_string(),
        })
    }
}

/// This machine's host name: the default consumer name, stable across restarts.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "message-router".into())
}

/// Most entries counted one by one when Redis cannot tell a group's lag.
const DEPTH_CAP: usize = 10_000;

/// `(lag, pending)` of `group` on the stream `key`: what it was not given yet and what
/// it was given and has not acked. When Redis cannot tell the lag (entries were
/// deleted), the entries after the last one delivered are counted, at most `cap`.
/// `None` when the stream or the group is not there (yet): nothing waits in it.
async fn group_depth(
    conn: &mut ConnectionManager,
    key: &str,
    group: &str,
    cap: usize,
) -> Result<Option<(u64, u64)>, TransportError> {
    let failed = |what: &str, e: redis::RedisError| TransportError::Broker(format!("{what} {key}: {e}"));
    let kind: String = redis::cmd("TYPE").arg(key).query_async(conn).await.map_err(|e| failed("TYPE", e))?;
    if kind != "stream" {
        return Ok(None);
    }
    let groups: Value =
        redis::cmd("XINFO").arg("GROUPS").arg(key).query_async(conn).await.map_err(|e| failed("XINFO", e))?;
    // No group: the consumer's own reconnect loop reports that.
    let Some(info) = convert::group_info(&groups, group) else { return Ok(None) };
    let lag = match info.lag {
        Some(lag) => lag,
        None => {
            let after: Value = redis::cmd("XRANGE")
                .arg(key)
                .arg(format!("({}", info.last))
                .arg("+")
                .arg("COUNT")
                .arg(cap)
                .query_async(conn)
                .await
                .map_err(|e| failed("XRANGE", e))?;
            convert::items(&after).map_or(0, |a| a.len() as u64)
        }
    };
    Ok(Some((lag, info.pending)))
}
