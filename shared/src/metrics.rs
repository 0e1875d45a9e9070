//! Metrics: every name is defined here, under the `billing_` namespace, and served in the
//! Prometheus text format on its own listener (`METRICS_ADDR`), away from Stripe's traffic.

use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Webhook requests by outcome (`stored`, `duplicate`, `bad_signature`, `bad_payload`,
/// `too_large`, `store_failed`).
pub const WEBHOOKS_RECEIVED: &str = "billing_webhooks_received_total";
/// Jobs ingest could not push after committing their row, an event or an outbox email (the
/// sweeper will).
pub const ENQUEUE_FAILURES: &str = "billing_enqueue_failures_total";
/// Enterprise plan requests by outcome (`created`, `repeated`, `invalid`, `conflict`,
/// `store_failed`).
pub const ENTERPRISE_REQUESTS: &str = "billing_enterprise_requests_total";
/// Outbox emails handled by the worker, by `outcome` (`sent`, `already_done`, `not_due`,
/// `retry_scheduled`, `dead`, `failed`).
pub const EMAILS: &str = "billing_emails_total";
/// Subscription snapshots with prices but none mapped to a plan (`STRIPE_*_PRICE_KEY`): the
/// subscription's plan is stored null, its price ids are kept.
pub const UNMAPPED_PRICES: &str = "billing_unmapped_price_events_total";
/// Stripe API requests by `outcome` (`ok`, `rate_limited`, `server_error`, `client_error`,
/// `transport`), each attempt counted.
pub const STRIPE_API_REQUESTS: &str = "billing_stripe_api_requests_total";
/// Stripe's 429s by `reason` (`Stripe-Rate-Limited-Reason`; `lock_timeout` without one).
pub const STRIPE_API_RATE_LIMITED: &str = "billing_stripe_api_rate_limited_total";
/// Reconciliation runs by `status` (`succeeded`, `failed`).
pub const RECONCILE_RUNS: &str = "billing_reconcile_runs_total";
/// Time a reconciliation run took.
pub const RECONCILE_DURATION: &str = "billing_reconcile_duration_seconds";
/// Organizations found drifted by the last real (not dry) run of this process.
pub const RECONCILE_LAST_DRIFTED: &str = "billing_reconcile_last_drifted";
/// Organizations healed by that run.
pub const RECONCILE_LAST_HEALED: &str = "billing_reconcile_last_healed";
/// Organizations pointing at a subscription Stripe does not know, in that run.
pub const RECONCILE_LAST_ORPHANS: &str = "billing_reconcile_last_orphans";
/// Unix time the newest successful run finished (read from Postgres at start).
pub const RECONCILE_LAST_SUCCESS: &str = "billing_reconcile_last_success_timestamp_seconds";
/// Events stored by backfills.
pub const EVENTS_BACKFILLED: &str = "billing_events_backfilled_total";
/// Events per group commit of ingest's inbox writer.
pub const INGEST_BATCH_EVENTS: &str = "billing_ingest_batch_events";
/// Time to answer a webhook.
pub const WEBHOOK_DURATION: &str = "billing_webhook_duration_seconds";
/// One-time payments whose status an applied event set, by the new `status` (`pending`,
/// `succeeded`, `failed`, `refunded`, `partially_refunded`, `disputed`).
pub const PAYMENTS: &str = "billing_payments_total";
/// Events decided by the worker, by `decision`.
pub const EVENTS_DECIDED: &str = "billing_events_decided_total";
/// Failed apply attempts, by `kind` (`transient`, `permanent`).
pub const EVENT_FAILURES: &str = "billing_event_failures_total";
/// Events that became dead letters.
pub const DEAD_LETTERS: &str = "billing_dead_letters_total";
/// Inbox rows by `status` (`pending`, `deferred`, `dead`), refreshed by the sweeper.
pub const INBOX_EVENTS: &str = "billing_inbox_events";
/// Outbox emails by `status` (`pending`, `dead`), refreshed by the sweeper.
pub const OUTBOX_EMAILS: &str = "billing_outbox_emails";
/// Jobs waiting in Redis, by `queue`, refreshed by the sweeper.
pub const QUEUE_DEPTH: &str = "billing_queue_depth";
/// Jobs the sweeper enqueued again (lost, or due after a failure or deferral).
pub const SWEPT: &str = "billing_swept_total";
/// Time of one apply transaction (a batch of events; see `APPLY_BATCH_SIZE`).
pub const APPLY_DURATION: &str = "billing_apply_transaction_duration_seconds";
/// Events per apply transaction.
pub const APPLY_BATCH_EVENTS: &str = "billing_apply_batch_events";
/// From ingest's commit to the worker's commit of the decision.
pub const EVENT_LAG: &str = "billing_event_lag_seconds";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const LAG_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const RUN_BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0];

/// Installs the process-wide recorder with histogram buckets, and keeps it tidy in the
/// background. Call once per process, inside the Tokio runtime.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(WEBHOOK_DURATION.into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(APPLY_DURATION.into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(EVENT_LAG.into()), LAG_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(INGEST_BATCH_EVENTS.into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(APPLY_BATCH_EVENTS.into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(RECONCILE_DURATION.into()), RUN_BUCKETS)?
        .install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// The metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The recorder could not be installed.
    #[error("installing the metrics recorder: {0}")]
    Install(#[from] BuildError),
    /// `METRICS_ADDR` could not be bound.
    #[error("binding METRICS_ADDR {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Installs the recorder ([`install`]), binds `addr` and serves `GET /metrics` in the background
/// until `shutdown` resolves. Both binaries start their metrics this way.
pub async fn start(
    addr: std::net::SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, StartError> {
    let handle = install()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok(tokio::spawn(serve(listener, handle, shutdown)))
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(handle.render())),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
