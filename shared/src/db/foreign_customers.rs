//! `foreign_customers`: Stripe customers that Stripe says belong to no organization. An event
//! of such a customer is `ignored` instead of deferred. Written and read under the customers'
//! link locks (`organizations::lock_customer_links`), like every link.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

/// A customer known to belong to no organization.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ForeignCustomer {
    /// `cus_…`
    pub customer_id: String,
    /// What Stripe said, in words.
    pub reason: String,
    /// When Stripe was asked.
    pub checked_at: DateTime<Utc>,
}

/// Records (or refreshes) that the customer belongs to no organization.
pub async fn mark<'e>(
    db: impl PgExecutor<'e>,
    customer_id: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO foreign_customers (customer_id, reason) VALUES ($1, $2)
         ON CONFLICT (customer_id) DO UPDATE SET reason = $2, checked_at = now()",
    )
    .bind(customer_id)
    .bind(reason)
    .execute(db)
    .await?;
    Ok(())
}

/// Forgets these customers: they were just linked to an organization.
pub async fn clear<'e>(db: impl PgExecutor<'e>, customer_ids: &[&str]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM foreign_customers WHERE customer_id = ANY($1)")
        .bind(customer_ids)
        .execute(db)
        .await?;
    Ok(())
}

/// Those of these customers known to belong to no organization.
pub async fn find<'e>(
    db: impl PgExecutor<'e>,
    customer_ids: &[&str],
) -> Result<Vec<ForeignCustomer>, sqlx::Error> {
    sqlx::query_as(
        "SELECT customer_id, reason, checked_at FROM foreign_customers
         WHERE customer_id = ANY($1)",
    )
    .bind(customer_ids)
    .fetch_all(db)
    .await
}
