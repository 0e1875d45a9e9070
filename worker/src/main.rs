//! `worker`: `run` (the default) consumes the event and email queues and sweeps the inbox and
//! the outbox; `migrate` applies migrations; `dead-letters` and `events` are the operators'
//! commands (see README, "Operations runbook"). Exit status: 0 done, 1 failed (the message
//! says why), 2 bad arguments.

use anyhow::Context;
use clap::Parser;
use futures::FutureExt;
use shared::config::{DatabaseConfig, Source, WorkerConfig};
use shared::queue::EmailQueue;
use shared::shutdown::Stop;
use shared::stripe_api::StripeClient;
use sqlx::PgPool;
use worker::apply::{Deps, Policy};
use worker::consume::{ApplySettings, ConsumerSettings};
use worker::email::EmailDeps;
use worker::lookup::{CustomerLookup, LookupDeps};
use worker::reconcile::{self as reconciliation, Reconciler};
use worker::sweeper::SweeperSettings;

mod cli;
mod commands;

use cli::{Cli, Command};
use commands::{backfill, dead_letters, events, reconcile};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("worker: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => run().await,
            Command::Migrate => migrate().await,
            Command::DeadLetters(command) => dead_letters(command).await,
            Command::Events(command) => events(command).await,
            Command::Reconcile(command) => reconcile(command).await,
            Command::Backfill {
                since,
                types,
                dry_run,
                json,
            } => backfill(since, &types, dry_run, json).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn connect_database() -> anyhow::Result<PgPool> {
    let config = DatabaseConfig::load(&Source::env(), 2).context("configuration error")?;
    shared::db::connect(&config, shared::db::Planning::PerRun)
        .await
        .context("connecting to Postgres (DATABASE_URL)")
}

async fn migrate() -> anyhow::Result<()> {
    let pool = connect_database().await?;
    shared::db::migrate(&pool)
        .await
        .context("applying migrations")?;
    println!("migrations applied");
    Ok(())
}

/// Everything the worker's jobs need, from the worker's environment.
struct Resources {
    events: Deps,
    emails: EmailDeps,
    email_queue: EmailQueue,
    /// Set when STRIPE_SECRET_KEY is.
    reconciler: Option<Reconciler>,
}

async fn resources(config: &WorkerConfig) -> anyhow::Result<Resources> {
    // One TLS crypto provider for every TLS user in the process (reqwest, sqlx, Resend), set
    // before any client is built.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let pool = shared::db::connect(&config.database, shared::db::Planning::PerRun)
        .await
        .context("connecting to Postgres (DATABASE_URL)")?;
    let mut redis = shared::queue::connect(&config.queue)
        .await
        .context("connecting to Redis (REDIS_URL)")?;
    check_eviction_policy(&mut redis, config.redis_allow_eviction).await?;
    let stripe = match &config.stripe.secret_key {
        Some(key) => Some(
            StripeClient::new(
                &config.stripe.base,
                key.clone(),
                config.stripe.settings.clone(),
            )
            .context("building the Stripe client")?,
        ),
        None => None,
    };
    let emails = EmailDeps {
        pool: pool.clone(),
        resend: worker::email::resend_client(&config.email)
            .context("building the Resend client")?,
        from: config.email.from.clone(),
        enterprise_sales: config.email.enterprise_sales.clone(),
        retry: config.retry,
        max_attempts: config.max_attempts,
    };
    let queue = shared::queue::EventQueue::new(redis.clone(), &config.queue.prefix);
    let reconciler = stripe.clone().map(|client| Reconciler {
        pool: pool.clone(),
        client,
        plans: config.plans.clone(),
        queue: queue.clone(),
    });
    let lookup = stripe.clone().map(|client| {
        CustomerLookup::start(LookupDeps {
            pool: pool.clone(),
            client,
            queue: queue.clone(),
        })
    });
    Ok(Resources {
        reconciler,
        email_queue: EmailQueue::new(redis.clone(), &config.queue.prefix),
        events: Deps {
            pool,
            plans: config.plans.clone(),
            // A failed refetch fails its event, which is retried on the event backoff.
            stripe: stripe.map(|client| client.with_max_retries(0)),
            queue,
            policy: Policy {
                max_attempts: config.max_attempts,
                retry: config.retry,
                deferral_recheck: config.deferral_recheck,
                deferral_window: config.deferral_window,
            },
            refunds: config.refunds,
            mode: config.stripe_mode,
            lookup,
        },
        emails,
    })
}

/// Refuses an evicting Redis unless allowed: evicted job data stops apalis' consumers (the
/// promoter drops such ids, but only a policy that never evicts keeps every job).
async fn check_eviction_policy(
    redis: &mut apalis_redis::ConnectionManager,
    allowed: bool,
) -> anyhow::Result<()> {
    use shared::queue::{EVICTION_FIX, EvictionPolicy};
    match shared::queue::eviction_policy(redis).await {
        EvictionPolicy::Keeps(_) => Ok(()),
        EvictionPolicy::Evicts(policy) if allowed => {
            tracing::warn!(%policy, "Redis may evict queued jobs; starting anyway (REDIS_ALLOW_EVICTION=true)");
            Ok(())
        }
        EvictionPolicy::Evicts(policy) => anyhow::bail!(
            "Redis' maxmemory-policy is {policy}: under memory pressure it deletes queued jobs' \
             data and stops the consumers; {EVICTION_FIX}"
        ),
        EvictionPolicy::Unknown(reason) => {
            tracing::warn!(%reason, "cannot read Redis' maxmemory-policy (CONFIG disabled?); make sure it is noeviction");
            Ok(())
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let config = WorkerConfig::load(&Source::env()).context("configuration error")?;
    shared::telemetry::init(config.log_format);
    let stop = Stop::on_signal();
    let metrics_server = shared::metrics::start(config.metrics_addr, stop.clone().wait()).await?;
    {
        use shared::queue::{ApplyEventV1, Job, SendEmailV1};
        let prefix = &config.queue.prefix;
        shared::metrics::register_worker(
            &[
                ApplyEventV1::queue_name(prefix),
                SendEmailV1::queue_name(prefix),
            ],
            config.stripe.secret_key.is_some(),
        );
    }
    let Resources {
        events: deps,
        emails: email_deps,
        email_queue,
        reconciler,
    } = resources(&config).await?;
    if let Some(reconciler) = &reconciler {
        reconciliation::publish_last_success(&reconciler.pool).await;
    }
    let usage_reporter = match (&reconciler, config.usage.meters.is_empty()) {
        (Some(reconciler), false) => Some(tokio::spawn(worker::usage::run(
            usage_deps(&config, reconciler),
            config.usage.report_interval,
            stop.clone().wait(),
        ))),
        (None, false) => {
            tracing::warn!(
                "usage is not reported: USAGE_METERS is set but STRIPE_SECRET_KEY is not"
            );
            None
        }
        _ => None,
    };
    let schedule = tokio::spawn(worker::reconcile::schedule::run(
        reconciler,
        config.reconcile.clone(),
        stop.clone().wait(),
    ));
    // Before any consumer fetches: jobs wait parked until a promoter moves them to the active
    // list in chunks (apalis' own fetch fails on a large backlog; see shared::queue).
    deps.queue
        .promote_due()
        .await
        .context("promoting the event backlog")?;
    email_queue
        .promote_due()
        .await
        .context("promoting the email backlog")?;
    let promoter = tokio::spawn(worker::sweeper::promote(
        deps.queue.clone(),
        email_queue.clone(),
        stop.clone().wait(),
    ));
    let sweeper = tokio::spawn(worker::sweeper::run(
        deps.pool.clone(),
        deps.queue.clone(),
        email_queue.clone(),
        SweeperSettings {
            interval: config.sweep_interval,
            grace: config.sweep_grace,
        },
        stop.clone().wait(),
    ));
    let event_settings = ConsumerSettings {
        concurrency: config.concurrency,
        poll_interval: config.poll_interval,
    };
    let apply_settings = ApplySettings {
        batch_size: config.apply_batch_size,
        transactions: config.apply_transactions,
    };
    let email_settings = ConsumerSettings {
        concurrency: config.email_concurrency,
        poll_interval: config.poll_interval,
    };

    // Both consumers stop on the signal, or when the other one stops by itself: a worker
    // process that lost one of its consumers exits non-zero so its supervisor restarts it.
    let (halt, halted) = tokio::sync::watch::channel(false);
    let until_stop = |stop: Stop, mut halted: tokio::sync::watch::Receiver<bool>| async move {
        tokio::select! {
            () = stop.wait() => {}
            _ = halted.wait_for(|halt| *halt) => {}
        }
    };
    let events = worker::consume::run(
        deps,
        &event_settings,
        apply_settings,
        until_stop(stop.clone(), halted.clone()),
    );
    let emails = worker::email::run(
        email_deps,
        &email_queue,
        &email_settings,
        until_stop(stop.clone(), halted),
    );
    let (events, emails) = tokio::join!(
        supervise("event", events, stop.clone(), &halt),
        supervise("email", emails, stop, &halt)
    );
    sweeper.abort();
    promoter.abort();
    schedule.abort();
    if let Some(reporter) = usage_reporter {
        reporter.abort();
    }
    metrics_server.abort();
    events.and(emails)?;
    tracing::info!("worker stopped");
    Ok(())
}

/// Runs one consumer; when it ends, halts the others. An end without the stop signal is an
/// error even if the consumer returned `Ok`, unless another consumer's end halted this one
/// (that one reports it).
async fn supervise(
    name: &'static str,
    consumer: impl Future<Output = anyhow::Result<()>>,
    stop: Stop,
    halt: &tokio::sync::watch::Sender<bool>,
) -> anyhow::Result<()> {
    let result = consumer.await;
    let signalled = stop.wait().now_or_never().is_some();
    let halted_by_other = halt.send_replace(true);
    match result {
        Err(e) => Err(e.context(format!("{name} consumer stopped"))),
        Ok(()) if !signalled && !halted_by_other => {
            Err(anyhow::anyhow!("{name} consumer stopped by itself"))
        }
        Ok(()) => Ok(()),
    }
}

/// The usage reporter's dependencies, on the reconciler's Stripe client and pool.
fn usage_deps(config: &WorkerConfig, reconciler: &Reconciler) -> worker::usage::UsageDeps {
    worker::usage::UsageDeps {
        pool: reconciler.pool.clone(),
        client: reconciler.client.clone(),
        retry: config.retry,
        max_attempts: config.max_attempts,
        deferral_window: config.deferral_window,
        lease: config.usage.report_lease,
    }
}
