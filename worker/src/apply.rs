//! Applying stored events, a batch of them in ONE Postgres transaction (a batch of one for an
//! operator's replay): claim the events in `processed_events` (already there → `duplicate`,
//! nothing else happens), lock the customer links and organization rows they concern, decide
//! each event in turn with the rules of `shared::billing` on those rows in memory, then write
//! the changed organizations, the inbox statuses and the audit rows, a statement each. Either
//! all of it commits or none of it does, so a crash anywhere leaves the events to be applied
//! again by the next delivery of their jobs. About ten round trips per batch, whatever its
//! size: that is what lets one worker apply thousands of events a second.
//!
//! Lock order is always `processed_events` rows, then customer-link locks, then organization
//! rows, each kind in sorted order, so two batches never deadlock; two events of one
//! organization (or one customer) are applied one after the other.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::billing::{self, BillingChange, BillingState, Outcome, PlanStatus, Precedence};
use shared::db::billing_audit::{self, Decision, NewAuditEntry};
use shared::db::organizations::Organization;
use shared::db::webhook_events::StoredEvent;
use shared::db::{organizations, processed_events, webhook_events};
use shared::queue::EventQueue;
use shared::retry::Backoff;
use shared::stripe::{self, CheckoutLink, Event, Interpretation as Facts, PlanMapping};
use sqlx::{PgPool, Postgres, Transaction};

use crate::stripe_api::{StripeApi, StripeApiError};

/// What applying needs.
#[derive(Clone)]
pub struct Deps {
    /// Postgres.
    pub pool: PgPool,
    /// Price and product keys of the plans.
    pub plans: PlanMapping,
    /// Set when `STRIPE_SECRET_KEY` is: ties are settled by refetching.
    pub stripe: Option<StripeApi>,
    /// To enqueue deferred events released by a new link.
    pub queue: EventQueue,
    /// Retry and deferral limits.
    pub policy: Policy,
}

/// When to try again and when to give up.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Failed attempts before an event becomes a dead letter.
    pub max_attempts: i32,
    /// Spacing of retries, after failures and deferrals alike.
    pub retry: Backoff,
    /// How long an event may wait for its organization before it becomes a dead letter.
    pub deferral_window: Duration,
}

/// How [`apply_event`] runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Run the rules even if the event was already processed (an operator's `--force`).
    pub force: bool,
    /// Decide, report, and roll everything back (an operator's `--dry-run`).
    pub dry_run: bool,
}

/// Why an event could not be applied now.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The job names an event that is not in the inbox.
    #[error("event {0} is not in the inbox")]
    UnknownEvent(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A checkout links a customer that already belongs to another organization.
    #[error(
        "customer {customer_id} is already linked to organization {owner}, not {organization_id}"
    )]
    CustomerConflict {
        /// The customer.
        customer_id: String,
        /// Its current organization.
        owner: String,
        /// The organization the event names.
        organization_id: String,
    },
    /// Refetching from Stripe failed.
    #[error(transparent)]
    StripeApi(#[from] StripeApiError),
    /// The applier stopped before answering (shutting down, or it panicked).
    #[error("the applier stopped before answering")]
    Stopped,
}

impl ApplyError {
    /// Retrying later may succeed (database or network trouble); otherwise it never will.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Database(_) | ApplyError::Stopped => true,
            ApplyError::StripeApi(e) => e.is_transient(),
            ApplyError::UnknownEvent(_) | ApplyError::CustomerConflict { .. } => false,
        }
    }
}

/// The decision taken on an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// What was decided.
    pub decision: Decision,
    /// The organization concerned, when resolved.
    pub organization_id: Option<String>,
    /// Plan status before the decision.
    pub status_before: Option<PlanStatus>,
    /// Plan status after the decision.
    pub status_after: Option<PlanStatus>,
    /// Why, in words.
    pub detail: Option<String>,
    /// When ingest stored the event.
    pub received_at: DateTime<Utc>,
}

impl Report {
    fn from_verdict(verdict: Verdict, stored: &StoredEvent) -> Report {
        Report {
            decision: verdict.decision,
            organization_id: verdict.organization_id,
            status_before: verdict.status_before,
            status_after: verdict.status_after,
            detail: verdict.detail,
            received_at: stored.received_at,
        }
    }
}

