//! One subscription's stored state and how one event changes it, ordering included.
//!
//! A subscription's status has one ordering marker: the event behind it
//! (`status_event_created`). A snapshot (a subscription object, from a subscription event or a
//! refetch) newer than the marker replaces the whole state; an invoice newer than the marker
//! changes only the status, and only as Stripe would. An older event is stale, with one
//! exception: a snapshot newer than the snapshot whose details (plan, prices, period end,
//! cancellation, trial) are stored still replaces those details, never the status. So the
//! details always come from the newest snapshot delivered, whatever arrived first.
//!
//! Same-second ties: a snapshot wins over an invoice (the snapshot is Stripe's own account of
//! the status, the invoice only a hint); two snapshots or two invoices go to the status further
//! along the lifecycle ([`super::tie_prefers`]), unless the subscription was refetched from
//! Stripe, whose answer then decides.
//!
//! What the payload of an invoice tells, and the rule taken from it:
//! - `invoice.paid` makes the subscription active, except: an ended subscription stays ended;
//!   a $0 invoice never ends a trial and says nothing about a subscription not seen yet (a
//!   trial's first invoice is $0; its snapshot says `trialing`); and paying an invoice created
//!   before the invoice whose failure made the subscription `past_due`/`unpaid` leaves that
//!   failure standing (the invoice `created` of the failure is kept).
//! - `invoice.payment_failed` makes it `past_due`, except: an ended one stays ended, `unpaid`
//!   stays `unpaid` (Stripe keeps it until an invoice is paid), a failed first invoice
//!   (`subscription_create`) leaves it `incomplete`, and a failed `subscription_update`
//!   invoice changes nothing: with pending updates Stripe keeps the subscription active, and
//!   when it does change the status it says so in `customer.subscription.updated`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;

use super::{PlanStatus, Precedence, precedence, tie_prefers};

/// What a subscription object says: everything stored of a subscription but its ids and
/// markers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Snapshot {
    /// Stripe's status.
    pub status: PlanStatus,
    /// The plan its prices map to, if any does.
    pub plan: Option<String>,
    /// The prices of its items, mapped to a plan or not.
    pub price_ids: Vec<String>,
    /// The quantity of the item that names the plan (or of the first item).
    pub quantity: Option<i64>,
    /// End of the current period (the latest across items since API 2025-03-31).
    pub current_period_end: Option<DateTime<Utc>>,
    /// Ends at period end instead of renewing (classic billing mode).
    pub cancel_at_period_end: bool,
    /// When it is scheduled to end (flexible billing mode's portal cancellations set this).
    pub cancel_at: Option<DateTime<Utc>>,
    /// When a cancellation was requested.
    pub canceled_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// End of the trial, if it has one.
    pub trial_end: Option<DateTime<Utc>>,
    /// When Stripe created it.
    pub started_at: Option<DateTime<Utc>>,
    /// Updates wait for a payment (`pending_update` is set).
    pub pending_update: bool,
}

/// What an invoice event tells about its subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceFacts {
    /// `in_…`
    pub invoice_id: Option<String>,
    /// When the invoice was created.
    pub created: Option<DateTime<Utc>>,
    /// Amount paid, in the smallest currency unit.
    pub amount_paid: i64,
    /// Why it was created: `subscription_create`, `subscription_cycle`, `subscription_update`…
    pub billing_reason: Option<String>,
}

/// The invoice event behind a subscription's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInvoice {
    /// `invoice.paid` (else `invoice.payment_failed`).
    pub paid: bool,
    /// What it said.
    pub invoice: InvoiceFacts,
}

/// What one event says about one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionChange {
    /// A whole subscription object.
    Snapshot(Snapshot),
    /// `invoice.paid`.
    InvoicePaid(InvoiceFacts),
    /// `invoice.payment_failed`.
    InvoicePaymentFailed(InvoiceFacts),
}

/// A subscription as stored (`subscriptions`), or a blank one not stored yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct SubscriptionState {
    /// `sub_…`
    pub id: String,
    /// The organization it belongs to.
    pub organization_id: String,
    /// The Stripe customer billed.
    pub customer_id: Option<String>,
    /// The details of the newest snapshot delivered, and the status of the newest event.
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub snapshot: Snapshot,
    /// The event behind the status (`None` only for a blank state).
    pub status_event_id: Option<String>,
    /// That event's `created`: the ordering marker.
    pub status_event_created: Option<DateTime<Utc>>,
    /// The invoice event that set the status, when one did (not a snapshot).
    #[serde(skip)]
    pub status_invoice: Option<Json<StatusInvoice>>,
    /// `created` of the event whose snapshot the details come from; `None` until a snapshot.
    pub snapshot_event_created: Option<DateTime<Utc>>,
    /// The invoice whose failed payment set `past_due`/`unpaid`, until one is paid.
    pub failed_invoice_id: Option<String>,
    /// That invoice's `created`.
    pub failed_invoice_created: Option<DateTime<Utc>>,
}

