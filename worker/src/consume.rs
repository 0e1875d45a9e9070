//! The consuming side of the event queue, and the only worker module that touches apalis.
//!
//! Group apply (see `shared::group`): the jobs in flight hand their event ids to one applier,
//! which applies whatever is waiting, up to [`ApplySettings::batch_size`] events, in one
//! transaction (`apply::apply_events`), with up to [`ApplySettings::transactions`] of them in
//! flight. Every job still gets its own report and finishes only after the commit that holds its
//! decision. If a batch fails, its events are applied again one by one, so one bad event never
//! holds back the others and each failure is recorded against its own event.
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
use futures::future::BoxFuture;
use shared::group::{Group, GroupSettings};
use shared::metrics::{
    APPLY_BATCH_EVENTS, APPLY_DURATION, DEAD_LETTERS, EVENT_FAILURES, EVENT_LAG, EVENTS_DECIDED,
};
use shared::queue::ApplyEventV1;
use tokio::sync::OwnedSemaphorePermit;

use crate::apply::{
    ApplyError, ApplyOptions, Deps, FailureOutcome, Report, apply_event, apply_events_releasing,
    record_failure,
};

/// How a consumer runs (the event and the email consumer alike).
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Jobs in flight in this process.
    pub concurrency: usize,
    /// How often an idle worker looks for jobs.
    pub poll_interval: Duration,
}

/// How events are grouped into transactions.
#[derive(Debug, Clone, Copy)]
pub struct ApplySettings {
    /// Most events applied in one transaction.
    pub batch_size: usize,
    /// Apply transactions in flight at once, each on its own pool connection.
    pub transactions: usize,
}

/// Applies events in groups; cheap to clone.
#[derive(Clone)]
struct Applier {
    group: Group<String, Result<Report, ApplyError>>,
}

impl Applier {
    fn start(deps: Arc<Deps>, settings: ApplySettings) -> Applier {
        let group_settings = GroupSettings {
            max_batch: settings.batch_size,
            in_flight: settings.transactions,
            channel_capacity: 4096,
        };
        let (group, _task) = Group::start(group_settings, move |ids, slot| {
            let deps = Arc::clone(&deps);
            async move { apply_batch(&deps, ids, slot).await }
        });
        Applier { group }
    }

    async fn apply(&self, event_id: String) -> Result<Report, ApplyError> {
        self.group
            .call(event_id)
            .await
            .unwrap_or(Err(ApplyError::Stopped))
    }
}

/// One transaction for the batch; if it fails, one per event. The slot is freed once the
/// batch's first transaction has committed, before it waits for any Stripe call; when that
/// transaction fails, the slot is held until the events have been applied one by one.
async fn apply_batch(
    deps: &Deps,
    ids: Vec<String>,
    slot: OwnedSemaphorePermit,
) -> Vec<Result<Report, ApplyError>> {
    metrics::histogram!(APPLY_BATCH_EVENTS).record(ids.len() as f64);
    let started = Instant::now();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut slot = Some(slot);
    let result = apply_events_releasing(deps, &refs, ApplyOptions::default(), || {
        slot.take();
    })
    .await;
    metrics::histogram!(APPLY_DURATION).record(started.elapsed().as_secs_f64());
    match result {
        Ok(results) => results,
        Err(e) if ids.len() == 1 => vec![Err(e)],
        Err(e) => {
            tracing::info!(events = ids.len(), error = %e, "a batch failed; applying its events one by one");
            let mut results = Vec::with_capacity(ids.len());
            for id in &ids {
                results.push(apply_event(deps, id, ApplyOptions::default()).await);
            }
            results
        }
    }
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

/// Consumes the event queue until `shutdown` resolves; in-flight jobs finish first (within
/// [`SHUTDOWN_DEADLINE`]).
/// Returns an error if the worker stops by itself (e.g. Redis failed), so the process exits
/// non-zero and its supervisor restarts it.
pub async fn run(
    deps: Deps,
    settings: &ConsumerSettings,
    apply: ApplySettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let name = worker_name("worker");
    tracing::info!(worker = %name, concurrency = settings.concurrency, batch_size = apply.batch_size, transactions = apply.transactions, "consuming events");
    let storage = deps
        .queue
        .consumer_storage(settings.concurrency)
        .poll_with_interval(settings.poll_interval);
    let deps = Arc::new(deps);
    let context = Context {
        applier: Applier::start(Arc::clone(&deps), apply),
        deps,
    };
    let worker = WorkerBuilder::new(name.clone())
        .backend(storage)
        .data(context)
        .concurrency(settings.concurrency)
        .parallelize(tokio::spawn)
        .build(handle);
    run_until_stopped(&name, |signal| worker.run_until(signal), shutdown).await
}

/// How long a consumer's jobs in flight may take to finish once it is told to stop; then it
/// exits anyway (non-zero), and the jobs left run again elsewhere: the sweeper re-enqueues
/// their pending rows, and apalis hands a dead worker's in-flight set to another. Below the
/// deployments' 60 s grace period, so the process ends on its own terms.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(45);

/// Runs an apalis worker (`run` given the stop signal it should obey) on its own task until
/// `shutdown` resolves and its jobs in flight have finished, or [`SHUTDOWN_DEADLINE`] after
/// `shutdown`.
///
/// Its own task, because apalis-core 1.0 fetches whenever an idle worker is polled, whoever
/// woke the task: with both consumers joined in one task, each one's Redis replies woke the
/// other into fetching again, and an idle worker process ran ~2,400 fetch scripts a second
/// per queue (0.17 cores, and 0.09 more in Redis) instead of one per poll interval.
pub async fn run_until_stopped<R>(
    name: &str,
    run: impl FnOnce(BoxFuture<'static, Result<(), WorkerError>>) -> R,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    R: Future<Output = Result<(), WorkerError>> + Send + 'static,
{
    let (stopped, on_stop) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = stopped.send(());
        Ok::<(), WorkerError>(())
    };
    let deadline = async move {
        if on_stop.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_DEADLINE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let mut worker = tokio::spawn(run(Box::pin(signal)));
    tokio::select! {
        result = &mut worker => match result {
            Ok(result) => Ok(result?),
            Err(e) => Err(anyhow::anyhow!("{name}: the worker's task failed: {e}")),
        },
        () = deadline => {
            worker.abort();
            Err(anyhow::anyhow!(
                "{name}: jobs still in flight {SHUTDOWN_DEADLINE:?} after the stop signal; \
                 leaving them to run again (sweeper, apalis' orphan handling)"
            ))
        }
    }
}

/// What each job needs.
#[derive(Clone)]
struct Context {
    deps: Arc<Deps>,
    applier: Applier,
}

async fn handle(job: ApplyEventV1, context: Data<Context>) -> Result<(), BoxDynError> {
    match context.applier.apply(job.event_id.clone()).await {
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
        Err(e) => fail(&context.deps, &job.event_id, e).await,
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
