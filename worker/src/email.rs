//! Sending the outbox's emails through Resend, and the consuming side of the email queue.
//!
//! [`send_outbox_email`] is the whole job, a plain async function over injected dependencies
//! (tests call it directly). Exactly once: a row already `sent` is not sent again, and every
//! Resend call carries the idempotency key `enterprise-request/<outbox id>`, so two runs of one
//! job racing each other (or a crash between Resend's answer and our commit) still make one
//! email; Resend keeps keys for 24 hours.
//!
//! Retry policy, two levels (the team's policy for events, mirrored):
//! - in process, with backon: up to [`SEND_TRIES`] tries of transient failures (timeout,
//!   transport, 429 after its `ratelimit-reset` when that is short, 5xx), spaced by short
//!   exponential delays;
//! - durable, in Postgres: when those tries are used up, the row counts the failed attempt
//!   and gets `retry_at = now() + Backoff::delay(attempts)`, and the job finishes successfully;
//!   the sweeper pushes a new job when `retry_at` comes. At `MAX_ATTEMPTS`, or at once for a
//!   permanent refusal (Resend's 4xx validation, authentication), the row is `dead` with
//!   Resend's message, for an operator to replay after fixing the cause.
//!
//! Only when Postgres itself fails (the outcome cannot be recorded) does the job fail, so that
//! apalis-redis retries it (until `MAX_ATTEMPTS` runs; then the row stays `pending` and the
//! sweeper finds it).
//!
//! The apalis wiring lives here rather than in `consume.rs` so the event consumer is left as
//! it is; both follow the same pattern and should move together on an apalis upgrade.

pub mod render;

use std::sync::Arc;
use std::time::Duration;

use crate::consume::{ConsumerSettings, run_until_stopped, worker_name};
use apalis::prelude::*;
use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use resend_rs::types::{CreateEmailBaseOptions, ErrorKind};
use resend_rs::{ConfigBuilder, Resend};
use secrecy::ExposeSecret;
use shared::config::EmailConfig;
use shared::db::email_outbox::{self, OutboxStatus};
use shared::db::enterprise_requests;
use shared::metrics::EMAILS;
use shared::queue::{EmailQueue, SendEmailV1};
use shared::retry::Backoff;
use sqlx::PgPool;
use tracing::Instrument;
use uuid::Uuid;

/// Tries of one Resend call within one job run.
pub const SEND_TRIES: usize = 3;
/// Delay before the second try (doubling, with jitter, up to [`MAX_TRY_DELAY`]).
const MIN_TRY_DELAY: Duration = Duration::from_millis(200);
/// Longest delay between two tries in process.
const MAX_TRY_DELAY: Duration = Duration::from_secs(2);
/// A 429 whose reset is further away than this is not waited for in process: the attempt is
/// recorded and retried durably, no earlier than the reset.
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(5);
/// One Resend call, connection included, may take this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What sending needs. Cheap to clone.
#[derive(Clone)]
pub struct EmailDeps {
    /// Postgres.
    pub pool: PgPool,
    /// The one Resend client of the process (it carries Resend's rate limiter).
    pub resend: Resend,
    /// `EMAIL_FROM`.
    pub from: String,
    /// `ENTERPRISE_SALES_EMAIL`.
    pub enterprise_sales: String,
    /// Spacing of durable retries.
    pub retry: Backoff,
    /// Failed attempts before a row is dead.
    pub max_attempts: i32,
}

/// Builds the process's Resend client, pointed at `RESEND_BASE_URL`.
pub fn resend_client(config: &EmailConfig) -> anyhow::Result<Resend> {
    let base_url = config
        .resend_base_url
        .parse()
        .map_err(|e| anyhow::anyhow!("RESEND_BASE_URL is invalid: {e}"))?;
    let config = ConfigBuilder::new(config.resend_api_key.expose_secret())
        .base_url(base_url)
        .build();
    Ok(Resend::with_config(config))
}

