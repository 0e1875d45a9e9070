//! Billing actions of the product's backend: Checkout and Customer Portal sessions against the
//! fake Stripe API, their exact parameters, one customer per organization, and isolation from
//! the webhook route.

use std::time::{Duration, Instant};

use e2e::harness::{FakeStripe, INTERNAL_TOKEN, Pipeline, unique_tag};
use e2e::stripe_events::{BASIC_PRICE, Customer, PREMIUM_PRICE};
use serde_json::{Value, json};

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn with_stripe(extra: &[(&str, &str)]) -> (Pipeline, FakeStripe) {
    let mut env = vec![("STRIPE_API_MAX_RETRIES", "2")];
    env.extend_from_slice(extra);
    let (mut p, stripe) = Pipeline::start_with_fake_stripe(&env).await;
    p.start_worker();
    (p, stripe)
}

fn checkout_path(org: &str) -> String {
    format!("/v1/organizations/{org}/checkout-sessions")
}

fn portal_path(org: &str) -> String {
    format!("/v1/organizations/{org}/portal-sessions")
}

fn urls() -> Value {
    json!({ "success_url": "https://app.example/billing/ok", "cancel_url": "https://app.example/billing" })
}

fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

async fn deliver(p: &Pipeline, events: &[Value]) {
    for ev in events {
        assert_eq!(p.client.post_event(ev).await.0, 200);
        p.wait_for_decision(ev["id"].as_str().expect("id")).await;
    }
}

async fn stored_customer(p: &Pipeline, org: &str) -> Option<String> {
    sqlx::query_scalar("SELECT stripe_customer_id FROM organizations WHERE id = $1")
        .bind(org)
        .fetch_optional(&p.db.pool)
        .await
        .expect("query")
        .flatten()
}

#[tokio::test]
async fn checkout_sends_stripe_the_exact_parameters_for_each_mode() {
    let (p, stripe) = with_stripe(&[("STRIPE_LIFETIME_PRICE_KEY", "lifetime_access")]).await;
    stripe.set_lookup_key("lifetime_access", "price_lifetime_resolved");
    let org = format!("org_{}", unique_tag());
    let body = with(
        urls(),
        json!({ "plan": "basic", "quantity": 3, "trial_period_days": 14,
                "customer_email": "it@acme.example", "organization_name": "Acme" }),
    );
    let raw = serde_json::to_vec(&body).expect("json");
    let (status, first, _) = p
        .client
        .post_internal(
            &checkout_path(&org),
            raw.clone(),
            Some(INTERNAL_TOKEN),
            Some("click-1"),
        )
        .await;
    assert_eq!(status, 200, "{first}");
    let customer = first["customer_id"].as_str().expect("customer").to_owned();
    assert!(
        first["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cs_test_")),
        "{first}"
    );
    assert!(
        first["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://")),
        "{first}"
    );
    assert_eq!(
        stored_customer(&p, &org).await.as_deref(),
        Some(customer.as_str()),
        "linked at once"
    );

    let created = stripe.posts_to("/v1/customers");
    assert_eq!(created.len(), 1);
    assert_eq!(
        created[0].form,
        [("metadata[organization_id]".to_owned(), org.clone())]
    );
    assert!(
        created[0]
            .idempotency_key
            .as_deref()
            .is_some_and(|k| k.starts_with("organization-customer-"))
    );
    let named = stripe.posts_to(&format!("/v1/customers/{customer}"));
    assert_eq!(
        (named[0].param("name"), named[0].param("email")),
        (Some("Acme"), Some("it@acme.example"))
    );

    let sessions = stripe.posts_to("/v1/checkout/sessions");
    let session = &sessions[0];
    let expected = [
        ("mode", "subscription"),
        ("customer", customer.as_str()),
        ("client_reference_id", org.as_str()),
        ("line_items[0][price]", BASIC_PRICE),
        ("line_items[0][quantity]", "3"),
        ("subscription_data[trial_period_days]", "14"),
        ("subscription_data[metadata][organization_id]", org.as_str()),
        ("metadata[organization_id]", org.as_str()),
        ("automatic_tax[enabled]", "true"),
        ("customer_update[address]", "auto"),
        ("billing_address_collection", "required"),
        ("success_url", "https://app.example/billing/ok"),
        ("cancel_url", "https://app.example/billing"),
    ];
    for (key, value) in expected {
        assert_eq!(session.param(key), Some(value), "{key}: {:?}", session.form);
    }
    assert_eq!(
        session.param("payment_intent_data[metadata][organization_id]"),
        None
    );
    assert!(
        session
            .idempotency_key
            .as_deref()
            .is_some_and(|k| k.starts_with("checkout-session-"))
    );

    // The same click again: the same session, no second customer.
    let (status, again, _) = p
        .client
        .post_internal(
            &checkout_path(&org),
            raw,
            Some(INTERNAL_TOKEN),
            Some("click-1"),
        )
        .await;
    assert_eq!((status, &again["id"]), (200, &first["id"]));
    assert_eq!(stripe.customers().len(), 1);

    // Lifetime access: payment mode, the lookup key resolved once.
    for n in 0..2 {
        let buyer = format!("org_{}_{n}", unique_tag());
        let (status, answer) = p
            .client
            .post_json(
                &checkout_path(&buyer),
                &with(urls(), json!({ "mode": "payment" })),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        let session = stripe
            .posts_to("/v1/checkout/sessions")
            .pop()
            .expect("session");
        assert_eq!(session.param("mode"), Some("payment"));
        assert_eq!(
            session.param("line_items[0][price]"),
            Some("price_lifetime_resolved")
        );
        assert_eq!(
            session.param("payment_intent_data[metadata][organization_id]"),
            Some(buyer.as_str())
        );
        assert_eq!(
            session.param("subscription_data[metadata][organization_id]"),
            None
        );
    }
    assert_eq!(
        stripe.requests_to("/v1/prices"),
        1,
        "the lookup key is resolved once"
    );
}

