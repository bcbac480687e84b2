//! Real network faults between the router and what it talks to: the router runs in a
//! network namespace of its own ([`FaultNet`]), joined to the host by a veth pair, and
//! the brokers and handlers it uses listen on the host side of that pair. Faults act on
//! the packets crossing the pair, in the kernel, so the router's TCP stack sees what it
//! would see on a bad network (retransmits, silent stalls, resets). The test's own
//! clients talk to the same brokers from the host over loopback and are never hit.
//!
//! How each fault is made (measured on this machine's kernel, 6.18 "fc", as root):
//!
//! - `tc netem` is not available: the kernel is built without `CONFIG_NET_SCH_NETEM`
//!   (`tc qdisc add ... netem` answers "Specified qdisc kind is unknown"), and without
//!   `sch_fq` or the gact action, so neither netem nor an eBPF departure-time scheme can
//!   delay packets. Delay is therefore made with NFQUEUE: `iptables -j NFQUEUE` in the
//!   namespace hands each crossing packet to a thread of the test process ([`Delayer`],
//!   a netlink socket opened inside the namespace), which gives the verdict "accept"
//!   only once the delay has passed. The packet really waits in the kernel, so TCP sees
//!   a longer round trip, nothing else. Packets stay in order within a delay rule: the
//!   jitter never lets one overtake the one queued before it.
//! - Loss and partition are iptables rules in the namespace (`-m statistic --mode
//!   random` and plain `DROP`), in INPUT for what comes from the host and OUTPUT for
//!   what goes to it, so both directions lose packets. Measured: a DROP in OUTPUT stays
//!   silent for TCP (connect() and send() do not fail, the kernel retransmits), so a
//!   partition hangs connections instead of failing them fast, like a cable pulled
//!   somewhere in between. All rules live in the namespace (written at once with
//!   `iptables-restore`), none in the host's shared ruleset.
//! - Reset: `ss -K` (sock_diag destroy, `CONFIG_INET_DIAG_DESTROY=y` here) run in the
//!   host namespace on the host-side sockets of connections with the namespace
//!   (`dst NS_IP`, an address only this FaultNet uses). The kernel aborts those sockets
//!   and sends an RST, so the router gets ECONNRESET ("Connection reset by peer") at
//!   once, and the broker or handler sees its socket aborted. The connections are
//!   listed first and killed by port, then the same ports inside the namespace (an RST
//!   a partition dropped, a SYN in flight): a reconnect the router makes within
//!   milliseconds has a new port and survives (killing by address alone aborted it as
//!   well, measured with librdkafka, which reconnected in 7 ms). Measured
//!   alternative, rejected: an `iptables -j REJECT --reject-with tcp-reset` rule only
//!   answers packets that arrive; an idle connection (AMQP between heartbeats, a Redis
//!   blocked read) stayed ESTABLISHED on both sides, and only the side that sent got
//!   the RST.
//!
//! Everything a FaultNet creates carries the owner's identity (pid and start time):
//! namespace `mrf-<pid>-<start>-<n>`, host link `mrf<pid>h<n>`, processes the
//! environment variable `MRF_OWNER`, scratch directories `/tmp/mrf-<pid>.<start>-…`.
//! Creating a FaultNet first sweeps what owners that no longer run left behind (a test
//! process killed mid-run), under a file lock, and leaves alone what belongs to a test
//! process still running.

use std::collections::{BinaryHeap, HashMap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::Scratch;

/// The environment variable naming the test process that owns a process.
pub const OWNER_ENV: &str = "MRF_OWNER";

/// Whether the tests run as root (network namespaces, iptables and `ss -K` need it).
/// Prints "SKIPPED: needs root" when not.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED: needs root ({test}: the fault harness needs network namespaces, iptables, ss -K)");
    }
    root
}

/// This process's identity: `<pid>.<start time in clock ticks since boot>` (a pid alone
/// can be reused by an unrelated process after the owner died).
pub fn owner_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let pid = std::process::id();
        format!("{pid}.{}", start_time(pid).unwrap_or(0))
    })
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether the owner `<pid>.<start>` still runs.
fn owner_alive(tag: &str) -> bool {
    let Some((pid, start)) = tag.split_once('.') else { return false };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else { return false };
    start_time(pid) == Some(start)
}

