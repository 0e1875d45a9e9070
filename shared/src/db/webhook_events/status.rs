//! The inbox rows' fate: processed, deferred until their organization is linked (and
//! released), retried, dead, and the sweeper's claim of the rows due again (see the module
//! above for the statuses).

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use super::StoredEvent;

/// Records that decisions were committed for events this transaction did not claim (an
/// operator's forced replay of processed events).
pub async fn mark_processed<'e>(db: impl PgExecutor<'e>, ids: &[&str]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_events
         SET status = 'processed', processed_at = now(), last_error = NULL, retry_at = NULL
         WHERE id = ANY($1)",
    )
    .bind(ids)
    .execute(db)
    .await?;
    Ok(())
}

/// Undoes [`get_and_claim`](super::get_and_claim) for an event left undecided (to be applied
/// again after a refetch): its status and timestamps as they were.
pub async fn unclaim<'e>(db: impl PgExecutor<'e>, stored: &StoredEvent) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_events SET status = $2, processed_at = $3, last_error = $4, retry_at = $5
         WHERE id = $1",
    )
    .bind(&stored.id)
    .bind(&stored.status)
    .bind(stored.processed_at)
    .bind(&stored.last_error)
    .bind(stored.retry_at)
    .execute(db)
    .await?;
    Ok(())
}

/// An event to park until its organization is linked: see [`mark_deferred`].
#[derive(Debug, Clone, Copy)]
pub struct Deferral<'a> {
    /// The event.
    pub id: &'a str,
    /// The customer whose link releases it, when known.
    pub customer_id: Option<&'a str>,
    /// Why it waits (its `last_error`).
    pub reason: &'a str,
    /// When the sweeper checks it again.
    pub retry_at: DateTime<Utc>,
}

/// Parks these events until the organization of their customer is linked (or their
/// `retry_at`, when the sweeper tries them again), counting one more deferral each. One
/// statement for a whole batch: with a fifth of the events waiting, one update per event was
/// a fifth of a round trip per event inside the apply transaction.
pub async fn mark_deferred<'e>(
    db: impl PgExecutor<'e>,
    deferrals: &[Deferral<'_>],
) -> Result<(), sqlx::Error> {
    if deferrals.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = deferrals.iter().map(|d| d.id).collect();
    let customers: Vec<Option<&str>> = deferrals.iter().map(|d| d.customer_id).collect();
    let reasons: Vec<&str> = deferrals.iter().map(|d| d.reason).collect();
    let retry_at: Vec<DateTime<Utc>> = deferrals.iter().map(|d| d.retry_at).collect();
    sqlx::query(
        "UPDATE webhook_events AS e
         SET status = 'deferred', stripe_customer_id = d.customer_id, last_error = d.reason,
             retry_at = d.retry_at, processed_at = NULL, deferrals = e.deferrals + 1,
             deferred_since = COALESCE(e.deferred_since, now())
         FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
              AS d(id, customer_id, reason, retry_at)
         WHERE e.id = d.id",
    )
    .bind(ids)
    .bind(customers)
    .bind(reasons)
    .bind(retry_at)
    .execute(db)
    .await?;
    Ok(())
}

/// Makes the deferred events of these customers pending again (their links were just written)
/// and returns their ids, so the caller can enqueue them after commit.
///
/// Rows locked by another transaction are skipped, never waited for: the caller holds the
/// customers' link locks, and an apply transaction that claimed one of these events waits
/// for those locks, so waiting here would deadlock. That transaction sees the new link once
/// it has the lock and applies the event itself (a sweeper round or a failure being recorded
/// leaves it pending, to be applied by its job or at its `retry_at`).
pub async fn release_deferred<'e>(
    db: impl PgExecutor<'e>,
    customer_ids: &[&str],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE webhook_events SET status = 'pending', enqueued_at = now(), retry_at = NULL
         WHERE id IN (
             SELECT id FROM webhook_events
             WHERE status = 'deferred' AND stripe_customer_id = ANY($1)
             FOR UPDATE SKIP LOCKED)
         RETURNING id",
    )
    .bind(customer_ids)
    .fetch_all(db)
    .await
}

/// Counts a failed attempt and keeps its error; returns the attempts so far. The row stays as
/// it was until [`schedule_retry`] or [`mark_dead`] in the same transaction.
pub async fn record_failure<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    error: &str,
) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE webhook_events SET attempts = attempts + 1, last_error = $2
         WHERE id = $1 RETURNING attempts",
    )
    .bind(id)
    .bind(error)
    .fetch_optional(db)
    .await
}

/// Leaves the event pending, due again at `retry_at`. An event another job processed in the
/// meantime stays processed.
pub async fn schedule_retry<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    retry_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_events SET status = 'pending', retry_at = $2
         WHERE id = $1 AND status <> 'processed'",
    )
    .bind(id)
    .bind(retry_at)
    .execute(db)
    .await?;
    Ok(())
}

/// Gives up on the event: a dead letter with its reason, kept for operators to replay.
/// Returns the event type, or `None` if there is no such event or another job processed it
/// in the meantime.
pub async fn mark_dead<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    error: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE webhook_events
         SET status = 'dead', last_error = $2, processed_at = now(), retry_at = NULL
         WHERE id = $1 AND status <> 'processed'
         RETURNING type",
    )
    .bind(id)
    .bind(error)
    .fetch_optional(db)
    .await
}

/// Dead letters of events this transaction claimed (their wait for an organization ended),
/// each `(id, error)`, in one statement.
pub async fn mark_claimed_dead<'e>(
    db: impl PgExecutor<'e>,
    dead: &[(&str, &str)],
) -> Result<(), sqlx::Error> {
    if dead.is_empty() {
        return Ok(());
    }
    let (ids, errors): (Vec<&str>, Vec<&str>) = dead.iter().copied().unzip();
    sqlx::query(
        "UPDATE webhook_events AS e
         SET status = 'dead', last_error = d.error, processed_at = now(), retry_at = NULL
         FROM unnest($1::text[], $2::text[]) AS d(id, error)
         WHERE e.id = d.id",
    )
    .bind(ids)
    .bind(errors)
    .execute(db)
    .await?;
    Ok(())
}

/// The sweeper's claim: up to `limit` unfinished rows that are due — past their `retry_at`,
/// or without one and last enqueued at or before `lost_before` (their job is lost). They become
/// pending with `enqueued_at = now()` before the caller pushes their jobs, and `SKIP LOCKED`
/// leaves rows another replica is claiming to that replica, so replicas never enqueue a row
/// twice in one round. If the push then fails, the rows are due again later.
pub async fn claim_due<'e>(
    db: impl PgExecutor<'e>,
    lost_before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE webhook_events SET status = 'pending', enqueued_at = now(), retry_at = NULL
         WHERE id IN (
             SELECT id FROM webhook_events
             WHERE status IN ('pending', 'deferred')
               AND (retry_at <= now() OR (retry_at IS NULL AND enqueued_at <= $1))
             ORDER BY enqueued_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED)
         RETURNING id",
    )
    .bind(lost_before)
    .bind(limit)
    .fetch_all(db)
    .await
}
