//! In-process queues, for tests and embedders. Same contract as a real broker
//! (prefetch bound, settle once, release on drop, retries after their delay,
//! dead-letters with headers) but nothing is durable: the process is the broker. A
//! test can make it refuse writes to a queue ([`MemoryBroker::refuse`]), as a broker
//! refuses a publish to a dead-letter exchange that does not exist.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{ConsumeError, ConsumeSpec, Depths, Inbox, SourceConfig, SourceStatus, Transport, TransportError};
use crate::message::{header, Delivery, Message, Settle, SettleError, Settlement};

/// `transports.<name>` of `type: memory` takes no keys of its own; its subscriptions
/// take those of an AMQP subscription (`queue`, `ordered`, `dead_letter`).
#[derive(Clone, Debug, Default, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {}

/// A named set of in-memory queues. The same name gives the same broker within a
/// process, so a test can publish into the broker the router consumes.
#[derive(Default)]
pub struct MemoryBroker {
    queues: Mutex<HashMap<String, Arc<Queue>>>,
    /// Queues whose writes (retries, dead letters) are refused.
    refused: Mutex<HashSet<String>>,
    /// Writes refused so far.
    refusals: AtomicUsize,
    /// What the next consumers do instead of consuming (tests of the supervisor).
    sabotage: Mutex<VecDeque<Sabotage>>,
}

/// How a test breaks the next consumer of a [`MemoryBroker`].
#[derive(Clone, Debug)]
pub enum Sabotage {
    /// Return this error at once (the supervisor starts it again).
    Fail(String),
    /// Return this as a fatal error (the router stops).
    Fatal(String),
    /// Look connected but take nothing until stopped (a silent stall).
    Stall,
}

#[derive(Default)]
struct Queue {
    items: Mutex<VecDeque<Message>>,
    ready: Notify,
}

static BROKERS: LazyLock<Mutex<HashMap<String, Arc<MemoryBroker>>>> = LazyLock::new(Default::default);

impl MemoryBroker {
    pub fn named(name: &str) -> Arc<MemoryBroker> {
        BROKERS.lock().entry(name.to_string()).or_default().clone()
    }

    fn queue(&self, name: &str) -> Arc<Queue> {
        self.queues.lock().entry(name.to_string()).or_default().clone()
    }

    /// Append a message to a queue (exchanges do not exist here: the routing key names
    /// the queue).
    pub fn push(&self, queue: &str, message: Message) {
        let q = self.queue(queue);
        q.items.lock().push_back(message);
        q.ready.notify_one();
    }

    /// Take everything currently in a queue (tests read dead-letter queues this way).
    pub fn drain(&self, queue: &str) -> Vec<Message> {
        self.queue(queue).items.lock().drain(..).collect()
    }

    pub fn len(&self, queue: &str) -> usize {
        self.queue(queue).items.lock().len()
    }

    pub fn is_empty(&self, queue: &str) -> bool {
        self.len(queue) == 0
    }

    /// The next consumer started on this broker does `what` instead of consuming.
    pub fn sabotage_next(&self, what: Sabotage) {
        self.sabotage.lock().push_back(what);
    }

    /// Refuse (or accept again) settlements that write to `queue`.
    pub fn refuse(&self, queue: &str, refuse: bool) {
        if refuse {
            self.refused.lock().insert(queue.to_string());
        } else {
            self.refused.lock().remove(queue);
        }
    }

    /// How many writes were refused so far.
    pub fn refusals(&self) -> usize {
        self.refusals.load(Ordering::SeqCst)
    }

    fn write(&self, queue: &str, message: Message) -> Result<(), SettleError> {
        if self.refused.lock().contains(queue) {
            self.refusals.fetch_add(1, Ordering::SeqCst);
            return Err(SettleError::Failed(format!("queue {queue:?} refuses writes")));
        }
        self.push(queue, message);
        Ok(())
    }
}

