//! Usage records as the product's backend posts them: one record `{meter, value, identifier?,
//! timestamp?}` or a batch `{"records": [...]}` of up to [`MAX_RECORDS`], checked all or
//! nothing (the first bad record is named by index and field, and nothing is stored).

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Map, Value};

use crate::enterprise::{FieldError, InputError, type_name, whole_number};

/// Most records in one request.
pub const MAX_RECORDS: usize = 1_000;
/// Largest value of one record.
pub const MAX_VALUE: i64 = 1_000_000_000;
/// Longest caller identifier.
pub const MAX_IDENTIFIER_LEN: usize = 255;
/// Stripe takes meter events at most this old…
pub const MAX_AGE: TimeDelta = TimeDelta::days(35);
/// …and at most this far ahead.
pub const MAX_AHEAD: TimeDelta = TimeDelta::minutes(5);

/// One checked record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// A configured meter's `event_name`.
    pub meter: String,
    /// Positive.
    pub value: i64,
    /// The caller's id (idempotency), or a new UUID when it gave none.
    pub identifier: String,
    /// When it happened (now when not given).
    pub occurred_at: DateTime<Utc>,
}

/// Parses and checks a body against the configured `meters`, at `now`.
pub fn parse(
    body: &[u8],
    meters: &[String],
    now: DateTime<Utc>,
) -> Result<Vec<UsageRecord>, InputError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| InputError::NotJson(e.to_string()))?;
    let object = value.as_object().ok_or(InputError::NotAnObject)?;
    let Some(records) = object.get("records") else {
        return Ok(vec![record(object, "", meters, now)?]);
    };
    let records = records
        .as_array()
        .ok_or_else(|| FieldError::new("records", "must be an array"))?;
    if records.is_empty() || records.len() > MAX_RECORDS {
        return Err(FieldError::new(
            "records",
            format!(
                "must hold 1 to {MAX_RECORDS} records, not {}",
                records.len()
            ),
        )
        .into());
    }
    records
        .iter()
        .enumerate()
        .map(|(n, item)| {
            let prefix = format!("records[{n}].");
            let object = item
                .as_object()
                .ok_or_else(|| FieldError::new(format!("records[{n}]"), "must be an object"))?;
            Ok(record(object, &prefix, meters, now)?)
        })
        .collect()
}