#[tokio::test]
async fn concurrent_checkouts_create_one_customer_and_events_before_the_checkout_apply() {
    let (p, stripe) = with_stripe(&[]).await;
    let c = Customer {
        customer_id: "cus_fake_1".to_owned(),
        ..Customer::new(&unique_tag())
    };
    // A subscription event for the customer the first checkout will create: it waits (still
    // incomplete, so once applied it refuses none of the checkouts below).
    let early = c.event(
        "early",
        "customer.subscription.created",
        now() - 30,
        c.subscription("incomplete", false, now() + 86_400),
    );
    assert_eq!(p.client.post_event(&early).await.0, 200);
    let early_id = early["id"].as_str().expect("id");
    assert_eq!(p.wait_for_decision(early_id).await, ["deferred"]);

    let calls = (0..10).map(|_| {
        let client = p.client.clone();
        let path = checkout_path(&c.organization_id);
        async move {
            client
                .post_json(&path, &with(urls(), json!({ "plan": "premium" })))
                .await
        }
    });
    let answers = futures::future::join_all(calls).await;
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(answer["customer_id"], "cus_fake_1", "{answer}");
    }
    assert_eq!(
        stripe.customers().len(),
        1,
        "one customer for ten concurrent calls"
    );
    assert_eq!(
        stored_customer(&p, &c.organization_id).await.as_deref(),
        Some("cus_fake_1")
    );
    let sessions = stripe.posts_to("/v1/checkout/sessions");
    assert!(
        sessions
            .iter()
            .all(|s| s.param("line_items[0][price]") == Some(PREMIUM_PRICE))
    );

    // Released by the link: applied, not left waiting.
    let body = p
        .wait_for_billing(&c.organization_id, "the early subscription applied", |b| {
            b["plan_status"] == "incomplete"
        })
        .await;
    assert_eq!(body["stripe_customer_id"], "cus_fake_1");
    assert_eq!(p.decisions(early_id).await, ["deferred", "applied"]);
    // And a later one finds the organization at once.
    let later = c.event(
        "later",
        "customer.subscription.updated",
        now() - 10,
        c.subscription("active", false, now() + 86_400),
    );
    deliver(&p, std::slice::from_ref(&later)).await;
    assert_eq!(
        p.decisions(later["id"].as_str().expect("id")).await,
        ["applied"]
    );
}

