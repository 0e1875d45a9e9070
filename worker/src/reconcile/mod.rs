//! Reconciliation: the Stripe API's subscriptions against the stored ones, drift healed and
//! reported. It lists every subscription (`status=all`, 100 a page, following the cursor),
//! resolves each to an organization (its `metadata.organization_id`, else the subscription's
//! stored organization, else the customer's link), compares status, plan, cancellation and
//! period end with the stored subscription, and heals what differs ([`heal`]).
//!
//! A healed subscription takes Stripe's state with the page's fetch time as its ordering
//! marker: an event created before it and delivered later is `stale`, a newer one applies, and
//! an event applied after the fetch began is never overwritten. The organization's state is
//! then derived again from all of its subscriptions, so when an organization has several,
//! the derivation picks the governing one (not this module); the report lists them.
//!
//! Each run is a `reconciliation_runs` row whose cursor and counts follow every page: a run
//! that cannot finish (Stripe unreachable after the client's retries) is `failed` with its
//! error, and the next run resumes from its cursor. A run with errors is `failed` too, never
//! `succeeded`.

pub mod backfill;
pub mod heal;
pub mod render;
pub mod schedule;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::IsTerminal;
use std::time::Instant;

use chrono::{DateTime, SubsecRound, Utc};
use serde::Serialize;
use shared::billing::PlanStatus;
use shared::db::reconciliation_runs::{self, Counts, Run};
use shared::db::{organizations, subscriptions, webhook_events};
use shared::metrics::{
    RECONCILE_DURATION, RECONCILE_LAST_DRIFTED, RECONCILE_LAST_HEALED, RECONCILE_LAST_ORPHANS,
    RECONCILE_LAST_SUCCESS, RECONCILE_RUNS,
};
use shared::queue::EventQueue;
use shared::stripe::{self, PlanMapping, Subscription};
use shared::stripe_api::{KeyMode, StripeClient};
use sqlx::PgPool;

use self::heal::{Change, Healed, Target};

/// What reconciliation and backfill need.
#[derive(Clone)]
pub struct Reconciler {
    /// Postgres.
    pub pool: PgPool,
    /// The Stripe API.
    pub client: StripeClient,
    /// Price and product keys of the plans.
    pub plans: PlanMapping,
    /// To enqueue backfilled events.
    pub queue: EventQueue,
}

/// Why a run was started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// `worker reconcile now`.
    Manual,
    /// The schedule's claimed run, after its backfill.
    Scheduled {
        /// Its `reconciliation_runs` row.
        run_id: i64,
        /// Events the backfill stored.
        events_backfilled: i32,
        /// Why the backfill failed, if it did (the run is then `failed`).
        backfill_error: Option<String>,
    },
}

/// A subscription whose stored state differed from Stripe's.
#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    /// The organization.
    pub organization_id: String,
    /// The subscription.
    pub subscription_id: String,
    /// What differed.
    pub changes: Vec<Change>,
    /// Set right (never in a dry run).
    pub healed: bool,
    /// The organization's status before and after healing.
    pub status_before: Option<PlanStatus>,
    /// See `status_before`.
    pub status_after: Option<PlanStatus>,
    /// Why it was left alone, or failed.
    pub note: Option<String>,
}

/// A finding about one subscription or organization.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// The organization, when known.
    pub organization_id: Option<String>,
    /// The subscription(s).
    pub subscription_ids: Vec<String>,
    /// What it means.
    pub note: String,
}

/// What a run found and did.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The `reconciliation_runs` row.
    pub run_id: i64,
    /// `succeeded` or `failed`.
    pub status: &'static str,
    /// `manual` or `schedule`.
    pub trigger: &'static str,
    /// Nothing was changed.
    pub dry_run: bool,
    /// The failed run this one continued.
    pub resumed_from: Option<i64>,
    /// The counts.
    #[serde(flatten)]
    pub counts: Counts,
    /// Why it failed.
    pub error: Option<String>,
    /// Subscriptions that differed.
    pub drift: Vec<Drift>,
    /// Organizations pointing at a subscription Stripe does not know.
    pub orphan_subscriptions: Vec<Finding>,
    /// Subscriptions resolving to no organization.
    pub unlinked_subscriptions: Vec<Finding>,
    /// Organizations on a lifetime purchase, left alone.
    pub lifetime: Vec<Finding>,
    /// Organizations with several subscriptions in Stripe, and the one governing.
    pub several_subscriptions: Vec<Finding>,
    /// Subscriptions that could not be read or healed.
    pub error_details: Vec<Finding>,
}

