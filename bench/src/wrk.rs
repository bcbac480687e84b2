//! `wrk` against the handler alone: a POST of a small JSON body with the headers the
//! router would send, its output parsed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::cpu::CpuReader;
use crate::proc::Proc;
use crate::short_id;

/// The body of every benchmark message (and of wrk's requests): a small JSON object.
pub fn body(n: u64) -> String {
    format!("{{\"n\":{n}}}")
}

/// A wrk script POSTing `body(12345)` with `headers`.
pub fn lua(headers: &[(&str, String)]) -> String {
    let mut s = format!("wrk.method = \"POST\"\nwrk.body = '{}'\n", body(12345));
    for (k, v) in headers {
        s.push_str(&format!("wrk.headers[\"{k}\"] = \"{v}\"\n"));
    }
    s
}

#[derive(Default)]
pub struct Wrk {
    pub rps: f64,
    /// Requests/sec of each run behind `rps` (their mean).
    pub runs: Vec<f64>,
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    pub errors: String,
    pub cpu_pct: f64,
}

impl Wrk {
    /// Add another run's rate to the mean.
    pub fn add_run(&mut self, rps: f64) {
        self.runs.push(rps);
        self.rps = self.runs.iter().sum::<f64>() / self.runs.len() as f64;
    }
}

/// `wrk -t1 -c<connections> -d<secs>s --latency -s <lua> <url>`, with wrk's CPU use.
pub async fn wrk(url: &str, lua: &Path, connections: u32, secs: u64, cpu: &CpuReader) -> Result<Wrk> {
    let out_path = lua.with_file_name(format!("wrk-{}.out", short_id()));
    let out = std::fs::File::create(&out_path)?;
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{secs}s"), "--latency", "-s"])
        .arg(lua)
        .arg(url)
        .stdout(out)
        .stderr(Stdio::null());
    let mut p = Proc::spawn(&mut cmd, "wrk").context("starting wrk (is it installed?)")?;
    let started = Instant::now();
    let mut cpu_secs = 0.0;
    let status = loop {
        if let Some(status) = p.exited() {
            break status;
        }
        if let Some(t) = cpu.proc_secs(p.pid()) {
            cpu_secs = t;
        }
        if started.elapsed() > Duration::from_secs(secs + 30) {
            bail!("wrk did not finish");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    if !status.success() {
        bail!("wrk failed ({status}):\n{text}");
    }
    let mut w = parse_wrk(&text).ok_or_else(|| anyhow!("cannot read wrk's output:\n{text}"))?;
    w.cpu_pct = 100.0 * cpu_secs / secs as f64;
    Ok(w)
}

fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut w = Wrk { errors: "none".into(), ..Wrk::default() };
    let (mut rps, mut p50, mut p99) = (None, None, None);
    let mut errors = Vec::new();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Requests/sec:") => rps = words.next().and_then(|v| v.parse().ok()),
            Some("50%") => p50 = words.next().and_then(wrk_ms),
            Some("99%") => p99 = words.next().and_then(wrk_ms),
            Some("Latency") if w.avg_ms == 0.0 => w.avg_ms = words.next().and_then(wrk_ms).unwrap_or(0.0),
            Some(n) if line.contains(" requests in ") => w.requests = n.parse().unwrap_or(0),
            _ if line.starts_with("Non-2xx") || line.starts_with("Socket errors") => errors.push(line.to_string()),
            _ => {}
        }
    }
    if !errors.is_empty() {
        w.errors = errors.join("; ");
    }
    w.rps = rps?;
    w.runs = vec![w.rps];
    w.p50_ms = p50?;
    w.p99_ms = p99?;
    Some(w)
}

/// wrk's durations ("812.00us", "1.23ms", "2.01s", "1.00m") in milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => num / 1e3,
        "ms" => num,
        "s" => num * 1e3,
        "m" => num * 60e3,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let out = "Running 2s test @ http://127.0.0.1:1/\n  1 threads and 16 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.19ms  300.00us   9.00ms   90.00%\n  Latency Distribution\n     50%    1.10ms\n     75%    1.20ms\n     90%    1.40ms\n     99%    2.50ms\n  26000 requests in 2.00s, 3.00MB read\nRequests/sec:  13000.50\n";
        let w = parse_wrk(out).expect("parsed");
        assert_eq!(w.requests, 26000);
        assert!((w.rps - 13000.5).abs() < 1e-9);
        assert!((w.p99_ms - 2.5).abs() < 1e-9);
        assert!((w.avg_ms - 1.19).abs() < 1e-9);
        assert_eq!(w.errors, "none");
    }

    #[test]
    fn lua_posts_the_headers() {
        let s = lua(&[("ce-id", "m-1".into())]);
        assert!(s.contains("wrk.body = '{\"n\":12345}'"));
        assert!(s.contains("wrk.headers[\"ce-id\"] = \"m-1\""));
    }
}
