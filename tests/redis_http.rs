//! Redis Streams → message-router → PHP over HTTP: acks, routing on fields, durable
//! retries with backoff, dead-letter stream, deduplication, and two router instances
//! sharing one consumer group, against a real Redis, the real daemon binary and real
//! PHP handlers. Every test uses its own streams and group.

use std::collections::HashSet;
use std::time::Duration;

use e2e::*;

const WAIT: Duration = Duration::from_secs(60);

struct Setup {
    dir: Scratch,
    redis: Redis,
    stream: String,
    group: String,
    php: PhpHandler,
}

async fn setup(name: &str) -> Setup {
    let dir = Scratch::new(name);
    let redis = Redis::connect().await;
    let php = PhpHandler::start(&dir.path("handler.log"), 4).await;
    Setup { dir, redis, stream: unique(name), group: unique("group"), php }
}

impl Setup {
    async fn cleanup(self) {
        self.redis.cleanup(&[&self.stream], &self.group).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn acks_handled_entries_and_routes_on_fields() {
    let mut s = setup("rack").await;
    let vip = PhpHandler::start(&s.dir.path("vip.log"), 2).await;
    // A second handler for entries whose `tier` field is "vip"; its route goes first.
    let yaml = redis_config(&[&s.stream], &s.group, "c1", &[s.php.url()], "")
        .replace("handlers:\n", &format!("handlers:\n  vip: {{ endpoints: [\"{}\"], timeout: 5s }}\n", vip.url()))
        .replace("routes:\n", "routes:\n  - { name: vip, match: { headers: { tier: vip } }, handler: vip }\n");
    let mut router = Router::start(&s.dir, &yaml).await;
    let msgs = batch("r", 40, |i| {
        let tier = if i % 4 == 0 { "vip" } else { "standard" };
        vec![("tier", tier.to_string()), ("type", "order.created".to_string())]
    });
    s.redis.publish(&s.stream, &msgs).await;
    // An entry without a producer id: its stream id is its message id.
    let bare_id = s.redis.xadd(&s.stream, &[("body", b"{}"), ("tier", b"standard")]).await;

    wait_for("41 handled", WAIT, || async { seen(&s.php.log).len() + seen(&vip.log).len() >= 41 }).await;
    s.redis.wait_acked(&s.stream, &s.group, WAIT).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0), "clean exit on SIGTERM");