/// A scratch directory whose name carries this process's identity, so a later
/// [`FaultNet::new`] removes it if this process is killed before its drop.
pub fn owned_scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("mrf-{}-{}", owner_tag(), crate::unique(name)));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    Scratch(dir)
}

/// Run `ip`/`iptables`/`ss` quietly; panics with the output when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

/// The cross-process lock held while sweeping and creating namespaces, so one test
/// process never removes another's half-made namespace.
struct SetupLock(std::fs::File);

impl SetupLock {
    fn take() -> Self {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/lock/mrf-faultnet.lock")
            .or_else(|_| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(std::env::temp_dir().join("mrf-faultnet.lock"))
            })
            .expect("faultnet lock file");
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        SetupLock(f)
    }
}

impl Drop for SetupLock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// How long a dead owner's scratch directory stays (a failed test's evidence).
const KEEP: Duration = Duration::from_secs(3600);

/// Remove what dead owners left: processes tagged with their `MRF_OWNER`, namespaces
/// `mrf-<pid>-<start>-<n>`, host links `mrf<pid>h<n>` without a live namespace, and
/// scratch directories `mrf-<pid>.<start>-…` untouched for an hour. Returns what it
/// removed, for the log.
pub fn sweep() -> Vec<String> {
    let mut removed = Vec::new();
    // Processes first: a namespace with processes in it outlives `ip netns del`, and so
    // does its veth pair.
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else { continue };
        let tag = env.split(|b| *b == 0).find_map(|kv| kv.strip_prefix(format!("{OWNER_ENV}=").as_bytes()));
        if let Some(tag) = tag.map(|t| String::from_utf8_lossy(t).into_owned()) {
            if !owner_alive(&tag) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                removed.push(format!("process {pid} of {tag}"));
            }
        }
    }
    let mut live = Vec::new();
    for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("mrf-") else { continue };
        let parts: Vec<&str> = rest.split('-').collect();
        let [pid, start, n] = parts[..] else { continue };
        if owner_alive(&format!("{pid}.{start}")) {
            live.push(format!("mrf{pid}h{n}"));
            continue;
        }
        kill_inside(&name);
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        removed.push(format!("namespace {name}"));
    }
    let links = Command::new("ip").args(["-o", "link", "show"]).output().map(|o| o.stdout).unwrap_or_default();
    for line in String::from_utf8_lossy(&links).lines() {
        // "12: mrf123h0@if11: <...>"
        let Some(name) = line.split(": ").nth(1).map(|s| s.split('@').next().unwrap_or(s)) else { continue };
        let is_ours = name.strip_prefix("mrf").is_some_and(|r| r.contains('h'));
        if is_ours && !live.iter().any(|l| l == name) {
            let _ = Command::new("ip").args(["link", "del", name]).stderr(Stdio::null()).status();
            removed.push(format!("link {name}"));
        }
    }
    for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Some(tag) = name.strip_prefix("mrf-").and_then(|r| r.split('-').next()) else { continue };
        // A failed test keeps its scratch directory to be looked at: leave an hour.
        let old = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().unwrap_or_default() > KEEP);
        if tag.contains('.') && old && !owner_alive(tag) {
            let _ = std::fs::remove_dir_all(entry.path());
            removed.push(format!("scratch {name}"));
        }
    }
    removed
}

/// SIGKILL every process in namespace `name`.
fn kill_inside(name: &str) {
    let pids = Command::new("ip").args(["netns", "pids", name]).output().map(|o| o.stdout).unwrap_or_default();
    for pid in String::from_utf8_lossy(&pids).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Run `f` on a fresh thread whose network namespace is `/run/netns/{name}`; sockets
/// it opens stay in that namespace after the thread ends.
fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> std::io::Result<T> {
    let path = PathBuf::from("/run/netns").join(name);
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path)?;
        // SAFETY: setns on a thread of our own; it changes only this thread's namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| std::io::Error::other("namespace thread panicked"))?
}

/// A TCP connection opened from inside namespace `name`.
pub fn connect_in(name: &str, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    in_netns(name, move || TcpStream::connect_timeout(&addr, timeout))?
}

