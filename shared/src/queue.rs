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
    /// vanish while its id stays queued (see [`PROMOTE_DUE`]). `volatile-*` deletes only keys
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

/// What the producing sides share besides the storage: the queue's keys and a connection,
/// for the gauges and the clean-up apalis-redis does not do.
#[derive(Debug, Clone)]
struct Housekeeping {
    name: String,
    config: apalis_redis::Config,
    conn: ConnectionManager,
}

/// Finished jobs are kept this long in Redis. apalis-redis 1.0 also deletes jobs waiting for
/// a retry when asked for a shorter age, so it is at least a day.
const KEEP_FINISHED: Duration = Duration::from_secs(86_400);

/// The `scheduled` score our jobs are pushed with: 2100-01-01, never due for apalis.
///
/// apalis-redis 1.0 keeps every pushed job in its `scheduled` set and, on every fetch, moves
/// all due ones to the `active` list with one Lua `unpack`. Two things break on a backlog:
/// past about 8,000 due jobs the fetch fails ("too many results to unpack") and the worker
/// stops; and each job it then leases costs an `LREM` over the whole `active` list, so a
/// long list makes every job slower. Parked jobs are invisible to that fetch; the worker's
/// promoter ([`EventQueue::promote_due`]) moves them to `active` in chunks, keeping that list
/// near [`ACTIVE_TARGET`].
const PARKED_AT: u64 = 4_102_444_800;

/// How long the `active` list is kept: enough for a few hundred milliseconds of work.
const ACTIVE_TARGET: u64 = 1000;

/// Jobs moved per call of [`PROMOTE_DUE`], far below Lua's `unpack` limit.
const PROMOTE_CHUNK: u64 = 1000;

/// Ids at the head of the `active` list [`PROMOTE_DUE`] checks on every call.
const HEAD_CHECKED: u64 = 128;

/// KEYS: the scheduled set, the active list, the signal list, the job data hash, the job
/// metadata prefix. ARGV: chunk, active target, parked score, head to check. Moves up to a
/// chunk of due jobs (apalis' own retries, or jobs pushed by an older version) whatever the
/// list's length, then parked jobs while the list is shorter than the target, and raises the
/// signal as apalis' fetch does. Returns {due taken, parked taken, ids dropped}.
///
/// Ids whose data or metadata is gone are dropped instead of moved, and so are such ids at the
/// head of the `active` list (the next ones a consumer fetches; orphan recovery puts ids back
/// there too). Redis loses a job's data under its id when an evicting `maxmemory-policy`
/// deletes the data hash or a metadata key (the binaries check the policy at start, but a
/// provider can change it), or when someone deletes keys by hand. apalis-redis 1.0 fetches a
/// batch of ids with `HMGET` and fails the whole fetch on a nil: the worker stops, its ids go
/// back to `active` through orphan recovery and stop the next worker, in a loop. A dropped id
/// loses nothing: its row is still pending in Postgres, and the sweeper enqueues it again once
/// `SWEEP_GRACE_MS` has passed. What this cannot cover: data lost between this check and a
/// fetch (then the worker exits non-zero, and after its restart this check meets the id again).
const PROMOTE_DUE: &str = r#"
local dropped = {}
local function intact(id)
    return redis.call('HEXISTS', KEYS[4], id) == 1
        and redis.call('EXISTS', KEYS[5] .. ':' .. id) == 1
end
local function forget(id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('DEL', KEYS[5] .. ':' .. id)
    table.insert(dropped, id)
end
local function move(ids)
    local kept = {}
    for _, id in ipairs(ids) do
        if intact(id) then table.insert(kept, id) else forget(id) end
    end
    if #ids > 0 then
        redis.call('ZREM', KEYS[1], unpack(ids))
    end
    if #kept > 0 then
        redis.call('RPUSH', KEYS[2], unpack(kept))
    end
    return #ids, #kept
end
for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, tonumber(ARGV[4]) - 1)) do
    if not intact(id) then
        redis.call('LREM', KEYS[2], 0, id)
        forget(id)
    end
