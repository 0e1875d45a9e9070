//! Billing actions for the product's backend, done right once so no backend talks to Stripe
//! itself: get or create the organization's Stripe Customer, start a Checkout Session, open
//! the Customer Portal. The only Stripe calls made on a request path (ingest runs them under
//! their own concurrency limit and deadline, apart from the webhook route).
//!
//! One customer per organization, whatever the concurrency: the customer is created with an
//! idempotency key derived from the organization id and parameters that never vary
//! (`metadata[organization_id]` only), so every concurrent or repeated call within Stripe's
//! 24 hours gets the same customer; name and email are set by an update after. The link is
//! stored at once, under the customer-link lock the apply transactions take, and the events
//! deferred for want of it are released; subscription events arriving before
//! `checkout.session.completed` then find their organization.

pub mod input;

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::Mutex;

use self::input::{CheckoutMode, CheckoutRequest, Plan, PortalFlow, PortalRequest};
use crate::billing::PlanStatus;
use crate::db::organizations::{self, Organization};
use crate::db::{foreign_customers, webhook_events};
use crate::enterprise::FieldError;
use crate::queue::EventQueue;
use crate::stripe::ORGANIZATION_METADATA_KEY;
use crate::stripe_api::{ListPage, StripeApiError, StripeClient};

/// The prices Checkout sells: each a price id (`price_…`) or a lookup key, resolved to a
/// price id once and cached.
#[derive(Debug, Clone)]
pub struct CheckoutPrices {
    /// Basic's (the first key of `STRIPE_BASIC_PRICE_KEY`).
    pub basic: String,
    /// Premium's (the first key of `STRIPE_PREMIUM_PRICE_KEY`).
    pub premium: String,
    /// Lifetime access (`STRIPE_LIFETIME_PRICE_KEY`), if sold.
    pub lifetime: Option<String>,
}

/// Why an action could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// A field of the request cannot be served (e.g. `mode: payment` with no lifetime price).
    #[error(transparent)]
    Field(#[from] FieldError),
    /// No such organization.
    #[error("organization {0:?} is not known")]
    UnknownOrganization(String),
    /// The organization's state refuses the action (`already_subscribed`, `no_customer`,
    /// `no_subscription`).
    #[error("{message}")]
    Conflict {
        /// Stable code.
        code: &'static str,
        /// What to do instead.
        message: String,
    },
    /// A configured price cannot be used.
    #[error("{0}")]
    PriceNotFound(String),
    /// Stripe refused or could not be reached.
    #[error(transparent)]
    Stripe(Box<StripeApiError>),
    /// The customer is linked to another organization (a person must decide).
    #[error("customer {customer_id} is linked to organization {owner}")]
    CustomerOwned {
        /// The customer.
        customer_id: String,
        /// Its organization.
        owner: String,
    },
    /// Postgres failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<StripeApiError> for ActionError {
    fn from(error: StripeApiError) -> ActionError {
        ActionError::Stripe(Box::new(error))
    }
}

/// A Checkout Session to send the user to.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckoutSession {
    /// `cs_…`
    pub id: String,
    /// Stripe's hosted page.
    pub url: String,
    /// The organization's customer.
    pub customer_id: String,
}

/// A Customer Portal session to send the user to.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PortalSession {
    /// Stripe's hosted portal.
    pub url: String,
    /// The flow it opens on, if any.
    pub flow: Option<&'static str>,
    /// The hosted page of the newest open invoice, for a past_due or unpaid organization.
    pub outstanding_invoice_url: Option<String>,
}

#[derive(Deserialize)]
struct Created {
    id: String,
    #[serde(default)]
    url: Option<String>,
}

#[derive(Deserialize)]
struct Invoice {
    #[serde(default)]
    hosted_invoice_url: Option<String>,
}

