//! Request bodies under a byte budget and a deadline: the layer in front of every route that
//! takes a body. It reads the whole body before the handler runs, and holds it against a
//! budget of bytes shared by all requests in flight, so hostile traffic (many bodies near the
//! limit, or bodies sent a byte a second) cannot grow memory without bound or hold a request
//! open forever.
//!
//! The reservation is made before a byte is read, from `Content-Length` (the body limit when
//! the length is not given), and held until the handler has answered (the handler's copy of
//! the body lives that long: a webhook's waits for its group commit). When the budget cannot
//! cover it the answer is `503 overloaded` with `Retry-After`, at once: Stripe retries, and a
//! request waiting for memory would hold its connection for nothing. Bodies over
//! [`LARGE_BODY_BYTES`] may use only three quarters of the budget; the last quarter is kept
//! for smaller ones, which is every real Stripe event (a few KB), so a flood of near-limit
//! bodies cannot starve real deliveries.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use shared::metrics::WEBHOOKS_RECEIVED;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// Bodies larger than this draw on the part of the budget that large bodies may use.
pub const LARGE_BODY_BYTES: usize = 64 * 1024;

/// The budget shared by every route's [`BodyGate`].
#[derive(Debug, Clone)]
pub struct BodyBudget {
    all: Arc<Semaphore>,
    large: Arc<Semaphore>,
    timeout: Duration,
}

impl BodyBudget {
    /// A budget of `bytes` held at once, each body read within `timeout`.
    pub fn new(bytes: usize, timeout: Duration) -> BodyBudget {
        let bytes = bytes.min(Semaphore::MAX_PERMITS);
        BodyBudget {
            all: Arc::new(Semaphore::new(bytes)),
            large: Arc::new(Semaphore::new(bytes - bytes / 4)),
            timeout,
        }
    }

    /// Bytes of the budget not held right now (tests, metrics).
    pub fn available(&self) -> usize {
        self.all.available_permits()
    }

    /// A gate for one route, with its body limit.
    pub fn gate(&self, limit: usize, route: Route) -> BodyGate {
        BodyGate {
            budget: self.clone(),
            limit,
            route,
        }
    }
}

/// Which route a gate stands in front of: webhook refusals are counted with the webhook
/// outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/webhooks/stripe`.
    Webhook,
    /// Any other route.
    Other,
}

/// The budget and body limit of one route; the state of [`hold_body`].
#[derive(Debug, Clone)]
pub struct BodyGate {
    budget: BodyBudget,
    limit: usize,
    route: Route,
}

/// A body's share of the budget, released when dropped.
struct Reservation {
    _all: OwnedSemaphorePermit,
    _large: Option<OwnedSemaphorePermit>,
}

impl BodyGate {
    fn reserve(&self, bytes: usize) -> Result<Reservation, ApiError> {
        let permits = u32::try_from(bytes).map_err(|_| ApiError::Overloaded)?;
        let large = if bytes > LARGE_BODY_BYTES {
            let permit = Arc::clone(&self.budget.large)
                .try_acquire_many_owned(permits)
                .map_err(|_| ApiError::Overloaded)?;
            Some(permit)
        } else {
            None
        };
        let all = Arc::clone(&self.budget.all)
            .try_acquire_many_owned(permits)
            .map_err(|_| ApiError::Overloaded)?;
        Ok(Reservation {
            _all: all,
            _large: large,
        })
    }

    async fn read(&self, body: Body, capacity: usize) -> Result<Bytes, ApiError> {
        let mut buffer = Vec::with_capacity(capacity);
        let mut chunks = body.into_data_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
            // A body longer than its Content-Length is cut off by hyper; one without a length
            // is stopped here.
            if buffer.len() + chunk.len() > self.limit {
                return Err(ApiError::PayloadTooLarge { limit: self.limit });
            }
            buffer.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buffer))
    }
}

/// Reads the body within the gate's limit, budget and deadline, then runs the route with it.
pub async fn hold_body(State(gate): State<BodyGate>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let size = match declared {
        Some(length) if length > gate.limit as u64 => {
            return refuse(&gate, ApiError::PayloadTooLarge { limit: gate.limit });
        }
        Some(length) => length as usize,
        None => gate.limit,
    };
    let reservation = match gate.reserve(size) {
        Ok(reservation) => reservation,
        Err(error) => return refuse(&gate, error),
    };
    let bytes = match tokio::time::timeout(gate.budget.timeout, gate.read(body, size)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) => return refuse(&gate, error),
        Err(_) => return refuse(&gate, ApiError::BodyTimeout),
    };
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    drop(reservation);
    response
}

fn refuse(gate: &BodyGate, error: ApiError) -> Response {
    if gate.route == Route::Webhook {
        let outcome = match error {
            ApiError::PayloadTooLarge { .. } => "too_large",
            ApiError::Overloaded => "overloaded",
            ApiError::BodyTimeout => "body_timeout",
            _ => "bad_request",
        };
        ::metrics::counter!(WEBHOOKS_RECEIVED, "outcome" => outcome).increment(1);
    }
    error.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_bodies_leave_a_quarter_of_the_budget_to_small_ones() {
        let budget = BodyBudget::new(4 * 1024 * 1024, Duration::from_secs(1));
        let gate = budget.gate(1024 * 1024, Route::Other);
        let large: Vec<_> = (0..3)
            .map(|_| gate.reserve(1024 * 1024).expect("fits in three quarters"))
            .collect();
        assert!(matches!(
            gate.reserve(1024 * 1024),
            Err(ApiError::Overloaded)
        ));
        let small: Vec<_> = (0..16)
            .map(|_| {
                gate.reserve(LARGE_BODY_BYTES)
                    .expect("small bodies still fit")
            })
            .collect();
        assert!(matches!(gate.reserve(1), Err(ApiError::Overloaded)));
        drop(small);
        drop(large);
        assert_eq!(budget.available(), 4 * 1024 * 1024);
    }
}
