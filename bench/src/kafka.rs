//! Kafka clients as the benches set them up, shared by `kafka-http` and `kafka-core`.

use anyhow::{Context, Result};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::ClientConfig;

/// A client config for `brokers`.
pub fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

/// A consumer of `group` as the router's is set up: offsets stored by the application
/// and auto-committed every 200 ms, from the earliest offset when the group has none.
pub fn consumer(brokers: &str, fetch_wait_ms: u32, group: &str, topic: &str) -> Result<StreamConsumer> {
    let consumer: StreamConsumer = client(brokers)
        .set("group.id", group)
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "200")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("creating a kafka consumer")?;
    consumer.subscribe(&[topic]).with_context(|| format!("subscribing to {topic}"))?;
    Ok(consumer)
}

/// A producer config for backlogs: acks=all and one record per batch. tansu 0.6 (the
/// broker of scripts/setup) serves a fetch only from the start of a record batch, so a
/// consumer that pauses a partition and resumes inside a batch (the router does, to
/// bound what it reads past its commit point) would get nothing from it again.
pub fn backlog_producer(brokers: &str) -> ClientConfig {
    let mut c = client(brokers);
    c.set("acks", "all").set("batch.num.messages", "1");
    c
}
