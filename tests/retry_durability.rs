//! A RabbitMQ retry survives any broker stop at any instant. Retries wait in delay
//! queues and the router moves them back itself (publish confirmed, then ack); the
//! broker never expires one on its own (its TTL dead-lettering is at most once: 5 000
//! retries expiring as the broker stopped lost 1 349 of them, measured before).
//!
//! The test makes the dangerous moment happen again and again: a burst of retries all
//! due at the same instant, and the broker stopped (stop_app, or kill -9) right at that
//! instant, 20 times, on a RabbitMQ node of the test's own. Every message must end
//! handled; none lost, none dead-lettered.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use e2e::*;

const ROUNDS: usize = 20;
const BURST: usize = 100;
const DELAY: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread")]
async fn retries_survive_twenty_broker_restarts_at_the_instant_they_come_due() {
    let dir = Scratch::new("retrydur");
    let mut rabbit = PrivateRabbit::start(&dir, "127.0.0.1").await;
    let queue = unique("retrydur");
    let php = PhpHandler::start(&dir.path("handler.log"), 8).await;
    let yaml = config_at(&rabbit.url(), &queue, &[php.url()], "", "")
        .replace(
            "max_attempts: 3, initial_delay: 200ms, multiplier: 2, max_delay: 2s, jitter: 0",
            "max_attempts: 10, initial_delay: 1500ms, multiplier: 1, max_delay: 2s, jitter: 0",
        )
        .replace("prefetch: 32", "prefetch: 64")
        // Every burst fails at once on purpose: the handler's circuit would open.
        .replace("timeout: 5s", "timeout: 5s, circuit_breaker: { enabled: false }");
    {
        let mut r = Rabbit::connect_to(&rabbit.url()).await;
        r.queue(&queue).await;
    }
    let mut router = Router::start(&dir, &yaml).await;
    let mut ids = Vec::new();
    let started = Instant::now();
    for round in 0..ROUNDS {
        // A burst whose first attempts all fail: BURST retries due within a few ms.
        let msgs = batch(&format!("r{round}"), BURST, |_| vec![("behave", "fail-until:2".to_string())]);
        ids.extend(msgs.iter().map(|m| m.0.clone()));
        let prefix = format!("r{round}-");
        {
            let r = Rabbit::connect_to(&rabbit.url()).await;
            r.publish(&queue, &msgs).await;
        }
        let failed_at = Instant::now();
        wait_for("the burst's first attempts failed", Duration::from_secs(60), || async {
            seen(&php.log).iter().filter(|s| s.id.starts_with(&prefix) && s.status == 500).count() >= BURST
        })
        .await;
        // Stop the broker as the retries come due: the mover is holding and moving
        // them right then (the offset sweeps the instant across rounds).
        let offset = Duration::from_millis((round as u64 * 37) % 400);
        let at = failed_at + DELAY.saturating_sub(Duration::from_millis(150)) + offset;
        tokio::time::sleep_until(at.into()).await;
        if round % 2 == 0 {
            rabbit.kill9();
            rabbit.restart().await;
        } else {
            rabbit.stop_app().await;
            rabbit.start_app().await;
        }
        wait_for("the router reconnected", Duration::from_secs(60), || async { router.ready().await }).await;
    }
    eprintln!("{ROUNDS} broker restarts in {:.0?}", started.elapsed());

    let want: HashSet<String> = ids.iter().cloned().collect();
    let handled = || -> HashSet<String> {
        seen(&php.log).into_iter().filter(|s| s.status == 200).map(|s| s.id).collect::<HashSet<_>>()
    };
    wait_for("every retried message handled", Duration::from_secs(180), || async { want.is_subset(&handled()) }).await;
    let rabbit_client = Rabbit::connect_to(&rabbit.url()).await;
    let dead = rabbit_client.drain(&format!("{queue}.dlq")).await;
    let done = handled();
    let lost: Vec<&String> = want.difference(&done).collect();
    let log = seen(&php.log);
    let ok = log.iter().filter(|s| s.status == 200).count();
    eprintln!(
        "retry durability: {} messages, {} retries crossing {ROUNDS} broker stops; handled {} (duplicates {}), dead-lettered {}, lost {}",
        want.len(),
        log.iter().filter(|s| s.status == 500).count(),
        done.len(),
        ok - done.len(),
        dead.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(dead.is_empty(), "nothing dead-lettered: {:?}", dead.iter().map(|d| &d.id).collect::<Vec<_>>());
    assert!(router.logs().matches("consuming").count() > ROUNDS, "the router reconnected after every stop");
    assert_eq!(router.terminate(Duration::from_secs(20)), Some(0));
}
