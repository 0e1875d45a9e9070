//! Deciding one event on the batch's locked rows, in memory and without I/O: resolve the
//! organization, record the customer link, rule on the subscription or payment the event is
//! about (`shared::billing::subscription`, `shared::billing::payment`), and derive the
//! organization's state again.
//!
//! A payment event whose organization cannot be resolved (no metadata, no linked customer, no
//! stored payment naming one: a refund delivered before its checkout) is not deferred: its
//! facts are kept on the payment's row, without an organization, and the checkout that
//! completes later claims the row and derives the organization from everything known.

use std::collections::HashMap;

use shared::billing::payment::{self, PaymentFacts, PaymentState, PaymentStatus};
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
    /// The payment's new status, when the event changed it (counted after commit).
    pub(super) payment_status: Option<PaymentStatus>,
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
            payment_status: None,
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
    let payment_facts = facts.change.as_ref().and_then(|c| c.payment());
    // The organization of the stored payment, the last way to resolve a payment event.
    let payment_owner = payment_facts
        .and_then(|p| locked.payment(p))
        .and_then(|p| p.organization_id.clone());
    let by_owner = |locked: &Locked| -> Result<Option<usize>, ApplyError> {
        match &payment_owner {
            Some(owner) => match locked.find(|org| &org.id == owner) {
                Some(at) => Ok(Some(at)),
                // Its row was claimed after this transaction locked the organizations.
                None => Err(ApplyError::PaymentMoved(owner.clone())),
            },
            None => Ok(None),
        }
    };
    let at = match (&facts.organization_id, &facts.customer_id) {
        (Some(id), _) => locked.find(|org| &org.id == id),
        (None, Some(customer)) => {
            match locked.find(|org| org.stripe_customer_id.as_ref() == Some(customer)) {
                Some(at) => Some(at),
                None => by_owner(locked)?,
            }
        }
        (None, None) => by_owner(locked)?,
    };
    if at.is_none()
        && let Some(payment_facts) = payment_facts
    {
        return Ok(keep_unowned_payment(locked, stored, payment_facts));
    }
    let Some(at) = at else {
        return Ok(match facts.customer_id {
            Some(customer) => unresolved(locked, customer),
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
        Some(BillingChange::Payment(payment_facts)) => {
            let (decision, detail, status) = apply_payment(
                locked,
                at,
                stored,
                &payment_facts,
                facts.customer_id.as_deref(),
            )?;
            verdict.payment_status = status;
            (decision, Some(detail))
        }
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

/// Rules on a payment event of the organization at `at`: the payment's new state, the
/// organization derived again (lifetime granted or revoked by its payments), and the words
/// for the audit row.
fn apply_payment(
    locked: &mut Locked,
    at: usize,
    stored: &StoredEvent,
    facts: &PaymentFacts,
    customer_id: Option<&str>,
) -> Result<(Decision, String, Option<PaymentStatus>), ApplyError> {
    let org_id = locked.orgs[at].id.clone();
    let current = current_payment(locked, facts);
    let ruling = payment::rule(&current, facts, stamp(stored));
    let mut next = ruling.next.clone();
    if next.is_none() && !current.is_blank() && current.organization_id.is_none() {
        // Nothing new about the payment itself, but it now has its organization.
        next = Some(current.clone());
    }
    let owner_at = match current.organization_id.as_ref() {
        Some(owner) => locked
            .find(|org| &org.id == owner)
            .ok_or_else(|| ApplyError::PaymentMoved(owner.clone()))?,
        None => at,
    };
    let granted_before = locked.lifetime(owner_at).is_granted();
    let mut status = None;
    if let Some(mut next) = next {
        // A payment belongs to the first organization named for it.
        if next.organization_id.is_none() {
            next.organization_id = Some(org_id.clone());
        }
        if next.customer_id.is_none() {
            next.customer_id = customer_id.map(str::to_owned);
        }
        if next.status != current.status || current.is_blank() {
            status = Some(next.status);
        }
        locked.put_payment(next);
        locked.rederive(owner_at, stamp(stored));
    }
    let payment = locked
        .payment(facts)
        .cloned()
        .unwrap_or_else(|| current.clone());
    let granted_after = locked.lifetime(owner_at).is_granted();
    let mut detail = format!("payment {} {}", payment.id, payment.status);
    if let Some(reason) = ruling.reason {
        detail = format!("{detail}: {reason}");
    }
    if granted_before && !granted_after {
        detail = format!(
            "{detail}; lifetime access revoked ({})",
            if payment.dispute_status == Some(payment::DisputeStatus::Lost) {
                "dispute lost"
            } else {
                "fully refunded"
            }
        );
    } else if !granted_before && granted_after {
        detail = format!("{detail}; lifetime access granted");
    } else if granted_after && ruling.next.is_some() && payment.status == PaymentStatus::Refunded {
        detail = format!(
            "{detail}; lifetime access kept (another purchase grants it, or \
             REFUND_REVOKES_ACCESS=false)"
        );
    }
    let decision = match ruling.settled {
        payment::Settled::Applied => Decision::Applied,
        payment::Settled::Stale => Decision::Stale,
        payment::Settled::Tie => Decision::Tie,
        payment::Settled::NoChange => Decision::Ignored,
    };
    Ok((decision, detail, status))
}

/// The stored payment the facts name, or a blank one keyed by their payment intent id (else
/// checkout session id).
fn current_payment(locked: &Locked, facts: &PaymentFacts) -> PaymentState {
    locked
        .payment(facts)
        .cloned()
        .unwrap_or_else(|| PaymentState::blank(facts.key().unwrap_or_default()))
}

/// A payment event no organization can be found for: its facts are kept on the payment's row
/// (no organization yet), for the checkout that will claim it.
fn keep_unowned_payment(
    locked: &mut Locked,
    stored: &StoredEvent,
    facts: &PaymentFacts,
) -> Verdict {
    let current = current_payment(locked, facts);
    let ruling = payment::rule(&current, facts, stamp(stored));
    let decision = match (ruling.settled, &ruling.next) {
        (payment::Settled::Stale, _) => Decision::Stale,
        (_, None) => Decision::Ignored,
        (payment::Settled::Tie, Some(_)) => Decision::Tie,
        (_, Some(_)) => Decision::Applied,
    };
    let mut verdict = Verdict::bare(decision, "");
    let id = current.id.clone();
    verdict.detail = Some(match (ruling.next, ruling.reason) {
        (Some(next), _) => {
            verdict.payment_status = Some(next.status);
            let detail = format!(
                "payment {id} {}: kept without an organization until its checkout names one",
                next.status
            );
            locked.put_payment(next);
            detail
        }
        (None, Some(reason)) => format!("payment {id}: {reason}"),
        (None, None) => format!("payment {id}: nothing to change"),
    });
    verdict
}

/// An event of a customer linked to no organization: `ignored` when Stripe said the customer
/// belongs to none, else deferred until its link (or a lookup) resolves it.
fn unresolved(locked: &Locked, customer: String) -> Verdict {
    match locked.foreign(&customer) {
        Some(foreign) => Verdict::bare(
            Decision::Ignored,
            format!(
                "customer {customer} belongs to no organization: {} (Stripe was asked at {})",
                foreign.reason, foreign.checked_at
            ),
        ),
        None => Verdict {
            waiting_for_customer: Some(customer.clone()),
            ..Verdict::bare(
                Decision::Deferred,
                format!("no organization is linked to customer {customer} yet"),
            )
        },
    }
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
