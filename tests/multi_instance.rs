//! N routers tested together: three `message-router run` processes at once on the same
//! RabbitMQ queue, Redis stream + group and Kafka topic + group, each delivering to a
//! PHP handler of its own (`php -S`, so its log says which instance handled what). One
//! is SIGKILLed mid-stream and a fourth added; afterwards every message is handled,
//! each surviving instance took a share on each broker, duplicates stay within what the
//! killed instance had in flight, and nothing is left unacked, pending or uncommitted.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use e2e::*;

const WAIT: Duration = Duration::from_secs(120);
/// Messages published to each broker.
const N: usize = 300;
/// Every subscription's prefetch: the in-flight window a SIGKILL can cost.
const PREFETCH: usize = 8;
const PARTITIONS: i32 = 6;

/// One instance's config: the three subscriptions on the shared sources, its own admin
/// port (`{admin}`), its own Redis consumer name and its own PHP handler.
fn instance_config(queue: &str, stream: &str, group: &str, topic: &str, consumer: &str, php: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{{admin}}" }}
shutdown: {{ grace_period: 10s }}
transports:
  rabbit: {{ type: amqp, url: "{amqp}", reconnect_max_delay: 1s }}
  redis: {{ type: redis, url: "{redis}", consumer: "{consumer}", reconnect_max_delay: 1s }}
  kafka:
    type: kafka
    brokers: ["{kafka}"]
    properties: {{ session.timeout.ms: "6000", max.poll.interval.ms: "10000", heartbeat.interval.ms: "500", batch.num.messages: "1" }}
handlers:
  php: {{ endpoints: ["{php}"], timeout: 2s }}
subscriptions:
  orders: {{ transport: rabbit, queue: {queue}, prefetch: {PREFETCH} }}
  events: {{ transport: redis, streams: ["{stream}"], group: {group}, prefetch: {PREFETCH}, claim_idle: 3s }}
  # tansu's coordinator sometimes leaves a member out of a rebalance (README "Known
  # limits"): the watchdog starts a consumer again that waits 5 s with records behind it.
  clicks: {{ transport: kafka, topics: ["{topic}"], group: {group}, prefetch: {PREFETCH}, stall_timeout: 5s }}
routes:
  - {{ name: work, handler: php }}
"#,
        amqp = amqp_url(),
        redis = redis_url(),
        kafka = kafka_brokers(),
    )
}

/// Ids `prefix-i` handled (200) per instance log, in instance order.
fn handled(logs: &[&Path], prefix: &str) -> Vec<Vec<String>> {
    logs.iter()
        .map(|log| {
            seen(log).into_iter().filter(|s| s.status == 200 && s.id.starts_with(prefix)).map(|s| s.id).collect()
        })
        .collect()
}

