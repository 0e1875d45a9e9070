//! Stripe events built from Stripe's published example objects (`fixtures/stripe/`): each
//! builder takes the fixture, sets the ids, statuses and times a test needs, and wraps the
//! object in the event envelope of `event.json`.

use serde_json::{Value, json};

const EVENT: &str = include_str!("../fixtures/stripe/event.json");
const SUBSCRIPTION: &str = include_str!("../fixtures/stripe/subscription.json");
const INVOICE: &str = include_str!("../fixtures/stripe/invoice.json");
const CHECKOUT_SESSION: &str = include_str!("../fixtures/stripe/checkout_session.json");
const PAYMENT_INTENT: &str = include_str!("../fixtures/stripe/payment_intent.json");
const CHARGE: &str = include_str!("../fixtures/stripe/charge.json");
const REFUND: &str = include_str!("../fixtures/stripe/refund.json");

/// The price of the one-time purchases the tests make, in cents.
pub const PURCHASE_AMOUNT: i64 = 19_900;

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
        session["payment_intent"] = json!(format!("pi_{}_lifetime", self.customer_id));
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
        // The fixture's payment intent id is one for every customer: each purchase sets its own.
        session["payment_intent"] = Value::Null;
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

/// One one-time purchase of a customer: its checkout session, payment intent and charge,
/// with ids `cs_test_<customer>_<name>`, `pi_<customer>_<name>`, `ch_<customer>_<name>`.
#[derive(Debug, Clone)]
pub struct Purchase {
    /// Who buys.
    pub customer: Customer,
    /// Distinguishes several purchases of one customer.
    pub name: String,
}

impl Purchase {
    /// The `cs_…` id.
    pub fn session_id(&self) -> String {
        format!("cs_test_{}_{}", self.customer.customer_id, self.name)
    }

    /// The `pi_…` id.
    pub fn payment_intent_id(&self) -> String {
        format!("pi_{}_{}", self.customer.customer_id, self.name)
    }

    fn charge_id(&self) -> String {
        format!("ch_{}_{}", self.customer.customer_id, self.name)
    }

    /// An event about this purchase, id `evt_<customer>_<name>_<what>`.
    pub fn event(&self, what: &str, event_type: &str, created: i64, object: Value) -> Value {
        event(
            &format!("evt_{}_{}_{what}", self.customer.customer_id, self.name),
            event_type,
            created,
            object,
        )
    }

    /// The `payment`-mode checkout session, `payment_status` `paid` or `unpaid`.
    pub fn session(&self, payment_status: &str) -> Value {
        let mut session = self.customer.checkout_session("payment");
        session["id"] = json!(self.session_id());
        session["payment_status"] = json!(payment_status);
        session["payment_intent"] = json!(self.payment_intent_id());
        session["amount_total"] = json!(PURCHASE_AMOUNT);
        session["amount_subtotal"] = json!(PURCHASE_AMOUNT);
        session["currency"] = json!("eur");
        session
    }

    /// `checkout.session.completed`, paid by card (`paid`) or by a delayed method (`unpaid`).
    pub fn completed(&self, payment_status: &str, created: i64) -> Value {
        self.event(
            "completed",
            "checkout.session.completed",
            created,
            self.session(payment_status),
        )
    }

    /// `checkout.session.async_payment_succeeded` or `…_failed`.
    pub fn settled(&self, succeeded: bool, created: i64) -> Value {
        let (what, event_type, status) = if succeeded {
            (
                "async_succeeded",
                "checkout.session.async_payment_succeeded",
                "paid",
            )
        } else {
            (
                "async_failed",
                "checkout.session.async_payment_failed",
                "unpaid",
            )
        };
        self.event(what, event_type, created, self.session(status))
    }

    /// `checkout.session.expired`.
    pub fn expired(&self, created: i64) -> Value {
        let mut session = self.session("unpaid");
        session["status"] = json!("expired");
        self.event("expired", "checkout.session.expired", created, session)
    }

