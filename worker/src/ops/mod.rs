//! The operators' commands: list and replay dead letters (events and outbox emails), replay
//! or inspect one event. They work from Postgres alone (the inbox and the outbox are the
//! record; Redis may have lost everything) and apply events or send emails in this process
//! with the same code as the consumers, so what an operator sees is what happened. An
//! event's dry run takes the same path and rolls its transaction back; an email's dry run
//! only says what would be sent.
//!
//! Every command returns its result as data; `print` renders it as aligned text for a person
//! or as JSON for a script.

use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::billing::{Access, access};
use shared::db::billing_audit::{self, AuditRow, Decision};
use shared::db::organizations::{self, Organization};
use shared::db::webhook_events::{self, DeadLetterFilter, StoredEvent};
use shared::db::{email_outbox, enterprise_requests};
use sqlx::PgPool;
use uuid::Uuid;

pub mod usage;

use crate::apply::{self, ApplyOptions, Deps, FailureOutcome, Report};
use crate::email::{self, EmailDeps, EmailError, EmailReport};

/// The `type` of outbox emails in dead-letter listings (`--type` selects them).
pub const EMAIL_TYPE: &str = "email.enterprise_request";

/// An operator's command could not run.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// No event with this id is stored.
    #[error("no event {0} in the inbox")]
    UnknownEvent(String),
    /// `dead-letters replay --id` named an event that is not dead.
    #[error("event {id} is {status}, not a dead letter; use `worker events replay {id}`")]
    NotDead {
        /// The event.
        id: String,
        /// Its status.
        status: String,
    },
    /// No outbox email with this id.
    #[error("no outbox email {0}")]
    UnknownEmail(Uuid),
    /// Sending an email could not be recorded.
    #[error(transparent)]
    Email(#[from] EmailError),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Sending a usage report could not be recorded.
    #[error("{0}")]
    Usage(String),
}

/// A dead letter of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterId {
    /// A Stripe event (`evt_…`).
    Event(String),
    /// An outbox email (a UUID).
    Email(Uuid),
    /// A usage report (`usage_…`).
    Usage(String),
}

impl DeadLetterId {
    /// A UUID names an outbox email; anything else a Stripe event.
    pub fn parse(id: &str) -> DeadLetterId {
        if id.starts_with("usage_") {
            return DeadLetterId::Usage(id.to_owned());
        }
        match Uuid::parse_str(id) {
            Ok(uuid) => DeadLetterId::Email(uuid),
            Err(_) => DeadLetterId::Event(id.to_owned()),
        }
    }
}

/// One dead letter, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// `event` or `email`.
    pub kind: &'static str,
    /// The event id or the outbox id.
    pub id: String,
    /// The event type, or [`EMAIL_TYPE`].
    #[serde(rename = "type")]
    pub letter_type: String,
    /// When an event died; when an email was requested (the outbox keeps no death time).
    pub at: Option<DateTime<Utc>>,
    /// Failed attempts.
    pub attempts: i32,
    /// Deferrals (events only).
    pub deferrals: i32,
    /// Why it died.
    pub last_error: Option<String>,
}

/// The outcome of replaying one event or email.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayResult {
    /// `event` or `email`.
    pub kind: &'static str,
    /// The event id or the outbox id.
    pub id: String,
    /// The decision (`applied`, `stale`, `deferred`, `dead`, …, or `sent`, `would_send`,
    /// `retry_scheduled` for an email), or `failed`.
    pub decision: String,
    /// The organization concerned.
    pub organization_id: Option<String>,
    /// Plan status before.
    pub status_before: Option<String>,
    /// Plan status after.
    pub status_after: Option<String>,
    /// Why, in words (the error, for `failed`).
    pub detail: Option<String>,
    /// Nothing was changed.
    pub dry_run: bool,
}

impl ReplayResult {
    /// The replay did not apply or send: it failed, is dead again, or waits for a retry.
    pub fn is_failure(&self) -> bool {
        matches!(
            self.decision.as_str(),
            "failed" | "dead" | "retry_scheduled"
        )
    }

