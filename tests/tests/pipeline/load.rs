//! Load: the load generator's smoke run against a real pipeline (the CI guard of the
//! benchmark), and ingest's group commit under concurrent distinct, duplicate and failing
//! deliveries.

use std::time::Duration;

use e2e::harness::{Pipeline, WEBHOOK_SECRET, binary, eventually, redis_url, unique_tag};
use e2e::stripe_events::{Customer, event};
use futures::future::join_all;
use serde_json::Value;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn a_short_load_run_has_no_errors_and_every_accepted_event_is_stored() {
    let p = Pipeline::start(&[]).await;
    let output = tokio::process::Command::new(binary("loadgen"))
        .args(["--url", &p.client.base_url])
        .args(["--secret", WEBHOOK_SECRET])
        .args(["--database-url", &p.db.url])
        .args([
            "--seconds",
            "2",
            "--customers",
            "20",
            "--json",
            "--fail-on-error",
        ])
        .args(["closed", "--connections", "4"])
        .output()
        .await
        .expect("run loadgen");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).expect("loadgen --json output");
    let accepted = report["ok"].as_i64().expect("ok count");
    assert!(accepted > 0, "{report}");
    assert_eq!(report["errors_total"], 0, "{report}");
    assert_eq!(report["verify"]["stored"], accepted, "{report}");
    assert_eq!(report["verify"]["missing"], 0, "{report}");
    assert_eq!(p.count("webhook_events").await, accepted);
    // Stored with lz4 (migration 000004): pglz was the largest CPU cost of storing a webhook.
    let compressions: Vec<Option<String>> =
        sqlx::query_scalar("SELECT DISTINCT pg_column_compression(payload) FROM webhook_events")
            .fetch_all(&p.db.pool)
            .await
            .expect("compression");
    assert_eq!(compressions, [Some("lz4".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_distinct_and_duplicate_deliveries_are_each_stored_once_and_enqueued_once() {
    let p = Pipeline::start(&[]).await;
    let tag = unique_tag();
    let customer = Customer::new(&tag);
    let events: Vec<Value> = (0..60)
        .map(|n| {
            event(
                &format!("evt_{tag}_{n}"),
                "invoice.paid",
                now(),
                customer.invoice(2000, "subscription_cycle"),
            )
        })
        .collect();
    // Every event four times, all at once: duplicates land in the same batch and in later
    // batches alike.
    let deliveries = events
        .iter()
        .cycle()
        .take(events.len() * 4)
        .map(|ev| p.client.post_event(ev));
    for (status, answer) in join_all(deliveries).await {
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(p.count("webhook_events").await, 60);
    assert_eq!(
        p.queue.waiting_jobs(),
        60,
        "each event must be enqueued exactly once"
    );
    // A delivery of an already stored event, alone in its batch, is still a 200 and no job.
    let (status, _) = p.client.post_event(&events[0]).await;
    assert_eq!(status, 200);
    assert_eq!(p.queue.waiting_jobs(), 60);
}

/// Every insert fails (the table is gone): the group commit, then each event's insert on its
/// own. One bad event among good ones fails alone: `hardening.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_commit_whose_every_insert_fails_answers_503_to_each_request_and_stores_nothing() {
    let p = Pipeline::start(&[]).await;
    let tag = unique_tag();
    let customer = Customer::new(&tag);
    let ev = |n: usize| {
        event(
            &format!("evt_{tag}_{n}"),
            "customer.subscription.updated",
            now(),
            customer.subscription("active", false, now() + 86_400),
        )
    };
    // The inbox table disappears: every insert fails.
    sqlx::query("ALTER TABLE webhook_events RENAME TO webhook_events_away")
        .execute(&p.db.pool)
        .await
        .expect("rename the inbox");
    let failing: Vec<Value> = (0..30).map(ev).collect();
    let answers = join_all(failing.iter().map(|e| p.client.post_event(e))).await;
    for (status, answer) in answers {
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (503, Some("unavailable")),
            "{answer}"
        );
    }
    sqlx::query("ALTER TABLE webhook_events_away RENAME TO webhook_events")
        .execute(&p.db.pool)
        .await
        .expect("restore the inbox");
    assert_eq!(p.count("webhook_events").await, 0);
    assert_eq!(p.queue.waiting_jobs(), 0);
    // Stripe retries; now they are stored.
    let answers = join_all(failing.iter().map(|e| p.client.post_event(e))).await;
    assert!(answers.iter().all(|(status, _)| *status == 200));
    assert_eq!(p.count("webhook_events").await, 30);
    assert_eq!(p.queue.waiting_jobs(), 30);
}

/// apalis-redis 1.0 puts every pushed job in its `scheduled` set and its fetch moves all due
/// jobs with one Lua `unpack`, which fails past about 8,000 and stops the worker. A backlog
/// that built up while no worker ran (a deploy, an outage) must not keep every new worker
/// from starting: the worker moves it to the active list in chunks first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_beyond_apalis_fetch_limit_is_drained_by_a_worker_started_after_it() {
    let mut p = Pipeline::start(&[]).await;
    let backlog = 9_000;
    let (code, stdout, stderr) = p
        .run_to_completion(
            "worker-bench",
            &[
                "preload",
                "--events",
                &backlog.to_string(),
                "--batch",
                "1000",
            ],
        )
        .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(p.queue.waiting_jobs(), backlog, "every job waits in Redis");

    p.start_worker();
    let mut worker = p.worker.take().expect("worker");
    e2e::harness::eventually(
        std::time::Duration::from_secs(120),
        "the backlog to be drained",
        || {
            if let Some(status) = worker.exited() {
                let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
                panic!("the worker stopped ({status}) on the backlog: {log}");
            }
            let pool = p.db.pool.clone();
            let waiting = p.queue.waiting_jobs();
            async move {
                let pending: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM webhook_events WHERE status = 'pending'",
                )
                .fetch_one(&pool)
                .await
                .expect("count");
                (pending == 0 && waiting == 0).then_some(())
            }
        },
    )
    .await;
    assert_eq!(p.count("webhook_events").await, backlog as i64);
    assert!(worker.exited().is_none(), "the worker is still running");

    // The drain benchmark reads the same from the worker's counter and the inbox.
    let (code, stdout, stderr) = p
        .run_to_completion(
            "worker-bench",
            &[
                "drain",
                "--metrics-url",
                &p.worker_metrics_url,
                "--events",
                &backlog.to_string(),
                "--timeout",
                "30",
                "--json",
            ],
        )
        .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("drain report");
    assert_eq!(report["statuses"]["processed"], backlog, "{report}");
}

