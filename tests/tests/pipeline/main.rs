//! End-to-end tests of the real `ingest` and `worker` binaries against the machine's Postgres
//! and Redis, each test with its own database and queue prefix.

use std::time::Duration;

use e2e::harness::{Pipeline, Process, WEBHOOK_SECRET, binary, eventually, unique_tag};
use e2e::stripe_events::{Customer, event, subscription_lifecycle};
use serde_json::{Value, json};
use shared::signature::header_for;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn signed_body(tag: &str) -> Vec<u8> {
    let customer = Customer::new(tag);
    let ev = event(
        &format!("evt_{tag}"),
        "invoice.paid",
        now(),
        customer.invoice(2000, "subscription_cycle"),
    );
    // Pretty-printed, as Stripe sends it: storing a re-serialization would change the bytes.
    serde_json::to_vec_pretty(&ev).expect("serialize")
}

/// Case name, body, signature header, expected status and error code.
type Refusal = (&'static str, Vec<u8>, Option<String>, u16, &'static str);

#[tokio::test]
async fn signatures_are_checked_against_every_secret_and_rejected_requests_store_nothing() {
    let secrets = format!("whsec_rolled_old,{WEBHOOK_SECRET}");
    let p = Pipeline::start(&[
        ("STRIPE_WEBHOOK_SECRET", &secrets),
        ("WEBHOOK_BODY_LIMIT_BYTES", "16384"),
    ])
    .await;
    let c = &p.client;

    // Refusals: status, stable code, and no row.
    let body = signed_body("tampered");
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let valid_header = header_for(&body, WEBHOOK_SECRET, now());
    let valid_v1 = valid_header
        .split_once(",v1=")
        .map(|(_, v)| v.to_owned())
        .expect("v1");
    let refusals: Vec<Refusal> = vec![
        (
            "tampered body",
            tampered,
            Some(valid_header.clone()),
            400,
            "invalid_signature",
        ),
        (
            "wrong secret",
            body.clone(),
            Some(header_for(&body, "whsec_someone_else", now())),
            400,
            "invalid_signature",
        ),
        (
            "301 s old",
            body.clone(),
            Some(header_for(&body, WEBHOOK_SECRET, now() - 301)),
            400,
            "signature_expired",
        ),
        (
            "missing header",
            body.clone(),
            None,
            400,
            "missing_signature",
        ),
        (
            "garbage header",
            body.clone(),
            Some("nonsense".into()),
            400,
            "malformed_signature",
        ),
    ];
    for (case, body, header, status, code) in refusals {
        let (got, answer) = c.post_webhook_raw(body, header).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{case}: {answer}"
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{case}: {answer}"
        );
    }
    let oversized =
        serde_json::to_vec(&json!({ "id": "evt_big", "pad": "x".repeat(20_000) })).expect("json");
    let header = header_for(&oversized, WEBHOOK_SECRET, now());
    let (status, answer) = c.post_webhook_raw(oversized, Some(header)).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{answer}"
    );
    assert_eq!(
        p.count("webhook_events").await,
        0,
        "rejected requests must store nothing"
    );

    // Accepted: the second of two secrets, and one valid v1 among several.
    let accepted = signed_body("second_secret");
    let (status, answer) = c
        .post_webhook_raw(
            accepted.clone(),
            Some(header_for(&accepted, WEBHOOK_SECRET, now())),
        )
        .await;
    assert_eq!((status, answer), (200, json!({ "received": true })));
    let body = signed_body("several_v1");
    let fresh = header_for(&body, WEBHOOK_SECRET, now());
    let (t, v1) = fresh.split_once(",v1=").expect("header shape");
    let several = format!("{t},v1={},v1={v1},v1={valid_v1}", "ab".repeat(32));
    let (status, _) = c.post_webhook_raw(body, Some(several)).await;
    assert_eq!(status, 200);
    assert_eq!(p.count("webhook_events").await, 2);

    // The exact bytes are what is stored.
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT payload FROM webhook_events WHERE id = 'evt_second_secret'")
            .fetch_one(&p.db.pool)
            .await
            .expect("stored row");
    assert_eq!(stored, accepted);
}