/// The actions, with their Stripe client and a cache of resolved prices.
pub struct BillingActions {
    pool: PgPool,
    client: StripeClient,
    queue: EventQueue,
    prices: CheckoutPrices,
    resolved: Mutex<HashMap<String, String>>,
}

/// Statuses of a subscription that still runs: a second one is refused.
const SUBSCRIBED: [PlanStatus; 5] = [
    PlanStatus::Active,
    PlanStatus::Trialing,
    PlanStatus::PastDue,
    PlanStatus::Unpaid,
    PlanStatus::Paused,
];

/// Which actions make sense for an organization now: `checkout` (nothing runs), `portal`
/// (it has a customer), `fix_payment` (a payment failed).
pub fn available(org: &Organization) -> Vec<&'static str> {
    let mut actions = Vec::new();
    if !org.has_lifetime() && !SUBSCRIBED.contains(&org.plan_status) {
        actions.push("checkout");
    }
    if org.stripe_customer_id.is_some() {
        actions.push("portal");
        if matches!(
            org.plan_status,
            PlanStatus::PastDue | PlanStatus::Unpaid | PlanStatus::Incomplete
        ) {
            actions.push("fix_payment");
        }
    }
    actions
}

/// A Stripe idempotency key for `scope` and `parts` (hashed: keys are at most 255 characters).
fn idempotency_key(scope: &str, parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    format!("{scope}-{}", hex::encode(hash.finalize()))
}

impl BillingActions {
    /// The actions over these resources.
    pub fn new(
        pool: PgPool,
        client: StripeClient,
        queue: EventQueue,
        prices: CheckoutPrices,
    ) -> BillingActions {
        BillingActions {
            pool,
            client,
            queue,
            prices,
            resolved: Mutex::new(HashMap::new()),
        }
    }

    /// Creates a Checkout Session for the organization, creating its customer first if needed.
    pub async fn checkout(
        &self,
        organization_id: &str,
        request: &CheckoutRequest,
        caller_key: Option<&str>,
    ) -> Result<CheckoutSession, ActionError> {
        let price_key = match request.mode {
            CheckoutMode::Subscription(Plan::Basic) => &self.prices.basic,
            CheckoutMode::Subscription(Plan::Premium) => &self.prices.premium,
            CheckoutMode::Payment => self.prices.lifetime.as_ref().ok_or_else(|| {
                FieldError::new(
                    "mode",
                    "payment (lifetime access) is not sold here: STRIPE_LIFETIME_PRICE_KEY is \
                     not configured",
                )
            })?,
        };
        let org = organizations::get(&self.pool, organization_id).await?;
        if let Some(org) = &org {
            refuse_second_purchase(org, request.mode)?;
        }
        let price = self.price(price_key).await?;
        let customer_id = match org.as_ref().and_then(|o| o.stripe_customer_id.clone()) {
            Some(customer) => customer,
            None => self.create_customer(organization_id, request).await?,
        };
        let mut form = vec![
            ("customer", customer_id.clone()),
            ("client_reference_id", organization_id.to_owned()),
            ("success_url", request.success_url.clone()),
            ("cancel_url", request.cancel_url.clone()),
            ("line_items[0][price]", price),
            ("line_items[0][quantity]", request.quantity.to_string()),
            ("automatic_tax[enabled]", "true".to_owned()),
            ("customer_update[address]", "auto".to_owned()),
            ("billing_address_collection", "required".to_owned()),
            ("metadata[organization_id]", organization_id.to_owned()),
        ];
        match request.mode {
            CheckoutMode::Subscription(_) => {
                form.push(("mode", "subscription".to_owned()));
                form.push((
                    "subscription_data[metadata][organization_id]",
                    organization_id.to_owned(),
                ));
                if let Some(days) = request.trial_period_days {
                    form.push(("subscription_data[trial_period_days]", days.to_string()));
                }
            }
            CheckoutMode::Payment => {
                form.push(("mode", "payment".to_owned()));
                form.push((
                    "payment_intent_data[metadata][organization_id]",
                    organization_id.to_owned(),
                ));
            }
        }
        // The caller's key makes a retried call return the first session; without one, each
        // call is its own (and our own retries of it still carry one key).
        let key = match caller_key {
            Some(key) => idempotency_key("checkout-session", &[organization_id, key]),
            None => format!("checkout-session-{}", uuid::Uuid::new_v4()),
        };
        let session: Created = self
            .client
            .post("/v1/checkout/sessions", &owned(&form), Some(&key))
            .await?;
        Ok(CheckoutSession {
            url: session.url.unwrap_or_default(),
            id: session.id,
            customer_id,
        })
    }