// Ignored until the Kafka part can pass: on tansu 0.6 (the test broker) the rebalance
// that follows the killed member's session expiry is joined by one surviving member
// only; the others keep their old assignment, and the killed member's partitions are
// left with no owner (3 runs of 3). The RabbitMQ and Redis parts pass (8 duplicates
// each, bound 8). Run with `--ignored`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tansu 0.6 leaves the killed member's partitions unowned after its session expires"]
async fn three_instances_share_the_work_survive_a_kill_and_take_a_fourth() {
    let dir = Scratch::new("multi");
    let mut rabbit = Rabbit::connect().await;
    let mut redis = Redis::connect().await;
    let kafka = Kafka::connect();
    let (queue, stream, topic, group) = (unique("mi-q"), unique("mi-s"), unique("mi-t"), unique("mi-g"));
    rabbit.queue(&queue).await;
    kafka.create_topic(&topic, PARTITIONS).await;

    // Four PHP pools of 2 workers each (the machine has 2 cores): instances 0-2 at the
    // start, 3 added after the kill.
    let logs: Vec<_> = (0..4).map(|i| dir.path(&format!("php-{i}.log"))).collect();
    let mut php = Vec::new();
    for log in &logs {
        php.push(PhpHandler::start(log, 2).await);
    }
    let yaml = |i: usize| instance_config(&queue, &stream, &group, &topic, &format!("instance-{i}"), &php[i].url());
    let mut routers = Vec::new();
    for i in 0..3 {
        routers.push(Router::start(&dir, &yaml(i)).await);
    }

    // Handler times of 50-110 ms, so each instance always has work in flight.
    let mix = |i: usize| vec![("behave", format!("slow:{}", 50 + (i % 4) * 20))];
    let (q, s, k) = (batch("amqp", N, mix), batch("redis", N, mix), batch("kafka", N, mix));
    // The stream in two halves: the second published after instance 3 joined, just
    // before the kill, so every instance has work when it happens.
    let (h, rest) = (N / 2, N - N / 2);
    rabbit.publish(&queue, &q[..h]).await;
    redis.publish(&stream, &s[..h]).await;
    let key = |i: usize| Some(format!("key-{}", i % 24));
    kafka.publish(&topic, &k[..h], key).await;

    // Mid-stream (a quarter handled on every broker): start instance 3 and, once the
    // Kafka group has rebalanced onto it, publish the second half and SIGKILL instance 2.
    let log_refs: Vec<&Path> = logs.iter().map(|p| p.as_path()).collect();
    let distinct =
        |prefix: &str| -> usize { handled(&log_refs, prefix).into_iter().flatten().collect::<HashSet<_>>().len() };
    wait_for("a quarter handled on each broker", WAIT, || async {
        ["amqp", "redis", "kafka"].iter().all(|p| distinct(p) >= N / 4)
    })
    .await;
    routers.push(Router::start(&dir, &yaml(3)).await);
    let joined = &routers[3];
    wait_for("instance 3 gets Kafka partitions", WAIT, || async { joined.logs().contains("partitions assigned") })
        .await;
    rabbit.publish(&queue, &q[h..]).await;
    redis.publish(&stream, &s[h..]).await;
    kafka.publish(&topic, &k[h..], |i| key(i + rest)).await;
    let at_kill: Vec<usize> = ["amqp", "redis", "kafka"].iter().map(|p| distinct(p)).collect();
    routers[2].proc.kill();

    // Bounds on duplicates: on RabbitMQ and Redis only what the killed instance held
    // unacked (its prefetch) comes again; on Kafka, per partition it owned, at most
    // 4 × prefetch read past the commit point plus what settled in the last 200 ms
    // auto-commit interval (a graceful revoke in a rebalance commits what is settled).
    let kafka_bound = PARTITIONS as usize * (4 * PREFETCH) + 20;
    for (prefix, all, bound) in [(&"amqp", &q, PREFETCH), (&"redis", &s, PREFETCH), (&"kafka", &k, kafka_bound)] {
        wait_for(&format!("every {prefix} message handled"), WAIT, || async { distinct(prefix) >= N }).await;
        match *prefix {
            "amqp" => wait_for("the queue empty", WAIT, || async { rabbit.count(&queue).await == 0 }).await,
            "redis" => redis.wait_acked(&stream, &group, WAIT).await,
            _ => {
                wait_for("kafka committed to the end", WAIT, || async {
                    (0..PARTITIONS).map(|p| kafka.committed(&group, &topic, p).max(0)).sum::<i64>() >= N as i64
                })
                .await
            }
        }
        let per = handled(&log_refs, prefix);
        let ids: HashSet<String> = per.iter().flatten().cloned().collect();
        let expected: HashSet<String> = all.iter().map(|m| m.0.clone()).collect();
        assert_eq!(ids, expected, "{prefix}: every message handled, none lost");
        let total: usize = per.iter().map(Vec::len).sum();
        let duplicates = total - N;
        let shares: Vec<usize> = per.iter().map(Vec::len).collect();
        println!(
            "{prefix}: {N} published, {} handled, 0 lost, {duplicates} duplicates (bound {bound}); \
             shares by instance 0/1/2(killed)/3(added): {shares:?}",
            ids.len()
        );
        for i in [0, 1, 3] {
            assert!(shares[i] > 0, "{prefix}: instance {i} took a share: {shares:?}");
        }
        assert!(duplicates <= bound, "{prefix}: {duplicates} duplicates, more than the killed instance held ({bound})");
    }
    println!("distinct handled at the kill (amqp/redis/kafka): {at_kill:?}");
    for i in [0, 1, 3] {
        assert_eq!(routers[i].terminate(Duration::from_secs(15)), Some(0), "instance {i} stops cleanly");
    }
    // Stopped: what any instance still held unacked would be back in the queue now.
    assert_eq!(rabbit.count(&queue).await, 0, "nothing left in the queue");
    assert_eq!(redis.pending(&stream, &group).await, 0, "nothing pending in the group");
    let committed: i64 = (0..PARTITIONS).map(|p| kafka.committed(&group, &topic, p)).sum();
    assert_eq!(committed, N as i64, "every partition committed to its end");
    redis.cleanup(&[&stream], &group).await;
    rabbit.cleanup().await;
    let (retry, dlq) = (format!("{group}.retry"), format!("{topic}.dlq"));
    kafka.delete_topics(&[&topic, &retry, &dlq]).await;
}
