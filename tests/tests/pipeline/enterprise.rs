//! Enterprise plan requests end to end: the endpoint's answers, the outbox, and the sales
//! email through a fake Resend — exactly once, retried, dead-lettered and replayed.

use std::time::Duration;

use e2e::harness::{
    EMAIL_FROM, FakeResend, INTERNAL_TOKEN, Pipeline, RESEND_API_KEY, ResendReply, SALES_EMAIL,
    eventually, unique_tag,
};
use serde_json::{Value, json};
use shared::db::email_outbox::{self, OutboxEmail, OutboxStatus};
use uuid::Uuid;

fn request_body(tag: &str, name: &str) -> Value {
    json!({
        "organization_id": format!("org_{tag}"),
        "organization_name": name,
        "admin_email": format!("admin+{tag}@customer.example"),
        "member_count": 420
    })
}

/// A pipeline whose worker sends to a fresh fake Resend.
async fn pipeline_with_resend(extra: &[(&str, &str)]) -> (Pipeline, FakeResend) {
    let (resend, url) = FakeResend::start().await;
    let mut env = vec![("RESEND_BASE_URL", url.as_str())];
    env.extend_from_slice(extra);
    let mut p = Pipeline::start(&env).await;
    p.start_worker();
    (p, resend)
}

/// Posts a request that must be accepted; returns its request id.
async fn submit(p: &Pipeline, body: &Value, key: Option<&str>) -> Uuid {
    let (status, answer) = p.client.enterprise_request(body, key).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "manual_review", "{answer}");
    answer["request_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("request_id is a uuid: {answer}"))
}

/// The one outbox row of a request.
async fn outbox_row(p: &Pipeline, request_id: Uuid) -> OutboxEmail {
    let rows = email_outbox::for_request(&p.db.pool, request_id)
        .await
        .expect("outbox query");
    assert_eq!(rows.len(), 1, "one outbox email per request: {rows:?}");
    rows.into_iter().next().expect("one row")
}

/// Waits until the request's outbox row satisfies `check`.
async fn wait_for_outbox(
    p: &Pipeline,
    request_id: Uuid,
    what: &str,
    check: impl Fn(&OutboxEmail) -> bool,
) -> OutboxEmail {
    eventually(
        Duration::from_secs(20),
        &format!("the outbox email to be {what}"),
        || async {
            let row = outbox_row(p, request_id).await;
            check(&row).then_some(row)
        },
    )
    .await
}

