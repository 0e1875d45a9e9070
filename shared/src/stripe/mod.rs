//! Lenient models of the Stripe objects this service reads: only the fields it uses, accepting
//! both current (2025-03-31 "basil" and later) and older API versions. A typed client model
//! needs every required field of one pinned API version and fails on events from endpoints on
//! other versions; these models never do, so every stored event can be read.
//!
//! [`interpret`] turns one event into what the billing rules need: who it is about and what it
//! changes (a subscription's snapshot or invoice, a one-time payment's progress, refunds or
//! dispute, or only a link between an organization and a customer).

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::billing::PlanStatus;
use crate::billing::payment::{DisputeStatus, PaymentChange, PaymentFacts};
use crate::billing::subscription::{InvoiceFacts, Snapshot, SubscriptionChange};

mod interpret;
mod plans;

pub use self::interpret::*;
pub use self::plans::*;

/// The envelope fields ingest stores next to the raw body. Borrowed: ingest parses nothing else.
#[derive(Debug, Deserialize)]
pub struct EventEnvelope<'a> {
    /// `evt_…`
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// e.g. `invoice.paid`
    #[serde(rename = "type", borrow)]
    pub event_type: Cow<'a, str>,
    /// Unix seconds.
    pub created: i64,
    /// Live or test mode.
    #[serde(default)]
    pub livemode: bool,
    /// The API version the payload is rendered in.
    #[serde(default, borrow)]
    pub api_version: Option<Cow<'a, str>>,
}

/// A whole event as the worker reads it.
#[derive(Debug, Deserialize)]
pub struct Event {
    /// `evt_…`
    pub id: String,
    /// e.g. `invoice.paid`
    #[serde(rename = "type")]
    pub event_type: String,
    /// Unix seconds.
    pub created: i64,
    /// `data.object`, read by type.
    pub data: EventData,
}

/// `event.data`.
#[derive(Debug, Deserialize)]
pub struct EventData {
    /// The object the event is about, kept as its JSON text and read by type, so only the
    /// fields a model names are ever built (a JSON tree of the whole 5 KB object cost more
    /// than anything else the worker does with an event).
    pub object: Box<serde_json::value::RawValue>,
}

/// A field Stripe sends either as an id or, when expanded, as the object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Expandable {
    /// Not expanded: just the id.
    Id(String),
    /// Expanded object.
    Object {
        /// The object's id.
        id: String,
        /// The object's metadata, when it has some.
        #[serde(default)]
        metadata: Option<HashMap<String, String>>,
    },
}

impl Expandable {
    /// The id, expanded or not.
    pub fn id(&self) -> &str {
        match self {
            Expandable::Id(id) | Expandable::Object { id, .. } => id,
        }
    }

    fn organization_id(&self) -> Option<&str> {
        match self {
            Expandable::Id(_) => None,
            Expandable::Object { metadata, .. } => metadata_organization_id(metadata),
        }
    }
}

/// The metadata key under which the product stores its organization id on Stripe objects.
pub const ORGANIZATION_METADATA_KEY: &str = "organization_id";

/// The organization a Stripe object's metadata names (`metadata.organization_id`, not empty).
pub fn metadata_organization_id(metadata: &Option<HashMap<String, String>>) -> Option<&str> {
    metadata
        .as_ref()?
        .get(ORGANIZATION_METADATA_KEY)
        .map(String::as_str)
        .filter(|id| !id.is_empty())
}

