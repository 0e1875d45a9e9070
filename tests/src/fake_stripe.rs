//! A local stand-in for Stripe's API on loopback, speaking its shapes: objects built from the
//! fixtures, lists newest first with `has_more` and `starting_after`, Stripe-shaped errors
//! with a `Request-Id`, a token-bucket rate limit answering 429 with
//! `Stripe-Rate-Limited-Reason`, and failures a test injects. It logs every request's time,
//! so a test can check the rate the product kept.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{Value, json};

/// The fake; cheap to clone (clones share state).
#[derive(Clone, Default)]
pub struct FakeStripe {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    subscriptions: Mutex<BTreeMap<String, Value>>,
    events: Mutex<Vec<Value>>,
    requests: Mutex<Vec<(Instant, String)>>,
    served: AtomicUsize,
    failing: AtomicBool,
    fail_from: AtomicUsize,
    injected: Mutex<VecDeque<u16>>,
    bucket: Mutex<Option<Bucket>>,
}

/// A token bucket: `rate` tokens a second, holding at most `burst`.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn error(status: StatusCode, error_type: &str, code: Option<&str>, message: &str) -> Response {
    let mut body = json!({ "error": { "type": error_type, "message": message } });
    if let Some(code) = code {
        body["error"]["code"] = json!(code);
    }
    (status, Json(body)).into_response()
}

fn not_found(what: &str, id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("resource_missing"),
        &format!("No such {what}: '{id}'"),
    )
}

impl FakeStripe {
    /// Serves on a loopback port; returns the fake and its base URL.
    pub async fn start() -> (FakeStripe, String) {
        let fake = FakeStripe::default();
        let app = Router::new()
            .route("/v1/subscriptions", axum::routing::get(list_subscriptions))
            .route(
                "/v1/subscriptions/{id}",
                axum::routing::get(get_subscription),
            )
            .route("/v1/events", axum::routing::get(list_events))
            .layer(axum::middleware::from_fn_with_state(fake.clone(), gate))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Stripe");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, url)
    }

    /// Adds or replaces a subscription (what `GET /v1/subscriptions[/{id}]` answers).
    pub fn set_subscription(&self, subscription: Value) {
        let id = subscription["id"]
            .as_str()
            .expect("subscription id")
            .to_owned();
        self.inner
            .subscriptions
            .lock()
            .expect("lock")
            .insert(id, subscription);
    }

    /// Adds an event to what `GET /v1/events` lists.
    pub fn add_event(&self, event: Value) {
        self.inner.events.lock().expect("lock").push(event);
    }

    /// Answers every request with Stripe's 500 `api_error` while `failing`.
    pub fn set_failing(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::SeqCst);
    }

    /// Answers 500 to every request from the `n`-th on (1-based; 0 turns it off).
    pub fn fail_from(&self, n: usize) {
        self.inner.fail_from.store(n, Ordering::SeqCst);
    }

    /// Requests whose path and query start with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> usize {
        self.inner
            .requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, uri)| uri.starts_with(prefix))
            .count()
    }

    /// The next requests get these statuses (429 or 5xx), one each, before being served.
    pub fn inject(&self, statuses: impl IntoIterator<Item = u16>) {
        self.inner.injected.lock().expect("lock").extend(statuses);
    }

    /// Limits requests to `rate` a second (bursts of `burst`), answering 429 beyond.
    pub fn limit_rate(&self, rate: f64, burst: f64) {
        *self.inner.bucket.lock().expect("lock") = Some(Bucket {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        });
    }

    /// Requests received so far, answered or refused.
    pub fn requests(&self) -> usize {
        self.inner.requests.lock().expect("lock").len()
    }

    /// Requests answered 2xx so far.
    pub fn served(&self) -> usize {
        self.inner.served.load(Ordering::SeqCst)
    }

    /// The most requests received within any `window`.
    pub fn peak_requests_within(&self, window: Duration) -> usize {
        let times: Vec<Instant> = self
            .inner
            .requests
            .lock()
            .expect("lock")
            .iter()
            .map(|(at, _)| *at)
            .collect();
        let mut peak = 0;
        let mut start = 0;
        for end in 0..times.len() {
            while times[end].duration_since(times[start]) >= window {
                start += 1;
            }
            peak = peak.max(end - start + 1);
        }
        peak
    }
}