    let standard = by_id(&seen(&s.php.log));
    let vips = by_id(&seen(&vip.log));
    assert_eq!(vips.len(), 10, "every 4th entry routed on its field");
    assert!(vips.keys().all(|id| id.trim_start_matches("r-").parse::<usize>().is_ok_and(|i| i % 4 == 0)));
    assert_eq!(standard.len(), 31);
    assert!(standard.values().chain(vips.values()).all(|v| v.len() == 1 && v[0].status == 200), "each once");
    let h = &standard["r-1"][0].headers;
    assert_eq!(h["ce-id"], "r-1");
    assert_eq!(h["ce-type"], "order.created", "the `type` field is the CloudEvents type");
    assert!(h["ce-source"].ends_with(&format!("/{}", s.stream)), "ce-source {:?}", h["ce-source"]);
    assert_eq!(h["x-router-key"], s.stream, "the stream is the routing key");
    assert_eq!(h["x-message-header-tier"], "standard");
    assert!(standard.contains_key(&bare_id), "entry id {bare_id} as message id");
    assert_eq!(s.redis.pending(&s.stream, &s.group).await, 0, "every entry acked");
    assert!(s.redis.entries(&format!("{}.dlq", s.stream)).await.is_empty());
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_with_backoff_then_dead_letters_with_reason() {
    let mut s = setup("rretry").await;
    let yaml = redis_config(&[&s.stream], &s.group, "c1", &[s.php.url()], "");
    let mut router = Router::start(&s.dir, &yaml).await;
    let binary: Vec<u8> = vec![0, 159, 146, 150, 255];
    s.redis
        .publish(
            &s.stream,
            &[
                ("flaky".into(), b"{}".to_vec(), vec![("behave", "fail-until:3".into())]),
                ("broken".into(), binary.clone(), vec![("behave", "fail".into()), ("tenant", "acme".into())]),
                ("poison".into(), b"{}".to_vec(), vec![("behave", "reject".into())]),
            ],
        )
        .await;
    // Undecodable: a header value that is not text; and an entry without a body.
    s.redis.xadd(&s.stream, &[("body", b"x"), ("message_id", b"badhdr"), ("h", &[0xff, 0xfe])]).await;
    s.redis.xadd(&s.stream, &[("payload", b"x"), ("message_id", b"nobody")]).await;
    s.redis.publish(&s.stream, &[("after".into(), b"{}".to_vec(), vec![])]).await;

    let dlq = format!("{}.dlq", s.stream);
    wait_for("4 dead letters", WAIT, || {
        let mut r = Redis { conn: s.redis.conn.clone() };
        let dlq = dlq.clone();
        async move { r.entries(&dlq).await.len() >= 4 }
    })
    .await;
    wait_for("flaky and after handled", WAIT, || async {
        let ok: HashSet<String> = seen(&s.php.log).into_iter().filter(|x| x.status == 200).map(|x| x.id).collect();
        ok.contains("flaky") && ok.contains("after")
    })
    .await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));

    let got = by_id(&seen(&s.php.log));
    let flaky = &got["flaky"];
    assert_eq!(flaky.iter().map(|x| (x.attempt, x.status)).collect::<Vec<_>>(), [(1, 500), (2, 500), (3, 200)]);
    let gap1 = flaky[1].time - flaky[0].time;
    let gap2 = flaky[2].time - flaky[1].time;
    assert!(gap1 >= 0.19 && gap2 >= 0.39, "backoff 200ms then 400ms, got {gap1:.3}s, {gap2:.3}s");
    assert_eq!(got["broken"].len(), 3, "max_attempts 3");
    assert_eq!(got["poison"].len(), 1, "rejected: no retry");
    assert!(!got.contains_key("badhdr") && !got.contains_key("nobody"), "undecodable entries never reach PHP");

    let dead: Vec<StreamEntry> = s.redis.entries(&dlq).await;
    let by = |id: &str| dead.iter().find(|e| e.text("message_id") == id).cloned().expect("in the dead-letter stream");
    let broken = by("broken");
    assert_eq!(broken.fields["body"], binary, "body kept byte for byte");
    assert_eq!(broken.text("tenant"), "acme", "fields kept");
    assert_eq!(broken.text("x-router-reason"), "max attempts exhausted (3 of 3)");
    assert_eq!(broken.text("x-router-attempts"), "3");
    assert!(broken.text("x-router-last-error").contains("HTTP 500"), "{:?}", broken.text("x-router-last-error"));
    assert_eq!(broken.text("x-router-original-stream"), s.stream);
    let source = s.redis.entries(&s.stream).await;
    let first = source.iter().find(|e| e.text("message_id") == "broken").expect("still in the source stream");
    assert_eq!(broken.text("x-router-original-id"), first.id, "the first entry's id, kept through two retries");
    assert!(broken.text("x-router-first-failure") < broken.text("x-router-last-failure"));
    assert_eq!(broken.text("x-router-route"), "work");
    assert_eq!(broken.text("x-router-handler"), "php");
    assert_eq!(broken.text("x-router-subscription"), "main");
    let poison = by("poison");
    assert!(
        poison.text("x-router-reason").starts_with("rejected by handler: HTTP 422"),
        "{}",
        poison.text("x-router-reason")
    );
    assert_eq!(poison.text("x-router-attempts"), "1");
    assert!(by("badhdr").text("x-router-reason").contains("field \"h\": value is not valid UTF-8"));
    assert_eq!(by("badhdr").fields["h"], [0xff, 0xfe], "the undecodable value is kept as it was");
    assert!(by("nobody").text("x-router-reason").contains("no field \"body\""));

    assert_eq!(s.redis.pending(&s.stream, &s.group).await, 0, "source stream fully acked");
    let retry = format!("{}.{}.retry", s.stream, s.group);
    assert_eq!(s.redis.pending(&retry, &s.group).await, 0, "retry stream fully acked");
    assert_eq!(s.redis.zcard(&format!("{}.{}.delayed", s.stream, s.group)).await, 0, "no retry left waiting");
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dedup_skips_a_republished_duplicate() {
    let mut s = setup("rdedup").await;
    let extra = format!("dedup: {{ redis: \"{}\", ttl: 1h }}", redis_url());
    let yaml = redis_config(&[&s.stream], &s.group, "c1", &[s.php.url()], &extra);
    let mut router = Router::start(&s.dir, &yaml).await;
    // Ids are unique per run: the dedup records outlive the test (for their TTL).
    let (once, marker) = (unique("once"), unique("marker"));
    s.redis.publish(&s.stream, &[(once.clone(), b"{}".to_vec(), vec![])]).await;
    wait_for("first copy handled", WAIT, || async { seen(&s.php.log).iter().any(|x| x.id == once) }).await;
    // Acked means recorded (the record comes first): the window dedup covers starts.
    s.redis.wait_acked(&s.stream, &s.group, WAIT).await;
    // The producer publishes the same message again (a new entry, the same id),
    // followed by a marker: once the marker is handled, the duplicate was decided.
    s.redis
        .publish(&s.stream, &[(once.clone(), b"{}".to_vec(), vec![]), (marker.clone(), b"{}".to_vec(), vec![])])
        .await;
    wait_for("marker handled", WAIT, || async { seen(&s.php.log).iter().any(|x| x.id == marker) }).await;
    s.redis.wait_acked(&s.stream, &s.group, WAIT).await;
    let metrics = router.metrics().await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    assert_eq!(seen(&s.php.log).iter().filter(|x| x.id == once).count(), 1, "the duplicate never reached PHP");
    assert!(
        metrics.contains("router_messages_deduplicated_total{subscription=\"main\"} 1"),
        "dedup counted:\n{}",
        metrics.lines().filter(|l| l.contains("dedup")).collect::<Vec<_>>().join("\n")
    );
    let mut r = Redis { conn: s.redis.conn.clone() };
    let keys = [format!("message-router:dedup:main:{once}"), format!("message-router:dedup:main:{marker}")];
    let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut r.conn).await;
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_sharing_a_group_split_the_work() {
    let mut s = setup("rsplit").await;
    let other = PhpHandler::start(&s.dir.path("other.log"), 4).await;
    let a = redis_config(&[&s.stream], &s.group, "instance-a", &[s.php.url()], "");
    let b = redis_config(&[&s.stream], &s.group, "instance-b", &[other.url()], "");
    let mut ra = Router::start(&s.dir, &a).await;
    let mut rb = Router::start(&s.dir, &b).await;
    let msgs = batch("w", 300, |_| vec![("behave", "slow:5".to_string())]);
    s.redis.publish(&s.stream, &msgs).await;
    wait_for("300 handled", WAIT, || async {
        let ids: HashSet<String> =
            seen(&s.php.log).into_iter().chain(seen(&other.log)).filter(|x| x.status == 200).map(|x| x.id).collect();
        ids.len() >= 300
    })
    .await;
    s.redis.wait_acked(&s.stream, &s.group, WAIT).await;
    assert_eq!(ra.terminate(Duration::from_secs(15)), Some(0));
    assert_eq!(rb.terminate(Duration::from_secs(15)), Some(0));
    let (na, nb) = (seen(&s.php.log).len(), seen(&other.log).len());
    assert!(na > 0 && nb > 0, "both instances took work: {na} and {nb}");
    assert_eq!(na + nb, 300, "each entry delivered once across the group: {na} + {nb}");
    println!("two instances split 300 entries {na} / {nb}");
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_group_without_declare_is_explained() {
    let s = setup("rnogroup").await;
    let yaml = redis_config(&[&s.stream], &s.group, "c1", &[s.php.url()], "declare: false");
    let admin = free_port();
    let path = s.dir.path("nogroup.yaml");
    std::fs::write(&path, yaml.replace("{admin}", &admin.to_string())).expect("write");
    let log = s.dir.path("nogroup.log");
    let child = std::process::Command::new(router_bin())
        .args(["run", "--config", path.to_str().unwrap_or_default()])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start");
    let _proc = Proc { child, name: "router".into() };
    let want = format!("XGROUP CREATE {} {} 0 MKSTREAM", s.stream, s.group);
    wait_for("the error names the fix", WAIT, || {
        let log = log.clone();
        let want = want.clone();
        async move { std::fs::read_to_string(&log).unwrap_or_default().contains(&want) }
    })
    .await;
    let ready = reqwest::get(format!("http://127.0.0.1:{admin}/readyz")).await.expect("admin answers");
    assert_eq!(ready.status().as_u16(), 503, "not ready while the group is missing");
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ordered_subscription_handles_entries_one_at_a_time_in_order() {
    let mut s = setup("rorder").await;
    let yaml = redis_config(&[&s.stream], &s.group, "c1", &[s.php.url()], "ordered: true");
    let mut router = Router::start(&s.dir, &yaml).await;
    let msgs = batch("o", 30, |_| vec![("behave", "slow:5".to_string())]);
    s.redis.publish(&s.stream, &msgs).await;
    wait_for("30 handled", WAIT, || async { seen(&s.php.log).len() >= 30 }).await;
    s.redis.wait_acked(&s.stream, &s.group, WAIT).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    let order: Vec<String> = seen(&s.php.log).into_iter().map(|x| x.id).collect();
    let want: Vec<String> = msgs.iter().map(|m| m.0.clone()).collect();
    assert_eq!(order, want, "stream order, each once");
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_stop_does_not_count_as_an_attempt() {
    let mut s = setup("rgive").await;
    // One request at a time, so most entries wait for the handler when SIGTERM comes.
    let yaml = redis_config(&[&s.stream], &s.group, "c1", &[s.php.url()], "")
        .replace("timeout: 5s", "timeout: 5s, max_in_flight: 1");
    let mut router = Router::start(&s.dir, &yaml).await;
    s.redis.publish(&s.stream, &batch("g", 12, |_| vec![("behave", "slow:200".to_string())])).await;
    wait_for("first handled", WAIT, || async { !seen(&s.php.log).is_empty() }).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    let before = seen(&s.php.log).len();
    assert!(before < 12, "stopped mid-stream ({before} handled)");
    assert!(s.redis.pending(&s.stream, &s.group).await > 0, "the rest stays pending with this consumer");

    let mut router = Router::restart(&s.dir, &router).await;
    wait_for("all 12 handled", WAIT, || async { seen(&s.php.log).len() >= 12 }).await;
    s.redis.wait_acked(&s.stream, &s.group, WAIT).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    let got = by_id(&seen(&s.php.log));
    assert_eq!(got.len(), 12, "each once");
    assert!(
        got.values().all(|v| v.len() == 1 && v[0].attempt == 1),
        "entries handed back at the stop come back as attempt 1: {:?}",
        got.values().map(|v| v[0].attempt).collect::<Vec<_>>()
    );
    s.cleanup().await;
}
