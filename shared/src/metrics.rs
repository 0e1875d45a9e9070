//! Metrics: every name is defined here, under the `billing_` namespace, and served in the
//! Prometheus text format on its own listener (`METRICS_ADDR`), away from Stripe's traffic.
//!
//! Every counter and gauge a binary emits is registered at 0 when it starts ([`register_ingest`],
//! [`register_worker`]), with each label value it can take (the lists below), so an alert's
//! `rate()` sees the first failure and a dashboard panel shows 0, not "No data". Histograms
//! appear at their first observation (an empty one would claim buckets of nothing); the e2e
//! test `metrics` drives the traffic that produces each one the dashboard uses. A label value
//! added at an increment site belongs in its list here too: that test fails on a value it did
//! not see at start.

use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Webhook requests by `outcome` ([`WEBHOOK_OUTCOMES`]).
pub const WEBHOOKS_RECEIVED: &str = "billing_webhooks_received_total";
/// Jobs ingest could not push after committing their row, an event or an outbox email (the
/// sweeper will).
pub const ENQUEUE_FAILURES: &str = "billing_enqueue_failures_total";
/// Enterprise plan requests by `outcome` ([`ENTERPRISE_OUTCOMES`]).
pub const ENTERPRISE_REQUESTS: &str = "billing_enterprise_requests_total";
/// Outbox emails handled by the worker, by `outcome` ([`EMAIL_OUTCOMES`]).
pub const EMAILS: &str = "billing_emails_total";
/// Subscription snapshots with prices but none mapped to a plan (`STRIPE_*_PRICE_KEY`): the
/// subscription's plan is stored null, its price ids are kept.
pub const UNMAPPED_PRICES: &str = "billing_unmapped_price_events_total";
/// Stripe API requests by `outcome` ([`STRIPE_API_OUTCOMES`]), each attempt counted.
pub const STRIPE_API_REQUESTS: &str = "billing_stripe_api_requests_total";
/// Stripe's 429s by `reason` (`Stripe-Rate-Limited-Reason`; `lock_timeout` without one;
/// registered with [`STRIPE_RATE_LIMIT_REASONS`], and any other reason Stripe names appears
/// when it does).
pub const STRIPE_API_RATE_LIMITED: &str = "billing_stripe_api_rate_limited_total";
/// Reconciliation runs by `status` ([`RECONCILE_STATUSES`]).
pub const RECONCILE_RUNS: &str = "billing_reconcile_runs_total";
/// Time a reconciliation run took.
pub const RECONCILE_DURATION: &str = "billing_reconcile_duration_seconds";
/// Organizations found drifted by the last real (not dry) run of this process.
pub const RECONCILE_LAST_DRIFTED: &str = "billing_reconcile_last_drifted";
/// Organizations healed by that run.
pub const RECONCILE_LAST_HEALED: &str = "billing_reconcile_last_healed";
/// Organizations pointing at a subscription Stripe does not know, in that run.
pub const RECONCILE_LAST_ORPHANS: &str = "billing_reconcile_last_orphans";
/// Unix time the newest successful run finished (read from Postgres at start; 0 when there
/// never was one, so `BillingReconciliationStale` fires instead of seeing nothing).
pub const RECONCILE_LAST_SUCCESS: &str = "billing_reconcile_last_success_timestamp_seconds";
/// Events stored by backfills.
pub const EVENTS_BACKFILLED: &str = "billing_events_backfilled_total";
/// Billing actions (Checkout and Customer Portal sessions) by `action` (`checkout`, `portal`)
/// and `outcome` (`created`, `invalid`, `conflict`, `not_found`, `stripe_error`,
/// `unavailable`, `not_configured`).
pub const BILLING_ACTIONS: &str = "billing_actions_total";
/// Usage records accepted (stored) by ingest.
pub const USAGE_ACCEPTED: &str = "billing_usage_records_accepted_total";
/// Usage records posted again (same organization, meter and identifier): not counted twice.
pub const USAGE_DUPLICATES: &str = "billing_usage_duplicates_total";
/// Usage records not reported to Stripe yet, refreshed by the reporter.
pub const USAGE_PENDING: &str = "billing_usage_pending_records";
/// Age in seconds of the oldest usage record not reported yet (0 when none).
pub const USAGE_OLDEST_PENDING: &str = "billing_usage_oldest_pending_seconds";
/// Usage records reported to Stripe (their meter event was accepted).
pub const USAGE_REPORTED: &str = "billing_usage_records_reported_total";
/// Meter events sent by `outcome` (`sent`, `retry`, `dead`).
pub const METER_EVENTS: &str = "billing_meter_events_total";
/// Events per group commit of ingest's inbox writer.
pub const INGEST_BATCH_EVENTS: &str = "billing_ingest_batch_events";
/// Time to answer a webhook.
pub const WEBHOOK_DURATION: &str = "billing_webhook_duration_seconds";
/// One-time payments whose status an applied event set, by the new `status` (`pending`,
/// `succeeded`, `failed`, `refunded`, `partially_refunded`, `disputed`).
pub const PAYMENTS: &str = "billing_payments_total";
/// Events decided by the worker, by `decision` ([`EVENT_DECISIONS`]).
pub const EVENTS_DECIDED: &str = "billing_events_decided_total";
/// Failed apply attempts, by `kind` ([`FAILURE_KINDS`]).
pub const EVENT_FAILURES: &str = "billing_event_failures_total";
/// Events that became dead letters.
pub const DEAD_LETTERS: &str = "billing_dead_letters_total";
/// Inbox rows by `status` ([`INBOX_STATUSES`]), refreshed by the sweeper.
pub const INBOX_EVENTS: &str = "billing_inbox_events";
/// Outbox emails by `status` ([`OUTBOX_STATUSES`]), refreshed by the sweeper.
pub const OUTBOX_EMAILS: &str = "billing_outbox_emails";
/// Jobs waiting in Redis, by `queue`, refreshed by the sweeper.
pub const QUEUE_DEPTH: &str = "billing_queue_depth";
/// Jobs the sweeper enqueued again (lost, or due after a failure or deferral).
pub const SWEPT: &str = "billing_swept_total";
/// Job ids the promoter dropped from a queue, by `queue`, because Redis had lost their data
/// (an evicting `maxmemory-policy`); the sweeper enqueues their rows again.
pub const JOBS_DROPPED: &str = "billing_queue_jobs_dropped_total";
/// Time of one apply transaction (a batch of events; see `APPLY_BATCH_SIZE`).
pub const APPLY_DURATION: &str = "billing_apply_transaction_duration_seconds";
/// Events per apply transaction.
pub const APPLY_BATCH_EVENTS: &str = "billing_apply_batch_events";
/// From ingest's commit to the worker's commit of the decision.
pub const EVENT_LAG: &str = "billing_event_lag_seconds";
/// Stripe lookups of waiting customers' organization, by `outcome` ([`LOOKUP_OUTCOMES`]).
pub const CUSTOMER_LOOKUPS: &str = "billing_customer_lookups_total";

