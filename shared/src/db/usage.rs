//! `usage_records` and `usage_reports`: metered usage and the meter events reporting it.
//! A report is created (its records bound to it, its identifier fixed) before Stripe is
//! called and finished after, so a crash in between only re-sends the same identifier. At most
//! one unfinished report exists per organization and meter (a partial unique index), and a
//! worker sends one only under a lease, so one call per customer and meter is in flight.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{PgExecutor, Postgres, Transaction};

/// A usage record to store.
#[derive(Debug, Clone)]
pub struct NewUsageRecord<'a> {
    /// The organization.
    pub organization_id: &'a str,
    /// The meter's `event_name`.
    pub meter: &'a str,
    /// The caller's id for the record (or one made for it).
    pub identifier: &'a str,
    /// A positive amount.
    pub value: i64,
    /// When the usage happened.
    pub occurred_at: DateTime<Utc>,
}

/// Stores records in one statement; returns the identifiers that were new (as
/// `(organization, meter, identifier)`). A record already stored is skipped. Pass them sorted
/// by key: concurrent inserts of one key wait for each other in one order.
pub async fn insert_records<'e, 'a>(
    db: impl PgExecutor<'e>,
    records: &[NewUsageRecord<'a>],
) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let column = |f: fn(&NewUsageRecord<'a>) -> &'a str| -> Vec<&'a str> {
        records.iter().map(f).collect::<Vec<_>>()
    };
    let values: Vec<i64> = records.iter().map(|r| r.value).collect();
    let times: Vec<DateTime<Utc>> = records.iter().map(|r| r.occurred_at).collect();
    sqlx::query_as(
        "INSERT INTO usage_records (organization_id, meter, identifier, value, occurred_at)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::timestamptz[])
         ON CONFLICT (organization_id, meter, identifier) DO NOTHING
         RETURNING organization_id, meter, identifier",
    )
    .bind(column(|r| r.organization_id))
    .bind(column(|r| r.meter))
    .bind(column(|r| r.identifier))
    .bind(values)
    .bind(times)
    .fetch_all(db)
    .await
}

/// An organization's usage of one meter since a time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Totals {
    /// Sum of the records Stripe has (their report was sent).
    pub reported: i64,
    /// Sum of the records not reported yet (no report, or one being sent).
    pub pending: i64,
    /// Sum of the records whose report Stripe refused for good (dead letters).
    pub dead: i64,
    /// Records counted.
    pub records: i64,
}

/// Totals of records that happened at or after `since`.
pub async fn totals<'e>(
    db: impl PgExecutor<'e>,
    organization_id: &str,
    meter: &str,
    since: DateTime<Utc>,
) -> Result<Totals, sqlx::Error> {
    sqlx::query_as(
        "SELECT coalesce(sum(r.value) FILTER (WHERE p.status = 'sent'), 0)::int8 AS reported,
                coalesce(sum(r.value) FILTER (WHERE p.status IS NULL OR p.status = 'sending'), 0)::int8
                    AS pending,
                coalesce(sum(r.value) FILTER (WHERE p.status = 'dead'), 0)::int8 AS dead,
                count(*) AS records
         FROM usage_records r LEFT JOIN usage_reports p ON p.id = r.report_id
         WHERE r.organization_id = $1 AND r.meter = $2 AND r.occurred_at >= $3",
    )
    .bind(organization_id)
    .bind(meter)
    .bind(since)
    .fetch_one(db)
    .await
}

/// Organizations and meters with records waiting for a report.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PendingGroup {
    /// The organization.
    pub organization_id: String,
    /// The meter.
    pub meter: String,
    /// Its Stripe customer, once linked.
    pub customer_id: Option<String>,
    /// When the oldest waiting record was received.
    pub oldest: DateTime<Utc>,
}

