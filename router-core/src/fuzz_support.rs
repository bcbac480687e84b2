//! What the property tests (`fuzz_*`, in `fuzz` submodules next to the code they
//! test) share: the case count (`PROPTEST_CASES` wins over each target's default, so
//! `scripts/fuzz` runs a million), no failure-persistence files in the repository, and
//! one `fuzz-stat` line per target with the cases run and the time taken.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseResult, TestError, TestRunner};

/// Cases for one target: `PROPTEST_CASES` when set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// Run `test` on `cases(default_cases)` inputs drawn from `strategy`. A failing case
/// (an `Err` or a panic) is shrunk and reported with the smallest input found.
#[allow(
    clippy::panic,
    reason = "test support (built with the `fuzz` feature for other crates' tests): a failing property fails its test"
)]
pub fn run<S>(name: &str, default_cases: u32, strategy: S, test: impl Fn(S::Value) -> TestCaseResult)
where
    S: Strategy,
    S::Value: Debug,
{
    let config = Config { cases: cases(default_cases), failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config.clone());
    let ran = AtomicU64::new(0);
    let started = Instant::now();
    let result = runner.run(&strategy, |v| {
        ran.fetch_add(1, Ordering::Relaxed);
        test(v)
    });
    let secs = started.elapsed().as_secs_f64();
    let ran = ran.into_inner();
    let verdict = if result.is_ok() { "ok" } else { "FAILED" };
    println!("fuzz-stat {name} cases={ran} secs={secs:.2} rate={:.0}/s result={verdict}", ran as f64 / secs.max(1e-9));
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, input)) => panic!("{name}: {reason}\nminimal failing input: {input:#?}"),
        Err(TestError::Abort(reason)) => panic!("{name}: aborted: {reason}"),
    }
}
