//! What apalis-redis 1.0 leaves undone on a queue: promoting parked jobs to the `active`
//! list a chunk at a time (dropping ids whose data Redis lost), reading its depth and its
//! oldest waiting job, and deleting finished jobs.

use std::time::Duration;

use redis::aio::ConnectionManager;

use super::{QueueError, storage_config};

/// What the producing sides share besides the storage: the queue's keys and a connection,
/// for the gauges and the clean-up apalis-redis does not do.
#[derive(Debug, Clone)]
pub(super) struct Housekeeping {
    pub(super) name: String,
    pub(super) config: apalis_redis::Config,
    pub(super) conn: ConnectionManager,
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
pub(super) const PARKED_AT: u64 = 4_102_444_800;

/// How long the `active` list is kept: enough for a few hundred milliseconds of work.
pub(super) const ACTIVE_TARGET: u64 = 1000;

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
    pub(super) fn new(conn: ConnectionManager, name: String) -> Housekeeping {
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
    pub(super) async fn promote_due(&self) -> Result<u64, QueueError> {
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

    pub(super) async fn depth(&self) -> Result<u64, QueueError> {
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
    pub(super) async fn oldest_waiting(
        &self,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, QueueError> {
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
    pub(super) async fn vacuum<S>(&self, storage: &S) -> Result<usize, QueueError>
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
