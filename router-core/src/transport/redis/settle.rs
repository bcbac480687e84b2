//! Settling Redis stream entries.
//!
//! - Acks are batched: one acker task per subscription sends one XACK per stream for
//!   whatever settled since its last round. A failed XACK is retried (acks are by id,
//!   on any connection, so nothing ties them to the connection that read the entry).
//! - Retries and dead letters are Lua scripts, so the write and the XACK are one
//!   atomic step: no window where the message is in both places or in neither. Each
//!   script first checks the entry is still pending in the group (another instance may
//!   have claimed and settled it), and writes before it acks, so a failing write (a
//!   key of the wrong type, say) aborts the script before the ack.
//! - Retries wait in a sorted set scored by due time; the mover moves due ones into
//!   the retry stream, which the group reads beside the source stream. A second stream
//!   rather than the source itself: other consumer groups of the source stream must
//!   not see this group's retries.
//! - The retry stream is trimmed to what every group has read and acked (MINID), never
//!   by length: a length trim could drop a retry nobody has read yet.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::MESSENGER_BODY_FIELD;
use super::convert::{id_order, items, pack_fields, text};
use crate::backoff;
use crate::message::{header, Failure, Settle, SettleError, Settlement};

/// Schedule a retry: ZADD the packed fields at now + delay, then XACK.
/// KEYS: source stream, delayed set. ARGV: group, id, delay ms, packed fields.
const RETRY: &str = r"
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// Dead-letter: XADD to the dead-letter stream (trimmed to about MAXLEN when ARGV[3]
/// is not 0), then XACK. KEYS: source stream, dead-letter stream.
/// ARGV: group, id, maxlen, field, value, ...
const DEAD_LETTER: &str = r"
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then return 0 end
local args = {'XADD', KEYS[2]}
if ARGV[3] ~= '0' then
  args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = ARGV[3]
