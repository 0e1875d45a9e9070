//! Which organization and which plan an event means: a customer's metadata and a setup-mode
//! checkout link the organization; several prices map to one plan, and a price of no plan is
//! reported.

use e2e::harness::{Pipeline, unique_tag};
use e2e::stripe_events::{BASIC_PRICE, Customer, event};
use serde_json::json;

use super::subscriptions::{billing, deliver_in_order, now, started, subscription};

#[tokio::test]
async fn customer_metadata_and_setup_checkouts_resolve_the_organization() {
    let p = started().await;
    let t = now() - 1000;
    // A Dashboard subscription for a customer whose metadata names the organization.
    let a = Customer::new(&unique_tag());
    let customer = json!({ "id": a.customer_id, "object": "customer",
                            "metadata": { "organization_id": a.organization_id } });
    let created = a.event(
        "created",
        "customer.subscription.created",
        t + 10,
        subscription(&a, "active", false, t),
    );
    let decisions = deliver_in_order(
        &p,
        &[
            event(
                &format!("evt_{}_customer", a.customer_id),
                "customer.created",
                t,
                customer.clone(),
            ),
            created,
        ],
    )
    .await;
    assert_eq!(decisions, [["applied"], ["applied"]]);
    assert_eq!(billing(&p, &a).await["plan_status"], "active");

    // The subscription first (it waits), then customer.updated with the metadata releases it.
    let b = Customer::new(&unique_tag());
    let created = b.event(
        "created",
        "customer.subscription.created",
        t + 10,
        subscription(&b, "active", false, t),
    );
    assert_eq!(
        deliver_in_order(&p, std::slice::from_ref(&created)).await,
        [["deferred"]]
    );
    let customer = json!({ "id": b.customer_id, "object": "customer",
                            "metadata": { "organization_id": b.organization_id } });
    deliver_in_order(
        &p,
        &[event(
            &format!("evt_{}_customer", b.customer_id),
            "customer.updated",
            t + 20,
            customer,
        )],
    )
    .await;
    p.wait_for_billing(&b.organization_id, "the released subscription", |body| {
        body["plan_status"] == "active"
    })
    .await;

    // A setup-mode checkout links its customer too.
    let c = Customer::new(&unique_tag());
    let mut setup = c.checkout_session("setup");
    setup["payment_status"] = json!("no_payment_required");
    let setup = event(
        &format!("evt_{}_setup", c.customer_id),
        "checkout.session.completed",
        t,
        setup,
    );
    let created = c.event(
        "created",
        "customer.subscription.created",
        t + 10,
        subscription(&c, "trialing", false, t),
    );
    assert_eq!(
        deliver_in_order(&p, &[setup, created]).await,
        [["applied"], ["applied"]]
    );
    let body = billing(&p, &c).await;
    assert_eq!(
        (
            body["stripe_customer_id"].as_str(),
            body["plan_status"].as_str()
        ),
        (Some(c.customer_id.as_str()), Some("trialing"))
    );
}

#[tokio::test]
async fn a_plan_maps_from_several_prices_and_an_unmapped_price_is_reported() {
    let basic_keys = format!("{BASIC_PRICE},price_basic_yearly,prod_basic_eur");
    let mut p = Pipeline::start(&[("STRIPE_BASIC_PRICE_KEY", &basic_keys)]).await;
    p.start_worker();
    let t = now() - 1000;
    let cases = [
        (
            json!({ "id": "price_basic_yearly", "product": "prod_basic" }),
            Some("basic"),
        ),
        (
            json!({ "id": "price_basic_chf", "product": "prod_basic_eur" }),
            Some("basic"),
        ),
        (
            json!({ "id": "price_grandfathered", "product": "prod_legacy" }),
            None,
        ),
    ];
    for (price, plan) in cases {
        let a = Customer::new(&unique_tag());
        let mut sub = subscription(&a, "active", false, t);
        let price_id = price["id"].clone();
        sub["items"]["data"][0]["price"] = price;
        deliver_in_order(
            &p,
            &[
                a.checkout_event(t - 10),
                a.event("created", "customer.subscription.created", t, sub),
            ],
        )
        .await;
        let body = billing(&p, &a).await;
        assert_eq!(body["plan"].as_str(), plan, "{body}");
        assert_eq!(
            body["subscriptions"][0]["price_ids"],
            json!([price_id]),
            "{body}"
        );
    }
    let log = std::fs::read_to_string(&p.worker.as_ref().expect("worker").log).expect("log");
    assert!(
        log.contains("price_grandfathered") && log.contains("maps to a plan"),
        "{log}"
    );
}
