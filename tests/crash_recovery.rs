//! Nothing is lost when the router dies: SIGKILL at random instants mid-stream, with
//! retries and dead letters in flight, then a restart; and RabbitMQ itself restarted
//! under a running router. Every published id must end handled (HTTP 200) or in the
//! dead-letter queue; duplicates are counted and reported, not hidden.
//!
//! Both tests live in this one binary and run one at a time (a broker restart would
//! disturb any test running beside it): cargo runs test binaries one after another.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use e2e::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Tally {
    handled: HashMap<String, usize>,
    dead: HashSet<String>,
}

impl Tally {
    fn duplicates(&self) -> usize {
        self.handled.values().map(|n| n - 1).sum()
    }
}

/// Wait until every id is handled or dead-lettered (reading the dead-letter queue as
/// it fills: it may hold duplicates, so ids are compared, not counts), then count.
async fn account(rabbit: &Rabbit, queue: &str, log: &std::path::Path, ids: &[String]) -> Tally {
    let dlq = format!("{queue}.dlq");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut dead = HashSet::new();
    loop {
        dead.extend(rabbit.drain(&dlq).await.into_iter().map(|g| g.id));
        let ok: HashSet<String> = seen(log).into_iter().filter(|s| s.status == 200).map(|s| s.id).collect();
        let open = ids.iter().filter(|id| !ok.contains(*id) && !dead.contains(*id)).count();
        if open == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{open} messages neither handled nor dead-lettered after 180s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut handled = HashMap::new();
    for s in seen(log).into_iter().filter(|s| s.status == 200) {
        *handled.entry(s.id).or_insert(0) += 1;
    }
    Tally { handled, dead }
}

fn assert_nothing_lost(t: &Tally, ids: &[String]) {
    let missing: Vec<&String> = ids.iter().filter(|id| !t.handled.contains_key(*id) && !t.dead.contains(*id)).collect();
    assert!(missing.is_empty(), "{} messages lost: {:?}", missing.len(), &missing[..missing.len().min(10)]);
    for id in ids {
        if is_poison(id) {
            assert!(t.dead.contains(id), "poison {id} must be dead-lettered");
        } else {
            assert!(t.handled.contains_key(id), "{id} must be handled");
        }
    }
}

/// A queue loaded with `n` messages of mixed behaviour, a PHP handler and a router
/// config for them.
struct Stream {
    dir: Scratch,
    rabbit: Rabbit,
    queue: String,
    php: PhpHandler,
    yaml: String,
    ids: Vec<String>,
}

async fn loaded_stream(name: &str, n: usize) -> Stream {
    let dir = Scratch::new(name);
    let mut rabbit = Rabbit::connect().await;
    let queue = unique(name);
    rabbit.queue(&queue).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 4).await;
    let yaml = config(&queue, &[php.url()], "", "");
    let msgs = batch(name, n, crash_mix);
    let ids = msgs.iter().map(|m| m.0.clone()).collect();
    rabbit.publish(&queue, &msgs).await;
    Stream { dir, rabbit, queue, php, yaml, ids }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_stream_loses_nothing() {
    let _serial = SERIAL.lock().await;
    const N: usize = 3000;
    const ROUNDS: usize = 4;
    let Stream { dir, rabbit, queue, php, yaml, ids } = loaded_stream("kill", N).await;

    let mut router = Router::start(&dir, &yaml).await;
    for round in 0..ROUNDS {
        // Let it work for a random while, then kill it without warning.
        let handled_before = seen(&php.log).len();
        wait_for("progress before the kill", Duration::from_secs(60), || async {
            seen(&php.log).len() > handled_before + 50
        })
        .await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..400))).await;
        router.proc.kill();
        eprintln!("round {round}: SIGKILL after {} requests", seen(&php.log).len());
        router = Router::restart(&dir, &router).await;
    }
    let tally = account(&rabbit, &queue, &php.log, &ids).await;
    assert_nothing_lost(&tally, &ids);
    let dups = tally.duplicates();
    eprintln!(
        "sigkill: {N} messages, {ROUNDS} kills: {} handled, {} dead-lettered, {dups} duplicate deliveries",
        tally.handled.len(),
        tally.dead.len()
    );
    // At-least-once: each kill may redeliver at most the in-flight window
    // (prefetch 32 + retries being published).
    assert!(dups <= ROUNDS * 64, "duplicates bounded by the in-flight window: {dups}");
    let counted = router.metric("router_messages_redelivered_total").await;
    assert!(counted > 0.0, "what the last kill left unacked came back flagged as redelivered");
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    assert_eq!(rabbit.count(&queue).await, 0, "queue drained");
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_restart_mid_stream_loses_nothing() {
    let _serial = SERIAL.lock().await;
    const N: usize = 2000;
    let Stream { dir, rabbit, queue, php, yaml, ids } = loaded_stream("restart", N).await;
    drop(rabbit);

    let router = Router::start(&dir, &yaml).await;
    wait_for("progress before the restart", Duration::from_secs(60), || async { seen(&php.log).len() > 300 }).await;
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl");
        assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // Whatever happens below (a failed assertion included), the broker is started
    // again, so later tests and runs find it up.
    struct StartAgain;
    impl Drop for StartAgain {
        fn drop(&mut self) {
            let _ = std::process::Command::new("rabbitmqctl").args(["-q", "start_app"]).status();
        }
    }
    let _start_again = StartAgain;
    ctl(&["stop_app"]);
    let during = seen(&php.log).len();
    ctl(&["start_app"]);
    ctl(&["await_startup"]);
    eprintln!("restart: broker stopped after {during} requests");

    wait_for("router reconnected", Duration::from_secs(60), || async {
        router.logs().matches("consuming").count() >= 2
    })
    .await;
    let rabbit = Rabbit::connect().await;
    let tally = account(&rabbit, &queue, &php.log, &ids).await;
    assert_nothing_lost(&tally, &ids);
    eprintln!(
        "restart: {N} messages: {} handled, {} dead-lettered, {} duplicate deliveries",
        tally.handled.len(),
        tally.dead.len(),
        tally.duplicates()
    );
    assert!(router.logs().contains("reconnecting"), "the router noticed and reconnected");
    let mut rabbit = rabbit;
    rabbit.queue(&queue).await;
    rabbit.cleanup().await;
}
