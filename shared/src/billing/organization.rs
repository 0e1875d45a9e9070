//! An organization's billing state, derived from all of its subscriptions and its lifetime
//! purchase by [`derive`]: the one place that decides which subscription governs.
//!
//! The governing subscription is the one granting the best access (active or trialing, then
//! past_due, then the rest), the most recently started among equals; a lifetime purchase
//! grants full access whatever the subscriptions say. The organization's stored columns are
//! this function's result, written in the transaction that changed any of its inputs.
//!
//! The lifetime input comes from the organization's payments
//! ([`super::payment::lifetime`]). When a lifetime grant is revoked (a full refund or a lost
//! dispute) the subscriptions decide again; `ended_at` then says when access ended: the
//! revocation when no subscription governs, or the later of the revocation and the governing
//! subscription's end when that subscription grants no access.

use chrono::{DateTime, Utc};

use super::payment::Lifetime;
use super::subscription::SubscriptionState;
use super::{Access, LIFETIME_PLAN, PlanStatus, access};

/// The organization's billing columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrganizationState {
    /// The governing subscription's plan, `lifetime`, or none.
    pub plan: Option<String>,
    /// The governing subscription's status; `active` for a lifetime purchase; `none`.
    pub plan_status: PlanStatus,
    /// The governing subscription.
    pub subscription_id: Option<String>,
    /// The governing subscription ends at period end instead of renewing.
    pub cancel_at_period_end: bool,
    /// When the governing subscription is scheduled to end.
    pub cancel_at: Option<DateTime<Utc>>,
    /// End of the governing subscription's period.
    pub current_period_end: Option<DateTime<Utc>>,
    /// When the governing subscription ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// When access ends if nothing changes: the latest scheduled end among the subscriptions
    /// granting the organization's access; `None` when one of them renews (or for lifetime).
    pub access_ends_at: Option<DateTime<Utc>>,
}

impl OrganizationState {
    /// What the product lets the organization do.
    pub fn access(&self) -> Access {
        access(self.plan_status)
    }
}

/// Derives the organization's state from its subscriptions (blank ones are ignored) and
/// its lifetime purchase.
pub fn derive(subscriptions: &[&SubscriptionState], lifetime: &Lifetime) -> OrganizationState {
    let revoked_at = match lifetime {
        Lifetime::Granted { .. } => return lifetime_state(),
        Lifetime::Revoked { at } => Some(*at),
        Lifetime::None => None,
    };
    derive_from_subscriptions(subscriptions, revoked_at)
}

/// Lifetime access: plan `lifetime`, active, no subscription, no end.
fn lifetime_state() -> OrganizationState {
    OrganizationState {
        plan: Some(LIFETIME_PLAN.to_owned()),
        plan_status: PlanStatus::Active,
        subscription_id: None,
        cancel_at_period_end: false,
        cancel_at: None,
        current_period_end: None,
        ended_at: None,
        access_ends_at: None,
    }
}

fn derive_from_subscriptions(
    subscriptions: &[&SubscriptionState],
    revoked_at: Option<DateTime<Utc>>,
) -> OrganizationState {
    let known: Vec<&SubscriptionState> = subscriptions
        .iter()
        .copied()
        .filter(|s| !s.is_blank())
        .collect();
    let governing = known.iter().copied().max_by(|a, b| {
        (access_rank(a), recency(a), &a.id).cmp(&(access_rank(b), recency(b), &b.id))
    });
    let Some(governing) = governing else {
        return OrganizationState {
            plan: None,
            plan_status: PlanStatus::None,
            subscription_id: None,
            cancel_at_period_end: false,
            cancel_at: None,
            current_period_end: None,
            ended_at: revoked_at,
            access_ends_at: None,
        };
    };
    let details = &governing.snapshot;
    let granted = access(details.status);
    let access_ends_at = if granted == Access::Blocked {
        None
    } else {
        known
            .iter()
            .filter(|s| access(s.snapshot.status) == granted)
            .map(|s| scheduled_end(s))
            .collect::<Option<Vec<_>>>()
            .and_then(|ends| ends.into_iter().max())
    };
    OrganizationState {
        plan: details.plan.clone(),
        plan_status: details.status,
        subscription_id: Some(governing.id.clone()),
        cancel_at_period_end: details.cancel_at_period_end,
        cancel_at: details.cancel_at,
        current_period_end: details.current_period_end,
        ended_at: match revoked_at {
            Some(revoked) if granted == Access::Blocked => details.ended_at.max(Some(revoked)),
            _ => details.ended_at,
        },
        access_ends_at,
    }
}