    /// Creates a Customer Portal session; "Fix now" (the payment-method flow and the open
    /// invoice's page) for a past_due or unpaid organization.
    pub async fn portal(
        &self,
        organization_id: &str,
        request: &PortalRequest,
    ) -> Result<PortalSession, ActionError> {
        let org = organizations::get(&self.pool, organization_id)
            .await?
            .ok_or_else(|| ActionError::UnknownOrganization(organization_id.to_owned()))?;
        let customer = org
            .stripe_customer_id
            .clone()
            .ok_or_else(|| ActionError::Conflict {
                code: "no_customer",
                message: format!(
                    "organization {organization_id} has no Stripe customer yet: start a checkout \
                 (POST /v1/organizations/{organization_id}/checkout-sessions) first"
                ),
            })?;
        let failing = matches!(org.plan_status, PlanStatus::PastDue | PlanStatus::Unpaid);
        let flow = request
            .flow
            .or(failing.then_some(PortalFlow::PaymentMethodUpdate));
        let mut form = vec![
            ("customer", customer.clone()),
            ("return_url", request.return_url.clone()),
        ];
        if let Some(flow) = flow {
            form.push(("flow_data[type]", flow.as_str().to_owned()));
            if flow != PortalFlow::PaymentMethodUpdate {
                let subscription = org
                    .stripe_subscription_id
                    .clone()
                    .filter(|_| SUBSCRIBED.contains(&org.plan_status))
                    .ok_or_else(|| ActionError::Conflict {
                        code: "no_subscription",
                        message: format!(
                            "organization {organization_id} has no running subscription to \
                             {}",
                            if flow == PortalFlow::SubscriptionCancel {
                                "cancel"
                            } else {
                                "change"
                            }
                        ),
                    })?;
                form.push((
                    if flow == PortalFlow::SubscriptionCancel {
                        "flow_data[subscription_cancel][subscription]"
                    } else {
                        "flow_data[subscription_update][subscription]"
                    },
                    subscription,
                ));
            }
        }
        let key = format!("portal-session-{}", uuid::Uuid::new_v4());
        let session: Created = self
            .client
            .post("/v1/billing_portal/sessions", &owned(&form), Some(&key))
            .await?;
        let outstanding_invoice_url = if failing {
            self.outstanding_invoice(&customer).await
        } else {
            None
        };
        Ok(PortalSession {
            url: session.url.unwrap_or_default(),
            flow: flow.map(PortalFlow::as_str),
            outstanding_invoice_url,
        })
    }

    /// The newest open invoice's hosted page; `None` when there is none or Stripe does not
    /// answer (the portal session is still worth giving).
    async fn outstanding_invoice(&self, customer: &str) -> Option<String> {
        let query = [
            ("customer", customer.to_owned()),
            ("status", "open".to_owned()),
            ("limit", "1".to_owned()),
        ];
        match self
            .client
            .get::<ListPage<Invoice>>("/v1/invoices", &query)
            .await
        {
            Ok(page) => page.data.into_iter().next()?.hosted_invoice_url,
            Err(e) => {
                tracing::warn!(error = %e, "listing the open invoices failed; no outstanding invoice URL");
                None
            }
        }
    }

