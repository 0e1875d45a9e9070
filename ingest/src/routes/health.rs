//! `GET /healthz` (the process answers) and `GET /readyz` (Postgres and Redis answer).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::AppState;

/// Liveness.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: both stores answer within their timeouts.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let mut redis = state.redis.clone();
    let (postgres, redis) = tokio::join!(
        shared::db::ping(&state.pool),
        shared::queue::ping(&mut redis)
    );
    let verdict = |ok: bool| if ok { "ok" } else { "unavailable" };
    let status = if postgres.is_ok() && redis.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "postgres": verdict(postgres.is_ok()), "redis": verdict(redis.is_ok()) })),
    )
}
