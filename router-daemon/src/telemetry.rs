//! Logging through `tracing`: human text or JSON lines, filter from `RUST_LOG` or the
//! config's `log.level`.

use std::io::IsTerminal;

use router_core::config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Whether `level` is a valid filter; used by config validation.
pub fn check_filter(level: &str) -> Result<(), String> {
    EnvFilter::try_new(level).map(|_| ()).map_err(|e| format!("{level:?} is not a valid log filter: {e}"))
}

pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second init (tests, embedding) keeps the first subscriber.
    let _ = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
