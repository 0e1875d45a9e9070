//! Asking Stripe which organization a waiting customer belongs to.
//!
//! An event whose customer is linked to no organization is deferred. When a Stripe key is
//! configured, its customer is then looked up once (`GET /v1/customers/{id}`), outside any
//! apply transaction, by one background task per worker process:
//! - the customer's `metadata.organization_id` names an organization: the customer is linked
//!   to it (unless that organization has another customer already, as `customer.updated`
//!   would) and its deferred events are released;
//! - it names none, or Stripe says the customer was deleted: the customer is recorded in
//!   `foreign_customers` and its deferred events are released, to be `ignored` with that
//!   reason; its later events are `ignored` at once instead of waiting;
//! - a 404 or no answer changes nothing: the events keep waiting on their sparse re-check
//!   schedule, and each re-check asks again (a key of another account or mode answers 404,
//!   which must not make a whole account's customers foreign).
//!
//! Lookups never hold up applying: requests go through a bounded queue and are dropped when
//! it is full (counted as `skipped`; the next re-check asks again), and the Stripe client's
//! rate limit spaces the calls. A customer answered recently is not asked again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use shared::db::{foreign_customers, organizations, webhook_events};
use shared::metrics::CUSTOMER_LOOKUPS;
use shared::queue::EventQueue;
use shared::stripe::metadata_organization_id;
use shared::stripe_api::{StripeApiError, StripeClient};
use sqlx::PgPool;
use tokio::sync::mpsc;

/// Lookups waiting to run; beyond, requests are dropped.
const QUEUE: usize = 1024;
/// A customer answered within this long is not asked again.
const RECENT: Duration = Duration::from_secs(600);

/// Requests lookups; cheap to clone.
#[derive(Clone)]
pub struct CustomerLookup {
    requests: mpsc::Sender<String>,
}

/// What a lookup needs.
#[derive(Clone)]
pub struct LookupDeps {
    /// Postgres.
    pub pool: PgPool,
    /// The Stripe API.
    pub client: StripeClient,
    /// To enqueue the released events.
    pub queue: EventQueue,
}

impl CustomerLookup {
    /// Starts the lookup task; it ends when every `CustomerLookup` is dropped.
    pub fn start(deps: LookupDeps) -> CustomerLookup {
        let (requests, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(run(deps, receiver));
        CustomerLookup { requests }
    }

    /// Asks for these customers to be looked up; never waits.
    pub fn request<'a>(&self, customer_ids: impl Iterator<Item = &'a str>) {
        for id in customer_ids {
            if self.requests.try_send(id.to_owned()).is_err() {
                metrics::counter!(CUSTOMER_LOOKUPS, "outcome" => "skipped").increment(1);
            }
        }
    }
}

async fn run(deps: LookupDeps, mut receiver: mpsc::Receiver<String>) {
    let mut answered: HashMap<String, Instant> = HashMap::new();
    while let Some(customer_id) = receiver.recv().await {
        if answered
            .get(&customer_id)
            .is_some_and(|at| at.elapsed() < RECENT)
        {
            continue;
        }
        let outcome = match look_up(&deps, &customer_id).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(customer.id = %customer_id, error = %e, "customer lookup failed; its events keep waiting");
                metrics::counter!(CUSTOMER_LOOKUPS, "outcome" => "failed").increment(1);
                continue;
            }
        };
        tracing::info!(customer.id = %customer_id, outcome = ?outcome, "customer looked up");
        metrics::counter!(CUSTOMER_LOOKUPS, "outcome" => outcome.label()).increment(1);
        if answered.len() >= 10 * QUEUE {
            answered.retain(|_, at| at.elapsed() < RECENT);
        }
        answered.insert(customer_id, Instant::now());
    }
}

/// What Stripe's answer changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Linked to the organization its metadata names; `released` deferred events.
    Linked {
        /// The organization.
        organization_id: String,
        /// Deferred events released.
        released: usize,
    },
    /// Belongs to no organization; `released` deferred events, to be ignored.
    Foreign {
        /// Why, in words.
        reason: String,
        /// Deferred events released.
        released: usize,
    },
    /// Already linked (by a checkout or an event meanwhile): nothing to do.
    AlreadyLinked(String),
    /// The organization its metadata names has another customer: left waiting.
    Conflict {
        /// The organization.
        organization_id: String,
        /// Its customer.
        customer_id: String,
    },
    /// Stripe has no such customer (404): left waiting.
    NotFound,
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Linked { .. } => "linked",
            Outcome::Foreign { .. } => "foreign",
            Outcome::AlreadyLinked(_) => "already_linked",
            Outcome::Conflict { .. } => "conflict",
            Outcome::NotFound => "not_found",
        }
    }
}

/// Why a lookup changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// Stripe did not answer, or answered with an error other than 404.
    #[error(transparent)]
    Stripe(#[from] StripeApiError),
    /// Postgres failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// The fields of Stripe's customer (or deleted customer) object used here.
#[derive(Debug, Deserialize)]
struct CustomerAnswer {
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    metadata: Option<HashMap<String, String>>,
}

/// Asks Stripe about the customer and records the answer, in one transaction under the
/// customer's link lock (the lock every link and every apply transaction takes), then
/// enqueues the events it released.
pub async fn look_up(deps: &LookupDeps, customer_id: &str) -> Result<Outcome, LookupError> {
    let path = format!("/v1/customers/{customer_id}");
    let answer: CustomerAnswer = match deps.client.get(&path, &[]).await {
        Ok(answer) => answer,
        Err(e) if e.is_not_found() => return Ok(Outcome::NotFound),
        Err(e) => return Err(e.into()),
    };
    let organization = metadata_organization_id(&answer.metadata).filter(|_| !answer.deleted);
    let mut tx = deps.pool.begin().await?;
    organizations::lock_customer_links(&mut *tx, &[customer_id]).await?;
    if let Some(owner) = organizations::owner_of_customer(&mut *tx, customer_id).await? {
        return Ok(Outcome::AlreadyLinked(owner));
    }
    let foreign_reason = if answer.deleted {
        "Stripe says the customer was deleted"
    } else {
        "Stripe's customer names no metadata.organization_id"
    };
    match organization {
        Some(organization_id) => {
            organizations::ensure_exist(&mut *tx, &[organization_id]).await?;
            let linked =
                organizations::link_customer(&mut *tx, organization_id, customer_id).await?;
            if linked != customer_id {
                return Ok(Outcome::Conflict {
                    organization_id: organization_id.to_owned(),
                    customer_id: linked,
                });
            }
            foreign_customers::clear(&mut *tx, &[customer_id]).await?;
        }
        None => foreign_customers::mark(&mut *tx, customer_id, foreign_reason).await?,
    }
    let released = webhook_events::release_deferred(&mut *tx, &[customer_id]).await?;
    tx.commit().await?;
    deps.queue.push_released(&released).await;
    let released = released.len();
    Ok(match organization {
        Some(organization_id) => Outcome::Linked {
            organization_id: organization_id.to_owned(),
            released,
        },
        None => Outcome::Foreign {
            reason: foreign_reason.to_owned(),
            released,
        },
    })
}
