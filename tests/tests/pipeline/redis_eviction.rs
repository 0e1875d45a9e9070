//! Redis must not evict queue data: the worker refuses an evicting `maxmemory-policy` (unless
//! `REDIS_ALLOW_EVICTION=true`), and a queued id whose data is gone anyway is dropped by the
//! promoter and its event enqueued again by the sweeper, instead of stopping the worker.

use std::time::Duration;

use e2e::harness::{Pipeline, eventually, free_port, redis_url, unique_tag};
use e2e::stripe_events::Customer;

/// The task ids in the event queue's scheduled set (parked jobs).
fn parked_ids(prefix: &str) -> Vec<String> {
    let mut conn = redis::Client::open(redis_url())
        .and_then(|c| c.get_connection())
        .expect("redis");
    redis::cmd("ZRANGE")
        .arg(format!("{prefix}:apply-event-v1:scheduled"))
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .expect("ZRANGE")
}

#[tokio::test]
async fn a_queued_job_whose_data_redis_lost_is_dropped_and_its_event_still_applied() {
    let mut p = Pipeline::start(&[("SWEEP_INTERVAL_MS", "200"), ("SWEEP_GRACE_MS", "1000")]).await;
    let customer = Customer::new(&unique_tag());
    let lost = customer.checkout_event(chrono::Utc::now().timestamp() - 10);
    assert_eq!(p.client.post_event(&lost).await.0, 200);
    let ids = parked_ids(&p.queue.prefix);
    assert_eq!(ids.len(), 1, "{ids:?}");
    // Its data vanishes as under allkeys-lru; a second id, with neither data nor metadata,
    // waits in the active list as orphan recovery would put it back.
    let queue = format!("{}:apply-event-v1", p.queue.prefix);
    let mut conn = redis::Client::open(redis_url())
        .and_then(|c| c.get_connection())
        .expect("redis");
    redis::pipe()
        .cmd("HDEL")
        .arg(format!("{queue}:data"))
        .arg(&ids[0])
        .cmd("RPUSH")
        .arg(format!("{queue}:active"))
        .arg("01JZZZZZZZZZZZZZZZZZZZZZZZ")
        .query::<()>(&mut conn)
        .expect("lose the job data");
    let other = Customer::new(&unique_tag());
    let kept = other.checkout_event(chrono::Utc::now().timestamp() - 5);
    assert_eq!(p.client.post_event(&kept).await.0, 200);

    p.start_worker();
    for event in [&kept, &lost] {
        let decisions = p.wait_for_decision(event["id"].as_str().expect("id")).await;
        assert_eq!(decisions, ["applied"], "{}", event["id"]);
    }
    let worker = p.worker.as_mut().expect("worker");
    assert!(
        worker.exited().is_none(),
        "the worker stopped: {}",
        worker.log.display()
    );
    let log = std::fs::read_to_string(&worker.log).expect("log");
    assert!(
        log.contains("dropped queued job ids whose data Redis lost"),
        "{log}"
    );
    let metrics = reqwest::get(&p.worker_metrics_url)
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("billing_queue_jobs_dropped_total")
                && l.contains(":apply-event-v1")
                && l.ends_with(" 2")),
        "{metrics}"
    );
}

/// A Redis of its own on a free port with `policy`, stopped when dropped.
struct PrivateRedis {
    child: std::process::Child,
    url: String,
}

impl PrivateRedis {
    async fn start(policy: &str) -> PrivateRedis {
        let port = free_port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--maxmemory-policy", policy])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (deploy/ensure-services.sh needs it too)");
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str()).expect("url");
        eventually(Duration::from_secs(10), "the private Redis", || async {
            client.get_connection().ok().map(|_| ())
        })
        .await;
        PrivateRedis { child, url }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_worker_refuses_an_evicting_redis_unless_allowed_and_ingest_only_warns() {
    let redis = PrivateRedis::start("allkeys-lru").await;
    let p = Pipeline::start(&[("REDIS_URL", &redis.url)]).await;
    let (code, _, stderr) = p.worker_command(&["run"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("maxmemory-policy is allkeys-lru")
            && stderr.contains("noeviction")
            && stderr.contains("REDIS_ALLOW_EVICTION=true"),
        "{stderr}"
    );
    let ingest_log = std::fs::read_to_string(&p.ingest.log).expect("log");
    assert!(
        ingest_log.contains("maxmemory-policy may delete queued jobs"),
        "{ingest_log}"
    );

    let mut p = p;
    p.start_worker_with(&[("REDIS_ALLOW_EVICTION", "true")]);
    let customer = Customer::new(&unique_tag());
    let event = customer.checkout_event(chrono::Utc::now().timestamp());
    assert_eq!(p.client.post_event(&event).await.0, 200);
    p.wait_for_decision(event["id"].as_str().expect("id")).await;
}
