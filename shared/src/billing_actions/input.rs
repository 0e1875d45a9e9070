//! The bodies of the billing-action routes, parsed and validated: the first bad field, in the
//! documented order, is reported by name; unknown fields are ignored.

use serde_json::{Map, Value};

use crate::email_address;
use crate::enterprise::whole_number as whole;
use crate::enterprise::{FieldError, InputError, MAX_ORGANIZATION_NAME_LEN, text_field, type_name};

/// Longest URL accepted (Stripe's own limit on its URL parameters is larger).
pub const MAX_URL_LEN: usize = 2048;
/// Most seats one checkout sells.
pub const MAX_QUANTITY: i64 = 10_000;
/// Longest trial Stripe allows, in days.
pub const MAX_TRIAL_DAYS: i64 = 730;

/// A plan sold through Checkout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// `basic`.
    Basic,
    /// `premium`.
    Premium,
}

/// What a Checkout sells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutMode {
    /// A subscription to a plan.
    Subscription(Plan),
    /// Lifetime access, paid once.
    Payment,
}

/// `POST …/checkout-sessions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutRequest {
    /// What is sold.
    pub mode: CheckoutMode,
    /// Where Stripe sends the user after paying.
    pub success_url: String,
    /// Where Stripe sends the user who gives up.
    pub cancel_url: String,
    /// For a new customer.
    pub customer_email: Option<String>,
    /// For a new customer.
    pub organization_name: Option<String>,
    /// Seats, default 1.
    pub quantity: i64,
    /// A trial (subscriptions only).
    pub trial_period_days: Option<i64>,
}

/// A Customer Portal flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortalFlow {
    /// "Fix now": update the payment method.
    PaymentMethodUpdate,
    /// Cancel the subscription.
    SubscriptionCancel,
    /// Change the plan.
    SubscriptionUpdate,
}

impl PortalFlow {
    /// Stripe's name.
    pub fn as_str(self) -> &'static str {
        match self {
            PortalFlow::PaymentMethodUpdate => "payment_method_update",
            PortalFlow::SubscriptionCancel => "subscription_cancel",
            PortalFlow::SubscriptionUpdate => "subscription_update",
        }
    }
}

/// `POST …/portal-sessions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalRequest {
    /// Where the portal's "return" link leads.
    pub return_url: String,
    /// A flow to open directly, if asked.
    pub flow: Option<PortalFlow>,
}

fn object(body: &[u8]) -> Result<Map<String, Value>, InputError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| InputError::NotJson(e.to_string()))?;
    match value {
        Value::Object(object) => Ok(object),
        _ => Err(InputError::NotAnObject),
    }
}

fn optional_text(
    object: &Map<String, Value>,
    field: &'static str,
    max_len: usize,
) -> Result<Option<String>, FieldError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        value => text_field(value, field, max_len).map(Some),
    }
}

fn url(object: &Map<String, Value>, field: &'static str) -> Result<String, FieldError> {
    let text = text_field(object.get(field), field, MAX_URL_LEN)?;
    let absolute = reqwest::Url::parse(&text)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    if absolute.is_none() || text.contains(char::is_whitespace) {
        return Err(FieldError::new(
            field,
            "must be an absolute http:// or https:// URL",
        ));
    }
    Ok(text)
}

fn whole_number(
    object: &Map<String, Value>,
    field: &'static str,
    range: std::ops::RangeInclusive<i64>,
) -> Result<Option<i64>, FieldError> {
    let outside = || {
        FieldError::new(
            field,
            format!("must be between {} and {}", range.start(), range.end()),
        )
    };
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match whole(n) {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            Some(_) => Err(outside()),
            None if n.is_f64() => Err(FieldError::new(field, "must be a whole number")),
            None => Err(outside()),
        },
        Some(other) => Err(FieldError::new(
            field,
            format!("must be a whole number, not {}", type_name(other)),
        )),
    }
}

fn one_of<'a>(
    object: &'a Map<String, Value>,
    field: &'static str,
    choices: &[&str],
) -> Result<Option<&'a str>, FieldError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if choices.contains(&text.trim()) => Ok(Some(text.trim())),
        Some(_) => Err(FieldError::new(
            field,
            format!("must be one of {}", choices.join(", ")),
        )),
    }
}

