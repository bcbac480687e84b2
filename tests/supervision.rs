//! A consumer broken while the process lives is found and repaired: the broker
//! cancels it (its queue deleted and declared again), the broker closes its
//! connection, its Redis group is destroyed (and created again, by the operator or by
//! the router), its Kafka consumer is dropped from its group (frozen past its session
//! timeout). Each: seen within 30 s (`/readyz` or the log), consumption resumes by
//! itself, nothing lost. (A silent stall, which only the watchdog can see, is proven
//! on the memory transport in router-core/tests/engine.rs, and what each broker
//! reports as waiting in router-core/tests/backlog.rs.)

use std::collections::HashSet;
use std::time::{Duration, Instant};

use e2e::*;

const WAIT: Duration = Duration::from_secs(60);
/// How soon a broken consumer must be seen and repaired.
const DETECT: Duration = Duration::from_secs(30);

fn handled(php: &PhpHandler) -> HashSet<String> {
    seen(&php.log).into_iter().filter(|s| s.status == 200).map(|s| s.id).collect()
}

async fn all_handled(php: &PhpHandler, ids: &[String], within: Duration) {
    wait_for(&format!("{} messages handled", ids.len()), within, || async {
        let done = handled(php);
        ids.iter().all(|id| done.contains(id))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_queue_deleted_and_declared_again() {
    use lapin::options::QueueDeleteOptions;
    let dir = Scratch::new("svamqp");
    let mut rabbit = Rabbit::connect().await;
    let queue = unique("svamqp");
    rabbit.queue(&queue).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 4).await;
    let yaml = config(&queue, &[php.url()], "", "stall_timeout: 5s");
    let mut router = Router::start(&dir, &yaml).await;
    let first = batch("a", 30, |_| vec![]);
    rabbit.publish(&queue, &first).await;
    all_handled(&php, &first.iter().map(|m| m.0.clone()).collect::<Vec<_>>(), WAIT).await;

    rabbit.channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.expect("delete");
    let broken = Instant::now();
    wait_for("/readyz reports the lost consumer", DETECT, || async {
        matches!(router.admin_get("/readyz").await, Some((503, body)) if body.contains("main: unreachable:"))
    })
    .await;
    let (_, body) = router.admin_get("/readyz").await.expect("readyz");
    eprintln!("queue deleted: seen after {:.1?}: {}", broken.elapsed(), body.trim());
    assert_eq!(router.metric("router_subscription_connected").await, 0.0);

    rabbit.queue(&queue).await;
    let redeclared = Instant::now();
    let second = batch("b", 30, |_| vec![]);
    rabbit.publish(&queue, &second).await;
    all_handled(&php, &second.iter().map(|m| m.0.clone()).collect::<Vec<_>>(), DETECT).await;
    eprintln!("queue declared again: consuming after {:.1?}", redeclared.elapsed());
    wait_for("ready again", DETECT, || async { router.ready().await }).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_connection_closed_by_the_broker_mid_stream() {
    let dir = Scratch::new("svclose");
    let rabbit = PrivateRabbit::start(&dir, "127.0.0.1").await;
    let queue = unique("svclose");
    let mut client = Rabbit::connect_to(&rabbit.url()).await;
    client.queue(&queue).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 4).await;
    let mut router = Router::start(&dir, &config_at(&rabbit.url(), &queue, &[php.url()], "", "")).await;
    let msgs = batch("c", 300, |_| vec![("behave", "slow:5".to_string())]);
    let ids: Vec<String> = msgs.iter().map(|m| m.0.clone()).collect();
    client.publish(&queue, &msgs).await;
    drop(client);
    wait_for("progress", WAIT, || async { handled(&php).len() >= 60 }).await;
    rabbit.close_connections().await;
    let closed = Instant::now();
    wait_for("the router reconnected", DETECT, || async {
        router.logs().contains("consumer down; reconnecting") && router.logs().matches("consuming").count() >= 2
    })
    .await;
    eprintln!("connection closed by the broker: consuming again after {:.1?}", closed.elapsed());
    all_handled(&php, &ids, WAIT).await;
    let dups = seen(&php.log).iter().filter(|s| s.status == 200).count() - ids.len();
    eprintln!("connection closed: {} handled, {dups} duplicates", ids.len());
    assert!(dups <= 32, "at most the prefetch window again: {dups}");
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_group_destroyed_and_created_again_mid_stream() {
    let dir = Scratch::new("svredis");
    let mut redis = Redis::connect().await;
    let (stream, group) = (unique("svredis"), unique("group"));
    let php = PhpHandler::start(&dir.path("handler.log"), 4).await;
    let yaml = redis_config(&[&stream], &group, "c1", &[php.url()], "stall_timeout: 5s");
    let mut router = Router::start(&dir, &yaml).await;
    let msgs = batch("r", 300, |_| vec![("behave", "slow:5".to_string())]);
    let ids: Vec<String> = msgs.iter().map(|m| m.0.clone()).collect();
    redis.publish(&stream, &msgs).await;
    wait_for("progress", WAIT, || async { handled(&php).len() >= 60 }).await;
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg(&group)
        .query_async(&mut redis.conn)
        .await
        .expect("destroy");
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(&group)
        .arg("0")
        .query_async(&mut redis.conn)
        .await
        .expect("create");
    let broken = Instant::now();
    all_handled(&php, &ids, DETECT + WAIT).await;
    eprintln!("group destroyed and created again: all {} handled {:.1?} later", ids.len(), broken.elapsed());
    redis.wait_acked(&stream, &group, WAIT).await;
    assert!(router.ready().await);
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    redis.cleanup(&[&stream], &group).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_group_destroyed_is_created_again_by_the_router() {
    let dir = Scratch::new("svredis2");
    let mut redis = Redis::connect().await;
    let (stream, group) = (unique("svredis2"), unique("group"));
    let php = PhpHandler::start(&dir.path("handler.log"), 4).await;
    let yaml = redis_config(&[&stream], &group, "c1", &[php.url()], "stall_timeout: 5s");
    let mut router = Router::start(&dir, &yaml).await;
    let first = batch("x", 20, |_| vec![]);
    redis.publish(&stream, &first).await;
    all_handled(&php, &first.iter().map(|m| m.0.clone()).collect::<Vec<_>>(), WAIT).await;
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg(&group)
        .query_async(&mut redis.conn)
        .await
        .expect("destroy");
    let broken = Instant::now();
    let second = batch("y", 20, |_| vec![]);
    redis.publish(&stream, &second).await;
    all_handled(&php, &second.iter().map(|m| m.0.clone()).collect::<Vec<_>>(), DETECT).await;
    eprintln!("group destroyed: created again and consuming after {:.1?}", broken.elapsed());
    assert!(router.logs().contains("NOGROUP"), "the lost group was seen");
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    redis.cleanup(&[&stream], &group).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_consumer_evicted_from_its_group_rejoins() {
    let dir = Scratch::new("svkafka");
    let kafka = Kafka::connect();
    let (topic, group) = (unique("svkafka"), unique("group"));
    kafka.create_topic(&topic, 2).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 4).await;
    let yaml = kafka_config(&[&topic], &group, &[php.url()], "stall_timeout: 5s");
    let mut router = Router::start(&dir, &yaml).await;
    let first = batch("k", 30, |_| vec![]);
    kafka.publish(&topic, &first, |i| Some(format!("key-{i}"))).await;
    all_handled(&php, &first.iter().map(|m| m.0.clone()).collect::<Vec<_>>(), WAIT).await;

    // Frozen past its session timeout (6 s): the coordinator drops it from the group.
    router.proc.signal("STOP");
    let second = batch("n", 30, |_| vec![]);
    kafka.publish(&topic, &second, |i| Some(format!("key-{i}"))).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    router.proc.signal("CONT");
    let resumed = Instant::now();
    all_handled(&php, &second.iter().map(|m| m.0.clone()).collect::<Vec<_>>(), DETECT).await;
    eprintln!(
        "evicted from its group: consuming again {:.1?} after it woke up (restarts: {})",
        resumed.elapsed(),
        router.metric("router_consumer_restarts_total").await
    );
    // Evicted, then assigned again. Not a count of assignments: twice on 2026-12-05
    // the start-up assignment was missing from the log while consumption worked
    // (cause not found; noted in the issue). Polled: the batch can be handled from
    // what was fetched before the coordinator's verdict, so the rejoin may come after
    // it (those messages are then delivered again: their commit was refused).
    let rejoined = || {
        let log = router.logs();
        log.find("partitions revoked").is_some_and(|at| log[at..].contains("partitions assigned"))
    };
    wait_for("a revocation followed by an assignment", DETECT, || std::future::ready(rejoined())).await;
    assert!(router.ready().await);
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    kafka.delete_topics(&[&topic, &format!("{group}.retry"), &format!("{topic}.dlq")]).await;
}