#[tokio::test]
async fn a_duplicate_delivery_is_stored_once_enqueued_once_and_applied_once() {
    let mut p = Pipeline::start(&[]).await;
    let tag = unique_tag();
    let customer = Customer::new(&tag);
    let checkout = event(
        &format!("evt_{tag}_checkout"),
        "checkout.session.completed",
        now(),
        customer.checkout_session("subscription"),
    );
    let created = event(
        &format!("evt_{tag}_created"),
        "customer.subscription.created",
        now() + 1,
        customer.subscription("active", false, now() + 86_400),
    );
    for ev in [&checkout, &created, &created] {
        let (status, answer) = p.client.post_event(ev).await;
        assert_eq!((status, answer), (200, json!({ "received": true })));
    }
    assert_eq!(p.count("webhook_events").await, 2);
    assert_eq!(
        p.queue.waiting_jobs(),
        2,
        "the duplicate must not be enqueued again"
    );

    p.start_worker();
    p.wait_for_billing(&customer.organization_id, "active", |b| {
        b["plan_status"] == "active"
    })
    .await;
    // The duplicate delivery after processing is also accepted and changes nothing.
    let (status, _) = p.client.post_event(&created).await;
    assert_eq!(status, 200);
    // Each event has one final decision; the worker may first have deferred the subscription
    // event if it ran before the checkout committed (it is released when the link is written).
    for id in [format!("evt_{tag}_checkout"), format!("evt_{tag}_created")] {
        let decisions = p.wait_for_decision(&id).await;
        let finals: Vec<&String> = decisions.iter().filter(|d| *d != "deferred").collect();
        assert_eq!(finals, ["applied"], "{id}: {decisions:?}");
    }
    assert_eq!(p.count("processed_events").await, 2);
}

#[tokio::test]
async fn a_subscription_lifecycle_drives_the_billing_endpoint_step_by_step() {
    let mut p = Pipeline::start(&[]).await;
    p.start_worker();
    let customer = Customer::new(&unique_tag());
    let (status, _) = p.client.billing(&customer.organization_id).await;
    assert_eq!(status, 404, "unknown before its checkout");

    for (n, step) in subscription_lifecycle(&customer, now())
        .into_iter()
        .enumerate()
    {
        let (status, _) = p.client.post_event(&step.event).await;
        assert_eq!(status, 200, "step {n}");
        let event_id = step.event["id"].as_str().expect("event id");
        let decisions = p.wait_for_decision(event_id).await;
        assert_eq!(decisions, ["applied"], "step {n} has exactly one decision");
        let (status, body) = p.client.billing(&customer.organization_id).await;
        assert_eq!(status, 200, "step {n}");
        assert_eq!(
            (
                body["plan_status"].as_str(),
                body["cancel_at_period_end"].as_bool()
            ),
            (Some(step.plan_status), Some(step.cancel_at_period_end)),
            "step {n} ({}): {body}",
            step.event["type"]
        );
        let access = match step.plan_status {
            "none" | "active" | "trialing" => "full",
            "past_due" => "read_only",
            _ => "blocked",
        };
        assert_eq!(body["access"], access, "step {n}: {body}");
        assert_eq!(
            body["stripe_customer_id"],
            json!(customer.customer_id),
            "step {n}"
        );
        // The checkout names its subscription, but the organization's subscription is the one
        // its subscriptions' own events make govern.
        let governing = (n >= 1).then_some(&customer.subscription_id);
        assert_eq!(body["stripe_subscription_id"], json!(governing), "step {n}");
        if n >= 1 {
            assert_eq!(body["plan"], "premium", "step {n}: {body}");
            assert!(body["current_period_end"].is_string(), "step {n}: {body}");
        }
    }
    assert_eq!(p.count("webhook_events").await, 8);
}

