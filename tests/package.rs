//! The Debian package of the daemon (`cargo deb -p router-daemon`, packaging/debian/):
//! built, installed with dpkg, its service user and file modes as the maintainer
//! scripts set them, its systemd unit verified, the service run as the unit says
//! (this machine has no systemd as PID 1, so the test runs the unit's ExecStartPre,
//! ExecStart and ExecReload itself, as its User, with its EnvironmentFile) delivering
//! from RabbitMQ to a PHP handler, reloaded and stopped, then purged.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::*;

const UNIT: &str = "/usr/lib/systemd/system/message-router.service";

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?} runs: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// `Key=value` lines of the unit's `[Service]` section (the last of each key).
fn service_keys(unit: &str) -> BTreeMap<String, String> {
    let mut in_service = false;
    let mut keys = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if let (true, Some((k, v))) = (in_service, line.split_once('=')) {
            if !line.starts_with('#') {
                keys.insert(k.to_string(), v.to_string());
            }
        }
    }
    keys
}

/// A unit command line as a command run as `user` with `env`.
fn as_user(user: &str, line: &str, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", user, "--regid", user, "--init-groups", "--"]);
    cmd.args(line.split_whitespace());
    cmd.env_clear().env("PATH", "/usr/bin:/bin").envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn the_debian_package_installs_runs_reloads_and_purges() {
    if !root_or_skip("package: dpkg installs system-wide") {
        return;
    }
    // A run killed half-way may have left it installed.
    let _ =
        Command::new("dpkg").args(["--purge", "message-router"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    let dir = Scratch::new("package");
    let deb = dir.path("message-router.deb");
    // The debug build the other tests use (cargo-deb warns: releases use --release,
    // `cargo deb -p router-daemon`); packaging, not optimisation, is under test here.
    run(Command::new("cargo")
        .args(["deb", "-p", "router-daemon", "--profile", "dev", "-o"])
        .arg(&deb)
        .current_dir(root()));
    let contents = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in ["./usr/bin/message-router", "./etc/message-router/router.yaml", "./etc/default/message-router", UNIT] {
        let path = path.trim_start_matches('/');
        assert!(contents.contains(path.trim_start_matches("./")), "{path} in the package:\n{contents}");
    }

    run(Command::new("dpkg").arg("-i").arg(&deb));
    run(Command::new("getent").args(["passwd", "message-router"]));
    let mode = |p: &str| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
    assert_eq!(mode("/etc/message-router/router.yaml"), 0o640, "the config: root and the service's group");
    assert_eq!(mode("/etc/default/message-router"), 0o600, "the secrets: root only");
    assert_eq!(mode("/usr/bin/message-router"), 0o755);
    // The unit parses and every command it names exists (no systemd running needed).
    run(Command::new("systemd-analyze").args(["verify", UNIT]));

    let unit = std::fs::read_to_string(UNIT).expect("the unit");
    let keys = service_keys(&unit);
    assert_eq!(keys["User"], "message-router");
    assert_eq!(keys["ExecReload"], "/bin/kill -HUP $MAINPID");
    assert!(keys.contains_key("ProtectSystem") && keys.contains_key("NoNewPrivileges"), "hardened:\n{unit}");

    // The service's environment file names this test's queue, handler and admin port.
    let queue = unique("package");
    let log = dir.path("handler.log");
    let php = PhpHandler::start(&log, 2).await;
    let admin = free_port();
    let env_file = keys["EnvironmentFile"].trim_start_matches('-').to_string();
    let env = vec![
        ("ADMIN_LISTEN".to_string(), format!("127.0.0.1:{admin}")),
        ("HANDLER_URL".to_string(), php.url()),
        ("ORDERS_QUEUE".to_string(), queue.clone()),
    ];
    let text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(&env_file, text).expect("environment file");
    let mut rabbit = Rabbit::connect().await;
    rabbit.queue(&queue).await;

    run(&mut as_user("message-router", &keys["ExecStartPre"], &env));
    let stderr = std::fs::File::create(dir.path("service.log")).expect("log file");
    let child = as_user("message-router", &keys["ExecStart"], &env)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("the service starts");
    let mut service = Proc { child, name: "message-router.service".into() };
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    wait_for("the service ready", Duration::from_secs(30), || async {
        reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200)
    })
    .await;

    rabbit.publish(&queue, &batch("pkg", 3, |_| vec![])).await;
    wait_for("three messages handled", Duration::from_secs(20), || async { seen(&log).len() >= 3 }).await;
    let ids: Vec<String> = seen(&log).into_iter().map(|s| s.id).collect();
    assert_eq!(ids.len(), 3, "each once: {ids:?}");

    let reload = keys["ExecReload"].replace("$MAINPID", &service.pid().to_string());
    run(Command::new("sh").arg("-c").arg(&reload));
    let service_log = || std::fs::read_to_string(dir.path("service.log")).unwrap_or_default();
    wait_for("the reload logged", Duration::from_secs(10), || async {
        service_log().contains("reload: the file is unchanged")
    })
    .await;

    service.signal("TERM");
    let code = service.wait_exit(Duration::from_secs(45));
    assert_eq!(code, Some(0), "SIGTERM: a clean stop within TimeoutStopSec:\n{}", service_log());
    assert_eq!(rabbit.count(&queue).await, 0);

    run(Command::new("dpkg").args(["--purge", "message-router"]));
    assert!(!std::path::Path::new("/usr/bin/message-router").exists());
    assert!(!std::path::Path::new("/etc/message-router").exists(), "purge removes the config");
    let user = Command::new("getent").args(["passwd", "message-router"]).output().expect("getent");
    assert!(!user.status.success(), "purge removes the service user");
    rabbit.delete_queue(&queue).await;
    rabbit.cleanup().await;
}
