//! `organizations`: each customer organization's billing state. Writers lock the row
//! (`SELECT … FOR UPDATE`) inside the apply transaction, so concurrent events of one
//! organization are applied one after the other and none is lost.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::billing::{BillingState, PlanStatus};

/// A stored organization.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Organization {
    /// The product's organization id.
    pub id: String,
    /// Display name, when known.
    pub name: Option<String>,
    /// Linked Stripe customer.
    pub stripe_customer_id: Option<String>,
    /// Current subscription.
    pub stripe_subscription_id: Option<String>,
    /// Plan name.
    pub plan: Option<String>,
    /// Subscription status.
    pub plan_status: PlanStatus,
    /// Email used at checkout.
    pub billing_email: Option<String>,
    /// Ends at period end.
    pub cancel_at_period_end: bool,
    /// End of the paid period.
    pub current_period_end: Option<DateTime<Utc>>,
    /// When the subscription ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// Stripe `created` of the event that set the state.
    pub state_event_created: Option<DateTime<Utc>>,
    /// That event's id.
    pub state_event_id: Option<String>,
    /// Row creation.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl Organization {
    /// The billing columns, as the rules see them.
    pub fn billing_state(&self) -> BillingState {
        BillingState {
            plan: self.plan.clone(),
            plan_status: self.plan_status,
            subscription_id: self.stripe_subscription_id.clone(),
            cancel_at_period_end: self.cancel_at_period_end,
            current_period_end: self.current_period_end,
            ended_at: self.ended_at,
        }
    }
}

/// The column list of [`Organization`], as a literal so queries stay `&'static str`.
macro_rules! columns {
    () => {
        "id, name, stripe_customer_id, stripe_subscription_id, plan, plan_status, billing_email,
         cancel_at_period_end, current_period_end, ended_at, state_event_created, state_event_id,
         created_at, updated_at"
    };
}

/// One organization, unlocked (reads).
pub async fn get<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
) -> Result<Option<Organization>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM organizations WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Creates the organization if it does not exist, then locks and returns it.
pub async fn ensure_and_lock(
    db: &mut sqlx::PgConnection,
    id: &str,
) -> Result<Organization, sqlx::Error> {
    sqlx::query("INSERT INTO organizations (id) VALUES ($1) ON CONFLICT (id) DO NOTHING")
        .bind(id)
        .execute(&mut *db)
        .await?;
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM organizations WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_one(&mut *db)
    .await
}

/// The organization linked to a Stripe customer, locked.
pub async fn lock_by_customer<'e>(
    db: impl PgExecutor<'e>,
    customer_id: &str,
) -> Result<Option<Organization>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM organizations WHERE stripe_customer_id = $1 FOR UPDATE"
    ))
    .bind(customer_id)
    .fetch_optional(db)
    .await
}

/// Records the customer (and, when the organization has none yet, the subscription and
/// billing email) from a completed checkout.
pub async fn link_customer<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    customer_id: &str,
    subscription_id: Option<&str>,
    billing_email: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE organizations SET
            stripe_customer_id = $2,
            stripe_subscription_id = COALESCE(stripe_subscription_id, $3),
            billing_email = COALESCE($4, billing_email),
            updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(customer_id)
    .bind(subscription_id)
    .bind(billing_email)
    .execute(db)
    .await?;
    Ok(())
}

/// Writes a new billing state and the event that set it.
pub async fn set_billing_state<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    state: &BillingState,
    event_id: &str,
    event_created: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE organizations SET
            plan = $2, plan_status = $3, stripe_subscription_id = $4, cancel_at_period_end = $5,
            current_period_end = $6, ended_at = $7, state_event_id = $8, state_event_created = $9,
            updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(&state.plan)
    .bind(state.plan_status)
    .bind(&state.subscription_id)
    .bind(state.cancel_at_period_end)
    .bind(state.current_period_end)
    .bind(state.ended_at)
    .bind(event_id)
    .bind(event_created)
    .execute(db)
    .await?;
    Ok(())
}

/// Fills in the plan and period end from an older snapshot ([`crate::billing::fill_in`]),
/// leaving the status and the event the state came from as they are.
pub async fn fill_in_details<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    plan: Option<&str>,
    current_period_end: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE organizations SET plan = $2, current_period_end = $3, updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(plan)
    .bind(current_period_end)
    .execute(db)
    .await?;
    Ok(())
}

/// The id of the organization linked to a Stripe customer, if any.
pub async fn owner_of_customer<'e>(
    db: impl PgExecutor<'e>,
    customer_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM organizations WHERE stripe_customer_id = $1")
        .bind(customer_id)
        .fetch_optional(db)
        .await
}

/// Serializes, until the transaction ends, every transaction that resolves or links these
/// Stripe customers. Without it an event deferred for want of the link could commit its
/// deferral just after a concurrent checkout released the customer's deferred events, and wait
/// forever. Take them before locking any organization row, all at once and with the ids
/// distinct and sorted (the locks are taken in array order): one lock order, no deadlock.
pub async fn lock_customer_links<'e>(
    db: impl PgExecutor<'e>,
    customer_ids: &[&str],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('stripe-customer:' || customer, 0))
         FROM unnest($1::text[]) AS customer",
    )
    .bind(customer_ids)
    .execute(db)
    .await?;
    Ok(())
}
