//! Brokers of a test's own, bound to a given address (the host side of a
//! [`crate::FaultNet`], or 127.0.0.1) on free ports, with their data in the test's
//! scratch directory, killed when dropped: a test may stop, kill and restart them
//! without disturbing the shared brokers other developers' tests use.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::netfault::{owner_tag, OWNER_ENV};
use crate::{free_port, wait_for, Proc, Scratch};

/// Where Debian keeps RabbitMQ's own scripts. `/usr/sbin/rabbitmq-server` is a wrapper
/// that switches to the `rabbitmq` user (whose cookie and directories belong to the
/// shared node): the private node runs the real scripts as the test's user instead.
fn rabbit_script(name: &str) -> PathBuf {
    let direct = Path::new("/usr/lib/rabbitmq/bin").join(name);
    if direct.exists() {
        return direct;
    }
    PathBuf::from(name)
}

/// A RabbitMQ node of the test's own: node name `mrf<pid>x<n>@localhost`, AMQP on
/// `host:port`, distribution on 127.0.0.1 only, an epmd of its own (so nothing it does
/// reaches the shared node's epmd), no plugins (no management listener to clash), its
/// cookie, Mnesia data, logs and pid file under the scratch directory, and `guest`
/// allowed from any address (the router connects from a namespace, not loopback).
pub struct PrivateRabbit {
    server: Option<Proc>,
    _epmd: Proc,
    pub node: String,
    host: String,
    pub port: u16,
    epmd_port: u16,
    dist_port: u16,
    base: PathBuf,
}

