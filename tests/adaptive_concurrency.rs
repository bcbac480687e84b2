//! `max_in_flight: auto` against a real handler: RabbitMQ → message-router → `php -S`
//! with 4 workers, each request taking ~15 ms. Beyond 4 requests in flight the extra
//! ones only queue in PHP's listen backlog and their latency climbs, so the limit must
//! settle near the workers, far below its max, and every message is handled once.

use std::time::Duration;

use e2e::*;

const WAIT: Duration = Duration::from_secs(120);
const MESSAGES: usize = 800;

/// The handler's current limit, from `/metrics`.
async fn limit(router: &Router) -> f64 {
    router.metric("router_handler_concurrency_limit").await
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_limit_settles_near_the_handlers_workers_and_handles_each_message_once() {
    let dir = Scratch::new("adaptive");
    let mut rabbit = Rabbit::connect().await;
    let queue = unique("adaptive");
    rabbit.queue(&queue).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 4).await;
    // A prefetch above the max: only the limiter holds the router back.
    let yaml = config(&queue, &[php.url()], ", max_in_flight: { auto: { max: 64 } }", "")
        .replace("prefetch: 32", "prefetch: 128");
    let mut router = Router::start(&dir, &yaml).await;
    assert_eq!(limit(&router).await, 1.0, "an adaptive limit starts at 1");

    rabbit.publish(&queue, &batch("a", MESSAGES, |_| vec![("behave", "slow:15".to_string())])).await;
    // Watch the limit while the backlog drains (bounded by the handled count, not by
    // a sleep).
    let mut limits = Vec::new();
    let acked = || async { router.metric("router_messages_acked_total").await as usize };
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked().await < MESSAGES {
        assert!(tokio::time::Instant::now() < deadline, "{} of {MESSAGES} acked after {WAIT:?}", acked().await);
        limits.push(limit(&router).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settled = limit(&router).await;
    let highest = limits.iter().copied().fold(settled, f64::max);
    eprintln!("limit settled at {settled}, highest {highest}, over {} polls", limits.len());
    // The limiter's decisions (debug log), to read when it did not settle.
    let logs = router.logs();
    let windows: Vec<&str> = logs.lines().filter(|l| l.contains("concurrency window")).collect();
    let windows = windows.join("\n");
    // It rose from 1 (the handler answers 4 at once)...
    assert!(highest >= 2.0, "never rose above 1 (seen {limits:?}); windows:\n{windows}");
    // ...and stopped where latency climbs, far below the max. The last value may be 1
    // on a loaded machine (a cut after a slow window, shortly before growing back).
    assert!(settled <= 12.0, "settled at {settled} (seen {limits:?}); windows:\n{windows}");
    assert!(highest < 64.0, "climbed to the max (seen {limits:?}); windows:\n{windows}");

    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0), "clean exit on SIGTERM");
    let got = by_id(&seen(&php.log));
    assert_eq!(got.len(), MESSAGES, "every message reached the handler");
    let twice: Vec<_> = got.iter().filter(|(_, v)| v.len() != 1 || v[0].status != 200).map(|(id, _)| id).collect();
    assert!(twice.is_empty(), "handled more than once or failed: {twice:?}");
    assert_eq!(rabbit.count(&queue).await, 0, "nothing left in the queue");
    assert_eq!(rabbit.count(&format!("{queue}.dlq")).await, 0, "nothing dead-lettered");
    rabbit.cleanup().await;
}