#[async_trait]
impl Transport for Arc<MemoryBroker> {
    async fn consume(
        &self,
        spec: ConsumeSpec,
        inbox: Arc<dyn Inbox>,
        status: Arc<SourceStatus>,
        stop: CancellationToken,
    ) -> Result<(), ConsumeError> {
        let sabotage = self.sabotage.lock().pop_front();
        match sabotage {
            Some(Sabotage::Fail(e)) => return Err(ConsumeError::Failed(e)),
            Some(Sabotage::Fatal(e)) => return Err(ConsumeError::Fatal(e)),
            Some(Sabotage::Stall) => {
                status.set_connected(true);
                stop.cancelled().await;
                status.set_connected(false);
                return Ok(());
            }
            None => {}
        }
        let source = spec.source("memory", SourceConfig::amqp).map_err(ConsumeError::Fatal)?;
        let queue = self.queue(&source.queue);
        let dead_letter_queue = source.dead_letter().routing_key;
        let window = Arc::new(Semaphore::new(usize::from(spec.config.prefetch.max(1))));
        status.set_connected(true);
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                p = window.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let message = loop {
                // Register interest before checking, so a push between the check and
                // the wait is not missed.
                let ready = queue.ready.notified();
                if let Some(m) = queue.items.lock().pop_front() {
                    break Some(m);
                }
                tokio::select! {
                    _ = stop.cancelled() => break None,
                    _ = ready => {}
                }
            };
            let Some(message) = message else { break };
            let handle = MemoryHandle {
                broker: self.clone(),
                queue: source.queue.clone(),
                subscription: spec.subscription.clone(),
                dead_letter_queue: dead_letter_queue.clone(),
                message: message.clone(),
                _permit: permit,
            };
            if inbox.put(Delivery::new(message, Box::new(handle))).await.is_err() {
                break;
            }
        }
        status.set_connected(false);
        // Wait for every handed-out delivery to be settled or dropped.
        let _ = window.acquire_many(u32::from(spec.config.prefetch.max(1))).await;
        Ok(())
    }

    async fn publish(&self, _exchange: &str, routing_key: &str, message: &Message) -> Result<(), TransportError> {
        self.push(routing_key, message.clone());
        Ok(())
    }

    async fn backlog(&self, spec: &ConsumeSpec) -> Result<Option<u64>, TransportError> {
        let source = spec.source("memory", SourceConfig::amqp).map_err(TransportError::Unsupported)?;
        Ok(Some(self.len(&source.queue) as u64))
    }

    /// The queue's length and its dead-letter queue's (retries are put back at once).
    async fn depths(&self, spec: &ConsumeSpec) -> Result<Depths, TransportError> {
        let source = spec.source("memory", SourceConfig::amqp).map_err(TransportError::Unsupported)?;
        Ok(Depths {
            backlog: Some(self.len(&source.queue) as u64),
            retries_waiting: None,
            dead_letters: Some(self.len(&source.dead_letter().routing_key) as u64),
        })
    }
}

struct MemoryHandle {
    broker: Arc<MemoryBroker>,
    queue: String,
    subscription: String,
    dead_letter_queue: String,
    message: Message,
    _permit: OwnedSemaphorePermit,
}

#[async_trait]
impl Settle for MemoryHandle {
    async fn settle(&mut self, settlement: &Settlement) -> Result<(), SettleError> {
        let mut message = self.message.clone();
        match settlement {
            Settlement::Ack => {}
            Settlement::Release => requeue_front(&self.broker, &self.queue, message),
            Settlement::Retry { after, next_attempt, failure } => {
                message.headers.insert(header::ATTEMPT.into(), next_attempt.to_string());
                for (k, v) in failure.headers(&self.subscription) {
                    message.headers.insert(k.into(), v);
                }
                // Refused like a broker refuses a publish; accepted ones wait their delay.
                if self.broker.refused.lock().contains(&self.queue) {
                    return self.broker.write(&self.queue, message);
                }
                let (broker, queue, after) = (self.broker.clone(), self.queue.clone(), *after);
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    broker.push(&queue, message);
                });
            }
            Settlement::DeadLetter(failure) => {
                for (k, v) in failure.headers(&self.subscription) {
                    message.headers.insert(k.into(), v);
                }
                message.headers.insert(header::ORIGINAL_QUEUE.into(), self.queue.clone());
                self.broker.write(&self.dead_letter_queue, message)?;
            }
        }
        Ok(())
    }

    fn abandon(self: Box<Self>) {
        requeue_front(&self.broker, &self.queue, self.message.clone());
    }
}

fn requeue_front(broker: &MemoryBroker, queue: &str, message: Message) {
    let q = broker.queue(queue);
    q.items.lock().push_front(message);
    q.ready.notify_one();
}
