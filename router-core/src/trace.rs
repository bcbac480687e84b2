//! Tracing (README "Tracing"): OpenTelemetry spans per message, following the
//! messaging semantic conventions, exported with OTLP.
//!
//! ```text
//! process <destination>  (consumer; parent: the message's `traceparent`, else a new trace)
//!  ├─ deliver <handler>  (client; one per attempt; its context goes to the handler)
//!  └─ ack | retry | dead_letter <destination>  (the settlement)
//! ```
//!
//! The spans are `tracing` spans of target [`TARGET`]; the layer [`install`] returns
//! turns them into OpenTelemetry spans. With tracing off nothing here creates a span:
//! every function checks [`enabled`] (one relaxed atomic load) first and hands back
//! [`Span::none`], so the hot path costs nothing.
//!
//! Context travels as W3C `traceparent`: read from the message's headers (any case:
//! AMQP headers, Kafka headers and Redis fields keep the producer's spelling), handed
//! to targets in [`crate::DeliveryInfo::traceparent`], and written on retry copies and
//! dead letters ([`crate::Failure::traceparent`]) so the next delivery of the same
//! message continues the same trace.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::{OtlpProtocol, SubscriptionConfig, TracingConfig};
use crate::message::{Delivery, Settlement};
use crate::retry::Outcome;
use crate::transport::config::SourceConfig;

/// The `tracing` target of every span made here; the only one the exporting layer sees.
pub const TARGET: &str = "message_router::trace";

/// Set once the exporting layer is built; read before any span is made.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are made and exported.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The exporter behind the layer. [`Exporter::shutdown`] flushes the spans still
/// buffered; it blocks, so call it outside async code (after `block_on`, or in
/// `spawn_blocking`), while the runtime still exists (the gRPC exporter uses it).
pub struct Exporter(SdkTracerProvider);

impl Exporter {
    pub fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.0.shutdown() {
            eprintln!("message-router: flushing the last spans failed: {e}");
        }
    }
}

/// A `tracing` layer over subscriber `S`, boxed (the front adds it beside its log).
pub type BoxedLayer<S> = Box<dyn Layer<S> + Send + Sync>;

/// The layer that exports the router's spans with OTLP as `config` says, and the
/// exporter to shut down at exit; `None` when tracing is off. Call it inside the
/// tokio runtime for `protocol: grpc` (tonic's channel lives there). Spans are
/// batched and exported from the SDK's own thread.
pub fn install<S>(config: &TracingConfig) -> Result<Option<(BoxedLayer<S>, Exporter)>, String>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    if !config.enabled {
        return Ok(None);
    }
    let exporter = match config.protocol {
        OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            // The configured endpoint is the base, as OTEL_EXPORTER_OTLP_ENDPOINT is.
            .with_endpoint(format!("{}/v1/traces", config.endpoint.trim_end_matches('/')))
            .build(),
        OtlpProtocol::Grpc => {
            opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(config.endpoint.clone()).build()
        }
    }
    .map_err(|e| format!("tracing.endpoint {:?}: {e}", config.endpoint))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        // A message that comes with a context follows its producer's decision.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sampling))))
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(config.service_name.clone()).build())
        .build();
    let tracer = provider.tracer("message-router");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Spans carry the messaging attributes, not the code locations or thread
        // names of the router, nor busy/idle times.
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_target(false)
        .with_level(false)
        // Only the router's message spans, whatever the log filter says: a
        // transport's own spans (and the exporter's HTTP calls) never become spans.
        .with_filter(Targets::new().with_target(TARGET, tracing::Level::TRACE));
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some((Box::new(layer), Exporter(provider))))
}

/// Reads a W3C context from message headers, whatever their case.
struct Headers<'a>(&'a BTreeMap<String, String>);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .or_else(|| self.0.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v))
            .map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The `traceparent` of `span` (`00-<trace id>-<span id>-<flags>`), `None` when it is
/// not recorded (tracing off, or the span is disabled).
pub fn traceparent(span: &Span) -> Option<String> {
    if span.is_none() {
        return None;
    }
    let mut out = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut out);
    out.remove("traceparent")
}

