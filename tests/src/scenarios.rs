//! Lifecycles with several subscriptions, trials, portal cancellations, failures and lifetime
//! purchases, as Stripe emits them (each a few seconds apart, some in the same second), with
//! the state each organization must end in: the one `shared::billing::organization::derive`
//! gives for its true final subscriptions, whatever order the events arrive in.

use serde_json::{Value, json};
use shared::billing::PlanStatus;
use shared::billing::organization::{OrganizationState, derive};
use shared::billing::subscription::SubscriptionState;

use crate::stripe_events::Customer;

/// One organization's events and the state it must end in.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// What it is.
    pub name: &'static str,
    /// Whose.
    pub customer: Customer,
    /// Every event, in the order Stripe created them.
    pub events: Vec<Value>,
    /// The derived state of the true final subscriptions.
    pub expected: OrganizationState,
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

fn at(seconds: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(seconds, 0)
}

fn expected(finals: &[Final<'_>], lifetime: bool) -> OrganizationState {
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
