//! A bad config is refused before anything starts: `validate` and `run` exit 2 and
//! name the file, the key path and what is wrong.

use std::process::Command;

use e2e::*;

const GOOD: &str = r#"
admin: { listen: "127.0.0.1:0" }
transports:
  rabbit: { type: amqp, url: "amqp://guest:guest@127.0.0.1:5672/%2f" }
handlers:
  php: { endpoints: ["http://127.0.0.1:8080/"], timeout: 5s }
subscriptions:
  orders: { transport: rabbit, queue: orders, retry: { initial_delay: 1s } }
routes:
  - { name: all, handler: php }
"#;

fn run(cmd: &str, yaml: &str, dir: &Scratch) -> (Option<i32>, String, String) {
    let path = dir.path(&format!("{}.yaml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, yaml).expect("write config");
    let out = Command::new(router_bin())
        .args([cmd, "--config", path.to_str().unwrap_or_default()])
        .env_remove("ROUTER_TEST_SECRET")
        .output()
        .expect("run message-router");
    let stderr = String::from_utf8_lossy(&out.stderr).replace(path.to_str().unwrap_or_default(), "FILE");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

#[test]
fn valid_config_validates() {
    let dir = Scratch::new("cfg");
    let (code, stdout, stderr) = run("validate", GOOD, &dir);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("OK (1 transports, 1 handlers, 1 subscriptions, 1 routes)"), "{stdout}");
}

#[test]
fn each_mistake_names_file_path_and_problem() {
    let dir = Scratch::new("cfg");
    let cases = [
        ("unknown key", GOOD.replace("queue: orders,", "queue: orders, prefetchh: 3,"), "FILE: subscriptions.orders.prefetchh: unknown key `prefetchh`: an amqp subscription takes `queue`, `ordered`, `dead_letter` and, like every subscription, `transport`, `dedup`, `prefetch`,"),
        ("bad handler URL", GOOD.replace("http://127.0.0.1:8080/", "127.0.0.1:8080"), "FILE: handlers.php.endpoints[0]: \"127.0.0.1:8080\" must be an http:// or https:// URL"),
        ("bad broker URL", GOOD.replace("amqp://guest", "http://guest"), "FILE: transports.rabbit.url: scheme must be amqp or amqps, not \"http\""),
        ("unknown transport type", GOOD.replace("type: amqp", "type: rabbitmq"), "FILE: transports.rabbit.type: unknown variant `rabbitmq`, expected one of `amqp`, `redis`, `kafka`, `memory`"),
        ("unknown transport reference", GOOD.replace("transport: rabbit", "transport: rabbit2"), "FILE: subscriptions.orders.transport: unknown transport \"rabbit2\" (defined: rabbit)"),
        ("unknown handler reference", GOOD.replace("handler: php", "handler: phpp"), "FILE: routes[0].handler: unknown handler \"phpp\" (defined: php)"),
        ("bad duration", GOOD.replace("initial_delay: 1s", "initial_delay: 1 fortnight"), "FILE: subscriptions.orders.retry.initial_delay: invalid duration \"1 fortnight\": unknown time unit \"fortnight\""),
        ("missing env var", GOOD.replace("guest:guest", "guest:${ROUTER_TEST_SECRET}"), "FILE: transports.rabbit.url: environment variable ROUTER_TEST_SECRET is not set"),
        ("bad YAML", GOOD.replace("routes:", "routes: ["), "FILE: invalid YAML"),
        ("max_in_flight neither a number nor auto", GOOD.replace("timeout: 5s", "timeout: 5s, max_in_flight: adaptive"), "FILE: handlers.php.max_in_flight: invalid value: string \"adaptive\", expected a number of deliveries (64), `auto`, or `{ auto: { max: 256 } }`"),
        ("auto max of 0", GOOD.replace("timeout: 5s", "timeout: 5s, max_in_flight: { auto: { max: 0 } }"), "FILE: handlers.php.max_in_flight.auto.max: must be at least 1"),
        ("unknown key under auto", GOOD.replace("timeout: 5s", "timeout: 5s, max_in_flight: { auto: { min: 2 } }"), "FILE: handlers.php.max_in_flight.auto.min: unknown field `min`, expected `max`"),
    ];
    for (what, yaml, want) in cases {
        for cmd in ["validate", "run"] {
            let (code, _, stderr) = run(cmd, &yaml, &dir);
            assert_eq!(code, Some(2), "{what}: `{cmd}` must exit 2; stderr:\n{stderr}");
            assert!(stderr.contains(want), "{what}: `{cmd}` stderr lacks {want:?}:\n{stderr}");
            assert!(stderr.contains("nothing was started"), "{what}: {stderr}");
        }
    }
}

#[test]
fn max_in_flight_auto_validates() {
    let dir = Scratch::new("cfg");
    for value in ["auto", "{ auto: { max: 32 } }", "16"] {
        let yaml = GOOD.replace("timeout: 5s", &format!("timeout: 5s, max_in_flight: {value}"));
        let (code, _, stderr) = run("validate", &yaml, &dir);
        assert_eq!(code, Some(0), "max_in_flight: {value}: {stderr}");
    }
}

#[test]
fn a_bad_thread_count_is_refused_before_anything_starts() {
    for (flag, env) in [(Some("0"), None), (None, Some("two"))] {
        let mut cmd = Command::new(router_bin());
        cmd.args(["run", "--config", "/nonexistent/router.yaml"]);
        if let Some(n) = flag {
            cmd.args(["--threads", n]);
        }
        if let Some(v) = env {
            cmd.env("MESSAGE_ROUTER_THREADS", v);
        }
        let out = cmd.output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("--threads") && stderr.contains("expected a whole number of threads, 1 or more"),
            "{stderr}"
        );
    }
}

#[test]
fn missing_file_is_named() {
    let out =
        Command::new(router_bin()).args(["validate", "--config", "/nonexistent/router.yaml"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/router.yaml: cannot read: No such file"), "{stderr}");
}

#[test]
fn bad_stream_config_is_refused() {
    let dir = Scratch::new("cfg");
    let yaml = r#"
admin: { listen: "127.0.0.1:0" }
transports:
  redis: { type: redis, url: "redis://127.0.0.1:6379" }
handlers:
  php: { endpoints: ["http://127.0.0.1:8080/"], timeout: 30s }
subscriptions:
  orders: { transport: redis, queue: orders, claim_idle: 10s, dead_letter: { stream: "" } }
routes:
  - { name: all, handler: php }
"#;
    for cmd in ["validate", "run"] {
        let (code, _, stderr) = run(cmd, yaml, &dir);
        assert_eq!(code, Some(2), "`{cmd}` must exit 2; stderr:\n{stderr}");
        for want in [
            "FILE: subscriptions.orders.queue: `queue` is a setting of amqp, memory subscriptions; this one is redis",
            "FILE: subscriptions.orders.streams: list at least one stream to read",
            "FILE: subscriptions.orders.group: a redis subscription needs a consumer group name",
            "FILE: subscriptions.orders.claim_idle: 10s must be longer than the timeout of handler \"php\" (30s)",
            "FILE: subscriptions.orders.dead_letter.stream: must not be empty",
        ] {
            assert!(stderr.contains(want), "`{cmd}` stderr lacks {want:?}:\n{stderr}");
        }
    }
}

#[test]
fn a_topic_pattern_librdkafka_refuses_is_a_config_error() {
    let dir = Scratch::new("cfg");
    let yaml = r#"
admin: { listen: "127.0.0.1:0" }
transports:
  kafka: { type: kafka, brokers: ["127.0.0.1:9092"] }
handlers:
  php: { endpoints: ["http://127.0.0.1:8080/"] }
subscriptions:
  orders: { transport: kafka, topic_pattern: "([", group: billing }
routes:
  - { name: all, handler: php }
"#;
    for cmd in ["validate", "run"] {
        let (code, _, stderr) = run(cmd, yaml, &dir);
        assert_eq!(code, Some(2), "`{cmd}` must exit 2; stderr:\n{stderr}");
        let want = "FILE: subscriptions.orders.topic_pattern: \"([\" is not a regular expression librdkafka accepts";
        assert!(stderr.contains(want), "`{cmd}` stderr lacks {want:?}:\n{stderr}");
    }
    let (code, _, stderr) = run("validate", &yaml.replace("\"([\"", "\"orders\\\\..*\""), &dir);
    assert_eq!(code, Some(0), "a good pattern passes: {stderr}");
}
