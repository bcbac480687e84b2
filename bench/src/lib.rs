//! The broker-neutral half of the benchmarks (not tests) in `bench/`: broker →
//! `message-router` → a PHP handler over HTTP, side by side in one run with the same
//! handler driven directly by `wrk` and with reference consumers written for the bench.
//!
//! Each binary implements [`broker::Broker`] for one broker and hands it to
//! [`phases::main`], which runs the phases and writes the report:
//!
//! - `amqp-http` (`src/amqp_http.rs`): RabbitMQ;
//! - `redis-http` (`src/redis_http.rs`): Redis Streams;
//! - `kafka-http` (`src/kafka_http.rs`): Kafka (tansu in development);
//! - `kafka-core` (`src/kafka_core.rs`): Kafka → router-core in process → a no-op
//!   target vs a raw rdkafka loop (the router's own cost, no HTTP, no PHP);
//! - `fastcgi-http` (`src/fastcgi_http.rs`): RabbitMQ → router → PHP-FPM over FastCGI
//!   vs wrk → nginx → the same PHP-FPM, and vs the router → nginx → PHP-FPM (its own
//!   phases, built from the same pieces).
//! - `adaptive` (`src/adaptive.rs`): RabbitMQ → router → a handler that slows down
//!   mid-run, with `max_in_flight: auto` against fixed limits (drains of phase B).
//!
//! Modules:
//!
//! | module | what |
//! | --- | --- |
//! | [`opts`] | the command-line options every binary shares |
//! | [`phases`] | the phases (A handler alone, B router, R references, C latency) and `main`; the router phases any bench runs ([`phases::Bench`]) |
//! | [`broker`] | what a broker gives the phases |
//! | [`amqp`] | RabbitMQ's side (`amqp-http`, `fastcgi-http`) |
//! | [`report`] | the markdown report |
//! | [`proc`] | child processes in process groups of their own, killed on drop |
//! | [`php`] | `php -S` serving a handler of `bench/handlers/` |
//! | [`fpm`] | a PHP-FPM pool of the bench's own serving `bench/handlers/` |
//! | [`nginx`] | nginx of the bench's own in front of that pool |
//! | [`router`] | the `message-router` under test: start, `/metrics`, throughput, its log |
//! | [`metrics`] | reading Prometheus text |
//! | [`cpu`] | CPU accounting from `/proc` |
//! | [`wrk`] | running and parsing `wrk` |
//! | [`http`] | router-like request headers, the POST every reference consumer does |
//! | [`kafka`] | Kafka clients set up as the router's (both Kafka benches) |
//! | [`drain`] | timing a drain from first to N-th ack; reference consumers on a thread |
//! | [`latency`] | open-loop pacing, the stamp log, percentiles |

pub mod amqp;
pub mod broker;
pub mod cpu;
pub mod drain;
pub mod fpm;
pub mod http;
pub mod kafka;
pub mod latency;
pub mod metrics;
pub mod nginx;
pub mod opts;
pub mod phases;
pub mod php;
pub mod proc;
pub mod report;
pub mod router;
pub mod wrk;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// A scratch directory removed at drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("router-bench-{}", short_id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The workspace root (this crate lives in `bench/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"))
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Ten hex digits of a fresh UUID: the suffix of every queue, stream and group name.
pub fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_string()
}

pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

pub fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The short commit of the checkout, `+changes` when tracked files differ from it.
pub fn git_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root())
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    if dirty {
        format!("{commit}+changes")
    } else {
        commit
    }
}

pub fn file_name(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or_default()
}

pub fn ms(ns: f64) -> f64 {
    ns / 1e6
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
