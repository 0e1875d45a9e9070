//! Enterprise plan requests: what the product's backend may send us, and storing one.
//!
//! Enterprise customers do not go through Stripe Checkout: the backend tells us, we tell sales
//! by email. [`parse_request`] turns a body into a validated [`EnterpriseRequestInput`], or an
//! error naming the offending field. [`submit`] stores the request and its outbox email in ONE
//! transaction, so the email exists exactly when the request does; the caller pushes the email
//! job after commit (if that push fails, the sweeper finds the outbox row).
//!
//! Idempotency: with an `Idempotency-Key`, a repeated call finds the stored request (unique
//! index) and answers its id without a second email. The same key with a different body is a
//! conflict, not silently the first answer: the caller has a bug, and telling it is safer than
//! dropping the second request.

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::{email_outbox, enterprise_requests};
use crate::email_address;

/// Longest `organization_id`, in characters.
pub const MAX_ORGANIZATION_ID_LEN: usize = 255;
/// Longest `organization_name`, in characters.
pub const MAX_ORGANIZATION_NAME_LEN: usize = 200;
/// Largest `member_count` we believe (larger is a bug in the caller).
pub const MAX_MEMBER_COUNT: i64 = 1_000_000;
/// Longest `Idempotency-Key`, in characters (Resend's limit is 256).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// A validated Enterprise request, with surrounding whitespace trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnterpriseRequestInput {
    /// The organization's id in the product.
    pub organization_id: String,
    /// Its display name (any text; escaped wherever it is shown).
    pub organization_name: String,
    /// The administrator who asked; sales replies to it.
    pub admin_email: String,
    /// Members of the organization, 1 to [`MAX_MEMBER_COUNT`].
    pub member_count: i32,
}

/// One field that is missing or unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {message}")]
pub struct FieldError {
    /// The field's name in the body (or the header's name), e.g. `member_count` or
    /// `records[3].value`.
    pub field: std::borrow::Cow<'static, str>,
    /// What is wrong, starting lower-case so it reads after the field's name.
    pub message: String,
}

impl FieldError {
    /// A field's error.
    pub fn new(
        field: impl Into<std::borrow::Cow<'static, str>>,
        message: impl Into<String>,
    ) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a body is not an Enterprise request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// Not JSON at all.
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("body must be a JSON object")]
    NotAnObject,
    /// A field is missing or unusable.
    #[error(transparent)]
    Field(#[from] FieldError),
}

/// Parses and validates a request body. Unknown fields are ignored (the caller may send more
/// than we read); the first bad field, in the documented field order, is reported.
pub fn parse_request(body: &[u8]) -> Result<EnterpriseRequestInput, InputError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| InputError::NotJson(e.to_string()))?;
    let object = value.as_object().ok_or(InputError::NotAnObject)?;
    let organization_id = text_field(
        object.get("organization_id"),
        "organization_id",
        MAX_ORGANIZATION_ID_LEN,
    )?;
    let organization_name = text_field(
        object.get("organization_name"),
        "organization_name",
        MAX_ORGANIZATION_NAME_LEN,
    )?;
    let admin_email = text_field(
        object.get("admin_email"),
        "admin_email",
        email_address::MAX_ADDRESS_LEN,
    )?;
    email_address::check(&admin_email)
        .map_err(|e| FieldError::new("admin_email", e.to_string()))?;
    let member_count = member_count(object.get("member_count"))?;
    Ok(EnterpriseRequestInput {
        organization_id,
        organization_name,
        admin_email,
        member_count,
    })
}

pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn text_field(
    value: Option<&Value>,
    field: &'static str,
    max_len: usize,
) -> Result<String, FieldError> {
    let text = match value {
        None | Some(Value::Null) => return Err(FieldError::new(field, "is required")),
        Some(Value::String(text)) => text.trim(),
        Some(other) => {
            return Err(FieldError::new(
                field,
                format!("must be a string, not {}", type_name(other)),
            ));
        }
    };
    if text.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if text.chars().count() > max_len {
        return Err(FieldError::new(
            field,
            format!("must be at most {max_len} characters"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters (line breaks, tabs, …)",
        ));
    }
    Ok(text.to_owned())
}

fn member_count(value: Option<&Value>) -> Result<i32, FieldError> {
    const FIELD: &str = "member_count";
    let range = || format!("must be between 1 and {MAX_MEMBER_COUNT}");
    let number = match value {
        None | Some(Value::Null) => return Err(FieldError::new(FIELD, "is required")),
        Some(Value::Number(number)) => number,
        Some(other) => {
            return Err(FieldError::new(
                FIELD,
                format!("must be a whole number, not {}", type_name(other)),
            ));
        }
    };
    match whole_number(number) {
        Some(n) if (1..=MAX_MEMBER_COUNT).contains(&n) => {
            i32::try_from(n).map_err(|_| FieldError::new(FIELD, range()))
        }
        Some(_) => Err(FieldError::new(FIELD, range())),
        // Too large for i64, or not whole.
        None if number.is_f64() => Err(FieldError::new(FIELD, "must be a whole number")),
        None => Err(FieldError::new(FIELD, range())),
    }
}

/// A JSON number as a whole number: `250.0` is one too (JSON Schema's `integer`, and how some
/// encoders write every number); `None` when it is not whole or too large.
pub(crate) fn whole_number(number: &serde_json::Number) -> Option<i64> {
    number.as_i64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() <= 1e15)
            .map(|f| f as i64)
    })
}

