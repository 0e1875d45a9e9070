//! Nothing is lost: a worker killed mid-stream, Redis emptied mid-stream, Postgres gone from
//! under ingest, Redis gone from under ingest.

use std::collections::HashMap;
use std::time::Duration;

use e2e::harness::{IngestClient, Pipeline, TcpProxy, eventually, unique_tag};
use e2e::stripe_events::{Customer, subscription_lifecycle};
use serde_json::Value;

/// A sweeper that notices lost jobs within a couple of seconds, and short retries.
pub const FAST_RECOVERY: &[(&str, &str)] = &[
    ("SWEEP_INTERVAL_MS", "200"),
    ("SWEEP_GRACE_MS", "1500"),
    ("RETRY_BASE_MS", "100"),
    ("RETRY_MAX_MS", "1000"),
];

/// Each organization's expected final (plan_status, cancel_at_period_end).
type Expected = HashMap<String, (String, bool)>;

/// Lifecycles of `count` organizations: each one's events in order, and each one's expected
/// final (plan_status, cancel_at_period_end).
fn lifecycles(count: usize) -> (Vec<Vec<Value>>, Expected) {
    let run = unique_tag();
    let start = chrono::Utc::now().timestamp() - 3600;
    let mut streams = Vec::new();
    let mut expected = HashMap::new();
    for n in 0..count {
        let customer = Customer::new(&format!("{run}_{n}"));
        let steps = subscription_lifecycle(&customer, start + n as i64 * 20);
        let last = steps.last().expect("steps");
        expected.insert(
            customer.organization_id.clone(),
            (last.plan_status.to_owned(), last.cancel_at_period_end),
        );
        streams.push(steps.into_iter().map(|s| s.event).collect());
    }
    (streams, expected)
}

/// Delivers each organization's events in order with a pause between them, all organizations
/// at once, so the stream lasts a while. Resolves to every answer's status.
fn deliver_in_background(
    client: IngestClient,
    streams: Vec<Vec<Value>>,
    pause: Duration,
) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let senders = streams.into_iter().map(|events| {
            let client = client.clone();
            async move {
                let mut statuses = Vec::new();
                for event in events {
                    statuses.push(client.post_event(&event).await.0);
                    tokio::time::sleep(pause).await;
                }
                statuses
            }
        });
        futures::future::join_all(senders)
            .await
            .into_iter()
            .flatten()
            .collect()
    })
}

async fn processed(p: &Pipeline) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM webhook_events WHERE status = 'processed'")
        .fetch_one(&p.db.pool)
        .await
        .expect("count")
}

/// Every event applied once, and every organization in its newest event's state.
async fn assert_everything_applied_once(p: &Pipeline, total: i64, expected: &Expected) {
    p.wait_until_all_processed(total).await;
    let finals = p.final_decisions().await;
    assert_eq!(finals.len() as i64, total, "one final decision per event");
    assert!(finals.iter().all(|(_, n)| *n == 1), "{finals:?}");
    for (organization_id, (status, cancel)) in expected {
        let (_, body) = p.client.billing(organization_id).await;
        assert_eq!(
            (
                body["plan_status"].as_str(),
                body["cancel_at_period_end"].as_bool()
            ),
            (Some(status.as_str()), Some(*cancel)),
            "{organization_id}: {body}"
        );
    }
}

/// A pipeline in the middle of applying a stream of lifecycles.
struct Stream {
    p: Pipeline,
    sender: tokio::task::JoinHandle<Vec<u16>>,
    total: i64,
    expected: Expected,
}