/// Logs each request, then refuses it when failing, injected or over the rate limit.
async fn gate(State(fake): State<FakeStripe>, request: Request, next: Next) -> Response {
    let inner = &fake.inner;
    let n = {
        let mut log = inner.requests.lock().expect("lock");
        log.push((Instant::now(), request.uri().to_string()));
        log.len()
    };
    let injected = inner.injected.lock().expect("lock").pop_front();
    let limited = inner
        .bucket
        .lock()
        .expect("lock")
        .as_mut()
        .is_some_and(|bucket| !bucket.take());
    let fail_from = inner.fail_from.load(Ordering::SeqCst);
    let down = inner.failing.load(Ordering::SeqCst) || (fail_from > 0 && n >= fail_from);
    let mut response = if down || injected.is_some_and(|s| s >= 500) {
        let status = StatusCode::from_u16(injected.unwrap_or(500))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        error(status, "api_error", None, "An unknown error occurred")
    } else if limited || injected == Some(429) {
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            "invalid_request_error",
            Some("rate_limit"),
            "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
        );
        response.headers_mut().insert(
            "Stripe-Rate-Limited-Reason",
            HeaderValue::from_static("global-rate"),
        );
        response
    } else {
        let response = next.run(request).await;
        if response.status().is_success() {
            inner.served.fetch_add(1, Ordering::SeqCst);
        }
        response
    };
    if let Ok(id) = HeaderValue::from_str(&format!("req_fake_{n}")) {
        response.headers_mut().insert("Request-Id", id);
    }
    response
}

async fn get_subscription(State(fake): State<FakeStripe>, Path(id): Path<String>) -> Response {
    let found = fake
        .inner
        .subscriptions
        .lock()
        .expect("lock")
        .get(&id)
        .cloned();
    match found {
        Some(sub) => Json(sub).into_response(),
        None => not_found("subscription", &id),
    }
}

/// The query's pairs, `types[]` and the like repeated.
fn pairs(query: Option<String>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn param<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Newest first (by `created`, then id), from after `starting_after`, `limit` at most.
fn page(url: &str, mut objects: Vec<Value>, pairs: &[(String, String)]) -> Response {
    objects.sort_by(|a, b| {
        let key = |o: &Value| {
            (
                o["created"].as_i64().unwrap_or(0),
                o["id"].as_str().unwrap_or("").to_owned(),
            )
        };
        key(b).cmp(&key(a))
    });
    let limit: usize = match param(pairs, "limit").map(str::parse) {
        None => 10,
        Some(Ok(n)) if (1..=100).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("parameter_invalid_integer"),
                "Invalid integer: limit must be between 1 and 100",
            );
        }
    };
    let start = match param(pairs, "starting_after") {
        None => 0,
        Some(after) => match objects.iter().position(|o| o["id"] == after) {
            Some(at) => at + 1,
            None => return not_found("object", after),
        },
    };
    let rest = objects.get(start..).unwrap_or_default();
    let data: Vec<Value> = rest.iter().take(limit).cloned().collect();
    Json(json!({
        "object": "list", "url": url, "has_more": rest.len() > limit, "data": data
    }))
    .into_response()
}

async fn list_subscriptions(State(fake): State<FakeStripe>, RawQuery(query): RawQuery) -> Response {
    let pairs = pairs(query);
    let all = param(&pairs, "status") == Some("all");
    let subscriptions: Vec<Value> = fake
        .inner
        .subscriptions
        .lock()
        .expect("lock")
        .values()
        .filter(|s| all || s["status"] != "canceled")
        .cloned()
        .collect();
    page("/v1/subscriptions", subscriptions, &pairs)
}

async fn list_events(State(fake): State<FakeStripe>, RawQuery(query): RawQuery) -> Response {
    let pairs = pairs(query);
    let since: i64 = param(&pairs, "created[gte]")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let types: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "types[]")
        .map(|(_, v)| v.as_str())
        .collect();
    if types.len() > 20 {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("parameter_invalid"),
            "You may pass at most 20 types",
        );
    }
    let events: Vec<Value> = fake
        .inner
        .events
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| e["created"].as_i64().unwrap_or(0) >= since)
        .filter(|e| types.is_empty() || types.iter().any(|t| e["type"] == *t))
        .cloned()
        .collect();
    page("/v1/events", events, &pairs)
}
