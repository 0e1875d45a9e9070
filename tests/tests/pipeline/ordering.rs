//! Stripe's real delivery: any order, duplicates, concurrency, same-second ties, events before
//! their checkout, and older API versions.

use std::collections::HashMap;
use std::time::Duration;

use e2e::harness::{FakeStripe, Pipeline, unique_tag};
use e2e::stripe_events::{Customer, event, subscription_lifecycle};
use futures::StreamExt;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The newest state each organization must end in: (plan status, cancel at period end, plan).
type Expected = HashMap<String, (&'static str, bool, Option<&'static str>)>;

/// A seed for the shuffles, printed so a failure can be replayed.
fn delivery_rng() -> (u64, rand::rngs::StdRng) {
    let seed: u64 = std::env::var("DELIVERY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("delivery seed {seed} (replay with DELIVERY_SEED={seed})");
    (seed, rand::rngs::StdRng::seed_from_u64(seed))
}

/// `count` subscription lifecycles cut at random lengths, each event delivered 1–3 times, all
/// shuffled: (the deliveries, the state each organization must end in, distinct events).
fn shuffled_lifecycles(rng: &mut impl Rng, count: i64) -> (Vec<Value>, Expected, i64) {
    let run = unique_tag();
    let start = now() - 3600;
    let mut expected = HashMap::new();
    let mut deliveries = Vec::new();
    let mut total_events = 0;
    for n in 0..count {
        let customer = Customer::new(&format!("{run}_{n}"));
        let mut steps = subscription_lifecycle(&customer, start + n * 20);
        steps.truncate(rng.random_range(1..=steps.len()));
        let newest = steps.last().expect("at least one step");
        // Once a subscription snapshot is among the events, the plan and period end are known
        // whatever the order (an older snapshot fills in what a newer invoice lacks).
        let plan = (steps.len() > 1).then_some("premium");
        expected.insert(
            customer.organization_id.clone(),
            (newest.plan_status, newest.cancel_at_period_end, plan),
        );
        total_events += steps.len() as i64;
        for step in steps {
            for _ in 0..rng.random_range(1..=3) {
                deliveries.push(step.event.clone());
            }
        }
    }
    deliveries.shuffle(rng);
    (deliveries, expected, total_events)
}

/// Posts every delivery, 16 at a time; each must be accepted.
async fn deliver(p: &Pipeline, deliveries: Vec<Value>, seed: u64) {
    let client = p.client.clone();
    let statuses: Vec<u16> = futures::stream::iter(deliveries)
        .map(|ev| {
            let client = client.clone();
            async move { client.post_event(&ev).await.0 }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "seed {seed}: every delivery is accepted: {statuses:?}"
    );
}

/// Every organization is in its newest event's state, and each of the `total_events` events
/// has exactly one final decision whatever its duplicates.
async fn assert_newest_states(p: &Pipeline, expected: &Expected, total_events: i64, seed: u64) {
    for (organization_id, (status, cancel, plan)) in expected {
        let (code, body) = p.client.billing(organization_id).await;
        assert_eq!(code, 200, "seed {seed}: {organization_id}");
        assert_eq!(
            (
                body["plan_status"].as_str(),
                body["cancel_at_period_end"].as_bool(),
                body["plan"].as_str(),
                body["current_period_end"].is_string(),
            ),
            (Some(*status), Some(*cancel), *plan, plan.is_some()),
            "seed {seed}: {organization_id}: {body}"
        );
    }
    let finals = p.final_decisions().await;
    assert_eq!(finals.len() as i64, total_events, "seed {seed}");
    assert!(
        finals.iter().all(|(_, n)| *n == 1),
        "seed {seed}: {finals:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_order_duplicated_concurrent_delivery_ends_in_the_newest_events_state() {
    let (seed, mut rng) = delivery_rng();
    let mut p = Pipeline::start(&[("WORKER_CONCURRENCY", "4")]).await;
    // Two worker processes of four jobs each: concurrent transactions on the same organizations.
    p.start_worker();
    let first_worker = p.worker.take();
    p.start_worker();

    let (deliveries, expected, total_events) = shuffled_lifecycles(&mut rng, 30);
    deliver(&p, deliveries, seed).await;
    p.wait_until_all_processed(total_events).await;
    assert_newest_states(&p, &expected, total_events, seed).await;
    drop(first_worker);
}

/// Several subscriptions per organization (replacement, upgrade by a new subscription, lifetime
/// then the old one deleted, a second one expiring incomplete), trial starts with same-second
/// invoices, portal cancellations and repeated failures on `unpaid`, and one-time purchases
/// (card, delayed methods succeeding and failing, refunds full and partial, disputes lost and
/// won, refunds arriving before their checkout): each event delivered 1–3 times, all
/// shuffled, to two workers at once. Every organization ends in the state the derivation
/// gives for its true final subscriptions and purchases, with the right payment rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_delivery_of_several_subscriptions_ends_in_the_derived_state() {
    let (seed, mut rng) = delivery_rng();
    let mut p = Pipeline::start(&[("WORKER_CONCURRENCY", "4")]).await;
    p.start_worker();
    let first_worker = p.worker.take();
    p.start_worker();

    let start = now() - 3600;
    let mut scenarios = Vec::new();
    for round in 0..3 {
        scenarios.extend(e2e::scenarios::all(
            &format!("{}_{round}", unique_tag()),
            start,
        ));
    }
    let mut deliveries = Vec::new();
    let mut total_events = 0;
    for scenario in &scenarios {
        total_events += scenario.events.len() as i64;
        for ev in &scenario.events {
            for _ in 0..rng.random_range(1..=3) {
                deliveries.push(ev.clone());
            }
        }
    }
    deliveries.shuffle(&mut rng);
    deliver(&p, deliveries, seed).await;
    p.wait_until_all_processed(total_events).await;

    for scenario in &scenarios {
        let (_, body) = p.client.billing(&scenario.customer.organization_id).await;
        let want = &scenario.expected;
        let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.timestamp());
        let got_time = |key: &str| {
            body[key]
                .as_str()
                .and_then(|s| s.parse::<chrono::DateTime<chrono::Utc>>().ok())
                .map(|t| t.timestamp())
        };
        assert_eq!(
            (
                body["plan_status"].as_str(),
                body["plan"].as_str(),
                body["stripe_subscription_id"].as_str(),
                body["cancel_at_period_end"].as_bool(),
                got_time("cancel_at"),
                got_time("access_ends_at"),
            ),
            (
                Some(want.plan_status.as_str()),
                want.plan.as_deref(),
                want.subscription_id.as_deref(),
                Some(want.cancel_at_period_end),
                time(want.cancel_at),
                time(want.access_ends_at),
            ),
            "seed {seed}: {}: {body}",
            scenario.name
        );
        let path = format!(
            "/v1/organizations/{}/payments",
            scenario.customer.organization_id
        );
        let (_, listed) = p.client.internal_get(&path, true).await;
        let mut got: Vec<(String, String, i64)> = listed["payments"]
            .as_array()
            .expect("payments")
            .iter()
            .map(|pay| {
                (
                    pay["payment_intent_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    pay["status"].as_str().unwrap_or_default().to_owned(),
                    pay["amount_refunded"].as_i64().unwrap_or_default(),
                )
            })
            .collect();
        got.sort();
        let mut want: Vec<(String, String, i64)> = scenario
            .payments
            .iter()
            .map(|(id, status, refunded)| (id.clone(), (*status).to_owned(), *refunded))
            .collect();
        want.sort();
        assert_eq!(got, want, "seed {seed}: {}: {listed}", scenario.name);
    }
    let finals = p.final_decisions().await;
    assert_eq!(finals.len() as i64, total_events, "seed {seed}");
    assert!(
        finals.iter().all(|(_, n)| *n == 1),
        "seed {seed}: {finals:?}"
    );
    drop(first_worker);
}

/// A backlog is applied in batches (many events, of many organizations, in one transaction):
/// the events of one organization share batches in any order and with their duplicates, and a
/// batch holding an event that fails still applies all the others while the failure is
/// recorded against that event alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shuffled_backlog_applied_in_batches_ends_in_the_newest_states_and_a_bad_event_fails_alone()
 {
    let (seed, mut rng) = delivery_rng();
    // One transaction at a time: every batch but the first and last takes all it can.
    let mut p = Pipeline::start(&[("APPLY_TRANSACTIONS", "1")]).await;
    // A customer owned by one organization, then a checkout claiming it for another: a
    // permanent conflict, waiting in the middle of the backlog among good events.
    let owner = Customer::new(&unique_tag());
    let checkout = owner.checkout_event(now() - 7200);
    assert_eq!(p.client.post_event(&checkout).await.0, 200);
    p.start_worker();
    p.wait_for_decision(checkout["id"].as_str().expect("id"))
        .await;
    let mut worker = p.worker.take().expect("worker");
    assert!(
        worker
            .terminate(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );

    let mut thief = Customer::new(&unique_tag());
    thief.customer_id = owner.customer_id.clone();
    let mut conflicting = thief.checkout_event(now() - 60);
    // Its own id: a checkout event's id is made from the customer's.
    conflicting["id"] = format!("evt_{}_conflict", unique_tag()).into();
    let conflicting_id = conflicting["id"].as_str().expect("id").to_owned();
    let (mut deliveries, expected, total_events) = shuffled_lifecycles(&mut rng, 30);
    deliveries.insert(deliveries.len() / 2, conflicting);
    deliver(&p, deliveries, seed).await;

    p.start_worker();
    let all = total_events + 2;
    e2e::harness::eventually(
        Duration::from_secs(90),
        &format!("all {all} events to be processed or dead"),
        || async {
            let finished: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM webhook_events WHERE status IN ('processed', 'dead')",
            )
            .fetch_one(&p.db.pool)
            .await
            .expect("count");
            (finished == all).then_some(())
        },
    )
    .await;
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM webhook_events WHERE id = $1")
            .bind(&conflicting_id)
            .fetch_one(&p.db.pool)
            .await
            .expect("conflicting event");
    assert_eq!((status.as_str(), attempts), ("dead", 1), "seed {seed}");
    // The owner's checkout and the conflict have their one final decision too.
    assert_newest_states(&p, &expected, all, seed).await;
    let log = std::fs::read_to_string(&p.worker.as_ref().expect("worker").log).expect("log");
    assert!(
        log.contains("a batch failed; applying its events one by one"),
        "seed {seed}: the conflict shared a batch with other events: {log}"
    );
    let linked: Vec<String> =
        sqlx::query_scalar("SELECT id FROM organizations WHERE stripe_customer_id = $1")
            .bind(&owner.customer_id)
            .fetch_all(&p.db.pool)
            .await
            .expect("owner");
    assert_eq!(
        linked,
        [owner.organization_id],
        "the owner keeps its customer"
    );
}

/// Posts events created in the same second: a subscription snapshot saying `active`, then a
/// failed renewal (which alone would mean `past_due`).
async fn post_same_second_tie(p: &Pipeline, customer: &Customer) -> String {
    let t = now();
    let checkout = customer.checkout_event(t - 10);
    let updated = event(
        &format!("evt_{}_updated", customer.customer_id),
        "customer.subscription.updated",
        t,
        customer.subscription("active", false, t + 86_400),
    );
    let failed = event(
        &format!("evt_{}_failed", customer.customer_id),
        "invoice.payment_failed",
        t,
        customer.invoice(0, "subscription_cycle"),
    );
    for ev in [&checkout, &updated] {
        assert_eq!(p.client.post_event(ev).await.0, 200);
        p.wait_for_decision(ev["id"].as_str().expect("id")).await;
    }
    assert_eq!(p.client.post_event(&failed).await.0, 200);
    let failed_id = failed["id"].as_str().expect("id").to_owned();
    p.wait_for_decision(&failed_id).await;
    failed_id
}

#[tokio::test]
async fn a_same_second_tie_is_settled_by_refetching_the_subscription() {
    let (stripe, stripe_url) = FakeStripe::start().await;
    let mut p = Pipeline::start(&[
        ("STRIPE_SECRET_KEY", "sk_test_fake"),
        ("STRIPE_API_BASE", &stripe_url),
    ])
    .await;
    p.start_worker();
    let customer = Customer::new(&unique_tag());
    // Stripe's truth: the retry already succeeded, the subscription is active.
    stripe.set_subscription(customer.subscription("active", false, now() + 86_400));

    let failed_id = post_same_second_tie(&p, &customer).await;
    assert_eq!(p.decisions(&failed_id).await, ["refetched"]);
    assert_eq!(stripe.requests(), 1);
    let (_, body) = p.client.billing(&customer.organization_id).await;
    assert_eq!(body["plan_status"], "active", "{body}");
}

#[tokio::test]
async fn without_the_api_a_snapshot_wins_a_same_second_tie_with_an_invoice() {
    let mut p = Pipeline::start(&[]).await;
    p.start_worker();
    let customer = Customer::new(&unique_tag());
    let failed_id = post_same_second_tie(&p, &customer).await;
    assert_eq!(p.decisions(&failed_id).await, ["tie"]);
    let (_, body) = p.client.billing(&customer.organization_id).await;
    assert_eq!(
        body["plan_status"], "active",
        "the subscription's own snapshot outranks an invoice of its second: {body}"
    );
}

#[tokio::test]
async fn a_subscription_event_before_its_checkout_is_deferred_then_applied() {
    let mut p = Pipeline::start(&[]).await;
    p.start_worker();
    let customer = Customer::new(&unique_tag());
    let t = now();
    let created = event(
        &format!("evt_{}_created", customer.customer_id),
        "customer.subscription.created",
        t,
        customer.subscription("active", false, t + 86_400),
    );
    assert_eq!(p.client.post_event(&created).await.0, 200);
    let created_id = created["id"].as_str().expect("id");
    assert_eq!(p.wait_for_decision(created_id).await, ["deferred"]);
    let (status, _) = p.client.billing(&customer.organization_id).await;
    assert_eq!(status, 404, "nothing is known of the organization yet");

    let checkout = customer.checkout_event(t - 1);
    assert_eq!(p.client.post_event(&checkout).await.0, 200);
    let body = p
        .wait_for_billing(
            &customer.organization_id,
            "the deferred event applied",
            |b| b["plan_status"] == "active",
        )
        .await;
    assert_eq!(body["plan"], "premium");
    assert_eq!(p.decisions(created_id).await, ["deferred", "applied"]);
}

#[tokio::test]
async fn events_of_an_older_api_version_apply() {
    let mut p = Pipeline::start(&[]).await;
    p.start_worker();
    let customer = Customer::new(&unique_tag());
    let t = now();
    let period_end = t + 30 * 86_400;
    let mut events = vec![
        customer.checkout_event(t),
        event(
            &format!("evt_{}_created", customer.customer_id),
            "customer.subscription.created",
            t + 1,
            customer.old_subscription("past_due", true, period_end),
        ),
        event(
            &format!("evt_{}_paid", customer.customer_id),
            "invoice.paid",
            t + 2,
            customer.old_invoice(2000, "subscription_cycle"),
        ),
    ];
    for ev in &mut events {
        ev["api_version"] = Value::from(e2e::stripe_events::OLD_API_VERSION);
        assert_eq!(p.client.post_event(ev).await.0, 200);
        assert_eq!(
            p.wait_for_decision(ev["id"].as_str().expect("id")).await,
            ["applied"]
        );
    }
    let (_, body) = p.client.billing(&customer.organization_id).await;
    assert_eq!(body["plan_status"], "active", "{body}");
    assert_eq!(body["cancel_at_period_end"], true, "{body}");
    let expected_end = chrono::DateTime::from_timestamp(period_end, 0).expect("time");
    let got_end: chrono::DateTime<chrono::Utc> = body["current_period_end"]
        .as_str()
        .expect("period end")
        .parse()
        .expect("RFC 3339");
    assert_eq!(got_end, expected_end);
}

#[tokio::test]
async fn unknown_types_and_unreadable_payloads_are_ignored_not_errors() {
    let mut p = Pipeline::start(&[]).await;
    p.start_worker();
    let tag = unique_tag();
    let customer = Customer::new(&tag);
    let unknown = event(
        &format!("evt_{tag}_plan"),
        "plan.created",
        now(),
        serde_json::json!({ "id": "plan_1" }),
    );
    let mut unreadable = event(
        &format!("evt_{tag}_sub"),
        "customer.subscription.updated",
        now(),
        customer.subscription("active", false, now()),
    );
    unreadable["data"]["object"]
        .as_object_mut()
        .expect("object")
        .remove("status");
    for ev in [&unknown, &unreadable] {
        assert_eq!(p.client.post_event(ev).await.0, 200);
        assert_eq!(
            p.wait_for_decision(ev["id"].as_str().expect("id")).await,
            ["ignored"]
        );
    }
    let statuses: Vec<String> = sqlx::query_scalar("SELECT status FROM webhook_events ORDER BY id")
        .fetch_all(&p.db.pool)
        .await
        .expect("rows");
    assert_eq!(statuses, ["processed", "processed"]);
}
