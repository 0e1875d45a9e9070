//! Dead usage reports in the operators' dead-letter commands: a meter event Stripe refused
//! for good (unknown meter, deleted customer) or whose organization never got a customer.
//! Its id is the report's identifier (`usage_…`); a replay sends it again, now, with the same
//! identifier and records.

use chrono::{DateTime, Utc};
use shared::db::usage;
use sqlx::PgPool;

use super::{DeadLetter, OpsError, ReplayResult};
use crate::usage::{Outcome, UsageDeps};

/// The `type` of dead usage reports in dead-letter listings (`--type` selects them).
pub const USAGE_TYPE: &str = "usage.meter_event";

/// Dead reports as dead letters, newest first.
pub async fn list(
    pool: &PgPool,
    since: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<DeadLetter>, OpsError> {
    let reports = usage::list_dead(pool, since, limit).await?;
    Ok(reports
        .into_iter()
        .map(|report| DeadLetter {
            kind: "usage",
            id: report.identifier,
            letter_type: USAGE_TYPE.to_owned(),
            at: report.died_at,
            attempts: report.attempts,
            deferrals: 0,
            last_error: report.last_error,
        })
        .collect())
}

/// Sends a dead report again (with a fresh attempt count); with `dry_run`, says what would be
/// sent.
pub async fn replay(
    deps: &UsageDeps,
    identifier: &str,
    dry_run: bool,
) -> Result<ReplayResult, OpsError> {
    let result = |decision: &str, organization_id: Option<String>, detail: String| ReplayResult {
        kind: "usage",
        id: identifier.to_owned(),
        decision: decision.to_owned(),
        organization_id,
        status_before: None,
        status_after: None,
        detail: Some(detail),
        dry_run,
    };
    let dead = usage::list_dead(&deps.pool, None, i64::MAX).await?;
    let Some(report) = dead.into_iter().find(|r| r.identifier == identifier) else {
        return Err(OpsError::NotDead {
            id: identifier.to_owned(),
            status: "not a dead usage report".to_owned(),
        });
    };
    if dry_run {
        return Ok(result(
            "would_send",
            Some(report.organization_id),
            format!(
                "{} of {} ({} records)",
                report.value, report.meter, report.records
            ),
        ));
    }
    let report = usage::revive(&deps.pool, identifier)
        .await?
        .ok_or_else(|| OpsError::NotDead {
            id: identifier.to_owned(),
            status: "no longer dead".to_owned(),
        })?;
    let outcome = crate::usage::send(deps, &report)
        .await
        .map_err(|e| OpsError::Usage(format!("{e:#}")))?;
    let (decision, detail) = match outcome {
        Outcome::Sent => (
            "sent",
            format!("{} of {} reported", report.value, report.meter),
        ),
        Outcome::Retry => (
            "retry_scheduled",
            "Stripe failed again; retried later".to_owned(),
        ),
        Outcome::Dead => ("dead", "Stripe refused it again".to_owned()),
    };
    Ok(result(decision, Some(report.organization_id), detail))
}
