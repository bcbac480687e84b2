//! Message Router core: everything between a broker and a handler that does not
//! depend on how the handler is reached (HTTP in the daemon, PHP in the extension).
//!
//! # Layout
//! - [`message`]: the message model, [`Delivery`] (settled exactly once, handed back
//!   to the broker when dropped) and [`Settlement`].
//! - [`retry`]: [`Outcome`] (what a handler said), [`RetryPolicy`] and the one pure
//!   [`decide`] function that turns an outcome into ack / retry / dead-letter.
//! - [`routing`]: the routing table (subscription, routing-key globs, headers).
//! - [`engine`]: the per-subscription pipeline: bounded in-flight, per-handler limits,
//!   the single settle point (settlements the broker refuses are retried), the
//!   supervisor and stall watchdog of each consumer, graceful drain. [`Router`] wires a
//!   config to targets; [`Reloader`] applies a new one as a diff while it runs.
//! - [`control`]: what an operator can do to a running subscription (pause, drain,
//!   resume) and what the admin API shows of it ([`Subscriptions`]).
//! - [`breaker`]: the circuit breaker of each handler.
//! - [`concurrency`]: each handler's in-flight limit, fixed or adaptive (AIMD on the
//!   handler's latency, `max_in_flight: auto`).
//! - [`health`]: what `/readyz` reports per subscription ([`Readiness`]).
//! - [`backoff`]: the one exponential backoff (reconnects, restarts, settle retries).
//! - [`dedup`]: Redis-backed skipping of messages already handled (optional).
//! - [`dlq`]: dead letters as `message-router dlq` shows them: filters, stats (the
//!   transports read them back).
//! - [`target`]: the [`Target`] trait handlers are reached through.
//! - [`transport`]: brokers (`amqp`, `kafka`, `redis`, `memory`) behind the
//!   [`Transport`] trait; each owns its transport and subscription config sections
//!   (`transport/<broker>/config.rs`), listed by kind in `transport/config.rs`.
//! - [`config`]: the YAML model shared by daemon and extension: the keys every
//!   transport, handler and subscription take; loading (each section handed to the
//!   component that owns it), `${ENV}` interpolation and validation with key paths;
//!   `config/diff.rs`: what a reload changes, component by component.
//! - [`metrics`]: the Prometheus registry.
//! - [`runtime`]: how many worker threads the router's runtime gets.
//! - [`trace`]: OpenTelemetry spans per message (consume, attempt, settle), W3C context
//!   from and to messages and handlers, the OTLP exporter; nothing when off.

pub mod backoff;
pub mod breaker;
pub mod concurrency;
pub mod config;
pub mod control;
pub mod dedup;
pub mod dlq;
pub mod engine;
pub mod health;
pub mod message;
pub mod metrics;
pub mod retry;
pub mod routing;
pub mod runtime;
pub mod target;
pub mod trace;
pub mod transport;

#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz_support;

pub use engine::{
    BuildError, BuildTargets, ReloadError, Reloader, Router, RunError, SubscriptionHandle, Subscriptions,
};
pub use health::Readiness;
pub use message::{Delivery, Failure, Message, Settlement};
pub use metrics::Metrics;
pub use retry::{decide, Decision, Outcome, RetryPolicy};
pub use target::{DeliveryInfo, Target};
pub use transport::Transport;
