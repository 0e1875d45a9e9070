//! `reconciliation_runs`: one row per reconciliation, its progress (page cursor, counts) kept
//! as it goes, so a run that dies mid-way is visible as such and the next one resumes from its
//! cursor. A scheduled run is claimed by inserting its tick: `scheduled_for` is unique, so of
//! every replica that wakes for a tick exactly one gets the row.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;

/// What a run found and did, so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Counts {
    /// Subscriptions listed from Stripe.
    pub subscriptions_listed: i32,
    /// Organizations whose subscriptions were compared.
    pub organizations_checked: i32,
    /// Organizations whose stored state differed from Stripe's.
    pub drifted: i32,
    /// Drifted organizations set right.
    pub healed: i32,
    /// Organizations pointing at a subscription Stripe does not know.
    pub orphans: i32,
    /// Subscriptions that resolve to no organization.
    pub unlinked: i32,
    /// Subscriptions that could not be read or healed.
    pub errors: i32,
    /// Events stored by the backfill before a scheduled run.
    pub events_backfilled: i32,
}

/// A stored run.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Run {
    /// Run id.
    pub id: i64,
    /// `schedule` or `manual`.
    pub trigger: String,
    /// The tick a scheduled run is for.
    pub scheduled_for: Option<DateTime<Utc>>,
    /// Changed nothing.
    pub dry_run: bool,
    /// `running`, `succeeded` or `failed`.
    pub status: String,
    /// Start.
    pub started_at: DateTime<Utc>,
    /// End.
    pub finished_at: Option<DateTime<Utc>>,
    /// The failed run this one continued from its cursor.
    pub resumed_from: Option<i64>,
    /// The last subscription listed.
    pub cursor: Option<String>,
    /// The whole list was read.
    pub listing_complete: bool,
    /// The counts.
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub counts: Counts,
    /// Why it failed.
    pub error: Option<String>,
}

macro_rules! columns {
    () => {
        "id, trigger, scheduled_for, dry_run, status, started_at, finished_at, resumed_from,
         cursor, listing_complete, subscriptions_listed, organizations_checked, drifted, healed,
         orphans, unlinked, errors, events_backfilled, error"
    };
}

/// Starts a manual run; returns its id.
pub async fn start_manual<'e>(
    db: impl PgExecutor<'e>,
    dry_run: bool,
    resumed_from: Option<&Run>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO reconciliation_runs (trigger, dry_run, resumed_from, cursor)
         VALUES ('manual', $1, $2, $3) RETURNING id",
    )
    .bind(dry_run)
    .bind(resumed_from.map(|r| r.id))
    .bind(resumed_from.and_then(|r| r.cursor.as_deref()))
    .fetch_one(db)
    .await
}

/// Claims the scheduled run of `tick`; `None` when another replica already has it.
pub async fn claim_scheduled<'e>(
    db: impl PgExecutor<'e>,
    tick: DateTime<Utc>,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO reconciliation_runs (trigger, scheduled_for) VALUES ('schedule', $1)
         ON CONFLICT (scheduled_for) DO NOTHING RETURNING id",
    )
    .bind(tick)
    .fetch_optional(db)
    .await
}

/// Whether the run of `tick` exists (claimed by some replica, whatever became of it).
pub async fn tick_claimed<'e>(
    db: impl PgExecutor<'e>,
    tick: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM reconciliation_runs WHERE scheduled_for = $1)")
        .bind(tick)
        .fetch_one(db)
        .await
}

/// Sets where a claimed run resumes from.
pub async fn resume_from<'e>(
    db: impl PgExecutor<'e>,
    id: i64,
    from: &Run,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE reconciliation_runs SET resumed_from = $2, cursor = $3 WHERE id = $1")
        .bind(id)
        .bind(from.id)
        .bind(from.cursor.as_deref())
        .execute(db)
        .await?;
    Ok(())
}

/// The run to resume: the newest real (not dry) run, if it failed before its listing was
/// complete and got past its first page.
pub async fn resumable<'e>(db: impl PgExecutor<'e>) -> Result<Option<Run>, sqlx::Error> {
    let newest: Option<Run> = sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM reconciliation_runs WHERE NOT dry_run AND status <> 'running'
         ORDER BY id DESC LIMIT 1"
    ))
    .fetch_optional(db)
    .await?;
    Ok(newest.filter(|r| r.status == "failed" && !r.listing_complete && r.cursor.is_some()))
}

/// Records progress: the page cursor and the counts so far.
pub async fn progress<'e>(
    db: impl PgExecutor<'e>,
    id: i64,
    cursor: Option<&str>,
    listing_complete: bool,
    counts: &Counts,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE reconciliation_runs SET cursor = $2, listing_complete = $3,
             subscriptions_listed = $4, organizations_checked = $5, drifted = $6, healed = $7,
             orphans = $8, unlinked = $9, errors = $10, events_backfilled = $11
         WHERE id = $1",
    )
    .bind(id)
    .bind(cursor)
    .bind(listing_complete)
    .bind(counts.subscriptions_listed)
    .bind(counts.organizations_checked)
    .bind(counts.drifted)
    .bind(counts.healed)
    .bind(counts.orphans)
    .bind(counts.unlinked)
    .bind(counts.errors)
    .bind(counts.events_backfilled)
    .execute(db)
    .await?;
    Ok(())
}

/// Ends a run: `succeeded` or `failed` with its error, and its report.
pub async fn finish<'e>(
    db: impl PgExecutor<'e>,
    id: i64,
    status: &str,
    error: Option<&str>,
    report: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE reconciliation_runs SET status = $2, error = $3, report = $4,
             finished_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(error)
    .bind(report)
    .execute(db)
    .await?;
    Ok(())
}

/// The newest runs first.
pub async fn history<'e>(db: impl PgExecutor<'e>, limit: i64) -> Result<Vec<Run>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM reconciliation_runs ORDER BY id DESC LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(db)
    .await
}

/// When the newest successful real run finished.
pub async fn last_success<'e>(
    db: impl PgExecutor<'e>,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT max(finished_at) FROM reconciliation_runs
         WHERE status = 'succeeded' AND NOT dry_run",
    )
    .fetch_one(db)
    .await
}