/// Fetches of `queue` (apalis' fetch script: 7 keys, its worker set then its active list)
/// among the lines of a Redis `MONITOR`.
fn fetches_of(lines: &[String], queue: &str) -> usize {
    let shape = format!("\"7\" \"{queue}:workers\" \"{queue}:active\"");
    lines.iter().filter(|line| line.contains(&shape)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_looks_for_jobs_about_once_per_poll_interval() {
    use futures::StreamExt;
    use shared::queue::{ApplyEventV1, Job, SendEmailV1};

    // The harness' worker polls every 100 ms.
    let mut p = Pipeline::start(&[]).await;
    p.start_worker();
    let http = reqwest::Client::new();
    let metrics_url = p.worker_metrics_url.clone();
    eventually(Duration::from_secs(20), "the worker's metrics", || {
        let (http, url) = (&http, &metrics_url);
        async move { e2e::load::worker_decisions(http, url).await.ok() }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut monitor = client
        .get_async_monitor()
        .await
        .expect("MONITOR")
        .into_on_message::<String>();
    let mut lines = Vec::new();
    let watched = tokio::time::sleep(Duration::from_secs(3));
    tokio::pin!(watched);
    loop {
        tokio::select! {
            () = &mut watched => break,
            Some(line) = monitor.next() => {
                if line.contains(&p.queue.prefix) {
                    lines.push(line);
                }
            }
        }
    }
    // 3 s at one fetch per 100 ms is 30 per queue. Joined in one task, the two consumers
    // woke each other into fetching thousands of times a second.
    for queue in [
        ApplyEventV1::queue_name(&p.queue.prefix),
        SendEmailV1::queue_name(&p.queue.prefix),
    ] {
        let fetches = fetches_of(&lines, &queue);
        assert!(
            (5..=90).contains(&fetches),
            "{queue}: {fetches} fetches in 3 s of idling (expected about 30)"
        );
    }
}
