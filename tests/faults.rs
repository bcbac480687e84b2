//! Real network faults between the router and each broker and its handler pool,
//! while messages flow, and every message counted afterwards.
//!
//! The router runs in a network namespace (`FaultNet`); a RabbitMQ, a Redis and a
//! tansu of the test's own and `php -S` listen on the host side of its veth pair.
//! Faults hit only the traffic of one port (the broker's, or the handler's): latency
//! (150 ± 50 ms each way), packet loss (10 %), a silent partition that heals after 25 s,
//! a reset of every connection. Messages are published throughout (by the test, from
//! outside the namespace). Under each fault: nothing lost; during a partition the
//! outage shows on `/readyz` (503 with the reason) and in a metric; after the heal
//! everything is handled and the router ready again within 30 s, by itself.
//!
//! Needs root (network namespaces, iptables, ss -K); without it each test prints
//! "SKIPPED: needs root" and returns.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::*;
use tokio::sync::Mutex;

/// How soon after the heal everything must be handled and the router ready.
const RECOVER: Duration = Duration::from_secs(30);
const PARTITION: Duration = Duration::from_secs(25);

/// One fault test at a time, whatever `--test-threads` says: each measures recovery
/// times, which two routers and two brokers sharing two cores would distort.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs one fault test on a runtime of its own, after the one before it finished.
fn serially(name: &str, test: impl std::future::Future<Output = ()>) {
    if !root_or_skip(name) {
        return;
    }
    // A test that failed while holding it leaves it poisoned; the next one may go on.
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime").block_on(test);
}

enum Source {
    Amqp { client: Box<Rabbit>, queue: String },
    Redis { client: Redis, stream: String },
    Kafka { client: Kafka, topic: String },
}

