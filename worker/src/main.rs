//! `worker`: `run` (the default) consumes the queue; `migrate` applies migrations.

use anyhow::Context;
use clap::{Parser, Subcommand};
use shared::config::{DatabaseConfig, Source, WorkerConfig};
use worker::apply::Deps;
use worker::consume::ConsumerSettings;
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
    // One TLS crypto provider for every TLS user in the process (reqwest, sqlx).
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
    worker::consume::run(deps, &settings, stop.wait())
        .await
        .context("event consumer stopped")?;
    metrics_server.abort();
    tracing::info!("worker stopped");
    Ok(())
}
