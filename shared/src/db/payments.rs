//! `payments`: the ledger of one-time purchases, each payment's state and ordering markers
//! ([`crate::billing::payment`]). Writers take [`lock_keys`] on the payment ids their events
//! name (after the customer-link locks, before any row lock), then lock the organization rows
//! (including those [`owners`] names), the subscription rows, and last the payment rows
//! ([`lock`]), in id order: the apply transaction's lock order. The key locks serialize
//! the transactions that touch one payment even while no organization is known for it (a
//! refund before its checkout), so two of them never both create its row.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::billing::payment::PaymentState;

/// The column list of [`PaymentState`], as a literal so queries stay `&'static str`.
macro_rules! columns {
    () => {
        "id, organization_id, checkout_session_id, payment_intent_id, customer_id, amount,
         currency, status, outcome, outcome_event_id, outcome_event_created, failure_reason,
         amount_refunded, fully_refunded, refund_event_id, refund_event_created, dispute_id,
         dispute_status, dispute_event_id, dispute_event_created"
    };
}

/// A stored payment, for readers.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredPayment {
    /// Its state.
    #[sqlx(flatten)]
    pub state: PaymentState,
    /// Row creation.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Serializes, until the transaction ends, every transaction that changes the payments with
/// these ids (payment intent or checkout session ids). Ids distinct and sorted.
pub async fn lock_keys<'e>(db: impl PgExecutor<'e>, keys: &[&str]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('stripe-payment:' || key, 0))
         FROM unnest($1::text[]) AS key",
    )
    .bind(keys)
    .execute(db)
    .await?;
    Ok(())
}

/// The organizations of the stored payments these ids name (unlocked: to lock those
/// organizations before the payment rows).
pub async fn owners<'e>(
    db: impl PgExecutor<'e>,
    keys: &[&str],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT organization_id FROM payments
         WHERE organization_id IS NOT NULL
           AND (id = ANY($1) OR payment_intent_id = ANY($1) OR checkout_session_id = ANY($1))",
    )
    .bind(keys)
    .fetch_all(db)
    .await
}

/// Locks and returns the payments of these organizations and those these ids name, in id
/// order.
pub async fn lock<'e>(
    db: impl PgExecutor<'e>,
    organization_ids: &[&str],
    keys: &[&str],
) -> Result<Vec<PaymentState>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM payments
         WHERE organization_id = ANY($1)
            OR id = ANY($2) OR payment_intent_id = ANY($2) OR checkout_session_id = ANY($2)
         ORDER BY id FOR UPDATE"
    ))
    .bind(organization_ids)
    .bind(keys)
    .fetch_all(db)
    .await
}

/// An organization's payments, newest first (reads).
pub async fn of_organization<'e>(
    db: impl PgExecutor<'e>,
    organization_id: &str,
) -> Result<Vec<StoredPayment>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        ", created_at, updated_at FROM payments WHERE organization_id = $1
         ORDER BY coalesce(outcome_event_created, created_at) DESC, id"
    ))
    .bind(organization_id)
    .fetch_all(db)
    .await
}

/// One of an organization's payments, by checkout session id or payment intent id (reads).
pub async fn find<'e>(
    db: impl PgExecutor<'e>,
    organization_id: &str,
    id: &str,
) -> Result<Option<StoredPayment>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        ", created_at, updated_at FROM payments WHERE organization_id = $1
           AND (checkout_session_id = $2 OR payment_intent_id = $2 OR id = $2)
         LIMIT 1"
    ))
    .bind(organization_id)
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Inserts or replaces these payments, all in one statement, and stamps `updated_at`.
pub async fn save<'e>(
    db: impl PgExecutor<'e>,
    payments: &[&PaymentState],
) -> Result<(), sqlx::Error> {
    fn column<'a, T: 'a>(rows: &[&'a PaymentState], f: impl Fn(&'a PaymentState) -> T) -> Vec<T> {
        rows.iter().map(|p| f(p)).collect()
    }
    let rows = payments;
    sqlx::query(
        "INSERT INTO payments (id, organization_id, checkout_session_id, payment_intent_id,
             customer_id, amount, currency, status, outcome, outcome_event_id,
             outcome_event_created, failure_reason, amount_refunded, fully_refunded,
             refund_event_id, refund_event_created, dispute_id, dispute_status,
             dispute_event_id, dispute_event_created)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::int8[], $7::text[], $8::payment_status[], $9::payment_outcome[],
                     $10::text[], $11::timestamptz[], $12::text[], $13::int8[], $14::bool[],
                     $15::text[], $16::timestamptz[], $17::text[], $18::dispute_status[],
                     $19::text[], $20::timestamptz[])
         ON CONFLICT (id) DO UPDATE SET
             organization_id = excluded.organization_id,
             checkout_session_id = excluded.checkout_session_id,
             payment_intent_id = excluded.payment_intent_id,
             customer_id = excluded.customer_id, amount = excluded.amount,
             currency = excluded.currency, status = excluded.status,
             outcome = excluded.outcome, outcome_event_id = excluded.outcome_event_id,
             outcome_event_created = excluded.outcome_event_created,
             failure_reason = excluded.failure_reason,
             amount_refunded = excluded.amount_refunded,
             fully_refunded = excluded.fully_refunded,
             refund_event_id = excluded.refund_event_id,
             refund_event_created = excluded.refund_event_created,
             dispute_id = excluded.dispute_id, dispute_status = excluded.dispute_status,
             dispute_event_id = excluded.dispute_event_id,
             dispute_event_created = excluded.dispute_event_created,
             updated_at = now()",
    )
    .bind(column(rows, |p| p.id.as_str()))
    .bind(column(rows, |p| p.organization_id.as_deref()))
    .bind(column(rows, |p| p.checkout_session_id.as_deref()))
    .bind(column(rows, |p| p.payment_intent_id.as_deref()))
    .bind(column(rows, |p| p.customer_id.as_deref()))
    .bind(column(rows, |p| p.amount))
    .bind(column(rows, |p| p.currency.as_deref()))
    .bind(column(rows, |p| p.status))
    .bind(column(rows, |p| p.outcome))
    .bind(column(rows, |p| p.outcome_event_id.as_deref()))
    .bind(column(rows, |p| p.outcome_event_created))
    .bind(column(rows, |p| p.failure_reason.as_deref()))
    .bind(column(rows, |p| p.amount_refunded))
    .bind(column(rows, |p| p.fully_refunded))
    .bind(column(rows, |p| p.refund_event_id.as_deref()))
    .bind(column(rows, |p| p.refund_event_created))
    .bind(column(rows, |p| p.dispute_id.as_deref()))
    .bind(column(rows, |p| p.dispute_status))
    .bind(column(rows, |p| p.dispute_event_id.as_deref()))
    .bind(column(rows, |p| p.dispute_event_created))
    .execute(db)
    .await?;
    Ok(())
}
