//! Stripe webhook signatures: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]`, where each `v1`
//! is HMAC-SHA256 of `"<t>.<raw body>"` keyed by an endpoint secret.
//!
//! The verdict on any header is the verdict of Stripe's own libraries (stripe-python's
//! `WebhookSignature.verify_header`, which stripe-node agrees with on everything but the
//! choice among several `t`), because a sender that Stripe's libraries accept must not be
//! refused here and the reverse. So the header is read exactly as they read it, odd as some of
//! it is:
//! - its bytes are characters one for one (ISO-8859-1, as HTTP frameworks hand a header with
//!   non-ASCII bytes to those libraries); it is split on `,` into items, and each item on `=`:
//!   the key is the text before the first `=`, the value the text between the first and the
//!   second `=` (`split("=", 2)[1]`), so `v1=<hex>=junk` carries `<hex>`;
//! - items whose key is neither `t` nor `v1` are ignored, whatever they look like (empty
//!   items, no `=`, spaces around the key); but an item that is exactly `t` or `v1` with no
//!   `=` makes the header unreadable, as it makes stripe-python raise;
//! - the first `t` wins, read as Python's `int()` reads text: surrounding whitespace, a sign,
//!   leading zeros and single underscores between digits are allowed, at most 4,300 digits
//!   (CPython's limit), any size; the MAC is over its decimal value (`t=+0017` signs `17`);
//! - each `v1` is compared, in order and in constant time, with the lower-case hex of the
//!   expected MAC, as text: upper-case hex never matches; a value with a non-ASCII character
//!   ends the check for that secret (Python's `hmac.compare_digest` raises on it);
//! - only the age is checked, after the MAC: `t` older than `now - tolerance` is refused, a
//!   `t` in the future is not (a receiver whose clock runs slow must not refuse every real
//!   delivery). Whole seconds, as stripe-node (stripe-python compares with a fractional `now`).
//!
//! Arithmetic cannot overflow: `t` stays decimal text and is compared with `now - tolerance`
//! in `i128`, or by its sign alone when it is longer than that.
//!
//! We do not use `stripe_webhook::Webhook::construct_event`: it also parses the body into the
//! typed event of one pinned API version, which ingest must not do (it stores bodies of any
//! version, untouched, and parses only the envelope).

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Stripe's default tolerance between the signed timestamp and now.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// CPython's default limit on the digits of an integer read from text; stripe-python's
/// `int(t)` refuses longer timestamps, and so does this module.
pub const MAX_TIMESTAMP_DIGITS: usize = 4300;

/// Why a signature was refused. The messages are safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Stripe-Signature` header, or an empty one.
    #[error("missing Stripe-Signature header")]
    Missing,
    /// The header has no readable `t` or no `v1`.
    #[error("malformed Stripe-Signature header: {0}")]
    Malformed(&'static str),
    /// The signed timestamp is older than the tolerance (replay protection).
    #[error("signature timestamp is older than the {tolerance_secs} s tolerance")]
    OutsideTolerance {
        /// The tolerance applied.
        tolerance_secs: i64,
    },
    /// No `v1` entry matches any configured secret.
    #[error("no v1 signature matches the payload for any configured secret")]
    NoMatch,
}

/// A signed timestamp, an integer of any size kept as canonical decimal text (no sign for
/// zero or positive values, no leading zeros), which is the text the MAC covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timestamp {
    negative: bool,
    digits: String,
}

