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

/// A POST the fake received: its path, form parameters and idempotency key.
#[derive(Debug, Clone)]
pub struct Post {
    /// e.g. `/v1/checkout/sessions`.
    pub path: String,
    /// The form's pairs, in order.
    pub form: Vec<(String, String)>,
    /// `Idempotency-Key`.
    pub idempotency_key: Option<String>,
}

impl Post {
    /// The value of a form parameter.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An idempotency key's cached answer, or `None` while its first request is in flight.
type Remembered = Option<(StatusCode, Value)>;

#[derive(Default)]
struct Inner {
    subscriptions: Mutex<BTreeMap<String, Value>>,
    customers: Mutex<BTreeMap<String, Value>>,
    invoices: Mutex<Vec<Value>>,
    prices: Mutex<BTreeMap<String, String>>,
    inactive_prices: Mutex<Vec<String>>,
    posts: Mutex<Vec<Post>>,
    idempotent: Mutex<BTreeMap<String, Remembered>>,
    created: AtomicUsize,
    hanging: AtomicBool,
    meter_events: Mutex<BTreeMap<String, Value>>,
    meters: Mutex<Option<Vec<String>>>,
    hang_after_meter_event: AtomicBool,
    meter_latency_ms: AtomicUsize,
    meter_calls_in_flight: Mutex<BTreeMap<String, usize>>,
    most_meter_calls_in_flight: AtomicUsize,
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
            .route("/v1/invoices", axum::routing::get(list_invoices))
            .route("/v1/prices", axum::routing::get(list_prices))
            .route("/v1/customers", axum::routing::post(create_customer))
            .route(
                "/v1/customers/{id}",
                axum::routing::post(update_customer).get(get_customer),
            )
            .route(
                "/v1/checkout/sessions",
                axum::routing::post(create_checkout),
            )
            .route(
                "/v1/billing_portal/sessions",
                axum::routing::post(create_portal),
            )
            .route(
                "/v1/billing/meter_events",
                axum::routing::post(create_meter_event),
            )
            .layer(axum::middleware::from_fn_with_state(fake.clone(), gate))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Stripe");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, url)
    }