/// `GET path` on `127.0.0.1:port` inside namespace `name` (HTTP/1.0, the connection
/// closes after the answer): the status and body, or None when nothing answered.
/// Used for the router's admin server, which a router in a namespace binds on the
/// namespace's own loopback: no fault on the veth can touch these queries.
pub fn http_get_in(name: &str, port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let mut s = connect_in(name, SocketAddr::from(([127, 0, 0, 1], port)), timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// One fault, optionally limited to the traffic with one host-side port.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Delay { ms: u64, jitter_ms: u64 },
    Loss(f64),
    Partition,
}

impl Fault {
    fn same_kind(&self, other: &Fault) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// The veth end inside the namespace.
const NS_IF: &str = "vf0";

/// At most this many distinct delays at once (one NFQUEUE queue each).
const QUEUES: u16 = 8;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a veth pair to the host: host side `host_ip()/30`,
/// namespace side `ns_ip()/30`, loopback up inside. Faults apply to everything
/// crossing the pair (both directions), or with [`FaultNet::port`] only to the
/// traffic with one host-side port (one broker, one handler). Dropping it removes the
/// namespace, the pair and the rules.
pub struct FaultNet {
    name: String,
    host_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    faults: Mutex<Vec<(Option<u16>, Fault)>>,
    delayer: Mutex<Option<Delayer>>,
}

impl FaultNet {
    /// Sweep what killed runs left, then create the namespace and the pair.
    pub fn new() -> Self {
        let started = Instant::now();
        let lock = SetupLock::take();
        let removed = sweep();
        if !removed.is_empty() {
            eprintln!("faultnet: swept what killed runs left: {}", removed.join(", "));
        }
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed) % 1000;
        let start = owner_tag().split_once('.').map_or("0", |(_, s)| s);
        let name = format!("mrf-{pid}-{start}-{n}");
        let host_if = format!("mrf{pid}h{n}");
        let (host_ip, ns_ip) = free_subnet(pid, n);
        ip(&["netns", "add", &name]);
        let net = FaultNet {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip,
            ns_ip,
            faults: Mutex::new(Vec::new()),
            delayer: Mutex::new(None),
        };
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", NS_IF, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", &name, "addr", "add", &format!("{ns_ip}/30"), "dev", NS_IF]);
        ip(&["-n", &name, "link", "set", NS_IF, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        drop(lock);
        // The pair carries traffic once both ends have a carrier: wait for that here, so
        // the first connection of a test does not race it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ip(&["-o", "link", "show", &host_if]).contains("LOWER_UP") {
            assert!(Instant::now() < deadline, "veth {host_if} has no carrier after 5 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!(
            "faultnet: {name}: host {host_if} {host_ip}, namespace {NS_IF} {ns_ip}, ready in {:?}",
            started.elapsed()
        );
        net
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host side's address: brokers and handlers the router must reach through
    /// the faults listen here.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// The namespace side's address (the router's source address).
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME
    /// program`: the pid is the program's own once it runs), tagged with this test
    /// process as its owner.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program).env(OWNER_ENV, owner_tag());
        c
    }

    /// A TCP connection opened from inside the namespace.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        connect_in(&self.name, addr, timeout)
    }

    /// Faults limited to the traffic between the namespace and host-side port `port`.
    pub fn port(&self, port: u16) -> Scope<'_> {
        Scope { net: self, port: Some(port) }
    }

    fn all(&self) -> Scope<'_> {
        Scope { net: self, port: None }
    }

    /// Every packet crossing waits `ms` (± `jitter_ms`, uniform) in each direction: a
    /// round trip grows by 2 × `ms`.
    pub fn delay(&self, ms: u64, jitter_ms: u64) {
        self.all().delay(ms, jitter_ms)
    }

    /// Each packet crossing is dropped with probability `percent` / 100, in each
    /// direction.
    pub fn loss(&self, percent: f64) {
        self.all().loss(percent)
    }

    /// Every packet crossing is dropped, silently: connections hang, connects time out.
    pub fn partition(&self) {
        self.all().partition()
    }

    /// Remove every fault (of every scope).
    pub fn heal(&self) {
        self.faults.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.apply();
    }

    /// Abort every TCP connection between the namespace and the host: both peers see
    /// it at once (the namespace side ECONNRESET). Returns how many sockets it killed.
    pub fn reset(&self) -> usize {
        self.all().reset()
    }

    fn set(&self, port: Option<u16>, fault: Fault) {
        {
            let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
            faults.retain(|(p, f)| !(*p == port && f.same_kind(&fault)));
            faults.push((port, fault));
        }
        self.apply();
    }

    fn clear(&self, port: Option<u16>) {
        self.faults.lock().unwrap_or_else(|e| e.into_inner()).retain(|(p, _)| *p != port);
        self.apply();
    }

    /// Write the whole rule set at once (iptables-restore): drops first, then losses,
    /// then delays (scoped before global: a packet takes one queue), each in INPUT (from
    /// the host) and OUTPUT (to it).
    fn apply(&self) {
        let faults = self.faults.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut rules = Vec::new();
        let mut delays = HashMap::new();
        let rank = |(p, f): &(Option<u16>, Fault)| {
            let kind = match f {
                Fault::Partition => 0,
                Fault::Loss(_) => 1,
                Fault::Delay { .. } => 2,
            };
            (kind, p.is_none())
        };
        let mut ordered = faults.clone();
        ordered.sort_by_key(rank);
        for (port, fault) in &ordered {
            let target = match fault {
                Fault::Partition => "-j DROP".to_string(),
                Fault::Loss(p) => format!("-m statistic --mode random --probability {:.6} -j DROP", p / 100.0),
                Fault::Delay { ms, jitter_ms } => {
                    let queue = delays.len() as u16;
                    assert!(queue < QUEUES, "at most {QUEUES} distinct delays at once");
                    delays.insert(queue, (*ms, *jitter_ms));
                    format!("-j NFQUEUE --queue-num {queue} --queue-bypass")
                }
            };
            let (from, to) = match port {
                Some(p) => (format!("-p tcp --sport {p} "), format!("-p tcp --dport {p} ")),
                None => (String::new(), String::new()),
            };
            rules.push(format!("-A INPUT -i {NS_IF} {from}{target}"));
            rules.push(format!("-A OUTPUT -o {NS_IF} {to}{target}"));
        }
        if !delays.is_empty() {
            let mut delayer = self.delayer.lock().unwrap_or_else(|e| e.into_inner());
            if delayer.is_none() {
                *delayer = Some(Delayer::start(&self.name));
            }
            if let Some(d) = delayer.as_ref() {
                *d.delays.lock().unwrap_or_else(|e| e.into_inner()) = delays;
            }
        }
        let script = format!(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n{}\nCOMMIT\n",
            rules.join("\n")
        );
        let mut child = self
            .command("iptables-restore")
            .args(["-w", "5"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("iptables-restore (scripts/setup installs iptables)");
        child.stdin.take().map(|mut s| s.write_all(script.as_bytes())).transpose().expect("write rules");
        let out = child.wait_with_output().expect("iptables-restore");
        assert!(out.status.success(), "iptables-restore failed: {}\n{script}", String::from_utf8_lossy(&out.stderr));
    }

    /// The rules in force (for a test's log).
    pub fn rules(&self) -> String {
        run(self.command("iptables").args(["-w", "5", "-S"]))
    }
}

impl Default for FaultNet {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FaultNet {
    fn drop(&mut self) {
        if let Some(d) = self.delayer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            d.stop();
        }
        kill_inside(&self.name);
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
        // Gone with the namespace once nothing runs in it; make sure.
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).stderr(Stdio::null()).status();
    }
}

