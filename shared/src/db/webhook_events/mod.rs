//! `webhook_events`: the inbox. Ingest inserts each verified event with its exact raw bytes;
//! the worker records its fate in `status`:
//! `pending` → `processed` (a decision was recorded), or `deferred` (waiting for the
//! organization's link, released by [`release_deferred`]), or `dead` (given up; an operator
//! can replay it).
//!
//! Postgres, not Redis, decides when an unfinished row runs again: `enqueued_at` is when a job
//! was last pushed for it, `retry_at` when a failed or deferred row is due. [`claim_due`] is
//! the sweeper's query: rows past `retry_at`, and rows without one whose job is older than a
//! grace period (Redis never got it, or lost it).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;

mod status;

pub use self::status::*;

/// A verified event, as ingest stores it.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    /// `evt_…`
    pub id: &'a str,
    /// Event type.
    pub event_type: &'a str,
    /// Live or test mode.
    pub livemode: bool,
    /// API version of the payload.
    pub api_version: Option<&'a str>,
    /// Stripe's `created`.
    pub stripe_created: DateTime<Utc>,
    /// The exact bytes received.
    pub payload: &'a [u8],
}

/// Stores the event; `false` when an event with this id is already stored (nothing changes).
pub async fn insert<'e>(
    db: impl PgExecutor<'e>,
    event: &NewEvent<'_>,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "INSERT INTO webhook_events (id, type, livemode, api_version, stripe_created, payload)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(event.id)
    .bind(event.event_type)
    .bind(event.livemode)
    .bind(event.api_version)
    .bind(event.stripe_created)
    .bind(event.payload)
    .execute(db)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Stores many events in one statement (so one commit when run outside a transaction: ingest's
/// group commit) and returns the ids that were new. Ids already stored, or repeated in `events`
/// (the first occurrence wins), are skipped and not returned. Callers that may run at once
/// with the same ids pass them sorted: an insert waits for another transaction's uncommitted
/// row of the same id, so two batches holding two ids in opposite orders would deadlock.
///
/// The rows travel as six arrays unnested server-side: one statement text whatever the batch
/// size, so the prepared statement is reused, and no limit on bind parameters.
pub async fn insert_many<'e>(
    db: impl PgExecutor<'e>,
    events: &[NewEvent<'_>],
) -> Result<Vec<String>, sqlx::Error> {
    insert_many_from(db, events, "webhook").await
}

/// [`insert_many`] for events listed from Stripe's Events API by `worker backfill`: their
/// rows say `source = 'backfill'`.
pub async fn insert_backfilled<'e>(
    db: impl PgExecutor<'e>,
    events: &[NewEvent<'_>],
) -> Result<Vec<String>, sqlx::Error> {
    insert_many_from(db, events, "backfill").await
}

async fn insert_many_from<'e>(
    db: impl PgExecutor<'e>,
    events: &[NewEvent<'_>],
    source: &'static str,
) -> Result<Vec<String>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = events.iter().map(|e| e.id).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type).collect();
    let livemodes: Vec<bool> = events.iter().map(|e| e.livemode).collect();
    let api_versions: Vec<Option<&str>> = events.iter().map(|e| e.api_version).collect();
    let created: Vec<DateTime<Utc>> = events.iter().map(|e| e.stripe_created).collect();
    let payloads: Vec<&[u8]> = events.iter().map(|e| e.payload).collect();
    sqlx::query_scalar(
        "INSERT INTO webhook_events
             (id, type, livemode, api_version, stripe_created, payload, source)
         SELECT *, $7 FROM UNNEST($1::text[], $2::text[], $3::bool[], $4::text[],
                                  $5::timestamptz[], $6::bytea[])
         ON CONFLICT (id) DO NOTHING
         RETURNING id",
    )
    .bind(ids)
    .bind(types)
    .bind(livemodes)
    .bind(api_versions)
    .bind(created)
    .bind(payloads)
    .bind(source)
    .fetch_all(db)
    .await
}

/// Which of `ids` are stored.
pub async fn stored_ids<'e>(
    db: impl PgExecutor<'e>,
    ids: &[&str],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM webhook_events WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(db)
        .await
}

/// The `livemode` of the newest stored event, if any: the mode this deployment's data is in.
pub async fn newest_livemode<'e>(db: impl PgExecutor<'e>) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar("SELECT livemode FROM webhook_events ORDER BY received_at DESC LIMIT 1")
        .fetch_optional(db)
        .await
}

/// How many of `ids` are stored (load-test verification).
pub async fn count_stored<'e>(db: impl PgExecutor<'e>, ids: &[String]) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM webhook_events WHERE id = ANY($1)")
        .bind(ids)
        .fetch_one(db)
        .await
}

/// The events of `ids` the worker has finished with (`processed` or `dead`), with the
/// milliseconds from ingest's commit (`received_at`) to the decision (`processed_at`), and
/// when the decision committed (load-test lag measurement).
pub async fn decided_lags<'e>(
    db: impl PgExecutor<'e>,
    ids: &[String],
) -> Result<Vec<(String, f64, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, (extract(epoch FROM processed_at - received_at) * 1000)::float8, processed_at
         FROM webhook_events
         WHERE id = ANY($1) AND status IN ('processed', 'dead') AND processed_at IS NOT NULL",
    )
    .bind(ids)
    .fetch_all(db)
    .await
}

/// Inbox rows by status (load-test progress).
pub async fn count_by_status<'e>(
    db: impl PgExecutor<'e>,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT status, count(*) FROM webhook_events GROUP BY status ORDER BY status")
        .fetch_all(db)
        .await
}