/// `checkout.session` fields used here.
#[derive(Debug, Deserialize)]
pub struct CheckoutSession {
    /// `cs_…`
    #[serde(default)]
    pub id: Option<String>,
    /// The payment intent of a `payment`-mode session (set once the customer confirmed).
    #[serde(default)]
    pub payment_intent: Option<Expandable>,
    /// Total in minor units.
    #[serde(default)]
    pub amount_total: Option<i64>,
    /// Lower-case ISO currency.
    #[serde(default)]
    pub currency: Option<String>,
    /// `payment`, `subscription` or `setup`.
    pub mode: String,
    /// `paid`, `unpaid` or `no_payment_required`.
    pub payment_status: String,
    /// The product's organization id, set when the session was created.
    #[serde(default)]
    pub client_reference_id: Option<String>,
    /// The customer created or used by the session.
    #[serde(default)]
    pub customer: Option<Expandable>,
    /// The subscription created by a `subscription`-mode session.
    #[serde(default)]
    pub subscription: Option<Expandable>,
    /// Session metadata.
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
    /// Details the customer entered.
    #[serde(default)]
    pub customer_details: Option<CustomerDetails>,
    /// The email passed when the session was created.
    #[serde(default)]
    pub customer_email: Option<String>,
}

/// `checkout.session.customer_details`.
#[derive(Debug, Deserialize)]
pub struct CustomerDetails {
    /// The email the customer entered.
    #[serde(default)]
    pub email: Option<String>,
}

/// `subscription` fields used here.
#[derive(Debug, Deserialize)]
pub struct Subscription {
    /// `sub_…`
    pub id: String,
    /// The customer billed.
    pub customer: Expandable,
    /// One of the eight statuses.
    pub status: String,
    /// Ends at period end instead of renewing.
    #[serde(default)]
    pub cancel_at_period_end: bool,
    /// Only on API versions before 2025-03-31; newer ones have it per item.
    #[serde(default)]
    pub current_period_end: Option<i64>,
    /// When it ended.
    #[serde(default)]
    pub ended_at: Option<i64>,
    /// When it is scheduled to end (portal cancellations in flexible billing mode).
    #[serde(default)]
    pub cancel_at: Option<i64>,
    /// When a cancellation was requested.
    #[serde(default)]
    pub canceled_at: Option<i64>,
    /// End of the trial.
    #[serde(default)]
    pub trial_end: Option<i64>,
    /// When Stripe created it.
    #[serde(default)]
    pub created: Option<i64>,
    /// Set while updates wait for a payment; only its presence is read.
    #[serde(default)]
    pub pending_update: Option<serde::de::IgnoredAny>,
    /// Subscription metadata.
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
    /// The subscription items.
    #[serde(default)]
    pub items: Option<List<SubscriptionItem>>,
}

/// A Stripe list object.
#[derive(Debug, Deserialize)]
pub struct List<T> {
    /// The page of objects.
    pub data: Vec<T>,
}

/// `subscription_item` fields used here.
#[derive(Debug, Deserialize)]
pub struct SubscriptionItem {
    /// API 2025-03-31 and later.
    #[serde(default)]
    pub current_period_end: Option<i64>,
    /// The item's price.
    #[serde(default)]
    pub price: Option<Price>,
    /// How many of the price.
    #[serde(default)]
    pub quantity: Option<i64>,
}

/// `price` fields used here.
#[derive(Debug, Deserialize)]
pub struct Price {
    /// `price_…`
    pub id: String,
    /// The price's lookup key, if set.
    #[serde(default)]
    pub lookup_key: Option<String>,
    /// The product the price belongs to.
    #[serde(default)]
    pub product: Option<Expandable>,
}

/// `invoice` fields used here.
#[derive(Debug, Deserialize)]
pub struct Invoice {
    /// `in_…`
    #[serde(default)]
    pub id: Option<String>,
    /// When the invoice was created (unix seconds).
    #[serde(default)]
    pub created: Option<i64>,
    /// The customer billed.
    #[serde(default)]
    pub customer: Option<Expandable>,
    /// API versions before 2025-03-31.
    #[serde(default)]
    pub subscription: Option<Expandable>,
    /// API 2025-03-31 and later: what the invoice was created for.
    #[serde(default)]
    pub parent: Option<InvoiceParent>,
    /// Amount paid, smallest currency unit.
    #[serde(default)]
    pub amount_paid: i64,
    /// Why the invoice was created: `subscription_create` for a subscription's first one.
    #[serde(default)]
    pub billing_reason: Option<String>,
}

