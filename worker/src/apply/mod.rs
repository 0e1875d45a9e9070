//! Applying stored events, a batch of them in ONE Postgres transaction (a batch of one for an
//! operator's replay): claim the events by marking their inbox rows `processed` (already
//! processed → `duplicate`, nothing else happens; `processed_events` is a view of that
//! status), lock the customer links, organization rows, subscription rows and payment rows
//! they concern ([`batch`]), decide each event in turn with the rules of `shared::billing` on
//! those rows in memory ([`decide`]), then write the changed subscriptions and organizations,
//! the statuses of events not decided after all (deferred, dead) and the audit rows, a
//! statement each. Either all of it commits or none of it does, so a crash anywhere leaves
//! the events to be applied again by the next delivery of their jobs. About ten round trips
//! per batch, whatever its size: that is what lets one worker apply thousands of events a
//! second.
//!
//! Lock order is always inbox rows, then customer-link locks, then payment-key locks, then
//! organization rows, then subscription rows, then payment rows, each kind in sorted order,
//! so two batches never deadlock;
//! two events of one organization (or one customer) are applied one after the other. No
//! Stripe API call is made while a transaction is open (see [`ties`]).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::billing::PlanStatus;
use shared::billing::payment::RefundPolicy;
use shared::billing::subscription::SubscriptionChange;
use shared::config::StripeMode;
use shared::db::billing_audit::Decision;
use shared::db::webhook_events;
use shared::db::webhook_events::StoredEvent;
use shared::metrics::{PAYMENTS, UNMAPPED_PRICES};
use shared::queue::EventQueue;
use shared::retry::Backoff;
use shared::stripe::{self, BillingChange, Event, Interpretation as Facts, PlanMapping};
use shared::stripe_api::{StripeApiError, StripeClient};
use sqlx::PgPool;

use crate::lookup::CustomerLookup;

use self::batch::Locked;
use self::decide::{Refetched, Ties, Verdict, decide};

pub(crate) mod batch;
mod decide;
mod record;
mod ties;

pub use self::record::{FailureOutcome, record_failure};
use self::record::{record, within_deferral_window};

/// What applying needs.
#[derive(Clone)]
pub struct Deps {
    /// Postgres.
    pub pool: PgPool,
    /// Price and product keys of the plans.
    pub plans: PlanMapping,
    /// Set when `STRIPE_SECRET_KEY` is: ties are settled by refetching.
    pub stripe: Option<StripeClient>,
    /// To enqueue deferred events released by a new link.
    pub queue: EventQueue,
    /// Retry and deferral limits.
    pub policy: Policy,
    /// `REFUND_REVOKES_ACCESS`: whether a full refund or a lost dispute revokes lifetime
    /// access.
    pub refunds: RefundPolicy,
    /// `STRIPE_MODE`: events of the other mode are `ignored`.
    pub mode: Option<StripeMode>,
    /// Set when `STRIPE_SECRET_KEY` is: asks Stripe which organization a waiting customer
    /// belongs to.
    pub lookup: Option<CustomerLookup>,
}

/// When to try again and when to give up.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Failed attempts before an event becomes a dead letter.
    pub max_attempts: i32,
    /// Spacing of retries after failures.
    pub retry: Backoff,
    /// Spacing of the checks of a deferred event (sparse: minutes to hours), capped so the
    /// last check falls at the end of its window.
    pub deferral_recheck: Backoff,
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
    StripeApi(Box<StripeApiError>),
    /// The applier stopped before answering (shutting down, or it panicked).
    #[error("the applier stopped before answering")]
    Stopped,
    /// A same-second tie was refetched, but the subscription's status moved on meanwhile.
    #[error("subscription {0} changed while its tie was refetched; retried")]
    TieMoved(String),
    /// A payment's row was claimed by an organization this transaction had not locked (a
    /// concurrent checkout); retried.
    #[error("payment claimed by organization {0} meanwhile; retried")]
    PaymentMoved(String),
}

impl From<StripeApiError> for ApplyError {
    fn from(error: StripeApiError) -> ApplyError {
        ApplyError::StripeApi(Box::new(error))
    }
}

