//! The billing rules: plan status, access, and how events change billing state. Everything
//! here is pure (no I/O), so every rule is tested as a table.
//!
//! State is kept per subscription ([`subscription`]): each subscription's newest snapshot wins
//! for that subscription, whatever its organization's other subscriptions do. An
//! organization's plan, status and access are then derived from all of its subscriptions and
//! its lifetime purchase by one function ([`organization::derive`]). One-time purchases are
//! kept per payment ([`payment`]), each with its own ordering markers; whether an
//! organization holds lifetime access is derived from its payments.
//!
//! Ordering is decided on Stripe's `created` (whole seconds): a change from an event newer than
//! the one behind a subscription's stored status applies, an older one is stale. Two events in
//! the same second are a tie; without the Stripe API to ask, [`tie_prefers`] decides
//! deterministically by how far each status is along the subscription lifecycle.

pub mod organization;
pub mod payment;
pub mod subscription;

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

/// The deterministic tie rule used when the Stripe API is not configured: between two statuses
/// of one subscription set in the same second, the one further along the subscription
/// lifecycle wins (incomplete < trialing < active < past_due < unpaid < paused < canceled /
/// incomplete_expired); at equal rank the candidate wins. Stripe's own transitions within one second go forward in this order
/// (created → paid; payment failed → past_due; → canceled), which is why it is the tie rule.
pub fn tie_prefers(current: PlanStatus, candidate: PlanStatus) -> bool {
    candidate.lifecycle_rank() >= current.lifecycle_rank()
}

#[cfg(test)]
mod tests {
    use super::*;
    use PlanStatus::*;

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
}