impl PrivateRabbit {
    /// Start the node and wait until it serves AMQP.
    pub async fn start(dir: &Scratch, host: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let node = format!("mrf{}x{n}@localhost", std::process::id());
        let base = dir.0.join(format!("rabbit-{}", node.replace('@', "-")));
        let home = base.join("home");
        std::fs::create_dir_all(&home).expect("rabbit home");
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, uuid::Uuid::new_v4().simple().to_string().to_uppercase()).expect("cookie");
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400)).expect("cookie mode");
        std::fs::write(base.join("enabled_plugins"), "[].\n").expect("plugins file");
        std::fs::write(base.join("rabbitmq-env.conf"), "").expect("env file");
        // guest may log in from the namespace's address; a small disk limit keeps a
        // full /tmp from raising an alarm that would block publishers mid-test.
        std::fs::write(base.join("rabbitmq.conf"), "loopback_users = none\ndisk_free_limit.absolute = 10MB\n")
            .expect("rabbitmq.conf");
        let epmd_port = free_port();
        let epmd = Command::new("epmd")
            .args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
            .env(OWNER_ENV, owner_tag())
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("epmd (comes with rabbitmq-server: scripts/setup installs it)");
        let epmd = Proc { child: epmd, name: format!("epmd:{epmd_port}") };
        wait_for("epmd to listen", Duration::from_secs(10), || async move {
            std::net::TcpStream::connect(("127.0.0.1", epmd_port)).is_ok()
        })
        .await;
        let mut rabbit = PrivateRabbit {
            server: None,
            _epmd: epmd,
            node,
            host: host.to_string(),
            port: free_port(),
            epmd_port,
            dist_port: free_port(),
            base,
        };
        // A port taken between choosing and binding fails the boot: again on new ones.
        for tries in 1.. {
            rabbit.spawn();
            match rabbit.booted().await {
                Ok(()) => break,
                Err(e) if tries < 3 => {
                    eprintln!("{} did not start ({e}); again on other ports", rabbit.node);
                    // New ports first: kill9 waits for the port to close, and the old
                    // one may be another process's.
                    (rabbit.port, rabbit.dist_port) = (free_port(), free_port());
                    rabbit.kill9();
                }
                Err(e) => panic!("{e}"),
            }
        }
        rabbit
    }

    /// `amqp://guest:guest@host:port/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}:{}/%2f", self.host, self.port)
    }

    /// The node's log file (RabbitMQ's own).
    pub fn log(&self) -> PathBuf {
        self.base.join("log").join(format!("{}.log", self.node))
    }

    fn env(&self, cmd: &mut Command) {
        let b = |p: &str| self.base.join(p);
        cmd.env("HOME", b("home"))
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", &self.host)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", b("mnesia"))
            .env("RABBITMQ_LOG_BASE", b("log"))
            .env("RABBITMQ_PID_FILE", b("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", b("enabled_plugins"))
            // Not /etc/rabbitmq/*: the shared node's files name its node and listener.
            .env("RABBITMQ_CONF_ENV_FILE", b("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", b("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", b("advanced.config"))
            // Distribution (rabbitmqctl's way in) on loopback only.
            .env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            .env(OWNER_ENV, owner_tag());
    }

    fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.base.join("server.out"))
            .expect("rabbit output");
        let err = out.try_clone().expect("rabbit output");
        let mut cmd = Command::new(rabbit_script("rabbitmq-server"));
        self.env(&mut cmd);
        // The script runs beam in the background and waits: beam shares its process
        // group, so Proc::kill (the group) kills the node.
        let child = cmd
            .current_dir(&self.base)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("rabbitmq-server starts (scripts/setup installs it)");
        self.server = Some(Proc { child, name: format!("rabbit:{}", self.node) });
    }

    /// Run `rabbitmqctl -n NODE args…` against this node only; its output, or the
    /// failure with what it printed.
    pub async fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(rabbit_script("rabbitmqctl"));
        self.env(&mut cmd);
        cmd.args(["-n", &self.node]).args(args).stdin(Stdio::null());
        let out = tokio::process::Command::from(cmd).output().await.map_err(|e| e.to_string())?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    }

    /// Wait until the node says it has booted and AMQP listens (60 s at most).
    pub async fn await_startup(&mut self) {
        if let Err(e) = self.booted().await {
            panic!("{e}");
        }
    }

    /// The node first, then its port: a port chosen free can be taken by another
    /// test's process before the node binds it, and a connect would then reach that
    /// process. The node registers with its epmd early in its boot; `await_startup`
    /// then waits for the boot to finish (and fails if it cannot bind its port).
    async fn booted(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.registered() {
            if let Some(s) = self.server.as_mut() {
                if let Ok(Some(status)) = s.child.try_wait() {
                    return Err(format!("{} exited ({status}) before it registered:\n{}", self.node, self.output()));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("{} did not register with its epmd within 60 s:\n{}", self.node, self.output()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Err(e) = self.ctl(&["await_startup", "--timeout", "60"]).await {
            return Err(format!("{} await_startup: {e}\n{}", self.node, self.output()));
        }
        let addr = format!("{}:{}", self.host, self.port);
        while std::net::TcpStream::connect(&addr).is_err() {
            if Instant::now() >= deadline {
                return Err(format!("{} booted but not listening on {addr}:\n{}", self.node, self.output()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    fn output(&self) -> String {
        let out = std::fs::read_to_string(self.base.join("server.out")).unwrap_or_default();
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let tail =
            |s: &str| s.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        format!("{}\n--- {}:\n{}", tail(&out), self.log().display(), tail(&log))
    }

    /// `rabbitmqctl stop_app`: the node stays up, AMQP goes away (connections closed).
    pub async fn stop_app(&self) {
        self.ctl(&["stop_app"]).await.unwrap_or_else(|e| panic!("stop_app on {}: {e}", self.node));
    }

    /// `rabbitmqctl start_app`, then wait until AMQP listens.
    pub async fn start_app(&mut self) {
        self.ctl(&["start_app"]).await.unwrap_or_else(|e| panic!("start_app on {}: {e}", self.node));
        self.await_startup().await;
    }

    /// Close every client connection of this node (`close_all_connections`).
    pub async fn close_connections(&self) {
        self.ctl(&["close_all_connections", "closed by the test"])
            .await
            .unwrap_or_else(|e| panic!("close_all_connections on {}: {e}", self.node));
    }

    /// SIGKILL the node (beam with its launcher script), and wait until it is gone: its
    /// AMQP port refuses and epmd no longer knows its name (a beam whose main thread is
    /// already a zombie can still hold both for a while, and a node started again
    /// before epmd forgot the old one is refused its name).
    pub fn kill9(&mut self) {
        let beam = std::fs::read_to_string(self.base.join("pid")).ok().and_then(|p| p.trim().parse::<i32>().ok());
        if let Some(mut s) = self.server.take() {
            s.kill();
        }
        if let Some(pid) = beam {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(self.base.join("pid"));
        let addr = format!("{}:{}", self.host, self.port);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_ok() || self.registered() {
            assert!(Instant::now() < deadline, "{} still up 20 s after kill -9", self.node);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether this node's epmd lists the node.
    fn registered(&self) -> bool {
        let short = self.node.split('@').next().unwrap_or_default();
        Command::new("epmd")
            .args(["-port", &self.epmd_port.to_string(), "-names"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with(&format!("name {short} at"))))
            .unwrap_or(false)
    }

    /// Start the node again on the same data (killing it first if it runs), and wait
    /// until it serves AMQP.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.await_startup().await;
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A Redis server of the test's own on `host`, a free port, its directory in the
/// scratch directory, no RDB snapshots; with `aof`, every write fsynced (what Redis
/// acknowledged survives a SIGKILL).
pub struct PrivateRedis {
    proc: Proc,
    host: String,
    pub port: u16,
    dir: PathBuf,
    aof: bool,
}

impl PrivateRedis {
    pub async fn start(dir: &Scratch, host: &str, aof: bool) -> Self {
        let port = free_port();
        let dir = dir.0.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let proc = Self::spawn(host, port, &dir, aof);
        let r = PrivateRedis { proc, host: host.to_string(), port, dir, aof };
        r.wait_ready().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}", self.host, self.port)
    }

    fn spawn(host: &str, port: u16, dir: &Path, aof: bool) -> Proc {
        let mut cmd = Command::new("redis-server");
        // Protected mode refuses clients from any address but loopback when there is no
        // password: the router connects from its namespace.
        cmd.args(["--bind", host, "--port", &port.to_string(), "--save", "", "--protected-mode", "no"]).args([
            "--dir",
            dir.to_str().unwrap_or_default(),
            "--logfile",
            "redis.log",
        ]);
        if aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .env(OWNER_ENV, owner_tag())
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (scripts/setup installs it)");
        Proc { child, name: format!("redis:{host}:{port}") }
    }

    async fn wait_ready(&self) {
        let url = self.url();
        wait_for("redis-server answers", Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                let Ok(client) = redis::Client::open(url) else { return false };
                let Ok(mut c) = client.get_multiplexed_async_connection().await else { return false };
                redis::cmd("PING").query_async::<String>(&mut c).await.is_ok()
            }
        })
        .await;
    }

    pub fn kill9(&mut self) {
        self.proc.kill();
    }

    /// Start it again on the same port and data (killing it first if it runs).
    pub async fn restart(&mut self) {
        self.proc.kill();
        self.proc = Self::spawn(&self.host, self.port, &self.dir, self.aof);
        self.wait_ready().await;
    }
}
