//! Hot reload (README "Reload"): SIGHUP, a change of the config file, or
//! `POST /api/reload` read the file again. An invalid file is refused with the same
//! `FILE: key.path: problem` errors as at start and the running config stays; a valid
//! one is applied as a diff by the engine ([`router_core::Reloader`]): what did not
//! change keeps running with its connections and in-flight work. Every attempt is
//! logged and counted in `router_config_reloads_total{result}`.
//!
//! The watcher watches the file's directory, not the file: editors that save by
//! writing a new file and renaming it over the old one, and Kubernetes, which swaps a
//! symlink beside the file, would leave a watch on the old inode deaf. Any event there
//! reads the file again after a short quiet period; an unchanged file (by SHA-256)
//! changes nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{EventKind, RecursiveMode, Watcher};
use parking_lot::RwLock;
use router_core::config::ConfigDiff;
use router_core::{BuildTargets, Metrics, Reloader};
use serde::Serialize;
use sha2::Digest;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::admin::Info;
use crate::targets;

/// Events closer together than this are one change (an editor writes, then renames).
const QUIET: Duration = Duration::from_millis(250);

/// What asked for a reload.
#[derive(Clone, Copy, Debug)]
enum Trigger {
    Signal,
    File,
    Api,
}

/// How one reload attempt ended, as logged and as `POST /api/reload` answers.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// `applied`, `unchanged` (same file), `invalid` (refused, nothing changed) or
    /// `failed` (valid, but a handler's target could not be built; nothing changed).
    pub result: &'static str,
    /// The config running after this attempt.
    pub config_hash: String,
    /// One line: what changed, or why nothing did.
    pub message: String,
    /// What changed, component by component (applied only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<ConfigDiff>,
    /// Every problem of an invalid file, `FILE: key.path: problem`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
}

type Request = (Trigger, Option<oneshot::Sender<Outcome>>);

/// Asks the reload task for a reload (the admin API).
#[derive(Clone)]
pub struct Reloads(mpsc::Sender<Request>);

impl Reloads {
    /// Reload now and say how it went; `None` when the router is stopping.
    pub async fn request(&self) -> Option<Outcome> {
        let (reply, answer) = oneshot::channel();
        self.0.send((Trigger::Api, Some(reply))).await.ok()?;
        answer.await.ok()
    }
}

/// `sha256:<hex>` of a config file's bytes: what `/api/status` shows.
pub fn hash(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// `sha256:<hex>` of the file as it is on disk now.
pub fn file_hash(path: &Path) -> String {
    std::fs::read(path).map_or_else(|_| "unknown".into(), |b| hash(&b))
}

/// Everything a reload touches.
pub struct Reloading {
    pub path: PathBuf,
    pub reloader: Reloader,
    pub targets: Arc<targets::Builder>,
    pub metrics: Arc<Metrics>,
    pub info: Arc<RwLock<Info>>,
}

/// Start watching for SIGHUP and file changes; the returned handle asks for reloads
/// too. Stops with `shutdown`.
pub fn start(r: Reloading, shutdown: CancellationToken) -> anyhow::Result<Reloads> {
    let (counter, last_ok) = register(&r.metrics)?;
    let (tx, mut rx) = mpsc::channel::<Request>(4);
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    let watcher = watch(&r.path, changed_tx);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        // Kept alive as long as the task: dropping it stops the watch.
        let _watcher = watcher;
        loop {
            let (trigger, reply) = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hup.recv() => (Trigger::Signal, None),
                Some(()) = changed.recv() => {
                    tokio::time::sleep(QUIET).await;
                    while changed.try_recv().is_ok() {}
                    (Trigger::File, None)
                }
                Some(request) = rx.recv() => request,
            };
            let outcome = attempt(&r, trigger).await;
            // A directory event that left the file as it was is no reload attempt.
            let noise = matches!(trigger, Trigger::File) && outcome.result == "unchanged";
            if !noise {
                counter.with_label_values(&[outcome.result]).inc();
                last_ok.set(i64::from(matches!(outcome.result, "applied" | "unchanged")));
                r.info.write().last_reload = Some(outcome.clone());
            }
            if let Some(reply) = reply {
                let _ = reply.send(outcome);
            }
        }
    });
    Ok(Reloads(tx))
}

