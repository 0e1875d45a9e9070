//! Which prices mean which plan, and the snapshot a subscription object describes with it.

use super::*;

/// Which Stripe prices mean which plan: each plan has any number of keys, each a price id, a
/// price lookup key or a product id (all of that product's prices). Plans are tried in the
/// order given, so a price matching two plans' keys takes the first.
#[derive(Debug, Clone)]
pub struct PlanMapping {
    plans: Vec<(&'static str, Vec<String>)>,
}

impl PlanMapping {
    /// The mapping, plans in priority order; `Err` names a key given to two plans.
    pub fn new<const N: usize>(
        plans: [(&'static str, Vec<String>); N],
    ) -> Result<PlanMapping, String> {
        let mut seen = std::collections::HashSet::new();
        for key in plans.iter().flat_map(|(_, keys)| keys) {
            if !seen.insert(key.as_str()) {
                return Err(key.clone());
            }
        }
        Ok(PlanMapping {
            plans: plans.into_iter().collect(),
        })
    }

    /// The plan of one price, if the mapping names it.
    pub fn plan_for_price(&self, price: &Price) -> Option<&'static str> {
        let product = price.product.as_ref().map(Expandable::id);
        let keys = [
            Some(price.id.as_str()),
            price.lookup_key.as_deref(),
            product,
        ];
        self.plans
            .iter()
            .find(|(_, wanted)| wanted.iter().any(|w| keys.contains(&Some(w.as_str()))))
            .map(|(plan, _)| *plan)
    }

    /// The plan named by the subscription's items (the highest-priority plan any item has),
    /// and the quantity of that item.
    pub fn plan_for(&self, subscription: &Subscription) -> Option<(&'static str, Option<i64>)> {
        let items = subscription.items.iter().flat_map(|l| &l.data);
        let mapped = items.filter_map(|item| {
            let plan = self.plan_for_price(item.price.as_ref()?)?;
            let rank = self.plans.iter().position(|(p, _)| *p == plan)?;
            Some((rank, plan, item.quantity))
        });
        mapped
            .min_by_key(|(rank, _, _)| *rank)
            .map(|(_, plan, quantity)| (plan, quantity))
    }
}

/// The snapshot a subscription object describes; `None` for a status Stripe does not send.
pub fn subscription_snapshot(subscription: &Subscription, plans: &PlanMapping) -> Option<Snapshot> {
    let status = PlanStatus::from_stripe(&subscription.status)?;
    let items = || subscription.items.iter().flat_map(|l| &l.data);
    // Basil and later: the period is per item; take the latest end across items.
    let item_period_end = items().filter_map(|i| i.current_period_end).max();
    let mapped = plans.plan_for(subscription);
    let at = |seconds: Option<i64>| seconds.and_then(timestamp);
    Some(Snapshot {
        status,
        plan: mapped.map(|(plan, _)| plan.to_owned()),
        price_ids: items()
            .filter_map(|i| Some(i.price.as_ref()?.id.clone()))
            .collect(),
        quantity: mapped
            .and_then(|(_, quantity)| quantity)
            .or_else(|| items().next().and_then(|i| i.quantity)),
        current_period_end: at(item_period_end.or(subscription.current_period_end)),
        cancel_at_period_end: subscription.cancel_at_period_end,
        cancel_at: at(subscription.cancel_at),
        canceled_at: at(subscription.canceled_at),
        ended_at: at(subscription.ended_at),
        trial_end: at(subscription.trial_end),
        started_at: at(subscription.created),
        pending_update: subscription.pending_update.is_some(),
    })
}
