//! The few Stripe API calls the worker makes (refetching a subscription to settle a same-second
//! tie). A small reqwest client over the lenient models of `shared::stripe`: the typed
//! async-stripe client would parse with one pinned API version's required fields and adds a
//! large compile cost for one GET.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use shared::stripe::Subscription;

/// Stripe API access.
#[derive(Clone)]
pub struct StripeApi {
    http: reqwest::Client,
    base: String,
    key: SecretString,
}

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum StripeApiError {
    /// No answer (connection, timeout).
    #[error("stripe api request failed: {0}")]
    Transport(#[from] reqwest::Error),
    /// Stripe answered with an error status.
    #[error("stripe api answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Stripe's error message.
        message: String,
    },
    /// The answer is not the object asked for.
    #[error("stripe api answer could not be read: {0}")]
    Decode(String),
}

impl StripeApiError {
    /// Worth retrying later: no answer, rate limited (429), lock timeout (409), or a 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            StripeApiError::Transport(_) => true,
            StripeApiError::Status { status, .. } => matches!(status, 409 | 429 | 500..=599),
            StripeApiError::Decode(_) => false,
        }
    }
}

impl StripeApi {
    /// A client for `base` (Stripe's API, or a local fake in tests).
    pub fn new(base: &str, key: SecretString) -> Result<StripeApi, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .build()?;
        Ok(StripeApi {
            http,
            base: base.trim_end_matches('/').to_owned(),
            key,
        })
    }

    /// `GET /v1/subscriptions/{id}`.
    pub async fn subscription(&self, id: &str) -> Result<Subscription, StripeApiError> {
        let response = self
            .http
            .get(format!("{}/v1/subscriptions/{id}", self.base))
            .bearer_auth(self.key.expose_secret())
            .send()
            .await?;
        let status = response.status();
        let body = response.bytes().await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(StripeApiError::Status {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| StripeApiError::Decode(e.to_string()))
    }
}
