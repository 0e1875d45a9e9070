//! `worker-bench`: the worker's throughput on a backlog.
//!
//! - `worker-bench preload --events 100000`: with the worker stopped, stores N events in the
//!   inbox (multi-row inserts of [`shared::db::webhook_events::insert_many`]) and pushes their
//!   jobs (`EventQueue::push`, one call per batch), as ingest would have after a burst.
//! - `worker-bench drain --events 100000`: started with a fresh worker, follows its
//!   `billing_events_decided_total` (every 50 ms, from its metrics endpoint) until it reaches N,
//!   then checks in the inbox that at least N events are no longer `pending`, and reports
//!   events decided per second. The counter, not the inbox, is polled because counting a
//!   100,000-row inbox ten times a second took Postgres CPU from the worker it measured.
//! - `worker-bench sample-body`: prints one load-test body (for the pgbench baseline).
//!
//! The bodies are the load generator's ([`e2e::load::BodyFactory`]).

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use e2e::load::{BodyFactory, new_run_tag};
use serde_json::json;
use shared::db::webhook_events::{self, NewEvent};
use shared::stripe::timestamp;

/// Worker benchmark: preload a backlog, then measure the drain.
#[derive(Debug, Parser)]
#[command(name = "worker-bench", about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Store N events and push their jobs (run with the worker stopped).
    Preload {
        /// Postgres URL of the pipeline's database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Redis URL.
        #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        /// The pipeline's `QUEUE_PREFIX`.
        #[arg(long, env = "QUEUE_PREFIX", default_value = "billing")]
        queue_prefix: String,
        /// Events to store.
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        /// Events per insert and per push.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Distinct customers in the event mix.
        #[arg(long, default_value_t = 2000)]
        customers: usize,
    },
    /// Wait until a freshly started worker has decided N events; report the rate.
    Drain {
        /// Postgres URL of the pipeline's database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// The worker's Prometheus endpoint (its `METRICS_ADDR`).
        #[arg(long, default_value = "http://127.0.0.1:9101/metrics")]
        metrics_url: String,
        /// Events to wait for.
        #[arg(long, default_value_t = 100_000)]
        events: i64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print one load-test body on stdout.
    SampleBody,
}

async fn connect(url: &str) -> anyhow::Result<sqlx::PgPool> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .context("connecting to Postgres")
}

async fn preload(
    database_url: &str,
    redis_url: &str,
    queue_prefix: &str,
    events: u64,
    batch: usize,
    customers: usize,
) -> anyhow::Result<()> {
    let pool = connect(database_url).await?;
    let redis = shared::queue::connect(&shared::config::QueueConfig {
        redis_url: redis_url.to_owned(),
        prefix: queue_prefix.to_owned(),
    })
    .await
    .context("connecting to Redis")?;
    let queue = shared::queue::EventQueue::new(redis.clone(), queue_prefix);
    let created = chrono::Utc::now().timestamp() - 3600;
    let factory = BodyFactory::new(&new_run_tag(), customers, created);
    let stripe_created = timestamp(created).context("created")?;
    let started = Instant::now();
    let mut seq = 0;
    while seq < events {
        let end = (seq + batch.max(1) as u64).min(events);
        let rows: Vec<(String, Vec<u8>, &str)> = (seq..end)
            .map(|s| (factory.event_id(s), factory.body(s), factory.event_type(s)))
            .collect();
        let new_events: Vec<NewEvent<'_>> = rows
            .iter()
            .map(|(id, body, event_type)| NewEvent {
                id,
                event_type,
                livemode: false,
                api_version: Some(e2e::stripe_events::CURRENT_API_VERSION),
                stripe_created,
                payload: body,
            })
            .collect();
        let new_ids = webhook_events::insert_many(&pool, &new_events)
            .await
            .context("inserting a batch")?;
        let ids: Vec<&str> = new_ids.iter().map(String::as_str).collect();
        // Pushed as ingest pushes: into apalis' scheduled set. The worker moves the backlog
        // to the active list in chunks when it starts (shared::queue::EventQueue::promote_due).
        queue.push(&ids).await.context("pushing a batch of jobs")?;
        seq = end;
    }
    eprintln!(
        "worker-bench: preloaded {events} events (run {}) in {:.1} s",
        factory.run_tag(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn drain(
    database_url: &str,
    metrics_url: &str,
    events: i64,
    timeout: u64,
    as_json: bool,
) -> anyhow::Result<()> {
    let pool = connect(database_url).await?;
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut first_progress = None;
    let mut last_report = Instant::now();
    let mut scrape_error = None;
    loop {
        // Until the worker listens, nothing is decided yet.
        let decided = match e2e::load::worker_decisions(&http, metrics_url).await {
            Ok(decided) => decided,
            Err(e) => {
                scrape_error = Some(format!("{e:#}"));
                0
            }
        };
        if decided > 0 && first_progress.is_none() {
            first_progress = Some(Instant::now());
        }
        if decided >= events {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(timeout),
            "only {decided} of {events} events decided after {timeout} s (last error reading {metrics_url}: {})",
            scrape_error.as_deref().unwrap_or("none")
        );
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "worker-bench: {decided} of {events} decided after {:.0} s",
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total_s = started.elapsed().as_secs_f64();
    let busy_s = first_progress.map_or(total_s, |t| t.elapsed().as_secs_f64());
    // The counter moves after each commit; the inbox must agree.
    let counts = webhook_events::count_by_status(&pool).await?;
    let stored_decided: i64 = counts
        .iter()
        .filter(|(status, _)| status != "pending")
        .map(|(_, n)| n)
        .sum();
    anyhow::ensure!(
        stored_decided >= events,
        "the worker counted {events} decisions but the inbox holds only {stored_decided} decided events"
    );
    let report = json!({
        "events": events,
        "seconds": (total_s * 100.0).round() / 100.0,
        "events_per_second": (events as f64 / total_s).round(),
        "seconds_from_first_decision": (busy_s * 100.0).round() / 100.0,
        "events_per_second_from_first_decision": (events as f64 / busy_s).round(),
        "statuses": counts.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
    });
    if as_json {
        println!("{report}");
    } else {
        println!(
            "worker drain: {events} events in {:.1} s = {} events/s ({} events/s from the first decision); statuses {}",
            total_s,
            report["events_per_second"],
            report["events_per_second_from_first_decision"],
            report["statuses"]
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // reqwest's TLS (unused here: the metrics endpoint is plain HTTP) needs a provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match Cli::parse().command {
        Command::Preload {
            database_url,
            redis_url,
            queue_prefix,
            events,
            batch,
            customers,
        } => {
            preload(
                &database_url,
                &redis_url,
                &queue_prefix,
                events,
                batch,
                customers,
            )
            .await
        }
        Command::Drain {
            database_url,
            metrics_url,
            events,
            timeout,
            json,
        } => drain(&database_url, &metrics_url, events, timeout, json).await,
        Command::SampleBody => {
            let factory = BodyFactory::new(&new_run_tag(), 1, chrono::Utc::now().timestamp());
            use std::io::Write;
            std::io::stdout().write_all(&factory.body(0))?;
            Ok(())
        }
    }
}
