//! Dead letters and the operators' commands, run as an operator would: the real `worker`
//! binary against the pipeline's database.

use std::time::Duration;

use e2e::harness::{FakeStripe, Pipeline, eventually, unique_tag};
use e2e::stripe_events::{Customer, event};
use serde_json::Value;

use crate::recovery::FAST_RECOVERY;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The inbox status, attempts and last error of one event.
async fn inbox(p: &Pipeline, id: &str) -> (String, i32, Option<String>) {
    sqlx::query_as("SELECT status, attempts, last_error FROM webhook_events WHERE id = $1")
        .bind(id)
        .fetch_one(&p.db.pool)
        .await
        .expect("inbox row")
}

async fn wait_until_dead(p: &Pipeline, id: &str) {
    eventually(
        Duration::from_secs(20),
        &format!("{id} to be dead"),
        || async { (inbox(p, id).await.0 == "dead").then_some(()) },
    )
    .await;
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_event_checked_again_many_times_keeps_one_audit_row_and_counts_its_deferrals() {
    let mut extra = FAST_RECOVERY.to_vec();
    extra.extend([
        ("DEFERRAL_RECHECK_BASE_MS", "100"),
        ("DEFERRAL_RECHECK_MAX_MS", "200"),
        ("DEFERRAL_WINDOW_SECS", "3600"),
    ]);
    let mut p = Pipeline::start(&extra).await;
    p.start_worker();
    let customer = Customer::new(&unique_tag());
    let updated = event(
        &format!("evt_{}_updated", customer.customer_id),
        "customer.subscription.updated",
        now() - 60,
        customer.subscription("active", false, now() + 30 * 86_400),
    );
    let id = updated["id"].as_str().expect("id");
    assert_eq!(p.client.post_event(&updated).await.0, 200);

    let deferrals = |p: &Pipeline| {
        let id = id.to_owned();
        let pool = p.db.pool.clone();
        async move {
            sqlx::query_as::<_, (String, i32, Option<chrono::DateTime<chrono::Utc>>)>(
                "SELECT status, deferrals, retry_at FROM webhook_events WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("inbox row")
        }
    };
    eventually(
        Duration::from_secs(20),
        &format!("{id} to be checked again several times"),
        || async { (deferrals(&p).await.1 >= 4).then_some(()) },
    )
    .await;
    assert_eq!(
        p.decisions(id).await,
        ["deferred"],
        "one row, not one per check"
    );
    let (status, count, _) = deferrals(&p).await;
    assert!(count >= 4, "{count}");
    assert!(status == "deferred" || status == "pending", "{status}");

    // Its customer's checkout still releases it at once.
    let checkout = customer.checkout_event(now() - 120);
    assert_eq!(p.client.post_event(&checkout).await.0, 200);
    p.wait_for_billing(
        &customer.organization_id,
        "the deferred event applied",
        |b| b["plan_status"] == "active",
    )
    .await;
    assert_eq!(p.decisions(id).await, ["deferred", "applied"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_organization_never_resolves_dies_and_replays_once_the_cause_is_fixed() {
    let mut extra = FAST_RECOVERY.to_vec();
    extra.push(("DEFERRAL_WINDOW_SECS", "1"));
    let mut p = Pipeline::start(&extra).await;
    p.start_worker();
    let customer = Customer::new(&unique_tag());
    let period_end = now() + 30 * 86_400;
    let updated = event(
        &format!("evt_{}_updated", customer.customer_id),
        "customer.subscription.updated",
        now() - 60,
        customer.subscription("active", false, period_end),
    );
    let id = updated["id"].as_str().expect("id");
    assert_eq!(p.client.post_event(&updated).await.0, 200);

    // Deferred (one audit row), checked again at the end of its window, then given up.
    wait_until_dead(&p, id).await;
    assert_eq!(p.decisions(id).await, ["deferred", "dead"]);
    let (_, _, reason) = inbox(&p, id).await;
    let reason = reason.expect("a reason");
    assert!(
        reason.contains(&format!(
            "no organization is linked to customer {}",
            customer.customer_id
        )) && reason.contains("gave up"),
        "{reason}"
    );

    let (code, stdout, stderr) = p.worker_command(&["dead-letters", "list", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let listed = json(&stdout);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"], id);
    assert_eq!(listed[0]["kind"], "event");
    assert_eq!(listed[0]["last_error"], reason.as_str());
    let (code, stdout, _) = p.worker_command(&["dead-letters", "list"]).await;
    assert_eq!(code, 0);
    assert!(
        stdout.contains(id) && stdout.contains("1 dead letters"),
        "{stdout}"
    );

    // The fix: the checkout that links the customer arrives (late). A dead letter is not
    // released by it; the operator replays it.
    let checkout = customer.checkout_event(now() - 120);
    assert_eq!(p.client.post_event(&checkout).await.0, 200);
    let checkout_id = checkout["id"].as_str().expect("id");
    assert_eq!(p.wait_for_decision(checkout_id).await, ["applied"]);
    assert_eq!(inbox(&p, id).await.0, "dead");

    let decisions_before = p.decisions(id).await;
    let (code, stdout, stderr) = p
        .worker_command(&["dead-letters", "replay", "--id", id, "--dry-run", "--json"])
        .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let dry = json(&stdout);
    assert_eq!(dry[0]["decision"], "applied", "{dry}");
    assert_eq!(dry[0]["organization_id"], customer.organization_id.as_str());
    assert_eq!(dry[0]["status_before"], "none");
    assert_eq!(dry[0]["status_after"], "active");
    assert_eq!(dry[0]["dry_run"], true);
    assert_eq!(inbox(&p, id).await.0, "dead", "a dry run changes nothing");
    assert_eq!(p.decisions(id).await, decisions_before);
    let (_, billing) = p.client.billing(&customer.organization_id).await;
    assert_eq!(billing["plan_status"], "none", "{billing}");

    let (code, stdout, stderr) = p
        .worker_command(&["dead-letters", "replay", "--id", id])
        .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(id) && stdout.contains("applied") && stdout.contains("none -> active"),
        "{stdout}"
    );
    assert_eq!(inbox(&p, id).await.0, "processed");
    assert_eq!(
        p.decisions(id).await.last().map(String::as_str),
        Some("applied")
    );
    let (_, billing) = p.client.billing(&customer.organization_id).await;
    assert_eq!(billing["plan_status"], "active", "{billing}");

    let (code, _, stderr) = p
        .worker_command(&["dead-letters", "replay", "--id", id])
        .await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("is processed, not a dead letter"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_until_max_attempts_then_replay_all_applies_them() {
    let (stripe, stripe_url) = FakeStripe::start().await;
    let mut extra = FAST_RECOVERY.to_vec();
    extra.extend([
        ("MAX_ATTEMPTS", "3"),
        ("STRIPE_SECRET_KEY", "sk_test_fake"),
        ("STRIPE_API_BASE", stripe_url.as_str()),
    ]);
    let mut p = Pipeline::start(&extra).await;
    p.start_worker();
    let customer = Customer::new(&unique_tag());
    let t = now();
    let period_end = t + 30 * 86_400;
    let checkout = customer.checkout_event(t - 10);
    let updated = event(
        &format!("evt_{}_updated", customer.customer_id),
        "customer.subscription.updated",
        t,
        customer.subscription("active", false, period_end),
    );
    // Same second as the update: a tie, settled by refetching, and Stripe answers 500.
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
    stripe.set_failing(true);
    let id = failed["id"].as_str().expect("id");
    assert_eq!(p.client.post_event(&failed).await.0, 200);

    wait_until_dead(&p, id).await;
    let (_, attempts, reason) = inbox(&p, id).await;
    assert_eq!(attempts, 3);
    assert_eq!(stripe.requests(), 3, "one refetch per attempt");
    assert!(
        reason.as_deref().is_some_and(|r| r.contains("500")),
        "{reason:?}"
    );
    assert_eq!(p.decisions(id).await, ["dead"]);

    stripe.set_failing(false);
    stripe.set_subscription(customer.subscription("past_due", false, period_end));
    let (code, stdout, stderr) = p
        .worker_command(&[
            "dead-letters",
            "replay",
            "--all",
            "--type",
            "invoice.payment_failed",
            "--since",
            "1h",
            "--json",
        ])
        .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let replayed = json(&stdout);
    assert_eq!(replayed.as_array().map(Vec::len), Some(1), "{replayed}");
    assert_eq!(replayed[0]["id"], id);
    assert_eq!(replayed[0]["decision"], "refetched");
    let (_, billing) = p.client.billing(&customer.organization_id).await;
    assert_eq!(billing["plan_status"], "past_due", "{billing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_a_dead_letter_at_once() {
    let mut p = Pipeline::start(FAST_RECOVERY).await;
    p.start_worker();
    let first = Customer::new(&unique_tag());
    let mut second = Customer::new(&unique_tag());
    second.customer_id = first.customer_id.clone();
    let mut conflicting = second.checkout_event(now());
    conflicting["id"] = format!("evt_{}_conflict", unique_tag()).into();

    let checkout = first.checkout_event(now() - 5);
    assert_eq!(p.client.post_event(&checkout).await.0, 200);
    p.wait_for_decision(checkout["id"].as_str().expect("id"))
        .await;
    let id = conflicting["id"].as_str().expect("id");
    assert_eq!(p.client.post_event(&conflicting).await.0, 200);

    wait_until_dead(&p, id).await;
    let (_, attempts, reason) = inbox(&p, id).await;
    assert_eq!(attempts, 1, "not retried");
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("is already linked to organization")),
        "{reason:?}"
    );
    assert_eq!(p.decisions(id).await, ["dead"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_explain_events_and_reject_bad_arguments() {
    let mut p = Pipeline::start(FAST_RECOVERY).await;
    p.start_worker();
    let customer = Customer::new(&unique_tag());
    let checkout = customer.checkout_event(now() - 5);
    let id = checkout["id"].as_str().expect("id");
    assert_eq!(p.client.post_event(&checkout).await.0, 200);
    assert_eq!(p.wait_for_decision(id).await, ["applied"]);

    let (code, stdout, stderr) = p.worker_command(&["events", "show", id, "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let shown = json(&stdout);
    assert_eq!(shown["event"]["id"], id);
    assert_eq!(shown["event"]["status"], "processed");
    assert_eq!(shown["decisions"][0]["decision"], "applied");
    assert_eq!(
        shown["organization"]["id"],
        customer.organization_id.as_str()
    );
    assert_eq!(shown["organization"]["access"], "full");
    assert!(shown["payload_bytes"].as_u64().is_some_and(|n| n > 1000));
    let (code, stdout, _) = p.worker_command(&["events", "show", id]).await;
    assert_eq!(code, 0);
    assert!(
        stdout.contains("status       processed") && stdout.contains(&customer.organization_id),
        "{stdout}"
    );

    let (code, stdout, _) = p.worker_command(&["events", "replay", id]).await;
    assert_eq!(code, 0);
    assert!(
        stdout.contains("was already applied (decision applied"),
        "{stdout}"
    );
    let (code, stdout, stderr) = p
        .worker_command(&["events", "replay", id, "--force", "--json"])
        .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        json(&stdout)["organization_id"],
        customer.organization_id.as_str()
    );
    assert_eq!(p.decisions(id).await.len(), 2, "the forced run is audited");

    let (code, stdout, _) = p.worker_command(&["dead-letters", "list"]).await;
    assert_eq!((code, stdout.as_str()), (0, "no dead letters match\n"));

    let rejected: &[(&[&str], i32, &str)] = &[
        (&["dead-letters", "replay"], 2, "--id"),
        (
            &["dead-letters", "replay", "--id", id, "--all"],
            2,
            "cannot be used with",
        ),
        (
            &["dead-letters", "replay", "--id", id, "--type", "x"],
            2,
            "cannot be used with",
        ),
        (
            &["dead-letters", "list", "--since", "yesterday"],
            2,
            "is not a time",
        ),
        (&["dead-letters", "list", "--limit", "0"], 2, "--limit"),
        (&["events", "show"], 2, "EVENT_ID"),
        (
            &["events", "show", "evt_missing"],
            1,
            "no event evt_missing in the inbox",
        ),
        (
            &["events", "replay", "evt_missing"],
            1,
            "no event evt_missing in the inbox",
        ),
        (
            &["dead-letters", "replay", "--id", "evt_missing"],
            1,
            "no event evt_missing in the inbox",
        ),
        (
            &["dead-letters", "replay", "--id", id],
            1,
            "is processed, not a dead letter",
        ),
    ];
    for (args, expected_code, message) in rejected {
        let (code, stdout, stderr) = p.worker_command(args).await;
        assert_eq!(code, *expected_code, "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}
