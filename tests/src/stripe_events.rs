//! Stripe events built from Stripe's published example objects (`fixtures/stripe/`): each
//! builder takes the fixture, sets the ids, statuses and times a test needs, and wraps the
//! object in the event envelope of `event.json`.

use serde_json::{Value, json};

const EVENT: &str = include_str!("../fixtures/stripe/event.json");
const SUBSCRIPTION: &str = include_str!("../fixtures/stripe/subscription.json");
const INVOICE: &str = include_str!("../fixtures/stripe/invoice.json");
const CHECKOUT_SESSION: &str = include_str!("../fixtures/stripe/checkout_session.json");

/// The API version the current-shape events claim.
pub const CURRENT_API_VERSION: &str = "2026-09-30.endive";
/// An API version from before `current_period_end` moved to subscription items.
pub const OLD_API_VERSION: &str = "2024-06-20";

/// The price and product keys the tests configure as plans.
pub const BASIC_PRICE: &str = "price_basic_monthly";
/// See [`BASIC_PRICE`].
pub const PREMIUM_PRICE: &str = "price_premium_monthly";
/// See [`BASIC_PRICE`].
pub const ENTERPRISE_PRODUCT: &str = "prod_enterprise";

fn fixture(text: &str) -> Value {
    serde_json::from_str(text).expect("fixtures are valid JSON")
}

/// Wraps an object in an event envelope.
pub fn event(id: &str, event_type: &str, created: i64, object: Value) -> Value {
    let mut event = fixture(EVENT);
    event["id"] = json!(id);
    event["type"] = json!(event_type);
    event["created"] = json!(created);
    event["api_version"] = json!(CURRENT_API_VERSION);
    event["data"] = json!({ "object": object });
    event
}

/// Who a lifecycle is about.
#[derive(Debug, Clone)]
pub struct Customer {
    /// The product's organization id.
    pub organization_id: String,
    /// `cus_…`
    pub customer_id: String,
    /// `sub_…`
    pub subscription_id: String,
}

impl Customer {
    /// Ids derived from one tag, unique per test.
    pub fn new(tag: &str) -> Customer {
        Customer {
            organization_id: format!("org_{tag}"),
            customer_id: format!("cus_{tag}"),
            subscription_id: format!("sub_{tag}"),
        }
    }

    /// Another subscription of the same organization and customer, `sub_<tag>_<suffix>`.
    pub fn with_subscription(&self, suffix: &str) -> Customer {
        Customer {
            subscription_id: format!("{}_{suffix}", self.subscription_id),
            ..self.clone()
        }
    }

    /// The `checkout.session.completed` of a paid one-time (`payment`-mode) purchase.
    pub fn lifetime_checkout_event(&self, created: i64) -> Value {
        let mut session = self.checkout_session("payment");
        session["id"] = json!(format!("cs_test_{}_lifetime", self.customer_id));
        event(
            &format!("evt_{}_lifetime", self.customer_id),
            "checkout.session.completed",
            created,
            session,
        )
    }

    /// An event about this customer's subscription, id `evt_<subscription>_<name>`.
    pub fn event(&self, name: &str, event_type: &str, created: i64, object: Value) -> Value {
        event(
            &format!("evt_{}_{name}", self.subscription_id),
            event_type,
            created,
            object,
        )
    }

    /// A `checkout.session` completed in `subscription` mode, naming the organization in
    /// `client_reference_id`.
    pub fn checkout_session(&self, mode: &str) -> Value {
        let mut session = fixture(CHECKOUT_SESSION);
        session["id"] = json!(format!("cs_test_{}", self.customer_id));
        session["mode"] = json!(mode);
        session["status"] = json!("complete");
        session["payment_status"] = json!("paid");
        session["client_reference_id"] = json!(self.organization_id);
        session["customer"] = json!(self.customer_id);
        session["customer_details"]["email"] =
            json!(format!("billing@{}.example", self.organization_id));
        session["subscription"] = if mode == "subscription" {
            json!(self.subscription_id)
        } else {
            Value::Null
        };
        session
    }

    /// The `checkout.session.completed` event of [`Customer::checkout_session`] in
    /// `subscription` mode, id `evt_<customer>_checkout`, created at `created`.
    pub fn checkout_event(&self, created: i64) -> Value {
        event(
            &format!("evt_{}_checkout", self.customer_id),
            "checkout.session.completed",
            created,
            self.checkout_session("subscription"),
        )
    }