/// One decision, before it is written.
struct Verdict {
    decision: Decision,
    organization_id: Option<String>,
    status_before: Option<PlanStatus>,
    status_after: Option<PlanStatus>,
    detail: Option<String>,
    /// Deferred: the customer whose link the event waits for.
    waiting_for_customer: Option<String>,
    /// A customer linked by this event: its deferred events are released.
    linked_customer: Option<String>,
}

impl Verdict {
    fn bare(decision: Decision, detail: impl Into<String>) -> Verdict {
        Verdict {
            decision,
            organization_id: None,
            status_before: None,
            status_after: None,
            detail: Some(detail.into()),
            waiting_for_customer: None,
            linked_customer: None,
        }
    }
}

/// Applies one stored event. Idempotent: any number of runs, in any order, concurrently,
/// leave the same state as one.
pub async fn apply_event(
    deps: &Deps,
    event_id: &str,
    options: ApplyOptions,
) -> Result<Report, ApplyError> {
    let mut reports = apply_events(deps, &[event_id], options).await?;
    Ok(reports.remove(0))
}

/// Applies stored events in ONE transaction, one after the other in the order given, each
/// exactly as [`apply_event`] would alone; returns a report per id, in that order. Any error
/// rolls all of them back. An id given twice is applied once; the repeat is reported a
/// duplicate without an audit row of its own.
pub async fn apply_events(
    deps: &Deps,
    event_ids: &[&str],
    options: ApplyOptions,
) -> Result<Vec<Report>, ApplyError> {
    let mut unique = event_ids.to_vec();
    unique.sort_unstable();
    unique.dedup();
    let mut tx = deps.pool.begin().await?;
    let claims = webhook_events::get_and_claim(&mut *tx, &unique).await?;
    let position: HashMap<&str, usize> = claims
        .iter()
        .enumerate()
        .map(|(n, (stored, _))| (stored.id.as_str(), n))
        .collect();
    // Each stored event once, in the order given, with what its rules say before any lock.
    let mut seen = vec![false; claims.len()];
    let mut work = Vec::with_capacity(claims.len());
    let mut repeats = Vec::new();
    for (at, id) in event_ids.iter().enumerate() {
        let n = *position
            .get(id)
            .ok_or_else(|| ApplyError::UnknownEvent((*id).to_owned()))?;
        if std::mem::replace(&mut seen[n], true) {
            repeats.push((at, n));
            continue;
        }
        let (stored, claimed) = &claims[n];
        let reading = if *claimed || options.force {
            read(stored, &deps.plans)
        } else {
            Err(Verdict::bare(Decision::Duplicate, "already processed"))
        };
        work.push((at, stored, reading));
    }
    let mut orgs = Locked::take(&mut tx, &work).await?;
    let mut settled = Vec::with_capacity(work.len());
    for (at, stored, reading) in work {
        let verdict = match reading {
            Ok(facts) => decide(&mut orgs, deps, stored, facts).await?,
            Err(verdict) => verdict,
        };
        settled.push((
            at,
            stored,
            within_deferral_window(verdict, stored, &deps.policy),
        ));
    }
    orgs.save(&mut tx).await?;
    let released = record(&mut tx, &deps.policy, &settled).await?;
    if options.dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
        enqueue_released(&deps.queue, &released).await;
    }

    let mut reports: Vec<Option<Report>> = vec![None; event_ids.len()];
    for (at, stored, verdict) in settled {
        reports[at] = Some(Report::from_verdict(verdict, stored));
    }
    for (at, n) in repeats {
        let verdict = Verdict::bare(Decision::Duplicate, "repeated in one batch");
        reports[at] = Some(Report::from_verdict(verdict, &claims[n].0));
    }
    Ok(reports.into_iter().flatten().collect())
}

/// A deferral past the policy's window becomes a dead letter. A dead letter being replayed
/// starts a fresh window.
fn within_deferral_window(mut verdict: Verdict, stored: &StoredEvent, policy: &Policy) -> Verdict {
    let deferred_since = stored.deferred_since.filter(|_| stored.status != "dead");
    if verdict.decision == Decision::Deferred
        && let Some(since) = deferred_since
        && Utc::now() - since >= delta(policy.deferral_window)
    {
        verdict.decision = Decision::Dead;
        verdict.detail = Some(format!(
            "{}; gave up after waiting since {since} ({} deferrals)",
            verdict
                .detail
                .as_deref()
                .unwrap_or("organization not resolved"),
            stored.deferrals
        ));
    }
    verdict
}