/// Full access beats read-only beats blocked.
fn access_rank(subscription: &SubscriptionState) -> u8 {
    match access(subscription.snapshot.status) {
        Access::Full => 2,
        Access::ReadOnly => 1,
        Access::Blocked => 0,
    }
}

/// When it started, or else when it was first seen.
fn recency(subscription: &SubscriptionState) -> Option<DateTime<Utc>> {
    subscription
        .snapshot
        .started_at
        .or(subscription.status_event_created)
}

/// When a subscription stops by itself: `cancel_at`, or its period end when it cancels at
/// period end; `None` when it renews.
fn scheduled_end(subscription: &SubscriptionState) -> Option<DateTime<Utc>> {
    let details = &subscription.snapshot;
    details.cancel_at.or(details
        .cancel_at_period_end
        .then_some(details.current_period_end)
        .flatten())
}

#[cfg(test)]
mod tests {
    use super::*;
    use PlanStatus::*;

    fn at(days: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + days * 86_400, 0).expect("valid")
    }

    /// A subscription started on `started` (days), with a status and a plan.
    fn sub(id: &str, status: PlanStatus, plan: &str, started: i64) -> SubscriptionState {
        let mut s = SubscriptionState::blank(id, "org", Some("cus"));
        s.snapshot.status = status;
        s.snapshot.plan = Some(plan.to_owned());
        s.snapshot.started_at = Some(at(started));
        s.snapshot.current_period_end = Some(at(started + 30));
        s.status_event_id = Some(format!("evt_{id}"));
        s.status_event_created = Some(at(started));
        s
    }

    fn cancelling(mut s: SubscriptionState) -> SubscriptionState {
        s.snapshot.cancel_at_period_end = true;
        s
    }

    fn cancel_at(mut s: SubscriptionState, day: i64) -> SubscriptionState {
        s.snapshot.cancel_at = Some(at(day));
        s
    }

    /// (name, subscriptions, lifetime, governing subscription, status, plan, access ends)
    type Case = (
        &'static str,
        Vec<SubscriptionState>,
        bool,
        Option<&'static str>,
        PlanStatus,
        Option<&'static str>,
        Option<i64>,
    );

    #[test]
    fn the_subscription_granting_the_best_access_governs() {
        let cases: Vec<Case> = vec![
            (
                "nothing",
                vec![],
                false,
                Option::None,
                None,
                Option::None,
                Option::None,
            ),
            (
                "one active",
                vec![sub("a", Active, "basic", 0)],
                false,
                Some("a"),
                Active,
                Some("basic"),
                Option::None,
            ),
            (
                "replaced: the old one canceled, the new one active",
                vec![
                    sub("a", Canceled, "basic", 0),
                    sub("b", Active, "premium", 10),
                ],
                false,
                Some("b"),
                Active,
                Some("premium"),
                Option::None,
            ),
            (
                "an older active one beats a newer canceled one",
                vec![
                    sub("a", Active, "basic", 0),
                    sub("b", Canceled, "premium", 10),
                ],
                false,
                Some("a"),
                Active,
                Some("basic"),
                Option::None,
            ),
            (
                "a second subscription that expired incomplete blocks nothing",
                vec![
                    sub("a", Active, "basic", 0),
                    sub("b", IncompleteExpired, "premium", 10),
                ],
                false,
                Some("a"),
                Active,
                Some("basic"),
                Option::None,
            ),
            (
                "full access beats read-only",
                vec![
                    sub("a", PastDue, "basic", 10),
                    sub("b", Trialing, "premium", 0),
                ],
                false,
                Some("b"),
                Trialing,
                Some("premium"),
                Option::None,
            ),
            (
                "read-only beats blocked",
                vec![
                    sub("a", PastDue, "basic", 0),
                    sub("b", Unpaid, "premium", 10),
                ],
                false,
                Some("a"),
                PastDue,
                Some("basic"),
                Option::None,
            ),
            (
                "among equals the most recently started",
                vec![
                    sub("a", Active, "basic", 0),
                    sub("b", Active, "premium", 10),
                ],
                false,
                Some("b"),
                Active,
                Some("premium"),
                Option::None,
            ),
            (
                "all blocked: the most recent",
                vec![
                    sub("a", Canceled, "basic", 0),
                    sub("b", Unpaid, "premium", 10),
                ],
                false,
                Some("b"),
                Unpaid,
                Some("premium"),
                Option::None,
            ),
            (
                "lifetime beats a canceled subscription",
                vec![sub("a", Canceled, "basic", 0)],
                true,
                Option::None,
                Active,
                Some(LIFETIME_PLAN),
                Option::None,
            ),
            (
                "lifetime beats an active subscription too",
                vec![sub("a", Active, "basic", 0)],
                true,
                Option::None,
                Active,
                Some(LIFETIME_PLAN),
                Option::None,
            ),
            (
                "cancel at period end: access ends at the period end",
                vec![cancelling(sub("a", Active, "basic", 0))],
                false,
                Some("a"),
                Active,
                Some("basic"),
                Some(30),
            ),
            (
                "portal cancellation (cancel_at): access ends then",
                vec![cancel_at(sub("a", Active, "basic", 0), 20)],
                false,
                Some("a"),
                Active,
                Some("basic"),
                Some(20),
            ),
            (
                "access ends when the last cancelling subscription ends",
                vec![
                    cancelling(sub("a", Active, "basic", 0)),
                    cancel_at(sub("b", Active, "premium", 5), 50),
                ],
                false,
                Some("b"),
                Active,
                Some("premium"),
                Some(50),
            ),
            (
                "a renewing subscription keeps access open-ended",
                vec![
                    cancelling(sub("a", Active, "basic", 10)),
                    sub("b", Active, "premium", 0),
                ],
                false,
                Some("a"),
                Active,
                Some("basic"),
                Option::None,
            ),
        ];
        for (name, subs, lifetime, governing, status, plan, ends) in cases {
            let refs: Vec<&SubscriptionState> = subs.iter().collect();
            let lifetime = if lifetime {
                Lifetime::Granted {
                    event_id: "evt_lifetime".to_owned(),
                    at: at(0),
                }
            } else {
                Lifetime::None
            };
            let state = derive(&refs, &lifetime);
            assert_eq!(
                (
                    state.subscription_id.as_deref(),
                    state.plan_status,
                    state.plan.as_deref(),
                    state.access_ends_at,
                ),
                (governing, status, plan, ends.map(at)),
                "{name}"
            );
        }
    }

    #[test]
    fn blank_subscriptions_are_not_counted() {
        let blank = SubscriptionState::blank("a", "org", Option::None);
        assert_eq!(derive(&[&blank], &Lifetime::None).plan_status, None);
    }

    #[test]
    fn a_revoked_lifetime_leaves_the_subscriptions_to_decide_and_dates_the_end() {
        let revoked = Lifetime::Revoked { at: at(40) };
        let alone = derive(&[], &revoked);
        assert_eq!(
            (alone.plan_status, alone.plan, alone.ended_at),
            (None, Option::None, Some(at(40)))
        );
        let active = sub("a", Active, "basic", 0);
        let with_active = derive(&[&active], &revoked);
        assert_eq!(
            (with_active.plan_status, with_active.ended_at),
            (Active, Option::None),
            "an active subscription still grants access"
        );
        let mut canceled = sub("a", Canceled, "basic", 0);
        canceled.snapshot.ended_at = Some(at(10));
        assert_eq!(derive(&[&canceled], &revoked).ended_at, Some(at(40)));
    }
}
