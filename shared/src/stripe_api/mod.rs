//! The product's one Stripe API client: the worker's refetches, reconciliation and backfill,
//! and (later) ingest's billing actions and the usage reporter all call Stripe through it.
//!
//! Every call waits for the process-wide rate limiter (`STRIPE_API_RATE_LIMIT` requests a
//! second, spaced evenly, so no second ever sees more) and for one of
//! `STRIPE_API_CONCURRENCY` slots, has a timeout, and is retried on a 429, a 409 (a lock
//! timeout or a concurrent request with the same idempotency key), a 5xx or no answer, with
//! exponential backoff and jitter, unless Stripe says `Stripe-Should-Retry: false`. A 429 is
//! never fatal: it is retried until the attempts run out, like any transient failure, and the
//! caller decides what an exhausted retry means. Other 4xx are permanent.
//!
//! Why reqwest and not async-stripe (the crate DESIGN.md names): every need here is one the
//! notes found it cannot serve. Backfill must store an API event's JSON exactly as returned
//! (async-stripe parses it, into types of its one pinned API version that events rendered in
//! older versions fail); 429 handling needs `Stripe-Should-Retry` and
//! `Stripe-Rate-Limited-Reason`, and its errors expose no headers; creates need a fixed
//! idempotency key *and* retries, which none of its strategies gives; and its typed objects
//! would have to be converted into the lenient models every event is already read with
//! (`crate::stripe`). A few GETs and form POSTs over reqwest, which the workspace already
//! builds, cost far less than its generated crates.

mod error;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

pub use self::error::StripeApiError;
use crate::metrics::{STRIPE_API_RATE_LIMITED, STRIPE_API_REQUESTS};
use crate::stripe::Subscription;

/// How the client behaves.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Requests a second, at most.
    pub rate_limit: NonZeroU32,
    /// Requests in flight, at most.
    pub concurrency: usize,
    /// Time allowed for one request, answer included.
    pub timeout: Duration,
    /// Retries after the first attempt of a transient failure.
    pub max_retries: usize,
    /// Backoff before the first retry; doubles each time, with jitter.
    pub retry_base: Duration,
}

impl Default for ClientSettings {
    fn default() -> ClientSettings {
        ClientSettings {
            rate_limit: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            concurrency: 8,
            timeout: Duration::from_secs(20),
            max_retries: 6,
            retry_base: Duration::from_millis(500),
        }
    }
}

/// Which Stripe mode a secret key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMode {
    /// `sk_live_…` or `rk_live_…`.
    Live,
    /// `sk_test_…` or `rk_test_…`.
    Test,
    /// Another shape (a key for a local fake).
    Unknown,
}

impl KeyMode {
    /// The mode of a key, by its prefix.
    pub fn of(key: &str) -> KeyMode {
        if key.starts_with("sk_live_") || key.starts_with("rk_live_") {
            KeyMode::Live
        } else if key.starts_with("sk_test_") || key.starts_with("rk_test_") {
            KeyMode::Test
        } else {
            KeyMode::Unknown
        }
    }
}

/// One page of a Stripe list.
#[derive(Debug, Deserialize)]
pub struct ListPage<T> {
    /// The objects, newest first.
    pub data: Vec<T>,
    /// More follow: ask again with `starting_after` = the last id.
    pub has_more: bool,
}

/// The client; cheap to clone, one per process (its limits are the process's, shared by
/// every clone and every [`StripeClient::with_max_retries`] handle).
#[derive(Clone)]
pub struct StripeClient {
    inner: Arc<Inner>,
    max_retries: usize,
}

struct Inner {
    http: reqwest::Client,
    base: String,
    key: SecretString,
    limiter: DefaultDirectRateLimiter,
    slots: Semaphore,
    settings: ClientSettings,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient")
            .field("base", &self.inner.base)
            .field("key", &"[REDACTED]")
            .field("settings", &self.inner.settings)
            .finish()
    }
}

/// An HTTP method the client sends.
#[derive(Debug, Clone, Copy)]
enum Method {
    Get,
    Post,
}

