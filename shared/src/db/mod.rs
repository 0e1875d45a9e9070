//! All SQL of the project: one module per table, one function per query, each taking an
//! executor so callers compose transactions. Queries use sqlx's runtime API with `FromRow`
//! structs and explicit column lists (no build-time database needed).

pub mod billing_audit;
pub mod email_outbox;
pub mod enterprise_requests;
pub mod organizations;
pub mod processed_events;
pub mod webhook_events;

use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::DatabaseConfig;

/// The embedded migrations of `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Opens the pool and checks the database answers now, not at the first request.
///
/// Every statement is planned for its parameters at each run (`plan_cache_mode =
/// force_custom_plan`). By default Postgres settles on a generic plan after a prepared
/// statement's first five runs and keeps it until the table is next analyzed. On a new
/// deployment those first runs meet nearly empty tables, and the sequential scans planned for
/// them stayed for the whole burst that filled the tables: the worker drained a 40,000-event
/// backlog over 2,000 new organizations at 3,640–4,253 events/s with the cached plans and at
/// 5,285–5,635 with fresh ones, which also used less Postgres CPU per event (BENCHMARKS.md).
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(config.url.expose_secret())?
        .options([("plan_cache_mode", "force_custom_plan")]);
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
}

/// Applies pending migrations (`worker migrate`).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// `SELECT 1`, for readiness checks.
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}
