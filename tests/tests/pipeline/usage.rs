//! Metered usage: records in through ingest, totals out, reported to the fake Stripe's
//! Billing Meters exactly once, whatever the repeats, crashes and 429s.

use std::time::Duration;

use e2e::harness::{FakeStripe, INTERNAL_TOKEN, Pipeline, eventually, unique_tag};
use e2e::stripe_events::Customer;
use serde_json::{Value, json};

const METERS: &str = "sms_sent,ai_messages";

async fn with_stripe(extra: &[(&str, &str)]) -> (Pipeline, FakeStripe) {
    let mut env = vec![
        ("STRIPE_API_MAX_RETRIES", "6"),
        ("USAGE_METERS", METERS),
        ("USAGE_REPORT_INTERVAL", "1s"),
        ("USAGE_REPORT_LEASE", "3s"),
        ("RETRY_BASE_MS", "200"),
        ("RETRY_MAX_MS", "1000"),
    ];
    env.extend_from_slice(extra);
    Pipeline::start_with_fake_stripe(&env).await
}

fn path(org: &str) -> String {
    format!("/v1/organizations/{org}/usage")
}

async fn post_usage(p: &Pipeline, org: &str, body: &Value) -> (u16, Value) {
    let bytes = serde_json::to_vec(body).expect("json");
    let (status, answer, _) = p
        .client
        .post_internal(&path(org), bytes, Some(INTERNAL_TOKEN), None)
        .await;
    (status, answer)
}

