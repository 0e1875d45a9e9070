//! Group commit of the inbox: concurrent webhook deliveries share one multi-row
//! `INSERT … ON CONFLICT (id) DO NOTHING RETURNING id`, hence one commit (one WAL flush), and
//! their new ids one Redis push. A commit costs the same for one row or a hundred, so under a
//! burst this is what lets ingest answer thousands of deliveries a second with every answer still
//! given only after the commit that holds its event.
//!
//! Shape: handlers send `(event, reply)` into a bounded channel; one collector task takes a
//! writer permit, then drains whatever is waiting (up to [`BatcherSettings::max_batch`]) and
//! hands that batch to a writer task. With [`BatcherSettings::writers`] permits, batches
//! pipeline on that many pool connections: while one commit is in flight the next batch fills.
//! No timer: an idle ingest writes a lone event at once, a busy one writes bigger batches.
//!
//! Invariants: a reply is sent only after the batch's statement has returned (committed);
//! duplicates inside a batch are inserted once and only the first occurrence counts as new;
//! only new ids are enqueued; a failed insert fails every request of its batch; a request whose
//! writer vanished (shutdown, panic) gets [`StoreError::Gone`] instead of hanging.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use shared::db::webhook_events::{self, NewEvent};
use shared::metrics::{ENQUEUE_FAILURES, INGEST_BATCH_EVENTS};
use shared::queue::EventQueue;
use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

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
    /// The batch's insert failed; every request of the batch gets this.
    #[error("storing a batch of webhook events failed")]
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

struct Request {
    event: VerifiedEvent,
    reply: oneshot::Sender<Result<bool, StoreError>>,
}

/// The handlers' side of the group commit. Cheap to clone; when the last clone is dropped the
/// batcher writes what is waiting and its task ends.
#[derive(Debug, Clone)]
pub struct Batcher {
    requests: mpsc::Sender<Request>,
}

impl Batcher {
    /// Starts the collector task on `pool` and `queue`; join the handle to wait for the last
    /// batch after every [`Batcher`] clone is dropped.
    pub fn start(
        pool: PgPool,
        queue: EventQueue,
        settings: BatcherSettings,
    ) -> (Batcher, JoinHandle<()>) {
        let (requests, receiver) = mpsc::channel(settings.channel_capacity.max(1));
        let task = tokio::spawn(collect(receiver, pool, queue, settings));
        (Batcher { requests }, task)
    }

    /// Stores the event with the next group commit: `Ok(true)` when it was new (and has been
    /// enqueued), `Ok(false)` for a duplicate. Returns only after the commit.
    pub async fn store(&self, event: VerifiedEvent) -> Result<bool, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { event, reply })
            .await
            .map_err(|_| StoreError::Gone)?;
        answer.await.unwrap_or(Err(StoreError::Gone))
    }
}

async fn collect(
    mut receiver: mpsc::Receiver<Request>,
    pool: PgPool,
    queue: EventQueue,
    settings: BatcherSettings,
) {
    let max_batch = settings.max_batch.max(1);
    let writers = Arc::new(Semaphore::new(settings.writers.max(1)));
    let mut in_flight = JoinSet::new();
    loop {
        // Take the permit first: while every writer is busy, deliveries pile up in the channel
        // and the next batch gets them all.
        let Ok(permit) = Arc::clone(&writers).acquire_owned().await else {
            break;
        };
        let mut batch = Vec::with_capacity(max_batch);
        if receiver.recv_many(&mut batch, max_batch).await == 0 {
            break;
        }
        let (pool, queue) = (pool.clone(), queue.clone());
        in_flight.spawn(async move { write(batch, &pool, &queue, permit).await });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
}

/// Inserts one batch, enqueues its new ids, then answers each request. The writer permit is
/// released as soon as the insert returns: the Redis push needs no database connection, and
/// the next batch's insert may overlap it.
async fn write(
    batch: Vec<Request>,
    pool: &PgPool,
    queue: &EventQueue,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    ::metrics::histogram!(INGEST_BATCH_EVENTS).record(batch.len() as f64);
    // The first occurrence of each id is inserted; repeats can only be duplicates.
    let mut first_of: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    let mut unique = Vec::with_capacity(batch.len());
    for (n, request) in batch.iter().enumerate() {
        first_of.entry(&request.event.id).or_insert_with(|| {
            unique.push(request.event.as_new_event());
            n
        });
    }
    let inserted = webhook_events::insert_many(pool, &unique).await;
    drop(permit);
    let outcome = match inserted {
        Ok(new_ids) => {
            let ids: Vec<&str> = new_ids.iter().map(String::as_str).collect();
            if let Err(e) = queue.push(&ids).await {
                ::metrics::counter!(ENQUEUE_FAILURES).increment(ids.len() as u64);
                tracing::warn!(events = ids.len(), error = %e, "events stored but not enqueued; the sweeper will enqueue them");
            }
            let new_at: Vec<usize> = ids
                .iter()
                .filter_map(|id| first_of.get(id).copied())
                .collect();
            let mut is_new = vec![false; batch.len()];
            for n in new_at {
                is_new[n] = true;
            }
            Ok(is_new)
        }
        Err(e) => Err(StoreError::Insert(Arc::new(e))),
    };
    drop(unique);
    drop(first_of);
    for (n, request) in batch.into_iter().enumerate() {
        let answer = match &outcome {
            Ok(is_new) => Ok(is_new[n]),
            Err(e) => Err(e.clone()),
        };
        // The caller may have gone (client disconnected); its event is stored all the same.
        let _ = request.reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> VerifiedEvent {
        VerifiedEvent {
            id: id.to_owned(),
            event_type: "invoice.paid".to_owned(),
            livemode: false,
            api_version: None,
            stripe_created: Utc::now(),
            payload: Bytes::from_static(b"{}"),
        }
    }

    #[tokio::test]
    async fn a_request_whose_batcher_is_gone_fails_instead_of_hanging() {
        let (requests, receiver) = mpsc::channel(1);
        drop(receiver);
        let batcher = Batcher { requests };
        assert!(matches!(
            batcher.store(event("evt_1")).await,
            Err(StoreError::Gone)
        ));
    }

    #[tokio::test]
    async fn a_request_dropped_by_its_writer_fails_instead_of_hanging() {
        let (requests, mut receiver) = mpsc::channel(1);
        let batcher = Batcher { requests };
        // A writer that takes the request and dies without answering.
        tokio::spawn(async move { drop(receiver.recv().await) });
        assert!(matches!(
            batcher.store(event("evt_1")).await,
            Err(StoreError::Gone)
        ));
    }
}
