//! `ingest`: the HTTP side. Stripe's webhook target (verify, store, enqueue, answer), the
//! billing-status query, Enterprise plan requests and billing actions (Checkout and Customer
//! Portal sessions) of the product's backend, and health checks. Thin by design: no business
//! logic on the request path, and no Stripe API call but the billing actions', which run under
//! their own limits (`routes::billing_actions`).

pub mod auth;
pub mod batcher;
pub mod body;
pub mod error;
pub mod routes;
pub mod server;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use secrecy::SecretString;
use shared::queue::EmailQueue;
use sqlx::PgPool;

use crate::batcher::Batcher;
use crate::body::{BodyBudget, Route, hold_body};
use crate::server::ServerLimits;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// The shared resources behind [`AppState`].
pub struct Inner {
    /// Postgres.
    pub pool: PgPool,
    /// The inbox's group commit (it also enqueues the new events).
    pub batcher: Batcher,
    /// The email queue.
    pub emails: EmailQueue,
    /// A Redis connection for readiness checks.
    pub redis: apalis_redis::ConnectionManager,
    /// Webhook endpoint secrets, any of which may sign.
    pub webhook_secrets: Vec<SecretString>,
    /// Bearer token of the internal API.
    pub internal_api_token: SecretString,
    /// Largest webhook body accepted.
    pub body_limit_bytes: usize,
    /// The bytes of request bodies held at once, and the time to receive one.
    pub body_budget: BodyBudget,
    /// Turns to verify a large webhook body (one at a time; see `routes::webhooks`).
    pub large_body_checks: tokio::sync::Semaphore,
    /// The billing actions and their limits.
    pub actions: routes::billing_actions::ActionGate,
    /// The usage records' group commit; `None` without `USAGE_METERS`.
    pub usage: Option<routes::usage::UsageWriter>,
}

impl AppState {
    /// Wraps the resources.
    pub fn new(inner: Inner) -> AppState {
        AppState(Arc::new(inner))
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// All routes. Each route that takes a body reads it through the body layer first
/// (`crate::body`): limit, budget and deadline.
pub fn router(state: AppState) -> Router {
    let webhook_gate = state
        .body_budget
        .gate(state.body_limit_bytes, Route::Webhook);
    let enterprise_gate = state
        .body_budget
        .gate(routes::enterprise::BODY_LIMIT_BYTES, Route::Other);
    let usage_gate = state
        .body_budget
        .gate(routes::usage::BODY_LIMIT_BYTES, Route::Other);
    let actions_gate = state
        .body_budget
        .gate(routes::billing_actions::BODY_LIMIT_BYTES, Route::Other);
    Router::new()
        .route(
            "/v1/webhooks/stripe",
            post(routes::webhooks::receive)
                .layer(DefaultBodyLimit::max(state.body_limit_bytes))
                .layer(from_fn_with_state(webhook_gate, hold_body)),
        )
        .route(
            "/v1/enterprise-requests",
            post(routes::enterprise::create)
                .layer(DefaultBodyLimit::max(routes::enterprise::BODY_LIMIT_BYTES))
                .layer(from_fn_with_state(enterprise_gate, hold_body)),
        )
        .route(
            "/v1/organizations/{organization_id}/billing",
            get(routes::billing::get_billing),
        )
        .route(
            "/v1/organizations/{organization_id}/checkout-sessions",
            post(routes::billing_actions::checkout)
                .layer(DefaultBodyLimit::max(
                    routes::billing_actions::BODY_LIMIT_BYTES,
                ))
                .layer(from_fn_with_state(actions_gate.clone(), hold_body)),
        )
        .route(
            "/v1/organizations/{organization_id}/portal-sessions",
            post(routes::billing_actions::portal)
                .layer(DefaultBodyLimit::max(
                    routes::billing_actions::BODY_LIMIT_BYTES,
                ))
                .layer(from_fn_with_state(actions_gate, hold_body)),
        )
        .route(
            "/v1/organizations/{organization_id}/usage",
            post(routes::usage::record)
                .get(routes::usage::totals)
                .layer(DefaultBodyLimit::max(routes::usage::BODY_LIMIT_BYTES))
                .layer(from_fn_with_state(usage_gate, hold_body)),
        )
        .route(
            "/v1/organizations/{organization_id}/payments",
            get(routes::payments::list_payments),
        )
        .route(
            "/v1/organizations/{organization_id}/payments/{id}",
            get(routes::payments::get_payment),
        )
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .with_state(state)
}

/// Serves the API on `listener` within `limits` until `shutdown` resolves, then finishes
/// in-flight requests.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(listener, router(state), limits, shutdown).await
}
