//! The envelope of a webhook delivery: the fields ingest stores beside the raw body, checked
//! before the delivery joins a group commit. A delivery Postgres cannot store (a NUL in its
//! id, an id too long for the primary key's index, a `created` outside `timestamptz`) would
//! otherwise fail the insert of its whole batch; checked here, it is refused alone, with the
//! field named.
//!
//! Rules: the body is UTF-8 (Stripe always sends UTF-8 JSON, and its libraries refuse
//! anything else) and one JSON object; `id` and `type` are strings of 1 to
//! [`MAX_TEXT_CHARS`] characters without NUL; `api_version`, when present and not null, is
//! such a string too; `created` is a whole number of seconds within what both `chrono` and
//! Postgres' `timestamptz` hold; `livemode`, when present, is a boolean. Nothing else in the
//! body is read. The successful path is one parse into [`EventEnvelope`]; the slower diagnosis
//! of which field is wrong runs only for a refused body.

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use crate::stripe::EventEnvelope;

/// Longest `id`, `type` or `api_version` accepted, in characters. Stripe's are far shorter
/// (`evt_` and 24 characters); Postgres' index on `id` refuses keys past about 2,700 bytes.
pub const MAX_TEXT_CHARS: usize = 255;

/// Postgres' first `timestamptz`, 4714-11-24 BC 00:00:00 UTC, in unix seconds.
pub const MIN_CREATED: i64 = -210_866_803_200;

/// A delivery's envelope, checked and owned (it waits in the group commit's channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// `evt_…`
    pub id: String,
    /// e.g. `invoice.paid`
    pub event_type: String,
    /// Live or test mode (`false` when absent).
    pub livemode: bool,
    /// The API version the payload is rendered in.
    pub api_version: Option<String>,
    /// Stripe's `created`.
    pub created: DateTime<Utc>,
}

/// Why a body was refused. The messages are safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The body is not UTF-8.
    #[error("body is not UTF-8 (invalid byte at offset {valid_up_to})")]
    NotUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// The body is not one JSON object with the envelope's fields (the parser's message).
    #[error("body is not a Stripe event: {0}")]
    NotAnEvent(String),
    /// A field of the envelope is missing or unusable.
    #[error("{field} {problem}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

impl EnvelopeError {
    /// The field the error is about: an envelope field, or `body` for the whole body.
    pub fn field(&self) -> &'static str {
        match self {
            EnvelopeError::Field { field, .. } => field,
            EnvelopeError::NotUtf8 { .. } | EnvelopeError::NotAnEvent(_) => "body",
        }
    }
}

