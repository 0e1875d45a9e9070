//! The load itself: keep-alive connections, the closed and the open loop, and each request
//! slot's tallies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use e2e::load::BodyFactory;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::{Mutex, mpsc};

/// One request slot's tallies; merged at the end.
pub(crate) struct Tally {
    pub(crate) latency_us: Histogram<u64>,
    /// Each latency (µs) with the second of the load it was sent (or due) in; made into one
    /// histogram per second only for the report (a histogram per slot and second would cost
    /// ~150 KB each).
    pub(crate) timeline: Vec<(u32, u64)>,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) accepted: Vec<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            latency_us: latency_histogram(),
            timeline: Vec::new(),
            errors: BTreeMap::new(),
            accepted: Vec::new(),
        }
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.latency_us.add(&other.latency_us);
        self.timeline.extend(other.timeline);
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        self.accepted.extend(other.accepted);
    }

    /// `at`: when the request was sent (closed loop) or due (open loop), from the start.
    fn record(&mut self, seq: u64, at: Duration, latency: Duration, outcome: Result<u16, String>) {
        let us = latency.as_micros().max(1) as u64;
        self.latency_us.saturating_record(us);
        self.timeline.push((at.as_secs() as u32, us));
        match outcome {
            Ok(200) => self.accepted.push(seq),
            Ok(status) => *self.errors.entry(status.to_string()).or_default() += 1,
            Err(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }
}

pub(crate) fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

/// What every sender shares.
pub(crate) struct Target {
    pub(crate) authority: String,
    pub(crate) uri: hyper::Uri,
    pub(crate) secret: String,
    pub(crate) factory: BodyFactory,
}

/// The current `Stripe-Signature` timestamp; also computed once per request (cheap).
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// A keep-alive connection, reopened after a failure.
struct Connection {
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Connection {
    async fn send(&mut self, target: &Target, seq: u64) -> Result<u16, String> {
        let body = target.factory.body(seq);
        let signature = shared::signature::header_for(&body, &target.secret, unix_now());
        let request = hyper::Request::post(target.uri.clone())
            .header(hyper::header::HOST, target.authority.as_str())
            .header(
                hyper::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .header("stripe-signature", signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| "request".to_owned())?;
        let sender = match &mut self.sender {
            Some(sender) if !sender.is_closed() => sender,
            _ => self.sender.insert(connect(&target.authority).await?),
        };
        if sender.ready().await.is_err() {
            self.sender = None;
            return Err("connection closed".into());
        }
        match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                // Read the (tiny) body so the connection can carry the next request.
                if response.into_body().collect().await.is_err() {
                    self.sender = None;
                    return Err("reading response".into());
                }
                Ok(status)
            }
            Err(e) => {
                self.sender = None;
                Err(if e.is_timeout() { "timeout" } else { "io" }.into())
            }
        }
    }
}

async fn connect(authority: &str) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|_| "connect".to_owned())?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| "handshake".to_owned())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Closed loop: `connections` slots send back to back until `duration` has passed.
pub(crate) async fn closed_loop(
    target: Arc<Target>,
    connections: usize,
    duration: Duration,
) -> Tally {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut slots = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (target, next) = (Arc::clone(&target), Arc::clone(&next));
        slots.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut connection = Connection { sender: None };
            while Instant::now() < deadline {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                let outcome = connection.send(&target, seq).await;
                tally.record(seq, sent - started, sent.elapsed(), outcome);
            }
            tally
        }));
    }
    let mut total = Tally::new();
    for slot in slots {
        if let Ok(tally) = slot.await {
            total.merge(tally);
        }
    }
    total
}

/// Open loop: request n is due at `start + n / rate`; a dispatcher hands due requests to
/// `connections` slots, and each latency counts from the due time.
pub(crate) async fn open_loop(
    target: Arc<Target>,
    rate: u64,
    connections: usize,
    duration: Duration,
    started: Instant,
) -> Tally {
    let total_requests = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let (due_tx, due_rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let due_rx = Arc::new(Mutex::new(due_rx));
    let late_dispatch = Arc::new(AtomicBool::new(false));
    let mut slots = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (target, due_rx) = (Arc::clone(&target), Arc::clone(&due_rx));
        slots.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut connection = Connection { sender: None };
            loop {
                let next = due_rx.lock().await.recv().await;
                let Some((seq, due)) = next else { break };
                let outcome = connection.send(&target, seq).await;
                tally.record(seq, due - started, due.elapsed(), outcome);
            }
            tally
        }));
    }
    let dispatcher = {
        let late_dispatch = Arc::clone(&late_dispatch);
        tokio::spawn(async move {
            let mut seq = 0;
            while seq < total_requests {
                let now = Instant::now();
                // Everything due by now goes out, each with its own due time.
                while seq < total_requests {
                    let due = started + interval.mul_f64(seq as f64);
                    if due > now {
                        break;
                    }
                    if now - due > Duration::from_millis(50) {
                        late_dispatch.store(true, Ordering::Relaxed);
                    }
                    if due_tx.send((seq, due)).is_err() {
                        return;
                    }
                    seq += 1;
                }
                let next_due = started + interval.mul_f64(seq as f64);
                tokio::time::sleep_until(next_due.into()).await;
            }
        })
    };
    let _ = dispatcher.await;
    let mut total = Tally::new();
    for slot in slots {
        if let Ok(tally) = slot.await {
            total.merge(tally);
        }
    }
    if late_dispatch.load(Ordering::Relaxed) {
        eprintln!(
            "loadgen: warning: the generator itself fell more than 50 ms behind schedule \
             (its latency still counts from the schedule)"
        );
    }
    total
}