/// Up to `limit` groups with pending records and no unfinished report, oldest first.
pub async fn pending_groups<'e>(
    db: impl PgExecutor<'e>,
    limit: i64,
) -> Result<Vec<PendingGroup>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.organization_id, r.meter, o.stripe_customer_id AS customer_id,
                min(r.received_at) AS oldest
         FROM usage_records r LEFT JOIN organizations o ON o.id = r.organization_id
         WHERE r.report_id IS NULL
           AND NOT EXISTS (SELECT 1 FROM usage_reports p WHERE p.status = 'sending'
                           AND p.organization_id = r.organization_id AND p.meter = r.meter)
         GROUP BY 1, 2, 3 ORDER BY oldest LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await
}

/// How many records wait for a report, and since when the oldest was received.
pub async fn pending_summary<'e>(
    db: impl PgExecutor<'e>,
) -> Result<(i64, Option<DateTime<Utc>>), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), min(r.received_at) FROM usage_records r
         LEFT JOIN usage_reports p ON p.id = r.report_id
         WHERE r.report_id IS NULL OR p.status = 'sending'",
    )
    .fetch_one(db)
    .await
}

/// A meter event to send (or sent).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Report {
    /// Row id.
    pub id: i64,
    /// The organization.
    pub organization_id: String,
    /// The meter's `event_name`.
    pub meter: String,
    /// The customer billed.
    pub customer_id: Option<String>,
    /// Sent to Stripe as the meter event's `identifier` (and idempotency key).
    pub identifier: String,
    /// The sum of its records.
    pub value: i64,
    /// How many records it covers.
    pub records: i32,
    /// The newest record's time: the meter event's `timestamp`.
    pub occurred_at: DateTime<Utc>,
    /// `sending`, `sent`, `dead`.
    pub status: String,
    /// Failed attempts.
    pub attempts: i32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it was given up on.
    pub died_at: Option<DateTime<Utc>>,
}

macro_rules! report_columns {
    () => {
        "id, organization_id, meter, customer_id, identifier, value, records, occurred_at, status,
         attempts, last_error, died_at"
    };
}

/// The identifier of a report covering exactly these records: `usage_` and a hash of their
/// ids (64 hex digits; Stripe takes up to 100 characters).
pub fn report_identifier(organization_id: &str, meter: &str, record_ids: &[i64]) -> String {
    let mut hash = Sha256::new();
    hash.update(organization_id.as_bytes());
    hash.update([0]);
    hash.update(meter.as_bytes());
    for id in record_ids {
        hash.update(id.to_be_bytes());
    }
    format!("usage_{}", hex::encode(hash.finalize()))
}

/// Creates the report of up to `max_records` pending records of a group (binding them to it)
/// in `tx`; `None` when the group has no pending record or an unfinished report already. A
/// report with no customer is created dead (`reason`), so records that can never be reported
/// stop waiting and become a dead letter.
pub async fn create_report(
    tx: &mut Transaction<'static, Postgres>,
    group: &PendingGroup,
    max_records: i64,
    dead_reason: Option<&str>,
) -> Result<Option<Report>, sqlx::Error> {
    let rows: Vec<(i64, i64, DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, value, occurred_at FROM usage_records
         WHERE organization_id = $1 AND meter = $2 AND report_id IS NULL
         ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED",
    )
    .bind(&group.organization_id)
    .bind(&group.meter)
    .bind(max_records)
    .fetch_all(&mut **tx)
    .await?;
    let Some(newest) = rows.iter().map(|(_, _, at)| *at).max() else {
        return Ok(None);
    };
    let ids: Vec<i64> = rows.iter().map(|(id, _, _)| *id).collect();
    let value: i64 = rows.iter().map(|(_, v, _)| *v).sum();
    let identifier = report_identifier(&group.organization_id, &group.meter, &ids);
    let report: Option<Report> = sqlx::query_as(concat!(
        "INSERT INTO usage_reports (organization_id, meter, customer_id, identifier, value,
             records, occurred_at, status, last_error, died_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $8::text IS NULL THEN 'sending' ELSE 'dead' END,
                 $8, CASE WHEN $8::text IS NULL THEN NULL ELSE now() END)
         ON CONFLICT (organization_id, meter) WHERE status = 'sending' DO NOTHING
         RETURNING ",
        report_columns!()
    ))
    .bind(&group.organization_id)
    .bind(&group.meter)
    .bind(&group.customer_id)
    .bind(&identifier)
    .bind(value)
    .bind(ids.len() as i32)
    .bind(newest)
    .bind(dead_reason)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(report) = report else {
        return Ok(None);
    };
    sqlx::query("UPDATE usage_records SET report_id = $1 WHERE id = ANY($2)")
        .bind(report.id)
        .bind(&ids)
        .execute(&mut **tx)
        .await?;
    Ok(Some(report))
}