/// Starts a pipeline and a stream of 12 lifecycles, and returns once the worker has applied
/// some of it.
async fn stream_under_way() -> Stream {
    let mut p = Pipeline::start(FAST_RECOVERY).await;
    p.start_worker();
    let (streams, expected) = lifecycles(12);
    let total = streams.iter().map(Vec::len).sum::<usize>() as i64;
    // About a second of deliveries: long enough that a batching worker is still mid-stream.
    let sender = deliver_in_background(p.client.clone(), streams, Duration::from_millis(120));
    eventually(
        Duration::from_secs(20),
        "the worker to apply events",
        || async { (processed(&p).await >= 10).then_some(()) },
    )
    .await;
    Stream {
        p,
        sender,
        total,
        expected,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_loses_nothing_and_applies_each_event_once() {
    let Stream {
        mut p,
        sender,
        total,
        expected,
    } = stream_under_way().await;
    p.worker.as_mut().expect("worker").kill();
    let applied_before_the_kill = processed(&p).await;
    p.start_worker();

    let statuses = sender.await.expect("sender");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        applied_before_the_kill < total,
        "the worker was killed mid-stream ({applied_before_the_kill} of {total} applied)"
    );
    assert_everything_applied_once(&p, total, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptying_redis_mid_stream_loses_nothing() {
    let Stream {
        mut p,
        sender,
        total,
        expected,
    } = stream_under_way().await;
    let applied_before_the_flush = processed(&p).await;
    let deleted = p.queue.flush();
    assert!(deleted > 0, "the queue's keys existed and were deleted");

    // The supervisor's part: apalis stops a worker whose registration vanished with the
    // keys, and the process exits non-zero so that it is restarted.
    let mut restarts = 0;
    eventually(
        Duration::from_secs(60),
        "every event to be processed",
        || {
            let worker = p.worker.as_mut().expect("worker");
            if let Some(status) = worker.exited() {
                assert!(!status.success(), "a worker that lost Redis exits non-zero");
                restarts += 1;
                p.start_worker();
            }
            let pool = p.db.pool.clone();
            async move {
                let pending: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM webhook_events WHERE status <> 'processed'",
                )
                .fetch_one(&pool)
                .await
                .expect("count");
                let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_events")
                    .fetch_one(&pool)
                    .await
                    .expect("count");
                (stored == total && pending == 0).then_some(())
            }
        },
    )
    .await;
    let statuses = sender.await.expect("sender");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(applied_before_the_flush < total, "flushed mid-stream");
    assert!(restarts <= 1, "restarted {restarts} times");
    assert_everything_applied_once(&p, total, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_answers_503_while_postgres_is_down_and_accepts_the_next_delivery() {
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    let port = proxy.port;
    let p = Pipeline::start_with(&[], |db| {
        assert!(db.url.contains("127.0.0.1:5432"), "{}", db.url);
        let url = db
            .url
            .replace("127.0.0.1:5432", &format!("127.0.0.1:{port}"));
        vec![("DATABASE_URL".to_owned(), url)]
    })
    .await;
    let customer = Customer::new(&unique_tag());
    let checkout = customer.checkout_event(chrono::Utc::now().timestamp());

    proxy.cut();
    let (status, body) = p.client.post_event(&checkout).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert_eq!(p.client.get_status("/readyz").await, Some(503));
    assert_eq!(p.count("webhook_events").await, 0, "nothing stored");
    assert_eq!(p.queue.waiting_jobs(), 0, "nothing enqueued");

    proxy.restore();
    let (status, body) = p.client.post_event(&checkout).await;
    assert_eq!(status, 200, "Stripe's next delivery is accepted: {body}");
    assert_eq!(p.count("webhook_events").await, 1);
    assert_eq!(p.queue.waiting_jobs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_ingest_answers_200_and_the_sweeper_delivers_the_event() {
    let proxy = TcpProxy::start("127.0.0.1:6379").await;
    let port = proxy.port;
    let mut p = Pipeline::start_with(FAST_RECOVERY, |_| {
        vec![("REDIS_URL".to_owned(), format!("redis://127.0.0.1:{port}"))]
    })
    .await;
    // The worker reaches Redis directly; only ingest loses it.
    p.start_worker();
    let customer = Customer::new(&unique_tag());
    let checkout = customer.checkout_event(chrono::Utc::now().timestamp());

    proxy.cut();
    let (status, body) = p.client.post_event(&checkout).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(p.count("webhook_events").await, 1, "stored");
    assert_eq!(p.queue.waiting_jobs(), 0, "Redis never got the job");

    let id = checkout["id"].as_str().expect("id");
    p.wait_for_decision(id).await;
    // On a busy machine the sweeper may enqueue it again before the first job runs: applied
    // once all the same, any further job is recorded as a duplicate.
    let decisions = p.decisions(id).await;
    assert_eq!(decisions[0], "applied", "{decisions:?}");
    assert!(
        decisions[1..].iter().all(|d| d == "duplicate"),
        "{decisions:?}"
    );
    let (_, billing) = p.client.billing(&customer.organization_id).await;
    assert_eq!(billing["stripe_customer_id"], customer.customer_id.as_str());
}

#[tokio::test]
async fn a_lost_job_is_enqueued_again_under_a_sustained_backlog() {
    // No worker: the jobs pushed after the loss stay waiting, a backlog that never drains.
    let p = Pipeline::start(FAST_RECOVERY).await;
    let grace = Duration::from_millis(1500);
    let t = chrono::Utc::now().timestamp();
    let lost = Customer::new(&unique_tag()).checkout_event(t - 100);
    assert_eq!(p.client.post_event(&lost).await.0, 200);
    p.queue.flush();
    tokio::time::sleep(grace + Duration::from_millis(200)).await;
    for n in 0..3 {
        let newer = Customer::new(&format!("{}_{n}", unique_tag())).checkout_event(t);
        assert_eq!(p.client.post_event(&newer).await.0, 200);
    }
    assert_eq!(p.queue.waiting_jobs(), 3, "a backlog waits");

    let queue = p.queue.event_queue().await;
    let swept = worker::sweeper::sweep(&p.db.pool, &queue, grace)
        .await
        .expect("sweep");
    assert_eq!(
        swept, 1,
        "the lost row is enqueued again though the queue is not empty"
    );
    assert_eq!(p.queue.waiting_jobs(), 4);

    // Later, the backlog still waiting: none of its rows counts as lost, nor the re-enqueued one.
    tokio::time::sleep(grace + Duration::from_millis(200)).await;
    let again = worker::sweeper::sweep(&p.db.pool, &queue, grace)
        .await
        .expect("sweep");
    assert_eq!(
        again, 0,
        "rows whose jobs still wait are not enqueued twice"
    );
    assert_eq!(p.queue.waiting_jobs(), 4);
}
