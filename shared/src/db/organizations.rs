//! `organizations`: each customer organization's link to Stripe and its billing state, the
//! stored result of `billing::organization::derive` over its subscriptions and lifetime
//! purchase. Writers lock the rows (`SELECT … FOR UPDATE`) inside the apply transaction,
//! change them in memory and [`save`] them before commit, so concurrent events of one
//! organization are applied one after the other and none is lost.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::billing::PlanStatus;
use crate::billing::organization::OrganizationState;
use crate::billing::subscription::Stamp;

/// A stored organization.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Organization {
    /// The product's organization id.
    pub id: String,
    /// Display name, when known.
    pub name: Option<String>,
    /// Linked Stripe customer.
    pub stripe_customer_id: Option<String>,
    /// The governing subscription.
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
    /// When the governing subscription is scheduled to end.
    pub cancel_at: Option<DateTime<Utc>>,
    /// When access ends if nothing changes.
    pub access_ends_at: Option<DateTime<Utc>>,
    /// The paid one-time checkout event that granted lifetime access.
    pub lifetime_event_id: Option<String>,
    /// That event's `created`.
    pub lifetime_granted_at: Option<DateTime<Utc>>,
    /// Stripe `created` of the last event that changed the state (information only: ordering
    /// is per subscription).
    pub state_event_created: Option<DateTime<Utc>>,
    /// That event's id.
    pub state_event_id: Option<String>,
    /// Row creation.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl Organization {
    /// Takes a newly derived billing state, changed by `event`; `false` when it equals the
    /// stored one (nothing to write).
    pub fn set_derived(&mut self, state: OrganizationState, event: Stamp<'_>) -> bool {
        if state == self.derived() {
            return false;
        }
        self.plan = state.plan;
        self.plan_status = state.plan_status;
        self.stripe_subscription_id = state.subscription_id;
        self.cancel_at_period_end = state.cancel_at_period_end;
        self.cancel_at = state.cancel_at;
        self.current_period_end = state.current_period_end;
        self.ended_at = state.ended_at;
        self.access_ends_at = state.access_ends_at;
        self.state_event_id = Some(event.id.to_owned());
        self.state_event_created = Some(event.created);
        true
    }

    /// The stored billing columns.
    pub fn derived(&self) -> OrganizationState {
        OrganizationState {
            plan: self.plan.clone(),
            plan_status: self.plan_status,
            subscription_id: self.stripe_subscription_id.clone(),
            cancel_at_period_end: self.cancel_at_period_end,
            cancel_at: self.cancel_at,
            current_period_end: self.current_period_end,
            ended_at: self.ended_at,
            access_ends_at: self.access_ends_at,
        }
    }

    /// Holds a lifetime purchase.
    pub fn has_lifetime(&self) -> bool {
        self.lifetime_event_id.is_some()
    }
}

/// The column list of [`Organization`], as a literal so queries stay `&'static str`.
macro_rules! columns {
    () => {
        "id, name, stripe_customer_id, stripe_subscription_id, plan, plan_status, billing_email,
         cancel_at_period_end, current_period_end, ended_at, cancel_at, access_ends_at,
         lifetime_event_id, lifetime_granted_at, state_event_created, state_event_id,
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

/// Creates the organizations that do not exist yet. Ids distinct and sorted: concurrent
/// inserts of one new id wait for each other in one order.
pub async fn ensure_exist<'e>(db: impl PgExecutor<'e>, ids: &[&str]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO organizations (id) SELECT unnest($1::text[]) ON CONFLICT (id) DO NOTHING",
    )
    .bind(ids)
    .execute(db)
    .await?;
    Ok(())
}

/// Locks and returns the organizations with these ids and those linked to these customers,
/// in id order (the order their row locks are taken in).
pub async fn lock<'e>(
    db: impl PgExecutor<'e>,
    ids: &[&str],
    customer_ids: &[&str],
) -> Result<Vec<Organization>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM organizations WHERE id = ANY($1) OR stripe_customer_id = ANY($2)
         ORDER BY id FOR UPDATE"
    ))
    .bind(ids)
    .bind(customer_ids)
    .fetch_all(db)
    .await
}

