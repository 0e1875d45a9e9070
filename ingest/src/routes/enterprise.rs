//! `POST /v1/enterprise-requests`: the product's backend tells us a customer asks for the
//! Enterprise plan. Authenticate, validate, store the request and its sales email in one
//! transaction (`shared::enterprise::submit`), enqueue the email, answer
//! `200 {"status":"manual_review","request_id":…}`.
//!
//! The answer is 200 only after the commit. If only the Redis push fails, the email is safe in
//! the outbox, so the answer is still 200 and the sweeper enqueues it. With an
//! `Idempotency-Key`, a repeat answers the first call's `request_id` and sends nothing new; the
//! same key with another body is `409 idempotency_conflict`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use serde_json::{Value, json};
use shared::enterprise::{self, Submitted};
use shared::metrics::{ENQUEUE_FAILURES, ENTERPRISE_REQUESTS};

use crate::AppState;
use crate::auth::InternalCaller;
use crate::error::ApiError;
use crate::routes::{idempotency_key, read_body};

/// Largest body accepted: the four fields at their maximum lengths fit many times over.
pub const BODY_LIMIT_BYTES: usize = 16 * 1024;

/// Handles one request.
pub async fn create(
    _caller: InternalCaller,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let result = store_and_enqueue(&state, &headers, body).await;
    let outcome = match &result {
        Ok(Submitted {
            new_outbox_id: Some(_),
            ..
        }) => "created",
        Ok(_) => "repeated",
        Err(ApiError::IdempotencyConflict(_)) => "conflict",
        Err(ApiError::Unavailable(_)) => "store_failed",
        Err(_) => "invalid",
    };
    ::metrics::counter!(ENTERPRISE_REQUESTS, "outcome" => outcome).increment(1);
    let submitted = result?;
    Ok(Json(
        json!({ "status": "manual_review", "request_id": submitted.request_id }),
    ))
}

async fn store_and_enqueue(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Submitted, ApiError> {
    let body = read_body(body, BODY_LIMIT_BYTES)?;
    let idempotency_key = idempotency_key(headers)?;
    let input = enterprise::parse_request(&body)?;
    let submitted = enterprise::submit(&state.pool, &input, idempotency_key).await?;
    if let Some(outbox_id) = submitted.new_outbox_id {
        tracing::info!(
            request.id = %submitted.request_id,
            organization.id = %input.organization_id,
            outbox.id = %outbox_id,
            "enterprise request stored"
        );
        if let Err(e) = state.emails.push(&[outbox_id]).await {
            ::metrics::counter!(ENQUEUE_FAILURES).increment(1);
            tracing::warn!(outbox.id = %outbox_id, error = %e, "email stored but not enqueued; the sweeper will enqueue it");
        }
    }
    Ok(submitted)
}