/// Faults on part of a [`FaultNet`]'s traffic (see [`FaultNet::port`]).
pub struct Scope<'a> {
    net: &'a FaultNet,
    port: Option<u16>,
}

impl Scope<'_> {
    /// See [`FaultNet::delay`]; replaces this scope's delay.
    pub fn delay(&self, ms: u64, jitter_ms: u64) {
        self.net.set(self.port, Fault::Delay { ms, jitter_ms })
    }

    /// See [`FaultNet::loss`]; replaces this scope's loss.
    pub fn loss(&self, percent: f64) {
        assert!((0.0..=100.0).contains(&percent), "loss {percent}% is not a percentage");
        self.net.set(self.port, Fault::Loss(percent))
    }

    /// See [`FaultNet::partition`].
    pub fn partition(&self) {
        self.net.set(self.port, Fault::Partition)
    }

    /// Remove this scope's faults.
    pub fn heal(&self) {
        self.net.clear(self.port)
    }

    /// See [`FaultNet::reset`]: the connections of this scope only.
    ///
    /// The connections are listed first (from both sides: a partition may have kept an
    /// RST from arriving, and a connect may still be in SYN-SENT), then killed by
    /// their namespace-side port: on the host side first, so the router gets a real
    /// RST, then what remains inside. A connection the router opens in between (it
    /// may reconnect within milliseconds) has a new port and is left alone.
    pub fn reset(&self) -> usize {
        let (ns_ip, host_ip) = (self.net.ns_ip.to_string(), self.net.host_ip.to_string());
        let scope = |field: &str| self.port.map(|p| format!("and {field} = :{p}")).unwrap_or_default();
        let host_filter = format!("dst {ns_ip} {}", scope("sport"));
        let ns_filter = format!("dst {host_ip} {}", scope("dport"));
        let host_side = ss(None, &host_filter, false);
        let ns_side = ss(Some(self.net), &ns_filter, false);
        // (local, peer) ports of each line; the namespace side's port of each.
        let mut ports: Vec<u16> = host_side.iter().map(|(_, peer)| *peer).collect();
        ports.extend(ns_side.iter().map(|(local, _)| *local));
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() {
            return 0;
        }
        let any = |field: &str| {
            let alts: Vec<String> = ports.iter().map(|p| format!("{field} = :{p}")).collect();
            format!("and ( {} )", alts.join(" or "))
        };
        let killed = ss(None, &format!("{host_filter} {}", any("dport")), true).len();
        killed + ss(Some(self.net), &format!("{ns_filter} {}", any("sport")), true).len()
    }
}

