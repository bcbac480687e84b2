//! Where retry is decided: the handler's [`Outcome`], the attempt number and the
//! subscription's [`RetryPolicy`] go in, a [`Decision`] comes out. [`decide`] is pure
//! (the jitter draw is an argument) so the whole table is unit-tested.

use std::time::Duration;

use serde::Deserialize;

/// What a handler said about one attempt. Targets (HTTP pools, PHP callables) map
/// their own results onto this; nothing else crosses from a target to the engine.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Handled; remove it from the broker.
    Ack,
    /// The attempt failed, try again: after `after` when the handler named a delay
    /// (HTTP `Retry-After`, `RetryLater(delay)`), else after the policy's backoff.
    Retry { after: Option<Duration>, error: String },
    /// Poison message: dead-letter now, whatever attempts are left.
    Reject { reason: String },
    /// The target cannot even send this message to its handler (a header its
    /// protocol cannot carry): dead-letter now; no handler saw it.
    Undeliverable { reason: String },
}

impl Outcome {
    /// Whether the handler (or the way to it) failed: what the circuit breaker counts.
    /// A rejection is an answer, and an undeliverable message is the message's fault.
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Retry { .. })
    }
}

/// Retry policy of a subscription or route; plain data from the config.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first delivery included. 1 means never retry.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    #[serde(deserialize_with = "crate::config::duration::deserialize")]
    pub initial_delay: Duration,
    /// Each further delay is the previous one times this (>= 1).
    pub multiplier: f64,
    /// Upper bound for a computed delay.
    #[serde(deserialize_with = "crate::config::duration::deserialize")]
    pub max_delay: Duration,
    /// Spread each delay uniformly by ±jitter (0 to 1), so retries of a burst of
    /// failures do not return together.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
            jitter: 0.1,
        }
    }
}

/// Longest delay the router accepts from a handler (`Retry-After`), so a typo in a
/// handler cannot park a message for years.
pub const MAX_HANDLER_DELAY: Duration = Duration::from_secs(24 * 3600);

/// What to do with a message after an attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Ack,
    /// Re-enqueue durably for attempt `next_attempt`, due after `after`.
    Retry {
        after: Duration,
        next_attempt: u32,
        error: String,
    },
    /// Dead-letter with `reason`; `error` is the last error the handler reported.
    DeadLetter {
        reason: String,
        error: String,
    },
}

impl RetryPolicy {
    /// Backoff before attempt `failed_attempt + 1`, without jitter.
    pub fn base_delay(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial_delay.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        let max = self.max_delay.as_secs_f64();
        Duration::from_secs_f64(if secs.is_finite() { secs.min(max) } else { max })
    }
}