end
args[#args + 1] = '*'
for i = 4, #ARGV do args[#args + 1] = ARGV[i] end
redis.call(unpack(args))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// Move due retries (at most ARGV[1]) from the delayed set into the retry stream, each
/// XADD before its ZREM. Returns {moved, ms until the next one is due or -1}.
/// KEYS: delayed set, retry stream.
const MOVE_DUE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  local args = {'XADD', KEYS[2], '*'}
  local pos = 1
  while pos <= #m do
    local a, b, c, d = string.byte(m, pos, pos + 3)
    local len = ((a * 256 + b) * 256 + c) * 256 + d
    args[#args + 1] = string.sub(m, pos + 4, pos + 3 + len)
    pos = pos + 4 + len
  end
  redis.call(unpack(args))
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return {#due, -1} end
return {#due, math.max(0, tonumber(nxt[2]) - now)}
";

/// Move due entries of Symfony Messenger's delayed set (at most ARGV[1]) into the
/// source stream, each as the one field ARGV[2] holding the member as it is (the
/// envelope JSON Messenger's Redis transport reads), XADD before ZREM: the same move
/// `messenger:consume` makes, atomic, so it and routers can share a stream. Returns
/// {moved, ms until the next one is due or -1}. KEYS: the sorted set, the stream.
const MOVE_MESSENGER_DUE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', ARGV[2], m)
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return {#due, -1} end
return {#due, math.max(0, tonumber(nxt[2]) - now)}
";

/// The keys of one source stream as a group reads it.
#[derive(Clone, Debug)]
pub struct StreamKeys {
    /// The source stream.
    pub stream: String,
    /// Retries that are due, read by the group beside the source.
    pub retry: String,
    /// Retries waiting for their time (sorted set, score = due time in ms).
    pub delayed: String,
    /// Where dead letters go.
    pub dead_letter: String,
    /// Symfony Messenger's delayed messages (`DelayStamp`), waiting in the sorted set
    /// `<stream>__queue` (score: due time in ms) for a consumer to move them into
    /// the stream: with `envelope: messenger`, the mover does.
    pub messenger_delayed: Option<String>,
}

impl StreamKeys {
    pub fn new(stream: &str, group: &str, dead_letter: Option<&str>) -> Self {
        StreamKeys {
            stream: stream.to_string(),
            retry: format!("{stream}.{group}.retry"),
            delayed: format!("{stream}.{group}.delayed"),
            dead_letter: dead_letter.map_or_else(|| format!("{stream}.dlq"), str::to_string),
            messenger_delayed: None,
        }
    }

    /// With Messenger's delayed set moved into the stream (`envelope: messenger`).
    pub fn with_messenger_delayed(mut self) -> Self {
        self.messenger_delayed = Some(format!("{}__queue", self.stream));
        self
    }
}

/// Where an entry was read: the index of its source stream, and whether it came
/// through that stream's retry stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReadKey {
    pub source: usize,
    pub retry: bool,
}

impl ReadKey {
    pub fn name<'a>(&self, streams: &'a [StreamKeys]) -> &'a str {
        let s = &streams[self.source];
        if self.retry {
            &s.retry
        } else {
            &s.stream
        }
    }
}

/// What the acker does for a finished entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    /// Handled (or durably settled elsewhere): XACK.
    Ack,
    /// Handed back unattempted (shutdown, or its task was dropped): it stays pending,
    /// and its delivery count goes back to this, so the next delivery does not count
    /// this one as an attempt (XCLAIM … RETRYCOUNT n JUSTID).
    GiveBack(u32),
}

/// One finished entry, for the acker.
pub type Finished = (ReadKey, String, Done);

/// What a subscription's handles, acker and consume loop share.
pub struct Shared {
    pub subscription: String,
    pub group: String,
    /// This instance's consumer name in the group.
    pub consumer: String,
    pub streams: Vec<StreamKeys>,
    pub dead_letter_maxlen: Option<u64>,
    pub commands: ConnectionManager,
    /// Entries handed out and not yet settled at Redis (acked, retried, dead-lettered,
    /// or given up): the bound on what is read, and what history reads and claims
    /// must not hand out a second time.
    in_flight: Mutex<HashSet<(ReadKey, String)>>,
    freed: Notify,
    scripts: Scripts,
}

struct Scripts {
    retry: Script,
    dead_letter: Script,
    move_due: Script,
    move_messenger_due: Script,
}

impl Shared {
    pub fn new(
        subscription: String,
        group: String,
        consumer: String,
        streams: Vec<StreamKeys>,
        dead_letter_maxlen: Option<u64>,
        commands: ConnectionManager,
    ) -> Self {
        Shared {
            subscription,
            group,
            consumer,
            streams,
            dead_letter_maxlen,
            commands,
            in_flight: Mutex::new(HashSet::new()),
            freed: Notify::new(),
            scripts: Scripts {
                retry: Script::new(RETRY),
                dead_letter: Script::new(DEAD_LETTER),
                move_due: Script::new(MOVE_DUE),
                move_messenger_due: Script::new(MOVE_MESSENGER_DUE),
            },
        }
    }

    /// Record an entry as handed out; false if it already is (a history read or a
    /// claim returned an entry this process is still handling).
    pub fn take(&self, key: ReadKey, id: &str) -> bool {
        self.in_flight.lock().insert((key, id.to_string()))
    }

    pub fn release(&self, key: ReadKey, id: &str) {
        self.in_flight.lock().remove(&(key, id.to_string()));
        self.freed.notify_waiters();
    }

    fn release_all(&self, done: &[Finished]) {
        let mut set = self.in_flight.lock();
        for (key, id, _) in done {
            set.remove(&(*key, id.clone()));
        }
        drop(set);
        self.freed.notify_waiters();
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().len()
    }

    /// Wait until fewer than `limit` entries are in flight; returns how many more may
    /// be read, or `None` when `stop` fired first.
    pub async fn capacity(&self, limit: usize, stop: &CancellationToken) -> Option<usize> {
        loop {
            let freed = self.freed.notified();
            let free = limit.saturating_sub(self.in_flight());
            if free > 0 {
                return Some(free);
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = freed => {}
                // Belt and braces against a missed wake-up.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// The Redis half of a [`crate::message::Delivery`].
pub struct RedisHandle {
    pub shared: Arc<Shared>,
    pub acks: mpsc::UnboundedSender<Finished>,
    pub key: ReadKey,
    pub id: String,
    pub fields: Vec<(Bytes, Bytes)>,
    /// How often Redis had delivered the entry, this delivery included.
    pub deliveries: u32,
}

#[async_trait]
impl Settle for RedisHandle {
    async fn settle(&mut self, settlement: &Settlement) -> Result<(), SettleError> {
        let result = match settlement {
            Settlement::Ack => {
                // The acker retries a refused XACK itself, and releases the entry once
                // it landed.
                if self.acks.send((self.key, self.id.clone(), Done::Ack)).is_ok() {
                    return Ok(());
                }
                Err(SettleError::Failed("the acker has stopped".into()))
            }
            Settlement::Release => {
                self.give_back();
                return Ok(());
            }
            Settlement::Retry { after, next_attempt, failure } => self.retry(*after, *next_attempt, failure).await,
            Settlement::DeadLetter(failure) => self.dead_letter(failure).await,
        };
        // Refused: the entry stays pending here and in flight (it keeps its window
        // slot) until the same settlement is tried again.
        if !matches!(result, Err(SettleError::Failed(_))) {
            self.shared.release(self.key, &self.id);
        }
        result
    }

    fn abandon(self: Box<Self>) {
        self.give_back();
    }
}

impl RedisHandle {
    /// Leave the entry pending here (re-read at the next start, or claimed once idle
    /// for claim_idle), without counting this delivery as an attempt.
    fn give_back(&self) {
        let done = Done::GiveBack(self.deliveries.saturating_sub(1));
        if self.acks.send((self.key, self.id.clone(), done)).is_err() {
            self.shared.release(self.key, &self.id);
        }
    }

    fn stream(&self) -> &StreamKeys {
        &self.shared.streams[self.key.source]
    }

    /// The entry's fields for a retry or a dead letter: the original fields without
    /// the router's earlier bookkeeping, where it first came from, then `extra`.
    fn republish_fields(&self, extra: Vec<(&'static str, String)>) -> Vec<(Bytes, Bytes)> {
        let existing = |name: &str| {
            self.fields
                .iter()
                .find(|(n, _)| n.as_ref() == name.as_bytes())
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let origin = [
            (
                header::ORIGINAL_STREAM,
                existing(header::ORIGINAL_STREAM).unwrap_or_else(|| self.stream().stream.clone()),
            ),
            (header::ORIGINAL_ID, existing(header::ORIGINAL_ID).unwrap_or_else(|| self.id.clone())),
        ];
        // An extra replaces the original of the same name (a new `traceparent`).
        let mut out: Vec<(Bytes, Bytes)> = self
            .fields
            .iter()
            .filter(|(n, _)| !n.starts_with(b"x-router-") && !extra.iter().any(|(e, _)| e.as_bytes() == n.as_ref()))
            .cloned()
            .collect();
        for (name, value) in origin.into_iter().chain(extra) {
            out.push((Bytes::from_static(name.as_bytes()), Bytes::from(value)));
        }
        out
    }

    async fn retry(&self, after: Duration, next_attempt: u32, failure: &Failure) -> Result<(), SettleError> {
        let mut extra = vec![(header::ATTEMPT, next_attempt.to_string())];
        extra.extend(failure.headers(&self.shared.subscription));
        let member = pack_fields(&self.republish_fields(extra));
        let delay_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.shared.commands.clone();
        let done: i64 = self
            .shared
            .scripts
            .retry
            .key(self.key.name(&self.shared.streams))
            .key(&self.stream().delayed)
            .arg(&self.shared.group)
            .arg(&self.id)
            .arg(delay_ms)
            .arg(member)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| refused(e, format!("scheduling the retry in {:?}", self.stream().delayed)))?;
        self.note_taken_over(done);
        Ok(())
    }

    async fn dead_letter(&self, failure: &Failure) -> Result<(), SettleError> {
        let fields = self.republish_fields(failure.headers(&self.shared.subscription));
        let mut conn = self.shared.commands.clone();
        let dlq = &self.stream().dead_letter;
        let mut call = self.shared.scripts.dead_letter.key(self.key.name(&self.shared.streams));
        call.key(dlq).arg(&self.shared.group).arg(&self.id).arg(self.shared.dead_letter_maxlen.unwrap_or(0));
        for (n, v) in &fields {
            call.arg(n.as_ref()).arg(v.as_ref());
        }
        let done: i64 = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| refused(e, format!("writing the dead letter to {dlq:?}")))?;
        self.note_taken_over(done);
        Ok(())
    }

    fn note_taken_over(&self, done: i64) {
        if done == 0 {
            // Claimed and settled by another consumer meanwhile: it owns the outcome.
            debug!(subscription = %self.shared.subscription, id = %self.id, "entry no longer pending here; settled elsewhere");
        }
    }
}

/// A script refusal as a settle error: a group that no longer exists means the entry
/// is not pending here any more (whoever recreates the group decides what is
/// delivered again); anything else is tried again.
fn refused(e: redis::RedisError, what: String) -> SettleError {
    if e.code() == Some("NOGROUP") {
        SettleError::Gone(format!("{what}: the consumer group no longer exists ({e})"))
    } else {
        SettleError::Failed(format!("{what}: {e}"))
    }
}

/// Batches acks until every sender is gone, retrying failed XACKs with backoff. Acks
/// into a group that no longer exists are dropped (nothing is pending there to ack).
/// After the last sender is gone, gives up on acks Redis still refuses after
/// `give_up`: those entries stay pending and are delivered again (duplicates, never
/// losses).
pub async fn run_acker(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Finished>, give_up: Duration) {
    let mut pending: Vec<Finished> = Vec::new();
    let mut batch = Vec::with_capacity(256);
    let mut backoff = acker_backoff();
    let mut warned: Option<std::time::Instant> = None;
    let mut open = true;
    let mut closed_at = None;
    loop {
        if pending.is_empty() {
            if !open || rx.recv_many(&mut batch, 4096).await == 0 {
                return;
            }
        } else if open {
            // Take what is there without waiting: the retry must not wait for traffic.
            while let Ok(item) = rx.try_recv() {
                batch.push(item);
            }
            if rx.is_closed() && rx.is_empty() {
                open = false;
            }
        }
        pending.append(&mut batch);
        match xack(&shared, &pending).await {
            Ok(()) => {
                shared.release_all(&pending);
                pending.clear();
                backoff = acker_backoff();
                if warned.take().is_some() {
                    info!(subscription = %shared.subscription, "acks land again");
                }
            }
            Err(e) if e.code() == Some("NOGROUP") => {
                warn!(subscription = %shared.subscription, entries = pending.len(), error = %e, "the consumer group is gone: nothing left to ack for these entries");
                shared.release_all(&pending);
                pending.clear();
            }
            Err(e) => {
                if !open {
                    let since = *closed_at.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= give_up {
                        warn!(subscription = %shared.subscription, entries = pending.len(), error = %e, "giving up acking; those entries stay pending and will be delivered again");
                        shared.release_all(&pending);
                        return;
                    }
                }
                let wait = backoff.next_delay();
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    warned = Some(std::time::Instant::now());
                    warn!(subscription = %shared.subscription, entries = pending.len(), error = %e, retry_in = ?wait, "XACK failed; retrying (the entries stay in flight)");
                }
                tokio::time::sleep(wait).await;
            }
        }
        if open && rx.is_closed() && rx.is_empty() {
            open = false;
        }
    }
}

fn acker_backoff() -> backoff::Backoff {
    backoff::exponential(Duration::from_millis(50), Duration::from_secs(2))
}

/// One XACK per stream for what is done, and one XCLAIM per entry given back,
/// pipelined.
async fn xack(shared: &Shared, done: &[Finished]) -> redis::RedisResult<()> {
    let mut by_key: HashMap<ReadKey, Vec<&str>> = HashMap::new();
    let mut pipe = redis::pipe();
    for (key, id, what) in done {
        match what {
            Done::Ack => by_key.entry(*key).or_default().push(id),
            Done::GiveBack(count) => {
                pipe.cmd("XCLAIM")
                    .arg(key.name(&shared.streams))
                    .arg(&shared.group)
                    .arg(&shared.consumer)
                    .arg(0)
                    .arg(id)
                    .arg("RETRYCOUNT")
                    .arg(*count)
                    .arg("JUSTID")
                    .ignore();
            }
        }
    }
    for (key, ids) in by_key {
        pipe.cmd("XACK").arg(key.name(&shared.streams)).arg(&shared.group).arg(ids).ignore();
    }
    let mut conn = shared.commands.clone();
    pipe.query_async::<()>(&mut conn).await
}

/// Move due retries into the retry streams until `stop`, and trim the retry streams to
/// what is acked. Runs in every instance; the script makes concurrent movers safe.
pub async fn run_mover(shared: Arc<Shared>, stop: CancellationToken) {
    const BATCH: i64 = 256;
    const MAX_WAIT: Duration = Duration::from_millis(500);
    const TRIM_EVERY: Duration = Duration::from_secs(60);
    let mut last_trim = tokio::time::Instant::now();
    let mut failing = false;
    loop {
        let mut wait = MAX_WAIT;
        let mut failed = false;
        let mut conn = shared.commands.clone();
        for s in &shared.streams {
            let mut retries = shared.scripts.move_due.prepare_invoke();
            retries.key(&s.delayed).key(&s.retry).arg(BATCH);
            let mut moves = vec![(retries, &s.delayed, "retries due")];
            if let Some(delayed) = &s.messenger_delayed {
                let mut messenger = shared.scripts.move_messenger_due.prepare_invoke();
                messenger.key(delayed).key(&s.stream).arg(BATCH).arg(MESSENGER_BODY_FIELD);
                moves.push((messenger, delayed, "delayed Messenger messages due"));
            }
            for (invocation, from, what) in moves {
                let reply: redis::RedisResult<(i64, i64)> = invocation.invoke_async(&mut conn).await;
                match reply {
                    Ok((moved, next_ms)) => {
                        if moved > 0 {
                            debug!(subscription = %shared.subscription, stream = %s.stream, moved, "{what}");
                        }
                        if moved == BATCH {
                            wait = Duration::ZERO;
                        } else if next_ms >= 0 {
                            wait = wait.min(Duration::from_millis(next_ms.unsigned_abs()));
                        }
                    }
                    Err(e) => {
                        // Once per outage: the consumer's reconnect loop already reports it.
                        if !failing {
                            warn!(subscription = %shared.subscription, key = %from, error = %e, "moving {what} failed; will keep trying");
                        }
                        failed = true;
                        wait = Duration::from_secs(1);
                    }
                }
            }
        }
        if failing && !failed {
            info!(subscription = %shared.subscription, "moving due retries works again");
        }
        failing = failed;
        if last_trim.elapsed() >= TRIM_EVERY {
            last_trim = tokio::time::Instant::now();
            for s in &shared.streams {
                if let Err(e) = trim_acked(&mut conn, &s.retry).await {
                    debug!(key = %s.retry, error = %e, "trimming the retry stream failed");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Trim `stream` to the entries some group may still need: those at or after the
/// oldest pending entry or last delivered id of every group. Returns how many went.
pub async fn trim_acked<C>(conn: &mut C, stream: &str) -> redis::RedisResult<u64>
where
    C: redis::aio::ConnectionLike + Send,
{
    let groups: Value = redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(conn).await?;
    let mut keep_from: Option<String> = None;
    for g in items(&groups).unwrap_or_default() {
        let info: HashMap<String, String> = items(g)
            .unwrap_or_default()
            .chunks(2)
            .filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?)))
            .collect();
        let (Some(name), Some(last)) = (info.get("name"), info.get("last-delivered-id")) else { continue };
        let summary: Value = redis::cmd("XPENDING").arg(stream).arg(name).query_async(conn).await?;
        let oldest = items(&summary).and_then(|s| s.get(1)).and_then(text);
        let group_min = match oldest {
            Some(o) if id_order(&o, last).is_lt() => o,
            _ => last.clone(),
        };
        if keep_from.as_deref().is_none_or(|k| id_order(&group_min, k).is_lt()) {
            keep_from = Some(group_min);
        }
    }
    let Some(min) = keep_from.filter(|m| m != "0-0") else { return Ok(0) };
    let trimmed: u64 = redis::cmd("XTRIM").arg(stream).arg("MINID").arg(&min).query_async(conn).await?;
    if trimmed > 0 {
        info!(stream, trimmed, "trimmed acked retries");
    }
    Ok(trimmed)
}
