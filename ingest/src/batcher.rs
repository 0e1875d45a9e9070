//! Group commit of the inbox (see `shared::group`): concurrent webhook deliveries share one
//! multi-row `INSERT … ON CONFLICT (id) DO NOTHING RETURNING id`, hence one commit (one WAL
//! flush), and their new ids one Redis push. Under a burst this is what lets ingest answer
//! thousands of deliveries a second with every answer still given only after the commit that
//! holds its event. With [`BatcherSettings::writers`] batches in flight, each on its own pool
//! connection, the next batch fills while one commit is in flight.
//!
//! Invariants: a reply is sent only after the statement that stored its event has returned
//! (committed); duplicates inside a batch are inserted once and only the first occurrence
//! counts as new; only new ids are enqueued; an insert Postgres refuses is retried event by
//! event, so one event it cannot store fails alone (handlers check the envelope first, so
//! this is the rare case), while a failed connection fails the whole batch at once; a request
//! whose writer vanished (shutdown, panic) gets [`StoreError::Gone`] instead of hanging.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use shared::db::webhook_events::{self, NewEvent};
use shared::group::{Group, GroupSettings};
use shared::metrics::{ENQUEUE_FAILURES, INGEST_BATCH_EVENTS};
use shared::queue::EventQueue;
use sqlx::PgPool;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;

/// A verified event, owned so it can wait in the batcher's channel.
#[derive(Debug)]
pub struct VerifiedEvent {
    /// `evt_…`
    pub id: String,
    /// Event type.
    pub event_type: String,
    /// Live or test mode.
    pub livemode: bool,
    /// API version of the payload.
    pub api_version: Option<String>,
    /// Stripe's `created`.
    pub stripe_created: DateTime<Utc>,
    /// The exact bytes received.
    pub payload: Bytes,
}

impl VerifiedEvent {
    fn as_new_event(&self) -> NewEvent<'_> {
        NewEvent {
            id: &self.id,
            event_type: &self.event_type,
            livemode: self.livemode,
            api_version: self.api_version.as_deref(),
            stripe_created: self.stripe_created,
            payload: &self.payload,
        }
    }
}

/// Why an event could not be stored. Either way the delivery must be answered 503.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The event's insert failed (alone, or with its whole batch when the connection failed).
    #[error("storing the webhook event failed")]
    Insert(#[source] Arc<sqlx::Error>),
    /// The batcher stopped before answering (shutting down, or its task panicked).
    #[error("the inbox writer is gone")]
    Gone,
}

/// How the batcher runs.
#[derive(Debug, Clone, Copy)]
pub struct BatcherSettings {
    /// Most events in one insert. 5 KB events × 256 ≈ 1.3 MB per statement.
    pub max_batch: usize,
    /// Batches in flight at once, each on its own pool connection: the pool must have more.
    pub writers: usize,
    /// Deliveries waiting for a batch before handlers wait to enqueue (back-pressure).
    pub channel_capacity: usize,
}

impl Default for BatcherSettings {
    /// Measured on 2 cores with Postgres on the same machine (see BENCHMARKS.md): 4 writers
    /// keep the disk's flushes overlapped without making Postgres' processes fight ingest and
    /// the load generator for CPU; batches past ~100 events gain nothing more.
    fn default() -> Self {
        BatcherSettings {
            max_batch: 256,
            writers: 4,
            channel_capacity: 4096,
        }
    }
}

/// The handlers' side of the group commit. Cheap to clone; when the last clone is dropped the
/// batcher writes what is waiting and its task ends.
#[derive(Debug, Clone)]
pub struct Batcher {
    group: Group<VerifiedEvent, Result<bool, StoreError>>,
}

impl Batcher {
    /// Starts the collector task on `pool` and `queue`; join the handle to wait for the last
    /// batch after every [`Batcher`] clone is dropped.
    pub fn start(
        pool: PgPool,
        queue: EventQueue,
        settings: BatcherSettings,
    ) -> (Batcher, JoinHandle<()>) {
        let group_settings = GroupSettings {
            max_batch: settings.max_batch,
            in_flight: settings.writers,
            channel_capacity: settings.channel_capacity,
        };
        let (group, task) = Group::start(group_settings, move |batch, slot| {
            let (pool, queue) = (pool.clone(), queue.clone());
            async move { write(batch, &pool, &queue, slot).await }
        });
        (Batcher { group }, task)
    }

