//! The scheduled backfill and reconciliation inside `worker run`. Every replica wakes at each
//! tick of `RECONCILE_SCHEDULE`; the one whose insert of the tick's `reconciliation_runs` row
//! succeeds runs it (the tick is unique), the others go back to sleep: exactly one run per
//! tick however many workers there are. At start, a replica that finds the previous tick with
//! no run (no worker was up then) runs it at once.

use std::future::Future;

use chrono::Utc;
use shared::config::ReconcileConfig;
use shared::db::reconciliation_runs;

use super::{Reconciler, Trigger, backfill, publish_last_success};

/// Runs the schedule until `stop` resolves; a run in progress then is recorded as failed.
pub async fn run(
    reconciler: Option<Reconciler>,
    config: ReconcileConfig,
    stop: impl Future<Output = ()>,
) {
    let Some(reconciler) = reconciler else {
        tracing::info!("reconciliation schedule off: STRIPE_SECRET_KEY is not set");
        return;
    };
    let Some(schedule) = config.schedule.clone() else {
        tracing::info!("reconciliation schedule off: RECONCILE_SCHEDULE=off");
        return;
    };
    publish_last_success(&reconciler.pool).await;
    tokio::pin!(stop);
    let missed = schedule.after(&Utc::now()).next_back();
    if let Some(tick) = missed {
        match reconciliation_runs::tick_claimed(&reconciler.pool, tick).await {
            Ok(false) => {
                tracing::info!(%tick, "running the reconciliation of a tick no worker ran");
                tokio::select! {
                    () = &mut stop => return,
                    () = fire(&reconciler, &config, tick) => {}
                }
            }
            Ok(true) => {}
            Err(e) => tracing::warn!(error = %e, "could not check the previous reconciliation"),
        }
    }
    loop {
        let Some(tick) = schedule.after(&Utc::now()).next() else {
            return;
        };
        let wait = (tick - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(wait) => {}
        }
        tokio::select! {
            () = &mut stop => return,
            () = fire(&reconciler, &config, tick) => {}
        }
    }
}

/// Claims the tick's run; if this replica got it, backfills the window, then reconciles.
async fn fire(reconciler: &Reconciler, config: &ReconcileConfig, tick: chrono::DateTime<Utc>) {
    let run_id = match reconciliation_runs::claim_scheduled(&reconciler.pool, tick).await {
        Ok(Some(run_id)) => run_id,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, %tick, "could not claim the scheduled reconciliation");
            return;
        }
    };
    let mut guard = Interrupted {
        pool: reconciler.pool.clone(),
        run_id: Some(run_id),
    };
    let since =
        Utc::now() - chrono::TimeDelta::from_std(config.backfill_window).unwrap_or_default();
    let (events_backfilled, backfill_error) =
        match backfill::backfill(reconciler, since, &[], false).await {
            Ok(report) => (report.inserted, None),
            Err(e) => (0, Some(format!("backfill failed: {e:#}"))),
        };
    let trigger = Trigger::Scheduled {
        run_id,
        events_backfilled,
        backfill_error,
    };
    match super::run(reconciler, trigger, false).await {
        Ok(report) => tracing::info!(
            run_id,
            status = report.status,
            drifted = report.counts.drifted,
            healed = report.counts.healed,
            orphans = report.counts.orphans,
            events_backfilled,
            "scheduled reconciliation finished"
        ),
        Err(e) => tracing::error!(
            run_id,
            error = format!("{e:#}"),
            "scheduled reconciliation failed"
        ),
    }
    guard.run_id = None;
}

/// Records a run dropped mid-way (the worker is stopping) as failed.
struct Interrupted {
    pool: sqlx::PgPool,
    run_id: Option<i64>,
}

impl Drop for Interrupted {
    fn drop(&mut self) {
        let Some(run_id) = self.run_id else {
            return;
        };
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let error = "interrupted: the worker stopped during the run";
            let _ = reconciliation_runs::finish(
                &pool,
                run_id,
                "failed",
                Some(error),
                &serde_json::Value::Null,
            )
            .await;
        });
    }
}
