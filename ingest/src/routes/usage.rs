//! `POST /v1/organizations/{organization_id}/usage` (records in, `202 {accepted,
//! duplicates}`) and `GET` the same path (totals out). Records are checked all or nothing
//! (`shared::usage`), then stored with group commit: the records of concurrent requests go
//! into one insert and one commit, and each request is answered only after it.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::db::usage::{self as usage_db, NewUsageRecord};
use shared::enterprise::FieldError;
use shared::group::{Group, GroupSettings};
use shared::metrics::{USAGE_ACCEPTED, USAGE_DUPLICATES};
use shared::usage::{self, UsageRecord};
use sqlx::PgPool;

use crate::AppState;
use crate::auth::InternalCaller;
use crate::error::ApiError;
use crate::routes::billing_actions::check_organization_id;
use crate::routes::read_body;

/// Largest body: 1,000 records of a few hundred bytes each.
pub const BODY_LIMIT_BYTES: usize = 512 * 1024;

/// One request's records, for the group commit.
type Batch = (String, Vec<UsageRecord>);
/// (accepted, duplicates), or the storage failure.
type Stored = Result<(usize, usize), Arc<sqlx::Error>>;

/// The group commit of usage records.
#[derive(Clone)]
pub struct UsageWriter {
    group: Group<Batch, Stored>,
    /// The configured meters (empty: the routes are off).
    pub meters: Arc<Vec<String>>,
}

impl UsageWriter {
    /// Starts the writer on `pool`: up to 64 requests per insert, two inserts in flight.
    pub fn start(pool: PgPool, meters: Vec<String>) -> UsageWriter {
        let settings = GroupSettings {
            max_batch: 64,
            in_flight: 2,
            channel_capacity: 1024,
        };
        let (group, _task) = Group::start(settings, move |batch, slot| {
            let pool = pool.clone();
            async move {
                let answers = store(&pool, &batch).await;
                drop(slot);
                answers
            }
        });
        UsageWriter {
            group,
            meters: Arc::new(meters),
        }
    }
}

/// Stores a batch of requests in one statement; a record repeated in the batch counts for the
/// first request holding it.
async fn store(pool: &PgPool, batch: &[Batch]) -> Vec<Stored> {
    let mut seen = HashSet::new();
    let mut owners = Vec::new();
    let mut rows = Vec::new();
    for (n, (organization_id, records)) in batch.iter().enumerate() {
        for record in records {
            let key = (
                organization_id.as_str(),
                record.meter.as_str(),
                record.identifier.as_str(),
            );
            if seen.insert(key) {
                owners.push(n);
                rows.push(NewUsageRecord {
                    organization_id,
                    meter: &record.meter,
                    identifier: &record.identifier,
                    value: record.value,
                    occurred_at: record.occurred_at,
                });
            }
        }
    }
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| (rows[i].organization_id, rows[i].meter, rows[i].identifier));
    let sorted: Vec<NewUsageRecord<'_>> = order.iter().map(|&i| rows[i].clone()).collect();
    match usage_db::insert_records(pool, &sorted).await {
        Ok(inserted) => {
            let inserted: HashSet<(String, String, String)> = inserted.into_iter().collect();
            let mut accepted = vec![0; batch.len()];
            for (row, owner) in rows.iter().zip(&owners) {
                let key = (
                    row.organization_id.to_owned(),
                    row.meter.to_owned(),
                    row.identifier.to_owned(),
                );
                if inserted.contains(&key) {
                    accepted[*owner] += 1;
                }
            }
            batch
                .iter()
                .zip(accepted)
                .map(|((_, records), accepted)| Ok((accepted, records.len() - accepted)))
                .collect()
        }
        Err(e) => {
            let e = Arc::new(e);
            batch.iter().map(|_| Err(Arc::clone(&e))).collect()
        }
    }
}

fn writer(state: &AppState) -> Result<&UsageWriter, ApiError> {
    state.usage.as_ref().ok_or(ApiError::NotConfigured(
        "usage routes need USAGE_METERS, which is not set",
    ))
}

/// `POST …/usage`.
pub async fn record(
    _caller: InternalCaller,
    State(state): State<AppState>,
    Path(organization_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = read_body(body, BODY_LIMIT_BYTES)?;
    check_organization_id(&organization_id)?;
    let writer = writer(&state)?;
    let records = usage::parse(&body, &writer.meters, Utc::now())?;
    let (accepted, duplicates) = writer
        .group
        .call((organization_id, records))
        .await
        .map_err(|gone| ApiError::Unavailable(anyhow::Error::new(gone)))?
        .map_err(|e| ApiError::Unavailable(anyhow::anyhow!("storing usage records: {e}")))?;
    ::metrics::counter!(USAGE_ACCEPTED).increment(accepted as u64);
    ::metrics::counter!(USAGE_DUPLICATES).increment(duplicates as u64);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "accepted": accepted, "duplicates": duplicates })),
    ))
}

/// The query of `GET …/usage`.
#[derive(Debug, Deserialize)]
pub struct TotalsQuery {
    meter: Option<String>,
    since: Option<String>,
}

/// `GET …/usage?meter=…&since=…`: reported and pending totals since a time (unix seconds or
/// RFC 3339; default: all).
pub async fn totals(
    _caller: InternalCaller,
    State(state): State<AppState>,
    Path(organization_id): Path<String>,
    query: Result<Query<TotalsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    check_organization_id(&organization_id)?;
    let writer = writer(&state)?;
    let meter = match query.meter {
        Some(meter) if writer.meters.contains(&meter) => meter,
        Some(meter) => {
            return Err(FieldError::new(
                "meter",
                format!("{meter:?} is not a configured meter (USAGE_METERS)"),
            )
            .into());
        }
        None => return Err(FieldError::new("meter", "is required").into()),
    };
    let since = match query.since.as_deref() {
        None => DateTime::<Utc>::UNIX_EPOCH,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .and_then(|s| DateTime::from_timestamp(s, 0))
            .or_else(|| DateTime::parse_from_rfc3339(text).ok().map(|t| t.to_utc()))
            .ok_or_else(|| FieldError::new("since", "must be unix seconds or an RFC 3339 time"))?,
    };
    let totals = usage_db::totals(&state.pool, &organization_id, &meter, since)
        .await
        .map_err(|e| ApiError::Unavailable(e.into()))?;
    Ok(Json(json!({
        "organization_id": organization_id,
        "meter": meter,
        "since": since,
        "reported": totals.reported,
        "pending": totals.pending,
        "dead": totals.dead,
        "records": totals.records,
    })))
}