/// Why an email could not be sent now.
#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    /// The job names an outbox row that does not exist.
    #[error("outbox email {0} does not exist")]
    UnknownOutbox(Uuid),
    /// The outbox row names a request that does not exist.
    #[error("enterprise request {0} does not exist")]
    UnknownRequest(Uuid),
    /// Postgres failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Resend did not answer in time.
    #[error("resend did not answer within {0:?}")]
    Timeout(Duration),
    /// No answer from Resend (connection, TLS, body).
    #[error("resend request failed: {0}")]
    Transport(String),
    /// Resend's rate limit (429).
    #[error("resend rate limit reached{}", .reset.map(|r| format!(", resets in {r:?}")).unwrap_or_default())]
    RateLimited {
        /// When the limit resets (`ratelimit-reset`), if said.
        reset: Option<Duration>,
    },
    /// Resend answered with an error.
    #[error("resend answered {status} {name}: {message}")]
    Rejected {
        /// HTTP status Resend reported.
        status: u16,
        /// Resend's error name (`validation_error`, …).
        name: String,
        /// Resend's message.
        message: String,
    },
    /// An answer that could not be read (e.g. an HTML error page of a proxy).
    #[error("resend answer could not be read: {0}")]
    Unreadable(String),
}

impl EmailError {
    /// Retrying may succeed: database or network trouble, timeouts, rate limits, Resend's 5xx,
    /// and the 409s Resend says to retry. A 4xx refusal (validation, authentication, an
    /// idempotency key reused with another payload) never will.
    pub fn is_transient(&self) -> bool {
        match self {
            EmailError::Database(_)
            | EmailError::Timeout(_)
            | EmailError::Transport(_)
            | EmailError::RateLimited { .. }
            | EmailError::Unreadable(_) => true,
            EmailError::Rejected { status, name, .. } => {
                *status >= 500
                    || *status == 429
                    || matches!(
                        ErrorKind::from(name.as_str()),
                        ErrorKind::ConcurrentIdempotentRequests | ErrorKind::ResourceLocked
                    )
            }
            EmailError::UnknownOutbox(_) | EmailError::UnknownRequest(_) => false,
        }
    }

    fn from_resend(error: resend_rs::Error) -> EmailError {
        match error {
            resend_rs::Error::Http(e) => EmailError::Transport(e.to_string()),
            resend_rs::Error::Resend(e) => EmailError::Rejected {
                status: e.status_code,
                name: e.name,
                message: e.message,
            },
            resend_rs::Error::RateLimit {
                ratelimit_reset, ..
            } => EmailError::RateLimited {
                reset: ratelimit_reset.map(Duration::from_secs),
            },
            resend_rs::Error::Parse { message, .. } => {
                EmailError::Unreadable(message.chars().take(200).collect())
            }
            other => EmailError::Rejected {
                status: 0,
                name: "client_error".into(),
                message: other.to_string(),
            },
        }
    }
}

/// What a run of the job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmailReport {
    /// Resend accepted it.
    Sent {
        /// Resend's email id.
        resend_email_id: String,
    },
    /// Already sent or dead: nothing to do (a repeated or stale job).
    AlreadyDone(OutboxStatus),
    /// A failed attempt is waiting for its retry time; this job came early.
    NotDue {
        /// When the retry is due.
        retry_at: DateTime<Utc>,
    },
    /// Failed transiently; the sweeper retries at `retry_at`.
    RetryScheduled {
        /// Failed attempts so far.
        attempts: i32,
        /// When the next attempt is due.
        retry_at: Option<DateTime<Utc>>,
        /// Why it failed.
        error: String,
    },
    /// Gave up: a dead letter.
    Dead {
        /// Why.
        reason: String,
    },
}

impl EmailReport {
    /// The `outcome` label of the metric.
    pub fn outcome(&self) -> &'static str {
        match self {
            EmailReport::Sent { .. } => "sent",
            EmailReport::AlreadyDone(_) => "already_done",
            EmailReport::NotDue { .. } => "not_due",
            EmailReport::RetryScheduled { .. } => "retry_scheduled",
            EmailReport::Dead { .. } => "dead",
        }
    }
}

/// The Resend idempotency key of an outbox row.
pub fn idempotency_key(outbox_id: Uuid) -> String {
    format!("enterprise-request/{outbox_id}")
}

