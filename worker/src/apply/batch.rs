//! The rows one apply transaction works on: the organizations, subscriptions and payments its
//! events concern, locked for the whole transaction and changed in memory, then written back,
//! the changed ones only, a statement per table.
//!
//! Lock order, the same in every transaction: customer-link locks, payment-key locks,
//! organization rows, subscription rows, payment rows, each kind in sorted order, so
//! concurrent batches never deadlock. The payments of every locked organization are locked
//! too: its lifetime access is derived from them whenever it is derived again.

use shared::billing::organization;
use shared::billing::payment::{self, Lifetime, PaymentFacts, PaymentState, RefundPolicy};
use shared::billing::subscription::{Stamp, SubscriptionState};
use shared::db::foreign_customers::{self, ForeignCustomer};
use shared::db::organizations::{self, Organization};
use shared::db::{payments, subscriptions};
use shared::stripe::Interpretation as Facts;
use sqlx::{Postgres, Transaction};

/// The locked rows of a batch.
pub(crate) struct Locked {
    pub(crate) orgs: Vec<Organization>,
    orgs_changed: Vec<bool>,
    subscriptions: Vec<SubscriptionState>,
    subscriptions_changed: Vec<bool>,
    payments: Vec<PaymentState>,
    payments_changed: Vec<bool>,
    /// The events' customers that are linked to no organization and that Stripe says belong
    /// to none.
    foreign: Vec<ForeignCustomer>,
    refunds: RefundPolicy,
}

impl Locked {
    /// Locks the customer links and payment keys the events name, creates the organizations
    /// they name, locks those, the ones linked to their customers and the ones owning their
    /// payments, then the subscriptions of all of them and the ones the events name, then
    /// their payments and the ones the events name. `refunds` decides whether a refunded
    /// purchase still grants lifetime access.
    pub(crate) async fn take(
        tx: &mut Transaction<'static, Postgres>,
        facts: &[&Facts],
        refunds: RefundPolicy,
    ) -> Result<Locked, sqlx::Error> {
        let sorted = |field: fn(&Facts) -> Option<&str>| -> Vec<&str> {
            let mut values: Vec<&str> = facts.iter().filter_map(|f| field(f)).collect();
            values.sort_unstable();
            values.dedup();
            values
        };
        let customers = sorted(|f| f.customer_id.as_deref());
        let ids = sorted(|f| f.organization_id.as_deref());
        let subscription_ids = sorted(|f| f.change.as_ref()?.subscription_id());
        let mut payment_keys: Vec<&str> = facts
            .iter()
            .filter_map(|f| f.change.as_ref()?.payment())
            .flat_map(|p| {
                [
                    p.checkout_session_id.as_deref(),
                    p.payment_intent_id.as_deref(),
                ]
            })
            .flatten()
            .collect();
        payment_keys.sort_unstable();
        payment_keys.dedup();
        if !customers.is_empty() {
            organizations::lock_customer_links(&mut **tx, &customers).await?;
        }
        let mut owners = Vec::new();
        if !payment_keys.is_empty() {
            payments::lock_keys(&mut **tx, &payment_keys).await?;
            // Stable from here: every writer of these payments holds their key locks.
            owners = payments::owners(&mut **tx, &payment_keys).await?;
        }
        if !ids.is_empty() {
            organizations::ensure_exist(&mut **tx, &ids).await?;
        }
        let mut lock_ids: Vec<&str> = ids
            .iter()
            .copied()
            .chain(owners.iter().map(String::as_str))
            .collect();
        lock_ids.sort_unstable();
        lock_ids.dedup();
        let orgs = if lock_ids.is_empty() && customers.is_empty() {
            Vec::new()
        } else {
            organizations::lock(&mut **tx, &lock_ids, &customers).await?
        };
        let org_ids: Vec<&str> = orgs.iter().map(|o| o.id.as_str()).collect();
        let unlinked: Vec<&str> = customers
            .iter()
            .copied()
            .filter(|c| {
                !orgs
                    .iter()
                    .any(|o| o.stripe_customer_id.as_deref() == Some(*c))
            })
            .collect();
        let foreign = if unlinked.is_empty() {
            Vec::new()
        } else {
            foreign_customers::find(&mut **tx, &unlinked).await?
        };
        // A payment event derives its organization again too, and a revoked lifetime grant
        // leaves the subscriptions to decide.
        let subscriptions = if subscription_ids.is_empty() && payment_keys.is_empty() {
            Vec::new()
        } else {
            subscriptions::lock(&mut **tx, &org_ids, &subscription_ids).await?
        };
        let payments = if org_ids.is_empty() && payment_keys.is_empty() {
            Vec::new()
        } else {
            payments::lock(&mut **tx, &org_ids, &payment_keys).await?
        };
        Ok(Locked {
            orgs_changed: vec![false; orgs.len()],
            orgs,
            subscriptions_changed: vec![false; subscriptions.len()],
            subscriptions,
            payments_changed: vec![false; payments.len()],
            payments,
            foreign,
            refunds,
        })
    }

