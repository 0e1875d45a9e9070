//! The rows one apply transaction works on: the organizations and subscriptions its events
//! concern, locked for the whole transaction and changed in memory, then written back, the
//! changed ones only, a statement per table.
//!
//! Lock order, the same in every transaction: customer-link locks, organization rows,
//! subscription rows, each kind in sorted order, so concurrent batches never deadlock.

use shared::billing::organization;
use shared::billing::subscription::{Stamp, SubscriptionState};
use shared::db::organizations::{self, Organization};
use shared::db::subscriptions;
use shared::stripe::Interpretation as Facts;
use sqlx::{Postgres, Transaction};

/// The locked rows of a batch.
pub(crate) struct Locked {
    pub(crate) orgs: Vec<Organization>,
    orgs_changed: Vec<bool>,
    subscriptions: Vec<SubscriptionState>,
    subscriptions_changed: Vec<bool>,
}

impl Locked {
    /// Locks the customer links the events name, creates the organizations they name, locks
    /// those and the ones linked to their customers, then the subscriptions of all of them
    /// and the ones the events name.
    pub(crate) async fn take(
        tx: &mut Transaction<'static, Postgres>,
        facts: &[&Facts],
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
        if !customers.is_empty() {
            organizations::lock_customer_links(&mut **tx, &customers).await?;
        }
        if !ids.is_empty() {
            organizations::ensure_exist(&mut **tx, &ids).await?;
        }
        let orgs = if ids.is_empty() && customers.is_empty() {
            Vec::new()
        } else {
            organizations::lock(&mut **tx, &ids, &customers).await?
        };
        let org_ids: Vec<&str> = orgs.iter().map(|o| o.id.as_str()).collect();
        let subscriptions = if subscription_ids.is_empty() {
            Vec::new()
        } else {
            subscriptions::lock(&mut **tx, &org_ids, &subscription_ids).await?
        };
        Ok(Locked {
            orgs_changed: vec![false; orgs.len()],
            orgs,
            subscriptions_changed: vec![false; subscriptions.len()],
            subscriptions,
        })
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

    /// Derives the organization's state again from its subscriptions and lifetime purchase;
    /// returns whether it changed.
    pub(crate) fn rederive(&mut self, at: usize, event: Stamp<'_>) -> bool {
        let org = &self.orgs[at];
        let own: Vec<&SubscriptionState> = self
            .subscriptions
            .iter()
            .filter(|s| s.organization_id == org.id)
            .collect();
        let state = organization::derive(&own, org.has_lifetime());
        let changed = self.orgs[at].set_derived(state, event);
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
        Ok(())
    }
}

fn changed<'a, T>(rows: &'a [T], flags: &[bool]) -> Vec<&'a T> {
    rows.iter()
        .zip(flags)
        .filter_map(|(row, changed)| changed.then_some(row))
        .collect()
}
