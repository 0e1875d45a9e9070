//! One payment's stored state (a one-time purchase: a `payment`-mode Checkout and its payment
//! intent) and how one event changes it, ordering included; and whether an organization's
//! payments grant it lifetime access ([`lifetime`]).
//!
//! A payment's state has three parts, each with its own ordering marker (the event that set
//! it), chosen so that any delivery order of the same events ends in the same state:
//! - the **outcome** (`pending`, `succeeded`, `failed`). `succeeded` is final: a payment
//!   intent never fails after it succeeded, so a success applies whatever its age and nothing
//!   moves it back. Between `pending` and `failed` (a delayed payment method still processing,
//!   or a failed attempt) the newer event wins; in one second `failed` wins. A refund or a
//!   dispute implies the payment succeeded (only a succeeded charge is refunded or disputed).
//! - **refunds**: `charge.refunded` carries the charge's cumulative `amount_refunded`, which
//!   only grows, so the largest amount seen wins (an older, smaller one is stale).
//! - the **dispute**: `open`, then closed `won` or `lost`; a closed dispute never reopens, so
//!   closed wins over open whatever their order. Stripe's `warning_closed` (an inquiry closed
//!   without a chargeback) counts as won.
//!
//! The status shown to readers is derived from the three ([`PaymentState::derived_status`]):
//! a lost dispute counts as a full refund (`refunded`; `dispute_status` says `lost`); an open
//! dispute shows `disputed`.
//!
//! Events about a payment not seen yet are kept, not deferred: a refund or dispute (which
//! always names its payment intent) creates the row keyed by the payment intent id, with no
//! organization if the event names none, and the checkout that completes later claims the
//! row; its rules then see every fact at once. A `payment_intent.*` event creates a row only
//! when it names the organization in its metadata (a purchase of the product): payment
//! intents of subscription invoices are not payments of this ledger.
//!
//! Lifetime access: a payment grants it when its checkout session is known (it is a
//! one-time purchase), it belongs to an organization, it succeeded, and (unless the policy
//! says refunds do not revoke) it is not fully refunded and has not lost a dispute. A
//! partial refund and an open dispute keep access; the dispute's outcome decides.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::subscription::Stamp;
use super::{Precedence, precedence};

/// The status readers see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "payment_status", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Completed with a delayed payment method, not settled yet.
    Pending,
    /// Paid.
    Succeeded,
    /// Not paid (a failed delayed payment, a failed attempt, or an expired session).
    Failed,
    /// Fully refunded, or a dispute lost.
    Refunded,
    /// Part of the amount refunded.
    PartiallyRefunded,
    /// A dispute is open.
    Disputed,
}

impl PaymentStatus {
    /// The snake_case name used by the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Pending => "pending",
            PaymentStatus::Succeeded => "succeeded",
            PaymentStatus::Failed => "failed",
            PaymentStatus::Refunded => "refunded",
            PaymentStatus::PartiallyRefunded => "partially_refunded",
            PaymentStatus::Disputed => "disputed",
        }
    }
}

impl std::fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the money arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "payment_outcome", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum PaymentOutcome {
    /// Not settled yet.
    Pending,
    /// Paid; final.
    Succeeded,
    /// Not paid.
    Failed,
}

impl PaymentOutcome {
    /// Breaks same-second ties between `pending` and `failed`.
    fn rank(self) -> u8 {
        match self {
            PaymentOutcome::Pending => 0,
            PaymentOutcome::Failed => 1,
            PaymentOutcome::Succeeded => 2,
        }
    }
}

/// A dispute's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "dispute_status", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum DisputeStatus {
    /// Opened, not decided.
    Open,
    /// Closed in the merchant's favour (or an inquiry closed).
    Won,
    /// Closed in the customer's favour: counts as a full refund.
    Lost,
}

impl DisputeStatus {
    /// Reads Stripe's dispute status: closed ones (`won`, `lost`, `warning_closed`) or any
    /// open one.
    pub fn from_stripe(status: &str) -> DisputeStatus {
        match status {
            "lost" => DisputeStatus::Lost,
            "won" | "warning_closed" => DisputeStatus::Won,
            _ => DisputeStatus::Open,
        }
    }

