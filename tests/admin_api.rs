//! The admin API against a router with a RabbitMQ, a Redis and a Kafka subscription:
//! status and subscriptions with their depths at the broker, pause (nothing new is
//! handled, nothing acked unhandled), drain (what the broker pushed goes back), resume;
//! dead letters listed, shown, replayed to the handler and purged; bad input refused
//! with a clear error that changed nothing. And who may call it: the token, loopback,
//! other origins, and no credential in any answer, metric or log line.

use std::time::Duration;

use e2e::admin::{call, get, post, subscription, wait_depth, ThreeBrokers};
use e2e::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// Two the handler rejects (dead letters) and three it handles.
fn mix(prefix: &str) -> Vec<Outgoing> {
    let mut all = batch(&format!("{prefix}-bad"), 2, |_| vec![("behave", "reject".to_string())]);
    all.extend(batch(&format!("{prefix}-ok"), 3, |_| Vec::new()));
    all
}

async fn state(b: &ThreeBrokers, name: &str) -> String {
    subscription(&b.router, name).await["state"].as_str().unwrap_or_default().to_string()
}

/// Pause: a batch published meanwhile is not handled and waits at the broker; drain
/// then stops the consumer; resume handles every one.
async fn pause_drain_resume(b: &mut ThreeBrokers, name: &str) {
    let (status, v) = post(&b.router, &format!("/api/subscriptions/{name}/pause"), None).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("paused")), "{v}");
    let held = batch(&format!("{name}-held"), 5, |_| Vec::new());
    b.publish(name, &held).await;
    if name != "orders" {
        // Redis counts what the group read and has not acked; Kafka what the group
        // has not committed: all five wait. (RabbitMQ has pushed them to the paused
        // consumer, unacked: its ready count says 0 until a drain hands them back.)
        wait_depth(&b.router, name, "backlog", 5).await;
    }
    let (status, v) = post(&b.router, &format!("/api/subscriptions/{name}/drain"), None).await;
    assert_eq!(status, 200, "{v}");
    wait_for(&format!("{name} drained"), WAIT, || async { state(b, name).await == "drained" }).await;
    wait_depth(&b.router, name, "backlog", 5).await;
    let handled: usize = held.iter().map(|(id, _, _)| b.handled(id)).sum();
    assert_eq!(handled, 0, "{name}: nothing published while paused reached the handler");
    assert_eq!(subscription(&b.router, name).await["in_flight"], 0);
    let (status, v) = post(&b.router, &format!("/api/subscriptions/{name}/resume"), None).await;
    assert_eq!(status, 200, "{v}");
    wait_for(&format!("{name}: the held batch handled after resume"), WAIT, || async {
        held.iter().all(|(id, _, _)| b.handled(id) == 1)
    })
    .await;
    wait_for(&format!("{name} running"), WAIT, || async { state(b, name).await == "running" }).await;
    wait_depth(&b.router, name, "backlog", 0).await;
}