end
local chunk = tonumber(ARGV[1])
local now = redis.call('TIME')[1]
local due, due_kept = move(redis.call('ZRANGEBYSCORE', KEYS[1], 0, now, 'LIMIT', 0, chunk))
local room = tonumber(ARGV[2]) - redis.call('LLEN', KEYS[2])
local parked, parked_kept = 0, 0
if room > 0 then
    parked, parked_kept = move(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], ARGV[3], 'LIMIT',
                                          0, math.min(room, chunk)))
end
if due_kept + parked_kept > 0 then
    redis.call('DEL', KEYS[3])
    redis.call('LPUSH', KEYS[3], 1)
end
return {due, parked, dropped}
"#;

impl Housekeeping {
    fn new(conn: ConnectionManager, name: String) -> Housekeeping {
        Housekeeping {
            config: storage_config(name.clone()),
            name,
            conn,
        }
    }

    /// Moves jobs from the `scheduled` set to the `active` list (see [`PARKED_AT`]): every due
    /// job, a chunk at a time, then parked ones up to [`ACTIVE_TARGET`]; drops the ids whose
    /// data Redis lost (see [`PROMOTE_DUE`]), logging and counting them. Returns how many were
    /// taken from the `scheduled` set.
    async fn promote_due(&self) -> Result<u64, QueueError> {
        let script = redis::Script::new(PROMOTE_DUE);
        let mut conn = self.conn.clone();
        let mut moved = 0;
        loop {
            let (due, parked, dropped): (u64, u64, Vec<String>) = script
                .key(self.config.scheduled_jobs_set())
                .key(self.config.active_jobs_list())
                .key(self.config.signal_list())
                .key(self.config.job_data_hash())
                .key(self.config.job_meta_hash())
                .arg(PROMOTE_CHUNK)
                .arg(ACTIVE_TARGET)
                .arg(PARKED_AT)
                .arg(HEAD_CHECKED)
                .invoke_async(&mut conn)
                .await?;
            if !dropped.is_empty() {
                metrics::counter!(crate::metrics::JOBS_DROPPED, "queue" => self.name.clone())
                    .increment(dropped.len() as u64);
                tracing::warn!(
                    queue = %self.name,
                    count = dropped.len(),
                    task_ids = %dropped.join(","),
                    "dropped queued job ids whose data Redis lost (evicted or deleted); \
                     the sweeper enqueues their rows again after SWEEP_GRACE_MS"
                );
            }
            moved += due + parked;
            if due < PROMOTE_CHUNK {
                return Ok(moved);
            }
        }
    }

