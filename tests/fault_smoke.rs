//! Proof that the fault-injection harness works (tests/support/netfault.rs and
//! brokers.rs), not yet a test of the router's recovery: a router in a network
//! namespace consumes from a RabbitMQ, a Redis and a tansu of the test's own on the
//! host side of a veth pair and delivers to `php -S` there; a delay makes a round trip
//! slower, a partition stops traffic silently and its heal lets it go on, a reset
//! reaches the router (it logs it). Every message is counted; how long the current
//! router takes to come back is printed, not asserted (readiness and reconnects are
//! being reworked). Plus a private RabbitMQ killed and restarted 3 times keeping a
//! persistent message. Needs root (network namespaces, iptables, ss -K): without it
//! each test prints "SKIPPED: needs root" and returns.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use e2e::*;

/// Generous bound for what the current router does after a fault heals (printed).
const RECOVER: Duration = Duration::from_secs(90);

fn now_secs() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// An echo server on `addr` (host side); returns its address. Each connection is
/// served by a thread; what the accepted socket saw last goes to `events`.
fn echo_server(ip: std::net::Ipv4Addr, events: std::sync::mpsc::Sender<String>) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).expect("echo listener");
    let addr = listener.local_addr().expect("echo addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let events = events.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) => {
                            let _ = events.send("eof".into());
                            return;
                        }
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = events.send(format!("error: {e}"));
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// One echo round trip on `s` (1 byte), or the error.
fn round_trip(s: &mut TcpStream) -> std::io::Result<Duration> {
    let t = Instant::now();
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(t.elapsed())
}

fn median_rtt(s: &mut TcpStream, n: usize) -> Duration {
    let mut v: Vec<Duration> = (0..n).map(|_| round_trip(s).expect("echo")).collect();
    v.sort();
    v[n / 2]
}