impl RunReport {
    fn new(run_id: i64, trigger: &Trigger, dry_run: bool, resumed_from: Option<i64>) -> RunReport {
        let events_backfilled = match trigger {
            Trigger::Scheduled {
                events_backfilled, ..
            } => *events_backfilled,
            Trigger::Manual => 0,
        };
        RunReport {
            run_id,
            status: "running",
            trigger: match trigger {
                Trigger::Manual => "manual",
                Trigger::Scheduled { .. } => "schedule",
            },
            dry_run,
            resumed_from,
            counts: Counts {
                events_backfilled,
                ..Counts::default()
            },
            error: None,
            drift: Vec::new(),
            orphan_subscriptions: Vec::new(),
            unlinked_subscriptions: Vec::new(),
            lifetime: Vec::new(),
            several_subscriptions: Vec::new(),
            error_details: Vec::new(),
        }
    }

    fn error(&mut self, organization_id: Option<&str>, subscription_id: &str, note: String) {
        self.counts.errors += 1;
        self.error_details.push(Finding {
            organization_id: organization_id.map(str::to_owned),
            subscription_ids: vec![subscription_id.to_owned()],
            note,
        });
    }
}

/// A run's running state besides the report.
#[derive(Default)]
struct Tally {
    checked: BTreeSet<String>,
    drifted: BTreeSet<String>,
    healed: BTreeSet<String>,
    seen: BTreeSet<String>,
    by_organization: BTreeMap<String, Vec<String>>,
}

/// Subscriptions listed per page (Stripe's maximum).
const PAGE: &str = "100";

/// Runs one reconciliation. `Err` only when it could not even be recorded (Postgres); a run
/// that fails is returned as a `failed` report, recorded as such.
pub async fn run(
    reconciler: &Reconciler,
    trigger: Trigger,
    dry_run: bool,
) -> anyhow::Result<RunReport> {
    let started = Instant::now();
    let pool = &reconciler.pool;
    let resumable = if dry_run {
        None
    } else {
        reconciliation_runs::resumable(pool).await?
    };
    let (run_id, backfill_error) = match &trigger {
        Trigger::Manual => (
            reconciliation_runs::start_manual(pool, dry_run, resumable.as_ref()).await?,
            None,
        ),
        Trigger::Scheduled {
            run_id,
            backfill_error,
            ..
        } => {
            if let Some(from) = &resumable {
                reconciliation_runs::resume_from(pool, *run_id, from).await?;
            }
            (*run_id, backfill_error.clone())
        }
    };
    let mut report = RunReport::new(run_id, &trigger, dry_run, resumable.as_ref().map(|r| r.id));
    let outcome = match mode_guard(reconciler).await {
        Ok(()) => reconcile(reconciler, &mut report, resumable.as_ref()).await,
        Err(refused) => Err(refused),
    };
    let error = match outcome {
        Err(e) => Some(format!("{e:#}")),
        Ok(()) if backfill_error.is_some() => backfill_error,
        Ok(()) if report.counts.errors > 0 => Some(format!(
            "{} subscriptions could not be read or healed (see error_details)",
            report.counts.errors
        )),
        Ok(()) => None,
    };
    report.status = if error.is_some() {
        "failed"
    } else {
        "succeeded"
    };
    report.error = error;
    let json = serde_json::to_value(&report)?;
    reconciliation_runs::finish(pool, run_id, report.status, report.error.as_deref(), &json)
        .await?;
    record_metrics(&report, started);
    Ok(report)
}

fn record_metrics(report: &RunReport, started: Instant) {
    metrics::counter!(RECONCILE_RUNS, "status" => report.status).increment(1);
    metrics::histogram!(RECONCILE_DURATION).record(started.elapsed().as_secs_f64());
    if report.dry_run {
        return;
    }
    metrics::gauge!(RECONCILE_LAST_DRIFTED).set(f64::from(report.counts.drifted));
    metrics::gauge!(RECONCILE_LAST_HEALED).set(f64::from(report.counts.healed));
    metrics::gauge!(RECONCILE_LAST_ORPHANS).set(f64::from(report.counts.orphans));
    if report.status == "succeeded" {
        metrics::gauge!(RECONCILE_LAST_SUCCESS).set(Utc::now().timestamp() as f64);
    }
}

/// Refuses a key whose mode differs from the stored events': healing live data with test
/// data (or the reverse) would be silent corruption.
async fn mode_guard(reconciler: &Reconciler) -> anyhow::Result<()> {
    let key = reconciler.client.mode();
    let stored = webhook_events::newest_livemode(&reconciler.pool).await?;
    let (key_live, data_live) = match (key, stored) {
        (KeyMode::Live, Some(false)) => (true, false),
        (KeyMode::Test, Some(true)) => (false, true),
        _ => return Ok(()),
    };
    let mode = |live: bool| if live { "live" } else { "test" };
    anyhow::bail!(
        "refusing to reconcile: STRIPE_SECRET_KEY is a {}-mode key but the stored events are \
         {}-mode; use the key of the mode whose webhooks this deployment receives",
        mode(key_live),
        mode(data_live)
    )
}