    async fn depth(&self) -> Result<u64, QueueError> {
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

    /// When the oldest job still waiting was pushed: the first of the `active` list, the
    /// lowest-scored `scheduled` job and the first parked one (apalis' task ids are ULIDs,
    /// which sort by their creation time, and parked jobs share one score, so they sort by
    /// id). `None` when nothing waits.
    async fn oldest_waiting(&self) -> Result<Option<chrono::DateTime<chrono::Utc>>, QueueError> {
        let mut conn = self.conn.clone();
        let (active, first_scheduled, first_parked): (Option<String>, Vec<String>, Vec<String>) =
            redis::pipe()
                .cmd("LINDEX")
                .arg(self.config.active_jobs_list())
                .arg(0)
                .cmd("ZRANGE")
                .arg(self.config.scheduled_jobs_set())
                .arg(0)
                .arg(0)
                .cmd("ZRANGEBYSCORE")
                .arg(self.config.scheduled_jobs_set())
                .arg(PARKED_AT)
                .arg(PARKED_AT)
                .arg("LIMIT")
                .arg(0)
                .arg(1)
                .query_async(&mut conn)
                .await?;
        let pushed_at = |id: &String| {
            let ulid = ulid::Ulid::from_string(id).ok()?;
            chrono::DateTime::from_timestamp_millis(ulid.timestamp_ms() as i64)
        };
        Ok(active
            .iter()
            .chain(&first_scheduled)
            .chain(&first_parked)
            .filter_map(pushed_at)
            .min())
    }

    /// Runs apalis' `vacuum_before` (which deletes the data of jobs finished before
    /// [`KEEP_FINISHED`] but leaves their ids in the `done` set), then removes from the `done`
    /// set the ids whose data is gone. Returns how many jobs were removed.
    async fn vacuum<S>(&self, storage: &S) -> Result<usize, QueueError>
    where
        S: apalis_core::backend::Vacuum + Clone,
        S::Error: std::fmt::Display,
    {
        let mut storage = storage.clone();
        let vacuumed = storage
            .vacuum_before(KEEP_FINISHED)
            .await
            .map_err(|e| QueueError::Push(e.to_string()))?;
        let mut conn = self.conn.clone();
        let done = self.config.done_jobs_set();
        let meta = self.config.job_meta_hash();
        let mut cursor: u64 = 0;
        loop {
            let (next, ids): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(&done)
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !ids.is_empty() {
                let mut exists = redis::pipe();
                for id in &ids {
                    exists.cmd("EXISTS").arg(format!("{meta}:{id}"));
                }
                let kept: Vec<bool> = exists.query_async(&mut conn).await?;
                let gone: Vec<&String> = ids
                    .iter()
                    .zip(kept)
                    .filter_map(|(id, kept)| (!kept).then_some(id))
                    .collect();
                if !gone.is_empty() {
                    redis::cmd("SREM")
                        .arg(&done)
                        .arg(gone)
                        .query_async::<()>(&mut conn)
                        .await?;
                }
            }
            if next == 0 {
                return Ok(vacuumed);
            }
            cursor = next;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `TEST_REDIS_URL`, or the machine's Redis.
    fn redis_url() -> String {
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    /// An event queue under a prefix of its own (delete its keys with [`delete_keys`]).
    async fn fresh_queue() -> (String, ConnectionManager, EventQueue) {
        let prefix = format!("unit-{}", uuid::Uuid::new_v4().simple());
        let conn = connect(&QueueConfig {
            redis_url: redis_url(),
            prefix: prefix.clone(),
        })
        .await
        .expect("redis");
        let queue = EventQueue::new(conn.clone(), &prefix);
        (prefix, conn, queue)
    }

    #[test]
    fn a_consumers_acknowledgement_channel_holds_twice_its_jobs_in_flight() {
        for concurrency in [1, 8, 64, 128, 1000, 1024, 4096] {
            let channel = 4 * consumer_fetch_batch(concurrency);
            assert!(
                channel >= 2 * concurrency,
                "{concurrency} in flight, channel {channel}"
            );
        }
    }

    #[tokio::test]
    async fn parked_jobs_are_promoted_only_while_the_active_list_is_short_and_due_ones_all() {
        let (prefix, conn, queue) = fresh_queue().await;
        let ids: Vec<String> = (0..20_000).map(|n| format!("evt_{n}")).collect();
        for chunk in ids.chunks(2_000) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            queue.push(&refs).await.expect("push");
        }
        let mut c = conn.clone();
        let keys = &queue.housekeeping.config;
        // Jobs pushed as due (by apalis' retries, or an older version), more than Lua's
        // `unpack` takes at once.
        let mut due = redis::pipe();
        for n in 0..9_000 {
            let id = format!("due_{n}");
            due.cmd("ZADD")
                .arg(keys.scheduled_jobs_set())
                .arg(1)
                .arg(&id)
                .cmd("HSET")
                .arg(keys.job_data_hash())
                .arg(&id)
                .arg("{}")
                .cmd("HSET")
                .arg(format!("{}:{id}", keys.job_meta_hash()))
                .arg("attempts")
                .arg(0);
        }
        due.query_async::<()>(&mut c).await.expect("due jobs");
        let lengths = async |c: &mut ConnectionManager| -> (u64, u64) {
            redis::pipe()
                .cmd("LLEN")
                .arg(keys.active_jobs_list())
                .cmd("ZCARD")
                .arg(keys.scheduled_jobs_set())
                .query_async(c)
                .await
                .expect("lengths")
        };
        assert_eq!(queue.depth().await.expect("depth"), 29_000);

        assert_eq!(
            queue.promote_due().await.expect("promote"),
            9_000,
            "all due ones"
        );
        assert_eq!(
            lengths(&mut c).await,
            (9_000, 20_000),
            "no parked one: the list is long"
        );

        // Consumers take the active jobs; parked ones follow, up to the target.
        redis::cmd("DEL")
            .arg(keys.active_jobs_list())
            .query_async::<()>(&mut c)
            .await
            .expect("consume");
        assert_eq!(queue.promote_due().await.expect("promote"), ACTIVE_TARGET);
        assert_eq!(
            lengths(&mut c).await,
            (ACTIVE_TARGET, 20_000 - ACTIVE_TARGET)
        );
        assert_eq!(
            queue.promote_due().await.expect("promote"),
            0,
            "the list is full"
        );
        delete_keys(&mut c, &prefix).await;
    }

    #[tokio::test]
    async fn ids_whose_data_redis_lost_are_dropped_instead_of_reaching_a_consumer() {
        let (prefix, conn, queue) = fresh_queue().await;
        queue
            .push(&["evt_kept", "evt_no_data", "evt_no_meta"])
            .await
            .expect("push");
        let keys = &queue.housekeeping.config;
        let mut c = conn.clone();
        let parked: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys.scheduled_jobs_set())
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .expect("ids");
        assert_eq!(parked.len(), 3);
        let data: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(keys.job_data_hash())
            .arg(&parked)
            .query_async(&mut c)
            .await
            .expect("data");
        let id_of = |event: &str| {
            parked[data
                .iter()
                .position(|d| d.as_deref().is_some_and(|d| d.contains(event)))
                .expect("job of the event")]
            .clone()
        };
        let (kept, no_data, no_meta) = (
            id_of("evt_kept"),
            id_of("evt_no_data"),
            id_of("evt_no_meta"),
        );
        // One id in the active list too, as orphan recovery would put it back, with no data.
        redis::pipe()
            .cmd("HDEL")
            .arg(keys.job_data_hash())
            .arg(&no_data)
            .cmd("DEL")
            .arg(format!("{}:{no_meta}", keys.job_meta_hash()))
            .cmd("RPUSH")
            .arg(keys.active_jobs_list())
            .arg("01ORPHANWITHOUTDATA")
            .query_async::<()>(&mut c)
            .await
            .expect("lose data");

        queue.promote_due().await.expect("promote");
        let active: Vec<String> = redis::cmd("LRANGE")
            .arg(keys.active_jobs_list())
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .expect("active");
        assert_eq!(active, [kept]);
        assert_eq!(queue.depth().await.expect("depth"), 1);
        let leftovers: (bool, bool) = redis::pipe()
            .cmd("HEXISTS")
            .arg(keys.job_data_hash())
            .arg(&no_meta)
            .cmd("EXISTS")
            .arg(format!("{}:{no_data}", keys.job_meta_hash()))
            .query_async(&mut c)
            .await
            .expect("leftovers");
        assert_eq!(
            leftovers,
            (false, false),
            "what was left of them is deleted"
        );
        delete_keys(&mut c, &prefix).await;
    }

    async fn delete_keys(conn: &mut ConnectionManager, prefix: &str) {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(conn)
            .await
            .expect("keys");
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(keys)
                .query_async::<()>(conn)
                .await
                .expect("clean up");
        }
    }

    #[tokio::test]
    async fn vacuum_forgets_done_ids_whose_job_data_is_gone_and_keeps_the_rest() {
        let (prefix, conn, queue) = fresh_queue().await;
        let keys = &queue.housekeeping.config;
        let (done, meta) = (keys.done_jobs_set(), keys.job_meta_hash());
        let mut c = conn.clone();
        // A job finished just now keeps its metadata; one vacuumed earlier left only its id.
        let now = chrono::Utc::now().timestamp();
        redis::pipe()
            .cmd("SADD")
            .arg(&done)
            .arg(&["recent", "vacuumed"])
            .cmd("HSET")
            .arg(format!("{meta}:recent"))
            .arg(&["status", "Done", "done_at", &now.to_string()])
            .query_async::<()>(&mut c)
            .await
            .expect("seed");

        queue.vacuum_finished().await.expect("vacuum");
        let mut left: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&done)
            .query_async(&mut c)
            .await
            .expect("members");
        left.sort();
        assert_eq!(left, ["recent"]);
        delete_keys(&mut c, &prefix).await;
    }
}