/// A stored event.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct StoredEvent {
    /// `evt_…`
    pub id: String,
    /// Event type.
    #[sqlx(rename = "type")]
    #[serde(rename = "type")]
    pub event_type: String,
    /// Live or test mode.
    pub livemode: bool,
    /// API version of the payload.
    pub api_version: Option<String>,
    /// Stripe's `created`.
    pub stripe_created: DateTime<Utc>,
    /// The exact bytes received.
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// When ingest committed it.
    pub received_at: DateTime<Utc>,
    /// `pending`, `deferred`, `processed` or `dead`.
    pub status: String,
    /// Failed attempts so far.
    pub attempts: i32,
    /// The last failure or deferral reason.
    pub last_error: Option<String>,
    /// The customer a deferred event waits for.
    pub stripe_customer_id: Option<String>,
    /// When it was processed.
    pub processed_at: Option<DateTime<Utc>>,
    /// When a job was last pushed for it.
    pub enqueued_at: DateTime<Utc>,
    /// When a failed or deferred event is due again.
    pub retry_at: Option<DateTime<Utc>>,
    /// How many times it was deferred.
    pub deferrals: i32,
    /// When it was first deferred.
    pub deferred_since: Option<DateTime<Utc>>,
}

/// The columns of [`StoredEvent`], for every query that returns it.
macro_rules! stored_event_columns {
    () => {
        "id, type, livemode, api_version, stripe_created, payload, received_at, status, attempts,
         last_error, stripe_customer_id, processed_at, enqueued_at, retry_at, deferrals,
         deferred_since"
    };
}

/// One stored event.
pub async fn get<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
) -> Result<Option<StoredEvent>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        stored_event_columns!(),
        " FROM webhook_events WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// A stored event and whether this transaction just claimed it.
#[derive(Debug, sqlx::FromRow)]
struct ClaimedEvent {
    #[sqlx(flatten)]
    event: StoredEvent,
    claimed: bool,
}

/// The apply transaction's first statement, one round trip for two things: claims the events
/// by marking them `processed` (`false` for one already processed: a concurrent claim of the
/// same id waits for the other transaction's row lock, then finds it processed and gets
/// `false`; if that transaction rolls back, it claims it) and reads them as they were before
/// the claim. Ids must be distinct and sorted, so concurrent claims take their row locks in
/// one order. Events not stored are missing from the result; the order of the result is
/// unspecified.
///
/// The status is the one record of "processed" (`processed_events` is a view of it since
/// migration 000010): the claim, the decision's state changes and its audit row commit
/// together, or none of them does. A claimed event that is not decided after all (deferred,
/// given up, or left for a refetch) gets its status set again in the same transaction.
pub async fn get_and_claim<'e>(
    db: impl PgExecutor<'e>,
    ids: &[&str],
) -> Result<Vec<(StoredEvent, bool)>, sqlx::Error> {
    let rows: Vec<ClaimedEvent> = sqlx::query_as(concat!(
        "WITH claim AS (
             UPDATE webhook_events
             SET status = 'processed', processed_at = now(), last_error = NULL, retry_at = NULL
             WHERE id = ANY($1) AND status <> 'processed'
             RETURNING id)
         SELECT ",
        stored_event_columns!(),
        ", id IN (SELECT id FROM claim) AS claimed FROM webhook_events WHERE id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.event, row.claimed))
        .collect())
}

/// Which dead letters an operator means.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only those that died at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// At most this many, newest first.
    pub limit: i64,
}

/// Dead letters, newest first.
pub async fn list_dead<'e>(
    db: impl PgExecutor<'e>,
    filter: &DeadLetterFilter,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        stored_event_columns!(),
        " FROM webhook_events
         WHERE status = 'dead'
           AND ($1::text IS NULL OR type = $1)
           AND ($2::timestamptz IS NULL OR processed_at >= $2)
         ORDER BY processed_at DESC, id
         LIMIT $3"
    ))
    .bind(filter.event_type.as_deref())
    .bind(filter.since)
    .bind(filter.limit)
    .fetch_all(db)
    .await
}

/// The ids of dead letters matching `filter`, in Stripe's order (`created`), for a replay.
pub async fn list_dead_ids<'e>(
    db: impl PgExecutor<'e>,
    filter: &DeadLetterFilter,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM webhook_events
         WHERE status = 'dead'
           AND ($1::text IS NULL OR type = $1)
           AND ($2::timestamptz IS NULL OR processed_at >= $2)
         ORDER BY stripe_created, id
         LIMIT $3",
    )
    .bind(filter.event_type.as_deref())
    .bind(filter.since)
    .bind(filter.limit)
    .fetch_all(db)
    .await
}

/// Turns a dead letter back into a fresh pending event (attempts and deferrals start again)
/// for an operator's replay; `false` if it is not dead.
pub async fn revive<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "UPDATE webhook_events
         SET status = 'pending', attempts = 0, deferrals = 0, deferred_since = NULL,
             retry_at = NULL, processed_at = NULL, enqueued_at = now()
         WHERE id = $1 AND status = 'dead'",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// How many events are pending, deferred and dead, for the gauges.
pub async fn count_unfinished<'e>(
    db: impl PgExecutor<'e>,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT status, count(*) FROM webhook_events
         WHERE status IN ('pending', 'deferred', 'dead')
         GROUP BY status",
    )
    .fetch_all(db)
    .await
}
