//! Healing one subscription: comparing what Stripe's API showed with what is stored, and
//! setting it right in one transaction that takes the apply transactions' locks in their order
//! (customer link, organization row, subscription row), so it never races an event.

use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::billing::PlanStatus;
use shared::billing::payment::RefundPolicy;
use shared::billing::subscription::{Snapshot, Stamp, SubscriptionChange, SubscriptionState};
use shared::db::billing_audit::{self, Decision, NewAuditEntry};
use shared::stripe::{BillingChange, Interpretation};
use sqlx::PgPool;

use crate::apply::batch::Locked;

/// One field that differs: what is stored, what Stripe shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The field.
    pub field: &'static str,
    /// Stored.
    pub stored: String,
    /// Stripe's.
    pub stripe: String,
}

/// The fields of `stored` (`None`: not stored at all, so its status `none` differs) that
/// differ from Stripe's `snapshot`.
pub fn differences(stored: Option<&SubscriptionState>, snapshot: &Snapshot) -> Vec<Change> {
    fn text<T: std::fmt::Debug>(value: &Option<T>) -> String {
        value
            .as_ref()
            .map_or("null".to_owned(), |v| format!("{v:?}"))
    }
    let time = |t: &Option<DateTime<Utc>>| text(&t.map(|t| t.to_rfc3339()));
    let blank = SubscriptionState::blank("", "", None);
    let stored_details = stored.map_or(&blank.snapshot, |s| &s.snapshot);
    let fields = [
        (
            "status",
            stored_details.status.to_string(),
            snapshot.status.to_string(),
        ),
        ("plan", text(&stored_details.plan), text(&snapshot.plan)),
        (
            "cancel_at_period_end",
            stored_details.cancel_at_period_end.to_string(),
            snapshot.cancel_at_period_end.to_string(),
        ),
        (
            "cancel_at",
            time(&stored_details.cancel_at),
            time(&snapshot.cancel_at),
        ),
        (
            "current_period_end",
            time(&stored_details.current_period_end),
            time(&snapshot.current_period_end),
        ),
    ];
    fields
        .into_iter()
        .filter(|(_, stored, stripe)| stored != stripe)
        .map(|(field, stored, stripe)| Change {
            field,
            stored,
            stripe,
        })
        .collect()
}

/// What healing did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healed {
    /// The subscription took Stripe's state; the organization's status went from → to.
    Set {
        /// Before.
        before: PlanStatus,
        /// After.
        after: PlanStatus,
    },
    /// Left alone, and why.
    Skipped(&'static str),
}

/// What to heal: a subscription as Stripe showed it, fetched at `fetched_at`.
pub struct Target<'a> {
    /// The organization it belongs to.
    pub organization_id: &'a str,
    /// Its customer.
    pub customer_id: &'a str,
    /// `sub_…`
    pub subscription_id: &'a str,
    /// What Stripe showed.
    pub snapshot: &'a Snapshot,
    /// When the page holding it was requested (whole seconds).
    pub fetched_at: DateTime<Utc>,
}

/// Sets the subscription to Stripe's state, unless an event as new as the fetch has been
/// applied since (its state is newer than the fetch); records a `reconciled` audit row.
pub async fn heal(pool: &PgPool, run_id: i64, target: &Target<'_>) -> Result<Healed, sqlx::Error> {
    let marker = format!("reconcile_run_{run_id}");
    let facts = Interpretation {
        organization_id: Some(target.organization_id.to_owned()),
        customer_id: Some(target.customer_id.to_owned()),
        link: None,
        change: Some(BillingChange::Subscription {
            subscription_id: target.subscription_id.to_owned(),
            change: SubscriptionChange::Snapshot(target.snapshot.clone()),
        }),
    };
    let mut tx = pool.begin().await?;
    // The default refund policy gives the same result as the configured one here: an
    // organization whose purchases grant lifetime access under the configured policy has
    // `lifetime_event_id` set and is left alone below; one that has none holds no purchase
    // that would grant (or have granted and lost) access under either policy.
    let mut locked = Locked::take(&mut tx, &[&facts], RefundPolicy::default()).await?;
    let Some(at) = locked.find(|org| org.id == target.organization_id) else {
        return Ok(Healed::Skipped("the organization could not be locked"));
    };
    if locked.orgs[at].has_lifetime() {
        return Ok(Healed::Skipped("lifetime access: left alone"));
    }
    let current = locked
        .subscription(target.subscription_id)
        .cloned()
        .unwrap_or_else(|| {
            SubscriptionState::blank(
                target.subscription_id,
                target.organization_id,
                Some(target.customer_id),
            )
        });
    if current
        .status_event_created
        .is_some_and(|applied| applied >= target.fetched_at)
    {
        return Ok(Healed::Skipped(
            "an event as new as the fetch was applied since it began",
        ));
    }
    let changes = differences(Some(&current), target.snapshot);
    if changes.is_empty() {
        return Ok(Healed::Skipped(
            "an event applied since the fetch set it right",
        ));
    }
    let stamp = Stamp {
        id: &marker,
        created: target.fetched_at,
    };
    let before = locked.orgs[at].plan_status;
    let mut next = current.reconciled(target.snapshot, stamp);
    next.organization_id = target.organization_id.to_owned();
    locked.put_subscription(next);
    locked.rederive(at, stamp);
    let unowned = locked.find(|org| org.stripe_customer_id.as_deref() == Some(target.customer_id));
    if locked.orgs[at].stripe_customer_id.is_none() && unowned.is_none() {
        locked.edit(at).stripe_customer_id = Some(target.customer_id.to_owned());
    }
    let after = locked.orgs[at].plan_status;
    locked.save(&mut tx).await?;
    let detail = changes
        .iter()
        .map(|c| format!("{}: {} -> {}", c.field, c.stored, c.stripe))
        .collect::<Vec<_>>()
        .join("; ");
    billing_audit::insert(
        &mut *tx,
        &[NewAuditEntry {
            event_id: &marker,
            event_type: "reconciliation",
            organization_id: Some(target.organization_id),
            subscription_id: Some(target.subscription_id),
            decision: Decision::Reconciled,
            status_before: Some(before),
            status_after: Some(after),
            detail: Some(&detail),
        }],
    )
    .await?;
    tx.commit().await?;
    Ok(Healed::Set { before, after })
}
