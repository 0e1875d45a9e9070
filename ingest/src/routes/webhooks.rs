//! `POST /v1/webhooks/stripe`: verify, store the exact bytes, enqueue, answer.
//!
//! The answer is 200 only after the inbox row is committed. A duplicate delivery (same event
//! id) answers 200 too but changes nothing and is not enqueued again. If only the Redis push
//! fails the event is safe in Postgres, so the answer is still 200 and the sweeper enqueues it.

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use shared::db::webhook_events::{self, NewEvent};
use shared::metrics::{ENQUEUE_FAILURES, WEBHOOK_DURATION, WEBHOOKS_RECEIVED};
use shared::signature;
use shared::stripe::{EventEnvelope, timestamp};

use crate::AppState;
use crate::error::ApiError;

/// The header Stripe signs with.
const SIGNATURE_HEADER: &str = "stripe-signature";

/// Handles one delivery.
pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let result = store_and_enqueue(&state, &headers, body).await;
    let outcome = match &result {
        Ok(true) => "stored",
        Ok(false) => "duplicate",
        Err(ApiError::Signature(_)) => "bad_signature",
        Err(ApiError::PayloadTooLarge { .. }) => "too_large",
        Err(ApiError::Unavailable(_)) => "store_failed",
        Err(_) => "bad_payload",
    };
    ::metrics::counter!(WEBHOOKS_RECEIVED, "outcome" => outcome).increment(1);
    ::metrics::histogram!(WEBHOOK_DURATION).record(started.elapsed().as_secs_f64());
    result.map(|_| Json(json!({ "received": true })))
}

/// `Ok(true)` when the event was new, `Ok(false)` for a duplicate.
async fn store_and_enqueue(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<bool, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge {
            limit: state.body_limit_bytes,
        },
        _ => ApiError::BadRequest(rejection.body_text()),
    })?;
    let header = headers
        .get(SIGNATURE_HEADER)
        .map(|v| v.to_str().unwrap_or_default());
    signature::verify(
        &body,
        header,
        &state.webhook_secrets,
        chrono::Utc::now().timestamp(),
        signature::DEFAULT_TOLERANCE_SECS,
    )?;
    let envelope: EventEnvelope<'_> =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadPayload(e.to_string()))?;
    let stripe_created = timestamp(envelope.created)
        .ok_or_else(|| ApiError::BadPayload("created is out of range".to_owned()))?;
    let event = NewEvent {
        id: &envelope.id,
        event_type: &envelope.event_type,
        livemode: envelope.livemode,
        api_version: envelope.api_version.as_deref(),
        stripe_created,
        payload: &body,
    };
    let inserted = webhook_events::insert(&state.pool, &event)
        .await
        .map_err(|e| {
            ApiError::Unavailable(anyhow::Error::new(e).context("storing the webhook event"))
        })?;
    if inserted && let Err(e) = state.queue.push(&[&envelope.id]).await {
        ::metrics::counter!(ENQUEUE_FAILURES).increment(1);
        tracing::warn!(event.id = %envelope.id, error = %e, "event stored but not enqueued; the sweeper will enqueue it");
    }
    Ok(inserted)
}
