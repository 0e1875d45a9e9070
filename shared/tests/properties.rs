//! Property tests of the parsers that read what senders control: the `Stripe-Signature`
//! header, the webhook envelope, and the lenient Stripe models the worker reads payloads
//! with. Arbitrary input never panics, and what is written is read back the same.

use std::collections::HashMap;

use proptest::prelude::*;
use secrecy::SecretString;
use serde_json::{Value, json};
use shared::envelope::{self, MAX_TEXT_CHARS, MIN_CREATED};
use shared::signature::{self, Timestamp, header_for, parse_header, signature_hex};
use shared::stripe::{Event, Expandable, Invoice, PlanMapping, Subscription, interpret};

fn secrets(list: &[&str]) -> Vec<SecretString> {
    list.iter()
        .map(|s| SecretString::from(s.to_string()))
        .collect()
}

fn plans() -> PlanMapping {
    PlanMapping::new([
        ("enterprise", vec!["prod_enterprise".into()]),
        ("premium", vec!["price_premium".into()]),
        ("basic", vec!["price_basic".into()]),
    ])
    .expect("distinct keys")
}

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop_oneof![
            Just("sub_1"),
            Just("cus_1"),
            Just("active"),
            Just("price_basic")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::hash_map(
                prop_oneof![
                    "[a-z_]{1,8}".boxed(),
                    Just("id".to_owned()).boxed(),
                    Just("customer".to_owned()).boxed(),
                    Just("status".to_owned()).boxed(),
                    Just("items".to_owned()).boxed(),
                    Just("data".to_owned()).boxed(),
                    Just("price".to_owned()).boxed(),
                    Just("metadata".to_owned()).boxed(),
                    Just("parent".to_owned()).boxed(),
                    Just("subscription".to_owned()).boxed(),
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Text of 1 to 255 characters without NUL.
fn storable_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        any::<char>().prop_filter("no NUL", |c| *c != '\0'),
        1..=MAX_TEXT_CHARS,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

proptest! {
    #[test]
    fn any_header_bytes_are_read_without_panicking(header in prop::collection::vec(any::<u8>(), 0..400), payload in prop::collection::vec(any::<u8>(), 0..64), now in any::<i64>(), tolerance in any::<i64>()) {
        let _ = parse_header(&header);
        let _ = signature::verify(&payload, Some(&header), &secrets(&["whsec_a", ""]), now, tolerance);
    }

    #[test]
    fn headers_made_of_header_like_pieces_are_read_without_panicking(pieces in prop::collection::vec(prop_oneof![Just("t"), Just("v1"), Just("="), Just(","), Just(" "), Just("+"), Just("-"), Just("_"), Just("0"), Just("9"), Just("\u{a0}"), Just("ab")], 0..40), now in any::<i64>()) {
        let header: Vec<u8> = pieces.concat().chars().map(|c| c as u32 as u8).collect();
        let _ = signature::verify(b"{}", Some(&header), &secrets(&["whsec_a"]), now, 300);
    }

    #[test]
    fn a_header_stripe_would_send_reads_back_and_verifies(payload in prop::collection::vec(any::<u8>(), 0..256), t in any::<i64>(), secret in "whsec_[A-Za-z0-9]{1,32}") {
        let header = header_for(&payload, &secret, t);
        let parsed = parse_header(header.as_bytes()).expect("parses");
        prop_assert_eq!(parsed.timestamp.as_i64(), Some(t));
        prop_assert_eq!(parsed.timestamp.decimal(), t.to_string());
        let expected = signature_hex(&payload, &secret, &t.to_string());
        prop_assert_eq!(parsed.signatures, vec![expected.as_bytes()]);
        prop_assert_eq!(signature::verify(&payload, Some(header.as_bytes()), &secrets(&[&secret]), t, 300), Ok(()));
        // Anyone else's secret does not verify it.
        let other = format!("{secret}x");
        prop_assert_eq!(signature::verify(&payload, Some(header.as_bytes()), &secrets(&[&other]), t, 300), Err(signature::SignatureError::NoMatch));
    }

    #[test]
    fn any_way_python_writes_an_integer_reads_back_as_its_value(value in any::<i128>(), zeros in 0usize..5, plus in any::<bool>(), underscores in any::<bool>(), space in prop_oneof![Just(""), Just(" "), Just("\t"), Just("\u{a0}")]) {
        let digits = value.unsigned_abs().to_string();
        let digits = if underscores {
            digits.chars().flat_map(|c| ['_', c]).skip(1).collect::<String>()
        } else {
            digits
        };
        let sign = if value < 0 { "-" } else if plus { "+" } else { "" };
        let text = format!("{space}{sign}{}{digits}{space}", "0".repeat(zeros));
        let bytes: Vec<u8> = text.chars().map(|c| c as u32 as u8).collect();
        let parsed = Timestamp::parse(&bytes).expect("an integer");
        prop_assert_eq!(parsed.decimal(), value.to_string());
    }

    #[test]
    fn any_body_is_checked_without_panicking(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = envelope::parse(&body);
    }

    #[test]
    fn any_json_body_is_checked_without_panicking(value in json_value()) {
        let _ = envelope::parse(&serde_json::to_vec(&value).expect("json"));
    }

    #[test]
    fn a_storable_envelope_reads_back_the_same(id in storable_text(), event_type in storable_text(), created in MIN_CREATED..=253_402_300_799i64, livemode in any::<bool>(), api_version in prop::option::of(storable_text()), extra in json_value()) {
        let body = json!({
            "id": id, "type": event_type, "created": created, "livemode": livemode,
            "api_version": api_version, "object": "event", "data": { "object": extra }
        });
        let parsed = envelope::parse(&serde_json::to_vec_pretty(&body).expect("json")).expect("storable");
        prop_assert_eq!(&parsed.id, &id);
        prop_assert_eq!(&parsed.event_type, &event_type);
        prop_assert_eq!(parsed.created.timestamp(), created);
        prop_assert_eq!(parsed.livemode, livemode);
        prop_assert_eq!(parsed.api_version, api_version);
    }

    #[test]
    fn an_id_postgres_cannot_store_is_refused_naming_it(prefix in ".{0,10}", suffix in ".{0,10}", long in any::<bool>()) {
        let id = if long { "e".repeat(MAX_TEXT_CHARS + 1) } else { format!("{prefix}\0{suffix}") };
        let body = json!({ "id": id, "type": "invoice.paid", "created": 0 });
        let error = envelope::parse(&serde_json::to_vec(&body).expect("json")).expect_err("refused");
        prop_assert_eq!(error.field(), "id");
    }

    #[test]
    fn any_payload_of_a_handled_type_is_interpreted_without_panicking(object in json_value(), event_type in prop::sample::select(shared::stripe::HANDLED_EVENT_TYPES.to_vec())) {
        let event = json!({ "id": "evt_1", "type": event_type, "created": 1, "data": { "object": object } });
        if let Ok(event) = serde_json::from_value::<Event>(event) {
            let _ = interpret(&event, &plans());
        }
    }

    #[test]
    fn any_bytes_are_read_as_an_event_without_panicking(body in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(event) = serde_json::from_slice::<Event>(&body) {
            let _ = interpret(&event, &plans());
        }
    }

    #[test]
    fn a_subscription_reads_back_the_same(id in "sub_[A-Za-z0-9]{1,24}", customer in "cus_[A-Za-z0-9]{1,24}", expanded in any::<bool>(), status in prop::sample::select(vec!["incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled", "unpaid", "paused"]), cancel in any::<bool>(), ends in prop::collection::vec(prop::option::of(any::<i64>()), 0..4), organization in prop::option::of("org_[a-z0-9]{1,12}")) {
        let customer_json = if expanded { json!({ "id": customer, "object": "customer" }) } else { json!(customer) };
        let items: Vec<Value> = ends.iter().map(|end| json!({ "current_period_end": end, "price": { "id": "price_basic" } })).collect();
        let metadata: HashMap<&str, &str> = organization.iter().map(|o| ("organization_id", o.as_str())).collect();
        let body = json!({
            "id": id, "object": "subscription", "customer": customer_json, "status": status,
            "cancel_at_period_end": cancel, "metadata": metadata, "items": { "object": "list", "data": items }
        });
        let read: Subscription = serde_json::from_value(body).expect("a subscription");
        prop_assert_eq!(&read.id, &id);
        prop_assert_eq!(read.customer.id(), customer.as_str());
        prop_assert_eq!(read.status.as_str(), status);
        prop_assert_eq!(read.cancel_at_period_end, cancel);
        let read_ends: Vec<Option<i64>> = read.items.iter().flat_map(|l| &l.data).map(|i| i.current_period_end).collect();
        prop_assert_eq!(read_ends, ends);
        prop_assert_eq!(read.metadata.and_then(|m| m.get("organization_id").cloned()), organization);
    }

    #[test]
    fn an_invoice_names_its_subscription_on_old_and_new_api_versions(subscription in "sub_[A-Za-z0-9]{1,24}", new_shape in any::<bool>(), expanded in any::<bool>()) {
        let reference = if expanded { json!({ "id": subscription }) } else { json!(subscription) };
        let body = if new_shape {
            json!({ "customer": "cus_1", "parent": { "subscription_details": { "subscription": reference } } })
        } else {
            json!({ "customer": "cus_1", "subscription": reference })
        };
        let invoice: Invoice = serde_json::from_value(body).expect("an invoice");
        prop_assert_eq!(invoice.subscription_id(), Some(subscription.as_str()));
        let customer: Expandable = serde_json::from_value(json!("cus_1")).expect("an id");
        prop_assert_eq!(customer.id(), "cus_1");
    }
}
