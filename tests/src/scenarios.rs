//! Lifecycles with several subscriptions, trials, portal cancellations, failures and lifetime
//! purchases (by card, by delayed methods succeeding or failing, refunded in part or in full,
//! disputed and won or lost), as Stripe emits them (each a few seconds apart, some in the same
//! second), with the state each organization must end in: the one
//! `shared::billing::organization::derive` gives for its true final subscriptions and
//! purchases, and each of its payments' final status, whatever order the events arrive in.

use serde_json::{Value, json};
use shared::billing::PlanStatus;
use shared::billing::organization::{OrganizationState, derive};
use shared::billing::payment::Lifetime;
use shared::billing::subscription::SubscriptionState;

use crate::stripe_events::{Customer, PURCHASE_AMOUNT};

/// One organization's events and the state it must end in.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// What it is.
    pub name: &'static str,
    /// Whose.
    pub customer: Customer,
    /// Every event, in the order Stripe created them.
    pub events: Vec<Value>,
    /// The derived state of the true final subscriptions and purchases.
    pub expected: OrganizationState,
    /// Each payment the organization must hold: (payment intent id, status, amount refunded).
    pub payments: Vec<(String, &'static str, i64)>,
}

/// A subscription's true final state, for the derivation.
struct Final<'a> {
    customer: &'a Customer,
    status: PlanStatus,
    period_end: i64,
    cancel_at_period_end: bool,
    cancel_at: Option<i64>,
}

/// A billing period.
const PERIOD: i64 = 30 * 86_400;

/// Builds a scenario's events and expected state for a customer and a start time.
type Build = dyn Fn(&Customer, i64) -> (Vec<Value>, OrganizationState);

