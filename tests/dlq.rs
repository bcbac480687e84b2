//! `message-router dlq` on every broker: dead letters the router wrote (a handler
//! rejecting with HTTP 422) are counted, listed, filtered and shown, and reading them
//! changes nothing at the broker; replayed (a copy back on the source, attempt 1
//! again, marked) and purged. Bad input gets a clear error and changes nothing.

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

/// A purge asks first: without --yes and no terminal to ask on, nothing is purged;
/// a bad --rate is refused.
fn check_purge_refusals(config: &Path) {
    let (code, _, stderr) = dlq(config, &["purge"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("refusing to purge without --yes"), "{stderr}");
    let (code, _, stderr) = dlq(config, &["replay", "--rate", "0"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--rate 0 must be a number of messages per second above 0"), "{stderr}");
    let still = ok(config, &["stats"]);
    assert!(still.contains("main: 3 dead letter(s)"), "{still}");
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

    // Dead-letter them again, then replay and purge.
    let mut router = Router::restart(&dir, &router).await;
    rabbit.publish(&queue, &messages()[..3]).await;
    wait_for("three dead letters again", WAIT, || async { rabbit.count(&dead).await == 3 }).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    check_purge_refusals(&router.config);
    let dry = ok(&router.config, &["replay", "--dry-run"]);
    assert!(dry.contains("main: 3 would be replayed (dry run: nothing changed)"), "{dry}");
    assert_eq!(rabbit.count(&dead).await, 3);
    let purged = ok(&router.config, &["purge", "--id", "bad-2", "--yes"]);
    assert!(purged.contains("main: 1 purged"), "{purged}");
    assert_eq!(rabbit.count(&dead).await, 2);
    let replayed = ok(&router.config, &["replay", "--id", "bad-0", "--rate", "50"]);
    assert!(replayed.contains("main: 1 replayed"), "{replayed}");
    assert_eq!(rabbit.count(&dead).await, 1);
    let back = rabbit.drain(&queue).await;
    assert_eq!(back.len(), 1, "the copy is on the source queue");
    let copy = &back[0];
    assert_eq!((copy.id.as_str(), copy.body.as_slice()), ("bad-0", b"{\"n\":0}".as_slice()));
    assert!(copy.headers.contains_key("x-router-replayed"), "{:?}", copy.headers);
    for gone in ["x-router-reason", "x-router-attempts", "x-router-attempt", "x-router-last-error"] {
        assert!(!copy.headers.contains_key(gone), "{gone} kept: {:?}", copy.headers);
    }
    assert_eq!(copy.headers["behave"], "reject", "the producer's headers are kept");
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

    check_purge_refusals(&router.config);
    let before = redis.entries(&stream).await.len();
    let replayed = ok(&router.config, &["replay", "--id", &format!("{dead}/{first}")]);
    assert!(replayed.contains("main: 1 replayed"), "{replayed}");
    let source = redis.entries(&stream).await;
    assert_eq!(source.len(), before + 1, "the copy is on the source stream");
    let copy = &source[before];
    assert!(copy.fields.contains_key("x-router-replayed"), "{:?}", copy.fields.keys());
    assert!(!copy.fields.contains_key("x-router-reason") && !copy.fields.contains_key("x-router-attempts"));
    assert_eq!(copy.text("behave"), "reject");
    assert_eq!(redis.entries(&dead).await.len(), 2, "the dead letter is gone with its replay");
    let purged = ok(&router.config, &["purge", "--yes", "--reason", "422"]);
    assert!(purged.contains("main: 2 purged"), "{purged}");
    assert!(redis.entries(&dead).await.is_empty());
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
    let id = format!("{dead}/{}/{}", r.partition, r.offset);
    check_commands(&router.config, &id);
    assert_eq!(kafka.read(&dead, 3, Duration::from_secs(10)).await.len(), 3, "a log keeps them");

    let (code, _, stderr) = dlq(&router.config, &["purge", "--yes"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("a Kafka topic is a log"), "{stderr}");
    let replayed = ok(&router.config, &["replay", "--id", &id]);
    assert!(replayed.contains("main: 1 replayed"), "{replayed}");
    let source = kafka.read(&topic, 5, WAIT).await;
    let copies: Vec<_> = source.iter().filter(|r| !r.header("x-router-replayed").is_empty()).collect();
    assert_eq!(copies.len(), 1, "one copy on the source topic");
    assert_eq!(copies[0].payload, r.payload);
    assert_eq!(copies[0].key, r.key, "the key is kept");
    assert!(copies[0].header("x-router-reason").is_empty());
    assert_eq!(kafka.read(&dead, 3, Duration::from_secs(10)).await.len(), 3, "the dead letter stays");
    kafka.delete_topics(&[&topic, &dead]).await;
}
