//! Email address checks, for configuration (`EMAIL_FROM`, `ENTERPRISE_SALES_EMAIL`) and for
//! addresses callers send us (an Enterprise request's `admin_email`).
//!
//! Deliberately a plausibility check, not RFC 5322: `local@domain.tld` with the characters
//! real mailboxes use (Unicode letters allowed, for internationalized addresses), no
//! whitespace or control characters (so an address can never inject a header), no quoted local
//! parts, comments or IP literals. Resend has the final word; this catches typos and garbage
//! before a request is accepted or a process starts.

/// Longest address accepted (RFC 5321's path limit minus the angle brackets).
pub const MAX_ADDRESS_LEN: usize = 254;
/// Longest local part (RFC 5321).
const MAX_LOCAL_LEN: usize = 64;
/// Longest domain label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// Why a string is not a usable address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Empty.
    #[error("is empty")]
    Empty,
    /// Longer than [`MAX_ADDRESS_LEN`].
    #[error("is longer than {MAX_ADDRESS_LEN} characters")]
    TooLong,
    /// Not of the form `name@domain.tld`.
    #[error("is not an email address like name@example.com")]
    Malformed,
}

/// Checks a bare address: `local@domain.tld`.
pub fn check(address: &str) -> Result<(), AddressError> {
    if address.is_empty() {
        return Err(AddressError::Empty);
    }
    if address.chars().count() > MAX_ADDRESS_LEN {
        return Err(AddressError::TooLong);
    }
    let (local, domain) = address.rsplit_once('@').ok_or(AddressError::Malformed)?;
    if local_part_ok(local) && domain_ok(domain) {
        Ok(())
    } else {
        Err(AddressError::Malformed)
    }
}

/// Checks a sender as Resend takes it: a bare address, or `Display Name <local@domain.tld>`.
pub fn check_mailbox(mailbox: &str) -> Result<(), AddressError> {
    let mailbox = mailbox.trim();
    match mailbox.strip_suffix('>') {
        None => check(mailbox),
        Some(rest) => {
            let (name, address) = rest.rsplit_once('<').ok_or(AddressError::Malformed)?;
            let name_ok = !name.trim().is_empty()
                && !name.chars().any(|c| c.is_control() || c == '<' || c == '>');
            if name_ok {
                check(address)
            } else {
                Err(AddressError::Malformed)
            }
        }
    }
}

fn local_part_ok(local: &str) -> bool {
    !local.is_empty()
        && local.chars().count() <= MAX_LOCAL_LEN
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c))
}

fn domain_ok(domain: &str) -> bool {
    let labels: Vec<&str> = domain.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.chars().count() <= MAX_LABEL_LEN
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_addresses_are_accepted() {
        for address in [
            "sales@example.com",
            "first.last+tag@sub.example.co.uk",
            "o'brien@example.ie",
            "jürgen@müller.de",
            "x@a-b.io",
        ] {
            assert_eq!(check(address), Ok(()), "{address}");
        }
    }

    #[test]
    fn garbage_and_header_injection_are_refused() {
        for address in [
            "plainaddress",
            "@example.com",
            "name@",
            "name@localhost",
            "name@@example.com",
            "name@example..com",
            "name@-example.com",
            ".name@example.com",
            "na..me@example.com",
            "name @example.com",
            "name@example.com\r\nBcc: victim@example.com",
            "<script>@example.com",
            "name@exa_mple.com",
        ] {
            assert_eq!(check(address), Err(AddressError::Malformed), "{address:?}");
        }
        assert_eq!(check(""), Err(AddressError::Empty));
        let long = format!("{}@example.com", "a".repeat(250));
        assert_eq!(check(&long), Err(AddressError::TooLong));
    }

    #[test]
    fn a_mailbox_may_carry_a_display_name() {
        assert_eq!(check_mailbox("Billing <billing@example.com>"), Ok(()));
        assert_eq!(check_mailbox("billing@example.com"), Ok(()));
        assert_eq!(
            check_mailbox("<billing@example.com>"),
            Err(AddressError::Malformed)
        );
        assert_eq!(
            check_mailbox("Billing <not an address>"),
            Err(AddressError::Malformed)
        );
        assert_eq!(
            check_mailbox("Bill\ning <billing@example.com>"),
            Err(AddressError::Malformed)
        );
    }
}
