//! Backfill: the events Stripe's Events API still has (30 days) that the inbox lacks, stored
//! exactly as the API returned them (`source = 'backfill'`) and enqueued, so the worker
//! applies them with the usual rules (an old one is simply `stale`). Each event's JSON is kept
//! byte for byte from the list answer; it is rendered in the API version it was created
//! with, which the lenient models read whatever it is.

use std::io::IsTerminal;

use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::db::webhook_events::{self, NewEvent};
use shared::envelope;
use shared::metrics::EVENTS_BACKFILLED;
use shared::stripe::HANDLED_EVENT_TYPES;

use super::Reconciler;

/// What a backfill found and stored.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackfillReport {
    /// Events listed by Stripe.
    pub listed: i32,
    /// Already in the inbox (counted, not inserted).
    pub already_stored: i32,
    /// Stored now (in a dry run: that would be).
    pub inserted: i32,
    /// Listed events whose envelope could not be stored (id, type or `created` unusable).
    pub unreadable: i32,
    /// Nothing was stored.
    pub dry_run: bool,
}

/// The most `types[]` one `GET /v1/events` takes.
const MAX_LISTED_TYPES: usize = 20;

/// Lists events created at or after `since` of `types` (every type the rules handle when
/// empty), stores those the inbox lacks and enqueues them. A push that fails is left to the
/// sweeper.
pub async fn backfill(
    reconciler: &Reconciler,
    since: DateTime<Utc>,
    types: &[String],
    dry_run: bool,
) -> anyhow::Result<BackfillReport> {
    let types: Vec<String> = if types.is_empty() {
        HANDLED_EVENT_TYPES
            .iter()
            .map(|t| (*t).to_owned())
            .collect()
    } else {
        types.to_vec()
    };
    let mut query = vec![
        ("created[gte]", since.timestamp().to_string()),
        ("limit", "100".to_owned()),
    ];
    // Stripe takes at most 20 `types[]`; with more, every event is listed and the others
    // are skipped here.
    let filter_here = types.len() > MAX_LISTED_TYPES;
    if !filter_here {
        query.extend(types.iter().map(|t| ("types[]", t.clone())));
    }
    let mut report = BackfillReport {
        dry_run,
        ..BackfillReport::default()
    };
    let progress = std::io::stderr().is_terminal();
    let mut cursor: Option<String> = None;
    loop {
        let page = reconciler
            .client
            .list_raw("/v1/events", &query, cursor.as_deref())
            .await?;
        report.listed += page.data.len() as i32;
        let mut events = Vec::with_capacity(page.data.len());
        for raw in &page.data {
            match envelope::parse(raw.get().as_bytes()) {
                Ok(parsed) => events.push((parsed, raw.get().as_bytes())),
                Err(e) => {
                    report.unreadable += 1;
                    tracing::warn!(error = %e, "a listed event could not be stored");
                }
            }
        }
        cursor = events.last().map(|(e, _)| e.id.clone());
        if filter_here {
            events.retain(|(e, _)| types.contains(&e.event_type));
        }
        store(reconciler, &events, &mut report).await?;
        if progress {
            eprint!(
                "\rbackfill: {} listed, {} already stored, {} new",
                report.listed, report.already_stored, report.inserted
            );
        }
        if !page.has_more || cursor.is_none() {
            break;
        }
    }
    if progress {
        eprintln!();
    }
    Ok(report)
}

async fn store(
    reconciler: &Reconciler,
    events: &[(envelope::Envelope, &[u8])],
    report: &mut BackfillReport,
) -> anyhow::Result<()> {
    let ids: Vec<&str> = events.iter().map(|(e, _)| e.id.as_str()).collect();
    let stored = webhook_events::stored_ids(&reconciler.pool, &ids).await?;
    let missing: Vec<NewEvent<'_>> = events
        .iter()
        .filter(|(e, _)| !stored.contains(&e.id))
        .map(|(e, payload)| NewEvent {
            id: &e.id,
            event_type: &e.event_type,
            livemode: e.livemode,
            api_version: e.api_version.as_deref(),
            stripe_created: e.created,
            payload,
        })
        .collect();
    report.already_stored += (events.len() - missing.len()) as i32;
    if report.dry_run {
        report.inserted += missing.len() as i32;
        return Ok(());
    }
    // Sorted, as ingest's group commit inserts: a concurrent delivery of the same ids waits
    // in one order.
    let mut missing = missing;
    missing.sort_by(|a, b| a.id.cmp(b.id));
    let inserted = webhook_events::insert_backfilled(&reconciler.pool, &missing).await?;
    report.inserted += inserted.len() as i32;
    metrics::counter!(EVENTS_BACKFILLED).increment(inserted.len() as u64);
    let refs: Vec<&str> = inserted.iter().map(String::as_str).collect();
    if let Err(e) = reconciler.queue.push(&refs).await {
        tracing::warn!(error = %e, "backfilled events not enqueued; the sweeper will enqueue them");
    }
    Ok(())
}
