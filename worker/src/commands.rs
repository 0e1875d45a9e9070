//! The operators' commands: dead letters, one event, reconciliation and backfill. Each
//! connects to what it needs (only Postgres where it can), runs the library's operation
//! (`worker::ops`, `worker::reconcile`) and prints its result as text or JSON.

use anyhow::Context;
use chrono::{DateTime, Utc};
use shared::config::{Source, WorkerConfig};
use shared::db::webhook_events::DeadLetterFilter;
use worker::apply::ApplyOptions;
use worker::ops::{self, Output};
use worker::reconcile::{self as reconciliation, Reconciler, Trigger};

use crate::cli::{DeadLetters, Events, Reconcile};
use crate::{connect_database, resources, usage_deps};

pub(crate) async fn dead_letters(command: DeadLetters) -> anyhow::Result<()> {
    match command {
        DeadLetters::List {
            event_type,
            since,
            limit,
            json,
        } => {
            let pool = connect_database().await?;
            let rows = ops::list_dead_letters(
                &pool,
                &DeadLetterFilter {
                    event_type,
                    since,
                    limit,
                },
            )
            .await?;
            Output { json }.print(&rows, || ops::dead_letters_text(&rows, limit));
            Ok(())
        }
        DeadLetters::Replay {
            id,
            all: _,
            event_type,
            since,
            dry_run,
            json,
        } => {
            let config = WorkerConfig::load(&Source::env()).context("configuration error")?;
            let resources = resources(&config).await?;
            let targets = match id {
                Some(id) => vec![ops::DeadLetterId::parse(&id)],
                None => {
                    let filter = DeadLetterFilter {
                        event_type,
                        since,
                        limit: i64::MAX,
                    };
                    ops::dead_letter_ids(&resources.events.pool, &filter).await?
                }
            };
            let mut results = Vec::with_capacity(targets.len());
            for target in &targets {
                results.push(match target {
                    ops::DeadLetterId::Event(id) => {
                        ops::replay_dead_letter(&resources.events, id, dry_run).await?
                    }
                    ops::DeadLetterId::Email(id) => {
                        ops::replay_dead_email(&resources.emails, *id, dry_run).await?
                    }
                    ops::DeadLetterId::Usage(id) => {
                        let reconciler = resources.reconciler.as_ref().context(
                            "configuration error: STRIPE_SECRET_KEY is required to replay usage reports",
                        )?;
                        ops::usage::replay(&usage_deps(&config, reconciler), id, dry_run).await?
                    }
                });
            }
            Output { json }.print(&results, || ops::replay_text(&results));
            let failed = results.iter().filter(|r| r.is_failure()).count();
            anyhow::ensure!(
                failed == 0,
                "{failed} of {} dead letters were not applied or sent",
                targets.len()
            );
            Ok(())
        }
    }
}

pub(crate) async fn events(command: Events) -> anyhow::Result<()> {
    match command {
        Events::Replay {
            event_id,
            force,
            dry_run,
            json,
        } => {
            let config = WorkerConfig::load(&Source::env()).context("configuration error")?;
            let deps = resources(&config).await?.events;
            let options = ApplyOptions { force, dry_run };
            let output = Output { json };
            match ops::replay_event(&deps, &event_id, options).await? {
                Some(result) => {
                    output.print(&result, || ops::replay_text(std::slice::from_ref(&result)));
                    anyhow::ensure!(
                        !result.is_failure(),
                        "{event_id} was not applied: {}",
                        result.detail.as_deref().unwrap_or(&result.decision)
                    );
                }
                None => {
                    let details = ops::show_event(&deps.pool, &event_id).await?;
                    output.print(&details, || ops::already_applied_text(&details));
                }
            }
            Ok(())
        }
        Events::Show { event_id, json } => {
            let pool = connect_database().await?;
            let details = ops::show_event(&pool, &event_id).await?;
            Output { json }.print(&details, || ops::event_text(&details));
            Ok(())
        }
    }
}
/// The reconciler of the worker's environment; STRIPE_SECRET_KEY is required.
async fn reconciler() -> anyhow::Result<Reconciler> {
    let config = WorkerConfig::load(&Source::env()).context("configuration error")?;
    anyhow::ensure!(
        config.stripe.secret_key.is_some(),
        "configuration error: STRIPE_SECRET_KEY is required to talk to Stripe's API"
    );
    let resources = resources(&config).await?;
    resources
        .reconciler
        .context("configuration error: STRIPE_SECRET_KEY is required")
}

pub(crate) async fn reconcile(command: Reconcile) -> anyhow::Result<()> {
    match command {
        Reconcile::Now { dry_run, json } => {
            let reconciler = reconciler().await?;
            let report = reconciliation::run(&reconciler, Trigger::Manual, dry_run).await?;
            Output { json }.print(&report, || reconciliation::render::report_text(&report));
            anyhow::ensure!(
                report.status == "succeeded",
                "reconciliation run {} failed: {}",
                report.run_id,
                report.error.as_deref().unwrap_or("see the report")
            );
            Ok(())
        }
        Reconcile::History { limit, json } => {
            let pool = connect_database().await?;
            let runs = shared::db::reconciliation_runs::history(&pool, limit).await?;
            Output { json }.print(&runs, || reconciliation::render::history_text(&runs));
            Ok(())
        }
    }
}

pub(crate) async fn backfill(
    since: DateTime<Utc>,
    types: &[String],
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let reconciler = reconciler().await?;
    let report = reconciliation::backfill::backfill(&reconciler, since, types, dry_run).await?;
    Output { json }.print(&report, || reconciliation::render::backfill_text(&report));
    Ok(())
}