/// Writes the decisions: inbox statuses, released deferrals and audit rows. Returns the ids of
/// the deferred events released by new links, to enqueue after commit.
async fn record(
    tx: &mut Transaction<'static, Postgres>,
    policy: &Policy,
    settled: &[(usize, &StoredEvent, Verdict)],
) -> Result<Vec<String>, sqlx::Error> {
    let mut processed = Vec::with_capacity(settled.len());
    for (_, stored, verdict) in settled {
        let id = stored.id.as_str();
        let detail = verdict.detail.as_deref();
        match verdict.decision {
            // Claimed before means processed; heals a row a failed concurrent job left pending.
            Decision::Duplicate if stored.status == "processed" => {}
            Decision::Deferred => {
                processed_events::delete(&mut **tx, id).await?;
                let retry_at = after(policy.retry.delay(stored.deferrals as u32 + 1));
                webhook_events::mark_deferred(
                    &mut **tx,
                    id,
                    verdict.waiting_for_customer.as_deref(),
                    detail.unwrap_or("organization not resolved yet"),
                    retry_at,
                )
                .await?;
            }
            Decision::Dead => {
                processed_events::delete(&mut **tx, id).await?;
                webhook_events::mark_dead(&mut **tx, id, detail.unwrap_or("gave up")).await?;
            }
            _ => processed.push(id),
        }
    }
    if !processed.is_empty() {
        webhook_events::mark_processed(&mut **tx, &processed).await?;
    }
    // After the deferrals above: an event deferred earlier in this batch is released too.
    let linked: Vec<&str> = settled
        .iter()
        .filter_map(|(_, _, verdict)| verdict.linked_customer.as_deref())
        .collect();
    let released = if linked.is_empty() {
        Vec::new()
    } else {
        webhook_events::release_deferred(&mut **tx, &linked).await?
    };
    let entries: Vec<NewAuditEntry<'_>> = settled
        .iter()
        .map(|(_, stored, verdict)| NewAuditEntry {
            event_id: &stored.id,
            event_type: &stored.event_type,
            organization_id: verdict.organization_id.as_deref(),
            decision: verdict.decision,
            status_before: verdict.status_before,
            status_after: verdict.status_after,
            detail: verdict.detail.as_deref(),
        })
        .collect();
    billing_audit::insert(&mut **tx, &entries).await?;
    Ok(released)
}

/// Enqueues deferred events released by a new link; if that fails the sweeper enqueues them.
async fn enqueue_released(queue: &EventQueue, released: &[String]) {
    if released.is_empty() {
        return;
    }
    let ids: Vec<&str> = released.iter().map(String::as_str).collect();
    tracing::info!(
        count = ids.len(),
        "released deferred events of a newly linked customer"
    );
    if let Err(e) = queue.push(&ids).await {
        tracing::warn!(error = %e, "released events not enqueued; the sweeper will enqueue them");
    }
}

/// What happened after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureOutcome {
    /// The event stays pending and is due again then.
    RetryAt(DateTime<Utc>),
    /// The event is a dead letter now.
    Dead,
}

/// Records a failed attempt in one transaction: the attempt count and error, then either the
/// next attempt time (transient, under the limit) or a dead letter with an audit row.
pub async fn record_failure(
    deps: &Deps,
    event_id: &str,
    error: &ApplyError,
) -> Result<FailureOutcome, sqlx::Error> {
    let message = error.to_string();
    let mut tx = deps.pool.begin().await?;
    let Some(attempts) = webhook_events::record_failure(&mut *tx, event_id, &message).await? else {
        // Not in the inbox: nothing to retry and nothing to keep.
        return Ok(FailureOutcome::Dead);
    };
    let outcome = if error.is_transient() && attempts < deps.policy.max_attempts {
        let at = after(deps.policy.retry.delay(attempts as u32));
        webhook_events::schedule_retry(&mut *tx, event_id, at).await?;
        FailureOutcome::RetryAt(at)
    } else {
        let reason = format!("{message} (after {attempts} attempts)");
        if let Some(event_type) = webhook_events::mark_dead(&mut *tx, event_id, &reason).await? {
            billing_audit::insert(
                &mut *tx,
                &[NewAuditEntry {
                    event_id,
                    event_type: &event_type,
                    organization_id: None,
                    decision: Decision::Dead,
                    status_before: None,
                    status_after: None,
                    detail: Some(&reason),
                }],
            )
            .await?;
        }
        FailureOutcome::Dead
    };
    tx.commit().await?;
    Ok(outcome)
}