/// Sends one outbox email and records the outcome on its row (see the module docs). An `Err`
/// means the outcome could not be recorded (or the row does not exist).
pub async fn send_outbox_email(
    deps: &EmailDeps,
    outbox_id: Uuid,
) -> Result<EmailReport, EmailError> {
    let row = email_outbox::get(&deps.pool, outbox_id)
        .await?
        .ok_or(EmailError::UnknownOutbox(outbox_id))?;
    if row.status != OutboxStatus::Pending {
        return Ok(EmailReport::AlreadyDone(row.status));
    }
    if let Some(retry_at) = row.retry_at.filter(|at| *at > Utc::now()) {
        return Ok(EmailReport::NotDue { retry_at });
    }
    let request = enterprise_requests::get(&deps.pool, row.request_id)
        .await?
        .ok_or(EmailError::UnknownRequest(row.request_id))?;
    let email = render::enterprise_request(&request);
    let options = CreateEmailBaseOptions::new(
        deps.from.as_str(),
        [deps.enterprise_sales.as_str()],
        email.subject.as_str(),
    )
    .with_html(&email.html)
    .with_text(&email.text)
    .with_reply(&request.admin_email)
    .with_idempotency_key(&idempotency_key(outbox_id));

    let sent = (|| async {
        tokio::time::timeout(REQUEST_TIMEOUT, deps.resend.emails.send(options.clone()))
            .await
            .map_err(|_| EmailError::Timeout(REQUEST_TIMEOUT))?
            .map_err(EmailError::from_resend)
    })
    .retry(
        ExponentialBuilder::default()
            .with_min_delay(MIN_TRY_DELAY)
            .with_max_delay(MAX_TRY_DELAY)
            .with_max_times(SEND_TRIES - 1)
            .with_jitter(),
    )
    .sleep(tokio::time::sleep)
    .when(EmailError::is_transient)
    .adjust(|error, delay| match (error, delay) {
        // Out of tries: stop whatever the error.
        (_, None) => None,
        (EmailError::RateLimited { reset: Some(reset) }, Some(_)) => {
            (*reset <= MAX_RATE_LIMIT_WAIT).then_some(*reset)
        }
        (_, delay) => delay,
    })
    .notify(|error, delay| {
        tracing::warn!(outbox.id = %outbox_id, error = %error, retry_in = ?delay, "sending failed; trying again");
    })
    .await;

    let error = match sent {
        Ok(response) => {
            email_outbox::mark_sent(&deps.pool, outbox_id, &response.id).await?;
            return Ok(EmailReport::Sent {
                resend_email_id: response.id.to_string(),
            });
        }
        Err(error) => error,
    };
    let reason = error.to_string();
    if !error.is_transient() {
        email_outbox::mark_dead(&deps.pool, outbox_id, &reason).await?;
        return Ok(EmailReport::Dead { reason });
    }
    let failures = u32::try_from(row.attempts.saturating_add(1)).unwrap_or(1);
    let mut retry_in = deps.retry.delay(failures);
    if let EmailError::RateLimited { reset: Some(reset) } = &error {
        retry_in = retry_in.max(*reset);
    }
    let recorded =
        email_outbox::record_failure(&deps.pool, outbox_id, &reason, retry_in, deps.max_attempts)
            .await?;
    Ok(match recorded {
        Some(failure) if failure.status == OutboxStatus::Dead => EmailReport::Dead { reason },
        Some(failure) => EmailReport::RetryScheduled {
            attempts: failure.attempts,
            retry_at: failure.retry_at,
            error: reason,
        },
        // Sent or dead meanwhile by a concurrent run: its outcome stands.
        None => EmailReport::AlreadyDone(
            email_outbox::get(&deps.pool, outbox_id)
                .await?
                .map_or(OutboxStatus::Pending, |row| row.status),
        ),
    })
}

