//! The billing rules: plan status, access, and how one Stripe event changes an organization's
//! billing state. Everything here is pure (no I/O), so every rule is tested as a table.
//!
//! Ordering is decided on Stripe's `created` (whole seconds): a change from an event newer than
//! the one that set the stored state applies, an older one is stale. Two events in the same
//! second are a tie; without the Stripe API to ask, [`tie_prefers`] decides deterministically by
//! how far each status is along the subscription lifecycle.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Stripe's subscription status, plus `none` for an organization with no subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "plan_status", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum PlanStatus {
    /// No subscription (or never had one).
    None,
    /// Created, first payment not yet confirmed (e.g. waiting for 3-D Secure).
    Incomplete,
    /// The first payment was never confirmed within 23 hours; terminal.
    IncompleteExpired,
    /// In a trial period.
    Trialing,
    /// Paid and running.
    Active,
    /// A renewal payment failed; Stripe is retrying.
    PastDue,
    /// Ended; terminal.
    Canceled,
    /// Retries exhausted, left open unpaid.
    Unpaid,
    /// Paused (trial ended without a payment method, or paused by the merchant).
    Paused,
}

impl PlanStatus {
    /// All nine values, in declaration order.
    pub const ALL: [PlanStatus; 9] = [
        PlanStatus::None,
        PlanStatus::Incomplete,
        PlanStatus::IncompleteExpired,
        PlanStatus::Trialing,
        PlanStatus::Active,
        PlanStatus::PastDue,
        PlanStatus::Canceled,
        PlanStatus::Unpaid,
        PlanStatus::Paused,
    ];

    /// Parses Stripe's `subscription.status` string; `None` for a value Stripe does not send.
    pub fn from_stripe(status: &str) -> Option<PlanStatus> {
        PlanStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == status && *s != PlanStatus::None)
    }

    /// The snake_case name used by Stripe, the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            PlanStatus::None => "none",
            PlanStatus::Incomplete => "incomplete",
            PlanStatus::IncompleteExpired => "incomplete_expired",
            PlanStatus::Trialing => "trialing",
            PlanStatus::Active => "active",
            PlanStatus::PastDue => "past_due",
            PlanStatus::Canceled => "canceled",
            PlanStatus::Unpaid => "unpaid",
            PlanStatus::Paused => "paused",
        }
    }

    /// A subscription in this status can never become active again.
    pub fn is_terminal(self) -> bool {
        matches!(self, PlanStatus::Canceled | PlanStatus::IncompleteExpired)
    }

    /// How far along the subscription lifecycle a status is; used only to break same-second ties.
    fn lifecycle_rank(self) -> u8 {
        match self {
            PlanStatus::None => 0,
            PlanStatus::Incomplete => 1,
            PlanStatus::Trialing => 2,
            PlanStatus::Active => 3,
            PlanStatus::PastDue => 4,
            PlanStatus::Unpaid => 5,
            PlanStatus::Paused => 6,
            PlanStatus::Canceled | PlanStatus::IncompleteExpired => 7,
        }
    }
}

impl std::fmt::Display for PlanStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the product lets an organization do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Everything.
    Full,
    /// Soft block: reads allowed, writes refused.
    ReadOnly,
    /// Hard block: send the user to billing.
    Blocked,
}

impl Access {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Full => "full",
            Access::ReadOnly => "read_only",
            Access::Blocked => "blocked",
        }
    }
}

/// The one place access is derived from plan status (DESIGN.md, "Billing state rules").
pub fn access(status: PlanStatus) -> Access {
    match status {
        PlanStatus::None | PlanStatus::Active | PlanStatus::Trialing => Access::Full,
        PlanStatus::PastDue => Access::ReadOnly,
        PlanStatus::Incomplete
        | PlanStatus::IncompleteExpired
        | PlanStatus::Unpaid
        | PlanStatus::Canceled
        | PlanStatus::Paused => Access::Blocked,
    }
}

/// The plan name recorded for a one-time (lifetime) purchase.
pub const LIFETIME_PLAN: &str = "lifetime";

/// The billing columns of an organization that events change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingState {
    /// `basic`, `premium`, `enterprise`, `lifetime`, or unknown.
    pub plan: Option<String>,
    /// Stripe's subscription status, or `none`.
    pub plan_status: PlanStatus,
    /// The subscription this state describes.
    pub subscription_id: Option<String>,
    /// The subscription ends at `current_period_end` instead of renewing.
    pub cancel_at_period_end: bool,
    /// End of the paid period.
    pub current_period_end: Option<DateTime<Utc>>,
    /// When the subscription ended, if it has.
    pub ended_at: Option<DateTime<Utc>>,
}