/// Writes the link and billing columns of locked organizations, all in one statement, and
/// stamps `updated_at`.
pub async fn save<'e>(db: impl PgExecutor<'e>, orgs: &[&Organization]) -> Result<(), sqlx::Error> {
    fn column<'a, T: 'a>(orgs: &[&'a Organization], f: impl Fn(&'a Organization) -> T) -> Vec<T> {
        orgs.iter().map(|org| f(org)).collect()
    }
    sqlx::query(
        "UPDATE organizations AS o SET
            stripe_customer_id = n.stripe_customer_id,
            stripe_subscription_id = n.stripe_subscription_id,
            plan = n.plan, plan_status = n.plan_status, billing_email = n.billing_email,
            cancel_at_period_end = n.cancel_at_period_end,
            current_period_end = n.current_period_end, ended_at = n.ended_at,
            state_event_created = n.state_event_created, state_event_id = n.state_event_id,
            cancel_at = n.cancel_at, access_ends_at = n.access_ends_at,
            lifetime_event_id = n.lifetime_event_id,
            lifetime_granted_at = n.lifetime_granted_at,
            updated_at = now()
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::plan_status[],
                     $6::text[], $7::bool[], $8::timestamptz[], $9::timestamptz[],
                     $10::timestamptz[], $11::text[], $12::timestamptz[], $13::timestamptz[],
                     $14::text[], $15::timestamptz[])
              AS n(id, stripe_customer_id, stripe_subscription_id, plan, plan_status,
                   billing_email, cancel_at_period_end, current_period_end, ended_at,
                   state_event_created, state_event_id, cancel_at, access_ends_at,
                   lifetime_event_id, lifetime_granted_at)
         WHERE o.id = n.id",
    )
    .bind(column(orgs, |o| o.id.as_str()))
    .bind(column(orgs, |o| o.stripe_customer_id.as_deref()))
    .bind(column(orgs, |o| o.stripe_subscription_id.as_deref()))
    .bind(column(orgs, |o| o.plan.as_deref()))
    .bind(column(orgs, |o| o.plan_status))
    .bind(column(orgs, |o| o.billing_email.as_deref()))
    .bind(column(orgs, |o| o.cancel_at_period_end))
    .bind(column(orgs, |o| o.current_period_end))
    .bind(column(orgs, |o| o.ended_at))
    .bind(column(orgs, |o| o.state_event_created))
    .bind(column(orgs, |o| o.state_event_id.as_deref()))
    .bind(column(orgs, |o| o.cancel_at))
    .bind(column(orgs, |o| o.access_ends_at))
    .bind(column(orgs, |o| o.lifetime_event_id.as_deref()))
    .bind(column(orgs, |o| o.lifetime_granted_at))
    .execute(db)
    .await?;
    Ok(())
}

/// Organizations by id (reads).
pub async fn get_many<'e>(
    db: impl PgExecutor<'e>,
    ids: &[&str],
) -> Result<Vec<Organization>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM organizations WHERE id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(db)
    .await
}

/// The organizations linked to these customers: (customer, organization id) pairs.
pub async fn owners_of_customers<'e>(
    db: impl PgExecutor<'e>,
    customer_ids: &[&str],
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT stripe_customer_id, id FROM organizations WHERE stripe_customer_id = ANY($1)",
    )
    .bind(customer_ids)
    .fetch_all(db)
    .await
}

/// Organizations governed by a subscription (and holding no lifetime purchase): (id,
/// subscription id) pairs.
pub async fn governed_by_subscriptions<'e>(
    db: impl PgExecutor<'e>,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, stripe_subscription_id FROM organizations
         WHERE stripe_subscription_id IS NOT NULL AND lifetime_event_id IS NULL",
    )
    .fetch_all(db)
    .await
}

/// Links the customer to the organization unless it has one already; returns the
/// organization's customer either way. Take the customer's link lock first
/// ([`lock_customer_links`]), as every linking transaction does.
pub async fn link_customer<'e>(
    db: impl PgExecutor<'e>,
    organization_id: &str,
    customer_id: &str,
) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "WITH linked AS (
             UPDATE organizations SET stripe_customer_id = $2, updated_at = now()
             WHERE id = $1 AND stripe_customer_id IS NULL
             RETURNING stripe_customer_id)
         SELECT coalesce((SELECT stripe_customer_id FROM linked),
                         (SELECT stripe_customer_id FROM organizations WHERE id = $1))",
    )
    .bind(organization_id)
    .bind(customer_id)
    .fetch_one(db)
    .await
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
