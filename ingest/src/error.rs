//! The one HTTP error type. 4xx answers carry a stable machine-readable `code` and a message
//! (`invalid_field` and `invalid_payload` also name the `field`); 5xx answers are generic,
//! and the full error chain is logged once, here (except `overloaded`, expected under abuse
//! and counted instead).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use shared::billing_actions::ActionError;
use shared::enterprise::{FieldError, InputError, SubmitError};
use shared::envelope::EnvelopeError;
use shared::signature::SignatureError;
use shared::stripe_api::StripeApiError;

/// Everything a route can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The Stripe signature is missing, malformed, expired or wrong.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The body is over the configured limit.
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The body could not be read or is not what the endpoint takes.
    #[error("{0}")]
    BadRequest(String),
    /// A signed webhook body that is not an event ingest can store; names the field.
    #[error("invalid payload: {0}")]
    InvalidPayload(#[from] EnvelopeError),
    /// The body did not arrive within the body timeout.
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    /// The bytes of request bodies in flight are at their budget; retry shortly.
    #[error("too many request bodies in flight")]
    Overloaded,
    /// A field of the body (or a header) is missing or unusable; the answer names it.
    #[error(transparent)]
    InvalidField(#[from] FieldError),
    /// An `Idempotency-Key` used before with a different body.
    #[error("{0}")]
    IdempotencyConflict(String),
    /// Missing or wrong bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// No such resource.
    #[error("{0}")]
    NotFound(String),
    /// Storage is unavailable; the caller should retry (Stripe does).
    #[error("storage unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// The organization's state refuses the action; `code` says why.
    #[error("{message}")]
    Conflict {
        /// `already_subscribed`, `no_customer`, `no_subscription`.
        code: &'static str,
        /// What to do instead.
        message: String,
    },
    /// A route that needs settings this deployment lacks.
    #[error("{0}")]
    NotConfigured(&'static str),
    /// Stripe refused the call (a 4xx); its message and request id are passed on.
    #[error("Stripe refused: {message}{}", request_id.as_deref().map(|r| format!(" (request {r})")).unwrap_or_default())]
    StripeRefused {
        /// Stripe's message.
        message: String,
        /// Stripe's `Request-Id`.
        request_id: Option<String>,
    },
    /// Stripe is unreachable, slow or rate limiting; retry later.
    #[error("{0}; retry later")]
    StripeUnavailable(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Signature(SignatureError::Missing) => {
                (StatusCode::BAD_REQUEST, "missing_signature")
            }
            ApiError::Signature(SignatureError::Malformed(_)) => {
                (StatusCode::BAD_REQUEST, "malformed_signature")
            }
            ApiError::Signature(SignatureError::OutsideTolerance { .. }) => {
                (StatusCode::BAD_REQUEST, "signature_expired")
            }
            ApiError::Signature(SignatureError::NoMatch) => {
                (StatusCode::BAD_REQUEST, "invalid_signature")
            }
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::InvalidPayload(_) => (StatusCode::BAD_REQUEST, "invalid_payload"),
            ApiError::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::InvalidField(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"),
            ApiError::IdempotencyConflict(_) => (StatusCode::CONFLICT, "idempotency_conflict"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            ApiError::NotConfigured(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_configured"),
            ApiError::StripeRefused { .. } => (StatusCode::BAD_GATEWAY, "stripe_error"),
            ApiError::StripeUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }

    /// Answers whose message is meant for the caller although they are 5xx.
    fn explains_itself(&self) -> bool {
        matches!(
            self,
            ApiError::Overloaded
                | ApiError::NotConfigured(_)
                | ApiError::StripeRefused { .. }
                | ApiError::StripeUnavailable(_)
        )
    }
}

impl From<InputError> for ApiError {
    fn from(error: InputError) -> ApiError {
        match error {
            InputError::Field(field) => ApiError::InvalidField(field),
            other => ApiError::BadRequest(other.to_string()),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> ApiError {
        match error {
            e @ SubmitError::IdempotencyConflict { .. } => {
                ApiError::IdempotencyConflict(e.to_string())
            }
            SubmitError::Database(e) => ApiError::Unavailable(
                anyhow::Error::new(e).context("storing the enterprise request"),
            ),
        }
    }
}

impl From<ActionError> for ApiError {
    fn from(error: ActionError) -> ApiError {
        match error {
            ActionError::Field(field) => ApiError::InvalidField(field),
            ActionError::UnknownOrganization(id) => {
                ApiError::NotFound(format!("organization {id:?} is not known"))
            }
            ActionError::Conflict { code, message } => ApiError::Conflict { code, message },
            e @ ActionError::CustomerOwned { .. } => ApiError::Conflict {
                code: "customer_conflict",
                message: e.to_string(),
            },
            e @ ActionError::PriceNotFound(_) => {
                ApiError::Unavailable(anyhow::Error::new(e).context("resolving the plan's price"))
            }
            ActionError::Stripe(e) => stripe_error(*e),
            ActionError::Database(e) => {
                ApiError::Unavailable(anyhow::Error::new(e).context("a billing action"))
            }
        }
    }
}

/// A Stripe failure as an answer: a refusal (4xx other than 409/429) is the caller's to read;
/// anything transient is `503` to retry.
fn stripe_error(error: StripeApiError) -> ApiError {
    if error.is_transient() {
        return ApiError::StripeUnavailable(format!("Stripe is unavailable: {error}"));
    }
    match error {
        StripeApiError::Api {
            message,
            request_id,
            ..
        } => ApiError::StripeRefused {
            message,
            request_id,
        },
        other => ApiError::StripeUnavailable(format!("Stripe's answer was unusable: {other}")),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let field = match &self {
            ApiError::InvalidField(e) => Some(e.field.to_string()),
            ApiError::InvalidPayload(e) => Some(e.field().to_owned()),
            _ => None,
        };
        let message = if let ApiError::Overloaded = self {
            format!("{self}; retry later")
        } else if self.explains_itself() {
            tracing::warn!(error = %self, code, "billing action refused");
            self.to_string()
        } else if status.is_server_error() {
            tracing::error!(error = ?anyhow::Error::from(self), "request failed");
            "temporarily unavailable, retry later".to_owned()
        } else {
            self.to_string()
        };
        let mut error = json!({ "code": code, "message": message });
        if let Some(field) = field {
            error["field"] = field.into();
        }
        let mut response = (status, Json(json!({ "error": error }))).into_response();
        let retry_after = match code {
            "overloaded" => Some("1"),
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some("5"),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(seconds),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