    fn is_closed(self) -> bool {
        !matches!(self, DisputeStatus::Open)
    }
}

/// What one event says about one payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentFacts {
    /// `cs_…`, for checkout session events (it makes the payment a one-time purchase).
    pub checkout_session_id: Option<String>,
    /// `pi_…`, when the event names it.
    pub payment_intent_id: Option<String>,
    /// Amount in the currency's minor unit, when the event says.
    pub amount: Option<i64>,
    /// Lower-case ISO currency, when the event says.
    pub currency: Option<String>,
    /// The event names the product's organization (metadata or `client_reference_id`): a
    /// payment intent event may then start the row.
    pub names_organization: bool,
    /// What happened.
    pub change: PaymentChange,
}

impl PaymentFacts {
    /// The key a new row takes: the payment intent id, else the checkout session id.
    pub fn key(&self) -> Option<&str> {
        self.payment_intent_id
            .as_deref()
            .or(self.checkout_session_id.as_deref())
    }
}

/// The change itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentChange {
    /// `checkout.session.completed` with `payment_status: paid`, or
    /// `checkout.session.async_payment_succeeded`, or `payment_intent.succeeded`.
    Succeeded,
    /// `checkout.session.completed` with `payment_status: unpaid` (a delayed method).
    Pending,
    /// `checkout.session.async_payment_failed` or `payment_intent.payment_failed`.
    Failed {
        /// Why, when Stripe says.
        reason: Option<String>,
    },
    /// `checkout.session.expired`: closes a pending payment.
    Expired,
    /// `charge.refunded`: the charge's cumulative refunds.
    Refunded {
        /// `amount_refunded`.
        amount_refunded: i64,
        /// `refunded`: the whole charge is refunded.
        full: bool,
    },
    /// `charge.dispute.created` / `charge.dispute.closed` (and the other dispute events).
    Dispute {
        /// `dp_…`
        dispute_id: String,
        /// Its state.
        status: DisputeStatus,
    },
}

/// A payment as stored (`payments`), or a blank one not stored yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct PaymentState {
    /// The payment intent id, else the checkout session id, of the first event seen.
    pub id: String,
    /// The organization that bought; `None` while no event named one.
    pub organization_id: Option<String>,
    /// `cs_…`: known once a checkout session event arrived.
    pub checkout_session_id: Option<String>,
    /// `pi_…`
    pub payment_intent_id: Option<String>,
    /// The Stripe customer, when known.
    pub customer_id: Option<String>,
    /// Amount in minor units.
    pub amount: Option<i64>,
    /// Currency.
    pub currency: Option<String>,
    /// Derived from the three parts below.
    pub status: PaymentStatus,
    /// Whether the money arrived.
    pub outcome: PaymentOutcome,
    /// The event behind the outcome (`None` only for a blank state).
    pub outcome_event_id: Option<String>,
    /// Its `created`: the outcome's ordering marker.
    pub outcome_event_created: Option<DateTime<Utc>>,
    /// Why it failed.
    pub failure_reason: Option<String>,
    /// Refunded so far, minor units.
    pub amount_refunded: i64,
    /// Stripe says the whole charge is refunded.
    pub fully_refunded: bool,
    /// The event that reported the refunds stored.
    pub refund_event_id: Option<String>,
    /// Its `created`.
    pub refund_event_created: Option<DateTime<Utc>>,
    /// `dp_…`
    pub dispute_id: Option<String>,
    /// The dispute's state.
    pub dispute_status: Option<DisputeStatus>,
    /// The event that set it.
    pub dispute_event_id: Option<String>,
    /// Its `created`.
    pub dispute_event_created: Option<DateTime<Utc>>,
}

