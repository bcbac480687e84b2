//! Hot reload under load (README "Reload"): a publisher feeds RabbitMQ, Redis and
//! Kafka throughout while the config file changes under the running daemon: a
//! handler's endpoints, a route's handler, a retry policy, a transport's URL, a
//! subscription added and removed, a broken file and its fix. Every change shows in
//! the behaviour and in `/api/status`; afterwards every message published was
//! handled, none dead-lettered but the one the retry policy meant to, and the
//! subscriptions that never changed handled nothing twice.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::admin::{get, post};
use e2e::*;

/// Replace the config file the way editors do: write a new file, rename it over.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.new");
    std::fs::write(&tmp, text).expect("write new config");
    std::fs::rename(&tmp, path).expect("rename over the config");
}

/// `sha256:<hex>` as `/api/status` shows it.
fn hash(text: &str) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(text.as_bytes())))
}

async fn wait_hash(router: &Router, text: &str) {
    let want = hash(text);
    wait_for("the new config to be applied", Duration::from_secs(15), || async {
        get(router, "/api/status").await["config_hash"] == want
    })
    .await;
}

/// Which handler port served each message id with 200, and how often.
fn handled(logs: &[&Path]) -> BTreeMap<String, Vec<u16>> {
    let mut m: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    for log in logs {
        for s in seen(log).into_iter().filter(|s| s.status == 200) {
            m.entry(s.id).or_default().push(s.port);
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_applies_each_change_and_loses_nothing() {
    let dir = Scratch::new("reload");
    let mut rabbit = Rabbit::connect().await;
    let (queue, stream, extra_stream, topic) = (unique("rl-q"), unique("rl-s"), unique("rl-s2"), unique("rl-t"));
    rabbit.queue(&queue).await;
    let kafka = Kafka::connect();
    kafka.create_topic(&topic, 2).await;
    let (group, extra_group) = (unique("g"), unique("g2"));
    let (log_a, log_b) = (dir.path("a.log"), dir.path("b.log"));
    let (a, b) = (PhpHandler::start(&log_a, 4).await, PhpHandler::start(&log_b, 4).await);
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:{{admin}}" }}
shutdown: {{ grace_period: 10s }}
transports:
  rabbit: {{ type: amqp, url: "{amqp}", reconnect_max_delay: 1s }}
  redis: {{ type: redis, url: "{redis}", consumer: c1, reconnect_max_delay: 1s }}
  kafka:
    type: kafka
    brokers: ["{kafka}"]
    properties: {{ batch.num.messages: "1" }}
handlers:
  php: {{ endpoints: ["{a}"], timeout: 5s }}
subscriptions:
  orders: {{ transport: rabbit, queue: {queue}, prefetch: 8, retry: {{ max_attempts: 2, initial_delay: 100ms, jitter: 0 }} }}
  events: {{ transport: redis, streams: ["{stream}"], group: {group}, prefetch: 8 }}
  clicks: {{ transport: kafka, topics: ["{topic}"], group: {kgroup}, prefetch: 8 }}
routes:
  - {{ name: work, handler: php }}
"#,
        amqp = amqp_url(),
        redis = redis_url(),
        kafka = kafka_brokers(),
        a = a.url(),
        kgroup = unique("kg"),
    );
    let router = Router::start(&dir, &yaml).await;
    let first = std::fs::read_to_string(&router.config).expect("config");
    assert_eq!(get(&router, "/api/status").await["config_hash"], hash(&first));

    // Load: one message a source every 20 ms until the end, ids counted per source.
    let running = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (running, queue, stream, topic) = (running.clone(), queue.clone(), stream.clone(), topic.clone());
        tokio::spawn(async move {
            let (rabbit, mut redis, kafka) = (Rabbit::connect().await, Redis::connect().await, Kafka::connect());
            let mut n = 0usize;
            while running.load(Ordering::Relaxed) {
                let one = |p: &str| vec![(format!("{p}-{n}"), b"{}".to_vec(), Vec::new())];
                rabbit.publish(&queue, &one("o")).await;
                redis.publish(&stream, &one("e")).await;
                kafka.publish(&topic, &one("c"), |_| Some(format!("k{n}"))).await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            n
        })
    };
    let logs = [log_a.as_path(), log_b.as_path()];
    // Messages go on reaching `port`: 30 more handled there from now.
    let reaches = |port: u16, what: &'static str| async move {
        let at = |p: u16| handled(&logs).values().flatten().filter(|q| **q == p).count();
        let before = at(port);
        wait_for(what, Duration::from_secs(30), || async { at(port) >= before + 30 }).await;
    };
    reaches(a.port, "traffic on handler a").await;

    // 1. A handler's endpoints: a → b (the file replaced by rename, as editors save).
    let v2 = first.replace(&a.url(), &b.url());
    replace_file(&router.config, &v2);
    wait_hash(&router, &v2).await;
    reaches(b.port, "new messages reach b").await;
    let status = get(&router, "/api/status").await;
    assert_eq!(status["last_reload"]["result"], "applied", "{status}");
    assert_eq!(status["last_reload"]["changes"]["handlers"]["changed"][0], "php");

    // 2. A route's handler: a new handler on a, and the route moves to it; SIGHUP also
    //    reads the file (after the watcher, it finds it unchanged).
    let v3 = v2
        .replace("handlers:\n", &format!("handlers:\n  php_a: {{ endpoints: [\"{}\"], timeout: 5s }}\n", a.url()))
        .replace("{ name: work, handler: php }", "{ name: work, handler: php_a }");
    std::fs::write(&router.config, &v3).expect("write in place");
    router.proc.signal("HUP");
    wait_hash(&router, &v3).await;
    reaches(a.port, "new messages reach a through the moved route").await;
    wait_for("SIGHUP to read the file", Duration::from_secs(10), || async { router.logs().contains("trigger=Signal") })
        .await;

    // 3. A retry policy: orders' max_attempts 2 → 4. Before, a message failing twice
    //    is dead-lettered; after, one failing three times is handled on attempt 4.
    rabbit.publish(&queue, &[("before".into(), b"{}".to_vec(), vec![("behave", "fail-until:4".into())])]).await;
    wait_for("the retry policy's dead letter", Duration::from_secs(30), || async {
        router.metric("router_messages_dead_lettered_total").await == 1.0
    })
    .await;
    let v4 = v3.replace("max_attempts: 2,", "max_attempts: 4,");
    replace_file(&router.config, &v4);
    let (code, answer) = post(&router, "/api/reload", None).await;
    assert_eq!(code, 200, "{answer}");
    wait_hash(&router, &v4).await;
    rabbit.publish(&queue, &[("after".into(), b"{}".to_vec(), vec![("behave", "fail-until:4".into())])]).await;
    wait_for("the new policy to retry it to success", Duration::from_secs(30), || async {
        handled(&logs).contains_key("after")
    })
    .await;
    assert!(!handled(&logs).contains_key("before"));

    // 4. A transport's URL: orders reconnects through another address.
    let other_amqp = amqp_url().replace("127.0.0.1", "localhost");
    assert_ne!(other_amqp, amqp_url(), "the test's AMQP URL names 127.0.0.1");
    let v5 = v4.replace(&amqp_url(), &other_amqp);
    replace_file(&router.config, &v5);
    wait_hash(&router, &v5).await;
    let status = get(&router, "/api/status").await;
    assert_eq!(status["last_reload"]["changes"]["transports"]["changed"][0], "rabbit", "{status}");
    assert_eq!(status["last_reload"]["changes"]["subscriptions"]["changed"][0], "orders", "{status}");

    // 5. A subscription added on each broker, then removed.
    let (extra_queue, extra_topic) = (unique("rl-q2"), unique("rl-t2"));
    rabbit.queue(&extra_queue).await;
    kafka.create_topic(&extra_topic, 1).await;
    let v6 = v5.replace(
        "subscriptions:\n",
        &format!(
            "subscriptions:\n  audit: {{ transport: redis, streams: [\"{extra_stream}\"], group: {extra_group} }}\n  audit_q: {{ transport: rabbit, queue: {extra_queue} }}\n  audit_t: {{ transport: kafka, topics: [\"{extra_topic}\"], group: {} }}\n",
            unique("kg2")
        ),
    );
    replace_file(&router.config, &v6);
    wait_hash(&router, &v6).await;
    let mut redis = Redis::connect().await;
    let one = |id: &str| vec![(id.to_string(), b"{}".to_vec(), Vec::new())];
    redis.publish(&extra_stream, &one("audit-1")).await;
    rabbit.publish(&extra_queue, &one("audit_q-1")).await;
    kafka.publish(&extra_topic, &one("audit_t-1"), |_| None).await;
    wait_for("the added subscriptions to handle their sources", Duration::from_secs(60), || async {
        let h = handled(&logs);
        ["audit-1", "audit_q-1", "audit_t-1"].iter().all(|id| h.contains_key(*id))
    })
    .await;
    for name in ["audit", "audit_q", "audit_t"] {
        assert_eq!(get(&router, &format!("/api/subscriptions/{name}")).await["state"], "running");
    }
    replace_file(&router.config, &v5);
    wait_hash(&router, &v5).await;
    for name in ["audit", "audit_q", "audit_t"] {
        let (code, _) = e2e::admin::call(&router, "GET", &format!("/api/subscriptions/{name}"), None, &[], None).await;
        assert_eq!(code, 404, "a removed subscription is gone from the API");
    }
    wait_for("the removed subscriptions' gauges to go", Duration::from_secs(30), || async {
        !router.metrics().await.contains("router_subscription_connected{subscription=\"audit")
    })
    .await;
    redis.publish(&extra_stream, &one("audit-2")).await;
    rabbit.publish(&extra_queue, &one("audit_q-2")).await;
    kafka.publish(&extra_topic, &one("audit_t-2"), |_| None).await;

    // 6. A broken file is refused with its key path; the running config stays; the fix
    //    applies.
    let broken = v5.replace("{ name: work, handler: php_a }", "{ name: work, handler: nowhere }");
    replace_file(&router.config, &broken);
    wait_for("the broken file to be refused", Duration::from_secs(15), || async {
        let last = &get(&router, "/api/status").await["last_reload"];
        last["result"] == "invalid" && last["errors"].to_string().contains("nowhere")
    })
    .await;
    let status = get(&router, "/api/status").await;
    assert_eq!(status["config_hash"], hash(&v5), "the running config stays");
    let errors = status["last_reload"]["errors"].to_string();
    assert!(errors.contains("routes[0].handler"), "the error names the key path: {errors}");
    assert!(router.metric("router_config_reloads_total{result=\"invalid\"}").await >= 1.0);
    assert_eq!(router.metric("router_config_last_reload_successful").await, 0.0);
    let (code, answer) = post(&router, "/api/reload", None).await;
    assert_eq!(code, 422, "the API says the file is invalid: {answer}");
    reaches(a.port, "messages still flow on the running config").await;
    replace_file(&router.config, &v5.replace("timeout: 5s", "timeout: 6s"));
    wait_hash(&router, &v5.replace("timeout: 5s", "timeout: 6s")).await;
    assert_eq!(router.metric("router_config_last_reload_successful").await, 1.0);

    // Stop the load; everything published is handled.
    running.store(false, Ordering::Relaxed);
    let n = publisher.await.expect("publisher");
    assert!(n > 100, "the publisher ran through the reloads ({n} rounds)");
    let want: Vec<String> = (0..n).flat_map(|i| [format!("o-{i}"), format!("e-{i}"), format!("c-{i}")]).collect();
    wait_for("every published message handled", Duration::from_secs(60), || async {
        let h = handled(&logs);
        want.iter().all(|id| h.contains_key(id))
    })
    .await;
    let h = handled(&logs);
    let twice: Vec<&String> =
        h.iter().filter(|(id, p)| p.len() > 1 && !id.starts_with("o-")).map(|(id, _)| id).collect();
    assert!(twice.is_empty(), "unchanged subscriptions handled messages twice: {twice:?}");
    let orders_twice = h.iter().filter(|(id, p)| p.len() > 1 && id.starts_with("o-")).count();
    eprintln!("{n} rounds; orders (restarted twice) handled {orders_twice} message(s) twice");
    for id in ["audit-2", "audit_q-2", "audit_t-2"] {
        assert!(!h.contains_key(id), "nothing consumes a removed subscription ({id})");
    }
    assert_eq!(rabbit.count(&extra_queue).await, 1, "the removed subscription's queue keeps its message");
    assert_eq!(router.metric("router_messages_dead_lettered_total").await, 1.0, "only the retry policy's message");
    assert_eq!(router.metric("router_config_reloads_total{result=\"applied\"}").await, 7.0);
    assert_eq!(router.metric("router_consumer_restarts_total{subscription=\"events\"}").await, 0.0);
    assert_eq!(router.metric("router_consumer_restarts_total{subscription=\"clicks\"}").await, 0.0);
    kafka.delete_topics(&[&topic, &format!("{topic}.dlq"), &extra_topic]).await;
    redis.cleanup(&[&stream], &group).await;
    Redis::connect().await.cleanup(&[&extra_stream], &extra_group).await;
    rabbit.cleanup().await;
}
