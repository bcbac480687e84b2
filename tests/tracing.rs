//! Tracing (README "Tracing"): the daemon's spans as a real OTLP/HTTP receiver gets
//! them (support/otlp.rs), for messages handled by a real PHP handler (`php -S`) from
//! a real RabbitMQ, Redis and Kafka (exported over OTLP/gRPC to a Python grpcio
//! receiver there): the producer's trace continued through a retry to the ack,
//! a dead letter's trace ending in its reason, the context each handler request
//! carries, and the trace ids in the log.

use std::time::Duration;

use e2e::otlp::{Receiver, Span, KIND_CLIENT, KIND_CONSUMER, STATUS_ERROR};
use e2e::*;

const WAIT: Duration = Duration::from_secs(60);

fn tracing_section(receiver: &Receiver) -> String {
    format!(
        "tracing: {{ enabled: true, endpoint: \"{}\", sampling: 1.0, service_name: e2e-router }}\n",
        receiver.endpoint
    )
}

fn one<'a>(spans: &'a [Span], what: &str, pred: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| pred(s)).collect();
    assert_eq!(found.len(), 1, "one {what} span expected; trace:\n{spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn continues_the_producers_trace_through_a_retry_to_the_ack() {
    let dir = Scratch::new("trace-retry");
    let receiver = Receiver::start().await;
    let mut rabbit = Rabbit::connect().await;
    let queue = unique("trace-retry");
    rabbit.queue(&queue).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 2).await;
    let yaml = config(&queue, &[php.url()], "", "") + &tracing_section(&receiver);
    let mut router = Router::start(&dir, &yaml).await;

    let (trace_id, producer) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("00-{trace_id}-{producer}-01");
    rabbit
        .publish(
            &queue,
            &[(
                "flaky".into(),
                b"{}".to_vec(),
                vec![("traceparent", traceparent.clone()), ("behave", "fail-until:2".into())],
            )],
        )
        .await;
    wait_for("handled at the second attempt", WAIT, || async {
        seen(&php.log).iter().any(|x| x.id == "flaky" && x.status == 200)
    })
    .await;
    // The exporter batches: what is still buffered is flushed at exit.
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0), "clean exit on SIGTERM");
    let spans = receiver
        .wait("the trace", Duration::from_secs(10), |s| s.iter().filter(|x| x.trace_id == trace_id).count() >= 6)
        .await;
    let spans: Vec<Span> = spans.into_iter().filter(|s| s.trace_id == trace_id).collect();
    assert_eq!(spans.len(), 6, "2 consumer, 2 attempt, retry and ack spans; got:\n{spans:#?}");
    assert!(spans.iter().all(|s| s.service == "e2e-router"), "service.name from the config");

    let first = one(&spans, "first consumer", |s| s.kind == KIND_CONSUMER && s.attr("router.attempt") == "1");
    let second = one(&spans, "second consumer", |s| s.kind == KIND_CONSUMER && s.attr("router.attempt") == "2");
    for p in [first, second] {
        assert_eq!(p.name, format!("process {queue}"));
        assert_eq!(p.attr("messaging.system"), "rabbitmq");
        assert_eq!(p.attr("messaging.operation.type"), "process");
        assert_eq!(p.attr("messaging.destination.name"), queue);
        assert_eq!(p.attr("messaging.message.id"), "flaky");
        assert_eq!(p.attr("messaging.destination.subscription.name"), "main");
    }
    assert_eq!(first.parent_id, producer, "the producer's span is the parent of the first delivery");
    assert_eq!(second.parent_id, first.span_id, "the retry copy carries the first delivery's context");

    let attempt1 = one(&spans, "first attempt", |s| s.name == "deliver php" && s.attr("router.attempt") == "1");
    let attempt2 = one(&spans, "second attempt", |s| s.name == "deliver php" && s.attr("router.attempt") == "2");
    assert_eq!((attempt1.kind, attempt1.parent_id.as_str()), (KIND_CLIENT, first.span_id.as_str()));
    assert_eq!((attempt2.kind, attempt2.parent_id.as_str()), (KIND_CLIENT, second.span_id.as_str()));
    assert_eq!(attempt1.attr("http.response.status_code"), "500");
    assert_eq!(attempt1.attr("router.outcome"), "retry");
    assert_eq!(attempt1.status, STATUS_ERROR);
    assert_eq!(attempt2.attr("http.response.status_code"), "200");
    assert_eq!(attempt2.attr("router.outcome"), "ack");
    for a in [attempt1, attempt2] {
        assert_eq!(a.attr("router.target"), "http");
        assert_eq!(a.attr("router.handler"), "php");
        assert_eq!(a.attr("router.route"), "work");
        assert!(a.attr("server.address").contains(&php.port.to_string()), "endpoint {:?}", a.attr("server.address"));
    }

    let retry = one(&spans, "retry", |s| s.name == "retry");
    assert_eq!(retry.parent_id, first.span_id);
    assert_eq!(retry.attr("messaging.operation.type"), "settle");
    assert_eq!(retry.attr("router.retry.delay_ms"), "200");
    assert_eq!(retry.attr("router.next_attempt"), "2");
    assert_eq!(retry.attr("router.last_error"), "HTTP 500: not yet");
    let ack = one(&spans, "ack", |s| s.name == "ack");
    assert_eq!(ack.parent_id, second.span_id);

    // Each request carried its attempt's span as `traceparent`; the message's own
    // header (the retry copy's: the first delivery) still travels as a message header.
    let got = by_id(&seen(&php.log));
    let requests = &got["flaky"];
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].headers["traceparent"], format!("00-{trace_id}-{}-01", attempt1.span_id));
    assert_eq!(requests[1].headers["traceparent"], format!("00-{trace_id}-{}-01", attempt2.span_id));
    assert_eq!(requests[0].headers["x-message-header-traceparent"], traceparent);
    assert_eq!(requests[1].headers["x-message-header-traceparent"], format!("00-{trace_id}-{}-01", first.span_id));

    // A log line written inside a delivery names its trace and innermost span (the
    // retry is logged while it is being settled).
    let logs = router.logs();
    let line = logs.lines().find(|l| l.contains("attempt failed; retrying")).expect("the retry is logged");
    assert!(line.ends_with(&format!("trace_id={trace_id} span_id={}", retry.span_id)), "{line}");
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letters_trace_ends_in_its_reason_and_the_dead_letter_carries_it() {
    let dir = Scratch::new("trace-dead");
    let receiver = Receiver::start().await;
    let mut rabbit = Rabbit::connect().await;
    let queue = unique("trace-dead");
    rabbit.queue(&queue).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 2).await;
    let yaml = config(&queue, &[php.url()], "", "").replace("admin:", "log: { format: json }\nadmin:")
        + &tracing_section(&receiver);
    let router = Router::start(&dir, &yaml).await;
    let dlq = format!("{queue}.dlq");
    // No traceparent: the router starts the trace.
    rabbit.publish(&queue, &[("doomed".into(), b"{}".to_vec(), vec![("behave", "fail".into())])]).await;
    wait_for("dead letter", WAIT, || async { rabbit.count(&dlq).await == 1 }).await;

    // Spans come in batches (every 5 s): wait for the dead-letter span.
    let spans = receiver
        .wait("the dead-letter span", Duration::from_secs(30), |s| s.iter().any(|x| x.name == "dead_letter"))
        .await;
    let dead = one(&spans, "dead_letter", |s| s.name == "dead_letter");
    let trace_id = dead.trace_id.clone();
    let spans = receiver
        .wait("the whole trace", Duration::from_secs(30), |s| s.iter().filter(|x| x.trace_id == trace_id).count() >= 9)
        .await;
    let spans: Vec<Span> = spans.into_iter().filter(|s| s.trace_id == trace_id).collect();
    let consumers: Vec<&Span> = spans.iter().filter(|s| s.kind == KIND_CONSUMER).collect();
    assert_eq!(consumers.len(), 3, "three deliveries (max_attempts 3); trace:\n{spans:#?}");
    let root = one(&spans, "root", |s| s.parent_id.is_empty());
    assert_eq!(root.attr("router.attempt"), "1", "the first delivery starts the trace");
    let last = one(&spans, "last consumer", |s| s.kind == KIND_CONSUMER && s.attr("router.attempt") == "3");
    assert_eq!(dead.parent_id, last.span_id);
    assert_eq!(dead.status, STATUS_ERROR);
    assert_eq!(last.status, STATUS_ERROR, "a dead-lettered delivery is an error");
    assert_eq!(dead.attr("router.reason"), "max attempts exhausted (3 of 3)");
    assert_eq!(dead.attr("router.last_error"), "HTTP 500: handler failed on purpose");
    assert_eq!(dead.attr("router.attempts"), "3");
    assert_eq!(spans.iter().filter(|s| s.name == "retry").count(), 2);
    assert_eq!(spans.iter().filter(|s| s.name == "deliver php").count(), 3);

    // The dead letter carries the last delivery's context; replayed, it starts a trace
    // of its own whose first consumer span links back to that delivery.
    let (code, answer) = e2e::admin::post(
        &router,
        "/api/subscriptions/main/dead-letters/replay",
        Some(serde_json::json!({"all": true})),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    let spans = receiver
        .wait("the replayed copy's consumer span", Duration::from_secs(30), |s| {
            s.iter().any(|x| x.kind == KIND_CONSUMER && !x.links.is_empty())
        })
        .await;
    let replayed = one(&spans, "replayed consumer", |s| s.kind == KIND_CONSUMER && !s.links.is_empty());
    assert_eq!(
        replayed.links,
        [(trace_id.clone(), last.span_id.clone())],
        "linked to the delivery that dead-lettered it"
    );
    assert_ne!(replayed.trace_id, trace_id, "a trace of its own");
    assert!(replayed.parent_id.is_empty());
    assert_eq!(replayed.attr("router.attempt"), "1");
    wait_for("dead-lettered again", WAIT, || async { rabbit.count(&dlq).await == 1 }).await;
    let letters = rabbit.drain(&dlq).await;
    assert!(
        letters[0].headers["traceparent"].starts_with(&format!("00-{}-", replayed.trace_id)),
        "the replayed copy's retries and dead letter continue its new trace: {:?}",
        letters[0].headers
    );

    // JSON logs: the ids as two more keys of the line.
    let logs = router.logs();
    let line = logs.lines().find(|l| l.contains("dead-lettering")).expect("the dead letter is logged");
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
    assert_eq!(v["trace_id"], trace_id.as_str(), "{line}");
    assert_eq!(v["span_id"], dead.span_id.as_str(), "{line}");
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_deliveries_record_the_stream_entry() {
    let dir = Scratch::new("trace-redis");
    let receiver = Receiver::start().await;
    let mut redis = Redis::connect().await;
    let stream = unique("trace-redis");
    let group = "router";
    let php = PhpHandler::start(&dir.path("handler.log"), 2).await;
    let yaml = redis_config(&[&stream], group, "c1", &[php.url()], "") + &tracing_section(&receiver);
    let mut router = Router::start(&dir, &yaml).await;
    let (trace_id, producer) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let entry = redis
        .xadd(
            &stream,
            &[
                ("body", b"{}"),
                ("message_id", b"r-1"),
                ("TraceParent", format!("00-{trace_id}-{producer}-01").as_bytes()),
            ],
        )
        .await;
    redis.wait_acked(&stream, group, WAIT).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    let spans = receiver
        .wait("the trace", Duration::from_secs(10), |s| s.iter().filter(|x| x.trace_id == trace_id).count() >= 3)
        .await;
    let process = one(&spans, "consumer", |s| s.trace_id == trace_id && s.kind == KIND_CONSUMER);
    assert_eq!(process.parent_id, producer, "a Redis field of any case carries the context");
    assert_eq!(process.name, format!("process {stream}"));
    assert_eq!(process.attr("messaging.system"), "redis");
    assert_eq!(process.attr("messaging.redis.entry.id"), entry);
    one(&spans, "ack", |s| s.trace_id == trace_id && s.name == "ack" && s.parent_id == process.span_id);
    redis.cleanup(&[&stream], group).await;
}

#[tokio::test]
async fn kafka_deliveries_record_partition_and_offset_exported_over_grpc() {
    let dir = Scratch::new("trace-kafka");
    let receiver = Receiver::start_grpc(&dir.path("otlp-grpc.log")).await;
    let kafka = Kafka::connect();
    let topic = unique("trace-kafka");
    kafka.create_topic(&topic, 1).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 2).await;
    let yaml = kafka_config(&[&topic], &unique("g"), &[php.url()], "")
        + &tracing_section(&receiver).replace("sampling: 1.0", "sampling: 1.0, protocol: grpc");
    let mut router = Router::start(&dir, &yaml).await;
    let (trace_id, producer) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let parent = format!("00-{trace_id}-{producer}-01");
    kafka
        .publish(&topic, &[("k-1".into(), b"{}".to_vec(), vec![("traceparent", parent)])], |_| Some("key".into()))
        .await;
    wait_for("the handler to get it", WAIT, || async { seen(&php.log).iter().any(|s| s.id == "k-1") }).await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    let spans = receiver
        .wait("the trace", Duration::from_secs(10), |s| s.iter().filter(|x| x.trace_id == trace_id).count() >= 3)
        .await;
    let process = one(&spans, "consumer", |s| s.trace_id == trace_id && s.kind == KIND_CONSUMER);
    assert_eq!(process.parent_id, producer, "a Kafka header carries the context");
    assert_eq!(process.name, format!("process {topic}"));
    assert_eq!(process.attr("messaging.system"), "kafka");
    assert_eq!(process.attr("messaging.destination.partition.id"), "0");
    assert_eq!(process.attr("messaging.kafka.offset"), "0");
    let attempt =
        one(&spans, "attempt", |s| s.trace_id == trace_id && s.kind == KIND_CLIENT && s.name == "deliver php");
    let sent = seen(&php.log).into_iter().find(|s| s.id == "k-1").expect("logged");
    assert_eq!(
        sent.headers["traceparent"],
        format!("00-{trace_id}-{}-01", attempt.span_id),
        "the handler got the attempt span"
    );
    one(&spans, "ack", |s| s.trace_id == trace_id && s.name == "ack" && s.parent_id == process.span_id);
    kafka.delete_topics(&[&topic, &format!("{topic}.dlq")]).await;
}