#[tokio::test]
async fn a_subscribed_organization_gets_409_and_the_portal_fixes_a_past_due_one() {
    let (p, stripe) = with_stripe(&[]).await;
    let t = now() - 600;
    let active = Customer::new(&unique_tag());
    deliver(
        &p,
        &[
            active.checkout_event(t),
            active.event(
                "created",
                "customer.subscription.created",
                t + 1,
                active.subscription("active", false, t + 86_400),
            ),
        ],
    )
    .await;
    let (status, answer) = p
        .client
        .post_json(
            &checkout_path(&active.organization_id),
            &with(urls(), json!({ "plan": "basic" })),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (409, Some("already_subscribed")),
        "{answer}"
    );
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("portal-sessions")),
        "{answer}"
    );
    assert!(stripe.posts_to("/v1/checkout/sessions").is_empty());

    let (status, answer) = p
        .client
        .post_json(
            &portal_path(&active.organization_id),
            &json!({ "return_url": "https://app.example/billing", "flow": "subscription_cancel" }),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let portal = stripe
        .posts_to("/v1/billing_portal/sessions")
        .pop()
        .expect("portal");
    assert_eq!(portal.param("flow_data[type]"), Some("subscription_cancel"));
    assert_eq!(
        portal.param("flow_data[subscription_cancel][subscription]"),
        Some(active.subscription_id.as_str())
    );
    assert_eq!(answer["outstanding_invoice_url"], Value::Null);

    let late = Customer::new(&unique_tag());
    deliver(
        &p,
        &[
            late.checkout_event(t),
            late.event(
                "created",
                "customer.subscription.created",
                t + 1,
                late.subscription("past_due", false, t + 86_400),
            ),
        ],
    )
    .await;
    let mut open = late.invoice(0, "subscription_cycle");
    open["status"] = json!("open");
    open["hosted_invoice_url"] = json!("https://invoice.stripe.com/i/acct_test/open_invoice");
    stripe.add_invoice(open);
    let (status, answer) = p
        .client
        .post_json(
            &portal_path(&late.organization_id),
            &json!({ "return_url": "https://app.example/billing" }),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["flow"], "payment_method_update");
    assert_eq!(
        answer["outstanding_invoice_url"],
        "https://invoice.stripe.com/i/acct_test/open_invoice"
    );
    let portal = stripe
        .posts_to("/v1/billing_portal/sessions")
        .pop()
        .expect("portal");
    assert_eq!(
        (portal.param("customer"), portal.param("flow_data[type]")),
        (
            Some(late.customer_id.as_str()),
            Some("payment_method_update")
        )
    );

    let (_, billing) = p.client.billing(&late.organization_id).await;
    assert_eq!(
        billing["billing_actions"],
        json!(["portal", "fix_payment"]),
        "{billing}"
    );
    let (_, billing) = p.client.billing(&active.organization_id).await;
    assert_eq!(billing["billing_actions"], json!(["portal"]), "{billing}");
}

/// A request refused before Stripe: body, token, status, code, field.
type Refusal = (
    Vec<u8>,
    Option<&'static str>,
    u16,
    &'static str,
    Option<&'static str>,
);

