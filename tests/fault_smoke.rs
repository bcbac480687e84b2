//! Proof that the fault-injection harness itself works (tests/support/netfault.rs and
//! brokers.rs): a delay makes a round trip slower, loss drops packets, a partition
//! stops traffic silently and its heal lets it go on, a reset reaches both ends, one
//! port's fault leaves another port alone; and a private RabbitMQ killed and
//! restarted 3 times keeps a persistent message. The router under these faults is
//! tests/faults.rs. Needs root (network namespaces, iptables, ss -K): without it each
//! test prints "SKIPPED: needs root" and returns.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::*;

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