/// The two dead letters of `name`: listed, counted, shown, one replayed (the handler
/// gets it again), bad input refused. Returns the ids listed.
async fn dead_letters(b: &ThreeBrokers, name: &str) -> Vec<String> {
    wait_depth(&b.router, name, "dead_letters", 2).await;
    let base = format!("/api/subscriptions/{name}/dead-letters");
    let list = get(&b.router, &base).await;
    let letters = list["dead_letters"].as_array().expect("a list").clone();
    assert_eq!(letters.len(), 2, "{list}");
    assert_eq!(list["more"], false);
    let first = &letters[0];
    assert_eq!(first["reason"], "rejected by handler: HTTP 422: invalid order payload", "{first}");
    assert_eq!(first["route"], "work");
    assert!(first["message_id"].as_str().is_some_and(|id| id.starts_with(&format!("{name}-bad-"))), "{first}");
    assert_eq!(first["router_headers"]["x-router-subscription"], name);
    let ids: Vec<String> = letters.iter().map(|d| d["id"].as_str().unwrap_or_default().to_string()).collect();

    let stats = get(&b.router, &format!("{base}/stats")).await;
    assert_eq!(stats["count"], 2, "{stats}");
    assert_eq!(
        stats["by_reason"][0],
        json!({ "name": "rejected by handler: HTTP 422: invalid order payload", "count": 2 })
    );
    let one = get(&b.router, &format!("{base}/{}", encode(&ids[0]))).await;
    assert_eq!(one["id"], ids[0].as_str(), "an id with a slash is one path segment once encoded");
    assert_eq!(one["body"], first["body"]);

    // Bad input: a clear error, nothing changed.
    let refused = [
        ("GET", format!("{base}?reason=(unclosed"), None, 400, "reason: not a regular expression"),
        ("GET", format!("{base}/no-such-id"), None, 404, "no dead letter \"no-such-id\""),
        ("POST", format!("{base}/replay"), Some(json!({})), 400, "say which dead letters to replay"),
        ("POST", format!("{base}/replay"), Some(json!({ "route": "nope" })), 404, "matches; nothing changed"),
        ("POST", format!("{base}/replay"), Some(json!({ "ids": ["bad\u{1}id"] })), 400, "is not a dead-letter id"),
        ("POST", format!("{base}/replay"), Some(json!({ "all": true, "rate": -1 })), 400, "above 0"),
        ("POST", format!("{base}/replay"), Some(json!({ "all": true, "bogus": 1 })), 400, "unknown field `bogus`"),
        ("GET", "/api/subscriptions/nope/dead-letters".to_string(), None, 404, "no subscription \"nope\""),
        ("POST", format!("/api/subscriptions/{name}/explode"), None, 404, "no action \"explode\""),
    ];
    for (method, path, body, want, says) in refused {
        let (status, v) = call(&b.router, method, &path, None, &[], body).await;
        assert_eq!(status, want, "{method} {path}: {v}");
        assert!(v["error"].as_str().unwrap_or_default().contains(says), "{method} {path}: {v}");
    }
    assert_eq!(get(&b.router, &format!("{base}/stats")).await["count"], 2, "refusals changed nothing");

    // Replay one: the handler gets it again (and rejects it again: a new dead letter).
    let message_id = first["message_id"].as_str().unwrap_or_default().to_string();
    let before = b.handled(&message_id);
    let dry = post(&b.router, &format!("{base}/replay"), Some(json!({ "ids": [ids[0]], "dry_run": true }))).await;
    assert_eq!(dry, (200, json!({ "subscription": name, "dry_run": true, "matching": 1 })));
    let (status, v) = post(&b.router, &format!("{base}/replay"), Some(json!({ "ids": [ids[0]] }))).await;
    assert_eq!((status, &v["replayed"]), (200, &json!(1)), "{v}");
    wait_for(&format!("{name}: the replayed dead letter reaches the handler"), WAIT, || async {
        b.handled(&message_id) > before
    })
    .await;
    let replayed = seen(&b.php.log).into_iter().rfind(|s| s.id == message_id).expect("seen");
    assert_eq!(replayed.attempt, 1, "a replay starts at attempt 1");
    ids
}

