//! Talking back to Stripe: `worker backfill`, `worker reconcile now|history` and the nightly
//! schedule, against the fake Stripe API of the harness.

use std::time::Duration;

use e2e::harness::{FakeStripe, Pipeline, unique_tag};
use e2e::stripe_events::Customer;
use serde_json::Value;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A pipeline whose worker talks to a fake Stripe (short retries), and the fake.
async fn with_stripe(extra: &[(&str, &str)]) -> (Pipeline, FakeStripe) {
    Pipeline::start_with_fake_stripe(extra).await
}

/// `worker <args> --json`: exit code and the printed JSON.
async fn json_command(p: &Pipeline, args: &[&str]) -> (i32, Value) {
    let mut args = args.to_vec();
    args.push("--json");
    let (code, stdout, stderr) = p.worker_command(&args).await;
    let value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: stdout {stdout:?}, stderr {stderr}"));
    (code, value)
}

async fn deliver_in_order(p: &Pipeline, events: &[&Value]) {
    for ev in events {
        assert_eq!(p.client.post_event(ev).await.0, 200);
        p.wait_for_decision(ev["id"].as_str().expect("id")).await;
    }
}

async fn plan_status(p: &Pipeline, customer: &Customer) -> (String, bool) {
    let (_, body) = p.client.billing(&customer.organization_id).await;
    (
        body["plan_status"].as_str().unwrap_or("?").to_owned(),
        body["cancel_at_period_end"].as_bool().unwrap_or(false),
    )
}

#[tokio::test]
async fn missed_events_are_backfilled_and_what_no_event_tells_is_reconciled() {
    let (mut p, stripe) = with_stripe(&[]).await;
    p.start_worker();
    let start = now() - 3600;
    let mut customers = Vec::new();
    let mut delivered = 0;
    for n in 0..12 {
        let c = Customer::new(&format!("{}_{n}", unique_tag()));
        let t = start + n * 20;
        let period_end = t + 30 * 86_400;
        let checkout = c.checkout_event(t);
        let created = c.event(
            "created",
            "customer.subscription.created",
            t + 1,
            c.subscription("active", false, period_end),
        );
        // What happened next, and never reached the webhook endpoint.
        let (missed, truth, in_events_api) = match n % 3 {
            0 => (
                "customer.subscription.updated",
                c.subscription("active", true, period_end),
                true,
            ),
            1 => (
                "customer.subscription.deleted",
                c.subscription("canceled", false, period_end),
                true,
            ),
            // Stripe never generated (or no longer lists) this one: only the API knows.
            _ => (
                "customer.subscription.updated",
                c.subscription("past_due", false, period_end),
                false,
            ),
        };
        let missed = c.event("missed", missed, t + 2, truth.clone());
        for ev in [&checkout, &created] {
            stripe.add_event(ev.clone());
        }
        if in_events_api {
            stripe.add_event(missed);
        }
        stripe.set_subscription(truth.clone());
        deliver_in_order(&p, &[&checkout, &created]).await;
        delivered += 2;
        customers.push((c, truth));
    }

    let (code, backfill) = json_command(&p, &["backfill", "--since", "2h"]).await;
    assert_eq!(code, 0, "{backfill}");
    assert_eq!(
        (
            backfill["listed"].as_i64(),
            backfill["already_stored"].as_i64(),
            backfill["inserted"].as_i64()
        ),
        (Some(delivered + 8), Some(delivered), Some(8)),
        "{backfill}"
    );
    p.wait_until_all_processed(delivered + 8).await;
    let sources: Vec<(String, i64)> = sqlx::query_as(
        "SELECT source, count(*) FROM webhook_events GROUP BY source ORDER BY source",
    )
    .fetch_all(&p.db.pool)
    .await
    .expect("sources");
    assert_eq!(
        sources,
        [
            ("backfill".to_owned(), 8),
            ("webhook".to_owned(), delivered)
        ]
    );

    let (code, report) = json_command(&p, &["reconcile", "now"]).await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(report["subscriptions_listed"], 12, "{report}");
    assert_eq!(report["organizations_checked"], 12, "{report}");
    assert_eq!(
        (report["drifted"].as_i64(), report["healed"].as_i64()),
        (Some(4), Some(4)),
        "{report}"
    );
    assert_eq!(
        (
            report["orphans"].as_i64(),
            report["unlinked"].as_i64(),
            report["errors"].as_i64()
        ),
        (Some(0), Some(0), Some(0))
    );
    for (c, truth) in &customers {
        let want = (
            truth["status"].as_str().expect("status").to_owned(),
            truth["cancel_at_period_end"].as_bool().expect("flag"),
        );
        assert_eq!(plan_status(&p, c).await, want, "{}", c.organization_id);
    }

    let (code, again) = json_command(&p, &["reconcile", "now"]).await;
    assert_eq!(code, 0, "{again}");
    assert_eq!(
        (again["drifted"].as_i64(), again["healed"].as_i64()),
        (Some(0), Some(0)),
        "{again}"
    );
    let (code, history) = json_command(&p, &["reconcile", "history"]).await;
    assert_eq!(code, 0);
    let statuses: Vec<&str> = history
        .as_array()
        .expect("runs")
        .iter()
        .filter_map(|r| r["status"].as_str())
        .collect();
    assert_eq!(statuses, ["succeeded", "succeeded"]);
}