/// What one event says about an organization's billing state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BillingChange {
    /// A full subscription object (subscription events, or a refetch): replaces the state.
    Subscription(BillingState),
    /// `invoice.paid` for a subscription.
    InvoicePaid {
        /// The invoice's subscription.
        subscription_id: String,
        /// Amount paid, in the smallest currency unit; 0 for a trial invoice.
        amount_paid: i64,
    },
    /// `invoice.payment_failed` for a subscription.
    InvoicePaymentFailed {
        /// The invoice's subscription.
        subscription_id: String,
        /// The subscription's first invoice (`billing_reason = subscription_create`): its failure
        /// leaves the subscription `incomplete`, where a renewal's makes it `past_due`.
        first_invoice: bool,
    },
    /// A paid one-time checkout: active for life, no subscription.
    LifetimePurchase,
}

/// The result of applying a change to a state, ordering aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The state becomes this.
    Changed(BillingState),
    /// The change does not apply to this state; the reason is kept in the audit row.
    Unchanged(&'static str),
}

/// Applies one change to the current state. Ordering is decided separately ([`precedence`]).
pub fn apply_change(current: &BillingState, change: &BillingChange) -> Outcome {
    match change {
        BillingChange::Subscription(next) => {
            let other_subscription = current.subscription_id.is_some()
                && next.subscription_id != current.subscription_id;
            if other_subscription
                && next.plan_status.is_terminal()
                && !current.plan_status.is_terminal()
            {
                return Outcome::Unchanged(
                    "the end of a subscription that is not the organization's current one",
                );
            }
            Outcome::Changed(next.clone())
        }
        BillingChange::LifetimePurchase => Outcome::Changed(BillingState {
            plan: Some(LIFETIME_PLAN.to_owned()),
            plan_status: PlanStatus::Active,
            subscription_id: None,
            cancel_at_period_end: false,
            current_period_end: None,
            ended_at: None,
        }),
        BillingChange::InvoicePaid {
            subscription_id,
            amount_paid,
        } => {
            if let Some(reason) = invoice_mismatch(current, subscription_id) {
                return Outcome::Unchanged(reason);
            }
            if *amount_paid == 0 && current.plan_status == PlanStatus::Trialing {
                return Outcome::Unchanged("a $0 trial invoice leaves trialing as it is");
            }
            Outcome::Changed(BillingState {
                plan_status: PlanStatus::Active,
                subscription_id: Some(subscription_id.clone()),
                ..current.clone()
            })
        }
        BillingChange::InvoicePaymentFailed {
            subscription_id,
            first_invoice,
        } => {
            if let Some(reason) = invoice_mismatch(current, subscription_id) {
                return Outcome::Unchanged(reason);
            }
            // Decided by the invoice, not the stored status, which may lag behind a late paid
            // invoice: the result must not depend on delivery order.
            if *first_invoice {
                return Outcome::Unchanged(
                    "a failed first payment leaves the subscription incomplete",
                );
            }
            Outcome::Changed(BillingState {
                plan_status: PlanStatus::PastDue,
                subscription_id: Some(subscription_id.clone()),
                ..current.clone()
            })
        }
    }
}

/// What an older subscription snapshot may still supply: the plan and period end a state set
/// by an invoice lacks (an invoice carries neither), for that same subscription. Status and
/// everything else stay with the newer event. `None` when there is nothing to fill in.
pub fn fill_in(current: &BillingState, older: &BillingChange) -> Option<BillingState> {
    let BillingChange::Subscription(snapshot) = older else {
        return None;
    };
    if current.subscription_id.is_none() || current.subscription_id != snapshot.subscription_id {
        return None;
    }
    let plan = current.plan.clone().or_else(|| snapshot.plan.clone());
    let current_period_end = current.current_period_end.or(snapshot.current_period_end);
    (plan != current.plan || current_period_end != current.current_period_end).then(|| {
        BillingState {
            plan,
            current_period_end,
            ..current.clone()
        }
    })
}

/// Why an invoice event cannot change this state, if it cannot.
fn invoice_mismatch(current: &BillingState, invoice_subscription: &str) -> Option<&'static str> {
    match &current.subscription_id {
        Some(current_id) if current_id != invoice_subscription => {
            Some("invoice of a subscription that is not the organization's current one")
        }
        _ if current.plan_status.is_terminal() => Some("the subscription has already ended"),
        _ => None,
    }
}

/// How an event's `created` compares with the `created` of the event behind the stored state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precedence {
    /// Newer (or nothing stored yet): the change applies.
    Newer,
    /// Older: the change is stale and is not applied.
    Older,
    /// Same second: a tie to break.
    Tie,
}

/// Compares an event's `created` with the state's.
pub fn precedence(
    event_created: DateTime<Utc>,
    state_created: Option<DateTime<Utc>>,
) -> Precedence {
    match state_created {
        None => Precedence::Newer,
        Some(state) if event_created > state => Precedence::Newer,
        Some(state) if event_created < state => Precedence::Older,
        Some(_) => Precedence::Tie,
    }
}

