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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use e2e::load::{BodyFactory, new_run_tag};
use serde_json::json;

mod report;
mod send;

use report::{applied_lag, follow_drain, latency_json, per_second_json, print_text, verify_stored};
use send::{Target, closed_loop, open_loop, unix_now};

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
