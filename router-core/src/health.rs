//! What the router knows about each subscription's health, for `/readyz` and the
//! `router_subscription_connected` gauge: whether it has a live consumer, and what is
//! wrong with it right now (a consumer being restarted, a stall, settlements the
//! broker refuses, a handler whose circuit is open, a broker that cannot be reached).
//! Transports set "connected"; the engine and transports report problems, each
//! with the reason an operator needs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// One kind of trouble a subscription can be in. Each kind holds one reason at a time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Problem {
    /// The broker cannot be reached, or the consumer could not start (the transport's
    /// reconnect loop is at work).
    Unreachable,
    /// The consumer looks connected, but the broker does not answer the stall
    /// watchdog's question (a silent network partition the client has not noticed).
    Unresponsive,
    /// The consumer ended or was found stalled, and is being restarted.
    Restarting,
    /// Settlements (dead-letter or retry writes, acks) fail and are being retried.
    Settling,
    /// The consumer is not steady in its consumer group (Kafka): it holds and takes
    /// nothing until the group coordinator completes a rebalance.
    Group,
    /// The circuit of this handler is open: the subscription takes nothing new.
    CircuitOpen(String),
    /// An operator drained the subscription: it has no consumer until resumed.
    Drained,
}

impl Problem {
    fn label(&self) -> String {
        match self {
            Problem::Unreachable => "unreachable".into(),
            Problem::Unresponsive => "unresponsive".into(),
            Problem::Restarting => "restarting".into(),
            Problem::Settling => "settling".into(),
            Problem::Group => "group".into(),
            Problem::CircuitOpen(handler) => format!("circuit of handler {handler:?} open"),
            Problem::Drained => "drained".into(),
        }
    }
}

/// The health of one subscription, shared by its transport, its pipeline and the
/// admin server.
#[derive(Debug, Default)]
pub struct SourceStatus {
    connected: AtomicBool,
    on_change: Option<prometheus::IntGauge>,
    problems: Mutex<BTreeMap<Problem, String>>,
}

impl SourceStatus {
    pub fn new(gauge: Option<prometheus::IntGauge>) -> Self {
        SourceStatus { connected: AtomicBool::new(false), on_change: gauge, problems: Mutex::default() }
    }

    /// The transport has (or no longer has) a live consumer at the broker.
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        if let Some(g) = &self.on_change {
            g.set(i64::from(up));
        }
        if up {
            self.clear(&Problem::Unreachable);
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Report `problem`, replacing its earlier reason.
    pub fn report(&self, problem: Problem, reason: impl Into<String>) {
        self.problems.lock().insert(problem, reason.into());
    }

    pub fn clear(&self, problem: &Problem) {
        self.problems.lock().remove(problem);
    }

    pub fn has(&self, problem: &Problem) -> bool {
        self.problems.lock().contains_key(problem)
    }

    /// Whether the subscription works as it should: connected, nothing wrong.
    pub fn is_ready(&self) -> bool {
        self.is_connected() && self.problems.lock().is_empty()
    }

    /// Why it is not ready, one line per reason (empty when ready).
    pub fn reasons(&self) -> Vec<String> {
        let problems = self.problems.lock();
        let mut out = Vec::new();
        if !self.is_connected()
            && !problems.contains_key(&Problem::Unreachable)
            && !problems.contains_key(&Problem::Drained)
        {
            out.push("no live consumer".to_string());
        }
        out.extend(problems.iter().map(|(p, reason)| format!("{}: {reason}", p.label())));
        out
    }
}

/// The subscriptions running now, each with its health (a reload adds and removes some).
type Sources = Arc<dyn Fn() -> Vec<(String, Arc<SourceStatus>)> + Send + Sync>;

/// Live health of every subscription, for `/readyz`.
#[derive(Clone)]
pub struct Readiness(Sources);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(Arc::new(Vec::new))
    }
}

impl Readiness {
    pub(crate) fn new(sources: Sources) -> Self {
        Readiness(sources)
    }

    /// Names of subscriptions that are not ready.
    pub fn not_ready(&self) -> Vec<String> {
        (self.0)().into_iter().filter(|(_, s)| !s.is_ready()).map(|(n, _)| n).collect()
    }

    /// Every subscription that is not ready, with its reasons.
    pub fn report(&self) -> Vec<(String, Vec<String>)> {
        (self.0)().into_iter().filter(|(_, s)| !s.is_ready()).map(|(n, s)| (n, s.reasons())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_connected_and_nothing_is_wrong() {
        let s = SourceStatus::new(None);
        assert_eq!(s.reasons(), ["no live consumer"]);
        s.set_connected(true);
        assert!(s.is_ready());
        s.report(Problem::Settling, "2 messages: publish refused");
        s.report(Problem::CircuitOpen("php".into()), "5 of 5 attempts failed");
        assert!(!s.is_ready());
        assert_eq!(
            s.reasons(),
            ["settling: 2 messages: publish refused", "circuit of handler \"php\" open: 5 of 5 attempts failed"]
        );
        s.clear(&Problem::Settling);
        s.clear(&Problem::CircuitOpen("php".into()));
        assert!(s.is_ready());
        s.report(Problem::Unreachable, "connection refused");
        s.set_connected(false);
        assert_eq!(s.reasons(), ["unreachable: connection refused"]);
        s.set_connected(true);
        assert!(s.is_ready(), "connecting clears unreachable");
    }
}
