//! `loadgen`: signed Stripe webhooks against a running ingest, as fast as it answers (closed
//! loop) or on a fixed schedule (open loop), then checks that every accepted event is stored.
//!
//! - `loadgen closed --connections 64 --seconds 30`: each connection sends its next request as
//!   soon as the previous one is answered. Reports throughput and latency.
//! - `loadgen open --rate 1000 --seconds 30`: request n is due at `start + n / rate`, whatever
//!   happened before. Latency is measured from that intended time, not from when a connection
//!   got free to send it, so a stall counts against every request it delayed (no coordinated
//!   omission).
//!
//! With `--database-url`, afterwards every event id answered 200 is counted in the inbox
//! (`webhook_events`); with `--wait-applied` also the lag until the worker decided each one.
//! `--json` prints one JSON object instead of the text report; `--fail-on-error` exits non-zero
//! on any error or missing event.
//!
//! Bodies come from [`e2e::load::BodyFactory`] (templates built before timing); each request
//! is signed with the current second, the signature header cached per body only for that
//! request. HTTP/1.1 keep-alive connections on hyper's low-level client, one per concurrent
//! request slot: the cheapest client we have, because the generator shares the cores.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use e2e::load::{BodyFactory, new_run_tag};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};

/// Signed Stripe webhook load against ingest.
#[derive(Debug, Parser)]
#[command(name = "loadgen", about)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// N connections, each sending as soon as its previous request is answered.
    Closed {
        /// Concurrent connections.
        #[arg(long, default_value_t = 64)]
        connections: usize,
    },
    /// A fixed rate on a fixed schedule; latency from each request's intended send time.
    Open {
        /// Requests per second.
        #[arg(long)]
        rate: u64,
        /// Connections available to the schedule (more requests than this in flight wait,
        /// and their waiting counts in their latency).
        #[arg(long, default_value_t = 64)]
        connections: usize,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// Base URL of ingest (loopback only).
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Endpoint secret to sign with (the first of a comma-separated list).
    #[arg(
        long,
        global = true,
        env = "STRIPE_WEBHOOK_SECRET",
        hide_env_values = true
    )]
    secret: Option<String>,
    /// How long to send.
    #[arg(long, global = true, default_value_t = 10.0)]
    seconds: f64,
    /// Distinct customers in the event mix.
    #[arg(long, global = true, default_value_t = 500)]
    customers: usize,
    /// Postgres URL of ingest's database: check that every accepted event is stored.
    #[arg(
        long,
        global = true,
        env = "LOADGEN_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Also wait up to this many seconds for the worker to decide every accepted event and
    /// report the lag (needs --database-url and a running worker).
    #[arg(long, global = true)]
    wait_applied: Option<f64>,
    /// Exit non-zero if any request failed or any accepted event is missing.
    #[arg(long, global = true)]
    fail_on_error: bool,
    /// Print one JSON object instead of the text report.
    #[arg(long, global = true)]
    json: bool,
    /// Percentage of customers linked to no organization (their events are deferred).
    #[arg(long, global = true, default_value_t = 0)]
    foreign_percent: usize,
    /// A running worker's metrics URL: report what it decided during the load
    /// (`billing_events_decided_total`), the backlog when the load stopped, and how long it
    /// then took to decide every accepted event (steady state).
    #[arg(long, global = true)]
    follow_worker: Option<String>,
    /// With --follow-worker: give up waiting for the drain after this many seconds.
    #[arg(long, global = true, default_value_t = 120.0)]
    drain_timeout: f64,
    /// `NAME=PID`: report that process' CPU use (cores) during the load. Repeatable.
    #[arg(long, global = true)]
    cpu: Vec<String>,
    /// `NAME=COMM`: report the CPU use during the load of every process of that command name
    /// (`postgres`, `redis-server`). Repeatable.
    #[arg(long, global = true)]
    cpu_comm: Vec<String>,
}

/// Processes whose CPU is measured over the load: (name, pids or a command name).
struct CpuProbe {
    name: String,
    pid: Option<u32>,
    comm: Option<String>,
    start: BTreeMap<u32, u64>,
}

