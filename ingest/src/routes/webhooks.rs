//! `POST /v1/webhooks/stripe`: verify, check the envelope, store the exact bytes, enqueue,
//! answer.
//!
//! The body arrives already read, within its limit, budget and deadline (`crate::body`). The
//! signature is checked on those exact bytes first (a body over `LARGE_BODY_BYTES` on a
//! blocking thread, one at a time, so a flood of near-limit bodies, each of which must be
//! hashed before it can be refused, takes at most one core and never the threads that answer
//! real deliveries, which are a few KB), then the envelope (`shared::envelope`):
//! a delivery Postgres could not store is refused here, alone (`400 invalid_payload` naming
//! the field), instead of failing the group commit it would have joined.
//!
//! The answer is 200 only after the inbox row is committed. A duplicate delivery (same event
//! id) answers 200 too but changes nothing and is not enqueued again. If only the Redis push
//! fails the event is safe in Postgres, so the answer is still 200 and the sweeper enqueues it.
//! Storing and enqueueing go through the group commit of [`crate::batcher`].

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use shared::metrics::{WEBHOOK_DURATION, WEBHOOKS_RECEIVED};
use shared::{envelope, signature};

use crate::AppState;
use crate::batcher::VerifiedEvent;
use crate::body::LARGE_BODY_BYTES;
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
    verify_signature(state, &body, headers.get(SIGNATURE_HEADER)).await?;
    let envelope = envelope::parse(&body)?;
    let event = VerifiedEvent {
        id: envelope.id,
        event_type: envelope.event_type,
        livemode: envelope.livemode,
        api_version: envelope.api_version,
        stripe_created: envelope.created,
        payload: body,
    };
    state.batcher.store(event).await.map_err(|e| {
        ApiError::Unavailable(anyhow::Error::new(e).context("storing the webhook event"))
    })
}

/// Checks the `Stripe-Signature` header's raw bytes (Stripe's libraries see non-ASCII bytes
/// as characters too) against the body, now.
async fn verify_signature(
    state: &AppState,
    body: &Bytes,
    header: Option<&HeaderValue>,
) -> Result<(), ApiError> {
    let now = chrono::Utc::now().timestamp();
    let check = move |state: &AppState, body: &Bytes, header: Option<&HeaderValue>| {
        signature::verify(
            body,
            header.map(HeaderValue::as_bytes),
            &state.webhook_secrets,
            now,
            signature::DEFAULT_TOLERANCE_SECS,
        )
    };
    if body.len() <= LARGE_BODY_BYTES {
        return Ok(check(state, body, header)?);
    }
    let _turn = state
        .large_body_checks
        .acquire()
        .await
        .map_err(|_| ApiError::Overloaded)?;
    let (state, body, header) = (state.clone(), body.clone(), header.cloned());
    tokio::task::spawn_blocking(move || check(&state, &body, header.as_ref()))
        .await
        .map_err(|e| {
            ApiError::Unavailable(anyhow::Error::new(e).context("verifying a signature"))
        })??;
    Ok(())
}
