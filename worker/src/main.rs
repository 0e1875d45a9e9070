//! `worker`: `run` (the default) consumes the event and email queues; `migrate` applies
//! migrations.

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::FutureExt;
use shared::config::{DatabaseConfig, Source, WorkerConfig};
use shared::shutdown::Stop;
use worker::apply::Deps;
use worker::consume::ConsumerSettings;
use worker::email::{EmailConsumerSettings, EmailDeps};
use worker::stripe_api::StripeApi;

/// Applies Stripe events to organizations' billing state.
#[derive(Debug, Parser)]
#[command(name = "worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume the event queue (the default). Configured by environment variables; see README.
    Run,
    /// Apply pending database migrations, then exit. Needs only DATABASE_URL.
    Migrate,
}

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

async fn migrate() -> anyhow::Result<()> {
    let config = DatabaseConfig::load(&Source::env(), 2).context("configuration error")?;
    let pool = shared::db::connect(&config)
        .await
        .context("connecting to Postgres (DATABASE_URL)")?;
    shared::db::migrate(&pool)
        .await
        .context("applying migrations")?;
    println!("migrations applied");
    Ok(())
}

async fn run() -> anyhow::Result<()> {
    let config = WorkerConfig::load(&Source::env()).context("configuration error")?;
    shared::telemetry::init(config.log_format);
    // One TLS crypto provider for every TLS user in the process (reqwest, sqlx, Resend), set
    // before any client is built.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let stop = shared::shutdown::Stop::on_signal();
    let metrics_server = shared::metrics::start(config.metrics_addr, stop.clone().wait()).await?;
    let pool = shared::db::connect(&config.database)
        .await
        .context("connecting to Postgres (DATABASE_URL)")?;
    let redis = shared::queue::connect(&config.queue)
        .await
        .context("connecting to Redis (REDIS_URL)")?;
    let stripe = match &config.stripe_secret_key {
        Some(key) => Some(
            StripeApi::new(&config.stripe_api_base, key.clone())
                .context("building the Stripe client")?,
        ),
        None => None,
    };
    let email_deps = EmailDeps {
        pool: pool.clone(),
        resend: worker::email::resend_client(&config.email)
            .context("building the Resend client")?,
        from: config.email.from.clone(),
        enterprise_sales: config.email.enterprise_sales.clone(),
        retry: config.retry,
        max_attempts: config.max_attempts,
    };
    let email_queue = shared::queue::EmailQueue::new(redis.clone(), &config.queue.prefix);
    let deps = Deps {
        pool,
        plans: config.plans.clone(),
        stripe,
        queue: shared::queue::EventQueue::new(redis, &config.queue.prefix),
    };
    let settings = ConsumerSettings {
        concurrency: config.concurrency,
        poll_interval: config.poll_interval,
        max_attempts: config.max_attempts,
    };
    let email_settings = EmailConsumerSettings {
        concurrency: config.concurrency,
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
    let events = worker::consume::run(deps, &settings, until_stop(stop.clone(), halted.clone()));
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
