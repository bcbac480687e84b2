//! `message-router`: see `lib.rs` for the layout.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::time::Duration;

use router_core::transport;
use router_core::transport::Rework;
use router_core::Message;

/// One process that owns every broker connection and delivers messages to HTTP handlers.
#[derive(Parser)]
#[command(name = "message-router", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume every subscription and deliver until SIGTERM/SIGINT.
    Run {
        #[arg(long, short, env = "MESSAGE_ROUTER_CONFIG")]
        config: PathBuf,
        /// Worker threads of the runtime (default: half the cores, at least 1; README
        /// "Performance" says why).
        #[arg(long, env = router_core::runtime::THREADS_ENV, value_parser = router_core::runtime::parse_threads)]
        threads: Option<usize>,
    },
    /// Check a config file and exit: 0 if valid, 2 with every problem listed if not.
    Validate {
        #[arg(long, short, env = "MESSAGE_ROUTER_CONFIG")]
        config: PathBuf,
    },
    /// Publish messages (confirmed, persistent) through a transport of the config. On
    /// Redis the routing key names the stream (XADD with fields body, message_id, ...).
    Publish {
        #[arg(long, short, env = "MESSAGE_ROUTER_CONFIG")]
        config: PathBuf,
        /// Transport name from the config.
        #[arg(long)]
        transport: String,
        /// Exchange ("" is the default exchange, where the routing key is a queue name;
        /// Redis has none).
        #[arg(long, default_value = "")]
        exchange: String,
        /// AMQP routing key, or the Redis stream.
        #[arg(long)]
        routing_key: String,
        /// Message body.
        #[arg(long, default_value = "{}")]
        body: String,
        /// Header as NAME=VALUE; repeatable.
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        #[arg(long, default_value = "application/json")]
        content_type: String,
        /// Message id; with --count > 1 the index is appended.
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Dead letters of the config's subscriptions, on every broker: `stats`, `list`,
    /// `show`. Reading changes nothing at the broker.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Per subscription: how many, by reason and by route, oldest and newest.
    Stats {
        #[arg(long, short, env = "MESSAGE_ROUTER_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        select: Select,
    },
    /// One line per dead letter: id, when, reason, route, body excerpt.
    List {
        #[arg(long, short, env = "MESSAGE_ROUTER_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        select: Select,
        /// At most this many per subscription.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Put dead letters back on their source (queue, stream or topic): a copy with
    /// the failure headers removed (attempt 1 again) and `x-router-replayed` set,
    /// confirmed before the dead letter is removed (Kafka keeps it: a log).
    Replay {
        #[arg(long, short, env = "MESSAGE_ROUTER_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        job: Job,
        /// At most this many per second.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Delete dead letters (RabbitMQ, Redis; a Kafka topic keeps its records until
    /// their retention). Asks first unless --yes.
    Purge {
        #[arg(long, short, env = "MESSAGE_ROUTER_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        job: Job,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// One dead letter whole: the router's headers, its origin, its body.
    Show {
        #[arg(long, short, env = "MESSAGE_ROUTER_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        subscription: String,
        /// The id `dlq list` shows.
        id: String,
    },
}

/// How much of a replay or purge.
#[derive(clap::Args)]
struct Job {
    /// Only these ids (as `dlq list` shows them); repeatable.
    #[arg(long = "id")]
    ids: Vec<String>,
    /// At most this many per subscription.
    #[arg(long, default_value_t = usize::MAX, hide_default_value = true)]
    limit: usize,
    /// Count what would be done; change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Which dead letters: every condition given must hold.
#[derive(clap::Args)]
struct Select {
    /// Only this subscription (default: all).
    #[arg(long)]
    subscription: Option<String>,
    /// The reason contains this text, or matches this regular expression.
    #[arg(long, value_parser = router_daemon::dlq::parse_regex)]
    reason: Option<regex::Regex>,
    /// Only dead letters of this route.
    #[arg(long)]
    route: Option<String>,
    /// Dead-lettered at or after: an RFC 3339 time or a span ago (`2h`, `3d`).
    #[arg(long, value_parser = router_daemon::dlq::parse_time)]
    since: Option<SystemTime>,
    /// Dead-lettered before: an RFC 3339 time or a span ago.
    #[arg(long, value_parser = router_daemon::dlq::parse_time)]
    until: Option<SystemTime>,
}

impl Select {
    fn filter(&self) -> router_core::dlq::Filter {
        router_core::dlq::Filter {
            reason: self.reason.clone(),
            route: self.route.clone(),
            since: self.since,
            until: self.until,
            ids: Vec::new(),
        }
    }
}

impl Select {
    /// [`Select::filter`] with the ids of a replay or purge.
    fn filter_ids(&self, job: &Job) -> router_core::dlq::Filter {
        router_core::dlq::Filter { ids: job.ids.clone(), ..self.filter() }
    }
}

impl Job {
    fn work(&self, act: Rework, pace: Duration) -> router_daemon::dlq::ReworkJob {
        router_daemon::dlq::ReworkJob {
            act,
            limit: self.limit,
            pace,
            dry_run: self.dry_run,
            progress: std::io::stderr().is_terminal(),
        }
    }
}

async fn dlq(config: &router_core::config::Config, command: DlqCommand) -> anyhow::Result<String> {
    use router_daemon::dlq;
    match command {
        DlqCommand::Stats { select, .. } => dlq::stats(config, select.subscription.as_deref(), &select.filter()).await,
        DlqCommand::List { select, limit, .. } => {
            dlq::list(config, select.subscription.as_deref(), &select.filter(), limit).await
        }
        DlqCommand::Show { subscription, id, .. } => dlq::show(config, &subscription, &id).await,
        DlqCommand::Replay { select, job, rate, .. } => {
            let pace = match rate {
                Some(r) if r.is_finite() && r > 0.0 => Duration::from_secs_f64(1.0 / r),
                Some(r) => anyhow::bail!("--rate {r} must be a number of messages per second above 0"),
                None => Duration::ZERO,
            };
            let work = job.work(Rework::Replay, pace);
            dlq::rework(config, select.subscription.as_deref(), &select.filter_ids(&job), &work).await
        }
        DlqCommand::Purge { select, job, yes, .. } => {
            let filter = select.filter_ids(&job);
            let sub = select.subscription.as_deref();
            if !yes && !job.dry_run {
                let mut count = job.work(Rework::Purge, Duration::ZERO);
                count.dry_run = true;
                let plan = dlq::rework(config, sub, &filter, &count).await?;
                if !confirm(&plan.replace("would be purged (dry run: nothing changed)", "to purge"))? {
                    anyhow::bail!("nothing purged");
                }
            }
            dlq::rework(config, sub, &filter, &job.work(Rework::Purge, Duration::ZERO)).await
        }
    }
}

/// Ask on the terminal; refuse when there is none to ask on.
fn confirm(plan: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("refusing to purge without --yes: stdin is not a terminal to ask on (--dry-run counts)");
    }
    eprint!("{plan}Purge them? Type yes to go on: ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config_path = match &cli.command {
        Command::Run { config, .. }
        | Command::Validate { config }
        | Command::Publish { config, .. }
        | Command::Dlq { command: DlqCommand::Stats { config, .. } }
        | Command::Dlq { command: DlqCommand::List { config, .. } }
        | Command::Dlq { command: DlqCommand::Show { config, .. } }
        | Command::Dlq { command: DlqCommand::Replay { config, .. } }
        | Command::Dlq { command: DlqCommand::Purge { config, .. } } => config.clone(),
    };
    let config = match router_daemon::load_config(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("message-router: the configuration is invalid; nothing was started");
            return ExitCode::from(2);
        }
    };
    if let Command::Validate { .. } = cli.command {
        println!(
            "{}: OK ({} transports, {} handlers, {} subscriptions, {} routes)",
            config_path.display(),
            config.transports.len(),
            config.handlers.len(),
            config.subscriptions.len(),
            config.routes.len()
        );
        return ExitCode::SUCCESS;
    }
    let threads = match &cli.command {
        Command::Run { threads: Some(n), .. } => *n,
        _ => router_core::runtime::default_threads(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("message-router: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Spans only for `run`: the other commands handle no messages.
    let tracing = match &cli.command {
        Command::Run { .. } => config.tracing.clone(),
        _ => router_core::config::TracingConfig::default(),
    };
    // Inside the runtime: the gRPC span exporter's channel lives there.
    let exporter = {
        let _guard = runtime.enter();
        router_daemon::telemetry::init(&config.log, &tracing)
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run { .. } => router_daemon::run(config, config_path.clone()).await,
            Command::Publish {
                transport: name, exchange, routing_key, body, headers, content_type, id, count, ..
            } => {
                let Some(t) = config.transports.get(&name) else {
                    anyhow::bail!("--transport {name:?} is not defined in {}", config_path.display());
                };
                let t = transport::build(&name, t);
                for i in 0..count {
                    let id = match (&id, count) {
                        (Some(id), 1) => id.clone(),
                        (Some(id), _) => format!("{id}-{i}"),
                        (None, _) => uuid::Uuid::new_v4().to_string(),
                    };
                    let message = Message {
                        id,
                        body: body.clone().into_bytes().into(),
                        headers: headers.iter().cloned().collect(),
                        content_type: Some(content_type.clone()),
                        timestamp: Some(SystemTime::now()),
                        ..Message::default()
                    };
                    t.publish(&exchange, &routing_key, &message).await?;
                }
                t.close().await;
                println!("published {count} message(s) to exchange {exchange:?} with routing key {routing_key:?}");
                Ok(())
            }
            Command::Dlq { command } => {
                print!("{}", dlq(&config, command).await?);
                Ok(())
            }
            Command::Validate { .. } => Ok(()),
        }
    });
    // Flush the spans still buffered; blocking, so after block_on, while the runtime
    // (which the gRPC exporter needs) still exists.
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("message-router: {e:#}");
            ExitCode::FAILURE
        }
    }
}