impl Timestamp {
    /// Reads `text` as Python's `int()` reads a `str` whose characters are these bytes, or
    /// `None` where `int()` raises.
    pub fn parse(text: &[u8]) -> Option<Timestamp> {
        let is_space =
            |b: &u8| matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0x85 | 0xa0);
        let start = text.iter().position(|b| !is_space(b))?;
        let end = text.iter().rposition(|b| !is_space(b))? + 1;
        let text = &text[start..end];
        let (negative, rest) = match text.split_first() {
            Some((b'-', rest)) => (true, rest),
            Some((b'+', rest)) => (false, rest),
            _ => (false, text),
        };
        let mut digits = String::with_capacity(rest.len());
        let mut count = 0usize;
        // An underscore may only stand between two digits.
        let mut after_digit = false;
        for &b in rest {
            match b {
                b'0'..=b'9' => {
                    count += 1;
                    after_digit = true;
                    if !(digits.is_empty() && b == b'0') {
                        digits.push(char::from(b));
                    }
                }
                b'_' if after_digit => after_digit = false,
                _ => return None,
            }
        }
        if count == 0 || !after_digit || count > MAX_TIMESTAMP_DIGITS {
            return None;
        }
        if digits.is_empty() {
            digits.push('0');
        }
        let negative = negative && digits != "0";
        Some(Timestamp { negative, digits })
    }

    /// The value as decimal text, as Python's `"%d"` writes it.
    pub fn decimal(&self) -> String {
        if self.negative {
            format!("-{}", self.digits)
        } else {
            self.digits.clone()
        }
    }

    /// The value, when it fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        self.decimal().parse().ok()
    }

    /// Is the value smaller than `limit`?
    fn is_below(&self, limit: i128) -> bool {
        // 38 digits always fit an i128; longer values are beyond any limit made of two i64.
        match self.decimal().parse::<i128>() {
            Ok(value) => value < limit,
            Err(_) => self.negative,
        }
    }
}

/// A header as Stripe's libraries read it: the first `t`, and every `v1` value in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedHeader<'a> {
    /// The first `t`.
    pub timestamp: Timestamp,
    /// Every `v1` value, as sent.
    pub signatures: Vec<&'a [u8]>,
}

/// Reads a non-empty header (see the module's rules).
pub fn parse_header(header: &[u8]) -> Result<ParsedHeader<'_>, SignatureError> {
    let mut first_t = None;
    let mut signatures = Vec::new();
    for item in header.split(|b| *b == b',') {
        let mut parts = item.splitn(3, |b| *b == b'=');
        let key = parts.next().unwrap_or_default();
        let value = parts.next();
        match key {
            b"t" => {
                let value = value.ok_or(SignatureError::Malformed("a t item has no value"))?;
                first_t.get_or_insert(value);
            }
            b"v1" => {
                let value = value.ok_or(SignatureError::Malformed("a v1 item has no value"))?;
                signatures.push(value);
            }
            _ => {}
        }
    }
    let t = first_t.ok_or(SignatureError::Malformed("no t= timestamp"))?;
    let timestamp = Timestamp::parse(t).ok_or(SignatureError::Malformed("t is not an integer"))?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed("no v1= signature"));
    }
    Ok(ParsedHeader {
        timestamp,
        signatures,
    })
}

/// Checks `header` (its raw bytes) against `payload` for any of `secrets`, at `now` (unix
/// seconds). A `tolerance_secs` of 0 or less checks no age, as Stripe's libraries.
pub fn verify(
    payload: &[u8],
    header: Option<&[u8]>,
    secrets: &[SecretString],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let header = header
        .filter(|h| !h.is_empty())
        .ok_or(SignatureError::Missing)?;
    let parsed = parse_header(header)?;
    let signed_t = parsed.timestamp.decimal();
    let matches = |secret: &SecretString| {
        let expected = hex::encode(
            signed_payload_mac(secret.expose_secret(), &signed_t, payload)
                .finalize()
                .into_bytes(),
        );
        for signature in &parsed.signatures {
            if !signature.is_ascii() {
                return false;
            }
            if bool::from(signature.ct_eq(expected.as_bytes())) {
                return true;
            }
        }
        false
    };
    if !secrets.iter().any(matches) {
        return Err(SignatureError::NoMatch);
    }
    if tolerance_secs > 0
        && parsed
            .timestamp
            .is_below(i128::from(now) - i128::from(tolerance_secs))
    {
        return Err(SignatureError::OutsideTolerance { tolerance_secs });
    }
    Ok(())
}

/// Builds a valid `Stripe-Signature` header, as Stripe would send it (tests, demo, load).
pub fn header_for(payload: &[u8], secret: &str, timestamp: i64) -> String {
    let t = timestamp.to_string();
    format!("t={t},v1={}", signature_hex(payload, secret, &t))
}

/// The lower-case hex `v1` of `payload` signed by `secret` with the timestamp text `t`
/// (tests that build odd headers).
pub fn signature_hex(payload: &[u8], secret: &str, t: &str) -> String {
    hex::encode(
        signed_payload_mac(secret, t, payload)
            .finalize()
            .into_bytes(),
    )
}