/// Where a delivery came from, as the messaging conventions name it: the system and
/// the destination (queue, stream, topic).
fn origin(config: &SubscriptionConfig, d: &Delivery) -> (&'static str, String) {
    match (&config.source, &d.position) {
        (_, Some(Position::Kafka { topic, .. })) => ("kafka", topic.clone()),
        (_, Some(Position::Redis { stream, .. })) => ("redis", stream.clone()),
        (SourceConfig::Amqp(s), _) => ("rabbitmq", s.queue.clone()),
        (SourceConfig::Memory(s), _) => ("memory", s.queue.clone()),
        (SourceConfig::Kafka(s), _) => ("kafka", s.topics.join(",")),
        (SourceConfig::Redis(s), _) => ("redis", s.streams.join(",")),
    }
}

/// Where a message sits at its broker, beyond its id: what the conventions record for
/// Kafka (partition, offset) and Redis Streams (the entry id). Filled by the
/// transports only while tracing is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Position {
    Kafka { topic: String, partition: i32, offset: i64 },
    Redis { stream: String, id: String },
}

/// The consumer span of one delivery: `process <destination>`, continuing the trace of
/// the message's `traceparent` (a retry copy's carries the previous delivery's span)
/// or starting one; a replayed dead letter starts one linked to its last delivery. Everything else of the delivery runs
/// inside it.
pub fn consume(subscription: &str, config: &SubscriptionConfig, d: &Delivery) -> Span {
    if !enabled() {
        return Span::none();
    }
    let (system, destination) = origin(config, d);
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "process",
        otel.name = format!("process {destination}"),
        otel.kind = "consumer",
        otel.status_code = Empty,
        messaging.system = system,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %destination,
        messaging.destination.subscription.name = subscription,
        messaging.message.id = %d.message.id,
        messaging.message.body.size = d.message.body.len(),
        messaging.destination.partition.id = Empty,
        messaging.kafka.offset = Empty,
        messaging.redis.entry.id = Empty,
        router.attempt = d.attempt,
        router.redelivered = d.redelivered,
    );
    match &d.position {
        Some(Position::Kafka { partition, offset, .. }) => {
            span.record("messaging.destination.partition.id", partition.to_string());
            span.record("messaging.kafka.offset", offset);
        }
        Some(Position::Redis { id, .. }) => {
            span.record("messaging.redis.entry.id", id.as_str());
        }
        None => {}
    }
    let carried = TraceContextPropagator::new().extract(&Headers(&d.message.headers));
    // A dead letter replayed by an operator (first attempt of a copy marked replayed,
    // maybe days later) starts a trace of its own that links back to the delivery that
    // dead-lettered it; its retries then continue this new trace.
    let replayed = d.attempt == 1 && d.message.headers.contains_key(crate::message::header::REPLAYED);
    let earlier = carried.span().span_context().clone();
    if replayed && earlier.is_valid() {
        span.add_link_with_attributes(
            earlier,
            vec![opentelemetry::KeyValue::new("router.link", "replayed_dead_letter")],
        );
    } else {
        // Fails only when the layer is not installed (a second subscriber won): then
        // the span is a root of its own, which is all that can be done.
        let _ = span.set_parent(carried);
    }
    span
}

/// The span of one attempt at the handler, a child of the consumer span (the current
/// one). The target adds the endpoint and status ([`record_endpoint`], [`record_status`]).
pub fn attempt(handler: &str, route: &str, attempt: u32) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "deliver",
        otel.name = format!("deliver {handler}"),
        otel.kind = "client",
        otel.status_code = Empty,
        otel.status_description = Empty,
        router.handler = handler,
        router.route = route,
        router.attempt = attempt,
        router.target = Empty,
        server.address = Empty,
        http.response.status_code = Empty,
        rpc.grpc.status_code = Empty,
        router.outcome = Empty,
        router.retry_after_ms = Empty,
        error.type = Empty,
    );
    span
}

