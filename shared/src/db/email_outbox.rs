//! `email_outbox`: emails to send, each written in the same transaction as what it tells
//! about, so an email is never lost nor sent for something that was rolled back.
//!
//! `status`: `pending` → `sent` (Resend's email id and the time), or `dead` (gave up; the
//! reason in `last_error`), and `dead` → `pending` again by an operator's replay
//! ([`reset_for_replay`]). A failed attempt leaves the row `pending` with `retry_at` set
//! ([`record_failure`]); `enqueued_at` is when a job was last pushed. A sweeper calls
//! [`claim_due`] to find rows whose job is lost or whose retry time has come, and pushes jobs
//! for them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

/// Where an outbox email stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum OutboxStatus {
    /// To be sent (a first attempt, or a retry at `retry_at`).
    Pending,
    /// Resend accepted it.
    Sent,
    /// Gave up: a permanent refusal or too many failed attempts.
    Dead,
}

impl OutboxStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Sent => "sent",
            OutboxStatus::Dead => "dead",
        }
    }
}

/// A stored outbox row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct OutboxEmail {
    /// Its id; the Resend idempotency key is derived from it.
    pub id: Uuid,
    /// The Enterprise request it tells sales about.
    pub request_id: Uuid,
    /// Where it stands.
    pub status: OutboxStatus,
    /// Failed attempts so far.
    pub attempts: i32,
    /// The last failure's reason (kept after a replay until it is sent).
    pub last_error: Option<String>,
    /// When the next attempt is due, after a failure.
    pub retry_at: Option<DateTime<Utc>>,
    /// When a job was last pushed for it.
    pub enqueued_at: DateTime<Utc>,
    /// Resend's id of the sent email.
    pub resend_email_id: Option<String>,
    /// When Resend accepted it.
    pub sent_at: Option<DateTime<Utc>>,
    /// When it was written.
    pub created_at: DateTime<Utc>,
}

/// Writes a pending email for an Enterprise request; its job is about to be pushed, so
/// `enqueued_at` is now.
pub async fn insert<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
    request_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO email_outbox (id, request_id) VALUES ($1, $2)")
        .bind(id)
        .bind(request_id)
        .execute(db)
        .await?;
    Ok(())
}

/// One outbox row.
pub async fn get<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
) -> Result<Option<OutboxEmail>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, request_id, status, attempts, last_error, retry_at, enqueued_at,
                resend_email_id, sent_at, created_at
         FROM email_outbox WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await
}

/// The outbox rows of an Enterprise request, oldest first.
pub async fn for_request<'e>(
    db: impl PgExecutor<'e>,
    request_id: Uuid,
) -> Result<Vec<OutboxEmail>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, request_id, status, attempts, last_error, retry_at, enqueued_at,
                resend_email_id, sent_at, created_at
         FROM email_outbox WHERE request_id = $1 ORDER BY created_at, id",
    )
    .bind(request_id)
    .fetch_all(db)
    .await
}

/// Records that Resend accepted the email. A row already `sent` keeps its first id and time
/// (a second run of the job got the same answer through the idempotency key).
pub async fn mark_sent<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
    resend_email_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE email_outbox
         SET status = 'sent', resend_email_id = $2, sent_at = now(), retry_at = NULL
         WHERE id = $1 AND status <> 'sent'",
    )
    .bind(id)
    .bind(resend_email_id)
    .execute(db)
    .await?;
    Ok(())
}

/// What [`record_failure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct RecordedFailure {
    /// Failed attempts, this one included.
    pub attempts: i32,
    /// `pending` (retry at `retry_at`) or `dead` (that was the last attempt).
    pub status: OutboxStatus,
    /// When the next attempt is due (`None` once dead).
    pub retry_at: Option<DateTime<Utc>>,
}

