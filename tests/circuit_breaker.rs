//! A handler pool that fails everything for 20 s (its database is down) and then
//! recovers must not burn the backlog into the dead-letter queue: its circuit opens,
//! the subscription takes nothing new, attempts are not spent, probes go out, and it
//! closes when the handler answers again. The same outage side by side with the
//! circuit breaker turned off shows what it saves.

use std::time::{Duration, Instant};

use e2e::*;

const N: usize = 2000;
const OUTAGE: Duration = Duration::from_secs(20);

struct Side {
    queue: String,
    php: PhpHandler,
    router: Router,
}

async fn side(dir: &Scratch, rabbit: &mut Rabbit, name: &str, breaker: &str) -> Side {
    let queue = unique(name);
    rabbit.queue(&queue).await;
    let php = PhpHandler::start(&dir.path(&format!("{name}.log")), 4).await;
    php.set_down(true);
    let yaml = config(&queue, &[php.url()], &format!(", max_in_flight: 16, circuit_breaker: {breaker}"), "")
        .replace("prefetch: 32", "prefetch: 64");
    let router = Router::start(dir, &yaml).await;
    rabbit.publish(&queue, &batch(name, N, |_| vec![])).await;
    Side { queue, php, router }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_twenty_second_outage_dead_letters_nothing_with_the_circuit_breaker() {
    let dir = Scratch::new("breaker");
    let mut rabbit = Rabbit::connect().await;
    // Default circuit breaker settings; the other side has it turned off.
    let on = side(&dir, &mut rabbit, "on", "{}").await;
    let off = side(&dir, &mut rabbit, "off", "{ enabled: false }").await;
    let down_at = Instant::now();

    wait_for("the circuit open and reported", Duration::from_secs(20), || async {
        matches!(on.router.admin_get("/readyz").await, Some((503, body)) if body.contains("circuit of handler \"php\" open"))
    })
    .await;
    assert_eq!(on.router.metric("router_circuit_state").await, 1.0, "open");
    tokio::time::sleep_until((down_at + OUTAGE).into()).await;
    let tried_on = seen(&on.php.log).len();
    let tried_off = seen(&off.php.log).len();
    on.php.set_down(false);
    off.php.set_down(false);
    let up_at = Instant::now();

    wait_for("every message handled after the outage", Duration::from_secs(120), || async {
        by_id(&seen(&on.php.log)).values().filter(|v| v.iter().any(|s| s.status == 200)).count() == N
    })
    .await;
    let recovered = up_at.elapsed();
    let dead_on = rabbit.drain(&format!("{}.dlq", on.queue)).await.len();
    wait_for("the other side done", Duration::from_secs(120), || async {
        let ok = by_id(&seen(&off.php.log)).values().filter(|v| v.iter().any(|s| s.status == 200)).count();
        ok + rabbit.count(&format!("{}.dlq", off.queue)).await as usize >= N
    })
    .await;
    let dead_off = rabbit.drain(&format!("{}.dlq", off.queue)).await.len();
    eprintln!(
        "outage of {OUTAGE:?}, {N} messages, max_attempts 3: circuit breaker on: {tried_on} requests during the outage, \
         {dead_on} dead-lettered, all handled {recovered:.1?} after recovery, opened {} times, {} attempts not counted; \
         off: {tried_off} requests during the outage, {dead_off} dead-lettered",
        on.router.metric("router_circuit_opened_total").await,
        on.router.metric("router_attempts_held_total").await,
    );
    assert_eq!(dead_on, 0, "nothing dead-lettered with the circuit breaker");
    assert!(tried_on < 200, "the failing pool was not hammered: {tried_on} requests in {OUTAGE:?}");
    assert!(dead_off > 0, "without it the outage dead-letters messages ({dead_off})");
    assert_eq!(on.router.metric("router_circuit_state").await, 0.0, "closed again");
    assert!(on.router.ready().await);
    let (mut a, mut b) = (on.router, off.router);
    assert_eq!(a.terminate(Duration::from_secs(15)), Some(0));
    assert_eq!(b.terminate(Duration::from_secs(15)), Some(0));
    rabbit.cleanup().await;
}