async fn totals(p: &Pipeline, org: &str, meter: &str) -> Value {
    let (status, body) = p
        .client
        .internal_get(&format!("{}?meter={meter}", path(org)), true)
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn link(p: &Pipeline, customer: &Customer) {
    let checkout = customer.checkout_event(chrono::Utc::now().timestamp() - 60);
    assert_eq!(p.client.post_event(&checkout).await.0, 200);
    p.wait_for_decision(checkout["id"].as_str().expect("id"))
        .await;
}

/// Waits until the organization has nothing pending for the meter; returns its totals.
async fn wait_reported(p: &Pipeline, org: &str, meter: &str) -> Value {
    eventually(Duration::from_secs(30), "usage reported", || async {
        let body = totals(p, org, meter).await;
        (body["pending"] == 0 && body["reported"].as_i64().unwrap_or(0) > 0).then_some(body)
    })
    .await
}

fn sent_for(stripe: &FakeStripe, customer: &str, meter: &str) -> (usize, i64) {
    let events: Vec<Value> = stripe
        .meter_events()
        .into_iter()
        .filter(|e| e["payload"]["stripe_customer_id"] == customer && e["event_name"] == meter)
        .collect();
    let sum = events
        .iter()
        .map(|e| {
            e["payload"]["value"]
                .as_str()
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        })
        .sum();
    (events.len(), sum)
}

#[tokio::test]
async fn repeats_and_a_crash_after_stripes_answer_still_count_usage_exactly_once() {
    let (mut p, stripe) = with_stripe(&[]).await;
    p.start_worker();
    let c = Customer::new(&unique_tag());
    link(&p, &c).await;
    let batch = json!({ "records": [
        { "meter": "sms_sent", "value": 3, "identifier": "sms-1" },
        { "meter": "sms_sent", "value": 4, "identifier": "sms-2" },
        { "meter": "sms_sent", "value": 5, "identifier": "sms-3" }
    ] });
    // The worker reports between these two only if it is fast: stop it first.
    drop(p.worker.take());
    assert_eq!(
        post_usage(&p, &c.organization_id, &batch).await,
        (202, json!({ "accepted": 3, "duplicates": 0 }))
    );
    assert_eq!(
        post_usage(&p, &c.organization_id, &batch).await,
        (202, json!({ "accepted": 0, "duplicates": 3 }))
    );
    assert_eq!(
        totals(&p, &c.organization_id, "sms_sent").await["pending"],
        12
    );

    // Stripe takes the meter event, then the worker dies before it can record the answer.
    stripe.hang_after_meter_event(true);
    p.start_worker();
    eventually(
        Duration::from_secs(20),
        "the meter event reached Stripe",
        || async { (!stripe.meter_events().is_empty()).then_some(()) },
    )
    .await;
    p.worker.as_mut().expect("worker").kill();
    let status: String = sqlx::query_scalar("SELECT status FROM usage_reports")
        .fetch_one(&p.db.pool)
        .await
        .expect("report");
    assert_eq!(status, "sending", "the answer was never recorded");

    stripe.hang_after_meter_event(false);
    p.start_worker();
    let body = wait_reported(&p, &c.organization_id, "sms_sent").await;
    assert_eq!(
        (body["reported"].as_i64(), body["pending"].as_i64()),
        (Some(12), Some(0)),
        "{body}"
    );
    let calls = stripe.posts_to("/v1/billing/meter_events");
    assert!(
        calls.len() >= 2,
        "sent again after the crash: {}",
        calls.len()
    );
    assert!(
        calls
            .windows(2)
            .all(|w| w[0].param("identifier") == w[1].param("identifier")),
        "one identifier"
    );
    assert_eq!(
        sent_for(&stripe, &c.customer_id, "sms_sent"),
        (1, 12),
        "one meter event, the records' sum"
    );
}

#[tokio::test]
async fn usage_of_an_organization_linked_late_is_reported_once_linked() {
    let (mut p, stripe) = with_stripe(&[]).await;
    p.start_worker();
    let c = Customer::new(&unique_tag());
    let (status, _) = post_usage(
        &p,
        &c.organization_id,
        &json!({ "meter": "ai_messages", "value": 7 }),
    )
    .await;
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(
        stripe.meter_events().is_empty(),
        "no customer yet: nothing sent"
    );
    assert_eq!(
        totals(&p, &c.organization_id, "ai_messages").await["pending"],
        7
    );

    link(&p, &c).await;
    let body = wait_reported(&p, &c.organization_id, "ai_messages").await;
    assert_eq!(body["reported"], 7);
    assert_eq!(sent_for(&stripe, &c.customer_id, "ai_messages"), (1, 7));
}

#[tokio::test]
async fn bad_usage_is_refused_by_index_and_field_and_nothing_is_stored() {
    let (p, _stripe) = with_stripe(&[]).await;
    let org = format!("org_{}", unique_tag());
    let now = chrono::Utc::now().timestamp();
    let many: Vec<Value> = (0..1_001)
        .map(|n| json!({ "meter": "sms_sent", "value": 1, "identifier": format!("m{n}") }))
        .collect();
    let cases: Vec<(Value, &str)> = vec![
        (json!({ "meter": "sms_snet", "value": 1 }), "meter"),
        (json!({ "meter": "sms_sent", "value": 0 }), "value"),
        (json!({ "meter": "sms_sent", "value": -3 }), "value"),
        (
            json!({ "meter": "sms_sent", "value": 10_000_000_000_i64 }),
            "value",
        ),
        (
            json!({ "meter": "sms_sent", "value": 1, "timestamp": now - 36 * 86_400 }),
            "timestamp",
        ),
        (
            json!({ "meter": "sms_sent", "value": 1, "timestamp": now + 600 }),
            "timestamp",
        ),
        (
            json!({ "records": [{ "meter": "sms_sent", "value": 1 }, { "meter": "sms_sent", "value": 2, "timestamp": now + 600 }] }),
            "records[1].timestamp",
        ),
        (json!({ "records": many }), "records"),
    ];
    for (body, field) in cases {
        let (status, answer) = post_usage(&p, &org, &body).await;
        assert_eq!(
            (
                status,
                answer["error"]["code"].as_str(),
                answer["error"]["field"].as_str()
            ),
            (422, Some("invalid_field"), Some(field)),
            "{answer}"
        );
    }
    let (status, answer, _) = p
        .client
        .post_internal(&path(&org), b"{nope".to_vec(), Some(INTERNAL_TOKEN), None)
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let (status, answer, _) = p
        .client
        .post_internal(
            &path(&org),
            br#"{"meter": "sms_sent", "value": 1}"#.to_vec(),
            None,
            None,
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_records")
        .fetch_one(&p.db.pool)
        .await
        .expect("count");
    assert_eq!(stored, 0, "nothing stored");
    let (status, answer) = p
        .client
        .internal_get(&format!("{}?meter=sms_snet", path(&org)), true)
        .await;
    assert_eq!(
        (status, answer["error"]["field"].as_str()),
        (422, Some("meter"))
    );
}

#[tokio::test]
async fn a_429_storm_loses_nothing_keeps_the_rate_and_one_call_per_customer_and_meter() {
    let (mut p, stripe) = with_stripe(&[
        ("STRIPE_API_RATE_LIMIT", "8"),
        ("STRIPE_API_MAX_RETRIES", "8"),
    ])
    .await;
    stripe.limit_rate(8.0, 2.0);
    stripe.inject(std::iter::repeat_n(429, 12));
    let tag = unique_tag();
    let customers: Vec<Customer> = (0..8)
        .map(|n| Customer::new(&format!("{tag}_{n}")))
        .collect();
    p.start_worker();
    for c in &customers {
        link(&p, c).await;
        for meter in ["sms_sent", "ai_messages"] {
            let records: Vec<Value> = (1..=5)
                .map(|v| json!({ "meter": meter, "value": v }))
                .collect();
            assert_eq!(
                post_usage(&p, &c.organization_id, &json!({ "records": records }))
                    .await
                    .0,
                202
            );
        }
    }
    for c in &customers {
        for meter in ["sms_sent", "ai_messages"] {
            let body = wait_reported(&p, &c.organization_id, meter).await;
            assert_eq!(body["reported"], 15, "{body}");
            let (_, sum) = sent_for(&stripe, &c.customer_id, meter);
            assert_eq!(sum, 15, "{} {meter}", c.customer_id);
        }
    }
    assert_eq!(
        stripe.most_concurrent_meter_calls(),
        1,
        "one call per customer and meter at a time"
    );
    let peak = stripe.peak_requests_within(Duration::from_secs(1));
    assert!(
        peak <= 9,
        "at most 8 requests a second (one more for arrival jitter): {peak}"
    );
}

#[tokio::test]
async fn a_refused_meter_event_is_a_dead_letter_an_operator_replays() {
    let (mut p, stripe) = with_stripe(&[]).await;
    stripe.set_meters(&["sms_sent"]);
    p.start_worker();
    let c = Customer::new(&unique_tag());
    link(&p, &c).await;
    assert_eq!(
        post_usage(
            &p,
            &c.organization_id,
            &json!({ "meter": "ai_messages", "value": 9 })
        )
        .await
        .0,
        202
    );
    let identifier: String = eventually(Duration::from_secs(20), "a dead usage report", || async {
        sqlx::query_scalar("SELECT identifier FROM usage_reports WHERE status = 'dead'")
            .fetch_optional(&p.db.pool)
            .await
            .expect("query")
    })
    .await;
    let (code, stdout, _) = p.worker_command(&["dead-letters", "list", "--json"]).await;
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_str(&stdout).expect("json");
    let letter = listed
        .as_array()
        .expect("list")
        .iter()
        .find(|l| l["id"] == identifier.as_str())
        .cloned()
        .expect("listed");
    assert_eq!(
        (letter["kind"].as_str(), letter["type"].as_str()),
        (Some("usage"), Some("usage.meter_event"))
    );
    assert!(
        letter["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("No active meter")),
        "{letter}"
    );
    assert_eq!(
        totals(&p, &c.organization_id, "ai_messages").await["dead"],
        9
    );

    // The meter is created in Stripe; the operator replays.
    stripe.set_meters(&["sms_sent", "ai_messages"]);
    let (code, stdout, stderr) = p
        .worker_command(&["dead-letters", "replay", "--id", &identifier, "--json"])
        .await;
    assert_eq!(code, 0, "{stdout} {stderr}");
    assert!(stdout.contains(r#""sent""#), "{stdout}");
    assert_eq!(sent_for(&stripe, &c.customer_id, "ai_messages"), (1, 9));
    assert_eq!(
        totals(&p, &c.organization_id, "ai_messages").await["reported"],
        9
    );
}
