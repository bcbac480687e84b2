//! `php -S` serving one handler script of `bench/handlers/`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;

use crate::free_port;
use crate::proc::Proc;

/// `php -S` serving one script with W workers.
pub struct Php {
    pub proc: Proc,
    port: u16,
}

impl Php {
    /// `stamp_log`: where `stamp.php` appends its latencies; `env`: more environment
    /// (`BUSY_US` of `busy.php`).
    pub async fn start(script: &Path, workers: u32, stamp_log: Option<&Path>, env: &[(&str, &str)]) -> Result<Self> {
        let port = free_port()?;
        let mut cmd = Command::new("php");
        cmd.arg("-S")
            .arg(format!("127.0.0.1:{port}"))
            .arg(script)
            .env("PHP_CLI_SERVER_WORKERS", workers.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(log) = stamp_log {
            cmd.env("STAMP_LOG", log);
        }
        cmd.envs(env.iter().copied());
        let mut proc = Proc::spawn(&mut cmd, "php -S")?;
        let listening = || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        proc.wait_until(&format!("listen on {port}"), Duration::from_secs(10), listening).await?;
        Ok(Php { proc, port })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}
