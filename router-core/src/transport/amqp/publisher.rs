//! Confirmed publishing on a channel of its own, which reopens itself.
//!
//! RabbitMQ closes a channel on some publish errors (an exchange that does not exist
//! answers 404 and closes the channel). The consume channel must never share that
//! fate, or every message in flight would be redelivered into the handler again: so
//! retries, dead letters and moved retries go through a [`Publisher`], which opens a
//! fresh confirm-mode channel on the same connection when its last one closed.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ErrorKind};
use tokio::sync::Mutex;

/// Why a publish was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker refused it (returned as unroutable, nacked, a missing exchange):
    /// trying again may work once the operator fixed the destination.
    #[error("{0}")]
    Refused(String),
    /// The connection is gone; a new session will have a new publisher.
    #[error("connection lost: {0}")]
    Disconnected(String),
}

pub struct Publisher {
    connection: std::sync::Arc<Connection>,
    channel: Mutex<Option<Channel>>,
}

impl Publisher {
    pub fn new(connection: std::sync::Arc<Connection>) -> Self {
        Publisher { connection, channel: Mutex::new(None) }
    }

    /// Whether this publisher publishes on `connection`.
    pub fn is_on(&self, connection: &std::sync::Arc<Connection>) -> bool {
        std::sync::Arc::ptr_eq(&self.connection, connection)
    }

    /// The open confirm channel, or a new one.
    async fn channel(&self) -> Result<Channel, PublishError> {
        let mut slot = self.channel.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(c.clone());
        }
        if !self.connection.status().connected() {
            return Err(PublishError::Disconnected("the connection to the broker is closed".into()));
        }
        let channel = confirm_channel(&self.connection).await.map_err(|e| PublishError::Disconnected(e.to_string()))?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Publish with `mandatory` and wait for the broker's confirm. An unroutable
    /// message (returned) or a nack is an error: "confirmed" must mean "stored in a
    /// queue".
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        let channel = self.channel().await?;
        let confirm = channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions { mandatory: true, immediate: false },
                body,
                props,
            )
            .await
            .map_err(|e| self.explain(e, exchange))?
            .await
            .map_err(|e| self.explain(e, exchange))?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(PublishError::Refused(format!(
                "unroutable (returned {} {}): does the destination queue exist?",
                returned.reply_code, returned.reply_text
            ))),
            Confirmation::Nack(_) => Err(PublishError::Refused("broker nacked the publish".into())),
            Confirmation::NotRequested => Err(PublishError::Refused("channel is not in confirm mode".into())),
        }
    }

    fn explain(&self, e: lapin::Error, exchange: &str) -> PublishError {
        if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) {
            return PublishError::Refused(format!("exchange {exchange:?} does not exist ({e})"));
        }
        if self.connection.status().connected() {
            PublishError::Refused(e.to_string())
        } else {
            PublishError::Disconnected(e.to_string())
        }
    }

    /// Close the channel (at the end of a session).
    pub async fn close(&self) {
        if let Some(c) = self.channel.lock().await.take() {
            if c.status().connected() {
                let _ = c.close(200, ShortString::from("publisher closed")).await;
            }
        }
    }
}

/// A channel in confirm mode: every publish on it is acknowledged by the broker.
pub async fn confirm_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}

/// The channel-level (soft) AMQP error behind `e`, if that is what it is.
pub fn soft_error(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        ErrorKind::ProtocolError(p) => match p.kind() {
            AMQPErrorKind::Soft(s) => Some(s.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}
