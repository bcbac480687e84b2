//! A Kafka client for the PHP tests (php-tests/), which have none that speaks to the
//! test broker (Debian's kcat is built on librdkafka 2.0, which tansu refuses):
//!
//!   kafka-tool create TOPIC PARTITIONS
//!   kafka-tool publish TOPIC < lines      one JSON object a line:
//!                                         {"id": "...", "body": "...", "key": "...", "headers": {"k": "v"}}
//!   kafka-tool read TOPIC AT_LEAST SECS   the topic's records as JSON lines
//!
//! Brokers: KAFKA_BROKERS (default 127.0.0.1:9092). Exits 2 on bad use.

use std::io::BufRead;
use std::process::ExitCode;
use std::time::Duration;

use e2e::{Kafka, Outgoing};

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kafka = Kafka::connect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["create", topic, partitions] => {
            let Ok(n) = partitions.parse() else { return usage() };
            kafka.create_topic(topic, n).await;
        }
        ["publish", topic] => {
            let mut messages: Vec<Outgoing> = Vec::new();
            let mut keys: Vec<Option<String>> = Vec::new();
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { return usage() };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { return usage() };
                let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
                // Header names live as long as the tool: leak them for Outgoing's &'static str.
                let headers = v
                    .get("headers")
                    .and_then(|h| h.as_object())
                    .map(|h| {
                        h.iter()
                            .map(|(k, x)| {
                                (&*Box::leak(k.clone().into_boxed_str()), x.as_str().unwrap_or_default().to_string())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                messages.push((text("id").unwrap_or_default(), text("body").unwrap_or_default().into_bytes(), headers));
                keys.push(text("key"));
            }
            kafka.publish(topic, &messages, |i| keys.get(i).cloned().flatten()).await;
        }
        ["read", topic, at_least, secs] => {
            let (Ok(n), Ok(s)) = (at_least.parse(), secs.parse()) else { return usage() };
            for r in kafka.read(topic, n, Duration::from_secs(s)).await {
                let line = serde_json::json!({
                    "partition": r.partition,
                    "offset": r.offset,
                    "key": r.key.as_deref().map(String::from_utf8_lossy),
                    "body": String::from_utf8_lossy(&r.payload),
                    "headers": r.headers,
                });
                println!("{line}");
            }
        }
        _ => return usage(),
    }
    ExitCode::SUCCESS
}

fn usage() -> ExitCode {
    eprintln!("usage: kafka-tool create TOPIC PARTITIONS | publish TOPIC < json-lines | read TOPIC AT_LEAST SECS");
    ExitCode::from(2)
}
