//! Closed-loop load on ingest's usage route: `--connections` callers each post batches of
//! `--batch` usage records (unique identifiers, `--organizations` organizations) for
//! `--seconds`, then report records/s accepted, latency and errors; with `--database-url`,
//! checks every accepted record is stored.
//!
//! `usage-load --url http://127.0.0.1:18080 --token T --meter api_calls [--json]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

/// Posts usage batches in a closed loop.
#[derive(Debug, Parser)]
struct Args {
    /// Ingest's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// INTERNAL_API_TOKEN.
    #[arg(long, env = "INTERNAL_API_TOKEN")]
    token: String,
    /// A meter of USAGE_METERS.
    #[arg(long, default_value = "api_calls")]
    meter: String,
    /// Concurrent callers.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Records per request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Organizations the records are spread over, `<prefix><n>`.
    #[arg(long, default_value_t = 1_000)]
    organizations: usize,
    /// Prefix of the organizations' ids.
    #[arg(long, default_value = "org_usage_")]
    org_prefix: String,
    /// Duration of the loop.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Check the stored records here afterwards.
    #[arg(long)]
    database_url: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let run = e2e::load::new_run_tag();
    let accepted = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let callers = (0..args.connections).map(|caller| {
        let (http, args_url, token, meter) = (
            http.clone(),
            args.url.clone(),
            args.token.clone(),
            args.meter.clone(),
        );
        let (accepted, errors) = (Arc::clone(&accepted), Arc::clone(&errors));
        let run = run.clone();
        let (batch, organizations, prefix) = (args.batch, args.organizations, args.org_prefix.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0_u64;
            while Instant::now() < deadline {
                let org = format!("{prefix}{}", (caller + n as usize) % organizations);
                let records: Vec<_> = (0..batch)
                    .map(|i| json!({ "meter": meter, "value": 1, "identifier": format!("{run}-{caller}-{n}-{i}") }))
                    .collect();
                let body = serde_json::to_vec(&json!({ "records": records })).unwrap_or_default();
                let sent = Instant::now();
                let answer = http
                    .post(format!("{args_url}/v1/organizations/{org}/usage"))
                    .bearer_auth(&token)
                    .header("Content-Type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match answer {
                    Ok(response) if response.status().as_u16() == 202 => {
                        let value: serde_json::Value = response.json().await.unwrap_or_default();
                        accepted.fetch_add(value["accepted"].as_u64().unwrap_or(0), Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                latencies.push(sent.elapsed());
                n += 1;
            }
            latencies
        })
    });
    let mut latencies = Vec::new();
    for caller in futures::future::join_all(callers).await {
        latencies.extend(caller?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let accepted = accepted.load(Ordering::Relaxed);
    let stored = match &args.database_url {
        Some(url) => {
            let pool = sqlx::PgPool::connect(url).await?;
            let like = format!("{run}-%");
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM usage_records WHERE identifier LIKE $1")
                    .bind(like)
                    .fetch_one(&pool)
                    .await?;
            Some(n)
        }
        None => None,
    };
    let report = json!({
        "seconds": elapsed, "requests": latencies.len(), "records_per_request": args.batch,
        "accepted": accepted, "records_per_second": accepted as f64 / elapsed,
        "errors": errors.load(Ordering::Relaxed),
        "p50_ms": at(0.50), "p99_ms": at(0.99), "stored": stored
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{} records/s accepted ({} requests of {}), p50 {:.1} ms, p99 {:.1} ms, {} errors{}",
            (accepted as f64 / elapsed).round(),
            latencies.len(),
            args.batch,
            at(0.50),
            at(0.99),
            report["errors"],
            stored
                .map(|s| format!(", {s} of {accepted} stored"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