    fn from_report(event_id: &str, report: Report, dry_run: bool) -> ReplayResult {
        ReplayResult {
            kind: "event",
            id: event_id.to_owned(),
            decision: report.decision.as_str().to_owned(),
            organization_id: report.organization_id,
            status_before: report.status_before.map(|s| s.as_str().to_owned()),
            status_after: report.status_after.map(|s| s.as_str().to_owned()),
            detail: report.detail,
            dry_run,
        }
    }
}

/// Dead letters matching `filter` (events and emails), newest first.
pub async fn list_dead_letters(
    pool: &PgPool,
    filter: &DeadLetterFilter,
) -> Result<Vec<DeadLetter>, OpsError> {
    let mut letters: Vec<DeadLetter> = webhook_events::list_dead(pool, filter)
        .await?
        .into_iter()
        .map(|event| DeadLetter {
            kind: "event",
            id: event.id,
            letter_type: event.event_type,
            at: event.processed_at,
            attempts: event.attempts,
            deferrals: event.deferrals,
            last_error: event.last_error,
        })
        .collect();
    if includes_emails(filter) {
        let emails = email_outbox::list_dead(pool, filter.since, filter.limit).await?;
        letters.extend(emails.into_iter().map(|email| DeadLetter {
            kind: "email",
            id: email.id.to_string(),
            letter_type: EMAIL_TYPE.to_owned(),
            at: Some(email.created_at),
            attempts: email.attempts,
            deferrals: 0,
            last_error: email.last_error,
        }));
    }
    if filter
        .event_type
        .as_deref()
        .is_none_or(|t| t == usage::USAGE_TYPE)
    {
        letters.extend(usage::list(pool, filter.since, filter.limit).await?);
    }
    letters.sort_by_key(|letter| std::cmp::Reverse(letter.at));
    letters.truncate(usize::try_from(filter.limit).unwrap_or(usize::MAX));
    Ok(letters)
}

/// Every dead letter matching `filter` (its limit ignored): events in Stripe's order, then
/// emails.
pub async fn dead_letter_ids(
    pool: &PgPool,
    filter: &DeadLetterFilter,
) -> Result<Vec<DeadLetterId>, OpsError> {
    let all = DeadLetterFilter {
        limit: i64::MAX,
        ..filter.clone()
    };
    let mut ids: Vec<DeadLetterId> = webhook_events::list_dead_ids(pool, &all)
        .await?
        .into_iter()
        .map(DeadLetterId::Event)
        .collect();
    if includes_emails(filter) {
        let emails = email_outbox::list_dead(pool, filter.since, i64::MAX).await?;
        ids.extend(emails.into_iter().rev().map(|e| DeadLetterId::Email(e.id)));
    }
    if filter
        .event_type
        .as_deref()
        .is_none_or(|t| t == usage::USAGE_TYPE)
    {
        let reports = usage::list(pool, filter.since, i64::MAX).await?;
        ids.extend(reports.into_iter().rev().map(|r| DeadLetterId::Usage(r.id)));
    }
    Ok(ids)
}

fn includes_emails(filter: &DeadLetterFilter) -> bool {
    filter.event_type.as_deref().is_none_or(|t| t == EMAIL_TYPE)
}

/// Replays one dead email: it becomes pending with a fresh attempt count and is sent now,
/// with the same Resend idempotency key as before. With `dry_run`, says what would be sent.
pub async fn replay_dead_email(
    deps: &EmailDeps,
    outbox_id: Uuid,
    dry_run: bool,
) -> Result<ReplayResult, OpsError> {
    let row = email_outbox::get(&deps.pool, outbox_id)
        .await?
        .ok_or(OpsError::UnknownEmail(outbox_id))?;
    if row.status != email_outbox::OutboxStatus::Dead {
        return Err(OpsError::NotDead {
            id: outbox_id.to_string(),
            status: row.status.as_str().to_owned(),
        });
    }
    let request = enterprise_requests::get(&deps.pool, row.request_id).await?;
    let result = |decision: &str, detail: String| ReplayResult {
        kind: "email",
        id: outbox_id.to_string(),
        decision: decision.to_owned(),
        organization_id: request.as_ref().map(|r| r.organization_id.clone()),
        status_before: None,
        status_after: None,
        detail: Some(detail),
        dry_run,
    };
    if dry_run {
        return Ok(result(
            "would_send",
            format!(
                "to {} (Idempotency-Key {})",
                deps.enterprise_sales,
                email::idempotency_key(outbox_id)
            ),
        ));
    }
    if !email_outbox::reset_for_replay(&deps.pool, outbox_id).await? {
        return Err(OpsError::NotDead {
            id: outbox_id.to_string(),
            status: "no longer dead".to_owned(),
        });
    }
    let report = email::send_outbox_email(deps, outbox_id).await?;
    let detail = match &report {
        EmailReport::Sent { resend_email_id } => format!("Resend email {resend_email_id}"),
        EmailReport::RetryScheduled { error, .. } => {
            format!("{error}; the sweeper retries it")
        }
        EmailReport::Dead { reason } => reason.clone(),
        EmailReport::AlreadyDone(status) => format!("already {}", status.as_str()),
        EmailReport::NotDue { retry_at } => format!("due at {retry_at}"),
    };
    Ok(result(report.outcome(), detail))
}