/// An organization made active by its webhooks, then canceled behind the product's back.
async fn drifted_organization(p: &Pipeline, stripe: &FakeStripe) -> (Customer, i64) {
    let c = Customer::new(&unique_tag());
    let t = now() - 600;
    let period_end = t + 30 * 86_400;
    deliver_in_order(
        p,
        &[
            &c.checkout_event(t),
            &c.event(
                "created",
                "customer.subscription.created",
                t + 1,
                c.subscription("active", false, period_end),
            ),
        ],
    )
    .await;
    stripe.set_subscription(c.subscription("canceled", false, period_end));
    (c, period_end)
}

#[tokio::test]
async fn drift_no_event_explains_is_healed_and_audited_and_a_dry_run_changes_nothing() {
    let (mut p, stripe) = with_stripe(&[]).await;
    p.start_worker();
    let (c, _) = drifted_organization(&p, &stripe).await;

    let (code, dry) = json_command(&p, &["reconcile", "now", "--dry-run"]).await;
    assert_eq!(code, 0, "{dry}");
    assert_eq!(
        (dry["drifted"].as_i64(), dry["healed"].as_i64()),
        (Some(1), Some(0)),
        "{dry}"
    );
    let change = &dry["drift"][0]["changes"][0];
    assert_eq!(
        (
            change["field"].as_str(),
            change["stored"].as_str(),
            change["stripe"].as_str()
        ),
        (Some("status"), Some("active"), Some("canceled")),
        "{dry}"
    );
    assert_eq!(
        plan_status(&p, &c).await.0,
        "active",
        "a dry run changes nothing"
    );
    assert_eq!(p.decisions("reconcile_run_1").await.len(), 0);

    let (code, report) = json_command(&p, &["reconcile", "now"]).await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        (report["drifted"].as_i64(), report["healed"].as_i64()),
        (Some(1), Some(1)),
        "{report}"
    );
    assert_eq!(plan_status(&p, &c).await.0, "canceled");
    let run_id = report["run_id"].as_i64().expect("run id");
    let audit: (String, Option<String>, Option<String>, String) = sqlx::query_as(
        "SELECT decision, status_before::text, status_after::text, detail FROM billing_audit
         WHERE event_id = $1",
    )
    .bind(format!("reconcile_run_{run_id}"))
    .fetch_one(&p.db.pool)
    .await
    .expect("audit row");
    assert_eq!(
        (audit.0.as_str(), audit.1.as_deref(), audit.2.as_deref()),
        ("reconciled", Some("active"), Some("canceled"))
    );
    assert!(
        audit.3.contains("status: active -> canceled"),
        "{}",
        audit.3
    );
}

