//! Which librdkafka properties go to which client. The transport's `properties` serve
//! the router's consumers, its producer (retries, dead letters) and its admin client
//! (topic creation); a consumer-only property given to a producer makes librdkafka log
//! a warning at every start, so each client gets only what applies to it. The roles
//! are those of librdkafka 2.12's CONFIGURATION.md ("C/P" column).

/// Properties only consumers take.
const CONSUMER_ONLY: &[&str] = &[
    "auto.commit.enable",
    "auto.commit.interval.ms",
    "auto.offset.reset",
    "check.crcs",
    "consume.callback.max.messages",
    "consume_cb",
    "coordinator.query.interval.ms",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
    "fetch.error.backoff.ms",
    "fetch.max.bytes",
    "fetch.message.max.bytes",
    "fetch.min.bytes",
    "fetch.queue.backoff.ms",
    "fetch.wait.max.ms",
    "group.id",
    "group.instance.id",
    "group.protocol",
    "group.protocol.type",
    "group.remote.assignor",
    "heartbeat.interval.ms",
    "isolation.level",
    "max.partition.fetch.bytes",
    "max.poll.interval.ms",
    "offset.store.method",
    "offset.store.path",
    "offset.store.sync.interval.ms",
    "offset_commit_cb",
    "partition.assignment.strategy",
    "queued.max.messages.kbytes",
    "queued.min.messages",
    "rebalance_cb",
    "session.timeout.ms",
];

/// Properties only producers take.
const PRODUCER_ONLY: &[&str] = &[
    "acks",
    "batch.num.messages",
    "batch.size",
    "compression.codec",
    "compression.level",
    "compression.type",
    "delivery.report.only.error",
    "delivery.timeout.ms",
    "dr_cb",
    "dr_msg_cb",
    "enable.gapless.guarantee",
    "enable.idempotence",
    "linger.ms",
    "message.send.max.retries",
    "message.timeout.ms",
    "msg_order_cmp",
    "partitioner",
    "partitioner_cb",
    "produce.offset.report",
    "queue.buffering.backpressure.threshold",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.messages",
    "queue.buffering.max.ms",
    "queuing.strategy",
    "request.required.acks",
    "request.timeout.ms",
    "retries",
    "sticky.partitioning.linger.ms",
    "transaction.timeout.ms",
    "transactional.id",
];

/// What kind of client a property list is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Consumer,
    Producer,
    /// Admin clients and the probes of the stall watchdog: neither consumer nor producer.
    Other,
}

/// The properties of `all` that a client of `role` takes.
pub fn for_role(all: &[(String, String)], role: Role) -> Vec<(String, String)> {
    all.iter()
        .filter(|(k, _)| {
            let consumer = CONSUMER_ONLY.contains(&k.as_str());
            let producer = PRODUCER_ONLY.contains(&k.as_str());
            match role {
                Role::Consumer => !producer,
                Role::Producer => !consumer,
                Role::Other => !consumer && !producer,
            }
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_gets_what_applies_to_it() {
        let all: Vec<(String, String)> = [
            ("security.protocol", "SASL_SSL"),
            ("session.timeout.ms", "6000"),
            ("auto.offset.reset", "latest"),
            ("batch.num.messages", "1"),
            ("linger.ms", "5"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let names = |role| for_role(&all, role).into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(names(Role::Consumer), ["security.protocol", "session.timeout.ms", "auto.offset.reset"]);
        assert_eq!(names(Role::Producer), ["security.protocol", "batch.num.messages", "linger.ms"]);
        assert_eq!(names(Role::Other), ["security.protocol"]);
    }

    #[test]
    fn librdkafka_agrees_with_the_roles() {
        // A producer made with every consumer-free property, and a consumer with every
        // producer-free one, are accepted (names spelled as librdkafka knows them).
        let mut p = rdkafka::ClientConfig::new();
        let skip = |n: &str| n.ends_with("_cb") || n == "msg_order_cmp" || n == "transactional.id";
        for name in PRODUCER_ONLY.iter().filter(|n| !skip(n)) {
            let value = match *name {
                "acks" | "request.required.acks" => "all",
                "compression.codec" | "compression.type" => "none",
                "partitioner" => "consistent_random",
                "queuing.strategy" => "fifo",
                "transaction.timeout.ms" | "delivery.timeout.ms" | "message.timeout.ms" => "60000",
                n if n.starts_with("enable.") || n == "delivery.report.only.error" || n == "produce.offset.report" => {
                    "false"
                }
                _ => "1",
            };
            p.set(*name, value);
        }
        if let Err(e) = p.create::<rdkafka::producer::BaseProducer>() {
            panic!("librdkafka refuses a producer property: {e}");
        }
    }
}
