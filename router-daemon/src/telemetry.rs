//! Logging through `tracing`: human text or JSON lines, filter from `RUST_LOG` or the
//! config's `log.level`; with `tracing.enabled`, the OTLP span exporter
//! (`router_core::trace`) beside it, and every log line written inside a message's
//! span ends with its `trace_id` and `span_id`.

use std::io::IsTerminal;

use router_core::config::{LogConfig, LogFormat, TracingConfig};
use router_core::trace;
use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Whether `level` is a valid filter; used by config validation.
pub fn check_filter(level: &str) -> Result<(), String> {
    EnvFilter::try_new(level).map(|_| ()).map_err(|e| format!("{level:?} is not a valid log filter: {e}"))
}

/// Install the log (and, when configured, the span exporter). The exporter it returns
/// must be shut down at exit ([`trace::Exporter::shutdown`]) to flush the last spans.
/// Call it inside the tokio runtime: the gRPC exporter's channel lives there.
pub fn init(config: &LogConfig, tracing: &TracingConfig) -> Option<trace::Exporter> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let (spans, exporter) = match trace::install::<Registry>(tracing) {
        Ok(Some((layer, exporter))) => (Some(layer), Some(exporter)),
        Ok(None) => (None, None),
        Err(e) => {
            // Tracing is an aid: a collector that cannot be set up does not stop the router.
            eprintln!("message-router: tracing is off: {e}");
            (None, None)
        }
    };
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let log: Box<dyn Layer<Registry> + Send + Sync> = match (config.format, spans.is_some()) {
        (LogFormat::Json, false) => log.json().flatten_event(true).with_filter(filter).boxed(),
        (LogFormat::Text, false) => log.with_filter(filter).boxed(),
        // The message spans are for the exporter: the log shows their ids, not all
        // their attributes on every line.
        (LogFormat::Json, true) => log
            .json()
            .flatten_event(true)
            .map_event_format(|f| TraceIds { inner: f, json: true })
            .with_filter(filter.and(filter_fn(|m| m.target() != trace::TARGET)))
            .boxed(),
        (LogFormat::Text, true) => log
            .map_event_format(|f| TraceIds { inner: f.with_ansi(ansi), json: false })
            .with_filter(filter.and(filter_fn(|m| m.target() != trace::TARGET)))
            .boxed(),
    };
    let mut layers = vec![log];
    layers.extend(spans);
    // A second init (tests, embedding) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(layers).try_init();
    exporter
}

/// Adds `trace_id` and `span_id` of the current message span to a log line: at the end
/// of a text line, as two more keys of a JSON object.
struct TraceIds<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for TraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some((trace_id, span_id)) = trace::current_ids() else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.trim_end_matches('\n');
        match body.strip_suffix('}') {
            Some(open) if self.json => writeln!(writer, r#"{open},"trace_id":"{trace_id}","span_id":"{span_id}"}}"#),
            _ => writeln!(writer, "{body} trace_id={trace_id} span_id={span_id}"),
        }
    }
}
