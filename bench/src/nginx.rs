//! nginx of the bench's own (Debian's), in front of the bench's PHP-FPM pool as in
//! production: a master in the foreground with its config, pid, logs and temp paths
//! in a directory of its own, listening on a private 127.0.0.1 port, passing every
//! `*.php` request of `bench/handlers/` to the pool over FastCGI with Debian's
//! `fastcgi_params`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cpu::Watched;
use crate::fpm::Fpm;
use crate::free_port;
use crate::proc::Proc;

/// Debian's binary.
const NGINX: &str = "/usr/sbin/nginx";

pub struct Nginx {
    pub proc: Proc,
    port: u16,
}

/// How nginx runs: worker processes, and the idle FastCGI connections each worker
/// keeps to the pool (0: a new connection per request, Debian's default).
#[derive(Clone, Copy, Debug)]
pub struct NginxSettings {
    pub workers: u32,
    pub keepalive: u32,
}

impl Nginx {
    /// Start nginx in `dir` (created) serving the scripts of `root` through `fpm`.
    pub async fn start(dir: &Path, root: &Path, fpm: &Fpm, settings: NginxSettings) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = free_port()?;
        let conf = dir.join("nginx.conf");
        let error_log = dir.join("error.log");
        std::fs::write(&conf, config(dir, root, fpm, port, settings))
            .with_context(|| format!("writing {}", conf.display()))?;
        let mut cmd = Command::new(NGINX);
        // -e: the error log before the config is read (else /var/log/nginx/error.log).
        cmd.arg("-p").arg(dir).arg("-c").arg(&conf).arg("-e").arg(&error_log);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let mut proc = Proc::spawn(&mut cmd, "nginx").context("is nginx installed? scripts/setup installs it")?;
        let listening = || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        proc.wait_until(&format!("listen on {port} (see {})", error_log.display()), Duration::from_secs(10), listening)
            .await?;
        Ok(Nginx { proc, port })
    }

    /// The URL of `script` (a file of the served directory).
    pub fn url(&self, script: &str) -> String {
        format!("http://127.0.0.1:{}/{script}", self.port)
    }

    /// The CPU accounting entry of nginx: the master and its workers.
    pub fn watched(&self) -> Watched {
        ("nginx", self.proc.pid(), true)
    }

    /// Stop it (SIGTERM: fast shutdown), which closes its kept connections to FPM: each
    /// holds an FPM worker for as long as it is open.
    pub fn stop(mut self) -> String {
        self.proc.terminate(Duration::from_secs(10))
    }
}

/// nginx.conf: everything it writes under `dir`; no access log (the bench's requests
/// would fill it); client connections kept for as long as wrk and the router keep
/// them (the default closes one after 1000 requests).
fn config(dir: &Path, root: &Path, fpm: &Fpm, port: u16, s: NginxSettings) -> String {
    let (upstream_keep, keep_conn) = if s.keepalive > 0 {
        let upstream = format!("        keepalive {};\n        keepalive_requests 1000000;\n", s.keepalive);
        (upstream, "            fastcgi_keep_conn on;\n")
    } else {
        (String::new(), "")
    };
    format!(
        r#"daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    fastcgi_temp_path {dir}/fastcgi;
    proxy_temp_path {dir}/proxy;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream fpm {{
        server {fpm};
{upstream_keep}    }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location ~ \.php$ {{
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
{keep_conn}            fastcgi_pass fpm;
        }}
    }}
}}
"#,
        workers = s.workers,
        dir = dir.display(),
        fpm = fpm.nginx_address,
        root = root.display(),
    )
}