impl SubscriptionState {
    /// A subscription not seen before: no status yet (`none`), no marker.
    pub fn blank(id: &str, organization_id: &str, customer_id: Option<&str>) -> SubscriptionState {
        SubscriptionState {
            id: id.to_owned(),
            organization_id: organization_id.to_owned(),
            customer_id: customer_id.map(str::to_owned),
            snapshot: Snapshot {
                status: PlanStatus::None,
                plan: None,
                price_ids: Vec::new(),
                quantity: None,
                current_period_end: None,
                cancel_at_period_end: false,
                cancel_at: None,
                canceled_at: None,
                ended_at: None,
                trial_end: None,
                started_at: None,
                pending_update: false,
            },
            status_event_id: None,
            status_event_created: None,
            status_invoice: None,
            snapshot_event_created: None,
            failed_invoice_id: None,
            failed_invoice_created: None,
        }
    }

    /// Never stored with a status: a blank one, or one only $0 invoices spoke of.
    pub fn is_blank(&self) -> bool {
        self.status_event_created.is_none()
    }

    /// The state Stripe showed at `stamp` (a reconciliation's fetch): its snapshot, with
    /// `stamp` as the ordering marker, so any event created before it is stale after it.
    pub fn reconciled(&self, snapshot: &Snapshot, stamp: Stamp<'_>) -> SubscriptionState {
        let mut next = self.clone();
        next.take_snapshot(snapshot, stamp);
        next
    }

    /// The status was set by an invoice, not a snapshot.
    pub fn status_from_invoice(&self) -> bool {
        self.status_invoice.is_some()
    }

    fn take_snapshot(&mut self, snapshot: &Snapshot, event: Stamp<'_>) {
        self.snapshot = snapshot.clone();
        self.snapshot_event_created = Some(event.created);
        self.set_status(snapshot.status, event, None);
        if !matches!(snapshot.status, PlanStatus::PastDue | PlanStatus::Unpaid) {
            self.failed_invoice_id = None;
            self.failed_invoice_created = None;
        }
    }

    fn set_status(&mut self, status: PlanStatus, event: Stamp<'_>, invoice: Option<StatusInvoice>) {
        self.snapshot.status = status;
        self.status_event_id = Some(event.id.to_owned());
        self.status_event_created = Some(event.created);
        self.status_invoice = invoice.map(Json);
    }
}

/// The event a change comes from.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    /// `evt_…`
    pub id: &'a str,
    /// The event's `created`.
    pub created: DateTime<Utc>,
}

/// How a change was ordered against the stored state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Newer than the stored status (or nothing stored).
    Newer,
    /// Older: the status stays (details may be filled in).
    Stale,
    /// Same second, decided by the tie rules.
    Tie,
    /// Same second, decided by Stripe's current subscription.
    Refetched,
}

/// The ruling on one change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruling {
    /// How it was ordered.
    pub settled: Settled,
    /// The new state, when anything changed.
    pub next: Option<SubscriptionState>,
    /// Why, when the status did not take the change.
    pub reason: Option<&'static str>,
}

impl Ruling {
    fn changed(settled: Settled, next: SubscriptionState) -> Ruling {
        Ruling {
            settled,
            next: Some(next),
            reason: None,
        }
    }

    fn unchanged(settled: Settled, reason: &'static str) -> Ruling {
        Ruling {
            settled,
            next: None,
            reason: Some(reason),
        }
    }
}

/// Rules on one change of one subscription. `refetched` is the subscription as Stripe showed
/// it when the event was found to tie the stored status (see the module doc).
pub fn rule(
    current: &SubscriptionState,
    change: &SubscriptionChange,
    event: Stamp<'_>,
    refetched: Option<&Snapshot>,
) -> Ruling {
    match precedence(event.created, current.status_event_created) {
        Precedence::Newer => newer(current, change, event, Settled::Newer),
        Precedence::Older => older(current, change, event),
        Precedence::Tie => match refetched {
            Some(truth) => {
                let mut next = current.clone();
                next.take_snapshot(truth, event);
                Ruling::changed(Settled::Refetched, next)
            }
            None => tie(current, change, event),
        },
    }
}

