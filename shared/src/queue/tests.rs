//! The queues against a real Redis, each test under a prefix of its own.

use super::housekeeping::ACTIVE_TARGET;
use super::*;

/// `TEST_REDIS_URL`, or the machine's Redis.
fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// An event queue under a prefix of its own (delete its keys with [`delete_keys`]).
async fn fresh_queue() -> (String, ConnectionManager, EventQueue) {
    let prefix = format!("unit-{}", uuid::Uuid::new_v4().simple());
    let conn = connect(&QueueConfig {
        redis_url: redis_url(),
        prefix: prefix.clone(),
    })
    .await
    .expect("redis");
    let queue = EventQueue::new(conn.clone(), &prefix);
    (prefix, conn, queue)
}

#[test]
fn a_consumers_acknowledgement_channel_holds_twice_its_jobs_in_flight() {
    for concurrency in [1, 8, 64, 128, 1000, 1024, 4096] {
        let channel = 4 * consumer_fetch_batch(concurrency);
        assert!(
            channel >= 2 * concurrency,
            "{concurrency} in flight, channel {channel}"
        );
    }
}

#[tokio::test]
async fn parked_jobs_are_promoted_only_while_the_active_list_is_short_and_due_ones_all() {
    let (prefix, conn, queue) = fresh_queue().await;
    let ids: Vec<String> = (0..20_000).map(|n| format!("evt_{n}")).collect();
    for chunk in ids.chunks(2_000) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        queue.push(&refs).await.expect("push");
    }
    let mut c = conn.clone();
    let keys = &queue.housekeeping.config;
    // Jobs pushed as due (by apalis' retries, or an older version), more than Lua's
    // `unpack` takes at once.
    let mut due = redis::pipe();
    for n in 0..9_000 {
        let id = format!("due_{n}");
        due.cmd("ZADD")
            .arg(keys.scheduled_jobs_set())
            .arg(1)
            .arg(&id)
            .cmd("HSET")
            .arg(keys.job_data_hash())
            .arg(&id)
            .arg("{}")
            .cmd("HSET")
            .arg(format!("{}:{id}", keys.job_meta_hash()))
            .arg("attempts")
            .arg(0);
    }
    due.query_async::<()>(&mut c).await.expect("due jobs");
    let lengths = async |c: &mut ConnectionManager| -> (u64, u64) {
        redis::pipe()
            .cmd("LLEN")
            .arg(keys.active_jobs_list())
            .cmd("ZCARD")
            .arg(keys.scheduled_jobs_set())
            .query_async(c)
            .await
            .expect("lengths")
    };
    assert_eq!(queue.depth().await.expect("depth"), 29_000);

    assert_eq!(
        queue.promote_due().await.expect("promote"),
        9_000,
        "all due ones"
    );
    assert_eq!(
        lengths(&mut c).await,
        (9_000, 20_000),
        "no parked one: the list is long"
    );

    // Consumers take the active jobs; parked ones follow, up to the target.
    redis::cmd("DEL")
        .arg(keys.active_jobs_list())
        .query_async::<()>(&mut c)
        .await
        .expect("consume");
    assert_eq!(queue.promote_due().await.expect("promote"), ACTIVE_TARGET);
    assert_eq!(
        lengths(&mut c).await,
        (ACTIVE_TARGET, 20_000 - ACTIVE_TARGET)
    );
    assert_eq!(
        queue.promote_due().await.expect("promote"),
        0,
        "the list is full"
    );
    delete_keys(&mut c, &prefix).await;
}

#[tokio::test]
async fn ids_whose_data_redis_lost_are_dropped_instead_of_reaching_a_consumer() {
    let (prefix, conn, queue) = fresh_queue().await;
    queue
        .push(&["evt_kept", "evt_no_data", "evt_no_meta"])
        .await
        .expect("push");
    let keys = &queue.housekeeping.config;
    let mut c = conn.clone();
    let parked: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.scheduled_jobs_set())
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .expect("ids");
    assert_eq!(parked.len(), 3);
    let data: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(keys.job_data_hash())
        .arg(&parked)
        .query_async(&mut c)
        .await
        .expect("data");
    let id_of = |event: &str| {
        parked[data
            .iter()
            .position(|d| d.as_deref().is_some_and(|d| d.contains(event)))
            .expect("job of the event")]
        .clone()
    };
    let (kept, no_data, no_meta) = (
        id_of("evt_kept"),
        id_of("evt_no_data"),
        id_of("evt_no_meta"),
    );
    // One id in the active list too, as orphan recovery would put it back, with no data.
    redis::pipe()
        .cmd("HDEL")
        .arg(keys.job_data_hash())
        .arg(&no_data)
        .cmd("DEL")
        .arg(format!("{}:{no_meta}", keys.job_meta_hash()))
        .cmd("RPUSH")
        .arg(keys.active_jobs_list())
        .arg("01ORPHANWITHOUTDATA")
        .query_async::<()>(&mut c)
        .await
        .expect("lose data");

    queue.promote_due().await.expect("promote");
    let active: Vec<String> = redis::cmd("LRANGE")
        .arg(keys.active_jobs_list())
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .expect("active");
    assert_eq!(active, [kept]);
    assert_eq!(queue.depth().await.expect("depth"), 1);
    let leftovers: (bool, bool) = redis::pipe()
        .cmd("HEXISTS")
        .arg(keys.job_data_hash())
        .arg(&no_meta)
        .cmd("EXISTS")
        .arg(format!("{}:{no_data}", keys.job_meta_hash()))
        .query_async(&mut c)
        .await
        .expect("leftovers");
    assert_eq!(
        leftovers,
        (false, false),
        "what was left of them is deleted"
    );
    delete_keys(&mut c, &prefix).await;
}

async fn delete_keys(conn: &mut ConnectionManager, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(conn)
        .await
        .expect("keys");
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<()>(conn)
            .await
            .expect("clean up");
    }
}

#[tokio::test]
async fn vacuum_forgets_done_ids_whose_job_data_is_gone_and_keeps_the_rest() {
    let (prefix, conn, queue) = fresh_queue().await;
    let keys = &queue.housekeeping.config;
    let (done, meta) = (keys.done_jobs_set(), keys.job_meta_hash());
    let mut c = conn.clone();
    // A job finished just now keeps its metadata; one vacuumed earlier left only its id.
    let now = chrono::Utc::now().timestamp();
    redis::pipe()
        .cmd("SADD")
        .arg(&done)
        .arg(&["recent", "vacuumed"])
        .cmd("HSET")
        .arg(format!("{meta}:recent"))
        .arg(&["status", "Done", "done_at", &now.to_string()])
        .query_async::<()>(&mut c)
        .await
        .expect("seed");

    queue.vacuum_finished().await.expect("vacuum");
    let mut left: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&done)
        .query_async(&mut c)
        .await
        .expect("members");
    left.sort();
    assert_eq!(left, ["recent"]);
    delete_keys(&mut c, &prefix).await;
}