/// Builds a purchase scenario's events, expected state and payments.
type BuildPurchase = dyn Fn(
    &Customer,
    i64,
) -> (
    Vec<Value>,
    OrganizationState,
    Vec<(String, &'static str, i64)>,
);

/// Lifetime access granted (by any event: only `derive`'s result is compared).
fn granted(at_seconds: i64) -> Lifetime {
    Lifetime::Granted {
        event_id: String::new(),
        at: at(at_seconds).expect("valid time"),
    }
}

fn at(seconds: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(seconds, 0)
}

fn expected(finals: &[Final<'_>], lifetime: bool) -> OrganizationState {
    let lifetime = if lifetime { granted(0) } else { Lifetime::None };
    expected_with(finals, &lifetime)
}

fn expected_with(finals: &[Final<'_>], lifetime: &Lifetime) -> OrganizationState {
    let states: Vec<SubscriptionState> = finals
        .iter()
        .map(|f| {
            let c = f.customer;
            let mut s = SubscriptionState::blank(&c.subscription_id, &c.organization_id, None);
            s.snapshot.status = f.status;
            s.snapshot.plan = Some("premium".to_owned());
            // `Customer::subscription` starts a subscription 30 days before its period end.
            s.snapshot.started_at = at(f.period_end - 30 * 86_400);
            s.snapshot.current_period_end = at(f.period_end);
            s.snapshot.cancel_at_period_end = f.cancel_at_period_end;
            s.snapshot.cancel_at = f.cancel_at.and_then(at);
            s.status_event_created = at(f.period_end);
            s
        })
        .collect();
    let refs: Vec<&SubscriptionState> = states.iter().collect();
    derive(&refs, lifetime)
}

/// Every scenario once, for customers tagged `{tag}_{name}`, starting at `start`.
pub fn all(tag: &str, start: i64) -> Vec<Scenario> {
    let mut scenarios = Vec::new();
    let mut add = |name: &'static str, build: &Build| {
        let customer = Customer::new(&format!("{tag}_{name}"));
        let (events, expected) = build(&customer, start);
        scenarios.push(Scenario {
            name,
            customer,
            events,
            expected,
            payments: Vec::new(),
        });
    };
    add("replacement", &|a, s| {
        let b = a.with_subscription("b");
        let (pa, pb) = (s + PERIOD, s + PERIOD + 100);
        let events = vec![
            a.checkout_event(s),
            a.event(
                "created",
                "customer.subscription.created",
                s + 1,
                a.subscription("active", false, pa),
            ),
            a.event(
                "paid",
                "invoice.paid",
                s + 2,
                a.invoice(2000, "subscription_create"),
            ),
            b.event(
                "created",
                "customer.subscription.created",
                s + 9,
                b.subscription("active", false, pb),
            ),
            b.event(
                "paid",
                "invoice.paid",
                s + 9,
                b.invoice(2000, "subscription_create"),
            ),
            a.event(
                "deleted",
                "customer.subscription.deleted",
                s + 10,
                a.subscription("canceled", false, pa),
            ),
        ];
        let finals = [
            final_state(a, PlanStatus::Canceled, pa),
            final_state(&b, PlanStatus::Active, pb),
        ];
        (events, expected(&finals, false))
    });
    add("upgrade", &|a, s| {
        let b = a.with_subscription("b");
        let (pa, pb) = (s + PERIOD, s + PERIOD + 100);
        let events = vec![
            a.checkout_event(s),
            a.event(
                "created",
                "customer.subscription.created",
                s + 1,
                a.subscription("active", false, pa),
            ),
            b.event(
                "created",
                "customer.subscription.created",
                s + 5,
                b.subscription("active", false, pb),
            ),
            a.event(
                "cancel",
                "customer.subscription.updated",
                s + 6,
                a.subscription("active", true, pa),
            ),
            a.event(
                "deleted",
                "customer.subscription.deleted",
                s + 7,
                a.subscription("canceled", true, pa),
            ),
        ];
        let mut old = final_state(a, PlanStatus::Canceled, pa);
        old.cancel_at_period_end = true;
        (
            events,
            expected(&[old, final_state(&b, PlanStatus::Active, pb)], false),
        )
    });
    add("lifetime", &|a, s| {
        let pa = s + PERIOD;
        let events = vec![
            a.checkout_event(s),
            a.event(
                "created",
                "customer.subscription.created",
                s + 1,
                a.subscription("active", false, pa),
            ),
            a.lifetime_checkout_event(s + 3),
            a.event(
                "deleted",
                "customer.subscription.deleted",
                s + 5,
                a.subscription("canceled", false, pa),
            ),
        ];
        (
            events,
            expected(&[final_state(a, PlanStatus::Canceled, pa)], true),
        )
    });
    add("expired", &|a, s| {
        let b = a.with_subscription("b");
        let (pa, pb) = (s + PERIOD, s + PERIOD + 100);
        let events = vec![
            a.checkout_event(s),
            a.event(
                "created",
                "customer.subscription.created",
                s + 1,
                a.subscription("active", false, pa),
            ),
            b.event(
                "created",
                "customer.subscription.created",
                s + 3,
                b.subscription("incomplete", false, pb),
            ),
            b.event(
                "expired",
                "customer.subscription.updated",
                s + 4,
                b.subscription("incomplete_expired", false, pb),
            ),
        ];
        let finals = [
            final_state(a, PlanStatus::Active, pa),
            final_state(&b, PlanStatus::IncompleteExpired, pb),
        ];
        (events, expected(&finals, false))
    });
    add("trial", &|a, s| {
        let pa = s + 14 * 86_400 + PERIOD;
        let mut trial = a.subscription("trialing", false, pa);
        trial["trial_end"] = json!(s + 14 * 86_400);
        let events = vec![
            a.checkout_event(s),
            a.event(
                "paid",
                "invoice.paid",
                s + 1,
                a.invoice(0, "subscription_create"),
            ),
            a.event("created", "customer.subscription.created", s + 1, trial),
        ];
        (
            events,
            expected(&[final_state(a, PlanStatus::Trialing, pa)], false),
        )
    });
    add("portal_cancel", &|a, s| {
        let pa = s + PERIOD;
        let mut cancelling = a.subscription("active", false, pa);
        cancelling["cancel_at"] = json!(pa);
        let events = vec![
            a.checkout_event(s),
            a.event(
                "created",
                "customer.subscription.created",
                s + 1,
                a.subscription("active", false, pa),
            ),
            a.event("cancel", "customer.subscription.updated", s + 2, cancelling),
        ];
        let mut f = final_state(a, PlanStatus::Active, pa);
        f.cancel_at = Some(pa);
        (events, expected(&[f], false))
    });
    add("unpaid", &|a, s| {
        let pa = s + PERIOD;
        let events = vec![
            a.checkout_event(s),
            a.event(
                "created",
                "customer.subscription.created",
                s + 1,
                a.subscription("active", false, pa),
            ),
            a.event(
                "failed",
                "invoice.payment_failed",
                s + 2,
                a.invoice(0, "subscription_cycle"),
            ),
            a.event(
                "past_due",
                "customer.subscription.updated",
                s + 3,
                a.subscription("past_due", false, pa),
            ),
            a.event(
                "unpaid",
                "customer.subscription.updated",
                s + 4,
                a.subscription("unpaid", false, pa),
            ),
            a.event(
                "failed_again",
                "invoice.payment_failed",
                s + 5,
                a.invoice(0, "manual"),
            ),
        ];
        (
            events,
            expected(&[final_state(a, PlanStatus::Unpaid, pa)], false),
        )
    });
    let mut scenarios_with_payments = purchases(tag, start);
    for scenario in &mut scenarios {
        if scenario.name == "lifetime" {
            let pi = format!("pi_{}_lifetime", scenario.customer.customer_id);
            scenario.payments.push((pi, "succeeded", 0));
        }
    }
    scenarios.append(&mut scenarios_with_payments);
    scenarios
}

/// The one-time purchase scenarios: card, delayed methods succeeding and failing, payment
/// intent events beside the checkout's, full and partial refunds, disputes won and lost, a
/// refund beside an active subscription, and a second purchase that keeps access when the
/// first is refunded.
fn purchases(tag: &str, start: i64) -> Vec<Scenario> {
    let mut scenarios = Vec::new();
    let mut add = |name: &'static str, build: &BuildPurchase| {
        let customer = Customer::new(&format!("{tag}_{name}"));
        let (events, expected, payments) = build(&customer, start);
        scenarios.push(Scenario {
            name,
            customer,
            events,
            expected,
            payments,
        });
    };
    const FULL: i64 = PURCHASE_AMOUNT;
    add("card", &|a, s| {
        let p = a.purchase("card");
        let events = vec![p.completed("paid", s), p.intent_event(true, s)];
        let payments = vec![(p.payment_intent_id(), "succeeded", 0)];
        (events, expected_with(&[], &granted(s)), payments)
    });
    add("delayed_success", &|a, s| {
        let p = a.purchase("sepa");
        let events = vec![
            p.completed("unpaid", s),
            p.intent_event(true, s + 40),
            p.settled(true, s + 40),
        ];
        let payments = vec![(p.payment_intent_id(), "succeeded", 0)];
        (events, expected_with(&[], &granted(s + 40)), payments)
    });
    add("delayed_failure", &|a, s| {
        let p = a.purchase("ach");
        let events = vec![
            p.completed("unpaid", s),
            p.intent_event(false, s + 40),
            p.settled(false, s + 41),
        ];
        let payments = vec![(p.payment_intent_id(), "failed", 0)];
        (events, expected_with(&[], &Lifetime::None), payments)
    });
    add("refunded", &|a, s| {
        let p = a.purchase("refunded");
        let events = vec![
            p.completed("paid", s),
            p.refunded(5_000, s + 20),
            p.refunded(FULL, s + 30),
        ];
        let payments = vec![(p.payment_intent_id(), "refunded", FULL)];
        let revoked = Lifetime::Revoked {
            at: at(s + 30).expect("valid time"),
        };
        (events, expected_with(&[], &revoked), payments)
    });
    add("partial_refund", &|a, s| {
        let p = a.purchase("partial");
        let events = vec![p.completed("paid", s), p.refunded(5_000, s + 20)];
        let payments = vec![(p.payment_intent_id(), "partially_refunded", 5_000)];
        (events, expected_with(&[], &granted(s)), payments)
    });
    add("dispute_lost", &|a, s| {
        let p = a.purchase("lost");
        let events = vec![
            p.completed("paid", s),
            p.dispute_event("needs_response", s + 20),
            p.dispute_event("lost", s + 60),
        ];
        let payments = vec![(p.payment_intent_id(), "refunded", 0)];
        let revoked = Lifetime::Revoked {
            at: at(s + 60).expect("valid time"),
        };
        (events, expected_with(&[], &revoked), payments)
    });
    add("dispute_won", &|a, s| {
        let p = a.purchase("won");
        let events = vec![
            p.completed("paid", s),
            p.dispute_event("needs_response", s + 20),
            p.dispute_event("won", s + 60),
        ];
        let payments = vec![(p.payment_intent_id(), "succeeded", 0)];
        (events, expected_with(&[], &granted(s)), payments)
    });
    add("refund_beside_subscription", &|a, s| {
        let pa = s + PERIOD;
        let p = a.purchase("extra");
        let events = vec![
            a.checkout_event(s),
            a.event(
                "created",
                "customer.subscription.created",
                s + 1,
                a.subscription("active", false, pa),
            ),
            p.completed("paid", s + 5),
            p.refunded(FULL, s + 9),
        ];
        let payments = vec![(p.payment_intent_id(), "refunded", FULL)];
        let revoked = Lifetime::Revoked {
            at: at(s + 9).expect("valid time"),
        };
        let finals = [final_state(a, PlanStatus::Active, pa)];
        (events, expected_with(&finals, &revoked), payments)
    });
    add("second_purchase", &|a, s| {
        let first = a.purchase("first");
        let second = a.purchase("second");
        let events = vec![
            first.completed("paid", s),
            second.completed("unpaid", s + 10),
            second.settled(true, s + 30),
            first.refunded(FULL, s + 40),
        ];
        let payments = vec![
            (first.payment_intent_id(), "refunded", FULL),
            (second.payment_intent_id(), "succeeded", 0),
        ];
        (events, expected_with(&[], &granted(s + 30)), payments)
    });
    scenarios
}

fn final_state(customer: &Customer, status: PlanStatus, period_end: i64) -> Final<'_> {
    Final {
        customer,
        status,
        period_end,
        cancel_at_period_end: false,
        cancel_at: None,
    }
}
