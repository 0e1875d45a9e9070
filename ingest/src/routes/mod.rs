//! The HTTP routes of ingest. Handlers only orchestrate: extract, one call into `shared`, answer.

pub mod billing;
pub mod billing_actions;
pub mod enterprise;
pub mod health;
pub mod payments;
pub mod usage;
pub mod webhooks;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use shared::enterprise::{FieldError, check_idempotency_key};

use crate::error::ApiError;

/// A JSON route's body, or the answer to a body that could not be read (`limit` is the route's
/// body limit, named in a 413).
pub(crate) fn read_body(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit },
        _ => ApiError::BadRequest(rejection.body_text()),
    })
}

/// The `Idempotency-Key` header, checked; `None` when absent.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value.to_str().map_err(|_| FieldError {
        field: "Idempotency-Key".into(),
        message: "must be visible ASCII characters without spaces".into(),
    })?;
    check_idempotency_key(key)?;
    Ok(Some(key))
}
