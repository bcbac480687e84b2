#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed expectation is the report
//! The delivery engine end to end over the memory transport, with scripted targets:
//! outcomes become acks, retries (with the attempt carried along) and dead letters
//! with their headers; shutdown hands unfinished work back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use router_core::config::parse;
use router_core::message::header;
use router_core::transport::memory::MemoryBroker;
use router_core::{DeliveryInfo, Message, Metrics, Outcome, Router, Target};
use tokio_util::sync::CancellationToken;

/// Answers from a script keyed by message id; records every attempt it saw.
#[derive(Default)]
struct Scripted {
    script: HashMap<String, Vec<Outcome>>,
    seen: Mutex<Vec<(String, u32, String)>>,
    delay: Option<Duration>,
    running: AtomicUsize,
    max_running: AtomicUsize,
}

#[async_trait]
impl Target for Scripted {
    async fn deliver(&self, d: DeliveryInfo<'_>) -> Outcome {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        self.seen.lock().push((d.message.id.clone(), d.attempt, d.route.to_string()));
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        let answers = self.script.get(&d.message.id);
        answers.and_then(|a| a.get(d.attempt as usize - 1).or(a.last()).cloned()).unwrap_or(Outcome::Ack)
    }
}

fn config(broker: &str, extra_sub: &str) -> router_core::config::Config {
    let yaml = format!(
        r#"
shutdown: {{ grace_period: 2s }}
transports: {{ {broker}: {{ type: memory }} }}
handlers: {{ h: {{ max_in_flight: 4 }} }}
subscriptions:
  s: {{ transport: {broker}, queue: q, prefetch: 16, retry: {{ max_attempts: 3, initial_delay: 10ms, max_delay: 50ms, jitter: 0 }} {extra_sub} }}
routes:
  - {{ name: orders, match: {{ routing_key: "order.#" }}, handler: h }}
"#
    );
    parse(&yaml, "test.yaml", &|_| None).expect("valid config")
}

fn msg(id: &str, key: &str) -> Message {
    Message { id: id.into(), key: Some(key.into()), body: bytes::Bytes::from_static(b"\x00body"), ..Message::default() }
}

async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_up_to(Duration::from_secs(10), what, cond).await
}

