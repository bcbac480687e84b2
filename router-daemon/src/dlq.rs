//! `message-router dlq stats|list|show`: the dead letters of the config's
//! subscriptions, read back from each broker without changing anything there
//! (`Transport::dead_letters`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::SystemTime;

use anyhow::{bail, Context as _};
use router_core::config::Config;
use router_core::dlq::{DeadLetter, Filter, Stats};
use router_core::transport::{self, ConsumeSpec, Transport};

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

/// Read the dead letters of `subscription` that pass `filter`, handing each to `visit`
/// until it returns `false`.
async fn read(
    config: &Config,
    transports: &mut BTreeMap<String, std::sync::Arc<dyn Transport>>,
    subscription: &str,
    filter: &Filter,
    visit: &mut (dyn FnMut(DeadLetter) -> bool + Send),
) -> anyhow::Result<()> {
    let s = &config.subscriptions[subscription];
    let t = match transports.get(&s.transport) {
        Some(t) => t.clone(),
        None => {
            let t = transport::build(&s.transport, &config.transports[&s.transport]);
            transports.insert(s.transport.clone(), t.clone());
            t
        }
    };
    let spec = ConsumeSpec { subscription: subscription.to_string(), config: s.clone(), lag: None };
    let mut pass = |d: DeadLetter| if filter.matches(&d) { visit(d) } else { true };
    t.dead_letters(&spec, &mut pass).await.with_context(|| format!("reading the dead letters of {subscription:?}"))
}

async fn close(transports: BTreeMap<String, std::sync::Arc<dyn Transport>>) {
    for t in transports.values() {
        t.close().await;
    }
}

/// `dlq stats`: per subscription, how many, by reason and route, oldest and newest.
pub async fn stats(config: &Config, subscription: Option<&str>, filter: &Filter) -> anyhow::Result<String> {
    let mut transports = BTreeMap::new();
    let mut out = String::new();
    for name in selected(config, subscription)? {
        let mut stats = Stats::default();
        read(config, &mut transports, name, filter, &mut |d| {
            stats.add(&d);
            true
        })
        .await?;
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
    let mut transports = BTreeMap::new();
    let mut out = String::new();
    for name in selected(config, subscription)? {
        let mut shown = 0usize;
        let mut more = false;
        let mut lines = String::new();
        read(config, &mut transports, name, filter, &mut |d| {
            if shown == limit {
                more = true;
                return false;
            }
            shown += 1;
            let when = d.when().map_or_else(|| "-".to_string(), stamp);
            let _ = writeln!(
                lines,
                "  {}  {when}  {}  route {}  {}",
                d.id,
                d.reason(),
                d.route().unwrap_or("-"),
                d.body_excerpt(60).replace('\n', " ")
            );
            true
        })
        .await?;
        let _ = writeln!(
            out,
            "{name}: {shown} shown{}",
            if more { format!(" (more; raise --limit {limit})") } else { String::new() }
        );
        out.push_str(&lines);
    }
    close(transports).await;
    Ok(out)
}

/// `dlq show ID`: one dead letter whole: its headers, origin and body.
pub async fn show(config: &Config, subscription: &str, id: &str) -> anyhow::Result<String> {
    let mut transports = BTreeMap::new();
    selected(config, Some(subscription))?;
    let filter = Filter { ids: vec![id.to_string()], ..Filter::default() };
    let mut found = None;
    read(config, &mut transports, subscription, &filter, &mut |d| {
        found = Some(d);
        false
    })
    .await?;
    close(transports).await;
    let Some(d) = found else {
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

fn by_count(counts: &BTreeMap<String, u64>) -> Vec<(&String, &u64)> {
    let mut v: Vec<_> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v
}

fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