/// The deterministic tie rule used when the Stripe API is not configured: between two states set
/// in the same second, the one further along the subscription lifecycle wins
/// (incomplete < trialing < active < past_due < unpaid < paused < canceled / incomplete_expired);
/// at equal rank the candidate wins, so a full subscription snapshot replaces an invoice's
/// status-only change. Stripe's own transitions within one second go forward in this order
/// (created → paid; payment failed → past_due; → canceled), which is why it is the tie rule.
pub fn tie_prefers(current: PlanStatus, candidate: PlanStatus) -> bool {
    candidate.lifecycle_rank() >= current.lifecycle_rank()
}

#[cfg(test)]
mod tests {
    use super::*;
    use PlanStatus::*;

    fn state(status: PlanStatus, subscription: Option<&str>) -> BillingState {
        BillingState {
            plan: Some("premium".into()),
            plan_status: status,
            subscription_id: subscription.map(str::to_owned),
            cancel_at_period_end: false,
            current_period_end: Option::None,
            ended_at: Option::None,
        }
    }

    fn snapshot(status: PlanStatus, subscription: &str) -> BillingChange {
        BillingChange::Subscription(state(status, Some(subscription)))
    }

    fn paid(amount_paid: i64) -> BillingChange {
        BillingChange::InvoicePaid {
            subscription_id: "sub_1".into(),
            amount_paid,
        }
    }

    fn failed() -> BillingChange {
        BillingChange::InvoicePaymentFailed {
            subscription_id: "sub_1".into(),
            first_invoice: false,
        }
    }

    fn first_failed() -> BillingChange {
        BillingChange::InvoicePaymentFailed {
            subscription_id: "sub_1".into(),
            first_invoice: true,
        }
    }

    #[test]
    fn access_follows_the_design_table() {
        let expected = [
            (None, Access::Full),
            (Active, Access::Full),
            (Trialing, Access::Full),
            (PastDue, Access::ReadOnly),
            (Incomplete, Access::Blocked),
            (IncompleteExpired, Access::Blocked),
            (Unpaid, Access::Blocked),
            (Canceled, Access::Blocked),
            (Paused, Access::Blocked),
        ];
        assert_eq!(expected.len(), PlanStatus::ALL.len());
        for (status, access_level) in expected {
            assert_eq!(access(status), access_level, "{status}");
        }
    }

    #[test]
    fn stripe_status_names_round_trip() {
        for status in PlanStatus::ALL {
            let parsed = PlanStatus::from_stripe(status.as_str());
            assert_eq!(parsed, (status != None).then_some(status), "{status}");
        }
        assert_eq!(PlanStatus::from_stripe("bogus"), Option::None);
    }

    /// Current status, current subscription, change, expected status or the unchanged reason.
    type Case = (
        PlanStatus,
        Option<&'static str>,
        BillingChange,
        Result<PlanStatus, &'static str>,
    );

    #[test]
    fn status_by_event_table() {
        // (current status, current subscription, change, expected status or the unchanged reason)
        let unchanged = |reason: &'static str| Err(reason);
        let other_sub = "invoice of a subscription that is not the organization's current one";
        let ended = "the subscription has already ended";
        let cases: Vec<Case> = vec![
            (
                None,
                Option::None,
                snapshot(Incomplete, "sub_1"),
                Ok(Incomplete),
            ),
            (Incomplete, Some("sub_1"), paid(2000), Ok(Active)),
            (None, Option::None, paid(2000), Ok(Active)),
            (Active, Some("sub_1"), failed(), Ok(PastDue)),
            (Trialing, Some("sub_1"), failed(), Ok(PastDue)),
            (PastDue, Some("sub_1"), paid(2000), Ok(Active)),
            (Unpaid, Some("sub_1"), paid(2000), Ok(Active)),
            (
                Trialing,
                Some("sub_1"),
                paid(0),
                unchanged("a $0 trial invoice leaves trialing as it is"),
            ),
            (Active, Some("sub_1"), paid(0), Ok(Active)),
            (
                Incomplete,
                Some("sub_1"),
                first_failed(),
                unchanged("a failed first payment leaves the subscription incomplete"),
            ),
            (
                Active,
                Some("sub_1"),
                first_failed(),
                unchanged("a failed first payment leaves the subscription incomplete"),
            ),
            (Incomplete, Some("sub_1"), failed(), Ok(PastDue)),
            (Active, Some("sub_2"), paid(2000), unchanged(other_sub)),
            (Active, Some("sub_2"), failed(), unchanged(other_sub)),
            (Canceled, Some("sub_1"), paid(2000), unchanged(ended)),
            (IncompleteExpired, Some("sub_1"), failed(), unchanged(ended)),
            (
                Active,
                Some("sub_1"),
                snapshot(Canceled, "sub_1"),
                Ok(Canceled),
            ),
            (Active, Some("sub_1"), snapshot(Paused, "sub_1"), Ok(Paused)),
            (Paused, Some("sub_1"), snapshot(Active, "sub_1"), Ok(Active)),
            (Active, Some("sub_2"), snapshot(Active, "sub_1"), Ok(Active)),
            (
                Active,
                Some("sub_2"),
                snapshot(Canceled, "sub_1"),
                unchanged("the end of a subscription that is not the organization's current one"),
            ),
            (
                Canceled,
                Some("sub_1"),
                snapshot(Active, "sub_2"),
                Ok(Active),
            ),
            (
                Canceled,
                Some("sub_1"),
                BillingChange::LifetimePurchase,
                Ok(Active),
            ),
        ];
        for (status, subscription, change, expected) in cases {
            let current = state(status, subscription);
            let got = match apply_change(&current, &change) {
                Outcome::Changed(next) => Ok(next.plan_status),
                Outcome::Unchanged(reason) => Err(reason),
            };
            assert_eq!(got, expected, "{status} {subscription:?} + {change:?}");
        }
    }

