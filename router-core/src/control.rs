//! What an operator can do to a running subscription, and what the admin API shows
//! of it.
//!
//! - **pause**: take nothing new; what is in flight finishes and is settled. The
//!   consumer stays at the broker (Kafka partitions are paused, so the group keeps
//!   its assignment); a delivery the broker already pushed waits unacked.
//! - **drain**: take nothing new, let what is in flight finish, then stop the
//!   consumer: whatever the broker pushed and the router had not started goes back
//!   to the broker (for other instances), and the subscription stays stopped.
//! - **resume**: consume again.
//!
//! Nothing is acked that was not handled: both only stop the hand-over from the
//! transport to the pipeline ([`crate::transport::Inbox::put`]).

use std::time::SystemTime;

use serde::Serialize;

use crate::transport::Depths;

/// What the operator asked of a subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Running,
    Paused,
    Draining,
}

/// What a subscription is doing now, as the admin API and the status page say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Consuming and handling.
    Running,
    /// Paused by an operator.
    Paused,
    /// Drain asked: in-flight messages are finishing.
    Draining,
    /// Drained: its consumer is stopped until resumed.
    Drained,
    /// The consumer is being connected or restarted (the reasons say why).
    Reconnecting,
    /// The circuit of a handler it routes to is open: it takes nothing new.
    BreakerOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Draining => "draining",
            State::Drained => "drained",
            State::Reconnecting => "reconnecting",
            State::BreakerOpen => "breaker_open",
        }
    }
}

/// Why an operator's request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("no subscription {0:?}")]
    Unknown(String),
}

/// The broker-side depths last read for a subscription.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DepthsSeen {
    #[serde(flatten)]
    pub depths: Depths,
    /// When they were read.
    #[serde(with = "rfc3339_opt")]
    pub at: Option<SystemTime>,
    /// Why the last reading failed (the figures are from the reading before).
    pub error: Option<String>,
}

/// One subscription as the admin API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub name: String,
    pub transport: String,
    pub state: State,
    pub mode: Mode,
    /// What is wrong, as `/readyz` says it.
    pub problems: Vec<String>,
    /// Messages taken from the broker and not settled yet.
    pub in_flight: u64,
    pub depths: DepthsSeen,
}

mod rfc3339_opt {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string()),
            None => s.serialize_none(),
        }
    }
}