impl PaymentState {
    /// A payment not seen before.
    pub fn blank(id: &str) -> PaymentState {
        PaymentState {
            id: id.to_owned(),
            organization_id: None,
            checkout_session_id: None,
            payment_intent_id: None,
            customer_id: None,
            amount: None,
            currency: None,
            status: PaymentStatus::Pending,
            outcome: PaymentOutcome::Pending,
            outcome_event_id: None,
            outcome_event_created: None,
            failure_reason: None,
            amount_refunded: 0,
            fully_refunded: false,
            refund_event_id: None,
            refund_event_created: None,
            dispute_id: None,
            dispute_status: None,
            dispute_event_id: None,
            dispute_event_created: None,
        }
    }

    /// Never stored: no event set anything yet.
    pub fn is_blank(&self) -> bool {
        self.outcome_event_created.is_none()
            && self.refund_event_created.is_none()
            && self.dispute_event_created.is_none()
    }

    /// The status readers see, from outcome, refunds and dispute.
    pub fn derived_status(&self) -> PaymentStatus {
        match self.outcome {
            PaymentOutcome::Pending => PaymentStatus::Pending,
            PaymentOutcome::Failed => PaymentStatus::Failed,
            PaymentOutcome::Succeeded if self.lost_all() => PaymentStatus::Refunded,
            PaymentOutcome::Succeeded if self.dispute_status == Some(DisputeStatus::Open) => {
                PaymentStatus::Disputed
            }
            PaymentOutcome::Succeeded if self.amount_refunded > 0 => {
                PaymentStatus::PartiallyRefunded
            }
            PaymentOutcome::Succeeded => PaymentStatus::Succeeded,
        }
    }

    /// Fully refunded or a dispute lost: the money went back.
    fn lost_all(&self) -> bool {
        self.fully_refunded
            || self.dispute_status == Some(DisputeStatus::Lost)
            || self
                .amount
                .is_some_and(|amount| amount > 0 && self.amount_refunded >= amount)
    }

    /// A one-time purchase of an organization: its checkout session is known.
    pub fn is_purchase(&self) -> bool {
        self.checkout_session_id.is_some() && self.organization_id.is_some()
    }

    /// Grants lifetime access under `policy`.
    pub fn grants_lifetime(&self, policy: RefundPolicy) -> bool {
        self.is_purchase()
            && self.outcome == PaymentOutcome::Succeeded
            && (!policy.refund_revokes_access || !self.lost_all())
    }

    /// When a purchase that succeeded stopped granting access under `policy` (its full
    /// refund or lost dispute); `None` if it never did.
    pub fn revoked_at(&self, policy: RefundPolicy) -> Option<DateTime<Utc>> {
        if !self.is_purchase()
            || self.outcome != PaymentOutcome::Succeeded
            || !policy.refund_revokes_access
            || !self.lost_all()
        {
            return None;
        }
        let lost = (self.dispute_status == Some(DisputeStatus::Lost))
            .then_some(self.dispute_event_created)
            .flatten();
        let refunded = (self.amount_refunded > 0 || self.fully_refunded)
            .then_some(self.refund_event_created)
            .flatten();
        match (lost, refunded) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Whether a full refund or a lost dispute takes lifetime access away
/// (`REFUND_REVOKES_ACCESS`, default true).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefundPolicy {
    /// `true`: they revoke it; `false`: a refunded purchase still grants it.
    pub refund_revokes_access: bool,
}

impl Default for RefundPolicy {
    fn default() -> RefundPolicy {
        RefundPolicy {
            refund_revokes_access: true,
        }
    }
}

/// An organization's lifetime access, as its payments give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifetime {
    /// No purchase grants it, and none ever did.
    None,
    /// Granted by a payment: the event behind its success, and that event's `created`.
    Granted {
        /// `evt_…` (kept in `organizations.lifetime_event_id`).
        event_id: String,
        /// Its `created`.
        at: DateTime<Utc>,
    },
    /// Revoked: no purchase grants it any more; when the last one stopped granting.
    Revoked {
        /// The full refund's or lost dispute's `created`.
        at: DateTime<Utc>,
    },
}

impl Lifetime {
    /// Whether lifetime access is granted.
    pub fn is_granted(&self) -> bool {
        matches!(self, Lifetime::Granted { .. })
    }
}