    #[test]
    fn a_lifetime_purchase_has_no_subscription_and_no_end() {
        let Outcome::Changed(next) =
            apply_change(&state(None, Option::None), &BillingChange::LifetimePurchase)
        else {
            panic!("a lifetime purchase always applies");
        };
        assert_eq!(next.plan.as_deref(), Some(LIFETIME_PLAN));
        assert_eq!(
            (next.subscription_id, next.current_period_end),
            (Option::None, Option::None)
        );
    }

    #[test]
    fn invoice_changes_keep_the_subscription_details() {
        let mut current = state(PastDue, Some("sub_1"));
        current.cancel_at_period_end = true;
        current.current_period_end = DateTime::from_timestamp(1_900_000_000, 0);
        let Outcome::Changed(next) = apply_change(&current, &paid(100)) else {
            panic!("applies")
        };
        assert_eq!(
            next,
            BillingState {
                plan_status: Active,
                ..current
            }
        );
    }

    #[test]
    fn precedence_compares_whole_seconds() {
        let t = |s| DateTime::from_timestamp(s, 0);
        let at = |s| t(s).expect("valid");
        assert_eq!(precedence(at(10), Option::None), Precedence::Newer);
        assert_eq!(precedence(at(11), t(10)), Precedence::Newer);
        assert_eq!(precedence(at(9), t(10)), Precedence::Older);
        assert_eq!(precedence(at(10), t(10)), Precedence::Tie);
    }

    #[test]
    fn ties_go_to_the_status_further_along_the_lifecycle() {
        assert!(tie_prefers(Incomplete, Active));
        assert!(!tie_prefers(Active, Incomplete));
        assert!(tie_prefers(Active, PastDue));
        assert!(tie_prefers(PastDue, Canceled));
        assert!(!tie_prefers(Canceled, Active));
        assert!(
            tie_prefers(Active, Active),
            "equal rank: the newer snapshot replaces"
        );
    }

    #[test]
    fn an_older_snapshot_fills_in_only_what_an_invoice_left_missing() {
        let period_end = DateTime::from_timestamp(1_800_000_000, 0);
        let from_invoice = BillingState {
            plan: Option::None,
            ..state(Active, Some("sub_1"))
        };
        let older = BillingChange::Subscription(BillingState {
            plan_status: Incomplete,
            current_period_end: period_end,
            ..state(Incomplete, Some("sub_1"))
        });
        let filled = fill_in(&from_invoice, &older).expect("fills in");
        assert_eq!(filled.plan.as_deref(), Some("premium"));
        assert_eq!(filled.current_period_end, period_end);
        assert_eq!(filled.plan_status, Active, "the newer status stays");

        let complete = BillingState {
            current_period_end: period_end,
            ..state(Active, Some("sub_1"))
        };
        assert_eq!(fill_in(&complete, &older), Option::None, "nothing missing");
        let other = BillingState {
            plan: Option::None,
            ..state(Active, Some("sub_2"))
        };
        assert_eq!(
            fill_in(&other, &older),
            Option::None,
            "another subscription"
        );
        let lifetime = apply_change(&state(None, Option::None), &BillingChange::LifetimePurchase);
        let Outcome::Changed(lifetime) = lifetime else {
            panic!("a lifetime purchase applies");
        };
        assert_eq!(fill_in(&lifetime, &older), Option::None, "no subscription");
        assert_eq!(
            fill_in(&from_invoice, &paid(100)),
            Option::None,
            "not a snapshot"
        );
    }
}