/// `ss -t -n -H state connected exclude time-wait FILTER` on the host or in `net`'s namespace, with `-K`
/// when `kill`: the (local port, peer port) of each socket listed (or killed).
fn ss(net: Option<&FaultNet>, filter: &str, kill: bool) -> Vec<(u16, u16)> {
    let mut cmd = match net {
        Some(n) => n.command("ss"),
        None => Command::new("ss"),
    };
    if kill {
        cmd.arg("-K");
    }
    cmd.args(["-t", "-n", "-H", "state", "connected", "exclude", "time-wait"]).args(filter.split_whitespace());
    let port = |a: &str| a.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
    run(&mut cmd)
        .lines()
        .filter_map(|l| {
            let addrs: Vec<&str> = l.split_whitespace().filter(|w| w.contains(':')).collect();
            match addrs[..] {
                [local, peer] => Some((port(local)?, port(peer)?)),
                _ => None,
            }
        })
        .collect()
}

/// A /30 in 10.200.0.0/14 that no address of the host namespace is in. Called under
/// the setup lock, so two test processes never pick the same one.
fn free_subnet(pid: u32, n: u32) -> (Ipv4Addr, Ipv4Addr) {
    let taken: Vec<Ipv4Addr> = ip(&["-o", "-4", "addr", "show"])
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect();
    let first = (pid.wrapping_mul(131).wrapping_add(n.wrapping_mul(7))) % 65536;
    for k in 0..65536 {
        let i = (first + k) % 65536;
        let base = u32::from(Ipv4Addr::new(10, 200, 0, 0)) + (i << 2);
        if !taken.iter().any(|a| u32::from(*a) & !3 == base) {
            return (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        }
    }
    panic!("no free /30 in 10.200.0.0/14");
}

/// Holds packets NFQUEUE hands over and accepts each once its delay has passed.
struct Delayer {
    stop: Arc<AtomicBool>,
    delays: Arc<Mutex<HashMap<u16, (u64, u64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Delayer {
    fn start(netns: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let delays = Arc::new(Mutex::new(HashMap::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = PathBuf::from("/run/netns").join(netns);
        let (s, d) = (stop.clone(), delays.clone());
        let thread = std::thread::Builder::new()
            .name(format!("delayer-{netns}"))
            .spawn(move || {
                let sock = std::fs::File::open(&path).and_then(|ns| {
                    // SAFETY: setns on this dedicated thread only.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    nfq::open(QUEUES)
                });
                match sock {
                    Ok(sock) => {
                        let _ = ready_tx.send(Ok(()));
                        delay_loop(&sock, &s, &d);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .expect("delayer thread");
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("NFQUEUE in {netns}: {e}"),
            Err(_) => panic!("delayer thread for {netns} died"),
        }
        Delayer { stop, delays, thread: Some(thread) }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Receive queued packets, accept each when due. Within a queue a packet is never
/// accepted before the one queued ahead of it (jitter does not reorder).
fn delay_loop(sock: &OwnedFd, stop: &AtomicBool, delays: &Mutex<HashMap<u16, (u64, u64)>>) {
    use std::cmp::Reverse;
    let mut heap: BinaryHeap<Reverse<(Instant, u64, u16, u32)>> = BinaryHeap::new();
    let mut last_due: HashMap<u16, Instant> = HashMap::new();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse((due, ..))| *due <= now) {
            if let Some(Reverse((_, _, queue, id))) = heap.pop() {
                nfq::verdict(sock, queue, id);
            }
        }
        let wait = heap
            .peek()
            .map(|Reverse((due, ..))| due.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(50))
            .min(Duration::from_millis(50));
        let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = wait.as_millis().max(if wait.is_zero() { 0 } else { 1 }) as i32;
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            continue;
        }
        loop {
            let packets = nfq::recv(sock, &mut buf);
            let Some(packets) = packets else { break };
            let table = delays.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let now = Instant::now();
            for (queue, id) in packets {
                let (ms, jitter) = table.get(&queue).copied().unwrap_or((0, 0));
                let offset =
                    if jitter > 0 { ms as i64 + fastrand::i64(-(jitter as i64)..=jitter as i64) } else { ms as i64 };
                let mut due = now + Duration::from_millis(offset.max(0) as u64);
                if let Some(last) = last_due.get(&queue) {
                    due = due.max(*last);
                }
                last_due.insert(queue, due);
                seq += 1;
                heap.push(Reverse((due, seq, queue, id)));
            }
        }
    }
    // Let go of what is still held.
    while let Some(Reverse((_, _, queue, id))) = heap.pop() {
        nfq::verdict(sock, queue, id);
    }
}

/// The few nfnetlink_queue messages the delayer needs (linux/netfilter/nfnetlink_queue.h),
/// over a raw netlink socket: bind queues with metadata-only copies, read packet ids,
/// send "accept" verdicts.
mod nfq {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const NETLINK_NETFILTER: i32 = 12;
    const NFNL_SUBSYS_QUEUE: u16 = 3;
    const NFQNL_MSG_PACKET: u16 = 0;
    const NFQNL_MSG_VERDICT: u16 = 1;
    const NFQNL_MSG_CONFIG: u16 = 2;
    const NFQA_CFG_CMD: u16 = 1;
    const NFQA_CFG_PARAMS: u16 = 2;
    const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
    const NFQA_CFG_MASK: u16 = 4;
    const NFQA_CFG_FLAGS: u16 = 5;
    const NFQA_PACKET_HDR: u16 = 1;
    const NFQA_VERDICT_HDR: u16 = 2;
    const NFQNL_CFG_CMD_BIND: u8 = 1;
    const NFQNL_COPY_META: u8 = 1;
    /// Accept rather than drop when the queue is full; hand GSO packets over whole.
    const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
    const NFQA_CFG_F_GSO: u32 = 4;
    const NF_ACCEPT: u32 = 1;
    const NLMSG_ERROR: u16 = 2;

    fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
        out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }

    fn message(msg: u16, flags: u16, queue: u16, attrs: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(20 + attrs.len());
        m.extend_from_slice(&((20 + attrs.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg).to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes()); // seq
        m.extend_from_slice(&0u32.to_ne_bytes()); // port id
        m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]); // nfgenmsg: family, version
        m.extend_from_slice(&queue.to_be_bytes()); // res_id: the queue
        m.extend_from_slice(attrs);
        m
    }

    fn send(sock: &OwnedFd, m: &[u8]) -> std::io::Result<()> {
        // SAFETY: a zeroed sockaddr_nl is the kernel's address (pid 0).
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid buffer and address for the call's duration.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                m.as_ptr().cast(),
                m.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Send a config message and wait for its acknowledgement.
    fn configure(sock: &OwnedFd, queue: u16, attrs: &[u8]) -> std::io::Result<()> {
        const NLM_F_REQUEST: u16 = 1;
        const NLM_F_ACK: u16 = 4;
        send(sock, &message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, queue, attrs))?;
        let mut buf = [0u8; 4096];
        // SAFETY: valid buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 20 {
            return Err(std::io::Error::other(format!("nfqueue config: short answer ({n})")));
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if kind == NLMSG_ERROR && code != 0 {
            return Err(std::io::Error::from_raw_os_error(-code));
        }
        Ok(())
    }

    /// A netlink socket bound to queues `0..queues` of the current network namespace.
    pub fn open(queues: u16) -> std::io::Result<OwnedFd> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_nl = let the kernel pick the port id.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid address for the call.
        let rc = unsafe {
            libc::bind(fd, (&addr as *const libc::sockaddr_nl).cast(), std::mem::size_of::<libc::sockaddr_nl>() as u32)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // A large receive buffer: packet notices must not be dropped for lack of room.
        let size: i32 = 8 << 20;
        // SAFETY: valid option value for the call.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const i32).cast(),
                std::mem::size_of::<i32>() as u32,
            )
        };
        for queue in 0..queues {
            let mut a = Vec::new();
            attr(&mut a, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, libc::AF_INET as u8]);
            configure(&sock, queue, &a)?;
            let mut a = Vec::new();
            let mut params = 0u32.to_be_bytes().to_vec();
            params.push(NFQNL_COPY_META);
            attr(&mut a, NFQA_CFG_PARAMS, &params);
            attr(&mut a, NFQA_CFG_QUEUE_MAXLEN, &65536u32.to_be_bytes());
            attr(&mut a, NFQA_CFG_FLAGS, &(NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO).to_be_bytes());
            attr(&mut a, NFQA_CFG_MASK, &(NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO).to_be_bytes());
            configure(&sock, queue, &a)?;
        }
        Ok(sock)
    }

    /// One read without blocking: the (queue, packet id) of each packet notice in it,
    /// or None when nothing was waiting.
    pub fn recv(sock: &OwnedFd, buf: &mut [u8]) -> Option<Vec<(u16, u32)>> {
        // SAFETY: valid buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // ENOBUFS: notices were lost (the kernel then accepted those packets, fail
            // open); keep reading.
            return (e.raw_os_error() == Some(libc::ENOBUFS)).then(Vec::new);
        }
        let buf = &buf[..n as usize];
        let mut out = Vec::new();
        let mut at = 0;
        while at + 20 <= buf.len() {
            let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            if len < 20 || at + len > buf.len() {
                break;
            }
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                let queue = u16::from_be_bytes([buf[at + 18], buf[at + 19]]);
                let mut a = at + 20;
                while a + 4 <= at + len {
                    let alen = u16::from_ne_bytes([buf[a], buf[a + 1]]) as usize;
                    let akind = u16::from_ne_bytes([buf[a + 2], buf[a + 3]]) & 0x3fff;
                    if alen < 4 || a + alen > at + len {
                        break;
                    }
                    if akind == NFQA_PACKET_HDR && alen >= 8 {
                        out.push((queue, u32::from_be_bytes([buf[a + 4], buf[a + 5], buf[a + 6], buf[a + 7]])));
                    }
                    a += (alen + 3) & !3;
                }
            }
            at += (len + 3) & !3;
        }
        Some(out)
    }

    /// Accept packet `id` of `queue`.
    pub fn verdict(sock: &OwnedFd, queue: u16, id: u32) {
        let mut a = Vec::new();
        let mut v = NF_ACCEPT.to_be_bytes().to_vec();
        v.extend_from_slice(&id.to_be_bytes());
        attr(&mut a, NFQA_VERDICT_HDR, &v);
        let _ = send(sock, &message(NFQNL_MSG_VERDICT, 1, queue, &a));
    }
}
