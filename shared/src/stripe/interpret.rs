//! What one event means for billing: [`interpret`] reads its `data.object` into the change
//! it carries (a subscription's snapshot or invoice, a payment, a lifetime purchase) and who
//! it is about.

use super::*;

/// The organization a subscription names: its own `metadata.organization_id`, else its
/// expanded customer's.
pub fn subscription_organization_id(subscription: &Subscription) -> Option<&str> {
    metadata_organization_id(&subscription.metadata)
        .or_else(|| subscription.customer.organization_id())
}

/// What one event changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BillingChange {
    /// Something about one subscription.
    Subscription {
        /// `sub_…`
        subscription_id: String,
        /// What.
        change: SubscriptionChange,
    },
    /// Something about one one-time payment (a `payment`-mode checkout, its payment intent,
    /// charge refunds or dispute).
    Payment(PaymentFacts),
}

impl BillingChange {
    /// The subscription it is about, if any.
    pub fn subscription_id(&self) -> Option<&str> {
        match self {
            BillingChange::Subscription {
                subscription_id, ..
            } => Some(subscription_id),
            BillingChange::Payment(_) => None,
        }
    }

    /// The payment it is about, if any.
    pub fn payment(&self) -> Option<&PaymentFacts> {
        match self {
            BillingChange::Payment(facts) => Some(facts),
            BillingChange::Subscription { .. } => None,
        }
    }
}

/// What an event means for billing, read from its `data.object`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpretation {
    /// The organization named by the event itself (`client_reference_id` or metadata).
    pub organization_id: Option<String>,
    /// The Stripe customer the event is about.
    pub customer_id: Option<String>,
    /// For a completed checkout: the link to record between organization and customer. (Any
    /// other event naming both links them too, but only an organization with no customer
    /// yet, and only a customer of no other organization.)
    pub link: Option<CheckoutLink>,
    /// The change to the billing state, if the event carries one.
    pub change: Option<BillingChange>,
}

/// What a completed checkout session links to an organization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutLink {
    /// The subscription created, for a `subscription`-mode session.
    pub subscription_id: Option<String>,
    /// The email the customer paid with.
    pub billing_email: Option<String>,
}

/// Why an event is recorded `ignored` rather than interpreted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    /// A type this service does not act on.
    #[error("event type {0} is not used for billing state")]
    UnhandledType(String),
    /// A handled type whose object lacks a field the rules need.
    #[error("{event_type} payload is missing fields the billing rules need: {reason}")]
    UnreadablePayload {
        /// The event type.
        event_type: String,
        /// What serde reported.
        reason: String,
    },
    /// A handled type that, by its content, does not concern billing state.
    #[error("{0}")]
    NotApplicable(&'static str),
}

/// The event types that change billing state or link a customer.
pub const HANDLED_EVENT_TYPES: [&str; 21] = [
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.closed",
    "customer.created",
    "customer.updated",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "customer.subscription.pending_update_applied",
    "customer.subscription.pending_update_expired",
    "customer.subscription.trial_will_end",
    "invoice.paid",
    "invoice.payment_failed",
];