    /// Serves this customer (or deleted customer: `{"id", "deleted": true}`) at
    /// `GET /v1/customers/{id}`.
    pub fn set_customer(&self, customer: Value) {
        let id = customer["id"].as_str().expect("customer id").to_owned();
        self.inner
            .customers
            .lock()
            .expect("lock")
            .insert(id, customer);
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

    /// Adds an invoice (listed by `GET /v1/invoices?customer=…&status=…`).
    pub fn add_invoice(&self, invoice: Value) {
        self.inner.invoices.lock().expect("lock").push(invoice);
    }

    /// Makes `GET /v1/prices?lookup_keys[]=key` find `price_id`.
    pub fn set_lookup_key(&self, key: &str, price_id: &str) {
        self.inner
            .prices
            .lock()
            .expect("lock")
            .insert(key.to_owned(), price_id.to_owned());
    }

    /// Checkout refuses this price as inactive, as Stripe does.
    pub fn deactivate_price(&self, price_id: &str) {
        self.inner
            .inactive_prices
            .lock()
            .expect("lock")
            .push(price_id.to_owned());
    }

    /// While `hanging`, every request waits a minute before being answered.
    pub fn set_hanging(&self, hanging: bool) {
        self.inner.hanging.store(hanging, Ordering::SeqCst);
    }

    /// The POSTs to `path` received so far.
    pub fn posts_to(&self, path: &str) -> Vec<Post> {
        self.inner
            .posts
            .lock()
            .expect("lock")
            .iter()
            .filter(|p| p.path == path)
            .cloned()
            .collect()
    }

    /// The customers created (distinct objects, whatever the retries).
    pub fn customers(&self) -> Vec<Value> {
        self.inner
            .customers
            .lock()
            .expect("lock")
            .values()
            .cloned()
            .collect()
    }

    /// Only these meters exist (by `event_name`); others are refused as Stripe does. Unset:
    /// every meter exists.
    pub fn set_meters(&self, meters: &[&str]) {
        *self.inner.meters.lock().expect("lock") =
            Some(meters.iter().map(|m| (*m).to_owned()).collect());
    }

    /// While set, a meter event is recorded and then its answer never comes (the sender's
    /// crash or timeout after Stripe took it).
    pub fn hang_after_meter_event(&self, hang: bool) {
        self.inner
            .hang_after_meter_event
            .store(hang, Ordering::SeqCst);
    }

    /// Every meter event takes this long to answer (Stripe's own latency).
    pub fn set_meter_latency(&self, latency: Duration) {
        self.inner
            .meter_latency_ms
            .store(latency.as_millis() as usize, Ordering::SeqCst);
    }

    /// The meter events Stripe kept: one per identifier, however often it was sent.
    pub fn meter_events(&self) -> Vec<Value> {
        self.inner
            .meter_events
            .lock()
            .expect("lock")
            .values()
            .cloned()
            .collect()
    }

    /// The most meter-event calls for one customer and meter that were ever in flight at once.
    pub fn most_concurrent_meter_calls(&self) -> usize {
        self.inner.most_meter_calls_in_flight.load(Ordering::SeqCst)
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
    if inner.hanging.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
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

async fn get_customer(State(fake): State<FakeStripe>, Path(id): Path<String>) -> Response {
    let found = fake.inner.customers.lock().expect("lock").get(&id).cloned();
    match found {
        Some(customer) => Json(customer).into_response(),
        None => not_found("customer", &id),
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
/// Only the page's objects are copied: a list of 10,000 subscriptions is paged through a
/// hundred times by a reconciliation, and copying them all each time would make the fake,
/// not the product, what a benchmark measures.
fn page(url: &str, mut objects: Vec<&Value>, pairs: &[(String, String)]) -> Response {
    let key = |o: &Value| -> (i64, String) {
        (
            o["created"].as_i64().unwrap_or(0),
            o["id"].as_str().unwrap_or("").to_owned(),
        )
    };
    objects.sort_by_cached_key(|o| std::cmp::Reverse(key(o)));
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
    let data: Vec<Value> = rest.iter().take(limit).map(|o| (*o).clone()).collect();
    Json(json!({
        "object": "list", "url": url, "has_more": rest.len() > limit, "data": data
    }))
    .into_response()
}

async fn list_subscriptions(State(fake): State<FakeStripe>, RawQuery(query): RawQuery) -> Response {
    let pairs = pairs(query);
    let all = param(&pairs, "status") == Some("all");
    let stored = fake.inner.subscriptions.lock().expect("lock");
    let subscriptions: Vec<&Value> = stored
        .values()
        .filter(|s| all || s["status"] != "canceled")
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
    let stored = fake.inner.events.lock().expect("lock");
    let events: Vec<&Value> = stored
        .iter()
        .filter(|e| e["created"].as_i64().unwrap_or(0) >= since)
        .filter(|e| types.is_empty() || types.iter().any(|t| e["type"] == *t))
        .collect();
    page("/v1/events", events, &pairs)
}

fn form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// Records a POST and answers it once per idempotency key, as Stripe does: a repeat gets the
/// first answer, a repeat while the first is in flight gets 409.
async fn idempotent(
    fake: &FakeStripe,
    path: &str,
    headers: &axum::http::HeaderMap,
    body: &[u8],
    create: impl FnOnce(&FakeStripe, &Post) -> (StatusCode, Value),
) -> Response {
    let post = Post {
        path: path.to_owned(),
        form: form(body),
        idempotency_key: headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    fake.inner.posts.lock().expect("lock").push(post.clone());
    if let Some(key) = &post.idempotency_key {
        let mut remembered = fake.inner.idempotent.lock().expect("lock");
        match remembered.get(key) {
            Some(Some((status, value))) => return (*status, Json(value.clone())).into_response(),
            Some(None) => {
                return error(
                    StatusCode::CONFLICT,
                    "idempotency_error",
                    Some("idempotency_key_in_use"),
                    "There is currently another in-progress request using this Stripe-Idempotency-Key.",
                );
            }
            None => {
                remembered.insert(key.clone(), None);
            }
        }
    }
    // Stripe takes a while to create an object: concurrent repeats meet the first in flight.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (status, value) = create(fake, &post);
    if let Some(key) = &post.idempotency_key {
        fake.inner
            .idempotent
            .lock()
            .expect("lock")
            .insert(key.clone(), Some((status, value.clone())));
    }
    (status, Json(value)).into_response()
}

fn next_id(fake: &FakeStripe, prefix: &str) -> String {
    let n = fake.inner.created.fetch_add(1, Ordering::SeqCst) + 1;
    format!("{prefix}_fake_{n}")
}

async fn create_customer(
    State(fake): State<FakeStripe>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    idempotent(&fake, "/v1/customers", &headers, &body, |fake, post| {
        let id = next_id(fake, "cus");
        let mut customer = json!({ "id": id, "object": "customer", "metadata": {} });
        for (key, value) in &post.form {
            if let Some(meta) = key
                .strip_prefix("metadata[")
                .and_then(|k| k.strip_suffix(']'))
            {
                customer["metadata"][meta] = json!(value);
            } else {
                customer[key] = json!(value);
            }
        }
        fake.inner
            .customers
            .lock()
            .expect("lock")
            .insert(id, customer.clone());
        (StatusCode::OK, customer)
    })
    .await
}

async fn update_customer(
    State(fake): State<FakeStripe>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let path = format!("/v1/customers/{id}");
    idempotent(&fake, &path, &headers, &body, |fake, post| {
        let mut customers = fake.inner.customers.lock().expect("lock");
        let Some(customer) = customers.get_mut(&id) else {
            return (
                StatusCode::NOT_FOUND,
                json!({ "error": { "type": "invalid_request_error", "code": "resource_missing",
                                   "message": format!("No such customer: '{id}'") } }),
            );
        };
        for (key, value) in &post.form {
            customer[key] = json!(value);
        }
        (StatusCode::OK, customer.clone())
    })
    .await
}

async fn create_checkout(
    State(fake): State<FakeStripe>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    idempotent(&fake, "/v1/checkout/sessions", &headers, &body, |fake, post| {
        let price = post.param("line_items[0][price]").unwrap_or_default();
        if fake.inner.inactive_prices.lock().expect("lock").iter().any(|p| p == price) {
            return (
                StatusCode::BAD_REQUEST,
                json!({ "error": { "type": "invalid_request_error",
                    "param": "line_items[0][price]",
                    "message": "The price specified is inactive. This field only accepts active prices." } }),
            );
        }
        let id = next_id(fake, "cs_test");
        let session = json!({
            "id": id, "object": "checkout.session",
            "url": format!("https://checkout.stripe.com/c/pay/{id}"),
            "customer": post.param("customer"), "mode": post.param("mode"),
            "client_reference_id": post.param("client_reference_id")
        });
        (StatusCode::OK, session)
    })
    .await
}

async fn create_portal(
    State(fake): State<FakeStripe>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    idempotent(
        &fake,
        "/v1/billing_portal/sessions",
        &headers,
        &body,
        |fake, post| {
            let id = next_id(fake, "bps");
            let session = json!({
                "id": id, "object": "billing_portal.session",
                "url": format!("https://billing.stripe.com/p/session/{id}"),
                "customer": post.param("customer")
            });
            (StatusCode::OK, session)
        },
    )
    .await
}

async fn list_invoices(State(fake): State<FakeStripe>, RawQuery(query): RawQuery) -> Response {
    let pairs = pairs(query);
    let customer = param(&pairs, "customer");
    let status = param(&pairs, "status");
    let stored = fake.inner.invoices.lock().expect("lock");
    let invoices: Vec<&Value> = stored
        .iter()
        .filter(|i| customer.is_none_or(|c| i["customer"] == c))
        .filter(|i| status.is_none_or(|s| i["status"] == s))
        .collect();
    page("/v1/invoices", invoices, &pairs)
}

async fn list_prices(State(fake): State<FakeStripe>, RawQuery(query): RawQuery) -> Response {
    let pairs = pairs(query);
    let prices = fake.inner.prices.lock().expect("lock");
    let found: Vec<Value> = pairs
        .iter()
        .filter(|(k, _)| k == "lookup_keys[]")
        .filter_map(|(_, key)| {
            prices.get(key).map(|id| {
                json!({ "id": id, "object": "price", "lookup_key": key, "active": true, "created": 1 })
            })
        })
        .collect();
    drop(prices);
    page("/v1/prices", found.iter().collect(), &pairs)
}

/// Counts a meter-event call in flight for its customer and meter until dropped.
struct InFlight<'a> {
    fake: &'a FakeStripe,
    key: String,
}

impl<'a> InFlight<'a> {
    fn enter(fake: &'a FakeStripe, key: String) -> InFlight<'a> {
        let mut calls = fake.inner.meter_calls_in_flight.lock().expect("lock");
        let now = calls.entry(key.clone()).or_insert(0);
        *now += 1;
        fake.inner
            .most_meter_calls_in_flight
            .fetch_max(*now, Ordering::SeqCst);
        InFlight { fake, key }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(n) = self
            .fake
            .inner
            .meter_calls_in_flight
            .lock()
            .expect("lock")
            .get_mut(&self.key)
        {
            *n -= 1;
        }
    }
}

/// `POST /v1/billing/meter_events`: validated at once, kept once per identifier (a repeat
/// answers the kept event, as Stripe deduplicates identifiers).
async fn create_meter_event(
    State(fake): State<FakeStripe>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let post = Post {
        path: "/v1/billing/meter_events".to_owned(),
        form: form(&body),
        idempotency_key: headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    fake.inner.posts.lock().expect("lock").push(post.clone());
    let event_name = post.param("event_name").unwrap_or_default().to_owned();
    let customer = post
        .param("payload[stripe_customer_id]")
        .unwrap_or_default()
        .to_owned();
    let _in_flight = InFlight::enter(&fake, format!("{customer}/{event_name}"));
    let latency = fake.inner.meter_latency_ms.load(Ordering::SeqCst).max(20);
    tokio::time::sleep(Duration::from_millis(latency as u64)).await;
    let known = fake
        .inner
        .meters
        .lock()
        .expect("lock")
        .as_ref()
        .is_none_or(|meters| meters.contains(&event_name));
    if !known {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("resource_missing"),
            &format!("No active meter was found for event_name '{event_name}'."),
        );
    }
    let identifier = post.param("identifier").unwrap_or_default().to_owned();
    let event = fake
        .inner
        .meter_events
        .lock()
        .expect("lock")
        .entry(identifier.clone())
        .or_insert_with(|| {
            json!({
                "object": "billing.meter_event", "event_name": event_name,
                "identifier": identifier, "livemode": false, "created": 1,
                "timestamp": post.param("timestamp").and_then(|t| t.parse::<i64>().ok()),
                "payload": { "stripe_customer_id": customer, "value": post.param("payload[value]") }
            })
        })
        .clone();
    if fake.inner.hang_after_meter_event.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    Json(event).into_response()
}
