//! What a Stripe API call can fail with, and which failures are worth retrying.

use serde::Deserialize;

/// A failed Stripe API call.
#[derive(Debug, thiserror::Error)]
pub enum StripeApiError {
    /// No answer: connection refused or reset, or the timeout passed.
    #[error("Stripe API request failed: {0}")]
    Transport(#[source] reqwest::Error),
    /// Stripe answered with an error.
    #[error(
        "Stripe API answered {status}{}: {message}{}",
        code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default(),
        request_id.as_deref().map(|r| format!(" [request {r}]")).unwrap_or_default()
    )]
    Api {
        /// HTTP status.
        status: u16,
        /// Stripe's `error.type`.
        error_type: Option<String>,
        /// Stripe's `error.code`.
        code: Option<String>,
        /// Stripe's `error.message`, or the start of the body.
        message: String,
        /// `Request-Id`, to quote to Stripe's support.
        request_id: Option<String>,
        /// `Stripe-Should-Retry`, when Stripe said.
        should_retry: Option<bool>,
        /// `Stripe-Rate-Limited-Reason` of a 429.
        rate_limited_reason: Option<String>,
    },
    /// The answer is not what was asked for.
    #[error("Stripe API answer to {path} could not be read: {reason}")]
    Decode {
        /// The request path.
        path: String,
        /// What serde reported.
        reason: String,
    },
    /// The client is shutting down.
    #[error("the Stripe API client is closed")]
    Closed,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type", default)]
    error_type: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

impl StripeApiError {
    /// The error of a non-2xx answer.
    pub(super) fn from_answer(
        status: u16,
        body: &[u8],
        request_id: Option<String>,
        should_retry: Option<bool>,
        rate_limited_reason: Option<String>,
    ) -> StripeApiError {
        let detail = serde_json::from_slice::<ErrorBody>(body)
            .ok()
            .map(|b| b.error);
        let message = detail
            .as_ref()
            .and_then(|d| d.message.clone())
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect());
        StripeApiError::Api {
            status,
            error_type: detail.as_ref().and_then(|d| d.error_type.clone()),
            code: detail.and_then(|d| d.code),
            message,
            request_id,
            should_retry,
            rate_limited_reason,
        }
    }

    /// Worth retrying: no answer, or an answer Stripe says (or whose status says) may succeed
    /// later: 429, 409 (lock timeout, concurrent idempotent request), 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            StripeApiError::Transport(_) => true,
            StripeApiError::Api {
                status,
                should_retry,
                ..
            } => should_retry.unwrap_or(matches!(status, 409 | 429 | 500..=599)),
            StripeApiError::Decode { .. } | StripeApiError::Closed => false,
        }
    }

    /// Stripe answered 404: the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StripeApiError::Api { status: 404, .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, should_retry: Option<bool>) -> StripeApiError {
        let body = br#"{"error":{"type":"invalid_request_error","code":"resource_missing","message":"No such subscription: 'sub_x'"}}"#;
        StripeApiError::from_answer(status, body, Some("req_1".into()), should_retry, None)
    }

    #[test]
    fn transient_follows_stripe_should_retry_then_the_status() {
        assert!(answer(429, None).is_transient());
        assert!(answer(409, None).is_transient());
        assert!(answer(503, None).is_transient());
        assert!(!answer(400, None).is_transient());
        assert!(!answer(404, None).is_transient());
        assert!(!answer(500, Some(false)).is_transient());
        assert!(answer(400, Some(true)).is_transient());
    }

    #[test]
    fn the_message_carries_stripes_code_message_and_request_id() {
        let text = answer(404, None).to_string();
        assert_eq!(
            text,
            "Stripe API answered 404 (resource_missing): No such subscription: 'sub_x' [request req_1]"
        );
        assert!(answer(404, None).is_not_found());
    }
}