fn signed_payload_mac(secret: &str, timestamp: &str, payload: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;
    const BODY: &[u8] = br#"{"id":"evt_1","type":"invoice.paid"}"#;

    fn secrets(list: &[&str]) -> Vec<SecretString> {
        list.iter()
            .map(|s| SecretString::from(s.to_string()))
            .collect()
    }

    fn check(header: &str) -> Result<(), SignatureError> {
        verify(
            BODY,
            Some(header.as_bytes()),
            &secrets(&["whsec_a"]),
            NOW,
            300,
        )
    }

    fn sig(t: &str) -> String {
        signature_hex(BODY, "whsec_a", t)
    }

    #[test]
    fn a_header_made_with_the_secret_verifies() {
        assert_eq!(check(&header_for(BODY, "whsec_a", NOW)), Ok(()));
    }

    #[test]
    fn the_second_of_two_secrets_verifies() {
        let header = header_for(BODY, "whsec_new", NOW);
        let configured = secrets(&["whsec_old", "whsec_new"]);
        assert_eq!(
            verify(BODY, Some(header.as_bytes()), &configured, NOW, 300),
            Ok(())
        );
    }

    #[test]
    fn any_v1_entry_may_match() {
        let header = format!(
            "t={NOW},v1={},v1={},v0=abc",
            "00".repeat(32),
            sig("1800000000")
        );
        assert_eq!(check(&header), Ok(()));
    }

    #[test]
    fn a_tampered_body_is_refused() {
        let header = header_for(BODY, "whsec_a", NOW);
        let tampered = br#"{"id":"evt_1","type":"invoice.paid" }"#;
        assert_eq!(
            verify(
                tampered,
                Some(header.as_bytes()),
                &secrets(&["whsec_a"]),
                NOW,
                300
            ),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn only_the_age_is_checked_against_the_tolerance() {
        let old = SignatureError::OutsideTolerance {
            tolerance_secs: 300,
        };
        assert_eq!(check(&header_for(BODY, "whsec_a", NOW - 301)), Err(old));
        assert_eq!(check(&header_for(BODY, "whsec_a", NOW - 300)), Ok(()));
        // A sender whose clock runs ahead (or a receiver whose clock runs slow).
        assert_eq!(check(&header_for(BODY, "whsec_a", NOW + 3600)), Ok(()));
        assert_eq!(check(&header_for(BODY, "whsec_a", i64::MAX)), Ok(()));
    }

    #[test]
    fn the_smallest_timestamps_are_too_old_not_an_overflow() {
        for t in [i64::MIN, i64::MIN + 1, -1] {
            assert_eq!(
                check(&header_for(BODY, "whsec_a", t)),
                Err(SignatureError::OutsideTolerance {
                    tolerance_secs: 300
                }),
                "{t}"
            );
        }
        let huge_negative = format!("-{}", "9".repeat(40));
        let header = format!("t={huge_negative},v1={}", sig(&huge_negative));
        assert!(matches!(
            check(&header),
            Err(SignatureError::OutsideTolerance { .. })
        ));
        let huge = "9".repeat(40);
        assert_eq!(check(&format!("t={huge},v1={}", sig(&huge))), Ok(()));
    }

    #[test]
    fn t_is_read_as_python_reads_an_integer_and_signed_as_its_decimal_value() {
        let valid = sig("1800000000");
        for t in [
            "+1800000000",
            "01800000000",
            " 1800000000\t",
            "1_800_000_000",
            "\u{a0}1800000000",
        ] {
            let mut header = b"t=".to_vec();
            // One byte per character, as the header arrives.
            header.extend(t.chars().map(|c| c as u32 as u8));
            header.extend_from_slice(format!(",v1={valid}").as_bytes());
            assert_eq!(
                verify(BODY, Some(&header), &secrets(&["whsec_a"]), NOW, 300),
                Ok(()),
                "{t:?}"
            );
        }
        // Signed over the text as sent rather than its value: refused.
        assert_eq!(
            check(&format!("t=+1800000000,v1={}", sig("+1800000000"))),
            Err(SignatureError::NoMatch)
        );
        for t in [
            "1__800000000",
            "_1800000000",
            "1800000000_",
            "0x10",
            "1 8",
            "",
            "+",
            "-",
        ] {
            assert_eq!(
                check(&format!("t={t},v1={valid}")),
                Err(SignatureError::Malformed("t is not an integer")),
                "{t:?}"
            );
        }
        let too_long = format!("{}1800000000", "0".repeat(MAX_TIMESTAMP_DIGITS - 9));
        assert_eq!(
            check(&format!("t={too_long},v1={valid}")),
            Err(SignatureError::Malformed("t is not an integer"))
        );
    }

    #[test]
    fn the_first_t_wins() {
        let valid = sig("1800000000");
        assert_eq!(check(&format!("t=1800000000,t=1,v1={valid}")), Ok(()));
        assert_eq!(
            check(&format!("t=1,t=1800000000,v1={valid}")),
            Err(SignatureError::NoMatch)
        );
        // Only the first needs to be an integer.
        assert_eq!(check(&format!("t=1800000000,t=soon,v1={valid}")), Ok(()));
    }

    #[test]
    fn items_are_split_as_stripe_splits_them() {
        let valid = sig("1800000000");
        // Empty items, items without `=`, unknown keys and a second `=` are fine.
        for header in [
            format!("t=1800000000,,v1={valid},"),
            format!("garbage,t=1800000000,v1={valid}"),
            format!("t=1800000000=x,v1={valid}=y"),
            format!("=,t=1800000000,v0=,v1={valid}"),
        ] {
            assert_eq!(check(&header), Ok(()), "{header}");
        }
        // Spaces make a key another key, and upper-case hex is another signature.
        assert_eq!(
            check(&format!("t=1800000000, v1={valid}")),
            Err(SignatureError::Malformed("no v1= signature"))
        );
        assert_eq!(
            check(&format!("t=1800000000,v1= {valid}")),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            check(&format!("t=1800000000,v1={}", valid.to_uppercase())),
            Err(SignatureError::NoMatch)
        );
        // A bare `t` or `v1` makes stripe-python raise.
        for header in [
            format!("t,t=1800000000,v1={valid}"),
            format!("t=1800000000,v1,v1={valid}"),
        ] {
            assert!(
                matches!(check(&header), Err(SignatureError::Malformed(_))),
                "{header}"
            );
        }
    }

    #[test]
    fn a_non_ascii_v1_ends_the_check_unless_a_match_came_first() {
        let valid = sig("1800000000");
        let mut before = b"t=1800000000,v1=".to_vec();
        before.push(0xe9);
        before.extend_from_slice(format!(",v1={valid}").as_bytes());
        assert_eq!(
            verify(BODY, Some(&before), &secrets(&["whsec_a"]), NOW, 300),
            Err(SignatureError::NoMatch)
        );
        let mut after = format!("t=1800000000,v1={valid},v1=").into_bytes();
        after.push(0xe9);
        assert_eq!(
            verify(BODY, Some(&after), &secrets(&["whsec_a"]), NOW, 300),
            Ok(())
        );
        // Non-ASCII bytes elsewhere are only characters of ignored items.
        let mut elsewhere = b"x=\xff\xfe,".to_vec();
        elsewhere.extend_from_slice(header_for(BODY, "whsec_a", NOW).as_bytes());
        assert_eq!(
            verify(BODY, Some(&elsewhere), &secrets(&["whsec_a"]), NOW, 300),
            Ok(())
        );
    }

    #[test]
    fn malformed_headers_say_what_is_wrong() {
        let s = secrets(&["whsec_a"]);
        assert_eq!(
            verify(BODY, None, &s, NOW, 300),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify(BODY, Some(b""), &s, NOW, 300),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            check("garbage"),
            Err(SignatureError::Malformed("no t= timestamp"))
        );
        assert_eq!(
            check("v1=abcd"),
            Err(SignatureError::Malformed("no t= timestamp"))
        );
        assert_eq!(
            check(&format!("t={NOW}")),
            Err(SignatureError::Malformed("no v1= signature"))
        );
        assert_eq!(
            check("t=soon,v1=ab"),
            Err(SignatureError::Malformed("t is not an integer"))
        );
    }

    #[test]
    fn a_zero_tolerance_checks_no_age() {
        let header = header_for(BODY, "whsec_a", 0);
        assert_eq!(
            verify(
                BODY,
                Some(header.as_bytes()),
                &secrets(&["whsec_a"]),
                NOW,
                0
            ),
            Ok(())
        );
    }
}