    /// Creates the organization's customer (idempotently), links it, releases the events that
    /// waited for it, then names it.
    async fn create_customer(
        &self,
        organization_id: &str,
        request: &CheckoutRequest,
    ) -> Result<String, ActionError> {
        let key = idempotency_key("organization-customer", &[organization_id]);
        let form = [(
            format!("metadata[{ORGANIZATION_METADATA_KEY}]"),
            organization_id.to_owned(),
        )];
        let customer: Created = self.client.post("/v1/customers", &form, Some(&key)).await?;
        let linked = self.link(organization_id, &customer.id).await?;
        if linked == customer.id {
            let mut details = Vec::new();
            if let Some(name) = &request.organization_name {
                details.push(("name".to_owned(), name.clone()));
            }
            if let Some(email) = &request.customer_email {
                details.push(("email".to_owned(), email.clone()));
            }
            if !details.is_empty() {
                let _: Created = self
                    .client
                    .post(&format!("/v1/customers/{}", customer.id), &details, None)
                    .await?;
            }
        }
        Ok(linked)
    }

    /// Links the customer to the organization unless it already has one; returns the
    /// organization's customer. Releases (and enqueues) the events deferred for it.
    async fn link(&self, organization_id: &str, customer_id: &str) -> Result<String, ActionError> {
        let mut tx = self.pool.begin().await?;
        organizations::lock_customer_links(&mut *tx, &[customer_id]).await?;
        organizations::ensure_exist(&mut *tx, &[organization_id]).await?;
        if let Some(owner) = organizations::owner_of_customer(&mut *tx, customer_id).await?
            && owner != organization_id
        {
            return Err(ActionError::CustomerOwned {
                customer_id: customer_id.to_owned(),
                owner,
            });
        }
        let linked = organizations::link_customer(&mut *tx, organization_id, customer_id).await?;
        let released = if linked == customer_id {
            foreign_customers::clear(&mut *tx, &[customer_id]).await?;
            webhook_events::release_deferred(&mut *tx, &[customer_id]).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        self.queue.push_released(&released).await;
        Ok(linked)
    }

    /// A price id for a configured key: itself when it is one, else the active price with that
    /// lookup key (asked once, then cached).
    async fn price(&self, key: &str) -> Result<String, ActionError> {
        if key.starts_with("price_") {
            return Ok(key.to_owned());
        }
        if let Some(id) = self.resolved.lock().await.get(key) {
            return Ok(id.clone());
        }
        let query = [
            ("lookup_keys[]", key.to_owned()),
            ("active", "true".to_owned()),
            ("limit", "1".to_owned()),
        ];
        let page: ListPage<Created> = self.client.get("/v1/prices", &query).await?;
        let id = page
            .data
            .into_iter()
            .next()
            .map(|price| price.id)
            .ok_or_else(|| {
                ActionError::PriceNotFound(format!("no active price has the lookup key {key:?}"))
            })?;
        self.resolved
            .lock()
            .await
            .insert(key.to_owned(), id.clone());
        Ok(id)
    }
}

fn refuse_second_purchase(org: &Organization, mode: CheckoutMode) -> Result<(), ActionError> {
    let conflict = |message: String| {
        Err(ActionError::Conflict {
            code: "already_subscribed",
            message,
        })
    };
    if org.has_lifetime() {
        return conflict(format!(
            "organization {} already has lifetime access",
            org.id
        ));
    }
    if matches!(mode, CheckoutMode::Subscription(_)) && SUBSCRIBED.contains(&org.plan_status) {
        return conflict(format!(
            "organization {} already has a {} subscription ({}): open the Customer Portal \
             (POST /v1/organizations/{}/portal-sessions) to change or fix it",
            org.id,
            org.plan_status,
            org.stripe_subscription_id.as_deref().unwrap_or("-"),
            org.id
        ));
    }
    Ok(())
}

fn owned(form: &[(&str, String)]) -> Vec<(String, String)> {
    form.iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}