/// `payment_intent` fields used here.
#[derive(Debug, Deserialize)]
pub struct PaymentIntent {
    /// `pi_…`
    pub id: String,
    /// Amount in minor units.
    #[serde(default)]
    pub amount: Option<i64>,
    /// Lower-case ISO currency.
    #[serde(default)]
    pub currency: Option<String>,
    /// The customer, when there is one.
    #[serde(default)]
    pub customer: Option<Expandable>,
    /// `payment_intent_data[metadata]` of the checkout: `organization_id` names the buyer.
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
    /// Why the last attempt failed.
    #[serde(default)]
    pub last_payment_error: Option<PaymentError>,
}

/// `payment_intent.last_payment_error`.
#[derive(Debug, Deserialize)]
pub struct PaymentError {
    /// e.g. `card_declined`.
    #[serde(default)]
    pub code: Option<String>,
    /// Stripe's message.
    #[serde(default)]
    pub message: Option<String>,
}

/// `charge` fields used here.
#[derive(Debug, Deserialize)]
pub struct Charge {
    /// Amount in minor units.
    #[serde(default)]
    pub amount: Option<i64>,
    /// Refunded so far (cumulative).
    #[serde(default)]
    pub amount_refunded: i64,
    /// The whole charge is refunded.
    #[serde(default)]
    pub refunded: bool,
    /// Lower-case ISO currency.
    #[serde(default)]
    pub currency: Option<String>,
    /// The payment intent the charge belongs to.
    #[serde(default)]
    pub payment_intent: Option<Expandable>,
    /// The customer, when there is one.
    #[serde(default)]
    pub customer: Option<Expandable>,
    /// Charge metadata (Stripe copies the payment intent's).
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
}

/// `dispute` fields used here.
#[derive(Debug, Deserialize)]
pub struct Dispute {
    /// `dp_…`
    pub id: String,
    /// `needs_response`, `under_review`, `won`, `lost`, `warning_closed`…
    pub status: String,
    /// The payment intent of the disputed charge.
    #[serde(default)]
    pub payment_intent: Option<Expandable>,
    /// Disputed amount.
    #[serde(default)]
    pub amount: Option<i64>,
    /// Lower-case ISO currency.
    #[serde(default)]
    pub currency: Option<String>,
    /// Dispute metadata.
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
}

/// `customer` fields used here.
#[derive(Debug, Deserialize)]
pub struct Customer {
    /// `cus_…`
    pub id: String,
    /// Customer metadata: `organization_id` links it.
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
}

/// `invoice.parent`.
#[derive(Debug, Deserialize)]
pub struct InvoiceParent {
    /// Set when the invoice belongs to a subscription.
    #[serde(default)]
    pub subscription_details: Option<SubscriptionDetails>,
}

/// `invoice.parent.subscription_details`.
#[derive(Debug, Deserialize)]
pub struct SubscriptionDetails {
    /// The subscription.
    #[serde(default)]
    pub subscription: Option<Expandable>,
    /// A snapshot of the subscription's metadata when the invoice was finalized.
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
}

impl Invoice {
    /// The invoice's subscription: `parent.subscription_details.subscription` on current API
    /// versions, `subscription` on older ones.
    pub fn subscription_id(&self) -> Option<&str> {
        self.parent
            .as_ref()
            .and_then(|p| p.subscription_details.as_ref())
            .and_then(|d| d.subscription.as_ref())
            .or(self.subscription.as_ref())
            .map(Expandable::id)
    }

    fn organization_id(&self) -> Option<&str> {
        let details = self.parent.as_ref()?.subscription_details.as_ref()?;
        metadata_organization_id(&details.metadata)
    }
}

/// Converts Stripe's unix seconds.
pub fn timestamp(seconds: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(seconds, 0)
}
