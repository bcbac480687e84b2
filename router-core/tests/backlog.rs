#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed expectation is the report
//! What each broker reports as waiting for a subscription (`Transport::backlog`), the
//! stall watchdog's evidence, against the real brokers (scripts/setup starts them):
//! ready messages of an AMQP queue, entries a Redis group has not been given (also
//! when Redis cannot count them), and Kafka records after the group's committed
//! offset in partitions the consumer holds but does not take from.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use router_core::config::parse;
use router_core::message::Settlement;
use router_core::transport::{self, ConsumeSpec, Inbox, SourceStatus, Transport};
use router_core::{Delivery, Message};
use tokio_util::sync::CancellationToken;

fn unique(prefix: &str) -> String {
    format!("backlog-{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// The transport and subscription `s` of a one-subscription config.
fn setup(transport: &str, subscription: &str) -> (Arc<dyn Transport>, ConsumeSpec) {
    let yaml = format!(
        "transports: {{ t: {transport} }}\nhandlers: {{ h: {{}} }}\nsubscriptions: {{ s: {subscription} }}\nroutes: [ {{ name: r, handler: h }} ]\n"
    );
    let cfg = parse(&yaml, "test.yaml", &|_| None).expect("valid config");
    let spec = ConsumeSpec { subscription: "s".into(), config: cfg.subscriptions["s"].clone(), lag: None };
    (transport::build("t", &cfg.transports["t"]), spec)
}

fn message(id: &str) -> Message {
    Message { id: id.into(), body: bytes::Bytes::from_static(b"{}"), ..Message::default() }
}

#[tokio::test]
async fn amqp_counts_the_ready_messages_of_the_queue() {
    let queue = unique("amqp");
    let (t, spec) = setup(
        "{ type: amqp, url: \"amqp://guest:guest@127.0.0.1:5672/%2f\", topology: { queues: [{ name: QUEUE, arguments: { x-expires: 60000 } }] } }".replace("QUEUE", &queue).as_str(),
        &format!("{{ transport: t, queue: {queue} }}"),
    );
    // Not connected yet: the watchdog cannot tell (and must not connect by itself).
    assert_eq!(t.backlog(&spec).await.expect("backlog"), None);
    for i in 0..7 {
        t.publish("", &queue, &message(&format!("m{i}"))).await.expect("publish");
    }
    assert_eq!(t.backlog(&spec).await.expect("backlog"), Some(7));
    t.close().await;
}

#[tokio::test]
async fn redis_counts_what_the_group_was_not_given_even_when_redis_cannot() {
    let (stream, group) = (unique("redis"), unique("group"));
    let (t, spec) = setup(
        "{ type: redis, url: \"redis://127.0.0.1:6379\" }",
        &format!("{{ transport: t, streams: [{stream}], group: {group} }}"),
    );
    let client = redis::Client::open("redis://127.0.0.1:6379").expect("url");
    let mut c = client.get_multiplexed_async_connection().await.expect("Redis (scripts/setup starts it)");
    assert_eq!(t.backlog(&spec).await.expect("backlog"), Some(0), "no stream yet: nothing waits");
    let mut ids = Vec::new();
    for i in 0..5 {
        let id: String =
            redis::cmd("XADD").arg(&stream).arg("*").arg("body").arg(i).query_async(&mut c).await.expect("XADD");
        ids.push(id);
    }
    let _: () =
        redis::cmd("XGROUP").arg("CREATE").arg(&stream).arg(&group).arg("0").query_async(&mut c).await.expect("group");
    assert_eq!(t.backlog(&spec).await.expect("backlog"), Some(5), "the group's lag");
    // A deletion inside the stream leaves Redis unable to count the lag: something
    // still waits, and the probe says so.
    let _: i64 = redis::cmd("XDEL").arg(&stream).arg(&ids[2]).query_async(&mut c).await.expect("XDEL");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&group)
        .arg("c")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut c)
        .await
        .expect("read one");
    assert!(t.backlog(&spec).await.expect("backlog").is_some_and(|n| n >= 1));
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut c).await.expect("DEL");
}

/// Takes every delivery and gives it back unsettled: the consumer holds its
/// partitions but nothing it read is ever committed, as a consumer that lost track.
struct GiveBack;

#[async_trait]
impl Inbox for GiveBack {
    async fn put(&self, mut d: Delivery) -> Result<(), Delivery> {
        let _ = d.settle(&Settlement::Release).await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_counts_records_after_the_committed_offset_of_idle_partitions() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let (topic, group) = (unique("kafka"), unique("group"));
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().expect("admin");
    admin
        .create_topics(&[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .expect("topic");
    let (t, spec) = setup(
        "{ type: kafka, brokers: [\"127.0.0.1:9092\"], properties: { batch.num.messages: 1 } }",
        &format!("{{ transport: t, topics: [{topic}], group: {group}, prefetch: 64 }}"),
    );
    for i in 0..10 {
        t.publish("", &topic, &message(&format!("m{i}"))).await.expect("produce");
    }
    let stop = CancellationToken::new();
    let status = Arc::new(SourceStatus::new(None));
    let consumer = tokio::spawn({
        let (t, spec, stop, status) = (t.clone(), spec.clone(), stop.clone(), status.clone());
        async move { t.consume(spec, Arc::new(GiveBack), status, stop).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen = None;
    while tokio::time::Instant::now() < deadline {
        seen = t.backlog(&spec).await.expect("backlog");
        if seen == Some(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(seen, Some(10), "all ten read and given back, none committed: they wait");
    stop.cancel();
    consumer.await.expect("consumer task").expect("consumed");
    let _ =
        admin.delete_topics(&[&topic, &format!("{group}.retry"), &format!("{topic}.dlq")], &AdminOptions::new()).await;
}
