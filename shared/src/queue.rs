//! The queues between ingest and worker, and the only place (with `worker::consume` and
//! `worker::email`) that touches apalis. Postgres is the record of every event and email;
//! Redis is only the transport, so a job carries nothing but a row id (`ApplyEventV1`: the
//! event id; `SendEmailV1`: the outbox id), and losing a job loses nothing (a sweeper
//! re-enqueues pending inbox and outbox rows).
//!
//! Jobs are JSON and versioned in their type name and queue name: a job that fails to decode is
//! fatal to an apalis worker, so a job type only ever gains `#[serde(default)]` fields; a
//! breaking change is a new type on a new queue.

use std::time::Duration;

use apalis::prelude::TaskSink;
use apalis_redis::{ConnectionManager, RedisStorage};
use redis::aio::ConnectionManagerConfig;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::QueueConfig;

/// Apply one stored Stripe event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyEventV1 {
    /// The Stripe event id, the key of the `webhook_events` row.
    pub event_id: String,
}

/// Send one email of the outbox (`email_outbox` row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendEmailV1 {
    /// The outbox row; its status says whether the email still needs sending.
    pub outbox_id: Uuid,
}

/// How long a Redis command may take before it counts as failed.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);

/// Heartbeat of a consuming worker. A worker that misses [`MISSED_HEARTBEATS`] in a row is
/// presumed dead and its in-flight jobs are handed to another: after 5 s × 6 = 30 s.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// See [`HEARTBEAT_INTERVAL`].
pub const MISSED_HEARTBEATS: usize = 6;

/// A queue failure.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis refused or failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// apalis failed to push.
    #[error("pushing the job failed: {0}")]
    Push(String),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// Connects to Redis with explicit timeouts (apalis' default response timeout is 500 ms and any
/// error stops a worker) and checks it answers.
pub async fn connect(config: &QueueConfig) -> Result<ConnectionManager, QueueError> {
    let client = redis::Client::open(config.redis_url.as_str())?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_number_of_retries(2);
    let mut conn = client
        .get_connection_manager_with_config(manager_config)
        .await?;
    ping(&mut conn).await?;
    Ok(conn)
}

/// `PING`, for readiness checks.
pub async fn ping(conn: &mut ConnectionManager) -> Result<(), QueueError> {
    redis::cmd("PING").query_async::<String>(conn).await?;
    Ok(())
}

/// The name of the event queue under a prefix.
pub fn events_queue_name(prefix: &str) -> String {
    format!("{prefix}:apply-event-v1")
}

/// The apalis storage configuration of a queue, the same on both sides.
fn storage_config(queue_name: String) -> apalis_redis::Config {
    apalis_redis::Config::default()
        .queue(queue_name)
        .heartbeat_interval(HEARTBEAT_INTERVAL)
        .missed_heartbeats(MISSED_HEARTBEATS)
}

/// Awaits a push within [`REDIS_TIMEOUT`].
async fn within_timeout<E: std::fmt::Display>(
    push: impl Future<Output = Result<(), E>>,
) -> Result<(), QueueError> {
    tokio::time::timeout(REDIS_TIMEOUT, push)
        .await
        .map_err(|_| QueueError::Timeout(REDIS_TIMEOUT))?
        .map_err(|e| QueueError::Push(e.to_string()))
}

/// The apalis storage configuration of the event queue, the same on both sides.
pub fn events_storage_config(prefix: &str) -> apalis_redis::Config {
    storage_config(events_queue_name(prefix))
}

/// The producing side of the event queue.
#[derive(Debug, Clone)]
pub struct EventQueue {
    storage: RedisStorage<ApplyEventV1>,
    config: apalis_redis::Config,
    name: String,
    conn: ConnectionManager,
}

impl EventQueue {
    /// The event queue of `prefix` on `conn`.
    pub fn new(conn: ConnectionManager, prefix: &str) -> EventQueue {
        let config = events_storage_config(prefix);
        EventQueue {
            storage: RedisStorage::new(conn.clone()).with_config(config.clone()),
            config,
            name: events_queue_name(prefix),
            conn,
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Jobs waiting to run: the `active` list plus the `scheduled` set, where apalis-redis
    /// puts new and retried jobs.
    pub async fn depth(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        let (active, scheduled): (u64, u64) = redis::pipe()
            .cmd("LLEN")
            .arg(self.config.active_jobs_list())
            .cmd("ZCARD")
            .arg(self.config.scheduled_jobs_set())
            .query_async(&mut conn)
            .await?;
        Ok(active + scheduled)
    }

    /// Deletes the data of jobs that finished more than `age` ago (apalis keeps them
    /// forever). apalis-redis 1.0 also deletes jobs waiting for a retry when asked for a
    /// shorter age, so `age` is at least a day.
    pub async fn vacuum_finished(&self, age: Duration) -> Result<usize, QueueError> {
        let mut storage = self.storage.clone();
        apalis_core::backend::Vacuum::vacuum_before(
            &mut storage,
            age.max(Duration::from_secs(86_400)),
        )
        .await
        .map_err(|e| QueueError::Push(e.to_string()))
    }

    /// The apalis storage, for the consuming worker.
    pub fn storage(&self) -> RedisStorage<ApplyEventV1> {
        self.storage.clone()
    }

    /// Pushes jobs for these events, in one Redis round trip.
    pub async fn push(&self, event_ids: &[&str]) -> Result<(), QueueError> {
        if event_ids.is_empty() {
            return Ok(());
        }
        let jobs = event_ids
            .iter()
            .map(|id| ApplyEventV1 {
                event_id: (*id).to_owned(),
            })
            .collect();
        within_timeout(self.storage.clone().push_bulk(jobs)).await
    }
}

/// The name of the email queue under a prefix.
pub fn emails_queue_name(prefix: &str) -> String {
    format!("{prefix}:send-email-v1")
}

/// The apalis storage configuration of the email queue, the same on both sides.
pub fn emails_storage_config(prefix: &str) -> apalis_redis::Config {
    storage_config(emails_queue_name(prefix))
}

/// The producing side of the email queue: ingest after committing an outbox row, the
/// sweeper and operators' replays.
#[derive(Debug, Clone)]
pub struct EmailQueue {
    storage: RedisStorage<SendEmailV1>,
}

impl EmailQueue {
    /// The email queue of `prefix` on `conn`.
    pub fn new(conn: ConnectionManager, prefix: &str) -> EmailQueue {
        EmailQueue {
            storage: RedisStorage::new(conn).with_config(emails_storage_config(prefix)),
        }
    }

    /// The apalis storage, for the consuming worker.
    pub fn storage(&self) -> RedisStorage<SendEmailV1> {
        self.storage.clone()
    }

    /// Pushes jobs for these outbox rows, in one Redis round trip.
    pub async fn push(&self, outbox_ids: &[Uuid]) -> Result<(), QueueError> {
        if outbox_ids.is_empty() {
            return Ok(());
        }
        let jobs = outbox_ids
            .iter()
            .map(|&outbox_id| SendEmailV1 { outbox_id })
            .collect();
        within_timeout(self.storage.clone().push_bulk(jobs)).await
    }
}
