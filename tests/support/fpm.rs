//! A PHP-FPM pool of the test's own (Debian's php8.2-fpm): its own config, port and
//! unix socket, `pm = static` with the given workers, serving the test handler.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{down_file, free_port, netfault, root, wait_for, Proc};

pub struct PhpFpm {
    pub proc: Proc,
    pub port: u16,
    /// `pm.max_children` of each of its two pools (TCP and unix socket).
    pub workers: u32,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// FPM's own log (the master's, and what workers write to their stderr).
    pub fpm_log: PathBuf,
    config: PathBuf,
}

/// The FPM binary: `php-fpm8.2` from Debian (in /usr/sbin, which a test's PATH may lack).
fn binary() -> PathBuf {
    for p in ["/usr/sbin/php-fpm8.2", "/usr/bin/php-fpm8.2"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "php-fpm8.2".into()
}

impl PhpFpm {
    /// Start a pool of `workers` in `dir` serving tests/handlers/handler.php, which logs
    /// to `log`.
    pub async fn start(dir: &Path, log: &Path, workers: u32) -> Self {
        let port = free_port();
        let socket = dir.join(format!("fpm-{port}.sock"));
        let fpm_log = dir.join(format!("fpm-{port}.log"));
        let config = dir.join(format!("fpm-{port}.conf"));
        // Two pools alike but for where they listen: TCP, and a unix socket.
        let pool = |name: &str, listen: &str, extra: &str| {
            format!(
                "[{name}]\n\
                 listen = {listen}\n\
                 {extra}\
                 pm = static\n\
                 pm.max_children = {workers}\n\
                 catch_workers_output = yes\n\
                 clear_env = no\n\
                 env[HANDLER_LOG] = {log}\n\
                 env[HANDLER_DOWN_FILE] = {down}\n\
                 env[FPM_POOL] = {name}\n",
                log = log.display(),
                down = down_file(log).display(),
            )
        };
        let text = format!(
            "[global]\n\
             pid = {dir}/fpm-{port}.pid\n\
             error_log = {fpm_log}\n\
             daemonize = no\n\
             {tcp}\
             {unix}",
            dir = dir.display(),
            fpm_log = fpm_log.display(),
            tcp = pool("tcp", &format!("127.0.0.1:{port}"), ""),
            // The socket is made root's: open to the workers and the router.
            unix = pool("unix", &socket.display().to_string(), "listen.mode = 0666\n"),
        );
        std::fs::write(&config, text).expect("write the FPM config");
        let child = spawn(&config);
        let fpm = PhpFpm {
            proc: Proc { child, name: format!("php-fpm:{port}") },
            port,
            workers,
            socket,
            log: log.to_path_buf(),
            fpm_log,
            config,
        };
        let addr = format!("127.0.0.1:{port}");
        let sock = fpm.socket.clone();
        wait_for("php-fpm to listen", Duration::from_secs(15), || async {
            std::net::TcpStream::connect(&addr).is_ok() && std::os::unix::net::UnixStream::connect(&sock).is_ok()
        })
        .await;
        fpm
    }

    /// The pool's TCP endpoint as a `fastcgi` handler names it.
    pub fn tcp(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// The pool's unix socket endpoint.
    pub fn unix(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Kill the master and its workers at once (SIGKILL to the process group).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Start the same pool again (same config, port and socket) after [`PhpFpm::kill`].
    pub async fn restart(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let child = spawn(&self.config);
        self.proc = Proc { child, name: format!("php-fpm:{}", self.port) };
        let addr = format!("127.0.0.1:{}", self.port);
        wait_for("php-fpm to listen again", Duration::from_secs(15), || async {
            std::net::TcpStream::connect(&addr).is_ok()
        })
        .await;
    }

    /// The handler script every request runs.
    pub fn script() -> PathBuf {
        root().join("tests/handlers/handler.php")
    }
}

/// The FPM master on `config`, in the foreground, in a process group of its own.
fn spawn(config: &Path) -> std::process::Child {
    let mut cmd = Command::new(binary());
    cmd.arg("-F").arg("-y").arg(config);
    // As root FPM wants a pool user or -R (workers as root): the test's files are
    // root's, so -R.
    if is_root() {
        cmd.arg("-R");
    }
    cmd.env(netfault::OWNER_ENV, netfault::owner_tag())
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("php-fpm8.2 starts (is php8.2-fpm installed? scripts/setup installs it)")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

impl Drop for PhpFpm {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}