#[test]
fn faultnet_delay_loss_partition_reset() {
    if !root_or_skip("faultnet_delay_loss_partition_reset") {
        return;
    }
    let t = Instant::now();
    let net = FaultNet::new();
    let setup = t.elapsed();
    let (tx, events) = std::sync::mpsc::channel();
    let addr = echo_server(net.host_ip(), tx);
    let mut s = net.connect(addr, Duration::from_secs(2)).expect("connect from the namespace");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(s.local_addr().unwrap().ip(), net.ns_ip(), "the connection leaves from the namespace");
    let base = median_rtt(&mut s, 21);

    // Delay: 200 ms each way on the same connection.
    net.delay(200, 0);
    let delayed = median_rtt(&mut s, 5);
    assert!(delayed >= Duration::from_millis(390), "200 ms each way gave a round trip of {delayed:?}");
    net.delay(50, 20);
    let jittered = median_rtt(&mut s, 9);
    assert!(jittered >= Duration::from_millis(55), "50±20 ms each way gave {jittered:?}");
    net.heal();
    let healed = median_rtt(&mut s, 21);
    assert!(healed < Duration::from_millis(50), "after heal: {healed:?}");

    // Loss: 30 % each way; the echo still works (TCP retransmits), slower.
    net.loss(30.0);
    let t = Instant::now();
    for _ in 0..10 {
        round_trip(&mut s).expect("echo under loss");
    }
    let lossy = t.elapsed();
    let dropped = dropped_packets(&net);
    net.heal();
    assert!(dropped > 0, "loss dropped nothing:\n{}", net.rules());

    // Partition: silent. The established connection hangs (no error), a new connect
    // times out (not refused); after heal the same connection goes on.
    net.partition();
    s.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    s.write_all(b"p").expect("a write is accepted by the local stack during a partition");
    let mut b = [0u8; 1];
    let err = s.read_exact(&mut b).expect_err("nothing comes back during a partition");
    assert!(matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{err}");
    let t = Instant::now();
    let c = net.connect(addr, Duration::from_secs(1));
    assert!(
        matches!(&c, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "connect during a partition: {c:?} after {:?}",
        t.elapsed()
    );
    net.heal();
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.read_exact(&mut b).expect("the echo arrives after heal");
    let resumed = t.elapsed();

    // Scope: a partition of one port leaves another alone.
    let (tx2, _events2) = std::sync::mpsc::channel();
    let other = echo_server(net.host_ip(), tx2);
    let mut s2 = net.connect(other, Duration::from_secs(2)).expect("connect to the second echo");
    net.port(addr.port()).partition();
    round_trip(&mut s2).expect("the other port still works");
    assert!(net.connect(addr, Duration::from_millis(500)).is_err(), "the partitioned port hangs");
    net.heal();

    // Reset: both ends learn at once.
    while events.try_recv().is_ok() {}
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let killed = net.reset();
    let err = s.read_exact(&mut b).expect_err("the namespace side sees the reset");
    let seen = t.elapsed();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    let host_side = events.recv_timeout(Duration::from_secs(5)).expect("the host side sees it too");
    assert!(host_side.starts_with("error"), "host side: {host_side}");
    assert!(killed >= 2, "reset killed {killed} sockets (two connections were open)");

    // A second FaultNet of the same process gets its own subnet and names.
    let net2 = FaultNet::new();
    assert_ne!(net2.host_ip(), net.host_ip());
    assert_ne!(net2.name(), net.name());
    let (tx3, _e3) = std::sync::mpsc::channel();
    let a3 = echo_server(net2.host_ip(), tx3);
    net.partition();
    let mut s3 = net2.connect(a3, Duration::from_secs(2)).expect("the second namespace is not partitioned");
    round_trip(&mut s3).expect("echo in the second namespace");
    net.heal();
    let name = net.name().to_string();
    drop(net);
    assert!(!Path::new("/run/netns").join(&name).exists(), "drop removed the namespace");

    eprintln!(
        "faultnet: setup {setup:?}; rtt {base:?}, delay(200) {delayed:?}, delay(50,20) {jittered:?}, healed {healed:?}; \
         10 echoes at 30% loss {lossy:?} ({dropped} packets dropped); partition: echo back {resumed:?} after heal; \
         reset: {killed} sockets, seen in {seen:?}, host side '{host_side}'"
    );
}

/// Packets the DROP rules of `net` dropped so far.
fn dropped_packets(net: &FaultNet) -> u64 {
    let out = net.command("iptables").args(["-w", "5", "-L", "-v", "-x", "-n"]).output().expect("iptables -L");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("DROP") && !l.starts_with("Chain"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The broker a smoke test runs against, with the test's own client.
enum Source {
    Amqp { client: Box<Rabbit>, queue: String },
    Redis { client: Redis, stream: String },
    Kafka { client: Kafka, topic: String },
}

impl Source {
    async fn publish(&mut self, ids: &[String]) {
        let msgs: Vec<Outgoing> = ids.iter().map(|id| (id.clone(), b"{}".to_vec(), vec![])).collect();
        match self {
            Source::Amqp { client, queue } => client.publish(queue, &msgs).await,
            Source::Redis { client, stream } => client.publish(stream, &msgs).await,
            Source::Kafka { client, topic } => client.publish(topic, &msgs, |_| None).await,
        }
    }
}

/// The ids handled with 200 so far.
fn handled(log: &Path) -> BTreeSet<String> {
    seen(log).into_iter().filter(|s| s.status == 200).map(|s| s.id).collect()
}

async fn wait_handled(log: &Path, ids: &[String], timeout: Duration) -> Duration {
    let t = Instant::now();
    let want: BTreeSet<String> = ids.iter().cloned().collect();
    wait_for(&format!("{} messages handled", ids.len()), timeout, || async { handled(log).is_superset(&want) }).await;
    t.elapsed()
}

/// Publish one message and wait for the handler to log it: publish to handler time.
async fn latency(src: &mut Source, log: &Path, id: String) -> Duration {
    let t0 = now_secs();
    src.publish(std::slice::from_ref(&id)).await;
    wait_handled(log, std::slice::from_ref(&id), Duration::from_secs(30)).await;
    let at = seen(log).iter().find(|s| s.id == id && s.status == 200).map(|s| s.time).unwrap_or(t0);
    Duration::from_secs_f64((at - t0).max(0.0))
}

/// Wait until the router has settled what it took (`router_in_flight` 0): the answer
/// of a handled message may still be on its way back to the router.
async fn settled(router: &Router) {
    wait_for("the router settled", Duration::from_secs(20), || async {
        router.metric("router_in_flight").await == 0.0
    })
    .await;
}

async fn median_latency(src: &mut Source, router: &Router, log: &Path, prefix: &str, n: usize) -> Duration {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(latency(src, log, format!("{prefix}-{i}")).await);
        settled(router).await;
    }
    v.sort();
    v[n / 2]
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// The router's log lines after the first `from` bytes.
fn log_since(router: &Router, from: usize) -> String {
    router.logs().get(from..).unwrap_or_default().to_string()
}

/// The scenario every broker goes through: baseline, delay, partition + heal, reset.
async fn exercise(kind: &str, net: &FaultNet, router: &Router, php: &PhpHandler, src: &mut Source) {
    let t_all = Instant::now();
    let log = php.log.clone();
    let mut all = ids(&format!("{kind}-warm"), 20);
    src.publish(&all).await;
    wait_handled(&log, &all, Duration::from_secs(30)).await;
    settled(router).await;
    let base = median_latency(src, router, &log, &format!("{kind}-base"), 3).await;
    all.extend(ids(&format!("{kind}-base"), 3));

    net.delay(200, 0);
    let delayed = median_latency(src, router, &log, &format!("{kind}-delay"), 3).await;
    all.extend(ids(&format!("{kind}-delay"), 3));
    net.heal();
    // broker -> router and router -> handler both cross the veth: at least 2 × 200 ms.
    assert!(
        delayed >= base + Duration::from_millis(300),
        "{kind}: delay(200) did not slow delivery: {base:?} -> {delayed:?}"
    );

    // Partition: nothing arrives, silently; the admin server still answers.
    net.partition();
    let t_part = Instant::now();
    let during = ids(&format!("{kind}-part"), 5);
    src.publish(&during).await;
    all.extend(during.iter().cloned());
    let mut not_ready_after = None;
    while t_part.elapsed() < Duration::from_secs(4) {
        if not_ready_after.is_none() && !router.ready().await {
            not_ready_after = Some(t_part.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = handled(&log);
    assert!(during.iter().all(|id| !got.contains(id)), "{kind}: messages crossed a partition");
    let readyz = router.admin_get("/readyz").await;
    assert!(readyz.is_some(), "{kind}: the admin server in the namespace answers during a partition");
    let connected = router.metric("router_subscription_connected").await;
    net.heal();
    let after_heal = wait_handled(&log, &during, RECOVER).await;
    settled(router).await;

    // Reset: every connection of the router with the host aborted at once.
    let mark = router.logs().len();
    let t_reset = Instant::now();
    let killed = net.reset();
    let reset_took = t_reset.elapsed();
    wait_for(&format!("{kind}: the router logs the reset"), Duration::from_secs(30), || async {
        let l = log_since(router, mark).to_lowercase();
        l.contains("reset") || l.contains("reconnect") || l.contains("broken pipe") || l.contains("closed")
    })
    .await;
    let logged = t_reset.elapsed();
    let after = ids(&format!("{kind}-reset"), 5);
    src.publish(&after).await;
    all.extend(after.iter().cloned());
    let after_reset = wait_handled(&log, &after, RECOVER).await;

    // Nothing lost.
    let got = handled(&log);
    let lost: Vec<&String> = all.iter().filter(|id| !got.contains(*id)).collect();
    assert!(lost.is_empty(), "{kind}: lost {lost:?}");
    let lines: Vec<String> = log_since(router, mark)
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("warn") || l.contains("error") || l.contains("reset")
        })
        .take(4)
        .map(|l| l.chars().take(300).collect())
        .collect();
    eprintln!(
        "{kind}: latency {base:?}, with delay(200) {delayed:?}; partition: readyz {} (not ready after {not_ready_after:?}), \
         router_subscription_connected {connected}, 5 published during it handled {after_heal:?} after heal; reset: {killed} sockets killed in {reset_took:?}, \
         router logged it within {logged:?}, 5 published after it handled in {after_reset:?}; {} messages, 0 lost; {:?} in all\n  \
         router after reset: {lines:#?}",
        readyz.map(|(s, b)| format!("{s} {}", b.trim())).unwrap_or_default(),
        all.len(),
        t_all.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn router_amqp_through_faults() {
    if !root_or_skip("router_amqp_through_faults") {
        return;
    }
    let net = FaultNet::new();
    let dir = owned_scratch("fsamqp");
    let host = net.host_ip().to_string();
    let t = Instant::now();
    let rabbit = PrivateRabbit::start(&dir, &host).await;
    let rabbit_start = t.elapsed();
    let php = PhpHandler::start_on(&dir.path("handler.log"), 4, &host).await;
    let mut client = Rabbit::connect_to(&rabbit.url()).await;
    let queue = unique("fsamqp");
    client.queue(&queue).await;
    let router = Router::start_in(&net, &dir, &config_at(&rabbit.url(), &queue, &[php.url()], "", "")).await;
    eprintln!("amqp: private RabbitMQ up in {rabbit_start:?}");
    let mut src = Source::Amqp { client: Box::new(client), queue: queue.clone() };
    exercise("amqp", &net, &router, &php, &mut src).await;
    let Source::Amqp { client, .. } = src else { unreachable!() };
    wait_for("queue drained", Duration::from_secs(30), || async { client.count(&queue).await == 0 }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn router_redis_through_faults() {
    if !root_or_skip("router_redis_through_faults") {
        return;
    }
    let net = FaultNet::new();
    let dir = owned_scratch("fsredis");
    let host = net.host_ip().to_string();
    let t = Instant::now();
    let redis = PrivateRedis::start(&dir, &host, false).await;
    let redis_start = t.elapsed();
    let php = PhpHandler::start_on(&dir.path("handler.log"), 4, &host).await;
    let (stream, group) = (unique("fsredis"), unique("group"));
    let yaml = redis_config_at(&redis.url(), &[&stream], &group, "only", &[php.url()], "");
    let router = Router::start_in(&net, &dir, &yaml).await;
    eprintln!("redis: private Redis up in {redis_start:?}");
    let mut src = Source::Redis { client: Redis::connect_to(&redis.url()).await, stream: stream.clone() };
    exercise("redis", &net, &router, &php, &mut src).await;
    let Source::Redis { client, .. } = src else { unreachable!() };
    client.wait_acked(&stream, &group, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn router_kafka_through_faults() {
    if !root_or_skip("router_kafka_through_faults") {
        return;
    }
    let net = FaultNet::new();
    let dir = owned_scratch("fskafka");
    let host = net.host_ip().to_string();
    let t = Instant::now();
    let tansu = Tansu::start_on(&dir, &host).await;
    let tansu_start = t.elapsed();
    let php = PhpHandler::start_on(&dir.path("handler.log"), 4, &host).await;
    let client = Kafka::connect_to(&tansu.brokers());
    let (topic, group) = (unique("fskafka"), unique("group"));
    client.create_topic(&topic, 1).await;
    let yaml = kafka_config_at(&tansu.brokers(), &[&topic], &group, &[php.url()], "");
    let router = Router::start_in(&net, &dir, &yaml).await;
    eprintln!("kafka: private tansu up in {tansu_start:?}");
    let mut src = Source::Kafka { client, topic: topic.clone() };
    exercise("kafka", &net, &router, &php, &mut src).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn private_rabbit_survives_kill9_restarts() {
    if !root_or_skip("private_rabbit_survives_kill9_restarts") {
        return;
    }
    let dir = owned_scratch("prabbit");
    let t = Instant::now();
    let mut rabbit = PrivateRabbit::start(&dir, "127.0.0.1").await;
    let start = t.elapsed();
    let queue = unique("prabbit");
    let mut client = Rabbit::connect_to(&rabbit.url()).await;
    client.queue(&queue).await;
    client.publish(&queue, &[("keep".to_string(), b"{}".to_vec(), vec![])]).await;
    drop(client);

    let t = Instant::now();
    rabbit.stop_app().await;
    let stop_app = t.elapsed();
    assert!(TcpStream::connect(("127.0.0.1", rabbit.port)).is_err(), "stop_app closes the AMQP listener");
    let t = Instant::now();
    rabbit.start_app().await;
    let start_app = t.elapsed();

    let client = Rabbit::connect_to(&rabbit.url()).await;
    let t = Instant::now();
    rabbit.close_connections().await;
    let close = t.elapsed();
    wait_for("the connection closed by the node", Duration::from_secs(10), || async {
        !client.conn.status().connected()
    })
    .await;

    let mut restarts = Vec::new();
    for round in 0..3 {
        let t = Instant::now();
        rabbit.restart().await;
        restarts.push(t.elapsed());
        let client = Rabbit::connect_to(&rabbit.url()).await;
        assert_eq!(client.count(&queue).await, 1, "round {round}: the persistent message survived kill -9");
    }
    let client = Rabbit::connect_to(&rabbit.url()).await;
    let got = client.drain(&queue).await;
    assert_eq!(got.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(), ["keep"]);
    eprintln!(
        "private rabbit {}: start {start:?}, stop_app {stop_app:?}, start_app {start_app:?}, \
         close_all_connections {close:?}, kill -9 + restart {restarts:?}",
        rabbit.node
    );
}