/// Consumes the email queue until `shutdown` resolves; in-flight jobs finish first (within
/// [`SHUTDOWN_DEADLINE`](crate::consume::SHUTDOWN_DEADLINE)).
/// Returns an error if the worker stops by itself (e.g. Redis failed), so the process exits
/// non-zero and its supervisor restarts it.
pub async fn run(
    deps: EmailDeps,
    queue: &EmailQueue,
    settings: &ConsumerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let name = worker_name("email-worker");
    tracing::info!(worker = %name, concurrency = settings.concurrency, "consuming emails");
    let storage = queue
        .consumer_storage(settings.concurrency)
        .poll_with_interval(settings.poll_interval);
    let worker = WorkerBuilder::new(name.clone())
        .backend(storage)
        .data(Arc::new(deps))
        .concurrency(settings.concurrency)
        .parallelize(tokio::spawn)
        .build(handle);
    run_until_stopped(&name, |signal| worker.run_until(signal), shutdown).await
}

async fn handle(
    job: SendEmailV1,
    deps: Data<Arc<EmailDeps>>,
    attempt: Attempt,
) -> Result<(), BoxDynError> {
    let span = tracing::info_span!("send_email", outbox.id = %job.outbox_id);
    let result = send_outbox_email(&deps, job.outbox_id)
        .instrument(span)
        .await;
    match result {
        Ok(report) => {
            metrics::counter!(EMAILS, "outcome" => report.outcome()).increment(1);
            match &report {
                EmailReport::Sent { resend_email_id } => {
                    tracing::info!(outbox.id = %job.outbox_id, resend.id = %resend_email_id, "email sent");
                }
                EmailReport::RetryScheduled {
                    attempts,
                    retry_at,
                    error,
                } => {
                    tracing::warn!(outbox.id = %job.outbox_id, attempts, retry_at = ?retry_at, error = %error, "email not sent; retry scheduled");
                }
                EmailReport::Dead { reason } => {
                    tracing::error!(outbox.id = %job.outbox_id, reason = %reason, "email is a dead letter");
                }
                EmailReport::AlreadyDone(_) | EmailReport::NotDue { .. } => {
                    tracing::info!(outbox.id = %job.outbox_id, outcome = report.outcome(), "nothing to send");
                }
            }
            Ok(())
        }
        Err(error) => {
            metrics::counter!(EMAILS, "outcome" => "failed").increment(1);
            let retry = error.is_transient()
                && attempt.current() < usize::try_from(deps.max_attempts).unwrap_or(0);
            if retry {
                tracing::warn!(outbox.id = %job.outbox_id, error = %error, "email outcome not recorded; apalis retries the job");
                Err(error.into())
            } else {
                tracing::error!(outbox.id = %job.outbox_id, error = %error, "email job abandoned; the row (if any) stays for the sweeper");
                Err(AbortError::new(error).into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(status: u16, name: &str) -> EmailError {
        EmailError::Rejected {
            status,
            name: name.into(),
            message: "…".into(),
        }
    }

    #[test]
    fn server_errors_rate_limits_and_network_trouble_are_transient() {
        for error in [
            rejected(500, "application_error"),
            rejected(503, "service_unavailable"),
            rejected(409, "concurrent_idempotent_requests"),
            rejected(409, "resource_locked"),
            EmailError::RateLimited { reset: None },
            EmailError::Timeout(REQUEST_TIMEOUT),
            EmailError::Transport("connection refused".into()),
            EmailError::Unreadable("<html>bad gateway</html>".into()),
        ] {
            assert!(error.is_transient(), "{error}");
        }
    }

    #[test]
    fn refusals_of_the_request_itself_are_permanent() {
        for error in [
            rejected(422, "validation_error"),
            rejected(400, "invalid_idempotency_key"),
            rejected(401, "missing_api_key"),
            rejected(403, "invalid_api_key"),
            rejected(409, "invalid_idempotent_request"),
            EmailError::UnknownOutbox(Uuid::nil()),
        ] {
            assert!(!error.is_transient(), "{error}");
        }
    }

    #[test]
    fn the_idempotency_key_is_derived_from_the_outbox_row() {
        assert_eq!(
            idempotency_key(Uuid::nil()),
            "enterprise-request/00000000-0000-0000-0000-000000000000"
        );
    }
}