impl CpuProbe {
    fn parse(cpu: &[String], comm: &[String]) -> anyhow::Result<Vec<CpuProbe>> {
        let split = |spec: &String| -> anyhow::Result<(String, String)> {
            let (name, value) = spec
                .split_once('=')
                .with_context(|| format!("{spec}: expected NAME=VALUE"))?;
            Ok((name.to_owned(), value.to_owned()))
        };
        let mut probes = Vec::new();
        for spec in cpu {
            let (name, pid) = split(spec)?;
            let pid = pid.parse().with_context(|| format!("{spec}: not a pid"))?;
            probes.push(CpuProbe {
                name,
                pid: Some(pid),
                comm: None,
                start: BTreeMap::new(),
            });
        }
        for spec in comm {
            let (name, comm) = split(spec)?;
            probes.push(CpuProbe {
                name,
                pid: None,
                comm: Some(comm),
                start: BTreeMap::new(),
            });
        }
        Ok(probes)
    }

    fn sample(&self) -> BTreeMap<u32, u64> {
        let pids = match (&self.pid, &self.comm) {
            (Some(pid), _) => vec![*pid],
            (None, Some(comm)) => e2e::load::pids_named(comm),
            (None, None) => Vec::new(),
        };
        pids.into_iter()
            .map(|pid| (pid, e2e::load::cpu_ticks(pid)))
            .collect()
    }

    /// Cores used since `start` (processes that exited meanwhile are not counted).
    fn cores(&self, seconds: f64) -> f64 {
        let ticks: u64 = self
            .sample()
            .iter()
            .map(|(pid, now)| now.saturating_sub(self.start.get(pid).copied().unwrap_or(0)))
            .sum();
        (ticks as f64 / 100.0 / seconds * 100.0).round() / 100.0
    }
}