/// Parses and validates a checkout request. `payment` mode needs no `plan`; `enterprise` is
/// refused with a pointer to the Enterprise route.
pub fn parse_checkout(body: &[u8]) -> Result<CheckoutRequest, InputError> {
    let object = object(body)?;
    let mode = one_of(&object, "mode", &["subscription", "payment"])?;
    let plan = match object.get("plan") {
        Some(Value::String(plan)) if plan.trim() == "enterprise" => {
            return Err(FieldError::new(
                "plan",
                "enterprise is not sold through Checkout: send the request to \
                 POST /v1/enterprise-requests (sales follows up)",
            )
            .into());
        }
        _ => one_of(&object, "plan", &["basic", "premium"])?,
    };
    let mode = match (mode, plan) {
        (Some("payment"), _) => CheckoutMode::Payment,
        (_, Some("basic")) => CheckoutMode::Subscription(Plan::Basic),
        (_, Some("premium")) => CheckoutMode::Subscription(Plan::Premium),
        _ => return Err(FieldError::new("plan", "is required (basic or premium)").into()),
    };
    let success_url = url(&object, "success_url")?;
    let cancel_url = url(&object, "cancel_url")?;
    let customer_email = optional_text(&object, "customer_email", email_address::MAX_ADDRESS_LEN)?;
    if let Some(email) = &customer_email {
        email_address::check(email)
            .map_err(|e| FieldError::new("customer_email", e.to_string()))?;
    }
    let organization_name = optional_text(&object, "organization_name", MAX_ORGANIZATION_NAME_LEN)?;
    let quantity = whole_number(&object, "quantity", 1..=MAX_QUANTITY)?.unwrap_or(1);
    let trial_period_days = whole_number(&object, "trial_period_days", 1..=MAX_TRIAL_DAYS)?;
    if trial_period_days.is_some() && mode == CheckoutMode::Payment {
        return Err(FieldError::new(
            "trial_period_days",
            "applies to subscriptions only, not to mode payment",
        )
        .into());
    }
    Ok(CheckoutRequest {
        mode,
        success_url,
        cancel_url,
        customer_email,
        organization_name,
        quantity,
        trial_period_days,
    })
}

/// Parses and validates a portal request.
pub fn parse_portal(body: &[u8]) -> Result<PortalRequest, InputError> {
    let object = object(body)?;
    let return_url = url(&object, "return_url")?;
    let flows = [
        PortalFlow::PaymentMethodUpdate,
        PortalFlow::SubscriptionCancel,
        PortalFlow::SubscriptionUpdate,
    ];
    let names: Vec<&str> = flows.iter().map(|f| f.as_str()).collect();
    let flow = one_of(&object, "flow", &names)?
        .and_then(|name| flows.into_iter().find(|f| f.as_str() == name));
    Ok(PortalRequest { return_url, flow })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> (String, String) {
        match parse_checkout(body.as_bytes()) {
            Err(InputError::Field(e)) => (e.field.into_owned(), e.message),
            other => panic!("{body}: {other:?}"),
        }
    }

    const URLS: &str =
        r#""success_url": "https://app.example/ok", "cancel_url": "https://app.example/no""#;

    #[test]
    fn checkout_bodies_are_checked_field_by_field() {
        let cases = [
            (format!(r#"{{{URLS}}}"#), "plan", "is required"),
            (format!(r#"{{"plan": "gold", {URLS}}}"#), "plan", "must be one of"),
            (format!(r#"{{"plan": "enterprise", {URLS}}}"#), "plan", "/v1/enterprise-requests"),
            (r#"{"plan": "basic", "success_url": "/relative", "cancel_url": "https://a.example"}"#.to_owned(), "success_url", "absolute"),
            (r#"{"plan": "basic", "success_url": "ftp://a.example/x", "cancel_url": "https://a.example"}"#.to_owned(), "success_url", "absolute"),
            (r#"{"plan": "basic", "success_url": "https://a.example"}"#.to_owned(), "cancel_url", "is required"),
            (format!(r#"{{"plan": "basic", {URLS}, "customer_email": "nope"}}"#), "customer_email", ""),
            (format!(r#"{{"plan": "basic", {URLS}, "quantity": 0}}"#), "quantity", "between 1 and 10000"),
            (format!(r#"{{"plan": "basic", {URLS}, "quantity": 2.5}}"#), "quantity", "whole number"),
            (format!(r#"{{"plan": "basic", {URLS}, "trial_period_days": 731}}"#), "trial_period_days", "between 1 and 730"),
            (format!(r#"{{"mode": "payment", {URLS}, "trial_period_days": 7}}"#), "trial_period_days", "subscriptions only"),
            (format!(r#"{{"plan": "basic", "mode": "setup", {URLS}}}"#), "mode", "must be one of"),
            (format!(r#"{{"plan": "basic", {URLS}, "organization_name": "a\u0007b"}}"#), "organization_name", "control characters"),
        ];
        for (body, field, message) in cases {
            let (got_field, got_message) = field_of(&body);
            assert_eq!(got_field, field, "{body}");
            assert!(got_message.contains(message), "{body}: {got_message}");
        }
    }

    #[test]
    fn a_valid_checkout_takes_defaults() {
        let body = format!(r#"{{"plan": "premium", {URLS}, "extra": true}}"#);
        let request = parse_checkout(body.as_bytes()).expect("valid");
        assert_eq!(request.mode, CheckoutMode::Subscription(Plan::Premium));
        assert_eq!((request.quantity, request.trial_period_days), (1, None));
        let body = format!(r#"{{"mode": "payment", {URLS}}}"#);
        assert_eq!(
            parse_checkout(body.as_bytes()).expect("valid").mode,
            CheckoutMode::Payment
        );
    }

    #[test]
    fn portal_bodies_are_checked() {
        let request = parse_portal(
            br#"{"return_url": "https://app.example/billing", "flow": "subscription_cancel"}"#,
        )
        .expect("valid");
        assert_eq!(request.flow, Some(PortalFlow::SubscriptionCancel));
        assert!(matches!(
            parse_portal(br#"{"return_url": "https://a.example", "flow": "refund"}"#),
            Err(InputError::Field(FieldError { field, .. })) if field == "flow"
        ));
        assert!(matches!(parse_portal(b"[]"), Err(InputError::NotAnObject)));
    }
}
