//! CPU accounting from `/proc`: per process (with or without its children), for the
//! whole machine, and context switches.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What to account CPU for: label, pid, and whether its children count too (php -S
/// forks its workers; the bench's own children are the processes under test).
pub type Watched = (&'static str, u32, bool);

#[derive(Clone, Copy)]
pub struct CpuReader {
    ticks: f64,
}

pub struct CpuSample {
    at: Instant,
    /// CPU seconds per label (a process and its children).
    procs: Vec<(String, f64)>,
    /// Of which in the kernel (system time).
    sys: Vec<(String, f64)>,
    busy: f64,
    total: f64,
    /// Messages handled since the sample this one is compared with (set by the caller).
    pub messages: f64,
}

pub struct CpuUsage {
    /// % of one core per label.
    pub procs: Vec<(String, f64)>,
    /// Of which in the kernel, % of one core per label.
    pub sys: Vec<(String, f64)>,
    /// % of one core, all cores together.
    pub machine: f64,
    /// Messages per second in the window, for CPU time per message.
    pub rate: f64,
}

impl CpuUsage {
    /// "87% · 56 µs" : share of one core, and CPU time per message.
    pub fn get(&self, label: &str) -> String {
        match self.procs.iter().find(|(l, _)| l == label) {
            Some((_, pct)) if self.rate > 0.0 => format!("{pct:.0}% · {:.0} µs", pct / 100.0 / self.rate * 1e6),
            Some((_, pct)) => format!("{pct:.0}%"),
            None => "–".into(),
        }
    }

    /// CPU µs per message of `label`, when known.
    pub fn us_per_message(&self, label: &str) -> Option<f64> {
        let pct = self.procs.iter().find(|(l, _)| l == label)?.1;
        (self.rate > 0.0).then(|| pct / 100.0 / self.rate * 1e6)
    }

    /// The share of `label`'s CPU time spent in the kernel (0 to 1), when known.
    pub fn kernel_share(&self, label: &str) -> Option<f64> {
        let total = self.procs.iter().find(|(l, _)| l == label)?.1;
        let sys = self.sys.iter().find(|(l, _)| l == label)?.1;
        (total > 0.0).then(|| sys / total)
    }

    /// Machine CPU µs per message.
    pub fn machine_us(&self) -> f64 {
        self.machine / 100.0 / self.rate.max(1e-9) * 1e6
    }

    /// Machine CPU not used by any watched process: other work on the box (noise).
    pub fn other(&self) -> String {
        let other = (self.machine - self.procs.iter().map(|p| p.1).sum::<f64>()).max(0.0);
        format!("{other:.0}%")
    }

    pub fn machine(&self) -> String {
        if self.rate > 0.0 {
            format!("{:.0}% · {:.0} µs", self.machine, self.machine_us())
        } else {
            format!("{:.0}%", self.machine)
        }
    }
}

/// Context switches (voluntary and not) of every thread of `pid` so far.
pub fn ctx_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

impl Default for CpuReader {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuReader {
    pub fn new() -> Self {
        let ticks = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
            .unwrap_or(100.0);
        CpuReader { ticks }
    }

    /// (pid, ppid, utime + stime, stime) in seconds from /proc/PID/stat.
    fn stat(&self, path: &Path) -> Option<(u32, u32, f64, f64)> {
        let text = std::fs::read_to_string(path).ok()?;
        let (head, rest) = text.rsplit_once(')')?;
        let pid = head.split(' ').next()?.parse().ok()?;
        // Fields after the command: state ppid ... utime (14th field) stime (15th).
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((pid, ppid, (utime + stime) / self.ticks, stime / self.ticks))
    }

    pub fn proc_secs(&self, pid: u32) -> Option<f64> {
        self.stat(&PathBuf::from(format!("/proc/{pid}/stat"))).map(|s| s.2)
    }

    /// The first process whose command (`/proc/PID/comm`) is `comm`.
    pub fn find_comm(&self, comm: &str) -> Option<u32> {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let c = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (c.trim() == comm).then_some(pid)
        })
    }

    pub fn sample(&self, procs: &[Watched]) -> CpuSample {
        let all: Vec<(u32, u32, f64, f64)> = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    // Numeric entries only: /proc/self and /proc/thread-self would count
                    // this process again.
                    .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
                    .filter_map(|e| self.stat(&e.path().join("stat")))
                    .collect()
            })
            .unwrap_or_default();
        let (mut totals, mut sys) = (Vec::new(), Vec::new());
        for (label, pid, children) in procs.iter().filter(|(_, pid, _)| *pid != 0) {
            let mine = || all.iter().filter(|p| p.0 == *pid || (*children && p.1 == *pid));
            totals.push((label.to_string(), mine().map(|p| p.2).sum()));
            sys.push((label.to_string(), mine().map(|p| p.3).sum()));
        }
        let (busy, total) = machine_ticks();
        CpuSample { at: Instant::now(), procs: totals, sys, busy, total, messages: 0.0 }
    }

    pub fn usage(&self, a: &CpuSample, b: &CpuSample) -> CpuUsage {
        let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
        let pct = |a: &[(String, f64)], b: &[(String, f64)]| -> Vec<(String, f64)> {
            b.iter()
                .filter_map(|(label, secs)| {
                    let before = a.iter().find(|(l, _)| l == label)?.1;
                    Some((label.clone(), 100.0 * (secs - before) / wall))
                })
                .collect()
        };
        let (procs, sys) = (pct(&a.procs, &b.procs), pct(&a.sys, &b.sys));
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        let machine = 100.0 * cores * (b.busy - a.busy) / (b.total - a.total).max(1.0);
        CpuUsage { procs, sys, machine, rate: b.messages / wall }
    }

    /// Wait (at most 30 s) until the broker process `pid` (`name` in messages) uses
    /// under 10 % of a core: after a burst of persistent messages RabbitMQ writes and
    /// compacts its message store for a while, and that would land in the next
    /// measurement.
    pub async fn wait_quiet(&self, name: &str, pid: Option<u32>) {
        let Some(pid) = pid else { return };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            let a = self.proc_secs(pid).unwrap_or(0.0);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let b = self.proc_secs(pid).unwrap_or(0.0);
            if (b - a) / 0.5 < 0.10 {
                break;
            }
        }
        if t.elapsed() > Duration::from_secs(1) {
            eprintln!("  (waited {:.1} s for {name} to go quiet)", t.elapsed().as_secs_f64());
        }
    }
}

/// (busy, total) jiffies of all cores from /proc/stat.
fn machine_ticks() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else { return (0.0, 0.0) };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy, busy + get(3) + get(4))
}
