//! `ingest`: load config, install telemetry and metrics, connect, serve.

use anyhow::Context;
use shared::config::{IngestConfig, Source};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = match IngestConfig::load(&Source::env()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ingest: configuration error: {e}");
            std::process::exit(2);
        }
    };
    shared::telemetry::init(config.log_format);
    let stop = shared::shutdown::Stop::on_signal();
    let metrics_server = shared::metrics::start(config.metrics_addr, stop.clone().wait()).await?;
    shared::metrics::register_ingest();
    let pool = shared::db::connect(&config.database, shared::db::Planning::Cached)
        .await
        .context("connecting to Postgres (DATABASE_URL)")?;
    let mut redis = shared::queue::connect(&config.queue)
        .await
        .context("connecting to Redis (REDIS_URL)")?;
    // Only a warning here: ingest's jobs are safe in Postgres; the worker refuses to start.
    match shared::queue::eviction_policy(&mut redis).await {
        shared::queue::EvictionPolicy::Keeps(_) => {}
        shared::queue::EvictionPolicy::Evicts(policy) => tracing::warn!(
            %policy,
            "Redis' maxmemory-policy may delete queued jobs; {}",
            shared::queue::EVICTION_FIX
        ),
        shared::queue::EvictionPolicy::Unknown(reason) => tracing::warn!(
            %reason,
            "cannot read Redis' maxmemory-policy (CONFIG disabled?); make sure it is noeviction"
        ),
    }
    let (batcher, batcher_task) = ingest::batcher::Batcher::start(
        pool.clone(),
        shared::queue::EventQueue::new(redis.clone(), &config.queue.prefix),
        ingest::batcher::BatcherSettings::default(),
    );
    let actions_config = &config.billing_actions;
    let actions = match (&actions_config.stripe.secret_key, &actions_config.prices) {
        (Some(key), Some(prices)) => {
            // One TLS crypto provider for the process, set before the client is built.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            let client = shared::stripe_api::StripeClient::new(
                &actions_config.stripe.base,
                key.clone(),
                actions_config.stripe.settings.clone(),
            )
            .context("building the Stripe client")?;
            Some(shared::billing_actions::BillingActions::new(
                pool.clone(),
                client,
                shared::queue::EventQueue::new(redis.clone(), &config.queue.prefix),
                prices.clone(),
            ))
        }
        _ => {
            tracing::info!("billing actions off: STRIPE_SECRET_KEY is not set");
            None
        }
    };
    let usage = (!config.usage.meters.is_empty()).then(|| {
        ingest::routes::usage::UsageWriter::start(pool.clone(), config.usage.meters.clone())
    });
    let state = ingest::AppState::new(ingest::Inner {
        pool,
        batcher,
        emails: shared::queue::EmailQueue::new(redis.clone(), &config.queue.prefix),
        redis,
        webhook_secrets: config.webhook_secrets,
        internal_api_token: config.internal_api_token,
        body_limit_bytes: config.body_limit_bytes,
        body_budget: ingest::body::BodyBudget::new(
            config.limits.body_budget_bytes,
            config.limits.body_timeout,
        ),
        large_body_checks: tokio::sync::Semaphore::new(1),
        usage,
        actions: ingest::routes::billing_actions::ActionGate {
            actions,
            slots: tokio::sync::Semaphore::new(actions_config.concurrency),
            timeout: actions_config.timeout,
        },
    });
    let limits = ingest::server::ServerLimits {
        header_timeout: config.limits.header_timeout,
        max_connections: config.limits.max_connections,
    };
    let api = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("binding INGEST_ADDR {}", config.listen_addr))?;
    tracing::info!(addr = %config.listen_addr, metrics = %config.metrics_addr, "ingest listening");

    ingest::run(api, state, limits, stop.wait())
        .await
        .context("serving the API")?;
    // The server and its state are gone: the batcher writes what is left, then ends.
    batcher_task.await.context("inbox batcher task")?;
    metrics_server
        .await
        .context("metrics server task")?
        .context("serving metrics")?;
    tracing::info!("ingest stopped");
    Ok(())
}
