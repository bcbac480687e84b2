//! `message-router dlq stats|list|show|replay|purge`: the dead letters of the
//! config's subscriptions, read back from each broker without changing anything there
//! (`Transport::dead_letters`), or put back on their source and removed
//! (`Transport::rework_dead_letters`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::SystemTime;

use anyhow::{bail, Context as _};
use router_core::config::Config;
use router_core::dlq::{DeadLetter, Filter, Stats};
use router_core::transport::{self, ConsumeSpec, Rework, Reworked, Transport, TransportError};

/// A `--reason` / `reason` filter: a regular expression (plain text matches itself).
pub fn parse_regex(s: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(s).map_err(|e| format!("not a regular expression: {e}"))
}

/// A `--since` / `--until` bound: an RFC 3339 time, or a span ago (`2h`, `3d`).
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(s)
        .map_err(|_| format!("{s:?} is neither a time like 2026-12-05T10:00:00Z nor a span ago like 2h or 3d"))?;
    SystemTime::now().checked_sub(ago).ok_or_else(|| format!("{s:?} reaches before the epoch"))
}

/// The subscriptions a command is about: the one named, or every one.
fn selected<'a>(config: &'a Config, subscription: Option<&'a str>) -> anyhow::Result<Vec<&'a str>> {
    match subscription {
        Some(name) if config.subscriptions.contains_key(name) => Ok(vec![name]),
        Some(name) => bail!(
            "--subscription {name:?} is not in the config (it has: {})",
            config.subscriptions.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
        ),
        None => Ok(config.subscriptions.keys().map(String::as_str).collect()),
    }
}

type Transports = BTreeMap<String, std::sync::Arc<dyn Transport>>;

/// The transport of `subscription` (made once per command) and what it consumes.
fn open(
    config: &Config,
    transports: &mut Transports,
    subscription: &str,
) -> (std::sync::Arc<dyn Transport>, ConsumeSpec) {
    let s = &config.subscriptions[subscription];
    let t = transports
        .entry(s.transport.clone())
        .or_insert_with(|| transport::build(&s.transport, &config.transports[&s.transport]))
        .clone();
    (t, ConsumeSpec { subscription: subscription.to_string(), config: s.clone(), lag: None })
}

/// Read the dead letters of the subscription in `spec` that pass `filter`, handing
/// each to `visit` until it returns `false`.
async fn read(
    t: &dyn Transport,
    spec: &ConsumeSpec,
    filter: &Filter,
    visit: &mut (dyn FnMut(&DeadLetter) -> bool + Send),
) -> anyhow::Result<()> {
    let mut pass = |d: &DeadLetter| if filter.matches(d) { visit(d) } else { true };
    t.dead_letters(spec, &mut pass)
        .await
        .with_context(|| format!("reading the dead letters of {:?}", spec.subscription))
}

/// The dead letters that pass `filter`, at most `limit`, and whether there are more.
pub async fn collect(
    t: &dyn Transport,
    spec: &ConsumeSpec,
    filter: &Filter,
    limit: usize,
) -> anyhow::Result<(Vec<DeadLetter>, bool)> {
    let (mut found, mut more) = (Vec::new(), false);
    read(t, spec, filter, &mut |d| {
        if found.len() == limit {
            more = true;
            return false;
        }
        found.push(d.clone());
        true
    })
    .await?;
    Ok((found, more))
}

/// Counts by reason and route, oldest and newest, of those that pass `filter`; of the
/// first `limit` of them when there are more.
pub async fn stats_of(t: &dyn Transport, spec: &ConsumeSpec, filter: &Filter, limit: usize) -> anyhow::Result<Stats> {
    let mut stats = Stats::default();
    read(t, spec, filter, &mut |d| {
        stats.add(d);
        (stats.count as usize) < limit
    })
    .await?;
    Ok(stats)
}

/// What `dlq replay` and `dlq purge` are asked to do.
pub struct ReworkJob {
    pub act: Rework,
    pub limit: usize,
    /// Wait between two (`--rate`).
    pub pace: std::time::Duration,
    pub dry_run: bool,
    /// Say how far it got on stderr, about once a second.
    pub progress: bool,
}

impl ReworkJob {
    pub fn verb(&self) -> &'static str {
        if self.act == Rework::Replay {
            "replayed"
        } else {
            "purged"
        }
    }
}

/// Replay or purge the dead letters of one subscription that pass `filter`, at most
/// `job.limit`: how many were (a dry run: would be). An error says how far it got.
pub async fn rework_one(
    t: &dyn Transport,
    spec: &ConsumeSpec,
    filter: &Filter,
    job: &ReworkJob,
) -> anyhow::Result<u64> {
    let name = spec.subscription.as_str();
    if job.act == Rework::Purge && spec.config.source.kafka().is_some() {
        // Refused before counting: a dry run must not promise what cannot be done.
        return Err(anyhow::Error::new(TransportError::Unsupported(transport::kafka::PURGE_REFUSED.into()))
            .context(format!("{name}: nothing purged")));
    }
    if job.dry_run {
        let mut n = 0usize;
        read(t, spec, filter, &mut |_| {
            n += 1;
            n < job.limit
        })
        .await?;
        return Ok(n as u64);
    }
    let (mut chosen, mut said) = (0usize, std::time::Instant::now());
    let mut decide = |d: &DeadLetter| {
        if chosen == job.limit {
            return Rework::Stop;
        }
        if !filter.matches(d) {
            return Rework::Keep;
        }
        chosen += 1;
        if job.progress && said.elapsed() >= std::time::Duration::from_secs(1) {
            eprintln!("{name}: {chosen} {} so far ...", job.verb());
            said = std::time::Instant::now();
        }
        job.act
    };
    let done: Reworked = t
        .rework_dead_letters(spec, &mut decide, job.pace)
        .await
        .with_context(|| format!("{name}: stopped after {chosen} chosen (those before the error are done)"))?;
    Ok(if job.act == Rework::Replay { done.replayed } else { done.purged })
}

