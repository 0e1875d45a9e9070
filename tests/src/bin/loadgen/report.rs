//! What is reported after the load: latency summaries (overall and per second), the inbox
//! check, the worker's lag and drain, and the text rendering of the JSON report.

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use e2e::load::BodyFactory;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::send::latency_histogram;

pub(crate) fn latency_json(h: &Histogram<u64>) -> Value {
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
pub(crate) fn per_second_json(timeline: &[(u32, u64)]) -> Vec<Value> {
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
pub(crate) async fn verify_stored(pool: &sqlx::PgPool, ids: &[String]) -> anyhow::Result<i64> {
    let mut stored = 0;
    for chunk in ids.chunks(10_000) {
        stored += shared::db::webhook_events::count_stored(pool, chunk)
            .await
            .context("counting stored events")?;
    }
    Ok(stored)
}

/// Waits for the worker to decide every accepted event, then reports the lags.
pub(crate) async fn applied_lag(
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
pub(crate) async fn follow_drain(
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

pub(crate) fn print_text(report: &Value) {
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
