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

use apalis::prelude::{TaskBuilder, TaskSink};
use apalis_redis::{ConnectionManager, RedisStorage};
use redis::aio::ConnectionManagerConfig;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::QueueConfig;

mod housekeeping;
#[cfg(test)]
mod tests;

use self::housekeeping::{Housekeeping, PARKED_AT};

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

/// A job type and the queue it travels on; the name carries the version, like the type.
pub trait Job: Clone {
    /// The queue's name under a prefix.
    fn queue_name(prefix: &str) -> String;
}

impl Job for ApplyEventV1 {
    fn queue_name(prefix: &str) -> String {
        format!("{prefix}:apply-event-v1")
    }
}

impl Job for SendEmailV1 {
    fn queue_name(prefix: &str) -> String {
        format!("{prefix}:send-email-v1")
    }
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

/// Redis' `maxmemory-policy`, as it matters to the queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvictionPolicy {
    /// A policy that never deletes keys (`noeviction`): a full Redis refuses writes instead.
    Keeps(String),
    /// `allkeys-*` or `volatile-*`: when Redis is full it deletes keys, and a job's data can
    /// vanish while its id stays queued (see [`PROMOTE_DUE`](housekeeping::PROMOTE_DUE)). `volatile-*` deletes only keys
    /// with a TTL, which apalis' job keys lack today; it is refused too, since nothing here
    /// decides which keys get one.
    Evicts(String),
    /// Not known: `CONFIG GET` was refused (managed Redis providers often disable `CONFIG`)
    /// or answered nothing; the reason.
    Unknown(String),
}

/// How to fix an evicting policy, for the messages that name one.
pub const EVICTION_FIX: &str = "set maxmemory-policy to noeviction (redis.conf, \
    `CONFIG SET maxmemory-policy noeviction`, or the provider's parameter group); \
    REDIS_ALLOW_EVICTION=true starts the worker anyway";

/// Reads `maxmemory-policy` (`CONFIG GET`).
pub async fn eviction_policy(conn: &mut ConnectionManager) -> EvictionPolicy {
    let answer = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async::<Vec<String>>(conn)
        .await;
    match answer {
        Err(e) => EvictionPolicy::Unknown(e.to_string()),
        Ok(pair) => match pair.get(1) {
            None => EvictionPolicy::Unknown("CONFIG GET maxmemory-policy answered nothing".into()),
            Some(policy) if policy.starts_with("allkeys-") || policy.starts_with("volatile-") => {
                EvictionPolicy::Evicts(policy.clone())
            }
            Some(policy) => EvictionPolicy::Keeps(policy.clone()),
        },
    }
}

/// The apalis storage configuration of a queue, the same on both sides.
/// No pub/sub events: workers poll (`poll_with_interval`), and nobody listens. A fetch takes
/// at least 32 jobs (10, apalis' default, drained a backlog ~20 % slower), and more for a
/// consumer with more jobs in flight ([`JobQueue::consumer_storage`]).
fn storage_config(queue_name: String) -> apalis_redis::Config {
    apalis_redis::Config::default()
        .queue(queue_name)
        .emit_events(false)
        .batch_size(32)
        .lock_tasks(false)
        .heartbeat_interval(HEARTBEAT_INTERVAL)
        .missed_heartbeats(MISSED_HEARTBEATS)
}

/// The fetch batch of a consumer running `concurrency` jobs at once: see
/// [`JobQueue::consumer_storage`].
fn consumer_fetch_batch(concurrency: usize) -> usize {
    concurrency.div_ceil(2).max(32)
}

