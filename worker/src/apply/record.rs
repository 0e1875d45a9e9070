//! Writing what was decided: the inbox statuses of events not decided after all (deferred on
//! their sparse re-check schedule, or dead at the end of their window), released deferrals,
//! the audit rows; and, in a transaction of its own, a failed attempt.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::db::billing_audit::{self, Decision, NewAuditEntry};
use shared::db::webhook_events::{Deferral, StoredEvent};
use shared::db::{foreign_customers, webhook_events};
use sqlx::{Postgres, Transaction};

use super::decide::Verdict;
use super::{ApplyError, Deps, Policy};

/// A deferral past the policy's window becomes a dead letter. A dead letter being replayed
/// starts a fresh window.
pub(super) fn within_deferral_window(
    mut verdict: Verdict,
    stored: &StoredEvent,
    policy: &Policy,
) -> Verdict {
    let deferred_since = stored.deferred_since.filter(|_| stored.status != "dead");
    if verdict.decision == Decision::Deferred
        && let Some(since) = deferred_since
        && Utc::now() - since >= delta(policy.deferral_window)
    {
        verdict.decision = Decision::Dead;
        verdict.detail = Some(format!(
            "{}; gave up after waiting since {since} ({} deferrals)",
            verdict
                .detail
                .as_deref()
                .unwrap_or("organization not resolved"),
            stored.deferrals
        ));
    }
    verdict
}

/// The event was deferred before and its window is still open: deferring it again is a retry,
/// not a new state. (A released event keeps `deferred_since`, so it counts as waiting too; a
/// dead letter being replayed does not.)
fn still_waiting(stored: &StoredEvent) -> bool {
    stored.deferred_since.is_some() && stored.status != "dead"
}

/// When a deferred event is checked again: on the sparse deferral schedule, but never after
/// the end of its window, so it becomes a dead letter on time.
fn next_deferral_check(stored: &StoredEvent, policy: &Policy) -> DateTime<Utc> {
    let since = stored
        .deferred_since
        .filter(|_| still_waiting(stored))
        .unwrap_or_else(Utc::now);
    let window_end = since + delta(policy.deferral_window);
    after(policy.deferral_recheck.delay(stored.deferrals as u32 + 1)).min(window_end)
}

/// Writes the decisions: inbox statuses, released deferrals and audit rows. Returns the ids of
/// the deferred events released by new links, to enqueue after commit.
pub(super) async fn record(
    tx: &mut Transaction<'static, Postgres>,
    policy: &Policy,
    settled: &[(usize, &StoredEvent, Verdict)],
    claimed: &HashSet<&str>,
) -> Result<Vec<String>, sqlx::Error> {
    let (mut processed, mut deferred, mut dead) = (Vec::new(), Vec::new(), Vec::new());
    for (_, stored, verdict) in settled {
        let id = stored.id.as_str();
        let detail = verdict.detail.as_deref();
        if verdict.refetch.is_some() {
            // Undecided: the claim goes, so the event is applied again after the refetch.
            webhook_events::unclaim(&mut **tx, stored).await?;
            continue;
        }
        match verdict.decision {
            Decision::Duplicate => {}
            Decision::Deferred => deferred.push(Deferral {
                id,
                customer_id: verdict.waiting_for_customer.as_deref(),
                reason: detail.unwrap_or("organization not resolved yet"),
                retry_at: next_deferral_check(stored, policy),
            }),
            Decision::Dead => dead.push((id, detail.unwrap_or("gave up"))),
            // Claimed events are marked processed by their claim; a forced replay's are not.
            _ if !claimed.contains(id) => processed.push(id),
            _ => {}
        }
    }
    webhook_events::mark_deferred(&mut **tx, &deferred).await?;
    webhook_events::mark_claimed_dead(&mut **tx, &dead).await?;
    if !processed.is_empty() {
        webhook_events::mark_processed(&mut **tx, &processed).await?;
    }
    // After the deferrals above: an event deferred earlier in this batch is released too.
    let linked: Vec<&str> = settled
        .iter()
        .filter_map(|(_, _, verdict)| verdict.linked_customer.as_deref())
        .collect();
    let released = if linked.is_empty() {
        Vec::new()
    } else {
        // A customer linked after all no longer counts as belonging to no organization.
        foreign_customers::clear(&mut **tx, &linked).await?;
        webhook_events::release_deferred(&mut **tx, &linked).await?
    };
    // A deferral is audited once, when the event starts waiting: a check that finds it still
    // waiting only counts in its `deferrals` (a retry is not a change of state).
    let entries: Vec<NewAuditEntry<'_>> = settled
        .iter()
        .filter(|(_, stored, verdict)| {
            verdict.refetch.is_none()
                && !(verdict.decision == Decision::Deferred && still_waiting(stored))
        })
        .map(|(_, stored, verdict)| NewAuditEntry {
            event_id: &stored.id,
            event_type: &stored.event_type,
            organization_id: verdict.organization_id.as_deref(),
            subscription_id: verdict.subscription_id.as_deref(),
            decision: verdict.decision,
            status_before: verdict.status_before,
            status_after: verdict.status_after,
            detail: verdict.detail.as_deref(),
        })
        .collect();
    billing_audit::insert(&mut **tx, &entries).await?;
    Ok(released)
}

/// What happened after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureOutcome {
    /// The event stays pending and is due again then.
    RetryAt(DateTime<Utc>),
    /// The event is a dead letter now.
    Dead,
}

/// Records a failed attempt in one transaction: the attempt count and error, then either the
/// next attempt time (transient, under the limit) or a dead letter with an audit row.
pub async fn record_failure(
    deps: &Deps,
    event_id: &str,
    error: &ApplyError,
) -> Result<FailureOutcome, sqlx::Error> {
    let message = error.to_string();
    let mut tx = deps.pool.begin().await?;
    let Some(attempts) = webhook_events::record_failure(&mut *tx, event_id, &message).await? else {
        // Not in the inbox: nothing to retry and nothing to keep.
        return Ok(FailureOutcome::Dead);
    };
    let outcome = if error.is_transient() && attempts < deps.policy.max_attempts {
        let at = after(deps.policy.retry.delay(attempts as u32));
        webhook_events::schedule_retry(&mut *tx, event_id, at).await?;
        FailureOutcome::RetryAt(at)
    } else {
        let reason = format!("{message} (after {attempts} attempts)");
        if let Some(event_type) = webhook_events::mark_dead(&mut *tx, event_id, &reason).await? {
            billing_audit::insert(
                &mut *tx,
                &[NewAuditEntry {
                    event_id,
                    event_type: &event_type,
                    organization_id: None,
                    subscription_id: None,
                    decision: Decision::Dead,
                    status_before: None,
                    status_after: None,
                    detail: Some(&reason),
                }],
            )
            .await?;
        }
        FailureOutcome::Dead
    };
    tx.commit().await?;
    Ok(outcome)
}

/// `now + delay`.
fn after(delay: Duration) -> DateTime<Utc> {
    Utc::now() + delta(delay)
}

/// A std duration as a chrono one, saturating (configured durations are far below the limit).
fn delta(duration: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(duration).unwrap_or(chrono::TimeDelta::MAX)
}