#[tokio::test]
async fn after_a_reconciliation_an_older_event_is_stale_and_a_newer_one_applies() {
    let (mut p, stripe) = with_stripe(&[]).await;
    p.start_worker();
    let (c, period_end) = drifted_organization(&p, &stripe).await;
    let (code, report) = json_command(&p, &["reconcile", "now"]).await;
    assert_eq!((code, report["healed"].as_i64()), (0, Some(1)), "{report}");

    // Delivered late: an update from before the fetch.
    let older = c.event(
        "late",
        "customer.subscription.updated",
        now() - 60,
        c.subscription("active", true, period_end),
    );
    deliver_in_order(&p, &[&older]).await;
    assert_eq!(
        p.decisions(older["id"].as_str().expect("id")).await,
        ["stale"]
    );
    assert_eq!(plan_status(&p, &c).await.0, "canceled");

    let mut revived = c
        .with_subscription("new")
        .subscription("active", false, period_end + 100);
    revived["created"] = Value::from(now() + 5);
    let newer = c.with_subscription("new").event(
        "created",
        "customer.subscription.created",
        now() + 5,
        revived,
    );
    deliver_in_order(&p, &[&newer]).await;
    assert_eq!(
        p.decisions(newer["id"].as_str().expect("id")).await,
        ["applied"]
    );
    assert_eq!(plan_status(&p, &c).await.0, "active");
}

#[tokio::test]
async fn the_client_keeps_its_rate_and_a_run_through_429s_and_500s_still_succeeds() {
    let (p, stripe) = with_stripe(&[
        ("STRIPE_API_RATE_LIMIT", "10"),
        ("STRIPE_API_MAX_RETRIES", "6"),
    ])
    .await;
    let tag = unique_tag();
    for n in 0..1_500 {
        let c = Customer::new(&format!("{tag}_{n:04}"));
        stripe.set_subscription(c.subscription("active", false, now() + 86_400));
    }
    // Stripe's own limit matches the configured rate, with a burst of two: any faster client
    // would be refused.
    stripe.limit_rate(10.0, 2.0);
    stripe.inject([429, 500, 429, 503]);
    let (code, report) = json_command(&p, &["reconcile", "now"]).await;
    assert_eq!(code, 0, "{}", report["error"]);
    assert_eq!(report["status"], "succeeded");
    assert_eq!(report["subscriptions_listed"], 1_500);
    assert_eq!(
        report["unlinked"], 1_500,
        "no organization knows these customers"
    );
    assert_eq!(
        stripe.requests() - stripe.served(),
        4,
        "only the injected answers were refusals: the fake's limiter never refused"
    );
    let peak = stripe.peak_requests_within(Duration::from_secs(1));
    assert!(
        peak <= 11,
        "at most 10 requests a second (one more for arrival jitter): {peak}"
    );
}

#[tokio::test]
async fn a_run_that_cannot_finish_is_failed_and_the_next_resumes_from_its_cursor() {
    let (p, stripe) = with_stripe(&[("STRIPE_API_MAX_RETRIES", "2")]).await;
    let tag = unique_tag();
    for n in 0..250 {
        let c = Customer::new(&format!("{tag}_{n:03}"));
        stripe.set_subscription(c.subscription("active", false, now() + 86_400));
    }
    stripe.fail_from(2);
    let (code, failed) = json_command(&p, &["reconcile", "now"]).await;
    assert_eq!(code, 1, "{failed}");
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["subscriptions_listed"], 100);
    let error = failed["error"].as_str().expect("error");
    assert!(
        error.contains("listing subscriptions") && error.contains("500"),
        "{error}"
    );
    let cursor: Option<String> =
        sqlx::query_scalar("SELECT cursor FROM reconciliation_runs WHERE id = $1")
            .bind(failed["run_id"].as_i64())
            .fetch_one(&p.db.pool)
            .await
            .expect("run");
    assert!(
        cursor.is_some_and(|c| c.starts_with("sub_")),
        "the cursor is kept"
    );

    stripe.fail_from(0);
    let (code, resumed) = json_command(&p, &["reconcile", "now"]).await;
    assert_eq!(code, 0, "{resumed}");
    assert_eq!(resumed["resumed_from"], failed["run_id"]);
    assert_eq!(
        resumed["subscriptions_listed"], 150,
        "only the rest is listed again"
    );
}