#[tokio::test]
async fn each_error_path_answers_its_status_and_code_and_stores_nothing() {
    let (p, stripe) = with_stripe(&[]).await;
    let org = format!("org_{}", unique_tag());
    let basic = serde_json::to_vec(&with(urls(), json!({ "plan": "basic" }))).expect("json");
    let path = checkout_path(&org);
    let cases: Vec<Refusal> = vec![
        (basic.clone(), None, 401, "unauthorized", None),
        (
            b"{not json".to_vec(),
            Some(INTERNAL_TOKEN),
            400,
            "bad_request",
            None,
        ),
        (
            serde_json::to_vec(&with(urls(), json!({ "plan": "enterprise" }))).expect("json"),
            Some(INTERNAL_TOKEN),
            422,
            "invalid_field",
            Some("plan"),
        ),
        (
            serde_json::to_vec(&with(urls(), json!({ "mode": "payment" }))).expect("json"),
            Some(INTERNAL_TOKEN),
            422,
            "invalid_field",
            Some("mode"),
        ),
        (
            serde_json::to_vec(
                &json!({ "plan": "basic", "success_url": "/ok", "cancel_url": "/no" }),
            )
            .expect("json"),
            Some(INTERNAL_TOKEN),
            422,
            "invalid_field",
            Some("success_url"),
        ),
    ];
    for (body, token, status, code, field) in cases {
        let (got, answer, _) = p.client.post_internal(&path, body, token, None).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{answer}"
        );
        assert_eq!(answer["error"]["field"].as_str(), field, "{answer}");
    }
    let (status, answer) = p
        .client
        .post_json(
            &portal_path("org_nobody"),
            &json!({ "return_url": "https://app.example" }),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{answer}"
    );
    sqlx::query("INSERT INTO organizations (id) VALUES ($1)")
        .bind(&org)
        .execute(&p.db.pool)
        .await
        .expect("organization");
    let (status, answer) = p
        .client
        .post_json(
            &portal_path(&org),
            &json!({ "return_url": "https://app.example" }),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (409, Some("no_customer")),
        "{answer}"
    );
    assert_eq!(stripe.requests(), 0, "nothing reached Stripe");

    // Stripe refuses: its message and request id are passed on.
    stripe.deactivate_price(BASIC_PRICE);
    let (status, answer, _) = p
        .client
        .post_internal(&path, basic.clone(), Some(INTERNAL_TOKEN), None)
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (502, Some("stripe_error")),
        "{answer}"
    );
    let message = answer["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("inactive") && message.contains("req_fake_"),
        "{message}"
    );

    // Stripe down: 503 with Retry-After, and no customer link stored for a new organization.
    stripe.set_failing(true);
    let other = format!("org_{}", unique_tag());
    let (status, answer, retry_after) = p
        .client
        .post_internal(&checkout_path(&other), basic, Some(INTERNAL_TOKEN), None)
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{answer}"
    );
    assert!(retry_after.is_some(), "Retry-After");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM organizations WHERE id = $1")
        .bind(&other)
        .fetch_one(&p.db.pool)
        .await
        .expect("count");
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn without_a_stripe_key_the_actions_answer_not_configured_and_webhooks_work() {
    let mut p = Pipeline::start(&[]).await;
    p.start_worker();
    let (status, answer) = p
        .client
        .post_json(
            &checkout_path("org_x"),
            &with(urls(), json!({ "plan": "basic" })),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (503, Some("not_configured")),
        "{answer}"
    );
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("STRIPE_SECRET_KEY")),
        "{answer}"
    );
    let c = Customer::new(&unique_tag());
    deliver(&p, &[c.checkout_event(now())]).await;
}

#[tokio::test]
async fn webhooks_keep_their_latency_while_stripe_hangs() {
    let (p, stripe) = with_stripe(&[("BILLING_ACTIONS_TIMEOUT_MS", "2000")]).await;
    stripe.set_hanging(true);
    let tag = unique_tag();
    let checkouts: Vec<_> = (0..20)
        .map(|n| {
            let client = p.client.clone();
            let path = checkout_path(&format!("org_{tag}_{n}"));
            tokio::spawn(async move {
                let started = Instant::now();
                let (status, _) = client
                    .post_json(&path, &with(urls(), json!({ "plan": "basic" })))
                    .await;
                (status, started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut latencies = Vec::new();
    for n in 0..60 {
        let c = Customer::new(&format!("{tag}_hook_{n}"));
        let started = Instant::now();
        assert_eq!(p.client.post_event(&c.checkout_event(now())).await.0, 200);
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    assert!(
        p99 < Duration::from_millis(500),
        "webhook p99 {p99:?} while Stripe hangs"
    );
    for checkout in checkouts {
        let (status, took) = checkout.await.expect("checkout task");
        assert_eq!(status, 503, "a hanging Stripe is unavailable");
        assert!(
            took < Duration::from_secs(5),
            "answered within the deadline: {took:?}"
        );
    }
}