/// Reads what an event means for billing.
pub fn interpret(event: &Event, plans: &PlanMapping) -> Result<Interpretation, Ignored> {
    match event.event_type.as_str() {
        "checkout.session.completed"
        | "checkout.session.async_payment_succeeded"
        | "checkout.session.async_payment_failed"
        | "checkout.session.expired" => checkout_session(&event.event_type, read(event)?),
        "payment_intent.succeeded" | "payment_intent.payment_failed" => {
            let intent: PaymentIntent = read(event)?;
            let organization_id = metadata_organization_id(&intent.metadata).map(str::to_owned);
            let change = if event.event_type == "payment_intent.succeeded" {
                PaymentChange::Succeeded
            } else {
                let error = intent.last_payment_error.as_ref();
                PaymentChange::Failed {
                    reason: error.and_then(|e| e.message.clone().or(e.code.clone())),
                }
            };
            Ok(Interpretation {
                customer_id: intent.customer.as_ref().map(|c| c.id().to_owned()),
                link: None,
                change: Some(BillingChange::Payment(PaymentFacts {
                    checkout_session_id: None,
                    payment_intent_id: Some(intent.id),
                    amount: intent.amount,
                    currency: intent.currency,
                    names_organization: organization_id.is_some(),
                    change,
                })),
                organization_id,
            })
        }
        "charge.refunded" => {
            let charge: Charge = read(event)?;
            let payment_intent = charge
                .payment_intent
                .as_ref()
                .ok_or(Ignored::NotApplicable(
                    "charge without a payment intent (not a Checkout payment)",
                ))?;
            let organization_id = metadata_organization_id(&charge.metadata).map(str::to_owned);
            Ok(Interpretation {
                customer_id: charge.customer.as_ref().map(|c| c.id().to_owned()),
                link: None,
                change: Some(BillingChange::Payment(PaymentFacts {
                    checkout_session_id: None,
                    payment_intent_id: Some(payment_intent.id().to_owned()),
                    amount: charge.amount,
                    currency: charge.currency,
                    names_organization: organization_id.is_some(),
                    change: PaymentChange::Refunded {
                        amount_refunded: charge.amount_refunded,
                        full: charge.refunded,
                    },
                })),
                organization_id,
            })
        }
        "charge.dispute.created" | "charge.dispute.closed" => {
            let dispute: Dispute = read(event)?;
            let payment_intent = dispute
                .payment_intent
                .as_ref()
                .ok_or(Ignored::NotApplicable(
                    "dispute without a payment intent (not a Checkout payment)",
                ))?;
            let organization_id = metadata_organization_id(&dispute.metadata).map(str::to_owned);
            // A dispute's amount is the disputed one, not the payment's: not recorded.
            let _ = (dispute.amount, &dispute.currency);
            Ok(Interpretation {
                customer_id: None,
                link: None,
                change: Some(BillingChange::Payment(PaymentFacts {
                    checkout_session_id: None,
                    payment_intent_id: Some(payment_intent.id().to_owned()),
                    amount: None,
                    currency: None,
                    names_organization: organization_id.is_some(),
                    change: PaymentChange::Dispute {
                        status: DisputeStatus::from_stripe(&dispute.status),
                        dispute_id: dispute.id,
                    },
                })),
                organization_id,
            })
        }
        "customer.created" | "customer.updated" => {
            let customer: Customer = read(event)?;
            let organization_id = metadata_organization_id(&customer.metadata).ok_or(
                Ignored::NotApplicable("customer has no metadata.organization_id"),
            )?;
            Ok(Interpretation {
                organization_id: Some(organization_id.to_owned()),
                customer_id: Some(customer.id),
                link: None,
                change: None,
            })
        }
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted"
        | "customer.subscription.paused"
        | "customer.subscription.resumed"
        | "customer.subscription.pending_update_applied"
        | "customer.subscription.pending_update_expired"
        | "customer.subscription.trial_will_end" => {
            let subscription: Subscription = read(event)?;
            let snapshot = subscription_snapshot(&subscription, plans).ok_or_else(|| {
                Ignored::UnreadablePayload {
                    event_type: event.event_type.clone(),
                    reason: format!("unknown subscription status {:?}", subscription.status),
                }
            })?;
            Ok(Interpretation {
                organization_id: subscription_organization_id(&subscription).map(str::to_owned),
                customer_id: Some(subscription.customer.id().to_owned()),
                link: None,
                change: Some(BillingChange::Subscription {
                    subscription_id: subscription.id,
                    change: SubscriptionChange::Snapshot(snapshot),
                }),
            })
        }
        "invoice.paid" | "invoice.payment_failed" => {
            let invoice: Invoice = read(event)?;
            let subscription_id = invoice
                .subscription_id()
                .ok_or(Ignored::NotApplicable(
                    "invoice does not belong to a subscription",
                ))?
                .to_owned();
            let facts = InvoiceFacts {
                invoice_id: invoice.id.clone(),
                created: invoice.created.and_then(timestamp),
                amount_paid: invoice.amount_paid,
                billing_reason: invoice.billing_reason.clone(),
            };
            let change = if event.event_type == "invoice.paid" {
                SubscriptionChange::InvoicePaid(facts)
            } else {
                SubscriptionChange::InvoicePaymentFailed(facts)
            };
            Ok(Interpretation {
                organization_id: invoice
                    .organization_id()
                    .or_else(|| {
                        invoice
                            .customer
                            .as_ref()
                            .and_then(Expandable::organization_id)
                    })
                    .map(str::to_owned),
                customer_id: invoice.customer.as_ref().map(|c| c.id().to_owned()),
                link: None,
                change: Some(BillingChange::Subscription {
                    subscription_id,
                    change,
                }),
            })
        }
        other => Err(Ignored::UnhandledType(other.to_owned())),
    }
}

