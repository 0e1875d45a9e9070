//! `enterprise_requests`: every Enterprise plan request of the product's backend, as
//! validated by `shared::enterprise`. Rows are never updated. `idempotency_key` is unique: a
//! repeated call with the same key finds the stored row ([`find_by_idempotency_key`]) instead of
//! inserting a second one.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

/// A request to store.
#[derive(Debug, Clone)]
pub struct NewEnterpriseRequest<'a> {
    /// Our id for it (`request_id` in the answer).
    pub id: Uuid,
    /// The organization's id in the product.
    pub organization_id: &'a str,
    /// Its display name.
    pub organization_name: &'a str,
    /// The administrator who asked.
    pub admin_email: &'a str,
    /// Members of the organization.
    pub member_count: i32,
    /// The caller's `Idempotency-Key`, if any.
    pub idempotency_key: Option<&'a str>,
}

/// A stored request.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct EnterpriseRequest {
    /// Our id.
    pub id: Uuid,
    /// The organization's id in the product.
    pub organization_id: String,
    /// Its display name.
    pub organization_name: String,
    /// The administrator who asked.
    pub admin_email: String,
    /// Members of the organization.
    pub member_count: i32,
    /// The caller's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}

/// Stores the request; `false` when a request with the same idempotency key exists (nothing
/// changes). A concurrent insert of the same key waits for the other transaction and then
/// reports `false` (or inserts, if that one rolled back).
pub async fn insert<'e>(
    db: impl PgExecutor<'e>,
    request: &NewEnterpriseRequest<'_>,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "INSERT INTO enterprise_requests
             (id, organization_id, organization_name, admin_email, member_count, idempotency_key)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(request.id)
    .bind(request.organization_id)
    .bind(request.organization_name)
    .bind(request.admin_email)
    .bind(request.member_count)
    .bind(request.idempotency_key)
    .execute(db)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// One stored request.
pub async fn get<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
) -> Result<Option<EnterpriseRequest>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, organization_id, organization_name, admin_email, member_count,
                idempotency_key, created_at
         FROM enterprise_requests WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await
}

/// The request stored under an idempotency key.
pub async fn find_by_idempotency_key<'e>(
    db: impl PgExecutor<'e>,
    key: &str,
) -> Result<Option<EnterpriseRequest>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, organization_id, organization_name, admin_email, member_count,
                idempotency_key, created_at
         FROM enterprise_requests WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_optional(db)
    .await
}
