//! Kafka → message-router → PHP over HTTP, against a real Kafka-protocol broker
//! (tansu, started by scripts/setup), the real daemon binary and real PHP handlers:
//! acks and commits, order per key, commits held behind an unsettled message, retry
//! and dead-letter topics, SIGKILL mid-stream, two instances sharing a group.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use e2e::*;

const WAIT: Duration = Duration::from_secs(60);

struct Setup {
    dir: Scratch,
    kafka: Kafka,
    topic: String,
    group: String,
    php: PhpHandler,
}

async fn setup(name: &str, partitions: i32) -> Setup {
    let dir = Scratch::new(name);
    let kafka = Kafka::connect();
    let topic = unique(name);
    kafka.create_topic(&topic, partitions).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 8).await;
    Setup { dir, kafka, topic, group: unique("group"), php }
}

impl Setup {
    async fn cleanup(self) {
        let retry = format!("{}.retry", self.group);
        let dlq = format!("{}.dlq", self.topic);
        self.kafka.delete_topics(&[&self.topic, &retry, &dlq]).await;
    }

    /// Wait until the group's committed offsets of partitions `0..partitions` add up to `n`.
    async fn wait_committed(&self, partitions: i32, n: i64) {
        wait_for(&format!("{n} committed"), WAIT, || async {
            (0..partitions).map(|p| self.kafka.committed(&self.group, &self.topic, p).max(0)).sum::<i64>() >= n
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn acks_commit_and_keep_order_per_key() {
    let s = setup("kack", 3).await;
    let yaml = kafka_config(&[&s.topic], &s.group, &[s.php.url()], "ordering: key");
    let mut router = Router::start(&s.dir, &yaml).await;
    // 4 keys × 25 messages; handlers sleep 0–15 ms at random, 8 PHP workers: messages
    // of different keys overtake each other, messages of one key must not.
    let msgs = batch("k", 100, |_| vec![("behave", format!("slow:{}", fastrand::u32(0..15)))]);
    s.kafka.publish(&s.topic, &msgs, |i| Some(format!("key-{}", i % 4))).await;

    wait_for("100 handled", WAIT, || async { seen(&s.php.log).len() >= 100 }).await;
    s.wait_committed(3, 100).await;
    // librdkafka's statistics (every 5 s) feed the lag gauge: 3 partitions, all caught up.
    let lag_series = format!("router_consumer_lag{{partition=\"0\",subscription=\"main\",topic=\"{}\"}} 0", s.topic);
    wait_for("lag reported as 0", Duration::from_secs(20), || async { router.metrics().await.contains(&lag_series) })
        .await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0), "clean exit on SIGTERM");

    let log = seen(&s.php.log);
    let got = by_id(&log);
    assert_eq!(got.len(), 100, "every message once");
    assert!(got.values().all(|v| v.len() == 1 && v[0].status == 200));
    let mut per_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for x in &log {
        let i = index_of(&x.id);
        per_key.entry(x.headers["x-message-header-kafka-key"].clone()).or_default().push(i);
    }
    assert_eq!(per_key.len(), 4);
    for (key, order) in &per_key {
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, &sorted, "key {key} handled in publish order");
    }
    let h = &got["k-1"][0].headers;
    assert_eq!(h["ce-id"], "k-1");
    assert_eq!(h["x-router-key"], s.topic, "the topic is the routing key");
    assert!(h["ce-source"].ends_with(&format!("/{}", s.topic)), "{}", h["ce-source"]);
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsettled_message_holds_the_commit_point() {
    let s = setup("khold", 1).await;
    // Retries wait in place for 3 s: meanwhile the 19 messages behind it are handled
    // (unordered), but the committed offset must stay at the failing one.
    let extra = "ordering: unordered\n    in_place_retry_max: 10s";
    let yaml = kafka_config(&[&s.topic], &s.group, &[s.php.url()], extra)
        .replace("initial_delay: 200ms", "initial_delay: 3s")
        .replace("max_delay: 2s", "max_delay: 5s");
    let mut router = Router::start(&s.dir, &yaml).await;
    let msgs = batch("h", 20, |i| if i == 0 { vec![("behave", "fail-until:2".to_string())] } else { vec![] });
    s.kafka.publish(&s.topic, &msgs, |_| None).await;

    wait_for("19 handled", WAIT, || async { seen(&s.php.log).iter().filter(|x| x.status == 200).count() >= 19 }).await;
    // Give auto-commit (every second) time to commit anything it wrongly would.
    let first_done = seen(&s.php.log).iter().filter(|x| x.id == "h-0" && x.status == 200).count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if first_done == 0 {
        let held = s.kafka.committed(&s.group, &s.topic, 0);
        assert!(held <= 0, "committed offset {held} passed the unsettled message at offset 0");
    }
    wait_for("h-0 handled on its retry", WAIT, || async {
        seen(&s.php.log).iter().any(|x| x.id == "h-0" && x.status == 200)
    })
    .await;
    s.wait_committed(1, 20).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    let h0: Vec<_> = seen(&s.php.log).into_iter().filter(|x| x.id == "h-0").collect();
    assert_eq!(h0.iter().map(|x| (x.attempt, x.status)).collect::<Vec<_>>(), [(1, 500), (2, 200)]);
    assert!(h0[1].time - h0[0].time >= 2.9, "retried in place after the 3 s backoff");
    assert_eq!(first_done, 0, "the retry was still pending while the others finished");
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_and_dead_letter_topics_carry_the_headers() {
    let s = setup("kretry", 1).await;
    // Every retry goes through the retry topic.
    let yaml = kafka_config(&[&s.topic], &s.group, &[s.php.url()], "in_place_retry_max: 0s\n    ordering: unordered");
    let mut router = Router::start(&s.dir, &yaml).await;
    let binary: Vec<u8> = vec![0, 159, 146, 150, 255];
    let msgs: Vec<Outgoing> = vec![
        ("flaky".into(), b"{}".to_vec(), vec![("behave", "fail-until:2".into())]),
        ("broken".into(), binary.clone(), vec![("behave", "fail".into()), ("tenant", "acme".into())]),
        ("poison".into(), b"{}".to_vec(), vec![("behave", "reject".into())]),
        ("fine".into(), b"{}".to_vec(), vec![]),
    ];
    s.kafka.publish(&s.topic, &msgs, |i| Some(format!("key-{i}"))).await;

    let dlq = format!("{}.dlq", s.topic);
    let dead = s.kafka.read(&dlq, 2, WAIT).await;
    wait_for("flaky handled", WAIT, || async { seen(&s.php.log).iter().any(|x| x.id == "flaky" && x.status == 200) })
        .await;
    s.wait_committed(1, 4).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));

    let got = by_id(&seen(&s.php.log));
    assert_eq!(got["flaky"].iter().map(|x| (x.attempt, x.status)).collect::<Vec<_>>(), [(1, 500), (2, 200)]);
    assert!(got["flaky"][1].time - got["flaky"][0].time >= 0.19, "the retry waited for its backoff");
    assert_eq!(got["broken"].len(), 3);
    assert_eq!(got["poison"].len(), 1);
    assert_eq!(got["fine"].len(), 1);

    let by = |id: &str| dead.iter().find(|r| r.header("message_id") == id).cloned().expect("in the dead-letter topic");
    let broken = by("broken");
    assert_eq!(broken.payload, binary, "payload kept byte for byte");
    assert_eq!(broken.key.as_deref(), Some(&b"key-1"[..]), "record key kept");
    assert_eq!(broken.header("tenant"), "acme");
    assert_eq!(broken.header("x-router-reason"), "max attempts exhausted (3 of 3)");
    assert_eq!(broken.header("x-router-attempts"), "3");
    assert!(broken.header("x-router-last-error").contains("HTTP 500"));
    assert_eq!(broken.header("x-router-original-topic"), s.topic);
    assert_eq!(broken.header("x-router-original-partition"), "0");
    assert_eq!(broken.header("x-router-original-offset"), "1");
    assert!(!broken.header("x-router-first-failure").is_empty());
    assert!(by("poison").header("x-router-reason").starts_with("rejected by handler: HTTP 422"));

    let retries = s.kafka.read(&format!("{}.retry", s.group), 3, WAIT).await;
    let flaky = retries.iter().find(|r| r.header("message_id") == "flaky").expect("flaky went through the retry topic");
    assert_eq!(flaky.header("x-router-attempt"), "2");
    assert!(flaky.header("x-router-due").parse::<u64>().is_ok(), "due time in ms");
    assert_eq!(flaky.header("x-router-original-topic"), s.topic);
    assert_eq!(flaky.header("x-router-original-offset"), "0");
    assert_eq!(flaky.key.as_deref(), Some(&b"key-0"[..]));
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_stream_then_restart_loses_nothing() {
    let s = setup("kkill", 3).await;
    // A small prefetch, so the bound on duplicates below is tight enough to bite.
    let yaml = kafka_config(&[&s.topic], &s.group, &[s.php.url()], "ordering: key")
        .replace("max_attempts: 3", "max_attempts: 5")
        .replace("prefetch: 32", "prefetch: 8");
    let n = 1500;
    let msgs = batch("x", n, crash_mix);
    let ids: Vec<String> = msgs.iter().map(|m| m.0.clone()).collect();
    s.kafka.publish(&s.topic, &msgs, |i| Some(format!("key-{}", i % 16))).await;
    let ok = |log: &std::path::Path| -> HashSet<String> {
        seen(log).into_iter().filter(|x| x.status == 200).map(|x| x.id).collect()
    };
    let mut router = Router::start(&s.dir, &yaml).await;
    for round in 1..=3 {
        let target = round * 300;
        wait_for(&format!("{target} handled"), WAIT, || async { ok(&s.php.log).len() >= target }).await;
        router.proc.kill();
        router = Router::restart(&s.dir, &router).await;
    }
    let dlq = format!("{}.dlq", s.topic);
    let poison: HashSet<String> = ids.iter().filter(|id| is_poison(id)).cloned().collect();
    wait_for("every good message handled", Duration::from_secs(120), || async {
        let done = ok(&s.php.log);
        ids.iter().filter(|id| !poison.contains(*id)).all(|id| done.contains(id))
    })
    .await;
    // The dead-letter topic may hold duplicates (a kill after the produce, before the
    // commit): compare ids, not counts.
    let mut dead = HashSet::new();
    let deadline = std::time::Instant::now() + WAIT;
    while !poison.is_subset(&dead) && std::time::Instant::now() < deadline {
        let records = s.kafka.read(&dlq, poison.len() * 2, Duration::from_secs(3)).await;
        dead = records.into_iter().map(|r| r.header("message_id")).collect();
    }
    s.wait_committed(3, n as i64).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    assert!(poison.is_subset(&dead), "every poison message dead-lettered");
    let handled: usize = seen(&s.php.log).iter().filter(|x| x.status == 200).count();
    let duplicates = handled - ok(&s.php.log).len();
    // What a kill can deliver again: per partition (3 source, 1 retry) at most
    // 4 × prefetch read past the commit point, plus what settled within the last
    // auto-commit interval (200 ms; at this handler's pace well under 100).
    let bound = 3 * (4 * 4 * 8 + 100);
    println!(
        "kafka SIGKILL x3: {n} published, {} handled, {} dead-lettered, 0 lost, {duplicates} duplicates (bound {bound})",
        ok(&s.php.log).len(),
        dead.len()
    );
    assert!(duplicates <= bound, "{duplicates} duplicates: more than 3 kills can explain ({bound})");
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_split_partitions_and_a_rebalance_loses_nothing() {
    let s = setup("ksplit", 4).await;
    let other = PhpHandler::start(&s.dir.path("other.log"), 8).await;
    let a = kafka_config(&[&s.topic], &s.group, &[s.php.url()], "ordering: key");
    let b = kafka_config(&[&s.topic], &s.group, &[other.url()], "ordering: key");
    let n = 2000;
    let msgs = batch("r", n, |_| vec![("behave", "slow:10".to_string())]);
    let ids: HashSet<String> = msgs.iter().map(|m| m.0.clone()).collect();
    s.kafka.publish(&s.topic, &msgs, |i| Some(format!("key-{}", i % 32))).await;
    let mut ra = Router::start(&s.dir, &a).await;
    wait_for("200 handled by the first", WAIT, || async { seen(&s.php.log).len() >= 200 }).await;
    // The second instance joins mid-stream: partitions move under load.
    let mut rb = Router::start(&s.dir, &b).await;
    wait_for("the second instance gets partitions", WAIT, || async { !seen(&other.log).is_empty() }).await;
    let all = || -> HashSet<String> { seen(&s.php.log).into_iter().chain(seen(&other.log)).map(|x| x.id).collect() };
    wait_for("every message handled", Duration::from_secs(120), || async { all().len() >= n }).await;
    s.wait_committed(4, n as i64).await;
    assert_eq!(ra.terminate(Duration::from_secs(15)), Some(0));
    assert_eq!(rb.terminate(Duration::from_secs(15)), Some(0));
    assert_eq!(all(), ids, "nothing lost across the rebalance");
    let (na, nb) = (seen(&s.php.log).len(), seen(&other.log).len());
    assert!(nb > 0, "the second instance got partitions: {na} / {nb}");
    println!("kafka rebalance: {n} messages, first instance {na}, second {nb}, duplicates {}", na + nb - n);
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_waiting_for_their_time_do_not_hold_up_the_topic() {
    let s = setup("kwait", 1).await;
    // A read-ahead of 4, and 10 messages whose retries wait 5 s in the retry topic:
    // the 40 messages behind them must not wait for those retries.
    let extra = "ordering: unordered\n    in_place_retry_max: 0s";
    let yaml = kafka_config(&[&s.topic], &s.group, &[s.php.url()], extra)
        .replace("prefetch: 32", "prefetch: 4")
        .replace("initial_delay: 200ms", "initial_delay: 5s")
        .replace("max_delay: 2s", "max_delay: 10s")
        // Ten failures in a row would open the handler's circuit and hold the rest
        // back for its open period: not what this test is about.
        .replace("timeout: 5s", "timeout: 5s, circuit_breaker: { enabled: false }");
    let mut router = Router::start(&s.dir, &yaml).await;
    s.kafka.publish(&s.topic, &batch("late", 10, |_| vec![("behave", "fail-until:2".to_string())]), |_| None).await;
    wait_for("10 first attempts failed, retries waiting in the retry topic", WAIT, || async {
        let failed = seen(&s.php.log).iter().filter(|x| x.id.starts_with("late-") && x.status == 500).count();
        failed >= 10 && router.logs().contains("retry waiting until due")
    })
    .await;
    s.kafka.publish(&s.topic, &batch("free", 40, |_| vec![]), |_| None).await;
    wait_for("the retried messages handled", WAIT, || async {
        seen(&s.php.log).iter().filter(|x| x.id.starts_with("late-") && x.status == 200).count() >= 10
    })
    .await;
    s.wait_committed(1, 50).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    let log = seen(&s.php.log);
    let last_free = log.iter().filter(|x| x.id.starts_with("free-")).map(|x| x.time).fold(0.0, f64::max);
    let first_retry = log.iter().filter(|x| x.attempt == 2).map(|x| x.time).fold(f64::MAX, f64::min);
    assert_eq!(log.iter().filter(|x| x.id.starts_with("free-")).count(), 40);
    assert!(last_free < first_retry, "the 40 were handled while the retries waited ({last_free} vs {first_retry})");
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_restarted_mid_stream_the_router_recovers() {
    // A broker of the test's own, on disk, so killing it disturbs no other test and
    // what it acknowledged survives.
    let dir = Scratch::new("kbroker");
    let mut tansu = Tansu::start(&dir).await;
    let kafka = Kafka::connect_to(&tansu.brokers());
    let topic = unique("kbroker");
    kafka.create_topic(&topic, 3).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 8).await;
    let group = unique("group");
    let yaml = kafka_config(&[&topic], &group, &[php.url()], "ordering: key")
        .replace(&kafka_brokers(), &tansu.brokers())
        .replace("max_attempts: 3", "max_attempts: 5");
    let n = 600;
    let msgs = batch("b", n, |_| vec![("behave", "slow:20".to_string())]);
    let ids: HashSet<String> = msgs.iter().map(|m| m.0.clone()).collect();
    kafka.publish(&topic, &msgs, |i| Some(format!("key-{}", i % 16))).await;
    let ok = || -> HashSet<String> { seen(&php.log).into_iter().filter(|x| x.status == 200).map(|x| x.id).collect() };

    let mut router = Router::start(&dir, &yaml).await;
    wait_for("150 handled", WAIT, || async { ok().len() >= 150 }).await;
    tansu.kill();
    // The router notices and says so (readiness follows), without exiting.
    wait_for("the outage reported", WAIT, || async { router.logs().contains("every kafka broker is unreachable") })
        .await;
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", router.admin)).await.expect("admin answers");
    assert_eq!(ready.status().as_u16(), 503, "not ready while no broker is reachable");
    assert!(router.proc.child.try_wait().expect("router status").is_none(), "the router keeps running");
    tansu.restart().await;
    wait_for("every message handled after the restart", Duration::from_secs(120), || async { ok() == ids }).await;
    wait_for("the group committed all", WAIT, || async {
        (0..3).map(|p| kafka.committed(&group, &topic, p).max(0)).sum::<i64>() >= n as i64
    })
    .await;
    assert!(router.wait_ready().await, "ready again");
    assert!(router.logs().contains("kafka brokers reachable again"), "the recovery is logged");
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    let handled = seen(&php.log).iter().filter(|x| x.status == 200).count();
    println!("kafka broker restart: {n} published, {} handled, 0 lost, {} duplicates", ids.len(), handled - n);
}