/// Counts a failed attempt of a pending row: keeps the error and schedules the next attempt
/// `retry_in` from now, or makes the row `dead` when this was attempt `max_attempts`. In one
/// statement, so a crash cannot leave a row at the limit but still pending. `None` when the
/// row is not pending (sent or dead meanwhile): nothing changes.
pub async fn record_failure<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
    error: &str,
    retry_in: Duration,
    max_attempts: i32,
) -> Result<Option<RecordedFailure>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE email_outbox
         SET attempts = attempts + 1,
             last_error = $2,
             status = CASE WHEN attempts + 1 >= $4 THEN 'dead' ELSE 'pending' END,
             retry_at = CASE WHEN attempts + 1 >= $4 THEN NULL
                             ELSE now() + make_interval(secs => $3) END
         WHERE id = $1 AND status = 'pending'
         RETURNING attempts, status, retry_at",
    )
    .bind(id)
    .bind(error)
    .bind(retry_in.as_secs_f64())
    .bind(max_attempts)
    .fetch_optional(db)
    .await
}

/// Gives up on a pending row at once (a permanent refusal): a dead letter with its reason,
/// kept for operators to replay. `false` when the row is not pending.
pub async fn mark_dead<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
    error: &str,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "UPDATE email_outbox
         SET status = 'dead', attempts = attempts + 1, last_error = $2, retry_at = NULL
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(id)
    .bind(error)
    .execute(db)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// For the sweeper: claims up to `limit` pending rows that need a job now — those whose last
/// job is older than `grace` and that wait for no retry (the job was never pushed, or Redis
/// lost it), and those whose `retry_at` has come — and marks them enqueued now (`retry_at`
/// cleared), returning their ids. The caller pushes a job for each id. `SKIP LOCKED` lets
/// several sweepers run without claiming the same row twice.
pub async fn claim_due<'e>(
    db: impl PgExecutor<'e>,
    grace: Duration,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE email_outbox SET enqueued_at = now(), retry_at = NULL
         WHERE id IN (
             SELECT id FROM email_outbox
             WHERE status = 'pending'
               AND ((retry_at IS NULL AND enqueued_at <= now() - make_interval(secs => $1))
                    OR retry_at <= now())
             ORDER BY coalesce(retry_at, enqueued_at)
             LIMIT $2
             FOR UPDATE SKIP LOCKED)
         RETURNING id",
    )
    .bind(grace.as_secs_f64())
    .bind(limit)
    .fetch_all(db)
    .await
}

/// For operators: dead rows, newest first, written at or after `since` when given.
pub async fn list_dead<'e>(
    db: impl PgExecutor<'e>,
    since: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<OutboxEmail>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, request_id, status, attempts, last_error, retry_at, enqueued_at,
                resend_email_id, sent_at, created_at
         FROM email_outbox
         WHERE status = 'dead' AND ($1::timestamptz IS NULL OR created_at >= $1)
         ORDER BY created_at DESC, id
         LIMIT $2",
    )
    .bind(since)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// For operators: makes a dead row pending again with a fresh attempt count (after fixing
/// the cause), enqueued now; `false` when the row is not dead. The caller then pushes its job.
/// `last_error` stays until the email is sent, as a record of why it was replayed.
pub async fn reset_for_replay<'e>(db: impl PgExecutor<'e>, id: Uuid) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "UPDATE email_outbox
         SET status = 'pending', attempts = 0, retry_at = NULL, enqueued_at = now()
         WHERE id = $1 AND status = 'dead'",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// How many emails are pending and dead (zero included), for the gauges.
pub async fn count_unsent<'e>(
    db: impl PgExecutor<'e>,
) -> Result<Vec<(OutboxStatus, i64)>, sqlx::Error> {
    let (pending, dead): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead')
         FROM email_outbox WHERE status IN ('pending', 'dead')",
    )
    .fetch_one(db)
    .await?;
    Ok(vec![
        (OutboxStatus::Pending, pending),
        (OutboxStatus::Dead, dead),
    ])
}