/// `router_config_reloads_total{result}` and `router_config_last_reload_successful`
/// (1 until a reload is refused, 1 again once one applies; Prometheus's own name).
pub fn register(metrics: &Metrics) -> anyhow::Result<(prometheus::IntCounterVec, prometheus::IntGauge)> {
    let counter = prometheus::IntCounterVec::new(
        prometheus::Opts::new("router_config_reloads_total", "Config reload attempts by result"),
        &["result"],
    )?;
    metrics.register(Box::new(counter.clone()))?;
    for result in ["applied", "unchanged", "invalid", "failed"] {
        counter.with_label_values(&[result]);
    }
    let last_ok = prometheus::IntGauge::new(
        "router_config_last_reload_successful",
        "1 when the last config reload attempt was applied (or found nothing to change), 0 when it was refused",
    )?;
    metrics.register(Box::new(last_ok.clone()))?;
    last_ok.set(1);
    Ok((counter, last_ok))
}

/// Watch the directory of `path`; every event but a read nudges `changed`. Without a
/// watcher (inotify limits reached) SIGHUP and the API still reload.
fn watch(path: &Path, changed: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        // Reading the file (ours included) is no change; a write being closed is.
        let read = matches!(event.kind, EventKind::Access(a) if a != notify::event::AccessKind::Close(notify::event::AccessMode::Write));
        if !read {
            let _ = changed.try_send(());
        }
    };
    let watching = notify::recommended_watcher(handler).and_then(|mut w| {
        w.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    match watching {
        Ok(w) => {
            info!(dir = %dir.display(), "watching the config file's directory: a change reloads it");
            Some(w)
        }
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot watch the config file; reload with SIGHUP or POST /api/reload");
            None
        }
    }
}

/// Read, check and apply the file once.
async fn attempt(r: &Reloading, trigger: Trigger) -> Outcome {
    let file = r.path.display().to_string();
    let running = r.info.read().config_hash.clone();
    let outcome = |result, message: String| Outcome {
        result,
        config_hash: running.clone(),
        message,
        changes: None,
        errors: Vec::new(),
        at: SystemTime::now(),
    };
    let text = match tokio::fs::read_to_string(&r.path).await {
        Ok(t) => t,
        Err(e) => {
            let problem = format!("{file}: cannot read: {e}");
            error!(?trigger, error = %problem, "reload refused; the running configuration stays");
            return Outcome { errors: vec![problem.clone()], ..outcome("invalid", problem) };
        }
    };
    let new_hash = hash(text.as_bytes());
    if new_hash == running {
        match trigger {
            Trigger::File => debug!("config file event, contents unchanged"),
            _ => info!(?trigger, config_hash = %running, "reload: the file is unchanged; nothing to do"),
        }
        return outcome("unchanged", "the file is unchanged".into());
    }
    let config = match router_core::config::parse_with(
        &text,
        &file,
        &|name| std::env::var(name).ok(),
        &crate::daemon_issues,
    ) {
        Ok(c) => c,
        Err(e) => {
            let errors: Vec<String> = e.to_string().lines().map(str::to_string).collect();
            error!(?trigger, errors = %errors.join("; "), "reload refused: the configuration is invalid; the running one stays");
            return Outcome {
                errors,
                ..outcome("invalid", "the configuration is invalid; the running one stays".into())
            };
        }
    };
    let handlers: Vec<(String, String)> = config.handlers.iter().map(|(n, h)| (n.clone(), h.kind.clone())).collect();
    let (builder, metrics) = (r.targets.clone(), r.metrics.clone());
    let build: BuildTargets = Box::new(move |config, diff| {
        // The endpoints of replaced handlers leave `/metrics` first (the new targets set
        // theirs); back as they were if the new ones cannot be built.
        let forgotten: Vec<_> = diff
            .handlers
            .removed
            .iter()
            .chain(&diff.handlers.changed)
            .map(|name| (name.clone(), builder.forget(name)))
            .collect();
        let rebuilt = diff.handlers.added.iter().chain(&diff.handlers.changed);
        builder.build(config, rebuilt, &metrics).map_err(|e| {
            for (name, endpoints) in forgotten {
                builder.restore(&name, endpoints);
            }
            format!("{e:#}")
        })
    });
    match r.reloader.reload(config, build).await {
        Ok(diff) => {
            let summary = diff.summary();
            {
                let mut info = r.info.write();
                info.config_hash = new_hash.clone();
                info.handlers = handlers;
            }
            info!(?trigger, changes = %summary, config_hash = %new_hash, "configuration reloaded");
            if !diff.restart_needed.is_empty() {
                warn!(keys = %diff.restart_needed.join(", "), "reload: these settings changed but take effect only after a restart");
            }
            Outcome {
                result: "applied",
                config_hash: new_hash,
                message: summary,
                changes: Some(diff),
                errors: Vec::new(),
                at: SystemTime::now(),
            }
        }
        Err(e) => {
            error!(?trigger, error = %e, "reload failed; the running configuration stays");
            Outcome { errors: vec![e.to_string()], ..outcome("failed", format!("not applied: {e}")) }
        }
    }
}