/// The lifetime access an organization's payments give under `policy`: granted by the
/// earliest granting payment; else revoked when one was granted once (at its latest
/// revocation); else none.
pub fn lifetime(payments: &[&PaymentState], policy: RefundPolicy) -> Lifetime {
    let granting = payments
        .iter()
        .filter(|p| p.grants_lifetime(policy))
        .filter_map(|p| Some((p.outcome_event_created?, p.outcome_event_id.as_deref()?)))
        .min();
    if let Some((at, event_id)) = granting {
        return Lifetime::Granted {
            event_id: event_id.to_owned(),
            at,
        };
    }
    match payments.iter().filter_map(|p| p.revoked_at(policy)).max() {
        Some(at) => Lifetime::Revoked { at },
        None => Lifetime::None,
    }
}

/// How a change was ordered against the stored state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// It changed the payment (newer, or final whatever its age).
    Applied,
    /// Older than what is stored: nothing changed.
    Stale,
    /// Same second, decided by the tie rule.
    Tie,
    /// It cannot change this payment (the reason says why).
    NoChange,
}

/// The ruling on one change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruling {
    /// How it was ordered.
    pub settled: Settled,
    /// The new state, when anything changed (ids, amount or currency filled in count).
    pub next: Option<PaymentState>,
    /// Why the change did not apply, when it did not.
    pub reason: Option<&'static str>,
}

/// Rules on one event's facts about one payment (`current` is blank when none is stored).
pub fn rule(current: &PaymentState, facts: &PaymentFacts, event: Stamp<'_>) -> Ruling {
    let blank = current.is_blank();
    if blank {
        match facts.change {
            PaymentChange::Expired => {
                return unchanged(Settled::NoChange, "no payment is recorded for this session");
            }
            PaymentChange::Succeeded | PaymentChange::Failed { .. }
                if facts.checkout_session_id.is_none() && !facts.names_organization =>
            {
                return unchanged(
                    Settled::NoChange,
                    "not a known one-time payment (no checkout seen, no metadata.organization_id)",
                );
            }
            _ => {}
        }
    }
    let mut next = current.clone();
    fill_in(&mut next, facts);
    let (settled, reason) = match &facts.change {
        PaymentChange::Succeeded => set_outcome(&mut next, PaymentOutcome::Succeeded, None, event),
        PaymentChange::Pending => set_outcome(&mut next, PaymentOutcome::Pending, None, event),
        PaymentChange::Failed { reason } => {
            set_outcome(&mut next, PaymentOutcome::Failed, reason.clone(), event)
        }
        PaymentChange::Expired => {
            if next.outcome == PaymentOutcome::Pending {
                set_outcome(
                    &mut next,
                    PaymentOutcome::Failed,
                    Some("checkout session expired".to_owned()),
                    event,
                )
            } else {
                (Settled::NoChange, Some("the payment is no longer pending"))
            }
        }
        PaymentChange::Refunded {
            amount_refunded,
            full,
        } => {
            imply_success(&mut next, event);
            let more = *amount_refunded > next.amount_refunded || (*full && !next.fully_refunded);
            if more {
                next.amount_refunded = next.amount_refunded.max(*amount_refunded);
                next.fully_refunded |= *full;
                next.refund_event_id = Some(event.id.to_owned());
                next.refund_event_created = Some(event.created);
                (Settled::Applied, None)
            } else if next
                .refund_event_created
                .is_some_and(|stored| stored > event.created)
            {
                (
                    Settled::Stale,
                    Some("older than the refund already recorded"),
                )
            } else {
                (
                    Settled::NoChange,
                    Some("these refunds are already recorded"),
                )
            }
        }
        PaymentChange::Dispute { dispute_id, status } => {
            imply_success(&mut next, event);
            let takes = match next.dispute_status {
                None => true,
                Some(stored) if stored.is_closed() => false,
                Some(_) => status.is_closed(),
            };
            if takes {
                next.dispute_id = Some(dispute_id.clone());
                next.dispute_status = Some(*status);
                next.dispute_event_id = Some(event.id.to_owned());
                next.dispute_event_created = Some(event.created);
                (Settled::Applied, None)
            } else if next.dispute_status.is_some_and(DisputeStatus::is_closed) {
                (Settled::Stale, Some("the dispute is already closed"))
            } else {
                (Settled::NoChange, Some("the dispute is already open"))
            }
        }
    };
    next.status = next.derived_status();
    let changed = next != *current;
    Ruling {
        settled,
        next: changed.then_some(next),
        reason,
    }
}

