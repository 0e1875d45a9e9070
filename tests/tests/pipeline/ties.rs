//! Same-second ties settled by Stripe (a Stripe key is configured): a refetch that fails or
//! does not answer holds back only its own event.

use std::time::Duration;

use e2e::harness::{FakeStripe, Pipeline, eventually, unique_tag};
use e2e::stripe_events::Customer;
use serde_json::Value;

use super::subscriptions::{billing, deliver_in_order, now, subscribed_then, subscription};

/// A worker with a Stripe key (and `extra` settings), and a customer whose subscription is
/// active since `t`; returns them with an invoice failure of that same second, which ties the
/// subscription's status when it is posted.
async fn a_tie_to_post(extra: &[(&str, &str)]) -> (Pipeline, FakeStripe, Customer, i64, Value) {
    let (stripe, stripe_url) = FakeStripe::start().await;
    let mut env = vec![
        ("STRIPE_SECRET_KEY", "sk_test_fake"),
        ("STRIPE_API_BASE", stripe_url.as_str()),
    ];
    env.extend_from_slice(extra);
    let mut p = Pipeline::start(&env).await;
    p.start_worker();
    let a = Customer::new(&unique_tag());
    let t = now() - 1000;
    deliver_in_order(&p, &subscribed_then(&a, t, [])).await;
    let tie = a.event(
        "failed",
        "invoice.payment_failed",
        t,
        a.invoice(0, "subscription_cycle"),
    );
    (p, stripe, a, t, tie)
}

#[tokio::test]
async fn a_failed_tie_refetch_fails_only_its_own_event_and_holds_no_lock() {
    let (p, stripe, a, t, tie) = a_tie_to_post(&[("RETRY_BASE_MS", "200")]).await;
    stripe.set_failing(true);
    assert_eq!(p.client.post_event(&tie).await.0, 200);
    // Another organization's events are applied while the tie's refetch keeps failing.
    let other = Customer::new(&unique_tag());
    deliver_in_order(&p, &subscribed_then(&other, t, [])).await;
    assert_eq!(billing(&p, &other).await["plan_status"], "active");
    let tie_id = tie["id"].as_str().expect("id");
    eventually(
        Duration::from_secs(20),
        "a failed attempt recorded",
        || async {
            let attempts: i32 =
                sqlx::query_scalar("SELECT attempts FROM webhook_events WHERE id = $1")
                    .bind(tie_id)
                    .fetch_one(&p.db.pool)
                    .await
                    .expect("row");
            (attempts >= 1).then_some(())
        },
    )
    .await;
    assert!(
        p.decisions(tie_id).await.is_empty(),
        "undecided while Stripe fails"
    );
    // Stripe back: Stripe's answer settles the tie.
    stripe.set_subscription(subscription(&a, "past_due", false, t));
    stripe.set_failing(false);
    assert_eq!(p.wait_for_decision(tie_id).await, ["refetched"]);
    assert_eq!(billing(&p, &a).await["plan_status"], "past_due");
}

#[tokio::test]
async fn a_batch_waiting_for_stripe_to_settle_a_tie_holds_back_no_other_batch() {
    // One apply transaction at a time: before, a batch held it while Stripe was asked.
    let (p, stripe, _a, t, tie) = a_tie_to_post(&[("APPLY_TRANSACTIONS", "1")]).await;
    stripe.set_hanging(true);
    assert_eq!(p.client.post_event(&tie).await.0, 200);
    eventually(
        Duration::from_secs(10),
        "the tie's refetch to be asked",
        || async { (stripe.requests() >= 1).then_some(()) },
    )
    .await;
    // Stripe does not answer for a minute (the client gives up after 20 s); another
    // organization's events are applied meanwhile, not after.
    let other = Customer::new(&unique_tag());
    for ev in subscribed_then(&other, t, []) {
        assert_eq!(p.client.post_event(&ev).await.0, 200);
    }
    eventually(
        Duration::from_secs(8),
        "the other organization's events applied while the tie waits",
        || async {
            let (status, body) = p.client.billing(&other.organization_id).await;
            (status == 200 && body["plan_status"] == "active").then_some(())
        },
    )
    .await;
    let tie_id = tie["id"].as_str().expect("id");
    assert!(
        p.decisions(tie_id).await.is_empty(),
        "the tie waits for Stripe"
    );
}