    /// The stored payment an event's facts are about (by either of its ids).
    pub(crate) fn payment(&self, facts: &PaymentFacts) -> Option<&PaymentState> {
        let names = |p: &PaymentState, id: &Option<String>| {
            id.as_ref().is_some_and(|id| {
                p.id == *id
                    || p.payment_intent_id.as_ref() == Some(id)
                    || p.checkout_session_id.as_ref() == Some(id)
            })
        };
        self.payments
            .iter()
            .find(|p| names(p, &facts.payment_intent_id) || names(p, &facts.checkout_session_id))
    }

    /// Replaces (or adds) a payment's state.
    pub(crate) fn put_payment(&mut self, next: PaymentState) {
        match self.payments.iter().position(|p| p.id == next.id) {
            Some(at) => {
                self.payments[at] = next;
                self.payments_changed[at] = true;
            }
            None => {
                self.payments.push(next);
                self.payments_changed.push(true);
            }
        }
    }

    /// The lifetime access the organization's payments give.
    pub(crate) fn lifetime(&self, at: usize) -> Lifetime {
        let org = &self.orgs[at];
        let own: Vec<&PaymentState> = self
            .payments
            .iter()
            .filter(|p| p.organization_id.as_ref() == Some(&org.id))
            .collect();
        payment::lifetime(&own, self.refunds)
    }

    /// Why the customer belongs to no organization, when Stripe said it does not.
    pub(crate) fn foreign(&self, customer_id: &str) -> Option<&ForeignCustomer> {
        self.foreign.iter().find(|f| f.customer_id == customer_id)
    }

    pub(crate) fn find(&self, matches: impl Fn(&Organization) -> bool) -> Option<usize> {
        self.orgs.iter().position(matches)
    }

    /// The organization, to change.
    pub(crate) fn edit(&mut self, at: usize) -> &mut Organization {
        self.orgs_changed[at] = true;
        &mut self.orgs[at]
    }

    /// The stored subscription.
    pub(crate) fn subscription(&self, id: &str) -> Option<&SubscriptionState> {
        self.subscriptions.iter().find(|s| s.id == id)
    }

    /// Replaces (or adds) a subscription's state.
    pub(crate) fn put_subscription(&mut self, next: SubscriptionState) {
        match self.subscriptions.iter().position(|s| s.id == next.id) {
            Some(at) => {
                self.subscriptions[at] = next;
                self.subscriptions_changed[at] = true;
            }
            None => {
                self.subscriptions.push(next);
                self.subscriptions_changed.push(true);
            }
        }
    }

    /// Derives the organization's state again from its subscriptions and payments, and keeps
    /// `lifetime_event_id` / `lifetime_granted_at` on the granting payment (cleared when no
    /// payment grants lifetime access); returns whether anything changed.
    pub(crate) fn rederive(&mut self, at: usize, event: Stamp<'_>) -> bool {
        let lifetime = self.lifetime(at);
        let org = &self.orgs[at];
        let own: Vec<&SubscriptionState> = self
            .subscriptions
            .iter()
            .filter(|s| s.organization_id == org.id)
            .collect();
        let state = organization::derive(&own, &lifetime);
        let (event_id, granted_at) = match lifetime {
            Lifetime::Granted { event_id, at } => (Some(event_id), Some(at)),
            Lifetime::Revoked { .. } | Lifetime::None => (None, None),
        };
        let org = &mut self.orgs[at];
        let mut changed =
            org.lifetime_event_id != event_id || org.lifetime_granted_at != granted_at;
        org.lifetime_event_id = event_id;
        org.lifetime_granted_at = granted_at;
        changed |= org.set_derived(state, event);
        self.orgs_changed[at] |= changed;
        changed
    }

    /// Writes the changed rows.
    pub(crate) async fn save(
        &self,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), sqlx::Error> {
        let orgs = changed(&self.orgs, &self.orgs_changed);
        if !orgs.is_empty() {
            organizations::save(&mut **tx, &orgs).await?;
        }
        let subs: Vec<&SubscriptionState> =
            changed(&self.subscriptions, &self.subscriptions_changed)
                .into_iter()
                .filter(|s| !s.is_blank())
                .collect();
        if !subs.is_empty() {
            subscriptions::save(&mut **tx, &subs).await?;
        }
        let pays: Vec<&PaymentState> = changed(&self.payments, &self.payments_changed)
            .into_iter()
            .filter(|p| !p.is_blank())
            .collect();
        if !pays.is_empty() {
            payments::save(&mut **tx, &pays).await?;
        }
        Ok(())
    }
}

fn changed<'a, T>(rows: &'a [T], flags: &[bool]) -> Vec<&'a T> {
    rows.iter()
        .zip(flags)
        .filter_map(|(row, changed)| changed.then_some(row))
        .collect()
}