/// A completed checkout links its customer to the organization in every mode. In `payment`
/// mode every checkout session event is also about the payment: `completed` paid (or
/// `async_payment_succeeded`) means it succeeded, `completed` unpaid that a delayed method is
/// processing, `async_payment_failed` that it failed, `expired` closes a pending one.
fn checkout_session(event_type: &str, session: CheckoutSession) -> Result<Interpretation, Ignored> {
    let organization_id = session
        .client_reference_id
        .clone()
        .filter(|id| !id.is_empty())
        .or_else(|| metadata_organization_id(&session.metadata).map(str::to_owned))
        .or_else(|| {
            session
                .customer
                .as_ref()
                .and_then(Expandable::organization_id)
                .map(str::to_owned)
        });
    let billing_email = session
        .customer_details
        .as_ref()
        .and_then(|d| d.email.clone())
        .or(session.customer_email.clone());
    let payment_change = match (event_type, session.payment_status.as_str()) {
        ("checkout.session.completed", "paid") => Some(PaymentChange::Succeeded),
        ("checkout.session.completed", "unpaid") => Some(PaymentChange::Pending),
        ("checkout.session.completed", _) => None,
        ("checkout.session.async_payment_succeeded", _) => Some(PaymentChange::Succeeded),
        ("checkout.session.async_payment_failed", _) => Some(PaymentChange::Failed {
            reason: Some("the delayed payment failed".to_owned()),
        }),
        _ => Some(PaymentChange::Expired),
    };
    let change = match session.mode.as_str() {
        "payment" => payment_change.map(|change| {
            BillingChange::Payment(PaymentFacts {
                checkout_session_id: session.id.clone(),
                payment_intent_id: session.payment_intent.as_ref().map(|p| p.id().to_owned()),
                amount: session.amount_total,
                currency: session.currency.clone(),
                names_organization: organization_id.is_some(),
                change,
            })
        }),
        "subscription" | "setup" if event_type == "checkout.session.completed" => None,
        "subscription" | "setup" => {
            return Err(Ignored::NotApplicable(
                "only payment-mode sessions are settled or expired here",
            ));
        }
        _ => {
            return Err(Ignored::NotApplicable(
                "checkout mode does not concern billing",
            ));
        }
    };
    let change = change.filter(|c| c.payment().is_some_and(|p| p.key().is_some()));
    let customer_id = session.customer.as_ref().map(|c| c.id().to_owned());
    if customer_id.is_none() && change.is_none() {
        return Err(Ignored::NotApplicable(
            "checkout without a customer and without a payment",
        ));
    }
    // An expired session links nothing: nobody bought anything.
    let links = event_type != "checkout.session.expired";
    Ok(Interpretation {
        organization_id,
        customer_id,
        link: links.then(|| CheckoutLink {
            subscription_id: session.subscription.as_ref().map(|s| s.id().to_owned()),
            billing_email,
        }),
        change,
    })
}

