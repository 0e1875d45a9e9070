//! Group work: requests made at the same time by concurrent callers are handled together, in
//! one batch, by one call. Ingest uses it for group commit (one insert and one commit for many
//! deliveries) and the worker for group apply (one transaction for many events). A commit
//! costs about the same for one row or a hundred, and so does a round trip to Postgres, so
//! under load this is what multiplies throughput without weakening durability: each caller
//! gets its answer only after the batch that holds its request is done.
//!
//! Shape: callers send `(request, reply)` into a bounded channel; one collector task takes a
//! slot, then drains whatever is waiting (up to [`GroupSettings::max_batch`]) and hands that
//! batch to a task of its own. With [`GroupSettings::in_flight`] slots, batches pipeline:
//! while one is in flight the next fills. No timer: when idle a lone request runs at once;
//! when busy, batches grow.
//!
//! A request whose batch task vanished (shutdown, panic) gets [`Gone`] instead of hanging.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

/// How a group runs.
#[derive(Debug, Clone, Copy)]
pub struct GroupSettings {
    /// Most requests in one batch.
    pub max_batch: usize,
    /// Batches in flight at once.
    pub in_flight: usize,
    /// Requests waiting for a batch before callers wait to send theirs (back-pressure).
    pub channel_capacity: usize,
}

/// The batch runner stopped before answering (shutting down, or its task panicked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the batch runner is gone")]
pub struct Gone;

type Request<Req, Res> = (Req, oneshot::Sender<Res>);

/// The callers' side. Cheap to clone; when the last clone is dropped the collector runs what
/// is waiting and its task ends.
#[derive(Debug)]
pub struct Group<Req, Res> {
    requests: mpsc::Sender<Request<Req, Res>>,
}

impl<Req, Res> Clone for Group<Req, Res> {
    fn clone(&self) -> Self {
        Group {
            requests: self.requests.clone(),
        }
    }
}

impl<Req: Send + 'static, Res: Send + 'static> Group<Req, Res> {
    /// Starts the collector. `run` gets a batch and its slot, and returns one answer per
    /// request, in order; it may drop the slot early, once the part that must be limited is
    /// done. Join the handle to wait for the last batch after every clone is dropped.
    pub fn start<F, Fut>(settings: GroupSettings, run: F) -> (Self, JoinHandle<()>)
    where
        F: Fn(Vec<Req>, OwnedSemaphorePermit) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Res>> + Send + 'static,
    {
        let (requests, receiver) = mpsc::channel(settings.channel_capacity.max(1));
        let task = tokio::spawn(collect(receiver, settings, run));
        (Group { requests }, task)
    }

    /// Adds the request to the next batch and waits for its answer.
    pub async fn call(&self, request: Req) -> Result<Res, Gone> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((request, reply))
            .await
            .map_err(|_| Gone)?;
        answer.await.map_err(|_| Gone)
    }
}

async fn collect<Req, Res, F, Fut>(
    mut receiver: mpsc::Receiver<Request<Req, Res>>,
    settings: GroupSettings,
    run: F,
) where
    Req: Send + 'static,
    Res: Send + 'static,
    F: Fn(Vec<Req>, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = Vec<Res>> + Send + 'static,
{
    let max_batch = settings.max_batch.max(1);
    let slots = Arc::new(Semaphore::new(settings.in_flight.max(1)));
    let mut in_flight = JoinSet::new();
    loop {
        // Take the slot first: while every slot is busy, requests pile up in the channel and
        // the next batch gets them all.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let mut batch = Vec::with_capacity(max_batch);
        if receiver.recv_many(&mut batch, max_batch).await == 0 {
            break;
        }
        let (requests, replies): (Vec<Req>, Vec<oneshot::Sender<Res>>) = batch.into_iter().unzip();
        let answers = run(requests, slot);
        in_flight.spawn(async move {
            for (reply, answer) in replies.into_iter().zip(answers.await) {
                // The caller may have gone; its request was handled all the same.
                let _ = reply.send(answer);
            }
        });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    fn settings(max_batch: usize, in_flight: usize) -> GroupSettings {
        GroupSettings {
            max_batch,
            in_flight,
            channel_capacity: 64,
        }
    }

    #[tokio::test]
    async fn concurrent_requests_share_batches_and_each_gets_its_own_answer() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&batches);
        let (group, task) = Group::start(settings(8, 1), move |batch: Vec<u32>, _slot| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                // Slow enough that the other requests queue up behind the first batch.
                tokio::time::sleep(Duration::from_millis(20)).await;
                batch.into_iter().map(|n| n * 10).collect::<Vec<_>>()
            }
        });
        let calls: Vec<_> = (0..20u32)
            .map(|n| {
                let group = group.clone();
                tokio::spawn(async move { (n, group.call(n).await) })
            })
            .collect();
        for call in calls {
            let (n, answer) = call.await.expect("caller task");
            assert_eq!(answer, Ok(n * 10));
        }
        let batches = batches.load(Ordering::SeqCst);
        assert!(
            (3..20).contains(&batches),
            "20 requests of at most 8 per batch ran in {batches} batches"
        );
        drop(group);
        task.await.expect("collector task");
    }

    #[tokio::test]
    async fn a_request_whose_runner_is_gone_fails_instead_of_hanging() {
        let (requests, receiver) = mpsc::channel(1);
        drop(receiver);
        let group: Group<u32, u32> = Group { requests };
        assert_eq!(group.call(1).await, Err(Gone));
    }

    #[tokio::test]
    async fn a_request_whose_batch_gives_no_answer_fails_instead_of_hanging() {
        let (group, _task) = Group::start(settings(8, 1), |_batch: Vec<u32>, _slot| async {
            Vec::<u32>::new()
        });
        assert_eq!(group.call(1).await, Err(Gone));
    }
}