/// Checks an `Idempotency-Key` header value: 1 to [`MAX_IDEMPOTENCY_KEY_LEN`] visible ASCII
/// characters.
pub fn check_idempotency_key(key: &str) -> Result<(), FieldError> {
    const FIELD: &str = "Idempotency-Key";
    if key.is_empty() {
        return Err(FieldError::new(FIELD, "must not be empty"));
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(FieldError::new(
            FIELD,
            format!("must be at most {MAX_IDEMPOTENCY_KEY_LEN} characters"),
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FieldError::new(
            FIELD,
            "must be visible ASCII characters without spaces",
        ));
    }
    Ok(())
}

/// A stored request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// Our id of the request.
    pub request_id: Uuid,
    /// The outbox email written with it, whose job the caller pushes; `None` for a repeat of
    /// an earlier call (its email was written then).
    pub new_outbox_id: Option<Uuid>,
}

/// Why a request was not stored.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The idempotency key was used before with a different body.
    #[error(
        "Idempotency-Key was already used for a different request ({request_id}); use a new key for a new request"
    )]
    IdempotencyConflict {
        /// The request stored under the key.
        request_id: Uuid,
    },
    /// Postgres failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Stores the request and its outbox email in one transaction (see the module docs), or finds
/// the request stored earlier under the same idempotency key.
pub async fn submit(
    pool: &PgPool,
    input: &EnterpriseRequestInput,
    idempotency_key: Option<&str>,
) -> Result<Submitted, SubmitError> {
    let request_id = Uuid::new_v4();
    let mut tx = pool.begin().await?;
    let inserted = enterprise_requests::insert(
        &mut *tx,
        &enterprise_requests::NewEnterpriseRequest {
            id: request_id,
            organization_id: &input.organization_id,
            organization_name: &input.organization_name,
            admin_email: &input.admin_email,
            member_count: input.member_count,
            idempotency_key,
        },
    )
    .await?;
    if inserted {
        let outbox_id = Uuid::new_v4();
        email_outbox::insert(&mut *tx, outbox_id, request_id).await?;
        tx.commit().await?;
        return Ok(Submitted {
            request_id,
            new_outbox_id: Some(outbox_id),
        });
    }
    tx.rollback().await?;
    // Only a key conflict makes the insert do nothing, so there is a key and a stored row.
    let key = idempotency_key.unwrap_or_default();
    let stored = enterprise_requests::find_by_idempotency_key(pool, key)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    let same = stored.organization_id == input.organization_id
        && stored.organization_name == input.organization_name
        && stored.admin_email == input.admin_email
        && stored.member_count == input.member_count;
    if same {
        Ok(Submitted {
            request_id: stored.id,
            new_outbox_id: None,
        })
    } else {
        Err(SubmitError::IdempotencyConflict {
            request_id: stored.id,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn valid() -> Value {
        json!({
            "organization_id": "org_123",
            "organization_name": "Acme <script>alert(1)</script>",
            "admin_email": "admin@acme.example",
            "member_count": 250
        })
    }

    fn parse(value: &Value) -> Result<EnterpriseRequestInput, InputError> {
        parse_request(&serde_json::to_vec(value).expect("json"))
    }

    fn field_error(value: &Value) -> (&'static str, String) {
        match parse(value) {
            Err(InputError::Field(FieldError {
                field: std::borrow::Cow::Borrowed(field),
                message,
            })) => (field, message),
            other => panic!("expected a field error for {value}, got {other:?}"),
        }
    }

    fn with(field: &str, value: Value) -> Value {
        let mut body = valid();
        body[field] = value;
        body
    }

    fn without(field: &str) -> Value {
        let mut body = valid();
        body.as_object_mut().expect("object").remove(field);
        body
    }

    #[test]
    fn a_valid_body_is_parsed_trimmed_and_unknown_fields_are_ignored() {
        let mut body = with(
            "organization_name",
            json!("  Acme <script>alert(1)</script> "),
        );
        body["plan_hint"] = json!("enterprise");
        let input = parse(&body).expect("valid");
        assert_eq!(
            input,
            EnterpriseRequestInput {
                organization_id: "org_123".into(),
                organization_name: "Acme <script>alert(1)</script>".into(),
                admin_email: "admin@acme.example".into(),
                member_count: 250,
            }
        );
    }

    #[test]
    fn each_missing_field_is_named() {
        for field in [
            "organization_id",
            "organization_name",
            "admin_email",
            "member_count",
        ] {
            let (named, message) = field_error(&without(field));
            assert_eq!((named, message.as_str()), (field, "is required"));
            let (named, _) = field_error(&with(field, Value::Null));
            assert_eq!(named, field);
        }
    }

    #[test]
    fn wrong_types_are_named_with_what_was_sent() {
        assert_eq!(
            field_error(&with("organization_id", json!(123))),
            ("organization_id", "must be a string, not a number".into())
        );
        assert_eq!(
            field_error(&with("admin_email", json!(["a@b.co"]))),
            ("admin_email", "must be a string, not an array".into())
        );
        assert_eq!(
            field_error(&with("member_count", json!("12"))),
            (
                "member_count",
                "must be a whole number, not a string".into()
            )
        );
        assert_eq!(
            field_error(&with("member_count", json!(12.5))),
            ("member_count", "must be a whole number".into())
        );
    }

    #[test]
    fn member_counts_outside_one_to_a_million_are_refused() {
        for count in [json!(0), json!(-5), json!(1_000_001), json!(u64::MAX)] {
            assert_eq!(
                field_error(&with("member_count", count.clone())),
                ("member_count", "must be between 1 and 1000000".into()),
                "{count}"
            );
        }
        for count in [1, 1_000_000] {
            let input = parse(&with("member_count", json!(count))).expect("valid");
            assert_eq!(i64::from(input.member_count), count);
        }
        let input = parse(&with("member_count", json!(250.0))).expect("250.0 is whole");
        assert_eq!(input.member_count, 250);
        assert_eq!(
            field_error(&with("member_count", json!(2e9))),
            ("member_count", "must be between 1 and 1000000".into())
        );
    }

    #[test]
    fn malformed_emails_empty_oversized_and_control_characters_are_refused() {
        assert_eq!(
            field_error(&with("admin_email", json!("not-an-email"))).0,
            "admin_email"
        );
        assert_eq!(
            field_error(&with("admin_email", json!("a@b.co\r\nBcc: x@y.co"))).0,
            "admin_email"
        );
        assert_eq!(
            field_error(&with("organization_name", json!("   "))),
            ("organization_name", "must not be empty".into())
        );
        assert_eq!(
            field_error(&with("organization_name", json!("x".repeat(201)))),
            ("organization_name", "must be at most 200 characters".into())
        );
        assert!(parse(&with("organization_name", json!("é".repeat(200)))).is_ok());
        assert_eq!(
            field_error(&with("organization_id", json!("x".repeat(256)))).0,
            "organization_id"
        );
        assert_eq!(
            field_error(&with("organization_name", json!("Acme\nInc"))).0,
            "organization_name"
        );
    }

    #[test]
    fn a_body_that_is_not_a_json_object_is_refused_as_a_whole() {
        assert!(matches!(
            parse_request(b"{not json"),
            Err(InputError::NotJson(_))
        ));
        assert_eq!(parse(&json!([1, 2])), Err(InputError::NotAnObject));
        assert!(matches!(parse_request(b""), Err(InputError::NotJson(_))));
    }

    #[test]
    fn idempotency_keys_are_short_visible_ascii() {
        assert_eq!(check_idempotency_key("req-2026-11-21/abc_DEF"), Ok(()));
        for bad in ["", "has space", "tab\tkey", "ключ"] {
            assert_eq!(
                check_idempotency_key(bad).map_err(|e| e.field.into_owned()),
                Err("Idempotency-Key".to_owned()),
                "{bad:?}"
            );
        }
        assert!(check_idempotency_key(&"k".repeat(256)).is_err());
    }
}
