//! Organizations with several subscriptions, and the transitions Stripe really produces: one
//! test per case the per-subscription review found, each event decided before the next
//! (no Stripe key unless said), checked through the billing endpoint.

use e2e::harness::{Pipeline, unique_tag};
use e2e::stripe_events::{BASIC_PRICE, Customer};
use serde_json::{Value, json};

pub(super) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Posts each event and waits for its decision before the next; returns the decisions.
pub(super) async fn deliver_in_order(p: &Pipeline, events: &[Value]) -> Vec<Vec<String>> {
    let mut decisions = Vec::new();
    for ev in events {
        assert_eq!(p.client.post_event(ev).await.0, 200, "{}", ev["id"]);
        decisions.push(p.wait_for_decision(ev["id"].as_str().expect("id")).await);
    }
    decisions
}

pub(super) async fn started() -> Pipeline {
    let mut p = Pipeline::start(&[]).await;
    p.start_worker();
    p
}

pub(super) async fn billing(p: &Pipeline, customer: &Customer) -> Value {
    let (status, body) = p.client.billing(&customer.organization_id).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The fields a case checks: status, access, governing subscription, plan.
fn summary(body: &Value) -> (&str, &str, &str, &str) {
    let text = |key: &str| body[key].as_str().unwrap_or("null");
    (
        text("plan_status"),
        text("access"),
        text("stripe_subscription_id"),
        text("plan"),
    )
}

pub(super) fn subscription(customer: &Customer, status: &str, cancel: bool, t: i64) -> Value {
    customer.subscription(status, cancel, t + 30 * 86_400)
}

/// The start most cases share, then `then`: a checkout 10 s before `t`, and the subscription
/// it created, active since `t`.
pub(super) fn subscribed_then(
    customer: &Customer,
    t: i64,
    then: impl IntoIterator<Item = Value>,
) -> Vec<Value> {
    let created = customer.event(
        "created",
        "customer.subscription.created",
        t,
        subscription(customer, "active", false, t),
    );
    [customer.checkout_event(t - 10), created]
        .into_iter()
        .chain(then)
        .collect()
}

#[tokio::test]
async fn a_replacement_delivered_out_of_order_ends_on_the_new_subscription() {
    let p = started().await;
    for same_second in [false, true] {
        let a = Customer::new(&unique_tag());
        let b = a.with_subscription("b");
        let t = now() - 1000;
        let deleted_at = if same_second { t + 100 } else { t + 101 };
        let decisions = deliver_in_order(
            &p,
            &subscribed_then(
                &a,
                t,
                [
                    a.event(
                        "deleted",
                        "customer.subscription.deleted",
                        deleted_at,
                        subscription(&a, "canceled", false, t),
                    ),
                    b.event(
                        "created",
                        "customer.subscription.created",
                        t + 100,
                        subscription(&b, "active", false, t + 100),
                    ),
                    b.event(
                        "paid",
                        "invoice.paid",
                        t + 100,
                        b.invoice(2000, "subscription_create"),
                    ),
                ],
            ),
        )
        .await;
        let body = billing(&p, &a).await;
        assert_eq!(
            summary(&body),
            ("active", "full", b.subscription_id.as_str(), "premium"),
            "same second {same_second}: {body}; decisions {decisions:?}"
        );
        assert_eq!(decisions[3], ["applied"], "{decisions:?}");
        let subs = body["subscriptions"].as_array().expect("subscriptions");
        assert_eq!(subs.len(), 2, "{body}");
    }
}

#[tokio::test]
async fn another_subscription_never_takes_over_an_active_one() {
    let p = started().await;
    // An upgrade by a new subscription, then the old one cancelled and deleted, in order.
    let a = Customer::new(&unique_tag());
    let b = a.with_subscription("b");
    let t = now() - 1000;
    deliver_in_order(
        &p,
        &subscribed_then(
            &a,
            t,
            [
                b.event(
                    "created",
                    "customer.subscription.created",
                    t + 200,
                    subscription(&b, "active", false, t + 200),
                ),
                a.event(
                    "cancel",
                    "customer.subscription.updated",
                    t + 201,
                    subscription(&a, "active", true, t),
                ),
                a.event(
                    "deleted",
                    "customer.subscription.deleted",
                    t + 202,
                    subscription(&a, "canceled", true, t),
                ),
            ],
        ),
    )
    .await;
    assert_eq!(
        summary(&billing(&p, &a).await),
        ("active", "full", b.subscription_id.as_str(), "premium")
    );

    // A second subscription that never got paid and expired.
    let a = Customer::new(&unique_tag());
    let b = a.with_subscription("b");
    deliver_in_order(
        &p,
        &subscribed_then(
            &a,
            t,
            [
                b.event(
                    "created",
                    "customer.subscription.created",
                    t + 100,
                    subscription(&b, "incomplete", false, t + 100),
                ),
                b.event(
                    "expired",
                    "customer.subscription.updated",
                    t + 200,
                    subscription(&b, "incomplete_expired", false, t + 100),
                ),
            ],
        ),
    )
    .await;
    assert_eq!(
        summary(&billing(&p, &a).await),
        ("active", "full", a.subscription_id.as_str(), "premium")
    );
}

#[tokio::test]
async fn lifetime_access_outlives_the_subscription_it_replaced() {
    let p = started().await;
    let a = Customer::new(&unique_tag());
    let t = now() - 1000;
    deliver_in_order(
        &p,
        &subscribed_then(
            &a,
            t,
            [
                a.lifetime_checkout_event(t + 100),
                a.event(
                    "deleted",
                    "customer.subscription.deleted",
                    t + 200,
                    subscription(&a, "canceled", false, t),
                ),
                a.event(
                    "paid",
                    "invoice.paid",
                    t + 300,
                    a.invoice(2000, "subscription_cycle"),
                ),
            ],
        ),
    )
    .await;
    let body = billing(&p, &a).await;
    assert_eq!(
        summary(&body),
        ("active", "full", "null", "lifetime"),
        "{body}"
    );
    assert_eq!(body["lifetime"], true);
    assert!(body["access_ends_at"].is_null(), "{body}");
}

#[tokio::test]
async fn a_trial_start_with_a_same_second_zero_invoice_shows_trialing_with_its_plan() {
    let p = started().await;
    let a = Customer::new(&unique_tag());
    let t = now() - 1000;
    let mut trial = subscription(&a, "trialing", false, t);
    trial["trial_end"] = json!(t + 14 * 86_400);
    deliver_in_order(
        &p,
        &[
            a.checkout_event(t - 10),
            a.event(
                "paid",
                "invoice.paid",
                t,
                a.invoice(0, "subscription_create"),
            ),
            a.event("created", "customer.subscription.created", t, trial),
        ],
    )
    .await;
    let body = billing(&p, &a).await;
    assert_eq!(
        summary(&body),
        ("trialing", "full", a.subscription_id.as_str(), "premium"),
        "{body}"
    );
    assert!(body["current_period_end"].is_string(), "{body}");
    assert!(body["subscriptions"][0]["trial_end"].is_string(), "{body}");
}

#[tokio::test]
async fn the_plan_and_period_end_come_from_the_newest_snapshot_delivered() {
    let p = started().await;
    let a = Customer::new(&unique_tag());
    let t = now() - 1000;
    let mut basic = a.subscription("active", false, t + 10 * 86_400);
    basic["items"]["data"][0]["price"]["id"] = json!(BASIC_PRICE);
    let premium = a.subscription("active", false, t + 40 * 86_400);
    let decisions = deliver_in_order(
        &p,
        &[
            a.checkout_event(t - 10),
            a.event(
                "paid",
                "invoice.paid",
                t + 300,
                a.invoice(2000, "subscription_cycle"),
            ),
            a.event("created", "customer.subscription.created", t + 100, basic),
            a.event(
                "upgraded",
                "customer.subscription.updated",
                t + 200,
                premium,
            ),
        ],
    )
    .await;
    let body = billing(&p, &a).await;
    assert_eq!(body["plan"], "premium", "{body}; {decisions:?}");
    let period_end: chrono::DateTime<chrono::Utc> = body["current_period_end"]
        .as_str()
        .expect("period end")
        .parse()
        .expect("RFC 3339");
    assert_eq!(period_end.timestamp(), t + 40 * 86_400);
    assert_eq!(body["plan_status"], "active");
}

#[tokio::test]
async fn a_failed_payment_never_loosens_access() {
    let p = started().await;
    // unpaid, then a manual retry fails again: still unpaid.
    let a = Customer::new(&unique_tag());
    let t = now() - 1000;
    deliver_in_order(
        &p,
        &[
            a.checkout_event(t - 10),
            a.event(
                "unpaid",
                "customer.subscription.updated",
                t,
                subscription(&a, "unpaid", false, t),
            ),
            a.event(
                "failed",
                "invoice.payment_failed",
                t + 100,
                a.invoice(0, "manual"),
            ),
        ],
    )
    .await;
    assert_eq!(
        summary(&billing(&p, &a).await),
        ("unpaid", "blocked", a.subscription_id.as_str(), "premium")
    );

    // A failed update invoice with pending updates: Stripe keeps the subscription active.
    let a = Customer::new(&unique_tag());
    let mut pending = subscription(&a, "active", false, t);
    pending["pending_update"] = json!({ "expires_at": t + 86_400 });
    deliver_in_order(
        &p,
        &[
            a.checkout_event(t - 10),
            a.event("pending", "customer.subscription.updated", t, pending),
            a.event(
                "failed",
                "invoice.payment_failed",
                t + 1,
                a.invoice(0, "subscription_update"),
            ),
            a.event(
                "expired",
                "customer.subscription.pending_update_expired",
                t + 2,
                subscription(&a, "active", false, t),
            ),
        ],
    )
    .await;
    assert_eq!(
        summary(&billing(&p, &a).await),
        ("active", "full", a.subscription_id.as_str(), "premium")
    );

    // Paying an older open invoice leaves the newer failure standing.
    let a = Customer::new(&unique_tag());
    let mut newer_failure = a.invoice(0, "subscription_cycle");
    newer_failure["id"] = json!(format!("in_{}_new", a.subscription_id));
    newer_failure["created"] = json!(t + 90);
    let mut older_paid = a.invoice(2000, "subscription_cycle");
    older_paid["id"] = json!(format!("in_{}_old", a.subscription_id));
    older_paid["created"] = json!(t - 30 * 86_400);
    deliver_in_order(
        &p,
        &subscribed_then(
            &a,
            t,
            [
                a.event("failed", "invoice.payment_failed", t + 100, newer_failure),
                a.event("paid_old", "invoice.paid", t + 200, older_paid),
            ],
        ),
    )
    .await;
    assert_eq!(billing(&p, &a).await["plan_status"], "past_due");
}

#[tokio::test]
async fn a_portal_cancellation_with_cancel_at_shows_when_access_ends() {
    let p = started().await;
    let a = Customer::new(&unique_tag());
    let t = now() - 1000;
    let mut cancelling = subscription(&a, "active", false, t);
    cancelling["cancel_at"] = json!(t + 30 * 86_400);
    cancelling["canceled_at"] = json!(t + 50);
    deliver_in_order(
        &p,
        &subscribed_then(
            &a,
            t,
            [a.event(
                "cancel",
                "customer.subscription.updated",
                t + 50,
                cancelling,
            )],
        ),
    )
    .await;
    let body = billing(&p, &a).await;
    let at = |key: &str| -> i64 {
        body[key]
            .as_str()
            .and_then(|s| s.parse::<chrono::DateTime<chrono::Utc>>().ok())
            .map_or(0, |d| d.timestamp())
    };
    assert_eq!(
        (at("cancel_at"), at("access_ends_at")),
        (t + 30 * 86_400, t + 30 * 86_400),
        "{body}"
    );
    assert_eq!(
        body["cancel_at_period_end"], false,
        "Stripe's own flag: {body}"
    );
    assert_eq!(body["plan_status"], "active");
}
