//! The consuming side of the event queue, and the only worker module that touches apalis.
//!
//! Retry policy (ours, not apalis'): a transient failure (database, network) counts an attempt
//! in the inbox row and returns an error, so apalis-redis schedules the job again (its
//! linear delay: attempt n waits n seconds); at `max_attempts`, or at once for a permanent
//! failure, the inbox row becomes `dead` with its reason and the job is aborted. The dead letter
//! lives in Postgres, where operators list and replay it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis::prelude::*;
use shared::db::webhook_events;
use shared::metrics::{APPLY_DURATION, EVENT_FAILURES, EVENT_LAG, EVENTS_DECIDED};
use shared::queue::ApplyEventV1;
use tracing::Instrument;

use crate::apply::{Deps, apply_event};

/// How the consumer runs.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Jobs in flight in this process.
    pub concurrency: usize,
    /// How often an idle worker looks for jobs.
    pub poll_interval: Duration,
    /// Attempts before an event with transient failures becomes a dead letter.
    pub max_attempts: i32,
}

struct JobContext {
    deps: Deps,
    max_attempts: i32,
}

/// Consumes the event queue until `shutdown` resolves; in-flight jobs finish first.
/// Returns an error if the worker stops by itself (e.g. Redis failed), so the process exits
/// non-zero and its supervisor restarts it.
pub async fn run(
    deps: Deps,
    settings: &ConsumerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let name = format!(
        "worker-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    tracing::info!(worker = %name, concurrency = settings.concurrency, "consuming events");
    let storage = deps
        .queue
        .storage()
        .poll_with_interval(settings.poll_interval);
    let context = Arc::new(JobContext {
        deps,
        max_attempts: settings.max_attempts,
    });
    let worker = WorkerBuilder::new(name)
        .backend(storage)
        .data(context)
        .concurrency(settings.concurrency)
        .parallelize(tokio::spawn)
        .build(handle);
    worker
        .run_until(async move {
            shutdown.await;
            Ok::<(), WorkerError>(())
        })
        .await?;
    Ok(())
}

async fn handle(job: ApplyEventV1, context: Data<Arc<JobContext>>) -> Result<(), BoxDynError> {
    let span = tracing::info_span!("apply_event", event.id = %job.event_id);
    let started = Instant::now();
    let result = apply_event(&context.deps, &job.event_id)
        .instrument(span)
        .await;
    metrics::histogram!(APPLY_DURATION).record(started.elapsed().as_secs_f64());
    match result {
        Ok(report) => {
            metrics::counter!(EVENTS_DECIDED, "decision" => report.decision.as_str()).increment(1);
            let lag = (chrono::Utc::now() - report.received_at).num_milliseconds() as f64 / 1000.0;
            metrics::histogram!(EVENT_LAG).record(lag);
            tracing::info!(
                event.id = %job.event_id,
                organization.id = report.organization_id.as_deref().unwrap_or(""),
                decision = report.decision.as_str(),
                detail = report.detail.as_deref().unwrap_or(""),
                "event decided"
            );
            Ok(())
        }
        Err(e) => fail(&context, &job.event_id, e).await,
    }
}

/// Records a failure in Postgres and tells apalis whether to retry.
async fn fail(
    context: &JobContext,
    event_id: &str,
    error: crate::apply::ApplyError,
) -> Result<(), BoxDynError> {
    let pool = &context.deps.pool;
    let message = error.to_string();
    if error.is_transient() {
        metrics::counter!(EVENT_FAILURES, "kind" => "transient").increment(1);
        // If Postgres itself is down this fails too; the job is retried all the same.
        let attempts = webhook_events::record_failure(pool, event_id, &message)
            .await
            .unwrap_or(0);
        if attempts < context.max_attempts {
            tracing::warn!(event.id = %event_id, attempts, error = %message, "apply failed; will retry");
            return Err(error.into());
        }
    } else {
        metrics::counter!(EVENT_FAILURES, "kind" => "permanent").increment(1);
    }
    tracing::error!(event.id = %event_id, error = %message, "event is a dead letter");
    if let Err(e) = webhook_events::mark_dead(pool, event_id, &message).await {
        tracing::error!(event.id = %event_id, error = %e, "could not record the dead letter; retrying");
        return Err(error.into());
    }
    Err(AbortError::new(error).into())
}