/// `dlq replay` / `dlq purge`: the dead letters of the selected subscriptions that
/// pass `filter`, at most `limit` per subscription. A dry run only counts them.
pub async fn rework(
    config: &Config,
    subscription: Option<&str>,
    filter: &Filter,
    job: &ReworkJob,
) -> anyhow::Result<String> {
    let mut transports = Transports::new();
    let mut out = String::new();
    for name in selected(config, subscription)? {
        let (t, spec) = open(config, &mut transports, name);
        let n = rework_one(t.as_ref(), &spec, filter, job).await?;
        if job.dry_run {
            let _ = writeln!(out, "{name}: {n} would be {} (dry run: nothing changed)", job.verb());
        } else {
            let _ = writeln!(out, "{name}: {n} {}", job.verb());
        }
    }
    close(transports).await;
    Ok(out)
}

async fn close(transports: Transports) {
    for t in transports.values() {
        t.close().await;
    }
}

/// `dlq stats`: per subscription, how many, by reason and route, oldest and newest.
pub async fn stats(config: &Config, subscription: Option<&str>, filter: &Filter) -> anyhow::Result<String> {
    let mut transports = Transports::new();
    let mut out = String::new();
    for name in selected(config, subscription)? {
        let (t, spec) = open(config, &mut transports, name);
        let stats = stats_of(t.as_ref(), &spec, filter, usize::MAX).await?;
        let _ = writeln!(out, "{name}: {} dead letter(s)", stats.count);
        if stats.count == 0 {
            continue;
        }
        if let (Some(oldest), Some(newest)) = (stats.oldest, stats.newest) {
            let _ = writeln!(out, "  oldest {}, newest {}", stamp(oldest), stamp(newest));
        }
        let _ = writeln!(out, "  by reason:");
        for (reason, n) in by_count(&stats.by_reason) {
            let _ = writeln!(out, "    {n:>8}  {reason}");
        }
        let _ = writeln!(out, "  by route:");
        for (route, n) in by_count(&stats.by_route) {
            let _ = writeln!(out, "    {n:>8}  {route}");
        }
    }
    close(transports).await;
    Ok(out)
}

/// `dlq list`: one line per dead letter, at most `limit` per subscription.
pub async fn list(
    config: &Config,
    subscription: Option<&str>,
    filter: &Filter,
    limit: usize,
) -> anyhow::Result<String> {
    let mut transports = Transports::new();
    let mut out = String::new();
    for name in selected(config, subscription)? {
        let (t, spec) = open(config, &mut transports, name);
        let (found, more) = collect(t.as_ref(), &spec, filter, limit).await?;
        let _ = writeln!(
            out,
            "{name}: {} shown{}",
            found.len(),
            if more { format!(" (more; raise --limit {limit})") } else { String::new() }
        );
        for d in &found {
            let when = d.when().map_or_else(|| "-".to_string(), stamp);
            let _ = writeln!(
                out,
                "  {}  {when}  {}  route {}  {}",
                d.id,
                d.reason(),
                d.route().unwrap_or("-"),
                d.body_excerpt(60).replace('\n', " ")
            );
        }
    }
    close(transports).await;
    Ok(out)
}

/// One dead letter by id.
pub async fn find(t: &dyn Transport, spec: &ConsumeSpec, id: &str) -> anyhow::Result<Option<DeadLetter>> {
    let filter = Filter { ids: vec![id.to_string()], ..Filter::default() };
    Ok(collect(t, spec, &filter, 1).await?.0.pop())
}

/// `dlq show ID`: one dead letter whole: its headers, origin and body.
pub async fn show(config: &Config, subscription: &str, id: &str) -> anyhow::Result<String> {
    let mut transports = Transports::new();
    selected(config, Some(subscription))?;
    let (t, spec) = open(config, &mut transports, subscription);
    let found = find(t.as_ref(), &spec, id).await;
    close(transports).await;
    let Some(d) = found? else {
        bail!("no dead letter {id:?} in subscription {subscription:?} (`message-router dlq list` shows the ids)")
    };
    let mut out = String::new();
    let _ = writeln!(out, "id:           {}", d.id);
    let _ = writeln!(out, "destination:  {}", d.destination);
    let _ = writeln!(out, "origin:       {}", d.origin());
    let _ = writeln!(out, "message id:   {}", d.message.id);
    if let Some(key) = &d.message.key {
        let _ = writeln!(out, "key:          {key}");
    }
    if let Some(ct) = &d.message.content_type {
        let _ = writeln!(out, "content type: {ct}");
    }
    let _ = writeln!(out, "router headers:");
    for (k, v) in d.router_headers() {
        let _ = writeln!(out, "  {k}: {v}");
    }
    let others: Vec<_> = d.message.headers.iter().filter(|(k, _)| !k.starts_with("x-router-")).collect();
    if !others.is_empty() {
        let _ = writeln!(out, "other headers:");
        for (k, v) in others {
            let _ = writeln!(out, "  {k}: {v}");
        }
    }
    let _ = writeln!(out, "body ({} bytes):", d.message.body.len());
    let _ = writeln!(out, "{}", d.body_excerpt(64 * 1024));
    Ok(out)
}

pub fn by_count(counts: &BTreeMap<String, u64>) -> Vec<(&String, &u64)> {
    let mut v: Vec<_> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v
}

fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
