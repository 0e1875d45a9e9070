//! Deciding one event on the batch's locked rows, in memory and without I/O: resolve the
//! organization, record the customer link, rule on the subscription the event is about
//! (`shared::billing::subscription`), and derive the organization's state again.

use std::collections::HashMap;

use shared::billing::subscription::{self, Settled, Snapshot, Stamp, SubscriptionState};
use shared::billing::{Precedence, precedence};
use shared::db::billing_audit::Decision;
use shared::db::webhook_events::StoredEvent;
use shared::stripe::{BillingChange, CheckoutLink, Interpretation as Facts};

use super::ApplyError;
use super::batch::Locked;

/// One decision, before it is written.
pub(super) struct Verdict {
    pub(super) decision: Decision,
    pub(super) organization_id: Option<String>,
    pub(super) subscription_id: Option<String>,
    pub(super) status_before: Option<shared::billing::PlanStatus>,
    pub(super) status_after: Option<shared::billing::PlanStatus>,
    pub(super) detail: Option<String>,
    /// Deferred: the customer whose link the event waits for.
    pub(super) waiting_for_customer: Option<String>,
    /// A customer linked by this event: its deferred events are released.
    pub(super) linked_customer: Option<String>,
    /// The event ties its subscription's status and the Stripe API can settle it: it is left
    /// undecided in this transaction, applied again once the subscription is fetched.
    pub(super) refetch: Option<String>,
}

impl Verdict {
    pub(super) fn bare(decision: Decision, detail: impl Into<String>) -> Verdict {
        Verdict {
            decision,
            organization_id: None,
            subscription_id: None,
            status_before: None,
            status_after: None,
            detail: Some(detail.into()),
            waiting_for_customer: None,
            linked_customer: None,
            refetch: None,
        }
    }
}

/// Subscriptions fetched from Stripe to settle ties, by id.
pub(super) type Refetched = HashMap<String, Snapshot>;

/// How ties are settled in this run.
pub(super) struct Ties<'a> {
    /// The Stripe API is configured: a tie not yet refetched is postponed to be refetched.
    pub(super) can_refetch: bool,
    /// What was fetched.
    pub(super) refetched: &'a Refetched,
}

/// Everything between the claim and the writes of the inbox status and audit row.
pub(super) fn decide(
    locked: &mut Locked,
    stored: &StoredEvent,
    facts: Facts,
    ties: &Ties<'_>,
) -> Result<Verdict, ApplyError> {
    let at = match (&facts.organization_id, &facts.customer_id) {
        (Some(id), _) => locked.find(|org| &org.id == id),
        (None, Some(customer)) => {
            locked.find(|org| org.stripe_customer_id.as_ref() == Some(customer))
        }
        (None, None) => None,
    };
    let Some(at) = at else {
        return Ok(match facts.customer_id {
            Some(customer) => Verdict {
                waiting_for_customer: Some(customer.clone()),
                ..Verdict::bare(
                    Decision::Deferred,
                    format!("no organization is linked to customer {customer} yet"),
                )
            },
            None => Verdict::bare(
                Decision::Ignored,
                "event names neither an organization nor a customer",
            ),
        });
    };

    let linked_customer = match &facts.customer_id {
        Some(customer) => link(locked, at, customer, facts.link.as_ref())?,
        None => None,
    };
    let org = &locked.orgs[at];
    let before = org.plan_status;
    let mut verdict = Verdict {
        organization_id: Some(org.id.clone()),
        status_before: Some(before),
        status_after: Some(before),
        linked_customer,
        ..Verdict::bare(Decision::Applied, "")
    };
    let (decision, detail) = match facts.change {
        None => (
            Decision::Applied,
            Some(match &verdict.linked_customer {
                Some(customer) => format!("linked customer {customer}"),
                None => "nothing to change".to_owned(),
            }),
        ),
        Some(BillingChange::LifetimePurchase) => match &org.lifetime_event_id {
            Some(granted_by) => (
                Decision::Ignored,
                Some(format!(
                    "lifetime access was already granted by {granted_by}"
                )),
            ),
            None => {
                let org = locked.edit(at);
                org.lifetime_event_id = Some(stored.id.clone());
                org.lifetime_granted_at = Some(stored.stripe_created);
                locked.rederive(at, stamp(stored));
                (Decision::Applied, None)
            }
        },
        Some(BillingChange::Subscription {
            subscription_id,
            change,
        }) => {
            verdict.subscription_id = Some(subscription_id.clone());
            let org_id = locked.orgs[at].id.clone();
            let mut current = locked
                .subscription(&subscription_id)
                .cloned()
                .unwrap_or_else(|| {
                    SubscriptionState::blank(
                        &subscription_id,
                        &org_id,
                        facts.customer_id.as_deref(),
                    )
                });
            let ties_now =
                precedence(stored.stripe_created, current.status_event_created) == Precedence::Tie;
            let refetched = ties.refetched.get(&subscription_id);
            if ties_now && ties.can_refetch && refetched.is_none() {
                verdict.refetch = Some(subscription_id);
                return Ok(verdict);
            }
            // The event's organization owns the subscription (it moves if Stripe's metadata
            // now names another one).
            let previous_owner = std::mem::replace(&mut current.organization_id, org_id);
            let ruling = subscription::rule(&current, &change, stamp(stored), refetched);
            if let Some(next) = ruling.next {
                locked.put_subscription(next);
                locked.rederive(at, stamp(stored));
                if let Some(previous) = locked.find(|org| org.id == previous_owner) {
                    locked.rederive(previous, stamp(stored));
                }
            }
            let decision = match (ruling.settled, ruling.reason) {
                (Settled::Newer, None) => Decision::Applied,
                (Settled::Newer, Some(_)) => Decision::Ignored,
                (Settled::Stale, _) => Decision::Stale,
                (Settled::Tie, _) => Decision::Tie,
                (Settled::Refetched, _) => Decision::Refetched,
            };
            (decision, ruling.reason.map(str::to_owned))
        }
    };
    verdict.decision = decision;
    verdict.detail = detail;
    verdict.status_after = Some(locked.orgs[at].plan_status);
    Ok(verdict)
}

fn stamp(stored: &StoredEvent) -> Stamp<'_> {
    Stamp {
        id: &stored.id,
        created: stored.stripe_created,
    }
}

/// Links the customer to the organization when the event says so. A checkout links
/// explicitly (a customer owned by another organization is an error); any other event links
/// only an organization that has no customer yet. Returns the customer newly linked.
fn link(
    locked: &mut Locked,
    at: usize,
    customer_id: &str,
    checkout: Option<&CheckoutLink>,
) -> Result<Option<String>, ApplyError> {
    let org = &locked.orgs[at];
    let already_linked = org.stripe_customer_id.as_deref() == Some(customer_id);
    if checkout.is_none() && org.stripe_customer_id.is_some() {
        return Ok(None);
    }
    if !already_linked
        && let Some(owner) =
            locked.find(|other| other.stripe_customer_id.as_deref() == Some(customer_id))
    {
        if checkout.is_none() {
            return Ok(None);
        }
        return Err(ApplyError::CustomerConflict {
            customer_id: customer_id.to_owned(),
            owner: locked.orgs[owner].id.clone(),
            organization_id: org.id.clone(),
        });
    }
    let org = locked.edit(at);
    org.stripe_customer_id = Some(customer_id.to_owned());
    if let Some(checkout) = checkout
        && checkout.billing_email.is_some()
    {
        org.billing_email = checkout.billing_email.clone();
    }
    Ok((!already_linked).then(|| customer_id.to_owned()))
}
