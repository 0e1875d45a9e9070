//! `billing_audit`: one row per decision taken on an event, append-only.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;

use crate::billing::PlanStatus;

/// What was decided about an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The event's change was applied (it was newer).
    Applied,
    /// The event was older than the stored state: nothing changed.
    Stale,
    /// Same second as the stored state; settled by the deterministic tie rule.
    Tie,
    /// Same second; settled by fetching the subscription from Stripe.
    Refetched,
    /// The organization could not be resolved yet; the event waits for its link.
    Deferred,
    /// Not about billing state, or cannot change it.
    Ignored,
    /// The event had already been processed.
    Duplicate,
    /// Given up: failed too often, failed permanently, or waited too long for its
    /// organization. The inbox row is a dead letter an operator can replay.
    Dead,
    /// Not an event: a reconciliation set the subscription to what Stripe's API showed
    /// (`event_id` names the run, `reconcile_run_<id>`).
    Reconciled,
}

impl Decision {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Applied => "applied",
            Decision::Stale => "stale",
            Decision::Tie => "tie",
            Decision::Refetched => "refetched",
            Decision::Deferred => "deferred",
            Decision::Ignored => "ignored",
            Decision::Duplicate => "duplicate",
            Decision::Dead => "dead",
            Decision::Reconciled => "reconciled",
        }
    }
}

/// A row to write.
#[derive(Debug, Clone)]
pub struct NewAuditEntry<'a> {
    /// Stripe event id.
    pub event_id: &'a str,
    /// Stripe event type.
    pub event_type: &'a str,
    /// The organization concerned, when resolved.
    pub organization_id: Option<&'a str>,
    /// The subscription the event is about, if any.
    pub subscription_id: Option<&'a str>,
    /// The decision.
    pub decision: Decision,
    /// Plan status before.
    pub status_before: Option<PlanStatus>,
    /// Plan status after.
    pub status_after: Option<PlanStatus>,
    /// Why, in words.
    pub detail: Option<&'a str>,
}

/// Appends decisions, in one statement and in the order given.
pub async fn insert<'e, 'a>(
    db: impl PgExecutor<'e>,
    entries: &[NewAuditEntry<'a>],
) -> Result<(), sqlx::Error> {
    let text = |f: fn(&NewAuditEntry<'a>) -> Option<&'a str>| -> Vec<Option<&'a str>> {
        entries.iter().map(f).collect()
    };
    let status = |f: fn(&NewAuditEntry<'a>) -> Option<PlanStatus>| -> Vec<Option<PlanStatus>> {
        entries.iter().map(f).collect()
    };
    sqlx::query(
        "INSERT INTO billing_audit
            (event_id, event_type, organization_id, decision, status_before, status_after, detail,
             subscription_id)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                              $5::plan_status[], $6::plan_status[], $7::text[], $8::text[])",
    )
    .bind(text(|e| Some(e.event_id)))
    .bind(text(|e| Some(e.event_type)))
    .bind(text(|e| e.organization_id))
    .bind(text(|e| Some(e.decision.as_str())))
    .bind(status(|e| e.status_before))
    .bind(status(|e| e.status_after))
    .bind(text(|e| e.detail))
    .bind(text(|e| e.subscription_id))
    .execute(db)
    .await?;
    Ok(())
}

/// A stored decision.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct AuditRow {
    /// Stripe event id.
    pub event_id: String,
    /// Stripe event type.
    pub event_type: String,
    /// The organization concerned.
    pub organization_id: Option<String>,
    /// The subscription concerned.
    pub subscription_id: Option<String>,
    /// `applied`, `stale`, …
    pub decision: String,
    /// Plan status before.
    pub status_before: Option<PlanStatus>,
    /// Plan status after.
    pub status_after: Option<PlanStatus>,
    /// Why, in words.
    pub detail: Option<String>,
    /// When the decision was taken.
    pub created_at: DateTime<Utc>,
}

/// Every decision taken on one event, oldest first.
pub async fn for_event<'e>(
    db: impl PgExecutor<'e>,
    event_id: &str,
) -> Result<Vec<AuditRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, event_type, organization_id, subscription_id, decision, status_before,
                status_after, detail, created_at
         FROM billing_audit WHERE event_id = $1 ORDER BY id",
    )
    .bind(event_id)
    .fetch_all(db)
    .await
}
