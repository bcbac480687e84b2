//! Prometheus metrics of the core, registered once per [`Metrics`] (one registry per
//! router, so tests and embedders do not share global state).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    /// Deliveries taken from the broker.
    pub received: IntCounterVec,
    /// Of those, deliveries the broker had delivered before (a consumer died or gave
    /// them back): what at-least-once costs in duplicates, at most.
    pub redelivered: IntCounterVec,
    pub acked: IntCounterVec,
    pub retried: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    /// Settlement tries the broker refused (each is tried again, never the handler).
    pub settle_failures: IntCounterVec,
    /// Deliveries acked without calling the handler: already handled (dedup).
    pub deduplicated: IntCounterVec,
    /// Dedup store lookups or records that failed (the message was delivered anyway).
    pub dedup_errors: IntCounterVec,
    pub handler_seconds: HistogramVec,
    pub in_flight: IntGaugeVec,
    /// 1 while the subscription has a live consumer at its broker.
    pub connected: IntGaugeVec,
    /// Messages in a partition behind the group's committed offset (Kafka).
    pub consumer_lag: IntGaugeVec,
    /// Messages whose settlement is being retried right now (held unacked).
    pub settling: IntGaugeVec,
    /// Consumers started again by the supervisor (ended on their own, failed, stalled).
    pub consumer_restarts: IntCounterVec,
    /// Stalls the watchdog found (work waiting at the broker, nothing arriving).
    pub stalls: IntCounterVec,
    /// 0 closed, 1 open, 2 half-open, per handler.
    pub circuit_state: IntGaugeVec,
    /// Times a handler's circuit opened.
    pub circuit_opened: IntCounterVec,
    /// Deliveries a handler may have in flight now: its fixed `max_in_flight`, or
    /// where `auto` stands.
    pub concurrency_limit: IntGaugeVec,
    /// Failed attempts not counted against their message because the handler's
    /// circuit was open (the message waited and was tried again).
    pub attempts_held: IntCounterVec,
    /// Messages waiting at the broker for the subscription (AMQP: ready in the queue;
    /// Redis: the group's lag plus its pending entries; Kafka: the group's lag).
    pub backlog: IntGaugeVec,
    /// Messages in the subscription's dead-letter destination.
    pub dead_letters: IntGaugeVec,
    /// Retries written and not yet due (delay queues, the delayed set, the retry topic).
    pub retries_waiting: IntGaugeVec,
    /// 1 while an operator has paused or drained the subscription.
    pub paused: IntGaugeVec,
    /// The name of every metric family registered (an empty vector family is missing
    /// from `/metrics` until its first series): for the dashboard and alert checks.
    names: parking_lot::Mutex<Vec<String>>,
}