fn newer(
    current: &SubscriptionState,
    change: &SubscriptionChange,
    event: Stamp<'_>,
    settled: Settled,
) -> Ruling {
    let mut next = current.clone();
    let (paid, invoice) = match change {
        SubscriptionChange::Snapshot(snapshot) => {
            next.take_snapshot(snapshot, event);
            return Ruling::changed(settled, next);
        }
        SubscriptionChange::InvoicePaid(invoice) => (true, invoice),
        SubscriptionChange::InvoicePaymentFailed(invoice) => (false, invoice),
    };
    let status_invoice = StatusInvoice {
        paid,
        invoice: invoice.clone(),
    };
    match apply_invoice(&mut next, &status_invoice) {
        Ok(status) => {
            next.set_status(status, event, Some(status_invoice));
            Ruling::changed(settled, next)
        }
        Err(reason) => Ruling::unchanged(settled, reason),
    }
}

/// The status an invoice gives on `state`, recording or clearing the failed invoice there; or
/// why it changes nothing.
fn apply_invoice(
    state: &mut SubscriptionState,
    status_invoice: &StatusInvoice,
) -> Result<PlanStatus, &'static str> {
    let invoice = &status_invoice.invoice;
    if status_invoice.paid {
        let status = invoice_paid(state, invoice)?;
        state.failed_invoice_id = None;
        state.failed_invoice_created = None;
        Ok(status)
    } else {
        let status = invoice_failed(state, invoice)?;
        state.failed_invoice_id = invoice.invoice_id.clone();
        state.failed_invoice_created = invoice.created;
        Ok(status)
    }
}

fn older(current: &SubscriptionState, change: &SubscriptionChange, event: Stamp<'_>) -> Ruling {
    const STALE: &str = "older than the event behind this subscription's status";
    let SubscriptionChange::Snapshot(snapshot) = change else {
        return Ruling::unchanged(Settled::Stale, STALE);
    };
    if current
        .snapshot_event_created
        .is_some_and(|filled| filled >= event.created)
    {
        return Ruling::unchanged(Settled::Stale, STALE);
    }
    let mut next = current.clone();
    next.snapshot = snapshot.clone();
    next.snapshot_event_created = Some(event.created);
    // The status stays the newer event's. When that was an invoice, its rule is applied again
    // on this snapshot's status, which it was about: a failure leaves `unpaid` unpaid, a
    // payment does not revive an ended subscription, whatever order they arrived in.
    next.snapshot.status = match current.status_invoice.as_deref() {
        Some(status_invoice) => apply_invoice(&mut next, status_invoice).unwrap_or(snapshot.status),
        None => current.snapshot.status,
    };
    Ruling {
        settled: Settled::Stale,
        next: Some(next),
        reason: Some(
            "older than the event behind this subscription's status; its details (plan, \
             period, cancellation) are the newest delivered, so they replaced the stored ones",
        ),
    }
}

fn tie(current: &SubscriptionState, change: &SubscriptionChange, event: Stamp<'_>) -> Ruling {
    match change {
        SubscriptionChange::Snapshot(_) if current.status_from_invoice() => {
            newer(current, change, event, Settled::Tie)
        }
        SubscriptionChange::InvoicePaid(_) | SubscriptionChange::InvoicePaymentFailed(_)
            if !current.status_from_invoice() =>
        {
            Ruling::unchanged(
                Settled::Tie,
                "same-second tie: a subscription snapshot wins over an invoice",
            )
        }
        _ => {
            let ruling = newer(current, change, event, Settled::Tie);
            match &ruling.next {
                Some(next) if !tie_prefers(current.snapshot.status, next.snapshot.status) => {
                    Ruling::unchanged(
                        Settled::Tie,
                        "same-second tie: the stored status is further along the lifecycle",
                    )
                }
                _ => ruling,
            }
        }
    }
}

/// The status `invoice.paid` gives, or why it changes nothing.
fn invoice_paid(
    current: &SubscriptionState,
    invoice: &InvoiceFacts,
) -> Result<PlanStatus, &'static str> {
    let status = current.snapshot.status;
    if status.is_terminal() {
        return Err("the subscription has already ended");
    }
    if invoice.amount_paid == 0 && status == PlanStatus::Trialing {
        return Err("a $0 invoice never ends a trial");
    }
    if invoice.amount_paid == 0 && current.is_blank() {
        return Err(
            "a $0 invoice of a subscription not seen yet: its snapshot says whether it is \
             trialing or active",
        );
    }
    let older_than_failure = match (&current.failed_invoice_id, current.failed_invoice_created) {
        (Some(failed), Some(failed_created)) => {
            invoice.invoice_id.as_ref() != Some(failed)
                && invoice.created.is_some_and(|paid| paid < failed_created)
        }
        _ => false,
    };
    if older_than_failure {
        return Err("paid an invoice older than the one whose payment failed, which is still open");
    }
    Ok(PlanStatus::Active)
}

