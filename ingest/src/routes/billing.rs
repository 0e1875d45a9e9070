//! `GET /v1/organizations/{organization_id}/billing`: the organization's billing state as the
//! web app needs it (its success page polls this while a 3-D Secure payment completes).

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::billing::{Access, PlanStatus, access};
use shared::db::organizations;

use crate::AppState;
use crate::auth::InternalCaller;
use crate::error::ApiError;

/// The response body.
#[derive(Debug, Serialize)]
pub struct BillingResponse {
    organization_id: String,
    plan: Option<String>,
    plan_status: PlanStatus,
    cancel_at_period_end: bool,
    current_period_end: Option<DateTime<Utc>>,
    stripe_customer_id: Option<String>,
    stripe_subscription_id: Option<String>,
    access: Access,
    updated_at: DateTime<Utc>,
}

/// Answers the stored state, or 404.
pub async fn get_billing(
    _caller: InternalCaller,
    State(state): State<AppState>,
    Path(organization_id): Path<String>,
) -> Result<Json<BillingResponse>, ApiError> {
    let org = organizations::get(&state.pool, &organization_id)
        .await
        .map_err(|e| ApiError::Unavailable(e.into()))?
        .ok_or_else(|| {
            ApiError::NotFound(format!("organization {organization_id:?} is not known"))
        })?;
    Ok(Json(BillingResponse {
        access: access(org.plan_status),
        organization_id: org.id,
        plan: org.plan,
        plan_status: org.plan_status,
        cancel_at_period_end: org.cancel_at_period_end,
        current_period_end: org.current_period_end,
        stripe_customer_id: org.stripe_customer_id,
        stripe_subscription_id: org.stripe_subscription_id,
        updated_at: org.updated_at,
    }))
}