/// Claims up to `limit` unfinished reports that are due, each under a lease of `lease` (so no
/// other worker sends it meanwhile); a report whose sender died is due when its lease ends.
pub async fn claim_sendable<'e>(
    db: impl PgExecutor<'e>,
    lease: Duration,
    limit: i64,
) -> Result<Vec<Report>, sqlx::Error> {
    sqlx::query_as(concat!(
        "UPDATE usage_reports SET lease_until = now() + make_interval(secs => $1)
         WHERE id IN (SELECT id FROM usage_reports
                      WHERE status = 'sending' AND (retry_at IS NULL OR retry_at <= now())
                        AND (lease_until IS NULL OR lease_until < now())
                      ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING ",
        report_columns!()
    ))
    .bind(lease.as_secs_f64())
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Records Stripe's answer: the report is sent.
pub async fn mark_sent<'e>(
    db: impl PgExecutor<'e>,
    id: i64,
    answer: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE usage_reports SET status = 'sent', stripe_answer = $2, sent_at = now(),
             lease_until = NULL, retry_at = NULL
         WHERE id = $1",
    )
    .bind(id)
    .bind(answer)
    .execute(db)
    .await?;
    Ok(())
}

/// Counts a failed attempt; the report is due again at `retry_at`, or dead when `retry_at` is
/// `None`. Returns the attempts so far.
pub async fn record_failure<'e>(
    db: impl PgExecutor<'e>,
    id: i64,
    error: &str,
    retry_at: Option<DateTime<Utc>>,
) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE usage_reports SET attempts = attempts + 1, last_error = $2, retry_at = $3,
             lease_until = NULL,
             status = CASE WHEN $3::timestamptz IS NULL THEN 'dead' ELSE status END,
             died_at = CASE WHEN $3::timestamptz IS NULL THEN now() ELSE died_at END
         WHERE id = $1 RETURNING attempts",
    )
    .bind(id)
    .bind(error)
    .bind(retry_at)
    .fetch_one(db)
    .await
}

/// Dead reports, newest first.
pub async fn list_dead<'e>(
    db: impl PgExecutor<'e>,
    since: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<Report>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        report_columns!(),
        " FROM usage_reports WHERE status = 'dead' AND ($1::timestamptz IS NULL OR died_at >= $1)
         ORDER BY died_at DESC LIMIT $2"
    ))
    .bind(since)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Makes a dead report due again, keeping its records and identifier (an operator's replay);
/// `None` when no dead report has this identifier. Its customer is the organization's now.
pub async fn revive<'e>(
    db: impl PgExecutor<'e>,
    identifier: &str,
) -> Result<Option<Report>, sqlx::Error> {
    sqlx::query_as(concat!(
        "UPDATE usage_reports p SET status = 'sending', attempts = 0, retry_at = NULL,
             lease_until = NULL, died_at = NULL,
             customer_id = coalesce((SELECT stripe_customer_id FROM organizations o
                                     WHERE o.id = p.organization_id), p.customer_id)
         WHERE identifier = $1 AND status = 'dead'
         RETURNING ",
        report_columns!()
    ))
    .bind(identifier)
    .fetch_optional(db)
    .await
}