async fn wait_up_to(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

type RunTask = tokio::task::JoinHandle<Result<(), router_core::RunError>>;

fn start(cfg: &router_core::config::Config, target: Arc<Scripted>) -> (CancellationToken, RunTask, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let targets: HashMap<String, Arc<dyn Target>> = HashMap::from([("h".to_string(), target as Arc<dyn Target>)]);
    let router = Router::new(cfg, targets, metrics.clone()).expect("router");
    let stop = CancellationToken::new();
    let task = tokio::spawn(router.run(stop.clone()));
    (stop, task, metrics)
}

#[tokio::test]
async fn acks_retries_and_dead_letters_by_outcome() {
    let name = format!("mem-{}", uuid::Uuid::new_v4());
    let broker = MemoryBroker::named(&name);
    let fail = || Outcome::Retry { after: None, error: "HTTP 500: boom".into() };
    let target = Arc::new(Scripted {
        script: HashMap::from([
            ("flaky".to_string(), vec![fail(), Outcome::Ack]),
            ("broken".to_string(), vec![fail()]),
            ("poison".to_string(), vec![Outcome::Reject { reason: "HTTP 422: bad".into() }]),
        ]),
        ..Scripted::default()
    });
    let cfg = config(&name, "");
    for (id, key) in [
        ("ok", "order.created"),
        ("flaky", "order.x"),
        ("broken", "order.y"),
        ("poison", "order.z"),
        ("stray", "invoice.paid"),
    ] {
        broker.push("q", msg(id, key));
    }
    let (stop, task, metrics) = start(&cfg, target.clone());
    wait_until("all settled", || broker.len("q.dlq") == 3 && target.seen.lock().len() == 7).await;
    stop.cancel();
    task.await.expect("router task").expect("router ran");

    let seen = target.seen.lock().clone();
    let attempts = |id: &str| seen.iter().filter(|(i, _, _)| i == id).map(|(_, a, _)| *a).collect::<Vec<_>>();
    assert_eq!(attempts("ok"), vec![1]);
    assert_eq!(attempts("flaky"), vec![1, 2]);
    assert_eq!(attempts("broken"), vec![1, 2, 3]);
    assert_eq!(attempts("poison"), vec![1]);
    assert_eq!(attempts("stray"), Vec::<u32>::new(), "no route: never reaches a handler");

    let dead: HashMap<String, Message> = broker.drain("q.dlq").into_iter().map(|m| (m.id.clone(), m)).collect();
    assert_eq!(dead.len(), 3);
    let broken = &dead["broken"];
    assert_eq!(broken.headers[header::REASON], "max attempts exhausted (3 of 3)");
    assert_eq!(broken.headers[header::ATTEMPTS], "3");
    assert_eq!(broken.headers[header::LAST_ERROR], "HTTP 500: boom");
    assert_eq!(broken.headers[header::ROUTE], "orders");
    assert_eq!(broken.headers[header::ORIGINAL_QUEUE], "q");
    assert!(broken.headers[header::FIRST_FAILURE] <= broken.headers[header::LAST_FAILURE]);
    assert_eq!(&broken.body[..], b"\x00body", "body survives untouched");
    assert_eq!(dead["poison"].headers[header::REASON], "rejected by handler: HTTP 422: bad");
    assert!(dead["stray"].headers[header::REASON].starts_with("no route matched"), "{:?}", dead["stray"].headers);
    assert!(broker.is_empty("q"));
    let acked = metrics.acked.with_label_values(&["s", "orders", "h"]).get();
    assert_eq!(acked, 2);
    assert_eq!(metrics.retried.with_label_values(&["s", "orders", "h"]).get(), 3);
}

#[tokio::test]
async fn handler_limit_bounds_concurrency_and_ordered_runs_one_at_a_time() {
    for (extra, limit) in [("", 4), (", ordered: true", 1)] {
        let name = format!("mem-{}", uuid::Uuid::new_v4());
        let broker = MemoryBroker::named(&name);
        let target = Arc::new(Scripted { delay: Some(Duration::from_millis(5)), ..Scripted::default() });
        for i in 0..40 {
            broker.push("q", msg(&format!("m{i}"), "order.a"));
        }
        let (stop, task, _) = start(&config(&name, extra), target.clone());
        wait_until("all handled", || target.seen.lock().len() == 40).await;
        stop.cancel();
        task.await.expect("router task").expect("router ran");
        assert_eq!(target.max_running.load(Ordering::SeqCst), limit, "config extra {extra:?}");
        if limit == 1 {
            let order: Vec<String> = target.seen.lock().iter().map(|s| s.0.clone()).collect();
            let want: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
            assert_eq!(order, want, "ordered subscription keeps the queue's order");
        }
    }
}

#[tokio::test]
async fn shutdown_hands_unfinished_messages_back() {
    let name = format!("mem-{}", uuid::Uuid::new_v4());
    let broker = MemoryBroker::named(&name);
    // Handler slower than the 2 s grace period.
    let target = Arc::new(Scripted { delay: Some(Duration::from_secs(30)), ..Scripted::default() });
    for i in 0..10 {
        broker.push("q", msg(&format!("m{i}"), "order.a"));
    }
    let (stop, task, _) = start(&config(&name, ""), target.clone());
    wait_until("handler busy", || target.seen.lock().len() == 4).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops within grace + margin")
        .expect("task")
        .expect("router ran");
    assert_eq!(broker.len("q"), 10, "every unfinished message is back in the queue");
    assert!(broker.is_empty("q.dlq"));
}

#[tokio::test]
async fn a_saturated_handler_does_not_hold_up_another_handler_of_the_subscription() {
    let name = format!("mem-{}", uuid::Uuid::new_v4());
    let broker = MemoryBroker::named(&name);
    let yaml = format!(
        r#"
transports: {{ {name}: {{ type: memory }} }}
handlers: {{ slow: {{ max_in_flight: 1 }}, fast: {{ max_in_flight: 4 }} }}
subscriptions:
  s: {{ transport: {name}, queue: q, prefetch: 32 }}
routes:
  - {{ name: slow, match: {{ routing_key: "slow" }}, handler: slow }}
  - {{ name: fast, match: {{ routing_key: "fast" }}, handler: fast }}
"#
    );
    let cfg = parse(&yaml, "test.yaml", &|_| None).expect("valid config");
    let slow = Arc::new(Scripted { delay: Some(Duration::from_secs(5)), ..Scripted::default() });
    let fast = Arc::new(Scripted::default());
    // Slow messages first: with dispatch waiting on the slow handler, the fast ones
    // would be stuck behind them for 5 s each.
    for i in 0..3 {
        broker.push("q", msg(&format!("slow-{i}"), "slow"));
    }
    for i in 0..10 {
        broker.push("q", msg(&format!("fast-{i}"), "fast"));
    }
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let targets: HashMap<String, Arc<dyn Target>> = HashMap::from([
        ("slow".to_string(), slow.clone() as Arc<dyn Target>),
        ("fast".to_string(), fast.clone() as Arc<dyn Target>),
    ]);
    let router = Router::new(&cfg, targets, metrics).expect("router");
    let stop = CancellationToken::new();
    let task = tokio::spawn(router.run(stop.clone()));
    let started = std::time::Instant::now();
    wait_until("fast messages handled", || fast.seen.lock().len() == 10).await;
    assert!(started.elapsed() < Duration::from_secs(3), "fast handler waited {:?}", started.elapsed());
    assert_eq!(slow.seen.lock().len(), 1, "the slow handler works one at a time");
    stop.cancel();
    task.await.expect("router task").expect("router ran");
}

/// A config whose dead letters go to `q.dlq` and whose handler's circuit opens after
/// `trip` failures in a row (0: never).
fn config_with(broker: &str, extra_sub: &str, extra_handler: &str) -> router_core::config::Config {
    let yaml = format!(
        r#"
shutdown: {{ grace_period: 2s }}
transports: {{ {broker}: {{ type: memory, reconnect_max_delay: 1s }} }}
handlers: {{ h: {{ max_in_flight: 4 {extra_handler} }} }}
subscriptions:
  s: {{ transport: {broker}, queue: q, prefetch: 16, retry: {{ max_attempts: 3, initial_delay: 10ms, max_delay: 50ms, jitter: 0 }} {extra_sub} }}
routes:
  - {{ name: orders, handler: h }}
"#
    );
    parse(&yaml, "test.yaml", &|_| None).expect("valid config")
}

fn start_router(
    cfg: &router_core::config::Config,
    target: Arc<dyn Target>,
) -> (CancellationToken, RunTask, Arc<Metrics>, router_core::Readiness) {
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let targets: HashMap<String, Arc<dyn Target>> = HashMap::from([("h".to_string(), target)]);
    let router = Router::new(cfg, targets, metrics.clone()).expect("router");
    let readiness = router.readiness();
    let stop = CancellationToken::new();
    let task = tokio::spawn(router.run(stop.clone()));
    (stop, task, metrics, readiness)
}

#[tokio::test(start_paused = true)]
async fn a_refused_dead_letter_is_retried_not_the_handler_and_lands_when_the_destination_is_back() {
    let name = format!("mem-{}", uuid::Uuid::new_v4());
    let broker = MemoryBroker::named(&name);
    broker.refuse("q.dlq", true);
    let target = Arc::new(Scripted {
        script: HashMap::from([("poison".to_string(), vec![Outcome::Reject { reason: "HTTP 422: bad".into() }])]),
        ..Scripted::default()
    });
    broker.push("q", msg("poison", "order.a"));
    for i in 0..20 {
        broker.push("q", msg(&format!("ok-{i}"), "order.a"));
    }
    let (stop, task, metrics, readiness) = start_router(&config_with(&name, "", ""), target.clone());
    wait_until("the dead letter refused a few times", || broker.refusals() >= 6).await;
    let seen = target.seen.lock().clone();
    assert_eq!(seen.iter().filter(|s| s.0 == "poison").count(), 1, "the handler was called once");
    assert_eq!(seen.len(), 21, "the other messages were not held up");
    assert_eq!(metrics.settling.with_label_values(&["s"]).get(), 1);
    assert!(metrics.settle_failures.with_label_values(&["s"]).get() >= 6);
    let report = readiness.report();
    assert_eq!(report.len(), 1, "{report:?}");
    assert!(report[0].1.iter().any(|r| r.contains("settling") && r.contains("refuses writes")), "{report:?}");
    // The backoff grows: 6 refusals took more than 100 ms + 200 ms + ...
    let before = broker.refusals();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(broker.refusals() - before < 8, "backed off: {} tries in 10 s", broker.refusals() - before);

    broker.refuse("q.dlq", false);
    // The next try comes one backoff step later, and after 13 s of refusals that step
    // may be 12.8 s with up to as much again of jitter (`backoff::settle`, never more
    // than 2 × 30 s): wait out the longest one (paused time: this costs nothing).
    wait_up_to(Duration::from_secs(65), "the dead letter lands", || broker.len("q.dlq") == 1).await;
    assert_eq!(target.seen.lock().iter().filter(|s| s.0 == "poison").count(), 1, "still called once");
    wait_until("settling cleared", || metrics.settling.with_label_values(&["s"]).get() == 0).await;
    assert!(readiness.report().is_empty(), "{:?}", readiness.report());
    assert_eq!(metrics.dead_lettered.with_label_values(&["s", "orders", "h"]).get(), 1);
    stop.cancel();
    task.await.expect("router task").expect("router ran");
}

#[tokio::test(start_paused = true)]
async fn a_consumer_that_ends_is_started_again_and_readiness_says_so_meanwhile() {
    let name = format!("mem-{}", uuid::Uuid::new_v4());
    let broker = MemoryBroker::named(&name);
    use router_core::transport::memory::Sabotage;
    broker.sabotage_next(Sabotage::Fail("connection refused".into()));
    broker.sabotage_next(Sabotage::Fail("connection refused".into()));
    let target = Arc::new(Scripted::default());
    let (stop, task, metrics, readiness) = start_router(&config_with(&name, "", ""), target.clone());
    wait_until("two restarts", || metrics.consumer_restarts.with_label_values(&["s"]).get() == 2).await;
    let report = readiness.report();
    assert!(report.iter().any(|(_, r)| r.iter().any(|l| l.contains("restarting: connection refused"))), "{report:?}");
    broker.push("q", msg("m1", "order.a"));
    wait_until("handled by the third consumer", || target.seen.lock().len() == 1).await;
    assert!(readiness.report().is_empty(), "{:?}", readiness.report());
    assert_eq!(metrics.connected.with_label_values(&["s"]).get(), 1);
    stop.cancel();
    task.await.expect("router task").expect("router ran");
}

#[tokio::test(start_paused = true)]
async fn a_fatal_consumer_error_stops_the_router_with_an_error() {
    let name = format!("mem-{}", uuid::Uuid::new_v4());
    let broker = MemoryBroker::named(&name);
    use router_core::transport::memory::Sabotage;
    broker.sabotage_next(Sabotage::Fatal("the pattern is not a regex".into()));
    let (_stop, task, _, _) = start_router(&config_with(&name, "", ""), Arc::new(Scripted::default()));
    let result = tokio::time::timeout(Duration::from_secs(30), task).await.expect("stops").expect("task");
    let err = result.expect_err("an error, not Ok");
    assert_eq!(err.to_string(), "subscription \"s\" cannot run: the pattern is not a regex");
}

#[tokio::test(start_paused = true)]
async fn a_silently_stalled_consumer_is_found_and_started_again() {
    let name = format!("mem-{}", uuid::Uuid::new_v4());
    let broker = MemoryBroker::named(&name);
    use router_core::transport::memory::Sabotage;
    broker.sabotage_next(Sabotage::Stall);
    let target = Arc::new(Scripted::default());
    let (stop, task, metrics, _) = start_router(&config_with(&name, ", stall_timeout: 4s", ""), target.clone());
    for i in 0..5 {
        broker.push("q", msg(&format!("m{i}"), "order.a"));
    }
    let started = tokio::time::Instant::now();
    wait_until("all handled", || target.seen.lock().len() == 5).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(4) && took < Duration::from_secs(7), "found after {took:?}");
    assert_eq!(metrics.stalls.with_label_values(&["s"]).get(), 1);
    assert_eq!(metrics.consumer_restarts.with_label_values(&["s"]).get(), 1);
    // An idle subscription with nothing waiting is not a stall.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(metrics.stalls.with_label_values(&["s"]).get(), 1);
    stop.cancel();
    task.await.expect("router task").expect("router ran");
}

