//! `POST /v1/organizations/{organization_id}/checkout-sessions` and `…/portal-sessions`: the
//! billing actions of the product's backend (`shared::billing_actions`). These are the only
//! routes that call Stripe while the caller waits, so they run apart: at most
//! `BILLING_ACTIONS_CONCURRENCY` at once (more wait for a slot), each within
//! `BILLING_ACTIONS_TIMEOUT_MS` counted from its arrival (beyond, `503` with `Retry-After`);
//! the webhook route shares nothing with them but the process.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use serde::Serialize;
use serde_json::Value;
use shared::billing_actions::{ActionError, BillingActions, input};
use shared::enterprise::{self, FieldError};
use shared::metrics::BILLING_ACTIONS;
use tokio::sync::Semaphore;

use crate::AppState;
use crate::auth::InternalCaller;
use crate::error::ApiError;
use crate::routes::{idempotency_key, read_body};

/// Largest body accepted (two URLs of 2 KiB and a few short fields).
pub const BODY_LIMIT_BYTES: usize = 16 * 1024;

/// The actions with their limits; `None` actions when `STRIPE_SECRET_KEY` is not set.
pub struct ActionGate {
    /// The actions.
    pub actions: Option<BillingActions>,
    /// Slots for actions in flight.
    pub slots: Semaphore,
    /// Deadline of one action.
    pub timeout: Duration,
}

/// `POST …/checkout-sessions`.
pub async fn checkout(
    _caller: InternalCaller,
    State(state): State<AppState>,
    Path(organization_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let result = async {
        let body = read_body(body, BODY_LIMIT_BYTES)?;
        check_organization_id(&organization_id)?;
        let caller_key = idempotency_key(&headers)?;
        let request = input::parse_checkout(&body)?;
        run(&state.actions, |actions| {
            actions.checkout(&organization_id, &request, caller_key)
        })
        .await
    }
    .await;
    answer("checkout", result)
}

/// `POST …/portal-sessions`.
pub async fn portal(
    _caller: InternalCaller,
    State(state): State<AppState>,
    Path(organization_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let result = async {
        let body = read_body(body, BODY_LIMIT_BYTES)?;
        check_organization_id(&organization_id)?;
        let request = input::parse_portal(&body)?;
        run(&state.actions, |actions| {
            actions.portal(&organization_id, &request)
        })
        .await
    }
    .await;
    answer("portal", result)
}

/// Runs an action within its gate: a free slot, the deadline, and the key configured.
async fn run<'a, T, F, Fut>(gate: &'a ActionGate, action: F) -> Result<T, ApiError>
where
    F: FnOnce(&'a BillingActions) -> Fut,
    Fut: Future<Output = Result<T, ActionError>>,
{
    let actions = gate.actions.as_ref().ok_or(ApiError::NotConfigured(
        "billing actions need STRIPE_SECRET_KEY, which is not set",
    ))?;
    let within_slot = async {
        let _slot = gate.slots.acquire().await;
        action(actions).await
    };
    match tokio::time::timeout(gate.timeout, within_slot).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(_) => Err(ApiError::StripeUnavailable(format!(
            "Stripe did not answer within {} ms",
            gate.timeout.as_millis()
        ))),
    }
}

/// Counts the outcome and renders the answer.
fn answer<T: Serialize>(
    action: &'static str,
    result: Result<T, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let outcome = match &result {
        Ok(_) => "created",
        Err(
            ApiError::InvalidField(_) | ApiError::BadRequest(_) | ApiError::PayloadTooLarge { .. },
        ) => "invalid",
        Err(ApiError::Conflict { .. }) => "conflict",
        Err(ApiError::NotFound(_)) => "not_found",
        Err(ApiError::StripeRefused { .. }) => "stripe_error",
        Err(ApiError::NotConfigured(_)) => "not_configured",
        Err(_) => "unavailable",
    };
    ::metrics::counter!(BILLING_ACTIONS, "action" => action, "outcome" => outcome).increment(1);
    let value = serde_json::to_value(result?).map_err(|e| {
        ApiError::Unavailable(anyhow::Error::new(e).context("rendering the answer"))
    })?;
    Ok(Json(value))
}

/// An organization id from a path: 1 to 255 characters, no control characters.
pub(crate) fn check_organization_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.chars().count() > enterprise::MAX_ORGANIZATION_ID_LEN
        || id.chars().any(char::is_control)
    {
        return Err(FieldError {
            field: "organization_id".into(),
            message: format!(
                "must be 1 to {} characters without control characters",
                enterprise::MAX_ORGANIZATION_ID_LEN
            ),
        }
        .into());
    }
    Ok(())
}