/// One request slot's tallies; merged at the end.
struct Tally {
    latency_us: Histogram<u64>,
    /// Each latency (µs) with the second of the load it was sent (or due) in; made into one
    /// histogram per second only for the report (a histogram per slot and second would cost
    /// ~150 KB each).
    timeline: Vec<(u32, u64)>,
    errors: BTreeMap<String, u64>,
    accepted: Vec<u64>,
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

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

/// What every sender shares.
struct Target {
    authority: String,
    uri: hyper::Uri,
    secret: String,
    factory: BodyFactory,
}

/// The current `Stripe-Signature` timestamp; also computed once per request (cheap).
fn unix_now() -> i64 {
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
async fn closed_loop(target: Arc<Target>, connections: usize, duration: Duration) -> Tally {
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
async fn open_loop(
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

fn latency_json(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "p50": ms(h.value_at_quantile(0.50)),
        "p90": ms(h.value_at_quantile(0.90)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p999": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
        "mean": (h.mean() / 1000.0 * 1000.0).round() / 1000.0,
    })
}

/// Each second's request count, p99 and max, in order: a stall shows as one bad second.
fn per_second_json(timeline: &[(u32, u64)]) -> Vec<Value> {
    let mut seconds: Vec<Histogram<u64>> = Vec::new();
    for &(second, us) in timeline {
        let second = second as usize;
        if seconds.len() <= second {
            seconds.resize_with(second + 1, latency_histogram);
        }
        seconds[second].saturating_record(us);
    }
    let ms = |us: u64| us as f64 / 1000.0;
    seconds
        .iter()
        .enumerate()
        .map(|(second, h)| {
            json!({
                "second": second,
                "requests": h.len(),
                "p99_ms": ms(h.value_at_quantile(0.99)),
                "max_ms": ms(h.max()),
            })
        })
        .collect()
}

/// Counts the accepted ids in the inbox, in chunks.
async fn verify_stored(pool: &sqlx::PgPool, ids: &[String]) -> anyhow::Result<i64> {
    let mut stored = 0;
    for chunk in ids.chunks(10_000) {
        stored += shared::db::webhook_events::count_stored(pool, chunk)
            .await
            .context("counting stored events")?;
    }
    Ok(stored)
}

/// Waits for the worker to decide every accepted event, then reports the lags.
async fn applied_lag(
    pool: &sqlx::PgPool,
    factory: &BodyFactory,
    ids: &[String],
    timeout: Duration,
    schedule: Option<(SystemTime, Duration)>,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    let mut rows = Vec::with_capacity(ids.len());
    loop {
        rows.clear();
        for chunk in ids.chunks(10_000) {
            rows.extend(
                shared::db::webhook_events::decided_lags(pool, chunk)
                    .await
                    .context("reading lags")?,
            );
        }
        if rows.len() == ids.len() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut inbox = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut end_to_end = inbox.clone();
    for (id, inbox_ms, processed_at) in &rows {
        inbox.saturating_record((inbox_ms * 1000.0).max(1.0) as u64);
        if let (Some((start, interval)), Some(seq)) = (schedule, factory.sequence_of(id)) {
            let due = start + interval.mul_f64(seq as f64);
            let applied = SystemTime::from(*processed_at);
            let lag = applied.duration_since(due).unwrap_or_default();
            end_to_end.saturating_record(lag.as_micros().max(1) as u64);
        }
    }
    let mut report = json!({
        "decided": rows.len(),
        "undecided": ids.len() - rows.len(),
        "inbox_to_applied_ms": latency_json(&inbox),
    });
    if schedule.is_some() {
        report["due_to_applied_ms"] = latency_json(&end_to_end);
    }
    Ok(report)
}

/// After the load: what the worker decided during it, the backlog left, and the time until
/// it has decided as many events as were accepted.
async fn follow_drain(
    http: &reqwest::Client,
    url: &str,
    before: i64,
    accepted: i64,
    load_seconds: f64,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let stopped = Instant::now();
    let at_stop = e2e::load::worker_decisions(http, url).await? - before;
    let mut decided = at_stop;
    while decided < accepted && stopped.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(50)).await;
        decided = e2e::load::worker_decisions(http, url).await? - before;
    }
    let drain = stopped.elapsed().as_secs_f64();
    Ok(json!({
        "decided_during_load": at_stop,
        "decided_per_second": (at_stop as f64 / load_seconds).round(),
        "backlog_at_end": (accepted - at_stop).max(0),
        "drain_seconds": (drain * 100.0).round() / 100.0,
        "drained": decided >= accepted,
        "decided_total": decided,
    }))
}

fn print_text(report: &Value) {
    let l = &report["latency_ms"];
    println!(
        "loadgen {} to {}: {} s, {} connections{}",
        report["mode"].as_str().unwrap_or_default(),
        report["url"].as_str().unwrap_or_default(),
        report["seconds"],
        report["connections"],
        report["rate"]
            .as_u64()
            .map(|r| format!(", scheduled {r}/s"))
            .unwrap_or_default()
    );
    println!(
        "  bodies {}..{} bytes, signed per request",
        report["body_bytes"]["min"], report["body_bytes"]["max"]
    );
    println!(
        "  requests {}  ok {}  errors {}  throughput {:.0}/s",
        report["requests"], report["ok"], report["errors_total"], report["throughput"]
    );
    if report["errors_total"].as_u64().unwrap_or(0) > 0 {
        println!("  errors by status: {}", report["errors"]);
    }
    println!(
        "  latency ms{}: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        if report["mode"] == "open" {
            " (from intended send time)"
        } else {
            ""
        },
        l["p50"],
        l["p90"],
        l["p99"],
        l["p999"],
        l["max"]
    );
    if let Some(steady) = report.get("steady") {
        println!(
            "  worker: decided {}/s during the load; backlog at the end {}, drained in {} s",
            steady["decided_per_second"], steady["backlog_at_end"], steady["drain_seconds"]
        );
    }
    println!("  CPU (cores): {}", report["cpu_cores"]);
    if let Some(v) = report.get("verify") {
        println!(
            "  inbox: {} of {} accepted events stored, {} missing",
            v["stored"], v["accepted"], v["missing"]
        );
    }
    if let Some(lag) = report.get("lag") {
        let i = &lag["inbox_to_applied_ms"];
        println!(
            "  applied: {} decided, {} not yet; inbox→applied ms p50 {} p99 {} max {}",
            lag["decided"], lag["undecided"], i["p50"], i["p99"], i["max"]
        );
        if let Some(e) = lag.get("due_to_applied_ms") {
            println!(
                "  due→applied ms (send schedule to worker commit) p50 {} p99 {} max {}",
                e["p50"], e["p99"], e["max"]
            );
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // reqwest's TLS (unused: the worker's metrics endpoint is plain HTTP) needs a provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let common = &cli.common;
    let secret = common
        .secret
        .as_deref()
        .and_then(|s| s.split(',').next())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .context("--secret or STRIPE_WEBHOOK_SECRET is required")?
        .to_owned();
    let uri: hyper::Uri = format!("{}/v1/webhooks/stripe", common.url.trim_end_matches('/'))
        .parse()
        .context("--url")?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "--url must be plain http (loopback)"
    );
    let host = uri.host().context("--url has no host")?;
    anyhow::ensure!(
        host == "127.0.0.1" || host == "localhost" || host == "[::1]",
        "--url must point at loopback"
    );
    let authority = format!("{host}:{}", uri.port_u16().unwrap_or(80));
    let run_tag = new_run_tag();
    let factory = BodyFactory::with_foreign(
        &run_tag,
        common.customers,
        unix_now() - 60,
        common.foreign_percent.min(100),
    );
    let (min_body, max_body) = factory.size_range();
    let target = Arc::new(Target {
        authority,
        uri,
        secret,
        factory,
    });
    let pool = match &common.database_url {
        Some(url) => Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(url)
                .await
                .context("connecting to --database-url")?,
        ),
        None => None,
    };
    let duration = Duration::from_secs_f64(common.seconds.max(0.01));
    let http = reqwest::Client::new();
    let decided_before = match &common.follow_worker {
        Some(url) => Some(
            e2e::load::worker_decisions(&http, url)
                .await
                .context("reading --follow-worker")?,
        ),
        None => None,
    };
    let mut probes = CpuProbe::parse(&common.cpu, &common.cpu_comm)?;
    for probe in &mut probes {
        probe.start = probe.sample();
    }
    let own_cpu_before = e2e::load::cpu_ticks(std::process::id());

    let started = Instant::now();
    let started_wall = SystemTime::now();
    let (tally, connections, rate) = match cli.mode {
        Mode::Closed { connections } => (
            closed_loop(Arc::clone(&target), connections.max(1), duration).await,
            connections,
            None,
        ),
        Mode::Open { rate, connections } => (
            open_loop(
                Arc::clone(&target),
                rate.max(1),
                connections.max(1),
                duration,
                started,
            )
            .await,
            connections,
            Some(rate.max(1)),
        ),
    };
    let elapsed = started.elapsed().as_secs_f64();
    let mut cpu: BTreeMap<String, f64> = probes
        .iter()
        .map(|probe| (probe.name.clone(), probe.cores(elapsed)))
        .collect();
    let own_ticks = e2e::load::cpu_ticks(std::process::id()).saturating_sub(own_cpu_before);
    cpu.insert(
        "loadgen".into(),
        (own_ticks as f64 / 100.0 / elapsed * 100.0).round() / 100.0,
    );
    let steady = match (&common.follow_worker, decided_before) {
        (Some(url), Some(before)) => Some(
            follow_drain(
                &http,
                url,
                before,
                tally.accepted.len() as i64,
                elapsed,
                Duration::from_secs_f64(common.drain_timeout),
            )
            .await?,
        ),
        _ => None,
    };

    let requests = tally.latency_us.len();
    let errors_total: u64 = tally.errors.values().sum();
    let ok = tally.accepted.len() as u64;
    let mut report = json!({
        "mode": if rate.is_some() { "open" } else { "closed" },
        "url": common.url,
        "run_tag": run_tag,
        "connections": connections,
        "rate": rate,
        "seconds": (elapsed * 100.0).round() / 100.0,
        "body_bytes": { "min": min_body, "max": max_body },
        "requests": requests,
        "ok": ok,
        "errors_total": errors_total,
        "errors": tally.errors,
        "throughput": (ok as f64 / elapsed).round(),
        "latency_ms": latency_json(&tally.latency_us),
        "started_unix_ms": started_wall
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default(),
        "per_second": per_second_json(&tally.timeline),
        "foreign_percent": common.foreign_percent,
        "cpu_cores": cpu,
    });
    if let Some(steady) = steady {
        report["steady"] = steady;
    }
    let mut missing = 0;
    if let Some(pool) = &pool {
        let ids: Vec<String> = tally
            .accepted
            .iter()
            .map(|seq| target.factory.event_id(*seq))
            .collect();
        let stored = verify_stored(pool, &ids).await?;
        missing = ids.len() as i64 - stored;
        report["verify"] = json!({ "accepted": ids.len(), "stored": stored, "missing": missing });
        if let Some(wait) = common.wait_applied {
            let schedule = rate.map(|r| (started_wall, Duration::from_secs_f64(1.0 / r as f64)));
            report["lag"] = applied_lag(
                pool,
                &target.factory,
                &ids,
                Duration::from_secs_f64(wait),
                schedule,
            )
            .await?;
        }
    }
    if common.json {
        println!("{report}");
    } else {
        print_text(&report);
    }
    if common.fail_on_error && (errors_total > 0 || missing != 0) {
        std::process::exit(1);
    }
    Ok(())
}
