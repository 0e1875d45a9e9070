//! `subscriptions`: each Stripe subscription's state and ordering marker
//! ([`crate::billing::subscription`]). Writers hold the lock of the subscription's
//! organization row (taken first, in the apply transaction) and lock the subscription rows
//! too, in id order after every organization row, so concurrent batches never deadlock.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::billing::subscription::SubscriptionState;

/// The column list of [`SubscriptionState`], as a literal so queries stay `&'static str`.
macro_rules! columns {
    () => {
        "id, organization_id, customer_id, status, plan, price_ids, quantity, current_period_end,
         cancel_at_period_end, cancel_at, canceled_at, ended_at, trial_end, started_at,
         pending_update, status_event_id, status_event_created, status_invoice,
         snapshot_event_created, failed_invoice_id, failed_invoice_created"
    };
}

/// Locks and returns the subscriptions of these organizations and those with these ids, in
/// id order.
pub async fn lock<'e>(
    db: impl PgExecutor<'e>,
    organization_ids: &[&str],
    ids: &[&str],
) -> Result<Vec<SubscriptionState>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM subscriptions WHERE organization_id = ANY($1) OR id = ANY($2)
         ORDER BY id FOR UPDATE"
    ))
    .bind(organization_ids)
    .bind(ids)
    .fetch_all(db)
    .await
}

/// Subscriptions by id (reads).
pub async fn get_many<'e>(
    db: impl PgExecutor<'e>,
    ids: &[&str],
) -> Result<Vec<SubscriptionState>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM subscriptions WHERE id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(db)
    .await
}

/// An organization's subscriptions, newest first (reads).
pub async fn of_organization<'e>(
    db: impl PgExecutor<'e>,
    organization_id: &str,
) -> Result<Vec<SubscriptionState>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM subscriptions WHERE organization_id = $1
         ORDER BY coalesce(started_at, status_event_created) DESC, id"
    ))
    .bind(organization_id)
    .fetch_all(db)
    .await
}

/// The ordering marker of each of these subscriptions that is stored (unlocked: to find the
/// events that tie before taking any lock).
pub async fn markers<'e>(
    db: impl PgExecutor<'e>,
    ids: &[&str],
) -> Result<Vec<(String, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as("SELECT id, status_event_created FROM subscriptions WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(db)
        .await
}

/// Inserts or replaces these subscriptions, all in one statement, and stamps `updated_at`.
/// Blank states (no status event) must not be given.
pub async fn save<'e>(
    db: impl PgExecutor<'e>,
    subscriptions: &[&SubscriptionState],
) -> Result<(), sqlx::Error> {
    fn column<'a, T: 'a>(
        subs: &[&'a SubscriptionState],
        f: impl Fn(&'a SubscriptionState) -> T,
    ) -> Vec<T> {
        subs.iter().map(|s| f(s)).collect()
    }
    let subs = subscriptions;
    // Postgres has no arrays of arrays of different lengths: the price ids travel as one
    // comma-joined text each (Stripe ids never contain commas).
    sqlx::query(
        "INSERT INTO subscriptions (id, organization_id, customer_id, status, plan, price_ids,
             quantity, current_period_end, cancel_at_period_end, cancel_at, canceled_at,
             ended_at, trial_end, started_at, pending_update, status_event_id,
             status_event_created, status_invoice, snapshot_event_created,
             failed_invoice_id, failed_invoice_created)
         SELECT id, organization_id, customer_id, status, plan,
                coalesce(string_to_array(nullif(price_ids, ''), ','), '{}'), quantity, current_period_end,
                cancel_at_period_end, cancel_at, canceled_at, ended_at, trial_end, started_at,
                pending_update, status_event_id, status_event_created, status_invoice,
                snapshot_event_created, failed_invoice_id, failed_invoice_created
         FROM unnest($1::text[], $2::text[], $3::text[], $4::plan_status[], $5::text[],
                     $6::text[], $7::int8[], $8::timestamptz[], $9::bool[], $10::timestamptz[],
                     $11::timestamptz[], $12::timestamptz[], $13::timestamptz[],
                     $14::timestamptz[], $15::bool[], $16::text[], $17::timestamptz[],
                     $18::jsonb[], $19::timestamptz[], $20::text[], $21::timestamptz[])
              AS n(id, organization_id, customer_id, status, plan, price_ids, quantity,
                   current_period_end, cancel_at_period_end, cancel_at, canceled_at, ended_at,
                   trial_end, started_at, pending_update, status_event_id,
                   status_event_created, status_invoice, snapshot_event_created,
                   failed_invoice_id, failed_invoice_created)
         ON CONFLICT (id) DO UPDATE SET
             organization_id = excluded.organization_id, customer_id = excluded.customer_id,
             status = excluded.status, plan = excluded.plan, price_ids = excluded.price_ids,
             quantity = excluded.quantity, current_period_end = excluded.current_period_end,
             cancel_at_period_end = excluded.cancel_at_period_end,
             cancel_at = excluded.cancel_at, canceled_at = excluded.canceled_at,
             ended_at = excluded.ended_at, trial_end = excluded.trial_end,
             started_at = excluded.started_at, pending_update = excluded.pending_update,
             status_event_id = excluded.status_event_id,
             status_event_created = excluded.status_event_created,
             status_invoice = excluded.status_invoice,
             snapshot_event_created = excluded.snapshot_event_created,
             failed_invoice_id = excluded.failed_invoice_id,
             failed_invoice_created = excluded.failed_invoice_created,
             updated_at = now()",
    )
    .bind(column(subs, |s| s.id.as_str()))
    .bind(column(subs, |s| s.organization_id.as_str()))
    .bind(column(subs, |s| s.customer_id.as_deref()))
    .bind(column(subs, |s| s.snapshot.status))
    .bind(column(subs, |s| s.snapshot.plan.as_deref()))
    .bind(column(subs, |s| s.snapshot.price_ids.join(",")))
    .bind(column(subs, |s| s.snapshot.quantity))
    .bind(column(subs, |s| s.snapshot.current_period_end))
    .bind(column(subs, |s| s.snapshot.cancel_at_period_end))
    .bind(column(subs, |s| s.snapshot.cancel_at))
    .bind(column(subs, |s| s.snapshot.canceled_at))
    .bind(column(subs, |s| s.snapshot.ended_at))
    .bind(column(subs, |s| s.snapshot.trial_end))
    .bind(column(subs, |s| s.snapshot.started_at))
    .bind(column(subs, |s| s.snapshot.pending_update))
    .bind(column(subs, |s| s.status_event_id.as_deref()))
    .bind(column(subs, |s| s.status_event_created))
    .bind(column(subs, |s| s.status_invoice.clone()))
    .bind(column(subs, |s| s.snapshot_event_created))
    .bind(column(subs, |s| s.failed_invoice_id.as_deref()))
    .bind(column(subs, |s| s.failed_invoice_created))
    .execute(db)
    .await?;
    Ok(())
}
