//! Waiting for an organization costs (almost) nothing: with a Stripe key, an event of a
//! customer linked to no organization makes the worker ask Stripe once who the customer
//! belongs to (against the fake Stripe API), and Stripe's answer links the customer, or makes
//! its events `ignored` so that none of its later events wait.

use std::time::Duration;

use e2e::harness::{FakeStripe, Pipeline, eventually, unique_tag};
use e2e::stripe_events::{Customer, event};
use serde_json::{Value, json};

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn with_stripe() -> (Pipeline, FakeStripe) {
    let (mut p, stripe) = Pipeline::start_with_fake_stripe(&[]).await;
    p.start_worker();
    (p, stripe)
}

/// A subscription event naming no organization (so only the customer's link resolves it).
fn unresolved_event(customer: &Customer, name: &str, created: i64) -> Value {
    event(
        &format!("evt_{}_{name}", customer.customer_id),
        "customer.subscription.updated",
        created,
        customer.subscription("active", false, created + 86_400),
    )
}

async fn post(p: &Pipeline, event: &Value) -> String {
    assert_eq!(p.client.post_event(event).await.0, 200);
    event["id"].as_str().expect("id").to_owned()
}

async fn wait_for_decisions(p: &Pipeline, event_id: &str, expected: &[&str]) {
    eventually(
        Duration::from_secs(20),
        &format!("decisions {expected:?} on {event_id}"),
        || async {
            let decisions = p.decisions(event_id).await;
            (decisions == expected).then_some(())
        },
    )
    .await;
}

async fn audit_detail(p: &Pipeline, event_id: &str) -> String {
    sqlx::query_scalar(
        "SELECT detail FROM billing_audit WHERE event_id = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(event_id)
    .fetch_one(&p.db.pool)
    .await
    .expect("audit row")
}

#[tokio::test]
async fn a_waiting_customer_whose_stripe_metadata_names_its_organization_is_linked_by_one_lookup() {
    let (p, stripe) = with_stripe().await;
    let customer = Customer::new(&unique_tag());
    stripe.set_customer(json!({
        "id": customer.customer_id, "object": "customer",
        "metadata": { "organization_id": customer.organization_id }
    }));
    let t = now();
    let first = post(&p, &unresolved_event(&customer, "first", t)).await;
    wait_for_decisions(&p, &first, &["deferred", "applied"]).await;
    let body = p
        .wait_for_billing(&customer.organization_id, "the event applied", |b| {
            b["plan_status"] == "active"
        })
        .await;
    assert_eq!(body["stripe_customer_id"], customer.customer_id, "{body}");

    // Linked now: the next event applies at once, and Stripe is not asked again.
    let second = post(&p, &unresolved_event(&customer, "second", t + 1)).await;
    wait_for_decisions(&p, &second, &["applied"]).await;
    let path = format!("/v1/customers/{}", customer.customer_id);
    assert_eq!(stripe.requests_to(&path), 1, "one lookup");
}

#[tokio::test]
async fn a_customer_of_no_organization_has_its_events_ignored_until_it_is_linked() {
    let (p, stripe) = with_stripe().await;
    let customer = Customer::new(&unique_tag());
    stripe
        .set_customer(json!({ "id": customer.customer_id, "object": "customer", "metadata": {} }));
    let t = now();
    let first = post(&p, &unresolved_event(&customer, "first", t)).await;
    wait_for_decisions(&p, &first, &["deferred", "ignored"]).await;
    let detail = audit_detail(&p, &first).await;
    assert!(
        detail.contains("belongs to no organization")
            && detail.contains("names no metadata.organization_id"),
        "{detail}"
    );
    // Its later events do not wait.
    let second = post(&p, &unresolved_event(&customer, "second", t + 1)).await;
    wait_for_decisions(&p, &second, &["ignored"]).await;
    let status: String = sqlx::query_scalar("SELECT status FROM webhook_events WHERE id = $1")
        .bind(&second)
        .fetch_one(&p.db.pool)
        .await
        .expect("inbox row");
    assert_eq!(status, "processed");

    // A checkout links it after all: its events apply from then on.
    let checkout = post(&p, &customer.checkout_event(t + 2)).await;
    wait_for_decisions(&p, &checkout, &["applied"]).await;
    let third = post(&p, &unresolved_event(&customer, "third", t + 3)).await;
    wait_for_decisions(&p, &third, &["applied"]).await;
    assert_eq!(p.count("foreign_customers").await, 0, "the link forgets it");
}

#[tokio::test]
async fn a_deleted_customer_is_foreign_and_a_404_leaves_the_events_waiting() {
    let (p, stripe) = with_stripe().await;
    let deleted = Customer::new(&unique_tag());
    stripe
        .set_customer(json!({ "id": deleted.customer_id, "object": "customer", "deleted": true }));
    let unknown = Customer::new(&unique_tag());
    let t = now();
    let of_deleted = post(&p, &unresolved_event(&deleted, "gone", t)).await;
    let of_unknown = post(&p, &unresolved_event(&unknown, "unknown", t)).await;
    wait_for_decisions(&p, &of_deleted, &["deferred", "ignored"]).await;
    assert!(audit_detail(&p, &of_deleted).await.contains("was deleted"));

    // Stripe knows no such customer (another account's key answers 404 too): it keeps
    // waiting on its re-check schedule rather than being declared foreign.
    let path = format!("/v1/customers/{}", unknown.customer_id);
    eventually(Duration::from_secs(20), "the 404 lookup", || async {
        (stripe.requests_to(&path) == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(p.decisions(&of_unknown).await, ["deferred"]);
    let waiting: String = sqlx::query_scalar("SELECT status FROM webhook_events WHERE id = $1")
        .bind(&of_unknown)
        .fetch_one(&p.db.pool)
        .await
        .expect("inbox row");
    assert_eq!(waiting, "deferred");
}