impl StripeClient {
    /// A client for `base` (Stripe's API, or a local fake in tests).
    pub fn new(
        base: &str,
        key: SecretString,
        settings: ClientSettings,
    ) -> Result<StripeClient, StripeApiError> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(StripeApiError::Transport)?;
        let quota = Quota::per_second(settings.rate_limit).allow_burst(NonZeroU32::MIN);
        Ok(StripeClient {
            max_retries: settings.max_retries,
            inner: Arc::new(Inner {
                http,
                base: base.trim_end_matches('/').to_owned(),
                key,
                limiter: RateLimiter::direct(quota),
                slots: Semaphore::new(settings.concurrency.max(1)),
                settings,
            }),
        })
    }

    /// A handle retrying at most `max_retries` times, under the same limits: for a caller with
    /// a retry schedule of its own (the applier's refetch, whose event is retried later).
    pub fn with_max_retries(&self, max_retries: usize) -> StripeClient {
        StripeClient {
            inner: Arc::clone(&self.inner),
            max_retries,
        }
    }

    /// The mode of the configured key.
    pub fn mode(&self) -> KeyMode {
        KeyMode::of(self.inner.key.expose_secret())
    }

    /// `GET /v1/subscriptions/{id}`.
    pub async fn subscription(&self, id: &str) -> Result<Subscription, StripeApiError> {
        self.get(&format!("/v1/subscriptions/{id}"), &[]).await
    }

    /// A GET, its answer read as `T`.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, StripeApiError> {
        let body = self.send(Method::Get, path, query, &[], None).await?;
        decode(path, &body)
    }

    /// One page of a list, each object kept as the exact JSON text Stripe sent.
    pub async fn list_raw(
        &self,
        path: &str,
        query: &[(&str, String)],
        starting_after: Option<&str>,
    ) -> Result<ListPage<Box<RawValue>>, StripeApiError> {
        let mut query = query.to_vec();
        if let Some(cursor) = starting_after {
            query.push(("starting_after", cursor.to_owned()));
        }
        let body = self.send(Method::Get, path, &query, &[], None).await?;
        decode(path, &body)
    }

    /// A form POST, its answer read as `T`. With an idempotency key every attempt carries the
    /// same one, so a retried create creates once.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        form: &[(String, String)],
        idempotency_key: Option<&str>,
    ) -> Result<T, StripeApiError> {
        let body = self
            .send(Method::Post, path, &[], form, idempotency_key)
            .await?;
        decode(path, &body)
    }

    /// Sends a request, retrying transient failures; returns the answer's body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        form: &[(String, String)],
        idempotency_key: Option<&str>,
    ) -> Result<bytes::Bytes, StripeApiError> {
        let settings = &self.inner.settings;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(settings.retry_base)
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(self.max_retries)
            .with_jitter();
        (|| self.attempt(method, path, query, form, idempotency_key))
            .retry(backoff)
            .when(StripeApiError::is_transient)
            .notify(|e, delay| {
                tracing::debug!(path, error = %e, ?delay, "Stripe API call failed; retrying");
            })
            .await
    }

    async fn attempt(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        form: &[(String, String)],
        idempotency_key: Option<&str>,
    ) -> Result<bytes::Bytes, StripeApiError> {
        let inner = &self.inner;
        let _slot = inner
            .slots
            .acquire()
            .await
            .map_err(|_| StripeApiError::Closed)?;
        inner.limiter.until_ready().await;
        let url = format!("{}{path}", inner.base);
        let request = match method {
            Method::Get => inner.http.get(url).query(query),
            Method::Post => inner.http.post(url).form(form),
        };
        let request = match idempotency_key {
            Some(key) => request.header("Idempotency-Key", key),
            None => request,
        };
        let result = request.bearer_auth(inner.key.expose_secret()).send().await;
        let response = match result {
            Ok(response) => response,
            Err(e) => {
                metrics::counter!(STRIPE_API_REQUESTS, "outcome" => "transport").increment(1);
                return Err(StripeApiError::Transport(e));
            }
        };
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let request_id = header("Request-Id");
        let should_retry = header("Stripe-Should-Retry").map(|v| v == "true");
        let rate_limited_reason = header("Stripe-Rate-Limited-Reason");
        let body = response.bytes().await.map_err(StripeApiError::Transport)?;
        let outcome = match status {
            200..=299 => "ok",
            429 => "rate_limited",
            500..=599 => "server_error",
            _ => "client_error",
        };
        metrics::counter!(STRIPE_API_REQUESTS, "outcome" => outcome).increment(1);
        if (200..300).contains(&status) {
            return Ok(body);
        }
        if status == 429 {
            let reason = rate_limited_reason.as_deref().unwrap_or("lock_timeout");
            metrics::counter!(STRIPE_API_RATE_LIMITED, "reason" => reason.to_owned()).increment(1);
        }
        Err(StripeApiError::from_answer(
            status,
            &body,
            request_id,
            should_retry,
            rate_limited_reason,
        ))
    }
}

fn decode<T: DeserializeOwned>(path: &str, body: &[u8]) -> Result<T, StripeApiError> {
    serde_json::from_slice(body).map_err(|e| StripeApiError::Decode {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_modes_follow_the_prefix() {
        assert_eq!(KeyMode::of("sk_live_abc"), KeyMode::Live);
        assert_eq!(KeyMode::of("rk_live_abc"), KeyMode::Live);
        assert_eq!(KeyMode::of("sk_test_abc"), KeyMode::Test);
        assert_eq!(KeyMode::of("rk_test_abc"), KeyMode::Test);
        assert_eq!(KeyMode::of("fake"), KeyMode::Unknown);
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let client = StripeClient::new(
            "http://127.0.0.1:1",
            SecretString::from("sk_test_secret_value"),
            ClientSettings::default(),
        )
        .expect("client");
        let debug = format!("{client:?}");
        assert!(!debug.contains("secret_value"), "{debug}");
    }
}