/// The outcome of an attempt, on its span.
pub fn attempt_done(span: &Span, outcome: &Outcome) {
    if span.is_none() {
        return;
    }
    let (name, error) = match outcome {
        Outcome::Ack => ("ack", None),
        Outcome::Retry { after, error } => {
            if let Some(after) = after {
                span.record("router.retry_after_ms", after.as_millis() as u64);
            }
            ("retry", Some(error.as_str()))
        }
        Outcome::Reject { reason } => ("reject", Some(reason.as_str())),
        Outcome::Undeliverable { reason } => ("undeliverable", Some(reason.as_str())),
    };
    span.record("router.outcome", name);
    if let Some(error) = error {
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_description", error);
        span.record("error.type", name);
    }
}

/// Called by a target inside an attempt: what kind of target it is and which endpoint
/// it reached (no-op with tracing off).
pub fn record_endpoint(kind: &str, endpoint: &str) {
    if enabled() {
        let span = Span::current();
        span.record("router.target", kind);
        span.record("server.address", endpoint);
    }
}

/// Called by an HTTP or FastCGI target with the handler's status code.
pub fn record_status(status: u16) {
    if enabled() {
        Span::current().record("http.response.status_code", status);
    }
}

/// Called by the gRPC target with the call's status code.
pub fn record_grpc_status(code: i32) {
    if enabled() {
        Span::current().record("rpc.grpc.status_code", code);
    }
}

/// The span of a settlement, a child of the consumer span (the current one):
/// `ack`, `retry` (with its delay and next attempt) or `dead_letter` (with its reason).
pub fn settle(destination_of: &Span, settlement: &Settlement) -> Span {
    if !enabled() || destination_of.is_none() {
        return Span::none();
    }
    let op = match settlement {
        Settlement::Ack => "ack",
        Settlement::Retry { .. } => "retry",
        Settlement::DeadLetter(_) => "dead_letter",
        Settlement::Release => "release",
    };
    let span = tracing::info_span!(
        target: TARGET,
        "settle",
        otel.name = op,
        otel.kind = "client",
        otel.status_code = Empty,
        messaging.operation.type = "settle",
        messaging.operation.name = op,
        router.retry.delay_ms = Empty,
        router.next_attempt = Empty,
        router.reason = Empty,
        router.last_error = Empty,
        router.attempts = Empty,
    );
    match settlement {
        Settlement::Retry { after, next_attempt, failure } => {
            span.record("router.retry.delay_ms", after.as_millis() as u64);
            span.record("router.next_attempt", next_attempt);
            span.record("router.last_error", failure.last_error.as_str());
        }
        Settlement::DeadLetter(failure) => {
            span.record("otel.status_code", "ERROR");
            span.record("router.reason", failure.reason.as_str());
            span.record("router.last_error", failure.last_error.as_str());
            span.record("router.attempts", failure.attempts);
        }
        Settlement::Ack | Settlement::Release => {}
    }
    span
}

/// The outcome of the whole delivery, on the consumer span.
pub fn consumed(span: &Span, settlement: &Settlement) {
    if span.is_none() {
        return;
    }
    if matches!(settlement, Settlement::DeadLetter(_)) {
        span.record("otel.status_code", "ERROR");
    }
}

/// Trace and span id of the current span, when it is one of the router's (for log lines).
pub fn current_ids() -> Option<(String, String)> {
    if !enabled() {
        return None;
    }
    let current = Span::current();
    if current.is_none() {
        return None;
    }
    let cx = current.context();
    let otel = cx.span();
    let sc = otel.span_context();
    sc.is_valid().then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_traceparent_in_any_case() {
        let mut h = BTreeMap::new();
        h.insert("TraceParent".to_string(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string());
        let cx = TraceContextPropagator::new().extract(&Headers(&h));
        assert_eq!(cx.span().span_context().trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
    }

    #[test]
    fn off_means_no_span() {
        assert!(!enabled());
        assert!(attempt("h", "r", 1).is_none());
        assert!(traceparent(&Span::none()).is_none());
    }
}
