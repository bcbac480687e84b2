//! Redis-backed deduplication of handled messages (`dedup: { redis, ttl }`).
//!
//! After a handler succeeded, and before the message is acked, the router records
//! `message-router:dedup:<subscription>:<message id>` with the TTL. A delivery whose
//! id is recorded is acked without calling the handler.
//!
//! The window this covers: a copy that arrives after the first copy was handled
//! successfully and within `ttl` of that. That takes in broker redeliveries after a
//! crash between handling and ack, claims of a slow consumer's entries, and producers
//! re-publishing with the same id. It does not take in two copies in flight at the
//! same moment (both are checked before either is recorded), nor copies whose id the
//! broker generates per delivery (an AMQP message without `message_id`).
//!
//! Failing open: if the dedup Redis cannot be reached, the message is delivered (at
//! least once still holds) and the failure is logged and counted.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::DedupConfig;

pub struct Dedup {
    conn: Result<ConnectionManager, String>,
    ttl: Duration,
    prefix: String,
}

impl Dedup {
    pub fn new(subscription: &str, config: &DedupConfig) -> Self {
        let conn = redis::Client::open(config.redis.as_str())
            .and_then(|c| {
                let cfg = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(Duration::from_secs(2)))
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_number_of_retries(2);
                c.get_connection_manager_lazy(cfg)
            })
            .map_err(|e| format!("dedup redis {:?}: {e}", crate::transport::display_url(&config.redis, "url")));
        Dedup { conn, ttl: config.ttl, prefix: format!("message-router:dedup:{subscription}:") }
    }

    /// Whether `id` was handled successfully within the TTL. Errors count as "no".
    pub async fn seen(&self, id: &str) -> Result<bool, String> {
        let mut conn = self.conn.clone()?;
        redis::cmd("EXISTS")
            .arg(format!("{}{id}", self.prefix))
            .query_async::<bool>(&mut conn)
            .await
            .map_err(|e| format!("dedup check: {e}"))
    }

    /// Remember that `id` was handled successfully.
    pub async fn record(&self, id: &str) -> Result<(), String> {
        let mut conn = self.conn.clone()?;
        let ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        redis::cmd("SET")
            .arg(format!("{}{id}", self.prefix))
            .arg(1)
            .arg("PX")
            .arg(ms)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| format!("dedup record: {e}"))
    }
}
