//! RabbitMQ → message-router → a gRPC handler written in Python (grpcio, its stubs
//! generated from proto/message_router/v1/handler.proto): the contract's fields and
//! headers, ACK / RETRY with a delay / REJECT, status codes mapped like HTTP statuses,
//! the deadline from the handler timeout, a dead server and a live one balanced.

use std::collections::HashSet;
use std::time::Duration;

use e2e::*;

const WAIT: Duration = Duration::from_secs(60);

fn grpc_config(queue: &str, endpoints: &[String], timeout: &str) -> String {
    let yaml = config(queue, endpoints, "", "");
    let out = yaml
        .replace("php: { endpoints: [", "php: { type: grpc, endpoints: [")
        .replace("timeout: 5s", &format!("timeout: {timeout}, circuit_breaker: {{ enabled: false }}"));
    assert!(out.contains("type: grpc"), "the handler line of the test config changed: {yaml}");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_grpc_handler_gets_the_contract_and_its_answers_are_honoured() {
    let dir = Scratch::new("grpc");
    let log = dir.path("handler.log");
    let handler = GrpcHandler::start(&log).await;
    let mut rabbit = Rabbit::connect().await;
    let queue = unique("grpc");
    rabbit.queue(&queue).await;
    // A server that is not there first: refused connections move on to the live one.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut router = Router::start(&dir, &grpc_config(&queue, &[dead, handler.url()], "2s")).await;

    let mut msgs = batch("ok", 30, |_| vec![("tenant", "acme".to_string())]);
    msgs.push(("poison".into(), b"{}".to_vec(), vec![("behave", "reject".to_string())]));
    msgs.push(("later".into(), b"{}".to_vec(), vec![("behave", "later:1000".to_string())]));
    msgs.push(("down".into(), b"{}".to_vec(), vec![("behave", "fail".to_string())]));
    msgs.push(("invalid".into(), b"{}".to_vec(), vec![("behave", "status:INVALID_ARGUMENT".to_string())]));
    msgs.push(("slow".into(), b"{}".to_vec(), vec![("behave", "slow:4000".to_string())]));
    msgs.push(("big".into(), vec![0xFFu8; 300_000], vec![]));
    rabbit.publish(&queue, &msgs).await;

    let dlq = format!("{queue}.dlq");
    wait_for("every message settled", WAIT, || async {
        let handled: HashSet<String> = seen(&log).into_iter().filter(|s| s.status == 200).map(|s| s.id).collect();
        handled.len() >= 32 && rabbit.count(&dlq).await >= 4
    })
    .await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));

    let got = by_id(&seen(&log));
    let ok = &got["ok-3"][0];
    assert_eq!(ok.attempt, 1);
    assert_eq!(ok.headers["ce-id"], "ok-3");
    assert_eq!(ok.headers["x-router-attempt"], "1");
    assert_eq!(ok.headers["x-message-header-tenant"], "acme");
    assert_eq!(ok.headers["content-type"], "application/json");
    assert!(got.iter().filter(|(id, _)| id.starts_with("ok-")).all(|(_, v)| v.len() == 1));
    assert_eq!(got["big"][0].body_sha1.len(), 40);
    let later = &got["later"];
    assert_eq!(later.iter().map(|s| s.status).collect::<Vec<_>>(), [429, 200], "RETRY then ACK");
    assert!(later[1].time - later[0].time >= 0.9, "retry_after_ms honoured ({:.2} s)", later[1].time - later[0].time);
    assert_eq!(got["poison"].len(), 1, "REJECT dead-letters at once");
    assert_eq!(got["invalid"].len(), 1, "INVALID_ARGUMENT dead-letters at once, as a 400");
    assert_eq!(got["down"].len(), 3, "UNAVAILABLE retried up to max_attempts");

    let dead_letters = rabbit.drain(&dlq).await;
    let reason = |id: &str| dead_letters.iter().find(|m| m.id == id).map(|m| m.headers["x-router-reason"].clone());
    let last = |id: &str| dead_letters.iter().find(|m| m.id == id).map(|m| m.headers["x-router-last-error"].clone());
    assert!(
        reason("poison").is_some_and(|r| r.contains("rejected by handler: invalid order payload")),
        "{:?}",
        reason("poison")
    );
    assert!(reason("invalid").is_some_and(|r| r.contains("InvalidArgument")), "{:?}", reason("invalid"));
    assert!(
        last("down").is_some_and(|r| r.contains("Unavailable") && r.contains("backend down")),
        "{:?}",
        last("down")
    );
    assert!(last("slow").is_some_and(|r| r.contains("no answer within 2s")), "the deadline: {:?}", last("slow"));
    let logs = router.logs();
    assert!(logs.contains("gRPC handler unreachable; trying another"), "{logs}");
    rabbit.cleanup().await;
}
