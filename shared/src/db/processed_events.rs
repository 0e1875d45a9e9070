//! `processed_events`: one row per Stripe event whose decision has been committed. Inserting it
//! in the same transaction as the state change is what makes applying idempotent; the insert
//! is part of `webhook_events::get_and_claim`, the apply transaction's first statement.

use sqlx::PgExecutor;

/// Releases a claim (an event deferred or given up on is not processed).
pub async fn delete<'e>(db: impl PgExecutor<'e>, event_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM processed_events WHERE id = $1")
        .bind(event_id)
        .execute(db)
        .await?;
    Ok(())
}
