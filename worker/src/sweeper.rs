//! The sweeper: what makes "an event Stripe got a 200 for is applied eventually" (and "an
//! Enterprise request's email is sent eventually") true when Redis is not. Every
//! `SWEEP_INTERVAL_MS` it enqueues again the inbox and outbox rows that are due: failed or
//! deferred rows past their `retry_at`, and pending rows whose job is older than
//! `SWEEP_GRACE_MS` (the push failed, Redis was flushed or restarted empty, a job was lost).
//!
//! Every replica runs one. They do not enqueue a row twice in one round: the claim is a single
//! `UPDATE … FOR UPDATE SKIP LOCKED` that moves `enqueued_at` forward before the push, so a
//! row another replica just claimed is no longer due. A job that is enqueued twice anyway (its
//! first job was only slow) is harmless: applying is idempotent and records `duplicate`.
//!
//! Each round also refreshes the backlog gauges, and once an hour deletes the Redis data of
//! jobs that finished more than a day ago (apalis-redis keeps it forever).

use std::time::{Duration, Instant};

use anyhow::Context;
use shared::db::{email_outbox, webhook_events};
use shared::metrics::{INBOX_EVENTS, INBOX_STATUSES, OUTBOX_EMAILS, QUEUE_DEPTH, SWEPT};
use shared::queue::{EmailQueue, EventQueue};
use sqlx::PgPool;

/// Rows claimed per statement.
const BATCH: i64 = 500;
/// How often finished jobs are deleted from Redis.
const VACUUM_EVERY: Duration = Duration::from_secs(3600);

/// When the sweeper runs.
#[derive(Debug, Clone, Copy)]
pub struct SweeperSettings {
    /// Time between rounds.
    pub interval: Duration,
    /// How long a pending row's job may be missing before it is enqueued again.
    pub grace: Duration,
}

/// Sweeps every `interval` until `shutdown` resolves. Failures are logged and the next round
/// tries again: the sweeper is the recovery path and must outlive Redis and Postgres outages.
pub async fn run(
    pool: PgPool,
    queue: EventQueue,
    email_queue: EmailQueue,
    settings: SweeperSettings,
    shutdown: impl Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_vacuum: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        let rounds = [
            ("events", sweep(&pool, &queue, settings.grace).await),
            (
                "emails",
                sweep_outbox(&pool, &email_queue, settings.grace).await,
            ),
        ];
        for (what, round) in rounds {
            match round {
                Ok(0) => {}
                Ok(count) => tracing::info!(count, what, "sweeper enqueued due rows"),
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    what,
                    "sweep failed; retrying next round"
                ),
            }
        }
        if let Err(e) = refresh_gauges(&pool, &queue, &email_queue).await {
            tracing::debug!(error = format!("{e:#}"), "backlog gauges not refreshed");
        }
        if last_vacuum.is_none_or(|at| at.elapsed() >= VACUUM_EVERY) {
            let vacuums = [
                (queue.name(), queue.vacuum_finished().await),
                (email_queue.name(), email_queue.vacuum_finished().await),
            ];
            for (name, vacuum) in vacuums {
                match vacuum {
                    Ok(removed) => tracing::debug!(queue = name, removed, "finished jobs vacuumed"),
                    Err(e) => {
                        tracing::warn!(queue = name, error = %e, "vacuuming finished jobs failed")
                    }
                }
            }
            last_vacuum = Some(Instant::now());
        }
    }
}