fn unchanged(settled: Settled, reason: &'static str) -> Ruling {
    Ruling {
        settled,
        next: None,
        reason: Some(reason),
    }
}

/// Ids, amount and currency: whatever is not known yet.
fn fill_in(next: &mut PaymentState, facts: &PaymentFacts) {
    fn fill<T: Clone>(slot: &mut Option<T>, value: &Option<T>) {
        if slot.is_none() {
            slot.clone_from(value);
        }
    }
    fill(&mut next.checkout_session_id, &facts.checkout_session_id);
    fill(&mut next.payment_intent_id, &facts.payment_intent_id);
    fill(&mut next.amount, &facts.amount);
    fill(&mut next.currency, &facts.currency);
}

/// A refund or a dispute proves the payment succeeded.
fn imply_success(next: &mut PaymentState, event: Stamp<'_>) {
    if next.outcome != PaymentOutcome::Succeeded {
        next.outcome = PaymentOutcome::Succeeded;
        next.failure_reason = None;
        next.outcome_event_id = Some(event.id.to_owned());
        next.outcome_event_created = Some(event.created);
    } else {
        earliest_success(next, event);
    }
}

/// A succeeded payment's marker is the earliest event that showed the success (by `created`,
/// then id), so it does not depend on which of them arrived first; returns whether it moved.
fn earliest_success(next: &mut PaymentState, event: Stamp<'_>) -> bool {
    let stored = (next.outcome_event_created, next.outcome_event_id.as_deref());
    if stored.0.is_none() || (Some(event.created), Some(event.id)) < stored {
        next.outcome_event_id = Some(event.id.to_owned());
        next.outcome_event_created = Some(event.created);
        return true;
    }
    false
}