/// `outcome` values of [`WEBHOOKS_RECEIVED`] (the route's and the body layer's).
pub const WEBHOOK_OUTCOMES: &[&str] = &[
    "stored",
    "duplicate",
    "bad_signature",
    "bad_payload",
    "bad_request",
    "too_large",
    "body_timeout",
    "overloaded",
    "store_failed",
];
/// `outcome` values of [`CUSTOMER_LOOKUPS`]: `linked` (Stripe's metadata named the
/// organization), `foreign` (it names none, or the customer was deleted), `already_linked`
/// (linked meanwhile), `conflict` (the organization named has another customer), `not_found`
/// (a 404), `failed` (no answer), `skipped` (the lookup queue was full).
pub const LOOKUP_OUTCOMES: &[&str] = &[
    "linked",
    "foreign",
    "already_linked",
    "conflict",
    "not_found",
    "failed",
    "skipped",
];
/// `outcome` values of [`ENTERPRISE_REQUESTS`].
pub const ENTERPRISE_OUTCOMES: &[&str] =
    &["created", "repeated", "invalid", "conflict", "store_failed"];
/// `outcome` values of [`EMAILS`].
pub const EMAIL_OUTCOMES: &[&str] = &[
    "sent",
    "already_done",
    "not_due",
    "retry_scheduled",
    "dead",
    "failed",
];
/// `decision` values of [`EVENTS_DECIDED`] (`billing_audit` decisions a job can end in).
pub const EVENT_DECISIONS: &[&str] = &[
    "applied",
    "stale",
    "tie",
    "refetched",
    "deferred",
    "ignored",
    "duplicate",
    "dead",
];
/// `kind` values of [`EVENT_FAILURES`].
pub const FAILURE_KINDS: &[&str] = &["transient", "permanent"];
/// `status` values of [`INBOX_EVENTS`].
pub const INBOX_STATUSES: &[&str] = &["pending", "deferred", "dead"];
/// `status` values of [`OUTBOX_EMAILS`].
pub const OUTBOX_STATUSES: &[&str] = &["pending", "dead"];
/// `outcome` values of [`STRIPE_API_REQUESTS`].
pub const STRIPE_API_OUTCOMES: &[&str] = &[
    "ok",
    "rate_limited",
    "server_error",
    "client_error",
    "transport",
];
/// The `reason` values of [`STRIPE_API_RATE_LIMITED`] Stripe documents, and ours.
pub const STRIPE_RATE_LIMIT_REASONS: &[&str] = &[
    "global-rate",
    "global-concurrency",
    "endpoint-rate",
    "endpoint-concurrency",
    "resource-specific",
    "lock_timeout",
];
/// `action` values of [`BILLING_ACTIONS`].
pub const BILLING_ACTION_NAMES: &[&str] = &["checkout", "portal"];
/// `outcome` values of [`BILLING_ACTIONS`].
pub const BILLING_ACTION_OUTCOMES: &[&str] = &[
    "created",
    "invalid",
    "conflict",
    "not_found",
    "stripe_error",
    "unavailable",
    "not_configured",
];
/// `status` values of [`PAYMENTS`].
pub const PAYMENT_STATUSES: &[&str] = &[
    "pending",
    "succeeded",
    "failed",
    "refunded",
    "partially_refunded",
    "disputed",
];
/// `status` values of [`RECONCILE_RUNS`].
pub const RECONCILE_STATUSES: &[&str] = &["succeeded", "failed"];