async fn reconcile(
    reconciler: &Reconciler,
    report: &mut RunReport,
    resumed: Option<&Run>,
) -> anyhow::Result<()> {
    let mut tally = Tally::default();
    let mut cursor = resumed.and_then(|r| r.cursor.clone());
    let progress = std::io::stderr().is_terminal();
    let mut pages = 0;
    loop {
        let fetched_at = Utc::now().trunc_subsecs(0);
        let query = [("status", "all".to_owned()), ("limit", PAGE.to_owned())];
        let page = reconciler
            .client
            .list_raw("/v1/subscriptions", &query, cursor.as_deref())
            .await;
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                save_progress(reconciler, report, &tally, cursor.as_deref(), false).await?;
                return Err(anyhow::Error::new(e).context(format!(
                    "listing subscriptions after {}",
                    cursor.as_deref().unwrap_or("the start")
                )));
            }
        };
        let mut listed = Vec::with_capacity(page.data.len());
        for raw in &page.data {
            match serde_json::from_str::<Subscription>(raw.get()) {
                Ok(subscription) => listed.push(subscription),
                Err(e) => report.error(
                    None,
                    "?",
                    format!("a listed subscription could not be read: {e}"),
                ),
            }
        }
        report.counts.subscriptions_listed += page.data.len() as i32;
        check(reconciler, report, &mut tally, &listed, fetched_at).await?;
        if let Some(last) = page.data.last() {
            cursor = serde_json::from_str::<IdOnly>(last.get())
                .ok()
                .map(|o| o.id);
        }
        pages += 1;
        save_progress(
            reconciler,
            report,
            &tally,
            cursor.as_deref(),
            !page.has_more,
        )
        .await?;
        if progress {
            eprint!(
                "\rreconcile: {pages} pages, {} subscriptions, {} drifted",
                report.counts.subscriptions_listed, report.counts.drifted
            );
        }
        if !page.has_more {
            break;
        }
    }
    if progress {
        eprintln!();
    }
    find_orphans(reconciler, report, &mut tally).await?;
    describe_several(reconciler, report, &tally).await?;
    save_progress(reconciler, report, &tally, cursor.as_deref(), true).await?;
    Ok(())
}

#[derive(serde::Deserialize)]
struct IdOnly {
    id: String,
}

async fn save_progress(
    reconciler: &Reconciler,
    report: &mut RunReport,
    tally: &Tally,
    cursor: Option<&str>,
    complete: bool,
) -> Result<(), sqlx::Error> {
    report.counts.organizations_checked = tally.checked.len() as i32;
    report.counts.drifted = tally.drifted.len() as i32;
    report.counts.healed = tally.healed.len() as i32;
    reconciliation_runs::progress(
        &reconciler.pool,
        report.run_id,
        cursor,
        complete,
        &report.counts,
    )
    .await
}