impl Metrics {
    /// A fresh registry with every core metric registered.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let names = std::cell::RefCell::new(Vec::<String>::new());
        let record = |c: &dyn prometheus::core::Collector| {
            names.borrow_mut().extend(c.desc().iter().map(|d| d.fq_name.clone()));
        };
        let route_labels = &["subscription", "route", "handler"];
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            record(&c);
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge_by = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            record(&g);
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let gauge = |name: &str, help: &str| gauge_by(name, help, &["subscription"]);
        let received =
            counter("router_messages_received_total", "Deliveries received from the broker", &["subscription"])?;
        let redelivered = counter(
            "router_messages_redelivered_total",
            "Deliveries the broker had delivered before (after a crash, a claim, a reconnect)",
            &["subscription"],
        )?;
        let acked = counter("router_messages_acked_total", "Messages handled and acked", route_labels)?;
        let retried =
            counter("router_messages_retried_total", "Messages durably re-enqueued for a later attempt", route_labels)?;
        let dead_lettered = counter(
            "router_messages_dead_lettered_total",
            "Messages durably written to a dead-letter destination",
            route_labels,
        )?;
        let settle_failures = counter(
            "router_settle_failures_total",
            "Settlement tries the broker refused (the settlement is tried again; the handler is not called again)",
            &["subscription"],
        )?;
        let deduplicated = counter(
            "router_messages_deduplicated_total",
            "Deliveries acked without calling the handler because their id was already handled",
            &["subscription"],
        )?;
        let dedup_errors = counter(
            "router_dedup_errors_total",
            "Dedup store lookups or records that failed (at least once still holds)",
            &["subscription"],
        )?;
        let handler_seconds = HistogramVec::new(
            HistogramOpts::new("router_handler_duration_seconds", "Time from delivery to the handler's answer")
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
            &["handler"],
        )?;
        record(&handler_seconds);
        registry.register(Box::new(handler_seconds.clone()))?;
        let in_flight = gauge("router_in_flight", "Messages taken from the broker and not yet settled")?;
        let connected = gauge("router_subscription_connected", "1 while the subscription is consuming")?;
        let consumer_lag = gauge_by(
            "router_consumer_lag",
            "Messages of a partition after the group's committed offset (Kafka)",
            &["subscription", "topic", "partition"],
        )?;
        let settling = gauge(
            "router_settling",
            "Messages whose settlement (ack, retry or dead-letter write) the broker refused and that are being retried",
        )?;
        let consumer_restarts = counter(
            "router_consumer_restarts_total",
            "Consumers started again by the supervisor (ended on their own, failed or stalled)",
            &["subscription"],
        )?;
        let stalls = counter(
            "router_consumer_stalls_total",
            "Stalls found by the watchdog: messages waiting at the broker, none arriving, room in the window",
            &["subscription"],
        )?;
        let circuit_state =
            gauge_by("router_circuit_state", "Circuit of a handler: 0 closed, 1 open, 2 half-open", &["handler"])?;
        let circuit_opened =
            counter("router_circuit_opened_total", "Times the circuit of a handler opened", &["handler"])?;
        let concurrency_limit = gauge_by(
            "router_handler_concurrency_limit",
            "Deliveries a handler may have in flight now: its fixed max_in_flight, or where `auto` stands",
            &["handler"],
        )?;
        let attempts_held = counter(
            "router_attempts_held_total",
            "Failed attempts not counted against their message because the handler's circuit was open",
            &["handler"],
        )?;
        let backlog = gauge(
            "router_backlog_messages",
            "Messages waiting at the broker (AMQP: ready in the queue; Redis: group lag plus pending; Kafka: group lag)",
        )?;
        let dead_letters = gauge("router_dead_letters", "Messages in the subscription's dead-letter destination")?;
        let retries_waiting = gauge("router_retries_waiting", "Retries written durably and waiting for their time")?;
        let paused = gauge("router_subscription_paused", "1 while an operator has paused or drained the subscription")?;
        Ok(Metrics {
            registry,
            received,
            redelivered,
            acked,
            retried,
            dead_lettered,
            settle_failures,
            deduplicated,
            dedup_errors,
            handler_seconds,
            in_flight,
            connected,
            consumer_lag,
            settling,
            consumer_restarts,
            stalls,
            circuit_state,
            circuit_opened,
            concurrency_limit,
            attempts_held,
            backlog,
            dead_letters,
            retries_waiting,
            paused,
            names: parking_lot::Mutex::new(names.into_inner()),
        })
    }

    /// Drop the gauges of a subscription a reload removed (its counters stay: a
    /// rate over them still reads right), so no dashboard or alert sees a consumer
    /// that is gone as one that is down.
    pub fn forget_subscription(&self, name: &str) {
        for gauge in [
            &self.in_flight,
            &self.connected,
            &self.consumer_lag,
            &self.settling,
            &self.backlog,
            &self.dead_letters,
            &self.retries_waiting,
            &self.paused,
        ] {
            let _ = forget(gauge, "subscription", name);
        }
    }

    /// Drop the gauges of a handler a reload removed.
    pub fn forget_handler(&self, name: &str) {
        let _ = forget(&self.circuit_state, "handler", name);
        let _ = forget(&self.concurrency_limit, "handler", name);
    }

    /// Register a metric family of a component beyond the core (a target's).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) -> Result<(), prometheus::Error> {
        let names: Vec<String> = c.desc().iter().map(|d| d.fq_name.clone()).collect();
        self.registry.register(c)?;
        self.names.lock().extend(names);
        Ok(())
    }

    /// Every metric family registered, by name, in registration order.
    pub fn names(&self) -> Vec<String> {
        self.names.lock().clone()
    }

    /// The text exposition format, for `/metrics`.
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder.encode_to_string(&self.registry.gather()).unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

/// Remove every series of `vec` whose label `label` is `value`; returns what went:
/// each series' labels and value (a caller may put them back).
pub fn forget(vec: &IntGaugeVec, label: &str, value: &str) -> Vec<(std::collections::HashMap<String, String>, i64)> {
    use prometheus::core::Collector;
    let mut gone = Vec::new();
    for family in vec.collect() {
        for m in family.get_metric() {
            let labels: std::collections::HashMap<&str, &str> =
                m.get_label().iter().map(|l| (l.name(), l.value())).collect();
            if labels.get(label) == Some(&value) && vec.remove(&labels).is_ok() {
                let owned = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                gone.push((owned, m.get_gauge().get_value() as i64));
            }
        }
    }
    gone
}