#[tokio::test]
async fn two_workers_run_one_scheduled_reconciliation_per_tick() {
    let (mut p, stripe) = with_stripe(&[("RECONCILE_SCHEDULE", "*/2 * * * * *")]).await;
    let c = Customer::new(&unique_tag());
    stripe.set_subscription(c.subscription("active", false, now() + 86_400));
    p.start_worker();
    let first = p.worker.take();
    p.start_worker();
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    drop(first);
    drop(p.worker.take());
    let runs: Vec<(chrono::DateTime<chrono::Utc>, String)> = sqlx::query_as(
        "SELECT scheduled_for, status FROM reconciliation_runs WHERE trigger = 'schedule'
         ORDER BY scheduled_for",
    )
    .fetch_all(&p.db.pool)
    .await
    .expect("runs");
    assert!(runs.len() >= 3, "a run every two seconds: {runs:?}");
    let finished = runs.iter().filter(|(_, s)| s == "succeeded").count();
    assert!(finished >= runs.len() - 1, "{runs:?}");
    // One listing and one backfill per tick, whichever worker ran it. The workers are killed
    // at a moment of their own: a run claimed just before may not have asked Stripe yet.
    let asked = finished..=runs.len();
    let listings = stripe.requests_to("/v1/subscriptions?");
    assert!(asked.contains(&listings), "{listings} listings: {runs:?}");
    let backfills = stripe.requests_to("/v1/events?");
    assert!(
        asked.contains(&backfills),
        "{backfills} backfills: {runs:?}"
    );
}

#[tokio::test]
async fn bad_arguments_settings_and_keys_are_refused_clearly_and_change_nothing() {
    let (p, _stripe) = with_stripe(&[]).await;
    let cases: [(&[&str], i32, &str); 4] = [
        (&["reconcile", "sideways"], 2, "unrecognized subcommand"),
        (
            &["reconcile", "now", "--everything"],
            2,
            "unexpected argument",
        ),
        (
            &["backfill", "--since", "45d"],
            2,
            "Stripe keeps events for 30 days",
        ),
        (&["backfill"], 2, "--since"),
    ];
    for (args, code, message) in cases {
        let (got, _, stderr) = p.worker_command(args).await;
        assert_eq!(got, code, "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    let (code, _, stderr) = p
        .worker_command_with(&[("STRIPE_SECRET_KEY", "")], &["reconcile", "now"])
        .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("STRIPE_SECRET_KEY is required"), "{stderr}");
    let (code, _, stderr) = p
        .worker_command_with(&[("RECONCILE_SCHEDULE", "at three")], &["run"])
        .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("RECONCILE_SCHEDULE is invalid"), "{stderr}");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM reconciliation_runs")
        .fetch_one(&p.db.pool)
        .await
        .expect("count");
    assert_eq!(runs, 0, "nothing ran");

    // A live key against a deployment whose events are test-mode: refused, nothing healed.
    let c = Customer::new(&unique_tag());
    assert_eq!(p.client.post_event(&c.checkout_event(now())).await.0, 200);
    let (code, stdout, stderr) = p
        .worker_command_with(
            &[("STRIPE_SECRET_KEY", "sk_live_fake")],
            &["reconcile", "now"],
        )
        .await;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stderr.contains("live-mode key") && stderr.contains("test-mode"),
        "{stderr}"
    );
}