    /// A subscription object on the current API shape (period end on the items).
    pub fn subscription(&self, status: &str, cancel_at_period_end: bool, period_end: i64) -> Value {
        let mut sub = fixture(SUBSCRIPTION);
        sub["id"] = json!(self.subscription_id);
        sub["customer"] = json!(self.customer_id);
        sub["status"] = json!(status);
        sub["cancel_at_period_end"] = json!(cancel_at_period_end);
        sub["metadata"] = json!({});
        sub["ended_at"] = if status == "canceled" {
            json!(period_end)
        } else {
            Value::Null
        };
        sub["canceled_at"] = sub["ended_at"].clone();
        sub["cancel_at"] = Value::Null;
        let item = &mut sub["items"]["data"][0];
        item["subscription"] = json!(self.subscription_id);
        item["current_period_end"] = json!(period_end);
        item["current_period_start"] = json!(period_end - 30 * 86_400);
        item["price"]["id"] = json!(PREMIUM_PRICE);
        sub["created"] = json!(period_end - 30 * 86_400);
        sub
    }

    /// The same subscription rendered by an API version before 2025-03-31: the period end on
    /// the subscription itself, none on the items.
    pub fn old_subscription(
        &self,
        status: &str,
        cancel_at_period_end: bool,
        period_end: i64,
    ) -> Value {
        let mut sub = self.subscription(status, cancel_at_period_end, period_end);
        sub["current_period_end"] = json!(period_end);
        sub["current_period_start"] = json!(period_end - 30 * 86_400);
        let item = sub["items"]["data"][0]
            .as_object_mut()
            .expect("item is an object");
        item.remove("current_period_end");
        item.remove("current_period_start");
        sub
    }

    /// An invoice of the subscription on the current API shape
    /// (`parent.subscription_details.subscription`); `billing_reason` is
    /// `subscription_create` for the first invoice, `subscription_cycle` for renewals.
    pub fn invoice(&self, amount_paid: i64, billing_reason: &str) -> Value {
        let mut invoice = fixture(INVOICE);
        invoice["id"] = json!(format!(
            "in_{}_{billing_reason}_{amount_paid}",
            self.subscription_id
        ));
        invoice["customer"] = json!(self.customer_id);
        invoice["amount_paid"] = json!(amount_paid);
        invoice["billing_reason"] = json!(billing_reason);
        invoice["parent"] = json!({
            "quote_details": null,
            "subscription_details": { "metadata": {}, "subscription": self.subscription_id },
            "type": "subscription_details"
        });
        invoice["subscription"] = Value::Null;
        invoice
    }

    /// The same invoice on an older API version: `invoice.subscription`, no `parent`.
    pub fn old_invoice(&self, amount_paid: i64, billing_reason: &str) -> Value {
        let mut invoice = self.invoice(amount_paid, billing_reason);
        invoice
            .as_object_mut()
            .expect("invoice is an object")
            .remove("parent");
        invoice["subscription"] = json!(self.subscription_id);
        invoice
    }
}

/// One delivery of a lifecycle, and the state the billing endpoint should show after it.
#[derive(Debug, Clone)]
pub struct Step {
    /// The event.
    pub event: Value,
    /// Expected `plan_status`.
    pub plan_status: &'static str,
    /// Expected `cancel_at_period_end`.
    pub cancel_at_period_end: bool,
}

/// The subscription lifecycle of the foundation issue: checkout completed → created incomplete
/// → invoice paid → payment failed → updated past_due → invoice paid → updated
/// cancel_at_period_end → deleted. Events are one second apart from `start`.
pub fn subscription_lifecycle(customer: &Customer, start: i64) -> Vec<Step> {
    let period_end = start + 30 * 86_400;
    let ev = |n: i64, event_type: &str, object: Value| {
        event(
            &format!("evt_{}_{n}", customer.subscription_id),
            event_type,
            start + n,
            object,
        )
    };
    let step = |event, plan_status, cancel_at_period_end| Step {
        event,
        plan_status,
        cancel_at_period_end,
    };
    vec![
        step(
            ev(
                0,
                "checkout.session.completed",
                customer.checkout_session("subscription"),
            ),
            "none",
            false,
        ),
        step(
            ev(
                1,
                "customer.subscription.created",
                customer.subscription("incomplete", false, period_end),
            ),
            "incomplete",
            false,
        ),
        step(
            ev(
                2,
                "invoice.paid",
                customer.invoice(2000, "subscription_create"),
            ),
            "active",
            false,
        ),
        step(
            ev(
                3,
                "invoice.payment_failed",
                customer.invoice(0, "subscription_cycle"),
            ),
            "past_due",
            false,
        ),
        step(
            ev(
                4,
                "customer.subscription.updated",
                customer.subscription("past_due", false, period_end),
            ),
            "past_due",
            false,
        ),
        step(
            ev(
                5,
                "invoice.paid",
                customer.invoice(2000, "subscription_cycle"),
            ),
            "active",
            false,
        ),
        step(
            ev(
                6,
                "customer.subscription.updated",
                customer.subscription("active", true, period_end),
            ),
            "active",
            true,
        ),
        step(
            ev(
                7,
                "customer.subscription.deleted",
                customer.subscription("canceled", true, period_end),
            ),
            "canceled",
            true,
        ),
    ]
}