/// A job to push parked (see [`PARKED_AT`]).
fn parked<T>(job: T) -> apalis_core::task::Task<T> {
    TaskBuilder::new(job).run_at_timestamp(PARKED_AT).build()
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

/// The producing side of one queue (and its housekeeping, which the worker runs): ingest,
/// the sweeper and operators' replays push through it; the consuming worker takes its
/// storage.
#[derive(Debug, Clone)]
pub struct JobQueue<J> {
    storage: RedisStorage<J>,
    housekeeping: Housekeeping,
}

/// The queue of [`ApplyEventV1`].
pub type EventQueue = JobQueue<ApplyEventV1>;
/// The queue of [`SendEmailV1`].
pub type EmailQueue = JobQueue<SendEmailV1>;

impl<J: Job> JobQueue<J> {
    /// The queue of `J` under `prefix`, on `conn`.
    pub fn new(conn: ConnectionManager, prefix: &str) -> JobQueue<J> {
        let name = J::queue_name(prefix);
        JobQueue {
            storage: RedisStorage::new(conn.clone()).with_config(storage_config(name.clone())),
            housekeeping: Housekeeping::new(conn, name),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.housekeeping.name
    }

    /// Jobs waiting to run: the `active` list plus the `scheduled` set, where apalis-redis
    /// puts new and retried jobs.
    pub async fn depth(&self) -> Result<u64, QueueError> {
        self.housekeeping.depth().await
    }

    /// When the oldest job still waiting in the queue was pushed (`None`: nothing waits). A
    /// row enqueued before that has no job waiting: it is done, in flight, or lost.
    pub async fn oldest_waiting(
        &self,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, QueueError> {
        self.housekeeping.oldest_waiting().await
    }

    /// Moves jobs to the active list in chunks, keeping it short (see [`PARKED_AT`]); returns
    /// how many moved. The worker calls it before it starts consuming and then continually.
    pub async fn promote_due(&self) -> Result<u64, QueueError> {
        self.housekeeping.promote_due().await
    }

    /// The apalis storage for a worker that runs up to `concurrency` jobs at once.
    ///
    /// apalis-core 1.0 acknowledges each finished job through a channel of 4 × the fetch
    /// batch, which its worker stops draining once told to stop, until every job in flight
    /// has finished: a job that finished after the channel filled waited forever, and so did
    /// the worker's shutdown (1,024 jobs in flight against a channel of 128 under a backlog).
    /// The fetch batch is therefore sized so that the channel holds twice the jobs in flight.
    pub fn consumer_storage(&self, concurrency: usize) -> RedisStorage<J> {
        let config = storage_config(self.housekeeping.name.clone())
            .batch_size(consumer_fetch_batch(concurrency));
        RedisStorage::new(self.housekeeping.conn.clone()).with_config(config)
    }
}

impl<J: Job> JobQueue<J>
where
    RedisStorage<J>: apalis_core::backend::Vacuum,
    <RedisStorage<J> as apalis_core::backend::Backend>::Error: std::fmt::Display,
{
    /// Deletes what Redis keeps of jobs that finished more than a day ago (apalis keeps it
    /// forever); returns how many.
    pub async fn vacuum_finished(&self) -> Result<usize, QueueError> {
        self.housekeeping.vacuum(&self.storage).await
    }
}

impl EventQueue {
    /// Pushes jobs for these events, parked, in one Redis round trip.
    pub async fn push(&self, event_ids: &[&str]) -> Result<(), QueueError> {
        if event_ids.is_empty() {
            return Ok(());
        }
        let tasks: Vec<_> = event_ids
            .iter()
            .map(|id| {
                parked(ApplyEventV1 {
                    event_id: (*id).to_owned(),
                })
            })
            .collect();
        within_timeout(self.storage.clone().push_all(futures::stream::iter(tasks))).await
    }

    /// Pushes jobs for deferred events a new link released (after the commit that released
    /// them); a failed push is only logged, since the sweeper enqueues those rows later.
    pub async fn push_released(&self, released: &[String]) {
        if released.is_empty() {
            return;
        }
        let ids: Vec<&str> = released.iter().map(String::as_str).collect();
        tracing::info!(
            count = ids.len(),
            "released deferred events of a newly linked customer"
        );
        if let Err(e) = self.push(&ids).await {
            tracing::warn!(error = %e, "released events not enqueued; the sweeper will enqueue them");
        }
    }
}

impl EmailQueue {
    /// Pushes jobs for these outbox rows, parked, in one Redis round trip.
    pub async fn push(&self, outbox_ids: &[Uuid]) -> Result<(), QueueError> {
        if outbox_ids.is_empty() {
            return Ok(());
        }
        let tasks: Vec<_> = outbox_ids
            .iter()
            .map(|&outbox_id| parked(SendEmailV1 { outbox_id }))
            .collect();
        within_timeout(self.storage.clone().push_all(futures::stream::iter(tasks))).await
    }
}
