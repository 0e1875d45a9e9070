//! The consuming side of the event queue, and the only worker module that touches apalis.
//!
//! Retry policy (ours, not apalis'; see `shared::retry`): a failed attempt is recorded in the
//! inbox row with its next attempt time, and the job finishes; the sweeper enqueues the row
//! again when it is due. At `MAX_ATTEMPTS`, or at once for a permanent failure, the row becomes
//! a dead letter. Only when Postgres cannot record the failure does the job return an error,
//! leaving apalis-redis to run it again (its linear delay); the row stays pending, so the
//! sweeper would find it even if Redis dropped the job.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis::prelude::*;
use shared::metrics::{APPLY_DURATION, DEAD_LETTERS, EVENT_FAILURES, EVENT_LAG, EVENTS_DECIDED};
use shared::queue::ApplyEventV1;
use tracing::Instrument;

use crate::apply::{ApplyError, ApplyOptions, Deps, FailureOutcome, apply_event, record_failure};

/// How a consumer runs (the event and the email consumer alike).
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Jobs in flight in this process.
    pub concurrency: usize,
    /// How often an idle worker looks for jobs.
    pub poll_interval: Duration,
}

/// A name unique to this process incarnation: apalis refuses to register a name that was
/// active within its heartbeat threshold, so a restarted process must not reuse its old one.
pub fn worker_name(kind: &str) -> String {
    format!(
        "{kind}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Consumes the event queue until `shutdown` resolves; in-flight jobs finish first.
/// Returns an error if the worker stops by itself (e.g. Redis failed), so the process exits
/// non-zero and its supervisor restarts it.
pub async fn run(
    deps: Deps,
    settings: &ConsumerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let name = worker_name("worker");
    tracing::info!(worker = %name, concurrency = settings.concurrency, "consuming events");
    let storage = deps
        .queue
        .storage()
        .poll_with_interval(settings.poll_interval);
    let context = Arc::new(deps);
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

async fn handle(job: ApplyEventV1, deps: Data<Arc<Deps>>) -> Result<(), BoxDynError> {
    let span = tracing::info_span!("apply_event", event.id = %job.event_id);
    let started = Instant::now();
    let result = apply_event(&deps, &job.event_id, ApplyOptions::default())
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
        Err(e) => fail(&deps, &job.event_id, e).await,
    }
}

/// Records a failure in Postgres; the sweeper takes it from there.
async fn fail(deps: &Deps, event_id: &str, error: ApplyError) -> Result<(), BoxDynError> {
    let kind = if error.is_transient() {
        "transient"
    } else {
        "permanent"
    };
    metrics::counter!(EVENT_FAILURES, "kind" => kind).increment(1);
    match record_failure(deps, event_id, &error).await {
        Ok(FailureOutcome::RetryAt(at)) => {
            tracing::warn!(event.id = %event_id, error = %error, retry_at = %at, "apply failed; will retry");
            Ok(())
        }
        Ok(FailureOutcome::Dead) => {
            metrics::counter!(DEAD_LETTERS).increment(1);
            tracing::error!(event.id = %event_id, error = %error, "event is a dead letter");
            Ok(())
        }
        Err(e) => {
            tracing::error!(event.id = %event_id, error = %error, record_error = %e, "apply failed and the failure could not be recorded; apalis will retry");
            Err(error.into())
        }
    }
}