fn set_outcome(
    next: &mut PaymentState,
    outcome: PaymentOutcome,
    reason: Option<String>,
    event: Stamp<'_>,
) -> (Settled, Option<&'static str>) {
    if next.outcome == PaymentOutcome::Succeeded && next.outcome_event_created.is_some() {
        return if outcome == PaymentOutcome::Succeeded {
            if earliest_success(next, event) {
                (Settled::Applied, None)
            } else {
                (Settled::NoChange, Some("the payment has already succeeded"))
            }
        } else {
            (
                Settled::Stale,
                Some("the payment has already succeeded, which is final"),
            )
        };
    }
    let settled = if outcome == PaymentOutcome::Succeeded {
        Settled::Applied
    } else {
        match precedence(event.created, next.outcome_event_created) {
            Precedence::Newer => Settled::Applied,
            Precedence::Older => {
                return (
                    Settled::Stale,
                    Some("older than the event behind the payment's outcome"),
                );
            }
            Precedence::Tie if outcome.rank() > next.outcome.rank() => Settled::Tie,
            Precedence::Tie => {
                return (
                    Settled::Tie,
                    Some("same-second tie: the stored outcome is further along"),
                );
            }
        }
    };
    next.outcome = outcome;
    next.failure_reason = reason;
    next.outcome_event_id = Some(event.id.to_owned());
    next.outcome_event_created = Some(event.created);
    (settled, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).expect("valid")
    }

    fn facts(checkout: bool, change: PaymentChange) -> PaymentFacts {
        PaymentFacts {
            checkout_session_id: checkout.then(|| "cs_1".to_owned()),
            payment_intent_id: Some("pi_1".to_owned()),
            amount: Some(5000),
            currency: Some("eur".to_owned()),
            names_organization: checkout,
            change,
        }
    }

    fn paid() -> PaymentFacts {
        facts(true, PaymentChange::Succeeded)
    }
    fn unpaid() -> PaymentFacts {
        facts(true, PaymentChange::Pending)
    }
    fn async_failed() -> PaymentFacts {
        facts(true, PaymentChange::Failed { reason: None })
    }
    fn expired() -> PaymentFacts {
        facts(true, PaymentChange::Expired)
    }
    fn intent_succeeded() -> PaymentFacts {
        facts(false, PaymentChange::Succeeded)
    }
    fn refunded(amount_refunded: i64) -> PaymentFacts {
        facts(
            false,
            PaymentChange::Refunded {
                amount_refunded,
                full: amount_refunded == 5000,
            },
        )
    }
    fn dispute(status: DisputeStatus) -> PaymentFacts {
        facts(
            false,
            PaymentChange::Dispute {
                dispute_id: "dp_1".to_owned(),
                status,
            },
        )
    }

    /// Applies the events in order, the organization attached as the worker does once it is
    /// known (by the checkout).
    fn run(events: &[(i64, PaymentFacts)]) -> (PaymentState, Vec<Ruling>) {
        let mut state = PaymentState::blank("pi_1");
        let mut rulings = Vec::new();
        for (seconds, f) in events {
            let id = format!("evt_{seconds}");
            let ruling = rule(
                &state,
                f,
                Stamp {
                    id: &id,
                    created: at(*seconds),
                },
            );
            if let Some(next) = &ruling.next {
                state = next.clone();
                if f.checkout_session_id.is_some() {
                    state.organization_id = Some("org".to_owned());
                }
            }
            rulings.push(ruling);
        }
        (state, rulings)
    }

    /// Every order of the events.
    fn permutations(events: &[(i64, PaymentFacts)]) -> Vec<Vec<(i64, PaymentFacts)>> {
        if events.len() <= 1 {
            return vec![events.to_vec()];
        }
        let mut all = Vec::new();
        for i in 0..events.len() {
            let mut rest = events.to_vec();
            let first = rest.remove(i);
            for mut tail in permutations(&rest) {
                tail.insert(0, first.clone());
                all.push(tail);
            }
        }
        all
    }

    use DisputeStatus::*;
    use PaymentStatus as S;

    /// (name, events as (second, facts), status, grants lifetime with refunds revoking it)
    type Case = (&'static str, Vec<(i64, PaymentFacts)>, PaymentStatus, bool);

    #[test]
    fn every_delivery_order_of_a_payments_events_ends_in_the_same_state() {
        let cases: Vec<Case> = vec![
            ("card", vec![(1, paid())], S::Succeeded, true),
            (
                "card, and its payment intent",
                vec![(1, paid()), (1, intent_succeeded())],
                S::Succeeded,
                true,
            ),
            (
                "delayed method pending",
                vec![(1, unpaid())],
                S::Pending,
                false,
            ),
            (
                "delayed method succeeding days later",
                vec![(1, unpaid()), (86_400, paid())],
                S::Succeeded,
                true,
            ),
            (
                "delayed method failing days later",
                vec![(1, unpaid()), (86_400, async_failed())],
                S::Failed,
                false,
            ),
            (
                "full refund",
                vec![(1, paid()), (50, refunded(5000))],
                S::Refunded,
                false,
            ),
            (
                "partial refund",
                vec![(1, paid()), (50, refunded(1000))],
                S::PartiallyRefunded,
                true,
            ),
            (
                "partial then full refund",
                vec![(1, paid()), (50, refunded(1000)), (60, refunded(5000))],
                S::Refunded,
                false,
            ),
            (
                "open dispute keeps access",
                vec![(1, paid()), (50, dispute(Open))],
                S::Disputed,
                true,
            ),
            (
                "lost dispute",
                vec![(1, paid()), (50, dispute(Open)), (90, dispute(Lost))],
                S::Refunded,
                false,
            ),
            (
                "won dispute",
                vec![(1, paid()), (50, dispute(Open)), (90, dispute(Won))],
                S::Succeeded,
                true,
            ),
            (
                "delayed, succeeded, then refunded",
                vec![(1, unpaid()), (86_400, paid()), (90_000, refunded(5000))],
                S::Refunded,
                false,
            ),
        ];
        for (name, events, status, grants) in cases {
            let orders = permutations(&events);
            let (first, _) = run(&orders[0]);
            for order in &orders {
                let (state, rulings) = run(order);
                assert_eq!(state, first, "{name}: {order:#?}: {rulings:#?}");
            }
            assert_eq!(first.status, status, "{name}");
            assert_eq!(first.derived_status(), status, "{name}");
            assert_eq!(
                first.grants_lifetime(RefundPolicy::default()),
                grants,
                "{name}"
            );
            assert!(
                first.grants_lifetime(RefundPolicy {
                    refund_revokes_access: false
                }) || matches!(status, S::Pending | S::Failed),
                "{name}: without revocation only unpaid payments grant nothing"
            );
        }
    }

    #[test]
    fn an_expired_session_closes_a_pending_payment_only() {
        let (state, _) = run(&[(1, unpaid()), (100, expired())]);
        assert_eq!(
            (state.status, state.failure_reason.as_deref()),
            (S::Failed, Some("checkout session expired"))
        );
        let (state, rulings) = run(&[(1, paid()), (100, expired())]);
        assert_eq!(state.status, S::Succeeded);
        assert_eq!(rulings[1].settled, Settled::NoChange);
    }

    #[test]
    fn rulings_say_how_they_were_ordered() {
        let (_, rulings) = run(&[
            (10, unpaid()),
            (5, async_failed()),
            (20, paid()),
            (30, async_failed()),
            (40, refunded(1000)),
            (35, refunded(500)),
            (40, dispute(Lost)),
            (50, dispute(Open)),
        ]);
        let settled: Vec<(Settled, bool)> = rulings
            .iter()
            .map(|r| (r.settled, r.next.is_some()))
            .collect();
        assert_eq!(
            settled,
            vec![
                (Settled::Applied, true),
                (Settled::Stale, false),
                (Settled::Applied, true),
                (Settled::Stale, false),
                (Settled::Applied, true),
                (Settled::Stale, false),
                (Settled::Applied, true),
                (Settled::Stale, false),
            ]
        );
    }

    #[test]
    fn unknown_payment_intents_and_expired_sessions_start_nothing() {
        let blank = PaymentState::blank("pi_1");
        let stamp = Stamp {
            id: "evt",
            created: at(1),
        };
        for f in [
            intent_succeeded(),
            facts(false, PaymentChange::Failed { reason: None }),
            expired(),
        ] {
            let ruling = rule(&blank, &f, stamp);
            assert_eq!(
                (ruling.settled, ruling.next.is_none()),
                (Settled::NoChange, true),
                "{f:?}"
            );
        }
        let mut named = intent_succeeded();
        named.names_organization = true;
        assert!(rule(&blank, &named, stamp).next.is_some());
        // A refund before anything else is kept.
        let kept = rule(&blank, &refunded(1000), stamp).next.expect("kept");
        assert_eq!(kept.status, S::PartiallyRefunded);
        assert!(
            !kept.is_purchase(),
            "no checkout yet: it grants nothing yet"
        );
    }

    #[test]
    fn lifetime_comes_from_the_earliest_granting_purchase_and_revocation_is_dated() {
        let (card, _) = run(&[(1, paid())]);
        let (refunded_card, _) = run(&[(1, paid()), (70, refunded(5000))]);
        let mut second = card.clone();
        second.id = "pi_2".to_owned();
        second.outcome_event_id = Some("evt_late".to_owned());
        second.outcome_event_created = Some(at(500));
        let policy = RefundPolicy::default();
        assert_eq!(lifetime(&[], policy), Lifetime::None);
        assert_eq!(
            lifetime(&[&second, &card], policy),
            Lifetime::Granted {
                event_id: "evt_1".to_owned(),
                at: at(1)
            }
        );
        assert_eq!(
            lifetime(&[&refunded_card], policy),
            Lifetime::Revoked { at: at(70) }
        );
        assert!(
            lifetime(&[&refunded_card, &second], policy).is_granted(),
            "another purchase still grants it"
        );
        assert!(
            lifetime(
                &[&refunded_card],
                RefundPolicy {
                    refund_revokes_access: false
                }
            )
            .is_granted(),
            "REFUND_REVOKES_ACCESS=false"
        );
    }
}