#[tokio::test]
async fn the_billing_endpoint_requires_the_internal_token() {
    let p = Pipeline::start(&[]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/organizations/org_x/billing", p.client.base_url);
    for auth in [None, Some("Bearer wrong"), Some("Basic dGVzdA==")] {
        let mut request = http.get(&url);
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status().as_u16(), 401, "{auth:?}");
        let body: Value = response.json().await.expect("json error body");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let (status, body) = p.client.billing("org_unknown").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
}

#[tokio::test]
async fn missing_database_url_exits_non_zero_naming_it() {
    for (name, args) in [
        ("ingest", vec![]),
        ("worker", vec!["run"]),
        ("worker", vec!["migrate"]),
    ] {
        let output = std::process::Command::new(binary(name))
            .args(&args)
            .env_clear()
            .envs(pipeline_env_without_database())
            .output()
            .expect("run binary");
        assert!(!output.status.success(), "{name} {args:?} must fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("DATABASE_URL"),
            "{name} {args:?} must name DATABASE_URL: {stderr}"
        );
    }
}

/// Every variable a binary needs except `DATABASE_URL`.
fn pipeline_env_without_database() -> Vec<(&'static str, &'static str)> {
    vec![
        ("REDIS_URL", "redis://127.0.0.1:6379"),
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ("INTERNAL_API_TOKEN", "token"),
        ("STRIPE_BASIC_PRICE_KEY", "price_basic"),
        ("STRIPE_PREMIUM_PRICE_KEY", "price_premium"),
        ("STRIPE_ENTERPRISE_PRODUCT_KEY", "prod_enterprise"),
    ]
}

#[tokio::test]
async fn both_binaries_stop_cleanly_on_sigterm() {
    let mut p = Pipeline::start(&[]).await;
    p.start_worker();
    let mut worker: Process = p.worker.take().expect("worker");
    // Let the worker register before stopping it.
    eventually(Duration::from_secs(10), "worker to start", || async {
        std::fs::read_to_string(&worker.log)
            .ok()
            .filter(|l| l.contains("consuming events"))
            .map(|_| ())
    })
    .await;
    let status = worker
        .terminate(Duration::from_secs(15))
        .expect("worker exits after SIGTERM");
    assert!(status.success(), "worker exit status {status}");
    let status = p
        .ingest
        .terminate(Duration::from_secs(15))
        .expect("ingest exits after SIGTERM");
    assert!(status.success(), "ingest exit status {status}");
}

/// Events neither applied nor waiting for their organization.
async fn unfinished(p: &Pipeline) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM webhook_events WHERE status NOT IN ('processed', 'deferred')",
    )
    .fetch_one(&p.db.pool)
    .await
    .expect("count")
}

/// apalis-core 1.0 acknowledges each finished job through a channel of 4 × the fetch batch
/// that it stops draining once told to stop, until every job in flight has finished: jobs
/// finishing after that blocked on the full channel and the worker never exited. With a
/// backlog, 1,024 jobs are in flight when SIGTERM comes.
#[tokio::test]
async fn a_worker_stopped_with_a_backlog_finishes_its_jobs_in_flight_and_exits() {
    const EVENTS: u64 = 6_000;
    let mut p = Pipeline::start(&[]).await;
    let preload = std::process::Command::new(binary("worker-bench"))
        .arg("preload")
        .args(["--database-url", &p.db.url])
        .args(["--queue-prefix", &p.queue.prefix])
        .args(["--events", &EVENTS.to_string(), "--customers", "500"])
        .output()
        .expect("run worker-bench preload");
    assert!(
        preload.status.success(),
        "preload failed: {}",
        String::from_utf8_lossy(&preload.stderr)
    );
    p.start_worker();
    let http = reqwest::Client::new();
    let metrics_url = p.worker_metrics_url.clone();
    eventually(Duration::from_secs(30), "the worker to be applying", || {
        let (http, url) = (&http, &metrics_url);
        async move {
            e2e::load::worker_decisions(http, url)
                .await
                .ok()
                .filter(|&decided| decided >= 500)
        }
    })
    .await;
    let mut worker: Process = p.worker.take().expect("worker");
    let status = worker
        .terminate(Duration::from_secs(20))
        .expect("the worker exits within 20 s of SIGTERM with its backlog still queued");
    assert!(status.success(), "worker exit status {status}");
    assert!(
        unfinished(&p).await > 0,
        "the backlog was drained before SIGTERM; the test proves nothing"
    );

    // Nothing was lost: a new worker applies the rest.
    p.start_worker();
    eventually(
        Duration::from_secs(120),
        "the rest to be applied",
        || async { (unfinished(&p).await == 0).then_some(()) },
    )
    .await;
    assert_eq!(p.count("webhook_events").await, EVENTS as i64);
}

mod billing_actions;
mod claims;
mod customer_lookup;
mod enterprise;
mod hardening;
mod load;
mod metrics;
mod operators;
mod ordering;
mod payments;
mod reconcile;
mod recovery;
mod redis_eviction;
mod resolution;
mod subscriptions;
mod ties;
mod usage;