/// Decide the fate of attempt number `attempt` (1-based) that ended in `outcome`.
/// `draw` is a uniform random number in [0, 1) for the jitter.
pub fn decide(policy: &RetryPolicy, attempt: u32, outcome: Outcome, draw: f64) -> Decision {
    match outcome {
        Outcome::Ack => Decision::Ack,
        Outcome::Reject { reason } => {
            Decision::DeadLetter { reason: format!("rejected by handler: {reason}"), error: reason }
        }
        Outcome::Undeliverable { reason } => {
            Decision::DeadLetter { reason: format!("cannot be delivered (no handler saw it): {reason}"), error: reason }
        }
        Outcome::Retry { error, .. } if attempt >= policy.max_attempts => Decision::DeadLetter {
            reason: format!("max attempts exhausted ({attempt} of {})", policy.max_attempts),
            error,
        },
        Outcome::Retry { after: Some(after), error } => {
            Decision::Retry { after: after.min(MAX_HANDLER_DELAY), next_attempt: attempt + 1, error }
        }
        Outcome::Retry { after: None, error } => {
            let base = policy.base_delay(attempt).as_secs_f64();
            let jitter = policy.jitter.clamp(0.0, 1.0);
            let factor = 1.0 + jitter * (2.0 * draw.clamp(0.0, 1.0) - 1.0);
            Decision::Retry {
                after: Duration::from_secs_f64((base * factor).max(0.0)),
                next_attempt: attempt + 1,
                error,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_delay: Duration::from_millis(100),
            multiplier: 3.0,
            max_delay: Duration::from_secs(1),
            jitter: 0.0,
        }
    }

    fn fail() -> Outcome {
        Outcome::Retry { after: None, error: "HTTP 500".into() }
    }

    fn retry_after(ms: u64, next: u32) -> Decision {
        Decision::Retry { after: Duration::from_millis(ms), next_attempt: next, error: "HTTP 500".into() }
    }

    #[test]
    fn decides_every_outcome_as_the_table_says() {
        let p = policy();
        let table: Vec<(u32, Outcome, f64, Decision)> = vec![
            (1, Outcome::Ack, 0.5, Decision::Ack),
            (4, Outcome::Ack, 0.5, Decision::Ack),
            // exponential backoff: 100ms, 300ms, 900ms
            (1, fail(), 0.5, retry_after(100, 2)),
            (2, fail(), 0.5, retry_after(300, 3)),
            (3, fail(), 0.5, retry_after(900, 4)),
            // attempts exhausted
            (
                4,
                fail(),
                0.5,
                Decision::DeadLetter { reason: "max attempts exhausted (4 of 4)".into(), error: "HTTP 500".into() },
            ),
            // a handler-named delay wins over the policy
            (
                1,
                Outcome::Retry { after: Some(Duration::from_secs(7)), error: "HTTP 429".into() },
                0.5,
                Decision::Retry { after: Duration::from_secs(7), next_attempt: 2, error: "HTTP 429".into() },
            ),
            // ... but not over the attempt limit
            (
                4,
                Outcome::Retry { after: Some(Duration::from_secs(7)), error: "HTTP 429".into() },
                0.5,
                Decision::DeadLetter { reason: "max attempts exhausted (4 of 4)".into(), error: "HTTP 429".into() },
            ),
            // a message the target cannot send is dead-lettered at once, saying so
            (
                1,
                Outcome::Undeliverable { reason: "value of header \"x\" cannot be sent over HTTP".into() },
                0.5,
                Decision::DeadLetter {
                    reason: "cannot be delivered (no handler saw it): value of header \"x\" cannot be sent over HTTP"
                        .into(),
                    error: "value of header \"x\" cannot be sent over HTTP".into(),
                },
            ),
            // reject dead-letters at once, even on the first attempt
            (
                1,
                Outcome::Reject { reason: "HTTP 422: bad order".into() },
                0.5,
                Decision::DeadLetter {
                    reason: "rejected by handler: HTTP 422: bad order".into(),
                    error: "HTTP 422: bad order".into(),
                },
            ),
        ];
        for (attempt, outcome, draw, want) in table {
            let got = decide(&p, attempt, outcome.clone(), draw);
            assert_eq!(got, want, "attempt {attempt}, outcome {outcome:?}");
        }
    }

    #[test]
    fn caps_delay_at_max_delay() {
        let p = RetryPolicy { max_attempts: 50, ..policy() };
        assert_eq!(decide(&p, 10, fail(), 0.5), retry_after(1000, 11));
        // huge exponents stay finite
        assert_eq!(p.base_delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_spreads_within_bounds() {
        let p = RetryPolicy { jitter: 0.2, ..policy() };
        let low = decide(&p, 1, fail(), 0.0);
        let high = decide(&p, 1, fail(), 0.999_999);
        assert_eq!(low, retry_after(80, 2));
        match high {
            Decision::Retry { after, .. } => {
                assert!(after > Duration::from_millis(119) && after <= Duration::from_millis(120))
            }
            other => panic!("expected retry, got {other:?}"),
        }
    }

    #[test]
    fn caps_handler_named_delay() {
        let d =
            decide(&policy(), 1, Outcome::Retry { after: Some(Duration::from_secs(1 << 40)), error: "x".into() }, 0.5);
        assert_eq!(d, Decision::Retry { after: MAX_HANDLER_DELAY, next_attempt: 2, error: "x".into() });
    }

    #[test]
    fn max_attempts_one_never_retries() {
        let p = RetryPolicy { max_attempts: 1, ..policy() };
        assert!(matches!(decide(&p, 1, fail(), 0.5), Decision::DeadLetter { .. }));
    }
}