/// Replays one dead letter: it becomes a fresh pending event (attempts and deferrals start
/// again) and is applied now. With `dry_run`, reports what applying would do and changes
/// nothing.
pub async fn replay_dead_letter(
    deps: &Deps,
    event_id: &str,
    dry_run: bool,
) -> Result<ReplayResult, OpsError> {
    let stored = stored_event(&deps.pool, event_id).await?;
    if stored.status != "dead" {
        return Err(OpsError::NotDead {
            id: stored.id,
            status: stored.status,
        });
    }
    if !dry_run && !webhook_events::revive(&deps.pool, event_id).await? {
        // Revived by someone else between the read and now.
        return Err(OpsError::NotDead {
            id: stored.id,
            status: "no longer dead".to_owned(),
        });
    }
    run_apply(
        deps,
        event_id,
        ApplyOptions {
            force: false,
            dry_run,
        },
    )
    .await
}

/// Replays one stored event of any status. A processed event is only reported (`None`)
/// unless `options.force` runs the rules on it again; a dead one is revived first.
pub async fn replay_event(
    deps: &Deps,
    event_id: &str,
    options: ApplyOptions,
) -> Result<Option<ReplayResult>, OpsError> {
    let stored = stored_event(&deps.pool, event_id).await?;
    match stored.status.as_str() {
        "processed" if !options.force => return Ok(None),
        "dead" if !options.dry_run => {
            webhook_events::revive(&deps.pool, event_id).await?;
        }
        _ => {}
    }
    run_apply(deps, event_id, options).await.map(Some)
}

/// Applies, and records a failure the way the consumer does (so a failed replay is retried
/// by the sweeper or becomes a dead letter again).
async fn run_apply(
    deps: &Deps,
    event_id: &str,
    options: ApplyOptions,
) -> Result<ReplayResult, OpsError> {
    match apply::apply_event(deps, event_id, options).await {
        Ok(report) => Ok(ReplayResult::from_report(event_id, report, options.dry_run)),
        Err(error) => {
            let next = if options.dry_run {
                "nothing was recorded (dry run)".to_owned()
            } else {
                match apply::record_failure(deps, event_id, &error).await? {
                    FailureOutcome::RetryAt(at) => format!("the sweeper retries it at {at}"),
                    FailureOutcome::Dead => "it is a dead letter again".to_owned(),
                }
            };
            Ok(ReplayResult {
                kind: "event",
                id: event_id.to_owned(),
                decision: "failed".to_owned(),
                organization_id: None,
                status_before: None,
                status_after: None,
                detail: Some(format!("{error}; {next}")),
                dry_run: options.dry_run,
            })
        }
    }
}

/// Everything known about one event.
#[derive(Debug, Clone, Serialize)]
pub struct EventDetails {
    /// The inbox row (without the payload).
    pub event: StoredEvent,
    /// Size of the stored payload in bytes.
    pub payload_bytes: usize,
    /// Every decision taken on it, oldest first.
    pub decisions: Vec<AuditRow>,
    /// The organization it concerns, when known.
    pub organization: Option<OrganizationState>,
}

/// An organization and its access.
#[derive(Debug, Clone, Serialize)]
pub struct OrganizationState {
    /// The stored row.
    #[serde(flatten)]
    pub organization: Organization,
    /// Access derived from the status.
    pub access: Access,
}