fn record(
    object: &Map<String, Value>,
    prefix: &str,
    meters: &[String],
    now: DateTime<Utc>,
) -> Result<UsageRecord, FieldError> {
    let name = |field: &str| format!("{prefix}{field}");
    let meter = match object.get("meter") {
        Some(Value::String(meter)) if meters.iter().any(|m| m == meter) => meter.clone(),
        Some(Value::String(meter)) => {
            return Err(FieldError::new(
                name("meter"),
                format!(
                    "{meter:?} is not a configured meter (USAGE_METERS: {})",
                    meters.join(", ")
                ),
            ));
        }
        None | Some(Value::Null) => return Err(FieldError::new(name("meter"), "is required")),
        Some(other) => {
            return Err(FieldError::new(
                name("meter"),
                format!("must be a string, not {}", type_name(other)),
            ));
        }
    };
    let value = match object.get("value") {
        Some(Value::Number(n)) => match whole_number(n) {
            Some(v) if (1..=MAX_VALUE).contains(&v) => v,
            _ => {
                return Err(FieldError::new(
                    name("value"),
                    format!("must be a whole number from 1 to {MAX_VALUE}"),
                ));
            }
        },
        None | Some(Value::Null) => return Err(FieldError::new(name("value"), "is required")),
        Some(other) => {
            return Err(FieldError::new(
                name("value"),
                format!("must be a whole number, not {}", type_name(other)),
            ));
        }
    };
    let identifier = match object.get("identifier") {
        None | Some(Value::Null) => uuid::Uuid::new_v4().to_string(),
        Some(Value::String(id))
            if !id.is_empty()
                && id.len() <= MAX_IDENTIFIER_LEN
                && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            id.clone()
        }
        Some(_) => {
            return Err(FieldError::new(
                name("identifier"),
                format!("must be 1 to {MAX_IDENTIFIER_LEN} visible ASCII characters"),
            ));
        }
    };
    let occurred_at = match object.get("timestamp") {
        None | Some(Value::Null) => now,
        Some(Value::Number(n)) => whole_number(n)
            .and_then(|s| DateTime::from_timestamp(s, 0))
            .filter(|at| *at >= now - MAX_AGE && *at <= now + MAX_AHEAD)
            .ok_or_else(|| {
                FieldError::new(
                    name("timestamp"),
                    "must be unix seconds within the past 35 days and at most 5 minutes ahead \
                     (Stripe's window for meter events)",
                )
            })?,
        Some(other) => {
            return Err(FieldError::new(
                name("timestamp"),
                format!("must be unix seconds, not {}", type_name(other)),
            ));
        }
    };
    Ok(UsageRecord {
        meter,
        value,
        identifier,
        occurred_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meters() -> Vec<String> {
        vec!["ai_messages".into(), "sms_sent".into()]
    }

    fn field_of(body: &str) -> String {
        match parse(body.as_bytes(), &meters(), Utc::now()) {
            Err(InputError::Field(e)) => e.field.into_owned(),
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn one_record_or_a_batch_all_or_nothing() {
        let now = Utc::now();
        let one = parse(
            br#"{"meter": "sms_sent", "value": 3, "identifier": "msg-1"}"#,
            &meters(),
            now,
        )
        .expect("valid");
        assert_eq!(one.len(), 1);
        assert_eq!(
            (one[0].value, one[0].identifier.as_str(), one[0].occurred_at),
            (3, "msg-1", now)
        );
        let batch = parse(
            br#"{"records": [{"meter": "sms_sent", "value": 1}, {"meter": "ai_messages", "value": 2}]}"#,
            &meters(),
            now,
        )
        .expect("valid");
        assert_eq!(batch.len(), 2);
        assert_ne!(
            batch[0].identifier, batch[1].identifier,
            "made identifiers differ"
        );
    }

    #[test]
    fn bad_records_are_named_by_index_and_field() {
        let old = (Utc::now() - TimeDelta::days(36)).timestamp();
        let ahead = (Utc::now() + TimeDelta::minutes(10)).timestamp();
        let cases = [
            (r#"{"meter": "smss", "value": 1}"#.to_owned(), "meter"),
            (r#"{"value": 1}"#.to_owned(), "meter"),
            (r#"{"meter": "sms_sent", "value": 0}"#.to_owned(), "value"),
            (r#"{"meter": "sms_sent", "value": -4}"#.to_owned(), "value"),
            (r#"{"meter": "sms_sent", "value": 1e30}"#.to_owned(), "value"),
            (r#"{"meter": "sms_sent", "value": 2.5}"#.to_owned(), "value"),
            (r#"{"meter": "sms_sent", "value": 2.0, "identifier": 7}"#.to_owned(), "identifier"),
            (r#"{"meter": "sms_sent", "value": "5"}"#.to_owned(), "value"),
            (format!(r#"{{"meter": "sms_sent", "value": 1, "timestamp": {old}}}"#), "timestamp"),
            (format!(r#"{{"meter": "sms_sent", "value": 1, "timestamp": {ahead}}}"#), "timestamp"),
            (r#"{"meter": "sms_sent", "value": 1, "identifier": "has space"}"#.to_owned(), "identifier"),
            (r#"{"records": [{"meter": "sms_sent", "value": 1}, {"meter": "sms_sent", "value": 0}]}"#.to_owned(), "records[1].value"),
            (r#"{"records": []}"#.to_owned(), "records"),
            (r#"{"records": [7]}"#.to_owned(), "records[0]"),
        ];
        for (body, field) in cases {
            assert_eq!(field_of(&body), field, "{body}");
        }
        let too_many = format!(
            r#"{{"records": [{}]}}"#,
            vec![r#"{"meter": "sms_sent", "value": 1}"#; MAX_RECORDS + 1].join(",")
        );
        assert_eq!(field_of(&too_many), "records");
    }
}
