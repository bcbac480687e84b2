//! Shared parts of the end-to-end tests: the real `message-router` binary, real PHP
//! handlers served by `php -S`, and a real RabbitMQ.
//!
//! Every test names its queues with a fresh suffix ([`unique`]), so runs never see each
//! other's messages (the suite passes twice in a row and after a killed run). Waits are
//! polls with a deadline ([`wait_for`]), never fixed sleeps.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;

pub mod admin;
pub mod brokers;
pub mod fpm;
pub mod grpc;
pub mod metrics;
pub mod netfault;
pub mod otlp;
pub mod webdriver;

pub use brokers::{PrivateRabbit, PrivateRedis};
pub use fpm::PhpFpm;
pub use grpc::GrpcHandler;
pub use netfault::{owned_scratch, root_or_skip, FaultNet};

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Workspace root (this crate lives in `tests/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The daemon binary: `MESSAGE_ROUTER_BIN`, else the workspace's debug build
/// (`scripts/test` builds it first).
pub fn router_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MESSAGE_ROUTER_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root().join("target"));
    let bin = target.join("debug").join("message-router");
    assert!(bin.exists(), "{} not found: run `cargo build -p router-daemon` first (scripts/test does)", bin.display());
    bin
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    format!("e2e-{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Where scripts/setup keeps what it builds or installs outside the repository
/// (tansu, the gRPC handler's Python venv).
pub fn setup_cache() -> PathBuf {
    std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache"))
        .join("message-router")
}

/// A scratch directory removed at drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(name));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Poll `cond` every 20 ms until it holds or `timeout` passes (then panic with `what`).
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status();
    }

    /// SIGKILL the process and its process group (`php -S` forks workers that would
    /// otherwise outlive it), and reap.
    pub fn kill(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.pid())]).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for exit up to `timeout`; the exit code, or None if it did not exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A PHP handler served by `php -S` with `tests/handlers/handler.php`; requests are
/// logged as JSON lines to `log`.
pub struct PhpHandler {
    pub proc: Proc,
    pub host: String,
    pub port: u16,
    pub log: PathBuf,
}

impl PhpHandler {
    pub async fn start(log: &Path, workers: u32) -> Self {
        Self::start_on(log, workers, "127.0.0.1").await
    }

    /// Serve on `host` (e.g. the host side of a [`FaultNet`]) instead of 127.0.0.1.
    pub async fn start_on(log: &Path, workers: u32, host: &str) -> Self {
        let port = free_port();
        let script = root().join("tests/handlers/handler.php");
        let child = Command::new("php")
            .args(["-S", &format!("{host}:{port}"), script.to_str().unwrap_or_default()])
            .env("HANDLER_LOG", log)
            .env("HANDLER_DOWN_FILE", down_file(log))
            .env("PHP_CLI_SERVER_WORKERS", workers.to_string())
            .env(netfault::OWNER_ENV, netfault::owner_tag())
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("php -S starts (is php8.2-cli installed? scripts/setup installs it)");
        let handler = PhpHandler {
            proc: Proc { child, name: format!("php:{port}") },
            host: host.to_string(),
            port,
            log: log.to_path_buf(),
        };
        let addr = format!("{host}:{port}");
        wait_for("php -S to listen", Duration::from_secs(10), || async { std::net::TcpStream::connect(&addr).is_ok() })
            .await;
        handler
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}/", self.host, self.port)
    }

    /// Make every request fail with 500 (a handler whose database is down), or stop.
    pub fn set_down(&self, down: bool) {
        let file = down_file(&self.log);
        if down {
            std::fs::write(&file, b"down").expect("down file");
        } else {
            let _ = std::fs::remove_file(&file);
        }
    }
}

fn down_file(log: &Path) -> PathBuf {
    log.with_extension("down")
}

/// One request as the PHP handler logged it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub id: String,
    pub attempt: u32,
    pub status: u16,
    pub port: u16,
    pub time: f64,
    /// SHA-1 of the body as PHP read it, hex.
    pub body_sha1: String,
    /// The PHP-FPM pool that ran it (empty under `php -S`).
    pub pool: String,
    pub headers: BTreeMap<String, String>,
}

/// Every request logged so far to `log` (missing file = none yet).
pub fn seen(log: &Path) -> Vec<Seen> {
    let Ok(f) = std::fs::File::open(log) else { return Vec::new() };
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .map(|v| Seen {
            id: v["id"].as_str().unwrap_or_default().to_string(),
            attempt: v["attempt"].as_u64().unwrap_or(0) as u32,
            status: v["status"].as_u64().unwrap_or(0) as u16,
            port: v["port"].as_u64().unwrap_or(0) as u16,
            time: v["time"].as_f64().unwrap_or(0.0),
            body_sha1: v["body_sha1"].as_str().unwrap_or_default().to_string(),
            pool: v["pool"].as_str().unwrap_or_default().to_string(),
            headers: v["headers"]
                .as_object()
                .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
                .unwrap_or_default(),
        })
        .collect()
}

/// Logged requests grouped by message id, in arrival order.
pub fn by_id(seen: &[Seen]) -> BTreeMap<String, Vec<Seen>> {
    let mut m: BTreeMap<String, Vec<Seen>> = BTreeMap::new();
    for s in seen {
        m.entry(s.id.clone()).or_default().push(s.clone());
    }
    m
}

/// The `message-router` daemon running a config written to a scratch file.
pub struct Router {
    pub proc: Proc,
    pub admin: u16,
    pub config: PathBuf,
    pub stderr: PathBuf,
    /// The network namespace it runs in ([`Router::start_in`]), None on the host.
    pub netns: Option<String>,
}

impl Router {
    /// Start with `yaml` (which must use `{admin}` where the admin port goes) and wait
    /// until `/readyz` says every subscription consumes. A free port can be taken by
    /// another test between choosing and binding it: then start again on another one.
    pub async fn start(dir: &Scratch, yaml: &str) -> Self {
        Self::start_with(None, dir, yaml).await
    }

    /// Start inside `net`'s namespace (`ip netns exec`), so every connection it makes
    /// to the host side crosses the faults. Its admin server must listen on
    /// `127.0.0.1:{admin}` (as every config helper here writes it): that is the
    /// namespace's own loopback, which the test reaches from a thread entered into the
    /// namespace ([`netfault::http_get_in`]), never over the veth, so `/readyz` and
    /// `/metrics` answer whatever fault is on.
    pub async fn start_in(net: &FaultNet, dir: &Scratch, yaml: &str) -> Self {
        Self::start_with(Some(net.name()), dir, yaml).await
    }

    async fn start_with(netns: Option<&str>, dir: &Scratch, yaml: &str) -> Self {
        for _ in 0..5 {
            let admin = free_port();
            let config = dir.path(&format!("router-{admin}.yaml"));
            std::fs::write(&config, yaml.replace("{admin}", &admin.to_string())).expect("write config");
            let mut router = Self::spawn(netns, &config, admin, dir);
            if router.wait_ready().await {
                return router;
            }
            assert!(router.logs().contains("cannot bind"), "router exited before it was ready:\n{}", router.logs());
        }
        panic!("no free admin port after 5 tries");
    }

    /// Start again on the same config (after a kill), where the previous one ran.
    pub async fn restart(dir: &Scratch, previous: &Router) -> Self {
        let mut router = Self::spawn(previous.netns.as_deref(), &previous.config, previous.admin, dir);
        assert!(router.wait_ready().await, "router exited before it was ready:\n{}", router.logs());
        router
    }

    fn spawn(netns: Option<&str>, config: &Path, admin: u16, dir: &Scratch) -> Self {
        let stderr = dir.path(&format!("router-{admin}-{}.log", uuid::Uuid::new_v4().simple()));
        let log = std::fs::File::create(&stderr).expect("router log");
        let mut cmd = match netns {
            // `ip netns exec` execs the daemon: the pid (and process group) is its own.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(router_bin());
                c
            }
            None => Command::new(router_bin()),
        };
        let child = cmd
            .args(["run", "--config", config.to_str().unwrap_or_default()])
            .env("RUST_LOG", "info,router_core=debug")
            .env(netfault::OWNER_ENV, netfault::owner_tag())
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("message-router starts");
        Router {
            proc: Proc { child, name: format!("router:{admin}") },
            admin,
            config: config.to_path_buf(),
            stderr,
            netns: netns.map(str::to_string),
        }
    }

    /// `GET path` on the admin server: status and body, None when it does not answer.
    pub async fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        match &self.netns {
            Some(ns) => {
                let (ns, port, path) = (ns.clone(), self.admin, path.to_string());
                tokio::task::spawn_blocking(move || netfault::http_get_in(&ns, port, &path, Duration::from_secs(5)))
                    .await
                    .ok()
                    .flatten()
            }
            None => {
                let r = reqwest::get(format!("http://127.0.0.1:{}{path}", self.admin)).await.ok()?;
                let status = r.status().as_u16();
                Some((status, r.text().await.unwrap_or_default()))
            }
        }
    }

    /// Whether `/readyz` answers 200 now.
    pub async fn ready(&self) -> bool {
        matches!(self.admin_get("/readyz").await, Some((200, _)))
    }

    /// Wait until `/readyz` answers 200 (true), or the process exits (false); panics
    /// after 30 s.
    pub async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ready().await {
                return true;
            }
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                return false;
            }
            assert!(Instant::now() < deadline, "router not ready after 30s:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.map(|(_, body)| body).unwrap_or_default()
    }

    /// The sum over every series of the metric `name` (0 when there is none).
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM, and the exit code within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        self.proc.signal("TERM");
        self.proc.wait_exit(timeout)
    }
}

/// A message to publish: id, body, headers.
pub type Outgoing = (String, Vec<u8>, Vec<(&'static str, String)>);

/// A test's own RabbitMQ connection: publish with confirms, count, read queues.
pub struct Rabbit {
    pub conn: Connection,
    pub channel: Channel,
    queues: Vec<String>,
}

/// A message read back from a queue.
#[derive(Clone, Debug)]
pub struct Got {
    pub id: String,
    pub body: Vec<u8>,
    pub routing_key: String,
    pub headers: HashMap<String, String>,
}

impl Rabbit {
    pub async fn connect() -> Self {
        Self::connect_to(&amqp_url()).await
    }

    /// A connection to the RabbitMQ at `url` (e.g. a [`PrivateRabbit`]).
    pub async fn connect_to(url: &str) -> Self {
        let conn = Connection::connect(url, ConnectionProperties::default()).await.unwrap_or_else(|e| {
            panic!("RabbitMQ at {url} (AMQP_URL, default 127.0.0.1:5672: scripts/test starts it): {e}")
        });
        let channel = conn.create_channel().await.expect("channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
        Rabbit { conn, channel, queues: Vec::new() }
    }

    /// Declare a durable queue, remembered for deletion (with its `.dlq`) at the end.
    pub async fn queue(&mut self, name: &str) {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("declare queue");
        self.queues.push(name.to_string());
        self.queues.push(format!("{name}.dlq"));
    }

    /// Publish persistent messages through the default exchange to `queue`, each with
    /// its id and headers; waits for every confirm.
    pub async fn publish(&self, queue: &str, messages: &[Outgoing]) {
        let mut confirms = Vec::with_capacity(messages.len());
        for (id, body, headers) in messages {
            let mut table = FieldTable::default();
            for (k, v) in headers {
                table.insert((*k).into(), AMQPValue::LongString(v.as_str().into()));
            }
            let props = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_timestamp(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                )
                .with_headers(table);
            let c = self
                .channel
                .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, props)
                .await
                .expect("publish");
            confirms.push(c);
        }
        for c in confirms {
            assert!(c.await.expect("confirm").is_ack(), "broker nacked a test publish");
        }
    }

    /// Messages ready in `queue` (passive declare: exact, unlike the management API).
    pub async fn count(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.expect("channel");
        let n = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count())
            .unwrap_or(0);
        let _ = ch.close(200, "".into()).await;
        n
    }

    /// Take every message currently in `queue` (acked: the queue is emptied).
    pub async fn drain(&self, queue: &str) -> Vec<Got> {
        let mut out = Vec::new();
        while let Ok(Some(m)) = self.channel.basic_get(queue.into(), BasicGetOptions::default()).await {
            let d = m.delivery;
            let headers = d
                .properties
                .headers()
                .as_ref()
                .map(|t| {
                    t.inner()
                        .iter()
                        .map(|(k, v)| {
                            let v = match v {
                                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                                AMQPValue::ShortString(s) => s.as_str().to_string(),
                                other => format!("{other:?}"),
                            };
                            (k.as_str().to_string(), v)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let _ = d.acker.ack(BasicAckOptions::default()).await;
            out.push(Got {
                id: d.properties.message_id().as_ref().map(|s| s.as_str().to_string()).unwrap_or_default(),
                body: d.data,
                routing_key: d.routing_key.as_str().to_string(),
                headers,
            });
        }
        out
    }

    /// Consume-count helper for large queues (faster than basic_get).
    pub async fn drain_ids(&self, queue: &str, expect_at_least: usize, timeout: Duration) -> Vec<String> {
        let ch = self.conn.create_channel().await.expect("channel");
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut ids = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while ids.len() < expect_at_least {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    ids.push(d.properties.message_id().as_ref().map(|s| s.as_str().to_string()).unwrap_or_default())
                }
                _ => break,
            }
        }
        let _ = ch.close(200, "".into()).await;
        ids
    }

    /// Delete the queues this test declared (and their dead-letter queues).
    /// Delete `queue` now (a destination that no longer exists).
    pub async fn delete_queue(&self, queue: &str) {
        self.channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await.expect("queue.delete");
    }

    pub async fn cleanup(self) {
        for q in &self.queues {
            let _ = self.channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
        }
        let _ = self.conn.close(200, "".into()).await;
    }
}

/// The crash tests' mix, by message index: 1 in 20 fails once (a durable retry), 1 in
/// 50 is poison (rejected, dead-lettered), the rest take 2 ms.
pub fn crash_mix(i: usize) -> Vec<(&'static str, String)> {
    let b = if i % 50 == 1 {
        "reject"
    } else if i.is_multiple_of(20) {
        "fail-until:2"
    } else {
        "slow:2"
    };
    vec![("behave", b.to_string())]
}

/// Whether [`crash_mix`] made message `id` poison.
pub fn is_poison(id: &str) -> bool {
    index_of(id) % 50 == 1
}

/// The index `i` of a message id `{prefix}-{i}`.
pub fn index_of(id: &str) -> usize {
    id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(usize::MAX)
}

/// `n` messages with ids `{prefix}-{i}`, a JSON body, and `headers(i)`.
pub fn batch(prefix: &str, n: usize, headers: impl Fn(usize) -> Vec<(&'static str, String)>) -> Vec<Outgoing> {
    (0..n).map(|i| (format!("{prefix}-{i}"), format!("{{\"n\":{i}}}").into_bytes(), headers(i))).collect()
}

/// A router config for one subscription on `queue` delivering to `endpoints`.
pub fn config(queue: &str, endpoints: &[String], extra_handler: &str, extra_sub: &str) -> String {
    config_at(&amqp_url(), queue, endpoints, extra_handler, extra_sub)
}

/// [`config`] against the RabbitMQ at `url`.
pub fn config_at(url: &str, queue: &str, endpoints: &[String], extra_handler: &str, extra_sub: &str) -> String {
    let eps = endpoints.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{{admin}}" }}
shutdown: {{ grace_period: 10s }}
transports:
  rabbit: {{ type: amqp, url: "{url}", reconnect_max_delay: 1s }}
handlers:
  php: {{ endpoints: [{eps}], timeout: 5s {extra_handler} }}
subscriptions:
  main:
    transport: rabbit
    queue: {queue}
    prefetch: 32
    retry: {{ max_attempts: 3, initial_delay: 200ms, multiplier: 2, max_delay: 2s, jitter: 0 }}
    {extra_sub}
routes:
  - {{ name: work, match: {{ routing_key: "{queue}" }}, handler: php }}
"#
    )
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One stream entry as a test reads it back.
#[derive(Clone, Debug)]
pub struct StreamEntry {
    pub id: String,
    pub fields: BTreeMap<String, Vec<u8>>,
}

impl StreamEntry {
    pub fn text(&self, field: &str) -> String {
        self.fields.get(field).map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default()
    }
}

/// A test's own Redis connection: publish entries, read streams back, count pending.
pub struct Redis {
    pub conn: redis::aio::MultiplexedConnection,
}

impl Redis {
    pub async fn connect() -> Self {
        Self::connect_to(&redis_url()).await
    }

    pub async fn connect_to(url: &str) -> Self {
        let client = redis::Client::open(url).expect("redis url");
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("connect to Redis (scripts/setup starts it)");
        Redis { conn }
    }

    /// XADD each message (pipelined): field `body`, field `message_id` = its id, and
    /// its headers as fields.
    pub async fn publish(&mut self, stream: &str, messages: &[Outgoing]) {
        for chunk in messages.chunks(500) {
            let mut pipe = redis::pipe();
            for (id, body, headers) in chunk {
                let cmd = pipe.cmd("XADD").arg(stream).arg("*").arg("body").arg(body.as_slice());
                cmd.arg("message_id").arg(id);
                for (k, v) in headers {
                    cmd.arg(*k).arg(v);
                }
            }
            let _: Vec<String> = pipe.query_async(&mut self.conn).await.expect("XADD");
        }
    }

    /// XADD one entry with exactly these fields.
    pub async fn xadd(&mut self, stream: &str, fields: &[(&str, &[u8])]) -> String {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        cmd.query_async(&mut self.conn).await.expect("XADD")
    }

    pub async fn entries(&mut self, stream: &str) -> Vec<StreamEntry> {
        type Raw = Vec<(String, Vec<(String, Vec<u8>)>)>;
        let raw: Raw =
            redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query_async(&mut self.conn).await.expect("XRANGE");
        raw.into_iter().map(|(id, fields)| StreamEntry { id, fields: fields.into_iter().collect() }).collect()
    }

    /// Entries delivered to `group` and not yet acked.
    pub async fn pending(&mut self, stream: &str, group: &str) -> u64 {
        let summary: redis::Value =
            redis::cmd("XPENDING").arg(stream).arg(group).query_async(&mut self.conn).await.expect("XPENDING");
        match summary {
            redis::Value::Array(parts) => match parts.first() {
                Some(redis::Value::Int(n)) => *n as u64,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Wait until `group` has nothing pending on `stream`.
    pub async fn wait_acked(&self, stream: &str, group: &str, timeout: Duration) {
        wait_for(&format!("nothing pending on {stream}"), timeout, || {
            let mut r = Redis { conn: self.conn.clone() };
            let (stream, group) = (stream.to_string(), group.to_string());
            async move { r.pending(&stream, &group).await == 0 }
        })
        .await;
    }

    pub async fn zcard(&mut self, key: &str) -> u64 {
        redis::cmd("ZCARD").arg(key).query_async(&mut self.conn).await.expect("ZCARD")
    }

    /// Delete a test's streams and what the router made beside them.
    pub async fn cleanup(mut self, streams: &[&str], group: &str) {
        for s in streams {
            let keys =
                [s.to_string(), format!("{s}.dlq"), format!("{s}.{group}.retry"), format!("{s}.{group}.delayed")];
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut self.conn).await;
        }
    }
}

/// A router config for one Redis subscription reading `streams` with `group` as
/// `consumer`, delivering to `endpoints`.
pub fn redis_config(streams: &[&str], group: &str, consumer: &str, endpoints: &[String], extra_sub: &str) -> String {
    redis_config_at(&redis_url(), streams, group, consumer, endpoints, extra_sub)
}

pub fn redis_config_at(
    url: &str,
    streams: &[&str],
    group: &str,
    consumer: &str,
    endpoints: &[String],
    extra_sub: &str,
) -> String {
    let eps = endpoints.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
    let streams = streams.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{{admin}}" }}
shutdown: {{ grace_period: 10s }}
transports:
  redis: {{ type: redis, url: "{url}", consumer: "{consumer}", reconnect_max_delay: 1s }}
handlers:
  php: {{ endpoints: [{eps}], timeout: 5s }}
subscriptions:
  main:
    transport: redis
    streams: [{streams}]
    group: {group}
    prefetch: 32
    claim_idle: 10s
    retry: {{ max_attempts: 3, initial_delay: 200ms, multiplier: 2, max_delay: 2s, jitter: 0 }}
    {extra_sub}
routes:
  - {{ name: work, handler: php }}
"#
    )
}

pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// One record as a test reads it back.
#[derive(Clone, Debug)]
pub struct KafkaRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl KafkaRecord {
    pub fn header(&self, name: &str) -> String {
        self.headers.get(name).cloned().unwrap_or_default()
    }
}

/// A test's own Kafka clients: create topics, produce, read topics back, offsets.
pub struct Kafka {
    brokers: String,
    producer: rdkafka::producer::FutureProducer,
    admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
}

impl Kafka {
    /// Clients of the shared test broker (scripts/setup starts it).
    pub fn connect() -> Self {
        Self::connect_to(&kafka_brokers())
    }

    pub fn connect_to(brokers: &str) -> Self {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", brokers);
        // One record per batch: tansu 0.6 (the test broker) serves a fetch only from
        // the start of a record batch, so a consumer resuming at a committed offset
        // inside a batch would get nothing (a real Kafka broker returns the batch).
        let producer = c.clone().set("acks", "all").set("batch.num.messages", "1").create().expect("kafka producer");
        let admin = c.create().expect("kafka admin");
        Kafka { brokers: brokers.to_string(), producer, admin }
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let res = self.admin.create_topics(&[topic], &AdminOptions::new()).await.expect("create topic");
        for r in res {
            if let Err((t, code)) = r {
                assert_eq!(code, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists, "creating {t}");
            }
        }
    }

    /// Produce each message (awaited, acks=all) with header `message_id` = its id, its
    /// headers, and record key `key(i)`.
    pub async fn publish(&self, topic: &str, messages: &[Outgoing], key: impl Fn(usize) -> Option<String>) {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::FutureRecord;
        let mut pending = Vec::new();
        for (i, (id, body, headers)) in messages.iter().enumerate() {
            let mut h = OwnedHeaders::new().insert(Header { key: "message_id", value: Some(id.as_bytes()) });
            for (k, v) in headers {
                h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
            }
            let k = key(i);
            let mut record = FutureRecord::to(topic).payload(body.as_slice()).headers(h);
            if let Some(k) = &k {
                record = record.key(k.as_bytes());
            }
            pending.push(self.producer.send_result(record).map_err(|(e, _)| e).expect("queue record"));
        }
        for p in pending {
            p.await.expect("delivery").map_err(|(e, _)| e).expect("produced");
        }
    }

    /// Every record of `topic` (all partitions), read with a group of its own; waits
    /// until at least `at_least` arrived or `timeout` passed.
    pub async fn read(&self, topic: &str, at_least: usize, timeout: Duration) -> Vec<KafkaRecord> {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::message::{Headers, Message};
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", unique("reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader");
        consumer.subscribe(&[topic]).expect("subscribe");
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < at_least && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left.min(Duration::from_millis(500)), consumer.recv()).await {
                Ok(Ok(m)) => out.push(KafkaRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| {
                                    (
                                        h.key.to_string(),
                                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                }),
                _ => continue,
            }
        }
        out
    }

    /// The offset `group` committed for `topic`/`partition` (-1 when none).
    pub fn committed(&self, group: &str, topic: &str, partition: i32) -> i64 {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .create()
            .expect("offset reader");
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let got = consumer.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
        let offset = got.elements().first().map(|e| e.offset());
        drop(got);
        match offset {
            Some(rdkafka::Offset::Offset(o)) => o,
            _ => -1,
        }
    }

    pub async fn delete_topics(&self, topics: &[&str]) {
        let _ = self.admin.delete_topics(topics, &rdkafka::admin::AdminOptions::new()).await;
    }
}

/// A tansu broker of the test's own (so killing it disturbs no other test), keeping its
/// data in SQLite under the scratch directory, so what it acknowledged survives a
/// SIGKILL. The binary is the one scripts/setup builds (`TANSU_BIN` overrides).
pub struct Tansu {
    proc: Proc,
    host: String,
    port: u16,
    db: PathBuf,
    log: PathBuf,
}

impl Tansu {
    pub async fn start(dir: &Scratch) -> Self {
        Self::start_on(dir, "127.0.0.1").await
    }

    /// Listen on `host` (e.g. the host side of a [`FaultNet`]), and advertise that
    /// address in metadata: a Kafka client connects to the advertised listener after
    /// bootstrap, so it must be the address the router reaches.
    pub async fn start_on(dir: &Scratch, host: &str) -> Self {
        let port = free_port();
        let (db, log) = (dir.path(&format!("tansu-{port}.db")), dir.path(&format!("tansu-{port}.log")));
        let proc = Self::spawn(host, port, &db, &log);
        let t = Tansu { proc, host: host.to_string(), port, db, log };
        t.wait_listening().await;
        t
    }

    pub fn brokers(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Start it again on the same port and data.
    pub async fn restart(&mut self) {
        self.proc.kill();
        self.proc = Self::spawn(&self.host, self.port, &self.db, &self.log);
        self.wait_listening().await;
    }

    fn spawn(host: &str, port: u16, db: &Path, log: &Path) -> Proc {
        let bin = std::env::var("TANSU_BIN").map(PathBuf::from).unwrap_or_else(|_| setup_cache().join("bin/tansu"));
        let url = format!("tcp://{host}:{port}");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("tansu log");
        let err = out.try_clone().expect("tansu log");
        let child = Command::new(&bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            // tansu takes the path of a sqlite:// URL as relative: an absolute one needs "//".
            .args(["--storage-engine", &format!("sqlite:///{}", db.display())])
            .env(netfault::OWNER_ENV, netfault::owner_tag())
            .process_group(0)
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts (scripts/setup builds it): {e}", bin.display()));
        Proc { child, name: format!("tansu:{host}:{port}") }
    }

    async fn wait_listening(&self) {
        let addr = self.brokers();
        wait_for("tansu to listen", Duration::from_secs(20), || async { std::net::TcpStream::connect(&addr).is_ok() })
            .await;
    }
}

/// A router config for one Kafka subscription reading `topics` with `group`.
pub fn kafka_config(topics: &[&str], group: &str, endpoints: &[String], extra_sub: &str) -> String {
    kafka_config_at(&kafka_brokers(), topics, group, endpoints, extra_sub)
}

/// [`kafka_config`] against the brokers `brokers` (e.g. a [`Tansu`]'s).
pub fn kafka_config_at(brokers: &str, topics: &[&str], group: &str, endpoints: &[String], extra_sub: &str) -> String {
    let eps = endpoints.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
    let topics = topics.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{{admin}}" }}
shutdown: {{ grace_period: 10s }}
transports:
  # A killed instance's partitions move after the session timeout, and a rebalance
  # waits for members that went silent up to max.poll.interval.ms: keep both short.
  # One record per batch: see Kafka::connect (tansu fetches only from batch starts).
  kafka:
    type: kafka
    brokers: ["{brokers}"]
    properties: {{ session.timeout.ms: "6000", max.poll.interval.ms: "10000", heartbeat.interval.ms: "500", batch.num.messages: "1" }}
handlers:
  php: {{ endpoints: [{eps}], timeout: 5s }}
subscriptions:
  main:
    transport: kafka
    topics: [{topics}]
    group: {group}
    prefetch: 32
    retry: {{ max_attempts: 3, initial_delay: 200ms, multiplier: 2, max_delay: 2s, jitter: 0 }}
    {extra_sub}
routes:
  - {{ name: work, handler: php }}
"#
    )
}
