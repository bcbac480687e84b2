//! The admin API as tests call it, and a router with one subscription on each broker
//! (RabbitMQ `orders`, Redis `events`, Kafka `clicks`) for the admin API and status
//! page tests.

use std::time::Duration;

use serde_json::Value;

use crate::{unique, wait_for, Kafka, PhpHandler, Rabbit, Redis, Router, Scratch};

/// `method path` on the router's admin listener with an optional bearer token, extra
/// headers and a JSON body: the status and the JSON answer (`Null` when not JSON).
pub async fn call(
    router: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}{path}", router.admin);
    let mut req = client.request(method.parse().expect("method"), url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_string());
    }
    let res = req.send().await.expect("admin listener answers");
    let status = res.status().as_u16();
    let text = res.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub async fn get(router: &Router, path: &str) -> Value {
    let (status, v) = call(router, "GET", path, None, &[], None).await;
    assert_eq!(status, 200, "GET {path}: {v}");
    v
}

pub async fn post(router: &Router, path: &str, body: Option<Value>) -> (u16, Value) {
    call(router, "POST", path, None, &[], body).await
}

/// One subscription as `GET /api/subscriptions/{name}` shows it.
pub async fn subscription(router: &Router, name: &str) -> Value {
    get(router, &format!("/api/subscriptions/{name}")).await
}

/// Wait until `field` of subscription `name`'s depths is `want`.
pub async fn wait_depth(router: &Router, name: &str, field: &str, want: u64) {
    wait_for(&format!("{name}: {field} = {want}"), Duration::from_secs(60), || async {
        subscription(router, name).await["depths"][field].as_u64() == Some(want)
    })
    .await;
}

/// A router with one subscription per broker, all delivering to one PHP handler.
pub struct ThreeBrokers {
    pub rabbit: Rabbit,
    pub redis: Redis,
    pub kafka: Kafka,
    pub php: PhpHandler,
    pub router: Router,
    pub queue: String,
    pub stream: String,
    pub topic: String,
}

impl ThreeBrokers {
    /// `admin` is the admin section's inner keys (`listen` is set here).
    pub async fn start(dir: &Scratch, admin: &str) -> Self {
        let mut rabbit = Rabbit::connect().await;
        let queue = unique("admin-q");
        rabbit.queue(&queue).await;
        let redis = Redis::connect().await;
        let stream = unique("admin-s");
        let kafka = Kafka::connect();
        let topic = unique("admin-t");
        kafka.create_topic(&topic, 2).await;
        let php = PhpHandler::start(&dir.path("handler.log"), 4).await;
        let yaml = format!(
            r#"
admin: {{ listen: "127.0.0.1:{{admin}}" {admin} }}
shutdown: {{ grace_period: 10s }}
transports:
  rabbit: {{ type: amqp, url: "{amqp}", reconnect_max_delay: 1s }}
  redis: {{ type: redis, url: "{redis}", consumer: c1, reconnect_max_delay: 1s }}
  kafka:
    type: kafka
    brokers: ["{kafka}"]
    properties: {{ session.timeout.ms: "6000", max.poll.interval.ms: "10000", heartbeat.interval.ms: "500", batch.num.messages: "1" }}
handlers:
  php: {{ endpoints: ["{php}"], timeout: 5s }}
subscriptions:
  orders: {{ transport: rabbit, queue: {queue}, prefetch: 8, retry: {{ max_attempts: 2, initial_delay: 100ms, jitter: 0 }} }}
  events: {{ transport: redis, streams: ["{stream}"], group: {group}, prefetch: 8, retry: {{ max_attempts: 2, initial_delay: 100ms, jitter: 0 }} }}
  clicks: {{ transport: kafka, topics: ["{topic}"], group: {kgroup}, prefetch: 8, retry: {{ max_attempts: 2, initial_delay: 100ms, jitter: 0 }} }}
routes:
  - {{ name: work, handler: php }}
"#,
            amqp = crate::amqp_url(),
            redis = crate::redis_url(),
            kafka = crate::kafka_brokers(),
            php = php.url(),
            group = unique("g"),
            kgroup = unique("kg"),
        );
        let router = Router::start(dir, &yaml).await;
        ThreeBrokers { rabbit, redis, kafka, php, router, queue, stream, topic }
    }

    /// Publish `messages` to the source of `subscription`.
    pub async fn publish(&mut self, subscription: &str, messages: &[crate::Outgoing]) {
        match subscription {
            "orders" => self.rabbit.publish(&self.queue, messages).await,
            "events" => self.redis.publish(&self.stream, messages).await,
            "clicks" => self.kafka.publish(&self.topic, messages, |i| Some(format!("k{i}"))).await,
            other => panic!("no subscription {other}"),
        }
    }

    /// How many requests the handler saw for message `id`.
    pub fn handled(&self, id: &str) -> usize {
        crate::seen(&self.php.log).iter().filter(|s| s.id == id).count()
    }

    pub async fn cleanup(self) {
        let dead = format!("{}.dlq", self.topic);
        self.kafka.delete_topics(&[&self.topic, &dead]).await;
        self.rabbit.cleanup().await;
    }
}