impl ApplyError {
    /// Retrying later may succeed (database or network trouble); otherwise it never will.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Database(_)
            | ApplyError::Stopped
            | ApplyError::TieMoved(_)
            | ApplyError::PaymentMoved(_) => true,
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

/// Applies one stored event. Idempotent: any number of runs, in any order, concurrently,
/// leave the same state as one.
pub async fn apply_event(
    deps: &Deps,
    event_id: &str,
    options: ApplyOptions,
) -> Result<Report, ApplyError> {
    apply_events(deps, &[event_id], options).await?.remove(0)
}

/// Applies stored events in ONE transaction, one after the other in the order given, each
/// exactly as [`apply_event`] would alone; returns a result per id, in that order. An error
/// of the transaction (`Err`) rolls all of them back. An id given twice is applied once; the
/// repeat is reported a duplicate without an audit row of its own.
///
/// An event that ties its subscription's status while the Stripe API is configured is left
/// out of that transaction; the subscription is fetched once the transaction has committed
/// (no lock is held during the call), and the event is applied again with Stripe's answer in
/// a transaction of its own. A failed fetch fails that event alone (its `Err` in the result).
pub async fn apply_events(
    deps: &Deps,
    event_ids: &[&str],
    options: ApplyOptions,
) -> Result<Vec<Result<Report, ApplyError>>, ApplyError> {
    apply_events_releasing(deps, event_ids, options, || {}).await
}

/// [`apply_events`], calling `committed` once the first transaction has committed and before
/// any Stripe call (see `ties`): group apply frees its transaction slot there, so a batch
/// waiting for the API (at its rate limit) does not hold back the batches behind it.
pub async fn apply_events_releasing(
    deps: &Deps,
    event_ids: &[&str],
    options: ApplyOptions,
    committed: impl FnOnce(),
) -> Result<Vec<Result<Report, ApplyError>>, ApplyError> {
    let mut results = apply_once(deps, event_ids, options, &Refetched::new()).await?;
    committed();
    ties::settle(deps, event_ids, options, &mut results).await?;
    Ok(results.into_iter().map(Pass::into_result).collect())
}

/// One transaction's outcome for one event.
pub(super) enum Pass {
    /// Decided (or failed alone).
    Done(Result<Report, ApplyError>),
    /// Left undecided: the subscription is to be fetched.
    Refetch(String),
}

impl Pass {
    fn into_result(self) -> Result<Report, ApplyError> {
        match self {
            Pass::Done(result) => result,
            Pass::Refetch(id) => Err(ApplyError::TieMoved(id)),
        }
    }
}

/// One transaction over the events: claim, lock, decide, write.
pub(super) async fn apply_once(
    deps: &Deps,
    event_ids: &[&str],
    options: ApplyOptions,
    refetched: &Refetched,
) -> Result<Vec<Pass>, ApplyError> {
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
            mode_matches(stored, deps.mode)
                .and_then(|()| read(stored, &deps.plans))
                .map_err(|why| Verdict::bare(Decision::Ignored, why))
        } else {
            Err(Verdict::bare(Decision::Duplicate, "already processed"))
        };
        work.push((at, stored, reading));
    }
    let facts: Vec<&Facts> = work
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().ok())
        .collect();
    let mut locked = Locked::take(&mut tx, &facts, deps.refunds).await?;
    let ties = Ties {
        can_refetch: deps.stripe.is_some(),
        refetched,
    };
    let mut settled = Vec::with_capacity(work.len());
    for (at, stored, reading) in work {
        let verdict = match reading {
            Ok(facts) => decide(&mut locked, stored, facts, &ties)?,
            Err(verdict) => verdict,
        };
        settled.push((
            at,
            stored,
            within_deferral_window(verdict, stored, &deps.policy),
        ));
    }
    locked.save(&mut tx).await?;
    let claimed: HashSet<&str> = claims
        .iter()
        .filter(|(_, claimed)| *claimed)
        .map(|(stored, _)| stored.id.as_str())
        .collect();
    let released = record(&mut tx, &deps.policy, &settled, &claimed).await?;
    if options.dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
        deps.queue.push_released(&released).await;
        if let Some(lookup) = &deps.lookup {
            lookup.request(
                settled
                    .iter()
                    .filter(|(_, _, verdict)| verdict.decision == Decision::Deferred)
                    .filter_map(|(_, _, verdict)| verdict.waiting_for_customer.as_deref()),
            );
        }
        for (_, _, verdict) in &settled {
            if let Some(status) = verdict.payment_status {
                metrics::counter!(PAYMENTS, "status" => status.as_str()).increment(1);
            }
        }
    }

    let mut passes: Vec<Option<Pass>> = (0..event_ids.len()).map(|_| None).collect();
    for (at, stored, verdict) in settled {
        passes[at] = Some(match verdict.refetch {
            Some(subscription_id) => Pass::Refetch(subscription_id),
            None => Pass::Done(Ok(Report::from_verdict(verdict, stored))),
        });
    }
    for (at, n) in repeats {
        let verdict = Verdict::bare(Decision::Duplicate, "repeated in one batch");
        passes[at] = Some(Pass::Done(Ok(Report::from_verdict(verdict, &claims[n].0))));
    }
    Ok(passes.into_iter().flatten().collect())
}

/// An event of the other mode than `STRIPE_MODE` is kept but never applied: a 4xx would make
/// Stripe retry it for days, and test data must not change live organizations.
fn mode_matches(stored: &StoredEvent, mode: Option<StripeMode>) -> Result<(), String> {
    match mode {
        Some(mode) if StripeMode::of(stored.livemode) != mode => Err(format!(
            "a {}-mode event, and this deployment serves STRIPE_MODE={}",
            StripeMode::of(stored.livemode).as_str(),
            mode.as_str()
        )),
        _ => Ok(()),
    }
}

/// What an event says, read without the database; `Err` says why an event cannot change
/// billing state (it is `ignored`).
fn read(stored: &StoredEvent, plans: &PlanMapping) -> Result<Facts, String> {
    let event: Event = serde_json::from_slice(&stored.payload)
        .map_err(|e| format!("payload is not a Stripe event: {e}"))?;
    let facts = stripe::interpret(&event, plans).map_err(|ignored| ignored.to_string())?;
    if let Some(BillingChange::Subscription {
        subscription_id,
        change: SubscriptionChange::Snapshot(snapshot),
    }) = &facts.change
        && snapshot.plan.is_none()
        && !snapshot.price_ids.is_empty()
    {
        metrics::counter!(UNMAPPED_PRICES).increment(1);
        tracing::warn!(
            event.id = %stored.id,
            subscription.id = %subscription_id,
            prices = ?snapshot.price_ids,
            "no price of the subscription maps to a plan (STRIPE_*_PRICE_KEY); its plan is null"
        );
    }
    Ok(facts)
}
