//! What a broker gives the phases: names for the report, its backlog, the router's
//! config, and its reference consumers.

use anyhow::Result;

use crate::drain::{DrainMeter, RefConsumer, RefDrain};
use crate::latency::Paced;
use crate::router::Target;

/// One broker's side of the bench. Every message it writes has the body
/// [`crate::wrk::body`]`(i)` and the id `m-i` (`lat-i` in latency runs, with the
/// message header [`crate::latency::SENT_NS`]).
// Used generically on one current-thread runtime: no Send bounds are wanted.
#[allow(async_fn_in_trait)]
pub trait Broker {
    /// "RabbitMQ", "Redis".
    const NAME: &'static str;
    /// The report is `bench/results/<SLUG>.md`; logs and stamps `bench/results/<SLUG>-…`;
    /// `bench/run <first word of SLUG>` runs it.
    const SLUG: &'static str;
    /// The broker's label in CPU tables, and its process name (`/proc/PID/comm`).
    const PROCESS: (&'static str, &'static str);
    /// How the backlog is written, for the report.
    const FILL: &'static str;
    /// The reference drains of phase R, as the report names them: first the consumer
    /// that POSTs each message (the minimal reference), then the one without HTTP
    /// (the broker's own limit).
    const REFERENCES: [&'static str; 2];

    /// Where messages wait: a queue, a stream and its consumer group.
    type Source;

    /// The headers the router sends for a message of the throughput backlog (HTTP
    /// contract), with a stand-in `ce-id`; wrk and the bench's clients send these.
    fn headers(&self) -> Vec<(&'static str, String)>;

    /// A fresh source holding `n` messages; and the rate they were written at.
    async fn fill(&self, prefix: &str, n: u64) -> Result<(Self::Source, f64)>;

    /// A fresh empty source.
    async fn create(&self, prefix: &str) -> Result<Self::Source>;

    /// Messages of `source` nobody has acked yet (after the router stopped): ready
    /// ones of a queue; pending and unread ones of a stream's group.
    async fn left(&self, source: &Self::Source) -> Result<u64>;

    /// Messages of `source` not yet handed to a consumer (ready; a group's lag).
    async fn backlog(&self, source: &Self::Source) -> Result<u64>;

    /// The router's config: admin server on `admin`, `source` delivered to `target`.
    fn router_yaml(&self, admin: u16, source: &Self::Source, target: &Target) -> String;

    /// Drain the full `source` with reference `which` (an index of `REFERENCES`),
    /// POSTing to `url` when it is the one that does; `meter` times it.
    async fn drain(&self, which: usize, source: &Self::Source, url: &str, meter: DrainMeter<'_>) -> Result<RefDrain>;

    /// Publish to `source` at `rate` for `secs`, each message stamped with `sent-ns`.
    async fn publish_paced(&self, source: &Self::Source, rate: f64, secs: u64) -> Result<Paced>;

    /// The minimal reference consumer of `source`, POSTing to `url` and forwarding
    /// `sent-ns` as the router does.
    fn reference(&self, source: &Self::Source, url: &str) -> RefConsumer;

    /// Delete everything this run created in the broker (also after errors and Ctrl-C).
    async fn cleanup(&self);
}