fn encode(id: &str) -> String {
    id.replace('%', "%25").replace('/', "%2F")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_shows_controls_and_reworks_every_broker() {
    let dir = Scratch::new("admin-api");
    let mut b = ThreeBrokers::start(&dir, "").await;
    for name in ["orders", "events", "clicks"] {
        b.publish(name, &mix(name)).await;
    }
    let status = get(&b.router, "/api/status").await;
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["config_hash"].as_str().is_some_and(|h| h.starts_with("sha256:") && h.len() == 71), "{status}");
    assert_eq!(status["subscriptions"], 3);
    assert!(status["uptime_seconds"].is_u64());

    for name in ["orders", "events", "clicks"] {
        dead_letters(&b, name).await;
        pause_drain_resume(&mut b, name).await;
    }
    let all = get(&b.router, "/api/subscriptions").await;
    let subs = all["subscriptions"].as_array().expect("a list");
    assert_eq!(subs.len(), 3);
    for s in subs {
        assert!(s["totals"]["acked"].as_u64().unwrap_or(0) >= 8, "three handled, five held: {s}");
        assert!(s["totals"]["dead_lettered"].as_u64().unwrap_or(0) >= 3, "{s}");
        assert!(s["rates"]["received"].is_number() && s["depths"]["at"].is_string(), "{s}");
    }
    let metrics = b.router.metrics().await;
    for line in [
        "router_backlog_messages{subscription=\"orders\"} 0",
        "router_subscription_paused{subscription=\"events\"} 0",
        "router_dead_letters{subscription=\"clicks\"} 3",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    let handlers = get(&b.router, "/api/handlers").await;
    assert_eq!(handlers["handlers"][0]["name"], "php");
    assert_eq!(handlers["handlers"][0]["circuit"], "closed");
    assert_eq!(handlers["handlers"][0]["endpoints"][0]["up"], true, "{handlers}");

    // Purge: RabbitMQ and Redis delete; a Kafka log cannot, and says so.
    wait_depth(&b.router, "orders", "dead_letters", 2).await;
    let (status, v) =
        post(&b.router, "/api/subscriptions/orders/dead-letters/purge", Some(json!({ "all": true }))).await;
    assert_eq!((status, &v["purged"]), (200, &json!(2)), "{v}");
    wait_depth(&b.router, "orders", "dead_letters", 0).await;
    let (status, v) =
        post(&b.router, "/api/subscriptions/events/dead-letters/purge", Some(json!({ "reason": "422" }))).await;
    assert_eq!((status, &v["purged"]), (200, &json!(2)), "{v}");
    let (status, v) =
        post(&b.router, "/api/subscriptions/clicks/dead-letters/purge", Some(json!({ "all": true }))).await;
    assert_eq!(status, 409, "{v}");
    assert!(v["error"].as_str().unwrap_or_default().contains("a Kafka topic is a log"), "{v}");

    // A replay whose destination is gone is refused by the broker: the dead letter stays.
    b.publish("orders", &batch("orders-late", 1, |_| vec![("behave", "reject".to_string())])).await;
    wait_depth(&b.router, "orders", "dead_letters", 1).await;
    let (status, v) = post(&b.router, "/api/subscriptions/orders/drain", None).await;
    assert_eq!(status, 200, "{v}");
    wait_for("orders drained", WAIT, || async { state(&b, "orders").await == "drained" }).await;
    b.rabbit.delete_queue(&b.queue).await;
    let (status, v) =
        post(&b.router, "/api/subscriptions/orders/dead-letters/replay", Some(json!({ "all": true }))).await;
    assert_eq!(status, 502, "{v}");
    assert!(v["error"].as_str().unwrap_or_default().contains("does the destination queue exist?"), "{v}");
    assert_eq!(
        b.rabbit.count(&format!("{}.dlq", b.queue)).await,
        1,
        "the dead letter stays when its replay is refused"
    );

    assert_eq!(b.router.terminate(Duration::from_secs(20)), Some(0));
    b.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_token_opens_the_api_and_no_secret_shows_anywhere() {
    let dir = Scratch::new("admin-auth");
    let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
    let mut rabbit = Rabbit::connect().await;
    let queue = unique("admin-auth");
    rabbit.queue(&queue).await;
    let php = PhpHandler::start(&dir.path("handler.log"), 2).await;
    // Credentials in the handler URL: never shown (php -S ignores them).
    let endpoint = php.url().replace("http://", "http://deliver:hunter2-secret@");
    let listen = "admin: { listen: \"127.0.0.1:{admin}\" }";
    let yaml = config(&queue, &[endpoint], "", "")
        .replace(listen, &format!("admin: {{ listen: \"127.0.0.1:{{admin}}\", token: \"{token}\" }}"));
    let yaml_path = dir.path("auth.yaml");
    let mut router = Router::start(&dir, &yaml).await;
    rabbit.publish(&queue, &batch("auth", 3, |_| Vec::new())).await;
    wait_for("handled", WAIT, || async { seen(&php.log).len() == 3 }).await;

    let mut answers = String::new();
    // Without the token, or with another: 401, and nothing changes.
    for t in [None, Some("wrong-token-0123456789")] {
        let (status, v) = call(&router, "GET", "/api/subscriptions", t, &[], None).await;
        assert_eq!(status, 401, "{v}");
        assert!(v["error"].as_str().unwrap_or_default().contains("Authorization: Bearer"), "{v}");
        let (status, _) = call(&router, "POST", "/api/subscriptions/main/pause", t, &[], None).await;
        assert_eq!(status, 401);
    }
    // A page of another origin cannot change anything, even with a token it stole.
    let evil = [("Origin", "https://evil.example")];
    let (status, v) = call(&router, "POST", "/api/subscriptions/main/pause", Some(&token), &evil, None).await;
    assert_eq!(status, 403, "{v}");
    let (status, v) = call(&router, "GET", "/api/subscriptions/main", Some(&token), &[], None).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("running")), "refused calls changed nothing: {v}");
    answers.push_str(&v.to_string());
    // With the token: every call.
    for path in ["/api/status", "/api/subscriptions", "/api/handlers", "/api/subscriptions/main/dead-letters"] {
        let (status, v) = call(&router, "GET", path, Some(&token), &[], None).await;
        assert_eq!(status, 200, "{path}: {v}");
        answers.push_str(&v.to_string());
    }
    let (status, v) = call(&router, "POST", "/api/subscriptions/main/pause", Some(&token), &[], None).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("paused")), "{v}");
    answers.push_str(&v.to_string());
    // Probes, metrics and the page itself carry no data worth a token.
    for path in ["/healthz", "/readyz", "/metrics", "/"] {
        let (status, body) = router.admin_get(path).await.expect("answers");
        assert_eq!(status, 200, "{path}");
        answers.push_str(&body);
    }
    let logs = router.logs();
    for secret in [token.as_str(), "hunter2-secret", "guest:guest@"] {
        assert!(!answers.contains(secret), "{secret:?} in an answer:\n{answers}");
        assert!(!logs.contains(secret), "{secret:?} in the log:\n{logs}");
    }
    assert!(answers.contains("http://127.0.0.1:"), "the endpoint is shown, without its credentials: {answers}");
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));

    // Beyond loopback without a token: refused before anything starts.
    let open = yaml.replace(&format!(", token: \"{token}\""), "").replace("127.0.0.1:{admin}", "0.0.0.0:9999");
    std::fs::write(&yaml_path, open).expect("write config");
    let out = std::process::Command::new(router_bin())
        .args(["validate", "--config"])
        .arg(&yaml_path)
        .output()
        .expect("validate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("admin.listen: 0.0.0.0:9999 is reachable from other machines: set admin.token"),
        "{stderr}"
    );
    rabbit.cleanup().await;
}