impl Source {
    async fn publish(&mut self, msgs: &[Outgoing]) {
        match self {
            Source::Amqp { client, queue } => client.publish(queue, msgs).await,
            Source::Redis { client, stream } => client.publish(stream, msgs).await,
            Source::Kafka { client, topic } => client.publish(topic, msgs, |_| None).await,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Latency,
    Loss,
    Partition,
    Reset,
}

/// What one fault did, for the table.
struct Cell {
    fault: Fault,
    published: usize,
    duplicates: usize,
    dead: usize,
    /// When `/readyz` first said 503 after the fault began, and why.
    outage: Option<(Duration, String)>,
    /// The metric that showed the outage, if one did.
    metric: Option<&'static str>,
    /// From the heal to everything handled and the router ready.
    recovered: Duration,
}

/// A router in a namespace, its handler, and the broker it reads.
struct Bench {
    net: FaultNet,
    router: Router,
    php: PhpHandler,
    src: Arc<Mutex<Source>>,
    /// The host-side port the faults hit.
    port: u16,
    /// Counts the dead-letter destination.
    dead: Box<dyn Fn() -> Dead + Send + Sync>,
    name: &'static str,
    /// How long the handler takes per message.
    work_ms: u32,
    // Kept alive for the test's length.
    _dir: Scratch,
    _brokers: Vec<Box<dyn std::any::Any + Send>>,
}

/// Counting dead letters differs per broker; each bench brings its own counter.
type Dead = std::pin::Pin<Box<dyn std::future::Future<Output = usize> + Send>>;

fn handled(php: &PhpHandler) -> BTreeSet<String> {
    seen(&php.log).into_iter().filter(|s| s.status == 200).map(|s| s.id).collect()
}

impl Bench {
    async fn run(&mut self, fault: Fault) -> Cell {
        let scope = self.net.port(self.port);
        let prefix = format!("{}-{fault:?}", self.name).to_lowercase();
        let ids = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The feeder: 5 messages every 250 ms from outside the namespace.
        let feeder = tokio::spawn({
            let (src, ids, stop, prefix) = (self.src.clone(), ids.clone(), stop.clone(), prefix.clone());
            let work_ms = self.work_ms;
            async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let batch: Vec<Outgoing> = (n..n + 5)
                        .map(|i| (format!("{prefix}-{i}"), b"{}".to_vec(), vec![("behave", format!("slow:{work_ms}"))]))
                        .collect();
                    n += 5;
                    src.lock().await.publish(&batch).await;
                    ids.lock().await.extend(batch.into_iter().map(|m| m.0));
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let began = Instant::now();
        let hold = match fault {
            Fault::Latency => {
                scope.delay(150, 50);
                Duration::from_secs(6)
            }
            Fault::Loss => {
                scope.loss(10.0);
                Duration::from_secs(6)
            }
            Fault::Partition => {
                scope.partition();
                PARTITION
            }
            Fault::Reset => {
                // A handler's connections live for one request (php -S closes them):
                // try until the reset catches some.
                let mut killed = 0;
                while killed == 0 && began.elapsed() < Duration::from_secs(20) {
                    killed = scope.reset();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                assert!(killed > 0, "{}: the reset found connections to kill", self.name);
                Duration::from_secs(3)
            }
        };
        let mut outage = None;
        let mut metric = None;
        while began.elapsed() < hold {
            if outage.is_none() {
                if let Some((503, body)) = self.router.admin_get("/readyz").await {
                    outage = Some((began.elapsed(), body.lines().skip(1).collect::<Vec<_>>().join("; ")));
                }
            }
            if metric.is_none() {
                if self.router.metric("router_subscription_connected").await == 0.0 {
                    metric = Some("router_subscription_connected 0");
                } else if self.router.metric("router_circuit_state").await == 1.0 {
                    metric = Some("router_circuit_state 1");
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        scope.heal();
        let healed = Instant::now();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        feeder.await.expect("feeder");
        let ids = ids.lock().await.clone();
        let want: BTreeSet<String> = ids.iter().cloned().collect();
        let deadline = healed + RECOVER;
        loop {
            let done = handled(&self.php);
            if want.is_subset(&done) && self.router.ready().await {
                break;
            }
            if Instant::now() > deadline {
                let missing = want.difference(&done).count();
                let dead = (self.dead)().await;
                let metrics: Vec<String> = self
                    .router
                    .metrics()
                    .await
                    .lines()
                    .filter(|l| l.starts_with("router_") && !l.contains("_bucket") && !l.contains("duration"))
                    .map(str::to_string)
                    .collect();
                panic!(
                    "{}: {fault:?}: {missing} of {} not handled ({dead} dead-lettered) {RECOVER:?} after the heal; readyz {:?}\n{}\n{}",
                    self.name,
                    want.len(),
                    self.router.admin_get("/readyz").await,
                    metrics.join("\n"),
                    self.router.logs().lines().rev().take(30).collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let recovered = healed.elapsed();
        let count = seen(&self.php.log).iter().filter(|s| s.status == 200 && s.id.starts_with(&prefix)).count();
        Cell {
            fault,
            published: ids.len(),
            duplicates: count - want.len(),
            dead: (self.dead)().await,
            outage,
            metric,
            recovered,
        }
    }

    async fn all(mut self) {
        let mut cells = Vec::new();
        for fault in [Fault::Latency, Fault::Loss, Fault::Reset, Fault::Partition] {
            let cell = self.run(fault).await;
            eprintln!(
                "FAULT {:<8} {:<9?} messages {:>4}  lost 0  duplicates {:>3}  dead-lettered {}  readyz 503 {:<40}  metric {:<34}  recovered {:.1?} after heal",
                self.name,
                cell.fault,
                cell.published,
                cell.duplicates,
                cell.dead,
                cell.outage.as_ref().map(|(t, why)| format!("after {t:.1?}: {why}")).unwrap_or_else(|| "no".into()),
                cell.metric.unwrap_or("-"),
                cell.recovered
            );
            cells.push(cell);
        }
        for c in &cells {
            assert!(c.recovered <= RECOVER, "{}: {:?} recovered in {:?}", self.name, c.fault, c.recovered);
            if c.fault == Fault::Partition {
                assert!(c.outage.is_some(), "{}: a partition must show on /readyz", self.name);
                assert!(c.metric.is_some(), "{}: a partition must show in a metric", self.name);
            }
        }
        assert_eq!(self.router.terminate(Duration::from_secs(30)), Some(0));
    }
}

fn port_of(hostport: &str) -> u16 {
    hostport.rsplit(':').next().and_then(|p| p.trim_end_matches('/').split('/').next()?.parse().ok()).unwrap_or(0)
}

/// Router settings for fault tests: heartbeats every 5 s (a partition is noticed in
/// about 10 s), a short stall watchdog, room for retries.
fn tune(yaml: String) -> String {
    yaml.replace("max_attempts: 3", "max_attempts: 5").replace("prefetch: 32", "prefetch: 32\n    stall_timeout: 5s")
}

#[test]
fn faults_between_the_router_and_rabbitmq() {
    serially("faults_between_the_router_and_rabbitmq", rabbitmq());
}

async fn rabbitmq() {
    let net = FaultNet::new();
    let dir = owned_scratch("fltamqp");
    let host = net.host_ip().to_string();
    let rabbit = PrivateRabbit::start(&dir, &host).await;
    let php = PhpHandler::start_on(&dir.path("handler.log"), 4, &host).await;
    let mut client = Rabbit::connect_to(&rabbit.url()).await;
    let queue = unique("fltamqp");
    client.queue(&queue).await;
    let yaml = tune(config_at(&rabbit.url(), &queue, &[php.url()], "", ""))
        .replace("reconnect_max_delay: 1s", "reconnect_max_delay: 1s, heartbeat: 5s");
    let router = Router::start_in(&net, &dir, &yaml).await;
    let counter = Arc::new(Rabbit::connect_to(&rabbit.url()).await);
    let dlq = format!("{queue}.dlq");
    let dead = move || -> Dead {
        let (c, q) = (counter.clone(), dlq.clone());
        Box::pin(async move { c.count(&q).await as usize })
    };
    let port = rabbit.port;
    Bench {
        net,
        router,
        php,
        src: Arc::new(Mutex::new(Source::Amqp { client: Box::new(client), queue })),
        port,
        dead: Box::new(dead),
        name: "rabbitmq",
        work_ms: 5,
        _dir: dir,
        _brokers: vec![Box::new(rabbit)],
    }
    .all()
    .await;
}

#[test]
fn faults_between_the_router_and_redis() {
    serially("faults_between_the_router_and_redis", redis());
}

async fn redis() {
    redis_bench("redis", |yaml| yaml).await;
}

/// A router reading a private Redis; `name` "handler" puts the faults between the
/// router and its PHP pool instead (the broker is then untouched).
async fn redis_bench(name: &'static str, adjust: impl Fn(String) -> String) {
    let net = FaultNet::new();
    let dir = owned_scratch(&format!("flt{name}"));
    let host = net.host_ip().to_string();
    let redis = PrivateRedis::start(&dir, &host, false).await;
    let php = PhpHandler::start_on(&dir.path("handler.log"), 4, &host).await;
    let (stream, group) = (unique(&format!("flt{name}")), unique("group"));
    let yaml = adjust(tune(redis_config_at(&redis.url(), &[&stream], &group, "only", &[php.url()], "")));
    let router = Router::start_in(&net, &dir, &yaml).await;
    let url = redis.url();
    let dlq = format!("{stream}.dlq");
    let dead = move || -> Dead {
        let (url, dlq) = (url.clone(), dlq.clone());
        Box::pin(async move { Redis::connect_to(&url).await.entries(&dlq).await.len() })
    };
    let (port, work_ms) = if name == "handler" {
        // Long enough that a reset of the handler's connections finds requests under
        // way (php -S closes each connection after its request).
        (php.port, 50)
    } else {
        (redis.port, 5)
    };
    Bench {
        net,
        router,
        php,
        src: Arc::new(Mutex::new(Source::Redis { client: Redis::connect_to(&redis.url()).await, stream })),
        port,
        dead: Box::new(dead),
        name,
        work_ms,
        _dir: dir,
        _brokers: vec![Box::new(redis)],
    }
    .all()
    .await;
}

#[test]
fn faults_between_the_router_and_kafka() {
    serially("faults_between_the_router_and_kafka", kafka());
}

async fn kafka() {
    let net = FaultNet::new();
    let dir = owned_scratch("fltkafka");
    let host = net.host_ip().to_string();
    let tansu = Tansu::start_on(&dir, &host).await;
    let php = PhpHandler::start_on(&dir.path("handler.log"), 4, &host).await;
    let client = Kafka::connect_to(&tansu.brokers());
    let (topic, group) = (unique("fltkafka"), unique("group"));
    client.create_topic(&topic, 2).await;
    // librdkafka's default session timeout (45 s) rather than the suite's 6 s: the
    // member outlives the 25 s partition and is still in its group when the network
    // heals, as in production. (With a session that expires, tansu's coordinator does
    // not always let the member back in: README "Known limits".)
    let yaml = tune(kafka_config_at(&tansu.brokers(), &[&topic], &group, &[php.url()], "")).replace(
        "session.timeout.ms: \"6000\", max.poll.interval.ms: \"10000\"",
        "session.timeout.ms: \"45000\", max.poll.interval.ms: \"60000\"",
    );
    assert!(yaml.contains("session.timeout.ms: \"45000\""), "the Kafka fault test sets its session timeout");
    let router = Router::start_in(&net, &dir, &yaml).await;
    let brokers = tansu.brokers();
    let dlq = format!("{topic}.dlq");
    let dead = move || -> Dead {
        let (b, t) = (brokers.clone(), dlq.clone());
        Box::pin(async move { Kafka::connect_to(&b).read(&t, usize::MAX, Duration::from_secs(2)).await.len() })
    };
    let port = port_of(&tansu.brokers());
    Bench {
        net,
        router,
        php,
        src: Arc::new(Mutex::new(Source::Kafka { client, topic })),
        port,
        dead: Box::new(dead),
        name: "kafka",
        work_ms: 5,
        _dir: dir,
        _brokers: vec![Box::new(tansu)],
    }
    .all()
    .await;
}

#[test]
fn faults_between_the_router_and_its_handler_pool() {
    serially("faults_between_the_router_and_its_handler_pool", handler_pool());
}

async fn handler_pool() {
    // A handler timeout of 3 s, and a circuit that probes at least every 10 s.
    redis_bench("handler", |yaml| {
        yaml.replace("], timeout: 5s", "], timeout: 3s, circuit_breaker: { max_open_for: 10s }")
    })
    .await;
}
