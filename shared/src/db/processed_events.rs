//! `processed_events`: one row per Stripe event whose decision has been committed. Inserting it
//! in the same transaction as the state change is what makes applying idempotent.

use sqlx::PgExecutor;

/// Claims the event; `false` when it was already processed. A concurrent claim of the same id
/// waits for the other transaction and then returns `false`.
pub async fn insert<'e>(db: impl PgExecutor<'e>, event_id: &str) -> Result<bool, sqlx::Error> {
    let result =
        sqlx::query("INSERT INTO processed_events (id) VALUES ($1) ON CONFLICT (id) DO NOTHING")
            .bind(event_id)
            .execute(db)
            .await?;
    Ok(result.rows_affected() == 1)
}

/// Releases a claim (operators' forced replay).
pub async fn delete<'e>(db: impl PgExecutor<'e>, event_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM processed_events WHERE id = $1")
        .bind(event_id)
        .execute(db)
        .await?;
    Ok(())
}