/// The status `invoice.payment_failed` gives, or why it changes nothing.
fn invoice_failed(
    current: &SubscriptionState,
    invoice: &InvoiceFacts,
) -> Result<PlanStatus, &'static str> {
    let status = current.snapshot.status;
    if status.is_terminal() {
        return Err("the subscription has already ended");
    }
    match invoice.billing_reason.as_deref() {
        Some("subscription_create") => {
            return Err("a failed first payment leaves the subscription incomplete");
        }
        Some("subscription_update") => {
            return Err(
                "a failed update invoice leaves the subscription as its snapshot says (Stripe \
                 keeps it active while the update is pending)",
            );
        }
        _ => {}
    }
    if status == PlanStatus::Unpaid {
        return Err("an unpaid subscription stays unpaid until an invoice is paid");
    }
    Ok(PlanStatus::PastDue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use PlanStatus::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).expect("valid")
    }

    fn stamp(seconds: i64) -> Stamp<'static> {
        Stamp {
            id: "evt",
            created: at(seconds),
        }
    }

    fn snapshot(status: PlanStatus, plan: &str) -> Snapshot {
        Snapshot {
            plan: Some(plan.to_owned()),
            price_ids: vec![format!("price_{plan}")],
            current_period_end: Some(at(86_400)),
            ..SubscriptionState::blank("sub", "org", Option::None).snapshot
        }
        .with_status(status)
    }

    impl Snapshot {
        fn with_status(mut self, status: PlanStatus) -> Snapshot {
            self.status = status;
            self
        }
    }

    fn invoice(id: &str, created: i64, amount_paid: i64, reason: &str) -> InvoiceFacts {
        InvoiceFacts {
            invoice_id: Some(id.to_owned()),
            created: Some(at(created)),
            amount_paid,
            billing_reason: Some(reason.to_owned()),
        }
    }

    /// Applies changes in order, each ruled against the state the previous ones left.
    fn run(changes: &[(i64, SubscriptionChange)]) -> (SubscriptionState, Vec<Ruling>) {
        let mut state = SubscriptionState::blank("sub", "org", Option::None);
        let mut rulings = Vec::new();
        for (seconds, change) in changes {
            let ruling = rule(&state, change, stamp(*seconds), Option::None);
            if let Some(next) = &ruling.next {
                state = next.clone();
            }
            rulings.push(ruling);
        }
        (state, rulings)
    }

    fn snap(status: PlanStatus, plan: &str) -> SubscriptionChange {
        SubscriptionChange::Snapshot(snapshot(status, plan))
    }

    fn paid(id: &str, created: i64, amount: i64) -> SubscriptionChange {
        SubscriptionChange::InvoicePaid(invoice(id, created, amount, "subscription_cycle"))
    }

    fn failed(id: &str, created: i64, reason: &str) -> SubscriptionChange {
        SubscriptionChange::InvoicePaymentFailed(invoice(id, created, 0, reason))
    }

    /// (deliveries as (event second, change), final status, final plan)
    type Case = (
        &'static str,
        Vec<(i64, SubscriptionChange)>,
        PlanStatus,
        Option<&'static str>,
    );

    #[test]
    fn one_subscription_ends_where_stripe_left_it_whatever_the_delivery_order() {
        let cases: Vec<Case> = vec![
            (
                "in order",
                vec![(1, snap(Incomplete, "basic")), (2, paid("in_1", 1, 100))],
                Active,
                Some("basic"),
            ),
            (
                "invoice first, older snapshot fills in the details",
                vec![(2, paid("in_1", 1, 100)), (1, snap(Incomplete, "basic"))],
                Active,
                Some("basic"),
            ),
            (
                "newest older snapshot's details win, not the first to arrive",
                vec![
                    (300, paid("in_2", 250, 100)),
                    (100, snap(Active, "basic")),
                    (200, snap(Active, "premium")),
                ],
                Active,
                Some("premium"),
            ),
            (
                "an older snapshot after a newer one fills in nothing",
                vec![
                    (300, paid("in_2", 250, 100)),
                    (200, snap(Active, "premium")),
                    (100, snap(Active, "basic")),
                ],
                Active,
                Some("premium"),
            ),
            (
                "trial start: $0 invoice first, snapshot of the same second",
                vec![(10, paid("in_0", 10, 0)), (10, snap(Trialing, "premium"))],
                Trialing,
                Some("premium"),
            ),
            (
                "trial start: snapshot first, $0 invoice of the same second",
                vec![(10, snap(Trialing, "premium")), (10, paid("in_0", 10, 0))],
                Trialing,
                Some("premium"),
            ),
            (
                "a later $0 invoice never ends a trial",
                vec![(10, snap(Trialing, "premium")), (20, paid("in_0", 20, 0))],
                Trialing,
                Some("premium"),
            ),
            (
                "unpaid stays unpaid on a later failure",
                vec![
                    (10, snap(Unpaid, "basic")),
                    (20, failed("in_9", 20, "manual")),
                ],
                Unpaid,
                Some("basic"),
            ),
            (
                "a later failure delivered before the unpaid snapshot leaves it unpaid",
                vec![
                    (20, failed("in_9", 20, "manual")),
                    (10, snap(Unpaid, "basic")),
                ],
                Unpaid,
                Some("basic"),
            ),
            (
                "a later payment delivered before the deletion does not revive it",
                vec![(20, paid("in_9", 20, 100)), (10, snap(Canceled, "basic"))],
                Canceled,
                Some("basic"),
            ),
            (
                "a later payment delivered before an older past_due snapshot makes it active",
                vec![(20, paid("in_9", 20, 100)), (10, snap(PastDue, "basic"))],
                Active,
                Some("basic"),
            ),
            (
                "a failed update invoice leaves the subscription active",
                vec![
                    (10, snap(Active, "basic")),
                    (20, failed("in_u", 20, "subscription_update")),
                ],
                Active,
                Some("basic"),
            ),
            (
                "paying an older invoice does not clear a newer failure",
                vec![
                    (10, snap(Active, "basic")),
                    (20, failed("in_new", 19, "subscription_cycle")),
                    (30, paid("in_old", 5, 100)),
                ],
                PastDue,
                Some("basic"),
            ),
            (
                "paying the failed invoice clears it",
                vec![
                    (10, snap(Active, "basic")),
                    (20, failed("in_new", 19, "subscription_cycle")),
                    (30, paid("in_new", 19, 100)),
                ],
                Active,
                Some("basic"),
            ),
            (
                "an ended subscription stays ended",
                vec![(10, snap(Canceled, "basic")), (20, paid("in_1", 20, 100))],
                Canceled,
                Some("basic"),
            ),
            (
                "a snapshot wins over an invoice of the same second",
                vec![(10, snap(PastDue, "basic")), (10, paid("in_1", 10, 100))],
                PastDue,
                Some("basic"),
            ),
            (
                "two snapshots of one second: further along the lifecycle wins",
                vec![(10, snap(Canceled, "basic")), (10, snap(Active, "basic"))],
                Canceled,
                Some("basic"),
            ),
            (
                "a stale status event changes nothing",
                vec![(20, snap(Canceled, "basic")), (10, snap(Active, "basic"))],
                Canceled,
                Some("basic"),
            ),
        ];
        for (name, changes, status, plan) in cases {
            let (state, rulings) = run(&changes);
            assert_eq!(
                (state.snapshot.status, state.snapshot.plan.as_deref()),
                (status, plan),
                "{name}: {rulings:#?}"
            );
        }
    }

    #[test]
    fn a_refetched_snapshot_settles_a_tie() {
        let (state, _) = run(&[(10, snap(Active, "basic"))]);
        let truth = snapshot(PastDue, "premium");
        let ruling = rule(&state, &paid("in_1", 10, 100), stamp(10), Some(&truth));
        assert_eq!(ruling.settled, Settled::Refetched);
        let next = ruling.next.expect("changed");
        assert_eq!(next.snapshot, truth);
        assert_eq!(next.status_event_created, Some(at(10)));
    }

    #[test]
    fn rulings_say_how_they_were_ordered() {
        let (_, rulings) = run(&[
            (10, snap(Active, "basic")),
            (5, snap(Incomplete, "basic")),
            (10, paid("in_1", 10, 100)),
            (20, failed("in_2", 20, "subscription_create")),
        ]);
        let settled: Vec<(Settled, bool)> = rulings
            .iter()
            .map(|r| (r.settled, r.next.is_some()))
            .collect();
        assert_eq!(
            settled,
            vec![
                (Settled::Newer, true),
                (Settled::Stale, false),
                (Settled::Tie, false),
                (Settled::Newer, false),
            ]
        );
    }
}
