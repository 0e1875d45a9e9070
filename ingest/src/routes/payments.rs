//! `GET /v1/organizations/{organization_id}/payments` and `…/payments/{id}`: the
//! organization's one-time payments (the ledger the worker keeps from Checkout, payment intent,
//! refund and dispute events), newest first, and one of them by checkout session id or payment
//! intent id, which the web app's success page polls while a delayed payment settles.

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::billing::payment::{DisputeStatus, PaymentOutcome, PaymentStatus};
use shared::db::organizations;
use shared::db::payments::{self, StoredPayment};

use crate::AppState;
use crate::auth::InternalCaller;
use crate::error::ApiError;

/// The list's response body.
#[derive(Debug, Serialize)]
pub struct PaymentsResponse {
    organization_id: String,
    payments: Vec<PaymentBody>,
}

/// One payment.
#[derive(Debug, Serialize)]
pub struct PaymentBody {
    id: String,
    checkout_session_id: Option<String>,
    payment_intent_id: Option<String>,
    status: PaymentStatus,
    outcome: PaymentOutcome,
    /// Minor units (cents); `null` when no event said (a purchase carried over from before
    /// the ledger).
    amount: Option<i64>,
    currency: Option<String>,
    amount_refunded: i64,
    dispute_status: Option<DisputeStatus>,
    failure_reason: Option<String>,
    /// The events behind the outcome, the refunds and the dispute, and their `created`.
    outcome_event_id: Option<String>,
    outcome_event_created: Option<DateTime<Utc>>,
    refund_event_id: Option<String>,
    refund_event_created: Option<DateTime<Utc>>,
    dispute_event_id: Option<String>,
    dispute_event_created: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<StoredPayment> for PaymentBody {
    fn from(p: StoredPayment) -> PaymentBody {
        let s = p.state;
        PaymentBody {
            id: s.id,
            checkout_session_id: s.checkout_session_id,
            payment_intent_id: s.payment_intent_id,
            status: s.status,
            outcome: s.outcome,
            amount: s.amount,
            currency: s.currency,
            amount_refunded: s.amount_refunded,
            dispute_status: s.dispute_status,
            failure_reason: s.failure_reason,
            outcome_event_id: s.outcome_event_id,
            outcome_event_created: s.outcome_event_created,
            refund_event_id: s.refund_event_id,
            refund_event_created: s.refund_event_created,
            dispute_event_id: s.dispute_event_id,
            dispute_event_created: s.dispute_event_created,
            created_at: p.created_at,
            updated_at: p.updated_at,
        }
    }
}

fn unavailable(e: sqlx::Error) -> ApiError {
    ApiError::Unavailable(e.into())
}

/// Answers the organization's payments, newest first; 404 for an unknown organization.
pub async fn list_payments(
    _caller: InternalCaller,
    State(state): State<AppState>,
    Path(organization_id): Path<String>,
) -> Result<Json<PaymentsResponse>, ApiError> {
    organizations::get(&state.pool, &organization_id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            ApiError::NotFound(format!("organization {organization_id:?} is not known"))
        })?;
    let payments = payments::of_organization(&state.pool, &organization_id)
        .await
        .map_err(unavailable)?;
    Ok(Json(PaymentsResponse {
        organization_id,
        payments: payments.into_iter().map(Into::into).collect(),
    }))
}

/// Answers one payment by checkout session id or payment intent id, or 404.
pub async fn get_payment(
    _caller: InternalCaller,
    State(state): State<AppState>,
    Path((organization_id, id)): Path<(String, String)>,
) -> Result<Json<PaymentBody>, ApiError> {
    let payment = payments::find(&state.pool, &organization_id, &id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "organization {organization_id:?} has no payment {id:?}"
            ))
        })?;
    Ok(Json(payment.into()))
}
