//! `message-router dlq stats|list|show` on every broker: dead letters the router wrote
//! (a handler rejecting with HTTP 422) are counted, listed, filtered and shown, and
//! reading them changes nothing at the broker. Bad input gets a clear error.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::*;

const WAIT: Duration = Duration::from_secs(60);
const REASON: &str = "rejected by handler: HTTP 422: invalid order payload";

/// Three rejected, one handled: ids `bad-0..2`, `good-0`.
fn messages() -> Vec<Outgoing> {
    let mut all = batch("bad", 3, |_| vec![("behave", "reject".to_string())]);
    all.extend(batch("good", 1, |_| Vec::new()));
    all
}

fn dlq(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(router_bin())
        .arg("dlq")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run message-router dlq");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(config: &Path, args: &[&str]) -> String {
    let (code, stdout, stderr) = dlq(config, args);
    assert_eq!(code, Some(0), "dlq {args:?} failed:\n{stderr}");
    stdout
}

/// The ids of a `dlq list`, in its order.
fn listed_ids(list: &str) -> Vec<String> {
    list.lines()
        .filter(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// What every broker must show of the three dead letters; `id` is one of them.
fn check_commands(config: &Path, id: &str) {
    let stats = ok(config, &["stats"]);
    assert!(stats.contains("main: 3 dead letter(s)"), "{stats}");
    assert!(stats.contains(&format!("       3  {REASON}")), "{stats}");
    assert!(stats.contains("       3  work"), "{stats}");
    assert!(stats.contains("oldest 20") && stats.contains("newest 20"), "{stats}");

    let all = ok(config, &["list"]);
    assert!(all.contains("main: 3 shown"), "{all}");
    assert!(all.contains(REASON) && all.contains("route work") && all.contains("{\"n\":"), "{all}");
    let two = ok(config, &["list", "--limit", "2"]);
    assert!(two.contains("main: 2 shown (more; raise --limit 2)"), "{two}");
    let by_regex = ok(config, &["list", "--reason", "HTTP 4\\d\\d", "--subscription", "main"]);
    assert!(by_regex.contains("main: 3 shown"), "{by_regex}");
    let none = ok(config, &["list", "--route", "other"]);
    assert!(none.contains("main: 0 shown"), "{none}");
    let later = ok(config, &["stats", "--since", "2099-01-01T00:00:00Z"]);
    assert!(later.contains("main: 0 dead letter(s)"), "{later}");
    let recent = ok(config, &["stats", "--since", "1h"]);
    assert!(recent.contains("main: 3 dead letter(s)"), "{recent}");

    let shown = ok(config, &["show", "--subscription", "main", id]);
    assert!(shown.contains(&format!("id:           {id}")), "{shown}");
    assert!(shown.contains(&format!("x-router-reason: {REASON}")), "{shown}");
    assert!(shown.contains("x-router-attempts: 1") && shown.contains("x-router-subscription: main"), "{shown}");
    assert!(shown.contains("body (7 bytes):\n{\"n\":"), "{shown}");

    // Bad input: a clear error, exit 1.
    let (code, _, stderr) = dlq(config, &["stats", "--subscription", "nope"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--subscription \"nope\" is not in the config (it has: main)"), "{stderr}");
    let (code, _, stderr) = dlq(config, &["show", "--subscription", "main", "no-such-id"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no dead letter \"no-such-id\" in subscription \"main\""), "{stderr}");
    let (code, _, stderr) = dlq(config, &["list", "--reason", "(unclosed"]);
    assert_eq!(code, Some(2), "clap refuses a bad regex: {stderr}");
    assert!(stderr.contains("not a regular expression"), "{stderr}");
    let (code, _, stderr) = dlq(config, &["list", "--since", "yesterday-ish"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is neither a time like"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_dead_letters_are_read_and_stay() {
    let dir = Scratch::new("dlq-amqp");
    let mut rabbit = Rabbit::connect().await;
    let queue = unique("dlq");
    rabbit.queue(&queue).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 2).await;
    let mut router = Router::start(&dir, &config(&queue, &[php.url()], "", "")).await;
    rabbit.publish(&queue, &messages()).await;
    let dead = format!("{queue}.dlq");
    wait_for("three dead letters", WAIT, || async { rabbit.count(&dead).await == 3 }).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));

    let before = listed_ids(&ok(&router.config, &["list"]));
    check_commands(&router.config, "bad-1");
    // Read many times over (and a read stopped half-way by `show`), the queue still
    // holds every one, in its order.
    assert_eq!(rabbit.count(&dead).await, 3, "reading takes nothing away");
    let ids: Vec<String> = rabbit.drain(&dead).await.into_iter().map(|g| g.id).collect();
    assert_eq!(ids, before);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, ["bad-0", "bad-1", "bad-2"]);
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_dead_letters_are_read_and_stay() {
    let dir = Scratch::new("dlq-redis");
    let mut redis = Redis::connect().await;
    let stream = unique("dlq");
    let php = PhpHandler::start(&dir.path("handler.log"), 2).await;
    let yaml = redis_config(&[&stream], &unique("group"), "c1", &[php.url()], "");
    let mut router = Router::start(&dir, &yaml).await;
    redis.publish(&stream, &messages()).await;
    let dead = format!("{stream}.dlq");
    wait_for("three dead letters", WAIT, || {
        let mut r = Redis { conn: redis.conn.clone() };
        let dead = dead.clone();
        async move { r.entries(&dead).await.len() == 3 }
    })
    .await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));

    let first = redis.entries(&dead).await[0].id.clone();
    check_commands(&router.config, &format!("{dead}/{first}"));
    assert_eq!(redis.entries(&dead).await.len(), 3, "reading takes nothing away");
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_dead_letters_are_read_and_stay() {
    let dir = Scratch::new("dlq-kafka");
    let kafka = Kafka::connect();
    let topic = unique("dlq");
    kafka.create_topic(&topic, 2).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 2).await;
    let yaml = kafka_config(&[&topic], &unique("group"), &[php.url()], "");
    let mut router = Router::start(&dir, &yaml).await;
    kafka.publish(&topic, &messages(), |i| Some(format!("k{i}"))).await;
    let dead = format!("{topic}.dlq");
    let records = kafka.read(&dead, 3, WAIT).await;
    assert_eq!(records.len(), 3, "three dead letters");
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));

    let r = &records[0];
    check_commands(&router.config, &format!("{dead}/{}/{}", r.partition, r.offset));
    assert_eq!(kafka.read(&dead, 3, Duration::from_secs(10)).await.len(), 3, "a log keeps them");
    kafka.delete_topics(&[&topic, &dead]).await;
}
