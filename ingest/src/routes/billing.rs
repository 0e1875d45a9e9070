//! `GET /v1/organizations/{organization_id}/billing`: the organization's billing state as the
//! web app needs it (its success page polls this while a 3-D Secure payment completes): the
//! derived state of the organization, and each of its subscriptions.

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::billing::subscription::SubscriptionState;
use shared::billing::{Access, PlanStatus, access};
use shared::db::{organizations, subscriptions};

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
    cancel_at: Option<DateTime<Utc>>,
    current_period_end: Option<DateTime<Utc>>,
    access_ends_at: Option<DateTime<Utc>>,
    stripe_customer_id: Option<String>,
    stripe_subscription_id: Option<String>,
    access: Access,
    lifetime: bool,
    /// Which of `checkout`, `portal`, `fix_payment` make sense now.
    billing_actions: Vec<&'static str>,
    subscriptions: Vec<SubscriptionBody>,
    updated_at: DateTime<Utc>,
}

/// One subscription of the organization, newest first.
#[derive(Debug, Serialize)]
pub struct SubscriptionBody {
    id: String,
    status: PlanStatus,
    /// `null` when none of its prices maps to a plan (see `price_ids`).
    plan: Option<String>,
    price_ids: Vec<String>,
    quantity: Option<i64>,
    current_period_end: Option<DateTime<Utc>>,
    cancel_at_period_end: bool,
    cancel_at: Option<DateTime<Utc>>,
    canceled_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
    trial_end: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
}

impl From<SubscriptionState> for SubscriptionBody {
    fn from(s: SubscriptionState) -> SubscriptionBody {
        let d = s.snapshot;
        SubscriptionBody {
            id: s.id,
            status: d.status,
            plan: d.plan,
            price_ids: d.price_ids,
            quantity: d.quantity,
            current_period_end: d.current_period_end,
            cancel_at_period_end: d.cancel_at_period_end,
            cancel_at: d.cancel_at,
            canceled_at: d.canceled_at,
            ended_at: d.ended_at,
            trial_end: d.trial_end,
            started_at: d.started_at,
        }
    }
}

/// Answers the stored state, or 404.
pub async fn get_billing(
    _caller: InternalCaller,
    State(state): State<AppState>,
    Path(organization_id): Path<String>,
) -> Result<Json<BillingResponse>, ApiError> {
    let unavailable = |e: sqlx::Error| ApiError::Unavailable(e.into());
    let org = organizations::get(&state.pool, &organization_id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            ApiError::NotFound(format!("organization {organization_id:?} is not known"))
        })?;
    let subscriptions = subscriptions::of_organization(&state.pool, &organization_id)
        .await
        .map_err(unavailable)?;
    Ok(Json(BillingResponse {
        access: access(org.plan_status),
        lifetime: org.has_lifetime(),
        billing_actions: shared::billing_actions::available(&org),
        organization_id: org.id,
        plan: org.plan,
        plan_status: org.plan_status,
        cancel_at_period_end: org.cancel_at_period_end,
        cancel_at: org.cancel_at,
        current_period_end: org.current_period_end,
        access_ends_at: org.access_ends_at,
        stripe_customer_id: org.stripe_customer_id,
        stripe_subscription_id: org.stripe_subscription_id,
        subscriptions: subscriptions.into_iter().map(Into::into).collect(),
        updated_at: org.updated_at,
    }))
}
