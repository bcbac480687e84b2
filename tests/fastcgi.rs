//! RabbitMQ → message-router → PHP-FPM over FastCGI, no web server: the HTTP
//! contract's outcomes (headers as CGI variables, Status and Retry-After), a TCP and a
//! unix-socket endpoint balanced, a PHP-FPM killed mid-stream and started again
//! (nothing lost), a pool too slow for the handler timeout. Against Debian's
//! php8.2-fpm, started by each test with its own pool config.

use std::collections::HashSet;
use std::time::Duration;

use e2e::*;

const WAIT: Duration = Duration::from_secs(60);

fn sha1_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha1sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha1sum");
    child.stdin.take().expect("stdin").write_all(data).expect("write");
    let out = child.wait_with_output().expect("sha1sum output");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

/// A router config for `queue` delivering to `fpm` over FastCGI (both its endpoints,
/// as many connections to each as it has workers).
fn fastcgi_config(queue: &str, fpm: &PhpFpm, handler: &str) -> String {
    let yaml = config(queue, &[fpm.tcp(), fpm.unix()], handler, "");
    let target = format!(
        "php: {{ type: fastcgi, script_filename: \"{}\", params: {{ SERVER_PORT: \"{}\" }}, max_connections: {}, endpoints: [",
        PhpFpm::script().display(),
        fpm.port,
        fpm.workers
    );
    let out = yaml.replace("php: { endpoints: [", &target);
    assert!(out.contains("type: fastcgi"), "the handler line of the test config changed: {yaml}");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_contract_over_fastcgi() {
    let dir = Scratch::new("fcgi");
    let log = dir.path("handler.log");
    let fpm = PhpFpm::start(&dir.0, &log, 4).await;
    let mut rabbit = Rabbit::connect().await;
    let queue = unique("fcgi");
    rabbit.queue(&queue).await;
    let mut router = Router::start(&dir, &fastcgi_config(&queue, &fpm, "")).await;

    let mut msgs = batch("ok", 40, |_| vec![("tenant", "acme".to_string())]);
    msgs.push(("poison".into(), b"{}".to_vec(), vec![("behave", "reject".to_string())]));
    msgs.push(("broken".into(), b"{}".to_vec(), vec![("behave", "fail".to_string())]));
    msgs.push(("busy".into(), b"{}".to_vec(), vec![("behave", "busy:1".to_string())]));
    msgs.push(("flaky".into(), b"{}".to_vec(), vec![("behave", "fail-until:2".to_string())]));
    msgs.push(("big".into(), vec![b'x'; 200_000], vec![]));
    msgs.push(("noisy".into(), b"{}".to_vec(), vec![("behave", "warn".to_string())]));
    rabbit.publish(&queue, &msgs).await;

    let dlq = format!("{queue}.dlq");
    wait_for("every message settled", WAIT, || async {
        let handled: HashSet<String> = seen(&log).into_iter().filter(|s| s.status == 200).map(|s| s.id).collect();
        handled.len() >= 44 && rabbit.count(&dlq).await >= 2
    })
    .await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));

    let got = by_id(&seen(&log));
    let h = &got["ok-7"][0].headers;
    assert_eq!(h["ce-id"], "ok-7", "HTTP_CE_ID");
    assert_eq!(h["ce-specversion"], "1.0");
    assert_eq!(h["x-router-attempt"], "1", "HTTP_X_ROUTER_ATTEMPT\n{}", router.logs());
    assert_eq!(h["x-router-route"], "work");
    assert_eq!(h["x-message-header-tenant"], "acme");
    assert_eq!(h["content-type"], "application/json", "CONTENT_TYPE");
    for (id, v) in got.iter().filter(|(id, _)| id.starts_with("ok-")) {
        let tries: Vec<(u32, u16)> = v.iter().map(|s| (s.attempt, s.status)).collect();
        assert_eq!(tries, [(1, 200)], "{id} handled once at its first attempt\n{}", router.logs());
    }
    let big = &got["big"][0];
    assert_eq!(big.status, 200);
    assert_eq!(big.body_sha1, sha1_hex(&vec![b'x'; 200_000]), "a 200 kB body arrives whole on stdin");
    // Retry-After honoured: the second attempt no sooner than a second after the 429.
    let busy = &got["busy"];
    assert_eq!(busy.iter().map(|s| s.status).collect::<Vec<_>>(), [429, 200]);
    assert!(busy[1].time - busy[0].time >= 0.9, "Retry-After: 1 honoured ({:.2} s)", busy[1].time - busy[0].time);
    assert_eq!(got["flaky"].iter().map(|s| s.status).collect::<Vec<_>>(), [500, 200]);
    assert_eq!(got["broken"].len(), 3, "500 retried up to max_attempts");
    assert_eq!(got["poison"].len(), 1, "422 dead-lettered at once");

    let dead = rabbit.drain(&dlq).await;
    let reason = |id: &str| dead.iter().find(|m| m.id == id).map(|m| m.headers["x-router-reason"].clone());
    assert!(reason("poison").is_some_and(|r| r.contains("422")), "{:?}", reason("poison"));
    assert!(reason("broken").is_some_and(|r| r.contains("max attempts")), "{:?}", reason("broken"));
    // Both endpoints, the TCP port and the unix socket, took requests.
    let pools: HashSet<String> = seen(&log).into_iter().map(|s| s.pool).collect();
    assert_eq!(pools, HashSet::from(["tcp".to_string(), "unix".to_string()]), "balanced over both endpoints");
    // PHP's error_log() came back as a FastCGI stderr record and was logged; nothing else was.
    let logs = router.logs();
    let stderr: Vec<&str> = logs.lines().filter(|l| l.contains("PHP-FPM wrote to stderr")).collect();
    assert_eq!(stderr.len(), 1, "{logs}");
    assert!(stderr[0].contains("handler warning for noisy") && stderr[0].contains("id=noisy"), "{}", stderr[0]);
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_php_fpm_loses_nothing() {
    let dir = Scratch::new("fcgikill");
    let log = dir.path("handler.log");
    let mut fpm = PhpFpm::start(&dir.0, &log, 4).await;
    let mut rabbit = Rabbit::connect().await;
    let queue = unique("fcgikill");
    rabbit.queue(&queue).await;
    // Enough attempts to outlast the outage; the breaker holds the rest meanwhile.
    let yaml = fastcgi_config(&queue, &fpm, "").replace("max_attempts: 3", "max_attempts: 10");
    let mut router = Router::start(&dir, &yaml).await;
    let msgs = batch("k", 300, |_| vec![("behave", "slow:30".to_string())]);
    let ids: Vec<String> = msgs.iter().map(|m| m.0.clone()).collect();
    rabbit.publish(&queue, &msgs).await;
    wait_for("some handled", WAIT, || async { seen(&log).len() >= 50 }).await;
    fpm.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    fpm.restart().await;
    wait_for("all 300 handled", Duration::from_secs(120), || async {
        let handled: HashSet<String> = seen(&log).into_iter().filter(|s| s.status == 200).map(|s| s.id).collect();
        ids.iter().all(|id| handled.contains(id))
    })
    .await;
    let logs = router.logs();
    assert!(logs.contains("PHP-FPM unreachable"), "the kill hit the stream: {logs}");
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    assert_eq!(rabbit.count(&format!("{queue}.dlq")).await, 0, "nothing dead-lettered");
    let handled = seen(&log).into_iter().filter(|s| s.status == 200).count();
    eprintln!("killed PHP-FPM: 300 messages, 300 handled, {} duplicates", handled - 300);
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_slower_than_the_timeout_is_a_failed_attempt() {
    let dir = Scratch::new("fcgislow");
    let log = dir.path("handler.log");
    let fpm = PhpFpm::start(&dir.0, &log, 2).await;
    let mut rabbit = Rabbit::connect().await;
    let queue = unique("fcgislow");
    rabbit.queue(&queue).await;
    let yaml =
        fastcgi_config(&queue, &fpm, "").replace("timeout: 5s", "timeout: 1s, circuit_breaker: { enabled: false }");
    let mut router = Router::start(&dir, &yaml).await;
    let mut msgs = vec![("slow".to_string(), b"{}".to_vec(), vec![("behave", "slow:3000".to_string())])];
    msgs.extend(batch("fast", 10, |_| vec![]));
    rabbit.publish(&queue, &msgs).await;
    let dlq = format!("{queue}.dlq");
    wait_for("the slow one dead-lettered", WAIT, || async { rabbit.count(&dlq).await >= 1 }).await;
    wait_for("the others handled", WAIT, || async {
        seen(&log).iter().filter(|s| s.id.starts_with("fast-") && s.status == 200).count() >= 10
    })
    .await;
    assert_eq!(router.terminate(Duration::from_secs(15)), Some(0));
    let dead = rabbit.drain(&dlq).await;
    assert_eq!(dead.len(), 1);
    let error = &dead[0].headers["x-router-last-error"];
    assert!(error.contains("no answer within 1s"), "{error}");
    rabbit.cleanup().await;
}
