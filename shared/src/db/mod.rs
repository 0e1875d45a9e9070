//! All SQL of the project: one module per table, one function per query, each taking an
//! executor so callers compose transactions. Queries use sqlx's runtime API with `FromRow`
//! structs and explicit column lists (no build-time database needed).

pub mod billing_audit;
pub mod email_outbox;
pub mod enterprise_requests;
pub mod foreign_customers;
pub mod organizations;
pub mod payments;
pub mod reconciliation_runs;
pub mod subscriptions;
pub mod usage;
pub mod webhook_events;

use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::DatabaseConfig;

/// The embedded migrations of `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// How a pool's connections plan prepared statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planning {
    /// Postgres' default: after a statement's first five runs, a generic plan is kept until
    /// the table is next analyzed. Ingest's statements insert and read by key, which no table
    /// size changes, and planning each run cost its closed loop ~8 % (BENCHMARKS.md).
    Cached,
    /// Each run is planned for its parameters (`plan_cache_mode = force_custom_plan`). The
    /// worker reads and locks by arrays of keys; on a new deployment its first runs meet
    /// nearly empty tables, and the sequential scans a cached plan chose then slowed the whole
    /// first burst: a 40,000-event backlog over 2,000 new organizations drained at
    /// 3,640–4,253 events/s with cached plans and 5,285–5,635 with fresh ones.
    PerRun,
}

/// Opens the pool and checks the database answers now, not at the first request.
pub async fn connect(config: &DatabaseConfig, planning: Planning) -> Result<PgPool, sqlx::Error> {
    let mut options = PgConnectOptions::from_str(config.url.expose_secret())?;
    if planning == Planning::PerRun {
        options = options.options([("plan_cache_mode", "force_custom_plan")]);
    }
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