/// Compares (and heals) one page of subscriptions fetched at `fetched_at`.
async fn check(
    reconciler: &Reconciler,
    report: &mut RunReport,
    tally: &mut Tally,
    listed: &[Subscription],
    fetched_at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let pool = &reconciler.pool;
    let ids: Vec<&str> = listed.iter().map(|s| s.id.as_str()).collect();
    let customers: Vec<&str> = listed.iter().map(|s| s.customer.id()).collect();
    let stored: HashMap<String, _> = subscriptions::get_many(pool, &ids)
        .await?
        .into_iter()
        .map(|s| (s.id.clone(), s))
        .collect();
    let owners: HashMap<String, String> = organizations::owners_of_customers(pool, &customers)
        .await?
        .into_iter()
        .collect();
    for subscription in listed {
        tally.seen.insert(subscription.id.clone());
        let stored_one = stored.get(&subscription.id);
        let organization_id = stripe::subscription_organization_id(subscription)
            .map(str::to_owned)
            .or_else(|| stored_one.map(|s| s.organization_id.clone()))
            .or_else(|| owners.get(subscription.customer.id()).cloned());
        let Some(organization_id) = organization_id else {
            report.counts.unlinked += 1;
            report.unlinked_subscriptions.push(Finding {
                organization_id: None,
                subscription_ids: vec![subscription.id.clone()],
                note: format!(
                    "customer {} is linked to no organization and the subscription names none",
                    subscription.customer.id()
                ),
            });
            continue;
        };
        let Some(snapshot) = stripe::subscription_snapshot(subscription, &reconciler.plans) else {
            report.error(
                Some(&organization_id),
                &subscription.id,
                format!("unknown subscription status {:?}", subscription.status),
            );
            continue;
        };
        tally.checked.insert(organization_id.clone());
        tally
            .by_organization
            .entry(organization_id.clone())
            .or_default()
            .push(subscription.id.clone());
        let changes = heal::differences(stored_one, &snapshot);
        if changes.is_empty() {
            continue;
        }
        tally.drifted.insert(organization_id.clone());
        let mut drift = Drift {
            organization_id: organization_id.clone(),
            subscription_id: subscription.id.clone(),
            changes,
            healed: false,
            status_before: None,
            status_after: None,
            note: None,
        };
        if !report.dry_run {
            let target = Target {
                organization_id: &organization_id,
                customer_id: subscription.customer.id(),
                subscription_id: &subscription.id,
                snapshot: &snapshot,
                fetched_at,
            };
            match heal::heal(pool, report.run_id, &target).await {
                Ok(Healed::Set { before, after }) => {
                    drift.healed = true;
                    drift.status_before = Some(before);
                    drift.status_after = Some(after);
                    tally.healed.insert(organization_id.clone());
                }
                Ok(Healed::Skipped(reason)) => {
                    drift.note = Some(reason.to_owned());
                    // Not drift after all: lifetime access ignores subscriptions, or an event
                    // set it right meanwhile.
                    if !tally.healed.contains(&organization_id) {
                        tally.drifted.remove(&organization_id);
                    }
                    if reason.starts_with("lifetime") {
                        report.lifetime.push(Finding {
                            organization_id: Some(organization_id.clone()),
                            subscription_ids: vec![subscription.id.clone()],
                            note: reason.to_owned(),
                        });
                        continue;
                    }
                }
                Err(e) => {
                    drift.note = Some(format!("healing failed: {e}"));
                    report.error(
                        Some(&organization_id),
                        &subscription.id,
                        format!("healing failed: {e}"),
                    );
                }
            }
        }
        report.drift.push(drift);
    }
    Ok(())
}

/// Organizations governed by a subscription the listing never showed: asked for one by one;
/// Stripe's 404 makes an orphan, anything found is checked like a listed one.
async fn find_orphans(
    reconciler: &Reconciler,
    report: &mut RunReport,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let governed = organizations::governed_by_subscriptions(&reconciler.pool).await?;
    for (organization_id, subscription_id) in governed {
        if tally.seen.contains(&subscription_id) {
            continue;
        }
        let fetched_at = Utc::now().trunc_subsecs(0);
        match reconciler.client.subscription(&subscription_id).await {
            Ok(subscription) => {
                check(reconciler, report, tally, &[subscription], fetched_at).await?;
            }
            Err(e) if e.is_not_found() => {
                report.counts.orphans += 1;
                report.orphan_subscriptions.push(Finding {
                    organization_id: Some(organization_id),
                    subscription_ids: vec![subscription_id],
                    note: "Stripe does not know this subscription (deleted, or from another \
                           account or mode)"
                        .to_owned(),
                });
            }
            Err(e) => report.error(Some(&organization_id), &subscription_id, e.to_string()),
        }
    }
    Ok(())
}

/// Names, for each organization with several subscriptions, the one its derived state says
/// governs.
async fn describe_several(
    reconciler: &Reconciler,
    report: &mut RunReport,
    tally: &Tally,
) -> anyhow::Result<()> {
    let several: Vec<&str> = tally
        .by_organization
        .iter()
        .filter(|(_, subs)| subs.len() > 1)
        .map(|(org, _)| org.as_str())
        .collect();
    if several.is_empty() {
        return Ok(());
    }
    for org in organizations::get_many(&reconciler.pool, &several).await? {
        let governing = org.stripe_subscription_id.as_deref().unwrap_or("none");
        report.several_subscriptions.push(Finding {
            subscription_ids: tally.by_organization[&org.id].clone(),
            note: format!(
                "governed by {governing}: the subscription granting the best access, the most \
                 recently started among equals"
            ),
            organization_id: Some(org.id),
        });
    }
    Ok(())
}

/// When the newest successful run finished, for the freshness gauge at start.
pub async fn publish_last_success(pool: &PgPool) {
    match reconciliation_runs::last_success(pool).await {
        Ok(Some(at)) => metrics::gauge!(RECONCILE_LAST_SUCCESS).set(at.timestamp() as f64),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "reading the last reconciliation failed"),
    }
}
