//! RabbitMQ → message-router → PHP over HTTP: the HTTP status contract, retries,
//! dead-lettering with headers, load balancing and graceful shutdown, all against a
//! real broker, the real daemon binary and real PHP handlers.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use e2e::*;

const WAIT: Duration = Duration::from_secs(60);

struct Setup {
    dir: Scratch,
    rabbit: Rabbit,
    queue: String,
    php: PhpHandler,
}

async fn setup(name: &str) -> Setup {
    let dir = Scratch::new(name);
    let mut rabbit = Rabbit::connect().await;
    let queue = unique(name);
    rabbit.queue(&queue).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 4).await;
    Setup { dir, rabbit, queue, php }
}

#[tokio::test(flavor = "multi_thread")]
async fn acks_2xx_and_sends_cloudevents_headers() {
    let s = setup("ack").await;
    let yaml = config(&s.queue, &[s.php.url()], "", "");
    let mut router = Router::start(&s.dir, &yaml).await;
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let msgs = batch("ok", 50, |_| vec![("traceparent", trace.to_string()), ("tenant", "acme".to_string())]);
    s.rabbit.publish(&s.queue, &msgs).await;

    wait_for("50 handled", WAIT, || async { seen(&s.php.log).len() >= 50 }).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0), "clean exit on SIGTERM");

    let got = by_id(&seen(&s.php.log));
    assert_eq!(got.len(), 50, "every message once");
    assert!(got.values().all(|v| v.len() == 1 && v[0].status == 200), "no retries of successful messages");
    let h = &got["ok-7"][0].headers;
    assert_eq!(h["ce-id"], "ok-7");
    assert_eq!(h["ce-specversion"], "1.0");
    assert!(h["ce-source"].ends_with(&s.queue), "ce-source {:?}", h["ce-source"]);
    assert!(!h["ce-source"].contains("guest"), "no credentials in ce-source");
    assert_eq!(h["ce-type"], s.queue, "routing key as type when the message has none");
    assert!(h.contains_key("ce-time"));
    assert_eq!(h["traceparent"], trace);
    assert_eq!(h["x-message-header-tenant"], "acme");
    assert_eq!(h["x-router-attempt"], "1");
    assert_eq!(h["x-router-route"], "work");
    assert_eq!(h["x-router-subscription"], "main");
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(s.rabbit.count(&s.queue).await, 0, "all acked: nothing back in the queue after exit");
    assert_eq!(s.rabbit.count(&format!("{}.dlq", s.queue)).await, 0);
    s.rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_5xx_with_backoff_then_dead_letters_with_every_header() {
    let s = setup("fail").await;
    let yaml = config(&s.queue, &[s.php.url()], "", "");
    let router = Router::start(&s.dir, &yaml).await;
    let dlq = format!("{}.dlq", s.queue);
    s.rabbit.publish(&s.queue, &[("doomed".into(), b"\x00\xffbinary".to_vec(), vec![("behave", "fail".into())])]).await;
    s.rabbit.publish(&s.queue, &[("flaky".into(), b"{}".to_vec(), vec![("behave", "fail-until:3".into())])]).await;

    wait_for("dead letter", WAIT, || async { s.rabbit.count(&dlq).await == 1 }).await;
    wait_for("flaky handled", WAIT, || async { seen(&s.php.log).iter().any(|x| x.id == "flaky" && x.status == 200) })
        .await;

    let got = by_id(&seen(&s.php.log));
    let doomed: Vec<u32> = got["doomed"].iter().map(|x| x.attempt).collect();
    assert_eq!(doomed, vec![1, 2, 3], "max_attempts 3");
    let t: Vec<f64> = got["doomed"].iter().map(|x| x.time).collect();
    // Policy: 200 ms, then 400 ms (no jitter). Allow for broker TTL granularity.
    assert!(t[1] - t[0] >= 0.19, "first backoff {:.3}s", t[1] - t[0]);
    assert!(t[2] - t[1] >= 0.39, "second backoff {:.3}s", t[2] - t[1]);
    assert!(t[2] - t[1] > t[1] - t[0], "backoff grows");
    let flaky: Vec<(u32, u16)> = got["flaky"].iter().map(|x| (x.attempt, x.status)).collect();
    assert_eq!(flaky, vec![(1, 500), (2, 500), (3, 200)], "retried until it succeeded");

    let dead = s.rabbit.drain(&dlq).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.id, "doomed");
    assert_eq!(d.body, b"\x00\xffbinary", "body untouched");
    assert_eq!(d.headers["x-router-reason"], "max attempts exhausted (3 of 3)");
    assert_eq!(d.headers["x-router-attempts"], "3");
    assert_eq!(d.headers["x-router-last-error"], "HTTP 500: handler failed on purpose");
    assert_eq!(d.headers["x-router-original-exchange"], "");
    assert_eq!(d.headers["x-router-original-routing-key"], s.queue);
    assert_eq!(d.headers["x-router-original-queue"], s.queue);
    assert_eq!(d.headers["x-router-route"], "work");
    assert_eq!(d.headers["x-router-handler"], "php");
    assert_eq!(d.headers["behave"], "fail", "original headers kept");
    let (first, last) = (&d.headers["x-router-first-failure"], &d.headers["x-router-last-failure"]);
    assert!(first < last, "first failure {first} before last {last}");
    assert_eq!(s.rabbit.count(&s.queue).await, 0);
    assert!(router
        .metrics()
        .await
        .contains("router_messages_dead_lettered_total{handler=\"php\",route=\"work\",subscription=\"main\"} 1"));
    s.rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_other_4xx_at_once_and_unroutable_messages() {
    let s = setup("reject").await;
    let yaml = config(&s.queue, &[s.php.url()], "", "")
        .replace("match: { routing_key:", "match: { headers: { kind: order }, routing_key:");
    let _router = Router::start(&s.dir, &yaml).await;
    let dlq = format!("{}.dlq", s.queue);
    s.rabbit
        .publish(
            &s.queue,
            &[
                ("poison".into(), b"{}".to_vec(), vec![("behave", "reject".into()), ("kind", "order".into())]),
                ("stray".into(), b"{}".to_vec(), vec![("kind", "invoice".into())]),
            ],
        )
        .await;
    wait_for("two dead letters", WAIT, || async { s.rabbit.count(&dlq).await == 2 }).await;
    let dead: BTreeMap<String, Got> = s.rabbit.drain(&dlq).await.into_iter().map(|g| (g.id.clone(), g)).collect();
    assert_eq!(dead["poison"].headers["x-router-reason"], "rejected by handler: HTTP 422: invalid order payload");
    assert_eq!(dead["poison"].headers["x-router-attempts"], "1");
    assert!(dead["stray"].headers["x-router-reason"].starts_with("no route matched"), "{:?}", dead["stray"].headers);
    assert!(!dead["stray"].headers.contains_key("x-router-route"));
    let attempts = seen(&s.php.log);
    assert_eq!(attempts.len(), 1, "poison tried once, stray never: {attempts:?}");
    s.rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn honours_retry_after_on_429() {
    let s = setup("busy").await;
    // Policy delay 200 ms; the handler asks for 2 s.
    let yaml = config(&s.queue, &[s.php.url()], "", "");
    let _router = Router::start(&s.dir, &yaml).await;
    s.rabbit.publish(&s.queue, &[("busy".into(), b"{}".to_vec(), vec![("behave", "busy:2".into())])]).await;
    wait_for("second attempt succeeds", WAIT, || async { seen(&s.php.log).iter().any(|x| x.status == 200) }).await;
    let got = seen(&s.php.log);
    assert_eq!(got.iter().map(|x| (x.attempt, x.status)).collect::<Vec<_>>(), vec![(1, 429), (2, 200)]);
    let waited = got[1].time - got[0].time;
    assert!(waited >= 1.95, "Retry-After: 2 honoured, waited {waited:.3}s");
    s.rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_timeouts_then_dead_letters() {
    let s = setup("slow").await;
    let yaml = config(&s.queue, &[s.php.url()], "", "").replace("timeout: 5s", "timeout: 300ms");
    let _router = Router::start(&s.dir, &yaml).await;
    let dlq = format!("{}.dlq", s.queue);
    s.rabbit.publish(&s.queue, &[("sloth".into(), b"{}".to_vec(), vec![("behave", "slow:1500".into())])]).await;
    wait_for("dead letter after timeouts", WAIT, || async { s.rabbit.count(&dlq).await == 1 }).await;
    let dead = s.rabbit.drain(&dlq).await;
    assert_eq!(dead[0].headers["x-router-attempts"], "3");
    assert!(dead[0].headers["x-router-last-error"].contains("no answer within 300ms"), "{:?}", dead[0].headers);
    wait_for("handler saw all 3 attempts", WAIT, || async { seen(&s.php.log).len() == 3 }).await;
    s.rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn balances_two_endpoints_and_loses_nothing_when_one_is_dead() {
    let s = setup("pool").await;
    let second = PhpHandler::start(&s.php.log, 4).await;
    let yaml = config(&s.queue, &[s.php.url(), second.url()], ", balance: round_robin", "");
    let mut router = Router::start(&s.dir, &yaml).await;
    s.rabbit.publish(&s.queue, &batch("lb", 200, |_| vec![])).await;
    wait_for("200 handled", WAIT, || async { seen(&s.php.log).len() >= 200 }).await;
    let per_port = |port: u16| seen(&s.php.log).iter().filter(|x| x.port == port).count();
    let (a, b) = (per_port(s.php.port), per_port(second.port));
    assert!(a >= 60 && b >= 60, "both endpoints get traffic: {a} / {b}");
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));

    // Now one endpoint is dead (nothing listens on its port).
    let dead_port = free_port();
    let queue2 = unique("pool-dead");
    let mut rabbit = Rabbit::connect().await;
    rabbit.queue(&queue2).await;
    let dead_url = format!("http://127.0.0.1:{dead_port}/");
    let yaml = config(&queue2, &[dead_url, second.url()], "", "");
    let router = Router::start(&s.dir, &yaml).await;
    let log2 = s.dir.path("handler.log");
    let before: HashSet<String> = seen(&log2).into_iter().map(|x| x.id).collect();
    rabbit.publish(&queue2, &batch("half", 200, |_| vec![])).await;
    wait_for("200 handled via the live endpoint", WAIT, || async {
        seen(&log2).iter().filter(|x| x.id.starts_with("half-") && x.status == 200).count() >= 200
    })
    .await;
    let ids: HashSet<String> = seen(&log2).into_iter().map(|x| x.id).filter(|id| !before.contains(id)).collect();
    assert_eq!(ids.len(), 200, "every message delivered once the dead endpoint is skipped");
    assert_eq!(rabbit.count(&format!("{queue2}.dlq")).await, 0, "nothing dead-lettered for a dead pod");
    let m = router.metrics().await;
    assert!(
        m.contains(&format!("router_endpoint_up{{endpoint=\"http://127.0.0.1:{dead_port}/\",handler=\"php\"}} 0")),
        "{m}"
    );
    rabbit.cleanup().await;
    s.rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_and_leaves_the_rest_queued() {
    let s = setup("drain").await;
    let yaml = config(&s.queue, &[s.php.url()], ", max_in_flight: 2", "");
    let mut router = Router::start(&s.dir, &yaml).await;
    s.rabbit.publish(&s.queue, &batch("d", 40, |_| vec![("behave", "slow:700".into())])).await;
    // PHP logs after sleeping: wait until two requests are in their sleep.
    wait_for("handler busy", WAIT, || async {
        router.metrics().await.contains("router_in_flight{subscription=\"main\"} 2")
    })
    .await;
    let code = router.terminate(Duration::from_secs(20));
    assert_eq!(code, Some(0), "graceful exit");
    let handled = seen(&s.php.log).len();
    assert!((2..40).contains(&handled), "in-flight finished, the rest untouched: {handled}");
    assert_eq!(
        s.rabbit.count(&s.queue).await as usize,
        40 - handled,
        "unhandled messages are back in the queue, handled ones acked"
    );
    assert!(router.logs().contains("draining in-flight messages"));
    s.rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_bad_messages_and_keeps_consuming() {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, ByteArray, FieldTable};
    use lapin::BasicProperties;

    let s = setup("bad").await;
    let yaml = config(&s.queue, &[s.php.url()], "", "max_body_bytes: 1000");
    let _router = Router::start(&s.dir, &yaml).await;
    let dlq = format!("{}.dlq", s.queue);
    let publish = |id: &str, body: Vec<u8>, headers: FieldTable| {
        let props = BasicProperties::default().with_message_id(id.into()).with_delivery_mode(2).with_headers(headers);
        let (ch, queue) = (s.rabbit.channel.clone(), s.queue.clone());
        async move {
            let confirm =
                ch.basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), &body, props);
            assert!(confirm.await.expect("publish").await.expect("confirm").is_ack());
        }
    };
    let mut binary = FieldTable::default();
    binary.insert("blob".into(), AMQPValue::ByteArray(ByteArray::from(vec![0xff, 0xfe, 0x00])));
    publish("undecodable", b"{}".to_vec(), binary).await;
    publish("too-large", vec![b'x'; 5000], FieldTable::default()).await;
    publish("fine", b"{}".to_vec(), FieldTable::default()).await;

    wait_for("two dead letters", WAIT, || async { s.rabbit.count(&dlq).await == 2 }).await;
    wait_for("the good message after them handled", WAIT, || async { seen(&s.php.log).iter().any(|x| x.id == "fine") })
        .await;
    let dead: BTreeMap<String, Got> = s.rabbit.drain(&dlq).await.into_iter().map(|g| (g.id.clone(), g)).collect();
    assert_eq!(
        dead["undecodable"].headers["x-router-reason"],
        "undecodable message: header \"blob\": value is not valid UTF-8 text"
    );
    assert_eq!(dead["too-large"].headers["x-router-reason"], "message too large: 5000 bytes (max_body_bytes is 1000)");
    assert_eq!(dead["too-large"].body.len(), 5000, "dead letter keeps the whole body");
    let handled: Vec<String> = seen(&s.php.log).into_iter().map(|x| x.id).collect();
    assert_eq!(handled, vec!["fine".to_string()], "bad messages never reach the handler");
    s.rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn several_subscriptions_share_one_connection() {
    let s = setup("multi").await;
    let mut rabbit = Rabbit::connect().await;
    let other = unique("multi-b");
    rabbit.queue(&other).await;
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:{{admin}}" }}
transports:
  rabbit: {{ type: amqp, url: "{url}" }}
handlers:
  php: {{ endpoints: ["{php}"] }}
subscriptions:
  a: {{ transport: rabbit, queue: {qa} }}
  b: {{ transport: rabbit, queue: {qb}, default_handler: php }}
routes:
  - {{ name: from-a, match: {{ subscription: a }}, handler: php }}
"#,
        url = amqp_url(),
        php = s.php.url(),
        qa = s.queue,
        qb = other
    );
    let router = Router::start(&s.dir, &yaml).await;
    s.rabbit.publish(&s.queue, &batch("a", 30, |_| vec![])).await;
    rabbit.publish(&other, &batch("b", 30, |_| vec![])).await;
    wait_for("60 handled", WAIT, || async { seen(&s.php.log).len() >= 60 }).await;
    let got = seen(&s.php.log);
    let subs = |prefix: &str| {
        got.iter()
            .filter(|x| x.id.starts_with(prefix))
            .map(|x| x.headers["x-router-subscription"].clone())
            .collect::<HashSet<_>>()
    };
    assert_eq!(subs("a-"), HashSet::from(["a".to_string()]));
    assert_eq!(subs("b-"), HashSet::from(["b".to_string()]));
    let routes: HashSet<String> =
        got.iter().filter(|x| x.id.starts_with("b-")).map(|x| x.headers["x-router-route"].clone()).collect();
    assert_eq!(routes, HashSet::from(["default".to_string()]), "b has no route of its own: its default handler");
    let m = router.metrics().await;
    assert!(m.contains("router_subscription_connected{subscription=\"a\"} 1"), "{m}");
    assert!(m.contains("router_subscription_connected{subscription=\"b\"} 1"), "{m}");
    assert_eq!(
        router.logs().matches("connected transport=rabbit").count(),
        1,
        "one connection for both subscriptions:\n{}",
        router.logs()
    );
    rabbit.cleanup().await;
    s.rabbit.cleanup().await;
}