fn counters_at_zero(name: &'static str, label: &'static str, values: &[&'static str]) {
    for &value in values {
        metrics::counter!(name, label => value).increment(0);
    }
}

fn gauges_at_zero(name: &'static str, label: &'static str, values: &[String]) {
    for value in values {
        metrics::gauge!(name, label => value.clone()).set(0.0);
    }
}

/// Registers, at 0, every counter ingest emits, with each label value. Call once at start,
/// after [`start`].
pub fn register_ingest() {
    counters_at_zero(WEBHOOKS_RECEIVED, "outcome", WEBHOOK_OUTCOMES);
    counters_at_zero(ENTERPRISE_REQUESTS, "outcome", ENTERPRISE_OUTCOMES);
    metrics::counter!(ENQUEUE_FAILURES).increment(0);
    metrics::counter!(USAGE_ACCEPTED).increment(0);
    metrics::counter!(USAGE_DUPLICATES).increment(0);
    for &action in BILLING_ACTION_NAMES {
        for &outcome in BILLING_ACTION_OUTCOMES {
            metrics::counter!(BILLING_ACTIONS, "action" => action, "outcome" => outcome)
                .increment(0);
        }
    }
}

/// Registers, at 0, every counter and gauge `worker run` emits, with each label value: the
/// queue gauges for `queues` (their names), and, when the worker has a Stripe key
/// (`stripe_api`), the Stripe API and reconciliation ones. The gauges then hold 0 until the
/// sweeper's first round (at once) or a reconciliation sets them. Call once at start, after
/// [`start`] and before anything that sets them.
pub fn register_worker(queues: &[String], stripe_api: bool) {
    counters_at_zero(EVENTS_DECIDED, "decision", EVENT_DECISIONS);
    counters_at_zero(EVENT_FAILURES, "kind", FAILURE_KINDS);
    counters_at_zero(EMAILS, "outcome", EMAIL_OUTCOMES);
    counters_at_zero(PAYMENTS, "status", PAYMENT_STATUSES);
    counters_at_zero(METER_EVENTS, "outcome", &["sent", "retry", "dead"]);
    metrics::counter!(USAGE_REPORTED).increment(0);
    metrics::gauge!(USAGE_PENDING).set(0.0);
    metrics::gauge!(USAGE_OLDEST_PENDING).set(0.0);
    for counter in [DEAD_LETTERS, SWEPT, UNMAPPED_PRICES, EVENTS_BACKFILLED] {
        metrics::counter!(counter).increment(0);
    }
    for queue in queues {
        metrics::counter!(JOBS_DROPPED, "queue" => queue.clone()).increment(0);
    }
    let owned = |values: &[&str]| values.iter().map(|v| (*v).to_owned()).collect::<Vec<_>>();
    gauges_at_zero(INBOX_EVENTS, "status", &owned(INBOX_STATUSES));
    gauges_at_zero(OUTBOX_EMAILS, "status", &owned(OUTBOX_STATUSES));
    gauges_at_zero(QUEUE_DEPTH, "queue", queues);
    if stripe_api {
        counters_at_zero(STRIPE_API_REQUESTS, "outcome", STRIPE_API_OUTCOMES);
        counters_at_zero(STRIPE_API_RATE_LIMITED, "reason", STRIPE_RATE_LIMIT_REASONS);
        counters_at_zero(RECONCILE_RUNS, "status", RECONCILE_STATUSES);
        counters_at_zero(CUSTOMER_LOOKUPS, "outcome", LOOKUP_OUTCOMES);
        for gauge in [
            RECONCILE_LAST_DRIFTED,
            RECONCILE_LAST_HEALED,
            RECONCILE_LAST_ORPHANS,
            RECONCILE_LAST_SUCCESS,
        ] {
            metrics::gauge!(gauge).set(0.0);
        }
    }
}

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
