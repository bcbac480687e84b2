//! Nothing is lost on Redis when things die: the router SIGKILLed mid-stream and
//! restarted under alternating consumer names (so entries come back both by re-reading
//! a consumer's own pending list and by claiming a dead consumer's); a message that
//! kills its consumer every time ends in the dead-letter stream; Redis itself SIGKILLed
//! and restarted under a running router. Every published id must end handled (HTTP
//! 200) or dead-lettered; duplicates are counted and reported, not hidden.

use std::collections::{HashMap, HashSet};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::*;

const WAIT: Duration = Duration::from_secs(120);

/// Ids handled with 200, with how often.
fn handled(log: &Path) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for s in seen(log).into_iter().filter(|s| s.status == 200) {
        *out.entry(s.id).or_insert(0) += 1;
    }
    out
}

/// Wait until every id is handled or in the dead-letter stream; returns the handled
/// counts and the dead-lettered ids.
async fn account(
    redis: &mut Redis,
    stream: &str,
    log: &Path,
    ids: &[String],
) -> (HashMap<String, usize>, HashSet<String>) {
    let dlq = format!("{stream}.dlq");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let dead: HashSet<String> = redis.entries(&dlq).await.iter().map(|e| e.text("message_id")).collect();
        let ok = handled(log);
        let open: Vec<&String> = ids.iter().filter(|id| !ok.contains_key(*id) && !dead.contains(*id)).collect();
        if open.is_empty() {
            return (ok, dead);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} messages neither handled nor dead-lettered after {WAIT:?}, e.g. {:?}",
            open.len(),
            &open[..open.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_stream_then_restart_loses_nothing() {
    let dir = Scratch::new("rkill");
    let mut redis = Redis::connect().await;
    let (stream, group) = (unique("rkill"), unique("group"));
    let php = PhpHandler::start(&dir.path("handler.log"), 8).await;
    let config = |consumer: &str| {
        redis_config(&[&stream], &group, consumer, &[php.url()], "")
            .replace("claim_idle: 10s", "claim_idle: 3s")
            .replace("timeout: 5s", "timeout: 2s")
            .replace("max_attempts: 3", "max_attempts: 10")
    };
    let n = 3000;
    let msgs = batch("k", n, crash_mix);
    let ids: Vec<String> = msgs.iter().map(|m| m.0.clone()).collect();
    redis.publish(&stream, &msgs).await;

    // Four SIGKILLs, each once another ~400 messages were handled; consumers alternate
    // so each start re-reads its own pending entries and claims the other's.
    let mut total_kills = 0;
    for (round, consumer) in ["a", "b", "a", "b"].iter().enumerate() {
        let mut router = Router::start(&dir, &config(consumer)).await;
        let target = (round + 1) * 400;
        wait_for(&format!("{target} handled"), WAIT, || async { handled(&php.log).len() >= target }).await;
        router.proc.kill();
        total_kills += 1;
    }
    // A fresh consumer finishes: whatever a and b still had pending must be claimed.
    let mut last = Router::start(&dir, &config("c")).await;
    let (ok, dead) = account(&mut redis, &stream, &php.log, &ids).await;
    redis.wait_acked(&stream, &group, WAIT).await;
    let counted = last.metric("router_messages_redelivered_total").await;
    assert!(counted > 0.0, "the claimed entries are counted as redeliveries");
    assert_eq!(last.terminate(Duration::from_secs(15)), Some(0));

    let poison: HashSet<String> = ids.iter().filter(|id| is_poison(id)).cloned().collect();
    assert_eq!(dead, poison, "exactly the poison messages are dead-lettered");
    assert!(ids.iter().filter(|id| !poison.contains(*id)).all(|id| ok.contains_key(id)), "every other id handled");
    let duplicates: usize = ok.values().map(|c| c - 1).sum();
    let redelivered = seen(&php.log).iter().filter(|s| !index_of(&s.id).is_multiple_of(20) && s.attempt >= 2).count();
    assert!(redelivered > 0, "entries in flight at a kill came back with a higher attempt");
    assert!(last.logs().contains("claimed entries idle longer than claim_idle"), "the last consumer claimed");
    let retry = format!("{stream}.{group}.retry");
    assert_eq!(redis.pending(&retry, &group).await, 0);
    assert_eq!(redis.zcard(&format!("{stream}.{group}.delayed")).await, 0);
    println!(
        "redis SIGKILL x{total_kills}: {n} published, {} handled, {} dead-lettered, 0 lost, {duplicates} duplicates, {redelivered} redeliveries",
        ok.len(),
        dead.len()
    );
    redis.cleanup(&[&stream], &group).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_kills_its_consumer_ends_in_dead_letters() {
    let dir = Scratch::new("rpoison");
    let mut redis = Redis::connect().await;
    let (stream, group) = (unique("rpoison"), unique("group"));
    let php = PhpHandler::start(&dir.path("handler.log"), 8).await;
    let yaml = redis_config(&[&stream], &group, "only", &[php.url()], "");
    let ok_ids = |log: &Path| handled(log).into_keys().filter(|id| id != "killer").count();
    // Messages before and after the killer are handled; none is in flight when the
    // router dies (a message in flight at every one of max_attempts crashes would count
    // as poison too, by design).
    let mut router = Router::start(&dir, &yaml).await;
    redis.publish(&stream, &batch("before", 10, |_| vec![])).await;
    wait_for("messages before handled", WAIT, || async { ok_ids(&php.log) >= 10 }).await;
    redis.publish(&stream, &[("killer".to_string(), b"{}".to_vec(), vec![("behave", "hang:30000".to_string())])]).await;

    // Each time the killer reaches the handler, the router dies (SIGKILL).
    for k in 1..=3 {
        wait_for(&format!("killer delivery {k}"), WAIT, || async {
            seen(&php.log).iter().filter(|s| s.id == "killer" && s.status == 0).count() >= k
        })
        .await;
        router.proc.kill();
        router = Router::restart(&dir, &router).await;
    }
    let dlq = format!("{stream}.dlq");
    wait_for("killer dead-lettered", WAIT, || {
        let mut r = Redis { conn: redis.conn.clone() };
        let dlq = dlq.clone();
        async move { r.entries(&dlq).await.iter().any(|e| e.text("message_id") == "killer") }
    })
    .await;
    redis.publish(&stream, &batch("after", 10, |_| vec![])).await;
    wait_for("messages after handled", WAIT, || async { ok_ids(&php.log) >= 20 }).await;
    redis.wait_acked(&stream, &group, WAIT).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));

    let entries = redis.entries(&dlq).await;
    let dead = entries.iter().find(|e| e.text("message_id") == "killer").expect("dead letter");
    let reason = dead.text("x-router-reason");
    assert!(reason.contains("max attempts (3) exhausted") && reason.contains("ended without an answer"), "{reason}");
    assert_eq!(dead.text("x-router-attempts"), "3");
    // Status 0: logged when the request arrived (a hung request logs 200 when it ends).
    let started = seen(&php.log).iter().filter(|s| s.id == "killer" && s.status == 0).count();
    assert_eq!(started, 3, "delivered 3 times, not a 4th");
    assert_eq!(redis.pending(&stream, &group).await, 0);
    redis.cleanup(&[&stream], &group).await;
}

/// A Redis server of the test's own (so restarting it disturbs no other test), with
/// every write fsynced: what Redis acknowledged survives a SIGKILL.
fn redis_server(dir: &Scratch, port: u16) -> Proc {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--appendonly", "yes", "--appendfsync", "always", "--dir", dir.0.to_str().unwrap_or_default()])
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts (scripts/setup installs it)");
    Proc { child, name: format!("redis:{port}") }
}

async fn wait_redis(port: u16) {
    wait_for("redis-server answers", WAIT, || async move {
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else { return false };
        let Ok(mut c) = client.get_multiplexed_async_connection().await else { return false };
        redis::cmd("PING").query_async::<String>(&mut c).await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_killed_and_restarted_mid_stream_loses_nothing() {
    let dir = Scratch::new("rrestart");
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let mut server = redis_server(&dir, port);
    wait_redis(port).await;
    let mut redis = Redis::connect_to(&url).await;
    let (stream, group) = (unique("rrestart"), unique("group"));
    let php = PhpHandler::start(&dir.path("handler.log"), 8).await;
    let n = 2000;
    let msgs = batch("r", n, crash_mix);
    let ids: Vec<String> = msgs.iter().map(|m| m.0.clone()).collect();
    redis.publish(&stream, &msgs).await;
    let yaml = redis_config_at(&url, &[&stream], &group, "only", &[php.url()], "");
    let mut router = Router::start(&dir, &yaml).await;

    wait_for("500 handled", WAIT, || async { handled(&php.log).len() >= 500 }).await;
    server.kill();
    let during = handled(&php.log).len();
    server = redis_server(&dir, port);
    wait_redis(port).await;
    let mut redis = Redis::connect_to(&url).await;
    let (ok, dead) = account(&mut redis, &stream, &php.log, &ids).await;
    redis.wait_acked(&stream, &group, WAIT).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    assert!(router.logs().contains("reconnecting"), "the router saw Redis go away");
    let poison: HashSet<String> = ids.iter().filter(|id| is_poison(id)).cloned().collect();
    assert_eq!(dead, poison, "exactly the poison messages are dead-lettered");
    let duplicates: usize = ok.values().map(|c| c - 1).sum();
    println!(
        "redis restart at {during}/{n} handled: {} handled, {} dead-lettered, 0 lost, {duplicates} duplicates",
        ok.len(),
        dead.len()
    );
    drop(server);
}
