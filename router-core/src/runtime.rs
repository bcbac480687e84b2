//! How many runtime worker threads the router runs on (the daemon and the extension).

/// The environment variable that sets it (the daemon's `run --threads` reads it too).
pub const THREADS_ENV: &str = "MESSAGE_ROUTER_THREADS";

/// Worker threads when nothing says otherwise: half the cores, at least one. The router
/// shares its machine with the PHP handlers and often the broker, and its work per
/// message is short and I/O-bound, so a second worker mostly costs cross-thread
/// wake-ups: on 2 cores, one worker instead of two took the daemon's context switches
/// per message from 2.5–3.2 to 0.1–1.4 and its CPU per message down by 4–30 %
/// (README "Performance", `bench/run amqp|redis --router-env MESSAGE_ROUTER_THREADS=2`).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// The worker threads asked for by [`THREADS_ENV`], else [`default_threads`]. A value
/// that is not a positive number is an error naming the variable.
pub fn threads_from_env() -> Result<usize, String> {
    match std::env::var(THREADS_ENV) {
        Err(_) => Ok(default_threads()),
        Ok(v) => parse_threads(&v).map_err(|e| format!("{THREADS_ENV}={v:?}: {e}")),
    }
}

/// A thread count as written by an operator: a positive whole number.
pub fn parse_threads(v: &str) -> Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("expected a whole number of threads, 1 or more".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_parse_or_explain() {
        assert_eq!(parse_threads("1"), Ok(1));
        assert_eq!(parse_threads(" 4 "), Ok(4));
        for bad in ["0", "-1", "two", "", "1.5"] {
            assert!(parse_threads(bad).is_err(), "{bad:?} accepted");
        }
        assert!(default_threads() >= 1);
    }
}
