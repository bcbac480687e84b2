//! Child processes in process groups of their own, killed with their group on drop
//! (also when the bench future is dropped on error or Ctrl-C).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child in its own process group, killed with its whole group when dropped.
pub struct Proc {
    child: Child,
    name: String,
    reaped: bool,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, name: &str) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let child = cmd.process_group(0).spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc { child, name: name.to_string(), reaped: false })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.reaped = true;
                Some(status)
            }
            _ => None,
        }
    }

    /// Wait until `ready()` (polled every 20 ms), at most `timeout`; an error if the
    /// process exits first or `ready()` stays false. `what` completes "did not …".
    pub async fn wait_until(&mut self, what: &str, timeout: Duration, ready: impl Fn() -> bool) -> Result<()> {
        let t = Instant::now();
        while !ready() {
            if let Some(status) = self.exited() {
                bail!("{} exited at start ({status})", self.name);
            }
            if t.elapsed() > timeout {
                bail!("{} did not {what} within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// SIGTERM, then wait up to `timeout` (SIGKILL after). Describes what happened.
    pub fn terminate(&mut self, timeout: Duration) -> String {
        if let Some(status) = self.exited() {
            return format!("{} had already exited ({status})", self.name);
        }
        signal(&self.pid().to_string(), "TERM");
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Some(status) = self.exited() {
                return format!("exited {:.2} s after SIGTERM ({status})", t.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        format!("did not exit within {timeout:?} of SIGTERM: killed")
    }

    pub fn kill(&mut self) {
        if !self.reaped {
            // The group: php -S forks its workers into it.
            signal(&format!("-{}", self.pid()), "KILL");
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(target: &str, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