/// `now + delay`.
fn after(delay: Duration) -> DateTime<Utc> {
    Utc::now() + delta(delay)
}

/// A std duration as a chrono one, saturating (configured durations are far below the limit).
fn delta(duration: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(duration).unwrap_or(chrono::TimeDelta::MAX)
}

/// What an event says, read without the database; `Err` is the verdict on an event that
/// cannot change billing state.
fn read(stored: &StoredEvent, plans: &PlanMapping) -> Result<Facts, Verdict> {
    let event: Event = serde_json::from_slice(&stored.payload).map_err(|e| {
        Verdict::bare(
            Decision::Ignored,
            format!("payload is not a Stripe event: {e}"),
        )
    })?;
    stripe::interpret(&event, plans)
        .map_err(|ignored| Verdict::bare(Decision::Ignored, ignored.to_string()))
}

/// The organizations a batch's events concern, locked for the whole transaction and changed
/// in memory; [`Locked::save`] writes the changed ones.
struct Locked {
    orgs: Vec<Organization>,
    changed: Vec<bool>,
}

impl Locked {
    /// Locks the customer links the events name, then creates the organizations they name
    /// and locks those and the ones linked to their customers; each kind of lock in sorted
    /// order, customer links first, so concurrent batches never deadlock.
    async fn take(
        tx: &mut Transaction<'static, Postgres>,
        work: &[(usize, &StoredEvent, Result<Facts, Verdict>)],
    ) -> Result<Locked, sqlx::Error> {
        let sorted = |field: fn(&Facts) -> Option<&str>| -> Vec<&str> {
            let mut values: Vec<&str> = work
                .iter()
                .filter_map(|(_, _, reading)| field(reading.as_ref().ok()?))
                .collect();
            values.sort_unstable();
            values.dedup();
            values
        };
        let customers = sorted(|facts| facts.customer_id.as_deref());
        let ids = sorted(|facts| facts.organization_id.as_deref());
        if !customers.is_empty() {
            organizations::lock_customer_links(&mut **tx, &customers).await?;
        }
        if !ids.is_empty() {
            organizations::ensure_exist(&mut **tx, &ids).await?;
        }
        let orgs = if ids.is_empty() && customers.is_empty() {
            Vec::new()
        } else {
            organizations::lock(&mut **tx, &ids, &customers).await?
        };
        Ok(Locked {
            changed: vec![false; orgs.len()],
            orgs,
        })
    }

    fn find(&self, matches: impl Fn(&Organization) -> bool) -> Option<usize> {
        self.orgs.iter().position(matches)
    }

    /// The organization, to change.
    fn edit(&mut self, at: usize) -> &mut Organization {
        self.changed[at] = true;
        &mut self.orgs[at]
    }

    async fn save(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), sqlx::Error> {
        let changed: Vec<&Organization> = self
            .orgs
            .iter()
            .zip(&self.changed)
            .filter_map(|(org, changed)| changed.then_some(org))
            .collect();
        if !changed.is_empty() {
            organizations::save(&mut **tx, &changed).await?;
        }
        Ok(())
    }
}

