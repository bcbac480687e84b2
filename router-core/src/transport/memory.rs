//! In-process queues, for tests and embedders. Same contract as a real broker
//! (prefetch bound, settle once, release on drop, retries after their delay,
//! dead-letters with headers) but nothing is durable: the process is the broker.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{ConsumeSpec, Inbox, SourceStatus, Transport, TransportError};
use crate::message::{header, Delivery, Message, Settle, SettleError, Settlement};

/// A named set of in-memory queues. The same name gives the same broker within a
/// process, so a test can publish into the broker the router consumes.
#[derive(Default)]
pub struct MemoryBroker {
    queues: Mutex<HashMap<String, Arc<Queue>>>,
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
}

#[async_trait]
impl Transport for Arc<MemoryBroker> {
    async fn consume(
        &self,
        spec: ConsumeSpec,
        inbox: Arc<dyn Inbox>,
        status: Arc<SourceStatus>,
        stop: CancellationToken,
    ) {
        let queue = self.queue(&spec.config.queue);
        let dead_letter_queue =
            spec.config.dead_letter().routing_key.unwrap_or_else(|| format!("{}.dlq", spec.config.queue));
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
                queue: spec.config.queue.clone(),
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
    }

    async fn publish(&self, _exchange: &str, routing_key: &str, message: &Message) -> Result<(), TransportError> {
        self.push(routing_key, message.clone());
        Ok(())
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
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), SettleError> {
        let MemoryHandle { broker, queue, subscription, dead_letter_queue, mut message, _permit } = *self;
        match settlement {
            Settlement::Ack => {}
            Settlement::Release => requeue_front(&broker, &queue, message),
            Settlement::Retry { after, next_attempt, failure } => {
                message.headers.insert(header::ATTEMPT.into(), next_attempt.to_string());
                for (k, v) in failure.headers(&subscription) {
                    message.headers.insert(k.into(), v);
                }
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    broker.push(&queue, message);
                });
            }
            Settlement::DeadLetter(failure) => {
                for (k, v) in failure.headers(&subscription) {
                    message.headers.insert(k.into(), v);
                }
                message.headers.insert(header::ORIGINAL_QUEUE.into(), queue);
                broker.push(&dead_letter_queue, message);
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