/// Fails every attempt until `until` (tokio time), then handles.
struct Outage {
    until: tokio::time::Instant,
    calls: AtomicUsize,
    handled: Mutex<Vec<String>>,
}

#[async_trait]
impl Target for Outage {
    async fn deliver(&self, d: DeliveryInfo<'_>) -> Outcome {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2)).await;
        if tokio::time::Instant::now() < self.until {
            return Outcome::Retry { after: None, error: "HTTP 500: database down".into() };
        }
        self.handled.lock().push(d.message.id.clone());
        Outcome::Ack
    }
}

#[tokio::test(start_paused = true)]
async fn an_outage_of_the_handler_opens_its_circuit_instead_of_burning_the_backlog() {
    let name = format!("mem-{}", uuid::Uuid::new_v4());
    let broker = MemoryBroker::named(&name);
    const N: usize = 500;
    for i in 0..N {
        broker.push("q", msg(&format!("m{i}"), "order.a"));
    }
    let target = Arc::new(Outage {
        until: tokio::time::Instant::now() + Duration::from_secs(20),
        calls: AtomicUsize::new(0),
        handled: Mutex::new(Vec::new()),
    });
    let cfg = config_with(&name, "", ", circuit_breaker: { consecutive_failures: 5, open_for: 1s, max_open_for: 4s }");
    let (stop, task, metrics, readiness) = start_router(&cfg, target.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let report = readiness.report();
    assert!(report.iter().any(|(_, r)| r.iter().any(|l| l.contains("circuit of handler \"h\" open"))), "{report:?}");
    assert_eq!(metrics.circuit_state.with_label_values(&["h"]).get(), 1, "open");
    let calls_in_outage = target.calls.load(Ordering::SeqCst);
    assert!(calls_in_outage < 40, "the pool is not hammered while down: {calls_in_outage} calls in 5 s");
    wait_up_to(Duration::from_secs(60), "everything handled after the outage", || target.handled.lock().len() == N)
        .await;
    assert!(broker.is_empty("q.dlq"), "nothing dead-lettered: {:?}", broker.drain("q.dlq").len());
    assert!(metrics.circuit_opened.with_label_values(&["h"]).get() >= 1);
    assert!(metrics.attempts_held.with_label_values(&["h"]).get() >= 1);
    assert_eq!(metrics.circuit_state.with_label_values(&["h"]).get(), 0, "closed again");
    assert!(readiness.report().is_empty());
    stop.cancel();
    task.await.expect("router task").expect("router ran");
}

/// Twenty messages for a handler that takes 200 ms each, a router started on them with
/// its subscription handles kept, and the handler busy with its four slots.
async fn twenty_for_a_slow_handler(
) -> (Arc<MemoryBroker>, Arc<Scripted>, CancellationToken, RunTask, router_core::Subscriptions) {
    let name = format!("mem-{}", uuid::Uuid::new_v4());
    let broker = MemoryBroker::named(&name);
    let target = Arc::new(Scripted { delay: Some(Duration::from_millis(200)), ..Scripted::default() });
    for i in 0..20 {
        broker.push("q", msg(&format!("m{i}"), "order.a"));
    }
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let targets: HashMap<String, Arc<dyn Target>> =
        HashMap::from([("h".to_string(), target.clone() as Arc<dyn Target>)]);
    let router = Router::new(&config(&name, ""), targets, metrics).expect("router");
    let subs = router.subscriptions();
    let stop = CancellationToken::new();
    let task = tokio::spawn(router.run(stop.clone()));
    wait_until("handler busy", || target.running.load(Ordering::SeqCst) == 4).await;
    (broker, target, stop, task, subs)
}

#[tokio::test]
async fn pause_lets_in_flight_finish_takes_nothing_new_and_resume_goes_on() {
    use router_core::control::State;
    let (broker, target, stop, task, subs) = twenty_for_a_slow_handler().await;
    let s = subs.get("s").expect("subscription s").clone();
    assert!(subs.get("nope").is_err(), "an unknown subscription is refused");
    s.pause();
    assert_eq!(s.state(), State::Paused);
    // What was in flight finishes and is acked; nothing new reaches the handler.
    wait_until("in flight finished", || s.snapshot().in_flight == 0).await;
    let handled = target.seen.lock().len();
    tokio::time::sleep(Duration::from_millis(600)).await; // three handler times: nothing may start
    assert_eq!(target.seen.lock().len(), handled, "a paused subscription takes nothing new");
    assert_eq!(
        broker.len("q") + handled,
        20 - 1,
        "one delivery waits unacked in the hand-over, the rest at the broker"
    );
    s.resume();
    wait_until("all handled after resume", || target.seen.lock().len() == 20).await;
    assert!(broker.is_empty("q.dlq"), "pausing dead-letters nothing");
    stop.cancel();
    task.await.expect("router task").expect("router ran");
}

#[tokio::test]
async fn drain_finishes_in_flight_hands_the_rest_back_and_stops_until_resumed() {
    use router_core::control::State;
    let (broker, target, stop, task, subs) = twenty_for_a_slow_handler().await;
    let s = subs.get("s").expect("subscription s").clone();
    s.drain();
    wait_until("drained", || s.state() == State::Drained).await;
    assert_eq!(
        s.snapshot().problems,
        ["drained: by an operator; POST /api/subscriptions/s/resume consumes again"],
        "readiness says why there is no consumer"
    );
    let handled = target.seen.lock().len();
    assert_eq!(s.snapshot().in_flight, 0);
    assert_eq!(broker.len("q") + handled, 20, "everything not handled is back at the broker, nothing acked unhandled");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(target.seen.lock().len(), handled, "a drained subscription takes nothing");
    s.resume();
    wait_until("all handled after resume", || target.seen.lock().len() == 20).await;
    assert_eq!(s.state(), State::Running);
    stop.cancel();
    task.await.expect("router task").expect("router ran");
}

/// A config over one memory broker for the reload tests: `subs` and `routes` as YAML
/// lines, handlers h1 and h2.
fn reload_config(broker: &str, subs: &str, routes: &str) -> router_core::config::Config {
    let yaml = format!(
        "shutdown: {{ grace_period: 2s }}\ntransports: {{ {broker}: {{ type: memory }} }}\nhandlers: {{ h1: {{}}, h2: {{}} }}\nsubscriptions:\n{subs}\nroutes:\n{routes}\n"
    );
    parse(&yaml, "test.yaml", &|_| None).expect("valid config")
}

#[tokio::test]
async fn a_reload_applies_only_what_changed() {
    let name = format!("mem-{}", uuid::Uuid::new_v4());
    let broker = MemoryBroker::named(&name);
    let (h1, h2) = (Arc::new(Scripted::default()), Arc::new(Scripted::default()));
    let targets = |h1: &Arc<Scripted>, h2: &Arc<Scripted>| -> HashMap<String, Arc<dyn Target>> {
        HashMap::from([("h1".to_string(), h1.clone() as Arc<dyn Target>), ("h2".to_string(), h2.clone() as _)])
    };
    let s = format!("  s: {{ transport: {name}, queue: q }}");
    let first = reload_config(&name, &s, "  - { name: all, handler: h1 }");
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let router = Router::new(&first, targets(&h1, &h2), metrics.clone()).expect("router");
    let (subs, reloader, readiness) = (router.subscriptions(), router.reloader(), router.readiness());
    let stop = CancellationToken::new();
    let task = tokio::spawn(router.run(stop.clone()));
    for i in 0..5 {
        broker.push("q", msg(&format!("a{i}"), "k"));
    }
    wait_until("first five handled by h1", || h1.seen.lock().len() == 5).await;
    let before = subs.get("s").expect("s");

    // The route now goes to h2, and a second subscription comes: s keeps running.
    let second = reload_config(
        &name,
        &format!("{s}\n  t: {{ transport: {name}, queue: q2 }}"),
        "  - { name: all, handler: h2 }",
    );
    let built = Arc::new(Mutex::new(Vec::new()));
    let record = built.clone();
    let diff = reloader
        .reload(
            second,
            Box::new(move |_, d| {
                record.lock().extend(d.handlers.added.iter().chain(&d.handlers.changed).cloned());
                Ok(HashMap::new())
            }),
        )
        .await
        .expect("reload applied");
    assert_eq!(diff.subscriptions.added, ["t"]);
    assert_eq!(diff.routes.changed, ["all"]);
    assert!(built.lock().is_empty(), "no handler changed, none is built again");
    let after = subs.get("s").expect("s");
    assert!(after.same_as(&before), "an unchanged subscription keeps its pipeline");
    for i in 0..5 {
        broker.push("q", msg(&format!("b{i}"), "k"));
        broker.push("q2", msg(&format!("c{i}"), "k"));
    }
    wait_until("new messages reach h2", || h2.seen.lock().len() == 10).await;
    assert_eq!(h1.seen.lock().len(), 5, "the old handler takes nothing new");
    wait_until("t ready", || readiness.not_ready().is_empty()).await;
    assert_eq!(metrics.consumer_restarts.with_label_values(&["s"]).get(), 0);

    // A reload whose targets cannot be built changes nothing.
    let third = reload_config(&name, &s, "  - { name: all, handler: h1 }");
    let refused = reloader.reload(third.clone(), Box::new(|_, _| Err("endpoint is not a URL".into()))).await;
    assert_eq!(refused.expect_err("refused").to_string(), "endpoint is not a URL");
    assert!(subs.get("t").is_ok(), "a refused reload keeps what runs");

    // t removed, s changed (prefetch), the route back to h1: h1 itself did not change.
    let third =
        reload_config(&name, &s.replace("queue: q }", "queue: q, prefetch: 3 }"), "  - { name: all, handler: h1 }");
    let h1b = Arc::new(Scripted::default());
    let fresh = h1b.clone();
    let diff = reloader
        .reload(third, Box::new(move |_, _| Ok(HashMap::from([("h1".to_string(), fresh as Arc<dyn Target>)]))))
        .await
        .expect("reload applied");
    assert_eq!(diff.subscriptions.removed, ["t"]);
    assert_eq!(diff.subscriptions.changed, ["s"]);
    assert!(subs.get("t").is_err(), "a removed subscription is gone");
    assert!(!subs.get("s").expect("s").same_as(&before), "a changed subscription runs a new pipeline");
    broker.push("q2", msg("orphan", "k"));
    broker.push("q", msg("d0", "k"));
    wait_until("s handles again after its restart", || h1.seen.lock().len() == 6).await;
    assert_eq!(h1b.seen.lock().len(), 0, "h1 itself did not change: it kept its target");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(broker.len("q2"), 1, "nothing consumes a removed subscription's queue");
    assert!(broker.is_empty("q.dlq") && broker.is_empty("q2.dlq"));
    stop.cancel();
    task.await.expect("router task").expect("router ran");
}