/// Everything between the claim and the writes of the inbox status and audit row, on the
/// batch's locked organizations.
async fn decide(
    orgs: &mut Locked,
    deps: &Deps,
    stored: &StoredEvent,
    facts: Facts,
) -> Result<Verdict, ApplyError> {
    let at = match (&facts.organization_id, &facts.customer_id) {
        (Some(id), _) => orgs.find(|org| &org.id == id),
        (None, Some(customer)) => {
            orgs.find(|org| org.stripe_customer_id.as_ref() == Some(customer))
        }
        (None, None) => None,
    };
    let Some(at) = at else {
        return Ok(match facts.customer_id {
            Some(customer) => Verdict {
                waiting_for_customer: Some(customer.clone()),
                ..Verdict::bare(
                    Decision::Deferred,
                    format!("no organization is linked to customer {customer} yet"),
                )
            },
            None => Verdict::bare(
                Decision::Ignored,
                "event names neither an organization nor a customer",
            ),
        });
    };

    let linked_customer = match &facts.customer_id {
        Some(customer) => link(orgs, at, customer, facts.link.as_ref())?,
        None => None,
    };
    let org = &orgs.orgs[at];
    let mut verdict = Verdict {
        decision: Decision::Applied,
        organization_id: Some(org.id.clone()),
        status_before: Some(org.plan_status),
        status_after: Some(org.plan_status),
        detail: None,
        waiting_for_customer: None,
        linked_customer,
    };
    let Some(change) = facts.change else {
        verdict.detail = Some(match &verdict.linked_customer {
            Some(customer) => format!("linked customer {customer}"),
            None => "nothing to change".to_owned(),
        });
        return Ok(verdict);
    };

    let current = org.billing_state();
    let (decision, outcome) =
        match billing::precedence(stored.stripe_created, org.state_event_created) {
            Precedence::Newer => (Decision::Applied, billing::apply_change(&current, &change)),
            Precedence::Older => {
                let reason = match billing::fill_in(&current, &change) {
                    Some(filled) => {
                        let org = orgs.edit(at);
                        org.plan = filled.plan;
                        org.current_period_end = filled.current_period_end;
                        "older than the event behind the stored state; it filled in the plan \
                         and period end that state lacked"
                    }
                    None => "older than the event behind the stored state",
                };
                (Decision::Stale, Outcome::Unchanged(reason))
            }
            Precedence::Tie => settle_tie(deps, &current, &change).await?,
        };
    match outcome {
        Outcome::Changed(state) => {
            verdict.status_after = Some(state.plan_status);
            verdict.detail = None;
            orgs.edit(at).set_billing_state(state, stored);
        }
        Outcome::Unchanged(reason) => verdict.detail = Some(reason.to_owned()),
    }
    verdict.decision = match (decision, &verdict.detail) {
        // A newer event that cannot change this state (e.g. an invoice of another subscription).
        (Decision::Applied, Some(_)) => Decision::Ignored,
        (decision, _) => decision,
    };
    Ok(verdict)
}

/// Settles a same-second tie: from Stripe's current subscription when the API is configured,
/// otherwise by the lifecycle rule of [`billing::tie_prefers`].
async fn settle_tie(
    deps: &Deps,
    current: &BillingState,
    change: &BillingChange,
) -> Result<(Decision, Outcome), ApplyError> {
    let subscription_id = match change {
        BillingChange::Subscription(next) => next.subscription_id.as_deref(),
        BillingChange::InvoicePaid {
            subscription_id, ..
        }
        | BillingChange::InvoicePaymentFailed {
            subscription_id, ..
        } => Some(subscription_id.as_str()),
        BillingChange::LifetimePurchase => None,
    };
    if let (Some(api), Some(id)) = (&deps.stripe, subscription_id) {
        let subscription = api.subscription(id).await?;
        if let Some(truth) = stripe::subscription_state(&subscription, &deps.plans) {
            let outcome = billing::apply_change(current, &BillingChange::Subscription(truth));
            return Ok((Decision::Refetched, outcome));
        }
    }
    let outcome = match billing::apply_change(current, change) {
        Outcome::Changed(next) if !billing::tie_prefers(current.plan_status, next.plan_status) => {
            Outcome::Unchanged("same-second tie: the stored status is further along the lifecycle")
        }
        outcome => outcome,
    };
    Ok((Decision::Tie, outcome))
}

/// Links the customer to the organization when the event says so. A checkout links
/// explicitly (a customer owned by another organization is an error); any other event links
/// only an organization that has no customer yet. Returns the customer newly linked.
fn link(
    orgs: &mut Locked,
    at: usize,
    customer_id: &str,
    checkout: Option<&CheckoutLink>,
) -> Result<Option<String>, ApplyError> {
    let org = &orgs.orgs[at];
    let already_linked = org.stripe_customer_id.as_deref() == Some(customer_id);
    if checkout.is_none() && org.stripe_customer_id.is_some() {
        return Ok(None);
    }
    if !already_linked
        && let Some(owner) =
            orgs.find(|other| other.stripe_customer_id.as_deref() == Some(customer_id))
    {
        if checkout.is_none() {
            return Ok(None);
        }
        return Err(ApplyError::CustomerConflict {
            customer_id: customer_id.to_owned(),
            owner: orgs.orgs[owner].id.clone(),
            organization_id: org.id.clone(),
        });
    }
    let org = orgs.edit(at);
    org.stripe_customer_id = Some(customer_id.to_owned());
    if let Some(checkout) = checkout {
        if org.stripe_subscription_id.is_none() {
            org.stripe_subscription_id = checkout.subscription_id.clone();
        }
        if checkout.billing_email.is_some() {
            org.billing_email = checkout.billing_email.clone();
        }
    }
    Ok((!already_linked).then(|| customer_id.to_owned()))
}