/// The inbox row, its decisions and its organization's state. The organization is the one
/// of the latest decision that named one, else the one linked to the event's customer.
pub async fn show_event(pool: &PgPool, event_id: &str) -> Result<EventDetails, OpsError> {
    let event = stored_event(pool, event_id).await?;
    let decisions = billing_audit::for_event(pool, event_id).await?;
    let organization_id = match decisions
        .iter()
        .rev()
        .find_map(|d| d.organization_id.clone())
    {
        Some(id) => Some(id),
        None => match &event.stripe_customer_id {
            Some(customer) => organizations::owner_of_customer(pool, customer).await?,
            None => None,
        },
    };
    let organization = match organization_id {
        Some(id) => organizations::get(pool, &id).await?,
        None => None,
    };
    Ok(EventDetails {
        payload_bytes: event.payload.len(),
        event,
        decisions,
        organization: organization.map(|organization| OrganizationState {
            access: access(organization.plan_status),
            organization,
        }),
    })
}

async fn stored_event(pool: &PgPool, event_id: &str) -> Result<StoredEvent, OpsError> {
    webhook_events::get(pool, event_id)
        .await?
        .ok_or_else(|| OpsError::UnknownEvent(event_id.to_owned()))
}

/// Parses `--since`: an RFC 3339 time, a date (midnight UTC), or an age such as `90s`, `30m`,
/// `6h`, `7d` (that long before `now`).
pub fn parse_since(value: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let value = value.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(value) {
        return Ok(time.with_timezone(&Utc));
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        return Ok(date.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    let expected = || {
        format!(
            "{value:?} is not a time: use RFC 3339 (2026-11-21T03:00:00Z), a date (2026-11-21) \
             or an age (90s, 30m, 6h, 7d)"
        )
    };
    let age = shared::config::parse_age(value).ok_or_else(expected)?;
    now.checked_sub_signed(age).ok_or_else(expected)
}

/// Renders command results as text or JSON.
pub struct Output {
    /// JSON instead of text.
    pub json: bool,
}

impl Output {
    /// Prints `value` as pretty JSON, or `text` for a person.
    pub fn print(&self, value: &impl Serialize, text: impl FnOnce() -> String) {
        if self.json {
            match serde_json::to_string_pretty(value) {
                Ok(json) => println!("{json}"),
                Err(e) => eprintln!("worker: cannot render JSON: {e}"),
            }
        } else {
            print!("{}", text());
        }
    }
}

/// Dead letters as a table.
pub fn dead_letters_text(rows: &[DeadLetter], limit: i64) -> String {
    if rows.is_empty() {
        return "no dead letters match\n".to_owned();
    }
    let mut text = format!(
        "{:<6} {:<36} {:<32} {:<20} {:>8} {:>9}  LAST ERROR\n",
        "KIND", "ID", "TYPE", "AT", "ATTEMPTS", "DEFERRALS"
    );
    for row in rows {
        text += &format!(
            "{:<6} {:<36} {:<32} {:<20} {:>8} {:>9}  {}\n",
            row.kind,
            row.id,
            row.letter_type,
            row.at.map(short_time).unwrap_or_default(),
            row.attempts,
            row.deferrals,
            row.last_error.as_deref().unwrap_or("")
        );
    }
    let more = if rows.len() as i64 == limit {
        " (the limit; use --limit to see more)".to_owned()
    } else {
        String::new()
    };
    text + &format!("{} dead letters{more}\n", rows.len())
}

/// Replay results, one line each.
pub fn replay_text(results: &[ReplayResult]) -> String {
    let mut text = String::new();
    for result in results {
        let change = match (&result.status_before, &result.status_after) {
            (Some(before), Some(after)) => format!("{before} -> {after}"),
            _ => String::new(),
        };
        text += &format!(
            "{:<6} {:<36} {:<15} {:<24} {:<24} {}\n",
            result.kind,
            result.id,
            result.decision,
            result.organization_id.as_deref().unwrap_or("-"),
            change,
            result.detail.as_deref().unwrap_or("")
        );
    }
    let failed = results.iter().filter(|r| r.is_failure()).count();
    text += &format!("{} replayed, {failed} not applied", results.len());
    if results.first().is_some_and(|r| r.dry_run) {
        text += " (dry run: nothing was changed)";
    }
    text + "\n"
}

/// One event in detail.
pub fn event_text(details: &EventDetails) -> String {
    let event = &details.event;
    let optional = |time: Option<DateTime<Utc>>| time.map(short_time).unwrap_or("-".into());
    let mut text = format!(
        "event        {}\ntype         {}\nstatus       {} (attempts {}, deferrals {})\n\
         created      {} (Stripe)\nreceived     {}\nfinished     {}\nretry at     {}\n\
         customer     {}\nlast error   {}\npayload      {} bytes, API version {}\n",
        event.id,
        event.event_type,
        event.status,
        event.attempts,
        event.deferrals,
        short_time(event.stripe_created),
        short_time(event.received_at),
        optional(event.processed_at),
        optional(event.retry_at),
        event.stripe_customer_id.as_deref().unwrap_or("-"),
        event.last_error.as_deref().unwrap_or("-"),
        details.payload_bytes,
        event.api_version.as_deref().unwrap_or("-"),
    );
    text += "\ndecisions\n";
    if details.decisions.is_empty() {
        text += "  none yet\n";
    }
    for d in &details.decisions {
        let status = |s: Option<shared::billing::PlanStatus>| s.map_or("-", |s| s.as_str());
        text += &format!(
            "  {}  {:<10} {:<24} {} -> {}  {}\n",
            short_time(d.created_at),
            d.decision,
            d.organization_id.as_deref().unwrap_or("-"),
            status(d.status_before),
            status(d.status_after),
            d.detail.as_deref().unwrap_or("")
        );
    }
    text += "\norganization\n";
    match &details.organization {
        None => text += "  not known\n",
        Some(OrganizationState {
            organization: org,
            access,
        }) => {
            text += &format!(
                "  {}: plan {}, status {} (access {}), cancel at period end {}, period end {}\n  \
                 customer {}, subscription {}, state from {} at {}\n",
                org.id,
                org.plan.as_deref().unwrap_or("-"),
                org.plan_status.as_str(),
                access.as_str(),
                org.cancel_at_period_end,
                optional(org.current_period_end),
                org.stripe_customer_id.as_deref().unwrap_or("-"),
                org.stripe_subscription_id.as_deref().unwrap_or("-"),
                org.state_event_id.as_deref().unwrap_or("-"),
                optional(org.state_event_created),
            );
        }
    }
    text
}

/// A processed event that was not replayed.
pub fn already_applied_text(details: &EventDetails) -> String {
    let last = details
        .decisions
        .iter()
        .rev()
        .find(|d| d.decision != Decision::Duplicate.as_str());
    match last {
        Some(d) => format!(
            "{} was already applied (decision {} at {}); use --force to run the rules on it again\n",
            details.event.id,
            d.decision,
            short_time(d.created_at)
        ),
        None => format!(
            "{} was already applied; use --force to run the rules on it again\n",
            details.event.id
        ),
    }
}

fn short_time(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_times_dates_and_ages() {
        let now = DateTime::parse_from_rfc3339("2026-11-21T03:00:00Z")
            .expect("valid")
            .with_timezone(&Utc);
        let at = |s: &str| parse_since(s, now).map(|t| t.to_rfc3339());
        assert_eq!(
            at("2026-11-20T10:30:00+01:00"),
            Ok("2026-11-20T09:30:00+00:00".into())
        );
        assert_eq!(at("2026-11-19"), Ok("2026-11-19T00:00:00+00:00".into()));
        assert_eq!(at("90s"), Ok("2026-11-21T02:58:30+00:00".into()));
        assert_eq!(at("30m"), Ok("2026-11-21T02:30:00+00:00".into()));
        assert_eq!(at("6h"), Ok("2026-11-20T21:00:00+00:00".into()));
        assert_eq!(at("7d"), Ok("2026-11-14T03:00:00+00:00".into()));
        for bad in [
            "",
            "yesterday",
            "5w",
            "-3h",
            "h",
            "2026-13-01",
            "99999999999999d",
        ] {
            let error = parse_since(bad, now).expect_err(bad);
            assert!(error.contains("is not a time"), "{bad}: {error}");
        }
    }
}
