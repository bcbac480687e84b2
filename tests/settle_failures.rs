//! A settlement the broker refuses is retried (the settlement, never the handler), the
//! message stays unacked meanwhile, the consumer is not torn down, the operator sees
//! it (metric, one warning a minute, `/readyz`), and the message lands once the
//! destination is back. One poison message per broker, its dead-letter destination
//! broken three ways: an AMQP exchange that does not exist, a Redis key of the wrong
//! type, a Kafka topic that does not exist; 40 other messages beside it.

use std::time::Duration;

use e2e::*;

const WAIT: Duration = Duration::from_secs(60);
const OTHERS: usize = 40;

/// The checks every broker shares while the dead letter is refused.
async fn while_refused(router: &Router, php: &PhpHandler) {
    wait_for("the others handled and the dead letter refused", WAIT, || async {
        let log = seen(&php.log);
        log.iter().filter(|s| s.id.starts_with("ok-") && s.status == 200).count() == OTHERS
            && router.metric("router_settling").await == 1.0
    })
    .await;
    // A few more tries of the settlement go by (backoff from 100 ms).
    wait_for("the settlement tried again", WAIT, || async {
        router.metric("router_settle_failures_total").await >= 4.0
    })
    .await;
    let log = seen(&php.log);
    assert_eq!(log.iter().filter(|s| s.id == "poison").count(), 1, "the handler saw the poison message once");
    assert!(by_id(&log).values().all(|v| v.len() == 1), "no other message was delivered twice");
    let (status, body) = router.admin_get("/readyz").await.expect("readyz answers");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("main: settling: 1 message(s) whose settlement the broker refuses"), "{body}");
    let warnings = router.logs().matches("settlement refused by the broker").count();
    assert_eq!(warnings, 1, "one warning per message and minute, not per try");
}

/// After the destination is back: the dead letter lands, nothing else happens.
async fn after_fixed(router: &mut Router, php: &PhpHandler) {
    wait_for("settling cleared", WAIT, || async { router.metric("router_settling").await == 0.0 }).await;
    wait_for("ready again", WAIT, || async { router.ready().await }).await;
    assert!(router.logs().contains("settled after the broker refused it earlier"));
    assert_eq!(seen(&php.log).iter().filter(|s| s.id == "poison").count(), 1, "still seen once");
    assert_eq!(router.metric("router_messages_dead_lettered_total").await, 1.0);
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
}

fn poison_and_others() -> Vec<Outgoing> {
    let mut msgs = vec![("poison".to_string(), b"{}".to_vec(), vec![("behave", "reject".to_string())])];
    msgs.extend(batch("ok", OTHERS, |_| vec![("behave", "slow:5".to_string())]));
    msgs
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_dead_letter_exchange_missing_then_declared() {
    let dir = Scratch::new("sfamqp");
    let mut rabbit = Rabbit::connect().await;
    let queue = unique("sfamqp");
    let exchange = unique("sfamqp-dlx");
    let dlq = format!("{queue}.dead");
    rabbit.queue(&queue).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 4).await;
    let yaml =
        config(&queue, &[php.url()], "", &format!("dead_letter: {{ exchange: {exchange}, routing_key: {dlq} }}"));
    let mut router = Router::start(&dir, &yaml).await;
    rabbit.publish(&queue, &poison_and_others()).await;
    while_refused(&router, &php).await;
    assert_eq!(router.logs().matches("consuming").count(), 1, "the consumer was never torn down");
    assert_eq!(rabbit.count(&queue).await, 0, "the poison message is held unacked, not requeued");

    // The operator creates the exchange and its queue.
    {
        use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
        use lapin::types::FieldTable;
        let ch = &rabbit.channel;
        ch.exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions { auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("declare exchange");
        rabbit.queue(&dlq).await;
        rabbit
            .channel
            .queue_bind(
                dlq.as_str().into(),
                exchange.as_str().into(),
                dlq.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }
    after_fixed(&mut router, &php).await;
    let dead = rabbit.drain(&dlq).await;
    assert_eq!(dead.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["poison"]);
    assert_eq!(dead[0].headers["x-router-reason"], "rejected by handler: HTTP 422: invalid order payload");
    assert_eq!(rabbit.count(&queue).await, 0);
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_dead_letter_write_fails_then_works() {
    let dir = Scratch::new("sfredis");
    let mut redis = Redis::connect().await;
    let (stream, group) = (unique("sfredis"), unique("group"));
    let dlq = format!("{stream}.dlq");
    // A key of the wrong type where the dead-letter stream goes: XADD fails.
    let _: () = redis::cmd("SET").arg(&dlq).arg("not a stream").query_async(&mut redis.conn).await.expect("SET");
    let php = PhpHandler::start(&dir.path("handler.log"), 4).await;
    let yaml = redis_config(&[&stream], &group, "c1", &[php.url()], "");
    let mut router = Router::start(&dir, &yaml).await;
    redis.publish(&stream, &poison_and_others()).await;
    while_refused(&router, &php).await;
    assert_eq!(redis.pending(&stream, &group).await, 1, "the poison entry stays pending, unacked");
    assert_eq!(router.logs().matches("consuming").count(), 1, "the consumer was never torn down");

    let _: () = redis::cmd("DEL").arg(&dlq).query_async(&mut redis.conn).await.expect("DEL");
    after_fixed(&mut router, &php).await;
    let dead = redis.entries(&dlq).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].text("message_id"), "poison");
    assert_eq!(redis.pending(&stream, &group).await, 0);
    redis.cleanup(&[&stream], &group).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_dead_letter_topic_missing_then_created() {
    let dir = Scratch::new("sfkafka");
    let kafka = Kafka::connect();
    let (topic, group) = (unique("sfkafka"), unique("group"));
    let dlq = unique("sfkafka-dead");
    kafka.create_topic(&topic, 1).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 4).await;
    // declare: false, so the router does not create the dead-letter topic itself
    // (the retry topic is made here for the same reason).
    kafka.create_topic(&format!("{group}.retry"), 1).await;
    let yaml = kafka_config(
        &[&topic],
        &group,
        &[php.url()],
        &format!("ordering: unordered\n    declare: false\n    dead_letter: {{ topic: {dlq} }}"),
    )
    .replace("properties: {", "properties: { message.timeout.ms: 3000, topic.metadata.refresh.interval.ms: 1000,");
    let mut router = Router::start(&dir, &yaml).await;
    kafka.publish(&topic, &poison_and_others(), |_| None).await;
    while_refused(&router, &php).await;
    // Nothing committed past the poison message (-1: nothing committed at all).
    assert!(kafka.committed(&group, &topic, 0) <= 0, "the poison message holds the committed offset");

    kafka.create_topic(&dlq, 1).await;
    after_fixed(&mut router, &php).await;
    let dead = kafka.read(&dlq, 1, WAIT).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].header("message_id"), "poison");
    assert_eq!(kafka.committed(&group, &topic, 0), OTHERS as i64 + 1);
    kafka.delete_topics(&[&topic, &dlq, &format!("{group}.retry")]).await;
}