    /// Stores the event with the next group commit: `Ok(true)` when it was new (and has been
    /// enqueued), `Ok(false)` for a duplicate. Returns only after the commit.
    pub async fn store(&self, event: VerifiedEvent) -> Result<bool, StoreError> {
        self.group
            .call(event)
            .await
            .unwrap_or(Err(StoreError::Gone))
    }
}

/// Inserts one batch, enqueues its new ids, and returns each request's answer. The writer
/// permit is released as soon as the inserts return: the Redis push needs no database
/// connection, and the next batch's insert may overlap it.
async fn write(
    batch: Vec<VerifiedEvent>,
    pool: &PgPool,
    queue: &EventQueue,
    permit: OwnedSemaphorePermit,
) -> Vec<Result<bool, StoreError>> {
    ::metrics::histogram!(INGEST_BATCH_EVENTS).record(batch.len() as f64);
    // The first occurrence of each id is inserted; repeats can only be duplicates.
    let mut first_of: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    let mut unique = Vec::with_capacity(batch.len());
    for (n, event) in batch.iter().enumerate() {
        first_of.entry(&event.id).or_insert_with(|| {
            unique.push(event.as_new_event());
            n
        });
    }
    // Sorted, so concurrent batches holding the same ids (a redelivery racing the first
    // delivery) take their row locks in one order instead of deadlocking.
    unique.sort_unstable_by_key(|event| event.id);
    let stored = store(pool, &unique).await;
    drop(permit);
    let outcome_of: HashMap<&str, &Result<bool, StoreError>> =
        unique.iter().map(|e| e.id).zip(&stored).collect();
    let new_ids: Vec<&str> = unique
        .iter()
        .zip(&stored)
        .filter(|(_, stored)| matches!(stored, Ok(true)))
        .map(|(event, _)| event.id)
        .collect();
    if !new_ids.is_empty()
        && let Err(e) = queue.push(&new_ids).await
    {
        ::metrics::counter!(ENQUEUE_FAILURES).increment(new_ids.len() as u64);
        tracing::warn!(events = new_ids.len(), error = %e, "events stored but not enqueued; the sweeper will enqueue them");
    }
    batch
        .iter()
        .enumerate()
        .map(|(n, event)| {
            let Some(&outcome) = outcome_of.get(event.id.as_str()) else {
                return Err(StoreError::Gone);
            };
            if first_of.get(event.id.as_str()) == Some(&n) {
                outcome.clone()
            } else {
                // A repeat inside the batch: a duplicate of a stored event, or not stored.
                outcome.clone().map(|_| false)
            }
        })
        .collect()
}

/// Stores `events` with one insert: for each, `Ok(true)` when new, `Ok(false)` when already
/// stored. If Postgres refuses the insert (an event it cannot store that the envelope checks
/// did not foresee), each event is inserted again on its own, so only the event that cannot
/// be stored fails; if the connection failed, they all fail at once (one by one would only
/// wait for Postgres that many more times).
async fn store(pool: &PgPool, events: &[NewEvent<'_>]) -> Vec<Result<bool, StoreError>> {
    let error = match webhook_events::insert_many(pool, events).await {
        Ok(new_ids) => {
            let new: HashSet<&str> = new_ids.iter().map(String::as_str).collect();
            return events.iter().map(|e| Ok(new.contains(e.id))).collect();
        }
        Err(error) => error,
    };
    if events.len() == 1 || !refused_by_postgres(&error) {
        return vec![Err(StoreError::Insert(Arc::new(error))); events.len()];
    }
    tracing::warn!(events = events.len(), error = %error, "a group commit failed; storing its events one by one");
    let mut stored = Vec::with_capacity(events.len());
    let mut connection_failed = None;
    for event in events {
        let outcome = match &connection_failed {
            Some(error) => Err(StoreError::Insert(Arc::clone(error))),
            None => webhook_events::insert(pool, event).await.map_err(|error| {
                let error = Arc::new(error);
                if !refused_by_postgres(&error) {
                    connection_failed = Some(Arc::clone(&error));
                }
                StoreError::Insert(error)
            }),
        };
        stored.push(outcome);
    }
    stored
}

/// Did Postgres refuse the statement (its data, a constraint, a missing table), as opposed to
/// the connection or the pool failing? Only then can storing events on their own help.
fn refused_by_postgres(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(_))
}
