//! Stripe webhook signatures: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]`, where each `v1`
//! is HMAC-SHA256 of `"<t>.<raw body>"` keyed by an endpoint secret.
//!
//! Verification runs on the exact bytes received, before anything is parsed, and accepts any
//! `v1` entry under any configured secret (secrets are rolled by configuring old and new
//! together). Comparison is constant-time (`Mac::verify_slice`). We do not use
//! `stripe_webhook::Webhook::construct_event`: it also parses the body into the typed event of
//! one pinned API version, which ingest must not do (it stores bodies of any version, untouched,
//! and parses only the envelope), and it would pull the whole typed Stripe model into ingest.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Stripe's default tolerance between the signed timestamp and now.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// Why a signature was refused. The messages are safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Stripe-Signature` header.
    #[error("missing Stripe-Signature header")]
    Missing,
    /// The header is not `t=…,v1=…`.
    #[error("malformed Stripe-Signature header: {0}")]
    Malformed(&'static str),
    /// The signed timestamp is too far from now (replay protection).
    #[error("signature timestamp is outside the {tolerance_secs} s tolerance")]
    OutsideTolerance {
        /// The tolerance applied.
        tolerance_secs: i64,
    },
    /// No `v1` entry matches any configured secret.
    #[error("no v1 signature matches the payload for any configured secret")]
    NoMatch,
}

/// Checks `header` against `payload` for any of `secrets`, at time `now` (unix seconds).
pub fn verify(
    payload: &[u8],
    header: Option<&str>,
    secrets: &[SecretString],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed("expected key=value pairs"))?;
        match key {
            "t" => {
                let t = value
                    .parse::<i64>()
                    .map_err(|_| SignatureError::Malformed("t is not a unix timestamp"))?;
                timestamp = Some((value, t));
            }
            // Entries that are not valid hex can never match; skip them like other schemes.
            "v1" => signatures.extend(hex::decode(value).ok()),
            _ => {}
        }
    }
    let (t_text, t) = timestamp.ok_or(SignatureError::Malformed("no t= timestamp"))?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed("no v1= signature"));
    }
    if (now - t).abs() > tolerance_secs {
        return Err(SignatureError::OutsideTolerance { tolerance_secs });
    }
    for secret in secrets {
        let mac = signed_payload_mac(secret.expose_secret(), t_text, payload);
        if signatures
            .iter()
            .any(|sig| mac.clone().verify_slice(sig).is_ok())
        {
            return Ok(());
        }
    }
    Err(SignatureError::NoMatch)
}

/// Builds a valid `Stripe-Signature` header, as Stripe would send it (tests, demo, load).
pub fn header_for(payload: &[u8], secret: &str, timestamp: i64) -> String {
    let t = timestamp.to_string();
    let signature = signed_payload_mac(secret, &t, payload)
        .finalize()
        .into_bytes();
    format!("t={t},v1={}", hex::encode(signature))
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

    #[test]
    fn a_header_made_with_the_secret_verifies() {
        let header = header_for(BODY, "whsec_a", NOW);
        assert_eq!(
            verify(BODY, Some(&header), &secrets(&["whsec_a"]), NOW, 300),
            Ok(())
        );
    }

    #[test]
    fn the_second_of_two_secrets_verifies() {
        let header = header_for(BODY, "whsec_new", NOW);
        let configured = secrets(&["whsec_old", "whsec_new"]);
        assert_eq!(verify(BODY, Some(&header), &configured, NOW, 300), Ok(()));
    }

    #[test]
    fn any_v1_entry_may_match() {
        let valid = header_for(BODY, "whsec_a", NOW);
        let valid_sig = valid.split_once(",v1=").map(|(_, s)| s).unwrap_or_default();
        let header = format!("t={NOW},v1={},v1={valid_sig},v0=abc", "00".repeat(32));
        assert_eq!(
            verify(BODY, Some(&header), &secrets(&["whsec_a"]), NOW, 300),
            Ok(())
        );
    }

    #[test]
    fn a_tampered_body_is_refused() {
        let header = header_for(BODY, "whsec_a", NOW);
        let tampered = br#"{"id":"evt_1","type":"invoice.paid" }"#;
        assert_eq!(
            verify(tampered, Some(&header), &secrets(&["whsec_a"]), NOW, 300),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn timestamps_beyond_the_tolerance_are_refused_either_way() {
        for t in [NOW - 301, NOW + 301] {
            let header = header_for(BODY, "whsec_a", t);
            assert_eq!(
                verify(BODY, Some(&header), &secrets(&["whsec_a"]), NOW, 300),
                Err(SignatureError::OutsideTolerance {
                    tolerance_secs: 300
                })
            );
        }
        let header = header_for(BODY, "whsec_a", NOW - 300);
        assert_eq!(
            verify(BODY, Some(&header), &secrets(&["whsec_a"]), NOW, 300),
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
            verify(BODY, Some("garbage"), &s, NOW, 300),
            Err(SignatureError::Malformed("expected key=value pairs"))
        );
        assert_eq!(
            verify(BODY, Some("v1=abcd"), &s, NOW, 300),
            Err(SignatureError::Malformed("no t= timestamp"))
        );
        assert_eq!(
            verify(BODY, Some(&format!("t={NOW}")), &s, NOW, 300),
            Err(SignatureError::Malformed("no v1= signature"))
        );
        assert_eq!(
            verify(BODY, Some("t=soon,v1=ab"), &s, NOW, 300),
            Err(SignatureError::Malformed("t is not a unix timestamp"))
        );
    }
}