fn read<T: serde::de::DeserializeOwned>(event: &Event) -> Result<T, Ignored> {
    serde_json::from_str(event.data.object.get()).map_err(|e| Ignored::UnreadablePayload {
        event_type: event.event_type.clone(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn plans() -> PlanMapping {
        let keys = |k: &[&str]| k.iter().map(|k| k.to_string()).collect();
        PlanMapping::new([
            ("enterprise", keys(&["prod_ent"])),
            ("premium", keys(&["price_premium", "price_premium_yearly"])),
            ("basic", keys(&["basic_monthly", "prod_basic"])),
        ])
        .expect("distinct keys")
    }

    fn event(event_type: &str, object: serde_json::Value) -> Event {
        let event = json!({
            "id": "evt_1", "type": event_type, "created": 1_800_000_000, "data": { "object": object }
        });
        serde_json::from_str(&event.to_string()).expect("event")
    }

    fn subscription_with_price(price: serde_json::Value) -> serde_json::Value {
        json!({
            "id": "sub_1", "customer": "cus_1", "status": "active",
            "items": { "data": [{ "current_period_end": 1_800_086_400, "price": price }] }
        })
    }

    #[test]
    fn plans_map_by_any_of_their_prices_lookup_keys_or_products() {
        let cases = [
            (
                json!({ "id": "price_premium_yearly", "product": "prod_x" }),
                Some("premium"),
            ),
            (
                json!({ "id": "price_eur", "product": { "id": "prod_basic" } }),
                Some("basic"),
            ),
            (
                json!({ "id": "price_premium", "product": "prod_x" }),
                Some("premium"),
            ),
            (
                json!({ "id": "price_x", "lookup_key": "basic_monthly", "product": "prod_x" }),
                Some("basic"),
            ),
            (
                json!({ "id": "price_custom", "product": { "id": "prod_ent" } }),
                Some("enterprise"),
            ),
            (json!({ "id": "price_other", "product": "prod_x" }), None),
        ];
        for (price, plan) in cases {
            let subscription: Subscription =
                serde_json::from_value(subscription_with_price(price.clone())).expect("sub");
            let mapped = plans().plan_for(&subscription).map(|(plan, _)| plan);
            assert_eq!(mapped, plan, "{price}");
        }
    }

    #[test]
    fn a_paid_one_time_checkout_is_a_lifetime_purchase() {
        let session = json!({
            "id": "cs_1", "mode": "payment", "payment_status": "paid", "client_reference_id": "org_1",
            "customer": "cus_1", "subscription": null, "customer_details": { "email": "a@b.example" }
        });
        let facts = interpret(&event("checkout.session.completed", session), &plans())
            .expect("interpreted");
        assert_eq!(facts.organization_id.as_deref(), Some("org_1"));
        let payment = |facts: &Interpretation| {
            facts
                .change
                .as_ref()
                .and_then(BillingChange::payment)
                .map(|p| p.change.clone())
        };
        assert_eq!(payment(&facts), Some(PaymentChange::Succeeded));
        let unpaid = json!({
            "id": "cs_1", "mode": "payment", "payment_status": "unpaid",
            "client_reference_id": "org_1", "customer": "cus_1", "payment_intent": "pi_1",
            "amount_total": 5000, "currency": "eur"
        });
        let facts = interpret(
            &event("checkout.session.completed", unpaid.clone()),
            &plans(),
        )
        .expect("a link");
        assert_eq!(
            (
                facts.customer_id.as_deref(),
                payment(&facts),
                facts.link.is_some()
            ),
            (Some("cus_1"), Some(PaymentChange::Pending), true),
            "an unpaid one-time checkout links its customer and records a pending payment"
        );
        let settled = interpret(
            &event("checkout.session.async_payment_succeeded", unpaid.clone()),
            &plans(),
        )
        .expect("settled");
        let facts = settled.change.as_ref().and_then(BillingChange::payment);
        assert_eq!(
            facts.map(|p| (p.key(), p.amount, p.change.clone())),
            Some((Some("pi_1"), Some(5000), PaymentChange::Succeeded))
        );
        let expired =
            interpret(&event("checkout.session.expired", unpaid), &plans()).expect("expired");
        assert_eq!(payment(&expired), Some(PaymentChange::Expired));
        assert!(expired.link.is_none(), "an expired session links nothing");
    }

    #[test]
    fn a_setup_checkout_and_customer_metadata_link_the_customer() {
        let setup = json!({
            "mode": "setup", "payment_status": "no_payment_required",
            "client_reference_id": "org_1", "customer": "cus_1"
        });
        let facts =
            interpret(&event("checkout.session.completed", setup), &plans()).expect("a link");
        assert_eq!(
            (
                facts.organization_id.as_deref(),
                facts.customer_id.as_deref()
            ),
            (Some("org_1"), Some("cus_1"))
        );
        assert!(facts.link.is_some() && facts.change.is_none());

        let customer = json!({ "id": "cus_2", "metadata": { "organization_id": "org_2" } });
        let facts = interpret(&event("customer.updated", customer), &plans()).expect("interpreted");
        assert_eq!(
            (
                facts.organization_id.as_deref(),
                facts.customer_id.as_deref()
            ),
            (Some("org_2"), Some("cus_2"))
        );
        let anonymous = json!({ "id": "cus_3", "metadata": {} });
        assert!(matches!(
            interpret(&event("customer.created", anonymous), &plans()),
            Err(Ignored::NotApplicable(_))
        ));
    }

    #[test]
    fn a_subscription_snapshot_reads_cancel_at_trial_and_every_price() {
        let sub = json!({
            "id": "sub_1", "customer": "cus_1", "status": "trialing", "created": 1_800_000_000,
            "cancel_at_period_end": false, "cancel_at": 1_800_500_000, "trial_end": 1_800_100_000,
            "pending_update": { "expires_at": 1_800_001_000 },
            "items": { "data": [
                { "current_period_end": 1_800_086_400, "quantity": 1, "price": { "id": "price_seat" } },
                { "current_period_end": 1_800_086_400, "quantity": 7,
                  "price": { "id": "price_premium", "product": "prod_x" } }
            ] }
        });
        let subscription: Subscription = serde_json::from_value(sub).expect("sub");
        let snapshot = subscription_snapshot(&subscription, &plans()).expect("known status");
        assert_eq!(snapshot.status, PlanStatus::Trialing);
        assert_eq!(snapshot.plan.as_deref(), Some("premium"));
        assert_eq!(snapshot.quantity, Some(7));
        assert_eq!(snapshot.price_ids, vec!["price_seat", "price_premium"]);
        assert_eq!(snapshot.cancel_at, timestamp(1_800_500_000));
        assert_eq!(snapshot.trial_end, timestamp(1_800_100_000));
        assert_eq!(snapshot.started_at, timestamp(1_800_000_000));
        assert!(snapshot.pending_update);
    }

    #[test]
    fn the_organization_comes_from_metadata_when_present() {
        let mut sub = subscription_with_price(json!({ "id": "price_premium" }));
        sub["metadata"] = json!({ "organization_id": "org_meta" });
        let facts =
            interpret(&event("customer.subscription.updated", sub), &plans()).expect("interpreted");
        assert_eq!(facts.organization_id.as_deref(), Some("org_meta"));
        assert_eq!(facts.customer_id.as_deref(), Some("cus_1"));
        let invoice = json!({
            "customer": "cus_1", "amount_paid": 100,
            "parent": { "subscription_details": { "subscription": "sub_1", "metadata": { "organization_id": "org_inv" } } }
        });
        let facts = interpret(&event("invoice.paid", invoice), &plans()).expect("interpreted");
        assert_eq!(facts.organization_id.as_deref(), Some("org_inv"));
    }

    #[test]
    fn refunds_disputes_and_payment_intents_name_their_payment_intent() {
        let charge = json!({
            "id": "ch_1", "amount": 5000, "amount_refunded": 5000, "refunded": true,
            "currency": "eur", "payment_intent": "pi_1", "customer": null, "metadata": {}
        });
        let facts = interpret(&event("charge.refunded", charge), &plans()).expect("refund");
        let payment = facts
            .change
            .as_ref()
            .and_then(BillingChange::payment)
            .cloned();
        assert_eq!(
            payment.map(|p| (p.payment_intent_id, p.change)),
            Some((
                Some("pi_1".to_owned()),
                PaymentChange::Refunded {
                    amount_refunded: 5000,
                    full: true
                }
            ))
        );
        let dispute =
            json!({ "id": "dp_1", "status": "lost", "charge": "ch_1", "payment_intent": "pi_1" });
        let facts = interpret(&event("charge.dispute.closed", dispute), &plans()).expect("dispute");
        assert_eq!(
            facts
                .change
                .as_ref()
                .and_then(BillingChange::payment)
                .map(|p| p.change.clone()),
            Some(PaymentChange::Dispute {
                dispute_id: "dp_1".to_owned(),
                status: DisputeStatus::Lost
            })
        );
        let intent = json!({
            "id": "pi_1", "amount": 5000, "currency": "eur",
            "metadata": { "organization_id": "org_1" },
            "last_payment_error": { "code": "card_declined", "message": "Your card was declined." }
        });
        let facts =
            interpret(&event("payment_intent.payment_failed", intent), &plans()).expect("intent");
        assert_eq!(facts.organization_id.as_deref(), Some("org_1"));
        let payment = facts
            .change
            .as_ref()
            .and_then(BillingChange::payment)
            .cloned();
        assert_eq!(
            payment.map(|p| (p.names_organization, p.change)),
            Some((
                true,
                PaymentChange::Failed {
                    reason: Some("Your card was declined.".to_owned())
                }
            ))
        );
        let bare_charge = json!({ "id": "ch_2", "amount": 100, "payment_intent": null });
        assert!(matches!(
            interpret(&event("charge.refunded", bare_charge), &plans()),
            Err(Ignored::NotApplicable(_))
        ));
    }

    #[test]
    fn an_invoice_without_a_subscription_is_not_applicable() {
        let invoice = json!({ "customer": "cus_1", "amount_paid": 100, "parent": null, "subscription": null });
        assert!(matches!(
            interpret(&event("invoice.paid", invoice), &plans()),
            Err(Ignored::NotApplicable(_))
        ));
    }
}