/// One round over the inbox: claims every due event, batch by batch, and pushes their jobs.
/// Returns how many were enqueued. A pending row counts as lost when it was enqueued more
/// than `grace` before both now and the push of the oldest job still waiting (jobs are taken
/// in the order they were pushed, and a row is enqueued just before its job is pushed): its
/// job is no longer waiting, whatever the queue's depth. So a lost job is found under a
/// sustained backlog too, while a row whose job still waits behind that backlog is left alone
/// (enqueueing it again would only add a duplicate). Rows due for a retry are enqueued
/// whatever the queue holds. A push that fails leaves the claimed rows due again later.
pub async fn sweep(pool: &PgPool, queue: &EventQueue, grace: Duration) -> anyhow::Result<usize> {
    let oldest = queue
        .oldest_waiting()
        .await
        .context("reading the queue's oldest job")?;
    let now = chrono::Utc::now();
    let horizon = oldest.map_or(now, |oldest| oldest.min(now));
    let lost_before = chrono::TimeDelta::from_std(grace)
        .ok()
        .and_then(|grace| horizon.checked_sub_signed(grace))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    claim_and_push(
        || async move {
            webhook_events::claim_due(pool, lost_before, BATCH)
                .await
                .context("claiming due events")
        },
        |ids: Vec<String>| async move {
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            queue
                .push(&refs)
                .await
                .context("enqueueing claimed events")?;
            queue
                .promote_due()
                .await
                .context("promoting claimed events")?;
            Ok(())
        },
    )
    .await
}

/// [`sweep`] for the email outbox.
pub async fn sweep_outbox(
    pool: &PgPool,
    queue: &EmailQueue,
    grace: Duration,
) -> anyhow::Result<usize> {
    claim_and_push(
        || async move {
            email_outbox::claim_due(pool, grace, BATCH)
                .await
                .context("claiming due emails")
        },
        |ids: Vec<uuid::Uuid>| async move {
            queue
                .push(&ids)
                .await
                .context("enqueueing claimed emails")?;
            queue
                .promote_due()
                .await
                .context("promoting claimed emails")?;
            Ok(())
        },
    )
    .await
}

/// How often the promoter tops up the active lists: at [`shared::queue`]'s active target of
/// 1,000 jobs, up to 20,000 jobs a second.
const PROMOTE_EVERY: Duration = Duration::from_millis(50);

/// Moves both queues' jobs to their active lists in chunks every [`PROMOTE_EVERY`] until
/// `shutdown` resolves: pushed jobs wait parked until then (see `shared::queue::EventQueue::
/// promote_due`), so every worker runs this beside its consumers.
pub async fn promote(
    queue: EventQueue,
    email_queue: EmailQueue,
    shutdown: impl Future<Output = ()>,
) {
    let interval = PROMOTE_EVERY;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        for (name, promoted) in [
            (queue.name(), queue.promote_due().await),
            (email_queue.name(), email_queue.promote_due().await),
        ] {
            if let Err(e) = promoted {
                tracing::warn!(queue = name, error = %e, "promoting due jobs failed");
            }
        }
    }
}

/// Claims and pushes batches until a batch comes back short; returns how many were pushed.
async fn claim_and_push<Id, Claim, Claimed, Push, Pushed>(
    claim: Claim,
    push: Push,
) -> anyhow::Result<usize>
where
    Claim: Fn() -> Claimed,
    Claimed: Future<Output = anyhow::Result<Vec<Id>>>,
    Push: Fn(Vec<Id>) -> Pushed,
    Pushed: Future<Output = anyhow::Result<()>>,
{
    let mut total = 0;
    loop {
        let ids = claim().await?;
        let count = ids.len();
        push(ids).await?;
        metrics::counter!(SWEPT).increment(count as u64);
        total += count;
        if (count as i64) < BATCH {
            return Ok(total);
        }
    }
}

async fn refresh_gauges(
    pool: &PgPool,
    queue: &EventQueue,
    email_queue: &EmailQueue,
) -> anyhow::Result<()> {
    let counts = webhook_events::count_unfinished(pool).await?;
    for &status in INBOX_STATUSES {
        let count = counts
            .iter()
            .find(|(s, _)| s == status)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!(INBOX_EVENTS, "status" => status).set(count as f64);
    }
    for (status, count) in email_outbox::count_unsent(pool).await? {
        metrics::gauge!(OUTBOX_EMAILS, "status" => status.as_str()).set(count as f64);
    }
    let depths = [
        (queue.name(), queue.depth().await?),
        (email_queue.name(), email_queue.depth().await?),
    ];
    for (name, depth) in depths {
        metrics::gauge!(QUEUE_DEPTH, "queue" => name.to_owned()).set(depth as f64);
    }
    Ok(())
}
