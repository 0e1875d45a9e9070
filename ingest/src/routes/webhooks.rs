//! `POST /v1/webhooks/stripe`: verify, store the exact bytes, enqueue, answer.
//!
//! The answer is 200 only after the inbox row is committed. A duplicate delivery (same event
//! id) answers 200 too but changes nothing and is not enqueued again. If only the Redis push
//! fails the event is safe in Postgres, so the answer is still 200 and the sweeper enqueues it.
//! Storing and enqueueing go through the group commit of [`crate::batcher`].

use std::borrow::Cow;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use shared::metrics::{WEBHOOK_DURATION, WEBHOOKS_RECEIVED};
use shared::signature;
use shared::stripe::{EventEnvelope, timestamp};

use crate::AppState;
use crate::batcher::VerifiedEvent;
use crate::error::ApiError;

/// The header Stripe signs with.
const SIGNATURE_HEADER: &str = "stripe-signature";

/// The success answer, the same bytes every time (not re-serialized per request).
const RECEIVED: &str = r#"{"received":true}"#;

/// Handles one delivery.
pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
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
    result.map(|_| {
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            RECEIVED,
        )
            .into_response()
    })
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
    let event = VerifiedEvent {
        id: envelope.id.into_owned(),
        event_type: envelope.event_type.into_owned(),
        livemode: envelope.livemode,
        api_version: envelope.api_version.map(Cow::into_owned),
        stripe_created,
        payload: body.clone(),
    };
    state.batcher.store(event).await.map_err(|e| {
        ApiError::Unavailable(anyhow::Error::new(e).context("storing the webhook event"))
    })
}
