//! A PHP-FPM pool of the bench's own (Debian's php8.2-fpm, its php.ini and OPcache):
//! a master in the foreground with its own config in the scratch directory, one pool
//! with `pm = static` and W workers on a private unix socket or TCP port, serving any
//! script of `bench/handlers/` that a request names (`SCRIPT_FILENAME`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cpu::Watched;
use crate::free_port;
use crate::proc::Proc;

/// Where the pool listens.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket in the scratch directory (mode 0666: nginx's workers run as nobody
    /// when the bench runs as root).
    Unix,
    /// A free TCP port on 127.0.0.1.
    Tcp,
}

pub struct Fpm {
    pub proc: Proc,
    /// The pool as a `fastcgi` handler of the router names it: `unix:///…` or
    /// `tcp://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The pool as nginx's `server` (of an upstream) names it: `unix:/…` or
    /// `127.0.0.1:PORT`.
    pub nginx_address: String,
    /// The master's log (`error_log`).
    pub log: PathBuf,
}

/// Debian's FPM binary (in /usr/sbin, which a user's PATH may lack).
fn binary() -> PathBuf {
    ["/usr/sbin/php-fpm8.2", "/usr/bin/php-fpm8.2"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| "php-fpm8.2".into())
}

/// Whether this process runs as root (FPM then wants `-R` to run workers as root).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

impl Fpm {
    /// Start the pool in `dir` with `workers` (`pm.max_children`) listening as `listen`;
    /// its workers get `env` (`STAMP_LOG` of stamp.php, `BUSY_US` of busy.php).
    pub async fn start(dir: &Path, workers: u32, listen: Listen, env: &[(&str, String)]) -> Result<Self> {
        let log = dir.join("fpm.log");
        let config = dir.join("fpm.conf");
        let (listen_at, endpoint, nginx_address, probe) = match listen {
            Listen::Unix => {
                let socket = dir.join("fpm.sock");
                let s = socket.display().to_string();
                (s.clone(), format!("unix://{s}"), format!("unix:{s}"), Probe::Unix(socket))
            }
            Listen::Tcp => {
                let addr = format!("127.0.0.1:{}", free_port()?);
                (addr.clone(), format!("tcp://{addr}"), addr.clone(), Probe::Tcp(addr))
            }
        };
        let env: String = env.iter().map(|(k, v)| format!("env[{k}] = {v}\n")).collect();
        let text = format!(
            "[global]\n\
             pid = {dir}/fpm.pid\n\
             error_log = {log}\n\
             daemonize = no\n\
             [bench]\n\
             listen = {listen_at}\n\
             listen.mode = 0666\n\
             pm = static\n\
             pm.max_children = {workers}\n\
             {env}",
            dir = dir.display(),
            log = log.display(),
        );
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let mut cmd = Command::new(binary());
        cmd.arg("-F").arg("-y").arg(&config);
        if is_root() {
            cmd.arg("-R");
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let mut proc =
            Proc::spawn(&mut cmd, "php-fpm8.2").context("is php8.2-fpm installed? scripts/setup installs it")?;
        let ready = || match &probe {
            Probe::Unix(path) => std::os::unix::net::UnixStream::connect(path).is_ok(),
            Probe::Tcp(addr) => std::net::TcpStream::connect(addr).is_ok(),
        };
        proc.wait_until(&format!("listen on {listen_at} (see {})", log.display()), Duration::from_secs(15), ready)
            .await?;
        Ok(Fpm { proc, endpoint, nginx_address, log })
    }

    /// The CPU accounting entry of the pool: the master and its workers.
    pub fn watched(&self) -> Watched {
        ("fpm", self.proc.pid(), true)
    }
}

enum Probe {
    Unix(PathBuf),
    Tcp(String),
}
