//! The usage reporter: every `USAGE_REPORT_INTERVAL` it reports the usage records not yet
//! reported to Stripe Billing Meters, exactly once.
//!
//! Per organization and meter it sums the pending records and commits a report: the records
//! are bound to it and its identifier, derived from exactly those records, is fixed
//! (`shared::db::usage`). Then it sends ONE meter event under that identifier (also the
//! idempotency key) and records Stripe's answer. A crash between the call and the answer's
//! commit leaves the report unfinished: it is sent again, with the same identifier, once its
//! lease ends, and Stripe deduplicates it. One report per organization and meter is unfinished
//! at a time, sent under a lease, so one call per customer and meter is in flight.
//!
//! Records of an organization with no Stripe customer wait (and show as pending) until it is
//! linked; past `DEFERRAL_WINDOW_SECS` they become a dead report. A 429 or 5xx is retried by
//! the client, then on the event backoff; a permanent refusal (unknown meter, deleted
//! customer) makes the report a dead letter, listed and replayed by `worker dead-letters`.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use futures::StreamExt;
use shared::db::usage::{self, Report};
use shared::metrics::{METER_EVENTS, USAGE_OLDEST_PENDING, USAGE_PENDING, USAGE_REPORTED};
use shared::retry::Backoff;
use shared::stripe_api::StripeClient;
use sqlx::PgPool;

/// What reporting needs.
#[derive(Clone)]
pub struct UsageDeps {
    /// Postgres.
    pub pool: PgPool,
    /// Stripe.
    pub client: StripeClient,
    /// Spacing of retries after failed calls.
    pub retry: Backoff,
    /// Failed attempts before a report is dead.
    pub max_attempts: i32,
    /// How long records may wait for their organization's customer.
    pub deferral_window: Duration,
    /// How long one worker may take to send a report before another takes it over.
    pub lease: Duration,
}

/// Records bound to one report at most.
const MAX_RECORDS_PER_REPORT: i64 = 100_000;
/// Reports sent at once (each for another organization and meter).
const CONCURRENT_SENDS: usize = 4;

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Reports Stripe accepted.
    pub sent: usize,
    /// Reports that failed and wait for a retry.
    pub retried: usize,
    /// Reports that became dead letters.
    pub dead: usize,
}

/// Reports every `interval` until `stop` resolves; failures are logged and the next round
/// tries again.
pub async fn run(deps: UsageDeps, interval: Duration, stop: impl Future<Output = ()>) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
        match report_once(&deps).await {
            Ok(round) if round != Round::default() => {
                tracing::info!(
                    sent = round.sent,
                    retried = round.retried,
                    dead = round.dead,
                    "usage reported"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "usage round failed; retrying next round"
            ),
        }
    }
}

/// One round: reports for the groups with pending records, then every due report sent.
pub async fn report_once(deps: &UsageDeps) -> anyhow::Result<Round> {
    let window = TimeDelta::from_std(deps.deferral_window).unwrap_or(TimeDelta::MAX);
    for group in usage::pending_groups(&deps.pool, 1_000).await? {
        let dead_reason = match &group.customer_id {
            Some(_) => None,
            None if Utc::now() - group.oldest >= window => Some(format!(
                "organization {} had no Stripe customer within the deferral window",
                group.organization_id
            )),
            // Waits for the link; shown as pending.
            None => continue,
        };
        let mut tx = deps.pool.begin().await?;
        let report = usage::create_report(
            &mut tx,
            &group,
            MAX_RECORDS_PER_REPORT,
            dead_reason.as_deref(),
        )
        .await?;
        tx.commit().await?;
        if report.is_some() && dead_reason.is_some() {
            metrics::counter!(METER_EVENTS, "outcome" => "dead").increment(1);
        }
    }
    let due = usage::claim_sendable(&deps.pool, deps.lease, 1_000).await?;
    let outcomes: Vec<anyhow::Result<Outcome>> = futures::stream::iter(due)
        .map(|report| async move { send(deps, &report).await })
        .buffer_unordered(CONCURRENT_SENDS)
        .collect()
        .await;
    let mut round = Round::default();
    for outcome in outcomes {
        match outcome? {
            Outcome::Sent => round.sent += 1,
            Outcome::Retry => round.retried += 1,
            Outcome::Dead => round.dead += 1,
        }
    }
    refresh_gauges(&deps.pool).await?;
    Ok(round)
}

/// What became of one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stripe accepted it.
    Sent,
    /// It failed and is due again later.
    Retry,
    /// It is a dead letter.
    Dead,
}

/// Sends one report's meter event and records the outcome.
pub async fn send(deps: &UsageDeps, report: &Report) -> anyhow::Result<Outcome> {
    let Some(customer) = &report.customer_id else {
        usage::record_failure(&deps.pool, report.id, "no Stripe customer", None).await?;
        return Ok(Outcome::Dead);
    };
    let form = [
        ("event_name".to_owned(), report.meter.clone()),
        ("payload[stripe_customer_id]".to_owned(), customer.clone()),
        ("payload[value]".to_owned(), report.value.to_string()),
        ("identifier".to_owned(), report.identifier.clone()),
        (
            "timestamp".to_owned(),
            report.occurred_at.timestamp().to_string(),
        ),
    ];
    let result: Result<serde_json::Value, _> = deps
        .client
        .post("/v1/billing/meter_events", &form, Some(&report.identifier))
        .await;
    let outcome = match result {
        Ok(answer) => {
            usage::mark_sent(&deps.pool, report.id, &answer).await?;
            metrics::counter!(USAGE_REPORTED).increment(report.records as u64);
            Outcome::Sent
        }
        Err(e) => {
            let attempts = report.attempts + 1;
            let retry_at = (e.is_transient() && attempts < deps.max_attempts).then(|| {
                Utc::now()
                    + TimeDelta::from_std(deps.retry.delay(attempts as u32)).unwrap_or_default()
            });
            tracing::warn!(
                report = %report.identifier,
                organization.id = %report.organization_id,
                error = %e,
                will_retry = retry_at.is_some(),
                "meter event not accepted"
            );
            usage::record_failure(&deps.pool, report.id, &e.to_string(), retry_at).await?;
            if retry_at.is_some() {
                Outcome::Retry
            } else {
                Outcome::Dead
            }
        }
    };
    let label = match outcome {
        Outcome::Sent => "sent",
        Outcome::Retry => "retry",
        Outcome::Dead => "dead",
    };
    metrics::counter!(METER_EVENTS, "outcome" => label).increment(1);
    Ok(outcome)
}

async fn refresh_gauges(pool: &PgPool) -> Result<(), sqlx::Error> {
    let (pending, oldest) = usage::pending_summary(pool).await?;
    metrics::gauge!(USAGE_PENDING).set(pending as f64);
    let age = oldest.map_or(0.0, |at| (Utc::now() - at).num_seconds().max(0) as f64);
    metrics::gauge!(USAGE_OLDEST_PENDING).set(age);
    Ok(())
}