    /// The payment intent, `status` as Stripe says (`succeeded`, `requires_payment_method`…).
    pub fn payment_intent(&self, status: &str) -> Value {
        let mut intent = fixture(PAYMENT_INTENT);
        intent["id"] = json!(self.payment_intent_id());
        intent["status"] = json!(status);
        intent["amount"] = json!(PURCHASE_AMOUNT);
        intent["amount_received"] = json!(if status == "succeeded" {
            PURCHASE_AMOUNT
        } else {
            0
        });
        intent["currency"] = json!("eur");
        intent["customer"] = json!(self.customer.customer_id);
        intent["latest_charge"] = json!(self.charge_id());
        intent["metadata"] = json!({ "organization_id": self.customer.organization_id });
        if status != "requires_payment_method" {
            intent["last_payment_error"] = Value::Null;
        }
        intent
    }

    /// `payment_intent.succeeded` or `payment_intent.payment_failed`.
    pub fn intent_event(&self, succeeded: bool, created: i64) -> Value {
        if succeeded {
            self.event(
                "pi_succeeded",
                "payment_intent.succeeded",
                created,
                self.payment_intent("succeeded"),
            )
        } else {
            self.event(
                "pi_failed",
                "payment_intent.payment_failed",
                created,
                self.payment_intent("requires_payment_method"),
            )
        }
    }

    /// The charge after `amount_refunded` cents were refunded (all of it: `refunded: true`),
    /// with the refund inside. It names neither the customer nor the organization, as a
    /// guest Checkout's charge does: only its payment intent ties it to the purchase.
    pub fn charge(&self, amount_refunded: i64) -> Value {
        let mut charge = fixture(CHARGE);
        charge["id"] = json!(self.charge_id());
        charge["amount"] = json!(PURCHASE_AMOUNT);
        charge["amount_captured"] = json!(PURCHASE_AMOUNT);
        charge["captured"] = json!(true);
        charge["currency"] = json!("eur");
        charge["payment_intent"] = json!(self.payment_intent_id());
        charge["customer"] = Value::Null;
        charge["metadata"] = json!({});
        charge["amount_refunded"] = json!(amount_refunded);
        charge["refunded"] = json!(amount_refunded >= PURCHASE_AMOUNT);
        let mut refund = fixture(REFUND);
        refund["id"] = json!(format!("re_{}_{amount_refunded}", self.charge_id()));
        refund["amount"] = json!(amount_refunded);
        refund["charge"] = json!(self.charge_id());
        refund["payment_intent"] = json!(self.payment_intent_id());
        refund["currency"] = json!("eur");
        charge["refunds"] = json!({
            "object": "list", "data": [refund], "has_more": false,
            "url": format!("/v1/charges/{}/refunds", self.charge_id())
        });
        charge
    }

    /// `charge.refunded`, `amount_refunded` cents refunded in all so far.
    pub fn refunded(&self, amount_refunded: i64, created: i64) -> Value {
        self.event(
            &format!("refunded_{amount_refunded}"),
            "charge.refunded",
            created,
            self.charge(amount_refunded),
        )
    }

    /// A dispute of the charge (Stripe publishes no dispute fixture here; these are the
    /// fields of its API reference).
    pub fn dispute(&self, status: &str) -> Value {
        json!({
            "id": format!("dp_{}", self.charge_id()),
            "object": "dispute",
            "amount": PURCHASE_AMOUNT,
            "currency": "eur",
            "charge": self.charge_id(),
            "payment_intent": self.payment_intent_id(),
            "reason": "fraudulent",
            "status": status,
            "is_charge_refundable": false,
            "livemode": false,
            "metadata": {},
            "created": 1_234_567_890
        })
    }

    /// `charge.dispute.created` (`needs_response`) or `charge.dispute.closed` (`won`/`lost`).
    pub fn dispute_event(&self, status: &str, created: i64) -> Value {
        let event_type = if status == "needs_response" {
            "charge.dispute.created"
        } else {
            "charge.dispute.closed"
        };
        self.event(
            &format!("dispute_{status}"),
            event_type,
            created,
            self.dispute(status),
        )
    }
}

impl Customer {
    /// A one-time purchase of this customer.
    pub fn purchase(&self, name: &str) -> Purchase {
        Purchase {
            customer: self.clone(),
            name: name.to_owned(),
        }
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