/// Checks `body` and returns its envelope.
pub fn parse(body: &[u8]) -> Result<Envelope, EnvelopeError> {
    let text = std::str::from_utf8(body).map_err(|e| EnvelopeError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let envelope: EventEnvelope<'_> =
        serde_json::from_str(text).map_err(|error| diagnose(text, error))?;
    let id = checked_text("id", envelope.id)?;
    let event_type = checked_text("type", envelope.event_type)?;
    let api_version = envelope
        .api_version
        .map(|v| checked_text("api_version", v))
        .transpose()?;
    let created = created(envelope.created)?;
    Ok(Envelope {
        id,
        event_type,
        livemode: envelope.livemode,
        api_version,
        created,
    })
}

fn checked_text(field: &'static str, value: Cow<'_, str>) -> Result<String, EnvelopeError> {
    let problem = if value.is_empty() {
        "is empty"
    } else if value.contains('\0') {
        "contains a NUL character"
    } else if value.chars().count() > MAX_TEXT_CHARS {
        "is longer than 255 characters"
    } else {
        return Ok(value.into_owned());
    };
    Err(EnvelopeError::Field { field, problem })
}

fn created(seconds: i64) -> Result<DateTime<Utc>, EnvelopeError> {
    (seconds >= MIN_CREATED)
        .then(|| DateTime::from_timestamp(seconds, 0))
        .flatten()
        .ok_or(EnvelopeError::Field {
            field: "created",
            problem: "is outside the timestamps Postgres can store",
        })
}

/// Names what is wrong with a UTF-8 body that did not parse as an envelope.
fn diagnose(text: &str, error: serde_json::Error) -> EnvelopeError {
    let Ok(fields) = serde_json::from_str::<HashMap<Cow<'_, str>, &RawValue>>(text) else {
        return EnvelopeError::NotAnEvent(error.to_string());
    };
    let field = |name: &'static str, problem: &'static str| EnvelopeError::Field {
        field: name,
        problem,
    };
    let is = |name: &str, check: fn(&str) -> bool| fields.get(name).map(|v| check(v.get()));
    let string = |raw: &str| serde_json::from_str::<Cow<'_, str>>(raw).is_ok();
    for name in ["id", "type"] {
        match is(name, string) {
            None => return field(name, "is missing"),
            Some(false) => return field(name, "must be a string"),
            Some(true) => {}
        }
    }
    match is("created", |raw| serde_json::from_str::<i64>(raw).is_ok()) {
        None => return field("created", "is missing"),
        Some(false) => return field("created", "must be a whole number of unix seconds"),
        Some(true) => {}
    }
    if is("livemode", |raw| {
        serde_json::from_str::<Option<bool>>(raw).is_ok()
    }) == Some(false)
    {
        return field("livemode", "must be a boolean");
    }
    if is("api_version", |raw| {
        serde_json::from_str::<Option<Cow<'_, str>>>(raw).is_ok()
    }) == Some(false)
    {
        return field("api_version", "must be a string");
    }
    // Duplicate keys, or something the checks above do not name.
    EnvelopeError::NotAnEvent(error.to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body(value: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&value).expect("json")
    }

    fn refused(value: serde_json::Value) -> (&'static str, String) {
        let error = parse(&body(value)).expect_err("refused");
        (error.field(), error.to_string())
    }

    #[test]
    fn a_stripe_event_gives_its_envelope() {
        let envelope = parse(&body(json!({
            "id": "evt_1", "object": "event", "type": "invoice.paid", "created": 1_800_000_000,
            "livemode": true, "api_version": "2025-03-31.basil", "data": { "object": {} }
        })))
        .expect("valid");
        assert_eq!(
            envelope,
            Envelope {
                id: "evt_1".into(),
                event_type: "invoice.paid".into(),
                livemode: true,
                api_version: Some("2025-03-31.basil".into()),
                created: DateTime::from_timestamp(1_800_000_000, 0).expect("time"),
            }
        );
        let minimal = parse(&body(
            json!({ "id": "evt_2", "type": "x", "created": 0, "api_version": null }),
        ))
        .expect("valid");
        assert_eq!((minimal.livemode, minimal.api_version), (false, None));
    }

    #[test]
    fn what_postgres_cannot_store_is_refused_naming_the_field() {
        let long = "e".repeat(256);
        let cases = [
            (
                json!({ "id": "evt\u{0}1", "type": "x", "created": 0 }),
                "id",
            ),
            (json!({ "id": "", "type": "x", "created": 0 }), "id"),
            (json!({ "id": long, "type": "x", "created": 0 }), "id"),
            (
                json!({ "id": "evt_1", "type": "a\u{0}", "created": 0 }),
                "type",
            ),
            (json!({ "id": "evt_1", "type": long, "created": 0 }), "type"),
            (
                json!({ "id": "evt_1", "type": "x", "created": 0, "api_version": "\u{0}" }),
                "api_version",
            ),
            (
                json!({ "id": "evt_1", "type": "x", "created": MIN_CREATED - 1 }),
                "created",
            ),
            (
                json!({ "id": "evt_1", "type": "x", "created": i64::MAX }),
                "created",
            ),
            (
                json!({ "id": "evt_1", "type": "x", "created": 1.5 }),
                "created",
            ),
            (
                json!({ "id": "evt_1", "type": "x", "created": 1e30 }),
                "created",
            ),
            (
                json!({ "id": "evt_1", "type": "x", "created": "1800000000" }),
                "created",
            ),
            (json!({ "type": "x", "created": 0 }), "id"),
            (json!({ "id": 7, "type": "x", "created": 0 }), "id"),
            (json!({ "id": "evt_1", "created": 0 }), "type"),
            (json!({ "id": "evt_1", "type": "x" }), "created"),
            (
                json!({ "id": "evt_1", "type": "x", "created": 0, "livemode": "yes" }),
                "livemode",
            ),
            (
                json!({ "id": "evt_1", "type": "x", "created": 0, "api_version": 3 }),
                "api_version",
            ),
            (json!(["evt_1"]), "body"),
        ];
        for (value, field) in cases {
            let (got, message) = refused(value.clone());
            assert_eq!(got, field, "{value}: {message}");
            assert!(message.starts_with(field), "{value}: {message}");
        }
        // 255 characters (not bytes) is the limit, and the first timestamp Postgres holds is fine.
        let at_limit = "é".repeat(255);
        assert!(
            parse(&body(
                json!({ "id": at_limit, "type": "x", "created": MIN_CREATED })
            ))
            .is_ok()
        );
    }

    #[test]
    fn bodies_that_are_not_utf8_json_are_refused_as_the_body() {
        let mut latin1 = br#"{"id":"evt_1","type":"x","created":0,"note":""#.to_vec();
        latin1.extend_from_slice(b"\xe9\"}");
        for bad in [
            latin1,
            b"".to_vec(),
            b"not json".to_vec(),
            br#"{"id":"evt_1"} x"#.to_vec(),
        ] {
            let error = parse(&bad).expect_err("refused");
            assert_eq!(error.field(), "body", "{error}");
        }
    }
}