/// Waits until the email queue is drained, then a little longer for the last job to finish.
async fn wait_for_idle_email_queue(p: &Pipeline) {
    eventually(
        Duration::from_secs(20),
        "the email queue to drain",
        || async { (p.queue.waiting_email_jobs() == 0).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn an_enterprise_request_is_answered_at_once_and_sales_get_one_escaped_email() {
    let (p, resend) = pipeline_with_resend(&[]).await;
    let tag = unique_tag();
    let name = "<script>alert('pwned')</script> & Sons";
    let request_id = submit(&p, &request_body(&tag, name), None).await;

    let row = wait_for_outbox(&p, request_id, "sent", |r| r.status == OutboxStatus::Sent).await;
    let requests = resend.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let sent = &requests[0];
    let key = format!("enterprise-request/{}", row.id);
    assert_eq!(sent.idempotency_key.as_deref(), Some(key.as_str()));
    assert_eq!(
        sent.authorization.as_deref(),
        Some(format!("Bearer {RESEND_API_KEY}").as_str())
    );
    let admin = format!("admin+{tag}@customer.example");
    assert_eq!(sent.body["from"], EMAIL_FROM);
    assert_eq!(sent.body["to"], json!([SALES_EMAIL]));
    assert_eq!(sent.body["reply_to"], json!([admin]));
    assert_eq!(
        sent.body["subject"],
        format!("Enterprise plan request: {name} (420 members)")
    );
    let html = sent.body["html"].as_str().expect("html part");
    assert!(!html.contains("<script>"), "{html}");
    assert!(
        html.contains("&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt; &amp; Sons"),
        "{html}"
    );
    let text = sent.body["text"].as_str().expect("text part");
    let stored: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT created_at FROM enterprise_requests WHERE id = $1")
            .bind(request_id)
            .fetch_one(&p.db.pool)
            .await
            .expect("stored request");
    let requested_at = stored.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    for part in [html, text] {
        for detail in [
            format!("org_{tag}"),
            admin.clone(),
            "420".to_owned(),
            requested_at.clone(),
            request_id.to_string(),
        ] {
            assert!(part.contains(&detail), "{detail} missing from {part}");
        }
    }
    assert!(text.contains(&format!("Organization: {name}")), "{text}");

    // The row keeps Resend's id and the time.
    assert_eq!(row.resend_email_id, resend.email_id(&key));
    assert!(row.sent_at.is_some());
    assert_eq!((row.attempts, row.last_error.as_deref()), (0, None));

    // The job run twice more (a redelivery, a sweeper racing): nothing is sent again.
    let queue = p.queue.email_queue().await;
    queue.push(&[row.id, row.id]).await.expect("push");
    wait_for_idle_email_queue(&p).await;
    assert_eq!(resend.requests().len(), 1, "a sent email is not sent again");
    assert_eq!(resend.emails().len(), 1);
    assert_eq!(p.count("enterprise_requests").await, 1);
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_same_request_and_sends_one_email() {
    let (p, resend) = pipeline_with_resend(&[]).await;
    let tag = unique_tag();
    let body = request_body(&tag, "Acme");
    let key = format!("enterprise-{tag}");

    // Three concurrent calls and one late repeat: one request, one email.
    let calls = futures::future::join_all((0..3).map(|_| submit(&p, &body, Some(&key)))).await;
    let late = submit(&p, &body, Some(&key)).await;
    assert!(calls.iter().all(|id| *id == late), "{calls:?} vs {late}");
    assert_eq!(p.count("enterprise_requests").await, 1);
    assert_eq!(p.count("email_outbox").await, 1);

    // The same key with another body is a conflict, and stores nothing.
    let mut other = body.clone();
    other["member_count"] = json!(421);
    let (status, answer) = p.client.enterprise_request(&other, Some(&key)).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{answer}"
    );
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Idempotency-Key") && m.contains(&late.to_string())),
        "{answer}"
    );
    assert_eq!(p.count("enterprise_requests").await, 1);

    // Without a key, the same body is a new request.
    let second = submit(&p, &body, None).await;
    assert_ne!(second, late);

    wait_for_outbox(&p, late, "sent", |r| r.status == OutboxStatus::Sent).await;
    wait_for_outbox(&p, second, "sent", |r| r.status == OutboxStatus::Sent).await;
    wait_for_idle_email_queue(&p).await;
    assert_eq!(resend.emails().len(), 2, "one email per stored request");
    assert_eq!(resend.requests().len(), 2);
}

#[tokio::test]
async fn a_resend_server_error_is_retried_in_process_and_the_email_is_sent_once() {
    let (p, resend) = pipeline_with_resend(&[]).await;
    resend.script([
        ResendReply::error(500, "application_error", "An unexpected error occurred."),
        ResendReply::rate_limited(1),
    ]);
    let request_id = submit(&p, &request_body(&unique_tag(), "Acme"), None).await;
    let row = wait_for_outbox(&p, request_id, "sent", |r| r.status == OutboxStatus::Sent).await;

    let requests = resend.requests();
    assert_eq!(requests.len(), 3, "500, 429, then accepted: {requests:?}");
    let key = format!("enterprise-request/{}", row.id);
    assert!(
        requests
            .iter()
            .all(|r| r.idempotency_key.as_deref() == Some(key.as_str())),
        "every try carries the same key"
    );
    assert_eq!(resend.emails().len(), 1);
    assert_eq!(
        row.attempts, 0,
        "the tries of one job are not durable attempts"
    );
    assert_eq!(row.resend_email_id, resend.email_id(&key));
}

#[tokio::test]
async fn failures_beyond_the_in_process_tries_are_retried_durably_then_dead_then_replayed() {
    let (p, resend) = pipeline_with_resend(&[
        ("MAX_ATTEMPTS", "2"),
        ("RETRY_BASE_MS", "100"),
        ("RETRY_MAX_MS", "200"),
        ("SWEEP_INTERVAL_MS", "200"),
    ])
    .await;
    let unavailable = ResendReply::error(503, "service_unavailable", "API is down for a bit");
    resend.script(std::iter::repeat_n(unavailable, 6));
    let request_id = submit(&p, &request_body(&unique_tag(), "Acme"), None).await;

    // First job: three tries, then the attempt is recorded with a retry time, and the job
    // ends; the sweeper enqueues it again when the retry is due. Second job: MAX_ATTEMPTS
    // reached, a dead letter with Resend's reason.
    let row = wait_for_outbox(&p, request_id, "dead", |r| r.status == OutboxStatus::Dead).await;
    assert_eq!(row.attempts, 2);
    assert!(row.retry_at.is_none());
    assert!(
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("503") && e.contains("API is down for a bit")),
        "{row:?}"
    );
    assert_eq!(resend.requests().len(), 6, "3 tries in each of 2 attempts");

    let (code, stdout, stderr) = p.worker_command(&["dead-letters", "list", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(listed[0]["kind"], "email", "{listed}");
    assert_eq!(listed[0]["id"], row.id.to_string());
    assert_eq!(listed[0]["type"], "email.enterprise_request");

    // Resend is back; an operator replays it.
    let id = row.id.to_string();
    let (code, stdout, stderr) = p
        .worker_command(&["dead-letters", "replay", "--id", &id, "--dry-run", "--json"])
        .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let dry: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(dry[0]["decision"], "would_send", "{dry}");
    assert_eq!(resend.requests().len(), 6, "a dry run sends nothing");
    assert_eq!(outbox_row(&p, request_id).await.status, OutboxStatus::Dead);

    let (code, stdout, stderr) = p
        .worker_command(&["dead-letters", "replay", "--id", &id])
        .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("sent"), "{stdout}");
    let row = outbox_row(&p, request_id).await;
    assert_eq!(row.status, OutboxStatus::Sent);
    assert_eq!(resend.emails().len(), 1);
    assert!(row.resend_email_id.is_some());
}

#[tokio::test]
async fn a_validation_refusal_is_dead_at_once_with_resends_reason_and_a_replay_sends_it() {
    let (p, resend) = pipeline_with_resend(&[]).await;
    resend.script([ResendReply::error(
        422,
        "validation_error",
        "The billing.example.com domain is not verified.",
    )]);
    let request_id = submit(&p, &request_body(&unique_tag(), "Acme"), None).await;
    let row = wait_for_outbox(&p, request_id, "dead", |r| r.status == OutboxStatus::Dead).await;
    assert_eq!(row.attempts, 1);
    assert!(
        row.last_error
            .as_deref()
            .is_some_and(|e| e
                .contains("422 validation_error: The billing.example.com domain is not verified.")),
        "{row:?}"
    );
    assert_eq!(
        resend.requests().len(),
        1,
        "a permanent refusal is not retried"
    );

    // Not pending: the sweeper leaves it alone.
    let claimed = email_outbox::claim_due(&p.db.pool, Duration::ZERO, 10)
        .await
        .expect("claim");
    assert!(claimed.is_empty(), "{claimed:?}");

    // The domain is verified now; replay.
    assert!(
        email_outbox::reset_for_replay(&p.db.pool, row.id)
            .await
            .expect("replay")
    );
    assert!(
        !email_outbox::reset_for_replay(&p.db.pool, row.id)
            .await
            .expect("replay"),
        "only a dead row can be replayed"
    );
    p.queue
        .email_queue()
        .await
        .push(&[row.id])
        .await
        .expect("push");
    let row = wait_for_outbox(&p, request_id, "sent", |r| r.status == OutboxStatus::Sent).await;
    assert_eq!(resend.emails().len(), 1);
    assert_eq!(row.attempts, 0);
}

#[tokio::test]
async fn the_sweeper_query_claims_a_pending_email_once_its_job_is_older_than_the_grace() {
    // No worker: the job stays in Redis and the row stays pending.
    let p = Pipeline::start(&[]).await;
    let request_id = submit(&p, &request_body(&unique_tag(), "Acme"), None).await;
    assert_eq!(p.queue.waiting_email_jobs(), 1);
    let row = outbox_row(&p, request_id).await;
    assert_eq!(
        (row.status, row.attempts, row.retry_at),
        (OutboxStatus::Pending, 0, None)
    );

    let within_grace = email_outbox::claim_due(&p.db.pool, Duration::from_secs(3600), 10)
        .await
        .expect("claim");
    assert!(
        within_grace.is_empty(),
        "its job is recent: {within_grace:?}"
    );
    let claimed = email_outbox::claim_due(&p.db.pool, Duration::ZERO, 10)
        .await
        .expect("claim");
    assert_eq!(claimed, [row.id]);
    let after = outbox_row(&p, request_id).await;
    assert!(
        after.enqueued_at > row.enqueued_at,
        "claiming bumps enqueued_at"
    );
    let again = email_outbox::claim_due(&p.db.pool, Duration::from_secs(60), 10)
        .await
        .expect("claim");
    assert!(again.is_empty(), "a claimed row waits for the grace again");
}

/// Case name, body, bearer token, idempotency key, expected status, code and field.
type Refusal = (
    &'static str,
    Vec<u8>,
    Option<&'static str>,
    Option<&'static str>,
    u16,
    &'static str,
    Option<&'static str>,
);

#[tokio::test]
async fn enterprise_requests_are_authenticated_and_validated_and_refusals_store_nothing() {
    let p = Pipeline::start(&[]).await;
    let valid = request_body("valid", "Acme");
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        serde_json::to_vec(&body).expect("json")
    };
    let without = |field: &str| {
        let mut body = valid.clone();
        body.as_object_mut().expect("object").remove(field);
        serde_json::to_vec(&body).expect("json")
    };
    let valid_bytes = serde_json::to_vec(&valid).expect("json");
    let token = Some(INTERNAL_TOKEN);
    let refusals: Vec<Refusal> = vec![
        (
            "no token",
            valid_bytes.clone(),
            None,
            None,
            401,
            "unauthorized",
            None,
        ),
        (
            "wrong token",
            valid_bytes.clone(),
            Some("nope"),
            None,
            401,
            "unauthorized",
            None,
        ),
        (
            "not JSON",
            b"organization_id=1".to_vec(),
            token,
            None,
            400,
            "bad_request",
            None,
        ),
        (
            "not an object",
            b"[1,2]".to_vec(),
            token,
            None,
            400,
            "bad_request",
            None,
        ),
        (
            "missing organization_id",
            without("organization_id"),
            token,
            None,
            422,
            "invalid_field",
            Some("organization_id"),
        ),
        (
            "missing admin_email",
            without("admin_email"),
            token,
            None,
            422,
            "invalid_field",
            Some("admin_email"),
        ),
        (
            "malformed email",
            with("admin_email", json!("admin at customer")),
            token,
            None,
            422,
            "invalid_field",
            Some("admin_email"),
        ),
        (
            "negative member count",
            with("member_count", json!(-3)),
            token,
            None,
            422,
            "invalid_field",
            Some("member_count"),
        ),
        (
            "absurd member count",
            with("member_count", json!(1_000_001)),
            token,
            None,
            422,
            "invalid_field",
            Some("member_count"),
        ),
        (
            "member count as a string",
            with("member_count", json!("420")),
            token,
            None,
            422,
            "invalid_field",
            Some("member_count"),
        ),
        (
            "organization name as a number",
            with("organization_name", json!(7)),
            token,
            None,
            422,
            "invalid_field",
            Some("organization_name"),
        ),
        (
            "oversized organization name",
            with("organization_name", json!("x".repeat(201))),
            token,
            None,
            422,
            "invalid_field",
            Some("organization_name"),
        ),
        (
            "idempotency key with spaces",
            valid_bytes.clone(),
            token,
            Some("two words"),
            422,
            "invalid_field",
            Some("Idempotency-Key"),
        ),
        (
            "body over 16 KiB",
            with("organization_name", json!("x".repeat(20_000))),
            token,
            None,
            413,
            "payload_too_large",
            None,
        ),
    ];
    for (case, body, token, key, status, code, field) in refusals {
        let (got, answer) = p.client.post_enterprise_raw(body, token, key).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{case}: {answer}"
        );
        assert_eq!(answer["error"]["field"].as_str(), field, "{case}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{case}: {answer}");
        if let Some(field) = field {
            assert!(
                message.starts_with(field),
                "{case}: the message names the field: {message}"
            );
        }
    }
    let (_, answer) = p
        .client
        .post_enterprise_raw(with("member_count", json!(-3)), token, None)
        .await;
    assert_eq!(
        answer,
        json!({ "error": {
            "code": "invalid_field",
            "field": "member_count",
            "message": "member_count must be between 1 and 1000000"
        }})
    );
    assert_eq!(p.count("enterprise_requests").await, 0);
    assert_eq!(p.count("email_outbox").await, 0);
    assert_eq!(p.queue.waiting_email_jobs(), 0);
}
